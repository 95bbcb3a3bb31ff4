"""cloud-init/meshd-bootstrap.sh run for real against a scratch root (MESHD_BOOTSTRAP_ROOT) with stub aws, curl
and systemctl: sha256 checks, the secret files (on a worker its own role's token; on the gateway every role's token,
the API keys and the TLS key, checked against the certificate), the env file, the model cache, restart only on
change.

The systemctl stub keeps systemd's credential semantics for the repository's real unit file (installed in the scratch
root where cloud-init puts it): LoadCredential= files are copied into the unit's credential directory (%d) when the
unit starts and at no other time, and a reload is refused unless the unit has ExecReload=. So the tests see what the
running meshd reads through its Environment=...=%d/<id> paths and the /run/credentials/<unit>/<id> paths of its TOML
(the gateway's [worker_token_files]): a rotated secret must reach that copy."""
import hashlib
import os
import stat
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest

from deploylib import BOOTSTRAP, REPO, SYSTEMD_DIR, parse_unit

# One token per worker role (terraform/artifacts.tf: /<name>/worker-token/<role>).
TOKENS = {"caller": "first-caller-token-0123456789", "infer": "first-infer-token-9876543210"}
API_KEYS = "sha256:" + "a1" * 32
GATEWAY_URL = "wss://gateways.meshd.internal:49134"
STATE_URL = "rediss://clustercfg.meshd-state.abc123.memorydb.us-east-1.amazonaws.com:6379/0"
STATE_PASSWORD = "state-password-0123456789abcdef"
METRICS_KEY = "metrics-key-0123456789abcdef"
GATEWAY_IP = "10.20.11.10"
PARAMS = {"caller_token": "/meshd/worker-token/caller", "infer_token": "/meshd/worker-token/infer",
          "api_keys": "/meshd/api-keys", "tls_key": "/meshd/gateway-tls-key",
          "state_password": "/meshd/state-password", "metrics_key": "/meshd/metrics-key"}
# What each role reads from SSM, and nothing else (terraform/iam.tf lets it read exactly these).
READS = {"gateway": {"caller_token", "infer_token", "api_keys", "tls_key", "state_password", "metrics_key"},
         "caller": {"caller_token"}, "infer": {"infer_token"}}

STUB_AWS = r"""#!/bin/bash
echo "aws $*" >>"$STUB_LOG"
case "$1 $2" in
  "s3 cp")
    case "$*" in
      *models/*) cp "$STUB_MODEL" "${@: -1}" ;;
      *) cp "$STUB_BINARY" "${@: -1}" ;;
    esac ;;
  "ssm get-parameter")
    # --name NAME -> $STUB_SSM/<NAME with / as _>; like `--output text`, the value and a newline.
    while [ $# -gt 0 ] && [ "$1" != "--name" ]; do shift; done
    f="$STUB_SSM/$(printf '%s' "$2" | tr / _)"
    [ -f "$f" ] || { echo "ParameterNotFound: $2" >&2; exit 254; }
    cat "$f"; echo ;;
  *) echo "unexpected aws call: $*" >&2; exit 2 ;;
esac
"""
# curl: the instance metadata service (logged as "imds <path>"; the target lifecycle state comes from
# $STUB_LIFECYCLE_FILE, missing = 404 like an instance in no Auto Scaling group), the engine of a GPU node
# (http://127.0.0.1:*; $STUB_ENGINE_UP set = it answers), the CloudWatch agent's package, the binary.
STUB_CURL = r"""#!/bin/bash
args="$*"
out=
while [ $# -gt 0 ]; do
  if [ "$1" = "-o" ]; then out=$2; shift; fi
  url=$1
  shift
done
case "$url" in
  http://169.254.169.254/latest/api/token) echo "imds token" >>"$STUB_LOG"; echo stub-token; exit 0 ;;
  http://169.254.169.254/latest/meta-data/*)
    path=${url#http://169.254.169.254/latest/meta-data/}
    echo "imds $path" >>"$STUB_LOG"
    case "$args" in *"X-aws-ec2-metadata-token: stub-token"*) ;; *) exit 22 ;; esac
    case "$path" in
      local-ipv4) printf '%s' "$STUB_LOCAL_IP"; exit 0 ;;
      autoscaling/target-lifecycle-state) [ -f "$STUB_LIFECYCLE_FILE" ] && { cat "$STUB_LIFECYCLE_FILE"; exit 0; }; exit 22 ;;
      *) exit 22 ;;
    esac ;;
  http://127.0.0.1:*) echo "curl $args" >>"$STUB_LOG"; [ -n "${STUB_ENGINE_UP:-}" ] || exit 7; exit 0 ;;
esac
echo "curl $args" >>"$STUB_LOG"
case "$url" in
  *amazon-cloudwatch-agent.deb) printf 'stub deb' >"$out" ;;
  *) cp "$STUB_BINARY" "$out" ;;
esac
"""
# dpkg -i of the agent's package: installs a stub amazon-cloudwatch-agent-ctl that logs its arguments.
STUB_DPKG = r"""#!/bin/bash
echo "dpkg $*" >>"$STUB_LOG"
ctl="$MESHD_BOOTSTRAP_ROOT/opt/aws/amazon-cloudwatch-agent/bin/amazon-cloudwatch-agent-ctl"
mkdir -p "$(dirname "$ctl")"
printf '#!/bin/sh\necho "amazon-cloudwatch-agent-ctl $*" >>"$STUB_LOG"\n' >"$ctl"
chmod 0755 "$ctl"
"""
# systemctl with systemd's credential semantics (systemd.exec(5), "Credentials"): LoadCredential=ID:PATH copies PATH
# to $CREDENTIALS_DIRECTORY/ID (%d; /run/credentials/<unit>/) when the unit starts; the copy is dropped when it
# stops. A reload (ExecReload=, SIGHUP) copies nothing, and a unit without ExecReload= cannot be reloaded:
# `reload` fails, `reload-or-restart` restarts. The state of each unit lives in $MESHD_BOOTSTRAP_ROOT/run/stub-units.
STUB_SYSTEMCTL = f"""#!{sys.executable}
import json, os, shutil, sys
from pathlib import Path
sys.path.insert(0, {str(Path(__file__).resolve().parent)!r})
from deploylib import parse_unit

with open(os.environ["STUB_LOG"], "a") as log:
    log.write(" ".join(["systemctl", *sys.argv[1:]]) + "\\n")
root = os.environ["MESHD_BOOTSTRAP_ROOT"]
args = [a for a in sys.argv[1:] if not a.startswith("--")]
verb, units = args[0], args[1:]
if verb in ("daemon-reload", "enable"):
    sys.exit(0)
for unit in units:
    svc = parse_unit(Path(root, "etc/systemd/system", unit))["Service"]
    state_file = os.path.join(root, "run/stub-units", unit + ".json")
    os.makedirs(os.path.dirname(state_file), exist_ok=True)
    state = json.load(open(state_file)) if os.path.exists(state_file) else {{"active": False, "starts": 0, "sighups": 0}}
    creds = os.path.join(root, "run/credentials", unit)

    def stop():
        shutil.rmtree(creds, ignore_errors=True)
        state["active"] = False

    def start():
        if state["active"]:
            return
        os.makedirs(creds)
        for spec in svc.get("LoadCredential", []):
            cid, path = spec.split(":", 1)
            try:
                shutil.copyfile(os.path.join(root, path.lstrip("/")), os.path.join(creds, cid))
            except OSError as e:
                stop()
                sys.exit(f"{{unit}}: failed to set up credential {{cid}}: {{e}}")
        state["active"] = True
        state["starts"] += 1

    if verb == "start":
        start()
    elif verb == "restart" or (verb == "try-restart" and state["active"]):
        stop()
        start()
    elif verb in ("reload", "reload-or-restart"):
        if "ExecReload" in svc and state["active"]:
            state["sighups"] += 1  # meshd re-reads its files: the credential copies, unchanged
        elif verb == "reload-or-restart":
            stop()
            start()
        else:
            sys.exit(f"Failed to reload {{unit}}: Job type reload is not applicable for unit {{unit}}.")
    else:
        sys.exit(f"systemctl stub: unexpected verb {{verb}}")
    json.dump(state, open(state_file, "w"))
"""
STUB_FAIL = """#!/bin/bash
echo "$(basename "$0") must not be called: $*" >&2
exit 3
"""
FAKE_MESHD = """#!/bin/sh
echo "meshd $*" >>"$STUB_LOG"
"""


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def key_and_cert(directory, name):
    """A P-256 key (PKCS#8, as Terraform's private_key_pem_pkcs8) and a certificate for it, made by openssl."""
    key, cert = directory / f"{name}-key.pem", directory / f"{name}.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                    "-keyout", key, "-out", cert, "-days", "2", "-subj", f"/CN={name}"],
                   check=True, capture_output=True, timeout=60)
    return key.read_text(), cert.read_text()


