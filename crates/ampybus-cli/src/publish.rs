//! `ampybus pub`.

use crate::cli::PubArgs;
use crate::error::{CliError, CliResult, EXIT_OK};
use crate::util::{self, Out};
use ampybus::headers::names;
use ampybus::{Envelope, Headers, Topic};
use bytes::Bytes;
use std::io::Read;
use std::path::Path;
use std::time::Instant;

/// Runs `pub`.
pub async fn run(url: &str, args: PubArgs) -> CliResult<u8> {
    if let Some(path) = &args.json_envelope {
        return publish_envelope_file(url, path, args.print_ids).await;
    }
    let required = |v: &Option<String>, flag: &str| -> CliResult<String> {
        v.clone()
            .ok_or_else(|| CliError::usage(format!("{flag} is required (or use --json-envelope)")))
    };
    let topic_s = required(&args.topic, "--topic")?;
    let producer = required(&args.producer, "--producer")?;
    let source = required(&args.source, "--source")?;
    let pk = required(&args.pk, "--pk")?;

    let topic =
        Topic::parse(&topic_s).map_err(|e| CliError::bus(format!("--topic {topic_s:?}"), &e))?;
    let extra = parse_headers(&args.headers)?;
    if args.count > 1 && extra.iter().any(|(k, _)| k == names::MESSAGE_ID) {
        return Err(CliError::usage(
            "--header message_id=…: cannot be combined with --count > 1 (every message needs its own id)",
        ));
    }
    let payload = read_payload(&args)?;
    let run_id = args.run_id.clone().unwrap_or_else(util::new_run_id);

    let make = || -> Headers {
        let mut h = Headers::for_publish(&args.schema, &producer, &source, &pk);
        if let Some(v) = &args.schema_version {
            h.set(names::SCHEMA_VERSION, v.clone());
        }
        h.set(names::RUN_ID, run_id.clone());
        if let Some(k) = &args.dedupe_key {
            h.set(names::DEDUPE_KEY, k.clone());
        }
        if extra.iter().any(|(k, _)| k == names::TRACEPARENT) {
            // Let the given traceparent define trace_id/span_id.
            h.remove(names::TRACE_ID);
            h.remove(names::SPAN_ID);
        }
        for (k, v) in &extra {
            h.set(k.clone(), v.clone());
        }
        h.fill_publish_defaults();
        h
    };

    // Check the contract before touching the data directory.
    make()
        .validate_for_publish(&topic)
        .map_err(|e| header_error(&e, &args, &extra))?;

    let bus = util::connect(url).await?;
    let mut out = Out::new();
    let started = Instant::now();
    let (mut sent, mut first_seq, mut last_seq, mut dups) = (0u64, None, 0u64, 0u64);
    let mut stdout_open = true;
    while sent < args.count {
        let n = args.batch.min(args.count - sent);
        let batch: Vec<Envelope> = (0..n)
            .map(|_| Envelope::new(&topic, make(), payload.clone()))
            .collect();
        let ids: Vec<String> = if args.print_ids {
            batch
                .iter()
                .map(|e| e.headers.message_id().unwrap_or_default().to_owned())
                .collect()
        } else {
            Vec::new()
        };
        let receipts = bus
            .publish_batch(batch)
            .await
            .map_err(|e| CliError::bus(format!("publishing to {topic_s}"), &e))?;
        for r in &receipts {
            first_seq.get_or_insert(r.sequence);
            last_seq = r.sequence;
            dups += u64::from(r.duplicate);
        }
        sent += n;
        if stdout_open {
            for id in &ids {
                if !out.line(id)? {
                    stdout_open = false;
                    break;
                }
            }
            stdout_open = stdout_open && out.flush()?;
        }
    }
    let secs = started.elapsed().as_secs_f64();
    util::close(&bus).await?;
    eprintln!(
        "published {sent} message(s) to {topic_s} in {secs:.3}s ({:.0} msg/s), seq {}..{last_seq}, run_id {run_id}{}",
        sent as f64 / secs.max(1e-9),
        first_seq.unwrap_or(0),
        if dups > 0 {
            format!(", {dups} duplicate(s) not stored again")
        } else {
            String::new()
        }
    );
    Ok(EXIT_OK)
}

/// Parses `--header NAME=VALUE` values.
fn parse_headers(raw: &[String]) -> CliResult<Vec<(String, String)>> {
    raw.iter()
        .map(|h| match h.split_once('=') {
            Some((k, v)) if !k.trim().is_empty() => Ok((k.to_owned(), v.to_owned())),
            _ => Err(CliError::usage(format!(
                "--header {h:?}: expected NAME=VALUE with a non-empty NAME"
            ))),
        })
        .collect()
}

