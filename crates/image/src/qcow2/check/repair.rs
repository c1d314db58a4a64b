//! Repairs: entry fixes, leak fixes in place, the refcount structure rebuild, and the COPIED
//! flags.

use std::collections::{BTreeMap, HashSet};

use super::refs::Refs;
use super::{be64_at, Checker};
use crate::qcow2::format::{
    refcount_get, refcount_max, refcount_set, L2E_COMPRESSED, L2E_COPIED, L2E_OFFSET_MASK,
    MAX_REFTABLE_BYTES,
};
use crate::{Error, Result};

/// Which COPIED flags [`Checker::check_copied`] may fix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum CopiedRepair {
    No,
    ClearOnly,
    Yes,
}

impl Checker<'_> {
    /// Writes the entry repairs, grouped by cluster, then syncs.
    pub(super) fn apply_fixes(&mut self) -> Result<()> {
        let fixes = std::mem::take(&mut self.fixes);
        let mut groups: BTreeMap<u64, Vec<(u64, u64)>> = BTreeMap::new();
        for (pos, val) in fixes {
            groups
                .entry(pos / self.cs)
                .or_default()
                .push((pos % self.cs, val));
        }
        for (cluster, entries) in groups {
            let lo = entries.iter().map(|e| e.0).min().expect("nonempty");
            let hi = entries.iter().map(|e| e.0).max().expect("nonempty") + 8;
            let base = cluster * self.cs + lo;
            let mut buf = vec![0u8; (hi - lo) as usize];
            self.file
                .read_at(&mut buf, base)
                .map_err(|e| Error::io("cannot read a table to repair", e))?;
            for (o, v) in entries {
                let at = (o - lo) as usize;
                buf[at..at + 8].copy_from_slice(&v.to_be_bytes());
            }
            self.file
                .write_at(&buf, base)
                .map_err(|e| Error::io("cannot write a repaired table", e))?;
        }
        self.file
            .flush()
            .map_err(|e| Error::io("cannot flush the image", e))
    }

    /// Lowers leaked refcounts in place (the refcount structure itself is sound).
    pub(super) fn fix_leaks(&mut self) -> Result<()> {
        let per = self.per_block();
        let order = self.h.refcount_order;
        self.block_cache = None;
        let mut b = vec![0u8; self.cs as usize];
        for bi in 0..self.reftable.len() as u64 {
            let Some(off) = self.refblock(bi) else {
                continue;
            };
            let first = bi * per;
            if first >= self.nb_clusters {
                continue;
            }
            self.file
                .read_at(&mut b, off)
                .map_err(|e| Error::io("cannot read a refcount block", e))?;
            let mut dirty = false;
            for idx in 0..per.min(self.nb_clusters - first) {
                let c = first + idx;
                let rc = refcount_get(&b, idx as usize, order);
                let r = self.refs.get(c);
                if rc > r {
                    refcount_set(&mut b, idx as usize, order, r);
                    self.msg(format!("Repairing cluster {c} refcount={rc} reference={r}"));
                    dirty = true;
                }
            }
            if dirty {
                self.file
                    .write_at(&b, off)
                    .map_err(|e| Error::io("cannot write a refcount block", e))?;
            }
        }
        self.file
            .flush()
            .map_err(|e| Error::io("cannot flush the image", e))
    }

    /// Writes a new refcount table and new refcount blocks after the end of the file, covering
    /// every referenced cluster and themselves; syncs; then points the header at them. The old
    /// structures stay valid until the header switches (crash-safe), and are free afterwards.
    pub(super) fn rebuild_refcounts(&mut self) -> Result<()> {
        let cs = self.cs;
        let per = self.per_block();
        let order = self.h.refcount_order;
        let max = refcount_max(order);
        // The old refcount structures are not referenced by the new state.
        let old = std::mem::take(&mut self.refstruct);
        for &c in &old {
            let v = self.refs.get(c).saturating_sub(1);
            self.refs.set(c, v);
        }
        let n = self.nb_clusters;
        let mut used_blocks: Vec<u64> = self.refs.nonzero().map(|c| c / per).collect();
        used_blocks.dedup();
        // New clusters: the blocks, then the table; they must cover themselves.
        let mut k = 0u64;
        let (blocks, rt_clusters) = loop {
            let mut blocks = used_blocks.clone();
            if k > 0 {
                let last = (n + k - 1) / per;
                let top = blocks.last().copied();
                blocks.extend((n / per..=last).filter(|&b| top.is_none_or(|t| b > t)));
            }
            let entries = (n + k).div_ceil(per).max(1);
            let rt_clusters = (entries * 8).div_ceil(cs);
            let need = blocks.len() as u64 + rt_clusters;
            if need <= k {
                break (blocks, rt_clusters);
            }
            k = need;
        };
        if rt_clusters * cs > MAX_REFTABLE_BYTES {
            return Err(Error::Corrupt(
                "cannot rebuild the refcount structure: the refcount table would exceed QEMU's \
                 8 MiB limit"
                    .into(),
            ));
        }
        let new_start = n;
        let new_end = n + blocks.len() as u64 + rt_clusters;
        let refcount = |refs: &Refs, c: u64| -> u64 {
            if c < n {
                refs.get(c).min(max)
            } else if c < new_end {
                1
            } else {
                0
            }
        };
        let mut table = vec![0u8; (rt_clusters * cs) as usize];
        let mut b = vec![0u8; cs as usize];
        for (i, &bi) in blocks.iter().enumerate() {
            let at = (new_start + i as u64) * cs;
            b.fill(0);
            for idx in 0..per {
                let v = refcount(&self.refs, bi * per + idx);
                if v > 0 {
                    refcount_set(&mut b, idx as usize, order, v);
                }
            }
            self.file
                .write_at(&b, at)
                .map_err(|e| Error::io("cannot write a refcount block", e))?;
            table[(bi * 8) as usize..(bi * 8 + 8) as usize].copy_from_slice(&at.to_be_bytes());
        }
        let table_off = (new_start + blocks.len() as u64) * cs;
        self.file
            .write_at(&table, table_off)
            .map_err(|e| Error::io("cannot write the refcount table", e))?;
        self.file
            .flush()
            .map_err(|e| Error::io("cannot flush the image", e))?;
        // "Header" bytes 48-59: refcount_table_offset and refcount_table_clusters, in one
        // write.
        let mut hdr = [0u8; 12];
        hdr[0..8].copy_from_slice(&table_off.to_be_bytes());
        hdr[8..12].copy_from_slice(&(rt_clusters as u32).to_be_bytes());
        self.file
            .write_at(&hdr, 48)
            .map_err(|e| Error::io("cannot update the header", e))?;
        self.file
            .flush()
            .map_err(|e| Error::io("cannot flush the image", e))?;
        // Release the space of the old structures (their refcount is 0 now).
        for &c in &old {
            if c < n && self.refs.get(c) == 0 {
                let _ = self.file.discard(c * cs, cs);
            }
        }
        // From now on on-disk lookups use the new structure.
        self.h.refcount_table_offset = table_off;
        self.h.refcount_table_clusters = rt_clusters as u32;
        self.reftable = (0..(rt_clusters * cs / 8) as usize)
            .map(|i| be64_at(&table, i))
            .collect();
        self.nb_clusters = new_end;
        self.block_cache = None;
        Ok(())
    }

    /// QEMU's check_oflag_copied: bit 63 of active L1 entries and of the L2 entries they
    /// reach must be set exactly when the refcount is 1 ("Cluster mapping").
    pub(super) fn check_copied(&mut self, repair: CopiedRepair) -> Result<()> {
        let cs = self.cs;
        let l1 = std::mem::take(&mut self.active_l1);
        let mut seen = HashSet::new();
        let mut buf = vec![0u8; cs as usize];
        let mut wrote = false;
        let pfx = |fix: bool| if fix { "Repairing" } else { "ERROR" };
        let can_fix = |rc: u64| match repair {
            CopiedRepair::No => false,
            CopiedRepair::ClearOnly => rc != 1,
            CopiedRepair::Yes => true,
        };
        for &(i, raw) in &l1 {
            let Some(l2) = self.l1_target(raw) else {
                continue;
            };
            let rc = self.ondisk(l2 / cs);
            if (rc == 1) != (raw & L2E_COPIED != 0) {
                let fix = can_fix(rc);
                self.corrupt(format!(
                    "{} OFLAG_COPIED L2 cluster: l1_index={i} l1_entry={raw:x} refcount={rc}",
                    pfx(fix)
                ));
                if fix {
                    let new = if rc == 1 {
                        raw | L2E_COPIED
                    } else {
                        raw & !L2E_COPIED
                    };
                    self.file
                        .write_at(&new.to_be_bytes(), self.h.l1_table_offset + i as u64 * 8)
                        .map_err(|e| Error::io("cannot write the L1 table", e))?;
                    wrote = true;
                    self.report.corruptions -= 1;
                    self.report.corruptions_fixed += 1;
                }
            }
            if !seen.insert(l2) {
                continue;
            }
            if !self.read(&mut buf, l2, "an L2 table") {
                break;
            }
            let mut dirty = 0u64;
            for j in 0..(cs / 8) as usize {
                let e = be64_at(&buf, j);
                let off = e & L2E_OFFSET_MASK;
                // Entries past the end of the file are checked too (their refcount reads as
                // 0), as QEMU does.
                if e & L2E_COMPRESSED != 0 || off == 0 || off & (cs - 1) != 0 {
                    continue;
                }
                let rc = self.ondisk(off / cs);
                if (rc == 1) != (e & L2E_COPIED != 0) {
                    let fix = can_fix(rc);
                    self.corrupt(format!(
                        "{} OFLAG_COPIED data cluster: l2_entry={e:x} refcount={rc}",
                        pfx(fix)
                    ));
                    if fix {
                        let new = if rc == 1 {
                            e | L2E_COPIED
                        } else {
                            e & !L2E_COPIED
                        };
                        buf[j * 8..j * 8 + 8].copy_from_slice(&new.to_be_bytes());
                        dirty += 1;
                    }
                }
            }
            if dirty > 0 {
                self.file
                    .write_at(&buf, l2)
                    .map_err(|e| Error::io("cannot write an L2 table", e))?;
                wrote = true;
                self.report.corruptions -= dirty;
                self.report.corruptions_fixed += dirty;
            }
        }
        self.active_l1 = l1;
        if wrote {
            self.file
                .flush()
                .map_err(|e| Error::io("cannot flush the image", e))?;
        }
        Ok(())
    }
}
