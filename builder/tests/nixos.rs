//! NixOS images: what can be checked without nixpkgs runs everywhere (every .nix file
//! parses, the module runs agent/dist's files rather than copies, a NixOS spec without
//! Nix is refused in words); what needs nixpkgs and a binary cache runs where
//! `DEVOS_NIXPKGS` names a nixpkgs (a flake reference or a path, the `nixpkgs` input
//! is overridden with it) and says why it is skipped elsewhere.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::devos_build_command;
use devos_tests::{repo_root, require};

/// Every .nix file of the repository (flake.nix, nixos/), sorted.
fn nix_files() -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "nix") {
                out.push(path);
            }
        }
    }
    let mut files = vec![repo_root().join("flake.nix")];
    walk(&repo_root().join("nixos"), &mut files);
    files.sort();
    files
}

#[test]
fn every_nix_file_parses() {
    require("nix-instantiate", "nix-bin");
    let files = nix_files();
    for want in [
        "flake.nix",
        "nixos/package.nix",
        "nixos/module.nix",
        "nixos/image.nix",
        "nixos/variants.nix",
        "nixos/tests/agent.nix",
    ] {
        assert!(files.contains(&repo_root().join(want)), "{want} is missing");
    }
    for file in &files {
        let out = Command::new("nix-instantiate")
            .arg("--parse")
            .arg(file)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}: {}",
            file.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // The flake pins a NixOS release, by revision and hash.
    let lock: serde_json::Value =
        serde_json::from_slice(&std::fs::read(repo_root().join("flake.lock")).unwrap()).unwrap();
    let nixpkgs = &lock["nodes"]["nixpkgs"];
    assert!(
        nixpkgs["original"]["ref"]
            .as_str()
            .unwrap()
            .starts_with("nixos-")
    );
    assert_eq!(nixpkgs["locked"]["rev"].as_str().unwrap().len(), 40);
    assert!(
        nixpkgs["locked"]["narHash"]
            .as_str()
            .unwrap()
            .starts_with("sha256-")
    );
}

/// `expr` evaluated by Nix (`nix-instantiate --eval --strict --json`), as JSON. The
/// repository's modules are called with stand-ins for what nixpkgs gives them, just
/// enough to read back what they set: this checks their own attributes, not nixpkgs'.
fn nix_eval(expr: &str) -> serde_json::Value {
    require("nix-instantiate", "nix-bin");
    let out = Command::new("nix-instantiate")
        .args(["--eval", "--strict", "--json", "-E", expr])
        .current_dir(repo_root())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{expr}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The nixpkgs `lib` functions nixos/ uses, as far as these tests need them: option
/// declarations and priorities read as their plain values.
const LIB_STUB: &str = r#"rec {
  mkOption = o: o;
  mkEnableOption = d: { };
  mkDefault = v: v;
  mkForce = v: v;
  mkIf = c: v: v;
  literalExpression = e: e;
  types = { strMatching = r: r; str = "str"; package = "package"; };
  toUpper = s: s;
  tail = builtins.tail;
  importTOML = f: builtins.fromTOML (builtins.readFile f);
  recursiveUpdate = l: r: l // builtins.mapAttrs (n: v:
    if builtins.isAttrs v && builtins.isAttrs (l.${n} or null) then recursiveUpdate l.${n} v else v) r;
}"#;

