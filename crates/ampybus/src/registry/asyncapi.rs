//! The AsyncAPI 3.0 document of a registry: one channel per pattern (a wildcard env as the
//! `{env}` parameter), the owner's `send` operation and one `receive` operation per consumer
//! (`any` when the entry lets every service read), messages with the envelope headers as
//! message headers and payload schemas from a [`SchemaSource`] (the CLI reads them off the
//! `.proto` descriptors of `ampybus-proto`; the core knows no domain schema).

use super::{RAW_SCHEMA, Registry, TopicEntry};
use serde_json::{Map, Value, json};
use std::collections::BTreeMap;

/// Where payload schemas come from.
///
/// ```
/// use ampybus::registry::asyncapi::SchemaSource;
/// use std::collections::BTreeMap;
/// struct Opaque;
/// impl SchemaSource for Opaque {
///     fn add_schema(&self, _fqdn: &str, _out: &mut BTreeMap<String, serde_json::Value>) -> Option<String> {
///         None
///     }
/// }
/// assert!(Opaque.add_schema("ampy.bars.v1.BarBatch", &mut BTreeMap::new()).is_none());
/// ```
pub trait SchemaSource {
    /// Adds the JSON Schema of message `fqdn` and of every type it refers to (`$ref`s to
    /// `#/components/schemas/{name}`) to `out`, and returns the name of the message's own
    /// schema; `None` when the message is unknown.
    fn add_schema(&self, fqdn: &str, out: &mut BTreeMap<String, Value>) -> Option<String>;
}

