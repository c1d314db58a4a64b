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

pub mod buf;
pub mod cache;
pub mod engine;
pub mod file;
pub mod slab;
pub mod storage;
pub mod sys;

#[cfg(feature = "fault-injection")]
pub use engine::fault;

pub use buf::{AlignedBuf, IoBuf, IoSlice};
pub use cache::{AioKind, CacheMode};
pub use engine::{open_engine, Completion, Engine, EngineConfig, Op, OpKind};
pub use file::{Alignment, ImageFile};
pub use slab::Slab;
pub use storage::{same_storage, Allocation, MemEngine, MemStorage, Storage, StorageRef};

/// Errors of this crate (I/O errors keep their `std::io::Error`).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid {kind} '{value}' (expected one of: {expected})")]
    InvalidChoice {
        kind: &'static str,
        value: String,
        expected: &'static str,
    },
    #[error("engine queue full ({capacity} operations in flight)")]
    QueueFull { capacity: usize },
}

pub type Result<T> = std::result::Result<T, Error>;
