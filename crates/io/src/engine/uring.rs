//! The io_uring engine (io_uring(7), io_uring_setup(2), io_uring_enter(2),
//! io_uring_register(2)), through the `io-uring` crate.
//!
//! One ring per engine. [`Engine::submit`] writes an SQE into the submission queue (no
//! syscall); [`Engine::commit`] hands the whole batch to the kernel with one
//! `io_uring_enter(2)`; [`Engine::reap`] drains the completion queue, waiting in
//! `io_uring_enter(IORING_ENTER_GETEVENTS)` when asked to (with `IORING_ENTER_EXT_ARG` and a
//! timespec for a bounded wait, Linux 5.11+, else by polling the registered eventfd).
//!
//! Opcodes: `IORING_OP_READ`/`IORING_OP_WRITE` for single-segment buffers,
//! `IORING_OP_READV`/`IORING_OP_WRITEV` otherwise, `IORING_OP_FSYNC` with
//! `IORING_FSYNC_DATASYNC` for flushes and `IORING_OP_FALLOCATE` (Linux 5.6+; older kernels are
//! refused at [`UringEngine::new`] so that [`super::open_engine`] falls back to native AIO).
//!
//! Each SQE's `user_data` is the key of its slot in a fixed-capacity slab that owns the
//! operation's buffer (and a heap copy of its iovec array) until the CQE arrives. Files in
//! [`EngineConfig::register_fds`] are registered as fixed files (`IORING_REGISTER_FILES`) and
//! addressed by index (`IOSQE_FIXED_FILE`); they must stay open as long as the engine lives.

#![allow(unsafe_code)]

use std::collections::HashMap;
use std::io;
use std::os::unix::io::RawFd;
use std::time::Duration;

use io_uring::{cqueue, opcode, squeue, types, IoUring, Probe};

use super::common::{self, IovecArray, Slab};
use super::{Completion, Engine, EngineConfig, Op, OpKind};
use crate::buf::{AlignedBuf, IoBuf};
use crate::cache::AioKind;
use crate::sys::EventFd;

/// `user_data` of the cancellation SQEs issued by `Drop` (never a slab key).
const CANCEL_USER_DATA: u64 = u64::MAX;

/// Foreign fds [`Engine::wait_readable`] polls, at most (its mask has 32 bits).
const MAX_POLLS: usize = 32;

/// `user_data` of the poll SQE on `polls[i]` is `POLL_USER_DATA + i` (above every slab key,
/// which is below [`MAX_ENTRIES`], and below [`CANCEL_USER_DATA`]).
const POLL_USER_DATA: u64 = u64::MAX - 1 - MAX_POLLS as u64;

/// A foreign fd that [`Engine::wait_readable`] waits on through `IORING_OP_POLL_ADD`
/// (one-shot: re-armed by the next wait after it fired, so an fd left readable fires again,
/// as poll(2) would report it again).
struct PollArm {
    fd: RawFd,
    /// A poll SQE is queued or in the kernel.
    armed: bool,
    /// It fired and the caller was not told yet.
    ready: bool,
    /// The kernel refused to poll it (the caller falls back to poll(2)).
    failed: bool,
}

/// Largest ring the kernel accepts (IORING_MAX_ENTRIES).
const MAX_ENTRIES: u32 = 32768;

/// One in-flight operation: what `reap` hands back, plus what the kernel reads from.
struct Slot<B> {
    user_data: u64,
    buf: Option<B>,
    /// Heap copy of the iovec array of a READV/WRITEV (the kernel reads it at submission,
    /// and before Linux 5.5, without IORING_FEAT_SUBMIT_STABLE, possibly later): kept until
    /// the completion, then kept empty in `spare_iovecs` for the next one.
    iovecs: Option<IovecArray>,
}

/// How an SQE names its file.
#[derive(Clone, Copy)]
enum Target {
    Fd(RawFd),
    Fixed(u32),
}

/// Builds an opcode with `types::Fd` or `types::Fixed` (the crate's fd trait is sealed).
macro_rules! with_target {
    ($target:expr, |$fd:ident| $body:expr) => {
        match $target {
            Target::Fd(raw) => {
                let $fd = types::Fd(raw);
                $body
            }
            Target::Fixed(index) => {
                let $fd = types::Fixed(index);
                $body
            }
        }
    };
}

