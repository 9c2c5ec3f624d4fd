//! Streams: one per env + domain, looked up before created, compared when found.
//!
//! For `ampy.{env}.{domain}.>` the binding first asks the server which streams' subjects
//! overlap it (`STREAM.NAMES` filtered by subject). A stream one of whose subjects captures the
//! whole of it (the seed's `AMPY` on `ampy.>`, or ours) is used. Otherwise, when no stream
//! overlaps, `{prefix}_{ENV}_{DOMAIN}` is created: file storage, limits retention, discard old,
//! max age by domain (7 days; 30 for orders, fills, positions and dlq, as the embedded log),
//! the duplicate window and replicas from [`NatsOptions`]. Streams that capture only part of
//! the domain are an error (the server would refuse an overlapping stream).
//!
//! An existing stream is never changed unless [`NatsOptions::update_streams`] is set; what
//! differs is reported by [`compare`].

use super::{NatsOptions, Shared};
use crate::error::{Error, ErrorKind, Result};
use crate::topic::{Domain, Env, TopicPattern};
use async_nats::jetstream::{self, stream};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A resolved stream: its name and subjects.
///
/// ```
/// let s = ampybus::transport::nats::streams::StreamRef { name: "AMPY_DEV_BARS".into(), subjects: vec!["ampy.dev.bars.>".into()] };
/// assert_eq!(s.name, "AMPY_DEV_BARS");
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamRef {
    /// Stream name.
    pub name: String,
    /// Its subjects.
    pub subjects: Vec<String>,
}

#[derive(Default)]
pub(crate) struct StreamCache {
    map: Mutex<HashMap<(Env, Domain), Arc<StreamRef>>>,
    resolving: tokio::sync::Mutex<()>,
}

/// `ampy.{env}.{domain}.>`.
///
/// ```
/// use ampybus::{Domain, Env};
/// assert_eq!(ampybus::transport::nats::streams::domain_subject(Env::Dev, Domain::Bars), "ampy.dev.bars.>");
/// ```
pub fn domain_subject(env: Env, domain: Domain) -> String {
    format!("ampy.{}.{}.>", env.as_str(), domain.as_str())
}

/// `{prefix}_{ENV}_{DOMAIN}`, upper case.
///
/// ```
/// use ampybus::{Domain, Env};
/// use ampybus::transport::nats::streams::stream_name;
/// assert_eq!(stream_name("AMPY", Env::Prod, Domain::CorporateActions), "AMPY_PROD_CORPORATE_ACTIONS");
/// ```
pub fn stream_name(prefix: &str, env: Env, domain: Domain) -> String {
    format!(
        "{prefix}_{}_{}",
        env.as_str().to_ascii_uppercase(),
        domain.as_str().to_ascii_uppercase()
    )
}

/// Max age of a created stream: the option when set, else 30 days for orders, fills,
/// positions and dlq and 7 days for the rest (the embedded log's defaults).
///
/// ```
/// use ampybus::Domain;
/// use ampybus::transport::nats::{NatsOptions, streams::max_age_for};
/// let o = NatsOptions::default();
/// assert_eq!(max_age_for(&o, Domain::Fills).as_secs(), 30 * 86_400);
/// assert_eq!(max_age_for(&o, Domain::Bars).as_secs(), 7 * 86_400);
/// ```
pub fn max_age_for(opts: &NatsOptions, domain: Domain) -> Duration {
    crate::transport::retention_for(opts.max_age, domain)
}

/// The max age of the stream of env + domain: the registry's retention for that unit, else
/// [`max_age_for`].
///
/// ```
/// use ampybus::{Domain, Env};
/// use ampybus::transport::nats::{NatsOptions, streams::max_age_at};
/// let mut o = NatsOptions::default();
/// o.registry_retention.insert((Env::Prod, Domain::Bars), std::time::Duration::from_secs(86_400));
/// assert_eq!(max_age_at(&o, Env::Prod, Domain::Bars).as_secs(), 86_400);
/// assert_eq!(max_age_at(&o, Env::Dev, Domain::Bars).as_secs(), 7 * 86_400);
/// ```
pub fn max_age_at(opts: &NatsOptions, env: Env, domain: Domain) -> Duration {
    crate::transport::retention_at(&opts.registry_retention, opts.max_age, env, domain)
}

