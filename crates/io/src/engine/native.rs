//! The Linux native AIO engine: io_setup(2), io_submit(2), io_getevents(2), io_destroy(2)
//! called as raw syscalls, with `struct iocb` / `struct io_event` from `linux/aio_abi.h`.
//!
//! [`Engine::submit`] fills an iocb (kept in a `Box` so that its address is stable) and queues
//! it; [`Engine::commit`] passes every queued iocb to one io_submit(2) (handling partial
//! submission: the iocb at which io_submit stopped is resubmitted alone to learn its error).
//! Every iocb carries `IOCB_FLAG_RESFD`, so the kernel signals the engine's eventfd on each
//! completion.
//!
//! Operations the kernel cannot run asynchronously are done synchronously and their
//! completions queued (and the eventfd signalled) for the next `reap`:
//! - fallocate is not an AIO opcode at all;
//! - `IOCB_CMD_FDSYNC` is refused with EINVAL before Linux 4.18 (and by filesystems without
//!   `->fsync`): the flush then runs as fdatasync(2).
//!
//! Native AIO is only truly asynchronous on O_DIRECT files; on buffered files io_submit(2)
//! performs the I/O before it returns (as with QEMU's `aio=native`).

#![allow(unsafe_code)]

use std::collections::VecDeque;
use std::io;
use std::os::unix::io::RawFd;
use std::time::Duration;

use super::common::{self, IovecArray, Slab};
use super::{Completion, Engine, EngineConfig, Op, OpKind};
use crate::buf::{AlignedBuf, IoBuf};
use crate::cache::AioKind;
use crate::sys::EventFd;

/// `aio_context_t` (linux/aio_abi.h).
type AioContext = libc::c_ulong;

// enum { IOCB_CMD_* } (linux/aio_abi.h).
const IOCB_CMD_PREAD: u16 = 0;
const IOCB_CMD_PWRITE: u16 = 1;
const IOCB_CMD_FDSYNC: u16 = 3;
const IOCB_CMD_PREADV: u16 = 7;
const IOCB_CMD_PWRITEV: u16 = 8;
/// `aio_flags`: signal `aio_resfd` (an eventfd) on completion.
const IOCB_FLAG_RESFD: u32 = 1 << 0;

/// `struct iocb` (linux/aio_abi.h). `aio_key` and `aio_rw_flags` share a 64-bit word whose
/// order depends on endianness (`PADDED` in the header).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct Iocb {
    /// Returned in `io_event.data`: the engine's slot key.
    aio_data: u64,
    #[cfg(target_endian = "little")]
    aio_key: u32,
    /// RWF_* flags (preadv2(2)).
    aio_rw_flags: i32,
    #[cfg(target_endian = "big")]
    aio_key: u32,
    aio_lio_opcode: u16,
    aio_reqprio: i16,
    aio_fildes: u32,
    /// Buffer address, or iovec array address for PREADV/PWRITEV.
    aio_buf: u64,
    /// Byte count, or iovec count for PREADV/PWRITEV.
    aio_nbytes: u64,
    aio_offset: i64,
    aio_reserved2: u64,
    /// IOCB_FLAG_*.
    aio_flags: u32,
    /// eventfd signalled on completion when IOCB_FLAG_RESFD is set.
    aio_resfd: u32,
}

/// `struct io_event` (linux/aio_abi.h).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct IoEvent {
    /// The iocb's `aio_data`.
    data: u64,
    /// Address of the iocb.
    obj: u64,
    /// Bytes transferred, or a negated errno.
    res: i64,
    res2: i64,
}

const _: () = assert!(std::mem::size_of::<Iocb>() == 64);
const _: () = assert!(std::mem::size_of::<IoEvent>() == 32);

/// One operation handed to the kernel (queued or submitted).
struct Slot<B> {
    user_data: u64,
    buf: Option<B>,
    /// Boxed so that its address (given to io_submit) does not move with the slab.
    iocb: Box<Iocb>,
    /// Heap copy of the iovec array for PREADV/PWRITEV, kept until completion.
    _iovecs: Option<IovecArray>,
}

/// The pointer array io_submit(2) reads (scratch, reused between commits).
struct IocbPtrs(Vec<*mut Iocb>);

// SAFETY: the pointers are only dereferenced by the kernel during io_submit, called by the
// engine's owner; they point into boxes owned by the same engine.
unsafe impl Send for IocbPtrs {}

