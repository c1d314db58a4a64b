//! One queue (ring) of a connected device: a thread that consumes requests from the shared
//! ring, runs them on an [`ImageQueue`] and answers them.
//!
//! The loop follows Linux blkback's `xen_blkif_schedule`/`do_block_io_op` and ring.h's rules:
//! `req_prod` is read once per batch and checked against the ring size
//! ([`BackRing::begin_batch`], ring.h `RING_REQUEST_PROD_OVERFLOW`), each slot is copied once
//! and parsed from the copy, responses are published with
//! `RING_PUSH_RESPONSES_AND_CHECK_NOTIFY` and the frontend is notified only when it asked,
//! and the thread sleeps (poll) only after `RING_FINAL_CHECK_FOR_REQUESTS` found nothing.
//! The ring bounds the work: a request holds its slot until answered, so at most `RING_SIZE`
//! requests are in flight.
//!
//! Ordering: `BLKIF_OP_FLUSH_DISKCACHE` is started once every write consumed before it has
//! completed; `BLKIF_OP_WRITE_BARRIER` stops consumption, waits until nothing is in flight,
//! writes its data, flushes, answers, and only then consumption resumes (blkif.h: "the
//! barrier ... ensures that all previous writes are complete ... before any subsequent write").

use std::collections::VecDeque;
use std::os::unix::io::RawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use xdisk_blkif::ring::ParsedRequest;
use xdisk_blkif::wire::{
    DirectIo, Indirect, IndirectOp, Request, RequestKind, Response, Segment, Status,
    BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST, PAGE_SIZE,
};
use xdisk_blkif::{BackRing, RingError};
use xdisk_image::queue::{ImageQueue, IoDone, IoKind, IoRequest, QueueConfig};
use xdisk_image::Image;
use xdisk_io::sys::{drain_eventfd, EventFd};
use xdisk_io::Slab;
use xdisk_xen::platform::{DomId, EventChannel, MappedRegion};

use crate::datapath::GuestData;
use crate::stats::{add, sub, Counters};

/// What the reactor may do, fixed at connect time.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Features {
    pub flush: bool,
    pub barrier: bool,
    pub discard: bool,
    pub discard_secure: bool,
    pub read_only: bool,
}

/// A stop request for a reactor: a flag and an eventfd to wake its poll. The same eventfd
/// announces commands of the control thread ([`QueueCmd`]).
pub(crate) struct Stop {
    flag: AtomicBool,
    command: AtomicBool,
    event: EventFd,
}

impl Stop {
    pub fn new() -> std::io::Result<Stop> {
        Ok(Stop {
            flag: AtomicBool::new(false),
            command: AtomicBool::new(false),
            event: EventFd::new()?,
        })
    }
    pub fn request(&self) {
        self.flag.store(true, Ordering::SeqCst);
        self.event.signal();
    }
    fn requested(&self) -> bool {
        self.flag.load(Ordering::SeqCst)
    }
    /// Wakes the reactor to read its command channel.
    pub fn command(&self) {
        self.command.store(true, Ordering::SeqCst);
        self.event.signal();
    }
}

/// What the control thread asks of a running queue to change its image under it (a live
/// snapshot) or to work on the image with nothing in flight (live bitmap changes). Each
/// carries the number of the operation, echoed in the [`QueueAck`].
pub(crate) enum QueueCmd {
    /// Stop consuming requests from the ring, complete everything consumed (flushes and
    /// barriers included), answer it, then ack [`QueueAck::Paused`] and wait.
    Pause,
    /// While paused: build an image queue over this image (kept aside), ack
    /// [`QueueAck::Prepared`].
    Prepare(Arc<Image>),
    /// While paused: serve the image prepared from now on (the old queue is dropped).
    Commit,
    /// While paused: drop the image queue prepared.
    Abort,
    /// Consume requests again.
    Resume,
}

/// A queue's answer to a [`QueueCmd`].
pub(crate) enum QueueAck {
    /// Nothing is in flight and nothing is consumed until [`QueueCmd::Resume`].
    Paused,
    /// The outcome of [`QueueCmd::Prepare`].
    Prepared(Result<(), String>),
}

/// The command channel of one queue: commands in, acknowledgements (queue, operation,
/// answer) out.
pub(crate) struct QueueControl {
    pub commands: mpsc::Receiver<(u64, QueueCmd)>,
    pub acks: mpsc::Sender<(u32, u64, QueueAck)>,
    pub queue_cfg: QueueConfig,
}

/// How a reactor ended.
#[derive(Debug)]
pub(crate) enum Exit {
    /// Asked to stop.
    Stopped,
    /// The frontend broke the ring protocol: disconnect the device.
    ProtocolError(String),
    /// I/O in flight could not be waited out: its buffers (guest mappings) are leaked, never
    /// unmapped, and the device must be failed.
    IoStuck(String),
}

