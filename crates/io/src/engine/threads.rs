//! The thread-pool engine: `cfg.threads` workers doing blocking preadv(2), pwritev(2),
//! fdatasync(2) and fallocate(2) (QEMU's `aio=threads`). Works on any file, including those
//! that cannot be opened with O_DIRECT and those native AIO would serve synchronously.
//!
//! Work goes to the workers through a Mutex+Condvar queue, one lock per committed batch;
//! completions come back through a Mutex<VecDeque> with a Condvar (for `reap`) and an
//! eventfd(2) signalled after each completion (for epoll loops).

#![allow(unsafe_code)]

use std::collections::VecDeque;
use std::io;
use std::os::unix::io::RawFd;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use super::common;
use super::{Completion, Engine, EngineConfig, Op, OpKind};
use crate::buf::{AlignedBuf, IoBuf};
use crate::cache::AioKind;
use crate::sys::EventFd;

struct WorkQueue<B: IoBuf> {
    jobs: VecDeque<Op<B>>,
    stop: bool,
}

struct Shared<B: IoBuf> {
    work: Mutex<WorkQueue<B>>,
    work_ready: Condvar,
    done: Mutex<VecDeque<Completion<B>>>,
    done_ready: Condvar,
    event: EventFd,
}

/// Locks a mutex, ignoring poisoning (the protected queues stay consistent: every critical
/// section is a push or a pop).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Thread-pool engine. `B` is the buffer type the engine's operations own.
pub struct ThreadsEngine<B: IoBuf = AlignedBuf> {
    shared: Arc<Shared<B>>,
    workers: Vec<JoinHandle<()>>,
    /// Submitted ops not yet handed to the workers (see `commit`).
    batch: Vec<Op<B>>,
    in_flight: usize,
    capacity: usize,
}

impl<B: IoBuf> ThreadsEngine<B> {
    /// Starts `cfg.threads` (at least 1) worker threads.
    pub fn new(cfg: &EngineConfig) -> io::Result<Self> {
        let capacity = cfg.queue_depth.max(1) as usize;
        let shared = Arc::new(Shared {
            work: Mutex::new(WorkQueue {
                jobs: VecDeque::with_capacity(capacity),
                stop: false,
            }),
            work_ready: Condvar::new(),
            done: Mutex::new(VecDeque::with_capacity(capacity)),
            done_ready: Condvar::new(),
            event: EventFd::new()?,
        });
        let mut engine = ThreadsEngine {
            shared,
            workers: Vec::new(),
            batch: Vec::with_capacity(capacity),
            in_flight: 0,
            capacity,
        };
        for i in 0..cfg.threads.max(1) {
            let shared = Arc::clone(&engine.shared);
            // On error, dropping `engine` stops the workers already started.
            let handle = std::thread::Builder::new()
                .name(format!("xdisk-io-{i}"))
                .spawn(move || worker(&shared))?;
            engine.workers.push(handle);
        }
        tracing::debug!(
            capacity,
            threads = engine.workers.len(),
            "threads engine ready"
        );
        Ok(engine)
    }
}

fn worker<B: IoBuf>(shared: &Shared<B>) {
    loop {
        let op = {
            let mut q = lock(&shared.work);
            loop {
                if q.stop {
                    return;
                }
                if let Some(op) = q.jobs.pop_front() {
                    break op;
                }
                q = shared.work_ready.wait(q).unwrap_or_else(|e| e.into_inner());
            }
        };
        let completion = run(op);
        lock(&shared.done).push_back(completion);
        shared.done_ready.notify_one();
        shared.event.signal();
    }
}