/// io_uring engine. `B` is the buffer type the engine's operations own.
pub struct UringEngine<B: IoBuf = AlignedBuf> {
    ring: IoUring,
    slab: Slab<Slot<B>>,
    /// Registered fd -> fixed file index.
    fixed: HashMap<RawFd, u32>,
    /// Registered with the ring (IORING_REGISTER_EVENTFD): signalled on every CQE.
    event: EventFd,
    /// IORING_FEAT_EXT_ARG: bounded waits inside io_uring_enter.
    ext_arg: bool,
    /// IORING_OP_POLL_ADD is supported: [`Engine::wait_readable`] works.
    can_poll: bool,
    /// The fds [`Engine::wait_readable`] was asked to wait on (each keeps its index: the
    /// `user_data` of its poll SQE).
    polls: Vec<PollArm>,
    /// Completions found by [`Engine::wait_readable`], handed out by the next reap (their
    /// slots are already free: they count in `in_flight` until then).
    stashed: Vec<Completion<B>>,
    /// Emptied iovec arrays of completed READV/WRITEVs, for the next ones.
    spare_iovecs: Vec<IovecArray>,
}

impl<B: IoBuf> UringEngine<B> {
    /// Sets up a ring of `cfg.queue_depth` entries (clamped to 1..=32768), registers the
    /// eventfd and `cfg.register_fds`. Fails when io_uring is unavailable: kernel without it
    /// (ENOSYS), disabled by `kernel.io_uring_disabled` or refused by seccomp/LSM (EPERM),
    /// or older than Linux 5.6 (missing opcodes).
    pub fn new(cfg: &EngineConfig) -> io::Result<Self> {
        match std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled") {
            // 2: io_uring_setup fails with EPERM for everyone. 1: only for unprivileged
            // processes outside kernel.io_uring_group; setup below reports that itself.
            Ok(s) if s.trim() == "2" => {
                return Err(io::Error::new(
                    io::ErrorKind::PermissionDenied,
                    "io_uring is disabled (kernel.io_uring_disabled = 2)",
                ))
            }
            _ => {}
        }
        let entries = cfg.queue_depth.clamp(1, MAX_ENTRIES);
        let ring: IoUring = IoUring::builder().build(entries).map_err(|e| {
            io::Error::new(e.kind(), format!("io_uring_setup({entries}) failed: {e}"))
        })?;

