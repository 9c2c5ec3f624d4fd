//! Redriving dead letters: the plan checked before anything is sent, and the record that
//! makes a second run skip what was redriven (the DLQ contract itself: [`crate::dlq`]).

use crate::dedupe::DedupeStore;
use crate::dlq::{REDRIVE_CONSUMER, redrive_envelope};
use crate::envelope::Envelope;
use crate::error::{Error, ErrorKind};

/// What redriving a selection of DLQ entries would do, every entry checked before any is
/// sent ([`plan_redrive`]). Indexes point into the selection, in its order.
#[derive(Debug, Default)]
pub struct RedrivePlan {
    /// The entries to send, each with the envelope that redrives it ([`redrive_envelope`]).
    pub ready: Vec<(usize, Envelope)>,
    /// The entries recorded as redriven already (under [`REDRIVE_CONSUMER`], within the
    /// dedupe store's window).
    pub already: Vec<usize>,
    /// The entries that cannot be redriven, with why.
    pub invalid: Vec<(usize, Error)>,
}

/// Checks every DLQ entry of a selection and sorts it into [`RedrivePlan`]: `invalid` when it
/// has no `message_id` (its redrive could not be recorded) or [`redrive_envelope`] fails
/// (e.g. no `original_topic`); `already` when `store` records its `message_id` under
/// [`REDRIVE_CONSUMER`]; `ready` otherwise. With no store nothing counts as redriven. Only
/// the store lookup can fail.
///
/// ```
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// use ampybus::{Bus, Envelope, Headers, Topic};
/// use ampybus::runtime::{build_dlq_envelope, plan_redrive, record_redriven};
/// let dir = tempfile::tempdir().unwrap();
/// let bus = Bus::connect(dir.path().to_str().unwrap()).await.unwrap();
/// let store = bus.transport().dedupe_store().unwrap();
/// let topic = Topic::parse("ampy.dev.orders.v1.requests").unwrap();
/// let h = Headers::for_publish("ampy.orders.v1.OrderRequest", "oms@1", "oms", "co_1");
/// let good = build_dlq_envelope(&Envelope::new(&topic, h, b"p".to_vec()), &topic.dlq_topic(),
///     "handler_error: nope", 3, "oms");
/// let mut bad = good.clone();
/// bad.headers.remove("original_topic");
/// let plan = plan_redrive(&[good.clone(), bad], Some(store.as_ref())).await.unwrap();
/// assert_eq!((plan.ready.len(), plan.already.len(), plan.invalid.len()), (1, 0, 1));
/// assert!(plan.invalid[0].1.message().contains("no original_topic"));
/// record_redriven(store.as_ref(), &good).await.unwrap();
/// let again = plan_redrive(&[good], Some(store.as_ref())).await.unwrap();
/// assert_eq!((again.ready.len(), again.already), (0, vec![0]));
/// # });
/// ```
pub async fn plan_redrive(
    entries: &[Envelope],
    store: Option<&dyn DedupeStore>,
) -> crate::Result<RedrivePlan> {
    let mut plan = RedrivePlan::default();
    let mut checked = Vec::with_capacity(entries.len());
    for (i, dlq) in entries.iter().enumerate() {
        match dlq.headers.message_id().filter(|id| !id.is_empty()) {
            None => plan.invalid.push((
                i,
                Error::new(
                    ErrorKind::Header,
                    "redrive: the DLQ message has no message_id, so its redrive could not be recorded",
                ),
            )),
            Some(id) => match redrive_envelope(dlq) {
                Ok(env) => checked.push((i, id.to_owned(), env)),
                Err(e) => plan.invalid.push((i, e)),
            },
        }
    }
    let done = match store {
        Some(store) if !checked.is_empty() => {
            let ids: Vec<String> = checked.iter().map(|(_, id, _)| id.clone()).collect();
            store.applied_among(REDRIVE_CONSUMER, &ids).await?
        }
        _ => Default::default(),
    };
    for (i, id, env) in checked {
        if done.contains(&id) {
            plan.already.push(i);
        } else {
            plan.ready.push((i, env));
        }
    }
    Ok(plan)
}

/// Records in `store` that the DLQ entry `dlq` was redriven (its `message_id` under
/// [`REDRIVE_CONSUMER`]); call it once its redrive publish was confirmed. See
/// [`plan_redrive`] for an example.
pub async fn record_redriven(store: &dyn DedupeStore, dlq: &Envelope) -> crate::Result<()> {
    let id = dlq.headers.message_id().unwrap_or_default();
    if id.is_empty() {
        return Err(Error::new(
            ErrorKind::Header,
            "redrive: the DLQ message has no message_id, so its redrive cannot be recorded",
        ));
    }
    store
        .record_applied(REDRIVE_CONSUMER, &[id.to_owned()])
        .await
}
