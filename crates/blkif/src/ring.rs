//! The shared request/response ring of xen/io/ring.h, over [`SharedMem`].
//!
//! Layout (ring.h `DEFINE_RING_TYPES`, lines 91-135): the shared ring starts
//! with `req_prod`, `req_event`, `rsp_prod`, `rsp_event` (32-bit
//! free-running indices), 48 bytes of private/padding, and then
//! `RING_SIZE` entries of `sizeof(union blkif_sring_entry)` bytes
//! ([`Abi::entry_size`]). A ring of `2^order` pages is one contiguous
//! region of `4096 << order` bytes; its entry count is
//! `__CONST_RING_SIZE(blkif, 4096 << order)`: as many entries as fit,
//! rounded down to a power of two by `__RD32` (ring.h lines 38-53), so that
//! an index maps to a slot by masking with `RING_SIZE - 1`.
//!
//! Each end keeps private copies of its own indices (`req_prod_pvt`,
//! `rsp_cons` for the front; `rsp_prod_pvt`, `req_cons` for the back) and
//! publishes them with the `RING_PUSH_*` macros. Index arithmetic is modulo
//! 2^32 (`wrapping_*`), as the C code's unsigned `RING_IDX`.
//!
//! Memory ordering follows ring.h's barriers: `xen_wmb()` before publishing
//! a producer index is a `Release` fence, `xen_rmb()` after reading one is an
//! `Acquire` fence, and `xen_mb()` between publishing an index and reading
//! the other end's event index is a `SeqCst` fence. The shared-memory
//! accesses themselves are relaxed (see [`crate::mem`]).
//!
//! The back ring treats the frontend as hostile: it reads `req_prod` once
//! per batch ([`BackRing::begin_batch`]), refuses an index that claims more
//! requests than the ring can hold (ring.h's `RING_REQUEST_PROD_OVERFLOW`,
//! plus an index behind `req_cons`), and copies each slot out exactly once
//! before parsing the copy (ring.h's `RING_COPY_REQUEST`).

use std::sync::atomic::{fence, Ordering};

use crate::abi::{sring, Abi, SLOT_SIZE};
use crate::mem::{MemError, SharedMem};
use crate::wire::{ParseLimits, Request, RequestError, Response, ResponseError, PAGE_SIZE};

/// `RING_IDX` (ring.h line 36).
pub type RingIdx = u32;

/// The largest ring page order this crate accepts (16 pages). Linux's
/// xenbus limits multi-page rings to `XENBUS_MAX_RING_GRANT_ORDER` = 4 as
/// well; a backend advertises at most this as "max-ring-page-order".
pub const MAX_RING_PAGE_ORDER: u32 = 4;

/// What a request slot parses to: a request, or the error to answer.
pub type ParsedRequest = Result<Request, RequestError>;

/// `__RD2` .. `__RD32` of ring.h (lines 38-43), transliterated: rounds a
/// 32-bit value down to a power of two (0 stays 0).
pub const fn rd32(x: u32) -> u32 {
    const fn rd2(x: u32) -> u32 {
        if x & 0x2 != 0 {
            0x2
        } else {
            x & 0x1
        }
    }
    const fn rd4(x: u32) -> u32 {
        if x & 0xc != 0 {
            rd2(x >> 2) << 2
        } else {
            rd2(x)
        }
    }
    const fn rd8(x: u32) -> u32 {
        if x & 0xf0 != 0 {
            rd4(x >> 4) << 4
        } else {
            rd4(x)
        }
    }
    const fn rd16(x: u32) -> u32 {
        if x & 0xff00 != 0 {
            rd8(x >> 8) << 8
        } else {
            rd8(x)
        }
    }
    if x & 0xffff_0000 != 0 {
        rd16(x >> 16) << 16
    } else {
        rd16(x)
    }
}

/// `__CONST_RING_SIZE(blkif, bytes)` for `abi`'s entry size (ring.h lines
/// 51-53): `__RD32((bytes - offsetof(sring, ring)) / sizeof(entry))`.
/// Returns 0 if `bytes` cannot hold the header.
pub const fn const_ring_size(abi: Abi, bytes: usize) -> u32 {
    if bytes < sring::RING {
        return 0;
    }
    let n = (bytes - sring::RING) / abi.entry_size();
    let n = if n > u32::MAX as usize {
        u32::MAX
    } else {
        n as u32
    };
    rd32(n)
}

