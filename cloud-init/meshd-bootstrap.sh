#!/bin/bash
# meshd-bootstrap: run by cloud-init on every boot (/var/lib/cloud/scripts/per-boot), as root.
# Idempotent; reads its settings from /etc/meshd/bootstrap.env (written by cloud-init, no secrets in it).
#
#  1. AWS CLI: installed once (snap) if missing; it authenticates through the instance role over IMDSv2.
#  2. /usr/local/bin/meshd: downloaded (S3 through the gateway endpoint, or MESHD_BINARY_URL) only when its
#     sha256 differs from MESHD_BINARY_SHA256; a download that does not match is refused.
#  3. Secrets from SSM SecureStrings, each into a root-only 0600 file that the unit receives with LoadCredential=:
#       caller, infer: /etc/meshd/worker-token        (MESHD_TOKEN_PARAMETER: this role's own token, which the
#                                                     gateway grants this role's functions and triggers only)
#       gateway:       /etc/meshd/tokens/caller       (MESHD_CALLER_TOKEN_PARAMETER) and
#                      /etc/meshd/tokens/infer        (MESHD_INFER_TOKEN_PARAMETER): every worker role's token, in a
#                                                     root-only 0700 directory; /etc/meshd/worker-token (the single
#                                                     token of an older deployment, for every role) is removed
#                      /etc/meshd/api-keys            (MESHD_API_KEYS_PARAMETER: sha256:<hex> lines; anything else
#                                                     is refused and the keys in force stay)
#                      /etc/meshd/tls/gateway-key.pem (MESHD_TLS_KEY_PARAMETER), refused unless it is the key of
#                                                     /etc/meshd/tls/gateway.pem (the certificate from user data)
#                      /etc/meshd/state-password      (MESHD_STATE_PASSWORD_PARAMETER: the state store's ACL user)
#                      /etc/meshd/metrics-key         (MESHD_METRICS_KEY_PARAMETER: not meshd's; the CloudWatch
#                                                     agent sends it to scrape GET /metrics)
#     The workers need /etc/meshd/tls/mesh-ca.pem (from user data) to verify the gateways.
#  4. /etc/meshd/<role>.env: the workers' MESHD_GATEWAY_URL (wss://gateways.<name>.internal:49134), the gateway's
#     MESHD_STATE_* (rediss:// URL, ACL user, cluster mode, WAIT replicas), infer's engine on GPU nodes
#     (MESHD_GENERATOR=openai, MESHD_UPSTREAM_URL).
#  5. infer: /var/cache/meshd/models/model.gguf from the model registry (MESHD_MODEL_S3_URI, the private bucket
#     through the S3 gateway endpoint), with retries, checked against MESHD_MODEL_SHA256; not fetched again when the
#     file on disk already matches. On GPU nodes (MESHD_INFER_GENERATOR=openai) no GGUF: it waits for the engine.
#  6. The CloudWatch agent: installed once; ships the journal (/var/log/syslog) to MESHD_LOG_GROUP and, on a gateway,
#     scrapes its own GET /metrics every 15 s into MESHD_METRICS_LOG_GROUP as embedded-metric-format events (the
#     queue-depth metric the infer group scales on; dimension `gateway` = this VM's private address).
#  7. `meshd config check`, then enable and (re)start meshd-<role>.service (restart only if something changed:
#     binary, a secret, the environment or the model). A changed secret always means a restart, never a reload:
#     systemd copies LoadCredential= files when the unit starts and only then, so a reloaded meshd would re-read
#     the old copies (a revoked API key would keep working). meshd drains in-flight work on SIGTERM first.
#     On a worker, also meshd-drain-watch.service (drains on a spot notice or a scale-in). A worker launched into an
#     Auto Scaling warm pool (autoscaling/target-lifecycle-state Warmed:*) is prepared (binary, secrets, model on
#     disk) but not started: it starts when the group takes it into service, at that boot.
set -euo pipefail
umask 077

