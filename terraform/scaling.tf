# ---------------------------------------------------------------------------------------------------------------------
# Scaling the inference tier on its queue: invocations of inference::run_inference in flight at the gateways, per
# InService infer worker.
#
# Each gateway's CloudWatch agent scrapes its own GET /metrics every 15 s (cloud-init/meshd-bootstrap.sh writes its
# configuration) and ships the series as embedded-metric-format logs: meshd_function_inflight{function} (the gateway's
# admission queue depth per function) becomes the CloudWatch metric meshd_function_inflight in local.metrics_namespace
# with the dimensions gateway (its private address, fixed) and function. Every worker joins every gateway, so the
# fleet's queue is the sum over the gateways; the workers are the InService instances of both infer groups.
# No AWS SDK in meshd: the agent reads the Prometheus text the gateway already serves.
# ---------------------------------------------------------------------------------------------------------------------

locals {
  metrics_namespace = "meshd/${var.name}"
  inference_fn      = "inference::run_inference"

  # One query per gateway (g0, g1, ...), missing points (a gateway down) counted as 0, and the InService workers of
  # both infer groups.
  queue_gateway_ids = { for i, k in keys(local.gateways) : k => "g${i}" }
  queue_inflight    = join(" + ", [for k, id in local.queue_gateway_ids : "FILL(${id}, 0)"])
  queue_workers     = "FILL(w, 0) + FILL(ww, 0)"
  queue_per_worker  = "(${local.queue_inflight}) / IF((${local.queue_workers}) > 0, ${local.queue_workers}, 1)"
}

resource "aws_autoscaling_policy" "infer_queue" {
  name                      = "${var.name}-infer-queue-per-worker"
  autoscaling_group_name    = aws_autoscaling_group.infer.name
  policy_type               = "TargetTrackingScaling"
  estimated_instance_warmup = 300

  target_tracking_configuration {
    target_value = var.infer_target_inflight_per_worker

    customized_metric_specification {
      dynamic "metrics" {
        for_each = local.queue_gateway_ids
        content {
          id          = metrics.value
          return_data = false
          metric_stat {
            stat = "Average"
            metric {
              namespace   = local.metrics_namespace
              metric_name = "meshd_function_inflight"
              dimensions {
                name  = "gateway"
                value = local.gateways[metrics.key].private_ip
              }
              dimensions {
                name  = "function"
                value = local.inference_fn
              }
            }
          }
        }
      }

      metrics {
        id          = "w"
        return_data = false
        metric_stat {
          stat = "Average"
          metric {
            namespace   = "AWS/AutoScaling"
            metric_name = "GroupInServiceInstances"
            dimensions {
              name  = "AutoScalingGroupName"
              value = aws_autoscaling_group.infer.name
            }
          }
        }
      }

      metrics {
        id          = "ww"
        return_data = false
        metric_stat {
          stat = "Average"
          metric {
            namespace   = "AWS/AutoScaling"
            metric_name = "GroupInServiceInstances"
            dimensions {
              name  = "AutoScalingGroupName"
              value = aws_autoscaling_group.infer_warm.name
            }
          }
        }
      }

      metrics {
        id          = "queue_per_worker"
        label       = "inference invocations in flight per infer worker"
        expression  = local.queue_per_worker
        return_data = true
      }
    }
  }
}

# ---- the warm group: out by one when the queue per worker stays above twice the target, in when it is low -----------

resource "aws_autoscaling_policy" "infer_warm_out" {
  name                   = "${var.name}-infer-warm-out"
  autoscaling_group_name = aws_autoscaling_group.infer_warm.name
  policy_type            = "StepScaling"
  adjustment_type        = "ChangeInCapacity"

  step_adjustment {
    scaling_adjustment          = 1
    metric_interval_lower_bound = 0
  }
}

resource "aws_autoscaling_policy" "infer_warm_in" {
  name                   = "${var.name}-infer-warm-in"
  autoscaling_group_name = aws_autoscaling_group.infer_warm.name
  policy_type            = "StepScaling"
  adjustment_type        = "ChangeInCapacity"

  step_adjustment {
    scaling_adjustment          = -1
    metric_interval_upper_bound = 0
  }
}

resource "aws_cloudwatch_metric_alarm" "infer_backlog" {
  for_each = {
    high = { op = "GreaterThanThreshold", threshold = 2 * var.infer_target_inflight_per_worker, periods = 2, policy = aws_autoscaling_policy.infer_warm_out.arn }
    low  = { op = "LessThanThreshold", threshold = var.infer_target_inflight_per_worker / 2, periods = 15, policy = aws_autoscaling_policy.infer_warm_in.arn }
  }

  alarm_name          = "${var.name}-infer-backlog-${each.key}"
  alarm_description   = "Inference queue per infer worker ${each.key == "high" ? "above twice" : "below half"} the target: the warm group ${each.key == "high" ? "takes a worker from its warm pool" : "returns one"}."
  comparison_operator = each.value.op
  threshold           = each.value.threshold
  evaluation_periods  = each.value.periods
  datapoints_to_alarm = each.value.periods
  treat_missing_data  = "notBreaching"
  alarm_actions       = [each.value.policy]

  dynamic "metric_query" {
    for_each = local.queue_gateway_ids
    content {
      id = metric_query.value
      metric {
        namespace   = local.metrics_namespace
        metric_name = "meshd_function_inflight"
        period      = 60
        stat        = "Average"
        dimensions = {
          gateway  = local.gateways[metric_query.key].private_ip
          function = local.inference_fn
        }
      }
    }
  }

  dynamic "metric_query" {
    for_each = { w = aws_autoscaling_group.infer.name, ww = aws_autoscaling_group.infer_warm.name }
    content {
      id = metric_query.key
      metric {
        namespace   = "AWS/AutoScaling"
        metric_name = "GroupInServiceInstances"
        period      = 60
        stat        = "Average"
        dimensions  = { AutoScalingGroupName = metric_query.value }
      }
    }
  }

  metric_query {
    id          = "queue_per_worker"
    label       = "inference invocations in flight per infer worker"
    expression  = local.queue_per_worker
    return_data = true
  }
}
