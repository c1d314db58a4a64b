//! Guest-to-host cluster mapping: L1/L2 lookups, L2 allocation and copy-on-write of shared L2
//! tables (qcow2.txt, "Cluster mapping" and "Snapshots").

use super::format::{L2Entry, L1E_OFFSET_MASK, L1E_RESERVED_MASK, L2E_COPIED, MAX_L1_BYTES};
use super::meta::{corrupt, decode_table, encode_table, HostCluster, Meta};
use crate::{Error, Result};

impl Meta {
    /// Entries per L2 table.
    pub fn l2_entries(&self) -> u64 {
        self.cs / 8
    }

    pub fn l1_index(&self, g: u64) -> usize {
        (g / self.l2_entries()) as usize
    }

    pub fn l2_index(&self, g: u64) -> usize {
        (g % self.l2_entries()) as usize
    }

    /// The L2 table of L1 entry `i`: `None` when unallocated, else its offset and whether
    /// its refcount is exactly one (COPIED). Validated: reserved bits, alignment, inside the
    /// file, not the header or other top-level metadata.
    pub fn l1_entry(&self, i: usize) -> Result<Option<(u64, bool)>> {
        let Some(&raw) = self.l1.get(i) else {
            return Err(corrupt(format!(
                "L1 index {i} beyond the L1 table ({} entries)",
                self.l1.len()
            )));
        };
        if raw & L1E_RESERVED_MASK != 0 {
            return Err(corrupt(format!(
                "L1 entry {i} ({raw:#x}) has reserved bits set"
            )));
        }
        let off = raw & L1E_OFFSET_MASK;
        if off == 0 {
            return Ok(None);
        }
        if !off.is_multiple_of(self.cs) {
            return Err(corrupt(format!(
                "L1 entry {i} points to an unaligned L2 table ({off:#x})"
            )));
        }
        if off >= self.file_len {
            return Err(corrupt(format!(
                "L1 entry {i} points to an L2 table past the end of the file ({off:#x})"
            )));
        }
        let c = off >> self.cb;
        if c == 0 || self.top_level_metadata(c) {
            return Err(corrupt(format!(
                "L1 entry {i} points to other metadata ({off:#x})"
            )));
        }
        Ok(Some((off, raw & L2E_COPIED != 0)))
    }

    /// Whether host cluster `c` holds the L1 table or the refcount table.
    fn top_level_metadata(&self, c: u64) -> bool {
        let within = |start: u64, bytes: u64| {
            let first = start >> self.cb;
            let n = bytes.div_ceil(self.cs);
            c >= first && c < first + n
        };
        within(self.hdr.l1_table_offset, self.l1.len() as u64 * 8)
            || within(
                self.hdr.refcount_table_offset,
                u64::from(self.hdr.refcount_table_clusters) * self.cs,
            )
    }

    /// Loads an L2 table into the cache (if it is not there yet).
    pub fn load_l2(&mut self, off: u64) -> Result<()> {
        if self.l2.contains(off) {
            return Ok(());
        }
        self.make_room_l2()?;
        let mut buf = vec![0u8; self.cs as usize];
        self.read_meta(&mut buf, off, "an L2 table")?;
        self.l2.insert(off, decode_table(&buf), false);
        Ok(())
    }

    fn decode_entry(&self, raw: u64) -> Result<L2Entry> {
        let e = L2Entry::decode(raw, self.cb)?;
        self.check_entry(e)
    }

    /// The mapping of guest cluster `g` (loads its L2 table if needed).
    pub fn lookup(&mut self, g: u64) -> Result<L2Entry> {
        match self.l1_entry(self.l1_index(g))? {
            None => Ok(L2Entry::Unallocated),
            Some((off, _)) => {
                self.load_l2(off)?;
                let idx = self.l2_index(g);
                let raw = self
                    .l2
                    .get(off)
                    .map(|t| t[idx])
                    .ok_or_else(|| corrupt("L2 table vanished from the cache"))?;
                self.decode_entry(raw)
            }
        }
    }

    /// Like [`Meta::lookup`] without any I/O: `None` when the L2 table is not cached.
    pub fn lookup_cached(&mut self, g: u64) -> Result<Option<L2Entry>> {
        match self.l1_entry(self.l1_index(g))? {
            None => Ok(Some(L2Entry::Unallocated)),
            Some((off, _)) => {
                let idx = self.l2_index(g);
                match self.l2.get(off).map(|t| t[idx]) {
                    None => Ok(None),
                    Some(raw) => self.decode_entry(raw).map(Some),
                }
            }
        }
    }

