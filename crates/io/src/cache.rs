//! Cache modes and AIO engine names, spelled as QEMU spells them (`-drive cache=...,aio=...`).

use std::fmt;
use std::str::FromStr;

/// QEMU's cache modes (`man qemu`, "cache=").
///
/// | mode         | O_DIRECT | O_DSYNC | flush honoured |
/// |--------------|----------|---------|----------------|
/// | none         | yes      | no      | yes            |
/// | directsync   | yes      | yes     | yes            |
/// | writethrough | no       | yes     | yes            |
/// | writeback    | no       | no      | yes            |
/// | unsafe       | no       | no      | no (ignored)   |
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CacheMode {
    /// `cache=none` (the default): O_DIRECT, flushes honoured. Also accepts `off`.
    #[default]
    None,
    /// `cache=directsync`: O_DIRECT and O_DSYNC.
    DirectSync,
    /// `cache=writethrough`: host page cache, O_DSYNC.
    WriteThrough,
    /// `cache=writeback`: host page cache, durable only after a flush.
    WriteBack,
    /// `cache=unsafe`: host page cache, flushes ignored.
    Unsafe,
}

impl CacheMode {
    /// The accepted names, for error and help messages.
    pub const ALL: &'static str = "none, directsync, writethrough, writeback, unsafe";

    /// Opened with O_DIRECT (bypasses the host page cache).
    pub fn direct(self) -> bool {
        matches!(self, CacheMode::None | CacheMode::DirectSync)
    }
    /// Opened with O_DSYNC (every write is durable when it completes).
    pub fn dsync(self) -> bool {
        matches!(self, CacheMode::DirectSync | CacheMode::WriteThrough)
    }
    /// Flush requests are honoured (fdatasync); `unsafe` ignores them.
    pub fn honours_flush(self) -> bool {
        !matches!(self, CacheMode::Unsafe)
    }
    /// The name as QEMU spells it (what [`Display`](fmt::Display) prints and `parse` accepts).
    pub fn as_str(self) -> &'static str {
        match self {
            CacheMode::None => "none",
            CacheMode::DirectSync => "directsync",
            CacheMode::WriteThrough => "writethrough",
            CacheMode::WriteBack => "writeback",
            CacheMode::Unsafe => "unsafe",
        }
    }
}

impl FromStr for CacheMode {
    type Err = crate::Error;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "none" | "off" => CacheMode::None,
            "directsync" => CacheMode::DirectSync,
            "writethrough" => CacheMode::WriteThrough,
            "writeback" => CacheMode::WriteBack,
            "unsafe" => CacheMode::Unsafe,
            _ => {
                return Err(crate::Error::InvalidChoice {
                    kind: "cache mode",
                    value: s.to_string(),
                    expected: Self::ALL,
                })
            }
        })
    }
}

impl fmt::Display for CacheMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Asynchronous I/O engine, as QEMU's `aio=` spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AioKind {
    /// `aio=io_uring` (the default): io_uring. Also accepts `io-uring` and `uring`.
    #[default]
    IoUring,
    /// `aio=native`: Linux native AIO (io_submit/io_getevents).
    Native,
    /// `aio=threads`: blocking syscalls on a pool of worker threads.
    Threads,
}

impl AioKind {
    /// The accepted names, for error and help messages.
    pub const ALL: &'static str = "io_uring, native, threads";
    /// The name as QEMU spells it (what [`Display`](fmt::Display) prints and `parse` accepts).
    pub fn as_str(self) -> &'static str {
        match self {
            AioKind::IoUring => "io_uring",
            AioKind::Native => "native",
            AioKind::Threads => "threads",
        }
    }
}

impl FromStr for AioKind {
    type Err = crate::Error;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "io_uring" | "io-uring" | "uring" => AioKind::IoUring,
            "native" => AioKind::Native,
            "threads" => AioKind::Threads,
            _ => {
                return Err(crate::Error::InvalidChoice {
                    kind: "aio engine",
                    value: s.to_string(),
                    expected: Self::ALL,
                })
            }
        })
    }
}

impl fmt::Display for AioKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_modes_match_qemu_semantics() {
        assert!(CacheMode::None.direct() && !CacheMode::None.dsync());
        assert!(CacheMode::DirectSync.direct() && CacheMode::DirectSync.dsync());
        assert!(!CacheMode::WriteThrough.direct() && CacheMode::WriteThrough.dsync());
        assert!(!CacheMode::WriteBack.direct() && CacheMode::WriteBack.honours_flush());
        assert!(!CacheMode::Unsafe.honours_flush());
        for m in ["none", "directsync", "writethrough", "writeback", "unsafe"] {
            assert_eq!(m.parse::<CacheMode>().unwrap().as_str(), m);
        }
        assert!("bogus".parse::<CacheMode>().is_err());
        for a in ["io_uring", "native", "threads"] {
            assert_eq!(a.parse::<AioKind>().unwrap().as_str(), a);
        }
    }
}
