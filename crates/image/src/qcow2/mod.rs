//! qcow2 images (QEMU's `docs/interop/qcow2.txt`), v2 and v3.
//!
//! PLACEHOLDER ENGINE: the API below is fixed; the implementation is being written.

pub mod check;
pub mod create;
pub mod format;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use xdisk_io::ImageFile;

use crate::{Error, Extent, Image, InFlight, LayerStatus, Mapping, OpenOptions, Result};

/// Counts fast-path I/O in flight per epoch, so that host clusters freed while older I/O may
/// still be in flight are reused only once that I/O is done (see [`InFlight`]).
///
/// Two epochs alternate. `enter` tags a guard with the current epoch. A free calls
/// [`InFlightTracker::quarantine`], which flips the epoch; the clusters it freed become
/// reusable when [`InFlightTracker::drained`] reports the old epoch empty.
#[derive(Debug, Default)]
pub struct InFlightTracker {
    epoch: AtomicUsize,
    count: [AtomicUsize; 2],
    flips: Mutex<()>,
}

impl InFlightTracker {
    /// Registers one in-flight fast-path I/O.
    pub fn enter(self: &Arc<Self>) -> InFlight {
        loop {
            let e = self.epoch.load(Ordering::Acquire);
            self.count[e & 1].fetch_add(1, Ordering::AcqRel);
            // Re-check: if the epoch flipped meanwhile, retry in the new one so that a
            // quarantine that already looked at the old counter cannot miss us.
            if self.epoch.load(Ordering::Acquire) == e {
                return InFlight {
                    tracker: Some(self.clone()),
                    epoch: e,
                };
            }
            self.count[e & 1].fetch_sub(1, Ordering::AcqRel);
        }
    }

    pub(crate) fn release(&self, epoch: usize) {
        self.count[epoch & 1].fetch_sub(1, Ordering::AcqRel);
    }

    /// Starts a new epoch; returns the epoch whose I/O must drain before clusters freed now
    /// may be reused.
    pub fn quarantine(&self) -> usize {
        let _g = self.flips.lock().unwrap_or_else(|e| e.into_inner());
        self.epoch.fetch_add(1, Ordering::AcqRel)
    }

    /// Whether all I/O of `epoch` (and older) has completed.
    pub fn drained(&self, epoch: usize) -> bool {
        let now = self.epoch.load(Ordering::Acquire);
        if now > epoch + 1 {
            // Both counters have been reused since; the caller must have seen them drain
            // (quarantine is only consulted for the last two epochs).
            return self.count[0].load(Ordering::Acquire) == 0
                && self.count[1].load(Ordering::Acquire) == 0;
        }
        self.count[epoch & 1].load(Ordering::Acquire) == 0
    }
}

/// An open qcow2 image.
#[derive(Debug)]
pub struct Qcow2Image {
    file: Arc<ImageFile>,
    backing: Option<Arc<Image>>,
}

impl Qcow2Image {
    /// Opens a qcow2 image. `open_backing` opens the backing file named in the header
    /// (name as written, backing format if the extension is present); `None` leaves the
    /// chain closed (unallocated clusters read as zeroes).
    pub fn open(
        file: Arc<ImageFile>,
        _opts: &OpenOptions,
        _read_only: bool,
        _open_backing: Option<&mut dyn FnMut(&str, Option<&str>) -> Result<Arc<Image>>>,
    ) -> Result<Qcow2Image> {
        let _ = &file;
        Err(Error::Unsupported("qcow2 engine not built yet".into()))
    }

    pub fn file(&self) -> &Arc<ImageFile> {
        &self.file
    }
    pub fn backing(&self) -> Option<&Arc<Image>> {
        self.backing.as_ref()
    }
    pub fn size(&self) -> u64 {
        0
    }
    pub fn read_at(&self, _buf: &mut [u8], _offset: u64) -> Result<()> {
        Err(Error::Unsupported("qcow2".into()))
    }
    pub fn write_at(&self, _buf: &[u8], _offset: u64) -> Result<()> {
        Err(Error::Unsupported("qcow2".into()))
    }
    pub fn flush(&self) -> Result<()> {
        Err(Error::Unsupported("qcow2".into()))
    }
    pub fn discard(&self, _offset: u64, _len: u64) -> Result<()> {
        Err(Error::Unsupported("qcow2".into()))
    }
    pub fn write_zeroes(&self, _offset: u64, _len: u64, _unmap: bool) -> Result<()> {
        Err(Error::Unsupported("qcow2".into()))
    }
    pub fn layer_status(&self, _offset: u64, _len: u64) -> Result<LayerStatus> {
        Err(Error::Unsupported("qcow2".into()))
    }
    pub fn resize(&self, _new_size: u64) -> Result<()> {
        Err(Error::Unsupported("qcow2".into()))
    }
    pub fn map(
        &self,
        _offset: u64,
        _len: u64,
        _write: bool,
        _out: &mut Vec<Extent>,
    ) -> Result<Mapping> {
        Ok(Mapping::Slow)
    }
    pub fn close(&self) -> Result<()> {
        Ok(())
    }
}
