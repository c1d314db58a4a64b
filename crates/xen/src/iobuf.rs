//! I/O straight into granted guest pages: [`GrantIoBuf`], an [`IoBuf`] made of byte ranges of
//! mapped grants ([`GrantSegment`]s of any [`MappedRegion`], from real Xen's gntdev or from the
//! simulation), so that the backend's disk I/O moves data between the disk and the guest's
//! pages without a copy, as blkback does.
//!
//! The buffer hands raw iovecs to the kernel; everything else goes through [`SharedMem`]
//! (atomic accesses). Its three `unsafe impl`s are this module's only `unsafe`.

#![allow(unsafe_code)]

use std::io;
use std::sync::Arc;

use xdisk_blkif::mem::check_bounds;
use xdisk_io::IoBuf;

use xdisk_blkif::wire::PAGE_SIZE;

use crate::platform::{MappedRegion, MemError, PlatformError, SharedMem};

/// One byte range of a mapped region, part of a [`GrantIoBuf`]. Holding the `Arc` keeps the
/// mapping alive.
#[derive(Clone)]
pub struct GrantSegment {
    /// The mapped grants (one or more pages) the range is in.
    pub region: Arc<dyn MappedRegion>,
    /// Byte offset inside the region.
    pub offset: usize,
    /// Length in bytes.
    pub len: usize,
}

impl GrantSegment {
    /// The `len` bytes at `offset` of `region`. Not checked here: [`GrantIoBuf::new`] checks
    /// the bounds.
    pub fn new(region: Arc<dyn MappedRegion>, offset: usize, len: usize) -> GrantSegment {
        GrantSegment {
            region,
            offset,
            len,
        }
    }
}

impl std::fmt::Debug for GrantSegment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrantSegment")
            .field("region_size", &self.region.size())
            .field("writable", &self.region.writable())
            .field("offset", &self.offset)
            .field("len", &self.len)
            .finish()
    }
}

/// Room for a [`GrantIoBuf`]'s iovecs, kept between buffers so that a request allocates
/// nothing. Always empty: it holds no pointer into any mapping.
#[derive(Default)]
pub struct IovRoom(Vec<libc::iovec>);

// SAFETY: an `IovRoom` is made empty (`into_parts` clears the list; `Default` is empty) and
// nothing can add to it, so it carries no pointer to another thread: only spare capacity.
unsafe impl Send for IovRoom {}

/// An [`IoBuf`] over granted guest pages: the iovecs point straight into the mappings, so an
/// engine's preadv/pwritev moves data between the disk and the guest's pages without a copy
/// (what blkback does with its grant mappings).
///
/// Built with bounds checked against each region; a buffer that the device writes into (a
/// guest *read* request, `for_device_read`) must consist of writable mappings only. The
/// buffer holds the regions' `Arc`s, so the mappings outlive any in-flight operation.
///
/// [`IoBuf::copy_in`], [`IoBuf::copy_out`] and [`IoBuf::fill_zero`] go through
/// [`SharedMem`] (atomic accesses), never through plain references to guest memory.
pub struct GrantIoBuf {
    segments: Vec<GrantSegment>,
    iov: Vec<libc::iovec>,
    len: usize,
    /// [`IoBuf::lendable`], worked out once (every operation of a split request asks).
    lendable: std::cell::OnceCell<bool>,
}

// SAFETY: the iovecs are raw pointers into mappings owned by the `Arc<dyn MappedRegion>`s held
// in `segments` (which are Send + Sync); moving the buffer to another thread moves no memory.
unsafe impl Send for GrantIoBuf {}

impl std::fmt::Debug for GrantIoBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrantIoBuf")
            .field("segments", &self.segments)
            .field("len", &self.len)
            .finish()
    }
}

impl GrantIoBuf {
    /// A buffer of `segments`, in order. Fails with [`PlatformError::Mem`] if a segment is not
    /// inside its region, and with [`PlatformError::Io`] (`PermissionDenied`) if
    /// `for_device_read` (the device writes into the buffer) and a region is read-only.
    pub fn new(
        segments: Vec<GrantSegment>,
        for_device_read: bool,
    ) -> Result<GrantIoBuf, PlatformError> {
        GrantIoBuf::with_iov(segments, IovRoom::default(), for_device_read)
    }

