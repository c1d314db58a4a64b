//! [`GntDev`]: [`GrantMapper`] over Linux's `/dev/xen/gntdev` (gntdev.h).
//!
//! Mapping is two steps (gntdev.h, IOCTL_GNTDEV_MAP_GRANT_REF: "This does not perform the
//! mapping, which is deferred until mmap() is called with @index as the offset"): the ioctl
//! reserves the grants and returns an offset, `mmap` at that offset maps them. Undoing it is
//! `munmap` then IOCTL_GNTDEV_UNMAP_GRANT_REF ("munmap() must be called on the relevant
//! virtual address(es) before this ioctl is called"), done when the last reference to a
//! [`GntDevRegion`] goes.
//!
//! The driver reports a bad grant only as a failed `mmap` (EINVAL), without the hypervisor's
//! status; [`GntDev::map_region`] then asks the hypervisor about each grant with a one-byte
//! grant copy to name the culprit in [`PlatformError::Grant`].

use std::fs::OpenOptions;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use xdisk_blkif::wire::PAGE_SIZE;

use super::sys::{self, Mapping};
use crate::platform::{
    page_span, CopyDir, DomId, GrantCopyOp, GrantMapper, GrantRef, GrantStatus, MappedRegion,
    MemError, PlatformError, Port, SharedMem,
};

/// Where Linux puts the grant device.
pub const GNTDEV_PATH: &str = "/dev/xen/gntdev";

/// The most pages one [`GntDev::map`] takes (the driver's own limit, the `limit` module
/// parameter, is usually far higher; this bounds the ioctl buffer).
pub const MAX_MAP_PAGES: usize = 4096;

pub(crate) fn open_device(path: &Path, nonblock: bool) -> Result<OwnedFd, PlatformError> {
    let mut flags = libc::O_CLOEXEC;
    if nonblock {
        flags |= libc::O_NONBLOCK;
    }
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(flags)
        .open(path)
        .map(OwnedFd::from)
        .map_err(|source| PlatformError::Io {
            context: format!("opening {}", path.display()),
            source,
        })
}

pub(crate) fn io_err(context: impl Into<String>, source: std::io::Error) -> PlatformError {
    PlatformError::Io {
        context: context.into(),
        source,
    }
}

/// An open `/dev/xen/gntdev`: maps and copies grants of other domains.
#[derive(Debug, Clone)]
pub struct GntDev {
    fd: Arc<OwnedFd>,
    path: PathBuf,
}

impl GntDev {
    /// Opens [`GNTDEV_PATH`]. Fails with [`PlatformError::Io`] (kind `NotFound`) where there
    /// is no Xen, or the `xen-gntdev` module is not loaded.
    pub fn open() -> Result<GntDev, PlatformError> {
        GntDev::open_path(GNTDEV_PATH)
    }

    /// Opens the gntdev device at `path`.
    pub fn open_path(path: impl AsRef<Path>) -> Result<GntDev, PlatformError> {
        let path = path.as_ref();
        Ok(GntDev {
            fd: Arc::new(open_device(path, false)?),
            path: path.to_owned(),
        })
    }

    /// Like [`GrantMapper::map`], returning the concrete region (for
    /// [`GntDevRegion::set_unmap_notify`]).
    pub fn map_region(
        &self,
        domid: DomId,
        refs: &[GrantRef],
        writable: bool,
    ) -> Result<GntDevRegion, PlatformError> {
        if refs.is_empty() || refs.len() > MAX_MAP_PAGES {
            return Err(PlatformError::TooLarge(refs.len()));
        }
        let count = refs.len() as u32;
        let index = sys::gntdev_map_grant_ref(self.fd.as_fd(), domid, refs).map_err(|e| {
            io_err(
                format!("{}: IOCTL_GNTDEV_MAP_GRANT_REF", self.path.display()),
                e,
            )
        })?;
        match Mapping::map_shared(self.fd.as_fd(), refs.len() * PAGE_SIZE, writable, index) {
            Ok(map) => Ok(GntDevRegion {
                map: Some(map),
                fd: self.fd.clone(),
                index,
                count,
                detached: Mutex::new(Detached::default()),
                any_detached: AtomicBool::new(false),
            }),
            Err(e) => {
                // The reservation stays in the driver's table until unmapped.
                if let Err(e) = sys::gntdev_unmap_grant_ref(self.fd.as_fd(), index, count) {
                    tracing::warn!(error = %e, "IOCTL_GNTDEV_UNMAP_GRANT_REF after a failed mmap");
                }
                Err(self.diagnose(domid, refs, writable, e))
            }
        }
    }