/// Linux native AIO engine. `B` is the buffer type the engine's operations own.
pub struct NativeEngine<B: IoBuf = AlignedBuf> {
    ctx: AioContext,
    /// Ops queued for or submitted to the kernel.
    slab: Slab<Slot<B>>,
    /// Keys of queued ops, in submission order, not yet accepted by io_submit.
    pending: VecDeque<usize>,
    /// Ops accepted by io_submit and not yet returned by io_getevents.
    submitted: usize,
    /// Completions produced without the kernel (fallocate, synchronous fdatasync, errors of
    /// io_submit itself), returned by the next reap.
    ready: VecDeque<Completion<B>>,
    capacity: usize,
    event: EventFd,
    events: Vec<IoEvent>,
    ptrs: IocbPtrs,
}

/// `syscall(2)` returning a `c_long`, with errors from errno.
fn check(r: libc::c_long) -> io::Result<libc::c_long> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

impl<B: IoBuf> NativeEngine<B> {
    /// io_setup(2) for `cfg.queue_depth` events and an eventfd for `IOCB_FLAG_RESFD`. Fails
    /// when the kernel lacks AIO (ENOSYS) or `fs.aio-max-nr` is exhausted (EAGAIN).
    pub fn new(cfg: &EngineConfig) -> io::Result<Self> {
        let capacity = cfg.queue_depth.max(1) as usize;
        let event = EventFd::new()?;
        let mut ctx: AioContext = 0;
        // SAFETY: io_setup writes one aio_context_t through the pointer, valid for the call;
        // ctx is 0 as the syscall requires.
        check(unsafe {
            libc::syscall(
                libc::SYS_io_setup,
                capacity as libc::c_long,
                &mut ctx as *mut AioContext,
            )
        })
        .map_err(|e| io::Error::new(e.kind(), format!("io_setup({capacity}) failed: {e}")))?;
        let engine = NativeEngine {
            ctx,
            slab: Slab::with_capacity(capacity),
            pending: VecDeque::with_capacity(capacity),
            submitted: 0,
            ready: VecDeque::new(),
            capacity,
            event,
            events: vec![IoEvent::default(); capacity],
            ptrs: IocbPtrs(Vec::with_capacity(capacity)),
        };
        tracing::debug!(capacity, "native AIO engine ready");
        Ok(engine)
    }

    /// Queues a completion produced without the kernel and signals the eventfd.
    fn complete_now(&mut self, user_data: u64, result: io::Result<usize>, buf: Option<B>) {
        self.ready.push_back(Completion {
            user_data,
            result,
            buf,
            phase: crate::Phase::Done,
        });
        self.event.signal();
    }

    /// The op at the head of `pending` was refused by io_submit with `errno`.
    fn fail_first_pending(&mut self, errno: i32) {
        let Some(key) = self.pending.pop_front() else {
            return;
        };
        let slot = self.slab.remove(key).expect("pending key is in the slab");
        let result = if slot.iocb.aio_lio_opcode == IOCB_CMD_FDSYNC && errno == libc::EINVAL {
            // No async fdatasync for this file (Linux < 4.18): do it here.
            common::fdatasync(slot.iocb.aio_fildes as RawFd)
        } else {
            Err(io::Error::from_raw_os_error(errno))
        };
        self.complete_now(slot.user_data, result, slot.buf);
    }

    /// io_getevents(2): at least `min_nr` events (clamped to the capacity) within `timeout`
    /// (None: no limit). Appends them to `out`; EINTR counts as zero events.
    fn get_events(
        &mut self,
        out: &mut Vec<Completion<B>>,
        min_nr: usize,
        timeout: Option<Duration>,
    ) -> io::Result<usize> {
        let nr = self.events.len();
        let min_nr = min_nr.min(nr);
        let mut ts = timeout.map(|t| libc::timespec {
            tv_sec: libc::time_t::try_from(t.as_secs()).unwrap_or(libc::time_t::MAX),
            tv_nsec: t.subsec_nanos().into(),
        });
        let ts_ptr = ts
            .as_mut()
            .map_or(std::ptr::null_mut(), |t| t as *mut libc::timespec);
        // SAFETY: `events` is valid for `nr` io_event writes; ts_ptr is null or points to a
        // timespec on the stack, valid for the call.
        let r = check(unsafe {
            libc::syscall(
                libc::SYS_io_getevents,
                self.ctx,
                min_nr as libc::c_long,
                nr as libc::c_long,
                self.events.as_mut_ptr(),
                ts_ptr,
            )
        });
        let n = match r {
            Ok(n) => n as usize,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => 0,
            Err(e) => return Err(e),
        };
        for i in 0..n {
            let ev = self.events[i];
            let Some(slot) = self.slab.remove(ev.data as usize) else {
                tracing::error!(key = ev.data, "native AIO: event for an unknown slot");
                continue;
            };
            self.submitted -= 1;
            out.push(Completion {
                user_data: slot.user_data,
                result: common::kernel_result(ev.res),
                buf: slot.buf,
                phase: crate::Phase::Done,
            });
        }
        Ok(n)
    }

