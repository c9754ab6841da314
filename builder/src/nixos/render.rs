//! A `distro = "nixos"` spec as a NixOS module: what the spec says (packages as
//! nixpkgs attributes, users, hostname, time zone, kernel command line, the agent and
//! its configuration, the image's name and version), rendered for nixos/image.nix to
//! build. The spec's `[[tests]]` are not in it: the boot test hands them to the image's
//! self-test at boot, as it does for Debian images.

use std::fmt::Write as _;

use crate::model::spec::Spec;

/// The module, as Nix text. `version` is what os-release's IMAGE_VERSION says.
pub(crate) fn render(spec: &Spec, version: &str) -> String {
    let mut out = String::new();
    let w = &mut out;
    let _ = writeln!(
        w,
        "# Rendered by devos-build from {}: edit the spec, not this file.",
        spec.path.display()
    );
    let _ = writeln!(w, "{{ lib, pkgs, ... }}:\n{{");
    let _ = writeln!(w, "  devos.image.name = {};", string(&spec.name));
    let _ = writeln!(w, "  devos.image.version = {};", string(version));
    // The NixOS release the spec was written for must be the one nixpkgs is.
    let _ = writeln!(
        w,
        "  assertions = [\n    {{\n      assertion = lib.trivial.release == {suite};\n      \
         message = \"{file} is written for NixOS {release}, but nixpkgs is NixOS ${{lib.trivial.release}}: \
         set [base] suite or use the matching nixpkgs\";\n    }}\n  ];",
        suite = string(&spec.suite),
        release = escape(&spec.suite),
        file = escape(&spec.path.display().to_string()),
    );
    let _ = writeln!(w, "  networking.hostName = {};", string(&spec.hostname));
    let _ = writeln!(w, "  time.timeZone = {};", string(&spec.timezone));
    let args: Vec<String> = kernel_params(&spec.kernel_cmdline)
        .iter()
        .map(|a| string(a))
        .collect();
    let _ = writeln!(w, "  boot.kernelParams = {};", list(&args));
    let packages: Vec<String> = spec
        .packages
        .iter()
        .map(|p| {
            let path: Vec<String> = p.split('.').map(string).collect();
            format!("(lib.getAttrFromPath {} pkgs)", list(&path))
        })
        .collect();
    let _ = writeln!(w, "  environment.systemPackages = {};", list(&packages));
    for (n, user) in spec.users.iter().enumerate() {
        let _ = writeln!(w, "  users.users.{} = {{", attr(&user.name));
        let _ = writeln!(w, "    isNormalUser = true;");
        // From 1000 in the order written, as on Debian images (NixOS would number
        // them in its own order).
        let _ = writeln!(w, "    uid = {};", FIRST_UID + n);
        // Debian's administrators are `sudo`; NixOS's are `wheel`.
        let groups: Vec<String> = user
            .groups
            .iter()
            .map(|g| string(if g == "sudo" { "wheel" } else { g }))
            .collect();
        let _ = writeln!(w, "    extraGroups = {};", list(&groups));
        let keys: Vec<String> = user.ssh_authorized_keys.iter().map(|k| string(k)).collect();
        let _ = writeln!(w, "    openssh.authorizedKeys.keys = {};", list(&keys));
        if let Some(hash) = &user.password_hash {
            let _ = writeln!(w, "    hashedPassword = {};", string(hash));
        }
        let _ = writeln!(w, "  }};");
    }
    // The same sudoers line the Debian images carry (`sudo-without-password`).
    let nopasswd: String = spec
        .users
        .iter()
        .filter(|u| u.sudo_without_password)
        .map(|u| {
            format!(
                "{} {}\n",
                u.name,
                devos_agent::selftest::SUDO_WITHOUT_PASSWORD
            )
        })
        .collect();
    if !nopasswd.is_empty() {
        let _ = writeln!(w, "  security.sudo.extraConfig = {};", string(&nopasswd));
    }
    // Keys handed to a user mean logging in over SSH.
    if spec.users.iter().any(|u| !u.ssh_authorized_keys.is_empty()) {
        let _ = writeln!(w, "  services.openssh.enable = true;");
        // The EC2 key pair's key goes to the default user (the first), through the
        // agent's devos-ec2-keys.service, which runs only where this file is (as the
        // Debian images' image/access.rs writes it); nixos/image.nix has sshd read
        // what it hands in.
        if let Some(user) = spec.users.first().filter(|_| spec.agent_enabled) {
            let _ = writeln!(
                w,
                "  environment.etc.\"devos/ec2-keys.env\".text = {};",
                string(&format!(
                    "# DevOS (written by devos-build): who gets the EC2 key pair's SSH key.\nDEVOS_EC2_USER={}\n",
                    user.name
                ))
            );
        }
    }
    let _ = writeln!(w, "  services.devos-agent.enable = {};", spec.agent_enabled);
    if spec.agent_enabled && !spec.agent_settings.is_empty() {
        let _ = writeln!(
            w,
            "  services.devos-agent.settings = {};",
            value(&toml::Value::Table(spec.agent_settings.clone()), 2)
        );
    }
    let _ = writeln!(w, "}}");
    out
}

