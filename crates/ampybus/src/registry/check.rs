//! The rules of `ampybus registry check`: overlapping owners, unknown schemas, bad values,
//! claims on the bus's own domains, units shared by entries with different settings, and
//! manifests that step outside the registry.

use super::file::{self, RawManifest};
use super::{RAW_SCHEMA, Registry, RegistryError, patterns_overlap};
use crate::topic::TopicPattern;
use std::fmt;
use std::path::Path;

/// How serious a [`Finding`] is.
///
/// ```
/// assert_ne!(ampybus::registry::Severity::Error, ampybus::registry::Severity::Warning);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    /// The check fails.
    Error,
    /// Reported; the check still passes.
    Warning,
}

/// One problem found by a check: file, line, the entry (its pattern), and what is wrong.
///
/// ```
/// use ampybus::registry::Registry;
/// let reg = Registry::parse_unchecked(r#"
/// [[topic]]
/// pattern = "ampy.*.bars.v1.>"
/// owner = "md"
/// schemas = ["ampy.bars.v1.Nope"]
/// tier = "at_least_once"
/// retention_days = 7
/// "#, "r.toml").unwrap();
/// let f = &reg.check(&|s| s == "ampy.bars.v1.BarBatch")[0];
/// assert_eq!(f.to_string(), "r.toml:5: entry \"ampy.*.bars.v1.>\": schema \"ampy.bars.v1.Nope\" is unknown to ampybus-proto (and not ampy.raw.v1.Bytes)");
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// Error or warning.
    pub severity: Severity,
    /// The file.
    pub file: String,
    /// The 1-based line, when known.
    pub line: Option<usize>,
    /// The entry: its pattern (`[[publishes]] …` / `[[consumes]] …` in a manifest).
    pub entry: String,
    /// What is wrong.
    pub message: String,
}

impl Finding {
    pub(crate) fn error(file: &str, line: Option<usize>, entry: &str, message: String) -> Finding {
        Finding {
            severity: Severity::Error,
            file: file.to_owned(),
            line,
            entry: entry.to_owned(),
            message,
        }
    }

    fn warning(file: &str, line: Option<usize>, entry: &str, message: String) -> Finding {
        Finding {
            severity: Severity::Warning,
            ..Finding::error(file, line, entry, message)
        }
    }
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.file)?;
        if let Some(l) = self.line {
            write!(f, ":{l}")?;
        }
        if self.severity == Severity::Warning {
            f.write_str(": warning")?;
        }
        write!(f, ": entry {:?}: {}", self.entry, self.message)
    }
}

/// The Redis stream / Kafka topic / embedded domain an entry's topics live in: the env,
/// domain and version tokens (`>` spreading over the rest).
fn unit_of(p: &TopicPattern) -> Vec<&str> {
    let toks: Vec<&str> = p.as_str().split('.').collect();
    let mut unit = Vec::with_capacity(4);
    for t in toks.iter().take(4) {
        unit.push(*t);
        if *t == ">" {
            break;
        }
    }
    unit
}

fn units_overlap(a: &[&str], b: &[&str]) -> bool {
    let pad = |u: &[&str]| {
        if u.len() == 4 || u.last() == Some(&">") {
            format!("{}.>", u.join(".")).replace(">.>", ">")
        } else {
            u.join(".")
        }
    };
    match (TopicPattern::parse(&pad(a)), TopicPattern::parse(&pad(b))) {
        (Ok(x), Ok(y)) => patterns_overlap(&x, &y),
        _ => false,
    }
}