/// The number of entries of a ring of `2^order` pages.
pub fn ring_size_for_order(abi: Abi, order: u32) -> Result<u32, RingError> {
    Ok(Geometry::new(abi, order)?.nr_ents)
}

/// Errors of ring operations. The `*ProdOverflow` ones are protocol
/// violations by the other end: the caller should stop using the ring and
/// disconnect the device.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RingError {
    /// Page order above [`MAX_RING_PAGE_ORDER`].
    #[error("ring page order {order} exceeds the maximum {max}")]
    OrderTooLarge {
        /// Requested order.
        order: u32,
        /// The limit.
        max: u32,
    },
    /// The shared region is smaller than `4096 << order` bytes.
    #[error("shared region of {size} bytes is smaller than the {need}-byte ring")]
    RegionTooSmall {
        /// Region size.
        size: usize,
        /// Bytes needed.
        need: usize,
    },
    /// The frontend's `req_prod` claims more unanswered requests than the
    /// ring holds, or is behind `req_cons` (hostile or broken frontend).
    #[error(
        "frontend req_prod {req_prod} is invalid (req_cons {req_cons}, \
         rsp_prod_pvt {rsp_prod_pvt}, ring size {size})"
    )]
    RequestProdOverflow {
        /// The `req_prod` read.
        req_prod: RingIdx,
        /// Our `req_cons`.
        req_cons: RingIdx,
        /// Our `rsp_prod_pvt`.
        rsp_prod_pvt: RingIdx,
        /// `RING_SIZE`.
        size: u32,
    },
    /// The backend's `rsp_prod` claims more responses than the ring holds
    /// (ring.h `RING_RESPONSE_PROD_OVERFLOW`).
    #[error("backend rsp_prod {rsp_prod} is invalid (rsp_cons {rsp_cons}, ring size {size})")]
    ResponseProdOverflow {
        /// The `rsp_prod` read.
        rsp_prod: RingIdx,
        /// Our `rsp_cons`.
        rsp_cons: RingIdx,
        /// `RING_SIZE`.
        size: u32,
    },
    /// No free request slot (front: `RING_FULL`).
    #[error("ring full")]
    Full,
    /// A response pushed without a consumed, unanswered request.
    #[error("no outstanding request to respond to")]
    NoOutstandingRequest,
    /// Response serialisation failed (cannot happen with a valid ABI).
    #[error(transparent)]
    Response(#[from] ResponseError),
    /// Shared-memory access failed (cannot happen once the ring is built).
    #[error(transparent)]
    Mem(#[from] MemError),
}

impl RingError {
    /// True if the other end broke the protocol (disconnect it).
    pub const fn is_protocol_violation(&self) -> bool {
        matches!(
            self,
            RingError::RequestProdOverflow { .. } | RingError::ResponseProdOverflow { .. }
        )
    }
}

/// Ring dimensions, checked against the region at construction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Geometry {
    abi: Abi,
    nr_ents: u32,
    entry_size: usize,
    bytes: usize,
}

impl Geometry {
    fn new(abi: Abi, order: u32) -> Result<Geometry, RingError> {
        if order > MAX_RING_PAGE_ORDER {
            return Err(RingError::OrderTooLarge {
                order,
                max: MAX_RING_PAGE_ORDER,
            });
        }
        let bytes = PAGE_SIZE << order;
        let nr_ents = const_ring_size(abi, bytes);
        // Never true for a 4 KiB page and blkif entries (32 entries at
        // least); slot_offset relies on it.
        if nr_ents == 0 {
            return Err(RingError::RegionTooSmall {
                size: bytes,
                need: sring::RING + abi.entry_size(),
            });
        }
        Ok(Geometry {
            abi,
            nr_ents,
            entry_size: abi.entry_size(),
            bytes,
        })
    }

