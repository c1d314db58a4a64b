//! Front ring and back ring over the same memory: interleavings, 32-bit
//! index wrap-around, a hostile `req_prod`, single reads of shared memory,
//! and ring.h's notification rules.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use proptest::prelude::*;
use xdisk_blkif::abi::sring;
use xdisk_blkif::mem::{MemError, SharedMem, VecMem};
use xdisk_blkif::ring::{BackRing, FrontRing, RingError, MAX_RING_PAGE_ORDER};
use xdisk_blkif::wire::*;
use xdisk_blkif::{Abi, SLOT_SIZE};

fn req(id: u64) -> Request {
    Request {
        id,
        handle: 0,
        kind: RequestKind::Read(DirectIo {
            sector: id % 1000,
            segments: Segments::from_slice(&[Segment {
                gref: id as u32,
                first_sect: 0,
                last_sect: (id % 8) as u8,
            }])
            .unwrap(),
        }),
    }
}

fn rings(
    abi: Abi,
    order: u32,
    start: u32,
) -> (FrontRing<Arc<VecMem>>, BackRing<Arc<VecMem>>, Arc<VecMem>) {
    let mem = Arc::new(VecMem::pages(1 << order));
    let front = FrontRing::init_at(mem.clone(), abi, order, start).unwrap();
    let back = BackRing::attach(mem.clone(), abi, order, ParseLimits::default(), start).unwrap();
    (front, back, mem)
}

/// Consumes the whole current batch, answering each request OK (or with its
/// error), and returns the ids seen.
fn serve_batch<M: SharedMem>(back: &mut BackRing<M>) -> Result<Vec<u64>, RingError> {
    back.begin_batch()?;
    let mut ids = Vec::new();
    while let Some(r) = back.next_request()? {
        let rsp = match r {
            Ok(r) => r.response(Status::Okay),
            Err(e) => e.response(),
        };
        ids.push(rsp.id);
        back.push_response(&rsp)?;
    }
    Ok(ids)
}

#[test]
fn every_abi_and_order() {
    for abi in Abi::ALL {
        for order in 0..=MAX_RING_PAGE_ORDER {
            let (mut front, mut back, _) = rings(abi, order, 0);
            let size = front.size();
            assert_eq!(size, back.size());
            assert_eq!(size, 32 << order);
            // Fill the ring completely.
            for id in 0..u64::from(size) {
                front.push_request(&req(id)).unwrap();
            }
            assert!(front.is_full());
            assert_eq!(front.push_request(&req(999)), Err(RingError::Full));
            assert!(front.push_requests_and_check_notify().unwrap());
            let ids = serve_batch(&mut back).unwrap();
            assert_eq!(ids, (0..u64::from(size)).collect::<Vec<_>>());
            assert!(back.push_responses_and_check_notify().unwrap());
            assert_eq!(front.begin_responses().unwrap(), size);
            let mut n = 0;
            while let Some(r) = front.next_response().unwrap() {
                let r = r.unwrap();
                assert_eq!(r.id, n);
                assert_eq!(r.status, Status::Okay);
                assert_eq!(r.operation, BLKIF_OP_READ);
                n += 1;
            }
            assert_eq!(n, u64::from(size));
            assert_eq!(front.free_requests(), size);
        }
    }
}

#[test]
fn requests_parse_back_exactly() {
    for abi in Abi::ALL {
        let (mut front, mut back, _) = rings(abi, 0, 7);
        let sent = [
            req(1),
            Request {
                id: 2,
                handle: 9,
                kind: RequestKind::Discard {
                    sector: 5,
                    nr_sectors: 6,
                    secure: true,
                },
            },
            Request {
                id: 3,
                handle: 1,
                kind: RequestKind::Flush(DirectIo {
                    sector: 0,
                    segments: Segments::new(),
                }),
            },
        ];
        for r in &sent {
            front.push_request(r).unwrap();
        }
        front.push_requests().unwrap();
        assert_eq!(back.begin_batch().unwrap(), 3);
        for r in &sent {
            assert_eq!(back.next_request().unwrap(), Some(Ok(*r)));
        }
        assert_eq!(back.next_request().unwrap(), None);
    }
}

