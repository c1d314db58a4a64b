/// Errors of the bootloader library. Each prints as one line meant for the administrator.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    /// A path (inside the guest filesystem) that does not exist.
    #[error("{0}: no such file or directory")]
    NotFound(String),
    #[error("{0}: not a regular file")]
    NotAFile(String),
    #[error("{0}: not a directory")]
    NotADirectory(String),
    #[error("{path}: {size} bytes is over the limit of {limit} bytes")]
    TooLarge { path: String, size: u64, limit: u64 },
    #[error("{0}: too many levels of symbolic links")]
    SymlinkLoop(String),
    /// On-disk structures that do not make sense (a hostile or damaged image).
    #[error("{fs}: corrupt: {what}")]
    Corrupt { fs: &'static str, what: String },
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
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Error {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    pub fn corrupt(fs: &'static str, what: impl Into<String>) -> Error {
        Error::Corrupt {
            fs,
            what: what.into(),
        }
    }
}

pub type Result<T> = std::result::Result<T, Error>;
