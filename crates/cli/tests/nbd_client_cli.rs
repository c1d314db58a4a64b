//! `xdisk img`, `xdisk bench` and `xdisk nbd` on images behind NBD servers (qemu-nbd,
//! nbdkit, `xdisk nbd` itself), checked against qemu-img. Tests skip with a printed reason
//! only if a server program is not installed.

mod support;
use support::{have, ok_cmd as ok, tmp, xdisk};

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

struct Server {
    child: Child,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(cmd: &mut Command, sock: &Path) -> Server {
    let mut child = cmd.spawn().unwrap();
    let t = Instant::now();
    while !sock.exists() {
        if let Ok(Some(st)) = child.try_wait() {
            panic!("{cmd:?} exited early: {st}");
        }
        assert!(t.elapsed() < Duration::from_secs(20), "no socket");
        std::thread::sleep(Duration::from_millis(20));
    }
    Server { child }
}

fn qemu_nbd(sock: &Path, fmt: &str, file: &Path) -> Server {
    start(
        Command::new("qemu-nbd")
            .args(["-t", "-f", fmt, "-x", "disk", "-k"])
            .arg(sock)
            .arg(file),
        sock,
    )
}

fn uri(sock: &Path) -> String {
    format!("nbd+unix:///disk?socket={}", sock.display())
}

/// A sparse raw image behind qemu-nbd: info, convert (compared by qemu-img), map (the same
/// extents as qemu-img map), compare, bench; writes through xdisk land in the file.
#[test]
fn img_commands_on_a_raw_export_of_qemu_nbd() {
    if !have("qemu-nbd") {
        return;
    }
    let dir = tmp("xdisk-nbd-client-cli-");
    let img = dir.path().join("sparse.raw");
    ok(Command::new("qemu-img")
        .args(["create", "-q", "-f", "raw"])
        .arg(&img)
        .arg("32M"));
    ok(Command::new("qemu-io")
        .args([
            "-f",
            "raw",
            "-c",
            "write -P 1 4M 1M",
            "-c",
            "write -P 2 20M 64k",
        ])
        .arg(&img));
    let sock = dir.path().join("q.sock");
    let _srv = qemu_nbd(&sock, "raw", &img);
    let u = uri(&sock);
    let info = ok(xdisk().args(["img", "info", "-f", "raw"]).arg(&u));
    assert!(info.contains("virtual size: 32 MiB"), "{info}");
    // convert to a file, compared by qemu-img with the original.
    let out = dir.path().join("out.raw");
    ok(xdisk()
        .args(["img", "convert", "-f", "raw", "-O", "raw"])
        .arg(&u)
        .arg(&out));
    ok(Command::new("qemu-img")
        .args(["compare", "-U", "-f", "raw", "-F", "raw"])
        .arg(&img)
        .arg(&out));
    ok(xdisk()
        .args(["img", "compare", "-f", "raw", "-F", "raw"])
        .arg(&u)
        .arg(&out));
    // map: the same data/zero runs as qemu-img map through the same server.
    let runs = |json: &str| -> Vec<(u64, u64, bool)> {
        let v: serde_json::Value = serde_json::from_str(json).unwrap();
        let mut r: Vec<(u64, u64, bool)> = Vec::new();
        for e in v.as_array().unwrap() {
            let (s, l, d) = (
                e["start"].as_u64().unwrap(),
                e["length"].as_u64().unwrap(),
                e["data"].as_bool().unwrap(),
            );
            match r.last_mut() {
                Some(last) if last.2 == d && last.0 + last.1 == s => last.1 += l,
                _ => r.push((s, l, d)),
            }
        }
        r
    };
    let ours = ok(xdisk()
        .args(["img", "map", "--output=json", "-f", "raw"])
        .arg(&u));
    let theirs = ok(Command::new("qemu-img")
        .args(["map", "--output=json", "-f", "raw"])
        .arg(&u));
    assert_eq!(runs(&ours), runs(&theirs), "{ours}\n{theirs}");
    assert!(runs(&ours).iter().any(|r| !r.2), "no hole found: {ours}");
    // bench over the export (the queue's engine path).
    ok(xdisk()
        .args(["img", "bench", "-f", "raw", "-c", "2000", "-d", "16"])
        .arg(&u));
    ok(xdisk()
        .args([
            "img", "bench", "-f", "raw", "-w", "-c", "200", "-d", "8", "-o", "8M",
        ])
        .arg(&u));
    let o = xdisk()
        .arg("bench")
        .arg(format!("--filename={u}"))
        .args(["--rw=randread", "--bs=4k", "--iodepth=8", "--runtime=1"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

/// qcow2 over NBD: the qcow2 file exported raw by qemu-nbd, opened with `-f qcow2`.
#[test]
fn qcow2_image_behind_an_nbd_export() {
    if !have("qemu-nbd") {
        return;
    }
    let dir = tmp("xdisk-nbd-client-cli-");
    let img = dir.path().join("d.qcow2");
    ok(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&img)
        .arg("64M"));
    ok(Command::new("qemu-io")
        .args([
            "-f",
            "qcow2",
            "-c",
            "write -P 0x11 1M 2M",
            "-c",
            "write -P 0x22 40M 64k",
        ])
        .arg(&img));
    let sock = dir.path().join("q.sock");
    let srv = qemu_nbd(&sock, "raw", &img);
    let u = uri(&sock);
    let info = ok(xdisk().args(["img", "info", "-f", "qcow2"]).arg(&u));
    assert!(info.contains("file format: qcow2"), "{info}");
    let out = dir.path().join("out.raw");
    ok(xdisk()
        .args(["img", "convert", "-f", "qcow2", "-O", "raw"])
        .arg(&u)
        .arg(&out));
    ok(Command::new("qemu-img")
        .args(["compare", "-U", "-f", "qcow2", "-F", "raw"])
        .arg(&img)
        .arg(&out));
    let check = ok(xdisk().args(["img", "check", "-f", "qcow2"]).arg(&u));
    assert!(check.contains("No errors"), "{check}");
    // Written through xdisk nbd re-exporting the qcow2-over-NBD image as raw: the qcow2
    // file gets the data. (Only allocated clusters: the export has a fixed size, so a
    // qcow2 image on it cannot grow to allocate new ones.)
    let re = dir.path().join("re.sock");
    let mut child = xdisk()
        .args(["nbd", "-f", "qcow2", "-x", "disk", "-k"])
        .arg(&re)
        .arg(&u)
        .spawn()
        .unwrap();
    let t = Instant::now();
    while !re.exists() {
        assert!(child.try_wait().unwrap().is_none(), "xdisk nbd exited");
        assert!(t.elapsed() < Duration::from_secs(20));
        std::thread::sleep(Duration::from_millis(20));
    }
    ok(Command::new("qemu-io")
        .args([
            "-f",
            "raw",
            "-c",
            "write -P 0x66 1M 1M",
            "-c",
            "read -P 0x11 2M 1M",
        ])
        .arg(uri(&re)));
    let t = Instant::now();
    while child.try_wait().unwrap().is_none() {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "xdisk nbd did not exit"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(srv);
    ok(Command::new("qemu-io")
        .args([
            "-f",
            "qcow2",
            "-c",
            "read -P 0x66 1M 1M",
            "-c",
            "read -P 0x22 40M 64k",
        ])
        .arg(&img));
    ok(Command::new("qemu-img").arg("check").arg(&img));
}

/// `xdisk nbd` as the server and xdisk's client against it (extended headers), and
/// nbdkit as a server: convert round trip.
#[test]
fn xdisk_client_against_xdisk_nbd_and_nbdkit() {
    let dir = tmp("xdisk-nbd-client-cli-");
    let img = dir.path().join("a.raw");
    let data: Vec<u8> = (0..(8u32 << 20)).map(|i| (i / 4096) as u8).collect();
    std::fs::write(&img, &data).unwrap();
    let sock = dir.path().join("x.sock");
    let mut child = xdisk()
        .args(["nbd", "-f", "raw", "-x", "disk", "-t", "-k"])
        .arg(&sock)
        .arg(&img)
        .spawn()
        .unwrap();
    let t = Instant::now();
    while !sock.exists() {
        assert!(child.try_wait().unwrap().is_none(), "xdisk nbd exited");
        assert!(t.elapsed() < Duration::from_secs(20));
        std::thread::sleep(Duration::from_millis(20));
    }
    let _srv = Server { child };
    let out = dir.path().join("b.raw");
    ok(xdisk()
        .args(["img", "convert", "-f", "raw", "-O", "raw"])
        .arg(uri(&sock))
        .arg(&out));
    assert!(std::fs::read(&out).unwrap() == data);
    let legacy = format!("nbd:unix:{}:exportname=disk", sock.display());
    ok(xdisk()
        .args(["img", "compare", "-f", "raw", "-F", "raw"])
        .arg(&legacy)
        .arg(&out));

    if !have("nbdkit") {
        return;
    }
    // nbdkit's data plugin: a pattern, no extents (every block is data), read-only.
    let ks = dir.path().join("k.sock");
    let _k = start(
        Command::new("nbdkit")
            .args(["-f", "-r", "-U"])
            .arg(&ks)
            .args(["pattern", "8M"]),
        &ks,
    );
    let ku = format!("nbd+unix:///?socket={}", ks.display());
    let pat = dir.path().join("pattern.raw");
    ok(xdisk()
        .args(["img", "convert", "-f", "raw", "-O", "raw"])
        .arg(&ku)
        .arg(&pat));
    let got = std::fs::read(&pat).unwrap();
    assert_eq!(got.len(), 8 << 20);
    // nbdkit-pattern-plugin: each 8-byte word is its own offset, big-endian.
    for off in [0usize, 8, 4096, (8 << 20) - 8] {
        assert_eq!(
            u64::from_be_bytes(got[off..off + 8].try_into().unwrap()),
            off as u64
        );
    }
}

#[test]
fn nbd_names_that_cannot_work_fail_clearly() {
    for (name, want) in [
        ("nbds://localhost:1/x", "cannot connect"),
        ("nbd+unix:///x", "socket"),
        // RBD images are served now; one whose configuration is missing says so.
        (
            "rbd:pool/img:conf=/nonexistent/ceph.conf",
            "cannot read the Ceph configuration /nonexistent/ceph.conf",
        ),
    ] {
        let o = xdisk().args(["img", "info", name]).output().unwrap();
        assert!(!o.status.success(), "{name}");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(want), "{name}: {err}");
    }
    let dir = tmp("xdisk-nbd-client-cli-");
    let missing: PathBuf = dir.path().join("none.sock");
    let o = xdisk()
        .args(["img", "info"])
        .arg(format!("nbd+unix:///x?socket={}", missing.display()))
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("cannot connect"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn convert_into_an_existing_nbd_export_with_n() {
    let d = tmp("xdisk-nbd-client-cli-");
    let src = d.path().join("src.qcow2");
    ok(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&src)
        .arg("8M"));
    ok(Command::new("qemu-io")
        .args([
            "-f",
            "qcow2",
            "-c",
            "write -P 0x61 0 1M",
            "-c",
            "write -P 0x62 5M 512k",
        ])
        .arg(&src));
    // The target is not zero: -n must zero what the source has as zeroes.
    let target = d.path().join("target.raw");
    std::fs::write(&target, vec![0xffu8; 8 << 20]).unwrap();
    let sock = d.path().join("t.sock");
    let srv = qemu_nbd(&sock, "raw", &target);
    let u = uri(&sock);
    ok(xdisk()
        .args(["img", "convert", "-n", "-f", "qcow2", "-O", "raw"])
        .arg(&src)
        .arg(&u));
    drop(srv);
    ok(Command::new("qemu-img")
        .args(["compare", "-f", "qcow2", "-F", "raw"])
        .arg(&src)
        .arg(&target));
    // Without -n an NBD output cannot be created; a smaller output is refused.
    let small = d.path().join("small.raw");
    std::fs::write(&small, vec![0u8; 1 << 20]).unwrap();
    let o = xdisk()
        .args(["img", "convert", "-n", "-f", "qcow2", "-O", "raw"])
        .arg(&src)
        .arg(&small)
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("smaller"));
}

/// Backing files of images that live behind NBD, resolved as QEMU does: an absolute host
/// path is opened, a relative name cannot be resolved (no directory: "cannot determine
/// actual path") and is refused with the reason; and a backing file that is itself an NBD
/// URI is opened read-only. Checked against qemu-img's view of the same chains.
#[test]
fn backing_files_of_images_behind_nbd_resolve_as_qemu_does() {
    if !have("qemu-nbd") {
        return;
    }
    let dir = tmp("xdisk-nbd-client-cli-");
    let base = dir.path().join("base.qcow2");
    ok(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&base)
        .arg("16M"));
    ok(Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "write -P 0x33 0 1M"])
        .arg(&base));
    let abs = dir.path().join("abs.qcow2");
    let rel = dir.path().join("rel.qcow2");
    for (img, name) in [(&abs, base.to_str().unwrap()), (&rel, "base.qcow2")] {
        ok(Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", name])
            .arg(img));
        ok(Command::new("qemu-io")
            .args(["-f", "qcow2", "-c", "write -P 0x44 512k 64k"])
            .arg(img));
    }
    // Absolute: the whole chain, and the data qemu-img reads from the same export.
    let sock = dir.path().join("a.sock");
    let srv = qemu_nbd(&sock, "raw", &abs);
    let u = uri(&sock);
    let info = ok(xdisk()
        .args(["img", "info", "--backing-chain", "-f", "qcow2"])
        .arg(&u));
    assert!(
        info.contains(&format!("image: {}", base.display())),
        "{info}"
    );
    converts_as_qemu_img(&u, dir.path());
    drop(srv);
    // Relative: shown as unresolvable, the open refused with the reason.
    let sock = dir.path().join("r.sock");
    let _srv = qemu_nbd(&sock, "raw", &rel);
    let u = uri(&sock);
    let info = ok(xdisk()
        .args(["img", "info", "--backing-chain", "-f", "qcow2"])
        .arg(&u));
    assert!(
        info.contains("backing file: base.qcow2 (cannot determine actual path)")
            && info.contains("a relative name, but the image is not a host file"),
        "{info}"
    );
    let o = xdisk()
        .args(["img", "convert", "-f", "qcow2", "-O", "raw"])
        .arg(&u)
        .arg(dir.path().join("never.raw"))
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("cannot determine the backing file"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    // A backing file that is an NBD export: opened read-only through the client.
    let bsock = dir.path().join("b.sock");
    let _bsrv = qemu_nbd(&bsock, "qcow2", &base);
    let top = dir.path().join("top.qcow2");
    ok(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-u", "-F", "raw", "-b"])
        .arg(uri(&bsock))
        .arg(&top)
        .arg("16M"));
    ok(Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "write -P 0x55 2M 64k"])
        .arg(&top));
    let info = ok(xdisk()
        .args(["img", "info", "--backing-chain", "-f", "qcow2"])
        .arg(&top));
    assert!(info.contains(&format!("image: {}", uri(&bsock))), "{info}");
    converts_as_qemu_img(top.to_str().unwrap(), dir.path());
}

/// `xdisk img convert` and `qemu-img convert` of the qcow2 image `src` (a path or URI, with
/// its chain) to raw give the same bytes.
fn converts_as_qemu_img(src: &str, dir: &Path) {
    let (ours, theirs) = (dir.join("ours.raw"), dir.join("theirs.raw"));
    ok(xdisk()
        .args(["img", "convert", "-f", "qcow2", "-O", "raw", src])
        .arg(&ours));
    ok(Command::new("qemu-img")
        .args(["convert", "-f", "qcow2", "-O", "raw", src])
        .arg(&theirs));
    assert_eq!(
        std::fs::read(&ours).unwrap(),
        std::fs::read(&theirs).unwrap()
    );
}
