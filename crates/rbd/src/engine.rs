//! [`RbdEngine`]: the asynchronous path of an [`RbdStorage`] for one queue.
//!
//! `commit` starts each queued operation with librbd's `rbd_aio_*` calls; librbd completes
//! them on its own threads, where the callback only pushes `(tag, result, buffer)` into this
//! engine's queue and, if that queue was empty, signals the queue's eventfd; `reap` hands the
//! completions out.
//!
//! Deadlines: each request has one (`xdisk_deadline`, default 30 s). librbd can hold a
//! request far longer than any one RADOS timeout (a full pool: each of the request's RADOS
//! operations, the object-map update, the write, a lock re-acquisition, waits out its own
//! `rados_osd_op_timeout`; with timeouts of 0, forever), so past its deadline the request
//! completes here with ETIMEDOUT, on time, while librbd keeps what it may still touch. Memory
//! the caller can lend ([`IoBuf::lendable`]: xdisk's own buffers, as the image queues of
//! `img bench` and NBD exports use, and a guest's granted pages where they can be detached
//! before the guest is answered, [`IoBuf::detach_foreign`]) goes to librbd as it is (no
//! copy); past the deadline the completion says [`Phase::TimedOut`] and the caller keeps the
//! memory until a second completion says [`Phase::Released`] (librbd's late completion).
//! Memory that cannot be lent goes through a bounce buffer of the engine's (copied in for
//! writes, out for reads, on the reactor), which librbd's late completion frees. The process-wide deadline thread (`deadline`)
//! signals the eventfd when the oldest request's deadline passes. Without a deadline
//! (`xdisk_deadline=0`) every caller's memory goes to librbd as it is and requests wait as
//! long as librbd.
//!
//! No thread per request and nothing that blocks on the reactor (the image's size is the one
//! last known, not asked of librbd, which may first refresh the header from the cluster), but
//! for one case: a write past the end of the image grows it first (`rbd_resize`, as QEMU's
//! driver does, bounded by the deadline), which only a format growing its file does (qcow2
//! allocations run on the slow path, which grows the image before the fast path ever maps
//! there).

use std::collections::{BTreeMap, VecDeque};
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::{Duration, Instant};

use xdisk_io::sys::EventFd;
use xdisk_io::{
    AioKind, Completion, Engine, EngineConfig, IoBuf, IoSlice, Op, OpKind, Phase, Storage,
};

use crate::deadline::{self, Wake};
use crate::ffi::{AioOp, Held, Sink};
use crate::storage::{lock, RbdStorage, MAX_CHUNK};

/// Completions pushed by librbd's threads.
struct Done {
    list: Mutex<Vec<(u64, i64, Held)>>,
    cond: Condvar,
    notify: Arc<EventFd>,
    /// Set by the deadline thread: a deadline may have passed.
    alarm: AtomicBool,
}

impl Sink for Done {
    fn done(&self, tag: u64, result: i64, held: Held) {
        let was_empty = {
            let mut l = lock(&self.list);
            let was_empty = l.is_empty();
            l.push((tag, result, held));
            was_empty
        };
        self.cond.notify_all();
        // The reactor drains the eventfd before it reaps, and reaps everything listed: a
        // completion added to a list that is not empty is reaped with the ones before it.
        if was_empty {
            self.notify.signal();
        }
    }
}

impl Wake for Done {
    fn wake(&self) {
        self.alarm.store(true, Ordering::Release);
        self.cond.notify_all();
        self.notify.signal();
    }
}

/// What the engine remembers of an operation in flight.
struct Flight {
    user_data: u64,
    kind: OpKind,
    /// Bytes asked of librbd (reads clipped at the end of the image).
    len: usize,
    /// When it fails if librbd has not completed it.
    deadline: Option<Instant>,
    /// The caller's buffer while librbd works on a bounce buffer (never handed to librbd).
    buf: Option<IoSlice>,
    /// librbd has the caller's (lent) memory, and there is a deadline.
    lent: bool,
}

/// Bounce buffers kept for reuse, at most this many bytes per engine.
const POOL_BYTES: usize = 8 << 20;

