//! Validation of envelopes in their JSON diagnostic form, as `ampybus validate` and the golden
//! tests use it.
//!
//! A file holds one envelope or several, concatenated or one per line (the forms
//! `ampybus pub --json-envelope` reads and `ampybus sub --json` writes); each is checked on its
//! own ([`validate_envelopes_json`]). An envelope is valid when:
//!
//! 1. it parses as the JSON form ([`Envelope::from_json_str`]: an object with `topic`,
//!    `headers` of strings, `payload_base64`, optional `payload_json`, nothing else);
//! 2. it passes every publish-side rule ([`Envelope::validate_for_publish`]: topic taxonomy,
//!    headers, partition key shape for the domain, no inline payload next to `blob_ref`);
//! 3. its payload is consistent with its headers:
//!    * with `content_encoding=gzip` the payload inflates (at most
//!      [`codec::DEFAULT_MAX_INFLATED`] bytes). A gzipped payload smaller than
//!      [`codec::COMPRESS_THRESHOLD`] is accepted: the threshold tells publishers when they must
//!      compress, not when they may;
//!    * a `schema_hash` in the name-only form matches `schema_fqdn` (the linked `sha256:` form
//!      cannot be checked without the file descriptor and is accepted);
//!    * with a [`PayloadDecoder`] that knows `schema_fqdn`, the (inflated) payload decodes as
//!      that type, and a `payload_json` in the file equals the decoded value.
//!
//! An empty payload is allowed, except with `content_encoding=gzip` (zero bytes are not a gzip
//! stream, and consumers would dead-letter the message). A pointer envelope (`blob_ref`) is
//! allowed and its blob is not fetched. `payload_json` is informational and is only
//! compared when the decoder knows the schema.
//!
//! ```
//! use ampybus::validate::validate_envelope_json;
//! let text = r#"{
//!   "topic": "ampy.dev.orders.v1.requests",
//!   "headers": {
//!     "message_id": "019a6b3c-1d2e-7f00-8a00-0123456789ab",
//!     "schema_fqdn": "ampy.orders.v1.OrderRequest",
//!     "schema_version": "1.0.0",
//!     "content_type": "application/x-protobuf",
//!     "produced_at": "2025-09-05T19:31:01.462000Z",
//!     "producer": "oms@1",
//!     "source": "oms",
//!     "run_id": "run-1",
//!     "partition_key": "co_1",
//!     "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
//!   },
//!   "payload_base64": "CgRjb18x"
//! }"#;
//! let env = validate_envelope_json(text, None).unwrap();
//! assert_eq!(env.payload.len(), 6);
//! ```

use crate::codec;
use crate::envelope::{Envelope, PayloadDecoder};
use crate::error::{Error, ErrorKind, Result};
use crate::headers::names;
use crate::schema_hash::{self, HashCheck};
use std::path::{Path, PathBuf};

