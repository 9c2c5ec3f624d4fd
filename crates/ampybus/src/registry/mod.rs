//! The topic registry (DESIGN §5, seed 002 subject reservation, seed 003 manifests): which
//! service owns (may publish) each topic pattern, which schemas travel there, which services
//! may read it, its durability tier, retention and rate.
//!
//! * `file` — the TOML file as written (`[[topic]]` entries, manifests), every table with
//!   unknown fields refused; parse errors name the file, the line and the field.
//! * `check` — the rules `ampybus registry check` applies ([`Registry::check`],
//!   [`Registry::check_manifest`]).
//! * `gate` — enforcement on a [`crate::Bus`] opened with a registry: publish refused outside
//!   the producer's claims ([`Registry::check_publish`]), subscriptions refused outside the
//!   service's reads ([`Registry::check_subscribe`]), schema mismatches dead-lettered by the
//!   consumer runtime, `max_rate` applied by [`crate::runtime::Producer`].
//! * [`acl`] — NATS authorization, Redis ACL file and Kafka ACL commands per service.
//! * [`asyncapi`] — an AsyncAPI 3.0 document.
//!
//! The `dlq` and `control` domains belong to the bus itself (the DLQ writer, redrive, the
//! replay control protocol): no entry may claim them and every service may publish and read
//! them.
//!
//! ```
//! use ampybus::registry::{Registry, Tier};
//! let reg = Registry::parse(r#"
//! [[topic]]
//! pattern = "ampy.*.orders.v1.>"
//! owner = "oms"
//! schemas = ["ampy.orders.v1.OrderRequest"]
//! tier = "at_least_once_dedupe"
//! retention_days = 30
//! consumers = ["risk"]
//! "#, "registry.toml").unwrap();
//! assert_eq!(reg.tier_for("ampy.prod.orders.v1.requests"), Some(Tier::AtLeastOnceDedupe));
//! assert_eq!(reg.entry_for("ampy.prod.orders.v1.requests").unwrap().owner, "oms");
//! ```

pub mod acl;
pub mod asyncapi;
mod check;
mod file;
mod gate;

pub use check::{Claim, Finding, Manifest, Severity};
pub(crate) use gate::{RateLimits, SchemaGate};

use crate::error::{Error, ErrorKind, Result};
use crate::topic::{Domain, Topic, TopicPattern};
use std::collections::BTreeSet;
use std::fmt;
use std::path::Path;
use std::time::Duration;

/// The schema of opaque bytes: a topic accepts it only when its entry lists it, and
/// `registry check` knows it without `ampybus-proto`.
///
/// ```
/// assert_eq!(ampybus::registry::RAW_SCHEMA, "ampy.raw.v1.Bytes");
/// ```
pub const RAW_SCHEMA: &str = crate::headers::RAW_BYTES_SCHEMA;

/// What went wrong loading a registry or manifest, as a closed set.
///
/// ```
/// use ampybus::registry::{Registry, RegistryErrorKind};
/// let e = Registry::load(std::path::Path::new("/nonexistent/registry.toml")).unwrap_err();
/// assert_eq!(e.kind(), RegistryErrorKind::Read);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum RegistryErrorKind {
    /// The file cannot be read (missing, permissions).
    Read,
    /// The file is not valid TOML or does not fit the format (unknown field, missing field,
    /// wrong type).
    Parse,
    /// The file parses but breaks a rule (bad pattern, tier, retention, overlapping owners…).
    Invalid,
}

/// A registry or manifest that cannot be used: its file, the line when known, and what is
/// wrong (naming the field or rule).
///
/// ```
/// use ampybus::registry::Registry;
/// let e = Registry::parse("[[topic]]\npattern = 1\n", "reg.toml").unwrap_err();
/// assert!(e.to_string().starts_with("reg.toml:2: "), "{e}");
/// ```
#[derive(Debug, Clone, thiserror::Error)]
#[error("{}", self.render())]
pub struct RegistryError {
    kind: RegistryErrorKind,
    file: String,
    line: Option<usize>,
    message: String,
}

impl RegistryError {
    pub(crate) fn new(
        kind: RegistryErrorKind,
        file: String,
        line: Option<usize>,
        message: String,
    ) -> Self {
        RegistryError {
            kind,
            file,
            line,
            message,
        }
    }

    fn render(&self) -> String {
        match self.line {
            Some(l) => format!("{}:{l}: {}", self.file, self.message),
            None => format!("{}: {}", self.file, self.message),
        }
    }

    /// The kind of failure.
    ///
    /// ```
    /// use ampybus::registry::{Registry, RegistryErrorKind};
    /// let e = Registry::parse("[[topic]\n", "r.toml").unwrap_err();
    /// assert_eq!(e.kind(), RegistryErrorKind::Parse);
    /// ```
    pub fn kind(&self) -> RegistryErrorKind {
        self.kind
    }

    /// The file named in the error.
    ///
    /// ```
    /// let e = ampybus::registry::Registry::parse("x = 1", "r.toml").unwrap_err();
    /// assert_eq!(e.file(), "r.toml");
    /// ```
    pub fn file(&self) -> &str {
        &self.file
    }