#[test]
fn the_nixos_image_keeps_homes_host_keys_and_handed_in_keys_on_var_as_debian_does() {
    let image = nix_eval(&format!(
        r#"let
          lib = {LIB_STUB};
          m = import ./nixos/image.nix {{
            inherit lib;
            modulesPath = "/nixpkgs/nixos/modules";
            pkgs.stdenv.hostPlatform.efiArch = "x64";
            config = {{
              devos.image = {{ name = "n"; version = "1"; varSize = "1G"; }};
              image.repart.verityStore.partitionIds = {{ esp = "00-esp"; store = "20-store"; store-verity = "10-store-verity"; }};
              systemd.package = "/nix/store/systemd";
              networking.timeServers = [ "0.nixos.pool.ntp.org" ];
            }};
          }};
        in {{
          inherit (m.config) fileSystems;
          var = m.config.systemd.repart.partitions."40-var";
          tmp = m.config.boot.tmp.useTmpfs;
          hostKeys = map (k: k.path) m.config.services.openssh.hostKeys;
          keyFiles = m.config.services.openssh.authorizedKeysFiles;
          time = m.config.services.timesyncd.servers;
        }}"#
    ));
    let fs = &image["fileSystems"];
    // /var is writable and unverified: nothing set-ID or a device node on it counts
    // (the hardening self-test); /home is a bind mount of /var/home, which keeps that.
    for option in ["nosuid", "nodev"] {
        assert!(
            fs["/var"]["options"]
                .as_array()
                .unwrap()
                .contains(&option.into()),
            "{fs:#}"
        );
    }
    assert_eq!(fs["/home"]["device"], "/var/home", "{fs:#}");
    // NixOS's activation makes the users' homes in the initrd: /home must be mounted
    // there by then, and its source must exist on the first boot, when systemd-repart
    // has only just made /var.
    assert_eq!(fs["/home"]["neededForBoot"], true, "{fs:#}");
    assert_eq!(fs["/var"]["neededForBoot"], true, "{fs:#}");
    assert_eq!(image["var"]["MakeDirectories"], "/home", "{image:#}");
    assert_eq!(image["tmp"], true);
    // Host keys made on first boot in /var, not on the tmpfs root (new keys at every
    // boot); the paths the Debian images and the self-test's ssh-host-keys use.
    assert_eq!(
        image["hostKeys"],
        serde_json::json!([
            "/var/lib/devos/ssh/ssh_host_ed25519_key",
            "/var/lib/devos/ssh/ssh_host_ecdsa_key"
        ])
    );
    // sshd reads the keys devos-ec2-keys.service hands in where the agent writes them.
    assert_eq!(
        image["keyFiles"],
        serde_json::json!([format!("{}/%u", devos_agent::ec2::AUTHORIZED_KEYS_DIR)])
    );
    // EC2's time service first, then whatever the configuration's time servers are.
    assert_eq!(
        image["time"],
        serde_json::json!(["169.254.169.123", "fd00:ec2::123", "0.nixos.pool.ntp.org"])
    );
}

#[test]
fn the_agent_module_names_no_program_by_a_path_nixos_lacks() {
    let settings = nix_eval(&format!(
        r#"let
          lib = {LIB_STUB};
          m = import ./nixos/module.nix {{
            inherit lib;
            pkgs = {{
              formats.toml = {{ }}: {{ type = "toml"; generate = name: value: value; }};
              bubblewrap = "/nix/store/bubblewrap";
              git = "/nix/store/git";
              util-linux = "/nix/store/util-linux";
              iproute2 = "/nix/store/iproute2";
            }};
            config = {{
              services.devos-agent = {{ enable = true; package = "/nix/store/devos-agent"; settings = {{ }}; }};
              systemd.package = "/nix/store/systemd";
              systemd.network.enable = false;
            }};
          }};
        in m.config.environment.etc."devos/agent.toml".source"#
    ));
    fn strings<'a>(v: &'a serde_json::Value, out: &mut Vec<&'a str>) {
        match v {
            serde_json::Value::String(s) => out.push(s),
            serde_json::Value::Array(a) => a.iter().for_each(|v| strings(v, out)),
            serde_json::Value::Object(o) => o.values().for_each(|v| strings(v, out)),
            _ => {}
        }
    }
    let mut all = Vec::new();
    strings(&settings, &mut all);
    let usr: Vec<&&str> = all.iter().filter(|s| s.starts_with("/usr/")).collect();
    assert!(
        usr.is_empty(),
        "NixOS has no /usr/bin or /usr/lib, yet agent.toml names {usr:?}"
    );
    assert_eq!(
        settings["update"]["reboot"][0],
        "/nix/store/systemd/bin/systemctl"
    );
    assert_eq!(
        settings["sandbox"]["bwrap"],
        "/nix/store/bubblewrap/bin/bwrap"
    );
    assert_eq!(
        settings["policy"]["admin-groups"],
        serde_json::json!(["wheel"])
    );
}

/// Files under `dir` (not .git or target), recursively.
fn repo_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if path.is_dir() {
            if name != ".git" && name != "target" {
                repo_files(&path, out);
            }
        } else {
            out.push(path);
        }
    }
}

