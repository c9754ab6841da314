# services.devos-agent: the DevOS agent in any NixOS system.
#
#   imports = [ devos.nixosModules.devos-agent ];   # or ./nixos/module.nix
#   services.devos-agent.enable = true;
#   services.devos-agent.settings.model.region = "eu-west-1";
#
# The systemd units, D-Bus policy, activation file and introspection XML are the
# package's copies of agent/dist/ (what Debian images run); /etc/devos/agent.toml is
# agent/dist/agent.toml with `settings` merged over it, rendered as TOML.
{
  config,
  lib,
  pkgs,
  ...
}:

let
  cfg = config.services.devos-agent;
  toml = pkgs.formats.toml { };
  systemd = config.systemd.package;
  shipped = lib.importTOML ../agent/dist/agent.toml;
  # The shipped configuration with the programs it names found in the store (NixOS has
  # no /usr/bin) and NixOS's administrators' group.
  defaults = lib.recursiveUpdate shipped {
    sandbox.bwrap = "${pkgs.bubblewrap}/bin/bwrap";
    policy.admin-groups = [ "wheel" ];
    update = {
      sysupdate = "${systemd}/lib/systemd/systemd-sysupdate";
      bootctl = "${systemd}/bin/bootctl";
      launcher = [ "${systemd}/bin/systemd-run" ] ++ lib.tail shipped.update.launcher;
      reboot = [ "${systemd}/bin/systemctl" ] ++ lib.tail shipped.update.reboot;
    };
  };
  configFile = toml.generate "agent.toml" (lib.recursiveUpdate defaults cfg.settings);
in
{
  options.services.devos-agent = {
    enable = lib.mkEnableOption "the DevOS developer agent (org.devos.Agent1 on the system bus)";

    package = lib.mkOption {
      type = lib.types.package;
      default = pkgs.callPackage ./package.nix { };
      defaultText = lib.literalExpression "pkgs.callPackage ./package.nix { }";
      description = "The package providing devos-agent, devos and the agent's unit and D-Bus files.";
    };

    settings = lib.mkOption {
      inherit (toml) type;
      default = { };
      example = lib.literalExpression ''
        {
          log-level = "debug";
          model.region = "eu-west-1";
          policy.auto-approve = [ "read-only" ];
        }
      '';
      description = ''
        Agent configuration (the keys of /etc/devos/agent.toml, docs/spec.md's
        `[agent.config]`), merged over the shipped defaults. The agent checks the
        result when it starts and names any key it does not know.
      '';
    };
  };

  config = lib.mkIf cfg.enable {
    environment.systemPackages = [ cfg.package ];
    environment.etc."devos/agent.toml".source = configFile;

    services.dbus.packages = [ cfg.package ];
    systemd.packages = [ cfg.package ];

    # NixOS does not read [Install] sections of packaged units: say it here.
    systemd.services.devos-agent = {
      wantedBy = [ "multi-user.target" ];
      aliases = [ "dbus-org.devos.Agent1.service" ];
      # What the agent runs: the sandbox, git for the context index, setpriv.
      path = [
        pkgs.bubblewrap
        pkgs.git
        pkgs.util-linux
        systemd
      ];
      restartTriggers = [ configFile ];
    };
    # Runs only when a boot test passes the devos.selftest credential.
    systemd.services.devos-selftest.wantedBy = [ "multi-user.target" ];
    # Runs only where /etc/devos/ec2-keys.env names a user (its [Install] section says
    # multi-user.target, as for the two above).
    systemd.services.devos-ec2-keys.wantedBy = [ "multi-user.target" ];
    # Instance metadata (and with it the instance role) for root only, as the Debian
    # images route it (docs/agent.md, "Instance metadata is root's").
    # (network-pre.target is passive: pulled in by the firewall, if any. The unit is
    # pulled in by itself, and ordered before the network comes up.)
    systemd.services.devos-metadata-root-only = {
      description = "Instance metadata for root only";
      wantedBy = [ "multi-user.target" ];
      wants = [ "network-pre.target" ];
      before = [ "network-pre.target" ];
      unitConfig.DefaultDependencies = false;
      serviceConfig = {
        Type = "oneshot";
        RemainAfterExit = true;
      };
      path = [ pkgs.iproute2 ];
      script = ''
        rule() {
          ip "$1" rule del to "$2" uidrange 1-4294967294 prohibit pref 100 2>/dev/null || true
          ip "$1" rule add to "$2" uidrange 1-4294967294 prohibit pref 100
        }
        rule -4 169.254.169.254/32
        # (A kernel without IPv6 has no such route to close.)
        if [ -e /proc/sys/net/ipv6 ]; then rule -6 fd00:ec2::254/128; fi
      '';
    };
    # systemd-networkd removes routing policy rules it did not make (when it starts,
    # and when a link is configured): where it runs, it must keep these.
    systemd.network.config.networkConfig.ManageForeignRoutingPolicyRules =
      lib.mkIf config.systemd.network.enable (lib.mkDefault false);
    # Runs only on a counted boot (a version on trial): its health gates the blessing.
    systemd.services.devos-boot-complete.requiredBy = [ "boot-complete.target" ];
  };
}