        // IORING_REGISTER_PROBE itself is Linux 5.6+: failing it means too old a kernel.
        let mut probe = Probe::new();
        ring.submitter().register_probe(&mut probe).map_err(|e| {
            io::Error::new(io::ErrorKind::Unsupported, format!("io_uring probe: {e}"))
        })?;
        for (code, name) in [
            (opcode::Read::CODE, "READ"),
            (opcode::Write::CODE, "WRITE"),
            (opcode::Readv::CODE, "READV"),
            (opcode::Writev::CODE, "WRITEV"),
            (opcode::Fsync::CODE, "FSYNC"),
            (opcode::Fallocate::CODE, "FALLOCATE"),
            (opcode::AsyncCancel::CODE, "ASYNC_CANCEL"),
        ] {
            if !probe.is_supported(code) {
                return Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    format!("io_uring lacks IORING_OP_{name}"),
                ));
            }
        }

        let event = EventFd::new()?;
        ring.submitter().register_eventfd(event.fd())?;

        let mut fixed = HashMap::new();
        if !cfg.register_fds.is_empty() {
            match ring.submitter().register_files(&cfg.register_fds) {
                Ok(()) => {
                    for (i, &fd) in cfg.register_fds.iter().enumerate() {
                        fixed.entry(fd).or_insert(i as u32);
                    }
                }
                Err(e) => tracing::warn!(
                    "io_uring: cannot register {} fixed files ({e}); using plain fds",
                    cfg.register_fds.len()
                ),
            }
        }

        let sq_entries = ring.params().sq_entries();
        let capacity = cfg.queue_depth.clamp(1, sq_entries) as usize;
        let ext_arg = ring.params().is_feature_ext_arg();
        let can_poll = probe.is_supported(opcode::PollAdd::CODE);
        tracing::debug!(
            sq_entries,
            cq_entries = ring.params().cq_entries(),
            capacity,
            ext_arg,
            fixed_files = fixed.len(),
            "io_uring engine ready"
        );
        Ok(UringEngine {
            ring,
            slab: Slab::with_capacity(capacity),
            fixed,
            event,
            ext_arg,
            can_poll,
            polls: Vec::new(),
            stashed: Vec::new(),
            spare_iovecs: Vec::new(),
        })
    }

    fn target(&self, fd: RawFd) -> Target {
        match self.fixed.get(&fd) {
            Some(&i) => Target::Fixed(i),
            None => Target::Fd(fd),
        }
    }

    /// Builds the SQE of `op` (its `user_data` is set later), plus the iovec copy it uses.
    fn build_entry(&mut self, op: &mut Op<B>) -> io::Result<(squeue::Entry, Option<IovecArray>)> {
        let target = self.target(op.fd);
        let offset = op.offset;
        Ok(match op.kind {
            OpKind::Read | OpKind::Write => {
                let write = op.kind == OpKind::Write;
                let buf = op.buf.as_mut().ok_or_else(common::missing_buffer)?;
                let iov = buf.iovecs();
                match iov {
                    [one] if u32::try_from(one.iov_len).is_ok() => {
                        let (ptr, len) = (one.iov_base.cast::<u8>(), one.iov_len as u32);
                        let e = if write {
                            with_target!(target, |fd| opcode::Write::new(fd, ptr, len)
                                .offset(offset)
                                .build())
                        } else {
                            with_target!(target, |fd| opcode::Read::new(fd, ptr, len)
                                .offset(offset)
                                .build())
                        };
                        (e, None)
                    }
                    _ => {
                        let copy = IovecArray::copy_into(self.spare_iovecs.pop(), iov);
                        let n = u32::try_from(copy.len())
                            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
                        let ptr = copy.as_ptr();
                        let e = if write {
                            with_target!(target, |fd| opcode::Writev::new(fd, ptr, n)
                                .offset(offset)
                                .build())
                        } else {
                            with_target!(target, |fd| opcode::Readv::new(fd, ptr, n)
                                .offset(offset)
                                .build())
                        };
                        (e, Some(copy))
                    }
                }
            }
            OpKind::Flush => (
                with_target!(target, |fd| opcode::Fsync::new(fd)
                    .flags(types::FsyncFlags::DATASYNC)
                    .build()),
                None,
            ),
            OpKind::Fallocate { mode, len } => (
                with_target!(target, |fd| opcode::Fallocate::new(fd, len)
                    .offset(offset)
                    .mode(mode)
                    .build()),
                None,
            ),
        })
    }

    /// io_uring_enter(2) for the queued SQEs, retried on EINTR. With `want > 0` also waits
    /// for that many CQEs.
    fn enter(&self, want: usize) -> io::Result<()> {
        loop {
            match self.ring.submit_and_wait(want) {
                Ok(_) => return Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {
                    if want > 0 {
                        // The caller re-checks its condition and loops.
                        return Ok(());
                    }
                }
                // EBUSY: the CQ overflowed and must be drained first; the SQEs stay queued.
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => return Ok(()),
                Err(e) => return Err(e),
            }
        }
    }

    /// Makes room in the SQ (normally never full: capacity <= SQ entries).
    fn ensure_sq_space(&mut self) -> io::Result<()> {
        if self.ring.submission().is_full() {
            self.enter(0)?;
            if self.ring.submission().is_full() {
                return Err(io::Error::from_raw_os_error(libc::EAGAIN));
            }
        }
        Ok(())
    }

    /// Moves the stashed completions and every available CQE into `out`.
    fn drain(&mut self, out: &mut Vec<Completion<B>>) -> usize {
        let stashed = self.stashed.len();
        out.append(&mut self.stashed);
        stashed + self.drain_cq(out)
    }

    /// Moves every available CQE into `out` (a poll's CQE marks its fd ready instead).
    fn drain_cq(&mut self, out: &mut Vec<Completion<B>>) -> usize {
        let mut n = 0;
        let mut cq = self.ring.completion();
        cq.sync();
        for cqe in &mut cq {
            let key = cqe.user_data();
            if key == CANCEL_USER_DATA {
                continue;
            }
            if key >= POLL_USER_DATA {
                if let Some(p) = self.polls.get_mut((key - POLL_USER_DATA) as usize) {
                    p.armed = false;
                    match cqe.result() {
                        r if r >= 0 => p.ready = true,
                        r if r == -libc::ECANCELED || r == -libc::EINTR => {}
                        r => {
                            tracing::debug!(fd = p.fd, errno = -r, "io_uring cannot poll an fd");
                            p.failed = true;
                        }
                    }
                }
                continue;
            }
            let Some(slot) = self.slab.remove(key as usize) else {
                tracing::error!(key, "io_uring: completion for an unknown slot");
                continue;
            };
            debug_assert!(!cqueue::more(cqe.flags()));
            if let Some(a) = slot.iovecs {
                self.spare_iovecs.push(a.spare());
            }
            out.push(Completion {
                user_data: slot.user_data,
                result: common::kernel_result(i64::from(cqe.result())),
                buf: slot.buf,
                phase: crate::Phase::Done,
            });
            n += 1;
        }
        n
    }

    /// Waits for `want` CQEs (beyond those drained) or until `timeout`.
    fn wait(&mut self, want: usize, timeout: Option<Duration>) -> io::Result<()> {
        match timeout {
            None => self.enter(want),
            Some(t) if self.ext_arg => {
                let ts = types::Timespec::from(t);
                let args = types::SubmitArgs::new().timespec(&ts);
                match self.ring.submitter().submit_with_args(want, &args) {
                    Ok(_) => Ok(()),
                    Err(e)
                        if matches!(
                            e.raw_os_error(),
                            Some(libc::ETIME | libc::EINTR | libc::EBUSY)
                        ) =>
                    {
                        Ok(())
                    }
                    Err(e) => Err(e),
                }
            }
            Some(t) => {
                // No IORING_ENTER_EXT_ARG (Linux < 5.11): the eventfd is signalled on every
                // CQE, so wait for it to become readable. Clearing it first makes the poll
                // block instead of spinning; a CQE posted after the clear signals it again.
                self.event.drain();
                if self.ring.completion().is_empty() {
                    self.event.wait(Some(t))?;
                }
                Ok(())
            }
        }
    }
}

