//! ISO 9660 / ECMA-119 (read-only), with the Rock Ridge (RRIP over SUSP) and Joliet
//! extensions: CD and DVD images, including "hybrid" ISOs that also carry an MBR.
//!
//! Which names are used: Rock Ridge names (and file types, and symbolic links) when the
//! primary volume's tree has Rock Ridge; else the Joliet tree (UCS-2 names) when there is
//! one; else the plain ISO 9660 names. Plain and Joliet names are looked up without regard
//! to case (boot configs often name "/isolinux/isolinux.cfg" which is `ISOLINUX.CFG;1` on the
//! disc), the version suffix (`;1`) and a trailing dot are removed.
//!
//! References: ECMA-119 4th edition (2019) — 8.4 primary volume descriptor, 8.5
//! supplementary volume descriptor, 9.1 directory record, 6.8.1 directory layout; the Joliet
//! specification (1995) — escape sequences and UCS-2 names; IEEE P1281 SUSP 1.12 — 5.1 CE,
//! 5.3 SP, 5.4 ST; IEEE P1282 RRIP 1.12 — 4.1.1 PX, 4.1.3 SL, 4.1.4 NM, 4.1.5 CL/PL/RE.
//!
//! Hostile images: every extent is checked against the image size before it is read, a
//! directory is at most [`MAX_DIR_BYTES`] with at most [`MAX_DIR_ENTRIES`] entries, a chain
//! of continuation areas at most [`MAX_CE_HOPS`] long, names and link targets are bounded,
//! and parsed directories are cached (a few of them) so that path walks through symbolic
//! link loops do not re-read the same directory again and again.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::{Inodes, NodeKind};
use crate::bytes::{le16, le32};
use crate::disk::ReadAt;
use crate::{Error, Result};

const FS: &str = "iso9660";
/// Volume descriptors live in 2048-byte logical sectors from sector 16 (ECMA-119 6.2.1,
/// 8.1); directory records never cross a logical sector boundary (6.8.1.1).
const SECTOR: u64 = 2048;
const VD_START: u64 = 16 * SECTOR;
/// Most volume descriptors looked at before the set terminator (8.3).
const MAX_VDS: u64 = 64;
/// Largest directory we read.
pub const MAX_DIR_BYTES: u64 = 16 << 20;
/// Most entries in one directory.
pub const MAX_DIR_ENTRIES: usize = 1 << 16;
/// Most bytes of parsed names, link targets and extents kept for one directory.
const MAX_DIR_PARSED: usize = 16 << 20;
/// Most continuation areas (SUSP CE) followed for one directory record (as Linux).
pub const MAX_CE_HOPS: usize = 32;
/// Most continuation-area bytes read while parsing one directory.
const MAX_DIR_CE_BYTES: usize = 16 << 20;
/// Longest Rock Ridge name (NM entries concatenated).
const MAX_NAME: usize = 1024;
/// Longest symbolic link target (the [`Inodes`] contract).
const MAX_LINK: usize = 4096;
/// Most extents of one multi-extent file.
const MAX_EXTENTS: usize = 1024;
/// Parsed directories kept.
const DIR_CACHE: usize = 4;
/// Most directory bytes parsed (cache misses) over the life of one [`Iso9660`]: a walk that
/// keeps missing the cache (symbolic links cycling through many large directories) ends
/// with an error instead of re-reading them for minutes.
pub const MAX_DIR_BYTES_TOTAL: u64 = 512 << 20;

/// File flags of a directory record (ECMA-119 9.1.6).
const FLAG_DIR: u8 = 0x02;
const FLAG_ASSOCIATED: u8 = 0x04;
const FLAG_MULTI_EXTENT: u8 = 0x80;

/// Whether `disk` holds ISO 9660: "CD001" in the first volume descriptor (sector 16).
pub fn probe(disk: &dyn ReadAt) -> bool {
    let mut id = [0u8; 5];
    disk.read_exact_at(&mut id, VD_START + 1).is_ok() && &id == b"CD001"
}

