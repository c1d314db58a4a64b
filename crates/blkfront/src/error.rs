//! The frontend's errors.

use xdisk_blkif::wire::Status;
use xdisk_blkif::{RingError, XenbusState};
use xdisk_xen::platform::PlatformError;
use xdisk_xensim::SimError;

/// Errors of the frontend.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A xenstore operation (read, write, watch or transaction) on `path` failed.
    #[error("xenstore {path}: {source}")]
    Xenstore {
        /// The node operated on (for the watch on the backend's `state`, the backend
        /// directory; for the handshake's transaction, the frontend directory).
        path: String,
        /// The client's error (an errno of xenstored, or the connection).
        #[source]
        source: xdisk_xen::xenstore::Error,
    },
    /// A call into the simulation failed: granting or revoking a page, mapping the guest's own
    /// pages, destroying the domain ([`Frontend::vanish`](crate::Frontend::vanish)).
    #[error(transparent)]
    Sim(#[from] SimError),
    /// Guest memory access or an event channel operation (allocating the unbound port,
    /// notifying the backend) failed.
    #[error(transparent)]
    Platform(#[from] PlatformError),
    /// The shared ring refused an operation: a response producer index out of range (a broken
    /// backend), or a push onto a full ring.
    #[error("ring: {0}")]
    Ring(#[from] RingError),
    /// [`FrontConfig::timeout`](crate::FrontConfig::timeout) passed while waiting for what the
    /// string says (a backend state, a request's completion).
    #[error("timed out waiting for {0}")]
    Timeout(String),
    /// The backend's `state` became one that ends the wait (e.g. `Closing` while the frontend
    /// waits for `InitWait` or `Connected`); the string says what was being waited for.
    #[error("backend went to state {0:?} while {1}")]
    BackendState(XenbusState, String),
    /// A xenstore node the frontend needs is missing or does not parse (the frontend's
    /// `backend` or `backend-id`, or a number or boolean in the backend directory).
    #[error("backend node {node}: {reason}")]
    Node {
        /// The node's full xenstore path.
        node: String,
        /// What is wrong with it (`missing`, or the parse error).
        reason: String,
    },
    /// The guest's pages are all in use (rings, data, indirect and persistent pages).
    #[error("out of guest memory")]
    NoMemory,
    /// A request carries more data than one blkif request may (see
    /// [`Frontend::max_request_sectors`](crate::Frontend::max_request_sectors)).
    #[error("request of {sectors} sectors is larger than the {max} a request may carry")]
    TooLarge {
        /// Sectors (512 bytes) asked for.
        sectors: u64,
        /// Sectors one request may carry.
        max: u64,
    },
    /// A request the frontend refuses to build: no such queue, data that is not whole
    /// 512-byte sectors, a read or write of no data.
    #[error("invalid request: {0}")]
    Invalid(String),
    /// The ring of this queue has no free request slot (or id): poll for completions and retry.
    #[error("ring {0} is full")]
    RingFull(usize),
    /// The rings are not up (after [`Frontend::disconnect`](crate::Frontend::disconnect), or
    /// a failed reconnect), or, for a raw method, no such queue.
    #[error("not connected")]
    NotConnected,
    /// The backend answered a request with a status other than `BLKIF_RSP_OKAY` (returned by
    /// the blocking calls: [`Frontend::read`](crate::Frontend::read), `write`, `flush`,
    /// `discard`).
    #[error("request failed with {0:?}")]
    Failed(Status),
}

/// Result of the frontend.
pub type Result<T> = std::result::Result<T, Error>;

pub(crate) fn xs_err(path: &str) -> impl FnOnce(xdisk_xen::xenstore::Error) -> Error + '_ {
    move |source| Error::Xenstore {
        path: path.to_owned(),
        source,
    }
}
