//! `docs/grafana/alerts.yml`: valid for Prometheus (`promtool check rules`, Debian's
//! `prometheus` package, installed by scripts/test.sh) and naming metrics this library serves.

use std::path::PathBuf;
use std::process::Command;

fn rules() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../docs/grafana/alerts.yml")
}

#[test]
fn promtool_accepts_the_alert_rules() {
    let out = Command::new("promtool")
        .arg("check")
        .arg("rules")
        .arg(rules())
        .output()
        .expect("run promtool (apt-get install prometheus; scripts/test.sh installs it)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    assert!(text.contains("SUCCESS: 6 rules found"), "{text}");
}

#[test]
fn the_rules_name_metrics_the_library_serves() {
    let yml = std::fs::read_to_string(rules()).unwrap();
    let served = ampybus::obs::BusMetrics::new().encode();
    // OpenMetrics: a counter family `x` has samples `x_total`.
    for (in_rules, family) in [
        (
            "bus_consumer_lag_seconds",
            "# TYPE bus_consumer_lag_seconds gauge",
        ),
        ("bus_dlq_total", "# TYPE bus_dlq counter"),
        (
            "bus_publish_failed_total",
            "# TYPE bus_publish_failed counter",
        ),
    ] {
        assert!(yml.contains(in_rules), "{in_rules} not in the rules");
        assert!(served.contains(family), "{family} not served");
    }
}
