//! End-to-end: a frontend in a simulated guest writes and reads through the rings; the data
//! read back and the image's contents match.

mod common;

use std::time::Duration;

use common::*;
use xdisk_backend::DataPath;
use xdisk_blkfront::{FrontConfig, Op};
use xdisk_blkif::wire::Status;
use xdisk_blkif::{Abi, XenbusState};
use xdisk_image::{CacheMode, Image, OpenOptions};

const MIB: u64 = 1 << 20;

/// Writes a few patterns of various sizes, reads them back, and compares with the image.
fn exercise(p: &mut Pair, disk: &Disk, seed: u64) {
    let sectors = p.front.info().sectors;
    assert_eq!(sectors * 512, p.image.size());
    let mut model = vec![0u8; p.image.size() as usize];
    let writes: [(u64, usize); 6] = [
        (0, 512),
        (7, 4096),
        (100, 45056),     // 11 pages: a full direct request
        (300, 64 * 1024), // indirect when enabled
        (2048, 512 * 1024),
        (sectors - 9, 9 * 512), // the last sectors
    ];
    for (i, &(sector, len)) in writes.iter().enumerate() {
        let data = pattern(seed + i as u64, len);
        p.front.write(sector, &data).expect("write");
        model[sector as usize * 512..sector as usize * 512 + len].copy_from_slice(&data);
    }
    for &(sector, len) in &writes {
        let got = p.front.read(sector, (len / 512) as u64).expect("read");
        assert_eq!(
            got,
            model[sector as usize * 512..sector as usize * 512 + len]
        );
    }
    p.front.flush().expect("flush");
    let whole = p.front.read(0, sectors).expect("read all");
    assert!(whole == model, "disk differs from the model");
    assert!(contents(disk) == model, "image differs from the model");
}

fn close(mut p: Pair, host: &Host) {
    p.front.disconnect().expect("disconnect");
    assert_eq!(p.front.leaked_grants(), 0);
    wait_until("backend Closed", Duration::from_secs(10), || {
        p.device.state() == XenbusState::Closed
    });
    let s = p.device.stats();
    assert_eq!(s.mappings, 0, "{s:?}");
    assert_eq!(s.queues, 0);
    assert_eq!(s.in_flight, 0);
    assert_eq!(host.xen.event_channel_count(0), 0);
    p.device.shutdown().expect("shutdown");
}

#[test]
fn raw_basic() {
    let host = host();
    let disk = raw_disk(8 * MIB);
    let image = open_image(&disk.path, false);
    let mut p = pair(&host, 1, 768, image, |_| {}, FrontConfig::default());
    assert_eq!(p.device.state(), XenbusState::Connected);
    exercise(&mut p, &disk, 1);
    let s = p.device.stats();
    assert!(s.wr_req > 0 && s.rd_req > 0 && s.f_req > 0, "{s:?}");
    // Every request answered is in its latency histogram (none is in flight now).
    assert_eq!(s.rd_lat.count, s.rd_req, "{s:?}");
    assert_eq!(s.wr_lat.count, s.wr_req, "{s:?}");
    assert_eq!(s.f_lat.count, s.f_req + s.barrier_req, "{s:?}");
    for h in [s.rd_lat, s.wr_lat, s.f_lat] {
        assert_eq!(h.buckets.iter().sum::<u64>(), h.count, "{h:?}");
    }
    close(p, &host);
}

#[test]
fn qcow2_basic() {
    let host = host();
    let disk = qcow2_disk(8 * MIB);
    let image = open_image(&disk.path, false);
    let mut p = pair(&host, 1, 768, image.clone(), |_| {}, FrontConfig::default());
    exercise(&mut p, &disk, 2);
    close(p, &host);
    image.close().unwrap();
    drop(image);
    check_clean(&disk);
}

#[test]
fn copy_path() {
    let host = host();
    let disk = raw_disk(4 * MIB);
    let image = open_image(&disk.path, false);
    let mut p = pair(
        &host,
        1,
        768,
        image,
        |c| c.data_path = DataPath::Copy,
        FrontConfig::default(),
    );
    assert!(!p.front.info().persistent);
    exercise(&mut p, &disk, 3);
    close(p, &host);
}