class Box:
    def __init__(self, tmp_path, role):
        assert os.geteuid() == 0, "the bootstrap test runs as root (it installs files owned by root)"
        self.role = role
        self.root = tmp_path / "root"
        self.stubs = tmp_path / "stubs"
        self.log = tmp_path / "calls.log"
        self.binary = tmp_path / "meshd.src"
        self.model = tmp_path / "model.src"
        self.ssm = tmp_path / "ssm"
        self.pki = tmp_path / "pki"
        for d in (self.root / "etc/meshd/tls", self.stubs, self.ssm, self.pki):
            d.mkdir(parents=True)
        for name, body in (("aws", STUB_AWS), ("curl", STUB_CURL), ("systemctl", STUB_SYSTEMCTL),
                           ("dpkg", STUB_DPKG), ("snap", STUB_FAIL), ("logger", "#!/bin/sh\n")):
            p = self.stubs / name
            p.write_text(body)
            p.chmod(0o755)
        self.binary.write_text(FAKE_MESHD)
        self.model.write_bytes(b"GGUF" + os.urandom(4096))
        for worker, token in TOKENS.items():  # both exist in SSM; each role reads what it may (READS)
            self.set_param(f"{worker}_token", token)
        (self.root / "etc/meshd" / f"{role}.toml").write_bytes((REPO / "roles" / f"{role}.toml").read_bytes())
        # The repository's unit, where cloud-init writes it: the systemctl stub starts it with its credentials.
        self.unit = f"meshd-{role}.service"
        self.path("/etc/systemd/system").mkdir(parents=True)
        self.path(f"/etc/systemd/system/{self.unit}").write_bytes((SYSTEMD_DIR / self.unit).read_bytes())
        drain = "meshd-drain-watch.service"
        self.path(f"/etc/systemd/system/{drain}").write_bytes((SYSTEMD_DIR / drain).read_bytes())
        gateway = role == "gateway"
        if gateway:
            # What cloud-init writes from user data (the certificate) and Terraform puts into SSM (key, API keys).
            self.tls_key, self.tls_cert = key_and_cert(self.pki, "gateway")
            self.path("/etc/meshd/tls/gateway.pem").write_text(self.tls_cert)
            self.set_param("tls_key", self.tls_key)
            self.set_param("api_keys", API_KEYS)
            self.set_param("state_password", STATE_PASSWORD)
            self.set_param("metrics_key", METRICS_KEY)
        else:
            self.ca_cert = key_and_cert(self.pki, "mesh-ca")[1]
            self.path("/etc/meshd/tls/mesh-ca.pem").write_text(self.ca_cert)
        self.settings = {
            "MESHD_ROLE": role,
            "AWS_REGION": "us-east-1",
            "MESHD_TOKEN_PARAMETER": "" if gateway else PARAMS[f"{role}_token"],
            "MESHD_CALLER_TOKEN_PARAMETER": PARAMS["caller_token"] if gateway else "",
            "MESHD_INFER_TOKEN_PARAMETER": PARAMS["infer_token"] if gateway else "",
            "MESHD_API_KEYS_PARAMETER": PARAMS["api_keys"] if gateway else "",
            "MESHD_TLS_KEY_PARAMETER": PARAMS["tls_key"] if gateway else "",
            "MESHD_STATE_PASSWORD_PARAMETER": PARAMS["state_password"] if gateway else "",
            "MESHD_METRICS_KEY_PARAMETER": PARAMS["metrics_key"] if gateway else "",
            "MESHD_BINARY_S3_URI": "s3://bucket/meshd/x/meshd",
            "MESHD_BINARY_URL": "",
            "MESHD_BINARY_SHA256": sha(self.binary.read_bytes()),
            "MESHD_GATEWAY_URL": GATEWAY_URL,
            "MESHD_STATE_URL": STATE_URL if gateway else "",
            "MESHD_STATE_USERNAME": "meshd-gateway" if gateway else "",
            "MESHD_STATE_CLUSTER": "true" if gateway else "",
            "MESHD_STATE_WAIT_REPLICAS": "0" if gateway else "",
            "MESHD_LOG_GROUP": "/meshd/journal",
            "MESHD_METRICS_LOG_GROUP": "/meshd/metrics" if gateway else "",
            "MESHD_METRICS_NAMESPACE": "meshd/meshd" if gateway else "",
            "MESHD_MODEL_S3_URI": f"s3://bucket/models/{sha(self.model.read_bytes())}/model.gguf" if role == "infer" else "",
            "MESHD_MODEL_SHA256": sha(self.model.read_bytes()) if role == "infer" else "",
            "MESHD_INFER_GENERATOR": "llama.cpp" if role == "infer" else "",
            "MESHD_UPSTREAM_URL": "",
        }
        self.lifecycle = tmp_path / "lifecycle-state"
        self.extra_env = {}
        self.write_settings()

    def set_lifecycle(self, state):
        """What autoscaling/target-lifecycle-state answers (None: 404, no Auto Scaling group)."""
        if state is None:
            self.lifecycle.unlink(missing_ok=True)
        else:
            self.lifecycle.write_text(state)

    def set_param(self, which, value):
        """The value of SSM parameter PARAMS[which] (as SSM returns it: trailing newlines are not kept)."""
        (self.ssm / PARAMS[which].replace("/", "_")).write_text(value.rstrip("\n"))

    def write_settings(self):
        body = "".join(f"{k}='{v}'\n" for k, v in self.settings.items())
        (self.root / "etc/meshd/bootstrap.env").write_text(body)

    def run(self):
        self.log.write_text("")
        env = {
            "PATH": f"{self.stubs}:/usr/bin:/bin:/usr/sbin:/sbin",
            "MESHD_BOOTSTRAP_ROOT": str(self.root),
            "MESHD_BOOTSTRAP_RETRY_DELAY": "0",
            "STUB_LOG": str(self.log),
            "STUB_BINARY": str(self.binary),
            "STUB_MODEL": str(self.model),
            "STUB_SSM": str(self.ssm),
            "STUB_LOCAL_IP": GATEWAY_IP,
            "STUB_LIFECYCLE_FILE": str(self.lifecycle),
            **self.extra_env,
        }
        proc = subprocess.run(["bash", str(BOOTSTRAP)], env=env, capture_output=True, text=True, timeout=60)
        self.out = proc.stdout + proc.stderr
        self.calls = self.log.read_text().splitlines()
        return proc.returncode

    def path(self, rel):
        return self.root / rel.lstrip("/")

    def service_reads(self):
        """{reader: credential id}: every credential the running meshd reads, by what names it: an Environment=VAR=%d/<id>
        of the unit (reader VAR), or a path of the role's TOML in the unit's credentials directory
        /run/credentials/<unit>/<id> (reader: the TOML key, e.g. worker_token_files.caller)."""
        svc = parse_unit(self.path(f"/etc/systemd/system/{self.unit}"))["Service"]
        reads = {}
        for env in svc.get("Environment", []):
            var, _, value = env.partition("=")
            if value.startswith("%d/"):
                reads[var] = value[3:]
        prefix = f"/run/credentials/{self.unit}/"

        def walk(table, path):
            for k, v in table.items():
                if isinstance(v, dict):
                    walk(v, f"{path}{k}.")
                elif isinstance(v, str) and v.startswith(prefix):
                    reads[f"{path}{k}"] = v[len(prefix):]

        walk(tomllib.loads(self.path(f"/etc/meshd/{self.role}.toml").read_text()), "")
        return reads

    def service_files(self):
        """{reader: text} for every credential of service_reads(): the files the running meshd reads its secrets
        from, i.e. the credential copies systemd made when it last started the unit (None: not started)."""
        creds = self.path(f"/run/credentials/{self.unit}")
        return {reader: (creds / cid).read_text() if (creds / cid).exists() else None
                for reader, cid in self.service_reads().items()}

    def unit_state(self):
        import json

        f = self.path(f"/run/stub-units/{self.unit}.json")
        return json.loads(f.read_text()) if f.exists() else {"active": False, "starts": 0, "sighups": 0}