fn corrupt(what: impl Into<String>) -> Error {
    Error::corrupt(FS, what)
}

/// How names (and file types) are read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Names {
    /// Rock Ridge in the primary tree; `skip` is SP's LEN_SKP (SUSP 5.3).
    RockRidge { skip: usize },
    /// The Joliet supplementary tree.
    Joliet,
    /// Plain ISO 9660 names of the primary tree.
    Plain,
}

/// A file, directory or symbolic link.
#[derive(Debug, Clone)]
pub struct Node {
    kind: NodeKind,
    /// Data length (sum over the extents); for a symlink, the target's length.
    size: u64,
    /// (byte offset in the image, length) of each extent, in file order.
    extents: Arc<[(u64, u64)]>,
    /// A symbolic link's target.
    link: Arc<[u8]>,
    /// Recorded in interleaved mode (ECMA-119 9.1.7, 9.1.8): not supported.
    interleaved: bool,
}

#[derive(Debug)]
struct Entry {
    name: Vec<u8>,
    /// Looked up exactly (a Rock Ridge name) rather than without regard to case.
    exact: bool,
    node: Node,
}

/// A parsed directory: its byte offset, its size, its entries.
type CachedDir = (u64, u64, Arc<Vec<Entry>>);

/// An ISO 9660 filesystem; turn it into a [`super::FileSystem`] with [`super::Walk`].
pub struct Iso9660 {
    disk: Arc<dyn ReadAt>,
    /// Logical block size (ECMA-119 8.4.12): 512, 1024 or 2048.
    block: u64,
    names: Names,
    root: Node,
    /// Parsed directories, most recently used first, keyed by their byte offset and size.
    cache: Mutex<Vec<CachedDir>>,
    /// Directory bytes parsed so far (bounded by [`MAX_DIR_BYTES_TOTAL`]).
    dir_bytes: AtomicU64,
}

/// A multi-extent file being assembled (ECMA-119 6.5.1, 9.1.6 bit 7).
struct MultiExtent {
    /// The raw identifier every record of the file repeats.
    id: Vec<u8>,
    extents: Vec<(u64, u64)>,
    size: u64,
    interleaved: bool,
    /// From the first record; `None` when the file is not listed (an associated file).
    entry: Option<Entry>,
}

/// The fields of one directory record (ECMA-119 9.1) that we use.
struct Record<'a> {
    flags: u8,
    /// Byte offset of the data (extent plus extended attribute record), and data length.
    start: u64,
    size: u64,
    interleaved: bool,
    id: &'a [u8],
    /// The system use field (SUSP entries when Rock Ridge is there).
    system_use: &'a [u8],
}

