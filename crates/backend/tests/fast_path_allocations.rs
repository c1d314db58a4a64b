//! The fast path of a 4 KiB request allocates nothing: once warm, serving thousands more
//! requests (the reactor, the persistent-grant data path, the image queue and its io_uring
//! engine, and the simulated guest's frontend) costs no heap allocation per request.
//!
//! A counting global allocator counts every allocation of this test process; other threads
//! (the simulated xenstored, the device's control thread) allocate a little over time, so the
//! bound is a fraction of an allocation per request, far below the ~6 per request this path
//! made before (a `Vec` per request in the reactor's run, the grant buffer's iovecs, the image
//! queue's sub-operation lists and slice, a `BTreeSet` node now and then, and the frontend's
//! segment list and poll sets).

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use common::*;
use xdisk_blkfront::{FrontConfig, Op};
use xdisk_blkif::wire::Status;

struct Counting;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

// SAFETY: every call is forwarded to the system allocator unchanged; the counter is a
// relaxed atomic add, which neither allocates nor unwinds.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: the caller's contract for `alloc`, passed on.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: as above.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const DEPTH: usize = 32;

/// Runs `n` requests of `bs` bytes at queue depth 32, reads and writes mixed, at pseudo-random
/// places of a 64 MiB disk; the frontend's buffers are given back to it.
fn run(p: &mut Pair, bs: usize, n: usize, seed: &mut u64) {
    let sectors = (bs / 512) as u32;
    let mut next = move || {
        *seed ^= *seed << 13;
        *seed ^= *seed >> 7;
        *seed ^= *seed << 17;
        *seed
    };
    let blocks = (64 << 20) / bs as u64;
    let mut done = Vec::with_capacity(DEPTH);
    let (mut submitted, mut finished, mut in_flight) = (0, 0, 0);
    while finished < n {
        while in_flight < DEPTH && submitted < n {
            let r = next();
            let sector = (r % blocks) * u64::from(sectors);
            let op = if r & (1 << 40) == 0 {
                Op::Read { sector, sectors }
            } else {
                let mut data = p.front.buffer(bs);
                data.resize(bs, (r >> 48) as u8);
                Op::Write { sector, data }
            };
            p.front.submit(0, op).expect("submit");
            submitted += 1;
            in_flight += 1;
        }
        p.front
            .poll_into(Duration::from_secs(10), &mut done)
            .expect("poll");
        for c in done.drain(..) {
            assert_eq!(c.status, Status::Okay);
            if let Some(d) = c.data {
                p.front.recycle(d);
            }
            finished += 1;
            in_flight -= 1;
        }
    }
}

#[test]
fn warm_4k_requests_allocate_nothing_per_request() {
    warm_requests_allocate_nothing(4096);
}

/// 16 segments: an indirect request, a READV/WRITEV of 16 iovecs at the engine.
#[test]
fn warm_64k_requests_allocate_nothing_per_request() {
    warm_requests_allocate_nothing(64 << 10);
}

fn warm_requests_allocate_nothing(bs: usize) {
    let host = host();
    // The qcow2 image has its clusters allocated (metadata preallocation): allocating
    // writes take the slow path, which is not what this guards.
    let qcow2 = qcow2_disk_with(64 << 20, "preallocation=metadata");
    for (i, disk) in [raw_disk(64 << 20), qcow2].into_iter().enumerate() {
        let image = open_image(&disk.path, false);
        let domid = 7 + i as u16;
        let mut p = pair(&host, domid, 51712, image, |_| {}, FrontConfig::default());
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        // Warm: the persistent grants, the slabs, the spare lists, qcow2's clusters and
        // every buffer pool reach their working size.
        run(&mut p, bs, 6_000, &mut seed);
        run(&mut p, bs, 2_000, &mut seed);
        let before = ALLOCATIONS.load(Ordering::Relaxed);
        let n = 8_000;
        run(&mut p, bs, n, &mut seed);
        let per_request = (ALLOCATIONS.load(Ordering::Relaxed) - before) as f64 / n as f64;
        assert!(
            per_request < 0.1,
            "{}: {per_request:.2} allocations per warm {} KiB request",
            disk.format,
            bs >> 10
        );
        p.front.disconnect().expect("disconnect");
        p.device.shutdown().expect("shutdown");
        check_clean(&disk);
    }
}
