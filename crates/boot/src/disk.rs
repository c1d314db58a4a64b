//! The disk the bootloader reads: anything that can read bytes at an offset.

use std::io;
use std::sync::Arc;

/// Random-access, read-only bytes: a raw file, a qcow2 image, a block device, memory.
pub trait ReadAt: Send + Sync {
    /// Size in bytes.
    fn size(&self) -> u64;
    /// Fills `buf` from `offset`; a read that does not fit inside [0, size) is an error
    /// (`UnexpectedEof`), never a short read.
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
}

impl<T: ReadAt + ?Sized> ReadAt for Arc<T> {
    fn size(&self) -> u64 {
        (**self).size()
    }
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        (**self).read_exact_at(buf, offset)
    }
}

/// Checks that `len` bytes at `offset` fit inside `size`.
pub fn check_range(offset: u64, len: usize, size: u64) -> io::Result<()> {
    match offset.checked_add(len as u64) {
        Some(end) if end <= size => Ok(()),
        _ => Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("read of {len} bytes at {offset} is past the end ({size} bytes)"),
        )),
    }
}

/// A disk in memory (tests and fuzzing).
#[derive(Debug, Clone)]
pub struct MemDisk(pub Vec<u8>);

impl ReadAt for MemDisk {
    fn size(&self) -> u64 {
        self.0.len() as u64
    }
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        check_range(offset, buf.len(), self.size())?;
        let start = offset as usize;
        buf.copy_from_slice(&self.0[start..start + buf.len()]);
        Ok(())
    }
}

/// A regular file or block device read with `pread`.
#[derive(Debug)]
pub struct FileDisk {
    file: std::fs::File,
    size: u64,
}

impl FileDisk {
    /// A disk over `file` of `size` bytes; reads past `size` are errors. The size is given,
    /// not taken from the file's metadata (which says 0 for a block device).
    pub fn new(file: std::fs::File, size: u64) -> FileDisk {
        FileDisk { file, size }
    }
}

impl ReadAt for FileDisk {
    fn size(&self) -> u64 {
        self.size
    }
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        check_range(offset, buf.len(), self.size)?;
        self.file.read_exact_at(buf, offset)
    }
}

/// A window [start, start+len) of another disk: a partition. Reads past the window's end are
/// errors even if the disk beneath is larger; a window past the disk's end fails on read.
#[derive(Clone)]
pub struct Slice {
    inner: Arc<dyn ReadAt>,
    start: u64,
    len: u64,
}

impl Slice {
    /// The `len` bytes of `inner` from byte `start` on.
    pub fn new(inner: Arc<dyn ReadAt>, start: u64, len: u64) -> Slice {
        Slice { inner, start, len }
    }
    /// Byte offset of the window in the disk beneath.
    pub fn start(&self) -> u64 {
        self.start
    }
}

impl std::fmt::Debug for Slice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Slice({}+{})", self.start, self.len)
    }
}

impl ReadAt for Slice {
    fn size(&self) -> u64 {
        self.len
    }
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        check_range(offset, buf.len(), self.len)?;
        let abs = self
            .start
            .checked_add(offset)
            .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "offset overflows"))?;
        self.inner.read_exact_at(buf, abs)
    }
}

/// Reads `len` bytes at `offset` into a new buffer.
pub fn read_vec(disk: &dyn ReadAt, offset: u64, len: usize) -> io::Result<Vec<u8>> {
    let mut v = vec![0u8; len];
    disk.read_exact_at(&mut v, offset)?;
    Ok(v)
}
