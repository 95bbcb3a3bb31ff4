"""The Terraform describes the topology of docs/DEPLOY.md: parsed with python-hcl2, no provider, no account."""
import ipaddress
import json
import re

import pytest

from deploylib import REPO, ROLES, block

GATEWAY_SG = "${aws_security_group.gateway.id}"
WORKERS_SG = "${aws_security_group.workers.id}"


def instances(tf):
    return tf.resources["aws_instance"]


# ---- network ----------------------------------------------------------------------------------------------------------


def test_vpc_and_subnet_defaults(tf):
    v = tf.variables
    assert v["vpc_cidr"]["default"] == "10.20.0.0/16"
    assert v["public_subnet_cidr"]["default"] == "10.20.1.0/24"
    assert v["private_subnet_cidr"]["default"] == "10.20.2.0/24"
    vpc = ipaddress.ip_network(v["vpc_cidr"]["default"])
    for s in ("public_subnet_cidr", "private_subnet_cidr"):
        assert ipaddress.ip_network(v[s]["default"]).subnet_of(vpc)
    subnets = tf.resources["aws_subnet"]
    assert set(subnets) == {"public", "private"}
    assert subnets["public"]["cidr_block"] == "${var.public_subnet_cidr}"
    assert subnets["private"]["cidr_block"] == "${var.private_subnet_cidr}"
    for s in subnets.values():
        assert s["map_public_ip_on_launch"] is False


def test_routes_igw_public_nat_private_and_s3_endpoint(tf):
    rts = tf.resources["aws_route_table"]
    pub = block(rts["public"], "route")
    priv = block(rts["private"], "route")
    assert pub["gateway_id"] == "${aws_internet_gateway.this.id}" and pub["cidr_block"] == "0.0.0.0/0"
    assert priv["nat_gateway_id"] == "${aws_nat_gateway.this.id}" and priv["cidr_block"] == "0.0.0.0/0"
    assert "gateway_id" not in priv, "the private subnet must not route to the internet gateway"
    assoc = tf.resources["aws_route_table_association"]
    assert assoc["private"]["subnet_id"] == "${aws_subnet.private.id}"
    assert assoc["private"]["route_table_id"] == "${aws_route_table.private.id}"
    assert assoc["public"]["subnet_id"] == "${aws_subnet.public.id}"
    nat = tf.resources["aws_nat_gateway"]["this"]
    assert nat["subnet_id"] == "${aws_subnet.public.id}"
    assert nat["private_ip"] == "${cidrhost(var.public_subnet_cidr, 5)}", "fixed, never the gateway's address"
    ep = tf.resources["aws_vpc_endpoint"]["s3"]
    assert ep["vpc_endpoint_type"] == "Gateway"
    assert ep["service_name"].endswith(".s3")
    assert set(ep["route_table_ids"]) == {"${aws_route_table.public.id}", "${aws_route_table.private.id}"}


def test_flow_logs_to_kms_encrypted_log_group_kept_a_year(tf):
    fl = tf.resources["aws_flow_log"]["vpc"]
    assert fl["vpc_id"] == "${aws_vpc.this.id}"
    assert fl["traffic_type"] == "ALL"
    assert fl["log_destination_type"] == "cloud-watch-logs"
    lg = tf.resources["aws_cloudwatch_log_group"]["flow_logs"]
    assert lg["kms_key_id"].startswith("${aws_kms_key.")
    assert lg["retention_in_days"] == "${var.log_retention_days}"
    assert tf.variables["log_retention_days"]["default"] >= 365
    cond = json.dumps(tf.variables["log_retention_days"]["validation"])
    assert "365" in cond
    assert tf.resources["aws_kms_key"]["meshd"]["enable_key_rotation"] is True


def test_default_security_group_has_no_rules(tf):
    d = tf.resources["aws_default_security_group"]["default"]
    assert "ingress" not in d and "egress" not in d


# ---- instances --------------------------------------------------------------------------------------------------------


