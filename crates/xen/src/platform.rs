//! The Xen primitives a backend needs, as small interfaces: grant mapping and copying, event
//! channels (xenstore is [`crate::xenstore::Client`], whose transport already covers both real
//! Xen and the simulation). Two implementations: real Xen ([`crate::real`]: `/dev/xen/gntdev`,
//! `/dev/xen/evtchn`) and the simulation (the `xdisk-xensim` crate: memfd guest memory with a
//! grant table in shared memory, eventfd event channels), which depends on this crate, never
//! the other way round.
//!
//! Memory of another domain is never seen as Rust data: [`MappedRegion`] offers the copying,
//! bounds-checked accessors of [`xdisk_blkif::mem::SharedMem`] for metadata (rings, indirect
//! pages) and raw iovecs only for handing data pages to the kernel for I/O.

use std::os::unix::io::RawFd;
use std::sync::Arc;

pub use xdisk_blkif::mem::{MemError, SharedMem};

/// A Xen domain id (`domid_t` is 16 bits).
pub type DomId = u16;
/// A grant reference.
pub type GrantRef = u32;
/// An event channel port.
pub type Port = u32;

/// Errors of the platform primitives.
#[derive(Debug, thiserror::Error)]
pub enum PlatformError {
    /// The grant is not usable (not granted to us, revoked, read-only for a writable map,
    /// bad reference): the hypervisor's GNTST_* status.
    #[error("grant {gref} of domain {domid}: {status:?}")]
    Grant {
        /// The granting domain.
        domid: DomId,
        /// The grant reference, an index into that domain's grant table.
        gref: GrantRef,
        /// Why it is unusable.
        status: GrantStatus,
    },
    /// An event channel operation refused: no such domain, a remote port not allocated,
    /// reserved for another domain or already bound, a closed port, no free port (the
    /// simulation's errors; real Xen's come as [`PlatformError::Io`]).
    #[error("event channel: {0}")]
    EventChannel(String),
    /// A mapping or allocation of this many pages: none, or more than one call may do
    /// (gntdev's and gntalloc's `MAX_MAP_PAGES`).
    #[error("too many pages ({0}) in one mapping")]
    TooLarge(usize),
    /// A system call on a Xen device failed (opening `/dev/xen/*`, an ioctl, an mmap), or
    /// [`crate::iobuf::GrantIoBuf::new`] refused a read-only mapping as the destination of a
    /// read (kind `PermissionDenied`).
    #[error("{context}: {source}")]
    Io {
        /// The device and the operation, e.g. `/dev/xen/gntdev: IOCTL_GNTDEV_MAP_GRANT_REF`.
        context: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// An access to a mapped region out of its bounds or misaligned (a write to a read-only
    /// mapping reports as out of bounds of a 0-byte region).
    #[error(transparent)]
    Mem(#[from] MemError),
}

/// Grant operation status, as xen/include/public/grant_table.h's GNTST_* values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GrantStatus {
    /// GNTST_okay (0): the operation succeeded.
    #[default]
    Okay,
    /// GNTST_general_error (-1)
    GeneralError,
    /// GNTST_bad_domain (-2)
    BadDomain,
    /// GNTST_bad_gntref (-3)
    BadGntref,
    /// GNTST_bad_copy_arg (-10)
    BadCopyArg,
    /// GNTST_permission_denied (-8)
    PermissionDenied,
}

/// Pages of another domain mapped into ours (by gntdev, or by the simulation). Unmapped when
/// the last reference is dropped.
pub trait MappedRegion: SharedMem + Send + Sync {
    /// Whether the mapping allows writes (false for read-only grants).
    fn writable(&self) -> bool;
    /// The region as one iovec for kernel I/O (`iov_base` valid for `size()` bytes while `self`
    /// lives). Only for handing to the kernel (preadv/pwritev/io_uring), never to dereference.
    fn io_base(&self) -> *mut u8;

    /// Whether [`MappedRegion::detach`] can take the pages of `[offset, offset + len)` out of
    /// this mapping. Default: no.
    fn can_detach(&self, offset: usize, len: usize) -> bool {
        let _ = (offset, len);
        false
    }

