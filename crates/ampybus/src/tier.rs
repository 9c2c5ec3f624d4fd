//! Durability tiers per topic pattern (DESIGN §2): which [`Tier`] a topic or a subscription
//! pattern has on a [`Bus`](crate::Bus), and publishing a batch by tier.
//!
//! Sources, strongest first: the bus's [registry](crate::registry) (the entry whose pattern
//! matches the topic, or covers the subscription pattern), then the patterns given with
//! [`Bus::with_tier`](crate::Bus::with_tier) (the last one added that matches wins), then the default
//! [`Tier::AtLeastOnceDedupe`]. Best-effort is never a default: only an explicit entry makes a
//! topic best-effort.
//!
//! A tier changes what is promised, never where a message goes: on every transport a
//! best-effort and an at-least-once publish of a topic land on the same subject / stream /
//! topic, so a producer and a consumer that disagree on a topic's tier still meet (on NATS a
//! core publish is stored by the JetStream stream that captures its subject, and a core
//! subscriber receives JetStream publishes of its subjects).
//!
//! ```
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! use ampybus::{Bus, Topic, TopicPattern, tier::Tier};
//! let dir = tempfile::tempdir().unwrap();
//! let bus = Bus::connect(dir.path().to_str().unwrap()).await.unwrap()
//!     .with_tier(TopicPattern::parse("ampy.*.ticks.v1.quote.>").unwrap(), Tier::BestEffort);
//! let quote = Topic::parse("ampy.prod.ticks.v1.quote.MSFT").unwrap();
//! let trade = Topic::parse("ampy.prod.ticks.v1.trade.MSFT").unwrap();
//! assert_eq!(bus.tier_of(&quote), Tier::BestEffort);
//! assert_eq!(bus.tier_of(&trade), Tier::AtLeastOnceDedupe);
//! # });
//! ```

use crate::registry::Registry;
use crate::topic::TopicPattern;

pub use crate::registry::Tier;

/// Where a tier came from (what `ampybus topics describe` shows).
///
/// ```
/// assert_eq!(ampybus::tier::TierSource::Default.as_str(), "default");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TierSource {
    /// A registry entry.
    Registry,
    /// [`Bus::with_tier`](crate::Bus::with_tier) (the CLI's `--tier`).
    Builder,
    /// Nothing set: [`Tier::AtLeastOnceDedupe`].
    Default,
}

impl TierSource {
    /// `registry`, `builder` or `default`.
    ///
    /// ```
    /// assert_eq!(ampybus::tier::TierSource::Registry.as_str(), "registry");
    /// ```
    pub fn as_str(self) -> &'static str {
        match self {
            TierSource::Registry => "registry",
            TierSource::Builder => "builder",
            TierSource::Default => "default",
        }
    }
}

/// The tiers set with [`Bus::with_tier`](crate::Bus::with_tier), in the order given.
///
/// ```
/// use ampybus::{TopicPattern, tier::{Tier, TierTable}};
/// let mut t = TierTable::default();
/// t.push(TopicPattern::parse("ampy.dev.ticks.>").unwrap(), Tier::BestEffort);
/// assert!(t.any_best_effort());
/// assert_eq!(t.tier_for("ampy.dev.ticks.v1.quote.X"), Some(Tier::BestEffort));
/// assert_eq!(t.tier_for("ampy.dev.bars.v1.X"), None);
/// ```
#[derive(Debug, Clone, Default)]
pub struct TierTable {
    entries: Vec<(TopicPattern, Tier)>,
}

impl TierTable {
    /// Adds a pattern; a later pattern beats an earlier one where both match.
    pub fn push(&mut self, pattern: TopicPattern, tier: Tier) {
        self.entries.push((pattern, tier));
    }

    /// Whether some pattern is best-effort.
    pub fn any_best_effort(&self) -> bool {
        self.entries.iter().any(|(_, t)| *t == Tier::BestEffort)
    }

    /// The tier of a concrete topic, when a pattern matches it.
    pub fn tier_for(&self, topic: &str) -> Option<Tier> {
        self.entries
            .iter()
            .rev()
            .find(|(p, _)| p.matches(topic))
            .map(|(_, t)| *t)
    }

    /// The tier of the last pattern that covers every topic `pattern` can match.
    ///
    /// ```
    /// use ampybus::{TopicPattern, tier::{Tier, TierTable}};
    /// let p = |s| TopicPattern::parse(s).unwrap();
    /// let mut t = TierTable::default();
    /// t.push(p("ampy.dev.ticks.v1.quote.>"), Tier::BestEffort);
    /// assert_eq!(t.tier_covering(&p("ampy.dev.ticks.v1.quote.*")), Some(Tier::BestEffort));
    /// assert_eq!(t.tier_covering(&p("ampy.dev.ticks.>")), None);
    /// ```
    pub fn tier_covering(&self, pattern: &TopicPattern) -> Option<Tier> {
        self.entries
            .iter()
            .rev()
            .find(|(p, _)| covers(p, pattern))
            .map(|(_, t)| *t)
    }
}

