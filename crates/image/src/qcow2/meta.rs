//! The metadata state of an open qcow2 image, kept under the image's one lock: the header, the
//! active L1 table, the refcount table, bounded caches of L2 tables and refcount blocks, the
//! cluster allocator's state, and the write-back machinery.
//!
//! # Crash safety
//!
//! The file must be consistent at every instant a `kill -9` (or, where the cache mode honours
//! flushes, a power cut) could freeze it: `qemu-img check` may find leaked clusters, never a
//! cluster that is referenced with a refcount too low, nor a COPIED flag on a cluster whose
//! refcount is not exactly one. The rules (qcow2.txt, "Host cluster management"):
//!
//! 1. A refcount increment reaches the file before any L1/L2 entry that references the
//!    cluster. Refcount blocks are write-back cached; before any dirty L2 table or L1 entry is
//!    written (flush, eviction, close), all dirty refcount blocks are written and the file is
//!    synced ([`Meta::order_before_mappings`]).
//! 2. Data reaches the file before the L2 entry that points to it: data of a newly allocated
//!    cluster is written before the entry is put into the cached L2 table, and the sync of
//!    rule 1 also covers it. New L2 tables and refcount blocks are written whole as soon as
//!    they are allocated, so a table entry never points to stale bytes.
//! 3. A reference is removed before the refcount drops: frees are queued
//!    ([`Meta::pending_frees`]) and applied only after the L2/L1 changes that dropped the
//!    references have been written and synced (in [`Meta::flush`]). Clusters that reach
//!    refcount 0 are then quarantined until fast-path I/O that may still target them has
//!    drained (see `InFlightTracker`).

use std::collections::{BTreeSet, HashSet};
use std::sync::Arc;

use xdisk_io::StorageRef;

use super::bitmap::{Bitmaps, Store};
use super::cache::Cache;
use super::format::{self, Header, L2Entry};
use super::InFlightTracker;
use crate::{Error, Result};

/// Host offsets stored in L1/L2 entries have 56 bits (qcow2.txt, "Cluster mapping").
pub(crate) const MAX_HOST_OFFSET: u64 = 1 << 56;

/// Queued frees beyond which a write-back is forced even without a guest flush.
const MAX_PENDING_FREES: usize = 4096;

/// A host cluster index (host byte offset >> cluster_bits). Refcounts are kept per host
/// cluster; keeping the index apart from byte offsets avoids mixing the two.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct HostCluster(pub u64);

pub(crate) fn corrupt(msg: impl Into<String>) -> Error {
    Error::Corrupt(msg.into())
}