# For tests only: MESHD_BOOTSTRAP_ROOT prefixes every path it writes, MESHD_BOOTSTRAP_RETRY_DELAY sets the first
# backoff delay, MESHD_IMDS_URL points at a stand-in metadata service. All unset on a VM.
ROOT=${MESHD_BOOTSTRAP_ROOT:-}
RETRY_DELAY=${MESHD_BOOTSTRAP_RETRY_DELAY:-2}
IMDS=${MESHD_IMDS_URL:-http://169.254.169.254}

ENV_FILE=$ROOT/etc/meshd/bootstrap.env
# shellcheck disable=SC1090
. "$ENV_FILE"

: "${MESHD_ROLE:?}" "${AWS_REGION:?}" "${MESHD_BINARY_SHA256:?}"
# The SSM parameters each role reads: the gateway every role's token, a worker its own.
if [ "$MESHD_ROLE" = "gateway" ]; then
  : "${MESHD_CALLER_TOKEN_PARAMETER:?}" "${MESHD_INFER_TOKEN_PARAMETER:?}"
  : "${MESHD_API_KEYS_PARAMETER:?}" "${MESHD_TLS_KEY_PARAMETER:?}"
  : "${MESHD_STATE_PASSWORD_PARAMETER:?}" "${MESHD_METRICS_KEY_PARAMETER:?}"
  : "${MESHD_STATE_URL:?}" "${MESHD_STATE_USERNAME:?}" "${MESHD_METRICS_LOG_GROUP:?}" "${MESHD_METRICS_NAMESPACE:?}"
else
  : "${MESHD_TOKEN_PARAMETER:?}"
fi
export AWS_REGION AWS_DEFAULT_REGION="$AWS_REGION"

BIN=$ROOT/usr/local/bin/meshd
ETC=$ROOT/etc/meshd
CACHE=$ROOT/var/cache/meshd
UNIT="meshd-$MESHD_ROLE.service"
CHANGED=0

log() { echo "meshd-bootstrap[$MESHD_ROLE]: $*"; logger -t meshd-bootstrap -- "$*" 2>/dev/null || true; }
die() { log "FATAL: $*"; exit 1; }

# retry ATTEMPTS COMMAND...: exponential backoff, 2 s doubling up to 60 s.
retry() {
  local attempts=$1 n=1 delay=$RETRY_DELAY
  shift
  until "$@"; do
    if [ "$n" -ge "$attempts" ]; then
      return 1
    fi
    log "attempt $n/$attempts failed: $*; retrying in $delay s"
    sleep "$delay"
    n=$((n + 1))
    delay=$((delay * 2))
    if [ "$delay" -gt 60 ]; then delay=60; fi
  done
}

sha256_of() { sha256sum "$1" 2>/dev/null | cut -d' ' -f1; }

# imds PATH: a metadata value over IMDSv2 (a session token, then a GET that carries it); exit 1 on 404 or failure.
imds() {
  local token
  token=$(curl -fsS --max-time 2 -X PUT -H "X-aws-ec2-metadata-token-ttl-seconds: 60" "$IMDS/latest/api/token") || return 1
  curl -fsS --max-time 2 -H "X-aws-ec2-metadata-token: $token" "$IMDS/latest/meta-data/$1"
}

# ---- 1. AWS CLI -----------------------------------------------------------------------------------------------------
AWS=$(command -v aws || true)
if [ -z "$AWS" ] && [ -x /snap/bin/aws ]; then
  AWS=/snap/bin/aws
fi
if [ -z "$AWS" ]; then
  log "installing the AWS CLI (snap aws-cli)"
  retry 6 snap install aws-cli --classic || die "could not install the AWS CLI"
  AWS=/snap/bin/aws
fi

install -d -m 0755 -o root -g root "$ETC" "$(dirname "$BIN")"

# ---- 2. the meshd binary --------------------------------------------------------------------------------------------
fetch_binary() {
  local tmp
  tmp=$(mktemp "$(dirname "$BIN")/.meshd.XXXXXX")
  if [ -n "${MESHD_BINARY_URL:-}" ]; then
    curl -fsSL --proto '=https' --retry 5 --retry-all-errors --connect-timeout 10 -o "$tmp" "$MESHD_BINARY_URL" || { rm -f "$tmp"; return 1; }
  else
    "$AWS" s3 cp --only-show-errors "$MESHD_BINARY_S3_URI" "$tmp" || { rm -f "$tmp"; return 1; }
  fi
  if [ "$(sha256_of "$tmp")" != "$MESHD_BINARY_SHA256" ]; then
    rm -f "$tmp"
    die "downloaded meshd binary does not match sha256 $MESHD_BINARY_SHA256; refusing it"
  fi
  chmod 0755 "$tmp"
  mv -f "$tmp" "$BIN"
}

if [ "$(sha256_of "$BIN")" != "$MESHD_BINARY_SHA256" ]; then
  log "installing meshd (sha256 $MESHD_BINARY_SHA256)"
  retry 5 fetch_binary || die "could not download the meshd binary"
  CHANGED=1
else
  log "meshd binary present, sha256 matches"
fi

# ---- 3. secrets from SSM --------------------------------------------------------------------------------------------
TLS_DIR=$ETC/tls
TOKENS_DIR=$ETC/tokens
GATEWAY_CERT=$TLS_DIR/gateway.pem
GATEWAY_KEY=$TLS_DIR/gateway-key.pem
MESH_CA=$TLS_DIR/mesh-ca.pem

# key_matches_cert KEY CERT: the public key of KEY is the one in CERT (skipped when openssl is missing).
key_matches_cert() {
  local from_key from_cert
  command -v openssl >/dev/null || return 0
  from_key=$(openssl pkey -in "$1" -pubout 2>/dev/null) || return 1
  from_cert=$(openssl x509 -in "$2" -noout -pubkey 2>/dev/null) || return 1
  [ -n "$from_key" ] && [ "$from_key" = "$from_cert" ]
}

# api_keys_valid FILE: one or more `sha256:<64 hex>` lines (comments after #, blank lines ignored) and nothing else,
#   the format Terraform writes. A plain key would mean a secret in SSM, and a line meshd cannot parse would stop the
#   gateway at the restart that applies the file: refuse both and keep the keys in force.
api_keys_valid() {
  local lines
  lines=$(sed -e 's/#.*//' -e 's/^[[:space:]]*//' -e 's/[[:space:]]*$//' "$1" | grep -v '^$') || return 1
  ! grep -qvE '^sha256:[0-9a-fA-F]{64}$' <<<"$lines"
}

# fetch_secret PARAMETER FILE FORMAT: the SecureString's value into FILE (root, 0600), replaced only when it differs.
#   FORMAT raw: exactly the value (a worker token); lines: the value and a final newline (PEM, api-keys).
#   A replaced file restarts the unit: the service reads its credential copy of FILE, made at start only.
fetch_secret() {
  local param=$1 dest=$2 format=$3 tmp value
  # The value only ever lives in this shell variable and the 0600 file (printf is a builtin: no argv exposure).
  value=$("$AWS" ssm get-parameter --name "$param" --with-decryption \
    --query Parameter.Value --output text) || return 1
  [ -n "$value" ] || return 1
  tmp=$(mktemp "$(dirname "$dest")/.$(basename "$dest").XXXXXX")
  if [ "$format" = raw ]; then
    printf '%s' "$value" >"$tmp"
  else
    printf '%s\n' "$value" >"$tmp"
  fi
  value=
  chown root:root "$tmp"
  chmod 0600 "$tmp"
  if cmp -s "$tmp" "$dest"; then
    rm -f "$tmp"
    return 0
  fi
  if [ "$dest" = "$GATEWAY_KEY" ] && ! key_matches_cert "$tmp" "$GATEWAY_CERT"; then
    rm -f "$tmp"
    # Not retried: the key in SSM and the certificate in user data come from different applies. Keep the old key.
    die "the TLS key in SSM parameter $param is not the key of $GATEWAY_CERT; refusing it (terraform apply replaces the gateway VM when its certificate changes)"
  fi
  if [ "$dest" = "$ETC/api-keys" ] && ! api_keys_valid "$tmp"; then
    rm -f "$tmp"
    # Not retried: the parameter holds what Terraform (or someone by hand) put there. Keep the keys in force.
    die "the API keys in SSM parameter $param are not sha256:<hex> lines; refusing them and keeping $dest"
  fi
  mv -f "$tmp" "$dest"
  log "$dest updated from SSM parameter $param"
  CHANGED=1
}

if [ "$MESHD_ROLE" = "gateway" ]; then
  [ -s "$GATEWAY_CERT" ] || die "$GATEWAY_CERT is missing (cloud-init writes it from user data)"
  # One token per worker role (roles/gateway.toml's [worker_token_files] reads the unit's credential copies of these);
  # each grants only its role's functions, triggers and state.
  install -d -m 0700 -o root -g root "$TOKENS_DIR"
  retry 8 fetch_secret "$MESHD_CALLER_TOKEN_PARAMETER" "$TOKENS_DIR/caller" raw ||
    die "could not read the caller token from SSM parameter $MESHD_CALLER_TOKEN_PARAMETER"
  retry 8 fetch_secret "$MESHD_INFER_TOKEN_PARAMETER" "$TOKENS_DIR/infer" raw ||
    die "could not read the infer token from SSM parameter $MESHD_INFER_TOKEN_PARAMETER"
  if [ -e "$ETC/worker-token" ]; then
    # The single token of an older deployment, which granted every role: the gateway no longer reads it.
    rm -f "$ETC/worker-token"
    log "$ETC/worker-token removed: the gateway holds one token per role in $TOKENS_DIR"
  fi
  install -d -m 0755 -o root -g root "$TLS_DIR"
  retry 8 fetch_secret "$MESHD_API_KEYS_PARAMETER" "$ETC/api-keys" lines ||
    die "could not read the API keys from SSM parameter $MESHD_API_KEYS_PARAMETER"
  retry 8 fetch_secret "$MESHD_TLS_KEY_PARAMETER" "$GATEWAY_KEY" lines ||
    die "could not read the gateway TLS key from SSM parameter $MESHD_TLS_KEY_PARAMETER"
  key_matches_cert "$GATEWAY_KEY" "$GATEWAY_CERT" || die "$GATEWAY_KEY is not the key of $GATEWAY_CERT"
  retry 8 fetch_secret "$MESHD_STATE_PASSWORD_PARAMETER" "$ETC/state-password" raw ||
    die "could not read the state store's password from SSM parameter $MESHD_STATE_PASSWORD_PARAMETER"
  # The CloudWatch agent's key, not meshd's: a new one needs no restart of the gateway (the api-keys file carries
  # its digest), only of the agent, which step 6 restarts on every run.
  changed_before=$CHANGED
  retry 8 fetch_secret "$MESHD_METRICS_KEY_PARAMETER" "$ETC/metrics-key" raw ||
    die "could not read the metrics key from SSM parameter $MESHD_METRICS_KEY_PARAMETER"
  CHANGED=$changed_before
else
  # This role's own token: the gateway grants it this role's functions and triggers, nothing of another role.
  retry 8 fetch_secret "$MESHD_TOKEN_PARAMETER" "$ETC/worker-token" raw ||
    die "could not read the $MESHD_ROLE token from SSM parameter $MESHD_TOKEN_PARAMETER"
  [ -s "$MESH_CA" ] || die "$MESH_CA is missing (cloud-init writes it from user data); workers verify the gateway with it"
fi

# ---- 4. environment file --------------------------------------------------------------------------------------------
if [ "$MESHD_ROLE" != "gateway" ]; then
  case "${MESHD_GATEWAY_URL:?}" in
    wss://*) ;;
    *) die "MESHD_GATEWAY_URL=$MESHD_GATEWAY_URL is not wss://: the mesh carries the worker token and must be TLS" ;;
  esac
