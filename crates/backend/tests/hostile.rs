//! A hostile frontend: every attack is answered with an error response, or with a
//! disconnection of that one device (state Closing -> Closed and an `error` node), while a
//! second device on the same backend keeps working, and nothing leaks (mappings, queue
//! threads, event channels).

mod common;

use std::time::Duration;

use common::*;
use xdisk_blkfront::{Completion, FrontConfig, Frontend, Misbehave, Op};
use xdisk_blkif::abi::SLOT_SIZE;
use xdisk_blkif::wire::{
    DirectIo, Indirect, IndirectGrefs, IndirectOp, Request, RequestKind, Segment, Segments, Status,
    BLKIF_OP_INDIRECT, BLKIF_OP_READ, BLKIF_OP_WRITE,
};
use xdisk_blkif::XenbusState;

const MIB: u64 = 1 << 20;
const VICTIM: u16 = 1;
const BYSTANDER: u16 = 2;

struct World {
    host: Host,
    victim: Pair,
    bystander: Pair,
    _disks: Vec<Disk>,
}

fn world_with(be: impl Fn(&mut xdisk_backend::DeviceConfig), fe: FrontConfig) -> World {
    let host = host();
    let d1 = raw_disk(4 * MIB);
    let d2 = raw_disk(4 * MIB);
    let bystander = pair(
        &host,
        BYSTANDER,
        768,
        open_image(&d2.path, false),
        &be,
        FrontConfig::default(),
    );
    let victim = pair(&host, VICTIM, 768, open_image(&d1.path, false), &be, fe);
    World {
        host,
        victim,
        bystander,
        _disks: vec![d1, d2],
    }
}

fn world() -> World {
    world_with(|_| {}, FrontConfig::default())
}

/// The second device still works.
fn bystander_ok(w: &mut World, seed: u64) {
    let data = pattern(seed, 96 * 1024);
    w.bystander.front.write(40, &data).unwrap();
    assert!(w.bystander.front.read(40, 192).unwrap() == data);
    assert_eq!(w.bystander.device.state(), XenbusState::Connected);
}

