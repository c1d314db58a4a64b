//! An open host file (regular file or block device) with its cache mode, its O_DIRECT
//! alignment, and synchronous positional I/O that accepts any alignment.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::os::unix::io::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use crate::buf::AlignedBuf;
use crate::cache::CacheMode;
use crate::{Error, Result};

/// O_DIRECT requirements of a file: offsets and lengths must be multiples of `offset`, buffer
/// addresses multiples of `memory`. For files opened without O_DIRECT both are 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Alignment {
    /// Required alignment, in bytes, of file offsets and I/O lengths.
    pub offset: u32,
    /// Required alignment, in bytes, of buffer addresses.
    pub memory: u32,
}

impl Alignment {
    /// No requirement (both 1): files opened without O_DIRECT.
    pub const NONE: Alignment = Alignment {
        offset: 1,
        memory: 1,
    };
    /// Whether an I/O at `off` of `len` bytes from memory at `addr` can go to the file as is.
    pub fn allows(&self, off: u64, len: usize, addr: usize) -> bool {
        off.is_multiple_of(self.offset as u64)
            && len.is_multiple_of(self.offset as usize)
            && addr.is_multiple_of(self.memory as usize)
    }
    /// Alignment to use for buffers we allocate ourselves (at least 4096, the page size).
    pub fn buffer_align(&self) -> usize {
        (self.memory as usize).max(self.offset as usize).max(4096)
    }
}

/// One open host file.
#[derive(Debug)]
pub struct ImageFile {
    /// Fault injection (tests): keeps the plan attached to this file's fd while it is open
    /// (declared first: dropped, so detached, before the fd is closed).
    #[cfg(feature = "fault-injection")]
    faults: Mutex<Option<crate::fault::Registration>>,
    file: File,
    path: PathBuf,
    cache: CacheMode,
    read_only: bool,
    block_device: bool,
    align: Alignment,
    /// Serialises read-modify-write cycles of unaligned writes so that two unaligned writes
    /// to the same block do not lose each other's bytes.
    rmw: Mutex<()>,
    /// Set when a flush failed: what the kernel reported. Linux may then have dropped dirty
    /// pages and answer the next fdatasync with success, so no later flush can be trusted;
    /// from then on flushes and writes fail with EIO until the file is reopened (QEMU's
    /// `page_cache_inconsistent`).
    broken: OnceLock<String>,
}

impl ImageFile {
    /// Opens an existing file or block device with the given cache mode.
    pub fn open(path: &Path, read_only: bool, cache: CacheMode) -> Result<ImageFile> {
        Self::open_with(path, read_only, cache, false)
    }

    /// Creates (or truncates) a regular file and opens it read-write.
    pub fn create(path: &Path, cache: CacheMode) -> Result<ImageFile> {
        Self::open_with(path, false, cache, true)
    }

    fn open_with(
        path: &Path,
        read_only: bool,
        cache: CacheMode,
        create: bool,
    ) -> Result<ImageFile> {
        let io_err = |what: &str, source: io::Error| Error::Io {
            what: format!("{what} {}", path.display()),
            source,
        };
        // O_NONBLOCK for the open only: a FIFO put where an image (or a backing file, after
        // it was checked) should be would otherwise block the open for ever. Cleared below
        // once the file is known to be something else.
        let mut flags = libc::O_CLOEXEC | libc::O_NONBLOCK | libc::O_NOCTTY;
        if cache.dsync() {
            flags |= libc::O_DSYNC;
        }
        let mut opts = OpenOptions::new();
        opts.read(true).write(!read_only);
        if create {
            opts.create(true).truncate(true);
        }
        let direct = cache.direct();
        let file = if direct {
            opts.clone()
                .custom_flags(flags | libc::O_DIRECT)
                .open(path)
                .map_err(|e| {
                    if e.raw_os_error() == Some(libc::EINVAL) {
                        io_err(
                            "cannot open with O_DIRECT (cache=none/directsync); the filesystem does not support it, use cache=writeback:",
                            e,
                        )
                    } else {
                        io_err("cannot open", e)
                    }
                })?
        } else {
            opts.custom_flags(flags)
                .open(path)
                .map_err(|e| io_err("cannot open", e))?
        };
        let meta = file.metadata().map_err(|e| io_err("cannot stat", e))?;
        let ft = meta.file_type();
        if ft.is_fifo() || ft.is_socket() {
            return Err(io_err(
                "not a regular file or block device:",
                io::Error::from(io::ErrorKind::InvalidInput),
            ));
        }
        crate::sys::clear_nonblocking(file.as_raw_fd()).map_err(|e| io_err("cannot open", e))?;
        let block_device = ft.is_block_device();
        let align = if direct {
            probe_alignment(&file, block_device)
        } else {
            Alignment::NONE
        };
        tracing::debug!(path = %path.display(), %cache, ?align, block_device, "opened image file");
        Ok(ImageFile {
            file,
            path: path.to_path_buf(),
            cache,
            read_only,
            block_device,
            align,
            rmw: Mutex::new(()),
            broken: OnceLock::new(),
            #[cfg(feature = "fault-injection")]
            faults: Mutex::new(None),
        })
    }

