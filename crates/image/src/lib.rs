//! The xdisk image engine: a format-independent interface over raw and qcow2 images.
//!
//! Shape (built for the backend): one [`Image`] is opened once and shared (`Arc`) by several
//! queues. Each queue runs an [`queue::ImageQueue`] with its own I/O engine. A request is first
//! *mapped* ([`Image::map`]): metadata is resolved under the format's lock into [`Extent`]s
//! (host data or zeroes) without waiting on disk I/O, and the data I/O runs on the queue's
//! engine outside any lock. What cannot be mapped that way (metadata not cached, cluster
//! allocation, copy-on-write, compressed clusters, unaligned I/O) takes the *slow path*: the
//! blocking methods ([`Image::read_at`], [`Image::write_at`], ...) run on a worker thread, so
//! a metadata miss delays only the requests that need it.
//!
//! `unsafe` is denied crate-wide; the queue's two borrows of a request buffer for in-flight
//! I/O ([`xdisk_io::IoSlice::new`]) allow it, each with its `// SAFETY:` comment.

#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod cbw;
pub mod create;
pub mod driver;
pub mod qcow2;
pub mod queue;
pub mod raw;
pub mod source;

pub use create::{create, create_on, CreateOptions, Preallocation};
pub use driver::{FormatDriver, FormatInfo, SnapshotInfo};
pub use qcow2::check::{CheckReport, Repair};
pub use qcow2::format::CompressionType;
pub use source::{DiskSource, Location};

use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use xdisk_io::{AioKind, CacheMode, ImageFile, Storage, StorageRef};

/// Errors of the image engine.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An I/O error of the storage (host ENOSPC and EIO included), with what we were doing.
    #[error("{context}: {source}")]
    Io {
        /// What was being done, on which storage (e.g. `read from /path/disk.qcow2`).
        context: String,
        /// The OS error itself.
        #[source]
        source: std::io::Error,
    },
    /// The image's metadata is malformed or inconsistent (a bad header, a table outside the
    /// file, reserved bits set, a corrupt compressed cluster...).
    #[error("image is corrupt: {0}")]
    Corrupt(String),
    /// A valid image or request that this engine does not serve (encryption, external data
    /// files, unknown incompatible features, an unknown format name...).
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// A bad argument from the caller (create options, a request without a buffer...).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// A request that does not lie inside the virtual disk.
    #[error("request at {offset}+{len} is outside the image ({size} bytes)")]
    OutOfRange {
        /// Start of the request, in bytes.
        offset: u64,
        /// Length of the request, in bytes.
        len: u64,
        /// Virtual size of the image, in bytes.
        size: u64,
    },
    /// A write (or repair) to an image opened read-only.
    #[error("image is read-only")]
    ReadOnly,
    /// A backing file that may not or cannot be opened: refused by
    /// [`check_backing_file`], a loop, a chain too deep, a probed format naming one...
    #[error("backing chain error: {0}")]
    Backing(String),
    /// A limit of the format was reached (a refcount at its maximum, a host offset past
    /// what qcow2 entries can address, a refcount table too large); host ENOSPC is
    /// [`Error::Io`].
    #[error("no space: {0}")]
    NoSpace(String),
    /// An error of the I/O layer, e.g. opening or creating an image file.
    #[error(transparent)]
    Engine(#[from] xdisk_io::Error),
}

impl Error {
    /// Wraps an io::Error with what we were doing.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Error {
        Error::Io {
            context: context.into(),
            source,
        }
    }
}

/// `Result` with this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

/// Image formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// The disk's bytes as they are ([`raw::RawImage`]).
    Raw,
    /// QEMU's qcow2, versions 2 and 3 ([`qcow2::Qcow2Image`]).
    Qcow2,
}

impl Format {
    /// The name as qemu-img spells it (`raw`, `qcow2`), also what `parse` accepts.
    pub fn as_str(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
        }
    }
}

impl std::str::FromStr for Format {
    type Err = Error;
    fn from_str(s: &str) -> Result<Format> {
        match s {
            "raw" => Ok(Format::Raw),
            "qcow2" => Ok(Format::Qcow2),
            _ => Err(Error::Unsupported(format!(
                "image format '{s}' (supported: raw, qcow2)"
            ))),
        }
    }
}

