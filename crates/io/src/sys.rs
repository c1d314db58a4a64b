//! Thin wrappers over Linux syscalls and ioctls that std does not offer.

#![allow(unsafe_code)]

use smallvec::SmallVec;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

use crate::file::Alignment;

// linux/fs.h: _IO(0x12, 104), _IOR(0x12, 114, size_t), _IO(0x12, 119), _IO(0x12, 127)
const BLKSSZGET: libc::c_ulong = 0x1268;
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
const BLKDISCARD: libc::c_ulong = 0x1277;
const BLKZEROOUT: libc::c_ulong = 0x127f;

fn cvt(r: libc::c_int) -> io::Result<()> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// fallocate(2) of `len` bytes at byte offset `off` with `mode` (`FALLOC_FL_*` flags),
/// retried on EINTR. EINVAL if `off` or `len` does not fit an `off_t`.
pub fn fallocate(fd: RawFd, mode: libc::c_int, off: u64, len: u64) -> io::Result<()> {
    let off = libc::off_t::try_from(off).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    let len = libc::off_t::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    loop {
        // SAFETY: fallocate only reads its scalar arguments.
        let r = unsafe { libc::fallocate(fd, mode, off, len) };
        match cvt(r) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

/// Size of a block device in bytes (ioctl BLKGETSIZE64).
pub fn block_device_size(fd: RawFd) -> io::Result<u64> {
    let mut size: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which is valid for the call.
    cvt(unsafe { libc::ioctl(fd, BLKGETSIZE64 as _, &mut size as *mut u64) })?;
    Ok(size)
}

/// Logical block size of a block device in bytes (ioctl BLKSSZGET): its O_DIRECT alignment.
pub fn logical_block_size(fd: RawFd) -> io::Result<u32> {
    let mut size: libc::c_int = 0;
    // SAFETY: BLKSSZGET writes one int through the pointer, which is valid for the call.
    cvt(unsafe { libc::ioctl(fd, BLKSSZGET as _, &mut size as *mut libc::c_int) })?;
    u32::try_from(size).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

/// Discards `len` bytes of a block device at byte offset `off` (ioctl BLKDISCARD); what the
/// range reads afterwards depends on the device.
pub fn blk_discard(fd: RawFd, off: u64, len: u64) -> io::Result<()> {
    let range: [u64; 2] = [off, len];
    // SAFETY: BLKDISCARD reads two u64 from the pointer, valid for the call.
    cvt(unsafe { libc::ioctl(fd, BLKDISCARD as _, range.as_ptr()) })
}

/// Zeroes `len` bytes of a block device at byte offset `off` (ioctl BLKZEROOUT), offloaded
/// to the device where it can.
pub fn blk_zeroout(fd: RawFd, off: u64, len: u64) -> io::Result<()> {
    let range: [u64; 2] = [off, len];
    // SAFETY: BLKZEROOUT reads two u64 from the pointer, valid for the call.
    cvt(unsafe { libc::ioctl(fd, BLKZEROOUT as _, range.as_ptr()) })
}

/// statx(STATX_DIOALIGN) (Linux 6.1+): the O_DIRECT alignment the filesystem reports.
pub fn statx_dio_align(fd: RawFd) -> Option<Alignment> {
    const STATX_DIOALIGN: u32 = 0x2000;
    // SAFETY: an all-zero statx is a valid value of this plain-data struct.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: the path is a valid NUL-terminated empty string, AT_EMPTY_PATH makes statx use
    // fd, and stx is valid for writes for the duration of the call.
    let r = unsafe {
        libc::statx(
            fd,
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            STATX_DIOALIGN,
            &mut stx,
        )
    };
    if r != 0 || stx.stx_mask & STATX_DIOALIGN == 0 {
        return None;
    }
    if stx.stx_dio_offset_align == 0 || stx.stx_dio_mem_align == 0 {
        return None;
    }
    Some(Alignment {
        offset: stx.stx_dio_offset_align,
        memory: stx.stx_dio_mem_align,
    })
}

/// lseek with SEEK_DATA/SEEK_HOLE; None on error (ENXIO: nothing after offset).
pub fn lseek(fd: RawFd, offset: u64, whence: libc::c_int) -> Option<u64> {
    let off = libc::off_t::try_from(offset).ok()?;
    // SAFETY: lseek only reads its scalar arguments; it moves the shared file offset, which
    // nothing in xdisk relies on (all I/O is positional).
    let r = unsafe { libc::lseek(fd, off, whence) };
    u64::try_from(r).ok()
}

/// poll(2) on a few fds for readability; returns which are readable. EINTR counts as none.
/// Up to 8 fds it allocates nothing (the reactors and the frontend poll on every sleep).
pub fn poll_readable(fds: &[RawFd], timeout_ms: i32) -> io::Result<SmallVec<[bool; 8]>> {
    let mut p: SmallVec<[libc::pollfd; 8]> = fds
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    // SAFETY: p is a valid array of p.len() pollfd structs for the duration of the call.
    let r = unsafe { libc::poll(p.as_mut_ptr(), p.len() as libc::nfds_t, timeout_ms) };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::Interrupted {
            return Ok(smallvec::smallvec![false; fds.len()]);
        }
        return Err(e);
    }
    Ok(p.iter()
        .map(|x| x.revents & (libc::POLLIN | libc::POLLERR | libc::POLLHUP) != 0)
        .collect())
}

/// poll(2) on a few fds, each for readability and/or writability; returns for each whether
/// it is (readable, writable). Errors and hang-ups count as both. EINTR counts as none.
pub fn poll_rw(fds: &[(RawFd, bool, bool)], timeout_ms: i32) -> io::Result<Vec<(bool, bool)>> {
    let mut p: Vec<libc::pollfd> = fds
        .iter()
        .map(|&(fd, r, w)| libc::pollfd {
            fd,
            events: if r { libc::POLLIN } else { 0 } | if w { libc::POLLOUT } else { 0 },
            revents: 0,
        })
        .collect();
    // SAFETY: p is a valid array of p.len() pollfd structs for the duration of the call.
    let r = unsafe { libc::poll(p.as_mut_ptr(), p.len() as libc::nfds_t, timeout_ms) };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::Interrupted {
            return Ok(vec![(false, false); fds.len()]);
        }
        return Err(e);
    }
    let bad = libc::POLLERR | libc::POLLHUP | libc::POLLNVAL;
    Ok(p.iter()
        .map(|x| {
            (
                x.revents & (libc::POLLIN | bad) != 0,
                x.revents & (libc::POLLOUT | bad) != 0,
            )
        })
        .collect())
}

/// A non-blocking, close-on-exec eventfd(2): `signal` adds one to its counter (making it
/// readable), `drain` resets it. The engines' completion notifier, the reactors' wake-up and
/// the doorbell of a simulated event channel.
#[derive(Debug)]
pub struct EventFd(OwnedFd);

impl EventFd {
    /// A new eventfd with its counter at 0 (not readable).
    pub fn new() -> io::Result<EventFd> {
        // SAFETY: eventfd takes scalar arguments and returns a new fd or -1.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a freshly created descriptor that nothing else owns.
        Ok(EventFd(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// The descriptor, to poll for readability; it stays owned by this `EventFd`.
    pub fn fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }

    /// Adds 1 to the counter (makes the fd readable); errors are ignored (see
    /// [`EventFd::try_signal`]).
    pub fn signal(&self) {
        let _ = self.try_signal();
    }

    /// Adds 1 to the counter (makes the fd readable). A saturated counter (`EAGAIN`) is
    /// already readable, so it counts as success.
    pub fn try_signal(&self) -> io::Result<()> {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a valid u64 on the stack; the fd is owned by self.
        let r = unsafe { libc::write(self.fd(), (&one as *const u64).cast(), 8) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::WouldBlock {
                return Err(e);
            }
        }
        Ok(())
    }

    /// Resets the counter; true if it was non-zero (an error counts as zero).
    pub fn drain(&self) -> bool {
        drain_eventfd(self.fd())
    }

    /// Resets the counter; true if it was non-zero. Nothing pending (`EAGAIN`) is `Ok(false)`.
    pub fn try_drain(&self) -> io::Result<bool> {
        read_eventfd(self.fd())
    }

    /// Waits until the fd is readable (true) or `timeout` passes (false; `None`: no limit).
    pub fn wait(&self, timeout: Option<Duration>) -> io::Result<bool> {
        wait_readable(self.fd(), timeout)
    }
}

impl AsRawFd for EventFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

impl AsFd for EventFd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}

/// Reads (and so resets) a non-blocking eventfd counter; true if it was non-zero, `Ok(false)`
/// when nothing is pending (`EAGAIN`).
fn read_eventfd(fd: RawFd) -> io::Result<bool> {
    let mut v: u64 = 0;
    // SAFETY: reads at most 8 bytes into a valid u64 on the stack; the fd is only read, never
    // closed.
    let r = unsafe { libc::read(fd, (&mut v as *mut u64).cast(), 8) };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::WouldBlock {
            return Ok(false);
        }
        return Err(e);
    }
    Ok(r == 8 && v > 0)
}

/// poll(2) for readability of one fd: true if readable, false on timeout (`None`: wait without
/// limit). The timeout is rounded up to whole milliseconds, so that a short remaining time does
/// not become a busy loop of 0 ms polls. `EINTR` counts as a timeout (callers loop on their own
/// deadline); a closed fd (`POLLNVAL`) is `EBADF`.
pub fn wait_readable(fd: RawFd, timeout: Option<Duration>) -> io::Result<bool> {
    let ms = match timeout {
        None => -1,
        Some(t) => i32::try_from(t.as_nanos().div_ceil(1_000_000)).unwrap_or(i32::MAX),
    };
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd on the stack for the duration of the call, nfds = 1; poll only
    // reads `fd` as a number.
    let r = unsafe { libc::poll(&mut pfd, 1, ms) };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::Interrupted {
            return Ok(false);
        }
        return Err(e);
    }
    if r > 0 && pfd.revents & libc::POLLNVAL != 0 {
        return Err(io::Error::from_raw_os_error(libc::EBADF));
    }
    Ok(r > 0 && pfd.revents & (libc::POLLIN | libc::POLLERR | libc::POLLHUP) != 0)
}

