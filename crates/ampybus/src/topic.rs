//! Topics (`ampy.{env}.{domain}.{version}.{subtopic…}`) and subscription patterns (`*`, `>`).

use crate::error::{Error, Result, show};
use std::fmt;
use std::str::FromStr;

/// Longest topic accepted, in bytes.
pub const MAX_TOPIC_LEN: usize = 512;

/// The deployment environment, the second token of every topic.
///
/// ```
/// use ampybus::Env;
/// assert_eq!("paper".parse::<Env>().unwrap(), Env::Paper);
/// assert_eq!(Env::Prod.as_str(), "prod");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Env {
    /// Development.
    Dev,
    /// Paper trading.
    Paper,
    /// Production.
    Prod,
}

impl Env {
    /// Every environment, in order.
    pub const ALL: [Env; 3] = [Env::Dev, Env::Paper, Env::Prod];

    /// The token as it appears in a topic.
    ///
    /// ```
    /// assert_eq!(ampybus::Env::Dev.as_str(), "dev");
    /// ```
    pub fn as_str(self) -> &'static str {
        match self {
            Env::Dev => "dev",
            Env::Paper => "paper",
            Env::Prod => "prod",
        }
    }
}

impl FromStr for Env {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Env::ALL
            .into_iter()
            .find(|e| e.as_str() == s)
            .ok_or_else(|| Error::topic(format!("env {}: must be one of dev|paper|prod", show(s))))
    }
}

impl fmt::Display for Env {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

macro_rules! domains {
    ($($variant:ident => $name:literal, $doc:literal;)*) => {
        /// The business domain, the third token of every topic.
        ///
        /// ```
        /// use ampybus::Domain;
        /// assert_eq!("corporate_actions".parse::<Domain>().unwrap(), Domain::CorporateActions);
        /// assert_eq!(Domain::Fills.as_str(), "fills");
        /// ```
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum Domain {
            $(#[doc = $doc] $variant,)*
        }

        impl Domain {
            /// Every domain, in the order of the contract.
            pub const ALL: &'static [Domain] = &[$(Domain::$variant,)*];

            /// The token as it appears in a topic.
            ///
            /// ```
            /// assert_eq!(ampybus::Domain::Bars.as_str(), "bars");
            /// ```
            pub fn as_str(self) -> &'static str {
                match self { $(Domain::$variant => $name,)* }
            }
        }
    };
}

domains! {
    Bars => "bars", "OHLCV bars.";
    Ticks => "ticks", "Trades, quotes and book updates.";
    Fundamentals => "fundamentals", "Fundamental data per security and period.";
    News => "news", "News items.";
    Fx => "fx", "Foreign-exchange rates.";
    CorporateActions => "corporate_actions", "Splits, dividends and other corporate actions.";
    Universe => "universe", "Tradable universes.";
    Signals => "signals", "Model signals.";
    Orders => "orders", "Order requests.";
    Fills => "fills", "Fills (executions).";
    Positions => "positions", "Position snapshots.";
    Metrics => "metrics", "Service metrics.";
    Dlq => "dlq", "Dead-lettered messages.";
    Control => "control", "Control messages such as replay requests.";
}

impl Domain {
    /// How long brokers keep this domain's messages unless configured otherwise: 30 days for
    /// orders, fills, positions and the DLQ (audit), 7 days for everything else.
    ///
    /// ```
    /// use ampybus::Domain;
    /// assert_eq!(Domain::Fills.default_retention().as_secs(), 30 * 86_400);
    /// assert_eq!(Domain::Bars.default_retention().as_secs(), 7 * 86_400);
    /// ```
    pub fn default_retention(self) -> std::time::Duration {
        let days = match self {
            Domain::Orders | Domain::Fills | Domain::Positions | Domain::Dlq => 30,
            _ => 7,
        };
        std::time::Duration::from_secs(days * 86_400)
    }
}

impl FromStr for Domain {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Domain::ALL
            .iter()
            .copied()
            .find(|d| d.as_str() == s)
            .ok_or_else(|| {
                Error::topic(format!(
                    "domain {}: must be one of {}",
                    show(s),
                    Domain::ALL
                        .iter()
                        .map(|d| d.as_str())
                        .collect::<Vec<_>>()
                        .join("|")
                ))
            })
    }
}

