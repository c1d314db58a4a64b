//! Helpers shared by the bootloader's CLI tests (boot_cli.rs, boot_menu.rs): disks made the
//! way distributions make them, with the real tools, without mounting.
#![allow(dead_code)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// Runs a tool; a missing one names its Debian package.
pub fn run(cmd: &mut Command, pkg: &str) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e} (install Debian's {pkg})"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Deterministic pseudo-random bytes (a fake kernel or ramdisk with a recognisable content).
pub fn blob(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// A directory tree: (path, contents) files and (path, target) symlinks.
pub fn tree(dir: &Path, files: &[(&str, Vec<u8>)], links: &[(&str, &str)]) -> PathBuf {
    let root = dir.join("tree");
    for (p, data) in files {
        let f = root.join(p.trim_start_matches('/'));
        std::fs::create_dir_all(f.parent().unwrap()).unwrap();
        std::fs::write(&f, data).unwrap();
    }
    for (p, target) in links {
        let f = root.join(p.trim_start_matches('/'));
        std::fs::create_dir_all(f.parent().unwrap()).unwrap();
        std::os::unix::fs::symlink(target, &f).unwrap();
    }
    root
}

pub fn mkfs_ext(kind: &str, root: &Path, out: &Path, mib: u64) {
    std::fs::File::create(out)
        .unwrap()
        .set_len(mib << 20)
        .unwrap();
    run(
        Command::new(format!("mkfs.{kind}"))
            .args(["-q", "-F", "-d"])
            .arg(root)
            .arg(out),
        "e2fsprogs",
    );
}

/// Lays filesystem images into a partitioned disk: `label` is "dos" or "gpt"; each part is
/// (start sector, image, sfdisk type).
pub fn disk(
    dir: &Path,
    label: &str,
    parts: &[(u64, Option<&Path>, &str, u64)],
    mib: u64,
) -> PathBuf {
    let img = dir.join("disk.raw");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(mib << 20)
        .unwrap();
    let mut script = format!("label: {label}\n");
    for (start, _, t, sectors) in parts {
        script.push_str(&format!("start={start}, size={sectors}, type={t}\n"));
    }
    let mut child = Command::new("sfdisk")
        .arg("-q")
        .arg(&img)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("sfdisk (Debian's fdisk)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    assert!(child.wait().unwrap().success(), "sfdisk {script}");
    for (start, fs, _, _) in parts {
        if let Some(fs) = fs {
            run(
                Command::new("dd")
                    .arg(format!("if={}", fs.display()))
                    .arg(format!("of={}", img.display()))
                    .args(["bs=512", "conv=notrunc,sparse", "status=none"])
                    .arg(format!("seek={start}")),
                "coreutils",
            );
        }
    }
    img
}
