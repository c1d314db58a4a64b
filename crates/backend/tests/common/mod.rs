//! Shared set-up of the end-to-end tests: a simulated Xen host, the toolstack's part of
//! adding a vbd (xenstore directories and permissions, as libxl does), images in /var/tmp,
//! a backend [`Device`] and a [`Frontend`] in a guest domain.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use xdisk_backend::{Device, DeviceConfig};
use xdisk_blkfront::{FrontConfig, Frontend};
use xdisk_blkif::XenbusState;
use xdisk_image::{CacheMode, Image, OpenOptions};
use xdisk_xen::xenstore::{Access, Client, Perm};
use xdisk_xensim::{SimDomain, SimXen};

/// Pages of memory of a test guest.
pub const GUEST_PAGES: usize = 8192;

pub struct Host {
    pub xen: Arc<SimXen>,
    /// The backend's xenstore connection (dom0), shared by its devices.
    pub xs: Arc<Client>,
    /// The toolstack's connection.
    pub toolstack: Client,
}

pub fn host() -> Host {
    let xen = SimXen::new().expect("simulation");
    let xs = Arc::new(xen.xenstore(0).expect("xenstore"));
    let toolstack = xen.xenstore(0).expect("xenstore");
    Host { xen, xs, toolstack }
}

pub fn fe_dir(domid: u16, devid: u32) -> String {
    format!("/local/domain/{domid}/device/vbd/{devid}")
}

pub fn be_dir(domid: u16, devid: u32) -> String {
    format!("/local/domain/0/backend/vbd/{domid}/{devid}")
}

impl Host {
    /// What libxl writes to add a vbd: the frontend directory (owned by the guest, readable by
    /// dom0) with `backend`, `backend-id`, `state` 1 and `virtual-device`; the backend
    /// directory (owned by dom0, readable by the guest) with `frontend`, `frontend-id`,
    /// `online` 1, `mode`, `state` 1.
    pub fn add_vbd(&self, domid: u16, devid: u32, mode: &str, extra_fe: &[(&str, &str)]) {
        let fe = fe_dir(domid, devid);
        let be = be_dir(domid, devid);
        let fe_perms = [Perm::new(Access::None, domid), Perm::new(Access::Read, 0)];
        let be_perms = [Perm::new(Access::None, 0), Perm::new(Access::Read, domid)];
        self.toolstack
            .transaction(|tx| {
                tx.mkdir(&fe)?;
                tx.set_perms(&fe, &fe_perms)?;
                tx.write(&format!("{fe}/backend"), &be)?;
                tx.write(&format!("{fe}/backend-id"), "0")?;
                tx.write(&format!("{fe}/virtual-device"), devid.to_string())?;
                for (k, v) in extra_fe {
                    tx.write(&format!("{fe}/{k}"), v)?;
                }
                tx.write(&format!("{fe}/state"), "1")?;
                tx.mkdir(&be)?;
                tx.set_perms(&be, &be_perms)?;
                tx.write(&format!("{be}/frontend"), &fe)?;
                tx.write(&format!("{be}/frontend-id"), domid.to_string())?;
                tx.write(&format!("{be}/online"), "1")?;
                tx.write(&format!("{be}/mode"), mode)?;
                tx.write(&format!("{be}/state"), "1")
            })
            .expect("toolstack writes the vbd");
    }

    pub fn read(&self, path: &str) -> Option<String> {
        self.toolstack.read_string(path).ok()
    }

    pub fn be_state(&self, domid: u16, devid: u32) -> Option<XenbusState> {
        self.read(&format!("{}/state", be_dir(domid, devid)))
            .and_then(|s| s.parse().ok())
    }
}

/// A disk image in a temporary directory under /var/tmp.
pub struct Disk {
    pub dir: tempfile::TempDir,
    pub path: PathBuf,
    pub format: &'static str,
}

pub fn tmpdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("xdisk-backend-")
        .tempdir_in("/var/tmp")
        .expect("temp dir")
}

