//! ImageQueue end to end: random reads/writes/flushes/discards at high queue depth through
//! every engine (io_uring, native, threads), on raw and qcow2 (with and without a backing
//! file), checked against an in-memory model; qcow2 results also checked by qemu-img.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rand::{Rng, SeedableRng};
use xdisk_image::queue::{ImageQueue, IoDone, IoKind, IoRequest, QueueConfig, QueueStats};
use xdisk_image::{AioKind, CacheMode, Image, OpenOptions};
use xdisk_io::{AlignedBuf, MemStorage, StorageRef};

mod support;
use support::open;

fn tmpdir() -> tempfile::TempDir {
    support::tmpdir("xdisk-queue-")
}

fn qemu_img(args: &[&str]) -> String {
    support::qemu_img_ok(args)
}

/// Runs a random workload through an ImageQueue and checks every read against the model.
/// Returns the queue's counters.
fn random_workload(
    image: Arc<Image>,
    model: &mut [u8],
    aio: AioKind,
    seed: u64,
    ops: usize,
) -> QueueStats {
    let size = model.len() as u64;
    let align = image.storage().alignment().buffer_align();
    let mut q: ImageQueue<AlignedBuf> = ImageQueue::new(
        image.clone(),
        &QueueConfig {
            aio,
            queue_depth: 64,
            slow_threads: 8,
            // Both ways of pushing to the kernel: each request at once, and in batches (the
            // rest of a batch goes at the next reap).
            submit_batch: if seed.is_multiple_of(2) { 1 } else { 8 },
        },
    )
    .unwrap();
    assert_eq!(q.aio(), aio, "the engine asked for is the engine used");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    // In-flight requests never overlap (like a well-behaved guest), so the model is exact.
    let mut inflight: Vec<(u64, u64, u64, bool)> = Vec::new(); // (id, off, len, is_read)
    let mut done: Vec<IoDone<AlignedBuf>> = Vec::new();
    let mut next_id = 0u64;
    let mut issued = 0usize;
    let mut waits = 0u64;
    while issued < ops || !inflight.is_empty() {
        while issued < ops && inflight.len() < 48 {
            let sectors = rng.gen_range(1..=256u64);
            let len = sectors * 512;
            let off = rng.gen_range(0..(size - len) / 512) * 512;
            if inflight
                .iter()
                .any(|&(_, o, l, _)| off < o + l && o < off + len)
            {
                continue;
            }
            let id = next_id;
            next_id += 1;
            issued += 1;
            match rng.gen_range(0..10) {
                0..=4 => {
                    let buf = AlignedBuf::new(len as usize, align);
                    q.submit(IoRequest {
                        kind: IoKind::Read,
                        offset: off,
                        buf: Some(buf),
                        user_data: id,
                    });
                    inflight.push((id, off, len, true));
                }
                5..=7 => {
                    let mut buf = AlignedBuf::new(len as usize, align);
                    rng.fill(&mut buf[..]);
                    model[off as usize..(off + len) as usize].copy_from_slice(&buf);
                    q.submit(IoRequest {
                        kind: IoKind::Write,
                        offset: off,
                        buf: Some(buf),
                        user_data: id,
                    });
                    inflight.push((id, off, len, false));
                }
                8 => {
                    model[off as usize..(off + len) as usize].fill(0);
                    q.submit(IoRequest {
                        kind: IoKind::WriteZeroes {
                            len,
                            unmap: rng.gen(),
                        },
                        offset: off,
                        buf: None,
                        user_data: id,
                    });
                    inflight.push((id, off, len, false));
                }
                _ => {
                    q.submit(IoRequest {
                        kind: IoKind::Flush,
                        offset: 0,
                        buf: None,
                        user_data: id,
                    });
                    inflight.push((id, 0, 0, false));
                }
            }
        }
        done.clear();
        waits += 1;
        if waits.is_multiple_of(2) {
            q.reap(&mut done, 1, Some(Duration::from_secs(30))).unwrap();
        } else {
            // An event loop's way: sleep (which pushes what is held), then reap what is there.
            let t0 = std::time::Instant::now();
            while done.is_empty() {
                assert_eq!(q.sleep(&[], Some(Duration::from_secs(30))).unwrap(), 0);
                q.reap(&mut done, 0, None).unwrap();
                assert!(
                    t0.elapsed() < Duration::from_secs(30),
                    "sleep made no progress"
                );
            }
        }
        assert!(!done.is_empty(), "reap made progress");
        for d in done.drain(..) {
            let pos = inflight.iter().position(|r| r.0 == d.user_data).unwrap();
            let (_, off, len, is_read) = inflight.swap_remove(pos);
            d.result.unwrap();
            if is_read {
                let b = d.buf.unwrap();
                assert!(
                    b[..] == model[off as usize..(off + len) as usize],
                    "read at {off}+{len} differs from the model ({aio})"
                );
            }
        }
    }
    assert_eq!(q.in_flight(), 0);
    q.stats()
}

