//! XFS, read-only: enough to read `/boot` of RHEL/CentOS 7+ guests (what pygrub does).
//!
//! Implemented from "XFS Algorithms & Data Structures" (the on-disk format document of the
//! xfs-documentation repository; section names are cited below) and the kernel's
//! `fs/xfs/libxfs/xfs_format.h` / `xfs_da_format.h` for field offsets. No code was copied.
//!
//! Supported: v5 (CRC) filesystems, and v4 ones (v2 directories); block sizes 512..64 KiB;
//! directory blocks up to 64 KiB; data forks in local, extents and B+tree form; shortform,
//! block, leaf and node directories (the data blocks are scanned, the hash indexes are not
//! used); local and remote symlinks. CRCs are not verified; magic numbers, levels, counts and
//! every offset are. Realtime files are refused (their data is on another device).
//!
//! Every number read from the disk is checked before it is used as a length, offset or
//! index, and every walk is bounded (extents per file, B+tree blocks and depth, directory
//! bytes scanned, symlink length).

use std::sync::Arc;

use super::{Inodes, NodeKind};
use crate::disk::ReadAt;
use crate::{Error, Result};

const FS: &str = "xfs";

// Superblock (section "Superblocks").
const SB_MAGIC: u32 = 0x5846_5342; // "XFSB"
const VERSION_NUMBITS: u16 = 0x000f;
const VERSION_DIRV2BIT: u16 = 0x2000;
const VERSION_MOREBITSBIT: u16 = 0x8000;
const VERSION2_FTYPE: u32 = 0x0000_0200;
const INCOMPAT_FTYPE: u32 = 1 << 0;
const INCOMPAT_SPINODES: u32 = 1 << 1;
const INCOMPAT_META_UUID: u32 = 1 << 2;
const INCOMPAT_BIGTIME: u32 = 1 << 3;
const INCOMPAT_NEEDSREPAIR: u32 = 1 << 4;
const INCOMPAT_NREXT64: u32 = 1 << 5;
const INCOMPAT_EXCHRANGE: u32 = 1 << 6;
const INCOMPAT_PARENT: u32 = 1 << 7;
/// Incompatible features that do not change how files, directories and symlinks of the
/// data device are laid out (sparse inode chunks, timestamps, UUIDs, parent pointers kept
/// in attributes) or that we handle (ftype, 64-bit extent counters).
const INCOMPAT_KNOWN: u32 = INCOMPAT_FTYPE
    | INCOMPAT_SPINODES
    | INCOMPAT_META_UUID
    | INCOMPAT_BIGTIME
    | INCOMPAT_NEEDSREPAIR
    | INCOMPAT_NREXT64
    | INCOMPAT_EXCHRANGE
    | INCOMPAT_PARENT;

// Inodes (section "On-disk Inode").
const DINODE_MAGIC: u16 = 0x494e; // "IN"
const CORE_V3: usize = 176;
const CORE_V2: usize = 100;
const FMT_LOCAL: u8 = 1;
const FMT_EXTENTS: u8 = 2;
const FMT_BTREE: u8 = 3;
const DIFLAG_REALTIME: u16 = 1 << 0;
const DIFLAG2_NREXT64: u64 = 1 << 4;
const S_IFMT: u16 = 0o170000;
const S_IFDIR: u16 = 0o040000;
const S_IFREG: u16 = 0o100000;
const S_IFLNK: u16 = 0o120000;

// B+tree extent lists (section "B+tree Extent List").
const BMAP_MAGIC: u32 = 0x424d_4150; // "BMAP"
const BMAP_CRC_MAGIC: u32 = 0x424d_4133; // "BMA3"
const BTREE_LBLOCK_LEN: usize = 24;
const BTREE_LBLOCK_CRC_LEN: usize = 72;
const MAX_BMBT_LEVEL: u16 = 5;

// Directories (section "Directories").
const DIR2_BLOCK_MAGIC: u32 = 0x5844_3242; // "XD2B"
const DIR2_DATA_MAGIC: u32 = 0x5844_3244; // "XD2D"
const DIR3_BLOCK_MAGIC: u32 = 0x5844_4233; // "XDB3"
const DIR3_DATA_MAGIC: u32 = 0x5844_4433; // "XDD3"
const DIR2_DATA_HDR_LEN: usize = 16;
const DIR3_DATA_HDR_LEN: usize = 64;
const DIR2_DATA_FREE_TAG: u16 = 0xffff;
/// Directory data blocks live below this byte offset of a directory; the leaf (hash index)
/// and free-space blocks are above it.
const DIR2_LEAF_OFFSET: u64 = 32 << 30;

