//! ext2/3/4 (read-only), our own reader of the on-disk format described in the kernel's
//! "ext4 Data Structures and Algorithms" (Documentation/filesystems/ext4/, cited below as
//! [ext4] with its section names). Paths are resolved by [`Walk`].
//!
//! Why not the ext4-view crate (tried first, see the git history): on hostile images its
//! extent walk can be made to run for years (an extent tree whose index entries all point to
//! one block per level, with leaves of zero-length extents: 4 * 340^5 extents skipped without
//! progress), it reads a block-mapped file with a hole over a whole indirect block as an
//! error, and its `Rc` state is not `Send`, so it had to be reloaded for every call.
//!
//! Like GRUB (and pygrub's libfsimage), the journal is not replayed: what a crash left only
//! in the journal is not seen. Not supported (clean [`Error::Unsupported`]): encrypted
//! inodes, meta_bg, compression, dirdata.
//!
//! Bounds: every block number is checked against the block count; an extent lookup visits
//! at most 5 levels of at most one block each; a file is read only up to its size (checked
//! against the limit by [`Walk`] first); a directory is at most [`MAX_DIR_BYTES`]; a symlink
//! target at most [`MAX_LINK`] bytes.

use std::sync::Arc;

use super::{FileSystem, Inodes, NodeKind, Walk};
use crate::bytes::{le16, le32};
use crate::disk::ReadAt;
use crate::{Error, Limits, Result};

const FS: &str = "ext4";

/// Largest directory (in bytes) we search or list. A directory with 100 000 entries of
/// 20-character names is about 3 MiB; the bound keeps a hostile directory (huge size, holes
/// or blocks repeated) from making each lookup of a path read more than that.
pub const MAX_DIR_BYTES: u64 = 16 << 20;

/// Longest symlink target we read (Linux's PATH_MAX).
pub const MAX_LINK: u64 = 4096;

/// Byte offset of the superblock's `s_magic` (superblock at 1024, magic at +0x38).
const SB_OFFSET: u64 = 1024;
const MAGIC: u16 = 0xEF53;

// [ext4] "Super Block": s_feature_incompat bits.
const INCOMPAT_COMPRESSION: u32 = 0x1;
const INCOMPAT_FILETYPE: u32 = 0x2;
const INCOMPAT_RECOVER: u32 = 0x4;
const INCOMPAT_JOURNAL_DEV: u32 = 0x8;
const INCOMPAT_META_BG: u32 = 0x10;
const INCOMPAT_EXTENTS: u32 = 0x40;
const INCOMPAT_64BIT: u32 = 0x80;
const INCOMPAT_MMP: u32 = 0x100;
const INCOMPAT_FLEX_BG: u32 = 0x200;
const INCOMPAT_EA_INODE: u32 = 0x400;
const INCOMPAT_DIRDATA: u32 = 0x1000;
const INCOMPAT_CSUM_SEED: u32 = 0x2000;
const INCOMPAT_LARGEDIR: u32 = 0x4000;
const INCOMPAT_INLINE_DATA: u32 = 0x8000;
const INCOMPAT_ENCRYPT: u32 = 0x10000;
const INCOMPAT_CASEFOLD: u32 = 0x20000;
/// What we can read (inline data and encryption per inode: refused on the inode).
const INCOMPAT_KNOWN: u32 = INCOMPAT_FILETYPE
    | INCOMPAT_RECOVER
    | INCOMPAT_EXTENTS
    | INCOMPAT_64BIT
    | INCOMPAT_MMP
    | INCOMPAT_FLEX_BG
    | INCOMPAT_EA_INODE
    | INCOMPAT_CSUM_SEED
    | INCOMPAT_LARGEDIR
    | INCOMPAT_INLINE_DATA
    | INCOMPAT_ENCRYPT
    | INCOMPAT_CASEFOLD;

// [ext4] "Index Nodes": i_flags bits.
const EXT4_ENCRYPT_FL: u32 = 0x800;
const EXT4_EXTENTS_FL: u32 = 0x80000;
const EXT4_INLINE_DATA_FL: u32 = 0x1000_0000;

// i_mode file types.
const S_IFMT: u16 = 0xF000;
const S_IFREG: u16 = 0x8000;
const S_IFDIR: u16 = 0x4000;
const S_IFLNK: u16 = 0xA000;

