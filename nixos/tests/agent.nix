# The NixOS VM test of the agent module: the agent owns its bus name, answers Ping,
# and runs a read-only request for a user (the sandbox included).
#
#   nix build .#checks.x86_64-linux.agent
#   (or: nix-build -E 'with import <nixpkgs> {}; testers.runNixOSTest ./nixos/tests/agent.nix')
{
  name = "devos-agent";

  nodes.machine =
    { ... }:
    {
      imports = [ ../module.nix ];
      services.devos-agent.enable = true;
      users.users.dev = {
        isNormalUser = true;
        extraGroups = [ "wheel" ];
      };
    };

  testScript = ''
    machine.wait_for_unit("multi-user.target")
    machine.wait_for_unit("devos-agent.service")

    with subtest("the agent owns org.devos.Agent1"):
        owner = machine.succeed(
            "busctl --system status org.devos.Agent1 | grep -E '^PID='"
        )
        assert owner.strip() != "PID=", owner

    with subtest("Ping answers"):
        machine.succeed("busctl --system call org.devos.Agent1 /org/devos/Agent1 org.devos.Agent1 Ping")

    with subtest("a read-only request runs, as the calling user"):
        machine.succeed("su - dev -c 'mkdir -p ~/proj && echo hello > ~/proj/README'")
        out = machine.succeed("su - dev -c 'devos --json run --cwd ~/proj list files'")
        assert "README" in out, out

    with subtest("the audit log verifies"):
        machine.succeed("devos audit verify")
  '';
}
