//! The simulated Xen host: grant mapping and copying against a grant table in shared memory,
//! hostile grant entries, zero-copy I/O into mapped guest pages, event channels, domain
//! lifecycle and xenstore.

use std::io::Write;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use proptest::prelude::*;
use xdisk_io::{open_engine, AioKind, Completion, Engine, EngineConfig, IoBuf, Op, OpKind};
use xdisk_xen::iobuf::{GrantIoBuf, GrantSegment};
use xdisk_xen::platform::{
    CopyDir, GrantCopyOp, GrantRef, GrantStatus, MappedRegion, PlatformError, SharedMem,
};
use xdisk_xensim::mem::{poll_readable, PAGE_SIZE};
use xdisk_xensim::{
    SimDomain, SimError, SimXen, GTF_PERMIT_ACCESS, GTF_READING, GTF_READONLY, GTF_SUB_PAGE,
    GTF_WRITING,
};

const BACKEND: u16 = 0;
const GUEST: u16 = 5;
const T: Duration = Duration::from_secs(10);

/// Reads (or writes) `buf` at `offset` of `fd` through `engine`; waits for the completion.
fn io_and_wait(
    engine: &mut dyn Engine<GrantIoBuf>,
    kind: OpKind,
    fd: std::os::fd::RawFd,
    offset: u64,
    buf: GrantIoBuf,
) -> Completion<GrantIoBuf> {
    engine
        .submit(Op {
            kind,
            fd,
            offset,
            buf: Some(buf),
            user_data: 1,
        })
        .map_err(|(_, e)| e)
        .unwrap();
    let mut out: Vec<Completion<GrantIoBuf>> = Vec::new();
    while out.is_empty() {
        engine.reap(&mut out, 1, Some(T)).unwrap();
    }
    out.remove(0)
}

fn host(pages: usize) -> (Arc<SimXen>, Arc<SimDomain>) {
    let xen = SimXen::new().unwrap();
    let guest = xen.create_domain(GUEST, pages).unwrap();
    (xen, guest)
}

/// A recognisable page: byte i is `seed + i` mixed with the page index.
fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| seed.wrapping_mul(31).wrapping_add(i as u8) ^ ((i / 256) as u8))
        .collect()
}

fn fill_page(guest: &SimDomain, idx: usize, seed: u8) -> Vec<u8> {
    let data = pattern(seed, PAGE_SIZE);
    guest.page(idx).unwrap().copy_to(0, &data).unwrap();
    data
}

fn read_all(region: &dyn MappedRegion) -> Vec<u8> {
    let mut v = vec![0u8; region.size()];
    region.copy_from(0, &mut v).unwrap();
    v
}

fn grant_status<T>(r: Result<T, PlatformError>) -> GrantStatus {
    match r {
        Err(PlatformError::Grant { status, .. }) => status,
        Err(e) => panic!("expected a grant error, got {e}"),
        Ok(_) => panic!("expected a grant error, got success"),
    }
}

#[test]
fn readonly_grant_maps_and_reads() {
    let (xen, guest) = host(16);
    let data = fill_page(&guest, 7, 1);
    let gref = guest.grant(7, BACKEND, true).unwrap();
    let mapper = xen.grant_mapper(BACKEND);
    let region = mapper.map(GUEST, &[gref], false).unwrap();
    assert_eq!(region.size(), PAGE_SIZE);
    assert!(!region.writable());
    assert_eq!(read_all(&*region), data);
    assert_eq!(
        region.read_u32_volatile(4).unwrap(),
        u32::from_le_bytes(data[4..8].try_into().unwrap())
    );
    // Writes through a read-only mapping are refused, not faulted.
    assert!(region.copy_to(0, &[1]).is_err());
    assert!(region.write_u32_volatile(0, 1).is_err());
    // The guest's later writes are visible through the mapping (shared memory, not a copy).
    guest.page(7).unwrap().copy_to(100, b"live").unwrap();
    let mut b = [0u8; 4];
    region.copy_from(100, &mut b).unwrap();
    assert_eq!(&b, b"live");
    let e = guest.grant_entry(gref).unwrap();
    assert_eq!(e.flags & (GTF_READING | GTF_WRITING), GTF_READING);
    drop(region);
    assert_eq!(guest.grant_entry(gref).unwrap().flags & GTF_READING, 0);
}

#[test]
fn writable_grant_maps_and_writes() {
    let (xen, guest) = host(4);
    let gref = guest.grant(2, BACKEND, false).unwrap();
    let region = xen.grant_mapper(BACKEND).map(GUEST, &[gref], true).unwrap();
    assert!(region.writable());
    assert_eq!(
        guest.grant_entry(gref).unwrap().flags & (GTF_READING | GTF_WRITING),
        GTF_READING | GTF_WRITING
    );
    region.copy_to(4090, b"abcdef").unwrap();
    region.write_u32_volatile(8, 0xdead_beef).unwrap();
    let mut b = [0u8; 6];
    guest.page(2).unwrap().copy_from(4090, &mut b).unwrap();
    assert_eq!(&b, b"abcdef");
    assert_eq!(
        guest.page(2).unwrap().read_u32_volatile(8).unwrap(),
        0xdead_beef
    );
    assert!(region.copy_to(4091, b"abcdef").is_err(), "past the page");
    // A writable grant may also be mapped read-only.
    let ro = xen
        .grant_mapper(BACKEND)
        .map(GUEST, &[gref], false)
        .unwrap();
    assert_eq!(guest.grant_pin_count(gref), 2);
    drop(region);
    assert_eq!(
        guest.grant_entry(gref).unwrap().flags & (GTF_READING | GTF_WRITING),
        GTF_READING,
        "GTF_writing goes with the last writable mapping"
    );
    drop(ro);
    assert_eq!(guest.grant_pin_count(gref), 0);
    assert!(guest.end_grant(gref).unwrap());
}

#[test]
fn writable_map_of_readonly_grant_is_denied() {
    let (xen, guest) = host(4);
    let gref = guest.grant(1, BACKEND, true).unwrap();
    let mapper = xen.grant_mapper(BACKEND);
    assert_eq!(
        grant_status(mapper.map(GUEST, &[gref], true)),
        GrantStatus::PermissionDenied
    );
    assert_eq!(guest.grant_pin_count(gref), 0);
    assert_eq!(
        guest.grant_entry(gref).unwrap().flags,
        GTF_PERMIT_ACCESS | GTF_READONLY
    );
    // A multi-page map with one bad grant fails as a whole and leaves no pins behind.
    let good = guest.grant(2, BACKEND, false).unwrap();
    assert_eq!(
        grant_status(mapper.map(GUEST, &[good, gref], true)),
        GrantStatus::PermissionDenied
    );
    assert_eq!(guest.grant_pin_count(good), 0);
    assert_eq!(guest.grant_entry(good).unwrap().flags, GTF_PERMIT_ACCESS);
    assert!(guest.end_grant(good).unwrap());
}

