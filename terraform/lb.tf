# ---------------------------------------------------------------------------------------------------------------------
# The public API: a Network Load Balancer across the public subnets, TCP passthrough 443 -> 3111 on every gateway, so
# TLS (and the API key check) stays end to end in meshd. Client addresses are preserved (instance targets), so the
# gateways' security group applies the same allow-list as the NLB's. A gateway is in service while GET /readyz over
# HTTPS answers 200 (every trigger's function has a live worker, the model is loaded).
# ---------------------------------------------------------------------------------------------------------------------

resource "aws_lb" "api" {
  #checkov:skip=CKV_AWS_91:Access logs of an NLB cover TLS listeners only; this one passes TCP through (TLS ends in meshd, which logs every request with its trace id to the journal shipped to CloudWatch).
  #checkov:skip=CKV_AWS_150:Deletion protection would make terraform destroy fail; the NLB holds no state and is recreated by apply.
  name                             = "${var.name}-api"
  internal                         = false
  load_balancer_type               = "network"
  subnets                          = aws_subnet.public[*].id
  security_groups                  = [aws_security_group.nlb.id]
  enable_cross_zone_load_balancing = true # a zone whose gateway is down still serves through the others
  ip_address_type                  = "ipv4"

  tags = { Name = "${var.name}-api" }
}

resource "aws_lb_target_group" "gateways" {
  name                 = "${var.name}-gateways"
  port                 = local.api_port
  protocol             = "TCP"
  target_type          = "instance"
  vpc_id               = aws_vpc.this.id
  preserve_client_ip   = true
  deregistration_delay = 30 # > drain_timeout_secs (20): a deregistered gateway finishes what it holds

  health_check {
    protocol            = "HTTPS"
    port                = "traffic-port"
    path                = "/readyz"
    matcher             = "200"
    interval            = 10
    timeout             = 5
    healthy_threshold   = 2
    unhealthy_threshold = 2
  }

  tags = { Name = "${var.name}-gateways" }
}

resource "aws_lb_listener" "api" {
  #checkov:skip=CKV_AWS_2:TCP passthrough on purpose: TLS ends in meshd (HTTPS on :3111), not on the load balancer.
  #checkov:skip=CKV_AWS_103:No TLS on the listener to configure: it passes TCP through and meshd serves TLS 1.2+ (rustls).
  load_balancer_arn = aws_lb.api.arn
  port              = local.nlb_port
  protocol          = "TCP"

  default_action {
    type             = "forward"
    target_group_arn = aws_lb_target_group.gateways.arn
  }
}

resource "aws_lb_target_group_attachment" "gateway" {
  for_each = local.gateways

  target_group_arn = aws_lb_target_group.gateways.arn
  target_id        = aws_instance.gateway[each.key].id
  port             = local.api_port
}

# ---------------------------------------------------------------------------------------------------------------------
# How the workers find the gateways: a private hosted zone <name>.internal with gateways.<name>.internal holding one
# A record per gateway (fixed private addresses, so a replaced gateway keeps its record). Each worker resolves it
# every 5 s and joins every address, so adding a gateway (gateway_count) needs no change on any worker.
# ---------------------------------------------------------------------------------------------------------------------

resource "aws_route53_zone" "private" {
  #checkov:skip=CKV2_AWS_38:DNSSEC signing applies to public hosted zones; this zone is private to the VPC.
  #checkov:skip=CKV2_AWS_39:Query logging of a private zone would log the workers' lookups of one name every 5 s; the VPC flow logs already record who talks to the gateways.
  name    = local.private_zone_name
  comment = "meshd ${var.name}: the gateways' private name for the workers"

  vpc {
    vpc_id = aws_vpc.this.id
  }
}

resource "aws_route53_record" "gateways" {
  zone_id = aws_route53_zone.private.zone_id
  name    = local.gateways_fqdn
  type    = "A"
  ttl     = 10
  records = [for k, g in aws_instance.gateway : g.private_ip]
}
