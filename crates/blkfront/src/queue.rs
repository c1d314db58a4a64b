//! The queues: a shared ring and event channel each, the table of requests in flight
//! (shadows), request building (direct and `BLKIF_OP_INDIRECT`), submission with plugging, and
//! completion.

use smallvec::SmallVec;
use std::sync::Arc;
use std::time::{Duration, Instant};

use xdisk_blkif::wire::{
    indirect_pages, write_indirect_segments, DirectIo, Indirect, IndirectGrefs, IndirectOp,
    Request, RequestKind, Response, Segment, Segments, Status, BLKIF_MAX_SEGMENTS_PER_REQUEST,
    PAGE_SIZE, SECTORS_PER_PAGE, SECTOR_SIZE,
};
use xdisk_blkif::FrontRing;
use xdisk_io::sys::poll_readable;
use xdisk_xen::platform::{EventChannel, GrantRef, MappedRegion, PlatformError};

use crate::grants::Grant;
use crate::{Error, Frontend, Result};

/// An operation, as [`Frontend::submit`] takes it. Sectors are 512 bytes (blkif's unit,
/// whatever the disk's `sector-size`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Read `sectors` sectors at `sector` (`BLKIF_OP_READ`, or `BLKIF_OP_INDIRECT` when it
    /// needs more than 11 segments).
    Read {
        /// First sector.
        sector: u64,
        /// Sectors to read (at most [`Frontend::max_request_sectors`]).
        sectors: u32,
    },
    /// Write `data` (a multiple of 512 bytes) at `sector` (`BLKIF_OP_WRITE`, or indirect).
    Write {
        /// First sector.
        sector: u64,
        /// The bytes to write; once submitted, the frontend may keep the buffer for reuse
        /// ([`Frontend::buffer`]).
        data: Vec<u8>,
    },
    /// `BLKIF_OP_FLUSH_DISKCACHE` without data.
    Flush,
    /// `BLKIF_OP_WRITE_BARRIER` with `data` (may be empty) at `sector`.
    Barrier {
        /// First sector.
        sector: u64,
        /// The bytes to write, a multiple of 512 and at most 11 segments (barriers are never
        /// indirect).
        data: Vec<u8>,
    },
    /// `BLKIF_OP_DISCARD`.
    Discard {
        /// First sector.
        sector: u64,
        /// Sectors to discard.
        nr_sectors: u64,
        /// Sets `BLKIF_DISCARD_SECURE` (honoured by a backend that offers `discard-secure`).
        secure: bool,
    },
}

/// A finished request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Completion {
    /// The tag [`Frontend::submit`] returned; for raw requests, their `id`.
    pub tag: u64,
    /// The queue.
    pub queue: usize,
    /// `operation` of the response.
    pub operation: u8,
    /// The status.
    pub status: Status,
    /// Data of a successful read.
    pub data: Option<Vec<u8>>,
    /// True for the response to a raw request (not in the frontend's table).
    pub raw: bool,
}

/// A request in flight.
pub(crate) struct Shadow {
    tag: u64,
    /// Data pages, in order.
    pub(crate) data: Vec<Grant>,
    /// Indirect pages (from the persistent pool when persistent grants are in use, as Linux
    /// blkfront's `get_indirect_grant`).
    pub(crate) indirect: Vec<Grant>,
    /// For reads: sectors, and offset of the data in the first page.
    read: Option<(u64, usize)>,
}

pub(crate) struct Queue {
    pub(crate) ring: FrontRing<Arc<dyn MappedRegion>>,
    ring_first_page: usize,
    pub(crate) ring_grants: Vec<GrantRef>,
    pub(crate) evtchn: Box<dyn EventChannel>,
    pub(crate) shadow: Vec<Option<Shadow>>,
    free_ids: Vec<u64>,
    /// Persistent grants not in use (LIFO).
    pub(crate) pool: Vec<Grant>,
    /// Persistent grants in total.
    pub(crate) pool_total: usize,
    /// Requests pushed while plugged and not yet published.
    unpublished: bool,
}