impl<'a> Record<'a> {
    /// Parses a record of exactly `rec.len()` bytes (its length byte included).
    fn parse(rec: &'a [u8], block: u64) -> Result<Record<'a>> {
        // 9.1.1: length of directory record; 9.1.10: length of file identifier.
        let len_dr = rec.len();
        let len_fi = usize::from(*rec.get(32).unwrap_or(&0));
        let id_end = 33 + len_fi;
        if len_dr < 34 || len_fi == 0 || id_end > len_dr {
            return Err(corrupt(format!(
                "directory record of {len_dr} bytes with a {len_fi}-byte identifier"
            )));
        }
        let ext_attr = u64::from(rec[1]);
        let extent = u64::from(le32(rec, 2));
        let size = u64::from(le32(rec, 10));
        let start = extent
            .checked_add(ext_attr)
            .and_then(|b| b.checked_mul(block))
            .ok_or_else(|| corrupt("extent location overflows"))?;
        // 9.1.12: a padding byte follows an identifier of even length.
        let su_start = id_end + usize::from(len_fi % 2 == 0);
        Ok(Record {
            flags: rec[25],
            start,
            size,
            interleaved: rec[26] != 0 || rec[27] != 0,
            id: &rec[33..id_end],
            system_use: rec.get(su_start..).unwrap_or(&[]),
        })
    }

    /// The "." and ".." records (identifiers 0x00 and 0x01, 6.8.2.2).
    fn is_dot(&self) -> bool {
        self.id == [0] || self.id == [1]
    }
}

/// What the SUSP entries of one record say (RRIP 1.12, section 4).
#[derive(Default)]
struct RockRidge {
    name: Option<Vec<u8>>,
    /// POSIX st_mode (PX).
    mode: Option<u32>,
    link: Option<Vec<u8>>,
    /// Child link: the directory relocated to this block (CL).
    child: Option<u32>,
    /// This directory was relocated here (RE): hidden, it is reached through its CL.
    relocated: bool,
}

/// Builds a symbolic link target from SL component records (RRIP 4.1.3.1).
#[derive(Default)]
struct LinkBuilder {
    target: Vec<u8>,
    /// The last component continues in the next component record.
    continues: bool,
}

impl LinkBuilder {
    fn push_components(&mut self, mut comps: &[u8]) -> Result<()> {
        while comps.len() >= 2 {
            let flags = comps[0];
            let len = usize::from(comps[1]);
            let content = comps
                .get(2..2 + len)
                .ok_or_else(|| corrupt("SL component record past its entry"))?;
            comps = &comps[2 + len..];
            let piece: &[u8] = if flags & 0x02 != 0 {
                b"."
            } else if flags & 0x04 != 0 {
                b".."
            } else if flags & 0x18 != 0 {
                // ROOT or VOLROOT: the root of this filesystem.
                self.target.clear();
                self.target.push(b'/');
                self.continues = false;
                continue;
            } else if flags & 0x20 != 0 {
                // HOST: meaningless for us; Linux ignores it as well.
                continue;
            } else {
                content
            };
            if !self.continues && !self.target.is_empty() && self.target.last() != Some(&b'/') {
                self.target.push(b'/');
            }
            self.target.extend_from_slice(piece);
            self.continues = flags & 0x01 != 0;
            if self.target.len() > MAX_LINK {
                return Err(corrupt(format!(
                    "symbolic link target over {MAX_LINK} bytes"
                )));
            }
        }
        Ok(())
    }
}

/// Removes the version (";1") and a trailing "." from a plain or Joliet name (ECMA-119
/// 7.5.1: "name.ext;version", either part possibly empty).
fn strip_version(mut name: Vec<u8>) -> Vec<u8> {
    if let Some(p) = name.iter().position(|&b| b == b';') {
        name.truncate(p);
    }
    if name.len() > 1 && name.last() == Some(&b'.') {
        name.pop();
    }
    name
}

/// Joliet names are UCS-2 big-endian; we give UTF-8 (unpaired surrogates replaced).
fn joliet_name(id: &[u8]) -> Vec<u8> {
    let units = id.chunks_exact(2).map(|c| u16::from_be_bytes([c[0], c[1]]));
    char::decode_utf16(units)
        .map(|c| c.unwrap_or(char::REPLACEMENT_CHARACTER))
        .collect::<String>()
        .into_bytes()
}

/// Case-insensitive comparison for plain and Joliet names.
fn eq_ignore_case(a: &[u8], b: &[u8]) -> bool {
    if a.eq_ignore_ascii_case(b) {
        return true;
    }
    if a.is_ascii() && b.is_ascii() {
        return false;
    }
    match (std::str::from_utf8(a), std::str::from_utf8(b)) {
        (Ok(a), Ok(b)) => a.to_lowercase() == b.to_lowercase(),
        _ => false,
    }
}

impl Iso9660 {
    /// Reads the volume descriptor set and picks the tree to use (see the module docs).
    pub fn open(disk: Arc<dyn ReadAt>) -> Result<Iso9660> {
        let mut pvd: Option<Vec<u8>> = None;
        let mut joliet: Option<Vec<u8>> = None;
        // ECMA-119 8.1: the set starts at sector 16 and ends with a terminator (type 255).
        for i in 0..MAX_VDS {
            let at = VD_START + i * SECTOR;
            let mut vd = vec![0u8; SECTOR as usize];
            if disk.read_exact_at(&mut vd, at).is_err() {
                if pvd.is_some() {
                    break;
                }
                return Err(corrupt("volume descriptor set ends before the image does"));
            }
            if &vd[1..6] != b"CD001" {
                break;
            }
            match vd[0] {
                255 => break,
                // 8.4: primary volume descriptor (version 1).
                1 if pvd.is_none() => pvd = Some(vd),
                // 8.5 + Joliet: a supplementary descriptor (version 1) whose escape
                // sequences (8.5.6, at byte 88) name UCS-2 level 1, 2 or 3.
                2 if joliet.is_none()
                    && vd[6] == 1
                    && matches!(&vd[88..91], b"%/@" | b"%/C" | b"%/E") =>
                {
                    joliet = Some(vd)
                }
                _ => {}
            }
        }
        let pvd = pvd.ok_or_else(|| corrupt("no primary volume descriptor"))?;
        // 8.4.12: logical block size, 2^(n+9) and not above the sector size.
        let block = u64::from(le16(&pvd, 128));
        if !matches!(block, 512 | 1024 | 2048) {
            return Err(corrupt(format!("logical block size of {block} bytes")));
        }
        let mut fs = Iso9660 {
            disk,
            block,
            names: Names::Plain,
            root: Self::root_node(&pvd, block)?,
            cache: Mutex::new(Vec::new()),
            dir_bytes: AtomicU64::new(0),
        };
        if let Some(skip) = fs.rock_ridge_skip() {
            fs.names = Names::RockRidge { skip };
        } else if let Some(svd) = joliet {
            // A Joliet tree we cannot use leaves us with the plain names.
            if u64::from(le16(&svd, 128)) == block {
                if let Ok(root) = Self::root_node(&svd, block) {
                    fs.root = root;
                    fs.names = Names::Joliet;
                }
            }
        }
        Ok(fs)
    }