else
  case "$MESHD_STATE_URL" in
    rediss://*) ;;
    *) die "MESHD_STATE_URL=$MESHD_STATE_URL is not rediss://: the state store's password and every state::* value must travel over TLS" ;;
  esac
fi
GPU=
if [ "$MESHD_ROLE" = "infer" ] && [ "${MESHD_INFER_GENERATOR:-}" = "openai" ]; then
  GPU=1
  case "${MESHD_UPSTREAM_URL:-}" in
    http://127.0.0.1:* | http://localhost:*) ;;
    *) die "MESHD_UPSTREAM_URL=${MESHD_UPSTREAM_URL:-} is not an engine on this VM (http://127.0.0.1:PORT)" ;;
  esac
fi
env_tmp=$(mktemp "$ETC/.env.XXXXXX")
if [ "$MESHD_ROLE" != "gateway" ]; then
  echo "MESHD_GATEWAY_URL=$MESHD_GATEWAY_URL" >"$env_tmp"
else
  {
    echo "MESHD_STATE_URL=$MESHD_STATE_URL"
    echo "MESHD_STATE_USERNAME=$MESHD_STATE_USERNAME"
    echo "MESHD_STATE_CLUSTER=${MESHD_STATE_CLUSTER:-false}"
    echo "MESHD_STATE_WAIT_REPLICAS=${MESHD_STATE_WAIT_REPLICAS:-0}"
  } >"$env_tmp"