impl<B: IoBuf> Engine<B> for UringEngine<B> {
    fn kind(&self) -> AioKind {
        AioKind::IoUring
    }

    fn submit(&mut self, mut op: Op<B>) -> Result<(), (Op<B>, io::Error)> {
        if self.slab.is_full() {
            let cap = self.slab.capacity();
            return Err((op, common::queue_full(cap)));
        }
        let (entry, iovecs) = match self.build_entry(&mut op) {
            Ok(x) => x,
            Err(e) => return Err((op, e)),
        };
        if let Err(e) = self.ensure_sq_space() {
            return Err((op, e));
        }
        let key = self
            .slab
            .insert(Slot {
                user_data: op.user_data,
                buf: op.buf,
                iovecs,
            })
            .expect("slab has room (checked above)");
        let entry = entry.user_data(key as u64);
        // SAFETY: the SQE points at the buffer's memory (which the IoBuf contract keeps valid
        // and unmoved while the buffer is owned by the op) and at the iovec copy; both now
        // live in slab slot `key` until the CQE with this user_data is drained (or, on drop,
        // until every op has completed). The SQ has room (ensure_sq_space).
        let pushed = unsafe { self.ring.submission().push(&entry) };
        debug_assert!(pushed.is_ok());
        if pushed.is_err() {
            // Cannot happen (room was checked); keep the op's memory consistent anyway.
            let slot = self.slab.remove(key).expect("just inserted");
            let op = Op {
                kind: op.kind,
                fd: op.fd,
                offset: op.offset,
                buf: slot.buf,
                user_data: slot.user_data,
            };
            return Err((op, io::Error::from_raw_os_error(libc::EAGAIN)));
        }
        Ok(())
    }

