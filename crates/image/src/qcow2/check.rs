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

use std::collections::{BTreeMap, HashMap, HashSet};

use xdisk_io::ImageFile;

use super::format::{
    autoclear, ext, incompat, parse_snapshots, refcount_get, refcount_max, refcount_set, Header,
    Snapshot, L1E_OFFSET_MASK, L1E_RESERVED_MASK, L2E_COMPRESSED, L2E_COPIED, L2E_OFFSET_MASK,
    L2E_STD_RESERVED_MASK, L2E_ZERO, MAX_REFTABLE_BYTES, REFT_OFFSET_MASK, REFT_RESERVED_MASK,
};
use crate::{Error, Result};

/// What to repair (qemu-img's `-r`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Repair {
    /// Only report.
    #[default]
    None,
    /// Lower the refcounts of leaked clusters.
    Leaks,
    /// Fix leaks and corruptions: drop entries that point outside the file or are
    /// malformed, rebuild the refcount structures, fix COPIED flags, clear the dirty bit.
    All,
}

impl std::str::FromStr for Repair {
    type Err = Error;
    fn from_str(s: &str) -> Result<Repair> {
        match s {
            "leaks" => Ok(Repair::Leaks),
            "all" => Ok(Repair::All),
            _ => Err(Error::InvalidArgument(format!(
                "Unknown option value for -r (expecting 'leaks' or 'all'): {s}"
            ))),
        }
    }
}

/// The result of [`check`], with qemu-img's counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckReport {
    /// Problems that remain and may corrupt data.
    pub corruptions: u64,
    /// Clusters whose refcount is higher than their references (remaining).
    pub leaks: u64,
    /// Internal errors that kept the check from completing (I/O errors, limits).
    pub check_errors: u64,
    pub corruptions_fixed: u64,
    pub leaks_fixed: u64,
    /// End of the last cluster in use (referenced or with a nonzero refcount).
    pub image_end_offset: u64,
    /// Clusters of the virtual disk.
    pub total_clusters: u64,
    /// Allocated guest clusters of the active L1 table.
    pub allocated_clusters: u64,
    pub fragmented_clusters: u64,
    pub compressed_clusters: u64,
    /// What was found (and repaired), in qemu-img's words; qemu-img prints these on stderr.
    pub messages: Vec<String>,
    /// The image file name (for the JSON output).
    pub filename: String,
}

impl CheckReport {
    /// qemu-img check's exit status: 0 no errors, 1 check not completed, 2 corruptions,
    /// 3 leaks only.
    pub fn exit_code(&self) -> i32 {
        if self.check_errors > 0 {
            1
        } else if self.corruptions > 0 {
            2
        } else if self.leaks > 0 {
            3
        } else {
            0
        }
    }

    /// qemu-img check's human output (stdout).
    pub fn human(&self) -> String {
        let mut s = String::new();
        if self.corruptions_fixed > 0 || self.leaks_fixed > 0 {
            s.push_str(&format!(
                "The following inconsistencies were found and repaired:\n\n    {} leaked \
                 clusters\n    {} corruptions\n\nDouble checking the fixed image now...\n",
                self.leaks_fixed, self.corruptions_fixed
            ));
        }
        if self.corruptions == 0 && self.leaks == 0 && self.check_errors == 0 {
            s.push_str("No errors were found on the image.\n");
        } else {
            if self.corruptions > 0 {
                s.push_str(&format!(
                    "\n{} errors were found on the image.\nData may be corrupted, or further \
                     writes to the image may corrupt it.\n",
                    self.corruptions
                ));
            }
            if self.leaks > 0 {
                s.push_str(&format!(
                    "\n{} leaked clusters were found on the image.\nThis means waste of disk \
                     space, but no harm to data.\n",
                    self.leaks
                ));
            }
            if self.check_errors > 0 {
                s.push_str(&format!(
                    "\n{} internal errors have occurred during the check.\n",
                    self.check_errors
                ));
            }
        }
        if self.total_clusters != 0 && self.allocated_clusters != 0 {
            let a = self.allocated_clusters as f64;
            s.push_str(&format!(
                "{}/{} = {:.2}% allocated, {:.2}% fragmented, {:.2}% compressed clusters\n",
                self.allocated_clusters,
                self.total_clusters,
                a * 100.0 / self.total_clusters as f64,
                self.fragmented_clusters as f64 * 100.0 / a,
                self.compressed_clusters as f64 * 100.0 / a
            ));
        }
        if self.image_end_offset != 0 {
            s.push_str(&format!("Image end offset: {}\n", self.image_end_offset));
        }
        s
    }