#[test]
fn invalid_request_is_answered_not_fatal() {
    let (mut front, mut back, _) = rings(Abi::X86_32, 0, 0);
    let mut slot = [0u8; SLOT_SIZE];
    req(77).write(Abi::X86_32, &mut slot);
    slot[0] = 42; // unknown op
    front.push_raw(&slot).unwrap();
    front.push_request(&req(78)).unwrap();
    front.push_requests().unwrap();
    back.begin_batch().unwrap();
    let e = back.next_request().unwrap().unwrap().unwrap_err();
    assert_eq!(
        e.response(),
        Response {
            id: 77,
            operation: 42,
            status: Status::EOpNotSupp
        }
    );
    back.push_response(&e.response()).unwrap();
    assert_eq!(back.next_request().unwrap(), Some(Ok(req(78))));
    back.push_responses().unwrap();
    front.begin_responses().unwrap();
    assert_eq!(
        front.next_response().unwrap().unwrap().unwrap().status,
        Status::EOpNotSupp
    );
}

#[test]
fn wrap_around_u32_indices() {
    for abi in Abi::ALL {
        for start in [
            u32::MAX - 5,
            u32::MAX,
            u32::MAX - 31,
            u32::MAX - 32,
            u32::MAX - 33,
        ] {
            let (mut front, mut back, mem) = rings(abi, 0, start);
            let size = u64::from(front.size());
            let mut next = 0u64;
            let mut expect = 0u64;
            // Several laps of the ring, in batches of varying size.
            for round in 0..40u64 {
                let k = (round * 7) % size + 1;
                for _ in 0..k.min(u64::from(front.free_requests())) {
                    front.push_request(&req(next)).unwrap();
                    next += 1;
                }
                front.push_requests_and_check_notify().unwrap();
                for id in serve_batch(&mut back).unwrap() {
                    assert_eq!(id, expect);
                    expect += 1;
                }
                back.push_responses_and_check_notify().unwrap();
                front.begin_responses().unwrap();
                while let Some(r) = front.next_response().unwrap() {
                    r.unwrap();
                }
            }
            assert_eq!(expect, next);
            assert!(next > 3 * size, "must lap the ring");
            // The shared indices wrapped past zero.
            let prod = mem.read_u32_volatile(sring::REQ_PROD).unwrap();
            assert_eq!(prod, start.wrapping_add(next as u32));
            assert!(prod < start);
            assert_eq!(back.req_cons(), prod);
            assert_eq!(back.rsp_prod_pvt(), prod);
        }
    }
}

#[test]
fn hostile_req_prod_is_a_protocol_error() {
    for start in [0u32, u32::MAX - 3] {
        let (_front, mut back, mem) = rings(Abi::X86_64, 0, start);
        let size = back.size();
        // Ahead by more than the ring size.
        mem.write_u32_volatile(sring::REQ_PROD, start.wrapping_add(size + 1))
            .unwrap();
        let e = back.begin_batch().unwrap_err();
        assert!(e.is_protocol_violation(), "{e}");
        assert_eq!(back.next_request().unwrap(), None, "nothing consumed");
        // Far ahead.
        mem.write_u32_volatile(sring::REQ_PROD, start.wrapping_add(0x8000_0000))
            .unwrap();
        assert!(back.begin_batch().unwrap_err().is_protocol_violation());
        // Behind req_cons.
        mem.write_u32_volatile(sring::REQ_PROD, start.wrapping_sub(1))
            .unwrap();
        assert!(back.begin_batch().unwrap_err().is_protocol_violation());
        // Exactly full is fine.
        mem.write_u32_volatile(sring::REQ_PROD, start.wrapping_add(size))
            .unwrap();
        assert_eq!(back.begin_batch().unwrap(), size);

        // With requests consumed but unanswered, req_prod may not exceed
        // rsp_prod_pvt + size even though it is within req_cons + size.
        let (mut front2, mut back2, mem2) = rings(Abi::X86_64, 0, start);
        for id in 0..u64::from(size) {
            front2.push_request(&req(id)).unwrap();
        }
        front2.push_requests().unwrap();
        back2.begin_batch().unwrap();
        while back2.next_request().unwrap().is_some() {}
        assert_eq!(back2.outstanding(), size);
        mem2.write_u32_volatile(sring::REQ_PROD, start.wrapping_add(size + 1))
            .unwrap();
        let e = back2.begin_batch().unwrap_err();
        assert!(matches!(e, RingError::RequestProdOverflow { .. }), "{e}");
        // unconsumed_requests stays bounded by the free response slots.
        assert_eq!(back2.unconsumed_requests().unwrap(), 0);
    }
}