impl std::fmt::Display for Format {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How to open an image.
#[derive(Debug, Clone)]
pub struct OpenOptions {
    /// The format; `None` probes it (qcow2 magic, else raw).
    pub format: Option<Format>,
    /// Open the image read-only (writes fail with [`Error::ReadOnly`]). Backing files are
    /// always opened read-only.
    pub read_only: bool,
    /// Host cache mode of the image and of its backing files.
    pub cache: CacheMode,
    /// Open the backing chain (false: unallocated clusters read as zeroes, like
    /// `qemu-img -U`-less tools with `backing.driver=null`... used by check and info).
    pub open_backing: bool,
    /// Maximum backing chain depth (QEMU has no hard limit; a bound protects against
    /// hostile chains).
    pub max_backing_depth: usize,
    /// Refuse dirty (lazy-refcount, crashed) qcow2 images instead of repairing them on open.
    pub no_repair: bool,
    /// If not empty, backing files must lie inside one of these directories (compared after
    /// resolving symbolic links); others are refused. Empty: any regular file or block
    /// device outside /proc and /sys (see [`check_backing_file`]).
    pub backing_dirs: Vec<PathBuf>,
    /// The most memory (bytes) the refcount rebuild of a dirty qcow2 image may use (counts
    /// of every cluster of the file, the list of L2 tables, the L1 entries it walks). A
    /// rebuild that would need more is refused before anything is written.
    pub repair_memory_limit: u64,
    /// The most memory (bytes) the persistent dirty bitmaps of a qcow2 image may take
    /// together (one bit per granule of the virtual disk each; QEMU bounds one bitmap at
    /// 512 MiB). A writable open that would need more is refused.
    pub bitmap_memory_limit: u64,
}

/// Default of [`OpenOptions::repair_memory_limit`].
pub const DEFAULT_REPAIR_MEMORY_LIMIT: u64 = 256 << 20;
/// Default of [`OpenOptions::bitmap_memory_limit`].
pub const DEFAULT_BITMAP_MEMORY_LIMIT: u64 = 1 << 30;

impl Default for OpenOptions {
    fn default() -> Self {
        OpenOptions {
            format: None,
            read_only: false,
            cache: CacheMode::None,
            open_backing: true,
            max_backing_depth: 64,
            no_repair: false,
            backing_dirs: Vec::new(),
            repair_memory_limit: DEFAULT_REPAIR_MEMORY_LIMIT,
            bitmap_memory_limit: DEFAULT_BITMAP_MEMORY_LIMIT,
        }
    }
}

/// A piece of a mapped request (see [`Image::map`]).
#[derive(Debug, Clone)]
pub enum Extent {
    /// `len` bytes at `offset` of `storage`.
    Data {
        /// The storage holding the bytes (this layer's or a backing file's).
        storage: StorageRef,
        /// Byte offset in that storage.
        offset: u64,
        /// Length in bytes.
        len: u64,
    },
    /// `len` bytes that read as zeroes.
    Zero {
        /// Length in bytes.
        len: u64,
    },
}

impl Extent {
    /// Length of the extent in bytes.
    pub fn len(&self) -> u64 {
        match self {
            Extent::Data { len, .. } | Extent::Zero { len } => *len,
        }
    }
    /// Whether the extent is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Result of [`Image::map`].
#[derive(Debug)]
pub enum Mapping {
    /// Every byte of the range is in `extents` (in order); do the I/O, then drop the guard.
    Mapped(InFlight),
    /// The range needs the slow path (blocking methods on a worker thread).
    Slow,
}

/// Held by a caller for as long as I/O to extents handed out by [`Image::map`] is in flight.
/// Formats that free host clusters (qcow2 discard) do not reuse them while any guard from
/// before the free is alive, so a late write can never land in a reallocated cluster.
#[derive(Debug)]
pub struct InFlight {
    pub(crate) tracker: Option<Arc<qcow2::InFlightTracker>>,
    pub(crate) epoch: usize,
}

impl InFlight {
    /// A guard that tracks nothing (raw images).
    pub fn untracked() -> InFlight {
        InFlight {
            tracker: None,
            epoch: 0,
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Some(t) = &self.tracker {
            t.release(self.epoch);
        }
    }
}

/// Allocation status of a range (first run of equal status), composed over the chain.
/// Field meanings follow `qemu-img map --output=json`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockStatus {
    /// Length of the run in bytes.
    pub len: u64,
    /// Reads from host data (not known to be zero).
    pub data: bool,
    /// Reads as zeroes.
    pub zero: bool,
    /// Allocated in some layer of the chain.
    pub present: bool,
    /// The layer that answers: 0 = this image, 1 = its backing file, ...
    pub depth: u32,
    /// Host offset of the data, where it is stored uncompressed in a single file.
    pub offset: Option<u64>,
    /// Stored compressed (qcow2 compressed clusters).
    pub compressed: bool,
}

impl BlockStatus {
    /// `len` bytes that read as zeroes without data: allocated as zeroes in layer `depth`
    /// (`present`), or allocated nowhere down to `depth` (past the end or unallocated).
    fn zeroes(len: u64, present: bool, depth: u32) -> BlockStatus {
        BlockStatus {
            len,
            data: false,
            zero: true,
            present,
            depth,
            offset: None,
            compressed: false,
        }
    }
}

/// What one layer says of a range (formats return this; [`Image::block_status`] composes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerStatus {
    /// Host data at `offset` (None: compressed or otherwise not addressable).
    Data {
        /// Length of the run in bytes.
        len: u64,
        /// Byte offset of the data in this layer's storage (`None` as above).
        offset: Option<u64>,
        /// Stored compressed.
        compressed: bool,
    },
    /// Allocated in this layer, reads as zeroes.
    Zero {
        /// Length of the run in bytes.
        len: u64,
    },
    /// Not allocated in this layer: ask the backing file (or zeroes without one).
    Unallocated {
        /// Length of the run in bytes.
        len: u64,
    },
}

impl LayerStatus {
    /// Length of the run in bytes.
    pub fn len(&self) -> u64 {
        match *self {
            LayerStatus::Data { len, .. }
            | LayerStatus::Zero { len }
            | LayerStatus::Unallocated { len } => len,
        }
    }
    /// Whether the run is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// An open image of any format: one layer (its [`FormatDriver`]) over its storage, with its
/// backing chain.
#[derive(Debug)]
pub struct Image {
    driver: Box<dyn FormatDriver>,
    /// Set by [`Image::seal`]: the layer became the backing file of a live snapshot's
    /// overlay and takes no more writes.
    sealed: std::sync::atomic::AtomicBool,
    /// Whether `observer` holds one: the only thing a write looks at when none is installed
    /// (one relaxed atomic load, no lock).
    observed: std::sync::atomic::AtomicBool,
    /// Told of every change of the layer's contents before it happens (see
    /// [`WriteObserver`]).
    observer: std::sync::RwLock<Option<Arc<dyn WriteObserver>>>,
    /// Writes recorded in memory (see [`Image::start_write_tracking`]).
    written: WriteTracking,
}

/// Told of every change of an image layer's guest-visible contents before it happens: each
/// write, write of zeroes and discard that reaches the layer, through every path (the
/// blocking methods [`Image::write_at`], [`Image::write_zeroes`], [`Image::discard`],
/// [`Image::write_compressed_cluster`], and the fast path's [`Image::map`] for writes,
/// which every [`queue::ImageQueue`] uses). A backup's copy-before-write ([`cbw`]) is one:
/// it saves the old data of the range before the write may change it.
///
/// Installed and removed with [`Image::set_write_observer`], normally while every queue of
/// the image is paused (a write already mapped before the install would not be seen).
pub trait WriteObserver: Send + Sync + std::fmt::Debug {
    /// Whether a write of `[offset, offset + len)` must be told first. Cheap: it runs in
    /// the fast path's mapping of every write. `true` makes [`Image::map`] send the write
    /// to the slow path, whose blocking write calls [`WriteObserver::before_write`] on a
    /// worker thread (the queue's reactor thread never waits for the observer).
    fn wants(&self, offset: u64, len: u64) -> bool;