/// Performs one operation with blocking syscalls. Reads and writes report what one call
/// transferred (a short count is returned as is), retrying only EINTR.
fn run<B: IoBuf>(mut op: Op<B>) -> Completion<B> {
    let result = match op.kind {
        OpKind::Read | OpKind::Write => match op.buf.as_mut() {
            Some(buf) => rw(op.kind == OpKind::Write, op.fd, buf.iovecs(), op.offset),
            None => Err(io::Error::from_raw_os_error(libc::EINVAL)),
        },
        OpKind::Flush => common::fdatasync(op.fd),
        OpKind::Fallocate { mode, len } => common::fallocate(op.fd, mode, op.offset, len),
    };
    Completion {
        user_data: op.user_data,
        result,
        buf: op.buf,
        phase: crate::Phase::Done,
    }
}

/// preadv(2) / pwritev(2), retried on EINTR.
fn rw(write: bool, fd: RawFd, iov: &[libc::iovec], offset: u64) -> io::Result<usize> {
    let einval = || io::Error::from_raw_os_error(libc::EINVAL);
    let cnt = libc::c_int::try_from(iov.len()).map_err(|_| einval())?;
    let off = libc::off_t::try_from(offset).map_err(|_| einval())?;
    loop {
        // SAFETY: `iov` describes memory owned by the op's buffer, which this worker owns
        // exclusively for the duration of the call (IoBuf contract); cnt is its length.
        let r = unsafe {
            if write {
                libc::pwritev(fd, iov.as_ptr(), cnt, off)
            } else {
                libc::preadv(fd, iov.as_ptr(), cnt, off)
            }
        };
        if r >= 0 {
            return Ok(r as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

impl<B: IoBuf> Engine<B> for ThreadsEngine<B> {
    fn kind(&self) -> AioKind {
        AioKind::Threads
    }

    fn submit(&mut self, op: Op<B>) -> Result<(), (Op<B>, io::Error)> {
        if self.in_flight >= self.capacity {
            return Err((op, common::queue_full(self.capacity)));
        }
        if common::needs_buf(&op) && op.buf.is_none() {
            return Err((op, common::missing_buffer()));
        }
        self.batch.push(op);
        self.in_flight += 1;
        Ok(())
    }

    fn commit(&mut self) -> io::Result<()> {
        let n = self.batch.len();
        if n == 0 {
            return Ok(());
        }
        lock(&self.shared.work).jobs.extend(self.batch.drain(..));
        if n == 1 {
            self.shared.work_ready.notify_one();
        } else {
            self.shared.work_ready.notify_all();
        }
        Ok(())
    }

    fn reap(
        &mut self,
        out: &mut Vec<Completion<B>>,
        min: usize,
        timeout: Option<Duration>,
    ) -> io::Result<usize> {
        self.commit()?;
        let deadline = common::deadline(timeout);
        let mut got = 0;
        let mut done = lock(&self.shared.done);
        loop {
            let n = done.len();
            out.extend(done.drain(..));
            got += n;
            self.in_flight -= n;
            let want = common::still_wanted(min, got, self.in_flight, timeout);
            if want == 0 {
                return Ok(got);
            }
            done = match common::remaining(deadline) {
                None => self
                    .shared
                    .done_ready
                    .wait(done)
                    .unwrap_or_else(|e| e.into_inner()),
                Some(Duration::ZERO) => return Ok(got),
                Some(left) => {
                    self.shared
                        .done_ready
                        .wait_timeout(done, left)
                        .unwrap_or_else(|e| e.into_inner())
                        .0
                }
            };
        }
    }

    fn event_fd(&self) -> RawFd {
        self.shared.event.fd()
    }

    fn in_flight(&self) -> usize {
        self.in_flight
    }

    fn capacity(&self) -> usize {
        self.capacity
    }
}

impl<B: IoBuf> Drop for ThreadsEngine<B> {
    /// Stops the workers (each finishes the operation it is running; queued ones are
    /// dropped with their buffers) and joins them.
    fn drop(&mut self) {
        lock(&self.shared.work).stop = true;
        self.shared.work_ready.notify_all();
        for w in self.workers.drain(..) {
            if w.join().is_err() {
                tracing::error!("threads engine: a worker panicked");
            }
        }
    }
}
