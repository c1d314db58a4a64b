//! A Xen PV block frontend ("blkfront") in Rust, driving the ring the way Linux's
//! `xen-blkfront` does, for tests and benchmarks of xdisk's backend on the simulation
//! ([`xdisk_xensim`]): it runs as a simulated guest domain ([`SimDomain`]) with its own
//! xenstore connection, grants its pages and allocates event channels.
//!
//! * [`Frontend::connect`]: the frontend side of the xenbus handshake (xen/io/xenbus.h,
//!   xen/io/blkif.h "Feature and Parameter Negotiation"): waits for the backend's `InitWait`,
//!   reads its features, chooses the ring order, the number of queues, indirect segments and
//!   persistent grants, grants the ring pages, allocates event channels, writes its nodes and
//!   `Initialised`, waits for `Connected`, reads the disk properties and goes `Connected`.
//! * [`Frontend::submit`] / [`Frontend::poll`]: requests on any queue; large requests use
//!   `BLKIF_OP_INDIRECT`; with persistent grants, data is copied through a per-queue pool of
//!   pages granted once (Linux's `persistent_gnts` LIFO list), otherwise each request's pages
//!   are granted and revoked.
//! * [`Frontend::disconnect`] / [`Frontend::reconnect`]: `Closing`/`Closed` and back.
//! * [`Misbehave`] and the raw methods ([`Frontend::push_raw`], [`Frontend::set_req_prod`],
//!   ...): a hostile guest for tests.

#![forbid(unsafe_code)]

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use xdisk_blkif::abi::SLOT_SIZE;
use xdisk_blkif::wire::{
    indirect_pages, write_indirect_segments, DirectIo, Indirect, IndirectGrefs, IndirectOp,
    Request, RequestKind, Response, Segment, Segments, Status, BLKIF_MAX_SEGMENTS_PER_REQUEST,
    PAGE_SIZE, SECTORS_PER_PAGE, SECTOR_SIZE,
};
use xdisk_blkif::xenbus::{keys, parse_bool, parse_u32, parse_u64};
use xdisk_blkif::{Abi, FrontRing, RingError, XenbusState};
use xdisk_io::sys::poll_readable;
use xdisk_xen::platform::{DomId, EventChannel, GrantRef, MappedRegion, PlatformError};
use xdisk_xen::xenstore::{Client, Errno, Watch};
use xdisk_xensim::{SimDomain, SimError};

/// Errors of the frontend.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("xenstore {path}: {source}")]
    Xenstore {
        path: String,
        #[source]
        source: xdisk_xen::xenstore::Error,
    },
    #[error(transparent)]
    Sim(#[from] SimError),
    #[error(transparent)]
    Platform(#[from] PlatformError),
    #[error("ring: {0}")]
    Ring(#[from] RingError),
    #[error("timed out waiting for {0}")]
    Timeout(String),
    #[error("backend went to state {0:?} while {1}")]
    BackendState(XenbusState, String),
    #[error("backend node {node}: {reason}")]
    Node { node: String, reason: String },
    #[error("out of guest memory")]
    NoMemory,
    #[error("request of {sectors} sectors is larger than the {max} a request may carry")]
    TooLarge { sectors: u64, max: u64 },
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error("ring {0} is full")]
    RingFull(usize),
    #[error("not connected")]
    NotConnected,
    #[error("request failed with {0:?}")]
    Failed(Status),
}

/// Result of the frontend.
pub type Result<T> = std::result::Result<T, Error>;

fn xs_err(path: &str) -> impl FnOnce(xdisk_xen::xenstore::Error) -> Error + '_ {
    move |source| Error::Xenstore {
        path: path.to_owned(),
        source,
    }
}

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

