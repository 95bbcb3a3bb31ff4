locals {
  api_base_url = "https://${aws_eip.gateway.public_ip}:${local.api_port}"
  # The ready-to-paste commands verify the gateway against the stack's CA, written once next to the state with
  #   terraform output -raw api_ca_pem > meshd-ca.pem
  # and read the API key from the state when they run: it never appears in their text.
  curl_tls  = "--cacert meshd-ca.pem"
  curl_auth = "-H \"Authorization: Bearer $(terraform output -raw api_key)\""
}

output "gateway_public_ip" {
  description = "Elastic IP of the gateway (public HTTPS API on tcp/3111, reachable from allowed_api_cidrs only)."
  value       = aws_eip.gateway.public_ip
}

output "gateway_private_ip" {
  description = "Private IP of the gateway (the workers' mesh endpoint, tcp/49134)."
  value       = aws_instance.gateway.private_ip
}

output "caller_private_ip" {
  description = "Private IP of the caller worker (no public address, no inbound)."
  value       = aws_instance.caller.private_ip
}

output "infer_private_ips" {
  description = "Private IPs of the infer workers (no public address, no inbound)."
  value       = aws_instance.infer[*].private_ip
}

output "instance_ids" {
  description = "Instance ids, for `aws ssm start-session --target <id>`."
  value = {
    gateway = aws_instance.gateway.id
    caller  = aws_instance.caller.id
    infer   = aws_instance.infer[*].id
  }
}

output "ssm_session_gateway" {
  description = "Shell on the gateway through SSM Session Manager (no SSH needed)."
  value       = "aws ssm start-session --region ${var.region} --target ${aws_instance.gateway.id}"
}

output "artifact_bucket" {
  description = "Private bucket that holds the meshd binary."
  value       = aws_s3_bucket.artifacts.id
}

output "worker_token_parameters" {
  description = "SSM SecureString parameters that hold the worker tokens, one per worker role (role => name): each role's VMs read their own, the gateway reads all of them."
  value       = { for role, p in aws_ssm_parameter.worker_token : role => p.name }
}

output "api_key" {
  description = "The generated API key: clients send `Authorization: Bearer <key>`. terraform output -raw api_key"
  value       = random_password.api_key.result
  sensitive   = true
}

output "api_ca_pem" {
  description = "The stack's CA certificate (PEM) that signed the gateway's certificate: terraform output -raw api_ca_pem > meshd-ca.pem, then curl --cacert meshd-ca.pem (or SSL_CERT_FILE / REQUESTS_CA_BUNDLE for SDKs)."
  value       = tls_self_signed_cert.ca.cert_pem
}

output "api_base_url" {
  description = "Base URL of the OpenAI-compatible API (HTTPS, certificate for the Elastic IP signed by api_ca_pem); OpenAI SDKs take <api_base_url>/v1 as base_url."
  value       = local.api_base_url
}

output "api_keys_parameter" {
  description = "SSM SecureString parameter that holds the gateway's api-keys file (sha256 digests of the accepted keys)."
  value       = aws_ssm_parameter.api_keys.name
}

output "gateway_tls_key_parameter" {
  description = "SSM SecureString parameter that holds the gateway's TLS private key."
  value       = aws_ssm_parameter.gateway_tls_key.name
}

output "gateway_cert_not_after" {
  description = "Expiry of the gateway's certificate (RFC 3339); the first apply in its last 30 days renews it and replaces the gateway VM."
  value       = tls_locally_signed_cert.gateway.validity_end_time
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

output "gateway_instance_id" {
  description = "Instance id of the gateway, e.g. for `aws ssm send-command --instance-ids` after rotating the API key."
  value       = aws_instance.gateway.id
}
