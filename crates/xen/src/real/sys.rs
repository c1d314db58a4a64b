//! Every `unsafe` of the real-Xen platform: the ioctls of the Xen devices (each wrapped in a
//! fully typed function, so no caller can pair a request with the wrong argument), `mmap` of
//! grant pages with volatile accessors, and `poll`.
//!
//! Foreign memory is only ever touched through [`Mapping`]'s single volatile accesses: no
//! reference (`&[u8]`, `&T`) into a mapping is formed, since the other domain may change the
//! bytes at any moment.

#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::raw::{c_int, c_ulong, c_void};
use std::ptr::NonNull;
use std::time::Duration;

use xdisk_blkif::wire::PAGE_SIZE;

use super::abi::{self, GntdevGrantCopySegment};
use crate::platform::{CopyDir, GrantCopyOp, GrantStatus};

fn cvt(ret: c_int) -> io::Result<c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// `ioctl(fd, req, arg)` where `arg` points to a buffer of the layout `req` expects.
///
/// # Safety
/// `arg` must be valid for reads and writes of the size and layout that `req` declares (and,
/// for variable-length arguments, of the length its count field implies), and any pointers
/// inside it must be valid for what the driver does with them.
unsafe fn ioctl_raw(fd: BorrowedFd<'_>, req: c_ulong, arg: *mut c_void) -> io::Result<c_int> {
    loop {
        // SAFETY: forwarded from the caller's contract; `fd` is an open descriptor.
        match cvt(unsafe { libc::ioctl(fd.as_raw_fd(), req as _, arg) }) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            r => return r,
        }
    }
}

// --- gntdev -------------------------------------------------------------------------------

/// IOCTL_GNTDEV_MAP_GRANT_REF: reserves `refs` of `domid` in the gntdev table; returns the
/// mmap offset (`index`).
pub(crate) fn gntdev_map_grant_ref(
    fd: BorrowedFd<'_>,
    domid: u16,
    refs: &[u32],
) -> io::Result<u64> {
    let count =
        u32::try_from(refs.len()).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // struct ioctl_gntdev_map_grant_ref: {u32 count; u32 pad; u64 index; {u32 domid, ref}[count]},
    // built in u64 words (8-byte aligned like the C struct).
    let mut buf: Vec<u64> = Vec::with_capacity(2 + refs.len().max(1));
    buf.push(words(count, 0));
    buf.push(0);
    for &r in refs {
        buf.push(words(u32::from(domid), r));
    }
    if refs.is_empty() {
        buf.push(0);
    }
    // SAFETY: `buf` holds the 16-byte head and `count` grant refs (at least the declared
    // `refs[1]`), and lives across the call; the driver writes only `index`.
    unsafe { ioctl_raw(fd, abi::IOCTL_GNTDEV_MAP_GRANT_REF, buf.as_mut_ptr().cast()) }?;
    Ok(buf[1])
}

/// Two `u32`s in memory order as one `u64` word.
fn words(first: u32, second: u32) -> u64 {
    let mut b = [0u8; 8];
    b[..4].copy_from_slice(&first.to_ne_bytes());
    b[4..].copy_from_slice(&second.to_ne_bytes());
    u64::from_ne_bytes(b)
}

/// IOCTL_GNTDEV_UNMAP_GRANT_REF.
pub(crate) fn gntdev_unmap_grant_ref(fd: BorrowedFd<'_>, index: u64, count: u32) -> io::Result<()> {
    let mut arg = abi::GntdevUnmapGrantRef {
        index,
        count,
        pad: 0,
    };
    // SAFETY: `arg` is the struct this request declares.
    unsafe { ioctl_raw(fd, abi::IOCTL_GNTDEV_UNMAP_GRANT_REF, (&raw mut arg).cast()) }.map(drop)
}

