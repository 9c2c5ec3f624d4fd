//! Partition keys: canonical builders and the per-domain shape checks of the contract.
//!
//! | domain | key |
//! |---|---|
//! | bars | `MIC.SYMBOL` (`XNAS.AAPL`) |
//! | ticks | `SYMBOL.MIC` (`MSFT.XNAS`); on `ampy.{env}.ticks.v1.heartbeat.{source}` the source id (`feed-a`), the topic's last token |
//! | news | news item id |
//! | fx | `BASE.QUOTE` (`USD.JPY`) |
//! | fundamentals | `SYMBOL.MIC\|period_end\|source` |
//! | universe | `universe_id` |
//! | corporate_actions | `SYMBOL.MIC` (our choice: the contract names no key) |
//! | signals | `model_id\|SYMBOL.MIC[\|horizon]` |
//! | orders | `client_order_id` |
//! | fills | `account_id\|client_order_id` |
//! | positions | `account_id\|SYMBOL.MIC` |
//! | metrics | `service\|metric_name` |
//! | dlq, control | any non-empty key |
//!
//! Where a security appears, either order of a 4-character MIC and a symbol is accepted; the
//! builders emit the canonical order. A MIC is 4 upper-case ASCII letters or digits. No key
//! may contain whitespace or control characters.

use crate::error::{Error, Result, show};
use crate::topic::{Domain, Topic};

const KEY: &str = "partition_key";
/// Longest key accepted, in bytes.
pub const MAX_KEY_LEN: usize = 256;

/// True for a 4-character market identifier code (upper-case letters and digits).
///
/// ```
/// assert!(ampybus::partition::is_mic("XNAS"));
/// assert!(!ampybus::partition::is_mic("xnas"));
/// ```
pub fn is_mic(s: &str) -> bool {
    s.len() == 4
        && s.bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit())
}

fn is_symbol(s: &str) -> bool {
    !s.is_empty() && !s.bytes().any(|b| b == b'|')
}

/// Splits a security `MIC.SYMBOL` or `SYMBOL.MIC` into `(mic, symbol)`. The symbol may itself
/// contain dots (`BRK.B`).
///
/// ```
/// use ampybus::partition::split_security;
/// assert_eq!(split_security("XNAS.AAPL"), Some(("XNAS", "AAPL")));
/// assert_eq!(split_security("BRK.B.XNYS"), Some(("XNYS", "BRK.B")));
/// assert_eq!(split_security("AAPL"), None);
/// ```
pub fn split_security(s: &str) -> Option<(&str, &str)> {
    // `MIC.SYMBOL`: the first dot follows the MIC's four characters (a MIC holds no dot).
    if s.as_bytes().get(4) == Some(&b'.')
        && let (first, rest) = (&s[..4], &s[5..])
        && is_mic(first)
        && is_symbol(rest)
    {
        return Some((first, rest));
    }
    if let Some((rest, last)) = s.rsplit_once('.')
        && is_mic(last)
        && is_symbol(rest)
    {
        return Some((last, rest));
    }
    None
}

/// Bars key: `MIC.SYMBOL`.
///
/// ```
/// assert_eq!(ampybus::partition::bars("AAPL", "XNAS"), "XNAS.AAPL");
/// ```
pub fn bars(symbol: &str, mic: &str) -> String {
    format!("{mic}.{symbol}")
}

/// Ticks key: `SYMBOL.MIC`.
///
/// ```
/// assert_eq!(ampybus::partition::ticks("MSFT", "XNAS"), "MSFT.XNAS");
/// ```
pub fn ticks(symbol: &str, mic: &str) -> String {
    format!("{symbol}.{mic}")
}

/// FX key: `BASE.QUOTE`.
///
/// ```
/// assert_eq!(ampybus::partition::fx("USD", "JPY"), "USD.JPY");
/// ```
pub fn fx(base: &str, quote: &str) -> String {
    format!("{base}.{quote}")
}

