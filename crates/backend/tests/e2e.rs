//! End-to-end: a frontend in a simulated guest writes and reads through the rings; the data
//! read back and the image's contents match.

mod common;

use std::time::Duration;

use common::*;
use xdisk_backend::DataPath;
use xdisk_blkfront::{FrontConfig, Op};
use xdisk_blkif::wire::Status;
use xdisk_blkif::{Abi, XenbusState};

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
        assert_eq!(got, model[sector as usize * 512..sector as usize * 512 + len]);
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
    for abi in [None, Some(Abi::X86_32), Some(Abi::X86_64), Some(Abi::Native)] {
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