// Symbolic links (section "Symbolic Links").
const SYMLINK_MAGIC: u32 = 0x5853_4c4d; // "XSLM"
const SYMLINK_HDR_LEN: usize = 56;
const SYMLINK_MAXLEN: u64 = 1024;

// Our bounds.
/// Most extents we collect for one file (a 256 MiB kernel in 4 KiB single-block extents
/// needs 65536).
const MAX_EXTENTS: usize = 1 << 18;
/// Most B+tree blocks read to list one file's extents.
const MAX_BMBT_BLOCKS: usize = 1 << 14;
/// Most directory bytes scanned for one lookup or listing.
const MAX_DIR_BYTES: u64 = 64 << 20;

/// Whether `disk` holds this filesystem (by its magic numbers).
pub fn probe(disk: &dyn ReadAt) -> bool {
    let mut magic = [0u8; 4];
    disk.read_exact_at(&mut magic, 0).is_ok() && u32::from_be_bytes(magic) == SB_MAGIC
}

fn corrupt(what: impl Into<String>) -> Error {
    Error::corrupt(FS, what)
}

/// Big-endian fields of an on-disk structure, read with bounds checks.
#[derive(Clone, Copy)]
struct Be<'a>(&'a [u8]);

impl Be<'_> {
    fn bytes<const N: usize>(&self, off: usize) -> Result<[u8; N]> {
        off.checked_add(N)
            .and_then(|end| self.0.get(off..end))
            .and_then(|s| <[u8; N]>::try_from(s).ok())
            .ok_or_else(|| corrupt(format!("structure truncated at byte {off}")))
    }
    fn u8(&self, off: usize) -> Result<u8> {
        Ok(self.bytes::<1>(off)?[0])
    }
    fn u16(&self, off: usize) -> Result<u16> {
        Ok(u16::from_be_bytes(self.bytes(off)?))
    }
    fn u32(&self, off: usize) -> Result<u32> {
        Ok(u32::from_be_bytes(self.bytes(off)?))
    }
    fn u64(&self, off: usize) -> Result<u64> {
        Ok(u64::from_be_bytes(self.bytes(off)?))
    }
    fn slice(&self, off: usize, len: usize) -> Result<&[u8]> {
        off.checked_add(len)
            .and_then(|end| self.0.get(off..end))
            .ok_or_else(|| corrupt(format!("{len} bytes at {off} are past the structure")))
    }
}

/// What we use of the superblock, validated.
#[derive(Debug, Clone)]
struct Geometry {
    v5: bool,
    ftype: bool,
    block_size: u32,
    block_log: u32,
    ag_blocks: u32,
    ag_count: u32,
    ag_blk_log: u32,
    inode_size: u32,
    inop_blog: u32,
    root_ino: u64,
    dir_blk_log: u32,
}