/// Fundamentals key: `SYMBOL.MIC|period_end|source`.
///
/// ```
/// assert_eq!(ampybus::partition::fundamentals("AAPL", "XNAS", "2025-06-30", "tiingo"), "AAPL.XNAS|2025-06-30|tiingo");
/// ```
pub fn fundamentals(symbol: &str, mic: &str, period_end: &str, source: &str) -> String {
    format!("{symbol}.{mic}|{period_end}|{source}")
}

/// Signals key: `model_id|SYMBOL.MIC[|horizon]`.
///
/// ```
/// assert_eq!(ampybus::partition::signals("hyper@2025-09-05", "NVDA", "XNAS", None), "hyper@2025-09-05|NVDA.XNAS");
/// assert_eq!(ampybus::partition::signals("m", "NVDA", "XNAS", Some("5d")), "m|NVDA.XNAS|5d");
/// ```
pub fn signals(model_id: &str, symbol: &str, mic: &str, horizon: Option<&str>) -> String {
    match horizon {
        Some(h) => format!("{model_id}|{symbol}.{mic}|{h}"),
        None => format!("{model_id}|{symbol}.{mic}"),
    }
}

/// Fills key: `account_id|client_order_id`.
///
/// ```
/// assert_eq!(ampybus::partition::fills("ACC-1", "co_1"), "ACC-1|co_1");
/// ```
pub fn fills(account_id: &str, client_order_id: &str) -> String {
    format!("{account_id}|{client_order_id}")
}

/// Positions key: `account_id|SYMBOL.MIC`.
///
/// ```
/// assert_eq!(ampybus::partition::positions("ACC-1", "AAPL", "XNAS"), "ACC-1|AAPL.XNAS");
/// ```
pub fn positions(account_id: &str, symbol: &str, mic: &str) -> String {
    format!("{account_id}|{symbol}.{mic}")
}

/// Metrics key: `service|metric_name`.
///
/// ```
/// assert_eq!(ampybus::partition::metrics("ampy-oms", "oms.order_rejects"), "ampy-oms|oms.order_rejects");
/// ```
pub fn metrics(service: &str, metric_name: &str) -> String {
    format!("{service}|{metric_name}")
}

fn is_currency(s: &str) -> bool {
    (3..=5).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit())
}

fn is_date(s: &str) -> bool {
    chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d").is_ok() && s.len() == 10
}

fn parts(key: &str, min: usize, max: usize, shape: &str) -> Result<Vec<String>> {
    let p: Vec<String> = key.split('|').map(str::to_owned).collect();
    if p.len() < min || p.len() > max || p.iter().any(String::is_empty) {
        return Err(Error::header(
            KEY,
            format!("must be `{shape}` (got {})", show(key)),
        ));
    }
    Ok(p)
}

fn security(key: &str, part: &str, shape: &str) -> Result<()> {
    if split_security(part).is_none() {
        return Err(Error::header(
            KEY,
            format!(
                "must be `{shape}` where the security is SYMBOL.MIC or MIC.SYMBOL with a 4-character MIC (got {})",
                show(key)
            ),
        ));
    }
    Ok(())
}

/// Whether `key` is a security key that [`check_key`] accepts for the bars, ticks and
/// corporate-actions domains, in the plain form: ASCII `MIC.SYMBOL` or `SYMBOL.MIC` (the MIC four
/// upper-case letters or digits), every byte graphic and none `|`, at most [`MAX_KEY_LEN`]
/// bytes. `false` says only "not plainly": the full rules decide.
#[inline]
fn plain_security(key: &str) -> bool {
    let b = key.as_bytes();
    let n = b.len();
    let symbol = |s: &[u8]| s.iter().all(|&c| c.is_ascii_graphic() && c != b'|');
    // Each slice of `key` starts or ends next to an ASCII dot: on a character boundary.
    n > 5
        && n <= MAX_KEY_LEN
        && ((b[4] == b'.' && is_mic(&key[..4]) && symbol(&b[5..]))
            || (b[n - 5] == b'.' && is_mic(&key[n - 4..]) && symbol(&b[..n - 5])))
}