#[test]
fn grant_for_another_domain_is_refused() {
    let (xen, guest) = host(4);
    let _other = xen.create_domain(9, 1).unwrap();
    let gref = guest.grant(0, 9, false).unwrap();
    assert_eq!(
        grant_status(xen.grant_mapper(BACKEND).map(GUEST, &[gref], false)),
        GrantStatus::PermissionDenied
    );
    // Domain 9 may map it.
    let r = xen.grant_mapper(9).map(GUEST, &[gref], true).unwrap();
    assert!(r.writable());
    // Unknown granting domain.
    assert_eq!(
        grant_status(xen.grant_mapper(BACKEND).map(77, &[gref], false)),
        GrantStatus::BadDomain
    );
}

#[test]
fn end_grant_fails_while_mapped() {
    let (xen, guest) = host(4);
    let gref = guest.grant(3, BACKEND, false).unwrap();
    let region = xen.grant_mapper(BACKEND).map(GUEST, &[gref], true).unwrap();
    assert!(!guest.end_grant(gref).unwrap());
    assert!(!guest.end_grant(gref).unwrap());
    // The grant stays usable meanwhile.
    let second = xen
        .grant_mapper(BACKEND)
        .map(GUEST, &[gref], false)
        .unwrap();
    drop(region);
    assert!(!guest.end_grant(gref).unwrap(), "still mapped read-only");
    drop(second);
    assert!(guest.end_grant(gref).unwrap());
    assert_eq!(guest.grant_entry(gref).unwrap().flags, 0);
    assert!(matches!(
        guest.end_grant(guest.grant_entries()),
        Err(SimError::BadGrantRef { .. })
    ));
}

#[test]
fn revoked_grant_cannot_be_mapped_or_copied() {
    let (xen, guest) = host(4);
    let gref = guest.grant(0, BACKEND, false).unwrap();
    assert!(guest.end_grant(gref).unwrap());
    let mapper = xen.grant_mapper(BACKEND);
    assert_eq!(
        grant_status(mapper.map(GUEST, &[gref], false)),
        GrantStatus::PermissionDenied
    );
    let mut buf = [0u8; 16];
    let mut ops = [GrantCopyOp {
        domid: GUEST,
        gref,
        offset: 0,
        dir: CopyDir::FromForeign(&mut buf),
        status: GrantStatus::Okay,
    }];
    mapper.copy(&mut ops).unwrap();
    assert_eq!(ops[0].status, GrantStatus::PermissionDenied);
    // The reference is reused by the next grant.
    assert_eq!(guest.grant(1, BACKEND, true).unwrap(), gref);
}

/// What a request failed at its deadline needs (the storage may still use its memory): the
/// pages it covers leave the mapping at once (same addresses, private memory, grants given
/// back so the guest can end its access), the other pages stay the guest's.
#[test]
fn detached_pages_leave_the_guest_at_once_and_keep_their_addresses() {
    let (xen, guest) = host(8);
    let data: Vec<Vec<u8>> = (0..3).map(|i| fill_page(&guest, i, 10 + i as u8)).collect();
    let refs: Vec<GrantRef> = (0..3)
        .map(|i| guest.grant(i, BACKEND, false).unwrap())
        .collect();
    let region = xen.grant_mapper(BACKEND).map(GUEST, &refs, true).unwrap();
    let base = region.io_base();
    assert!(region.can_detach(PAGE_SIZE + 100, 200));
    assert!(
        !region.can_detach(2 * PAGE_SIZE, PAGE_SIZE + 1),
        "past the end"
    );
    assert!(!region.is_detached(0, 3 * PAGE_SIZE));
    // Bytes 100..300 of page 1: the whole page goes.
    region.detach(PAGE_SIZE + 100, 200).unwrap();
    assert_eq!(region.io_base(), base, "same addresses");
    assert!(region.is_detached(PAGE_SIZE, 1));
    assert!(!region.is_detached(0, PAGE_SIZE));
    assert!(!region.is_detached(2 * PAGE_SIZE, PAGE_SIZE));
    assert!(region.is_detached(0, 3 * PAGE_SIZE));
    // The guest may end its access to that page now, not to the others.
    assert!(guest.end_grant(refs[1]).unwrap());
    assert!(!guest.end_grant(refs[0]).unwrap());
    assert!(!guest.end_grant(refs[2]).unwrap());
    // Late accesses (a storage still writing) reach private zeroed memory, never the guest.
    let mut page = vec![1u8; PAGE_SIZE];
    region.copy_from(PAGE_SIZE, &mut page).unwrap();
    assert_eq!(page, vec![0u8; PAGE_SIZE]);
    region.copy_to(PAGE_SIZE, &vec![0xa5; PAGE_SIZE]).unwrap();
    // ... also a read by the kernel into a buffer made before the detach (a late storage).
    let f = tempfile::tempfile().unwrap();
    (&f).write_all(&vec![0x5a; PAGE_SIZE]).unwrap();
    let mut engine = open_engine::<GrantIoBuf>(AioKind::Threads, &EngineConfig::default()).unwrap();
    let buf = GrantIoBuf::new(
        vec![GrantSegment::new(region.clone(), PAGE_SIZE, PAGE_SIZE)],
        true,
    )
    .unwrap();
    assert!(buf.lendable());
    let done = io_and_wait(&mut *engine, OpKind::Read, f.as_raw_fd(), 0, buf);
    assert_eq!(*done.result.as_ref().unwrap(), PAGE_SIZE);
    let mut g = vec![0u8; PAGE_SIZE];
    region.copy_from(PAGE_SIZE, &mut g).unwrap();
    assert_eq!(
        g,
        vec![0x5a; PAGE_SIZE],
        "the read landed in the private page"
    );
    guest.page(1).unwrap().copy_from(0, &mut g).unwrap();
    assert_eq!(g, data[1], "the guest's page is untouched");
    // The pages that stay are still shared both ways.
    region.copy_to(2 * PAGE_SIZE, b"still").unwrap();
    guest.page(2).unwrap().copy_from(0, &mut g[..5]).unwrap();
    assert_eq!(&g[..5], b"still");
    assert_eq!(read_all(&*region)[..PAGE_SIZE], data[0][..]);
    // Idempotent; then all of it.
    region.detach(PAGE_SIZE, PAGE_SIZE).unwrap();
    let mut all = GrantIoBuf::new(
        vec![
            GrantSegment::new(region.clone(), 512, 2 * PAGE_SIZE),
            GrantSegment::new(region.clone(), 2 * PAGE_SIZE + 512, 512),
        ],
        true,
    )
    .unwrap();
    all.detach_foreign().unwrap();
    drop(all);
    assert!(guest.end_grant(refs[0]).unwrap());
    assert!(guest.end_grant(refs[2]).unwrap());
    assert!(
        region.detach(0, 3 * PAGE_SIZE + 1).is_err(),
        "out of bounds"
    );
    drop(region);
    for (i, d) in data.iter().enumerate().filter(|(i, _)| *i != 2) {
        let mut g = vec![0u8; PAGE_SIZE];
        guest.page(i).unwrap().copy_from(0, &mut g).unwrap();
        assert_eq!(&g, d, "page {i}");
    }
}

