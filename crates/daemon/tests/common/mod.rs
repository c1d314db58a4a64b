//! Shared set-up: a simulated Xen host, the supervisor serving dom0's backends, a toolstack
//! that writes disks the way libxl does, guests with a Rust blkfront, images in /var/tmp.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use xdisk_blkfront::{FrontConfig, Frontend};
use xdisk_blkif::XenbusState;
use xdisk_daemon::{Platform, Supervisor, SupervisorConfig};
use xdisk_xen::xenstore::{Access, Client, Perm};
use xdisk_xensim::{SimDomain, SimXen};

pub const GUEST_PAGES: usize = 8192;
pub const MIB: u64 = 1 << 20;

pub struct Host {
    pub xen: Arc<SimXen>,
    pub toolstack: Client,
}

pub fn host() -> Host {
    let xen = SimXen::new().expect("simulation");
    let toolstack = xen.xenstore(0).expect("xenstore");
    Host { xen, toolstack }
}

pub fn supervisor(host: &Host, cfg: SupervisorConfig) -> Supervisor {
    let platform = Platform::sim(&host.xen, 0).expect("platform");
    Supervisor::start(cfg, platform).expect("supervisor starts")
}

pub fn fe_dir(domid: u16, devid: u32) -> String {
    format!("/local/domain/{domid}/device/vbd/{devid}")
}

pub fn be_dir(t: &str, domid: u16, devid: u32) -> String {
    format!("/local/domain/0/backend/{t}/{domid}/{devid}")
}

impl Host {
    /// What libxl's `device_disk_add` writes for a `backendtype=qdisk` disk, in one
    /// transaction; `extra` adds or overrides backend nodes.
    pub fn add_qdisk(&self, domid: u16, devid: u32, params: &str, extra: &[(&str, &str)]) {
        self.add_disk("qdisk", domid, devid, params, extra)
    }

    pub fn add_disk(&self, t: &str, domid: u16, devid: u32, params: &str, extra: &[(&str, &str)]) {
        let fe = fe_dir(domid, devid);
        let be = be_dir(t, domid, devid);
        let fe_perms = [Perm::new(Access::None, domid), Perm::new(Access::Read, 0)];
        let be_perms = [Perm::new(Access::None, 0), Perm::new(Access::Read, domid)];
        let vdev = xdisk_daemon::devid::name_of_devid(devid).unwrap_or_default();
        self.toolstack
            .transaction(|tx| {
                tx.mkdir(&fe)?;
                tx.set_perms(&fe, &fe_perms)?;
                tx.write(&format!("{fe}/backend"), &be)?;
                tx.write(&format!("{fe}/backend-id"), "0")?;
                tx.write(&format!("{fe}/virtual-device"), devid.to_string())?;
                tx.write(&format!("{fe}/device-type"), "disk")?;
                tx.write(&format!("{fe}/state"), "1")?;
                tx.mkdir(&be)?;
                tx.set_perms(&be, &be_perms)?;
                let mut nodes: Vec<(String, String)> = vec![
                    ("frontend".into(), fe.clone()),
                    ("frontend-id".into(), domid.to_string()),
                    ("online".into(), "1".into()),
                    ("removable".into(), "0".into()),
                    ("bootable".into(), "1".into()),
                    ("state".into(), "1".into()),
                    ("dev".into(), vdev.clone()),
                    ("type".into(), t.into()),
                    ("mode".into(), "w".into()),
                    ("device-type".into(), "disk".into()),
                    ("discard-enable".into(), "1".into()),
                    ("params".into(), params.into()),
                ];
                for (k, v) in extra {
                    nodes.retain(|(n, _)| n != k);
                    nodes.push((k.to_string(), v.to_string()));
                }
                for (k, v) in &nodes {
                    tx.write(&format!("{be}/{k}"), v)?;
                }
                Ok(())
            })
            .expect("toolstack writes the disk");
    }

    /// libxl's `libxl__device_destroy`: both directories go (and empty parents).
    pub fn remove_disk(&self, t: &str, domid: u16, devid: u32) {
        let _ = self.toolstack.rm(&fe_dir(domid, devid));
        let _ = self.toolstack.rm(&be_dir(t, domid, devid));
    }

