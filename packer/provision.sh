#!/bin/sh
# Install the DevOS agent and its configuration on a stock Ubuntu (or Debian) machine.
# The one provisioning path for every image not built by `devos-build image build`:
# Packer runs it on the build instance, and a WorkSpace is prepared with it by hand
# (docs/publish.md). Usage: provision.sh AGENT_DEB AGENT_TOML [IMAGE_ID IMAGE_VERSION]
set -eu

usage="usage: provision.sh AGENT_DEB AGENT_TOML [IMAGE_ID IMAGE_VERSION]"
deb=${1:?$usage}
config=${2:?$usage}
image_id=${3:-}
version=${4:-}

export DEBIAN_FRONTEND=noninteractive
# cloud-init may still hold the dpkg lock on a fresh instance.
if command -v cloud-init >/dev/null; then
  cloud-init status --wait >/dev/null || true
fi
apt-get update -q
# apt resolves the package's dependencies (dbus) from the distribution.
apt-get install -y -q --no-install-recommends "$deb"
install -D -m 0644 "$config" /etc/devos/agent.toml
if [ -n "$version" ]; then
  # os-release's IMAGE_ID/IMAGE_VERSION name the image, as on images devos-build
  # makes; the agent's Version() reports IMAGE_VERSION.
  release=$(readlink -f /etc/os-release)
  { grep -v '^IMAGE_\(ID\|VERSION\)=' "$release"
    printf 'IMAGE_ID=%s\nIMAGE_VERSION=%s\n' "$image_id" "$version"; } > /etc/os-release.devos
  mv /etc/os-release.devos /etc/os-release
fi
systemctl enable devos-agent.service
# No machine-id or host keys baked into the AMI: each instance makes its own.
truncate -s 0 /etc/machine-id
rm -f /etc/ssh/ssh_host_*_key /etc/ssh/ssh_host_*_key.pub
cloud-init clean --logs 2>/dev/null || true