    /// The 1-based line, when the error has one.
    ///
    /// ```
    /// let e = ampybus::registry::Registry::parse("\nx = 1", "r.toml").unwrap_err();
    /// assert_eq!(e.line(), Some(2));
    /// ```
    pub fn line(&self) -> Option<usize> {
        self.line
    }
}

impl From<RegistryError> for Error {
    fn from(e: RegistryError) -> Error {
        Error::new(ErrorKind::Config, format!("registry {e}"))
    }
}

/// Durability tier of a topic pattern (DESIGN §2).
///
/// ```
/// use ampybus::registry::Tier;
/// assert_eq!("at_least_once".parse::<Tier>().unwrap(), Tier::AtLeastOnce);
/// assert_eq!(Tier::BestEffort.as_str(), "best_effort");
/// assert_eq!("best-effort".parse::<Tier>().unwrap(), Tier::BestEffort);
/// assert!("exactly_once".parse::<Tier>().is_err());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Tier {
    /// May be dropped (NATS core, no ack).
    BestEffort,
    /// Acked, retried, may be delivered twice.
    AtLeastOnce,
    /// At least once, with consumer dedupe (the default of every domain).
    AtLeastOnceDedupe,
}

impl Tier {
    /// Every tier, in order.
    ///
    /// ```
    /// assert_eq!(ampybus::registry::Tier::ALL.len(), 3);
    /// ```
    pub const ALL: [Tier; 3] = [Tier::BestEffort, Tier::AtLeastOnce, Tier::AtLeastOnceDedupe];

    /// The name as written in the registry.
    ///
    /// ```
    /// assert_eq!(ampybus::registry::Tier::AtLeastOnceDedupe.as_str(), "at_least_once_dedupe");
    /// ```
    pub fn as_str(self) -> &'static str {
        match self {
            Tier::BestEffort => "best_effort",
            Tier::AtLeastOnce => "at_least_once",
            Tier::AtLeastOnceDedupe => "at_least_once_dedupe",
        }
    }
}

impl fmt::Display for Tier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Tier {
    type Err = String;
    /// Either spelling: `best_effort` or `best-effort` (the CLI's `--tier`).
    fn from_str(s: &str) -> std::result::Result<Tier, String> {
        Tier::ALL
            .into_iter()
            .find(|t| t.as_str() == s || t.as_str().replace('_', "-") == s)
            .ok_or_else(|| {
                format!("{s:?} is not a tier (best_effort | at_least_once | at_least_once_dedupe)")
            })
    }
}

/// One `[[topic]]` entry, validated.
///
/// ```
/// let reg = ampybus::registry::Registry::parse(r#"
/// [[topic]]
/// pattern = "ampy.*.bars.v1.>"
/// owner = "md"
/// schemas = ["ampy.bars.v1.BarBatch"]
/// tier = "at_least_once"
/// retention_days = 7
/// max_rate = 100
/// "#, "r.toml").unwrap();
/// let e = &reg.entries()[0];
/// assert_eq!((e.line, e.retention_days, e.max_rate), (2, 7, Some(100.0)));
/// assert!(e.may_read("anyone"));
/// ```
#[derive(Debug, Clone)]
pub struct TopicEntry {
    /// The topic pattern claimed.
    pub pattern: TopicPattern,
    /// The one service that may publish here.
    pub owner: String,
    /// The `schema_fqdn`s that may travel here.
    pub schemas: Vec<String>,
    /// Durability tier.
    pub tier: Tier,
    /// Days the transport keeps messages.
    pub retention_days: u32,
    /// Messages per second for the owner (a [`crate::runtime::Producer`] slows down to it).
    pub max_rate: Option<f64>,
    /// Services that may subscribe (`None`: any service).
    pub consumers: Option<Vec<String>>,
    /// Free text.
    pub description: Option<String>,
    /// The line of the entry's `[[topic]]` header in its file.
    pub line: usize,
    /// The line of its `schemas` field (named by unknown-schema findings).
    pub(crate) schemas_line: usize,
}

impl TopicEntry {
    /// Whether `service` may read this entry's topics: the owner, a listed consumer, anyone
    /// when `consumers` is absent.
    ///
    /// ```
    /// # let reg = ampybus::registry::Registry::parse(r#"
    /// # [[topic]]
    /// # pattern = "ampy.*.fills.v1.>"
    /// # owner = "oms"
    /// # schemas = ["ampy.fills.v1.Fill"]
    /// # tier = "at_least_once_dedupe"
    /// # retention_days = 30
    /// # consumers = ["risk"]
    /// # "#, "r.toml").unwrap();
    /// let e = &reg.entries()[0];
    /// assert!(e.may_read("oms") && e.may_read("risk") && !e.may_read("ui"));
    /// ```
    pub fn may_read(&self, service: &str) -> bool {
        self.owner == service
            || self
                .consumers
                .as_ref()
                .is_none_or(|c| c.iter().any(|s| s == service))
    }