/// [ext4] "Extent Tree": header magic, and the deepest tree allowed.
const EXTENT_MAGIC: u16 = 0xF30A;
const EXTENT_MAX_DEPTH: u16 = 5;
/// An extent longer than this is uninitialized (reads as zeros), ee_len - 32768 blocks.
const EXTENT_INIT_MAX: u16 = 32768;

fn corrupt(what: impl Into<String>) -> Error {
    Error::corrupt(FS, what)
}

fn io(what: &str, e: std::io::Error) -> Error {
    Error::io(format!("ext4: {what}"), e)
}

/// Whether `disk` holds ext2/3/4 (superblock magic 0xEF53 at 1024+56).
pub fn probe(disk: &dyn ReadAt) -> bool {
    let mut m = [0u8; 2];
    disk.read_exact_at(&mut m, SB_OFFSET + 0x38).is_ok() && u16::from_le_bytes(m) == MAGIC
}

/// The superblock fields we use, checked ([ext4] "Super Block").
struct Geometry {
    block_size: u64,
    blocks_count: u64,
    first_data_block: u64,
    inodes_per_group: u64,
    inodes_count: u64,
    inode_size: u64,
    desc_size: u64,
    groups: u64,
}

impl Geometry {
    fn read(disk: &dyn ReadAt) -> Result<Geometry> {
        let mut sb = [0u8; 1024];
        disk.read_exact_at(&mut sb, SB_OFFSET)
            .map_err(|e| io("superblock", e))?;
        if le16(&sb, 0x38) != MAGIC {
            return Err(corrupt("no superblock magic"));
        }
        let log = le32(&sb, 0x18);
        // Block sizes 1 KiB to 64 KiB.
        if log > 6 {
            return Err(corrupt(format!("block size 2^(10+{log})")));
        }
        let block_size = 1024u64 << log;
        let incompat = le32(&sb, 0x60);
        let unknown = incompat & !INCOMPAT_KNOWN;
        if unknown != 0 {
            let named = [
                (INCOMPAT_COMPRESSION, "compression"),
                (INCOMPAT_JOURNAL_DEV, "journal device"),
                (INCOMPAT_META_BG, "meta_bg"),
                (INCOMPAT_DIRDATA, "dirdata"),
            ];
            let names: Vec<&str> = named
                .iter()
                .filter(|(bit, _)| unknown & bit != 0)
                .map(|(_, n)| *n)
                .collect();
            return Err(Error::Unsupported(format!(
                "ext4 features {unknown:#x} ({})",
                names.join(", ")
            )));
        }
        let is64 = incompat & INCOMPAT_64BIT != 0;
        let blocks_hi = if is64 { u64::from(le32(&sb, 0x150)) } else { 0 };
        let blocks_count = (blocks_hi << 32) | u64::from(le32(&sb, 0x4));
        let first_data_block = u64::from(le32(&sb, 0x14));
        let blocks_per_group = u64::from(le32(&sb, 0x20));
        let inodes_per_group = u64::from(le32(&sb, 0x28));
        let inodes_count = u64::from(le32(&sb, 0x0));
        let rev = le32(&sb, 0x4C);
        let inode_size = if rev == 0 {
            128
        } else {
            u64::from(le16(&sb, 0x58))
        };
        if inode_size < 128 || !inode_size.is_power_of_two() || inode_size > block_size {
            return Err(corrupt(format!("inode size {inode_size}")));
        }
        let desc_size = if is64 { u64::from(le16(&sb, 0xFE)) } else { 32 };
        if desc_size < 32 || !desc_size.is_power_of_two() || desc_size > block_size {
            return Err(corrupt(format!("group descriptor size {desc_size}")));
        }
        if blocks_per_group == 0 || inodes_per_group == 0 || first_data_block >= blocks_count {
            return Err(corrupt("empty block groups"));
        }
        let groups = (blocks_count - first_data_block).div_ceil(blocks_per_group);
        Ok(Geometry {
            block_size,
            blocks_count,
            first_data_block,
            inodes_per_group,
            inodes_count,
            inode_size,
            desc_size,
            groups,
        })
    }
}