fn check_multi_page(n: usize) {
    let (xen, guest) = host(64);
    // Non-consecutive frames, in a scrambled order.
    let frames: Vec<usize> = (0..n).map(|i| (i * 37 + 11) % 64).collect();
    let mut expected = Vec::new();
    let mut refs = Vec::new();
    for (i, &f) in frames.iter().enumerate() {
        expected.extend(fill_page(&guest, f, i as u8 + 1));
        refs.push(guest.grant(f, BACKEND, false).unwrap());
    }
    let mapper = xen.grant_mapper(BACKEND);
    let region = mapper.map(GUEST, &refs, true).unwrap();
    assert_eq!(region.size(), n * PAGE_SIZE);
    assert_eq!(read_all(&*region), expected);
    // A write across a page boundary lands in the two right frames.
    let at = PAGE_SIZE - 3;
    region.copy_to(at, b"ABCDEF").unwrap();
    let mut b = [0u8; 3];
    guest
        .page(frames[0])
        .unwrap()
        .copy_from(PAGE_SIZE - 3, &mut b)
        .unwrap();
    assert_eq!(&b, b"ABC");
    guest.page(frames[1]).unwrap().copy_from(0, &mut b).unwrap();
    assert_eq!(&b, b"DEF");
    for &r in &refs {
        assert!(!guest.end_grant(r).unwrap());
    }
    drop(region);
    for &r in &refs {
        assert!(guest.end_grant(r).unwrap());
    }
}

#[test]
fn multi_page_mapping_is_contiguous_4() {
    check_multi_page(4);
}

#[test]
fn multi_page_mapping_is_contiguous_16() {
    check_multi_page(16);
}

#[test]
fn map_limits() {
    let (xen, guest) = host(2);
    let mapper = xen.grant_mapper(BACKEND);
    assert!(matches!(
        mapper.map(GUEST, &[], false),
        Err(PlatformError::TooLarge(0))
    ));
    let g = guest.grant(0, BACKEND, false).unwrap();
    let many = vec![g; xdisk_xensim::MAX_MAP_PAGES + 1];
    assert!(matches!(
        mapper.map(GUEST, &many, false),
        Err(PlatformError::TooLarge(_))
    ));
    // The same grant twice in one mapping: two views of one page, two pins.
    let twice = mapper.map(GUEST, &[g, g], true).unwrap();
    assert_eq!(guest.grant_pin_count(g), 2);
    twice.copy_to(0, b"x").unwrap();
    let mut b = [0u8; 1];
    twice.copy_from(PAGE_SIZE, &mut b).unwrap();
    assert_eq!(&b, b"x");
    drop(twice);
    assert_eq!(guest.grant_pin_count(g), 0);
}

#[test]
fn grant_copy_both_directions() {
    let (xen, guest) = host(8);
    let data = fill_page(&guest, 4, 9);
    let ro = guest.grant(4, BACKEND, true).unwrap();
    let rw = guest.grant(5, BACKEND, false).unwrap();
    let other = guest.grant(6, 3, false).unwrap();
    let mapper = xen.grant_mapper(BACKEND);

    let mut a = vec![0u8; 100];
    let mut b = vec![0u8; 10];
    let mut c = vec![0u8; 1];
    let mut d = vec![0u8; 8];
    let mut e = vec![0u8; 8];
    let mut ops = vec![
        GrantCopyOp {
            domid: GUEST,
            gref: ro,
            offset: 50,
            dir: CopyDir::FromForeign(&mut a),
            status: GrantStatus::GeneralError,
        },
        GrantCopyOp {
            domid: GUEST,
            gref: rw,
            offset: 4090,
            dir: CopyDir::ToForeign(b"0123456"),
            status: GrantStatus::Okay,
        },
        GrantCopyOp {
            domid: GUEST,
            gref: rw,
            offset: 4086,
            dir: CopyDir::ToForeign(b"xyzw"),
            status: GrantStatus::Okay,
        },
        GrantCopyOp {
            domid: GUEST,
            gref: ro,
            offset: 0,
            dir: CopyDir::ToForeign(b"nope"),
            status: GrantStatus::Okay,
        },
        GrantCopyOp {
            domid: GUEST,
            gref: ro,
            offset: 4095,
            dir: CopyDir::FromForeign(&mut c),
            status: GrantStatus::Okay,
        },
        GrantCopyOp {
            domid: GUEST,
            gref: ro,
            offset: 4095,
            dir: CopyDir::FromForeign(&mut b),
            status: GrantStatus::Okay,
        },
        GrantCopyOp {
            domid: GUEST,
            gref: other,
            offset: 0,
            dir: CopyDir::FromForeign(&mut d),
            status: GrantStatus::Okay,
        },
        GrantCopyOp {
            domid: GUEST,
            gref: guest.grant_entries() + 5,
            offset: 0,
            dir: CopyDir::FromForeign(&mut e),
            status: GrantStatus::Okay,
        },
        GrantCopyOp {
            domid: 99,
            gref: rw,
            offset: 0,
            dir: CopyDir::ToForeign(b"z"),
            status: GrantStatus::Okay,
        },
    ];
    mapper.copy(&mut ops).unwrap();
    let statuses: Vec<GrantStatus> = ops.iter().map(|o| o.status).collect();
    drop(ops);
    assert_eq!(
        statuses,
        vec![
            GrantStatus::Okay,
            GrantStatus::BadCopyArg,
            GrantStatus::Okay,
            GrantStatus::PermissionDenied,
            GrantStatus::Okay,
            GrantStatus::BadCopyArg,
            GrantStatus::PermissionDenied,
            GrantStatus::BadGntref,
            GrantStatus::BadDomain,
        ]
    );
    assert_eq!(a, data[50..150]);
    assert_eq!(c[0], data[4095]);
    let mut page5 = vec![0u8; PAGE_SIZE];
    guest.page(5).unwrap().copy_from(0, &mut page5).unwrap();
    assert_eq!(&page5[4086..4090], b"xyzw");
    assert!(
        page5[4090..].iter().all(|&x| x == 0),
        "failed op wrote nothing"
    );
    // Copies leave no pins behind.
    for g in [ro, rw] {
        assert_eq!(guest.grant_pin_count(g), 0);
        assert!(guest.end_grant(g).unwrap());
    }
}

