//! Everything `devos-build` says to AWS, in one crate so that the SDK clients (slow to
//! compile) are rebuilt only when this crate changes.
//!
//! - [`Aws`]: the standard credential and region chain, endpoint overrides (the SDK's
//!   `AWS_ENDPOINT_URL` and `AWS_ENDPOINT_URL_<SERVICE>` variables, plus an explicit
//!   endpoint from the builder's config), retries with backoff, and per-region clients.
//! - [`ebs`]: upload a raw disk image to an EBS snapshot over the EBS direct APIs, and
//!   read one back to compare with the image.
//! - [`ami`]: register, tag, copy, find, deregister AMIs and keep SSM parameters.
//! - [`stack`]: CloudFormation stacks (change sets, events) and the groups, launch
//!   templates and instances they run.
//! - [`s3`]: an update feed's objects under an S3 prefix.
//!
//! Errors from AWS are turned into messages that say what to fix ([`explain`]).

use std::future::Future;

use anyhow::{Context, Result, anyhow, bail};
use aws_config::retry::RetryConfig;
use aws_config::{BehaviorVersion, Region, SdkConfig};
use aws_credential_types::provider::ProvideCredentials;
use aws_smithy_types::error::metadata::ProvideErrorMetadata;

pub mod ami;
pub mod ebs;
pub mod s3;
pub mod stack;

/// The SDK crates, for callers that need a raw client (tests, mostly).
pub use aws_credential_types::Credentials;
pub use {
    aws_sdk_autoscaling as sdk_autoscaling, aws_sdk_cloudformation as sdk_cloudformation,
    aws_sdk_ebs as sdk_ebs, aws_sdk_ec2 as sdk_ec2, aws_sdk_s3 as sdk_s3, aws_sdk_ssm as sdk_ssm,
};

/// Attempts per request when the user has not set `AWS_MAX_ATTEMPTS`: uploads of
/// thousands of blocks must ride out throttling and the odd 5xx.
const DEFAULT_MAX_ATTEMPTS: u32 = 8;

/// How to reach AWS. Everything left `None` comes from the standard chain
/// (environment, `~/.aws/config`, SSO, instance role).
#[derive(Debug, Default, Clone)]
pub struct AwsOptions {
    pub profile: Option<String>,
    pub region: Option<String>,
    /// One endpoint for every service (another partition, a local test server).
    /// `AWS_ENDPOINT_URL` and its per-service variants work without this.
    pub endpoint_url: Option<String>,
}

/// Loaded AWS configuration, with checked credentials.
pub struct Aws {
    config: SdkConfig,
}

impl Aws {
    /// Load the configuration and make sure credentials resolve, so a missing login is
    /// reported once, up front, instead of as a failure of the first request.
    pub async fn load(opts: &AwsOptions) -> Result<Self> {
        check_endpoints(opts)?;
        let mut loader = aws_config::defaults(BehaviorVersion::latest());
        if let Some(p) = &opts.profile {
            loader = loader.profile_name(p);
        }
        if let Some(r) = &opts.region {
            loader = loader.region(Region::new(r.clone()));
        }
        if let Some(e) = &opts.endpoint_url {
            loader = loader.endpoint_url(e);
        }
        if std::env::var_os("AWS_MAX_ATTEMPTS").is_none() {
            loader = loader.retry_config(
                RetryConfig::standard()
                    .with_max_attempts(DEFAULT_MAX_ATTEMPTS)
                    .with_max_backoff(std::time::Duration::from_secs(20)),
            );
        }
        let config = loader.load().await;
        let provider = config
            .credentials_provider()
            .ok_or_else(|| anyhow!("no AWS credentials provider is configured"))?;
        if let Err(e) = provider.provide_credentials().await {
            bail!(
                "no AWS credentials found ({})\n  hint: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE (see `aws configure`), or run `aws sso login`; on EC2, attach an instance role",
                error_chain(&e)
            );
        }
        Ok(Self { config })
    }

    /// The region given to [`Aws::load`] or found in the chain, which must be a
    /// region's name.
    pub fn default_region(&self) -> Result<String> {
        let region = self.config.region().map(|r| r.to_string()).ok_or_else(|| {
            anyhow!(
                "no AWS region is set\n  hint: pass --region, set AWS_REGION, or set `region` in ~/.aws/config"
            )
        })?;
        if !is_region_name(&region) {
            let from = ["AWS_REGION", "AWS_DEFAULT_REGION"]
                .into_iter()
                .find(|v| std::env::var(v).is_ok_and(|r| r == region))
                .unwrap_or("the AWS configuration (a profile's `region`, in ~/.aws/config or AWS_CONFIG_FILE)");
            bail!("{from} names `{region}`, which is not a region name\n  hint: {REGION_HINT}");
        }
        Ok(region)
    }