/// Most byte buffers kept for reuse.
const MAX_POOLED_BUFFERS: usize = 1024;
/// Largest byte buffer kept for reuse.
const MAX_POOLED_BUFFER: usize = 4 << 20;

impl Frontend {
    pub(crate) fn setup_queue(&mut self, order: u32) -> Result<Queue> {
        let n = 1usize << order;
        let first = self.alloc.alloc(n).ok_or(Error::NoMemory)?;
        let region = match self.dom.pages_region(first, n) {
            Ok(r) => r,
            Err(e) => {
                self.alloc.free(first, n);
                return Err(e.into());
            }
        };
        let ring = FrontRing::init(region, self.abi, order)?;
        let mut grants = Vec::with_capacity(n);
        for i in 0..n {
            grants.push(self.dom.grant(first + i, self.be_domid, false)?);
        }
        let evtchn = self.dom.events().alloc_unbound(self.be_domid)?;
        let size = ring.size() as usize;
        Ok(Queue {
            ring,
            ring_first_page: first,
            ring_grants: grants,
            evtchn,
            shadow: (0..size).map(|_| None).collect(),
            free_ids: (0..size as u64).rev().collect(),
            pool: Vec::new(),
            pool_total: 0,
            unpublished: false,
        })
    }

    pub(crate) fn free_queue(&mut self, mut q: Queue) {
        let n = q.ring_grants.len();
        let mut ok = true;
        for g in q.ring_grants.drain(..) {
            if !matches!(self.dom.end_grant(g), Ok(true)) {
                self.leaked += 1;
                ok = false;
            }
        }
        if ok {
            self.alloc.free(q.ring_first_page, n);
        }
        for g in std::mem::take(&mut q.pool) {
            self.release(g);
        }
        for s in q.shadow.iter_mut().filter_map(Option::take) {
            self.release_shadow(s);
        }
    }

    /// Largest number of sectors one request may carry.
    pub fn max_request_sectors(&self) -> u64 {
        let segs = (self.info.max_indirect_segments as usize).max(BLKIF_MAX_SEGMENTS_PER_REQUEST);
        segs as u64 * u64::from(SECTORS_PER_PAGE) - u64::from(self.cfg.first_sect.min(7))
    }

    /// Starts an operation on queue `queue`; returns its tag. Fails with
    /// [`Error::RingFull`] when the ring has no free slot (poll, then retry).
    pub fn submit(&mut self, queue: usize, op: Op) -> Result<u64> {
        if !self.connected {
            return Err(Error::NotConnected);
        }
        let nq = self.queues.len();
        let q = self
            .queues
            .get(queue)
            .ok_or_else(|| Error::Invalid(format!("queue {queue} of {nq}")))?;
        if q.ring.is_full() || q.free_ids.is_empty() {
            return Err(Error::RingFull(queue));
        }
        let tag = self.next_tag;
        self.next_tag += 1;
        let (kind_data, sector, data_len, is_read) = match &op {
            Op::Read { sector, sectors } => (true, *sector, *sectors as usize * SECTOR_SIZE, true),
            Op::Write { sector, data } | Op::Barrier { sector, data } => {
                (!data.is_empty(), *sector, data.len(), false)
            }
            Op::Flush | Op::Discard { .. } => (false, 0, 0, false),
        };
        if data_len % SECTOR_SIZE != 0 {
            return Err(Error::Invalid(format!(
                "{data_len} bytes is not whole sectors"
            )));
        }
        if matches!(op, Op::Read { .. } | Op::Write { .. }) && data_len == 0 {
            return Err(Error::Invalid("no data".into()));
        }
        let sectors = (data_len / SECTOR_SIZE) as u64;
        let id = self.queues[queue]
            .free_ids
            .pop()
            .ok_or(Error::RingFull(queue))?;
        let mut shadow = Shadow {
            tag,
            data: self.spare_grants.pop().unwrap_or_default(),
            indirect: self.spare_grants.pop().unwrap_or_default(),
            read: None,
        };
        let built = self.build(
            queue,
            id,
            &op,
            kind_data,
            sector,
            sectors,
            is_read,
            &mut shadow,
        );
        let req = match built {
            Ok(r) => r,
            Err(e) => {
                self.release_shadow_local(queue, shadow);
                self.queues[queue].free_ids.push(id);
                return Err(e);
            }
        };
        if self.cfg.misbehave.revoke_before_submit {
            for g in &shadow.data {
                let _ = self.dom.end_grant(g.gref);
            }
            shadow.data.clear();
        }
        let q = &mut self.queues[queue];
        q.ring.push_request(&req)?;
        q.shadow[id as usize] = Some(shadow);
        if self.plugged {
            q.unpublished = true;
        } else if q.ring.push_requests_and_check_notify()? {
            q.evtchn.notify()?;
        }
        if let Op::Write { data, .. } | Op::Barrier { data, .. } = op {
            self.recycle(data);
        }
        Ok(tag)
    }