def test_three_roles_and_infer_count(tf):
    inst = instances(tf)
    assert set(inst) == set(ROLES)
    assert inst["infer"]["count"] == "${var.infer_count}"
    assert "count" not in inst["gateway"] and "for_each" not in inst["gateway"]
    v = tf.variables["infer_count"]
    assert v["type"] == "${number}" or v["type"] == "number"
    assert v["default"] == 1
    assert ">= 1" in json.dumps(v["validation"]), "infer_count must be validated >= 1"
    # Nothing else launches machines behind our back.
    for other in ("aws_launch_template", "aws_autoscaling_group", "aws_spot_instance_request"):
        assert other not in tf.resources


@pytest.mark.parametrize("role", ["caller", "infer"])
def test_workers_private_subnet_no_public_ip(tf, role):
    i = instances(tf)[role]
    assert i["associate_public_ip_address"] is False
    assert i["subnet_id"] == "${aws_subnet.private.id}"
    assert i["vpc_security_group_ids"] == [WORKERS_SG]
    # No Elastic IP points at a worker.
    for kind in ("aws_eip", "aws_eip_association"):
        for eip in tf.resources.get(kind, {}).values():
            assert f"aws_instance.{role}" not in json.dumps(eip)


def test_gateway_public_subnet_fixed_private_ip_and_eip(tf):
    g = instances(tf)["gateway"]
    assert g["subnet_id"] == "${aws_subnet.public.id}"
    assert g["vpc_security_group_ids"] == [GATEWAY_SG]
    assert g["private_ip"] == "${local.gateway_private_ip}"
    # The EIP exists before the VM (its address is in the VM's certificate) and is associated with it afterwards.
    eip = tf.resources["aws_eip"]["gateway"]
    assert "instance" not in eip and "network_interface" not in eip
    assoc = tf.resources["aws_eip_association"]["gateway"]
    assert assoc["allocation_id"] == "${aws_eip.gateway.allocation_id}"
    assert assoc["instance_id"] == "${aws_instance.gateway.id}"
    # The workers reach the mesh over TLS.
    assert tf.locals["gateway_mesh_url"] == "wss://${local.gateway_private_ip}:${local.mesh_port}"


@pytest.mark.parametrize("role", ROLES)
def test_instance_hardening(tf, role):
    i = instances(tf)[role]
    md = block(i, "metadata_options")
    assert md["http_tokens"] == "required", "IMDSv2 must be required"
    assert md["http_endpoint"] == "enabled"
    assert md["http_put_response_hop_limit"] == 1
    root = block(i, "root_block_device")
    assert root["encrypted"] is True
    assert root["kms_key_id"] == "${aws_kms_key.meshd.arn}"
    assert i["monitoring"] is True
    assert i["ebs_optimized"] is True
    # Each role its own instance profile: a worker role's VMs can read only that role's worker token (iam.tf).
    assert i["iam_instance_profile"] == f'${{aws_iam_instance_profile.node["{role}"].name}}'
    assert i["key_name"] == "${var.ssh_key_name}"
    assert tf.variables["ssh_key_name"]["default"] is None
    assert i["user_data"] == f'${{local.user_data["{role}"]}}'
    assert i["user_data_replace_on_change"] is True
    assert block(i, "lifecycle")["ignore_changes"] == ["ami"], "a new AMI must not replace VMs on an unrelated apply"
    assert not any(k.startswith("ebs_block_device") for k in i), "extra volumes would need their own encryption"


# ---- security groups --------------------------------------------------------------------------------------------------


def _port(tf, value):
    return tf.resolve(value)