    /// The root directory record of a volume descriptor (8.4.18, at byte 156).
    fn root_node(vd: &[u8], block: u64) -> Result<Node> {
        let rec = vd.get(156..190).unwrap_or(&[]);
        if rec.first() != Some(&34) {
            return Err(corrupt("root directory record is not 34 bytes"));
        }
        let r = Record::parse(rec, block)?;
        Ok(Node {
            kind: NodeKind::Dir,
            size: r.size,
            extents: Arc::from(vec![(r.start, r.size)]),
            link: Arc::from(Vec::new()),
            interleaved: false,
        })
    }

    /// Whether the primary tree has Rock Ridge: an SP entry at the start of the system use
    /// field of the root's "." record (SUSP 5.3). Returns SP's LEN_SKP. A root that cannot be
    /// read has no Rock Ridge (and gives its error when it is listed).
    fn rock_ridge_skip(&self) -> Option<usize> {
        let (start, size) = self.root.extents.first().copied().unwrap_or((0, 0));
        let len = size.min(SECTOR - start % SECTOR);
        if len < 34 {
            return None;
        }
        let buf = self.read_extent(start, len).ok()?;
        let rec = buf.get(..usize::from(buf[0]))?;
        let r = Record::parse(rec, self.block).ok()?;
        let su = r.system_use;
        if r.id == [0] && su.len() >= 7 && &su[0..4] == b"SP\x07\x01" && su[4..6] == [0xBE, 0xEF] {
            return Some(usize::from(su[6]));
        }
        None
    }