/// What a reactor needs.
pub(crate) struct QueueParts {
    pub qid: u32,
    pub domid: DomId,
    pub ring: BackRing<Arc<dyn MappedRegion>>,
    pub evtchn: Box<dyn EventChannel>,
    pub counters: Arc<Counters>,
    pub sectors: Arc<AtomicU64>,
    pub features: Features,
    pub stop: Arc<Stop>,
    pub control: QueueControl,
    /// [`crate::DeviceConfig::poll_us`]: how long to busy-poll before sleeping.
    pub poll: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Read,
    Write,
    Flush,
    Barrier,
    Discard { len: u64, secure: bool },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// Not submitted yet (a flush waiting for earlier writes, a barrier waiting for the drain).
    Waiting,
    /// The data (or discard) operation is running.
    Data,
    /// The flush is running.
    Flush,
}

/// A request consumed from the ring and not answered yet.
struct Pending {
    id: u64,
    /// The operation to answer with.
    op: u8,
    kind: Kind,
    stage: Stage,
    sector: u64,
    /// Sequence number of this request's write or discard (0: none).
    wseq: u64,
    /// Flushes and barriers: every write numbered below this must be complete first.
    fseq: u64,
    segs: Vec<Segment>,
    has_data: bool,
    /// When it was consumed (the reactor's clock then), for the latency histograms.
    start: Instant,
    /// The requests served by this one's image operation besides itself (a merged run of
    /// contiguous reads or writes, see [`Run`]): answered with it.
    followers: Vec<usize>,
}

/// Contiguous reads, or writes, of one batch go to the image as one operation of at most this
/// many bytes: dom0's blkfront splits a 1 MiB read into eight 128 KiB blkif requests (its
/// default of 32 indirect segments), and Linux's loop device under blkback merges them again
/// (up to its `max_sectors_kb`, 1280).
const MAX_RUN_BYTES: u64 = 1 << 20;

/// And of at most this many segments (one iovec each; `IOV_MAX` is 1024).
const MAX_RUN_SEGS: usize = 1024;

/// Reads or writes consumed in this batch and not submitted yet, each starting where the one
/// before ended: submitted together as one image operation by [`Reactor::submit_run`] when
/// the next request does not continue them, or at the end of the batch (nothing waits for a
/// later batch).
struct Run {
    kind: Kind,
    /// The sector after the last request.
    end: u64,
    bytes: u64,
    segs: usize,
    /// Slab indices, in order.
    members: Vec<usize>,
}

/// Sequence numbers of the writes in flight, in order: numbers are taken in increasing order
/// and inserted when taken, so an insert appends; a completion removes its own (binary
/// search). Unlike a `BTreeSet` it allocates nothing once it has held a ring's worth (the
/// ring bounds it).
#[derive(Default)]
struct SeqSet(VecDeque<u64>);

impl SeqSet {
    fn insert(&mut self, seq: u64) {
        match self.0.back() {
            Some(&last) if last >= seq => {
                // Not taken in order (never on the reactor's paths): keep the order anyway.
                let at = self.0.partition_point(|&s| s < seq);
                if self.0.get(at) != Some(&seq) {
                    self.0.insert(at, seq);
                }
            }
            _ => self.0.push_back(seq),
        }
    }

    fn remove(&mut self, seq: u64) {
        if let Ok(at) = self.0.binary_search(&seq) {
            self.0.remove(at);
        }
    }

    /// Whether a number below `seq` is in the set.
    fn any_below(&self, seq: u64) -> bool {
        self.0.front().is_some_and(|&s| s < seq)
    }
}

pub(crate) struct Reactor<D: GuestData> {
    qid: u32,
    domid: DomId,
    ring: BackRing<Arc<dyn MappedRegion>>,
    evtchn: Box<dyn EventChannel>,
    data: D,
    iq: ImageQueue<D::Buf>,
    counters: Arc<Counters>,
    sectors: Arc<AtomicU64>,
    feat: Features,
    stop: Arc<Stop>,
    slab: Slab<Pending>,
    responses: Vec<Response>,
    done: Vec<IoDone<D::Buf>>,
    next_seq: u64,
    /// Writes and discards submitted and not completed, by sequence number.
    writes: SeqSet,
    /// Flushes waiting for earlier writes (slab indices), in order.
    flushes: VecDeque<usize>,
    /// The barrier that holds up consumption.
    barrier: Option<usize>,
    /// Requests submitted to the image queue and not completed.
    submitted: usize,
    stopping: bool,
    /// Copies of the indirect pages of the request being parsed.
    indirect_pages: Vec<[u8; PAGE_SIZE]>,
    /// Segment lists of finished requests, for reuse.
    spare_segs: Vec<Vec<Segment>>,
    /// The time of the current batch: read once per batch of requests consumed and once per
    /// batch of completions (the latency histograms cost no clock read per request).
    clock: Instant,
    control: QueueControl,
    /// A pause asked for (the operation's number): nothing more is consumed; once nothing
    /// is in flight the queue acks and waits.
    pausing: Option<u64>,
    /// Contiguous reads or writes of the current batch waiting to be submitted together.
    run: Option<Run>,
    /// The member list of the last single-request run, for the next run (no allocation per
    /// request).
    spare_members: Vec<usize>,
    /// How long to busy-poll for completions and requests before sleeping (zero: never).
    poll: Duration,
}

fn io_status(r: &xdisk_image::Result<()>) -> Status {
    match r {
        Ok(()) => Status::Okay,
        Err(xdisk_image::Error::Unsupported(_)) => Status::EOpNotSupp,
        Err(_) => Status::Error,
    }
}

