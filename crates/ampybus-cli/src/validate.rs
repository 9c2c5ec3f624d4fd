//! `ampybus validate`.

use crate::cli::ValidateArgs;
use crate::decoder::ProtoDecoder;
use crate::error::{CliError, CliResult, EXIT_INVALID, EXIT_OK};
use crate::util::Out;

/// Runs `validate`: one `OK`/`FAIL` line per file on stdout, a summary on stderr.
pub fn run(args: &ValidateArgs) -> CliResult<u8> {
    let mut out = Out::new();
    let (mut ok, mut failed) = (0usize, 0usize);
    for path in &args.paths {
        let results = ampybus::validate::validate_path(path, Some(&ProtoDecoder));
        if results.is_empty() {
            eprintln!("warning: {}: no *.json files found", path.display());
        }
        for (file, result) in results {
            let line = match result {
                Ok(_) => {
                    ok += 1;
                    format!("OK {}", file.display())
                }
                Err(e) => {
                    failed += 1;
                    format!("FAIL {}: {e}", file.display())
                }
            };
            if !out.line(&line)? {
                break;
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
        "validated {} file(s): {ok} ok, {failed} failed",
        ok + failed
    );
    Ok(if failed > 0 { EXIT_INVALID } else { EXIT_OK })
}