    /// Reads `len` bytes at `start` after checking that they are inside the image.
    fn read_extent(&self, start: u64, len: u64) -> Result<Vec<u8>> {
        let size = self.disk.size();
        if start.checked_add(len).is_none_or(|end| end > size) {
            let what = format!("extent of {len} bytes at byte {start}");
            return Err(corrupt(format!(
                "{what} is past the end of the image ({size} bytes)"
            )));
        }
        let n = usize::try_from(len).map_err(|_| corrupt("extent too large"))?;
        let mut buf = vec![0u8; n];
        self.disk
            .read_exact_at(&mut buf, start)
            .map_err(|e| Error::io(format!("iso9660: reading {len} bytes at {start}"), e))?;
        Ok(buf)
    }

    /// The entries of directory `dir`, parsed once and cached.
    fn entries(&self, dir: &Node) -> Result<Arc<Vec<Entry>>> {
        if dir.kind != NodeKind::Dir {
            return Err(Error::NotADirectory("(iso9660 node)".into()));
        }
        let (start, size) = dir.extents.first().copied().unwrap_or((0, 0));
        {
            let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(i) = cache.iter().position(|c| c.0 == start && c.1 == size) {
                let hit = cache.remove(i);
                let entries = hit.2.clone();
                cache.insert(0, hit);
                return Ok(entries);
            }
        }
        let entries = Arc::new(self.parse_dir(start, size)?);
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        cache.insert(0, (start, size, entries.clone()));
        cache.truncate(DIR_CACHE);
        Ok(entries)
    }

    /// Reads and parses the directory at byte `start`, `size` bytes long (ECMA-119 6.8.1).
    fn parse_dir(&self, start: u64, size: u64) -> Result<Vec<Entry>> {
        if size > MAX_DIR_BYTES {
            return Err(Error::Unsupported(format!(
                "iso9660: directory of {size} bytes (the limit is {MAX_DIR_BYTES})"
            )));
        }
        let total = self.dir_bytes.fetch_add(size, Ordering::Relaxed);
        if total.saturating_add(size) > MAX_DIR_BYTES_TOTAL {
            return Err(Error::Unsupported(format!(
                "iso9660: over {MAX_DIR_BYTES_TOTAL} bytes of directories read"
            )));
        }
        let data = self.read_extent(start, size)?;
        let mut out = Vec::new();
        let mut parsed = 0usize;
        let mut ce_budget = MAX_DIR_CE_BYTES;
        let mut pending: Option<MultiExtent> = None;
        let mut pos = 0usize;
        while pos < data.len() {
            // 6.8.1.1: records do not cross a logical sector; the rest of a sector after the
            // last record is zero.
            let abs = start + pos as u64;
            let to_sector_end = (SECTOR - abs % SECTOR) as usize;
            let sector_end = pos.saturating_add(to_sector_end).min(data.len());
            let len_dr = usize::from(data[pos]);
            if len_dr == 0 {
                pos = sector_end;
                continue;
            }
            let rec = data
                .get(pos..pos + len_dr)
                .filter(|_| pos + len_dr <= sector_end)
                .ok_or_else(|| {
                    corrupt(format!(
                        "directory record at byte {abs} crosses a sector boundary"
                    ))
                })?;
            pos += len_dr;
            let r = Record::parse(rec, self.block)?;
            if r.is_dot() {
                continue;
            }
            // 9.1.6 bit 7: the file continues in the next record (same identifier).
            if let Some(mut p) = pending.take() {
                if r.id != p.id.as_slice() {
                    return Err(corrupt("multi-extent file continues with another name"));
                }
                if p.extents.len() >= MAX_EXTENTS {
                    return Err(Error::Unsupported(format!(
                        "iso9660: file of more than {MAX_EXTENTS} extents"
                    )));
                }
                p.extents.push((r.start, r.size));
                p.size = p
                    .size
                    .checked_add(r.size)
                    .ok_or_else(|| corrupt("multi-extent file size overflows"))?;
                p.interleaved |= r.interleaved;
                parsed = parsed.saturating_add(16);
                if r.flags & FLAG_MULTI_EXTENT != 0 {
                    pending = Some(p);
                } else if let Some(mut e) = p.entry {
                    e.node.extents = Arc::from(p.extents);
                    e.node.size = p.size;
                    e.node.interleaved = p.interleaved;
                    out.push(e);
                }
                continue;
            }
            let entry = self.entry(&r, &mut ce_budget)?;
            if let Some(e) = &entry {
                parsed = parsed.saturating_add(e.name.len() + e.node.link.len() + 64);
            }
            if parsed > MAX_DIR_PARSED || out.len() >= MAX_DIR_ENTRIES {
                return Err(Error::Unsupported(format!(
                    "iso9660: directory of more than {MAX_DIR_ENTRIES} entries or {MAX_DIR_PARSED} bytes of names"
                )));
            }
            if r.flags & FLAG_MULTI_EXTENT != 0 {
                if matches!(&entry, Some(e) if e.node.kind != NodeKind::File) {
                    return Err(corrupt("multi-extent record of a directory or link"));
                }
                pending = Some(MultiExtent {
                    id: r.id.to_vec(),
                    extents: vec![(r.start, r.size)],
                    size: r.size,
                    interleaved: r.interleaved,
                    entry,
                });
            } else if let Some(e) = entry {
                out.push(e);
            }
        }
        if pending.is_some() {
            return Err(corrupt("multi-extent file ends with its directory"));
        }
        Ok(out)
    }