/// The configuration of the stream this binding creates for env + domain.
///
/// ```
/// use ampybus::{Domain, Env};
/// use ampybus::transport::nats::{NatsOptions, streams::desired_config};
/// let c = desired_config(&NatsOptions::default(), Env::Dev, Domain::Orders);
/// assert_eq!(c.name, "AMPY_DEV_ORDERS");
/// assert_eq!(c.subjects, vec!["ampy.dev.orders.>"]);
/// ```
pub fn desired_config(opts: &NatsOptions, env: Env, domain: Domain) -> stream::Config {
    stream::Config {
        name: stream_name(&opts.stream_prefix, env, domain),
        subjects: vec![domain_subject(env, domain)],
        description: Some(format!(
            "ampybus: {} messages of env {}",
            domain.as_str(),
            env.as_str()
        )),
        retention: stream::RetentionPolicy::Limits,
        storage: stream::StorageType::File,
        discard: stream::DiscardPolicy::Old,
        max_age: max_age_at(opts, env, domain),
        num_replicas: opts.replicas,
        duplicate_window: opts.duplicate_window,
        max_messages: -1,
        max_bytes: -1,
        max_messages_per_subject: -1,
        max_consumers: -1,
        max_message_size: -1,
        allow_direct: true,
        ..Default::default()
    }
}

/// Is every subject matched by `a` also matched by `b`? (NATS wildcards `*`, `>`.)
///
/// ```
/// use ampybus::transport::nats::streams::subject_is_subset;
/// assert!(subject_is_subset("ampy.dev.bars.>", "ampy.>"));
/// assert!(subject_is_subset("ampy.dev.bars.v1.x", "ampy.*.bars.>"));
/// assert!(!subject_is_subset("ampy.>", "ampy.dev.>"));
/// assert!(!subject_is_subset("ampy.*.bars.>", "ampy.dev.>"));
/// ```
pub fn subject_is_subset(a: &str, b: &str) -> bool {
    let at: Vec<&str> = a.split('.').collect();
    let bt: Vec<&str> = b.split('.').collect();
    for (i, bx) in bt.iter().enumerate() {
        let Some(ax) = at.get(i) else { return false };
        match (*ax, *bx) {
            (_, ">") => return true,
            (">", _) => return false,
            (_, "*") => {}
            ("*", _) => return false,
            (x, y) if x == y => {}
            _ => return false,
        }
    }
    at.len() == bt.len()
}

/// The subjects matched by both `a` and `b`, as one subject, or `None` when they are disjoint.
///
/// ```
/// use ampybus::transport::nats::streams::subject_intersection;
/// assert_eq!(subject_intersection("ampy.dev.*.v1.c1.>", "ampy.dev.orders.>").as_deref(), Some("ampy.dev.orders.v1.c1.>"));
/// assert_eq!(subject_intersection("ampy.>", "ampy.dev.bars.v1.x").as_deref(), Some("ampy.dev.bars.v1.x"));
/// assert_eq!(subject_intersection("ampy.dev.bars.>", "ampy.prod.>"), None);
/// ```
pub fn subject_intersection(a: &str, b: &str) -> Option<String> {
    let at: Vec<&str> = a.split('.').collect();
    let bt: Vec<&str> = b.split('.').collect();
    let mut out: Vec<&str> = Vec::new();
    let mut i = 0;
    loop {
        match (at.get(i), bt.get(i)) {
            (None, None) => return Some(out.join(".")),
            (Some(&">"), Some(_)) => {
                out.extend(&bt[i..]);
                return Some(out.join("."));
            }
            (Some(_), Some(&">")) => {
                out.extend(&at[i..]);
                return Some(out.join("."));
            }
            (Some(&"*"), Some(y)) => out.push(y),
            (Some(x), Some(&"*")) => out.push(x),
            (Some(x), Some(y)) if x == y => out.push(x),
            _ => return None,
        }
        i += 1;
    }
}

