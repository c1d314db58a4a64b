//! The format layer: what one format (raw, qcow2, ...) does for one layer of an image.
//!
//! [`crate::Image`] holds a `Box<dyn FormatDriver>` and adds what is the same for every
//! format (range and read-only checks, composing block status down the backing chain). A new
//! format implements this trait, gets a variant of [`crate::Format`], a probe in
//! [`crate::probe_format`], an arm in the open and create entry points
//! (`Image::open_layer`, [`crate::create::create`]), and nothing else changes: the backend,
//! the daemon and the CLI only see `Image`.
//!
//! Methods get ranges already checked against the virtual size and, for writes, against a
//! read-only or broken storage.

use std::any::Any;
use std::fmt;
use std::sync::Arc;

use xdisk_io::StorageRef;

use crate::{Error, Extent, Format, Image, LayerStatus, Mapping, Result};

/// One format's implementation of one image layer.
pub trait FormatDriver: Send + Sync + fmt::Debug + Any {
    /// Which format this is.
    fn format(&self) -> Format;
    /// The storage the layer's bytes live on.
    fn storage(&self) -> &StorageRef;
    /// Virtual size in bytes.
    fn size(&self) -> u64;
    /// The backing image, if the format has one and it was opened.
    fn backing(&self) -> Option<&Arc<Image>> {
        None
    }
    /// Blocking read (reads what the backing chain holds where this layer has nothing).
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()>;
    /// Blocking write.
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()>;
    /// Makes every completed write durable (metadata included).
    fn flush(&self) -> Result<()>;
    /// Discards a range (see [`Image::discard`]).
    fn discard(&self, offset: u64, len: u64) -> Result<()>;
    /// Makes a range read as zeroes (see [`Image::write_zeroes`]).
    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<()>;
    /// Status of this layer only, for the first run at `offset`.
    fn layer_status(&self, offset: u64, len: u64) -> Result<LayerStatus>;
    /// Fast-path mapping (see [`Image::map`]).
    fn map(&self, offset: u64, len: u64, write: bool, out: &mut Vec<Extent>) -> Result<Mapping>;
    /// Changes the virtual size.
    fn resize(&self, new_size: u64) -> Result<()>;
    /// Takes up a size change of the storage made elsewhere (see [`Image::refresh_size`]);
    /// the new virtual size if it changed. Formats whose size is in their metadata answer
    /// `None`.
    fn refresh_size(&self) -> Result<Option<u64>> {
        Ok(None)
    }
    /// Writes back metadata kept in memory (see [`Image::write_back_metadata`]).
    fn write_back_metadata(&self) -> Result<()> {
        Ok(())
    }
    /// Flushes and releases what the format keeps open (see [`Image::close`]).
    fn close(&self) -> Result<()> {
        Ok(())
    }
    /// The allocation unit, for formats that have one.
    fn cluster_size(&self) -> Option<u64> {
        None
    }
    /// The unit in which discards release space (see [`Image::discard_granularity`]).
    fn discard_granularity(&self) -> u32 {
        4096
    }
    /// Stores guest cluster `cluster` compressed, for formats that can (see
    /// [`Image::write_compressed_cluster`]).
    fn write_compressed_cluster(&self, cluster: u64, data: &[u8]) -> Result<bool> {
        let _ = (cluster, data);
        Err(Error::Unsupported(format!(
            "compressed writes need a qcow2 image ({} images cannot be compressed)",
            self.format()
        )))
    }
    /// What `img info` shows of this layer's format.
    fn info(&self) -> FormatInfo {
        FormatInfo::default()
    }
    /// The driver as `Any`, for tools and tests that need one format's own methods
    /// (see [`Image::as_qcow2`]).
    fn as_any(&self) -> &dyn Any;
}

/// Facts of one layer's format, as `qemu-img info` reports them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FormatInfo {
    /// The allocation unit.
    pub cluster_size: Option<u64>,
    /// Whether the image needs repair before it can be trusted (qcow2's dirty bit).
    pub dirty: bool,
    /// The backing file as the image names it.
    pub backing_file: Option<String>,
    /// The backing file's format as the image names it.
    pub backing_format: Option<String>,
    /// Format-specific facts, in `qemu-img info --output=json`'s `format-specific.data`
    /// spelling (key, value), values as JSON text.
    pub specific: Vec<(&'static str, String)>,
    /// Internal snapshots.
    pub snapshots: Vec<SnapshotInfo>,
}

/// One internal snapshot, as `qemu-img info` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotInfo {
    /// Its ID.
    pub id: String,
    /// Its name.
    pub name: String,
    /// Size of the saved VM state.
    pub vm_state_size: u64,
    /// Creation time (seconds and nanoseconds since the epoch).
    pub date_sec: u64,
    /// Nanoseconds part of the creation time.
    pub date_nsec: u64,
    /// Guest clock at creation, in nanoseconds.
    pub vm_clock_nsec: u64,
}