impl Geometry {
    /// Section "Superblocks": the primary superblock at byte 0 of AG 0.
    fn parse(sb: &[u8]) -> Result<Geometry> {
        let b = Be(sb);
        if b.u32(0)? != SB_MAGIC {
            return Err(corrupt("bad superblock magic"));
        }
        let block_size = b.u32(4)?;
        let root_ino = b.u64(56)?;
        let ag_blocks = b.u32(84)?;
        let ag_count = b.u32(88)?;
        let versionnum = b.u16(100)?;
        let inode_size = u32::from(b.u16(104)?);
        let inopblock = u32::from(b.u16(106)?);
        let block_log = u32::from(b.u8(120)?);
        let inode_log = u32::from(b.u8(122)?);
        let inop_blog = u32::from(b.u8(123)?);
        let ag_blk_log = u32::from(b.u8(124)?);
        let dir_blk_log = u32::from(b.u8(192)?);
        let features2 = b.u32(200)?;

        let (v5, ftype) = match versionnum & VERSION_NUMBITS {
            5 => {
                let incompat = b.u32(216)?;
                let unknown = incompat & !INCOMPAT_KNOWN;
                if unknown != 0 {
                    return Err(Error::Unsupported(format!(
                        "xfs: incompatible features {unknown:#x}"
                    )));
                }
                (true, incompat & INCOMPAT_FTYPE != 0)
            }
            4 => {
                if versionnum & VERSION_DIRV2BIT == 0 {
                    return Err(Error::Unsupported("xfs: version 1 directories".into()));
                }
                let more = versionnum & VERSION_MOREBITSBIT != 0;
                (false, more && features2 & VERSION2_FTYPE != 0)
            }
            v => return Err(Error::Unsupported(format!("xfs: superblock version {v}"))),
        };
        if !(9..=16).contains(&block_log) || block_size != 1 << block_log {
            return Err(corrupt(format!("block size {block_size}")));
        }
        if !(8..=11).contains(&inode_log)
            || inode_size != 1 << inode_log
            || inode_log > block_log
            || inop_blog != block_log - inode_log
            || inopblock != 1 << inop_blog
        {
            return Err(corrupt(format!(
                "inode size {inode_size} ({inopblock} per block)"
            )));
        }
        if ag_count == 0
            || ag_blocks == 0
            || ag_blk_log > 31
            || u64::from(ag_blocks) > 1u64 << ag_blk_log
        {
            return Err(corrupt(format!(
                "allocation groups: {ag_count} of {ag_blocks} blocks"
            )));
        }
        if block_log + dir_blk_log > 16 {
            return Err(corrupt(format!(
                "directory block size 2^{}",
                block_log + dir_blk_log
            )));
        }
        Ok(Geometry {
            v5,
            ftype,
            block_size,
            block_log,
            ag_blocks,
            ag_count,
            ag_blk_log,
            inode_size,
            inop_blog,
            root_ino,
            dir_blk_log,
        })
    }

    /// Byte offset of AG-relative block `agbno` of AG `agno` (both checked).
    fn ag_byte(&self, agno: u64, agbno: u64) -> Result<u64> {
        if agno >= u64::from(self.ag_count) || agbno >= u64::from(self.ag_blocks) {
            return Err(corrupt(format!(
                "block {agbno} of AG {agno} is outside the filesystem"
            )));
        }
        agno.checked_mul(u64::from(self.ag_blocks))
            .and_then(|b| b.checked_add(agbno))
            .and_then(|b| b.checked_mul(u64::from(self.block_size)))
            .ok_or_else(|| corrupt("block address overflows"))
    }

    /// Splits an AG-encoded filesystem block number (agno << agblklog | agbno), section
    /// "Data Extents".
    fn split_fsb(&self, fsb: u64) -> (u64, u64) {
        (
            fsb >> self.ag_blk_log,
            fsb & ((1u64 << self.ag_blk_log) - 1),
        )
    }

    fn fsb_byte(&self, fsb: u64) -> Result<u64> {
        let (agno, agbno) = self.split_fsb(fsb);
        self.ag_byte(agno, agbno)
    }

    /// Byte offset of inode `ino` (section "Inode Numbers": AG number, block in the AG,
    /// index in the block).
    fn inode_byte(&self, ino: u64) -> Result<u64> {
        let shift = self.ag_blk_log + self.inop_blog;
        let agno = ino >> shift;
        let agbno = (ino >> self.inop_blog) & ((1u64 << self.ag_blk_log) - 1);
        let index = ino & ((1u64 << self.inop_blog) - 1);
        if ino == 0 || agno >= u64::from(self.ag_count) || agbno >= u64::from(self.ag_blocks) {
            return Err(corrupt(format!(
                "inode number {ino} is outside the filesystem"
            )));
        }
        self.ag_byte(agno, agbno)?
            .checked_add(index * u64::from(self.inode_size))
            .ok_or_else(|| corrupt("inode address overflows"))
    }

    fn dir_blk_size(&self) -> u64 {
        1u64 << (self.block_log + self.dir_blk_log)
    }
}

/// An XFS filesystem on a disk.
pub struct Xfs {
    disk: Arc<dyn ReadAt>,
    geo: Geometry,
}

/// An inode, read and checked.
#[derive(Clone)]
pub struct XfsNode {
    ino: u64,
    kind: NodeKind,
    size: u64,
    inode: Arc<Dinode>,
}