#[test]
fn every_abi() {
    for abi in [
        None,
        Some(Abi::X86_32),
        Some(Abi::X86_64),
        Some(Abi::Native),
    ] {
        let host = host();
        let disk = raw_disk(2 * MIB);
        let image = open_image(&disk.path, false);
        let fe = FrontConfig {
            protocol: abi,
            ..FrontConfig::default()
        };
        let mut p = pair(&host, 3, 51712, image, |_| {}, fe);
        exercise(&mut p, &disk, 4);
        close(p, &host);
    }
}

#[test]
fn unknown_op_and_flush() {
    let host = host();
    let disk = raw_disk(MIB);
    let image = open_image(&disk.path, false);
    let mut p = pair(&host, 1, 768, image, |_| {}, FrontConfig::default());
    let c = p.front.run(0, Op::Flush).unwrap();
    assert_eq!(c.status, Status::Okay);
    close(p, &host);
}

/// Ring orders 0..=4, 1 and 4 queues, indirect on and off, persistent on and off.
#[test]
fn negotiation_matrix() {
    let host = host();
    let disk = raw_disk(4 * MIB);
    let image = open_image(&disk.path, false);
    let mut domid = 10;
    for order in 0..=4u32 {
        for queues in [1u32, 4] {
            for indirect in [0u16, 256] {
                for persistent in [false, true] {
                    // Keep the matrix affordable: all orders with one combination each of
                    // the others, and every combination at orders 0 and 4.
                    if (1..=3).contains(&order)
                        && (queues, indirect, persistent) != (4, 256, true)
                        && (queues, indirect, persistent) != (1, 0, false)
                    {
                        continue;
                    }
                    domid += 1;
                    let fe = FrontConfig {
                        max_ring_page_order: order,
                        max_queues: queues,
                        max_indirect_segments: indirect,
                        persistent,
                        ..FrontConfig::default()
                    };
                    let mut p = pair(&host, domid, 768, image.clone(), |c| c.max_queues = 4, fe);
                    let info = p.front.info().clone();
                    assert_eq!(info.ring_page_order, order);
                    assert_eq!(info.queues, queues as usize);
                    assert_eq!(info.max_indirect_segments, indirect);
                    assert_eq!(info.persistent, persistent);
                    assert_eq!(info.ring_size, 32 << order);
                    exercise(&mut p, &disk, u64::from(domid));
                    let s = p.device.stats();
                    assert_eq!(s.queues, u64::from(queues));
                    assert_eq!(s.indirect_req > 0, indirect > 0, "{s:?}");
                    assert_eq!(s.persistent_grants > 0, persistent, "{s:?}");
                    // Grants reused by the frontend are found mapped.
                    assert_eq!(s.pgrant_hits > 0, persistent, "{s:?}");
                    assert_eq!(p.front.persistent_grants() > 0, persistent);
                    // Ring pages + persistent grants stay mapped while connected.
                    assert!(s.mappings >= u64::from(queues) << order, "{s:?}");
                    close(p, &host);
                    host.xen.destroy_domain(domid).unwrap();
                }
            }
        }
    }
}

#[test]
fn barrier_and_flush_with_data() {
    let host = host();
    let disk = raw_disk(MIB);
    let image = open_image(&disk.path, false);
    let mut p = pair(&host, 1, 768, image, |_| {}, FrontConfig::default());
    assert!(p.front.info().barrier && p.front.info().flush);
    // Writes in flight, then a barrier with data, then more writes: all complete, and the
    // barrier's data lands.
    let mut tags = Vec::new();
    for i in 0..8u64 {
        let op = Op::Write {
            sector: i * 8,
            data: pattern(i, 4096),
        };
        tags.push(p.front.submit(0, op).unwrap());
    }
    let b = p
        .front
        .submit(
            0,
            Op::Barrier {
                sector: 64,
                data: pattern(99, 4096),
            },
        )
        .unwrap();
    let after = p
        .front
        .submit(
            0,
            Op::Write {
                sector: 72,
                data: pattern(100, 4096),
            },
        )
        .unwrap();
    let empty_barrier = p
        .front
        .submit(
            0,
            Op::Barrier {
                sector: 0,
                data: Vec::new(),
            },
        )
        .unwrap();
    for t in tags.into_iter().chain([b, after, empty_barrier]) {
        assert_eq!(p.front.wait(t).unwrap().status, Status::Okay);
    }
    assert_eq!(p.front.read(64, 8).unwrap(), pattern(99, 4096));
    assert_eq!(p.front.read(72, 8).unwrap(), pattern(100, 4096));
    let s = p.device.stats();
    assert_eq!(s.barrier_req, 2);
    close(p, &host);
}

