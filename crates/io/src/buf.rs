//! Buffers that in-flight operations own.

#![allow(unsafe_code)]

use smallvec::SmallVec;
use std::alloc::{self, Layout};
use std::ptr::NonNull;

/// Memory that can be handed to the kernel for the duration of an I/O.
///
/// # Safety
/// Implementors guarantee that the regions returned by [`IoBuf::iovecs`] stay valid, do not
/// move and are not accessed by anyone else from the moment the buffer is moved into an
/// [`crate::Op`] until the engine hands it back in a [`crate::Completion`]. Moving the owning
/// value (e.g. `AlignedBuf`, a heap allocation) must not move the memory itself.
///
/// The iovec *array* is another matter: it may live inside the value (an [`IoSlice`] keeps up
/// to four inline) and move with it, so an engine that hands the array to the kernel for
/// longer than one call copies it first (`IovecArray`, io_uring and native AIO; librbd's
/// engine keeps its own list).
pub unsafe trait IoBuf: Send + 'static {
    /// The memory regions, in order (like `struct iovec` for preadv/pwritev).
    fn iovecs(&mut self) -> &[libc::iovec];
    /// Total length in bytes.
    fn total_len(&self) -> usize;

    /// Whether the owner can *lend* this memory: keep it alive, unmoved and unused past the
    /// operation's completion when an engine reports [`crate::Phase::TimedOut`] (the
    /// storage failed the operation at its deadline but may still read or write the
    /// memory), until the [`crate::Phase::Released`] completion that follows. Memory of this
    /// process's own qualifies ([`AlignedBuf`]). A guest's granted pages qualify only where
    /// they can be taken out of the buffer before the guest is answered
    /// ([`IoBuf::detach_foreign`]): the guest reuses them once answered. Engines with
    /// deadlines copy through buffers of their own for memory that does not. Default: no.
    fn lendable(&self) -> bool {
        false
    }

    /// Called by the owner of a lent buffer (one whose storage reported
    /// [`crate::Phase::TimedOut`] and still has its memory) before it answers for it: memory
    /// that is not the owner's to keep (a guest's granted pages) leaves the buffer at once,
    /// private memory taking its place at the same addresses, so the storage's late reads
    /// and writes reach only that. If this fails, the owner must not answer before the
    /// [`crate::Phase::Released`] completion. Own memory: nothing to do (the default).
    fn detach_foreign(&mut self) -> std::io::Result<()> {
        Ok(())
    }

    /// Copies `src` into the buffer's memory starting `at` bytes in (across iovecs).
    /// Panics if the range exceeds [`IoBuf::total_len`] (a caller bug).
    fn copy_in(&mut self, at: usize, src: &[u8]) {
        let mut pos = 0usize;
        let mut done = 0usize;
        for iov in self.iovecs() {
            let (start, end) = (pos, pos + iov.iov_len);
            pos = end;
            if end <= at + done || done == src.len() {
                continue;
            }
            let from = at + done - start;
            let n = (iov.iov_len - from).min(src.len() - done);
            // SAFETY: the IoBuf contract makes each iovec valid for writes of iov_len bytes
            // while we hold &mut self; from + n <= iov_len.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    src[done..].as_ptr(),
                    (iov.iov_base as *mut u8).add(from),
                    n,
                )
            };
            done += n;
        }
        assert_eq!(done, src.len(), "copy_in past the end of the buffer");
    }

    /// Copies from the buffer's memory starting `at` bytes in into `dst`.
    fn copy_out(&mut self, at: usize, dst: &mut [u8]) {
        let mut pos = 0usize;
        let mut done = 0usize;
        for iov in self.iovecs() {
            let (start, end) = (pos, pos + iov.iov_len);
            pos = end;
            if end <= at + done || done == dst.len() {
                continue;
            }
            let from = at + done - start;
            let n = (iov.iov_len - from).min(dst.len() - done);
            // SAFETY: each iovec is valid for reads of iov_len bytes while we hold &mut self.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    (iov.iov_base as *const u8).add(from),
                    dst[done..].as_mut_ptr(),
                    n,
                )
            };
            done += n;
        }
        assert_eq!(done, dst.len(), "copy_out past the end of the buffer");
    }

    /// Zeroes `len` bytes starting `at` bytes in.
    fn fill_zero(&mut self, at: usize, len: usize) {
        let mut pos = 0usize;
        let mut done = 0usize;
        for iov in self.iovecs() {
            let (start, end) = (pos, pos + iov.iov_len);
            pos = end;
            if end <= at + done || done == len {
                continue;
            }
            let from = at + done - start;
            let n = (iov.iov_len - from).min(len - done);
            // SAFETY: each iovec is valid for writes of iov_len bytes while we hold &mut self.
            unsafe { std::ptr::write_bytes((iov.iov_base as *mut u8).add(from), 0, n) };
            done += n;
        }
        assert_eq!(done, len, "fill_zero past the end of the buffer");
    }
}