#[test]
fn hostile_rsp_prod_is_a_protocol_error_for_the_front() {
    let (mut front, _back, mem) = rings(Abi::X86_64, 0, 0);
    mem.write_u32_volatile(sring::RSP_PROD, 33).unwrap();
    assert!(front.begin_responses().unwrap_err().is_protocol_violation());
}

#[test]
fn responses_need_outstanding_requests() {
    let (_front, mut back, _) = rings(Abi::X86_64, 0, 0);
    let rsp = Response {
        id: 1,
        operation: 0,
        status: Status::Okay,
    };
    assert_eq!(
        back.push_response(&rsp),
        Err(RingError::NoOutstandingRequest)
    );
}

#[test]
fn response_overwrites_the_whole_entry() {
    for abi in Abi::ALL {
        let (mut front, mut back, mem) = rings(abi, 0, 0);
        let mut slot = [0xffu8; SLOT_SIZE];
        slot[0] = 0;
        slot[1] = 1;
        // A read with a 0xff-filled slot: invalid segment, answered ERROR.
        front.push_raw(&slot).unwrap();
        front.push_requests().unwrap();
        serve_batch(&mut back).unwrap();
        back.push_responses().unwrap();
        let mut entry = vec![0u8; abi.entry_size()];
        mem.copy_from(sring::RING, &mut entry).unwrap();
        let l = abi.layout();
        assert!(entry[l.rsp_size..].iter().all(|&b| b == 0));
        assert_eq!(entry[9], 0, "padding byte zeroed");
        assert_eq!(&entry[..8], &u64::MAX.to_le_bytes()[..]);
        assert_eq!(Response::parse(abi, &entry).unwrap().status, Status::Error);
    }
}

/// Shared memory that counts accesses, to check that each slot is copied
/// exactly once and `req_prod` read once per batch.
struct Counting {
    inner: VecMem,
    req_prod_reads: AtomicUsize,
    slot_copies: Mutex<Vec<usize>>,
}

impl SharedMem for Counting {
    fn size(&self) -> usize {
        self.inner.size()
    }
    fn read_u32_volatile(&self, offset: usize) -> Result<u32, MemError> {
        if offset == sring::REQ_PROD {
            self.req_prod_reads.fetch_add(1, Ordering::Relaxed);
        }
        self.inner.read_u32_volatile(offset)
    }
    fn write_u32_volatile(&self, offset: usize, value: u32) -> Result<(), MemError> {
        self.inner.write_u32_volatile(offset, value)
    }
    fn copy_from(&self, offset: usize, dst: &mut [u8]) -> Result<(), MemError> {
        self.slot_copies.lock().unwrap().push(offset);
        self.inner.copy_from(offset, dst)
    }
    fn copy_to(&self, offset: usize, src: &[u8]) -> Result<(), MemError> {
        self.inner.copy_to(offset, src)
    }
}

#[test]
fn each_slot_copied_once_and_req_prod_read_once() {
    let mem = Arc::new(Counting {
        inner: VecMem::pages(1),
        req_prod_reads: AtomicUsize::new(0),
        slot_copies: Mutex::new(Vec::new()),
    });
    let abi = Abi::X86_64;
    let mut front = FrontRing::init(mem.clone(), abi, 0).unwrap();
    let mut back = BackRing::new(mem.clone(), abi, 0, ParseLimits::default()).unwrap();
    for id in 0..10 {
        front.push_request(&req(id)).unwrap();
    }
    front.push_requests().unwrap();
    mem.req_prod_reads.store(0, Ordering::Relaxed);
    mem.slot_copies.lock().unwrap().clear();
    assert_eq!(back.begin_batch().unwrap(), 10);
    let mut n = 0;
    while let Some(r) = back.next_request().unwrap() {
        r.unwrap();
        n += 1;
    }
    assert_eq!(n, 10);
    assert_eq!(mem.req_prod_reads.load(Ordering::Relaxed), 1);
    let copies = mem.slot_copies.lock().unwrap().clone();
    let expect: Vec<usize> = (0..10)
        .map(|i| sring::RING + i * abi.entry_size())
        .collect();
    assert_eq!(copies, expect);
    // Requests pushed after the snapshot are not part of this batch.
    front.push_request(&req(10)).unwrap();
    front.push_requests().unwrap();
    assert_eq!(back.next_request().unwrap(), None);
    assert_eq!(back.begin_batch().unwrap(), 1);
}

