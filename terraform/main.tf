data "aws_caller_identity" "current" {}

data "aws_partition" "current" {}

data "aws_availability_zones" "available" {
  #checkov:skip=CKV_AWS_394:Only the first length(public_subnet_cidrs) zone names are used (local.azs), sorted; a zone AWS adds later sorts after them and moves no subnet. availability_zones pins them explicitly.
  state = "available"

  filter {
    name   = "opt-in-status"
    values = ["opt-in-not-required"]
  }
}

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
  ami_id     = coalesce(var.ami_id, data.aws_ami.ubuntu.id)
  # One public and one private subnet per zone.
  azs = coalescelist(coalesce(var.availability_zones, []), slice(data.aws_availability_zones.available.names, 0, length(var.public_subnet_cidrs)))

  # The gateways: gateway-0 in the first zone's private subnet, gateway-1 in the second, ... round robin, each at a
  # fixed address (hostnum, hostnum+1, ... per zone), so a replaced gateway keeps its NLB target, its DNS record and
  # its metric dimension (the CloudWatch agent labels each gateway's series with its private address).
  gateways = {
    for i in range(var.gateway_count) : "gateway-${i}" => {
      zone       = i % length(var.private_subnet_cidrs)
      private_ip = cidrhost(var.private_subnet_cidrs[i % length(var.private_subnet_cidrs)], var.gateway_private_ip_hostnum + floor(i / length(var.private_subnet_cidrs)))
    }
  }

  # Workers follow one private DNS name with one A record per gateway (re-resolved every 5 s): they join every
  # gateway, new ones included, and leave one whose record is gone. The gateways' certificate names it (tls.tf).
  private_zone_name = "${var.name}.internal"
  gateways_fqdn     = "gateways.${local.private_zone_name}"
  gateway_mesh_url  = "wss://${local.gateways_fqdn}:${local.mesh_port}"

  api_port   = 3111
  mesh_port  = 49134
  nlb_port   = 443
  state_port = 6379
}
