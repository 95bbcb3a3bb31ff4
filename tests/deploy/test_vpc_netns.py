"""The VPC of terraform/ rebuilt on one machine with network namespaces, veth pairs and nftables, and the real
meshd binary running its three roles in it.

    internet 198.51.100.10 ─┐
                            │          ┌─ public  10.20.1.10            (gateway;  SG "gateway" in nftables)
                         router ───────┼─ private 10.20.2.11, 10.20.2.12 (caller, infer; SG "workers")
    rogue    10.20.3.66  ───┘          │
                                       (router = VPC router + internet gateway; 10.20.1.10 stands in for the EIP;
                                        like AWS, nothing routes from the internet to the private subnet)

The nftables rules of each host namespace are generated from terraform/security_groups.tf (parsed with python-hcl2):
every aws_vpc_security_group_{ingress,egress}_rule of the groups the host's aws_instance is in, with allowed_api_cidrs
= 198.51.100.0/24 and the other variables at their defaults; a referenced security group becomes the addresses of
its instances here. Today that gives:
    gateway  in : tcp/3111 from allowed_api_cidrs (198.51.100.0/24); tcp/49134 from the workers only
            out : tcp/443
    workers  in : nothing
            out : tcp/49134 to the gateway; tcp/443
so a rule opened or widened in terraform/ opens it here too, and the probes below fail. A rule this generator cannot
mirror (IPv6, prefix lists, other protocols) fails the test instead of being left out. Blocked traffic is dropped
(like a security group), so a blocked connect times out; "refused" would mean the packet reached the host.

The three roles start from the shipped roles/*.toml, secured the way terraform/ and systemd/ deploy them: a
throwaway CA and gateway certificate (IP SAN 10.20.1.10, P-256, made with openssl like tls.tf makes them), HTTPS on
:3111 with an api-keys file of `sha256:<hex>` lines (the format of the SSM parameter), wss:// on :49134, workers
verifying the gateway with the CA. One worker token per role, as terraform/ makes them: the caller holds the caller
token, infer the infer token, and the gateway both, read from the paths of roles/gateway.toml's [worker_token_files]
(the unit's credentials directory, stood in for by a scratch directory filled from the unit's LoadCredential= lines:
--worker-token-file-for ROLE=<that directory>/<id>); it has no single token that grants every role. The key files
reach the gateway through MESHD_* variables, as the unit passes its credentials; meshd runs without systemd here, so
the units' sandbox settings are not exercised (they are checked statically only: test_systemd_units.py,
systemd-analyze). The internet host calls the API with `curl --cacert` and the bearer key; a key-less, a wrong-key
and a plain-http request are refused, workers with the wrong CA or plain ws:// never join, a caller holding the infer
token is refused by the infer role's grant, and a worker with a token of no role is refused at its hello.

Needs root, iproute2, nftables, curl and openssl, the release binary (env MESHD_BIN, default target/release/meshd)
and the model models/gemma3-270m-q4_k_m.gguf (scripts/fetch-model; env MESHD_TEST_MODEL overrides). Everything it
creates carries a unique name and is removed at the end, whatever happens.
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

from deploylib import REPO, Terraform

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

# Where each aws_instance of terraform/ runs here: (namespace, address).
HOSTS = {"gateway": ("public", GATEWAY_IP), "caller": ("private", CALLER_IP), "infer": ("private", INFER_IP)}
# Values for the variables without a default that rules read (the others take their defaults: no SSH).
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
    """{instance: [security group names]} from aws_instance.*.vpc_security_group_ids."""
    return {name: [_ref(v, "aws_security_group") for v in tf.resources["aws_instance"][name]["vpc_security_group_ids"]]
            for name in HOSTS}


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
    """{namespace: nftables ruleset} for the namespaces that hold instances: default drop both ways, replies allowed
    (security groups are stateful), plus one accept per rule of the instances' security groups."""
    groups_of = security_groups_of_hosts(tf)
    members = {}
    for host, groups in groups_of.items():
        for g in groups:
            members.setdefault(g, []).append(HOSTS[host][1])
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
    for ns in sorted({n for n, _ in HOSTS.values()}):
        hosts = [h for h, (n, _) in HOSTS.items() if n == ns]
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
        for ns, ruleset in nft_security_groups(Terraform()).items():
            (self.tmp / f"nft-{ns}.conf").write_text(ruleset)
            sh("nft", "-f", "-", ns=self.ns[ns], input=ruleset)

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

    def http(self, ns, method, url, body=None, timeout=10, ca="default", key="default", headers=()):
        """curl in a namespace: {"status": int or None (no HTTP answer), "body": str, "error": curl's stderr}.
        ca: a CA file for --cacert ("default": the test CA; None: curl's system trust store). key: the bearer key
        ("default": the valid one; None: no Authorization header)."""
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
        if body is not None:
            args += ["-H", "content-type: application/json", "--data-binary", json.dumps(body)]
        proc = sh(*args, url, ns=self.ns[ns], check=False, timeout=timeout + 20)
        text = out.read_text(errors="replace") if out.exists() else ""
        out.unlink(missing_ok=True)
        code = proc.stdout.strip()
        status = int(code) if code.isdigit() and code != "000" else None
        return {"status": status, "body": text, "error": proc.stderr.strip()}


