//! Teardown is bounded and failures of the backend's own threads close the device: a detach
//! while a write loop with flushes runs on a slow path reaches Closed promptly; a panicking
//! queue or control thread closes the device with an error; the per-device cap on grant
//! mappings holds.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use xdisk_backend::{Device, DeviceConfig};
use xdisk_blkfront::{FrontConfig, Frontend};
use xdisk_blkif::mem::{MemError, SharedMem};
use xdisk_blkif::XenbusState;
use xdisk_image::{CacheMode, Image, OpenOptions};
use xdisk_xen::platform::{DomId, GrantCopyOp, GrantMapper, GrantRef, MappedRegion, PlatformError};

const MIB: u64 = 1 << 20;
const VICTIM: u16 = 1;

const PASS: u8 = 0;
const PANIC: u8 = 1;

/// A grant mapper that can panic on `map` and make unmaps slow (a loaded dom0).
struct Faulty {
    inner: Arc<dyn GrantMapper>,
    mode: AtomicU8,
    unmap_delay_ms: Arc<AtomicU64>,
}

impl GrantMapper for Faulty {
    fn map(
        &self,
        domid: DomId,
        refs: &[GrantRef],
        writable: bool,
    ) -> Result<Arc<dyn MappedRegion>, PlatformError> {
        if self.mode.load(Ordering::SeqCst) == PANIC {
            panic!("injected panic in GrantMapper::map");
        }
        let inner = self.inner.map(domid, refs, writable)?;
        Ok(Arc::new(SlowUnmap {
            inner,
            delay_ms: self.unmap_delay_ms.clone(),
        }))
    }

