#!/usr/bin/env bash
# Make a WorkSpaces custom bundle from a WorkSpace that was provisioned with the DevOS
# agent (packer/provision.sh, see docs/fleet.md): CreateWorkspaceImage, wait until the
# image is AVAILABLE, CreateWorkspaceBundle. Prints the bundle id, for
#   devos-build fleet render workspaces ... and BundleId=<it>.
# Re-running with the same NAME and VERSION reuses the image and bundle made before.
#
#   cloudformation/workspaces-bundle.sh WORKSPACE_ID NAME VERSION [COMPUTE_TYPE]
#
# Uses the AWS CLI with the usual configuration (AWS_PROFILE, AWS_REGION, ...).
set -euo pipefail

if [ $# -lt 3 ]; then
  echo "usage: $0 WORKSPACE_ID NAME VERSION [COMPUTE_TYPE (default STANDARD)]" >&2
  exit 2
fi
workspace=$1 name=$2 version=$3 compute=${4:-STANDARD}
# WorkSpaces names allow letters, digits and _./()- (descriptions also spaces), not the
# `+` of a version: it becomes `-` in names and " build " in descriptions.
label="$name-${version//+/-}"
described="DevOS $name ${version//+/ build }"
tags=(Key=devos:image,Value="$name" Key=devos:version,Value="$version")

state=$(aws workspaces describe-workspaces --workspace-ids "$workspace" \
  --query 'Workspaces[0].State' --output text)
case "$state" in
  AVAILABLE | STOPPED) ;;
  *)
    echo "workspaces-bundle: WorkSpace $workspace is $state; it must be AVAILABLE or STOPPED" >&2
    exit 1
    ;;
esac

image=$(aws workspaces describe-workspace-images \
  --query "Images[?Name=='$label'].ImageId | [0]" --output text)
if [ "$image" = "None" ] || [ -z "$image" ]; then
  image=$(aws workspaces create-workspace-image --workspace-id "$workspace" --name "$label" \
    --description "$described (agent from packer/provision.sh)" \
    --tags "${tags[@]}" --query ImageId --output text)
  echo "workspaces-bundle: creating image $image from $workspace" >&2
fi

# Images take 45 minutes or more; give up after three hours.
for _ in $(seq 1 180); do
  image_state=$(aws workspaces describe-workspace-images --image-ids "$image" \
    --query 'Images[0].State' --output text)
  case "$image_state" in
    AVAILABLE) break ;;
    ERROR)
      echo "workspaces-bundle: image $image failed; see: aws workspaces describe-workspace-images --image-ids $image" >&2
      exit 1
      ;;
  esac
  echo "workspaces-bundle: image $image is $image_state" >&2
  sleep "${WORKSPACES_POLL_SECONDS:-60}"
done
if [ "$image_state" != AVAILABLE ]; then
  echo "workspaces-bundle: image $image is still $image_state after three hours" >&2
  exit 1
fi

bundle=$(aws workspaces describe-workspace-bundles --owner SELF \
  --query "Bundles[?Name=='$label'].BundleId | [0]" --output text)
if [ "$bundle" = "None" ] || [ -z "$bundle" ]; then
  bundle=$(aws workspaces create-workspace-bundle --bundle-name "$label" \
    --bundle-description "$described" --image-id "$image" \
    --compute-type Name="$compute" --user-storage Capacity=50 --root-storage Capacity=80 \
    --tags "${tags[@]}" --query WorkspaceBundle.BundleId --output text)
fi
echo "$bundle"
