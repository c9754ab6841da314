//! Packer: the `packer/` template (handlebars → HCL2) rendered for one version into a
//! self-contained directory (template, agent .deb, agent.toml, provisioning script),
//! checked with `packer validate` on every render; `publish packer` runs `packer build`
//! there and records the AMI from the manifest post-processor.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use serde::Serialize;

use crate::model::states::PublicationState;
use crate::store::registry::{Publication, Registry, VersionInfo};
use crate::support::cmd;
use crate::support::dry_run::DryRun;

const TEMPLATE: &str = include_str!("../../../packer/devos-ami.pkr.hcl.hbs");
const PROVISION: &str = include_str!("../../../packer/provision.sh");
const TEMPLATE_FILE: &str = "devos.pkr.hcl";
const MANIFEST_FILE: &str = "packer-manifest.json";

/// The variables the template declares (`variable "NAME" {`), as `--var` may set them.
pub(crate) fn variables() -> impl Iterator<Item = &'static str> {
    TEMPLATE.lines().filter_map(|l| {
        l.strip_prefix("variable \"")
            .and_then(|rest| rest.split_once('"'))
            .map(|(name, _)| name)
    })
}

pub(crate) struct RenderOptions {
    pub(crate) region: String,
    /// A non-AWS EC2 endpoint to build against.
    pub(crate) endpoint: Option<String>,
    /// Provision over SSH (the real build); false renders the no-communicator variant.
    pub(crate) ssh: bool,
    /// Default: `packer/` in the version's output directory.
    pub(crate) out: Option<PathBuf>,
}

#[derive(Debug, Serialize)]
pub(crate) struct Rendered {
    pub(crate) dir: PathBuf,
    pub(crate) template: PathBuf,
    pub(crate) validated: bool,
}

#[derive(Serialize)]
struct TemplateData<'a> {
    name: &'a str,
    version: &'a str,
    build_id: &'a str,
    region: &'a str,
    endpoint: Option<&'a str>,
    ssh: bool,
    ami_name: String,
    tags: BTreeMap<&'static str, String>,
    agent_deb: &'a str,
    agent_toml: &'a str,
    provision: &'a str,
    manifest: &'a str,
}

/// Escape a value for an HCL quoted string: backslashes, quotes, control characters
/// (HCL's `\n`, `\r`, `\t`, `\uNNNN`), and the `${` / `%{` that would start an
/// interpolation or directive.
fn hcl_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.replace("${", "$${").replace("%{", "%%{")
}

/// Packer reads `{{ }}` in the values of many fields (tags, names, descriptions) as
/// its own Go template, after HCL: a value that holds either delimiter is refused,
/// naming it, rather than handed to that engine.
fn refuse_packer_delimiters<'a>(
    values: impl IntoIterator<Item = (&'a str, &'a str)>,
) -> Result<()> {
    for (what, value) in values {
        if value.contains("{{") || value.contains("}}") {
            bail!(
                "cannot render the Packer template: {what} {value:?} holds `{{{{` or `}}}}`, which Packer would read as its own template\n  hint: rename it without them"
            );
        }
    }
    Ok(())
}

/// The HCL for `v`, with every value escaped for HCL.
fn render_template(v: &VersionInfo, opts: &RenderOptions) -> Result<String> {
    let mut hb = handlebars::Handlebars::new();
    hb.set_strict_mode(true);
    hb.register_escape_fn(hcl_escape);
    let tags = BTreeMap::from([
        ("Name", devos_aws::ami::ami_name(&v.name, &v.version)),
        ("devos:image", v.name.clone()),
        ("devos:version", v.version.clone()),
        ("devos:build-id", v.build_id.clone()),
        (devos_aws::ami::TAG_BUILT_BY, "packer".to_owned()),
        ("devos:spec", v.spec.clone()),
        (
            "devos:boot-test",
            if v.tested == Some(true) {
                "passed"
            } else {
                "skipped-with-force"
            }
            .to_owned(),
        ),
        (
            "devos:provisioned",
            if opts.ssh { "yes" } else { "no-communicator" }.to_owned(),
        ),
    ]);
    let data = TemplateData {
        name: &v.name,
        version: &v.version,
        build_id: &v.build_id,
        region: &opts.region,
        endpoint: opts.endpoint.as_deref(),
        ssh: opts.ssh,
        ami_name: devos_aws::ami::ami_name(&format!("{}-ubuntu", v.name), &v.version),
        tags,
        agent_deb: "devos-agent.deb",
        agent_toml: "agent.toml",
        provision: "provision.sh",
        manifest: MANIFEST_FILE,
    };
    refuse_packer_delimiters(
        [
            ("the image name", data.name),
            ("the version", data.version),
            ("the build id", data.build_id),
            ("the region", data.region),
            (
                "the EC2 endpoint (AWS_ENDPOINT_URL)",
                data.endpoint.unwrap_or(""),
            ),
        ]
        .into_iter()
        .chain(data.tags.iter().map(|(k, v)| (*k, v.as_str()))),
    )?;
    hb.render_template(TEMPLATE, &data)
        .context("cannot render packer/devos-ami.pkr.hcl.hbs")
}

