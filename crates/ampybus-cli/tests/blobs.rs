//! Blob-stored payloads on every transport: `blob_store=file:///…` (and `s3://bucket/prefix`
//! on the S3-compatible server of `scripts/brokers.sh`, on the embedded log and NATS) on the
//! bus URL, a 5 MiB payload published with `pub` and read back whole with `sub --json` (hash
//! and size verified), and a tampered blob refused naming the mismatch.

mod common;

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

/// Where a test's blobs go: a `blob_store=` URL, the environment the CLI needs for it, and
/// the directory that must outlive the test (a `file://` store).
struct Store {
    url: String,
    env: Vec<(String, String)>,
    _dir: Option<tempfile::TempDir>,
}

/// A fresh `file://` store in a temporary directory.
fn file_store() -> Store {
    let dir = tempfile::tempdir().unwrap();
    Store {
        url: format!("file://{}", dir.path().display()),
        env: Vec::new(),
        _dir: Some(dir),
    }
}

/// A fresh bucket on the S3-compatible test server (`scripts/brokers.sh start s3`).
fn s3_store() -> Store {
    let (url, env) = common::s3_bucket("blobs/cli");
    Store {
        url,
        env,
        _dir: None,
    }
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

/// Publishes 5 MiB on a topic of its own at `base` (a bus URL, `?` or `&` appended) with its
/// blobs in `store`, reads it back, then tampers with the stored blob and reads again.
fn round_trip(base: &str, topic: &str, store: Store) {
    let blobs =
        ampybus::codec::BlobStore::from_url_with_env(&store.url, store.env.clone()).unwrap();
    let sep = if base.contains('?') { '&' } else { '?' };
    let url = format!("{base}{sep}blob_store={}", store.url);
    let env: Vec<(&str, &str)> = store
        .env
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let input = tempfile::tempdir().unwrap();
    let file = input.path().join("payload.bin");
    let data = payload();
    std::fs::write(&file, &data).unwrap();
    common::pub_one_env(
        &url,
        topic,
        "n-1",
        &["--payload-file", file.to_str().unwrap(), "--print-ids"],
        &env,
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
        common::ampybus_on_env(&url, &args, &env)
    };
    // As carried: a pointer.
    let o = sub(&["--blob-pointers"]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    let env = &o.json_lines()[0];
    assert_eq!(env["payload_base64"], "");
    let blob_ref = env["headers"]["blob_ref"].as_str().unwrap().to_owned();
    assert!(blob_ref.starts_with(blobs.url_prefix()), "{blob_ref}");
    // The blob holds the payload as carried (gzip, over 1 MiB still): its size and hash.
    let stored = block_on(blobs.get(&blob_ref)).unwrap();
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
    let mut bytes = stored.to_vec();
    bytes[0] ^= 0xff;
    let key = blob_ref.strip_prefix(blobs.url_prefix()).unwrap();
    block_on(blobs.put(key, bytes.into())).unwrap();
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
    round_trip(
        dir.path().to_str().unwrap(),
        "ampy.dev.news.v1.blob",
        file_store(),
    );
}

#[test]
fn five_mib_round_trip_on_nats() {
    common::start_broker("nats");
    round_trip(
        "nats://127.0.0.1:4222?stream_prefix=AMPYBLOB&max_age_days=1",
        &format!("ampy.dev.news.v1.blob{}", common::unique()),
        file_store(),
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
        file_store(),
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
        file_store(),
    );
}

#[test]
fn five_mib_round_trip_on_the_embedded_log_over_s3() {
    let dir = tempfile::tempdir().unwrap();
    round_trip(
        dir.path().to_str().unwrap(),
        "ampy.dev.news.v1.blob",
        s3_store(),
    );
}

#[test]
fn five_mib_round_trip_on_nats_over_s3() {
    common::start_broker("nats");
    round_trip(
        "nats://127.0.0.1:4222?stream_prefix=AMPYBLOB&max_age_days=1",
        &format!("ampy.dev.news.v1.blobs3{}", common::unique()),
        s3_store(),
    );
}
