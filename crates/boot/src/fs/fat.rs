//! FAT12/16/32 (read-only), after Microsoft's "FAT: General Overview of On-Disk Format"
//! (fatgen103, version 1.03), cited below as [FAT] with its section names.
//!
//! Bounds: a cluster chain is followed at most as far as the file's size needs and never
//! further than the cluster count (so loops end); a directory is at most 65 536 entries
//! (2 MiB, the limit [FAT] "FAT Directories" sets); names are 8.3 or VFAT long names
//! (checksummed; a broken long name falls back to the 8.3 one). FAT has no symlinks.

use std::sync::Arc;

use super::{Inodes, NodeKind};
use crate::bytes::{le16, le32};
use crate::disk::ReadAt;
use crate::{Error, Result};

const FS: &str = "fat";

/// Most entries in one directory ([FAT] "FAT Directories": 65 536 entries of 32 bytes).
const MAX_DIR_ENTRIES: u64 = 65_536;
const DIR_ENTRY: usize = 32;

/// Directory entry attributes ([FAT] "FAT Directories", DIR_Attr).
const ATTR_VOLUME_ID: u8 = 0x08;
const ATTR_DIRECTORY: u8 = 0x10;
const ATTR_LONG_NAME: u8 = 0x0F;
const ATTR_LONG_NAME_MASK: u8 = 0x3F;
/// DIR_NTRes bits set by Windows NT (and Linux) for 8.3 names in lower case.
const NTRES_LOWER_BASE: u8 = 0x08;
const NTRES_LOWER_EXT: u8 = 0x10;
/// Longest VFAT name: 255 UTF-16 units, 13 per entry.
const MAX_LFN_ENTRIES: usize = 20;

/// Size of the window of the FAT read at once while following a chain.
const FAT_WINDOW: u64 = 4096;

/// The FAT variant, decided from the count of data clusters as the FAT specification says
/// ("FAT Type Determination"), never from the label in the boot sector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FatType {
    /// 12-bit FAT entries (fewer than 4085 clusters).
    Fat12,
    /// 16-bit FAT entries (fewer than 65525 clusters).
    Fat16,
    /// 32-bit FAT entries (28 bits used); the root directory is a cluster chain.
    Fat32,
}

fn byte(b: &[u8], at: usize) -> u8 {
    b.get(at).copied().unwrap_or(0)
}

/// The boot sector fields we use ([FAT] "Boot Sector and BPB").
struct Bpb {
    bytes_per_sec: u16,
    sec_per_clus: u8,
    rsvd_sec_cnt: u16,
    num_fats: u8,
    root_ent_cnt: u16,
    tot_sec16: u16,
    fat_sz16: u16,
    tot_sec32: u32,
    fat_sz32: u32,
    ext_flags: u16,
    root_clus: u32,
}

impl Bpb {
    fn parse(b: &[u8]) -> Bpb {
        Bpb {
            bytes_per_sec: le16(b, 11),
            sec_per_clus: byte(b, 13),
            rsvd_sec_cnt: le16(b, 14),
            num_fats: byte(b, 16),
            root_ent_cnt: le16(b, 17),
            tot_sec16: le16(b, 19),
            fat_sz16: le16(b, 22),
            tot_sec32: le32(b, 32),
            fat_sz32: le32(b, 36),
            ext_flags: le16(b, 40),
            root_clus: le32(b, 44),
        }
    }

    /// The checks every FAT boot sector passes ([FAT] "Boot Sector and BPB"): a jump
    /// instruction, the 0x55AA signature, BPB_BytsPerSec one of 512..4096, BPB_SecPerClus a
    /// power of two, reserved sectors, FATs and a total sector count non-zero, a media byte
    /// of 0xF0 or 0xF8..0xFF.
    fn plausible(b: &[u8]) -> bool {
        let jump = matches!(byte(b, 0), 0xEB | 0xE9);
        let sig = byte(b, 510) == 0x55 && byte(b, 511) == 0xAA;
        let bpb = Bpb::parse(b);
        let media = byte(b, 21);
        jump && sig
            && matches!(bpb.bytes_per_sec, 512 | 1024 | 2048 | 4096)
            && bpb.sec_per_clus.is_power_of_two()
            && bpb.rsvd_sec_cnt != 0
            && bpb.num_fats != 0
            && (bpb.tot_sec16 != 0 || bpb.tot_sec32 != 0)
            && (bpb.fat_sz16 != 0 || bpb.fat_sz32 != 0)
            && (media == 0xF0 || media >= 0xF8)
    }
}

