"""The VPC of terraform/ rebuilt on one machine with network namespaces, veth pairs and nftables, and the real
meshd binary running the fleet in it: two gateways in two zones behind a load balancer, the state store, the workers
joined to both gateways; then one gateway is killed.

    internet 198.51.100.10 ─┐               ┌─ nlb      10.20.1.20   haproxy: the NLB's stand-in (public subnet, zone a)
    rogue    10.20.3.66  ───┤               ├─ gw-a     10.20.11.10  meshd gateway (private subnet, zone a)
                          router ──────────┼─ gw-b     10.20.12.10  meshd gateway (private subnet, zone b)
                                            ├─ workers  10.20.11.21 caller, 10.20.12.22 infer
                                            └─ state    10.20.12.30  redis-server: the state store's stand-in
    (router = VPC router + internet gateway; like AWS, nothing routes from the internet to anything but the NLB: no
     instance has a public address)

The nftables rules of each host namespace are generated from terraform/security_groups.tf (parsed with python-hcl2):
every aws_vpc_security_group_{ingress,egress}_rule of the groups that terraform/ puts the host's resource in (the NLB:
aws_lb.api, the gateways: aws_instance.gateway, the workers: aws_launch_template.worker, the state store:
aws_memorydb_cluster.state), with allowed_api_cidrs = 198.51.100.0/24 and the other variables at their defaults; a
referenced security group becomes the addresses of its hosts here. Today that gives:
    nlb      in : tcp/443 from allowed_api_cidrs              out: tcp/3111 to the gateways
    gateways in : tcp/3111 from allowed_api_cidrs and the public subnets (the NLB's nodes); tcp/49134 from the workers
            out : tcp/443; tcp/6379 to the state store
    workers  in : nothing                                      out: tcp/49134 to the gateways; tcp/443
    state    in : tcp/6379 from the gateways                   out: nothing
so a rule opened or widened in terraform/ opens it here too, and the probes below fail. A rule this generator cannot
mirror (IPv6, prefix lists, other protocols) fails the test instead of being left out. Blocked traffic is dropped
(like a security group), so a blocked connect times out. One difference from AWS: the NLB preserves the client's
address, haproxy does not (the gateways see its address, which their public-subnet rule admits, as they admit the
NLB's health checks); the allow-list is enforced at the NLB's stand-in here, and at both in AWS.

haproxy stands in for the NLB as closely as it can: TCP passthrough (TLS ends in meshd), a listener on 443, round robin
over both gateways' :3111, a health check of GET /readyz over HTTPS (no certificate check, like the NLB's), no retry
of a failed connection on another gateway (the NLB does not retry either). redis-server stands in for MemoryDB: TLS
only, the default user off, the ACL user and access string of terraform/state.tf, its password in a file handed to the
gateways like the unit's state-password credential. The workers find the gateways the way terraform/ tells them to:
roles/*.toml's wss://gateways.meshd.internal:49134, a name with one A record per gateway (the private Route 53
record; here /etc/netns/<workers>/hosts, which `ip netns exec` mounts over /etc/hosts), and clients reach the API by
the NLB's DNS name (here meshd-api.elb.test in the internet host's /etc/hosts); the gateways' certificate carries
both names, as tls.tf's does.

The roles start from the shipped roles/*.toml, secured the way terraform/ and systemd/ deploy them: a throwaway CA
and gateway certificate (P-256, made with openssl like tls.tf makes them), HTTPS with an api-keys file of
`sha256:<hex>` lines, wss:// on :49134, one worker token per role (the gateways read both from the paths of
roles/gateway.toml's [worker_token_files], filled from the unit's LoadCredential= lines). The key files reach the
gateways through MESHD_* variables, as the unit passes its credentials; meshd runs without systemd here, so the
units' sandbox settings are not exercised (they are checked statically only: test_systemd_units.py, systemd-analyze).

What it shows: the seed request and a chat succeed over HTTPS with the key through the load balancer; every worker
joined both gateways; the filters hold; key, TLS and token refusals; and last, one gateway's meshd killed with kill -9
in the middle of a run of adds: every add still succeeds (a client retries a failed connection with the same
Idempotency-Key, as docs/DEPLOY.md tells clients to), chats succeed through the surviving gateway, and the running
total is exact afterwards (Redis holds it; no add lost, none counted twice).

Needs root, iproute2, nftables, curl, openssl, haproxy and redis-server, the release binary (env MESHD_BIN, default
target/release/meshd) and the model models/gemma3-270m-q4_k_m.gguf (scripts/fetch-model; env MESHD_TEST_MODEL
overrides). Everything it creates carries a unique name and is removed at the end, whatever happens.
"""
import hashlib
import ipaddress
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

from deploylib import REPO, Terraform, block

READY_TIMEOUT_S = 90
PROBE_TIMEOUT_S = 1.5

INTERNET_IP = "198.51.100.10"
API_CIDR = "198.51.100.0/24"
NLB_IP = "10.20.1.20"
GW_A = "10.20.11.10"
GW_B = "10.20.12.10"
CALLER_IP = "10.20.11.21"
INFER_IP = "10.20.12.22"
STATE_IP = "10.20.12.30"
ROGUE_IP = "10.20.3.66"
NLB_PORT = 443
API_PORT = 3111
MESH_PORT = 49134
STATE_PORT = 6379
PROBE_PORT = 8080  # a listener on the workers and the internet host, to show what the filters block
API_DNS = "meshd-api.elb.test"  # the NLB's DNS name (aws_lb.api.dns_name)
GATEWAYS_FQDN = "gateways.meshd.internal"  # local.gateways_fqdn for name = "meshd"
STATE_DNS = "clustercfg.meshd-state.test"  # the state store's endpoint
API = f"https://{API_DNS}"
GATEWAY_API = f"https://{GATEWAYS_FQDN}:{API_PORT}"  # one gateway directly (with at=<its address>)

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


# ---- nftables from terraform/security_groups.tf -----------------------------------------------------------------------

# Where each host of terraform/ runs here: {host: [(namespace, address)]}, and which resource's security groups it has.
HOSTS = {
    "nlb": [("nlb", NLB_IP)],
    "gateway": [("gw-a", GW_A), ("gw-b", GW_B)],
    "caller": [("workers", CALLER_IP)],
    "infer": [("workers", INFER_IP)],
    "state": [("state", STATE_IP)],
}
# Values for the variables without a default that rules read (the others take their defaults).
SG_TEST_VARIABLES = {"allowed_api_cidrs": [API_CIDR]}
PROTOCOLS = {"tcp": "tcp", "6": "tcp", "udp": "udp", "17": "udp"}


def _ref(value, kind):
    """'${aws_security_group.X.id}' -> X."""
    m = re.fullmatch(r"\$\{" + kind + r"\.([A-Za-z0-9_-]+)\.id\}", str(value))
    if not m:
        raise ValueError(f"{value!r} is not a reference to a {kind}")
    return m.group(1)


