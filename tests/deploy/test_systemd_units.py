"""systemd/meshd-<role>.service: `systemd-analyze verify` clean (no warning at all) in a scratch root that has the
distribution's units and a stand-in /usr/local/bin/meshd, `systemd-analyze security --offline=true` <= 2.0, and
the settings the binary and cloud-init rely on: the sd_notify contract (Type=notify, NotifyAccess=main, WatchdogSec=,
TimeoutStartSec=), stop timeouts longer than the drain, and no reload that would re-read stale credentials."""
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

from deploylib import REPO, ROLES, SYSTEMD_DIR, parse_unit

MAX_EXPOSURE = 2.0

HARDENING = {
    "NoNewPrivileges": "yes",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "PrivateDevices": "yes",
    "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes",
    "ProtectKernelLogs": "yes",
    "ProtectControlGroups": "yes",
    "ProtectClock": "yes",
    "ProtectHostname": "yes",
    "ProtectProc": "invisible",
    "ProcSubset": "pid",
    "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
    "RestrictNamespaces": "yes",
    "RestrictRealtime": "yes",
    "RestrictSUIDSGID": "yes",
    "LockPersonality": "yes",
    "SystemCallArchitectures": "native",
    "CapabilityBoundingSet": "",
    "AmbientCapabilities": "",
    "MemoryDenyWriteExecute": "yes",
    "UMask": "0077",
    "DynamicUser": "yes",
    "Restart": "on-failure",
    "TimeoutStopSec": "30",
    "Type": "notify",
    "NotifyAccess": "main",
}


# The sd_notify contract with the binary (src/liveness.rs): READY=1 when really ready, WATCHDOG=1 every
# $WATCHDOG_USEC/2. The watchdog runs from READY=1 on (systemd.service(5): "activated when the start-up is
# completed"), so TimeoutStartSec= alone bounds everything before it: binding (gateway), waiting for the gateway
# (workers), loading the model (infer; the file is on disk already, meshd-bootstrap fetches it before the start).
NOTIFY = {
    #          WatchdogSec  TimeoutStartSec (seconds)
    "gateway": (30, 60),
    "caller": (30, 5 * 60),
    "infer": (60, 10 * 60),
}
# The binary's heartbeat period (liveness::Heartbeat) and engine stall limit (engine_stall_secs), both defaults.
HEARTBEAT_SECS = 1
ENGINE_STALL_SECS = 15


def seconds(span: str) -> float:
    """A systemd time span ("30", "30s", "5min", "1min 30s", "500ms") in seconds."""
    units = {"us": 1e-6, "ms": 1e-3, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "hr": 3600}
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", span.strip())
    assert parts and re.fullmatch(r"(\s*\d+(?:\.\d+)?\s*[a-z]*)+\s*", span), f"not a time span: {span!r}"
    return sum(float(n) * units[u or "s"] for n, u in parts)


def systemd_analyze():
    exe = shutil.which("systemd-analyze")
    assert exe, "systemd-analyze is not installed (scripts/deploy-checks installs the systemd package)"
    return exe


def unit_path(role) -> Path:
    return SYSTEMD_DIR / f"meshd-{role}.service"


DRAIN_UNIT = SYSTEMD_DIR / "meshd-drain-watch.service"
ALL_UNITS = [*(f"meshd-{r}.service" for r in ROLES), DRAIN_UNIT.name]


def test_one_unit_per_role_and_the_drain_watcher():
    assert sorted(p.name for p in SYSTEMD_DIR.glob("*.service")) == sorted(ALL_UNITS)