/// Every env + domain whose stream subjects a pattern can match.
///
/// ```
/// use ampybus::TopicPattern;
/// use ampybus::transport::nats::streams::pairs_for_pattern;
/// assert_eq!(pairs_for_pattern(&TopicPattern::parse("ampy.dev.bars.>").unwrap()).len(), 1);
/// assert_eq!(pairs_for_pattern(&TopicPattern::parse("ampy.dev.>").unwrap()).len(), ampybus::Domain::ALL.len());
/// ```
pub fn pairs_for_pattern(pattern: &TopicPattern) -> Vec<(Env, Domain)> {
    let mut out = Vec::new();
    for env in Env::ALL {
        for &domain in Domain::ALL {
            if subject_intersection(pattern.as_str(), &domain_subject(env, domain)).is_some() {
                out.push((env, domain));
            }
        }
    }
    out
}

/// What differs between an existing stream and the one this binding would create.
///
/// ```
/// use ampybus::{Domain, Env};
/// use ampybus::transport::nats::{NatsOptions, streams::{compare, desired_config}};
/// let want = desired_config(&NatsOptions::default(), Env::Dev, Domain::Bars);
/// let mut have = want.clone();
/// have.storage = async_nats::jetstream::stream::StorageType::Memory;
/// have.max_age = std::time::Duration::ZERO;
/// let c = compare(&have, &want);
/// assert_eq!(c.fatal.len(), 1);
/// assert!(c.fatal[0].contains("storage"));
/// assert_eq!(c.warnings.len(), 1);
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Comparison {
    /// Differences that break the contract's semantics (the stream cannot be used).
    pub fatal: Vec<String>,
    /// Differences worth a warning (max age, limits, duplicate window, replicas).
    pub warnings: Vec<String>,
}

/// Compares an existing stream (`have`) with ours (`want`). Fatal: storage other than file,
/// retention other than limits, discard new, no ack, sealed. Warnings: max age, message/byte
/// limits, duplicate window, replicas.
///
/// ```
/// use ampybus::{Domain, Env};
/// use ampybus::transport::nats::{NatsOptions, streams::{compare, desired_config}};
/// let want = desired_config(&NatsOptions::default(), Env::Prod, Domain::Orders);
/// assert_eq!(compare(&want, &want), Default::default());
/// ```
pub fn compare(have: &stream::Config, want: &stream::Config) -> Comparison {
    let mut c = Comparison::default();
    if have.storage != stream::StorageType::File {
        c.fatal.push(format!(
            "storage is {:?}, must be file (memory streams lose acknowledged messages on restart)",
            have.storage
        ));
    }
    if have.retention != stream::RetentionPolicy::Limits {
        c.fatal.push(format!(
            "retention is {:?}, must be limits (other policies delete messages other consumers and replay still need)",
            have.retention
        ));
    }
    if have.discard == stream::DiscardPolicy::New {
        c.fatal
            .push("discard is new, must be old (a full stream would refuse publishes)".to_owned());
    }
    if have.no_ack {
        c.fatal
            .push("no_ack is set (publishes would not be acknowledged)".to_owned());
    }
    if have.sealed {
        c.fatal
            .push("the stream is sealed (it takes no more messages)".to_owned());
    }
    let days = |d: Duration| {
        if d.is_zero() {
            "unlimited".to_owned()
        } else {
            format!("{:.1} days", d.as_secs_f64() / 86_400.0)
        }
    };
    if have.max_age != want.max_age {
        c.warnings.push(format!(
            "max age is {}, ampybus would use {}",
            days(have.max_age),
            days(want.max_age)
        ));
    }
    if have.max_messages > 0 || have.max_bytes > 0 || have.max_messages_per_subject > 0 {
        c.warnings.push(format!(
            "limits: max_msgs {}, max_bytes {}, max_msgs_per_subject {} (old messages may go before their age)",
            have.max_messages, have.max_bytes, have.max_messages_per_subject
        ));
    }
    if have.duplicate_window != want.duplicate_window {
        c.warnings.push(format!(
            "duplicate window is {:?}, ampybus would use {:?}",
            have.duplicate_window, want.duplicate_window
        ));
    }
    if have.num_replicas.max(1) != want.num_replicas.max(1) {
        c.warnings.push(format!(
            "replicas {}, ampybus would use {}",
            have.num_replicas, want.num_replicas
        ));
    }
    c
}

