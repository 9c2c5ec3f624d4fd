//! Broker permissions from the registry, one user per service: a nats-server
//! `authorization` block ([`nats_config`]), a Redis ACL file ([`redis_acl`]) and `kafka-acls`
//! commands ([`kafka_acl`]).
//!
//! A service may publish on the patterns it owns and read what the registry lets it read
//! ([`TopicEntry::may_read`]); every service may publish and read the bus's own `dlq` and
//! `control` domains (DLQ writes, redrive, replay requests and reports) and gets what the
//! runtime needs on each broker (stream APIs, acks, the dedupe store, inboxes).
//!
//! Units: NATS streams, Redis streams and Kafka topics hold one `ampy.{env}.{domain}.{version}`
//! (NATS: env + domain), so read permissions on the broker are granted per unit: a service
//! that may read any entry of a unit may read the whole unit there. Publish permissions on NATS
//! follow the patterns exactly; on Redis and Kafka they are per unit too. The library enforces
//! per topic either way.

use super::{Registry, RegistryError, RegistryErrorKind, TopicEntry, file};
use crate::topic::{Domain, Env};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::Path;

/// Passwords per service, from a TOML file of `service = "password"` lines.
///
/// ```
/// let p = ampybus::registry::acl::parse_passwords("oms = \"s3cret\"\n", "pw.toml").unwrap();
/// assert_eq!(p["oms"], "s3cret");
/// ```
pub type Passwords = BTreeMap<String, String>;

/// Reads a passwords file (errors name the file and line).
///
/// ```
/// let e = ampybus::registry::acl::load_passwords(std::path::Path::new("/nonexistent")).unwrap_err();
/// assert!(e.to_string().contains("cannot read"));
/// ```
pub fn load_passwords(path: &Path) -> Result<Passwords, RegistryError> {
    let text = file::read(path)?;
    parse_passwords(&text, &path.display().to_string())
}

/// Parses a passwords file; `origin` names it in errors.
///
/// ```
/// let e = ampybus::registry::acl::parse_passwords("oms = 1\n", "pw.toml").unwrap_err();
/// assert!(e.to_string().starts_with("pw.toml:1: "), "{e}");
/// ```
pub fn parse_passwords(text: &str, origin: &str) -> Result<Passwords, RegistryError> {
    file::parse(text, origin)
}

/// The services of the registry with their passwords; a service without one is an error
/// naming it and the file.
fn users<'a>(
    reg: &Registry,
    passwords: &'a Passwords,
) -> Result<Vec<(String, &'a str)>, RegistryError> {
    let mut missing = Vec::new();
    let mut out = Vec::new();
    for s in reg.services() {
        match passwords.get(&s) {
            Some(p) => out.push((s, p.as_str())),
            None => missing.push(s),
        }
    }
    if missing.is_empty() {
        Ok(out)
    } else {
        Err(RegistryError::new(
            RegistryErrorKind::Invalid,
            "passwords file".to_owned(),
            None,
            format!("no password for service(s) {}", missing.join(", ")),
        ))
    }
}

/// The envs a pattern's env token may match.
fn envs(e: &TopicEntry) -> Vec<Env> {
    match e.pattern.env_token() {
        Some(t) => match t.parse::<Env>() {
            Ok(env) => vec![env],
            Err(_) => vec![Env::Dev, Env::Paper, Env::Prod],
        },
        None => vec![Env::Dev, Env::Paper, Env::Prod],
    }
}

/// The domain of an entry (literal in a valid registry).
fn domain(e: &TopicEntry) -> Option<Domain> {
    e.pattern.as_str().split('.').nth(2)?.parse().ok()
}

/// The version token of an entry, `*` when it is a wildcard.
fn version(e: &TopicEntry) -> String {
    match e.pattern.as_str().split('.').nth(3) {
        Some(v) if v != ">" => v.to_owned(),
        _ => "*".to_owned(),
    }
}

/// The entries a service owns and those it may read.
fn split<'a>(reg: &'a Registry, service: &str) -> (Vec<&'a TopicEntry>, Vec<&'a TopicEntry>) {
    let owned = reg
        .entries()
        .iter()
        .filter(|e| e.owner == service)
        .collect();
    let read = reg
        .entries()
        .iter()
        .filter(|e| e.may_read(service))
        .collect();
    (owned, read)
}

