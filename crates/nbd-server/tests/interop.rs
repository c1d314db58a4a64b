//! The NBD server against real clients: qemu-img, qemu-io and libnbd's nbdcopy and nbdinfo,
//! on raw and qcow2 images, over a unix socket.

use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use xdisk_image::{CacheMode, Format, Image, OpenOptions};
use xdisk_nbd_server::{serve_connection, DiscardMode, Export, ServerConfig};

fn tmpdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("xdisk-nbd-")
        .tempdir_in("/var/tmp")
        .unwrap()
}

fn run(cmd: &mut Command) -> String {
    let o = cmd.output().expect("tool runs");
    assert!(
        o.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Serves `image` as export "disk" on a unix socket in `dir` (a detached listener thread;
/// each test has its own socket); returns the socket's path.
fn serve(dir: &Path, image: Arc<Image>) -> PathBuf {
    let sock = dir.join("nbd.sock");
    let listener = UnixListener::bind(&sock).unwrap();
    let mut cfg = ServerConfig::new(vec![Export {
        name: "disk".into(),
        description: "test disk".into(),
        image,
        read_only: false,
        bitmaps: Vec::new(),
    }]);
    cfg.discard = DiscardMode::Unmap;
    let cfg = Arc::new(cfg);
    std::thread::spawn(move || {
        for s in listener.incoming() {
            let Ok(s) = s else { return };
            let cfg = cfg.clone();
            std::thread::spawn(move || {
                if let Err(e) = serve_connection(s, &cfg) {
                    eprintln!("connection: {e}");
                }
            });
        }
    });
    sock
}

fn uri(sock: &Path) -> String {
    format!("nbd+unix:///disk?socket={}", sock.display())
}

fn open(p: &Path, format: Format) -> Arc<Image> {
    Image::open(
        p,
        &OpenOptions {
            format: Some(format),
            cache: CacheMode::None,
            ..OpenOptions::default()
        },
    )
    .unwrap()
}

fn random_file(p: &Path, size: usize) -> Vec<u8> {
    let mut data = vec![0u8; size];
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for (i, b) in data.iter_mut().enumerate() {
        // Some all-zero regions, so that holes and zero runs exist.
        if (i >> 20) % 4 == 3 {
            continue;
        }
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    std::fs::write(p, &data).unwrap();
    data
}

#[test]
fn qemu_img_and_nbdcopy_read_what_the_image_holds() {
    let dir = tmpdir();
    let raw = dir.path().join("src.raw");
    let data = random_file(&raw, 8 << 20);
    let q = dir.path().join("src.qcow2");
    run(Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "qcow2"])
        .arg(&raw)
        .arg(&q));
    for (path, fmt) in [(&raw, Format::Raw), (&q, Format::Qcow2)] {
        let sub = tmpdir();
        let sock = serve(sub.path(), open(path, fmt));
        let out = sub.path().join("out.raw");
        run(Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "raw"])
            .arg(uri(&sock))
            .arg(&out));
        assert!(
            std::fs::read(&out).unwrap() == data,
            "qemu-img convert ({fmt})"
        );
        let out2 = sub.path().join("out2.raw");
        run(Command::new("nbdcopy").arg(uri(&sock)).arg(&out2));
        assert!(std::fs::read(&out2).unwrap() == data, "nbdcopy ({fmt})");
        let info = run(Command::new("nbdinfo")
            .args(["--json", "--no-content"])
            .arg(uri(&sock)));
        assert!(info.contains("\"export-size\": 8388608"), "{info}");
    }
}

#[test]
fn writes_from_qemu_io_and_nbdcopy_land_in_the_image() {
    let dir = tmpdir();
    let q = dir.path().join("dst.qcow2");
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&q)
        .arg("8M"));
    let image = open(&q, Format::Qcow2);
    let sock = serve(dir.path(), image.clone());
    // Plain, FUA and zero writes, a discard, a flush.
    run(Command::new("qemu-io")
        .args(["-f", "raw"])
        .args(["-c", "write -P 0x5a 0 1M"])
        .args(["-c", "write -f -P 0x6b 1M 64k"])
        .args(["-c", "write -z 2M 1M"])
        .args(["-c", "write -P 0x11 4M 1M"])
        .args(["-c", "discard 4M 512k"])
        .args(["-c", "flush"])
        .arg(uri(&sock)));
    let mut b = vec![0u8; 6 << 20];
    image.read_at(&mut b, 0).unwrap();
    assert!(b[..1 << 20].iter().all(|&x| x == 0x5a));
    assert!(b[1 << 20..(1 << 20) + 65536].iter().all(|&x| x == 0x6b));
    assert!(b[2 << 20..3 << 20].iter().all(|&x| x == 0));
    assert!(b[4 << 20..(4 << 20) + (512 << 10)].iter().all(|&x| x == 0));
    assert!(b[(4 << 20) + (512 << 10)..5 << 20]
        .iter()
        .all(|&x| x == 0x11));
    // nbdcopy writes a whole file through the export (many requests in flight).
    let src = dir.path().join("src.raw");
    let data = random_file(&src, 8 << 20);
    run(Command::new("nbdcopy").arg(&src).arg(uri(&sock)));
    let mut all = vec![0u8; 8 << 20];
    image.read_at(&mut all, 0).unwrap();
    assert!(all == data, "nbdcopy wrote the file");
    image.flush().unwrap();
    image.close().unwrap();
    drop(image);
    run(Command::new("qemu-img").arg("check").arg(&q));
}

#[test]
fn block_status_matches_qemu_img_map() {
    let dir = tmpdir();
    let q = dir.path().join("sparse.qcow2");
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&q)
        .arg("8M"));
    run(Command::new("qemu-io")
        .args([
            "-f",
            "qcow2",
            "-c",
            "write -P 1 1M 1M",
            "-c",
            "write -z 4M 1M",
        ])
        .arg(&q));
    let sock = serve(dir.path(), open(&q, Format::Qcow2));
    let map = run(Command::new("nbdinfo")
        .args(["--map", "--json"])
        .arg(uri(&sock)));
    // Data at 1M..2M; holes (reading zero) everywhere else.
    assert!(
        map.contains("\"offset\": 1048576, \"length\": 1048576, \"type\": 0"),
        "{map}"
    );
    assert!(
        map.contains("\"offset\": 0, \"length\": 1048576, \"type\": 3"),
        "{map}"
    );
}

/// A read that fails on the host (an injected EIO) reaches the client as an error (an
/// `ERROR_OFFSET` chunk with structured replies), and the connection goes on: the next read
/// works. qemu-io is the client.
#[test]
fn a_failed_read_reaches_qemu_io_as_an_error_and_the_connection_goes_on() {
    use xdisk_io::fault::{Fault, FaultOn, FaultPlan};
    let dir = tmpdir();
    let raw = dir.path().join("disk.raw");
    random_file(&raw, 4 << 20);
    let image = open(&raw, Format::Raw);
    let plan = FaultPlan::new();
    image
        .storage()
        .as_file()
        .expect("a host file")
        .inject_faults(&plan);
    plan.fail_next(FaultOn::Read, Fault::Errno(libc::EIO));
    let sock = serve(dir.path(), image);
    let o = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "read 0 64k", "-c", "read -P 0 3M 64k"])
        .arg(uri(&sock))
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr);
    assert!(text.contains("Input/output error"), "{text}");
    // The second read (zeroes at 3M: the test file's zero megabytes) went through.
    assert!(
        text.contains("read 65536/65536 bytes at offset 3145728"),
        "{text}"
    );
    assert_eq!(plan.injected(), 1);
}