/// A zero-initialised heap buffer with a chosen alignment (for O_DIRECT).
///
/// [`AlignedBuf::large`] makes one for large, long-lived I/O buffers: its own mapping in
/// transparent huge pages where the kernel offers them.
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
    /// What [`AlignedBuf::capacity`] reports (the requested size for a mapped buffer).
    cap: usize,
    backing: Backing,
    iov: [libc::iovec; 1],
}

/// Where an [`AlignedBuf`]'s memory comes from.
enum Backing {
    /// The global allocator, with this layout.
    Heap(Layout),
    /// An anonymous mapping of this many bytes at `ptr`, aligned to [`HUGE_PAGE`] and advised
    /// `MADV_HUGEPAGE`.
    Mapped(usize),
}

/// The size (and alignment) of a transparent huge page on x86-64 and of the mappings of
/// [`AlignedBuf::large`].
pub const HUGE_PAGE: usize = 2 << 20;

/// [`AlignedBuf::large`] maps buffers of at least this many bytes in huge pages; smaller ones
/// come from the heap as with [`AlignedBuf::new`].
pub const LARGE_BUF_MIN: usize = 1 << 20;

/// Whether the kernel can back `MADV_HUGEPAGE` memory with transparent huge pages
/// (`/sys/kernel/mm/transparent_hugepage/enabled` is `always` or `madvise`), read once.
pub fn huge_pages_available() -> bool {
    static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled")
            .map(|s| s.contains("[always]") || s.contains("[madvise]"))
            .unwrap_or(false)
    })
}