def test_only_the_expected_ingress_rules(tf):
    # No inline rules and no legacy aws_security_group_rule: every rule is one reviewable resource.
    for name, sg in tf.resources["aws_security_group"].items():
        assert "ingress" not in sg and "egress" not in sg, f"inline rules in aws_security_group.{name}"
    assert "aws_security_group_rule" not in tf.resources
    assert set(tf.resources["aws_security_group"]) == {"gateway", "workers"}

    ingress = tf.resources["aws_vpc_security_group_ingress_rule"]
    assert set(ingress) == {"gateway_api", "gateway_mesh_from_workers", "gateway_ssh"}
    for name, r in ingress.items():
        assert r["security_group_id"] == GATEWAY_SG, f"{name}: workers accept no inbound"
        assert r["ip_protocol"] == "tcp"
        assert r["from_port"] == r["to_port"], f"{name}: one port per rule"
        assert "cidr_ipv6" not in r and "prefix_list_id" not in r

    api = ingress["gateway_api"]
    assert _port(tf, api["from_port"]) == 3111
    assert api["for_each"] == "${toset(var.allowed_api_cidrs)}"
    assert api["cidr_ipv4"] == "${each.value}"
    assert "referenced_security_group_id" not in api

    mesh = ingress["gateway_mesh_from_workers"]
    assert _port(tf, mesh["from_port"]) == 49134
    assert mesh["referenced_security_group_id"] == WORKERS_SG
    assert "cidr_ipv4" not in mesh, "the mesh port is open to the workers' group only, never to a CIDR"

    ssh = ingress["gateway_ssh"]
    assert _port(tf, ssh["from_port"]) == 22
    assert ssh["for_each"] == "${toset(var.ssh_allowed_cidrs)}"
    assert tf.variables["ssh_allowed_cidrs"]["default"] == [], "no SSH by default"


def test_egress_limited_per_role(tf):
    egress = tf.resources["aws_vpc_security_group_egress_rule"]
    by_sg = {}
    for name, r in egress.items():
        assert r["ip_protocol"] == "tcp", f"{name}: no all-protocol egress"
        assert r["from_port"] == r["to_port"]
        dest = r.get("referenced_security_group_id") or r.get("cidr_ipv4")
        by_sg.setdefault(r["security_group_id"], set()).add((_port(tf, r["from_port"]), dest))
    assert by_sg[WORKERS_SG] == {(49134, GATEWAY_SG), (443, "0.0.0.0/0")}
    assert by_sg[GATEWAY_SG] == {(443, "0.0.0.0/0")}


def test_api_cidrs_required_and_never_open_by_default(tf):
    v = tf.variables["allowed_api_cidrs"]
    assert "default" not in v, "allowed_api_cidrs must have no default"
    conds = json.dumps(v["validation"])
    assert "/0" in conds and "var.allow_public_api" in conds
    assert tf.variables["allow_public_api"]["default"] is False


# ---- secrets ----------------------------------------------------------------------------------------------------------


WORKER_ROLES = ["caller", "infer"]


def test_one_worker_token_per_role_in_ssm_securestring_with_kms(tf):
    # One generated token per worker role, each in its own SecureString /<name>/worker-token/<role>; no single token.
    assert tf.locals["worker_roles"] == WORKER_ROLES
    pw = tf.resources["random_password"]["worker_token"]
    assert pw["for_each"] == "${toset(local.worker_roles)}"
    assert pw["length"] >= 32 and pw["special"] is False
    p = tf.resources["aws_ssm_parameter"]["worker_token"]
    assert p["for_each"] == "${toset(local.worker_roles)}"
    assert p["name"] == "/${var.name}/worker-token/${each.key}"
    assert p["type"] == "SecureString"
    assert p["key_id"] == "${aws_kms_key.meshd.arn}"
    assert p["value"] == "${random_password.worker_token[each.key].result}"
    # Every worker token parameter is one of these: nothing else in the stack holds a worker token.
    others = {n: r["name"] for n, r in tf.resources["aws_ssm_parameter"].items() if n != "worker_token"}
    assert not [n for n in others.values() if "token" in n], others


def test_api_keys_in_ssm_securestring_as_digests_only(tf):
    key = tf.resources["random_password"]["api_key"]
    assert key["length"] >= 32 and key["special"] is False
    p = tf.resources["aws_ssm_parameter"]["api_keys"]
    assert p["type"] == "SecureString"
    assert p["key_id"] == "${aws_kms_key.meshd.arn}"
    assert p["name"] == "/${var.name}/api-keys"
    # SSM (and so the gateway's disk) holds sha256 digests, never the key: the key goes through sha256() first.
    assert "sha256(random_password.api_key.result)" in p["value"]
    assert "var.extra_api_key_sha256" in p["value"] and '"sha256:${digest}"' in p["value"]
    assert tf.variables["extra_api_key_sha256"]["default"] == []