#[derive(Debug)]
pub(crate) struct Meta {
    pub file: StorageRef,
    pub hdr: Header,
    pub cb: u32,
    pub cs: u64,
    /// The active L1 table (raw entries).
    pub l1: Vec<u64>,
    /// Dirty chunks of the L1 table (chunk = one cluster's worth of entries).
    pub l1_dirty: BTreeSet<u64>,
    /// The refcount table (raw entries). Always equal to the file: entries are written as soon
    /// as they change.
    pub reftable: Vec<u64>,
    /// L2 tables by host offset (raw entries).
    pub l2: Cache<Vec<u64>>,
    /// Refcount blocks by host offset (raw bytes).
    pub rb: Cache<Vec<u8>>,
    /// Bytes of the file: its length at open, grown by everything written (or tried) since.
    /// Clusters past it were never written and read as zeroes (room allocated ahead
    /// included).
    pub file_len: u64,
    /// One past the highest host cluster ever allocated (clusters at or past
    /// max(this, file end) are free and not in flight).
    pub alloc_end: u64,
    /// Lowest host cluster that may be free (QEMU's free_cluster_index).
    pub free_hint: u64,
    /// Where the next compressed cluster may be packed: a byte offset inside the host cluster
    /// that received the last compressed stream (QEMU's free_byte_offset); 0 when none.
    pub compress_cursor: u64,
    /// Refcount decrements waiting for the reference removal to be durable (rule 3).
    pub pending_frees: Vec<HostCluster>,
    /// Clusters freed while fast-path I/O may still target them: (epoch, clusters).
    pub quarantine: Option<(usize, Vec<u64>)>,
    /// Freed clusters waiting for the current quarantine batch to drain before they get one.
    pub waiting: Vec<u64>,
    /// Every cluster in `quarantine` or `waiting` (skipped by the allocator).
    pub quarantined: HashSet<u64>,
    /// Guest clusters with an allocation in flight (other writers of them wait).
    pub inflight: HashSet<u64>,
    /// Host clusters holding metadata we know of (header, L1, refcount table and blocks,
    /// active L2 tables, snapshot table and snapshot L1 tables): data pointers into these are
    /// corruption, and the allocator never hands them out.
    pub meta_set: HashSet<u64>,
    /// Metadata that never moves while the image is open (the snapshot table and snapshot L1
    /// tables), as sorted, disjoint cluster ranges `[start, end)`: thousands of snapshot L1
    /// tables would cost seconds and megabytes as single clusters in `meta_set`.
    pub fixed_meta: Vec<(u64, u64)>,
    /// Something was written since the last sync (data of new clusters, new metadata).
    pub unsynced: bool,
    /// Room allocated at the end of the file ahead of new clusters (see [`Meta::note_alloc`]).
    pub ahead: Ahead,
    pub tracker: Arc<InFlightTracker>,
    /// The persistent dirty bitmaps (see the `bitmap` module).
    pub bitmaps: Bitmaps,
}

/// The room allocated at the end of the file ahead of new clusters
/// ([`Storage::allocate_ahead`](xdisk_io::Storage::allocate_ahead)): an image that grows by
/// direct writes gets its clusters from allocated room inside the file, so that they run side
/// by side instead of one at a time (an ext4 file grows by one direct write at a time). The
/// room left over is given back when the image is closed; after a crash the file keeps it
/// (free clusters past the last one in use, which the next allocations take).
#[derive(Debug, Default)]
pub struct Ahead {
    /// The file's length at open.
    pub len_at_open: u64,
    /// How far the file is allocated (its length) since this image allocated ahead; at most
    /// `len_at_open` before.
    pub end: u64,
    /// The storage does not allocate ahead (or failed to): stop asking.
    pub off: bool,
}

/// The least room allocated ahead at once.
const AHEAD_MIN: u64 = 4 << 20;
/// The most room allocated ahead at once.
const AHEAD_MAX: u64 = 64 << 20;

impl Meta {
    /// Whether host cluster `c` holds metadata we know of (`meta_set` or `fixed_meta`).
    pub fn is_meta(&self, c: u64) -> bool {
        if self.meta_set.contains(&c) {
            return true;
        }
        let i = self.fixed_meta.partition_point(|&(start, _)| start <= c);
        i > 0 && c < self.fixed_meta[i - 1].1
    }

    pub fn ctx(&self, what: &str) -> String {
        format!("{what} {}", self.file.name())
    }

    /// Writes metadata (any alignment: ImageFile bounces for O_DIRECT).
    pub fn write_meta(&mut self, buf: &[u8], off: u64, what: &str) -> Result<()> {
        // Counted as written even if the write fails (part of it may have reached the file):
        // new clusters past `file_len` are taken to read as zeroes.
        self.file_len = self.file_len.max(off + buf.len() as u64);
        self.file
            .write_at(buf, off)
            .map_err(|e| Error::io(self.ctx(&format!("cannot write {what} to")), e))?;
        self.unsynced = true;
        Ok(())
    }

    pub fn read_meta(&self, buf: &mut [u8], off: u64, what: &str) -> Result<()> {
        self.file
            .read_at(buf, off)
            .map_err(|e| Error::io(self.ctx(&format!("cannot read {what} from")), e))
    }