fn api_err(shared_where: &str, what: &str, e: impl Into<crate::error::BoxError>) -> Error {
    let e = e.into();
    let text = e.to_string();
    let kind = if text.contains("timed out") || text.contains("TimedOut") {
        ErrorKind::Timeout
    } else {
        ErrorKind::Transport
    };
    Error::with_source(kind, format!("{shared_where}: {what}: {text}"), e)
}

/// Names of the streams whose subjects overlap `subject`.
pub(crate) async fn stream_names_for(
    js: &jetstream::Context,
    where_: &str,
    subject: &str,
) -> Result<Vec<String>> {
    let v: serde_json::Value = js
        .request("STREAM.NAMES", &serde_json::json!({ "subject": subject }))
        .await
        .map_err(|e| api_err(where_, &format!("listing streams for `{subject}`"), e))?;
    if let Some(err) = v.get("error") {
        return Err(Error::new(
            ErrorKind::Transport,
            format!("{where_}: listing streams for `{subject}` refused: {err}"),
        ));
    }
    Ok(v.get("streams")
        .and_then(|s| s.as_array())
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default())
}

/// What [`ensure`] did.
///
/// ```no_run
/// # async fn demo(t: ampybus::transport::nats::NatsTransport) -> ampybus::Result<()> {
/// use ampybus::{Domain, Env};
/// let e = ampybus::transport::nats::streams::ensure(t.jetstream(), t.options(), Env::Dev, Domain::Bars).await?;
/// println!("{} created={} warnings={:?}", e.stream.name, e.created, e.warnings);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ensured {
    /// The stream in use.
    pub stream: StreamRef,
    /// True when this call created it.
    pub created: bool,
    /// True when this call updated it (only with `update_streams`).
    pub updated: bool,
    /// Non-fatal differences from what ampybus would create.
    pub warnings: Vec<String>,
}

/// Finds the stream that captures `ampy.{env}.{domain}.>` or creates ours; fatal differences
/// are a [`ErrorKind::Config`] error listing them, the rest are logged as warnings (and
/// returned).
///
/// ```no_run
/// # async fn demo(t: ampybus::transport::nats::NatsTransport) -> ampybus::Result<()> {
/// use ampybus::{Domain, Env};
/// let e = ampybus::transport::nats::streams::ensure(t.jetstream(), t.options(), Env::Prod, Domain::Orders).await?;
/// assert!(e.stream.subjects.iter().any(|s| s == "ampy.prod.orders.>" || s == "ampy.>"));
/// # Ok(()) }
/// ```
pub async fn ensure(
    js: &jetstream::Context,
    opts: &NatsOptions,
    env: Env,
    domain: Domain,
) -> Result<Ensured> {
    find_or_create(js, opts, env, domain, true)
        .await?
        .ok_or_else(|| {
            Error::new(
                ErrorKind::Transport,
                "nats: stream neither found nor created",
            )
        })
}