/// The first user's uid, as on the Debian images.
const FIRST_UID: usize = 1000;

/// The kernel command line's parameters as the kernel splits them: at spaces, except
/// inside double quotes (`opt="a b"` is one), each kept as written, quotes included.
/// (nixpkgs' `boot.kernelParams` takes exactly such words.)
fn kernel_params(cmdline: &str) -> Vec<String> {
    let mut params = Vec::new();
    let mut word = String::new();
    let mut quoted = false;
    for c in cmdline.chars() {
        if c == '"' {
            quoted = !quoted;
        } else if c.is_whitespace() && !quoted {
            if !word.is_empty() {
                params.push(std::mem::take(&mut word));
            }
            continue;
        }
        word.push(c);
    }
    if !word.is_empty() {
        params.push(word);
    }
    params
}

/// A TOML value as a Nix value, nested tables indented from `indent`.
fn value(v: &toml::Value, indent: usize) -> String {
    match v {
        toml::Value::String(s) => string(s),
        toml::Value::Integer(i) => integer(*i),
        toml::Value::Float(f) => float(*f),
        toml::Value::Boolean(b) => b.to_string(),
        toml::Value::Datetime(d) => string(&d.to_string()),
        toml::Value::Array(items) => {
            list(&items.iter().map(|i| value(i, indent)).collect::<Vec<_>>())
        }
        toml::Value::Table(t) => {
            let pad = " ".repeat(indent + 2);
            let mut out = String::from("{\n");
            for (k, v) in t {
                let _ = writeln!(out, "{pad}{} = {};", attr(k), value(v, indent + 2));
            }
            out.push_str(&" ".repeat(indent));
            out.push('}');
            out
        }
    }
}

/// An integer as a Nix expression. A negative one is in parentheses: Nix reads `-1` as
/// negation, which a list element cannot be (`[ -1 ]` does not parse); and the
/// smallest has no literal (9223372036854775808 is too large).
fn integer(i: i64) -> String {
    match i {
        i64::MIN => format!("({} - 1)", i + 1),
        i if i < 0 => format!("({i})"),
        i => i.to_string(),
    }
}

/// A float as a Nix expression: Nix's float literals need a `.` before an exponent
/// (`1e-7` reads as `1` applied to the variable `e-7`), negative ones are in
/// parentheses as for [`integer`], and NaN and the infinities have no literal at all:
/// the build stops, saying so.
fn float(f: f64) -> String {
    if !f.is_finite() {
        return format!(
            "(throw {})",
            string(&format!(
                "[agent.config] holds {f}, which NixOS cannot write into agent.toml"
            ))
        );
    }
    let mut text = format!("{:?}", f.abs());
    if let Some(e) = text.find('e').filter(|_| !text.contains('.')) {
        text.insert_str(e, ".0");
    }
    if f.is_sign_negative() {
        format!("(-{text})")
    } else {
        text
    }
}

fn list(items: &[String]) -> String {
    if items.is_empty() {
        "[ ]".into()
    } else {
        format!("[ {} ]", items.join(" "))
    }
}

/// An attribute name: bare when it is an identifier, quoted otherwise.
fn attr(name: &str) -> String {
    let identifier = !matches!(
        name,
        "if" | "then" | "else" | "let" | "in" | "with" | "rec" | "inherit" | "assert" | "or"
    ) && crate::model::spec::nixos::is_attr_path(name)
        && !name.contains('.');
    if identifier {
        name.to_owned()
    } else {
        string(name)
    }
}

/// A Nix string literal: nothing in it is interpolated or ends it early.
pub(crate) fn string(s: &str) -> String {
    format!("\"{}\"", escape(s))
}

fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '$' if chars.peek() == Some(&'{') => out.push_str("\\$"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_cannot_interpolate_or_break_out() {
        assert_eq!(string("a\"b"), r#""a\"b""#);
        assert_eq!(string("${builtins.exec}"), r#""\${builtins.exec}""#);
        assert_eq!(string("a\\"), r#""a\\""#);
        assert_eq!(string("$HOME"), r#""$HOME""#);
        assert_eq!(attr("log-level"), "log-level");
        assert_eq!(attr("us.anthropic.claude"), r#""us.anthropic.claude""#);
        assert_eq!(attr("in"), r#""in""#);
    }

    /// The rendered module of `spec`, checked by Nix's parser.
    fn rendered(spec: &Spec) -> String {
        let text = render(spec, "0.1.0+0c6d3kqmwwg3");
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("module.nix");
        std::fs::write(&file, &text).unwrap();
        let out = std::process::Command::new("nix-instantiate")
            .arg("--parse")
            .arg(&file)
            .output()
            .expect("nix-instantiate (Debian: nix-bin) checks that the rendered module parses");
        assert!(
            out.status.success(),
            "{}\n{text}",
            String::from_utf8_lossy(&out.stderr)
        );
        text
    }

    /// `expr` (Nix, the module's attributes as `m`) evaluated by Nix on the module
    /// rendered from `spec`, with just enough of `lib` for it (no nixpkgs here): JSON,
    /// or what Nix said when it failed.
    fn evaluated(spec: &Spec, expr: &str) -> Result<serde_json::Value, String> {
        let text = rendered(spec);
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("module.nix");
        std::fs::write(&file, &text).unwrap();
        let lib = "{ getAttrFromPath = p: s: builtins.foldl' (a: n: a.${n}) s p; trivial.release = \"25.11\"; }";
        let out = std::process::Command::new("nix-instantiate")
            .args(["--eval", "--strict", "--json", "-E"])
            .arg(format!(
                "let m = import {} {{ lib = {lib}; pkgs = {{ }}; }}; in {expr}",
                file.display()
            ))
            .output()
            .expect("nix-instantiate (Debian: nix-bin) evaluates the rendered module");
        if out.status.success() {
            Ok(serde_json::from_slice(&out.stdout).unwrap())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    /// A NixOS spec `n` 1.2.3 with the TOML `rest` after its `[image]` and `[base]`.
    fn nixos_spec(rest: &str) -> Spec {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("n.toml");
        let toml = format!(
            "[image]\nname = \"n\"\nversion = \"1.2.3\"\n[base]\ndistro = \"nixos\"\n{rest}"
        );
        std::fs::write(&path, toml).unwrap();
        crate::model::spec::load(&path).unwrap()
    }

    #[test]
    fn the_kernel_command_line_is_split_as_the_kernel_splits_it_into_what_nixpkgs_takes() {
        let spec = nixos_spec(
            r#"
[system]
kernel-cmdline = 'console=ttyS0,115200  dyndbg="file x.c +p" quiet'
"#,
        );
        // nixpkgs' `boot.kernelParams` type (nixos/modules/system/boot/kernel.nix):
        // `listOf (strMatching ''([^"[:space:]]|"[^"]*")+'')`.
        let params = evaluated(
            &spec,
            r#"{ params = m.boot.kernelParams; typed = builtins.all (p: builtins.match ''([^"[:space:]]|"[^"]*")+'' p != null) m.boot.kernelParams; }"#,
        )
        .unwrap();
        assert_eq!(
            params["params"],
            serde_json::json!(["console=ttyS0,115200", "dyndbg=\"file x.c +p\"", "quiet"])
        );
        assert_eq!(params["typed"], true);
        assert_eq!(kernel_params("  "), Vec::<String>::new());
    }

    #[test]
    fn agent_settings_reach_nix_as_the_spec_wrote_them_whatever_the_numbers() {
        let spec = nixos_spec(
            r#"
[agent.config.model]
temperature = 0.2
max-tokens = 4096
[agent.config.model.prices."us.example.tiny-v1:0"]
input = 1e-7
output = 1e20
cache-read = 0.25
cache-write = 3.75
"#,
        );
        let settings = evaluated(&spec, "m.services.devos-agent.settings").unwrap();
        let want = serde_json::to_value(&spec.agent_settings).unwrap();
        assert_eq!(settings, want, "{settings:#} != {want:#}");
        assert_eq!(float(1e-7), "1.0e-7");
        assert_eq!(float(-3.0), "(-3.0)");
        assert_eq!(integer(-1), "(-1)");
        // (No key of agent.toml takes a negative integer or a list of numbers yet; a
        // list element must not be `-1`, which Nix does not parse.)
        assert_eq!(integer(i64::MIN), "(-9223372036854775807 - 1)");
    }

    #[test]
    fn a_float_nix_cannot_hold_stops_the_build_saying_so() {
        // (The agent's own checks refuse NaN where agent.toml takes a float today.)
        let out = std::process::Command::new("nix-instantiate")
            .args(["--eval", "--strict", "-E"])
            .arg(format!("[ {} ]", float(f64::NAN)))
            .output()
            .expect("nix-instantiate (Debian: nix-bin)");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert!(
            err.contains("[agent.config] holds NaN, which NixOS cannot write into agent.toml"),
            "{err}"
        );
    }

    #[test]
    fn the_shipped_nixos_spec_renders_to_a_module_that_parses_and_says_what_the_spec_says() {
        let path =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../images/devos-nixos.toml");
        let spec = crate::model::spec::load(&path).unwrap();
        let text = rendered(&spec);
        for line in [
            r#"devos.image.name = "devos-nixos";"#,
            r#"devos.image.version = "0.1.0+0c6d3kqmwwg3";"#,
            r#"assertion = lib.trivial.release == "25.11";"#,
            r#"is written for NixOS 25.11, but nixpkgs is NixOS ${lib.trivial.release}"#,
            r#"networking.hostName = "devos";"#,
            r#"time.timeZone = "UTC";"#,
            r#"boot.kernelParams = [ "console=ttyS0,115200" "quiet" ];"#,
            r#"(lib.getAttrFromPath [ "ripgrep" ] pkgs)"#,
            r#"users.users.dev = {"#,
            r#"extraGroups = [ "wheel" ];"#,
            r#"services.devos-agent.enable = true;"#,
            r#"log-level = "info";"#,
            r#"admin-groups = [ "wheel" ];"#,
        ] {
            assert!(text.contains(line), "no `{line}` in:\n{text}");
        }
        // No keys handed in: no SSH server switched on; nobody's sudo without a password.
        assert!(!text.contains("openssh.enable"), "{text}");
        assert!(!text.contains("NOPASSWD"), "{text}");
        assert!(!text.contains("ec2-keys"), "{text}");
    }

    #[test]
    fn whatever_a_spec_holds_the_module_parses_and_nothing_in_it_is_evaluated() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("n.toml");
        std::fs::write(
            &path,
            r#####"
[image]
name = "n"
version = "1.2.3"
[base]
distro = "nixos"
[packages]
include = ["python3Packages.requests", "in"]
[system]
kernel-cmdline = 'quiet x="${builtins.abort "no"}" y=\'
[[users]]
name = "ops"
groups = ["sudo", "docker"]
ssh-authorized-keys = ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIG4 ops@${x}"]
password-hash = "$y$j9T$ZS.PTvqAQiVaGuDx6YGKX0$9OOGUIhSZTqoDVr5XVsHZ1Sm2IUaxmZOmxYsgSN8mZ4"
sudo-without-password = true
[agent.config]
log-level = "debug"
[agent.config.model]
region = "eu-west-1"
"#####,
        )
        .unwrap();
        let spec = crate::model::spec::load(&path).unwrap();
        let text = rendered(&spec);
        for want in [
            r#"(lib.getAttrFromPath [ "python3Packages" "requests" ] pkgs)"#,
            r#"(lib.getAttrFromPath [ "in" ] pkgs)"#,
            r#""x=\"\${builtins.abort"#,
            r#""y=\\""#,
            r#"ops@\${x}"#,
            r#"extraGroups = [ "wheel" "docker" ];"#,
            r#"security.sudo.extraConfig = "ops ALL=(ALL:ALL) NOPASSWD: ALL\n";"#,
            "services.openssh.enable = true;",
            r#"hashedPassword = "$y$j9T$ZS.PTvqAQiVaGuDx6YGKX0$9OOGUIhSZTqoDVr5XVsHZ1Sm2IUaxmZOmxYsgSN8mZ4";"#,
            r#"region = "eu-west-1";"#,
        ] {
            assert!(text.contains(want), "no `{want}` in:\n{text}");
        }
        // Numbered from 1000 in the order written, as on Debian; the EC2 key pair's
        // key is the first user's, as on Debian images with sshd and the agent.
        let users = evaluated(
            &spec,
            r#"{ uid = m.users.users.ops.uid; ec2 = m.environment.etc."devos/ec2-keys.env".text; }"#,
        )
        .unwrap();
        assert_eq!(users["uid"], 1000);
        let ec2 = users["ec2"].as_str().unwrap();
        assert!(ec2.lines().any(|l| l == "DEVOS_EC2_USER=ops"), "{ec2}");
    }
}