/// An inode: its number and the fields we use ([ext4] "Index Nodes").
#[derive(Debug, Clone)]
pub struct Inode {
    ino: u32,
    /// Byte offset of the inode on the disk.
    loc: u64,
    mode: u16,
    size: u64,
    flags: u32,
    i_blocks: u32,
    file_acl: u64,
    /// i_block: the extent tree root, the block map or a fast symlink's target.
    block: [u8; 60],
}

impl Inode {
    fn file_type(&self) -> u16 {
        self.mode & S_IFMT
    }
}

/// Where a run of file blocks is.
enum Run {
    /// `len` blocks starting at this physical block.
    At(u64, u64),
    /// `len` blocks of zeros (holes, uninitialized extents).
    Zero(u64),
}

/// The inode layer of an ext2/3/4 filesystem ([`Ext4Fs`] puts [`Walk`] on it).
pub struct Ext4Inodes {
    disk: Arc<dyn ReadAt>,
    g: Geometry,
}

impl Ext4Inodes {
    /// Reads and checks the superblock of the filesystem on `disk`: [`Error::Corrupt`]
    /// without the ext2/3/4 magic or with a bad geometry, [`Error::Unsupported`] for
    /// incompatible features this reader does not know.
    pub fn open(disk: Arc<dyn ReadAt>) -> Result<Ext4Inodes> {
        let g = Geometry::read(&*disk)?;
        Ok(Ext4Inodes { disk, g })
    }

    fn block_offset(&self, block: u64) -> Result<u64> {
        if block == 0 || block >= self.g.blocks_count {
            return Err(corrupt(format!(
                "block {block} outside the filesystem ({} blocks)",
                self.g.blocks_count
            )));
        }
        block
            .checked_mul(self.g.block_size)
            .ok_or_else(|| corrupt("block offset overflows"))
    }

    fn read_block(&self, block: u64) -> Result<Vec<u8>> {
        let mut b = vec![0u8; self.g.block_size as usize];
        self.disk
            .read_exact_at(&mut b, self.block_offset(block)?)
            .map_err(|e| io("block", e))?;
        Ok(b)
    }

    /// Reads inode `ino` ([ext4] "Finding an Inode": group (ino-1) / inodes_per_group, index
    /// (ino-1) % inodes_per_group in the group's inode table).
    fn inode(&self, ino: u32) -> Result<Inode> {
        let n = u64::from(ino);
        if n == 0 || n > self.g.inodes_count {
            return Err(corrupt(format!("inode number {ino}")));
        }
        let group = (n - 1) / self.g.inodes_per_group;
        let index = (n - 1) % self.g.inodes_per_group;
        if group >= self.g.groups {
            return Err(corrupt(format!("inode {ino} in group {group}")));
        }
        // [ext4] "Block Group Descriptors": the table starts in the block after the
        // superblock's.
        let gdt = (self.g.first_data_block + 1)
            .checked_mul(self.g.block_size)
            .ok_or_else(|| corrupt("descriptor offset overflows"))?;
        let at = group
            .checked_mul(self.g.desc_size)
            .and_then(|o| o.checked_add(gdt))
            .ok_or_else(|| corrupt("descriptor offset overflows"))?;
        let mut d = vec![0u8; self.g.desc_size as usize];
        self.disk
            .read_exact_at(&mut d, at)
            .map_err(|e| io("group descriptor", e))?;
        let hi = if self.g.desc_size >= 64 {
            u64::from(le32(&d, 0x28))
        } else {
            0
        };
        let table = (hi << 32) | u64::from(le32(&d, 0x8));
        let at = self
            .block_offset(table)?
            .checked_add(index * self.g.inode_size)
            .ok_or_else(|| corrupt("inode offset overflows"))?;
        let mut raw = [0u8; 128];
        self.disk
            .read_exact_at(&mut raw, at)
            .map_err(|e| io("inode", e))?;
        let mode = le16(&raw, 0x0);
        let size = (u64::from(le32(&raw, 0x6C)) << 32) | u64::from(le32(&raw, 0x4));
        let mut block = [0u8; 60];
        block.copy_from_slice(raw.get(0x28..0x28 + 60).unwrap_or(&[0u8; 60]));
        Ok(Inode {
            ino,
            loc: at,
            mode,
            size,
            flags: le32(&raw, 0x20),
            i_blocks: le32(&raw, 0x1C),
            file_acl: (u64::from(le16(&raw, 0x76)) << 32) | u64::from(le32(&raw, 0x68)),
            block,
        })
    }

