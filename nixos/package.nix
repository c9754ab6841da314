# The DevOS agent (`devos-agent`) and its command-line client (`devos`), built from
# this workspace with its Cargo.lock, and the files every DevOS image runs it with —
# the systemd units, the D-Bus policy, activation file and introspection XML, and the
# default configuration — installed from agent/dist/, the same files the Debian
# package ships (one source; only /usr/bin paths are rewritten to the store).
{
  lib,
  rustPlatform,
  pkg-config,
  sqlite,
}:

let
  workspace = lib.importTOML ../Cargo.toml;
  # Only what the build reads: a change to docs/ or images/ does not rebuild the agent.
  src = lib.fileset.toSource {
    root = ../.;
    fileset = lib.fileset.unions [
      ../Cargo.toml
      ../Cargo.lock
      ../agent
      ../builder
      ../tests
    ];
  };
in
rustPlatform.buildRustPackage {
  pname = "devos-agent";
  inherit (workspace.workspace.package) version;
  inherit src;

  cargoLock.lockFile = ../Cargo.lock;

  # The agent's two binaries only (the workspace also holds the image builder).
  cargoBuildFlags = [
    "--package"
    "devos-agent"
    "--bin"
    "devos-agent"
    "--bin"
    "devos"
  ];
  # Its unit tests need a system bus, bubblewrap and user namespaces: they run in the
  # NixOS VM test (tests/agent.nix) and in this repository's CI, not in the sandbox.
  doCheck = false;

  nativeBuildInputs = [ pkg-config ];
  # rusqlite links the system's SQLite, as on Debian.
  buildInputs = [ sqlite ];

  postInstall = ''
    dist=${../agent/dist}
    install -Dm644 $dist/devos-agent.service $dist/devos-selftest.service \
      $dist/devos-ec2-keys.service $dist/devos-boot-complete.service \
      -t $out/lib/systemd/system
    install -Dm644 $dist/org.devos.Agent1.conf -t $out/share/dbus-1/system.d
    install -Dm644 $dist/org.devos.Agent1.service -t $out/share/dbus-1/system-services
    install -Dm644 $dist/org.devos.Agent1.xml -t $out/share/dbus-1/interfaces
    install -Dm644 $dist/agent.toml $out/share/devos/agent.toml
    substituteInPlace $out/lib/systemd/system/*.service \
      --replace-quiet /usr/bin/devos-agent $out/bin/devos-agent \
      --replace-quiet /usr/bin/devos $out/bin/devos
  '';

  meta = {
    description = "DevOS developer agent: natural-language requests over D-Bus, planned, approved, sandboxed and audited";
    homepage = "https://github.com/devos-project/devos";
    license = lib.licenses.asl20;
    mainProgram = "devos";
    platforms = lib.platforms.linux;
  };
}