def _variable(tf, name):
    if name in SG_TEST_VARIABLES:
        return SG_TEST_VARIABLES[name]
    if "default" not in tf.variables[name]:
        raise ValueError(f"var.{name} has no default: give it a test value in SG_TEST_VARIABLES")
    return tf.variables[name]["default"]


def security_groups_of_hosts(tf):
    """{host: [security group names]}: the NLB's, the gateway instances', the workers' launch template's network
    interface and the state store's."""
    lt = block(tf.resources["aws_launch_template"]["worker"], "network_interfaces")["security_groups"]
    raw = {
        "nlb": tf.resources["aws_lb"]["api"]["security_groups"],
        "gateway": tf.resources["aws_instance"]["gateway"]["vpc_security_group_ids"],
        "caller": lt,
        "infer": lt,
        "state": tf.resources["aws_memorydb_cluster"]["state"]["security_group_ids"],
    }
    return {host: [_ref(v, "aws_security_group") for v in groups] for host, groups in raw.items()}


def _peers(tf, name, rule, members):
    """The addresses a rule admits (ingress: sources, egress: destinations)."""
    for unsupported in ("cidr_ipv6", "prefix_list_id"):
        if unsupported in rule:
            raise ValueError(f"{name}: {unsupported} is not mirrored by this test")
    if "referenced_security_group_id" in rule:
        if "for_each" in rule:
            raise ValueError(f"{name}: for_each with a referenced security group is not mirrored by this test")
        return members.get(_ref(rule["referenced_security_group_id"], "aws_security_group"), [])
    cidr = rule.get("cidr_ipv4")
    if cidr is None:
        raise ValueError(f"{name}: neither cidr_ipv4 nor referenced_security_group_id")
    if cidr == "${each.value}":
        m = re.fullmatch(r"\$\{(?:toset\()?var\.([a-z_0-9]+)\)?\}", str(rule.get("for_each")))
        if not m:
            raise ValueError(f"{name}: for_each {rule.get('for_each')!r} is not toset(var.x)")
        cidrs = _variable(tf, m.group(1))
    elif "for_each" in rule or "${" in cidr:
        raise ValueError(f"{name}: cidr_ipv4 {cidr!r} is not a literal or each.value")
    else:
        cidrs = [cidr]
    return [str(ipaddress.ip_network(c, strict=False)) for c in cidrs]


def _match(tf, name, rule):
    """The protocol and port part of a rule."""
    proto = str(rule["ip_protocol"])
    if proto in ("-1", "all"):
        return ""
    if proto not in PROTOCOLS:
        raise ValueError(f"{name}: ip_protocol {proto!r} is not mirrored by this test")
    lo, hi = (int(tf.resolve(rule[k])) for k in ("from_port", "to_port"))
    return f"{PROTOCOLS[proto]} dport {lo if lo == hi else f'{lo}-{hi}'} "


def nft_security_groups(tf):
    """{namespace: nftables ruleset} for the namespaces that hold hosts: default drop both ways, replies allowed
    (security groups are stateful), plus one accept per rule of the hosts' security groups."""
    groups_of = security_groups_of_hosts(tf)
    members = {}
    for host, groups in groups_of.items():
        for g in groups:
            members.setdefault(g, []).extend(addr for _, addr in HOSTS[host])
    lines = {}  # (security group, "input"|"output") -> [nft rule]
    for rtype, chain, addr in (("aws_vpc_security_group_ingress_rule", "input", "saddr"),
                               ("aws_vpc_security_group_egress_rule", "output", "daddr")):
        for name, rule in tf.resources.get(rtype, {}).items():
            group = _ref(rule["security_group_id"], "aws_security_group")
            peers = _peers(tf, f"{rtype}.{name}", rule, members)
            if peers:
                lines.setdefault((group, chain), []).append(
                    f"ip {addr} {{ {', '.join(peers)} }} {_match(tf, f'{rtype}.{name}', rule)}accept")
    rulesets = {}
    for ns in sorted({n for places in HOSTS.values() for n, _ in places}):
        hosts = [h for h, places in HOSTS.items() if any(n == ns for n, _ in places)]
        if len({tuple(groups_of[h]) for h in hosts}) != 1:
            raise ValueError(f"{hosts} share the {ns} namespace here but not their security groups in terraform/")
        groups = groups_of[hosts[0]]

        def chain(name, hook, iface):
            rules = [r for g in groups for r in lines.get((g, name), [])]
            body = "\n".join(f"    {r}" for r in [f"{iface} lo accept", "ct state established,related accept", *rules])
            return f"  chain {name} {{\n    type filter hook {hook} priority 0; policy drop;\n{body}\n  }}\n"

        chains = chain("input", "input", "iif") + chain("output", "output", "oif")
        rulesets[ns] = "table inet meshd_sg {\n" + chains + "}\n"
    return rulesets


def nft_router(inet_if):
    # The internet gateway reaches only what has a public address: the NLB. No instance has one.
    return f"""
table inet meshd_vpc {{
  chain forward {{
    type filter hook forward priority 0; policy accept;
    ct state established,related accept
    iifname "{inet_if}" ip daddr != {NLB_IP} drop
  }}
}}
"""


