//! Grant mappings the backend holds, counted.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use xdisk_blkif::mem::{MemError, SharedMem};
use xdisk_blkif::wire::PAGE_SIZE;
use xdisk_xen::platform::{DomId, GrantMapper, GrantRef, MappedRegion, PlatformError};

use crate::stats::{add, sub, Counters};

/// A mapping that keeps the device's `mappings` counter (in pages) up to date: incremented
/// when mapped, decremented when the last reference is dropped, once the platform has
/// unmapped.
pub(crate) struct Counted {
    inner: Arc<dyn MappedRegion>,
    /// Dropped after `inner` (fields drop in declaration order): while the counter says a
    /// page is mapped, it is. (Decremented in `Counted`'s own `drop`, before its fields, the
    /// counter reached 0 while the last unmap was still to come, and a frontend that trusted
    /// it found its grants still mapped: teardown's detach_under_load was flaky for that.)
    _count: Count,
}

/// Pages counted in `counters.mappings`, uncounted on drop.
struct Count {
    counters: Arc<Counters>,
    pages: u64,
}

impl Drop for Count {
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
        _count: Count {
            counters: counters.clone(),
            pages,
        },
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use xdisk_xen::platform::GrantCopyOp;

    /// A page whose unmap (drop) notes what the device's counter said at that moment.
    struct Probe {
        counters: Arc<Counters>,
        seen: Arc<Mutex<Vec<u64>>>,
    }

    impl Drop for Probe {
        fn drop(&mut self) {
            let n = self.counters.mappings.load(Ordering::SeqCst);
            self.seen.lock().unwrap().push(n);
        }
    }

    impl SharedMem for Probe {
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

    impl MappedRegion for Probe {
        fn writable(&self) -> bool {
            true
        }
        fn io_base(&self) -> *mut u8 {
            std::ptr::null_mut()
        }
    }

    struct ProbeMapper {
        counters: Arc<Counters>,
        seen: Arc<Mutex<Vec<u64>>>,
    }

    impl GrantMapper for ProbeMapper {
        fn map(
            &self,
            _: DomId,
            _: &[GrantRef],
            _: bool,
        ) -> Result<Arc<dyn MappedRegion>, PlatformError> {
            Ok(Arc::new(Probe {
                counters: self.counters.clone(),
                seen: self.seen.clone(),
            }))
        }
        fn copy(&self, _: &mut [GrantCopyOp<'_>]) -> Result<(), PlatformError> {
            Ok(())
        }
    }

    #[test]
    fn mappings_stay_counted_until_the_platform_has_unmapped() {
        let counters = Arc::new(Counters::default());
        let seen = Arc::new(Mutex::new(Vec::new()));
        let gnt = ProbeMapper {
            counters: counters.clone(),
            seen: seen.clone(),
        };
        let a = map_counted(&gnt, &counters, 1, &[8], true).unwrap();
        let b = map_counted(&gnt, &counters, 1, &[9], true).unwrap();
        assert_eq!(counters.mappings.load(Ordering::SeqCst), 2);
        drop(a);
        drop(b);
        // Each page was still counted while it was being unmapped.
        assert_eq!(*seen.lock().unwrap(), vec![2, 1]);
        assert_eq!(counters.mappings.load(Ordering::SeqCst), 0);
    }
}
