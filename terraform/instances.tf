# Three roles, one binary. cloud-init/meshd.yaml.tftpl is rendered once per role; it carries the role's config
# (roles/<role>.toml), its hardened unit (systemd/meshd-<role>.service), the drain watcher
# (systemd/meshd-drain-watch.service, cloud-init/meshd-drain-watch.sh), the bootstrap script and one public TLS file (the gateways' certificate on a gateway, the stack's CA on the workers),
# gzip+base64-encoded.
# It carries no secret: the worker tokens, the API keys, the gateways' TLS key, the state store's password and the
# metrics key are read from SSM at boot. Each worker reads its own role's token only; a gateway reads every role's
# token, the API keys, its TLS key, the state password and the metrics key (iam.tf).
#
# The gateways are plain instances at fixed addresses (local.gateways); the workers are Auto Scaling groups
# (workers.tf) whose launch templates carry the same user data.

locals {
  roles = ["gateway", "caller", "infer"]

  infer_gpu = length(var.infer_gpu_instance_types) > 0

  # Template variables shared by every role (no secret may ever be added here).
  cloud_init_common = {
    region           = var.region
    binary_s3_uri    = local.binary_s3_uri
    binary_url       = var.meshd_binary_url
    binary_sha256    = local.binary_sha256
    gateway_url      = local.gateway_mesh_url
    log_group        = aws_cloudwatch_log_group.journal.name
    bootstrap_gz_b64 = base64gzip(file("${path.module}/../cloud-init/meshd-bootstrap.sh"))
    drain_gz_b64     = base64gzip(file("${path.module}/../cloud-init/meshd-drain-watch.sh"))
    drain_unit_gz    = base64gzip(file("${path.module}/../systemd/meshd-drain-watch.service"))
  }

  # Per role, the same keys: the names of the SSM parameters it reads at boot (empty where the role reads none), the
  # one TLS file it needs at the path its roles/<role>.toml names (tls_cert on the gateway, gateway_ca on the
  # workers), the gateway's state store and metrics settings, and infer's model and engine. Public only.
  #   token_parameter (caller, infer):                         its own role's token -> /etc/meshd/worker-token
  #   caller_token_parameter, infer_token_parameter (gateway): every role's token  -> /etc/meshd/tokens/<role>
  cloud_init_role = {
    gateway = {
      token_parameter          = ""
      caller_token_parameter   = aws_ssm_parameter.worker_token["caller"].name
      infer_token_parameter    = aws_ssm_parameter.worker_token["infer"].name
      api_keys_parameter       = aws_ssm_parameter.api_keys.name
      tls_key_parameter        = aws_ssm_parameter.gateway_tls_key.name
      state_password_parameter = aws_ssm_parameter.state_password.name
      metrics_key_parameter    = aws_ssm_parameter.metrics_key.name
      tls_pem_path             = "/etc/meshd/tls/gateway.pem"
      tls_pem_gz_b64           = base64gzip(tls_locally_signed_cert.gateway.cert_pem)
      state_url                = local.state_url
      state_username           = local.state_user
      state_cluster            = tostring(local.state_cluster)
      state_wait_replicas      = tostring(local.state_wait_replicas)
      metrics_log_group        = aws_cloudwatch_log_group.metrics.name
      metrics_namespace        = local.metrics_namespace
      model_s3_uri             = ""
      model_sha256             = ""
      infer_generator          = ""
      upstream_url             = ""
    }
    caller = {
      token_parameter          = aws_ssm_parameter.worker_token["caller"].name
      caller_token_parameter   = ""
      infer_token_parameter    = ""
      api_keys_parameter       = ""
      tls_key_parameter        = ""
      state_password_parameter = ""
      metrics_key_parameter    = ""
      tls_pem_path             = "/etc/meshd/tls/mesh-ca.pem"
      tls_pem_gz_b64           = base64gzip(tls_self_signed_cert.ca.cert_pem)
      state_url                = ""
      state_username           = ""
      state_cluster            = ""
      state_wait_replicas      = ""
      metrics_log_group        = ""
      metrics_namespace        = ""
      model_s3_uri             = ""
      model_sha256             = ""
      infer_generator          = ""
      upstream_url             = ""
    }
    infer = {
      token_parameter          = aws_ssm_parameter.worker_token["infer"].name
      caller_token_parameter   = ""
      infer_token_parameter    = ""
      api_keys_parameter       = ""
      tls_key_parameter        = ""
      state_password_parameter = ""
      metrics_key_parameter    = ""
      tls_pem_path             = "/etc/meshd/tls/mesh-ca.pem"
      tls_pem_gz_b64           = base64gzip(tls_self_signed_cert.ca.cert_pem)
      state_url                = ""
      state_username           = ""
      state_cluster            = ""
      state_wait_replicas      = ""
      metrics_log_group        = ""
      metrics_namespace        = ""
      model_s3_uri             = local.infer_gpu ? "" : local.model_s3_uri
      model_sha256             = local.infer_gpu ? "" : var.model_sha256
      infer_generator          = local.infer_gpu ? "openai" : "llama.cpp"
      upstream_url             = local.infer_gpu ? var.infer_upstream_url : ""
    }
  }

  user_data = {
    for role in local.roles : role => templatefile("${path.module}/../cloud-init/meshd.yaml.tftpl", merge(local.cloud_init_common, local.cloud_init_role[role], {
      role          = role
      config_gz_b64 = base64gzip(file("${path.module}/../roles/${role}.toml"))
      unit_gz_b64   = base64gzip(file("${path.module}/../systemd/meshd-${role}.service"))
    }))
  }
}

