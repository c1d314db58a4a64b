//! Grant mappings the backend holds, counted.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use xdisk_blkif::mem::{MemError, SharedMem};
use xdisk_blkif::wire::PAGE_SIZE;
use xdisk_xen::platform::{DomId, GrantMapper, GrantRef, MappedRegion, PlatformError};

use crate::stats::{add, sub, Counters};

/// A mapping that keeps the device's `mappings` counter (in pages) up to date: incremented
/// when mapped, decremented when the last reference is dropped (and the platform unmaps).
pub(crate) struct Counted {
    inner: Arc<dyn MappedRegion>,
    counters: Arc<Counters>,
    pages: u64,
}

impl Drop for Counted {
    fn drop(&mut self) {
        sub(&self.counters.mappings, self.pages);
    }
}

impl SharedMem for Counted {
    fn size(&self) -> usize {
        self.inner.size()
    }
    fn read_u32_volatile(&self, offset: usize) -> Result<u32, MemError> {
        self.inner.read_u32_volatile(offset)
    }
    fn write_u32_volatile(&self, offset: usize, value: u32) -> Result<(), MemError> {
        self.inner.write_u32_volatile(offset, value)
    }
    fn copy_from(&self, offset: usize, dst: &mut [u8]) -> Result<(), MemError> {
        self.inner.copy_from(offset, dst)
    }
    fn copy_to(&self, offset: usize, src: &[u8]) -> Result<(), MemError> {
        self.inner.copy_to(offset, src)
    }
}

impl MappedRegion for Counted {
    fn writable(&self) -> bool {
        self.inner.writable()
    }
    fn io_base(&self) -> *mut u8 {
        self.inner.io_base()
    }
}

/// Maps `refs` of `domid` through `gnt` and counts the pages in `counters.mappings`.
pub(crate) fn map_counted(
    gnt: &dyn GrantMapper,
    counters: &Arc<Counters>,
    domid: DomId,
    refs: &[GrantRef],
    writable: bool,
) -> Result<Arc<dyn MappedRegion>, PlatformError> {
    // The per-device cap (DeviceConfig::max_mapped_grants; 0: none), checked before mapping.
    let max = counters.max_mappings.load(Ordering::Relaxed);
    let want = refs.len() as u64;
    if max != 0
        && counters
            .mappings
            .load(Ordering::Relaxed)
            .saturating_add(want)
            > max
    {
        return Err(PlatformError::Io {
            context: format!("the device already holds its limit of {max} grant mappings"),
            source: std::io::Error::from(std::io::ErrorKind::OutOfMemory),
        });
    }
    let inner = gnt.map(domid, refs, writable)?;
    let pages = (inner.size() / PAGE_SIZE) as u64;
    add(&counters.mappings, pages);
    Ok(Arc::new(Counted {
        inner,
        counters: counters.clone(),
        pages,
    }))
}
