//! Helpers shared by the image crate's integration tests.
#![allow(dead_code)]

use std::path::Path;
use std::process::{Command, Output};
use std::sync::Arc;

use xdisk_image::{CacheMode, Format, Image, OpenOptions};

/// A temporary directory on a filesystem that takes O_DIRECT (/var/tmp, not tmpfs).
pub fn tmpdir(prefix: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in("/var/tmp")
        .expect("temp dir in /var/tmp")
}

/// Runs qemu-img and returns its output, whatever the exit status.
pub fn qemu_img(args: &[&str]) -> Output {
    Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img runs")
}

/// Runs qemu-img, asserting success; returns stdout.
pub fn qemu_img_ok(args: &[&str]) -> String {
    let o = qemu_img(args);
    assert!(
        o.status.success(),
        "qemu-img {args:?} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Runs qemu-io commands on an image, asserting success.
pub fn qemu_io(path: &Path, cmds: &[&str]) {
    let mut c = Command::new("qemu-io");
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    let o = c.arg(path).output().expect("qemu-io runs");
    assert!(
        o.status.success(),
        "qemu-io {cmds:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// The guest-visible contents of an image, as qemu-img converts it to raw.
pub fn qemu_read_all(path: &Path, scratch: &Path) -> Vec<u8> {
    let flat = scratch.join("qemu-flat.raw");
    qemu_img_ok(&[
        "convert",
        "-O",
        "raw",
        path.to_str().unwrap(),
        flat.to_str().unwrap(),
    ]);
    let data = std::fs::read(&flat).unwrap();
    let _ = std::fs::remove_file(&flat);
    data
}

/// The format of a test image, as the operator would give it (a probed image does not open
/// its backing file).
pub fn format_of(path: &Path) -> Format {
    use std::io::Read;
    let mut head = [0u8; 4];
    let ok = std::fs::File::open(path).and_then(|mut f| f.read_exact(&mut head));
    if ok.is_ok() && head == *b"QFI\xfb" {
        Format::Qcow2
    } else {
        Format::Raw
    }
}

/// Opens an image read-write with the given cache mode and its format given (other options
/// default).
pub fn open(path: &Path, cache: CacheMode) -> Arc<Image> {
    Image::open(
        path,
        &OpenOptions {
            format: Some(format_of(path)),
            cache,
            ..OpenOptions::default()
        },
    )
    .expect("open")
}

/// The dirty ranges `(offset, len)` of persistent bitmap `name` of qcow2 image `path` as QEMU
/// exports them (`qemu-nbd -B name`, `nbdinfo --map=qemu:dirty-bitmap:name`), merged. Waits
/// for qemu-nbd to exit (it holds the image's lock until then).
pub fn qemu_dirty(path: &Path, name: &str) -> Vec<(u64, u64)> {
    let sock = path.with_extension(format!("{name}.sock"));
    let pid = path.with_extension(format!("{name}.pid"));
    let _ = std::fs::remove_file(&sock);
    let o = Command::new("qemu-nbd")
        .args(["--fork", "-r", "-f", "qcow2", "-B", name])
        .arg("-k")
        .arg(&sock)
        .arg("--pid-file")
        .arg(&pid)
        .arg(path)
        .output()
        .expect("qemu-nbd runs");
    assert!(
        o.status.success(),
        "qemu-nbd -B {name}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let o = Command::new("nbdinfo")
        .arg(format!("--map=qemu:dirty-bitmap:{name}"))
        .arg(format!("nbd+unix:///?socket={}", sock.display()))
        .output()
        .expect("nbdinfo runs");
    // qemu-nbd (not persistent) exits when nbdinfo disconnects (a zombie until whoever
    // adopted it reaps it: exited all the same).
    if let Some(n) = std::fs::read_to_string(&pid)
        .ok()
        .and_then(|t| t.trim().parse::<u32>().ok())
    {
        for _ in 0..500 {
            let st = std::fs::read_to_string(format!("/proc/{n}/status")).unwrap_or_default();
            if !st
                .lines()
                .any(|l| l.starts_with("State:") && !l.contains("Z (zombie)"))
            {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }
    let _ = std::fs::remove_file(&pid);
    assert!(
        o.status.success(),
        "nbdinfo --map: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let mut out: Vec<(u64, u64)> = Vec::new();
    for line in String::from_utf8_lossy(&o.stdout).lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 3 || f[2] != "1" {
            continue;
        }
        let (off, len): (u64, u64) = (f[0].parse().unwrap(), f[1].parse().unwrap());
        match out.last_mut() {
            Some((o, l)) if *o + *l == off => *l += len,
            _ => out.push((off, len)),
        }
    }
    out
}
