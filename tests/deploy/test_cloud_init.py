"""cloud-init/meshd.yaml.tftpl rendered the way Terraform's templatefile() does, for every role, then checked
by `cloud-init schema`; the files it carries are exactly the repo's roles/, systemd/ and bootstrap script, plus one
public TLS file (the gateway's certificate on the gateway, the CA on the workers), and no secret."""
import base64
import gzip
import json
import re
import shutil
import subprocess
import tomllib

import pytest
import yaml

from deploylib import (BOOTSTRAP, CLOUD_INIT_TEMPLATE, DRAIN_WATCH, REPO, ROLES, SYSTEMD_DIR, render_template,
                       require_terraform, template_variables, terraform_console)

TEST_TOKEN = "tok-SENTINEL-0123456789abcdef"  # must never show up in user data
TEST_GATEWAY_CERT = "-----BEGIN CERTIFICATE-----\nTEST-GATEWAY-CERTIFICATE\n-----END CERTIFICATE-----\n"
TEST_CA_CERT = "-----BEGIN CERTIFICATE-----\nTEST-MESH-CA-CERTIFICATE\n-----END CERTIFICATE-----\n"
# The public TLS file each role gets, at the path its roles/<role>.toml names.
TLS_FILES = {
    "gateway": ("/etc/meshd/tls/gateway.pem", TEST_GATEWAY_CERT),
    "caller": ("/etc/meshd/tls/mesh-ca.pem", TEST_CA_CERT),
    "infer": ("/etc/meshd/tls/mesh-ca.pem", TEST_CA_CERT),
}


def user_data_bytes(rendered):
    """What EC2 counts: Terraform sends the cloud-config gzipped (base64gzip), which cloud-init unpacks."""
    return len(gzip.compress(rendered.encode(), mtime=0))


def gz_b64(path):
    """Terraform's base64gzip(file(path))."""
    return gz_b64_text(path.read_text())


def gz_b64_text(text):
    """Terraform's base64gzip(string)."""
    return base64.b64encode(gzip.compress(text.encode(), mtime=0)).decode()


# The SSM parameters each role reads at boot: a worker its own role's token, the gateway every role's token.
TOKEN_PARAMETERS = {"caller": "/meshd/worker-token/caller", "infer": "/meshd/worker-token/infer"}


def test_values(role):
    """The same keys Terraform passes (local.cloud_init_common + local.cloud_init_role[role] + role, config_gz_b64,
    unit_gz_b64), with test values."""
    gateway = role == "gateway"
    infer = role == "infer"
    tls_path, tls_pem = TLS_FILES[role]
    return {
        "region": "us-east-1",
        "token_parameter": "" if gateway else TOKEN_PARAMETERS[role],
        "caller_token_parameter": TOKEN_PARAMETERS["caller"] if gateway else "",
        "infer_token_parameter": TOKEN_PARAMETERS["infer"] if gateway else "",
        "api_keys_parameter": "/meshd/api-keys" if gateway else "",
        "tls_key_parameter": "/meshd/gateway-tls-key" if gateway else "",
        "state_password_parameter": "/meshd/state-password" if gateway else "",
        "metrics_key_parameter": "/meshd/metrics-key" if gateway else "",
        "tls_pem_path": tls_path,
        "tls_pem_gz_b64": gz_b64_text(tls_pem),
        "binary_s3_uri": "s3://meshd-artifacts-test/meshd/" + "a" * 64 + "/meshd",
        "binary_url": "",
        "binary_sha256": "a" * 64,
        "gateway_url": "wss://gateways.meshd.internal:49134",
        "log_group": "/meshd/journal",
        "state_url": "rediss://clustercfg.meshd-state.abc123.memorydb.us-east-1.amazonaws.com:6379/0" if gateway else "",
        "state_username": "meshd-gateway" if gateway else "",
        "state_cluster": "true" if gateway else "",
        "state_wait_replicas": "0" if gateway else "",
        "metrics_log_group": "/meshd/metrics" if gateway else "",
        "metrics_namespace": "meshd/meshd" if gateway else "",
        "model_s3_uri": f"s3://meshd-artifacts-test/models/{MODEL_SHA256}/model.gguf" if infer else "",
        "model_sha256": MODEL_SHA256 if infer else "",
        "infer_generator": "llama.cpp" if infer else "",
        "upstream_url": "",
        "bootstrap_gz_b64": gz_b64(BOOTSTRAP),
        "drain_gz_b64": gz_b64(DRAIN_WATCH),
        "drain_unit_gz": gz_b64(SYSTEMD_DIR / "meshd-drain-watch.service"),
        "role": role,
        "config_gz_b64": gz_b64(REPO / "roles" / f"{role}.toml"),
        "unit_gz_b64": gz_b64(SYSTEMD_DIR / f"meshd-{role}.service"),
    }


