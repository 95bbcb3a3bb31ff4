# One customer-managed key for the stack: the SSM SecureStrings (worker tokens, api-keys, gateway TLS key, state
# password, metrics key), the artifact bucket (binary, model), EBS root volumes (the workers' through the Auto Scaling
# service-linked role below), the state store, the log groups and the alarm topic. Rotated yearly by AWS. The key
# policy delegates to IAM; the instance roles (iam.tf) may decrypt only through SSM with the encryption context of
# their own parameters (kms:EncryptionContext:PARAMETER_ARN) and through S3 for the artifact bucket.

resource "aws_kms_key" "meshd" {
  description             = "${var.name}: secrets, artifacts, EBS volumes, state store, logs, alarms"
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
        # The Auto Scaling groups launch the workers with EBS volumes encrypted by this key: their service-linked role
        # (its own, iam.tf) must be able to use it and to grant it to EC2 for the volumes.
        Sid       = "AutoScalingEncryptedVolumes"
        Effect    = "Allow"
        Principal = { AWS = aws_iam_service_linked_role.autoscaling.arn }
        Action    = ["kms:Encrypt", "kms:Decrypt", "kms:ReEncrypt*", "kms:GenerateDataKey*", "kms:DescribeKey"]
        Resource  = "*"
      },
      {
        Sid       = "AutoScalingEncryptedVolumesGrant"
        Effect    = "Allow"
        Principal = { AWS = aws_iam_service_linked_role.autoscaling.arn }
        Action    = ["kms:CreateGrant"]
        Resource  = "*"
        Condition = { Bool = { "kms:GrantIsForAWSResource" = "true" } }
      },
      {
        # CloudWatch alarms publish to the encrypted alarm topic.
        Sid       = "CloudWatchAlarmsToEncryptedTopic"
        Effect    = "Allow"
        Principal = { Service = "cloudwatch.amazonaws.com" }
        Action    = ["kms:Decrypt", "kms:GenerateDataKey*"]
        Resource  = "*"
        Condition = { StringEquals = { "aws:SourceAccount" = local.account_id } }
      },
      {
        Sid       = "CloudWatchLogsStackLogGroups"
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
          ArnLike = {
            "kms:EncryptionContext:aws:logs:arn" = "arn:${local.partition}:logs:${var.region}:${local.account_id}:log-group:/${var.name}/*"
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
