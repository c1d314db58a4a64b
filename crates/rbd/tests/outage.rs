//! The cluster in trouble: a full pool, daemons killed and restarted. These disturb the
//! whole (one-OSD) test cluster, so they live in their own test binary (cargo runs test
//! binaries one after another: no other RBD test runs meanwhile) and take turns.

use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use xdisk_io::sys::EventFd;
use xdisk_io::{
    AlignedBuf, CacheMode, Completion, Engine, EngineConfig, IoSlice, Op, OpKind, Phase, Storage,
};
use xdisk_rbd::testing::{
    ceph, ceph_ok, cluster, daemon_pid, kill, proc_state, restart_monitor, OsdStopped, TestImage,
};
use xdisk_rbd::{RbdName, RbdStorage};

const MIB: u64 = 1 << 20;

/// One disturbance at a time.
fn turn() -> MutexGuard<'static, ()> {
    static M: Mutex<()> = Mutex::new(());
    M.lock().unwrap_or_else(|e| e.into_inner())
}

fn engine(s: &Arc<RbdStorage>) -> Box<dyn Engine<IoSlice>> {
    let notify = Arc::new(EventFd::new().unwrap());
    let cfg = EngineConfig {
        queue_depth: 32,
        ..EngineConfig::default()
    };
    s.clone().open_engine(&cfg, notify).unwrap().unwrap()
}

/// A slice of memory that cannot be lent (as a guest's pages): the engine copies through a
/// bounce buffer and hands it back at the deadline at the latest.
fn slice(buf: &mut AlignedBuf, start: usize, len: usize) -> IoSlice {
    lent_slice(buf, start, len).not_lendable()
}

/// A slice of memory the test lends: librbd works on it directly, and past the deadline the
/// engine hands it back only when librbd lets go of it (`Phase::Released`).
fn lent_slice(buf: &mut AlignedBuf, start: usize, len: usize) -> IoSlice {
    // SAFETY: each test keeps `buf` alive and untouched until every op carrying a slice of
    // it has completed (for a slice that is not lendable the engine hands it back at the
    // latest at the deadline; a lent one, until librbd releases it), and the slices in
    // flight at one time are disjoint.
    #[allow(unsafe_code)]
    unsafe {
        IoSlice::new(buf, start, len)
    }
}

fn op(kind: OpKind, off: u64, buf: IoSlice, user_data: u64) -> Op<IoSlice> {
    Op {
        kind,
        fd: -1,
        offset: off,
        buf: Some(buf),
        user_data,
    }
}

/// Reaps `n` completions, failing the test after `limit`.
fn reap(e: &mut dyn Engine<IoSlice>, n: usize, limit: Duration) -> Vec<Completion<IoSlice>> {
    let mut out = Vec::new();
    let t0 = Instant::now();
    while out.len() < n {
        assert!(
            t0.elapsed() < limit,
            "{} of {n} completions after {limit:?}",
            out.len()
        );
        let want = n - out.len();
        e.reap(&mut out, want, Some(Duration::from_millis(200)))
            .unwrap();
    }
    out
}