    /// Where file block `lblk` of `inode` is, and how many blocks from it are laid out the
    /// same way.
    fn map(&self, inode: &Inode, lblk: u64) -> Result<Run> {
        if inode.flags & EXT4_EXTENTS_FL != 0 {
            self.map_extents(inode, lblk)
        } else {
            self.map_blocks(inode, lblk)
        }
    }

    /// [ext4] "Extent Tree": from the root in i_block down to a leaf, at each index node
    /// the last entry starting at or before `lblk`. At most 5 levels, one block each.
    fn map_extents(&self, inode: &Inode, lblk: u64) -> Result<Run> {
        let bad = |what: &str| corrupt(format!("inode {}: extent tree: {what}", inode.ino));
        let lblk32 = u32::try_from(lblk).map_err(|_| bad("file block over 2^32"))?;
        let mut node: Vec<u8> = inode.block.to_vec();
        let mut expect_depth: Option<u16> = None;
        for _ in 0..=EXTENT_MAX_DEPTH {
            if le16(&node, 0) != EXTENT_MAGIC {
                return Err(bad("bad node magic"));
            }
            let entries = usize::from(le16(&node, 2));
            let depth = le16(&node, 6);
            if depth > EXTENT_MAX_DEPTH || expect_depth.is_some_and(|d| d != depth) {
                return Err(bad("bad depth"));
            }
            if (entries + 1) * 12 > node.len() {
                return Err(bad("more entries than fit"));
            }
            let entry = |i: usize| node.get(12 + i * 12..24 + i * 12).unwrap_or_default();
            if depth == 0 {
                // Leaf: ee_block, ee_len, ee_start_hi, ee_start_lo.
                let mut next_start: Option<u32> = None;
                for i in 0..entries {
                    let e = entry(i);
                    let start = le32(e, 0);
                    let raw_len = le16(e, 4);
                    let (len, init) = if raw_len > EXTENT_INIT_MAX {
                        (raw_len - EXTENT_INIT_MAX, false)
                    } else {
                        (raw_len, true)
                    };
                    let phys = (u64::from(le16(e, 6)) << 32) | u64::from(le32(e, 8));
                    if lblk32 >= start && u64::from(lblk32 - start) < u64::from(len) {
                        let off = u64::from(lblk32 - start);
                        let rest = u64::from(len) - off;
                        if !init {
                            return Ok(Run::Zero(rest));
                        }
                        return Ok(Run::At(
                            phys.checked_add(off)
                                .ok_or_else(|| bad("block overflows"))?,
                            rest,
                        ));
                    }
                    if start > lblk32 {
                        next_start = Some(next_start.map_or(start, |n| n.min(start)));
                    }
                }
                // A hole, up to the next extent of this leaf (or one block).
                return Ok(Run::Zero(next_start.map_or(1, |n| u64::from(n - lblk32))));
            }
            // Index: ei_block, ei_leaf_lo, ei_leaf_hi.
            let mut child = None;
            for i in 0..entries {
                let e = entry(i);
                if le32(e, 0) <= lblk32 {
                    child = Some((u64::from(le16(e, 8)) << 32) | u64::from(le32(e, 4)));
                } else {
                    break;
                }
            }
            let Some(child) = child else {
                return Ok(Run::Zero(1));
            };
            node = self.read_block(child)?;
            expect_depth = Some(depth - 1);
        }
        Err(bad("deeper than 5 levels"))
    }

