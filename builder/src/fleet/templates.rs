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
    /// What the agent's role may invoke on Bedrock (`!Sub` ARNs); none: no Bedrock.
    bedrock: Vec<String>,
    /// The AMI's root volume, which instances get encrypted (not for WorkSpaces).
    root: Option<RootVolume>,
}

/// An AMI's root device and its size, as launch templates must name them to change
/// how the volume is made.
#[derive(Serialize)]
struct RootVolume {
    device: &'static str,
    gib: u64,
}

impl RootVolume {
    /// The root volume of the AMI `ami_id` of `v`, as it was published: the direct
    /// upload's (`/dev/xvda`, the raw image's size) or Packer's (`/dev/sda1`, 8 GiB:
    /// packer/devos-ami.pkr.hcl.hbs).
    fn of(reg: &Registry, v: &VersionInfo, ami_id: &str) -> Result<Self> {
        let kind = reg
            .publications(Some(&v.name), Some(&v.version))?
            .into_iter()
            .find(|p| p.ami_id.as_deref() == Some(ami_id))
            .map(|p| p.kind)
            .with_context(|| {
                format!(
                    "{ami_id} is not an AMI of {}@{} in the registry: its root device is not known\n  hint: `devos-build publish list {}` lists the image's AMIs",
                    v.name, v.version, v.name
                )
            })?;
        if kind != "ami" {
            return Ok(RootVolume {
                device: "/dev/sda1",
                gib: 8,
            });
        }
        let raw = v
            .artifacts
            .iter()
            .find(|a| a.format == crate::model::spec::Format::Raw)
            .with_context(|| format!("{}@{} has no raw image", v.name, v.version))?;
        Ok(RootVolume {
            device: "/dev/xvda",
            gib: raw.size.div_ceil(1 << 30).max(1),
        })
    }
}

/// The largest root volume a stack may ask for, in GiB: gp3's 16 TiB.
pub(super) const MAX_VOLUME_GIB: u64 = 16 << 10;

/// A stack's `VolumeSize` (GiB; empty or unset: the image's size) for the AMI `ami_id`
/// of `v`: a whole number as the templates' `AllowedPattern` takes it (digits, no
/// leading zero), no smaller than the image's disk (EC2 refuses every launch of a
/// smaller volume than its snapshot) and no larger than gp3 takes. `hint` says how to
/// give the stack one from the smallest that fits.
pub(super) fn check_volume_size(
    reg: &Registry,
    v: &VersionInfo,
    ami_id: &str,
    stack: &str,
    value: Option<&String>,
    hint: impl FnOnce(u64) -> String,
) -> Result<()> {
    let Some(value) = value.filter(|s| !s.is_empty()) else {
        return Ok(());
    };
    let root = RootVolume::of(reg, v, ami_id)?;
    let digits =
        value.bytes().all(|b| b.is_ascii_digit()) && (value == "0" || !value.starts_with('0'));
    match value.parse::<u64>() {
        Ok(gib) if digits && (root.gib..=MAX_VOLUME_GIB).contains(&gib) => Ok(()),
        Ok(gib) if digits && gib < root.gib => bail!(
            "VolumeSize={value} for stack {stack}: {}@{}'s AMI {ami_id} holds a {} GiB disk, and EC2 launches no smaller volume from it\n  {}",
            v.name,
            v.version,
            root.gib,
            hint(root.gib)
        ),
        _ => bail!(
            "VolumeSize={value} for stack {stack}: expected a whole number of GiB from {} (the image's disk) to {MAX_VOLUME_GIB} (gp3's largest)\n  {}",
            root.gib,
            hint(root.gib)
        ),
    }
}

/// The Bedrock resources an agent calling `models` needs (`None`: the models are not
/// known, as in manifests of older builds: every model).
fn bedrock_resources(models: Option<&[String]>) -> Result<Vec<String>> {
    const MODEL: &str = "arn:${AWS::Partition}:bedrock:*::foundation-model/";
    const PROFILE: &str = "arn:${AWS::Partition}:bedrock:*:${AWS::AccountId}:inference-profile/";
    let Some(models) = models else {
        // A cross-region inference profile (us.anthropic...) runs the model in any of
        // its regions: the foundation model is allowed in all of them.
        return Ok(vec![format!("{MODEL}*"), format!("{PROFILE}*")]);
    };
    let mut resources = Vec::new();
    for id in models {
        if !devos_agent::config::is_model_id(id) {
            bail!(
                "the agent's model `{id}` (model.small or model.large) is not a Bedrock model id\n  hint: fix [agent.config.model] in the spec and build again"
            );
        }
        let mut add = |r: String| {
            if !resources.contains(&r) {
                resources.push(r);
            }
        };
        if id.starts_with("arn:") {
            // An application inference profile or a provisioned model: its ARN, and
            // the foundation models behind it, which its name does not say.
            add(id.clone());
            add(format!("{MODEL}*"));
            continue;
        }
        // A system inference profile id is a geography before a model id
        // (us.anthropic.claude-…, global.…; a model id's own name has no dot): the
        // account's profile, and the model it names in every region it routes to.
        match id.split_once('.') {
            Some((_, model)) if model.contains('.') => {
                add(format!("{PROFILE}{id}"));
                add(format!("{MODEL}{model}"));
            }
            _ => add(format!("{MODEL}{id}")),
        }
    }
    Ok(resources)
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
            "{}@{} is not published in {region}\n  hint: run `devos-build publish ami {}@{} --region {region}` (or `publish packer`) first",
            v.name,
            v.version,
            v.name,
            v.version
        ),
    }
}

