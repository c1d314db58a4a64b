//! Property tests of request/response (de)serialisation in all three ABIs:
//! round trips of valid requests, rejection (with the right status, id and
//! operation) of every invalid field value, and totality on random bytes.

use proptest::prelude::*;
use xdisk_blkif::abi::SLOT_SIZE;
use xdisk_blkif::wire::*;
use xdisk_blkif::Abi;

const ALL_INDIRECT: ParseLimits = ParseLimits {
    max_indirect_segments: MAX_INDIRECT_SEGMENTS_LIMIT,
};

fn abi() -> impl Strategy<Value = Abi> {
    prop_oneof![Just(Abi::Native), Just(Abi::X86_32), Just(Abi::X86_64)]
}

fn segment() -> impl Strategy<Value = Segment> {
    (any::<u32>(), 0u8..8)
        .prop_flat_map(|(gref, first)| (Just(gref), Just(first), first..8))
        .prop_map(|(gref, first_sect, last_sect)| Segment {
            gref,
            first_sect,
            last_sect,
        })
}

fn direct(min: usize) -> impl Strategy<Value = DirectIo> {
    prop::collection::vec(segment(), min..=BLKIF_MAX_SEGMENTS_PER_REQUEST).prop_flat_map(|segs| {
        let total: u64 = segs.iter().map(|s| u64::from(s.nr_sectors())).sum();
        let segments = Segments::from_slice(&segs).unwrap();
        prop_oneof![
            (0..=MAX_SECTORS - total),
            Just(MAX_SECTORS - total),
            Just(0u64)
        ]
        .prop_map(move |sector| DirectIo { sector, segments })
    })
}

fn indirect() -> impl Strategy<Value = Indirect> {
    (
        prop_oneof![Just(IndirectOp::Read), Just(IndirectOp::Write)],
        1u16..=MAX_INDIRECT_SEGMENTS_LIMIT,
        prop::array::uniform8(any::<u32>()),
    )
        .prop_flat_map(|(op, nr_segments, grefs)| {
            let pages = indirect_pages(nr_segments);
            let indirect_grefs = IndirectGrefs::from_slice(&grefs[..pages]).unwrap();
            (0..=MAX_SECTORS - u64::from(nr_segments)).prop_map(move |sector| Indirect {
                op,
                sector,
                nr_segments,
                indirect_grefs,
            })
        })
}

fn request_kind() -> impl Strategy<Value = RequestKind> {
    prop_oneof![
        direct(1).prop_map(RequestKind::Read),
        direct(1).prop_map(RequestKind::Write),
        direct(0).prop_map(RequestKind::WriteBarrier),
        direct(0).prop_map(RequestKind::Flush),
        (0..=MAX_SECTORS, any::<bool>()).prop_flat_map(|(sector, secure)| {
            (0..=MAX_SECTORS - sector).prop_map(move |nr_sectors| RequestKind::Discard {
                sector,
                nr_sectors,
                secure,
            })
        }),
        indirect().prop_map(RequestKind::Indirect),
    ]
}

fn request() -> impl Strategy<Value = Request> {
    (any::<u64>(), any::<u16>(), request_kind()).prop_map(|(id, handle, kind)| Request {
        id,
        handle,
        kind,
    })
}

fn slot(abi: Abi, r: &Request) -> [u8; SLOT_SIZE] {
    let mut s = [0x5au8; SLOT_SIZE];
    r.write(abi, &mut s);
    s
}

fn read_rw() -> Request {
    Request {
        id: 0xfeed_f00d_dead_beef,
        handle: 3,
        kind: RequestKind::Read(DirectIo {
            sector: 10,
            segments: Segments::from_slice(&[Segment {
                gref: 1,
                first_sect: 0,
                last_sect: 7,
            }])
            .unwrap(),
        }),
    }
}