/// How the frontend negotiates.
#[derive(Debug, Clone)]
pub struct FrontConfig {
    /// Backend directory; `None` reads the frontend's `backend` node.
    pub backend_dir: Option<String>,
    /// Backend domain; `None` reads the frontend's `backend-id` node.
    pub backend_domid: Option<DomId>,
    /// Largest ring page order wanted (the backend's maximum applies).
    pub max_ring_page_order: u32,
    /// Queues wanted (the backend's maximum applies).
    pub max_queues: u32,
    /// Largest indirect request wanted, in segments (0: never indirect).
    pub max_indirect_segments: u16,
    /// Offer and use persistent grants.
    pub persistent: bool,
    /// Persistent grants (pages) per queue at most.
    pub max_persistent_grants: usize,
    /// The ring ABI; `None` writes no `protocol` node (the backend's native ABI).
    pub protocol: Option<Abi>,
    /// Start each request's data this many sectors into its first page (0..=7).
    pub first_sect: u8,
    /// How long to wait for the backend.
    pub timeout: Duration,
    /// Hostile behaviours.
    pub misbehave: Misbehave,
}

impl Default for FrontConfig {
    fn default() -> Self {
        FrontConfig {
            backend_dir: None,
            backend_domid: None,
            max_ring_page_order: 4,
            max_queues: 4,
            max_indirect_segments: 256,
            persistent: true,
            max_persistent_grants: 1056,
            protocol: Some(Abi::Native),
            first_sect: 0,
            timeout: Duration::from_secs(20),
            misbehave: Misbehave::default(),
        }
    }
}

/// What was negotiated and what the backend says of the disk.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DiskInfo {
    /// `sectors`.
    pub sectors: u64,
    /// `sector-size`.
    pub sector_size: u32,
    /// `physical-sector-size` (absent: `sector-size`).
    pub physical_sector_size: u32,
    /// `info` (VDISK_* bits).
    pub info: u32,
    /// `feature-flush-cache`.
    pub flush: bool,
    /// `feature-barrier`.
    pub barrier: bool,
    /// `feature-discard`.
    pub discard: bool,
    /// `discard-granularity` (bytes).
    pub discard_granularity: u32,
    /// `discard-secure`.
    pub discard_secure: bool,
    /// Indirect segments per request in use (0: none).
    pub max_indirect_segments: u16,
    /// Persistent grants in use.
    pub persistent: bool,
    /// Ring page order in use.
    pub ring_page_order: u32,
    /// Queues in use.
    pub queues: usize,
    /// Entries per ring.
    pub ring_size: u32,
}

