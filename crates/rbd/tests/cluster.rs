//! RbdStorage and RbdEngine on a real (throwaway) Ceph cluster, with the `rbd` command as
//! the oracle. See `xdisk_rbd::testing` for how the cluster is found or started.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use xdisk_io::sys::EventFd;
use xdisk_io::{
    AlignedBuf, Allocation, CacheMode, Completion, Engine, EngineConfig, IoSlice, Op, OpKind,
    Storage,
};
use xdisk_rbd::testing::{cluster, rbd_ok, TestImage};
use xdisk_rbd::{Error, RbdName, RbdStorage};

const MIB: u64 = 1 << 20;

fn pattern(seed: u8, off: u64, len: usize) -> Vec<u8> {
    (0..len as u64)
        .map(|i| seed ^ ((off + i) as u8).wrapping_mul(31) ^ ((off + i) >> 9) as u8)
        .collect()
}

/// The image's bytes as `rbd export` reads them.
fn export(conf: &Path, spec: &str) -> Vec<u8> {
    rbd_ok(conf, &["export", "--no-progress", spec, "-"]).stdout
}

fn create(t: &TestImage, size: u64) -> RbdName {
    let n = RbdName::parse(&t.name()).unwrap();
    RbdStorage::create(&n, size).unwrap();
    n
}

#[test]
fn sync_io_round_trips_and_rbd_export_agrees() {
    let Some(conf) = cluster() else { return };
    let t = TestImage::new(conf, "sync");
    let n = create(&t, 8 * MIB);
    let s = RbdStorage::open(&n, false, CacheMode::WriteBack).unwrap();
    assert_eq!(s.size().unwrap(), 8 * MIB);
    let mut model = vec![0u8; 8 * MIB as usize];
    for (i, &(off, len)) in [
        (0u64, 4096usize),
        (1000, 333),
        (3 * MIB - 7, 70_000),
        (8 * MIB - 10, 10),
    ]
    .iter()
    .enumerate()
    {
        let d = pattern(i as u8 + 1, off, len);
        s.write_at(&d, off).unwrap();
        model[off as usize..off as usize + len].copy_from_slice(&d);
    }
    // Reads past the end are zeroes; unaligned reads are fine.
    let mut b = vec![0xffu8; 100];
    s.read_at(&mut b, 8 * MIB - 50).unwrap();
    assert_eq!(&b[..50], &model[8 * MIB as usize - 50..]);
    assert!(b[50..].iter().all(|&x| x == 0));
    s.write_zeroes(1000, 100).unwrap();
    model[1000..1100].fill(0);
    s.flush().unwrap();
    assert!(export(conf, &t.spec()) == model, "rbd export differs");
    let mut all = vec![0u8; model.len()];
    s.read_at(&mut all, 0).unwrap();
    assert!(all == model);
    // A write past the end grows the image (QEMU's driver does too).
    s.write_at(b"tail", 9 * MIB).unwrap();
    assert_eq!(s.size().unwrap(), 9 * MIB + 4);
    s.set_size(4 * MIB).unwrap();
    assert_eq!(s.size().unwrap(), 4 * MIB);
}