#[test]
fn nixos_images_run_the_agent_files_of_agent_dist_not_a_copy() {
    let dist = repo_root().join("agent/dist");
    let package = std::fs::read_to_string(repo_root().join("nixos/package.nix")).unwrap();
    let module = std::fs::read_to_string(repo_root().join("nixos/module.nix")).unwrap();
    assert!(package.contains("dist=${../agent/dist}"), "{package}");
    assert!(
        module.contains("lib.importTOML ../agent/dist/agent.toml"),
        "{module}"
    );
    let mut everything = Vec::new();
    repo_files(&repo_root(), &mut everything);
    for entry in std::fs::read_dir(&dist).unwrap() {
        let file = entry.unwrap().path();
        let name = file.file_name().unwrap().to_string_lossy().into_owned();
        // Every unit, bus file and the configuration reaches NixOS images.
        assert!(
            package.contains(&name),
            "nixos/package.nix does not install {name}"
        );
        let bytes = std::fs::read(&file).unwrap();
        let copies: Vec<&PathBuf> = everything
            .iter()
            .filter(|p| !p.starts_with(&dist) && std::fs::read(p).is_ok_and(|b| b == bytes))
            .collect();
        assert!(copies.is_empty(), "{name} is copied to {copies:?}");
    }
}

#[test]
fn a_nixos_spec_is_refused_in_words_where_there_is_no_nix() {
    // A PATH with everything but Nix.
    let bin = tempfile::tempdir().unwrap();
    let spec = repo_root().join("images/devos-nixos.toml");
    let images = tempfile::tempdir().unwrap();
    let build = |c: &mut Command| {
        c.args(["image", "build"])
            .arg(&spec)
            .arg("--out")
            .arg(images.path().join("out"))
            .output()
            .unwrap()
    };
    let out = build(devos_build_command().env("PATH", bin.path()));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr
            .contains("devos-nixos.toml: a NixOS image is built with Nix, and there is none here"),
        "{stderr}"
    );
    assert!(stderr.contains("hint: install Nix"), "{stderr}");
    // Nothing was rendered or made.
    assert_eq!(std::fs::read_dir(images.path()).unwrap().count(), 0);
    // A Nix older than nixpkgs needs (Debian 12's nix-bin is 2.8, what tests/setup-host
    // installs there) is refused as such, before any work.
    let host_nix = Command::new("nix").arg("--version").output();
    let old = host_nix.as_ref().ok().and_then(|o| {
        let v = String::from_utf8_lossy(&o.stdout);
        let mut parts = v.split_whitespace().last()?.split('.');
        let minor: u64 = parts.nth(1)?.parse().ok()?;
        (minor < 18).then(|| v.trim().to_owned())
    });
    if let Some(version) = old {
        let out = build(&mut devos_build_command());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{version}");
        assert!(
            stderr.contains("is too old to build NixOS images (nixpkgs needs 2.18 or newer)"),
            "{version}: {stderr}"
        );
        assert_eq!(std::fs::read_dir(images.path()).unwrap().count(), 0);
    }
    // `image plan` resolves Debian package sets; it says what to run instead.
    let out = devos_build_command()
        .args(["image", "plan"])
        .arg(&spec)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("resolved by Nix when the image is built"),
        "{stderr}"
    );
    assert!(stderr.contains("devos-build image build"), "{stderr}");
    // Nor has `image build --dry-run` anything to say what it would build: it says so,
    // not to run itself again.
    let out = devos_build_command()
        .args(["image", "build", "--dry-run"])
        .arg(&spec)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("a NixOS spec has no dry run")
            && stderr.contains("image validate")
            && stderr.contains("(without --dry-run)"),
        "{stderr}"
    );
}

#[test]
fn a_nixos_image_name_no_gpt_can_hold_is_refused_before_any_work() {
    // nixos/image.nix names the store's partitions NAME_VERSION; nixpkgs would refuse
    // the final version's only at `nix build`.
    let dir = tempfile::tempdir().unwrap();
    let spec = dir.path().join("long.toml");
    std::fs::write(
        &spec,
        "[image]\nname = \"devos-nixos-workstation\"\nversion = \"0.1.0\"\n[base]\ndistro = \"nixos\"\n",
    )
    .unwrap();
    let out = devos_build_command()
        .args(["image", "build"])
        .arg(&spec)
        .arg("--out")
        .arg(dir.path().join("out"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("the Nix store's partition name")
            && stderr.contains("is longer than the 36 characters a GPT holds"),
        "{stderr}"
    );
    assert!(
        stderr.contains("shorten `[image] name` or `version`"),
        "{stderr}"
    );
    assert!(!dir.path().join("out").exists());
    // `image validate` says so as well, offline.
    let out = devos_build_command()
        .args(["image", "validate"])
        .arg(&spec)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("is longer than the 36 characters a GPT holds"),
        "{stderr}"
    );
}