/// A component name from a dotted name (`ampy.bars.v1.BarBatch` → `ampy_bars_v1_BarBatch`).
///
/// ```
/// assert_eq!(ampybus::registry::asyncapi::component_name("ampy.bars.v1.BarBatch"), "ampy_bars_v1_BarBatch");
/// ```
pub fn component_name(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// A channel id from a pattern (`ampy.*.orders.v1.>` → `ampy_any_orders_v1_all`).
fn channel_id(p: &str) -> String {
    component_name(&p.replace('*', "any").replace('>', "all"))
}

/// The envelope headers as a JSON Schema (the contract's table, DESIGN §1).
fn headers_schema() -> Value {
    let s = |desc: &str| json!({"type": "string", "description": desc});
    json!({
        "type": "object",
        "description": "ampybus envelope headers (string values; unknown headers are carried through)",
        "required": ["message_id", "schema_fqdn", "schema_version", "content_type", "produced_at", "producer", "source", "run_id", "partition_key"],
        "properties": {
            "message_id": {"type": "string", "format": "uuid", "description": "UUIDv7 on publish, lowercase hyphenated"},
            "schema_fqdn": s("Payload type, e.g. ampy.bars.v1.BarBatch"),
            "schema_version": {"type": "string", "pattern": "^[0-9]+\\.[0-9]+\\.[0-9]+$", "description": "semver"},
            "content_type": {"type": "string", "enum": ["application/x-protobuf", "application/json"]},
            "content_encoding": {"type": "string", "enum": ["gzip"], "description": "absent or gzip (payloads over 128 KiB)"},
            "produced_at": {"type": "string", "format": "date-time", "description": "RFC3339 UTC"},
            "producer": s("service@instance; the service is the part before @"),
            "source": s("upstream system"),
            "run_id": s("producer run"),
            "traceparent": s("W3C trace context"),
            "partition_key": s("ordering key, shape by domain"),
            "dedupe_key": s("optional idempotency key within the domain"),
            "retry_count": s("attempts so far (unsigned decimal)"),
            "dlq_reason": s("code: detail, on DLQ topics"),
            "schema_hash": s("optional schema hash"),
            "blob_ref": s("object-store pointer for large payloads"),
            "blob_hash": s("sha256:<hex> of the blob"),
            "blob_size": s("blob bytes (decimal)")
        }
    })
}

fn raw_schema() -> Value {
    json!({"type": "string", "format": "binary", "description": "opaque bytes (ampy.raw.v1.Bytes)"})
}

/// The channel of an entry: address, `{env}` parameter, messages, description.
fn channel(e: &TopicEntry, messages: &[String]) -> Value {
    let wild_env = e.pattern.env_token() == Some("*");
    let address = if wild_env {
        let mut toks: Vec<&str> = e.pattern.as_str().split('.').collect();
        toks[1] = "{env}";
        toks.join(".")
    } else {
        e.pattern.as_str().to_owned()
    };
    let mut c = Map::new();
    c.insert("address".into(), json!(address));
    let mut desc = format!(
        "Pattern `{}` (`*` one token, `>` the rest). Owner: {}. Tier: {}. Retention: {} days.",
        e.pattern.as_str(),
        e.owner,
        e.tier,
        e.retention_days
    );
    if let Some(r) = e.max_rate {
        desc.push_str(&format!(" Max rate: {r} msg/s."));
    }
    if let Some(d) = &e.description {
        desc = format!("{d}. {desc}");
    }
    c.insert("description".into(), json!(desc));
    let msgs: Map<String, Value> = messages
        .iter()
        .map(|m| {
            (
                m.clone(),
                json!({"$ref": format!("#/components/messages/{m}")}),
            )
        })
        .collect();
    c.insert("messages".into(), Value::Object(msgs));
    if wild_env {
        c.insert(
            "parameters".into(),
            json!({"env": {"enum": ["dev", "paper", "prod"], "description": "environment"}}),
        );
    }
    c.insert(
        "x-ampybus".into(),
        json!({"owner": e.owner, "tier": e.tier.as_str(), "retention_days": e.retention_days,
               "max_rate": e.max_rate, "consumers": e.consumers}),
    );
    Value::Object(c)
}

/// The AsyncAPI 3.0 document of `reg` as JSON.
///
/// ```
/// use ampybus::registry::{Registry, asyncapi};
/// use std::collections::BTreeMap;
/// struct NoSchemas;
/// impl asyncapi::SchemaSource for NoSchemas {
///     fn add_schema(&self, _: &str, _: &mut BTreeMap<String, serde_json::Value>) -> Option<String> { None }
/// }
/// let reg = Registry::parse(r#"
/// [[topic]]
/// pattern = "ampy.*.news.v1.>"
/// owner = "news"
/// schemas = ["ampy.raw.v1.Bytes"]
/// tier = "at_least_once"
/// retention_days = 7
/// consumers = ["ui"]
/// "#, "r.toml").unwrap();
/// let doc = asyncapi::document(&reg, &NoSchemas);
/// assert_eq!(doc["asyncapi"], "3.0.0");
/// assert_eq!(doc["channels"]["ampy_any_news_v1_all"]["address"], "ampy.{env}.news.v1.>");
/// assert_eq!(doc["operations"]["news_send_ampy_any_news_v1_all"]["action"], "send");
/// assert_eq!(doc["operations"]["ui_receive_ampy_any_news_v1_all"]["action"], "receive");
/// ```
pub fn document(reg: &Registry, schemas: &dyn SchemaSource) -> Value {
    let mut components_schemas: BTreeMap<String, Value> = BTreeMap::new();
    components_schemas.insert("EnvelopeHeaders".into(), headers_schema());
    let mut messages: BTreeMap<String, Value> = BTreeMap::new();
    let mut channels = Map::new();
    let mut operations = Map::new();
    for e in reg.entries() {
        let id = channel_id(e.pattern.as_str());
        let mut names = Vec::new();
        for fqdn in &e.schemas {
            let name = component_name(fqdn);
            if !messages.contains_key(&name) {
                let payload = if fqdn == RAW_SCHEMA {
                    components_schemas.insert(name.clone(), raw_schema());
                    json!({"$ref": format!("#/components/schemas/{name}")})
                } else {
                    match schemas.add_schema(fqdn, &mut components_schemas) {
                        Some(s) => json!({"$ref": format!("#/components/schemas/{s}")}),
                        None => json!({"type": "string", "format": "binary",
                                        "description": format!("{fqdn}: schema not available")}),
                    }
                };
                let content_type = if fqdn == RAW_SCHEMA {
                    "application/octet-stream"
                } else {
                    "application/x-protobuf"
                };
                messages.insert(
                    name.clone(),
                    json!({
                        "name": fqdn,
                        "title": fqdn,
                        "summary": format!("schema_fqdn = {fqdn}"),
                        "contentType": content_type,
                        "headers": {"$ref": "#/components/schemas/EnvelopeHeaders"},
                        "payload": payload,
                    }),
                );
            }
            names.push(name);
        }
        channels.insert(id.clone(), channel(e, &names));
        let op = |action: &str, who: &str| {
            let msgs: Vec<Value> = names
                .iter()
                .map(|m| json!({"$ref": format!("#/channels/{id}/messages/{m}")}))
                .collect();
            json!({
                "action": action,
                "channel": {"$ref": format!("#/channels/{id}")},
                "summary": format!("{who} {action}s on {}", e.pattern.as_str()),
                "messages": msgs,
            })
        };
        operations.insert(
            format!("{}_send_{id}", component_name(&e.owner)),
            op("send", &e.owner),
        );
        match &e.consumers {
            None => {
                operations.insert(format!("any_receive_{id}"), op("receive", "any service"));
            }
            Some(list) => {
                for c in list {
                    operations.insert(
                        format!("{}_receive_{id}", component_name(c)),
                        op("receive", c),
                    );
                }
            }
        }
    }
    json!({
        "asyncapi": "3.0.0",
        "info": {
            "title": "ampybus topics",
            "version": "1.0.0",
            "description": format!("Generated by `ampybus registry asyncapi` from {}.", reg.origin()),
        },
        "defaultContentType": "application/x-protobuf",
        "channels": channels,
        "operations": operations,
        "components": {
            "messages": messages,
            "schemas": components_schemas,
        }
    })
}

/// Writes a JSON value as YAML (block style; every string double-quoted, so no value is
/// re-typed by a YAML reader).
///
/// ```
/// let y = ampybus::registry::asyncapi::to_yaml(&serde_json::json!({"a": [1, "x"], "b": {}}));
/// assert_eq!(y, "\"a\":\n  - 1\n  - \"x\"\n\"b\": {}\n");
/// ```
pub fn to_yaml(v: &Value) -> String {
    let mut out = String::new();
    yaml_block(v, 0, &mut out);
    out
}

fn scalar(v: &Value) -> String {
    match v {
        Value::Object(m) if m.is_empty() => "{}".into(),
        Value::Array(a) if a.is_empty() => "[]".into(),
        // JSON strings, numbers, booleans and null are YAML flow scalars.
        other => other.to_string(),
    }
}

fn is_block(v: &Value) -> bool {
    matches!(v, Value::Object(m) if !m.is_empty()) || matches!(v, Value::Array(a) if !a.is_empty())
}

fn yaml_block(v: &Value, indent: usize, out: &mut String) {
    let pad = " ".repeat(indent);
    match v {
        Value::Object(m) if !m.is_empty() => {
            for (k, val) in m {
                let key = Value::String(k.clone()).to_string();
                if is_block(val) {
                    out.push_str(&format!("{pad}{key}:\n"));
                    yaml_block(val, indent + 2, out);
                } else {
                    out.push_str(&format!("{pad}{key}: {}\n", scalar(val)));
                }
            }
        }
        Value::Array(a) if !a.is_empty() => {
            for val in a {
                if is_block(val) {
                    out.push_str(&format!("{pad}-\n"));
                    yaml_block(val, indent + 2, out);
                } else {
                    out.push_str(&format!("{pad}- {}\n", scalar(val)));
                }
            }
        }
        other => out.push_str(&format!("{pad}{}\n", scalar(other))),
    }
}
