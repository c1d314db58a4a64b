//! Where an image's bytes live: the [`Storage`] trait, a byte-addressed store.
//!
//! Formats (raw, qcow2) read and write their metadata and data through a `Storage`, never
//! through a file descriptor, so that a format runs over any storage (QEMU's `bs->file`):
//! a local file or block device ([`ImageFile`]), memory ([`MemStorage`], for tests and
//! fuzzing), later an NBD server or an RBD image.
//!
//! Two paths reach a storage:
//! - the **synchronous** methods of the trait (metadata, slow path, tools), thread-safe;
//! - the **asynchronous** path of an image queue. A storage with a file descriptor
//!   ([`Storage::fd`]) is reached by the queue's own engine (io_uring by default: the data
//!   goes between the guest's pages and the kernel with no copy). A storage without one
//!   brings an engine of its own ([`Storage::open_engine`]), built once per queue, whose
//!   completions the queue reaps like the fd engine's (an NBD client would submit on its
//!   socket and complete from its replies), not a bounce through worker threads. A storage
//!   with neither is served by the queue's slow-path workers.

use std::borrow::Cow;
use std::fmt;
use std::io;
use std::os::unix::io::RawFd;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use crate::buf::{IoBuf, IoSlice};
use crate::cache::{AioKind, CacheMode};
use crate::engine::{Completion, Engine, EngineConfig, Op, OpKind};
use crate::file::{Alignment, ImageFile};
use crate::sys::EventFd;

/// What a storage knows of the first run of a range (see [`Storage::allocation`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Allocation {
    /// `len` bytes that hold data (or of which the storage cannot tell).
    Data {
        /// Length of the run in bytes.
        len: u64,
    },
    /// `len` bytes of a hole: they read as zeroes without being stored.
    Hole {
        /// Length of the run in bytes.
        len: u64,
    },
}

impl Allocation {
    /// Length of the run.
    pub fn len(&self) -> u64 {
        match *self {
            Allocation::Data { len } | Allocation::Hole { len } => len,
        }
    }
    /// Whether the run is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A byte-addressed store that images live on.
///
/// Every method is thread-safe. Errors are `std::io::Error`s, so that a format can tell
/// ENOSPC, EIO and EOPNOTSUPP apart whatever the storage.
pub trait Storage: Send + Sync + fmt::Debug {
    /// How messages name this storage (a path, a URI).
    fn name(&self) -> Cow<'_, str>;

    /// The local path, for storages that are host files (relative backing file names of
    /// an image are resolved against its directory).
    fn local_path(&self) -> Option<&std::path::Path> {
        None
    }

    /// Size in bytes.
    fn size(&self) -> io::Result<u64>;

    /// Changes the size (growing reads as zeroes). Storages of fixed size (block devices)
    /// answer `Unsupported`.
    fn set_size(&self, len: u64) -> io::Result<()>;

    /// Reads exactly `buf.len()` bytes at `off`; bytes past the end read as zeroes.
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()>;

    /// Writes all of `buf` at `off` (any alignment), growing the storage if it can.
    fn write_at(&self, buf: &[u8], off: u64) -> io::Result<()>;

    /// Makes every completed write durable. A failure breaks the storage
    /// ([`Storage::mark_broken`]).
    fn flush(&self) -> io::Result<()>;

    /// Releases the space of a range. Afterwards it reads as zeroes if
    /// [`Storage::discard_zeroes`], else its contents are unspecified. Storages that cannot
    /// discard answer `Unsupported` (or EOPNOTSUPP).
    fn discard(&self, off: u64, len: u64) -> io::Result<()>;

    /// Whether a discarded range reads as zeroes afterwards.
    fn discard_zeroes(&self) -> bool {
        false
    }

    /// Makes a range read as zeroes as cheaply as the storage allows, without changing its
    /// size.
    fn write_zeroes(&self, off: u64, len: u64) -> io::Result<()>;

