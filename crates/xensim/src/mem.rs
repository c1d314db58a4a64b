//! The guest memory of the simulation and its other small OS objects: every `unsafe` block of
//! this crate lives here, each with a `// SAFETY:` comment.
//!
//! - [`Memfd`]: a sealed memfd (its size can never change, so a mapping of it can never
//!   `SIGBUS`), read and written with `pread`/`pwrite` or mapped.
//! - [`MmapRegion`]: an `mmap` of pages of a [`Memfd`], possibly scattered pages made to appear
//!   contiguous (a `PROT_NONE` reservation with each page `MAP_FIXED` into it, as gntdev maps
//!   several grants into one VMA). It implements [`SharedMem`] with single atomic accesses
//!   (never a Rust reference to the bytes: the other domain may change them at any moment) and
//!   [`MappedRegion`].
//! - [`EventFd`] and [`poll_readable`]: the event channel doorbells, re-exported from
//!   [`xdisk_io::sys`] (`poll_readable` is [`xdisk_io::sys::wait_readable`]).
//!
//! The zero-copy I/O buffer over mapped grants is production code, in xdisk-xen:
//! [`xdisk_xen::iobuf::GrantIoBuf`].

#![allow(unsafe_code)]

use std::ffi::CStr;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering};

use xdisk_blkif::mem::check_bounds;

pub use xdisk_io::sys::{wait_readable as poll_readable, EventFd};

use xdisk_xen::platform::{MappedRegion, MemError, SharedMem};

/// Size of a Xen page (`XEN_PAGE_SIZE`); grants are whole pages. The one definition is
/// [`xdisk_blkif::wire::PAGE_SIZE`].
pub use xdisk_blkif::wire::PAGE_SIZE;

// ---------------------------------------------------------------------------------------------
// Memfd

/// An anonymous shared memory file (memfd_create(2)) of a fixed size: sealed with
/// `F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL` right after sizing, so that the pages of every
/// mapping of it exist for the mapping's whole life.
#[derive(Debug)]
pub struct Memfd {
    file: File,
    size: u64,
}

impl Memfd {
    /// A zero-filled memfd of `size` bytes named `name` (the name only shows in
    /// `/proc/<pid>/maps`).
    pub fn new(name: &CStr, size: u64) -> io::Result<Memfd> {
        // SAFETY: `name` is a valid NUL-terminated string; the flags are valid.
        let fd = unsafe {
            libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING)
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: memfd_create returned a new fd that nothing else owns.
        let file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        file.set_len(size)?;
        let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
        // SAFETY: fcntl on an fd we own, with an integer argument.
        if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Memfd { file, size })
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Number of whole pages.
    pub fn pages(&self) -> u64 {
        self.size / PAGE_SIZE as u64
    }

    /// Reads `buf.len()` bytes at `offset` (pread(2)); fails past the end.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.check(offset, buf.len())?;
        self.file.read_exact_at(buf, offset)
    }

    /// Writes `buf` at `offset` (pwrite(2)); fails past the end.
    pub fn write_at(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
        self.check(offset, buf.len())?;
        self.file.write_all_at(buf, offset)
    }

    fn check(&self, offset: u64, len: usize) -> io::Result<()> {
        match offset.checked_add(len as u64) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{len} bytes at {offset} are past the end of the {}-byte memfd",
                    self.size
                ),
            )),
        }
    }

    /// Maps `pages` consecutive pages starting at page `first` (MAP_SHARED).
    pub fn map(&self, first: u64, pages: usize, writable: bool) -> io::Result<MmapRegion> {
        let list: Vec<u64> = (0..pages as u64).map(|i| first.saturating_add(i)).collect();
        self.map_pages(&list, writable)
    }

    /// Maps the pages `pages` (page indexes into the memfd, in any order, repeats allowed) so
    /// that they appear contiguous, in order: a `PROT_NONE` reservation of the whole range,
    /// then each page `MAP_FIXED | MAP_SHARED` into its slot.
    pub fn map_pages(&self, pages: &[u64], writable: bool) -> io::Result<MmapRegion> {
        if pages.is_empty() {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "empty mapping"));
        }
        let total = self.pages();
        if let Some(bad) = pages.iter().find(|&&p| p >= total) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("page {bad} is past the end of the {total}-page memfd"),
            ));
        }
        let len = pages
            .len()
            .checked_mul(PAGE_SIZE)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "mapping too large"))?;
        // SAFETY: a fresh anonymous PROT_NONE mapping chosen by the kernel; it overlaps nothing.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = NonNull::new(base.cast::<u8>()).expect("mmap never returns NULL on success");
        // From here on, dropping `region` unmaps the whole reservation (and whatever pages
        // were already placed in it).
        let region = MmapRegion { ptr, len, writable };
        let prot = if writable {
            libc::PROT_READ | libc::PROT_WRITE
        } else {
            libc::PROT_READ
        };
        for (i, &page) in pages.iter().enumerate() {
            let offset = page * PAGE_SIZE as u64;
            let offset = libc::off_t::try_from(offset)
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "offset overflow"))?;
            // SAFETY: the target `[base + i * PAGE_SIZE, +PAGE_SIZE)` lies inside the
            // reservation we own (i < pages.len()), so MAP_FIXED replaces only our own
            // PROT_NONE page; the file range exists (checked against the sealed size).
            let r = unsafe {
                libc::mmap(
                    base.cast::<u8>().add(i * PAGE_SIZE).cast(),
                    PAGE_SIZE,
                    prot,
                    libc::MAP_SHARED | libc::MAP_FIXED,
                    self.file.as_raw_fd(),
                    offset,
                )
            };
            if r == libc::MAP_FAILED {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(region)
    }
}

