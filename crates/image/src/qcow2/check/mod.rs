//! Consistency check and repair of qcow2 images (what `qemu-img check [-r leaks|all]` does).
//!
//! The check recomputes, from everything that references host clusters, how many references
//! each cluster has, and compares that with the refcounts stored on disk (QEMU's
//! `docs/interop/qcow2.txt`, "Host cluster management"). References come from:
//!
//! - the header cluster (cluster 0: header, extensions and backing file name, "Header");
//! - every L1 table (the active one and each snapshot's, "Snapshots") and every L2 table and
//!   data cluster they reach ("Cluster mapping"); a cluster reached through several tables has
//!   several references;
//! - compressed clusters: every host cluster the compressed stream touches;
//! - the snapshot table;
//! - the bitmap directory, bitmap tables and bitmap data ("Bitmaps"), when the bitmaps
//!   extension is consistent (autoclear bit 0 set);
//! - the refcount table and the refcount blocks.
//!
//! `refcount < references` is a corruption (a cluster in use may be reallocated), `refcount >
//! references` a leak (wasted space). Entries that point outside the file, unaligned, or with
//! reserved bits set are corruptions too, as is an L1/L2 COPIED flag (bit 63) that disagrees
//! with "refcount is exactly one".
//!
//! Hostile images: every table size is validated against the file size before anything is
//! read or allocated; each distinct L1 slot and each distinct L2 table is read once whatever
//! the number of tables that share it; all arithmetic on on-disk values is checked.
//!
//! Layout: this module runs the passes ([`check`]) and holds the [`Checker`] state with its
//! counting helpers; `walk` counts the header, snapshot, L1 and L2 references, `bitmaps` the
//! bitmaps extension's, `refcounts` reads the refcount structure and compares it with the
//! counts kept in `refs`, `repair` writes the fixes, and `report` has the public [`Repair`]
//! and [`CheckReport`].

mod bitmaps;
mod refcounts;
mod refs;
mod repair;
mod report;
mod walk;

use std::collections::{BTreeMap, HashMap};

use xdisk_io::Storage;

use super::format::{incompat, Header, L2E_ZERO};
use crate::{Error, Result};

use refs::Refs;
use repair::CopiedRepair;
pub use report::{CheckReport, Repair};

/// Checks (and with `repair`, repairs) the qcow2 image in `file`.
///
/// Returns `Err` when the image cannot be checked at all (not a qcow2 image, a header that
/// cannot be parsed, an unsupported feature) or when a repair write fails; otherwise the
/// report. After a repair the image is checked again and the report describes what remains
/// (with the `*_fixed` counters saying what was repaired), like qemu-img.
pub fn check(file: &dyn Storage, repair: Repair) -> Result<CheckReport> {
    if repair != Repair::None && file.read_only() {
        return Err(Error::ReadOnly);
    }
    let first = check_pass(file, repair)?;
    if repair == Repair::None {
        return Ok(first);
    }
    let mut report = if first.corruptions_fixed > 0 || first.leaks_fixed > 0 {
        let mut fin = check_pass(file, Repair::None)?;
        fin.corruptions_fixed = first.corruptions_fixed;
        fin.leaks_fixed = first.leaks_fixed;
        let mut msgs = first.messages;
        msgs.append(&mut fin.messages);
        fin.messages = msgs;
        fin
    } else {
        first
    };
    if report.corruptions == 0 && report.check_errors == 0 {
        mark_clean(file, &mut report)?;
    }
    Ok(report)
}

/// Clears the dirty and corrupt bits ("Header", incompatible bits 0 and 1) of a v3 image.
fn mark_clean(file: &dyn Storage, report: &mut CheckReport) -> Result<()> {
    let mut b = [0u8; 80];
    file.read_at(&mut b, 0)
        .map_err(|e| Error::io("cannot read the header", e))?;
    if u32::from_be_bytes(b[4..8].try_into().expect("4 bytes")) < 3 {
        return Ok(());
    }
    let inc = u64::from_be_bytes(b[72..80].try_into().expect("8 bytes"));
    let clean = inc & !(incompat::DIRTY | incompat::CORRUPT);
    if clean != inc {
        file.write_at(&clean.to_be_bytes(), 72)
            .map_err(|e| Error::io("cannot clear the dirty bit", e))?;
        file.flush()
            .map_err(|e| Error::io("cannot flush the image", e))?;
        report
            .messages
            .push("Marked the image clean (dirty/corrupt bits cleared)".into());
    }
    Ok(())
}