def test_gateway_tls_key_in_ssm_securestring(tf):
    p = tf.resources["aws_ssm_parameter"]["gateway_tls_key"]
    assert p["type"] == "SecureString"
    assert p["key_id"] == "${aws_kms_key.meshd.arn}"
    assert p["value"] == "${tls_private_key.gateway.private_key_pem_pkcs8}"


SECRETS = re.compile(r"random_password\.|tls_private_key\.|private_key_pem|aws_ssm_parameter\.[a-z_]+\.(value|insecure_value)")


def test_secrets_never_in_user_data(tf):
    for role, i in instances(tf).items():
        text = tf.expand_locals(i["user_data"])
        hit = SECRETS.search(text)
        assert not hit, f"{role}: user data depends on a secret ({hit.group(0)})"
    # The user data of each role names the SSM parameters it reads (never their values): a worker its own role's
    # token, the gateway every role's token, the API keys and its TLS key; and it carries the role's one public TLS file.
    token = '${{aws_ssm_parameter.worker_token["{}"].name}}'.format
    want = {
        "gateway": {"token_parameter": "", "caller_token_parameter": token("caller"),
                    "infer_token_parameter": token("infer"),
                    "api_keys_parameter": "${aws_ssm_parameter.api_keys.name}",
                    "tls_key_parameter": "${aws_ssm_parameter.gateway_tls_key.name}",
                    "tls_pem_path": "/etc/meshd/tls/gateway.pem",
                    "tls_pem_gz_b64": "${base64gzip(tls_locally_signed_cert.gateway.cert_pem)}"},
        **{w: {"token_parameter": token(w), "caller_token_parameter": "", "infer_token_parameter": "",
               "api_keys_parameter": "", "tls_key_parameter": "", "tls_pem_path": "/etc/meshd/tls/mesh-ca.pem",
               "tls_pem_gz_b64": "${base64gzip(tls_self_signed_cert.ca.cert_pem)}"} for w in WORKER_ROLES},
    }
    assert tf.locals["cloud_init_role"] == want
    assert "token_parameter" not in tf.locals["cloud_init_common"]
    everything = tf.all_text()
    # The worker tokens feed only their SSM parameters.
    assert re.findall(r"random_password\.worker_token\b[^\s,)}]*", everything) == ["random_password.worker_token[each.key].result"]
    # The API key feeds only the (digest) SSM parameter and the sensitive output.
    assert len(re.findall(r"random_password\.api_key\.result", everything)) == 2
    assert tf.outputs["api_key"]["value"] == "${random_password.api_key.result}"
    assert tf.outputs["api_key"]["sensitive"] is True
    # The gateway's private key feeds only its SSM parameter and its certificate request.
    uses = re.findall(r"tls_private_key\.gateway\.[a-z_0-9]+", everything)
    assert sorted(uses) == ["tls_private_key.gateway.private_key_pem", "tls_private_key.gateway.private_key_pem_pkcs8"]
    # The CA key signs and goes nowhere else (it stays in the Terraform state).
    uses = re.findall(r"tls_private_key\.ca\.[a-z_0-9]+", everything)
    assert uses == ["tls_private_key.ca.private_key_pem"] * 2
    assert tf.resources["tls_locally_signed_cert"]["gateway"]["ca_private_key_pem"] == "${tls_private_key.ca.private_key_pem}"
    # Only the api_key output carries a secret, and it is sensitive.
    for name, o in tf.outputs.items():
        if name != "api_key":
            assert not SECRETS.search(json.dumps(o)), name