impl AsFd for Memfd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

// ---------------------------------------------------------------------------------------------
// MmapRegion

/// A mapping of memfd pages (see [`Memfd::map_pages`]), unmapped on drop.
///
/// The bytes are memory another domain may read and write at any time, so they are only
/// accessed through [`SharedMem`]: single relaxed atomic accesses, copied in or out; no
/// `&[u8]` is ever formed over them. A read-only region (`PROT_READ`) refuses writes with
/// [`MemError::OutOfBounds`] reporting a writable size of 0 instead of faulting.
#[derive(Debug)]
pub struct MmapRegion {
    ptr: NonNull<u8>,
    len: usize,
    writable: bool,
}

// SAFETY: the region owns its mapping; every access through it is atomic, so sharing and
// sending it between threads cannot cause data races in this process.
unsafe impl Send for MmapRegion {}
// SAFETY: as above: `&MmapRegion` only allows atomic accesses.
unsafe impl Sync for MmapRegion {}

impl Drop for MmapRegion {
    fn drop(&mut self) {
        // SAFETY: `ptr..ptr+len` is a mapping this value created and owns; no reference into
        // it outlives `self` (accessors only copy).
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

impl MmapRegion {
    /// Whether the mapping is `PROT_READ | PROT_WRITE`.
    pub fn is_writable(&self) -> bool {
        self.writable
    }

    /// Puts private zero-filled pages (same protection) in place of pages `first..end`, at
    /// the same addresses (`mmap(MAP_FIXED | MAP_PRIVATE | MAP_ANONYMOUS)`): what was mapped
    /// there is unmapped. On failure the pages are as they were.
    pub fn replace_with_private(&self, first: usize, end: usize) -> io::Result<()> {
        let invalid = || io::Error::from(io::ErrorKind::InvalidInput);
        let at = first.checked_mul(PAGE_SIZE).ok_or_else(invalid)?;
        let len = end
            .checked_sub(first)
            .and_then(|n| n.checked_mul(PAGE_SIZE))
            .ok_or_else(invalid)?;
        check_bounds(at, len, self.len).map_err(|_| invalid())?;
        if len == 0 {
            return Ok(());
        }
        let prot = if self.writable {
            libc::PROT_READ | libc::PROT_WRITE
        } else {
            libc::PROT_READ
        };
        // SAFETY: `at..at + len` lies inside the mapping this value owns (checked) and is
        // page-aligned, so MAP_FIXED replaces only our own pages; no reference into them
        // exists (accessors only copy), and I/O still using the addresses finds valid memory.
        let r = unsafe {
            libc::mmap(
                self.ptr.as_ptr().add(at).cast(),
                len,
                prot,
                libc::MAP_FIXED | libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if r == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn check_write(&self, offset: usize, len: usize) -> Result<(), MemError> {
        if self.writable {
            check_bounds(offset, len, self.len)
        } else {
            Err(MemError::OutOfBounds {
                offset,
                len,
                size: 0,
            })
        }
    }

    fn byte(&self, offset: usize) -> &AtomicU8 {
        debug_assert!(offset < self.len);
        // SAFETY: offset < len (checked by every caller), the mapping lives as long as `&self`,
        // and AtomicU8 has alignment 1; atomics permit concurrent access by the other domain.
        unsafe { AtomicU8::from_ptr(self.ptr.as_ptr().add(offset)) }
    }

    fn word64(&self, offset: usize) -> &AtomicU64 {
        debug_assert!(offset + 8 <= self.len && offset.is_multiple_of(8));
        // SAFETY: offset + 8 <= len and offset is 8-aligned from a page-aligned base (checked
        // by every caller); the mapping lives as long as `&self`. On read-only mappings only
        // relaxed loads are done, which std allows on read-only memory for sizes up to the
        // pointer width (64-bit hosts: Xen backends are x86_64/aarch64).
        unsafe { AtomicU64::from_ptr(self.ptr.as_ptr().add(offset).cast()) }
    }

    /// `n` consecutive 64-bit words from `offset`, as atomics.
    fn words64(&self, offset: usize, n: usize) -> &[AtomicU64] {
        if n == 0 {
            return &[];
        }
        assert!(offset.is_multiple_of(8) && offset + n * 8 <= self.len);
        // SAFETY: the range is inside the mapping (asserted) and 8-aligned from a
        // page-aligned base; the mapping lives as long as `&self`. AtomicU64 has the size and
        // alignment of u64, and atomics permit concurrent access by the other domain. On
        // read-only mappings only relaxed loads are done (see `word64`).
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr().add(offset).cast(), n) }
    }

    fn word32(&self, offset: usize) -> &AtomicU32 {
        debug_assert!(offset + 4 <= self.len && offset.is_multiple_of(4));
        // SAFETY: offset + 4 <= len and offset is 4-aligned from a page-aligned base (checked
        // by every caller); the mapping lives as long as `&self`.
        unsafe { AtomicU32::from_ptr(self.ptr.as_ptr().add(offset).cast()) }
    }

    /// The 64-bit word at `offset` (a multiple of 8) as an atomic, for read-modify-write
    /// protocols on shared memory (the grant table's flag updates). Writable regions only.
    pub(crate) fn atomic_u64(&self, offset: usize) -> Result<&AtomicU64, MemError> {
        self.check_write(offset, 8)?;
        if !offset.is_multiple_of(8) {
            return Err(MemError::Unaligned(offset));
        }
        Ok(self.word64(offset))
    }
}

impl SharedMem for MmapRegion {
    fn size(&self) -> usize {
        self.len
    }

    fn read_u32_volatile(&self, offset: usize) -> Result<u32, MemError> {
        check_bounds(offset, 4, self.len)?;
        if !offset.is_multiple_of(4) {
            return Err(MemError::Unaligned(offset));
        }
        Ok(u32::from_le(self.word32(offset).load(Ordering::Relaxed)))
    }

    fn write_u32_volatile(&self, offset: usize, value: u32) -> Result<(), MemError> {
        self.check_write(offset, 4)?;
        if !offset.is_multiple_of(4) {
            return Err(MemError::Unaligned(offset));
        }
        self.word32(offset).store(value.to_le(), Ordering::Relaxed);
        Ok(())
    }

    fn copy_from(&self, offset: usize, dst: &mut [u8]) -> Result<(), MemError> {
        check_bounds(offset, dst.len(), self.len)?;
        let (head, body, tail) = split_words(offset, dst.len());
        let (h, rest) = dst.split_at_mut(head);
        let (b, t) = rest.split_at_mut(body * 8);
        for (i, d) in h.iter_mut().enumerate() {
            *d = self.byte(offset + i).load(Ordering::Relaxed);
        }
        for (d, w) in b.chunks_exact_mut(8).zip(self.words64(offset + head, body)) {
            d.copy_from_slice(&w.load(Ordering::Relaxed).to_ne_bytes());
        }
        let at = offset + head + body * 8;
        for (i, d) in t.iter_mut().enumerate().take(tail) {
            *d = self.byte(at + i).load(Ordering::Relaxed);
        }
        Ok(())
    }

    fn copy_to(&self, offset: usize, src: &[u8]) -> Result<(), MemError> {
        self.check_write(offset, src.len())?;
        let (head, body, tail) = split_words(offset, src.len());
        let (h, rest) = src.split_at(head);
        let (b, t) = rest.split_at(body * 8);
        for (i, &v) in h.iter().enumerate() {
            self.byte(offset + i).store(v, Ordering::Relaxed);
        }
        for (v, w) in b.chunks_exact(8).zip(self.words64(offset + head, body)) {
            let mut word = [0u8; 8];
            word.copy_from_slice(v);
            w.store(u64::from_ne_bytes(word), Ordering::Relaxed);
        }
        let at = offset + head + body * 8;
        for (i, &v) in t.iter().enumerate().take(tail) {
            self.byte(at + i).store(v, Ordering::Relaxed);
        }
        Ok(())
    }
}

/// Splits `[offset, offset + len)` into leading bytes up to an 8-byte boundary, whole 64-bit
/// words, and trailing bytes: (head bytes, words, tail bytes).
fn split_words(offset: usize, len: usize) -> (usize, usize, usize) {
    let head = (offset.next_multiple_of(8) - offset).min(len);
    let words = (len - head) / 8;
    (head, words, len - head - words * 8)
}

impl MappedRegion for MmapRegion {
    fn writable(&self) -> bool {
        self.writable
    }

    fn io_base(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memfd_map_and_access() {
        let m = Memfd::new(c"t", 4 * PAGE_SIZE as u64).unwrap();
        m.write_at(PAGE_SIZE as u64 * 2 + 5, b"hello").unwrap();
        let r = m.map_pages(&[2, 0], true).unwrap();
        let mut b = [0u8; 5];
        r.copy_from(5, &mut b).unwrap();
        assert_eq!(&b, b"hello");
        r.copy_to(PAGE_SIZE + 3, &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11])
            .unwrap();
        let mut c = [0u8; 11];
        m.read_at(3, &mut c).unwrap();
        assert_eq!(c, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]);
        r.write_u32_volatile(16, 0x0403_0201).unwrap();
        assert_eq!(r.read_u32_volatile(16).unwrap(), 0x0403_0201);
        let mut d = [0u8; 4];
        m.read_at(PAGE_SIZE as u64 * 2 + 16, &mut d).unwrap();
        assert_eq!(d, [1, 2, 3, 4]);
        assert!(r.read_u32_volatile(2 * PAGE_SIZE - 2).is_err());
        assert!(r.read_u32_volatile(6).is_err());
        assert!(m.map_pages(&[4], false).is_err());
        assert!(m.map_pages(&[], false).is_err());
        assert!(m.read_at(4 * PAGE_SIZE as u64 - 1, &mut d).is_err());

        let ro = m.map(2, 1, false).unwrap();
        assert!(ro.copy_to(0, &[1]).is_err());
        assert!(ro.write_u32_volatile(0, 1).is_err());
        ro.copy_from(5, &mut b).unwrap();
        assert_eq!(&b, b"hello");
    }

    #[test]
    fn copies_at_every_alignment() {
        let m = Memfd::new(c"t", 2 * PAGE_SIZE as u64).unwrap();
        let r = m.map_pages(&[0, 1], true).unwrap();
        let src: Vec<u8> = (0..100u8).map(|i| i.wrapping_mul(37) ^ 0x5a).collect();
        for off in [
            0usize,
            1,
            3,
            7,
            8,
            9,
            15,
            PAGE_SIZE - 5,
            2 * PAGE_SIZE - 100,
        ] {
            for len in [0usize, 1, 5, 8, 9, 16, 17, 63, 100] {
                if off + len > 2 * PAGE_SIZE {
                    continue;
                }
                r.copy_to(off, &vec![0xee; len]).unwrap();
                r.copy_to(off, &src[..len]).unwrap();
                let mut back = vec![0u8; len];
                r.copy_from(off, &mut back).unwrap();
                assert_eq!(back, src[..len], "offset {off}, length {len}");
                let mut raw = vec![0u8; len];
                m.read_at(off as u64, &mut raw).unwrap();
                assert_eq!(raw, src[..len], "offset {off}, length {len}");
            }
        }
        assert!(r.copy_from(2 * PAGE_SIZE - 3, &mut [0u8; 4]).is_err());
        assert!(r.copy_to(2 * PAGE_SIZE - 3, &[0u8; 4]).is_err());
    }

    #[test]
    fn memfd_is_sealed() {
        let m = Memfd::new(c"t", PAGE_SIZE as u64).unwrap();
        assert!(m.file.set_len(0).is_err());
        assert!(m.file.set_len(2 * PAGE_SIZE as u64).is_err());
    }
}
