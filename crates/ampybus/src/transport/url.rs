//! URLs as the bindings read them: pieces of parsing they share, and [`redact`] for logs
//! and errors.

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