#[test]
fn barrier_and_flush_not_advertised() {
    let host = host();
    let disk = raw_disk(MIB);
    let image = open_image(&disk.path, false);
    let mut p = pair(
        &host,
        1,
        768,
        image,
        |c| {
            c.barrier = false;
            c.flush = false;
            c.discard = false;
        },
        FrontConfig::default(),
    );
    assert!(!p.front.info().barrier && !p.front.info().flush && !p.front.info().discard);
    assert_eq!(
        p.front.run(0, Op::Flush).unwrap().status,
        Status::EOpNotSupp
    );
    let barrier = Op::Barrier {
        sector: 0,
        data: vec![1; 512],
    };
    assert_eq!(p.front.run(0, barrier).unwrap().status, Status::EOpNotSupp);
    let discard = Op::Discard {
        sector: 0,
        nr_sectors: 8,
        secure: false,
    };
    assert_eq!(p.front.run(0, discard).unwrap().status, Status::EOpNotSupp);
    assert_eq!(p.device.stats().eopnotsupp, 3);
    close(p, &host);
}

fn discard_on(disk: Disk, secure: bool) {
    let host = host();
    let image = open_image(&disk.path, false);
    let mut p = pair(
        &host,
        1,
        768,
        image.clone(),
        |c| c.discard_secure = secure,
        FrontConfig::default(),
    );
    let info = p.front.info().clone();
    assert!(info.discard);
    assert_eq!(info.discard_secure, secure);
    let g = u64::from(info.discard_granularity / 512);
    let data = pattern(5, (4 * g * 512) as usize);
    p.front.write(0, &data).unwrap();
    let op = Op::Discard {
        sector: g,
        nr_sectors: 2 * g,
        secure,
    };
    assert_eq!(p.front.run(0, op).unwrap().status, Status::Okay);
    let got = p.front.read(0, 4 * g).unwrap();
    let mut want = data.clone();
    want[(g * 512) as usize..(3 * g * 512) as usize].fill(0);
    assert!(got == want, "discarded range reads as zeroes");
    // Past the end: error.
    let op = Op::Discard {
        sector: info.sectors - 1,
        nr_sectors: 2,
        secure: false,
    };
    assert_eq!(p.front.run(0, op).unwrap().status, Status::Error);
    assert!(p.device.stats().ds_req >= 2);
    close(p, &host);
    image.close().unwrap();
    drop(image);
    let c = contents(&disk);
    assert!(c[..want.len()] == want[..]);
    check_clean(&disk);
}

#[test]
fn discard_raw() {
    discard_on(raw_disk(4 * MIB), false);
}

#[test]
fn discard_qcow2() {
    discard_on(qcow2_disk(4 * MIB), false);
    discard_on(qcow2_disk(4 * MIB), true);
}

#[test]
fn read_only_device() {
    let host = host();
    let disk = raw_disk(MIB);
    std::fs::write(&disk.path, pattern(7, MIB as usize)).unwrap();
    let image = open_image(&disk.path, true);
    let mut p = pair(&host, 1, 768, image, |_| {}, FrontConfig::default());
    let info = p.front.info().clone();
    assert_eq!(
        info.info & xdisk_blkif::xenbus::VDISK_READONLY,
        xdisk_blkif::xenbus::VDISK_READONLY
    );
    assert!(!info.discard);
    assert_eq!(p.front.read(0, 2048).unwrap(), pattern(7, MIB as usize));
    let w = Op::Write {
        sector: 0,
        data: vec![0; 4096],
    };
    assert_eq!(p.front.run(0, w).unwrap().status, Status::Error);
    // Indirect writes too.
    let w = Op::Write {
        sector: 0,
        data: vec![0; 128 * 1024],
    };
    assert_eq!(p.front.run(0, w).unwrap().status, Status::Error);
    assert_eq!(p.front.run(0, Op::Flush).unwrap().status, Status::Okay);
    assert_eq!(std::fs::read(&disk.path).unwrap(), pattern(7, MIB as usize));
    close(p, &host);
}

