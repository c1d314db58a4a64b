//! [`RbdStorage`]: an RBD image as an xdisk [`Storage`], and the process-wide registry that
//! opens each cluster connection and each image once.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, Weak};
use std::time::{Duration, Instant};

use xdisk_io::sys::EventFd;
use xdisk_io::{Alignment, Allocation, CacheMode, Engine, EngineConfig, IoSlice, Storage};

use crate::engine::RbdEngine;
use crate::ffi::{self, AioOp, Held, Sink};
use crate::name::{CipherAlg, Encryption, KeySource, LuksFormat, RbdName};
use crate::secret::Passphrase;
use crate::{CreateOptions, Error};

/// `RBD_FEATURE_STRIPINGV2`, `RBD_FEATURE_FAST_DIFF` (rbd/features.h).
const FEATURE_STRIPINGV2: u64 = 1 << 1;
const FEATURE_EXCLUSIVE_LOCK: u64 = 1 << 2;
const FEATURE_FAST_DIFF: u64 = 1 << 4;
/// `RBD_FLAG_FAST_DIFF_INVALID` (librbd.h).
const FLAG_FAST_DIFF_INVALID: u64 = 1 << 1;

/// How large an image to be encrypted is created before librbd writes its LUKS header:
/// larger than any header (LUKS1: about 2 MiB, LUKS2: 16 MiB, each rounded up to the object
/// size, at most 32 MiB), which librbd requires; then it is sized to what was asked.
const ENCRYPT_FORMAT_SIZE: u64 = 64 << 20;

/// The most one synchronous librbd call moves (librbd refuses discards over `INT_MAX`).
pub(crate) const MAX_CHUNK: u64 = 1 << 30;

/// The most one synchronous read or write moves through a bounce buffer (with a deadline).
const BOUNCE_CHUNK: usize = 4 << 20;

/// Timeouts set on every connection unless the ceph.conf or the name sets them: a cluster
/// that goes away makes requests fail with ETIMEDOUT after this long instead of hanging.
/// Ceph's own defaults are 0 (wait forever) for the two op timeouts and 300 s for mounts.
pub const DEFAULT_TIMEOUTS: [(&str, &str, &str); 3] = [
    // (option, Ceph's default, xdisk's)
    ("rados_osd_op_timeout", "0", "60"),
    ("rados_mon_op_timeout", "0", "30"),
    ("client_mount_timeout", "300", "30"),
];

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// What makes two connections interchangeable.
#[derive(Clone, PartialEq, Eq, Hash)]
struct ClusterKey {
    user: String,
    conf: Option<String>,
    options: Vec<(String, String)>,
    /// librbd's cache (`rbd_cache`), from the cache mode: a connection-wide setting.
    cache: bool,
}

#[derive(Clone, PartialEq, Eq, Hash)]
struct ImageKey {
    cluster: ClusterKey,
    pool: String,
    namespace: Option<String>,
    image: String,
    snapshot: Option<String>,
    read_only: bool,
    exclusive: bool,
    /// The encryption loaded (a handle with it reads plaintext, one without ciphertext).
    encrypt: Option<Encryption>,
}

/// One registry: a weak handle per key, each behind its own lock, so that opening one
/// key (which may wait for a cluster's timeouts) never holds up another.
struct Registry<K, V> {
    map: Mutex<HashMap<K, Arc<Mutex<Weak<V>>>>>,
}

impl<K: std::hash::Hash + Eq + Clone, V> Registry<K, V> {
    fn new() -> Self {
        Registry {
            map: Mutex::new(HashMap::new()),
        }
    }

    /// The live value for `key`, or a new one from `make` (which runs without the map's
    /// lock, under the key's own).
    fn get_or_open(
        &self,
        key: &K,
        make: impl FnOnce() -> Result<V, Error>,
    ) -> Result<Arc<V>, Error> {
        let slot = {
            let mut map = lock(&self.map);
            map.retain(|_, s| s.try_lock().map_or(true, |w| w.strong_count() > 0));
            map.entry(key.clone())
                .or_insert_with(|| Arc::new(Mutex::new(Weak::new())))
                .clone()
        };
        let mut w = lock(&slot);
        if let Some(v) = w.upgrade() {
            return Ok(v);
        }
        let v = Arc::new(make()?);
        *w = Arc::downgrade(&v);
        Ok(v)
    }
}

fn clusters() -> &'static Registry<ClusterKey, ffi::Cluster> {
    static R: OnceLock<Registry<ClusterKey, ffi::Cluster>> = OnceLock::new();
    R.get_or_init(Registry::new)
}

fn images() -> &'static Registry<ImageKey, SharedImage> {
    static R: OnceLock<Registry<ImageKey, SharedImage>> = OnceLock::new();
    R.get_or_init(Registry::new)
}