@pytest.fixture
def infer(tmp_path):
    return Box(tmp_path, "infer")


def test_first_boot_installs_everything(infer):
    assert infer.run() == 0, infer.out
    b = infer.path("/usr/local/bin/meshd")
    assert b.read_bytes() == infer.binary.read_bytes()
    assert stat.S_IMODE(b.stat().st_mode) == 0o755
    t = infer.path("/etc/meshd/worker-token")
    assert t.read_text() == TOKENS["infer"], "the infer token, exactly the value, no trailing newline"
    assert stat.S_IMODE(t.stat().st_mode) == 0o600 and t.stat().st_uid == 0
    assert infer.path("/etc/meshd/infer.env").read_text() == f"MESHD_GATEWAY_URL={GATEWAY_URL}\n"
    m = infer.path("/var/cache/meshd/models/model.gguf")
    assert m.read_bytes() == infer.model.read_bytes()
    assert not infer.path("/var/cache/meshd/models/model.gguf.part").exists()
    # Binary and model from the private bucket (S3 gateway endpoint); nothing from the internet but the agent.
    s3 = [c for c in infer.calls if c.startswith("aws s3 cp")]
    assert len(s3) == 2 and any(infer.settings["MESHD_MODEL_S3_URI"] in c for c in s3), s3
    assert [c for c in infer.calls if c.startswith("curl")] == [
        c for c in infer.calls if c.startswith("curl") and "amazon-cloudwatch-agent.deb" in c]
    # The drain watcher is enabled and started with the worker.
    assert "systemctl enable meshd-drain-watch.service" in infer.calls
    assert "systemctl --no-block start meshd-drain-watch.service" in infer.calls
    assert f"meshd config check {infer.root}/etc/meshd/infer.toml" in infer.calls
    assert "systemctl daemon-reload" in infer.calls
    assert "systemctl enable meshd-infer.service" in infer.calls
    assert "systemctl --no-block restart meshd-infer.service" in infer.calls
    # The token never reaches a command line.
    assert TOKENS["infer"] not in "\n".join(infer.calls) and TOKENS["infer"] not in infer.out
    # A worker reads its own role's token and nothing else from SSM, and gets no other role's token, no API keys and
    # no TLS key.
    assert [c for c in infer.calls if c.startswith("aws ssm")] == [
        f"aws ssm get-parameter --name {PARAMS['infer_token']} --with-decryption --query Parameter.Value --output text"]
    assert not infer.path("/etc/meshd/api-keys").exists() and not infer.path("/etc/meshd/tokens").exists()
    assert sorted(p.name for p in infer.path("/etc/meshd/tls").iterdir()) == ["mesh-ca.pem"]