/// Validates one envelope in its JSON form: shape, publish-side contract rules and payload
/// consistency (see the [module docs](self)). Returns the parsed envelope.
///
/// Every error is an [`Error`] whose message names the field or header and the rule:
/// [`ErrorKind::Envelope`] for the JSON shape, [`ErrorKind::Topic`] for the topic,
/// [`ErrorKind::Header`] for headers (including a `schema_hash` that does not match), and
/// [`ErrorKind::Payload`] for a payload that does not inflate or decode, or a `payload_json`
/// that disagrees with it.
///
/// ```
/// use ampybus::{ErrorKind, PayloadDecoder, validate::validate_envelope_json};
///
/// // A decoder that only knows a "schema" whose payload must be UTF-8 text.
/// struct Text;
/// impl PayloadDecoder for Text {
///     fn decode_json(&self, fqdn: &str, bytes: &[u8]) -> Option<Result<serde_json::Value, String>> {
///         (fqdn == "ampy.news.v1.Text").then(|| {
///             std::str::from_utf8(bytes).map(|s| s.into()).map_err(|e| e.to_string())
///         })
///     }
/// }
///
/// let text = r#"{"topic":"ampy.dev.news.v1.raw","headers":{
///   "message_id":"019a6b3c-1d2e-7f00-8a00-0123456789ab","schema_fqdn":"ampy.news.v1.Text",
///   "schema_version":"1.0.0","content_type":"application/x-protobuf",
///   "produced_at":"2025-09-05T19:31:01.462000Z","producer":"p","source":"s","run_id":"r",
///   "partition_key":"n-1","traceparent":"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"},
///   "payload_base64":"aGk=","payload_json":"hi"}"#;
/// validate_envelope_json(text, Some(&Text)).unwrap();
///
/// let wrong = text.replace(r#""payload_json":"hi""#, r#""payload_json":"ho""#);
/// let err = validate_envelope_json(&wrong, Some(&Text)).unwrap_err();
/// assert_eq!(err.kind(), ErrorKind::Payload);
/// assert!(err.message().starts_with("payload_json:"), "{err}");
///
/// let garbage = text.replace("aGk=", "/w==");
/// let err = validate_envelope_json(&garbage, Some(&Text)).unwrap_err();
/// assert!(err.message().starts_with("payload: does not decode as ampy.news.v1.Text:"), "{err}");
/// ```
pub fn validate_envelope_json(
    text: &str,
    decoder: Option<&dyn PayloadDecoder>,
) -> Result<Envelope> {
    let value: serde_json::Value =
        serde_json::from_str(text).map_err(|e| Error::envelope(format!("not valid JSON: {e}")))?;
    validate_envelope_value(&value, decoder)
}

/// The result for one envelope of a file that may hold several ([`validate_envelopes_json`]).
#[derive(Debug)]
pub struct EnvelopeCheck {
    /// The envelope's position in the file, from 1.
    pub index: usize,
    /// The line the envelope starts on, from 1.
    pub line: usize,
    /// The envelope, or why it is invalid (as [`validate_envelope_json`] says).
    pub result: Result<Envelope>,
}

/// Validates every envelope of a text holding one or several JSON objects, concatenated or
/// one per line, as `ampybus pub --json-envelope` reads them: one [`EnvelopeCheck`] per
/// envelope, in order. A JSON syntax error ends the list (what follows it cannot be told
/// apart), and a text without any JSON value gives one failed check.
///
/// ```
/// use ampybus::validate::validate_envelopes_json;
/// let one = r#"{"topic":"ampy.dev.news.v1.raw","headers":{
///   "message_id":"019a6b3c-1d2e-7f00-8a00-0123456789ab","schema_fqdn":"ampy.raw.v1.Bytes",
///   "schema_version":"1.0.0","content_type":"application/x-protobuf",
///   "produced_at":"2025-09-05T19:31:01.462000Z","producer":"p","source":"s","run_id":"r",
///   "partition_key":"n-1","traceparent":"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"},
///   "payload_base64":"aGk="}"#.replace('\n', "");
/// let text = format!("{one}\n{}\n{one}\n", one.replace("n-1", ""));
/// let checks = validate_envelopes_json(&text, None);
/// assert_eq!(checks.len(), 3);
/// assert!(checks[0].result.is_ok() && checks[2].result.is_ok());
/// assert_eq!((checks[1].index, checks[1].line), (2, 2));
/// let e = checks[1].result.as_ref().unwrap_err();
/// assert!(e.message().starts_with("`partition_key`"), "{e}");
/// let broken = validate_envelopes_json(&format!("{one}\n{{\"topic\":"), None);
/// assert!(broken[1].result.as_ref().unwrap_err().message().starts_with("not valid JSON"));
/// assert!(validate_envelopes_json(" \n", None)[0].result.is_err());
/// ```
pub fn validate_envelopes_json(
    text: &str,
    decoder: Option<&dyn PayloadDecoder>,
) -> Vec<EnvelopeCheck> {
    let mut out = Vec::new();
    let mut stream = serde_json::Deserializer::from_str(text).into_iter::<serde_json::Value>();
    loop {
        let line = line_of_next_token(text, stream.byte_offset());
        let Some(item) = stream.next() else { break };
        let index = out.len() + 1;
        match item {
            Ok(value) => out.push(EnvelopeCheck {
                index,
                line,
                result: validate_envelope_value(&value, decoder),
            }),
            Err(e) => {
                out.push(EnvelopeCheck {
                    index,
                    line,
                    result: Err(Error::envelope(format!("not valid JSON: {e}"))),
                });
                break;
            }
        }
    }
    if out.is_empty() {
        out.push(EnvelopeCheck {
            index: 1,
            line: 1,
            result: Err(Error::envelope(
                "not valid JSON: the text holds no JSON object",
            )),
        });
    }
    out
}

