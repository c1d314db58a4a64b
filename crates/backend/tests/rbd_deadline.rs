//! A guest's requests on an RBD disk that the cluster holds past xdisk's deadline (the OSD
//! stopped, as a storage host that went away), on a real throwaway Ceph cluster
//! (`tests/ceph/start`) and the simulated Xen host: the guest is answered on time with an
//! error, after its pages left the backend (librbd had them, zero copy, and may still write
//! into them: that lands in the backend's private memory, never in the guest); when the OSD
//! answers again, librbd's late completions free that memory, persistent grants taken out are
//! mapped again, and the disk works on.

mod common;

use std::time::Duration;

use common::*;
use xdisk_blkfront::{FrontConfig, Op};
use xdisk_blkif::wire::Status;
use xdisk_image::{CacheMode, CreateOptions, DiskSource, Format, OpenOptions};
use xdisk_rbd::testing::{cluster, OsdStopped, TestImage};

const MIB: u64 = 1 << 20;
/// What the disk holds where the late read goes: bytes the guest never had in its memory.
const MARK: u8 = 0x5c;

#[test]
fn guest_requests_held_past_their_rbd_deadline_are_answered_after_their_pages_left() {
    let Some(conf) = cluster() else { return };
    let host = host();
    for (domid, (format, persistent)) in (1u16..).zip([
        (Format::Raw, false),
        (Format::Raw, true),
        (Format::Qcow2, true),
    ]) {
        let t = TestImage::new(conf, "ringdeadline");
        let name = t.name_with(":xdisk_deadline=2");
        let src = DiskSource::parse(&name, Some(format)).unwrap();
        src.create(
            format,
            &CreateOptions {
                size: 16 * MIB,
                ..CreateOptions::default()
            },
        )
        .unwrap();
        let image = src
            .open(&OpenOptions {
                format: Some(format),
                cache: CacheMode::None,
                ..OpenOptions::default()
            })
            .unwrap();
        // Written by the host, so the guest's memory never held these bytes.
        image.write_at(&vec![MARK; 64 * 512], 0).unwrap();
        image.flush().unwrap();
        let what = format!("{format:?} persistent={persistent}");
        let fe = FrontConfig {
            persistent,
            ..FrontConfig::default()
        };
        let mut p = pair(&host, domid, 768, image, |_| {}, fe);
        assert_eq!(
            p.front.run(0, write_op(4096, 1, 64)).unwrap().status,
            Status::Okay,
            "{what}"
        );
        {
            let _osd = OsdStopped::new(conf);
            let read = p
                .front
                .submit(
                    0,
                    Op::Read {
                        sector: 0,
                        sectors: 64,
                    },
                )
                .unwrap();
            let write = p.front.submit(0, write_op(8192, 2, 64)).unwrap();
            for (tag, name) in [(read, "read"), (write, "write")] {
                let c = p
                    .front
                    .wait(tag)
                    .expect("answered while the OSD is stopped");
                assert_eq!(c.status, Status::Error, "{what}: the held {name}");
            }
            assert_eq!(
                p.front.leaked_grants(),
                0,
                "{what}: a grant was still mapped when the guest was answered"
            );
            // The read's 8 pages at least (a qcow2 write to new clusters goes through the
            // image's own buffer, not the guest's pages).
            let detached = p.device.stats().detached_pages;
            assert!(
                detached >= 8,
                "{what}: the held requests' pages are counted as detached (xdisk stat): {detached}"
            );
        }
        // The OSD answers again: librbd completes the held requests late, the read into the
        // backend's private pages, never into the guest's (which would now hold MARK: the
        // guest has not read those bytes itself yet). A request after them, and a pause, let
        // the late completions come first.
        let r = p.front.read(4096, 64).expect("reads work again");
        assert!(r.iter().all(|&b| b == 1), "{what}");
        std::thread::sleep(Duration::from_millis(500));
        assert_eq!(
            guest_page_with_run(&p.dom, MARK),
            None,
            "{what}: the late read wrote into a guest page"
        );
        let r = p.front.read(0, 64).unwrap();
        assert!(r.iter().all(|&b| b == MARK), "{what}: the disk's bytes");
        let w = p.front.read(8192, 64).unwrap();
        assert!(
            w.iter().all(|&b| b == 2) || w.iter().all(|&b| b == 0),
            "{what}: the held write left its data or none"
        );
        p.front.disconnect().expect("disconnect");
        wait_until("nothing left mapped", Duration::from_secs(30), || {
            p.device.stats().mappings == 0
        });
        p.device.shutdown().expect("shutdown");
    }
}

fn write_op(sector: u64, byte: u8, sectors: usize) -> Op {
    Op::Write {
        sector,
        data: vec![byte; sectors * 512],
    }
}
