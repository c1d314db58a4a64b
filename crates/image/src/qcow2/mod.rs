//! qcow2 images (QEMU's `docs/interop/qcow2.txt`), v2 and v3.
//!
//! Layout of the engine:
//! - [`format`]: on-disk structures (header, entries, snapshot table, refcount entries).
//! - `meta`: the metadata state under the image's one lock, and the write-back ordering that
//!   keeps the file consistent across crashes (see its module docs).
//! - `cluster`: L1/L2 lookups, L2 allocation and copy-on-write; `refcount`: refcounts, the
//!   cluster allocator, refcount table growth, the dirty-image rebuild; `cache`: the bounded
//!   LRU of L2 tables and refcount blocks; `compress`: compressed clusters.
//! - `io`: the guest-facing operations (read, write, discard, zeroes, status, map, resize).
//!
//! Data I/O runs outside the lock: a request's mapping is resolved (and clusters allocated)
//! under the lock, the lock is released for the data I/O, and new mappings are installed
//! under the lock afterwards. Two writers of the same unallocated guest cluster do not both
//! allocate: the first marks the cluster in flight and the second waits for it.
//!
//! - `bitmap`: persistent dirty bitmaps (loaded, kept up to date by writes, stored at close).
//!
//! Not supported (refused at open): encryption, external data files, extended L2 entries,
//! unknown incompatible features; writing to images that are marked corrupt. Compressed clusters are read, and written only
//! by [`Qcow2Image::write_compressed_cluster`] (whole unallocated clusters, as `convert -c`
//! does); a guest write to a compressed cluster allocates a normal cluster. Internal snapshots are listed and preserved
//! (shared clusters are copied on write), not created or applied.

pub mod bitmap;
mod cache;
pub mod check;
mod cluster;
mod compress;
pub mod create;
pub mod format;
mod io;
mod meta;
mod refcount;

use std::collections::{BTreeSet, HashSet};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use xdisk_io::{Storage, StorageRef};

use self::cache::Cache;
use self::format::{CompressionType, Header, Snapshot};
use self::meta::{decode_table, Meta};
use crate::{Error, Image, InFlight, OpenOptions, Result};

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

/// Opens a backing file given its name as written in the header and its format (from the
/// backing format extension, if present). `Ok(None)`: leave the chain closed there.
pub type OpenBacking<'a> = &'a mut dyn FnMut(&str, Option<&str>) -> Result<Option<Arc<Image>>>;

/// An open qcow2 image.
#[derive(Debug)]
pub struct Qcow2Image {
    file: StorageRef,
    backing: Option<Arc<Image>>,
    read_only: bool,
    version: u32,
    cb: u32,
    cs: u64,
    compression: CompressionType,
    size: AtomicU64,
    snapshots: Vec<Snapshot>,
    tracker: Arc<InFlightTracker>,
    /// Boxed: the state is large and `Image` is an enum over formats.
    meta: Box<Mutex<Meta>>,
    /// Signalled when in-flight allocations of guest clusters complete.
    alloc_done: Condvar,
}

/// L2 cache budget (bytes of tables) and refcount block cache budget.
const L2_CACHE_BYTES: u64 = 64 << 20;
const RB_CACHE_BYTES: u64 = 16 << 20;
const MIN_CACHE_ENTRIES: usize = 16;
/// Upper bound on the snapshot table we read (QEMU bounds it as well).
const MAX_SNAPSHOT_TABLE_BYTES: u64 = 64 << 20;