    fn for_mem<M: SharedMem>(mem: &M, abi: Abi, order: u32) -> Result<Geometry, RingError> {
        let g = Geometry::new(abi, order)?;
        if mem.size() < g.bytes {
            return Err(RingError::RegionTooSmall {
                size: mem.size(),
                need: g.bytes,
            });
        }
        Ok(g)
    }

    /// Offset of the entry for `idx` (`RING_GET_REQUEST`/`RING_GET_RESPONSE`:
    /// `ring[idx & (RING_SIZE - 1)]`). Always inside the region.
    fn slot_offset(&self, idx: RingIdx) -> usize {
        let i = (idx & (self.nr_ents - 1)) as usize;
        sring::RING + i * self.entry_size
    }
}

/// `SHARED_RING_INIT` (ring.h lines 153-158), with the indices starting at
/// `start` instead of 0 (`start == 0` is the macro): producer indices at
/// `start`, event indices at `start + 1`, private bytes and padding zeroed.
fn shared_ring_init<M: SharedMem>(mem: &M, start: RingIdx) -> Result<(), MemError> {
    mem.write_u32_volatile(sring::REQ_PROD, start)?;
    mem.write_u32_volatile(sring::RSP_PROD, start)?;
    mem.write_u32_volatile(sring::REQ_EVENT, start.wrapping_add(1))?;
    mem.write_u32_volatile(sring::RSP_EVENT, start.wrapping_add(1))?;
    mem.copy_to(sring::PVT, &[0u8; sring::RING - sring::PVT])
}

/// The notification test of `RING_PUSH_{REQUESTS,RESPONSES}_AND_CHECK_NOTIFY`
/// (ring.h lines 313-314 and 323-324): notify iff the other end's event
/// index lies in `(old, new]`, computed modulo 2^32.
pub const fn needs_notify(old: RingIdx, new: RingIdx, event: RingIdx) -> bool {
    new.wrapping_sub(event) < new.wrapping_sub(old)
}

/// The backend half of a ring (`BACK_RING_*`): consumes requests, produces
/// responses.
#[derive(Debug)]
pub struct BackRing<M: SharedMem> {
    mem: M,
    geo: Geometry,
    limits: ParseLimits,
    rsp_prod_pvt: RingIdx,
    req_cons: RingIdx,
    /// `req_prod` as read by the last `begin_batch`.
    batch_end: RingIdx,
}

impl<M: SharedMem> BackRing<M> {
    /// `BACK_RING_INIT`: attaches to a ring of `2^order` pages in `mem`
    /// that the frontend initialised, with indices at 0.
    pub fn new(mem: M, abi: Abi, order: u32, limits: ParseLimits) -> Result<Self, RingError> {
        Self::attach(mem, abi, order, limits, 0)
    }

    /// `BACK_RING_ATTACH`: like [`BackRing::new`] with private indices
    /// starting at `start`. Does not write the shared ring (only the
    /// frontend initialises it).
    pub fn attach(
        mem: M,
        abi: Abi,
        order: u32,
        limits: ParseLimits,
        start: RingIdx,
    ) -> Result<Self, RingError> {
        let geo = Geometry::for_mem(&mem, abi, order)?;
        Ok(BackRing {
            mem,
            geo,
            limits,
            rsp_prod_pvt: start,
            req_cons: start,
            batch_end: start,
        })
    }

    /// `RING_SIZE`: number of entries.
    pub fn size(&self) -> u32 {
        self.geo.nr_ents
    }

    /// The ABI requests are parsed with.
    pub fn abi(&self) -> Abi {
        self.geo.abi
    }

    /// The limits requests are validated against.
    pub fn limits(&self) -> &ParseLimits {
        &self.limits
    }

    /// The shared memory.
    pub fn mem(&self) -> &M {
        &self.mem
    }

    /// Private `req_cons`: the next request slot to copy.
    pub fn req_cons(&self) -> RingIdx {
        self.req_cons
    }

    /// Private `rsp_prod_pvt`: the next response slot to fill.
    pub fn rsp_prod_pvt(&self) -> RingIdx {
        self.rsp_prod_pvt
    }

    /// Requests consumed but not yet answered.
    pub fn outstanding(&self) -> u32 {
        self.req_cons.wrapping_sub(self.rsp_prod_pvt)
    }