// SAFETY: AlignedBuf owns its allocation exclusively; the raw pointer is not shared.
unsafe impl Send for AlignedBuf {}
// SAFETY: &AlignedBuf only gives shared (read-only) access to the bytes.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// A zeroed buffer of `len` bytes aligned to `align` (a power of two; at least 1).
    ///
    /// # Panics
    /// If `align` is not a power of two or the size overflows (programming errors).
    pub fn new(len: usize, align: usize) -> AlignedBuf {
        let align = align.max(1);
        // A zero-sized allocation is not allowed: allocate at least one alignment unit.
        let layout = Layout::from_size_align(len.max(1), align).expect("valid buffer layout");
        // SAFETY: layout has a non-zero size.
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(raw).unwrap_or_else(|| alloc::handle_alloc_error(layout));
        AlignedBuf {
            ptr,
            len,
            cap: layout.size(),
            backing: Backing::Heap(layout),
            iov: [libc::iovec {
                iov_base: raw.cast(),
                iov_len: len,
            }],
        }
    }

    /// A zeroed buffer of `len` bytes aligned to `align`, for large I/O that lives long
    /// (a conversion's chunks, a benchmark's requests, an NBD connection's pool): from
    /// [`LARGE_BUF_MIN`] bytes up, where transparent huge pages are available, its own
    /// anonymous mapping aligned to [`HUGE_PAGE`], of `len` rounded up to whole huge pages,
    /// advised `MADV_HUGEPAGE` before the first touch. Memory that is physically contiguous
    /// goes to the disk as one segment per huge page instead of one per 4 KiB page: Linux
    /// splits a request at the device's segment limit (254 for virtio-blk, 127 for NVMe), so
    /// a 1 MiB read into scattered 4 KiB pages often reaches the disk as 1016 + 8 KiB, and
    /// contiguous reads into huge pages merge up to `max_sectors_kb` instead (4 MiB requests
    /// on this machine's virtio disk, 2x the throughput of 1 MiB reads: docs in the README's
    /// img bench section). Otherwise (smaller, no THP, the mapping refused) as [`new`](Self::new).
    ///
    /// The physical cost is the rounded size once the kernel gives huge pages (a 1 MiB buffer
    /// takes 2 MiB), so keep it for buffers of which there are few.
    pub fn large(len: usize, align: usize) -> AlignedBuf {
        if len < LARGE_BUF_MIN || align > HUGE_PAGE || !huge_pages_available() {
            return AlignedBuf::new(len, align);
        }
        let Some(size) = len.checked_next_multiple_of(HUGE_PAGE) else {
            return AlignedBuf::new(len, align);
        };
        match map_huge(size) {
            Some(ptr) => AlignedBuf {
                ptr,
                len,
                cap: len,
                backing: Backing::Mapped(size),
                iov: [libc::iovec {
                    iov_base: ptr.as_ptr().cast(),
                    iov_len: len,
                }],
            },
            None => AlignedBuf::new(len, align),
        }
    }

    /// Visible length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }
    /// Whether the visible length is 0.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Alignment of the allocation, in bytes.
    pub fn align(&self) -> usize {
        match self.backing {
            Backing::Heap(layout) => layout.align(),
            Backing::Mapped(_) => HUGE_PAGE,
        }
    }
    /// Shrinks the visible length (the allocation stays). `len` must not exceed the capacity.
    pub fn truncate(&mut self, len: usize) {
        assert!(len <= self.cap);
        self.len = len;
        self.iov[0].iov_len = len;
    }
    /// Capacity of the allocation (for [`AlignedBuf::large`]: the size asked for, though
    /// the mapping behind it is rounded up to whole huge pages).
    pub fn capacity(&self) -> usize {
        self.cap
    }
    /// The bytes of memory behind the buffer: its capacity, or for a mapped one
    /// ([`AlignedBuf::large`]) the mapping's size, whole huge pages.
    pub fn footprint(&self) -> usize {
        match self.backing {
            Backing::Heap(layout) => layout.size(),
            Backing::Mapped(size) => size,
        }
    }
    /// Whether the memory is an own mapping advised for huge pages ([`AlignedBuf::large`]).
    pub fn is_huge_mapped(&self) -> bool {
        matches!(self.backing, Backing::Mapped(_))
    }
    /// Sets the visible length back up to at most the capacity.
    pub fn set_len(&mut self, len: usize) {
        self.truncate(len)
    }
}

impl std::ops::Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: ptr is valid for `len` initialised bytes (zeroed by the allocator, or a fresh
        // anonymous mapping, which reads as zeroes), owned by self.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl std::ops::DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in deref, and &mut self guarantees exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        match self.backing {
            // SAFETY: allocated in `new` with exactly this layout.
            Backing::Heap(layout) => unsafe { alloc::dealloc(self.ptr.as_ptr(), layout) },
            Backing::Mapped(size) => {
                // SAFETY: `ptr..ptr + size` is the mapping `map_huge` made for this buffer
                // alone; nothing refers to it after the drop (the owner of an in-flight op
                // cannot drop it: the op owns it).
                unsafe { libc::munmap(self.ptr.as_ptr().cast(), size) };
            }
        }
    }
}