/// IOCTL_GNTDEV_SET_UNMAP_NOTIFY / IOCTL_GNTALLOC_SET_UNMAP_NOTIFY (same argument): on unmap,
/// zero the byte at `index` if `clear_byte`, and send an event on `port` if any.
pub(crate) fn set_unmap_notify(
    fd: BorrowedFd<'_>,
    gntalloc: bool,
    index: u64,
    clear_byte: bool,
    port: Option<u32>,
) -> io::Result<()> {
    let mut action = 0;
    if clear_byte {
        action |= abi::UNMAP_NOTIFY_CLEAR_BYTE;
    }
    if port.is_some() {
        action |= abi::UNMAP_NOTIFY_SEND_EVENT;
    }
    let mut arg = abi::UnmapNotify {
        index,
        action,
        event_channel_port: port.unwrap_or(0),
    };
    let req = if gntalloc {
        abi::IOCTL_GNTALLOC_SET_UNMAP_NOTIFY
    } else {
        abi::IOCTL_GNTDEV_SET_UNMAP_NOTIFY
    };
    // SAFETY: both requests take `struct ioctl_gnt{dev,alloc}_unmap_notify`, which `arg` is.
    unsafe { ioctl_raw(fd, req, (&raw mut arg).cast()) }.map(drop)
}

/// IOCTL_GNTDEV_GRANT_COPY of `ops` (each checked first: an op that would cross the foreign
/// page gets `BadCopyArg` without reaching the hypervisor). Sets each op's status.
pub(crate) fn gntdev_grant_copy(fd: BorrowedFd<'_>, ops: &mut [GrantCopyOp<'_>]) -> io::Result<()> {
    let mut segs: Vec<GntdevGrantCopySegment> = Vec::with_capacity(ops.len());
    let mut which: Vec<usize> = Vec::with_capacity(ops.len());
    for (i, op) in ops.iter_mut().enumerate() {
        let len = match &op.dir {
            CopyDir::FromForeign(b) => b.len(),
            CopyDir::ToForeign(b) => b.len(),
        };
        if usize::from(op.offset) + len > PAGE_SIZE {
            op.status = GrantStatus::BadCopyArg;
            continue;
        }
        if len == 0 {
            op.status = GrantStatus::Okay;
            continue;
        }
        let foreign = abi::GntdevCopyPtr {
            foreign: abi::GntdevCopyForeign {
                gref: op.gref,
                offset: op.offset,
                domid: op.domid,
            },
        };
        let (source, dest, flags) = match &mut op.dir {
            CopyDir::FromForeign(b) => (
                foreign,
                abi::GntdevCopyPtr {
                    virt: b.as_mut_ptr().cast(),
                },
                abi::GNTCOPY_SOURCE_GREF,
            ),
            CopyDir::ToForeign(b) => (
                abi::GntdevCopyPtr {
                    // The driver only reads from a local source.
                    virt: b.as_ptr().cast_mut().cast(),
                },
                foreign,
                abi::GNTCOPY_DEST_GREF,
            ),
        };
        segs.push(GntdevGrantCopySegment {
            source,
            dest,
            len: len as u16, // <= PAGE_SIZE, checked above
            flags,
            status: 0,
        });
        which.push(i);
    }
    if segs.is_empty() {
        return Ok(());
    }
    let mut arg = abi::GntdevGrantCopy {
        count: segs.len() as _,
        segments: segs.as_mut_ptr(),
    };
    // SAFETY: `arg` is `struct ioctl_gntdev_grant_copy` pointing at `count` segments; each
    // segment's local pointer is a live slice of exactly `len` bytes borrowed from `ops`
    // (mutable for FromForeign, which the driver writes; read-only ToForeign sources are only
    // read). All of them outlive the call.
    unsafe { ioctl_raw(fd, abi::IOCTL_GNTDEV_GRANT_COPY, (&raw mut arg).cast()) }?;
    for (seg, &i) in segs.iter().zip(&which) {
        ops[i].status = abi::grant_status(seg.status);
    }
    Ok(())
}

// --- gntalloc -----------------------------------------------------------------------------