    /// fdatasync (unless the cache mode ignores flushes).
    pub fn sync(&mut self) -> Result<()> {
        self.file
            .flush()
            .map_err(|e| Error::io(self.ctx("cannot flush"), e))?;
        self.unsynced = false;
        Ok(())
    }

    /// The first host cluster past everything allocated or written.
    pub fn end_cluster(&self) -> u64 {
        self.alloc_end.max(self.file_len.div_ceil(self.cs))
    }

    /// Records clusters up to `end_cluster` as allocated, and makes sure the file is
    /// allocated that far (see [`Ahead`]).
    pub fn note_alloc(&mut self, end_cluster: u64) {
        self.alloc_end = self.alloc_end.max(end_cluster);
        self.allocate_ahead();
    }

    /// Grows the file's allocated room past the end of the clusters allocated so far, by an
    /// eighth of it (4 MiB to 64 MiB at a time), when the storage allocates ahead. Best effort:
    /// a failure only stops it (writes past the end then extend the file themselves, and
    /// report any error of their own).
    fn allocate_ahead(&mut self) {
        if self.ahead.off {
            return;
        }
        let need = self.alloc_end.saturating_mul(self.cs);
        let have = self.ahead.end.max(self.file_len);
        if need <= have {
            return;
        }
        let step = (need / 8)
            .clamp(AHEAD_MIN, AHEAD_MAX)
            .next_multiple_of(self.cs);
        let to = need.saturating_add(step);
        match self.file.allocate_ahead(have, to) {
            Ok(true) => self.ahead.end = to,
            Ok(false) => self.ahead.off = true,
            Err(e) => {
                tracing::debug!("{}: no more room allocated ahead: {e}", self.file.name());
                self.ahead.off = true;
            }
        }
    }

    /// Gives back the room allocated ahead that no cluster took: the file ends where its
    /// last write ended (or where it ended at open, if that was further), as if nothing had
    /// been allocated ahead.
    fn trim_ahead(&mut self) -> Result<()> {
        let keep = self.file_len.max(self.ahead.len_at_open);
        if self.ahead.end <= keep {
            return Ok(());
        }
        let size = self
            .file
            .size()
            .map_err(|e| Error::io(self.ctx("cannot size"), e))?;
        // Only the room this image allocated (a file resized meanwhile is left alone).
        if size == self.ahead.end {
            self.file
                .set_size(keep)
                .map_err(|e| Error::io(self.ctx("cannot trim the room allocated ahead in"), e))?;
        }
        self.ahead.end = keep;
        Ok(())
    }

    /// Updates header bytes in place (one write, so the update is atomic for a crash).
    pub fn write_header_bytes(&mut self, off: u64, bytes: &[u8]) -> Result<()> {
        self.write_meta(bytes, off, "the header")
    }

    pub fn write_header_size(&mut self, size: u64) -> Result<()> {
        self.write_header_bytes(24, &size.to_be_bytes())?;
        self.hdr.size = size;
        Ok(())
    }

    // ---- write-back ------------------------------------------------------------------

    /// Writes every dirty refcount block. Returns whether anything was written.
    pub fn write_dirty_refblocks(&mut self) -> Result<bool> {
        let keys = self.rb.dirty_keys();
        for &off in &keys {
            let Some(block) = self.rb.peek(off) else {
                continue;
            };
            let block = block.clone();
            self.write_meta(&block, off, "a refcount block")?;
            self.rb.mark_clean(off);
        }
        Ok(!keys.is_empty())
    }

    /// Rule 1 (and 2): makes refcount increments and new data durable before mapping
    /// changes are written.
    pub fn order_before_mappings(&mut self) -> Result<()> {
        let wrote = self.write_dirty_refblocks()?;
        if wrote || self.unsynced {
            self.sync()?;
        }
        Ok(())
    }