/// The `(env, domain)` units of entries.
fn units(entries: &[&TopicEntry]) -> BTreeSet<(&'static str, &'static str)> {
    let mut out = BTreeSet::new();
    for e in entries {
        if let Some(d) = domain(e) {
            for env in envs(e) {
                out.insert((env.as_str(), d.as_str()));
            }
        }
    }
    out
}

fn bus_units() -> BTreeSet<(&'static str, &'static str)> {
    let mut out = BTreeSet::new();
    for env in [Env::Dev, Env::Paper, Env::Prod] {
        for d in [Domain::Dlq, Domain::Control] {
            out.insert((env.as_str(), d.as_str()));
        }
    }
    out
}

fn quoted(list: &[String]) -> String {
    list.iter()
        .map(|s| format!("{s:?}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A nats-server configuration include: `authorization { users = [...] }` with one user per
/// service. `stream_prefix` is the binding's stream prefix (URL option `stream_prefix`,
/// default `AMPY`); streams are `{prefix}_{ENV}_{DOMAIN}`, the dedupe bucket
/// `{prefix}_dedupe` and the consumers' lease bucket `{prefix}_leases`.
///
/// Per user: publish on its owned patterns, `ampy.*.dlq.>` and `ampy.*.control.>`; the
/// JetStream API for the streams it writes or reads (info, create, message get) and, only on
/// streams it may read, consumers (create, info, next, delete) and `$JS.ACK`; the KV dedupe and lease
/// buckets; subscribe on `_INBOX.>` and the patterns it may read.
///
/// ```
/// use ampybus::registry::{Registry, acl};
/// let reg = Registry::parse(r#"
/// [[topic]]
/// pattern = "ampy.prod.orders.v1.>"
/// owner = "oms"
/// schemas = ["ampy.orders.v1.OrderRequest"]
/// tier = "at_least_once_dedupe"
/// retention_days = 30
/// consumers = ["risk"]
/// "#, "r.toml").unwrap();
/// let pw = acl::parse_passwords("oms = \"a\"\nrisk = \"b\"\n", "pw.toml").unwrap();
/// let conf = acl::nats_config(&reg, &pw, "AMPY").unwrap();
/// assert_eq!(conf.lines().find(|l| !l.starts_with('#')), Some("authorization {"));
/// assert!(conf.contains("\"$JS.API.CONSUMER.CREATE.AMPY_PROD_ORDERS.>\""));
/// ```
pub fn nats_config(
    reg: &Registry,
    passwords: &Passwords,
    stream_prefix: &str,
) -> Result<String, RegistryError> {
    let stream = |(env, d): (&str, &str)| {
        format!(
            "{stream_prefix}_{}_{}",
            env.to_ascii_uppercase(),
            d.to_ascii_uppercase()
        )
    };
    let kv = format!("{stream_prefix}_dedupe");
    let leases = format!("{stream_prefix}_leases");
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# Generated by `ampybus registry nats-config` from {}: one user per service.\n# Include it in nats-server.conf: `include \"auth.conf\"`.\nauthorization {{\n  users = [",
        reg.origin()
    );
    for (service, password) in users(reg, passwords)? {
        let (owned, read) = split(reg, &service);
        let read_units: BTreeSet<_> = units(&read).into_iter().chain(bus_units()).collect();
        let all_units: BTreeSet<_> = units(&owned)
            .into_iter()
            .chain(read_units.iter().copied())
            .collect();
        let mut publish: Vec<String> = owned.iter().map(|e| e.pattern.to_string()).collect();
        publish.extend(["ampy.*.dlq.>".to_owned(), "ampy.*.control.>".to_owned()]);
        publish.extend(
            [
                "$JS.API.INFO",
                "$JS.API.STREAM.NAMES",
                "$JS.API.STREAM.LIST",
            ]
            .map(str::to_owned),
        );
        for u in &all_units {
            let s = stream(*u);
            publish.push(format!("$JS.API.STREAM.INFO.{s}"));
            publish.push(format!("$JS.API.STREAM.CREATE.{s}"));
            publish.push(format!("$JS.API.STREAM.MSG.GET.{s}"));
        }
        for u in &read_units {
            let s = stream(*u);
            publish.push(format!("$JS.API.CONSUMER.CREATE.{s}"));
            publish.push(format!("$JS.API.CONSUMER.CREATE.{s}.>"));
            publish.push(format!("$JS.API.CONSUMER.INFO.{s}.>"));
            publish.push(format!("$JS.API.CONSUMER.MSG.NEXT.{s}.>"));
            publish.push(format!("$JS.API.CONSUMER.DELETE.{s}.>"));
            publish.push(format!("$JS.API.CONSUMER.NAMES.{s}"));
            publish.push(format!("$JS.API.CONSUMER.LIST.{s}"));
            publish.push(format!("$JS.ACK.{s}.>"));
        }
        // The KV buckets: the dedupe store and the consumers' leases (one active instance
        // per durable name, `order=across_instances`).
        for kv in [&kv, &leases] {
            publish.extend([
                format!("$KV.{kv}.>"),
                format!("$JS.API.STREAM.INFO.KV_{kv}"),
                format!("$JS.API.STREAM.CREATE.KV_{kv}"),
                format!("$JS.API.STREAM.MSG.GET.KV_{kv}"),
                format!("$JS.API.DIRECT.GET.KV_{kv}.>"),
                format!("$JS.API.DIRECT.GET.KV_{kv}"),
            ]);
        }
        let mut subscribe = vec!["_INBOX.>".to_owned()];
        subscribe.extend(read.iter().map(|e| e.pattern.to_string()));
        subscribe.extend(["ampy.*.dlq.>".to_owned(), "ampy.*.control.>".to_owned()]);
        let _ = writeln!(
            out,
            "    {{ user: {service:?}, password: {password:?}, permissions: {{\n        publish: {{ allow: [{}] }},\n        subscribe: {{ allow: [{}] }}\n    }} }}",
            quoted(&publish),
            quoted(&subscribe)
        );
    }
    out.push_str("  ]\n}\n");
    Ok(out)
}

/// The commands a reader needs on a stream it does not own (a Redis 7 ACL selector): reads,
/// and the consumer-group commands (which Redis counts as writes), never `XADD`.
const READER_COMMANDS: &str = "+@read +xreadgroup +xack +xclaim +xautoclaim +xgroup";

/// A Redis ACL file (`redis-server --aclfile`, Redis 7 or later; `user` lines only, as Redis
/// refuses comments there): the `default` user off and
/// one user per service with its password, every command on the streams it owns, the DLQ and
/// control streams and the dedupe keys, and a selector with the reader commands (reads and
/// consumer groups, no `XADD`) on the streams it may read. Stream keys are
/// `{key_prefix}ampy.{env}.{domain}.{version}`.
///
/// ```
/// use ampybus::registry::{Registry, acl};
/// let reg = Registry::parse(r#"
/// [[topic]]
/// pattern = "ampy.prod.orders.v1.>"
/// owner = "oms"
/// schemas = ["ampy.orders.v1.OrderRequest"]
/// tier = "at_least_once_dedupe"
/// retention_days = 30
/// "#, "r.toml").unwrap();
/// let pw = acl::parse_passwords("oms = \"a\"\n", "pw.toml").unwrap();
/// let acl = acl::redis_acl(&reg, &pw, "").unwrap();
/// assert!(acl.starts_with("user default off\nuser oms on >a "));
/// assert!(acl.contains(" ~ampy.prod.orders.v1 "));
/// ```
pub fn redis_acl(
    reg: &Registry,
    passwords: &Passwords,
    key_prefix: &str,
) -> Result<String, RegistryError> {
    let key = |e: &TopicEntry, env: &str| {
        format!(
            "{key_prefix}ampy.{env}.{}.{}",
            domain(e).map_or("*", Domain::as_str),
            version(e)
        )
    };
    // Redis ACL files hold `user` lines only: no comment naming the source.
    let mut out = "user default off\n".to_owned();
    for (service, password) in users(reg, passwords)? {
        if password.chars().any(char::is_whitespace) || password.is_empty() {
            return Err(RegistryError::new(
                RegistryErrorKind::Invalid,
                "passwords file".to_owned(),
                None,
                format!(
                    "password of service {service}: empty or has whitespace (Redis ACL files cannot hold it)"
                ),
            ));
        }
        let (owned, read) = split(reg, &service);
        let mut write = BTreeSet::new();
        for e in &owned {
            for env in envs(e) {
                write.insert(format!("~{}", key(e, env.as_str())));
            }
        }
        write.insert(format!("~{key_prefix}ampy.*.dlq.*"));
        write.insert(format!("~{key_prefix}ampy.*.control.*"));
        write.insert(format!("~{key_prefix}ampy:dedupe:*"));
        write.insert(format!("~{key_prefix}ampy:lease:*"));
        let mut readonly = BTreeSet::new();
        for e in &read {
            for env in envs(e) {
                let k = format!("~{}", key(e, env.as_str()));
                if !write.contains(&k) {
                    readonly.insert(k);
                }
            }
        }
        let mut line = format!(
            "user {service} on >{password} {} +@all",
            write.into_iter().collect::<Vec<_>>().join(" ")
        );
        if !readonly.is_empty() {
            let _ = write!(
                line,
                " ({} {READER_COMMANDS})",
                readonly.into_iter().collect::<Vec<_>>().join(" ")
            );
        }
        let _ = writeln!(out, "{line}");
    }
    Ok(out)
}

/// `kafka-acls` commands granting each service (principal `User:{service}`) write and describe
/// on the topics it owns, read and describe on those it may read and on the DLQ and control
/// topics (with write), and read on its consumer groups (`{namespace}` prefixed, or every group
/// (`'*'`) without a namespace: the durable name is chosen by the application). Topics are
/// `{namespace}ampy.{env}.{domain}.{version}`; a wildcard version is granted as a prefix.
/// Not tested against an ACL-enabled broker (none runs here): check the output before use.
///
/// ```
/// use ampybus::registry::{Registry, acl};
/// let reg = Registry::parse(r#"
/// [[topic]]
/// pattern = "ampy.prod.orders.v1.>"
/// owner = "oms"
/// schemas = ["ampy.orders.v1.OrderRequest"]
/// tier = "at_least_once_dedupe"
/// retention_days = 30
/// "#, "r.toml").unwrap();
/// let cmds = acl::kafka_acl(&reg, "", "localhost:9092");
/// assert!(cmds.contains("--allow-principal User:oms --operation Write --operation Describe --topic ampy.prod.orders.v1\n"));
/// assert!(cmds.contains("--allow-principal User:oms --operation Read --operation Describe --group '*'\n"));
/// ```
pub fn kafka_acl(reg: &Registry, namespace: &str, bootstrap: &str) -> String {
    let base = format!("kafka-acls --bootstrap-server {bootstrap} --add");
    let mut out = format!(
        "# Generated by `ampybus registry kafka-acl` from {}: one principal per service.\n# Untested against an ACL-enabled broker; review before applying.\n",
        reg.origin()
    );
    let topic_arg = |e: &TopicEntry, env: &str| {
        let d = domain(e).map_or("*", Domain::as_str);
        let v = version(e);
        if v == "*" {
            format!("--resource-pattern-type prefixed --topic {namespace}ampy.{env}.{d}.")
        } else {
            format!("--topic {namespace}ampy.{env}.{d}.{v}")
        }
    };
    for service in reg.services() {
        let (owned, read) = split(reg, &service);
        let _ = writeln!(out, "\n# service {service}");
        let mut lines = BTreeSet::new();
        for e in &owned {
            for env in envs(e) {
                lines.insert(format!(
                    "{base} --allow-principal User:{service} --operation Write --operation Describe {}",
                    topic_arg(e, env.as_str())
                ));
            }
        }
        for e in &read {
            for env in envs(e) {
                lines.insert(format!(
                    "{base} --allow-principal User:{service} --operation Read --operation Describe {}",
                    topic_arg(e, env.as_str())
                ));
            }
        }
        for line in lines {
            let _ = writeln!(out, "{line}");
        }
        for (env, d) in bus_units() {
            let _ = writeln!(
                out,
                "{base} --allow-principal User:{service} --operation Read --operation Write --operation Describe --operation Create --resource-pattern-type prefixed --topic {namespace}ampy.{env}.{d}."
            );
        }
        // Group ids are `{namespace}{durable}` (or `{namespace}ampy-reader-…` for ephemeral
        // readers): every group under the namespace, all groups without one.
        let group = if namespace.is_empty() {
            "--group '*'".to_owned()
        } else {
            format!("--resource-pattern-type prefixed --group {namespace}")
        };
        let _ = writeln!(
            out,
            "{base} --allow-principal User:{service} --operation Read --operation Describe {group}"
        );
    }
    out
}