impl std::fmt::Debug for XfsNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "XfsNode({}, {:?}, {} bytes)",
            self.ino, self.kind, self.size
        )
    }
}

impl XfsNode {
    /// The inode number.
    pub fn ino(&self) -> u64 {
        self.ino
    }
}

struct Dinode {
    format: u8,
    nextents: u64,
    realtime: bool,
    /// The data fork (the literal area up to the attribute fork).
    fork: Vec<u8>,
}

/// One extent of a file, in filesystem blocks (section "Data Extents").
#[derive(Debug, Clone, Copy)]
struct Extent {
    /// First logical block.
    off: u64,
    /// First block, AG-encoded.
    start: u64,
    count: u64,
    unwritten: bool,
}

impl Xfs {
    /// Reads and checks the superblock of the filesystem on `disk`, then its root inode:
    /// [`Error::Corrupt`] for a bad superblock, [`Error::Unsupported`] for versions and
    /// features this reader does not know.
    pub fn open(disk: Arc<dyn ReadAt>) -> Result<Xfs> {
        let mut sb = [0u8; 512];
        disk.read_exact_at(&mut sb, 0)
            .map_err(|e| Error::io("xfs: reading the superblock", e))?;
        let geo = Geometry::parse(&sb)?;
        let xfs = Xfs { disk, geo };
        xfs.root()?;
        Ok(xfs)
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.disk
            .read_exact_at(buf, offset)
            .map_err(|e| Error::io(format!("xfs: reading {} bytes at {offset}", buf.len()), e))
    }

    /// Reads and checks inode `ino` (section "On-disk Inode").
    fn inode(&self, ino: u64) -> Result<XfsNode> {
        let g = &self.geo;
        let at = g.inode_byte(ino)?;
        let mut buf = vec![0u8; g.inode_size as usize];
        self.read_at(&mut buf, at)?;
        let b = Be(&buf);
        if b.u16(0)? != DINODE_MAGIC {
            return Err(corrupt(format!("inode {ino}: bad magic")));
        }
        let mode = b.u16(2)?;
        let version = b.u8(4)?;
        let format = b.u8(5)?;
        let size = b.u64(56)?;
        let forkoff = usize::from(b.u8(82)?);
        let flags = b.u16(90)?;
        let core = match (g.v5, version) {
            (true, 3) => CORE_V3,
            (false, 1 | 2) => CORE_V2,
            _ => return Err(corrupt(format!("inode {ino}: version {version}"))),
        };
        let mut nextents = u64::from(b.u32(76)?);
        if version == 3 {
            if b.u64(152)? != ino {
                return Err(corrupt(format!(
                    "inode {ino}: records another inode number"
                )));
            }
            if b.u64(120)? & DIFLAG2_NREXT64 != 0 {
                nextents = b.u64(24)?;
            }
        }
        if size > i64::MAX as u64 {
            return Err(corrupt(format!("inode {ino}: size {size}")));
        }
        let literal = buf.len().saturating_sub(core);
        let fork_len = if forkoff == 0 { literal } else { forkoff * 8 };
        if fork_len > literal {
            return Err(corrupt(format!(
                "inode {ino}: attribute fork offset {forkoff}"
            )));
        }
        let fork = b.slice(core, fork_len)?.to_vec();
        let kind = match mode & S_IFMT {
            S_IFDIR => NodeKind::Dir,
            S_IFREG => NodeKind::File,
            S_IFLNK => NodeKind::Symlink,
            _ => NodeKind::Other,
        };
        Ok(XfsNode {
            ino,
            kind,
            size,
            inode: Arc::new(Dinode {
                format,
                nextents,
                realtime: kind == NodeKind::File && flags & DIFLAG_REALTIME != 0,
                fork,
            }),
        })
    }

    /// Decodes one packed 128-bit extent record and checks it stays inside its AG.
    fn extent(&self, rec: &[u8]) -> Result<Extent> {
        let b = Be(rec);
        let l0 = b.u64(0)?;
        let l1 = b.u64(8)?;
        let e = Extent {
            unwritten: l0 >> 63 != 0,
            off: (l0 >> 9) & ((1u64 << 54) - 1),
            start: ((l0 & 0x1ff) << 43) | (l1 >> 21),
            count: l1 & ((1u64 << 21) - 1),
        };
        let (agno, agbno) = self.geo.split_fsb(e.start);
        // The file's byte range must fit in 64 bits too, so that later shifts cannot
        // overflow (off < 2^54, count < 2^21).
        let fits = e.count > 0
            && agno < u64::from(self.geo.ag_count)
            && agbno + e.count <= u64::from(self.geo.ag_blocks)
            && e.off + e.count <= u64::MAX >> self.geo.block_log;
        if !fits {
            return Err(corrupt(format!(
                "extent of {} blocks at block {agbno} of AG {agno}",
                e.count
            )));
        }
        Ok(e)
    }

