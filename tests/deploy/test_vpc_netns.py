"""The VPC of terraform/ rebuilt on one machine with network namespaces, veth pairs and nftables, and the real
meshd binary running its three roles in it.

    internet 198.51.100.10 ─┐
                            │          ┌─ public  10.20.1.10            (gateway;  SG "gateway" in nftables)
                         router ───────┼─ private 10.20.2.11, 10.20.2.12 (caller, infer; SG "workers")
    rogue    10.20.3.66  ───┘          │
                                       (router = VPC router + internet gateway; 10.20.1.10 stands in for the EIP;
                                        like AWS, nothing routes from the internet to the private subnet)

nftables in each host namespace mirror terraform/security_groups.tf:
    gateway  in : tcp/3111 from allowed_api_cidrs (198.51.100.0/24); tcp/49134 from the workers only
            out : tcp/443
    workers  in : nothing
            out : tcp/49134 to the gateway; tcp/443
Blocked traffic is dropped (like a security group), so a blocked connect times out; "refused" would mean the
packet reached the host.

Needs root, iproute2 and nftables, the release binary (env MESHD_BIN, default target/release/meshd) and the
model models/gemma3-270m-q4_k_m.gguf (scripts/fetch-model; env MESHD_TEST_MODEL overrides). Everything it creates
carries a unique name and is removed at the end, whatever happens.
"""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from deploylib import REPO

READY_TIMEOUT_S = 60
PROBE_TIMEOUT_S = 1.5

INTERNET_IP = "198.51.100.10"
API_CIDR = "198.51.100.0/24"
GATEWAY_IP = "10.20.1.10"
CALLER_IP = "10.20.2.11"
INFER_IP = "10.20.2.12"
ROGUE_IP = "10.20.3.66"
API_PORT = 3111
MESH_PORT = 49134
PROBE_PORT = 8080  # a listener on the workers and the internet host, to show what the filters block

PREFIX = "mdt"

PROBE_SCRIPT = r"""
import concurrent.futures, json, socket, sys
timeout = float(sys.argv[1])
def probe(target):
    host, port = target.rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
        return target, "open"
    except socket.timeout:
        return target, "timeout"
    except OSError as e:
        return target, "error:%s" % (e.strerror or e)
with concurrent.futures.ThreadPoolExecutor(32) as ex:
    print(json.dumps(dict(ex.map(probe, sys.argv[2:]))))
"""

HTTP_SCRIPT = r"""
import json, sys, urllib.error, urllib.request
method, url, body, timeout = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
data = body.encode() if body else None
req = urllib.request.Request(url, data=data, method=method, headers={"content-type": "application/json"})
try:
    with urllib.request.urlopen(req, timeout=timeout) as r:
        print(json.dumps({"status": r.status, "body": r.read().decode("utf-8", "replace")}))
except urllib.error.HTTPError as e:
    print(json.dumps({"status": e.code, "body": e.read().decode("utf-8", "replace")}))
except Exception as e:
    print(json.dumps({"status": None, "body": repr(e)}))
"""

LISTEN_SCRIPT = r"""
import socket, sys, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1]))); s.listen(64)
s.settimeout(1.0)
end = time.time() + float(sys.argv[2])
while time.time() < end:
    try:
        c, _ = s.accept(); c.close()
    except socket.timeout:
        pass
"""


def sh(*args, check=True, ns=None, timeout=30, input=None):
    cmd = (["ip", "netns", "exec", ns] if ns else []) + [str(a) for a in args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, input=input)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stdout}{proc.stderr}")
    return proc


def netns_list():
    proc = sh("ip", "netns", "list", check=False)
    return [line.split()[0] for line in proc.stdout.splitlines() if line.strip()]


def kill_netns(ns):
    """Kill what still runs in a namespace of ours, then delete it."""
    pids = sh("ip", "netns", "pids", ns, check=False).stdout.split()
    for pid in pids:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass
    sh("ip", "netns", "del", ns, check=False)


def remove_stale_namespaces():
    """Namespaces left by an earlier run of this test that was killed (their owner pid is gone)."""
    for ns in netns_list():
        if not ns.startswith(PREFIX + "-"):
            continue
        try:
            owner = int(ns.split("-")[1])
        except (IndexError, ValueError):
            continue
        if owner != os.getpid() and not Path(f"/proc/{owner}").exists():
            kill_netns(ns)