#[test]
fn mode_r_on_a_writable_image_and_cdrom() {
    let host = host();
    let disk = raw_disk(MIB);
    let image = open_image(&disk.path, false);
    let dom = host.xen.create_domain(2, GUEST_PAGES).unwrap();
    host.add_vbd(2, 5632, "r", &[("device-type", "cdrom")]);
    let device = start_device(&host, device_config(2, 5632), image);
    let mut front = xdisk_blkfront::Frontend::connect(
        dom.xenstore().unwrap(),
        dom.clone(),
        &fe_dir(2, 5632),
        FrontConfig::default(),
    )
    .unwrap();
    use xdisk_blkif::xenbus::{VDISK_CDROM, VDISK_READONLY, VDISK_REMOVABLE};
    assert_eq!(
        front.info().info,
        VDISK_READONLY | VDISK_CDROM | VDISK_REMOVABLE
    );
    let w = Op::Write {
        sector: 0,
        data: vec![1; 512],
    };
    assert_eq!(front.run(0, w).unwrap().status, Status::Error);
    front.disconnect().unwrap();
    device.shutdown().unwrap();
}

#[test]
fn reconnect_after_closed() {
    let host = host();
    let disk = raw_disk(2 * MIB);
    let image = open_image(&disk.path, false);
    let mut p = pair(&host, 1, 768, image, |_| {}, FrontConfig::default());
    p.front.write(0, &pattern(1, 8192)).unwrap();
    for round in 0..3u64 {
        p.front.disconnect().unwrap();
        assert_eq!(p.front.leaked_grants(), 0);
        wait_until("backend Closed", Duration::from_secs(10), || {
            p.device.state() == XenbusState::Closed
        });
        assert_eq!(p.device.stats().mappings, 0);
        p.front.reconnect().unwrap();
        assert_eq!(p.device.state(), XenbusState::Connected);
        assert_eq!(p.front.read(0, 16).unwrap(), pattern(1 + round, 8192));
        p.front.write(0, &pattern(2 + round, 8192)).unwrap();
    }
    assert_eq!(p.device.stats().connects, 4);
    close(p, &host);
}

/// A frontend reconnecting right after its disconnection, without waiting for the backend's
/// Closed (as `xdisk bench --reconnect` does): `Frontend::reconnect` waits for the backend to
/// finish closing. It wrote Initialising at once before and took the backend's lingering
/// Closing as a refusal ("backend went to state Closing while the backend's InitWait").
#[test]
fn reconnect_right_after_disconnect() {
    let host = host();
    let disk = raw_disk(2 * MIB);
    let image = open_image(&disk.path, false);
    let mut p = pair(&host, 1, 768, image, |_| {}, FrontConfig::default());
    for round in 0..10u64 {
        p.front.write(8 * round, &pattern(round, 4096)).unwrap();
        p.front.disconnect().unwrap();
        p.front.reconnect().unwrap();
        assert_eq!(p.front.read(8 * round, 8).unwrap(), pattern(round, 4096));
    }
    assert_eq!(p.front.leaked_grants(), 0);
    assert_eq!(p.device.stats().connects, 11);
    close(p, &host);
}

/// A connected frontend follows an online resize through its watch on the backend's state
/// (`Frontend::check_backend`, Linux blkfront's `blkback_changed`), and only then.
#[test]
fn frontend_follows_online_resize() {
    let host = host();
    let disk = raw_disk(MIB);
    let image = open_image(&disk.path, false);
    let mut p = pair(&host, 1, 768, image.clone(), |_| {}, FrontConfig::default());
    // Events of the connection itself change nothing.
    assert_eq!(p.front.check_backend().unwrap(), None);
    image.resize(3 * MIB).unwrap();
    assert_eq!(p.device.resize().unwrap(), 6144);
    let mut seen = None;
    wait_until(
        "the frontend to see the new size",
        Duration::from_secs(10),
        || {
            seen = p.front.check_backend().unwrap();
            seen.is_some()
        },
    );
    assert_eq!(seen, Some(6144));
    assert_eq!(p.front.info().sectors, 6144);
    assert_eq!(p.front.check_backend().unwrap(), None);
    p.front.write(6000, &pattern(5, 4096)).unwrap();
    assert_eq!(p.front.read(6000, 8).unwrap(), pattern(5, 4096));
    close(p, &host);
}