def test_private_ca_and_gateway_certificate(tf):
    r = tf.resources
    for name in ("ca", "gateway"):
        k = r["tls_private_key"][name]
        assert (k["algorithm"], k["ecdsa_curve"]) == ("ECDSA", "P256"), name
    ca = r["tls_self_signed_cert"]["ca"]
    assert ca["private_key_pem"] == "${tls_private_key.ca.private_key_pem}"
    assert ca["is_ca_certificate"] is True
    assert "cert_signing" in ca["allowed_uses"] and "server_auth" not in ca["allowed_uses"]
    csr = r["tls_cert_request"]["gateway"]
    assert csr["private_key_pem"] == "${tls_private_key.gateway.private_key_pem}"
    # The certificate names both addresses clients use: the fixed private IP (workers) and the EIP (API clients).
    assert csr["ip_addresses"] == ["${local.gateway_private_ip}", "${aws_eip.gateway.public_ip}"]
    assert tf.locals["gateway_private_ip"] == "${cidrhost(var.public_subnet_cidr, var.gateway_private_ip_hostnum)}"
    cert = r["tls_locally_signed_cert"]["gateway"]
    assert cert["cert_request_pem"] == "${tls_cert_request.gateway.cert_request_pem}"
    assert cert["ca_cert_pem"] == "${tls_self_signed_cert.ca.cert_pem}"
    assert "server_auth" in cert["allowed_uses"] and "cert_signing" not in cert["allowed_uses"]
    assert "is_ca_certificate" not in cert
    for c in (ca, cert):
        assert c["early_renewal_hours"], "renewed before it expires"
    # The gateway serves the certificate from the path its TOML names.
    gateway_toml = (REPO / "roles" / "gateway.toml").read_text()
    for key in ("tls_cert", "mesh_tls_cert"):
        assert re.search(rf'^{key}\s*=\s*"{tf.locals["cloud_init_role"]["gateway"]["tls_pem_path"]}"', gateway_toml, re.M), key
    for role in ("caller", "infer"):
        text = (REPO / "roles" / f"{role}.toml").read_text()
        assert re.search(rf'^gateway_ca\s*=\s*"{tf.locals["cloud_init_role"][role]["tls_pem_path"]}"', text, re.M), role
        assert re.search(r'^gateway_url\s*=\s*"wss://', text, re.M), role


def test_tls_provider_is_pinned(tf):
    text = tf.text["versions.tf"]
    m = re.search(r'tls\s*=\s*\{\s*source\s*=\s*"hashicorp/tls"\s*version\s*=\s*"([^"]+)"', text)
    assert m, "hashicorp/tls must be in required_providers"
    assert ">= 4.0.0" in m.group(1) and "< 5.0.0" in m.group(1)


def test_instance_roles_are_least_privilege(tf):
    roles = tf.locals["node_roles"]
    assert set(roles) == {"gateway", "caller", "infer"}
    # Only the gateway may read every role's token, the API keys and the TLS key; a worker role reads nothing but its
    # own role's token (test_iam.py judges the rendered policies).
    token = '${{aws_ssm_parameter.worker_token["{}"].arn}}'.format
    assert roles["gateway"]["parameters"] == [token("caller"), token("infer"), "${aws_ssm_parameter.api_keys.arn}",
                                              "${aws_ssm_parameter.gateway_tls_key.arn}"]
    assert roles["caller"]["parameters"] == [token("caller")]
    assert roles["infer"]["parameters"] == [token("infer")]
    for kind, name in (("aws_iam_role", "node"), ("aws_iam_role_policy", "node"),
                       ("aws_iam_role_policy_attachment", "node_ssm_core"), ("aws_iam_instance_profile", "node")):
        assert tf.resources[kind][name]["for_each"] == "${local.node_roles}", kind
    pol = tf.resources["aws_iam_role_policy"]["node"]["policy"]
    assert "ssm:GetParameter" in pol and "Resource = each.value.parameters" in pol
    assert "kms:ViaService" in pol
    assert '"*"' not in pol and ":*" not in pol, "no wildcard actions or resources"
    attach = tf.resources["aws_iam_role_policy_attachment"]
    assert [a["policy_arn"] for a in attach.values()] == ["arn:${local.partition}:iam::aws:policy/AmazonSSMManagedInstanceCore"]


# ---- artifacts --------------------------------------------------------------------------------------------------------