fn cluster_key(name: &RbdName, cache: CacheMode) -> ClusterKey {
    ClusterKey {
        user: name.user.clone().unwrap_or_else(|| "admin".into()),
        conf: name.conf.clone(),
        options: name.options.clone(),
        // As QEMU: librbd's cache unless cache=none/directsync.
        cache: !cache.direct(),
    }
}

/// Connects (or finds the connection) as QEMU's rbd driver does: the user, the ceph.conf
/// (the default search if none is named), the name's options, then `rbd_cache`.
fn connect(key: &ClusterKey, shown: &str) -> Result<Arc<ffi::Cluster>, Error> {
    clusters().get_or_open(key, || {
        let ctx = |what: &str| {
            let what = format!("{what} ({shown})");
            move |e| Error::Rados { what, source: e }
        };
        let mut c = ffi::Cluster::create(&key.user).map_err(ctx("cannot create a RADOS handle"))?;
        match &key.conf {
            Some(p) => c
                .read_conf(Some(p))
                .map_err(ctx(&format!("cannot read the Ceph configuration {p}")))?,
            // No ceph.conf is fine when the name gives mon_host and a key.
            None => {
                let _ = c.read_conf(None);
            }
        }
        for (opt, ceph_default, ours) in DEFAULT_TIMEOUTS {
            if c.get(opt).is_ok_and(|v| v == ceph_default) {
                c.set(opt, ours)
                    .map_err(ctx(&format!("cannot set {opt}")))?;
            }
        }
        for (k, v) in &key.options {
            c.set(k, v)
                .map_err(ctx(&format!("invalid Ceph option {k}")))?;
        }
        c.set("rbd_cache", if key.cache { "true" } else { "false" })
            .map_err(ctx("cannot set rbd_cache"))?;
        c.connect()
            .map_err(ctx("cannot connect to the Ceph cluster"))?;
        Ok(c)
    })
}

fn io_ctx(name: &RbdName, cluster: Arc<ffi::Cluster>) -> Result<ffi::IoCtx, Error> {
    ffi::IoCtx::new(cluster, &name.pool, name.namespace.as_deref()).map_err(|e| Error::Rados {
        what: format!("cannot open pool {} ({name})", name.pool),
        source: e,
    })
}

/// An image opened once per process, shared by every storage (and queue) that names it.
pub(crate) struct SharedImage {
    pub(crate) image: ffi::Image,
    cluster: Arc<ffi::Cluster>,
    object_size: u64,
    /// librbd < 1.17 reports wrong diff offsets for clones and for non-default striping
    /// (Ceph tracker 53784): block status is not asked of those.
    diff_trusted: bool,
    /// Serialises growing the image (writes past its end).
    grow: Mutex<()>,
    /// The size last read from librbd or set here: what the engine clips reads and grows
    /// writes by without asking librbd (`rbd_get_size` refreshes the header first when
    /// librbd's watch says it changed: a round trip to the cluster that must not block a
    /// queue's reactor).
    size: AtomicU64,
    /// librbd's update watch: set when it says the header changed (a resize elsewhere).
    updates: Arc<Updates>,
    /// Whether the watch is registered and writable opens see updates through it (a
    /// read-only open has no header watch: its size is asked of librbd every time).
    watched: bool,
    /// With librbd's encryption loaded: the bytes of its LUKS header, which librbd's sizes
    /// leave out but `rbd_resize` counts (librbd 16: the handle's size is the image's less
    /// the header, a resize sets the image's whole size).
    overhead: Option<u64>,
    /// Without encryption loaded: the LUKS header the image starts with, if any.
    luks: Option<LuksFormat>,
}

/// The magics of LUKS1 and LUKS2 headers (as QEMU's rbd driver probes them).
const LUKS_MAGIC: [(&[u8; 8], LuksFormat); 2] = [
    (b"LUKS\xba\xbe\x00\x01", LuksFormat::Luks1),
    (b"LUKS\xba\xbe\x00\x02", LuksFormat::Luks2),
];

/// The LUKS header the image starts with (its first 8 bytes as stored), if any.
fn luks_header(image: &ffi::Image) -> io::Result<Option<LuksFormat>> {
    let mut head = [0u8; 8];
    // librbd refuses reads past the end (EINVAL): an empty image (a new qcow2 one) has none.
    if image.size()? < head.len() as u64 {
        return Ok(None);
    }
    let n = image.read(&mut head, 0)?;
    Ok(LUKS_MAGIC
        .iter()
        .find(|(m, _)| n == head.len() && head == **m)
        .map(|(_, f)| *f))
}

