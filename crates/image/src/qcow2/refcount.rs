//! Refcounts and host cluster allocation (qcow2.txt, "Host cluster management"), and the
//! rebuild of all refcounts for dirty images (incompatible feature bit 0, "Dirty bit").

use std::collections::HashMap;

use xdisk_io::{Allocation, Storage};

use super::format::{
    self, incompat, Header, L2Entry, Snapshot, L1E_OFFSET_MASK, L1E_RESERVED_MASK, L2E_COPIED,
    MAX_REFTABLE_BYTES, REFT_OFFSET_MASK, REFT_RESERVED_MASK,
};
use super::meta::{
    compressed_clusters, corrupt, decode_table, encode_table, refcount_get, refcount_max,
    refcount_set, HostCluster, Meta, MAX_HOST_OFFSET,
};
use crate::{Error, Result};

impl Meta {
    /// Refcount entries per refcount block.
    pub fn rb_entries(&self) -> u64 {
        self.hdr.refcount_block_entries()
    }

    fn order(&self) -> u32 {
        self.hdr.refcount_order
    }

    /// The refcount block covering range `i` (`None`: no block, all refcounts 0).
    /// Validated: reserved bits, alignment, inside the file, not the header.
    pub fn refblock_offset(&self, i: u64) -> Result<Option<u64>> {
        let Some(&raw) = usize::try_from(i).ok().and_then(|i| self.reftable.get(i)) else {
            return Ok(None);
        };
        if raw & REFT_RESERVED_MASK != 0 {
            return Err(corrupt(format!(
                "refcount table entry {i} ({raw:#x}) has reserved bits set"
            )));
        }
        let off = raw & REFT_OFFSET_MASK;
        if off == 0 {
            return Ok(None);
        }
        if !off.is_multiple_of(self.cs) || off < self.cs {
            return Err(corrupt(format!(
                "refcount block {i} at {off:#x} is unaligned or overlaps the header"
            )));
        }
        if off >= self.file_len {
            return Err(corrupt(format!(
                "refcount block {i} at {off:#x} lies past the end of the file"
            )));
        }
        Ok(Some(off))
    }

    fn load_rb(&mut self, off: u64) -> Result<()> {
        if self.rb.contains(off) {
            return Ok(());
        }
        self.make_room_rb()?;
        let mut buf = vec![0u8; self.cs as usize];
        self.read_meta(&mut buf, off, "a refcount block")?;
        self.rb.insert(off, buf, false);
        Ok(())
    }

    /// The refcount of host cluster `c`.
    pub fn refcount(&mut self, c: HostCluster) -> Result<u64> {
        let rbe = self.rb_entries();
        match self.refblock_offset(c.0 / rbe)? {
            None => Ok(0),
            Some(off) => {
                self.load_rb(off)?;
                let order = self.order();
                let b = self
                    .rb
                    .get(off)
                    .ok_or_else(|| corrupt("refcount block vanished from the cache"))?;
                Ok(refcount_get(b, (c.0 % rbe) as usize, order))
            }
        }
    }

    /// Sets the refcount of host cluster `c` (its refcount block must exist).
    fn set_refcount(&mut self, c: HostCluster, v: u64) -> Result<()> {
        let rbe = self.rb_entries();
        let order = self.order();
        if v > refcount_max(order) {
            return Err(Error::NoSpace(format!(
                "refcount of host cluster {:#x} would exceed {} (refcount_bits={})",
                c.0,
                refcount_max(order),
                self.hdr.refcount_bits()
            )));
        }
        let off = self.refblock_offset(c.0 / rbe)?.ok_or_else(|| {
            corrupt(format!(
                "host cluster {:#x} has no refcount block to update",
                c.0
            ))
        })?;
        self.load_rb(off)?;
        let b = self
            .rb
            .get_mut(off)
            .ok_or_else(|| corrupt("refcount block vanished from the cache"))?;
        refcount_set(b, (c.0 % rbe) as usize, order, v);
        Ok(())
    }

