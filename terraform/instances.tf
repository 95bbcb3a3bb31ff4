# Three roles, one binary. cloud-init/meshd.yaml.tftpl is rendered once per role; it carries the role's config
# (roles/<role>.toml), its hardened unit (systemd/meshd-<role>.service), the bootstrap script and one public TLS file
# (the gateway's certificate on the gateway, the stack's CA on the workers), gzip+base64-encoded.
# It carries no secret: the worker tokens, the API keys and the gateway's TLS key are read from SSM at boot. Each
# worker reads its own role's token only; the gateway reads every role's token, the API keys and its TLS key (iam.tf).

locals {
  roles = ["gateway", "caller", "infer"]

  # Template variables shared by every role (no secret may ever be added here).
  cloud_init_common = {
    region           = var.region
    binary_s3_uri    = local.binary_s3_uri
    binary_url       = var.meshd_binary_url
    binary_sha256    = local.binary_sha256
    gateway_url      = local.gateway_mesh_url
    model_url        = var.model_url
    model_sha256     = var.model_sha256
    bootstrap_gz_b64 = base64gzip(file("${path.module}/../cloud-init/meshd-bootstrap.sh"))
  }

  # Per role, the same keys: the names of the SSM parameters it reads at boot (empty where the role reads none), and
  # the one TLS file it needs at the path its roles/<role>.toml names (tls_cert on the gateway, gateway_ca on the
  # workers). Public only.
  #   token_parameter (caller, infer):                         its own role's token -> /etc/meshd/worker-token
  #   caller_token_parameter, infer_token_parameter (gateway): every role's token  -> /etc/meshd/tokens/<role>
  cloud_init_role = {
    gateway = {
      token_parameter        = ""
      caller_token_parameter = aws_ssm_parameter.worker_token["caller"].name
      infer_token_parameter  = aws_ssm_parameter.worker_token["infer"].name
      api_keys_parameter     = aws_ssm_parameter.api_keys.name
      tls_key_parameter      = aws_ssm_parameter.gateway_tls_key.name
      tls_pem_path           = "/etc/meshd/tls/gateway.pem"
      tls_pem_gz_b64         = base64gzip(tls_locally_signed_cert.gateway.cert_pem)
    }
    caller = {
      token_parameter        = aws_ssm_parameter.worker_token["caller"].name
      caller_token_parameter = ""
      infer_token_parameter  = ""
      api_keys_parameter     = ""
      tls_key_parameter      = ""
      tls_pem_path           = "/etc/meshd/tls/mesh-ca.pem"
      tls_pem_gz_b64         = base64gzip(tls_self_signed_cert.ca.cert_pem)
    }
    infer = {
      token_parameter        = aws_ssm_parameter.worker_token["infer"].name
      caller_token_parameter = ""
      infer_token_parameter  = ""
      api_keys_parameter     = ""
      tls_key_parameter      = ""
      tls_pem_path           = "/etc/meshd/tls/mesh-ca.pem"
      tls_pem_gz_b64         = base64gzip(tls_self_signed_cert.ca.cert_pem)
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

# The Elastic IP exists before the gateway VM (its address is an IP SAN of the gateway certificate, which the VM's
# user data carries) and is associated with the VM once it runs.
resource "aws_eip" "gateway" {
  domain = "vpc"

  tags = { Name = "${var.name}-gateway" }

  depends_on = [aws_internet_gateway.this]
}

resource "aws_eip_association" "gateway" {
  allocation_id = aws_eip.gateway.allocation_id
  instance_id   = aws_instance.gateway.id
}

resource "aws_instance" "gateway" {
  ami                         = local.ami_id
  instance_type               = var.gateway_instance_type
  subnet_id                   = aws_subnet.public.id
  private_ip                  = local.gateway_private_ip
  associate_public_ip_address = false # the public address is the Elastic IP above
  vpc_security_group_ids      = [aws_security_group.gateway.id]
  iam_instance_profile        = aws_iam_instance_profile.node["gateway"].name
  key_name                    = var.ssh_key_name
  monitoring                  = true
  ebs_optimized               = true

  user_data                   = local.user_data["gateway"]
  user_data_replace_on_change = true

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

  tags = { Name = "${var.name}-gateway", Role = "gateway" }

  lifecycle {
    # A newer Ubuntu image must not replace running VMs on an unrelated apply; roll them on purpose with
    # terraform apply -replace=aws_instance.<role>.
    ignore_changes = [ami]
  }

  depends_on = [aws_s3_object.meshd_binary, aws_iam_role_policy.node, aws_vpc_endpoint.s3]
}

resource "aws_instance" "caller" {
  ami                         = local.ami_id
  instance_type               = var.caller_instance_type
  subnet_id                   = aws_subnet.private.id
  associate_public_ip_address = false
  vpc_security_group_ids      = [aws_security_group.workers.id]
  iam_instance_profile        = aws_iam_instance_profile.node["caller"].name
  key_name                    = var.ssh_key_name
  monitoring                  = true
  ebs_optimized               = true

  user_data                   = local.user_data["caller"]
  user_data_replace_on_change = true

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

  tags = { Name = "${var.name}-caller", Role = "caller" }

  lifecycle {
    # A newer Ubuntu image must not replace running VMs on an unrelated apply; roll them on purpose with
    # terraform apply -replace=aws_instance.<role>.
    ignore_changes = [ami]
  }

  depends_on = [aws_s3_object.meshd_binary, aws_iam_role_policy.node, aws_vpc_endpoint.s3, aws_route_table_association.private]
}

resource "aws_instance" "infer" {
  count = var.infer_count

  ami                         = local.ami_id
  instance_type               = var.infer_instance_type
  subnet_id                   = aws_subnet.private.id
  associate_public_ip_address = false
  vpc_security_group_ids      = [aws_security_group.workers.id]
  iam_instance_profile        = aws_iam_instance_profile.node["infer"].name
  key_name                    = var.ssh_key_name
  monitoring                  = true
  ebs_optimized               = true

  user_data                   = local.user_data["infer"]
  user_data_replace_on_change = true

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

  tags = { Name = "${var.name}-infer-${count.index}", Role = "infer" }

  lifecycle {
    # A newer Ubuntu image must not replace running VMs on an unrelated apply; roll them on purpose with
    # terraform apply -replace=aws_instance.<role>.
    ignore_changes = [ami]
  }

  depends_on = [aws_s3_object.meshd_binary, aws_iam_role_policy.node, aws_vpc_endpoint.s3, aws_route_table_association.private]
}