fn raw_image(dir: &Path, size: u64) -> PathBuf {
    let p = dir.join("disk.raw");
    let f = std::fs::File::create(&p).unwrap();
    f.set_len(size).unwrap();
    p
}

#[test]
fn queue_raw_every_engine_matches_model() {
    for aio in [AioKind::IoUring, AioKind::Native, AioKind::Threads] {
        for cache in [CacheMode::None, CacheMode::WriteBack] {
            let dir = tmpdir();
            let size = 16 << 20;
            let p = raw_image(dir.path(), size);
            let mut model = vec![0u8; size as usize];
            let img = open(&p, cache);
            random_workload(img.clone(), &mut model, aio, 8, 1500);
            img.flush().unwrap();
            drop(img);
            assert!(
                std::fs::read(&p).unwrap() == model,
                "file contents ({aio}, {cache})"
            );
        }
    }
}

#[test]
fn queue_qcow2_every_engine_matches_model_and_qemu_img_check() {
    for aio in [AioKind::IoUring, AioKind::Native, AioKind::Threads] {
        for backing in [false, true] {
            let dir = tmpdir();
            let size: u64 = 16 << 20;
            let p = dir.path().join("disk.qcow2");
            let mut model = vec![0u8; size as usize];
            if backing {
                let b = dir.path().join("base.raw");
                let mut data = vec![0u8; size as usize];
                rand::rngs::StdRng::seed_from_u64(1).fill(&mut data[..]);
                std::fs::write(&b, &data).unwrap();
                model.copy_from_slice(&data);
                qemu_img(&[
                    "create",
                    "-q",
                    "-f",
                    "qcow2",
                    "-o",
                    "cluster_size=4096",
                    "-b",
                    b.to_str().unwrap(),
                    "-F",
                    "raw",
                    p.to_str().unwrap(),
                ]);
            } else {
                qemu_img(&["create", "-q", "-f", "qcow2", p.to_str().unwrap(), "16M"]);
            }
            let img = open(&p, CacheMode::None);
            let stats = random_workload(img.clone(), &mut model, aio, 11, 1500);
            // Allocating writes wait for slow-path workers: more start, up to the most asked.
            assert!(
                stats.slow > 0 && (2..=8).contains(&stats.slow_workers),
                "slow-path workers started: {stats:?}"
            );
            img.flush().unwrap();
            img.close().unwrap();
            drop(img);
            qemu_img(&["check", p.to_str().unwrap()]);
            let flat = dir.path().join("flat.raw");
            qemu_img(&[
                "convert",
                "-O",
                "raw",
                p.to_str().unwrap(),
                flat.to_str().unwrap(),
            ]);
            assert!(
                std::fs::read(&flat).unwrap() == model,
                "qemu-img sees what xdisk wrote ({aio}, backing {backing})"
            );
        }
    }
}

/// The storage/format line: qcow2 and raw over a storage that is not a file (no fd) run
/// through the queue, their mapped I/O on the storage's own engine (not the slow path), and
/// what they leave on the storage is an image qemu-img reads as the model.
#[test]
fn formats_on_a_storage_without_fd_use_its_own_engine() {
    let dir = tmpdir();
    let size: u64 = 16 << 20;
    let p = dir.path().join("disk.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4096",
        p.to_str().unwrap(),
        "16M",
    ]);
    for (fmt, bytes) in [
        (xdisk_image::Format::Qcow2, std::fs::read(&p).unwrap()),
        (xdisk_image::Format::Raw, vec![0u8; size as usize]),
    ] {
        let mem = Arc::new(MemStorage::new(format!("mem:{fmt}"), bytes, false));
        let storage: StorageRef = mem.clone();
        assert!(storage.fd().is_none());
        let img = Image::open_on(
            storage,
            &OpenOptions {
                format: Some(fmt),
                ..OpenOptions::default()
            },
        )
        .unwrap();
        let mut model = vec![0u8; size as usize];
        let mut fast = 0;
        for seed in [21, 22] {
            // Twice: the second pass finds the clusters the first one allocated mapped.
            fast += random_workload(img.clone(), &mut model, AioKind::IoUring, seed, 1500).fast;
        }
        assert!(
            fast > 1000,
            "{fmt}: mapped I/O went to the storage's engine ({fast})"
        );
        img.flush().unwrap();
        img.close().unwrap();
        drop(img);
        let out = dir.path().join(format!("out.{fmt}"));
        std::fs::write(&out, mem.to_vec()).unwrap();
        if fmt == xdisk_image::Format::Qcow2 {
            qemu_img(&["check", out.to_str().unwrap()]);
        }
        let flat = dir.path().join("flat.raw");
        qemu_img(&[
            "convert",
            "-f",
            fmt.as_str(),
            "-O",
            "raw",
            out.to_str().unwrap(),
            flat.to_str().unwrap(),
        ]);
        assert!(
            std::fs::read(&flat).unwrap() == model,
            "qemu-img reads what xdisk wrote to the memory storage ({fmt})"
        );
    }
}