    fn commit(&mut self) -> io::Result<()> {
        // Without IORING_SETUP_SUBMIT_ALL the kernel stops a batch at an SQE that fails early
        // (it still posts that SQE's CQE): loop until the SQ is empty or no progress is made.
        let mut queued = self.ring.submission().len();
        while queued > 0 {
            self.enter(0)?;
            let now = self.ring.submission().len();
            if now >= queued {
                break;
            }
            queued = now;
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
        let mut got = self.drain(out);
        loop {
            let want = common::still_wanted(min, got, self.slab.len(), timeout);
            if want == 0 {
                return Ok(got);
            }
            let left = common::remaining(deadline);
            if left == Some(Duration::ZERO) {
                return Ok(got);
            }
            self.wait(want, left)?;
            got += self.drain(out);
        }
    }

    fn event_fd(&self) -> RawFd {
        self.event.fd()
    }

    fn in_flight(&self) -> usize {
        self.slab.len() + self.stashed.len()
    }

    fn wait_readable(
        &mut self,
        fds: &[RawFd],
        timeout: Option<Duration>,
    ) -> io::Result<Option<u32>> {
        if !self.can_poll || fds.len() > MAX_POLLS {
            return Ok(None);
        }
        let mut index = [0usize; MAX_POLLS];
        for (j, &fd) in fds.iter().enumerate() {
            let i = match self.polls.iter().position(|p| p.fd == fd) {
                Some(i) => i,
                None if self.polls.len() < MAX_POLLS => {
                    self.polls.push(PollArm {
                        fd,
                        armed: false,
                        ready: false,
                        failed: false,
                    });
                    self.polls.len() - 1
                }
                None => return Ok(None),
            };
            if self.polls[i].failed {
                return Ok(None);
            }
            index[j] = i;
            if !self.polls[i].armed && !self.polls[i].ready {
                self.ensure_sq_space()?;
                let sqe = opcode::PollAdd::new(types::Fd(fd), libc::POLLIN as u32)
                    .build()
                    .user_data(POLL_USER_DATA + i as u64);
                // SAFETY: a poll SQE references no memory of ours; the fd is the caller's,
                // which keeps it open (the kernel holds its own reference meanwhile).
                unsafe { self.ring.submission().push(&sqe) }
                    .map_err(|_| io::Error::from_raw_os_error(libc::EAGAIN))?;
                self.polls[i].armed = true;
            }
        }
        let index = &index[..fds.len()];
        let mut found = std::mem::take(&mut self.stashed);
        self.drain_cq(&mut found);
        self.stashed = found;
        let anything = |e: &Self| {
            !e.stashed.is_empty() || index.iter().any(|&i| e.polls[i].ready || e.polls[i].failed)
        };
        if anything(self) {
            self.commit()?;
        } else {
            if timeout.is_some() && !self.ext_arg {
                // `wait` then sleeps on the eventfd without submitting.
                self.commit()?;
            }
            self.wait(1, timeout)?;
            let mut found = std::mem::take(&mut self.stashed);
            self.drain_cq(&mut found);
            self.stashed = found;
        }
        if index.iter().any(|&i| self.polls[i].failed) {
            return Ok(None);
        }
        let mut mask = 0u32;
        for (j, &i) in index.iter().enumerate() {
            if std::mem::take(&mut self.polls[i].ready) {
                mask |= 1 << j;
            }
        }
        Ok(Some(mask))
    }

    fn capacity(&self) -> usize {
        self.slab.capacity()
    }

    fn settle(&mut self, out: &mut Vec<Completion<B>>) -> io::Result<()> {
        self.settle_all(out)
    }
}

impl<B: IoBuf> UringEngine<B> {
    /// Queues an IORING_OP_ASYNC_CANCEL for every operation in flight (best effort).
    fn cancel_all(&mut self) {
        let keys: Vec<usize> = self.slab.keys().collect();
        for key in keys {
            let cancel = opcode::AsyncCancel::new(key as u64)
                .build()
                .user_data(CANCEL_USER_DATA);
            if self.ensure_sq_space().is_err() {
                break;
            }
            // SAFETY: a cancel SQE references no memory.
            let _ = unsafe { self.ring.submission().push(&cancel) };
        }
    }