/// Whether `disk` holds a FAT filesystem: a boot sector with a plausible BPB. An MBR also
/// ends in 0x55AA, but its bytes 11.. are boot code or zeros, not a BPB.
pub fn probe(disk: &dyn ReadAt) -> bool {
    let mut b = [0u8; 512];
    disk.read_exact_at(&mut b, 0).is_ok() && Bpb::plausible(&b)
}

/// A FAT filesystem.
pub struct Fat {
    disk: Arc<dyn ReadAt>,
    fat_type: FatType,
    /// Bytes per cluster.
    cluster_bytes: u64,
    /// Number of data clusters: valid cluster numbers are 2..=count+1.
    count: u32,
    /// Byte offset of the FAT in use, and its length in bytes.
    fat_start: u64,
    fat_bytes: u64,
    /// Byte offset of the fixed root directory (FAT12/16) and its entry count.
    root_start: u64,
    root_entries: u32,
    /// Byte offset of cluster 2.
    data_start: u64,
    /// FAT32's root directory cluster.
    root_clus: u32,
}

/// A file or directory: its first cluster, size (files) and whether it is the root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FatNode {
    cluster: u32,
    size: u32,
    dir: bool,
    root: bool,
}

fn corrupt(what: impl Into<String>) -> Error {
    Error::corrupt(FS, what)
}

fn io(what: &str, e: std::io::Error) -> Error {
    Error::io(format!("fat: {what}"), e)
}

impl Fat {
    /// Reads and checks the boot sector ([FAT] "Boot Sector and BPB", "FAT Type
    /// Determination", "FAT Data Structure").
    pub fn open(disk: Arc<dyn ReadAt>) -> Result<Fat> {
        let mut b = [0u8; 512];
        disk.read_exact_at(&mut b, 0)
            .map_err(|e| io("boot sector", e))?;
        if !Bpb::plausible(&b) {
            return Err(corrupt("no FAT boot sector (BPB)"));
        }
        let bpb = Bpb::parse(&b);
        let bps = u64::from(bpb.bytes_per_sec);
        let spc = u64::from(bpb.sec_per_clus);
        let overflow = || corrupt("BPB values overflow");
        // RootDirSectors = ((BPB_RootEntCnt * 32) + (BPB_BytsPerSec - 1)) / BPB_BytsPerSec
        let root_dir_sectors = (u64::from(bpb.root_ent_cnt) * 32).div_ceil(bps);
        let fat_sz = if bpb.fat_sz16 != 0 {
            u64::from(bpb.fat_sz16)
        } else {
            u64::from(bpb.fat_sz32)
        };
        let tot_sec = if bpb.tot_sec16 != 0 {
            u64::from(bpb.tot_sec16)
        } else {
            u64::from(bpb.tot_sec32)
        };
        let fats_sectors = fat_sz
            .checked_mul(u64::from(bpb.num_fats))
            .ok_or_else(overflow)?;
        let first_data_sector = u64::from(bpb.rsvd_sec_cnt)
            .checked_add(fats_sectors)
            .and_then(|s| s.checked_add(root_dir_sectors))
            .ok_or_else(overflow)?;
        let data_sec = tot_sec
            .checked_sub(first_data_sector)
            .ok_or_else(|| corrupt("metadata larger than the volume"))?;
        let count = data_sec / spc;
        // [FAT] "FAT Type Determination": by the count of clusters alone.
        let fat_type = if count < 4085 {
            FatType::Fat12
        } else if count < 65525 {
            FatType::Fat16
        } else {
            FatType::Fat32
        };
        if count == 0 {
            return Err(corrupt("no data clusters"));
        }
        // The BPB must have the layout of that type.
        let bpb32 = bpb.fat_sz16 == 0 && bpb.root_ent_cnt == 0;
        if (fat_type == FatType::Fat32) != bpb32 {
            return Err(corrupt(format!(
                "{count} clusters make it {fat_type:?}, but the BPB is laid out for {}",
                if bpb32 { "FAT32" } else { "FAT12/16" }
            )));
        }
        // FAT32 counts at most 2^28 - 11 clusters (entries are 28 bits, the top values
        // reserved).
        let count = u32::try_from(count)
            .ok()
            .filter(|&c| c <= 0x0FFF_FFF5)
            .ok_or_else(|| corrupt(format!("{count} clusters")))?;
        // The FAT must hold an entry for every cluster (entries 0 and 1 are reserved).
        let entries = u64::from(count) + 2;
        let need = match fat_type {
            FatType::Fat12 => entries + entries.div_ceil(2),
            FatType::Fat16 => entries * 2,
            FatType::Fat32 => entries * 4,
        };
        let fat_bytes = fat_sz.checked_mul(bps).ok_or_else(overflow)?;
        if fat_bytes < need {
            return Err(corrupt(format!(
                "FAT of {fat_bytes} bytes for {count} clusters"
            )));
        }
        // FAT32 BPB_ExtFlags: bit 7 set means only FAT number (bits 0-3) is in use.
        let active = if fat_type == FatType::Fat32 && bpb.ext_flags & 0x80 != 0 {
            let n = bpb.ext_flags & 0x0F;
            if n >= u16::from(bpb.num_fats) {
                return Err(corrupt(format!("active FAT {n} of {}", bpb.num_fats)));
            }
            u64::from(n)
        } else {
            0
        };
        let fat_start = (u64::from(bpb.rsvd_sec_cnt) + active * fat_sz)
            .checked_mul(bps)
            .ok_or_else(overflow)?;
        let root_start = (u64::from(bpb.rsvd_sec_cnt) + fats_sectors)
            .checked_mul(bps)
            .ok_or_else(overflow)?;
        let data_start = first_data_sector.checked_mul(bps).ok_or_else(overflow)?;
        let fat = Fat {
            disk,
            fat_type,
            cluster_bytes: bps * spc,
            count,
            fat_start,
            fat_bytes,
            root_start,
            root_entries: u32::from(bpb.root_ent_cnt),
            data_start,
            root_clus: bpb.root_clus,
        };
        if fat_type == FatType::Fat32 && !fat.valid_cluster(bpb.root_clus) {
            return Err(corrupt(format!("root cluster {}", bpb.root_clus)));
        }
        Ok(fat)
    }