#[test]
fn hostile_entries_are_refused() {
    let (xen, guest) = host(8);
    let mapper = xen.grant_mapper(BACKEND);
    let g: GrantRef = 100;
    let cases: &[(u16, u16, u32, GrantStatus)] = &[
        // frame past the end of memory
        (GTF_PERMIT_ACCESS, BACKEND, 8, GrantStatus::GeneralError),
        (
            GTF_PERMIT_ACCESS,
            BACKEND,
            u32::MAX,
            GrantStatus::GeneralError,
        ),
        // domid mismatch
        (GTF_PERMIT_ACCESS, 1, 0, GrantStatus::PermissionDenied),
        (
            GTF_PERMIT_ACCESS,
            u16::MAX,
            0,
            GrantStatus::PermissionDenied,
        ),
        // garbage flags: other entry types, sub-page, invalid
        (0, BACKEND, 0, GrantStatus::PermissionDenied),
        (2, BACKEND, 0, GrantStatus::PermissionDenied),
        (3, BACKEND, 0, GrantStatus::PermissionDenied),
        (0xfffe, BACKEND, 0, GrantStatus::PermissionDenied),
        (
            GTF_PERMIT_ACCESS | GTF_SUB_PAGE,
            BACKEND,
            0,
            GrantStatus::PermissionDenied,
        ),
        (0xffff, BACKEND, 0, GrantStatus::PermissionDenied),
    ];
    for &(flags, domid, frame, want) in cases {
        guest.write_grant_entry_raw(g, flags, domid, frame).unwrap();
        for writable in [false, true] {
            assert_eq!(
                grant_status(mapper.map(GUEST, &[g], writable)),
                want,
                "flags {flags:#x} domid {domid} frame {frame}"
            );
        }
        let mut buf = [0u8; 4];
        let mut ops = [GrantCopyOp {
            domid: GUEST,
            gref: g,
            offset: 0,
            dir: CopyDir::FromForeign(&mut buf),
            status: GrantStatus::Okay,
        }];
        mapper.copy(&mut ops).unwrap();
        assert_eq!(ops[0].status, want);
        assert_eq!(guest.grant_pin_count(g), 0);
    }
    // Hostile but valid-looking flags set by the guest itself (GTF_reading/writing, cache
    // attributes) do not stop a map.
    guest
        .write_grant_entry_raw(
            g,
            GTF_PERMIT_ACCESS | GTF_READING | GTF_WRITING | 0xe0,
            BACKEND,
            7,
        )
        .unwrap();
    let r = mapper.map(GUEST, &[g], true).unwrap();
    drop(r);
    assert_eq!(
        guest.grant_entry(g).unwrap().flags,
        GTF_PERMIT_ACCESS | 0xe0,
        "unmap clears reading/writing"
    );
    // Out-of-range references.
    assert!(matches!(
        guest.write_grant_entry_raw(guest.grant_entries(), 1, 0, 0),
        Err(SimError::BadGrantRef { .. })
    ));
    assert_eq!(
        grant_status(mapper.map(GUEST, &[u32::MAX], false)),
        GrantStatus::BadGntref
    );
}

