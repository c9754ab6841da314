//! An update feed kept in S3: the objects under `s3://BUCKET/PREFIX/`, one per feed
//! file, each with its sha256 in the object's metadata so a file already there is not
//! sent again.

use std::path::Path;

use anyhow::{Context, Result, bail};
use aws_sdk_s3::primitives::ByteStream;

use crate::{Aws, explain};

/// The metadata key (`x-amz-meta-sha256`) that holds an object's sha256.
const SHA256_KEY: &str = "sha256";

/// The key a plain HTTP client reaches when it asks for `file`: S3 reads `+` in a
/// URL's path as a space (a web form's encoding), and systemd-pull asks for
/// `NAME_VERSION+UUID.root` as it is spelled. A file named with `+` is therefore also
/// kept under that key (a copy made by S3, not sent again).
fn http_alias(file: &str) -> Option<String> {
    file.contains('+').then(|| file.replace('+', " "))
}

/// A key as `x-amz-copy-source` takes it: URL-encoded but for `/`.
fn percent_encoded(key: &str) -> String {
    key.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b'/' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// `s3://BUCKET/PREFIX` split, the prefix without slashes at either end.
pub fn parse_url(url: &str) -> Result<(String, String)> {
    let Some(rest) = url.strip_prefix("s3://") else {
        bail!("`{url}` is not an s3:// URL\n  hint: write it as s3://BUCKET/PREFIX");
    };
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    if bucket.is_empty() {
        bail!("`{url}` names no bucket\n  hint: write it as s3://BUCKET/PREFIX");
    }
    Ok((bucket.to_owned(), prefix.trim_matches('/').to_owned()))
}

/// How long caches may keep an object: the index is replaced on every publish, the
/// versioned files never change.
#[derive(Clone, Copy)]
pub enum Caching {
    Index,
    Immutable,
}

/// The feed's objects under one prefix of one bucket.
pub struct Feed {
    client: aws_sdk_s3::Client,
    bucket: String,
    prefix: String,
    region: String,
}

impl Feed {
    /// The feed at `url` (`s3://BUCKET/PREFIX`), after checking that the bucket is
    /// there and may be written.
    pub async fn open(aws: &Aws, region: &str, url: &str) -> Result<Self> {
        let (bucket, prefix) = parse_url(url)?;
        let mut conf = aws_sdk_s3::config::Builder::from(&aws.config)
            .region(aws_config::Region::new(region.to_owned()));
        if aws.config.endpoint_url().is_some() {
            // A test server or another store answers on one host: bucket in the path.
            conf = conf.force_path_style(true);
        }
        let client = aws_sdk_s3::Client::from_conf(conf.build());
        if let Err(e) = client.head_bucket().bucket(&bucket).send().await {
            if e.as_service_error().is_some_and(|s| s.is_not_found()) {
                bail!(
                    "the bucket `{bucket}` of {url} does not exist\n  hint: create it (`aws s3 mb s3://{bucket} --region {region}`) or fix the URL"
                );
            }
            return Err(explain("s3:ListBucket", region, e));
        }
        Ok(Self {
            client,
            bucket,
            prefix,
            region: region.to_owned(),
        })
    }

    fn key(&self, file: &str) -> String {
        if self.prefix.is_empty() {
            file.to_owned()
        } else {
            format!("{}/{file}", self.prefix)
        }
    }

    /// The sha256 recorded with `file`, `Some("")` when it is there without one, None
    /// when the feed does not hold it (or not where plain HTTP finds it).
    pub async fn sha256_of(&self, file: &str) -> Result<Option<String>> {
        let sha = self.recorded_sha256(file).await?;
        match http_alias(file) {
            Some(alias) if sha.is_some() && self.recorded_sha256(&alias).await? != sha => Ok(None),
            _ => Ok(sha),
        }
    }

    async fn recorded_sha256(&self, file: &str) -> Result<Option<String>> {
        match self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(self.key(file))
            .send()
            .await
        {
            Ok(head) => Ok(Some(
                head.metadata()
                    .and_then(|m| m.get(SHA256_KEY))
                    .cloned()
                    .unwrap_or_default(),
            )),
            Err(e) if e.as_service_error().is_some_and(|s| s.is_not_found()) => Ok(None),
            Err(e) => Err(explain("s3:GetObject", &self.region, e)),
        }
    }

    /// The bytes of `file`, None when the feed does not hold it.
    pub async fn read(&self, file: &str) -> Result<Option<Vec<u8>>> {
        match self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(self.key(file))
            .send()
            .await
        {
            Ok(out) => {
                let body = out.body.collect().await.with_context(|| {
                    format!("cannot read s3://{}/{}", self.bucket, self.key(file))
                })?;
                Ok(Some(body.into_bytes().to_vec()))
            }
            Err(e) if e.as_service_error().is_some_and(|s| s.is_no_such_key()) => Ok(None),
            Err(e) => Err(explain("s3:GetObject", &self.region, e)),
        }
    }

    /// Put `src` as `file` with its sha256 (an object appears whole or not at all).
    pub async fn put(&self, file: &str, src: &Path, sha256: &str, caching: Caching) -> Result<()> {
        let body = ByteStream::from_path(src)
            .await
            .with_context(|| format!("cannot read {}", src.display()))?;
        let cache_control = match caching {
            Caching::Index => "no-cache",
            Caching::Immutable => "public, max-age=31536000, immutable",
        };
        self.client
            .put_object()
            .bucket(&self.bucket)
            .key(self.key(file))
            .body(body)
            .content_type("application/octet-stream")
            .cache_control(cache_control)
            .metadata(SHA256_KEY, sha256)
            .send()
            .await
            .map_err(|e| explain("s3:PutObject", &self.region, e))?;
        if let Some(alias) = http_alias(file) {
            // The copy keeps the object's metadata and headers.
            let source = format!("{}/{}", self.bucket, percent_encoded(&self.key(file)));
            self.client
                .copy_object()
                .bucket(&self.bucket)
                .key(self.key(&alias))
                .copy_source(source)
                .send()
                .await
                .map_err(|e| explain("s3:PutObject", &self.region, e))?;
        }
        Ok(())
    }

    /// `s3://BUCKET/PREFIX/`, for messages.
    pub fn url(&self) -> String {
        format!("s3://{}/{}", self.bucket, self.key(""))
    }
}

#[cfg(test)]
mod tests {
    use super::parse_url;

    #[test]
    fn names_with_plus_are_also_kept_where_plain_http_finds_them() {
        assert_eq!(
            super::http_alias("a_1.0_b+c-d.root").as_deref(),
            Some("a_1.0_b c-d.root")
        );
        assert_eq!(super::http_alias("a_1.0.efi"), None);
        assert_eq!(super::percent_encoded("p/a+b c"), "p/a%2Bb%20c");
    }

    #[test]
    fn urls_split_into_bucket_and_prefix() {
        assert_eq!(
            parse_url("s3://b/a/feed/").unwrap(),
            ("b".into(), "a/feed".into())
        );
        assert_eq!(parse_url("s3://b").unwrap(), ("b".into(), String::new()));
        assert!(parse_url("s3:///x").is_err());
        assert!(parse_url("https://b/x").is_err());
    }
}