class Vpc:
    NAMESPACES = ("router", "internet", "rogue", "nlb", "gw-a", "gw-b", "workers", "state")

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.sfx = f"{os.getpid()}-{os.urandom(2).hex()}"
        self.ns = {n: f"{PREFIX}-{self.sfx}-{n}" for n in self.NAMESPACES}
        self.procs: dict[str, subprocess.Popen] = {}
        self.logs: dict[str, Path] = {}
        self._veth_n = 0

    # ---- topology -----------------------------------------------------------------------------------------------------

    def _veth(self, host_ns, host_addrs):
        """A veth pair host <-> router, routed point to point (/32 each side); returns the router-side interface."""
        self._veth_n += 1
        tag = os.urandom(3).hex()
        r_if, h_if = f"r{tag}{self._veth_n}", f"h{tag}{self._veth_n}"
        router, host = self.ns["router"], self.ns[host_ns]
        hop = f"10.254.0.{self._veth_n}"
        sh("ip", "-n", router, "link", "add", r_if, "type", "veth", "peer", "name", h_if, "netns", host)
        sh("ip", "-n", router, "addr", "add", f"{hop}/32", "dev", r_if)
        sh("ip", "-n", router, "link", "set", r_if, "up")
        for a in host_addrs:
            sh("ip", "-n", host, "addr", "add", f"{a}/32", "dev", h_if)
            sh("ip", "-n", router, "route", "add", f"{a}/32", "dev", r_if)
        sh("ip", "-n", host, "link", "set", h_if, "up")
        sh("ip", "-n", host, "route", "add", hop, "dev", h_if)
        sh("ip", "-n", host, "route", "add", "default", "via", hop, "dev", h_if, "src", host_addrs[0])
        return r_if

    def hosts_file(self, ns, entries):
        """/etc/netns/<ns>/hosts: `ip netns exec` mounts it over /etc/hosts for what runs in the namespace."""
        d = Path("/etc/netns") / self.ns[ns]
        d.mkdir(parents=True, exist_ok=True)
        (d / "hosts").write_text("127.0.0.1 localhost\n" + "".join(f"{ip} {name}\n" for ip, name in entries))

    def build(self):
        for ns in self.ns.values():
            sh("ip", "netns", "add", ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("sysctl", "-qw", "net.ipv4.ip_forward=1", ns=self.ns["router"])
        inet_if = self._veth("internet", [INTERNET_IP])
        self._veth("rogue", [ROGUE_IP])
        self._veth("nlb", [NLB_IP])
        self._veth("gw-a", [GW_A])
        self._veth("gw-b", [GW_B])
        self._veth("workers", [CALLER_IP, INFER_IP])
        self._veth("state", [STATE_IP])
        sh("nft", "-f", "-", ns=self.ns["router"], input=nft_router(inet_if))
        for ns, ruleset in nft_security_groups(Terraform()).items():
            (self.tmp / f"nft-{ns}.conf").write_text(ruleset)
            sh("nft", "-f", "-", ns=self.ns[ns], input=ruleset)
        # Names: the NLB's for clients, the gateways' private record for the workers, the state store's endpoint for
        # the gateways.
        self.hosts_file("internet", [(NLB_IP, API_DNS)])
        self.hosts_file("rogue", [(NLB_IP, API_DNS)])
        self.hosts_file("workers", [(GW_A, GATEWAYS_FQDN), (GW_B, GATEWAYS_FQDN)])
        for gw in ("gw-a", "gw-b"):
            self.hosts_file(gw, [(STATE_IP, STATE_DNS)])

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
            shutil.rmtree(Path("/etc/netns") / ns, ignore_errors=True)

    # ---- processes ----------------------------------------------------------------------------------------------------

    def start(self, name, ns, argv, env_extra=None):
        log = self.tmp / f"{name}.log"
        self.logs[name] = log
        env = {k: v for k, v in os.environ.items() if not k.startswith("MESHD_")}
        env.setdefault("RUST_BACKTRACE", "1")
        env.update({k: str(v) for k, v in (env_extra or {}).items()})
        self.procs[name] = subprocess.Popen(
            ["ip", "netns", "exec", self.ns[ns], *map(str, argv)],
            stdout=open(log, "wb"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            cwd=REPO, env=env, start_new_session=True,
        )

    def stop(self, name, timeout=10):
        """SIGTERM to one process started by start() (SIGKILL after timeout); its log stays."""
        p = self.procs[name]
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=5)

    def dead(self):
        return {n: p.returncode for n, p in self.procs.items() if p.poll() is not None}

    def log(self, name):
        log = self.logs[name]
        text = log.read_text(errors="replace") if log.exists() else ""
        return re.sub(r"\x1b\[[0-9;]*m", "", text)

    def report(self):
        parts = []
        for name, log in self.logs.items():
            text = self.log(name) if log.exists() else "(no log)"
            if len(text) > 6000:
                text = "...\n" + text[-6000:]
            rc = self.procs[name].poll()
            parts.append(f"----- {name} (exit code {rc}) {log} -----\n{text}")
        return "\n".join(parts)

    # ---- clients ------------------------------------------------------------------------------------------------------

    def probe(self, ns, targets, timeout=PROBE_TIMEOUT_S):
        out = sh(sys.executable, "-c", PROBE_SCRIPT, timeout, *targets, ns=self.ns[ns], timeout=30).stdout
        return json.loads(out)

    def kill9(self, name):
        """kill -9 of one process started by start() (what a crashed VM looks like to its peers)."""
        p = self.procs[name]
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=10)

    def http(self, ns, method, url, body=None, timeout=10, ca="default", key="default", headers=(), at=None):
        """curl in a namespace: {"status": int or None (no HTTP answer), "body": str, "error": curl's stderr}.
        ca: a CA file for --cacert ("default": the test CA; None: curl's system trust store). key: the bearer key
        ("default": the valid one; None: no Authorization header). at: connect to this address instead of the
        URL's host (one gateway by the name its certificate carries)."""
        ca = self.ca if ca == "default" else ca
        key = self.api_key if key == "default" else key
        out = self.tmp / f"curl-{os.urandom(4).hex()}.out"
        args = ["curl", "-sS", "-o", out, "-w", "%{http_code}", "--max-time", timeout, "-X", method]
        if ca is not None:
            args += ["--cacert", ca]
        if key is not None:
            args += ["-H", f"Authorization: Bearer {key}"]
        for h in headers:
            args += ["-H", h]
        if at is not None:
            hostport = re.match(r"https?://([^/]+)", url).group(1)
            args += ["--resolve", f"{hostport}:{at}"]
        if body is not None:
            args += ["-H", "content-type: application/json", "--data-binary", json.dumps(body)]
        proc = sh(*args, url, ns=self.ns[ns], check=False, timeout=timeout + 20)
        text = out.read_text(errors="replace") if out.exists() else ""
        out.unlink(missing_ok=True)
        code = proc.stdout.strip()
        status = int(code) if code.isdigit() and code != "000" else None
        return {"status": status, "body": text, "error": proc.stderr.strip()}


def openssl(*args):
    proc = subprocess.run(["openssl", *map(str, args)], capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(map(str, args))} failed: {proc.stdout}{proc.stderr}")


def make_ca(d: Path, name: str) -> tuple[Path, Path]:
    """A self-signed P-256 CA: basicConstraints CA:TRUE, keyUsage keyCertSign (tls_self_signed_cert.ca)."""
    key, cert, csr, ext = d / f"{name}-key.pem", d / f"{name}.pem", d / f"{name}.csr", d / f"{name}.ext"
    ext.write_text("basicConstraints=critical,CA:TRUE\nkeyUsage=critical,keyCertSign,cRLSign,digitalSignature\n"
                   "subjectKeyIdentifier=hash\n")
    openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", key)
    openssl("req", "-new", "-key", key, "-subj", f"/O=meshd/CN={name}", "-out", csr)
    openssl("x509", "-req", "-in", csr, "-signkey", key, "-days", 2, "-set_serial", f"0x{os.urandom(8).hex()}",
            "-extfile", ext, "-out", cert)
    return key, cert