    /// Which FAT variant this is.
    pub fn fat_type(&self) -> FatType {
        self.fat_type
    }

    fn valid_cluster(&self, c: u32) -> bool {
        c >= 2 && c - 2 < self.count
    }

    /// Byte offset of cluster `c` (valid): FirstSectorofCluster = ((N - 2) *
    /// BPB_SecPerClus) + FirstDataSector.
    fn cluster_offset(&self, c: u32) -> Result<u64> {
        u64::from(c - 2)
            .checked_mul(self.cluster_bytes)
            .and_then(|o| o.checked_add(self.data_start))
            .ok_or_else(|| corrupt(format!("cluster {c} offset overflows")))
    }

    /// Reads `buf.len()` bytes of the chain starting at cluster `first`, from byte
    /// `in_cluster` of its cluster number `skip`. Contiguous clusters are read at once. The
    /// chain is followed only as far as `buf` needs, and never for more steps than there
    /// are clusters, so a looping chain ends.
    fn read_chain(&self, first: u32, skip: u64, in_cluster: u64, buf: &mut [u8]) -> Result<()> {
        if !self.valid_cluster(first) {
            return Err(corrupt(format!("first cluster {first}")));
        }
        if skip > u64::from(self.count) {
            return Err(corrupt("cluster chain longer than the cluster count"));
        }
        let shorter = || corrupt("cluster chain shorter than the file");
        let cb = self.cluster_bytes;
        let mut cur = FatCursor::new(self);
        let mut seen = Seen::default();
        let mut c = first;
        seen.visit(c)?;
        for _ in 0..skip {
            c = cur.next(c)?.ok_or_else(shorter)?;
            seen.visit(c)?;
        }
        let mut steps = skip;
        let mut done = 0usize;
        let mut off_in = in_cluster;
        loop {
            let want = (buf.len() - done) as u64;
            // The run of contiguous clusters run_start.. covering as much of `want` as it can.
            let run_start = c;
            let mut run_len: u64 = 1;
            let mut after_run = None;
            while run_len * cb - off_in < want {
                steps += 1;
                if steps > u64::from(self.count) {
                    return Err(corrupt("cluster chain longer than the cluster count"));
                }
                let last = u32::try_from(u64::from(run_start) + run_len - 1)
                    .map_err(|_| corrupt("cluster number overflows"))?;
                let next = cur.next(last)?.ok_or_else(shorter)?;
                seen.visit(next)?;
                if u64::from(next) == u64::from(run_start) + run_len {
                    run_len += 1;
                } else {
                    after_run = Some(next);
                    break;
                }
            }
            let n = (run_len * cb - off_in).min(want) as usize;
            let at = self
                .cluster_offset(run_start)?
                .checked_add(off_in)
                .ok_or_else(|| corrupt("offset overflows"))?;
            let dst = buf
                .get_mut(done..done + n)
                .ok_or_else(|| corrupt("read past the buffer"))?;
            self.disk
                .read_exact_at(dst, at)
                .map_err(|e| io("file data", e))?;
            done += n;
            off_in = 0;
            if done >= buf.len() {
                return Ok(());
            }
            c = after_run.ok_or_else(|| corrupt("cluster chain walk stalled"))?;
        }
    }

