//! The conformance suite on the embedded SQLite log: a temp dir per case,
//! `Bus::connect("file://<dir>?sync=normal")`.

use ampybus::Bus;
use ampybus_conformance::{
    Capabilities, Case, CaseStatus, TestContext, TransportFactory, run_cases,
};
use async_trait::async_trait;

/// The embedded binding: the log lives in the case's scratch directory.
struct Embedded {
    caps: Capabilities,
}

impl Embedded {
    fn new() -> Self {
        Embedded {
            caps: Capabilities::default(),
        }
    }
}

#[async_trait]
impl TransportFactory for Embedded {
    fn name(&self) -> &str {
        "embedded"
    }

    fn capabilities(&self) -> Capabilities {
        self.caps
    }

    async fn new_bus(&self, ctx: &TestContext) -> Bus {
        self.reopen_bus(ctx).await
    }

    async fn reopen_bus(&self, ctx: &TestContext) -> Bus {
        Bus::connect(&format!("file://{}?sync=normal", ctx.dir().display()))
            .await
            .expect("connect embedded")
    }
}

ampybus_conformance::conformance_tests!(Embedded::new());

/// A case whose capability is off is reported as not applicable, listed in the report, and
/// never counted as passed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_capabilities_are_listed_as_not_applicable() {
    let factory = Embedded {
        caps: Capabilities {
            replay_by_time: false,
            replay_by_keys: false,
            best_effort_tier: false,
            prefix_acks: false,
        },
    };
    let report = run_cases(
        &factory,
        &[
            Case::ReplayWindow,
            Case::ReplayKeys,
            Case::BestEffortDropConflate,
        ],
    )
    .await;
    eprintln!("{report}");
    report.assert_ok();
    assert!(report.passed().is_empty());
    let na: Vec<Case> = report
        .not_applicable()
        .into_iter()
        .map(|(c, _)| c)
        .collect();
    assert_eq!(
        na,
        vec![
            Case::ReplayWindow,
            Case::ReplayKeys,
            Case::BestEffortDropConflate
        ]
    );
    assert!(report.to_string().contains("3 not applicable"));
    assert!(matches!(
        &report.results[2].status,
        CaseStatus::NotApplicable(why) if why == "best-effort tier not implemented"
    ));
}

/// A binding that cannot even open a bus: a failing case is caught and reported as failed, and
/// the following cases still run.
struct Broken;

#[async_trait]
impl TransportFactory for Broken {
    fn name(&self) -> &str {
        "broken"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::default()
    }

    async fn new_bus(&self, _ctx: &TestContext) -> Bus {
        panic!("no broker here")
    }

    async fn reopen_bus(&self, _ctx: &TestContext) -> Bus {
        panic!("no broker here")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_case_is_reported_and_the_rest_still_run() {
    let report = run_cases(
        &Broken,
        &[Case::DedupeByMessageIdAndKey, Case::BestEffortDropConflate],
    )
    .await;
    eprintln!("{report}");
    assert!(!report.ok());
    let failed = report.failed();
    // Both cases ran (the best-effort case applies by default) and both failed on new_bus.
    assert_eq!(failed.len(), 2);
    assert_eq!(failed[0].0, Case::DedupeByMessageIdAndKey);
    assert_eq!(failed[1].0, Case::BestEffortDropConflate);
    for (_, why) in &failed {
        assert!(why.contains("no broker here"), "{why}");
    }
    assert!(report.not_applicable().is_empty());
    let shown = report.to_string();
    assert!(
        shown.contains("FAIL dedupe_by_message_id_and_key"),
        "{shown}"
    );
    assert!(
        shown.contains("0 passed, 2 failed, 0 not applicable"),
        "{shown}"
    );
}