    /// The entry for one record; `None` for records not shown (associated files, relocated
    /// directories, names that cannot be looked up).
    fn entry(&self, r: &Record<'_>, ce_budget: &mut usize) -> Result<Option<Entry>> {
        if r.flags & FLAG_ASSOCIATED != 0 {
            return Ok(None);
        }
        let is_dir = r.flags & FLAG_DIR != 0;
        let mut kind = if is_dir {
            NodeKind::Dir
        } else {
            NodeKind::File
        };
        let mut link = Vec::new();
        let mut extent = (r.start, r.size);
        let (name, exact) = match self.names {
            Names::Plain => (strip_version(r.id.to_vec()), false),
            Names::Joliet => (strip_version(joliet_name(r.id)), false),
            Names::RockRidge { skip } => {
                let rr = self.rock_ridge(r.system_use, skip, ce_budget)?;
                if rr.relocated {
                    return Ok(None);
                }
                if let Some(block) = rr.child {
                    // RRIP 4.1.5.1: a placeholder file for a directory moved elsewhere.
                    kind = NodeKind::Dir;
                    extent = self.relocated_dir(block)?;
                } else if !is_dir {
                    // RRIP 4.1.1: the file type from st_mode (S_IFMT).
                    kind = match rr.mode.map(|m| m & 0o170_000) {
                        Some(0o100_000) => NodeKind::File,
                        Some(0o120_000) => NodeKind::Symlink,
                        // A directory by its mode but not by its record: not readable.
                        Some(_) => NodeKind::Other,
                        None if rr.link.is_some() => NodeKind::Symlink,
                        None => NodeKind::File,
                    };
                    if kind == NodeKind::Symlink {
                        link = rr.link.unwrap_or_default();
                    }
                }
                match rr.name {
                    Some(n) => (n, true),
                    None => (strip_version(r.id.to_vec()), false),
                }
            }
        };
        if name.is_empty() || name == b"." || name == b".." {
            return Ok(None);
        }
        let size = if kind == NodeKind::Symlink {
            link.len() as u64
        } else {
            extent.1
        };
        Ok(Some(Entry {
            name,
            exact,
            node: Node {
                kind,
                size,
                extents: Arc::from(vec![extent]),
                link: Arc::from(link),
                interleaved: r.interleaved,
            },
        }))
    }