    /// Whether the L2 table of guest cluster `g` is unallocated (the whole table's range is).
    pub fn l2_unallocated(&self, g: u64) -> Result<bool> {
        Ok(self.l1_entry(self.l1_index(g))?.is_none())
    }

    /// The L2 table that guest cluster `g`'s entry may be modified in: allocates it (zeroed)
    /// when the L1 entry is empty, copies it when it is shared (no COPIED flag: an internal
    /// snapshot references it too). The new table is written whole before the L1 entry
    /// (kept dirty in memory) points to it. Returns its offset; it is in the cache.
    pub fn l2_for_write(&mut self, g: u64) -> Result<u64> {
        let i = self.l1_index(g);
        let old = self.l1_entry(i)?;
        if let Some((off, true)) = old {
            self.load_l2(off)?;
            return Ok(off);
        }
        let table = match old {
            Some((off, _)) => {
                self.load_l2(off)?;
                self.l2
                    .peek(off)
                    .cloned()
                    .ok_or_else(|| corrupt("L2 table vanished from the cache"))?
            }
            None => vec![0u64; self.l2_entries() as usize],
        };
        let c = self.alloc_cluster()?;
        let new_off = c.0 << self.cb;
        if let Err(e) = self.write_meta(&encode_table(&table), new_off, "an L2 table") {
            self.release_unused(c);
            return Err(e);
        }
        self.make_room_l2()?;
        self.l2.insert(new_off, table, false);
        self.meta_set.insert(c.0);
        self.l1[i] = new_off | L2E_COPIED;
        self.mark_l1_dirty(i);
        if let Some((old_off, _)) = old {
            // The snapshot keeps the old table (it stays in meta_set); we drop our reference
            // once the new L1 entry is durable (rule 3).
            self.free_later(HostCluster(old_off >> self.cb));
        }
        Ok(new_off)
    }

    /// Sets guest cluster `g`'s entry (in the cached table; written back later).
    pub fn set_entry(&mut self, g: u64, e: L2Entry) -> Result<()> {
        let off = self.l2_for_write(g)?;
        let idx = self.l2_index(g);
        let raw = e.encode(self.cb);
        let t = self
            .l2
            .get_mut(off)
            .ok_or_else(|| corrupt("L2 table vanished from the cache"))?;
        t[idx] = raw;
        Ok(())
    }

    /// Grows the active L1 table to `need` entries: the new table is written past the end of
    /// the file (after everything it references is durable), then the header switches to it
    /// in one write (l1_size and l1_table_offset are adjacent), then the old one is freed.
    pub fn grow_l1(&mut self, need: u64) -> Result<()> {
        let bytes = need * 8;
        if bytes > MAX_L1_BYTES {
            return Err(Error::InvalidArgument(format!(
                "the L1 table would need {need} entries, more than QEMU's limit of {}",
                MAX_L1_BYTES / 8
            )));
        }
        // The new table is a copy of the in-memory one: make that equal to the file, with
        // every refcount it depends on durable.
        self.flush()?;
        let clusters = bytes.div_ceil(self.cs);
        let start = self.alloc_contiguous(clusters)?;
        let off = start.0 << self.cb;
        let mut table = self.l1.clone();
        table.resize(need as usize, 0);
        self.write_meta(&encode_table(&table), off, "the L1 table")?;
        self.order_before_mappings()?;
        let mut hb = [0u8; 12];
        hb[..4].copy_from_slice(&(need as u32).to_be_bytes());
        hb[4..].copy_from_slice(&off.to_be_bytes());
        self.write_header_bytes(36, &hb)?;
        self.sync()?;
        let old_first = self.hdr.l1_table_offset >> self.cb;
        let old_clusters = (self.l1.len() as u64 * 8).div_ceil(self.cs);
        for c in old_first..old_first + old_clusters {
            self.meta_set.remove(&c);
            self.free_later(HostCluster(c));
        }
        for c in start.0..start.0 + clusters {
            self.meta_set.insert(c);
        }
        self.hdr.l1_size = need as u32;
        self.hdr.l1_table_offset = off;
        self.l1 = table;
        self.l1_dirty.clear();
        Ok(())
    }
}