    /// [ext4] "Direct/Indirect Block Addressing": 12 direct pointers, then single, double
    /// and triple indirect blocks. A zero pointer at any level is a hole.
    fn map_blocks(&self, inode: &Inode, lblk: u64) -> Result<Run> {
        let per = self.g.block_size / 4;
        let ptr = |i: u64| u64::from(le32(&inode.block, (i * 4) as usize));
        // (pointer in the inode, levels of indirection, index within that tree)
        let (root, levels, mut idx) = if lblk < 12 {
            let p = ptr(lblk);
            return Ok(if p == 0 { Run::Zero(1) } else { Run::At(p, 1) });
        } else if lblk - 12 < per {
            (ptr(12), 1u32, lblk - 12)
        } else if lblk - 12 - per < per * per {
            (ptr(13), 2, lblk - 12 - per)
        } else if lblk - 12 - per - per * per < per * per * per {
            (ptr(14), 3, lblk - 12 - per - per * per)
        } else {
            return Err(corrupt(format!(
                "inode {}: block {lblk} beyond the block map",
                inode.ino
            )));
        };
        let mut block = root;
        for level in (0..levels).rev() {
            if block == 0 {
                return Ok(Run::Zero(1));
            }
            let span = per.pow(level);
            let i = idx / span;
            idx %= span;
            let at = self
                .block_offset(block)?
                .checked_add(i * 4)
                .ok_or_else(|| corrupt("block map offset overflows"))?;
            let mut p = [0u8; 4];
            self.disk
                .read_exact_at(&mut p, at)
                .map_err(|e| io("block map", e))?;
            block = u64::from(u32::from_le_bytes(p));
        }
        Ok(if block == 0 {
            Run::Zero(1)
        } else {
            Run::At(block, 1)
        })
    }

