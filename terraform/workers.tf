# ---------------------------------------------------------------------------------------------------------------------
# The workers: Auto Scaling groups over every zone's private subnet, from launch templates that carry the role's user
# data. No public address, no inbound (security_groups.tf), IMDSv2, encrypted root volumes.
#
#   caller      fixed size (caller_count), on-demand.
#   infer       the elastic tier: mixed instances (infer_on_demand_base_capacity on-demand, spot above it, any of
#               infer_instance_types), target tracking on the inference queue per worker (below), capacity
#               rebalancing (a replacement is started when AWS signals a spot instance is at risk).
#   infer_warm  on-demand, with a warm pool of stopped instances that already hold the model: AWS refuses a warm pool
#               on a group with a mixed instances policy or spot, so the warm pool has a group of its own. Min 0; step
#               scaling takes workers from the pool when the queue per worker stays above twice the target (spot
#               capacity short, or the infer group still launching).
#
# Every group has a termination lifecycle hook: the instance waits in Terminating:Wait while the drain watcher
# (systemd/meshd-drain-watch.service) sees autoscaling/target-lifecycle-state say Terminated and stops meshd (SIGTERM:
# the worker tells its gateways, finishes what it holds within drain_timeout_secs, exits). The same watcher drains on
# the two-minute spot interruption notice (spot/instance-action). The hook then times out with CONTINUE.
# A worker whose process keeps failing (systemd's restart limit) powers its VM off (StartLimitAction=poweroff in the
# unit), and the group's EC2 health check replaces the stopped instance.
# ---------------------------------------------------------------------------------------------------------------------

locals {
  worker_groups = {
    caller = { image_id = local.ami_id, instance_type = var.caller_instance_type }
    infer = {
      image_id      = local.infer_gpu ? var.infer_gpu_ami_id : local.ami_id
      instance_type = local.infer_gpu ? var.infer_gpu_instance_types[0] : var.infer_instance_types[0]
    }
  }
  infer_instance_types = local.infer_gpu ? var.infer_gpu_instance_types : var.infer_instance_types
  # Hook timeout: drain_timeout_secs (20) + systemd's stop margin (TimeoutStopSec=30) + the watcher's poll (5 s) and
  # slack. Past it the instance goes anyway (CONTINUE).
  drain_hook_timeout = 90
}

resource "aws_launch_template" "worker" {
  for_each = local.worker_groups

  name_prefix            = "${var.name}-${each.key}-"
  description            = "meshd ${each.key} worker"
  image_id               = each.value.image_id
  instance_type          = each.value.instance_type
  key_name               = var.ssh_key_name
  ebs_optimized          = true
  update_default_version = true
  user_data              = base64gzip(local.user_data[each.key]) # gzipped cloud-config (instances.tf)

  iam_instance_profile {
    name = aws_iam_instance_profile.node[each.key].name
  }

  network_interfaces {
    associate_public_ip_address = false
    delete_on_termination       = true
    security_groups             = [aws_security_group.workers.id]
  }

  metadata_options {
    http_endpoint               = "enabled"
    http_tokens                 = "required"
    http_put_response_hop_limit = 1
    instance_metadata_tags      = "disabled"
  }

  monitoring {
    enabled = true
  }

  block_device_mappings {
    device_name = "/dev/sda1"

    ebs {
      volume_type           = "gp3"
      volume_size           = var.root_volume_size_gb
      encrypted             = true
      kms_key_id            = aws_kms_key.meshd.arn
      delete_on_termination = true
    }
  }

  tag_specifications {
    resource_type = "instance"
    tags          = merge(var.tags, { Name = "${var.name}-${each.key}", Role = each.key, Project = "meshd", Stack = var.name })
  }

  tag_specifications {
    resource_type = "volume"
    tags          = merge(var.tags, { Name = "${var.name}-${each.key}", Role = each.key, Project = "meshd", Stack = var.name })
  }

  depends_on = [aws_s3_object.meshd_binary, aws_s3_object.model, aws_iam_role_policy.node, aws_vpc_endpoint.s3]
}

# ---- caller: fixed size ---------------------------------------------------------------------------------------------

