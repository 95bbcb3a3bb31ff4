"""The Terraform describes the topology of docs/DEPLOY.md: parsed with python-hcl2, no provider, no account."""
import ipaddress
import json
import re

import pytest

from deploylib import REPO, ROLES, block

GATEWAY_SG = "${aws_security_group.gateway.id}"
WORKERS_SG = "${aws_security_group.workers.id}"
NLB_SG = "${aws_security_group.nlb.id}"
STATE_SG = "${aws_security_group.state.id}"
VALID = {"allowed_api_cidrs": ["203.0.113.7/32"]}


def instances(tf):
    return tf.resources["aws_instance"]


# ---- network ----------------------------------------------------------------------------------------------------------


def test_vpc_and_subnet_defaults(tf):
    v = tf.variables
    assert v["vpc_cidr"]["default"] == "10.20.0.0/16"
    assert v["public_subnet_cidrs"]["default"] == ["10.20.1.0/24", "10.20.2.0/24"]
    assert v["private_subnet_cidrs"]["default"] == ["10.20.11.0/24", "10.20.12.0/24"]
    vpc = ipaddress.ip_network(v["vpc_cidr"]["default"])
    for s in ("public_subnet_cidrs", "private_subnet_cidrs"):
        for c in v[s]["default"]:
            assert ipaddress.ip_network(c).subnet_of(vpc)
    subnets = tf.resources["aws_subnet"]
    assert set(subnets) == {"public", "private"}
    for kind in ("public", "private"):
        s = subnets[kind]
        assert s["count"] == f"${{length(var.{kind}_subnet_cidrs)}}"
        assert s["cidr_block"] == f"${{var.{kind}_subnet_cidrs[count.index]}}"
        assert s["availability_zone"] == "${local.azs[count.index]}", "one public and one private subnet per zone"
        assert s["map_public_ip_on_launch"] is False


def test_routes_igw_public_nat_per_zone_private_and_s3_endpoint(tf):
    rts = tf.resources["aws_route_table"]
    pub = block(rts["public"], "route")
    priv = block(rts["private"], "route")
    assert pub["gateway_id"] == "${aws_internet_gateway.this.id}" and pub["cidr_block"] == "0.0.0.0/0"
    assert rts["private"]["count"] == "${length(var.private_subnet_cidrs)}"
    assert priv["nat_gateway_id"] == "${aws_nat_gateway.this[count.index].id}", "each zone leaves through its own NAT"
    assert "gateway_id" not in priv, "the private subnets must not route to the internet gateway"
    assoc = tf.resources["aws_route_table_association"]
    assert assoc["private"]["subnet_id"] == "${aws_subnet.private[count.index].id}"
    assert assoc["private"]["route_table_id"] == "${aws_route_table.private[count.index].id}"
    assert assoc["public"]["subnet_id"] == "${aws_subnet.public[count.index].id}"
    nat = tf.resources["aws_nat_gateway"]["this"]
    assert nat["subnet_id"] == "${aws_subnet.public[count.index].id}"
    ep = tf.resources["aws_vpc_endpoint"]["s3"]
    assert ep["vpc_endpoint_type"] == "Gateway"
    assert ep["service_name"].endswith(".s3")
    assert ep["route_table_ids"] == "${concat([aws_route_table.public.id], aws_route_table.private[*].id)}"


def test_flow_logs_to_kms_encrypted_log_group_kept_a_year(tf):
    fl = tf.resources["aws_flow_log"]["vpc"]
    assert fl["vpc_id"] == "${aws_vpc.this.id}"
    assert fl["traffic_type"] == "ALL"
    assert fl["log_destination_type"] == "cloud-watch-logs"
    for name, lg in tf.resources["aws_cloudwatch_log_group"].items():
        assert lg["kms_key_id"] == "${aws_kms_key.meshd.arn}", name
        assert lg["retention_in_days"] == "${var.log_retention_days}", name
    assert tf.variables["log_retention_days"]["default"] >= 365
    cond = json.dumps(tf.variables["log_retention_days"]["validation"])
    assert "365" in cond
    assert tf.resources["aws_kms_key"]["meshd"]["enable_key_rotation"] is True


def test_default_security_group_has_no_rules(tf):
    d = tf.resources["aws_default_security_group"]["default"]
    assert "ingress" not in d and "egress" not in d


# ---- the gateways: at least two, in distinct zones, behind the NLB -----------------------------------------------------


@pytest.fixture(scope="module")
def gateways_by_terraform(tf, tf_vars_dir):
    """local.gateways (and local.azs' length) evaluated by the real Terraform with the default variables and with
    gateway_count = 3: {case: {gateway key: {zone, private_ip}}}."""
    from deploylib import terraform_console

    exe, d = tf_vars_dir
    expr = tf.locals["gateways"]
    assert isinstance(expr, str) and expr.startswith("${") and expr.endswith("}"), expr
    out = {}
    for case, extra in (("default", {}), ("three", {"gateway_count": "3"})):
        printed, err = terraform_console(exe, d, f"jsonencode({expr[2:-1]})", {**VALID, **extra})
        assert err is None, err
        out[case] = json.loads(json.loads(printed))
    return out