    fn check_host_range(&self, end_cluster: u64) -> Result<()> {
        match end_cluster.checked_shl(self.cb) {
            Some(end) if end <= MAX_HOST_OFFSET && end >> self.cb == end_cluster => Ok(()),
            _ => Err(Error::NoSpace(
                "the image file would grow past the 56-bit qcow2 host offset limit".into(),
            )),
        }
    }

    /// Whether the allocator may hand out host cluster `c` (given refcount 0).
    fn usable(&self, c: u64) -> bool {
        c != 0 && !self.quarantined.contains(&c) && !self.is_meta(c)
    }

    /// Allocates one host cluster (refcount 0 -> 1, in the cache): the first usable free
    /// cluster from the free hint on, creating refcount blocks and growing the refcount table
    /// as needed. The caller writes the whole cluster before referencing it.
    pub fn alloc_cluster(&mut self) -> Result<HostCluster> {
        self.poll_quarantine();
        let rbe = self.rb_entries();
        let order = self.order();
        let mut c = self.free_hint.max(1);
        loop {
            self.check_host_range(c + 1)?;
            let i = c / rbe;
            let Some(off) = self.refblock_offset(i)? else {
                if i >= self.reftable.len() as u64 {
                    self.grow_reftable(i)?;
                } else {
                    self.new_refblock(i, c)?;
                }
                continue;
            };
            self.load_rb(off)?;
            let base = i * rbe;
            let found = {
                let b = self
                    .rb
                    .peek(off)
                    .ok_or_else(|| corrupt("refcount block vanished from the cache"))?;
                (c..base + rbe)
                    .find(|&x| refcount_get(b, (x - base) as usize, order) == 0 && self.usable(x))
            };
            match found {
                Some(x) => {
                    self.set_refcount(HostCluster(x), 1)?;
                    self.free_hint = x + 1;
                    self.note_alloc(x + 1);
                    return Ok(HostCluster(x));
                }
                None => c = base + rbe,
            }
        }
    }

    /// Allocates room for one compressed stream of `len` bytes (at most a cluster) the way
    /// QEMU's qcow2_alloc_bytes does: packed right after the previous stream (byte
    /// granularity; the descriptor counts sectors, and "another compressed cluster may map to
    /// the tail of the final sector") in the same host cluster when it fits, spilling into the next host cluster when that one
    /// is the next one allocated, else at the start of a fresh cluster. Every host cluster
    /// the stream touches gets one more reference (in the cache; rule 1 orders it before the
    /// L2 entry). Returns the byte offset.
    pub fn alloc_compressed(&mut self, len: u64) -> Result<u64> {
        debug_assert!(len > 0 && len <= self.cs);
        let mut off = self.compress_cursor;
        if off != 0 {
            let c = off >> self.cb;
            let rc = self.refcount(HostCluster(c))?;
            if rc == 0 || rc >= refcount_max(self.order()) || self.quarantined.contains(&c) {
                off = 0;
            }
        }
        let free_in_cluster = if off == 0 {
            0
        } else {
            self.cs - (off & (self.cs - 1))
        };
        let start = if off == 0 || free_in_cluster < len {
            let new = self.alloc_cluster()?; // refcount 1: this stream's reference
            let new_off = new.0 << self.cb;
            if off != 0 && off.next_multiple_of(self.cs) == new_off {
                // The stream starts in the tail of the old cluster and spills into the new.
                let c = HostCluster(off >> self.cb);
                let rc = self.refcount(c)?;
                if let Err(e) = self.set_refcount(c, rc + 1) {
                    self.release_unused(new);
                    return Err(e);
                }
                off
            } else {
                new_off
            }
        } else {
            let c = HostCluster(off >> self.cb);
            let rc = self.refcount(c)?;
            self.set_refcount(c, rc + 1)?;
            off
        };
        // The descriptor's offset field has x = 62 - (cluster_bits - 8) bits.
        let x = 62 - (self.cb - 8);
        if x < 64 && start + len > 1u64 << x {
            self.unref_compressed(start, len);
            return Err(Error::NoSpace(
                "compressed data would lie past the descriptor's host offset range".into(),
            ));
        }
        let end = start + len;
        self.compress_cursor = if end.is_multiple_of(self.cs) { 0 } else { end };
        self.note_alloc(end.div_ceil(self.cs));
        Ok(start)
    }