    /// Whether `schema` may travel on this entry's topics (`ampy.raw.v1.Bytes` only when
    /// listed).
    ///
    /// ```
    /// # let reg = ampybus::registry::Registry::parse(r#"
    /// # [[topic]]
    /// # pattern = "ampy.*.fills.v1.>"
    /// # owner = "oms"
    /// # schemas = ["ampy.fills.v1.Fill"]
    /// # tier = "at_least_once_dedupe"
    /// # retention_days = 30
    /// # "#, "r.toml").unwrap();
    /// assert!(reg.entries()[0].allows_schema("ampy.fills.v1.Fill"));
    /// assert!(!reg.entries()[0].allows_schema("ampy.raw.v1.Bytes"));
    /// ```
    pub fn allows_schema(&self, schema: &str) -> bool {
        self.schemas.iter().any(|s| s == schema)
    }

    /// The retention as a duration.
    ///
    /// ```
    /// # let reg = ampybus::registry::Registry::parse(r#"
    /// # [[topic]]
    /// # pattern = "ampy.*.fills.v1.>"
    /// # owner = "oms"
    /// # schemas = ["ampy.fills.v1.Fill"]
    /// # tier = "at_least_once_dedupe"
    /// # retention_days = 2
    /// # "#, "r.toml").unwrap();
    /// assert_eq!(reg.entries()[0].retention().as_secs(), 2 * 86_400);
    /// ```
    pub fn retention(&self) -> Duration {
        Duration::from_secs(u64::from(self.retention_days) * 86_400)
    }
}

/// A loaded registry: its entries in file order, and the file they came from.
///
/// ```
/// use ampybus::registry::Registry;
/// let reg = Registry::parse("", "empty.toml").unwrap();
/// assert!(reg.entries().is_empty());
/// assert_eq!(reg.origin(), "empty.toml");
/// ```
#[derive(Debug, Clone)]
pub struct Registry {
    origin: String,
    entries: Vec<TopicEntry>,
    /// Rule violations found while building the entries (kept for [`Registry::check`]).
    load_problems: Vec<Finding>,
}

/// Largest `retention_days` accepted (100 years).
///
/// ```
/// let text = format!("[[topic]]\npattern = \"ampy.*.news.v1.>\"\nowner = \"n\"\n\
///     schemas = [\"ampy.raw.v1.Bytes\"]\ntier = \"at_least_once\"\nretention_days = {}\n",
///     ampybus::registry::MAX_RETENTION_DAYS + 1);
/// assert!(ampybus::registry::Registry::parse(&text, "r.toml").is_err());
/// ```
pub const MAX_RETENTION_DAYS: i64 = 36_500;

impl Registry {
    /// Reads and validates a registry file: unreadable (`Read`), not TOML or not the format
    /// (`Parse`, naming the line and field), or breaking a rule of [`Registry::check`] other
    /// than schema knowledge (`Invalid`, every problem on its own line).
    ///
    /// ```
    /// let dir = tempfile::tempdir().unwrap();
    /// let path = dir.path().join("registry.toml");
    /// std::fs::write(&path, "[[topic]]\npattern = \"ampy.*.news.v1.>\"\nowner = \"news\"\n\
    ///     schemas = [\"ampy.news.v1.NewsItem\"]\ntier = \"at_least_once\"\nretention_days = 7\n").unwrap();
    /// let reg = ampybus::registry::Registry::load(&path).unwrap();
    /// assert_eq!(reg.entries().len(), 1);
    /// ```
    pub fn load(path: &Path) -> std::result::Result<Registry, RegistryError> {
        let text = file::read(path)?;
        Registry::parse(&text, &path.display().to_string())
    }

    /// [`Registry::load`] from text; `origin` names the file in errors.
    ///
    /// ```
    /// let e = ampybus::registry::Registry::parse(r#"
    /// [[topic]]
    /// pattern = "ampy.*.dlq.v1.>"
    /// owner = "x"
    /// schemas = ["ampy.raw.v1.Bytes"]
    /// tier = "at_least_once"
    /// retention_days = 7
    /// "#, "r.toml").unwrap_err();
    /// assert!(e.to_string().contains("belongs to the bus"), "{e}");
    /// ```
    pub fn parse(text: &str, origin: &str) -> std::result::Result<Registry, RegistryError> {
        let reg = Registry::parse_unchecked(text, origin)?;
        let errors: Vec<String> = reg
            .check(&|_| true)
            .into_iter()
            .filter(|f| f.severity == Severity::Error)
            .map(|f| f.to_string())
            .collect();
        if errors.is_empty() {
            Ok(reg)
        } else {
            Err(RegistryError::new(
                RegistryErrorKind::Invalid,
                origin.to_owned(),
                None,
                format!(
                    "{} problem(s); run `ampybus registry check`:\n{}",
                    errors.len(),
                    errors.join("\n")
                ),
            ))
        }
    }