impl Registry {
    /// Every problem of the registry, in file order of the first entry involved: values
    /// that break a rule (pattern, tier, retention, max_rate, names, a claim on `dlq` or
    /// `control`), two owners whose patterns overlap (naming both patterns, owners and
    /// lines; a wildcard env overlaps every literal one), a schema `known` rejects (other
    /// than `ampy.raw.v1.Bytes`); and, as warnings, entries with different tier or retention
    /// that share a Redis stream / Kafka topic (one per `ampy.{env}.{domain}.{version}`).
    ///
    /// ```
    /// use ampybus::registry::{Registry, Severity};
    /// let reg = Registry::parse_unchecked(r#"
    /// [[topic]]
    /// pattern = "ampy.*.orders.v1.>"
    /// owner = "oms"
    /// schemas = ["ampy.orders.v1.OrderRequest"]
    /// tier = "at_least_once_dedupe"
    /// retention_days = 30
    ///
    /// [[topic]]
    /// pattern = "ampy.prod.orders.v1.algo"
    /// owner = "algo"
    /// schemas = ["ampy.orders.v1.OrderRequest"]
    /// tier = "at_least_once_dedupe"
    /// retention_days = 30
    /// "#, "r.toml").unwrap();
    /// let found = reg.check(&|_| true);
    /// assert_eq!(found.len(), 1);
    /// assert_eq!(found[0].severity, Severity::Error);
    /// assert!(found[0].message.contains("`oms`") && found[0].message.contains("`algo`"));
    /// ```
    pub fn check(&self, known: &dyn Fn(&str) -> bool) -> Vec<Finding> {
        let mut out = self.load_problems.clone();
        let origin = &self.origin;
        for (i, a) in self.entries.iter().enumerate() {
            for b in &self.entries[i + 1..] {
                if !patterns_overlap(&a.pattern, &b.pattern) {
                    continue;
                }
                if a.owner != b.owner {
                    out.push(Finding::error(
                        origin,
                        Some(a.line),
                        a.pattern.as_str(),
                        format!(
                            "overlaps {:?} (line {}): owner `{}` and owner `{}` would both publish the topics both patterns match; one owner per topic",
                            b.pattern.as_str(),
                            b.line,
                            a.owner,
                            b.owner
                        ),
                    ));
                } else {
                    out.push(Finding::warning(
                        origin,
                        Some(a.line),
                        a.pattern.as_str(),
                        format!(
                            "overlaps {:?} (line {}) of the same owner `{}`: the first entry in file order decides",
                            b.pattern.as_str(),
                            b.line,
                            a.owner
                        ),
                    ));
                }
            }
            for s in &a.schemas {
                if s != RAW_SCHEMA && !known(s) {
                    out.push(Finding::error(
                        origin,
                        Some(a.schemas_line),
                        a.pattern.as_str(),
                        format!("schema {s:?} is unknown to ampybus-proto (and not {RAW_SCHEMA})"),
                    ));
                }
            }
        }
        for (i, a) in self.entries.iter().enumerate() {
            for b in &self.entries[i + 1..] {
                if (a.tier, a.retention_days) == (b.tier, b.retention_days)
                    || !units_overlap(&unit_of(&a.pattern), &unit_of(&b.pattern))
                {
                    continue;
                }
                out.push(Finding::warning(
                    origin,
                    Some(a.line),
                    a.pattern.as_str(),
                    format!(
                        "shares a Redis stream / Kafka topic ({}) with {:?} (line {}) but not its settings (tier {} vs {}, retention_days {} vs {}): the unit gets the longest retention and the ACL of both; the library still enforces per topic",
                        unit_of(&a.pattern).join("."),
                        b.pattern.as_str(),
                        b.line,
                        a.tier,
                        b.tier,
                        a.retention_days,
                        b.retention_days
                    ),
                ));
            }
        }
        out.sort_by_key(|f| f.line);
        out
    }

    /// Checks a service manifest against the registry: every `[[publishes]]` pattern must lie
    /// within an entry the service owns, with its schema listed there; every `[[consumes]]`
    /// pattern must be readable by the service ([`Registry::check_subscribe`]) and its
    /// schema, when given, listed by an entry the pattern overlaps.
    ///
    /// ```
    /// use ampybus::registry::{Manifest, Registry};
    /// let reg = Registry::parse(r#"
    /// [[topic]]
    /// pattern = "ampy.*.orders.v1.>"
    /// owner = "oms"
    /// schemas = ["ampy.orders.v1.OrderRequest"]
    /// tier = "at_least_once_dedupe"
    /// retention_days = 30
    /// "#, "r.toml").unwrap();
    /// let m = Manifest::parse(r#"
    /// service = "risk"
    /// [[publishes]]
    /// pattern = "ampy.prod.orders.v1.>"
    /// schema = "ampy.orders.v1.OrderRequest"
    /// "#, "risk.toml").unwrap();
    /// let found = reg.check_manifest(&m);
    /// assert_eq!(found[0].to_string(), "risk.toml:3: entry \"[[publishes]] ampy.prod.orders.v1.>\": service `risk` publishes outside its claims: the pattern is not within an entry it owns (\"ampy.*.orders.v1.>\" belongs to `oms`)");
    /// ```
    pub fn check_manifest(&self, m: &Manifest) -> Vec<Finding> {
        let mut out = Vec::new();
        for (table, claims, publishes) in [
            ("publishes", &m.publishes, true),
            ("consumes", &m.consumes, false),
        ] {
            for c in claims {
                let problem = match &c.pattern {
                    None => Some(c.pattern_error.clone()),
                    Some(p) if publishes => self.publish_claim_problem(&m.service, p, c),
                    Some(p) => self.consume_claim_problem(&m.service, p, c),
                };
                if let Some(message) = problem {
                    let entry = format!("[[{table}]] {}", c.pattern_text);
                    out.push(Finding::error(&m.origin, Some(c.line), &entry, message));
                }
            }
        }
        out
    }