    /// Undoes [`Meta::alloc_compressed`] for a stream that was never referenced.
    pub fn unref_compressed(&mut self, start: u64, len: u64) {
        for c in compressed_clusters(start, len, self.cb) {
            let c = HostCluster(c);
            let r = self.refcount(c).and_then(|rc| {
                if rc <= 1 {
                    self.free_hint = self.free_hint.min(c.0);
                }
                self.set_refcount(c, rc.saturating_sub(1))
            });
            if let Err(e) = r {
                tracing::warn!("cannot release compressed space at {:#x}: {e}", c.0);
            }
        }
        self.compress_cursor = 0;
    }

    /// Allocates `n` contiguous clusters past the end of everything (for tables that must be
    /// contiguous: the L1 table).
    pub fn alloc_contiguous(&mut self, n: u64) -> Result<HostCluster> {
        let rbe = self.rb_entries();
        'retry: loop {
            let start = self.end_cluster();
            let end = start + n;
            self.check_host_range(end)?;
            for i in start / rbe..=(end - 1) / rbe {
                if self.refblock_offset(i)?.is_none() {
                    if i >= self.reftable.len() as u64 {
                        self.grow_reftable(i)?;
                    } else {
                        self.new_refblock(i, start)?;
                    }
                    continue 'retry;
                }
            }
            for c in start..end {
                if self.refcount(HostCluster(c))? != 0 {
                    return Err(corrupt(format!(
                        "host cluster {c:#x} past the end of the image has a refcount"
                    )));
                }
                self.set_refcount(HostCluster(c), 1)?;
            }
            self.note_alloc(end);
            return Ok(HostCluster(start));
        }
    }

    /// Creates the missing refcount block of range `i` inside its own range (a block that
    /// describes itself), at the first usable cluster from `from`. The block is written (and
    /// synced) before the refcount table entry that points to it.
    fn new_refblock(&mut self, i: u64, from: u64) -> Result<()> {
        let rbe = self.rb_entries();
        let base = i * rbe;
        let b = (from.max(base).max(1)..base + rbe)
            .find(|&x| self.usable(x))
            .ok_or_else(|| Error::NoSpace(format!("no room for refcount block {i}")))?;
        self.check_host_range(b + 1)?;
        let mut block = vec![0u8; self.cs as usize];
        refcount_set(&mut block, (b - base) as usize, self.order(), 1);
        let off = b << self.cb;
        self.write_meta(&block, off, "a refcount block")?;
        self.sync()?;
        let entry_off = self.hdr.refcount_table_offset + i * 8;
        self.write_meta(&off.to_be_bytes(), entry_off, "the refcount table")?;
        self.reftable[i as usize] = off;
        self.meta_set.insert(b);
        self.note_alloc(b + 1);
        self.make_room_rb()?;
        self.rb.insert(off, block, false);
        Ok(())
    }

    /// Grows the refcount table so that it has entry `need`: a new, larger table and the
    /// refcount blocks that cover it are written past the end of the file and synced, then
    /// the header switches to it in one write; the old table is freed afterwards.
    fn grow_reftable(&mut self, need: u64) -> Result<()> {
        let cs = self.cs;
        let rbe = self.rb_entries();
        let per_cluster = cs / 8;
        let old_n = self.reftable.len() as u64;
        let start = self.end_cluster();
        let mut entries = (old_n + old_n / 2)
            .max(need + 1)
            .next_multiple_of(per_cluster);
        let (ranges, tab_clusters, end) = loop {
            let tab_clusters = entries / per_cluster;
            // New refcount blocks for the ranges of the new area that lack one (they go
            // first in the area, the table after them).
            let mut k = 0u64;
            let (ranges, end) = loop {
                let end = start + k + tab_clusters;
                let ranges: Vec<u64> = (start / rbe..=(end - 1) / rbe)
                    .filter(|&r| r >= old_n || self.reftable[r as usize] == 0)
                    .collect();
                if ranges.len() as u64 <= k {
                    break (ranges, end);
                }
                k = ranges.len() as u64;
            };
            let last_range = (end - 1) / rbe;
            if last_range < entries && need < entries {
                break (ranges, tab_clusters, end);
            }
            entries = (last_range.max(need) + 1)
                .next_multiple_of(per_cluster)
                .max(entries + per_cluster);
        };
        if entries * 8 > MAX_REFTABLE_BYTES {
            return Err(Error::NoSpace(format!(
                "the refcount table would exceed {MAX_REFTABLE_BYTES} bytes"
            )));
        }
        self.check_host_range(end)?;
        let k = end - start - tab_clusters;
        let order = self.order();
        // Blocks placed in the area: ranges[j] gets cluster start + j (unused extra
        // clusters, if any, stay unreferenced and unrefcounted: free).
        let mut blocks: Vec<Vec<u8>> = vec![vec![0u8; cs as usize]; ranges.len()];
        let used: Vec<u64> = (start..start + ranges.len() as u64)
            .chain(start + k..end)
            .collect();
        for &c in &used {
            let r = c / rbe;
            if let Some(j) = ranges.iter().position(|&x| x == r) {
                refcount_set(&mut blocks[j], (c % rbe) as usize, order, 1);
            } else {
                if self.refcount(HostCluster(c))? != 0 {
                    return Err(corrupt(format!(
                        "host cluster {c:#x} past the end of the image has a refcount"
                    )));
                }
                self.set_refcount(HostCluster(c), 1)?;
            }
        }
        for (j, b) in blocks.iter().enumerate() {
            self.write_meta(b, (start + j as u64) << self.cb, "a refcount block")?;
        }
        self.write_dirty_refblocks()?;
        let mut table = self.reftable.clone();
        table.resize(entries as usize, 0);
        for (j, &r) in ranges.iter().enumerate() {
            table[r as usize] = (start + j as u64) << self.cb;
        }
        let tab_off = (start + k) << self.cb;
        self.write_meta(&encode_table(&table), tab_off, "the refcount table")?;
        self.sync()?;
        let mut hb = [0u8; 12];
        hb[..8].copy_from_slice(&tab_off.to_be_bytes());
        hb[8..].copy_from_slice(&((entries / per_cluster) as u32).to_be_bytes());
        self.write_header_bytes(48, &hb)?;
        self.sync()?;
        let old_first = self.hdr.refcount_table_offset >> self.cb;
        let old_clusters = u64::from(self.hdr.refcount_table_clusters);
        self.hdr.refcount_table_offset = tab_off;
        self.hdr.refcount_table_clusters = (entries / per_cluster) as u32;
        self.reftable = table;
        for c in old_first..old_first + old_clusters {
            self.meta_set.remove(&c);
            self.free_later(HostCluster(c));
        }
        for &c in &used {
            self.meta_set.insert(c);
        }
        self.note_alloc(end);
        tracing::debug!(entries, tab_off, "grew the refcount table");
        Ok(())
    }

    /// Queues a refcount decrement, applied once the removal of the reference is durable.
    pub fn free_later(&mut self, c: HostCluster) {
        self.pending_frees.push(c);
    }

    /// Queues the decrements for every host cluster an L2 entry references.
    pub fn free_entry_later(&mut self, e: L2Entry) {
        let cl = super::meta::entry_clusters(e, self.cb);
        self.pending_frees.extend(cl);
    }

    /// Undoes an allocation that was never referenced (refcount 1 -> 0 at once: nothing
    /// on disk points to it, so there is no ordering to respect and no I/O to drain).
    pub fn release_unused(&mut self, c: HostCluster) {
        match self.set_refcount(c, 0) {
            Ok(()) => {
                self.free_hint = self.free_hint.min(c.0);
                if self.compress_cursor >> self.cb == c.0 {
                    self.compress_cursor = 0;
                }
            }
            Err(e) => tracing::warn!("cannot release unused cluster {:#x}: {e}", c.0),
        }
    }

    /// Applies the queued refcount decrements (callers made the reference removals durable
    /// first). Clusters that become free get their space released and are quarantined.
    pub fn apply_pending_frees(&mut self) -> Result<()> {
        let list = std::mem::take(&mut self.pending_frees);
        let mut freed = Vec::new();
        for (n, &c) in list.iter().enumerate() {
            let rc = match self.refcount(c) {
                Ok(rc) => rc,
                Err(e) => {
                    tracing::warn!("cannot free host cluster {:#x}: {e}", c.0);
                    continue;
                }
            };
            if rc == 0 {
                tracing::warn!(
                    "host cluster {:#x} freed with refcount 0 (image inconsistent; run check)",
                    c.0
                );
                continue;
            }
            if let Err(e) = self.set_refcount(c, rc - 1) {
                // Keep the rest queued so nothing is lost.
                self.pending_frees.extend_from_slice(&list[n..]);
                return Err(e);
            }
            if rc == 1 {
                freed.push(c.0);
                if self.compress_cursor >> self.cb == c.0 {
                    self.compress_cursor = 0;
                }
            }
        }
        freed.sort_unstable();
        freed.dedup();
        // Release the space of freed clusters (runs of contiguous clusters in one call).
        let mut i = 0;
        while i < freed.len() {
            let mut j = i + 1;
            while j < freed.len() && freed[j] == freed[j - 1] + 1 {
                j += 1;
            }
            let off = freed[i] << self.cb;
            let len = (j - i) as u64 * self.cs;
            if let Err(e) = self.file.discard(off, len) {
                tracing::debug!("punch_hole({off:#x}, {len}) failed: {e}");
            }
            i = j;
        }
        for &c in &freed {
            self.quarantined.insert(c);
        }
        self.waiting.extend(freed);
        self.poll_quarantine();
        Ok(())
    }

    /// Releases the quarantined batch once its epoch has drained, and starts a batch for the
    /// clusters waiting. Only one batch is outstanding at a time, so each waits on exactly one
    /// epoch (the one current when it was freed).
    pub fn poll_quarantine(&mut self) {
        if let Some((epoch, _)) = &self.quarantine {
            if self.tracker.drained(*epoch) {
                let (_, list) = self.quarantine.take().unwrap_or_default();
                for c in list {
                    self.quarantined.remove(&c);
                    self.free_hint = self.free_hint.min(c);
                }
            }
        }
        if self.quarantine.is_none() && !self.waiting.is_empty() {
            let epoch = self.tracker.quarantine();
            self.quarantine = Some((epoch, std::mem::take(&mut self.waiting)));
        }
    }
}