@pytest.mark.parametrize("role", ROLES)
def test_unit_settings(role):
    svc = parse_unit(unit_path(role))["Service"]
    one = {k: v[-1] for k, v in svc.items()}
    assert svc["ExecStart"] == [f"/usr/local/bin/meshd {role} --config /etc/meshd/{role}.toml"]
    assert svc["EnvironmentFile"] == [f"-/etc/meshd/{role}.env"]
    for key, want in HARDENING.items():
        assert one.get(key) == want, f"{key}={one.get(key)!r}, want {want!r}"
    assert svc["SystemCallFilter"] == ["@system-service", "~@privileged @resources"]
    # Secrets arrive as credentials; the files on disk stay root-only. A worker gets its own role's token only; the
    # gateway gets one token per worker role (never the single token that grants every role), the API keys and its
    # TLS key.
    cfg = tomllib.loads((REPO / "roles" / f"{role}.toml").read_text())
    if role == "gateway":
        creds = ["caller-token:/etc/meshd/tokens/caller", "infer-token:/etc/meshd/tokens/infer",
                 "api-keys:/etc/meshd/api-keys", "tls-key:/etc/meshd/tls/gateway-key.pem",
                 "state-password:/etc/meshd/state-password"]
        env = ["MESHD_API_KEYS_FILE=%d/api-keys", "MESHD_TLS_KEY=%d/tls-key", "MESHD_MESH_TLS_KEY=%d/tls-key",
               "MESHD_STATE_PASSWORD_FILE=%d/state-password"]
    else:
        creds = ["worker-token:/etc/meshd/worker-token"]
        env = ["MESHD_WORKER_TOKEN_FILE=%d/worker-token"]
    assert svc["LoadCredential"] == creds
    assert [e for e in svc["Environment"] if "%d" in e] == env
    # Every credential is a file the role's TOML names: the Environment= line overrides it with the copy in %d, or
    # (the gateway's tokens) the TOML names the copy in %d itself.
    by_id = dict(c.split(":", 1) for c in creds)
    if role == "gateway":
        assert cfg["api_keys_file"] == by_id["api-keys"]
        assert cfg["tls_key"] == cfg["mesh_tls_key"] == by_id["tls-key"]
        assert by_id["state-password"] == "/etc/meshd/state-password"
        assert cfg["worker_token_files"] == {r: f"/run/credentials/{unit_path(role).name}/{r}-token"
                                             for r in ("caller", "infer")}
        assert {f"{r}-token": f"/etc/meshd/tokens/{r}" for r in ("caller", "infer")}.items() <= by_id.items()
        for key in ("worker_token", "worker_token_file", "worker_tokens"):
            assert key not in cfg, f"roles/gateway.toml: {key} on a gateway is the dev token that grants every role"
        assert not any(e.startswith("MESHD_WORKER_TOKEN") for e in svc["Environment"]), svc["Environment"]
    else:
        assert cfg["worker_token_file"] == by_id["worker-token"]
        assert "worker_token_files" not in cfg and "worker_tokens" not in cfg
    # Nothing turns the security settings off.
    for e in svc.get("Environment", []):
        assert not re.match(r"MESHD_(ALLOW_PLAINTEXT|INSECURE_NO_AUTH|API_KEYS|WORKER_TOKEN)=", e), e
    assert "--allow-plaintext" not in svc["ExecStart"][0] and "--insecure-no-auth" not in svc["ExecStart"][0]
    # systemd waits longer than the binary drains.
    assert seconds(one["TimeoutStopSec"]) > cfg["drain_timeout_secs"]
    assert parse_unit(unit_path(role))["Install"]["WantedBy"] == ["multi-user.target"]


@pytest.mark.parametrize("role", ROLES)
def test_sd_notify_contract(role):
    """Type=notify: the unit is active only once the binary sends READY=1 (a caller or infer that never joins the
    mesh never counts as started); the watchdog restarts a process that stops sending WATCHDOG=1."""
    svc = parse_unit(unit_path(role))["Service"]
    one = {k: v[-1] for k, v in svc.items()}
    for key in ("Type", "NotifyAccess", "WatchdogSec", "TimeoutStartSec", "Restart"):
        assert len(svc.get(key, [])) == 1, f"{key}= must be set exactly once, got {svc.get(key)}"
    assert one["Type"] == "notify"
    # Only the main process may notify: nothing it spawns can fake READY=1 or feed the watchdog.
    assert one["NotifyAccess"] == "main"
    watchdog, start = NOTIFY[role]
    assert seconds(one["WatchdogSec"]) == watchdog
    assert seconds(one["TimeoutStartSec"]) == start
    # The binary feeds every WatchdogSec/2 from a loop that beats every heartbeat: a few missed beats are not fatal.
    assert seconds(one["WatchdogSec"]) >= 10 * HEARTBEAT_SECS
    # A watchdog timeout (and a start timeout) is a failure that Restart=on-failure restarts; nothing turns that off.
    assert one["Restart"] == "on-failure"
    for key in ("WatchdogSignal", "RestartPreventExitStatus", "TimeoutStartFailureMode", "StartLimitAction"):
        assert key not in svc, f"{key}= changes what a watchdog or start timeout does"
    # The stop still waits for the drain; a start may wait longer than a stop (model load, the gateway's boot).
    cfg = tomllib.loads((REPO / "roles" / f"{role}.toml").read_text())
    assert seconds(one["TimeoutStopSec"]) > cfg["drain_timeout_secs"]
    assert seconds(one["TimeoutStartSec"]) > seconds(one["TimeoutStopSec"])