    /// Starts a batch: reads `req_prod` once, then an `Acquire` fence
    /// (`xen_rmb()`: see requests up to it, as Linux blkback's
    /// `rp = req_prod; rmb();`), and validates it. Returns the number of
    /// requests in the batch; [`BackRing::next_request`] yields exactly those.
    ///
    /// Fails with [`RingError::RequestProdOverflow`] if `req_prod -
    /// rsp_prod_pvt > RING_SIZE` (ring.h `RING_REQUEST_PROD_OVERFLOW`: more
    /// unanswered requests than slots) or `req_prod - req_cons > RING_SIZE`
    /// (which also catches an index moved back behind `req_cons`); the
    /// frontend is then hostile and the device should be disconnected.
    pub fn begin_batch(&mut self) -> Result<u32, RingError> {
        let prod = self.mem.read_u32_volatile(sring::REQ_PROD)?;
        fence(Ordering::Acquire);
        let size = self.geo.nr_ents;
        let pending = prod.wrapping_sub(self.req_cons);
        if prod.wrapping_sub(self.rsp_prod_pvt) > size || pending > size {
            self.batch_end = self.req_cons;
            return Err(RingError::RequestProdOverflow {
                req_prod: prod,
                req_cons: self.req_cons,
                rsp_prod_pvt: self.rsp_prod_pvt,
                size,
            });
        }
        self.batch_end = prod;
        Ok(pending)
    }

    /// Requests left in the current batch.
    pub fn batch_remaining(&self) -> u32 {
        self.batch_end.wrapping_sub(self.req_cons)
    }

    /// Copies the next slot of the batch into `out` (the whole entry, once;
    /// bytes past [`Abi::entry_size`] are zeroed) and advances `req_cons`.
    /// Returns false when the batch is done.
    pub fn next_slot(&mut self, out: &mut [u8; SLOT_SIZE]) -> Result<bool, RingError> {
        if self.req_cons == self.batch_end {
            return Ok(false);
        }
        // RING_REQUEST_CONS_OVERFLOW (ring.h line 256): never true after
        // begin_batch's check, kept as the loop guard ring.h prescribes.
        if self.req_cons.wrapping_sub(self.rsp_prod_pvt) >= self.geo.nr_ents {
            return Ok(false);
        }
        out.fill(0);
        let off = self.geo.slot_offset(self.req_cons);
        let entry = out.get_mut(..self.geo.entry_size).unwrap_or(&mut []);
        self.mem.copy_from(off, entry)?;
        self.req_cons = self.req_cons.wrapping_add(1);
        Ok(true)
    }

    /// Copies out and parses the next request of the batch. `Ok(None)` when
    /// the batch is done; `Ok(Some(Err(e)))` for a request to answer with
    /// `e.response()`.
    pub fn next_request(&mut self) -> Result<Option<ParsedRequest>, RingError> {
        let mut slot = [0u8; SLOT_SIZE];
        if !self.next_slot(&mut slot)? {
            return Ok(None);
        }
        Ok(Some(Request::parse_with(self.geo.abi, &slot, &self.limits)))
    }

    /// Writes a response into the next response slot (every byte of the
    /// entry) and advances `rsp_prod_pvt`; not yet visible to the frontend
    /// until [`BackRing::push_responses_and_check_notify`]. Responses may
    /// be in any order, but never more than the requests consumed.
    pub fn push_response(&mut self, rsp: &Response) -> Result<(), RingError> {
        if self.outstanding() == 0 {
            return Err(RingError::NoOutstandingRequest);
        }
        let mut buf = [0u8; SLOT_SIZE];
        let entry = buf.get_mut(..self.geo.entry_size).unwrap_or(&mut []);
        rsp.write(self.geo.abi, entry)?;
        self.mem
            .copy_to(self.geo.slot_offset(self.rsp_prod_pvt), entry)?;
        self.rsp_prod_pvt = self.rsp_prod_pvt.wrapping_add(1);
        Ok(())
    }

