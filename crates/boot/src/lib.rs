//! xdisk-boot: what a PV bootloader (pygrub) does, as a library: find the filesystems on a
//! guest disk ([`part`]), read them without mounting ([`fs`]), parse the boot configs found
//! there ([`config`]), and pick the kernel, ramdisk and command line ([`find`]).
//!
//! Everything here reads guest-controlled data: every length is checked before it is used,
//! every walk is bounded ([`Limits`]), and errors are values ([`Error`]), never panics.
//! The library does no I/O of its own beyond the [`disk::ReadAt`] it is given, so it runs over
//! raw files, qcow2 images (through xdisk-image, in the CLI) and plain memory (tests, fuzzing).

#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod bytes;
pub mod config;
pub mod disk;
mod error;
pub mod find;
pub mod fs;
pub mod part;

pub use error::{Error, Result};

/// Bounds on what guest data may make us do.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest kernel or ramdisk we copy out (checked against the file's size before reading).
    /// pygrub uses 128 MiB when deprivileged; libxc refuses more than 1 GiB.
    pub max_file: u64,
    /// Largest boot config (grub.cfg, extlinux.conf, menu.lst, a BLS entry, grubenv) we read.
    pub max_config: u64,
    /// Most entries we read from one directory.
    pub max_dir_entries: usize,
    /// Most symbolic links followed while resolving one path (Linux: 40).
    pub max_symlinks: u32,
    /// Most components in one path (after symlink expansion).
    pub max_path_components: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_file: 256 << 20,
            max_config: 1 << 20,
            max_dir_entries: 4096,
            max_symlinks: 40,
            max_path_components: 256,
        }
    }
}