    fn copy(&self, ops: &mut [GrantCopyOp<'_>]) -> Result<(), PlatformError> {
        self.inner.copy(ops)
    }
}

struct SlowUnmap {
    inner: Arc<dyn MappedRegion>,
    delay_ms: Arc<AtomicU64>,
}

impl Drop for SlowUnmap {
    fn drop(&mut self) {
        let ms = self.delay_ms.load(Ordering::SeqCst);
        if ms > 0 {
            std::thread::sleep(Duration::from_millis(ms));
        }
    }
}

impl SharedMem for SlowUnmap {
    fn size(&self) -> usize {
        self.inner.size()
    }
    fn read_u32_volatile(&self, offset: usize) -> Result<u32, MemError> {
        self.inner.read_u32_volatile(offset)
    }
    fn write_u32_volatile(&self, offset: usize, value: u32) -> Result<(), MemError> {
        self.inner.write_u32_volatile(offset, value)
    }
    fn copy_from(&self, offset: usize, dst: &mut [u8]) -> Result<(), MemError> {
        self.inner.copy_from(offset, dst)
    }
    fn copy_to(&self, offset: usize, src: &[u8]) -> Result<(), MemError> {
        self.inner.copy_to(offset, src)
    }
}

impl MappedRegion for SlowUnmap {
    fn writable(&self) -> bool {
        self.inner.writable()
    }
    fn io_base(&self) -> *mut u8 {
        self.inner.io_base()
    }
}

struct Setup {
    host: Host,
    faulty: Arc<Faulty>,
    device: Device,
    dom: Arc<xdisk_xensim::SimDomain>,
    _disk: Disk,
}

fn setup(mode: u8, cache: CacheMode, cfg: impl FnOnce(&mut DeviceConfig)) -> Setup {
    let host = host();
    let disk = raw_disk(64 * MIB);
    let image = Image::open(
        &disk.path,
        &OpenOptions {
            cache,
            ..OpenOptions::default()
        },
    )
    .unwrap();
    let dom = host.xen.create_domain(VICTIM, GUEST_PAGES).unwrap();
    host.add_vbd(VICTIM, 768, "w", &[]);
    let faulty = Arc::new(Faulty {
        inner: host.xen.grant_mapper(0),
        mode: AtomicU8::new(mode),
        unmap_delay_ms: Arc::new(AtomicU64::new(0)),
    });
    let mut c = device_config(VICTIM, 768);
    cfg(&mut c);
    let device = Device::start(
        c,
        host.xs.clone(),
        faulty.clone(),
        host.xen.event_channels(0),
        image,
    )
    .unwrap();
    Setup {
        host,
        faulty,
        device,
        dom,
        _disk: disk,
    }
}

fn connect(s: &Setup, cfg: FrontConfig) -> xdisk_blkfront::Result<Frontend> {
    Frontend::connect(
        s.dom.xenstore().unwrap(),
        s.dom.clone(),
        &fe_dir(VICTIM, 768),
        cfg,
    )
}

/// What `xdisk detach` (and libxl) write: `online` 0, backend `state` Closing.
fn detach(host: &Host) {
    let be = be_dir(VICTIM, 768);
    host.toolstack
        .transaction(|tx| {
            tx.write(&format!("{be}/online"), "0")?;
            tx.write(&format!("{be}/state"), XenbusState::Closing.to_string())
        })
        .unwrap();
}

/// Was flaky (about 1 run in 4): the backend's `mappings` counter went down before each
/// unmap (slow here), so "no mappings" could be seen with the last grant still mapped and the
/// frontend's disconnect counted it leaked (fixed in region.rs, guarded by
/// `mapping_counter_drops_only_after_the_unmap`).
#[test]
fn detach_under_load_closes_within_bound() {
    let s = setup(PASS, CacheMode::WriteBack, |_| {});
    let front = connect(
        &s,
        FrontConfig {
            timeout: Duration::from_secs(3),
            ..FrontConfig::default()
        },
    )
    .unwrap();
    // A write loop with flushes, several requests in flight.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut front = front;
            let mut i = 0u64;
            while !stop.load(Ordering::SeqCst) {
                let mut tags = Vec::new();
                for k in 0..16u64 {
                    let op = xdisk_blkfront::Op::Write {
                        sector: ((i * 16 + k) % 512) * 128,
                        data: pattern(i + k, 64 * 1024),
                    };
                    match front.submit(0, op) {
                        Ok(t) => tags.push(t),
                        Err(_) => break,
                    }
                }
                let mut ok = !tags.is_empty();
                for t in tags {
                    ok &= front.wait(t).is_ok();
                }
                if !ok || front.flush().is_err() {
                    break;
                }
                i += 1;
            }
            front
        })
    };
    std::thread::sleep(Duration::from_millis(500));
    assert!(s.device.stats().wr_req > 0);
    // From now on the backend's unmaps are slow: its queues need long to stop.
    s.faulty.unmap_delay_ms.store(40, Ordering::SeqCst);
    let t = Instant::now();
    detach(&s.host);
    // The guest answers the backend's Closing as Linux blkfront does: Closed.
    let gxs = s.dom.xenstore().unwrap();
    gxs.write(&format!("{}/state", fe_dir(VICTIM, 768)), "6")
        .unwrap();
    wait_until("backend Closed", Duration::from_secs(60), || {
        s.host.be_state(VICTIM, 768) == Some(XenbusState::Closed)
    });
    let closed = t.elapsed();
    stop.store(true, Ordering::SeqCst);
    let mut front = writer.join().unwrap();
    let st = s.device.stats();
    eprintln!(
        "detach under load: Closed after {closed:?} (lingering queues {}, mappings {})",
        st.lingering_queues, st.mappings
    );
    // libxl and xdisk detach give a backend 10 s; the device's bound is 2 s. What this
    // guards (no timing threshold, the machine may be loaded): the device did not wait for its
    // queues' I/O — it went Closed quickly, or it left busy queues lingering in the background
    // (the old code waited for every queue, ~11 s here, and had no lingering queues).
    assert!(
        closed < Duration::from_secs(6) || st.lingering_queues > 0,
        "Closed after {closed:?} without leaving the busy queues behind"
    );
    // The queues finish in the background and release everything.
    wait_until("queues finished", Duration::from_secs(120), || {
        let st = s.device.stats();
        st.queues == 0 && st.mappings == 0
    });
    s.faulty.unmap_delay_ms.store(0, Ordering::SeqCst);
    let _ = front.disconnect();
    assert_eq!(front.leaked_grants(), 0);
    s.device.shutdown().unwrap();
    assert_eq!(s.host.xen.event_channel_count(0), 0);
}

#[test]
fn panicking_queue_closes_device_with_error() {
    let s = setup(PASS, CacheMode::None, |c| c.persistent = false);
    let mut front = connect(&s, FrontConfig::default()).unwrap();
    front.write(0, &pattern(1, 4096)).unwrap();
    assert_eq!(s.device.state(), XenbusState::Connected);
    // The next data mapping (in a queue thread) panics.
    s.faulty.mode.store(PANIC, Ordering::SeqCst);
    let _ = front.submit(
        0,
        xdisk_blkfront::Op::Write {
            sector: 8,
            data: pattern(2, 4096),
        },
    );
    let _ = front.unplug();
    wait_until("device closed", Duration::from_secs(10), || {
        s.device.state() == XenbusState::Closed
            && s.host.be_state(VICTIM, 768) == Some(XenbusState::Closed)
    });
    let err = s.host.read(&format!("{}/error", be_dir(VICTIM, 768)));
    assert!(
        err.as_deref().is_some_and(|e| e.contains("panic")),
        "error node: {err:?}"
    );
    assert_eq!(s.device.stats().queues, 0);
    s.faulty.mode.store(PASS, Ordering::SeqCst);
    let _ = front.disconnect();
    s.device.shutdown().unwrap();
}