    /// `RING_PUSH_RESPONSES` (ring.h lines 272-275): `xen_wmb()` (`Release`
    /// fence), then publish `rsp_prod`.
    pub fn push_responses(&mut self) -> Result<(), RingError> {
        fence(Ordering::Release);
        self.mem
            .write_u32_volatile(sring::RSP_PROD, self.rsp_prod_pvt)?;
        Ok(())
    }

    /// `RING_PUSH_RESPONSES_AND_CHECK_NOTIFY` (ring.h lines 317-325):
    /// publishes `rsp_prod` and returns whether the frontend asked to be
    /// notified (its `rsp_event` is among the new responses). The old
    /// `rsp_prod` is read back from the shared ring as the macro does; a
    /// frontend that scribbles on it only loses its own notifications.
    pub fn push_responses_and_check_notify(&mut self) -> Result<bool, RingError> {
        let old = self.mem.read_u32_volatile(sring::RSP_PROD)?;
        let new = self.rsp_prod_pvt;
        fence(Ordering::Release); // xen_wmb: responses before rsp_prod
        self.mem.write_u32_volatile(sring::RSP_PROD, new)?;
        fence(Ordering::SeqCst); // xen_mb: rsp_prod before reading rsp_event
        let event = self.mem.read_u32_volatile(sring::RSP_EVENT)?;
        Ok(needs_notify(old, new, event))
    }

    /// `XEN_RING_NR_UNCONSUMED_REQUESTS` (ring.h lines 202-207): requests
    /// published but not consumed, bounded by the free response slots (so
    /// a hostile `req_prod` cannot inflate it beyond the ring size).
    pub fn unconsumed_requests(&self) -> Result<u32, RingError> {
        let prod = self.mem.read_u32_volatile(sring::REQ_PROD)?;
        let req = prod.wrapping_sub(self.req_cons);
        let rsp = self.geo.nr_ents.wrapping_sub(self.outstanding());
        Ok(req.min(rsp))
    }

    /// `RING_FINAL_CHECK_FOR_REQUESTS` (ring.h lines 327-333): if no
    /// request is pending, sets `req_event = req_cons + 1` (notify me on the
    /// next one), `xen_mb()`, and checks again. Returns true if there is
    /// work (do not sleep): call [`BackRing::begin_batch`] again.
    pub fn final_check_for_requests(&mut self) -> Result<bool, RingError> {
        if self.unconsumed_requests()? != 0 {
            return Ok(true);
        }
        self.mem
            .write_u32_volatile(sring::REQ_EVENT, self.req_cons.wrapping_add(1))?;
        fence(Ordering::SeqCst);
        Ok(self.unconsumed_requests()? != 0)
    }
}

/// The frontend half of a ring (`FRONT_RING_*`): produces requests,
/// consumes responses. xdisk is a backend; this exists to test the back
/// ring against the macros' other half and to drive the fuzzers.
#[derive(Debug)]
pub struct FrontRing<M: SharedMem> {
    mem: M,
    geo: Geometry,
    req_prod_pvt: RingIdx,
    rsp_cons: RingIdx,
    batch_end: RingIdx,
}

impl<M: SharedMem> FrontRing<M> {
    /// `XEN_FRONT_RING_INIT`: initialises the shared ring
    /// (`SHARED_RING_INIT`) and attaches at index 0.
    pub fn init(mem: M, abi: Abi, order: u32) -> Result<Self, RingError> {
        Self::init_at(mem, abi, order, 0)
    }

    /// Like [`FrontRing::init`] with every index starting at `start`
    /// (`SHARED_RING_INIT` + `FRONT_RING_ATTACH(_, _, start, _)`), e.g. near
    /// `u32::MAX` to exercise index wrap-around.
    pub fn init_at(mem: M, abi: Abi, order: u32, start: RingIdx) -> Result<Self, RingError> {
        let geo = Geometry::for_mem(&mem, abi, order)?;
        shared_ring_init(&mem, start)?;
        Ok(FrontRing {
            mem,
            geo,
            req_prod_pvt: start,
            rsp_cons: start,
            batch_end: start,
        })
    }

