# ---------------------------------------------------------------------------------------------------------------------
# Where and what
# ---------------------------------------------------------------------------------------------------------------------

variable "region" {
  type        = string
  description = "AWS region to deploy into (prices in docs/DEPLOY.md assume us-east-1)."
  default     = "us-east-1"

  validation {
    condition     = can(regex("^[a-z]{2}(-gov)?-[a-z]+-[0-9]$", var.region))
    error_message = "region must look like an AWS region name, e.g. us-east-1."
  }
}

variable "name" {
  type        = string
  description = "Name prefix for every resource (also the SSM parameter paths /<name>/worker-token/caller, /<name>/worker-token/infer, /<name>/api-keys, /<name>/gateway-tls-key, /<name>/state-password, /<name>/metrics-key, and the private DNS zone <name>.internal)."
  default     = "meshd"

  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{1,20}[a-z0-9]$", var.name))
    error_message = "name must be 3-22 characters of lowercase letters, digits and '-', starting with a letter."
  }
}

variable "availability_zones" {
  type        = list(string)
  description = "Availability zones, one per public/private subnet pair (as many as public_subnet_cidrs). null: the region's first ones. Pick others if an instance type is not offered in one."
  default     = null

  validation {
    condition     = var.availability_zones == null || length(coalesce(var.availability_zones, [])) == length(var.public_subnet_cidrs)
    error_message = "availability_zones must name one zone per entry of public_subnet_cidrs."
  }
}

variable "tags" {
  type        = map(string)
  description = "Extra tags added to every resource."
  default     = {}
}

# ---------------------------------------------------------------------------------------------------------------------
# Network
# ---------------------------------------------------------------------------------------------------------------------

variable "vpc_cidr" {
  type        = string
  description = "CIDR block of the VPC."
  default     = "10.20.0.0/16"

  validation {
    condition     = can(cidrnetmask(var.vpc_cidr))
    error_message = "vpc_cidr must be an IPv4 CIDR block such as 10.20.0.0/16."
  }
}

variable "public_subnet_cidrs" {
  type        = list(string)
  description = "CIDRs of the public subnets, one per availability zone (the NLB's nodes and the NAT gateways; no instance). At least two. Must lie inside vpc_cidr."
  default     = ["10.20.1.0/24", "10.20.2.0/24"]

  validation {
    condition     = length(var.public_subnet_cidrs) >= 2 && length(var.public_subnet_cidrs) <= 3 && alltrue([for c in var.public_subnet_cidrs : can(cidrnetmask(c))])
    error_message = "public_subnet_cidrs must hold 2 or 3 IPv4 CIDR blocks such as 10.20.1.0/24 (one per availability zone)."
  }
}

variable "private_subnet_cidrs" {
  type        = list(string)
  description = "CIDRs of the private subnets, one per availability zone, in the order of public_subnet_cidrs (gateways, workers, the state store). Must lie inside vpc_cidr."
  default     = ["10.20.11.0/24", "10.20.12.0/24"]

  validation {
    condition     = alltrue([for c in var.private_subnet_cidrs : can(cidrnetmask(c))])
    error_message = "private_subnet_cidrs must hold IPv4 CIDR blocks such as 10.20.11.0/24."
  }

  validation {
    condition     = length(var.private_subnet_cidrs) == length(var.public_subnet_cidrs)
    error_message = "private_subnet_cidrs must hold one CIDR per availability zone, as many as public_subnet_cidrs."
  }
}

variable "gateway_private_ip_hostnum" {
  type        = number
  description = "Host number of the first gateway's fixed private IP in each private subnet (10 gives 10.20.11.10 and 10.20.12.10; a third gateway in the first zone gets .11). Fixed, so a replaced gateway keeps its address, its NLB target and its DNS record."
  default     = 10

  validation {
    condition     = var.gateway_private_ip_hostnum >= 6 && var.gateway_private_ip_hostnum <= 250 && floor(var.gateway_private_ip_hostnum) == var.gateway_private_ip_hostnum
    error_message = "gateway_private_ip_hostnum must be a whole number from 6 to 250 (AWS reserves .0-.3; .4 and .5 stay free)."
  }
}