fi
if [ -n "$GPU" ]; then
  echo "MESHD_GENERATOR=openai" >>"$env_tmp"
  echo "MESHD_UPSTREAM_URL=$MESHD_UPSTREAM_URL" >>"$env_tmp"
fi
chmod 0644 "$env_tmp"
if cmp -s "$env_tmp" "$ETC/$MESHD_ROLE.env"; then
  rm -f "$env_tmp"
else
  mv -f "$env_tmp" "$ETC/$MESHD_ROLE.env"
  CHANGED=1
fi

# ---- 5. the model (infer only) --------------------------------------------------------------------------------------
if [ "$MESHD_ROLE" = "infer" ] && [ -z "$GPU" ]; then
  : "${MESHD_MODEL_S3_URI:?}" "${MESHD_MODEL_SHA256:?}"
  # With DynamicUser=yes systemd keeps the cache in /var/cache/private/meshd and links /var/cache/meshd to it.
  # On the first boot systemd moves this directory there itself, when it first starts the unit.
  [ -e "$CACHE" ] || install -d -m 0700 -o root -g root "$CACHE"
  MODEL_DIR=$CACHE/models
  [ -d "$MODEL_DIR" ] || install -d -m 0755 "$MODEL_DIR"
  MODEL="$MODEL_DIR/model.gguf"

  fetch_model() {
    # From the private bucket through the S3 gateway endpoint; the part file is only promoted to model.gguf once its
    # sha256 matches.
    rm -f "$MODEL.part"
    "$AWS" s3 cp --only-show-errors "$MESHD_MODEL_S3_URI" "$MODEL.part" || { rm -f "$MODEL.part"; return 1; }
    if [ "$(sha256_of "$MODEL.part")" != "$MESHD_MODEL_SHA256" ]; then
      log "model from $MESHD_MODEL_S3_URI does not match sha256 $MESHD_MODEL_SHA256; discarding it"
      rm -f "$MODEL.part"
      return 1
    fi
    chmod 0644 "$MODEL.part"
    mv -f "$MODEL.part" "$MODEL"
  }

  if [ "$(sha256_of "$MODEL")" = "$MESHD_MODEL_SHA256" ]; then
    log "model present, sha256 matches; not downloading"
  else
    log "fetching the model from $MESHD_MODEL_S3_URI"
    retry 6 fetch_model || die "could not fetch a model matching sha256 $MESHD_MODEL_SHA256"
    CHANGED=1
  fi