/// Waits for the response to raw request `id`.
fn raw_response(f: &mut Frontend, id: u64) -> Completion {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        for c in f.poll(Duration::from_millis(50)).unwrap() {
            if c.raw && c.tag == id {
                return c;
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no response to {id:#x}"
        );
    }
}

fn send_raw(w: &mut World, req: &Request) -> Completion {
    w.victim.front.push_raw_request(0, req).unwrap();
    w.victim.front.publish(0).unwrap();
    raw_response(&mut w.victim.front, req.id)
}

fn send_slot(w: &mut World, id: u64, slot: &[u8; SLOT_SIZE]) -> Completion {
    w.victim.front.push_raw(0, slot).unwrap();
    w.victim.front.publish(0).unwrap();
    raw_response(&mut w.victim.front, id)
}

/// The victim is still connected and serves requests.
fn victim_ok(w: &mut World) {
    assert_eq!(w.victim.device.state(), XenbusState::Connected);
    let data = pattern(77, 8192);
    w.victim.front.write(8, &data).unwrap();
    assert_eq!(w.victim.front.read(8, 16).unwrap(), data);
}

/// Tears the victim down (frontend close, device shutdown) and checks that nothing leaked.
fn finish(mut w: World) {
    bystander_ok(&mut w, 1234);
    let victim = w.victim;
    let mut front = victim.front;
    let _ = front.disconnect();
    assert_eq!(front.leaked_grants(), 0, "the backend kept grants mapped");
    wait_until("victim closed", Duration::from_secs(10), || {
        victim.device.state() == XenbusState::Closed
    });
    let s = victim.device.stats();
    assert_eq!((s.mappings, s.queues, s.in_flight), (0, 0, 0), "{s:?}");
    victim.device.shutdown().unwrap();
    drop(front);
    // Only the bystander's event channels remain in dom0.
    let bq = w.bystander.front.info().queues;
    assert_eq!(w.host.xen.event_channel_count(0), bq);
    let mut by = w.bystander;
    by.front.disconnect().unwrap();
    assert_eq!(by.front.leaked_grants(), 0);
    by.device.shutdown().unwrap();
    assert_eq!(w.host.xen.event_channel_count(0), 0);
}

/// The victim device was disconnected for a protocol error, and can reconnect.
fn assert_disconnected(w: &mut World) {
    wait_until("victim disconnected", Duration::from_secs(10), || {
        w.victim.device.state() == XenbusState::Closed
    });
    let be = be_dir(VICTIM, 768);
    assert!(w.host.read(&format!("{be}/error")).is_some(), "error node");
    let s = w.victim.device.stats();
    assert_eq!((s.mappings, s.queues), (0, 0), "{s:?}");
    bystander_ok(w, 55);
    // The guest may come back (reboot): close, then connect again.
    w.victim.front.disconnect().unwrap();
    assert_eq!(w.victim.front.leaked_grants(), 0);
    w.victim.front.reconnect().unwrap();
    victim_ok(w);
}

fn seg(gref: u32, first: u8, last: u8) -> Segment {
    Segment {
        gref,
        first_sect: first,
        last_sect: last,
    }
}

fn read_req(id: u64, sector: u64, segs: &[Segment]) -> Request {
    Request {
        id,
        handle: 0,
        kind: RequestKind::Read(DirectIo {
            sector,
            segments: Segments::from_slice(segs).unwrap(),
        }),
    }
}

/// A granted page of the victim's memory.
fn page(w: &mut World, readonly: bool) -> u32 {
    let p = w.victim.front.alloc_page().unwrap();
    w.victim.front.grant_page(p, readonly).unwrap()
}

#[test]
fn req_prod_racing_ahead() {
    let mut w = world();
    let size = w.victim.front.info().ring_size;
    let pvt = w.victim.front.req_prod_pvt(0).unwrap();
    w.victim
        .front
        .set_req_prod(0, pvt.wrapping_add(size + 1))
        .unwrap();
    assert_disconnected(&mut w);
    assert_eq!(w.victim.device.stats().protocol_errors, 1);
    // req_prod moved backwards behind req_cons.
    w.victim.front.write(0, &[1; 512]).unwrap();
    let pvt = w.victim.front.req_prod_pvt(0).unwrap();
    w.victim.front.set_req_prod(0, pvt.wrapping_sub(5)).unwrap();
    assert_disconnected(&mut w);
    finish(w);
}

#[test]
fn too_many_segments() {
    let mut w = world();
    let g = page(&mut w, false);
    // A direct read with nr_segments 12: build a valid one, then patch the count.
    let req = read_req(1 << 40, 0, &[seg(g, 0, 7); 11]);
    let mut slot = [0u8; SLOT_SIZE];
    req.write(w.victim.front.abi(), &mut slot);
    slot[1] = 12;
    let c = send_slot(&mut w, 1 << 40, &slot);
    assert_eq!((c.status, c.operation), (Status::Error, BLKIF_OP_READ));
    slot[1] = 255;
    assert_eq!(send_slot(&mut w, 1 << 40, &slot).status, Status::Error);
    // Read/write without segments.
    slot[1] = 0;
    assert_eq!(send_slot(&mut w, 1 << 40, &slot).status, Status::Error);
    // Indirect above the advertised 256.
    let ind = Request {
        id: (1 << 40) + 1,
        handle: 0,
        kind: RequestKind::Indirect(Indirect {
            op: IndirectOp::Read,
            sector: 0,
            nr_segments: 257,
            indirect_grefs: IndirectGrefs::from_slice(&[g]).unwrap(),
        }),
    };
    let c = send_raw(&mut w, &ind);
    assert_eq!((c.status, c.operation), (Status::Error, BLKIF_OP_READ));
    victim_ok(&mut w);
    finish(w);
}

#[test]
fn bad_sector_ranges_in_segments() {
    let mut w = world();
    let g = page(&mut w, false);
    for (i, (first, last)) in [(3u8, 2u8), (0, 8), (8, 8), (255, 255)]
        .into_iter()
        .enumerate()
    {
        let id = (2 << 40) + i as u64;
        let c = send_raw(
            &mut w,
            &read_req(id, 0, &[seg(g, 0, 7), seg(g, first, last)]),
        );
        assert_eq!(c.status, Status::Error, "{first}..={last}");
    }
    let sectors = w.victim.front.info().sectors;
    let cases = [
        sectors,       // just past the end
        sectors - 7,   // straddles the end (8 sectors)
        u64::MAX - 3,  // overflows
        u64::MAX >> 9, // byte offset overflows
        1 << 60,       // far away
    ];
    for (i, sector) in cases.into_iter().enumerate() {
        let id = (3 << 40) + i as u64;
        let c = send_raw(&mut w, &read_req(id, sector, &[seg(g, 0, 7)]));
        assert_eq!(c.status, Status::Error, "sector {sector}");
        let wr = Request {
            kind: RequestKind::Write(DirectIo {
                sector,
                segments: Segments::from_slice(&[seg(g, 0, 7)]).unwrap(),
            }),
            ..read_req(id, 0, &[seg(g, 0, 0)])
        };
        assert_eq!(send_raw(&mut w, &wr).status, Status::Error);
    }
    // The last sector exactly is fine.
    let c = send_raw(&mut w, &read_req(4 << 40, sectors - 1, &[seg(g, 7, 7)]));
    assert_eq!(c.status, Status::Okay);
    victim_ok(&mut w);
    finish(w);
}

fn grant_misbehaviour(mb: Misbehave, persistent: bool, copy: bool) {
    let fe = FrontConfig {
        persistent,
        misbehave: mb.clone(),
        ..FrontConfig::default()
    };
    let mut w = world_with(
        |c| {
            if copy {
                c.data_path = xdisk_backend::DataPath::Copy;
            }
        },
        fe,
    );
    for sectors in [8u32, 256] {
        let c = w
            .victim
            .front
            .run(0, Op::Read { sector: 0, sectors })
            .unwrap();
        assert_eq!(c.status, Status::Error, "{mb:?} read {sectors}");
        if !mb.readonly_grants_for_reads {
            let op = Op::Write {
                sector: 0,
                data: vec![7; sectors as usize * 512],
            };
            assert_eq!(w.victim.front.run(0, op).unwrap().status, Status::Error);
        }
    }
    assert!(w.victim.device.stats().errors >= 2);
    assert_eq!(w.victim.device.state(), XenbusState::Connected);
    finish(w);
}

#[test]
fn bad_grant_refs() {
    for (persistent, copy) in [(false, false), (true, false), (false, true)] {
        for bad in [0u32, 12345, u32::MAX] {
            let mb = Misbehave {
                bad_gref: Some(bad),
                ..Misbehave::default()
            };
            grant_misbehaviour(mb, persistent, copy);
        }
    }
}

#[test]
fn revoked_grants() {
    for (persistent, copy) in [(false, false), (false, true)] {
        let mb = Misbehave {
            revoke_before_submit: true,
            ..Misbehave::default()
        };
        grant_misbehaviour(mb, persistent, copy);
    }
}

#[test]
fn read_only_grants_for_reads() {
    for (persistent, copy) in [(false, false), (false, true)] {
        let mb = Misbehave {
            readonly_grants_for_reads: true,
            ..Misbehave::default()
        };
        grant_misbehaviour(mb, persistent, copy);
    }
}

#[test]
fn read_only_grant_with_persistent_grants() {
    // With persistent grants the backend maps every grant writable (as Linux blkback): a
    // read-only grant is refused for reads, and still accepted for writes.
    let mut w = world();
    assert!(w.victim.front.info().persistent);
    let p = w.victim.front.alloc_page().unwrap();
    w.victim.front.write_page(p, 0, &pattern(3, 4096)).unwrap();
    let g = w.victim.front.grant_page(p, true).unwrap();
    let c = send_raw(&mut w, &read_req(5 << 40, 0, &[seg(g, 0, 7)]));
    assert_eq!(c.status, Status::Error);
    let wr = Request {
        id: (5 << 40) + 1,
        handle: 0,
        kind: RequestKind::Write(DirectIo {
            sector: 0,
            segments: Segments::from_slice(&[seg(g, 0, 7)]).unwrap(),
        }),
    };
    assert_eq!(send_raw(&mut w, &wr).status, Status::Okay);
    assert_eq!(w.victim.front.read(0, 8).unwrap(), pattern(3, 4096));
    // The read-only grant was not kept: it can be revoked.
    assert!(w.victim.front.end_grant(g).unwrap());
    finish(w);
}

#[test]
fn malformed_indirect() {
    let mb = Misbehave {
        bogus_indirect: true,
        ..Misbehave::default()
    };
    let fe = FrontConfig {
        misbehave: mb,
        ..FrontConfig::default()
    };
    let mut w = world_with(|_| {}, fe);
    let c = w
        .victim
        .front
        .run(
            0,
            Op::Read {
                sector: 0,
                sectors: 256,
            },
        )
        .unwrap();
    assert_eq!((c.status, c.operation), (Status::Error, BLKIF_OP_READ));
    // Direct requests are unaffected.
    let c = w
        .victim
        .front
        .run(
            0,
            Op::Read {
                sector: 0,
                sectors: 8,
            },
        )
        .unwrap();
    assert_eq!(c.status, Status::Okay);
    // Indirect page refs that are bad, revoked, or an indirect page count mismatch.
    let g = page(&mut w, true);
    for (i, grefs) in [vec![999_999u32], vec![0], vec![g]].into_iter().enumerate() {
        let ind = Request {
            id: (6 << 40) + i as u64,
            handle: 0,
            kind: RequestKind::Indirect(Indirect {
                op: IndirectOp::Write,
                sector: 0,
                nr_segments: 20,
                indirect_grefs: IndirectGrefs::from_slice(&grefs).unwrap(),
            }),
        };
        // The page of `g` is zeroed: 20 segments of gref 0, sectors 0..=0 - refs not granted.
        let c = send_raw(&mut w, &ind);
        assert_eq!((c.status, c.operation), (Status::Error, BLKIF_OP_WRITE));
    }
    // Indirect with an invalid indirect_op.
    let mut slot = [0u8; SLOT_SIZE];
    let ind = Request {
        id: 7 << 40,
        handle: 0,
        kind: RequestKind::Indirect(Indirect {
            op: IndirectOp::Read,
            sector: 0,
            nr_segments: 1,
            indirect_grefs: IndirectGrefs::from_slice(&[g]).unwrap(),
        }),
    };
    ind.write(w.victim.front.abi(), &mut slot);
    slot[1] = 5; // indirect_op = DISCARD
    assert_eq!(send_slot(&mut w, 7 << 40, &slot).status, Status::Error);
    victim_ok(&mut w);
    finish(w);
}

#[test]
fn unknown_ops() {
    let mut w = world();
    for (i, op) in [4u8, 7, 42, 200, 255].into_iter().enumerate() {
        let id = (8 << 40) + i as u64;
        let mut slot = [0u8; SLOT_SIZE];
        read_req(id, 0, &[seg(0, 0, 0)]).write(w.victim.front.abi(), &mut slot);
        slot[0] = op;
        let c = send_slot(&mut w, id, &slot);
        assert_eq!((c.status, c.operation), (Status::EOpNotSupp, op));
    }
    // Indirect while the backend advertises none.
    assert!(w.victim.device.stats().eopnotsupp >= 5);
    victim_ok(&mut w);
    finish(w);
}

#[test]
fn indirect_not_advertised() {
    let mut w = world_with(|c| c.max_indirect_segments = 0, FrontConfig::default());
    assert_eq!(w.victim.front.info().max_indirect_segments, 0);
    let g = page(&mut w, false);
    let ind = Request {
        id: 9 << 40,
        handle: 0,
        kind: RequestKind::Indirect(Indirect {
            op: IndirectOp::Read,
            sector: 0,
            nr_segments: 1,
            indirect_grefs: IndirectGrefs::from_slice(&[g]).unwrap(),
        }),
    };
    let c = send_raw(&mut w, &ind);
    assert_eq!((c.status, c.operation), (Status::EOpNotSupp, BLKIF_OP_READ));
    assert_ne!(c.operation, BLKIF_OP_INDIRECT);
    finish(w);
}

#[test]
fn flood() {
    let fe = FrontConfig {
        max_ring_page_order: 0,
        ..FrontConfig::default()
    };
    let mut w = world_with(|_| {}, fe);
    let size = w.victim.front.info().ring_size as u64;
    let queues = w.victim.front.info().queues;
    let mut outstanding = 0usize;
    let mut done = 0usize;
    let total = 4000usize;
    let mut sent = 0usize;
    let mut max_in_flight = 0u64;
    while done < total {
        while sent < total {
            let q = sent % queues;
            let op = if sent.is_multiple_of(3) {
                Op::Write {
                    sector: (sent as u64 * 8) % 4096,
                    data: vec![sent as u8; 4096],
                }
            } else {
                Op::Read {
                    sector: (sent as u64 * 8) % 4096,
                    sectors: 8,
                }
            };
            match w.victim.front.submit(q, op) {
                Ok(_) => {
                    sent += 1;
                    outstanding += 1;
                }
                Err(xdisk_blkfront::Error::RingFull(_)) => break,
                Err(e) => panic!("{e}"),
            }
        }
        max_in_flight = max_in_flight.max(w.victim.device.stats().in_flight);
        for c in w.victim.front.poll(Duration::from_secs(5)).unwrap() {
            assert_eq!(c.status, Status::Okay);
            done += 1;
            outstanding -= 1;
        }
    }
    assert_eq!(outstanding, 0);
    assert!(max_in_flight <= size * queues as u64, "{max_in_flight}");
    let s = w.victim.device.stats();
    assert_eq!(s.rd_req + s.wr_req, total as u64);
    assert_eq!(s.responses, total as u64);
    // Raw flood: fill the ring with garbage slots (random bytes) in one go.
    let mut slot = [0u8; SLOT_SIZE];
    let n = w.victim.front.free_slots(0);
    for i in 0..n {
        slot.copy_from_slice(&pattern(u64::from(i), SLOT_SIZE));
        w.victim.front.push_raw(0, &slot).unwrap();
    }
    w.victim.front.publish(0).unwrap();
    let mut got = 0;
    while got < n {
        let c = w.victim.front.poll(Duration::from_secs(5)).unwrap();
        assert!(!c.is_empty(), "garbage slots answered");
        got += c.len() as u32;
    }
    victim_ok(&mut w);
    finish(w);
}

/// Connecting with `mb` fails; the backend reports an error and closes, leaking nothing.
fn bad_connect(mb: Misbehave) {
    let host = host();
    let d1 = raw_disk(MIB);
    let d2 = raw_disk(MIB);
    let mut by = pair(
        &host,
        BYSTANDER,
        768,
        open_image(&d2.path, false),
        |_| {},
        FrontConfig::default(),
    );
    let dom = host.xen.create_domain(VICTIM, GUEST_PAGES).unwrap();
    host.add_vbd(VICTIM, 768, "w", &[]);
    let device = start_device(
        &host,
        device_config(VICTIM, 768),
        open_image(&d1.path, false),
    );
    let fe = FrontConfig {
        misbehave: mb.clone(),
        timeout: Duration::from_secs(5),
        ..FrontConfig::default()
    };
    let r = Frontend::connect(
        dom.xenstore().unwrap(),
        dom.clone(),
        &fe_dir(VICTIM, 768),
        fe,
    );
    assert!(r.is_err(), "{mb:?}: connected");
    wait_until("victim closed", Duration::from_secs(10), || {
        device.state() == XenbusState::Closed
    });
    assert!(host
        .read(&format!("{}/error", be_dir(VICTIM, 768)))
        .is_some());
    let s = device.stats();
    assert_eq!(
        (s.mappings, s.queues, s.connects),
        (0, 0, 0),
        "{mb:?} {s:?}"
    );
    let data = pattern(9, 8192);
    by.front.write(0, &data).unwrap();
    assert_eq!(by.front.read(0, 16).unwrap(), data);
    assert_eq!(host.xen.event_channel_count(0), by.front.info().queues);
    device.shutdown().unwrap();
    by.front.disconnect().unwrap();
    by.device.shutdown().unwrap();
}

#[test]
fn garbage_ring_ref() {
    for v in ["", "abc", "-1", "4294967296", "99999", "0", " 8", "1e3"] {
        bad_connect(Misbehave {
            ring_ref: Some(v.into()),
            ..Misbehave::default()
        });
    }
}

#[test]
fn garbage_event_channel() {
    for v in ["", "x", "99999", "0", "4294967295", "12 "] {
        bad_connect(Misbehave {
            event_channel: Some(v.into()),
            ..Misbehave::default()
        });
    }
}

#[test]
fn garbage_protocol() {
    for v in [
        "",
        "x86_16-abi",
        "arm-abi",
        "x86_64-abi\n",
        &"A".repeat(3000),
    ] {
        bad_connect(Misbehave {
            protocol: Some(v.to_string()),
            ..Misbehave::default()
        });
    }
    for (k, v) in [
        ("ring-page-order", "9"),
        ("multi-queue-num-queues", "100"),
        ("multi-queue-num-queues", "0"),
        ("feature-persistent", "yes"),
    ] {
        bad_connect(Misbehave {
            extra_nodes: vec![(k.into(), v.into())],
            ..Misbehave::default()
        });
    }
}

#[test]
fn frontend_vanishes_mid_io() {
    for persistent in [false, true] {
        let fe = FrontConfig {
            persistent,
            ..FrontConfig::default()
        };
        let mut w = world_with(|_| {}, fe);
        let threads_before = thread_count();
        let queues = w.victim.front.info().queues;
        for i in 0..200u64 {
            let q = i as usize % queues;
            let op = if i % 2 == 0 {
                Op::Write {
                    sector: i * 16 % 8000,
                    data: vec![i as u8; 64 * 1024],
                }
            } else {
                Op::Read {
                    sector: i * 16 % 8000,
                    sectors: 128,
                }
            };
            if w.victim.front.submit(q, op).is_err() {
                break;
            }
        }
        // The guest dies with requests in flight.
        let World {
            host,
            victim,
            mut bystander,
            _disks,
        } = w;
        let Pair { device, front, .. } = victim;
        front.vanish().unwrap();
        wait_until("victim device finishes", Duration::from_secs(10), || {
            device.is_finished()
        });
        let s = device.stats();
        assert_eq!((s.mappings, s.queues, s.in_flight), (0, 0, 0), "{s:?}");
        assert_eq!(s.persistent_grants, 0);
        device.wait().unwrap();
        let data = pattern(4, 96 * 1024);
        bystander.front.write(40, &data).unwrap();
        assert!(bystander.front.read(40, 192).unwrap() == data);
        // Reactor threads (and their image queues' workers) are gone.
        wait_until("threads exit", Duration::from_secs(10), || {
            thread_count() < threads_before
        });
        assert_eq!(
            host.xen.event_channel_count(0),
            bystander.front.info().queues
        );
        bystander.front.disconnect().unwrap();
        bystander.device.shutdown().unwrap();
    }
}

#[test]
fn online_zero_closes() {
    let mut w = world();
    let be = be_dir(VICTIM, 768);
    w.host
        .toolstack
        .write(&format!("{be}/online"), "0")
        .unwrap();
    wait_until("backend Closing", Duration::from_secs(10), || {
        matches!(
            w.victim.device.state(),
            XenbusState::Closing | XenbusState::Closed
        )
    });
    assert_eq!(w.victim.device.stats().mappings, 0);
    // The frontend follows: Closing, Closed; the device then finishes.
    w.victim.front.disconnect().unwrap();
    assert_eq!(w.victim.front.leaked_grants(), 0);
    wait_until("device finished", Duration::from_secs(10), || {
        w.victim.device.is_finished()
    });
    assert_eq!(w.victim.device.state(), XenbusState::Closed);
    bystander_ok(&mut w, 8);
}

#[test]
fn frontend_state_garbage_and_unknown() {
    let mut w = world();
    let fe = fe_dir(VICTIM, 768);
    let xs = w.victim.front.xenstore();
    for v in ["banana", "", "99", "-1", "4 "] {
        xs.write(&format!("{fe}/state"), v).unwrap();
    }
    // Ignored: still connected and serving.
    std::thread::sleep(Duration::from_millis(100));
    victim_ok(&mut w);
    // XenbusStateUnknown: the device goes away, as Linux blkback unregisters it.
    w.victim
        .front
        .xenstore()
        .write(&format!("{fe}/state"), "0")
        .unwrap();
    wait_until("device finished", Duration::from_secs(10), || {
        w.victim.device.is_finished()
    });
    let s = w.victim.device.stats();
    assert_eq!((s.mappings, s.queues), (0, 0));
    bystander_ok(&mut w, 6);
}
