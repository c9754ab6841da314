# The image variants, all the same verified disk (nixos/image.nix) in the form each
# place takes it — the names of nixpkgs' `nixos-rebuild build-image --image-variant`:
#   raw-efi   the raw GPT disk (dd it, or `devos-build` registers it)
#   qemu-efi  the same disk as qcow2, for QEMU and libvirt
#   amazon    the raw disk with the image-info.json that NixOS/amis' EBS-direct
#             upload reads (UEFI boot; `devos-build publish ami` uploads the raw disk)
# Each is a function of an evaluated NixOS configuration.
#
# The disk is `system.build.finalImage`, not `system.build.image`: with
# image.repart.verityStore on, `image` is the disk before the unified kernel image is
# in its ESP (nothing to boot). nixpkgs' repart-verity-store.nix builds the UKI with
# the store's root hash from an intermediate image and writes it into the ESP of
# `finalImage`, the disk that boots.
{ pkgs }:

let
  # The one .raw file the image build writes (its name option moved between releases).
  raw = config: "$(echo ${config.system.build.finalImage}/*.raw)";
  name = config: "${config.devos.image.name}-${config.devos.image.version}";
in
{
  raw-efi = config: config.system.build.finalImage;

  qemu-efi =
    config:
    pkgs.runCommand "${name config}-qcow2" { nativeBuildInputs = [ pkgs.qemu-utils ]; } ''
      mkdir -p $out
      qemu-img convert -f raw -O qcow2 ${raw config} $out/${name config}.qcow2
    '';

  amazon =
    config:
    pkgs.runCommand "${name config}-amazon" { } ''
      mkdir -p $out
      ln -s ${raw config} $out/${name config}.raw
      cat > $out/image-info.json <<INFO
      {
        "label": "${config.system.nixos.label}",
        "system": "${pkgs.stdenv.hostPlatform.system}",
        "boot_mode": "uefi",
        "file": "$out/${name config}.raw",
        "format": "raw"
      }
      INFO
    '';
}