def test_reboot_downloads_nothing_and_only_starts(infer):
    assert infer.run() == 0, infer.out
    assert infer.run() == 0, infer.out
    assert not any(c.startswith(("aws s3", "curl", "dpkg")) for c in infer.calls), infer.calls
    assert "model present, sha256 matches; not downloading" in infer.out
    assert "systemctl --no-block start meshd-infer.service" in infer.calls
    assert not any("restart" in c for c in infer.calls)


def test_token_rotation_rewrites_file_and_restarts(infer):
    assert infer.run() == 0, infer.out
    infer.set_param("infer_token", "second-token-abcdef")
    assert infer.run() == 0, infer.out
    assert infer.path("/etc/meshd/worker-token").read_text() == "second-token-abcdef"
    assert "systemctl --no-block restart meshd-infer.service" in infer.calls


def test_another_roles_token_rotation_does_not_restart_a_worker(infer):
    assert infer.run() == 0, infer.out
    infer.set_param("caller_token", "second-caller-token-abcdef")
    assert infer.run() == 0, infer.out
    assert infer.path("/etc/meshd/worker-token").read_text() == TOKENS["infer"]
    assert not any("restart" in c for c in infer.calls), infer.calls


def test_caller_gets_the_caller_token_only(tmp_path):
    box = Box(tmp_path, "caller")
    assert box.run() == 0, box.out
    t = box.path("/etc/meshd/worker-token")
    assert t.read_text() == TOKENS["caller"]
    assert stat.S_IMODE(t.stat().st_mode) == 0o600 and t.stat().st_uid == 0
    assert [c.split()[4] for c in box.calls if c.startswith("aws ssm")] == [PARAMS["caller_token"]]
    assert not box.path("/etc/meshd/tokens").exists()
    # What the running caller reads (MESHD_WORKER_TOKEN_FILE=%d/worker-token): the caller token.
    assert box.service_files() == {"MESHD_WORKER_TOKEN_FILE": TOKENS["caller"]}


def test_corrupted_model_is_downloaded_again(infer):
    assert infer.run() == 0, infer.out
    infer.path("/var/cache/meshd/models/model.gguf").write_bytes(b"truncated")
    assert infer.run() == 0, infer.out
    assert any(c.startswith("aws s3 cp") and "models/" in c for c in infer.calls)
    assert infer.path("/var/cache/meshd/models/model.gguf").read_bytes() == infer.model.read_bytes()
    assert "systemctl --no-block restart meshd-infer.service" in infer.calls


def test_model_with_wrong_sha_is_refused(infer):
    infer.settings["MESHD_MODEL_SHA256"] = "0" * 64
    infer.write_settings()
    assert infer.run() != 0
    assert "does not match sha256" in infer.out
    assert sum(c.startswith("aws s3 cp") and "models/" in c for c in infer.calls) == 6, "retried"
    assert not infer.path("/var/cache/meshd/models/model.gguf").exists()
    assert not infer.path("/var/cache/meshd/models/model.gguf.part").exists()
    assert not any(c.startswith("systemctl") for c in infer.calls), "no unit started without a model"


def test_binary_with_wrong_sha_is_refused(infer):
    infer.settings["MESHD_BINARY_SHA256"] = "f" * 64
    infer.write_settings()
    assert infer.run() != 0
    assert "does not match sha256" in infer.out and "refusing" in infer.out
    assert not infer.path("/usr/local/bin/meshd").exists()
    assert not list(infer.path("/usr/local/bin").glob(".meshd.*")), "temp file left behind"
    assert not any(c.startswith("systemctl") for c in infer.calls)


def test_binary_from_url(tmp_path):
    box = Box(tmp_path, "caller")
    box.settings["MESHD_BINARY_S3_URI"] = ""
    box.settings["MESHD_BINARY_URL"] = "https://example.invalid/releases/meshd"
    box.write_settings()
    assert box.run() == 0, box.out
    assert not any(c.startswith("aws s3") for c in box.calls)
    assert any(c.startswith("curl") and "releases/meshd" in c for c in box.calls)
    assert box.path("/usr/local/bin/meshd").read_bytes() == box.binary.read_bytes()
    assert box.path("/etc/meshd/caller.env").read_text() == f"MESHD_GATEWAY_URL={GATEWAY_URL}\n"
    assert not box.path("/var/cache/meshd").exists(), "only infer has a model cache"