impl Qcow2Image {
    /// Opens a qcow2 image. `open_backing` opens the backing file named in the header
    /// (name as written, backing format if the extension is present); `None` leaves the
    /// chain closed (unallocated clusters read as zeroes).
    pub fn open(
        file: StorageRef,
        opts: &OpenOptions,
        read_only: bool,
        open_backing: Option<OpenBacking<'_>>,
    ) -> Result<Qcow2Image> {
        let ctx = |what: &str| format!("{what} {}", file.name());
        let file_len = file.size().map_err(|e| Error::io(ctx("cannot size"), e))?;
        // "Header": the first cluster holds the header, its extensions and the backing name.
        let mut probe = [0u8; 24];
        file.read_at(&mut probe, 0)
            .map_err(|e| Error::io(ctx("cannot read the header of"), e))?;
        let cb = u32::from_be_bytes([probe[20], probe[21], probe[22], probe[23]])
            .clamp(format::MIN_CLUSTER_BITS, format::MAX_CLUSTER_BITS);
        let mut first = vec![0u8; (1u64 << cb).min(file_len) as usize];
        file.read_at(&mut first, 0)
            .map_err(|e| Error::io(ctx("cannot read the header of"), e))?;
        let mut hdr = Header::parse(&first, file_len)?;
        if hdr.incompatible_features & format::incompat::CORRUPT != 0 && !read_only {
            return Err(Error::Corrupt(
                "the image is marked corrupt (corrupt bit set): it can only be opened \
                 read-only; run xdisk img check -r all"
                    .into(),
            ));
        }
        // The bitmaps of a consistent extension, checked before anything is written (a
        // read-only open only lists them, and lists none if they are malformed).
        let found = match bitmap::read_bitmaps(&*file, &hdr, &first, file_len, !read_only) {
            Ok(f) => f,
            Err(e) if read_only => {
                tracing::warn!(path = %file.name(), "ignoring the persistent bitmaps: {e}");
                bitmap::Found::default()
            }
            Err(e) => return Err(e),
        };
        let snapshots = if hdr.nb_snapshots > 0 {
            let buf = read_snapshot_table(&*file, &hdr, file_len)?;
            format::parse_snapshots(&buf, hdr.nb_snapshots, hdr.cluster_bits, file_len)?
        } else {
            Vec::new()
        };
        // Every L1 table (the active one and each snapshot's) has clusters of its own in an
        // intact image, so together they fit in the file; more means they overlap, which
        // would multiply every walk over them (QEMU checks each table against the file).
        let l1_total = snapshots
            .iter()
            .map(|s| (u64::from(s.l1_size) * 8).next_multiple_of(1 << hdr.cluster_bits))
            .fold(
                (u64::from(hdr.l1_size) * 8).next_multiple_of(1 << hdr.cluster_bits),
                u64::saturating_add,
            );
        if l1_total > file_len {
            return Err(Error::Corrupt(format!(
                "the L1 tables of the image and its {} snapshots take {l1_total} bytes, more \
                 than the whole file ({file_len} bytes): they overlap",
                snapshots.len()
            )));
        }
        if hdr.is_dirty() && !read_only {
            if opts.no_repair {
                return Err(Error::Corrupt(
                    "image is dirty; run xdisk img check -r all".into(),
                ));
            }
            refcount::rebuild_refcounts(
                &*file,
                &mut hdr,
                &snapshots,
                &found.ranges,
                opts.repair_memory_limit,
            )?;
        }
        if !read_only {
            // "An implementation may only write to an image with unknown auto-clear features
            // if it clears the respective bits from this field first." The bitmaps bit stays
            // when the extension is consistent (we maintain it); raw data files are refused
            // above. A stale bitmaps extension (the bit clear: a writer without bitmap
            // support changed the image) is dropped, as QEMU does; its clusters leak.
            let consistent = bitmap::ext_consistent(&hdr);
            let keep = if consistent {
                format::autoclear::BITMAPS
            } else {
                0
            };
            let autoclear = hdr.autoclear_features & keep;
            if hdr.has_bitmaps && !consistent {
                tracing::warn!(
                    path = %file.name(),
                    "dropping persistent bitmaps a program without bitmap support left \
                     inconsistent (their clusters leak: xdisk img check -r leaks)"
                );
                hdr.autoclear_features = autoclear;
                bitmap::set_ext(&mut hdr, None);
                let head = hdr.serialize()?;
                file.write_at(&head, 0)
                    .map_err(|e| Error::io(ctx("cannot write the header of"), e))?;
                file.flush()
                    .map_err(|e| Error::io(ctx("cannot flush"), e))?;
            } else if autoclear != hdr.autoclear_features {
                hdr.autoclear_features = autoclear;
                file.write_at(&autoclear.to_be_bytes(), 88)
                    .map_err(|e| Error::io(ctx("cannot write the header of"), e))?;
                file.flush()
                    .map_err(|e| Error::io(ctx("cannot flush"), e))?;
            }
        }
        let file_len = file.size().map_err(|e| Error::io(ctx("cannot size"), e))?;
        let read_table = |off: u64, bytes: u64, what: &str| -> Result<Vec<u64>> {
            let mut buf = vec![0u8; bytes as usize];
            if bytes > 0 {
                file.read_at(&mut buf, off)
                    .map_err(|e| Error::io(ctx(&format!("cannot read the {what} of")), e))?;
            }
            Ok(decode_table(&buf))
        };
        let l1 = read_table(hdr.l1_table_offset, u64::from(hdr.l1_size) * 8, "L1 table")?;
        let reftable = read_table(
            hdr.refcount_table_offset,
            u64::from(hdr.refcount_table_clusters) * hdr.cluster_size(),
            "refcount table",
        )?;
        let cs = hdr.cluster_size();
        let cb = hdr.cluster_bits;
        // Known metadata clusters (see Meta::meta_set).
        let mut meta_set = HashSet::new();
        let add_range = |set: &mut HashSet<u64>, off: u64, bytes: u64| {
            if bytes > 0 {
                let first = off >> cb;
                for c in first..first + bytes.div_ceil(cs) {
                    set.insert(c);
                }
            }
        };
        meta_set.insert(0);
        add_range(&mut meta_set, hdr.l1_table_offset, l1.len() as u64 * 8);
        add_range(
            &mut meta_set,
            hdr.refcount_table_offset,
            u64::from(hdr.refcount_table_clusters) * cs,
        );
        for &e in &reftable {
            let off = e & format::REFT_OFFSET_MASK;
            if off != 0 && off.is_multiple_of(cs) {
                meta_set.insert(off >> cb);
            }
        }
        for &e in &l1 {
            let off = e & format::L1E_OFFSET_MASK;
            if off != 0 && off.is_multiple_of(cs) {
                meta_set.insert(off >> cb);
            }
        }
        let mut fixed = Vec::with_capacity(snapshots.len() + 1);
        let range = |off: u64, bytes: u64| (off >> cb, (off >> cb) + bytes.div_ceil(cs));
        if hdr.nb_snapshots > 0 {
            let len = refcount::snapshot_table_len(&*file, &hdr, file_len)?;
            fixed.push(range(hdr.snapshots_offset, len));
        }
        for s in &snapshots {
            fixed.push(range(s.l1_table_offset, u64::from(s.l1_size) * 8));
        }
        let fixed_meta = merge_ranges(fixed);
        let backing = match (&hdr.backing_file, open_backing) {
            (Some(name), Some(open)) => open(name, hdr.backing_format.as_deref())?,
            _ => None,
        };
        let tracker = Arc::new(InFlightTracker::default());
        let l2_cap = ((L2_CACHE_BYTES / cs) as usize).max(MIN_CACHE_ENTRIES);
        let rb_cap = ((RB_CACHE_BYTES / cs) as usize).max(MIN_CACHE_ENTRIES);
        let size = hdr.size;
        let mut meta = Meta {
            file: file.clone(),
            cb,
            cs,
            l1,
            l1_dirty: BTreeSet::new(),
            reftable,
            l2: Cache::new(l2_cap),
            rb: Cache::new(rb_cap),
            file_len,
            alloc_end: file_len.div_ceil(cs),
            free_hint: 1,
            compress_cursor: 0,
            pending_frees: Vec::new(),
            quarantine: None,
            waiting: Vec::new(),
            quarantined: HashSet::new(),
            inflight: HashSet::new(),
            meta_set,
            fixed_meta,
            unsynced: false,
            ahead: meta::Ahead {
                len_at_open: file_len,
                end: file_len,
                off: read_only,
            },
            tracker: tracker.clone(),
            hdr: hdr.clone(),
            bitmaps: bitmap::Bitmaps::default(),
        };
        meta.attach_bitmaps(found, !read_only, opts.bitmap_memory_limit)?;
        Ok(Qcow2Image {
            file,
            backing,
            read_only,
            version: hdr.version,
            cb,
            cs,
            compression: hdr.compression_type,
            size: AtomicU64::new(size),
            snapshots,
            tracker,
            meta: Box::new(Mutex::new(meta)),
            alloc_done: Condvar::new(),
        })
    }