fn wait_for(what: &str, limit: Duration, mut ok: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !ok() {
        assert!(t0.elapsed() < limit, "{what}: not after {limit:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Whether the monitor's map marks pool `rbd` full.
fn pool_full(conf: &Path) -> bool {
    let o = ceph(conf, &["osd", "pool", "ls", "detail"]);
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .any(|l| l.contains("'rbd'") && l.contains(",full"))
}

/// Makes the OSD report itself full until dropped (also when the test fails).
///
/// A pool quota would do the same to the client (the monitor sets the pool's full flag and
/// librados pauses every write to it), but quotas need a ceph-mgr (the monitor takes pool
/// usage from its statistics), which the test cluster does not run; an OSD past its full
/// ratio (`injectfull full`) makes the monitor flag every pool on it full instead.
struct Full<'a>(&'a Path);

impl<'a> Full<'a> {
    fn new(conf: &'a Path) -> Full<'a> {
        // Report to the monitor every second (default 5 s), so the flag comes and goes fast.
        ceph_ok(
            conf,
            &[
                "daemon",
                "osd.0",
                "config",
                "set",
                "osd_mon_report_interval",
                "1",
            ],
        );
        ceph_ok(conf, &["daemon", "osd.0", "injectfull", "full", "-1"]);
        let full = Full(conf);
        wait_for("pool rbd full", Duration::from_secs(60), || pool_full(conf));
        full
    }
}

impl Drop for Full<'_> {
    fn drop(&mut self) {
        let _ = ceph(self.0, &["daemon", "osd.0", "injectfull", "none"]);
        let t0 = Instant::now();
        while pool_full(self.0) && t0.elapsed() < Duration::from_secs(60) {
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

#[test]
fn a_full_pool_fails_writes_at_their_deadline_reads_go_on_and_writes_resume_after() {
    let Some(conf) = cluster() else { return };
    let _turn = turn();
    let t = TestImage::new(conf, "full");
    let other = TestImage::new(conf, "full-other");
    for img in [&t, &other] {
        RbdStorage::create(&RbdName::parse(&img.name()).unwrap(), 16 * MIB).unwrap();
    }
    // A 2 s deadline; and RADOS timeouts of 0 (wait forever), so that only the deadline
    // can end a write to the full pool.
    const DEADLINE: Duration = Duration::from_secs(2);
    let n = RbdName::parse(&t.name_with(":xdisk_deadline=2:rados_osd_op_timeout=0")).unwrap();
    let s = Arc::new(RbdStorage::open(&n, false, CacheMode::None).unwrap());
    let o = Arc::new(
        RbdStorage::open(
            &RbdName::parse(&other.name_with(":xdisk_deadline=2")).unwrap(),
            false,
            CacheMode::None,
        )
        .unwrap(),
    );
    s.write_at(&[1u8; 65536], 0).unwrap();
    o.write_at(&[2u8; 4096], 0).unwrap();
    let mut e = engine(&s);
    let mut buf = AlignedBuf::new(8 * 4096, 4096);
    buf[..4 * 4096].fill(7);
    // Memory of our own, lent to librbd (no bounce buffer).
    let mut lent = AlignedBuf::new(2 * 4096, 4096);
    lent.fill(8);
    {
        let _full = Full::new(conf);
        let t0 = Instant::now();
        // Four writes and four reads in flight at once, and two writes of lent memory.
        for i in 0..8u64 {
            let kind = if i < 4 { OpKind::Write } else { OpKind::Read };
            let b = slice(&mut buf, i as usize * 4096, 4096);
            assert!(e.submit(op(kind, (i % 4) * 4096, b, i)).is_ok());
        }
        for i in 0..2u64 {
            let b = lent_slice(&mut lent, i as usize * 4096, 4096);
            assert!(e
                .submit(op(OpKind::Write, (6 + i) * 4096, b, 8 + i))
                .is_ok());
        }
        e.commit().unwrap();
        let done = reap(&mut *e, 10, 3 * DEADLINE);
        for c in &done {
            if c.user_data >= 8 {
                let err = c.result.as_ref().unwrap_err();
                assert_eq!(err.raw_os_error(), Some(libc::ETIMEDOUT), "write: {err}");
                assert_eq!(c.phase, Phase::TimedOut, "op {}", c.user_data);
                assert!(c.buf.is_none(), "op {}: librbd still has it", c.user_data);
                continue;
            }
            assert_eq!(c.phase, Phase::Done);
            assert!(
                c.buf.is_some(),
                "op {}: the caller's buffer comes back",
                c.user_data
            );
            if c.user_data < 4 {
                let err = c.result.as_ref().unwrap_err();
                assert_eq!(err.raw_os_error(), Some(libc::ETIMEDOUT), "write: {err}");
            } else {
                assert_eq!(*c.result.as_ref().unwrap(), 4096, "reads go on");
            }
        }
        assert!(
            buf[4 * 4096..].iter().all(|&b| b == 1),
            "read what is there"
        );
        let took = t0.elapsed();
        assert!(
            took >= DEADLINE,
            "writes failed before their deadline: {took:?}"
        );
        // librbd still has the writes (with their bounce buffers, not ours, and the lent ones).
        assert!(s.librbd_in_flight() >= 6, "{}", s.librbd_in_flight());
        assert_eq!(e.in_flight(), 2, "the lent memory is still out");
        // The caller's buffer is its own again: scribbling over it is fine.
        buf.fill(0xee);

        // The synchronous path (metadata, the slow path, img tools) too.
        let t0 = Instant::now();
        let err = s.write_at(&[3u8; 4096], MIB).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ETIMEDOUT), "{err}");
        let err = s.flush().unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ETIMEDOUT), "{err}");
        assert!(t0.elapsed() < 6 * DEADLINE, "{:?}", t0.elapsed());
        assert!(
            !s.is_broken(),
            "a flush past its deadline does not break the disk"
        );
        // Growing the image writes its header: bounded too.
        let err = s.set_size(32 * MIB).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ETIMEDOUT), "{err}");

        // Another disk reads on; an engine dropped with writes stuck returns in bounded time.
        let mut b = vec![0u8; 4096];
        o.read_at(&mut b, 0).unwrap();
        assert_eq!(b, vec![2u8; 4096]);
        let mut e2 = engine(&o);
        let mut b2 = AlignedBuf::new(4096, 4096);
        assert!(e2
            .submit(op(OpKind::Write, 0, slice(&mut b2, 0, 4096), 1))
            .is_ok());
        e2.commit().unwrap();
        let t0 = Instant::now();
        drop(e2);
        assert!(t0.elapsed() < 3 * DEADLINE, "drop took {:?}", t0.elapsed());
        drop(b2);
    }
    // Room again: librbd completes what it kept (the late completions free its buffers),
    // and new writes work on the same storage and engine.
    wait_for("librbd's late completions", Duration::from_secs(60), || {
        s.librbd_in_flight() == 0
    });
    // The lent memory comes back.
    let mut back: Vec<u64> = reap(&mut *e, 2, Duration::from_secs(30))
        .into_iter()
        .map(|c| {
            assert_eq!(c.phase, Phase::Released);
            assert!(c.buf.is_some());
            c.user_data
        })
        .collect();
    back.sort_unstable();
    assert_eq!(back, [8, 9]);
    assert_eq!(e.in_flight(), 0);
    lent.fill(0xee);
    buf[..4096].fill(9);
    assert!(e
        .submit(op(OpKind::Write, 8192, slice(&mut buf, 0, 4096), 1))
        .is_ok());
    let c = reap(&mut *e, 1, Duration::from_secs(30)).remove(0);
    assert_eq!(*c.result.as_ref().unwrap(), 4096);
    s.write_at(&[4u8; 4096], MIB).unwrap();
    s.flush().unwrap();
    let mut b = vec![0u8; 4096];
    s.read_at(&mut b, 8192).unwrap();
    assert_eq!(b, vec![9u8; 4096]);
    s.read_at(&mut b, MIB).unwrap();
    assert_eq!(b, vec![4u8; 4096]);
    // The writes that had failed at their deadline landed late (a failed write leaves its
    // blocks undefined, as on any disk): their bounce buffers held the data written then.
    s.read_at(&mut b, 4096).unwrap();
    assert!(b == vec![7u8; 4096] || b == vec![1u8; 4096]);
    // So did the lent ones (from librbd's hands straight out of our memory).
    for i in 6..8u64 {
        s.read_at(&mut b, i * 4096).unwrap();
        assert!(b == vec![8u8; 4096] || b == vec![1u8; 4096]);
    }
    drop(e);
}