    /// What is wrong with `service` publishing on `p` (with the claim's schema), if anything.
    fn publish_claim_problem(&self, service: &str, p: &TopicPattern, c: &Claim) -> Option<String> {
        let Some(e) = self
            .entries
            .iter()
            .find(|e| e.owner == service && p.is_within(&e.pattern))
        else {
            let others: Vec<String> = self
                .entries
                .iter()
                .filter(|e| patterns_overlap(&e.pattern, p))
                .map(|e| format!("{:?} belongs to `{}`", e.pattern.as_str(), e.owner))
                .collect();
            let why = if others.is_empty() {
                "no entry claims it".to_owned()
            } else {
                others.join(", ")
            };
            return Some(format!(
                "service `{service}` publishes outside its claims: the pattern is not within an entry it owns ({why})"
            ));
        };
        let s = c.schema.as_ref().filter(|s| !e.allows_schema(s))?;
        Some(format!(
            "schema {s:?} is not listed by {:?} (schemas: {})",
            e.pattern.as_str(),
            e.schemas.join(", ")
        ))
    }

    /// What is wrong with `service` consuming `p` (with the claim's schema), if anything.
    fn consume_claim_problem(&self, service: &str, p: &TopicPattern, c: &Claim) -> Option<String> {
        if let Err(e) = self.check_subscribe(service, p) {
            return Some(e.message().to_owned());
        }
        let s = c.schema.as_ref()?;
        let listed = self
            .entries
            .iter()
            .filter(|e| patterns_overlap(&e.pattern, p))
            .any(|e| e.allows_schema(s));
        (!listed).then(|| format!("schema {s:?} is not listed by any entry the pattern overlaps"))
    }
}

/// A `[[publishes]]` / `[[consumes]]` line of a manifest.
///
/// ```
/// let m = ampybus::registry::Manifest::parse(
///     "service = \"oms\"\n[[publishes]]\npattern = \"ampy.prod.orders.v1.>\"\nschema = \"ampy.orders.v1.OrderRequest\"\n",
///     "oms.toml",
/// ).unwrap();
/// let c = &m.publishes[0];
/// assert_eq!((c.pattern_text.as_str(), c.line), ("ampy.prod.orders.v1.>", 2));
/// assert_eq!(c.schema.as_deref(), Some("ampy.orders.v1.OrderRequest"));
/// ```
#[derive(Debug, Clone)]
pub struct Claim {
    /// The pattern as written.
    pub pattern_text: String,
    /// The parsed pattern (`None` when it does not parse; see `pattern_error`).
    pub pattern: Option<TopicPattern>,
    pattern_error: String,
    /// The schema, when given.
    pub schema: Option<String>,
    /// The line of the claim's table header.
    pub line: usize,
}

/// A service manifest (seed 003): `service = "…"` with `[[publishes]]` and `[[consumes]]`
/// entries (`pattern`, `schema`), checked by [`Registry::check_manifest`].
///
/// ```
/// let m = ampybus::registry::Manifest::parse("service = \"risk\"\n[[consumes]]\npattern = \"ampy.prod.orders.>\"\n", "risk.toml").unwrap();
/// assert_eq!((m.service.as_str(), m.consumes.len()), ("risk", 1));
/// ```
#[derive(Debug, Clone)]
pub struct Manifest {
    /// The file.
    pub origin: String,
    /// The service the manifest speaks for.
    pub service: String,
    /// What it publishes.
    pub publishes: Vec<Claim>,
    /// What it consumes.
    pub consumes: Vec<Claim>,
}

impl Manifest {
    /// Reads a manifest file (errors as for [`Registry::load`]).
    ///
    /// ```
    /// let e = ampybus::registry::Manifest::load(std::path::Path::new("/nonexistent.toml")).unwrap_err();
    /// assert!(e.to_string().starts_with("/nonexistent.toml: cannot read"), "{e}");
    /// ```
    pub fn load(path: &Path) -> Result<Manifest, RegistryError> {
        let text = file::read(path)?;
        Manifest::parse(&text, &path.display().to_string())
    }