# The gateways: one per entry of local.gateways, round robin over the zones' private subnets, each at its fixed
# address (its NLB target and its A record in gateways.<name>.internal). No public address: the API comes in through
# the NLB. No state on the root volume: state::* lives in the state store (state.tf).
resource "aws_instance" "gateway" {
  for_each = local.gateways

  ami                         = local.ami_id
  instance_type               = var.gateway_instance_type
  subnet_id                   = aws_subnet.private[each.value.zone].id
  private_ip                  = each.value.private_ip
  associate_public_ip_address = false
  vpc_security_group_ids      = [aws_security_group.gateway.id]
  iam_instance_profile        = aws_iam_instance_profile.node["gateway"].name
  key_name                    = var.ssh_key_name
  monitoring                  = true
  ebs_optimized               = true

  # The cloud-config gzipped (cloud-init unpacks it): EC2 allows 16 KiB of user data, and the files it carries are
  # gzip+base64 text that compresses again by a quarter.
  user_data_base64 = base64gzip(local.user_data["gateway"])
  # A change of the gateways' user data (a new binary, a renewed certificate) does not replace them all at once:
  # roll them one at a time (docs/DEPLOY.md, "Rolling the gateways"), so the NLB always has one in service.
  user_data_replace_on_change = false

  metadata_options {
    http_endpoint               = "enabled"
    http_tokens                 = "required"
    http_put_response_hop_limit = 1
    instance_metadata_tags      = "disabled"
  }

  root_block_device {
    volume_type           = "gp3"
    volume_size           = var.root_volume_size_gb
    encrypted             = true
    kms_key_id            = aws_kms_key.meshd.arn
    delete_on_termination = true
  }

  tags = { Name = "${var.name}-${each.key}", Role = "gateway" }

  lifecycle {
    # Neither a newer Ubuntu image nor new user data replaces running gateways on an unrelated apply; roll them on
    # purpose, one at a time: terraform apply -replace='aws_instance.gateway["gateway-0"]', wait for the NLB target
    # to be healthy, then the next (output roll_gateways).
    ignore_changes = [ami, user_data, user_data_base64]
  }

  depends_on = [
    aws_s3_object.meshd_binary, aws_iam_role_policy.node, aws_vpc_endpoint.s3,
    aws_route_table_association.private, aws_memorydb_cluster.state, aws_elasticache_replication_group.state,
  ]
}