#[test]
fn opens_are_shared_snapshots_are_read_only_and_errors_are_clear() {
    let Some(conf) = cluster() else { return };
    let t = TestImage::new(conf, "snap");
    let n = create(&t, 4 * MIB);
    let s = RbdStorage::open(&n, false, CacheMode::WriteBack).unwrap();
    let s2 = RbdStorage::open(&n, false, CacheMode::WriteBack).unwrap();
    assert!(
        s.shares_image_with(&s2),
        "two opens of one image share librbd's handle"
    );
    s.write_at(&[1u8; 4096], 0).unwrap();
    s.flush().unwrap();
    rbd_ok(conf, &["snap", "create", &format!("{}@s1", t.spec())]);
    s.write_at(&[2u8; 4096], 0).unwrap();
    s.flush().unwrap();

    let snap = RbdName::parse(&t.name_with("@s1")).unwrap();
    let e = RbdStorage::open(&snap, false, CacheMode::WriteBack).unwrap_err();
    assert!(matches!(e, Error::SnapshotReadOnly(_)), "{e}");
    let ro = RbdStorage::open(&snap, true, CacheMode::WriteBack).unwrap();
    assert!(ro.read_only());
    let mut b = [0u8; 4096];
    ro.read_at(&mut b, 0).unwrap();
    assert_eq!(b, [1u8; 4096], "the snapshot keeps the data of its time");
    let e = ro.write_at(&b, 0).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EROFS));
    s.read_at(&mut b, 0).unwrap();
    assert_eq!(b, [2u8; 4096]);

    // xdisk's timeouts unless the ceph.conf or the name sets them.
    assert_eq!(s.ceph_option("rados_osd_op_timeout").unwrap(), "60");
    assert_eq!(s.ceph_option("client_mount_timeout").unwrap(), "30");
    assert_eq!(s.ceph_option("rbd_cache").unwrap(), "true");
    let n7 = RbdName::parse(&t.name_with(":rados_osd_op_timeout=7")).unwrap();
    let s7 = RbdStorage::open(&n7, false, CacheMode::None).unwrap();
    assert_eq!(s7.ceph_option("rados_osd_op_timeout").unwrap(), "7");
    assert_eq!(
        s7.ceph_option("rbd_cache").unwrap(),
        "false",
        "cache=none: no librbd cache"
    );
    assert!(
        !s7.shares_image_with(&s),
        "other connection settings, other handle"
    );
    drop(s7);

    let missing =
        RbdName::parse(&format!("rbd:rbd/no-such-image:conf={}", conf.display())).unwrap();
    let e = RbdStorage::open(&missing, true, CacheMode::WriteBack).unwrap_err();
    assert_eq!(e.os_error(), Some(libc::ENOENT), "{e}");
    let e = RbdStorage::create(&n, MIB).unwrap_err();
    assert!(matches!(e, Error::Exists(_)), "{e}");
    let nopool = RbdName::parse(&format!("rbd:nopool/x:conf={}", conf.display())).unwrap();
    let e = RbdStorage::open(&nopool, true, CacheMode::WriteBack).unwrap_err();
    assert!(e.to_string().contains("pool nopool"), "{e}");
}

#[test]
fn namespaces_hold_their_own_images() {
    let Some(conf) = cluster() else { return };
    let ns = xdisk_rbd::testing::unique("ns");
    rbd_ok(
        conf,
        &["namespace", "create", "--pool", "rbd", "--namespace", &ns],
    );
    let img = xdisk_rbd::testing::unique("img");
    let name = format!("rbd:rbd/{ns}/{img}:conf={}", conf.display());
    let n = RbdName::parse(&name).unwrap();
    assert_eq!(n.namespace.as_deref(), Some(ns.as_str()));
    RbdStorage::create(&n, MIB).unwrap();
    {
        let s = RbdStorage::open(&n, false, CacheMode::None).unwrap();
        s.write_at(&[7u8; 512], 512).unwrap();
        s.flush().unwrap();
    }
    let spec = format!("rbd/{ns}/{img}");
    let data = export(conf, &spec);
    assert_eq!(&data[512..1024], &[7u8; 512]);
    // Not in the default namespace.
    let other = RbdName::parse(&format!("rbd:rbd/{img}:conf={}", conf.display())).unwrap();
    assert!(RbdStorage::open(&other, true, CacheMode::WriteBack).is_err());
    RbdStorage::remove(&n).unwrap();
    rbd_ok(
        conf,
        &["namespace", "remove", "--pool", "rbd", "--namespace", &ns],
    );
}

