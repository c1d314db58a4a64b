//! I/O engines for xdisk.
//!
//! Two layers:
//! - [`ImageFile`]: one open host file (or block device) with its cache mode and its O_DIRECT
//!   alignment probed at open, plus *synchronous* positional I/O that accepts any alignment
//!   (bouncing through aligned buffers, read-modify-write for unaligned writes). The image
//!   engine's metadata path and every slow path use it.
//! - [`Engine`]: an asynchronous submission/completion engine, one per queue/thread, no locks on
//!   the hot path. Implementations: io_uring ([`AioKind::IoUring`], the default), Linux native AIO
//!   ([`AioKind::Native`]) and a thread pool ([`AioKind::Threads`]). In-flight operations *own*
//!   their buffers ([`IoBuf`]) until their completion hands them back.
//!
//! - [`Storage`]: where an image's bytes live, the trait formats read and write through
//!   ([`ImageFile`] and [`MemStorage`] implement it); a storage without a file descriptor
//!   brings its own engine.
//!
//! All `unsafe` in this crate lives in small modules that talk to the kernel (io_uring, AIO
//! syscalls, ioctls, aligned allocation), each block with a `// SAFETY:` comment.
//! `unsafe` is denied crate-wide; those modules (`buf`, `sys`, the `engine` back ends) allow it,
//! and so does the one function of `file` that probes O_DIRECT alignment with pread(2).

#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod buf;
pub mod cache;
pub mod engine;
pub mod file;
pub mod slab;
pub mod storage;
pub mod sys;

#[cfg(feature = "fault-injection")]
pub use engine::fault;

pub use buf::{is_zero, AlignedBuf, IoBuf, IoSlice};
pub use cache::{AioKind, CacheMode};
pub use engine::{open_engine, Completion, Engine, EngineConfig, Op, OpKind, Phase};
pub use file::{Alignment, ImageFile};
pub use slab::Slab;
pub use storage::{same_storage, Allocation, MemEngine, MemStorage, Storage, StorageRef};

/// Errors of this crate (I/O errors keep their `std::io::Error`).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An OS error, with what we were doing when it happened.
    #[error("{what}: {source}")]
    Io {
        /// What failed and on which file, e.g. `cannot open /path/to/disk.img`.
        what: String,
        /// The OS error itself.
        #[source]
        source: std::io::Error,
    },
    /// A name that is not one of a fixed set of choices (a cache mode, an aio engine).
    #[error("invalid {kind} '{value}' (expected one of: {expected})")]
    InvalidChoice {
        /// What was being parsed (`"cache mode"`, `"aio engine"`).
        kind: &'static str,
        /// The string given.
        value: String,
        /// The accepted spellings, comma-separated (e.g. [`CacheMode::ALL`]).
        expected: &'static str,
    },
    /// An engine already has as many operations in flight as it can hold; the engines hand
    /// it back from `submit` wrapped in an `io::Error` of kind `WouldBlock`.
    #[error("engine queue full ({capacity} operations in flight)")]
    QueueFull {
        /// The engine's capacity (operations in flight).
        capacity: usize,
    },
}

/// `Result` with this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;
