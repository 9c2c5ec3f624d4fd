//! What `bench-nats`, `bench-redis` and `bench-kafka` share: the per-round throughput of a raw client and of
//! ampybus on the same broker, reported as best / median / worst with the per-round ratio.

use crate::error::{CliError, CliResult};
use ampybus::{Envelope, Headers, Topic};
use serde_json::{Value, json};

/// `n` bar envelopes on `topic` with `payload` bytes each, over 100 partition keys, headers
/// filled as a publish would (the same input for the raw client and for ampybus).
pub fn envelopes(topic: &str, n: u64, payload: usize) -> CliResult<Vec<Envelope>> {
    let topic = Topic::parse(topic).map_err(|e| CliError::bus("topic", &e))?;
    let body = vec![b'x'; payload];
    Ok((0..n)
        .map(|i| {
            let mut h = Headers::for_publish(
                "ampy.bars.v1.BarBatch",
                "bench@1",
                "bench",
                &format!("XNAS.S{}", i % 100),
            );
            h.fill_publish_defaults();
            Envelope::new(&topic, h, body.clone())
        })
        .collect())
}

/// The ampybus side of a round: `envs` through `bus.publish_wire`, in msg/s.
pub async fn bus_round(bus: &ampybus::Bus, envs: Vec<Envelope>) -> CliResult<f64> {
    let n = envs.len();
    let start = std::time::Instant::now();
    bus.publish_wire(envs)
        .await
        .map_err(|e| CliError::bus("ampybus publish", &e))?;
    Ok(n as f64 / start.elapsed().as_secs_f64())
}

/// Best, median, worst (higher is better).
fn spread(v: &[f64]) -> (f64, f64, f64) {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    (s[s.len() - 1], s[s.len() / 2], s[0])
}

/// Rounds of raw client vs ampybus, msg/s.
pub struct RawVsBus {
    raw_name: &'static str,
    raw: Vec<f64>,
    ours: Vec<f64>,
    ratios: Vec<f64>,
}

impl RawVsBus {
    /// `raw_name` names the raw client (`async-nats`, `redis`) in the report.
    pub fn new(raw_name: &'static str) -> Self {
        RawVsBus {
            raw_name,
            raw: Vec::new(),
            ours: Vec::new(),
            ratios: Vec::new(),
        }
    }

    /// Records one round and reports it on stderr.
    pub fn round(&mut self, round: u64, raw: f64, ours: f64) {
        eprintln!(
            "round {round}: raw {} {raw:.0} msg/s, ampybus {ours:.0} msg/s, ratio {:.3}",
            self.raw_name,
            ours / raw
        );
        self.raw.push(raw);
        self.ours.push(ours);
        self.ratios.push(ours / raw);
    }

    /// Prints the report on stdout: one JSON object (`config` fields plus the three series)
    /// or a table.
    pub fn print(&self, as_json: bool, config: Value) {
        let (rb, rm, rw) = spread(&self.raw);
        let (ob, om, ow) = spread(&self.ours);
        let (xb, xm, xw) = spread(&self.ratios);
        if as_json {
            let mut v = config;
            v[format!("raw_{}_msg_s", self.raw_name.replace('-', "_"))] =
                json!({"best": rb, "median": rm, "worst": rw, "runs": self.raw});
            v["ampybus_msg_s"] = json!({"best": ob, "median": om, "worst": ow, "runs": self.ours});
            v["ratio"] = json!({"best": xb, "median": xm, "worst": xw, "runs": self.ratios});
            crate::util::outln!("{v}");
        } else {
            let raw_label = format!("raw {} msg/s", self.raw_name);
            crate::util::outln!("{:<22} {:>12} {:>12} {:>12}", "", "best", "median", "worst");
            crate::util::outln!("{raw_label:<22} {rb:>12.0} {rm:>12.0} {rw:>12.0}");
            crate::util::outln!("{:<22} {ob:>12.0} {om:>12.0} {ow:>12.0}", "ampybus msg/s");
            crate::util::outln!(
                "{:<22} {xb:>12.3} {xm:>12.3} {xw:>12.3}",
                "ratio ampybus/raw"
            );
        }
    }
}
