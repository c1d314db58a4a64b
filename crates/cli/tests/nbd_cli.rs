//! `xdisk nbd` as a user runs it: an image exported on a unix socket, read by qemu-img and
//! written by qemu-io; the server exits after its client leaves (as qemu-nbd), or keeps
//! serving with -t; -r refuses writes.

mod support;
use support::{ok_cmd as ok, xdisk};

use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

fn wait_for(p: &Path, child: &mut Child) {
    let start = Instant::now();
    while !p.exists() {
        if let Ok(Some(st)) = child.try_wait() {
            panic!("xdisk nbd exited early: {st}");
        }
        assert!(start.elapsed() < Duration::from_secs(20), "no socket");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn wait_exit(child: &mut Child) -> std::process::ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return st;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "xdisk nbd did not exit after its client left"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn nbd_exports_a_qcow2_image_and_exits_after_its_client() {
    let dir = tempfile::Builder::new()
        .prefix("xdisk-nbd-cli-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let img = dir.path().join("disk.qcow2");
    ok(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&img)
        .arg("16M"));
    ok(Command::new("qemu-io")
        .args([
            "-f",
            "qcow2",
            "-c",
            "write -P 0x3c 1M 3M",
            "-c",
            "write -P 0x7e 9M 64k",
        ])
        .arg(&img));
    let sock = dir.path().join("nbd.sock");
    let mut child = xdisk()
        .args(["nbd", "-f", "qcow2", "-x", "disk", "-k"])
        .arg(&sock)
        .arg(&img)
        .spawn()
        .unwrap();
    wait_for(&sock, &mut child);
    let uri = format!("nbd+unix:///disk?socket={}", sock.display());
    // One client writes, reads back through the same connection, and leaves.
    ok(Command::new("qemu-io")
        .args([
            "-f",
            "raw",
            "-c",
            "write -P 0x42 12M 1M",
            "-c",
            "read -P 0x42 12M 1M",
        ])
        .args(["-c", "read -P 0x3c 1M 3M", "-c", "read -P 0x7e 9M 64k"])
        .arg(&uri));
    let st = wait_exit(&mut child);
    assert!(st.success(), "{st}");
    // What it wrote is in the image, which is clean.
    ok(Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "read -P 0x42 12M 1M"])
        .arg(&img));
    ok(Command::new("qemu-img").arg("check").arg(&img));

    // Read-only and persistent: writes fail, several clients in turn, the server stays.
    let mut child = xdisk()
        .args(["nbd", "-f", "qcow2", "-r", "-t", "-k"])
        .arg(&sock)
        .arg(&img)
        .spawn()
        .unwrap();
    wait_for(&sock, &mut child);
    let uri = format!("nbd+unix:///?socket={}", sock.display());
    let w = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 1 0 4k"])
        .arg(&uri)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&w.stdout).to_string() + &String::from_utf8_lossy(&w.stderr);
    assert!(
        text.contains("ermission") || text.contains("read-only") || !w.status.success(),
        "{text}"
    );
    let info = ok(Command::new("nbdinfo")
        .args(["--json", "--no-content"])
        .arg(&uri));
    assert!(info.contains("\"is_read_only\": true"), "{info}");
    let flat = dir.path().join("flat.raw");
    ok(Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw"])
        .arg(&uri)
        .arg(&flat));
    let want = dir.path().join("want.raw");
    ok(Command::new("qemu-img")
        .args(["convert", "-f", "qcow2", "-O", "raw"])
        .arg(&img)
        .arg(&want));
    assert!(std::fs::read(&flat).unwrap() == std::fs::read(&want).unwrap());
    assert!(child.try_wait().unwrap().is_none(), "-t keeps serving");
    child.kill().unwrap();
    let _ = child.wait();
}