    fn drain_ready(&mut self, out: &mut Vec<Completion<B>>) -> usize {
        let n = self.ready.len();
        out.extend(self.ready.drain(..));
        n
    }
}

impl<B: IoBuf> Engine<B> for NativeEngine<B> {
    fn kind(&self) -> AioKind {
        AioKind::Native
    }

    fn submit(&mut self, mut op: Op<B>) -> Result<(), (Op<B>, io::Error)> {
        if self.slab.len() + self.ready.len() >= self.capacity {
            return Err((op, common::queue_full(self.capacity)));
        }
        let mut iocb = Box::new(Iocb {
            // aio_fildes is a __u32: -1 becomes an fd the kernel rejects with EBADF.
            aio_fildes: op.fd as u32,
            aio_offset: op.offset as i64,
            aio_flags: IOCB_FLAG_RESFD,
            aio_resfd: self.event.fd() as u32,
            ..Iocb::default()
        });
        let mut iovecs = None;
        match op.kind {
            OpKind::Fallocate { mode, len } => {
                // Not an AIO opcode: run it now, complete it at the next reap.
                let result = common::fallocate(op.fd, mode, op.offset, len);
                self.complete_now(op.user_data, result, op.buf);
                return Ok(());
            }
            OpKind::Flush => iocb.aio_lio_opcode = IOCB_CMD_FDSYNC,
            OpKind::Read | OpKind::Write => {
                let write = op.kind == OpKind::Write;
                let Some(buf) = op.buf.as_mut() else {
                    return Err((op, common::missing_buffer()));
                };
                match buf.iovecs() {
                    [one] => {
                        iocb.aio_lio_opcode = if write {
                            IOCB_CMD_PWRITE
                        } else {
                            IOCB_CMD_PREAD
                        };
                        iocb.aio_buf = one.iov_base as u64;
                        iocb.aio_nbytes = one.iov_len as u64;
                    }
                    iov => {
                        let copy = IovecArray::copy_of(iov);
                        iocb.aio_lio_opcode = if write {
                            IOCB_CMD_PWRITEV
                        } else {
                            IOCB_CMD_PREADV
                        };
                        iocb.aio_buf = copy.as_ptr() as u64;
                        iocb.aio_nbytes = copy.len() as u64;
                        iovecs = Some(copy);
                    }
                }
            }
        }
        let key = self
            .slab
            .insert(Slot {
                user_data: op.user_data,
                buf: op.buf,
                iocb,
                _iovecs: iovecs,
            })
            .expect("slab has room (checked above)");
        self.slab.get_mut(key).expect("just inserted").iocb.aio_data = key as u64;
        self.pending.push_back(key);
        Ok(())
    }