/// The nixpkgs the gated tests use, or None after saying why they are skipped.
fn nixpkgs(test: &str) -> Option<String> {
    match std::env::var("DEVOS_NIXPKGS") {
        Ok(n) if !n.is_empty() => Some(n),
        _ => {
            eprintln!(
                "SKIPPED {test}: it needs Nix, a nixpkgs and a binary cache, which this machine lacks; \
                 set DEVOS_NIXPKGS to a nixpkgs flake reference or path (e.g. github:NixOS/nixpkgs/nixos-25.11) to run it"
            );
            None
        }
    }
}

/// `nix ARGS` in the repository, with flakes on and the nixpkgs input overridden.
fn nix(nixpkgs: &str, args: &[&str]) -> String {
    let out = Command::new("nix")
        .current_dir(repo_root())
        .args(["--extra-experimental-features", "nix-command flakes"])
        .args(args)
        .args(["--override-input", "nixpkgs", nixpkgs])
        .output()
        .expect("nix");
    assert!(
        out.status.success(),
        "nix {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn with_nixpkgs_every_image_variant_evaluates_without_import_from_derivation() {
    let Some(nixpkgs) =
        nixpkgs("with_nixpkgs_every_image_variant_evaluates_without_import_from_derivation")
    else {
        return;
    };
    for output in [
        "image-raw-efi",
        "image-qemu-efi",
        "image-amazon",
        "devos-agent",
    ] {
        let attr = format!(".#packages.x86_64-linux.{output}.drvPath");
        let drv = nix(
            &nixpkgs,
            &[
                "eval",
                "--raw",
                "--option",
                "allow-import-from-derivation",
                "false",
                &attr,
            ],
        );
        assert!(drv.ends_with(".drv"), "{output}: {drv}");
    }
}

#[test]
fn with_nixpkgs_the_flake_checks_and_the_nixos_vm_test_pass() {
    let Some(nixpkgs) = nixpkgs("with_nixpkgs_the_flake_checks_and_the_nixos_vm_test_pass") else {
        return;
    };
    // `nix flake check` builds the checks: the agent package and the VM test.
    nix(&nixpkgs, &["flake", "check", "--print-build-logs"]);
}

#[test]
fn with_nixpkgs_devos_build_builds_registers_and_boot_tests_the_nixos_spec() {
    let Some(_nixpkgs) =
        nixpkgs("with_nixpkgs_devos_build_builds_registers_and_boot_tests_the_nixos_spec")
    else {
        return;
    };
    // devos-build builds with the nixpkgs flake.lock pins, into a directory of the
    // test's (never the checkout's target/images).
    let images = tempfile::tempdir().unwrap();
    let out = devos_build_command()
        .args(["image", "build", "--json", "--test"])
        .arg(repo_root().join("images/devos-nixos.toml"))
        .arg("--out")
        .arg(images.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let built: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let m = &built["manifest"];
    assert_eq!(m["distro"], "nixos", "{built:#}");
    let version = m["version"].as_str().unwrap();
    assert!(version.starts_with("0.1.0+"), "{version}");
    let labels: Vec<&str> = m["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["label"].as_str().unwrap())
        .collect();
    assert!(labels.contains(&"esp"), "{labels:?}");
    // Registered like a Debian version: `image show NAME@VERSION` finds it.
    let out = devos_build_command()
        .args(["image", "show", "--json"])
        .arg(format!("devos-nixos@{version}"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A second build is up to date: the derivation, and so the id, did not change.
    let out = devos_build_command()
        .args(["image", "build", "--json"])
        .arg(repo_root().join("images/devos-nixos.toml"))
        .arg("--out")
        .arg(images.path())
        .output()
        .unwrap();
    let again: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(again["manifest"]["version"], version);
}