/// [`ensure`] when `create`, else only the lookup (`None` when no stream captures the domain).
pub(crate) async fn find_or_create(
    js: &jetstream::Context,
    opts: &NatsOptions,
    env: Env,
    domain: Domain,
    create: bool,
) -> Result<Option<Ensured>> {
    let where_ = format!("nats {}", opts.servers_shown());
    let subject = domain_subject(env, domain);
    let want = desired_config(opts, env, domain);
    for round in 0..3 {
        let names = stream_names_for(js, &where_, &subject).await?;
        let mut partial = Vec::new();
        for name in &names {
            let mut s = match js.get_stream(name).await {
                Ok(s) => s,
                Err(e) => {
                    // Deleted between the listing and now: look again.
                    tracing::debug!(stream = %name, error = %e, "stream vanished while looking up");
                    continue;
                }
            };
            let info = s
                .info()
                .await
                .map_err(|e| api_err(&where_, &format!("reading stream {name}"), e))?;
            let have = info.config.clone();
            if !have
                .subjects
                .iter()
                .any(|sub| subject_is_subset(&subject, sub))
            {
                partial.push(format!("{name} ({})", have.subjects.join(", ")));
                continue;
            }
            let cmp = compare(&have, &want);
            if !cmp.fatal.is_empty() {
                return Err(Error::config(format!(
                    "{where_}: stream {name} captures `{subject}` but cannot be used: {}",
                    cmp.fatal.join("; ")
                )));
            }
            let mut updated = false;
            if opts.update_streams && !cmp.warnings.is_empty() {
                let mut cfg = have.clone();
                cfg.max_age = want.max_age;
                cfg.duplicate_window = want.duplicate_window;
                cfg.num_replicas = want.num_replicas;
                js.update_stream(&cfg)
                    .await
                    .map_err(|e| api_err(&where_, &format!("updating stream {name}"), e))?;
                tracing::info!(stream = %name, changes = ?cmp.warnings, "nats: stream updated (update_streams)");
                updated = true;
            } else {
                for w in &cmp.warnings {
                    tracing::warn!(stream = %name, subject = %subject, "nats: existing stream differs: {w}");
                }
            }
            return Ok(Some(Ensured {
                stream: StreamRef {
                    name: name.clone(),
                    subjects: have.subjects,
                },
                created: false,
                updated,
                warnings: cmp.warnings,
            }));
        }
        if !partial.is_empty() {
            return Err(Error::config(format!(
                "{where_}: `{subject}` is partly captured by {} and no stream captures all of it; ampybus needs one stream per env and domain (or one wider stream such as `ampy.>`)",
                partial.join(", ")
            )));
        }
        if !create {
            return Ok(None);
        }
        match js.create_stream(want.clone()).await {
            Ok(_) => {
                tracing::info!(stream = %want.name, subject = %subject, "nats: stream created");
                return Ok(Some(Ensured {
                    stream: StreamRef {
                        name: want.name.clone(),
                        subjects: want.subjects.clone(),
                    },
                    created: true,
                    updated: false,
                    warnings: Vec::new(),
                }));
            }
            Err(e) if round < 2 => {
                // Another process created it (or an overlapping one) meanwhile: look again.
                tracing::debug!(stream = %want.name, error = %e, "stream create raced; looking up again");
            }
            Err(e) => {
                let text = e.to_string();
                let kind = if text.contains("insufficient resources")
                    || text.contains("permission")
                    || text.contains("overlap")
                {
                    ErrorKind::Config
                } else {
                    ErrorKind::Transport
                };
                return Err(Error::with_source(
                    kind,
                    format!(
                        "{where_}: creating stream {} on `{subject}`: {text}",
                        want.name
                    ),
                    e,
                ));
            }
        }
    }
    unreachable!("the loop returns on its last round")
}