    /// Writes `len` zero bytes at `off` by plain writes (allocating them), whatever cheaper
    /// ways the storage has.
    fn write_zeroes_by_writing(&self, off: u64, len: u64) -> io::Result<()> {
        const CHUNK: u64 = 1 << 20;
        let zero = vec![0u8; CHUNK.min(len) as usize];
        let end = off
            .checked_add(len)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "range overflows"))?;
        let mut pos = off;
        while pos < end {
            let n = (end - pos).min(CHUNK) as usize;
            self.write_at(&zero[..n], pos)?;
            pos += n as u64;
        }
        Ok(())
    }

    /// Reserves space for a range (fallocate mode 0), growing the storage if needed.
    fn preallocate(&self, off: u64, len: u64) -> io::Result<()>;

    /// Allocates `[from, to)` of a growing file ahead of the writes that will fill it and
    /// extends the file to `to` (the range reads as zeroes). A format that appends clusters
    /// calls it so that its direct writes land inside the file: Linux file systems serialise
    /// direct writes that extend a file (ext4 holds the inode lock, exclusively, across the
    /// I/O), so concurrent appends would go one at a time, while writes into allocated
    /// (unwritten) extents run side by side. Returns false when the storage does not do
    /// this (block devices, files without O_DIRECT, storages that are not files): writes
    /// past the end then extend it as before.
    fn allocate_ahead(&self, from: u64, to: u64) -> io::Result<bool> {
        let _ = (from, to);
        Ok(false)
    }

    /// The first run of `[off, off + len)` (`len` > 0): data or hole. Storages that cannot
    /// tell answer data.
    fn allocation(&self, off: u64, len: u64) -> Allocation {
        let _ = off;
        Allocation::Data { len }
    }

    /// Bytes the storage uses on the host (`None`: it cannot tell).
    fn allocated_bytes(&self) -> io::Result<Option<u64>> {
        Ok(None)
    }

    /// Whether it was opened read-only.
    fn read_only(&self) -> bool;

    /// The cache mode it was opened with.
    fn cache(&self) -> CacheMode;

    /// Alignment that asynchronous I/O needs (offset, length, memory).
    fn alignment(&self) -> Alignment {
        Alignment::NONE
    }

    /// Whether a flush failed (see [`Storage::mark_broken`]).
    fn is_broken(&self) -> bool;

    /// Records that a flush failed with `err`: written data may be lost without a later
    /// flush telling, so every later flush and write fails with EIO until it is reopened.
    fn mark_broken(&self, err: &io::Error);

    /// EIO once the storage is broken.
    fn check_usable(&self) -> io::Result<()> {
        if self.is_broken() {
            Err(io::Error::from_raw_os_error(libc::EIO))
        } else {
            Ok(())
        }
    }

    /// The file descriptor that a queue's fd engine (io_uring, native AIO, threads) reads,
    /// writes and syncs for this storage, if it has one.
    fn fd(&self) -> Option<RawFd> {
        None
    }

    /// The asynchronous path of a storage without a file descriptor: an engine for one
    /// queue. Its operations carry `fd: -1`; its completions must make `notify` readable
    /// (the engine's [`Engine::event_fd`] returns `notify`'s fd). `None`: the storage has
    /// no asynchronous path (its I/O goes to the queue's slow-path workers).
    fn open_engine(
        self: Arc<Self>,
        cfg: &EngineConfig,
        notify: Arc<EventFd>,
    ) -> Option<io::Result<Box<dyn Engine<IoSlice>>>> {
        let _ = (cfg, notify);
        None
    }

    /// The host file, for storages that are one (tests inject faults through it).
    fn as_file(&self) -> Option<&ImageFile> {
        None
    }

    /// Takes a snapshot `name` of the storage itself, of what it holds now (an RBD image's
    /// `rbd snap create`): for storages that have snapshots; others answer `Unsupported`.
    /// The caller makes sure nothing is in flight and everything is flushed.
    fn create_snapshot(&self, name: &str) -> io::Result<()> {
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            format!(
                "{}: this storage has no snapshots of its own ({name})",
                self.name()
            ),
        ))
    }
}

/// A shared storage handle, as formats and extents hold it.
pub type StorageRef = Arc<dyn Storage>;

/// Whether two handles name the same storage object.
pub fn same_storage(a: &StorageRef, b: &StorageRef) -> bool {
    std::ptr::addr_eq(Arc::as_ptr(a), Arc::as_ptr(b))
}