/// An operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Read `sectors` sectors at `sector`.
    Read { sector: u64, sectors: u32 },
    /// Write `data` (a multiple of 512 bytes) at `sector`.
    Write { sector: u64, data: Vec<u8> },
    /// `BLKIF_OP_FLUSH_DISKCACHE` without data.
    Flush,
    /// `BLKIF_OP_WRITE_BARRIER` with `data` (may be empty) at `sector`.
    Barrier { sector: u64, data: Vec<u8> },
    /// `BLKIF_OP_DISCARD`.
    Discard {
        sector: u64,
        nr_sectors: u64,
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

/// Pages of guest memory in use by the frontend.
struct PageAlloc {
    used: Vec<bool>,
    hint: usize,
}

impl PageAlloc {
    fn new(pages: usize) -> PageAlloc {
        PageAlloc {
            used: vec![false; pages],
            hint: 0,
        }
    }

    /// `n` contiguous free pages.
    fn alloc(&mut self, n: usize) -> Option<usize> {
        let len = self.used.len();
        if n == 0 || n > len {
            return None;
        }
        for pass in 0..2 {
            let (from, to) = if pass == 0 {
                (self.hint, len)
            } else {
                (0, len)
            };
            let mut run = 0;
            for i in from..to {
                if self.used[i] {
                    run = 0;
                    continue;
                }
                run += 1;
                if run == n {
                    let first = i + 1 - n;
                    self.used[first..=i].iter_mut().for_each(|u| *u = true);
                    self.hint = i + 1;
                    return Some(first);
                }
            }
        }
        None
    }

    fn free(&mut self, first: usize, n: usize) {
        if let Some(s) = self.used.get_mut(first..first + n) {
            s.iter_mut().for_each(|u| *u = false);
        }
        self.hint = self.hint.min(first);
    }
}

/// A granted data (or indirect) page.
#[derive(Debug, Clone, Copy)]
struct Grant {
    page: usize,
    gref: GrantRef,
    /// From the queue's persistent pool (returned there, never revoked, after the request).
    persistent: bool,
}

/// A request in flight.
struct Shadow {
    tag: u64,
    /// Data pages, in order.
    data: Vec<Grant>,
    /// Indirect pages (from the persistent pool when persistent grants are in use, as Linux
    /// blkfront's `get_indirect_grant`).
    indirect: Vec<Grant>,
    /// For reads: sectors, and offset of the data in the first page.
    read: Option<(u64, usize)>,
}

struct Queue {
    ring: FrontRing<Arc<dyn MappedRegion>>,
    ring_first_page: usize,
    ring_grants: Vec<GrantRef>,
    evtchn: Box<dyn EventChannel>,
    shadow: Vec<Option<Shadow>>,
    free_ids: Vec<u64>,
    /// Persistent grants not in use (LIFO).
    pool: Vec<Grant>,
    /// Persistent grants in total.
    pool_total: usize,
    /// Requests pushed while plugged and not yet published.
    unpublished: bool,
}

/// A connected (or disconnected) frontend.
pub struct Frontend {
    dom: Arc<SimDomain>,
    mem: Arc<dyn MappedRegion>,
    xs: Client,
    fe: String,
    be: String,
    be_domid: DomId,
    cfg: FrontConfig,
    alloc: PageAlloc,
    queues: Vec<Queue>,
    info: DiskInfo,
    be_watch: Watch,
    next_tag: u64,
    ready: VecDeque<Completion>,
    leaked: usize,
    connected: bool,
    abi: Abi,
    /// Byte buffers for read data and write data, reused ([`Frontend::buffer`],
    /// [`Frontend::recycle`]).
    bufs: Vec<Vec<u8>>,
    /// Spare `Shadow` page lists (no allocation per request).
    spare_grants: Vec<Vec<Grant>>,
    /// [`Frontend::plug`]ged: requests are published in batches.
    plugged: bool,
}

/// Most byte buffers kept for reuse.
const MAX_POOLED_BUFFERS: usize = 1024;
/// Largest byte buffer kept for reuse.
const MAX_POOLED_BUFFER: usize = 4 << 20;

impl std::fmt::Debug for Frontend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Frontend")
            .field("fe", &self.fe)
            .field("be", &self.be)
            .field("info", &self.info)
            .finish()
    }
}

fn read_opt(xs: &Client, path: &str) -> Result<Option<String>> {
    match xs.read_string(path) {
        Ok(v) => Ok(Some(v)),
        Err(e) if e.errno() == Some(Errno::ENOENT) => Ok(None),
        Err(e) => Err(xs_err(path)(e)),
    }
}

