"""The units' sd_notify contract, with the real binary: each role started the way its unit starts it (ExecStart=,
Environment= with %d resolved to a credentials directory filled from LoadCredential=, EnvironmentFile=, the role's
TOML, whose /run/credentials/<unit>/ paths are that same directory), with what systemd adds for Type=notify and WatchdogSec= ($NOTIFY_SOCKET, $WATCHDOG_USEC, $WATCHDOG_PID).
A datagram socket stands in for systemd and records what arrives.

- READY=1 only when really ready: a worker with no gateway to join never sends it; it does once the gateway is up.
- READY=1 within the unit's TimeoutStartSec, STATUS= lines, WATCHDOG=1 within WatchdogSec of READY=1, and no
  WATCHDOG=1 before READY=1 (systemd would arm the watchdog during the start).
- SIGTERM: STOPPING=1 and a clean exit within TimeoutStopSec.

Each role has its own scratch root (its VM) with the files meshd-bootstrap writes there: the gateway one token per
worker role (/etc/meshd/tokens/<role>), each worker its own role's token (/etc/meshd/worker-token), so a worker
becomes ready only if the gateway grants its token what the role registers.

Differences from a VM, all outside the contract: paths live under the scratch roots, the gateway binds 127.0.0.1 and
its certificate names 127.0.0.1. Needs the release binary (MESHD_BIN, default target/release/meshd; skipped when
there is none: `scripts/deploy-checks --no-netns` is meant to run without a build) and, for infer, the test model."""
import os
import shutil
import signal
import socket
import subprocess
import time
import tomllib
from pathlib import Path

import pytest

from deploylib import REPO, ROLES, SYSTEMD_DIR, parse_unit
from test_systemd_units import seconds

GATEWAY_IP = "127.0.0.1"
API_KEYS = "sha256:" + "a1" * 32 + "\n"
# One token per worker role, as Terraform makes them (/<name>/worker-token/<role>).
TOKENS = {"caller": "sd-notify-caller-token-0123456789", "infer": "sd-notify-infer-token-9876543210"}
# The practical bound on a start here; every unit's TimeoutStartSec is at least this (asserted below).
START_LIMIT_S = 60


def meshd_bin() -> Path:
    p = Path(os.environ.get("MESHD_BIN", "target/release/meshd"))
    p = p if p.is_absolute() else REPO / p
    if not (p.is_file() and os.access(p, os.X_OK)):
        pytest.skip(f"no meshd binary at {p} (cargo build --release, or set MESHD_BIN)")
    return p


def model_path() -> Path | None:
    p = Path(os.environ.get("MESHD_TEST_MODEL", "models/gemma3-270m-q4_k_m.gguf"))
    p = p if p.is_absolute() else REPO / p
    return p if p.is_file() else None


