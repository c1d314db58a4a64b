//! The back ring against a hostile frontend: the fuzzer sets the initial
//! shared page and then interleaves backend operations with arbitrary
//! writes to the ring indices and slots. Checks that nothing panics, that
//! the only errors are protocol violations (after which a real backend
//! disconnects, so the run stops), and the ring's accounting invariants.
//!
//! Input: [abi][order][start index: 4][initial ring bytes: 64 + 4 slots]
//! then a script of operations (see `step`).
#![no_main]

use libfuzzer_sys::fuzz_target;
use xdisk_blkif::abi::sring;
use xdisk_blkif::mem::{SharedMem, VecMem};
use xdisk_blkif::ring::{BackRing, RingError};
use xdisk_blkif::wire::{ParseLimits, Status};
use xdisk_blkif::{Abi, SLOT_SIZE};

struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn byte(&mut self) -> Option<u8> {
        let (&b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(b)
    }
    fn u32(&mut self) -> Option<u32> {
        let mut b = [0u8; 4];
        for x in &mut b {
            *x = self.byte()?;
        }
        Some(u32::from_le_bytes(b))
    }
    fn bytes(&mut self, n: usize) -> &[u8] {
        let n = n.min(self.0.len());
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        a
    }
}

fn check(back: &BackRing<&VecMem>) {
    // Never more consumed-but-unanswered requests than slots.
    assert!(back.outstanding() <= back.size());
    assert!(back.batch_remaining() <= back.size());
}

/// Runs the script; returns on a protocol violation.
fn run(input: &mut Input, back: &mut BackRing<&VecMem>, mem: &VecMem) -> Result<(), RingError> {
    let ring_bytes = mem.size();
    while let Some(op) = input.byte() {
        match op % 8 {
            0 => {
                let n = back.begin_batch()?;
                assert!(n <= back.size());
            }
            1 | 2 => {
                // Consume one request and answer it immediately (op 1) or
                // leave it outstanding (op 2).
                if let Some(parsed) = back.next_request()? {
                    if op % 8 == 1 {
                        let rsp = match parsed {
                            Ok(r) => r.response(Status::Okay),
                            Err(e) => e.response(),
                        };
                        back.push_response(&rsp)?;
                    }
                }
            }
            3 => {
                // Answer one outstanding request, if any.
                if back.outstanding() > 0 {
                    back.push_response(&xdisk_blkif::Response {
                        id: 0,
                        operation: 0,
                        status: Status::Error,
                    })?;
                } else {
                    assert_eq!(
                        back.push_response(&xdisk_blkif::Response {
                            id: 0,
                            operation: 0,
                            status: Status::Error,
                        }),
                        Err(RingError::NoOutstandingRequest)
                    );
                }
            }
            4 => {
                back.push_responses_and_check_notify()?;
            }
            5 => {
                back.final_check_for_requests()?;
                assert!(back.unconsumed_requests()? <= back.size());
            }
            6 => {
                // Hostile frontend: rewrite one of the four indices.
                let field = usize::from(input.byte().unwrap_or(0) % 4) * 4;
                let v = input.u32().unwrap_or(0);
                mem.write_u32_volatile(sring::REQ_PROD + field, v).unwrap();
            }
            _ => {
                // Hostile frontend: scribble over ring bytes.
                let hi = usize::from(input.byte().unwrap_or(0));
                let lo = usize::from(input.byte().unwrap_or(0));
                let off = ((hi << 8) | lo) % ring_bytes;
                let len = usize::from(input.byte().unwrap_or(0));
                let src = input.bytes(len);
                let len = src.len().min(ring_bytes - off);
                mem.copy_to(off, &src[..len]).unwrap();
            }
        }
        check(back);
    }
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    let abi = Abi::ALL[usize::from(input.byte().unwrap_or(0)) % Abi::ALL.len()];
    let order = u32::from(input.byte().unwrap_or(0) % 2);
    let start = input.u32().unwrap_or(0);
    let mem = VecMem::pages(1 << order);
    let init = input.bytes(sring::RING + 4 * SLOT_SIZE);
    mem.copy_to(0, init).unwrap();
    let limits = ParseLimits {
        max_indirect_segments: 4096,
    };
    let mut back = BackRing::attach(&mem, abi, order, limits, start).unwrap();
    match run(&mut input, &mut back, &mem) {
        Ok(()) => {}
        Err(e) => assert!(e.is_protocol_violation(), "unexpected ring error: {e}"),
    }
});