#[test]
fn guest_changing_entries_during_maps_never_crashes() {
    let (xen, guest) = host(8);
    for i in 0..8 {
        fill_page(&guest, i, i as u8);
    }
    let g: GrantRef = 50;
    let stop = Arc::new(AtomicBool::new(false));
    let flips = Arc::new(AtomicU64::new(0));
    let flipper = {
        let guest = guest.clone();
        let stop = stop.clone();
        let flips = flips.clone();
        thread::spawn(move || {
            let mut x: u32 = 12345;
            while !stop.load(Ordering::Relaxed) {
                x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
                let flags = match x % 5 {
                    0 => 0,
                    1 => GTF_PERMIT_ACCESS | GTF_READONLY,
                    2 => (x >> 16) as u16,
                    _ => GTF_PERMIT_ACCESS,
                };
                let domid = if x.is_multiple_of(7) { 3 } else { BACKEND };
                let frame = (x >> 8) % 12; // sometimes past the end
                guest.write_grant_entry_raw(g, flags, domid, frame).unwrap();
                let _ = guest.end_grant(g);
                flips.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    let mapper = xen.grant_mapper(BACKEND);
    let (mut ok, mut failed) = (0, 0);
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut i = 0u32;
    // At least 3000 maps, and at least 1000 entry changes during them (the two threads share
    // few cores).
    while i < 3000 || (flips.load(Ordering::Relaxed) < 1000 && Instant::now() < deadline) {
        i += 1;
        let writable = i.is_multiple_of(2);
        match mapper.map(GUEST, &[g, g], writable) {
            Ok(r) => {
                ok += 1;
                // Whatever frame it is, it is one of the guest's pages: byte 1 of page k is
                // k*31 + 1 (see `pattern`).
                let mut b = [0u8; 2];
                r.copy_from(0, &mut b).unwrap();
                assert!((0..8u8).any(|k| b[1] == k.wrapping_mul(31).wrapping_add(1)));
                if writable {
                    r.copy_to(2000, &[1, 2, 3]).unwrap();
                }
            }
            Err(PlatformError::Grant { .. }) => failed += 1,
            Err(e) => panic!("unexpected error {e}"),
        }
        let mut buf = [0u8; 8];
        let mut ops = [GrantCopyOp {
            domid: GUEST,
            gref: g,
            offset: 8,
            dir: CopyDir::FromForeign(&mut buf),
            status: GrantStatus::Okay,
        }];
        mapper.copy(&mut ops).unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    flipper.join().unwrap();
    assert!(flips.load(Ordering::Relaxed) > 0);
    assert_eq!(ok + failed, i);
    assert_eq!(guest.grant_pin_count(g), 0);
}

#[test]
fn end_grant_never_succeeds_while_mapped() {
    let (xen, guest) = host(2);
    let g: GrantRef = 60;
    guest
        .write_grant_entry_raw(g, GTF_PERMIT_ACCESS, BACKEND, 1)
        .unwrap();
    // Odd while the backend holds a mapping (set after map returns, cleared before unmap).
    let epoch = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let backend = {
        let (xen, epoch, stop) = (xen.clone(), epoch.clone(), stop.clone());
        thread::spawn(move || {
            let mapper = xen.grant_mapper(BACKEND);
            let mut maps = 0u64;
            while !stop.load(Ordering::Relaxed) {
                if let Ok(r) = mapper.map(GUEST, &[g], true) {
                    epoch.fetch_add(1, Ordering::SeqCst);
                    r.copy_to(0, &[1]).unwrap();
                    epoch.fetch_add(1, Ordering::SeqCst);
                    drop(r);
                    maps += 1;
                }
            }
            maps
        })
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut revoked = 0u32;
    let mut refused = 0u32;
    while (revoked < 500 || refused < 50) && Instant::now() < deadline {
        let e1 = epoch.load(Ordering::SeqCst);
        let ended = guest.end_grant(g).unwrap();
        let e2 = epoch.load(Ordering::SeqCst);
        if ended {
            assert!(
                !(e1 == e2 && e1 % 2 == 1),
                "end_grant succeeded while the backend held a mapping"
            );
            revoked += 1;
            guest
                .write_grant_entry_raw(g, GTF_PERMIT_ACCESS, BACKEND, 1)
                .unwrap();
        } else {
            refused += 1;
        }
    }
    stop.store(true, Ordering::Relaxed);
    let maps = backend.join().unwrap();
    assert!(revoked > 0 && maps > 0, "revoked {revoked}, maps {maps}");
    assert_eq!(guest.grant_pin_count(g), 0);
}

/// Reads a file region into granted guest pages and writes guest pages back to the file
/// through an I/O engine, with the iovecs pointing into the grant mappings.
fn engine_round_trip(kind: AioKind) {
    let (xen, guest) = host(32);
    let mut file = tempfile::tempfile().unwrap();
    let disk: Vec<u8> = (0..8 * PAGE_SIZE).map(|i| (i * 7 % 251) as u8).collect();
    file.write_all(&disk).unwrap();
    let fd = file.as_raw_fd();
    let mapper = xen.grant_mapper(BACKEND);

    // A guest read of 3 sectors-worth of pages into scattered frames [9, 2, 20], with the
    // second segment being a part of a page (like blkif first_sect/last_sect).
    let frames = [9usize, 2, 20];
    let refs: Vec<GrantRef> = frames
        .iter()
        .map(|&f| guest.grant(f, BACKEND, false).unwrap())
        .collect();
    let region = mapper.map(GUEST, &refs, true).unwrap();
    let segments = vec![
        GrantSegment::new(region.clone(), 0, PAGE_SIZE),
        GrantSegment::new(region.clone(), PAGE_SIZE + 512, 1024),
        GrantSegment::new(region.clone(), 2 * PAGE_SIZE, PAGE_SIZE),
    ];
    let total = 2 * PAGE_SIZE + 1024;
    let buf = GrantIoBuf::new(segments, true).unwrap();
    assert_eq!(buf.total_len(), total);

    let mut engine = open_engine::<GrantIoBuf>(kind, &EngineConfig::default()).unwrap();
    eprintln!("engine asked {kind:?}, got {:?}", engine.kind());
    let c = io_and_wait(&mut *engine, OpKind::Read, fd, PAGE_SIZE as u64, buf);
    assert_eq!(c.user_data, 1);
    assert_eq!(c.result.unwrap(), total);
    let mut buf = c.buf.unwrap();
    // The data is in the guest's own pages.
    let want = &disk[PAGE_SIZE..PAGE_SIZE + total];
    let mut got = vec![0u8; PAGE_SIZE];
    guest.page(9).unwrap().copy_from(0, &mut got).unwrap();
    assert_eq!(got, want[..PAGE_SIZE]);
    guest.page(2).unwrap().copy_from(0, &mut got).unwrap();
    assert!(got[..512].iter().all(|&b| b == 0));
    assert_eq!(got[512..1536], want[PAGE_SIZE..PAGE_SIZE + 1024]);
    assert!(got[1536..].iter().all(|&b| b == 0));
    guest.page(20).unwrap().copy_from(0, &mut got).unwrap();
    assert_eq!(got, want[PAGE_SIZE + 1024..]);
    // copy_out/copy_in/fill_zero go through the mapping too.
    let mut head = [0u8; 4];
    buf.copy_out(PAGE_SIZE + 1022, &mut head);
    assert_eq!(head, want[PAGE_SIZE + 1022..PAGE_SIZE + 1026]);
    buf.copy_in(PAGE_SIZE - 2, b"WXYZ");
    buf.fill_zero(total - 10, 10);
    let mut w = [0u8; 2];
    guest.page(2).unwrap().copy_from(512, &mut w).unwrap();
    assert_eq!(&w, b"YZ");
    drop(buf);

    // A guest write: read-only grants of pages the guest filled, written to offset 0.
    let src_frames = [30usize, 1];
    let mut expected = Vec::new();
    let mut wrefs = Vec::new();
    for (i, &f) in src_frames.iter().enumerate() {
        expected.extend(fill_page(&guest, f, 100 + i as u8));
        wrefs.push(guest.grant(f, BACKEND, true).unwrap());
    }
    let ro = mapper.map(GUEST, &wrefs, false).unwrap();
    assert!(GrantIoBuf::new(vec![GrantSegment::new(ro.clone(), 0, PAGE_SIZE)], true).is_err());
    let wbuf =
        GrantIoBuf::new(vec![GrantSegment::new(ro.clone(), 0, 2 * PAGE_SIZE)], false).unwrap();
    let c = io_and_wait(&mut *engine, OpKind::Write, fd, 0, wbuf);
    assert_eq!(c.result.as_ref().unwrap(), &(2 * PAGE_SIZE));
    let mut back = vec![0u8; 2 * PAGE_SIZE];
    std::os::unix::fs::FileExt::read_exact_at(&file, &mut back, 0).unwrap();
    assert_eq!(back, expected);
    // The mappings stay pinned while the buffer (or its regions) live.
    assert!(!guest.end_grant(wrefs[0]).unwrap());
    drop(c);
    drop(ro);
    assert!(guest.end_grant(wrefs[0]).unwrap());
    drop(region);
    for r in refs {
        assert!(guest.end_grant(r).unwrap());
    }
}

#[test]
fn grant_io_buf_with_io_uring() {
    engine_round_trip(AioKind::IoUring);
}

#[test]
fn grant_io_buf_with_threads() {
    engine_round_trip(AioKind::Threads);
}

/// Segments that follow each other in the backend's address space become one iovec (the
/// kernel pins a run of pages in one call); segments out of order or with a gap do not, and
/// the data still lands page by page where each segment says.
#[test]
fn grant_io_buf_joins_only_segments_contiguous_in_memory() {
    let (xen, guest) = host(16);
    let frames = [3usize, 7, 1, 12, 5];
    let refs: Vec<GrantRef> = frames
        .iter()
        .map(|&f| guest.grant(f, BACKEND, false).unwrap())
        .collect();
    let region = xen.grant_mapper(BACKEND).map(GUEST, &refs, true).unwrap();
    let g9 = guest.grant(9, BACKEND, false).unwrap();
    let other = xen.grant_mapper(BACKEND).map(GUEST, &[g9], true).unwrap();
    let seg =
        |r: &Arc<dyn MappedRegion>, at: usize, len: usize| GrantSegment::new(r.clone(), at, len);
    // Pages 0 and 1 in order (one run), then the second half of page 3 and the first half of
    // page 4 (one run from a sub-page offset), page 2 (backwards: new), the other region.
    let segments = vec![
        seg(&region, 0, PAGE_SIZE),
        seg(&region, PAGE_SIZE, PAGE_SIZE),
        seg(&region, 3 * PAGE_SIZE + 2048, 2048),
        seg(&region, 4 * PAGE_SIZE, 1024),
        seg(&region, 2 * PAGE_SIZE, PAGE_SIZE),
        seg(&other, 0, 512),
    ];
    let total = 3 * PAGE_SIZE + 2048 + 1024 + 512;
    let mut buf = GrantIoBuf::new(segments, true).unwrap();
    let lens: Vec<usize> = buf.iovecs().iter().map(|v| v.iov_len).collect();
    assert_eq!(lens, [2 * PAGE_SIZE, 3072, PAGE_SIZE, 512]);
    assert_eq!(buf.total_len(), total);

    let mut file = tempfile::tempfile().unwrap();
    let disk: Vec<u8> = (0..total).map(|i| (i * 13 % 253) as u8).collect();
    file.write_all(&disk).unwrap();
    let mut engine = open_engine::<GrantIoBuf>(AioKind::IoUring, &EngineConfig::default()).unwrap();
    let done = io_and_wait(&mut *engine, OpKind::Read, file.as_raw_fd(), 0, buf);
    assert_eq!(*done.result.as_ref().unwrap(), total);
    let page = |f: usize| {
        let mut g = vec![0u8; PAGE_SIZE];
        guest.page(f).unwrap().copy_from(0, &mut g).unwrap();
        g
    };
    assert_eq!(page(3), disk[..PAGE_SIZE]);
    assert_eq!(page(7), disk[PAGE_SIZE..2 * PAGE_SIZE]);
    let at = 2 * PAGE_SIZE;
    assert_eq!(page(12)[2048..], disk[at..at + 2048]);
    assert!(page(12)[..2048].iter().all(|&b| b == 0));
    assert_eq!(page(5)[..1024], disk[at + 2048..at + 3072]);
    let at = at + 3072;
    assert_eq!(page(1), disk[at..at + PAGE_SIZE]);
    assert_eq!(page(9)[..512], disk[at + PAGE_SIZE..]);
}

#[test]
fn grant_io_buf_bounds() {
    let (xen, guest) = host(4);
    let g = guest.grant(0, BACKEND, false).unwrap();
    let r = xen.grant_mapper(BACKEND).map(GUEST, &[g], true).unwrap();
    assert!(GrantIoBuf::new(vec![GrantSegment::new(r.clone(), 4000, 97)], false).is_err());
    assert!(GrantIoBuf::new(vec![GrantSegment::new(r.clone(), usize::MAX, 2)], true).is_err());
    let mut ok = GrantIoBuf::new(
        vec![
            GrantSegment::new(r.clone(), 4000, 96),
            GrantSegment::new(r.clone(), 0, 0),
        ],
        true,
    )
    .unwrap();
    assert_eq!(ok.total_len(), 96);
    assert_eq!(ok.iovecs().len(), 2);
    assert_eq!(ok.segments().len(), 2);
}

// ---------------------------------------------------------------------------------------------
// Event channels

fn readable(fd: i32) -> bool {
    poll_readable(fd, Some(Duration::from_millis(0))).unwrap()
}

#[test]
fn event_channels_connect_notify_clear() {
    let (xen, guest) = host(1);
    let front = guest.events().alloc_unbound(BACKEND).unwrap();
    let back_ops = xen.event_channels(BACKEND);
    let back = back_ops
        .bind_interdomain(GUEST, front.local_port())
        .unwrap();
    assert!(front.local_port() >= 1 && back.local_port() >= 1);
    assert!(!readable(front.fd()) && !readable(back.fd()));

    front.notify().unwrap();
    assert!(poll_readable(back.fd(), Some(T)).unwrap());
    assert!(!readable(front.fd()), "only the other end is signalled");
    assert!(back.clear().unwrap());
    assert!(!back.clear().unwrap());
    assert!(!readable(back.fd()));

    back.notify().unwrap();
    back.notify().unwrap();
    assert!(readable(front.fd()));
    assert!(front.clear().unwrap());
    assert!(!readable(front.fd()));

    // A notification from another thread wakes a poller.
    let waiter = {
        let fd = back.fd();
        thread::spawn(move || poll_readable(fd, Some(T)).unwrap())
    };
    thread::sleep(Duration::from_millis(20));
    front.notify().unwrap();
    assert!(waiter.join().unwrap());
    back.clear().unwrap();
}

#[test]
fn event_channel_bind_rules() {
    let (xen, guest) = host(1);
    let other = xen.create_domain(8, 1).unwrap();
    let back_ops = xen.event_channels(BACKEND);
    // Not allocated.
    assert!(back_ops.bind_interdomain(GUEST, 1).is_err());
    assert!(back_ops.bind_interdomain(GUEST, 0).is_err());
    // Allocated for another domain.
    let for_other = guest.events().alloc_unbound(8).unwrap();
    assert!(back_ops
        .bind_interdomain(GUEST, for_other.local_port())
        .is_err());
    let b8 = other
        .events()
        .bind_interdomain(GUEST, for_other.local_port())
        .unwrap();
    // Already bound.
    assert!(other
        .events()
        .bind_interdomain(GUEST, for_other.local_port())
        .is_err());
    for_other.notify().unwrap();
    assert!(readable(b8.fd()));
    // Unknown domains.
    assert!(back_ops.bind_interdomain(77, 1).is_err());
    assert!(guest.events().alloc_unbound(77).is_err());
    assert!(xen.event_channels(77).alloc_unbound(0).is_err());
    // Ports are per domain and reused lowest first.
    let a = guest.events().alloc_unbound(BACKEND).unwrap();
    let b = guest.events().alloc_unbound(BACKEND).unwrap();
    let pa = a.local_port();
    assert_ne!(pa, b.local_port());
    drop(a);
    let c = guest.events().alloc_unbound(BACKEND).unwrap();
    assert_eq!(c.local_port(), pa);
    assert_eq!(xen.event_channel_count(GUEST), 3);
}

#[test]
fn event_channel_close_and_rebind() {
    let (xen, guest) = host(1);
    let back_ops = xen.event_channels(BACKEND);
    let front = guest.events().alloc_unbound(BACKEND).unwrap();
    let back = back_ops
        .bind_interdomain(GUEST, front.local_port())
        .unwrap();

    // The backend closes: the frontend's notifications are dropped, not errors.
    drop(back);
    front.notify().unwrap();
    // The frontend's port is unbound again and can be re-bound by the backend.
    let back = back_ops
        .bind_interdomain(GUEST, front.local_port())
        .unwrap();
    front.notify().unwrap();
    assert!(poll_readable(back.fd(), Some(T)).unwrap());
    back.clear().unwrap();

    // The frontend closes (reconnect): the backend's notifications become no-ops.
    let old_port = front.local_port();
    drop(front);
    back.notify().unwrap();
    assert!(back_ops.bind_interdomain(GUEST, old_port).is_err());
    drop(back);
    // A new pair.
    let front = guest.events().alloc_unbound(BACKEND).unwrap();
    let back = back_ops
        .bind_interdomain(GUEST, front.local_port())
        .unwrap();
    back.notify().unwrap();
    assert!(poll_readable(front.fd(), Some(T)).unwrap());
    drop((front, back));
    assert_eq!(xen.event_channel_count(GUEST), 0);
    assert_eq!(xen.event_channel_count(BACKEND), 0);
}

// ---------------------------------------------------------------------------------------------
// Domains and xenstore

#[test]
fn domain_lifecycle_and_xenstore() {
    let xen = SimXen::new().unwrap();
    let dom0 = xen.xenstore(0).unwrap();
    assert_eq!(dom0.read_string("/local/domain/0/domid").unwrap(), "0");
    let intro = dom0.watch("@introduceDomain", "i").unwrap();
    let release = dom0.watch("@releaseDomain", "r").unwrap();
    intro.recv_timeout(T).unwrap(); // initial firing
    release.recv_timeout(T).unwrap();

    let guest = xen.create_domain(GUEST, 4).unwrap();
    assert_eq!(intro.recv_timeout(T).unwrap().path, "@introduceDomain");
    assert!(matches!(
        xen.create_domain(GUEST, 4),
        Err(SimError::DomainExists(GUEST))
    ));
    assert!(matches!(
        xen.create_domain(0, 4),
        Err(SimError::InvalidDomId(0))
    ));
    assert!(xen.domain_exists(GUEST) && xen.domain_exists(0));

    let gx = guest.xenstore().unwrap();
    assert_eq!(gx.read_string("name").unwrap(), format!("sim-{GUEST}"));
    assert_eq!(
        gx.read_string(&format!("/local/domain/{GUEST}/domid"))
            .unwrap(),
        GUEST.to_string()
    );
    assert_eq!(
        dom0.get_perms(&format!("/local/domain/{GUEST}/name"))
            .unwrap()[0]
            .domid,
        GUEST
    );
    gx.write("device/vbd/51712/state", "1").unwrap();
    assert!(gx.write("/local/domain/0/x", "1").is_err());
    assert!(gx.read("/local/domain/0/name").is_err());
    // The socket path serves dom0 connections.
    let via_socket = xdisk_xen::xenstore::Client::connect_unix(xen.xenstore_path()).unwrap();
    assert_eq!(
        via_socket
            .read_string(&format!("/local/domain/{GUEST}/device/vbd/51712/state"))
            .unwrap(),
        "1"
    );

    // Destroy with a live mapping and a bound event channel.
    let gref = guest.grant(1, BACKEND, false).unwrap();
    guest.page(1).unwrap().copy_to(0, b"still here").unwrap();
    let region = xen.grant_mapper(BACKEND).map(GUEST, &[gref], true).unwrap();
    let front = guest.events().alloc_unbound(BACKEND).unwrap();
    let back = xen
        .event_channels(BACKEND)
        .bind_interdomain(GUEST, front.local_port())
        .unwrap();

    xen.destroy_domain(GUEST).unwrap();
    assert_eq!(release.recv_timeout(T).unwrap().path, "@releaseDomain");
    assert!(!guest.is_alive());
    assert!(!xen.domain_exists(GUEST));
    assert!(!dom0.exists(&format!("/local/domain/{GUEST}")).unwrap());
    assert!(matches!(
        xen.destroy_domain(GUEST),
        Err(SimError::NoSuchDomain(GUEST))
    ));
    // New maps and copies fail; the existing mapping is still memory.
    assert_eq!(
        grant_status(xen.grant_mapper(BACKEND).map(GUEST, &[gref], false)),
        GrantStatus::BadDomain
    );
    let mut b = [0u8; 10];
    region.copy_from(0, &mut b).unwrap();
    assert_eq!(&b, b"still here");
    region.copy_to(0, b"x").unwrap();
    // Event channels: the backend's end is unbound (notify is a no-op), the guest's is gone.
    back.notify().unwrap();
    assert!(front.notify().is_err());
    assert!(front.clear().is_ok());
    drop((front, back, region));
    // The domid can be reused.
    let again = xen.create_domain(GUEST, 2).unwrap();
    assert_eq!(again.pages(), 2);
    assert_eq!(intro.recv_timeout(T).unwrap().path, "@introduceDomain");
}

#[test]
fn guest_page_views() {
    let (_xen, guest) = host(4);
    assert!(matches!(guest.page(4), Err(SimError::BadPage { .. })));
    assert!(guest.pages_region(3, 2).is_err());
    assert!(guest.pages_region(0, 0).is_err());
    let all = guest.pages_region(0, 4).unwrap();
    assert_eq!(all.size(), 4 * PAGE_SIZE);
    all.copy_to(2 * PAGE_SIZE + 1, b"q").unwrap();
    let mut b = [0u8; 1];
    guest.page(2).unwrap().copy_from(1, &mut b).unwrap();
    assert_eq!(&b, b"q");
    assert!(matches!(
        guest.grant(4, 0, true),
        Err(SimError::BadPage { .. })
    ));
}

#[test]
fn grant_table_full() {
    let xen = SimXen::new().unwrap();
    let guest = xen.create_domain_with(3, 1, 16).unwrap();
    let refs: Vec<_> = (0..8).map(|_| guest.grant(0, 0, true).unwrap()).collect();
    assert_eq!(refs, (8..16).collect::<Vec<_>>());
    assert!(matches!(
        guest.grant(0, 0, true),
        Err(SimError::GrantTableFull(3))
    ));
    assert!(guest.end_grant(12).unwrap());
    assert_eq!(guest.grant(0, 0, true).unwrap(), 12);
}

// ---------------------------------------------------------------------------------------------
// Property test: random grant table contents

fn expected_map(e: (u16, u16, u32), pages: u32, writable: bool) -> Result<(), GrantStatus> {
    let (flags, domid, frame) = e;
    if flags & (3 | GTF_SUB_PAGE) != GTF_PERMIT_ACCESS || domid != BACKEND {
        return Err(GrantStatus::PermissionDenied);
    }
    if writable && flags & GTF_READONLY != 0 {
        return Err(GrantStatus::PermissionDenied);
    }
    if frame >= pages {
        return Err(GrantStatus::GeneralError);
    }
    Ok(())
}

fn arb_entry() -> impl Strategy<Value = (u16, u16, u32)> {
    let flags = prop_oneof![
        Just(GTF_PERMIT_ACCESS),
        Just(GTF_PERMIT_ACCESS | GTF_READONLY),
        Just(GTF_PERMIT_ACCESS | GTF_READING | GTF_WRITING),
        any::<u16>(),
    ];
    let domid = prop_oneof![Just(BACKEND), Just(BACKEND), any::<u16>()];
    let frame = prop_oneof![0u32..10, any::<u32>()];
    (flags, domid, frame)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn random_grant_tables(entries in proptest::collection::vec(arb_entry(), 1..12),
                           writable in any::<bool>()) {
        let (xen, guest) = host(8);
        for i in 0..8 {
            fill_page(&guest, i, i as u8 + 1);
        }
        let mapper = xen.grant_mapper(BACKEND);
        let base: GrantRef = 20;
        for (i, &(f, d, fr)) in entries.iter().enumerate() {
            guest.write_grant_entry_raw(base + i as u32, f, d, fr).unwrap();
        }
        // Each entry alone.
        for (i, &e) in entries.iter().enumerate() {
            let gref = base + i as u32;
            let want = expected_map(e, 8, writable);
            match mapper.map(GUEST, &[gref], writable) {
                Ok(r) => {
                    prop_assert!(want.is_ok(), "entry {:?} mapped", e);
                    let mut page = vec![0u8; PAGE_SIZE];
                    r.copy_from(0, &mut page).unwrap();
                    prop_assert_eq!(page, pattern(e.2 as u8 + 1, PAGE_SIZE));
                    let flags = guest.grant_entry(gref).unwrap().flags;
                    prop_assert!(flags & GTF_READING != 0);
                    prop_assert!(!writable || flags & GTF_WRITING != 0);
                    drop(r);
                    let flags = guest.grant_entry(gref).unwrap().flags;
                    prop_assert_eq!(flags & (GTF_READING | GTF_WRITING), 0);
                }
                Err(PlatformError::Grant { status, gref: g, domid }) => {
                    prop_assert_eq!(Err(status), want);
                    prop_assert_eq!((g, domid), (gref, GUEST));
                    // The entry is untouched by a failed map.
                    let now = guest.grant_entry(gref).unwrap();
                    prop_assert_eq!((now.flags, now.domid, now.frame), e);
                }
                Err(other) => prop_assert!(false, "unexpected error {}", other),
            }
            prop_assert_eq!(guest.grant_pin_count(gref), 0);
        }
        // All of them as one mapping: succeeds iff every entry is good.
        let refs: Vec<GrantRef> = (0..entries.len() as u32).map(|i| base + i).collect();
        let all_ok = entries.iter().all(|&e| expected_map(e, 8, writable).is_ok());
        match mapper.map(GUEST, &refs, writable) {
            Ok(r) => {
                prop_assert!(all_ok);
                for (i, &e) in entries.iter().enumerate() {
                    let mut b = [0u8; 8];
                    r.copy_from(i * PAGE_SIZE, &mut b).unwrap();
                    prop_assert_eq!(&b[..], &pattern(e.2 as u8 + 1, 8)[..]);
                }
            }
            Err(_) => prop_assert!(!all_ok),
        }
        for &g in &refs {
            prop_assert_eq!(guest.grant_pin_count(g), 0);
        }
    }
}

#[test]
fn handles_are_send_and_sync() {
    fn send_sync<T: Send + Sync>() {}
    fn send<T: Send>() {}
    send_sync::<SimXen>();
    send_sync::<SimDomain>();
    send_sync::<xdisk_xensim::SimGrantMapper>();
    send_sync::<xdisk_xensim::SimEventChannels>();
    send_sync::<xdisk_xensim::SimPort>();
    send_sync::<xdisk_xensim::mem::MmapRegion>();
    send::<GrantIoBuf>();
}