fn luks_name(f: LuksFormat) -> &'static str {
    match f {
        LuksFormat::Luks1 => "LUKS1",
        LuksFormat::Luks2 => "LUKS2",
    }
}

fn ffi_luks(f: LuksFormat) -> ffi::Luks {
    match f {
        LuksFormat::Luks1 => ffi::Luks::V1,
        LuksFormat::Luks2 => ffi::Luks::V2,
    }
}

/// The passphrase of an encrypted image: the key file's content, or the secret registered
/// under its id (`xdisk img --object secret`).
fn passphrase(enc: &Encryption, shown: &str) -> Result<Arc<Passphrase>, Error> {
    let why = |why: String| Error::Encryption {
        name: shown.to_owned(),
        why,
    };
    match &enc.key {
        KeySource::File(p) => Passphrase::from_file(p).map(Arc::new).map_err(why),
        KeySource::Secret(id) => crate::secret::secret(id).ok_or_else(|| {
            why(format!(
                "encrypt.key-secret={id}: no secret of that id (xdisk img takes --object secret,id={id},file=PATH; elsewhere give encrypt.key-file=PATH)"
            ))
        }),
    }
}

/// Loads the encryption `enc` on `image` (after checking which LUKS header it has, to say
/// why it fails); returns the header's size.
fn load_encryption(image: &ffi::Image, enc: &Encryption, shown: &str) -> Result<u64, Error> {
    let rados = |what: String| move |e| Error::Rados { what, source: e };
    let pass = passphrase(enc, shown)?;
    let found = luks_header(image).map_err(rados(format!("cannot read the start of {shown}")))?;
    let want = luks_name(enc.format);
    match found {
        None => {
            return Err(Error::Encryption {
                name: shown.to_owned(),
                why: format!(
                    "encrypt.format={}: the image has no LUKS header (not encrypted)",
                    enc.format.as_str()
                ),
            })
        }
        Some(f) if f != enc.format => {
            return Err(Error::Encryption {
                name: shown.to_owned(),
                why: format!(
                    "encrypt.format={}: the image has a {} header, not {want} (encrypt.format={})",
                    enc.format.as_str(),
                    luks_name(f),
                    f.as_str()
                ),
            })
        }
        Some(_) => {}
    }
    let raw = image
        .size()
        .map_err(rados(format!("cannot stat {shown}")))?;
    image
        .encryption_load(ffi_luks(enc.format), pass.as_bytes())
        .map_err(|e| {
            let what = if e.raw_os_error() == Some(libc::EPERM) {
                format!("cannot open {shown}: the passphrase does not open its {want} header (a wrong passphrase)")
            } else {
                format!("cannot load the {want} encryption of {shown}")
            };
            Error::Rados { what, source: e }
        })?;
    let effective = image
        .size()
        .map_err(rados(format!("cannot stat {shown}")))?;
    Ok(raw.saturating_sub(effective))
}

/// Handed to librbd's update watch (called on librbd's threads: only atomics).
#[derive(Default)]
pub(crate) struct Updates {
    changed: std::sync::atomic::AtomicBool,
    count: AtomicU64,
}

impl crate::deadline::Wake for Updates {
    fn wake(&self) {
        self.count.fetch_add(1, Ordering::AcqRel);
        self.changed.store(true, Ordering::Release);
    }
}

/// An RBD image as a storage.
pub struct RbdStorage {
    name: RbdName,
    shown: String,
    pub(crate) shared: Arc<SharedImage>,
    read_only: bool,
    cache: CacheMode,
    broken: OnceLock<String>,
    /// Per request (`xdisk_deadline`; `None`: wait as long as librbd does).
    deadline: Option<Duration>,
}

/// Where a synchronous call waits for its one asynchronous operation.
#[derive(Default)]
struct Waiter {
    slot: Mutex<Option<(i64, Held)>>,
    cond: Condvar,
}

impl Sink for Waiter {
    fn done(&self, _tag: u64, result: i64, held: Held) {
        *lock(&self.slot) = Some((result, held));
        self.cond.notify_all();
    }
}

fn timed_out(what: &str, shown: &str, d: Duration) -> io::Error {
    tracing::warn!(image = %shown, deadline_s = d.as_secs(), "RBD {what} past its deadline fails with ETIMEDOUT (pool full? cluster unreachable?)");
    io::Error::from_raw_os_error(libc::ETIMEDOUT)
}

impl fmt::Debug for RbdStorage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RbdStorage")
            .field("name", &self.shown)
            .field("read_only", &self.read_only)
            .finish()
    }
}