impl fmt::Display for Domain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A concrete, validated topic such as `ampy.prod.bars.v1.XNAS.AAPL`.
///
/// ```
/// use ampybus::{Domain, Env, Topic};
/// let t = Topic::parse("ampy.prod.bars.v1.XNAS.AAPL").unwrap();
/// assert_eq!(t.env(), Env::Prod);
/// assert_eq!(t.domain(), Domain::Bars);
/// assert_eq!(t.version(), 1);
/// assert_eq!(t.subtopic(), "XNAS.AAPL");
/// assert_eq!(t.domain_prefix(), "ampy.prod.bars.v1");
/// assert!(Topic::parse("ampy.prod.bars.v1.XNAS.*").is_err());
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Topic {
    /// Shared: a clone (one per delivered message) is a reference count, not a copy.
    raw: std::sync::Arc<str>,
    env: Env,
    domain: Domain,
    version: u32,
    /// Byte offset of the first subtopic token.
    sub_at: usize,
}

fn token_problem(tok: &str) -> Option<&'static str> {
    if tok.is_empty() {
        return Some("empty token (two dots in a row, or a leading/trailing dot)");
    }
    if tok.chars().any(|c| c.is_whitespace()) {
        return Some("whitespace is not allowed");
    }
    if tok.chars().any(|c| c.is_control()) {
        return Some("control characters are not allowed");
    }
    None
}

fn parse_version(tok: &str) -> Option<u32> {
    let digits = tok.strip_prefix('v')?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) || digits.len() > 9 {
        return None;
    }
    let v: u32 = digits.parse().ok()?;
    (v >= 1).then_some(v)
}

impl Topic {
    /// Parses and validates a concrete topic. The error names the offending token.
    ///
    /// ```
    /// let err = ampybus::Topic::parse("ampy.prod..v1.x").unwrap_err();
    /// assert!(err.to_string().contains("token 3"), "{err}");
    /// ```
    pub fn parse(s: &str) -> Result<Topic> {
        let bad = |i: usize, tok: &str, why: &str| {
            Error::topic(format!(
                "{}: token {} {}: {}",
                show(s),
                i + 1,
                show(tok),
                why
            ))
        };
        if s.is_empty() {
            return Err(Error::topic("empty topic"));
        }
        if s.len() > MAX_TOPIC_LEN {
            return Err(Error::topic(format!(
                "{}: longer than {MAX_TOPIC_LEN} bytes ({} bytes)",
                show(s),
                s.len()
            )));
        }
        let toks: Vec<&str> = s.split('.').collect();
        for (i, tok) in toks.iter().enumerate() {
            if let Some(why) = token_problem(tok) {
                return Err(bad(i, tok, why));
            }
            if tok.contains('*') || tok.contains('>') {
                return Err(bad(
                    i,
                    tok,
                    "wildcards `*` and `>` are only allowed in patterns",
                ));
            }
        }
        if toks[0] != "ampy" {
            return Err(bad(0, toks[0], "must be `ampy`"));
        }
        let env_tok = toks
            .get(1)
            .ok_or_else(|| Error::topic(format!("{}: missing env token (token 2)", show(s))))?;
        let env: Env = env_tok
            .parse()
            .map_err(|_| bad(1, env_tok, "env must be one of dev|paper|prod"))?;
        let dom_tok = toks
            .get(2)
            .ok_or_else(|| Error::topic(format!("{}: missing domain token (token 3)", show(s))))?;
        let domain: Domain = dom_tok
            .parse()
            .map_err(|e: Error| bad(2, dom_tok, e.message()))?;
        let ver_tok = toks
            .get(3)
            .ok_or_else(|| Error::topic(format!("{}: missing version token (token 4)", show(s))))?;
        let version = parse_version(ver_tok).ok_or_else(|| {
            bad(
                3,
                ver_tok,
                "version must be `v` followed by an integer ≥ 1, e.g. `v1`",
            )
        })?;
        if toks.len() < 5 {
            return Err(Error::topic(format!(
                "{}: missing subtopic (token 5 onwards), e.g. `{}.XNAS.AAPL`",
                show(s),
                s
            )));
        }
        let sub_at = toks[..4].iter().map(|t| t.len() + 1).sum();
        Ok(Topic {
            raw: s.into(),
            env,
            domain,
            version,
            sub_at,
        })
    }