impl Storage for ImageFile {
    fn name(&self) -> Cow<'_, str> {
        self.path().to_string_lossy()
    }
    fn local_path(&self) -> Option<&std::path::Path> {
        Some(self.path())
    }
    fn size(&self) -> io::Result<u64> {
        self.len()
    }
    fn set_size(&self, len: u64) -> io::Result<()> {
        self.set_len(len)
    }
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        ImageFile::read_at(self, buf, off)
    }
    fn write_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        ImageFile::write_at(self, buf, off)
    }
    fn flush(&self) -> io::Result<()> {
        ImageFile::flush(self)
    }
    fn discard(&self, off: u64, len: u64) -> io::Result<()> {
        self.punch_hole(off, len)
    }
    fn discard_zeroes(&self) -> bool {
        // PUNCH_HOLE reads back zeroes; BLKDISCARD leaves the contents unspecified.
        !self.is_block_device()
    }
    fn write_zeroes(&self, off: u64, len: u64) -> io::Result<()> {
        self.zero_range(off, len)
    }
    fn write_zeroes_by_writing(&self, off: u64, len: u64) -> io::Result<()> {
        ImageFile::write_zeroes_by_writing(self, off, len)
    }
    fn preallocate(&self, off: u64, len: u64) -> io::Result<()> {
        self.allocate(off, len)
    }
    fn allocate_ahead(&self, from: u64, to: u64) -> io::Result<bool> {
        // Buffered writes that extend a file hold its lock only for the copy into the page
        // cache: nothing to gain there.
        if self.is_block_device() || ImageFile::read_only(self) || !ImageFile::cache(self).direct()
        {
            return Ok(false);
        }
        if to <= from {
            return Ok(true);
        }
        match self.allocate(from, to - from) {
            Ok(()) => Ok(true),
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => Ok(false),
            Err(e) => Err(e),
        }
    }
    fn allocation(&self, off: u64, len: u64) -> Allocation {
        match self.seek_data(off) {
            // A hole up to the next data (or EOF).
            Some(d) if d > off => Allocation::Hole {
                len: (d - off).min(len),
            },
            Some(_) => {
                let hole = self.seek_hole(off).unwrap_or(off.saturating_add(len));
                Allocation::Data {
                    len: hole.saturating_sub(off).clamp(1, len),
                }
            }
            // ENXIO: no data after `off` in a file (all hole); a block device, or a file
            // system that cannot tell: data.
            None if self.is_block_device() => Allocation::Data { len },
            None => Allocation::Hole { len },
        }
    }
    fn allocated_bytes(&self) -> io::Result<Option<u64>> {
        ImageFile::allocated_bytes(self).map(Some)
    }
    fn read_only(&self) -> bool {
        ImageFile::read_only(self)
    }
    fn cache(&self) -> CacheMode {
        ImageFile::cache(self)
    }
    fn alignment(&self) -> Alignment {
        ImageFile::alignment(self)
    }
    fn is_broken(&self) -> bool {
        ImageFile::is_broken(self)
    }
    fn mark_broken(&self, err: &io::Error) {
        ImageFile::mark_broken(self, err)
    }
    fn check_usable(&self) -> io::Result<()> {
        ImageFile::check_usable(self)
    }
    fn fd(&self) -> Option<RawFd> {
        Some(ImageFile::fd(self))
    }
    fn as_file(&self) -> Option<&ImageFile> {
        Some(self)
    }
}

/// A storage in memory: the bytes of an image in a `Vec`, with an asynchronous path of its
/// own ([`MemEngine`]). For tests (formats over a storage that is not a file, the queue's
/// engine-per-storage path) and fuzzing (images parsed without touching the disk).
pub struct MemStorage {
    name: String,
    data: RwLock<Vec<u8>>,
    read_only: bool,
    /// The largest size it may grow to (writes past it fail with ENOSPC).
    max_size: u64,
    broken: std::sync::OnceLock<String>,
}

impl fmt::Debug for MemStorage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemStorage")
            .field("name", &self.name)
            .field("size", &self.data_len())
            .field("read_only", &self.read_only)
            .finish()
    }
}

