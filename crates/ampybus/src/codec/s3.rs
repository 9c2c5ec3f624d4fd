//! `s3://bucket[/prefix][?options]` blob stores (the `blob_store=` bus URL option). The URL's
//! rules are always compiled, so a build without the S3 client still says what is wrong with a
//! URL; the client itself (`object_store`'s AWS support) comes with cargo feature `blob-s3`.
//!
//! Credentials, region and endpoint come from the standard AWS environment variables
//! (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, `AWS_REGION` /
//! `AWS_DEFAULT_REGION`, `AWS_ENDPOINT_URL`, and the rest `object_store` reads); the URL's
//! `endpoint=`, `region=` and `allow_http=` options beat them. Credentials in the URL are
//! refused: a bus URL is printed and logged (redacted, but still).

use crate::error::{Error, Result};
use crate::transport::url::redact;

/// The options an `s3://` URL accepts.
const OPTIONS: [&str; 3] = ["endpoint", "region", "allow_http"];

/// A parsed and validated `s3://` blob store URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct S3Url {
    pub bucket: String,
    /// Without leading or trailing `/`; empty for the bucket's root.
    pub prefix: String,
    /// `http(s)://host[:port]`, without a trailing `/`.
    pub endpoint: Option<String>,
    pub region: Option<String>,
    /// Plain http is allowed: the endpoint is a loopback address, or `allow_http=true` (the
    /// option, or `AWS_ALLOW_HTTP=true` in the environment) says so.
    pub allow_http: bool,
}

impl S3Url {
    /// Parses `url` (`s3://…`) against the AWS variables of the environment `env` (only
    /// `AWS_ENDPOINT_URL`/`AWS_ENDPOINT` and `AWS_ALLOW_HTTP` are read here). Errors are Config
    /// errors naming the URL (redacted), the option and the rule.
    pub fn parse(url: &str, env: &[(String, String)]) -> Result<S3Url> {
        let rest = url.strip_prefix("s3://").unwrap_or(url);
        let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
        // The URL is shown without its query (an option's value, percent-encoded, could hide
        // credentials from `redact`); the rules show the options they are about, redacted.
        let shown = redact(&format!("s3://{path}"));
        let bad = |rule: String| {
            Error::config(format!(
                "blob_store {shown:?}: {rule} (form: s3://bucket[/prefix][?endpoint=URL&region=NAME&allow_http=true])"
            ))
        };
        if !url.starts_with("s3://") {
            return Err(bad("the scheme must be s3://".into()));
        }
        let (bucket, prefix) = path.split_once('/').unwrap_or((path, ""));
        if bucket.contains('@') {
            return Err(bad(
                "credentials in the URL are refused: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY in the environment".into(),
            ));
        }
        if bucket.is_empty() {
            return Err(bad("the bucket is missing".into()));
        }
        check_bucket(bucket).map_err(|r| bad(format!("bucket {bucket:?}: {r}")))?;
        let prefix = prefix.strip_suffix('/').unwrap_or(prefix);
        if !prefix.is_empty() {
            for seg in prefix.split('/') {
                check_segment(seg).map_err(|r| bad(format!("prefix {prefix:?}: {r}")))?;
            }
        }
        let mut options: Vec<(String, String)> = Vec::new();
        for (k, v) in url::form_urlencoded::parse(query.as_bytes()) {
            if !OPTIONS.contains(&k.as_ref()) {
                return Err(bad(format!(
                    "unknown option {k:?} (known: {})",
                    OPTIONS.join(", ")
                )));
            }
            if options.iter().any(|(seen, _)| *seen == k) {
                return Err(bad(format!("option {k:?} is given twice")));
            }
            options.push((k.into_owned(), v.into_owned()));
        }
        let opt = |name: &str| {
            options
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.as_str())
        };
        let var = |name: &str| env.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str());
        let region = match opt("region") {
            Some(r)
                if r.is_empty()
                    || !r
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-') =>
            {
                return Err(bad(format!(
                    "option region={r:?}: must be a region name of lowercase letters, digits and '-' (e.g. us-east-1)"
                )));
            }
            r => r.map(str::to_owned),
        };
        let explicit_http = match opt("allow_http") {
            None => var("AWS_ALLOW_HTTP").is_some_and(|v| v.eq_ignore_ascii_case("true")),
            Some("true") => true,
            Some("false") => false,
            Some(v) => {
                return Err(bad(format!(
                    "option allow_http={v:?}: must be true or false"
                )));
            }
        };
        let (endpoint, from) = match opt("endpoint") {
            Some(e) => (Some(e), "option endpoint"),
            None => match var("AWS_ENDPOINT_URL").or_else(|| var("AWS_ENDPOINT")) {
                Some(e) => (Some(e), "AWS_ENDPOINT_URL"),
                None => (None, ""),
            },
        };
        let mut allow_http = explicit_http;
        let endpoint = match endpoint {
            None => None,
            Some(e) => {
                let shown = redact(e);
                let (norm, plain_loopback) =
                    check_endpoint(e).map_err(|r| bad(format!("{from} {shown:?}: {r}")))?;
                if norm.starts_with("http://") && !plain_loopback && !explicit_http {
                    return Err(bad(format!(
                        "{from} {shown:?}: plain http is allowed only to a loopback address (127.0.0.1, [::1], localhost) or with allow_http=true"
                    )));
                }
                allow_http |= plain_loopback;
                Some(norm)
            }
        };
        Ok(S3Url {
            bucket: bucket.to_owned(),
            prefix: prefix.to_owned(),
            endpoint,
            region,
            allow_http,
        })
    }

    /// The prefix of every `blob_ref` of this store: `s3://bucket/prefix/`.
    #[cfg_attr(not(feature = "blob-s3"), allow(dead_code))]
    pub fn ref_prefix(&self) -> String {
        if self.prefix.is_empty() {
            format!("s3://{}/", self.bucket)
        } else {
            format!("s3://{}/{}/", self.bucket, self.prefix)
        }
    }
}

