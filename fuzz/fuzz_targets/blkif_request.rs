//! Request parsing: any slot bytes, any ABI, any advertised indirect limit.
//! Checks that parsing never panics, that accepted requests are canonical
//! (serialise and re-parse to themselves), that rejected ones yield a
//! response with a defined status, and the indirect segment page parser.
//!
//! Input: [abi selector][max_indirect lo][max_indirect hi][slot bytes...]
//! [indirect page bytes...] (short input is zero-padded).
#![no_main]

use libfuzzer_sys::fuzz_target;
use xdisk_blkif::wire::{
    parse_indirect_segments, ParseLimits, Request, RequestKind, Response, Status, PAGE_SIZE,
};
use xdisk_blkif::{Abi, SLOT_SIZE};

fn take<const N: usize>(data: &mut &[u8]) -> [u8; N] {
    let mut out = [0u8; N];
    let n = data.len().min(N);
    out[..n].copy_from_slice(&data[..n]);
    *data = &data[n..];
    out
}

fuzz_target!(|data: &[u8]| {
    let mut data = data;
    let [sel, lo, hi] = take::<3>(&mut data);
    let abi = Abi::ALL[usize::from(sel) % Abi::ALL.len()];
    let limits = ParseLimits {
        max_indirect_segments: u16::from_le_bytes([lo, hi]),
    };
    let slot = take::<SLOT_SIZE>(&mut data);

    match Request::parse_with(abi, &slot, &limits) {
        Ok(req) => {
            let mut again = [0u8; SLOT_SIZE];
            req.write(abi, &mut again);
            assert_eq!(Request::parse_with(abi, &again, &limits), Ok(req));
            assert!(again[abi.entry_size()..].iter().all(|&b| b == 0));
            let rsp = req.response(Status::Okay);
            let mut entry = [0xffu8; SLOT_SIZE];
            rsp.write(abi, &mut entry[..abi.entry_size()]).unwrap();
            assert_eq!(Response::parse(abi, &entry[..abi.entry_size()]), Ok(rsp));

            if let RequestKind::Indirect(ind) = req.kind {
                // Feed the rest of the input as the indirect pages.
                let pages: Vec<[u8; PAGE_SIZE]> = (0..ind.indirect_grefs.len())
                    .map(|_| take::<PAGE_SIZE>(&mut data))
                    .collect();
                let refs: Vec<&[u8; PAGE_SIZE]> = pages.iter().collect();
                match ind.parse_segments(&refs) {
                    Ok(segs) => {
                        assert_eq!(segs.len(), usize::from(ind.nr_segments));
                        assert!(segs.iter().all(|s| s.is_valid()));
                    }
                    Err(e) => assert_eq!(e.status(), Status::Error),
                }
            }
        }
        Err(e) => {
            assert!(matches!(e.status(), Status::Error | Status::EOpNotSupp));
            let rsp = e.response();
            let mut entry = [0xffu8; SLOT_SIZE];
            rsp.write(abi, &mut entry[..abi.entry_size()]).unwrap();
            assert_eq!(Response::parse(abi, &entry[..abi.entry_size()]), Ok(rsp));
        }
    }

    // The page parser on its own, with a count from the input.
    let [n_lo, n_hi] = take::<2>(&mut data);
    let n = usize::from(u16::from_le_bytes([n_lo, n_hi]));
    let page = take::<PAGE_SIZE>(&mut data);
    match parse_indirect_segments(&page, n) {
        Ok(segs) => {
            assert_eq!(segs.len(), n);
            assert!(segs.iter().all(|s| s.is_valid()));
        }
        Err(e) => assert_eq!(e.status(), Status::Error),
    }
});
