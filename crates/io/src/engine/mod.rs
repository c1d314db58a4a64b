//! Asynchronous I/O engines: one per queue/thread, submission and completion without locks.
//!
//! An [`Op`] owns its buffer (any [`IoBuf`]) from `submit` until the engine returns it in a
//! [`Completion`]; completions come back in any order, matched by `user_data`.

use std::io;
use std::os::unix::io::RawFd;
use std::time::Duration;

use crate::buf::IoBuf;
use crate::cache::AioKind;

mod common;
#[cfg(feature = "fault-injection")]
pub mod fault;
mod native;
mod threads;
mod uring;

pub use native::NativeEngine;
pub use threads::ThreadsEngine;
pub use uring::UringEngine;

/// What an operation does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpKind {
    /// preadv at `offset` into the buffer's iovecs.
    Read,
    /// pwritev at `offset` from the buffer's iovecs.
    Write,
    /// fdatasync (the buffer is `None`).
    Flush,
    /// fallocate(mode, offset, len) (the buffer is `None`).
    Fallocate {
        /// fallocate(2) mode flags (`FALLOC_FL_*`; 0 allocates).
        mode: i32,
        /// Length of the range in bytes.
        len: u64,
    },
}

/// One operation handed to an engine.
pub struct Op<B: IoBuf> {
    /// What to do.
    pub kind: OpKind,
    /// The file to do it on (`-1` for engines of storages without a file descriptor).
    pub fd: RawFd,
    /// Byte offset in the file (unused by flushes).
    pub offset: u64,
    /// The data buffer of a read or write, owned by the engine until the completion hands
    /// it back; `None` for flushes and fallocates.
    pub buf: Option<B>,
    /// Returned unchanged in the completion.
    pub user_data: u64,
}

/// The result of one operation: bytes transferred (reads/writes) or 0, or the OS error.
/// A short read or write is reported as is (`Ok(n)` with `n` less than the length); the
/// caller decides (past EOF a short read is normal).
pub struct Completion<B: IoBuf> {
    /// The [`Op::user_data`] of the operation.
    pub user_data: u64,
    /// Bytes transferred, or the OS error.
    pub result: io::Result<usize>,
    /// The operation's buffer, handed back (`None` with [`Phase::TimedOut`]).
    pub buf: Option<B>,
    /// Whether the operation is over ([`Phase::Done`], what every engine reports but for
    /// one case), or failed at its deadline while the storage still has its memory.
    pub phase: Phase,
}

impl<B: IoBuf> Completion<B> {
    /// The operation is over: `result`, and its buffer back.
    pub fn done(user_data: u64, result: io::Result<usize>, buf: Option<B>) -> Completion<B> {
        Completion {
            user_data,
            result,
            buf,
            phase: Phase::Done,
        }
    }
}

/// What a [`Completion`] says of the operation's memory.
///
/// An engine whose storage may keep an operation past the time the caller can wait (librbd,
/// with a deadline per request) fails it at its deadline. If the operation's buffer was
/// [`IoBuf::lendable`] and the storage works on it directly (no copy), the storage may still
/// read or write that memory: the completion says [`Phase::TimedOut`] (the result is the
/// error; no buffer), and the owner keeps the memory alive and untouched until a second
/// completion with the same `user_data` says [`Phase::Released`] (with the buffer). Engines
/// never report these for buffers that are not lendable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// The operation is over and its memory is the caller's again.
    Done,
    /// Failed at its deadline (`result` says why); the storage still has the memory.
    TimedOut,
    /// The storage let go of the memory of an operation reported [`Phase::TimedOut`]
    /// before; `result` is what it finally did, for the record only.
    Released,
}

/// How to build an engine.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Maximum operations in flight (ring size / AIO context size / queue bound).
    pub queue_depth: u32,
    /// Worker threads of the `threads` engine.
    pub threads: usize,
    /// Files to register with io_uring (fixed files) where it helps; ops on other fds still work.
    pub register_fds: Vec<RawFd>,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            queue_depth: 128,
            threads: 4,
            register_fds: Vec::new(),
        }
    }
}

