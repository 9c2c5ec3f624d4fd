//! URLs as the bindings read them: pieces of parsing they share, and [`redact`] for logs
//! and errors.

#[cfg(any(feature = "nats", feature = "redis", feature = "kafka"))]
use crate::error::{Error, Result};

/// Decodes `%XX` escapes (bytes that are not UTF-8 become U+FFFD). Never panics: a `%` not
/// followed by two hex digits is kept as it is.
pub(crate) fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let hex = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2]))
        {
            out.push(h * 16 + l);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parses the value of a retention option (`retention_days`, `max_age_days`, `…max_mb`): a
/// whole number of `unit` from 1 to `max`, multiplied by `scale`, or `unlimited` (`Ok(None)`:
/// keep forever).
/// A 0 is refused, because many systems read it as "unlimited" while a limit of 0 would delete
/// every stored message. The error is the rule, to follow "option `name`: ".
pub(crate) fn retention_value(
    option: &str,
    unit: &str,
    v: &str,
    scale: u64,
    max: u64,
) -> std::result::Result<Option<u64>, String> {
    if v == "unlimited" {
        return Ok(None);
    }
    match v.parse::<u64>() {
        Ok(0) => Err(format!(
            "0 is refused: a retention of 0 would delete every stored message; to keep messages forever write `{option}=unlimited`, otherwise give a number of {unit} ≥ 1"
        )),
        Ok(n) if n <= max => n.checked_mul(scale).map(Some).ok_or_else(|| {
            format!("{n} {unit} is too large; write `{option}=unlimited` to keep messages forever")
        }),
        Ok(n) => Err(format!(
            "{n} {unit} is more than {max}; write `{option}=unlimited` to keep messages forever"
        )),
        Err(_) => Err(format!(
            "must be a whole number of {unit} ≥ 1, or `unlimited` to keep messages forever (got {v:?})"
        )),
    }
}

/// The largest retention in days an option takes (about 1,000 years); above it, `unlimited`.
pub(crate) const MAX_RETENTION_DAYS: u64 = 365_000;

/// The rule for a broker URL without a host, to follow "url …: ".
#[cfg_attr(
    not(any(feature = "nats", feature = "redis", feature = "kafka")),
    allow(dead_code)
)]
pub(crate) fn missing_host(scheme: &str, example: &str) -> String {
    format!(
        "no host: a `{scheme}://` URL must name its server explicitly, e.g. {example} (no default host is assumed)"
    )
}

/// A broker URL cut into its parts, nothing decoded:
/// `scheme://[userinfo@]hosts[/path][?query]` (see [`UrlReader::split`]).
#[cfg(any(feature = "nats", feature = "redis", feature = "kafka"))]
pub(crate) struct UrlParts<'a> {
    /// One of the schemes the binding takes.
    pub(crate) scheme: &'a str,
    /// What stands before the last `@` of the authority, if there is one.
    pub(crate) userinfo: Option<&'a str>,
    /// The authority after the userinfo: `host[:port]`, or a list of them.
    pub(crate) hosts: &'a str,
    /// What follows the first `/` after the authority, trailing `/` removed (empty: no path).
    pub(crate) path: &'a str,
    /// What follows the first `?` (empty: none).
    pub(crate) query: &'a str,
}

/// A port written after a host that is not a number 1..=65535 (see [`host_port`]).
#[cfg(any(feature = "nats", feature = "redis", feature = "kafka"))]
pub(crate) struct BadPort<'a> {
    /// The port as written.
    pub(crate) written: &'a str,
    /// It is a number, but 0.
    pub(crate) zero: bool,
}

/// Splits `host[:port]` (also `[v6addr]:port`) into the host as written and the port, `default`
/// when none is written.
#[cfg(any(feature = "nats", feature = "redis", feature = "kafka"))]
pub(crate) fn host_port(hp: &str, default: u16) -> std::result::Result<(&str, u16), BadPort<'_>> {
    match hp.rsplit_once(':') {
        Some((host, port)) if !host.ends_with(']') || hp.starts_with('[') => match port.parse() {
            Ok(0) => Err(BadPort {
                written: port,
                zero: true,
            }),
            Ok(p) => Ok((host, p)),
            Err(_) => Err(BadPort {
                written: port,
                zero: false,
            }),
        },
        _ => Ok((hp, default)),
    }
}