variable "allowed_api_cidrs" {
  type        = list(string)
  description = "IPv4 CIDRs allowed to reach the public API (the NLB on tcp/443, and the gateways on tcp/3111 behind it: the NLB preserves client addresses), e.g. [\"203.0.113.7/32\"]. No default: you must say who may call the API."

  validation {
    condition     = length(var.allowed_api_cidrs) > 0 && alltrue([for c in var.allowed_api_cidrs : can(cidrnetmask(c))])
    error_message = "allowed_api_cidrs must be a non-empty list of IPv4 CIDR blocks such as 203.0.113.7/32."
  }

  validation {
    condition     = var.allow_public_api || alltrue([for c in var.allowed_api_cidrs : !endswith(c, "/0")])
    error_message = "allowed_api_cidrs contains a /0 (the whole internet). Set allow_public_api = true if you really mean to open the API to everyone."
  }
}

variable "allow_public_api" {
  type        = bool
  description = "Explicit opt-in that allows 0.0.0.0/0 in allowed_api_cidrs (an API open to the whole internet)."
  default     = false
}

# ---------------------------------------------------------------------------------------------------------------------
# Access (SSM Session Manager by default; SSH only if asked for)
# ---------------------------------------------------------------------------------------------------------------------

variable "ssh_key_name" {
  type        = string
  description = "Optional EC2 key pair name attached to every instance. null (default): no key pair, use SSM Session Manager (no instance has a public address or accepts SSH from outside the VPC)."
  default     = null
}

# ---------------------------------------------------------------------------------------------------------------------
# Instances
# ---------------------------------------------------------------------------------------------------------------------

variable "ami_id" {
  type        = string
  description = "AMI for every VM. null (default): the latest Canonical Ubuntu 24.04 LTS amd64 image (glibc 2.39, runs a binary built on Debian 12; SSM agent preinstalled)."
  default     = null

  validation {
    condition     = var.ami_id == null || can(regex("^ami-[0-9a-f]{8,17}$", var.ami_id))
    error_message = "ami_id must be null or an AMI id such as ami-0123456789abcdef0."
  }
}

variable "gateway_count" {
  type        = number
  description = "Number of `meshd gateway` VMs, spread round-robin over the availability zones, all behind the NLB and all in the private DNS record gateways.<name>.internal that the workers follow. At least 2: any one may die."
  default     = 2

  validation {
    condition     = var.gateway_count >= 2 && var.gateway_count <= 8 && floor(var.gateway_count) == var.gateway_count
    error_message = "gateway_count must be a whole number from 2 to 8 (the scaling metric sums at most 8 gateways' series)."
  }
}

variable "gateway_instance_type" {
  type        = string
  description = "Instance type of each gateway VM (x86_64)."
  default     = "t3.small"
}

variable "caller_count" {
  type        = number
  description = "Size of the caller Auto Scaling group (fixed: callers validate and shape, they scale with the gateways' load far less than inference does)."
  default     = 2

  validation {
    condition     = var.caller_count >= 1 && var.caller_count <= 20 && floor(var.caller_count) == var.caller_count
    error_message = "caller_count must be a whole number from 1 to 20."
  }
}

variable "caller_instance_type" {
  type        = string
  description = "Instance type of each caller VM (x86_64)."
  default     = "t3.small"
}

variable "infer_instance_types" {
  type        = list(string)
  description = "Instance types of the infer group, in order of preference (x86_64; llama.cpp on CPU wants non-burstable cores). The spot part picks among all of them; the warm group uses the first."
  default     = ["c7i.large", "c6i.large", "m7i.large"]

  validation {
    condition     = length(var.infer_instance_types) >= 1 && alltrue([for t in var.infer_instance_types : can(regex("^[a-z][a-z0-9-]*\\.[a-z0-9]+$", t))])
    error_message = "infer_instance_types must list instance types such as c7i.large."
  }
}