/// A fresh anonymous read-write mapping of `size` bytes (a multiple of [`HUGE_PAGE`]) at an
/// address aligned to [`HUGE_PAGE`], advised `MADV_HUGEPAGE`; its memory reads as zeroes.
/// `None` if the kernel refuses the mapping.
fn map_huge(size: usize) -> Option<NonNull<u8>> {
    let total = size.checked_add(HUGE_PAGE)?;
    // SAFETY: a new private anonymous mapping at an address of the kernel's choosing: it
    // overlaps no memory anyone uses.
    let base = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            total,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if base == libc::MAP_FAILED {
        return None;
    }
    let start = base as usize;
    let aligned = start.next_multiple_of(HUGE_PAGE);
    let head = aligned - start;
    let tail = total - head - size;
    // SAFETY: the head `[start, aligned)` and the tail `[aligned + size, start + total)` are
    // page-aligned parts of the mapping just made (mmap returns page-aligned addresses and
    // HUGE_PAGE is a multiple of the page size), which nobody has seen; the buffer keeps
    // `[aligned, aligned + size)`.
    unsafe {
        if head > 0 {
            libc::munmap(base, head);
        }
        if tail > 0 {
            libc::munmap((aligned + size) as *mut libc::c_void, tail);
        }
        // Advice only: without it (or if it fails) the buffer works in 4 KiB pages.
        libc::madvise(aligned as *mut libc::c_void, size, libc::MADV_HUGEPAGE);
    }
    NonNull::new(aligned as *mut u8)
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlignedBuf")
            .field("len", &self.len)
            .field("align", &self.align())
            .field("huge_mapped", &self.is_huge_mapped())
            .finish()
    }
}

// SAFETY: the heap allocation does not move when the AlignedBuf value moves, and the owner of
// an in-flight op cannot touch it (it was moved into the op).
unsafe impl IoBuf for AlignedBuf {
    fn iovecs(&mut self) -> &[libc::iovec] {
        self.iov[0] = libc::iovec {
            iov_base: self.ptr.as_ptr().cast(),
            iov_len: self.len,
        };
        &self.iov
    }
    fn total_len(&self) -> usize {
        self.len
    }
    fn lendable(&self) -> bool {
        // Freed only when dropped: its owner can keep it as long as needed.
        true
    }
}

/// A view of part of another [`IoBuf`]'s memory, for splitting one request into several
/// operations (one per host extent).
pub struct IoSlice {
    /// Inline up to 32 pieces, the segments of a blkif request from Linux's blkfront (11
    /// direct, 32 indirect by default): a request's fast path allocates nothing here.
    iov: SmallVec<[libc::iovec; 32]>,
    len: usize,
    /// [`IoBuf::lendable`] of the buffer it views.
    lendable: bool,
}

// SAFETY: an IoSlice is only raw pointers into memory that its creator keeps alive and
// unaliased (see `IoSlice::new`); sending it to another thread moves no data.
unsafe impl Send for IoSlice {}

impl IoSlice {
    /// Describes bytes `[start, start + len)` of `buf`.
    ///
    /// # Safety
    /// The caller keeps the memory of `buf` alive and does not move it until every op that
    /// carries this slice has completed, and does not access those bytes meanwhile (slices of
    /// one buffer handed out at the same time must not overlap).
    pub unsafe fn new<B: IoBuf + ?Sized>(buf: &mut B, start: usize, len: usize) -> IoSlice {
        let mut iov = SmallVec::new();
        let mut pos = 0usize;
        let end = start + len;
        for v in buf.iovecs() {
            let (vs, ve) = (pos, pos + v.iov_len);
            pos = ve;
            if ve <= start || vs >= end {
                continue;
            }
            let from = start.max(vs) - vs;
            let to = end.min(ve) - vs;
            iov.push(libc::iovec {
                // SAFETY: from < iov_len, so the pointer stays inside the region.
                iov_base: unsafe { (v.iov_base as *mut u8).add(from) }.cast(),
                iov_len: to - from,
            });
        }
        assert!(pos >= end, "slice past the end of the buffer");
        IoSlice {
            iov,
            len,
            lendable: buf.lendable(),
        }
    }

    /// The same view, never lent ([`IoBuf::lendable`] false): engines with deadlines copy
    /// through buffers of their own, as for guest memory.
    pub fn not_lendable(mut self) -> IoSlice {
        self.lendable = false;
        self
    }
}

// SAFETY: the memory is kept alive and unmoved by the creator (contract of `IoSlice::new`).
unsafe impl IoBuf for IoSlice {
    fn iovecs(&mut self) -> &[libc::iovec] {
        &self.iov
    }
    fn total_len(&self) -> usize {
        self.len
    }
    fn lendable(&self) -> bool {
        self.lendable
    }
}