def nft_gateway_sg():
    return f"""
table inet meshd_sg {{
  set api_cidrs {{ type ipv4_addr; flags interval; elements = {{ {API_CIDR} }} }}
  set workers {{ type ipv4_addr; elements = {{ {CALLER_IP}, {INFER_IP} }} }}
  chain input {{
    type filter hook input priority 0; policy drop;
    iif lo accept
    ct state established,related accept
    tcp dport {API_PORT} ip saddr @api_cidrs accept
    tcp dport {MESH_PORT} ip saddr @workers accept
  }}
  chain output {{
    type filter hook output priority 0; policy drop;
    oif lo accept
    ct state established,related accept
    tcp dport 443 accept
  }}
}}
"""


def nft_workers_sg():
    return f"""
table inet meshd_sg {{
  set gateway {{ type ipv4_addr; elements = {{ {GATEWAY_IP} }} }}
  chain input {{
    type filter hook input priority 0; policy drop;
    iif lo accept
    ct state established,related accept
  }}
  chain output {{
    type filter hook output priority 0; policy drop;
    oif lo accept
    ct state established,related accept
    tcp dport {MESH_PORT} ip daddr @gateway accept
    tcp dport 443 accept
  }}
}}
"""


def nft_router():
    # The internet gateway only reaches public addresses: nothing routes from the internet into the private subnet.
    return """
table inet meshd_vpc {
  chain forward {
    type filter hook forward priority 0; policy accept;
    iifname "%s" ip daddr 10.20.2.0/24 drop
  }
}
"""