variable "infer_min_size" {
  type        = number
  description = "Least number of workers in the infer group (the mixed on-demand/spot group that target tracking scales)."
  default     = 1

  validation {
    condition     = var.infer_min_size >= 1 && floor(var.infer_min_size) == var.infer_min_size
    error_message = "infer_min_size must be a whole number of at least 1."
  }
}

variable "infer_max_size" {
  type        = number
  description = "Most workers in the infer group."
  default     = 6

  validation {
    condition     = var.infer_max_size >= var.infer_min_size && var.infer_max_size <= 100 && floor(var.infer_max_size) == var.infer_max_size
    error_message = "infer_max_size must be a whole number from infer_min_size to 100."
  }
}

variable "infer_on_demand_base_capacity" {
  type        = number
  description = "On-demand workers the infer group always keeps before any spot instance (the part a spot shortage cannot take away)."
  default     = 1

  validation {
    condition     = var.infer_on_demand_base_capacity >= 0 && var.infer_on_demand_base_capacity <= var.infer_max_size && floor(var.infer_on_demand_base_capacity) == var.infer_on_demand_base_capacity
    error_message = "infer_on_demand_base_capacity must be a whole number from 0 to infer_max_size."
  }
}

variable "infer_on_demand_percentage_above_base" {
  type        = number
  description = "Percentage of on-demand instances above the base (0: everything above the base is spot)."
  default     = 0

  validation {
    condition     = var.infer_on_demand_percentage_above_base >= 0 && var.infer_on_demand_percentage_above_base <= 100
    error_message = "infer_on_demand_percentage_above_base must be between 0 and 100."
  }
}

variable "infer_target_inflight_per_worker" {
  type        = number
  description = "Target of the infer group's target tracking: inference invocations in flight at the gateways (meshd_function_inflight of inference::run_inference, summed over every gateway) per InService infer worker. A worker generates `slots` (8) sequences at once; above that they queue."
  default     = 6

  validation {
    condition     = var.infer_target_inflight_per_worker > 0 && var.infer_target_inflight_per_worker <= 256
    error_message = "infer_target_inflight_per_worker must be above 0 and at most 256."
  }
}

variable "infer_warm_pool_size" {
  type        = number
  description = "Stopped, pre-initialized on-demand workers (model on disk) kept in the warm group's warm pool; they join within about a minute when the infer group cannot keep up. 0 keeps the warm group empty."
  default     = 1

  validation {
    condition     = var.infer_warm_pool_size >= 0 && var.infer_warm_pool_size <= 20 && floor(var.infer_warm_pool_size) == var.infer_warm_pool_size
    error_message = "infer_warm_pool_size must be a whole number from 0 to 20."
  }
}

variable "infer_warm_max_size" {
  type        = number
  description = "Most workers the warm group runs at once (it scales out by step scaling when the queue per worker stays above twice the target)."
  default     = 2

  validation {
    condition     = var.infer_warm_max_size >= 0 && var.infer_warm_max_size <= 20 && floor(var.infer_warm_max_size) == var.infer_warm_max_size
    error_message = "infer_warm_max_size must be a whole number from 0 to 20."
  }
}

variable "infer_gpu_instance_types" {
  type        = list(string)
  description = "Optional GPU instance types for the infer groups (e.g. [\"g6.xlarge\", \"g5.xlarge\"]). Set: each infer VM runs meshd's `openai` generator in front of an OpenAI-compatible engine (vLLM) at infer_upstream_url, which infer_gpu_ami_id must bring and start; no GGUF is fetched. Empty (default): llama.cpp on CPU with the GGUF from the model registry."
  default     = []

  validation {
    condition     = alltrue([for t in var.infer_gpu_instance_types : can(regex("^[a-z][a-z0-9-]*\\.[a-z0-9]+$", t))])
    error_message = "infer_gpu_instance_types must list instance types such as g6.xlarge."
  }
}