#[test]
fn notification_examples_from_ring_h() {
    let (mut front, mut back, mem) = rings(Abi::X86_64, 0, 0);
    // SHARED_RING_INIT arms both events at 1: the first request notifies.
    front.push_request(&req(0)).unwrap();
    assert!(front.push_requests_and_check_notify().unwrap());
    // The backend has not re-armed: further requests do not notify.
    front.push_request(&req(1)).unwrap();
    assert!(!front.push_requests_and_check_notify().unwrap());
    // Final check with work pending: no re-arm, says "work".
    assert!(back.final_check_for_requests().unwrap());
    serve_batch(&mut back).unwrap();
    // Now idle: re-arms req_event = req_cons + 1.
    assert!(!back.final_check_for_requests().unwrap());
    assert_eq!(mem.read_u32_volatile(sring::REQ_EVENT).unwrap(), 3);
    front.push_request(&req(2)).unwrap();
    front.push_request(&req(3)).unwrap();
    assert!(front.push_requests_and_check_notify().unwrap());
    // Responses: rsp_event = 1 initially.
    assert!(back.push_responses_and_check_notify().unwrap());
    serve_batch(&mut back).unwrap();
    assert!(!back.push_responses_and_check_notify().unwrap());
    front.begin_responses().unwrap();
    while front.next_response().unwrap().is_some() {}
    assert!(!front.final_check_for_responses().unwrap());
    assert_eq!(mem.read_u32_volatile(sring::RSP_EVENT).unwrap(), 5);
    // Nothing new: no notification.
    assert!(!back.push_responses_and_check_notify().unwrap());
}

#[derive(Debug, Clone)]
enum Op {
    FrontPush(u32),
    BackConsume(u32),
    BackRespond(u32),
    BackFinalCheck,
    FrontConsume,
    FrontFinalCheck,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0u32..70).prop_map(Op::FrontPush),
        (0u32..70).prop_map(Op::BackConsume),
        (0u32..70).prop_map(Op::BackRespond),
        Just(Op::BackFinalCheck),
        Just(Op::FrontConsume),
        Just(Op::FrontFinalCheck),
    ]
}

