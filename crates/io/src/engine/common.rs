//! Pieces shared by the engines: owned iovec arrays and small syscall
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
/// move when the owning slot moves, and it is kept until the operation completes. An engine
/// keeps the arrays of completed operations ([`IovecArray::spare`]) and copies the next
/// request's iovecs into one of them ([`IovecArray::copy_into`]): a warm engine allocates
/// nothing for multi-segment requests.
pub(crate) struct IovecArray(Vec<libc::iovec>);

// SAFETY: the iovecs only describe memory owned by the buffer that travels with them (the
// buffer is `Send`), or none at all (a spare array is empty); the array itself is plain data
// owned exclusively by this value.
unsafe impl Send for IovecArray {}

impl IovecArray {
    pub(crate) fn copy_of(iov: &[libc::iovec]) -> IovecArray {
        IovecArray(iov.to_vec())
    }
    /// A copy of `iov` in `room`'s allocation (a spare array, or a new one if `None`).
    pub(crate) fn copy_into(room: Option<IovecArray>, iov: &[libc::iovec]) -> IovecArray {
        match room {
            Some(IovecArray(mut v)) => {
                v.clear();
                v.extend_from_slice(iov);
                IovecArray(v)
            }
            None => IovecArray::copy_of(iov),
        }
    }
    /// The array emptied, its allocation kept for [`IovecArray::copy_into`] (the operation
    /// that used it has completed).
    pub(crate) fn spare(mut self) -> IovecArray {
        self.0.clear();
        self
    }
    pub(crate) fn as_ptr(&self) -> *const libc::iovec {
        self.0.as_ptr()
    }
    pub(crate) fn len(&self) -> usize {
        self.0.len()
    }
}

pub(crate) use crate::slab::Slab;

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
