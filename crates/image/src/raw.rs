//! Raw images: a regular file (sparse or not) or a block device, byte for byte.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use xdisk_io::ImageFile;

use crate::{Error, Extent, InFlight, LayerStatus, Mapping, Result};

#[derive(Debug)]
pub struct RawImage {
    file: Arc<ImageFile>,
    size: AtomicU64,
}

impl RawImage {
    pub fn open(file: Arc<ImageFile>) -> Result<RawImage> {
        let size = file
            .len()
            .map_err(|e| Error::io(format!("cannot size {}", file.path().display()), e))?;
        Ok(RawImage {
            file,
            size: AtomicU64::new(size),
        })
    }

    pub fn file(&self) -> &Arc<ImageFile> {
        &self.file
    }

    pub fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    fn ctx(&self, what: &str) -> String {
        format!("{what} {}", self.file.path().display())
    }

    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.file
            .read_at(buf, offset)
            .map_err(|e| Error::io(self.ctx("read from"), e))
    }

    pub fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.file
            .write_at(buf, offset)
            .map_err(|e| Error::io(self.ctx("write to"), e))
    }

    pub fn flush(&self) -> Result<()> {
        self.file
            .flush()
            .map_err(|e| Error::io(self.ctx("flush"), e))
    }

    /// Punches a hole (regular files) or issues BLKDISCARD (block devices). A file system
    /// that cannot punch holes makes discard a no-op, as the request is only advisory.
    pub fn discard(&self, offset: u64, len: u64) -> Result<()> {
        match self.file.punch_hole(offset, len) {
            Ok(()) => Ok(()),
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EOPNOTSUPP) | Some(libc::ENOTTY) | Some(libc::EINVAL)
                ) =>
            {
                Ok(())
            }
            Err(e) => Err(Error::io(self.ctx("discard on"), e)),
        }
    }

    pub fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<()> {
        if unmap
            && !self.file.is_block_device()
            && offset.is_multiple_of(4096)
            && len.is_multiple_of(4096)
            && self.file.punch_hole(offset, len).is_ok()
        {
            return Ok(());
        }
        self.file
            .zero_range(offset, len)
            .map_err(|e| Error::io(self.ctx("write zeroes to"), e))
    }

    /// Holes of sparse files (SEEK_DATA/SEEK_HOLE) read as zero; everything else is data.
    pub fn layer_status(&self, offset: u64, len: u64) -> Result<LayerStatus> {
        let data_at = self.file.seek_data(offset);
        match data_at {
            // A hole up to the next data (or EOF).
            Some(d) if d > offset => Ok(LayerStatus::Zero {
                len: (d - offset).min(len),
            }),
            Some(_) => {
                let hole = self.file.seek_hole(offset).unwrap_or(offset + len);
                Ok(LayerStatus::Data {
                    len: hole.saturating_sub(offset).clamp(1, len),
                    offset: Some(offset),
                    compressed: false,
                })
            }
            // ENXIO: no data after offset (all hole), or SEEK_DATA unsupported: treat as data.
            None if self.file.is_block_device() => Ok(LayerStatus::Data {
                len,
                offset: Some(offset),
                compressed: false,
            }),
            None => Ok(LayerStatus::Zero { len }),
        }
    }

    pub fn resize(&self, new_size: u64) -> Result<()> {
        self.file
            .set_len(new_size)
            .map_err(|e| Error::io(self.ctx("resize"), e))?;
        self.size.store(new_size, Ordering::Release);
        Ok(())
    }

    pub fn map(&self, offset: u64, len: u64, out: &mut Vec<Extent>) -> Result<Mapping> {
        out.push(Extent::Data {
            file: self.file.clone(),
            offset,
            len,
        });
        Ok(Mapping::Mapped(InFlight::untracked()))
    }
}