/// Write the build directory for `v` and check it with `packer validate`.
pub(crate) fn render(reg: &Registry, reference: &str, opts: &RenderOptions) -> Result<Rendered> {
    let v = reg.find(reference)?;
    let manifest = reg.manifest(&v)?;
    if manifest.distro == "nixos" {
        bail!(
            "{}@{} is a NixOS build: Nix built its agent into the image, and there is no package Packer could install on an Ubuntu AMI\n  hint: publish this version with `devos-build publish ami`; Packer takes a version built from a Debian or Ubuntu spec",
            v.name,
            v.version
        );
    }
    let agent = manifest.agent.as_ref().with_context(|| {
        format!("{}@{} was built without the agent ([agent] enable = false): there is nothing for Packer to install", v.name, v.version)
    })?;
    let deb = v.dir.join(&agent.file);
    let toml = v.dir.join("agent.toml");
    for f in [&deb, &toml] {
        if !f.is_file() {
            bail!(
                "{} is missing\n  hint: build {}@{} again (`devos-build image build --force`); older builds did not keep agent.toml",
                f.display(),
                v.name,
                v.version
            );
        }
    }
    let rendered = render_template(&v, opts)?;
    let dir = opts.out.clone().unwrap_or_else(|| v.dir.join("packer"));
    let handle = crate::support::paths::create_user_dirs(&dir)?;
    check_render_dir(&handle, &dir)?;
    let open =
        |f: &Path| std::fs::File::open(f).with_context(|| format!("cannot read {}", f.display()));
    // What goes under each of RENDERED's names, in its order.
    let contents: [Box<dyn std::io::Read>; 4] = [
        Box::new(rendered.as_bytes()),
        Box::new(open(&deb)?),
        Box::new(open(&toml)?),
        Box::new(PROVISION.as_bytes()),
    ];
    for (name, mut content) in RENDERED.into_iter().zip(contents) {
        crate::support::paths::replace_in(&handle, &dir.join(name), &mut content, 0o644)?;
    }
    let template = dir.join(TEMPLATE_FILE);
    validate(&dir)?;
    Ok(Rendered {
        dir,
        template,
        validated: true,
    })
}

/// The files a render writes, in the order it writes them: the template first, so that
/// a render stopped half-way leaves a directory the next one knows as its own.
const RENDERED: [&str; 4] = [
    TEMPLATE_FILE,
    "devos-agent.deb",
    "agent.toml",
    "provision.sh",
];