impl<D: GuestData> Reactor<D> {
    pub fn new(parts: QueueParts, data: D, iq: ImageQueue<D::Buf>) -> Reactor<D> {
        add(&parts.counters.queues, 1);
        Reactor {
            qid: parts.qid,
            domid: parts.domid,
            ring: parts.ring,
            evtchn: parts.evtchn,
            data,
            iq,
            counters: parts.counters,
            sectors: parts.sectors,
            feat: parts.features,
            stop: parts.stop,
            slab: Slab::new(),
            responses: Vec::new(),
            done: Vec::new(),
            next_seq: 1,
            writes: SeqSet::default(),
            flushes: VecDeque::new(),
            barrier: None,
            submitted: 0,
            stopping: false,
            indirect_pages: Vec::new(),
            spare_segs: Vec::new(),
            clock: Instant::now(),
            control: parts.control,
            pausing: None,
            run: None,
            spare_members: Vec::new(),
            poll: parts.poll,
        }
    }

    /// Runs until stopped or until the frontend breaks the protocol. Every request consumed
    /// is answered, and all its I/O has completed, before this returns: dropping the reactor
    /// afterwards unmaps nothing that the kernel still uses.
    pub fn run(mut self) -> Exit {
        let exit = self.event_loop();
        self.stopping = true;
        if let Err(e) = self.drain() {
            tracing::error!(
                queue = self.qid,
                domid = self.domid,
                ?exit,
                "queue stopped: {e}"
            );
            return Exit::IoStuck(e);
        }
        tracing::debug!(queue = self.qid, domid = self.domid, ?exit, "queue stopped");
        exit
    }

    fn event_loop(&mut self) -> Exit {
        loop {
            if self.stop.requested() {
                return Exit::Stopped;
            }
            // A load first: the hot loop does no atomic write while nothing is asked.
            if self.stop.command.load(Ordering::Relaxed)
                && self.stop.command.swap(false, Ordering::SeqCst)
            {
                drain_eventfd(self.stop.event.fd());
                if let Some(exit) = self.take_commands() {
                    return exit;
                }
            }
            // Completions first, answered before new I/O is submitted: the frontend refills
            // its ring while this thread is in the kernel submitting.
            let answered = match self.complete(false) {
                Ok(n) => n > 0,
                Err(e) => {
                    tracing::error!(queue = self.qid, "cannot reap I/O: {e}");
                    false
                }
            };
            if let Err(e) = self.respond() {
                return Exit::ProtocolError(e.to_string());
            }
            if self.barrier.is_none() && self.pausing.is_none() {
                if let Err(e) = self.consume() {
                    return Exit::ProtocolError(e.to_string());
                }
            }
            self.run_deferred();
            // Requests answered without I/O (invalid ones, say).
            if let Err(e) = self.respond() {
                return Exit::ProtocolError(e.to_string());
            }
            if let Some(op) = self.pausing {
                if self.slab.is_empty() && self.submitted == 0 {
                    if let Some(exit) = self.paused(op) {
                        return exit;
                    }
                    continue;
                }
            }
            // Completions were answered: the frontend refills its ring on seeing them, so
            // look again before asking it for a notification (as before this sleep pushed
            // I/O: at queue depth 32 going to sleep here cost a third of the IOPS).
            if answered {
                if let Err(e) = self.iq.commit() {
                    tracing::error!(queue = self.qid, "cannot submit I/O: {e}");
                }
                continue;
            }
            // Busy-poll before asking for a notification (with `poll_us`): the requests'
            // event is not armed meanwhile, so the frontend does not notify either.
            if self.poll_before_sleep() {
                continue;
            }
            // More requests already on the ring: push what this batch queued and go on.
            // Otherwise the sleep pushes it (with io_uring in the system call that waits: at
            // queue depth 1 one `io_uring_enter` per request instead of a submit, a poll and
            // an eventfd read). Completions that arrived meanwhile end the sleep at once.
            if self.barrier.is_none() && self.pausing.is_none() {
                match self.ring.final_check_for_requests() {
                    Ok(true) => {
                        if let Err(e) = self.iq.commit() {
                            tracing::error!(queue = self.qid, "cannot submit I/O: {e}");
                        }
                        continue;
                    }
                    Ok(false) => {}
                    Err(e) => return Exit::ProtocolError(e.to_string()),
                }
            }
            self.sleep();
        }
    }

    /// Reads the commands of the control thread that arrived while running.
    fn take_commands(&mut self) -> Option<Exit> {
        loop {
            match self.control.commands.try_recv() {
                Ok((op, QueueCmd::Pause)) => self.pausing = Some(op),
                Ok((op, QueueCmd::Prepare(_))) => {
                    // Only meaningful while paused.
                    self.ack(
                        op,
                        QueueAck::Prepared(Err("the queue is not paused".into())),
                    );
                }
                // A pause given up before this queue got there.
                Ok((_, QueueCmd::Resume)) => self.pausing = None,
                Ok((_, QueueCmd::Commit | QueueCmd::Abort)) => {}
                Err(mpsc::TryRecvError::Empty) => return None,
                Err(mpsc::TryRecvError::Disconnected) => return Some(Exit::Stopped),
            }
        }
    }