    /// [`GrantIoBuf::new`] with its iovec list in `room`, given back by
    /// [`GrantIoBuf::into_parts`]: a request then allocates nothing.
    pub fn with_iov(
        segments: Vec<GrantSegment>,
        room: IovRoom,
        for_device_read: bool,
    ) -> Result<GrantIoBuf, PlatformError> {
        let mut iov = room.0;
        iov.clear();
        iov.reserve(segments.len());
        let mut len = 0usize;
        for (i, s) in segments.iter().enumerate() {
            check_bounds(s.offset, s.len, s.region.size())?;
            if for_device_read && !s.region.writable() {
                return Err(PlatformError::Io {
                    context: format!("segment {i} of a read buffer"),
                    source: io::Error::new(
                        io::ErrorKind::PermissionDenied,
                        "read-only grant mapping as the destination of a read",
                    ),
                });
            }
            len = len.checked_add(s.len).ok_or(MemError::OutOfBounds {
                offset: len,
                len: s.len,
                size: usize::MAX,
            })?;
            // In bounds of the region (checked above); the pointer is never dereferenced
            // here, only handed to the kernel.
            let base = s.region.io_base().wrapping_add(s.offset);
            // A segment that starts where the previous one ends in this process's address
            // space (pages mapped together: a request's new grants, or persistent grants the
            // frontend reuses in the same order) extends its iovec: the kernel then pins the
            // pages of a whole run in one call rather than one call per page (direct I/O on
            // gntdev mappings takes get_user_pages' slow path, page by page).
            match iov.last_mut() {
                Some(last) if last.iov_base.cast::<u8>().wrapping_add(last.iov_len) == base => {
                    last.iov_len += s.len
                }
                _ => iov.push(libc::iovec {
                    iov_base: base.cast(),
                    iov_len: s.len,
                }),
            }
        }
        Ok(GrantIoBuf {
            segments,
            iov,
            len,
            lendable: std::cell::OnceCell::new(),
        })
    }

    /// The segments, in order.
    pub fn segments(&self) -> &[GrantSegment] {
        &self.segments
    }

    /// Gives the segments back (to unmap or reuse them).
    pub fn into_segments(self) -> Vec<GrantSegment> {
        self.segments
    }

    /// Gives the segments (to unmap or reuse them) and the iovec list's room (to reuse with
    /// [`GrantIoBuf::with_iov`]) back.
    pub fn into_parts(self) -> (Vec<GrantSegment>, IovRoom) {
        let mut iov = self.iov;
        iov.clear();
        (self.segments, IovRoom(iov))
    }

    /// Calls `f(segment, start_in_segment, buf_range)` for each piece of `[at, at + len)`.
    fn for_range(
        &self,
        at: usize,
        len: usize,
        mut f: impl FnMut(&GrantSegment, usize, std::ops::Range<usize>),
    ) {
        let end = at
            .checked_add(len)
            .filter(|&e| e <= self.len)
            .unwrap_or_else(|| {
                panic!(
                    "{len} bytes at {at} are past the end of a {}-byte GrantIoBuf",
                    self.len
                )
            });
        let mut pos = 0usize;
        for s in &self.segments {
            let (ss, se) = (pos, pos + s.len);
            pos = se;
            if se <= at || ss >= end {
                continue;
            }
            let from = at.max(ss);
            let to = end.min(se);
            f(s, s.offset + (from - ss), (from - at)..(to - at));
        }
    }
}

// SAFETY: the iovecs stay valid while the buffer lives: each points inside a mapping kept
// alive by the `Arc` in `segments` (bounds checked in `new`), and mappings never move. The
// memory is shared with the granting guest, which may touch it during the I/O exactly as it
// may under blkback; the kernel treats it as plain bytes, and this process never forms Rust
// references to it.
unsafe impl IoBuf for GrantIoBuf {
    fn iovecs(&mut self) -> &[libc::iovec] {
        &self.iov
    }

    /// Lendable when every segment's pages can be detached ([`MappedRegion::can_detach`]).
    fn lendable(&self) -> bool {
        *self.lendable.get_or_init(|| {
            self.segments
                .iter()
                .all(|s| s.region.can_detach(s.offset, s.len))
        })
    }

    /// Detaches every segment's pages ([`MappedRegion::detach`]): the guest's pages leave the
    /// buffer (their grants released), private memory takes their place.
    fn detach_foreign(&mut self) -> io::Result<()> {
        for s in &self.segments {
            s.region
                .detach(s.offset, s.len)
                .map_err(|e| io::Error::other(e.to_string()))?;
        }
        tracing::info!(
            bytes = self.len,
            segments = self.segments.len(),
            "a request's guest pages detached (its storage still has them past its deadline)"
        );
        Ok(())
    }

    fn total_len(&self) -> usize {
        self.len
    }

    fn copy_in(&mut self, at: usize, src: &[u8]) {
        self.for_range(at, src.len(), |s, off, r| {
            s.region
                .copy_to(off, &src[r])
                .expect("copy_in into a GrantIoBuf segment");
        });
    }

    fn copy_out(&mut self, at: usize, dst: &mut [u8]) {
        self.for_range(at, dst.len(), |s, off, r| {
            s.region
                .copy_from(off, &mut dst[r])
                .expect("copy_out of a GrantIoBuf segment");
        });
    }

    fn fill_zero(&mut self, at: usize, len: usize) {
        const ZEROS: [u8; PAGE_SIZE] = [0; PAGE_SIZE];
        self.for_range(at, len, |s, off, r| {
            let mut done = 0;
            while done < r.len() {
                let n = (r.len() - done).min(PAGE_SIZE);
                s.region
                    .copy_to(off + done, &ZEROS[..n])
                    .expect("fill_zero of a GrantIoBuf segment");
                done += n;
            }
        });
    }
}
