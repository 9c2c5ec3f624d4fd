//! Blob-stored payloads on every transport: `blob_store=file:///…` on the bus URL, a 5 MiB
//! payload published with `pub` and read back whole with `sub --json` (hash and size
//! verified), and a tampered blob refused naming the mismatch.

mod common;

use common::ampybus_on;

/// 5 MiB that gzip cannot shrink below the 1 MiB inline limit.
fn payload() -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..5 * 1024 * 1024)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Publishes 5 MiB on a topic of its own at `base` (a bus URL, `?` or `&` appended), reads it
/// back, then tampers with the stored blob and reads again.
fn round_trip(base: &str, topic: &str) {
    let blobs = tempfile::tempdir().unwrap();
    let sep = if base.contains('?') { '&' } else { '?' };
    let url = format!("{base}{sep}blob_store=file://{}", blobs.path().display());
    let file = blobs.path().join("payload.bin");
    let data = payload();
    std::fs::write(&file, &data).unwrap();
    common::pub_one(
        &url,
        topic,
        "n-1",
        &["--payload-file", file.to_str().unwrap(), "--print-ids"],
    );
    let sub = |extra: &[&str]| {
        let mut args = vec![
            "sub",
            "--pattern",
            topic,
            "--json",
            "--max",
            "1",
            "--timeout",
            "30",
        ];
        args.extend_from_slice(extra);
        ampybus_on(&url, &args)
    };
    // As carried: a pointer.
    let o = sub(&["--blob-pointers"]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    let env = &o.json_lines()[0];
    assert_eq!(env["payload_base64"], "");
    let blob_ref = env["headers"]["blob_ref"].as_str().unwrap().to_owned();
    assert!(
        blob_ref.starts_with(&format!("file://{}", blobs.path().display())),
        "{blob_ref}"
    );
    // The blob holds the payload as carried (gzip, over 1 MiB still): its size and hash.
    let stored = std::fs::read(blob_ref.strip_prefix("file://").unwrap()).unwrap();
    assert_eq!(env["headers"]["content_encoding"], "gzip");
    assert_eq!(env["headers"]["blob_size"], stored.len().to_string());
    assert_eq!(
        env["headers"]["blob_hash"],
        ampybus::codec::sha256_tag(&stored)
    );
    // Inlined: the 5 MiB, verified.
    let o = sub(&[]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    use base64::Engine as _;
    let got = base64::engine::general_purpose::STANDARD
        .decode(o.json_lines()[0]["payload_base64"].as_str().unwrap())
        .unwrap();
    assert!(
        got == stored,
        "payload as carried differs ({} bytes)",
        got.len()
    );
    let gzip = ampybus::Headers::new().with("content_encoding", "gzip");
    let raw = ampybus::codec::inflate_if_needed(&gzip, &got, 64 << 20).unwrap();
    assert!(
        raw[..] == data[..],
        "inflated payload differs ({} bytes)",
        raw.len()
    );
    // Tampered: refused, naming the message and the mismatch.
    let path = blob_ref.strip_prefix("file://").unwrap();
    let mut bytes = std::fs::read(path).unwrap();
    bytes[0] ^= 0xff;
    std::fs::write(path, bytes).unwrap();
    let o = sub(&[]);
    assert_eq!(o.code, 2, "{}", o.stderr);
    assert!(
        o.stderr.contains(&format!("blob_ref {blob_ref}")),
        "{}",
        o.stderr
    );
    assert!(o.stderr.contains("blob_hash"), "{}", o.stderr);
}

#[test]
fn five_mib_round_trip_on_the_embedded_log() {
    let dir = tempfile::tempdir().unwrap();
    round_trip(dir.path().to_str().unwrap(), "ampy.dev.news.v1.blob");
}

#[test]
fn five_mib_round_trip_on_nats() {
    common::start_broker("nats");
    round_trip(
        "nats://127.0.0.1:4222?stream_prefix=AMPYBLOB&max_age_days=1",
        &format!("ampy.dev.news.v1.blob{}", common::unique()),
    );
}

#[test]
fn five_mib_round_trip_on_redis() {
    common::start_broker("redis");
    round_trip(
        &format!(
            "redis://127.0.0.1:6379?key_prefix=blob{}:",
            common::unique()
        ),
        "ampy.dev.news.v1.blob",
    );
}

#[test]
fn five_mib_round_trip_on_kafka() {
    common::start_broker("kafka");
    round_trip(
        &format!(
            "kafka://127.0.0.1:9092?namespace=blob{}.&partitions=1",
            common::unique()
        ),
        "ampy.dev.news.v1.blob",
    );
}