    /// Reads a registry file keeping entries that break a rule as problems for
    /// [`Registry::check`] (what `ampybus registry check` uses): only an unreadable file or
    /// one that does not parse fails.
    ///
    /// ```
    /// use ampybus::registry::Registry;
    /// let dir = tempfile::tempdir().unwrap();
    /// let path = dir.path().join("r.toml");
    /// std::fs::write(&path, "[[topic]]\npattern = \"ampy.*.news.v1.>\"\nowner = \"news\"\n\
    ///     schemas = [\"ampy.news.v1.NewsItem\"]\ntier = \"fast\"\nretention_days = 7\n").unwrap();
    /// let reg = Registry::load_unchecked(&path).unwrap();
    /// let problems = reg.check(&|_| true);
    /// assert!(problems[0].to_string().contains("tier"), "{}", problems[0]);
    /// ```
    pub fn load_unchecked(path: &Path) -> std::result::Result<Registry, RegistryError> {
        let text = file::read(path)?;
        Registry::parse_unchecked(&text, &path.display().to_string())
    }

    /// [`Registry::load_unchecked`] from text.
    ///
    /// ```
    /// let reg = ampybus::registry::Registry::parse_unchecked("", "r.toml").unwrap();
    /// assert!(reg.check(&|_| true).is_empty());
    /// ```
    pub fn parse_unchecked(
        text: &str,
        origin: &str,
    ) -> std::result::Result<Registry, RegistryError> {
        let raw: file::RawRegistry = file::parse(text, origin)?;
        let mut entries = Vec::new();
        let mut problems = Vec::new();
        for spanned in raw.topic {
            let line = file::line_of(text, spanned.span().start);
            let raw = spanned.into_inner();
            let at = |span: std::ops::Range<usize>| file::line_of(text, span.start);
            let entry_name = raw.pattern.get_ref().clone();
            let mut problem = |line: usize, message: String| {
                problems.push(Finding::error(origin, Some(line), &entry_name, message));
            };
            let pattern = match TopicPattern::parse(raw.pattern.get_ref()) {
                Ok(p) => Some(p),
                Err(e) => {
                    problem(
                        at(raw.pattern.span()),
                        format!("field `pattern`: {}", e.message()),
                    );
                    None
                }
            };
            if let Some(p) = &pattern
                && let Some(d) = bus_domain_claimed(p)
            {
                problem(
                    at(raw.pattern.span()),
                    format!(
                        "field `pattern`: claims the `{d}` domain, which belongs to the bus itself (DLQ writer, redrive, replay control); name a literal domain other than dlq and control"
                    ),
                );
            }
            let tier = match raw.tier.get_ref().parse::<Tier>() {
                Ok(t) => t,
                Err(e) => {
                    problem(at(raw.tier.span()), format!("field `tier`: {e}"));
                    Tier::AtLeastOnceDedupe
                }
            };
            let days = *raw.retention_days.get_ref();
            if !(1..=MAX_RETENTION_DAYS).contains(&days) {
                problem(
                    at(raw.retention_days.span()),
                    format!(
                        "field `retention_days`: {days} is out of range (1 to {MAX_RETENTION_DAYS})"
                    ),
                );
            }
            let max_rate = raw.max_rate.as_ref().map(|r| *r.get_ref());
            if let Some(r) = &raw.max_rate
                && !(r.get_ref().is_finite() && *r.get_ref() > 0.0)
            {
                problem(
                    at(r.span()),
                    format!(
                        "field `max_rate`: {} is not a positive number of messages per second",
                        r.get_ref()
                    ),
                );
            }
            if let Some(why) = service_name_problem(raw.owner.get_ref()) {
                problem(at(raw.owner.span()), format!("field `owner`: {why}"));
            }
            if let Some(c) = &raw.consumers {
                for s in c.get_ref() {
                    if let Some(why) = service_name_problem(s) {
                        problem(at(c.span()), format!("field `consumers`: {s:?}: {why}"));
                    }
                }
            }
            if raw.schemas.get_ref().is_empty() {
                problem(
                    at(raw.schemas.span()),
                    "field `schemas`: empty; list at least one schema_fqdn".to_owned(),
                );
            }
            let Some(pattern) = pattern else { continue };
            let schemas_line = at(raw.schemas.span());
            entries.push(TopicEntry {
                pattern,
                owner: raw.owner.into_inner(),
                schemas: raw.schemas.get_ref().clone(),
                tier,
                retention_days: days.clamp(1, MAX_RETENTION_DAYS) as u32,
                max_rate: max_rate.filter(|r| r.is_finite() && *r > 0.0),
                consumers: raw.consumers.map(toml::Spanned::into_inner),
                description: raw.description,
                line,
                schemas_line,
            });
        }
        Ok(Registry {
            origin: origin.to_owned(),
            entries,
            load_problems: problems,
        })
    }

    /// The file the registry came from (as given).
    ///
    /// ```
    /// assert_eq!(ampybus::registry::Registry::parse("", "x.toml").unwrap().origin(), "x.toml");
    /// ```
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// The entries in file order.
    ///
    /// ```
    /// assert!(ampybus::registry::Registry::parse("", "x.toml").unwrap().entries().is_empty());
    /// ```
    pub fn entries(&self) -> &[TopicEntry] {
        &self.entries
    }