impl RbdStorage {
    /// Opens the image `name` names (shared with every other open of it in this process
    /// with the same connection settings and mode). A snapshot opens read-only only.
    pub fn open(name: &RbdName, read_only: bool, cache: CacheMode) -> Result<RbdStorage, Error> {
        let shown = name.to_string();
        if name.snapshot.is_some() && !read_only {
            return Err(Error::SnapshotReadOnly(shown));
        }
        let key = ImageKey {
            cluster: cluster_key(name, cache),
            pool: name.pool.clone(),
            namespace: name.namespace.clone(),
            image: name.image.clone(),
            snapshot: name.snapshot.clone(),
            read_only,
            exclusive: name.exclusive && !read_only,
            encrypt: name.encrypt.clone(),
        };
        let shared = images().get_or_open(&key, || {
            let cluster = connect(&key.cluster, &shown)?;
            let io = Arc::new(io_ctx(name, cluster.clone())?);
            let image = ffi::Image::open(io, &name.image, name.snapshot.as_deref(), read_only)
                .map_err(|e| Error::Rados {
                    what: format!("cannot open {shown}"),
                    source: e,
                })?;
            if key.exclusive {
                if image.features().is_ok_and(|f| f & FEATURE_EXCLUSIVE_LOCK == 0) {
                    return Err(Error::Rados {
                        what: format!(
                            "cannot lock {shown}: xdisk_lock=exclusive needs the image's exclusive-lock feature (rbd feature enable IMAGE exclusive-lock)"
                        ),
                        source: io::Error::from_raw_os_error(libc::EINVAL),
                    });
                }
                image.lock_exclusive().map_err(|e| Error::Rados {
                    what: format!(
                        "cannot take the exclusive lock of {shown} (xdisk_lock=exclusive): another client holds it and keeps it (rbd lock ls / rbd status name it)"
                    ),
                    source: e,
                })?;
            }
            let (overhead, luks) = match &name.encrypt {
                Some(enc) => (Some(load_encryption(&image, enc, &shown)?), None),
                None => (
                    None,
                    luks_header(&image).map_err(|e| Error::Rados {
                        what: format!("cannot read the start of {shown}"),
                        source: e,
                    })?,
                ),
            };
            let stat = image.stat().map_err(|e| Error::Rados {
                what: format!("cannot stat {shown}"),
                source: e,
            })?;
            let (maj, min, _) = ffi::librbd_version();
            let diff_trusted = (maj, min) >= (1, 17)
                || (image.features().is_ok_and(|f| f & FEATURE_STRIPINGV2 == 0)
                    && image.has_parent().is_ok_and(|p| !p));
            let updates = Arc::new(Updates::default());
            let target: Arc<dyn crate::deadline::Wake> = updates.clone();
            let watched = match image.watch_updates(target) {
                Ok(()) => !read_only,
                Err(e) => {
                    tracing::warn!(image = %shown, "rbd_update_watch: {e}; asking librbd for the size at every look");
                    false
                }
            };
            let size = if overhead.is_some() {
                // The size with the header left out (rbd_stat counts it).
                image.size().map_err(|e| Error::Rados {
                    what: format!("cannot stat {shown}"),
                    source: e,
                })?
            } else {
                stat.size
            };
            tracing::debug!(image = %shown, size, object_size = stat.object_size, encrypted = overhead.is_some(), "RBD image opened");
            Ok(SharedImage {
                image,
                cluster,
                object_size: stat.object_size.max(512),
                diff_trusted,
                grow: Mutex::new(()),
                size: AtomicU64::new(size),
                updates,
                watched,
                overhead,
                luks,
            })
        })?;
        if let Some(format) = shared.luks {
            if !name.luks_raw {
                return Err(Error::Encrypted {
                    name: shown,
                    format,
                });
            }
        }
        Ok(RbdStorage {
            name: name.clone(),
            shown,
            shared,
            read_only,
            cache,
            broken: OnceLock::new(),
            deadline: name.request_deadline(),
        })
    }

    /// Creates the image `name` names, `size` bytes, with the cluster's default features
    /// and object size. An existing image is an error ([`Error::Exists`]).
    pub fn create(name: &RbdName, size: u64) -> Result<(), Error> {
        Self::create_with(name, size, &CreateOptions::default())
    }