    /// Reads `buf.len()` bytes of `inode`'s data at `offset` (the caller keeps it within
    /// the size). Physically contiguous blocks are read at once.
    fn read_data(&self, inode: &Inode, offset: u64, buf: &mut [u8]) -> Result<()> {
        if inode.flags & EXT4_ENCRYPT_FL != 0 {
            return Err(Error::Unsupported(format!(
                "ext4: inode {}: encrypted",
                inode.ino
            )));
        }
        if inode.flags & EXT4_INLINE_DATA_FL != 0 {
            // [ext4] "Inline Data": the first 60 bytes in i_block, the rest in the
            // "system.data" extended attribute.
            let (mut data, extra) = self.inline_parts(inode)?;
            data.extend_from_slice(&extra);
            let start = usize::try_from(offset).unwrap_or(usize::MAX);
            let src = data
                .get(start..start.saturating_add(buf.len()))
                .ok_or_else(|| {
                    corrupt(format!(
                        "inode {}: inline data shorter than the file",
                        inode.ino
                    ))
                })?;
            buf.copy_from_slice(src);
            return Ok(());
        }
        let bs = self.g.block_size;
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let lblk = pos / bs;
            let in_block = pos % bs;
            let want = (buf.len() - done) as u64;
            let (phys, blocks) = match self.map(inode, lblk)? {
                Run::At(p, n) => (Some(p), n.max(1)),
                Run::Zero(n) => (None, n.max(1)),
            };
            // Bytes available in this run from `pos`.
            let avail = blocks.saturating_mul(bs) - in_block;
            let n = avail.min(want) as usize;
            let dst = buf
                .get_mut(done..done + n)
                .ok_or_else(|| corrupt("read past the buffer"))?;
            match phys {
                None => dst.fill(0),
                Some(p) => {
                    let last = p
                        .checked_add((in_block + n as u64 - 1) / bs)
                        .ok_or_else(|| corrupt("block overflows"))?;
                    // The whole run must be inside the filesystem.
                    self.block_offset(last)?;
                    let at = self.block_offset(p)? + in_block;
                    self.disk
                        .read_exact_at(dst, at)
                        .map_err(|e| io("file data", e))?;
                }
            }
            done += n;
        }
        Ok(())
    }

    /// Calls `f(name, inode number)` for each entry of directory `dir` (not "." or "..")
    /// until it returns `false` ([ext4] "Linear (Classic) Directories"; the blocks of an
    /// htree directory read linearly too: its index blocks look like empty entries).
    fn for_each_entry(&self, dir: &Inode, mut f: impl FnMut(&[u8], u32) -> bool) -> Result<()> {
        if dir.size > MAX_DIR_BYTES {
            return Err(corrupt(format!(
                "inode {}: directory of {} bytes is over {MAX_DIR_BYTES}",
                dir.ino, dir.size
            )));
        }
        if dir.flags & EXT4_INLINE_DATA_FL != 0 {
            // [ext4] "Inline Directories": the parent's inode number, then entries in the
            // rest of i_block, then more in the "system.data" extended attribute.
            let (block, extra) = self.inline_parts(dir)?;
            if self.parse_entries(dir, block.get(4..).unwrap_or_default(), &mut f)? {
                self.parse_entries(dir, &extra, &mut f)?;
            }
            return Ok(());
        }
        let bs = self.g.block_size;
        let blocks = dir.size.div_ceil(bs);
        let mut block = vec![0u8; bs as usize];
        for lblk in 0..blocks {
            match self.map(dir, lblk)? {
                Run::Zero(_) => continue,
                Run::At(..) => {}
            }
            self.read_data(dir, lblk * bs, &mut block)?;
            if !self.parse_entries(dir, &block, &mut f)? {
                break;
            }
        }
        Ok(())
    }

    /// The entries of one directory block (or inline area) ([ext4] "Linear (Classic)
    /// Directories": inode, rec_len, name_len, file_type, name). `Ok(false)`: `f` stopped.
    fn parse_entries(
        &self,
        dir: &Inode,
        block: &[u8],
        f: &mut impl FnMut(&[u8], u32) -> bool,
    ) -> Result<bool> {
        let mut off = 0usize;
        while off + 8 <= block.len() {
            let ino = le32(block, off);
            let raw = le16(block, off + 4);
            // With 64 KiB blocks a record of 65536 bytes is stored as 0 or 65535, and the low
            // two bits carry bits 16-17 of the length.
            let rec_len = if self.g.block_size >= 65536 {
                if raw == 0 || raw == 65535 {
                    65536
                } else {
                    usize::from(raw & 0xFFFC) | (usize::from(raw & 3) << 16)
                }
            } else {
                usize::from(raw)
            };
            let name_len = usize::from(block.get(off + 6).copied().unwrap_or(0));
            if rec_len < 8 || rec_len % 4 != 0 || off + rec_len > block.len() {
                return Err(corrupt(format!(
                    "inode {}: directory entry at {off}: record length {rec_len}",
                    dir.ino
                )));
            }
            if 8 + name_len > rec_len {
                return Err(corrupt(format!(
                    "inode {}: directory entry name longer than its record",
                    dir.ino
                )));
            }
            let name = block.get(off + 8..off + 8 + name_len).unwrap_or_default();
            if ino != 0 && !name.is_empty() && name != b"." && name != b".." && !f(name, ino) {
                return Ok(false);
            }
            off += rec_len;
        }
        Ok(true)
    }

    /// An inline-data inode's two parts: i_block (60 bytes) and the value of its
    /// "system.data" extended attribute in the inode body ([ext4] "Inline Data", "Extended
    /// Attributes": after the 128-byte inode and i_extra_isize, the magic 0xEA020000 and
    /// entries e_name_len, e_name_index, e_value_offs, e_value_inum, e_value_size, e_hash,
    /// name (padded to 4), values at e_value_offs from the first entry).
    fn inline_parts(&self, inode: &Inode) -> Result<(Vec<u8>, Vec<u8>)> {
        let bad = |what: &str| corrupt(format!("inode {}: inline data: {what}", inode.ino));
        let mut raw = vec![0u8; self.g.inode_size as usize];
        self.disk
            .read_exact_at(&mut raw, inode.loc)
            .map_err(|e| io("inode", e))?;
        let block = inode.block.to_vec();
        let extra = usize::from(le16(&raw, 0x80));
        let hdr = 128 + extra;
        if raw.len() <= 128 || hdr + 4 > raw.len() || le32(&raw, hdr) != 0xEA02_0000 {
            // No in-inode attributes: everything is in i_block.
            return Ok((block, Vec::new()));
        }
        let first = hdr + 4;
        let mut off = first;
        // Each entry is at least 16 bytes: a bounded walk.
        while off + 16 <= raw.len() && le32(&raw, off) != 0 {
            let name_len = usize::from(raw.get(off).copied().unwrap_or(0));
            let index = raw.get(off + 1).copied().unwrap_or(0);
            let value_offs = usize::from(le16(&raw, off + 2));
            let value_size = le32(&raw, off + 8) as usize;
            let name = raw.get(off + 16..off + 16 + name_len).unwrap_or_default();
            if index == 7 && name == b"data" {
                let start = first + value_offs;
                let value = raw
                    .get(start..start.saturating_add(value_size))
                    .ok_or_else(|| bad("value outside the inode"))?;
                return Ok((block, value.to_vec()));
            }
            off += (16 + name_len).next_multiple_of(4);
        }
        Ok((block, Vec::new()))
    }

    fn check_dir(&self, dir: &Inode) -> Result<()> {
        if dir.file_type() != S_IFDIR {
            return Err(Error::NotADirectory(format!("inode {}", dir.ino)));
        }
        Ok(())
    }
}

