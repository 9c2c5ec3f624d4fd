//! How one case ended (what every case returns).

/// How one case ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CaseStatus {
    /// Every assertion held; the text gives the figures (counts, maxima).
    Passed(String),
    /// The case does not apply to this binding; the text says why (a missing capability or a
    /// tier not built yet). Never counted as a pass.
    NotApplicable(String),
    /// An assertion failed or the case hung past its timeout; the text is the failure.
    Failed(String),
}