pub fn qemu_img(args: &[&str]) -> String {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img runs");
    assert!(
        out.status.success(),
        "qemu-img {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn raw_disk(size: u64) -> Disk {
    let dir = tmpdir();
    let path = dir.path().join("disk.raw");
    let f = std::fs::File::create(&path).unwrap();
    f.set_len(size).unwrap();
    Disk {
        dir,
        path,
        format: "raw",
    }
}

pub fn qcow2_disk(size: u64) -> Disk {
    qcow2_disk_with(size, "")
}

/// A qcow2 image made by qemu-img with creation options `opts` (`-o`; none if empty).
pub fn qcow2_disk_with(size: u64, opts: &str) -> Disk {
    let dir = tmpdir();
    let path = dir.path().join("disk.qcow2");
    let size = size.to_string();
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    if !opts.is_empty() {
        args.extend(["-o", opts]);
    }
    args.extend([path.to_str().unwrap(), size.as_str()]);
    qemu_img(&args);
    Disk {
        dir,
        path,
        format: "qcow2",
    }
}

pub fn open_image(path: &Path, read_only: bool) -> Arc<Image> {
    Image::open(
        path,
        &OpenOptions {
            read_only,
            cache: CacheMode::None,
            ..OpenOptions::default()
        },
    )
    .expect("image opens")
}

/// The image's contents as raw bytes (qemu-img convert).
pub fn contents(disk: &Disk) -> Vec<u8> {
    let out = disk.dir.path().join("contents.raw");
    qemu_img(&[
        "convert",
        "-U",
        "-O",
        "raw",
        disk.path.to_str().unwrap(),
        out.to_str().unwrap(),
    ]);
    let v = std::fs::read(&out).unwrap();
    let _ = std::fs::remove_file(&out);
    v
}

/// `qemu-img check` is clean (qcow2 only).
pub fn check_clean(disk: &Disk) {
    if disk.format == "qcow2" {
        let out = Command::new("qemu-img")
            .args(["check", "-U", disk.path.to_str().unwrap()])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "qemu-img check: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// A backend device and a frontend in guest `domid`.
pub struct Pair {
    pub dom: Arc<SimDomain>,
    pub device: Device,
    pub front: Frontend,
    pub image: Arc<Image>,
    pub domid: u16,
    pub devid: u32,
}

pub fn device_config(domid: u16, devid: u32) -> DeviceConfig {
    let mut c = DeviceConfig::new(be_dir(domid, devid));
    c.queue.slow_threads = 1;
    c
}

/// Starts a device for guest `domid` (created here) on `image` and connects a frontend.
pub fn pair(
    host: &Host,
    domid: u16,
    devid: u32,
    image: Arc<Image>,
    be: impl FnOnce(&mut DeviceConfig),
    fe: FrontConfig,
) -> Pair {
    let dom = host.xen.create_domain(domid, GUEST_PAGES).expect("domain");
    let mode = if image.read_only() { "r" } else { "w" };
    host.add_vbd(domid, devid, mode, &[]);
    let mut cfg = device_config(domid, devid);
    be(&mut cfg);
    let device = start_device(host, cfg, image.clone());
    let front = Frontend::connect(
        dom.xenstore().expect("guest xenstore"),
        dom.clone(),
        &fe_dir(domid, devid),
        fe,
    )
    .expect("frontend connects");
    Pair {
        dom,
        device,
        front,
        image,
        domid,
        devid,
    }
}

pub fn start_device(host: &Host, cfg: DeviceConfig, image: Arc<Image>) -> Device {
    Device::start(
        cfg,
        host.xs.clone(),
        host.xen.grant_mapper(0),
        host.xen.event_channels(0),
        image,
    )
    .expect("device starts")
}

/// Waits until `f` holds.
pub fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Deterministic test data.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
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

/// Threads of this process.
pub fn thread_count() -> usize {
    std::fs::read_dir("/proc/self/task").map_or(0, |d| d.count())
}

/// The first page of `dom` holding 512 aligned bytes of `byte` (where a late storage's writes
/// would show if they reached the guest).
pub fn guest_page_with_run(dom: &xdisk_xensim::SimDomain, byte: u8) -> Option<usize> {
    let mut page = vec![0u8; 4096];
    (0..dom.pages()).find(|&i| {
        dom.page(i)
            .expect("guest page")
            .copy_from(0, &mut page)
            .expect("read the page");
        page.chunks(512).any(|c| c.iter().all(|&b| b == byte))
    })
}
