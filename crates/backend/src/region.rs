//! Grant mappings the backend holds, counted.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use xdisk_blkif::mem::{check_bounds, MemError, SharedMem};
use xdisk_blkif::wire::PAGE_SIZE;
use xdisk_xen::platform::{page_span, DomId, GrantMapper, GrantRef, MappedRegion, PlatformError};

use crate::stats::{add, sub, Counters};

/// A mapping that keeps the device's `mappings` counter (in pages) up to date: incremented
/// when mapped, decremented when the last reference is dropped, *after* the platform unmapped.
pub(crate) struct Counted {
    // Fields drop in declaration order: the mapping goes first, then the count. Decrementing
    // first let a reader see 0 mappings while a (slow) unmap was still under way, and a
    // frontend that trusted it found its grants still in use.
    inner: Arc<dyn MappedRegion>,
    count: PagesCounted,
}

/// The pages of one mapping in `Counters::mappings`, given back when detached and on drop.
struct PagesCounted {
    counters: Arc<Counters>,
    pages: AtomicU64,
}

impl Drop for PagesCounted {
    fn drop(&mut self) {
        sub(&self.counters.mappings, *self.pages.get_mut());
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
    fn can_detach(&self, offset: usize, len: usize) -> bool {
        self.inner.can_detach(offset, len)
    }
    /// Detaches, and gives the pages detached now back to the `mappings` counter (they hold
    /// no grant any more).
    fn detach(&self, offset: usize, len: usize) -> Result<(), PlatformError> {
        let (first, end) = page_span(offset, len, self.size())?;
        let mapped = || {
            (first..end)
                .filter(|&p| !self.inner.is_detached(p * PAGE_SIZE, PAGE_SIZE))
                .count() as u64
        };
        let before = mapped();
        let r = self.inner.detach(offset, len);
        let gone = before - mapped();
        if gone > 0 {
            self.count.pages.fetch_sub(gone, Ordering::Relaxed);
            sub(&self.count.counters.mappings, gone);
            add(&self.count.counters.detached_pages, gone);
        }
        r
    }
    fn is_detached(&self, offset: usize, len: usize) -> bool {
        self.inner.is_detached(offset, len)
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
        count: PagesCounted {
            counters: counters.clone(),
            pages: AtomicU64::new(pages),
        },
    }))
}

/// One page of a mapping of several (a view: the mapping stays until the last view of it
/// goes). Persistent grants first seen together are mapped together, one `gntdev` map and
/// `mmap` for all, and cached page by page ([`crate::datapath::PersistentCache`]).
pub(crate) struct PageOf {
    region: Arc<dyn MappedRegion>,
    /// Byte offset of the page in `region`.
    base: usize,
}

impl PageOf {
    /// Page `page` of `region`; `None` if the region has no such page.
    pub fn new(region: Arc<dyn MappedRegion>, page: usize) -> Option<PageOf> {
        let base = page.checked_mul(PAGE_SIZE)?;
        if base.checked_add(PAGE_SIZE)? > region.size() {
            return None;
        }
        Some(PageOf { region, base })
    }
}

impl SharedMem for PageOf {
    fn size(&self) -> usize {
        PAGE_SIZE
    }
    fn read_u32_volatile(&self, offset: usize) -> Result<u32, MemError> {
        check_bounds(offset, 4, PAGE_SIZE)?;
        self.region.read_u32_volatile(self.base + offset)
    }
    fn write_u32_volatile(&self, offset: usize, value: u32) -> Result<(), MemError> {
        check_bounds(offset, 4, PAGE_SIZE)?;
        self.region.write_u32_volatile(self.base + offset, value)
    }
    fn copy_from(&self, offset: usize, dst: &mut [u8]) -> Result<(), MemError> {
        check_bounds(offset, dst.len(), PAGE_SIZE)?;
        self.region.copy_from(self.base + offset, dst)
    }
    fn copy_to(&self, offset: usize, src: &[u8]) -> Result<(), MemError> {
        check_bounds(offset, src.len(), PAGE_SIZE)?;
        self.region.copy_to(self.base + offset, src)
    }
}

impl MappedRegion for PageOf {
    fn writable(&self) -> bool {
        self.region.writable()
    }
    fn io_base(&self) -> *mut u8 {
        // In bounds of the region (checked by `new`); only handed to the kernel.
        self.region.io_base().wrapping_add(self.base)
    }
    fn can_detach(&self, offset: usize, len: usize) -> bool {
        check_bounds(offset, len, PAGE_SIZE).is_ok() && self.region.can_detach(self.base, PAGE_SIZE)
    }
    /// Detaches this page of the mapping (the others stay).
    fn detach(&self, offset: usize, len: usize) -> Result<(), PlatformError> {
        check_bounds(offset, len, PAGE_SIZE)?;
        self.region.detach(self.base, PAGE_SIZE)
    }
    fn is_detached(&self, _offset: usize, _len: usize) -> bool {
        self.region.is_detached(self.base, PAGE_SIZE)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicU64;

    use xdisk_xen::platform::GrantCopyOp;

    use super::*;

    /// A one-page region that records, when it is unmapped (dropped), what the device's
    /// counter said at that moment.
    struct Page {
        counters: Arc<Counters>,
        seen_at_unmap: Arc<AtomicU64>,
    }

    impl Drop for Page {
        fn drop(&mut self) {
            let n = self.counters.mappings.load(Ordering::SeqCst);
            self.seen_at_unmap.store(n, Ordering::SeqCst);
        }
    }

    impl SharedMem for Page {
        fn size(&self) -> usize {
            PAGE_SIZE
        }
        fn read_u32_volatile(&self, _: usize) -> Result<u32, MemError> {
            Ok(0)
        }
        fn write_u32_volatile(&self, _: usize, _: u32) -> Result<(), MemError> {
            Ok(())
        }
        fn copy_from(&self, _: usize, _: &mut [u8]) -> Result<(), MemError> {
            Ok(())
        }
        fn copy_to(&self, _: usize, _: &[u8]) -> Result<(), MemError> {
            Ok(())
        }
    }

    impl MappedRegion for Page {
        fn writable(&self) -> bool {
            true
        }
        fn io_base(&self) -> *mut u8 {
            std::ptr::null_mut()
        }
    }

    struct Mapper {
        counters: Arc<Counters>,
        seen_at_unmap: Arc<AtomicU64>,
    }

    impl GrantMapper for Mapper {
        fn map(
            &self,
            _: DomId,
            _: &[GrantRef],
            _: bool,
        ) -> Result<Arc<dyn MappedRegion>, PlatformError> {
            Ok(Arc::new(Page {
                counters: self.counters.clone(),
                seen_at_unmap: self.seen_at_unmap.clone(),
            }))
        }
        fn copy(&self, _: &mut [GrantCopyOp<'_>]) -> Result<(), PlatformError> {
            Ok(())
        }
    }

    #[test]
    fn mapping_counter_drops_only_after_the_unmap() {
        let counters = Arc::new(Counters::default());
        let seen = Arc::new(AtomicU64::new(u64::MAX));
        let gnt = Mapper {
            counters: counters.clone(),
            seen_at_unmap: seen.clone(),
        };
        let region = map_counted(&gnt, &counters, 1, &[8], true).unwrap();
        assert_eq!(counters.mappings.load(Ordering::SeqCst), 1);
        drop(region);
        // While the platform unmapped, the page was still counted: a reader that sees 0
        // mappings may rely on every grant being released.
        assert_eq!(seen.load(Ordering::SeqCst), 1);
        assert_eq!(counters.mappings.load(Ordering::SeqCst), 0);
    }
}
