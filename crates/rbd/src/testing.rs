//! Test support (feature `test-cluster`): the throwaway Ceph cluster of `tests/ceph/start`,
//! and images on it that remove themselves.
//!
//! How tests find the cluster: `XDISK_CEPH_CONF` (set by `scripts/test`, which starts the
//! cluster before `cargo test` and stops it after) names its ceph.conf; without it the first
//! test of a process runs `tests/ceph/start` itself (idempotent, under a host-wide lock, so
//! concurrent test binaries share one cluster, which then stays up for the next run;
//! `tests/ceph/stop` stops it). A cluster that cannot be started fails the test: a test
//! never skips silently. `XDISK_SKIP_CEPH=1` skips the RBD tests, saying so.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;

/// The pool `tests/ceph/start` creates.
pub const POOL: &str = "rbd";

/// The cluster's ceph.conf, or `None` if the RBD tests are skipped (`XDISK_SKIP_CEPH=1`,
/// which prints a line saying so). Panics if no cluster can be had.
pub fn cluster() -> Option<&'static Path> {
    static CONF: OnceLock<Option<PathBuf>> = OnceLock::new();
    CONF.get_or_init(|| {
        if std::env::var("XDISK_SKIP_CEPH").is_ok_and(|v| v == "1") {
            eprintln!("RBD tests skipped: XDISK_SKIP_CEPH=1");
            return None;
        }
        if let Some(c) = std::env::var_os("XDISK_CEPH_CONF").filter(|c| !c.is_empty()) {
            return Some(PathBuf::from(c));
        }
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/ceph/start");
        let out = Command::new(&script)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
        let stdout = String::from_utf8_lossy(&out.stdout);
        let conf = stdout
            .lines()
            .filter_map(|l| l.strip_prefix("XDISK_CEPH_CONF="))
            .next_back()
            .map(PathBuf::from);
        match conf {
            Some(c) if out.status.success() => Some(c),
            _ => panic!(
                "no Ceph cluster for the RBD tests: {} failed ({}):\n{}{}\n\
                 (scripts/setup installs ceph-mon, ceph-osd and ceph-common; \
                 XDISK_SKIP_CEPH=1 skips these tests)",
                script.display(),
                out.status,
                stdout,
                String::from_utf8_lossy(&out.stderr)
            ),
        }
    })
    .as_deref()
}

/// A fresh image name: unique across processes and calls.
pub fn unique(prefix: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// Runs the `rbd` command on the cluster (bounded by `timeout 120`).
pub fn rbd(conf: &Path, args: &[&str]) -> Output {
    Command::new("timeout")
        .arg("120")
        .arg("rbd")
        .arg("-c")
        .arg(conf)
        .args(args)
        .output()
        .expect("run rbd")
}

/// Like [`rbd`], and panics unless it succeeds.
pub fn rbd_ok(conf: &Path, args: &[&str]) -> Output {
    let o = rbd(conf, args);
    assert!(
        o.status.success(),
        "rbd {args:?}: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

/// Runs the `ceph` command on the cluster (bounded by `timeout 60`).
pub fn ceph(conf: &Path, args: &[&str]) -> Output {
    Command::new("timeout")
        .arg("60")
        .arg("ceph")
        .arg("-c")
        .arg(conf)
        .arg("--connect-timeout")
        .arg("30")
        .args(args)
        .output()
        .expect("run ceph")
}

/// Like [`ceph`], and panics unless it succeeds; returns stdout.
pub fn ceph_ok(conf: &Path, args: &[&str]) -> String {
    let o = ceph(conf, args);
    assert!(
        o.status.success(),
        "ceph {args:?}: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// The pid of a daemon of the test cluster (`mon.a`, `osd.0`), from its pid file.
pub fn daemon_pid(conf: &Path, daemon: &str) -> String {
    let dir = conf.parent().unwrap_or(Path::new("."));
    let f = dir.join(format!("run/{daemon}.pid"));
    std::fs::read_to_string(&f)
        .unwrap_or_else(|e| panic!("{}: {e}", f.display()))
        .trim()
        .to_owned()
}

/// Starts the test cluster's monitor again after a test killed it (`tests/ceph/start
/// --restart mon.a`); panics if it does not answer.
pub fn restart_monitor(conf: &Path) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/ceph/start");
    let dir = conf.parent().unwrap_or(Path::new("."));
    let out = Command::new(&script)
        .args(["--restart", "mon.a"])
        .env("XDISK_CEPH_DIR", dir)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
    assert!(
        out.status.success(),
        "{} --restart mon.a: {}{}",
        script.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// An image name on the test cluster that is removed (with its snapshots) when dropped.
pub struct TestImage {
    /// The ceph.conf of the cluster.
    pub conf: PathBuf,
    /// The image's name in the pool.
    pub image: String,
}

impl TestImage {
    /// A new, unique name (nothing is created).
    pub fn new(conf: &Path, prefix: &str) -> TestImage {
        TestImage {
            conf: conf.to_path_buf(),
            image: unique(prefix),
        }
    }

    /// `rbd:POOL/IMAGE:conf=PATH`, with `extra` (`@snap`, `:key=value`...) inserted after
    /// the image name.
    pub fn name_with(&self, extra: &str) -> String {
        format!(
            "rbd:{POOL}/{}{extra}:conf={}",
            self.image,
            self.conf.display()
        )
    }

    /// `rbd:POOL/IMAGE:conf=PATH`.
    pub fn name(&self) -> String {
        self.name_with("")
    }

    /// `POOL/IMAGE`, as the `rbd` command takes it.
    pub fn spec(&self) -> String {
        format!("{POOL}/{}", self.image)
    }
}

impl Drop for TestImage {
    fn drop(&mut self) {
        let spec = self.spec();
        let _ = rbd(&self.conf, &["snap", "purge", &spec]);
        let _ = rbd(&self.conf, &["rm", "--no-progress", &spec]);
    }
}

/// Sends `sig` (`-STOP`, `-KILL`, ...) to `pid` with kill(1); panics if it fails.
pub fn kill(sig: &str, pid: &str) {
    let st = Command::new("kill")
        .args([sig, pid])
        .status()
        .unwrap_or_else(|e| panic!("cannot run kill: {e}"));
    assert!(st.success(), "kill {sig} {pid}");
}

/// Whether `pid` is gone (or a zombie nobody reaps) / every thread of it is stopped.
pub fn proc_state(pid: &str, want: char) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return want == 'Z';
    };
    tasks.flatten().all(|t| {
        std::fs::read_to_string(t.path().join("stat")).map_or(want == 'Z', |st| {
            st.rsplit_once(')')
                .is_some_and(|(_, rest)| rest.trim_start().starts_with(want))
        })
    })
}

/// The test cluster's OSD stopped (SIGSTOP: it stops answering, as a host that went away)
/// until dropped (SIGCONT). Tests that stop it must not run beside other tests of the
/// cluster in the same process.
pub struct OsdStopped(String);

impl OsdStopped {
    /// Stops the OSD; panics unless every thread of it stops within 30 s.
    pub fn new(conf: &Path) -> OsdStopped {
        let pid = daemon_pid(conf, "osd.0");
        kill("-STOP", &pid);
        let s = OsdStopped(pid);
        let t0 = std::time::Instant::now();
        while !proc_state(&s.0, 'T') {
            assert!(
                t0.elapsed() < std::time::Duration::from_secs(30),
                "the OSD did not stop"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        s
    }
}

impl Drop for OsdStopped {
    fn drop(&mut self) {
        kill("-CONT", &self.0);
    }
}