    /// The extents of a file in extents or B+tree format, sorted by logical block.
    fn extents(&self, node: &XfsNode) -> Result<Vec<Extent>> {
        let d = &node.inode;
        let mut out = Vec::new();
        match d.format {
            FMT_EXTENTS => {
                let n = usize::try_from(d.nextents)
                    .ok()
                    .filter(|n| n.saturating_mul(16) <= d.fork.len())
                    .ok_or_else(|| {
                        corrupt(format!("inode {}: {} extents", node.ino, d.nextents))
                    })?;
                for rec in d.fork.chunks_exact(16).take(n) {
                    out.push(self.extent(rec)?);
                }
            }
            FMT_BTREE => self.bmbt_root(node, &mut out)?,
            f => {
                return Err(corrupt(format!("inode {}: data fork format {f}", node.ino)));
            }
        }
        out.sort_by_key(|e| e.off);
        Ok(out)
    }

    /// Section "B+tree Extent List": the root (xfs_bmdr_block) sits in the data fork:
    /// level, numrecs, then keys and pointers sized to fill the fork.
    fn bmbt_root(&self, node: &XfsNode, out: &mut Vec<Extent>) -> Result<()> {
        let fork = Be(&node.inode.fork);
        let level = fork.u16(0)?;
        let numrecs = usize::from(fork.u16(2)?);
        let maxrecs = node.inode.fork.len().saturating_sub(4) / 16;
        if level == 0 || level > MAX_BMBT_LEVEL || numrecs > maxrecs {
            return Err(corrupt(format!(
                "inode {}: B+tree root of level {level} with {numrecs} records",
                node.ino
            )));
        }
        let mut budget = MAX_BMBT_BLOCKS;
        for i in 0..numrecs {
            let ptr = fork.u64(4 + maxrecs * 8 + i * 8)?;
            self.bmbt_block(node.ino, ptr, level - 1, out, &mut budget)?;
        }
        Ok(())
    }

    /// One long-format B+tree block ("BMA3" on v5, "BMAP" on v4) at `level`; levels
    /// strictly decrease, so the walk ends, and `budget` bounds the blocks read.
    fn bmbt_block(
        &self,
        ino: u64,
        fsb: u64,
        level: u16,
        out: &mut Vec<Extent>,
        budget: &mut usize,
    ) -> Result<()> {
        *budget = budget
            .checked_sub(1)
            .ok_or_else(|| corrupt(format!("inode {ino}: extent B+tree too large")))?;
        let g = &self.geo;
        let mut buf = vec![0u8; g.block_size as usize];
        self.read_at(&mut buf, g.fsb_byte(fsb)?)?;
        let b = Be(&buf);
        let (magic, hdr) = if g.v5 {
            (BMAP_CRC_MAGIC, BTREE_LBLOCK_CRC_LEN)
        } else {
            (BMAP_MAGIC, BTREE_LBLOCK_LEN)
        };
        if b.u32(0)? != magic {
            return Err(corrupt(format!(
                "inode {ino}: bad B+tree block magic at {fsb}"
            )));
        }
        let numrecs = usize::from(b.u16(6)?);
        let maxrecs = (buf.len() - hdr) / 16;
        if b.u16(4)? != level || numrecs > maxrecs {
            return Err(corrupt(format!(
                "inode {ino}: B+tree block {fsb} out of place"
            )));
        }
        if level == 0 {
            if out.len().saturating_add(numrecs) > MAX_EXTENTS {
                return Err(Error::Unsupported(format!(
                    "xfs: inode {ino} has more than {MAX_EXTENTS} extents"
                )));
            }
            for i in 0..numrecs {
                out.push(self.extent(b.slice(hdr + i * 16, 16)?)?);
            }
        } else {
            for i in 0..numrecs {
                let ptr = b.u64(hdr + maxrecs * 8 + i * 8)?;
                self.bmbt_block(ino, ptr, level - 1, out, budget)?;
            }
        }
        Ok(())
    }

