//! The test brokers of `scripts/brokers.sh`, shared by the core's and the CLI's test binaries.

use std::path::Path;
use std::process::Command;

/// Starts (or finds) the test broker `which` (`nats`, `redis`, `kafka`, `postgres`, `s3`) on 127.0.0.1 through
/// `scripts/brokers.sh start`, once per test process.
pub fn start_broker(which: &'static str) {
    static STARTED: std::sync::Mutex<Vec<&'static str>> = std::sync::Mutex::new(Vec::new());
    let mut started = STARTED.lock().unwrap_or_else(|p| p.into_inner());
    if started.contains(&which) {
        return;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let out = Command::new("bash")
        .arg(root.join("scripts/brokers.sh"))
        .args(["start", which])
        .output()
        .expect("run scripts/brokers.sh");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    started.push(which);
}

/// A fresh bucket on the S3-compatible server of `scripts/brokers.sh` (127.0.0.1:`S3_PORT`,
/// default 9000; started when absent): its `s3://` blob store URL (`prefix` under the bucket)
/// and the AWS environment a client needs for it (test credentials; the server takes any).
#[allow(dead_code)] // not every test binary that includes `common` uses it
pub fn s3_bucket(prefix: &str) -> (String, Vec<(String, String)>) {
    use std::io::{Read, Write};
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    start_broker("s3");
    let port: u16 = std::env::var("S3_PORT")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(9000);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let bucket = format!(
        "ampybus-{}-{nanos:x}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    );
    // CreateBucket: an unsigned `PUT /{bucket}` (the test server needs no signature).
    let mut tcp =
        std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect to the S3 server");
    write!(
        tcp,
        "PUT /{bucket} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut answer = String::new();
    tcp.read_to_string(&mut answer).unwrap();
    assert!(
        answer.starts_with("HTTP/1.1 200"),
        "CreateBucket {bucket}: {answer}"
    );
    let env = [
        ("AWS_ACCESS_KEY_ID", "ampybus-test"),
        ("AWS_SECRET_ACCESS_KEY", "ampybus-test-secret"),
        ("AWS_REGION", "us-east-1"),
    ]
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .to_vec();
    let url = format!("s3://{bucket}/{prefix}?endpoint=http://127.0.0.1:{port}");
    (url, env)
}