#[test]
fn online_resize() {
    let host = host();
    let disk = raw_disk(MIB);
    let image = open_image(&disk.path, false);
    let mut p = pair(&host, 1, 768, image.clone(), |_| {}, FrontConfig::default());
    assert_eq!(p.front.info().sectors, 2048);
    let past = Op::Read {
        sector: 2048,
        sectors: 8,
    };
    assert_eq!(p.front.run(0, past.clone()).unwrap().status, Status::Error);
    image.resize(2 * MIB).unwrap();
    assert_eq!(p.device.resize().unwrap(), 4096);
    assert_eq!(p.device.state(), XenbusState::Connected);
    p.front.read_disk_info().unwrap();
    assert_eq!(p.front.info().sectors, 4096);
    assert_eq!(host.be_state(1, 768), Some(XenbusState::Connected));
    let c = p.front.run(0, past).unwrap();
    assert_eq!(c.status, Status::Okay);
    p.front.write(4000, &pattern(3, 4096)).unwrap();
    assert_eq!(p.front.read(4000, 8).unwrap(), pattern(3, 4096));
    close(p, &host);
}

#[test]
fn first_sect_offsets() {
    for first in [1u8, 3, 7] {
        let host = host();
        let disk = raw_disk(2 * MIB);
        let image = open_image(&disk.path, false);
        let fe = FrontConfig {
            first_sect: first,
            ..FrontConfig::default()
        };
        let mut p = pair(&host, 1, 768, image, |_| {}, fe);
        exercise(&mut p, &disk, u64::from(first));
        close(p, &host);
    }
}

/// A small persistent-grant cache: LRU eviction keeps it bounded, data stays right, and
/// evicted grants are unmapped (the frontend can revoke everything at the end).
#[test]
fn persistent_grant_lru() {
    let host = host();
    let disk = raw_disk(4 * MIB);
    let image = open_image(&disk.path, false);
    let fe = FrontConfig {
        max_queues: 1,
        ..FrontConfig::default()
    };
    let mut p = pair(&host, 1, 768, image, |c| c.max_persistent_grants = 16, fe);
    assert!(p.front.info().persistent);
    let mut max_seen = 0;
    for round in 0..6u64 {
        // 64 KiB requests use 16 pages each; several in flight use more than the cache.
        let mut tags = Vec::new();
        for i in 0..4u64 {
            let op = Op::Write {
                sector: (round * 4 + i) * 128,
                data: pattern(round * 10 + i, 64 * 1024),
            };
            tags.push(p.front.submit(0, op).unwrap());
        }
        for t in tags {
            assert_eq!(p.front.wait(t).unwrap().status, Status::Okay);
        }
        max_seen = max_seen.max(p.device.stats().persistent_grants);
    }
    assert!(max_seen <= 16 && max_seen > 0, "{max_seen}");
    for round in 0..6u64 {
        for i in 0..4u64 {
            let got = p.front.read((round * 4 + i) * 128, 128).unwrap();
            assert_eq!(got, pattern(round * 10 + i, 64 * 1024));
        }
    }
    // The frontend's pool is larger than the backend's cache.
    assert!(p.front.persistent_grants() > 16);
    close(p, &host);
}

