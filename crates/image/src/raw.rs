//! Raw images: the storage's bytes, byte for byte (a regular file, sparse or not, a block
//! device, any [`xdisk_io::Storage`]).

use std::sync::atomic::{AtomicU64, Ordering};

use std::path::Path;

use xdisk_io::{Allocation, Storage, StorageRef};

use crate::create::{create_file, io_ctx, Preallocation};

use crate::{Error, Extent, InFlight, LayerStatus, Mapping, Result};

/// A raw image: virtual offset `n` is byte `n` of the storage, the virtual size is the
/// storage's size.
#[derive(Debug)]
pub struct RawImage {
    storage: StorageRef,
    size: AtomicU64,
}

impl RawImage {
    /// Opens a raw image over `storage` (reads its size).
    pub fn open(storage: StorageRef) -> Result<RawImage> {
        let size = storage
            .size()
            .map_err(|e| Error::io(format!("cannot size {}", storage.name()), e))?;
        Ok(RawImage {
            storage,
            size: AtomicU64::new(size),
        })
    }

    /// The storage holding the image.
    pub fn storage(&self) -> &StorageRef {
        &self.storage
    }

    /// Virtual size in bytes (the storage's size at open or after the last resize).
    pub fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    fn ctx(&self, what: &str) -> String {
        format!("{what} {}", self.storage.name())
    }

    /// Blocking read of `buf.len()` bytes at byte `offset`.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.storage
            .read_at(buf, offset)
            .map_err(|e| Error::io(self.ctx("read from"), e))
    }

    /// Blocking write of `buf` at byte `offset`.
    pub fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.storage
            .write_at(buf, offset)
            .map_err(|e| Error::io(self.ctx("write to"), e))
    }

    /// Flushes the storage (fdatasync for host files).
    pub fn flush(&self) -> Result<()> {
        self.storage
            .flush()
            .map_err(|e| Error::io(self.ctx("flush"), e))
    }

    /// Releases the range on the storage (regular files: a hole; block devices: BLKDISCARD).
    /// A storage that cannot discard makes it a no-op, as the request is only advisory.
    pub fn discard(&self, offset: u64, len: u64) -> Result<()> {
        match self.storage.discard(offset, len) {
            Ok(()) => Ok(()),
            Err(e)
                if e.kind() == std::io::ErrorKind::Unsupported
                    || matches!(
                        e.raw_os_error(),
                        Some(libc::EOPNOTSUPP) | Some(libc::ENOTTY) | Some(libc::EINVAL)
                    ) =>
            {
                Ok(())
            }
            Err(e) => Err(Error::io(self.ctx("discard on"), e)),
        }
    }

    /// Makes `len` bytes at `offset` read as zeroes. With `unmap`, a 4 KiB-aligned range is
    /// discarded if the storage guarantees that discarded ranges read as zeroes; otherwise
    /// the storage writes zeroes (as cheaply as it can).
    pub fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<()> {
        if unmap
            && self.storage.discard_zeroes()
            && offset.is_multiple_of(4096)
            && len.is_multiple_of(4096)
            && self.storage.discard(offset, len).is_ok()
        {
            return Ok(());
        }
        self.storage
            .write_zeroes(offset, len)
            .map_err(|e| Error::io(self.ctx("write zeroes to"), e))
    }

    /// Holes of the storage (sparse files: SEEK_DATA/SEEK_HOLE) read as zero; everything
    /// else is data.
    pub fn layer_status(&self, offset: u64, len: u64) -> Result<LayerStatus> {
        Ok(match self.storage.allocation(offset, len) {
            Allocation::Hole { len } => LayerStatus::Zero { len },
            Allocation::Data { len } => LayerStatus::Data {
                len,
                offset: Some(offset),
                compressed: false,
            },
        })
    }

    /// Sets the storage's size to `new_size` bytes (truncating or extending it).
    pub fn resize(&self, new_size: u64) -> Result<()> {
        self.storage
            .set_size(new_size)
            .map_err(|e| Error::io(self.ctx("resize"), e))?;
        self.size.store(new_size, Ordering::Release);
        Ok(())
    }

    /// Maps a range: always one data extent at the same offset of the storage, untracked
    /// (raw images never free or move data).
    pub fn map(&self, offset: u64, len: u64, out: &mut Vec<Extent>) -> Result<Mapping> {
        out.push(Extent::Data {
            storage: self.storage.clone(),
            offset,
            len,
        });
        Ok(Mapping::Mapped(InFlight::untracked()))
    }
}

/// Creates (or truncates) `path` as a raw image of `size` bytes (rounded up to 512 like
/// qemu-img). `Off` leaves it sparse; `Falloc` allocates it; `Full` writes zeroes.
pub fn create(path: &Path, size: u64, preallocation: Preallocation) -> Result<()> {
    // Refused before the file is created (or truncated).
    validate(size, preallocation)?;
    create_file(path, |file| fill(file, size, preallocation))
}

fn validate(size: u64, preallocation: Preallocation) -> Result<u64> {
    if preallocation == Preallocation::Metadata {
        return Err(Error::InvalidArgument(
            "Unsupported preallocation mode: metadata".into(),
        ));
    }
    crate::create::round_size(size)
}

/// Makes `file` a raw image of `size` bytes (rounded up to 512), as [`create`] does a file.
pub(crate) fn fill(file: &dyn Storage, size: u64, preallocation: Preallocation) -> Result<()> {
    let size = validate(size, preallocation)?;
    match preallocation {
        Preallocation::Off | Preallocation::Metadata => {
            file.set_size(size).map_err(io_ctx("setting the size"))?
        }
        Preallocation::Falloc => {
            if size > 0 {
                file.preallocate(0, size)
                    .map_err(io_ctx("allocating the file (fallocate)"))?;
            }
        }
        Preallocation::Full => {
            file.write_zeroes_by_writing(0, size)
                .map_err(io_ctx("writing zeroes"))?;
            file.set_size(size).map_err(io_ctx("setting the size"))?;
        }
    }
    file.flush().map_err(io_ctx("flushing"))
}

impl crate::FormatDriver for RawImage {
    fn format(&self) -> crate::Format {
        crate::Format::Raw
    }
    fn storage(&self) -> &StorageRef {
        RawImage::storage(self)
    }
    fn size(&self) -> u64 {
        RawImage::size(self)
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        RawImage::read_at(self, buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        RawImage::write_at(self, buf, offset)
    }
    fn flush(&self) -> Result<()> {
        RawImage::flush(self)
    }
    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        RawImage::discard(self, offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<()> {
        RawImage::write_zeroes(self, offset, len, unmap)
    }
    fn layer_status(&self, offset: u64, len: u64) -> Result<LayerStatus> {
        RawImage::layer_status(self, offset, len)
    }
    fn map(&self, offset: u64, len: u64, _write: bool, out: &mut Vec<Extent>) -> Result<Mapping> {
        RawImage::map(self, offset, len, out)
    }
    fn resize(&self, new_size: u64) -> Result<()> {
        RawImage::resize(self, new_size)
    }
    fn refresh_size(&self) -> Result<Option<u64>> {
        let now = self
            .storage
            .size()
            .map_err(|e| Error::io(self.ctx("cannot size"), e))?;
        let was = self.size.swap(now, Ordering::AcqRel);
        Ok((was != now).then_some(now))
    }
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}
