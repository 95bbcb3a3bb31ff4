locals {
  api_base_url = "http://${aws_eip.gateway.public_ip}:${local.api_port}"
}

output "gateway_public_ip" {
  description = "Elastic IP of the gateway (public API on tcp/3111, reachable from allowed_api_cidrs only)."
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

output "worker_token_parameter" {
  description = "SSM SecureString parameter that holds the worker token."
  value       = aws_ssm_parameter.worker_token.name
}

output "curl_readyz" {
  description = "Ready-to-paste readiness probe (200 once every trigger has a live worker and the model is loaded)."
  value       = "curl -sS -i --max-time 5 ${local.api_base_url}/readyz"
}

output "curl_add_two_numbers" {
  description = "Ready-to-paste request for POST /math/add-two-numbers."
  value = trimspace(<<-EOT
    curl -sS -X POST ${local.api_base_url}/math/add-two-numbers -H 'content-type: application/json' -d '{"a":100,"b":200}'
  EOT
  )
}

output "curl_chat_completions" {
  description = "Ready-to-paste request for POST /v1/chat/completions."
  value = trimspace(<<-EOT
    curl -sS -X POST ${local.api_base_url}/v1/chat/completions -H 'content-type: application/json' -d '{"messages":[{"role":"user","content":"what color is apple?"}]}'
  EOT
  )
}
