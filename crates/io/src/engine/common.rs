//! Pieces shared by the engines: the in-flight slab, owned iovec arrays and small syscall
//! helpers (the eventfd is [`crate::sys::EventFd`]).

#![allow(unsafe_code)]

use std::io;
use std::os::unix::io::RawFd;
use std::time::{Duration, Instant};

use super::Op;
use crate::buf::IoBuf;

/// The error handed back by `submit` when `in_flight() == capacity()`.
pub(crate) fn queue_full(capacity: usize) -> io::Error {
    io::Error::new(
        io::ErrorKind::WouldBlock,
        crate::Error::QueueFull { capacity },
    )
}

/// The error handed back by `submit` for a read or write without a buffer.
pub(crate) fn missing_buffer() -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        "read and write operations need a buffer",
    )
}

/// Whether an op of this kind needs a buffer.
pub(crate) fn needs_buf<B: IoBuf>(op: &Op<B>) -> bool {
    matches!(op.kind, super::OpKind::Read | super::OpKind::Write)
}

/// A heap copy of a buffer's iovec array. The kernel gets a pointer to this copy (not to the
/// array inside the buffer value, which moves with the value); the heap allocation does not
/// move when the owning slot moves, and it is kept until the operation completes.
pub(crate) struct IovecArray(Box<[libc::iovec]>);

// SAFETY: the iovecs only describe memory owned by the buffer that travels with them (the
// buffer is `Send`); the array itself is plain data owned exclusively by this value.
unsafe impl Send for IovecArray {}

impl IovecArray {
    pub(crate) fn copy_of(iov: &[libc::iovec]) -> IovecArray {
        IovecArray(iov.into())
    }
    pub(crate) fn as_ptr(&self) -> *const libc::iovec {
        self.0.as_ptr()
    }
    pub(crate) fn len(&self) -> usize {
        self.0.len()
    }
}

/// A fixed-capacity slab: `insert` returns a small integer key (used as the kernel-side
/// `user_data` / `aio_data`), `remove` frees it. The backing `Vec` is allocated once at its
/// full capacity and never reallocated.
pub(crate) struct Slab<T> {
    slots: Vec<Option<T>>,
    free: Vec<usize>,
    len: usize,
}

impl<T> Slab<T> {
    pub(crate) fn with_capacity(capacity: usize) -> Slab<T> {
        let mut slots = Vec::with_capacity(capacity);
        slots.resize_with(capacity, || None);
        Slab {
            slots,
            // Pop order: low indices first (purely cosmetic).
            free: (0..capacity).rev().collect(),
            len: 0,
        }
    }
    pub(crate) fn capacity(&self) -> usize {
        self.slots.len()
    }
    pub(crate) fn len(&self) -> usize {
        self.len
    }
    pub(crate) fn is_full(&self) -> bool {
        self.free.is_empty()
    }
    /// Stores `value`; `None` when full.
    pub(crate) fn insert(&mut self, value: T) -> Option<usize> {
        let idx = self.free.pop()?;
        debug_assert!(self.slots[idx].is_none());
        self.slots[idx] = Some(value);
        self.len += 1;
        Some(idx)
    }
    /// Removes and returns the value at `idx` (`None` for a key that is not in use).
    pub(crate) fn remove(&mut self, idx: usize) -> Option<T> {
        let v = self.slots.get_mut(idx)?.take()?;
        self.free.push(idx);
        self.len -= 1;
        Some(v)
    }
    pub(crate) fn get_mut(&mut self, idx: usize) -> Option<&mut T> {
        self.slots.get_mut(idx)?.as_mut()
    }
    /// Keys in use.
    pub(crate) fn keys(&self) -> impl Iterator<Item = usize> + '_ {
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.as_ref().map(|_| i))
    }
}

/// Turns an optional timeout into an optional deadline.
pub(crate) fn deadline(timeout: Option<Duration>) -> Option<Instant> {
    timeout.map(|t| Instant::now().checked_add(t).unwrap_or_else(far_future))
}

fn far_future() -> Instant {
    Instant::now() + Duration::from_secs(86400 * 365)
}

/// Time left until `deadline` (None: unlimited).
pub(crate) fn remaining(deadline: Option<Instant>) -> Option<Duration> {
    deadline.map(|d| d.saturating_duration_since(Instant::now()))
}

/// How many more completions `reap` still waits for: `min - got`, and with no timeout at most
/// the operations that can still complete (waiting for more would never end).
pub(crate) fn still_wanted(
    min: usize,
    got: usize,
    outstanding: usize,
    timeout: Option<Duration>,
) -> usize {
    let want = min.saturating_sub(got);
    if timeout.is_none() {
        want.min(outstanding)
    } else {
        want
    }
}

/// Maps a kernel result (`>= 0` count, `< 0` negated errno) to an io::Result.
pub(crate) fn kernel_result(res: i64) -> io::Result<usize> {
    if res < 0 {
        Err(io::Error::from_raw_os_error(
            i32::try_from(-res).unwrap_or(libc::EIO),
        ))
    } else {
        Ok(usize::try_from(res).unwrap_or(usize::MAX))
    }
}

/// fdatasync(2), retried on EINTR.
pub(crate) fn fdatasync(fd: RawFd) -> io::Result<usize> {
    loop {
        // SAFETY: fdatasync only takes a descriptor.
        if unsafe { libc::fdatasync(fd) } == 0 {
            return Ok(0);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// fallocate(2), retried on EINTR.
pub(crate) fn fallocate(fd: RawFd, mode: i32, off: u64, len: u64) -> io::Result<usize> {
    crate::sys::fallocate(fd, mode, off, len).map(|()| 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slab_reuses_keys_and_never_grows() {
        let mut s: Slab<u32> = Slab::with_capacity(3);
        let a = s.insert(1).unwrap();
        let b = s.insert(2).unwrap();
        let c = s.insert(3).unwrap();
        assert!(s.is_full());
        assert!(s.insert(4).is_none());
        assert_eq!(s.len(), 3);
        assert_eq!(s.remove(b), Some(2));
        assert_eq!(s.remove(b), None);
        let d = s.insert(5).unwrap();
        assert_eq!(d, b);
        assert_eq!(s.keys().collect::<Vec<_>>(), vec![a, b, c]);
        assert_eq!(s.capacity(), 3);
        *s.get_mut(a).unwrap() = 9;
        assert_eq!(s.remove(a), Some(9));
    }

    #[test]
    fn kernel_results_map_to_errors() {
        assert_eq!(kernel_result(42).unwrap(), 42);
        assert_eq!(
            kernel_result(-(libc::EBADF as i64))
                .unwrap_err()
                .raw_os_error(),
            Some(libc::EBADF)
        );
        assert_eq!(still_wanted(5, 2, 1, None), 1);
        assert_eq!(still_wanted(5, 2, 1, Some(Duration::ZERO)), 3);
        assert_eq!(still_wanted(1, 2, 9, None), 0);
    }
}
