//! Thin wrappers over Linux syscalls and ioctls that std does not offer.

use std::io;
use std::os::unix::io::RawFd;

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

pub fn block_device_size(fd: RawFd) -> io::Result<u64> {
    let mut size: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which is valid for the call.
    cvt(unsafe { libc::ioctl(fd, BLKGETSIZE64 as _, &mut size as *mut u64) })?;
    Ok(size)
}

pub fn logical_block_size(fd: RawFd) -> io::Result<u32> {
    let mut size: libc::c_int = 0;
    // SAFETY: BLKSSZGET writes one int through the pointer, which is valid for the call.
    cvt(unsafe { libc::ioctl(fd, BLKSSZGET as _, &mut size as *mut libc::c_int) })?;
    u32::try_from(size).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

pub fn blk_discard(fd: RawFd, off: u64, len: u64) -> io::Result<()> {
    let range: [u64; 2] = [off, len];
    // SAFETY: BLKDISCARD reads two u64 from the pointer, valid for the call.
    cvt(unsafe { libc::ioctl(fd, BLKDISCARD as _, range.as_ptr()) })
}

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
pub fn poll_readable(fds: &[RawFd], timeout_ms: i32) -> io::Result<Vec<bool>> {
    let mut p: Vec<libc::pollfd> = fds
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
            return Ok(vec![false; fds.len()]);
        }
        return Err(e);
    }
    Ok(p.iter()
        .map(|x| x.revents & (libc::POLLIN | libc::POLLERR | libc::POLLHUP) != 0)
        .collect())
}

/// A non-blocking eventfd: `signal` adds one, `drain` resets it.
#[derive(Debug)]
pub struct EventFd(std::os::fd::OwnedFd);

impl EventFd {
    pub fn new() -> io::Result<EventFd> {
        // SAFETY: eventfd takes scalar arguments and returns a new fd or -1.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a freshly created descriptor that nothing else owns.
        Ok(EventFd(unsafe { std::os::fd::FromRawFd::from_raw_fd(fd) }))
    }
    pub fn fd(&self) -> RawFd {
        std::os::fd::AsRawFd::as_raw_fd(&self.0)
    }
    pub fn signal(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a valid u64; errors (counter overflow) are harmless.
        unsafe { libc::write(self.fd(), (&one as *const u64).cast(), 8) };
    }
    pub fn drain(&self) {
        let mut v: u64 = 0;
        // SAFETY: reads 8 bytes into a valid u64; EAGAIN (nothing pending) is fine.
        unsafe { libc::read(self.fd(), (&mut v as *mut u64).cast(), 8) };
    }
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

/// Reads (and so resets) a non-blocking eventfd owned by someone else; EAGAIN is fine.
pub fn drain_eventfd(fd: RawFd) {
    let mut v: u64 = 0;
    // SAFETY: reads at most 8 bytes into a valid u64; the fd is only read, never closed.
    unsafe { libc::read(fd, (&mut v as *mut u64).cast(), 8) };
}