#[test]
fn block_status_comes_from_the_object_map() {
    let Some(conf) = cluster() else { return };
    let t = TestImage::new(conf, "alloc");
    let n = create(&t, 64 * MIB);
    let s = RbdStorage::open(&n, false, CacheMode::WriteBack).unwrap();
    let obj = s.object_size();
    assert_eq!(obj, 4 * MIB);
    assert_eq!(
        s.allocation(0, 64 * MIB),
        Allocation::Hole { len: 64 * MIB }
    );
    s.write_at(&[1u8; 100], 9 * MIB).unwrap();
    s.write_at(&[1u8; 100], 13 * MIB).unwrap();
    s.flush().unwrap();
    // Whole objects: [8, 16) MiB is data.
    assert_eq!(s.allocation(0, 64 * MIB), Allocation::Hole { len: 8 * MIB });
    assert_eq!(
        s.allocation(5 * MIB, 64 * MIB),
        Allocation::Hole { len: 3 * MIB }
    );
    assert_eq!(
        s.allocation(8 * MIB, 56 * MIB),
        Allocation::Data { len: 8 * MIB }
    );
    assert_eq!(s.allocation(10 * MIB, MIB), Allocation::Data { len: MIB });
    assert_eq!(
        s.allocation(16 * MIB, 48 * MIB),
        Allocation::Hole { len: 48 * MIB }
    );
    assert_eq!(s.allocation(70 * MIB, MIB), Allocation::Hole { len: MIB });
    // A discarded whole object is a hole again.
    s.discard(8 * MIB, 4 * MIB).unwrap();
    s.flush().unwrap();
    assert_eq!(
        s.allocation(8 * MIB, 8 * MIB),
        Allocation::Hole { len: 4 * MIB }
    );
}

/// An engine over `s` and the eventfd it signals.
fn engine(s: &Arc<RbdStorage>, depth: u32) -> (Box<dyn Engine<IoSlice>>, Arc<EventFd>) {
    let notify = Arc::new(EventFd::new().unwrap());
    let cfg = EngineConfig {
        queue_depth: depth,
        ..EngineConfig::default()
    };
    let e = s
        .clone()
        .open_engine(&cfg, notify.clone())
        .unwrap()
        .unwrap();
    (e, notify)
}

fn slice(buf: &mut AlignedBuf, start: usize, len: usize) -> IoSlice {
    // SAFETY: the test keeps `buf` alive and untouched until every op carrying a slice of it
    // has completed (it reaps them all before reading it), and the slices are disjoint.
    #[allow(unsafe_code)]
    unsafe {
        IoSlice::new(buf, start, len)
    }
}

fn reap_all(e: &mut dyn Engine<IoSlice>, n: usize) -> Vec<Completion<IoSlice>> {
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while out.len() < n {
        assert!(Instant::now() < deadline, "completions missing");
        let want = n - out.len();
        e.reap(&mut out, want, Some(Duration::from_secs(1)))
            .unwrap();
    }
    out
}