MODEL_SHA256 = "0ef57d2c838458a1952664260dcba38e5bdda37494f3af732f06e4add24068e3"
test_values.__test__ = False  # a helper, not a test


def terraform_template_keys(tf):
    """Keys Terraform passes to templatefile(): local.cloud_init_common, local.cloud_init_role[role] (the same keys
    for every role) plus the merge()d literal object."""
    keys = set(tf.locals["cloud_init_common"])
    assert not set(keys) & {"token_parameter", "caller_token_parameter", "infer_token_parameter"}, \
        "which worker token a VM reads depends on its role: local.cloud_init_role, never the common keys"
    role_keys = {r: set(tf.resolve(v)) for r, v in tf.locals["cloud_init_role"].items()}
    assert set(role_keys) == set(ROLES)
    assert len({frozenset(k) for k in role_keys.values()}) == 1, f"every role must get the same keys: {role_keys}"
    keys |= role_keys["gateway"]
    expr = tf.locals["user_data"]
    assert "cloud-init/meshd.yaml.tftpl" in expr
    m = re.search(r"merge\(local\.cloud_init_common, local\.cloud_init_role\[role\], \{(.*)\}\)\)", expr)
    assert m, expr
    keys |= set(re.findall(r"(?:^|, )([a-z_0-9]+) = ", m.group(1)))
    return keys


@pytest.fixture(scope="module")
def cloud_init_bin():
    exe = shutil.which("cloud-init")
    assert exe, "cloud-init is not installed (scripts/deploy-checks installs it: apt-get install cloud-init)"
    return exe


def test_template_variables_match_terraform(tf):
    used = template_variables(CLOUD_INIT_TEMPLATE.read_text())
    passed = terraform_template_keys(tf)
    assert used == passed, f"template uses {sorted(used - passed)} not passed; passed but unused {sorted(passed - used)}"
    assert used == set(test_values("gateway"))
    # Secrets travel as SSM parameter names only: no token, key or password value goes into user data.
    for k in passed:
        if re.search(r"token|key|secret|password", k):
            assert k.endswith("_parameter"), f"{k}: only the names of SSM parameters may go into user data"


