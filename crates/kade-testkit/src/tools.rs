//! The real peers the tests drive: DCMTK's command-line tools.

use std::path::PathBuf;
use std::process::{Command, Output};

/// Whether the test run must fail instead of skipping a suite whose prerequisites are
/// missing (CI sets `KADE_TEST_REQUIRE_ALL=1`).
pub fn require_all() -> bool {
    std::env::var("KADE_TEST_REQUIRE_ALL").is_ok_and(|v| v == "1")
}

/// Path of a DCMTK tool, or `None` (after a loud notice, or a panic under
/// [`require_all`]) when DCMTK is not installed.
///
/// Only DCMTK's own tool counts: pynetdicom installs Python programs with the same names
/// (`findscu`, `storescu`…) that may come first on `PATH`, so each candidate must say
/// `$dcmtk:` in its `--version` output.
pub fn dcmtk(tool: &str) -> Option<PathBuf> {
    let is_dcmtk = |p: &PathBuf| {
        p.is_file()
            && Command::new(p)
                .arg("--version")
                .output()
                .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("$dcmtk:"))
    };
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(tool))
            .find(is_dcmtk)
    });
    if found.is_none() {
        let msg = format!(
            "DCMTK `{tool}` not found: install DCMTK (Debian: apt-get install dcmtk) to run this suite"
        );
        assert!(!require_all(), "{msg}");
        eprintln!("SKIPPED: {msg}");
    }
    found
}

/// Whether `python3` can import every module in `modules` (e.g. `dicomweb_client`); `false`
/// after a loud notice, or a panic under [`require_all`], when one is missing.
pub fn python_modules(modules: &[&str]) -> bool {
    let code = modules
        .iter()
        .map(|m| format!("import {m}"))
        .collect::<Vec<_>>()
        .join("; ");
    let ok = Command::new("python3")
        .args(["-c", &code])
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        let msg = format!(
            "python3 with {} not found: pip install {} to run this suite",
            modules.join(", "),
            modules
                .iter()
                .map(|m| m.replace('_', "-"))
                .collect::<Vec<_>>()
                .join(" ")
        );
        assert!(!require_all(), "{msg}");
        eprintln!("SKIPPED: {msg}");
    }
    ok
}

/// Runs a command with `TCP_NODELAY=1` (DCMTK otherwise leaves Nagle on), returning its output.
///
/// # Panics
/// If the command cannot be started.
pub fn run(mut cmd: Command) -> Output {
    cmd.env("TCP_NODELAY", "1");
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

/// Both output streams as one string, for assertion messages.
pub fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}