#[test]
fn the_engine_keeps_many_requests_in_flight_and_signals_its_eventfd() {
    let Some(conf) = cluster() else { return };
    let t = TestImage::new(conf, "engine");
    let n = create(&t, 16 * MIB);
    let s = Arc::new(RbdStorage::open(&n, false, CacheMode::None).unwrap());
    let (mut e, notify) = engine(&s, 64);
    const BS: usize = 64 << 10;
    const N: usize = 48;
    let mut wbuf = AlignedBuf::new(BS * N, 4096);
    for i in 0..N {
        wbuf[i * BS..(i + 1) * BS].copy_from_slice(&pattern(i as u8, (i * BS) as u64, BS));
    }
    // Writes scattered over the image, all in flight at once.
    let offs: Vec<u64> = (0..N as u64)
        .map(|i| (i * 7 % N as u64) * BS as u64 * 5)
        .collect();
    for (i, &off) in offs.iter().enumerate() {
        let op = Op {
            kind: OpKind::Write,
            fd: -1,
            offset: off,
            buf: Some(slice(&mut wbuf, i * BS, BS)),
            user_data: i as u64,
        };
        assert!(e.submit(op).is_ok());
    }
    assert_eq!(e.in_flight(), N);
    e.commit().unwrap();
    // The eventfd becomes readable without anyone waiting on the engine.
    let t0 = Instant::now();
    while !xdisk_io::sys::drain_eventfd(notify.fd()) {
        assert!(t0.elapsed() < Duration::from_secs(30), "no signal");
        std::thread::sleep(Duration::from_millis(1));
    }
    let done = reap_all(&mut *e, N);
    for c in &done {
        assert_eq!(c.result.as_ref().unwrap(), &BS, "write {}", c.user_data);
    }
    let f = Op {
        kind: OpKind::Flush,
        fd: -1,
        offset: 0,
        buf: None,
        user_data: 999,
    };
    assert!(e.submit(f).is_ok());
    assert!(reap_all(&mut *e, 1)[0].result.is_ok());
    let exported = export(conf, &t.spec());
    // Read back through the engine, into other buffers, and compare with the export.
    let mut rbuf = AlignedBuf::new(BS * N, 4096);
    for (i, &off) in offs.iter().enumerate() {
        let op = Op {
            kind: OpKind::Read,
            fd: -1,
            offset: off,
            buf: Some(slice(&mut rbuf, i * BS, BS)),
            user_data: i as u64,
        };
        assert!(e.submit(op).is_ok());
    }
    let done = reap_all(&mut *e, N);
    assert!(done
        .iter()
        .all(|c| c.result.as_ref().is_ok_and(|&n| n == BS)));
    for (i, &off) in offs.iter().enumerate() {
        let want = &wbuf[i * BS..(i + 1) * BS];
        assert!(&rbuf[i * BS..(i + 1) * BS] == want, "read {i}");
        assert!(
            &exported[off as usize..off as usize + BS] == want,
            "export {i}"
        );
    }
    // A read across the end is short, like pread; one past it reads nothing.
    for (k, off) in [(0u64, 16 * MIB - 4096), (1, 16 * MIB)] {
        let op = Op {
            kind: OpKind::Read,
            fd: -1,
            offset: off,
            buf: Some(slice(&mut rbuf, 0, BS)),
            user_data: k,
        };
        assert!(e.submit(op).is_ok());
        let c = reap_all(&mut *e, 1).remove(0);
        assert_eq!(*c.result.as_ref().unwrap(), if k == 0 { 4096 } else { 0 });
    }
    // Discard and write zeroes (fallocate modes).
    for (k, mode) in [
        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
        libc::FALLOC_FL_ZERO_RANGE,
    ]
    .into_iter()
    .enumerate()
    {
        let op = Op {
            kind: OpKind::Fallocate { mode, len: 4 * MIB },
            fd: -1,
            offset: 4 * MIB * k as u64,
            buf: None,
            user_data: k as u64,
        };
        assert!(e.submit(op).is_ok());
        assert!(reap_all(&mut *e, 1)[0].result.is_ok());
    }
    let exported = export(conf, &t.spec());
    assert!(exported[4 * MIB as usize..8 * MIB as usize]
        .iter()
        .all(|&b| b == 0));
    assert_eq!(e.in_flight(), 0);
}

#[test]
fn read_only_storages_refuse_writes_through_the_engine() {
    let Some(conf) = cluster() else { return };
    let t = TestImage::new(conf, "ro");
    let n = create(&t, MIB);
    let s = Arc::new(RbdStorage::open(&n, true, CacheMode::WriteBack).unwrap());
    let (mut e, _n) = engine(&s, 4);
    let mut b = AlignedBuf::new(4096, 4096);
    let op = Op {
        kind: OpKind::Write,
        fd: -1,
        offset: 0,
        buf: Some(slice(&mut b, 0, 4096)),
        user_data: 1,
    };
    assert!(e.submit(op).is_ok());
    let c = reap_all(&mut *e, 1).remove(0);
    assert_eq!(c.result.unwrap_err().raw_os_error(), Some(libc::EROFS));
    assert!(c.buf.is_some(), "the buffer comes back");
}