    /// Like [`RbdStorage::create`], with the object size, features, data pool and striping
    /// of `opts` (the cluster's defaults for what it leaves out).
    pub fn create_with(name: &RbdName, size: u64, opts: &CreateOptions) -> Result<(), Error> {
        let options = opts.to_ffi().map_err(|why| Error::Name {
            name: name.to_string(),
            why,
        })?;
        let shown = name.to_string();
        if name.snapshot.is_some() {
            return Err(Error::Name {
                name: shown,
                why: "cannot create a snapshot (drop @SNAP)".into(),
            });
        }
        let pass = name
            .encrypt
            .as_ref()
            .map(|enc| passphrase(enc, &shown))
            .transpose()?;
        // Encrypted: created larger than any LUKS header first (librbd refuses to format an
        // image no larger than its header), then sized so that the plaintext is `size` bytes
        // (QEMU creates it `size` bytes and then grows it by the header).
        let raw = match pass {
            Some(_) => size.max(ENCRYPT_FORMAT_SIZE),
            None => size,
        };
        let cluster = connect(&cluster_key(name, CacheMode::WriteBack), &shown)?;
        let io = Arc::new(io_ctx(name, cluster)?);
        let r = if opts.is_empty() {
            io.create_image(&name.image, raw)
        } else {
            io.create_image_with(&name.image, raw, &options)
        };
        r.map_err(|e| {
            if e.raw_os_error() == Some(libc::EEXIST) {
                Error::Exists(shown.clone())
            } else {
                let with = if opts.is_empty() {
                    String::new()
                } else {
                    format!(" with {}", opts.describe())
                };
                Error::Rados {
                    what: format!("cannot create {shown}{with}"),
                    source: e,
                }
            }
        })?;
        let (Some(enc), Some(pass)) = (&name.encrypt, pass) else {
            return Ok(());
        };
        let r = Self::format_encryption(&io, name, enc, &pass, raw, size);
        if r.is_err() {
            // As QEMU: an image whose format failed is removed.
            if let Err(e) = io.remove_image(&name.image) {
                tracing::warn!(image = %shown, "cannot remove the image after a failed LUKS format: {e}");
            }
        }
        r
    }