/// S3's bucket naming rules: 3 to 63 characters, lowercase letters, digits, '.' and '-',
/// starting and ending with a letter or digit.
fn check_bucket(b: &str) -> std::result::Result<(), &'static str> {
    if !(3..=63).contains(&b.len()) {
        return Err("must be 3 to 63 characters long");
    }
    if !b
        .bytes()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'.' || c == b'-')
    {
        return Err("only lowercase letters, digits, '.' and '-' are allowed");
    }
    let edge = |c: u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    if !edge(b.as_bytes()[0]) || !edge(b.as_bytes()[b.len() - 1]) {
        return Err("must start and end with a letter or a digit");
    }
    Ok(())
}

/// One `/`-separated segment of the prefix: S3's safe key characters, not `.` or `..`.
fn check_segment(seg: &str) -> std::result::Result<(), String> {
    if seg.is_empty() {
        return Err("an empty segment ('//' or a leading '/')".into());
    }
    if seg == "." || seg == ".." {
        return Err(format!("segment {seg:?} is not allowed"));
    }
    if let Some(c) = seg
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || "!-_.*'()=".contains(*c)))
    {
        return Err(format!(
            "character {c:?}: only letters, digits and !-_.*'()= are allowed in a segment"
        ));
    }
    Ok(())
}