@pytest.mark.parametrize("role", ROLES)
def test_rendered_cloud_config_is_valid(role, tmp_path, cloud_init_bin):
    rendered = render_template(CLOUD_INIT_TEMPLATE.read_text(), test_values(role))
    assert rendered.startswith("#cloud-config\n")
    assert user_data_bytes(rendered) < 16384, "EC2 user data is limited to 16 KiB (Terraform sends it gzipped)"
    path = tmp_path / f"{role}.yaml"
    path.write_text(rendered)
    proc = subprocess.run([cloud_init_bin, "schema", "--config-file", str(path)], capture_output=True, text=True, timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "Valid cloud-config" in out, out
    assert "deprecat" not in out.lower(), out


@pytest.mark.parametrize("role", ROLES)
def test_rendered_files_are_the_repo_files(role):
    doc = yaml.safe_load(render_template(CLOUD_INIT_TEMPLATE.read_text(), test_values(role)))
    files = {f["path"]: f for f in doc["write_files"]}

    def content(path):
        f = files[path]
        if f.get("encoding") == "gz+b64":
            return gzip.decompress(base64.b64decode(f["content"]))
        assert "encoding" not in f, f
        return f["content"].encode()

    tls_path, tls_pem = TLS_FILES[role]
    assert set(files) == {"/etc/meshd/bootstrap.env", f"/etc/meshd/{role}.toml", tls_path,
                          f"/etc/systemd/system/meshd-{role}.service", "/usr/local/sbin/meshd-bootstrap",
                          "/etc/systemd/system/meshd-drain-watch.service", "/usr/local/sbin/meshd-drain-watch",
                          "/var/lib/cloud/scripts/per-boot/50-meshd-bootstrap"}
    assert content("/usr/local/sbin/meshd-drain-watch") == DRAIN_WATCH.read_bytes()
    assert files["/usr/local/sbin/meshd-drain-watch"]["permissions"] == "0755"
    assert content("/etc/systemd/system/meshd-drain-watch.service") == \
        (SYSTEMD_DIR / "meshd-drain-watch.service").read_bytes()
    assert content(f"/etc/meshd/{role}.toml") == (REPO / "roles" / f"{role}.toml").read_bytes()
    assert content(f"/etc/systemd/system/meshd-{role}.service") == (SYSTEMD_DIR / f"meshd-{role}.service").read_bytes()
    assert content("/usr/local/sbin/meshd-bootstrap") == BOOTSTRAP.read_bytes()
    assert files["/usr/local/sbin/meshd-bootstrap"]["permissions"] == "0755"
    # The one TLS file: public, at the path the role's TOML names.
    assert content(tls_path).decode() == tls_pem
    assert files[tls_path]["permissions"] == "0644"
    cfg = tomllib.loads((REPO / "roles" / f"{role}.toml").read_text())
    if role == "gateway":
        assert cfg["tls_cert"] == cfg["mesh_tls_cert"] == tls_path
    else:
        assert cfg["gateway_ca"] == tls_path
    hook = content("/var/lib/cloud/scripts/per-boot/50-meshd-bootstrap").decode()
    assert "exec /usr/local/sbin/meshd-bootstrap" in hook
    env = content("/etc/meshd/bootstrap.env").decode()
    assert f"MESHD_ROLE='{role}'" in env
    assert "MESHD_GATEWAY_URL='wss://gateways.meshd.internal:49134'" in env
    assert "MESHD_LOG_GROUP='/meshd/journal'" in env
    assert files["/etc/meshd/bootstrap.env"]["permissions"] == "0600"
    # Nothing that looks like a secret: only the parameters' names.
    assert TEST_TOKEN not in json.dumps(doc)
    assert "PRIVATE KEY" not in json.dumps(doc) and "PRIVATE KEY" not in tls_pem
    if role == "gateway":
        # Every worker role's token (each grants only its role), never a single token for all roles.
        assert "MESHD_TOKEN_PARAMETER=''" in env
        assert "MESHD_CALLER_TOKEN_PARAMETER='/meshd/worker-token/caller'" in env
        assert "MESHD_INFER_TOKEN_PARAMETER='/meshd/worker-token/infer'" in env
        assert "MESHD_API_KEYS_PARAMETER='/meshd/api-keys'" in env
        assert "MESHD_TLS_KEY_PARAMETER='/meshd/gateway-tls-key'" in env
        assert "MESHD_STATE_PASSWORD_PARAMETER='/meshd/state-password'" in env
        assert "MESHD_METRICS_KEY_PARAMETER='/meshd/metrics-key'" in env
        assert "MESHD_STATE_URL='rediss://" in env and "MESHD_STATE_CLUSTER='true'" in env
        assert "MESHD_MODEL_S3_URI=''" in env
    else:
        # Its own role's token only.
        assert f"MESHD_TOKEN_PARAMETER='/meshd/worker-token/{role}'" in env
        assert "MESHD_CALLER_TOKEN_PARAMETER=''" in env and "MESHD_INFER_TOKEN_PARAMETER=''" in env
        assert "MESHD_API_KEYS_PARAMETER=''" in env and "MESHD_TLS_KEY_PARAMETER=''" in env
        assert "MESHD_STATE_PASSWORD_PARAMETER=''" in env and "MESHD_METRICS_KEY_PARAMETER=''" in env
        assert "MESHD_STATE_URL=''" in env
        assert ("MESHD_MODEL_S3_URI='s3://" in env) == (role == "infer")
    for path in files:
        for secret in ("worker-token", "tokens/", "api-keys", "key.pem", "-key", "password"):
            assert secret not in path, f"{path}: secret files are written at boot from SSM, not by cloud-init"


def test_role_configs_reference_secret_files_not_secrets():
    for role in ROLES:
        text = (REPO / "roles" / f"{role}.toml").read_text()
        cfg = tomllib.loads(text)
        if role == "gateway":
            # One token per worker role, each from its own file; no single token that grants every role.
            assert set(cfg["worker_token_files"]) == {"caller", "infer"}, cfg.get("worker_token_files")
            assert "worker_token_file" not in cfg and "worker_tokens" not in cfg, role
        else:
            assert cfg["worker_token_file"] == "/etc/meshd/worker-token", role
            assert "worker_token_files" not in cfg and "worker_tokens" not in cfg, role
        assert "worker_token" not in cfg, f"roles/{role}.toml must not carry a token"
        assert not re.search(r"^api_keys\s*=", text, re.M), f"roles/{role}.toml must not carry API keys"
        assert "allow_plaintext" not in text and "insecure_no_auth" not in text, role
    gw = tomllib.loads((REPO / "roles" / "gateway.toml").read_text())
    # The paths meshd-bootstrap writes and the gateway unit loads as credentials (the tokens: their copies, which the
    # TOML names; test_systemd_units.py ties each to its LoadCredential=).
    assert gw["api_keys_file"] == "/etc/meshd/api-keys"
    assert gw["tls_key"] == gw["mesh_tls_key"] == "/etc/meshd/tls/gateway-key.pem"
    assert gw["worker_token_files"] == {r: f"/run/credentials/meshd-gateway.service/{r}-token" for r in ("caller", "infer")}
    bootstrap = BOOTSTRAP.read_text()
    assert 'GATEWAY_KEY=$TLS_DIR/gateway-key.pem' in bootstrap and 'TLS_DIR=$ETC/tls' in bootstrap
    assert '"$ETC/api-keys"' in bootstrap
    assert 'TOKENS_DIR=$ETC/tokens' in bootstrap
    for r in ("caller", "infer"):
        assert f'"$TOKENS_DIR/{r}" raw' in bootstrap, r


@pytest.mark.parametrize("script", [BOOTSTRAP, DRAIN_WATCH], ids=lambda p: p.name)
def test_bootstrap_script_syntax(script):
    subprocess.run(["bash", "-n", str(script)], check=True)
    sc = shutil.which("shellcheck")
    assert sc, "shellcheck is not installed (scripts/deploy-checks installs it)"
    proc = subprocess.run([sc, "-S", "warning", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# ---- what a Terraform variable can put into user data --------------------------------------------------------------
# bootstrap.env is sourced by bash and quotes every value in single quotes; it travels inside a YAML block scalar. So a
# value that reaches it must not hold a single quote (ends the quoting), a line break (ends the block scalar) or a
# character YAML refuses. The Terraform variable validations are what keep such values out.

# Every string variable whose value reaches user data, as a valid value with {} where a character goes in. Numbers
# (gateway_private_ip_hostnum, the certificates' validity days) cannot hold one.
USER_DATA_VARIABLES = {
    "region": "us-east-1{}",
    "name": "meshd{}x",
    "meshd_binary_url": "https://example.com/meshd{}",
    "meshd_binary_sha256": "a" * 64 + "{}",
    "model_sha256": "b" * 64 + "{}",
    "infer_upstream_url": "http://127.0.0.1:80{}",
    "memorydb_node_type": "db.t4g.small{}",
    "elasticache_node_type": "cache.t4g.small{}",
    "state_backend": "memorydb{}",
}
# Variables that reach user data only through a function that does not pass their text on (or, for the walker below,
# through a resource it must take whole: the state store's endpoint is AWS's name, not the variable's text).
NOT_IN_USER_DATA_AS_TEXT = {
    "meshd_binary_path": "only filesha256() of the file reaches user data",
    "infer_gpu_instance_types": "only its length reaches user data (local.infer_gpu: which generator infer runs)",
    "availability_zones": "the state store's subnets, taken whole by the walker; its endpoint is AWS's name",
    "public_subnet_cidrs": "the zones' count, and security groups taken whole; the state store's endpoint is AWS's",
    "vpc_cidr": "the VPC of the security groups taken whole; the state store's endpoint is AWS's name",
}

# Each breaks bootstrap.env's quoting or the YAML around it.
BREAKING = {"single quote": "'", "newline": "\n", "CR": "\r", "form feed": "\f",
            "CR LF then a YAML key": "\r\nruncmd: [id]"}
# Harmless inside single quotes, but no URL, region, name, digest or CIDR holds them: refused all the same.
ALSO_REFUSED = {"double quote": '"', "space": " ", "tab": "\t"}
# These break the cloud-config too (YAML refuses C0 controls and DEL; YAML 1.1 reads NEL, LS and PS as line breaks:
# the cloud-config no longer parses). A URL validation of [^\s'"] let them through (RE2's \s is only [\t\n\f\r ]);
# the URLs are now printable ASCII without quotes (^https://[!#-&(-~]+$).
ACCEPTED_BUT_BREAKING = {"vertical tab": "\v", "ESC": "\x1b", "DEL": "\x7f", "NEL": "\x85", "LS": "\u2028",
                         "PS": "\u2029"}
# Accepted and harmless inside single quotes: a value holding them reaches the bootstrap unchanged.
HARMLESS = "$(id)`id`${HOME}\\;&|<>#!*?~%"


def user_data_variable_names(tf):
    """var.* names the user data depends on: through locals, and through the resources it references: the attribute
    it reads where the resource sets it (the SSM parameters' names are /<name>/...), else the whole resource (the
    bucket's id comes from its prefix <name>-artifacts-)."""
    seen, names = set(), set()
    todo = [json.dumps(tf.locals["user_data"])]
    while todo:
        text = tf.expand_locals(todo.pop())
        names |= set(re.findall(r"\bvar\.([a-z_0-9]+)", text))
        # aws_x.name.attr, or aws_x.name["key"].attr (for_each; the body is the same for every key).
        for m in re.finditer(r'\b((?:aws|random|tls)_[a-z0-9_]+)\.([a-z0-9_]+)(?:\[[^\]]*\])?\.([a-z0-9_]+)', text):
            ref = m.group(0)
            rtype, rname, attr = m.groups()
            body = tf.resources.get(rtype, {}).get(rname)
            if body is not None and ref not in seen:
                seen.add(ref)
                todo.append(json.dumps(body.get(attr, body)))
    return names


def test_every_user_data_variable_is_covered(tf):
    names = user_data_variable_names(tf)
    strings = {n for n in names if "string" in str(tf.variables[n]["type"])}
    assert strings == set(USER_DATA_VARIABLES) | set(NOT_IN_USER_DATA_AS_TEXT), (
        "a string variable reaches user data: give it a validation that refuses quotes, whitespace and control "
        f"characters, and add it to USER_DATA_VARIABLES (found {sorted(strings)})")
    others = {n: tf.variables[n]["type"] for n in names - strings}
    assert all(t in ("number", "${number}") for t in others.values()), f"neither string nor number: {others}"


def test_bootstrap_env_single_quotes_every_value():
    doc = CLOUD_INIT_TEMPLATE.read_text()
    m = re.search(r"- path: /etc/meshd/bootstrap\.env\n(?:\s+\w+: .*\n)*?\s+content: \|\n((?:      .*\n)+)", doc)
    assert m, "bootstrap.env is no longer a block scalar in the template"
    for line in m.group(1).splitlines():
        assert re.fullmatch(r"      [A-Z][A-Z0-9_]*='\$\{[a-z_0-9]+\}'", line), f"not '${{value}}': {line!r}"


def user_data_variables_with(char, names=tuple(USER_DATA_VARIABLES)):
    tf_vars = {"allowed_api_cidrs": ["203.0.113.7/32"]}
    tf_vars.update({name: USER_DATA_VARIABLES[name].format(char) for name in names})
    return tf_vars


def validation_batches(tf):
    """USER_DATA_VARIABLES in groups that can be checked in one `terraform console`: Terraform skips a validation that
    reads another variable whose value is invalid (meshd_binary_sha256's reads meshd_binary_url), so no variable shares
    a group with one its validations read."""
    def reads(name):
        return set(re.findall(r"\bvar\.([a-z_0-9]+)", json.dumps(tf.variables[name].get("validation", [])))) - {name}

    groups = []
    for name in USER_DATA_VARIABLES:
        group = next((g for g in groups if not any(o in reads(name) or name in reads(o) for o in g)), None)
        if group is None:
            groups.append(group := [])
        group.append(name)
    return groups


def refused_variables(tf_vars_dir, tf_vars):
    """The variables `terraform console` reports an invalid value for (it reports every one, not just the first)."""
    exe, d = tf_vars_dir
    _, err = terraform_console(exe, d, "var.region", tf_vars)
    if err is None:
        return set()
    refused = set()
    for diag in re.split(r"(?m)^\s*Error: ", err)[1:]:
        m = re.search(r'variable "([a-z_0-9]+)"', diag)
        assert diag.startswith("Invalid value for variable") and m, f"unexpected error:\n{err}"
        refused.add(m.group(1))
    return refused


def test_user_data_variables_accept_their_valid_values(tf_vars_dir):
    assert refused_variables(tf_vars_dir, user_data_variables_with("")) == set()


@pytest.mark.parametrize("char", [
    *(pytest.param(c, id=name) for name, c in {**BREAKING, **ALSO_REFUSED}.items()),
    *(pytest.param(c, id=name) for name, c in ACCEPTED_BUT_BREAKING.items()),
])
def test_user_data_variables_refuse_breaking_characters(tf, tf_vars_dir, char):
    accepted = set()
    for names in validation_batches(tf):
        accepted |= set(names) - refused_variables(tf_vars_dir, user_data_variables_with(char, names))
    assert not accepted, f"accepted with {char!r}: {sorted(accepted)}"


def test_breaking_characters_do_break_the_cloud_config(tmp_path):
    """The cases above matter: each character, in a URL, breaks bootstrap.env or the YAML around it."""
    for char in [*BREAKING.values(), *ACCEPTED_BUT_BREAKING.values()]:
        values = {**test_values("infer"), "binary_url": f"https://example.com/meshd{char}"}
        assert sourced_binary_url(render_template(CLOUD_INIT_TEMPLATE.read_text(), values), tmp_path) != \
            values["binary_url"], repr(char)


def sourced_binary_url(rendered, tmp_path):
    """MESHD_BINARY_URL as the bootstrap sees it after `. bootstrap.env`; None when the cloud-config does not parse."""
    try:
        doc = yaml.safe_load(rendered)
    except yaml.YAMLError:
        return None
    env = tmp_path / "bootstrap.env"
    env.write_text(next(f["content"] for f in doc["write_files"] if f["path"] == "/etc/meshd/bootstrap.env"))
    proc = subprocess.run(["bash", "-c", '. "$1" && printf %s "$MESHD_BINARY_URL"', "-", env], capture_output=True,
                          text=True, timeout=30)
    return proc.stdout if proc.returncode == 0 else None


def test_accepted_shell_characters_reach_the_bootstrap_unchanged(tf_vars_dir, tmp_path):
    url = f"https://example.com/{HARMLESS}"
    assert refused_variables(tf_vars_dir, {**user_data_variables_with(""), "meshd_binary_url": url}) == set()
    values = {**test_values("infer"), "binary_url": url}
    assert sourced_binary_url(render_template(CLOUD_INIT_TEMPLATE.read_text(), values), tmp_path) == url


# ---- the same, rendered by the real Terraform ------------------------------------------------------------------------


def decoded(doc):
    """A cloud-config with every gz+b64 file decoded, so two renderings compare whatever the gzip bytes."""
    for f in doc.get("write_files", []):
        if f.get("encoding") == "gz+b64":
            f["content"] = gzip.decompress(base64.b64decode(f["content"])).decode()
            f["encoding"] = "decoded"
    return doc


@pytest.fixture(scope="module")
def terraform_rendered(tf, tmp_path_factory):
    """local.user_data of terraform/instances.tf, evaluated by `terraform console` in a scratch module that has the
    exact same expression, local.cloud_init_common and local.cloud_init_role with test values in place of resources
    and variables."""
    exe = require_terraform()
    root = tmp_path_factory.mktemp("tfrender")
    for d in ("cloud-init", "roles", "systemd"):
        (root / d).symlink_to(REPO / d)
    mod = root / "terraform"
    mod.mkdir()

    def expr(value):
        assert value.startswith("${") and value.endswith("}"), value
        return value[2:-1]

    def literal_or_test_value(key, value, values, indent="    "):
        if re.search(r"\b(var|local|aws_[a-z_]+|random_[a-z_]+|tls_[a-z_]+)\.", value):
            return f"{indent}{key} = {json.dumps(values[key])}"
        return f"{indent}{key} = {expr(value) if value.startswith('${') else json.dumps(value)}"

    def local_object(name, values):
        body = [literal_or_test_value(k, v, values) for k, v in tf.locals[name].items()]
        return f"  {name} = {{\n" + "\n".join(body) + "\n  }\n"

    def role_object(role):
        """local.cloud_init_role[role], an object literal per role: its references become the role's test values, its
        literals (a worker's empty gateway parameters, the TLS file's path) stay as Terraform has them."""
        obj = tf.locals["cloud_init_role"][role]
        assert isinstance(obj, dict), f"local.cloud_init_role.{role} is no longer an object literal: {obj!r}"
        body = [literal_or_test_value(k, v, test_values(role), indent="      ") for k, v in obj.items()]
        return f"    {role} = {{\n" + "\n".join(body) + "\n    }"

    roles = json.dumps(tf.locals["roles"])
    role_map = "\n".join(role_object(r) for r in tf.locals["cloud_init_role"])
    (mod / "main.tf").write_text(
        "locals {\n"
        f"  roles = {roles}\n"
        + local_object("cloud_init_common", test_values("gateway"))
        + "  cloud_init_role = {\n" + role_map + "\n  }\n"
        f"  user_data = {expr(tf.locals['user_data'])}\n"
        "}\n"
    )
    out, err = terraform_console(exe, mod, "base64encode(jsonencode(local.user_data))")
    assert err is None, f"{err}\n{(mod / 'main.tf').read_text()}"
    return json.loads(base64.b64decode(json.loads(out)))


def test_terraform_renders_what_the_test_renderer_renders(terraform_rendered):
    assert set(terraform_rendered) == set(ROLES)
    for role in ROLES:
        ours = render_template(CLOUD_INIT_TEMPLATE.read_text(), test_values(role))
        theirs = terraform_rendered[role]
        assert decoded(yaml.safe_load(theirs)) == decoded(yaml.safe_load(ours)), role
        mask = lambda text: re.sub(r"(?m)^(\s+content: )[A-Za-z0-9+/=]{20,}$", r"\1<gz+b64>", text)  # noqa: E731
        assert mask(theirs) == mask(ours), role


@pytest.mark.parametrize("role", ROLES)
def test_terraform_rendered_cloud_config_is_valid(role, terraform_rendered, tmp_path, cloud_init_bin):
    path = tmp_path / f"{role}.yaml"
    path.write_text(terraform_rendered[role])
    assert user_data_bytes(terraform_rendered[role]) < 16384, "EC2 user data is limited to 16 KiB (gzipped)"
    proc = subprocess.run([cloud_init_bin, "schema", "--config-file", str(path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "Valid cloud-config" in proc.stdout + proc.stderr, proc.stdout + proc.stderr