/// One check, with repairs of the given kind; counters describe the state found, minus what
/// was repaired.
fn check_pass(file: &dyn Storage, repair: Repair) -> Result<CheckReport> {
    let mut c = Checker::analyze(file, repair)?;
    if c.incomplete() {
        if repair != Repair::None {
            c.msg("ERROR the check did not complete; nothing was repaired".into());
        }
        return Ok(c.report);
    }
    if repair == Repair::All && !c.fixes.is_empty() {
        let n = c.fixes.len() as u64;
        c.apply_fixes()?;
        let mut again = Checker::analyze(file, repair)?;
        let mut msgs = std::mem::take(&mut c.report.messages);
        msgs.append(&mut again.report.messages);
        again.report.messages = msgs;
        again.report.corruptions_fixed += n;
        c = again;
        if c.incomplete() {
            return Ok(c.report);
        }
    }
    let (corrupt_n, leak_n) = c.compare();
    if c.incomplete() {
        return Ok(c.report);
    }
    let mut refcounts_ok = corrupt_n == 0 && !c.rebuild;
    if repair == Repair::All && !refcounts_ok {
        if c.unfixable_refs {
            c.msg(
                "ERROR cannot rebuild the refcount structure: references outside the image \
                 file remain"
                    .into(),
            );
        } else {
            c.msg("Rebuilding refcount structure".into());
            c.rebuild_refcounts()?;
            let fixed = corrupt_n + c.refstruct_corruptions;
            c.report.corruptions -= fixed.min(c.report.corruptions);
            c.report.corruptions_fixed += fixed;
            c.report.leaks -= leak_n.min(c.report.leaks);
            c.report.leaks_fixed += leak_n;
            refcounts_ok = true;
        }
    } else if repair != Repair::None && leak_n > 0 {
        if c.rebuild {
            c.msg("ERROR need to rebuild refcount structures (repair all)".into());
        } else {
            c.fix_leaks()?;
            c.report.leaks -= leak_n.min(c.report.leaks);
            c.report.leaks_fixed += leak_n;
        }
    }
    // QEMU fixes COPIED flags with -r all, and with -r leaks when nothing else is wrong.
    let copied = match repair {
        Repair::None => CopiedRepair::No,
        Repair::All if refcounts_ok => CopiedRepair::Yes,
        // Refcounts still wrong: clearing COPIED is safe, setting it is not.
        Repair::All => CopiedRepair::ClearOnly,
        Repair::Leaks
            if c.report.corruptions == 0 && c.report.leaks == 0 && c.report.check_errors == 0 =>
        {
            CopiedRepair::Yes
        }
        Repair::Leaks => CopiedRepair::No,
    };
    c.check_copied(copied)?;
    Ok(c.report)
}
/// At most this many clusters (the bound on the file size relative to memory).
const MAX_CLUSTERS: u64 = 1 << 32;
/// Messages kept in the report; further ones are only counted.
const MAX_MESSAGES: usize = 10_000;

fn be64_at(b: &[u8], i: usize) -> u64 {
    u64::from_be_bytes(b[i * 8..i * 8 + 8].try_into().expect("8 bytes"))
}