/// Sends `sig` to a daemon of the test cluster (`osd.0`, `mon.a`), found by its pid file;
/// returns its pid.
fn signal(conf: &Path, daemon: &str, sig: &str) -> String {
    let pidfile = conf.parent().unwrap().join(format!("run/{daemon}.pid"));
    let pid =
        std::fs::read_to_string(&pidfile).unwrap_or_else(|e| panic!("{}: {e}", pidfile.display()));
    let pid = pid.trim().to_owned();
    let st = std::process::Command::new("kill")
        .args([sig, &pid])
        .status()
        .unwrap();
    assert!(st.success(), "kill {sig} {daemon}");
    pid
}

/// Whether every thread of `pid` is stopped (state `T`). A SIGSTOP stops a multi-threaded
/// process only once one of its threads has run to take it: until then the others may
/// still answer (seen on a loaded machine: a write submitted right after `kill -STOP`
/// was acknowledged by the OSD).
fn all_threads_stopped(pid: &str) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    tasks.flatten().all(|t| {
        std::fs::read_to_string(t.path().join("stat")).is_ok_and(|st| {
            // "pid (comm) S ...": the state follows the last ')'.
            st.rsplit_once(')')
                .is_some_and(|(_, rest)| rest.trim_start().starts_with('T'))
        })
    })
}

/// Stops a daemon (SIGSTOP: it stops answering, as a host that went away) until dropped,
/// also when the test fails, so that the cluster always comes back for the other tests.
struct Stopped<'a> {
    conf: &'a Path,
    daemon: &'static str,
}

impl<'a> Stopped<'a> {
    fn new(conf: &'a Path, daemon: &'static str) -> Stopped<'a> {
        let pid = signal(conf, daemon, "-STOP");
        let stopped = Stopped { conf, daemon };
        let t0 = Instant::now();
        while !all_threads_stopped(&pid) {
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "{daemon} does not stop"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        stopped
    }
}

impl Drop for Stopped<'_> {
    fn drop(&mut self) {
        let _ = signal(self.conf, self.daemon, "-CONT");
    }
}