variable "infer_gpu_ami_id" {
  type        = string
  description = "AMI of the GPU infer VMs (required with infer_gpu_instance_types): NVIDIA driver, CUDA and an OpenAI-compatible engine (vLLM) that serves the model on infer_upstream_url at boot, e.g. built from an AWS Deep Learning AMI."
  default     = null

  validation {
    condition     = var.infer_gpu_ami_id == null || can(regex("^ami-[0-9a-f]{8,17}$", var.infer_gpu_ami_id))
    error_message = "infer_gpu_ami_id must be null or an AMI id such as ami-0123456789abcdef0."
  }

  validation {
    condition     = length(var.infer_gpu_instance_types) == 0 || var.infer_gpu_ami_id != null
    error_message = "infer_gpu_ami_id is required when infer_gpu_instance_types is set: the engine (vLLM) comes with that image."
  }
}

variable "infer_upstream_url" {
  type        = string
  description = "With infer_gpu_instance_types: where the engine on the same VM listens (meshd's upstream_url). Loopback only: the infer unit may reach nothing else but the VPC."
  default     = "http://127.0.0.1:8000"

  validation {
    condition     = can(regex("^http://(127\\.0\\.0\\.1|localhost):[0-9]{1,5}$", var.infer_upstream_url))
    error_message = "infer_upstream_url must be http://127.0.0.1:PORT (or localhost): the engine runs on the same VM."
  }
}

variable "root_volume_size_gb" {
  type        = number
  description = "Size of each VM's encrypted gp3 root volume in GiB (an infer VM keeps the model on it across reboots and in the warm pool)."
  default     = 16

  validation {
    condition     = var.root_volume_size_gb >= 8 && var.root_volume_size_gb <= 1024
    error_message = "root_volume_size_gb must be between 8 and 1024."
  }
}

# ---------------------------------------------------------------------------------------------------------------------
# Shared state (Redis protocol): MemoryDB by default, ElastiCache for Valkey as the cheaper option
# ---------------------------------------------------------------------------------------------------------------------

variable "state_backend" {
  type        = string
  description = "Where the gateways keep state::* (running totals, idempotency records, rate-limit windows, trigger bindings): \"memorydb\" (default: MemoryDB, a multi-AZ transaction log makes every acknowledged write durable) or \"elasticache\" (ElastiCache for Valkey: cheaper, replication is asynchronous, so each write also waits for one replica: WAIT 1). docs/DEPLOY.md compares them."
  default     = "memorydb"

  validation {
    condition     = contains(["memorydb", "elasticache"], var.state_backend)
    error_message = "state_backend must be \"memorydb\" or \"elasticache\"."
  }
}

variable "memorydb_node_type" {
  type        = string
  description = "Node type of the MemoryDB cluster (one shard, a primary and one replica in another zone)."
  default     = "db.t4g.small"

  validation {
    condition     = can(regex("^db\\.[a-z0-9]+\\.[a-z0-9]+$", var.memorydb_node_type))
    error_message = "memorydb_node_type must be a MemoryDB node type such as db.t4g.small."
  }
}

variable "elasticache_node_type" {
  type        = string
  description = "Node type of the ElastiCache for Valkey replication group (a primary and one replica in another zone, automatic failover)."
  default     = "cache.t4g.small"

  validation {
    condition     = can(regex("^cache\\.[a-z0-9]+\\.[a-z0-9]+$", var.elasticache_node_type))
    error_message = "elasticache_node_type must be an ElastiCache node type such as cache.t4g.small."
  }
}