    pub fn ec2(&self, region: &str) -> aws_sdk_ec2::Client {
        let conf = aws_sdk_ec2::config::Builder::from(&self.config)
            .region(Region::new(region.to_owned()))
            .build();
        aws_sdk_ec2::Client::from_conf(conf)
    }

    pub fn ebs(&self, region: &str) -> aws_sdk_ebs::Client {
        let conf = aws_sdk_ebs::config::Builder::from(&self.config)
            .region(Region::new(region.to_owned()))
            .build();
        aws_sdk_ebs::Client::from_conf(conf)
    }

    pub fn cloudformation(&self, region: &str) -> aws_sdk_cloudformation::Client {
        let conf = aws_sdk_cloudformation::config::Builder::from(&self.config)
            .region(Region::new(region.to_owned()))
            .build();
        aws_sdk_cloudformation::Client::from_conf(conf)
    }

    pub fn autoscaling(&self, region: &str) -> aws_sdk_autoscaling::Client {
        let conf = aws_sdk_autoscaling::config::Builder::from(&self.config)
            .region(Region::new(region.to_owned()))
            .build();
        aws_sdk_autoscaling::Client::from_conf(conf)
    }

    pub fn ssm(&self, region: &str) -> aws_sdk_ssm::Client {
        let conf = aws_sdk_ssm::config::Builder::from(&self.config)
            .region(Region::new(region.to_owned()))
            .build();
        aws_sdk_ssm::Client::from_conf(conf)
    }
}

/// Whether `url` is an `http://` or `https://` URL with a host (and a port, if any,
/// that is one), as written: what an AWS endpoint (`[aws] endpoint-url`,
/// `--endpoint-url`, `AWS_ENDPOINT_URL`) and an update feed must be.
pub fn is_http_url(url: &str) -> bool {
    let written = ["http://", "https://"].iter().any(|scheme| {
        url.strip_prefix(scheme)
            .is_some_and(|rest| !rest.is_empty() && !rest.starts_with('/'))
    }) && !url.contains(|c: char| c.is_whitespace() || c.is_control());
    written && url::Url::parse(url).is_ok_and(|u| u.host_str().is_some_and(|h| !h.is_empty()))
}

/// The endpoint given and the SDK's `AWS_ENDPOINT_URL*` variables, checked before the
/// SDK is: it reports a bad one only when a request fails, with the request's body.
pub fn check_endpoints(opts: &AwsOptions) -> Result<()> {
    if let Some(url) = &opts.endpoint_url
        && !is_http_url(url)
    {
        bail!(
            "the AWS endpoint `{url}` is not an http(s) URL\n  hint: write it as https://host[:port] (--endpoint-url, `[aws] endpoint-url`)"
        );
    }
    for (name, value) in std::env::vars_os() {
        let Some(name) = name.to_str() else { continue };
        if !name.starts_with("AWS_ENDPOINT_URL") || value.is_empty() {
            continue;
        }
        let value = value.to_string_lossy();
        if !is_http_url(&value) {
            bail!(
                "{name}=`{value}` is not an http(s) URL\n  hint: write it as https://host[:port], or unset {name}"
            );
        }
    }
    Ok(())
}

/// Run an async AWS job from synchronous code.
pub fn block_on<T>(fut: impl Future<Output = Result<T>>) -> Result<T> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?
        .block_on(fut)
}

/// The first SIGINT or SIGTERM this process gets (Ctrl-C, a cancelled CI job), by
/// name.
pub async fn interrupted() -> &'static str {
    Signals::listen().next(true).await
}

/// SIGINT and SIGTERM, as they come (never, if they cannot be listened for).
pub struct Signals {
    int: Option<tokio::signal::unix::Signal>,
    term: Option<tokio::signal::unix::Signal>,
}

impl Signals {
    /// Start listening (from now on, neither signal ends the process).
    pub fn listen() -> Self {
        use tokio::signal::unix::{SignalKind, signal};
        Self {
            int: signal(SignalKind::interrupt()).ok(),
            term: signal(SignalKind::terminate()).ok(),
        }
    }

