/// Errors of the bootloader library. Each prints as one line meant for the administrator.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading the disk failed (including a structure that points past its end:
    /// `UnexpectedEof` from [`crate::disk::ReadAt`]).
    #[error("{context}: {source}")]
    Io {
        /// What was being read, e.g. `xfs: reading the superblock`.
        context: String,
        /// The error of the [`crate::disk::ReadAt`].
        #[source]
        source: std::io::Error,
    },
    /// A path (inside the guest filesystem) that does not exist.
    #[error("{0}: no such file or directory")]
    NotFound(String),
    /// A path that was to be read as a file but names something else (a directory...).
    #[error("{0}: not a regular file")]
    NotAFile(String),
    /// A path that was to be listed, or walked through, but is not a directory.
    #[error("{0}: not a directory")]
    NotADirectory(String),
    /// A file larger than the limit it was read with ([`crate::Limits::max_file`],
    /// [`crate::Limits::max_config`]); refused from its size, before any data is read.
    #[error("{path}: {size} bytes is over the limit of {limit} bytes")]
    TooLarge {
        /// The file's path inside the guest filesystem.
        path: String,
        /// Its size in bytes, as the filesystem records it.
        size: u64,
        /// The limit in bytes.
        limit: u64,
    },
    /// Resolving a path followed more symbolic links, or walked more components, than
    /// [`crate::Limits`] allows (a loop, or a hostile image).
    #[error("{0}: too many levels of symbolic links")]
    SymlinkLoop(String),
    /// On-disk structures that do not make sense (a hostile or damaged image).
    #[error("{fs}: corrupt: {what}")]
    Corrupt {
        /// Which reader found it (`"ext4"`, `"fat"`, `"iso9660"`, `"xfs"`, ...).
        fs: &'static str,
        /// What is wrong.
        what: String,
    },
    /// Valid on-disk data that this library does not read (a filesystem feature or version,
    /// a path too deep).
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// A boot configuration that cannot be used.
    #[error("{0}")]
    Config(String),
    /// Nothing on the disk yielded a kernel.
    #[error("{0}")]
    NoBoot(String),
}

impl Error {
    /// An [`Error::Io`]: `source`, while doing `context`.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Error {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    /// An [`Error::Corrupt`] found by the reader of `fs`.
    pub fn corrupt(fs: &'static str, what: impl Into<String>) -> Error {
        Error::Corrupt {
            fs,
            what: what.into(),
        }
    }
}

/// `Result` with this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;
