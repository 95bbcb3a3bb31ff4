# ---------------------------------------------------------------------------------------------------------------------
# The worker tokens, one per worker role: generated here, each stored as an SSM SecureString (KMS) at
# /<name>/worker-token/<role>. The gateway accepts each as its role's identity and grants it only that role's
# functions, triggers and state (roles/gateway.toml, [worker_token_files]); there is no token that grants every role.
# Each worker VM reads its own role's token at boot through its instance role, the gateway reads every role's
# (iam.tf). They never appear in user data. Note: like every generated secret they are in the Terraform state,
# so keep the state in an encrypted, access-controlled backend.
# ---------------------------------------------------------------------------------------------------------------------

locals {
  worker_roles = ["caller", "infer"]
}

resource "random_password" "worker_token" {
  for_each = toset(local.worker_roles)

  length  = 48
  special = false
}

resource "aws_ssm_parameter" "worker_token" {
  for_each = toset(local.worker_roles)

  name        = "/${var.name}/worker-token/${each.key}"
  description = "meshd ${each.key} worker token: ${each.key} workers present it in Hello; the gateway grants it the ${each.key} role only"
  type        = "SecureString"
  key_id      = aws_kms_key.meshd.arn
  value       = random_password.worker_token[each.key].result
}

# ---------------------------------------------------------------------------------------------------------------------
# The API key: clients send `Authorization: Bearer <key>` (terraform output -raw api_key). The SSM SecureString holds
# the gateway's api-keys file, and that file holds only SHA-256 digests (`sha256:<hex>` lines): the gateway never
# stores the key itself, and neither does SSM. Read at boot by the gateway only, into /etc/meshd/api-keys (0600).
# extra_api_key_sha256 adds more accepted keys (another client, or the old key while you rotate).
# ---------------------------------------------------------------------------------------------------------------------

resource "random_password" "api_key" {
  length  = 48
  special = false
}

resource "aws_ssm_parameter" "api_keys" {
  name        = "/${var.name}/api-keys"
  description = "meshd gateway api_keys_file: sha256:<hex> digests of the accepted API keys, one per line"
  type        = "SecureString"
  key_id      = aws_kms_key.meshd.arn
  value = join("\n", [
    for digest in concat([sha256(random_password.api_key.result)], var.extra_api_key_sha256, [sha256(random_password.metrics_key.result)]) : "sha256:${digest}"
  ])
}

# ---------------------------------------------------------------------------------------------------------------------
# The metrics key: GET /metrics needs an API key, and each gateway's CloudWatch agent scrapes its own gateway with this
# one (its digest is the last line of the api-keys file). Stored as an SSM SecureString that only the gateways read,
# into a root-only file the agent (root) sends as a bearer token over loopback. It is an API key like the others:
# rotate it with `terraform apply -replace=random_password.metrics_key` and roll the gateways.
# ---------------------------------------------------------------------------------------------------------------------

resource "random_password" "metrics_key" {
  length  = 48
  special = false
}

resource "aws_ssm_parameter" "metrics_key" {
  name        = "/${var.name}/metrics-key"
  description = "meshd gateways: the API key each gateway's CloudWatch agent sends to scrape its own GET /metrics"
  type        = "SecureString"
  key_id      = aws_kms_key.meshd.arn
  value       = random_password.metrics_key.result
}

# ---------------------------------------------------------------------------------------------------------------------
# The model registry: the GGUF goes into the private bucket once, at models/<sha256>/model.gguf (content-addressed: a
# new model is a new key, the old one stays until removed), uploaded by Terraform from model_path or put there
# beforehand (model_upload = false). Infer VMs fetch it through the S3 gateway endpoint (no NAT, no internet), check
# its sha256 and keep it on their root volume across reboots and in the warm pool.
# ---------------------------------------------------------------------------------------------------------------------

locals {
  model_local_path = var.model_path != "" ? var.model_path : "${path.module}/../models/gemma-3-270m-it-Q8_0.gguf"
  model_object_key = "models/${var.model_sha256}/model.gguf"
  model_s3_uri     = "s3://${aws_s3_bucket.artifacts.id}/${local.model_object_key}"
  model_object_arn = "${aws_s3_bucket.artifacts.arn}/${local.model_object_key}"
}

resource "aws_s3_object" "model" {
  count = var.model_upload ? 1 : 0

  bucket       = aws_s3_bucket.artifacts.id
  key          = local.model_object_key
  source       = local.model_local_path
  source_hash  = var.model_sha256
  kms_key_id   = aws_kms_key.meshd.arn
  content_type = "application/octet-stream"

  lifecycle {
    precondition {
      condition     = try(filesha256(local.model_local_path), "") == var.model_sha256
      error_message = "model_path (${local.model_local_path}) is missing or its sha256 is not model_sha256. Fetch it first: meshd model pull ${var.model_url} --sha256 ${var.model_sha256} --out ${local.model_local_path}"
    }
  }

  depends_on = [
    aws_s3_bucket_server_side_encryption_configuration.artifacts,
    aws_s3_bucket_public_access_block.artifacts,
    aws_s3_bucket_ownership_controls.artifacts,
  ]
}