#[test]
fn a_cluster_that_stops_answering_fails_requests_in_bounded_time_then_recovers() {
    let Some(conf) = cluster() else { return };
    let t = TestImage::new(conf, "gone");
    create(&t, 16 * MIB);
    // Short timeouts, set in the name as an operator would (xdisk's defaults are 60 s and 30 s).
    let n = RbdName::parse(
        &t.name_with(":rados_osd_op_timeout=3:rados_mon_op_timeout=3:client_mount_timeout=3"),
    )
    .unwrap();
    let s = Arc::new(RbdStorage::open(&n, false, CacheMode::None).unwrap());
    s.write_at(&pattern(1, 0, 1 << 20), 0).unwrap();
    s.flush().unwrap();
    let (mut e, _notify) = engine(&s, 32);
    let mut buf = AlignedBuf::new(16 * 4096, 4096);
    {
        // The OSD stops answering with requests in flight.
        let _osd = Stopped::new(conf, "osd.0");
        let t0 = Instant::now();
        for i in 0..16usize {
            let op = Op {
                kind: if i % 2 == 0 {
                    OpKind::Write
                } else {
                    OpKind::Read
                },
                fd: -1,
                offset: 2 * MIB + (i as u64) * 4096,
                buf: Some(slice(&mut buf, i * 4096, 4096)),
                user_data: i as u64,
            };
            assert!(e.submit(op).is_ok());
        }
        e.commit().unwrap();
        let done = reap_all(&mut *e, 16);
        let took = t0.elapsed();
        for c in &done {
            let Err(err) = &c.result else {
                panic!(
                    "op {} ({}) succeeded without an OSD, after {took:?}",
                    c.user_data,
                    if c.user_data % 2 == 0 {
                        "write"
                    } else {
                        "read"
                    }
                );
            };
            assert_eq!(err.raw_os_error(), Some(libc::ETIMEDOUT), "{err}");
        }
        assert!(took < Duration::from_secs(20), "errors after {took:?}");
        // The synchronous path too.
        let t0 = Instant::now();
        let mut b = vec![0u8; 4096];
        assert!(s.read_at(&mut b, 0).is_err());
        assert!(t0.elapsed() < Duration::from_secs(20));
    }
    // Back: the same storage and engine work again, the data written before is there.
    let mut b = vec![0u8; 1 << 20];
    let t0 = Instant::now();
    loop {
        match s.read_at(&mut b, 0) {
            Ok(()) => break,
            Err(err) => assert!(t0.elapsed() < Duration::from_secs(60), "no recovery: {err}"),
        }
    }
    assert!(b == pattern(1, 0, 1 << 20));
    let op = Op {
        kind: OpKind::Write,
        fd: -1,
        offset: 4 * MIB,
        buf: Some(slice(&mut buf, 0, 4096)),
        user_data: 1,
    };
    assert!(e.submit(op).is_ok());
    assert!(reap_all(&mut *e, 1)[0].result.is_ok());

    // A monitor that stops answering: opening fails after client_mount_timeout; the image
    // already open keeps working (its I/O goes to the OSD).
    {
        let _mon = Stopped::new(conf, "mon.a");
        let other = TestImage::new(conf, "gone2");
        let n2 = RbdName::parse(&other.name_with(":client_mount_timeout=3:rados_mon_op_timeout=3"))
            .unwrap();
        let t0 = Instant::now();
        assert!(RbdStorage::open(&n2, true, CacheMode::WriteBack).is_err());
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "open failed after {:?}",
            t0.elapsed()
        );
        s.write_at(&[9u8; 4096], 8 * MIB).unwrap();
        std::mem::forget(other); // nothing was created
    }
    s.flush().unwrap();
}

#[test]
fn two_writers_share_the_lock_by_default_and_an_exclusive_one_keeps_it() {
    let Some(conf) = cluster() else { return };
    let t = TestImage::new(conf, "lock");
    create(&t, 4 * MIB);
    // Two librbd clients in one process: other Ceph settings, other connections.
    let open = |extra: &str| {
        let n = RbdName::parse(&t.name_with(extra)).unwrap();
        RbdStorage::open(&n, false, CacheMode::None).unwrap()
    };
    let a = open(":rados_osd_op_timeout=61");
    let b = open(":rados_osd_op_timeout=62");
    assert!(!a.shares_image_with(&b));
    // Cooperative (librbd's default, QEMU's too): the lock moves to whichever writes.
    for i in 0..3u8 {
        a.write_at(&[i; 4096], 0).unwrap();
        assert!(a.holds_lock().unwrap());
        b.write_at(&[i + 10; 4096], 4096).unwrap();
        assert!(b.holds_lock().unwrap() && !a.holds_lock().unwrap());
    }
    a.flush().unwrap();
    b.flush().unwrap();
    let mut buf = vec![0u8; 8192];
    a.read_at(&mut buf, 0).unwrap();
    assert!(buf[..4096].iter().all(|&x| x == 2) && buf[4096..].iter().all(|&x| x == 12));
    drop((a, b));

    // xdisk_lock=exclusive: taken at open and kept; another writer fails, clearly and in
    // bounded time, and reads on.
    let x = open(":xdisk_lock=exclusive:rados_osd_op_timeout=63");
    assert!(x.holds_lock().unwrap());
    let y = open(":xdisk_deadline=4:rados_osd_op_timeout=64");
    let t0 = Instant::now();
    let err = y.write_at(&[9u8; 4096], 0).unwrap_err();
    assert!(t0.elapsed() < Duration::from_secs(15), "{:?}", t0.elapsed());
    eprintln!("the second writer: {err} ({:?})", err.raw_os_error());
    assert_eq!(err.raw_os_error(), Some(libc::EROFS), "{err}");
    y.read_at(&mut buf, 0).unwrap();
    assert!(buf[..4096].iter().all(|&x| x == 2));
    // Another program too (rbd bench writing).
    let o = xdisk_rbd::testing::rbd(
        conf,
        &[
            "bench",
            "--io-type",
            "write",
            "--io-size",
            "4K",
            "--io-total",
            "4K",
            &t.spec(),
        ],
    );
    assert!(!o.status.success(), "rbd bench wrote past the lock");
    x.write_at(&[3u8; 4096], 0).unwrap();
    assert!(x.holds_lock().unwrap());
    // Another xdisk asking for it exclusively is refused at open, saying why.
    let n = RbdName::parse(&t.name_with(":xdisk_lock=exclusive:rados_osd_op_timeout=65")).unwrap();
    let e = RbdStorage::open(&n, false, CacheMode::None).unwrap_err();
    assert!(e.to_string().contains("exclusive lock"), "{e}");
    // Closed: the lock is free, the other writer writes.
    drop(x);
    y.write_at(&[9u8; 4096], 0).unwrap();
    assert!(y.holds_lock().unwrap());
    drop(y);

    // An image without the feature cannot be locked so: refused at open.
    let plain = TestImage::new(conf, "lock-plain");
    let mut o = xdisk_rbd::CreateOptions::default();
    o.set("features", "layering").unwrap();
    RbdStorage::create_with(&RbdName::parse(&plain.name()).unwrap(), MIB, &o).unwrap();
    let n = RbdName::parse(&plain.name_with(":xdisk_lock=exclusive")).unwrap();
    let e = RbdStorage::open(&n, false, CacheMode::None).unwrap_err();
    assert!(e.to_string().contains("exclusive-lock feature"), "{e}");
}