    /// Starts a batch: requests submitted from now on are written to their rings but only
    /// published (and the backend notified, if it asked) by [`Frontend::unplug`] or the next
    /// poll, so that a batch costs one notification (Linux blk-mq's plugging and `bd->last`).
    pub fn plug(&mut self) {
        self.plugged = true;
    }

    /// Ends a batch: publishes what was submitted since [`Frontend::plug`].
    pub fn unplug(&mut self) -> Result<()> {
        self.plugged = false;
        self.publish_plugged()
    }

    /// Publishes the requests of every queue that has unpublished ones, notifying the backend
    /// where it asked (`RING_PUSH_REQUESTS_AND_CHECK_NOTIFY`).
    fn publish_plugged(&mut self) -> Result<()> {
        for q in self.queues.iter_mut().filter(|q| q.unpublished) {
            q.unpublished = false;
            if q.ring.push_requests_and_check_notify()? {
                q.evtchn.notify()?;
            }
        }
        Ok(())
    }

    /// A byte buffer of `len` bytes for [`Op::Write`] data: reused from earlier requests
    /// (write data and read completions given back with [`Frontend::recycle`]), so its
    /// contents are unspecified (zero only when newly allocated).
    pub fn buffer(&mut self, len: usize) -> Vec<u8> {
        let i = self.bufs.iter().rposition(|b| b.capacity() >= len);
        let mut v = match i {
            Some(i) => self.bufs.swap_remove(i),
            None => Vec::with_capacity(len),
        };
        v.resize(len, 0);
        v
    }