    /// The clusters of a directory starting at `first`, at most 2 MiB of them.
    fn dir_clusters(&self, first: u32) -> Result<Vec<u32>> {
        if !self.valid_cluster(first) {
            return Err(corrupt(format!("directory cluster {first}")));
        }
        let max = (MAX_DIR_ENTRIES * DIR_ENTRY as u64)
            .div_ceil(self.cluster_bytes)
            .min(u64::from(self.count));
        let mut cur = FatCursor::new(self);
        let mut out = vec![first];
        let mut seen = Seen::default();
        seen.visit(first)?;
        let mut c = first;
        while let Some(next) = cur.next(c)? {
            seen.visit(next)?;
            if out.len() as u64 >= max {
                return Err(corrupt(format!(
                    "directory at cluster {first} longer than {max} clusters"
                )));
            }
            out.push(next);
            c = next;
        }
        Ok(out)
    }

    /// Calls `f` with each entry of directory `dir` (not ".", "..", deleted entries or
    /// volume labels) until it returns `false` or the directory ends.
    fn for_each_entry(&self, dir: &FatNode, mut f: impl FnMut(Entry) -> bool) -> Result<()> {
        let mut lfn = LfnState::default();
        let mut visit = |block: &[u8]| -> bool {
            for raw in block.chunks_exact(DIR_ENTRY) {
                match lfn.feed(raw) {
                    Feed::End => return false,
                    Feed::More => {}
                    Feed::Entry(e) => {
                        if !f(e) {
                            return false;
                        }
                    }
                }
            }
            true
        };
        if dir.root && self.fat_type != FatType::Fat32 {
            // [FAT] "FAT Directories": the FAT12/16 root directory is a fixed region after
            // the FATs, BPB_RootEntCnt entries. Read it in 4 KiB pieces.
            let total = u64::from(self.root_entries) * DIR_ENTRY as u64;
            let mut off = 0u64;
            while off < total {
                let n = (total - off).min(4096) as usize;
                let mut block = vec![0u8; n];
                self.disk
                    .read_exact_at(&mut block, self.root_start + off)
                    .map_err(|e| io("root directory", e))?;
                if !visit(&block) {
                    return Ok(());
                }
                off += n as u64;
            }
            return Ok(());
        }
        let first = if dir.root {
            self.root_clus
        } else {
            dir.cluster
        };
        let cb = usize::try_from(self.cluster_bytes).map_err(|_| corrupt("cluster size"))?;
        let mut block = vec![0u8; cb];
        for c in self.dir_clusters(first)? {
            self.disk
                .read_exact_at(&mut block, self.cluster_offset(c)?)
                .map_err(|e| io("directory", e))?;
            if !visit(&block) {
                break;
            }
        }
        Ok(())
    }

    fn node_of(&self, e: &Entry) -> Result<FatNode> {
        let dir = e.attr & ATTR_DIRECTORY != 0;
        if e.cluster == 0 {
            // An empty file has no cluster; a directory always has one ("." and "..").
            if dir || e.size != 0 {
                return Err(corrupt(format!(
                    "{}: no first cluster",
                    String::from_utf8_lossy(&e.name())
                )));
            }
        } else if !self.valid_cluster(e.cluster) {
            return Err(corrupt(format!(
                "{}: first cluster {} out of range",
                String::from_utf8_lossy(&e.name()),
                e.cluster
            )));
        }
        Ok(FatNode {
            cluster: e.cluster,
            size: if dir { 0 } else { e.size },
            dir,
            root: false,
        })
    }
}