#[test]
fn a_resize_elsewhere_reaches_the_open_image_through_librbds_update_watch() {
    let Some(conf) = cluster() else { return };
    let t = TestImage::new(conf, "watch");
    let n = create(&t, 8 * MIB);
    let s = RbdStorage::open(&n, false, CacheMode::None).unwrap();
    s.write_at(&[1u8; 4096], 0).unwrap();
    assert_eq!(s.size().unwrap(), 8 * MIB);
    let before = s.header_updates();
    rbd_ok(
        conf,
        &["resize", "--no-progress", "--size", "24M", &t.spec()],
    );
    // librbd calls back (no poll: nothing here asks for the size meanwhile).
    let t0 = Instant::now();
    while s.header_updates() == before {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "no update notification"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    eprintln!(
        "update notification {:?} after rbd resize returned",
        t0.elapsed()
    );
    assert_eq!(s.size().unwrap(), 24 * MIB);
    // Shrunk elsewhere too; and our own resize is seen at once.
    let before = s.header_updates();
    rbd_ok(
        conf,
        &[
            "resize",
            "--no-progress",
            "--allow-shrink",
            "--size",
            "4M",
            &t.spec(),
        ],
    );
    let t0 = Instant::now();
    while s.header_updates() == before {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "no update notification"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(s.size().unwrap(), 4 * MIB);
    s.set_size(6 * MIB).unwrap();
    assert_eq!(s.size().unwrap(), 6 * MIB);
    // A read-only open has no header watch (librbd takes none): it keeps the size it
    // opened with; a new open sees the new one.
    let ro = RbdStorage::open(&n, true, CacheMode::None).unwrap();
    rbd_ok(
        conf,
        &["resize", "--no-progress", "--size", "10M", &t.spec()],
    );
    assert_eq!(ro.size().unwrap(), 6 * MIB);
    drop(ro);
    let ro = RbdStorage::open(&n, true, CacheMode::None).unwrap();
    assert_eq!(ro.size().unwrap(), 10 * MIB);
}