/// The asynchronous path of an [`RbdStorage`] for one queue.
pub struct RbdEngine {
    storage: Arc<RbdStorage>,
    done: Arc<Done>,
    queued: Vec<Op<IoSlice>>,
    /// By tag, i.e. in the order started: the first has the earliest deadline.
    flights: BTreeMap<u64, Flight>,
    /// Completed without librbd (refused, nothing to do, past the deadline), for `reap`.
    now: VecDeque<Completion<IoSlice>>,
    capacity: usize,
    next_tag: u64,
    scratch: Vec<(u64, i64, Held)>,
    deadline: Option<Duration>,
    /// The wake-up asked of the deadline thread, if one is pending.
    armed: Option<Instant>,
    /// Bounce buffers to reuse, and their bytes.
    pool: Vec<Vec<u8>>,
    pool_bytes: usize,
    /// Requests failed at their deadline (librbd may still complete them).
    timed_out: u64,
    /// Of those, the ones whose caller's memory librbd still has: tag -> user_data.
    late: BTreeMap<u64, u64>,
}

impl RbdEngine {
    /// An engine over `storage` whose completions signal `notify`.
    pub fn new(storage: Arc<RbdStorage>, cfg: &EngineConfig, notify: Arc<EventFd>) -> RbdEngine {
        let deadline = storage.deadline();
        RbdEngine {
            storage,
            done: Arc::new(Done {
                list: Mutex::new(Vec::new()),
                cond: Condvar::new(),
                notify,
                alarm: AtomicBool::new(false),
            }),
            queued: Vec::new(),
            flights: BTreeMap::new(),
            now: VecDeque::new(),
            capacity: cfg.queue_depth.max(1) as usize,
            next_tag: 0,
            scratch: Vec::new(),
            deadline,
            armed: None,
            pool: Vec::new(),
            pool_bytes: 0,
            timed_out: 0,
            late: BTreeMap::new(),
        }
    }

    /// Requests this engine failed at their deadline so far.
    pub fn timed_out(&self) -> u64 {
        self.timed_out
    }

    fn finish_now(&mut self, op: Op<IoSlice>, result: io::Result<usize>) {
        self.now.push_back(Completion {
            user_data: op.user_data,
            result,
            buf: op.buf,
            phase: Phase::Done,
        });
        self.done.notify.signal();
    }

    /// A bounce buffer of `len` bytes (contents unspecified: a reused one keeps its old
    /// bytes, which a write overwrites and a read never hands out past what librbd read).
    fn bounce(&mut self, len: usize) -> Vec<u8> {
        // A buffer already long enough (no fill), else one with room (filled up to `len`).
        let pick = self
            .pool
            .iter()
            .position(|b| b.len() >= len)
            .or_else(|| self.pool.iter().position(|b| b.capacity() >= len));
        if let Some(i) = pick {
            let mut b = self.pool.swap_remove(i);
            self.pool_bytes -= b.capacity();
            b.resize(len, 0);
            return b;
        }
        vec![0u8; len]
    }

    fn recycle(&mut self, held: Held) {
        if let Held::Bounce(b) = held {
            if self.pool_bytes + b.capacity() <= POOL_BYTES {
                self.pool_bytes += b.capacity();
                self.pool.push(b);
            }
        }
    }

    /// What librbd gets for `buf`'s first `len` bytes: the caller's memory without a
    /// deadline or if it can be lent, else a bounce buffer (with the data, for a write) and
    /// the caller's buffer stays with the flight.
    fn data(&mut self, mut buf: IoSlice, len: usize, write: bool) -> (Held, Option<IoSlice>) {
        if self.deadline.is_none() || buf.lendable() {
            return (Held::Slice(buf), None);
        }
        let mut b = self.bounce(len);
        if write {
            buf.copy_out(0, &mut b);
        }
        (Held::Bounce(b), Some(buf))
    }