    /// The next SIGINT, or SIGTERM too when `term`, by name.
    pub async fn next(&mut self, term: bool) -> &'static str {
        async fn recv(s: Option<&mut tokio::signal::unix::Signal>) {
            match s {
                Some(s) => {
                    s.recv().await;
                }
                None => std::future::pending().await,
            }
        }
        let term = self.term.as_mut().filter(|_| term);
        tokio::select! {
            _ = recv(self.int.as_mut()) => "SIGINT",
            _ = recv(term) => "SIGTERM",
        }
    }
}

/// Turn an SDK error into a message that names the call, the region and what to do.
/// `permission` is the IAM action the call needs (e.g. `ec2:RegisterImage`).
pub fn explain<E>(
    permission: &str,
    region: &str,
    err: aws_sdk_ec2::error::SdkError<E, aws_sdk_ec2::config::http::HttpResponse>,
) -> anyhow::Error
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    let code = err.code().unwrap_or_default().to_owned();
    let message = err.message().unwrap_or_default().to_owned();
    if code.is_empty() {
        // Not an AWS error: unreachable, timed out, or an answer that is not AWS's
        // (a proxy's error page). The raw answer would only be noise.
        let what = match (&err, err.raw_response()) {
            (aws_sdk_ec2::error::SdkError::ServiceError(_), Some(raw)) => format!(
                "the endpoint answered HTTP {} without an AWS error",
                raw.status().as_u16()
            ),
            _ => error_chain(&err),
        };
        return anyhow!(
            "{permission} in {region} failed: {what}\n  hint: check the network and the endpoint (AWS_ENDPOINT_URL, `[aws] endpoint-url`)"
        );
    }
    let detail = if message.is_empty() {
        code.clone()
    } else {
        format!("{code}: {message}")
    };
    match advice(&code, permission, region) {
        Some(advice) => anyhow!("{permission} in {region} failed: {detail}; {advice}"),
        None => anyhow!("{permission} in {region} failed: {detail}"),
    }
}

/// An error and its causes as `error: cause: cause`, from their messages alone. The
/// SDK's `DisplayErrorContext` appends the error's Debug form (requests with their
/// bodies, headers, nested structs), which tells a user nothing; this leaves it out.
/// A cause whose message is already in the text so far is skipped.
pub fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = String::new();
    let mut next = Some(err);
    while let Some(e) = next {
        let message = e.to_string();
        // The SDK's "failed to apply endpoint `X` to request `Request { body: ...`"
        // ends in the request's Debug form: keep what comes before it.
        let message = match message.find(" to request `Request {") {
            Some(at) => &message[..at],
            None => message.trim(),
        };
        if !message.is_empty() && !text.contains(message) {
            if !text.is_empty() {
                text.push_str(": ");
            }
            text.push_str(message);
        }
        next = e.source();
    }
    text
}

/// What a region name is, for the hint of an error about one.
pub const REGION_HINT: &str = "a region name is lower-case letters, digits and dashes, e.g. `eu-west-1` (`aws ec2 describe-regions` lists them)";

/// Whether `name` can be an AWS region name (`eu-west-1`, `us-gov-west-1`): lower-case
/// letters, digits and dashes, starting with a letter. Whether the region exists is
/// AWS's to say; this only keeps typos (`eu west 1`, an empty name) from reaching it.
pub fn is_region_name(name: &str) -> bool {
    name.len() <= 32
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && !name.ends_with('-')
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
}

