//! The ampybus conformance suite: one behaviour suite that every transport binding must pass.
//!
//! A binding implements [`TransportFactory`] (a fresh, isolated namespace per test and a way to
//! reconnect to it) and runs the suite either case by case with [`conformance_tests!`] (one
//! `#[tokio::test]` per case) or all at once with [`run_all`], which returns a [`SuiteReport`]
//! listing every case as passed, failed or *not applicable* (a capability the binding does not
//! claim, or a tier not built yet) — a case that does not apply never passes silently.
//!
//! Rules the cases follow: exact counts, no sleep used as synchronisation (waits poll counters
//! with a generous timeout that turns a hang into a failure), sizes scaled by the
//! `AMPYBUS_TEST_SCALE` environment variable (default 1).
//!
//! See `README.md` next to this crate for what each case checks.

#![warn(missing_docs)]

mod cases;
mod fault_cases;
mod nats_server;
mod order_cases;
mod report;
mod status;
mod support;
mod tier_cases;
mod transport_cases;
mod urls;

pub use cases::{
    Case, at_least_once_across_crash, backpressure_bounded_in_flight, best_effort_drop_conflate,
    dedupe_by_message_id_and_key, dlq_contents_and_redrive, graceful_shutdown_loses_nothing,
    per_key_order, replay_keys, replay_window, replay_window_and_keys, retry_counts_and_backoff,
    run_case,
};
pub use fault_cases::{broker_restart_mid_run, consumer_crash_mid_run};
pub use nats_server::NatsServer;
pub use order_cases::{Disruption, KillActive, order_across_instances, order_with_disruption};
pub use report::{CaseReport, SuiteReport};
pub use status::CaseStatus;
pub use support::{
    Capabilities, OwnBrokers, OwnServer, RedisServer, TestContext, TransportFactory,
    all_topic_stats, fault_headers, hang_timeout, http_get, raw, redrive, scale, start_test_broker,
    timed,
};
pub use tier_cases::best_effort_tier;
pub use transport_cases::{
    ack_survives_a_reopen, close_during_a_fetch, expired_lease_comes_back_counted,
    in_progress_extends_the_deadline, nack_delay_redelivers_after_it, pattern_spans_streams,
    shared_durable_splits_the_work, start_at_latest_and_time,
};
pub use urls::{BadUrls, bad_urls_fail_fast_and_clearly};

/// Runs every case against `factory`, one after the other, and reports each (a failing case
/// is caught and reported; it does not stop the others).
pub async fn run_all(factory: &dyn TransportFactory) -> SuiteReport {
    run_cases(factory, Case::ALL).await
}

/// Runs the given cases against `factory`, in order, and reports each.
pub async fn run_cases(factory: &dyn TransportFactory, cases: &[Case]) -> SuiteReport {
    use futures::FutureExt;
    let mut results = Vec::with_capacity(cases.len());
    for &case in cases {
        let started = std::time::Instant::now();
        let outcome = std::panic::AssertUnwindSafe(run_case(factory, case))
            .catch_unwind()
            .await;
        let status = match outcome {
            Ok(status) => status,
            Err(panic) => CaseStatus::Failed(report::panic_message(&*panic)),
        };
        results.push(CaseReport {
            case,
            status,
            elapsed: started.elapsed(),
        });
    }
    SuiteReport {
        transport: factory.name().to_owned(),
        results,
    }
}

/// Expands to one `#[tokio::test(flavor = "multi_thread", worker_threads = 2)]` per case of the
/// suite (every entry of the case table, named after the case), each building the factory
/// with `$factory` (an expression evaluated in every test). A case that does not apply passes
/// the test but prints `NOT APPLICABLE: <reason>`; use [`run_all`] to get the list in a
/// report. The calling crate needs `tokio` (with the `macros` and `rt-multi-thread` features)
/// as a dev-dependency.
///
/// A compiled, running use is `tests/embedded.rs` of this crate; in outline:
///
/// ```text
/// struct MyFactory;
/// // impl ampybus_conformance::TransportFactory for MyFactory { … }
/// ampybus_conformance::conformance_tests!(MyFactory);
/// ```
#[macro_export]
macro_rules! conformance_tests {
    ($factory:expr) => {
        $crate::__with_case_table!([$crate::__conformance_test_fns] { $factory });
    };
}

/// Expands the case table into test functions (used by [`conformance_tests!`]).
#[doc(hidden)]
#[macro_export]
macro_rules! __conformance_test_fns {
    ($factory:expr; $($name:ident => $variant:ident: $run:path, [$($flag:ident),*];)*) => {
        $(
            #[::tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let factory = $factory;
                $crate::run_case_test(&factory, $crate::Case::$variant).await;
            }
        )*
    };
}

/// Runs one case as a test: panics when it fails, prints `NOT APPLICABLE: …` when it does not
/// apply, and prints the elapsed time. Used by [`conformance_tests!`].
pub async fn run_case_test(factory: &dyn TransportFactory, case: Case) {
    let started = std::time::Instant::now();
    let status = run_case(factory, case).await;
    let elapsed = started.elapsed();
    match status {
        CaseStatus::Passed(detail) => {
            eprintln!(
                "[{}] {}: passed in {:.2?} ({detail})",
                factory.name(),
                case.name(),
                elapsed
            )
        }
        CaseStatus::NotApplicable(reason) => {
            eprintln!(
                "[{}] {}: NOT APPLICABLE: {reason}",
                factory.name(),
                case.name()
            )
        }
        CaseStatus::Failed(why) => panic!("[{}] {}: failed: {why}", factory.name(), case.name()),
    }
}
