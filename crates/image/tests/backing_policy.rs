//! Backing files are a host path chosen by whoever wrote the image: the attacks of issue 9
//! finding 2, tried through the library. A probed image never opens its backing file;
//! backing files are regular files or block devices outside /proc and /sys (FIFOs refused
//! without blocking), and inside `backing_dirs` when that is set.

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use xdisk_image::{CacheMode, Error, Format, Image, OpenOptions};

mod support;

fn tmp() -> tempfile::TempDir {
    support::tmpdir("xdisk-backing-")
}

fn opts(format: Option<Format>) -> OpenOptions {
    OpenOptions {
        format,
        read_only: true,
        cache: CacheMode::WriteBack,
        ..OpenOptions::default()
    }
}

/// A qcow2 image at `p` naming `backing` (format `fmt`), created without opening it.
fn qcow2_naming(p: &Path, backing: &str, fmt: &str) {
    support::qemu_img_ok(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-u",
        "-b",
        backing,
        "-F",
        fmt,
        p.to_str().unwrap(),
        "1M",
    ]);
}

/// Another tenant's disk: 1 MiB of 0x5a.
fn tenant_disk(dir: &Path) -> PathBuf {
    let p = dir.join("tenant.raw");
    std::fs::write(&p, vec![0x5au8; 1 << 20]).unwrap();
    p
}

/// Runs `f` on a thread and fails the test if it takes more than 10 s (a FIFO open blocks
/// forever).
fn within_10s<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(Duration::from_secs(10))
        .unwrap_or_else(|_| panic!("{what}: still blocked after 10 s"))
}

#[test]
fn probed_image_never_opens_its_backing_file() {
    let d = tmp();
    let tenant = tenant_disk(d.path());
    // A raw disk whose guest wrote a qcow2 header naming another tenant's disk.
    let disk = d.path().join("disk.raw");
    qcow2_naming(&disk, tenant.to_str().unwrap(), "raw");
    // Probed: refused, naming the fix.
    let e = Image::open(&disk, &opts(None)).unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, Error::Backing(_)), "{e:?}");
    assert!(
        msg.contains("probed") && msg.contains("-f qcow2") && msg.contains("params=qcow2:"),
        "{msg}"
    );
    // Read-write too (what the daemon does for a writable disk).
    let rw = OpenOptions {
        read_only: false,
        ..opts(None)
    };
    assert!(matches!(Image::open(&disk, &rw), Err(Error::Backing(_))));
    // Served as raw (params=aio:), the guest reads its own header, never the tenant's data.
    let img = Image::open(&disk, &opts(Some(Format::Raw))).unwrap();
    let mut buf = vec![0u8; 4096];
    img.read_at(&mut buf, 0).unwrap();
    assert_eq!(&buf[..4], b"QFI\xfb");
    assert!(img.backing().is_none());
    // A probed image without a backing file still opens.
    let plain = d.path().join("plain.qcow2");
    support::qemu_img_ok(&["create", "-q", "-f", "qcow2", plain.to_str().unwrap(), "1M"]);
    assert!(Image::open(&plain, &opts(None)).is_ok());
    // So does one whose chain is not opened (info without --backing-chain).
    let closed = OpenOptions {
        open_backing: false,
        ..opts(None)
    };
    assert!(Image::open(&disk, &closed).unwrap().backing().is_none());
    // With the format given, the operator vouches for the image: the chain opens.
    let img = Image::open(&disk, &opts(Some(Format::Qcow2))).unwrap();
    img.read_at(&mut buf, 0).unwrap();
    assert!(buf.iter().all(|&b| b == 0x5a));
}

#[test]
fn probed_backing_file_never_opens_its_own_backing_file() {
    // top (format given) -> mid (no backing format: probed) -> tenant: mid's backing is
    // refused.
    let d = tmp();
    let tenant = tenant_disk(d.path());
    let mid = d.path().join("mid.qcow2");
    qcow2_naming(&mid, tenant.to_str().unwrap(), "raw");
    let top = d.path().join("top.qcow2");
    qcow2_naming(&top, mid.to_str().unwrap(), "qcow2");
    // qemu-img insists on a backing format: hide its extension (unknown types are skipped).
    let mut b = std::fs::read(&top).unwrap();
    let at = b
        .windows(4)
        .position(|w| w == 0xe279_2acau32.to_be_bytes())
        .expect("backing format extension");
    b[at..at + 4].copy_from_slice(&0x1234_5678u32.to_be_bytes());
    std::fs::write(&top, b).unwrap();
    let e = Image::open(&top, &opts(Some(Format::Qcow2))).unwrap_err();
    assert!(e.to_string().contains("probed"), "{e}");
}

/// Backing names go through DiskSource, the one place that knows storages: a URI or an RBD
/// name is never looked up as a relative file. It is a storage of its own (opened as QEMU
/// does, see nbd_client_cli.rs), refused when backing files are limited to host directories.
#[test]
fn backing_file_uri_is_a_storage_not_a_relative_file() {
    let d = tmp();
    for (i, name) in [
        "nbd+unix:///base?socket=/nonexistent/x.sock",
        "rbd:pool/base",
    ]
    .into_iter()
    .enumerate()
    {
        let img = d.path().join(format!("top{i}.qcow2"));
        qcow2_naming(&img, name, "raw");
        let mut o = opts(Some(Format::Qcow2));
        o.backing_dirs = vec![d.path().to_path_buf()];
        let e = Image::open(&img, &o).unwrap_err();
        assert!(
            matches!(e, Error::Backing(_)) && e.to_string().contains("not a host file"),
            "{name}: {e}"
        );
    }
}

