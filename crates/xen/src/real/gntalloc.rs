//! [`GntAlloc`]: granting our own pages to another domain through Linux's `/dev/xen/gntalloc`
//! (gntalloc.h): the frontend side, used by the lab's self-test and by local-attach tests
//! where dom0 is both ends.
//!
//! IOCTL_GNTALLOC_ALLOC_GREF allocates and grants the pages and returns an mmap offset;
//! dropping a [`GrantedPages`] unmaps them and issues IOCTL_GNTALLOC_DEALLOC_GREF (the driver
//! ends the grants once nobody maps them any more).

use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use xdisk_blkif::wire::PAGE_SIZE;

use super::gntdev::{io_err, mem_copy_from, mem_copy_to, mem_read_u32, mem_write_u32, open_device};
use super::sys::{self, Mapping};
use crate::platform::{DomId, GrantRef, MemError, PlatformError, SharedMem};

/// Where Linux puts the grant allocation device.
pub const GNTALLOC_PATH: &str = "/dev/xen/gntalloc";

/// An open `/dev/xen/gntalloc`.
#[derive(Debug, Clone)]
pub struct GntAlloc {
    fd: Arc<OwnedFd>,
    path: PathBuf,
}

impl GntAlloc {
    /// Opens [`GNTALLOC_PATH`] (fails with [`PlatformError::Io`], kind `NotFound`, without
    /// Xen or the `xen-gntalloc` module).
    pub fn open() -> Result<GntAlloc, PlatformError> {
        GntAlloc::open_path(GNTALLOC_PATH)
    }

    /// Opens the gntalloc device at `path`.
    pub fn open_path(path: impl AsRef<Path>) -> Result<GntAlloc, PlatformError> {
        let path = path.as_ref();
        Ok(GntAlloc {
            fd: Arc::new(open_device(path, false)?),
            path: path.to_owned(),
        })
    }

    /// Allocates `pages` zeroed pages granted to `domid` (writable by it if `writable`), mapped
    /// here read-write.
    pub fn alloc(
        &self,
        domid: DomId,
        pages: usize,
        writable: bool,
    ) -> Result<GrantedPages, PlatformError> {
        if pages == 0 || pages > super::gntdev::MAX_MAP_PAGES {
            return Err(PlatformError::TooLarge(pages));
        }
        let count = pages as u32;
        let (index, grefs) = sys::gntalloc_alloc_gref(self.fd.as_fd(), domid, writable, count)
            .map_err(|e| {
                io_err(
                    format!("{}: IOCTL_GNTALLOC_ALLOC_GREF", self.path.display()),
                    e,
                )
            })?;
        match Mapping::map_shared(self.fd.as_fd(), pages * PAGE_SIZE, true, index) {
            Ok(map) => Ok(GrantedPages {
                map: Some(map),
                fd: self.fd.clone(),
                index,
                count,
                grefs,
            }),
            Err(e) => {
                if let Err(e) = sys::gntalloc_dealloc_gref(self.fd.as_fd(), index, count) {
                    tracing::warn!(error = %e, "IOCTL_GNTALLOC_DEALLOC_GREF after a failed mmap");
                }
                Err(io_err(
                    format!("{}: mmap of {pages} granted page(s)", self.path.display()),
                    e,
                ))
            }
        }
    }
}

/// Pages of ours granted to another domain; the grants are withdrawn on drop.
#[derive(Debug)]
pub struct GrantedPages {
    map: Option<Mapping>,
    fd: Arc<OwnedFd>,
    index: u64,
    count: u32,
    grefs: Vec<GrantRef>,
}

impl GrantedPages {
    fn map(&self) -> &Mapping {
        self.map.as_ref().expect("mapping present until drop")
    }

    /// The grant reference of each page, in order.
    pub fn grefs(&self) -> &[GrantRef] {
        &self.grefs
    }

    /// IOCTL_GNTALLOC_SET_UNMAP_NOTIFY: when these pages are unmapped here (or the process
    /// dies), zero the byte at `clear_byte` and/or notify the local `port`.
    pub fn set_unmap_notify(
        &self,
        clear_byte: Option<usize>,
        port: Option<u32>,
    ) -> Result<(), PlatformError> {
        let offset = clear_byte.unwrap_or(0);
        xdisk_blkif::mem::check_bounds(offset, 1, self.size())?;
        sys::set_unmap_notify(
            self.fd.as_fd(),
            true,
            self.index + offset as u64,
            clear_byte.is_some(),
            port,
        )
        .map_err(|e| io_err("IOCTL_GNTALLOC_SET_UNMAP_NOTIFY", e))
    }
}

impl SharedMem for GrantedPages {
    fn size(&self) -> usize {
        self.map().len()
    }

    fn read_u32_volatile(&self, offset: usize) -> Result<u32, MemError> {
        mem_read_u32(self.map(), offset)
    }

    fn write_u32_volatile(&self, offset: usize, value: u32) -> Result<(), MemError> {
        mem_write_u32(self.map(), offset, value)
    }

    fn copy_from(&self, offset: usize, dst: &mut [u8]) -> Result<(), MemError> {
        mem_copy_from(self.map(), offset, dst)
    }

    fn copy_to(&self, offset: usize, src: &[u8]) -> Result<(), MemError> {
        mem_copy_to(self.map(), offset, src)
    }
}

impl Drop for GrantedPages {
    fn drop(&mut self) {
        drop(self.map.take());
        if let Err(e) = sys::gntalloc_dealloc_gref(self.fd.as_fd(), self.index, self.count) {
            tracing::warn!(error = %e, index = self.index, "IOCTL_GNTALLOC_DEALLOC_GREF failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_fails_cleanly_without_the_device() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            GntAlloc::open_path(dir.path().join("gntalloc")),
            Err(PlatformError::Io { .. })
        ));
        let dev = GntAlloc::open_path("/dev/null").unwrap();
        assert!(matches!(
            dev.alloc(0, 1, true),
            Err(PlatformError::Io { .. })
        ));
        assert!(matches!(
            dev.alloc(0, 0, true),
            Err(PlatformError::TooLarge(0))
        ));
    }
}