    /// Writes the LUKS header of a new image `raw` bytes large, and sizes it so that its
    /// plaintext is `size` bytes.
    fn format_encryption(
        io: &Arc<ffi::IoCtx>,
        name: &RbdName,
        enc: &Encryption,
        pass: &Passphrase,
        raw: u64,
        size: u64,
    ) -> Result<(), Error> {
        let shown = name.to_string();
        let want = luks_name(enc.format);
        let what = |w: &str| {
            let what = format!("cannot format {shown} with {want} ({w})");
            move |e| Error::Rados { what, source: e }
        };
        let image =
            ffi::Image::open(io.clone(), &name.image, None, false).map_err(what("opening it"))?;
        let alg = match enc.cipher.unwrap_or(CipherAlg::Aes256) {
            CipherAlg::Aes128 => ffi::Aes::Aes128,
            CipherAlg::Aes256 => ffi::Aes::Aes256,
        };
        image
            .encryption_format(ffi_luks(enc.format), alg, pass.as_bytes())
            .map_err(what("rbd_encryption_format"))?;
        let effective = image.size().map_err(what("its size"))?;
        let header = raw.saturating_sub(effective);
        let target = size
            .checked_add(header)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EFBIG))
            .map_err(what("its size"))?;
        image.resize(target).map_err(what("resizing it"))?;
        let got = image.size().map_err(what("its size"))?;
        if got != size {
            return Err(Error::Rados {
                what: format!(
                    "cannot format {shown} with {want}: librbd made its plaintext {got} bytes, not {size}"
                ),
                source: io::Error::from_raw_os_error(libc::EIO),
            });
        }
        tracing::debug!(image = %shown, size, header, "RBD image formatted with LUKS");
        Ok(())
    }

    /// Removes the image `name` names (it must have no snapshots and not be open).
    pub fn remove(name: &RbdName) -> Result<(), Error> {
        let shown = name.to_string();
        let cluster = connect(&cluster_key(name, CacheMode::WriteBack), &shown)?;
        let io = io_ctx(name, cluster)?;
        io.remove_image(&name.image).map_err(|e| Error::Rados {
            what: format!("cannot remove {shown}"),
            source: e,
        })
    }

    /// The name it was opened with.
    pub fn rbd_name(&self) -> &RbdName {
        &self.name
    }

    /// The value of a Ceph option on this image's cluster connection (what the ceph.conf,
    /// the name and xdisk's defaults made it).
    pub fn ceph_option(&self, key: &str) -> io::Result<String> {
        self.shared.cluster.get(key)
    }

    /// Requests librbd has of this image's handle and has not completed: including those
    /// failed at their deadline, whose bounce buffers librbd keeps until then.
    pub fn librbd_in_flight(&self) -> usize {
        self.shared.image.outstanding()
    }

    /// Whether this process holds the image's exclusive lock now (librbd takes it at the
    /// first write and hands it over when another client asks, unless `xdisk_lock=exclusive`).
    pub fn holds_lock(&self) -> io::Result<bool> {
        self.shared.image.is_lock_owner()
    }

    /// How many times librbd's update watch said the image's header changed (a resize or a
    /// snapshot elsewhere, a lock moving...).
    pub fn header_updates(&self) -> u64 {
        self.shared.updates.count.load(Ordering::Acquire)
    }

    /// Whether `other` drives the same librbd image handle (one open per process).
    pub fn shares_image_with(&self, other: &RbdStorage) -> bool {
        Arc::ptr_eq(&self.shared, &other.shared)
    }

    /// The size of one RADOS object of the image (the granularity of block status).
    pub fn object_size(&self) -> u64 {
        self.shared.object_size
    }

    pub(crate) fn writable(&self) -> io::Result<()> {
        if self.read_only {
            return Err(io::Error::from_raw_os_error(libc::EROFS));
        }
        self.check_usable()
    }

    /// Grows the image to at least `end` bytes (librbd refuses writes past the end: QEMU's
    /// driver grows the image first too).
    pub(crate) fn grow_to(&self, end: u64) -> io::Result<()> {
        self.resize_bounded(end, true)
    }

    /// The per-request deadline (`None`: none).
    pub(crate) fn deadline(&self) -> Option<Duration> {
        self.deadline
    }

    /// `rbd_resize` (to `size`, or to at least `size` if `grow_only`) within the deadline:
    /// librbd has no asynchronous resize, so a thread does it, which librbd may keep as
    /// long as it likes (it then holds the image open and the grow lock: later resizes
    /// fail at their deadline too, nothing waits for longer).
    fn resize_bounded(&self, size: u64, grow_only: bool) -> io::Result<()> {
        let shared = self.shared.clone();
        let shown = self.shown.clone();
        let job = move || -> io::Result<()> {
            let _g = lock(&shared.grow);
            let now = shared.image.size()?;
            shared.size.store(now, Ordering::Release);
            if grow_only && size <= now {
                return Ok(());
            }
            tracing::debug!(image = %shown, from = now, to = size, "resizing the RBD image");
            match shared.overhead {
                None => shared.image.resize(size)?,
                Some(header) => {
                    // librbd 16 resizes the whole image, its LUKS header included.
                    let raw = size
                        .checked_add(header)
                        .ok_or_else(|| io::Error::from_raw_os_error(libc::EFBIG))?;
                    shared.image.resize(raw)?;
                    let got = shared.image.size()?;
                    shared.size.store(got, Ordering::Release);
                    if got != size {
                        return Err(io::Error::other(format!(
                            "librbd resized the encrypted image to {got} bytes, not {size}"
                        )));
                    }
                }
            }
            shared.size.store(size, Ordering::Release);
            Ok(())
        };
        self.bounded("resize", job)
    }

    /// Runs `job`, a blocking librbd call on the image, within the deadline: a thread does
    /// it, which librbd may keep as long as it likes; past the deadline the caller gets
    /// ETIMEDOUT (`what` says which call). Without a deadline `job` runs here.
    fn bounded(
        &self,
        what: &'static str,
        job: impl FnOnce() -> io::Result<()> + Send + 'static,
    ) -> io::Result<()> {
        let Some(d) = self.deadline else {
            return job();
        };
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name(format!("xdisk-rbd-{what}"))
            .spawn(move || {
                // The job is consumed (with the image handle it holds) before the caller
                // hears back: a caller that closes the image next must really close it (a
                // handle kept open here would keep the exclusive lock, and another handle's
                // resize would be done by this one, leaving that one's size stale).
                let r = job();
                let _ = tx.send(r);
            })?;
        match rx.recv_timeout(d) {
            Ok(r) => r,
            Err(_) => Err(timed_out(what, &self.shown, d)),
        }
    }

    /// `rbd_snap_create` within the deadline (librbd has no asynchronous snapshot call): a
    /// snapshot that took longer may still be created by librbd afterwards.
    fn snap_create_bounded(&self, name: &str) -> io::Result<()> {
        self.writable()?;
        let shared = self.shared.clone();
        let snap = name.to_owned();
        self.bounded("snapshot", move || shared.image.snap_create(&snap))
    }

    /// Runs one asynchronous operation and waits for it, up to the deadline (then librbd
    /// keeps the operation's bounce buffer, if any, until it completes it).
    fn wait_aio(&self, op: AioOp) -> io::Result<(i64, Held)> {
        let w = Arc::new(Waiter::default());
        let sink: Arc<dyn Sink> = w.clone();
        self.shared.image.aio(op, sink, 0).map_err(|(_, e)| e)?;
        let until = self.deadline.map(|d| Instant::now() + d);
        let mut slot = lock(&w.slot);
        loop {
            if let Some(done) = slot.take() {
                return Ok(done);
            }
            slot = match until {
                None => w.cond.wait(slot).unwrap_or_else(|e| e.into_inner()),
                Some(t) => {
                    let now = Instant::now();
                    if now >= t {
                        let d = self.deadline.unwrap_or_default();
                        return Err(timed_out("request", &self.shown, d));
                    }
                    w.cond
                        .wait_timeout(slot, t - now)
                        .unwrap_or_else(|e| e.into_inner())
                        .0
                }
            };
        }
    }

    /// A negative librbd result as an error.
    fn result(r: i64) -> io::Result<u64> {
        if r < 0 {
            Err(io::Error::from_raw_os_error(
                i32::try_from(-r).unwrap_or(libc::EIO),
            ))
        } else {
            Ok(r as u64)
        }
    }

    /// Reads into `buf` at `off`: librbd's blocking call without a deadline, else through
    /// a bounce buffer; returns the bytes read (short at the end of the image).
    fn read_chunk(&self, buf: &mut [u8], off: u64) -> io::Result<usize> {
        if self.deadline.is_none() {
            return self.shared.image.read(buf, off);
        }
        let op = AioOp::Read {
            buf: Held::Bounce(vec![0u8; buf.len()]),
            len: buf.len(),
            off,
        };
        let (r, held) = self.wait_aio(op)?;
        let n = (Self::result(r)? as usize).min(buf.len());
        if let Held::Bounce(b) = held {
            buf[..n].copy_from_slice(&b[..n]);
        }
        Ok(n)
    }

    fn write_chunk(&self, buf: &[u8], off: u64) -> io::Result<usize> {
        if self.deadline.is_none() {
            return self.shared.image.write(buf, off);
        }
        let op = AioOp::Write {
            buf: Held::Bounce(buf.to_vec()),
            len: buf.len(),
            off,
        };
        Self::result(self.wait_aio(op)?.0)?;
        Ok(buf.len())
    }

    /// The size last known (see `SharedImage::size`), without asking librbd.
    pub(crate) fn known_size(&self) -> u64 {
        self.shared.size.load(Ordering::Acquire)
    }

    pub(crate) fn flush_needed(&self) -> bool {
        !self.read_only && self.cache.honours_flush()
    }
}