variable "state_snapshot_retention_days" {
  type        = number
  description = "Days of daily snapshots the state store keeps (1-35)."
  default     = 7

  validation {
    condition     = var.state_snapshot_retention_days >= 1 && var.state_snapshot_retention_days <= 35 && floor(var.state_snapshot_retention_days) == var.state_snapshot_retention_days
    error_message = "state_snapshot_retention_days must be a whole number from 1 to 35."
  }
}

# ---------------------------------------------------------------------------------------------------------------------
# API keys and TLS
# ---------------------------------------------------------------------------------------------------------------------

variable "extra_api_key_sha256" {
  type        = list(string)
  description = "SHA-256 digests (64 lowercase hex) of further API keys the gateway accepts besides the generated one, e.g. a key per client, or the previous key while you rotate. Compute one with: printf %s \"$KEY\" | sha256sum | cut -d' ' -f1"
  default     = []

  validation {
    condition     = alltrue([for d in var.extra_api_key_sha256 : can(regex("^[0-9a-f]{64}$", d))])
    error_message = "extra_api_key_sha256 must hold SHA-256 digests of 64 lowercase hex characters (printf %s \"$KEY\" | sha256sum), never the keys themselves."
  }

  validation {
    condition     = length(var.extra_api_key_sha256) <= 50
    error_message = "extra_api_key_sha256 holds at most 50 digests (the api-keys SSM parameter is a 4 KB standard parameter)."
  }
}

variable "tls_ca_validity_days" {
  type        = number
  description = "Validity of the stack's private CA certificate, in days. Renewed by the first apply in its last 90 days, which replaces every VM (workers by an instance refresh)."
  default     = 3650

  validation {
    condition     = var.tls_ca_validity_days >= 365 && var.tls_ca_validity_days <= 7300 && floor(var.tls_ca_validity_days) == var.tls_ca_validity_days
    error_message = "tls_ca_validity_days must be a whole number from 365 to 7300."
  }
}

variable "tls_gateway_cert_validity_days" {
  type        = number
  description = "Validity of the gateways' certificate (HTTPS on :3111 behind the NLB, wss:// on :49134), in days. Renewed by the first apply in its last 30 days, which replaces the gateway VMs."
  default     = 730

  validation {
    condition     = var.tls_gateway_cert_validity_days >= 60 && var.tls_gateway_cert_validity_days <= var.tls_ca_validity_days && floor(var.tls_gateway_cert_validity_days) == var.tls_gateway_cert_validity_days
    error_message = "tls_gateway_cert_validity_days must be a whole number from 60 to tls_ca_validity_days."
  }
}

# ---------------------------------------------------------------------------------------------------------------------
# Artifacts: the meshd binary and the model
# ---------------------------------------------------------------------------------------------------------------------

variable "meshd_binary_path" {
  type        = string
  description = "Local path of the release binary uploaded to the private artifact bucket. Empty (default): <repo>/target/dist/meshd, the stripped binary scripts/release makes (run scripts/release first). Ignored when meshd_binary_url is set."
  default     = ""
}

variable "meshd_binary_url" {
  type        = string
  description = "Optional https:// URL the VMs download the binary from instead of the artifact bucket (then meshd_binary_sha256 is required)."
  default     = ""

  validation {
    condition     = var.meshd_binary_url == "" || can(regex("^https://[!#-&(-~]+$", var.meshd_binary_url))
    error_message = "meshd_binary_url must be empty or an https:// URL of printable ASCII without spaces or quotes."
  }
}

variable "meshd_binary_sha256" {
  type        = string
  description = "Expected sha256 (hex) of the binary. Empty (default): filesha256() of meshd_binary_path. Required with meshd_binary_url."
  default     = ""

  validation {
    condition     = var.meshd_binary_sha256 == "" || can(regex("^[0-9a-f]{64}$", var.meshd_binary_sha256))
    error_message = "meshd_binary_sha256 must be empty or 64 lowercase hex characters."
  }

  validation {
    condition     = var.meshd_binary_url == "" || var.meshd_binary_sha256 != ""
    error_message = "meshd_binary_sha256 is required when meshd_binary_url is set."
  }
}