    /// Starts one operation on librbd, or completes it at once.
    fn start(&mut self, mut op: Op<IoSlice>) {
        let s = self.storage.clone();
        let total = op.buf.as_ref().map_or(0, |b| b.total_len());
        let (aio, kept) = match op.kind {
            OpKind::Read => {
                // Like pread: a short count at the end of the image (librbd clips too, if
                // the image shrank since).
                let size = s.known_size();
                let n = if op.offset >= size {
                    0
                } else {
                    (size - op.offset).min(total as u64) as usize
                };
                if n == 0 {
                    return self.finish_now(op, Ok(0));
                }
                let Some(buf) = op.buf.take() else {
                    return self.finish_now(op, Ok(0));
                };
                let (held, kept) = self.data(buf, n, false);
                (
                    AioOp::Read {
                        buf: held,
                        len: n,
                        off: op.offset,
                    },
                    kept,
                )
            }
            OpKind::Write => {
                if let Err(e) = s.writable() {
                    return self.finish_now(op, Err(e));
                }
                let Some(end) = op.offset.checked_add(total as u64) else {
                    return self.finish_now(op, Err(io::Error::from_raw_os_error(libc::EINVAL)));
                };
                // Rare (see the module's notes): blocks this queue for one rbd_resize.
                if end > s.known_size() {
                    if let Err(e) = s.grow_to(end) {
                        return self.finish_now(op, Err(e));
                    }
                }
                if total == 0 {
                    return self.finish_now(op, Ok(0));
                }
                let Some(buf) = op.buf.take() else {
                    return self.finish_now(op, Ok(0));
                };
                let (held, kept) = self.data(buf, total, true);
                (
                    AioOp::Write {
                        buf: held,
                        len: total,
                        off: op.offset,
                    },
                    kept,
                )
            }
            OpKind::Flush => {
                if let Err(e) = s.check_usable() {
                    return self.finish_now(op, Err(e));
                }
                if !s.flush_needed() {
                    return self.finish_now(op, Ok(0));
                }
                (AioOp::Flush, None)
            }
            OpKind::Fallocate { mode, len } => {
                if let Err(e) = s.writable() {
                    return self.finish_now(op, Err(e));
                }
                let end = op.offset.saturating_add(len).min(s.known_size());
                if op.offset >= end {
                    return self.finish_now(op, Ok(0));
                }
                let len = end - op.offset;
                if len > MAX_CHUNK {
                    return self.finish_now(op, Err(io::Error::from_raw_os_error(libc::EINVAL)));
                }
                if mode & libc::FALLOC_FL_PUNCH_HOLE != 0 {
                    (
                        AioOp::Discard {
                            off: op.offset,
                            len,
                        },
                        None,
                    )
                } else if mode & libc::FALLOC_FL_ZERO_RANGE != 0 {
                    (
                        AioOp::WriteZeroes {
                            off: op.offset,
                            len,
                        },
                        None,
                    )
                } else {
                    // Allocation: nothing to reserve on a thin image.
                    return self.finish_now(op, Ok(0));
                }
            }
        };
        let (len, lent) = match &aio {
            AioOp::Read { len, buf, .. } | AioOp::Write { len, buf, .. } => (
                *len,
                self.deadline.is_some() && matches!(buf, Held::Slice(_)),
            ),
            _ => (0, false),
        };
        let tag = self.next_tag;
        self.next_tag = self.next_tag.wrapping_add(1);
        let sink: Arc<dyn Sink> = self.done.clone();
        let deadline = self.deadline.map(|d| Instant::now() + d);
        match s.shared.image.aio(aio, sink, tag) {
            Ok(()) => {
                self.flights.insert(
                    tag,
                    Flight {
                        user_data: op.user_data,
                        kind: op.kind,
                        len,
                        deadline,
                        buf: kept,
                        lent,
                    },
                );
                if let Some(at) = deadline {
                    if self.armed.is_none() {
                        self.arm(at);
                    }
                }
            }
            Err((held, e)) => {
                op.buf = match held {
                    Held::Slice(b) => Some(b),
                    other => {
                        self.recycle(other);
                        kept
                    }
                };
                self.finish_now(op, Err(e));
            }
        }
    }

    /// Asks the deadline thread to signal us at `at`.
    fn arm(&mut self, at: Instant) {
        self.armed = Some(at);
        let done: Arc<dyn Wake> = self.done.clone();
        let weak: Weak<dyn Wake> = Arc::downgrade(&done);
        deadline::wake_at(at, weak);
    }

