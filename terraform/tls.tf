# ---------------------------------------------------------------------------------------------------------------------
# TLS: a private CA for the stack and the gateway's certificate, made here with the hashicorp/tls provider.
#
#   CA (ECDSA P-256, self-signed)         -> its certificate goes to the workers (/etc/meshd/tls/mesh-ca.pem, user data)
#                                            and to you (output api_ca_pem, for curl --cacert); its key stays in the
#                                            Terraform state and signs nothing but the gateway certificate.
#   gateway key (ECDSA P-256)             -> SSM SecureString (KMS) /<name>/gateway-tls-key, read at boot by the gateways
#                                            only, into /etc/meshd/tls/gateway-key.pem (0600); never in user data.
#   gateway certificate (signed by the CA) -> /etc/meshd/tls/gateway.pem (user data; certificates are public), one for
#                                            every gateway. Its DNS SANs are the two names clients dial: the NLB's
#                                            DNS name (https://<nlb>/, TCP passthrough, so TLS ends in meshd) and
#                                            gateways.<name>.internal (the workers' wss:// URL, one A record per
#                                            gateway). Serves HTTPS on :3111 and wss:// on :49134.
# ---------------------------------------------------------------------------------------------------------------------

resource "tls_private_key" "ca" {
  algorithm   = "ECDSA"
  ecdsa_curve = "P256"
}

resource "tls_self_signed_cert" "ca" {
  private_key_pem = tls_private_key.ca.private_key_pem

  subject {
    common_name  = "${var.name} meshd CA"
    organization = "meshd"
  }

  is_ca_certificate     = true
  validity_period_hours = var.tls_ca_validity_days * 24
  # Renewing the CA re-signs the gateway certificate and replaces every VM (their user data carries the CA).
  early_renewal_hours = 90 * 24

  allowed_uses = [
    "cert_signing",
    "crl_signing",
    "digital_signature",
  ]
}

resource "tls_private_key" "gateway" {
  algorithm   = "ECDSA"
  ecdsa_curve = "P256"
}

resource "tls_cert_request" "gateway" {
  private_key_pem = tls_private_key.gateway.private_key_pem

  subject {
    common_name  = "${var.name}-gateway"
    organization = "meshd"
  }

  dns_names = [
    aws_lb.api.dns_name, # https://<nlb dns name>/, the public API
    local.gateways_fqdn, # wss://gateways.<name>.internal:49134, the workers' gateway_url
  ]
}

resource "tls_locally_signed_cert" "gateway" {
  cert_request_pem   = tls_cert_request.gateway.cert_request_pem
  ca_private_key_pem = tls_private_key.ca.private_key_pem
  ca_cert_pem        = tls_self_signed_cert.ca.cert_pem

  validity_period_hours = var.tls_gateway_cert_validity_days * 24
  # Within 30 days of expiry the next apply issues a new certificate (and so replaces the gateway VMs).
  early_renewal_hours = 30 * 24

  allowed_uses = [
    "digital_signature",
    "server_auth",
  ]
}

resource "aws_ssm_parameter" "gateway_tls_key" {
  name        = "/${var.name}/gateway-tls-key"
  description = "meshd gateway TLS private key (PEM, PKCS#8) for HTTPS on the API and wss:// on the mesh"
  type        = "SecureString"
  key_id      = aws_kms_key.meshd.arn
  value       = tls_private_key.gateway.private_key_pem_pkcs8
}