    /// Names the grant that made a map fail, by asking the hypervisor about each with a
    /// one-byte grant copy from it.
    fn diagnose(
        &self,
        domid: DomId,
        refs: &[GrantRef],
        writable: bool,
        mmap_err: std::io::Error,
    ) -> PlatformError {
        if mmap_err.raw_os_error() == Some(libc::EINVAL)
            || mmap_err.raw_os_error() == Some(libc::EFAULT)
        {
            for &gref in refs {
                let mut byte = [0u8; 1];
                let mut op = [GrantCopyOp {
                    domid,
                    gref,
                    offset: 0,
                    dir: CopyDir::FromForeign(&mut byte),
                    status: GrantStatus::Okay,
                }];
                if self.copy(&mut op).is_err() {
                    break;
                }
                if op[0].status != GrantStatus::Okay {
                    return PlatformError::Grant {
                        domid,
                        gref,
                        status: op[0].status,
                    };
                }
            }
            if writable {
                // Every grant is readable: the likely cause is a read-only grant mapped
                // writable.
                return PlatformError::Grant {
                    domid,
                    gref: refs[0],
                    status: GrantStatus::PermissionDenied,
                };
            }
        }
        io_err(
            format!(
                "{}: mmap of {} grant(s) of domain {domid}",
                self.path.display(),
                refs.len()
            ),
            mmap_err,
        )
    }
}

impl GrantMapper for GntDev {
    fn map(
        &self,
        domid: DomId,
        refs: &[GrantRef],
        writable: bool,
    ) -> Result<Arc<dyn MappedRegion>, PlatformError> {
        Ok(Arc::new(self.map_region(domid, refs, writable)?))
    }

    fn copy(&self, ops: &mut [GrantCopyOp<'_>]) -> Result<(), PlatformError> {
        sys::gntdev_grant_copy(self.fd.as_fd(), ops).map_err(|e| {
            io_err(
                format!("{}: IOCTL_GNTDEV_GRANT_COPY", self.path.display()),
                e,
            )
        })
    }
}

/// Grant pages mapped through gntdev, contiguous, unmapped (munmap, then
/// IOCTL_GNTDEV_UNMAP_GRANT_REF) on drop.
#[derive(Debug)]
pub struct GntDevRegion {
    /// `None` only while dropping.
    map: Option<Mapping>,
    fd: Arc<OwnedFd>,
    index: u64,
    count: u32,
    /// Pages taken out by [`MappedRegion::detach`] (empty until the first), and whether the
    /// driver's reservation was released already (the whole region detached).
    detached: Mutex<Detached>,
    /// Whether any page was detached (spares the lock on the data path).
    any_detached: AtomicBool,
}

#[derive(Debug, Default)]
struct Detached {
    pages: Vec<bool>,
    released: bool,
}

/// Whether part of a mapping can be detached: in a PV domain gntdev maps grants by rewriting
/// our page tables, and its MMU notifier unmaps the grants of whatever part of a mapping goes
/// away (gntdev.c `gntdev_invalidate` -> `unmap_grant_pages` of that range), correctly for a
/// split mapping since Linux 6.1 ("xen/gntdev: Accommodate VMA splitting": before it, a
/// partial munmap in a PV domain left grant PTEs behind, "Bad page map"). Elsewhere (PVH/HVM
/// dom0) the grants of a mapping are only unmapped with the whole reservation, so only whole
/// regions can be detached.
fn partial_detach_works() -> bool {
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| {
        let pv =
            std::fs::read_to_string("/sys/hypervisor/guest_type").is_ok_and(|t| t.trim() == "PV");
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
        pv && kernel_at_least(&release, (6, 1))
    })
}