/// IOCTL_GNTALLOC_ALLOC_GREF: `count` fresh pages granted to `domid`; returns the mmap offset
/// and the grant references.
pub(crate) fn gntalloc_alloc_gref(
    fd: BorrowedFd<'_>,
    domid: u16,
    writable: bool,
    count: u32,
) -> io::Result<(u64, Vec<u32>)> {
    let flags = if writable {
        abi::GNTALLOC_FLAG_WRITABLE
    } else {
        0
    };
    let n = count as usize;
    // {u16 domid; u16 flags; u32 count; u64 index; u32 gref_ids[count]} in u64 words.
    let mut buf: Vec<u64> = vec![0; 2 + n.max(1).div_ceil(2)];
    let mut head = [0u8; 8];
    head[..2].copy_from_slice(&domid.to_ne_bytes());
    head[2..4].copy_from_slice(&flags.to_ne_bytes());
    head[4..].copy_from_slice(&count.to_ne_bytes());
    buf[0] = u64::from_ne_bytes(head);
    // SAFETY: `buf` holds the 16-byte head and room for `count` (at least one) u32 grant ids,
    // which the driver writes, and lives across the call.
    unsafe { ioctl_raw(fd, abi::IOCTL_GNTALLOC_ALLOC_GREF, buf.as_mut_ptr().cast()) }?;
    let mut grefs = Vec::with_capacity(n);
    for w in &buf[2..] {
        let b = w.to_ne_bytes();
        grefs.push(u32::from_ne_bytes([b[0], b[1], b[2], b[3]]));
        grefs.push(u32::from_ne_bytes([b[4], b[5], b[6], b[7]]));
    }
    grefs.truncate(n);
    Ok((buf[1], grefs))
}

/// IOCTL_GNTALLOC_DEALLOC_GREF.
pub(crate) fn gntalloc_dealloc_gref(fd: BorrowedFd<'_>, index: u64, count: u32) -> io::Result<()> {
    let mut arg = abi::GntallocDeallocGref { index, count };
    // SAFETY: `arg` is the struct this request declares.
    unsafe { ioctl_raw(fd, abi::IOCTL_GNTALLOC_DEALLOC_GREF, (&raw mut arg).cast()) }.map(drop)
}

// --- evtchn -------------------------------------------------------------------------------

/// IOCTL_EVTCHN_BIND_INTERDOMAIN; returns the local port.
pub(crate) fn evtchn_bind_interdomain(
    fd: BorrowedFd<'_>,
    remote_domain: u16,
    remote_port: u32,
) -> io::Result<u32> {
    let mut arg = abi::EvtchnBindInterdomain {
        remote_domain: remote_domain.into(),
        remote_port,
    };
    // SAFETY: `arg` is the struct this request declares.
    let port = unsafe {
        ioctl_raw(
            fd,
            abi::IOCTL_EVTCHN_BIND_INTERDOMAIN,
            (&raw mut arg).cast(),
        )
    }?;
    Ok(port as u32)
}

/// IOCTL_EVTCHN_BIND_UNBOUND_PORT; returns the local port.
pub(crate) fn evtchn_bind_unbound_port(fd: BorrowedFd<'_>, remote_domain: u16) -> io::Result<u32> {
    let mut arg = abi::EvtchnBindUnboundPort {
        remote_domain: remote_domain.into(),
    };
    // SAFETY: `arg` is the struct this request declares.
    let port = unsafe {
        ioctl_raw(
            fd,
            abi::IOCTL_EVTCHN_BIND_UNBOUND_PORT,
            (&raw mut arg).cast(),
        )
    }?;
    Ok(port as u32)
}

/// IOCTL_EVTCHN_NOTIFY (`unbind == false`) or IOCTL_EVTCHN_UNBIND.
pub(crate) fn evtchn_port_op(fd: BorrowedFd<'_>, port: u32, unbind: bool) -> io::Result<()> {
    let mut arg = abi::EvtchnPortArg { port };
    let req = if unbind {
        abi::IOCTL_EVTCHN_UNBIND
    } else {
        abi::IOCTL_EVTCHN_NOTIFY
    };
    // SAFETY: both requests take `struct { unsigned int port; }`, which `arg` is.
    unsafe { ioctl_raw(fd, req, (&raw mut arg).cast()) }.map(drop)
}

/// Waits until `fd` is readable; `None` waits forever. Returns whether it is.
pub(crate) fn poll_readable(fd: BorrowedFd<'_>, timeout: Option<Duration>) -> io::Result<bool> {
    let ms: c_int = match timeout {
        None => -1,
        Some(t) => c_int::try_from(t.as_millis()).unwrap_or(c_int::MAX),
    };
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    loop {
        // SAFETY: one valid `pollfd`, count 1.
        match cvt(unsafe { libc::poll(&mut pfd, 1, ms) }) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
            Ok(n) => return Ok(n > 0 && pfd.revents & libc::POLLIN != 0),
        }
    }
}