    /// `FRONT_RING_ATTACH`: attaches without touching the shared ring.
    pub fn attach(mem: M, abi: Abi, order: u32, start: RingIdx) -> Result<Self, RingError> {
        let geo = Geometry::for_mem(&mem, abi, order)?;
        Ok(FrontRing {
            mem,
            geo,
            req_prod_pvt: start,
            rsp_cons: start,
            batch_end: start,
        })
    }

    /// `RING_SIZE`.
    pub fn size(&self) -> u32 {
        self.geo.nr_ents
    }

    /// The shared memory.
    pub fn mem(&self) -> &M {
        &self.mem
    }

    /// Private `req_prod_pvt`.
    pub fn req_prod_pvt(&self) -> RingIdx {
        self.req_prod_pvt
    }

    /// Private `rsp_cons`.
    pub fn rsp_cons(&self) -> RingIdx {
        self.rsp_cons
    }

    /// `RING_FREE_REQUESTS` (ring.h lines 188-189).
    pub fn free_requests(&self) -> u32 {
        self.geo
            .nr_ents
            .saturating_sub(self.req_prod_pvt.wrapping_sub(self.rsp_cons))
    }

    /// `RING_FULL`.
    pub fn is_full(&self) -> bool {
        self.free_requests() == 0
    }

    /// Writes a raw request entry (first [`Abi::entry_size`] bytes of
    /// `slot`) at `req_prod_pvt` and advances it. Raw so tests and
    /// fuzzers can send malformed requests.
    pub fn push_raw(&mut self, slot: &[u8; SLOT_SIZE]) -> Result<(), RingError> {
        if self.is_full() {
            return Err(RingError::Full);
        }
        let entry = slot.get(..self.geo.entry_size).unwrap_or(&[]);
        self.mem
            .copy_to(self.geo.slot_offset(self.req_prod_pvt), entry)?;
        self.req_prod_pvt = self.req_prod_pvt.wrapping_add(1);
        Ok(())
    }

    /// Serialises `req` into the next slot.
    pub fn push_request(&mut self, req: &Request) -> Result<(), RingError> {
        let mut slot = [0u8; SLOT_SIZE];
        req.write(self.geo.abi, &mut slot);
        self.push_raw(&slot)
    }

    /// `RING_PUSH_REQUESTS` (ring.h lines 267-270).
    pub fn push_requests(&mut self) -> Result<(), RingError> {
        fence(Ordering::Release);
        self.mem
            .write_u32_volatile(sring::REQ_PROD, self.req_prod_pvt)?;
        Ok(())
    }

    /// `RING_PUSH_REQUESTS_AND_CHECK_NOTIFY` (ring.h lines 307-315).
    pub fn push_requests_and_check_notify(&mut self) -> Result<bool, RingError> {
        let old = self.mem.read_u32_volatile(sring::REQ_PROD)?;
        let new = self.req_prod_pvt;
        fence(Ordering::Release); // xen_wmb
        self.mem.write_u32_volatile(sring::REQ_PROD, new)?;
        fence(Ordering::SeqCst); // xen_mb
        let event = self.mem.read_u32_volatile(sring::REQ_EVENT)?;
        Ok(needs_notify(old, new, event))
    }

    /// Reads `rsp_prod` once (then `xen_rmb()`), checks
    /// `RING_RESPONSE_PROD_OVERFLOW` (ring.h lines 264-265) and returns the
    /// number of responses in the batch.
    pub fn begin_responses(&mut self) -> Result<u32, RingError> {
        let prod = self.mem.read_u32_volatile(sring::RSP_PROD)?;
        fence(Ordering::Acquire);
        let pending = prod.wrapping_sub(self.rsp_cons);
        if pending > self.geo.nr_ents {
            self.batch_end = self.rsp_cons;
            return Err(RingError::ResponseProdOverflow {
                rsp_prod: prod,
                rsp_cons: self.rsp_cons,
                size: self.geo.nr_ents,
            });
        }
        self.batch_end = prod;
        Ok(pending)
    }