    /// Writes every dirty L2 table. Callers run [`Meta::order_before_mappings`] first.
    fn write_dirty_l2(&mut self) -> Result<()> {
        for off in self.l2.dirty_keys() {
            let Some(t) = self.l2.peek(off) else {
                continue;
            };
            let bytes = encode_table(t);
            self.write_meta(&bytes, off, "an L2 table")?;
            self.l2.mark_clean(off);
        }
        Ok(())
    }

    /// Writes the dirty chunks of the L1 table. Callers order refcounts first.
    fn write_dirty_l1(&mut self) -> Result<()> {
        let per = (self.cs / 8) as usize;
        let chunks: Vec<u64> = self.l1_dirty.iter().copied().collect();
        for chunk in chunks {
            let start = chunk as usize * per;
            let end = (start + per).min(self.l1.len());
            if start >= end {
                self.l1_dirty.remove(&chunk);
                continue;
            }
            let bytes = encode_table(&self.l1[start..end]);
            let off = self.hdr.l1_table_offset + start as u64 * 8;
            self.write_meta(&bytes, off, "the L1 table")?;
            self.l1_dirty.remove(&chunk);
        }
        Ok(())
    }

    pub fn mark_l1_dirty(&mut self, idx: usize) {
        self.l1_dirty.insert(idx as u64 / (self.cs / 8));
    }

    /// Whether metadata changed in memory is not written to the file yet.
    pub fn has_unwritten(&self) -> bool {
        self.l2.has_dirty()
            || !self.l1_dirty.is_empty()
            || self.rb.has_dirty()
            || !self.pending_frees.is_empty()
    }

    /// Writes all metadata back in a crash-safe order and syncs, then applies queued frees
    /// (whose reference removals are now durable). Everything written before is durable when
    /// this returns.
    pub fn flush(&mut self) -> Result<()> {
        let mapping_dirty = self.l2.has_dirty() || !self.l1_dirty.is_empty();
        if mapping_dirty {
            self.order_before_mappings()?;
            self.write_dirty_l2()?;
            self.write_dirty_l1()?;
        } else {
            self.write_dirty_refblocks()?;
        }
        self.sync()?;
        if !self.pending_frees.is_empty() {
            self.apply_pending_frees()?;
            // Written now, synced by the next flush: losing them in a crash only leaks.
            self.write_dirty_refblocks()?;
        }
        Ok(())
    }

    /// Flush plus a final sync of what the flush itself wrote last (the freed refcounts), so
    /// that a closed image has no leaks. The dirty bitmaps are stored (their `in_use` flags
    /// cleared) after everything else is durable, and their old clusters freed.
    pub fn close(&mut self) -> Result<()> {
        self.flush()?;
        if self.bitmaps.writable && self.bitmaps_need_store() {
            self.store_bitmaps(Store::Final)?;
            self.flush()?;
        }
        if self.unsynced {
            self.sync()?;
        }
        self.trim_ahead()
    }

    /// Bounds the queue of frees (a guest that never flushes must not grow the file forever).
    pub fn maybe_writeback(&mut self) -> Result<()> {
        if self.pending_frees.len() >= MAX_PENDING_FREES {
            self.flush()?;
        }
        Ok(())
    }

    // ---- caches ------------------------------------------------------------------------

    /// Evicts L2 tables until one more fits. A dirty victim makes all dirty L2 tables go to
    /// the file (after the refcounts they depend on): one sync for the whole batch.
    pub fn make_room_l2(&mut self) -> Result<()> {
        while self.l2.full() {
            let Some((key, dirty)) = self.l2.victim() else {
                break;
            };
            if dirty {
                self.order_before_mappings()?;
                self.write_dirty_l2()?;
            }
            self.l2.remove(key);
        }
        Ok(())
    }

    /// Evicts refcount blocks until one more fits (dirty ones are written: refcount blocks
    /// may reach the file at any time, see rule 3).
    pub fn make_room_rb(&mut self) -> Result<()> {
        while self.rb.full() {
            let Some((key, dirty)) = self.rb.victim() else {
                break;
            };
            if dirty {
                if let Some(b) = self.rb.peek(key) {
                    let b = b.clone();
                    self.write_meta(&b, key, "a refcount block")?;
                }
            }
            self.rb.remove(key);
        }
        Ok(())
    }

