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

pub(crate) fn fallocate(fd: RawFd, mode: libc::c_int, off: u64, len: u64) -> io::Result<()> {
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

pub(crate) fn block_device_size(fd: RawFd) -> io::Result<u64> {
    let mut size: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which is valid for the call.
    cvt(unsafe { libc::ioctl(fd, BLKGETSIZE64 as _, &mut size as *mut u64) })?;
    Ok(size)
}

pub(crate) fn logical_block_size(fd: RawFd) -> io::Result<u32> {
    let mut size: libc::c_int = 0;
    // SAFETY: BLKSSZGET writes one int through the pointer, which is valid for the call.
    cvt(unsafe { libc::ioctl(fd, BLKSSZGET as _, &mut size as *mut libc::c_int) })?;
    u32::try_from(size).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

pub(crate) fn blk_discard(fd: RawFd, off: u64, len: u64) -> io::Result<()> {
    let range: [u64; 2] = [off, len];
    // SAFETY: BLKDISCARD reads two u64 from the pointer, valid for the call.
    cvt(unsafe { libc::ioctl(fd, BLKDISCARD as _, range.as_ptr()) })
}

pub(crate) fn blk_zeroout(fd: RawFd, off: u64, len: u64) -> io::Result<()> {
    let range: [u64; 2] = [off, len];
    // SAFETY: BLKZEROOUT reads two u64 from the pointer, valid for the call.
    cvt(unsafe { libc::ioctl(fd, BLKZEROOUT as _, range.as_ptr()) })
}

/// statx(STATX_DIOALIGN) (Linux 6.1+): the O_DIRECT alignment the filesystem reports.
pub(crate) fn statx_dio_align(fd: RawFd) -> Option<Alignment> {
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
pub(crate) fn lseek(fd: RawFd, offset: u64, whence: libc::c_int) -> Option<u64> {
    let off = libc::off_t::try_from(offset).ok()?;
    // SAFETY: lseek only reads its scalar arguments; it moves the shared file offset, which
    // nothing in xdisk relies on (all I/O is positional).
    let r = unsafe { libc::lseek(fd, off, whence) };
    u64::try_from(r).ok()
}