fi

# ---- 6. the CloudWatch agent: the journal, and on a gateway its own /metrics ----------------------------------------
CWAGENT=$ROOT/opt/aws/amazon-cloudwatch-agent
if [ -n "${MESHD_LOG_GROUP:-}" ]; then
  if [ ! -x "$CWAGENT/bin/amazon-cloudwatch-agent-ctl" ]; then
    # AWS's package, from its regional bucket (through the S3 gateway endpoint, whose policy names that bucket).
    log "installing the CloudWatch agent"
    deb=$(mktemp --suffix=.deb /tmp/cwagent.XXXXXX)
    retry 5 curl -fsSL --proto '=https' --connect-timeout 10 -o "$deb" \
      "https://amazoncloudwatch-agent-$AWS_REGION.s3.$AWS_REGION.amazonaws.com/ubuntu/amd64/latest/amazon-cloudwatch-agent.deb" ||
      die "could not download the CloudWatch agent"
    dpkg -i "$deb" >/dev/null || die "could not install the CloudWatch agent"
    rm -f "$deb"
  fi
  install -d -m 0755 "$CWAGENT/etc"
  AGENT_CONFIG=$CWAGENT/etc/meshd-agent.json
  PROM_CONFIG=$CWAGENT/etc/meshd-prometheus.yaml
  prometheus=
  if [ "$MESHD_ROLE" = "gateway" ]; then
    # The label that tells the gateways' series apart: this VM's private address, fixed per gateway (Terraform's
    # local.gateways), so the scaling policy names each gateway's series.
    GATEWAY_LABEL=
    for _ in 1 2 3 4 5; do
      GATEWAY_LABEL=$(imds local-ipv4) && break
      sleep "$RETRY_DELAY"
    done
    [[ "$GATEWAY_LABEL" =~ ^[0-9]{1,3}(\.[0-9]{1,3}){3}$ ]] || die "could not read this VM's private address from the metadata service"
    # Loopback to its own gateway, so no certificate check (the gateway's certificate names the NLB and
    # gateways.<name>.internal, not 127.0.0.1); the bearer key is the metrics key.
    cat >"$PROM_CONFIG.tmp" <<PROM