variable "model_url" {
  type        = string
  description = "Where the GGUF model comes from, once, before apply: `meshd model pull <model_url> --sha256 <model_sha256>` (or `meshd model pull gemma3-270m-it-q8` for the default) puts it at model_path, and Terraform uploads it to the private artifact bucket. VMs never download it from here. Default: Gemma 3 270M instruction-tuned, Q8_0, from ggml-org, pinned to a repository revision."
  default     = "https://huggingface.co/ggml-org/gemma-3-270m-it-GGUF/resolve/e7647be17ae1108f2f605ed061ca0608b171afff/gemma-3-270m-it-Q8_0.gguf"

  validation {
    condition     = can(regex("^https://[!#-&(-~]+$", var.model_url))
    error_message = "model_url must be an https:// URL of printable ASCII without spaces or quotes."
  }
}

variable "model_sha256" {
  type        = string
  description = "Expected sha256 (hex) of the model file; Terraform refuses to upload a file that does not match and every infer VM checks it again. Default: gemma-3-270m-it-Q8_0.gguf (291545600 bytes)."
  default     = "0ef57d2c838458a1952664260dcba38e5bdda37494f3af732f06e4add24068e3"

  validation {
    condition     = can(regex("^[0-9a-f]{64}$", var.model_sha256))
    error_message = "model_sha256 must be 64 lowercase hex characters."
  }
}

variable "model_path" {
  type        = string
  description = "Local path of the GGUF Terraform uploads to the artifact bucket (key models/<sha256>/model.gguf). Empty (default): <repo>/models/gemma-3-270m-it-Q8_0.gguf, where `meshd model pull gemma3-270m-it-q8` puts it. Ignored when model_upload is false."
  default     = ""
}

variable "model_upload" {
  type        = bool
  description = "true (default): Terraform uploads model_path. false: the object is already in the artifact bucket at models/<model_sha256>/model.gguf (a large model uploaded once with `aws s3 cp`); Terraform only points the VMs at it."
  default     = true
}

# ---------------------------------------------------------------------------------------------------------------------
# Logging
# ---------------------------------------------------------------------------------------------------------------------

variable "log_retention_days" {
  type        = number
  description = "Retention of the stack's log groups (VPC flow logs, every VM's journal, the gateways' metrics) in days (CloudWatch allowed values, at least 365)."
  default     = 365

  validation {
    condition     = contains([365, 400, 545, 731, 1096, 1827, 2192, 2557, 2922, 3288, 3653], var.log_retention_days)
    error_message = "log_retention_days must be a CloudWatch retention value of at least 365 (365, 400, 545, 731, 1096, 1827, ...)."
  }
}

# ---------------------------------------------------------------------------------------------------------------------
# Alarms
# ---------------------------------------------------------------------------------------------------------------------

variable "alarm_email" {
  type        = string
  description = "Optional e-mail address subscribed to the alarm topic (confirm the subscription from the mail AWS sends). null (default): alarms go to the SNS topic only."
  default     = null

  validation {
    condition     = var.alarm_email == null || can(regex("^[^@\\s]+@[^@\\s]+\\.[a-z]{2,}$", coalesce(var.alarm_email, "x")))
    error_message = "alarm_email must be null or an e-mail address."
  }
}

variable "alarm_5xx_per_5_minutes" {
  type        = number
  description = "Alarm when the gateways together answer more than this many 5xx responses in 5 minutes (503 state_unavailable, worker failures, timeouts)."
  default     = 10

  validation {
    condition     = var.alarm_5xx_per_5_minutes >= 0
    error_message = "alarm_5xx_per_5_minutes must not be negative."
  }
}