    /// Fails the requests past their deadline (librbd keeps their bounce buffers until it
    /// completes them), and asks to be woken for the next deadline.
    fn expire(&mut self, out: &mut Vec<Completion<IoSlice>>) -> usize {
        if self.deadline.is_none() {
            return 0;
        }
        self.done.alarm.store(false, Ordering::Release);
        let now = Instant::now();
        let mut n = 0;
        while let Some(entry) = self.flights.first_entry() {
            if entry.get().deadline.is_none_or(|d| d > now) {
                break;
            }
            let (tag, f) = entry.remove_entry();
            n += 1;
            let phase = if f.lent {
                // librbd still has the caller's memory: the caller keeps it until `collect`
                // sees librbd's late completion and says so.
                self.late.insert(tag, f.user_data);
                Phase::TimedOut
            } else {
                Phase::Done
            };
            out.push(Completion {
                user_data: f.user_data,
                result: Err(io::Error::from_raw_os_error(libc::ETIMEDOUT)),
                buf: f.buf,
                phase,
            });
        }
        if n > 0 {
            self.timed_out += n as u64;
            tracing::warn!(
                image = %self.storage.name(),
                requests = n,
                deadline_s = self.deadline.map_or(0, |d| d.as_secs()),
                "RBD requests past their deadline fail with ETIMEDOUT (pool full? cluster unreachable?); librbd keeps their buffers until it completes them"
            );
        }
        if self.armed.is_some_and(|a| a <= now) {
            self.armed = None;
        }
        if self.armed.is_none() {
            if let Some(at) = self.flights.first_key_value().and_then(|(_, f)| f.deadline) {
                self.arm(at);
            }
        }
        n
    }

    /// Turns librbd's completions into the engine's.
    fn collect(&mut self, out: &mut Vec<Completion<IoSlice>>) -> usize {
        let mut got = self.now.len();
        out.extend(self.now.drain(..));
        std::mem::swap(&mut *lock(&self.done.list), &mut self.scratch);
        let mut scratch = std::mem::take(&mut self.scratch);
        for (tag, r, held) in scratch.drain(..) {
            let Some(mut f) = self.flights.remove(&tag) else {
                // Failed at its deadline already: librbd is done with its buffer now.
                tracing::debug!(tag, r, "a late RBD completion");
                match (self.late.remove(&tag), held) {
                    (Some(user_data), Held::Slice(b)) => {
                        // The caller's memory is its own again.
                        out.push(Completion {
                            user_data,
                            result: Err(io::Error::from_raw_os_error(libc::ETIMEDOUT)),
                            buf: Some(b),
                            phase: Phase::Released,
                        });
                        got += 1;
                    }
                    (_, held) => self.recycle(held),
                }
                continue;
            };
            let result = if r < 0 {
                Err(io::Error::from_raw_os_error(
                    i32::try_from(-r).unwrap_or(libc::EIO),
                ))
            } else {
                match f.kind {
                    // librbd returns the bytes read (clipped at the end of the image).
                    OpKind::Read => Ok((r as u64).min(f.len as u64) as usize),
                    OpKind::Write => Ok(f.len),
                    _ => Ok(0),
                }
            };
            let buf = match held {
                Held::Slice(b) => Some(b),
                Held::Bounce(b) => {
                    if let (OpKind::Read, Ok(n), Some(dst)) = (f.kind, &result, f.buf.as_mut()) {
                        dst.copy_in(0, &b[..(*n).min(b.len())]);
                    }
                    self.recycle(Held::Bounce(b));
                    f.buf.take()
                }
                Held::Nothing => f.buf.take(),
            };
            out.push(Completion {
                user_data: f.user_data,
                result,
                buf,
                phase: Phase::Done,
            });
            got += 1;
        }
        self.scratch = scratch;
        if self.done.alarm.load(Ordering::Acquire)
            || self
                .flights
                .first_key_value()
                .is_some_and(|(_, f)| f.deadline.is_some_and(|d| d <= Instant::now()))
        {
            got += self.expire(out);
        }
        got
    }
}

