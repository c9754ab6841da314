# Rendered by `devos-build packer render` from packer/devos-ami.pkr.hcl.hbs for
# devos-pub@0.5.0+eeeeeeeeeeee; edit the template, not this file.
#
# An AMI from the latest official Ubuntu base AMI with the same devos-agent package
# and configuration as the DevOS image devos-pub@0.5.0+eeeeeeeeeeee.

variable "region" {
  type    = string
  default = "us-east-1"
}

variable "instance_type" {
  type    = string
  default = "t3.small"
}

# Canonical's account and the name pattern of its Ubuntu 24.04 server AMIs.
variable "base_ami_owner" {
  type    = string
  default = "099720109477"
}

variable "base_ami_name" {
  type    = string
  default = "ubuntu/images/hvm-ssd-gp3/ubuntu-noble-24.04-amd64-server-*"
}

variable "subnet_id" {
  type    = string
  default = ""
}

source "amazon-ebs" "devos" {
  region        = var.region
  instance_type = var.instance_type
  subnet_id     = var.subnet_id
  # A non-AWS endpoint (another partition or a test server).
  custom_endpoint_ec2        = "http://127.0.0.1:33691"
  skip_region_validation     = true
  skip_credential_validation = true
  skip_metadata_api_check    = true

  source_ami_filter {
    filters = {
      name                = var.base_ami_name
      root-device-type    = "ebs"
      virtualization-type = "hvm"
    }
    owners      = [var.base_ami_owner]
    most_recent = true
  }

  ami_name        = "devos-pub-ubuntu-0.5.0-eeeeeeeeeeee"
  ami_description = "DevOS agent 0.5.0+eeeeeeeeeeee on Ubuntu (build 0000000000000000000000000000000000000000000000000050eeeeeeeeeeee)"
  ena_support     = true

  launch_block_device_mappings {
    device_name           = "/dev/sda1"
    volume_type           = "gp3"
    throughput            = 125
    iops                  = 3000
    volume_size           = 8
    delete_on_termination = true
  }

  # Packer 1.6 cannot require IMDSv2 on the build instance or the AMI
  # (metadata_options and imds_support came with the amazon plugin 1.0): instances
  # launched from this AMI get it from their launch template.

  # No communicator: nothing is provisioned. Only for endpoints without real
  # instances (tests); the AMI is tagged so.
  communicator = "none"

  tags = {
    "Name" = "devos-pub-0.5.0-eeeeeeeeeeee"
    "devos:build-id" = "0000000000000000000000000000000000000000000000000050eeeeeeeeeeee"
    "devos:built-by" = "packer"
    "devos:image" = "devos-pub"
    "devos:provisioned" = "no-communicator"
    "devos:version" = "0.5.0+eeeeeeeeeeee"
    "devos:base-ami" = "{{ .SourceAMI }}"
  }
  snapshot_tags = {
    "devos:build-id" = "0000000000000000000000000000000000000000000000000050eeeeeeeeeeee"
  }
}

build {
  sources = ["source.amazon-ebs.devos"]

  post-processor "manifest" {
    output     = "packer-manifest.json"
    strip_path = true
    custom_data = {
      name     = "devos-pub"
      version  = "0.5.0+eeeeeeeeeeee"
      build_id = "0000000000000000000000000000000000000000000000000050eeeeeeeeeeee"
    }
  }
}