impl MemStorage {
    /// Default of the size limit: 1 GiB.
    pub const DEFAULT_MAX_SIZE: u64 = 1 << 30;

    /// A storage holding `data`, named `name` in messages.
    pub fn new(name: impl Into<String>, data: Vec<u8>, read_only: bool) -> MemStorage {
        MemStorage {
            name: name.into(),
            data: RwLock::new(data),
            read_only,
            max_size: Self::DEFAULT_MAX_SIZE,
            broken: std::sync::OnceLock::new(),
        }
    }

    /// Sets the size it may grow to.
    pub fn with_max_size(mut self, max: u64) -> MemStorage {
        self.max_size = max;
        self
    }

    /// A copy of its bytes.
    pub fn to_vec(&self) -> Vec<u8> {
        self.read().clone()
    }

    fn data_len(&self) -> usize {
        self.read().len()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Vec<u8>> {
        self.data.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Vec<u8>> {
        self.data.write().unwrap_or_else(|e| e.into_inner())
    }

    fn writable(&self) -> io::Result<()> {
        if self.read_only {
            return Err(io::Error::from_raw_os_error(libc::EBADF));
        }
        self.check_usable()
    }

    /// The end of `[off, off + len)`, if the storage may hold it.
    fn end_of(&self, off: u64, len: usize) -> io::Result<usize> {
        match off.checked_add(len as u64) {
            Some(end) if end <= self.max_size => Ok(end as usize),
            _ => Err(io::Error::from_raw_os_error(libc::ENOSPC)),
        }
    }

    /// Reads into any [`IoBuf`] (the engine's path).
    fn read_into<B: IoBuf>(&self, buf: &mut B, off: u64) -> io::Result<usize> {
        let d = self.read();
        let len = buf.total_len();
        let start = usize::try_from(off).unwrap_or(usize::MAX).min(d.len());
        let end = start.saturating_add(len).min(d.len());
        buf.copy_in(0, &d[start..end]);
        // Like pread: a short count at the end of the storage.
        Ok(end - start)
    }

    /// Writes from any [`IoBuf`] (the engine's path).
    fn write_from<B: IoBuf>(&self, buf: &mut B, off: u64) -> io::Result<usize> {
        self.writable()?;
        let len = buf.total_len();
        let end = self.end_of(off, len)?;
        let mut d = self.write();
        if d.len() < end {
            d.resize(end, 0);
        }
        buf.copy_out(0, &mut d[off as usize..end]);
        Ok(len)
    }
}

impl Storage for MemStorage {
    fn name(&self) -> Cow<'_, str> {
        Cow::Borrowed(&self.name)
    }
    fn size(&self) -> io::Result<u64> {
        Ok(self.data_len() as u64)
    }
    fn set_size(&self, len: u64) -> io::Result<()> {
        self.writable()?;
        let end = self.end_of(len, 0)?;
        self.write().resize(end, 0);
        Ok(())
    }
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        let d = self.read();
        let start = usize::try_from(off).unwrap_or(usize::MAX).min(d.len());
        let end = start.saturating_add(buf.len()).min(d.len());
        let n = end - start;
        buf[..n].copy_from_slice(&d[start..end]);
        buf[n..].fill(0);
        Ok(())
    }
    fn write_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        self.writable()?;
        let end = self.end_of(off, buf.len())?;
        let mut d = self.write();
        if d.len() < end {
            d.resize(end, 0);
        }
        d[off as usize..end].copy_from_slice(buf);
        Ok(())
    }
    fn flush(&self) -> io::Result<()> {
        self.check_usable()
    }
    fn discard(&self, off: u64, len: u64) -> io::Result<()> {
        self.write_zeroes(off, len)
    }
    fn discard_zeroes(&self) -> bool {
        true
    }
    fn write_zeroes(&self, off: u64, len: u64) -> io::Result<()> {
        self.writable()?;
        let mut d = self.write();
        let size = d.len() as u64;
        let start = off.min(size) as usize;
        let end = off.saturating_add(len).min(size) as usize;
        d[start..end].fill(0);
        Ok(())
    }
    fn preallocate(&self, off: u64, len: u64) -> io::Result<()> {
        self.writable()?;
        let end = self.end_of(off, usize::try_from(len).unwrap_or(usize::MAX))?;
        let mut d = self.write();
        if d.len() < end {
            d.resize(end, 0);
        }
        Ok(())
    }
    fn allocated_bytes(&self) -> io::Result<Option<u64>> {
        Ok(Some(self.data_len() as u64))
    }
    fn read_only(&self) -> bool {
        self.read_only
    }
    fn cache(&self) -> CacheMode {
        CacheMode::WriteBack
    }
    fn is_broken(&self) -> bool {
        self.broken.get().is_some()
    }
    fn mark_broken(&self, err: &io::Error) {
        self.broken.get_or_init(|| err.to_string());
    }
    fn open_engine(
        self: Arc<Self>,
        cfg: &EngineConfig,
        notify: Arc<EventFd>,
    ) -> Option<io::Result<Box<dyn Engine<IoSlice>>>> {
        Some(Ok(Box::new(MemEngine::new(self, cfg, notify))))
    }
}