impl Engine<IoSlice> for RbdEngine {
    fn kind(&self) -> AioKind {
        AioKind::Threads
    }
    fn submit(&mut self, op: Op<IoSlice>) -> Result<(), (Op<IoSlice>, io::Error)> {
        if self.in_flight() >= self.capacity {
            return Err((op, io::Error::from(io::ErrorKind::WouldBlock)));
        }
        self.queued.push(op);
        Ok(())
    }
    fn commit(&mut self) -> io::Result<()> {
        for op in std::mem::take(&mut self.queued) {
            self.start(op);
        }
        Ok(())
    }
    fn reap(
        &mut self,
        out: &mut Vec<Completion<IoSlice>>,
        min: usize,
        timeout: Option<Duration>,
    ) -> io::Result<usize> {
        self.commit()?;
        let min = if timeout.is_none() {
            min.min(self.in_flight())
        } else {
            min
        };
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut got = self.collect(out);
        while got < min {
            {
                let l = lock(&self.done.list);
                if l.is_empty() && !self.done.alarm.load(Ordering::Acquire) {
                    match deadline {
                        None => drop(self.done.cond.wait(l).unwrap_or_else(|e| e.into_inner())),
                        Some(d) => {
                            let now = Instant::now();
                            if now >= d {
                                break;
                            }
                            drop(
                                self.done
                                    .cond
                                    .wait_timeout(l, d - now)
                                    .unwrap_or_else(|e| e.into_inner()),
                            );
                        }
                    }
                }
            }
            got += self.collect(out);
        }
        Ok(got)
    }
    fn event_fd(&self) -> std::os::unix::io::RawFd {
        self.done.notify.fd()
    }
    fn clear_event_fd(&self) -> bool {
        // Shared with the queue's other notifications: the queue drains it.
        false
    }
    fn in_flight(&self) -> usize {
        self.queued.len() + self.flights.len() + self.now.len() + self.late.len()
    }
    fn capacity(&self) -> usize {
        self.capacity
    }
    /// Waits out the operations in flight (each ends by its deadline, or without one by
    /// librbd's own timeouts), then the memory lent past a deadline for as long again: if
    /// librbd still has some then, fails (the caller must leak that memory, never free it).
    fn settle(&mut self, out: &mut Vec<Completion<IoSlice>>) -> io::Result<()> {
        let Some(deadline) = self.deadline else {
            while self.in_flight() > 0 {
                self.reap(out, self.in_flight(), None)?;
            }
            return Ok(());
        };
        let limit = Instant::now() + 2 * deadline;
        while self.in_flight() > 0 && Instant::now() < limit {
            self.reap(out, 1, Some(Duration::from_millis(200)))?;
        }
        if self.in_flight() > 0 {
            return Err(io::Error::other(format!(
                "librbd still has the memory of {} requests past their deadline",
                self.in_flight()
            )));
        }
        Ok(())
    }
}

impl Drop for RbdEngine {
    /// Waits out the operations in flight: up to their deadline (after which librbd keeps
    /// only bounce buffers of its own, and the image is closed once it is done with them),
    /// or, without a deadline, up to 300 s (librbd's timeouts bound them); if some never
    /// complete then, the image is never closed (its handle leaked), as their callbacks may
    /// still come and write into the caller's memory.
    fn drop(&mut self) {
        if self.flights.is_empty() {
            return;
        }
        let limit = Instant::now() + self.deadline.unwrap_or(Duration::from_secs(300));
        let mut sink = Vec::new();
        while !self.flights.is_empty() && Instant::now() < limit {
            let _ = self.reap(&mut sink, 1, Some(Duration::from_secs(1)));
            // The buffers are the queue's to free, not ours: hand them nowhere (an IoSlice
            // frees no memory when dropped).
            sink.clear();
        }
        if !self.flights.is_empty() && self.deadline.is_none() {
            tracing::error!(
                image = %self.storage.name(),
                in_flight = self.flights.len(),
                "RBD operations never completed: leaking the image handle"
            );
            std::mem::forget(self.storage.clone());
        }
    }
}
