//! CLI errors and exit codes.
//!
//! Every failure ends as one `error: …` line on stderr naming what was wrong and where, and
//! one of the exit codes below.

use ampybus::ErrorKind;
use std::fmt;

/// Success.
pub const EXIT_OK: u8 = 0;
/// `validate` found an invalid or unreadable envelope file (`demo`: an invariant failed).
pub const EXIT_INVALID: u8 = 1;
/// Usage, configuration or input error (flag, URL, topic, pattern, header, payload, file).
pub const EXIT_USAGE: u8 = 2;
/// The transport (embedded log or broker) failed.
pub const EXIT_TRANSPORT: u8 = 3;
/// An operation did not finish in time (e.g. the data directory stayed locked).
pub const EXIT_TIMEOUT: u8 = 4;
/// Stopped by SIGINT (Ctrl-C): an open-ended command (`sub` without `--max`) stopped, or a
/// fixed-size job did not finish.
pub const EXIT_INTERRUPTED: u8 = 130;
/// A fixed-size job (`pub`, `sub --max`, `replay`, `dlq redrive`, `demo`, `bench`) was
/// stopped by SIGTERM before it finished (an open-ended `sub` exits 0 on SIGTERM).
pub const EXIT_TERMINATED: u8 = 143;

/// The table printed by `ampybus --help` and copied into the README.
pub const EXIT_CODE_HELP: &str = "\
Exit codes:
  0    success (`sub` also exits 0 after --max messages or --timeout seconds idle, and when
       SIGTERM stops an open-ended `sub`, i.e. one without --max)
  1    `validate`: a file is invalid or unreadable; `demo`: an invariant did not hold
  2    usage or input error: bad flag, URL, topic, pattern, header, payload, envelope file
  3    transport error: the log or broker failed (`pub`: after printing every confirmed id);
       or stdout was closed by its reader (broken pipe)
  4    timed out: e.g. the data directory stayed locked by another process
  130  SIGINT (Ctrl-C): an open-ended `sub` stopped, or a fixed-size job (`pub`, `sub --max`,
       `sub --since/--until`, `replay`, `dlq redrive`, `demo`, `bench`) did not finish
  143  SIGTERM: a fixed-size job did not finish
A signal never strands work: no new work is taken, fetched messages are released, whole
lines are flushed, and the summary is printed on stderr before the exit.";

/// A failure of a command: what to print and which exit code to use.
#[derive(Debug)]
pub struct CliError {
    /// Exit code.
    pub code: u8,
    /// The message after `error: `.
    pub message: String,
}

/// Shorthand for command results.
pub type CliResult<T> = Result<T, CliError>;

impl CliError {
    /// A usage/input error (exit 2).
    pub fn usage(message: impl Into<String>) -> Self {
        CliError {
            code: EXIT_USAGE,
            message: message.into(),
        }
    }

    /// A transport error (exit 3).
    pub fn transport(message: impl Into<String>) -> Self {
        CliError {
            code: EXIT_TRANSPORT,
            message: message.into(),
        }
    }

    /// An error from the ampybus crate, prefixed with where it happened (a flag, a file).
    pub fn bus(context: impl fmt::Display, e: &ampybus::Error) -> Self {
        let context = context.to_string();
        let message = if context.is_empty() {
            e.to_string()
        } else {
            format!("{context}: {e}")
        };
        CliError {
            code: code_for(e.kind()),
            message,
        }
    }
}

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

/// The exit code for an ampybus error kind.
pub fn code_for(kind: ErrorKind) -> u8 {
    match kind {
        ErrorKind::Transport | ErrorKind::Closed => EXIT_TRANSPORT,
        ErrorKind::Timeout => EXIT_TIMEOUT,
        _ => EXIT_USAGE,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_map_to_documented_codes() {
        assert_eq!(code_for(ErrorKind::Topic), EXIT_USAGE);
        assert_eq!(code_for(ErrorKind::Header), EXIT_USAGE);
        assert_eq!(code_for(ErrorKind::Config), EXIT_USAGE);
        assert_eq!(code_for(ErrorKind::Transport), EXIT_TRANSPORT);
        assert_eq!(code_for(ErrorKind::Timeout), EXIT_TIMEOUT);
        let e = ampybus::Error::new(ErrorKind::Header, "`producer`: must not be empty");
        let c = CliError::bus("--producer \"\"", &e);
        assert_eq!(c.code, EXIT_USAGE);
        assert_eq!(
            c.message,
            "--producer \"\": invalid header: `producer`: must not be empty"
        );
    }
}
