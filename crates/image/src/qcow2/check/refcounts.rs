//! The refcount structure on disk: the refcount table and blocks, their own references, and
//! the comparison of stored refcounts with the counted references.

use super::refs::CHUNK_BITS;
use super::{be64_at, Checker};
use crate::qcow2::format::{refcount_get, refcount_max, REFT_OFFSET_MASK, REFT_RESERVED_MASK};

impl Checker<'_> {
    /// The refcount table.
    pub(super) fn read_reftable(&mut self) {
        let off = self.h.refcount_table_offset;
        let len = u64::from(self.h.refcount_table_clusters) * self.cs;
        let mut buf = vec![0u8; len as usize];
        if !self.read(&mut buf, off, "the refcount table") {
            return;
        }
        self.reftable = (0..(len / 8) as usize).map(|i| be64_at(&buf, i)).collect();
        drop(buf);
        // The header parser checked that the table lies inside the file.
        self.count_exclusive(off, len, "refcount table");
        self.refstruct
            .extend(off / self.cs..=(off + len - 1) / self.cs);
    }

    /// The refcount blocks (QEMU's check_refblocks).
    pub(super) fn refcount_blocks(&mut self) {
        let p = self.pfx();
        for i in 0..self.reftable.len() {
            let raw = self.reftable[i];
            if raw == 0 {
                continue;
            }
            let boff = raw & REFT_OFFSET_MASK;
            let problem = if raw & REFT_RESERVED_MASK != 0 {
                Some(format!(
                    "{p} refcount table entry {i} has reserved bits set"
                ))
            } else if boff & (self.cs - 1) != 0 {
                Some(format!(
                    "{p} refcount block {i} is not cluster aligned; refcount table entry \
                     corrupted"
                ))
            } else if boff / self.cs >= self.nb_clusters {
                Some(format!("{p} refcount block {i} is outside image"))
            } else {
                None
            };
            if let Some(m) = problem {
                self.corrupt(m);
                self.refstruct_corruptions += 1;
                self.rebuild = true;
                continue;
            }
            let c = boff / self.cs;
            self.refs.add(c, 1);
            self.refstruct.push(c);
            let n = self.refs.get(c);
            if n != 1 {
                self.corrupt(format!("{p} refcount block {i} refcount={n}"));
                self.refstruct_corruptions += 1;
                self.rebuild = true;
            }
        }
    }

    /// Offset of refcount block `i` if the table entry is usable.
    pub(super) fn refblock(&self, i: u64) -> Option<u64> {
        let raw = *self.reftable.get(usize::try_from(i).ok()?)?;
        let off = raw & REFT_OFFSET_MASK;
        (raw & REFT_RESERVED_MASK == 0
            && off != 0
            && off & (self.cs - 1) == 0
            && off / self.cs < self.nb_clusters)
            .then_some(off)
    }

    pub(super) fn per_block(&self) -> u64 {
        (self.cs * 8) >> self.h.refcount_order
    }

    /// The refcount stored on disk for a cluster (0 where no usable block covers it).
    pub(super) fn ondisk(&mut self, cluster: u64) -> u64 {
        let per = self.per_block();
        let bi = cluster / per;
        let Some(off) = self.refblock(bi) else {
            return 0;
        };
        if self.block_cache.as_ref().map(|(i, _)| *i) != Some(bi) {
            let mut b = vec![0u8; self.cs as usize];
            if !self.read(&mut b, off, "a refcount block") {
                return 0;
            }
            self.block_cache = Some((bi, b));
        }
        let (_, b) = self.block_cache.as_ref().expect("cached");
        refcount_get(b, (cluster % per) as usize, self.h.refcount_order)
    }

    /// Compares on-disk refcounts with the references; returns (corruptions, leaks) found.
    pub(super) fn compare(&mut self) -> (u64, u64) {
        let (mut corrupt, mut leaks) = (0, 0);
        let max = refcount_max(self.h.refcount_order);
        let mut highest = None;
        let per = self.per_block();
        let n = self.refs.len();
        let mut next = 0;
        while next < n {
            let i = next;
            if self.refs.chunk_empty(i) && self.refblock(i / per).is_none() {
                // Nothing referenced and no refcount block: skip to the next boundary.
                let next_chunk = ((i >> CHUNK_BITS) + 1) << CHUNK_BITS;
                let next_block = (i / per + 1) * per;
                next = next_chunk.min(next_block).min(n);
                continue;
            }
            next += 1;
            let r = self.refs.get(i);
            let rc = self.ondisk(i);
            if r > 0 || rc > 0 {
                highest = Some(i);
            }
            if r > max {
                self.corrupt(format!(
                    "ERROR: overflow cluster offset=0x{:x} ({r} references, refcount_bits={})",
                    i * self.cs,
                    self.h.refcount_bits()
                ));
                continue;
            }
            if rc < r {
                corrupt += 1;
                self.corrupt(format!("ERROR cluster {i} refcount={rc} reference={r}"));
            } else if rc > r {
                leaks += 1;
                self.report.leaks += 1;
                self.msg(format!("Leaked cluster {i} refcount={rc} reference={r}"));
            }
        }
        self.report.image_end_offset = highest.map_or(0, |h| (h + 1) * self.cs);
        (corrupt, leaks)
    }
}