def test_gateway_env_names_the_state_store_and_no_gateway_url_nor_model(tmp_path):
    box = Box(tmp_path, "gateway")
    assert box.run() == 0, box.out
    assert box.path("/etc/meshd/gateway.env").read_text() == (
        f"MESHD_STATE_URL={STATE_URL}\nMESHD_STATE_USERNAME=meshd-gateway\nMESHD_STATE_CLUSTER=true\n"
        "MESHD_STATE_WAIT_REPLICAS=0\n")
    assert not any(c.startswith("aws s3 cp") and "models/" in c for c in box.calls)
    assert not box.path("/var/cache/meshd").exists()
    assert "systemctl enable meshd-gateway.service" in box.calls
    # No drain watcher on a gateway (no Auto Scaling group, no spot), and no lifecycle question.
    assert not any("drain-watch" in c for c in box.calls)
    assert "imds autoscaling/target-lifecycle-state" not in box.calls


@pytest.fixture
def gateway(tmp_path):
    return Box(tmp_path, "gateway")


def test_gateway_first_boot_writes_role_tokens_api_keys_and_tls_key(gateway):
    assert gateway.run() == 0, gateway.out
    files = {
        "/etc/meshd/tokens/caller": TOKENS["caller"],
        "/etc/meshd/tokens/infer": TOKENS["infer"],
        "/etc/meshd/api-keys": API_KEYS + "\n",
        "/etc/meshd/tls/gateway-key.pem": gateway.tls_key,
        "/etc/meshd/state-password": STATE_PASSWORD,
        "/etc/meshd/metrics-key": METRICS_KEY,
    }
    for rel, want in files.items():
        f = gateway.path(rel)
        assert f.read_text() == want, rel
        assert stat.S_IMODE(f.stat().st_mode) == 0o600 and f.stat().st_uid == 0, rel
    assert gateway.tls_key.endswith("-----END PRIVATE KEY-----\n")
    # The certificate from user data is left alone (public, 0644 from cloud-init).
    assert gateway.path("/etc/meshd/tls/gateway.pem").read_text() == gateway.tls_cert
    assert stat.S_IMODE(gateway.path("/etc/meshd/tls").stat().st_mode) == 0o755
    # The tokens' directory is root's alone, and holds one token per worker role and nothing else; no single token
    # for every role.
    tokens = gateway.path("/etc/meshd/tokens")
    assert stat.S_IMODE(tokens.stat().st_mode) == 0o700 and tokens.stat().st_uid == 0
    assert sorted(p.name for p in tokens.iterdir()) == ["caller", "infer"]
    assert not gateway.path("/etc/meshd/worker-token").exists()
    assert "systemctl --no-block restart meshd-gateway.service" in gateway.calls
    # No secret reaches a command line or the log, and no temporary file is left behind.
    everything = "\n".join(gateway.calls) + gateway.out
    for secret in (*TOKENS.values(), API_KEYS, gateway.tls_key.splitlines()[1], STATE_PASSWORD, METRICS_KEY):
        assert secret not in everything
    for d in ("/etc/meshd", "/etc/meshd/tls", "/etc/meshd/tokens"):
        assert not [p.name for p in gateway.path(d).iterdir() if p.name.startswith(".")], d
    ssm = sorted(c.split()[4] for c in gateway.calls if c.startswith("aws ssm"))
    assert ssm == sorted(PARAMS[w] for w in READS["gateway"])
    # What the running gateway reads: each role's token through roles/gateway.toml's [worker_token_files], which names
    # the unit's credential copies; each holds that role's token.
    files = gateway.service_files()
    assert files["worker_token_files.caller"] == TOKENS["caller"]
    assert files["worker_token_files.infer"] == TOKENS["infer"]
    assert not any("WORKER_TOKEN" in reader for reader in files), files


def test_gateway_role_token_rotation_restarts_and_reaches_the_gateway(gateway):
    assert gateway.run() == 0, gateway.out
    gateway.set_param("infer_token", "second-infer-token-abcdef")
    assert gateway.run() == 0, gateway.out
    assert gateway.path("/etc/meshd/tokens/infer").read_text() == "second-infer-token-abcdef"
    assert gateway.path("/etc/meshd/tokens/caller").read_text() == TOKENS["caller"]
    assert "systemctl --no-block restart meshd-gateway.service" in gateway.calls
    assert "tokens/infer updated from SSM parameter /meshd/worker-token/infer" in gateway.out
    assert gateway.service_files()["worker_token_files.infer"] == "second-infer-token-abcdef"
    assert gateway.unit_state()["starts"] == 2


def test_gateway_removes_a_single_token_of_an_older_deployment(gateway):
    """/etc/meshd/worker-token on a gateway is the one token that granted every role; nothing reads it any more."""
    old = gateway.path("/etc/meshd/worker-token")
    old.write_text("old-shared-token")
    old.chmod(0o600)
    assert gateway.run() == 0, gateway.out
    assert not old.exists()
    assert "worker-token removed" in gateway.out


def test_gateway_tokens_directory_is_made_root_only(gateway):
    gateway.path("/etc/meshd/tokens").mkdir(mode=0o755)
    gateway.path("/etc/meshd/tokens").chmod(0o755)
    assert gateway.run() == 0, gateway.out
    assert stat.S_IMODE(gateway.path("/etc/meshd/tokens").stat().st_mode) == 0o700


def test_gateway_reboot_without_changes_only_starts(gateway):
    assert gateway.run() == 0, gateway.out
    assert gateway.run() == 0, gateway.out
    assert "systemctl --no-block start meshd-gateway.service" in gateway.calls
    assert not any("restart" in c for c in gateway.calls)


def test_api_key_rotation_rewrites_file_and_restarts(gateway):
    assert gateway.run() == 0, gateway.out
    rotated = "sha256:" + "b2" * 32 + "\nsha256:" + "c3" * 32
    gateway.set_param("api_keys", rotated)
    assert gateway.run() == 0, gateway.out
    assert gateway.path("/etc/meshd/api-keys").read_text() == rotated + "\n"
    # A restart, not a reload: only a start makes systemd copy the credentials again.
    assert "systemctl --no-block restart meshd-gateway.service" in gateway.calls
    assert not any("reload-or" in c or c.endswith(" reload meshd-gateway.service") for c in gateway.calls)
    assert "api-keys updated from SSM parameter /meshd/api-keys" in gateway.out


