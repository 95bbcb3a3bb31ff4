data "aws_caller_identity" "current" {}

data "aws_partition" "current" {}

# Canonical's Ubuntu 24.04 LTS (amd64): glibc 2.39 runs a meshd built on Debian 12, systemd 255 knows every
# hardening directive of the units, and the SSM agent is preinstalled.
data "aws_ami" "ubuntu" {
  most_recent = true
  owners      = ["099720109477"]

  filter {
    name   = "name"
    values = ["ubuntu/images/hvm-ssd-gp3/ubuntu-noble-24.04-amd64-server-*"]
  }

  filter {
    name   = "architecture"
    values = ["x86_64"]
  }

  filter {
    name   = "virtualization-type"
    values = ["hvm"]
  }
}

locals {
  account_id = data.aws_caller_identity.current.account_id
  partition  = data.aws_partition.current.partition
  az         = coalesce(var.availability_zone, "${var.region}a")
  ami_id     = coalesce(var.ami_id, data.aws_ami.ubuntu.id)

  # The gateway's private address is fixed, so the workers' MESHD_GATEWAY_URL survives a gateway replacement; it is
  # an IP SAN of the gateway certificate (tls.tf), and the workers verify it against the stack's CA (wss://).
  gateway_private_ip = cidrhost(var.public_subnet_cidr, var.gateway_private_ip_hostnum)
  gateway_mesh_url   = "wss://${local.gateway_private_ip}:${local.mesh_port}"

  api_port  = 3111
  mesh_port = 49134
  ssh_port  = 22
}