/// A render writes into a new or empty directory, or over an earlier render's files
/// (its template starts with the header the render writes); never over a file of the
/// user's of the same name, nor into anything but a regular file. Other files there
/// (a `.pkrvars.hcl` of the user's) are left as they are. Looked up through the
/// directory's handle, links not followed.
fn check_render_dir(handle: &std::fs::File, dir: &Path) -> Result<()> {
    use rustix::fs::{AtFlags, FileType, Mode, OFlags};
    let mut present = false;
    for name in RENDERED {
        let Ok(stat) = rustix::fs::statat(handle, name, AtFlags::SYMLINK_NOFOLLOW) else {
            continue;
        };
        present = true;
        if FileType::from_raw_mode(stat.st_mode) != FileType::RegularFile {
            bail!(
                "{} is not a regular file; `packer render` writes its files there\n  hint: move it away, or give another --out",
                dir.join(name).display()
            );
        }
    }
    if !present {
        return Ok(());
    }
    let header = rustix::fs::openat(
        handle,
        TEMPLATE_FILE,
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .ok()
    .and_then(|fd| {
        let mut start = [0u8; 64];
        let n = rustix::io::read(&fd, &mut start).ok()?;
        Some(start[..n].to_vec())
    });
    let ours = header.is_some_and(|h| h.starts_with(RENDER_HEADER.as_bytes()));
    if !ours {
        bail!(
            "{} holds files of the names `packer render` writes ({}), but no template it rendered: they are not overwritten\n  hint: give another --out, or move them away",
            dir.display(),
            RENDERED.join(", ")
        );
    }
    Ok(())
}

/// How every rendered template starts (the first words of `packer/`'s template).
const RENDER_HEADER: &str = "# Rendered by `devos-build packer render`";

fn packer(dir: &Path) -> Command {
    let mut c = Command::new("packer");
    c.current_dir(dir).env("CHECKPOINT_DISABLE", "1");
    c
}

fn require_packer() -> Result<()> {
    if crate::support::cmd::which("packer").is_none() {
        bail!(
            "packer is not installed\n  hint: `apt-get install packer` on Debian, or see https://developer.hashicorp.com/packer/install"
        );
    }
    Ok(())
}

/// Lay out the rendered template as `packer fmt` does (aligned `=`: what a user's
/// `packer fmt -check` in CI wants), then `packer validate` it; its complaint is the
/// error.
fn validate(dir: &Path) -> Result<()> {
    require_packer()?;
    for (step, failed) in [("fmt", "could not read"), ("validate", "rejected")] {
        cmd::run(packer(dir).args([step, TEMPLATE_FILE])).with_context(|| {
            format!(
                "`packer {step}` {failed} {}: the template packer/devos-ami.pkr.hcl.hbs is wrong",
                dir.join(TEMPLATE_FILE).display()
            )
        })?;
    }
    Ok(())
}

#[derive(Debug, Serialize)]
pub(crate) struct Built {
    pub(crate) region: String,
    pub(crate) ami_id: String,
    /// The rendered directory Packer built in; `None` when the registry already had
    /// the AMI and nothing was built.
    pub(crate) dir: Option<PathBuf>,
}

/// The AMI Packer already made of `v` in the options' region, if the registry has one.
fn already_built(
    reg: &Registry,
    v: &VersionInfo,
    opts: &RenderOptions,
) -> Result<Option<Publication>> {
    Ok(reg
        .publications(Some(&v.name), Some(&v.version))?
        .into_iter()
        .find(|p| {
            p.kind == packer_kind(opts)
                && p.region == opts.region
                && p.state == PublicationState::Available
        }))
}

/// The registry's kind of a Packer AMI: `packer-bare` for the variant without a
/// communicator (nothing provisioned: a plain base image, which no fleet may run).
fn packer_kind(opts: &RenderOptions) -> &'static str {
    if opts.ssh { "packer" } else { "packer-bare" }
}

/// What `publish packer --dry-run` says: the build it would run (the same gate as a
/// real run; nothing rendered, nothing started).
pub(crate) fn dry_run(
    reg: &Registry,
    reference: &str,
    force: bool,
    opts: &RenderOptions,
) -> Result<DryRun> {
    let v = crate::publish::gate(reg, reference, force, crate::publish::AMI_FORCED)?;
    let mut dry = DryRun::new();
    if already_built(reg, &v, opts)?.is_none() {
        dry.would(format!(
            "render the Packer template of {}@{} and run `packer build` in {} (an instance from the latest Ubuntu base AMI with this version's agent package), then record the AMI it makes",
            v.name, v.version, opts.region
        ));
    }
    Ok(dry)
}

/// Render, then `packer build` (output streamed), then read the AMI from the manifest
/// and record it in the registry.
pub(crate) fn build(
    reg: &mut Registry,
    reference: &str,
    force: bool,
    opts: &RenderOptions,
    vars: &[String],
) -> Result<Built> {
    let v = crate::publish::gate(reg, reference, force, crate::publish::AMI_FORCED)?;
    if let Some(p) = already_built(reg, &v, opts)? {
        eprintln!(
            "    {}@{} was already built with Packer in {}: {}",
            v.name,
            v.version,
            opts.region,
            p.ami_id.as_deref().unwrap_or("-")
        );
        return Ok(Built {
            region: p.region,
            ami_id: p.ami_id.unwrap_or_default(),
            dir: None,
        });
    }
    let rendered = render(reg, &format!("{}@{}", v.name, v.version), opts)?;
    let manifest = rendered.dir.join(MANIFEST_FILE);
    // Packer appends to an existing manifest: a stale build in it could be taken for
    // this one's AMI.
    crate::support::remove::file_if_present(&manifest)?;
    let mut c = packer(&rendered.dir);
    c.args(["build", "-color=false", "-timestamp-ui"]);
    for var in vars {
        c.arg("-var").arg(var);
    }
    c.arg(TEMPLATE_FILE);
    eprintln!(
        "    $ packer build {} (in {})",
        TEMPLATE_FILE,
        rendered.dir.display()
    );
    // Packer's log goes to stderr with ours; stdout stays the result.
    let status = c
        .stdout(std::io::stderr())
        .status()
        .context("cannot run packer")?;
    if !status.success() {
        bail!(
            "`packer build` failed ({status}); its output is above\n  hint: Packer removes what it created on failure; re-run after fixing the cause"
        );
    }
    let (region, ami_id) = read_manifest(&manifest)?;
    reg.record_publication(
        &v,
        &Publication::available(&v, &region, packer_kind(opts), &ami_id, Vec::new(), None),
    )?;
    Ok(Built {
        region,
        ami_id,
        dir: Some(rendered.dir),
    })
}

