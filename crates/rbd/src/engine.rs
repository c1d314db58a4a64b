//! [`RbdEngine`]: the asynchronous path of an [`RbdStorage`] for one queue.
//!
//! `commit` starts each queued operation with librbd's `rbd_aio_*` calls (the buffers go to
//! librbd as they are: the guest's pages, no copy); librbd completes them on its own threads,
//! where the callback only pushes `(tag, result, buffer)` into this engine's queue and, if
//! that queue was empty, signals the queue's eventfd; `reap` hands the completions out.
//!
//! No thread per request and nothing that blocks on the reactor (the image's size is the one
//! last known, not asked of librbd, which may first refresh the header from the cluster), but
//! for one case: a write past the end of the image grows it first (`rbd_resize`, as QEMU's
//! driver does), which only a format growing its file does (qcow2 allocations run on the
//! slow path, which grows the image before the fast path ever maps there).

use std::collections::{HashMap, VecDeque};
use std::io;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use xdisk_io::sys::EventFd;
use xdisk_io::{AioKind, Completion, Engine, EngineConfig, IoBuf, IoSlice, Op, OpKind, Storage};

use crate::ffi::{AioOp, Sink};
use crate::storage::{lock, RbdStorage, MAX_CHUNK};

/// Completions pushed by librbd's threads.
struct Done {
    list: Mutex<Vec<(u64, i64, Option<IoSlice>)>>,
    cond: Condvar,
    notify: Arc<EventFd>,
}

impl Sink for Done {
    fn done(&self, tag: u64, result: i64, buf: Option<IoSlice>) {
        let was_empty = {
            let mut l = lock(&self.list);
            let was_empty = l.is_empty();
            l.push((tag, result, buf));
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

/// What the engine remembers of an operation in flight.
struct Flight {
    user_data: u64,
    kind: OpKind,
    /// Bytes asked of librbd (reads clipped at the end of the image).
    len: usize,
}

/// The asynchronous path of an [`RbdStorage`] for one queue.
pub struct RbdEngine {
    storage: Arc<RbdStorage>,
    done: Arc<Done>,
    queued: Vec<Op<IoSlice>>,
    flights: HashMap<u64, Flight>,
    /// Completed without librbd (refused, or nothing to do), waiting for `reap`.
    now: VecDeque<Completion<IoSlice>>,
    capacity: usize,
    next_tag: u64,
    scratch: Vec<(u64, i64, Option<IoSlice>)>,
}

impl RbdEngine {
    /// An engine over `storage` whose completions signal `notify`.
    pub fn new(storage: Arc<RbdStorage>, cfg: &EngineConfig, notify: Arc<EventFd>) -> RbdEngine {
        RbdEngine {
            storage,
            done: Arc::new(Done {
                list: Mutex::new(Vec::new()),
                cond: Condvar::new(),
                notify,
            }),
            queued: Vec::new(),
            flights: HashMap::new(),
            now: VecDeque::new(),
            capacity: cfg.queue_depth.max(1) as usize,
            next_tag: 0,
            scratch: Vec::new(),
        }
    }

    fn finish_now(&mut self, op: Op<IoSlice>, result: io::Result<usize>) {
        self.now.push_back(Completion {
            user_data: op.user_data,
            result,
            buf: op.buf,
        });
        self.done.notify.signal();
    }

    /// Starts one operation on librbd, or completes it at once.
    fn start(&mut self, mut op: Op<IoSlice>) {
        let s = &self.storage;
        let total = op.buf.as_ref().map_or(0, |b| b.total_len());
        let aio = match op.kind {
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
                AioOp::Read {
                    buf,
                    len: n,
                    off: op.offset,
                }
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
                AioOp::Write {
                    buf,
                    len: total,
                    off: op.offset,
                }
            }
            OpKind::Flush => {
                if let Err(e) = s.check_usable() {
                    return self.finish_now(op, Err(e));
                }
                if !s.flush_needed() {
                    return self.finish_now(op, Ok(0));
                }
                AioOp::Flush
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
                    AioOp::Discard {
                        off: op.offset,
                        len,
                    }
                } else if mode & libc::FALLOC_FL_ZERO_RANGE != 0 {
                    AioOp::WriteZeroes {
                        off: op.offset,
                        len,
                    }
                } else {
                    // Allocation: nothing to reserve on a thin image.
                    return self.finish_now(op, Ok(0));
                }
            }
        };
        let len = match &aio {
            AioOp::Read { len, .. } | AioOp::Write { len, .. } => *len,
            _ => 0,
        };
        let tag = self.next_tag;
        self.next_tag = self.next_tag.wrapping_add(1);
        let sink: Arc<dyn Sink> = self.done.clone();
        match s.shared.image.aio(aio, sink, tag) {
            Ok(()) => {
                self.flights.insert(
                    tag,
                    Flight {
                        user_data: op.user_data,
                        kind: op.kind,
                        len,
                    },
                );
            }
            Err((buf, e)) => {
                op.buf = buf;
                self.finish_now(op, Err(e));
            }
        }
    }

    /// Turns librbd's completions into the engine's.
    fn collect(&mut self, out: &mut Vec<Completion<IoSlice>>) -> usize {
        let mut got = self.now.len();
        out.extend(self.now.drain(..));
        std::mem::swap(&mut *lock(&self.done.list), &mut self.scratch);
        for (tag, r, buf) in self.scratch.drain(..) {
            let Some(f) = self.flights.remove(&tag) else {
                tracing::error!(tag, "an RBD completion for no operation");
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
            out.push(Completion {
                user_data: f.user_data,
                result,
                buf,
            });
            got += 1;
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
                if l.is_empty() {
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
        self.queued.len() + self.flights.len() + self.now.len()
    }
    fn capacity(&self) -> usize {
        self.capacity
    }
}

impl Drop for RbdEngine {
    /// Waits out the operations in flight (librbd's timeouts bound them); if some never
    /// complete, the image is never closed (its handle leaked), as their callbacks may
    /// still come.
    fn drop(&mut self) {
        if self.flights.is_empty() {
            return;
        }
        let deadline = Instant::now() + Duration::from_secs(300);
        let mut sink = Vec::new();
        while !self.flights.is_empty() && Instant::now() < deadline {
            let _ = self.reap(&mut sink, 1, Some(Duration::from_secs(1)));
            // The buffers are the queue's to free, not ours: hand them nowhere (an IoSlice
            // frees no memory when dropped).
            sink.clear();
        }
        if !self.flights.is_empty() {
            tracing::error!(
                image = %self.storage.name(),
                in_flight = self.flights.len(),
                "RBD operations never completed: leaking the image handle"
            );
            std::mem::forget(self.storage.clone());
        }
    }
}