/// Linux's own NBD client (the nbd kernel module and nbd-client) reading and writing an
/// xdisk export through /dev/nbdX. Skipped, with the reason, where the module or the tool is
/// missing (this project's build machine has no nbd module; the Xen lab's kernel neither).
#[test]
fn linux_kernel_nbd_client_reads_and_writes_the_export() {
    let has_module = Path::new("/sys/module/nbd").exists()
        || Command::new("modprobe")
            .args(["-q", "nbd"])
            .status()
            .is_ok_and(|s| s.success());
    if !has_module || !Path::new("/dev/nbd0").exists() {
        eprintln!("SKIP: no nbd kernel module here (modprobe nbd failed or /dev/nbd0 missing)");
        return;
    }
    let has_client = Command::new("sh")
        .args(["-c", "command -v nbd-client"])
        .status()
        .is_ok_and(|s| s.success());
    if !has_client {
        eprintln!("SKIP: nbd-client (Debian package nbd-client) is not installed");
        return;
    }
    let dir = tempfile::Builder::new()
        .prefix("xdisk-nbd-kernel-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let img = dir.path().join("disk.raw");
    std::fs::write(&img, vec![0x5cu8; 4 << 20]).unwrap();
    let sock = dir.path().join("nbd.sock");
    let mut child = xdisk()
        .args(["nbd", "-f", "raw", "-t", "-x", "disk", "-k"])
        .arg(&sock)
        .arg(&img)
        .spawn()
        .unwrap();
    wait_for(&sock, &mut child);
    ok(Command::new("nbd-client")
        .arg("-unix")
        .arg(&sock)
        .args(["/dev/nbd0", "-N", "disk"]));
    let read = Command::new("dd")
        .args([
            "if=/dev/nbd0",
            "bs=1M",
            "count=4",
            "iflag=direct",
            "status=none",
        ])
        .output()
        .unwrap();
    ok(Command::new("sh").args([
        "-c",
        "head -c 1048576 /dev/zero | dd of=/dev/nbd0 bs=1M oflag=direct status=none seek=1",
    ]));
    let _ = Command::new("nbd-client")
        .args(["-d", "/dev/nbd0"])
        .status();
    child.kill().unwrap();
    let _ = child.wait();
    assert!(read.stdout.len() == 4 << 20 && read.stdout.iter().all(|&b| b == 0x5c));
    let data = std::fs::read(&img).unwrap();
    assert!(data[1 << 20..2 << 20].iter().all(|&b| b == 0));
}

/// `nbdinfo --map=qemu:dirty-bitmap:NAME` of an export, as text.
fn bitmap_map(uri: &str, name: &str) -> String {
    ok(Command::new("nbdinfo")
        .arg(format!("--map=qemu:dirty-bitmap:{name}"))
        .arg(uri))
}

/// `xdisk nbd -B NAME` offers a persistent bitmap as QEMU's `qemu:dirty-bitmap:NAME`
/// context, as `qemu-nbd -B` does: the same map from both servers for a bitmap QEMU wrote;
/// an enabled bitmap on a writable export, an unknown or a raw image's bitmap are refused.
#[test]
fn nbd_bitmap_option_serves_the_dirty_bitmap_as_qemu_nbd_does() {
    let dir = tempfile::Builder::new()
        .prefix("xdisk-nbd-bitmap-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let img = dir.path().join("disk.qcow2");
    ok(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&img)
        .arg("16M"));
    ok(Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "write -P 0x11 0 1M"])
        .arg(&img));
    // b0 records what is written from now on (QEMU tracks it in the image's bitmap).
    ok(Command::new("qemu-img")
        .args(["bitmap", "--add", "-g", "64k"])
        .arg(&img)
        .arg("b0"));
    ok(Command::new("qemu-io")
        .args([
            "-f",
            "qcow2",
            "-c",
            "write -P 0x22 2M 64k",
            "-c",
            "write -P 0x33 5M 300k",
            "-c",
            "write -z 9M 128k",
        ])
        .arg(&img));
    let sock = dir.path().join("nbd.sock");
    let uri = format!("nbd+unix:///?socket={}", sock.display());

    let mut child = xdisk()
        .args(["nbd", "-f", "qcow2", "-r", "-t", "-B", "b0", "-k"])
        .arg(&sock)
        .arg(&img)
        .spawn()
        .unwrap();
    wait_for(&sock, &mut child);
    let ours = bitmap_map(&uri, "b0");
    let list = ok(Command::new("nbdinfo")
        .args(["--list", "--content"])
        .arg(&uri));
    child.kill().unwrap();
    let _ = child.wait();
    std::fs::remove_file(&sock).unwrap();
    assert!(list.contains("qemu:dirty-bitmap:b0"), "{list}");

    let mut qemu = Command::new("qemu-nbd")
        .args(["-f", "qcow2", "-r", "-t", "-B", "b0", "-k"])
        .arg(&sock)
        .arg(&img)
        .spawn()
        .unwrap();
    wait_for(&sock, &mut qemu);
    let theirs = bitmap_map(&uri, "b0");
    qemu.kill().unwrap();
    let _ = qemu.wait();
    assert_eq!(ours, theirs, "xdisk nbd vs qemu-nbd");
    // Dirty where written after the add, clean elsewhere (the first write came before).
    let rows: Vec<Vec<&str>> = ours
        .lines()
        .map(|l| l.split_whitespace().take(3).collect())
        .collect();
    assert_eq!(rows[0], ["0", "2097152", "0"], "{ours}");
    assert!(rows.contains(&vec!["2097152", "65536", "1"]), "{ours}");
    assert!(rows.contains(&vec!["5242880", "327680", "1"]), "{ours}");

    // Refusals, each with a message saying why.
    for (args, why) in [
        (vec!["-B", "b0"], "enabled"),
        (vec!["-r", "-B", "nope"], "no such bitmap"),
        (vec!["-r", "-B", "b0", "-B", "b0"], "twice"),
    ] {
        let out = xdisk()
            .args(["nbd", "-f", "qcow2", "-k"])
            .arg(dir.path().join("x.sock"))
            .args(&args)
            .arg(&img)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains(why),
            "{args:?}: {err}"
        );
    }
    let raw = dir.path().join("disk.raw");
    std::fs::write(&raw, vec![0u8; 1 << 20]).unwrap();
    let out = xdisk()
        .args(["nbd", "-f", "raw", "-r", "-B", "b0", "-k"])
        .arg(dir.path().join("y.sock"))
        .arg(&raw)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("qcow2"), "{err}");
}
