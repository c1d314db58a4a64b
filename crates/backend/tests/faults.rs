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

/// `disk` opened with `cache`, with a fault plan (empty yet) on its file.
fn open_faulty(disk: &Disk, cache: CacheMode) -> (Arc<Image>, Arc<FaultPlan>) {
    let image = open_with(disk, cache);
    let plan = FaultPlan::new();
    image
        .storage()
        .as_file()
        .expect("image on a host file")
        .inject_faults(&plan);
    (image, plan)
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
            let (image, plan) = open_faulty(&disk, cache);
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

            plan.fail_next(FaultOn::Flush, Fault::Errno(libc_eio()));
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
            assert_eq!(
                p.device.stats().image_broken,
                1,
                "{what}: counted as broken"
            );

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
    let (image, plan) = open_faulty(&disk, CacheMode::None);
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
    assert_eq!(s.stuck_queues, 1, "counted as a stuck queue");
    assert!(
        s.mappings >= busy - idle,
        "the stuck request's guest page was unmapped ({s:?})"
    );
    p.device.shutdown().expect("shutdown");
}

/// A request the storage failed at its deadline but still holds (librbd past xdisk's
/// deadline; here `Fault::Late`: the storage writes into the memory afterwards): the guest's
/// pages leave the backend before the guest is answered (its grants end cleanly, nothing is
/// leaked), the late writes land in the backend's private memory, never in the guest, and
/// persistent grants taken out that way are mapped again at their next use.
#[test]
fn pages_of_a_request_failed_at_its_deadline_leave_the_backend_before_the_answer() {
    let host = host();
    let mut domid = 1;
    for persistent in [false, true] {
        for disk in [raw_disk(4 * MIB), qcow2_disk(4 * MIB)] {
            let (image, plan) = open_faulty(&disk, CacheMode::None);
            let fe = FrontConfig {
                persistent,
                ..FrontConfig::default()
            };
            let mut p = pair(&host, domid, 768, image, |_| {}, fe);
            domid += 1;
            let what = format!("{} persistent={persistent}", disk.format);
            assert_eq!(
                p.front.run(0, write(0, 1, 64)).unwrap().status,
                Status::Okay
            );
            assert_eq!(p.front.run(0, Op::Flush).unwrap().status, Status::Okay);
            let mut injected = 0;
            for (name, op) in [
                (
                    "read",
                    Op::Read {
                        sector: 0,
                        sectors: 64,
                    },
                ),
                ("write", write(0, 1, 64)),
                (
                    "read",
                    Op::Read {
                        sector: 8,
                        sectors: 8,
                    },
                ),
            ] {
                let misses = p.device.stats().pgrant_misses;
                let detached = p.device.stats().detached_pages;
                plan.fail_next(FaultOn::ReadWrite, Fault::Late);
                let c = p.front.run(0, op).unwrap();
                injected += 1;
                assert_eq!(plan.injected(), injected, "{what} {name}");
                assert_eq!(c.status, Status::Error, "{what}: the late {name}");
                assert_eq!(
                    p.front.leaked_grants(),
                    0,
                    "{what}: a grant of the late {name} was still mapped when answered"
                );
                assert!(
                    p.device.stats().detached_pages > detached,
                    "{what}: the late {name}'s detached pages are counted (xdisk stat)"
                );
                // The storage's late writes come soon after (the fault engine's release).
                std::thread::sleep(Duration::from_millis(100));
                assert_eq!(
                    guest_page_with_run(&p.dom, 0xa5),
                    None,
                    "{what}: the late {name} wrote into a guest page"
                );
                let r = p.front.read(0, 64).expect("reads work");
                assert!(r.iter().all(|&b| b == 1), "{what}: read after the {name}");
                if persistent {
                    assert!(
                        p.device.stats().pgrant_misses > misses,
                        "{what}: the detached persistent grants are mapped again"
                    );
                }
            }
            assert_eq!(p.front.leaked_grants(), 0, "{what}");
            p.front.disconnect().expect("disconnect");
            wait_until("nothing left mapped", Duration::from_secs(10), || {
                p.device.stats().mappings == 0
            });
            p.device.shutdown().expect("shutdown");
            check_clean(&disk);
        }
    }
}