/// The `key=value` pairs of a URL query, empty ones skipped: the key as written, the value
/// percent-decoded (a pair without `=` has an empty value).
#[cfg(any(feature = "nats", feature = "redis", feature = "kafka"))]
pub(crate) fn query_pairs(query: &str) -> impl Iterator<Item = (&str, String)> {
    query.split('&').filter(|p| !p.is_empty()).map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k, percent_decode(v))
    })
}

/// Reads a broker URL for a binding's `from_url`: every error it makes names the URL with its
/// credentials redacted, then the rule (`url "…": rule`).
#[cfg(any(feature = "nats", feature = "redis", feature = "kafka"))]
pub(crate) struct UrlReader {
    shown: String,
}

#[cfg(any(feature = "nats", feature = "redis", feature = "kafka"))]
impl UrlReader {
    /// A reader of `url` (as given, before trimming).
    pub(crate) fn new(url: &str) -> UrlReader {
        UrlReader { shown: redact(url) }
    }

    /// The error for a rule the URL breaks.
    pub(crate) fn bad(&self, what: impl std::fmt::Display) -> Error {
        Error::config(format!("url {:?}: {what}", self.shown))
    }

    /// Cuts `url` (trimmed) into its parts; its scheme must be one of `schemes`, those of the
    /// binding `binding` (as named in the error).
    pub(crate) fn split<'a>(
        &self,
        url: &'a str,
        binding: &str,
        schemes: &[&str],
    ) -> Result<UrlParts<'a>> {
        let usage = schemes
            .iter()
            .map(|s| format!("{s}://"))
            .collect::<Vec<_>>()
            .join(" or ");
        let (scheme, rest) = url
            .trim()
            .split_once("://")
            .ok_or_else(|| self.bad(format!("no `scheme://` (use {usage})")))?;
        if !schemes.contains(&scheme) {
            return Err(self.bad(format!(
                "scheme `{scheme}` is not a {binding} scheme (use {usage})"
            )));
        }
        let (rest, query) = rest.split_once('?').unwrap_or((rest, ""));
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], rest[i + 1..].trim_end_matches('/')),
            None => (rest, ""),
        };
        let (userinfo, hosts) = match authority.rfind('@') {
            Some(i) => (Some(&authority[..i]), &authority[i + 1..]),
            None => (None, authority),
        };
        Ok(UrlParts {
            scheme,
            userinfo,
            hosts,
            path,
            query,
        })
    }

    /// Option `k`'s value `v` as a non-negative integer.
    pub(crate) fn num(&self, k: &str, v: &str) -> Result<u64> {
        v.parse::<u64>().map_err(|_| {
            self.bad(format!(
                "option `{k}`: must be a non-negative integer (got {v:?})"
            ))
        })
    }

    /// Option `k`'s value `v` as an integer in `range`.
    pub(crate) fn num_in(
        &self,
        k: &str,
        v: &str,
        range: std::ops::RangeInclusive<u64>,
    ) -> Result<u64> {
        let n = self.num(k, v)?;
        if !range.contains(&n) {
            return Err(self.bad(format!(
                "option `{k}`: must be {}..={} (got {n})",
                range.start(),
                range.end()
            )));
        }
        Ok(n)
    }

    /// Option `k`'s value `v` as an integer of at least 1.
    pub(crate) fn positive(&self, k: &str, v: &str) -> Result<u64> {
        match self.num(k, v)? {
            0 => Err(self.bad(format!("option `{k}`: must be at least 1"))),
            n => Ok(n),
        }
    }

    /// Option `k`'s value `v` as milliseconds (`…_timeout_ms`), 0 read as 1.
    pub(crate) fn millis(&self, k: &str, v: &str) -> Result<std::time::Duration> {
        Ok(std::time::Duration::from_millis(self.num(k, v)?.max(1)))
    }

    /// Option `k`'s value `v` as true (`true`, `1`, `yes` or nothing) or false (`false`, `0`,
    /// `no`).
    pub(crate) fn flag(&self, k: &str, v: &str) -> Result<bool> {
        match v {
            "true" | "1" | "yes" | "" => Ok(true),
            "false" | "0" | "no" => Ok(false),
            _ => Err(self.bad(format!("option `{k}`: must be true or false"))),
        }
    }

    /// Option `k`'s value `v`, which may not be empty.
    pub(crate) fn nonempty(&self, k: &str, v: &str) -> Result<String> {
        if v.is_empty() {
            Err(self.bad(format!("option `{k}`: empty value")))
        } else {
            Ok(v.to_owned())
        }
    }

    /// Option `k` (`max_age_days`) as a retention (see [`retention_value`]); zero: unlimited.
    pub(crate) fn max_age_days(&self, k: &str, v: &str) -> Result<std::time::Duration> {
        let secs = retention_value(k, "days", v, 86_400, MAX_RETENTION_DAYS)
            .map_err(|rule| self.bad(format!("option `{k}`: {rule}")))?;
        Ok(std::time::Duration::from_secs(secs.unwrap_or(0)))
    }

    /// A value parsed with its type's `FromStr`, whose error message is the rule.
    pub(crate) fn parsed<T: std::str::FromStr<Err = Error>>(&self, v: &str) -> Result<T> {
        v.parse().map_err(|e: Error| self.bad(e.message()))
    }

    /// Options `tls_cert` and `tls_key` are given both or neither.
    pub(crate) fn tls_pair<T>(&self, cert: &Option<T>, key: &Option<T>) -> Result<()> {
        if cert.is_some() != key.is_some() {
            return Err(
                self.bad("options `tls_cert` and `tls_key` go together (mutual TLS needs both)")
            );
        }
        Ok(())
    }
}

