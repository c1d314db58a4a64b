//! Injected I/O faults (xdisk-io's `fault-injection` feature): a failed flush breaks the image
//! until it is reopened, random EIO / short I/O never yields wrong data, and buffers of
//! operations an engine cannot reap are leaked, never freed.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use xdisk_image::queue::{ImageQueue, IoDone, IoKind, IoRequest, QueueConfig};
use xdisk_image::{AioKind, CacheMode, Image};
use xdisk_io::fault::{Fault, FaultOn, FaultPlan};
use xdisk_io::{AlignedBuf, IoBuf};

mod support;
use support::open;

const SIZE: u64 = 4 << 20;

fn raw_image(dir: &Path) -> std::path::PathBuf {
    let p = dir.join("disk.raw");
    std::fs::File::create(&p).unwrap().set_len(SIZE).unwrap();
    p
}

fn qcow2_image(dir: &Path) -> std::path::PathBuf {
    qcow2_image_at(&dir.join("disk.qcow2"))
}

fn qcow2_image_at(p: &Path) -> std::path::PathBuf {
    let p = p.to_path_buf();
    support::qemu_img_ok(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=65536",
        p.to_str().unwrap(),
        &SIZE.to_string(),
    ]);
    p
}

fn queue(image: &Arc<Image>, aio: AioKind) -> ImageQueue<AlignedBuf> {
    ImageQueue::new(
        image.clone(),
        &QueueConfig {
            aio,
            queue_depth: 16,
            slow_threads: 1,
            submit_batch: 1,
        },
    )
    .unwrap()
}

/// Runs one request through the queue and returns its result.
fn run(
    q: &mut ImageQueue<AlignedBuf>,
    kind: IoKind,
    offset: u64,
    buf: Option<AlignedBuf>,
) -> IoDone<AlignedBuf> {
    q.submit(IoRequest {
        kind,
        offset,
        buf,
        user_data: 7,
    });
    let mut out = Vec::new();
    q.reap(&mut out, 1, Some(Duration::from_secs(30))).unwrap();
    assert_eq!(out.len(), 1);
    out.pop().unwrap()
}

fn data(len: usize, byte: u8) -> AlignedBuf {
    let mut b = AlignedBuf::new(len, 4096);
    b.fill(byte);
    b
}

/// A failed flush through the queue (the engine's fdatasync for raw images, the image's
/// metadata flush for qcow2): every later flush and write fails, reads still work.
fn failed_flush_breaks(path: &Path, cache: CacheMode, aio: AioKind) {
    let image = open(path, cache);
    let plan = FaultPlan::new();
    image
        .storage()
        .as_file()
        .expect("image on a host file")
        .inject_faults(&plan);
    let mut q = queue(&image, aio);
    let w = run(&mut q, IoKind::Write, 0, Some(data(8192, 1)));
    assert!(w.result.is_ok(), "{:?}", w.result);
    plan.fail_next(FaultOn::Flush, Fault::Errno(libc::EIO));
    let f = run(&mut q, IoKind::Flush, 0, None);
    assert!(f.result.is_err(), "the injected flush failure is reported");
    assert_eq!(plan.injected(), 1);
    // The next fdatasync would succeed (the kernel forgot the lost pages): it must not be
    // trusted.
    let f = run(&mut q, IoKind::Flush, 0, None);
    assert!(f.result.is_err(), "a flush after a failed flush fails");
    let w = run(&mut q, IoKind::Write, 65536, Some(data(4096, 2)));
    assert!(w.result.is_err(), "a write after a failed flush fails");
    let w = run(&mut q, IoKind::Write, 1 << 20, Some(data(65536, 3)));
    assert!(
        w.result.is_err(),
        "an allocating write after a failed flush fails"
    );
    let z = run(
        &mut q,
        IoKind::WriteZeroes {
            len: 4096,
            unmap: false,
        },
        0,
        None,
    );
    assert!(z.result.is_err(), "write-zeroes after a failed flush fails");
    assert!(image.flush().is_err());
    assert!(image.write_at(&[9u8; 512], 0).is_err());
    // Reads still answer, with what was written.
    let r = run(&mut q, IoKind::Read, 0, Some(AlignedBuf::new(8192, 4096)));
    assert!(r.result.is_ok());
    assert!(r.buf.unwrap().iter().all(|&b| b == 1));
    drop(q);
    drop(image);
    // Reopened, the image works again.
    let image = open(path, cache);
    image.write_at(&[5u8; 512], 0).unwrap();
    image.flush().unwrap();
}