/// The largest request: 256 indirect segments (1 MiB), in one request each way.
#[test]
fn largest_indirect_request() {
    for path in [DataPath::Map, DataPath::Copy] {
        for persistent in [false, true] {
            let host = host();
            let disk = raw_disk(4 * MIB);
            let image = open_image(&disk.path, false);
            let fe = FrontConfig {
                persistent,
                ..FrontConfig::default()
            };
            let mut p = pair(&host, 1, 768, image, |c| c.data_path = path, fe);
            assert_eq!(p.front.max_request_sectors(), 2048);
            let data = pattern(11, MIB as usize);
            let w = Op::Write {
                sector: 100,
                data: data.clone(),
            };
            assert_eq!(p.front.run(0, w).unwrap().status, Status::Okay);
            let r = p
                .front
                .run(
                    0,
                    Op::Read {
                        sector: 100,
                        sectors: 2048,
                    },
                )
                .unwrap();
            assert_eq!(r.status, Status::Okay);
            assert!(r.data.unwrap() == data);
            let s = p.device.stats();
            assert_eq!((s.indirect_req, s.rd_sect, s.wr_sect), (2, 2048, 2048));
            close(p, &host);
        }
    }
}

/// The lab's xdisk-attach sequence on a qcow2 over a raw backing file (O_DIRECT): read it all,
/// copy-up write, whole-cluster write, discard of allocated clusters and of backing-only ones,
/// read it all; once the backend is Closed, qemu-img must read exactly what the guest read.
#[test]
fn image_file_holds_what_the_guest_saw_once_closed() {
    let host = host();
    let dir = tmpdir();
    let base = dir.path().join("base.raw");
    let mut b = pattern(77, 8 * MIB as usize);
    b.resize(32 * MIB as usize, 0);
    std::fs::write(&base, &b).unwrap();
    let path = dir.path().join("top.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        base.to_str().unwrap(),
        "-F",
        "raw",
        path.to_str().unwrap(),
        "32M",
    ]);
    let disk = Disk {
        dir,
        path,
        format: "qcow2",
    };
    for round in 0..3 {
        let image = Image::open(
            &disk.path,
            &OpenOptions {
                cache: CacheMode::None,
                format: Some(xdisk_image::Format::Qcow2),
                ..OpenOptions::default()
            },
        )
        .unwrap();
        let mut p = pair(
            &host,
            1 + round,
            768,
            image.clone(),
            |_| {},
            FrontConfig {
                max_queues: 2,
                ..FrontConfig::default()
            },
        );
        let sectors = 32 * MIB / 512;
        let read_all = |p: &mut Pair| {
            let mut v = Vec::new();
            for s in (0..sectors).step_by(2048) {
                v.extend(p.front.read(s, 2048).unwrap());
            }
            v
        };
        let before = read_all(&mut p);
        let small = pattern(100 + u64::from(round), 12288);
        p.front.write(259 * 8, &small).unwrap();
        let big = pattern(200 + u64::from(round), MIB as usize);
        p.front.write(16 * MIB / 512, &big).unwrap();
        assert_eq!(p.front.run(0, Op::Flush).unwrap().status, Status::Okay);
        for (off, len) in [(16 * MIB, MIB), (4 * MIB, 2 * MIB)] {
            let op = Op::Discard {
                sector: off / 512,
                nr_sectors: len / 512,
                secure: false,
            };
            assert_eq!(p.front.run(0, op).unwrap().status, Status::Okay);
        }
        let after = read_all(&mut p);
        assert_eq!(after.len(), before.len());
        close(p, &host);
        // Once the backend says Closed (libxl and `xdisk detach` then return), the image file
        // must hold what the guest saw, before the daemon closes or drops the image.
        check_clean(&disk);
        let c = contents(&disk);
        if let Some(i) = (0..c.len()).find(|&i| c[i] != after[i]) {
            panic!(
                "round {round}: qemu-img reads {:#x} at {i:#x}, the guest read {:#x}",
                c[i], after[i]
            );
        }
        assert!(after[4 * MIB as usize..6 * MIB as usize]
            .iter()
            .all(|&x| x == 0));
        image.close().unwrap();
    }
}