    /// qemu-img check's JSON output (`--output=json`): the optional counters appear only
    /// when nonzero, as in qemu-img.
    pub fn json(&self) -> serde_json::Value {
        let mut m = serde_json::Map::new();
        let mut opt = |k: &str, v: u64| {
            if v != 0 {
                m.insert(k.to_string(), v.into());
            }
        };
        opt("image-end-offset", self.image_end_offset);
        opt("total-clusters", self.total_clusters);
        opt("allocated-clusters", self.allocated_clusters);
        opt("fragmented-clusters", self.fragmented_clusters);
        opt("compressed-clusters", self.compressed_clusters);
        opt("corruptions", self.corruptions);
        opt("leaks", self.leaks);
        opt("corruptions-fixed", self.corruptions_fixed);
        opt("leaks-fixed", self.leaks_fixed);
        m.insert("check-errors".into(), self.check_errors.into());
        m.insert("filename".into(), self.filename.clone().into());
        m.insert("format".into(), "qcow2".into());
        serde_json::Value::Object(m)
    }
}

/// Checks (and with `repair`, repairs) the qcow2 image in `file`.
///
/// Returns `Err` when the image cannot be checked at all (not a qcow2 image, a header that
/// cannot be parsed, an unsupported feature) or when a repair write fails; otherwise the
/// report. After a repair the image is checked again and the report describes what remains
/// (with the `*_fixed` counters saying what was repaired), like qemu-img.
pub fn check(file: &ImageFile, repair: Repair) -> Result<CheckReport> {
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
fn mark_clean(file: &ImageFile, report: &mut CheckReport) -> Result<()> {
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
fn check_pass(file: &ImageFile, repair: Repair) -> Result<CheckReport> {
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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CopiedRepair {
    No,
    ClearOnly,
    Yes,
}

/// At most this many clusters (the bound on the file size relative to memory).
const MAX_CLUSTERS: u64 = 1 << 32;
/// QEMU's bound on the snapshot table (QCOW_MAX_SNAPSHOTS_SIZE).
const MAX_SNAPSHOT_TABLE: u64 = 64 << 20;
/// Our bound on the bitmap directory and on each bitmap table.
const MAX_BITMAP_TABLE: u64 = 64 << 20;
/// Messages kept in the report; further ones are only counted.
const MAX_MESSAGES: usize = 10_000;
/// Largest snapshot table entry: fixed part, extra data (bounded by parse_snapshots), id,
/// name and padding.
const MAX_SNAPSHOT_ENTRY: u64 = 40 + 1024 + 2 * 65535 + 8;

/// Clusters per chunk of [`Refs`].
const CHUNK_BITS: u32 = 16;
const CHUNK: u64 = 1 << CHUNK_BITS;

/// Expected refcounts: 16 bits per cluster, in chunks allocated on first use (memory follows
/// what is referenced, not the file length: a huge sparse file costs little), with the rare
/// values that do not fit in 16 bits on the side.
#[derive(Debug, Default)]
struct Refs {
    n: u64,
    chunks: Vec<Option<Box<[u16]>>>,
    big: HashMap<u64, u64>,
}

impl Refs {
    fn new(n: u64) -> std::result::Result<Refs, String> {
        let nchunks = usize::try_from(n.div_ceil(CHUNK)).map_err(|_| "too many clusters")?;
        let mut chunks = Vec::new();
        chunks
            .try_reserve_exact(nchunks)
            .map_err(|e| format!("cannot allocate the refcount array: {e}"))?;
        chunks.resize_with(nchunks, || None);
        Ok(Refs {
            n,
            chunks,
            big: HashMap::new(),
        })
    }
    fn len(&self) -> u64 {
        self.n
    }
    /// Whether no cluster of `i`'s chunk has a reference.
    fn chunk_empty(&self, i: u64) -> bool {
        self.chunks[(i >> CHUNK_BITS) as usize].is_none()
    }
    fn get(&self, i: u64) -> u64 {
        debug_assert!(i < self.n);
        let Some(c) = &self.chunks[(i >> CHUNK_BITS) as usize] else {
            return 0;
        };
        match c[(i & (CHUNK - 1)) as usize] {
            u16::MAX => self.big.get(&i).copied().unwrap_or(u64::from(u16::MAX)),
            x => u64::from(x),
        }
    }
    fn set(&mut self, i: u64, val: u64) {
        debug_assert!(i < self.n);
        let chunk = &mut self.chunks[(i >> CHUNK_BITS) as usize];
        if chunk.is_none() && val == 0 {
            return;
        }
        let c = chunk.get_or_insert_with(|| vec![0u16; CHUNK as usize].into_boxed_slice());
        let slot = &mut c[(i & (CHUNK - 1)) as usize];
        if *slot == u16::MAX {
            self.big.remove(&i);
        }
        if val >= u64::from(u16::MAX) {
            *slot = u16::MAX;
            self.big.insert(i, val);
        } else {
            *slot = val as u16;
        }
    }
    fn add(&mut self, i: u64, n: u64) {
        let v = self.get(i).saturating_add(n);
        self.set(i, v);
    }
    /// The clusters with at least one reference, in order.
    fn nonzero(&self) -> impl Iterator<Item = u64> + '_ {
        self.chunks
            .iter()
            .enumerate()
            .filter_map(|(ci, c)| c.as_ref().map(|c| (ci as u64, c)))
            .flat_map(|(ci, c)| {
                c.iter()
                    .enumerate()
                    .filter(|(_, &x)| x != 0)
                    .map(move |(j, _)| (ci << CHUNK_BITS) + j as u64)
            })
    }
}

/// Guest-cluster statistics of one L2 table (QEMU counts them for the active L1 only).
#[derive(Debug, Default, Clone, Copy)]
struct FragStats {
    allocated: u64,
    fragmented: u64,
    compressed: u64,
    next_contiguous: u64,
}

fn be64_at(b: &[u8], i: usize) -> u64 {
    u64::from_be_bytes(b[i * 8..i * 8 + 8].try_into().expect("8 bytes"))
}

struct Checker<'a> {
    file: &'a ImageFile,
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
    active_l1: Vec<u64>,
    /// Cached refcount block (reftable index, contents).
    block_cache: Option<(u64, Vec<u8>)>,
    suppressed: u64,
    report: CheckReport,
}

impl<'a> Checker<'a> {
    fn analyze(file: &'a ImageFile, repair: Repair) -> Result<Checker<'a>> {
        let file_len = file
            .len()
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
                filename: file.path().display().to_string(),
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

    fn walk(&mut self) {
        // "Header": cluster 0 holds the header, its extensions and the backing file name.
        self.count_exclusive(0, self.cs, "header");
        let snapshots = self.snapshots();
        if self.incomplete() {
            return;
        }
        // The active L1 table (the header parser checked that it lies inside the file).
        let l1_off = self.h.l1_table_offset;
        let l1_len = u64::from(self.h.l1_size) * 8;
        let mut l1 = vec![0u8; l1_len as usize];
        if !self.read(&mut l1, l1_off, "the L1 table") {
            return;
        }
        self.active_l1 = (0..self.h.l1_size as usize)
            .map(|i| be64_at(&l1, i))
            .collect();
        drop(l1);
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
        for &raw in &active {
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
    fn l1_target(&self, raw: u64) -> Option<u64> {
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
                if let Some(d) = self.file.seek_data(pos) {
                    if d > pos {
                        pos = (d & !7).max(pos).min(end);
                        if pos >= end {
                            break;
                        }
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

    /// "Bitmaps": the directory, each bitmap table and each bitmap data cluster. Like QEMU,
    /// only when the extension is marked consistent (autoclear bit 0); otherwise the
    /// bitmaps' clusters show up as leaks.
    fn bitmaps(&mut self) {
        if self.h.autoclear_features & autoclear::BITMAPS == 0 {
            return;
        }
        let Some(data) = self
            .h
            .unknown_extensions
            .iter()
            .find(|(t, _)| *t == ext::BITMAPS)
            .map(|(_, d)| d.clone())
        else {
            return;
        };
        if data.len() < 24 {
            self.corrupt("ERROR bitmaps extension too short".into());
            return;
        }
        let nb = u32::from_be_bytes(data[0..4].try_into().expect("4"));
        let dir_size = u64::from_be_bytes(data[8..16].try_into().expect("8"));
        let dir_off = u64::from_be_bytes(data[16..24].try_into().expect("8"));
        if nb == 0 {
            return;
        }
        let file_len = self.file_len;
        let fits = |off: u64, len: u64| off.checked_add(len).is_some_and(|e| e <= file_len);
        if dir_off & (self.cs - 1) != 0
            || !(24..=MAX_BITMAP_TABLE).contains(&dir_size)
            || !fits(dir_off, dir_size)
        {
            self.corrupt(format!(
                "ERROR bitmap directory at {dir_off:#x}+{dir_size:#x} is invalid"
            ));
            return;
        }
        self.count_exclusive(dir_off, dir_size, "bitmap directory");
        let mut dir = vec![0u8; dir_size as usize];
        if !self.read(&mut dir, dir_off, "the bitmap directory") {
            return;
        }
        let mut pos = 0usize;
        for i in 0..nb {
            if pos + 24 > dir.len() {
                self.corrupt(format!("ERROR bitmap directory entry {i} truncated"));
                return;
            }
            let e = &dir[pos..];
            let table_off = u64::from_be_bytes(e[0..8].try_into().expect("8"));
            let table_size = u64::from(u32::from_be_bytes(e[8..12].try_into().expect("4")));
            let name_size = u16::from_be_bytes([e[18], e[19]]) as usize;
            let extra = u32::from_be_bytes(e[20..24].try_into().expect("4")) as usize;
            pos = match (24usize + extra + name_size).checked_next_multiple_of(8) {
                Some(l) if pos + l <= dir.len() => pos + l,
                _ => {
                    self.corrupt(format!("ERROR bitmap directory entry {i} truncated"));
                    return;
                }
            };
            let bytes = table_size * 8;
            if table_off & (self.cs - 1) != 0 || bytes > MAX_BITMAP_TABLE || !fits(table_off, bytes)
            {
                self.corrupt(format!(
                    "ERROR bitmap {i}: table at {table_off:#x} ({table_size} entries) is invalid"
                ));
                continue;
            }
            if bytes == 0 {
                continue;
            }
            self.count_exclusive(table_off, bytes, "bitmap table");
            let mut t = vec![0u8; bytes as usize];
            if !self.read(&mut t, table_off, "a bitmap table") {
                return;
            }
            for j in 0..table_size as usize {
                let raw = be64_at(&t, j);
                let off = raw & 0x00ff_ffff_ffff_fe00;
                if raw & 0xff00_0000_0000_01fe != 0
                    || (off != 0 && raw & 1 != 0)
                    || off & (self.cs - 1) != 0
                {
                    self.corrupt(format!(
                        "ERROR bitmap {i}: invalid bitmap table entry {raw:#x}"
                    ));
                    continue;
                }
                if off == 0 {
                    continue;
                }
                if off / self.cs >= self.nb_clusters {
                    self.corrupt(format!(
                        "ERROR bitmap {i}: bitmap data cluster {off:#x} lies outside the image \
                         file"
                    ));
                    self.unfixable_refs = true;
                    continue;
                }
                self.refs.add(off / self.cs, 1);
            }
        }
    }

    /// The refcount table.
    fn read_reftable(&mut self) {
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
    fn refcount_blocks(&mut self) {
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
    fn refblock(&self, i: u64) -> Option<u64> {
        let raw = *self.reftable.get(usize::try_from(i).ok()?)?;
        let off = raw & REFT_OFFSET_MASK;
        (raw & REFT_RESERVED_MASK == 0
            && off != 0
            && off & (self.cs - 1) == 0
            && off / self.cs < self.nb_clusters)
            .then_some(off)
    }

    fn per_block(&self) -> u64 {
        (self.cs * 8) >> self.h.refcount_order
    }

    /// The refcount stored on disk for a cluster (0 where no usable block covers it).
    fn ondisk(&mut self, cluster: u64) -> u64 {
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
    fn compare(&mut self) -> (u64, u64) {
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

    /// Writes the entry repairs, grouped by cluster, then syncs.
    fn apply_fixes(&mut self) -> Result<()> {
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
    fn fix_leaks(&mut self) -> Result<()> {
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
    fn rebuild_refcounts(&mut self) -> Result<()> {
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
                let _ = self.file.punch_hole(c * cs, cs);
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
    fn check_copied(&mut self, repair: CopiedRepair) -> Result<()> {
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
        for (i, &raw) in l1.iter().enumerate() {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refs_large_values() {
        let mut r = Refs::new(4).unwrap();
        r.add(1, 70_000);
        r.add(1, 5);
        assert_eq!(r.get(1), 70_005);
        r.set(1, 3);
        assert_eq!(r.get(1), 3);
        assert!(r.big.is_empty());
        r.add(2, u64::MAX);
        r.add(2, 1);
        assert_eq!(r.get(2), u64::MAX);
    }

    #[test]
    fn exit_codes_and_texts() {
        let mut r = CheckReport::default();
        assert_eq!(r.exit_code(), 0);
        assert!(r.human().starts_with("No errors were found on the image."));
        r.leaks = 2;
        assert_eq!(r.exit_code(), 3);
        assert!(r
            .human()
            .contains("2 leaked clusters were found on the image."));
        r.corruptions = 1;
        assert_eq!(r.exit_code(), 2);
        r.check_errors = 1;
        assert_eq!(r.exit_code(), 1);
        r.total_clusters = 1024;
        r.allocated_clusters = 17;
        r.image_end_offset = 1441792;
        let h = r.human();
        assert!(
            h.contains("17/1024 = 1.66% allocated, 0.00% fragmented, 0.00% compressed clusters\n")
        );
        assert!(h.ends_with("Image end offset: 1441792\n"));
        let j = r.json();
        assert_eq!(j["leaks"], 2);
        assert_eq!(j["check-errors"], 1);
        assert!(j.get("leaks-fixed").is_none());
    }
}