/// Removes credentials (`user:password@`) and secret-looking query options from a URL for
/// logs and errors (also `ampybus::bus::redact`).
///
/// ```
/// assert_eq!(ampybus::transport::url::redact("nats://bob:s3cret@host:4222"), "nats://***@host:4222");
/// assert_eq!(ampybus::transport::url::redact("redis://h/?password=x&db=1"), "redis://h/?password=***&db=1");
/// ```
pub fn redact(url: &str) -> String {
    let mut out = url.to_owned();
    if let Some((scheme, rest)) = url.split_once("://") {
        let (auth, tail) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        if let Some(at) = auth.rfind('@') {
            out = format!("{scheme}://***@{}{tail}", &auth[at + 1..]);
        }
    }
    if let Some((base, q)) = out.clone().split_once('?') {
        let q: Vec<String> = q
            .split('&')
            .map(|kv| match kv.split_once('=') {
                Some((k, _))
                    if [
                        "password",
                        "pass",
                        "token",
                        "secret",
                        "nkey",
                        "sasl_password",
                        "key",
                        "archive",
                    ]
                    .iter()
                    .any(|s| k.to_ascii_lowercase().contains(s)) =>
                {
                    format!("{k}=***")
                }
                _ => kv.to_owned(),
            })
            .collect();
        out = format!("{base}?{}", q.join("&"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::{percent_decode, retention_value};

    #[test]
    fn retention_values() {
        let r = |v: &str| retention_value("d", "days", v, 10, 1000);
        assert_eq!(r("unlimited"), Ok(None));
        assert_eq!(r("3"), Ok(Some(30)));
        assert!(r("0").unwrap_err().contains("`d=unlimited`"));
        assert!(r("-1").unwrap_err().contains("whole number"));
        assert!(r("1001").unwrap_err().contains("more than 1000"));
        let big = retention_value("d", "days", &u64::MAX.to_string(), 10, u64::MAX);
        assert!(big.unwrap_err().contains("too large"));
    }

    #[test]
    fn decodes_and_never_panics() {
        assert_eq!(percent_decode("a%2Fb%3d"), "a/b=");
        assert_eq!(percent_decode("%"), "%");
        assert_eq!(percent_decode("%4"), "%4");
        assert_eq!(percent_decode("%zz"), "%zz");
        assert_eq!(percent_decode("%é1"), "%é1");
        assert_eq!(percent_decode("x%ff"), "x\u{fffd}");
    }
}