/// Makes an fd non-blocking (so that draining an engine's eventfd never blocks).
pub fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: fcntl with F_GETFL/F_SETFL takes scalar arguments.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above.
    cvt(unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) })
}

/// Clears O_NONBLOCK on an fd (an image file opened non-blocking so that the open itself
/// could not block, once its type is known).
pub fn clear_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: fcntl with F_GETFL/F_SETFL takes scalar arguments.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above.
    cvt(unsafe { libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK) })
}

/// Reads (and so resets) a non-blocking eventfd owned by someone else; true if it was
/// non-zero. Errors (`EAGAIN`: nothing pending) count as zero.
pub fn drain_eventfd(fd: RawFd) -> bool {
    read_eventfd(fd).unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_fd_signal_drain_wait() {
        let e = EventFd::new().unwrap();
        assert!(!e.try_drain().unwrap());
        assert!(!e.wait(Some(Duration::ZERO)).unwrap());
        assert!(!wait_readable(e.as_raw_fd(), Some(Duration::ZERO)).unwrap());
        e.signal();
        e.try_signal().unwrap();
        assert!(e.wait(Some(Duration::ZERO)).unwrap());
        assert!(wait_readable(e.as_fd().as_raw_fd(), Some(Duration::from_secs(1))).unwrap());
        assert!(e.drain());
        assert!(!e.drain());
        assert!(!e.wait(Some(Duration::from_millis(1))).unwrap());
        e.signal();
        assert!(e.try_drain().unwrap());
        assert!(!e.try_drain().unwrap());
        e.signal();
        assert!(drain_eventfd(e.fd()));
        assert!(!drain_eventfd(e.fd()));
    }
}