def test_at_least_two_gateways_in_distinct_zones(tf, gateways_by_terraform):
    v = tf.variables["gateway_count"]
    assert v["default"] == 2
    assert ">= 2" in json.dumps(v["validation"]), "gateway_count must be validated >= 2"
    default = gateways_by_terraform["default"]
    assert sorted(default) == ["gateway-0", "gateway-1"]
    assert {g["zone"] for g in default.values()} == {0, 1}, "two gateways, two availability zones"
    assert {k: g["private_ip"] for k, g in default.items()} == {"gateway-0": "10.20.11.10", "gateway-1": "10.20.12.10"}
    # A third goes round robin to the first zone, at the next address there.
    three = gateways_by_terraform["three"]
    assert [three[f"gateway-{i}"]["zone"] for i in range(3)] == [0, 1, 0]
    assert three["gateway-2"]["private_ip"] == "10.20.11.11"
    g = instances(tf)["gateway"]
    assert g["for_each"] == "${local.gateways}"
    assert g["subnet_id"] == "${aws_subnet.private[each.value.zone].id}", "the subnet of the gateway's zone"
    assert g["private_ip"] == "${each.value.private_ip}"


def test_nlb_tcp_passthrough_with_readyz_health_check_on_every_gateway(tf):
    lb = tf.resources["aws_lb"]["api"]
    assert lb["load_balancer_type"] == "network" and lb["internal"] is False
    assert lb["subnets"] == "${aws_subnet.public[*].id}", "a node in every zone's public subnet"
    assert lb["security_groups"] == [NLB_SG]
    assert lb["enable_cross_zone_load_balancing"] is True
    listener = tf.resources["aws_lb_listener"]["api"]
    assert listener["protocol"] == "TCP", "TCP passthrough: TLS ends in meshd"
    assert tf.resolve(listener["port"]) == 443
    assert "certificate_arn" not in listener and "ssl_policy" not in listener
    action = block(listener, "default_action")
    assert action["type"] == "forward" and action["target_group_arn"] == "${aws_lb_target_group.gateways.arn}"
    tg = tf.resources["aws_lb_target_group"]["gateways"]
    assert tg["protocol"] == "TCP" and tf.resolve(tg["port"]) == 3111
    assert tg["target_type"] == "instance" and tg["preserve_client_ip"] is True
    hc = block(tg, "health_check")
    assert hc["protocol"] == "HTTPS" and hc["path"] == "/readyz" and hc["port"] == "traffic-port"
    assert hc["matcher"] == "200"
    assert tg["deregistration_delay"] > 20, "longer than the gateways' drain_timeout_secs"
    att = tf.resources["aws_lb_target_group_attachment"]["gateway"]
    assert att["for_each"] == "${local.gateways}", "every gateway is a target"
    assert att["target_id"] == "${aws_instance.gateway[each.key].id}"
    assert tf.resolve(att["port"]) == 3111


def test_workers_find_every_gateway_by_one_private_dns_name(tf):
    zone = tf.resources["aws_route53_zone"]["private"]
    assert zone["name"] == "${local.private_zone_name}"
    assert block(zone, "vpc")["vpc_id"] == "${aws_vpc.this.id}", "private to the VPC"
    rec = tf.resources["aws_route53_record"]["gateways"]
    assert rec["type"] == "A" and rec["name"] == "${local.gateways_fqdn}"
    assert rec["records"] == "${[for k, g in aws_instance.gateway : g.private_ip]}", "one A record per gateway"
    assert rec["ttl"] <= 30, "workers re-resolve every 5 s; a gone gateway must leave the answer soon"
    assert tf.locals["private_zone_name"] == "${var.name}.internal"
    assert tf.locals["gateways_fqdn"] == "gateways.${local.private_zone_name}"
    assert tf.locals["gateway_mesh_url"] == "wss://${local.gateways_fqdn}:${local.mesh_port}"
    # The shipped worker configs dial that name for the default name "meshd".
    assert tf.variables["name"]["default"] == "meshd"
    for role in ("caller", "infer"):
        assert re.search(r'^gateway_url\s*=\s*"wss://gateways\.meshd\.internal:49134"', (REPO / "roles" / f"{role}.toml").read_text(), re.M)


# ---- no instance with a public address; hardening --------------------------------------------------------------------


def test_no_instance_has_a_public_address(tf):
    g = instances(tf)["gateway"]
    assert g["associate_public_ip_address"] is False
    assert g["vpc_security_group_ids"] == [GATEWAY_SG]
    assert set(instances(tf)) == {"gateway"}, "workers come from launch templates"
    for name, lt in tf.resources["aws_launch_template"].items():
        ni = block(lt, "network_interfaces")
        assert ni["associate_public_ip_address"] is False, name
        assert ni["security_groups"] == [WORKERS_SG], name
    for name, asg in tf.resources["aws_autoscaling_group"].items():
        assert asg["vpc_zone_identifier"] == "${aws_subnet.private[*].id}", f"{name}: private subnets of every zone"
    # The only Elastic IPs are the NAT gateways'; nothing associates one with an instance.
    assert set(tf.resources["aws_eip"]) == {"nat"}
    assert "aws_eip_association" not in tf.resources
    for s in tf.resources["aws_subnet"].values():
        assert s["map_public_ip_on_launch"] is False


def _hardening(md, root_ebs):
    assert md["http_tokens"] == "required", "IMDSv2 must be required"
    assert md["http_endpoint"] == "enabled"
    assert md["http_put_response_hop_limit"] == 1
    assert root_ebs["encrypted"] is True
    assert root_ebs["kms_key_id"] == "${aws_kms_key.meshd.arn}"