/// The line (from 1) of the first non-whitespace character at or after `offset`.
fn line_of_next_token(text: &str, offset: usize) -> usize {
    let offset = offset.min(text.len());
    let skipped = text[offset..].len() - text[offset..].trim_start().len();
    text[..offset + skipped].matches('\n').count() + 1
}

fn validate_envelope_value(
    value: &serde_json::Value,
    decoder: Option<&dyn PayloadDecoder>,
) -> Result<Envelope> {
    let env = Envelope::from_json_value(value)?;
    env.validate_for_publish()?;

    // A pointer envelope carries no inline payload (checked above); its blob is not fetched.
    if env.headers.blob_ref().is_some() {
        return Ok(env);
    }

    let raw = codec::inflate_if_needed(&env.headers, &env.payload, codec::DEFAULT_MAX_INFLATED)
        .map_err(|e| Error::payload(format!("payload_base64: {}", e.message())))?;

    let fqdn = env.headers.schema_fqdn().unwrap_or_default();
    if let Some(received) = env.headers.schema_hash()
        && let HashCheck::Mismatch { expected } = schema_hash::check(received, fqdn, None)
    {
        return Err(Error::header(
            names::SCHEMA_HASH,
            format!("does not match `schema_fqdn` {fqdn:?}: expected {expected}, got {received}"),
        ));
    }

    // A dead-lettered message carries the original bytes as they were, poison included: its
    // payload must match `payload_hash` but need not decode.
    let dead_lettered = env.topic().is_ok_and(|t| t.domain() == crate::Domain::Dlq);
    if dead_lettered && let Some(want) = env.headers.payload_hash() {
        let got = codec::sha256_tag(&env.payload);
        if got != want {
            return Err(Error::header(
                names::PAYLOAD_HASH,
                format!("does not match the payload: expected {got}, got {want}"),
            ));
        }
    }
    if let Some(decoded) = decoder.and_then(|d| d.decode_json(fqdn, &raw)) {
        let decoded = match decoded {
            Ok(v) => v,
            Err(_) if dead_lettered && value.get("payload_json").is_none() => return Ok(env),
            Err(e) => {
                return Err(Error::payload(format!(
                    "payload: does not decode as {fqdn}: {e}"
                )));
            }
        };
        if let Some(given) = value.get("payload_json")
            && *given != decoded
        {
            return Err(Error::payload(format!(
                "payload_json: does not equal the decoded payload_base64 (decoded as {fqdn}: {})",
                crate::error::show(&decoded.to_string())
            )));
        }
    }
    Ok(env)
}