/// Checks a partition key against the shape its topic asks for (publish side and
/// `validate`): [`check_key`] for the topic's domain, except on a ticks topic whose first
/// subtopic token is `heartbeat` (`ampy.{env}.ticks.v1.heartbeat.{source}`), where the key is
/// the source id: the topic's last token, which must come after `heartbeat` (tokens between
/// them, e.g. `heartbeat.eu.feed-a`, are allowed as a namespace).
///
/// ```
/// use ampybus::{Topic, partition::check_topic_key};
/// let hb = Topic::parse("ampy.prod.ticks.v1.heartbeat.feed-a").unwrap();
/// check_topic_key(&hb, "feed-a").unwrap();
/// let err = check_topic_key(&hb, "MSFT.XNAS").unwrap_err();
/// assert!(err.to_string().contains("the source id `feed-a`"), "{err}");
/// check_topic_key(&Topic::parse("ampy.prod.ticks.v1.heartbeat.eu.feed-a").unwrap(), "feed-a").unwrap();
/// let trade = Topic::parse("ampy.prod.ticks.v1.trade.MSFT").unwrap();
/// check_topic_key(&trade, "MSFT.XNAS").unwrap();
/// assert!(check_topic_key(&trade, "feed-a").is_err());
/// ```
pub fn check_topic_key(topic: &Topic, key: &str) -> Result<()> {
    if topic.domain() != Domain::Ticks || topic.first_subtopic() != "heartbeat" {
        return check_key(topic.domain(), key);
    }
    if key.is_empty() {
        return Err(Error::header(KEY, "must not be empty"));
    }
    let Some((_, source)) = topic.subtopic().rsplit_once('.') else {
        return Err(Error::header(
            KEY,
            format!(
                "a heartbeat topic must end in the source id, `ampy.{{env}}.ticks.v1.heartbeat.{{source}}`, and the key be that source id (got topic {})",
                show(topic.as_str())
            ),
        ));
    };
    if key != source {
        return Err(Error::header(
            KEY,
            format!(
                "on a heartbeat topic the key must be the source id `{source}` (the topic's last token), not `SYMBOL.MIC` (got {})",
                show(key)
            ),
        ));
    }
    Ok(())
}

/// Checks a partition key against its domain's shape (publish side and `validate`); see
/// [`check_topic_key`] for the one rule that needs the whole topic.
///
/// ```
/// use ampybus::{Domain, partition::check_key};
/// check_key(Domain::Bars, "XNAS.AAPL").unwrap();
/// check_key(Domain::Bars, "AAPL.XNAS").unwrap(); // either order is accepted
/// check_key(Domain::Fills, "ALPACA-LIVE-01|co_20250905_001").unwrap();
/// let err = check_key(Domain::Fills, "co_20250905_001").unwrap_err();
/// assert!(err.to_string().contains("account_id|client_order_id"), "{err}");
/// ```
pub fn check_key(domain: Domain, key: &str) -> Result<()> {
    // The common case settled in one pass; anything else (errors included) takes the rules
    // below, which name what is wrong.
    if matches!(
        domain,
        Domain::Bars | Domain::Ticks | Domain::CorporateActions
    ) && plain_security(key)
    {
        return Ok(());
    }
    check_key_rules(domain, key)
}