    /// Fills `buf` with the bytes at logical byte `offset` of a file mapped by `extents`
    /// (sorted): holes and unwritten extents read as zeros.
    fn read_mapped(&self, extents: &[Extent], offset: u64, buf: &mut [u8]) -> Result<()> {
        let log = self.geo.block_log;
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset
                .checked_add(done as u64)
                .ok_or_else(|| corrupt("file offset overflows"))?;
            let rest = buf.len() - done;
            let lb = pos >> log;
            // The last extent starting at or before `lb`.
            let idx = extents.partition_point(|e| e.off <= lb);
            let hit = idx
                .checked_sub(1)
                .and_then(|i| extents.get(i))
                .filter(|e| lb - e.off < e.count);
            let chunk = match hit {
                Some(e) => {
                    // Extents are at most 2^21 blocks of at most 64 KiB: no overflow.
                    let end = (e.off + e.count) << log;
                    let n = usize::try_from(end - pos).map_or(rest, |n| n.min(rest));
                    let dst = buf.get_mut(done..done + n).unwrap_or_default();
                    if e.unwritten {
                        dst.fill(0);
                    } else {
                        let at = self
                            .geo
                            .fsb_byte(e.start)?
                            .checked_add(pos - (e.off << log))
                            .ok_or_else(|| corrupt("block address overflows"))?;
                        self.read_at(dst, at)?;
                    }
                    n
                }
                None => {
                    // A hole up to the next extent.
                    let n = match extents.get(idx) {
                        // Checked extents: `next.off << log` does not overflow.
                        Some(next) => usize::try_from((next.off << log).saturating_sub(pos))
                            .map_or(rest, |n| n.min(rest)),
                        None => rest,
                    };
                    buf.get_mut(done..done + n).unwrap_or_default().fill(0);
                    n
                }
            };
            if chunk == 0 {
                return Err(corrupt("extent map does not advance"));
            }
            done += chunk;
        }
        Ok(())
    }

    /// Calls `f(name, inode number)` for each entry of directory `dir` except "." and "..",
    /// until it returns `true`.
    fn for_each_entry(
        &self,
        dir: &XfsNode,
        f: &mut dyn FnMut(&[u8], u64) -> Result<bool>,
    ) -> Result<()> {
        if dir.kind != NodeKind::Dir {
            return Err(corrupt(format!("inode {} is not a directory", dir.ino)));
        }
        match dir.inode.format {
            FMT_LOCAL => self.shortform_entries(dir, f),
            FMT_EXTENTS | FMT_BTREE => self.block_entries(dir, f),
            fmt => Err(corrupt(format!(
                "directory {}: data fork format {fmt}",
                dir.ino
            ))),
        }
    }

    /// Section "Short Form Directories": header (count, i8count, parent), then entries of
    /// namelen, offset, name, [ftype], inode number (4 bytes, or 8 if i8count != 0).
    fn shortform_entries(
        &self,
        dir: &XfsNode,
        f: &mut dyn FnMut(&[u8], u64) -> Result<bool>,
    ) -> Result<()> {
        let fork = &dir.inode.fork;
        let len = usize::try_from(dir.size)
            .ok()
            .filter(|&n| n <= fork.len())
            .ok_or_else(|| corrupt(format!("directory {}: size {}", dir.ino, dir.size)))?;
        let b = Be(fork.get(..len).unwrap_or_default());
        let count = b.u8(0)?;
        let wide = b.u8(1)? != 0;
        let ino_len = if wide { 8 } else { 4 };
        let mut p = 2 + ino_len;
        for _ in 0..count {
            let namelen = usize::from(b.u8(p)?);
            let name = b.slice(p + 3, namelen)?;
            let mut q = p + 3 + namelen;
            if self.geo.ftype {
                q += 1;
            }
            let ino = if wide {
                b.u64(q)?
            } else {
                u64::from(b.u32(q)?)
            };
            p = q + ino_len;
            if namelen == 0 {
                return Err(corrupt(format!("directory {}: empty name", dir.ino)));
            }
            if f(name, ino)? {
                break;
            }
        }
        Ok(())
    }

    /// Block, leaf and node directories: the data blocks are the directory blocks mapped
    /// below 32 GiB (section "Leaf Directories"); a single "XDB3"/"XD2B" block ends with
    /// its hash index and tail (section "Block Directories").
    fn block_entries(
        &self,
        dir: &XfsNode,
        f: &mut dyn FnMut(&[u8], u64) -> Result<bool>,
    ) -> Result<()> {
        let g = &self.geo;
        let extents = self.extents(dir)?;
        let dblk = g.dir_blk_size();
        let dlog = g.dir_blk_log;
        let leaf_blk = DIR2_LEAF_OFFSET >> g.block_log;
        let mut scanned = 0u64;
        let mut next_db = 0u64; // the first directory block not yet scanned
        let mut buf = vec![0u8; dblk as usize];
        for e in &extents {
            if e.unwritten || e.off >= leaf_blk {
                continue;
            }
            let first = (e.off >> dlog).max(next_db);
            let last = (e.off + e.count).min(leaf_blk).saturating_sub(1) >> dlog;
            let mut db = first;
            while db <= last {
                scanned = scanned.saturating_add(dblk);
                if scanned > MAX_DIR_BYTES {
                    return Err(Error::Unsupported(format!(
                        "xfs: directory {} is larger than {MAX_DIR_BYTES} bytes",
                        dir.ino
                    )));
                }
                self.read_mapped(&extents, (db << dlog) << g.block_log, &mut buf)?;
                if self.data_block_entries(dir.ino, &buf, f)? {
                    return Ok(());
                }
                db += 1;
            }
            next_db = next_db.max(last + 1);
        }
        Ok(())
    }

    /// The entries of one directory data block; `Ok(true)` if `f` asked to stop.
    fn data_block_entries(
        &self,
        ino: u64,
        block: &[u8],
        f: &mut dyn FnMut(&[u8], u64) -> Result<bool>,
    ) -> Result<bool> {
        let b = Be(block);
        let magic = b.u32(0)?;
        let (hdr, is_block) = match (self.geo.v5, magic) {
            (true, DIR3_BLOCK_MAGIC) => (DIR3_DATA_HDR_LEN, true),
            (true, DIR3_DATA_MAGIC) => (DIR3_DATA_HDR_LEN, false),
            (false, DIR2_BLOCK_MAGIC) => (DIR2_DATA_HDR_LEN, true),
            (false, DIR2_DATA_MAGIC) => (DIR2_DATA_HDR_LEN, false),
            _ => return Err(corrupt(format!("directory {ino}: bad data block magic"))),
        };
        let end = if is_block {
            // xfs_dir2_block_tail { count, stale } at the end, after `count` leaf entries.
            let tail = block.len() - 8;
            let count = b.u32(tail)? as usize;
            count
                .checked_mul(8)
                .and_then(|n| tail.checked_sub(n))
                .filter(|&e| e >= hdr)
                .ok_or_else(|| corrupt(format!("directory {ino}: {count} leaf entries")))?
        } else {
            block.len()
        };
        let extra = usize::from(self.geo.ftype);
        let mut p = hdr;
        while p < end {
            if b.u16(p)? == DIR2_DATA_FREE_TAG {
                // xfs_dir2_data_unused: freetag, length, ..., tag.
                let len = usize::from(b.u16(p + 2)?);
                if len < 8 || len % 8 != 0 || len > end - p {
                    return Err(corrupt(format!(
                        "directory {ino}: free space of {len} bytes"
                    )));
                }
                p += len;
                continue;
            }
            // xfs_dir2_data_entry: inumber, namelen, name, [ftype], padding, tag.
            let entry_ino = b.u64(p)?;
            let namelen = usize::from(b.u8(p + 8)?);
            let len = (8 + 1 + namelen + extra + 2 + 7) & !7;
            if namelen == 0 || len > end - p {
                return Err(corrupt(format!(
                    "directory {ino}: entry of {namelen} bytes"
                )));
            }
            let name = b.slice(p + 9, namelen)?;
            p += len;
            if name == b"." || name == b".." {
                continue;
            }
            if f(name, entry_ino)? {
                return Ok(true);
            }
        }
        Ok(false)
    }
}