/// Validates an envelope file, or every `*.json` file under a directory (recursively, in
/// sorted path order). Returns one `(path, result)` per file; an unreadable path or file gives
/// an [`ErrorKind::Config`] error naming the path. An empty directory gives an empty list. A
/// file holding several envelopes is valid when each is; its result is then its first
/// envelope, or the error of its first invalid one with the message starting
/// `envelope N (line L): ` ([`validate_path_envelopes`] gives every envelope's result).
///
/// Symbolic links to files are followed; symbolic links to directories are not descended
/// into (so a link cycle cannot loop). A file passed directly is validated whatever its
/// extension.
///
/// ```
/// let dir = tempfile::tempdir().unwrap();
/// std::fs::create_dir(dir.path().join("sub")).unwrap();
/// std::fs::write(dir.path().join("sub/b.json"), "{}").unwrap();
/// std::fs::write(dir.path().join("a.json"), "[]").unwrap();
/// std::fs::write(dir.path().join("notes.txt"), "ignored").unwrap();
/// let results = ampybus::validate::validate_path(dir.path(), None);
/// let names: Vec<_> = results.iter().map(|(p, _)| p.strip_prefix(dir.path()).unwrap().to_owned()).collect();
/// assert_eq!(names, [std::path::Path::new("a.json"), std::path::Path::new("sub/b.json")]);
/// assert!(results.iter().all(|(_, r)| r.is_err()));
///
/// let missing = ampybus::validate::validate_path(&dir.path().join("nope.json"), None);
/// let err = missing[0].1.as_ref().unwrap_err();
/// assert!(err.message().contains("nope.json"), "{err}");
/// ```
pub fn validate_path(
    path: &Path,
    decoder: Option<&dyn PayloadDecoder>,
) -> Vec<(PathBuf, Result<Envelope>)> {
    validate_path_envelopes(path, decoder)
        .into_iter()
        .map(|(p, r)| {
            let r = r.and_then(|mut checks| {
                if checks.len() == 1 {
                    return checks.remove(0).result;
                }
                let mut first = None;
                for c in checks {
                    match c.result {
                        Err(e) => {
                            let msg =
                                format!("envelope {} (line {}): {}", c.index, c.line, e.message());
                            return Err(Error::new(e.kind(), msg));
                        }
                        Ok(env) => {
                            first.get_or_insert(env);
                        }
                    }
                }
                first.ok_or_else(|| Error::envelope("the file holds no envelope"))
            });
            (p, r)
        })
        .collect()
}

/// Like [`validate_path`], with the result of every envelope of each file
/// ([`validate_envelopes_json`]); the per-file error is for a path or file that cannot be
/// read.
///
/// ```
/// let dir = tempfile::tempdir().unwrap();
/// std::fs::write(dir.path().join("two.json"), "{}\n[]\n").unwrap();
/// let results = ampybus::validate::validate_path_envelopes(dir.path(), None);
/// let checks = results[0].1.as_ref().unwrap();
/// assert_eq!(checks.iter().map(|c| c.line).collect::<Vec<_>>(), [1, 2]);
/// assert!(checks.iter().all(|c| c.result.is_err()));
/// ```
pub fn validate_path_envelopes(
    path: &Path,
    decoder: Option<&dyn PayloadDecoder>,
) -> Vec<(PathBuf, Result<Vec<EnvelopeCheck>>)> {
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) => return vec![(path.to_owned(), Err(unreadable(path, e)))],
    };
    if !meta.is_dir() {
        return vec![(path.to_owned(), validate_file(path, decoder))];
    }
    let mut files = Vec::new();
    let mut failures = Vec::new();
    collect_json(path, &mut files, &mut failures);
    let mut out: Vec<(PathBuf, Result<Vec<EnvelopeCheck>>)> = files
        .into_iter()
        .map(|f| {
            let r = validate_file(&f, decoder);
            (f, r)
        })
        .chain(failures.into_iter().map(|(p, e)| (p, Err(e))))
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

fn validate_file(path: &Path, decoder: Option<&dyn PayloadDecoder>) -> Result<Vec<EnvelopeCheck>> {
    let text = std::fs::read_to_string(path).map_err(|e| unreadable(path, e))?;
    Ok(validate_envelopes_json(&text, decoder))
}

fn unreadable(path: &Path, e: std::io::Error) -> Error {
    let msg = format!("{}: cannot read: {e}", path.display());
    Error::with_source(ErrorKind::Config, msg, e)
}