def test_gateway_hardening(tf):
    i = instances(tf)["gateway"]
    _hardening(block(i, "metadata_options"), block(i, "root_block_device"))
    assert i["monitoring"] is True and i["ebs_optimized"] is True
    assert i["iam_instance_profile"] == '${aws_iam_instance_profile.node["gateway"].name}'
    assert i["key_name"] == "${var.ssh_key_name}"
    assert tf.variables["ssh_key_name"]["default"] is None
    assert i["user_data_base64"] == '${base64gzip(local.user_data["gateway"])}'
    # An apply never replaces every gateway at once: they are rolled one at a time (output roll_gateways).
    assert i["user_data_replace_on_change"] is False
    assert block(i, "lifecycle")["ignore_changes"] == ["ami", "user_data", "user_data_base64"]
    assert "roll_gateways" in tf.outputs
    assert not any(k.startswith("ebs_block_device") for k in i), "extra volumes would need their own encryption"


@pytest.mark.parametrize("role", ["caller", "infer"])
def test_worker_launch_template_hardening(tf, role):
    lt = tf.resources["aws_launch_template"]["worker"]
    assert lt["for_each"] == "${local.worker_groups}"
    assert set(tf.locals["worker_groups"]) == {"caller", "infer"}
    _hardening(block(lt, "metadata_options"), block(block(lt, "block_device_mappings"), "ebs"))
    assert block(lt, "monitoring")["enabled"] is True and lt["ebs_optimized"] is True
    assert lt["iam_instance_profile"] == [{"name": "${aws_iam_instance_profile.node[each.key].name}"}] or \
        block(lt, "iam_instance_profile")["name"] == "${aws_iam_instance_profile.node[each.key].name}"
    assert lt["user_data"] == "${base64gzip(local.user_data[each.key])}"
    assert lt["key_name"] == "${var.ssh_key_name}"


# ---- the worker groups -----------------------------------------------------------------------------------------------


def asgs(tf):
    return tf.resources["aws_autoscaling_group"]


def test_caller_group_fixed_size(tf):
    c = asgs(tf)["caller"]
    assert c["min_size"] == c["max_size"] == c["desired_capacity"] == "${var.caller_count}"
    assert block(c, "launch_template")["id"] == '${aws_launch_template.worker["caller"].id}'


def test_infer_group_mixed_on_demand_base_and_spot(tf):
    i = asgs(tf)["infer"]
    mip = block(i, "mixed_instances_policy")
    dist = block(mip, "instances_distribution")
    assert dist["on_demand_base_capacity"] == "${var.infer_on_demand_base_capacity}"
    assert dist["on_demand_percentage_above_base_capacity"] == "${var.infer_on_demand_percentage_above_base}"
    assert dist["spot_allocation_strategy"] == "price-capacity-optimized"
    assert tf.variables["infer_on_demand_base_capacity"]["default"] >= 1
    assert tf.variables["infer_on_demand_percentage_above_base"]["default"] < 100, "spot above the base"
    lt = block(mip, "launch_template")
    assert block(lt, "launch_template_specification")["launch_template_id"] == '${aws_launch_template.worker["infer"].id}'
    assert "override" in json.dumps(lt), "several instance types for spot"
    assert len(tf.variables["infer_instance_types"]["default"]) >= 2
    assert i["capacity_rebalance"] is True
    assert i["min_size"] == "${var.infer_min_size}" and i["max_size"] == "${var.infer_max_size}"
    assert "warm_pool" not in i, "AWS refuses a warm pool on a group with a mixed instances policy"


def test_infer_warm_group_has_a_warm_pool_with_the_model_on_disk(tf):
    w = asgs(tf)["infer_warm"]
    pool = block(w, "warm_pool")
    assert pool["pool_state"] == "Stopped"
    assert pool["min_size"] == "${var.infer_warm_pool_size}"
    assert tf.variables["infer_warm_pool_size"]["default"] >= 1
    assert block(pool, "instance_reuse_policy")["reuse_on_scale_in"] is True
    assert "mixed_instances_policy" not in w
    assert block(w, "launch_template")["id"] == '${aws_launch_template.worker["infer"].id}'
    # The bootstrap prepares a pool instance (binary, secrets, model) and does not start meshd there.
    bootstrap = (REPO / "cloud-init" / "meshd-bootstrap.sh").read_text()
    assert "autoscaling/target-lifecycle-state" in bootstrap and "Warmed:*)" in bootstrap


@pytest.mark.parametrize("group", ["caller", "infer", "infer_warm"])
def test_every_worker_group_drains_on_termination_and_replaces_dead_instances(tf, group):
    g = asgs(tf)[group]
    hook = block(g, "initial_lifecycle_hook")
    assert hook["lifecycle_transition"] == "autoscaling:EC2_INSTANCE_TERMINATING"
    assert hook["default_result"] == "CONTINUE"
    assert hook["heartbeat_timeout"] == "${local.drain_hook_timeout}"
    assert tf.locals["drain_hook_timeout"] >= 60, "drain_timeout_secs + TimeoutStopSec + the watcher's poll"
    assert g["health_check_type"] == "EC2", "a stopped instance (StartLimitAction=poweroff) is replaced"
    assert g["service_linked_role_arn"] == "${aws_iam_service_linked_role.autoscaling.arn}"
    assert "instance_refresh" in g, "a new launch template rolls the group"