global:
  scrape_interval: 15s
  scrape_timeout: 5s
scrape_configs:
  - job_name: meshd
    scheme: https
    metrics_path: /metrics
    tls_config:
      insecure_skip_verify: true
    authorization:
      type: Bearer
      credentials_file: /etc/meshd/metrics-key
    static_configs:
      - targets: ["127.0.0.1:3111"]
        labels:
          gateway: "$GATEWAY_LABEL"
    metric_relabel_configs:
      - source_labels: [status]
        regex: "([1-5])[0-9][0-9]"
        target_label: status_class
        replacement: "\${1}xx"
PROM
    mv -f "$PROM_CONFIG.tmp" "$PROM_CONFIG"
    # Which series become CloudWatch metrics, with which dimensions (the rest stays in the log group only):
    #   meshd_function_inflight, meshd_function_workers  by (gateway, function) and by (function)
    #   meshd_workers_connected                          by (gateway)
    #   meshd_http_requests_total                        by (status_class): the 5xx alarm
    prometheus=$(
      cat <<JSON
,
    "metrics_collected": {
      "prometheus": {
        "log_group_name": "$MESHD_METRICS_LOG_GROUP",
        "prometheus_config_path": "/opt/aws/amazon-cloudwatch-agent/etc/meshd-prometheus.yaml",
        "emf_processor": {
          "metric_namespace": "$MESHD_METRICS_NAMESPACE",
          "metric_declaration": [
            {"source_labels": ["job"], "label_matcher": "^meshd\$",
             "dimensions": [["gateway", "function"], ["function"]],
             "metric_selectors": ["^meshd_function_inflight\$", "^meshd_function_workers\$"]},
            {"source_labels": ["job"], "label_matcher": "^meshd\$",
             "dimensions": [["gateway"]],
             "metric_selectors": ["^meshd_workers_connected\$"]},
            {"source_labels": ["job", "status_class"], "label_matcher": "^meshd;5xx\$",
             "dimensions": [["status_class"]],
             "metric_selectors": ["^meshd_http_requests_total\$"]}
          ]
        }
      }
    }
JSON
    )
  fi
  cat >"$AGENT_CONFIG.tmp" <<JSON
{
  "agent": {"run_as_user": "root"},
  "logs": {
    "force_flush_interval": 15,
    "logs_collected": {
      "files": {
        "collect_list": [
          {"file_path": "/var/log/syslog", "log_group_name": "$MESHD_LOG_GROUP",
           "log_stream_name": "{instance_id}", "retention_in_days": -1}
        ]
      }
    }$prometheus
  }
}
JSON
  mv -f "$AGENT_CONFIG.tmp" "$AGENT_CONFIG"
  "$CWAGENT/bin/amazon-cloudwatch-agent-ctl" -a fetch-config -m ec2 -s -c "file:/opt/aws/amazon-cloudwatch-agent/etc/meshd-agent.json" >/dev/null ||
    log "the CloudWatch agent did not take its configuration (logs and metrics are not shipped)"