    /// Builds a topic from its parts; `subtopic` may hold several `.`-separated tokens.
    ///
    /// ```
    /// use ampybus::{Domain, Env, Topic};
    /// let t = Topic::new(Env::Paper, Domain::Orders, 1, "requests").unwrap();
    /// assert_eq!(t.as_str(), "ampy.paper.orders.v1.requests");
    /// ```
    pub fn new(env: Env, domain: Domain, version: u32, subtopic: &str) -> Result<Topic> {
        Topic::parse(&format!("ampy.{env}.{domain}.v{version}.{subtopic}"))
    }

    /// The topic as a string.
    pub fn as_str(&self) -> &str {
        &self.raw
    }

    /// The topic's text as shared (a clone is a count).
    pub(crate) fn shared(&self) -> &std::sync::Arc<str> {
        &self.raw
    }
    /// The environment token.
    pub fn env(&self) -> Env {
        self.env
    }
    /// The domain token.
    pub fn domain(&self) -> Domain {
        self.domain
    }
    /// The version number (`v1` → 1).
    pub fn version(&self) -> u32 {
        self.version
    }
    /// Everything after the version token, e.g. `XNAS.AAPL`.
    pub fn subtopic(&self) -> &str {
        &self.raw[self.sub_at..]
    }
    /// The first subtopic token, e.g. `trade` in `ampy.prod.ticks.v1.trade.MSFT`.
    pub fn first_subtopic(&self) -> &str {
        self.subtopic().split('.').next().unwrap_or("")
    }
    /// `ampy.{env}.{domain}.v{version}`: the stream/topic name on Kafka and Redis and the
    /// bounded `topic` label of metrics.
    pub fn domain_prefix(&self) -> &str {
        &self.raw[..self.sub_at - 1]
    }
    /// The dead-letter topic for this topic: `ampy.{env}.dlq.v1.{domain}`.
    ///
    /// ```
    /// let t = ampybus::Topic::parse("ampy.prod.bars.v1.XNAS.AAPL").unwrap();
    /// assert_eq!(t.dlq_topic().as_str(), "ampy.prod.dlq.v1.bars");
    /// ```
    pub fn dlq_topic(&self) -> Topic {
        let raw = format!("ampy.{}.dlq.v1.{}", self.env, self.domain);
        let sub_at = format!("ampy.{}.dlq.v1.", self.env).len();
        Topic {
            raw: raw.into(),
            env: self.env,
            domain: Domain::Dlq,
            version: 1,
            sub_at,
        }
    }
}

impl FromStr for Topic {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Topic::parse(s)
    }
}

impl fmt::Display for Topic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.raw)
    }
}