    /// The extent of a relocated directory (RRIP CL): its "." record gives its size.
    fn relocated_dir(&self, block: u32) -> Result<(u64, u64)> {
        let start = u64::from(block)
            .checked_mul(self.block)
            .ok_or_else(|| corrupt("CL location overflows"))?;
        let head = self.read_extent(start, 34)?;
        let len_dr = usize::from(head[0]);
        let rec = self.read_extent(start, len_dr as u64)?;
        let r = Record::parse(&rec, self.block)?;
        if !r.is_dot() || r.start != start {
            return Err(corrupt(format!(
                "CL points to block {block}, which does not start a directory"
            )));
        }
        Ok((r.start, r.size))
    }

    /// Parses the SUSP entries of a system use field and its continuation areas (SUSP 5.1:
    /// CE; 5.4: ST ends the area) for the Rock Ridge entries we use.
    fn rock_ridge(&self, su: &[u8], skip: usize, ce_budget: &mut usize) -> Result<RockRidge> {
        let mut rr = RockRidge::default();
        let mut link: Option<LinkBuilder> = None;
        let mut area: Vec<u8> = su.get(skip..).unwrap_or(&[]).to_vec();
        let mut hops = 0usize;
        loop {
            let mut next: Option<(u64, u64, u64)> = None;
            let mut i = 0usize;
            while let Some(head) = area.get(i..i + 4) {
                let len = usize::from(head[2]);
                let Some(entry) = area.get(i..i + len).filter(|_| len >= 4) else {
                    // A bad length ends the area (as Linux does) rather than the directory.
                    break;
                };
                let body = &entry[4..];
                i += len;
                match &entry[0..2] {
                    b"ST" => break,
                    b"CE" if body.len() >= 24 => {
                        next = Some((
                            u64::from(le32(body, 0)),
                            u64::from(le32(body, 8)),
                            u64::from(le32(body, 16)),
                        ))
                    }
                    // RRIP 4.1.4: flags CURRENT (1) / PARENT (2) name "." / ".." (ignored);
                    // CONTINUE (0) says the next NM continues this one: we concatenate.
                    b"NM" if !body.is_empty() && body[0] & 0x06 == 0 => {
                        let name = rr.name.get_or_insert_with(Vec::new);
                        name.extend_from_slice(&body[1..]);
                        if name.len() > MAX_NAME {
                            return Err(corrupt(format!("name over {MAX_NAME} bytes")));
                        }
                    }
                    b"PX" if body.len() >= 8 => rr.mode = Some(le32(body, 0)),
                    b"SL" if !body.is_empty() => link
                        .get_or_insert_with(LinkBuilder::default)
                        .push_components(&body[1..])?,
                    b"CL" if body.len() >= 8 => rr.child = Some(le32(body, 0)),
                    b"RE" => rr.relocated = true,
                    _ => {}
                }
            }
            let Some((block, offset, len)) = next else {
                break;
            };
            hops += 1;
            if hops > MAX_CE_HOPS {
                return Err(corrupt(format!(
                    "more than {MAX_CE_HOPS} SUSP continuation areas"
                )));
            }
            // As Linux: a continuation area lies within one logical block.
            if offset.saturating_add(len) > self.block {
                return Err(corrupt(format!(
                    "SUSP continuation area of {len} bytes at offset {offset} of a block"
                )));
            }
            *ce_budget = ce_budget
                .checked_sub(len as usize)
                .ok_or_else(|| corrupt("too many SUSP continuation areas in a directory"))?;
            let start = block
                .checked_mul(self.block)
                .and_then(|b| b.checked_add(offset))
                .ok_or_else(|| corrupt("CE location overflows"))?;
            area = self.read_extent(start, len)?;
        }
        rr.link = link.map(|l| l.target);
        Ok(rr)
    }
}

impl Inodes for Iso9660 {
    type Node = Node;

    fn fs_type(&self) -> &'static str {
        FS
    }

    fn root(&self) -> Result<Node> {
        Ok(self.root.clone())
    }

    fn kind(&self, node: &Node) -> NodeKind {
        node.kind
    }

    fn size(&self, node: &Node) -> u64 {
        node.size
    }