/// Checks an endpoint: `http(s)://host[:port]` with no credentials, path, query or fragment.
/// Returns it without a trailing `/`, and whether it is plain http to a loopback address.
fn check_endpoint(e: &str) -> std::result::Result<(String, bool), &'static str> {
    let u = url::Url::parse(e).map_err(|_| "not a URL (http(s)://host[:port])")?;
    if !matches!(u.scheme(), "http" | "https") {
        return Err("the scheme must be http or https");
    }
    if !u.username().is_empty() || u.password().is_some() {
        return Err(
            "credentials in the endpoint are refused: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY",
        );
    }
    let loopback = match u.host() {
        None => return Err("the host is missing"),
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
    };
    if u.path() != "/" || u.query().is_some() || u.fragment().is_some() {
        return Err("only http(s)://host[:port] is accepted (no path, query or fragment)");
    }
    let norm = u.as_str().trim_end_matches('/').to_owned();
    Ok((norm, loopback && u.scheme() == "http"))
}

/// The store an `s3://` URL names: `object_store`'s S3 client over `bucket`, objects under
/// `prefix/`, credentials from the AWS variables of `env`.
#[cfg(feature = "blob-s3")]
pub(crate) fn open(url: &str, loc: &S3Url, env: &[(String, String)]) -> Result<super::BlobStore> {
    use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
    use std::sync::Arc;
    let mut b = AmazonS3Builder::new();
    for (k, v) in env {
        if let Ok(key) = k.to_ascii_lowercase().parse::<AmazonS3ConfigKey>() {
            b = b.with_config(key, v);
        }
    }
    b = b.with_bucket_name(&loc.bucket);
    if let Some(e) = &loc.endpoint {
        b = b.with_endpoint(e);
    }
    if let Some(r) = &loc.region {
        b = b.with_region(r);
    }
    if loc.allow_http {
        b = b.with_allow_http(true);
    }
    // A blob that cannot be read is retried by the consumer's own policy; the client's retries
    // only ride out a blip, so a read does not hold a message for minutes.
    b = b.with_retry(object_store::RetryConfig {
        max_retries: 3,
        retry_timeout: std::time::Duration::from_secs(30),
        ..Default::default()
    });
    let s3 = b
        .build()
        .map_err(|e| Error::config(format!("blob_store {:?}: {e}", redact(url))))?;
    let store: Arc<dyn object_store::ObjectStore> = if loc.prefix.is_empty() {
        Arc::new(s3)
    } else {
        Arc::new(object_store::prefix::PrefixStore::new(
            s3,
            loc.prefix.as_str(),
        ))
    };
    Ok(super::BlobStore::new(store, loc.ref_prefix()))
}