    /// The entry claiming a concrete topic (the first in file order; a valid registry has one
    /// owner per topic). `None` for an unclaimed topic.
    ///
    /// ```
    /// # let reg = ampybus::registry::Registry::parse(r#"
    /// # [[topic]]
    /// # pattern = "ampy.prod.fills.v1.>"
    /// # owner = "oms"
    /// # schemas = ["ampy.fills.v1.Fill"]
    /// # tier = "at_least_once_dedupe"
    /// # retention_days = 30
    /// # "#, "r.toml").unwrap();
    /// assert!(reg.entry_for("ampy.prod.fills.v1.a").is_some());
    /// assert!(reg.entry_for("ampy.dev.fills.v1.a").is_none());
    /// ```
    pub fn entry_for(&self, topic: &str) -> Option<&TopicEntry> {
        self.entries.iter().find(|e| e.pattern.matches(topic))
    }

    /// The tier of a topic's entry.
    ///
    /// ```
    /// let reg = ampybus::registry::Registry::parse("", "x.toml").unwrap();
    /// assert_eq!(reg.tier_for("ampy.dev.bars.v1.X"), None);
    /// ```
    pub fn tier_for(&self, topic: &str) -> Option<Tier> {
        self.entry_for(topic).map(|e| e.tier)
    }

    /// The retention of a topic's entry.
    ///
    /// ```
    /// let reg = ampybus::registry::Registry::parse("", "x.toml").unwrap();
    /// assert_eq!(reg.retention_for("ampy.dev.bars.v1.X"), None);
    /// ```
    pub fn retention_for(&self, topic: &str) -> Option<Duration> {
        self.entry_for(topic).map(TopicEntry::retention)
    }

    /// The longest retention of the entries that may match topics of one domain of an env
    /// (the unit a Redis stream, Kafka topic or embedded-log domain keeps): what a binding
    /// creating that unit applies. `env` is `dev`, `paper` or `prod`.
    ///
    /// ```
    /// # let reg = ampybus::registry::Registry::parse(r#"
    /// # [[topic]]
    /// # pattern = "ampy.*.fills.v1.>"
    /// # owner = "oms"
    /// # schemas = ["ampy.fills.v1.Fill"]
    /// # tier = "at_least_once_dedupe"
    /// # retention_days = 30
    /// # "#, "r.toml").unwrap();
    /// use ampybus::Domain;
    /// assert_eq!(reg.unit_retention("prod", Domain::Fills).unwrap().as_secs(), 30 * 86_400);
    /// assert_eq!(reg.unit_retention("prod", Domain::Bars), None);
    /// ```
    pub fn unit_retention(&self, env: &str, domain: Domain) -> Option<Duration> {
        let unit = TopicPattern::parse(&format!("ampy.{env}.{}.>", domain.as_str())).ok()?;
        self.entries
            .iter()
            .filter(|e| patterns_overlap(&e.pattern, &unit))
            .map(TopicEntry::retention)
            .max()
    }

    /// [`Registry::unit_retention`] of every env and domain some entry may match: what
    /// [`crate::Bus::connect_with_registry`] hands the binding.
    ///
    /// ```
    /// # let reg = ampybus::registry::Registry::parse(r#"
    /// # [[topic]]
    /// # pattern = "ampy.prod.fills.v1.>"
    /// # owner = "oms"
    /// # schemas = ["ampy.fills.v1.Fill"]
    /// # tier = "at_least_once_dedupe"
    /// # retention_days = 90
    /// # "#, "r.toml").unwrap();
    /// use ampybus::{Domain, Env};
    /// let r = reg.unit_retentions();
    /// assert_eq!(r.len(), 1);
    /// assert_eq!(r[&(Env::Prod, Domain::Fills)].as_secs(), 90 * 86_400);
    /// ```
    pub fn unit_retentions(&self) -> UnitRetention {
        let mut out = UnitRetention::new();
        for env in crate::topic::Env::ALL {
            for &domain in Domain::ALL {
                if let Some(d) = self.unit_retention(env.as_str(), domain) {
                    out.insert((env, domain), d);
                }
            }
        }
        out
    }

    /// Every service named (owners and consumers), sorted.
    ///
    /// ```
    /// # let reg = ampybus::registry::Registry::parse(r#"
    /// # [[topic]]
    /// # pattern = "ampy.*.fills.v1.>"
    /// # owner = "oms"
    /// # schemas = ["ampy.fills.v1.Fill"]
    /// # tier = "at_least_once_dedupe"
    /// # retention_days = 30
    /// # consumers = ["risk"]
    /// # "#, "r.toml").unwrap();
    /// assert_eq!(reg.services(), vec!["oms".to_string(), "risk".to_string()]);
    /// ```
    pub fn services(&self) -> Vec<String> {
        let mut set = BTreeSet::new();
        for e in &self.entries {
            set.insert(e.owner.clone());
            for c in e.consumers.iter().flatten() {
                set.insert(c.clone());
            }
        }
        set.into_iter().collect()
    }