def test_infer_watchdog_outlasts_a_stall():
    """infer feeds the watchdog only while its engine makes progress; a stall (engine_stall_secs without a decode
    step while holding work) takes it out of routing at once, and WatchdogSec gives the engine time to recover
    before systemd restarts the worker (which costs a model load)."""
    svc = parse_unit(unit_path("infer"))["Service"]
    cfg = tomllib.loads((REPO / "roles" / "infer.toml").read_text())
    stall = cfg.get("engine_stall_secs", ENGINE_STALL_SECS)
    assert seconds(svc["WatchdogSec"][-1]) >= 2 * stall
    assert seconds(svc["TimeoutStartSec"][-1]) >= 5 * 60, "a model load on a small VM, plus the wait for the gateway"


@pytest.mark.parametrize("role", ROLES)
def test_no_reload_of_stale_credentials(role):
    """systemd copies LoadCredential= files into %d when the unit starts, never on a reload: a unit that hands
    secrets over as credentials must not offer a reload (meshd would re-read the stale copies, so a revoked API key
    or a replaced TLS key would stay in force). New secrets take effect by a restart (meshd-bootstrap)."""
    svc = parse_unit(unit_path(role))["Service"]
    assert svc.get("LoadCredential"), "every unit gets its secrets as credentials"
    assert "ExecReload" not in svc, svc.get("ExecReload")
    assert svc["Type"][-1] != "notify-reload", "Type=notify-reload is a reload too (SIGHUP)"


def test_gateway_state_directory_is_its_data_dir():
    svc = parse_unit(unit_path("gateway"))["Service"]
    cfg = tomllib.loads((REPO / "roles" / "gateway.toml").read_text())
    assert svc["StateDirectory"] == ["meshd"]
    assert cfg["data_dir"] == "/var/lib/meshd"
    assert "MESHD_DATA_DIR=/var/lib/meshd" in svc["Environment"]


def test_infer_model_lives_in_its_cache_directory():
    svc = parse_unit(unit_path("infer"))["Service"]
    cfg = tomllib.loads((REPO / "roles" / "infer.toml").read_text())
    assert svc["CacheDirectory"] == ["meshd"]
    assert cfg["model"] == "/var/cache/meshd/models/model.gguf"
    assert f"MESHD_MODEL={cfg['model']}" in svc["Environment"]


@pytest.mark.parametrize("role", ["caller", "infer"])
def test_workers_ip_allow_list(role):
    svc = parse_unit(unit_path(role))["Service"]
    assert svc["IPAddressDeny"] == ["any"]
    allowed = " ".join(svc["IPAddressAllow"]).split()
    assert "localhost" in allowed and "10.0.0.0/8" in allowed
    assert "0.0.0.0/0" not in allowed and "any" not in allowed