/// The monitor killed (SIGKILL) until restarted or dropped (the drop restarts it, so that
/// the cluster comes back for the other tests even when this one fails).
struct MonKilled<'a>(&'a Path, bool);

impl<'a> MonKilled<'a> {
    fn new(conf: &'a Path) -> MonKilled<'a> {
        let pid = daemon_pid(conf, "mon.a");
        kill("-KILL", &pid);
        wait_for("the monitor's death", Duration::from_secs(30), || {
            proc_state(&pid, 'Z')
        });
        MonKilled(conf, false)
    }
    fn restart(&mut self) {
        self.1 = true;
        restart_monitor(self.0);
    }
}

impl Drop for MonKilled<'_> {
    fn drop(&mut self) {
        if !self.1 {
            restart_monitor(self.0);
        }
    }
}

#[test]
fn a_monitor_killed_mid_io_fails_nothing_it_need_not_and_io_goes_on_after_its_restart() {
    let Some(conf) = cluster() else { return };
    let _turn = turn();
    let t = TestImage::new(conf, "monkill");
    let other = TestImage::new(conf, "monkill-other");
    for img in [&t, &other] {
        RbdStorage::create(&RbdName::parse(&img.name()).unwrap(), 16 * MIB).unwrap();
    }
    const DEADLINE: Duration = Duration::from_secs(2);
    let n = RbdName::parse(
        &t.name_with(":xdisk_deadline=2:rados_mon_op_timeout=2:client_mount_timeout=2"),
    )
    .unwrap();
    let s = Arc::new(RbdStorage::open(&n, false, CacheMode::None).unwrap());
    s.write_at(&[1u8; 65536], 0).unwrap();
    let mut e = engine(&s);
    let mut buf = AlignedBuf::new(16 * 4096, 4096);
    buf.fill(5);
    let mut mon = {
        // Requests in flight when the monitor dies (SIGKILL, no goodbye).
        for i in 0..16u64 {
            let kind = if i % 2 == 0 {
                OpKind::Write
            } else {
                OpKind::Read
            };
            let b = slice(&mut buf, i as usize * 4096, 4096);
            assert!(e.submit(op(kind, 4 * MIB + i * 4096, b, i)).is_ok());
        }
        e.commit().unwrap();
        let mon = MonKilled::new(conf);
        // Every one completes (the OSD serves them), none hangs.
        for c in reap(&mut *e, 16, 3 * DEADLINE) {
            assert!(c.result.is_ok(), "op {}: {:?}", c.user_data, c.result);
        }
        mon
    };
    // Without a monitor the open image goes on...
    assert!(e
        .submit(op(OpKind::Write, 0, slice(&mut buf, 0, 4096), 1))
        .is_ok());
    let c = reap(&mut *e, 1, 3 * DEADLINE).remove(0);
    assert_eq!(*c.result.as_ref().unwrap(), 4096);
    // ...a new connection fails, in bounded time...
    let t0 = Instant::now();
    let n2 =
        RbdName::parse(&other.name_with(":client_mount_timeout=2:rados_mon_op_timeout=2")).unwrap();
    let err = RbdStorage::open(&n2, false, CacheMode::None).unwrap_err();
    assert!(
        t0.elapsed() < 6 * DEADLINE,
        "{err} after {:?}",
        t0.elapsed()
    );
    // ...and with the OSD gone too, requests fail at their deadline.
    {
        let _osd = OsdStopped::new(conf);
        for i in 0..4u64 {
            let b = slice(&mut buf, i as usize * 4096, 4096);
            assert!(e
                .submit(op(OpKind::Write, 8 * MIB + i * 4096, b, i))
                .is_ok());
        }
        e.commit().unwrap();
        for c in reap(&mut *e, 4, 3 * DEADLINE) {
            let err = c.result.unwrap_err();
            assert_eq!(err.raw_os_error(), Some(libc::ETIMEDOUT), "{err}");
        }
    }
    mon.restart();
    // New I/O on the same open image (once the OSD has caught up), and new opens work.
    buf[..4096].fill(6);
    wait_for("a write after the restart", Duration::from_secs(60), || {
        assert!(e
            .submit(op(OpKind::Write, 12 * MIB, slice(&mut buf, 0, 4096), 9))
            .is_ok());
        reap(&mut *e, 1, 3 * DEADLINE).remove(0).result.is_ok()
    });
    let mut b = vec![0u8; 4096];
    s.read_at(&mut b, 12 * MIB).unwrap();
    assert_eq!(b, vec![6u8; 4096]);
    s.flush().unwrap();
    let o = RbdStorage::open(&n2, false, CacheMode::None).unwrap();
    o.write_at(&[7u8; 4096], 0).unwrap();
    o.read_at(&mut b, 0).unwrap();
    assert_eq!(b, vec![7u8; 4096]);
    drop(e);
}