    /// Gives a buffer back for reuse (the data of a read [`Completion`], say). Write data is
    /// recycled by [`Frontend::submit`] itself.
    pub fn recycle(&mut self, buf: Vec<u8>) {
        if self.bufs.len() < MAX_POOLED_BUFFERS
            && buf.capacity() > 0
            && buf.capacity() <= MAX_POOLED_BUFFER
        {
            self.bufs.push(buf);
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn build(
        &mut self,
        queue: usize,
        id: u64,
        op: &Op,
        has_data: bool,
        sector: u64,
        sectors: u64,
        is_read: bool,
        shadow: &mut Shadow,
    ) -> Result<Request> {
        let handle = 0;
        // Inline up to a direct request's segments: building one allocates nothing.
        // Inline up to 32 segments (Linux blkfront's default indirect limit): no allocation
        // per request up to 128 KiB.
        let mut segs: SmallVec<[Segment; 32]> = SmallVec::new();
        if has_data {
            let max = self.max_request_sectors();
            if sectors > max {
                return Err(Error::TooLarge { sectors, max });
            }
            let persistent = self.info.persistent;
            let readonly = !is_read || self.cfg.misbehave.readonly_grants_for_reads;
            let first = u64::from(self.cfg.first_sect.min(7));
            let data: Option<&[u8]> = match op {
                Op::Write { data, .. } | Op::Barrier { data, .. } => Some(data),
                _ => None,
            };
            let mut done = 0u64;
            let mut in_page = first;
            while done < sectors {
                let n = (u64::from(SECTORS_PER_PAGE) - in_page).min(sectors - done);
                let g = self.data_page(queue, persistent, readonly)?;
                shadow.data.push(g);
                if let Some(d) = data {
                    let from = (done as usize) * SECTOR_SIZE;
                    let to = from + n as usize * SECTOR_SIZE;
                    self.mem
                        .copy_to(
                            g.page * PAGE_SIZE + in_page as usize * SECTOR_SIZE,
                            &d[from..to],
                        )
                        .map_err(PlatformError::from)?;
                }
                segs.push(Segment {
                    gref: self.cfg.misbehave.bad_gref.unwrap_or(g.gref),
                    first_sect: in_page as u8,
                    last_sect: (in_page + n - 1) as u8,
                });
                done += n;
                in_page = 0;
            }
            if is_read {
                shadow.read = Some((sectors, first as usize * SECTOR_SIZE));
            }
        }
        let kind = match op {
            Op::Flush => RequestKind::Flush(DirectIo {
                sector: 0,
                segments: Segments::new(),
            }),
            Op::Discard {
                sector,
                nr_sectors,
                secure,
            } => RequestKind::Discard {
                sector: *sector,
                nr_sectors: *nr_sectors,
                secure: *secure,
            },
            Op::Barrier { .. } => RequestKind::WriteBarrier(DirectIo {
                sector,
                segments: Segments::from_slice(&segs).ok_or(Error::TooLarge {
                    sectors,
                    max: BLKIF_MAX_SEGMENTS_PER_REQUEST as u64 * u64::from(SECTORS_PER_PAGE),
                })?,
            }),
            Op::Read { .. } | Op::Write { .. } => {
                if segs.len() <= BLKIF_MAX_SEGMENTS_PER_REQUEST {
                    let io = DirectIo {
                        sector,
                        segments: Segments::from_slice(&segs).unwrap_or_default(),
                    };
                    if is_read {
                        RequestKind::Read(io)
                    } else {
                        RequestKind::Write(io)
                    }
                } else {
                    RequestKind::Indirect(self.indirect(queue, sector, &segs, is_read, shadow)?)
                }
            }
        };
        Ok(Request { id, handle, kind })
    }

    /// Writes the segments into indirect pages: persistent ones when persistent grants are in
    /// use, else pages granted read-only for this request.
    fn indirect(
        &mut self,
        queue: usize,
        sector: u64,
        segs: &[Segment],
        is_read: bool,
        shadow: &mut Shadow,
    ) -> Result<Indirect> {
        let nr =
            u16::try_from(segs.len()).map_err(|_| Error::Invalid("too many segments".into()))?;
        let pages = indirect_pages(nr);
        let mut grefs = [0; xdisk_blkif::wire::BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST];
        let persistent = self.info.persistent;
        for (i, chunk) in segs
            .chunks(xdisk_blkif::wire::SEGS_PER_INDIRECT_FRAME)
            .enumerate()
        {
            let g = self.data_page(queue, persistent, true)?;
            // Released with the shadow if anything below fails.
            shadow.indirect.push(g);
            let mut buf = [0u8; PAGE_SIZE];
            write_indirect_segments(chunk, &mut buf);
            if self.cfg.misbehave.bogus_indirect && i == 0 {
                // Segment 0: last_sect = 9.
                buf[5] = 9;
            }
            self.mem
                .copy_to(g.page * PAGE_SIZE, &buf)
                .map_err(PlatformError::from)?;
            *grefs
                .get_mut(i)
                .ok_or_else(|| Error::Invalid(format!("{pages} indirect pages")))? = g.gref;
        }
        Ok(Indirect {
            op: if is_read {
                IndirectOp::Read
            } else {
                IndirectOp::Write
            },
            sector,
            nr_segments: nr,
            indirect_grefs: IndirectGrefs::from_slice(&grefs[..pages.min(grefs.len())])
                .unwrap_or_default(),
        })
    }

    /// Collects finished requests: waits up to `timeout` for at least one.
    pub fn poll(&mut self, timeout: Duration) -> Result<Vec<Completion>> {
        let mut out = Vec::new();
        self.poll_into(timeout, &mut out)?;
        Ok(out)
    }

    /// [`Frontend::poll`] into `out` (appended); returns how many were added.
    pub fn poll_into(&mut self, timeout: Duration, out: &mut Vec<Completion>) -> Result<usize> {
        self.publish_plugged()?;
        let mut deadline = None;
        loop {
            for qi in 0..self.queues.len() {
                self.reap(qi)?;
            }
            if !self.ready.is_empty() {
                let n = self.ready.len();
                out.extend(self.ready.drain(..));
                return Ok(n);
            }
            let now = Instant::now();
            let deadline = *deadline.get_or_insert(now + timeout);
            if now >= deadline || self.queues.is_empty() {
                return Ok(0);
            }
            let fds: SmallVec<[i32; 8]> = self.queues.iter().map(|q| q.evtchn.fd()).collect();
            let ms = (deadline - now).as_millis().min(100) as i32;
            let r = poll_readable(&fds, ms.max(1)).unwrap_or_default();
            for (q, ready) in self.queues.iter().zip(r) {
                if ready {
                    let _ = q.evtchn.clear();
                }
            }
        }
    }

    /// Waits for the request `tag`.
    pub fn wait(&mut self, tag: u64) -> Result<Completion> {
        self.publish_plugged()?;
        let deadline = Instant::now() + self.cfg.timeout;
        loop {
            for qi in 0..self.queues.len() {
                self.reap(qi)?;
            }
            if let Some(i) = self.ready.iter().position(|c| c.tag == tag) {
                return Ok(self.ready.remove(i).expect("present"));
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(Error::Timeout(format!("request {tag}")));
            }
            let fds: SmallVec<[i32; 8]> = self.queues.iter().map(|q| q.evtchn.fd()).collect();
            let ms = (deadline - now).as_millis().min(100) as i32;
            let r = poll_readable(&fds, ms.max(1)).unwrap_or_default();
            for (q, ready) in self.queues.iter().zip(r) {
                if ready {
                    let _ = q.evtchn.clear();
                }
            }
        }
    }

    /// Consumes the responses of queue `qi` (`RING_FINAL_CHECK_FOR_RESPONSES` loop).
    pub(crate) fn reap(&mut self, qi: usize) -> Result<()> {
        loop {
            self.queues[qi].ring.begin_responses()?;
            while let Some(rsp) = self.queues[qi].ring.next_response()? {
                match rsp {
                    Ok(r) => self.complete(qi, r),
                    Err(e) => tracing::warn!("bad response: {e}"),
                }
            }
            if !self.queues[qi].ring.final_check_for_responses()? {
                return Ok(());
            }
        }
    }

    fn complete(&mut self, qi: usize, rsp: Response) {
        let slot = self.queues[qi]
            .shadow
            .get_mut(rsp.id as usize)
            .and_then(Option::take);
        let Some(s) = slot else {
            self.ready.push_back(Completion {
                tag: rsp.id,
                queue: qi,
                operation: rsp.operation,
                status: rsp.status,
                data: None,
                raw: true,
            });
            return;
        };
        self.queues[qi].free_ids.push(rsp.id);
        let mut data = None;
        if let (Some((sectors, off)), Status::Okay) = (s.read, rsp.status) {
            let mut out = self.buffer(sectors as usize * SECTOR_SIZE);
            let mut pos = 0usize;
            let mut in_page = off;
            for g in &s.data {
                let n = (PAGE_SIZE - in_page).min(out.len() - pos);
                let _ = self
                    .mem
                    .copy_from(g.page * PAGE_SIZE + in_page, &mut out[pos..pos + n]);
                pos += n;
                in_page = 0;
            }
            data = Some(out);
        }
        let tag = s.tag;
        self.release_shadow_local(qi, s);
        self.ready.push_back(Completion {
            tag,
            queue: qi,
            operation: rsp.operation,
            status: rsp.status,
            data,
            raw: false,
        });
    }
}