// ---- rebuild ----------------------------------------------------------------------------

/// Per-cluster reference counts computed by walking the metadata (u16 with an overflow map,
/// so a large image costs two bytes per cluster).
struct Counts {
    v: Vec<u16>,
    big: HashMap<u64, u64>,
}

impl Counts {
    fn get(&self, c: u64) -> u64 {
        match self.v.get(c as usize) {
            Some(&u16::MAX) => self.big.get(&c).copied().unwrap_or(u64::from(u16::MAX)),
            Some(&n) => u64::from(n),
            None => 0,
        }
    }
    fn inc(&mut self, c: u64) -> Result<()> {
        self.add(c, 1)
    }
    fn add(&mut self, c: u64, m: u64) -> Result<()> {
        let n = self.v.get_mut(c as usize).ok_or_else(|| {
            corrupt(format!(
                "a reference to host cluster {c:#x} lies past the end of the file"
            ))
        })?;
        let cur = if *n == u16::MAX {
            self.big.get(&c).copied().unwrap_or(u64::from(u16::MAX))
        } else {
            u64::from(*n)
        };
        let new = cur.saturating_add(m);
        if new >= u64::from(u16::MAX) {
            *n = u16::MAX;
            self.big.insert(c, new);
        } else {
            *n = new as u16;
        }
        Ok(())
    }
}