    /// Called before `[offset, offset + len)` of `image` changes; the change waits until it
    /// returns. It cannot fail the write: an observer that cannot do its work records that
    /// itself (the guest's write matters more than the observer's copy).
    fn before_write(&self, image: &Image, offset: u64, len: u64);
}

/// The in-memory record of the writes that reach an [`Image`], while a job asks for it.
#[derive(Debug, Default)]
struct WriteTracking {
    /// Whether `bits` records: the only thing the write paths look at otherwise.
    on: std::sync::atomic::AtomicBool,
    bits: std::sync::Mutex<Option<qcow2::bitmap::DirtyBitmap>>,
}

/// Probes the format of a file from its first bytes.
pub fn probe_format(storage: &dyn Storage) -> Result<Format> {
    let mut magic = [0u8; 4];
    storage
        .read_at(&mut magic, 0)
        .map_err(|e| Error::io(format!("cannot read {}", storage.name()), e))?;
    Ok(if u32::from_be_bytes(magic) == qcow2::format::MAGIC {
        Format::Qcow2
    } else {
        Format::Raw
    })
}

/// What the first bytes of a storage say, before anything is opened as an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Probed {
    /// The format the magic says (qcow2, else raw).
    pub format: Format,
    /// A qcow2 header that names a backing file (`backing_file_offset` not zero): opening
    /// it with a probed format would be refused (see [`Image::open`]).
    pub names_backing_file: bool,
}

/// Probes a storage's format and whether its header names a backing file.
pub fn probe(storage: &dyn Storage) -> Result<Probed> {
    let format = probe_format(storage)?;
    let mut off = [0u8; 8];
    if format == Format::Qcow2 {
        storage
            .read_at(&mut off, 8)
            .map_err(|e| Error::io(format!("cannot read {}", storage.name()), e))?;
    }
    Ok(Probed {
        format,
        names_backing_file: u64::from_be_bytes(off) != 0,
    })
}

impl Image {
    /// Opens an image and (unless told not to) its backing chain.
    ///
    /// Backing files are checked before they are opened (see [`check_backing_file`]), and an
    /// image whose format was probed (`opts.format` is `None`, or a backing file without a
    /// backing format) never gets its own backing file opened: it is refused with
    /// [`Error::Backing`]. Probing trusts the file's first bytes, which the guest of a raw
    /// disk controls: a guest writing a qcow2 header naming a host path would otherwise read
    /// that path (QEMU's CVE-2008-2004).
    pub fn open(path: &Path, opts: &OpenOptions) -> Result<Arc<Image>> {
        let mut chain = Vec::new();
        Self::open_chain(path, opts, opts.format, &mut chain, None)
    }

    /// Opens an image and as much of its backing chain as may and can be opened, for
    /// inspection (`img info --backing-chain`): where the next backing file is refused or
    /// fails to open, the chain ends there and the refusal is returned with it. Errors of
    /// the top image are errors.
    pub fn open_for_inspection(
        path: &Path,
        opts: &OpenOptions,
    ) -> Result<(Arc<Image>, Option<BackingRefusal>)> {
        let mut chain = Vec::new();
        let mut refusal = None;
        let img = Self::open_chain(path, opts, opts.format, &mut chain, Some(&mut refusal))?;
        Ok((img, refusal))
    }

    fn open_chain(
        path: &Path,
        opts: &OpenOptions,
        format: Option<Format>,
        chain: &mut Vec<PathBuf>,
        lenient: Option<&mut Option<BackingRefusal>>,
    ) -> Result<Arc<Image>> {
        let is_backing = !chain.is_empty();
        let checked = if is_backing {
            Some(check_backing_file(path, opts)?)
        } else {
            None
        };
        let canon = match &checked {
            Some(c) => c.path.clone(),
            None => std::fs::canonicalize(path)
                .map_err(|e| Error::io(format!("cannot open {}", path.display()), e))?,
        };
        enter_chain(chain, canon, opts)?;
        // Backing files are always opened read-only.
        let read_only = opts.read_only || is_backing;
        let file = ImageFile::open(path, read_only, opts.cache).map_err(Error::Engine)?;
        if let Some(c) = &checked {
            c.verify(&file)?;
        }
        Self::open_layer(Arc::new(file), Some(path), opts, format, chain, lenient)
    }

    /// Opens an image that lives on `storage` (any storage, not only host files). Backing
    /// files it names are host files, resolved against the directory of the storage's local
    /// path; an image on a storage without one cannot name a relative backing file.
    pub fn open_on(storage: StorageRef, opts: &OpenOptions) -> Result<Arc<Image>> {
        Self::open_on_with(storage, opts, None)
    }

