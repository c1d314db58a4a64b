//! Errors of the backend.

use xdisk_blkif::xenbus::ConnectError;
use xdisk_blkif::RingError;
use xdisk_xen::platform::PlatformError;

/// Errors of [`crate::Device`].
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A xenstore operation failed.
    #[error("xenstore {path}: {source}")]
    Xenstore {
        /// The node or directory operated on.
        path: String,
        /// What xenstore (or the connection to it) answered.
        #[source]
        source: xdisk_xen::xenstore::Error,
    },
    /// A backend node (written by the toolstack) is missing or invalid.
    #[error("backend node {node}: {reason}")]
    Node {
        /// The node's full path (`<backend dir>/frontend-id`, ...).
        node: String,
        /// What is wrong with it (`missing`, `invalid value "x"`, ...).
        reason: String,
    },
    /// The frontend's connect-time nodes are unusable.
    #[error("frontend: {0}")]
    Connect(#[from] ConnectError),
    /// Grant mapping or event channel failure.
    #[error(transparent)]
    Platform(#[from] PlatformError),
    /// The shared ring cannot be used.
    #[error("ring: {0}")]
    Ring(#[from] RingError),
    /// The image engine failed.
    #[error(transparent)]
    Image(#[from] xdisk_image::Error),
    /// Threads, eventfds.
    #[error("{context}: {source}")]
    Io {
        /// What was being done (`cannot start a queue thread`, `eventfd`, ...).
        context: String,
        /// The system call's error.
        #[source]
        source: std::io::Error,
    },
    /// A live operation ([`crate::Device::quiesce`]) could not be done; nothing changed.
    #[error("{0}")]
    Live(String),
    /// The device's control thread is gone.
    #[error("the device has stopped")]
    Stopped,
    /// The device's control thread panicked (the device was closed with an error).
    #[error("internal error (panic): {0}")]
    Panicked(String),
}

impl Error {
    pub(crate) fn xs(path: &str, source: xdisk_xen::xenstore::Error) -> Error {
        Error::Xenstore {
            path: path.to_owned(),
            source,
        }
    }

    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Error {
        Error::Io {
            context: context.into(),
            source,
        }
    }
}

/// Result of the backend.
pub type Result<T> = std::result::Result<T, Error>;