/// The stream for env + domain, from the cache or [`ensure`]d once per connection.
pub(crate) async fn resolve(shared: &Shared, env: Env, domain: Domain) -> Result<Arc<StreamRef>> {
    resolve_with(shared, env, domain, true)
        .await?
        .ok_or_else(|| {
            Error::new(
                ErrorKind::Transport,
                "nats: stream neither found nor created",
            )
        })
}

/// Like [`resolve`]; with `create == false` only an existing stream is returned.
pub(crate) async fn resolve_with(
    shared: &Shared,
    env: Env,
    domain: Domain,
    create: bool,
) -> Result<Option<Arc<StreamRef>>> {
    if let Some(s) = cached(shared, env, domain) {
        return Ok(Some(s));
    }
    let _g = shared.streams.resolving.lock().await;
    if let Some(s) = cached(shared, env, domain) {
        return Ok(Some(s));
    }
    // A JetStream API request the user's permissions refuse gets no reply (the server reports
    // a violation on the connection instead): end the wait with a clear error at once.
    let name = stream_name(&shared.opts.stream_prefix, env, domain);
    let mut violations = shared.violations.subscribe();
    let refused = async {
        loop {
            match violations.recv().await {
                Ok(subject) if is_stream_api_for(&subject, &name) => return subject,
                Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(tokio::sync::broadcast::error::RecvError::Closed) => {
                    std::future::pending::<()>().await
                }
            }
        }
    };
    let found = tokio::select! {
        r = find_or_create(&shared.js, &shared.opts, env, domain, create) => r?,
        subject = refused => {
            return Err(Error::config(format!(
                "{}: permission denied: the server refused `{subject}` (Permissions Violation; the user may not use stream {name}: check its publish permissions on the JetStream API)",
                shared.where_()
            )));
        }
    };
    let Some(e) = found else {
        return Ok(None);
    };
    let s = Arc::new(e.stream);
    shared
        .streams
        .map
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert((env, domain), s.clone());
    Ok(Some(s))
}

/// Whether `subject` is a JetStream API request about stream `name` (`$JS.API.STREAM.INFO.{name}`
/// and the like).
fn is_stream_api_for(subject: &str, name: &str) -> bool {
    subject.starts_with("$JS.API.STREAM.")
        && subject
            .strip_suffix(name)
            .is_some_and(|head| head.ends_with('.'))
}

fn cached(shared: &Shared, env: Env, domain: Domain) -> Option<Arc<StreamRef>> {
    shared
        .streams
        .map
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(&(env, domain))
        .cloned()
}

/// Forgets a cached stream (it was deleted under us); the next use looks it up again.
pub(crate) fn invalidate(shared: &Shared, env: Env, domain: Domain) {
    shared
        .streams
        .map
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(&(env, domain));
}

/// The streams a pattern spans, each with the consumer filter to use on it (the pattern
/// narrowed to what the stream holds). With `create`, missing streams are created (durable
/// consumers: they must exist to start at the earliest message); without, only existing
/// streams are used (ephemeral readers, replay), possibly none.
pub(crate) async fn streams_for_pattern(
    shared: &Shared,
    pattern: &TopicPattern,
    create: bool,
) -> Result<Vec<(Arc<StreamRef>, String)>> {
    let mut out: Vec<(Arc<StreamRef>, String)> = Vec::new();
    let pairs = pairs_for_pattern(pattern);
    if pairs.is_empty() {
        return Err(Error::config(format!(
            "{}: pattern `{}` matches no ampy topic (ampy.{{env}}.{{domain}}.…)",
            shared.where_(),
            pattern.as_str()
        )));
    }
    for (env, domain) in pairs {
        let Some(s) = resolve_with(shared, env, domain, create).await? else {
            continue;
        };
        if out.iter().any(|(o, _)| o.name == s.name) {
            continue;
        }
        let p = pattern.as_str();
        let filter = if s.subjects.iter().any(|sub| subject_is_subset(p, sub)) {
            p.to_owned()
        } else {
            let parts: Vec<String> = s
                .subjects
                .iter()
                .filter_map(|sub| subject_intersection(p, sub))
                .collect();
            match parts.as_slice() {
                [one] => one.clone(),
                _ => {
                    return Err(Error::config(format!(
                        "{}: pattern `{p}` meets stream {} on {} of its subjects ({}); one consumer filter cannot express that",
                        shared.where_(),
                        s.name,
                        parts.len(),
                        s.subjects.join(", ")
                    )));
                }
            }
        };
        out.push((s, filter));
    }
    Ok(out)
}

