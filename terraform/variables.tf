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
  description = "Name prefix for every resource (also the SSM parameter paths /<name>/worker-token/caller, /<name>/worker-token/infer, /<name>/api-keys, /<name>/gateway-tls-key)."
  default     = "meshd"

  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{1,20}[a-z0-9]$", var.name))
    error_message = "name must be 3-22 characters of lowercase letters, digits and '-', starting with a letter."
  }
}

variable "availability_zone" {
  type        = string
  description = "Availability zone for both subnets (one AZ: the stack has one gateway). null: <region>a. Pick another if an instance type is not offered there."
  default     = null
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

variable "public_subnet_cidr" {
  type        = string
  description = "CIDR of the public subnet (gateway, NAT gateway). Must lie inside vpc_cidr."
  default     = "10.20.1.0/24"

  validation {
    condition     = can(cidrnetmask(var.public_subnet_cidr))
    error_message = "public_subnet_cidr must be an IPv4 CIDR block such as 10.20.1.0/24."
  }
}

variable "private_subnet_cidr" {
  type        = string
  description = "CIDR of the private subnet (caller and infer workers). Must lie inside vpc_cidr."
  default     = "10.20.2.0/24"

  validation {
    condition     = can(cidrnetmask(var.private_subnet_cidr))
    error_message = "private_subnet_cidr must be an IPv4 CIDR block such as 10.20.2.0/24."
  }
}

variable "gateway_private_ip_hostnum" {
  type        = number
  description = "Host number of the gateway's fixed private IP inside public_subnet_cidr (10 gives 10.20.1.10). Fixed so workers keep their gateway URL when the gateway is replaced."
  default     = 10

  validation {
    condition     = var.gateway_private_ip_hostnum >= 6 && var.gateway_private_ip_hostnum <= 250 && floor(var.gateway_private_ip_hostnum) == var.gateway_private_ip_hostnum
    error_message = "gateway_private_ip_hostnum must be a whole number from 6 to 250 (AWS reserves .0-.3, the NAT gateway has .5)."
  }
}

variable "allowed_api_cidrs" {
  type        = list(string)
  description = "IPv4 CIDRs allowed to reach the public API on tcp/3111, e.g. [\"203.0.113.7/32\"]. No default: you must say who may call the API."

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
  description = "Optional EC2 key pair name attached to every instance. null (default): no key pair, use SSM Session Manager."
  default     = null
}

variable "ssh_allowed_cidrs" {
  type        = list(string)
  description = "Optional IPv4 CIDRs allowed to reach the gateway on tcp/22. Empty (default): no SSH ingress at all. Workers never accept inbound traffic; reach them with SSM."
  default     = []

  validation {
    condition     = alltrue([for c in var.ssh_allowed_cidrs : can(cidrnetmask(c)) && !endswith(c, "/0")])
    error_message = "ssh_allowed_cidrs must be IPv4 CIDR blocks and none may be a /0."
  }
}

# ---------------------------------------------------------------------------------------------------------------------
# Instances
# ---------------------------------------------------------------------------------------------------------------------

variable "infer_count" {
  type        = number
  description = "Number of `meshd infer` VMs. Each registers the same functions; the gateway balances across them."
  default     = 1

  validation {
    condition     = var.infer_count >= 1 && var.infer_count <= 50 && floor(var.infer_count) == var.infer_count
    error_message = "infer_count must be a whole number from 1 to 50."
  }
}

variable "ami_id" {
  type        = string
  description = "AMI for every VM. null (default): the latest Canonical Ubuntu 24.04 LTS amd64 image (glibc 2.39, runs a binary built on Debian 12; SSM agent preinstalled)."
  default     = null

  validation {
    condition     = var.ami_id == null || can(regex("^ami-[0-9a-f]{8,17}$", var.ami_id))
    error_message = "ami_id must be null or an AMI id such as ami-0123456789abcdef0."
  }
}

variable "gateway_instance_type" {
  type        = string
  description = "Instance type of the gateway VM (x86_64)."
  default     = "t3.small"
}

variable "caller_instance_type" {
  type        = string
  description = "Instance type of the caller VM (x86_64)."
  default     = "t3.small"
}

variable "infer_instance_type" {
  type        = string
  description = "Instance type of each infer VM (x86_64; llama.cpp on CPU wants non-burstable cores)."
  default     = "c7i.large"
}

variable "root_volume_size_gb" {
  type        = number
  description = "Size of each VM's encrypted gp3 root volume in GiB."
  default     = 16

  validation {
    condition     = var.root_volume_size_gb >= 8 && var.root_volume_size_gb <= 1024
    error_message = "root_volume_size_gb must be between 8 and 1024."
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
  description = "Validity of the stack's private CA certificate, in days. Renewed by the first apply in its last 90 days, which replaces every VM."
  default     = 3650

  validation {
    condition     = var.tls_ca_validity_days >= 365 && var.tls_ca_validity_days <= 7300 && floor(var.tls_ca_validity_days) == var.tls_ca_validity_days
    error_message = "tls_ca_validity_days must be a whole number from 365 to 7300."
  }
}

variable "tls_gateway_cert_validity_days" {
  type        = number
  description = "Validity of the gateway's certificate (HTTPS on :3111, wss:// on :49134), in days. Renewed by the first apply in its last 30 days, which replaces the gateway VM."
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
  description = "https:// URL of the GGUF model the infer VMs download at boot. Default: Gemma 3 270M instruction-tuned, Q8_0, from ggml-org, pinned to a repository revision."
  default     = "https://huggingface.co/ggml-org/gemma-3-270m-it-GGUF/resolve/e7647be17ae1108f2f605ed061ca0608b171afff/gemma-3-270m-it-Q8_0.gguf"

  validation {
    condition     = can(regex("^https://[!#-&(-~]+$", var.model_url))
    error_message = "model_url must be an https:// URL of printable ASCII without spaces or quotes."
  }
}

variable "model_sha256" {
  type        = string
  description = "Expected sha256 (hex) of the model file; the infer VM refuses a file that does not match. Default: gemma-3-270m-it-Q8_0.gguf (291545600 bytes)."
  default     = "0ef57d2c838458a1952664260dcba38e5bdda37494f3af732f06e4add24068e3"

  validation {
    condition     = can(regex("^[0-9a-f]{64}$", var.model_sha256))
    error_message = "model_sha256 must be 64 lowercase hex characters."
  }
}

# ---------------------------------------------------------------------------------------------------------------------
# Logging
# ---------------------------------------------------------------------------------------------------------------------

variable "log_retention_days" {
  type        = number
  description = "Retention of the VPC flow log group in days (CloudWatch allowed values, at least 365)."
  default     = 365

  validation {
    condition     = contains([365, 400, 545, 731, 1096, 1827, 2192, 2557, 2922, 3288, 3653], var.log_retention_days)
    error_message = "log_retention_days must be a CloudWatch retention value of at least 365 (365, 400, 545, 731, 1096, 1827, ...)."
  }
}