/// Whether a kernel release string (`6.1.0-28-amd64`) is at least `major.minor`.
fn kernel_at_least(release: &str, want: (u32, u32)) -> bool {
    let mut parts = release
        .trim()
        .split(|c: char| !c.is_ascii_digit())
        .map(|p| p.parse::<u32>().ok());
    match (parts.next().flatten(), parts.next().flatten()) {
        (Some(major), Some(minor)) => (major, minor) >= want,
        _ => false,
    }
}

impl GntDevRegion {
    fn map(&self) -> &Mapping {
        self.map.as_ref().expect("mapping present until drop")
    }

    /// Number of pages.
    pub fn pages(&self) -> usize {
        self.count as usize
    }

    /// IOCTL_GNTDEV_SET_UNMAP_NOTIFY: when this mapping goes away (dropped, or the process
    /// dies), zero the byte at `clear_byte` (an offset in the region) and/or send an event on
    /// the local `port` (bound through `/dev/xen/evtchn` in this process). This is how the
    /// other domain can learn that the mapper is gone (gntdev.h: "so that the other side can
    /// do cleanup if this side crashes"). One notification per page; a later call replaces it.
    pub fn set_unmap_notify(
        &self,
        clear_byte: Option<usize>,
        port: Option<Port>,
    ) -> Result<(), PlatformError> {
        let offset = clear_byte.unwrap_or(0);
        sys_check(offset, 1, self.size())?;
        if clear_byte.is_some() && !self.writable() {
            return Err(PlatformError::Mem(MemError::OutOfBounds {
                offset,
                len: 1,
                size: 0,
            }));
        }
        sys::set_unmap_notify(
            self.fd.as_fd(),
            false,
            self.index + offset as u64,
            clear_byte.is_some(),
            port,
        )
        .map_err(|e| io_err("IOCTL_GNTDEV_SET_UNMAP_NOTIFY", e))
    }
}

impl GntDevRegion {
    /// Reads `len` bytes of `file` at `file_offset` straight into the region at `offset`
    /// (`pread`; with an `O_DIRECT` file the device DMAs into the granted pages). Returns the
    /// bytes read. Fails on a read-only region.
    pub fn pread(
        &self,
        file: &impl AsFd,
        file_offset: u64,
        offset: usize,
        len: usize,
    ) -> Result<usize, PlatformError> {
        sys_check(offset, len, self.size())?;
        if !self.writable() {
            return Err(PlatformError::Mem(read_only(offset, len)));
        }
        sys::pread_mapping(file.as_fd(), self.map(), offset, len, file_offset)
            .map_err(|e| io_err("pread into a grant mapping", e))
    }

    /// Writes `len` bytes of the region at `offset` to `file` at `file_offset` (`pwrite`).
    /// Returns the bytes written.
    pub fn pwrite(
        &self,
        file: &impl AsFd,
        file_offset: u64,
        offset: usize,
        len: usize,
    ) -> Result<usize, PlatformError> {
        sys_check(offset, len, self.size())?;
        sys::pwrite_mapping(file.as_fd(), self.map(), offset, len, file_offset)
            .map_err(|e| io_err("pwrite from a grant mapping", e))
    }
}

fn sys_check(offset: usize, len: usize, size: usize) -> Result<(), MemError> {
    xdisk_blkif::mem::check_bounds(offset, len, size)
}

/// Bounds and alignment of a 32-bit access.
pub(crate) fn check_u32(offset: usize, size: usize) -> Result<(), MemError> {
    sys_check(offset, 4, size)?;
    if !offset.is_multiple_of(4) {
        return Err(MemError::Unaligned(offset));
    }
    Ok(())
}

