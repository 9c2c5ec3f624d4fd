//! `ampybus validate`.

use crate::decoder::ProtoDecoder;
use crate::error::{CliError, CliResult, EXIT_INVALID, EXIT_OK};
use crate::util::Out;
use clap::Args;
use std::path::PathBuf;

/// `ampybus validate`.
#[derive(Debug, Args)]
pub struct ValidateArgs {
    /// Envelope files or directories (searched recursively for *.json)
    #[arg(required = true, value_name = "PATH")]
    pub paths: Vec<PathBuf>,
}

/// Runs `validate`: per file one `OK <path>` line, or one `FAIL <path>: …` line per invalid
/// envelope (prefixed `envelope N (line L): ` when the file holds several) on stdout; a
/// summary on stderr.
pub fn run(args: &ValidateArgs) -> CliResult<u8> {
    let mut out = Out::new();
    let (mut ok, mut failed, mut envelopes) = (0usize, 0usize, 0usize);
    'paths: for path in &args.paths {
        let results = ampybus::validate::validate_path_envelopes(path, Some(&ProtoDecoder));
        if results.is_empty() {
            eprintln!("warning: {}: no *.json files found", path.display());
        }
        for (file, result) in results {
            let lines = match result {
                Err(e) => vec![format!("FAIL {}: {e}", file.display())],
                Ok(checks) => {
                    envelopes += checks.len();
                    let several = checks.len() > 1;
                    let fails: Vec<String> = checks
                        .into_iter()
                        .filter_map(|c| {
                            let e = c.result.err()?;
                            Some(if several {
                                format!(
                                    "FAIL {}: envelope {} (line {}): {e}",
                                    file.display(),
                                    c.index,
                                    c.line
                                )
                            } else {
                                format!("FAIL {}: {e}", file.display())
                            })
                        })
                        .collect();
                    if fails.is_empty() {
                        vec![format!("OK {}", file.display())]
                    } else {
                        fails
                    }
                }
            };
            if lines[0].starts_with("OK ") {
                ok += 1;
            } else {
                failed += 1;
            }
            for line in &lines {
                if !out.line(line)? {
                    break 'paths;
                }
            }
        }
    }
    out.flush()?;
    if ok + failed == 0 {
        return Err(CliError::usage(
            "validate: no envelope files found in the given paths",
        ));
    }
    eprintln!(
        "validated {} file(s), {envelopes} envelope(s): {ok} ok, {failed} failed",
        ok + failed
    );
    Ok(if failed > 0 { EXIT_INVALID } else { EXIT_OK })
}