fn read_payload(args: &PubArgs) -> CliResult<Bytes> {
    if let Some(p) = &args.payload_file {
        let read = if p.as_os_str() == "-" {
            let mut v = Vec::new();
            std::io::stdin().read_to_end(&mut v).map(|_| v)
        } else {
            std::fs::read(p)
        };
        return read
            .map(Bytes::from)
            .map_err(|e| CliError::usage(format!("--payload-file {:?}: cannot read: {e}", p)));
    }
    if let Some(h) = &args.payload_hex {
        return util::decode_hex(h)
            .map(Bytes::from)
            .map_err(|e| CliError::usage(format!("--payload-hex: {e}")));
    }
    Ok(args
        .payload
        .as_ref()
        .map(|s| Bytes::from(s.clone().into_bytes()))
        .unwrap_or_default())
}

/// Names the flag that set the header an error is about.
fn header_error(e: &ampybus::Error, args: &PubArgs, extra: &[(String, String)]) -> CliError {
    let header = e
        .message()
        .strip_prefix('`')
        .and_then(|m| m.split_once('`'))
        .map(|(h, _)| h.to_owned())
        .unwrap_or_default();
    let context = if let Some((k, v)) = extra.iter().rev().find(|(k, _)| *k == header) {
        format!("--header {:?}", format!("{k}={v}"))
    } else {
        let flag =
            |name: &str, v: &Option<String>| format!("{name} {:?}", v.as_deref().unwrap_or(""));
        match header.as_str() {
            names::PARTITION_KEY => flag("--pk", &args.pk),
            names::PRODUCER => flag("--producer", &args.producer),
            names::SOURCE => flag("--source", &args.source),
            names::SCHEMA_FQDN => format!("--schema {:?}", args.schema),
            names::SCHEMA_VERSION => flag("--schema-version", &args.schema_version),
            names::RUN_ID => flag("--run-id", &args.run_id),
            names::DEDUPE_KEY => flag("--dedupe-key", &args.dedupe_key),
            _ => String::new(),
        }
    };
    CliError::bus(context, e)
}

/// Publishes the envelope(s) of a JSON file exactly as written.
async fn publish_envelope_file(url: &str, path: &Path, print_ids: bool) -> CliResult<u8> {
    let shown = path.display();
    let text = std::fs::read_to_string(path)
        .map_err(|e| CliError::usage(format!("--json-envelope {shown}: cannot read: {e}")))?;
    let mut envs = Vec::new();
    let mut stream = serde_json::Deserializer::from_str(&text).into_iter::<serde_json::Value>();
    loop {
        let start = stream.byte_offset();
        let Some(item) = stream.next() else { break };
        let line = line_of_next_token(&text, start);
        let where_ = format!(
            "--json-envelope {shown}: envelope {} (line {line})",
            envs.len() + 1
        );
        let value = item.map_err(|e| {
            CliError::usage(format!("{where_}: invalid envelope: not valid JSON: {e}"))
        })?;
        let env = Envelope::from_json_value(&value).map_err(|e| CliError::bus(&where_, &e))?;
        env.validate_for_publish()
            .map_err(|e| CliError::bus(&where_, &e))?;
        envs.push(env);
    }
    if envs.is_empty() {
        return Err(CliError::usage(format!(
            "--json-envelope {shown}: invalid envelope: the file holds no JSON object"
        )));
    }
    let ids: Vec<String> = envs
        .iter()
        .map(|e| e.headers.message_id().unwrap_or_default().to_owned())
        .collect();
    let n = envs.len();
    let bus = util::connect(url).await?;
    let started = Instant::now();
    let mut receipts = Vec::with_capacity(n);
    let mut rest = envs;
    while !rest.is_empty() {
        let tail = rest.split_off(rest.len().min(1000));
        receipts.extend(
            bus.publish_wire(rest)
                .await
                .map_err(|e| CliError::bus(format!("--json-envelope {shown}"), &e))?,
        );
        rest = tail;
    }
    let secs = started.elapsed().as_secs_f64();
    util::close(&bus).await?;
    if print_ids {
        let mut out = Out::new();
        for id in &ids {
            if !out.line(id)? {
                break;
            }
        }
        out.flush()?;
    }
    eprintln!(
        "published {n} envelope(s) from {shown} in {secs:.3}s, seq {}..{}",
        receipts.first().map_or(0, |r| r.sequence),
        receipts.last().map_or(0, |r| r.sequence),
    );
    Ok(EXIT_OK)
}

fn line_of_next_token(text: &str, offset: usize) -> usize {
    let offset = offset.min(text.len());
    let skipped = text[offset..].len() - text[offset..].trim_start().len();
    text[..offset + skipped].matches('\n').count() + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_syntax() {
        assert_eq!(
            parse_headers(&["a=b=c".into(), "x=".into()]).unwrap(),
            vec![("a".into(), "b=c".into()), ("x".into(), String::new())]
        );
        assert!(parse_headers(&["novalue".into()]).is_err());
        assert!(
            parse_headers(&["=v".into()])
                .unwrap_err()
                .message
                .contains("--header \"=v\"")
        );
    }

    #[test]
    fn token_lines() {
        let t = "{}\n\n  {}";
        assert_eq!(line_of_next_token(t, 0), 1);
        assert_eq!(line_of_next_token(t, 2), 3);
    }
}