/// Hash of one 512-byte sector.
fn sector_hash(b: &[u8]) -> u64 {
    b.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &x| {
        (h ^ u64::from(x)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Random reads, writes and flushes from a guest, several in flight on two queues, while the
/// host's reads and writes fail at random (EIO, ENOSPC, short transfers): the guest gets
/// errors, never wrong data. The model keeps, per sector, what the last successful write
/// left and what failed writes since may have left.
#[test]
fn random_io_faults_give_the_guest_errors_never_wrong_data() {
    use rand::{Rng, SeedableRng};
    let host = host();
    let size = 4 * MIB;
    let sectors = (size / 512) as usize;
    let mut domid = 1;
    for (qcow2, data_path) in [
        (false, xdisk_backend::DataPath::Map),
        (true, xdisk_backend::DataPath::Map),
        (true, xdisk_backend::DataPath::Copy),
    ] {
        let disk = if qcow2 {
            qcow2_disk(size)
        } else {
            raw_disk(size)
        };
        let (image, plan) = open_faulty(&disk, CacheMode::None);
        let fe = FrontConfig {
            max_queues: 2,
            ..FrontConfig::default()
        };
        let mut p = pair(&host, domid, 768, image, |c| c.data_path = data_path, fe);
        domid += 1;
        let what = format!("{} {data_path:?}", disk.format);
        // XDISK_FAULT_SEED picks other seeds (scripts/fault-soak).
        let seed = std::env::var("XDISK_FAULT_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(77u64)
            + domid as u64;
        plan.random(
            seed,
            150_000,
            FaultOn::ReadWrite,
            &[
                Fault::Errno(libc_eio()),
                Fault::Errno(28 /* ENOSPC */),
                Fault::Short,
            ],
        );
        let zero = sector_hash(&[0u8; 512]);
        let mut model: Vec<Vec<u64>> = vec![vec![zero]; sectors];
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let (mut good_reads, mut errors) = (0, 0);
        for _round in 0..150 {
            // A batch of non-overlapping requests in flight together.
            let mut batch: Vec<(u64, usize, usize, Option<Vec<u64>>)> = Vec::new();
            for i in 0..rng.gen_range(1..=8) {
                let n = rng.gen_range(1..=64usize);
                let first = rng.gen_range(0..sectors - n);
                if batch
                    .iter()
                    .any(|&(_, f, l, _)| first < f + l && f < first + n)
                {
                    continue;
                }
                let (op, hashes) = match rng.gen_range(0..10) {
                    0 => (Op::Flush, None),
                    1..=5 => {
                        let mut data = vec![0u8; n * 512];
                        rng.fill(&mut data[..]);
                        let h = data.chunks(512).map(sector_hash).collect::<Vec<_>>();
                        (
                            Op::Write {
                                sector: first as u64,
                                data,
                            },
                            Some(h),
                        )
                    }
                    _ => (
                        Op::Read {
                            sector: first as u64,
                            sectors: n as u32,
                        },
                        None,
                    ),
                };
                let is_flush = op == Op::Flush;
                let tag = p.front.submit(i % 2, op).expect("submit");
                let (first, n) = if is_flush { (0, 0) } else { (first, n) };
                batch.push((tag, first, n, hashes));
            }
            for (tag, first, n, hashes) in batch {
                let c = p.front.wait(tag).expect("answered");
                match (hashes, c.status, c.data) {
                    (Some(h), Status::Okay, _) => {
                        for (s, h) in h.into_iter().enumerate() {
                            model[first + s] = vec![h];
                        }
                    }
                    (Some(h), _, _) => {
                        errors += 1;
                        for (s, h) in h.into_iter().enumerate() {
                            if !model[first + s].contains(&h) {
                                model[first + s].push(h);
                            }
                        }
                    }
                    (None, Status::Okay, Some(data)) => {
                        good_reads += 1;
                        for s in 0..n {
                            let h = sector_hash(&data[s * 512..(s + 1) * 512]);
                            assert!(
                                model[first + s].contains(&h),
                                "{what}: sector {} read back wrong data",
                                first + s
                            );
                        }
                    }
                    (None, Status::Okay, None) => {} // a flush
                    (None, _, _) => errors += 1,
                }
            }
        }
        assert!(plan.injected() > 20, "{what}: {} faults", plan.injected());
        assert!(
            errors > 0 && good_reads > 20,
            "{what}: {errors} errors, {good_reads} reads"
        );
        plan.clear();
        p.front.disconnect().expect("disconnect");
        p.device.shutdown().expect("shutdown");
    }
}

fn libc_eio() -> i32 {
    5
}