    fn commit(&mut self) -> io::Result<()> {
        while !self.pending.is_empty() {
            self.ptrs.0.clear();
            for &key in &self.pending {
                let slot = self.slab.get_mut(key).expect("pending key is in the slab");
                self.ptrs.0.push(&mut *slot.iocb as *mut Iocb);
            }
            // SAFETY: every pointer is to a boxed iocb owned by a slab slot, which stays in
            // place until its io_event is reaped (or until Drop has waited for it); the
            // buffers and iovec arrays those iocbs point to live in the same slots.
            let r = check(unsafe {
                libc::syscall(
                    libc::SYS_io_submit,
                    self.ctx,
                    self.ptrs.0.len() as libc::c_long,
                    self.ptrs.0.as_mut_ptr(),
                )
            });
            match r {
                Ok(0) => break,
                Ok(n) => {
                    self.pending.drain(..n as usize);
                    self.submitted += n as usize;
                }
                Err(e) => match e.raw_os_error() {
                    Some(libc::EAGAIN) => {
                        // The context is out of slots: retry after completions are reaped,
                        // unless nothing is in the kernel to free one.
                        if self.submitted == 0 {
                            return Err(e);
                        }
                        break;
                    }
                    Some(libc::EINTR) => {}
                    // The first iocb is invalid (EBADF, EINVAL, EFAULT, ...): it alone fails.
                    Some(errno) => self.fail_first_pending(errno),
                    None => return Err(e),
                },
            }
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
        let mut got = self.drain_ready(out);
        if self.submitted > 0 {
            got += self.get_events(out, 0, Some(Duration::ZERO))?;
        }
        loop {
            let outstanding = self.slab.len() + self.ready.len();
            let want = common::still_wanted(min, got, outstanding, timeout);
            if want == 0 {
                return Ok(got);
            }
            let left = common::remaining(deadline);
            if left == Some(Duration::ZERO) {
                return Ok(got);
            }
            if self.ready.is_empty() {
                // With no timeout `want <= outstanding`, so `submitted > 0` here unless
                // io_submit refused everything with EAGAIN (then commit reported it).
                let min_nr = if timeout.is_none() {
                    want.min(self.submitted)
                } else {
                    want
                };
                got += self.get_events(out, min_nr, left)?;
            }
            self.commit()?;
            got += self.drain_ready(out);
        }
    }

    fn event_fd(&self) -> RawFd {
        self.event.fd()
    }

    fn in_flight(&self) -> usize {
        self.slab.len() + self.ready.len()
    }

    fn capacity(&self) -> usize {
        self.capacity
    }
}

impl<B: IoBuf> Drop for NativeEngine<B> {
    /// Waits for every submitted operation, then io_destroy(2) (which would also wait).
    fn drop(&mut self) {
        let mut sink = Vec::new();
        while self.submitted > 0 {
            let want = self.submitted;
            if let Err(e) = self.get_events(&mut sink, want, None) {
                tracing::error!("native AIO: io_getevents failed in drop ({e})");
                break;
            }
            sink.clear();
        }
        // SAFETY: ctx came from io_setup and is destroyed once. io_destroy cancels or waits
        // for every outstanding operation, so the buffers can be freed afterwards.
        let r = unsafe { libc::syscall(libc::SYS_io_destroy, self.ctx) };
        if r < 0 {
            let e = io::Error::last_os_error();
            tracing::error!(
                "native AIO: io_destroy failed ({e}); leaking {} buffers",
                self.slab.len()
            );
            let slab = std::mem::replace(&mut self.slab, Slab::with_capacity(0));
            std::mem::forget(slab);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iocb_layout_matches_aio_abi() {
        use std::mem::offset_of;
        assert_eq!(offset_of!(Iocb, aio_data), 0);
        #[cfg(target_endian = "little")]
        {
            assert_eq!(offset_of!(Iocb, aio_key), 8);
            assert_eq!(offset_of!(Iocb, aio_rw_flags), 12);
        }
        assert_eq!(offset_of!(Iocb, aio_lio_opcode), 16);
        assert_eq!(offset_of!(Iocb, aio_reqprio), 18);
        assert_eq!(offset_of!(Iocb, aio_fildes), 20);
        assert_eq!(offset_of!(Iocb, aio_buf), 24);
        assert_eq!(offset_of!(Iocb, aio_nbytes), 32);
        assert_eq!(offset_of!(Iocb, aio_offset), 40);
        assert_eq!(offset_of!(Iocb, aio_reserved2), 48);
        assert_eq!(offset_of!(Iocb, aio_flags), 56);
        assert_eq!(offset_of!(Iocb, aio_resfd), 60);
        assert_eq!(offset_of!(IoEvent, res), 16);
    }

    #[test]
    fn fallocate_completes_without_the_kernel_and_signals() {
        let f = tempfile::tempfile().unwrap();
        use std::os::fd::AsRawFd;
        let mut e = NativeEngine::<AlignedBuf>::new(&EngineConfig {
            queue_depth: 2,
            ..EngineConfig::default()
        })
        .unwrap();
        e.submit(Op {
            kind: OpKind::Fallocate { mode: 0, len: 8192 },
            fd: f.as_raw_fd(),
            offset: 0,
            buf: None,
            user_data: 5,
        })
        .map_err(|(_, e)| e)
        .unwrap();
        assert_eq!(e.in_flight(), 1);
        assert!(crate::sys::wait_readable(e.event_fd(), Some(Duration::ZERO)).unwrap());
        let mut out = Vec::new();
        assert_eq!(e.reap(&mut out, 0, None).unwrap(), 1);
        assert_eq!(out[0].user_data, 5);
        assert_eq!(*out[0].result.as_ref().unwrap(), 0);
        assert_eq!(f.metadata().unwrap().len(), 8192);
        assert_eq!(e.in_flight(), 0);
    }
}