def test_artifact_bucket_private_versioned_kms(tf):
    r = tf.resources
    pab = r["aws_s3_bucket_public_access_block"]["artifacts"]
    assert all(pab[k] is True for k in ("block_public_acls", "block_public_policy", "ignore_public_acls", "restrict_public_buckets"))
    assert block(r["aws_s3_bucket_versioning"]["artifacts"], "versioning_configuration")["status"] == "Enabled"
    sse = block(block(r["aws_s3_bucket_server_side_encryption_configuration"]["artifacts"], "rule"), "apply_server_side_encryption_by_default")
    assert sse["sse_algorithm"] == "aws:kms" and sse["kms_master_key_id"] == "${aws_kms_key.meshd.arn}"
    obj = r["aws_s3_object"]["meshd_binary"]
    assert obj["source"] == "${local.binary_local_path}"
    assert "filesha256(local.binary_local_path)" in tf.locals["binary_sha256"]
    assert "var.meshd_binary_sha256" in tf.locals["binary_sha256"]


def test_model_pinned_by_sha256(tf):
    v = tf.variables
    assert v["model_url"]["default"].startswith("https://huggingface.co/ggml-org/gemma-3-270m-it-GGUF/")
    assert v["model_url"]["default"].endswith("gemma-3-270m-it-Q8_0.gguf")
    assert re.fullmatch(r"[0-9a-f]{64}", v["model_sha256"]["default"])


def test_variables_have_types_and_descriptions(tf):
    for name, v in tf.variables.items():
        assert v.get("type"), f"variable {name} has no type"
        assert v.get("description"), f"variable {name} has no description"


# ---- outputs ----------------------------------------------------------------------------------------------------------


def test_outputs_ready_to_paste_curl(tf):
    o = tf.outputs
    for name in ("gateway_public_ip", "gateway_private_ip", "caller_private_ip", "infer_private_ips", "api_key", "api_ca_pem",
                 "api_base_url", "curl_readyz", "curl_add_two_numbers", "curl_chat_completions",
                 "worker_token_parameters", "api_keys_parameter", "gateway_tls_key_parameter"):
        assert name in o and o[name].get("description"), name
    # The worker tokens' parameters by role (names only, never values).
    assert re.sub(r"\s+", "", o["worker_token_parameters"]["value"]) == \
        "${{forrole,pinaws_ssm_parameter.worker_token:role=>p.name}}"
    assert "worker_token_parameter" not in o and "sensitive" not in o["worker_token_parameters"]
    assert o["api_ca_pem"]["value"] == "${tls_self_signed_cert.ca.cert_pem}"
    assert "sensitive" not in o["api_ca_pem"], "the CA certificate is public"
    assert tf.locals["api_base_url"] == "https://${aws_eip.gateway.public_ip}:${local.api_port}"
    assert tf.locals["curl_tls"] == "--cacert meshd-ca.pem"
    # The key is read from the state when the command runs; it never appears in the output's text.
    assert tf.locals["curl_auth"] == '-H "Authorization: Bearer $(terraform output -raw api_key)"'
    readyz = o["curl_readyz"]["value"]
    assert "${local.curl_tls} ${local.api_base_url}/readyz" in readyz
    add = o["curl_add_two_numbers"]["value"]
    assert "${local.curl_tls} ${local.curl_auth} -X POST ${local.api_base_url}/math/add-two-numbers" in add
    assert "-d '{\"a\":100,\"b\":200}'" in add
    chat = o["curl_chat_completions"]["value"]
    assert "${local.curl_tls} ${local.curl_auth} -X POST ${local.api_base_url}/v1/chat/completions" in chat
    assert "-d '{\"messages\":[{\"role\":\"user\",\"content\":\"what color is apple?\"}]}'" in chat
    for name in ("curl_readyz", "curl_add_two_numbers", "curl_chat_completions"):
        assert "http://" not in o[name]["value"] and "--insecure" not in o[name]["value"] and " -k " not in o[name]["value"]


# ---- variable validations, evaluated by the real Terraform (offline: `terraform console`, no providers) ----------------

VALID = {"allowed_api_cidrs": ["203.0.113.7/32"]}