/// [`check_key`]'s rules one by one, in the order that names the first problem.
fn check_key_rules(domain: Domain, key: &str) -> Result<()> {
    if key.is_empty() {
        return Err(Error::header(KEY, "must not be empty"));
    }
    if key.len() > MAX_KEY_LEN {
        return Err(Error::header(
            KEY,
            format!("longer than {MAX_KEY_LEN} bytes ({} bytes)", key.len()),
        ));
    }
    // For ASCII, whitespace and control characters are the bytes that are not graphic.
    let bad_char = if key.bytes().all(|b| b.is_ascii_graphic()) {
        false
    } else if key.is_ascii() {
        true
    } else {
        key.chars().any(|c| c.is_whitespace() || c.is_control())
    };
    if bad_char {
        return Err(Error::header(
            KEY,
            format!(
                "must not contain whitespace or control characters (got {})",
                show(key)
            ),
        ));
    }
    match domain {
        Domain::Bars => security(key, key, "MIC.SYMBOL")?,
        Domain::Ticks => security(key, key, "SYMBOL.MIC")?,
        Domain::CorporateActions => security(key, key, "SYMBOL.MIC")?,
        Domain::Fx => {
            let ok = key
                .split_once('.')
                .is_some_and(|(b, q)| is_currency(b) && is_currency(q));
            if !ok {
                return Err(Error::header(
                    KEY,
                    format!(
                        "must be `BASE.QUOTE` with 3–5 upper-case letters each, e.g. `USD.JPY` (got {})",
                        show(key)
                    ),
                ));
            }
        }
        Domain::Fundamentals => {
            let shape = "SYMBOL.MIC|period_end|source";
            let p = parts(key, 3, 3, shape)?;
            security(key, &p[0], shape)?;
            if !is_date(&p[1]) {
                return Err(Error::header(
                    KEY,
                    format!(
                        "must be `{shape}` with period_end as YYYY-MM-DD (got {})",
                        show(key)
                    ),
                ));
            }
        }
        Domain::Signals => {
            let shape = "model_id|SYMBOL.MIC[|horizon]";
            let p = parts(key, 2, 3, shape)?;
            security(key, &p[1], shape)?;
        }
        Domain::Fills => {
            parts(key, 2, 2, "account_id|client_order_id")?;
        }
        Domain::Positions => {
            let shape = "account_id|SYMBOL.MIC";
            let p = parts(key, 2, 2, shape)?;
            security(key, &p[1], shape)?;
        }
        Domain::Metrics => {
            parts(key, 2, 2, "service|metric_name")?;
        }
        Domain::Orders => {
            parts(key, 1, 1, "client_order_id")?;
        }
        Domain::News | Domain::Universe | Domain::Dlq | Domain::Control => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The one-pass check never accepts what the full rules refuse: every string of up to 7
    /// characters over an alphabet of the bytes that matter (MIC characters, a lower-case
    /// letter, the dot, `|`, a space, a control byte), and keys at and past the length limit.
    #[test]
    fn the_plain_security_check_accepts_only_what_the_rules_accept() {
        let alphabet = [b'A', b'7', b'x', b'.', b'|', b' ', 0x7f];
        let mut accepted = 0;
        let mut key = Vec::new();
        for len in 0..=7u32 {
            for mut code in 0..alphabet.len().pow(len) {
                key.clear();
                for _ in 0..len {
                    key.push(alphabet[code % alphabet.len()]);
                    code /= alphabet.len();
                }
                let k = std::str::from_utf8(&key).unwrap();
                if plain_security(k) {
                    accepted += 1;
                    for d in [Domain::Bars, Domain::Ticks, Domain::CorporateActions] {
                        assert!(check_key_rules(d, k).is_ok(), "{k:?}");
                    }
                }
            }
        }
        // Exactly the plain keys: MIC chars `A`, `7`; symbol chars `A`, `7`, `x`, `.`. Length 6:
        // 2^4 × 4 `MIC.SYMBOL` + 4 × 2^4 `SYMBOL.MIC` = 128; length 7: 2^4 × 4^2 × 2 = 512 (the
        // two forms cannot overlap: the other form's dot would fall inside the MIC).
        assert_eq!(accepted, 640);
        let long = format!("XNAS.{}", "A".repeat(MAX_KEY_LEN - 5));
        assert!(plain_security(&long));
        let longer = format!("{long}A");
        assert!(!plain_security(&longer));
        assert!(check_key_rules(Domain::Bars, &long).is_ok());
        assert!(check_key(Domain::Bars, &longer).is_err());
    }

    #[test]
    fn shapes() {
        let ok = [
            (Domain::Ticks, "MSFT.XNAS"),
            (Domain::Fx, "USD.JPY"),
            (Domain::Fx, "USDT.BTC"),
            (Domain::Fundamentals, "AAPL.XNAS|2025-06-30|tiingo"),
            (Domain::Signals, "hyper@2025-09-05|NVDA.XNAS"),
            (Domain::Signals, "hyper@2025-09-05|NVDA.XNAS|5d"),
            (Domain::Positions, "ALPACA-LIVE-01|AAPL.XNAS"),
            (Domain::Metrics, "ampy-oms|oms.order_rejects"),
            (Domain::News, "marketbeat:2025-09-05:amzn-headline-8b12c6"),
            (Domain::Orders, "co_20250905_001"),
            (Domain::Universe, "sp500"),
        ];
        for (d, k) in ok {
            check_key(d, k).unwrap_or_else(|e| panic!("{d} {k}: {e}"));
        }
        let bad = [
            (Domain::Bars, "AAPL", "MIC.SYMBOL"),
            (Domain::Bars, "XNAS.", "MIC.SYMBOL"),
            (Domain::Fx, "usd.jpy", "BASE.QUOTE"),
            (Domain::Fx, "USDJPY", "BASE.QUOTE"),
            (
                Domain::Fundamentals,
                "AAPL.XNAS|2025-13-01|tiingo",
                "YYYY-MM-DD",
            ),
            (
                Domain::Fundamentals,
                "AAPL.XNAS|2025-06-30",
                "SYMBOL.MIC|period_end|source",
            ),
            (Domain::Signals, "NVDA.XNAS", "model_id|SYMBOL.MIC"),
            (Domain::Orders, "a|b", "client_order_id"),
            (Domain::Positions, "ACC|AAPL", "account_id|SYMBOL.MIC"),
            (Domain::Metrics, "svc|", "service|metric_name"),
            (Domain::News, "a b", "whitespace"),
            (Domain::Universe, "", "must not be empty"),
        ];
        for (d, k, want) in bad {
            let e = check_key(d, k).unwrap_err();
            assert!(e.to_string().contains(want), "{d} {k:?}: {e}");
        }
    }

    #[test]
    fn heartbeat_keys_are_the_source_id() {
        let t = |s: &str| Topic::parse(s).unwrap();
        check_topic_key(&t("ampy.dev.ticks.v1.heartbeat.feed-a"), "feed-a").unwrap();
        check_topic_key(&t("ampy.dev.ticks.v1.heartbeat.eu.feed-a"), "feed-a").unwrap();
        // Not a heartbeat topic: the ticks rule.
        check_topic_key(&t("ampy.dev.ticks.v1.quote.MSFT"), "MSFT.XNAS").unwrap();
        let bad = [
            (
                "ampy.dev.ticks.v1.heartbeat.feed-a",
                "MSFT.XNAS",
                "the source id `feed-a`",
            ),
            (
                "ampy.dev.ticks.v1.heartbeat.feed-a",
                "feed-b",
                "the source id `feed-a`",
            ),
            (
                "ampy.dev.ticks.v1.heartbeat.feed-a",
                "",
                "must not be empty",
            ),
            (
                "ampy.dev.ticks.v1.heartbeat",
                "feed-a",
                "must end in the source id",
            ),
            (
                "ampy.dev.ticks.v1.heartbeat.eu.feed-a",
                "eu",
                "the source id `feed-a`",
            ),
            // Only ticks has the rule: a bars heartbeat subtopic keeps `MIC.SYMBOL`.
            ("ampy.dev.bars.v1.heartbeat.feed-a", "feed-a", "MIC.SYMBOL"),
        ];
        for (topic, key, want) in bad {
            let e = check_topic_key(&t(topic), key).unwrap_err();
            assert!(e.to_string().contains(want), "{topic} {key:?}: {e}");
            assert!(e.to_string().contains("partition_key"), "{e}");
        }
    }
}