struct Checker<'a> {
    file: &'a dyn Storage,
    h: Header,
    cs: u64,
    cb: u32,
    file_len: u64,
    nb_clusters: u64,
    fixing: bool,
    refs: Refs,
    /// Raw refcount table entries.
    reftable: Vec<u64>,
    /// Clusters counted for the refcount table and refcount blocks (excluded by a rebuild).
    refstruct: Vec<u64>,
    /// Corruptions of the refcount structure itself (fixed by a rebuild).
    refstruct_corruptions: u64,
    /// Metadata that must be referenced exactly once: (first cluster, last cluster, what).
    exclusive: Vec<(u64, u64, &'static str)>,
    /// The same, by first cluster: (last cluster, what).
    owners: BTreeMap<u64, (u64, &'static str)>,
    /// Entry repairs: file offset of an 8-byte table entry -> new value.
    fixes: BTreeMap<u64, u64>,
    /// The refcount structure must be rebuilt.
    rebuild: bool,
    /// References outside the file that no repair removes (a rebuild would be unsafe).
    unfixable_refs: bool,
    /// L2 table offset -> references from all L1 tables.
    l2_tables: BTreeMap<u64, u64>,
    /// L2 table offset -> references from the active L1 table.
    active_l2: HashMap<u64, u64>,
    /// The active L1 table's entries that are not zero: (index, raw entry).
    active_l1: Vec<(usize, u64)>,
    /// Cached refcount block (reftable index, contents).
    block_cache: Option<(u64, Vec<u8>)>,
    suppressed: u64,
    report: CheckReport,
}

impl<'a> Checker<'a> {
    fn analyze(file: &'a dyn Storage, repair: Repair) -> Result<Checker<'a>> {
        let file_len = file
            .size()
            .map_err(|e| Error::io("cannot get the size of the image", e))?;
        let head_len = file_len.min(1 << 21) as usize;
        let mut head = vec![0u8; head_len];
        file.read_at(&mut head, 0)
            .map_err(|e| Error::io("cannot read the header", e))?;
        let h = Header::parse(&head, file_len)?;
        drop(head);
        let cs = h.cluster_size();
        let nb_clusters = file_len.div_ceil(cs);
        let mut c = Checker {
            file,
            cs,
            cb: h.cluster_bits,
            file_len,
            nb_clusters,
            fixing: repair == Repair::All,
            refs: Refs::default(),
            reftable: Vec::new(),
            refstruct: Vec::new(),
            refstruct_corruptions: 0,
            exclusive: Vec::new(),
            owners: BTreeMap::new(),
            fixes: BTreeMap::new(),
            rebuild: false,
            unfixable_refs: false,
            l2_tables: BTreeMap::new(),
            active_l2: HashMap::new(),
            active_l1: Vec::new(),
            block_cache: None,
            suppressed: 0,
            report: CheckReport {
                total_clusters: h.size.div_ceil(cs),
                filename: file.name().into_owned(),
                ..Default::default()
            },
            h,
        };
        if nb_clusters > MAX_CLUSTERS {
            c.check_error(format!(
                "ERROR the image file is too large to check: {nb_clusters} clusters (at most \
                 {MAX_CLUSTERS})"
            ));
            return Ok(c);
        }
        match Refs::new(nb_clusters) {
            Ok(r) => c.refs = r,
            Err(e) => {
                c.check_error(format!("ERROR {e}"));
                return Ok(c);
            }
        }
        c.walk();
        if c.suppressed > 0 {
            let n = c.suppressed;
            c.report
                .messages
                .push(format!("({n} further messages suppressed)"));
        }
        Ok(c)
    }

    fn incomplete(&self) -> bool {
        self.report.check_errors > 0
    }

    fn msg(&mut self, m: String) {
        if self.report.messages.len() < MAX_MESSAGES {
            self.report.messages.push(m);
        } else {
            self.suppressed += 1;
        }
    }

    fn corrupt(&mut self, m: String) {
        self.report.corruptions += 1;
        self.msg(m);
    }

    fn check_error(&mut self, m: String) {
        self.report.check_errors += 1;
        self.msg(m);
    }

    /// "Repairing" for problems this pass repairs, "ERROR" otherwise (qemu-img's wording).
    fn pfx(&self) -> &'static str {
        if self.fixing {
            "Repairing"
        } else {
            "ERROR"
        }
    }

    fn read(&mut self, buf: &mut [u8], off: u64, what: &str) -> bool {
        match self.file.read_at(buf, off) {
            Ok(()) => true,
            Err(e) => {
                self.check_error(format!("ERROR cannot read {what} at {off:#x}: {e}"));
                false
            }
        }
    }

    /// What a repair does to a dropped L2 entry, for the messages.
    fn drop_note(&self) -> &'static str {
        match (self.fixing, self.h.version >= 3) {
            (false, _) => "",
            (true, true) => " (entry dropped: the cluster now reads as zeroes)",
            (true, false) => " (entry dropped: the cluster is now unallocated)",
        }
    }

    /// The value an entry gets when it is dropped: reads as zeroes (v3 zero flag) or, in v2
    /// images that have no zero flag, unallocated.
    fn dropped_l2(&self) -> u64 {
        if self.h.version >= 3 {
            L2E_ZERO
        } else {
            0
        }
    }

    /// Adds one reference to every cluster of `[off, off + len)`; false if part of it lies
    /// outside the file.
    fn count_range(&mut self, off: u64, len: u64, n: u64) -> bool {
        if len == 0 {
            return true;
        }
        let Some(last_byte) = off.checked_add(len - 1) else {
            return false;
        };
        let (first, last) = (off / self.cs, last_byte / self.cs);
        if last >= self.nb_clusters {
            return false;
        }
        for c in first..=last {
            self.refs.add(c, n);
        }
        true
    }

    /// Counts a metadata structure that nothing else may share.
    fn count_exclusive(&mut self, off: u64, len: u64, what: &'static str) {
        if len == 0 {
            return;
        }
        if self.count_range(off, len, 1) {
            self.exclusive
                .push((off / self.cs, (off + len - 1) / self.cs, what));
        } else {
            self.corrupt(format!(
                "ERROR {what} at {off:#x}+{len:#x} lies outside the image file"
            ));
            self.unfixable_refs = true;
        }
    }
}