/// The clusters met on one chain: meeting one again is a loop.
#[derive(Default)]
struct Seen(std::collections::HashSet<u32>);

impl Seen {
    fn visit(&mut self, c: u32) -> Result<()> {
        if self.0.insert(c) {
            Ok(())
        } else {
            Err(corrupt(format!("cluster chain loops back to cluster {c}")))
        }
    }
}

/// Reads FAT entries through a small window of the FAT.
struct FatCursor<'a> {
    fat: &'a Fat,
    start: u64,
    win: Vec<u8>,
}

impl<'a> FatCursor<'a> {
    fn new(fat: &'a Fat) -> FatCursor<'a> {
        FatCursor {
            fat,
            start: 0,
            win: Vec::new(),
        }
    }

    /// The FAT byte at `off` (relative to the FAT's start, < fat_bytes).
    fn byte(&mut self, off: u64) -> Result<u8> {
        if off < self.start || off - self.start >= self.win.len() as u64 {
            if off >= self.fat.fat_bytes {
                return Err(corrupt("FAT entry past the FAT"));
            }
            let start = off - off % FAT_WINDOW;
            let len = (self.fat.fat_bytes - start).min(FAT_WINDOW) as usize;
            let mut win = vec![0u8; len];
            self.fat
                .disk
                .read_exact_at(&mut win, self.fat.fat_start + start)
                .map_err(|e| io("FAT", e))?;
            self.start = start;
            self.win = win;
        }
        Ok(byte(&self.win, (off - self.start) as usize))
    }

    /// The cluster after `c` (valid) in its chain: `None` at the end of the chain; free,
    /// bad, reserved or out-of-range values are corruption ([FAT] "FAT Data Structure").
    fn next(&mut self, c: u32) -> Result<Option<u32>> {
        let n = u64::from(c);
        let (v, eoc) = match self.fat.fat_type {
            FatType::Fat12 => {
                let off = n + n / 2;
                let w = u16::from_le_bytes([self.byte(off)?, self.byte(off + 1)?]);
                let v = if c & 1 == 1 { w >> 4 } else { w & 0x0FFF };
                (u32::from(v), 0x0FF8)
            }
            FatType::Fat16 => {
                let off = n * 2;
                let v = u16::from_le_bytes([self.byte(off)?, self.byte(off + 1)?]);
                (u32::from(v), 0xFFF8)
            }
            FatType::Fat32 => {
                let off = n * 4;
                let v = u32::from_le_bytes([
                    self.byte(off)?,
                    self.byte(off + 1)?,
                    self.byte(off + 2)?,
                    self.byte(off + 3)?,
                ]);
                // The high 4 bits are reserved.
                (v & 0x0FFF_FFFF, 0x0FFF_FFF8)
            }
        };
        if v >= eoc {
            Ok(None)
        } else if self.fat.valid_cluster(v) {
            Ok(Some(v))
        } else {
            Err(corrupt(format!("cluster {c} is followed by {v:#x}")))
        }
    }
}

/// A directory entry with its names.
struct Entry {
    short: Vec<u8>,
    long: Option<Vec<u8>>,
    attr: u8,
    cluster: u32,
    size: u32,
}

impl Entry {
    /// The long name if there is a valid one, else the 8.3 name.
    fn name(&self) -> Vec<u8> {
        self.long.clone().unwrap_or_else(|| self.short.clone())
    }
}

enum Feed {
    /// The end-of-directory marker.
    End,
    /// A long-name piece, a deleted entry, a label, "." or "..": nothing to report.
    More,
    Entry(Entry),
}

/// Long-name pieces gathered before their 8.3 entry ([FAT] is silent on VFAT; the layout is
/// Microsoft's long-file-name extension: entries in reverse order, the first with 0x40 set
/// in LDIR_Ord, all carrying the checksum of the 8.3 name).
#[derive(Default)]
struct LfnState {
    /// UTF-16 units by position; `next`: the LDIR_Ord expected next (0: complete).
    units: Vec<u16>,
    next: u8,
    checksum: u8,
    active: bool,
}

/// The checksum of an 8.3 name kept in long-name entries.
fn sfn_checksum(name: &[u8]) -> u8 {
    name.iter()
        .take(11)
        .fold(0u8, |sum, &b| sum.rotate_right(1).wrapping_add(b))
}

impl LfnState {
    fn feed(&mut self, raw: &[u8]) -> Feed {
        let first = byte(raw, 0);
        let attr = byte(raw, 11);
        if first == 0x00 {
            return Feed::End;
        }
        if first == 0xE5 {
            self.active = false;
            return Feed::More;
        }
        if attr & ATTR_LONG_NAME_MASK == ATTR_LONG_NAME {
            self.long_piece(raw);
            return Feed::More;
        }
        let long = self.take_long(raw);
        if attr & ATTR_VOLUME_ID != 0 {
            return Feed::More;
        }
        let name = raw.get(0..11).unwrap_or_default();
        if name == b".          " || name == b"..         " {
            return Feed::More;
        }
        let short = short_name(raw);
        if short.is_empty() {
            return Feed::More;
        }
        let cluster = (u32::from(le16(raw, 20)) << 16) | u32::from(le16(raw, 26));
        Feed::Entry(Entry {
            short,
            long,
            attr,
            cluster,
            size: le32(raw, 28),
        })
    }