#[test]
fn failed_flush_fails_every_later_flush_and_write_raw() {
    let dir = support::tmpdir("xdisk-faults-");
    let p = raw_image(dir.path());
    for aio in [AioKind::IoUring, AioKind::Threads] {
        failed_flush_breaks(&p, CacheMode::WriteBack, aio);
        failed_flush_breaks(&p, CacheMode::None, aio);
    }
}

#[test]
fn failed_flush_fails_every_later_flush_and_write_qcow2() {
    let dir = support::tmpdir("xdisk-faults-");
    let p = qcow2_image(dir.path());
    for aio in [AioKind::IoUring, AioKind::Threads] {
        failed_flush_breaks(&p, CacheMode::WriteBack, aio);
        failed_flush_breaks(&p, CacheMode::None, aio);
    }
}

/// qcow2: once a flush failed, no metadata reaches the file any more (not on later flushes,
/// writes or close), so L2 tables can never point at data the kernel dropped.
#[test]
fn qcow2_after_a_failed_flush_writes_no_more_metadata() {
    let dir = support::tmpdir("xdisk-faults-");
    let p = qcow2_image(dir.path());
    let image = open(&p, CacheMode::WriteBack);
    let plan = FaultPlan::new();
    image
        .storage()
        .as_file()
        .expect("image on a host file")
        .inject_faults(&plan);
    image.write_at(&[1u8; 65536], 0).unwrap();
    image.flush().unwrap();
    // New clusters: refcounts and L2 entries are dirty in memory.
    image.write_at(&[2u8; 65536], 1 << 20).unwrap();
    image.write_at(&[3u8; 4096], 2 << 20).unwrap();
    plan.fail_next(FaultOn::Flush, Fault::Errno(libc::EIO));
    assert!(image.flush().is_err());
    let before = std::fs::read(&p).unwrap();
    assert!(image.flush().is_err());
    assert!(image.write_at(&[4u8; 65536], 3 << 20).is_err());
    assert!(image.discard(0, 65536).is_err());
    assert!(image.close().is_err());
    drop(image);
    let after = std::fs::read(&p).unwrap();
    assert!(
        before == after,
        "metadata was written after the failed flush"
    );
    // What reached the file is consistent (leaks at most): QEMU agrees.
    let out = support::qemu_img(&["check", p.to_str().unwrap()]);
    assert!(
        matches!(out.status.code(), Some(0) | Some(3)),
        "qemu-img check: {}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// Counts drops of its buffers (by test, so that tests running in parallel do not mix). A
/// lent one ([`IoBuf::lendable`]) also counts the drops of memory that held the storage's
/// late writes (the fault engine's garbage) by then.
struct CountingBuf {
    inner: AlignedBuf,
    drops: Arc<AtomicUsize>,
    /// Lendable, and where to count drops after the late writes (into a read's memory).
    lent: Option<Arc<AtomicUsize>>,
    /// Calls of `detach_foreign`, and whether they fail (memory that could not be taken
    /// out of the buffer, as a grant mapping whose detach failed).
    detaches: Arc<AtomicUsize>,
    detach_fails: bool,
}

impl CountingBuf {
    fn new(len: usize, drops: &Arc<AtomicUsize>) -> CountingBuf {
        CountingBuf {
            inner: AlignedBuf::new(len, 4096),
            drops: drops.clone(),
            lent: None,
            detaches: Arc::new(AtomicUsize::new(0)),
            detach_fails: false,
        }
    }

    fn lent(len: usize, drops: &Arc<AtomicUsize>, after: &Arc<AtomicUsize>) -> CountingBuf {
        let mut b = CountingBuf::new(len, drops);
        b.lent = Some(after.clone());
        b
    }
}

// SAFETY: delegates to AlignedBuf, whose heap memory does not move with the value.
unsafe impl IoBuf for CountingBuf {
    fn iovecs(&mut self) -> &[libc::iovec] {
        self.inner.iovecs()
    }
    fn total_len(&self) -> usize {
        self.inner.total_len()
    }
    fn lendable(&self) -> bool {
        self.lent.is_some()
    }
    fn detach_foreign(&mut self) -> std::io::Result<()> {
        self.detaches.fetch_add(1, Ordering::SeqCst);
        if self.detach_fails {
            return Err(std::io::Error::other("cannot detach (test)"));
        }
        Ok(())
    }
}

impl Drop for CountingBuf {
    fn drop(&mut self) {
        self.drops.fetch_add(1, Ordering::SeqCst);
        if let Some(after) = &self.lent {
            if self.inner.iter().all(|&b| b == 0xa5) {
                after.fetch_add(1, Ordering::SeqCst);
            }
        }
    }
}

/// `p` opened with cache=none, with a fault plan (empty yet) on its file.
fn open_faulty(p: &Path) -> (Arc<Image>, Arc<FaultPlan>) {
    let image = open(p, CacheMode::None);
    let plan = FaultPlan::new();
    image
        .storage()
        .as_file()
        .expect("image on a host file")
        .inject_faults(&plan);
    (image, plan)
}

/// A request failed at its deadline while the storage still has its (lent) memory is
/// answered at once, without its buffer, and the buffer is freed only after the storage
/// lets go of it; buffers that cannot be lent come back with the error.
#[test]
fn lent_buffers_are_freed_only_after_the_storage_lets_go() {
    let dir = support::tmpdir("xdisk-faults-");
    let p = raw_image(dir.path());
    for aio in [AioKind::IoUring, AioKind::Native, AioKind::Threads] {
        let (image, plan) = open_faulty(&p);
        plan.fail_always(FaultOn::ReadWrite, Fault::Late);
        let new_queue = || -> ImageQueue<CountingBuf> {
            let cfg = QueueConfig {
                aio,
                ..QueueConfig::default()
            };
            ImageQueue::new(image.clone(), &cfg).unwrap()
        };
        let drops = Arc::new(AtomicUsize::new(0));
        let after = Arc::new(AtomicUsize::new(0));
        let detaches = Arc::new(AtomicUsize::new(0));
        let mut q = new_queue();
        for (i, kind) in [IoKind::Read, IoKind::Write, IoKind::Read]
            .into_iter()
            .enumerate()
        {
            let mut buf = CountingBuf::lent(65536, &drops, &after);
            buf.detaches = detaches.clone();
            q.submit(IoRequest {
                kind,
                offset: i as u64 * 65536,
                buf: Some(buf),
                user_data: i as u64,
            });
        }
        let mut out = Vec::new();
        while out.len() < 3 {
            q.reap(&mut out, 1, Some(Duration::from_secs(10))).unwrap();
        }
        for d in &out {
            let e = d.result.as_ref().unwrap_err();
            assert!(e.to_string().contains("timed out"), "{aio:?}: {e}");
            assert!(d.buf.is_none(), "{aio:?}: a lent buffer is not handed back");
        }
        assert_eq!(
            detaches.load(Ordering::SeqCst),
            3,
            "{aio:?}: foreign memory leaves each buffer before its answer"
        );
        assert_eq!(q.in_flight(), 0, "{aio:?}: every request is answered");
        // The storage lets go later; reaping picks that up and frees the buffers then.
        let t0 = Instant::now();
        while drops.load(Ordering::SeqCst) < 2 && t0.elapsed() < Duration::from_secs(10) {
            q.reap(&mut out, 0, Some(Duration::from_millis(10)))
                .unwrap();
        }
        assert!(drops.load(Ordering::SeqCst) >= 2, "{aio:?}");
        // Dropping the queue settles what is left (the last release) before freeing.
        drop(q);
        assert_eq!(drops.load(Ordering::SeqCst), 3, "{aio:?}");
        // The late storage writes into the reads' memory (a write's it only reads, so only
        // the two reads are marked: the write's slot is the same code path).
        assert_eq!(
            after.load(Ordering::SeqCst),
            2,
            "{aio:?}: a buffer was freed before the storage let go of it"
        );

        // Memory that cannot be lent (guest pages) comes back with the error.
        let drops = Arc::new(AtomicUsize::new(0));
        let mut q = new_queue();
        q.submit(IoRequest {
            kind: IoKind::Read,
            offset: 0,
            buf: Some(CountingBuf::new(4096, &drops)),
            user_data: 7,
        });
        let mut out = Vec::new();
        q.reap(&mut out, 1, Some(Duration::from_secs(10))).unwrap();
        assert!(out[0].result.is_err() && out[0].buf.is_some(), "{aio:?}");
        plan.clear();
    }
}

/// A lent buffer whose foreign memory cannot be taken out (`detach_foreign` fails: a guest's
/// pages that would stay in the storage's hands) is not answered at its deadline: the answer
/// waits for the storage to let go, and comes with the buffer.
#[test]
fn a_lent_buffer_that_cannot_be_detached_is_answered_only_when_the_storage_lets_go() {
    let dir = support::tmpdir("xdisk-faults-");
    let p = raw_image(dir.path());
    let (image, plan) = open_faulty(&p);
    plan.fail_always(FaultOn::ReadWrite, Fault::Late);
    let mut q: ImageQueue<CountingBuf> = ImageQueue::new(image, &QueueConfig::default()).unwrap();
    let drops = Arc::new(AtomicUsize::new(0));
    let after = Arc::new(AtomicUsize::new(0));
    let mut buf = CountingBuf::lent(65536, &drops, &after);
    buf.detach_fails = true;
    let detaches = buf.detaches.clone();
    q.submit(IoRequest {
        kind: IoKind::Read,
        offset: 0,
        buf: Some(buf),
        user_data: 1,
    });
    let mut out = Vec::new();
    while out.is_empty() {
        q.reap(&mut out, 1, Some(Duration::from_secs(10))).unwrap();
    }
    assert_eq!(detaches.load(Ordering::SeqCst), 1);
    let d = out.pop().unwrap();
    let e = d.result.unwrap_err();
    assert!(e.to_string().contains("timed out"), "{e}");
    let b = d
        .buf
        .expect("answered with its buffer, once the storage let go");
    assert!(
        b.inner.iter().all(|&x| x == 0xa5),
        "answered before the storage's late write"
    );
    assert_eq!(q.in_flight(), 0);
    drop(b);
    assert_eq!(drops.load(Ordering::SeqCst), 1);
}

/// Submits one read and one write whose completions the engine never hands back (as when the
/// kernel cannot finish them) and returns the queue with them in flight.
fn stuck_queue(
    image: &Arc<Image>,
    aio: AioKind,
    drops: &Arc<AtomicUsize>,
) -> ImageQueue<CountingBuf> {
    let mut q: ImageQueue<CountingBuf> = ImageQueue::new(
        image.clone(),
        &QueueConfig {
            aio,
            queue_depth: 16,
            slow_threads: 1,
            submit_batch: 1,
        },
    )
    .unwrap();
    for (i, kind) in [IoKind::Read, IoKind::Write].into_iter().enumerate() {
        q.submit(IoRequest {
            kind,
            offset: i as u64 * 65536,
            buf: Some(CountingBuf::new(65536, drops)),
            user_data: i as u64,
        });
    }
    let mut out = Vec::new();
    q.reap(&mut out, 0, Some(Duration::from_millis(100)))
        .unwrap();
    assert!(out.is_empty(), "held completions are not returned");
    assert_eq!(q.in_flight(), 2);
    q
}

/// An engine that cannot wait out its operations: the requests' buffers (guest pages in the
/// backend) are leaked with them, never freed, and the failure is reported.
#[test]
fn buffers_of_unreaped_operations_are_leaked_not_freed() {
    let dir = support::tmpdir("xdisk-faults-");
    let p = raw_image(dir.path());
    for aio in [AioKind::IoUring, AioKind::Native, AioKind::Threads] {
        let (image, plan) = open_faulty(&p);
        plan.fail_always(FaultOn::ReadWrite, Fault::Hold);

        // Dropped without settling first.
        let drops = Arc::new(AtomicUsize::new(0));
        let q = stuck_queue(&image, aio, &drops);
        drop(q);
        assert_eq!(
            drops.load(Ordering::SeqCst),
            0,
            "{aio:?}: a buffer the kernel may still use was freed"
        );

        // Settled explicitly: the error is reported, and the buffers are still leaked.
        let drops = Arc::new(AtomicUsize::new(0));
        let mut q = stuck_queue(&image, aio, &drops);
        let mut out = Vec::new();
        assert!(q.reap(&mut out, 1, None).is_err(), "waiting for them fails");
        assert!(
            q.settle().is_err(),
            "{aio:?}: settling reports the stuck operations"
        );
        drop(q);
        assert_eq!(drops.load(Ordering::SeqCst), 0, "{aio:?}");

        // A healthy queue frees its buffers as usual.
        plan.clear();
        let drops = Arc::new(AtomicUsize::new(0));
        let mut q: ImageQueue<CountingBuf> =
            ImageQueue::new(image.clone(), &QueueConfig::default()).unwrap();
        q.submit(IoRequest {
            kind: IoKind::Read,
            offset: 0,
            buf: Some(CountingBuf::new(4096, &drops)),
            user_data: 1,
        });
        q.settle().unwrap();
        drop(q);
        assert_eq!(drops.load(Ordering::SeqCst), 1);
    }
}

/// Hash of one 512-byte sector (the model keeps hashes, not bytes).
fn sector_hash(b: &[u8]) -> u64 {
    b.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &x| {
        (h ^ u64::from(x)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Random reads and writes through a queue while reads and writes fail at random (EIO,
/// ENOSPC, short transfers, ETIMEDOUT with the buffer released late) on the engine and on the synchronous path, over every layer of
/// the chain. A read either fails or returns, for every sector, what some write left there:
/// the last successful write, or a failed write since (which may have landed in part).
fn random_faults_never_yield_wrong_data(
    image: Arc<Image>,
    initial: &[u8],
    aio: AioKind,
    seed: u64,
) {
    use rand::{Rng, SeedableRng};
    let size = initial.len() as u64;
    let sectors = (size / 512) as usize;
    let mut model: Vec<Vec<u64>> = initial.chunks(512).map(|s| vec![sector_hash(s)]).collect();
    let plan = FaultPlan::new();
    let mut layer = Some(&image);
    while let Some(l) = layer {
        l.storage()
            .as_file()
            .expect("image on a host file")
            .inject_faults(&plan);
        layer = l.backing();
    }
    plan.random(
        seed,
        150_000,
        FaultOn::ReadWrite,
        &[
            Fault::Errno(libc::EIO),
            Fault::Errno(libc::ENOSPC),
            Fault::Short,
            // Failed at a deadline while the storage keeps the (lent) buffer a while.
            Fault::Late,
        ],
    );
    let mut q = ImageQueue::<AlignedBuf>::new(
        image.clone(),
        &QueueConfig {
            aio,
            queue_depth: 32,
            slow_threads: 2,
            submit_batch: 4,
        },
    )
    .unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    // (id, first sector, sectors, write data hashes or None for a read)
    let mut inflight: Vec<(u64, usize, usize, Option<Vec<u64>>)> = Vec::new();
    let (mut ok_reads, mut failed) = (0, 0);
    let mut done = Vec::new();
    for id in 0..1500u64 {
        let n = rng.gen_range(1..=128usize);
        let first = rng.gen_range(0..sectors - n);
        if inflight
            .iter()
            .any(|&(_, f, l, _)| first < f + l && f < first + n)
        {
            continue;
        }
        let offset = first as u64 * 512;
        if rng.gen_bool(0.5) {
            let mut buf = AlignedBuf::new(n * 512, 4096);
            rng.fill(&mut buf[..]);
            let hashes = buf.chunks(512).map(sector_hash).collect();
            q.submit(IoRequest {
                kind: IoKind::Write,
                offset,
                buf: Some(buf),
                user_data: id,
            });
            inflight.push((id, first, n, Some(hashes)));
        } else {
            q.submit(IoRequest {
                kind: IoKind::Read,
                offset,
                buf: Some(AlignedBuf::new(n * 512, 4096)),
                user_data: id,
            });
            inflight.push((id, first, n, None));
        }
        let min = usize::from(inflight.len() >= 24);
        q.reap(&mut done, min, Some(Duration::from_secs(30)))
            .unwrap();
        let mut check =
            |d: IoDone<AlignedBuf>, inflight: &mut Vec<(u64, usize, usize, Option<Vec<u64>>)>| {
                let i = inflight.iter().position(|r| r.0 == d.user_data).unwrap();
                let (_, first, n, write) = inflight.swap_remove(i);
                match (write, &d.result) {
                    (Some(hashes), Ok(())) => {
                        for (s, h) in hashes.into_iter().enumerate() {
                            model[first + s] = vec![h];
                        }
                    }
                    (Some(hashes), Err(_)) => {
                        failed += 1;
                        for (s, h) in hashes.into_iter().enumerate() {
                            if !model[first + s].contains(&h) {
                                model[first + s].push(h);
                            }
                        }
                    }
                    (None, Ok(())) => {
                        ok_reads += 1;
                        let buf = d.buf.unwrap();
                        for s in 0..n {
                            let h = sector_hash(&buf[s * 512..(s + 1) * 512]);
                            assert!(
                                model[first + s].contains(&h),
                                "seed {seed} {aio:?}: sector {} read back wrong data",
                                first + s
                            );
                        }
                    }
                    (None, Err(_)) => failed += 1,
                }
            };
        for d in done.drain(..) {
            check(d, &mut inflight);
        }
        if id == 1499 {
            while !inflight.is_empty() {
                q.reap(&mut done, 1, Some(Duration::from_secs(30))).unwrap();
                for d in done.drain(..) {
                    check(d, &mut inflight);
                }
            }
        }
    }
    assert!(
        plan.injected() > 50,
        "faults were injected ({})",
        plan.injected()
    );
    assert!(
        failed > 0 && ok_reads > 100,
        "{failed} failed, {ok_reads} good reads"
    );
}

#[test]
fn random_read_write_faults_never_yield_wrong_data() {
    let dir = support::tmpdir("xdisk-faults-");
    let size = 4u64 << 20;
    // A raw backing file with data, a qcow2 over it (4 KiB clusters: many allocations).
    let base = dir.path().join("base.raw");
    let mut base_data = vec![0u8; size as usize];
    for (i, b) in base_data.iter_mut().enumerate() {
        *b = (i / 512 % 251) as u8;
    }
    for (n, aio) in [AioKind::IoUring, AioKind::Threads, AioKind::Native]
        .into_iter()
        .enumerate()
    {
        // XDISK_FAULT_SEED picks other seeds (longer runs by hand).
        let base_seed = std::env::var("XDISK_FAULT_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(1000u64);
        let seed = base_seed + n as u64;
        let raw = raw_image(dir.path());
        random_faults_never_yield_wrong_data(
            open(&raw, CacheMode::None),
            &vec![0; SIZE as usize],
            aio,
            seed,
        );

        std::fs::write(&base, &base_data).unwrap();
        let top = dir.path().join("top.qcow2");
        let _ = std::fs::remove_file(&top);
        support::qemu_img_ok(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4096",
            "-b",
            base.to_str().unwrap(),
            "-F",
            "raw",
            top.to_str().unwrap(),
        ]);
        random_faults_never_yield_wrong_data(open(&top, CacheMode::None), &base_data, aio, seed);
        // A qcow2 without a backing file (64 KiB clusters: most writes cover part of a
        // cluster): new clusters come from room allocated ahead and a partial write writes only
        // its own bytes, so a cluster a failed write left half written must never pass for
        // never written when it is allocated again.
        let fresh = dir.path().join("fresh.qcow2");
        let _ = std::fs::remove_file(&fresh);
        let fresh = qcow2_image_at(&fresh);
        // (Seeds of their own: with the default ones, 2000-2002, a missed half-written
        // cluster shows within the first three.)
        random_faults_never_yield_wrong_data(
            open(&fresh, CacheMode::None),
            &vec![0; SIZE as usize],
            aio,
            seed + 1000,
        );
        let out = support::qemu_img(&["check", fresh.to_str().unwrap()]);
        assert!(
            matches!(out.status.code(), Some(0) | Some(3)),
            "seed {seed}: qemu-img check: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        let out = support::qemu_img(&["check", top.to_str().unwrap()]);
        assert!(
            matches!(out.status.code(), Some(0) | Some(3)),
            "seed {seed}: qemu-img check: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
}