# ---- PKI: what terraform/tls.tf makes, made here by openssl -----------------------------------------------------------


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


def make_gateway_cert(d: Path, ca_key: Path, ca_cert: Path) -> tuple[Path, Path]:
    """The gateway's P-256 key (PKCS#8, as private_key_pem_pkcs8) and its certificate signed by the CA, with the IP SAN
    the workers dial and serverAuth (tls_cert_request + tls_locally_signed_cert.gateway)."""
    key, cert, csr, ext = d / "gateway-key.pem", d / "gateway.pem", d / "gateway.csr", d / "gateway.ext"
    ext.write_text(f"basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n"
                   f"extendedKeyUsage=serverAuth\nsubjectAltName=IP:{GATEWAY_IP}\n"
                   "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n")
    openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", key)
    openssl("req", "-new", "-key", key, "-subj", "/O=meshd/CN=meshd-gateway", "-out", csr)
    openssl("x509", "-req", "-in", csr, "-CA", ca_cert, "-CAkey", ca_key, "-days", 2,
            "-set_serial", f"0x{os.urandom(8).hex()}", "-extfile", ext, "-out", cert)
    assert key.read_text().startswith("-----BEGIN PRIVATE KEY-----"), "PKCS#8, like Terraform's private_key_pem_pkcs8"
    return key, cert


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