fn start_index() -> impl Strategy<Value = u32> {
    prop_oneof![Just(0u32), u32::MAX - 100..=u32::MAX, any::<u32>()]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Random interleavings of both ends. Checks FIFO delivery of requests
    /// and responses, the free-slot accounting, and ring.h's notification
    /// rules as a model: an end that went idle through the FINAL_CHECK
    /// macro is notified by the very next push that carries something (no
    /// lost wake-up), and not again until it re-arms (hold-off).
    #[test]
    fn interleavings(abi in prop_oneof![Just(Abi::X86_32), Just(Abi::X86_64)],
                     order in 0u32..=1, start in start_index(),
                     ops in prop::collection::vec(op(), 1..120)) {
        let (mut front, mut back, _mem) = rings(abi, order, start);
        let size = front.size();
        let mut next_id = 0u64;
        let mut in_ring: VecDeque<u64> = VecDeque::new();      // pushed, not consumed
        let mut in_backend: VecDeque<u64> = VecDeque::new();   // consumed, not answered
        let mut answered: VecDeque<u64> = VecDeque::new();     // answered, not received
        let mut pushed_unpublished = 0u32;
        let mut answered_unpublished = 0u32;
        // SHARED_RING_INIT sets both event indices to start + 1: armed.
        let mut back_armed = true;
        let mut front_armed = true;
        for op in ops {
            match op {
                Op::FrontPush(k) => {
                    let n = k.min(front.free_requests());
                    for _ in 0..n {
                        front.push_request(&req(next_id)).unwrap();
                        in_ring.push_back(next_id);
                        next_id += 1;
                    }
                    pushed_unpublished += n;
                    let notify = front.push_requests_and_check_notify().unwrap();
                    prop_assert_eq!(notify, back_armed && pushed_unpublished > 0);
                    if pushed_unpublished > 0 {
                        back_armed = false;
                    }
                    pushed_unpublished = 0;
                }
                Op::BackConsume(k) => {
                    let avail = back.begin_batch().unwrap();
                    prop_assert_eq!(avail as usize, in_ring.len());
                    for _ in 0..k.min(avail) {
                        let r = back.next_request().unwrap().unwrap().unwrap();
                        prop_assert_eq!(Some(r.id), in_ring.pop_front());
                        in_backend.push_back(r.id);
                    }
                }
                Op::BackRespond(k) => {
                    for _ in 0..(k as usize).min(in_backend.len()) {
                        let id = in_backend.pop_front().unwrap();
                        back.push_response(&req(id).response(Status::Okay)).unwrap();
                        answered.push_back(id);
                        answered_unpublished += 1;
                    }
                    let notify = back.push_responses_and_check_notify().unwrap();
                    prop_assert_eq!(notify, front_armed && answered_unpublished > 0);
                    if answered_unpublished > 0 {
                        front_armed = false;
                    }
                    answered_unpublished = 0;
                }
                Op::BackFinalCheck => {
                    let work = back.final_check_for_requests().unwrap();
                    prop_assert_eq!(work, !in_ring.is_empty());
                    if !work {
                        back_armed = true;
                    }
                }
                Op::FrontConsume => {
                    let n = front.begin_responses().unwrap();
                    prop_assert!(n as usize <= answered.len());
                    while let Some(r) = front.next_response().unwrap() {
                        let r = r.unwrap();
                        prop_assert_eq!(Some(r.id), answered.pop_front());
                    }
                }
                Op::FrontFinalCheck => {
                    let work = front.final_check_for_responses().unwrap();
                    prop_assert_eq!(work, front.unconsumed_responses().unwrap() > 0);
                    if !work {
                        front_armed = true;
                    }
                }
            }
            // Accounting invariants.
            prop_assert!(back.outstanding() as usize == in_backend.len() + answered_unpublished as usize);
            let in_flight = in_ring.len() + in_backend.len() + answered.len();
            prop_assert_eq!(front.free_requests() as usize, size as usize - in_flight);
        }
    }
}

#[test]
fn two_threads() {
    const N: u64 = 20_000;
    for abi in [Abi::X86_32, Abi::X86_64] {
        let mem = Arc::new(VecMem::pages(1));
        let mut front = FrontRing::init(mem.clone(), abi, 0).unwrap();
        let mut back = BackRing::new(mem.clone(), abi, 0, ParseLimits::default()).unwrap();
        let backend = std::thread::spawn(move || {
            let mut served = 0u64;
            let mut spins = 0u64;
            while served < N {
                back.begin_batch().unwrap();
                let mut any = false;
                while let Some(r) = back.next_request().unwrap() {
                    let r = r.unwrap();
                    assert_eq!(r, req(served), "requests arrive intact and in order");
                    back.push_response(&r.response(Status::Okay)).unwrap();
                    served += 1;
                    any = true;
                }
                back.push_responses_and_check_notify().unwrap();
                if !any && !back.final_check_for_requests().unwrap() {
                    spins += 1;
                    assert!(spins < 50_000_000, "backend starved");
                    std::thread::yield_now();
                }
            }
        });
        let mut sent = 0u64;
        let mut received = 0u64;
        let mut spins = 0u64;
        while received < N {
            while sent < N && !front.is_full() {
                front.push_request(&req(sent)).unwrap();
                sent += 1;
            }
            front.push_requests_and_check_notify().unwrap();
            front.begin_responses().unwrap();
            let mut any = false;
            while let Some(r) = front.next_response().unwrap() {
                let r = r.unwrap();
                assert_eq!(r.id, received);
                received += 1;
                any = true;
            }
            if !any {
                spins += 1;
                assert!(spins < 50_000_000, "frontend starved");
                std::thread::yield_now();
            }
        }
        backend.join().unwrap();
    }
}