    /// Whether a flush failed (see [`ImageFile::mark_broken`]).
    pub fn is_broken(&self) -> bool {
        self.broken.get().is_some()
    }

    /// Records that a flush of this file failed with `err` (also called by image queues whose
    /// engine flushes failed). Data written since the last successful flush may be lost
    /// without any later fdatasync telling, so every later flush and write fails with EIO
    /// until the file is reopened.
    pub fn mark_broken(&self, err: &io::Error) {
        let mut first = false;
        self.broken.get_or_init(|| {
            first = true;
            err.to_string()
        });
        if first {
            tracing::error!(
                path = %self.path.display(),
                "flush failed ({err}): written data may be lost; every later flush and write \
                 of this image fails until it is reopened"
            );
        }
    }

    /// EIO when the file is broken (a flush failed).
    pub fn check_usable(&self) -> io::Result<()> {
        match self.broken.get() {
            None => Ok(()),
            // Plain EIO (what QEMU answers too); mark_broken logged why.
            Some(_) => Err(io::Error::from_raw_os_error(libc::EIO)),
        }
    }

    /// Fault injection (tests): applies `plan` to this file's synchronous I/O (errno faults)
    /// and to engine operations on its fd, until the file is closed.
    #[cfg(feature = "fault-injection")]
    pub fn inject_faults(&self, plan: &std::sync::Arc<crate::fault::FaultPlan>) {
        let reg = plan.register(self.fd());
        *self.faults.lock().unwrap_or_else(|e| e.into_inner()) = Some(reg);
    }

    /// The injected fault of a synchronous operation, as an error (errno faults only).
    #[cfg(feature = "fault-injection")]
    fn injected(&self, class: crate::fault::Class, len: usize) -> io::Result<()> {
        match crate::fault::plan_for(self.fd()).and_then(|p| p.decide(class, len)) {
            Some(crate::fault::Fault::Errno(e)) => Err(io::Error::from_raw_os_error(e)),
            _ => Ok(()),
        }
    }

    /// The path the file was opened with.
    pub fn path(&self) -> &Path {
        &self.path
    }
    /// The file descriptor (for engine operations; it stays owned by this `ImageFile`).
    pub fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
    /// The open file.
    pub fn file(&self) -> &File {
        &self.file
    }
    /// The cache mode the file was opened with.
    pub fn cache(&self) -> CacheMode {
        self.cache
    }
    /// Whether the file was opened read-only.
    pub fn read_only(&self) -> bool {
        self.read_only
    }
    /// Whether the file is a block device (rather than a regular file).
    pub fn is_block_device(&self) -> bool {
        self.block_device
    }
    /// The O_DIRECT alignment probed at open ([`Alignment::NONE`] without O_DIRECT).
    pub fn alignment(&self) -> Alignment {
        self.align
    }

    /// Size in bytes (for block devices, the device size).
    pub fn len(&self) -> io::Result<u64> {
        if self.block_device {
            crate::sys::block_device_size(self.fd())
        } else {
            Ok(self.file.metadata()?.len())
        }
    }

    /// Whether the file is empty.
    pub fn is_empty(&self) -> io::Result<bool> {
        Ok(self.len()? == 0)
    }

    /// Bytes allocated on the host (st_blocks * 512).
    pub fn allocated_bytes(&self) -> io::Result<u64> {
        use std::os::unix::fs::MetadataExt;
        Ok(self.file.metadata()?.blocks() * 512)
    }