def test_revoked_api_key_is_gone_from_the_file_the_gateway_reads(gateway):
    """Issue 10: the gateway reads MESHD_API_KEYS_FILE=%d/api-keys, systemd's copy of /etc/meshd/api-keys made at
    start. After a revocation and the bootstrap run, that copy (not only /etc/meshd/api-keys) lacks the old key."""
    old, kept, new = ("sha256:" + c * 64 for c in "abc")
    gateway.set_param("api_keys", f"{old}\n{kept}")
    assert gateway.run() == 0, gateway.out
    assert gateway.service_files()["MESHD_API_KEYS_FILE"] == f"{old}\n{kept}\n"
    gateway.set_param("api_keys", f"{kept}\n{new}")
    assert gateway.run() == 0, gateway.out
    serving = gateway.service_files()["MESHD_API_KEYS_FILE"]
    assert serving == f"{kept}\n{new}\n", "the gateway still reads a stale copy of the API keys"
    assert old not in serving
    assert gateway.unit_state()["starts"] == 2


@pytest.mark.parametrize("bad", [
    "sha256:" + "a1" * 31,                           # 62 hex digits: meshd would refuse to start
    "sha256:" + "zz" * 32,
    "sha256:" + "b2" * 32 + "\nplain-api-key-in-ssm",  # a key, not a digest, in SSM
    "# every key revoked by accident",               # no key at all
], ids=["short-digest", "not-hex", "plain-key", "no-key"])
def test_api_keys_meshd_cannot_use_are_refused_and_the_keys_in_force_stay(gateway, bad):
    """A restart applies new keys, so keys the gateway would refuse at its start must never get there: the bootstrap
    refuses them, keeps the file (and the running gateway's copy) and restarts nothing."""
    assert gateway.run() == 0, gateway.out
    gateway.set_param("api_keys", "# rotated 2026-12\n\nsha256:" + "c3" * 32 + "  # ci\n")
    assert gateway.run() == 0, gateway.out  # comments and blank lines are fine
    good = gateway.path("/etc/meshd/api-keys").read_text()
    gateway.set_param("api_keys", bad)
    assert gateway.run() != 0
    assert "are not sha256:<hex> lines; refusing them" in gateway.out
    assert gateway.path("/etc/meshd/api-keys").read_text() == good
    assert gateway.service_files()["MESHD_API_KEYS_FILE"] == good
    assert not any(c.startswith("systemctl") for c in gateway.calls)
    assert sum(c.startswith(f"aws ssm get-parameter --name {PARAMS['api_keys']}") for c in gateway.calls) == 1, "not retried"
    assert not [p.name for p in gateway.path("/etc/meshd").iterdir() if p.name.startswith(".")]


ROTATIONS = {
    # What the unit's LoadCredential= sources are and how a new value gets there: the SSM parameter meshd-bootstrap
    # copies to it (per role: a worker's /etc/meshd/worker-token is its own role's token). A credential the bootstrap
    # does not write has no entry, and the test below fails on it.
    ("caller", "/etc/meshd/worker-token"): "caller_token",
    ("infer", "/etc/meshd/worker-token"): "infer_token",
    ("gateway", "/etc/meshd/tokens/caller"): "caller_token",
    ("gateway", "/etc/meshd/tokens/infer"): "infer_token",
    ("gateway", "/etc/meshd/api-keys"): "api_keys",
    ("gateway", "/etc/meshd/tls/gateway-key.pem"): "tls_key",
    ("gateway", "/etc/meshd/state-password"): "state_password",
}


@pytest.mark.parametrize("role", ["gateway", "caller", "infer"])
def test_every_rotated_secret_reaches_the_running_service(tmp_path, role):
    """For each LoadCredential= of the real unit: a new value in SSM, one bootstrap run, and the file meshd reads
    through its Environment=...=%d/<id> path or its TOML's /run/credentials/<unit>/<id> path holds the new value (all
    of them at once, as after a terraform apply that replaced every secret)."""
    box = Box(tmp_path, role)
    assert box.run() == 0, box.out
    svc = parse_unit(SYSTEMD_DIR / box.unit)["Service"]
    sources = dict(spec.split(":", 1) for spec in svc["LoadCredential"])
    assert {(role, p) for p in sources.values()} <= set(ROTATIONS), f"a credential meshd-bootstrap does not write: {sources}"
    new = {}
    for cid, path in sources.items():
        which = ROTATIONS[(role, path)]
        if which.endswith("_token") or which == "state_password":
            value = f"rotated-{which}-on-{role}-0123456789"
        elif which == "api_keys":
            value = "sha256:" + "d4" * 32
        else:
            # A new key comes with its certificate (a replaced gateway VM gets the certificate from user data).
            value, cert = key_and_cert(box.pki, "gateway-rotated")
            box.path("/etc/meshd/tls/gateway.pem").write_text(cert)
        box.set_param(which, value)
        new[cid] = value
    assert box.run() == 0, box.out
    assert f"systemctl --no-block restart {box.unit}" in box.calls
    # Every credential is read by meshd (an Environment=...=%d/<id> or a TOML path in the credentials directory), every
    # such path points at a credential, and each holds the rotated value: what SSM has (plus the final newline for the
    # line formats), byte for byte what meshd-bootstrap wrote to the source file.
    reads = box.service_reads()
    assert set(reads.values()) == set(sources), (reads, sources)
    served = box.service_files()
    for reader, cid in reads.items():
        on_disk = box.path(sources[cid]).read_text()
        assert served[reader] == on_disk, f"{reader} reads a stale copy of {sources[cid]}"
        assert served[reader].rstrip("\n") == new[cid].rstrip("\n"), reader