/// Bytes of L1 entries read at a time while walking a table (tables are never held whole).
const L1_CHUNK_BYTES: u64 = 64 << 10;

/// Calls `f` with every entry of the table of `entries` 8-byte entries at `off`, reading it
/// a chunk at a time.
fn for_each_entry(
    file: &dyn Storage,
    off: u64,
    entries: u64,
    mut f: impl FnMut(u64) -> Result<()>,
) -> Result<()> {
    let mut buf = Vec::new();
    let mut done = 0u64;
    while done < entries {
        let n = (entries - done).min(L1_CHUNK_BYTES / 8);
        buf.resize((n * 8) as usize, 0);
        file.read_at(&mut buf, off + done * 8)
            .map_err(|e| Error::io(format!("cannot read a table from {}", file.name()), e))?;
        for raw in decode_table(&buf) {
            f(raw)?;
        }
        done += n;
    }
    Ok(())
}

/// Whether `[off, off + len)` is a hole of the file (reads as zeroes without being read).
fn is_hole(file: &dyn Storage, off: u64, len: u64) -> bool {
    matches!(file.allocation(off, len), Allocation::Hole { len: l } if l >= len)
}

fn mib(bytes: u64) -> u64 {
    bytes.div_ceil(1 << 20)
}

/// Rebuilds every refcount of a dirty image (incompatible bit 0: "refcounts may be
/// inconsistent, make sure to scan L1/L2 tables to repair refcounts before accessing the
/// image"), then fixes the COPIED flags of the active tables and clears the dirty bit.
///
/// References are counted per path, as `qemu-img check` does: the header, the active and
/// snapshot L1 tables, the snapshot table, each L2 table once per L1 entry naming it, and
/// each data cluster once per L2 entry naming it (compressed clusters: every host cluster
/// their stream touches); `extra` adds byte ranges referenced once each (the bitmap
/// directory, bitmap tables and bitmap data of a consistent bitmaps extension). The new refcount table and blocks are written past the end of the
/// file and cover themselves; the old ones become unreferenced free clusters. The image stays
/// dirty until everything is written and synced, so a crash meanwhile just repeats this.
///
/// Bounded for hostile images: the counts (two bytes per cluster of the file), the list of
/// distinct L2 tables (16 bytes each) and the L1 entries walked must fit in `memory_limit`
/// bytes, checked before anything is written (the image stays as it is, dirty, and the
/// error says how to repair it). L1 tables are walked a chunk at a time, one after the
/// other; each distinct L2 table is read once (its references count once per L1 entry
/// naming it), and L2 tables in holes of the file are not read at all.
pub(crate) fn rebuild_refcounts(
    file: &dyn Storage,
    hdr: &mut Header,
    snapshots: &[Snapshot],
    extra: &[(u64, u64)],
    memory_limit: u64,
) -> Result<()> {
    let io = |what: &str| {
        let what = format!("{what} {}", file.name());
        move |e| Error::io(what, e)
    };
    let file_len = file.size().map_err(io("cannot size"))?;
    let cb = hdr.cluster_bits;
    let cs = hdr.cluster_size();
    let nb = file_len.div_ceil(cs);
    let too_much = |need: u64| {
        Error::Unsupported(format!(
            "the refcount rebuild of dirty image {} needs {} MiB, over the limit of {} MiB; \
             the image was left as it is; repair it with qemu-img check -r all",
            file.name(),
            mib(need),
            mib(memory_limit)
        ))
    };
    let l1_bytes = snapshots
        .iter()
        .map(|s| u64::from(s.l1_size) * 8)
        .fold(u64::from(hdr.l1_size) * 8, u64::saturating_add);
    let base_need = nb.saturating_mul(2).saturating_add(l1_bytes);
    if nb > 1 << 28 || base_need > memory_limit {
        return Err(too_much(base_need));
    }
    let mut counts = Counts {
        v: vec![0u16; nb as usize],
        big: HashMap::new(),
    };
    let check_l2_off = |raw: u64| -> Result<u64> {
        if raw & L1E_RESERVED_MASK != 0 {
            return Err(corrupt(format!("L1 entry {raw:#x} has reserved bits set")));
        }
        let off = raw & L1E_OFFSET_MASK;
        if off != 0 && (!off.is_multiple_of(cs) || off >= file_len) {
            return Err(corrupt(format!("L1 entry {raw:#x} is invalid")));
        }
        Ok(off)
    };
    // Pass 1: how many L1 entries name each L2 table.
    let tables = std::iter::once((hdr.l1_table_offset, hdr.l1_size))
        .chain(snapshots.iter().map(|s| (s.l1_table_offset, s.l1_size)));
    for (off, size) in tables.clone() {
        for_each_entry(file, off, u64::from(size), |raw| {
            let l2 = check_l2_off(raw)?;
            if l2 != 0 {
                counts.inc(l2 >> cb)?;
            }
            Ok(())
        })?;
    }
    let n_l2 = counts.v.iter().filter(|&&n| n != 0).count() as u64;
    let need = base_need.saturating_add(n_l2.saturating_mul(16));
    if need > memory_limit {
        return Err(too_much(need));
    }
    let mut l2s = Vec::with_capacity(n_l2 as usize);
    for (c, &n) in counts.v.iter().enumerate() {
        if n != 0 {
            l2s.push((c as u64, counts.get(c as u64)));
        }
    }
    counts.v.fill(0);
    counts.big.clear();
    // Pass 2: every reference, each L2 table read once.
    let inc_range = |counts: &mut Counts, off: u64, len: u64| -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        let last = off
            .checked_add(len - 1)
            .ok_or_else(|| corrupt("metadata range overflows"))?;
        for c in off >> cb..=last >> cb {
            counts.inc(c)?;
        }
        Ok(())
    };
    inc_range(&mut counts, 0, cs)?;
    if hdr.nb_snapshots > 0 {
        let len = snapshot_table_len(file, hdr, file_len)?;
        inc_range(&mut counts, hdr.snapshots_offset, len)?;
    }
    for (off, size) in tables {
        inc_range(&mut counts, off, u64::from(size) * 8)?;
    }
    for &(off, len) in extra {
        inc_range(&mut counts, off, len)?;
    }
    let mut l2buf = vec![0u8; cs as usize];
    for &(c, m) in &l2s {
        counts.add(c, m)?;
        let off = c << cb;
        if is_hole(file, off, cs) {
            continue;
        }
        file.read_at(&mut l2buf, off)
            .map_err(io("cannot read a table from"))?;
        for e in decode_table(&l2buf) {
            match L2Entry::decode(e, cb)? {
                L2Entry::Normal { host, .. }
                | L2Entry::Zero {
                    prealloc: Some(host),
                    ..
                } => counts.add(host >> cb, m)?,
                L2Entry::Compressed { host, len } => {
                    for h in compressed_clusters(host, len, cb) {
                        counts.add(h, m)?;
                    }
                }
                _ => {}
            }
        }
    }
    drop(l2s);
    let read_table = |off: u64, bytes: u64| -> Result<Vec<u64>> {
        let mut buf = vec![0u8; bytes as usize];
        file.read_at(&mut buf, off)
            .map_err(io("cannot read a table from"))?;
        Ok(decode_table(&buf))
    };

    // New refcount structures past the end: k blocks covering clusters [0, total), then the
    // table.
    let rbe = hdr.refcount_block_entries();
    let per = cs / 8;
    let start = nb.max(1);
    let mut k = start.div_ceil(rbe).max(1);
    let (tab_clusters, total) = loop {
        let t = k.div_ceil(per);
        let total = start + k + t;
        let need = total.div_ceil(rbe);
        if need <= k {
            break (t, total);
        }
        k = need;
    };
    if tab_clusters * cs > MAX_REFTABLE_BYTES {
        return Err(Error::NoSpace(
            "the rebuilt refcount table would be too large".into(),
        ));
    }
    counts.v.resize(total as usize, 0);
    for c in start..total {
        counts.inc(c)?;
    }
    let order = hdr.refcount_order;
    let max = refcount_max(order);
    let mut table = vec![0u64; (tab_clusters * per) as usize];
    for j in 0..k {
        let mut block = vec![0u8; cs as usize];
        for idx in 0..rbe {
            let c = j * rbe + idx;
            if c >= total {
                break;
            }
            let n = counts.get(c);
            if n > max {
                return Err(corrupt(format!(
                    "host cluster {c:#x} has {n} references, more than refcount_bits={} allow",
                    hdr.refcount_bits()
                )));
            }
            refcount_set(&mut block, idx as usize, order, n);
        }
        let off = (start + j) << cb;
        file.write_at(&block, off)
            .map_err(io("cannot write a refcount block to"))?;
        table[j as usize] = off;
    }
    let tab_off = (start + k) << cb;
    file.write_at(&encode_table(&table), tab_off)
        .map_err(io("cannot write the refcount table to"))?;
    file.flush().map_err(io("cannot flush"))?;
    let mut hb = [0u8; 12];
    hb[..8].copy_from_slice(&tab_off.to_be_bytes());
    hb[8..].copy_from_slice(&(tab_clusters as u32).to_be_bytes());
    file.write_at(&hb, 48)
        .map_err(io("cannot write the header of"))?;
    file.flush().map_err(io("cannot flush"))?;
    hdr.refcount_table_offset = tab_off;
    hdr.refcount_table_clusters = tab_clusters as u32;

    // COPIED flags of the active tables ("only accurate in the active L1 table"): set exactly
    // when the refcount is one.
    let mut l1 = read_table(hdr.l1_table_offset, u64::from(hdr.l1_size) * 8)?;
    let mut l1_changed = false;
    for raw in l1.iter_mut() {
        let off = *raw & L1E_OFFSET_MASK;
        if off == 0 {
            continue;
        }
        let want = counts.get(off >> cb) == 1;
        if want != (*raw & L2E_COPIED != 0) {
            *raw ^= L2E_COPIED;
            l1_changed = true;
        }
    }
    // Each distinct L2 table of the active L1 once.
    let mut active_l2: Vec<u64> = l1
        .iter()
        .map(|raw| raw & L1E_OFFSET_MASK)
        .filter(|&o| o != 0)
        .collect();
    active_l2.sort_unstable();
    active_l2.dedup();
    for off in active_l2 {
        if is_hole(file, off, cs) {
            continue;
        }
        let mut t = read_table(off, cs)?;
        let mut changed = false;
        for e in t.iter_mut() {
            let host = match L2Entry::decode(*e, cb)? {
                L2Entry::Normal { host, .. }
                | L2Entry::Zero {
                    prealloc: Some(host),
                    ..
                } => host,
                _ => continue,
            };
            let want = counts.get(host >> cb) == 1;
            if want != (*e & L2E_COPIED != 0) {
                *e ^= L2E_COPIED;
                changed = true;
            }
        }
        if changed {
            file.write_at(&encode_table(&t), off)
                .map_err(io("cannot write an L2 table to"))?;
        }
    }
    if l1_changed {
        file.write_at(&encode_table(&l1), hdr.l1_table_offset)
            .map_err(io("cannot write the L1 table to"))?;
    }
    file.flush().map_err(io("cannot flush"))?;
    hdr.incompatible_features &= !incompat::DIRTY;
    file.write_at(&hdr.incompatible_features.to_be_bytes(), 72)
        .map_err(io("cannot write the header of"))?;
    file.flush().map_err(io("cannot flush"))?;
    tracing::info!(
        path = %file.name(),
        "rebuilt the refcounts of a dirty qcow2 image"
    );
    Ok(())
}

/// Reads the snapshot table just far enough to know its length in bytes.
pub(crate) fn snapshot_table_len(file: &dyn Storage, hdr: &Header, file_len: u64) -> Result<u64> {
    let buf = super::read_snapshot_table(file, hdr, file_len)?;
    format::snapshot_table_len(&buf, hdr.nb_snapshots)
        .map(|n| n as u64)
        .ok_or_else(|| corrupt("snapshot table truncated"))
}