    /// Copies out (`RING_COPY_RESPONSE`) and parses the next response of the
    /// batch.
    pub fn next_response(&mut self) -> Result<Option<Result<Response, ResponseError>>, RingError> {
        if self.rsp_cons == self.batch_end {
            return Ok(None);
        }
        let mut buf = [0u8; SLOT_SIZE];
        let entry = buf.get_mut(..self.geo.entry_size).unwrap_or(&mut []);
        self.mem
            .copy_from(self.geo.slot_offset(self.rsp_cons), entry)?;
        self.rsp_cons = self.rsp_cons.wrapping_add(1);
        Ok(Some(Response::parse(self.geo.abi, entry)))
    }

    /// `XEN_RING_NR_UNCONSUMED_RESPONSES` (ring.h lines 198-199).
    pub fn unconsumed_responses(&self) -> Result<u32, RingError> {
        let prod = self.mem.read_u32_volatile(sring::RSP_PROD)?;
        Ok(prod.wrapping_sub(self.rsp_cons))
    }

    /// `RING_FINAL_CHECK_FOR_RESPONSES` (ring.h lines 335-341).
    pub fn final_check_for_responses(&mut self) -> Result<bool, RingError> {
        if self.unconsumed_responses()? != 0 {
            return Ok(true);
        }
        self.mem
            .write_u32_volatile(sring::RSP_EVENT, self.rsp_cons.wrapping_add(1))?;
        fence(Ordering::SeqCst);
        Ok(self.unconsumed_responses()? != 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mem::VecMem;

    #[test]
    fn rd32_is_previous_power_of_two() {
        assert_eq!(rd32(0), 0);
        for x in 1..=70_000u32 {
            assert_eq!(rd32(x), 1 << (31 - x.leading_zeros()), "{x}");
        }
        assert_eq!(rd32(u32::MAX), 1 << 31);
        assert_eq!(rd32(0x8000_0001), 0x8000_0000);
    }

    #[test]
    fn ring_sizes() {
        // (4096 - 64) / 112 = 36 -> 32; (4096 - 64) / 108 = 37 -> 32.
        assert_eq!(const_ring_size(Abi::X86_64, 4096), 32);
        assert_eq!(const_ring_size(Abi::X86_32, 4096), 32);
        assert_eq!(const_ring_size(Abi::X86_64, 8192), 64);
        assert_eq!(const_ring_size(Abi::X86_64, 4096 << 4), 512);
        assert_eq!(const_ring_size(Abi::X86_32, 4096 << 4), 512);
        assert_eq!(const_ring_size(Abi::X86_64, 63), 0);
        assert_eq!(ring_size_for_order(Abi::Native, 2), Ok(128));
        assert!(matches!(
            ring_size_for_order(Abi::Native, 5),
            Err(RingError::OrderTooLarge { .. })
        ));
    }

    #[test]
    fn region_must_cover_the_pages() {
        let mem = VecMem::pages(1);
        assert!(matches!(
            BackRing::new(&mem, Abi::X86_64, 1, ParseLimits::default()),
            Err(RingError::RegionTooSmall { .. })
        ));
        assert!(FrontRing::init(&mem, Abi::X86_64, 0).is_ok());
    }

    #[test]
    fn shared_ring_init_values() {
        let mem = VecMem::from_bytes(&[0xff; 4096]);
        FrontRing::init(&mem, Abi::X86_64, 0).unwrap();
        let b = mem.to_vec();
        assert_eq!(&b[0..16], &[0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0]);
        assert!(b[16..64].iter().all(|&x| x == 0));
        assert!(b[64..].iter().all(|&x| x == 0xff));
    }

    #[test]
    fn notify_rule_examples() {
        // Consumer waiting for index 1 (req_event = 1), producer goes 0 -> 1.
        assert!(needs_notify(0, 1, 1));
        // Event already passed: no notification.
        assert!(!needs_notify(1, 2, 1));
        // Batch 0 -> 5 that includes the event 3.
        assert!(needs_notify(0, 5, 3));
        // Event beyond the batch.
        assert!(!needs_notify(0, 5, 6));
        // Across the 32-bit wrap.
        assert!(needs_notify(u32::MAX - 1, 2, 0));
        assert!(!needs_notify(u32::MAX - 1, 2, 3));
        // Nothing new: never notify.
        assert!(!needs_notify(7, 7, 7));
    }
}
