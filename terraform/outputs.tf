locals {
  api_base_url = "https://${aws_lb.api.dns_name}"
  # The ready-to-paste commands verify the gateways against the stack's CA, written once next to the state with
  #   terraform output -raw api_ca_pem > meshd-ca.pem
  # and read the API key from the state when they run: it never appears in their text.
  curl_tls  = "--cacert meshd-ca.pem"
  curl_auth = "-H \"Authorization: Bearer $(terraform output -raw api_key)\""
}

output "api_dns_name" {
  description = "DNS name of the Network Load Balancer (public HTTPS API on tcp/443, reachable from allowed_api_cidrs only; TLS ends in the gateways, whose certificate names it)."
  value       = aws_lb.api.dns_name
}

output "gateway_private_ips" {
  description = "Private addresses of the gateways (gateway-N => address): the NLB's targets and the A records of gateways.<name>.internal, the workers' mesh endpoint (tcp/49134)."
  value       = { for k, g in local.gateways : k => g.private_ip }
}

output "gateways_dns_name" {
  description = "The private name the workers join (one A record per gateway, re-resolved every 5 s)."
  value       = local.gateways_fqdn
}

output "worker_groups" {
  description = "The workers' Auto Scaling groups: `aws autoscaling describe-auto-scaling-groups --auto-scaling-group-names <name>`."
  value = {
    caller     = aws_autoscaling_group.caller.name
    infer      = aws_autoscaling_group.infer.name
    infer_warm = aws_autoscaling_group.infer_warm.name
  }
}

output "instance_ids" {
  description = "Gateway instance ids, for `aws ssm start-session --target <id>` (workers: see worker_groups)."
  value       = { for k, i in aws_instance.gateway : k => i.id }
}

output "roll_gateways" {
  description = "Rolling the gateways one at a time (a new binary or certificate): run each command, then wait for its NLB target to be healthy before the next."
  value       = [for k in keys(local.gateways) : "terraform apply -replace='aws_instance.gateway[\"${k}\"]'"]
}

output "state_backend" {
  description = "The gateways' state store: backend and rediss:// URL (ACL user <name>-gateway, password in SSM)."
  value       = { backend = var.state_backend, url = local.state_url, user = local.state_user }
}

output "artifact_bucket" {
  description = "Private bucket that holds the meshd binary and the model (models/<sha256>/model.gguf)."
  value       = aws_s3_bucket.artifacts.id
}

output "model_s3_uri" {
  description = "Where the infer VMs fetch the model from (through the S3 gateway endpoint)."
  value       = local.model_s3_uri
}

output "worker_token_parameters" {
  description = "SSM SecureString parameters that hold the worker tokens, one per worker role (role => name): each role's VMs read their own, the gateways read all of them."
  value       = { for role, p in aws_ssm_parameter.worker_token : role => p.name }
}

output "api_key" {
  description = "The generated API key: clients send `Authorization: Bearer <key>`. terraform output -raw api_key"
  value       = random_password.api_key.result
  sensitive   = true
}

output "api_ca_pem" {
  description = "The stack's CA certificate (PEM) that signed the gateways' certificate: terraform output -raw api_ca_pem > meshd-ca.pem, then curl --cacert meshd-ca.pem (or SSL_CERT_FILE / REQUESTS_CA_BUNDLE for SDKs)."
  value       = tls_self_signed_cert.ca.cert_pem
}

output "api_base_url" {
  description = "Base URL of the OpenAI-compatible API (HTTPS through the NLB, certificate for its DNS name signed by api_ca_pem); OpenAI SDKs take <api_base_url>/v1 as base_url."
  value       = local.api_base_url
}

output "api_keys_parameter" {
  description = "SSM SecureString parameter that holds the gateways' api-keys file (sha256 digests of the accepted keys)."
  value       = aws_ssm_parameter.api_keys.name
}

output "gateway_tls_key_parameter" {
  description = "SSM SecureString parameter that holds the gateways' TLS private key."
  value       = aws_ssm_parameter.gateway_tls_key.name
}

output "gateway_cert_not_after" {
  description = "Expiry of the gateways' certificate (RFC 3339); the first apply in its last 30 days renews it: then roll the gateways (roll_gateways)."
  value       = tls_locally_signed_cert.gateway.validity_end_time
}

output "alarm_topic_arn" {
  description = "SNS topic of the alarms (5xx, inference queue, workers, gateways, state store); subscribe more endpoints to it."
  value       = aws_sns_topic.alarms.arn
}

output "curl_readyz" {
  description = "Ready-to-paste readiness probe (200 once every trigger has a live worker and the model is loaded; /readyz needs no key). Run it in terraform/ after writing meshd-ca.pem."
  value       = "curl -sS -i --max-time 5 ${local.curl_tls} ${local.api_base_url}/readyz"
}

output "curl_add_two_numbers" {
  description = "Ready-to-paste request for POST /math/add-two-numbers (HTTPS with meshd-ca.pem, bearer key read from the state when it runs). Run it in terraform/."
  value = trimspace(<<-EOT
    curl -sS ${local.curl_tls} ${local.curl_auth} -X POST ${local.api_base_url}/math/add-two-numbers -H 'content-type: application/json' -d '{"a":100,"b":200}'
  EOT
  )
}

output "curl_chat_completions" {
  description = "Ready-to-paste request for POST /v1/chat/completions (HTTPS with meshd-ca.pem, bearer key read from the state when it runs). Run it in terraform/."
  value = trimspace(<<-EOT
    curl -sS ${local.curl_tls} ${local.curl_auth} -X POST ${local.api_base_url}/v1/chat/completions -H 'content-type: application/json' -d '{"messages":[{"role":"user","content":"what color is apple?"}]}'
  EOT
  )
}