def test_infer_scales_by_target_tracking_on_the_queue_per_worker(tf):
    p = tf.resources["aws_autoscaling_policy"]["infer_queue"]
    assert p["autoscaling_group_name"] == "${aws_autoscaling_group.infer.name}"
    assert p["policy_type"] == "TargetTrackingScaling"
    ttc = block(p, "target_tracking_configuration")
    assert ttc["target_value"] == "${var.infer_target_inflight_per_worker}"
    spec = json.dumps(block(ttc, "customized_metric_specification"))
    # Every gateway's meshd_function_inflight of inference::run_inference (from /metrics, via the CloudWatch agent)...
    assert "meshd_function_inflight" in spec and "local.inference_fn" in spec and "local.metrics_namespace" in spec
    assert "local.gateways[metrics.key].private_ip" in spec and "local.queue_gateway_ids" in spec
    assert tf.locals["inference_fn"] == "inference::run_inference"
    # ... per InService worker of both infer groups.
    assert "GroupInServiceInstances" in spec
    assert "aws_autoscaling_group.infer.name" in spec and "aws_autoscaling_group.infer_warm.name" in spec
    assert tf.locals["queue_per_worker"] == \
        "(${local.queue_inflight}) / IF((${local.queue_workers}) > 0, ${local.queue_workers}, 1)"
    assert "local.queue_per_worker" in spec
    for g in ("infer", "infer_warm"):
        assert "GroupInServiceInstances" in asgs(tf)[g]["enabled_metrics"]
    # The warm group steps out on a backlog of twice the target.
    alarms = tf.resources["aws_cloudwatch_metric_alarm"]["infer_backlog"]
    assert "2 * var.infer_target_inflight_per_worker" in json.dumps(alarms["for_each"])
    assert "aws_autoscaling_policy.infer_warm_out.arn" in json.dumps(alarms["for_each"])
    # The metric the agent publishes: the bootstrap's EMF declaration names the same series and dimensions.
    bootstrap = (REPO / "cloud-init" / "meshd-bootstrap.sh").read_text()
    assert '"dimensions": [["gateway", "function"], ["function"]]' in bootstrap
    assert "^meshd_function_inflight" in bootstrap


# ---- the state store --------------------------------------------------------------------------------------------------


def test_state_memorydb_by_default_tls_kms_acl_password_from_ssm(tf):
    v = tf.variables["state_backend"]
    assert v["default"] == "memorydb"
    assert "elasticache" in json.dumps(v["validation"])
    m = tf.resources["aws_memorydb_cluster"]["state"]
    assert m["count"] == "${local.use_memorydb ? 1 : 0}"
    assert m["tls_enabled"] is True, "TLS in transit"
    assert m["kms_key_arn"] == "${aws_kms_key.meshd.arn}", "encrypted at rest with the stack key"
    assert m["security_group_ids"] == [STATE_SG]
    assert m["subnet_group_name"] == "${aws_memorydb_subnet_group.state[0].name}"
    assert m["num_replicas_per_shard"] >= 1
    assert m["acl_name"] == "${aws_memorydb_acl.state[0].name}"
    assert tf.resources["aws_memorydb_subnet_group"]["state"]["subnet_ids"] == "${aws_subnet.private[*].id}"
    user = tf.resources["aws_memorydb_user"]["gateway"]
    auth = block(user, "authentication_mode")
    assert auth["type"] == "password" and auth["passwords"] == ["${random_password.state.result}"]
    assert user["access_string"] == "${local.state_access_string}"
    assert tf.locals["state_access_string"].startswith("on ~meshd:* ") and "-@dangerous" in tf.locals["state_access_string"]
    # The password: generated, in an SSM SecureString only the gateways read (test_iam.py), never in user data.
    p = tf.resources["aws_ssm_parameter"]["state_password"]
    assert p["type"] == "SecureString" and p["key_id"] == "${aws_kms_key.meshd.arn}"
    assert p["value"] == "${random_password.state.result}"
    assert p["name"] == "/${var.name}/state-password"
    # The gateways dial rediss:// and trust MemoryDB's log (cluster mode, no WAIT).
    assert tf.locals["state_url"] == "rediss://${local.state_host}:${local.state_port}/0"
    assert tf.locals["state_cluster"] == "${local.use_memorydb}"
    assert tf.locals["state_wait_replicas"] == "${local.use_memorydb ? 0 : 1}"


def test_state_elasticache_option_tls_kms_and_wait_for_a_replica(tf):
    rg = tf.resources["aws_elasticache_replication_group"]["state"]
    assert rg["count"] == "${local.use_memorydb ? 0 : 1}"
    assert rg["engine"] == "valkey"
    assert rg["transit_encryption_enabled"] is True and rg["at_rest_encryption_enabled"] is True
    assert rg["kms_key_id"] == "${aws_kms_key.meshd.arn}"
    assert rg["security_group_ids"] == [STATE_SG]
    assert rg["automatic_failover_enabled"] is True and rg["multi_az_enabled"] is True
    assert rg["num_cache_clusters"] >= 2
    assert rg["user_group_ids"] == ["${aws_elasticache_user_group.state[0].user_group_id}"]
    gw = tf.resources["aws_elasticache_user"]["gateway"]
    assert block(gw, "authentication_mode")["passwords"] == ["${random_password.state.result}"]
    assert gw["access_string"] == "${local.state_access_string}"
    assert tf.resources["aws_elasticache_user"]["default"]["access_string"].startswith("off ")


