//! The tiers on a bus handle: [`Bus::with_tier`], the tier of a topic or a pattern, and
//! publishing a batch by tier (the rules themselves are [`crate::tier`]'s).

use super::Bus;
use crate::envelope::Envelope;
use crate::tier::{Tier, TierSource, any_best_effort, of_pattern, of_topic};
use crate::topic::{Topic, TopicPattern};
use crate::transport::{BatchOutcome, PublishOutcome};

/// Publishes `batch` by tier: runs of consecutive best-effort messages go through
/// [`crate::transport::Transport::publish_best_effort`], the others through
/// `publish_batch_outcomes`, in batch order; after the first failure nothing more is sent.
pub(crate) async fn publish_outcomes(bus: &Bus, batch: Vec<Envelope>) -> BatchOutcome {
    let t = bus.transport();
    if !bus.has_best_effort() {
        return t.publish_batch_outcomes(batch).await;
    }
    let best: Vec<bool> = batch
        .iter()
        .map(|e| bus.tier_of_str(&e.topic) == Tier::BestEffort)
        .collect();
    if best.iter().all(|b| *b == best[0]) {
        return match best.first() {
            Some(true) => t.publish_best_effort(batch).await,
            _ => t.publish_batch_outcomes(batch).await,
        };
    }
    let total = batch.len();
    let mut outcomes = Vec::with_capacity(total);
    let mut rest = batch.into_iter().zip(best).peekable();
    while let Some((first, b)) = rest.next() {
        let mut run = vec![first];
        while let Some((e, _)) = rest.next_if(|(_, x)| *x == b) {
            run.push(e);
        }
        let out = if b {
            t.publish_best_effort(run).await
        } else {
            t.publish_batch_outcomes(run).await
        };
        outcomes.extend(out.outcomes);
        if let Some(e) = out.error {
            outcomes.resize(total, PublishOutcome::Unsent);
            return BatchOutcome {
                outcomes,
                error: Some(e),
            };
        }
    }
    BatchOutcome {
        outcomes,
        error: None,
    }
}

impl Bus {
    /// Sets the tier of the topics matching `pattern` (a later call beats an earlier one where
    /// both match). A [registry](Bus::with_registry) entry wins over it.
    ///
    /// ```
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// use ampybus::{Bus, Topic, TopicPattern, tier::Tier};
    /// let dir = tempfile::tempdir().unwrap();
    /// let bus = Bus::connect(dir.path().to_str().unwrap()).await.unwrap()
    ///     .with_tier(TopicPattern::parse(">").unwrap(), Tier::AtLeastOnce);
    /// assert_eq!(bus.tier_of(&Topic::parse("ampy.dev.bars.v1.X").unwrap()), Tier::AtLeastOnce);
    /// # });
    /// ```
    pub fn with_tier(self, pattern: TopicPattern, tier: Tier) -> Bus {
        self.map_tiers(|t| t.push(pattern, tier))
    }

    /// The tier of `topic` on this bus (registry, then [`Bus::with_tier`], then
    /// [`Tier::AtLeastOnceDedupe`]).
    ///
    /// ```
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// use ampybus::{Bus, Topic, tier::Tier};
    /// let dir = tempfile::tempdir().unwrap();
    /// let bus = Bus::connect(dir.path().to_str().unwrap()).await.unwrap();
    /// assert_eq!(bus.tier_of(&Topic::parse("ampy.dev.ticks.v1.quote.X").unwrap()), Tier::AtLeastOnceDedupe);
    /// # });
    /// ```
    pub fn tier_of(&self, topic: &Topic) -> Tier {
        self.tier_of_str(topic.as_str())
    }

    pub(crate) fn tier_of_str(&self, topic: &str) -> Tier {
        of_topic(self.registry().map(|r| &**r), self.tier_table(), topic).0
    }

    /// The tier a subscription to `pattern` gets, and where it came from (see
    /// [`crate::tier`]): `explicit` is the subscriber's own choice, which a covering registry
    /// entry beats.
    ///
    /// ```
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// use ampybus::{Bus, TopicPattern, tier::{Tier, TierSource}};
    /// let dir = tempfile::tempdir().unwrap();
    /// let bus = Bus::connect(dir.path().to_str().unwrap()).await.unwrap();
    /// let p = TopicPattern::parse("ampy.dev.ticks.>").unwrap();
    /// assert_eq!(bus.tier_of_pattern(&p, None), (Tier::AtLeastOnceDedupe, TierSource::Default));
    /// assert_eq!(bus.tier_of_pattern(&p, Some(Tier::BestEffort)), (Tier::BestEffort, TierSource::Builder));
    /// # });
    /// ```
    pub fn tier_of_pattern(
        &self,
        pattern: &TopicPattern,
        explicit: Option<Tier>,
    ) -> (Tier, TierSource) {
        of_pattern(
            self.registry().map(|r| &**r),
            self.tier_table(),
            pattern,
            explicit,
        )
    }

    /// Whether some topic is best-effort on this bus.
    pub(crate) fn has_best_effort(&self) -> bool {
        any_best_effort(self.registry().map(|r| &**r), self.tier_table())
    }
}