impl AsRef<str> for Topic {
    fn as_ref(&self) -> &str {
        &self.raw
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum PatTok {
    Lit(String),
    One,
    Rest,
}

/// A subscription pattern in NATS style: `*` matches one token, `>` (last) one or more.
///
/// ```
/// use ampybus::TopicPattern;
/// let p = TopicPattern::parse("ampy.prod.ticks.v1.trade.>").unwrap();
/// assert!(p.matches("ampy.prod.ticks.v1.trade.MSFT"));
/// assert!(!p.matches("ampy.prod.ticks.v1.quote.MSFT"));
/// let any_env = TopicPattern::parse("ampy.*.bars.v1.>").unwrap();
/// assert!(any_env.matches("ampy.dev.bars.v1.XNAS.AAPL"));
/// assert!(TopicPattern::parse("ampy.prod.>.v1").is_err());
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TopicPattern {
    raw: String,
    toks: Vec<PatTok>,
    /// What [`TopicPattern::matches`] decides by comparing bytes, for the common shapes:
    /// literal tokens only (a topic matches when it equals the pattern) or literal tokens
    /// then `>` (a topic matches when it starts with the text before the `>`, its dot
    /// included). `None`: a `*` somewhere, matched token by token.
    fast: Option<FastMatch>,
}

/// See `TopicPattern::fast`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum FastMatch {
    Exact,
    /// The length of the prefix (the pattern without its last byte, `>`).
    Prefix(usize),
}

impl TopicPattern {
    /// Parses a pattern. Literal tokens in the env, domain and version positions are checked
    /// against the taxonomy, so a pattern that can never match is an error naming its token.
    /// So is a pattern of fewer than five tokens without a trailing `>` (`*`, `ampy.*`): a
    /// topic has at least five. `>` alone matches every topic.
    ///
    /// ```
    /// let err = ampybus::TopicPattern::parse("ampy.prd.>").unwrap_err();
    /// assert!(err.to_string().contains("\"prd\""), "{err}");
    /// let err = ampybus::TopicPattern::parse("ampy.*").unwrap_err();
    /// assert!(err.to_string().contains("can never match"), "{err}");
    /// assert!(ampybus::TopicPattern::parse(">").is_ok());
    /// ```
    pub fn parse(s: &str) -> Result<TopicPattern> {
        let bad = |i: usize, tok: &str, why: &str| {
            Error::topic(format!(
                "pattern {}: token {} {}: {}",
                show(s),
                i + 1,
                show(tok),
                why
            ))
        };
        if s.is_empty() {
            return Err(Error::topic("empty pattern"));
        }
        if s.len() > MAX_TOPIC_LEN {
            return Err(Error::topic(format!(
                "pattern {}: longer than {MAX_TOPIC_LEN} bytes",
                show(s)
            )));
        }
        let parts: Vec<&str> = s.split('.').collect();
        let mut toks = Vec::with_capacity(parts.len());
        for (i, tok) in parts.iter().enumerate() {
            if let Some(why) = token_problem(tok) {
                return Err(bad(i, tok, why));
            }
            let t = match *tok {
                "*" => PatTok::One,
                ">" => {
                    if i + 1 != parts.len() {
                        return Err(bad(i, tok, "`>` is only allowed as the last token"));
                    }
                    PatTok::Rest
                }
                _ if tok.contains('*') || tok.contains('>') => {
                    return Err(bad(i, tok, "a wildcard must be a whole token (`*` or `>`)"));
                }
                lit => {
                    let problem = match i {
                        0 if lit != "ampy" => Some("must be `ampy`".to_string()),
                        1 => lit
                            .parse::<Env>()
                            .err()
                            .map(|_| "env must be one of dev|paper|prod".into()),
                        2 => lit.parse::<Domain>().err().map(|e| e.message().to_string()),
                        3 if parse_version(lit).is_none() => {
                            Some("version must be `v` followed by an integer ≥ 1".into())
                        }
                        _ => None,
                    };
                    if let Some(p) = problem {
                        return Err(bad(i, tok, &p));
                    }
                    PatTok::Lit((*tok).to_owned())
                }
            };
            toks.push(t);
        }
        // A topic has at least five tokens: without a trailing `>`, fewer can never match.
        if toks.len() < 5 && !matches!(toks.last(), Some(PatTok::Rest)) {
            return Err(Error::topic(format!(
                "pattern {}: has {} token(s) and no trailing `>`, so it can never match a topic (topics have at least 5 tokens: ampy.{{env}}.{{domain}}.{{version}}.{{subtopic}}); add `.>` (e.g. {}) or write all five tokens",
                show(s),
                toks.len(),
                show(&format!("{}.>", s.trim_end_matches(".*")))
            )));
        }
        let fast = if toks.iter().all(|t| matches!(t, PatTok::Lit(_))) {
            Some(FastMatch::Exact)
        } else if toks[..toks.len() - 1]
            .iter()
            .all(|t| matches!(t, PatTok::Lit(_)))
            && matches!(toks.last(), Some(PatTok::Rest))
        {
            Some(FastMatch::Prefix(s.len() - 1))
        } else {
            None
        };
        Ok(TopicPattern {
            raw: s.to_owned(),
            toks,
            fast,
        })
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.raw
    }