    /// Sets the length of a regular file (no-op error for block devices).
    pub fn set_len(&self, len: u64) -> io::Result<()> {
        self.check_usable()?;
        if self.block_device {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "cannot resize a block device",
            ));
        }
        self.file.set_len(len)
    }

    /// Reads exactly `buf.len()` bytes at `off`. Bytes past the end of the file read as zero
    /// (qcow2 and sparse raw files rely on this).
    pub fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        #[cfg(feature = "fault-injection")]
        self.injected(crate::fault::Class::Read, buf.len())?;
        if self.align.allows(off, buf.len(), buf.as_ptr() as usize) {
            return read_full(&self.file, buf, off);
        }
        let (start, len) = self.align.widen(off, buf.len());
        let mut bounce = AlignedBuf::new(len, self.align.buffer_align());
        read_full(&self.file, &mut bounce, start)?;
        let skip = (off - start) as usize;
        buf.copy_from_slice(&bounce[skip..skip + buf.len()]);
        Ok(())
    }

    /// Writes all of `buf` at `off`. Unaligned writes on O_DIRECT files are done as a
    /// read-modify-write of the covering aligned range, serialised with other such cycles.
    /// Fails with EIO once a flush has failed ([`ImageFile::mark_broken`]).
    pub fn write_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        self.check_usable()?;
        #[cfg(feature = "fault-injection")]
        self.injected(crate::fault::Class::Write, buf.len())?;
        if self.align.allows(off, buf.len(), buf.as_ptr() as usize) {
            return self.file.write_all_at(buf, off);
        }
        let (start, len) = self.align.widen(off, buf.len());
        let mut bounce = AlignedBuf::new(len, self.align.buffer_align());
        let skip = (off - start) as usize;
        if start == off && len == buf.len() {
            // Only the memory is misaligned: no read needed.
            bounce.copy_from_slice(buf);
            return self.file.write_all_at(&bounce, start);
        }
        let _guard = self.rmw.lock().unwrap_or_else(|e| e.into_inner());
        read_full(&self.file, &mut bounce, start)?;
        bounce[skip..skip + buf.len()].copy_from_slice(buf);
        self.write_trimmed(&bounce, start, off + buf.len() as u64)
    }

    /// Writes an aligned bounce buffer whose caller-visible part ends at `end`. The tail block
    /// is written whole, so a write that extends a regular file would leave it longer than a
    /// buffered write does (up to the next alignment boundary): the file is then cut back to
    /// `end` (or its previous size, if larger), so that O_DIRECT and buffered files end up
    /// with the same size. Called under the RMW lock; an aligned write racing past the end of
    /// the file at the same moment is the caller's problem, as with any concurrent extension.
    fn write_trimmed(&self, bounce: &AlignedBuf, start: u64, end: u64) -> io::Result<()> {
        let padded_end = start + bounce.len() as u64;
        let old_size = if !self.block_device && padded_end > end {
            Some(self.len()?)
        } else {
            None
        };
        self.file.write_all_at(bounce, start)?;
        match old_size {
            Some(old) if old < padded_end => self.file.set_len(old.max(end)),
            _ => Ok(()),
        }
    }

    /// Writes `len` zero bytes at `off` by plain writes (the fallback of `zero_range`).
    pub fn write_zeroes_by_writing(&self, off: u64, len: u64) -> io::Result<()> {
        const CHUNK: u64 = 1 << 20;
        let zero = AlignedBuf::new(CHUNK as usize, self.align.buffer_align());
        let mut pos = off;
        let end = off
            .checked_add(len)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "range overflows"))?;
        while pos < end {
            let n = (end - pos).min(CHUNK) as usize;
            self.write_at(&zero[..n], pos)?;
            pos += n as u64;
        }
        Ok(())
    }

    /// Flushes written data to stable storage (fdatasync), unless the cache mode is `unsafe`.
    /// A failure marks the file broken ([`ImageFile::mark_broken`]): this and every later
    /// flush and write fail.
    pub fn flush(&self) -> io::Result<()> {
        self.check_usable()?;
        if !self.cache.honours_flush() {
            return Ok(());
        }
        let r = self.sync_data();
        if let Err(e) = &r {
            self.mark_broken(e);
        }
        r
    }

    /// fdatasync (or the injected fault planned for it).
    fn sync_data(&self) -> io::Result<()> {
        #[cfg(feature = "fault-injection")]
        self.injected(crate::fault::Class::Flush, 0)?;
        self.file.sync_data()
    }

    /// Deallocates a range (the range then reads as zeroes). Regular files: fallocate
    /// PUNCH_HOLE|KEEP_SIZE; block devices: BLKDISCARD (contents afterwards unspecified,
    /// callers that need zeroes use [`ImageFile::zero_range`]).
    pub fn punch_hole(&self, off: u64, len: u64) -> io::Result<()> {
        self.check_usable()?;
        if len == 0 {
            return Ok(());
        }
        if self.block_device {
            crate::sys::blk_discard(self.fd(), off, len)
        } else {
            crate::sys::fallocate(
                self.fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                off,
                len,
            )
        }
    }

    /// Makes a range read as zeroes, as cheaply as the file allows: fallocate ZERO_RANGE,
    /// then PUNCH_HOLE (regular files), BLKZEROOUT (block devices), then writing zeroes.
    /// Does not change the size of a regular file.
    pub fn zero_range(&self, off: u64, len: u64) -> io::Result<()> {
        self.check_usable()?;
        if len == 0 {
            return Ok(());
        }
        if self.block_device {
            if crate::sys::blk_zeroout(self.fd(), off, len).is_ok() {
                return Ok(());
            }
            return self.write_zeroes_by_writing(off, len);
        }
        let size = self.len()?;
        let end = off.saturating_add(len).min(size);
        if off >= end {
            return Ok(());
        }
        let len = end - off;
        let aligned = off.is_multiple_of(4096) && len.is_multiple_of(4096);
        if aligned
            && crate::sys::fallocate(
                self.fd(),
                libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
                off,
                len,
            )
            .is_ok()
        {
            return Ok(());
        }
        if aligned
            && crate::sys::fallocate(
                self.fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                off,
                len,
            )
            .is_ok()
        {
            return Ok(());
        }
        self.write_zeroes_by_writing(off, len)
    }

    /// The next offset at or after `offset` that holds data (lseek SEEK_DATA); None when
    /// there is none (ENXIO) or the file system cannot tell.
    pub fn seek_data(&self, offset: u64) -> Option<u64> {
        crate::sys::lseek(self.fd(), offset, libc::SEEK_DATA)
    }

    /// The next hole at or after `offset` (lseek SEEK_HOLE; EOF counts as a hole).
    pub fn seek_hole(&self, offset: u64) -> Option<u64> {
        crate::sys::lseek(self.fd(), offset, libc::SEEK_HOLE)
    }

    /// Preallocates a range (fallocate mode 0), extending the file if needed.
    pub fn allocate(&self, off: u64, len: u64) -> io::Result<()> {
        self.check_usable()?;
        crate::sys::fallocate(self.fd(), 0, off, len)
    }
}