/// A store into a read-only mapping is refused as an access to a region with no writable
/// bytes (`size: 0`).
pub(crate) fn read_only(offset: usize, len: usize) -> MemError {
    MemError::OutOfBounds {
        offset,
        len,
        size: 0,
    }
}

/// [`SharedMem`] over a [`Mapping`]: every access is bounds-checked and volatile.
pub(crate) fn mem_read_u32(m: &Mapping, offset: usize) -> Result<u32, MemError> {
    check_u32(offset, m.len())?;
    Ok(m.read_u32(offset))
}

pub(crate) fn mem_write_u32(m: &Mapping, offset: usize, value: u32) -> Result<(), MemError> {
    check_u32(offset, m.len())?;
    if !m.writable() {
        return Err(read_only(offset, 4));
    }
    m.write_u32(offset, value);
    Ok(())
}

pub(crate) fn mem_copy_from(m: &Mapping, offset: usize, dst: &mut [u8]) -> Result<(), MemError> {
    sys_check(offset, dst.len(), m.len())?;
    m.copy_out(offset, dst);
    Ok(())
}

pub(crate) fn mem_copy_to(m: &Mapping, offset: usize, src: &[u8]) -> Result<(), MemError> {
    sys_check(offset, src.len(), m.len())?;
    if !m.writable() {
        return Err(read_only(offset, src.len()));
    }
    m.copy_in(offset, src);
    Ok(())
}

impl SharedMem for GntDevRegion {
    fn size(&self) -> usize {
        self.map().len()
    }

    fn read_u32_volatile(&self, offset: usize) -> Result<u32, MemError> {
        mem_read_u32(self.map(), offset)
    }

    /// Fails (as out of bounds of a zero-size region) on a read-only mapping.
    fn write_u32_volatile(&self, offset: usize, value: u32) -> Result<(), MemError> {
        mem_write_u32(self.map(), offset, value)
    }

    fn copy_from(&self, offset: usize, dst: &mut [u8]) -> Result<(), MemError> {
        mem_copy_from(self.map(), offset, dst)
    }

    /// Fails (as out of bounds of a zero-size region) on a read-only mapping.
    fn copy_to(&self, offset: usize, src: &[u8]) -> Result<(), MemError> {
        mem_copy_to(self.map(), offset, src)
    }
}

impl MappedRegion for GntDevRegion {
    fn writable(&self) -> bool {
        self.map().writable()
    }

    fn io_base(&self) -> *mut u8 {
        self.map().as_ptr()
    }

    fn can_detach(&self, offset: usize, len: usize) -> bool {
        match page_span(offset, len, self.size()) {
            Ok((first, end)) => partial_detach_works() || (first == 0 && end == self.pages()),
            Err(_) => false,
        }
    }

    fn detach(&self, offset: usize, len: usize) -> Result<(), PlatformError> {
        let (first, end) = page_span(offset, len, self.size())?;
        let whole = first == 0 && end == self.pages();
        if !whole && !partial_detach_works() {
            return Err(io_err(
                "detaching part of a grant mapping (only a PV domain's gntdev, Linux 6.1 on)",
                std::io::Error::from(std::io::ErrorKind::Unsupported),
            ));
        }
        let mut d = self.detached.lock().unwrap_or_else(PoisonError::into_inner);
        if d.pages.is_empty() {
            d.pages = vec![false; self.pages()];
        }
        if d.pages[first..end].iter().all(|&p| p) {
            return Ok(());
        }
        self.map()
            .replace_with_private(first, end)
            .map_err(|e| io_err("mmap(MAP_FIXED) over a grant mapping", e))?;
        d.pages[first..end].fill(true);
        self.any_detached.store(true, Ordering::Release);
        if d.pages.iter().all(|&p| p) && !d.released {
            // Nothing of the mapping is left: release the reservation now (gntdev.h: after
            // munmap), which unmaps the grants where the munmap did not (PVH/HVM).
            sys::gntdev_unmap_grant_ref(self.fd.as_fd(), self.index, self.count)
                .map_err(|e| io_err("IOCTL_GNTDEV_UNMAP_GRANT_REF of a detached mapping", e))?;
            d.released = true;
        }
        Ok(())
    }

