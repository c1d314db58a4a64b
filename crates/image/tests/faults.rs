//! Injected I/O faults (xdisk-io's `fault-injection` feature): a failed flush breaks the image
//! until it is reopened, random EIO / short I/O never yields wrong data, and buffers of
//! operations an engine cannot reap are leaked, never freed.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use xdisk_image::queue::{Done, ImageQueue, QueueConfig, Request, RequestKind};
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
    let p = dir.join("disk.qcow2");
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
    kind: RequestKind,
    offset: u64,
    buf: Option<AlignedBuf>,
) -> Done<AlignedBuf> {
    q.submit(Request {
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
    image.file().inject_faults(&plan);
    let mut q = queue(&image, aio);
    let w = run(&mut q, RequestKind::Write, 0, Some(data(8192, 1)));
    assert!(w.result.is_ok(), "{:?}", w.result);
    plan.fail_next(FaultOn::Flush, Fault::Errno(libc::EIO));
    let f = run(&mut q, RequestKind::Flush, 0, None);
    assert!(f.result.is_err(), "the injected flush failure is reported");
    assert_eq!(plan.injected(), 1);
    // The next fdatasync would succeed (the kernel forgot the lost pages): it must not be
    // trusted.
    let f = run(&mut q, RequestKind::Flush, 0, None);
    assert!(f.result.is_err(), "a flush after a failed flush fails");
    let w = run(&mut q, RequestKind::Write, 65536, Some(data(4096, 2)));
    assert!(w.result.is_err(), "a write after a failed flush fails");
    let w = run(&mut q, RequestKind::Write, 1 << 20, Some(data(65536, 3)));
    assert!(
        w.result.is_err(),
        "an allocating write after a failed flush fails"
    );
    let z = run(
        &mut q,
        RequestKind::WriteZeroes {
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
    let r = run(
        &mut q,
        RequestKind::Read,
        0,
        Some(AlignedBuf::new(8192, 4096)),
    );
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
    image.file().inject_faults(&plan);
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

/// Counts drops of its buffers (by test, so that tests running in parallel do not mix).
struct CountingBuf {
    inner: AlignedBuf,
    drops: Arc<AtomicUsize>,
}

// SAFETY: delegates to AlignedBuf, whose heap memory does not move with the value.
unsafe impl IoBuf for CountingBuf {
    fn iovecs(&mut self) -> &[libc::iovec] {
        self.inner.iovecs()
    }
    fn total_len(&self) -> usize {
        self.inner.total_len()
    }
}

impl Drop for CountingBuf {
    fn drop(&mut self) {
        self.drops.fetch_add(1, Ordering::SeqCst);
    }
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
    for (i, kind) in [RequestKind::Read, RequestKind::Write]
        .into_iter()
        .enumerate()
    {
        q.submit(Request {
            kind,
            offset: i as u64 * 65536,
            buf: Some(CountingBuf {
                inner: AlignedBuf::new(65536, 4096),
                drops: drops.clone(),
            }),
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
        let image = open(&p, CacheMode::None);
        let plan = FaultPlan::new();
        image.file().inject_faults(&plan);
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
        q.submit(Request {
            kind: RequestKind::Read,
            offset: 0,
            buf: Some(CountingBuf {
                inner: AlignedBuf::new(4096, 4096),
                drops: drops.clone(),
            }),
            user_data: 1,
        });
        q.settle().unwrap();
        drop(q);
        assert_eq!(drops.load(Ordering::SeqCst), 1);
    }
}
