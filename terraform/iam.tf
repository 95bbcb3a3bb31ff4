# Three least-privilege instance roles, one per VM role (gateway, caller, infer):
#   - SSM Session Manager (AmazonSSMManagedInstanceCore): shell access without SSH
#   - ssm:GetParameter on exactly the SecureStrings the role needs, kms:Decrypt only through SSM and S3:
#       gateway: every worker role's token (it authenticates each role's workers), the api-keys file, its TLS key,
#                the state store's password and the metrics key
#       caller:  the caller token, nothing else
#       infer:   the infer token, nothing else
#     A worker can read neither the API keys, nor the TLS key, nor the state password, nor the other role's token: a
#     compromised infer VM cannot connect as a caller (and bind the API's triggers), nor a caller as an infer worker.
#   - s3:GetObject on exactly the objects the role needs: the binary (every role; nothing when it comes from
#     meshd_binary_url) and the model (infer only; nothing on GPU nodes, whose engine brings its own)
#   - logs:CreateLogStream / PutLogEvents into the role's own log groups (the CloudWatch agent): the journal group
#     for every role, the metrics group (embedded-metric-format events) for the gateways
#
# AmazonSSMManagedInstanceCore itself allows ssm:GetParameter and ssm:GetParameters on every parameter ("*"), so an
# Allow list alone does not keep a worker away from the gateway's TLS key or the other role's token. Two explicit
# denies do, whatever else is attached to the role later:
#   - DenyOtherParameters: every ssm:GetParameter* (GetParameter, GetParameters, GetParametersByPath,
#     GetParameterHistory) on any parameter but the role's own;
#   - DenyDecryptOfOtherParameters: kms:Decrypt through SSM unless the encryption context is one of the role's own
#     parameters. Parameter Store encrypts every SecureString with the context PARAMETER_ARN = the parameter's ARN, so
#     kms:EncryptionContext:PARAMETER_ARN names the parameter being decrypted; the Allow uses the same condition.

locals {
  node_roles = {
    gateway = {
      description = "meshd gateway VMs: SSM Session Manager, read every worker role's token, the API keys, the TLS key, the state password, the metrics key and the meshd binary; ship logs and metrics"
      parameters = [
        aws_ssm_parameter.worker_token["caller"].arn,
        aws_ssm_parameter.worker_token["infer"].arn,
        aws_ssm_parameter.api_keys.arn,
        aws_ssm_parameter.gateway_tls_key.arn,
        aws_ssm_parameter.state_password.arn,
        aws_ssm_parameter.metrics_key.arn,
      ]
      objects    = local.binary_object_arns
      log_groups = [aws_cloudwatch_log_group.journal.arn, aws_cloudwatch_log_group.metrics.arn]
    }
    caller = {
      description = "meshd caller VMs: SSM Session Manager, read the caller worker token and the meshd binary; ship logs"
      parameters  = [aws_ssm_parameter.worker_token["caller"].arn]
      objects     = local.binary_object_arns
      log_groups  = [aws_cloudwatch_log_group.journal.arn]
    }
    infer = {
      description = "meshd infer VMs: SSM Session Manager, read the infer worker token, the meshd binary and the model; ship logs"
      parameters  = [aws_ssm_parameter.worker_token["infer"].arn]
      objects     = concat(local.binary_object_arns, local.infer_gpu ? [] : [local.model_object_arn])
      log_groups  = [aws_cloudwatch_log_group.journal.arn]
    }
  }
}

resource "aws_iam_role" "node" {
  for_each = local.node_roles

  name        = "${var.name}-${each.key}"
  description = each.value.description

  assume_role_policy = jsonencode({
    Version = "2012-10-17"
    Statement = [{
      Effect    = "Allow"
      Principal = { Service = "ec2.amazonaws.com" }
      Action    = "sts:AssumeRole"
    }]
  })
}

resource "aws_iam_role_policy_attachment" "node_ssm_core" {
  for_each = local.node_roles

  role       = aws_iam_role.node[each.key].name
  policy_arn = "arn:${local.partition}:iam::aws:policy/AmazonSSMManagedInstanceCore"
}

resource "aws_iam_role_policy" "node" {
  for_each = local.node_roles

  name = "meshd-boot"
  role = aws_iam_role.node[each.key].id

  policy = jsonencode({
    Version = "2012-10-17"
    Statement = concat(
      [
        {
          Sid      = "ReadBootSecrets"
          Effect   = "Allow"
          Action   = ["ssm:GetParameter"]
          Resource = each.value.parameters
        },
        {
          Sid         = "DenyOtherParameters"
          Effect      = "Deny"
          Action      = ["ssm:GetParameter*"]
          NotResource = each.value.parameters
        },
        {
          Sid      = "DecryptOwnParametersViaSsm"
          Effect   = "Allow"
          Action   = ["kms:Decrypt"]
          Resource = [aws_kms_key.meshd.arn]
          Condition = {
            StringEquals = {
              "kms:ViaService"                      = ["ssm.${var.region}.amazonaws.com"]
              "kms:EncryptionContext:PARAMETER_ARN" = each.value.parameters
            }
          }
        },
        {
          Sid      = "DenyDecryptOfOtherParameters"
          Effect   = "Deny"
          Action   = ["kms:Decrypt"]
          Resource = [aws_kms_key.meshd.arn]
          Condition = {
            StringEquals    = { "kms:ViaService" = ["ssm.${var.region}.amazonaws.com"] }
            StringNotEquals = { "kms:EncryptionContext:PARAMETER_ARN" = each.value.parameters }
          }
        },
      ],
      [
        {
          Sid    = "ShipLogsToOwnGroups"
          Effect = "Allow"
          Action = ["logs:CreateLogStream", "logs:PutLogEvents", "logs:DescribeLogStreams"]
          Resource = concat(
            each.value.log_groups,
            [for g in each.value.log_groups : "${g}:log-stream:*"],
          )
        },
      ],
      # One conditional per statement: both arms of a conditional must have one type, and [] converts to a list of
      # one statement but not to a tuple of two different ones.
      length(each.value.objects) == 0 ? [] : [
        {
          Sid      = "ReadOwnObjects"
          Effect   = "Allow"
          Action   = ["s3:GetObject"]
          Resource = each.value.objects
        },
      ],
      length(each.value.objects) == 0 ? [] : [
        {
          # The bucket uses an S3 Bucket Key, so the encryption context is the bucket's ARN; an object written
          # without one would carry the object's ARN. Either way: only the artifact bucket, only through S3.
          Sid      = "DecryptOwnObjectsViaS3"
          Effect   = "Allow"
          Action   = ["kms:Decrypt"]
          Resource = [aws_kms_key.meshd.arn]
          Condition = {
            StringEquals = {
              "kms:ViaService"                   = ["s3.${var.region}.amazonaws.com"]
              "kms:EncryptionContext:aws:s3:arn" = concat([aws_s3_bucket.artifacts.arn], each.value.objects)
            }
          }
        },
      ],
    )
  })
}

resource "aws_iam_instance_profile" "node" {
  for_each = local.node_roles

  name = "${var.name}-${each.key}"
  role = aws_iam_role.node[each.key].name
}

# The Auto Scaling groups' own service-linked role (suffix <name>): the KMS key policy names it, so it must exist before
# the key policy does, and it goes with the stack on destroy.
resource "aws_iam_service_linked_role" "autoscaling" {
  aws_service_name = "autoscaling.amazonaws.com"
  custom_suffix    = var.name
  description      = "meshd ${var.name}: launches the worker groups' instances with volumes encrypted by the stack key"
}