fn collect_json(dir: &Path, files: &mut Vec<PathBuf>, failures: &mut Vec<(PathBuf, Error)>) {
    let entries = match std::fs::read_dir(dir) {
        Ok(it) => it,
        Err(e) => {
            failures.push((dir.to_owned(), unreadable(dir, e)));
            return;
        }
    };
    for entry in entries {
        let entry = match entry {
            Ok(en) => en,
            Err(e) => {
                failures.push((dir.to_owned(), unreadable(dir, e)));
                continue;
            }
        };
        let p = entry.path();
        let is_json = p.extension().is_some_and(|x| x == "json");
        match entry.file_type() {
            Ok(ft) if ft.is_dir() => collect_json(&p, files, failures),
            Ok(ft) if ft.is_symlink() => {
                // Follow links to files only; a dangling link to a `.json` name is reported.
                match std::fs::metadata(&p) {
                    Ok(m) if m.is_dir() => {}
                    Ok(_) if is_json => files.push(p),
                    Ok(_) => {}
                    Err(e) if is_json => failures.push((p.clone(), unreadable(&p, e))),
                    Err(_) => {}
                }
            }
            Ok(_) if is_json => files.push(p),
            Ok(_) => {}
            Err(e) => failures.push((p.clone(), unreadable(&p, e))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::headers::Headers;
    use crate::topic::Topic;

    fn base() -> Envelope {
        let topic = Topic::parse("ampy.dev.bars.v1.XNAS.AAPL").unwrap();
        let h = Headers::for_publish("ampy.bars.v1.BarBatch", "p@1", "p", "XNAS.AAPL");
        Envelope::new(&topic, h, b"\x0a\x04AAPL".to_vec())
    }

    struct Utf8;
    impl PayloadDecoder for Utf8 {
        fn decode_json(
            &self,
            fqdn: &str,
            bytes: &[u8],
        ) -> Option<std::result::Result<serde_json::Value, String>> {
            (fqdn == "ampy.bars.v1.BarBatch").then(|| {
                std::str::from_utf8(bytes)
                    .map(serde_json::Value::from)
                    .map_err(|e| e.to_string())
            })
        }
    }

    #[test]
    fn small_gzip_and_empty_payloads() {
        let mut env = base();
        env.headers.set("content_encoding", "gzip");
        env.payload = codec::gzip(b"tiny").into();
        let back = validate_envelope_json(&env.to_json_line(None), None).unwrap();
        assert_eq!(back, env);
        env.payload = Default::default();
        let e = validate_envelope_json(&env.to_json_line(None), None).unwrap_err();
        assert!(e.message().contains("does not inflate"), "{e}");
        env.headers.remove("content_encoding");
        validate_envelope_json(&env.to_json_line(None), Some(&Utf8)).unwrap();
        validate_envelope_json(&env.to_json_line(None), None).unwrap();
    }

    #[test]
    fn gzip_bytes_that_do_not_inflate_are_a_payload_error() {
        let mut env = base();
        env.headers.set("content_encoding", "gzip");
        let e = validate_envelope_json(&env.to_json_line(None), None).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Payload);
        assert!(
            e.message().starts_with(
                "payload_base64: content_encoding=gzip but the payload does not inflate"
            ),
            "{e}"
        );
    }

    #[test]
    fn schema_hash_forms() {
        let mut env = base();
        env.headers.set(
            "schema_hash",
            schema_hash::name_only("ampy.bars.v1.BarBatch"),
        );
        validate_envelope_json(&env.to_json_line(None), None).unwrap();
        env.headers
            .set("schema_hash", format!("sha256:{}", "ab".repeat(32)));
        validate_envelope_json(&env.to_json_line(None), None).unwrap();
        env.headers
            .set("schema_hash", schema_hash::name_only("ampy.bars.v1.Bar"));
        let e = validate_envelope_json(&env.to_json_line(None), None).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Header);
        assert!(
            e.message()
                .starts_with("`schema_hash`: does not match `schema_fqdn`"),
            "{e}"
        );
    }

    #[test]
    fn decoder_checks_payload_and_payload_json() {
        let mut env = base();
        env.payload = b"hello".to_vec().into();
        // payload_json written by a decoder must round-trip.
        let line = env.to_json_line(Some(&Utf8));
        assert!(line.contains(r#""payload_json":"hello""#), "{line}");
        validate_envelope_json(&line, Some(&Utf8)).unwrap();
        // Without a decoder, payload_json is informational only.
        let wrong = line.replace(r#""payload_json":"hello""#, r#""payload_json":42"#);
        validate_envelope_json(&wrong, None).unwrap();
        let e = validate_envelope_json(&wrong, Some(&Utf8)).unwrap_err();
        assert!(
            e.message().starts_with("payload_json: does not equal"),
            "{e}"
        );
        // Undecodable payload.
        env.payload = vec![0xff, 0xfe].into();
        let e = validate_envelope_json(&env.to_json_line(None), Some(&Utf8)).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Payload);
        assert!(
            e.message()
                .starts_with("payload: does not decode as ampy.bars.v1.BarBatch: "),
            "{e}"
        );
        // Unknown schema: not decoded.
        env.headers.set("schema_fqdn", "ampy.bars.v1.Other");
        validate_envelope_json(&env.to_json_line(None), Some(&Utf8)).unwrap();
    }

    #[test]
    fn gzip_payload_is_inflated_before_decoding() {
        let mut env = base();
        env.headers.set("content_encoding", "gzip");
        env.payload = codec::gzip(b"zipped text").into();
        let line = env.to_json_line(Some(&Utf8));
        assert!(line.contains(r#""payload_json":"zipped text""#), "{line}");
        validate_envelope_json(&line, Some(&Utf8)).unwrap();
    }

    #[test]
    fn pointer_envelopes_are_not_fetched() {
        let mut env = base();
        env.payload = Default::default();
        env.headers.set("blob_ref", "file:///nonexistent/blob");
        env.headers.set("blob_hash", codec::sha256_tag(b"x"));
        env.headers.set("blob_size", "1");
        validate_envelope_json(&env.to_json_line(None), Some(&Utf8)).unwrap();
    }

    #[test]
    fn validate_path_reports_unreadable_files() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("bad-utf8.json"), [0xff, 0xfe]).unwrap();
        std::fs::write(dir.path().join("ok.json"), base().to_json_pretty(None)).unwrap();
        let r = validate_path(dir.path(), None);
        assert_eq!(r.len(), 2);
        let e = r[0].1.as_ref().unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Config);
        assert!(e.message().contains("bad-utf8.json: cannot read"), "{e}");
        r[1].1.as_ref().unwrap();
        // A file passed directly.
        let single = validate_path(&dir.path().join("ok.json"), None);
        assert_eq!(single.len(), 1);
        single[0].1.as_ref().unwrap();
        // An empty dir.
        let empty = tempfile::tempdir().unwrap();
        assert!(validate_path(empty.path(), None).is_empty());
    }

    #[cfg(unix)]
    #[test]
    fn validate_path_does_not_follow_directory_links() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("d")).unwrap();
        std::fs::write(dir.path().join("d/x.json"), base().to_json_pretty(None)).unwrap();
        std::os::unix::fs::symlink(dir.path(), dir.path().join("d/loop")).unwrap();
        std::os::unix::fs::symlink(dir.path().join("d/x.json"), dir.path().join("y.json")).unwrap();
        std::os::unix::fs::symlink(dir.path().join("gone.json"), dir.path().join("z.json"))
            .unwrap();
        let r = validate_path(dir.path(), None);
        let names: Vec<_> = r
            .iter()
            .map(|(p, _)| p.strip_prefix(dir.path()).unwrap().to_owned())
            .collect();
        assert_eq!(
            names,
            [
                Path::new("d/x.json"),
                Path::new("y.json"),
                Path::new("z.json")
            ]
        );
        assert!(r[0].1.is_ok() && r[1].1.is_ok());
        assert!(
            r[2].1
                .as_ref()
                .unwrap_err()
                .message()
                .contains("z.json: cannot read")
        );
    }
}