/// Whether every topic `inner` can match is matched by `outer`.
///
/// ```
/// use ampybus::{TopicPattern, tier::covers};
/// let p = |s| TopicPattern::parse(s).unwrap();
/// assert!(covers(&p("ampy.*.ticks.>"), &p("ampy.dev.ticks.v1.quote.*")));
/// assert!(covers(&p(">"), &p("ampy.dev.>")));
/// assert!(!covers(&p("ampy.dev.ticks.v1.quote.>"), &p("ampy.dev.ticks.>")));
/// assert!(!covers(&p("ampy.dev.*.v1.*"), &p("ampy.dev.>")));
/// assert!(!covers(&p("ampy.dev.ticks.v1.*"), &p("ampy.dev.ticks.v1.>")));
/// assert!(covers(&p("ampy.dev.bars.v1.X"), &p("ampy.dev.bars.v1.X")));
/// ```
pub fn covers(outer: &TopicPattern, inner: &TopicPattern) -> bool {
    let mut o = outer.as_str().split('.');
    let mut i = inner.as_str().split('.');
    loop {
        match (o.next(), i.next()) {
            (None, None) => return true,
            (Some(">"), Some(_)) => return true,
            (Some("*"), Some(t)) if t != ">" => {}
            (Some(a), Some(b)) if a == b && a != ">" && a != "*" => {}
            _ => return false,
        }
    }
}

/// The tier of a topic: registry, then `table`, then the default.
pub(crate) fn of_topic(
    registry: Option<&Registry>,
    table: &TierTable,
    topic: &str,
) -> (Tier, TierSource) {
    if let Some(t) = registry.and_then(|r| r.tier_for(topic)) {
        return (t, TierSource::Registry);
    }
    match table.tier_for(topic) {
        Some(t) => (t, TierSource::Builder),
        None => (Tier::AtLeastOnceDedupe, TierSource::Default),
    }
}

/// The tier of a subscription pattern: the registry entry covering it, then `explicit` (the
/// subscriber's own choice), then the table's pattern covering it, then the default. A
/// pattern no single entry covers (e.g. `ampy.prod.ticks.>` when only quotes are best-effort)
/// is at-least-once: it reads the best-effort topics of its range too (they meet), with the
/// stronger tier's guarantees where the transport can give them.
///
/// ```
/// use ampybus::{TopicPattern, tier::{Tier, TierSource, TierTable, of_pattern}};
/// let p = TopicPattern::parse("ampy.dev.ticks.>").unwrap();
/// assert_eq!(of_pattern(None, &TierTable::default(), &p, None), (Tier::AtLeastOnceDedupe, TierSource::Default));
/// ```
pub fn of_pattern(
    registry: Option<&Registry>,
    table: &TierTable,
    pattern: &TopicPattern,
    explicit: Option<Tier>,
) -> (Tier, TierSource) {
    if let Some(e) = registry.and_then(|r| r.entries().iter().find(|e| covers(&e.pattern, pattern)))
    {
        if let Some(x) = explicit.filter(|x| *x != e.tier) {
            tracing::warn!(pattern = %pattern.as_str(), asked = %x, registry = %e.tier,
                entry = %e.pattern.as_str(), "tier: the registry's tier wins over the one asked for");
        }
        return (e.tier, TierSource::Registry);
    }
    if let Some(t) = explicit {
        return (t, TierSource::Builder);
    }
    match table.tier_covering(pattern) {
        Some(t) => (t, TierSource::Builder),
        None => (Tier::AtLeastOnceDedupe, TierSource::Default),
    }
}

/// Whether a registry or table makes some topic best-effort.
pub(crate) fn any_best_effort(registry: Option<&Registry>, table: &TierTable) -> bool {
    table.any_best_effort()
        || registry.is_some_and(|r| r.entries().iter().any(|e| e.tier == Tier::BestEffort))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> TopicPattern {
        TopicPattern::parse(s).unwrap()
    }

    #[test]
    fn registry_wins_over_builder_and_explicit() {
        let reg = Registry::parse(
            "[[topic]]\npattern = \"ampy.*.ticks.v1.quote.>\"\nowner = \"md\"\n\
             schemas = [\"ampy.ticks.v1.Tick\"]\ntier = \"at_least_once\"\nretention_days = 1\n",
            "r.toml",
        )
        .unwrap();
        let mut table = TierTable::default();
        table.push(p(">"), Tier::BestEffort);
        let quote = "ampy.dev.ticks.v1.quote.X";
        assert_eq!(
            of_topic(Some(&reg), &table, quote),
            (Tier::AtLeastOnce, TierSource::Registry)
        );
        assert_eq!(
            of_topic(Some(&reg), &table, "ampy.dev.ticks.v1.trade.X"),
            (Tier::BestEffort, TierSource::Builder)
        );
        assert_eq!(
            of_pattern(
                Some(&reg),
                &table,
                &p("ampy.dev.ticks.v1.quote.*"),
                Some(Tier::BestEffort)
            ),
            (Tier::AtLeastOnce, TierSource::Registry)
        );
        // Not covered by the entry: the explicit choice, then the table.
        assert_eq!(
            of_pattern(Some(&reg), &table, &p("ampy.dev.ticks.>"), None),
            (Tier::BestEffort, TierSource::Builder)
        );
        assert_eq!(
            of_pattern(None, &TierTable::default(), &p("ampy.dev.ticks.>"), None),
            (Tier::AtLeastOnceDedupe, TierSource::Default)
        );
        assert!(any_best_effort(Some(&reg), &table));
        assert!(!any_best_effort(Some(&reg), &TierTable::default()));
    }

    #[test]
    fn later_builder_pattern_wins() {
        let mut t = TierTable::default();
        t.push(p("ampy.dev.>"), Tier::BestEffort);
        t.push(p("ampy.dev.ticks.v1.trade.>"), Tier::AtLeastOnce);
        assert_eq!(
            t.tier_for("ampy.dev.ticks.v1.trade.X"),
            Some(Tier::AtLeastOnce)
        );
        assert_eq!(
            t.tier_for("ampy.dev.ticks.v1.quote.X"),
            Some(Tier::BestEffort)
        );
    }
}