/// With `poll_us` the queue busy-polls before it sleeps: requests at queue depth 1 are all
/// served with the right data, the windows are counted (`poll_hits`, `poll_misses`), and
/// the device still closes; without it the queue never polls.
#[test]
fn polling_queue_serves_requests_and_counts_its_windows() {
    for poll_us in [2000u32, 0] {
        let host = host();
        let disk = raw_disk(MIB);
        let image = open_image(&disk.path, false);
        let fe = FrontConfig {
            max_queues: 1,
            ..FrontConfig::default()
        };
        let mut p = pair(&host, 1, 769, image, |c| c.poll_us = poll_us, fe);
        for i in 0..40u64 {
            let data = pattern(i, 4096);
            let t = p
                .front
                .submit(
                    0,
                    Op::Write {
                        sector: i * 8,
                        data: data.clone(),
                    },
                )
                .unwrap();
            assert_eq!(p.front.wait(t).unwrap().status, Status::Okay);
            let t = p
                .front
                .submit(
                    0,
                    Op::Read {
                        sector: i * 8,
                        sectors: 8,
                    },
                )
                .unwrap();
            let c = p.front.wait(t).unwrap();
            assert_eq!(c.status, Status::Okay);
            assert!(c.data.as_deref() == Some(&data[..]), "request {i}");
        }
        let s = p.device.stats();
        assert_eq!((s.rd_req, s.wr_req), (40, 40));
        if poll_us > 0 {
            assert!(s.poll_hits > 0, "{s:?}");
        } else {
            assert_eq!((s.poll_hits, s.poll_misses), (0, 0));
        }
        close(p, &host);
    }
}

/// Contiguous reads or writes published in one batch go to the image as one operation each
/// way (`merged_req` counts the requests that rode on the one before), a flush between them
/// keeps them apart (the writes before it are submitted, and numbered, first), and the data
/// is right on every data path.
#[test]
fn contiguous_requests_of_a_batch_share_one_image_operation() {
    for path in [DataPath::Map, DataPath::Copy] {
        for persistent in [false, true] {
            let host = host();
            let disk = raw_disk(4 * MIB);
            let image = open_image(&disk.path, false);
            let fe = FrontConfig {
                persistent,
                max_queues: 1,
                ..FrontConfig::default()
            };
            let mut p = pair(&host, 1, 768, image, |c| c.data_path = path, fe);
            const REQ: u64 = 64 * 1024;
            let base = 64u64; // sectors
            let data: Vec<Vec<u8>> = (0..8).map(|i| pattern(40 + i, REQ as usize)).collect();
            // w0..w3, a flush, w4..w7: two runs of four.
            p.front.plug();
            let mut tags = Vec::new();
            for (i, d) in data.iter().enumerate() {
                if i == 4 {
                    tags.push(p.front.submit(0, Op::Flush).unwrap());
                }
                let op = Op::Write {
                    sector: base + i as u64 * REQ / 512,
                    data: d.clone(),
                };
                tags.push(p.front.submit(0, op).unwrap());
            }
            p.front.unplug().unwrap();
            for t in tags {
                assert_eq!(p.front.wait(t).unwrap().status, Status::Okay);
            }
            assert_eq!(p.device.stats().merged_req, 6, "{path:?} {persistent}");
            // Eight contiguous reads: one run.
            p.front.plug();
            let tags: Vec<u64> = (0..8u64)
                .map(|i| {
                    let op = Op::Read {
                        sector: base + i * REQ / 512,
                        sectors: (REQ / 512) as u32,
                    };
                    p.front.submit(0, op).unwrap()
                })
                .collect();
            p.front.unplug().unwrap();
            for (t, d) in tags.into_iter().zip(&data) {
                let c = p.front.wait(t).unwrap();
                assert_eq!(c.status, Status::Okay);
                assert!(c.data.as_deref() == Some(&d[..]), "{path:?} {persistent}");
            }
            let s = p.device.stats();
            assert_eq!(s.merged_req, 6 + 7, "{path:?} {persistent}");
            assert_eq!((s.rd_req, s.wr_req, s.f_req), (8, 8, 1));
            // Not contiguous (a gap of one sector): nothing more is merged.
            p.front.plug();
            let tags: Vec<u64> = (0..4u64)
                .map(|i| {
                    let op = Op::Read {
                        sector: base + i * (REQ / 512 + 1),
                        sectors: (REQ / 512) as u32,
                    };
                    p.front.submit(0, op).unwrap()
                })
                .collect();
            p.front.unplug().unwrap();
            for t in tags {
                assert_eq!(p.front.wait(t).unwrap().status, Status::Okay);
            }
            assert_eq!(p.device.stats().merged_req, 6 + 7);
            close(p, &host);
        }
    }
}