    /// True when the pattern has no wildcard.
    ///
    /// ```
    /// assert!(ampybus::TopicPattern::parse("ampy.prod.orders.v1.requests").unwrap().is_literal());
    /// ```
    pub fn is_literal(&self) -> bool {
        self.toks.iter().all(|t| matches!(t, PatTok::Lit(_)))
    }

    /// Whether `topic` (a concrete topic string) matches this pattern.
    ///
    /// ```
    /// let p = ampybus::TopicPattern::parse("ampy.prod.*.v1.>").unwrap();
    /// assert!(p.matches("ampy.prod.fills.v1.events"));
    /// assert!(!p.matches("ampy.prod.fills.v1"));
    /// ```
    pub fn matches(&self, topic: &str) -> bool {
        match self.fast {
            Some(FastMatch::Exact) => return topic == self.raw,
            Some(FastMatch::Prefix(n)) => {
                return topic.as_bytes().starts_with(&self.raw.as_bytes()[..n]);
            }
            None => {}
        }
        // Token by token over the bytes (as `topic.split('.')` would cut them; `.` is ASCII,
        // so every cut is on a character boundary).
        let t = topic.as_bytes();
        let mut at = 0;
        let mut exhausted = false;
        for pt in self.toks.iter() {
            if exhausted {
                return false;
            }
            let end = t[at..]
                .iter()
                .position(|&c| c == b'.')
                .map_or(t.len(), |p| at + p);
            let tok = &t[at..end];
            match pt {
                PatTok::Rest => return true,
                PatTok::One if tok.is_empty() => return false,
                PatTok::One => {}
                PatTok::Lit(l) if tok != l.as_bytes() => return false,
                PatTok::Lit(_) => {}
            }
            if end == t.len() {
                exhausted = true;
            } else {
                at = end + 1;
            }
        }
        exhausted
    }

    /// True when this pattern may match a topic of domain `domain` (the third token).
    pub(crate) fn may_match_domain(&self, domain: &str) -> bool {
        for (i, t) in self.toks.iter().enumerate() {
            match t {
                PatTok::Rest => return true,
                _ if i < 2 => {}
                PatTok::One => return true,
                PatTok::Lit(l) => return l == domain,
            }
        }
        false
    }

    /// True when every topic this pattern matches is also matched by `outer` (checked token by
    /// token, so it is exact for these wildcards). Used to refuse a replay request that asks a
    /// consumer for topics outside its own subscription.
    ///
    /// ```
    /// use ampybus::TopicPattern;
    /// let p = |s| TopicPattern::parse(s).unwrap();
    /// assert!(p("ampy.dev.bars.v1.XNAS.AAPL").is_within(&p("ampy.dev.bars.>")));
    /// assert!(p("ampy.dev.bars.>").is_within(&p("ampy.*.bars.>")));
    /// assert!(p("ampy.dev.bars.v1.*").is_within(&p("ampy.dev.bars.v1.>")));
    /// assert!(!p("ampy.dev.>").is_within(&p("ampy.dev.bars.>")));
    /// assert!(!p("ampy.*.bars.>").is_within(&p("ampy.dev.bars.>")));
    /// assert!(!p("ampy.dev.bars.v1.>").is_within(&p("ampy.dev.bars.v1.*")));
    /// ```
    pub fn is_within(&self, outer: &TopicPattern) -> bool {
        for (i, o) in outer.toks.iter().enumerate() {
            let Some(t) = self.toks.get(i) else {
                return false;
            };
            match (o, t) {
                (PatTok::Rest, _) => return true,
                (PatTok::One, PatTok::Rest) => return false,
                (PatTok::One, _) => {}
                (PatTok::Lit(a), PatTok::Lit(b)) if a == b => {}
                (PatTok::Lit(_), _) => return false,
            }
        }
        self.toks.len() == outer.toks.len()
    }