impl Frontend {
    /// Connects to the backend of the device whose frontend directory is `fe_dir` (e.g.
    /// `/local/domain/5/device/vbd/768`), as the guest `dom` with its xenstore connection
    /// `xs`. Returns once both ends are `Connected`.
    pub fn connect(
        xs: Client,
        dom: Arc<SimDomain>,
        fe_dir: &str,
        cfg: FrontConfig,
    ) -> Result<Frontend> {
        let fe = fe_dir.trim_end_matches('/').to_owned();
        let be = match &cfg.backend_dir {
            Some(b) => b.clone(),
            None => read_opt(&xs, &format!("{fe}/backend"))?.ok_or_else(|| Error::Node {
                node: format!("{fe}/backend"),
                reason: "missing".into(),
            })?,
        };
        let be_domid = match cfg.backend_domid {
            Some(d) => d,
            None => {
                let p = format!("{fe}/backend-id");
                let v = read_opt(&xs, &p)?.unwrap_or_else(|| "0".into());
                parse_u32(&v)
                    .ok()
                    .and_then(|d| DomId::try_from(d).ok())
                    .ok_or(Error::Node {
                        node: p,
                        reason: format!("invalid {v:?}"),
                    })?
            }
        };
        let token = format!("xdisk-blkfront:{fe}");
        let be_watch = xs
            .watch(&format!("{be}/state"), &token)
            .map_err(xs_err(&be))?;
        let mem = dom.pages_region(0, dom.pages())?;
        let abi = cfg.protocol.unwrap_or(Abi::Native);
        let mut f = Frontend {
            alloc: PageAlloc::new(dom.pages()),
            dom,
            mem,
            xs,
            fe,
            be,
            be_domid,
            cfg,
            queues: Vec::new(),
            info: DiskInfo::default(),
            be_watch,
            next_tag: 1,
            ready: VecDeque::new(),
            leaked: 0,
            connected: false,
            abi,
            bufs: Vec::new(),
            spare_grants: Vec::new(),
            plugged: false,
        };
        f.talk_to_backend()?;
        Ok(f)
    }

    /// What was negotiated.
    pub fn info(&self) -> &DiskInfo {
        &self.info
    }

    /// The frontend directory.
    pub fn frontend_dir(&self) -> &str {
        &self.fe
    }

    /// The backend directory.
    pub fn backend_dir(&self) -> &str {
        &self.be
    }

    /// The guest.
    pub fn domain(&self) -> &Arc<SimDomain> {
        &self.dom
    }

    /// The xenstore connection.
    pub fn xenstore(&self) -> &Client {
        &self.xs
    }

    /// Whether the rings are up.
    pub fn is_connected(&self) -> bool {
        self.connected
    }

    /// Grants the backend still held when the frontend tried to revoke them (0 for a backend
    /// that unmaps everything it should).
    pub fn leaked_grants(&self) -> usize {
        self.leaked
    }

    /// Requests in flight on all queues.
    pub fn in_flight(&self) -> usize {
        self.queues
            .iter()
            .map(|q| q.shadow.iter().filter(|s| s.is_some()).count())
            .sum()
    }

    /// Persistent grants held by the frontend (all queues).
    pub fn persistent_grants(&self) -> usize {
        self.queues.iter().map(|q| q.pool_total).sum()
    }

    fn path(&self, key: &str) -> String {
        format!("{}/{key}", self.fe)
    }

    fn be_path(&self, key: &str) -> String {
        format!("{}/{key}", self.be)
    }

    fn read_be(&self, key: &str) -> Result<Option<String>> {
        read_opt(&self.xs, &self.be_path(key))
    }

    fn be_u64(&self, key: &str, default: u64) -> Result<u64> {
        match self.read_be(key)? {
            None => Ok(default),
            Some(v) => parse_u64(&v).map_err(|e| Error::Node {
                node: self.be_path(key),
                reason: e.to_string(),
            }),
        }
    }

    fn be_bool(&self, key: &str) -> Result<bool> {
        match self.read_be(key)? {
            None => Ok(false),
            Some(v) => parse_bool(&v).map_err(|e| Error::Node {
                node: self.be_path(key),
                reason: e.to_string(),
            }),
        }
    }

    /// The backend's state (`Unknown` if the node is absent or invalid).
    pub fn backend_state(&self) -> Result<XenbusState> {
        Ok(self
            .read_be(keys::STATE)?
            .and_then(|v| v.parse().ok())
            .unwrap_or(XenbusState::Unknown))
    }

