# ---------------------------------------------------------------------------------------------------------------------
# Shared state for every gateway (state::*, idempotency records, per-key rate limits, trigger bindings), over Redis's
# protocol with TLS and an ACL user; nothing of it lives on a gateway's root volume.
#
#   state_backend = "memorydb" (default): MemoryDB. A write is acknowledged once it is in MemoryDB's multi-AZ
#     transaction log, so an acknowledged add survives the loss of the primary (and of its zone): the gateways trust
#     that (state_wait_replicas = 0). Cluster mode always (state_cluster = true), one shard.
#   state_backend = "elasticache": ElastiCache for Valkey, cluster mode off, a primary and one replica in another
#     zone with automatic failover. Replication is asynchronous: the gateways WAIT for one replica after each write
#     (state_wait_replicas = 1), so an acknowledged write is on two nodes in two zones, but not in a durable log:
#     losing both before a snapshot loses it. Cheaper per node; docs/DEPLOY.md compares the two.
#
# The gateways authenticate as the ACL user <name>-gateway, whose password Terraform generates and stores as an SSM
# SecureString (/<name>/state-password); each gateway reads it at boot into a root-only file that its unit hands over
# as a credential (state_password_file). The user may touch meshd's keys only (~meshd:*) and no dangerous command.
# ---------------------------------------------------------------------------------------------------------------------

locals {
  use_memorydb = var.state_backend == "memorydb"
  state_user   = "${var.name}-gateway"
  # The ACL of that user, on either backend: meshd's keys only, no pub/sub channel, no admin or dangerous command
  # (CONFIG, KEYS, FLUSHALL, DEBUG...: meshd reads its durability policy with CONFIG GET and only logs a refusal).
  state_access_string = "on ~meshd:* resetchannels +@all -@dangerous"

  # What the gateways' bootstrap writes to /etc/meshd/gateway.env (MESHD_STATE_*).
  state_host = (local.use_memorydb
    ? one(aws_memorydb_cluster.state[*].cluster_endpoint[0].address)
  : one(aws_elasticache_replication_group.state[*].primary_endpoint_address))
  state_url           = "rediss://${local.state_host}:${local.state_port}/0"
  state_cluster       = local.use_memorydb
  state_wait_replicas = local.use_memorydb ? 0 : 1
}

resource "random_password" "state" {
  length  = 48
  special = false
}

resource "aws_ssm_parameter" "state_password" {
  name        = "/${var.name}/state-password"
  description = "meshd gateways: password of the state store's ACL user ${local.state_user} (state_password_file)"
  type        = "SecureString"
  key_id      = aws_kms_key.meshd.arn
  value       = random_password.state.result
}

# ---- MemoryDB (default) ---------------------------------------------------------------------------------------------

resource "aws_memorydb_subnet_group" "state" {
  count = local.use_memorydb ? 1 : 0

  name       = "${var.name}-state"
  subnet_ids = aws_subnet.private[*].id
}

resource "aws_memorydb_user" "gateway" {
  count = local.use_memorydb ? 1 : 0

  user_name     = local.state_user
  access_string = local.state_access_string

  authentication_mode {
    type      = "password"
    passwords = [random_password.state.result]
  }
}

resource "aws_memorydb_acl" "state" {
  count = local.use_memorydb ? 1 : 0

  name       = "${var.name}-state"
  user_names = [aws_memorydb_user.gateway[0].user_name]
}

resource "aws_memorydb_cluster" "state" {
  count = local.use_memorydb ? 1 : 0

  name                       = "${var.name}-state"
  node_type                  = var.memorydb_node_type
  num_shards                 = 1
  num_replicas_per_shard     = 1 # a replica in another zone; the transaction log spans zones either way
  acl_name                   = aws_memorydb_acl.state[0].name
  subnet_group_name          = aws_memorydb_subnet_group.state[0].name
  security_group_ids         = [aws_security_group.state.id]
  port                       = local.state_port
  tls_enabled                = true
  kms_key_arn                = aws_kms_key.meshd.arn
  snapshot_retention_limit   = var.state_snapshot_retention_days
  auto_minor_version_upgrade = true
  maintenance_window         = "sun:05:00-sun:06:00"
  snapshot_window            = "03:00-04:00"
}

# ---- ElastiCache for Valkey (state_backend = "elasticache") ---------------------------------------------------------

resource "aws_elasticache_subnet_group" "state" {
  count = local.use_memorydb ? 0 : 1

  name       = "${var.name}-state"
  subnet_ids = aws_subnet.private[*].id
}

# A user group must hold a user named "default"; this one is switched off and can run nothing.
resource "aws_elasticache_user" "default" {
  count = local.use_memorydb ? 0 : 1

  user_id       = "${var.name}-default"
  user_name     = "default"
  engine        = "valkey"
  access_string = "off -@all"

  authentication_mode {
    type      = "password"
    passwords = [random_password.state.result]
  }
}

resource "aws_elasticache_user" "gateway" {
  count = local.use_memorydb ? 0 : 1

  user_id       = local.state_user
  user_name     = local.state_user
  engine        = "valkey"
  access_string = local.state_access_string

  authentication_mode {
    type      = "password"
    passwords = [random_password.state.result]
  }
}

resource "aws_elasticache_user_group" "state" {
  count = local.use_memorydb ? 0 : 1

  user_group_id = "${var.name}-state"
  engine        = "valkey"
  user_ids      = [aws_elasticache_user.default[0].user_id, aws_elasticache_user.gateway[0].user_id]
}

resource "aws_elasticache_replication_group" "state" {
  count = local.use_memorydb ? 0 : 1

  replication_group_id       = "${var.name}-state"
  description                = "meshd gateways' shared state"
  engine                     = "valkey"
  node_type                  = var.elasticache_node_type
  num_cache_clusters         = 2
  automatic_failover_enabled = true
  multi_az_enabled           = true
  port                       = local.state_port
  subnet_group_name          = aws_elasticache_subnet_group.state[0].name
  security_group_ids         = [aws_security_group.state.id]
  user_group_ids             = [aws_elasticache_user_group.state[0].user_group_id]
  transit_encryption_enabled = true
  at_rest_encryption_enabled = true
  kms_key_id                 = aws_kms_key.meshd.arn
  snapshot_retention_limit   = var.state_snapshot_retention_days
  auto_minor_version_upgrade = true
  maintenance_window         = "sun:05:00-sun:06:00"
  snapshot_window            = "03:00-04:00"
  apply_immediately          = false
}