    /// [`Image::open_on`]; with `lenient`, a backing file that cannot be opened ends the
    /// chain and is recorded there instead of failing the open.
    fn open_on_with(
        storage: StorageRef,
        opts: &OpenOptions,
        lenient: Option<&mut Option<BackingRefusal>>,
    ) -> Result<Arc<Image>> {
        let mut chain = Vec::new();
        if let Some(p) = storage.local_path() {
            chain.push(std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf()));
        }
        let base = storage.local_path().map(Path::to_path_buf);
        Self::open_layer(
            storage,
            base.as_deref(),
            opts,
            opts.format,
            &mut chain,
            lenient,
        )
    }

    /// Opens a backing file that lives on another storage (an `nbd://` URI or an `rbd:` name
    /// written in the image, as QEMU allows): read-only, counted in the chain's depth, never when backing
    /// files are limited to host directories (`backing_dirs`).
    fn open_uri_backing(
        src: &DiskSource,
        name: &str,
        opts: &OpenOptions,
        format: Option<Format>,
        chain: &mut Vec<PathBuf>,
        lenient: Option<&mut Option<BackingRefusal>>,
    ) -> Result<Arc<Image>> {
        if !opts.backing_dirs.is_empty() {
            return Err(Error::Backing(format!(
                "backing file '{name}' is not a host file, and backing files are limited to \
                 the directories {}",
                opts.backing_dirs
                    .iter()
                    .map(|d| d.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        enter_chain(chain, PathBuf::from(name), opts)?;
        let storage = src.open_storage(true, opts.cache)?;
        let opts = OpenOptions {
            read_only: true,
            ..opts.clone()
        };
        Self::open_layer(storage, None, &opts, format, chain, lenient)
    }

    /// [`Image::open_on`], opening as much of the backing chain as can be (see
    /// [`Image::open_for_inspection`]).
    pub fn open_on_for_inspection(
        storage: StorageRef,
        opts: &OpenOptions,
    ) -> Result<(Arc<Image>, Option<BackingRefusal>)> {
        let mut refusal = None;
        let img = Self::open_on_with(storage, opts, Some(&mut refusal))?;
        Ok((img, refusal))
    }

    /// Opens the format layer over an opened storage, then (for formats with one) its
    /// backing chain. `path` is where the storage was found (for relative backing names).
    fn open_layer(
        file: StorageRef,
        path: Option<&Path>,
        opts: &OpenOptions,
        format: Option<Format>,
        chain: &mut Vec<PathBuf>,
        mut lenient: Option<&mut Option<BackingRefusal>>,
    ) -> Result<Arc<Image>> {
        let read_only = file.read_only();
        let probed = format.is_none();
        let format = match format {
            Some(f) => f,
            None => probe_format(&*file)?,
        };
        let image = match format {
            Format::Raw => Box::new(raw::RawImage::open(file)?) as Box<dyn FormatDriver>,
            Format::Qcow2 => {
                let mut open_backing = |name: &str,
                                        fmt: Option<&str>|
                 -> Result<Option<Arc<Image>>> {
                    // The image that names it, for messages.
                    let here =
                        path.map_or_else(|| file.name().into_owned(), |p| p.display().to_string());
                    let target = backing_target(path, name);
                    let r = if probed {
                        Err(Error::Backing(format!(
                            "{here} names the backing file '{name}', but its format was probed \
                                 (not given): an image whose format is probed never opens its \
                                 backing file; give the format to open the chain (-f qcow2, \
                                 params=qcow2:{here}, OpenOptions.format, or a backing format in \
                                 the image that names it)"
                        )))
                    } else {
                        let bfmt = fmt.map(str::parse::<Format>).transpose();
                        match (&target, bfmt) {
                            (_, Err(e)) => Err(e),
                            (Err(e), _) => Err(Error::Backing(format!(
                                "backing file '{name}' of {here}: {e}"
                            ))),
                            (Ok(BackingTarget::Unresolvable), _) => Err(Error::Backing(format!(
                                "{here} names the backing file '{name}', a relative name, \
                                     but the image is not a host file: cannot determine the \
                                     backing file's absolute path (the image must name an \
                                     absolute path or a URI)"
                            ))),
                            (Ok(BackingTarget::File(bpath)), Ok(bfmt)) => {
                                Self::open_chain(bpath, opts, bfmt, chain, lenient.as_deref_mut())
                            }
                            (Ok(BackingTarget::Uri(src)), Ok(bfmt)) => Self::open_uri_backing(
                                src,
                                name,
                                opts,
                                bfmt,
                                chain,
                                lenient.as_deref_mut(),
                            ),
                        }
                    };
                    match (r, lenient.as_deref_mut()) {
                        (Ok(b), _) => Ok(Some(b)),
                        (Err(error), Some(slot)) => {
                            if slot.is_none() {
                                *slot = Some(BackingRefusal {
                                    image: PathBuf::from(&here),
                                    name: name.to_owned(),
                                    path: match target {
                                        Ok(BackingTarget::File(p)) => p,
                                        _ => PathBuf::from(name),
                                    },
                                    error,
                                });
                            }
                            Ok(None)
                        }
                        (Err(e), None) => Err(e),
                    }
                };
                let backing: Option<qcow2::OpenBacking<'_>> = if opts.open_backing {
                    Some(&mut open_backing)
                } else {
                    None
                };
                Box::new(qcow2::Qcow2Image::open(
                    file.clone(),
                    opts,
                    read_only,
                    backing,
                )?)
            }
        };
        Ok(Arc::new(Image::of_driver(image)))
    }

    fn of_driver(driver: Box<dyn FormatDriver>) -> Image {
        Image {
            driver,
            sealed: std::sync::atomic::AtomicBool::new(false),
            observed: std::sync::atomic::AtomicBool::new(false),
            observer: std::sync::RwLock::new(None),
            written: WriteTracking::default(),
        }
    }

    /// Opens the qcow2 overlay at `path` over an image that is already open: `backing`
    /// becomes its backing layer as it is (no second open of the backing chain), as a live
    /// external snapshot needs it (the running disk's top becomes the overlay's backing
    /// file). The overlay must name that image as its backing file (qcow2.txt "Header":
    /// `backing_file_offset`; the name resolved against the overlay's directory must be the
    /// same file) and, if it records a backing format ("Backing file format name"
    /// extension), `backing`'s format; its virtual size must be `backing`'s.
    pub fn open_overlay(
        path: &Path,
        opts: &OpenOptions,
        backing: Arc<Image>,
    ) -> Result<Arc<Image>> {
        use std::os::unix::fs::MetadataExt;
        let want = backing
            .storage()
            .local_path()
            .map(Path::to_path_buf)
            .ok_or_else(|| {
                Error::Unsupported(format!(
                    "{} is not a host file: it cannot be the backing file of a snapshot overlay",
                    backing.storage().name()
                ))
            })?;
        let want_meta = std::fs::metadata(&want)
            .map_err(|e| Error::io(format!("cannot stat {}", want.display()), e))?;
        let verify = |name: &str, fmt: Option<&str>| -> Result<()> {
            let target = resolve_backing(path, name);
            let same = std::fs::metadata(&target)
                .is_ok_and(|m| (m.dev(), m.ino()) == (want_meta.dev(), want_meta.ino()));
            if !same {
                return Err(Error::Backing(format!(
                    "{} names the backing file '{name}', not {}",
                    path.display(),
                    want.display()
                )));
            }
            match fmt {
                Some(f) if f != backing.format().as_str() => Err(Error::Backing(format!(
                    "{} names the backing format '{f}', but {} is {}",
                    path.display(),
                    want.display(),
                    backing.format()
                ))),
                _ => Ok(()),
            }
        };
        let check_size = |q: &qcow2::Qcow2Image| -> Result<()> {
            if q.size() != backing.size() {
                return Err(Error::InvalidArgument(format!(
                    "{} is {} bytes, but {} is {} bytes",
                    path.display(),
                    q.size(),
                    want.display(),
                    backing.size()
                )));
            }
            Ok(())
        };
        // Read-only first: nothing is written to a file that turns out not to be an overlay
        // of `backing`.
        {
            let file = ImageFile::open(path, true, opts.cache).map_err(Error::Engine)?;
            if probe_format(&file)? != Format::Qcow2 {
                return Err(Error::InvalidArgument(format!(
                    "{} is not a qcow2 image",
                    path.display()
                )));
            }
            let mut named = false;
            let mut look = |name: &str, fmt: Option<&str>| -> Result<Option<Arc<Image>>> {
                named = true;
                verify(name, fmt)?;
                Ok(None)
            };
            let ro = OpenOptions {
                read_only: true,
                ..opts.clone()
            };
            let q = qcow2::Qcow2Image::open(Arc::new(file), &ro, true, Some(&mut look))?;
            if !named {
                return Err(Error::Backing(format!(
                    "{} names no backing file (expected {})",
                    path.display(),
                    want.display()
                )));
            }
            check_size(&q)?;
        }
        let file = ImageFile::open(path, opts.read_only, opts.cache).map_err(Error::Engine)?;
        let mut named = false;
        let mut open_backing = |name: &str, fmt: Option<&str>| -> Result<Option<Arc<Image>>> {
            named = true;
            verify(name, fmt)?;
            Ok(Some(backing.clone()))
        };
        let q = qcow2::Qcow2Image::open(
            Arc::new(file),
            opts,
            opts.read_only,
            Some(&mut open_backing),
        )?;
        if !named {
            return Err(Error::Backing(format!(
                "{} changed while it was being opened",
                path.display()
            )));
        }
        check_size(&q)?;
        Ok(Arc::new(Image::of_driver(Box::new(q))))
    }

    /// Starts recording in memory, `granularity` bytes per bit (a power of two, 512 B to
    /// 1 GiB), the range of every write, write-zeroes and discard that reaches this layer
    /// from then on (the fast path's writes as they are mapped, [`Image::map`], before their
    /// data goes out; the slow path's as they start): what a mirror of a layer without
    /// persistent bitmaps (raw) copies again. Call it with no write in flight (a device's
    /// queues paused) so that none is missed; a recording in progress starts over.
    pub fn start_write_tracking(&self, granularity: u64) -> Result<()> {
        if !granularity.is_power_of_two() || !(512..=1 << 30).contains(&granularity) {
            return Err(Error::InvalidArgument(format!(
                "write tracking granularity {granularity}: expected a power of two from 512 \
                 to 1 GiB"
            )));
        }
        let bits = qcow2::bitmap::DirtyBitmap::new(self.size(), granularity.trailing_zeros(), 16)?;
        let mut b = self.written.bits.lock().unwrap_or_else(|e| e.into_inner());
        *b = Some(bits);
        self.written
            .on
            .store(true, std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }

    /// The ranges recorded since [`Image::start_write_tracking`] or the last take (whole
    /// granules, merged, in order), and clears them; empty when nothing records. A write
    /// in flight meanwhile may be recorded before or after: take with none in flight.
    pub fn take_written(&self) -> Vec<(u64, u64)> {
        let mut b = self.written.bits.lock().unwrap_or_else(|e| e.into_inner());
        match b.as_mut() {
            Some(bits) => {
                let r = bits.dirty_ranges();
                bits.clear();
                r
            }
            None => Vec::new(),
        }
    }

    /// Stops the recording of [`Image::start_write_tracking`] (nothing if none runs).
    pub fn stop_write_tracking(&self) {
        self.written
            .on
            .store(false, std::sync::atomic::Ordering::SeqCst);
        *self.written.bits.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// Records a write of `[offset, offset + len)` if writes are being tracked.
    #[inline]
    fn note_write(&self, offset: u64, len: u64) {
        if self.written.on.load(std::sync::atomic::Ordering::SeqCst) {
            if let Some(b) = self
                .written
                .bits
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .as_mut()
            {
                b.set_range(offset, len);
            }
        }
    }

    /// Makes this layer read-only for good (writes fail with [`Error::ReadOnly`], flushes do
    /// nothing): what a live snapshot does to the old top once it is the overlay's backing
    /// file. Metadata should be written back first ([`Image::close`]).
    pub fn seal(&self) {
        self.sealed.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// Installs (`Some`) or removes (`None`) the layer's [`WriteObserver`]; returns the one
    /// it replaces. Pause the image's queues around it: a write mapped before the install
    /// goes on unobserved.
    pub fn set_write_observer(
        &self,
        observer: Option<Arc<dyn WriteObserver>>,
    ) -> Option<Arc<dyn WriteObserver>> {
        use std::sync::atomic::Ordering;
        let mut slot = self.observer.write().unwrap_or_else(|e| e.into_inner());
        self.observed.store(observer.is_some(), Ordering::SeqCst);
        std::mem::replace(&mut *slot, observer)
    }

    /// The installed observer, if any (one atomic load when there is none).
    fn observer(&self) -> Option<Arc<dyn WriteObserver>> {
        if !self.observed.load(std::sync::atomic::Ordering::Acquire) {
            return None;
        }
        self.observer
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Tells the observer (if any) that `[offset, offset + len)` is about to change.
    fn before_write(&self, offset: u64, len: u64) {
        if let Some(o) = self.observer() {
            o.before_write(self, offset, len);
        }
    }

    /// The format of this layer.
    pub fn format(&self) -> Format {
        self.driver.format()
    }

    /// The format driver of this layer.
    pub fn driver(&self) -> &dyn FormatDriver {
        &*self.driver
    }

    /// The qcow2 layer, for qcow2's own tools and tests (`None` for other formats).
    pub fn as_qcow2(&self) -> Option<&qcow2::Qcow2Image> {
        self.driver.as_any().downcast_ref()
    }

    /// What `img info` shows of this layer's format.
    pub fn info(&self) -> FormatInfo {
        self.driver.info()
    }

    /// The storage of this layer.
    pub fn storage(&self) -> &StorageRef {
        self.driver.storage()
    }

    /// Virtual size in bytes.
    pub fn size(&self) -> u64 {
        self.driver.size()
    }

    /// Whether this layer is read-only (its storage was opened read-only); writes then fail
    /// with [`Error::ReadOnly`].
    pub fn read_only(&self) -> bool {
        self.sealed.load(std::sync::atomic::Ordering::SeqCst) || self.storage().read_only()
    }

    /// The backing image, if any.
    pub fn backing(&self) -> Option<&Arc<Image>> {
        self.driver.backing()
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        let size = self.size();
        match offset.checked_add(len) {
            Some(end) if end <= size => Ok(()),
            _ => Err(Error::OutOfRange { offset, len, size }),
        }
    }

    fn check_write(&self, offset: u64, len: u64) -> Result<()> {
        if self.read_only() {
            return Err(Error::ReadOnly);
        }
        if self.storage().is_broken() {
            // A flush failed: acknowledged writes may be lost, nothing more may be written
            // (fast-path writes go to the engine without the storage's own check).
            return Err(Error::io(
                format!("write to {}", self.storage().name()),
                std::io::Error::from_raw_os_error(libc::EIO),
            ));
        }
        self.check_range(offset, len)
    }

    /// Blocking read of `buf.len()` bytes at `offset` (the slow path; thread-safe).
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.check_range(offset, buf.len() as u64)?;
        self.driver.read_at(buf, offset)
    }

    /// Blocking write (the slow path; thread-safe).
    pub fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.check_write(offset, buf.len() as u64)?;
        self.before_write(offset, buf.len() as u64);
        self.note_write(offset, buf.len() as u64);
        self.driver.write_at(buf, offset)
    }

    /// Writes guest cluster `cluster` whole and compressed (qcow2 only; see
    /// [`qcow2::Qcow2Image::write_compressed_cluster`]). Returns whether it was stored
    /// compressed (it is written uncompressed when that is not smaller or the cluster is
    /// already allocated).
    pub fn write_compressed_cluster(&self, cluster: u64, data: &[u8]) -> Result<bool> {
        if let Some(cs) = self.cluster_size() {
            self.before_write(cluster.saturating_mul(cs), cs);
            self.note_write(cluster.saturating_mul(cs), cs);
        }
        self.driver.write_compressed_cluster(cluster, data)
    }

    /// The cluster size of a qcow2 image (`None` for raw images).
    pub fn cluster_size(&self) -> Option<u64> {
        self.driver.cluster_size()
    }

    /// Makes the file show every completed write to another reader (qemu-img, a backup, the
    /// next open): metadata the format keeps in memory is written back (with the syncs its
    /// crash-safe order needs). Unlike [`Image::flush`], no sync when there is nothing to
    /// write (raw: never), so it stays cheap on a busy disk.
    pub fn write_back_metadata(&self) -> Result<()> {
        self.driver.write_back_metadata()
    }

    /// The unit in which discards release space, as the guest should be told
    /// (`discard-granularity`): a qcow2 cluster (a smaller discard only zeroes), 4 KiB for
    /// raw images.
    pub fn discard_granularity(&self) -> u32 {
        self.driver.discard_granularity()
    }

    /// Makes every completed write durable (metadata included).
    pub fn flush(&self) -> Result<()> {
        if self.read_only() {
            return Ok(());
        }
        self.driver.flush()
    }

    /// Discards a range: afterwards it reads as zeroes (qcow2 v3, raw on filesystems that
    /// punch holes) or from the backing file (qcow2 v2 without zero clusters: see qcow2 docs).
    /// Host space is released where the format allows.
    pub fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.check_write(offset, len)?;
        self.before_write(offset, len);
        self.note_write(offset, len);
        self.driver.discard(offset, len)
    }

    /// Makes a range read as zeroes; `unmap` allows releasing host space.
    pub fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<()> {
        self.check_write(offset, len)?;
        self.before_write(offset, len);
        self.note_write(offset, len);
        self.driver.write_zeroes(offset, len, unmap)
    }

    /// Status of this layer only, for the first run starting at `offset` (at most `len`).
    pub fn layer_status(&self, offset: u64, len: u64) -> Result<LayerStatus> {
        self.check_range(offset, len)?;
        self.driver.layer_status(offset, len)
    }

    /// Allocation status through the backing chain, for the first run starting at `offset`.
    pub fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus> {
        self.check_range(offset, len)?;
        let mut layer: &Image = self;
        let mut depth = 0u32;
        let mut len = len;
        loop {
            if offset >= layer.size() {
                // Past the end of a shorter backing file: zeroes.
                return Ok(BlockStatus::zeroes(len, false, depth));
            }
            let l = layer.layer_status(offset, len.min(layer.size() - offset))?;
            len = l.len();
            match l {
                LayerStatus::Data {
                    offset: host,
                    compressed,
                    ..
                } => {
                    return Ok(BlockStatus {
                        len,
                        data: true,
                        zero: false,
                        present: true,
                        depth,
                        offset: host,
                        compressed,
                    })
                }
                LayerStatus::Zero { .. } => return Ok(BlockStatus::zeroes(len, true, depth)),
                LayerStatus::Unallocated { .. } => match layer.backing() {
                    Some(b) => {
                        layer = b;
                        depth += 1;
                    }
                    None => return Ok(BlockStatus::zeroes(len, false, depth)),
                },
            }
        }
    }

    /// Takes up a change of the storage's size made elsewhere (an RBD image resized with
    /// `rbd resize`, a raw file or block device grown by another program): for raw images
    /// the virtual size follows the storage's; returns the new size if it changed. Formats
    /// whose size is in their metadata (qcow2) keep theirs (`None`).
    pub fn refresh_size(&self) -> Result<Option<u64>> {
        self.driver.refresh_size()
    }

    /// Changes the virtual size. Growing exposes zeroes; shrinking drops data past the end.
    pub fn resize(&self, new_size: u64) -> Result<()> {
        if self.read_only() {
            return Err(Error::ReadOnly);
        }
        self.driver.resize(new_size)
    }

    /// Fast-path mapping: resolves `[offset, offset+len)` into extents without waiting on
    /// disk I/O, or answers [`Mapping::Slow`]. For writes (`write = true`) only ranges that
    /// can be overwritten in place are mapped (allocated, not shared, not compressed).
    pub fn map(
        &self,
        offset: u64,
        len: u64,
        write: bool,
        out: &mut Vec<Extent>,
    ) -> Result<Mapping> {
        if write {
            self.check_write(offset, len)?;
            // A write the observer must see first goes to the slow path, whose blocking
            // write tells it on a worker thread (never on the queue's reactor thread).
            if self.observer().is_some_and(|o| o.wants(offset, len)) {
                return Ok(Mapping::Slow);
            }
            self.note_write(offset, len);
        } else {
            self.check_range(offset, len)?;
        }
        self.driver.map(offset, len, write, out)
    }

    /// Flushes and releases what the format keeps open (clears qcow2's dirty state). Also run
    /// on drop, where errors can only be logged.
    pub fn close(&self) -> Result<()> {
        self.driver.close()
    }

    /// Bytes used on the host by this layer's storage (`None`: the storage cannot tell).
    pub fn actual_size(&self) -> Result<Option<u64>> {
        self.storage()
            .allocated_bytes()
            .map_err(|e| Error::io("cannot stat image", e))
    }
}

/// Checks (and with `repair`, repairs) the image of `format` on `storage` (qemu-img check).
/// Formats without metadata to check answer [`Error::Unsupported`] (qemu-img's exit 63).
pub fn check(storage: &dyn Storage, format: Format, repair: Repair) -> Result<CheckReport> {
    match format {
        Format::Qcow2 => qcow2::check::check(storage, repair),
        Format::Raw => Err(Error::Unsupported(
            "This image format does not support checks".into(),
        )),
    }
}

/// Resolves a backing file name relative to the directory of the image that names it
/// (as QEMU does), unless it is absolute.
pub fn resolve_backing(image: &Path, name: &str) -> PathBuf {
    let p = Path::new(name);
    if p.is_absolute() {
        return p.to_path_buf();
    }
    match image.parent() {
        Some(dir) => dir.join(p),
        None => p.to_path_buf(),
    }
}

/// Adds `layer` (a canonical path, or a URI) to the chain being opened, refusing a loop and
/// a chain deeper than `opts.max_backing_depth`.
fn enter_chain(chain: &mut Vec<PathBuf>, layer: PathBuf, opts: &OpenOptions) -> Result<()> {
    if chain.contains(&layer) {
        return Err(Error::Backing(format!(
            "backing chain loops: {} appears twice",
            layer.display()
        )));
    }
    if chain.len() > opts.max_backing_depth {
        return Err(Error::Backing(format!(
            "backing chain deeper than {} images",
            opts.max_backing_depth
        )));
    }
    chain.push(layer);
    Ok(())
}

/// Where a backing file name written in an image leads.
#[derive(Debug)]
pub enum BackingTarget {
    /// A host file: an absolute name, or a relative one resolved against the directory of
    /// the image that names it.
    File(PathBuf),
    /// Another storage (an `nbd://` URI, an `rbd:` name); boxed, as a name is large.
    Uri(Box<DiskSource>),
    /// A relative name in an image that is not a host file: no directory to resolve it
    /// against (QEMU: "cannot determine actual path").
    Unresolvable,
}

/// Where the backing file `name` of the image found at `image` (None: not a host file)
/// leads; an error for a name naming a storage xdisk does not serve.
pub fn backing_target(image: Option<&Path>, name: &str) -> Result<BackingTarget> {
    let src = DiskSource::parse(name, None)?;
    if src.local_path().is_none() {
        return Ok(BackingTarget::Uri(Box::new(src)));
    }
    Ok(match image {
        Some(image) => BackingTarget::File(resolve_backing(image, name)),
        None if Path::new(name).is_absolute() => BackingTarget::File(PathBuf::from(name)),
        None => BackingTarget::Unresolvable,
    })
}

/// A backing file that [`Image::open_for_inspection`] did not open, and why.
#[derive(Debug)]
pub struct BackingRefusal {
    /// The image that names it.
    pub image: PathBuf,
    /// The name as written in that image.
    pub name: String,
    /// The name resolved against the image's directory.
    pub path: PathBuf,
    /// Why it was not opened (a refusal of [`check_backing_file`], an open error...).
    pub error: Error,
}

/// A backing file that passed [`check_backing_file`]: its canonical path and identity.
#[derive(Debug, Clone)]
pub struct CheckedBacking {
    /// The path with every symbolic link resolved.
    pub path: PathBuf,
    dev: u64,
    ino: u64,
}

impl CheckedBacking {
    /// Checks that `file` (opened after the check) is the file that was checked, and still
    /// of an allowed type.
    fn verify(&self, file: &ImageFile) -> Result<()> {
        use std::os::unix::fs::MetadataExt;
        let m = file
            .file()
            .metadata()
            .map_err(|e| Error::io(format!("cannot stat {}", file.path().display()), e))?;
        backing_type_ok(&self.path, &m)?;
        if (m.dev(), m.ino()) != (self.dev, self.ino) {
            return Err(Error::Backing(format!(
                "backing file {} changed while it was being opened",
                file.path().display()
            )));
        }
        Ok(())
    }
}

/// Host trees whose files are never backing files (kernel interfaces, not images).
const FORBIDDEN_BACKING_TREES: [&str; 2] = ["/proc", "/sys"];

fn backing_type_ok(path: &Path, m: &std::fs::Metadata) -> Result<()> {
    use std::os::unix::fs::FileTypeExt;
    let t = m.file_type();
    if t.is_file() || t.is_block_device() {
        return Ok(());
    }
    let kind = if t.is_fifo() {
        "FIFO"
    } else if t.is_socket() {
        "socket"
    } else if t.is_char_device() {
        "character device"
    } else if t.is_dir() {
        "directory"
    } else {
        "special file"
    };
    Err(Error::Backing(format!(
        "backing file {} is a {kind}: backing files must be regular files or block devices",
        path.display()
    )))
}

/// Checks that `path` may be opened as a backing file under `opts`: it resolves (symbolic
/// links followed) to a regular file or a block device, not under /proc or /sys, and inside
/// one of `opts.backing_dirs` when that is not empty. The file is opened with O_NONBLOCK (a
/// FIFO that slipped in cannot block the open) and its type checked again on the open file.
pub fn check_backing_file(path: &Path, opts: &OpenOptions) -> Result<CheckedBacking> {
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    let canon = std::fs::canonicalize(path)
        .map_err(|e| Error::io(format!("cannot open backing file {}", path.display()), e))?;
    for tree in FORBIDDEN_BACKING_TREES {
        if canon.starts_with(tree) {
            return Err(Error::Backing(format!(
                "backing file {} lies under {tree}: refused",
                canon.display()
            )));
        }
    }
    if !opts.backing_dirs.is_empty() {
        let mut inside = false;
        for d in &opts.backing_dirs {
            let cd = std::fs::canonicalize(d).map_err(|e| {
                Error::io(
                    format!("cannot resolve backing directory {}", d.display()),
                    e,
                )
            })?;
            if canon.starts_with(&cd) {
                inside = true;
                break;
            }
        }
        if !inside {
            let dirs: Vec<String> = opts
                .backing_dirs
                .iter()
                .map(|d| d.display().to_string())
                .collect();
            return Err(Error::Backing(format!(
                "backing file {} is outside the allowed backing directories ({})",
                canon.display(),
                dirs.join(",")
            )));
        }
    }
    // The type from the path first (a socket cannot even be opened), then from the open
    // file (the path may have changed in between).
    let m = std::fs::metadata(&canon)
        .map_err(|e| Error::io(format!("cannot stat backing file {}", canon.display()), e))?;
    backing_type_ok(&canon, &m)?;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC)
        .open(&canon)
        .map_err(|e| Error::io(format!("cannot open backing file {}", canon.display()), e))?;
    let m = f
        .metadata()
        .map_err(|e| Error::io(format!("cannot stat backing file {}", canon.display()), e))?;
    backing_type_ok(&canon, &m)?;
    Ok(CheckedBacking {
        path: canon,
        dev: m.dev(),
        ino: m.ino(),
    })
}