// --- mappings -----------------------------------------------------------------------------

/// A shared mapping of a Xen device (gntdev, gntalloc) at an ioctl-given offset; unmapped on
/// drop. Accessed only through single volatile loads and stores.
#[derive(Debug)]
pub(crate) struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
    writable: bool,
}

// SAFETY: the mapping is plain memory owned by this value; every access is a volatile
// load/store through a raw pointer (no references), so sharing it between threads is no
// different from sharing it with the other domain, which the accessors already assume.
unsafe impl Send for Mapping {}
// SAFETY: as above.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// `mmap(NULL, len, PROT_READ[|PROT_WRITE], MAP_SHARED, fd, offset)`.
    pub(crate) fn map_shared(
        fd: BorrowedFd<'_>,
        len: usize,
        writable: bool,
        offset: u64,
    ) -> io::Result<Mapping> {
        if len == 0 {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        }
        let offset = libc::off_t::try_from(offset)
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let prot = if writable {
            libc::PROT_READ | libc::PROT_WRITE
        } else {
            libc::PROT_READ
        };
        // SAFETY: a fresh mapping chosen by the kernel (addr NULL); it aliases no Rust object.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                prot,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                offset,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr =
            NonNull::new(p.cast::<u8>()).ok_or_else(|| io::Error::other("mmap returned NULL"))?;
        Ok(Mapping { ptr, len, writable })
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn writable(&self) -> bool {
        self.writable
    }

    pub(crate) fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// Puts private zero-filled pages (same protection) in place of pages `first..end` of
    /// the mapping, at the same addresses: `mmap(MAP_FIXED | MAP_PRIVATE | MAP_ANONYMOUS)`,
    /// which unmaps what was there (for gntdev, its MMU notifier then unmaps those grants).
    /// On failure the pages are as they were.
    pub(crate) fn replace_with_private(&self, first: usize, end: usize) -> io::Result<()> {
        let (Some(at), Some(len)) = (
            first.checked_mul(PAGE_SIZE),
            end.checked_sub(first)
                .and_then(|n| n.checked_mul(PAGE_SIZE)),
        ) else {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        };
        self.check(at, len);
        if len == 0 {
            return Ok(());
        }
        let prot = if self.writable {
            libc::PROT_READ | libc::PROT_WRITE
        } else {
            libc::PROT_READ
        };
        // SAFETY: `at..at + len` is inside this mapping (checked) and page-aligned, so
        // MAP_FIXED replaces only memory this value owns; no reference into it exists (every
        // access is a volatile copy through a raw pointer). I/O still under way with these
        // addresses finds valid private memory there instead of the grants, which is the point.
        let p = unsafe {
            libc::mmap(
                self.ptr.as_ptr().add(at).cast(),
                len,
                prot,
                libc::MAP_FIXED | libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn check(&self, offset: usize, len: usize) {
        // Callers check first (returning MemError); these are the last line of defence.
        assert!(
            offset.checked_add(len).is_some_and(|end| end <= self.len),
            "mapping access out of bounds"
        );
    }

    /// One aligned 32-bit volatile load at `offset` (a multiple of 4, in bounds).
    pub(crate) fn read_u32(&self, offset: usize) -> u32 {
        self.check(offset, 4);
        assert!(offset.is_multiple_of(4));
        // SAFETY: in bounds (checked), 4-aligned (the mapping is page-aligned and the offset a
        // multiple of 4); a volatile load through a raw pointer forms no reference.
        let v = unsafe { self.ptr.as_ptr().add(offset).cast::<u32>().read_volatile() };
        u32::from_le(v)
    }

    fn check_writable(&self) {
        assert!(self.writable, "store into a read-only mapping");
    }

    /// One aligned 32-bit volatile store at `offset` (a multiple of 4, in bounds). Only on a
    /// writable mapping.
    pub(crate) fn write_u32(&self, offset: usize, value: u32) {
        self.check(offset, 4);
        self.check_writable();
        assert!(offset.is_multiple_of(4));
        // SAFETY: in bounds and aligned as above; the mapping was made with PROT_WRITE
        // (checked).
        unsafe {
            self.ptr
                .as_ptr()
                .add(offset)
                .cast::<u32>()
                .write_volatile(value.to_le())
        };
    }

    /// Copies out with volatile loads (8 bytes at a time where aligned, else bytes).
    pub(crate) fn copy_out(&self, offset: usize, dst: &mut [u8]) {
        self.check(offset, dst.len());
        let base = self.ptr.as_ptr();
        let mut i = 0;
        while i < dst.len() {
            let at = offset + i;
            if at.is_multiple_of(8) && dst.len() - i >= 8 {
                // SAFETY: `at..at + 8` is in bounds (checked for the whole range) and
                // 8-aligned; volatile load, no reference formed.
                let w = unsafe { base.add(at).cast::<u64>().read_volatile() };
                dst[i..i + 8].copy_from_slice(&w.to_ne_bytes());
                i += 8;
            } else {
                // SAFETY: `at` is in bounds; volatile byte load.
                dst[i] = unsafe { base.add(at).read_volatile() };
                i += 1;
            }
        }
    }

    /// Copies in with volatile stores (8 bytes at a time where aligned, else bytes). Only on
    /// a writable mapping.
    pub(crate) fn copy_in(&self, offset: usize, src: &[u8]) {
        self.check(offset, src.len());
        self.check_writable();
        let base = self.ptr.as_ptr();
        let mut i = 0;
        while i < src.len() {
            let at = offset + i;
            if at.is_multiple_of(8) && src.len() - i >= 8 {
                let mut w = [0u8; 8];
                w.copy_from_slice(&src[i..i + 8]);
                // SAFETY: in bounds and 8-aligned; mapped with PROT_WRITE (checked).
                unsafe {
                    base.add(at)
                        .cast::<u64>()
                        .write_volatile(u64::from_ne_bytes(w))
                };
                i += 8;
            } else {
                // SAFETY: in bounds; mapped with PROT_WRITE (checked).
                unsafe { base.add(at).write_volatile(src[i]) };
                i += 1;
            }
        }
    }
}

/// `pread(fd, mapping + offset, len, file_offset)`: the kernel fills the mapping (no Rust
/// reference to it is formed). Returns the bytes read.
pub(crate) fn pread_mapping(
    fd: BorrowedFd<'_>,
    m: &Mapping,
    offset: usize,
    len: usize,
    file_offset: u64,
) -> io::Result<usize> {
    m.check(offset, len);
    m.check_writable();
    let off = file_off(file_offset)?;
    retry_eintr(|| {
        // SAFETY: `offset..offset + len` is inside the mapping (checked), which is writable
        // (checked) and stays mapped during the call; the kernel writes it like DMA would.
        unsafe { libc::pread(fd.as_raw_fd(), m.as_ptr().add(offset).cast(), len, off) }
    })
}

/// `pwrite(fd, mapping + offset, len, file_offset)`: the kernel reads the mapping. Returns
/// the bytes written.
pub(crate) fn pwrite_mapping(
    fd: BorrowedFd<'_>,
    m: &Mapping,
    offset: usize,
    len: usize,
    file_offset: u64,
) -> io::Result<usize> {
    m.check(offset, len);
    let off = file_off(file_offset)?;
    retry_eintr(|| {
        // SAFETY: `offset..offset + len` is inside the mapping (checked), which stays mapped
        // during the call; the kernel only reads it.
        unsafe { libc::pwrite(fd.as_raw_fd(), m.as_ptr().add(offset).cast(), len, off) }
    })
}

/// A file offset as `off_t` (`InvalidInput` past `off_t::MAX`).
fn file_off(file_offset: u64) -> io::Result<libc::off_t> {
    libc::off_t::try_from(file_offset).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
}

/// Calls a `pread`/`pwrite`-like `call` until it is not interrupted (`EINTR`); its byte count.
fn retry_eintr(mut call: impl FnMut() -> libc::ssize_t) -> io::Result<usize> {
    loop {
        let n = call();
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` are exactly what mmap returned, and no reference into the
        // mapping exists (all accesses were volatile through raw pointers).
        let r = unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
        if r != 0 {
            tracing::warn!(error = %io::Error::last_os_error(), "munmap of a grant mapping failed");
        }
    }
}
