//! A simulated guest for demos and tests on the simulation: a domain whose "kernel" runs a
//! Rust blkfront ([`xdisk_blkfront::Frontend`]) for every vbd the toolstack gives it (a new
//! `device/vbd/<devid>` in state Initialising), reads the first sector as a smoke test, and
//! closes the device when its backend starts closing (detach) — what Linux's `xen-blkfront`
//! does with a disk nobody uses. One disk at a time: the Rust blkfront allocates its rings
//! and buffers from all of the guest's memory, so a second disk waits until the first is
//! closed.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use xdisk_blkfront::{FrontConfig, Frontend};
use xdisk_blkif::XenbusState;
use xdisk_xen::platform::DomId;
use xdisk_xensim::{SimDomain, SimXen};

use crate::error::Result;

/// Pages of memory of a simulated guest (32 MiB).
pub const GUEST_PAGES: usize = 8192;

/// What the guest knows of one of its disks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestDisk {
    /// The guest's blkfront is negotiating with the backend.
    Connecting,
    /// Connected; the guest has read sector 0 as a smoke test (a failure is only logged).
    Connected {
        /// The disk's size in 512-byte sectors, as the backend announced it.
        sectors: u64,
    },
    /// The frontend could not connect (why).
    Failed(String),
}

/// A running simulated guest. Dropping it closes its disks and stops it (the domain stays;
/// [`SimXen::destroy_domain`] destroys it).
pub struct SimGuest {
    dom: Arc<SimDomain>,
    stop: Arc<AtomicBool>,
    disks: Arc<Mutex<BTreeMap<u32, GuestDisk>>>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for SimGuest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimGuest")
            .field("domid", &self.dom.domid())
            .finish()
    }
}

fn state_of(xs: &xdisk_xen::xenstore::Client, path: &str) -> Option<XenbusState> {
    xs.read_string(path).ok().and_then(|s| s.parse().ok())
}

impl SimGuest {
    /// Creates domain `domid` and starts its disk driver.
    pub fn start(xen: &Arc<SimXen>, domid: DomId) -> Result<SimGuest> {
        let dom = xen.create_domain(domid, GUEST_PAGES)?;
        let stop = Arc::new(AtomicBool::new(false));
        let disks = Arc::new(Mutex::new(BTreeMap::new()));
        let (d2, s2, k2) = (dom.clone(), stop.clone(), disks.clone());
        let thread = std::thread::Builder::new()
            .name(format!("sim-guest-{domid}"))
            .spawn(move || guest_loop(d2, s2, k2))
            .map_err(|e| crate::Error::io("cannot start the guest thread", e))?;
        Ok(SimGuest {
            dom,
            stop,
            disks,
            thread: Some(thread),
        })
    }

    /// The guest's domain id.
    pub fn domid(&self) -> DomId {
        self.dom.domid()
    }

    /// The guest's disks, by device number.
    pub fn disks(&self) -> BTreeMap<u32, GuestDisk> {
        self.disks.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl Drop for SimGuest {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn guest_loop(
    dom: Arc<SimDomain>,
    stop: Arc<AtomicBool>,
    disks: Arc<Mutex<BTreeMap<u32, GuestDisk>>>,
) {
    let Ok(xs) = dom.xenstore() else { return };
    let vbd = format!("/local/domain/{}/device/vbd", dom.domid());
    let mut threads: BTreeMap<u32, JoinHandle<()>> = BTreeMap::new();
    while !stop.load(Ordering::SeqCst) && dom.is_alive() {
        threads.retain(|_, t| !t.is_finished());
        // The Rust blkfront allocates from all of the domain's memory: one disk at a time.
        let busy = !threads.is_empty();
        for d in xs.directory(&vbd).unwrap_or_default() {
            if busy {
                break;
            }
            let Ok(devid) = d.parse::<u32>() else {
                continue;
            };
            if threads.contains_key(&devid) {
                continue;
            }
            let fe = format!("{vbd}/{devid}");
            if state_of(&xs, &format!("{fe}/state")) != Some(XenbusState::Initialising) {
                continue;
            }
            let (dom2, stop2, disks2) = (dom.clone(), stop.clone(), disks.clone());
            if let Ok(t) = std::thread::Builder::new()
                .name(format!("sim-blkfront-{devid}"))
                .spawn(move || disk_thread(dom2, fe, devid, stop2, disks2))
            {
                threads.insert(devid, t);
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    for (_, t) in threads {
        let _ = t.join();
    }
}

fn disk_thread(
    dom: Arc<SimDomain>,
    fe: String,
    devid: u32,
    stop: Arc<AtomicBool>,
    disks: Arc<Mutex<BTreeMap<u32, GuestDisk>>>,
) {
    let set = |s: GuestDisk| {
        disks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(devid, s);
    };
    set(GuestDisk::Connecting);
    let xs = match dom.xenstore() {
        Ok(x) => x,
        Err(e) => return set(GuestDisk::Failed(e.to_string())),
    };
    let cfg = FrontConfig {
        timeout: Duration::from_secs(30),
        ..FrontConfig::default()
    };
    let mut front = match Frontend::connect(xs, dom.clone(), &fe, cfg) {
        Ok(f) => f,
        Err(e) => {
            tracing::warn!(%fe, "sim guest: cannot connect: {e}");
            return set(GuestDisk::Failed(e.to_string()));
        }
    };
    let sectors = front.info().sectors;
    match front.read(0, 1) {
        Ok(_) => tracing::info!(%fe, sectors, "sim guest: disk connected, sector 0 read"),
        Err(e) => tracing::warn!(%fe, "sim guest: reading sector 0: {e}"),
    }
    set(GuestDisk::Connected { sectors });
    loop {
        if stop.load(Ordering::SeqCst) {
            let _ = front.disconnect();
            break;
        }
        match front.backend_state() {
            Ok(XenbusState::Closing | XenbusState::Closed) | Err(_) => {
                let _ = front.disconnect();
                break;
            }
            _ => {}
        }
        if !dom.is_alive() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    disks
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .remove(&devid);
}