/// What to do about an AWS error code, for the codes a user can fix.
fn advice(code: &str, permission: &str, region: &str) -> Option<String> {
    match code {
        "UnauthorizedOperation" | "AccessDenied" | "AccessDeniedException" => Some(format!(
            "access denied\n  hint: the credentials in use need the IAM permission {permission} in {region}"
        )),
        "AuthFailure" | "InvalidClientTokenId" | "UnrecognizedClientException"
        | "SignatureDoesNotMatch" | "ExpiredToken" | "ExpiredTokenException" => Some(
            "AWS rejected the credentials\n  hint: refresh them (`aws sso login`, new access keys) or check AWS_PROFILE".to_owned(),
        ),
        c if c.contains("LimitExceeded") || c.contains("QuotaExceeded") => Some(format!(
            "a quota is exhausted in {region}\n  hint: remove old versions with `devos-build publish deregister NAME@VERSION`, or ask for more in the Service Quotas console"
        )),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use aws_credential_types::provider::error::CredentialsError;
    use aws_sdk_ec2::config::http::HttpResponse;
    use aws_sdk_ec2::error::SdkError;
    use aws_smithy_runtime_api::client::result::ConnectorError;

    use super::{advice, error_chain, explain};

    /// An error whose Debug form is what the SDK's errors print: braces, fields.
    #[derive(Debug)]
    struct Inner {
        what: &'static str,
    }
    impl std::fmt::Display for Inner {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(self.what)
        }
    }
    impl std::error::Error for Inner {}

    #[test]
    fn unreachable_endpoints_are_explained_without_debug_structures() {
        let refused = std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            "Connection refused (os error 111)",
        );
        let err: SdkError<
            aws_sdk_ec2::operation::describe_images::DescribeImagesError,
            HttpResponse,
        > = SdkError::dispatch_failure(ConnectorError::io(Box::new(refused)));
        let message = format!("{:#}", explain("ec2:DescribeImages", "eu-west-1", err));
        assert!(
            message.starts_with("ec2:DescribeImages in eu-west-1 failed: dispatch failure: io error: Connection refused"),
            "{message}"
        );
        assert!(
            message.contains("\n  hint: check the network and the endpoint"),
            "{message}"
        );
        assert!(!message.contains(['{', '}']), "{message}");

        let built: SdkError<
            aws_sdk_ec2::operation::describe_images::DescribeImagesError,
            HttpResponse,
        > = SdkError::construction_failure(Inner {
            what: "invalid URI",
        });
        let message = format!("{:#}", explain("ec2:DescribeImages", "r", built));
        assert!(
            message.contains("failed to construct request: invalid URI"),
            "{message}"
        );
        assert!(!message.contains(['{', '}']), "{message}");
    }

    #[test]
    fn credential_errors_are_a_chain_of_messages() {
        let err = CredentialsError::provider_error(Inner {
            what: "failed to load IMDS session token",
        });
        let message = error_chain(&err);
        assert_eq!(
            message,
            "an error occurred while loading credentials: failed to load IMDS session token"
        );
        // The Debug form is what users used to see.
        assert!(format!("{err:?}").contains('{'));
        assert!(!message.contains(['{', '}']), "{message}");
    }

    #[test]
    fn endpoints_are_http_urls_with_a_host() {
        for good in [
            "http://127.0.0.1:5000",
            "https://ec2.eu-west-1.amazonaws.com",
            "http://localhost:4566/",
            "http://[::1]:8080/feed/",
            "https://cdn.example/%7Edevos/",
        ] {
            assert!(super::is_http_url(good), "{good}");
        }
        for bad in [
            "not-a-url",
            "",
            "http://",
            "https:///path",
            "ftp://host",
            "localhost:4566",
            "http://a host",
            "https://x:99999/",
            "http://[::1/",
            "http://:80/",
        ] {
            assert!(!super::is_http_url(bad), "{bad}");
        }
    }

    #[test]
    fn the_request_the_sdk_puts_in_an_endpoint_error_is_left_out() {
        let err = Inner {
            what: "failed to apply endpoint `not-a-url` to request `Request { body: SdkBody { inner: Once(..) } }`",
        };
        assert_eq!(error_chain(&err), "failed to apply endpoint `not-a-url`");
    }

    #[test]
    fn region_names_are_lower_case_words_with_dashes() {
        for good in ["eu-west-1", "us-gov-west-1", "cn-north-1", "ap-southeast-5"] {
            assert!(super::is_region_name(good), "{good}");
        }
        for bad in [
            "",
            "bad region",
            "EU-WEST-1",
            "-eu-west-1",
            "eu-west-",
            "1eu",
            "eu_west_1",
        ] {
            assert!(!super::is_region_name(bad), "{bad}");
        }
    }

    #[test]
    fn fixable_errors_say_what_to_fix() {
        let denied = advice("UnauthorizedOperation", "ec2:RegisterImage", "eu-west-1").unwrap();
        assert!(
            denied.contains("IAM permission ec2:RegisterImage in eu-west-1"),
            "{denied}"
        );
        for quota in [
            "SnapshotLimitExceeded",
            "ResourceLimitExceeded",
            "ServiceQuotaExceededException",
        ] {
            assert!(
                advice(quota, "x", "r")
                    .unwrap()
                    .contains("quota is exhausted in r")
            );
        }
        assert!(
            advice("InvalidClientTokenId", "x", "r")
                .unwrap()
                .contains("rejected the credentials")
        );
        assert_eq!(advice("InvalidAMIID.NotFound", "x", "r"), None);
    }
}