#[test]
fn panicking_control_thread_finishes_device() {
    // The ring mapping at connect time (in the control thread) panics.
    let s = setup(PANIC, CacheMode::None, |_| {});
    let r = connect(
        &s,
        FrontConfig {
            timeout: Duration::from_secs(5),
            ..FrontConfig::default()
        },
    );
    assert!(r.is_err(), "the frontend cannot connect");
    wait_until("device finished", Duration::from_secs(10), || {
        s.device.is_finished()
    });
    assert_eq!(s.host.be_state(VICTIM, 768), Some(XenbusState::Closed));
    let err = s.host.read(&format!("{}/error", be_dir(VICTIM, 768)));
    assert!(
        err.as_deref().is_some_and(|e| e.contains("panic")),
        "error node: {err:?}"
    );
    assert!(s.device.wait().is_err());
}

#[test]
fn grant_mappings_are_capped_per_device() {
    // Two queues' rings take 2 x 16 pages; without persistent grants a request maps its
    // pages while it runs: one page fits under the cap, 16 do not.
    let s = setup(PASS, CacheMode::None, |c| {
        c.persistent = false;
        c.max_mapped_grants = 40;
    });
    let mut front = connect(&s, FrontConfig::default()).unwrap();
    let rings = s.device.stats().mappings;
    assert!(rings <= 40 && rings + 16 > 40, "{rings} ring pages");
    front.write(0, &pattern(1, 4096)).unwrap();
    assert!(
        front.write(8, &pattern(2, 64 * 1024)).is_err(),
        "over the cap"
    );
    assert_eq!(front.read(0, 8).unwrap(), pattern(1, 4096));
    assert_eq!(s.device.state(), XenbusState::Connected);
    assert_eq!(s.device.stats().mappings, rings);
    let _ = front.disconnect();
    s.device.shutdown().unwrap();
}

/// The lab's case measured on a real file: raw, cache=writeback, a write loop leaving GBs of
/// dirty page cache, a flush in flight, then a detach. Prints how long the backend took to
/// reach Closed (run by hand: `cargo test -p xdisk-backend --test teardown -- --ignored
/// --nocapture`; it writes a few GB to /var/tmp).
#[test]
#[ignore]
fn detach_after_heavy_writeback_measure() {
    let host = host();
    let dir = tmpdir();
    let path = dir.path().join("big.raw");
    std::fs::File::create(&path)
        .unwrap()
        .set_len(8 << 30)
        .unwrap();
    let image = Image::open(
        &path,
        &OpenOptions {
            cache: CacheMode::WriteBack,
            ..OpenOptions::default()
        },
    )
    .unwrap();
    let dom = host.xen.create_domain(VICTIM, GUEST_PAGES).unwrap();
    host.add_vbd(VICTIM, 768, "w", &[]);
    let device = Device::start(
        device_config(VICTIM, 768),
        host.xs.clone(),
        host.xen.grant_mapper(0),
        host.xen.event_channels(0),
        image,
    )
    .unwrap();
    let mut front = Frontend::connect(
        dom.xenstore().unwrap(),
        dom.clone(),
        &fe_dir(VICTIM, 768),
        FrontConfig {
            timeout: Duration::from_secs(120),
            ..FrontConfig::default()
        },
    )
    .unwrap();
    let nq = front.info().queues;
    let data = pattern(1, 1 << 20);
    let t = Instant::now();
    let mut written = 0u64;
    let mut i = 0u64;
    while t.elapsed() < Duration::from_secs(6) {
        let mut tags = Vec::new();
        for k in 0..16u64 {
            let op = xdisk_blkfront::Op::Write {
                sector: ((i * 16 + k) % 8000) * 2048,
                data: data.clone(),
            };
            tags.push(front.submit((k as usize) % nq, op).unwrap());
        }
        for tag in tags {
            front.wait(tag).unwrap();
        }
        written += 16;
        i += 1;
    }
    let dirty = std::fs::read_to_string("/proc/meminfo")
        .unwrap()
        .lines()
        .find(|l| l.starts_with("Dirty:"))
        .unwrap_or_default()
        .to_owned();
    // A flush in flight on every queue, then the detach.
    for q in 0..nq {
        front.submit(q, xdisk_blkfront::Op::Flush).unwrap();
    }
    let _ = front.unplug();
    std::thread::sleep(Duration::from_millis(50));
    let t = Instant::now();
    detach(&host);
    dom.xenstore()
        .unwrap()
        .write(&format!("{}/state", fe_dir(VICTIM, 768)), "6")
        .unwrap();
    wait_until("backend Closed", Duration::from_secs(300), || {
        host.be_state(VICTIM, 768) == Some(XenbusState::Closed)
    });
    let closed = t.elapsed();
    let st = device.stats();
    eprintln!(
        "wrote {written} MiB in 6 s ({dirty}); detach with a flush in flight: Closed after \
         {closed:?} (lingering queues {})",
        st.lingering_queues
    );
    let t = Instant::now();
    device.shutdown().unwrap();
    eprintln!(
        "shutdown (waits for the lingering I/O) took {:?}",
        t.elapsed()
    );
}