VALIDATION_CASES = [
    ({}, None),
    ({"allowed_api_cidrs": ["0.0.0.0/0"]}, "allow_public_api"),
    ({"allowed_api_cidrs": ["10.0.0.0/0"]}, "allow_public_api"),
    ({"allowed_api_cidrs": ["0.0.0.0/0"], "allow_public_api": "true"}, None),
    ({"allowed_api_cidrs": []}, "non-empty"),
    ({"allowed_api_cidrs": ["not-a-cidr"]}, "IPv4 CIDR"),
    ({"infer_count": "0"}, "infer_count"),
    ({"infer_count": "1.5"}, "infer_count"),
    ({"infer_count": "3"}, None),
    ({"ssh_allowed_cidrs": ["0.0.0.0/0"]}, "ssh_allowed_cidrs"),
    ({"ssh_allowed_cidrs": ["198.51.100.0/24"]}, None),
    ({"meshd_binary_url": "https://example.com/meshd"}, "meshd_binary_sha256 is required"),
    ({"meshd_binary_url": "http://example.com/meshd", "meshd_binary_sha256": "a" * 64}, "https://"),
    ({"meshd_binary_url": "https://example.com/meshd", "meshd_binary_sha256": "a" * 64}, None),
    ({"model_sha256": "abc"}, "model_sha256"),
    ({"log_retention_days": "30"}, "log_retention_days"),
    ({"vpc_cidr": "10.20.0.0"}, "vpc_cidr"),
    ({"gateway_private_ip_hostnum": "5"}, "NAT gateway"),
    ({"extra_api_key_sha256": ["b" * 64]}, None),
    ({"extra_api_key_sha256": ["not-a-digest"]}, "extra_api_key_sha256"),
    ({"extra_api_key_sha256": ["B" * 64]}, "extra_api_key_sha256"),
    ({"extra_api_key_sha256": [f"{i:064x}" for i in range(51)]}, "at most 50"),
    ({"extra_api_key_sha256": [f"{i:064x}" for i in range(50)]}, None),
    ({"tls_ca_validity_days": "30"}, "tls_ca_validity_days"),
    ({"tls_gateway_cert_validity_days": "30"}, "tls_gateway_cert_validity_days"),
    ({"tls_gateway_cert_validity_days": "4000"}, "tls_gateway_cert_validity_days"),
    ({"tls_ca_validity_days": "5000", "tls_gateway_cert_validity_days": "4000"}, None),
]


@pytest.mark.parametrize("overrides,error", VALIDATION_CASES, ids=lambda x: json.dumps(x) if isinstance(x, dict) else str(x))
def test_variable_validation(tf_vars_dir, overrides, error):
    from deploylib import terraform_console

    exe, d = tf_vars_dir
    tf_vars = {**VALID, **overrides}
    out, err = terraform_console(exe, d, "var.allowed_api_cidrs", tf_vars)
    if error is None:
        assert err is None, err
    else:
        assert err is not None, f"{overrides} was accepted"
        assert "Invalid value for variable" in err and error in err, err


def test_api_keys_file_as_terraform_renders_it(tf, tf_vars_dir):
    """The api-keys parameter's value, evaluated by the real Terraform with a stand-in key: `sha256:<hex>` lines, the
    format the gateway's api_keys_file takes (the network-namespace test serves the API from such a file)."""
    import hashlib

    from deploylib import terraform_console

    exe, d = tf_vars_dir
    expr = tf.resources["aws_ssm_parameter"]["api_keys"]["value"]
    assert expr.startswith("${") and expr.endswith("}")
    expr = expr[2:-1].replace("random_password.api_key.result", '"stand-in-key"')
    extra = "c" * 64
    out, err = terraform_console(exe, d, f"jsonencode({expr})", {**VALID, "extra_api_key_sha256": [extra]})
    assert err is None, err
    value = json.loads(json.loads(out))
    assert value == f"sha256:{hashlib.sha256(b'stand-in-key').hexdigest()}\nsha256:{extra}"
    assert "stand-in-key" not in value
