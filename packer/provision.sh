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
# apt takes a file for a package only when its name has a slash (else it looks up a
# package of that name): `devos-agent.deb` as given becomes `./devos-agent.deb`.
case $deb in
  */*) ;;
  *) deb=./$deb ;;
esac
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

# Instance metadata (and with it the instance role's credentials) for root only, as on
# images devos-build makes (docs/agent.md, "Instance metadata is root's"): a routing
# policy rule fails every other uid's connection to it with "Permission denied", the
# agent's sandboxed actions included. Made before the network comes up, at every boot;
# systemd-networkd (netplan's renderer on Ubuntu's server images) must keep it.
install -d -m 0755 /usr/local/lib/devos /etc/systemd/networkd.conf.d
cat > /usr/local/lib/devos/metadata-root-only <<'RULES'
#!/bin/sh
set -eu
rule() {
  ip "$1" rule del to "$2" uidrange 1-4294967294 prohibit pref 100 2>/dev/null || true
  ip "$1" rule add to "$2" uidrange 1-4294967294 prohibit pref 100
}
# EC2 Instance Connect's key lookup (Ubuntu's AMIs ship it) runs as its own system
# user and reads the keys pushed to it from instance metadata: that user may.
allow() {
  ip "$1" rule del to "$2" uidrange "$3-$3" lookup main pref 99 2>/dev/null || true
  ip "$1" rule add to "$2" uidrange "$3-$3" lookup main pref 99
}
connect=$(id -u ec2-instance-connect 2>/dev/null || true)
rule -4 169.254.169.254/32
if [ -n "$connect" ]; then allow -4 169.254.169.254/32 "$connect"; fi
# (A kernel without IPv6 has no such route to close.)
if [ -e /proc/sys/net/ipv6 ]; then
  rule -6 fd00:ec2::254/128
  if [ -n "$connect" ]; then allow -6 fd00:ec2::254/128 "$connect"; fi
fi
RULES
chmod 0755 /usr/local/lib/devos/metadata-root-only
cat > /etc/systemd/system/devos-metadata-root-only.service <<'UNIT'
[Unit]
Description=Instance metadata for root only (DevOS)
DefaultDependencies=no
Wants=network-pre.target
Before=network-pre.target

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/usr/local/lib/devos/metadata-root-only

[Install]
WantedBy=multi-user.target
UNIT
printf '[Network]\nManageForeignRoutingPolicyRules=no\n' \
  > /etc/systemd/networkd.conf.d/00-devos-keep-rules.conf
systemctl enable devos-metadata-root-only.service
# No machine-id or host keys baked into the AMI: each instance makes its own.
truncate -s 0 /etc/machine-id
rm -f /etc/ssh/ssh_host_*_key /etc/ssh/ssh_host_*_key.pub
cloud-init clean --logs 2>/dev/null || true
