//! Deleting dead-lettered messages from the embedded log (`ampybus dlq purge`): their
//! sequences go to the DLQ log's purged list, which every reader skips.

use super::EmbeddedLog;
use super::log::{self, DomainReader, domain_index};
use super::log::{envelope_of, us_to_time};
use crate::error::{Error, Result};
use crate::topic::{Domain, TopicPattern};
use crate::transport::StoredMessage;

impl EmbeddedLog {
    /// Deletes the DLQ messages matching `pattern` for which `filter` is true; returns them.
    /// Only `dlq` topics can be purged.
    ///
    /// ```
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// use ampybus::transport::{Transport, embedded::{EmbeddedLog, EmbeddedOptions}};
    /// use ampybus::{Envelope, Headers, Topic, TopicPattern};
    /// let dir = tempfile::tempdir().unwrap();
    /// let log = EmbeddedLog::open(EmbeddedOptions::new(dir.path())).unwrap();
    /// let t = Topic::parse("ampy.dev.dlq.v1.orders").unwrap();
    /// let h = Headers::for_publish("ampy.raw.v1.Bytes", "p@1", "p", "k");
    /// log.publish_batch(vec![Envelope::new(&t, h, b"x".to_vec())]).await.unwrap();
    /// let gone = log.purge(&TopicPattern::parse("ampy.dev.dlq.>").unwrap(), |_| true).await.unwrap();
    /// assert_eq!(gone.len(), 1);
    /// assert_eq!(log.stats().await.unwrap().0, 0);
    /// # });
    /// ```
    pub async fn purge(
        &self,
        pattern: &TopicPattern,
        filter: impl Fn(&StoredMessage) -> bool + Send + 'static,
    ) -> Result<Vec<StoredMessage>> {
        if !pattern.may_match_domain(Domain::Dlq.as_str()) {
            return Err(Error::config(format!(
                "purge: pattern {:?} does not select dlq topics (only ampy.{{env}}.dlq.v1.… can be purged)",
                pattern.as_str()
            )));
        }
        let pattern = pattern.clone();
        let inner = self.inner.clone();
        self.inner
            .run(move |w| {
                w.log.locked(|_, snap| {
                    let d = domain_index(Domain::Dlq);
                    let e = snap.domains[d];
                    let mut selected = Vec::new();
                    if e.last_seq == 0 {
                        return Ok(selected);
                    }
                    DomainReader::new(&inner.dir, d, 0).scan(&e, |rec| {
                        if pattern.matches(&rec.topic) {
                            // A damaged record stops the purge (nothing is deleted).
                            let m = StoredMessage {
                                sequence: rec.seq,
                                stored_at: us_to_time(rec.log_us),
                                envelope: envelope_of(&inner, &rec)?,
                            };
                            if filter(&m) {
                                selected.push(m);
                            }
                        }
                        Ok(std::ops::ControlFlow::Continue(()))
                    })?;
                    if !selected.is_empty() {
                        let seqs: Vec<u64> = selected.iter().map(|m| m.sequence).collect();
                        log::append_purged(&log::domain_dir(&inner.dir, Domain::Dlq), &seqs)?;
                    }
                    Ok(selected)
                })
            })
            .await
    }
}
