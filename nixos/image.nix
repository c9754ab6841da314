# The DevOS NixOS image: the agent on, a read-only verified system and a writable /var,
# the same shape as the Debian images.
#
# Disk (systemd-repart, through nixpkgs' image.repart):
#   esp          systemd-boot and the unified kernel image, whose command line carries
#                the store's dm-verity root hash
#   store        /nix/store on erofs, read-only, every block checked by dm-verity
#   store-verity its hash tree
#   devos-var    ext4, made by systemd-repart on the first boot; /var and /home
# The root is a tmpfs that NixOS's activation fills (/etc comes from the image again
# on every boot); state that must last lives under /var.
#
# devos-build renders a spec into a module that sets `devos.image` and the rest
# (docs/nixos.md); `nix build .#image-raw-efi` builds this file with its defaults.
{
  config,
  lib,
  pkgs,
  modulesPath,
  ...
}:

let
  cfg = config.devos.image;
  inherit (config.image.repart.verityStore) partitionIds;
  efiArch = pkgs.stdenv.hostPlatform.efiArch;
in
{
  imports = [
    ./module.nix
    "${modulesPath}/image/repart.nix"
    "${modulesPath}/profiles/minimal.nix"
  ];

  options.devos.image = {
    name = lib.mkOption {
      type = lib.types.strMatching "[a-z0-9][a-z0-9._-]*";
      default = "devos-nixos";
      description = "The image's name: IMAGE_ID in os-release, the disk file's name.";
    };
    version = lib.mkOption {
      type = lib.types.str;
      default = "0.1.0";
      description = "The image's version: IMAGE_VERSION in os-release.";
    };
    varSize = lib.mkOption {
      type = lib.types.str;
      default = "1G";
      description = "The smallest size of the writable /var partition made on the first boot.";
    };
  };

  config = {
    services.devos-agent.enable = lib.mkDefault true;

    system.image.id = cfg.name;
    system.image.version = cfg.version;
    system.stateVersion = lib.mkDefault "25.11";

    boot.loader.grub.enable = false;
    boot.loader.systemd-boot.enable = false; # the image installs it itself (below)
    boot.initrd.systemd.enable = true;
    # The storage and network drivers of the machines images run on, as the Debian
    # images' initrd has them (image/rootfs.rs): QEMU's virtio, EC2's NVMe (and Xen's
    # disks) and ENA, Hyper-V's storage, VMware's PVSCSI, SATA and IDE (a VMDK's hint).
    boot.initrd.availableKernelModules = [
      "virtio_pci"
      "virtio_blk"
      "virtio_scsi"
      "sd_mod"
      "nvme"
      "xen_blkfront"
      "hv_storvsc"
      "vmw_pvscsi"
      "ahci"
      "ata_piix"
      "dm_verity"
      "erofs"
    ];
    boot.kernelModules = [ "ena" ];
    boot.kernelParams = [ "console=ttyS0,115200" ];

    image.repart = {
      name = cfg.name;
      inherit (cfg) version;
      verityStore.enable = true;
      partitions = {
        ${partitionIds.esp} = {
          contents."/EFI/BOOT/BOOT${lib.toUpper efiArch}.EFI".source =
            "${config.systemd.package}/lib/systemd/boot/efi/systemd-boot${efiArch}.efi";
          repartConfig = {
            Type = "esp";
            Format = "vfat";
            Label = "esp";
            SizeMinBytes = "256M";
          };
        };
        ${partitionIds.store}.repartConfig = {
          Label = "${cfg.name}_${cfg.version}";
          Minimize = "best";
        };
        ${partitionIds.store-verity}.repartConfig = {
          Label = "${cfg.name}_${cfg.version}";
          Minimize = "best";
        };
      };
    };

    # The writable partition: made and formatted by systemd-repart in the initrd on the
    # first boot, found by its label on every boot.
    boot.initrd.systemd.repart.enable = true;
    systemd.repart.partitions."40-var" = {
      Type = "var";
      Format = "ext4";
      Label = "devos-var";
      SizeMinBytes = cfg.varSize;
      # /var/home, the source of the /home bind mount below, from the first boot on
      # (tmpfiles would make it only after local-fs.target, too late for the mount).
      MakeDirectories = "/home";
    };

    fileSystems = {
      "/" = {
        fsType = "tmpfs";
        options = [ "mode=0755" ];
      };
      "/nix/store" = {
        device = "/usr/nix/store";
        fsType = "none";
        options = [ "bind" ];
      };
      # Writable and unverified: no set-ID program or device node on it counts (the
      # Debian images' fstab line: noatime,nosuid,nodev).
      "/var" = {
        device = "/dev/disk/by-partlabel/devos-var";
        fsType = "ext4";
        options = [ "noatime" "nosuid" "nodev" ];
        neededForBoot = true;
        # systemd-repart above grows the partition into a larger disk at every boot
        # (no SizeMaxBytes); the filesystem follows it (x-systemd.growfs).
        autoResize = true;
      };
      # (A bind mount keeps its source's nosuid,nodev.) Mounted in the initrd, before
      # NixOS's activation runs there and makes the users' homes: mounted later, it
      # would hide the homes made on the tmpfs root.
      "/home" = {
        device = "/var/home";
        fsType = "none";
        options = [ "bind" ];
        depends = [ "/var" ];
        neededForBoot = true;
      };
    };
    systemd.tmpfiles.rules = [ "d /var/home 0755 root root -" ];
    # /tmp as on the Debian images: a tmpfs of its own, nosuid,nodev.
    boot.tmp.useTmpfs = true;

    # Users come from the configuration on every boot (the root is rebuilt).
    users.mutableUsers = false;
    # With mutableUsers off, NixOS refuses a system where neither root nor a wheel user
    # has a password or an SSH key (users-groups.nix). This image's defaults have no
    # user at all, and a spec's users may have neither (images/devos-nixos.toml's `dev`):
    # as on the Debian images, such an account simply cannot log in. A module that
    # wants the check back sets this to false.
    users.allowNoPasswordLogin = lib.mkDefault true;
    # A read-only /usr: no /usr/bin/env to make.
    system.activationScripts.usrbinenv = lib.mkForce "";
    # SSH, where a spec turns it on, for keys only and no root, as on the Debian images
    # (a spec's password hash is for the console).
    services.openssh.settings = {
      PasswordAuthentication = lib.mkDefault false;
      KbdInteractiveAuthentication = lib.mkDefault false;
      PermitRootLogin = lib.mkDefault "no";
      X11Forwarding = lib.mkDefault false;
    };
    # Host keys made on each machine's first boot and kept in /var, as on the Debian
    # images (image/access.rs): NixOS's default, /etc/ssh, is on the tmpfs root and
    # would give the machine new keys at every boot (and an RSA one, slow to make).
    services.openssh.hostKeys = lib.mkDefault [
      {
        type = "ed25519";
        path = "/var/lib/devos/ssh/ssh_host_ed25519_key";
      }
      {
        type = "ecdsa";
        path = "/var/lib/devos/ssh/ssh_host_ecdsa_key";
      }
    ];
    # Keys handed in at boot (devos-ec2-keys.service: the EC2 key pair's, for the user
    # a rendered spec names in /etc/devos/ec2-keys.env), as on the Debian images.
    services.openssh.authorizedKeysFiles = [ "/var/lib/devos/ssh/authorized_keys/%u" ];
    # The clock from EC2's time service first (no route out of the VPC needed), then
    # NixOS's servers, as on the Debian images.
    services.timesyncd.servers = lib.mkDefault (
      [ "169.254.169.123" "fd00:ec2::123" ] ++ config.networking.timeServers
    );
    # An image is never rebuilt in place: no Nix daemon, no channels.
    nix.enable = false;
  };
}