    /// The storage the image file lives on.
    pub fn storage(&self) -> &StorageRef {
        &self.file
    }
    /// The backing image, if the image names one and it was opened.
    pub fn backing(&self) -> Option<&Arc<Image>> {
        self.backing.as_ref()
    }
    /// Virtual size in bytes (the header's `size`, as changed by resizes).
    pub fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }
    /// The header as it is now (a copy), for `info`.
    pub fn header(&self) -> Header {
        self.lock().hdr.clone()
    }
    /// The internal snapshots (listed at open; this engine does not create or apply them).
    pub fn snapshots(&self) -> &[Snapshot] {
        &self.snapshots
    }
    /// Cluster size in bytes (`1 << cluster_bits`).
    pub fn cluster_size(&self) -> u64 {
        self.cs
    }

    /// The persistent dirty bitmaps, in directory order.
    pub fn bitmaps(&self) -> Vec<bitmap::BitmapInfo> {
        self.lock().bitmaps.infos()
    }

    /// Adds a persistent dirty bitmap (`qemu-img bitmap --add`): `granularity` bytes per bit
    /// (default: the cluster size, within 4 KiB to 64 KiB, as QEMU), enabled (recording
    /// writes from now on) or not. It is on disk when this returns.
    pub fn add_bitmap(&self, name: &str, granularity: Option<u64>, enabled: bool) -> Result<()> {
        self.lock().add_bitmap(name, granularity, enabled)
    }

    /// Removes a bitmap (`--remove`; inconsistent ones too) and frees its clusters.
    pub fn remove_bitmap(&self, name: &str) -> Result<()> {
        self.lock().remove_bitmap(name)
    }

    /// Clears a bitmap (`--clear`).
    pub fn clear_bitmap(&self, name: &str) -> Result<()> {
        self.lock().clear_bitmap(name)
    }

    /// Enables (`--enable`: it records writes from now on) or disables (`--disable`) a
    /// bitmap.
    pub fn set_bitmap_enabled(&self, name: &str, enabled: bool) -> Result<()> {
        self.lock().set_bitmap_enabled(name, enabled)
    }

    /// Merges `src` (a bitmap of this image or another one of the same virtual size, any
    /// granularity) into bitmap `name` (`--merge`).
    pub fn merge_bitmap(&self, name: &str, src: &bitmap::DirtyBitmap) -> Result<()> {
        self.lock().merge_bitmap(name, src)
    }

    /// A copy of bitmap `name`'s bits as they are now (inconsistent bitmaps refused).
    pub fn bitmap(&self, name: &str) -> Result<bitmap::DirtyBitmap> {
        self.lock().bitmap_bits(name)
    }

    /// Overrides the metadata cache sizes (entries of L2 tables / refcount blocks); for
    /// tests that exercise eviction.
    #[doc(hidden)]
    pub fn set_cache_limits(&self, l2_tables: usize, refcount_blocks: usize) {
        self.lock().set_cache_limits(l2_tables, refcount_blocks);
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, Meta> {
        self.meta.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Writes back metadata that is only in memory (a flush, crash-safe order included);
    /// nothing, not even a sync, when there is none.
    pub fn write_back_metadata(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        let mut m = self.lock();
        if m.has_unwritten() {
            m.flush()?;
        }
        Ok(())
    }

    /// Makes every completed write durable (metadata included).
    pub fn flush(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.lock().flush()
    }

    /// Changes the backing file link in the header (`qemu-img rebase -u`): `name` with its
    /// `format`, or no backing file. Only the header changes: the caller sees to it that
    /// the image reads the same afterwards (a stream copies the data up first) and opens
    /// the image again to read through the new chain.
    pub fn set_backing(&self, name: Option<&str>, format: Option<&str>) -> Result<()> {
        if self.read_only {
            return Err(crate::Error::ReadOnly);
        }
        self.lock().set_backing(name, format)
    }

    /// Writes all metadata back and syncs. The image stays usable.
    pub fn close(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.lock().close()
    }
}

impl Drop for Qcow2Image {
    fn drop(&mut self) {
        if let Err(e) = self.close() {
            tracing::warn!(path = %self.file.name(), "closing qcow2 image: {e}");
        }
    }
}

/// Sorts cluster ranges `[start, end)` and merges overlapping or adjacent ones (empty ranges
/// are dropped).
fn merge_ranges(mut v: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    v.retain(|&(s, e)| s < e);
    v.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(v.len());
    for (s, e) in v {
        match out.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => out.push((s, e)),
        }
    }
    out
}