    /// Refuses a publish outside the producer's claims: a topic owned by another service
    /// (naming the topic, the producer's service and the owner), a topic no entry claims, a
    /// schema not listed for the topic. Topics of the `dlq` and `control` domains are always
    /// allowed. Errors are of kind `Header` (naming `producer` or `schema_fqdn`) or `Topic`.
    ///
    /// ```
    /// # let reg = ampybus::registry::Registry::parse(r#"
    /// # [[topic]]
    /// # pattern = "ampy.*.orders.v1.>"
    /// # owner = "oms"
    /// # schemas = ["ampy.orders.v1.OrderRequest"]
    /// # tier = "at_least_once_dedupe"
    /// # retention_days = 30
    /// # "#, "r.toml").unwrap();
    /// use ampybus::Topic;
    /// let t = Topic::parse("ampy.dev.orders.v1.requests").unwrap();
    /// reg.check_publish(&t, Some("oms@h1"), Some("ampy.orders.v1.OrderRequest")).unwrap();
    /// let e = reg.check_publish(&t, Some("risk@h2"), Some("ampy.orders.v1.OrderRequest")).unwrap_err();
    /// assert!(e.to_string().contains("owned by `oms`"), "{e}");
    /// let dlq = Topic::parse("ampy.dev.dlq.v1.orders").unwrap();
    /// reg.check_publish(&dlq, Some("anyone@1"), Some("x.Y")).unwrap();
    /// ```
    pub fn check_publish(
        &self,
        topic: &Topic,
        producer: Option<&str>,
        schema: Option<&str>,
    ) -> Result<()> {
        if is_bus_domain(topic.domain()) {
            return Ok(());
        }
        let producer = producer.unwrap_or_default();
        let service = service_of(producer);
        let Some(entry) = self.entry_for(topic.as_str()) else {
            return Err(Error::new(
                ErrorKind::Topic,
                format!(
                    "topic {:?}: no entry of the registry {} claims it, so no service may publish it (producer {producer:?}, service `{service}`); add a [[topic]] entry",
                    topic.as_str(),
                    self.origin
                ),
            ));
        };
        if entry.owner != service {
            return Err(Error::new(
                ErrorKind::Header,
                format!(
                    "`producer`: service `{service}` (producer {producer:?}) may not publish topic {:?}: it is owned by `{}` (registry {}:{}, pattern {:?})",
                    topic.as_str(),
                    entry.owner,
                    self.origin,
                    entry.line,
                    entry.pattern.as_str()
                ),
            ));
        }
        let schema = schema.unwrap_or_default();
        if !entry.allows_schema(schema) {
            return Err(Error::new(
                ErrorKind::Header,
                format!(
                    "`schema_fqdn`: {schema:?} is not listed for topic {:?} (registry {}:{}, pattern {:?}, schemas: {})",
                    topic.as_str(),
                    self.origin,
                    entry.line,
                    entry.pattern.as_str(),
                    entry.schemas.join(", ")
                ),
            ));
        }
        Ok(())
    }

    /// Refuses a subscription pattern `service` may not read: one that may match topics of an
    /// entry whose `consumers` leave the service out (the error names the entry, its owner and
    /// its consumers). Kind `Config`.
    ///
    /// ```
    /// # let reg = ampybus::registry::Registry::parse(r#"
    /// # [[topic]]
    /// # pattern = "ampy.*.orders.v1.>"
    /// # owner = "oms"
    /// # schemas = ["ampy.orders.v1.OrderRequest"]
    /// # tier = "at_least_once_dedupe"
    /// # retention_days = 30
    /// # consumers = ["risk"]
    /// # "#, "r.toml").unwrap();
    /// use ampybus::TopicPattern;
    /// let p = |s| TopicPattern::parse(s).unwrap();
    /// reg.check_subscribe("risk", &p("ampy.prod.orders.>")).unwrap();
    /// reg.check_subscribe("ui", &p("ampy.prod.bars.>")).unwrap();
    /// let e = reg.check_subscribe("ui", &p("ampy.prod.>")).unwrap_err();
    /// assert!(e.to_string().contains("may not read"), "{e}");
    /// ```
    pub fn check_subscribe(&self, service: &str, pattern: &TopicPattern) -> Result<()> {
        for e in &self.entries {
            if !e.may_read(service) && patterns_overlap(&e.pattern, pattern) {
                return Err(Error::new(
                    ErrorKind::Config,
                    format!(
                        "service `{service}` may not read pattern {:?}: it overlaps {:?} (registry {}:{}, owner `{}`), readable by {}",
                        pattern.as_str(),
                        e.pattern.as_str(),
                        self.origin,
                        e.line,
                        e.owner,
                        e.readers().join(", ")
                    ),
                ));
            }
        }
        Ok(())
    }
}

impl TopicEntry {
    /// The owner then the listed consumers (`any service` when the list is absent).
    fn readers(&self) -> Vec<String> {
        match &self.consumers {
            None => vec!["any service".to_owned()],
            Some(c) => std::iter::once(self.owner.clone())
                .chain(c.iter().filter(|s| **s != self.owner).cloned())
                .collect(),
        }
    }
}