def make_cert(d: Path, name: str, ca_key: Path, ca_cert: Path, dns_names) -> tuple[Path, Path]:
    """A P-256 key (PKCS#8, as private_key_pem_pkcs8) and its certificate signed by the CA, with the DNS names clients
    dial and serverAuth (tls_cert_request + tls_locally_signed_cert.gateway: dns_names = [NLB, gateways.<name>...])."""
    key, cert, csr, ext = d / f"{name}-key.pem", d / f"{name}.pem", d / f"{name}.csr", d / f"{name}.ext"
    sans = ",".join(f"DNS:{n}" for n in dns_names)
    ext.write_text(f"basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n"
                   f"extendedKeyUsage=serverAuth\nsubjectAltName={sans}\n"
                   "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n")
    openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", key)
    openssl("req", "-new", "-key", key, "-subj", f"/O=meshd/CN={name}", "-out", csr)
    openssl("x509", "-req", "-in", csr, "-CA", ca_cert, "-CAkey", ca_key, "-days", 2,
            "-set_serial", f"0x{os.urandom(8).hex()}", "-extfile", ext, "-out", cert)
    assert key.read_text().startswith("-----BEGIN PRIVATE KEY-----"), "PKCS#8, like Terraform's private_key_pem_pkcs8"
    return key, cert


def tls_dns_names(tf):
    """tls.tf's SANs, with the NLB's DNS name (known after apply) stood in for by API_DNS."""
    names = tf.resources["tls_cert_request"]["gateway"]["dns_names"]
    assert names == ["${aws_lb.api.dns_name}", "${local.gateways_fqdn}"], names
    return [API_DNS, GATEWAYS_FQDN]


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


# Workers that must never join: one that trusts another CA, one that speaks plain ws:// (allowed on its side).
WRONG_CA_WORKER = "caller-wrong-ca"
PLAIN_WORKER = "caller-plain-ws"
# Workers with the wrong token, started by their tests: a caller holding the infer token, a caller holding a token of
# no role (say the single token of an older deployment).
CROSS_ROLE_WORKER = "caller-with-infer-token"
NO_ROLE_WORKER = "caller-with-no-roles-token"

GATEWAY_UNIT = REPO / "systemd" / "meshd-gateway.service"
WORKER_ROLES = ("caller", "infer")


def gateway_token_flags(tokens: dict, creds: Path) -> list:
    """--worker-token-file-for ROLE=PATH for each role of roles/gateway.toml's [worker_token_files], PATH being the
    copy systemd would make: the TOML names /run/credentials/meshd-gateway.service/<id>, the unit loads <id> from
    /etc/meshd/tokens/<role> (what meshd-bootstrap writes from SSM /<name>/worker-token/<role>); here <id> is copied
    from the test's token of that role into `creds`, the stand-in credentials directory."""
    import tomllib

    from deploylib import parse_unit

    cfg = tomllib.loads((REPO / "roles" / "gateway.toml").read_text())
    for key in ("worker_token", "worker_token_file", "worker_tokens"):
        assert key not in cfg, f"roles/gateway.toml sets {key}: the gateway would accept one token for every role"
    files = cfg.get("worker_token_files", {})
    assert set(files) == set(WORKER_ROLES), f"[worker_token_files] must name a token per role: {files}"
    loaded = dict(spec.split(":", 1) for spec in parse_unit(GATEWAY_UNIT)["Service"]["LoadCredential"])
    prefix = f"/run/credentials/{GATEWAY_UNIT.name}/"
    creds.mkdir(mode=0o700)
    flags = []
    for role, path in sorted(files.items()):
        assert path.startswith(prefix), f"worker_token_files.{role} = {path} is not a credential of {GATEWAY_UNIT.name}"
        cid = path[len(prefix):]
        assert loaded.get(cid) == f"/etc/meshd/tokens/{role}", f"{GATEWAY_UNIT.name} loads {cid} from {loaded.get(cid)}"
        copy = creds / cid
        copy.write_bytes(tokens[role].read_bytes())
        copy.chmod(0o600)
        flags += ["--worker-token-file-for", f"{role}={copy}"]
    return flags


HAPROXY_CFG = """global
    maxconn 512
defaults
    mode tcp
    timeout connect 2s
    timeout client 180s
    timeout server 180s
    retries 0
frontend api
    bind {nlb}:{nlb_port}
    default_backend gateways
backend gateways
    balance roundrobin
    option httpchk GET /readyz
    http-check expect status 200
{servers}"""


def haproxy_config(tf):
    """The NLB's listener and target group as haproxy says them: TCP passthrough on the listener's port to every
    gateway's API port, checked with the target group's health check (protocol, path, matcher) at a shorter interval."""
    listener = tf.resources["aws_lb_listener"]["api"]
    tg = tf.resources["aws_lb_target_group"]["gateways"]
    hc = block(tg, "health_check")
    assert listener["protocol"] == "TCP" and tg["protocol"] == "TCP", "TCP passthrough"
    assert (hc["protocol"], hc["path"], hc["matcher"]) == ("HTTPS", "/readyz", "200")
    assert int(tf.resolve(listener["port"])) == NLB_PORT and int(tf.resolve(tg["port"])) == API_PORT
    servers = "".join(f"    server {n} {ip}:{API_PORT} check check-ssl verify none inter 500ms fall 2 rise 2\n"
                      for n, ip in (("gw-a", GW_A), ("gw-b", GW_B)))
    return HAPROXY_CFG.format(nlb=NLB_IP, nlb_port=NLB_PORT, servers=servers)


def redis_config(tf, d: Path, cert: Path, key: Path, password: str) -> tuple[Path, str]:
    """redis-server as the state store: TLS only, the default user off, terraform/state.tf's ACL user and access
    string, a durable log."""
    access = tf.locals["state_access_string"]
    user = tf.locals["state_user"].replace("${var.name}", tf.variables["name"]["default"])
    (d / "redis").mkdir()
    conf = d / "redis.conf"
    conf.write_text(
        f"bind {STATE_IP}\nport 0\ntls-port {STATE_PORT}\ntls-cert-file {cert}\ntls-key-file {key}\n"
        f"tls-auth-clients no\nsave \"\"\nappendonly yes\nappendfsync always\ndir {d / 'redis'}\n"
        f"user default off\nuser {user} {access.replace('on ', f'on >{password} ', 1)}\n")
    conf.chmod(0o600)
    return conf, user