    /// Waits until the backend's state satisfies `want`; fails on timeout, or when `fail`
    /// says the state is an error.
    pub fn wait_backend(
        &self,
        what: &str,
        want: impl Fn(XenbusState) -> bool,
        fail: impl Fn(XenbusState) -> bool,
    ) -> Result<XenbusState> {
        let deadline = Instant::now() + self.cfg.timeout;
        loop {
            let s = self.backend_state()?;
            if want(s) {
                return Ok(s);
            }
            if fail(s) {
                return Err(Error::BackendState(s, what.to_owned()));
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(Error::Timeout(format!("{what} (backend is {})", s.name())));
            }
            let _ = self.be_watch.recv_timeout(deadline - now);
        }
    }

    fn set_state(&self, s: XenbusState) -> Result<()> {
        let p = self.path(keys::STATE);
        self.xs.write(&p, s.to_string()).map_err(xs_err(&p))
    }

    /// Linux blkfront's `talk_to_blkback` and `blkfront_connect`.
    fn talk_to_backend(&mut self) -> Result<()> {
        // A backend still Closed from a previous connection moves to InitWait once it sees
        // our Initialising.
        self.wait_backend(
            "the backend's InitWait",
            |s| s == XenbusState::InitWait,
            |s| s == XenbusState::Closing,
        )?;
        let max_order = self.be_u64(keys::MAX_RING_PAGE_ORDER, 0)?;
        let order = (self.cfg.max_ring_page_order as u64).min(max_order) as u32;
        let max_queues = self.be_u64(keys::MULTI_QUEUE_MAX_QUEUES, 1)?.max(1);
        let nr_queues = (self.cfg.max_queues.max(1) as u64).min(max_queues) as usize;
        let be_persistent = self.be_bool(keys::FEATURE_PERSISTENT)?;
        let persistent = self.cfg.persistent && be_persistent;

        let mut queues = Vec::with_capacity(nr_queues);
        for _ in 0..nr_queues {
            match self.setup_queue(order) {
                Ok(q) => queues.push(q),
                Err(e) => {
                    for q in queues {
                        self.free_queue(q);
                    }
                    return Err(e);
                }
            }
        }
        self.queues = queues;
        let ring_size = self.queues.first().map_or(0, |q| q.ring.size());

        // The nodes, then Initialised (blkif.h "Feature and Parameter Negotiation").
        let mb = self.cfg.misbehave.clone();
        let mut nodes: Vec<(String, String)> = Vec::new();
        for (i, q) in self.queues.iter().enumerate() {
            let dir = if nr_queues == 1 {
                String::new()
            } else {
                keys::queue_dir(i as u32)
            };
            for (j, g) in q.ring_grants.iter().enumerate() {
                let key = if order == 0 {
                    keys::RING_REF.to_owned()
                } else {
                    keys::ring_ref(j as u32)
                };
                let v = match (&mb.ring_ref, i, j) {
                    (Some(bad), 0, 0) => bad.clone(),
                    _ => g.to_string(),
                };
                nodes.push((format!("{dir}{key}"), v));
            }
            let port = match (&mb.event_channel, i) {
                (Some(bad), 0) => bad.clone(),
                _ => q.evtchn.local_port().to_string(),
            };
            nodes.push((format!("{dir}{}", keys::EVENT_CHANNEL), port));
        }
        if order > 0 {
            nodes.push((keys::RING_PAGE_ORDER.into(), order.to_string()));
        }
        if nr_queues > 1 {
            nodes.push((keys::MULTI_QUEUE_NUM_QUEUES.into(), nr_queues.to_string()));
        }
        if let Some(p) = mb.protocol.clone() {
            nodes.push((keys::PROTOCOL.into(), p));
        } else if let Some(abi) = self.cfg.protocol {
            nodes.push((keys::PROTOCOL.into(), abi.protocol_name().into()));
        }
        nodes.push((
            keys::FEATURE_PERSISTENT.into(),
            if self.cfg.persistent { "1" } else { "0" }.into(),
        ));
        nodes.extend(mb.extra_nodes.iter().cloned());
        let fe = self.fe.clone();
        self.xs
            .transaction(|tx| {
                for (k, v) in &nodes {
                    tx.write(&format!("{fe}/{k}"), v)?;
                }
                tx.write(
                    &format!("{fe}/{}", keys::STATE),
                    XenbusState::Initialised.to_string(),
                )
            })
            .map_err(xs_err(&fe))?;

        self.wait_backend(
            "the backend's Connected",
            |s| s == XenbusState::Connected,
            |s| matches!(s, XenbusState::Closing | XenbusState::Closed),
        )?;
        self.read_disk_info()?;
        let max_indirect = self.be_u64(keys::FEATURE_MAX_INDIRECT_SEGMENTS, 0)?;
        self.info.max_indirect_segments =
            (self.cfg.max_indirect_segments as u64).min(max_indirect) as u16;
        self.info.persistent = persistent;
        self.info.ring_page_order = order;
        self.info.queues = nr_queues;
        self.info.ring_size = ring_size;
        self.set_state(XenbusState::Connected)?;
        self.connected = true;
        Ok(())
    }