    /// Parses a manifest; `origin` names the file in errors.
    ///
    /// ```
    /// let e = ampybus::registry::Manifest::parse("service = \"x\"\n[[publish]]\n", "m.toml").unwrap_err();
    /// assert!(e.to_string().contains("unknown field `publish`"), "{e}");
    /// ```
    pub fn parse(text: &str, origin: &str) -> Result<Manifest, RegistryError> {
        let raw: RawManifest = file::parse(text, origin)?;
        let claims = |list: Vec<toml::Spanned<file::RawClaim>>| -> Vec<Claim> {
            list.into_iter()
                .map(|c| {
                    let line = file::line_of(text, c.span().start);
                    let c = c.into_inner();
                    let (pattern, pattern_error) = match TopicPattern::parse(c.pattern.get_ref()) {
                        Ok(p) => (Some(p), String::new()),
                        Err(e) => (None, format!("field `pattern`: {}", e.message())),
                    };
                    Claim {
                        pattern_text: c.pattern.into_inner(),
                        pattern,
                        pattern_error,
                        schema: c.schema.map(toml::Spanned::into_inner),
                        line,
                    }
                })
                .collect()
        };
        Ok(Manifest {
            origin: origin.to_owned(),
            service: raw.service.into_inner(),
            publishes: claims(raw.publishes),
            consumes: claims(raw.consumes),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn texts(found: &[Finding]) -> Vec<String> {
        found.iter().map(|f| f.to_string()).collect()
    }

    fn entry(pattern: &str, owner: &str, tier: &str, days: u32) -> String {
        format!(
            "[[topic]]\npattern = \"{pattern}\"\nowner = \"{owner}\"\nschemas = [\"ampy.raw.v1.Bytes\"]\ntier = \"{tier}\"\nretention_days = {days}\n\n"
        )
    }

    #[test]
    fn wildcard_env_overlaps_literal_env() {
        let text = entry("ampy.*.orders.v1.>", "oms", "at_least_once", 30)
            + &entry("ampy.prod.orders.v1.requests", "algo", "at_least_once", 30);
        let reg = Registry::parse_unchecked(&text, "r.toml").unwrap();
        let lines = texts(&reg.check(&|_| false));
        assert_eq!(
            lines,
            vec![
                "r.toml:1: entry \"ampy.*.orders.v1.>\": overlaps \"ampy.prod.orders.v1.requests\" (line 8): owner `oms` and owner `algo` would both publish the topics both patterns match; one owner per topic"
            ]
        );
    }

    #[test]
    fn shared_unit_with_different_settings_warns() {
        let text = entry("ampy.prod.ticks.v1.trade.>", "md", "at_least_once", 7)
            + &entry("ampy.prod.ticks.v1.quote.>", "md", "best_effort", 1)
            + &entry("ampy.dev.ticks.v1.quote.>", "md", "best_effort", 1);
        let reg = Registry::parse_unchecked(&text, "r.toml").unwrap();
        let found = reg.check(&|_| true);
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].severity, Severity::Warning);
        assert_eq!(
            found[0].to_string(),
            "r.toml:1: warning: entry \"ampy.prod.ticks.v1.trade.>\": shares a Redis stream / Kafka topic (ampy.prod.ticks.v1) with \"ampy.prod.ticks.v1.quote.>\" (line 8) but not its settings (tier at_least_once vs best_effort, retention_days 7 vs 1): the unit gets the longest retention and the ACL of both; the library still enforces per topic"
        );
    }

    #[test]
    fn manifests_outside_claims() {
        let text = entry("ampy.*.orders.v1.>", "oms", "at_least_once", 30).replace(
            "retention_days = 30\n",
            "retention_days = 30\nconsumers = [\"risk\"]\n",
        );
        let reg = Registry::parse(&text, "r.toml").unwrap();
        let m = Manifest::parse(
            "service = \"oms\"\n[[publishes]]\npattern = \"ampy.prod.orders.v1.>\"\nschema = \"ampy.orders.v1.Nope\"\n\n[[consumes]]\npattern = \"ampy.prod.orders.>\"\n",
            "oms.toml",
        )
        .unwrap();
        let lines = texts(&reg.check_manifest(&m));
        assert_eq!(
            lines,
            vec![
                "oms.toml:2: entry \"[[publishes]] ampy.prod.orders.v1.>\": schema \"ampy.orders.v1.Nope\" is not listed by \"ampy.*.orders.v1.>\" (schemas: ampy.raw.v1.Bytes)"
            ]
        );
        let ui = Manifest::parse(
            "service = \"ui\"\n[[consumes]]\npattern = \"ampy.prod.>\"\n",
            "ui.toml",
        )
        .unwrap();
        let lines = texts(&reg.check_manifest(&ui));
        assert_eq!(
            lines,
            vec![
                "ui.toml:2: entry \"[[consumes]] ampy.prod.>\": service `ui` may not read pattern \"ampy.prod.>\": it overlaps \"ampy.*.orders.v1.>\" (registry r.toml:1, owner `oms`), readable by oms, risk"
            ]
        );
    }
}
