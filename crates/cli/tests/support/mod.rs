//! Helpers shared by the CLI's integration tests: each test file takes this module with
//! `mod support;` and uses some of it (hence the `dead_code` allowance).
#![allow(dead_code)]

use std::path::Path;
use std::process::{Command, Output, Stdio};

use serde_json::Value;

/// The `xdisk` binary cargo built for these tests.
pub const XDISK: &str = env!("CARGO_BIN_EXE_xdisk");

/// A command running the `xdisk` under test.
pub fn xdisk() -> Command {
    Command::new(XDISK)
}

/// A temporary directory under /var/tmp (tmpfs, where /tmp often is, refuses O_DIRECT).
pub fn tmp(prefix: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in("/var/tmp")
        .unwrap()
}

/// A path as the `&str` a command line takes (test paths are UTF-8).
pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Runs `prog ARGS` to its end.
pub fn run(prog: &str, args: &[&str]) -> Output {
    Command::new(prog)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{prog} runs: {e}"))
}

/// Runs `prog ARGS`, which must succeed; its stdout.
pub fn ok(prog: &str, args: &[&str]) -> String {
    succeeded(prog, args, run(prog, args))
}

/// Runs `prog ARGS` under `timeout 300`: a command waiting on a cluster or server that went
/// away fails the test instead of hanging it.
pub fn run_bounded(prog: &str, args: &[&str]) -> Output {
    Command::new("timeout")
        .arg("300")
        .arg(prog)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{prog}: {e}"))
}

/// [`run_bounded`], which must succeed; its stdout.
pub fn ok_bounded(prog: &str, args: &[&str]) -> String {
    succeeded(prog, args, run_bounded(prog, args))
}

/// The stdout of `prog ARGS`, which must have succeeded.
fn succeeded(prog: &str, args: &[&str], o: Output) -> String {
    assert!(
        o.status.success(),
        "{prog} {args:?} failed ({:?}): {}{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Runs `cmd`, which must succeed; its stdout.
pub fn ok_cmd(cmd: &mut Command) -> String {
    let o = cmd.output().unwrap_or_else(|e| panic!("{cmd:?} runs: {e}"));
    assert!(
        o.status.success(),
        "{cmd:?} failed ({:?}): {}{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// `text` parsed as JSON, or a panic that shows it.
pub fn json(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("bad JSON ({e}): {text}"))
}

/// Whether `tool` is on PATH; says `SKIP` on stderr when it is not.
pub fn have(tool: &str) -> bool {
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        eprintln!("SKIP: {tool} is not installed");
    }
    found
}