# ---------------------------------------------------------------------------------------------------------------------
# The release binary: uploaded from meshd_binary_path to a private bucket, or taken from meshd_binary_url.
# VMs fetch it through the S3 gateway endpoint and refuse it unless its sha256 matches.
# The default path is target/dist/meshd, what scripts/release makes: run scripts/release first. It is the stripped
# target/release/meshd (~14 MB instead of ~140 MB: the release profile keeps line tables), with its debug sections in
# target/dist/meshd.debug (never uploaded) and its sha256 in target/dist/meshd.sha256, equal to filesha256() below.
# ---------------------------------------------------------------------------------------------------------------------

locals {
  use_binary_url     = var.meshd_binary_url != ""
  binary_local_path  = var.meshd_binary_path != "" ? var.meshd_binary_path : "${path.module}/../target/dist/meshd"
  binary_sha256      = var.meshd_binary_sha256 != "" ? var.meshd_binary_sha256 : (local.use_binary_url ? "" : filesha256(local.binary_local_path))
  binary_object_key  = "meshd/${local.binary_sha256}/meshd"
  binary_s3_uri      = local.use_binary_url ? "" : "s3://${aws_s3_bucket.artifacts.id}/${local.binary_object_key}"
  binary_object_arns = local.use_binary_url ? [] : ["${aws_s3_bucket.artifacts.arn}/${local.binary_object_key}"]
}

resource "aws_s3_bucket" "artifacts" {
  #checkov:skip=CKV_AWS_18:Private artifact bucket written only by Terraform and read only by the stack's instance role; reads are audited by CloudTrail. Server access logs would need a second bucket that holds nothing of value.
  #checkov:skip=CKV_AWS_144:Artifacts are re-uploaded by terraform apply; cross-region replication would only copy a binary and a model the operator has locally.
  #checkov:skip=CKV2_AWS_62:No consumer for object events; the bucket changes only on terraform apply.
  bucket_prefix = "${var.name}-artifacts-"
  force_destroy = true
}

resource "aws_s3_bucket_public_access_block" "artifacts" {
  bucket                  = aws_s3_bucket.artifacts.id
  block_public_acls       = true
  block_public_policy     = true
  ignore_public_acls      = true
  restrict_public_buckets = true
}

resource "aws_s3_bucket_ownership_controls" "artifacts" {
  bucket = aws_s3_bucket.artifacts.id

  rule {
    object_ownership = "BucketOwnerEnforced"
  }
}

resource "aws_s3_bucket_versioning" "artifacts" {
  bucket = aws_s3_bucket.artifacts.id

  versioning_configuration {
    status = "Enabled"
  }
}

resource "aws_s3_bucket_server_side_encryption_configuration" "artifacts" {
  bucket = aws_s3_bucket.artifacts.id

  rule {
    apply_server_side_encryption_by_default {
      sse_algorithm     = "aws:kms"
      kms_master_key_id = aws_kms_key.meshd.arn
    }
    bucket_key_enabled = true
  }
}

resource "aws_s3_bucket_lifecycle_configuration" "artifacts" {
  bucket = aws_s3_bucket.artifacts.id

  rule {
    id     = "expire-replaced-artifacts"
    status = "Enabled"

    filter {}

    noncurrent_version_expiration {
      noncurrent_days = 30
    }

    abort_incomplete_multipart_upload {
      days_after_initiation = 1
    }
  }

  depends_on = [aws_s3_bucket_versioning.artifacts]
}

# TLS only.
resource "aws_s3_bucket_policy" "artifacts" {
  bucket = aws_s3_bucket.artifacts.id

  policy = jsonencode({
    Version = "2012-10-17"
    Statement = [{
      Sid       = "DenyInsecureTransport"
      Effect    = "Deny"
      Principal = "*"
      Action    = "s3:*"
      Resource  = [aws_s3_bucket.artifacts.arn, "${aws_s3_bucket.artifacts.arn}/*"]
      Condition = { Bool = { "aws:SecureTransport" = "false" } }
    }]
  })

  depends_on = [aws_s3_bucket_public_access_block.artifacts]
}

resource "aws_s3_object" "meshd_binary" {
  count = local.use_binary_url ? 0 : 1

  bucket      = aws_s3_bucket.artifacts.id
  key         = local.binary_object_key
  source      = local.binary_local_path
  source_hash = local.binary_sha256
  kms_key_id  = aws_kms_key.meshd.arn

  content_type = "application/octet-stream"

  lifecycle {
    precondition {
      condition     = filesha256(local.binary_local_path) == local.binary_sha256
      error_message = "meshd_binary_sha256 does not match the sha256 of meshd_binary_path; the VMs would refuse the binary."
    }
  }

  depends_on = [
    aws_s3_bucket_server_side_encryption_configuration.artifacts,
    aws_s3_bucket_public_access_block.artifacts,
    aws_s3_bucket_ownership_controls.artifacts,
  ]
}
