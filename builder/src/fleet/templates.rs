//! The CloudFormation templates of `cloudformation/` (handlebars → YAML), rendered
//! for one published version.

use anyhow::{Context, Result, bail};
use serde::Serialize;

use crate::model::states::PublicationState;
use crate::store::registry::{Registry, VersionInfo};

pub(super) const COMMON: &str = include_str!("../../../cloudformation/common.hbs");

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Template {
    /// One developer instance.
    Instance,
    /// A launch template + Auto Scaling group with health-gated rolling updates.
    Fleet,
    /// A WorkSpace from a custom bundle.
    Workspaces,
}

impl Template {
    pub(super) fn as_str(self) -> &'static str {
        match self {
            Template::Instance => "instance",
            Template::Fleet => "fleet",
            Template::Workspaces => "workspaces",
        }
    }

    fn source(self) -> (&'static str, &'static str) {
        match self {
            Template::Instance => (
                "cloudformation/instance.yaml.hbs",
                include_str!("../../../cloudformation/instance.yaml.hbs"),
            ),
            Template::Fleet => (
                "cloudformation/fleet.yaml.hbs",
                include_str!("../../../cloudformation/fleet.yaml.hbs"),
            ),
            Template::Workspaces => (
                "cloudformation/workspaces.yaml.hbs",
                include_str!("../../../cloudformation/workspaces.yaml.hbs"),
            ),
        }
    }
}

#[derive(Serialize)]
pub(super) struct Data<'a> {
    name: &'a str,
    version: &'a str,
    region: &'a str,
    ami_id: &'a str,
}

/// The AMI of `v` in `region`; an error saying how to publish it if there is none.
pub(super) fn published_ami(reg: &Registry, v: &VersionInfo, region: &str) -> Result<String> {
    // The direct upload's AMI (the image as built) before a Packer one of the version.
    let mut published: Vec<_> = reg
        .publications(Some(&v.name), Some(&v.version))?
        .into_iter()
        .filter(|p| p.region == region && p.state == PublicationState::Available)
        // A Packer build without a communicator has nothing of DevOS in it.
        .filter(|p| p.kind != "packer-bare")
        .collect();
    published.sort_by_key(|p| p.kind != "ami");
    let published = published.into_iter().find_map(|p| p.ami_id);
    match published {
        Some(id) => Ok(id),
        None => bail!(
            "{}@{} is not published in {region}\n  hint: run `devos-build publish ami {}@{} --region {region}` first",
            v.name,
            v.version,
            v.name,
            v.version
        ),
    }
}

/// The template for `reference` in `region`. The version must have passed its boot
/// test and, except for WorkSpaces (which run from a bundle), be published there.
pub(crate) fn render(
    reg: &Registry,
    template: Template,
    reference: &str,
    region: &str,
) -> Result<String> {
    let v = reg.require_passing(reference)?;
    let ami_id = if template == Template::Workspaces {
        String::new()
    } else {
        published_ami(reg, &v, region)?
    };
    render_for(template, &v, region, &ami_id)
}

pub(super) fn render_for(
    template: Template,
    v: &VersionInfo,
    region: &str,
    ami_id: &str,
) -> Result<String> {
    render_data(
        template,
        &Data {
            name: &v.name,
            version: &v.version,
            region,
            ami_id,
        },
    )
}

/// The parameters `template` declares, whatever version it is rendered for: what
/// `--param` may set, known before the registry or AWS is asked.
pub(super) fn declared_parameters(template: Template) -> Result<Vec<String>> {
    let yaml = render_data(
        template,
        &Data {
            name: "image",
            version: "0.0.0",
            region: "us-east-1",
            ami_id: "ami-00000000000000000",
        },
    )?;
    Ok(template_parameters(&yaml))
}

fn render_data(template: Template, data: &Data<'_>) -> Result<String> {
    let mut hb = handlebars::Handlebars::new();
    hb.set_strict_mode(true);
    // Every value is an image name, a version, a region or an AMI id: no YAML escaping
    // is needed, and HTML escaping would be wrong.
    hb.register_escape_fn(handlebars::no_escape);
    hb.register_partial("common", COMMON)
        .context("cannot load cloudformation/common.hbs")?;
    let (file, text) = template.source();
    hb.render_template(text, data)
        .with_context(|| format!("cannot render {file}"))
}

/// The parameter names a rendered template declares (the keys of its top-level
/// `Parameters:` block).
pub(super) fn template_parameters(yaml: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut inside = false;
    for line in yaml.lines() {
        if !line.starts_with(' ') && !line.is_empty() {
            inside = line.trim_end() == "Parameters:";
            continue;
        }
        if let Some(key) = line.strip_prefix("  ").and_then(|l| l.strip_suffix(':'))
            && inside
            && !key.starts_with(' ')
        {
            names.push(key.to_owned());
        }
    }
    names
}