impl Storage for RbdStorage {
    fn name(&self) -> Cow<'_, str> {
        Cow::Borrowed(&self.shown)
    }
    /// `rbd snap create` on the open image (bounded by the deadline).
    fn create_snapshot(&self, name: &str) -> io::Result<()> {
        self.check_usable()?;
        self.snap_create_bounded(name)
    }
    /// The size: the one last known unless librbd's update watch said the header changed
    /// since (then `rbd_get_size`, which refreshes it); always asked of librbd without a
    /// watch. So the daemon's look at every disk's size (every 200 ms) costs an RBD disk
    /// nothing until it is resized elsewhere, and then sees the new size at once.
    fn size(&self) -> io::Result<u64> {
        let sh = &self.shared;
        if sh.watched && !sh.updates.changed.swap(false, Ordering::AcqRel) {
            return Ok(sh.size.load(Ordering::Acquire));
        }
        let n = match sh.image.size() {
            Ok(n) => n,
            Err(e) => {
                // Look again next time.
                sh.updates.changed.store(true, Ordering::Release);
                return Err(e);
            }
        };
        sh.size.store(n, Ordering::Release);
        Ok(n)
    }
    fn set_size(&self, len: u64) -> io::Result<()> {
        self.writable()?;
        self.resize_bounded(len, false)
    }
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        let size = self.size()?;
        let n = if off >= size {
            0
        } else {
            (size - off).min(buf.len() as u64) as usize
        };
        let chunk = if self.deadline.is_some() {
            BOUNCE_CHUNK
        } else {
            MAX_CHUNK as usize
        };
        let mut pos = 0usize;
        while pos < n {
            let m = (n - pos).min(chunk);
            let got = self.read_chunk(&mut buf[pos..pos + m], off + pos as u64)?;
            if got == 0 {
                // Shrunk meanwhile: the rest reads as zeroes, as past the end.
                break;
            }
            pos += got.min(m);
        }
        buf[pos..].fill(0);
        Ok(())
    }
    fn write_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        self.writable()?;
        let end = off
            .checked_add(buf.len() as u64)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
        if buf.is_empty() {
            return Ok(());
        }
        if end > self.size()? {
            self.grow_to(end)?;
        }
        let chunk = if self.deadline.is_some() {
            BOUNCE_CHUNK
        } else {
            MAX_CHUNK as usize
        };
        let mut pos = 0usize;
        while pos < buf.len() {
            let m = (buf.len() - pos).min(chunk);
            let n = self.write_chunk(&buf[pos..pos + m], off + pos as u64)?;
            if n == 0 {
                return Err(io::Error::new(io::ErrorKind::WriteZero, "short RBD write"));
            }
            pos += n.min(m);
        }
        Ok(())
    }
    fn flush(&self) -> io::Result<()> {
        self.check_usable()?;
        if !self.flush_needed() {
            return Ok(());
        }
        let r = if self.deadline.is_some() {
            self.wait_aio(AioOp::Flush)
                .and_then(|(r, _)| Self::result(r))
                .map(|_| ())
        } else {
            self.shared.image.flush()
        };
        if let Err(e) = &r {
            // A flush past its deadline proves nothing lost: only a failed one is fatal.
            if e.raw_os_error() != Some(libc::ETIMEDOUT) || self.deadline.is_none() {
                self.mark_broken(e);
            }
        }
        r
    }
    fn discard(&self, off: u64, len: u64) -> io::Result<()> {
        self.writable()?;
        let end = off.saturating_add(len).min(self.size()?);
        let mut pos = off;
        while pos < end {
            let n = (end - pos).min(MAX_CHUNK);
            if self.deadline.is_some() {
                let op = AioOp::Discard { off: pos, len: n };
                Self::result(self.wait_aio(op)?.0)?;
            } else {
                self.shared.image.discard(pos, n)?;
            }
            pos += n;
        }
        Ok(())
    }
    fn write_zeroes(&self, off: u64, len: u64) -> io::Result<()> {
        self.writable()?;
        let end = off.saturating_add(len).min(self.size()?);
        let mut pos = off;
        while pos < end {
            let n = (end - pos).min(MAX_CHUNK);
            if self.deadline.is_some() {
                let op = AioOp::WriteZeroes { off: pos, len: n };
                Self::result(self.wait_aio(op)?.0)?;
            } else {
                self.shared.image.write_zeroes(pos, n as usize)?;
            }
            pos += n;
        }
        Ok(())
    }
    fn preallocate(&self, off: u64, len: u64) -> io::Result<()> {
        self.writable()?;
        // Thin provisioned: nothing to reserve; the range must exist.
        let end = off
            .checked_add(len)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
        if end > self.size()? {
            self.grow_to(end)?;
        }
        Ok(())
    }
    fn allocation(&self, off: u64, len: u64) -> Allocation {
        let data = Allocation::Data { len };
        let img = &self.shared.image;
        let Ok(size) = img.size() else {
            return data;
        };
        if off >= size {
            return Allocation::Hole { len };
        }
        // As QEMU's qemu_rbd_co_block_status: only with a valid fast-diff object map,
        // whole objects, the parent included. Not with librbd's encryption loaded: librbd 16
        // reports the stored image's extents, its LUKS header included, not the plaintext's
        // (QEMU 7.2 maps data written at 8M of a LUKS2 image at 24M).
        if self.shared.overhead.is_some()
            || !self.shared.diff_trusted
            || !img.features().is_ok_and(|f| f & FEATURE_FAST_DIFF != 0)
            || !img.flags().is_ok_and(|f| f & FLAG_FAST_DIFF_INVALID == 0)
        {
            return data;
        }
        let end = off.saturating_add(len).min(size);
        let obj = self.shared.object_size;
        let start = off / obj * obj;
        // The first run from `off`: (is data, where it ends).
        let mut run: Option<(bool, u64)> = None;
        let mut visit = |e_off: u64, e_len: u64| -> bool {
            let e_end = e_off.saturating_add(e_len);
            if e_end <= off {
                return true;
            }
            match run {
                None if e_off > off => {
                    run = Some((false, e_off));
                    false
                }
                None => {
                    run = Some((true, e_end));
                    true
                }
                Some((true, at)) if e_off <= at => {
                    run = Some((true, at.max(e_end)));
                    true
                }
                Some(_) => false,
            }
        };
        if let Err(e) = img.allocated(start, end - start, &mut visit) {
            tracing::debug!(image = %self.shown, "rbd_diff_iterate2 failed: {e}");
            return data;
        }
        match run {
            Some((true, at)) => Allocation::Data {
                len: (at - off).clamp(1, len),
            },
            Some((false, at)) => Allocation::Hole {
                len: (at - off).clamp(1, len),
            },
            // Nothing allocated up to `end`, and past the end of the image is a hole too.
            None => Allocation::Hole { len },
        }
    }
    fn read_only(&self) -> bool {
        self.read_only
    }
    fn cache(&self) -> CacheMode {
        self.cache
    }
    fn alignment(&self) -> Alignment {
        Alignment::NONE
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
        Some(Ok(Box::new(RbdEngine::new(self, cfg, notify))))
    }
}
