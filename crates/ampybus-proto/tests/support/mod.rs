//! Helpers shared by the integration tests: repository paths and the
//! Python environment with the reference `ampy-proto` package.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The repository root, found from this crate's manifest directory.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("repository root exists")
}

/// The venv python with the reference package, set up by
/// `scripts/python-env.sh` (which creates `.venv-ampyproto/` when missing and
/// is a quick no-op when ampy-proto is already installed). Panics (fails the
/// test) if the setup fails: these tests never skip.
pub fn python() -> &'static Path {
    static PYTHON: OnceLock<PathBuf> = OnceLock::new();
    PYTHON.get_or_init(|| {
        let root = repo_root();
        let out = Command::new("bash")
            .arg(root.join("scripts/python-env.sh"))
            .output()
            .expect("run scripts/python-env.sh");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "scripts/python-env.sh failed ({}):\n{stdout}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        let python = root.join(".venv-ampyproto/bin/python");
        // Compare directories: the venv's python itself is a symlink.
        let reported = Path::new(stdout.trim()).parent().map(Path::canonicalize);
        let expected = python.parent().map(Path::canonicalize);
        assert!(
            matches!((&reported, &expected), (Some(Ok(a)), Some(Ok(b))) if a == b),
            "python-env.sh reported {:?}, expected {}",
            stdout.trim(),
            python.display()
        );
        python
    })
}

/// Runs `scripts/py/<script>` with `args` under the venv python from the
/// repository root; returns stdout, panicking on a non-zero exit.
pub fn run_script(script: &str, args: &[&str]) -> String {
    let root = repo_root();
    let out = Command::new(python())
        .arg(root.join("scripts/py").join(script))
        .args(args)
        .current_dir(&root)
        .output()
        .unwrap_or_else(|e| panic!("run {script}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{script} {args:?} failed ({}):\n{stdout}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}