/// Asserts the rejection and that its answer echoes id and operation.
fn rejected(
    abi: Abi,
    s: &[u8; SLOT_SIZE],
    limits: &ParseLimits,
    status: Status,
    op: u8,
) -> InvalidRequest {
    let e = Request::parse_with(abi, s, limits).expect_err("must be rejected");
    assert_eq!(e.status(), status, "{e}");
    assert_eq!(e.response().status, status);
    assert_eq!(e.operation, op);
    assert_eq!(e.response().operation, op);
    let id_off = abi.layout().req_id;
    assert_eq!(
        e.id,
        u64::from_le_bytes(s[id_off..id_off + 8].try_into().unwrap())
    );
    e.reason
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn valid_requests_round_trip(abi in abi(), r in request()) {
        let s = slot(abi, &r);
        prop_assert_eq!(Request::parse_with(abi, &s, &ALL_INDIRECT), Ok(r));
        // Every byte is written: past the ABI's entry, all zero.
        prop_assert!(s[abi.entry_size()..].iter().all(|&b| b == 0));
        // Writing is deterministic whatever the buffer held before.
        let mut again = [0u8; SLOT_SIZE];
        r.write(abi, &mut again);
        prop_assert_eq!(s, again);
    }

    #[test]
    fn random_bytes_never_panic(abi in abi(), bytes in prop::collection::vec(any::<u8>(), SLOT_SIZE),
                                max in any::<u16>(), op in 0u8..8) {
        let mut s = [0u8; SLOT_SIZE];
        s.copy_from_slice(&bytes);
        // Bias towards valid operations so the deeper checks run.
        if op < 7 { s[0] = op; }
        let limits = ParseLimits { max_indirect_segments: max };
        match Request::parse_with(abi, &s, &limits) {
            Ok(r) => {
                // A parsed request is canonical: it re-serialises to a slot
                // that parses to the same request.
                let s2 = slot(abi, &r);
                prop_assert_eq!(Request::parse_with(abi, &s2, &limits), Ok(r));
            }
            Err(e) => {
                prop_assert!(matches!(e.status(), Status::Error | Status::EOpNotSupp));
            }
        }
    }

    #[test]
    fn unknown_operations_are_eopnotsupp(abi in abi(), op in any::<u8>(), id in any::<u64>()) {
        prop_assume!(!matches!(op, 0..=3 | 5 | 6));
        let mut s = slot(abi, &Request { id, ..read_rw() });
        s[0] = op;
        let reason = rejected(abi, &s, &ALL_INDIRECT, Status::EOpNotSupp, op);
        prop_assert_eq!(reason, InvalidRequest::UnknownOperation(op));
    }

    #[test]
    fn bad_segment_counts(abi in abi(), op in 0u8..4, nr in any::<u8>()) {
        let mut s = slot(abi, &read_rw());
        s[0] = op;
        s[abi.layout().req_nr_segments] = nr;
        let res = Request::parse(abi, &s);
        if nr as usize > BLKIF_MAX_SEGMENTS_PER_REQUEST {
            let reason = rejected(abi, &s, &ALL_INDIRECT, Status::Error, op);
            prop_assert_eq!(reason, InvalidRequest::TooManySegments { nr: nr.into(), max: 11 });
        } else if nr == 0 && op <= BLKIF_OP_WRITE {
            let reason = rejected(abi, &s, &ALL_INDIRECT, Status::Error, op);
            prop_assert_eq!(reason, InvalidRequest::NoSegments);
        } else {
            // Zero-filled segments (gref 0, sectors 0..=0) are valid.
            prop_assert!(res.is_ok(), "{:?}", res);
        }
    }

    #[test]
    fn bad_segments(abi in abi(), r in direct(1), index in 0usize..11, first in any::<u8>(), last in any::<u8>(), op in 0u8..4) {
        prop_assume!(first > last || last > 7);
        let index = index % r.segments.len();
        let mut segs = r.segments.as_slice().to_vec();
        segs[index].first_sect = first;
        segs[index].last_sect = last;
        let mut s = [0u8; SLOT_SIZE];
        let io = DirectIo { sector: 0, segments: Segments::from_slice(&segs).unwrap() };
        Request { id: 1, handle: 0, kind: RequestKind::Write(io) }.write(abi, &mut s);
        s[0] = op;
        let reason = rejected(abi, &s, &ALL_INDIRECT, Status::Error, op);
        prop_assert_eq!(reason, InvalidRequest::BadSegment { index, first, last });
    }

    #[test]
    fn direct_sector_overflow(abi in abi(), r in direct(1), excess in 1u64..1_000_000, op in 0u8..4) {
        let total = r.nr_sectors();
        let sector = (MAX_SECTORS - total).saturating_add(excess);
        let io = DirectIo { sector, ..r };
        let mut s = slot(abi, &Request { id: 2, handle: 0, kind: RequestKind::Read(io) });
        s[0] = op;
        let reason = rejected(abi, &s, &ALL_INDIRECT, Status::Error, op);
        prop_assert_eq!(reason, InvalidRequest::SectorOverflow { sector, nr_sectors: total });
    }

    #[test]
    fn discard_rejections(abi in abi(), flag in any::<u8>(), sector in any::<u64>(), nr in any::<u64>()) {
        let r = Request { id: 3, handle: 0, kind: RequestKind::Discard { sector, nr_sectors: nr, secure: false } };
        let mut s = slot(abi, &r);
        s[abi.layout().discard_flag] = flag;
        let fits = sector.checked_add(nr).is_some_and(|e| e <= MAX_SECTORS);
        match Request::parse(abi, &s) {
            Ok(p) => {
                prop_assert!(flag <= 1 && fits);
                prop_assert_eq!(p.kind, RequestKind::Discard { sector, nr_sectors: nr, secure: flag == 1 });
            }
            Err(_) => {
                let reason = rejected(abi, &s, &ALL_INDIRECT, Status::Error, BLKIF_OP_DISCARD);
                if flag > 1 {
                    prop_assert_eq!(reason, InvalidRequest::InvalidDiscardFlags(flag));
                } else {
                    prop_assert!(!fits);
                    prop_assert_eq!(reason, InvalidRequest::SectorOverflow { sector, nr_sectors: nr });
                }
            }
        }
    }

    #[test]
    fn indirect_rejections(abi in abi(), ind in indirect(), raw_op in any::<u8>(), nr in any::<u16>(),
                           max in 0u16..=5000, sector in any::<u64>()) {
        let l = abi.layout();
        let r = Request { id: 4, handle: 0, kind: RequestKind::Indirect(ind) };
        let mut s = slot(abi, &r);
        s[l.indirect_op] = raw_op;
        s[l.indirect_nr_segments..l.indirect_nr_segments + 2].copy_from_slice(&nr.to_le_bytes());
        s[l.indirect_sector_number..l.indirect_sector_number + 8].copy_from_slice(&sector.to_le_bytes());
        let limits = ParseLimits { max_indirect_segments: max };
        let eff_max = max.min(MAX_INDIRECT_SEGMENTS_LIMIT);
        let res = Request::parse_with(abi, &s, &limits);
        if max == 0 {
            let reason = rejected(abi, &s, &limits, Status::EOpNotSupp, raw_op);
            prop_assert_eq!(reason, InvalidRequest::IndirectNotSupported);
        } else if raw_op > 1 {
            let reason = rejected(abi, &s, &limits, Status::Error, raw_op);
            prop_assert_eq!(reason, InvalidRequest::InvalidIndirectOperation(raw_op));
        } else if nr == 0 {
            let reason = rejected(abi, &s, &limits, Status::Error, raw_op);
            prop_assert_eq!(reason, InvalidRequest::NoSegments);
        } else if nr > eff_max {
            let reason = rejected(abi, &s, &limits, Status::Error, raw_op);
            prop_assert_eq!(reason, InvalidRequest::TooManySegments { nr: nr.into(), max: eff_max.into() });
        } else if sector.checked_add(u64::from(nr)).is_none_or(|e| e > MAX_SECTORS) {
            let reason = rejected(abi, &s, &limits, Status::Error, raw_op);
            prop_assert_eq!(reason, InvalidRequest::SectorOverflow { sector, nr_sectors: nr.into() });
        } else {
            let p = res.unwrap();
            let RequestKind::Indirect(pi) = p.kind else { panic!("not indirect") };
            prop_assert_eq!(pi.nr_segments, nr);
            prop_assert_eq!(pi.indirect_grefs.len(), (nr as usize).div_ceil(512));
            prop_assert!(pi.indirect_grefs.len() <= BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST);
            prop_assert_eq!(p.response_operation(), raw_op);
        }
    }

    #[test]
    fn indirect_pages_round_trip(segs in prop::collection::vec(segment(), 0..=512)) {
        let mut page = [0xffu8; PAGE_SIZE];
        write_indirect_segments(&segs, &mut page);
        prop_assert_eq!(parse_indirect_segments(&page, segs.len()), Ok(segs.clone()));
        // Fewer requested: a prefix.
        let n = segs.len() / 2;
        prop_assert_eq!(parse_indirect_segments(&page, n), Ok(segs[..n].to_vec()));
    }

    #[test]
    fn indirect_page_bad_segment(segs in prop::collection::vec(segment(), 1..=512), index in any::<usize>(),
                                 first in any::<u8>(), last in any::<u8>()) {
        prop_assume!(first > last || last > 7);
        let index = index % segs.len();
        let mut page = [0u8; PAGE_SIZE];
        write_indirect_segments(&segs, &mut page);
        page[index * 8 + 4] = first;
        page[index * 8 + 5] = last;
        prop_assert_eq!(
            parse_indirect_segments(&page, segs.len()),
            Err(InvalidRequest::BadSegment { index, first, last })
        );
    }

    #[test]
    fn indirect_page_random_bytes(bytes in prop::collection::vec(any::<u8>(), PAGE_SIZE), n in 0usize..2000) {
        let page: [u8; PAGE_SIZE] = bytes.try_into().unwrap();
        match parse_indirect_segments(&page, n) {
            Ok(v) => {
                prop_assert_eq!(v.len(), n);
                prop_assert!(v.iter().all(Segment::is_valid));
            }
            Err(e) => {
                let bad_segment = matches!(e, InvalidRequest::BadSegment { .. });
                prop_assert!(n > 512 || bad_segment);
            }
        }
    }

    /// A list reused across requests parses to what a fresh one does, whatever it held.
    #[test]
    fn indirect_segments_parse_the_same_into_a_reused_list(
        ind in indirect(),
        valid in prop::collection::vec(segment(), 0..=1024),
        noise in prop::collection::vec(any::<u8>(), 0..64),
        flip in any::<Option<(usize, u8)>>(),
        old in prop::collection::vec(segment(), 0..40),
    ) {
        let n = indirect_pages(ind.nr_segments);
        let mut pages = vec![[0u8; PAGE_SIZE]; n];
        for (i, page) in pages.iter_mut().enumerate() {
            let from = (i * 512).min(valid.len());
            write_indirect_segments(&valid[from..], page);
            page[..noise.len()].iter_mut().zip(&noise).for_each(|(b, &x)| *b ^= x & 0x07);
        }
        if let Some((at, x)) = flip {
            let (p, o) = ((at / PAGE_SIZE) % n, at % PAGE_SIZE);
            pages[p][o] ^= x;
        }
        let refs: Vec<&[u8; PAGE_SIZE]> = pages.iter().collect();
        let fresh = ind.parse_segments(&refs);
        let mut reused = old.clone();
        let into = ind.parse_segments_into(&refs, &mut reused);
        match fresh {
            Ok(v) => {
                prop_assert_eq!(into, Ok(()));
                prop_assert_eq!(reused, v);
            }
            Err(e) => prop_assert_eq!(into, Err(e)),
        }
    }

    #[test]
    fn responses_round_trip(abi in abi(), id in any::<u64>(), operation in any::<u8>(),
                            status in prop_oneof![Just(Status::Okay), Just(Status::Error), Just(Status::EOpNotSupp)],
                            fill in any::<u8>()) {
        let rsp = Response { id, operation, status };
        let l = abi.layout();
        let mut buf = [fill; SLOT_SIZE];
        let entry = &mut buf[..abi.entry_size()];
        rsp.write(abi, entry).unwrap();
        prop_assert_eq!(Response::parse(abi, entry), Ok(rsp));
        // Every byte outside the three fields is zero (padding included).
        for (i, &b) in entry.iter().enumerate() {
            let in_field = (l.rsp_id..l.rsp_id + 8).contains(&i)
                || i == l.rsp_operation
                || (l.rsp_status..l.rsp_status + 2).contains(&i);
            if !in_field {
                prop_assert_eq!(b, 0, "byte {} not zeroed", i);
            }
        }
        // The bytes past the entry were not touched.
        prop_assert!(buf[abi.entry_size()..].iter().all(|&b| b == fill));
    }
}

#[test]
fn reserved_op_is_eopnotsupp() {
    for abi in Abi::ALL {
        let mut s = slot(abi, &read_rw());
        s[0] = BLKIF_OP_RESERVED_1;
        assert_eq!(
            rejected(
                abi,
                &s,
                &ALL_INDIRECT,
                Status::EOpNotSupp,
                BLKIF_OP_RESERVED_1
            ),
            InvalidRequest::UnknownOperation(4)
        );
    }
}

#[test]
fn flush_and_barrier_may_be_empty() {
    for abi in Abi::ALL {
        for op in [BLKIF_OP_FLUSH_DISKCACHE, BLKIF_OP_WRITE_BARRIER] {
            let mut s = [0u8; SLOT_SIZE];
            s[0] = op;
            let r = Request::parse(abi, &s).unwrap();
            assert_eq!(r.operation(), op);
            assert_eq!(r.response_operation(), op);
        }
    }
}