    /// [`Engine::settle`]: cancels what can be cancelled, then waits for every CQE.
    fn settle_all(&mut self, out: &mut Vec<Completion<B>>) -> io::Result<()> {
        out.append(&mut self.stashed);
        if self.slab.is_empty() {
            return Ok(());
        }
        self.cancel_all();
        while !self.slab.is_empty() {
            self.enter(1)?;
            self.drain(out);
        }
        Ok(())
    }
}

impl<B: IoBuf> Drop for UringEngine<B> {
    /// Cancels what can be cancelled and waits for every operation to complete before the
    /// buffers are freed (the kernel may be writing into them until their CQE). If that wait
    /// fails, the slab (the ops' buffers and iovec arrays) is leaked, never freed; the owner
    /// of the memory the buffers point into must leak it too (see [`Engine::settle`]).
    fn drop(&mut self) {
        let mut sink = Vec::new();
        if let Err(e) = self.settle_all(&mut sink) {
            tracing::error!(
                "io_uring: waiting for in-flight operations failed ({e}); leaking {} buffers",
                self.slab.len()
            );
            // Never free memory the kernel may still write to.
            let slab = std::mem::replace(&mut self.slab, Slab::with_capacity(0));
            std::mem::forget(slab);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn engine(qd: u32) -> Option<UringEngine<AlignedBuf>> {
        match UringEngine::new(&EngineConfig {
            queue_depth: qd,
            ..EngineConfig::default()
        }) {
            Ok(e) => Some(e),
            Err(e) => {
                eprintln!("io_uring unavailable here ({e}); skipping");
                None
            }
        }
    }

    /// pipe2(2): (read end, write end).
    fn pipe() -> (std::os::fd::OwnedFd, std::os::fd::OwnedFd) {
        use std::os::fd::FromRawFd;
        let mut fds = [0; 2];
        // SAFETY: pipe2 writes two descriptors into the array.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: both descriptors are new and owned by nobody else.
        unsafe {
            (
                std::os::fd::OwnedFd::from_raw_fd(fds[0]),
                std::os::fd::OwnedFd::from_raw_fd(fds[1]),
            )
        }
    }

    #[test]
    fn timed_wait_without_ext_arg_uses_the_eventfd() {
        let Some(mut e) = engine(4) else { return };
        e.ext_arg = false;
        let mut out = Vec::new();
        let t0 = std::time::Instant::now();
        assert_eq!(
            e.reap(&mut out, 1, Some(Duration::from_millis(60)))
                .unwrap(),
            0
        );
        assert!(t0.elapsed() >= Duration::from_millis(60));

        // A real completion wakes the wait early.
        let (r, w) = pipe();
        use std::io::Write;
        use std::os::fd::AsRawFd;
        let mut w = std::fs::File::from(w);
        e.submit(Op {
            kind: OpKind::Read,
            fd: r.as_raw_fd(),
            offset: 0,
            buf: Some(AlignedBuf::new(16, 8)),
            user_data: 7,
        })
        .map_err(|(_, e)| e)
        .unwrap();
        e.commit().unwrap();
        let writer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(30));
            w.write_all(b"hello").unwrap();
        });
        let t0 = std::time::Instant::now();
        let n = e.reap(&mut out, 1, Some(Duration::from_secs(10))).unwrap();
        assert_eq!(n, 1);
        assert!(t0.elapsed() < Duration::from_secs(5));
        assert_eq!(out[0].user_data, 7);
        assert_eq!(*out[0].result.as_ref().unwrap(), 5);
        assert_eq!(&out[0].buf.as_ref().unwrap()[..5], b"hello");
        writer.join().unwrap();
    }