#[test]
fn character_device_backing_file_is_refused() {
    let d = tmp();
    let img = d.path().join("zero.qcow2");
    qcow2_naming(&img, "/dev/zero", "raw");
    let e = Image::open(&img, &opts(Some(Format::Qcow2))).unwrap_err();
    assert!(
        e.to_string().contains("character device") && e.to_string().contains("/dev/zero"),
        "{e}"
    );
    // A symbolic link to it as well.
    std::os::unix::fs::symlink("/dev/zero", d.path().join("zlink")).unwrap();
    let img2 = d.path().join("zl.qcow2");
    qcow2_naming(&img2, "zlink", "raw");
    let e = Image::open(&img2, &opts(Some(Format::Qcow2))).unwrap_err();
    assert!(e.to_string().contains("character device"), "{e}");
}

#[test]
fn fifo_backing_file_is_refused_promptly() {
    let d = tmp();
    let fifo = d.path().join("fifo");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let img = d.path().join("fifo.qcow2");
    qcow2_naming(&img, "fifo", "raw");
    let r = within_10s("open with a FIFO backing file", move || {
        Image::open(&img, &opts(Some(Format::Qcow2))).map(|_| ())
    });
    let e = r.unwrap_err();
    assert!(e.to_string().contains("FIFO"), "{e}");
}

#[test]
fn proc_and_sys_backing_files_are_refused() {
    let d = tmp();
    for (i, name) in [
        "/proc/self/environ",
        "/sys/kernel/notes",
        "/proc/self/root/etc/passwd",
    ]
    .iter()
    .enumerate()
    {
        let img = d.path().join(format!("p{i}.qcow2"));
        qcow2_naming(&img, name, "raw");
        let r = Image::open(&img, &opts(Some(Format::Qcow2)));
        if *name == "/proc/self/root/etc/passwd" {
            // Resolves to /etc/passwd: not under /proc once canonical (a regular file; the
            // directory policy is what confines such names).
            let dirs = OpenOptions {
                backing_dirs: vec![d.path().to_path_buf()],
                ..opts(Some(Format::Qcow2))
            };
            assert!(Image::open(&img, &dirs).is_err());
            continue;
        }
        let e = r.unwrap_err();
        assert!(e.to_string().contains("lies under"), "{name}: {e}");
    }
}

#[test]
fn backing_files_outside_backing_dirs_are_refused() {
    let d = tmp();
    let images = d.path().join("images");
    let others = d.path().join("others");
    std::fs::create_dir_all(&images).unwrap();
    std::fs::create_dir_all(&others).unwrap();
    let tenant = tenant_disk(&others);
    let base = images.join("base.raw");
    std::fs::write(&base, vec![1u8; 1 << 20]).unwrap();
    let good = images.join("good.qcow2");
    qcow2_naming(&good, "base.raw", "raw");
    let bad = images.join("bad.qcow2");
    qcow2_naming(&bad, tenant.to_str().unwrap(), "raw");
    // A symbolic link inside the allowed directory pointing out of it.
    std::os::unix::fs::symlink(&tenant, images.join("link.raw")).unwrap();
    let sneaky = images.join("sneaky.qcow2");
    qcow2_naming(&sneaky, "link.raw", "raw");
    let dotdot = images.join("dotdot.qcow2");
    qcow2_naming(&dotdot, "../others/tenant.raw", "raw");
    let policy = OpenOptions {
        backing_dirs: vec![images.clone()],
        ..opts(Some(Format::Qcow2))
    };
    assert!(Image::open(&good, &policy).is_ok());
    for img in [&bad, &sneaky, &dotdot] {
        let e = Image::open(img, &policy).unwrap_err();
        assert!(
            e.to_string()
                .contains("outside the allowed backing directories"),
            "{}: {e}",
            img.display()
        );
    }
    // Several directories: any of them.
    let both = OpenOptions {
        backing_dirs: vec![images.clone(), others.clone()],
        ..policy.clone()
    };
    assert!(Image::open(&bad, &both).is_ok());
    // Without a policy, any regular file goes (the default).
    assert!(Image::open(&bad, &opts(Some(Format::Qcow2))).is_ok());
}

#[test]
fn inspection_shows_the_refused_backing_file() {
    let d = tmp();
    let tenant = tenant_disk(d.path());
    let disk = d.path().join("disk.raw");
    qcow2_naming(&disk, tenant.to_str().unwrap(), "raw");
    let (img, refusal) = Image::open_for_inspection(&disk, &opts(None)).unwrap();
    assert!(img.backing().is_none());
    let r = refusal.expect("the refusal is reported");
    assert_eq!(r.name, tenant.to_str().unwrap());
    assert_eq!(r.path, tenant);
    assert_eq!(r.image, disk);
    assert!(r.error.to_string().contains("probed"), "{}", r.error);
    // A FIFO further down: the chain up to it is open, the FIFO is reported, promptly.
    let fifo = d.path().join("fifo");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let mid = d.path().join("mid.qcow2");
    qcow2_naming(&mid, "fifo", "raw");
    let top = d.path().join("top.qcow2");
    qcow2_naming(&top, "mid.qcow2", "qcow2");
    let (img, refusal) = within_10s("inspection of a FIFO chain", move || {
        Image::open_for_inspection(&top, &opts(Some(Format::Qcow2))).unwrap()
    });
    assert!(img.backing().is_some());
    let r = refusal.unwrap();
    assert_eq!(r.image, mid);
    assert!(r.error.to_string().contains("FIFO"), "{}", r.error);
}