def test_state_reachable_only_from_the_gateways(tf):
    ingress = [r for r in tf.resources["aws_vpc_security_group_ingress_rule"].values() if r["security_group_id"] == STATE_SG]
    assert ingress == [tf.resources["aws_vpc_security_group_ingress_rule"]["state_from_gateways"]]
    assert ingress[0]["referenced_security_group_id"] == GATEWAY_SG and "cidr_ipv4" not in ingress[0]
    assert tf.resolve(ingress[0]["from_port"]) == tf.resolve(ingress[0]["to_port"]) == 6379
    egress = [r for r in tf.resources["aws_vpc_security_group_egress_rule"].values() if r["security_group_id"] == STATE_SG]
    assert egress == [], "the state store opens no connection"
    # Only the gateways' group may leave for it.
    to_state = [r["security_group_id"] for r in tf.resources["aws_vpc_security_group_egress_rule"].values()
                if r.get("referenced_security_group_id") == STATE_SG]
    assert to_state == [GATEWAY_SG]


# ---- security groups --------------------------------------------------------------------------------------------------


def _port(tf, value):
    return tf.resolve(value)


def test_only_the_expected_ingress_rules(tf):
    # No inline rules and no legacy aws_security_group_rule: every rule is one reviewable resource.
    for name, sg in tf.resources["aws_security_group"].items():
        assert "ingress" not in sg and "egress" not in sg, f"inline rules in aws_security_group.{name}"
    assert "aws_security_group_rule" not in tf.resources
    assert set(tf.resources["aws_security_group"]) == {"nlb", "gateway", "workers", "state"}

    ingress = tf.resources["aws_vpc_security_group_ingress_rule"]
    assert set(ingress) == {"nlb_api", "gateway_api", "gateway_health_checks", "gateway_mesh_from_workers",
                            "state_from_gateways"}
    for name, r in ingress.items():
        assert r["security_group_id"] != WORKERS_SG, f"{name}: workers accept no inbound"
        assert r["ip_protocol"] == "tcp"
        assert r["from_port"] == r["to_port"], f"{name}: one port per rule"
        assert "cidr_ipv6" not in r and "prefix_list_id" not in r

    nlb = ingress["nlb_api"]
    assert nlb["security_group_id"] == NLB_SG and _port(tf, nlb["from_port"]) == 443
    assert nlb["for_each"] == "${toset(var.allowed_api_cidrs)}" and nlb["cidr_ipv4"] == "${each.value}"

    # The allow-list holds on the gateways too (the NLB preserves client addresses) ...
    api = ingress["gateway_api"]
    assert api["security_group_id"] == GATEWAY_SG and _port(tf, api["from_port"]) == 3111
    assert api["for_each"] == "${toset(var.allowed_api_cidrs)}" and api["cidr_ipv4"] == "${each.value}"
    assert "referenced_security_group_id" not in api
    # ... so the NLB's group is not referenced (that would admit any client through it); its health checks come
    # from its nodes' addresses in the public subnets.
    hc = ingress["gateway_health_checks"]
    assert hc["security_group_id"] == GATEWAY_SG and _port(tf, hc["from_port"]) == 3111
    assert hc["for_each"] == "${toset(var.public_subnet_cidrs)}"
    for r in ingress.values():
        assert r.get("referenced_security_group_id") != NLB_SG

    mesh = ingress["gateway_mesh_from_workers"]
    assert _port(tf, mesh["from_port"]) == 49134
    assert mesh["referenced_security_group_id"] == WORKERS_SG
    assert "cidr_ipv4" not in mesh, "the mesh port is open to the workers' group only, never to a CIDR"
    assert "ssh_allowed_cidrs" not in tf.variables, "no SSH from anywhere: no instance has a public address"


def test_egress_limited_per_role(tf):
    egress = tf.resources["aws_vpc_security_group_egress_rule"]
    by_sg = {}
    for name, r in egress.items():
        assert r["ip_protocol"] == "tcp", f"{name}: no all-protocol egress"
        assert r["from_port"] == r["to_port"]
        dest = r.get("referenced_security_group_id") or r.get("cidr_ipv4")
        by_sg.setdefault(r["security_group_id"], set()).add((_port(tf, r["from_port"]), dest))
    assert by_sg[NLB_SG] == {(3111, GATEWAY_SG)}
    assert by_sg[WORKERS_SG] == {(49134, GATEWAY_SG), (443, "0.0.0.0/0")}
    assert by_sg[GATEWAY_SG] == {(443, "0.0.0.0/0"), (6379, STATE_SG)}
    assert STATE_SG not in by_sg


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
    # The CloudWatch agent's metrics key is an API key too: its digest is in the file, the key in its own parameter.
    assert "sha256(random_password.metrics_key.result)" in p["value"]
    mk = tf.resources["aws_ssm_parameter"]["metrics_key"]
    assert mk["type"] == "SecureString" and mk["key_id"] == "${aws_kms_key.meshd.arn}"
    assert mk["value"] == "${random_password.metrics_key.result}" and mk["name"] == "/${var.name}/metrics-key"