/// The region and AMI of the last build in a Packer manifest (`"artifact_id":
/// "us-east-1:ami-0123"`).
fn read_manifest(path: &Path) -> Result<(String, String)> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("packer wrote no manifest {}", path.display()))?;
    let value: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))?;
    let artifact = value["builds"]
        .as_array()
        .and_then(|b| b.last())
        .and_then(|b| b["artifact_id"].as_str())
        .with_context(|| format!("{} names no artifact", path.display()))?;
    let (region, ami) = artifact
        .split(',')
        .next()
        .and_then(|a| a.split_once(':'))
        .with_context(|| format!("unexpected artifact id {artifact:?} in {}", path.display()))?;
    Ok((region.to_owned(), ami.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Files of the names a render writes are overwritten only when they are an earlier
    /// render's: a user's own, or anything but a regular file, is refused untouched.
    #[test]
    fn a_render_overwrites_only_an_earlier_renders_files() {
        assert!(TEMPLATE.starts_with(RENDER_HEADER));
        let tmp = tempfile::tempdir().unwrap();
        let check = |dir: &Path| {
            let handle = std::fs::File::open(dir).unwrap();
            check_render_dir(&handle, dir).map_err(|e| e.to_string())
        };
        // New, or holding only files of other names.
        std::fs::write(tmp.path().join("prod.pkrvars.hcl"), "x = 1\n").unwrap();
        assert_eq!(check(tmp.path()), Ok(()));
        // A user's own file of a rendered name, with or without a template of theirs.
        std::fs::write(tmp.path().join("provision.sh"), "#!/bin/sh\nmine\n").unwrap();
        let refused = check(tmp.path()).unwrap_err();
        assert!(refused.contains("no template it rendered"), "{refused}");
        std::fs::write(
            tmp.path().join(TEMPLATE_FILE),
            "source \"amazon-ebs\" \"x\" {}\n",
        )
        .unwrap();
        assert!(check(tmp.path()).is_err());
        // An earlier render's.
        std::fs::write(tmp.path().join(TEMPLATE_FILE), TEMPLATE).unwrap();
        assert_eq!(check(tmp.path()), Ok(()));
        // A link or a FIFO where a rendered file goes, even beside a rendered template.
        std::os::unix::fs::symlink("/etc/passwd", tmp.path().join("agent.toml")).unwrap();
        let refused = check(tmp.path()).unwrap_err();
        assert!(
            refused.contains("agent.toml is not a regular file"),
            "{refused}"
        );
        std::fs::remove_file(tmp.path().join(TEMPLATE_FILE)).unwrap();
        std::os::unix::fs::symlink(tmp.path().join("x"), tmp.path().join(TEMPLATE_FILE)).unwrap();
        std::fs::remove_file(tmp.path().join("agent.toml")).unwrap();
        assert!(
            check(tmp.path())
                .unwrap_err()
                .contains("is not a regular file")
        );
    }

    #[test]
    fn values_are_escaped_for_hcl() {
        assert_eq!(hcl_escape(r#"a"b\c ${x} %{y}"#), r#"a\"b\\c $${x} %%{y}"#);
        assert_eq!(
            hcl_escape("a\tb\rc\nd\u{1b}[2J\u{7f}\u{85}"),
            r"a\tb\rc\nd\u001B[2J\u007F\u0085"
        );
        assert!(refuse_packer_delimiters([("x", "images/a.toml")]).is_ok());
        for bad in ["images/{{env `HOME`}}.toml", "a}}b"] {
            let e = refuse_packer_delimiters([("the tag devos:spec", bad)]).unwrap_err();
            assert!(e.to_string().contains("devos:spec"), "{e}");
        }
    }

    #[test]
    fn manifest_artifact_is_split_into_region_and_ami() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.json");
        std::fs::write(
            &p,
            r#"{"builds":[{"artifact_id":"eu-west-1:ami-1"},{"artifact_id":"us-east-1:ami-2"}]}"#,
        )
        .unwrap();
        assert_eq!(
            read_manifest(&p).unwrap(),
            ("us-east-1".into(), "ami-2".into())
        );
    }
}