    fn long_piece(&mut self, raw: &[u8]) {
        let ord = byte(raw, 0);
        let seq = ord & 0x1F;
        let csum = byte(raw, 13);
        if ord & 0x40 != 0 {
            if seq == 0 || usize::from(seq) > MAX_LFN_ENTRIES {
                self.active = false;
                return;
            }
            self.active = true;
            self.next = seq;
            self.checksum = csum;
            self.units = vec![0xFFFF; usize::from(seq) * 13];
        } else if !self.active || seq != self.next || seq == 0 || csum != self.checksum {
            self.active = false;
            return;
        }
        // Characters 1-5 at 1, 6-11 at 14, 12-13 at 28 (UTF-16LE).
        let base = usize::from(seq - 1) * 13;
        let offsets = [1usize, 3, 5, 7, 9, 14, 16, 18, 20, 22, 24, 28, 30];
        for (i, &o) in offsets.iter().enumerate() {
            if let Some(u) = self.units.get_mut(base + i) {
                *u = le16(raw, o);
            }
        }
        self.next = seq - 1;
    }

    /// The long name completed by the 8.3 entry `raw`, if it is whole and its checksum
    /// matches; resets the state.
    fn take_long(&mut self, raw: &[u8]) -> Option<Vec<u8>> {
        let ok = self.active
            && self.next == 0
            && self.checksum == sfn_checksum(raw.get(0..11).unwrap_or_default());
        self.active = false;
        if !ok {
            return None;
        }
        let units: Vec<u16> = self
            .units
            .iter()
            .copied()
            .take_while(|&u| u != 0x0000)
            .collect();
        let name = String::from_utf16(&units).ok()?;
        if name.is_empty() || name.contains('/') || name.contains('\0') {
            return None;
        }
        Some(name.into_bytes())
    }
}

/// Code page 437 (the IBM PC's, Linux's default for 8.3 names), bytes 0x80..=0xFF.
const CP437_HIGH: [char; 128] = [
    'Ç', 'ü', 'é', 'â', 'ä', 'à', 'å', 'ç', 'ê', 'ë', 'è', 'ï', 'î', 'ì', 'Ä', 'Å', //
    'É', 'æ', 'Æ', 'ô', 'ö', 'ò', 'û', 'ù', 'ÿ', 'Ö', 'Ü', '¢', '£', '¥', '₧', 'ƒ', //
    'á', 'í', 'ó', 'ú', 'ñ', 'Ñ', 'ª', 'º', '¿', '⌐', '¬', '½', '¼', '¡', '«', '»', //
    '░', '▒', '▓', '│', '┤', '╡', '╢', '╖', '╕', '╣', '║', '╗', '╝', '╜', '╛', '┐', //
    '└', '┴', '┬', '├', '─', '┼', '╞', '╟', '╚', '╔', '╩', '╦', '╠', '═', '╬', '╧', //
    '╨', '╤', '╥', '╙', '╘', '╒', '╓', '╫', '╪', '┘', '┌', '█', '▄', '▌', '▐', '▀', //
    'α', 'ß', 'Γ', 'π', 'Σ', 'σ', 'µ', 'τ', 'Φ', 'Θ', 'Ω', 'δ', '∞', 'φ', 'ε', '∩', //
    '≡', '±', '≥', '≤', '⌠', '⌡', '÷', '≈', '°', '∙', '·', '√', 'ⁿ', '²', '■', '\u{a0}',
];

/// An 8.3 name part (OEM code page 437) as UTF-8, lower-cased if `lower`.
fn oem_to_utf8(part: &[u8], lower: bool) -> String {
    let s: String = part
        .iter()
        .map(|&b| match b {
            0..=0x7F => char::from(b),
            _ => CP437_HIGH
                .get(usize::from(b - 0x80))
                .copied()
                .unwrap_or('?'),
        })
        .collect();
    if lower {
        s.to_lowercase()
    } else {
        s
    }
}

/// The 8.3 name of an entry ([FAT] "FAT Directories", DIR_Name): base and extension
/// without their padding, joined by '.', lower-cased where DIR_NTRes says so; a leading
/// 0x05 stands for 0xE5. Bytes over 0x7F are code page 437.
fn short_name(raw: &[u8]) -> Vec<u8> {
    let ntres = byte(raw, 12);
    let trim = |s: &[u8]| -> Vec<u8> {
        let end = s.iter().rposition(|&b| b != b' ').map_or(0, |p| p + 1);
        s.get(..end).unwrap_or_default().to_vec()
    };
    let mut base = trim(raw.get(0..8).unwrap_or_default());
    let ext = trim(raw.get(8..11).unwrap_or_default());
    if let Some(b) = base.first_mut() {
        if *b == 0x05 {
            *b = 0xE5;
        }
    }
    let mut name = oem_to_utf8(&base, ntres & NTRES_LOWER_BASE != 0);
    if !ext.is_empty() {
        name.push('.');
        name.push_str(&oem_to_utf8(&ext, ntres & NTRES_LOWER_EXT != 0));
    }
    name.into_bytes()
}

/// Case-insensitive comparison (Unicode lower case when both are UTF-8, ASCII otherwise).
fn same_name(a: &[u8], b: &[u8]) -> bool {
    if a.eq_ignore_ascii_case(b) {
        return true;
    }
    match (std::str::from_utf8(a), std::str::from_utf8(b)) {
        (Ok(a), Ok(b)) => a.to_lowercase() == b.to_lowercase(),
        _ => false,
    }
}

impl Inodes for Fat {
    type Node = FatNode;