fi

# ---- 7. check the config and (re)start the unit ---------------------------------------------------------------------
"$BIN" config check "$ETC/$MESHD_ROLE.toml" || die "meshd config check $ETC/$MESHD_ROLE.toml failed"

systemctl daemon-reload
systemctl enable "$UNIT"
if [ "$MESHD_ROLE" != "gateway" ]; then
  systemctl enable meshd-drain-watch.service
  # Where the Auto Scaling group takes this instance. A worker launched into a warm pool is only prepared: it is
  # stopped next, and started (this script runs again) when the group takes it into service.
  LIFECYCLE=$(imds autoscaling/target-lifecycle-state || true)
  case "$LIFECYCLE" in
    Warmed:*)
      log "launched into the warm pool ($LIFECYCLE): binary, secrets and model ready; not starting $UNIT"
      exit 0
      ;;
  esac
  systemctl --no-block start meshd-drain-watch.service
fi
if [ -n "$GPU" ]; then
  # meshd's openai generator asks the engine for its models at start and exits when it does not answer; an engine
  # loading a large model takes minutes, and a crash loop would power the VM off (StartLimitAction=): wait for it.
  log "waiting for the engine at $MESHD_UPSTREAM_URL"
  retry 30 curl -fsS --max-time 5 -o /dev/null "$MESHD_UPSTREAM_URL/v1/models" ||
    die "the engine at $MESHD_UPSTREAM_URL does not answer GET /v1/models"
fi
# --no-block: this runs inside cloud-final.service during boot; queue the job instead of waiting on it.
if [ "$CHANGED" = 1 ]; then
  # A restart, never a reload: systemd copies the credentials (worker tokens, API keys, TLS key) anew only when the
  # unit starts. systemd sends SIGTERM, meshd drains in-flight work (drain_timeout_secs) and exits, then starts again.
  log "restarting $UNIT"
  systemctl --no-block restart "$UNIT"
else
  systemctl --no-block start "$UNIT"
fi
log "done: $UNIT queued (journalctl -u $UNIT)"