def test_tls_key_rotation_with_its_certificate_restarts(gateway):
    assert gateway.run() == 0, gateway.out
    # A new key and certificate (a replaced gateway VM gets both: the certificate from user data, the key from SSM).
    key, cert = key_and_cert(gateway.pki, "gateway-2")
    gateway.path("/etc/meshd/tls/gateway.pem").write_text(cert)
    gateway.set_param("tls_key", key)
    assert gateway.run() == 0, gateway.out
    assert gateway.path("/etc/meshd/tls/gateway-key.pem").read_text() == key
    assert "systemctl --no-block restart meshd-gateway.service" in gateway.calls


def test_tls_key_that_does_not_match_the_certificate_is_refused(gateway):
    assert gateway.run() == 0, gateway.out
    other_key, _ = key_and_cert(gateway.pki, "someone-else")
    gateway.set_param("tls_key", other_key)
    assert gateway.run() != 0
    assert "is not the key of" in gateway.out and "refusing it" in gateway.out
    # The key that matches stays in place, and the unit is not restarted onto a broken pair.
    assert gateway.path("/etc/meshd/tls/gateway-key.pem").read_text() == gateway.tls_key
    assert not any(c.startswith("systemctl") for c in gateway.calls)
    assert sum(c.startswith(f"aws ssm get-parameter --name {PARAMS['tls_key']}") for c in gateway.calls) == 1, "not retried"
    assert not [p.name for p in gateway.path("/etc/meshd/tls").iterdir() if p.name.startswith(".")]


def test_gateway_without_its_certificate_fails_loudly(gateway):
    gateway.path("/etc/meshd/tls/gateway.pem").unlink()
    assert gateway.run() != 0
    assert "gateway.pem is missing" in gateway.out
    assert not any(c.startswith("systemctl") for c in gateway.calls)


def test_gateway_secret_parameters_are_required(gateway):
    gateway.settings["MESHD_TLS_KEY_PARAMETER"] = ""
    gateway.write_settings()
    assert gateway.run() != 0
    assert "MESHD_TLS_KEY_PARAMETER" in gateway.out


def test_missing_api_keys_parameter_is_retried_then_fatal(gateway):
    (gateway.ssm / PARAMS["api_keys"].replace("/", "_")).unlink()
    assert gateway.run() != 0
    assert "could not read the API keys" in gateway.out
    assert sum(c.startswith(f"aws ssm get-parameter --name {PARAMS['api_keys']}") for c in gateway.calls) == 8
    assert not any(c.startswith("systemctl") for c in gateway.calls)


def test_worker_without_the_ca_fails_loudly(tmp_path):
    box = Box(tmp_path, "caller")
    box.path("/etc/meshd/tls/mesh-ca.pem").unlink()
    assert box.run() != 0
    assert "mesh-ca.pem is missing" in box.out
    assert not any(c.startswith("systemctl") for c in box.calls)


def test_worker_refuses_a_plain_ws_gateway_url(tmp_path):
    box = Box(tmp_path, "caller")
    box.settings["MESHD_GATEWAY_URL"] = "ws://10.20.1.10:49134"
    box.write_settings()
    assert box.run() != 0
    assert "is not wss://" in box.out
    assert not any(c.startswith("systemctl") for c in box.calls)
    assert not box.path("/etc/meshd/caller.env").exists()
    assert not [p.name for p in box.path("/etc/meshd").iterdir() if p.name.startswith(".")], "temp file left behind"


def test_missing_settings_fail_loudly(tmp_path):
    box = Box(tmp_path, "caller")
    del box.settings["MESHD_TOKEN_PARAMETER"]
    box.write_settings()
    assert box.run() != 0
    assert "MESHD_TOKEN_PARAMETER" in box.out
    assert not box.calls, "nothing downloaded or started before the settings are checked"


@pytest.mark.parametrize("setting", ["MESHD_CALLER_TOKEN_PARAMETER", "MESHD_INFER_TOKEN_PARAMETER"])
def test_gateway_needs_every_role_token_parameter(gateway, setting):
    gateway.settings[setting] = ""
    gateway.write_settings()
    assert gateway.run() != 0
    assert setting in gateway.out
    assert not gateway.calls


def test_missing_role_token_parameter_is_retried_then_fatal(gateway):
    (gateway.ssm / PARAMS["infer_token"].replace("/", "_")).unlink()
    assert gateway.run() != 0
    assert "could not read the infer token" in gateway.out
    assert sum(c.startswith(f"aws ssm get-parameter --name {PARAMS['infer_token']}") for c in gateway.calls) == 8
    assert not any(c.startswith("systemctl") for c in gateway.calls)


# ---- the fleet: state store, CloudWatch agent, warm pool, GPU nodes ---------------------------------------------------


def test_gateway_refuses_a_state_store_without_tls(gateway):
    gateway.settings["MESHD_STATE_URL"] = "redis://clustercfg.example:6379/0"
    gateway.write_settings()
    assert gateway.run() != 0
    assert "is not rediss://" in gateway.out
    assert not any(c.startswith("systemctl") for c in gateway.calls)


@pytest.mark.parametrize("setting", ["MESHD_STATE_URL", "MESHD_STATE_PASSWORD_PARAMETER", "MESHD_METRICS_KEY_PARAMETER"])
def test_gateway_needs_the_state_store_and_metrics_settings(gateway, setting):
    gateway.settings[setting] = ""
    gateway.write_settings()
    assert gateway.run() != 0
    assert setting in gateway.out
    assert not gateway.calls


def test_a_new_metrics_key_does_not_restart_the_gateway(gateway):
    """The metrics key is the CloudWatch agent's (the gateway knows its digest from the api-keys file): a new one is
    written and the agent reconfigured, meshd keeps running."""
    assert gateway.run() == 0, gateway.out
    gateway.set_param("metrics_key", "second-metrics-key-abcdef")
    assert gateway.run() == 0, gateway.out
    assert gateway.path("/etc/meshd/metrics-key").read_text() == "second-metrics-key-abcdef"
    assert not any("restart meshd-gateway" in c for c in gateway.calls), gateway.calls
    assert any(c.startswith("amazon-cloudwatch-agent-ctl -a fetch-config") for c in gateway.calls)