/// Reads the snapshot table (qcow2.txt, "Snapshots"): entries have variable length, so the
/// read grows until `nb_snapshots` entries fit, bounded by the file and a hard limit.
pub(crate) fn read_snapshot_table(
    file: &dyn Storage,
    hdr: &Header,
    file_len: u64,
) -> Result<Vec<u8>> {
    let off = hdr.snapshots_offset;
    let avail = file_len.saturating_sub(off).min(MAX_SNAPSHOT_TABLE_BYTES);
    let mut want = (u64::from(hdr.nb_snapshots) * 64).max(64 << 10).min(avail);
    loop {
        let mut buf = vec![0u8; want as usize];
        file.read_at(&mut buf, off).map_err(|e| {
            Error::io(
                format!("cannot read the snapshot table of {}", file.name()),
                e,
            )
        })?;
        if format::snapshot_table_len(&buf, hdr.nb_snapshots).is_some() || want >= avail {
            return Ok(buf);
        }
        want = (want * 4).min(avail);
    }
}

impl crate::FormatDriver for Qcow2Image {
    fn format(&self) -> crate::Format {
        crate::Format::Qcow2
    }
    fn storage(&self) -> &StorageRef {
        Qcow2Image::storage(self)
    }
    fn size(&self) -> u64 {
        Qcow2Image::size(self)
    }
    fn backing(&self) -> Option<&Arc<Image>> {
        Qcow2Image::backing(self)
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        Qcow2Image::read_at(self, buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        Qcow2Image::write_at(self, buf, offset)
    }
    fn flush(&self) -> Result<()> {
        Qcow2Image::flush(self)
    }
    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        Qcow2Image::discard(self, offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<()> {
        Qcow2Image::write_zeroes(self, offset, len, unmap)
    }
    fn layer_status(&self, offset: u64, len: u64) -> Result<crate::LayerStatus> {
        Qcow2Image::layer_status(self, offset, len)
    }
    fn map(
        &self,
        offset: u64,
        len: u64,
        write: bool,
        out: &mut Vec<crate::Extent>,
    ) -> Result<crate::Mapping> {
        Qcow2Image::map(self, offset, len, write, out)
    }
    fn resize(&self, new_size: u64) -> Result<()> {
        Qcow2Image::resize(self, new_size)
    }
    fn write_back_metadata(&self) -> Result<()> {
        Qcow2Image::write_back_metadata(self)
    }
    fn close(&self) -> Result<()> {
        Qcow2Image::close(self)
    }
    fn cluster_size(&self) -> Option<u64> {
        Some(self.cs)
    }
    fn discard_granularity(&self) -> u32 {
        // A discard smaller than a cluster only zeroes: tell the guest the cluster.
        u32::try_from(self.cs).unwrap_or(65536)
    }
    fn write_compressed_cluster(&self, cluster: u64, data: &[u8]) -> Result<bool> {
        Qcow2Image::write_compressed_cluster(self, cluster, data)
    }
    fn info(&self) -> crate::FormatInfo {
        let h = self.header();
        let mut specific = vec![
            (
                "compat",
                format!("\"{}\"", if h.version == 2 { "0.10" } else { "1.1" }),
            ),
            ("refcount-bits", h.refcount_bits().to_string()),
            (
                "compression-type",
                format!("\"{}\"", h.compression_type.as_str()),
            ),
        ];
        if h.version >= 3 {
            specific.push(("lazy-refcounts", h.lazy_refcounts().to_string()));
            let bitmaps = self.bitmaps();
            if !bitmaps.is_empty() {
                let list: Vec<serde_json::Value> = bitmaps
                    .iter()
                    .map(|b| {
                        let mut flags = Vec::new();
                        if b.in_use {
                            flags.push("in-use");
                        }
                        if b.auto {
                            flags.push("auto");
                        }
                        serde_json::json!({
                            "flags": flags,
                            "name": b.name,
                            "granularity": b.granularity,
                        })
                    })
                    .collect();
                specific.push(("bitmaps", serde_json::Value::Array(list).to_string()));
            }
            specific.push((
                "corrupt",
                (h.incompatible_features & format::incompat::CORRUPT != 0).to_string(),
            ));
            specific.push(("extended-l2", "false".into()));
        }
        crate::FormatInfo {
            cluster_size: Some(h.cluster_size()),
            dirty: h.is_dirty(),
            backing_file: h.backing_file.clone(),
            backing_format: h.backing_format.clone(),
            specific,
            snapshots: self
                .snapshots()
                .iter()
                .map(|s| crate::SnapshotInfo {
                    id: s.id.clone(),
                    name: s.name.clone(),
                    vm_state_size: s.vm_state_size,
                    date_sec: s.date_sec.into(),
                    date_nsec: s.date_nsec.into(),
                    vm_clock_nsec: s.vm_clock_nsec,
                })
                .collect(),
        }
    }
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}