/// The Bedrock models the agent of `v` calls (`None`: not known, a manifest of an
/// older build).
pub(super) fn agent_models(reg: &Registry, v: &VersionInfo) -> Result<Option<Vec<String>>> {
    Ok(match reg.manifest(v)?.agent {
        Some(agent) => agent.models,
        // No agent in the image: nothing calls Bedrock.
        None => Some(Vec::new()),
    })
}

/// Say so when the agent of `v`, calling Bedrock in the instance's own region, names a
/// cross-region inference profile Bedrock does not serve in `region`: the stack would
/// run, but every model call of its agents would be refused.
fn warn_of_profiles_outside(reg: &Registry, v: &VersionInfo, region: &str) -> Result<()> {
    let Some(agent) = reg.manifest(v)?.agent else {
        return Ok(());
    };
    if !agent.model_region.is_empty() {
        return Ok(());
    }
    for id in agent.models.unwrap_or_default() {
        if let Some(why) = devos_agent::config::profile_outside_region(&id, region) {
            eprintln!(
                "warning: {}@{}'s agent calls Bedrock in the instance's region: {why}, so its model calls there would be refused\n  hint: name the model's profile for {region}'s geography in the spec's [agent.config.model] (or set its `region`) and build again",
                v.name, v.version
            );
        }
    }
    Ok(())
}

/// The models the role of a stack going from `also` to `v` allows (`None`: every one).
pub(super) fn role_models(
    reg: &Registry,
    v: &VersionInfo,
    also: Option<&VersionInfo>,
) -> Result<Option<Vec<String>>> {
    let models = agent_models(reg, v)?;
    let Some(also) = also.filter(|a| a.id != v.id) else {
        return Ok(models);
    };
    Ok(match (models, agent_models(reg, also)?) {
        (Some(mut models), Some(theirs)) => {
            for m in theirs {
                if !models.contains(&m) {
                    models.push(m);
                }
            }
            Some(models)
        }
        _ => None,
    })
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
    render_for(reg, template, &v, None, region, &ami_id)
}

/// The template for version `v`. While a stack goes from version `also` to `v`, its
/// agents' role allows the models of both: the instances of `also` call theirs until
/// they are replaced, and the instances of `v` until a failed change is undone.
pub(super) fn render_for(
    reg: &Registry,
    template: Template,
    v: &VersionInfo,
    also: Option<&VersionInfo>,
    region: &str,
    ami_id: &str,
) -> Result<String> {
    let models = role_models(reg, v, also)?;
    warn_of_profiles_outside(reg, v, region)?;
    let root = match template {
        Template::Workspaces => None,
        _ => Some(RootVolume::of(reg, v, ami_id)?),
    };
    render_data(
        template,
        &Data {
            name: &v.name,
            version: &v.version,
            region,
            ami_id,
            bedrock: bedrock_resources(models.as_deref())?,
            root,
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
            bedrock: bedrock_resources(None)?,
            root: (template != Template::Workspaces).then_some(RootVolume {
                device: "/dev/xvda",
                gib: 2,
            }),
        },
    )?;
    Ok(template_parameters(&yaml))
}

