//! A hostile guest, for tests of the backend: the [`Misbehave`] knobs of [`crate::FrontConfig`]
//! and the raw methods of [`Frontend`] that write ring slots, `req_prod` and guest pages as the
//! test likes.

use xdisk_blkif::abi::SLOT_SIZE;
use xdisk_blkif::wire::{Request, PAGE_SIZE};
use xdisk_blkif::Abi;
use xdisk_xen::platform::{GrantRef, PlatformError};

use crate::{Error, Frontend, Result};

/// Hostile behaviours, for tests of the backend.
#[derive(Debug, Clone, Default)]
pub struct Misbehave {
    /// Written as `ring-ref` (or `ring-ref0`, and `queue-0/...`) instead of the real reference.
    pub ring_ref: Option<String>,
    /// Written as (queue 0's) `event-channel` instead of the real port.
    pub event_channel: Option<String>,
    /// Written as `protocol` instead of the ABI's name.
    pub protocol: Option<String>,
    /// Further nodes written (relative to the frontend directory) before `Initialised`.
    pub extra_nodes: Vec<(String, String)>,
    /// Grant the pages of reads read-only (the backend must refuse to write into them).
    pub readonly_grants_for_reads: bool,
    /// Put this reference in every data segment instead of the real ones.
    pub bad_gref: Option<GrantRef>,
    /// Revoke the data grants just before pushing the request.
    pub revoke_before_submit: bool,
    /// Write an invalid segment (`last_sect` 9) into indirect pages.
    pub bogus_indirect: bool,
}

impl Frontend {
    // ---- Raw access, for hostile tests ----

    /// Allocates a page of guest memory (not granted).
    pub fn alloc_page(&mut self) -> Result<usize> {
        self.alloc.alloc(1).ok_or(Error::NoMemory)
    }

    /// Writes into a page of guest memory.
    pub fn write_page(&self, page: usize, offset: usize, data: &[u8]) -> Result<()> {
        self.mem
            .copy_to(page * PAGE_SIZE + offset, data)
            .map_err(|e| PlatformError::from(e).into())
    }

    /// Reads from a page of guest memory.
    pub fn read_page(&self, page: usize, offset: usize, out: &mut [u8]) -> Result<()> {
        self.mem
            .copy_from(page * PAGE_SIZE + offset, out)
            .map_err(|e| PlatformError::from(e).into())
    }

    /// Grants a page to the backend.
    pub fn grant_page(&self, page: usize, readonly: bool) -> Result<GrantRef> {
        Ok(self.dom.grant(page, self.be_domid, readonly)?)
    }

    /// Revokes a grant (false while the backend holds it).
    pub fn end_grant(&self, gref: GrantRef) -> Result<bool> {
        Ok(self.dom.end_grant(gref)?)
    }

    /// The ABI of the rings.
    pub fn abi(&self) -> Abi {
        self.abi
    }

    /// Writes a raw request slot on `queue` (not published until [`Frontend::publish`]).
    pub fn push_raw(&mut self, queue: usize, slot: &[u8; SLOT_SIZE]) -> Result<()> {
        let q = self.queues.get_mut(queue).ok_or(Error::NotConnected)?;
        Ok(q.ring.push_raw(slot)?)
    }

    /// Serialises `req` as is (any id, any values) into the next slot of `queue`.
    pub fn push_raw_request(&mut self, queue: usize, req: &Request) -> Result<()> {
        let mut slot = [0u8; SLOT_SIZE];
        req.write(self.abi, &mut slot);
        self.push_raw(queue, &slot)
    }

    /// Publishes pushed requests and notifies the backend.
    pub fn publish(&mut self, queue: usize) -> Result<()> {
        let q = self.queues.get_mut(queue).ok_or(Error::NotConnected)?;
        q.ring.push_requests()?;
        q.evtchn.notify()?;
        Ok(())
    }

    /// Writes any value into the shared `req_prod` and notifies the backend.
    pub fn set_req_prod(&mut self, queue: usize, value: u32) -> Result<()> {
        let q = self.queues.get_mut(queue).ok_or(Error::NotConnected)?;
        q.ring
            .mem()
            .write_u32_volatile(xdisk_blkif::abi::sring::REQ_PROD, value)
            .map_err(PlatformError::from)?;
        q.evtchn.notify()?;
        Ok(())
    }

    /// The private `req_prod_pvt` of `queue`.
    pub fn req_prod_pvt(&self, queue: usize) -> Option<u32> {
        self.queues.get(queue).map(|q| q.ring.req_prod_pvt())
    }

    /// Free request slots of `queue`.
    pub fn free_slots(&self, queue: usize) -> u32 {
        self.queues.get(queue).map_or(0, |q| q.ring.free_requests())
    }

    /// The guest dies with whatever is in flight: the simulation destroys its domain (its
    /// xenstore directory goes, `@releaseDomain` fires, its grants become unusable).
    pub fn vanish(self) -> Result<()> {
        let domid = self.dom.domid();
        self.dom.xen().destroy_domain(domid)?;
        Ok(())
    }

    /// Notifies the backend on `queue`.
    pub fn kick(&self, queue: usize) -> Result<()> {
        let q = self.queues.get(queue).ok_or(Error::NotConnected)?;
        Ok(q.evtchn.notify()?)
    }
}