def openssl(*args):
    proc = subprocess.run(["openssl", *map(str, args)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"openssl {args}: {proc.stdout}{proc.stderr}"


def make_pki(d: Path):
    """A P-256 CA and the gateway's key (PKCS#8) and certificate for GATEWAY_IP, as terraform/tls.tf makes them."""
    d.mkdir(parents=True, exist_ok=True)
    ca_key, ca, gw_key, gw = d / "ca-key.pem", d / "mesh-ca.pem", d / "gateway-key.pem", d / "gateway.pem"
    (d / "ca.ext").write_text("basicConstraints=critical,CA:TRUE\nkeyUsage=critical,keyCertSign,cRLSign\n")
    (d / "gw.ext").write_text("basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n"
                              f"extendedKeyUsage=serverAuth\nsubjectAltName=IP:{GATEWAY_IP}\n")
    for key in (ca_key, gw_key):
        openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", key)
    openssl("req", "-new", "-key", ca_key, "-subj", "/CN=meshd-test-ca", "-out", d / "ca.csr")
    openssl("x509", "-req", "-in", d / "ca.csr", "-signkey", ca_key, "-days", 2, "-extfile", d / "ca.ext", "-out", ca)
    openssl("req", "-new", "-key", gw_key, "-subj", "/CN=meshd-gateway", "-out", d / "gw.csr")
    openssl("x509", "-req", "-in", d / "gw.csr", "-CA", ca, "-CAkey", ca_key, "-days", 2, "-set_serial", "0x1234",
            "-extfile", d / "gw.ext", "-out", gw)
    return ca, gw_key, gw


def free_port() -> int:
    with socket.socket() as s:
        s.bind((GATEWAY_IP, 0))
        return s.getsockname()[1]


class Systemd:
    """What systemd gives one unit: the notify socket (recording every datagram) and the unit's environment."""

    def __init__(self, root: Path, role: str):
        self.role = role
        self.root = root
        self.unit = f"meshd-{role}.service"
        self.svc = parse_unit(SYSTEMD_DIR / self.unit)["Service"]
        self.path = root / "run" / f"{role}.notify"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.path))
        self.messages: list[tuple[float, str]] = []
        self.proc = None
        self.t0 = None

    def setting(self, key) -> float:
        return seconds(self.svc[key][-1])

    def host(self, path: str) -> str:
        """A path of the VM -> the scratch root (the model: the test model)."""
        if path == "/usr/local/bin/meshd":
            return str(meshd_bin())
        if path.startswith("/var/cache/meshd/models/"):
            return str(model_path())
        if path.startswith(("/etc/meshd/", "/var/lib/meshd", f"/run/credentials/{self.unit}/")):
            return str(self.root / path.lstrip("/"))
        return path

    def start(self, toml_overrides: dict):
        # The role's TOML, its paths moved under the scratch root (in tables too: the gateway's [worker_token_files]).
        def moved(v):
            if isinstance(v, dict):
                return {k: moved(x) for k, x in v.items()}
            return self.host(v) if isinstance(v, str) else v

        cfg = {k: moved(v) for k, v in tomllib.loads((REPO / "roles" / f"{self.role}.toml").read_text()).items()}
        cfg |= toml_overrides
        conf = self.root / "etc/meshd" / f"{self.role}.toml"
        conf.write_text(toml_document(cfg))
        # LoadCredential=: copies into the credentials directory, named by %d (/run/credentials/<unit>/).
        creds = self.root / "run/credentials" / self.unit
        creds.mkdir(parents=True, exist_ok=True)
        for spec in self.svc.get("LoadCredential", []):
            cid, src = spec.split(":", 1)
            (creds / cid).write_bytes(Path(self.host(src)).read_bytes())
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}
        for spec in self.svc.get("EnvironmentFile", []):
            f = Path(self.host(spec.lstrip("-")))
            if f.exists():
                env |= dict(line.split("=", 1) for line in f.read_text().splitlines() if "=" in line)
        for spec in self.svc.get("Environment", []):
            k, v = spec.split("=", 1)
            env[k] = str(creds / v[3:]) if v.startswith("%d/") else self.host(v)
        env["NOTIFY_SOCKET"] = str(self.path)
        env["WATCHDOG_USEC"] = str(int(self.setting("WatchdogSec") * 1_000_000))
        argv = self.svc["ExecStart"][-1].split()
        argv = [self.host(a) for a in argv]
        # systemd sets WATCHDOG_PID to the main process: the shell's pid is the binary's after exec.
        self.t0 = time.monotonic()
        self.log = open(self.root / f"{self.role}.log", "w")
        self.proc = subprocess.Popen(["/bin/sh", "-c", 'export WATCHDOG_PID=$$; exec "$0" "$@"', *argv], env=env,
                                     stdout=self.log, stderr=subprocess.STDOUT, cwd=self.root)

    def poll(self, seconds_: float):
        """Collects datagrams for up to seconds_."""
        end = time.monotonic() + seconds_
        while (left := end - time.monotonic()) > 0:
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                return
            self.messages.append((time.monotonic() - self.t0, data.decode()))

    def wait_for(self, line: str, timeout: float) -> float:
        """Seconds since start at which a datagram carrying `line` arrived (waiting up to timeout)."""
        end = time.monotonic() + timeout
        while True:
            for at, msg in self.messages:
                if line in msg.splitlines():
                    return at
            if time.monotonic() >= end or self.proc.poll() is not None:
                self.poll(0.2)
                for at, msg in self.messages:
                    if line in msg.splitlines():
                        return at
                pytest.fail(f"{self.unit}: no {line} within {timeout} s (exit {self.proc.poll()}); got "
                            f"{self.messages}\n{self.logs()}")
            self.poll(min(0.5, max(0.0, end - time.monotonic())))

    def fed_after_ready(self) -> float | None:
        """When the first WATCHDOG=1 at or after READY=1 arrived (seconds since start), if one did."""
        fed = [at for at, msg in self.messages if "WATCHDOG=1" in msg.splitlines() and at >= self.ready - 0.01]
        return fed[0] if fed else None

    def wait_for_prefix(self, prefix: str, timeout: float):
        end = time.monotonic() + timeout
        while not self.lines(prefix):
            if time.monotonic() >= end or self.proc.poll() is not None:
                pytest.fail(f"{self.unit}: no {prefix}... within {timeout} s (exit {self.proc.poll()}); got "
                            f"{self.messages}\n{self.logs()}")
            self.poll(0.2)

    def lines(self, prefix: str) -> list[str]:
        return [line for _, msg in self.messages for line in msg.splitlines() if line.startswith(prefix)]

    def logs(self) -> str:
        self.log.flush()
        return (self.root / f"{self.role}.log").read_text()[-3000:]

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.sock.close()


