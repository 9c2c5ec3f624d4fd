//! What a run of the suite says.

use crate::cases::Case;
use crate::status::CaseStatus;
use std::time::Duration;

/// One case of a run.
#[derive(Debug, Clone)]
pub struct CaseReport {
    /// Which case.
    pub case: Case,
    /// How it ended.
    pub status: CaseStatus,
    /// Wall time of the case.
    pub elapsed: Duration,
}

/// The result of [`crate::run_all`] / [`crate::run_cases`].
#[derive(Debug, Clone)]
pub struct SuiteReport {
    /// [`crate::TransportFactory::name`] of the binding.
    pub transport: String,
    /// One entry per case run, in order.
    pub results: Vec<CaseReport>,
}

impl SuiteReport {
    /// The cases that passed.
    pub fn passed(&self) -> Vec<Case> {
        self.filter(|s| matches!(s, CaseStatus::Passed(_)))
    }

    /// The cases that did not apply, with the reason.
    pub fn not_applicable(&self) -> Vec<(Case, String)> {
        self.results
            .iter()
            .filter_map(|r| match &r.status {
                CaseStatus::NotApplicable(why) => Some((r.case, why.clone())),
                _ => None,
            })
            .collect()
    }

    /// The cases that failed, with the failure.
    pub fn failed(&self) -> Vec<(Case, String)> {
        self.results
            .iter()
            .filter_map(|r| match &r.status {
                CaseStatus::Failed(why) => Some((r.case, why.clone())),
                _ => None,
            })
            .collect()
    }

    /// True when no case failed (cases that do not apply are listed, not failed).
    pub fn ok(&self) -> bool {
        self.failed().is_empty()
    }

    /// Panics with the whole report when a case failed.
    pub fn assert_ok(&self) {
        assert!(self.ok(), "conformance suite failed:\n{self}");
    }

    fn filter(&self, f: impl Fn(&CaseStatus) -> bool) -> Vec<Case> {
        self.results
            .iter()
            .filter(|r| f(&r.status))
            .map(|r| r.case)
            .collect()
    }
}

impl std::fmt::Display for SuiteReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "conformance suite on {}:", self.transport)?;
        for r in &self.results {
            let (tag, text) = match &r.status {
                CaseStatus::Passed(t) => ("PASS", t.as_str()),
                CaseStatus::NotApplicable(t) => ("N/A ", t.as_str()),
                CaseStatus::Failed(t) => ("FAIL", t.as_str()),
            };
            writeln!(
                f,
                "  {tag} {:<32} {:>9.2?}  {text}",
                r.case.name(),
                r.elapsed
            )?;
        }
        let na = self.not_applicable();
        writeln!(
            f,
            "  {} passed, {} failed, {} not applicable{}",
            self.passed().len(),
            self.failed().len(),
            na.len(),
            if na.is_empty() {
                String::new()
            } else {
                format!(
                    " ({})",
                    na.iter()
                        .map(|(c, _)| c.name())
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            }
        )
    }
}

pub(crate) fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_owned()
    } else {
        "panic with a non-string payload".to_owned()
    }
}