    /// The env token as written (`dev`, `paper`, `prod`, `*` or `>`); `None` for a pattern of
    /// one token.
    ///
    /// ```
    /// use ampybus::TopicPattern;
    /// assert_eq!(TopicPattern::parse("ampy.paper.>").unwrap().env_token(), Some("paper"));
    /// assert_eq!(TopicPattern::parse("ampy.*.bars.>").unwrap().env_token(), Some("*"));
    /// assert_eq!(TopicPattern::parse(">").unwrap().env_token(), None);
    /// ```
    pub fn env_token(&self) -> Option<&str> {
        match self.toks.first()? {
            PatTok::Rest => None,
            _ => self.raw.split('.').nth(1),
        }
    }

    /// The literal prefix before the first wildcard (`ampy.prod.bars.` for `ampy.prod.bars.>`),
    /// used by transports to narrow a scan.
    ///
    /// ```
    /// let p = ampybus::TopicPattern::parse("ampy.prod.bars.v1.>").unwrap();
    /// assert_eq!(p.literal_prefix(), "ampy.prod.bars.v1.");
    /// ```
    pub fn literal_prefix(&self) -> String {
        let mut out = String::new();
        for t in &self.toks {
            match t {
                PatTok::Lit(l) => {
                    out.push_str(l);
                    out.push('.');
                }
                _ => return out,
            }
        }
        out.pop();
        out
    }
}

impl FromStr for TopicPattern {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        TopicPattern::parse(s)
    }
}