@pytest.fixture(scope="module")
def vpc(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.fail("the network-namespace test needs root (ip netns, nftables)", pytrace=False)
    for tool in ("ip", "nft", "sysctl", "curl", "openssl", "haproxy", "redis-server"):
        if not shutil.which(tool):
            pytest.fail(f"{tool} is not installed (scripts/deploy-checks installs iproute2, nftables, procps, curl, "
                        "openssl, haproxy, redis-server)", pytrace=False)
    binary, model = meshd_bin(), model_path()
    remove_stale_namespaces()
    tf = Terraform()
    tmp = tmp_path_factory.mktemp("vpc")
    pki = tmp / "pki"
    pki.mkdir()
    # One token per worker role, as terraform/ makes them, and one that is no role's.
    tokens = {}
    for role in WORKER_ROLES:
        tokens[role] = tmp / f"token-{role}"
        tokens[role].write_text(os.urandom(24).hex())
        tokens[role].chmod(0o600)
    no_role_token = tmp / "token-of-no-role"
    no_role_token.write_text(os.urandom(24).hex())
    ca_key, ca_cert = make_ca(pki, "meshd-test-ca")
    gw_key, gw_cert = make_cert(pki, "gateway", ca_key, ca_cert, tls_dns_names(tf))
    state_key, state_cert = make_cert(pki, "state", ca_key, ca_cert, [STATE_DNS])
    _, wrong_ca = make_ca(pki, "some-other-ca")
    # The api-keys file as the gateways' bootstrap writes it from SSM: digests only, one per line.
    api_key = os.urandom(24).hex()
    api_keys = tmp / "api-keys"
    api_keys.write_text(f"sha256:{hashlib.sha256(api_key.encode()).hexdigest()}\n")
    api_keys.chmod(0o600)
    state_password = os.urandom(24).hex()
    redis_conf, state_user = redis_config(tf, tmp, state_cert, state_key, state_password)

    v = Vpc(tmp)
    v.ca, v.wrong_ca, v.api_key = ca_cert, wrong_ca, api_key
    v.binary, v.tokens, v.no_role_token = binary, tokens, no_role_token
    v.state_user, v.state_password = state_user, state_password
    try:
        v.build()
        v.start("probe-listener-workers", "workers", [sys.executable, "-c", LISTEN_SCRIPT, PROBE_PORT, 600])
        v.start("probe-listener-internet", "internet", [sys.executable, "-c", LISTEN_SCRIPT, PROBE_PORT, 600])
        v.start("state", "state", ["redis-server", redis_conf])
        cfg = tmp / "haproxy.cfg"
        cfg.write_text(haproxy_config(tf))
        sh("haproxy", "-c", "-q", "-f", cfg)
        v.start("nlb", "nlb", ["haproxy", "-db", "-f", cfg])
        # roles/gateway.toml as shipped, on each gateway; the files it names are replaced: the certificate by flags,
        # each role's token by --worker-token-file-for (the credential copy the TOML names), the other secrets by
        # MESHD_* variables (what systemd/meshd-gateway.service sets to its credentials), the state store's settings
        # by what meshd-bootstrap writes to gateway.env (MESHD_STATE_URL, _USERNAME, _WAIT_REPLICAS; a single
        # redis-server here, not a cluster), and the test CA that signed redis-server's certificate.
        for name, ip in (("gw-a", GW_A), ("gw-b", GW_B)):
            creds = tmp / f"{name}-credentials"
            flags = gateway_token_flags(tokens, creds)
            (creds / "state-password").write_text(state_password)
            (creds / "state-password").chmod(0o600)
            v.start(name, name, [
                binary, "gateway", "--config", "roles/gateway.toml",
                "--http-addr", f"{ip}:{API_PORT}", "--mesh-addr", f"{ip}:{MESH_PORT}",
                "--tls-cert", gw_cert, "--mesh-tls-cert", gw_cert, "--data-dir", tmp / f"{name}-data",
                "--state-ca-file", ca_cert, "--log-format", "human", *flags,
            ], env_extra={
                "MESHD_API_KEYS_FILE": api_keys, "MESHD_TLS_KEY": gw_key, "MESHD_MESH_TLS_KEY": gw_key,
                "MESHD_STATE_PASSWORD_FILE": creds / "state-password",
                "MESHD_STATE_URL": f"rediss://{STATE_DNS}:{STATE_PORT}/0", "MESHD_STATE_USERNAME": state_user,
                "MESHD_STATE_WAIT_REPLICAS": "0",
            })
        # roles/caller.toml and infer.toml as shipped (gateway_url = "wss://gateways.meshd.internal:49134": both
        # gateways), with the test CA and each its own role's token.
        v.start("caller", "workers", [
            binary, "caller", "--config", "roles/caller.toml",
            "--gateway-ca", ca_cert, "--worker-token-file", tokens["caller"], "--log-format", "human",
        ])
        v.start("infer", "workers", [
            binary, "infer", "--config", "roles/infer.toml",
            "--gateway-ca", ca_cert, "--worker-token-file", tokens["infer"], "--model", model, "--log-format", "human",
        ])
        # The right token, the wrong trust: must not join.
        v.start(WRONG_CA_WORKER, "workers", [
            binary, "caller", "--config", "roles/caller.toml", "--name", WRONG_CA_WORKER,
            "--gateway-ca", wrong_ca, "--worker-token-file", tokens["caller"], "--log-format", "human",
        ])
        # The right token and CA over plain ws:// (the worker allows it; the gateways' mesh port speaks only TLS).
        v.start(PLAIN_WORKER, "workers", [
            binary, "caller", "--config", "roles/caller.toml", "--name", PLAIN_WORKER,
            "--gateway-url", f"ws://{GATEWAYS_FQDN}:{MESH_PORT}", "--allow-plaintext", "--gateway-ca", ca_cert,
            "--worker-token-file", tokens["caller"], "--log-format", "human",
        ])

        deadline = time.time() + READY_TIMEOUT_S
        while True:
            dead = {n: rc for n, rc in v.dead().items() if n in ("gw-a", "gw-b", "caller", "infer", "nlb", "state")}
            if dead:
                pytest.fail(f"a process exited before the fleet was ready: {dead}\n{v.report()}", pytrace=False)
            # Both gateways ready (seen from the NLB's host, which may reach them), and the NLB answering.
            ready = [v.http("nlb", "GET", f"{GATEWAY_API}/readyz", timeout=3, key=None, at=ip)["status"]
                     for ip in (GW_A, GW_B)]
            last = v.http("internet", "GET", f"{API}/readyz", timeout=3, key=None)
            if ready == [200, 200] and last["status"] == 200 and both_gateways_joined(v):
                break
            if time.time() > deadline:
                pytest.fail(f"the fleet was not ready within {READY_TIMEOUT_S} s (gateways {ready}, NLB {last})\n"
                            f"{v.report()}", pytrace=False)
            time.sleep(0.5)
        time.sleep(1.5)  # haproxy's checks (inter 500ms, rise 2) see both gateways up
        yield v
    finally:
        v.destroy()
        for ns in netns_list():
            if ns.startswith(f"{PREFIX}-{v.sfx}-"):
                print(f"warning: namespace {ns} survived cleanup; removing it again")
                kill_netns(ns)


def workers_status(vpc):
    """{worker name: sorted gateways it says it is joined to} from GET /status through the NLB (needs the key)."""
    r = vpc.http("internet", "GET", f"{API}/status")
    if r["status"] != 200:
        return {}
    out = {}
    for f in json.loads(r["body"])["functions"]:
        for w in f["workers"]:
            out[w["name"]] = sorted(w.get("gateways") or [])
    return out


def both_gateways_joined(vpc):
    status = workers_status(vpc)
    return all(any(GW_A in g for g in status.get(n, [])) and any(GW_B in g for g in status.get(n, []))
               for n in ("caller", "infer"))


def not_ready_hint(r):
    if r["status"] == 503 and "no_worker" in r["body"]:
        return ("\nHINT: GET /readyz answered 200 while a function behind this trigger had no live worker; DESIGN.md says "
                "/readyz means every trigger's function has a live worker AND the model is loaded (infer registered).")
    return ""


def add(vpc, a, b, key="default"):
    r = vpc.http("internet", "POST", f"{API}/math/add-two-numbers", {"a": a, "b": b}, key=key)
    assert r["status"] == 200, f"{r}{not_ready_hint(r)}\n{vpc.report()}"
    return json.loads(r["body"])


def test_add_two_numbers_from_the_internet_through_the_nlb(vpc):
    body = add(vpc, 100, 200)
    assert body["c"] == 300, f"{body}\n{vpc.report()}"
    assert isinstance(body["running_total"], int)


def test_chat_completion_from_the_internet_through_the_nlb(vpc):
    r = vpc.http("internet", "POST", f"{API}/v1/chat/completions",
                 {"messages": [{"role": "user", "content": "what color is apple?"}], "max_tokens": 16}, timeout=120)
    assert r["status"] == 200, f"{r}{not_ready_hint(r)}\n{vpc.report()}"
    body = json.loads(r["body"])
    assert body["choices"][0]["message"]["content"].strip(), body


def test_every_worker_joined_both_gateways_through_one_name(vpc):
    status = workers_status(vpc)
    for name in ("caller", "infer"):
        joined = status[name]
        assert len(joined) == 2 and any(GW_A in g for g in joined) and any(GW_B in g for g in joined), (name, status)
    # Each gateway sees both workers (its own view, asked directly from the NLB's host).
    for ip in (GW_A, GW_B):
        r = vpc.http("nlb", "GET", f"{GATEWAY_API}/status", at=ip)
        names = {w["name"] for f in json.loads(r["body"])["functions"] for w in f["workers"]}
        assert {"caller", "infer"} <= names, (ip, names)


def test_both_gateways_share_one_state(vpc):
    """An add through the NLB lands on one gateway or the other (round robin); the running total is one, in Redis."""
    totals = [add(vpc, 1, 1)["running_total"] for _ in range(4)]
    assert totals == list(range(totals[0], totals[0] + 8, 2)), totals
    served = {ip: requests_served(vpc, ip) for ip in (GW_A, GW_B)}
    assert all(n > 0 for n in served.values()), f"the NLB's stand-in did not use both gateways: {served}"


def requests_served(vpc, ip):
    """meshd_http_requests_total of POST /math/add-two-numbers on one gateway (asked from the NLB's host)."""
    r = vpc.http("nlb", "GET", f"{GATEWAY_API}/metrics", at=ip)
    assert r["status"] == 200, r
    return sum(float(m.group(1)) for m in re.finditer(
        r'^meshd_http_requests_total\{[^}]*add-two-numbers[^}]*status="200"[^}]*\} ([0-9.e+]+)$', r["body"], re.M))


# ---- the filters ------------------------------------------------------------------------------------------------------


def test_only_the_nlb_is_reachable_from_the_internet(vpc):
    targets = [f"{ip}:{p}" for ip in (GW_A, GW_B) for p in (API_PORT, MESH_PORT, 22)]
    targets += [f"{ip}:{p}" for ip in (CALLER_IP, INFER_IP) for p in (22, 80, API_PORT, MESH_PORT, PROBE_PORT)]
    targets += [f"{STATE_IP}:{STATE_PORT}", f"{NLB_IP}:{API_PORT}", f"{NLB_IP}:22"]
    got = vpc.probe("internet", targets)
    assert got == {t: "timeout" for t in targets}, got
    assert vpc.probe("internet", [f"{NLB_IP}:{NLB_PORT}"]) == {f"{NLB_IP}:{NLB_PORT}": "open"}


def test_workers_accept_no_inbound_even_from_inside_the_vpc(vpc):
    probe_targets = [f"{ip}:{PROBE_PORT}" for ip in (CALLER_IP, INFER_IP)]
    assert set(vpc.probe("workers", probe_targets).values()) == {"open"}
    targets = probe_targets + [f"{CALLER_IP}:{MESH_PORT}", f"{INFER_IP}:22"]
    for ns in ("gw-a", "gw-b", "nlb", "state", "rogue"):
        got = vpc.probe(ns, targets)
        assert got == {t: "timeout" for t in targets}, (ns, got)


def test_rogue_host_reaches_nothing_of_the_fleet(vpc):
    # The rogue host routes fine (it reaches the internet host) ...
    assert vpc.probe("rogue", [f"{INTERNET_IP}:{PROBE_PORT}"]) == {f"{INTERNET_IP}:{PROBE_PORT}": "open"}
    # ... but it is in no allowed CIDR and no security group.
    targets = [f"{NLB_IP}:{NLB_PORT}", f"{STATE_IP}:{STATE_PORT}"]
    targets += [f"{ip}:{p}" for ip in (GW_A, GW_B) for p in (API_PORT, MESH_PORT)]
    assert vpc.probe("rogue", targets) == {t: "timeout" for t in targets}


def test_workers_egress_only_to_the_mesh(vpc):
    targets = [f"{GW_A}:{API_PORT}", f"{GW_B}:{API_PORT}", f"{INTERNET_IP}:{PROBE_PORT}", f"{STATE_IP}:{STATE_PORT}",
               f"{NLB_IP}:{NLB_PORT}"]
    assert vpc.probe("workers", targets) == {t: "timeout" for t in targets}
    mesh = [f"{GW_A}:{MESH_PORT}", f"{GW_B}:{MESH_PORT}"]
    assert vpc.probe("workers", mesh) == {t: "open" for t in mesh}


def test_state_store_reachable_only_from_the_gateways(vpc):
    target = f"{STATE_IP}:{STATE_PORT}"
    for ns in ("gw-a", "gw-b"):
        assert vpc.probe(ns, [target]) == {target: "open"}, ns
    for ns in ("workers", "nlb", "rogue", "internet"):
        assert vpc.probe(ns, [target]) == {target: "timeout"}, ns


def test_the_nlb_reaches_the_gateways_api_port_only(vpc):
    api = [f"{GW_A}:{API_PORT}", f"{GW_B}:{API_PORT}"]
    assert vpc.probe("nlb", api) == {t: "open" for t in api}
    others = [f"{GW_A}:{MESH_PORT}", f"{GW_B}:{MESH_PORT}", f"{STATE_IP}:{STATE_PORT}", f"{CALLER_IP}:{PROBE_PORT}"]
    assert vpc.probe("nlb", others) == {t: "timeout" for t in others}


def test_the_state_store_holds_terraforms_acl(vpc):
    """redis-server holds terraform/state.tf's ACL: the default user is off; the gateways' user reaches meshd's keys
    (the running total is there) and nothing else, and no dangerous command."""
    cli = ["redis-cli", "--no-auth-warning", "--tls", "--cacert", vpc.ca, "-h", STATE_DNS, "-p", STATE_PORT]

    def run(*args, user=None):
        auth = ["--user", vpc.state_user, "--pass", vpc.state_password] if user else []
        p = sh(*cli, *auth, *args, ns=vpc.ns["gw-a"], check=False)
        return (p.stdout + p.stderr).strip()

    assert re.search(r"NOAUTH|Authentication required|NOPERM", run("PING")), "the default user must be off"
    assert run("PING", user=True) == "PONG"
    assert "meshd:" in run("SCAN", "0", "MATCH", "meshd:*", "COUNT", "1000", user=True)
    assert "NOPERM" in run("SET", "other:key", "1", user=True), "keys outside meshd:* are refused"
    assert "NOPERM" in run("CONFIG", "GET", "appendfsync", user=True), "no dangerous command"
    assert "NOPERM" in run("FLUSHALL", user=True)


# ---- API keys and TLS -------------------------------------------------------------------------------------------------


def assert_unauthorized(r, what, vpc):
    assert r["status"] == 401, f"{what}: {r}\n{vpc.report()}"
    err = json.loads(r["body"])["error"]  # OpenAI-style error object
    assert err["message"], (what, err)
    assert (err["type"], err["code"]) == ("authentication_error", "invalid_api_key"), (what, err)
    assert "c" not in json.loads(r["body"]) and "choices" not in r["body"], what


def test_api_without_a_key_is_401(vpc):
    assert_unauthorized(vpc.http("internet", "POST", f"{API}/math/add-two-numbers", {"a": 1, "b": 2}, key=None),
                        "no key", vpc)
    assert_unauthorized(vpc.http("internet", "POST", f"{API}/v1/chat/completions",
                                 {"messages": [{"role": "user", "content": "hi"}]}, key=None), "no key (chat)", vpc)
    for path in ("/v1/models", "/status", "/metrics"):
        assert_unauthorized(vpc.http("internet", "GET", f"{API}{path}", key=None), f"no key: GET {path}", vpc)
    r = vpc.http("internet", "GET", f"{API}/v1/models", key=None, headers=[f"Authorization: Basic {vpc.api_key}"])
    assert_unauthorized(r, "Basic instead of Bearer", vpc)
    # The probes stay open, for the load balancer and `until curl .../readyz`.
    for path in ("/healthz", "/readyz"):
        r = vpc.http("internet", "GET", f"{API}{path}", key=None)
        assert r["status"] == 200, (path, r)


def test_api_with_a_wrong_key_is_401(vpc):
    for wrong in ("wrong-" + vpc.api_key, vpc.api_key[:-1], vpc.api_key.upper(),
                  f"sha256:{hashlib.sha256(vpc.api_key.encode()).hexdigest()}"):
        r = vpc.http("internet", "POST", f"{API}/math/add-two-numbers", {"a": 1, "b": 2}, key=wrong)
        assert_unauthorized(r, f"wrong key {wrong[:12]}...", vpc)
    r = vpc.http("internet", "GET", f"{API}/v1/models")
    assert r["status"] == 200, r


def test_plain_http_through_the_nlb_fails(vpc):
    # TCP passthrough: plain http:// reaches meshd's TLS listener, which gives it no API answer.
    r = vpc.http("internet", "POST", f"http://{API_DNS}:{NLB_PORT}/math/add-two-numbers", {"a": 1, "b": 2}, ca=None)
    assert r["status"] in (None, 400), f"plain http got an HTTP answer: {r}"
    assert '"c"' not in r["body"] and "running_total" not in r["body"], r


def test_api_certificate_is_verified_against_the_ca(vpc):
    # The system trust store does not know the stack's CA, and another CA does not vouch for the gateways.
    for ca in (None, vpc.wrong_ca):
        r = vpc.http("internet", "GET", f"{API}/healthz", ca=ca, key=None)
        assert r["status"] is None, (ca, r)
        assert re.search(r"certificate|SSL", r["error"], re.I), (ca, r)
    # The CA it was issued from does: the certificate names the NLB's DNS name, TLS ends in meshd.
    assert vpc.http("internet", "GET", f"{API}/healthz", key=None)["status"] == 200


def live_worker_names(vpc) -> set[str]:
    return set(workers_status(vpc))


def wait_for_log(vpc, name, pattern, timeout=30):
    deadline = time.time() + timeout
    while time.time() < deadline:
        m = re.search(pattern, vpc.log(name), re.I | re.M)
        if m:
            return m
        time.sleep(0.5)
    return None


# rustls' verdict on a certificate from an unknown CA (e.g. "invalid peer certificate: UnknownIssuer").
TLS_FAILURE = r"cannot join the mesh.*(certificate|UnknownIssuer|unknown.?ca|invalid peer)"


def test_worker_with_the_wrong_ca_cannot_join(vpc):
    m = wait_for_log(vpc, WRONG_CA_WORKER, TLS_FAILURE)
    assert m, f"{WRONG_CA_WORKER} logged no certificate failure\n{vpc.report()}"
    log = vpc.log(WRONG_CA_WORKER)
    assert "not compiled" not in log and not re.search(r"joined the mesh", log), log
    assert live_worker_names(vpc) == {"caller", "infer"}


def test_plain_ws_worker_cannot_join(vpc):
    m = wait_for_log(vpc, PLAIN_WORKER, r"cannot join the mesh")
    assert m, f"{PLAIN_WORKER} logged no failure\n{vpc.report()}"
    assert not re.search(r"joined the mesh", vpc.log(PLAIN_WORKER)), vpc.log(PLAIN_WORKER)
    assert live_worker_names(vpc) == {"caller", "infer"}


def test_legitimate_workers_joined_over_tls(vpc):
    for name in ("caller", "infer"):
        assert re.search(r"joined the mesh.*wss://", vpc.log(name)), f"{name}\n{vpc.report()}"


# ---- one token per role -----------------------------------------------------------------------------------------------


def test_each_worker_joined_each_gateway_with_its_own_roles_token(vpc):
    for gw in ("gw-a", "gw-b"):
        log = vpc.log(gw)
        for name in ("caller", "infer"):
            joined = re.findall(rf"worker\{{[^}}]*\bworker={name}[ }}][^}}]*\brole={name}[ }}].*worker connected", log)
            assert joined, f"no `worker connected` of {name} as role {name} in {gw}'s log\n{vpc.report()}"
        assert not re.search(r"role=dev", log), "a worker joined with the dev token that grants every role"


def test_a_caller_holding_the_infer_token_is_refused(vpc):
    vpc.start(CROSS_ROLE_WORKER, "workers", [
        vpc.binary, "caller", "--config", "roles/caller.toml", "--name", CROSS_ROLE_WORKER,
        "--gateway-ca", vpc.ca, "--worker-token-file", vpc.tokens["infer"], "--log-format", "human",
    ])
    try:
        m = wait_for_log(vpc, CROSS_ROLE_WORKER, r"refused by the gateway.*outside the grant of role `infer`")
        assert m, f"{CROSS_ROLE_WORKER} was not refused by the infer role's grant\n{vpc.report()}"
        for gw in ("gw-a", "gw-b"):
            g = wait_for_log(vpc, gw, rf"worker={CROSS_ROLE_WORKER}[ }}][^}}]*\brole=infer[ }}].*worker refused")
            assert g, f"{gw} logged no refusal of {CROSS_ROLE_WORKER} as role infer\n{vpc.report()}"
    finally:
        vpc.stop(CROSS_ROLE_WORKER)
    assert live_worker_names(vpc) == {"caller", "infer"}
    assert add(vpc, 2, 3)["c"] == 5


def test_a_worker_with_a_token_of_no_role_cannot_join(vpc):
    vpc.start(NO_ROLE_WORKER, "workers", [
        vpc.binary, "caller", "--config", "roles/caller.toml", "--name", NO_ROLE_WORKER,
        "--gateway-ca", vpc.ca, "--worker-token-file", vpc.no_role_token, "--log-format", "human",
    ])
    try:
        m = wait_for_log(vpc, NO_ROLE_WORKER, r"cannot join the mesh.*wrong worker token")
        assert m, f"{NO_ROLE_WORKER} logged no refusal of its token\n{vpc.report()}"
        assert not re.search(r"joined the mesh", vpc.log(NO_ROLE_WORKER)), vpc.log(NO_ROLE_WORKER)
    finally:
        vpc.stop(NO_ROLE_WORKER)
    assert live_worker_names(vpc) == {"caller", "infer"}


# ---- failover: one gateway killed in the middle of a run (keep this test last: it leaves one gateway) -----------------

# A client of the API in the internet host: N adds, one new connection each (the load balancer picks a gateway per
# connection), each with its own Idempotency-Key; a request that gets no HTTP answer (the connection refused, reset
# or cut: the gateway it went to is gone) is sent again with the same key until it gets one, as docs/DEPLOY.md tells
# clients to. One JSON line per event on stdout.
FAILOVER_CLIENT = r"""
import http.client, json, socket, ssl, sys, time
host, ca, key, n, progress = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
ctx = ssl.create_default_context(cafile=ca)
for i in range(n):
    body = json.dumps({"a": i, "b": 1})
    headers = {"Authorization": "Bearer " + key, "Content-Type": "application/json",
               "Idempotency-Key": "failover-%d" % i, "Connection": "close"}
    deadline = time.time() + 60
    while True:
        t = time.time()
        try:
            c = http.client.HTTPSConnection(host, 443, context=ctx, timeout=30)
            c.request("POST", "/math/add-two-numbers", body, headers)
            r = c.getresponse()
            data = r.read().decode()
            c.close()
        except (OSError, http.client.HTTPException) as e:
            print(json.dumps({"i": i, "t": t, "error": type(e).__name__ + ": " + str(e)}), flush=True)
            if time.time() > deadline:
                sys.exit(1)
            time.sleep(0.1)
            continue
        print(json.dumps({"i": i, "t": t, "status": r.status, "body": data}), flush=True)
        if r.status == 200:
            break
        if time.time() > deadline:
            sys.exit(1)
        time.sleep(0.1)
    with open(progress, "w") as f:
        f.write(str(i + 1))
"""


def test_failover_one_gateway_killed_mid_run(vpc):
    n = 60
    r0 = add(vpc, 100, 200)["running_total"]  # the seed request; its total includes it
    progress = vpc.tmp / "failover-progress"
    out = vpc.tmp / "failover-client.jsonl"
    client = subprocess.Popen(
        ["ip", "netns", "exec", vpc.ns["internet"], sys.executable, "-c", FAILOVER_CLIENT, API_DNS, str(vpc.ca),
         vpc.api_key, str(n), str(progress)],
        stdout=open(out, "w"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 60
        while not (progress.exists() and progress.read_text() and int(progress.read_text()) >= n // 3):
            assert client.poll() is None, out.read_text()
            assert time.time() < deadline, f"the client made no progress\n{out.read_text()}\n{vpc.report()}"
            time.sleep(0.05)
        served_a = requests_served(vpc, GW_A)
        assert served_a > 0, "gateway a served nothing before it was killed"
        vpc.kill9("gw-a")
        killed = time.time()
        rc = client.wait(timeout=180)
    finally:
        if client.poll() is None:
            client.kill()
    events = [json.loads(line) for line in out.read_text().splitlines() if line.startswith("{")]
    assert rc == 0, f"the client gave up\n{out.read_text()}\n{vpc.report()}"
    ok = {e["i"]: json.loads(e["body"]) for e in events if e.get("status") == 200}
    assert sorted(ok) == list(range(n)), "every add answered"
    assert all(ok[i]["c"] == i + 1 for i in ok)
    failed = [e for e in events if e.get("status") != 200]
    # What failed is what went to the killed gateway: a connection without an HTTP answer, only until the load
    # balancer's health check took it out (haproxy: 2 failed checks 500 ms apart), never a wrong or 5xx answer.
    assert all("error" in e for e in failed), failed
    assert all(killed - 1 <= e["t"] <= killed + 5 for e in failed), (killed, failed)
    # The running total is exact: the seed, every add exactly once (a retried one replayed, not applied again),
    # and the final seed request, all through the surviving gateway's view of the one state.
    final = add(vpc, 100, 200)
    assert final["running_total"] == r0 + sum(i + 1 for i in range(n)) + 300, (r0, final, failed)
    # The survivor serves, the killed one does not.
    assert vpc.dead().get("gw-a") is not None and vpc.dead().get("gw-b") is None
    assert requests_served(vpc, GW_B) > 0
    # Chats keep succeeding through the NLB once it has taken the dead gateway out (it has: > 3 s since the kill).
    time.sleep(max(0.0, killed + 3 - time.time()))
    for _ in range(3):
        r = vpc.http("internet", "POST", f"{API}/v1/chat/completions",
                     {"messages": [{"role": "user", "content": "what color is apple?"}], "max_tokens": 8}, timeout=120)
        assert r["status"] == 200, f"{r}\n{vpc.report()}"
        assert json.loads(r["body"])["choices"][0]["message"]["content"].strip()
    # The workers stay joined to the survivor.
    status = workers_status(vpc)
    for name in ("caller", "infer"):
        assert any(GW_B in g for g in status.get(name, [])), status