class Vpc:
    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.sfx = f"{os.getpid()}-{os.urandom(2).hex()}"
        self.ns = {n: f"{PREFIX}-{self.sfx}-{n}" for n in ("router", "internet", "public", "private", "rogue")}
        self.procs: dict[str, subprocess.Popen] = {}
        self.logs: dict[str, Path] = {}
        self._veth_n = 0

    # ---- topology -----------------------------------------------------------------------------------------------------

    def _veth(self, host_ns, host_addrs, router_addr):
        """A veth pair host <-> router; returns the router-side interface name."""
        self._veth_n += 1
        tag = os.urandom(3).hex()
        r_if, h_if = f"r{tag}{self._veth_n}", f"h{tag}{self._veth_n}"
        router = self.ns["router"]
        sh("ip", "-n", router, "link", "add", r_if, "type", "veth", "peer", "name", h_if, "netns", self.ns[host_ns])
        sh("ip", "-n", router, "addr", "add", router_addr, "dev", r_if)
        sh("ip", "-n", router, "link", "set", r_if, "up")
        for a in host_addrs:
            sh("ip", "-n", self.ns[host_ns], "addr", "add", a, "dev", h_if)
        sh("ip", "-n", self.ns[host_ns], "link", "set", h_if, "up")
        gw = router_addr.split("/")[0]
        sh("ip", "-n", self.ns[host_ns], "route", "add", "default", "via", gw)
        return r_if

    def build(self):
        for ns in self.ns.values():
            sh("ip", "netns", "add", ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("sysctl", "-qw", "net.ipv4.ip_forward=1", ns=self.ns["router"])
        inet_if = self._veth("internet", [f"{INTERNET_IP}/24"], "198.51.100.1/24")
        self._veth("public", [f"{GATEWAY_IP}/24"], "10.20.1.1/24")
        self._veth("private", [f"{CALLER_IP}/24", f"{INFER_IP}/24"], "10.20.2.1/24")
        self._veth("rogue", [f"{ROGUE_IP}/24"], "10.20.3.1/24")
        sh("nft", "-f", "-", ns=self.ns["router"], input=nft_router() % inet_if)
        sh("nft", "-f", "-", ns=self.ns["public"], input=nft_gateway_sg())
        sh("nft", "-f", "-", ns=self.ns["private"], input=nft_workers_sg())

    def destroy(self):
        for name, p in self.procs.items():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.time() + 10
        for p in self.procs.values():
            try:
                p.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=5)
        for ns in self.ns.values():
            kill_netns(ns)

    # ---- processes ----------------------------------------------------------------------------------------------------

    def start(self, name, ns, argv):
        log = self.tmp / f"{name}.log"
        self.logs[name] = log
        env = {k: v for k, v in os.environ.items() if not k.startswith("MESHD_")}
        env.setdefault("RUST_BACKTRACE", "1")
        self.procs[name] = subprocess.Popen(
            ["ip", "netns", "exec", self.ns[ns], *map(str, argv)],
            stdout=open(log, "wb"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            cwd=REPO, env=env, start_new_session=True,
        )

    def dead(self):
        return {n: p.returncode for n, p in self.procs.items() if p.poll() is not None}

    def report(self):
        parts = []
        for name, log in self.logs.items():
            text = log.read_text(errors="replace") if log.exists() else "(no log)"
            text = re.sub(r"\x1b\[[0-9;]*m", "", text)
            if len(text) > 6000:
                text = "...\n" + text[-6000:]
            rc = self.procs[name].poll()
            parts.append(f"----- {name} (exit code {rc}) {log} -----\n{text}")
        return "\n".join(parts)

    # ---- clients ------------------------------------------------------------------------------------------------------

    def probe(self, ns, targets, timeout=PROBE_TIMEOUT_S):
        out = sh(sys.executable, "-c", PROBE_SCRIPT, timeout, *targets, ns=self.ns[ns], timeout=30).stdout
        return json.loads(out)

    def http(self, ns, method, url, body=None, timeout=10):
        out = sh(sys.executable, "-c", HTTP_SCRIPT, method, url, json.dumps(body) if body is not None else "", timeout,
                 ns=self.ns[ns], timeout=timeout + 20).stdout
        return json.loads(out)


def meshd_bin() -> Path:
    p = Path(os.environ.get("MESHD_BIN", "target/release/meshd"))
    p = p if p.is_absolute() else REPO / p
    if not (p.is_file() and os.access(p, os.X_OK)):
        pytest.fail(f"meshd binary not found at {p}: build it first (cargo build --release) or set MESHD_BIN", pytrace=False)
    return p


def model_path() -> Path:
    p = Path(os.environ.get("MESHD_TEST_MODEL", "models/gemma3-270m-q4_k_m.gguf"))
    p = p if p.is_absolute() else REPO / p
    if not p.is_file():
        pytest.fail(f"model not found at {p}: run scripts/fetch-model first (or set MESHD_TEST_MODEL)", pytrace=False)
    return p


@pytest.fixture(scope="module")
def vpc(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.fail("the network-namespace test needs root (ip netns, nftables)", pytrace=False)
    for tool in ("ip", "nft", "sysctl"):
        if not shutil.which(tool):
            pytest.fail(f"{tool} is not installed (scripts/deploy-checks installs iproute2, nftables, procps)", pytrace=False)
    binary, model = meshd_bin(), model_path()
    remove_stale_namespaces()

    tmp = tmp_path_factory.mktemp("vpc")
    token = tmp / "worker-token"
    token.write_text(os.urandom(24).hex())
    token.chmod(0o600)
    data = tmp / "gateway-data"
    data.mkdir()

    v = Vpc(tmp)
    try:
        v.build()
        # Listeners that show what the filters block: one on the workers' host, one on the internet host.
        v.start("probe-listener-private", "private", [sys.executable, "-c", LISTEN_SCRIPT, PROBE_PORT, 300])
        v.start("probe-listener-internet", "internet", [sys.executable, "-c", LISTEN_SCRIPT, PROBE_PORT, 300])
        v.start("gateway", "public", [
            binary, "gateway", "--config", "roles/gateway.toml",
            "--http-addr", f"{GATEWAY_IP}:{API_PORT}", "--mesh-addr", f"{GATEWAY_IP}:{MESH_PORT}",
            "--data-dir", data, "--worker-token-file", token, "--log-format", "human",
        ])
        mesh_url = f"ws://{GATEWAY_IP}:{MESH_PORT}"
        v.start("caller", "private", [
            binary, "caller", "--config", "roles/caller.toml",
            "--gateway-url", mesh_url, "--worker-token-file", token, "--log-format", "human",
        ])
        v.start("infer", "private", [
            binary, "infer", "--config", "roles/infer.toml",
            "--gateway-url", mesh_url, "--worker-token-file", token, "--model", model, "--log-format", "human",
        ])

        deadline = time.time() + READY_TIMEOUT_S
        last = None
        while True:
            dead = {n: rc for n, rc in v.dead().items() if not n.startswith("probe-")}
            if dead:
                pytest.fail(f"meshd exited before it was ready: {dead}\n{v.report()}", pytrace=False)
            last = v.http("internet", "GET", f"http://{GATEWAY_IP}:{API_PORT}/readyz", timeout=3)
            if last["status"] == 200:
                break
            if time.time() > deadline:
                pytest.fail(f"GET /readyz not 200 within {READY_TIMEOUT_S} s (last: {last})\n{v.report()}", pytrace=False)
            time.sleep(0.5)
        yield v
    finally:
        v.destroy()
        for ns in netns_list():
            if ns.startswith(f"{PREFIX}-{v.sfx}-"):
                print(f"warning: namespace {ns} survived cleanup; removing it again")
                kill_netns(ns)


def not_ready_hint(r):
    if r["status"] == 503 and "no_worker" in r["body"]:
        return ("\nHINT: GET /readyz answered 200 while a function behind this trigger had no live worker; DESIGN.md says "
                "/readyz means every trigger's function has a live worker AND the model is loaded (infer registered).")
    return ""


def test_add_two_numbers_from_the_internet(vpc):
    r = vpc.http("internet", "POST", f"http://{GATEWAY_IP}:{API_PORT}/math/add-two-numbers", {"a": 100, "b": 200})
    assert r["status"] == 200, f"{r}{not_ready_hint(r)}\n{vpc.report()}"
    body = json.loads(r["body"])
    assert body["c"] == 300, f"{body}\n{vpc.report()}"


def test_chat_completion_from_the_internet(vpc):
    r = vpc.http("internet", "POST", f"http://{GATEWAY_IP}:{API_PORT}/v1/chat/completions",
                 {"messages": [{"role": "user", "content": "what color is apple?"}], "max_tokens": 16}, timeout=120)
    assert r["status"] == 200, f"{r}{not_ready_hint(r)}\n{vpc.report()}"
    body = json.loads(r["body"])
    assert body["choices"][0]["message"]["content"].strip(), body


def test_mesh_port_and_workers_unreachable_from_the_internet(vpc):
    targets = [f"{GATEWAY_IP}:{MESH_PORT}"]
    for ip in (CALLER_IP, INFER_IP):
        targets += [f"{ip}:{p}" for p in (22, 80, API_PORT, MESH_PORT, PROBE_PORT)]
    got = vpc.probe("internet", targets)
    assert got == {t: "timeout" for t in targets}, got
    # ... while the API port itself answers.
    assert vpc.probe("internet", [f"{GATEWAY_IP}:{API_PORT}"]) == {f"{GATEWAY_IP}:{API_PORT}": "open"}


def test_workers_accept_no_inbound_even_from_inside_the_vpc(vpc):
    probe_targets = [f"{ip}:{PROBE_PORT}" for ip in (CALLER_IP, INFER_IP)]
    # The listener is there (seen from the workers' own host) ...
    assert set(vpc.probe("private", probe_targets).values()) == {"open"}
    # ... but the gateway's host and a rogue host cannot reach it, nor any other port.
    targets = probe_targets + [f"{CALLER_IP}:{MESH_PORT}", f"{INFER_IP}:22"]
    for ns in ("public", "rogue"):
        got = vpc.probe(ns, targets)
        assert got == {t: "timeout" for t in targets}, (ns, got)


def test_rogue_host_cannot_reach_the_mesh_port(vpc):
    # The rogue host routes fine (it reaches the internet host) ...
    assert vpc.probe("rogue", [f"{INTERNET_IP}:{PROBE_PORT}"]) == {f"{INTERNET_IP}:{PROBE_PORT}": "open"}
    # ... but it is not in the workers' group, so the mesh port (and the API: not an allowed CIDR) is closed to it.
    targets = [f"{GATEWAY_IP}:{MESH_PORT}", f"{GATEWAY_IP}:{API_PORT}"]
    assert vpc.probe("rogue", targets) == {t: "timeout" for t in targets}


def test_workers_egress_only_to_the_mesh(vpc):
    # Workers reach the gateway's mesh port (they are connected: /readyz said so) but not its API port,
    # and nothing on the internet except https.
    targets = [f"{GATEWAY_IP}:{API_PORT}", f"{INTERNET_IP}:{PROBE_PORT}"]
    assert vpc.probe("private", targets) == {t: "timeout" for t in targets}
    assert vpc.probe("private", [f"{GATEWAY_IP}:{MESH_PORT}"]) == {f"{GATEWAY_IP}:{MESH_PORT}": "open"}