/// A frontend node the backend may not read (EACCES, here through a driver domain's
/// connection) is an error, not an absent node selecting a default (FrontendConnect::parse's
/// contract): the connection fails with an `error` node instead of going on with the
/// default `protocol`.
#[test]
fn unreadable_frontend_node_fails_the_connection() {
    use xdisk_xen::xenstore::{Access, Perm};
    const DRIVER: u16 = 9;
    let host = host();
    let disk = raw_disk(4 * MIB);
    let _driver = host.xen.create_domain(DRIVER, 64).unwrap();
    let dom = host.xen.create_domain(VICTIM, GUEST_PAGES).unwrap();
    let fe = fe_dir(VICTIM, 768);
    let be = format!("/local/domain/{DRIVER}/backend/vbd/{VICTIM}/768");
    let fe_perms = [
        Perm::new(Access::None, VICTIM),
        Perm::new(Access::Read, DRIVER),
    ];
    let be_perms = [
        Perm::new(Access::None, DRIVER),
        Perm::new(Access::Read, VICTIM),
    ];
    host.toolstack
        .transaction(|tx| {
            tx.mkdir(&fe)?;
            tx.set_perms(&fe, &fe_perms)?;
            tx.write(&format!("{fe}/backend"), &be)?;
            tx.write(&format!("{fe}/backend-id"), DRIVER.to_string())?;
            tx.write(&format!("{fe}/virtual-device"), "768")?;
            tx.write(&format!("{fe}/state"), "1")?;
            tx.mkdir(&be)?;
            tx.set_perms(&be, &be_perms)?;
            tx.write(&format!("{be}/frontend"), &fe)?;
            tx.write(&format!("{be}/frontend-id"), VICTIM.to_string())?;
            tx.write(&format!("{be}/online"), "1")?;
            tx.write(&format!("{be}/mode"), "w")?;
            tx.write(&format!("{be}/state"), "1")
        })
        .unwrap();
    let xs = Arc::new(host.xen.xenstore(DRIVER).unwrap());
    let device = Device::start(
        DeviceConfig::new(be.clone()),
        xs,
        host.xen.grant_mapper(DRIVER),
        host.xen.event_channels(DRIVER),
        open_image(&disk.path, false),
    )
    .unwrap();
    let gxs = dom.xenstore().unwrap();
    let mut front = Frontend::connect(
        dom.xenstore().unwrap(),
        dom.clone(),
        &fe,
        FrontConfig::default(),
    )
    .unwrap();
    front.write(0, &pattern(1, 4096)).unwrap();
    front.disconnect().unwrap();
    // The guest hides its `protocol` node from the backend and connects again with its
    // old nodes.
    gxs.write(&format!("{fe}/protocol"), "x86_64-abi").unwrap();
    gxs.set_perms(
        &format!("{fe}/protocol"),
        &[Perm::new(Access::None, VICTIM)],
    )
    .unwrap();
    let host_be_state = |s: &str| host.read(&format!("{be}/state")).as_deref() == Some(s);
    gxs.write(&format!("{fe}/state"), "1").unwrap();
    wait_until("InitWait", Duration::from_secs(60), || host_be_state("2"));
    gxs.write(&format!("{fe}/state"), "3").unwrap();
    wait_until("backend reacts", Duration::from_secs(60), || {
        host_be_state("4") || host_be_state("6")
    });
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(device.state(), XenbusState::Closed);
    let err = host.read(&format!("{be}/error")).unwrap_or_default();
    assert!(err.contains("protocol"), "error node: {err:?}");
    device.shutdown().unwrap();
}