    pub fn set_cache_limits(&mut self, l2: usize, rb: usize) {
        self.l2.set_cap(l2);
        self.rb.set_cap(rb);
    }

    /// Validates a host cluster that an L2 entry uses for data: not the header, not known
    /// metadata, not past the 56-bit limit.
    pub fn check_data_cluster(&self, c: u64, what: &str) -> Result<()> {
        if c == 0 {
            return Err(corrupt(format!("{what} points into the image header")));
        }
        if c.checked_shl(self.cb).is_none_or(|o| o >= MAX_HOST_OFFSET) {
            return Err(corrupt(format!("{what} points past the 56-bit host range")));
        }
        if self.is_meta(c) {
            return Err(corrupt(format!(
                "{what} points to metadata (host cluster {c:#x})"
            )));
        }
        Ok(())
    }

    /// Validates a decoded L2 entry's host pointers.
    pub fn check_entry(&self, e: L2Entry) -> Result<L2Entry> {
        match e {
            L2Entry::Unallocated => {}
            L2Entry::Zero { prealloc, .. } => {
                if self.hdr.version < 3 {
                    return Err(corrupt("L2 entry has the zero flag in a version 2 image"));
                }
                if let Some(h) = prealloc {
                    self.check_data_cluster(h >> self.cb, "preallocated zero cluster")?;
                }
            }
            L2Entry::Normal { host, .. } => {
                self.check_data_cluster(host >> self.cb, "L2 entry")?;
                if host >= self.file_len {
                    return Err(corrupt(format!(
                        "L2 entry points to {host:#x}, past the end of the file ({:#x})",
                        self.file_len
                    )));
                }
            }
            L2Entry::Compressed { host, len } => {
                if host >= MAX_HOST_OFFSET || host >= self.file_len {
                    return Err(corrupt(format!(
                        "compressed cluster at {host:#x} lies past the end of the file"
                    )));
                }
                let last = host
                    .checked_add(len.max(1) - 1)
                    .ok_or_else(|| corrupt("compressed cluster length overflows"))?;
                for c in (host >> self.cb)..=(last >> self.cb) {
                    self.check_data_cluster(c, "compressed cluster")?;
                }
            }
        }
        Ok(e)
    }
}

/// Big-endian encoding of a table of 64-bit entries.
pub(crate) fn encode_table(t: &[u64]) -> Vec<u8> {
    let mut v = Vec::with_capacity(t.len() * 8);
    for e in t {
        v.extend_from_slice(&e.to_be_bytes());
    }
    v
}

pub(crate) fn decode_table(b: &[u8]) -> Vec<u64> {
    b.chunks_exact(8)
        .map(|c| u64::from_be_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
        .collect()
}

/// Host clusters touched by a compressed stream (qcow2.txt, "Compressed Clusters
/// Descriptor": the stream may spill into the next contiguous host cluster). The entry was
/// validated by [`Meta::check_entry`].
pub(crate) fn compressed_clusters(host: u64, len: u64, cb: u32) -> std::ops::RangeInclusive<u64> {
    let last = host.saturating_add(len.max(1) - 1);
    (host >> cb)..=(last >> cb)
}

/// The clusters an L2 entry holds a reference to.
pub(crate) fn entry_clusters(e: L2Entry, cb: u32) -> Vec<HostCluster> {
    match e {
        L2Entry::Normal { host, .. }
        | L2Entry::Zero {
            prealloc: Some(host),
            ..
        } => vec![HostCluster(host >> cb)],
        L2Entry::Compressed { host, len } => compressed_clusters(host, len, cb)
            .map(HostCluster)
            .collect(),
        _ => Vec::new(),
    }
}

pub(crate) use format::{refcount_get, refcount_max, refcount_set};