/// Reads a TOML file into `T` with the registry's error rules (an unreadable file, bad TOML,
/// an unknown or missing field: an error naming the file, the line and the field); used for
/// the CLI's `ampybus.toml` too.
///
/// ```
/// #[derive(Debug, serde::Deserialize)]
/// #[serde(deny_unknown_fields)]
/// struct Conf { url: Option<String> }
/// let dir = tempfile::tempdir().unwrap();
/// let path = dir.path().join("ampybus.toml");
/// std::fs::write(&path, "url = \"./data\"\nulr = 1\n").unwrap();
/// let e = ampybus::registry::load_toml::<Conf>(&path).unwrap_err();
/// assert!(e.to_string().ends_with(":2: unknown field `ulr`, expected `url`"), "{e}");
/// ```
pub fn load_toml<T: serde::de::DeserializeOwned>(
    path: &Path,
) -> std::result::Result<T, RegistryError> {
    let text = file::read(path)?;
    file::parse(&text, &path.display().to_string())
}

/// The service of a `producer` header: the part before `@` (`oms@host-1` → `oms`).
///
/// ```
/// assert_eq!(ampybus::registry::service_of("oms@host-1"), "oms");
/// assert_eq!(ampybus::registry::service_of("oms"), "oms");
/// ```
pub fn service_of(producer: &str) -> &str {
    producer.split_once('@').map_or(producer, |(s, _)| s)
}

/// Whether some topic matches both patterns (token by token: `*` matches any one token, `>`
/// one or more).
///
/// ```
/// use ampybus::{TopicPattern, registry::patterns_overlap};
/// let p = |s| TopicPattern::parse(s).unwrap();
/// assert!(patterns_overlap(&p("ampy.*.orders.v1.>"), &p("ampy.prod.orders.v1.requests")));
/// assert!(!patterns_overlap(&p("ampy.prod.orders.>"), &p("ampy.dev.orders.>")));
/// assert!(!patterns_overlap(&p("ampy.prod.bars.v1.*"), &p("ampy.prod.bars.v1.a.b")));
/// ```
pub fn patterns_overlap(a: &TopicPattern, b: &TopicPattern) -> bool {
    let a: Vec<&str> = a.as_str().split('.').collect();
    let b: Vec<&str> = b.as_str().split('.').collect();
    for i in 0.. {
        match (a.get(i), b.get(i)) {
            (None, None) => return true,
            (Some(&">"), Some(_)) | (Some(_), Some(&">")) => return true,
            (None, Some(_)) | (Some(_), None) => return false,
            (Some(x), Some(y)) => {
                if *x != "*" && *y != "*" && x != y {
                    return false;
                }
            }
        }
    }
    unreachable!("the loop returns")
}

/// Whether a domain belongs to the bus (`dlq`, `control`): unclaimable, open to every service.
///
/// ```
/// use ampybus::{Domain, registry::is_bus_domain};
/// assert!(is_bus_domain(Domain::Dlq) && is_bus_domain(Domain::Control));
/// assert!(!is_bus_domain(Domain::Orders));
/// ```
pub fn is_bus_domain(d: Domain) -> bool {
    matches!(d, Domain::Dlq | Domain::Control)
}

/// The bus domain (`dlq` or `control`) a pattern may match, if any.
fn bus_domain_claimed(p: &TopicPattern) -> Option<&'static str> {
    ["dlq", "control"].into_iter().find(|d| {
        let probe = TopicPattern::parse(&format!("ampy.*.{d}.>")).expect("valid probe");
        patterns_overlap(p, &probe)
    })
}

/// Why a service name is unusable (also as a NATS/Redis/Kafka user name), if it is.
fn service_name_problem(s: &str) -> Option<&'static str> {
    if s.is_empty() {
        Some("empty service name")
    } else if !s
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        Some("a service name may hold only ASCII letters, digits, `-`, `_` and `.`")
    } else {
        None
    }
}

/// Retention per env and domain from a topic registry
/// ([`Registry::unit_retentions`]; also `ampybus::transport::UnitRetention`): what a binding applies to the stream,
/// topic or log domain of that unit when it creates (or trims) it, before its own `max_age`.
///
/// ```
/// use ampybus::{Domain, Env, registry::UnitRetention};
/// use std::time::Duration;
/// let mut r = UnitRetention::new();
/// r.insert((Env::Prod, Domain::Orders), Duration::from_secs(90 * 86_400));
/// assert_eq!(r.len(), 1);
/// ```
pub type UnitRetention =
    std::collections::HashMap<(crate::topic::Env, crate::topic::Domain), std::time::Duration>;

#[cfg(test)]
mod tests {
    use super::*;

    const ORDERS: &str = r#"
[[topic]]
pattern   = "ampy.*.orders.v1.>"
owner     = "oms"
schemas   = ["ampy.orders.v1.OrderRequest"]
tier      = "at_least_once_dedupe"
retention_days = 30
max_rate  = 5000
consumers = ["risk", "audit"]
description = "Order requests from the OMS"
"#;

