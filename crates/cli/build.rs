//! Records the git commit the binary is built from, for `xdisk --version`.
fn main() {
    let commit = std::process::Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .filter(|s| !s.is_empty());
    let dirty = std::process::Command::new("git")
        .args(["status", "--porcelain", "--untracked-files=no"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .is_some_and(|o| !o.stdout.is_empty());
    let v = match (std::env::var("XDISK_GIT_COMMIT").ok(), commit) {
        (Some(c), _) => c,
        (None, Some(c)) if dirty => format!("{c}-dirty"),
        (None, Some(c)) => c,
        (None, None) => "unknown".to_string(),
    };
    println!("cargo:rustc-env=XDISK_GIT_COMMIT={v}");
    // Rebuild when HEAD moves (the files exist in a git checkout; harmless otherwise).
    for p in ["../../.git/HEAD", "../../.git/index"] {
        if std::path::Path::new(p).exists() {
            println!("cargo:rerun-if-changed={p}");
        }
    }
    println!("cargo:rerun-if-env-changed=XDISK_GIT_COMMIT");
}
