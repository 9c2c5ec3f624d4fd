//! The feed-health families of [`BusMetrics`](crate::obs::BusMetrics): `bus_stale_sources`,
//! `bus_seconds_since_last{topic}`, `bus_gap_total{topic}`, `bus_gap_heal_requests_total{topic}`, `bus_failover_switches_total{service,
//! reason}` (see `runtime::feeds`).

use super::{Listed, domain_topic};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TopicLabel {
    topic: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SwitchLabels {
    service: String,
    reason: String,
}

/// The families, shared by clones.
#[derive(Clone, Debug, Default)]
pub(crate) struct FeedFamilies {
    stale_sources: Gauge,
    seconds_since_last: Family<TopicLabel, Gauge<f64, AtomicU64>>,
    gaps: Family<TopicLabel, Counter>,
    heal_requests: Family<TopicLabel, Counter>,
    switches: Family<SwitchLabels, Counter>,
}

impl FeedFamilies {
    /// One more (`+1`) or one fewer (`-1`) stale source.
    pub(crate) fn stale_sources(&self, delta: i64) {
        self.stale_sources.inc_by(delta);
    }

    /// Seconds since the last message on `topic`'s domain-level topic.
    pub(crate) fn seconds_since_last(&self, topic: &str, secs: f64) {
        self.seconds_since_last
            .get_or_create(&TopicLabel {
                topic: domain_topic(topic).to_owned(),
            })
            .set(secs);
    }

    /// One gap on `topic`.
    pub(crate) fn gap(&self, topic: &str) {
        self.gaps
            .get_or_create(&TopicLabel {
                topic: domain_topic(topic).to_owned(),
            })
            .inc();
    }

    /// One replay request of a gap healer on `topic`.
    pub(crate) fn heal_request(&self, topic: &str) {
        self.heal_requests
            .get_or_create(&TopicLabel {
                topic: domain_topic(topic).to_owned(),
            })
            .inc();
    }

    /// One switch of a failover producer's active source.
    pub(crate) fn failover_switch(&self, service: &str, reason: &str) {
        self.switches
            .get_or_create(&SwitchLabels {
                service: service.to_owned(),
                reason: reason.to_owned(),
            })
            .inc();
    }

    pub(crate) fn register(&self, r: &mut Registry) {
        r.register(
            "bus_stale_sources",
            "Sources silent past their threshold now, over every feed monitor of this handle",
            Listed(self.stale_sources.clone()),
        );
        r.register(
            "bus_seconds_since_last",
            "Seconds since a feed monitor last saw a message, by domain-level topic",
            Listed(self.seconds_since_last.clone()),
        );
        r.register(
            "bus_gap",
            "Gaps in the sequence header seen by feed monitors, by domain-level topic",
            Listed(self.gaps.clone()),
        );
        r.register(
            "bus_gap_heal_requests",
            "Replay requests sent by gap healers for gaps their consumer saw, by domain-level topic",
            Listed(self.heal_requests.clone()),
        );
        r.register(
            "bus_failover_switches",
            "Switches of a failover producer's active source, by service and reason",
            Listed(self.switches.clone()),
        );
    }
}