def test_gateway_tls_key_in_ssm_securestring(tf):
    p = tf.resources["aws_ssm_parameter"]["gateway_tls_key"]
    assert p["type"] == "SecureString"
    assert p["key_id"] == "${aws_kms_key.meshd.arn}"
    assert p["value"] == "${tls_private_key.gateway.private_key_pem_pkcs8}"


SECRETS = re.compile(r"random_password\.|tls_private_key\.|private_key_pem|aws_ssm_parameter\.[a-z_]+\.(value|insecure_value)")


def test_secrets_never_in_user_data(tf):
    for role in ROLES:
        text = tf.expand_locals(f"${{local.user_data[\"{role}\"]}}")
        assert "cloud_init_role" in text
        hit = SECRETS.search(text)
        assert not hit, f"{role}: user data depends on a secret ({hit.group(0)})"
    # The user data of each role names the SSM parameters it reads (never their values): a worker its own role's
    # token, the gateway every role's token, the API keys and its TLS key; and it carries the role's one public TLS file.
    token = '${{aws_ssm_parameter.worker_token["{}"].name}}'.format
    none = {k: "" for k in ("state_url", "state_username", "state_cluster", "state_wait_replicas", "metrics_log_group",
                            "metrics_namespace", "model_s3_uri", "model_sha256", "infer_generator", "upstream_url")}
    worker = {"caller_token_parameter": "", "infer_token_parameter": "", "api_keys_parameter": "",
              "tls_key_parameter": "", "state_password_parameter": "", "metrics_key_parameter": "",
              "tls_pem_path": "/etc/meshd/tls/mesh-ca.pem",
              "tls_pem_gz_b64": "${base64gzip(tls_self_signed_cert.ca.cert_pem)}"}
    want = {
        "gateway": {**none, "token_parameter": "", "caller_token_parameter": token("caller"),
                    "infer_token_parameter": token("infer"),
                    "api_keys_parameter": "${aws_ssm_parameter.api_keys.name}",
                    "tls_key_parameter": "${aws_ssm_parameter.gateway_tls_key.name}",
                    "state_password_parameter": "${aws_ssm_parameter.state_password.name}",
                    "metrics_key_parameter": "${aws_ssm_parameter.metrics_key.name}",
                    "tls_pem_path": "/etc/meshd/tls/gateway.pem",
                    "tls_pem_gz_b64": "${base64gzip(tls_locally_signed_cert.gateway.cert_pem)}",
                    "state_url": "${local.state_url}", "state_username": "${local.state_user}",
                    "state_cluster": "${tostring(local.state_cluster)}",
                    "state_wait_replicas": "${tostring(local.state_wait_replicas)}",
                    "metrics_log_group": "${aws_cloudwatch_log_group.metrics.name}",
                    "metrics_namespace": "${local.metrics_namespace}"},
        "caller": {**none, **worker, "token_parameter": token("caller")},
        "infer": {**none, **worker, "token_parameter": token("infer"),
                  "model_s3_uri": '${local.infer_gpu ? "" : local.model_s3_uri}',
                  "model_sha256": '${local.infer_gpu ? "" : var.model_sha256}',
                  "infer_generator": '${local.infer_gpu ? "openai" : "llama.cpp"}',
                  "upstream_url": '${local.infer_gpu ? var.infer_upstream_url : ""}'},
    }
    assert tf.locals["cloud_init_role"] == want
    assert "token_parameter" not in tf.locals["cloud_init_common"]
    everything = tf.all_text()
    # The worker tokens feed only their SSM parameters.
    assert re.findall(r"random_password\.worker_token\b[^\s,)}]*", everything) == ["random_password.worker_token[each.key].result"]
    # The API key feeds only the (digest) SSM parameter and the sensitive output; the metrics key its digest and its
    # own parameter; the state password its parameter and the state store's users.
    assert len(re.findall(r"random_password\.api_key\.result", everything)) == 2
    assert len(re.findall(r"random_password\.metrics_key\.result", everything)) == 2
    assert len(re.findall(r"random_password\.state\.result", everything)) == 4
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
    # The certificate names both names clients dial: the NLB's (API clients; TCP passthrough, so TLS ends in meshd)
    # and gateways.<name>.internal (workers, wss://).
    assert csr["dns_names"] == ["${aws_lb.api.dns_name}", "${local.gateways_fqdn}"]
    assert "ip_addresses" not in csr
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
        assert re.search(r'^gateway_url\s*=\s*"wss://gateways\.', text, re.M), role


def test_tls_provider_is_pinned(tf):
    text = tf.text["versions.tf"]
    m = re.search(r'tls\s*=\s*\{\s*source\s*=\s*"hashicorp/tls"\s*version\s*=\s*"([^"]+)"', text)
    assert m, "hashicorp/tls must be in required_providers"
    assert ">= 4.0.0" in m.group(1) and "< 5.0.0" in m.group(1)


