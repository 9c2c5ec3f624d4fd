//! The test brokers of `scripts/brokers.sh`, shared by the core's and the CLI's test binaries.

use std::path::Path;
use std::process::Command;

/// Starts (or finds) the test broker `which` (`nats`, `redis`, `kafka`, `postgres`) on 127.0.0.1 through
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
