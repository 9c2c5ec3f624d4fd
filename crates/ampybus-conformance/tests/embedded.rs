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

    fn why_not(&self, flag: &str) -> Option<String> {
        (flag == "broker_restart").then(|| {
            "no broker process: the log lives in the process that opens it (a process restart \
             is what at_least_once_across_crash and ack_survives_a_reopen check)"
                .into()
        })
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
            ..Capabilities::default()
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
        CaseStatus::NotApplicable(why)
            if why == "needs `best_effort_tier`: best-effort tier not implemented"
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

/// The case table: every case has a distinct name that maps back to it, and its required
/// flags are real [`Capabilities`] flags.
#[test]
fn the_case_table_is_consistent() {
    let mut names: Vec<&str> = Case::ALL.iter().map(|c| c.name()).collect();
    for c in Case::ALL {
        assert_eq!(Case::from_name(c.name()), Some(*c));
        for flag in c.requires() {
            assert!(
                Capabilities::FLAGS.contains(flag),
                "{c}: unknown flag {flag}"
            );
        }
    }
    names.sort();
    names.dedup();
    assert_eq!(names.len(), Case::ALL.len(), "duplicate case names");
    assert_eq!(
        Case::BrokerRestartMidRun.requires(),
        &["broker_restart"][..]
    );
}

/// A flag the binding does not claim is reported with the binding's own reason when it gives
/// one (`why_not`), and the case does not run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_flag_is_reported_with_the_bindings_reason() {
    let report = run_cases(&Embedded::new(), &[Case::BrokerRestartMidRun]).await;
    eprintln!("{report}");
    let na = report.not_applicable();
    assert_eq!(na.len(), 1, "{report}");
    assert_eq!(na[0].0, Case::BrokerRestartMidRun);
    assert!(
        na[0]
            .1
            .starts_with("needs `broker_restart`: no broker process"),
        "{}",
        na[0].1
    );
}
