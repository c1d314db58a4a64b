//! The refcount structure on disk: the refcount table and blocks, their own references, and
//! the comparison of stored refcounts with the counted references.

use super::refs::CHUNK_BITS;
use super::{be64_at, Checker};
use crate::qcow2::format::{refcount_get, refcount_max, REFT_OFFSET_MASK, REFT_RESERVED_MASK};

/// Clusters [`Checker::compare`] skips at once where nothing is referenced or counted (a
/// power of two dividing the chunk size of the references).
const ZERO_RUN: u64 = 256;

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

    /// Refcount block `bi` as read from the file, kept until another block is asked for;
    /// `None` where no usable table entry covers it or it cannot be read (its clusters then
    /// count as refcount 0).
    fn load_block(&mut self, bi: u64) -> Option<&[u8]> {
        let off = self.refblock(bi)?;
        if self.block_cache.as_ref().map(|(i, _)| *i) != Some(bi) {
            let mut b = vec![0u8; self.cs as usize];
            if !self.read(&mut b, off, "a refcount block") {
                return None;
            }
            self.block_cache = Some((bi, b));
        }
        self.block_cache.as_ref().map(|(_, b)| b.as_slice())
    }

    /// The refcount stored on disk for a cluster (0 where no usable block covers it).
    pub(super) fn ondisk(&mut self, cluster: u64) -> u64 {
        let per = self.per_block();
        let order = self.h.refcount_order;
        match self.load_block(cluster / per) {
            Some(b) => refcount_get(b, (cluster % per) as usize, order),
            None => 0,
        }
    }

    /// Whether every cluster of `from..to` (all in one refcount block) has refcount 0 on
    /// disk. Looks at whole bytes, so with refcounts narrower than a byte a neighbour's bits
    /// may answer "no": callers then look cluster by cluster.
    fn ondisk_zero(&mut self, from: u64, to: u64) -> bool {
        let per = self.per_block();
        let bits = 1u64 << self.h.refcount_order;
        let first_bit = (from % per) * bits;
        let end_bit = first_bit + (to - from) * bits;
        match self.load_block(from / per) {
            Some(b) => b
                .get((first_bit / 8) as usize..end_bit.div_ceil(8) as usize)
                .is_some_and(xdisk_io::is_zero),
            None => true,
        }
    }

    /// Compares on-disk refcounts with the references; returns (corruptions, leaks) found.
    pub(super) fn compare(&mut self) -> (u64, u64) {
        let (mut corrupt, mut leaks) = (0, 0);
        let max = refcount_max(self.h.refcount_order);
        let mut highest = None;
        let per = self.per_block();
        let n = self.refs.len();
        let mut next = 0;
        // Clusters before this are looked at one by one (their window has counts).
        let mut dense_until = 0;
        while next < n {
            let i = next;
            // Skip to the next boundary (of the chunk if nothing in it is referenced, else
            // of a window of ZERO_RUN clusters) if neither the references nor the disk count
            // anything there: a large image has mostly free clusters.
            let boundary = if self.refs.chunk_empty(i) {
                ((i >> CHUNK_BITS) + 1) << CHUNK_BITS
            } else {
                (i / ZERO_RUN + 1) * ZERO_RUN
            };
            if i >= dense_until {
                let end = boundary.min((i / per + 1) * per).min(n);
                if self.refs.all_zero(i, end) && self.ondisk_zero(i, end) {
                    next = end;
                    continue;
                }
                dense_until = end;
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