impl Inodes for Ext4Inodes {
    type Node = Inode;

    fn fs_type(&self) -> &'static str {
        FS
    }

    fn root(&self) -> Result<Inode> {
        let root = self.inode(2)?;
        if root.file_type() != S_IFDIR {
            return Err(corrupt("root inode is not a directory"));
        }
        Ok(root)
    }

    fn kind(&self, node: &Inode) -> NodeKind {
        match node.file_type() {
            S_IFREG => NodeKind::File,
            S_IFDIR => NodeKind::Dir,
            S_IFLNK => NodeKind::Symlink,
            _ => NodeKind::Other,
        }
    }

    fn size(&self, node: &Inode) -> u64 {
        node.size
    }

    fn lookup(&self, dir: &Inode, name: &[u8]) -> Result<Option<Inode>> {
        self.check_dir(dir)?;
        let mut found = None;
        self.for_each_entry(dir, |n, ino| {
            if n == name {
                found = Some(ino);
                false
            } else {
                true
            }
        })?;
        found.map(|ino| self.inode(ino)).transpose()
    }

    fn read_dir(&self, dir: &Inode, max: usize) -> Result<Vec<(Vec<u8>, Inode)>> {
        self.check_dir(dir)?;
        let mut names = Vec::new();
        self.for_each_entry(dir, |n, ino| {
            if names.len() >= max {
                return false;
            }
            names.push((n.to_vec(), ino));
            true
        })?;
        names
            .into_iter()
            .map(|(n, ino)| Ok((n, self.inode(ino)?)))
            .collect()
    }

    fn read(&self, node: &Inode, offset: u64, buf: &mut [u8]) -> Result<usize> {
        if offset >= node.size || buf.is_empty() {
            return Ok(0);
        }
        let n = (node.size - offset).min(buf.len() as u64) as usize;
        self.read_data(node, offset, buf.get_mut(..n).unwrap_or_default())?;
        Ok(n)
    }

    fn read_link(&self, node: &Inode) -> Result<Vec<u8>> {
        if node.file_type() != S_IFLNK {
            return Err(corrupt(format!("inode {} is not a symlink", node.ino)));
        }
        if node.size == 0 || node.size > MAX_LINK {
            return Err(corrupt(format!(
                "inode {}: symlink target of {} bytes",
                node.ino, node.size
            )));
        }
        // A fast symlink keeps its target in i_block: under 60 bytes and no data block
        // (i_blocks counts only the extended-attribute block, if any).
        let ea_blocks = if node.file_acl != 0 {
            (self.g.block_size / 512) as u32
        } else {
            0
        };
        let len = node.size as usize;
        if node.size < 60
            && node.i_blocks.wrapping_sub(ea_blocks) == 0
            && node.flags & EXT4_INLINE_DATA_FL == 0
        {
            return Ok(node.block.get(..len).unwrap_or_default().to_vec());
        }
        let mut target = vec![0u8; len];
        self.read_data(node, 0, &mut target)?;
        Ok(target)
    }
}

/// An ext2/3/4 filesystem seen by paths.
pub struct Ext4Fs {
    walk: Walk<Ext4Inodes>,
}

impl Ext4Fs {
    /// Opens the filesystem (reads and checks its superblock and root directory).
    pub fn open(disk: Arc<dyn ReadAt>, limits: &Limits) -> Result<Ext4Fs> {
        let inodes = Ext4Inodes::open(disk)?;
        inodes.root()?;
        Ok(Ext4Fs {
            walk: Walk::new(inodes, limits.clone()),
        })
    }
}

impl FileSystem for Ext4Fs {
    fn fs_type(&self) -> &'static str {
        FS
    }
    fn read_file(&self, path: &str, limit: u64) -> Result<Vec<u8>> {
        self.walk.read_file(path, limit)
    }
    fn read_dir(&self, path: &str) -> Result<Vec<String>> {
        self.walk.read_dir(path)
    }
    fn kind(&self, path: &str) -> Result<Option<NodeKind>> {
        self.walk.kind(path)
    }
}