/// One line per stream for `ampybus streams list`: name, subjects, messages, bytes, last
/// sequence, consumers.
///
/// ```no_run
/// # async fn demo(t: &ampybus::transport::nats::NatsTransport) -> ampybus::Result<()> {
/// for s in ampybus::transport::nats::streams::list(t.jetstream()).await? {
///     println!("{} {:?} {}", s.config.name, s.config.subjects, s.state.messages);
/// }
/// # Ok(()) }
/// ```
pub async fn list(js: &jetstream::Context) -> Result<Vec<stream::Info>> {
    use futures::TryStreamExt;
    let mut out: Vec<stream::Info> = js
        .streams()
        .try_collect()
        .await
        .map_err(|e| api_err("nats", "listing streams", e))?;
    out.sort_by(|a, b| a.config.name.cmp(&b.config.name));
    Ok(out)
}

/// The info of one stream.
///
/// ```no_run
/// # async fn demo(t: &ampybus::transport::nats::NatsTransport) -> ampybus::Result<()> {
/// let info = ampybus::transport::nats::streams::describe(t.jetstream(), "AMPY_DEV_BARS").await?;
/// println!("{}", info.state.messages);
/// # Ok(()) }
/// ```
pub async fn describe(js: &jetstream::Context, name: &str) -> Result<stream::Info> {
    let mut s = js.get_stream(name).await.map_err(|e| {
        Error::with_source(
            ErrorKind::Config,
            format!("nats: stream {name}: not found or not readable: {e}"),
            e,
        )
    })?;
    let info = s
        .info()
        .await
        .map_err(|e| api_err("nats", &format!("reading stream {name}"), e))?;
    Ok(info.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_api_subjects() {
        assert!(is_stream_api_for(
            "$JS.API.STREAM.INFO.A_DEV_BARS",
            "A_DEV_BARS"
        ));
        assert!(is_stream_api_for(
            "$JS.API.STREAM.CREATE.A_DEV_BARS",
            "A_DEV_BARS"
        ));
        assert!(!is_stream_api_for(
            "$JS.API.STREAM.INFO.XA_DEV_BARS",
            "A_DEV_BARS"
        ));
        assert!(!is_stream_api_for(
            "ampy.dev.bars.v1.A_DEV_BARS",
            "A_DEV_BARS"
        ));
    }

    #[test]
    fn subsets_and_intersections() {
        assert!(subject_is_subset("a.b", "a.b"));
        assert!(subject_is_subset("a.>", "a.>"));
        assert!(subject_is_subset("a.*", "a.>"));
        assert!(!subject_is_subset("a", "a.>"));
        assert!(!subject_is_subset("a.b.c", "a.*"));
        assert_eq!(subject_intersection("a.*", "a.b.c"), None);
        assert_eq!(
            subject_intersection("a.*.c", "a.b.*").as_deref(),
            Some("a.b.c")
        );
        assert_eq!(subject_intersection(">", "a.b").as_deref(), Some("a.b"));
    }

    #[test]
    fn pairs() {
        let p = TopicPattern::parse(">").unwrap();
        assert_eq!(pairs_for_pattern(&p).len(), 3 * Domain::ALL.len());
        let p = TopicPattern::parse("ampy.*.dlq.>").unwrap();
        assert_eq!(pairs_for_pattern(&p).len(), 3);
    }
}
