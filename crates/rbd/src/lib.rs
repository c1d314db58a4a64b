//! xdisk's Ceph RBD storage: an RBD image as an xdisk [`Storage`](xdisk_io::Storage), so
//! that every format (raw, qcow2) runs over it and every command that takes a disk name
//! takes `rbd:POOL/[NAMESPACE/]IMAGE[@SNAP][:KEY=VALUE...]` ([`name`], QEMU's spelling).
//!
//! Design:
//! - librbd itself (the C API of Debian's librbd1, Ceph 16), through a small FFI module
//!   (`ffi`, the only unsafe code) declaring the functions used.
//! - One cluster connection per set of connection settings and one open image per image
//!   (pool, namespace, name, snapshot, mode) per process, shared by every storage and
//!   queue that names it (a registry of weak handles): several queues of a Xen disk, or
//!   several NBD exports, drive one librbd image.
//! - The synchronous [`Storage`](xdisk_io::Storage) methods (metadata, slow path, tools)
//!   start librbd's asynchronous calls and wait for them up to the deadline (librbd's
//!   blocking functions without one); an image queue's data path is an [`RbdEngine`]
//!   (`rbd_aio_readv/writev/flush/discard/write_zeroes`, completions handed to the queue's
//!   reactor through its eventfd, no thread per request).
//! - Semantics as QEMU's rbd driver: writes past the end grow the image; snapshots are
//!   read-only; librbd's cache unless cache=none/directsync; block status from
//!   `rbd_diff_iterate2` over a valid fast-diff object map (else everything is data).
//! - Bounded waits: unless the ceph.conf or the name sets them, connections get
//!   [`DEFAULT_TIMEOUTS`] (OSD and monitor operations, mounting), so a cluster that goes
//!   away makes requests fail with ETIMEDOUT rather than hang; and each request has a
//!   deadline of its own (`xdisk_deadline`, [`DEFAULT_DEADLINE`]) past which it fails with
//!   ETIMEDOUT whatever librbd does (a full pool makes librbd wait out one RADOS timeout per
//!   operation inside a request, or forever without them), while librbd keeps a bounce
//!   buffer of its own until it completes the request.

#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod create;
mod deadline;
mod engine;
mod ffi;
pub mod name;
pub mod secret;
mod storage;
#[cfg(feature = "test-cluster")]
pub mod testing;

use std::io;

pub use create::CreateOptions;
pub use engine::RbdEngine;
pub use name::{
    is_rbd_name, CipherAlg, Encryption, KeySource, LuksFormat, NameError, RbdName, DEFAULT_DEADLINE,
};
pub use secret::{register_secret, secret as registered_secret, Passphrase};
pub use storage::{RbdStorage, DEFAULT_TIMEOUTS};

/// Errors of opening or creating an RBD image.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A malformed `rbd:` name.
    #[error("bad RBD name {name}: {why}")]
    Name {
        /// The name as given.
        name: String,
        /// What is wrong with it.
        why: String,
    },
    /// librados or librbd failed.
    #[error("{what}: {source}")]
    Rados {
        /// What failed, on which image.
        what: String,
        /// The error librados/librbd returned.
        #[source]
        source: io::Error,
    },
    /// A snapshot opened for writing.
    #[error("{0}: RBD snapshots are read-only")]
    SnapshotReadOnly(String),
    /// The image to create exists.
    #[error("{0} exists already")]
    Exists(String),
    /// The passphrase of an encrypted image cannot be had (an unreadable key file, an
    /// unknown secret), or the encryption asked for is refused.
    #[error("{name}: {why}")]
    Encryption {
        /// The name (secrets hidden).
        name: String,
        /// Why.
        why: String,
    },
    /// An image that starts with a LUKS header opened without `encrypt.*` (it would read
    /// as ciphertext).
    #[error("{name} is encrypted (it starts with a {} header): open it with :encrypt.format={}:encrypt.key-file=PATH (librbd's encryption, as QEMU's encrypt.* options), or add :xdisk_luks=raw to read the LUKS volume as stored (one that its guest encrypted itself)", if *format == LuksFormat::Luks1 { "LUKS1" } else { "LUKS2" }, format.as_str())]
    Encrypted {
        /// The name (secrets hidden).
        name: String,
        /// The LUKS version of the header.
        format: LuksFormat,
    },
}

impl Error {
    /// The OS error underneath, if any (ENOENT for a missing image or pool...).
    pub fn os_error(&self) -> Option<i32> {
        match self {
            Error::Rados { source, .. } => source.raw_os_error(),
            Error::Exists(_) => Some(libc::EEXIST),
            Error::SnapshotReadOnly(_) => Some(libc::EROFS),
            Error::Name { .. } | Error::Encryption { .. } => Some(libc::EINVAL),
            Error::Encrypted { .. } => Some(libc::EACCES),
        }
    }
}