impl Alignment {
    /// The smallest aligned range covering `[off, off + len)`.
    fn widen(&self, off: u64, len: usize) -> (u64, usize) {
        let a = self.offset.max(1) as u64;
        let start = off / a * a;
        let end = (off + len as u64).div_ceil(a) * a;
        (start, (end - start) as usize)
    }
}

/// pread until `buf` is full; bytes past EOF are zero.
fn read_full(file: &File, buf: &mut [u8], off: u64) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], off + done as u64) {
            Ok(0) => {
                buf[done..].fill(0);
                return Ok(());
            }
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Probes O_DIRECT alignment: statx(STATX_DIOALIGN) where the kernel reports it, the logical
/// block size of block devices, then trial reads of growing size; 4096 if nothing answers.
fn probe_alignment(file: &File, block_device: bool) -> Alignment {
    if let Some(a) = crate::sys::statx_dio_align(file.as_raw_fd()) {
        return a;
    }
    if block_device {
        if let Ok(lbs) = crate::sys::logical_block_size(file.as_raw_fd()) {
            return Alignment {
                offset: lbs,
                memory: lbs,
            };
        }
    }
    // Trial reads: the first size that the kernel accepts at offset 0 (QEMU does the same).
    // An empty file answers 0 for everything, so only trust a read that returned data.
    let buf = AlignedBuf::new(4096, 4096);
    for size in [512usize, 1024, 2048, 4096] {
        // SAFETY: buf is valid for 4096 bytes; the kernel writes at most `size` <= 4096 bytes.
        #[allow(unsafe_code)]
        let r =
            unsafe { libc::pread(file.as_raw_fd(), buf.as_ptr() as *mut libc::c_void, size, 0) };
        if r > 0 {
            return Alignment {
                offset: size as u32,
                memory: size as u32,
            };
        }
        if r == 0 {
            break;
        }
    }
    Alignment {
        offset: 4096,
        memory: 4096,
    }
}