    pub fn read(&self, path: &str) -> Option<String> {
        self.toolstack.read_string(path).ok()
    }

    pub fn exists(&self, path: &str) -> bool {
        self.toolstack.read_string(path).is_ok()
    }

    pub fn be_state(&self, t: &str, domid: u16, devid: u32) -> Option<XenbusState> {
        self.read(&format!("{}/state", be_dir(t, domid, devid)))
            .and_then(|s| s.parse().ok())
    }

    pub fn guest(&self, domid: u16) -> Arc<SimDomain> {
        self.xen.create_domain(domid, GUEST_PAGES).expect("domain")
    }
}

pub fn connect(dom: &Arc<SimDomain>, devid: u32) -> Frontend {
    connect_with(dom, devid, FrontConfig::default())
}

pub fn connect_with(dom: &Arc<SimDomain>, devid: u32, cfg: FrontConfig) -> Frontend {
    Frontend::connect(
        dom.xenstore().expect("guest xenstore"),
        dom.clone(),
        &fe_dir(dom.domid(), devid),
        cfg,
    )
    .expect("frontend connects")
}

pub struct Disk {
    pub dir: tempfile::TempDir,
    pub path: PathBuf,
}

/// Where [`tmpdir`] makes its directories when set (else /var/tmp): a child test process
/// killed with SIGKILL (the crash tests) cannot remove its own, so its parent points it into
/// one of the parent's, which the parent removes.
pub const TMP_ROOT_ENV: &str = "XDISK_TEST_TMP_ROOT";

pub fn tmpdir() -> tempfile::TempDir {
    let root = std::env::var_os(TMP_ROOT_ENV).unwrap_or_else(|| "/var/tmp".into());
    tempfile::Builder::new()
        .prefix("xdisk-daemon-")
        .tempdir_in(root)
        .expect("temp dir")
}

pub fn raw_disk(size: u64) -> Disk {
    let dir = tmpdir();
    let path = dir.path().join("disk.raw");
    std::fs::File::create(&path).unwrap().set_len(size).unwrap();
    Disk { dir, path }
}

pub fn qcow2_disk(size: u64) -> Disk {
    let dir = tmpdir();
    let path = dir.path().join("disk.qcow2");
    let out = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&path)
        .arg(size.to_string())
        .output()
        .expect("qemu-img runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Disk { dir, path }
}

/// The image's contents as raw bytes.
pub fn contents(path: &Path) -> Vec<u8> {
    let out = path.with_extension("contents");
    let r = Command::new("qemu-img")
        .args(["convert", "-U", "-O", "raw"])
        .arg(path)
        .arg(&out)
        .output()
        .expect("qemu-img runs");
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let v = std::fs::read(&out).unwrap();
    let _ = std::fs::remove_file(&out);
    v
}

pub fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

pub const T: Duration = Duration::from_secs(20);

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

/// Writes and reads back a few patterns; returns what was written where.
pub fn round_trip(front: &mut Frontend, seed: u64) -> Vec<(u64, Vec<u8>)> {
    let sectors = front.info().sectors;
    let writes = [
        (0u64, pattern(seed, 4096)),
        (9, pattern(seed + 1, 512)),
        (300, pattern(seed + 2, 128 * 1024)),
        (sectors - 8, pattern(seed + 3, 4096)),
    ];
    for (s, d) in &writes {
        front.write(*s, d).expect("write");
    }
    front.flush().expect("flush");
    for (s, d) in &writes {
        assert_eq!(&front.read(*s, (d.len() / 512) as u64).expect("read"), d);
    }
    writes.to_vec()
}

pub fn check_image(path: &Path, writes: &[(u64, Vec<u8>)]) {
    let c = contents(path);
    for (s, d) in writes {
        let o = *s as usize * 512;
        assert!(
            &c[o..o + d.len()] == d.as_slice(),
            "image differs at sector {s}"
        );
    }
}

/// Threads of this process.
pub fn thread_count() -> usize {
    std::fs::read_dir("/proc/self/task").map_or(0, |d| d.count())
}