impl fmt::Display for TopicPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.raw)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_errors_name_the_token() {
        let cases = [
            ("", "empty topic"),
            ("amp.prod.bars.v1.X", "token 1 \"amp\""),
            ("ampy.staging.bars.v1.X", "token 2 \"staging\""),
            ("ampy.prod.bar.v1.X", "token 3 \"bar\""),
            ("ampy.prod.bars.1.X", "token 4 \"1\""),
            ("ampy.prod.bars.v0.X", "token 4 \"v0\""),
            ("ampy.prod.bars.v1", "missing subtopic"),
            ("ampy.prod.bars.v1.X..Y", "token 6 \"\""),
            ("ampy.prod.bars.v1.X Y", "whitespace"),
            ("ampy.prod.bars.v1.X.*", "wildcards"),
            ("ampy.prod.bars.v1.X>", "wildcards"),
            (".ampy.prod.bars.v1.X", "token 1 \"\""),
            ("ampy.prod.bars.v1.X.", "token 6 \"\""),
        ];
        for (t, want) in cases {
            let e = Topic::parse(t).unwrap_err();
            assert_eq!(e.kind(), crate::ErrorKind::Topic);
            assert!(
                e.to_string().contains(want),
                "{t:?}: {e} does not contain {want:?}"
            );
        }
    }

    #[test]
    fn pattern_matching() {
        let p = TopicPattern::parse(">").unwrap();
        assert!(p.matches("ampy.prod.bars.v1.X"));
        let p = TopicPattern::parse("ampy.prod.bars.v1.*").unwrap();
        assert!(p.matches("ampy.prod.bars.v1.X"));
        assert!(!p.matches("ampy.prod.bars.v1.X.Y"));
        assert!(!p.matches("ampy.prod.bars.v1"));
        let p = TopicPattern::parse("ampy.prod.bars.v1.XNAS.AAPL").unwrap();
        assert!(p.matches("ampy.prod.bars.v1.XNAS.AAPL"));
        assert!(!p.matches("ampy.prod.bars.v1.XNAS.AAPLX"));
        assert!(TopicPattern::parse("ampy.prod.>.x").is_err());
        assert!(TopicPattern::parse("ampy.prod.ba*").is_err());
        assert!(TopicPattern::parse("ampy..bars").is_err());
        assert!(TopicPattern::parse("ampy.prod.bars.x1.>").is_err());
    }

    /// The byte-wise matcher agrees with the definition (tokens as `split('.')` cuts them)
    /// on every pattern × topic pair below, empty tokens and odd shapes included.
    #[test]
    fn pattern_matching_agrees_with_token_split() {
        fn reference(p: &TopicPattern, topic: &str) -> bool {
            let mut parts = topic.split('.');
            for pt in p.toks.iter() {
                match pt {
                    PatTok::Rest => return parts.next().is_some(),
                    PatTok::One if parts.next().is_none_or(str::is_empty) => return false,
                    PatTok::One => {}
                    PatTok::Lit(l) if parts.next() != Some(l.as_str()) => return false,
                    PatTok::Lit(_) => {}
                }
            }
            parts.next().is_none()
        }
        let patterns = [
            ">",
            "*.>",
            "ampy.>",
            "ampy.*.*.*.*",
            "ampy.prod.>",
            "ampy.*.bars.>",
            "ampy.prod.bars.v1.*",
            "ampy.prod.bars.v1.*.*",
            "ampy.prod.bars.v1.XNAS.AAPL",
            "ampy.*.*.v1.>",
            "ampy.prod.bars.v1.>",
            "ampy.prod.bars.v1.XNAS.>",
        ];
        let topics = [
            "",
            ".",
            "..",
            "ampy",
            "ampy.",
            ".ampy",
            "ampy..bars",
            "ampy.prod",
            "ampy.prod.",
            "ampy.prod.bars",
            "ampy.prod.bars.v1",
            "ampy.prod.bars.v1.",
            "ampy.prod.bars.v1.X",
            "ampy.prod.bars.v1.X.",
            "ampy.prod.bars.v1.X.Y",
            "ampy.prod.bars.v1.XNAS.AAPL",
            "ampy.prod.bars.v1.XNAS.AAPLX",
            "ampy.prod.bars.v1.XNAS.AAPL.",
            "ampy.dev.bars.v1.é.ü",
            "ampy.prod.ordersé.v1.x",
            "ampy.prod.bars.v1X",
            "ampy.prod.bars.v1X.a",
            "ampy.prod.bars.v1.XNAS",
            "ampy.prod.bars.v1.XNAS.",
            "ampy.prod.bars.v1.XNASX.AAPL",
        ];
        let mut agreed = 0;
        for p in patterns {
            let p = TopicPattern::parse(p).unwrap();
            for t in topics {
                assert_eq!(p.matches(t), reference(&p, t), "{} vs {t:?}", p.as_str());
                agreed += 1;
            }
        }
        assert_eq!(agreed, patterns.len() * topics.len());
    }

    /// Patterns of literal tokens, and of literal tokens then `>`, are matched by comparing
    /// bytes; patterns with `*` token by token.
    #[test]
    fn common_pattern_shapes_take_the_byte_comparison() {
        let fast = |s: &str| TopicPattern::parse(s).unwrap().fast;
        assert_eq!(fast("ampy.prod.bars.v1.XNAS.AAPL"), Some(FastMatch::Exact));
        assert_eq!(fast("ampy.prod.bars.>"), Some(FastMatch::Prefix(15)));
        assert_eq!(fast(">"), Some(FastMatch::Prefix(0)));
        assert_eq!(fast("ampy.*.bars.>"), None);
        assert_eq!(fast("ampy.prod.bars.v1.*"), None);
        let p = TopicPattern::parse("ampy.prod.bars.>").unwrap();
        assert!(p.matches("ampy.prod.bars.v1.XNAS.AAPL"));
        assert!(!p.matches("ampy.prod.barsX.v1.XNAS.AAPL"));
        assert!(!p.matches("ampy.prod.bars"));
    }
}