@pytest.fixture(scope="module")
def fake_root(tmp_path_factory):
    """A root with the distribution's unit files (for sysinit.target & co) and executables at the units' paths."""
    root = tmp_path_factory.mktemp("sysroot")
    src = next((p for p in (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system")) if p.is_dir()), None)
    assert src, "no /usr/lib/systemd/system: install the systemd package"
    shutil.copytree(src, root / "usr/lib/systemd/system", symlinks=True)
    (root / "etc/systemd/system").mkdir(parents=True)
    for path in ("usr/local/bin/meshd", "usr/local/sbin/meshd-drain-watch"):  # ExecStart's executables
        exe = root / path
        exe.parent.mkdir(parents=True, exist_ok=True)
        exe.write_text("#!/bin/sh\nexit 0\n")
        exe.chmod(0o755)
    return root


@pytest.mark.parametrize("name", ALL_UNITS)
def test_systemd_analyze_verify_clean(name, fake_root):
    shutil.copy(SYSTEMD_DIR / name, fake_root / "etc/systemd/system" / name)
    proc = subprocess.run(
        [systemd_analyze(), "verify", "--man=no", f"--root={fake_root}", f"/etc/systemd/system/{name}"],
        capture_output=True, text=True, timeout=60,
    )
    out = (proc.stdout + proc.stderr).strip()
    assert proc.returncode == 0, out
    assert out == "", f"systemd-analyze verify printed warnings:\n{out}"


def test_verify_catches_a_missing_binary(tmp_path, fake_root):
    """The check above is meaningful: without the stand-in binary verify fails."""
    root = tmp_path / "root"
    shutil.copytree(fake_root / "usr/lib/systemd/system", root / "usr/lib/systemd/system", symlinks=True)
    (root / "etc/systemd/system").mkdir(parents=True)
    shutil.copy(unit_path("caller"), root / "etc/systemd/system/meshd-caller.service")
    proc = subprocess.run([systemd_analyze(), "verify", "--man=no", f"--root={root}", "/etc/systemd/system/meshd-caller.service"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "meshd" in proc.stdout + proc.stderr


@pytest.mark.parametrize("name", ALL_UNITS)
def test_security_exposure_at_most_2(name):
    proc = subprocess.run([systemd_analyze(), "security", "--offline=true", "--no-pager", str(SYSTEMD_DIR / name)],
                          capture_output=True, text=True, timeout=60)
    out = proc.stdout + proc.stderr
    m = re.search(r"Overall exposure level for %s:\s*([0-9.]+)" % re.escape(name), out)
    assert m, out
    score = float(m.group(1))
    print(f"{name} exposure {score}")
    assert score <= MAX_EXPOSURE, out


@pytest.mark.parametrize("role", ["caller", "infer"])
def test_a_worker_that_keeps_failing_powers_its_vm_off(role):
    """Restart=on-failure restarts a crashed or stalled worker on the same VM; five failed starts in ten minutes
    power the VM off, and the Auto Scaling group's EC2 health check replaces the stopped instance."""
    unit = parse_unit(unit_path(role))["Unit"]
    assert unit["StartLimitAction"] == ["poweroff"]
    assert unit["StartLimitBurst"] == ["5"] and seconds(unit["StartLimitIntervalSec"][0]) == 600
    # The gateways are no Auto Scaling group's: nobody would replace a powered-off gateway.
    assert "StartLimitAction" not in parse_unit(unit_path("gateway"))["Unit"]


def test_drain_watcher_unit():
    """The watcher that drains a worker on a spot notice or a scale-in: root only for `systemctl stop` over systemd's
    private socket, no capability, the metadata service its only peer."""
    svc = parse_unit(DRAIN_UNIT)["Service"]
    one = {k: v[-1] for k, v in svc.items()}
    assert svc["ExecStart"] == ["/usr/local/sbin/meshd-drain-watch"]
    assert svc["EnvironmentFile"] == ["/etc/meshd/bootstrap.env"], "MESHD_ROLE names the unit to drain"
    assert one["CapabilityBoundingSet"] == "" and one["NoNewPrivileges"] == "yes"
    assert svc["IPAddressDeny"] == ["any"] and svc["IPAddressAllow"] == ["169.254.169.254/32"]
    assert one["Restart"] == "always"
    assert "PrivateUsers" not in svc, "remapped root could not talk to systemd"
    assert parse_unit(DRAIN_UNIT)["Install"]["WantedBy"] == ["multi-user.target"]