impl Inodes for Xfs {
    type Node = XfsNode;

    fn fs_type(&self) -> &'static str {
        FS
    }

    fn root(&self) -> Result<XfsNode> {
        let root = self.inode(self.geo.root_ino)?;
        if root.kind != NodeKind::Dir {
            return Err(corrupt("the root inode is not a directory"));
        }
        Ok(root)
    }

    fn kind(&self, node: &XfsNode) -> NodeKind {
        node.kind
    }

    fn size(&self, node: &XfsNode) -> u64 {
        node.size
    }

    fn lookup(&self, dir: &XfsNode, name: &[u8]) -> Result<Option<XfsNode>> {
        let mut found = None;
        self.for_each_entry(dir, &mut |n, ino| {
            if n == name {
                found = Some(ino);
                return Ok(true);
            }
            Ok(false)
        })?;
        found.map(|ino| self.inode(ino)).transpose()
    }

    fn read_dir(&self, dir: &XfsNode, max: usize) -> Result<Vec<(Vec<u8>, XfsNode)>> {
        let mut names = Vec::new();
        if max > 0 {
            self.for_each_entry(dir, &mut |n, ino| {
                names.push((n.to_vec(), ino));
                Ok(names.len() >= max)
            })?;
        }
        names
            .into_iter()
            .map(|(name, ino)| Ok((name, self.inode(ino)?)))
            .collect()
    }

    fn read(&self, node: &XfsNode, offset: u64, buf: &mut [u8]) -> Result<usize> {
        if offset >= node.size {
            return Ok(0);
        }
        let n = usize::try_from(node.size - offset).map_or(buf.len(), |n| n.min(buf.len()));
        let dst = buf.get_mut(..n).unwrap_or_default();
        if node.inode.realtime {
            return Err(Error::Unsupported(format!(
                "xfs: inode {} is on the realtime device",
                node.ino
            )));
        }
        if node.inode.format == FMT_LOCAL {
            let src = usize::try_from(offset)
                .ok()
                .and_then(|o| node.inode.fork.get(o..o.checked_add(n)?))
                .ok_or_else(|| corrupt(format!("inode {}: inline data too short", node.ino)))?;
            dst.copy_from_slice(src);
            return Ok(n);
        }
        let extents = self.extents(node)?;
        self.read_mapped(&extents, offset, dst)?;
        Ok(n)
    }

    /// Section "Symbolic Links": inline in the data fork, or in extents whose blocks start
    /// with an "XSLM" header on v5.
    fn read_link(&self, node: &XfsNode) -> Result<Vec<u8>> {
        if node.kind != NodeKind::Symlink {
            return Err(corrupt(format!("inode {} is not a symlink", node.ino)));
        }
        if node.size == 0 || node.size > SYMLINK_MAXLEN {
            return Err(corrupt(format!(
                "symlink {}: length {}",
                node.ino, node.size
            )));
        }
        let len = node.size as usize;
        if node.inode.format == FMT_LOCAL {
            return node
                .inode
                .fork
                .get(..len)
                .map(<[u8]>::to_vec)
                .ok_or_else(|| corrupt(format!("symlink {}: inline data too short", node.ino)));
        }
        let extents = self.extents(node)?;
        let bs = self.geo.block_size as usize;
        let mut block = vec![0u8; bs];
        self.read_mapped(&extents, 0, &mut block)?;
        // v4 remote symlinks are the bare target. So are v5 ones written by mkfs.xfs from
        // a protofile (xfsprogs 6.1 omits the header; the kernel would refuse them, we
        // read them): a v5 block without the "XSLM" magic is taken as bare.
        if !self.geo.v5 || Be(&block).u32(0)? != SYMLINK_MAGIC {
            let mut out = vec![0u8; len];
            self.read_mapped(&extents, 0, &mut out)?;
            return Ok(out);
        }
        let mut out = Vec::with_capacity(len);
        let mut lb = 0u64;
        while out.len() < len {
            self.read_mapped(&extents, lb << self.geo.block_log, &mut block)?;
            if Be(&block).u32(0)? != SYMLINK_MAGIC {
                return Err(corrupt(format!("symlink {}: bad block magic", node.ino)));
            }
            let want = (len - out.len()).min(bs - SYMLINK_HDR_LEN);
            out.extend_from_slice(Be(&block).slice(SYMLINK_HDR_LEN, want)?);
            lb += 1;
        }
        Ok(out)
    }
}