    fn ack(&self, op: u64, a: QueueAck) {
        let _ = self.control.acks.send((self.qid, op, a));
    }

    /// Paused with nothing in flight: acks, then serves the control thread's commands until
    /// it says resume (or the queue is stopped).
    fn paused(&mut self, op: u64) -> Option<Exit> {
        self.pausing = None;
        tracing::debug!(queue = self.qid, op, "queue paused");
        self.ack(op, QueueAck::Paused);
        let mut next: Option<ImageQueue<D::Buf>> = None;
        loop {
            if self.stop.requested() {
                return Some(Exit::Stopped);
            }
            match self
                .control
                .commands
                .recv_timeout(Duration::from_millis(50))
            {
                Ok((op, QueueCmd::Pause)) => self.ack(op, QueueAck::Paused),
                Ok((op, QueueCmd::Prepare(image))) => {
                    let r = match ImageQueue::new(image, &self.control.queue_cfg) {
                        Ok(q) => {
                            next = Some(q);
                            Ok(())
                        }
                        Err(e) => Err(e.to_string()),
                    };
                    self.ack(op, QueueAck::Prepared(r));
                }
                Ok((_, QueueCmd::Commit)) => {
                    if let Some(q) = next.take() {
                        // Nothing is in flight on the old queue: dropping it waits for
                        // nothing.
                        self.iq = q;
                    }
                }
                Ok((_, QueueCmd::Abort)) => next = None,
                Ok((_, QueueCmd::Resume)) => {
                    tracing::debug!(queue = self.qid, "queue resumed");
                    return None;
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => return Some(Exit::Stopped),
            }
        }
    }

    /// Busy-polls the image queue's completions and the ring's requests for up to
    /// `self.poll` ([`crate::DeviceConfig::poll_us`], QEMU's iothread `poll-max-ns`): work
    /// that arrives within the window is taken without the two wake-ups of a sleeping thread
    /// (the event channel's, the completion's), which cost a request at queue depth 1 more
    /// than its I/O on a loaded or virtualised dom0. True when work (or a stop) arrived.
    /// What is queued is pushed first. The clock is read every 64 rounds only: a PV dom0
    /// without a vDSO clock makes every read a system call.
    fn poll_before_sleep(&mut self) -> bool {
        if self.poll.is_zero() {
            return false;
        }
        if let Err(e) = self.iq.commit() {
            tracing::error!(queue = self.qid, "cannot submit I/O: {e}");
        }
        let start = Instant::now();
        let mut round = 0u32;
        loop {
            if self.stop.requested() || self.stop.command.load(Ordering::Relaxed) {
                return true;
            }
            let completed = matches!(self.complete(false), Ok(n) if n > 0);
            let requests = self.barrier.is_none()
                && self.pausing.is_none()
                && matches!(self.ring.unconsumed_requests(), Ok(n) if n > 0);
            if completed || requests {
                add(&self.counters.poll_hits, 1);
                return true;
            }
            round = round.wrapping_add(1);
            if round.is_multiple_of(64) && start.elapsed() >= self.poll {
                add(&self.counters.poll_misses, 1);
                return false;
            }
            std::hint::spin_loop();
        }
    }

    /// Sleeps until the frontend notifies, I/O completes or a stop or command arrives; also
    /// pushes the I/O queued since the last push (with io_uring, the same system call).
    fn sleep(&mut self) {
        let fds: [RawFd; 2] = [self.evtchn.fd(), self.stop.event.fd()];
        match self.iq.sleep(&fds, None) {
            Ok(ready) => {
                if ready & 1 != 0 {
                    if let Err(e) = self.evtchn.clear() {
                        tracing::warn!(queue = self.qid, "event channel: {e}");
                    }
                }
            }
            Err(e) => {
                tracing::error!(queue = self.qid, "waiting for events: {e}");
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }

    /// Consumes one batch of requests; returns how many.
    fn consume(&mut self) -> Result<u32, RingError> {
        let r = self.consume_batch();
        // Whatever ended the batch (even a protocol error), what was consumed is submitted.
        self.submit_run();
        r
    }

    fn consume_batch(&mut self) -> Result<u32, RingError> {
        self.ring.begin_batch()?;
        let mut got = 0;
        while let Some(parsed) = self.ring.next_request()? {
            if got == 0 {
                self.clock = Instant::now();
            }
            got += 1;
            self.counters.request_started_at(self.clock);
            self.handle(parsed);
            if self.barrier.is_some() {
                break;
            }
        }
        Ok(got)
    }

    /// Queues the answer to one consumed request.
    fn answer(&mut self, id: u64, op: u8, status: Status) {
        match status {
            Status::Okay => {}
            Status::Error => add(&self.counters.errors, 1),
            Status::EOpNotSupp => add(&self.counters.eopnotsupp, 1),
        }
        self.counters.request_done_at(self.clock);
        self.responses.push(Response {
            id,
            operation: op,
            status,
        });
    }

    /// Publishes the queued answers and notifies the frontend if it asked.
    fn respond(&mut self) -> Result<(), RingError> {
        if self.responses.is_empty() {
            return Ok(());
        }
        let n = self.responses.len() as u64;
        for rsp in self.responses.drain(..) {
            self.ring.push_response(&rsp)?;
        }
        add(&self.counters.responses, n);
        if self.ring.push_responses_and_check_notify()? {
            if let Err(e) = self.evtchn.notify() {
                tracing::debug!(queue = self.qid, "notify: {e}");
            }
        }
        Ok(())
    }

    fn handle(&mut self, parsed: ParsedRequest) {
        let req = match parsed {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(queue = self.qid, "invalid request: {e}");
                let rsp = e.response();
                self.answer(rsp.id, rsp.operation, rsp.status);
                return;
            }
        };
        match req.kind {
            RequestKind::Read(io) => {
                let segs = self.seg_vec(io.segments.as_slice());
                self.start_rw(&req, Kind::Read, io.sector, segs)
            }
            RequestKind::Write(io) => {
                let segs = self.seg_vec(io.segments.as_slice());
                self.start_rw(&req, Kind::Write, io.sector, segs)
            }
            RequestKind::Indirect(ind) => {
                add(&self.counters.indirect_req, 1);
                let kind = match ind.op {
                    IndirectOp::Read => Kind::Read,
                    IndirectOp::Write => Kind::Write,
                };
                match self.indirect_segments(&ind) {
                    Ok(segs) => self.start_rw(&req, kind, ind.sector, segs),
                    Err(e) => {
                        tracing::debug!(queue = self.qid, id = req.id, "indirect request: {e}");
                        self.count_kind(kind, 0);
                        self.answer(req.id, req.response_operation(), Status::Error);
                    }
                }
            }
            // Ordering: the writes consumed before a flush, barrier or discard are submitted
            // (and numbered) before it.
            RequestKind::Flush(io) => {
                self.submit_run();
                self.start_flush(&req, Kind::Flush, io)
            }
            RequestKind::WriteBarrier(io) => {
                self.submit_run();
                self.start_flush(&req, Kind::Barrier, io)
            }
            RequestKind::Discard {
                sector,
                nr_sectors,
                secure,
            } => {
                self.submit_run();
                self.start_discard(&req, sector, nr_sectors, secure)
            }
        }
    }

    /// A segment list for a request: a spare one refilled (no allocation per request).
    fn seg_vec(&mut self, segs: &[Segment]) -> Vec<Segment> {
        let mut v = self.spare_segs.pop().unwrap_or_default();
        v.clear();
        v.extend_from_slice(segs);
        v
    }

    fn count_kind(&self, kind: Kind, sectors: u64) {
        let c = &self.counters;
        let (req, sect) = match kind {
            Kind::Read => (&c.rd_req, &c.rd_sect),
            Kind::Write => (&c.wr_req, &c.wr_sect),
            Kind::Flush => (&c.f_req, &c.wr_sect),
            Kind::Barrier => (&c.barrier_req, &c.wr_sect),
            Kind::Discard { .. } => (&c.ds_req, &c.ds_sect),
        };
        add(req, 1);
        add(sect, sectors);
    }

    /// Copies each indirect page out once (through the data path: persistent mappings, a
    /// read-only mapping or grant copies) and parses the copies.
    fn indirect_segments(&mut self, ind: &Indirect) -> Result<Vec<Segment>, String> {
        let refs = ind.indirect_grefs.as_slice();
        if self.indirect_pages.len() < refs.len() {
            self.indirect_pages.resize(refs.len(), [0u8; PAGE_SIZE]);
        }
        let pages = &mut self.indirect_pages[..refs.len()];
        self.data
            .read_indirect(refs, pages)
            .map_err(|e| e.to_string())?;
        let mut prefs = [&[0u8; PAGE_SIZE]; BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST];
        for (p, page) in prefs.iter_mut().zip(pages.iter()) {
            *p = page;
        }
        // A spare list (no allocation per request).
        let mut segs = self.spare_segs.pop().unwrap_or_default();
        match ind.parse_segments_into(&prefs[..refs.len()], &mut segs) {
            Ok(()) => Ok(segs),
            Err(e) => {
                self.spare_segs.push(segs);
                Err(e.to_string())
            }
        }
    }

    /// Whether `sector .. sector + n` lies on the disk.
    fn in_range(&self, sector: u64, n: u64) -> bool {
        let size = self.sectors.load(Ordering::Relaxed);
        sector.checked_add(n).is_some_and(|end| end <= size)
    }

    fn alloc(&mut self, p: Pending) -> usize {
        // A growable slab: insert cannot fail.
        self.slab.insert(p).unwrap_or(usize::MAX)
    }

    fn next_seq(&mut self) -> u64 {
        let s = self.next_seq;
        self.next_seq += 1;
        s
    }

    fn entry(&self, idx: usize) -> Option<&Pending> {
        self.slab.get(idx)
    }

    fn entry_mut(&mut self, idx: usize) -> Option<&mut Pending> {
        self.slab.get_mut(idx)
    }

    /// Answers entry `idx` and frees it.
    fn finish_entry(&mut self, idx: usize, status: Status) {
        let Some(p) = self.slab.remove(idx) else {
            return;
        };
        if self.barrier == Some(idx) {
            self.barrier = None;
        }
        let hist = match p.kind {
            Kind::Read => Some(&self.counters.rd_lat),
            Kind::Write => Some(&self.counters.wr_lat),
            Kind::Flush | Kind::Barrier => Some(&self.counters.f_lat),
            Kind::Discard { .. } => None,
        };
        if let Some(h) = hist {
            let us = self.clock.saturating_duration_since(p.start).as_micros();
            h.record(u64::try_from(us).unwrap_or(u64::MAX));
        }
        self.answer(p.id, p.op, status);
    }

    fn start_rw(&mut self, req: &Request, kind: Kind, sector: u64, segs: Vec<Segment>) {
        let op = req.response_operation();
        let nsect: u64 = segs.iter().map(|s| u64::from(s.nr_sectors())).sum();
        self.count_kind(kind, nsect);
        if !self.in_range(sector, nsect) {
            tracing::debug!(
                queue = self.qid,
                sector,
                nsect,
                "request past the end of the disk"
            );
            self.answer(req.id, op, Status::Error);
            return;
        }
        if kind == Kind::Write && self.feat.read_only {
            self.answer(req.id, op, Status::Error);
            return;
        }
        let idx = self.alloc(Pending {
            id: req.id,
            op,
            kind,
            stage: Stage::Data,
            sector,
            wseq: 0,
            fseq: 0,
            segs,
            has_data: true,
            start: self.clock,
            followers: Vec::new(),
        });
        self.add_to_run(idx, kind, sector, nsect);
    }

    /// Adds read or write `idx` (sectors `sector .. sector + nsect`) to the run, after
    /// submitting the run if `idx` does not continue it.
    fn add_to_run(&mut self, idx: usize, kind: Kind, sector: u64, nsect: u64) {
        let bytes = nsect * 512;
        let segs = self.entry(idx).map_or(0, |p| p.segs.len());
        let continues = self.run.as_ref().is_some_and(|r| {
            r.kind == kind
                && r.end == sector
                && r.bytes + bytes <= MAX_RUN_BYTES
                && r.segs + segs <= MAX_RUN_SEGS
        });
        if !continues {
            self.submit_run();
        }
        match self.run.as_mut() {
            Some(r) => {
                r.end = sector + nsect;
                r.bytes += bytes;
                r.segs += segs;
                r.members.push(idx);
            }
            None => {
                let mut members = std::mem::take(&mut self.spare_members);
                members.clear();
                members.push(idx);
                self.run = Some(Run {
                    kind,
                    end: sector + nsect,
                    bytes,
                    segs,
                    members,
                })
            }
        }
    }

    /// Submits the run: one image operation for all its requests (their segments in order),
    /// answered together. If their data cannot be reached as a whole (a bad grant in one of
    /// them), each is submitted on its own, so that only the bad one fails.
    fn submit_run(&mut self) {
        let Some(run) = self.run.take() else { return };
        let [first, ..] = run.members[..] else { return };
        if run.members.len() == 1 {
            self.spare_members = run.members;
            if !self.submit_data(first) {
                self.finish_entry(first, Status::Error);
            }
            return;
        }
        let mut segs = self.spare_segs.pop().unwrap_or_default();
        segs.clear();
        segs.reserve(run.segs);
        for &m in &run.members {
            if let Some(p) = self.slab.get(m) {
                segs.extend_from_slice(&p.segs);
            }
        }
        let (disk_read, sector) = match self.entry(first) {
            Some(p) => (p.kind == Kind::Read, p.sector),
            None => return,
        };
        let buf = match self.data.prepare(&segs, disk_read) {
            Ok(b) => b,
            Err(e) => {
                tracing::debug!(queue = self.qid, "merged request data: {e}; one by one");
                self.spare_segs.push(segs);
                for m in run.members {
                    if !self.submit_data(m) {
                        self.finish_entry(m, Status::Error);
                    }
                }
                return;
            }
        };
        let wseq = self.next_seq();
        if !disk_read {
            self.writes.insert(wseq);
        }
        add(&self.counters.merged_req, run.members.len() as u64 - 1);
        for &m in &run.members[1..] {
            if let Some(p) = self.slab.get_mut(m) {
                let s = std::mem::take(&mut p.segs);
                if self.spare_segs.len() < self.slab.key_space() {
                    self.spare_segs.push(s);
                }
            }
        }
        if let Some(p) = self.slab.get_mut(first) {
            if !disk_read {
                p.wseq = wseq;
            }
            // The leader holds the run's segments (for `finish`) and answers the others.
            let own = std::mem::replace(&mut p.segs, segs);
            p.followers = run.members[1..].to_vec();
            if self.spare_segs.len() < self.slab.key_space() {
                self.spare_segs.push(own);
            }
        }
        self.submitted += 1;
        self.iq.submit(IoRequest {
            kind: if disk_read {
                IoKind::Read
            } else {
                IoKind::Write
            },
            offset: sector * 512,
            buf: Some(buf),
            user_data: first as u64,
        });
    }

    /// Prepares the buffer of entry `idx` and submits its read or write. False if the data
    /// could not be reached (bad or revoked grant, read-only grant for a read).
    fn submit_data(&mut self, idx: usize) -> bool {
        let wseq = self.next_seq();
        let Some(p) = self.slab.get(idx) else {
            return false;
        };
        let disk_read = p.kind == Kind::Read;
        let sector = p.sector;
        let buf = match self.data.prepare(&p.segs, disk_read) {
            Ok(b) => b,
            Err(e) => {
                tracing::debug!(queue = self.qid, id = p.id, "request data: {e}");
                return false;
            }
        };
        if !disk_read {
            self.writes.insert(wseq);
            if let Some(p) = self.entry_mut(idx) {
                p.wseq = wseq;
            }
        }
        self.submitted += 1;
        self.iq.submit(IoRequest {
            kind: if disk_read {
                IoKind::Read
            } else {
                IoKind::Write
            },
            offset: sector * 512,
            buf: Some(buf),
            user_data: idx as u64,
        });
        true
    }

    fn submit_flush(&mut self, idx: usize) {
        if let Some(p) = self.entry_mut(idx) {
            p.stage = Stage::Flush;
        }
        self.submitted += 1;
        self.iq.submit(IoRequest {
            kind: IoKind::Flush,
            offset: 0,
            buf: None,
            user_data: idx as u64,
        });
    }

    fn start_flush(&mut self, req: &Request, kind: Kind, io: DirectIo) {
        let op = req.response_operation();
        let nsect = io.nr_sectors();
        self.count_kind(kind, nsect);
        let supported = match kind {
            Kind::Barrier => self.feat.barrier,
            _ => self.feat.flush,
        };
        if !supported {
            self.answer(req.id, op, Status::EOpNotSupp);
            return;
        }
        let has_data = !io.segments.is_empty();
        if has_data && (self.feat.read_only || !self.in_range(io.sector, nsect)) {
            self.answer(req.id, op, Status::Error);
            return;
        }
        // Every write consumed before this request has a smaller number.
        let fseq = self.next_seq();
        let idx = self.alloc(Pending {
            id: req.id,
            op,
            kind,
            stage: Stage::Waiting,
            sector: io.sector,
            wseq: 0,
            fseq,
            segs: io.segments.as_slice().to_vec(),
            has_data,
            start: self.clock,
            followers: Vec::new(),
        });
        if kind == Kind::Barrier {
            // Consumption stops until the barrier is answered; run_deferred starts it once
            // everything before it has completed.
            self.barrier = Some(idx);
        } else if has_data {
            // Write first (as Linux blkback's REQ_PREFLUSH write), then flush.
            if let Some(p) = self.entry_mut(idx) {
                p.stage = Stage::Data;
            }
            if !self.submit_data(idx) {
                self.finish_entry(idx, Status::Error);
            }
        } else {
            self.flushes.push_back(idx);
        }
    }

    fn start_discard(&mut self, req: &Request, sector: u64, nr: u64, secure: bool) {
        let op = req.response_operation();
        self.count_kind(Kind::Discard { len: 0, secure }, nr);
        if !self.feat.discard || self.feat.read_only {
            self.answer(req.id, op, Status::EOpNotSupp);
            return;
        }
        if !self.in_range(sector, nr) {
            self.answer(req.id, op, Status::Error);
            return;
        }
        if nr == 0 {
            self.answer(req.id, op, Status::Okay);
            return;
        }
        let wseq = self.next_seq();
        // blkif.h: BLKIF_DISCARD_SECURE is "ignored if discard-secure=0".
        let secure = secure && self.feat.discard_secure;
        let len = nr * 512;
        let idx = self.alloc(Pending {
            id: req.id,
            op,
            kind: Kind::Discard { len, secure },
            stage: Stage::Data,
            sector,
            wseq,
            fseq: 0,
            segs: Vec::new(),
            has_data: false,
            start: self.clock,
            followers: Vec::new(),
        });
        self.writes.insert(wseq);
        self.submitted += 1;
        self.iq.submit(IoRequest {
            kind: if secure {
                IoKind::WriteZeroes { len, unmap: true }
            } else {
                IoKind::Discard { len }
            },
            offset: sector * 512,
            buf: None,
            user_data: idx as u64,
        });
    }

    /// Starts flushes whose earlier writes are done, and the barrier once nothing else runs.
    fn run_deferred(&mut self) {
        if self.stopping {
            return;
        }
        let mut i = 0;
        while i < self.flushes.len() {
            let idx = self.flushes[i];
            let fseq = self.entry(idx).map_or(0, |p| p.fseq);
            if !self.writes.any_below(fseq) {
                self.flushes.remove(i);
                self.submit_flush(idx);
            } else {
                i += 1;
            }
        }
        let Some(idx) = self.barrier else { return };
        let Some(p) = self.entry(idx) else { return };
        if p.stage != Stage::Waiting || self.submitted > 0 || !self.flushes.is_empty() {
            return;
        }
        if p.has_data {
            if let Some(p) = self.entry_mut(idx) {
                p.stage = Stage::Data;
            }
            if !self.submit_data(idx) {
                self.finish_entry(idx, Status::Error);
            }
        } else {
            self.submit_flush(idx);
        }
    }

    /// Reaps completed I/O (waiting for at least one if `block`) and handles it.
    fn complete(&mut self, block: bool) -> Result<usize, xdisk_image::Error> {
        let mut done = std::mem::take(&mut self.done);
        let r = self.iq.reap(
            &mut done,
            usize::from(block),
            if block { None } else { Some(Duration::ZERO) },
        );
        let n = done.len();
        if n > 0 {
            self.clock = Instant::now();
        }
        for d in done.drain(..) {
            self.completed(d);
        }
        self.done = done;
        r.map(|_| n)
    }

    fn completed(&mut self, d: IoDone<D::Buf>) {
        self.submitted = self.submitted.saturating_sub(1);
        let idx = d.user_data as usize;
        let mut status = io_status(&d.result);
        if let Err(e) = &d.result {
            tracing::debug!(queue = self.qid, "I/O failed: {e}");
        }
        let Some(p) = self.entry(idx) else {
            tracing::error!(queue = self.qid, idx, "completion of an unknown request");
            return;
        };
        let (kind, stage, wseq) = (p.kind, p.stage, p.wseq);
        if let Some(buf) = d.buf {
            let segs = self
                .entry_mut(idx)
                .map(|p| std::mem::take(&mut p.segs))
                .unwrap_or_default();
            if let Err(e) = self
                .data
                .finish(buf, &segs, kind == Kind::Read, status == Status::Okay)
            {
                tracing::debug!(queue = self.qid, "request data: {e}");
                status = Status::Error;
            }
            if self.spare_segs.len() < self.slab.key_space() {
                self.spare_segs.push(segs);
            }
        }
        if stage == Stage::Data && wseq != 0 {
            self.writes.remove(wseq);
        }
        // The other requests of a merged run share its outcome.
        let followers = self
            .entry_mut(idx)
            .map(|p| std::mem::take(&mut p.followers))
            .unwrap_or_default();
        for f in followers {
            self.finish_entry(f, status);
        }
        let next_flush = stage == Stage::Data
            && matches!(kind, Kind::Flush | Kind::Barrier)
            && status == Status::Okay
            && !self.stopping;
        if !next_flush {
            self.finish_entry(idx, status);
            return;
        }
        if kind == Kind::Barrier {
            // Everything else is drained: flush right away.
            self.submit_flush(idx);
        } else {
            if let Some(p) = self.entry_mut(idx) {
                p.stage = Stage::Waiting;
            }
            self.flushes.push_back(idx);
        }
    }

    /// Stops: answers what never started, waits for the I/O in flight, publishes everything.
    /// A reap error is retried; if it persists, the image queue is told to cancel and settle
    /// its engine. Err: I/O is still in flight that nothing can wait for (its buffers are
    /// leaked by the image queue, never unmapped): the device must be failed.
    fn drain(&mut self) -> Result<(), String> {
        /// Consecutive reap errors before the engine is settled by force.
        const REAP_ATTEMPTS: u32 = 3;
        for idx in std::mem::take(&mut self.flushes) {
            self.finish_entry(idx, Status::Error);
        }
        if let Some(idx) = self.barrier {
            if self.entry(idx).is_some_and(|p| p.stage == Stage::Waiting) {
                self.finish_entry(idx, Status::Error);
            }
        }
        let mut failures = 0;
        let mut result = Ok(());
        while self.submitted > 0 {
            match self.complete(true) {
                Ok(_) => failures = 0,
                Err(e) => {
                    failures += 1;
                    tracing::error!(
                        queue = self.qid,
                        "cannot reap I/O while stopping (attempt {failures}): {e}"
                    );
                    if failures < REAP_ATTEMPTS {
                        std::thread::sleep(Duration::from_millis(10));
                        continue;
                    }
                    // Cancel what can be, wait for the rest; the requests settled are
                    // answered by the reap below.
                    let settled = self.iq.settle();
                    if let Err(e) = self.complete(false) {
                        tracing::debug!(queue = self.qid, "reap after settling: {e}");
                    }
                    if let Err(e) = settled {
                        result = Err(format!(
                            "{} requests of domain {} are stuck in the I/O engine ({e}); \
                             their guest pages stay mapped",
                            self.submitted, self.domid
                        ));
                        break;
                    }
                    failures = 0;
                }
            }
        }
        if let Err(e) = self.respond() {
            tracing::debug!(queue = self.qid, "final responses: {e}");
        }
        result
    }
}

impl<D: GuestData> Drop for Reactor<D> {
    fn drop(&mut self) {
        sub(&self.counters.queues, 1);
    }
}

#[cfg(test)]
mod tests {
    use super::SeqSet;
    use std::collections::BTreeSet;

    /// The set of writes in flight answers as a `BTreeSet` does, whatever the order of
    /// completions (and of inserts, though the reactor only appends).
    #[test]
    fn seq_set_answers_like_an_ordered_set() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut ours = SeqSet::default();
        let mut model = BTreeSet::new();
        let mut seq = 1u64;
        for _ in 0..4_000 {
            match next() % 8 {
                0..=3 => {
                    ours.insert(seq);
                    model.insert(seq);
                    seq += 1 + next() % 3;
                }
                4 => {
                    // Out of order (a number below the last one).
                    let s = next() % seq;
                    ours.insert(s);
                    model.insert(s);
                }
                _ => {
                    if let Some(&s) = model.iter().nth((next() % 40) as usize) {
                        ours.remove(s);
                        model.remove(&s);
                    }
                }
            }
            let probe = next() % (seq + 2);
            assert_eq!(ours.any_below(probe), model.range(..probe).next().is_some());
            assert!(ours.0.iter().eq(model.iter()));
        }
    }
}
