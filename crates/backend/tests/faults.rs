//! Injected I/O faults (xdisk-io's `fault-injection` feature) seen from the guest: after a
//! failed flush the guest gets errors, never OKAY; I/O the engine cannot wait out fails the
//! device loudly and its guest pages stay mapped.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use xdisk_blkfront::{FrontConfig, Op};
use xdisk_blkif::wire::Status;
use xdisk_blkif::XenbusState;
use xdisk_image::{CacheMode, Image, OpenOptions};
use xdisk_io::fault::{Fault, FaultOn, FaultPlan};

const MIB: u64 = 1 << 20;

fn open_with(disk: &Disk, cache: CacheMode) -> Arc<Image> {
    Image::open(
        &disk.path,
        &OpenOptions {
            cache,
            ..OpenOptions::default()
        },
    )
    .expect("image opens")
}

fn write(sector: u64, byte: u8, sectors: usize) -> Op {
    Op::Write {
        sector,
        data: vec![byte; sectors * 512],
    }
}

/// After one failed flush, every flush, write, barrier and discard the guest sends is
/// answered with an error (a later fdatasync would succeed over lost data); reads still work.
#[test]
fn guest_sees_errors_after_a_failed_flush_never_okay() {
    let host = host();
    let mut domid = 1;
    for cache in [CacheMode::WriteBack, CacheMode::None] {
        for disk in [raw_disk(4 * MIB), qcow2_disk(4 * MIB)] {
            let image = open_with(&disk, cache);
            let plan = FaultPlan::new();
            image.file().inject_faults(&plan);
            let mut p = pair(&host, domid, 768, image, |_| {}, FrontConfig::default());
            domid += 1;
            let what = format!("{} cache={cache}", disk.format);
            assert_eq!(
                p.front.run(0, write(0, 1, 16)).unwrap().status,
                Status::Okay
            );
            assert_eq!(p.front.run(0, Op::Flush).unwrap().status, Status::Okay);
            assert_eq!(
                p.front.run(0, write(64, 2, 16)).unwrap().status,
                Status::Okay
            );

            plan.fail_next(FaultOn::Flush, Fault::Errno(5 /* EIO */));
            let c = p.front.run(0, Op::Flush).unwrap();
            assert_eq!(c.status, Status::Error, "{what}: the failed flush");
            assert_eq!(plan.injected(), 1, "{what}");

            for (name, op) in [
                ("flush", Op::Flush),
                ("write", write(128, 3, 8)),
                ("allocating write", write(4096, 4, 128)),
                (
                    "barrier",
                    Op::Barrier {
                        sector: 8,
                        data: vec![5; 4096],
                    },
                ),
                ("flush again", Op::Flush),
            ] {
                let c = p.front.run(0, op).unwrap();
                assert_eq!(
                    c.status,
                    Status::Error,
                    "{what}: {name} after a failed flush"
                );
            }
            let r = p.front.read(0, 16).expect("reads still work");
            assert!(r.iter().all(|&b| b == 1), "{what}");

            p.front.disconnect().expect("disconnect");
            p.device.shutdown().expect("shutdown");
        }
    }
}

/// A queue whose engine can never hand back a completion (the kernel keeps the operation):
/// stopping the device fails it loudly (`error` node) and the request's guest pages stay
/// mapped (never unmapped while the kernel may still use them).
#[test]
fn stuck_io_fails_the_device_and_keeps_guest_pages_mapped() {
    let host = host();
    let disk = raw_disk(4 * MIB);
    let image = open_with(&disk, CacheMode::None);
    let plan = FaultPlan::new();
    image.file().inject_faults(&plan);
    // Without persistent grants, so that the request's page is mapped for it alone.
    let fe = FrontConfig {
        persistent: false,
        ..FrontConfig::default()
    };
    let mut p = pair(&host, 1, 768, image, |_| {}, fe);
    assert_eq!(p.front.run(0, write(0, 1, 8)).unwrap().status, Status::Okay);
    let idle = p.device.stats().mappings;

    plan.fail_always(FaultOn::ReadWrite, Fault::Hold);
    p.front.submit(0, write(64, 2, 8)).expect("submit");
    wait_until("the write in flight", Duration::from_secs(10), || {
        p.device.stats().in_flight == 1
    });
    let busy = p.device.stats().mappings;
    assert!(
        busy > idle,
        "the request's page is mapped ({idle} -> {busy})"
    );

    // The guest closes; the backend cannot wait out the write.
    let _ = p.front.disconnect();
    wait_until("backend Closed", Duration::from_secs(20), || {
        p.device.state() == XenbusState::Closed
    });
    let err = host.read(&format!("{}/error", be_dir(1, 768)));
    assert!(
        err.as_deref().is_some_and(|e| e.contains("I/O engine")),
        "the device is failed loudly: error node {err:?}"
    );
    let s = p.device.stats();
    assert_eq!(s.queues, 0);
    assert!(
        s.mappings >= busy - idle,
        "the stuck request's guest page was unmapped ({s:?})"
    );
    p.device.shutdown().expect("shutdown");
}
