//! The best-effort tier on NATS: core publish/subscribe, no JetStream on the path.
//!
//! * **Publish** (`publish::publish_core`): one core publish per message with the same
//!   headers as a JetStream publish (`Nats-Msg-Id` included, so a stream that captures the
//!   subject stores it once), on the binding's own connection when it has one, then one
//!   flush per batch. A message is `Confirmed` once
//!   flushed to the socket (receipt sequence 0: the server says nothing). A stream whose
//!   filter covers the subject still stores the message, so an at-least-once consumer of the
//!   topic reads it — without a publish guarantee.
//! * **Subscribe** ([`subscribe`]): a core subscription on the pattern (the same wildcard
//!   syntax); instances of one durable name join the queue group of that name, so the server
//!   hands each message to one of them: per-key order across instances is **not** kept on
//!   this tier (within one instance messages come in the server's order). Only messages
//!   published while the subscription is live arrive (`StartAt` is ignored); what the server
//!   could not deliver (slow consumer, reconnect) is gone. Deliveries settle through
//!   [`Delivery::best_effort`]: acks are no-ops, a nack does not bring the message back.
//!   `DeliveryInfo`: a per-subscription counter from 1, delivery count 1, `stored_at` = the
//!   time of receipt.

use super::{Shared, consume::consumer_name, from_header_map};
use crate::envelope::Envelope;
use crate::error::{Error, ErrorKind, Result};
use crate::transport::{Delivery, DeliveryInfo, SubscribeSpec, Subscription};
use async_trait::async_trait;
use futures::{FutureExt, StreamExt};
use std::time::Duration;

/// A core subscription (queue group = the durable name); see the module docs.
pub(crate) async fn subscribe(
    shared: &Shared,
    spec: SubscribeSpec,
) -> Result<Box<dyn Subscription>> {
    let subject = spec.pattern.as_str().to_owned();
    let sub = match &spec.durable {
        Some(name) => {
            shared
                .client
                .queue_subscribe(subject.clone(), consumer_name(name))
                .await
        }
        None => shared.client.subscribe(subject.clone()).await,
    }
    .map_err(|e| {
        Error::with_source(
            ErrorKind::Transport,
            format!("{}: core subscription to `{subject}`", shared.where_()),
            e,
        )
    })?;
    round_trip(shared).await?;
    Ok(Box::new(CoreSubscription {
        sub,
        next_seq: 1,
        where_: shared.where_(),
        names: Default::default(),
    }))
}

/// Waits until the server has processed everything this connection sent before (a message
/// to a fresh inbox of ours comes back): the subscription is live on the server when
/// `subscribe` returns, so a publish made after it reaches it (one server; across a cluster
/// interest propagates asynchronously).
async fn round_trip(shared: &Shared) -> Result<()> {
    let inbox = shared.client.new_inbox();
    let fail = |what: &str| {
        Error::new(
            ErrorKind::Transport,
            format!("{}: core subscription: {what}", shared.where_()),
        )
    };
    let mut probe = shared
        .client
        .subscribe(inbox.clone())
        .await
        .map_err(|e| fail(&e.to_string()))?;
    shared
        .client
        .publish(inbox, bytes::Bytes::new())
        .await
        .map_err(|e| fail(&e.to_string()))?;
    match tokio::time::timeout(shared.opts.request_timeout, probe.next()).await {
        Ok(Some(_)) => Ok(()),
        Ok(None) => Err(fail("the connection closed")),
        Err(_) => Err(Error::new(
            ErrorKind::Timeout,
            format!(
                "{}: core subscription: the server did not answer within {:?}",
                shared.where_(),
                shared.opts.request_timeout
            ),
        )),
    }
}

struct CoreSubscription {
    sub: async_nats::Subscriber,
    next_seq: u64,
    where_: String,
    /// One shared name per subject received.
    names: crate::envelope::TopicNames,
}

impl CoreSubscription {
    fn delivery(&mut self, m: async_nats::Message) -> Delivery {
        let info = DeliveryInfo {
            sequence: self.next_seq,
            delivery_count: 1,
            stored_at: chrono::Utc::now(),
        };
        self.next_seq += 1;
        let envelope = Envelope {
            topic: self.names.get(m.subject.as_str()),
            headers: from_header_map(m.headers.as_ref()),
            payload: m.payload,
        };
        Delivery::best_effort(envelope, info)
    }
}

#[async_trait]
impl Subscription for CoreSubscription {
    async fn fetch(&mut self, max: usize, wait: Duration) -> Result<Vec<Delivery>> {
        let first = match tokio::time::timeout(wait, self.sub.next()).await {
            Err(_) => return Ok(Vec::new()),
            Ok(Some(m)) => m,
            Ok(None) => {
                return Err(Error::new(
                    ErrorKind::Transport,
                    format!("{}: core subscription closed", self.where_),
                ));
            }
        };
        let mut out = Vec::with_capacity(max.clamp(1, 1024));
        out.push(self.delivery(first));
        while out.len() < max {
            match self.sub.next().now_or_never() {
                Some(Some(m)) => {
                    let d = self.delivery(m);
                    out.push(d);
                }
                _ => break,
            }
        }
        Ok(out)
    }
}
