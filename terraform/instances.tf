# Three roles, one binary. cloud-init/meshd.yaml.tftpl is rendered once per role; it carries the role's config
# (roles/<role>.toml), its hardened unit (systemd/meshd-<role>.service) and the bootstrap script, gzip+base64-encoded.
# It carries no secret: the worker token is read from SSM at boot.

locals {
  roles = ["gateway", "caller", "infer"]

  # Template variables shared by every role (no secret may ever be added here).
  cloud_init_common = {
    region           = var.region
    token_parameter  = aws_ssm_parameter.worker_token.name
    binary_s3_uri    = local.binary_s3_uri
    binary_url       = var.meshd_binary_url
    binary_sha256    = local.binary_sha256
    gateway_url      = local.gateway_mesh_url
    model_url        = var.model_url
    model_sha256     = var.model_sha256
    bootstrap_gz_b64 = base64gzip(file("${path.module}/../cloud-init/meshd-bootstrap.sh"))
  }

  user_data = {
    for role in local.roles : role => templatefile("${path.module}/../cloud-init/meshd.yaml.tftpl", merge(local.cloud_init_common, {
      role          = role
      config_gz_b64 = base64gzip(file("${path.module}/../roles/${role}.toml"))
      unit_gz_b64   = base64gzip(file("${path.module}/../systemd/meshd-${role}.service"))
    }))
  }
}

resource "aws_eip" "gateway" {
  domain   = "vpc"
  instance = aws_instance.gateway.id

  tags = { Name = "${var.name}-gateway" }

  depends_on = [aws_internet_gateway.this]
}

resource "aws_instance" "gateway" {
  ami                         = local.ami_id
  instance_type               = var.gateway_instance_type
  subnet_id                   = aws_subnet.public.id
  private_ip                  = local.gateway_private_ip
  associate_public_ip_address = false # the public address is the Elastic IP above
  vpc_security_group_ids      = [aws_security_group.gateway.id]
  iam_instance_profile        = aws_iam_instance_profile.node.name
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
  iam_instance_profile        = aws_iam_instance_profile.node.name
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
  iam_instance_profile        = aws_iam_instance_profile.node.name
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