    /// Takes the granted pages that `[offset, offset + len)` touches out of the mapping at
    /// once: private zero-filled memory of this process takes their place at the same
    /// addresses, and their grants are released (the granting domain can end its access and
    /// reuse the pages). For I/O that outlives its request: a storage that failed an
    /// operation at its deadline may still read or write the memory it was given
    /// (`xdisk_io::Phase::TimedOut`); detached, those late accesses reach neither the guest
    /// nor whatever is mapped there next, and the guest can be answered. Idempotent; the
    /// region's accessors then see the private memory. Fails (kind `Unsupported` where
    /// [`MappedRegion::can_detach`] is false) with the mapping unchanged or detached in part.
    fn detach(&self, offset: usize, len: usize) -> Result<(), PlatformError> {
        let _ = (offset, len);
        Err(PlatformError::Io {
            context: "detaching the pages of a grant mapping".into(),
            source: std::io::Error::from(std::io::ErrorKind::Unsupported),
        })
    }

    /// Whether a page that `[offset, offset + len)` touches was detached.
    fn is_detached(&self, offset: usize, len: usize) -> bool {
        let _ = (offset, len);
        false
    }
}

/// The pages (first, end) that `[offset, offset + len)` touches in a region of `size` bytes.
pub fn page_span(offset: usize, len: usize, size: usize) -> Result<(usize, usize), MemError> {
    xdisk_blkif::mem::check_bounds(offset, len, size)?;
    let page = xdisk_blkif::wire::PAGE_SIZE;
    // In bounds (checked above), so `offset + len` does not overflow.
    Ok((offset / page, (offset + len).div_ceil(page)))
}

/// Direction of a grant copy.
pub enum CopyDir<'a> {
    /// Copy from the foreign page into `dst`.
    FromForeign(&'a mut [u8]),
    /// Copy `src` into the foreign page.
    ToForeign(&'a [u8]),
}

/// One grant copy (like one `struct gntdev_grant_copy_segment`).
pub struct GrantCopyOp<'a> {
    /// The domain that granted the foreign page.
    pub domid: DomId,
    /// The grant reference of the foreign page in that domain's grant table.
    pub gref: GrantRef,
    /// Byte offset inside the foreign page; `offset + len <= 4096`.
    pub offset: u16,
    /// Which way to copy, and our buffer (its length is the copy's length).
    pub dir: CopyDir<'a>,
    /// Filled in by [`GrantMapper::copy`].
    pub status: GrantStatus,
}

/// Mapping and copying grants of other domains (the backend side).
pub trait GrantMapper: Send + Sync {
    /// Maps the pages `refs` of `domid`, in order, as one contiguous region. Fails with
    /// [`PlatformError::Grant`] if any grant is bad, revoked, not granted to us, or read-only
    /// while `writable` is asked.
    fn map(
        &self,
        domid: DomId,
        refs: &[GrantRef],
        writable: bool,
    ) -> Result<Arc<dyn MappedRegion>, PlatformError>;

    /// Performs grant copies; each op gets its own status. Returns an error only when the
    /// batch as a whole could not be attempted.
    fn copy(&self, ops: &mut [GrantCopyOp<'_>]) -> Result<(), PlatformError>;
}

/// One bound event channel.
pub trait EventChannel: Send + Sync {
    /// Our end's port number in our domain (what a frontend writes to its `event-channel`
    /// node for the backend to bind).
    fn local_port(&self) -> Port;
    /// Sends an event to the other end.
    fn notify(&self) -> Result<(), PlatformError>;
    /// Readable when an event is pending (for poll/epoll).
    fn fd(&self) -> RawFd;
    /// Consumes pending events and unmasks the port; returns whether any was pending.
    fn clear(&self) -> Result<bool, PlatformError>;
}

/// Event channel operations.
pub trait EventChannels: Send + Sync {
    /// Binds to `remote_port` of `domid` (the backend side).
    fn bind_interdomain(
        &self,
        domid: DomId,
        remote_port: Port,
    ) -> Result<Box<dyn EventChannel>, PlatformError>;
    /// Allocates a port that `remote` may bind to (the frontend side).
    fn alloc_unbound(&self, remote: DomId) -> Result<Box<dyn EventChannel>, PlatformError>;
}
