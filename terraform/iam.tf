# One least-privilege instance role for the three roles: they need exactly the same things.
#   - SSM Session Manager (AmazonSSMManagedInstanceCore): shell access without SSH
#   - ssm:GetParameter on the one worker-token parameter, kms:Decrypt only through SSM and S3
#   - s3:GetObject on the one binary object (nothing when the binary comes from meshd_binary_url)

resource "aws_iam_role" "node" {
  name        = "${var.name}-node"
  description = "meshd VMs: SSM Session Manager, read the worker token and the meshd binary"

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
  role       = aws_iam_role.node.name
  policy_arn = "arn:${local.partition}:iam::aws:policy/AmazonSSMManagedInstanceCore"
}

resource "aws_iam_role_policy" "node" {
  name = "meshd-boot"
  role = aws_iam_role.node.id

  policy = jsonencode({
    Version = "2012-10-17"
    Statement = concat(
      [
        {
          Sid      = "ReadWorkerToken"
          Effect   = "Allow"
          Action   = ["ssm:GetParameter"]
          Resource = [aws_ssm_parameter.worker_token.arn]
        },
        {
          Sid      = "DecryptViaSsmAndS3Only"
          Effect   = "Allow"
          Action   = ["kms:Decrypt"]
          Resource = [aws_kms_key.meshd.arn]
          Condition = {
            StringEquals = {
              "kms:ViaService" = ["ssm.${var.region}.amazonaws.com", "s3.${var.region}.amazonaws.com"]
            }
          }
        },
      ],
      local.use_binary_url ? [] : [
        {
          Sid      = "ReadMeshdBinary"
          Effect   = "Allow"
          Action   = ["s3:GetObject"]
          Resource = local.binary_object_arns
        },
      ],
    )
  })
}

resource "aws_iam_instance_profile" "node" {
  name = "${var.name}-node"
  role = aws_iam_role.node.name
}