#[test]
fn queue_reports_out_of_range_and_read_only_as_errors() {
    let dir = tmpdir();
    let p = raw_image(dir.path(), 1 << 20);
    let img = Image::open(
        &p,
        &OpenOptions {
            read_only: true,
            cache: CacheMode::None,
            ..OpenOptions::default()
        },
    )
    .unwrap();
    let mut q: ImageQueue<AlignedBuf> = ImageQueue::new(img, &QueueConfig::default()).unwrap();
    q.submit(IoRequest {
        kind: IoKind::Read,
        offset: (1 << 20) - 512,
        buf: Some(AlignedBuf::new(4096, 4096)),
        user_data: 1,
    });
    q.submit(IoRequest {
        kind: IoKind::Write,
        offset: 0,
        buf: Some(AlignedBuf::new(4096, 4096)),
        user_data: 2,
    });
    q.submit(IoRequest {
        kind: IoKind::Read,
        offset: u64::MAX - 100,
        buf: Some(AlignedBuf::new(512, 4096)),
        user_data: 3,
    });
    let mut done = Vec::new();
    while done.len() < 3 {
        q.reap(&mut done, 3, Some(Duration::from_secs(10))).unwrap();
    }
    for d in &done {
        assert!(d.result.is_err(), "request {} must fail", d.user_data);
        assert!(d.buf.is_some(), "buffer handed back even on error");
    }
    // A request refused before any I/O wakes nothing: an event loop's sleep must not wait
    // for it (the reactor once slept for ever on a write to a read-only disk).
    q.submit(IoRequest {
        kind: IoKind::Write,
        offset: 0,
        buf: Some(AlignedBuf::new(4096, 4096)),
        user_data: 4,
    });
    let t0 = std::time::Instant::now();
    q.sleep(&[], Some(Duration::from_secs(20))).unwrap();
    assert!(
        t0.elapsed() < Duration::from_secs(10),
        "slept on a finished request"
    );
    done.clear();
    q.reap(&mut done, 0, None).unwrap();
    assert_eq!(done.len(), 1);
    assert!(done[0].result.is_err());
}

/// `Image::start_write_tracking`: writes through a queue (the fast path, and the slow path
/// of a qcow2 cluster's first write), write-zeroes and discards are recorded by whole
/// granules; a take clears the record; nothing is recorded before the start or after the
/// stop; reads are not recorded.
#[test]
fn write_tracking_records_what_reaches_the_image() {
    const MIB: u64 = 1 << 20;
    for fmt in ["raw", "qcow2"] {
        let dir = tmpdir();
        let p = dir.path().join(format!("disk.{fmt}"));
        qemu_img(&["create", "-q", "-f", fmt, p.to_str().unwrap(), "4M"]);
        let img = open(&p, CacheMode::WriteBack);
        img.write_at(&[1; 512], 0).unwrap();
        assert!(
            img.take_written().is_empty(),
            "{fmt}: recorded before the start"
        );
        assert!(img.start_write_tracking(3000).is_err());
        img.start_write_tracking(65536).unwrap();
        let mut q: ImageQueue<AlignedBuf> =
            ImageQueue::new(img.clone(), &QueueConfig::default()).unwrap();
        let mut done = Vec::new();
        // The same block twice: a qcow2 cluster is allocated on the slow path, then mapped.
        for (i, (kind, off)) in [
            (IoKind::Write, 0x1_1000u64),
            (IoKind::Write, 0x1_1000),
            (IoKind::Read, 0x20_0000),
            (IoKind::Write, MIB + 0xf000),
        ]
        .into_iter()
        .enumerate()
        {
            q.submit(IoRequest {
                kind,
                offset: off,
                buf: Some(AlignedBuf::new(8192, 4096)),
                user_data: i as u64,
            });
            while done.len() <= i {
                q.reap(&mut done, 4, Some(Duration::from_secs(10))).unwrap();
            }
        }
        assert!(done.iter().all(|d| d.result.is_ok()), "{fmt}");
        img.write_zeroes(0x3_0000, 0x2_0000, false).unwrap();
        img.discard(3 * MIB, 0x1_0000).unwrap();
        assert_eq!(
            img.take_written(),
            vec![
                (0x1_0000, 0x1_0000),
                (0x3_0000, 0x2_0000),
                (MIB, 0x2_0000),
                (3 * MIB, 0x1_0000)
            ],
            "{fmt}"
        );
        assert!(img.take_written().is_empty(), "{fmt}: a take clears");
        img.write_at(&[2; 512], 4 * MIB - 512).unwrap();
        assert_eq!(img.take_written(), vec![(4 * MIB - 0x1_0000, 0x1_0000)]);
        img.stop_write_tracking();
        img.write_at(&[3; 512], 0).unwrap();
        assert!(
            img.take_written().is_empty(),
            "{fmt}: recorded after the stop"
        );
    }
}
