//! The builder's own settings (not the image's): how to reach AWS and where to
//! publish. A TOML file, `$DEVOS_CONFIG`, else `$XDG_CONFIG_HOME/devos/config.toml`,
//! else `~/.config/devos/config.toml`; a missing default file means all defaults.
//! Command-line flags override it. Documented in docs/publish.md.

use std::path::{Path, PathBuf};

use anyhow::Result;
use serde::Deserialize;
use serde_spanned::Spanned;

use crate::model::spec::Source;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Settings {
    #[serde(default)]
    pub(crate) aws: AwsSettings,
    #[serde(default)]
    pub(crate) publish: PublishSettings,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub(crate) struct AwsSettings {
    /// A profile of ~/.aws/config (default: AWS_PROFILE, else `default`).
    pub(crate) profile: Option<String>,
    /// The region to publish to when `--region` is not given (default: the chain's).
    pub(crate) region: Option<Spanned<String>>,
    /// One endpoint for every AWS service: another partition, a local test server.
    /// AWS_ENDPOINT_URL and AWS_ENDPOINT_URL_<SERVICE> work without this.
    pub(crate) endpoint_url: Option<Spanned<String>>,
}

impl AwsSettings {
    /// `region`, as written.
    pub(crate) fn region(&self) -> Option<String> {
        self.region.as_ref().map(|r| r.get_ref().clone())
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub(crate) struct PublishSettings {
    /// SSM parameters are written under this path: PREFIX/NAME/VERSION/image_id and
    /// PREFIX/NAME/latest.
    #[serde(default = "default_prefix")]
    pub(crate) ssm_prefix: Spanned<String>,
    /// Regions every `publish ami` copies to, besides those given with --copy-to.
    #[serde(default)]
    pub(crate) copy_to: Vec<String>,
    /// Parallel block uploads.
    #[serde(default = "default_workers")]
    pub(crate) workers: usize,
}

impl Default for PublishSettings {
    fn default() -> Self {
        Self {
            ssm_prefix: default_prefix(),
            copy_to: Vec::new(),
            workers: default_workers(),
        }
    }
}

fn default_prefix() -> Spanned<String> {
    Spanned::new(0..0, "/devos/images".to_owned())
}

fn default_workers() -> usize {
    16
}

/// The settings file to read, and whether it must exist.
fn path(explicit: Option<&Path>) -> (PathBuf, bool) {
    if let Some(p) = explicit {
        return (p.to_path_buf(), true);
    }
    // `DEVOS_CONFIG=` (empty) means the default, as `DEVOS_REGISTRY=` does.
    if let Some(p) = std::env::var_os("DEVOS_CONFIG").filter(|p| !p.is_empty()) {
        return (PathBuf::from(p), true);
    }
    (default_path(), false)
}

/// The settings file when neither --config nor DEVOS_CONFIG names one.
fn default_path() -> PathBuf {
    crate::support::paths::xdg_dir("XDG_CONFIG_HOME", ".config", "/etc").join("devos/config.toml")
}

pub(crate) fn load(explicit: Option<&Path>) -> Result<Settings> {
    let (file, required) = path(explicit);
    let text = match crate::model::spec::read_text(&file) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => {
            return Ok(Settings::default());
        }
        Err(e) => {
            let hint = if required {
                format!(
                    "fix the path given with --config or DEVOS_CONFIG, or leave both unset (or empty) for the default, {}",
                    default_path().display()
                )
            } else {
                "fix or remove it (it is optional), or name another with --config or DEVOS_CONFIG"
                    .to_owned()
            };
            return Err(anyhow::anyhow!(
                "cannot read the settings file {}: {e}\n  hint: {hint}",
                file.display()
            ));
        }
    };
    let src = Source {
        file: &file,
        text: &text,
    };
    let settings: Settings = src.parse_documented("docs/publish.md (\"The settings file\")")?;
    let prefix = &settings.publish.ssm_prefix;
    let valid = prefix.get_ref().starts_with('/')
        && prefix
            .get_ref()
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_.-/".contains(c));
    if !valid {
        return Err(src
            .error(
                prefix,
                format!(
                    "ssm-prefix `{}` is not a valid SSM parameter path",
                    prefix.get_ref()
                ),
                "start it with / and use only letters, digits and _ . - /",
            )
            .into());
    }
    if let Some(region) = &settings.aws.region
        && !devos_aws::is_region_name(region.get_ref())
    {
        return Err(src
            .error(
                region,
                format!("region `{}` is not a region name", region.get_ref()),
                devos_aws::REGION_HINT,
            )
            .into());
    }
    if let Some(url) = &settings.aws.endpoint_url
        && !devos_aws::is_http_url(url.get_ref())
    {
        return Err(src
            .error(
                url,
                format!("endpoint-url `{}` is not an http(s) URL", url.get_ref()),
                "write it as https://host[:port]",
            )
            .into());
    }
    Ok(settings)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_text(text: &str) -> Result<Settings> {
        let dir = tempfile::tempdir()?;
        let file = dir.path().join("config.toml");
        std::fs::write(&file, text)?;
        load(Some(&file))
    }

    #[test]
    fn defaults_and_overrides() {
        let s = load_text("").unwrap();
        assert_eq!(s.publish.ssm_prefix.get_ref(), "/devos/images");
        assert_eq!(s.publish.workers, 16);
        let s = load_text("[aws]\nendpoint-url = \"http://127.0.0.1:5000\"\n[publish]\nssm-prefix = \"/acme/amis\"\ncopy-to = [\"eu-west-1\"]\n").unwrap();
        assert_eq!(
            s.aws.endpoint_url.unwrap().get_ref(),
            "http://127.0.0.1:5000"
        );
        assert_eq!(s.publish.copy_to, ["eu-west-1"]);
        let e = load_text("[aws]\nregion = \"US East 1\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(":2:10: region `US East 1` is not a region name"),
            "{e}"
        );
    }

    #[test]
    fn errors_name_file_line_and_key() {
        let e = load_text("[aws]\nendpoint = \"x\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("config.toml:2:1: unknown field `endpoint`"),
            "{e}"
        );
        // The settings file's keys are documented in docs/publish.md, not the spec's.
        assert!(
            e.contains("hint: remove the key or fix its spelling; the valid keys are named in the message and in docs/publish.md (\"The settings file\")"),
            "{e}"
        );
        let e = load_text("[publish]\nworkers = -1\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("expected a whole number (0 or more)"), "{e}");
        assert!(!e.contains("usize") && !e.contains("u64"), "{e}");
        let e = load_text("[publish]\nssm-prefix = \"devos images\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("config.toml:2:14: ssm-prefix"), "{e}");
        assert!(e.contains("hint: start it with /"), "{e}");
        let e = load(Some(Path::new("/nonexistent/devos.toml")))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("cannot read the settings file /nonexistent/devos.toml"),
            "{e}"
        );
    }

    #[test]
    fn an_endpoint_that_is_not_a_web_url_is_named_where_it_is() {
        let e = load_text("[aws]\nendpoint-url = \"localhost:4566\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("config.toml:2:16: endpoint-url"), "{e}");
        assert!(e.contains("hint: write it as https://host[:port]"), "{e}");
    }
}
