//! The frontend's errors.

use xdisk_blkif::wire::Status;
use xdisk_blkif::{RingError, XenbusState};
use xdisk_xen::platform::PlatformError;
use xdisk_xensim::SimError;

/// Errors of the frontend.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("xenstore {path}: {source}")]
    Xenstore {
        path: String,
        #[source]
        source: xdisk_xen::xenstore::Error,
    },
    #[error(transparent)]
    Sim(#[from] SimError),
    #[error(transparent)]
    Platform(#[from] PlatformError),
    #[error("ring: {0}")]
    Ring(#[from] RingError),
    #[error("timed out waiting for {0}")]
    Timeout(String),
    #[error("backend went to state {0:?} while {1}")]
    BackendState(XenbusState, String),
    #[error("backend node {node}: {reason}")]
    Node { node: String, reason: String },
    #[error("out of guest memory")]
    NoMemory,
    #[error("request of {sectors} sectors is larger than the {max} a request may carry")]
    TooLarge { sectors: u64, max: u64 },
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error("ring {0} is full")]
    RingFull(usize),
    #[error("not connected")]
    NotConnected,
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