def toml_document(cfg: dict) -> str:
    """Top-level keys first, then one [table] per dict (TOML puts every key after a table header into the table)."""
    out = [f"{k} = {toml_value(v)}\n" for k, v in cfg.items() if not isinstance(v, dict)]
    for name, table in cfg.items():
        if isinstance(table, dict):
            out.append(f"\n[{name}]\n" + "".join(f"{k} = {toml_value(v)}\n" for k, v in table.items()))
    return "".join(out)


def toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return str(v)
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The scenario, once: the workers (infer only with the test model) with no gateway, then the gateway; every unit
    ready and fed; then SIGTERM to all. Returns ({role: Systemd} with every datagram recorded, {worker: what was seen
    before the gateway started})."""
    meshd_bin()
    root = tmp_path_factory.mktemp("sdnotify")
    make_pki(root / "pki")
    mesh_port = free_port()
    roles = ["gateway", "caller"] + (["infer"] if model_path() else [])
    # One scratch root per VM, with what cloud-init (the TLS file) and meshd-bootstrap (secrets, env) write there.
    vms = {role: root / role for role in roles}
    for role, vm in vms.items():
        etc = vm / "etc/meshd"
        shutil.copytree(root / "pki", etc / "tls")
        if role == "gateway":
            (etc / "tokens").mkdir(mode=0o700)
            for worker, token in TOKENS.items():
                (etc / "tokens" / worker).write_text(token)
            (etc / "api-keys").write_text(API_KEYS)
            # The state store's password (a credential of the unit). No gateway.env here, so no state_url: the gateway
            # keeps state in sled and the sd_notify contract is the same (the state store never holds the start).
            (etc / "state-password").write_text("sd-notify-state-password")
            (vm / "var/lib/meshd").mkdir(parents=True)
        else:
            (etc / "worker-token").write_text(TOKENS[role])
            (etc / f"{role}.env").write_text(f"MESHD_GATEWAY_URL=wss://{GATEWAY_IP}:{mesh_port}\n")
    units = {role: Systemd(vms[role], role) for role in roles}
    workers = [u for role, u in units.items() if role != "gateway"]
    try:
        # The workers first: each loads what it must (infer: the model) and tries to join a gateway that is not there.
        for u in workers:
            u.start({})
        for u in workers:
            u.wait_for_prefix("STATUS=cannot join the mesh", START_LIMIT_S)
            u.poll(0.5)
        alone = {u.role: {"alive": u.proc.poll() is None, "messages": list(u.messages), "log": u.logs()}
                 for u in workers}
        units["gateway"].start({"http_addr": f"{GATEWAY_IP}:0", "mesh_addr": f"{GATEWAY_IP}:{mesh_port}"})
        for u in units.values():
            u.ready = u.wait_for("READY=1", START_LIMIT_S)
        # systemd (re)arms the watchdog at READY=1: each unit must feed it within WatchdogSec of that. Wait for the
        # first feed after READY=1 of every unit (they run side by side), or until its WatchdogSec has passed.
        waiting = dict(units)
        while waiting:
            for role, u in list(waiting.items()):
                u.poll(0.1)
                if u.fed_after_ready() is not None or time.monotonic() - u.t0 > u.ready + u.setting("WatchdogSec"):
                    del waiting[role]
        for u in units.values():
            u.proc.send_signal(signal.SIGTERM)
            u.sigterm_at = time.monotonic() - u.t0
        for u in units.values():
            try:
                u.exit_code = u.proc.wait(timeout=u.setting("TimeoutStopSec"))
            except subprocess.TimeoutExpired:
                u.exit_code = None
            u.poll(0.2)
        yield units, alone
    finally:
        for u in units.values():
            u.stop()


def unit_of(run, role):
    units, _ = run
    if role not in units:
        pytest.skip(f"no test model for {role} (scripts/fetch-model)")
    return units[role]


def test_start_timeouts_cover_this_test():
    """This test waits START_LIMIT_S for READY=1; systemd would wait at least as long."""
    for role in ROLES:
        svc = parse_unit(SYSTEMD_DIR / f"meshd-{role}.service")["Service"]
        assert seconds(svc["TimeoutStartSec"][-1]) >= START_LIMIT_S


@pytest.mark.parametrize("role", ["caller", "infer"])
def test_a_worker_without_a_gateway_is_alive_but_not_ready(run, role):
    """Type=notify means active = READY=1: a worker that has not joined the mesh must not claim it."""
    u = unit_of(run, role)
    units, alone = run
    seen = alone[role]
    assert seen["alive"], seen["log"]
    lines = [line for _, msg in seen["messages"] for line in msg.splitlines()]
    assert "READY=1" not in lines, f"READY=1 without a gateway to join: {seen['messages']}"
    # And it became ready only after the gateway had.
    gateway = units["gateway"]
    assert u.t0 + u.ready > gateway.t0 + gateway.ready


@pytest.mark.parametrize("role", ROLES)
def test_ready_within_the_start_timeout_with_a_status(run, role):
    u = unit_of(run, role)
    assert u.ready < u.setting("TimeoutStartSec")
    assert u.lines("STATUS="), f"{role}: no STATUS= line: {u.messages}"


@pytest.mark.parametrize("role", ROLES)
def test_watchdog_fed_once_ready(run, role):
    """With the unit's own WatchdogSec (as $WATCHDOG_USEC): a WATCHDOG=1 within WatchdogSec of READY=1, or systemd
    would kill the process."""
    u = unit_of(run, role)
    fed = u.fed_after_ready()
    assert fed is not None, f"{role}: no WATCHDOG=1 within WatchdogSec of READY=1: {u.messages}"
    assert fed - u.ready < u.setting("WatchdogSec"), (fed, u.ready)


@pytest.mark.parametrize("role", ROLES)
def test_no_watchdog_before_ready(run, role):
    """systemd arms the watchdog at READY=1, or at the first WATCHDOG=1 if that comes earlier: feeding before READY=1
    would make the start subject to WatchdogSec instead of TimeoutStartSec (a model load, a wait for the gateway)."""
    u = unit_of(run, role)
    early = [at for at, msg in u.messages if "WATCHDOG=1" in msg.splitlines() and at < u.ready]
    assert not early, f"{role}: WATCHDOG=1 at {early[0]:.2f} s, READY=1 at {u.ready:.2f} s"


@pytest.mark.parametrize("role", ROLES)
def test_sigterm_stopping_and_a_clean_exit_within_the_stop_timeout(run, role):
    u = unit_of(run, role)
    assert u.exit_code is not None, f"{role} still running TimeoutStopSec after SIGTERM\n{u.logs()}"
    assert u.exit_code == 0, f"{role} exited {u.exit_code}\n{u.logs()}"
    assert [at for at, msg in u.messages if "STOPPING=1" in msg.splitlines() and at >= u.sigterm_at], u.messages