def agent_config(box):
    import json

    return json.loads(box.path("/opt/aws/amazon-cloudwatch-agent/etc/meshd-agent.json").read_text())


def test_gateway_agent_ships_the_journal_and_scrapes_its_own_metrics(gateway):
    import yaml

    assert gateway.run() == 0, gateway.out
    assert [c.split()[0] for c in gateway.calls if c.startswith(("curl", "dpkg"))] == ["curl", "dpkg"], "installed once"
    cfg = agent_config(gateway)
    files = cfg["logs"]["logs_collected"]["files"]["collect_list"]
    assert files == [{"file_path": "/var/log/syslog", "log_group_name": "/meshd/journal",
                      "log_stream_name": "{instance_id}", "retention_in_days": -1}]
    prom = cfg["logs"]["metrics_collected"]["prometheus"]
    assert prom["log_group_name"] == "/meshd/metrics"
    emf = prom["emf_processor"]
    assert emf["metric_namespace"] == "meshd/meshd"
    inflight = next(d for d in emf["metric_declaration"] if "^meshd_function_inflight$" in d["metric_selectors"])
    assert ["gateway", "function"] in inflight["dimensions"], "the series the scaling policy names"
    fivexx = next(d for d in emf["metric_declaration"] if "^meshd_http_requests_total$" in d["metric_selectors"])
    assert fivexx["dimensions"] == [["status_class"]] and fivexx["label_matcher"] == "^meshd;5xx$"
    scrape = yaml.safe_load(gateway.path("/opt/aws/amazon-cloudwatch-agent/etc/meshd-prometheus.yaml").read_text())
    assert prom["prometheus_config_path"] == "/opt/aws/amazon-cloudwatch-agent/etc/meshd-prometheus.yaml"
    job = scrape["scrape_configs"][0]
    assert job["job_name"] == "meshd" and job["scheme"] == "https" and job["metrics_path"] == "/metrics"
    assert job["static_configs"] == [{"targets": ["127.0.0.1:3111"], "labels": {"gateway": GATEWAY_IP}}]
    assert job["authorization"] == {"type": "Bearer", "credentials_file": "/etc/meshd/metrics-key"}
    relabel = job["metric_relabel_configs"][0]
    assert relabel["replacement"] == "${1}xx" and relabel["target_label"] == "status_class"
    assert "imds local-ipv4" in gateway.calls
    assert "amazon-cloudwatch-agent-ctl -a fetch-config -m ec2 -s -c file:/opt/aws/amazon-cloudwatch-agent/etc/meshd-agent.json" in gateway.calls
    # A reboot does not reinstall it.
    assert gateway.run() == 0, gateway.out
    assert not any(c.startswith(("curl", "dpkg")) for c in gateway.calls)


def test_worker_agent_ships_the_journal_only(infer):
    assert infer.run() == 0, infer.out
    cfg = agent_config(infer)
    assert "metrics_collected" not in cfg["logs"]
    assert cfg["logs"]["logs_collected"]["files"]["collect_list"][0]["log_group_name"] == "/meshd/journal"
    assert not infer.path("/opt/aws/amazon-cloudwatch-agent/etc/meshd-prometheus.yaml").exists()
    assert "imds local-ipv4" not in infer.calls


def test_a_worker_launched_into_the_warm_pool_is_prepared_but_not_started(infer):
    infer.set_lifecycle("Warmed:Stopped")
    assert infer.run() == 0, infer.out
    assert infer.path("/var/cache/meshd/models/model.gguf").read_bytes() == infer.model.read_bytes(), "model on disk"
    assert infer.path("/usr/local/bin/meshd").exists() and infer.path("/etc/meshd/worker-token").exists()
    assert "systemctl enable meshd-infer.service" in infer.calls
    assert not any(("start" in c) and c.startswith("systemctl") for c in infer.calls), infer.calls
    assert infer.unit_state()["starts"] == 0
    assert "launched into the warm pool (Warmed:Stopped)" in infer.out
    # Taken into service: the next boot starts it, and fetches nothing.
    infer.set_lifecycle("InService")
    assert infer.run() == 0, infer.out
    assert not any(c.startswith("aws s3") for c in infer.calls)
    assert infer.unit_state()["active"] is True
    assert "systemctl --no-block start meshd-drain-watch.service" in infer.calls


def test_gpu_node_fetches_no_model_and_waits_for_its_engine(tmp_path):
    box = Box(tmp_path, "infer")
    box.settings.update({"MESHD_INFER_GENERATOR": "openai", "MESHD_UPSTREAM_URL": "http://127.0.0.1:8000",
                         "MESHD_MODEL_S3_URI": "", "MESHD_MODEL_SHA256": ""})
    box.write_settings()
    # The engine is not up: the bootstrap waits for it (retried), then gives up without starting meshd.
    assert box.run() != 0
    assert "does not answer GET /v1/models" in box.out
    assert sum(c.startswith("curl") and "127.0.0.1:8000/v1/models" in c for c in box.calls) == 30
    assert box.unit_state()["starts"] == 0
    box.extra_env = {"STUB_ENGINE_UP": "1"}
    assert box.run() == 0, box.out
    assert box.path("/etc/meshd/infer.env").read_text() == (
        f"MESHD_GATEWAY_URL={GATEWAY_URL}\nMESHD_GENERATOR=openai\nMESHD_UPSTREAM_URL=http://127.0.0.1:8000\n")
    assert not box.path("/var/cache/meshd/models").exists()
    assert not any(c.startswith("aws s3 cp") and "models/" in c for c in box.calls + [])
    assert box.unit_state()["active"] is True


def test_gpu_node_refuses_an_engine_elsewhere(tmp_path):
    box = Box(tmp_path, "infer")
    box.settings.update({"MESHD_INFER_GENERATOR": "openai", "MESHD_UPSTREAM_URL": "http://10.0.0.5:8000"})
    box.write_settings()
    assert box.run() != 0
    assert "is not an engine on this VM" in box.out
