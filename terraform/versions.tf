terraform {
  # Cross-variable validation (allowed_api_cidrs vs allow_public_api) needs Terraform >= 1.9.
  required_version = ">= 1.9.0"

  required_providers {
    aws = {
      source  = "hashicorp/aws"
      version = ">= 5.40.0, < 7.0.0"
    }
    random = {
      source  = "hashicorp/random"
      version = ">= 3.6.0, < 4.0.0"
    }
    # The stack's private CA and the gateway certificate (tls.tf). >= 4.0: private_key_pem_pkcs8.
    tls = {
      source  = "hashicorp/tls"
      version = ">= 4.0.0, < 5.0.0"
    }
  }
}

provider "aws" {
  region = var.region

  default_tags {
    tags = merge(var.tags, {
      Project   = "meshd"
      Stack     = var.name
      ManagedBy = "terraform"
    })
  }
}
