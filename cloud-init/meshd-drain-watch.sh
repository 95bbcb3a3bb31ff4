#!/bin/bash
# meshd-drain-watch: drains this VM's worker before the VM goes away. Run by meshd-drain-watch.service on the workers
# (caller, infer); reads MESHD_ROLE from /etc/meshd/bootstrap.env (the unit's EnvironmentFile=).
#
# Every MESHD_DRAIN_POLL_SECS (5 s) it asks the instance metadata service (IMDSv2: a session token first, then GETs
# that carry it) two things:
#   spot/instance-action                   200 with {"action": "terminate"|"stop"|"hibernate", "time": ...}: EC2
#                                          reclaims this spot instance in about two minutes.
#   autoscaling/target-lifecycle-state     where the Auto Scaling group is taking this instance: InService, or
#                                          Terminated (scale-in, instance refresh, a replaced unhealthy instance: the
#                                          group's termination lifecycle hook holds it in Terminating:Wait meanwhile),
#                                          Detached, Standby, Warmed:* (back to the warm pool).
# On either sign it drains: `systemctl stop meshd-<role>.service`, i.e. SIGTERM, on which meshd tells its gateways it
# is leaving (they route nothing new to it), finishes what it holds within drain_timeout_secs and exits; systemd waits
# TimeoutStopSec. Once. If the group later takes the instance back into service (Standby -> InService, a warm-pool
# instance reused) without a spot notice, it starts the unit again.
# Nothing here needs AWS credentials: the hook is not completed by API, it times out with CONTINUE (workers.tf).
set -uo pipefail

IMDS=${MESHD_IMDS_URL:-http://169.254.169.254}
POLL=${MESHD_DRAIN_POLL_SECS:-5}
: "${MESHD_ROLE:?MESHD_ROLE is not set (EnvironmentFile=/etc/meshd/bootstrap.env)}"
UNIT=${MESHD_DRAIN_UNIT:-meshd-$MESHD_ROLE.service}

log() { echo "meshd-drain-watch[$UNIT]: $*"; }

TOKEN=
TOKEN_AT=0
# token: a session token, renewed every 5 minutes (it lives 6 hours).
token() {
  local now
  now=$(date +%s)
  if [ -z "$TOKEN" ] || [ $((now - TOKEN_AT)) -ge 300 ]; then
    TOKEN=$(curl -fsS --max-time 2 -X PUT -H "X-aws-ec2-metadata-token-ttl-seconds: 21600" "$IMDS/latest/api/token") || {
      TOKEN=
      return 1
    }
    TOKEN_AT=$now
  fi
}

# meta PATH: the body of a metadata GET with the session token (exit 1 on 404 or any failure). Runs in a command
# substitution, so the token is renewed by the loop (token), not here.
meta() {
  [ -n "$TOKEN" ] || return 1
  curl -fsS --max-time 2 -H "X-aws-ec2-metadata-token: $TOKEN" "$IMDS/latest/meta-data/$1"
}

DRAINED=
drain() {
  [ -n "$DRAINED" ] && return 0
  DRAINED=$1
  log "draining: $1; systemctl stop $UNIT (SIGTERM: meshd leaves its gateways, finishes in-flight work, exits)"
  systemctl stop "$UNIT" || log "systemctl stop $UNIT failed"
  log "drained ($1)"
}

log "watching spot/instance-action and autoscaling/target-lifecycle-state every ${POLL}s"
while true; do
  token || log "no session token from the metadata service"
  if notice=$(meta spot/instance-action) && [ -n "$notice" ]; then
    drain "spot interruption notice $notice"
  fi
  if state=$(meta autoscaling/target-lifecycle-state); then
    case "$state" in
      Terminated | Detached | Standby | Warmed:*) drain "target lifecycle state $state" ;;
      InService)
        case "$DRAINED" in
          "" | spot*) ;;
          *)
            log "back in service (was: $DRAINED); systemctl start $UNIT"
            DRAINED=
            systemctl start "$UNIT" || log "systemctl start $UNIT failed"
            ;;
        esac
        ;;
    esac
  fi
  sleep "$POLL"
done