fn render_data(template: Template, data: &Data<'_>) -> Result<String> {
    let mut hb = handlebars::Handlebars::new();
    hb.set_strict_mode(true);
    // Every value is an image name, a version, a region, an AMI id or an ARN of
    // checked characters: no YAML escaping is needed, and HTML escaping would be wrong.
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

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::model::manifest::AgentInfo;

    fn rendered(template: Template, models: Option<&[String]>) -> String {
        let data = Data {
            name: "devos-debian",
            version: "0.2.0",
            region: "us-east-1",
            ami_id: "ami-00000000000000000",
            bedrock: bedrock_resources(models).unwrap(),
            root: (template != Template::Workspaces).then_some(RootVolume {
                device: "/dev/xvda",
                gib: 2,
            }),
        };
        render_data(template, &data).unwrap()
    }

    #[test]
    fn the_agent_role_may_invoke_the_images_models_only() {
        let defaults = AgentInfo::models_of(&devos_agent::config::AgentConfig::default());
        assert_eq!(defaults.len(), 2, "{defaults:?}");
        for template in [Template::Instance, Template::Fleet] {
            let yaml = rendered(template, Some(&defaults));
            let haiku = devos_agent::config::HAIKU_4_5;
            let model = haiku.split_once('.').unwrap().1;
            for arn in [
                format!("bedrock:*:${{AWS::AccountId}}:inference-profile/{haiku}\""),
                format!("bedrock:*::foundation-model/{model}\""),
            ] {
                assert!(yaml.contains(&arn), "{arn}\n{yaml}");
            }
            assert!(!yaml.contains("/*\""), "a wildcard is left:\n{yaml}");
            // A profile id is not a model id, nor the other way round.
            assert!(!yaml.contains("foundation-model/us."), "{yaml}");
            assert!(!yaml.contains("inference-profile/anthropic."), "{yaml}");

            // The model route off: no Bedrock at all.
            let yaml = rendered(template, Some(&[]));
            assert!(!yaml.contains("bedrock:"), "{yaml}");
            assert!(yaml.contains("Sid: HealthSignal"), "{yaml}");

            // A manifest from before the models were recorded: every model, as then.
            let yaml = rendered(template, None);
            assert!(yaml.contains("foundation-model/*\""), "{yaml}");
        }
    }

    /// A registry (in `tmp`) holding builds of devos-test whose agents call the models
    /// given (`Some(None)`: an agent whose build did not record them; `None`: no agent).
    pub(in crate::fleet) fn registry_calling(
        tmp: &std::path::Path,
        builds: &[(&str, Option<Option<&[&str]>>)],
    ) -> (Registry, Vec<VersionInfo>) {
        use crate::store::registry::tests::manifest;
        let mut reg = Registry::open(&tmp.join("r.db")).unwrap();
        let built = builds
            .iter()
            .map(|(version, models)| {
                let mut m = manifest(version, &[]);
                m.agent = models.map(|models| AgentInfo {
                    file: "devos-agent".into(),
                    version: "0.1.0".into(),
                    sha256: String::new(),
                    models: models.map(|ms| ms.iter().map(|m| (*m).to_owned()).collect()),
                    model_region: String::new(),
                });
                reg.record_build(
                    std::path::Path::new("/o"),
                    std::path::Path::new("s"),
                    &m,
                    &[],
                )
                .unwrap();
                reg.find(&format!("devos-test@{version}")).unwrap()
            })
            .collect();
        (reg, built)
    }

    #[test]
    fn while_a_stack_changes_version_its_role_allows_both_versions_models() {
        let tmp = tempfile::tempdir().unwrap();
        let (reg, v) = registry_calling(
            tmp.path(),
            &[
                ("1.0.0+a", Some(Some(&["m.a", "m.b"]))),
                ("2.0.0+b", Some(Some(&["m.b", "m.c"]))),
                ("3.0.0+c", Some(None)),
                ("4.0.0+d", None),
            ],
        );
        let models = |to: usize, from: Option<usize>| {
            role_models(&reg, &v[to], from.map(|f| &v[f])).unwrap()
        };
        let some = |ms: &[&str]| Some(ms.iter().map(|m| (*m).to_owned()).collect::<Vec<_>>());
        assert_eq!(models(0, None), some(&["m.a", "m.b"]));
        assert_eq!(models(1, Some(0)), some(&["m.b", "m.c", "m.a"]));
        assert_eq!(models(1, Some(1)), some(&["m.b", "m.c"]));
        // A build that did not record its models: its instances may call any.
        assert_eq!(models(1, Some(2)), None);
        assert_eq!(models(2, Some(1)), None);
        // No agent: nothing of its own to add.
        assert_eq!(models(3, Some(1)), some(&["m.b", "m.c"]));
        assert_eq!(models(3, None), some(&[]));
    }

    #[test]
    fn model_ids_and_arns_become_their_resources() {
        let arn = "arn:aws:bedrock:us-east-1:123456789012:application-inference-profile/x1";
        let models = [
            "anthropic.claude-3-haiku-20240307-v1:0".to_owned(),
            arn.to_owned(),
        ];
        let r = bedrock_resources(Some(&models)).unwrap();
        let model = "arn:${AWS::Partition}:bedrock:*::foundation-model/";
        assert_eq!(
            r,
            [
                format!("{model}anthropic.claude-3-haiku-20240307-v1:0"),
                arn.to_owned(),
                format!("{model}*"),
            ]
        );
        // A manifest edited by hand cannot put template syntax into the policy.
        let err = bedrock_resources(Some(&["x${AWS::Region}".to_owned()])).unwrap_err();
        assert!(err.to_string().contains("x${AWS::Region}"), "{err}");
    }

    #[test]
    fn instances_root_volumes_are_encrypted() {
        for template in [Template::Instance, Template::Fleet] {
            let yaml = rendered(template, None);
            let mapping = "BlockDeviceMappings:\n          - DeviceName: /dev/xvda\n            Ebs:\n              Encrypted: true\n              VolumeSize: !If [HasVolumeSize, !Ref VolumeSize, 2]\n              VolumeType: gp3\n";
            assert!(yaml.contains(mapping), "{yaml}");
        }
    }

    #[test]
    fn workspaces_are_encrypted_unless_told_otherwise() {
        let yaml = rendered(Template::Workspaces, None);
        assert!(yaml.contains("Default: alias/aws/workspaces"), "{yaml}");
        assert!(
            yaml.contains("RootVolumeEncryptionEnabled: !If [Encrypted, true, false]"),
            "{yaml}"
        );
        assert!(template_parameters(&yaml).contains(&"VolumeEncryptionKey".to_owned()));
    }
}