    #[test]
    fn wait_readable_wakes_on_a_foreign_fd_and_on_a_completion_and_loses_neither() {
        use std::io::{Read, Write};
        use std::os::fd::AsRawFd;
        let Some(mut e) = engine(4) else { return };
        let (wake_r, wake_w) = pipe();
        let (data_r, data_w) = pipe();
        let mut wake_w = std::fs::File::from(wake_w);
        let mut wake_r = std::fs::File::from(wake_r);
        let mut data_w = std::fs::File::from(data_w);
        let fds = [wake_r.as_raw_fd()];

        // Nothing ready: the bounded wait times out with an empty mask.
        let t0 = std::time::Instant::now();
        assert_eq!(
            e.wait_readable(&fds, Some(Duration::from_millis(50)))
                .unwrap(),
            Some(0)
        );
        assert!(t0.elapsed() >= Duration::from_millis(40));

        // The foreign fd becoming readable wakes an unbounded wait; left readable it is
        // reported again (level-triggered); cleared, it is not.
        let writer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(30));
            wake_w.write_all(b"x").unwrap();
            wake_w
        });
        assert_eq!(e.wait_readable(&fds, None).unwrap(), Some(1));
        let _wake_w = writer.join().unwrap();
        assert_eq!(
            e.wait_readable(&fds, Some(Duration::from_millis(10)))
                .unwrap(),
            Some(1)
        );
        let mut b = [0u8; 1];
        wake_r.read_exact(&mut b).unwrap();
        assert_eq!(
            e.wait_readable(&fds, Some(Duration::from_millis(20)))
                .unwrap(),
            Some(0)
        );

        // An operation submitted without commit is pushed by the wait, its completion wakes
        // it, and the next reap hands it out (counted in flight meanwhile).
        e.submit(Op {
            kind: OpKind::Read,
            fd: data_r.as_raw_fd(),
            offset: 0,
            buf: Some(AlignedBuf::new(16, 8)),
            user_data: 9,
        })
        .map_err(|(_, e)| e)
        .unwrap();
        data_w.write_all(b"data").unwrap();
        let t0 = std::time::Instant::now();
        assert_eq!(e.wait_readable(&fds, None).unwrap(), Some(0));
        assert!(t0.elapsed() < Duration::from_secs(5));
        assert_eq!(e.in_flight(), 1);
        let mut out = Vec::new();
        assert_eq!(e.reap(&mut out, 0, None).unwrap(), 1);
        assert_eq!(out[0].user_data, 9);
        assert_eq!(*out[0].result.as_ref().unwrap(), 4);
        assert_eq!(e.in_flight(), 0);
    }

    #[test]
    fn wait_readable_refuses_more_fds_than_its_mask_holds() {
        let Some(mut e) = engine(4) else { return };
        let fds = [0 as RawFd; MAX_POLLS + 1];
        assert_eq!(e.wait_readable(&fds, None).unwrap(), None);
    }

    #[test]
    fn drop_cancels_an_op_that_would_never_complete() {
        let Some(mut e) = engine(4) else { return };
        let (r, _w) = pipe();
        use std::os::fd::AsRawFd;
        e.submit(Op {
            kind: OpKind::Read,
            fd: r.as_raw_fd(),
            offset: 0,
            buf: Some(AlignedBuf::new(16, 8)),
            user_data: 1,
        })
        .map_err(|(_, e)| e)
        .unwrap();
        e.commit().unwrap();
        drop(e); // must not hang
    }

    #[test]
    fn fixed_files_are_used_for_registered_fds() {
        let f = tempfile::tempfile().unwrap();
        use std::os::fd::AsRawFd;
        let fd = f.as_raw_fd();
        let mut e = match UringEngine::<AlignedBuf>::new(&EngineConfig {
            queue_depth: 8,
            register_fds: vec![fd],
            ..EngineConfig::default()
        }) {
            Ok(e) => e,
            Err(_) => return,
        };
        assert!(matches!(e.target(fd), Target::Fixed(0)));
        assert!(matches!(e.target(fd + 1000), Target::Fd(_)));
        let mut buf = AlignedBuf::new(4096, 4096);
        buf.fill(0xab);
        e.submit(Op {
            kind: OpKind::Write,
            fd,
            offset: 4096,
            buf: Some(buf),
            user_data: 3,
        })
        .map_err(|(_, e)| e)
        .unwrap();
        let mut out = Vec::new();
        assert_eq!(e.reap(&mut out, 1, None).unwrap(), 1);
        assert_eq!(*out[0].result.as_ref().unwrap(), 4096);
        assert_eq!(f.metadata().unwrap().len(), 8192);
    }
}