    fn lookup(&self, dir: &Node, name: &[u8]) -> Result<Option<Node>> {
        let entries = self.entries(dir)?;
        let mut folded = None;
        for e in entries.iter() {
            if e.name == name {
                return Ok(Some(e.node.clone()));
            }
            if !e.exact && folded.is_none() && eq_ignore_case(&e.name, name) {
                folded = Some(e.node.clone());
            }
        }
        Ok(folded)
    }

    fn read_dir(&self, dir: &Node, max: usize) -> Result<Vec<(Vec<u8>, Node)>> {
        Ok(self
            .entries(dir)?
            .iter()
            .take(max)
            .map(|e| (e.name.clone(), e.node.clone()))
            .collect())
    }

    fn read(&self, node: &Node, offset: u64, buf: &mut [u8]) -> Result<usize> {
        if node.kind != NodeKind::File {
            return Err(Error::NotAFile("(iso9660 node)".into()));
        }
        if node.interleaved {
            return Err(Error::Unsupported("iso9660: interleaved file".into()));
        }
        let mut off = offset;
        for &(start, len) in node.extents.iter() {
            if off >= len {
                off -= len;
                continue;
            }
            let end = start.checked_add(len);
            let disk_size = self.disk.size();
            if end.is_none_or(|e| e > disk_size) {
                return Err(corrupt(format!(
                    "file extent of {len} bytes at byte {start} is past the end of the image ({disk_size} bytes)"
                )));
            }
            let n = usize::try_from(len - off)
                .unwrap_or(usize::MAX)
                .min(buf.len());
            let at = start + off;
            self.disk
                .read_exact_at(&mut buf[..n], at)
                .map_err(|e| Error::io(format!("iso9660: reading {n} bytes at {at}"), e))?;
            return Ok(n);
        }
        Ok(0)
    }

    fn read_link(&self, node: &Node) -> Result<Vec<u8>> {
        Ok(node.link.to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link(entries: &[&[u8]]) -> Result<Vec<u8>> {
        let mut l = LinkBuilder::default();
        for e in entries {
            l.push_components(e)?;
        }
        Ok(l.target)
    }

    #[test]
    fn sl_components_build_targets() {
        // ROOT, "boot", then "vmlinuz" split over two records (CONTINUE) in two SL entries.
        let t = link(&[b"\x08\x00\x00\x04boot\x01\x03vml", b"\x00\x04inuz"]).unwrap();
        assert_eq!(t, b"/boot/vmlinuz");
        // PARENT, CURRENT, "x"
        assert_eq!(link(&[b"\x04\x00\x02\x00\x00\x01x"]).unwrap(), b".././x");
        // A component longer than its entry.
        assert!(link(&[b"\x00\x09abc"]).is_err());
        // A target over the limit.
        let big = [b"\x00\xff".as_slice(), &[b'a'; 255]].concat();
        let many: Vec<&[u8]> = std::iter::repeat_n(big.as_slice(), 20).collect();
        assert!(link(&many).is_err());
    }

    #[test]
    fn names_lose_version_and_trailing_dot() {
        assert_eq!(strip_version(b"VMLINUZ.;1".to_vec()), b"VMLINUZ");
        assert_eq!(strip_version(b"ISOLINUX.CFG;1".to_vec()), b"ISOLINUX.CFG");
        assert_eq!(strip_version(b"DIR".to_vec()), b"DIR");
        assert_eq!(strip_version(b";1".to_vec()), b"");
        assert_eq!(joliet_name(b"\x00a\x00.\x00b\x00;\x001"), b"a.b;1");
        assert_eq!(joliet_name(b"\xd8\x00\x00x"), "\u{fffd}x".as_bytes());
        assert!(eq_ignore_case(b"isolinux.cfg", b"ISOLINUX.CFG"));
        assert!(eq_ignore_case("ÉTÉ".as_bytes(), "été".as_bytes()));
        assert!(!eq_ignore_case(b"a", b"b"));
    }
}
