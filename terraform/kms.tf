# One customer-managed key for the stack: the SSM SecureStrings (worker tokens, api-keys, gateway TLS key), the artifact
# bucket, EBS root volumes and the flow-log group. Rotated yearly by AWS. The key policy delegates to IAM; the instance
# roles (iam.tf) may decrypt only through SSM with the encryption context of their own parameters
# (kms:EncryptionContext:PARAMETER_ARN) and through S3 for the artifact bucket.

resource "aws_kms_key" "meshd" {
  description             = "${var.name}: worker tokens, artifacts, EBS volumes, flow logs"
  enable_key_rotation     = true
  deletion_window_in_days = 30

  policy = jsonencode({
    Version = "2012-10-17"
    Statement = [
      {
        Sid       = "AccountAdministration"
        Effect    = "Allow"
        Principal = { AWS = "arn:${local.partition}:iam::${local.account_id}:root" }
        Action    = "kms:*"
        Resource  = "*"
      },
      {
        Sid       = "CloudWatchLogsFlowLogGroup"
        Effect    = "Allow"
        Principal = { Service = "logs.${var.region}.amazonaws.com" }
        Action = [
          "kms:Encrypt*",
          "kms:Decrypt*",
          "kms:ReEncrypt*",
          "kms:GenerateDataKey*",
          "kms:Describe*",
        ]
        Resource = "*"
        Condition = {
          ArnEquals = {
            "kms:EncryptionContext:aws:logs:arn" = "arn:${local.partition}:logs:${var.region}:${local.account_id}:log-group:/${var.name}/vpc-flow-logs"
          }
        }
      },
    ]
  })
}

resource "aws_kms_alias" "meshd" {
  name          = "alias/${var.name}"
  target_key_id = aws_kms_key.meshd.key_id
}