def test_instance_roles_are_least_privilege(tf):
    roles = tf.locals["node_roles"]
    assert set(roles) == {"gateway", "caller", "infer"}
    # Only the gateways may read every role's token, the API keys, the TLS key, the state password and the metrics
    # key; a worker role reads nothing but its own role's token (test_iam.py judges the rendered policies).
    token = '${{aws_ssm_parameter.worker_token["{}"].arn}}'.format
    assert roles["gateway"]["parameters"] == [token("caller"), token("infer"), "${aws_ssm_parameter.api_keys.arn}",
                                              "${aws_ssm_parameter.gateway_tls_key.arn}",
                                              "${aws_ssm_parameter.state_password.arn}",
                                              "${aws_ssm_parameter.metrics_key.arn}"]
    assert roles["caller"]["parameters"] == [token("caller")]
    assert roles["infer"]["parameters"] == [token("infer")]
    # Objects: the binary for everyone, the model for infer only.
    assert roles["gateway"]["objects"] == roles["caller"]["objects"] == "${local.binary_object_arns}"
    assert roles["infer"]["objects"] == "${concat(local.binary_object_arns, local.infer_gpu ? [] : [local.model_object_arn])}"
    assert roles["gateway"]["log_groups"] == ["${aws_cloudwatch_log_group.journal.arn}", "${aws_cloudwatch_log_group.metrics.arn}"]
    assert roles["caller"]["log_groups"] == roles["infer"]["log_groups"] == ["${aws_cloudwatch_log_group.journal.arn}"]
    for kind, name in (("aws_iam_role", "node"), ("aws_iam_role_policy", "node"),
                       ("aws_iam_role_policy_attachment", "node_ssm_core"), ("aws_iam_instance_profile", "node")):
        assert tf.resources[kind][name]["for_each"] == "${local.node_roles}", kind
    pol = tf.resources["aws_iam_role_policy"]["node"]["policy"]
    assert "ssm:GetParameter" in pol and "Resource = each.value.parameters" in pol
    assert "kms:ViaService" in pol
    # No wildcard action or resource; the only ":*" is a log group's streams.
    assert '"*"' not in pol
    assert re.findall(r":\*", pol) == [":*"] and '":log-stream:*"' not in pol and '${g}:log-stream:*' in pol
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


def test_model_pinned_by_sha256_in_the_private_bucket_once(tf):
    v = tf.variables
    assert v["model_url"]["default"].startswith("https://huggingface.co/ggml-org/gemma-3-270m-it-GGUF/")
    assert v["model_url"]["default"].endswith("gemma-3-270m-it-Q8_0.gguf")
    assert re.fullmatch(r"[0-9a-f]{64}", v["model_sha256"]["default"])
    # The object: in the private, versioned, KMS-encrypted artifact bucket, content-addressed by its sha256.
    obj = tf.resources["aws_s3_object"]["model"]
    assert obj["bucket"] == "${aws_s3_bucket.artifacts.id}"
    assert obj["key"] == "${local.model_object_key}" and tf.locals["model_object_key"] == "models/${var.model_sha256}/model.gguf"
    assert obj["kms_key_id"] == "${aws_kms_key.meshd.arn}"
    assert obj["source"] == "${local.model_local_path}" and obj["source_hash"] == "${var.model_sha256}"
    assert "filesha256(local.model_local_path)" in json.dumps(block(obj, "lifecycle")["precondition"])
    assert obj["count"] == "${var.model_upload ? 1 : 0}", "or uploaded beforehand"
    assert tf.locals["model_s3_uri"] == "s3://${aws_s3_bucket.artifacts.id}/${local.model_object_key}"
    # The VMs fetch it through the S3 gateway endpoint (its policy admits the bucket's objects) and never from the web.
    ep = json.dumps(tf.resources["aws_vpc_endpoint"]["s3"]["policy"])
    assert "${aws_s3_bucket.artifacts.arn}/*" in ep
    bootstrap = (REPO / "cloud-init" / "meshd-bootstrap.sh").read_text()
    assert '"$AWS" s3 cp --only-show-errors "$MESHD_MODEL_S3_URI" "$MODEL.part"' in bootstrap
    assert "MESHD_MODEL_URL" not in bootstrap


def test_gpu_instance_types_use_the_upstream_engine(tf):
    v = tf.variables
    assert v["infer_gpu_instance_types"]["default"] == []
    assert "var.infer_gpu_ami_id != null" in json.dumps(v["infer_gpu_ami_id"]["validation"])
    assert tf.locals["infer_gpu"] == "${length(var.infer_gpu_instance_types) > 0}"
    assert tf.locals["infer_instance_types"] == "${local.infer_gpu ? var.infer_gpu_instance_types : var.infer_instance_types}"
    assert "local.infer_gpu ? var.infer_gpu_ami_id" in json.dumps(tf.locals["worker_groups"])


def test_variables_have_types_and_descriptions(tf):
    for name, v in tf.variables.items():
        assert v.get("type"), f"variable {name} has no type"
        assert v.get("description"), f"variable {name} has no description"


# ---- outputs ----------------------------------------------------------------------------------------------------------


def test_outputs_ready_to_paste_curl(tf):
    o = tf.outputs
    for name in ("api_dns_name", "gateway_private_ips", "gateways_dns_name", "worker_groups", "api_key", "api_ca_pem",
                 "api_base_url", "curl_readyz", "curl_add_two_numbers", "curl_chat_completions", "roll_gateways",
                 "worker_token_parameters", "api_keys_parameter", "gateway_tls_key_parameter", "state_backend",
                 "model_s3_uri", "alarm_topic_arn"):
        assert name in o and o[name].get("description"), name
    # The worker tokens' parameters by role (names only, never values).
    assert re.sub(r"\s+", "", o["worker_token_parameters"]["value"]) == \
        "${{forrole,pinaws_ssm_parameter.worker_token:role=>p.name}}"
    assert "sensitive" not in o["worker_token_parameters"]
    assert o["api_ca_pem"]["value"] == "${tls_self_signed_cert.ca.cert_pem}"
    assert "sensitive" not in o["api_ca_pem"], "the CA certificate is public"
    assert tf.locals["api_base_url"] == "https://${aws_lb.api.dns_name}"
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