@pytest.fixture(scope="module")
def vpc(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.fail("the network-namespace test needs root (ip netns, nftables)", pytrace=False)
    for tool in ("ip", "nft", "sysctl", "curl", "openssl"):
        if not shutil.which(tool):
            pytest.fail(f"{tool} is not installed (scripts/deploy-checks installs iproute2, nftables, procps, curl, "
                        "openssl)", pytrace=False)
    binary, model = meshd_bin(), model_path()
    remove_stale_namespaces()

    tmp = tmp_path_factory.mktemp("vpc")
    os.chmod(tmp, 0o700)
    # One token per worker role (random_password.worker_token[role]); the file each worker VM holds as
    # /etc/meshd/worker-token, and the gateway as /etc/meshd/tokens/<role>.
    tokens = {}
    for role in WORKER_ROLES:
        tokens[role] = tmp / f"{role}-token"
        tokens[role].write_text(os.urandom(24).hex())
        tokens[role].chmod(0o600)
    no_role_token = tmp / "no-role-token"
    no_role_token.write_text(os.urandom(24).hex())
    no_role_token.chmod(0o600)
    data = tmp / "gateway-data"
    data.mkdir()
    pki = tmp / "pki"
    pki.mkdir()
    ca_key, ca_cert = make_ca(pki, "meshd-test-ca")
    gw_key, gw_cert = make_gateway_cert(pki, ca_key, ca_cert)
    _, wrong_ca = make_ca(pki, "some-other-ca")
    # The api-keys file as the gateway's bootstrap writes it from SSM: digests only, one per line.
    api_key = os.urandom(24).hex()
    api_keys = tmp / "api-keys"
    api_keys.write_text(f"sha256:{hashlib.sha256(api_key.encode()).hexdigest()}\n")
    api_keys.chmod(0o600)

    v = Vpc(tmp)
    v.ca, v.wrong_ca, v.api_key = ca_cert, wrong_ca, api_key
    v.binary, v.tokens, v.no_role_token = binary, tokens, no_role_token
    try:
        v.build()
        # Listeners that show what the filters block: one on the workers' host, one on the internet host.
        v.start("probe-listener-private", "private", [sys.executable, "-c", LISTEN_SCRIPT, PROBE_PORT, 300])
        v.start("probe-listener-internet", "internet", [sys.executable, "-c", LISTEN_SCRIPT, PROBE_PORT, 300])
        # roles/gateway.toml as shipped; the files it names are replaced: the certificate by flags, each role's token
        # by --worker-token-file-for (the credential copy the TOML names), the other secrets by MESHD_* variables (what
        # systemd/meshd-gateway.service sets to its credentials). No MESHD_WORKER_TOKEN_FILE: start() passes no
        # MESHD_* of this environment, and the unit sets none.
        v.start("gateway", "public", [
            binary, "gateway", "--config", "roles/gateway.toml",
            "--http-addr", f"{GATEWAY_IP}:{API_PORT}", "--mesh-addr", f"{GATEWAY_IP}:{MESH_PORT}",
            "--tls-cert", gw_cert, "--mesh-tls-cert", gw_cert, "--data-dir", data, "--log-format", "human",
            *gateway_token_flags(tokens, tmp / "gateway-credentials"),
        ], env_extra={
            "MESHD_API_KEYS_FILE": api_keys, "MESHD_TLS_KEY": gw_key, "MESHD_MESH_TLS_KEY": gw_key,
        })
        # roles/caller.toml and infer.toml as shipped (gateway_url = "wss://10.20.1.10:49134"), with the test CA and
        # each its own role's token.
        v.start("caller", "private", [
            binary, "caller", "--config", "roles/caller.toml",
            "--gateway-ca", ca_cert, "--worker-token-file", tokens["caller"], "--log-format", "human",
        ])
        v.start("infer", "private", [
            binary, "infer", "--config", "roles/infer.toml",
            "--gateway-ca", ca_cert, "--worker-token-file", tokens["infer"], "--model", model, "--log-format", "human",
        ])
        # The right token, the wrong trust: must not join.
        v.start(WRONG_CA_WORKER, "private", [
            binary, "caller", "--config", "roles/caller.toml", "--name", WRONG_CA_WORKER,
            "--gateway-ca", wrong_ca, "--worker-token-file", tokens["caller"], "--log-format", "human",
        ])
        # The right token and CA over plain ws:// (the worker allows it; the gateway's mesh port speaks only TLS).
        v.start(PLAIN_WORKER, "private", [
            binary, "caller", "--config", "roles/caller.toml", "--name", PLAIN_WORKER,
            "--gateway-url", f"ws://{GATEWAY_IP}:{MESH_PORT}", "--allow-plaintext", "--gateway-ca", ca_cert,
            "--worker-token-file", tokens["caller"], "--log-format", "human",
        ])

        deadline = time.time() + READY_TIMEOUT_S
        last = None
        while True:
            dead = {n: rc for n, rc in v.dead().items() if n in ("gateway", "caller", "infer")}
            if dead:
                pytest.fail(f"meshd exited before it was ready: {dead}\n{v.report()}", pytrace=False)
            # /readyz needs no key.
            last = v.http("internet", "GET", f"https://{GATEWAY_IP}:{API_PORT}/readyz", timeout=3, key=None)
            if last["status"] == 200:
                break
            if time.time() > deadline:
                pytest.fail(f"GET https://.../readyz not 200 within {READY_TIMEOUT_S} s (last: {last})\n{v.report()}",
                            pytrace=False)
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
    r = vpc.http("internet", "POST", f"https://{GATEWAY_IP}:{API_PORT}/math/add-two-numbers", {"a": 100, "b": 200})
    assert r["status"] == 200, f"{r}{not_ready_hint(r)}\n{vpc.report()}"
    body = json.loads(r["body"])
    assert body["c"] == 300, f"{body}\n{vpc.report()}"


def test_chat_completion_from_the_internet(vpc):
    r = vpc.http("internet", "POST", f"https://{GATEWAY_IP}:{API_PORT}/v1/chat/completions",
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


# ---- API keys and TLS -------------------------------------------------------------------------------------------------

API = f"https://{GATEWAY_IP}:{API_PORT}"


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
    # Not a bearer token either.
    r = vpc.http("internet", "GET", f"{API}/v1/models", key=None, headers=[f"Authorization: Basic {vpc.api_key}"])
    assert_unauthorized(r, "Basic instead of Bearer", vpc)
    # The probes stay open, for load balancers and `until curl .../readyz`.
    for path in ("/healthz", "/readyz"):
        r = vpc.http("internet", "GET", f"{API}{path}", key=None)
        assert r["status"] == 200, (path, r)


def test_api_with_a_wrong_key_is_401(vpc):
    for wrong in ("wrong-" + vpc.api_key, vpc.api_key[:-1], vpc.api_key.upper(),
                  f"sha256:{hashlib.sha256(vpc.api_key.encode()).hexdigest()}"):
        r = vpc.http("internet", "POST", f"{API}/math/add-two-numbers", {"a": 1, "b": 2}, key=wrong)
        assert_unauthorized(r, f"wrong key {wrong[:12]}...", vpc)
    # The right key still works after all that (no lock-out, no state mixed up).
    r = vpc.http("internet", "GET", f"{API}/v1/models")
    assert r["status"] == 200, r


def test_plain_http_to_the_api_fails(vpc):
    # With the valid key, plain http:// must not get an answer from the API: the listener speaks only TLS.
    r = vpc.http("internet", "POST", f"http://{GATEWAY_IP}:{API_PORT}/math/add-two-numbers", {"a": 1, "b": 2}, ca=None)
    assert r["status"] in (None, 400), f"plain http got an HTTP answer: {r}"
    assert '"c"' not in r["body"] and "running_total" not in r["body"], r
    r = vpc.http("internet", "GET", f"http://{GATEWAY_IP}:{API_PORT}/healthz", ca=None, key=None)
    assert r["status"] in (None, 400), f"plain http got an HTTP answer: {r}"


def test_api_certificate_is_verified_against_the_ca(vpc):
    # The system trust store does not know the stack's CA, and another CA does not vouch for the gateway.
    for ca in (None, vpc.wrong_ca):
        r = vpc.http("internet", "GET", f"{API}/healthz", ca=ca, key=None)
        assert r["status"] is None, (ca, r)
        assert re.search(r"certificate|SSL", r["error"], re.I), (ca, r)
    # The CA it was issued from does (the IP SAN 10.20.1.10 matches the URL).
    assert vpc.http("internet", "GET", f"{API}/healthz", key=None)["status"] == 200


def live_worker_names(vpc) -> set[str]:
    """Names of the workers behind any function in GET /status (which needs the key)."""
    r = vpc.http("internet", "GET", f"{API}/status")
    assert r["status"] == 200, r
    return {w["name"] for f in json.loads(r["body"])["functions"] for w in f["workers"]}


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


def test_each_worker_joined_with_its_own_roles_token(vpc):
    """The gateway knows each worker's role by its token (the span of every worker connection names it): the caller
    joined as role caller, infer as role infer, and nothing joined with a token that grants every role."""
    log = vpc.log("gateway")
    for name in ("caller", "infer"):
        joined = re.findall(rf"worker\{{[^}}]*\bworker={name}[ }}][^}}]*\brole={name}[ }}].*worker connected", log)
        assert joined, f"no `worker connected` of {name} as role {name} in the gateway's log\n{vpc.report()}"
    assert not re.search(r"role=dev", log), "a worker joined with the dev token that grants every role"


def test_a_caller_holding_the_infer_token_is_refused(vpc):
    """The infer token grants the infer role only: a caller that presents it is authenticated as role infer, and its
    first registration (a caller function) is outside that grant, so the gateway refuses it and disconnects it."""
    vpc.start(CROSS_ROLE_WORKER, "private", [
        vpc.binary, "caller", "--config", "roles/caller.toml", "--name", CROSS_ROLE_WORKER,
        "--gateway-ca", vpc.ca, "--worker-token-file", vpc.tokens["infer"], "--log-format", "human",
    ])
    try:
        m = wait_for_log(vpc, CROSS_ROLE_WORKER, r"refused by the gateway.*outside the grant of role `infer`")
        assert m, f"{CROSS_ROLE_WORKER} was not refused by the infer role's grant\n{vpc.report()}"
        g = wait_for_log(vpc, "gateway", rf"worker={CROSS_ROLE_WORKER}[ }}][^}}]*\brole=infer[ }}].*worker refused")
        assert g, f"the gateway logged no refusal of {CROSS_ROLE_WORKER} as role infer\n{vpc.report()}"
    finally:
        vpc.stop(CROSS_ROLE_WORKER)
    assert live_worker_names(vpc) == {"caller", "infer"}
    # The API still works: the refused worker took nothing over.
    r = vpc.http("internet", "POST", f"{API}/math/add-two-numbers", {"a": 2, "b": 3})
    assert r["status"] == 200 and json.loads(r["body"])["c"] == 5, r


def test_a_worker_with_a_token_of_no_role_cannot_join(vpc):
    vpc.start(NO_ROLE_WORKER, "private", [
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