/// The asynchronous path of a [`MemStorage`]: operations run at `commit` (the storage's
/// "device" is memory), their completions wait in a queue for `reap`, and `notify` is
/// signalled, as a network storage's engine would do when replies arrive.
pub struct MemEngine {
    mem: Arc<MemStorage>,
    queued: Vec<Op<IoSlice>>,
    done: std::collections::VecDeque<Completion<IoSlice>>,
    notify: Arc<EventFd>,
    capacity: usize,
}

impl MemEngine {
    /// An engine over `mem` whose completions signal `notify`.
    pub fn new(mem: Arc<MemStorage>, cfg: &EngineConfig, notify: Arc<EventFd>) -> MemEngine {
        MemEngine {
            mem,
            queued: Vec::new(),
            done: std::collections::VecDeque::new(),
            notify,
            capacity: cfg.queue_depth.max(1) as usize,
        }
    }

    fn run(&self, op: &mut Op<IoSlice>) -> io::Result<usize> {
        match (op.kind, op.buf.as_mut()) {
            (OpKind::Read, Some(b)) => self.mem.read_into(b, op.offset),
            (OpKind::Write, Some(b)) => self.mem.write_from(b, op.offset),
            (OpKind::Flush, _) => self.mem.flush().map(|()| 0),
            (OpKind::Fallocate { len, .. }, _) => self.mem.write_zeroes(op.offset, len).map(|()| 0),
            _ => Err(io::Error::from_raw_os_error(libc::EINVAL)),
        }
    }
}

impl Engine<IoSlice> for MemEngine {
    fn kind(&self) -> AioKind {
        AioKind::Threads
    }
    fn submit(&mut self, op: Op<IoSlice>) -> Result<(), (Op<IoSlice>, io::Error)> {
        if self.in_flight() >= self.capacity {
            return Err((op, io::Error::from(io::ErrorKind::WouldBlock)));
        }
        self.queued.push(op);
        Ok(())
    }
    fn commit(&mut self) -> io::Result<()> {
        if self.queued.is_empty() {
            return Ok(());
        }
        for mut op in std::mem::take(&mut self.queued) {
            let result = self.run(&mut op);
            self.done.push_back(Completion {
                user_data: op.user_data,
                result,
                buf: op.buf,
                phase: crate::Phase::Done,
            });
        }
        self.notify.signal();
        Ok(())
    }
    fn reap(
        &mut self,
        out: &mut Vec<Completion<IoSlice>>,
        _min: usize,
        _timeout: Option<Duration>,
    ) -> io::Result<usize> {
        // Every committed op has completed: waiting could not bring more.
        self.commit()?;
        let n = self.done.len();
        out.extend(self.done.drain(..));
        Ok(n)
    }
    fn event_fd(&self) -> RawFd {
        self.notify.fd()
    }
    fn clear_event_fd(&self) -> bool {
        // Shared with the queue's other notifications: the queue drains it.
        false
    }
    fn in_flight(&self) -> usize {
        self.queued.len() + self.done.len()
    }
    fn capacity(&self) -> usize {
        self.capacity
    }
}
