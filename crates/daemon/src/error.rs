//! Errors of the daemon library.

use std::path::PathBuf;

/// Errors of the daemon library. Each message is complete by itself (it is what a failed
/// device's `error` node says), so the causes are part of the message, not a source chain.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A xenstore operation failed.
    #[error("xenstore {path}: {error}")]
    Xenstore {
        /// The node or directory operated on.
        path: String,
        /// What xenstore (or the connection to it) answered.
        error: xdisk_xen::xenstore::Error,
    },
    /// No xenstore to talk to.
    #[error("cannot connect to xenstore: {0}")]
    Connect(xdisk_xen::xenstore::Error),
    /// A toolstack node is unusable (see [`crate::params::ParamsError`]).
    #[error(transparent)]
    Params(#[from] crate::params::ParamsError),
    /// The image could not be opened.
    #[error("image {path}: {error}")]
    Image {
        /// The image file (from `params`).
        path: PathBuf,
        /// Why xdisk-image refused or failed to open it.
        error: xdisk_image::Error,
    },
    /// The backend device could not start.
    #[error(transparent)]
    Backend(#[from] xdisk_backend::Error),
    /// The platform (grant mapping, event channels) is not available.
    #[error(transparent)]
    Platform(#[from] xdisk_xen::platform::PlatformError),
    /// The simulation failed.
    #[cfg(feature = "sim")]
    #[error(transparent)]
    Sim(#[from] xdisk_xensim::SimError),
    /// Something the caller asked for is not possible.
    #[error("{0}")]
    Invalid(String),
    /// Not available in this build or on this platform.
    #[error("{0}")]
    Unsupported(String),
    /// Waiting for a state timed out.
    #[error("{0}")]
    Timeout(String),
    /// The daemon is not reachable on its control socket.
    #[error("the xdisk daemon is not running (no answer on {path}: {error}); start it with `xdisk serve` or `systemctl start xdisk`")]
    NotRunning {
        /// The control socket tried.
        path: PathBuf,
        /// Why connecting failed (typically no such file, or connection refused).
        error: std::io::Error,
    },
    /// The control protocol failed.
    #[error("control socket: {0}")]
    Control(String),
    /// The device failed (its `error` node or a panic).
    #[error("{0}")]
    Device(String),
    /// System calls.
    #[error("{context}: {error}")]
    Io {
        /// What was being done (`cannot create /run/xdisk`).
        context: String,
        /// The system call's error.
        error: std::io::Error,
    },
}

impl Error {
    pub(crate) fn xs(path: &str, source: xdisk_xen::xenstore::Error) -> Error {
        Error::Xenstore {
            path: path.to_owned(),
            error: source,
        }
    }

    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Error {
        Error::Io {
            context: context.into(),
            error: source,
        }
    }
}

/// Result of the daemon library.
pub type Result<T> = std::result::Result<T, Error>;
