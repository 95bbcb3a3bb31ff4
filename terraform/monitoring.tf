# ---------------------------------------------------------------------------------------------------------------------
# Operations: every VM's journal and the gateways' metrics in CloudWatch (through the CloudWatch agent, which
# meshd-bootstrap installs and configures), and alarms to an SNS topic.
#
#   /<name>/journal   every VM's journal (rsyslog's /var/log/syslog: meshd logs JSON lines with a trace id), one
#                     stream per instance
#   /<name>/metrics   the gateways' /metrics scraped every 15 s, as embedded-metric-format events: CloudWatch turns the
#                     declared series into metrics in local.metrics_namespace (the scaling metric among them)
#
# Alarms: 5xx answers, the inference queue per worker (scaling at its limit), a function without workers (infer or
# caller), a gateway failing the NLB's /readyz check, and the state store's engine CPU and memory.
# ---------------------------------------------------------------------------------------------------------------------

resource "aws_cloudwatch_log_group" "journal" {
  name              = "/${var.name}/journal"
  retention_in_days = var.log_retention_days
  kms_key_id        = aws_kms_key.meshd.arn
}

resource "aws_cloudwatch_log_group" "metrics" {
  name              = "/${var.name}/metrics"
  retention_in_days = var.log_retention_days
  kms_key_id        = aws_kms_key.meshd.arn
}

resource "aws_sns_topic" "alarms" {
  name              = "${var.name}-alarms"
  kms_master_key_id = aws_kms_key.meshd.arn
}

resource "aws_sns_topic_subscription" "alarms_email" {
  count = var.alarm_email == null ? 0 : 1

  topic_arn = aws_sns_topic.alarms.arn
  protocol  = "email"
  endpoint  = var.alarm_email
}

locals {
  alarm_actions = [aws_sns_topic.alarms.arn]
}

resource "aws_cloudwatch_metric_alarm" "api_5xx" {
  alarm_name          = "${var.name}-api-5xx"
  alarm_description   = "The gateways answered more than ${var.alarm_5xx_per_5_minutes} 5xx responses in 5 minutes (meshd_http_requests_total, status 5xx): 503 state_unavailable (the state store), worker failures, timeouts."
  namespace           = local.metrics_namespace
  metric_name         = "meshd_http_requests_total"
  dimensions          = { status_class = "5xx" }
  statistic           = "Sum"
  period              = 300
  evaluation_periods  = 1
  comparison_operator = "GreaterThanThreshold"
  threshold           = var.alarm_5xx_per_5_minutes
  treat_missing_data  = "notBreaching"
  alarm_actions       = local.alarm_actions
  ok_actions          = local.alarm_actions
}

resource "aws_cloudwatch_metric_alarm" "inference_queue" {
  alarm_name          = "${var.name}-inference-queue"
  alarm_description   = "Inference invocations in flight per infer worker above twice the target for 15 minutes: scaling is at infer_max_size / infer_warm_max_size, or cannot get capacity."
  comparison_operator = "GreaterThanThreshold"
  threshold           = 2 * var.infer_target_inflight_per_worker
  evaluation_periods  = 15
  datapoints_to_alarm = 15
  treat_missing_data  = "notBreaching"
  alarm_actions       = local.alarm_actions
  ok_actions          = local.alarm_actions

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

# A function with no live worker on some gateway (the Minimum over the gateways' series): that gateway answers 503
# no_worker for it. No data at all means no gateway reports: breaching.
resource "aws_cloudwatch_metric_alarm" "no_workers" {
  for_each = {
    infer  = local.inference_fn
    caller = "http::run_inference_over_http"
  }

  alarm_name          = "${var.name}-no-${each.key}-workers"
  alarm_description   = "A gateway has no live ${each.key} worker for ${each.value} (meshd_function_workers below 1 for 3 minutes)."
  namespace           = local.metrics_namespace
  metric_name         = "meshd_function_workers"
  dimensions          = { function = each.value }
  statistic           = "Minimum"
  period              = 60
  evaluation_periods  = 3
  comparison_operator = "LessThanThreshold"
  threshold           = 1
  treat_missing_data  = "breaching"
  alarm_actions       = local.alarm_actions
  ok_actions          = local.alarm_actions
}

resource "aws_cloudwatch_metric_alarm" "gateway_unhealthy" {
  alarm_name          = "${var.name}-gateway-unhealthy"
  alarm_description   = "A gateway fails the NLB's HTTPS GET /readyz check (down, or a trigger's function without a live worker): the others carry the API."
  namespace           = "AWS/NetworkELB"
  metric_name         = "UnHealthyHostCount"
  dimensions          = { TargetGroup = aws_lb_target_group.gateways.arn_suffix, LoadBalancer = aws_lb.api.arn_suffix }
  statistic           = "Maximum"
  period              = 60
  evaluation_periods  = 2
  comparison_operator = "GreaterThanThreshold"
  threshold           = 0
  treat_missing_data  = "notBreaching"
  alarm_actions       = local.alarm_actions
  ok_actions          = local.alarm_actions
}

locals {
  # The state store's nodes as CloudWatch names them.
  state_alarm_targets = local.use_memorydb ? {
    for m in ["EngineCPUUtilization", "DatabaseMemoryUsagePercentage"] : m => {
      namespace = "AWS/MemoryDB", metric = m, dimensions = { ClusterName = "${var.name}-state" }
    }
    } : {
    for p in setproduct(["EngineCPUUtilization", "DatabaseMemoryUsagePercentage"], ["001", "002"]) : "${p[0]}-${p[1]}" => {
      namespace = "AWS/ElastiCache", metric = p[0], dimensions = { CacheClusterId = "${var.name}-state-${p[1]}" }
    }
  }
}

resource "aws_cloudwatch_metric_alarm" "state" {
  for_each = local.state_alarm_targets

  alarm_name          = "${var.name}-state-${each.key}"
  alarm_description   = "The state store (${var.state_backend}): ${each.value.metric} above 80% for 10 minutes. Every state::* call and every rate-limited request goes through it."
  namespace           = each.value.namespace
  metric_name         = each.value.metric
  dimensions          = each.value.dimensions
  statistic           = "Maximum"
  period              = 300
  evaluation_periods  = 2
  comparison_operator = "GreaterThanThreshold"
  threshold           = 80
  treat_missing_data  = "missing"
  alarm_actions       = local.alarm_actions
  ok_actions          = local.alarm_actions
}
