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
        domid: DomId,
        gref: GrantRef,
        status: GrantStatus,
    },
    #[error("event channel: {0}")]
    EventChannel(String),
    #[error("too many pages ({0}) in one mapping")]
    TooLarge(usize),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Mem(#[from] MemError),
}

/// Grant operation status, as xen/include/public/grant_table.h's GNTST_* values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GrantStatus {
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
    pub domid: DomId,
    pub gref: GrantRef,
    /// Byte offset inside the foreign page; `offset + len <= 4096`.
    pub offset: u16,
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