    fn is_detached(&self, offset: usize, len: usize) -> bool {
        if !self.any_detached.load(Ordering::Acquire) {
            return false;
        }
        let Ok((first, end)) = page_span(offset, len, self.size()) else {
            return false;
        };
        let d = self.detached.lock().unwrap_or_else(PoisonError::into_inner);
        d.pages
            .get(first..end)
            .is_some_and(|p| p.iter().any(|&x| x))
    }
}

impl Drop for GntDevRegion {
    fn drop(&mut self) {
        // munmap first (gntdev.h), then release the reservation.
        drop(self.map.take());
        let released = self
            .detached
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner)
            .released;
        if released {
            return;
        }
        if let Err(e) = sys::gntdev_unmap_grant_ref(self.fd.as_fd(), self.index, self.count) {
            tracing::warn!(error = %e, index = self.index, "IOCTL_GNTDEV_UNMAP_GRANT_REF failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_releases_compare_by_major_and_minor() {
        assert!(kernel_at_least("6.1.0-28-amd64", (6, 1)));
        assert!(kernel_at_least("6.12.9", (6, 1)));
        assert!(kernel_at_least("7.0", (6, 1)));
        assert!(!kernel_at_least("6.0.12", (6, 1)));
        assert!(!kernel_at_least("5.15.76-1", (6, 1)));
        assert!(!kernel_at_least("", (6, 1)));
        assert!(!kernel_at_least("six", (6, 1)));
    }

    #[test]
    fn open_fails_cleanly_without_the_device() {
        let dir = tempfile::tempdir().unwrap();
        let err = GntDev::open_path(dir.path().join("gntdev")).unwrap_err();
        match err {
            PlatformError::Io { source, context } => {
                assert_eq!(source.kind(), std::io::ErrorKind::NotFound);
                assert!(context.contains("gntdev"), "{context}");
            }
            other => panic!("unexpected {other:?}"),
        }
        if !Path::new("/dev/xen").exists() {
            assert!(GntDev::open().is_err());
        }
    }

    #[test]
    fn ioctls_on_a_non_xen_device_fail_cleanly() {
        let dev = GntDev::open_path("/dev/null").unwrap();
        let err = dev.map_region(0, &[8], true).unwrap_err();
        assert!(matches!(err, PlatformError::Io { .. }), "{err:?}");
        let mut buf = [0u8; 16];
        let mut ops = [GrantCopyOp {
            domid: 0,
            gref: 8,
            offset: 0,
            dir: CopyDir::FromForeign(&mut buf),
            status: GrantStatus::Okay,
        }];
        assert!(dev.copy(&mut ops).is_err());
        assert!(matches!(
            dev.map_region(0, &[], true),
            Err(PlatformError::TooLarge(0))
        ));
        assert!(matches!(
            dev.map(0, &vec![1; MAX_MAP_PAGES + 1], true).err(),
            Some(PlatformError::TooLarge(_))
        ));
    }

    #[test]
    fn copies_crossing_the_page_are_refused_before_the_ioctl() {
        let dev = GntDev::open_path("/dev/null").unwrap();
        let mut buf = [0u8; 16];
        let src = [0u8; 0];
        let mut ops = [
            GrantCopyOp {
                domid: 0,
                gref: 8,
                offset: 4090,
                dir: CopyDir::FromForeign(&mut buf),
                status: GrantStatus::Okay,
            },
            GrantCopyOp {
                domid: 0,
                gref: 8,
                offset: 0,
                dir: CopyDir::ToForeign(&src),
                status: GrantStatus::GeneralError,
            },
        ];
        // Nothing left for the ioctl, so /dev/null is never asked.
        dev.copy(&mut ops).unwrap();
        assert_eq!(ops[0].status, GrantStatus::BadCopyArg);
        assert_eq!(ops[1].status, GrantStatus::Okay);
    }
}