resource "aws_autoscaling_group" "caller" {
  name                      = "${var.name}-caller"
  service_linked_role_arn   = aws_iam_service_linked_role.autoscaling.arn
  vpc_zone_identifier       = aws_subnet.private[*].id
  min_size                  = var.caller_count
  max_size                  = var.caller_count
  desired_capacity          = var.caller_count
  health_check_type         = "EC2"
  health_check_grace_period = 300
  default_instance_warmup   = 120
  enabled_metrics           = ["GroupInServiceInstances", "GroupDesiredCapacity", "GroupTerminatingInstances"]

  launch_template {
    id      = aws_launch_template.worker["caller"].id
    version = aws_launch_template.worker["caller"].latest_version
  }

  initial_lifecycle_hook {
    name                 = "drain"
    lifecycle_transition = "autoscaling:EC2_INSTANCE_TERMINATING"
    heartbeat_timeout    = local.drain_hook_timeout
    default_result       = "CONTINUE"
  }

  instance_refresh {
    strategy = "Rolling"
    preferences {
      min_healthy_percentage = 50
    }
  }

  tag {
    key                 = "Name"
    value               = "${var.name}-caller"
    propagate_at_launch = true
  }
}

# ---- infer: mixed on-demand base + spot, target tracking on the queue per worker ------------------------------------

resource "aws_autoscaling_group" "infer" {
  name                      = "${var.name}-infer"
  service_linked_role_arn   = aws_iam_service_linked_role.autoscaling.arn
  vpc_zone_identifier       = aws_subnet.private[*].id
  min_size                  = var.infer_min_size
  max_size                  = var.infer_max_size
  health_check_type         = "EC2"
  health_check_grace_period = 600
  default_instance_warmup   = 300 # boot, binary and model from S3, model load, joining every gateway
  capacity_rebalance        = true
  enabled_metrics           = ["GroupInServiceInstances", "GroupDesiredCapacity", "GroupTerminatingInstances"]

  mixed_instances_policy {
    instances_distribution {
      on_demand_base_capacity                  = var.infer_on_demand_base_capacity
      on_demand_percentage_above_base_capacity = var.infer_on_demand_percentage_above_base
      spot_allocation_strategy                 = "price-capacity-optimized"
    }

    launch_template {
      launch_template_specification {
        launch_template_id = aws_launch_template.worker["infer"].id
        version            = aws_launch_template.worker["infer"].latest_version
      }

      dynamic "override" {
        for_each = local.infer_instance_types
        content {
          instance_type = override.value
        }
      }
    }
  }

  initial_lifecycle_hook {
    name                 = "drain"
    lifecycle_transition = "autoscaling:EC2_INSTANCE_TERMINATING"
    heartbeat_timeout    = local.drain_hook_timeout
    default_result       = "CONTINUE"
  }

  instance_refresh {
    strategy = "Rolling"
    preferences {
      min_healthy_percentage = 50
    }
  }

  tag {
    key                 = "Name"
    value               = "${var.name}-infer"
    propagate_at_launch = true
  }

  lifecycle {
    ignore_changes = [desired_capacity] # target tracking owns it
  }
}

# ---- infer_warm: on-demand with a warm pool (model on disk), step scaling on a backlog ------------------------------

resource "aws_autoscaling_group" "infer_warm" {
  name                      = "${var.name}-infer-warm"
  service_linked_role_arn   = aws_iam_service_linked_role.autoscaling.arn
  vpc_zone_identifier       = aws_subnet.private[*].id
  min_size                  = 0
  max_size                  = var.infer_warm_max_size
  health_check_type         = "EC2"
  health_check_grace_period = 300
  default_instance_warmup   = 120 # the model is on disk already: start, load, join
  enabled_metrics           = ["GroupInServiceInstances", "GroupDesiredCapacity", "WarmPoolWarmedCapacity"]

  launch_template {
    id      = aws_launch_template.worker["infer"].id
    version = aws_launch_template.worker["infer"].latest_version
  }

  # Instances launched into the pool boot once: meshd-bootstrap installs the binary and fetches and checks the model
  # (autoscaling/target-lifecycle-state says Warmed:Stopped, so it does not start meshd), then they are stopped.
  warm_pool {
    pool_state                  = "Stopped"
    min_size                    = var.infer_warm_pool_size
    max_group_prepared_capacity = var.infer_warm_pool_size

    instance_reuse_policy {
      reuse_on_scale_in = true # back to the pool on scale-in (drained first), model still on disk
    }
  }

  initial_lifecycle_hook {
    name                 = "drain"
    lifecycle_transition = "autoscaling:EC2_INSTANCE_TERMINATING"
    heartbeat_timeout    = local.drain_hook_timeout
    default_result       = "CONTINUE"
  }

  instance_refresh {
    strategy = "Rolling"
    preferences {
      min_healthy_percentage = 0
    }
  }

  tag {
    key                 = "Name"
    value               = "${var.name}-infer-warm"
    propagate_at_launch = true
  }

  lifecycle {
    ignore_changes = [desired_capacity] # step scaling owns it
  }
}
