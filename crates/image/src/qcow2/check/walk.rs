//! The structure walks: the header cluster, the snapshot table, every L1 table and each
//! distinct L2 table they reach, counting references and collecting entry repairs.

use xdisk_io::Allocation;

use super::{be64_at, Checker};
use crate::qcow2::format::{
    parse_snapshots, Snapshot, L1E_OFFSET_MASK, L1E_RESERVED_MASK, L2E_COMPRESSED, L2E_COPIED,
    L2E_OFFSET_MASK, L2E_STD_RESERVED_MASK, L2E_ZERO,
};

/// QEMU's bound on the snapshot table (QCOW_MAX_SNAPSHOTS_SIZE).
const MAX_SNAPSHOT_TABLE: u64 = 64 << 20;
/// Largest snapshot table entry: fixed part, extra data (bounded by parse_snapshots), id,
/// name and padding.
const MAX_SNAPSHOT_ENTRY: u64 = 40 + 1024 + 2 * 65535 + 8;

/// Guest-cluster statistics of one L2 table (QEMU counts them for the active L1 only).
#[derive(Debug, Default, Clone, Copy)]
struct FragStats {
    allocated: u64,
    fragmented: u64,
    compressed: u64,
    next_contiguous: u64,
}

impl Checker<'_> {
    pub(super) fn walk(&mut self) {
        // "Header": cluster 0 holds the header, its extensions and the backing file name.
        self.count_exclusive(0, self.cs, "header");
        let snapshots = self.snapshots();
        if self.incomplete() {
            return;
        }
        // The active L1 table (the header parser checked that it lies inside the file).
        let l1_off = self.h.l1_table_offset;
        let l1_len = u64::from(self.h.l1_size) * 8;
        let Some(active) = self.read_l1(l1_off, l1_len) else {
            return;
        };
        self.active_l1 = active;
        let mut tables = vec![(l1_off, l1_len)];
        tables.extend(
            snapshots
                .iter()
                .map(|s| (s.l1_table_offset, u64::from(s.l1_size) * 8)),
        );
        self.count_exclusive(l1_off, l1_len, "active L1 table");
        for s in &snapshots {
            self.count_exclusive(
                s.l1_table_offset,
                u64::from(s.l1_size) * 8,
                "snapshot L1 table",
            );
        }
        self.read_reftable();
        if self.incomplete() {
            return;
        }
        self.bitmaps();
        if self.incomplete() {
            return;
        }
        // Every structure whose place the header (or the snapshot table, or the bitmaps
        // extension) fixes is known now: L1/L2 entries pointing into one are wrong.
        self.owners = self
            .exclusive
            .iter()
            .map(|&(first, last, what)| (first, (last, what)))
            .collect();
        self.sweep_l1(&tables);
        if self.incomplete() {
            return;
        }
        let active = std::mem::take(&mut self.active_l1);
        for &(_, raw) in &active {
            if let Some(l2) = self.l1_target(raw) {
                *self.active_l2.entry(l2).or_insert(0) += 1;
            }
        }
        self.active_l1 = active;
        self.walk_l2_tables();
        if self.incomplete() {
            return;
        }
        // Refcount blocks last, as QEMU does, so that a refcount block shared with anything
        // else shows up as referenced more than once (a rebuild then replaces it).
        self.refcount_blocks();
        if self.incomplete() {
            return;
        }
        let exclusive = std::mem::take(&mut self.exclusive);
        for &(first, last, what) in &exclusive {
            for c in first..=last {
                let n = self.refs.get(c);
                if n > 1 {
                    self.corrupt(format!(
                        "ERROR cluster {c} ({what}) is referenced {n} times: it overlaps other \
                         metadata or data"
                    ));
                }
            }
        }
        self.exclusive = exclusive;
    }

    /// The entries of the L1 table of `len` bytes at `off` that are not zero, as (index, raw
    /// entry): read 1 MiB at a time, holes of a sparse file skipped (they read as zeroes), so
    /// that a table of QEMU's largest size (32 MiB) costs memory for its entries in use only.
    /// `None` (the error recorded) if it cannot be read.
    fn read_l1(&mut self, off: u64, len: u64) -> Option<Vec<(usize, u64)>> {
        let mut out = Vec::new();
        let mut buf = Vec::new();
        let end = off.saturating_add(len);
        let mut pos = off;
        while pos < end {
            if let Allocation::Hole { len } = self.file.allocation(pos, end - pos) {
                // To the entry that holds the hole's end (it may hold data past it).
                let d = pos.saturating_add(len).min(end);
                pos = (off + (d - off) / 8 * 8).max(pos);
                if pos >= end {
                    break;
                }
            }
            let n = (end - pos).min(1 << 20);
            buf.resize(n as usize, 0);
            if !self.read(&mut buf, pos, "the L1 table") {
                return None;
            }
            let first = ((pos - off) / 8) as usize;
            out.extend(
                (0..(n / 8) as usize)
                    .map(|i| (first + i, be64_at(&buf, i)))
                    .filter(|&(_, raw)| raw != 0),
            );
            pos += n;
        }
        Some(out)
    }

    /// Reads the snapshot table ("Snapshots") and counts its clusters.
    fn snapshots(&mut self) -> Vec<Snapshot> {
        let nb = self.h.nb_snapshots;
        if nb == 0 {
            return Vec::new();
        }
        let off = self.h.snapshots_offset;
        let want = (self.file_len - off)
            .min(MAX_SNAPSHOT_TABLE)
            .min(u64::from(nb) * MAX_SNAPSHOT_ENTRY);
        let mut buf = vec![0u8; want as usize];
        if !self.read(&mut buf, off, "the snapshot table") {
            return Vec::new();
        }
        let snaps = match parse_snapshots(&buf, nb, self.cb, self.file_len) {
            Ok(s) => s,
            Err(e) => {
                self.check_error(format!("ERROR cannot read the snapshot table: {e}"));
                return Vec::new();
            }
        };
        // The table's length: entries padded to multiples of 8 (parse_snapshots has
        // checked that every entry lies inside the buffer).
        let mut pos = 0usize;
        for _ in 0..nb {
            let id = u16::from_be_bytes([buf[pos + 12], buf[pos + 13]]) as usize;
            let name = u16::from_be_bytes([buf[pos + 14], buf[pos + 15]]) as usize;
            let extra = u32::from_be_bytes(buf[pos + 36..pos + 40].try_into().expect("4"));
            pos = (pos + 40 + extra as usize + id + name).next_multiple_of(8);
        }
        self.count_exclusive(off, pos as u64, "snapshot table");
        snaps
    }

    /// The structure with a fixed place (header, L1 tables, refcount table, snapshot table,
    /// bitmap directory and tables) that holds `cluster`, if any.
    fn owner(&self, cluster: u64) -> Option<&'static str> {
        self.owners
            .range(..=cluster)
            .next_back()
            .and_then(|(_, &(last, what))| (cluster <= last).then_some(what))
    }

    /// The L2 table an L1 entry points to, if it is usable (allocated, aligned, in the file).
    pub(super) fn l1_target(&self, raw: u64) -> Option<u64> {
        let off = raw & L1E_OFFSET_MASK;
        (off != 0
            && off & (self.cs - 1) == 0
            && off / self.cs < self.nb_clusters
            && self.owner(off / self.cs).is_none())
        .then_some(off)
    }

    /// Visits every 8-byte slot covered by at least one L1 table exactly once, with the number
    /// of tables that cover it (a slot shared by several tables is several references).
    fn sweep_l1(&mut self, tables: &[(u64, u64)]) {
        let mut ev: Vec<(u64, i64)> = Vec::with_capacity(tables.len() * 2);
        for &(off, len) in tables {
            if len > 0 {
                ev.push((off, 1));
                ev.push((off + len, -1));
            }
        }
        ev.sort_unstable();
        let mut cover = 0i64;
        let mut buf = Vec::new();
        for w in 0..ev.len() {
            cover += ev[w].1;
            let Some(&(end, _)) = ev.get(w + 1) else {
                break;
            };
            let start = ev[w].0;
            if cover <= 0 || end <= start {
                continue;
            }
            let mut pos = start;
            while pos < end {
                // Skip holes of sparse files (they read as zeroes: unallocated entries).
                if let Allocation::Hole { len } = self.file.allocation(pos, end - pos) {
                    let d = pos.saturating_add(len);
                    pos = (d & !7).max(pos).min(end);
                    if pos >= end {
                        break;
                    }
                }
                let n = (end - pos).min(1 << 20);
                buf.resize(n as usize, 0);
                if !self.read(&mut buf, pos, "an L1 table") {
                    return;
                }
                for i in 0..(n / 8) as usize {
                    self.l1_entry(pos + i as u64 * 8, be64_at(&buf, i), cover as u64);
                }
                pos += n;
            }
        }
    }

    /// One L1 entry ("Cluster mapping", L1 table entry) referenced by `n` L1 tables.
    fn l1_entry(&mut self, pos: u64, raw: u64, n: u64) {
        if raw == 0 {
            return;
        }
        let p = self.pfx();
        let mut new = raw;
        if raw & L1E_RESERVED_MASK != 0 {
            self.corrupt(format!(
                "{p} found L1 entry with reserved bits set: {raw:x}"
            ));
            new &= !L1E_RESERVED_MASK;
        }
        let off = raw & L1E_OFFSET_MASK;
        if off == 0 {
            // Only flags: bit 63 without a table.
            self.corrupt(format!(
                "{p} L1 entry {raw:x} has the copied flag set but no L2 table"
            ));
            new = 0;
        } else if off & (self.cs - 1) != 0 {
            self.corrupt(format!(
                "{p} l2_offset={off:x}: Table is not cluster aligned; L1 entry corrupted"
            ));
            new = 0;
        } else if off / self.cs >= self.nb_clusters {
            self.corrupt(format!(
                "{p} l2_offset={off:x}: L2 table lies beyond the end of the image file; L1 \
                 entry corrupted"
            ));
            new = 0;
        } else if let Some(what) = self.owner(off / self.cs) {
            self.corrupt(format!(
                "{p} l2_offset={off:x}: L2 table overlaps the {what}; L1 entry corrupted"
            ));
            new = 0;
        } else {
            self.refs.add(off / self.cs, n);
            *self.l2_tables.entry(off).or_insert(0) += n;
        }
        if new != raw {
            self.fixes.insert(pos, new);
        }
    }

    /// Reads each distinct L2 table once and counts what its entries reference.
    fn walk_l2_tables(&mut self) {
        let tables: Vec<(u64, u64)> = self.l2_tables.iter().map(|(&o, &n)| (o, n)).collect();
        let mut buf = vec![0u8; self.cs as usize];
        for (off, n) in tables {
            if !self.read(&mut buf, off, "an L2 table") {
                return;
            }
            let mut st = FragStats::default();
            for j in 0..(self.cs / 8) as usize {
                let raw = be64_at(&buf, j);
                self.l2_entry(off + j as u64 * 8, raw, n, &mut st);
            }
            if let Some(&a) = self.active_l2.get(&off) {
                self.report.allocated_clusters += st.allocated * a;
                self.report.fragmented_clusters += st.fragmented * a;
                self.report.compressed_clusters += st.compressed * a;
            }
        }
    }

    /// One L2 entry ("Cluster mapping", L2 table entry) referenced `n` times.
    fn l2_entry(&mut self, pos: u64, raw: u64, n: u64, st: &mut FragStats) {
        if raw == 0 {
            return;
        }
        let p = self.pfx();
        let cs = self.cs;
        let mut new = raw;
        if raw & L2E_COMPRESSED != 0 {
            // Compressed Clusters Descriptor, x = 62 - (cluster_bits - 8).
            let x = 62 - (self.cb - 8);
            let host = raw & ((1u64 << x) - 1);
            let sectors = (raw & !(L2E_COMPRESSED | L2E_COPIED)) >> x;
            // Compressed clusters are fragmented by nature (QEMU counts them so).
            st.allocated += 1;
            st.compressed += 1;
            st.fragmented += 1;
            if raw & L2E_COPIED != 0 {
                self.corrupt(format!(
                    "{p} coffset=0x{host:x}: copied flag must never be set for compressed \
                     clusters"
                ));
                new &= !L2E_COPIED;
            }
            // At most 2^(cluster_bits - 8) sectors, so no overflow.
            let len = (sectors + 1) * 512 - (host & 511);
            let owner = (host / cs..=(host + len - 1) / cs).find_map(|c| self.owner(c));
            if let Some(what) = owner {
                self.corrupt(format!(
                    "{p} coffset=0x{host:x}: compressed cluster overlaps the {what}; L2 entry \
                     corrupted{}",
                    self.drop_note()
                ));
                new = self.dropped_l2();
            } else if !self.count_range(host, len, n) {
                self.corrupt(format!(
                    "{p}: counting reference for region exceeding the end of the file by one \
                     cluster or more: offset 0x{host:x} size 0x{len:x}{}",
                    self.drop_note()
                ));
                new = self.dropped_l2();
            }
        } else {
            // Standard Cluster Descriptor.
            let reserved = raw & L2E_STD_RESERVED_MASK;
            if reserved != 0 {
                self.corrupt(format!(
                    "{p} found l2 entry with reserved bits set: {raw:x}"
                ));
                new &= !reserved;
            }
            let off = raw & L2E_OFFSET_MASK;
            let zero = raw & L2E_ZERO != 0;
            if off == 0 {
                if !zero && raw & L2E_COPIED != 0 {
                    // (Reported once: with reserved bits set it already was.)
                    if reserved == 0 {
                        self.corrupt(format!(
                            "{p} L2 entry {raw:x} at offset {pos:#x} has the copied flag set \
                             but no cluster offset"
                        ));
                    }
                    new = 0;
                }
            } else {
                st.allocated += 1;
                if st.next_contiguous != 0 && off != st.next_contiguous {
                    st.fragmented += 1;
                }
                st.next_contiguous = off.saturating_add(cs);
                if off & (cs - 1) != 0 {
                    if zero {
                        self.corrupt(format!(
                            "{p} offset={off:x}: Preallocated cluster is not properly aligned; \
                             L2 entry corrupted."
                        ));
                        new = L2E_ZERO;
                    } else {
                        self.corrupt(format!(
                            "{p} offset={off:x}: Data cluster is not properly aligned; L2 \
                             entry corrupted.{}",
                            self.drop_note()
                        ));
                        new = self.dropped_l2();
                    }
                } else if off / cs >= self.nb_clusters {
                    self.corrupt(format!(
                        "{p}: counting reference for region exceeding the end of the file by \
                         one cluster or more: offset 0x{off:x} size 0x{cs:x}{}",
                        self.drop_note()
                    ));
                    new = if zero { L2E_ZERO } else { self.dropped_l2() };
                } else if let Some(what) = self.owner(off / cs) {
                    self.corrupt(format!(
                        "{p} offset={off:x}: data cluster overlaps the {what}; L2 entry \
                         corrupted{}",
                        self.drop_note()
                    ));
                    new = if zero { L2E_ZERO } else { self.dropped_l2() };
                } else {
                    self.refs.add(off / cs, n);
                }
            }
        }
        if new != raw {
            self.fixes.insert(pos, new);
        }
    }
}
