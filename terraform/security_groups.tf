# Security groups. SG rules are stateful: replies to allowed connections are always let through.
#
#   nlb      in : tcp/443   from var.allowed_api_cidrs           (public API; the first allow-list)
#           out : tcp/3111  to the gateways' security group      (client traffic and the /readyz health checks)
#   gateway  in : tcp/3111  from var.allowed_api_cidrs           (API through the NLB, which preserves the client's
#                                                                 address: the allow-list holds on the gateway too)
#                 tcp/3111  from each public subnet               (the NLB's health checks come from its nodes' own
#                                                                 addresses there; nothing else lives in them)
#                 tcp/49134 from the workers' security group      (worker mesh)
#           out : tcp/443   to anywhere                           (SSM, S3 endpoint, CloudWatch)
#                 tcp/6379  to the state store's security group   (rediss://)
#   workers  in : nothing at all
#           out : tcp/49134 to the gateways' security group      (mesh)
#                 tcp/443   to anywhere                           (NAT: SSM, CloudWatch; S3 endpoint: binary, model)
#   state    in : tcp/6379  from the gateways' security group only
#           out : nothing
#
# The NLB's own security group is not referenced by the gateways' on purpose: a reference admits everything that comes
# through the NLB whatever its client address, and the allow-list on the gateways would no longer hold.
# DNS (VPC resolver), the instance metadata service and Amazon Time Sync are link-local and not filtered by SGs.

resource "aws_security_group" "nlb" {
  name_prefix = "${var.name}-nlb-"
  description = "meshd API load balancer: tcp/443 from allowed CIDRs, to the gateways' API port only"
  vpc_id      = aws_vpc.this.id

  tags = { Name = "${var.name}-nlb" }

  lifecycle {
    create_before_destroy = true
  }
}

resource "aws_security_group" "gateway" {
  name_prefix = "${var.name}-gateway-"
  description = "meshd gateways: API from allowed CIDRs through the NLB, mesh from workers only"
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

resource "aws_security_group" "state" {
  name_prefix = "${var.name}-state-"
  description = "meshd state store (MemoryDB or ElastiCache): Redis over TLS from the gateways only"
  vpc_id      = aws_vpc.this.id

  tags = { Name = "${var.name}-state" }

  lifecycle {
    create_before_destroy = true
  }
}

# ---- nlb ------------------------------------------------------------------------------------------------------------

resource "aws_vpc_security_group_ingress_rule" "nlb_api" {
  for_each = toset(var.allowed_api_cidrs)

  security_group_id = aws_security_group.nlb.id
  description       = "meshd public HTTPS API (TCP passthrough) from an allowed CIDR"
  ip_protocol       = "tcp"
  from_port         = local.nlb_port
  to_port           = local.nlb_port
  cidr_ipv4         = each.value
}

resource "aws_vpc_security_group_egress_rule" "nlb_to_gateways" {
  security_group_id            = aws_security_group.nlb.id
  description                  = "Client connections and /readyz health checks to the gateways' API port"
  ip_protocol                  = "tcp"
  from_port                    = local.api_port
  to_port                      = local.api_port
  referenced_security_group_id = aws_security_group.gateway.id
}

# ---- gateway ingress ------------------------------------------------------------------------------------------------

resource "aws_vpc_security_group_ingress_rule" "gateway_api" {
  for_each = toset(var.allowed_api_cidrs)

  security_group_id = aws_security_group.gateway.id
  description       = "meshd HTTPS API from an allowed CIDR, through the NLB (client address preserved)"
  ip_protocol       = "tcp"
  from_port         = local.api_port
  to_port           = local.api_port
  cidr_ipv4         = each.value
}

resource "aws_vpc_security_group_ingress_rule" "gateway_health_checks" {
  for_each = toset(var.public_subnet_cidrs)

  security_group_id = aws_security_group.gateway.id
  description       = "NLB /readyz health checks from its nodes in a public subnet"
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

# ---- gateway egress -------------------------------------------------------------------------------------------------

resource "aws_vpc_security_group_egress_rule" "gateway_https" {
  security_group_id = aws_security_group.gateway.id
  description       = "HTTPS to SSM, S3 (endpoint), CloudWatch and the AWS CLI install"
  ip_protocol       = "tcp"
  from_port         = 443
  to_port           = 443
  cidr_ipv4         = "0.0.0.0/0"
}

resource "aws_vpc_security_group_egress_rule" "gateway_to_state" {
  security_group_id            = aws_security_group.gateway.id
  description                  = "rediss:// to the state store"
  ip_protocol                  = "tcp"
  from_port                    = local.state_port
  to_port                      = local.state_port
  referenced_security_group_id = aws_security_group.state.id
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
  description       = "HTTPS through NAT and the S3 endpoint: SSM, CloudWatch, AWS CLI install, binary, model"
  ip_protocol       = "tcp"
  from_port         = 443
  to_port           = 443
  cidr_ipv4         = "0.0.0.0/0"
}

# ---- state (ingress from the gateways only, no egress) --------------------------------------------------------------

resource "aws_vpc_security_group_ingress_rule" "state_from_gateways" {
  security_group_id            = aws_security_group.state.id
  description                  = "rediss:// from the gateways security group only"
  ip_protocol                  = "tcp"
  from_port                    = local.state_port
  to_port                      = local.state_port
  referenced_security_group_id = aws_security_group.gateway.id
}
