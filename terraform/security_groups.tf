# Security groups. SG rules are stateful: replies to allowed connections are always let through.
#
#   gateway  in : tcp/3111  from var.allowed_api_cidrs           (public API)
#                 tcp/49134 from the workers' security group      (worker mesh)
#                 tcp/22    from var.ssh_allowed_cidrs            (only if set; default: none)
#           out : tcp/443   to anywhere                           (SSM, S3, AWS CLI install)
#   workers  in : nothing at all
#           out : tcp/49134 to the gateway's security group       (mesh)
#                 tcp/443   to anywhere                           (NAT: SSM, AWS CLI install, model; S3 endpoint)
#
# DNS (VPC resolver), the instance metadata service and Amazon Time Sync are link-local and not filtered by SGs.

resource "aws_security_group" "gateway" {
  name_prefix = "${var.name}-gateway-"
  description = "meshd gateway: API from allowed CIDRs, mesh from workers only"
  vpc_id      = aws_vpc.this.id

  tags = { Name = "${var.name}-gateway" }

  lifecycle {
    create_before_destroy = true
  }
}

resource "aws_security_group" "workers" {
  name_prefix = "${var.name}-workers-"
  description = "meshd caller and infer workers: no inbound, outbound to the gateway mesh and https"
  vpc_id      = aws_vpc.this.id

  tags = { Name = "${var.name}-workers" }

  lifecycle {
    create_before_destroy = true
  }
}

# ---- gateway ingress ------------------------------------------------------------------------------------------------

resource "aws_vpc_security_group_ingress_rule" "gateway_api" {
  for_each = toset(var.allowed_api_cidrs)

  security_group_id = aws_security_group.gateway.id
  description       = "meshd public HTTP API from an allowed CIDR"
  ip_protocol       = "tcp"
  from_port         = local.api_port
  to_port           = local.api_port
  cidr_ipv4         = each.value
}

resource "aws_vpc_security_group_ingress_rule" "gateway_mesh_from_workers" {
  security_group_id            = aws_security_group.gateway.id
  description                  = "meshd worker mesh (WebSocket) from the workers security group only"
  ip_protocol                  = "tcp"
  from_port                    = local.mesh_port
  to_port                      = local.mesh_port
  referenced_security_group_id = aws_security_group.workers.id
}

resource "aws_vpc_security_group_ingress_rule" "gateway_ssh" {
  for_each = toset(var.ssh_allowed_cidrs)

  security_group_id = aws_security_group.gateway.id
  description       = "Optional SSH from an operator CIDR (off unless ssh_allowed_cidrs is set)"
  ip_protocol       = "tcp"
  from_port         = local.ssh_port
  to_port           = local.ssh_port
  cidr_ipv4         = each.value
}

# ---- gateway egress -------------------------------------------------------------------------------------------------

resource "aws_vpc_security_group_egress_rule" "gateway_https" {
  security_group_id = aws_security_group.gateway.id
  description       = "HTTPS to SSM, S3 (endpoint) and the AWS CLI install"
  ip_protocol       = "tcp"
  from_port         = 443
  to_port           = 443
  cidr_ipv4         = "0.0.0.0/0"
}

# ---- workers egress (no ingress rules at all) -----------------------------------------------------------------------

resource "aws_vpc_security_group_egress_rule" "workers_mesh_to_gateway" {
  security_group_id            = aws_security_group.workers.id
  description                  = "meshd worker mesh to the gateway security group"
  ip_protocol                  = "tcp"
  from_port                    = local.mesh_port
  to_port                      = local.mesh_port
  referenced_security_group_id = aws_security_group.gateway.id
}

resource "aws_vpc_security_group_egress_rule" "workers_https" {
  security_group_id = aws_security_group.workers.id
  description       = "HTTPS through NAT and the S3 endpoint: SSM, AWS CLI install, model download, binary"
  ip_protocol       = "tcp"
  from_port         = 443
  to_port           = 443
  cidr_ipv4         = "0.0.0.0/0"
}