/// Without cargo feature `blob-s3`: a Config error saying how to get the S3 client.
#[cfg(not(feature = "blob-s3"))]
pub(crate) fn open(url: &str, _loc: &S3Url, _env: &[(String, String)]) -> Result<super::BlobStore> {
    Err(Error::config(format!(
        "blob_store {:?}: this build has no S3 client (enable cargo feature `blob-s3` of crate `ampybus`; the CLI and the Python SDK have it)",
        redact(url)
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(url: &str) -> Result<S3Url> {
        S3Url::parse(url, &[])
    }

    fn err(url: &str) -> String {
        parse(url).unwrap_err().to_string()
    }

    #[test]
    fn accepted_forms() {
        let u = parse("s3://my-bucket").unwrap();
        assert_eq!((u.bucket.as_str(), u.prefix.as_str()), ("my-bucket", ""));
        assert_eq!(u.ref_prefix(), "s3://my-bucket/");
        assert_eq!(u.endpoint, None);
        assert!(!u.allow_http);
        let u = parse("s3://b.example/a/b=1/").unwrap();
        assert_eq!(u.prefix, "a/b=1");
        assert_eq!(u.ref_prefix(), "s3://b.example/a/b=1/");
        let u = parse("s3://bkt/p?endpoint=http://127.0.0.1:9000/&region=eu-west-1").unwrap();
        assert_eq!(u.endpoint.as_deref(), Some("http://127.0.0.1:9000"));
        assert_eq!(u.region.as_deref(), Some("eu-west-1"));
        assert!(u.allow_http, "plain http to loopback is allowed");
        let u = parse("s3://bkt?endpoint=http%3A%2F%2Flocalhost%3A9000").unwrap();
        assert!(u.allow_http);
        let u = parse("s3://bkt?endpoint=http://minio.internal:9000&allow_http=true").unwrap();
        assert!(u.allow_http);
        let u = parse("s3://bkt?endpoint=https://s3.example.com").unwrap();
        assert!(!u.allow_http);
    }

    #[test]
    fn refused_forms_name_the_option_and_the_rule() {
        let cases = [
            ("s3://", "the bucket is missing"),
            ("s3:///prefix", "the bucket is missing"),
            ("s3://ab", "bucket \"ab\": must be 3 to 63 characters long"),
            ("s3://My_Bucket", "only lowercase letters, digits"),
            ("s3://-bkt", "must start and end with a letter or a digit"),
            ("s3://bkt/a//b", "prefix \"a//b\": an empty segment"),
            ("s3://bkt/a/../b", "segment \"..\" is not allowed"),
            ("s3://bkt/a b", "character ' ': only letters, digits"),
            (
                "s3://bkt?color=red",
                "unknown option \"color\" (known: endpoint, region, allow_http)",
            ),
            (
                "s3://bkt?region=a&region=b",
                "option \"region\" is given twice",
            ),
            (
                "s3://bkt?region=EU",
                "option region=\"EU\": must be a region name",
            ),
            (
                "s3://bkt?allow_http=yes",
                "option allow_http=\"yes\": must be true or false",
            ),
            (
                "s3://bkt?endpoint=ftp://h",
                "option endpoint \"ftp://h\": the scheme must be http or https",
            ),
            (
                "s3://bkt?endpoint=nohost",
                "option endpoint \"nohost\": not a URL",
            ),
            (
                "s3://bkt?endpoint=https://h/x",
                "no path, query or fragment",
            ),
            (
                "s3://bkt?endpoint=http://10.0.0.5:9000",
                "plain http is allowed only to a loopback address",
            ),
            (
                "s3://bkt?allow_http=false&endpoint=http://h:1",
                "plain http is allowed only",
            ),
        ];
        for (url, want) in cases {
            let e = err(url);
            assert!(
                e.starts_with("invalid configuration: blob_store "),
                "{url}: {e}"
            );
            assert!(e.contains(want), "{url}: {e}");
        }
    }

    #[test]
    fn credentials_in_the_url_are_refused_and_never_shown() {
        let e = err("s3://AKIA:wJalrXUtnFEMI@bkt/p");
        assert!(e.contains("credentials in the URL are refused"), "{e}");
        assert!(!e.contains("wJalrXUtnFEMI"), "{e}");
        let e = err("s3://bkt?endpoint=http%3A%2F%2Fu%3Ahunter2%40127.0.0.1%3A9000");
        assert!(e.contains("credentials in the endpoint are refused"), "{e}");
        assert!(!e.contains("hunter2"), "{e}");
    }

    #[test]
    fn the_environment_gives_the_endpoint_and_the_option_beats_it() {
        let env = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let e = S3Url::parse(
            "s3://bkt",
            &env(&[("AWS_ENDPOINT_URL", "http://10.1.1.1:9000")]),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("AWS_ENDPOINT_URL \"http://10.1.1.1:9000\": plain http"),
            "{e}"
        );
        let u = S3Url::parse(
            "s3://bkt",
            &env(&[
                ("AWS_ENDPOINT_URL", "http://10.1.1.1:9000"),
                ("AWS_ALLOW_HTTP", "true"),
            ]),
        )
        .unwrap();
        assert_eq!(u.endpoint.as_deref(), Some("http://10.1.1.1:9000"));
        assert!(u.allow_http);
        let u = S3Url::parse(
            "s3://bkt?endpoint=http://127.0.0.1:1",
            &env(&[("AWS_ENDPOINT_URL", "https://elsewhere")]),
        )
        .unwrap();
        assert_eq!(u.endpoint.as_deref(), Some("http://127.0.0.1:1"));
    }
}