    #[test]
    fn the_issue_example_parses_exactly() {
        let reg = Registry::parse(ORDERS, "r.toml").unwrap();
        let e = &reg.entries()[0];
        assert_eq!(e.pattern.as_str(), "ampy.*.orders.v1.>");
        assert_eq!(e.owner, "oms");
        assert_eq!(e.schemas, vec!["ampy.orders.v1.OrderRequest"]);
        assert_eq!(e.tier, Tier::AtLeastOnceDedupe);
        assert_eq!(e.retention_days, 30);
        assert_eq!(e.max_rate, Some(5000.0));
        assert_eq!(
            e.consumers.as_deref(),
            Some(&["risk".to_string(), "audit".to_string()][..])
        );
        assert_eq!(
            e.description.as_deref(),
            Some("Order requests from the OMS")
        );
        assert_eq!(e.line, 2);
    }

    #[test]
    fn overlap_cases() {
        let p = |s| TopicPattern::parse(s).unwrap();
        assert!(patterns_overlap(&p(">"), &p("ampy.dev.bars.v1.X")));
        assert!(patterns_overlap(
            &p("ampy.*.bars.>"),
            &p("ampy.prod.*.v1.>")
        ));
        assert!(!patterns_overlap(
            &p("ampy.prod.bars.v1.X"),
            &p("ampy.prod.bars.v1.X.>")
        ));
        assert!(patterns_overlap(
            &p("ampy.prod.bars.v1.X.*"),
            &p("ampy.prod.bars.v1.X.>")
        ));
        assert!(patterns_overlap(
            &p("ampy.*.bars.v1.X"),
            &p("ampy.paper.bars.v1.*")
        ));
    }

    #[test]
    fn publish_refusals_name_topic_service_and_owner() {
        let reg = Registry::parse(ORDERS, "r.toml").unwrap();
        let t = Topic::parse("ampy.dev.orders.v1.requests").unwrap();
        let e = reg
            .check_publish(&t, Some("risk@h2"), Some("ampy.orders.v1.OrderRequest"))
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Header);
        assert_eq!(
            e.message(),
            "`producer`: service `risk` (producer \"risk@h2\") may not publish topic \"ampy.dev.orders.v1.requests\": it is owned by `oms` (registry r.toml:2, pattern \"ampy.*.orders.v1.>\")"
        );
        let e = reg
            .check_publish(&t, Some("oms@h1"), Some("ampy.raw.v1.Bytes"))
            .unwrap_err();
        assert_eq!(
            e.message(),
            "`schema_fqdn`: \"ampy.raw.v1.Bytes\" is not listed for topic \"ampy.dev.orders.v1.requests\" (registry r.toml:2, pattern \"ampy.*.orders.v1.>\", schemas: ampy.orders.v1.OrderRequest)"
        );
        let bars = Topic::parse("ampy.dev.bars.v1.XNAS.AAPL").unwrap();
        let e = reg
            .check_publish(&bars, Some("md@1"), Some("ampy.bars.v1.BarBatch"))
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Topic);
        assert!(
            e.message()
                .contains("no entry of the registry r.toml claims it")
        );
    }

    #[test]
    fn bad_values_are_problems_naming_field_and_line() {
        let text = r#"[[topic]]
pattern = "ampy.*.orders.v1.>"
owner = "oms"
schemas = ["ampy.orders.v1.OrderRequest"]
tier = "exactly_once"
retention_days = 0
max_rate = -1

[[topic]]
pattern = "ampy.*.control.>"
owner = "bad owner"
schemas = []
tier = "best_effort"
retention_days = 7
"#;
        let reg = Registry::parse_unchecked(text, "r.toml").unwrap();
        let lines: Vec<String> = reg.check(&|_| true).iter().map(|f| f.to_string()).collect();
        assert_eq!(
            lines,
            vec![
                "r.toml:5: entry \"ampy.*.orders.v1.>\": field `tier`: \"exactly_once\" is not a tier (best_effort | at_least_once | at_least_once_dedupe)",
                "r.toml:6: entry \"ampy.*.orders.v1.>\": field `retention_days`: 0 is out of range (1 to 36500)",
                "r.toml:7: entry \"ampy.*.orders.v1.>\": field `max_rate`: -1 is not a positive number of messages per second",
                "r.toml:10: entry \"ampy.*.control.>\": field `pattern`: claims the `control` domain, which belongs to the bus itself (DLQ writer, redrive, replay control); name a literal domain other than dlq and control",
                "r.toml:11: entry \"ampy.*.control.>\": field `owner`: a service name may hold only ASCII letters, digits, `-`, `_` and `.`",
                "r.toml:12: entry \"ampy.*.control.>\": field `schemas`: empty; list at least one schema_fqdn",
            ]
        );
        let err = Registry::parse(text, "r.toml").unwrap_err();
        assert_eq!(err.kind(), RegistryErrorKind::Invalid);
    }

    #[test]
    fn missing_field_is_a_parse_error() {
        let e =
            Registry::parse("[[topic]]\npattern = \"ampy.*.bars.v1.>\"\n", "r.toml").unwrap_err();
        assert_eq!(e.kind(), RegistryErrorKind::Parse);
        assert!(e.to_string().contains("missing field `owner`"), "{e}");
        assert!(e.to_string().starts_with("r.toml:1: "), "{e}");
    }
}