/// Whether `b` holds only zeroes, 16 bytes at a time (the compiler vectorises this, unlike
/// a byte loop with an early exit): zero detection of write payloads and convert chunks.
pub fn is_zero(b: &[u8]) -> bool {
    let mut words = b.chunks_exact(16);
    words.all(|w| w.iter().fold(0u8, |a, &x| a | x) == 0)
        && words.remainder().iter().all(|&x| x == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn is_zero_agrees_with_a_byte_loop_at_every_length_and_position() {
        for len in 0..70usize {
            let mut b = vec![0u8; len];
            assert!(is_zero(&b));
            for i in 0..len {
                b[i] = 1;
                assert!(!is_zero(&b), "len {len}, byte {i}");
                b[i] = 0;
            }
        }
    }

    #[test]
    fn aligned_buf_is_aligned_and_zeroed() {
        for align in [512usize, 4096, 65536] {
            let mut b = AlignedBuf::new(12345, align);
            assert_eq!(b.as_ptr() as usize % align, 0);
            assert!(b.iter().all(|&x| x == 0));
            b[12344] = 7;
            assert_eq!(b.iovecs()[0].iov_len, 12345);
        }
        let z = AlignedBuf::new(0, 4096);
        assert!(z.is_empty());
    }

    #[test]
    fn large_buffers_are_huge_page_aligned_zeroed_and_writable_to_the_end() {
        for len in [LARGE_BUF_MIN, HUGE_PAGE, 3 * HUGE_PAGE + 4096 + 17] {
            let mut b = AlignedBuf::large(len, 4096);
            assert_eq!(b.is_huge_mapped(), huge_pages_available(), "len {len}");
            let align = if b.is_huge_mapped() { HUGE_PAGE } else { 4096 };
            assert_eq!(b.as_ptr() as usize % align, 0, "len {len}");
            assert_eq!((b.len(), b.capacity()), (len, len));
            let whole = len.next_multiple_of(HUGE_PAGE);
            assert_eq!(b.footprint(), if b.is_huge_mapped() { whole } else { len });
            assert!(is_zero(&b), "len {len}");
            b[0] = 1;
            b[len - 1] = 2;
            assert_eq!(b.iovecs()[0].iov_len, len);
            b.truncate(4096);
            assert_eq!(b.iovecs()[0].iov_len, 4096);
            b.set_len(len);
            assert_eq!((b[0], b[len - 1]), (1, 2));
        }
        // Below the threshold: the heap, as `new`.
        let small = AlignedBuf::large(LARGE_BUF_MIN - 4096, 4096);
        assert!(!small.is_huge_mapped());
        assert!(is_zero(&small));
    }

    /// The point of `large`: the kernel may back the buffer with transparent huge pages
    /// (with THP in `madvise` mode only memory advised `MADV_HUGEPAGE` is eligible). Checked
    /// in /proc/self/smaps, where the kernel reports it (`THPeligible`); whether it then
    /// finds a free huge page is the machine's business.
    #[test]
    fn large_buffers_are_eligible_for_transparent_huge_pages() {
        if !huge_pages_available() {
            eprintln!("transparent huge pages are off here: nothing to check");
            return;
        }
        let b = AlignedBuf::large(2 * HUGE_PAGE, 4096);
        let start = b.as_ptr() as usize;
        let smaps = std::fs::read_to_string("/proc/self/smaps").expect("/proc/self/smaps");
        let mut in_ours = false;
        let mut eligible = None;
        for line in smaps.lines() {
            let head = line.split_whitespace().next().unwrap_or("");
            if let Some((from, _)) = head.split_once('-') {
                if from.chars().all(|c| c.is_ascii_hexdigit()) && !from.is_empty() {
                    in_ours = usize::from_str_radix(from, 16) == Ok(start);
                    continue;
                }
            }
            if in_ours {
                if let Some(v) = line.strip_prefix("THPeligible:") {
                    eligible = Some(v.trim().to_string());
                }
            }
        }
        match eligible {
            Some(v) => assert_eq!(v, "1", "the buffer's mapping is not THP-eligible"),
            None => eprintln!("no THPeligible field for the mapping at {start:#x} (old kernel?)"),
        }
    }
}
