//! The one statistics helper of every bench: best / median / worst of per-round values, as
//! the reports print them (`{"best", "median", "worst"}` in `--json`).

use serde_json::{Value, json};

/// `v` rounded to `digits` decimals.
pub(crate) fn round(v: f64, digits: i32) -> f64 {
    let m = 10f64.powi(digits);
    (v * m).round() / m
}

/// (best, median, worst) of per-round values (NaN rounds left out; all NaN when none is
/// left). The median of an even count is the mean of the two middle values.
pub(crate) fn spread(values: &[f64], higher_is_better: bool) -> (f64, f64, f64) {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| !x.is_nan()).collect();
    if v.is_empty() {
        return (f64::NAN, f64::NAN, f64::NAN);
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let median = if v.len() % 2 == 1 {
        v[v.len() / 2]
    } else {
        (v[v.len() / 2 - 1] + v[v.len() / 2]) / 2.0
    };
    let (lo, hi) = (v[0], v[v.len() - 1]);
    if higher_is_better {
        (hi, median, lo)
    } else {
        (lo, median, hi)
    }
}

/// The median of per-round values.
pub(crate) fn median(values: &[f64]) -> f64 {
    spread(values, true).1
}

/// `{"best", "median", "worst"}`, each rounded to `digits` decimals.
pub(crate) fn spread_json(values: &[f64], higher_is_better: bool, digits: i32) -> Value {
    let (b, m, w) = spread(values, higher_is_better);
    json!({"best": round(b, digits), "median": round(m, digits), "worst": round(w, digits)})
}

/// `{"best", "median", "worst", "runs"}` of a series where higher is better, unrounded.
pub(crate) fn series(values: &[f64]) -> Value {
    let (b, m, w) = spread(values, true);
    json!({"best": b, "median": m, "worst": w, "runs": values})
}

/// A series' best / median / worst as printed in a report line.
pub(crate) fn show_series(v: &Value) -> String {
    format!("{} / {} / {}", v["best"], v["median"], v["worst"])
}

/// CPU seconds this process has used so far (user and system, every thread), for a bench's
/// CPU per message: a figure that idle cores and a slower host do not blur the way they blur
/// msg/s.
pub(crate) fn cpu_seconds() -> f64 {
    // SAFETY: `getrusage` writes the struct it is given and nothing else.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) } != 0 {
        return f64::NAN;
    }
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(u.ru_utime) + secs(u.ru_stime)
}