    fn fs_type(&self) -> &'static str {
        FS
    }

    fn root(&self) -> Result<FatNode> {
        Ok(FatNode {
            cluster: if self.fat_type == FatType::Fat32 {
                self.root_clus
            } else {
                0
            },
            size: 0,
            dir: true,
            root: true,
        })
    }

    fn kind(&self, node: &FatNode) -> NodeKind {
        if node.dir {
            NodeKind::Dir
        } else {
            NodeKind::File
        }
    }

    fn size(&self, node: &FatNode) -> u64 {
        u64::from(node.size)
    }

    fn lookup(&self, dir: &FatNode, name: &[u8]) -> Result<Option<FatNode>> {
        if !dir.dir {
            return Ok(None);
        }
        let mut found = None;
        self.for_each_entry(dir, |e| {
            let hit =
                same_name(&e.short, name) || e.long.as_deref().is_some_and(|l| same_name(l, name));
            if hit {
                found = Some(e);
            }
            !hit
        })?;
        found.map(|e| self.node_of(&e)).transpose()
    }

    fn read_dir(&self, dir: &FatNode, max: usize) -> Result<Vec<(Vec<u8>, FatNode)>> {
        let mut out = Vec::new();
        let mut err = None;
        if max == 0 || !dir.dir {
            return Ok(out);
        }
        self.for_each_entry(dir, |e| {
            match self.node_of(&e) {
                Ok(n) => out.push((e.name(), n)),
                Err(x) => {
                    err = Some(x);
                    return false;
                }
            }
            out.len() < max
        })?;
        match err {
            Some(e) => Err(e),
            None => Ok(out),
        }
    }

    fn read(&self, node: &FatNode, offset: u64, buf: &mut [u8]) -> Result<usize> {
        let size = u64::from(node.size);
        if node.dir || offset >= size || buf.is_empty() {
            return Ok(0);
        }
        let n = (size - offset).min(buf.len() as u64) as usize;
        let dst = buf.get_mut(..n).unwrap_or_default();
        self.read_chain(
            node.cluster,
            offset / self.cluster_bytes,
            offset % self.cluster_bytes,
            dst,
        )?;
        Ok(n)
    }

    fn read_link(&self, _node: &FatNode) -> Result<Vec<u8>> {
        Err(Error::Unsupported("fat has no symbolic links".into()))
    }
}