/// An asynchronous I/O engine.
pub trait Engine<B: IoBuf>: Send {
    /// The engine's name as QEMU spells it (`io_uring`, `native`, `threads`).
    fn kind(&self) -> AioKind;
    /// Queues an operation. It may not reach the kernel until [`Engine::commit`] (batching).
    /// When `in_flight() == capacity()` the op is handed back with [`crate::Error::QueueFull`]
    /// semantics (`io::ErrorKind::WouldBlock`).
    fn submit(&mut self, op: Op<B>) -> Result<(), (Op<B>, io::Error)>;
    /// Pushes queued operations to the kernel (one syscall for a batch where possible).
    fn commit(&mut self) -> io::Result<()>;
    /// Appends finished operations to `out`. Commits queued ops first. Waits until at least
    /// `min` completions are available (0: do not wait) or `timeout` passes (None: no limit).
    /// Returns the number appended (every completion available, possibly more than `min`).
    ///
    /// With no timeout, `min` is capped at the operations in flight (waiting for more could
    /// never end); with a timeout it is not (like io_getevents(2), the call then sleeps until
    /// the timeout).
    fn reap(
        &mut self,
        out: &mut Vec<Completion<B>>,
        min: usize,
        timeout: Option<Duration>,
    ) -> io::Result<usize>;
    /// An fd that becomes readable when completions may be available (for epoll loops).
    /// It is a non-blocking eventfd(2): the loop clears it ([`Engine::clear_event_fd`])
    /// *before* calling [`Engine::reap`], so that a completion arriving during the reap makes
    /// it readable again. Spurious readiness is possible (e.g. for completions a previous
    /// `reap` already returned).
    fn event_fd(&self) -> RawFd;
    /// Resets the [`Engine::event_fd`] counter; true if it was signalled.
    fn clear_event_fd(&self) -> bool {
        crate::sys::drain_eventfd(self.event_fd())
    }
    /// Pushes queued operations and sleeps, in the engine's own wait, until a completion is
    /// available or one of `fds` is readable (or `timeout` passes; `None`: no limit): one
    /// system call where an event loop would otherwise need a submit, a `poll(2)` of its fds
    /// and the engine's eventfd, and a read to clear that eventfd. Returns a mask of the
    /// `fds` found readable (bit `i` for `fds[i]`, at most 32 fds; 0 when a completion, a
    /// signal or the timeout woke it: the next [`Engine::reap`] returns the completions).
    /// Readiness is level-triggered as with poll: an fd left readable is reported again.
    ///
    /// `Ok(None)`: this engine cannot wait on foreign fds (the default), nothing was
    /// submitted or waited for, and the caller commits and polls [`Engine::event_fd`] with
    /// its fds instead.
    fn wait_readable(
        &mut self,
        fds: &[RawFd],
        timeout: Option<Duration>,
    ) -> io::Result<Option<u32>> {
        let _ = (fds, timeout);
        Ok(None)
    }
    /// Operations submitted and not yet reaped.
    fn in_flight(&self) -> usize;
    /// Maximum operations in flight.
    fn capacity(&self) -> usize;
    /// Cancels what can be cancelled and waits until no operation is in flight, appending
    /// their completions to `out`. An error means operations may still be in flight: the
    /// kernel may still read or write their buffers, so the caller must never free those
    /// buffers (leak them) and should fail the device. Engines leak their own bookkeeping
    /// in that case when dropped.
    fn settle(&mut self, out: &mut Vec<Completion<B>>) -> io::Result<()> {
        while self.in_flight() > 0 {
            let before = self.in_flight();
            let got = self.reap(out, before, None)?;
            if got == 0 && self.in_flight() >= before {
                return Err(io::Error::other(format!(
                    "{} operations in flight make no progress",
                    self.in_flight()
                )));
            }
        }
        Ok(())
    }
}

/// Builds the engine asked for. When io_uring is unavailable (disabled by
/// `/proc/sys/kernel/io_uring_disabled`, refused by seccomp, too old a kernel) falls back to
/// native AIO, then threads, with a log line, never an error. Returns the engine built.
///
/// Built with the `fault-injection` feature, every engine is wrapped in a
/// [`fault::FaultyEngine`] that applies the [`fault::FaultPlan`] registered for an op's fd.
pub fn open_engine<B: IoBuf>(kind: AioKind, cfg: &EngineConfig) -> io::Result<Box<dyn Engine<B>>> {
    let engine = open_engine_inner(kind, cfg)?;
    #[cfg(feature = "fault-injection")]
    let engine: Box<dyn Engine<B>> = Box::new(fault::FaultyEngine::registered(engine));
    Ok(engine)
}

fn open_engine_inner<B: IoBuf>(
    kind: AioKind,
    cfg: &EngineConfig,
) -> io::Result<Box<dyn Engine<B>>> {
    if kind == AioKind::IoUring {
        match UringEngine::new(cfg) {
            Ok(e) => return Ok(Box::new(e)),
            Err(e) => tracing::warn!("io_uring unavailable ({e}); falling back to native AIO"),
        }
    }
    if matches!(kind, AioKind::IoUring | AioKind::Native) {
        match NativeEngine::new(cfg) {
            Ok(e) => return Ok(Box::new(e)),
            Err(e) => tracing::warn!("native AIO unavailable ({e}); falling back to threads"),
        }
    }
    Ok(Box::new(ThreadsEngine::new(cfg)?))
}