def test_alarms_5xx_queue_workers_gateways_state(tf):
    a = tf.resources["aws_cloudwatch_metric_alarm"]
    assert a["api_5xx"]["metric_name"] == "meshd_http_requests_total"
    assert a["api_5xx"]["dimensions"] == {"status_class": "5xx"}
    assert "local.queue_per_worker" in json.dumps(a["inference_queue"])
    nw = a["no_workers"]
    assert nw["metric_name"] == "meshd_function_workers" and nw["treat_missing_data"] == "breaching"
    assert a["gateway_unhealthy"]["metric_name"] == "UnHealthyHostCount"
    assert a["gateway_unhealthy"]["namespace"] == "AWS/NetworkELB"
    st = json.dumps(tf.locals["state_alarm_targets"])
    assert "AWS/MemoryDB" in st and "AWS/ElastiCache" in st
    for name, alarm in a.items():
        if name != "infer_backlog":
            assert alarm["alarm_actions"] == "${local.alarm_actions}", name
    assert tf.resources["aws_sns_topic"]["alarms"]["kms_master_key_id"] == "${aws_kms_key.meshd.arn}"
    # The journal of every VM goes to CloudWatch (the agent the bootstrap configures).
    assert tf.resources["aws_cloudwatch_log_group"]["journal"]["name"] == "/${var.name}/journal"
    assert '"file_path": "/var/log/syslog"' in (REPO / "cloud-init" / "meshd-bootstrap.sh").read_text()


# ---- variable validations, evaluated by the real Terraform (offline: `terraform console`, no providers) ----------------

VALIDATION_CASES = [
    ({}, None),
    ({"allowed_api_cidrs": ["0.0.0.0/0"]}, "allow_public_api"),
    ({"allowed_api_cidrs": ["10.0.0.0/0"]}, "allow_public_api"),
    ({"allowed_api_cidrs": ["0.0.0.0/0"], "allow_public_api": "true"}, None),
    ({"allowed_api_cidrs": []}, "non-empty"),
    ({"allowed_api_cidrs": ["not-a-cidr"]}, "IPv4 CIDR"),
    ({"gateway_count": "1"}, "gateway_count"),
    ({"gateway_count": "2.5"}, "gateway_count"),
    ({"gateway_count": "9"}, "gateway_count"),
    ({"gateway_count": "3"}, None),
    ({"public_subnet_cidrs": ["10.20.1.0/24"], "private_subnet_cidrs": ["10.20.11.0/24"]}, "public_subnet_cidrs"),
    ({"private_subnet_cidrs": ["10.20.11.0/24"]}, "one CIDR per availability zone"),
    ({"availability_zones": ["us-east-1a"]}, "availability_zones"),
    ({"availability_zones": ["us-east-1a", "us-east-1b"]}, None),
    ({"infer_min_size": "0"}, "infer_min_size"),
    ({"infer_min_size": "3", "infer_max_size": "2"}, "infer_max_size"),
    ({"infer_on_demand_base_capacity": "7"}, "infer_on_demand_base_capacity"),
    ({"infer_gpu_instance_types": ["g6.xlarge"]}, "infer_gpu_ami_id is required"),
    ({"infer_gpu_instance_types": ["g6.xlarge"], "infer_gpu_ami_id": "ami-0123456789abcdef0"}, None),
    ({"infer_upstream_url": "http://10.0.0.5:8000"}, "infer_upstream_url"),
    ({"state_backend": "redis"}, "state_backend"),
    ({"state_backend": "elasticache"}, None),
    ({"memorydb_node_type": "cache.t4g.small"}, "memorydb_node_type"),
    ({"alarm_email": "not-an-address"}, "alarm_email"),
    ({"alarm_email": "ops@example.com"}, None),
    ({"meshd_binary_url": "https://example.com/meshd"}, "meshd_binary_sha256 is required"),
    ({"meshd_binary_url": "http://example.com/meshd", "meshd_binary_sha256": "a" * 64}, "https://"),
    ({"meshd_binary_url": "https://example.com/meshd", "meshd_binary_sha256": "a" * 64}, None),
    ({"model_sha256": "abc"}, "model_sha256"),
    ({"log_retention_days": "30"}, "log_retention_days"),
    ({"vpc_cidr": "10.20.0.0"}, "vpc_cidr"),
    ({"gateway_private_ip_hostnum": "5"}, "gateway_private_ip_hostnum"),
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
    expr = expr.replace("random_password.metrics_key.result", '"stand-in-metrics-key"')
    extra = "c" * 64
    out, err = terraform_console(exe, d, f"jsonencode({expr})", {**VALID, "extra_api_key_sha256": [extra]})
    assert err is None, err
    value = json.loads(json.loads(out))
    assert value == (f"sha256:{hashlib.sha256(b'stand-in-key').hexdigest()}\nsha256:{extra}\n"
                     f"sha256:{hashlib.sha256(b'stand-in-metrics-key').hexdigest()}")
    assert "stand-in-key" not in value and "stand-in-metrics-key" not in value