    /// Re-reads `sectors`, `info`, sector sizes and features (after a resize, too).
    pub fn read_disk_info(&mut self) -> Result<()> {
        let sector_size = self.be_u64(keys::SECTOR_SIZE, 512)? as u32;
        self.info.sectors = self.be_u64(keys::SECTORS, 0)?;
        self.info.sector_size = sector_size;
        self.info.physical_sector_size =
            self.be_u64(keys::PHYSICAL_SECTOR_SIZE, u64::from(sector_size))? as u32;
        self.info.info = self.be_u64(keys::INFO, 0)? as u32;
        self.info.flush = self.be_bool(keys::FEATURE_FLUSH_CACHE)?;
        self.info.barrier = self.be_bool(keys::FEATURE_BARRIER)?;
        self.info.discard = self.be_bool(keys::FEATURE_DISCARD)?;
        self.info.discard_granularity = self.be_u64(keys::DISCARD_GRANULARITY, 512)? as u32;
        self.info.discard_secure = self.be_bool(keys::DISCARD_SECURE)?;
        Ok(())
    }

    fn setup_queue(&mut self, order: u32) -> Result<Queue> {
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

    /// Revokes a grant and frees its page; a grant the backend still holds is counted as
    /// leaked and its page stays allocated.
    fn release(&mut self, g: Grant) {
        match self.dom.end_grant(g.gref) {
            Ok(true) => self.alloc.free(g.page, 1),
            _ => {
                tracing::warn!(gref = g.gref, "backend still holds a grant");
                self.leaked += 1;
            }
        }
    }

    fn free_queue(&mut self, mut q: Queue) {
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

    /// Revokes every page of `s` (persistent ones too: the queue is going away).
    fn release_shadow(&mut self, s: Shadow) {
        for g in s.indirect.into_iter().chain(s.data) {
            self.release(g);
        }
    }

    /// Largest number of sectors one request may carry.
    pub fn max_request_sectors(&self) -> u64 {
        let segs = (self.info.max_indirect_segments as usize).max(BLKIF_MAX_SEGMENTS_PER_REQUEST);
        segs as u64 * u64::from(SECTORS_PER_PAGE) - u64::from(self.cfg.first_sect.min(7))
    }

    /// A data page: from the persistent pool (granted read-write once) or newly granted.
    fn data_page(&mut self, qi: usize, persistent: bool, readonly: bool) -> Result<Grant> {
        if persistent {
            if let Some(g) = self.queues[qi].pool.pop() {
                return Ok(g);
            }
            if self.queues[qi].pool_total < self.cfg.max_persistent_grants {
                let page = self.alloc.alloc(1).ok_or(Error::NoMemory)?;
                let gref = match self.dom.grant(page, self.be_domid, false) {
                    Ok(g) => g,
                    Err(e) => {
                        self.alloc.free(page, 1);
                        return Err(e.into());
                    }
                };
                self.queues[qi].pool_total += 1;
                return Ok(Grant {
                    page,
                    gref,
                    persistent: true,
                });
            }
        }
        let page = self.alloc.alloc(1).ok_or(Error::NoMemory)?;
        match self.dom.grant(page, self.be_domid, readonly) {
            Ok(gref) => Ok(Grant {
                page,
                gref,
                persistent: false,
            }),
            Err(e) => {
                self.alloc.free(page, 1);
                Err(e.into())
            }
        }
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

    /// Returns the pages of a finished (or failed) request: persistent ones to the queue's
    /// pool, the others revoked.
    fn release_shadow_local(&mut self, queue: usize, s: Shadow) {
        let Shadow {
            mut data,
            mut indirect,
            ..
        } = s;
        for list in [&mut data, &mut indirect] {
            for g in list.drain(..) {
                if g.persistent {
                    self.queues[queue].pool.push(g);
                } else {
                    self.release(g);
                }
            }
        }
        self.spare_grants.push(data);
        self.spare_grants.push(indirect);
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
        let mut segs: Vec<Segment> = Vec::new();
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
            let fds: Vec<i32> = self.queues.iter().map(|q| q.evtchn.fd()).collect();
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
            let fds: Vec<i32> = self.queues.iter().map(|q| q.evtchn.fd()).collect();
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
    fn reap(&mut self, qi: usize) -> Result<()> {
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

    /// Submits on `queue`, waiting for ring space, and waits for the completion.
    pub fn run(&mut self, queue: usize, op: Op) -> Result<Completion> {
        let deadline = Instant::now() + self.cfg.timeout;
        let tag = loop {
            match self.submit(queue, op.clone()) {
                Err(Error::RingFull(_)) if Instant::now() < deadline => {
                    let done = self.poll(Duration::from_millis(50))?;
                    self.ready.extend(done);
                }
                other => break other?,
            }
        };
        self.wait(tag)
    }

    fn check(c: Completion) -> Result<Completion> {
        match c.status {
            Status::Okay => Ok(c),
            s => Err(Error::Failed(s)),
        }
    }

    /// Reads `sectors` sectors at `sector` (split into requests as large as allowed, spread
    /// over the queues, all in flight at once).
    pub fn read(&mut self, sector: u64, sectors: u64) -> Result<Vec<u8>> {
        let chunk = self.max_request_sectors();
        let mut tags = Vec::new();
        let mut s = 0;
        let mut i = 0;
        while s < sectors {
            let n = chunk.min(sectors - s);
            let q = i % self.queues.len().max(1);
            let op = Op::Read {
                sector: sector + s,
                sectors: n as u32,
            };
            tags.push(self.submit_waiting(q, op)?);
            s += n;
            i += 1;
        }
        let mut out = Vec::with_capacity(sectors as usize * SECTOR_SIZE);
        for t in tags {
            let c = Self::check(self.wait(t)?)?;
            out.extend(c.data.unwrap_or_default());
        }
        Ok(out)
    }

    /// Writes `data` at `sector` (split like [`Frontend::read`]).
    pub fn write(&mut self, sector: u64, data: &[u8]) -> Result<()> {
        let chunk = self.max_request_sectors() as usize * SECTOR_SIZE;
        let mut tags = Vec::new();
        for (i, piece) in data.chunks(chunk).enumerate() {
            let q = i % self.queues.len().max(1);
            let op = Op::Write {
                sector: sector + (i * chunk / SECTOR_SIZE) as u64,
                data: piece.to_vec(),
            };
            tags.push(self.submit_waiting(q, op)?);
        }
        let mut result = Ok(());
        for t in tags {
            if let Err(e) = Self::check(self.wait(t)?) {
                result = Err(e);
            }
        }
        result
    }

    fn submit_waiting(&mut self, queue: usize, op: Op) -> Result<u64> {
        let deadline = Instant::now() + self.cfg.timeout;
        loop {
            match self.submit(queue, op.clone()) {
                Err(Error::RingFull(_)) if Instant::now() < deadline => {
                    let done = self.poll(Duration::from_millis(50))?;
                    self.ready.extend(done);
                }
                other => return other,
            }
        }
    }

    /// `BLKIF_OP_FLUSH_DISKCACHE` on queue 0.
    pub fn flush(&mut self) -> Result<()> {
        Self::check(self.run(0, Op::Flush)?).map(drop)
    }

    /// `BLKIF_OP_DISCARD` on queue 0.
    pub fn discard(&mut self, sector: u64, nr_sectors: u64) -> Result<()> {
        Self::check(self.run(
            0,
            Op::Discard {
                sector,
                nr_sectors,
                secure: false,
            },
        )?)
        .map(drop)
    }

    // ---- Teardown and reconnection ----

    /// Closes the device: `Closing`, waits for the backend to close, revokes every grant
    /// (counting those the backend still holds in [`Frontend::leaked_grants`]), frees the
    /// rings and event channels, `Closed`.
    pub fn disconnect(&mut self) -> Result<()> {
        self.set_state(XenbusState::Closing)?;
        let r = self.wait_backend(
            "the backend to close",
            |s| matches!(s, XenbusState::Closing | XenbusState::Closed),
            |_| false,
        );
        // Late responses (the backend answers everything it consumed before closing).
        for qi in 0..self.queues.len() {
            let _ = self.reap(qi);
        }
        self.free_all();
        self.set_state(XenbusState::Closed)?;
        r.map(drop)
    }

    fn free_all(&mut self) {
        self.connected = false;
        for q in std::mem::take(&mut self.queues) {
            self.free_queue(q);
        }
    }

    /// After [`Frontend::disconnect`] (or a backend-initiated close): `Initialising`, waits
    /// for the backend's `InitWait`, and negotiates and connects again.
    pub fn reconnect(&mut self) -> Result<()> {
        if !self.queues.is_empty() {
            self.free_all();
        }
        // [`Frontend::disconnect`] returns once the backend is Closing: it goes Closed when
        // it sees our Closed. Initialising before that would find it Closing, which
        // talk_to_backend takes as a refusal.
        self.wait_backend(
            "the backend to finish closing",
            |s| s != XenbusState::Closing,
            |_| false,
        )?;
        self.set_state(XenbusState::Initialising)?;
        self.talk_to_backend()
    }

    /// Linux blkfront's `blkback_changed` while connected: takes the events of the watch on
    /// the backend's `state` and, if there were any and the backend is still `Connected`,
    /// re-reads the disk properties (an online resize rewrites `sectors`, then `state`).
    /// Returns the new size in sectors when it changed. Cheap when nothing happened.
    pub fn check_backend(&mut self) -> Result<Option<u64>> {
        let mut fired = false;
        while self.be_watch.try_recv().is_some() {
            fired = true;
        }
        if !fired || !self.connected || self.backend_state()? != XenbusState::Connected {
            return Ok(None);
        }
        let before = self.info.sectors;
        self.read_disk_info()?;
        Ok((self.info.sectors != before).then_some(self.info.sectors))
    }

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_alloc() {
        let mut a = PageAlloc::new(10);
        assert_eq!(a.alloc(4), Some(0));
        assert_eq!(a.alloc(4), Some(4));
        assert_eq!(a.alloc(4), None);
        assert_eq!(a.alloc(2), Some(8));
        a.free(4, 4);
        assert_eq!(a.alloc(1), Some(4));
        assert_eq!(a.alloc(3), Some(5));
        assert_eq!(a.alloc(1), None);
        a.free(0, 10);
        assert_eq!(a.alloc(10), Some(0));
        assert_eq!(a.alloc(0), None);
        assert_eq!(PageAlloc::new(3).alloc(4), None);
    }
}
