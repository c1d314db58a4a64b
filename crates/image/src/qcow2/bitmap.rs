//! Persistent dirty bitmaps (QEMU's `docs/interop/qcow2.txt`: "Bitmaps extension", "Bitmap
//! directory", "Bitmap table", "Bitmap data"; the behaviour follows QEMU's
//! `block/qcow2-bitmap.c`).
//!
//! On disk, the bitmaps extension of the header points to the bitmap directory: one entry per
//! bitmap with its table, flags (`in_use`, `auto`, `extra_data_compatible`), granularity and
//! name. A bitmap's table lists the host clusters of its data (0: all zeroes; 0 with bit 0
//! set: all ones); the data holds one bit per `granularity` bytes of the virtual disk, least
//! significant bit first in each byte. The extension counts only while autoclear bit 0 is
//! set: a writer that does not know bitmaps clears that bit, and the bitmaps are then stale
//! (ignored, and dropped by a writable open, as QEMU does).
//!
//! While an image is open writable:
//! - every enabled (`auto`) bitmap found consistent is loaded into memory and marked `in_use`
//!   on disk before the open returns, so before any guest write can land; a guest write,
//!   write-zeroes or discard sets the bits of its range in memory, under the metadata lock
//!   the request takes anyway ([`Meta::track_write`], [`Meta::try_track_write`]);
//! - disabled bitmaps stay as they are on disk (not loaded, not marked), unless an operation
//!   changes them or the image is resized (then every bitmap is loaded and marked `in_use`
//!   until close, as QEMU does with all of them);
//! - a bitmap found `in_use` was not saved by its last writer: it is inconsistent, kept as it
//!   is, reported, and can only be removed (QEMU's rules);
//! - [`Meta::close`](super::meta::Meta::close) writes each changed bitmap to new clusters,
//!   then its new table, then a new directory without `in_use`, syncs, switches the header's
//!   extension to it, syncs, and frees the old clusters afterwards (meta.rs's rules 1 and 3).
//!   A crash before the switch leaves the old directory with `in_use` set: those bitmaps are
//!   then inconsistent, as in QEMU; `qemu-img check` finds at most leaked clusters.
//!
//! Directory updates never overwrite the live directory (QEMU rewrites it in place with the
//! autoclear bit cleared meanwhile, so a crash there loses every bitmap): the new directory
//! goes to new clusters and only the 24 bytes of the extension change in the header.
//!
//! Hostile images: the extension, the directory and every table are checked against QEMU's
//! limits and the file's size before anything is allocated from them; a bitmap in memory is
//! bounded by QEMU's limit (512 MiB) and all of an image's by
//! [`crate::OpenOptions::bitmap_memory_limit`]; chunks of a bitmap are allocated only when a
//! bit in them is set.

use std::collections::HashSet;

use xdisk_io::Storage;

use super::format::{self, autoclear, ext, Header};
use super::meta::{corrupt, decode_table, encode_table, HostCluster, Meta};
use crate::{Error, Result};

/// QEMU's limit on the number of bitmaps of an image (QCOW2_MAX_BITMAPS).
pub const MAX_BITMAPS: u32 = 65535;
/// QEMU's limit on the size of the bitmap directory (QCOW2_MAX_BITMAP_DIRECTORY_SIZE).
pub const MAX_DIRECTORY_BYTES: u64 = 1024 * 65535;
/// QEMU's limit on a bitmap's name, in bytes.
pub const MAX_NAME_BYTES: usize = 1023;
/// QEMU's limit on the entries of a bitmap table (BME_MAX_TABLE_SIZE).
pub const MAX_TABLE_ENTRIES: u64 = 0x800_0000;
/// QEMU's limit on the data of one bitmap (BME_MAX_PHYS_SIZE: table entries times the
/// cluster size), which also bounds the bitmap in memory.
pub const MAX_BITMAP_BYTES: u64 = 0x2000_0000;
/// Smallest granularity QEMU supports (`1 << 9` = 512 bytes per bit).
pub const MIN_GRANULARITY_BITS: u32 = 9;
/// Largest granularity QEMU supports (`1 << 31` bytes per bit).
pub const MAX_GRANULARITY_BITS: u32 = 31;

/// Flags of a bitmap directory entry.
pub mod flags {
    /// Bit 0: the bitmap was not saved correctly and may be inconsistent.
    pub const IN_USE: u32 = 1 << 0;
    /// Bit 1: the bitmap is enabled: it must reflect every change of the virtual disk.
    pub const AUTO: u32 = 1 << 1;
    /// Bit 2: the bitmap may be used although its extra data is unknown (which is kept).
    pub const EXTRA_DATA_COMPATIBLE: u32 = 1 << 2;
    /// Every flag the spec defines.
    pub const KNOWN: u32 = IN_USE | AUTO | EXTRA_DATA_COMPATIBLE;
}

/// Type 1, the only one defined: a dirty tracking bitmap.
const TYPE_DIRTY_TRACKING: u8 = 1;
/// Bitmap table entry: bits 9-55 the data cluster's offset; bit 0 (with offset 0): all ones.
const ENTRY_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Reserved bits of a bitmap table entry: 1-8 and 56-63.
const ENTRY_RESERVED_MASK: u64 = 0xff00_0000_0000_01fe;
const ENTRY_ALL_ONES: u64 = 1;
/// Bytes of the bitmaps extension's data.
const EXT_LEN: usize = 24;
/// Bytes of a directory entry before its extra data and name.
const ENTRY_HEADER: u64 = 24;

fn be32(b: &[u8], off: usize) -> u32 {
    u32::from_be_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}
fn be64(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_be_bytes(a)
}

/// The data of the bitmaps extension (qcow2.txt, "Bitmaps extension").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BitmapsExt {
    /// Number of bitmaps (1 to [`MAX_BITMAPS`]).
    pub nb_bitmaps: u32,
    /// Bytes of the bitmap directory (all its entries).
    pub dir_size: u64,
    /// File offset of the bitmap directory (cluster-aligned).
    pub dir_offset: u64,
}

impl BitmapsExt {
    /// Parses and checks the extension's data (QEMU's checks: exact length, reserved field
    /// zero, 1 to 65535 bitmaps, an aligned directory of bounded size).
    pub fn parse(data: &[u8], cluster_size: u64) -> Result<BitmapsExt> {
        if data.len() != EXT_LEN {
            return Err(corrupt(format!(
                "the bitmaps extension has {} bytes, not {EXT_LEN}",
                data.len()
            )));
        }
        let e = BitmapsExt {
            nb_bitmaps: be32(data, 0),
            dir_size: be64(data, 8),
            dir_offset: be64(data, 16),
        };
        if be32(data, 4) != 0 {
            return Err(corrupt(
                "the bitmaps extension's reserved field is not zero",
            ));
        }
        if e.nb_bitmaps == 0 || e.nb_bitmaps > MAX_BITMAPS {
            return Err(corrupt(format!(
                "the bitmaps extension counts {} bitmaps (1 to {MAX_BITMAPS} allowed)",
                e.nb_bitmaps
            )));
        }
        if e.dir_offset == 0 || !e.dir_offset.is_multiple_of(cluster_size) {
            return Err(corrupt(format!(
                "the bitmap directory offset {:#x} is not cluster-aligned",
                e.dir_offset
            )));
        }
        if e.dir_size == 0 || e.dir_size > MAX_DIRECTORY_BYTES {
            return Err(corrupt(format!(
                "the bitmap directory size {} is out of range (1 to {MAX_DIRECTORY_BYTES})",
                e.dir_size
            )));
        }
        Ok(e)
    }

    /// The extension's 24 bytes.
    pub fn encode(&self) -> [u8; EXT_LEN] {
        let mut b = [0u8; EXT_LEN];
        b[0..4].copy_from_slice(&self.nb_bitmaps.to_be_bytes());
        b[8..16].copy_from_slice(&self.dir_size.to_be_bytes());
        b[16..24].copy_from_slice(&self.dir_offset.to_be_bytes());
        b
    }
}

/// One bitmap directory entry (qcow2.txt, "Bitmap directory").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirEntry {
    /// File offset of the bitmap table (cluster-aligned).
    pub table_offset: u64,
    /// Entries of the bitmap table.
    pub table_size: u32,
    /// [`flags`].
    pub flags: u32,
    /// The bitmap type (1: dirty tracking).
    pub kind: u8,
    /// The granularity is `1 << granularity_bits` bytes per bit.
    pub granularity_bits: u8,
    /// The name (bytes as stored; not NUL-terminated).
    pub name: Vec<u8>,
    /// Type-specific extra data (none is defined), kept as found.
    pub extra: Vec<u8>,
}

impl DirEntry {
    /// Bytes of the entry in the directory (padded to a multiple of 8).
    pub fn size(&self) -> u64 {
        (ENTRY_HEADER + self.extra.len() as u64 + self.name.len() as u64).next_multiple_of(8)
    }

    /// The name for messages.
    pub fn display_name(&self) -> String {
        String::from_utf8_lossy(&self.name).into_owned()
    }
}

/// Parses `nb` directory entries that must fill `buf` exactly (QEMU: "Broken bitmap
/// directory", "More/Less bitmaps found than specified in header extension").
pub fn parse_directory(buf: &[u8], nb: u32) -> Result<Vec<DirEntry>> {
    let mut out = Vec::with_capacity(nb.min(1024) as usize);
    let mut pos = 0u64;
    let len = buf.len() as u64;
    for i in 0..nb {
        if pos + ENTRY_HEADER > len {
            return Err(corrupt(format!(
                "bitmap directory entry {i} lies past the directory's end"
            )));
        }
        let p = pos as usize;
        let name_size = u64::from(u16::from_be_bytes([buf[p + 18], buf[p + 19]]));
        let extra_size = u64::from(be32(buf, p + 20));
        let end = pos + ENTRY_HEADER + extra_size + name_size;
        if end > len {
            return Err(corrupt(format!(
                "bitmap directory entry {i} lies past the directory's end"
            )));
        }
        let extra_start = p + ENTRY_HEADER as usize;
        let name_start = extra_start + extra_size as usize;
        out.push(DirEntry {
            table_offset: be64(buf, p),
            table_size: be32(buf, p + 8),
            flags: be32(buf, p + 12),
            kind: buf[p + 16],
            granularity_bits: buf[p + 17],
            extra: buf[extra_start..name_start].to_vec(),
            name: buf[name_start..end as usize].to_vec(),
        });
        pos = end.next_multiple_of(8);
    }
    if pos != len {
        return Err(corrupt(format!(
            "the bitmap directory has {len} bytes, but its {nb} entries take {pos}"
        )));
    }
    Ok(out)
}

/// Serialises directory entries (each padded with zeroes to a multiple of 8).
pub fn encode_directory(entries: &[DirEntry]) -> Vec<u8> {
    let mut b = Vec::with_capacity(entries.iter().map(|e| e.size() as usize).sum());
    for e in entries {
        b.extend_from_slice(&e.table_offset.to_be_bytes());
        b.extend_from_slice(&e.table_size.to_be_bytes());
        b.extend_from_slice(&e.flags.to_be_bytes());
        b.push(e.kind);
        b.push(e.granularity_bits);
        b.extend_from_slice(&(e.name.len() as u16).to_be_bytes());
        b.extend_from_slice(&(e.extra.len() as u32).to_be_bytes());
        b.extend_from_slice(&e.extra);
        b.extend_from_slice(&e.name);
        b.resize(b.len().next_multiple_of(8), 0);
    }
    b
}

/// Entries of the bitmap table of a bitmap of `size` virtual bytes at granularity
/// `1 << gran_bits` in an image with `1 << cluster_bits`-byte clusters (one entry per
/// cluster of bitmap data).
pub fn table_entries_for(size: u64, gran_bits: u32, cluster_bits: u32) -> u64 {
    size.div_ceil(1 << gran_bits)
        .div_ceil(1 << (cluster_bits + 3))
}

/// Bytes of bitmap data for `size` virtual bytes at granularity `1 << gran_bits`.
pub fn bitmap_bytes_for(size: u64, gran_bits: u32) -> u64 {
    size.div_ceil(1 << gran_bits).div_ceil(8)
}

/// QEMU's constraints on an entry (its `check_dir_entry`, plus the exact table size its
/// load demands of a consistent bitmap) and the file's bounds.
fn check_entry(e: &DirEntry, cluster_bits: u32, size: u64, file_len: u64) -> Result<()> {
    let cs = 1u64 << cluster_bits;
    let bad = |why: String| corrupt(format!("bitmap '{}': {why}", e.display_name()));
    if e.name.is_empty() || e.name.len() > MAX_NAME_BYTES {
        return Err(bad(format!(
            "name of {} bytes (1 to {MAX_NAME_BYTES} allowed)",
            e.name.len()
        )));
    }
    if e.kind != TYPE_DIRTY_TRACKING {
        return Err(bad(format!(
            "type {} (only 1, dirty tracking, is defined)",
            e.kind
        )));
    }
    let g = u32::from(e.granularity_bits);
    if !(MIN_GRANULARITY_BITS..=MAX_GRANULARITY_BITS).contains(&g) {
        return Err(bad(format!(
            "granularity bits {g} out of range ({MIN_GRANULARITY_BITS} to {MAX_GRANULARITY_BITS})"
        )));
    }
    if e.flags & !flags::KNOWN != 0 {
        return Err(bad(format!("reserved flags set ({:#x})", e.flags)));
    }
    let n = u64::from(e.table_size);
    if n == 0 || n > MAX_TABLE_ENTRIES || e.table_offset == 0 || !e.table_offset.is_multiple_of(cs)
    {
        return Err(bad(format!(
            "invalid bitmap table ({n} entries at {:#x})",
            e.table_offset
        )));
    }
    if n * cs > MAX_BITMAP_BYTES {
        return Err(bad(format!(
            "{} bytes of bitmap data, over QEMU's limit of {MAX_BITMAP_BYTES}",
            n * cs
        )));
    }
    if e.table_offset
        .checked_add(n * 8)
        .is_none_or(|end| end > file_len)
    {
        return Err(bad(format!(
            "the bitmap table at {:#x} lies past the end of the file",
            e.table_offset
        )));
    }
    if e.flags & flags::IN_USE == 0 {
        // A bitmap saved correctly has the table its size needs (an inconsistent one may
        // have the size from before a resize).
        let need = table_entries_for(size, g, cluster_bits);
        if n != need {
            return Err(bad(format!(
                "its table has {n} entries, the image's virtual size needs {need}"
            )));
        }
    }
    Ok(())
}

/// Checks a bitmap table entry (reserved bits, alignment, inside the file); returns the data
/// cluster's offset (0: none).
fn check_table_entry(raw: u64, cs: u64, file_len: u64) -> Result<u64> {
    let off = raw & ENTRY_OFFSET_MASK;
    if raw & ENTRY_RESERVED_MASK != 0
        || (off != 0 && raw & ENTRY_ALL_ONES != 0)
        || !off.is_multiple_of(cs)
    {
        return Err(corrupt(format!("invalid bitmap table entry {raw:#x}")));
    }
    if off != 0 && off >= file_len {
        return Err(corrupt(format!(
            "bitmap data cluster {off:#x} lies past the end of the file"
        )));
    }
    Ok(off)
}

/// Names the bitmap in a corruption message.
fn in_bitmap(name: &str, e: Error) -> Error {
    match e {
        Error::Corrupt(m) => corrupt(format!("bitmap '{name}': {m}")),
        other => other,
    }
}

// ---- bitmaps in memory ------------------------------------------------------------------

/// A dirty bitmap in memory: one bit per [`DirtyBitmap::granularity`] bytes of a virtual disk
/// of [`DirtyBitmap::size`] bytes. Kept in chunks of one bitmap data cluster each, allocated
/// when a bit in them is first set (a clean bitmap costs one pointer per cluster of data).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirtyBitmap {
    size: u64,
    gran_bits: u32,
    /// log2 of the bits per chunk (cluster_bits + 3).
    chunk_bits: u32,
    chunks: Vec<Option<Box<[u64]>>>,
}

/// What a chunk of a bitmap holds, for its table entry.
enum ChunkState<'a> {
    Zero,
    Ones,
    Data(&'a [u64]),
}

impl DirtyBitmap {
    /// A clean bitmap. `cluster_bits` sets the chunk size (one cluster of bitmap data).
    pub fn new(size: u64, gran_bits: u32, cluster_bits: u32) -> Result<DirtyBitmap> {
        let mut b = DirtyBitmap {
            size: 0,
            gran_bits,
            chunk_bits: cluster_bits + 3,
            chunks: Vec::new(),
        };
        b.resize(size)?;
        Ok(b)
    }

    /// Bytes of the virtual disk one bit stands for.
    pub fn granularity(&self) -> u64 {
        1 << self.gran_bits
    }

    /// Bytes of the virtual disk the bitmap covers.
    pub fn size(&self) -> u64 {
        self.size
    }

    fn nbits(&self) -> u64 {
        self.size.div_ceil(1 << self.gran_bits)
    }

    fn words_per_chunk(&self) -> usize {
        1 << (self.chunk_bits - 6)
    }

    /// Marks `[offset, offset + len)` dirty (clipped to the size).
    #[inline]
    pub fn set_range(&mut self, offset: u64, len: u64) {
        if len == 0 || offset >= self.size {
            return;
        }
        let end = offset.saturating_add(len).min(self.size);
        let (first, last) = (offset >> self.gran_bits, (end - 1) >> self.gran_bits);
        if first == last {
            // The common case of a write within one granule: one bit.
            let ci = (first >> self.chunk_bits) as usize;
            let i = first & ((1 << self.chunk_bits) - 1);
            let wpc = self.words_per_chunk();
            if let Some(slot) = self.chunks.get_mut(ci) {
                let words = slot.get_or_insert_with(|| vec![0u64; wpc].into_boxed_slice());
                words[(i / 64) as usize] |= 1 << (i % 64);
            }
            return;
        }
        self.set_bits(first, last + 1);
    }

    /// Sets bits `[from, to)` (`to` at most nbits).
    fn set_bits(&mut self, from: u64, to: u64) {
        let wpc = self.words_per_chunk();
        let mut b = from;
        while b < to {
            let ci = (b >> self.chunk_bits) as usize;
            let base = (ci as u64) << self.chunk_bits;
            let chunk_end = (base + (1 << self.chunk_bits)).min(to);
            let Some(slot) = self.chunks.get_mut(ci) else {
                return;
            };
            let words = slot.get_or_insert_with(|| vec![0u64; wpc].into_boxed_slice());
            set_word_bits(words, b - base, chunk_end - base);
            b = chunk_end;
        }
    }

    /// Whether the byte at `offset` is marked dirty.
    pub fn is_dirty(&self, offset: u64) -> bool {
        if offset >= self.size {
            return false;
        }
        let bit = offset >> self.gran_bits;
        let ci = (bit >> self.chunk_bits) as usize;
        let i = bit - ((ci as u64) << self.chunk_bits);
        self.chunks
            .get(ci)
            .and_then(|c| c.as_ref())
            .is_some_and(|w| w[(i / 64) as usize] & (1 << (i % 64)) != 0)
    }

    /// Whether the byte at `offset` is dirty, and how many bytes from `offset` on (at most
    /// `max`, clipped to the size) are in that same state: the first run of a block status
    /// query (an NBD `qemu:dirty-bitmap:` context). `(false, 0)` past the end. Clean
    /// chunks and words of all-equal bits are skipped whole.
    pub fn run_at(&self, offset: u64, max: u64) -> (bool, u64) {
        if offset >= self.size || max == 0 {
            return (false, 0);
        }
        let end = offset.saturating_add(max).min(self.size);
        let dirty = self.is_dirty(offset);
        let last = (end - 1) >> self.gran_bits;
        let mut bit = offset >> self.gran_bits;
        loop {
            bit += 1;
            if bit > last {
                return (dirty, end - offset);
            }
            let ci = (bit >> self.chunk_bits) as usize;
            let i = bit - ((ci as u64) << self.chunk_bits);
            match self.chunks.get(ci) {
                None => return (dirty, end - offset),
                Some(None) if dirty => break,
                Some(None) => {
                    // A clean chunk: on to the next one.
                    bit = (((ci as u64) + 1) << self.chunk_bits) - 1;
                }
                Some(Some(words)) => {
                    let w = words[(i / 64) as usize];
                    if i.is_multiple_of(64) && ((w == 0 && !dirty) || (w == u64::MAX && dirty)) {
                        bit += 63;
                        continue;
                    }
                    if ((w >> (i % 64)) & 1 != 0) != dirty {
                        break;
                    }
                }
            }
        }
        (dirty, ((bit << self.gran_bits).min(end)) - offset)
    }

    /// The dirty byte ranges `(offset, len)`, merged, in order, clipped to the size.
    pub fn dirty_ranges(&self) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        for (ci, c) in self.chunks.iter().enumerate() {
            let Some(words) = c else {
                continue;
            };
            let base = (ci as u64) << self.chunk_bits;
            for (wi, &w) in words.iter().enumerate() {
                let mut w = w;
                while w != 0 {
                    let start = u64::from(w.trailing_zeros());
                    let run = u64::from((w >> start).trailing_ones());
                    let first = base + wi as u64 * 64 + start;
                    let off = first << self.gran_bits;
                    let end = ((first + run) << self.gran_bits).min(self.size);
                    match out.last_mut() {
                        Some((o, l)) if *o + *l == off => *l = end - *o,
                        _ => out.push((off, end - off)),
                    }
                    w = if start + run >= 64 {
                        0
                    } else {
                        w & !(((1u64 << run) - 1) << start)
                    };
                }
            }
        }
        out
    }

    /// Bytes of the virtual disk marked dirty (QEMU's "count").
    pub fn dirty_bytes(&self) -> u64 {
        self.dirty_ranges().iter().map(|r| r.1).sum()
    }

    /// Marks everything clean.
    pub fn clear(&mut self) {
        for c in &mut self.chunks {
            *c = None;
        }
    }

    /// Marks dirty every range `other` has dirty (any granularity; ranges past this
    /// bitmap's size are ignored).
    pub fn merge(&mut self, other: &DirtyBitmap) {
        for (off, len) in other.dirty_ranges() {
            self.set_range(off, len);
        }
    }

    /// Changes the size: bits past a smaller size are dropped, a larger size adds clean
    /// bits (as QEMU's truncate does).
    pub fn resize(&mut self, size: u64) -> Result<()> {
        let nbits = size.div_ceil(1 << self.gran_bits);
        let n = usize::try_from(nbits.div_ceil(1 << self.chunk_bits))
            .map_err(|_| Error::NoSpace("a bitmap too large for this host".into()))?;
        if n > self.chunks.len() {
            self.chunks
                .try_reserve_exact(n - self.chunks.len())
                .map_err(|_| Error::NoSpace("no memory for a dirty bitmap".into()))?;
        }
        self.chunks.resize_with(n, || None);
        self.size = size;
        // Bits past the end of the last chunk's used part must be zero ("unused tail bits").
        if let Some(Some(words)) = self.chunks.last_mut() {
            let base = ((n as u64) - 1) << self.chunk_bits;
            clear_word_bits(words, nbits - base);
        }
        Ok(())
    }

    fn chunk_count(&self) -> usize {
        self.chunks.len()
    }

    fn chunk_state(&self, i: usize) -> ChunkState<'_> {
        let Some(Some(words)) = self.chunks.get(i) else {
            return ChunkState::Zero;
        };
        if words.iter().all(|&w| w == 0) {
            return ChunkState::Zero;
        }
        let base = (i as u64) << self.chunk_bits;
        let full_chunk = base + (1 << self.chunk_bits) <= self.nbits();
        if full_chunk && words.iter().all(|&w| w == u64::MAX) {
            return ChunkState::Ones;
        }
        ChunkState::Data(words)
    }

    /// Loads chunk `i` from a cluster of bitmap data (bits past the size are ignored).
    fn load_chunk(&mut self, i: usize, bytes: &[u8]) {
        let wpc = self.words_per_chunk();
        let mut words = vec![0u64; wpc].into_boxed_slice();
        for (w, b) in words.iter_mut().zip(bytes.chunks_exact(8)) {
            let mut a = [0u8; 8];
            a.copy_from_slice(b);
            *w = u64::from_le_bytes(a);
        }
        let base = (i as u64) << self.chunk_bits;
        let used = (self.nbits() - base).min(1 << self.chunk_bits);
        clear_word_bits(&mut words, used);
        if let Some(slot) = self.chunks.get_mut(i) {
            *slot = words.iter().any(|&w| w != 0).then_some(words);
        }
    }

    /// Sets every bit of chunk `i` (an all-ones table entry).
    fn fill_chunk(&mut self, i: usize) {
        let base = (i as u64) << self.chunk_bits;
        let end = (base + (1 << self.chunk_bits)).min(self.nbits());
        self.set_bits(base, end);
    }
}

/// Sets bits `[from, to)` of `words`.
fn set_word_bits(words: &mut [u64], from: u64, to: u64) {
    let mut i = from;
    while i < to {
        let bit = i % 64;
        let n = (64 - bit).min(to - i);
        let mask = if n == 64 {
            u64::MAX
        } else {
            ((1u64 << n) - 1) << bit
        };
        words[(i / 64) as usize] |= mask;
        i += n;
    }
}

/// Clears every bit from `from` on.
fn clear_word_bits(words: &mut [u64], from: u64) {
    let first = (from / 64) as usize;
    if first >= words.len() {
        return;
    }
    let keep = from % 64;
    words[first] &= if keep == 0 { 0 } else { (1u64 << keep) - 1 };
    for w in &mut words[first + 1..] {
        *w = 0;
    }
}

/// Little-endian bytes of a chunk: bit `i` is bit `i % 8` of byte `i / 8` (qcow2.txt, "Bitmap
/// data"), padded with zeroes to `len`.
fn chunk_bytes(words: &[u64], len: usize) -> Vec<u8> {
    let mut b = Vec::with_capacity(len);
    for w in words {
        b.extend_from_slice(&w.to_le_bytes());
    }
    b.resize(len, 0);
    b
}

// ---- what an open image knows of its bitmaps --------------------------------------------

/// A bitmap as `xdisk img info` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BitmapInfo {
    /// The name (lossily decoded if it is not UTF-8).
    pub name: String,
    /// Bytes per bit.
    pub granularity: u64,
    /// The `in_use` flag as the file has it now: set on an inconsistent bitmap, and on the
    /// enabled bitmaps of an image open for writing.
    pub in_use: bool,
    /// The `auto` flag: the bitmap is enabled (records writes).
    pub auto: bool,
    /// Found `in_use` when the image was opened: its last writer did not save it, so it is
    /// not trusted (it can only be removed).
    pub inconsistent: bool,
}

/// Where a bitmap lies on disk now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct OnDisk {
    pub table_offset: u64,
    pub table_size: u32,
    pub flags: u32,
}

/// One bitmap of an open image.
#[derive(Debug)]
pub(crate) struct Bitmap {
    pub name: Vec<u8>,
    pub gran_bits: u32,
    /// Records writes (the `auto` flag it is stored with next).
    pub enabled: bool,
    /// Found `in_use` at open: never loaded, tracked or rewritten; only removed.
    pub inconsistent: bool,
    /// The `extra_data_compatible` flag and the extra data, kept as found.
    pub extra_flags: u32,
    pub extra: Vec<u8>,
    /// Its place on disk (`None`: added and not stored yet).
    pub disk: Option<OnDisk>,
    /// The bits, when loaded (enabled bitmaps of a writable image, bitmaps an operation
    /// changed).
    pub bits: Option<DirtyBitmap>,
    /// The bits (or the size) differ from the table on disk: the next store that clears
    /// `in_use` writes them.
    pub changed: bool,
    /// Kept `in_use` on disk until close even if disabled (after a resize the table on disk
    /// has the old size).
    pub pin_in_use: bool,
}

impl Bitmap {
    /// Whether writes set its bits.
    pub fn tracked(&self) -> bool {
        self.enabled && !self.inconsistent && self.bits.is_some()
    }

    fn info(&self) -> BitmapInfo {
        BitmapInfo {
            name: String::from_utf8_lossy(&self.name).into_owned(),
            granularity: 1 << self.gran_bits,
            in_use: self.disk.is_some_and(|d| d.flags & flags::IN_USE != 0),
            auto: self.enabled,
            inconsistent: self.inconsistent,
        }
    }
}

/// The bitmaps of an open image (in [`Meta`], under its lock).
#[derive(Debug, Default)]
pub(crate) struct Bitmaps {
    /// In directory order.
    pub list: Vec<Bitmap>,
    /// The extension as the header holds it now (`None`: the header has none).
    pub ext: Option<BitmapsExt>,
    /// File offset of the extension's 24 bytes in the header, for updates in place.
    pub ext_pos: Option<u64>,
    /// Some bitmap is tracked: writes set bits.
    pub tracking: bool,
    /// Every tracked bitmap is marked `in_use` on disk (false once close stored them: the
    /// next write marks them again first).
    pub armed: bool,
    /// Places of removed bitmaps, freed by the next store.
    pub removed: Vec<OnDisk>,
    /// Bound on the bytes of all loaded bitmaps.
    pub memory_limit: u64,
    /// The image is open writable (bitmaps can be loaded and changed).
    pub writable: bool,
}

impl Bitmaps {
    /// Sets the bits of `[offset, offset + len)` in every tracked bitmap.
    #[inline]
    pub fn set_dirty(&mut self, offset: u64, len: u64) {
        for b in &mut self.list {
            if b.enabled && !b.inconsistent {
                if let Some(bits) = &mut b.bits {
                    bits.set_range(offset, len);
                    b.changed = true;
                }
            }
        }
    }

    fn update_tracking(&mut self) {
        self.tracking = self.list.iter().any(Bitmap::tracked);
    }

    fn find(&self, name: &str) -> Result<usize> {
        self.list
            .iter()
            .position(|b| b.name == name.as_bytes())
            .ok_or_else(|| Error::InvalidArgument(format!("Dirty bitmap '{name}' not found")))
    }

    fn memory_in_use(&self) -> u64 {
        self.list
            .iter()
            .filter_map(|b| b.bits.as_ref())
            .map(|b| bitmap_bytes_for(b.size(), b.gran_bits))
            .sum()
    }

    /// The public view of every bitmap.
    pub fn infos(&self) -> Vec<BitmapInfo> {
        self.list.iter().map(Bitmap::info).collect()
    }
}

/// What the open found of the bitmaps, before the metadata state exists.
#[derive(Debug, Default)]
pub(crate) struct Found {
    pub list: Vec<Bitmap>,
    pub ext: Option<BitmapsExt>,
    pub ext_pos: Option<u64>,
    /// Byte ranges of the file the bitmaps reference (directory, tables, data clusters):
    /// for the refcount rebuild of a dirty image and the allocator's guard. Only collected
    /// for writable opens.
    pub ranges: Vec<(u64, u64)>,
}

/// Whether the header's bitmaps extension is consistent (present, version 3, autoclear bit 0
/// set); a present extension that is not is stale.
pub(crate) fn ext_consistent(hdr: &Header) -> bool {
    hdr.has_bitmaps && hdr.version >= 3 && hdr.autoclear_features & autoclear::BITMAPS != 0
}

fn ext_data(hdr: &Header) -> Option<&[u8]> {
    hdr.unknown_extensions
        .iter()
        .find(|(t, _)| *t == ext::BITMAPS)
        .map(|(_, d)| &d[..])
}

/// Puts `e` into the header's extensions (replacing any), or removes the extension.
pub(crate) fn set_ext(hdr: &mut Header, e: Option<BitmapsExt>) {
    hdr.unknown_extensions.retain(|(t, _)| *t != ext::BITMAPS);
    hdr.has_bitmaps = e.is_some();
    if let Some(e) = e {
        hdr.unknown_extensions
            .push((ext::BITMAPS, e.encode().to_vec()));
    }
}

/// Reads the bitmap directory of a consistent extension and checks it (and, for a writable
/// open, every bitmap table: `ranges` then lists every cluster the bitmaps use). `head` is
/// the header cluster as read (to find the extension for updates in place).
pub(crate) fn read_bitmaps(
    file: &dyn Storage,
    hdr: &Header,
    head: &[u8],
    file_len: u64,
    writable: bool,
) -> Result<Found> {
    let mut found = Found::default();
    if !ext_consistent(hdr) {
        return Ok(found);
    }
    let Some(data) = ext_data(hdr) else {
        return Ok(found);
    };
    let cs = hdr.cluster_size();
    let cb = hdr.cluster_bits;
    let e = BitmapsExt::parse(data, cs)?;
    if e.dir_offset
        .checked_add(e.dir_size)
        .is_none_or(|end| end > file_len)
    {
        return Err(corrupt(format!(
            "the bitmap directory at {:#x}+{:#x} lies past the end of the file",
            e.dir_offset, e.dir_size
        )));
    }
    let mut dir = vec![0u8; e.dir_size as usize];
    file.read_at(&mut dir, e.dir_offset).map_err(|err| {
        Error::io(
            format!("cannot read the bitmap directory of {}", file.name()),
            err,
        )
    })?;
    let entries = parse_directory(&dir, e.nb_bitmaps)?;
    let mut names = HashSet::new();
    for d in &entries {
        check_entry(d, cb, hdr.size, file_len)?;
        if !names.insert(&d.name[..]) {
            return Err(corrupt(format!(
                "two bitmaps are named '{}'",
                d.display_name()
            )));
        }
        if writable
            && !d.extra.is_empty()
            && d.flags & flags::EXTRA_DATA_COMPATIBLE == 0
            && d.flags & flags::IN_USE == 0
        {
            // "If it is not set, the bitmap must not be used, but both it and its extra data
            // be left as is": it could not be kept up to date.
            return Err(Error::Unsupported(format!(
                "writing to an image whose bitmap '{}' has extra data xdisk does not know \
                 (and not marked compatible); open it read-only",
                d.display_name()
            )));
        }
    }
    if writable {
        found.ranges = bitmap_ranges(file, &e, &entries, cs, file_len)?;
    }
    found.list = entries
        .into_iter()
        .map(|d| Bitmap {
            gran_bits: u32::from(d.granularity_bits),
            enabled: d.flags & flags::AUTO != 0,
            inconsistent: d.flags & flags::IN_USE != 0,
            extra_flags: d.flags & flags::EXTRA_DATA_COMPATIBLE,
            disk: Some(OnDisk {
                table_offset: d.table_offset,
                table_size: d.table_size,
                flags: d.flags,
            }),
            name: d.name,
            extra: d.extra,
            bits: None,
            changed: false,
            pin_in_use: false,
        })
        .collect();
    found.ext = Some(e);
    found.ext_pos = format::extension_offset(head, hdr, ext::BITMAPS).map(|p| p as u64);
    Ok(found)
}

/// Every cluster the bitmaps reference, as byte ranges: the directory, each table, each data
/// cluster. Bounded by the file: the tables together (intact ones never overlap) and the
/// data clusters must fit in it, and no cluster may serve twice.
fn bitmap_ranges(
    file: &dyn Storage,
    e: &BitmapsExt,
    entries: &[DirEntry],
    cs: u64,
    file_len: u64,
) -> Result<Vec<(u64, u64)>> {
    let file_clusters = file_len.div_ceil(cs);
    let table_total = entries
        .iter()
        .map(|d| (u64::from(d.table_size) * 8).next_multiple_of(cs))
        .fold(0u64, u64::saturating_add);
    if table_total > file_len {
        return Err(corrupt(format!(
            "the bitmap tables take {table_total} bytes, more than the whole file: they overlap"
        )));
    }
    let mut ranges = vec![(e.dir_offset, e.dir_size)];
    let mut data = 0u64;
    for d in entries {
        let bytes = u64::from(d.table_size) * 8;
        ranges.push((d.table_offset, bytes));
        let mut buf = vec![0u8; bytes as usize];
        file.read_at(&mut buf, d.table_offset).map_err(|err| {
            Error::io(
                format!("cannot read a bitmap table of {}", file.name()),
                err,
            )
        })?;
        for raw in decode_table(&buf) {
            let off = check_table_entry(raw, cs, file_len)
                .map_err(|err| in_bitmap(&d.display_name(), err))?;
            if off != 0 {
                data += 1;
                if data > file_clusters {
                    return Err(corrupt(
                        "the bitmaps name more data clusters than the file has",
                    ));
                }
                ranges.push((off, cs));
            }
        }
    }
    // No cluster may serve twice (freeing one bitmap would free another's).
    let mut clusters: Vec<u64> = Vec::new();
    for &(off, len) in &ranges {
        let first = off / cs;
        clusters.extend(first..(off + len).div_ceil(cs));
    }
    clusters.sort_unstable();
    if clusters.windows(2).any(|w| w[0] == w[1]) {
        return Err(corrupt(
            "two bitmap structures share a cluster (directory, tables or data)",
        ));
    }
    Ok(ranges)
}

// ---- the metadata state's side ----------------------------------------------------------

/// What a store of the bitmap directory leaves on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Store {
    /// While open: the tracked (and pinned) bitmaps marked `in_use`, other changed bitmaps
    /// written.
    InUse,
    /// At close: every changed bitmap written, no `in_use` flag but the inconsistent ones'.
    Final,
}

impl Meta {
    /// Takes what the open found: registers the bitmaps' clusters as metadata and, for a
    /// writable image, loads the enabled bitmaps and marks them `in_use` on disk.
    pub(crate) fn attach_bitmaps(
        &mut self,
        found: Found,
        writable: bool,
        memory_limit: u64,
    ) -> Result<()> {
        self.bitmaps = Bitmaps {
            list: found.list,
            ext: found.ext,
            ext_pos: found.ext_pos,
            memory_limit,
            writable,
            ..Bitmaps::default()
        };
        if !writable {
            return Ok(());
        }
        let mut clusters = Vec::new();
        for (off, len) in found.ranges {
            for c in off >> self.cb..(off + len).div_ceil(self.cs) {
                if c == 0 || self.is_meta(c) {
                    return Err(corrupt(format!(
                        "a bitmap structure overlaps other metadata (host cluster {c:#x})"
                    )));
                }
                clusters.push(c);
            }
        }
        self.meta_set.extend(clusters);
        for i in 0..self.bitmaps.list.len() {
            let b = &self.bitmaps.list[i];
            if b.enabled && !b.inconsistent {
                self.load_bitmap(i)?;
            }
        }
        self.bitmaps.update_tracking();
        if self.bitmaps.tracking {
            self.store_bitmaps(Store::InUse)?;
        }
        Ok(())
    }

    /// Records a guest write (or write-zeroes, or discard) of `[offset, offset + len)` in the
    /// tracked bitmaps, before its data I/O. After close stored them, marks them `in_use`
    /// again first.
    #[inline]
    pub fn track_write(&mut self, offset: u64, len: u64) -> Result<()> {
        if self.bitmaps.tracking {
            if !self.bitmaps.armed {
                self.store_bitmaps(Store::InUse)?;
            }
            self.bitmaps.set_dirty(offset, len);
        }
        Ok(())
    }

    /// [`Meta::track_write`] for the fast path, which does no I/O: false when the bitmaps
    /// must first be marked `in_use` (the request then takes the slow path).
    #[inline]
    pub fn try_track_write(&mut self, offset: u64, len: u64) -> bool {
        if self.bitmaps.tracking {
            if !self.bitmaps.armed {
                return false;
            }
            self.bitmaps.set_dirty(offset, len);
        }
        true
    }

    /// Whether close has bitmaps to store.
    pub fn bitmaps_need_store(&self) -> bool {
        !self.bitmaps.removed.is_empty()
            || self.bitmaps.list.iter().any(|b| {
                !b.inconsistent
                    && (b.changed || b.disk.is_none_or(|d| d.flags & flags::IN_USE != 0))
            })
    }

    /// Loads bitmap `i`'s bits from its table (a no-op if loaded).
    fn load_bitmap(&mut self, i: usize) -> Result<()> {
        let b = &self.bitmaps.list[i];
        if b.bits.is_some() {
            return Ok(());
        }
        let name = String::from_utf8_lossy(&b.name).into_owned();
        if b.inconsistent {
            return Err(inconsistent(&name));
        }
        if !b.extra.is_empty() && b.extra_flags & flags::EXTRA_DATA_COMPATIBLE == 0 {
            return Err(Error::Unsupported(format!(
                "bitmap '{name}' has extra data xdisk does not know and may not be used"
            )));
        }
        let gran_bits = b.gran_bits;
        let disk = b.disk;
        let size = self.hdr.size;
        let need = bitmap_bytes_for(size, gran_bits);
        let used = self.bitmaps.memory_in_use();
        if used.saturating_add(need) > self.bitmaps.memory_limit {
            return Err(Error::Unsupported(format!(
                "the bitmaps of {} need more than {} MiB of memory (bitmap '{name}': {} KiB)",
                self.file.name(),
                self.bitmaps.memory_limit >> 20,
                need.div_ceil(1024)
            )));
        }
        let bits = self.read_bitmap(disk, size, gran_bits, &name)?;
        self.bitmaps.list[i].bits = Some(bits);
        Ok(())
    }

    /// Reads a bitmap's bits from its table on disk (`None`: a new bitmap, clean).
    fn read_bitmap(
        &self,
        disk: Option<OnDisk>,
        size: u64,
        gran_bits: u32,
        name: &str,
    ) -> Result<DirtyBitmap> {
        let mut bits = DirtyBitmap::new(size, gran_bits, self.cb)?;
        let Some(d) = disk else {
            return Ok(bits);
        };
        let n = u64::from(d.table_size);
        if n != bits.chunk_count() as u64 {
            return Err(corrupt(format!(
                "bitmap '{name}': its table has {n} entries, the image's virtual size needs {}",
                bits.chunk_count()
            )));
        }
        let mut t = vec![0u8; (n * 8) as usize];
        self.read_meta(&mut t, d.table_offset, "a bitmap table")?;
        let mut cluster = vec![0u8; self.cs as usize];
        for (i, raw) in decode_table(&t).into_iter().enumerate() {
            let off =
                check_table_entry(raw, self.cs, self.file_len).map_err(|e| in_bitmap(name, e))?;
            if off != 0 {
                // A cluster at the end of the file may be short: the rest reads as zeroes.
                let n = (self.file_len - off).min(self.cs) as usize;
                cluster[n..].fill(0);
                self.read_meta(&mut cluster[..n], off, "bitmap data")?;
                bits.load_chunk(i, &cluster);
            } else if raw & ENTRY_ALL_ONES != 0 {
                bits.fill_chunk(i);
            }
        }
        Ok(bits)
    }

    /// Writes a bitmap's data clusters and its table; returns the table's place. Every
    /// cluster allocated is added to `new`.
    fn write_bitmap(&mut self, bits: &DirtyBitmap, new: &mut Vec<u64>) -> Result<(u64, u32)> {
        let cs = self.cs as usize;
        let n = bits.chunk_count();
        let mut table = vec![0u64; n];
        for (i, entry) in table.iter_mut().enumerate() {
            match bits.chunk_state(i) {
                ChunkState::Zero => {}
                ChunkState::Ones => *entry = ENTRY_ALL_ONES,
                ChunkState::Data(words) => {
                    let bytes = chunk_bytes(words, cs);
                    let c = self.alloc_cluster()?;
                    new.push(c.0);
                    let off = c.0 << self.cb;
                    self.write_meta(&bytes, off, "bitmap data")?;
                    *entry = off;
                }
            }
        }
        let mut bytes = encode_table(&table);
        let off = self.alloc_meta(bytes.len() as u64, new)?;
        bytes.resize(bytes.len().next_multiple_of(cs), 0);
        self.write_meta(&bytes, off, "a bitmap table")?;
        Ok((off, n as u32))
    }

    /// Allocates clusters for `bytes` of metadata (contiguous); returns the byte offset.
    fn alloc_meta(&mut self, bytes: u64, new: &mut Vec<u64>) -> Result<u64> {
        let n = bytes.div_ceil(self.cs).max(1);
        let first = if n == 1 {
            self.alloc_cluster()?
        } else {
            self.alloc_contiguous(n)?
        };
        new.extend(first.0..first.0 + n);
        Ok(first.0 << self.cb)
    }

    /// Writes a new bitmap directory (and whatever bitmap data it needs first) and switches
    /// the header to it: data and tables, then the directory, then the refcounts, a sync,
    /// the header, a sync. The clusters it replaces are queued for freeing (applied by the
    /// next flush, after the switch is durable).
    pub(crate) fn store_bitmaps(&mut self, mode: Store) -> Result<()> {
        let mut new = Vec::new();
        match self.store_bitmaps_inner(mode, &mut new) {
            Ok(()) => {
                self.meta_set.extend(new);
                Ok(())
            }
            Err((e, switched)) => {
                if !switched {
                    // Nothing on disk references them.
                    for c in new {
                        self.release_unused(HostCluster(c));
                    }
                }
                Err(e)
            }
        }
    }

    /// The work of [`Meta::store_bitmaps`]; on error, whether the header switch was
    /// attempted (the new clusters may then be in use).
    fn store_bitmaps_inner(
        &mut self,
        mode: Store,
        new: &mut Vec<u64>,
    ) -> std::result::Result<(), (Error, bool)> {
        let early = |e| (e, false);
        let mut places: Vec<Option<OnDisk>> = Vec::with_capacity(self.bitmaps.list.len());
        let mut rewritten: Vec<usize> = Vec::new();
        for i in 0..self.bitmaps.list.len() {
            let b = &self.bitmaps.list[i];
            if b.inconsistent {
                places.push(b.disk);
                continue;
            }
            let in_use = mode == Store::InUse && (b.tracked() || b.pin_in_use);
            let rewrite = match b.disk {
                None => true,
                Some(_) => !in_use && b.changed,
            };
            let table = if rewrite {
                let bits = match self.bitmaps.list[i].bits.take() {
                    Some(bits) => bits,
                    None => {
                        return Err(early(corrupt(
                            "a changed bitmap has no bits in memory (internal error)",
                        )))
                    }
                };
                let r = self.write_bitmap(&bits, new);
                self.bitmaps.list[i].bits = Some(bits);
                rewritten.push(i);
                r.map_err(early)?
            } else {
                let d = b
                    .disk
                    .ok_or_else(|| early(corrupt("a bitmap without a table")))?;
                (d.table_offset, d.table_size)
            };
            let b = &self.bitmaps.list[i];
            let flags = if b.enabled { flags::AUTO } else { 0 }
                | if in_use { flags::IN_USE } else { 0 }
                | b.extra_flags;
            places.push(Some(OnDisk {
                table_offset: table.0,
                table_size: table.1,
                flags,
            }));
        }
        let mut entries = Vec::with_capacity(places.len());
        for (b, p) in self.bitmaps.list.iter().zip(&places) {
            let Some(p) = p else {
                return Err(early(corrupt("a bitmap without a table")));
            };
            entries.push(DirEntry {
                table_offset: p.table_offset,
                table_size: p.table_size,
                flags: p.flags,
                kind: TYPE_DIRTY_TRACKING,
                granularity_bits: b.gran_bits as u8,
                name: b.name.clone(),
                extra: b.extra.clone(),
            });
        }
        let new_ext = if entries.is_empty() {
            None
        } else {
            let dir = encode_directory(&entries);
            if dir.len() as u64 > MAX_DIRECTORY_BYTES {
                return Err(early(Error::InvalidArgument(
                    "Not enough space in the bitmap directory".into(),
                )));
            }
            let off = self.alloc_meta(dir.len() as u64, new).map_err(early)?;
            let mut padded = dir.clone();
            padded.resize(dir.len().next_multiple_of(self.cs as usize), 0);
            self.write_meta(&padded, off, "the bitmap directory")
                .map_err(early)?;
            Some(BitmapsExt {
                nb_bitmaps: entries.len() as u32,
                dir_size: dir.len() as u64,
                dir_offset: off,
            })
        };
        // Rules 1 and 2: the refcounts of everything just allocated and the bytes written
        // are durable before the header names them.
        self.write_dirty_refblocks().map_err(early)?;
        self.sync().map_err(early)?;
        self.switch_bitmaps_ext(new_ext).map_err(|e| (e, true))?;
        // The switch is durable: queue the frees of what the old directory referenced.
        let old_ext = std::mem::replace(&mut self.bitmaps.ext, new_ext);
        let mut frees: Vec<OnDisk> = std::mem::take(&mut self.bitmaps.removed);
        for &i in &rewritten {
            if let Some(d) = self.bitmaps.list[i].disk {
                frees.push(d);
            }
            self.bitmaps.list[i].changed = false;
        }
        for (b, p) in self.bitmaps.list.iter_mut().zip(places) {
            b.disk = p;
            if mode == Store::Final {
                b.pin_in_use = false;
            }
        }
        if let Some(e) = old_ext {
            self.free_meta_range(e.dir_offset, e.dir_size);
        }
        for d in frees {
            self.free_bitmap_clusters(d);
        }
        self.bitmaps.armed = mode == Store::InUse;
        Ok(())
    }

    /// Points the header at a new directory (`None`: no bitmaps any more) and syncs. An
    /// extension already in the header is updated in place (24 bytes, the autoclear bit set
    /// since the open); otherwise the header is rewritten with it, and the autoclear bit is
    /// set by a write of its own afterwards, so that a torn header never claims a consistent
    /// extension it does not hold. Removing the extension clears the bit first.
    fn switch_bitmaps_ext(&mut self, e: Option<BitmapsExt>) -> Result<()> {
        match (e, self.bitmaps.ext_pos) {
            (Some(e), Some(pos)) => {
                self.write_header_bytes(pos, &e.encode())?;
                self.sync()?;
                set_ext(&mut self.hdr, Some(e));
            }
            (Some(e), None) => {
                self.hdr.autoclear_features &= !autoclear::BITMAPS;
                set_ext(&mut self.hdr, Some(e));
                let head = self.rewrite_header()?;
                self.sync()?;
                self.hdr.autoclear_features |= autoclear::BITMAPS;
                self.write_header_bytes(88, &self.hdr.autoclear_features.to_be_bytes())?;
                self.sync()?;
                self.bitmaps.ext_pos =
                    format::extension_offset(&head, &self.hdr, ext::BITMAPS).map(|p| p as u64);
            }
            (None, _) => {
                if self.hdr.autoclear_features & autoclear::BITMAPS != 0 {
                    self.hdr.autoclear_features &= !autoclear::BITMAPS;
                    self.write_header_bytes(88, &self.hdr.autoclear_features.to_be_bytes())?;
                    self.sync()?;
                }
                if self.hdr.has_bitmaps {
                    set_ext(&mut self.hdr, None);
                    self.rewrite_header()?;
                    self.sync()?;
                }
                self.bitmaps.ext_pos = None;
            }
        }
        Ok(())
    }

    /// Changes the backing file link (`qemu-img rebase -u`): the header's backing file name
    /// and its "Backing file format name" extension, or neither. Everything written before
    /// is made durable first (a live stream copies the backing data up before the link
    /// goes), then the header cluster is rewritten in one write, as QEMU rewrites it
    /// (qcow2_update_header), and synced. On failure the header in memory is as before.
    pub(crate) fn set_backing(&mut self, name: Option<&str>, format: Option<&str>) -> Result<()> {
        self.flush()?;
        self.sync()?;
        let old = (
            self.hdr.backing_file.clone(),
            self.hdr.backing_format.clone(),
        );
        self.hdr.backing_file = name.map(str::to_owned);
        self.hdr.backing_format = format.map(str::to_owned);
        let head = match self.rewrite_header() {
            Ok(h) => h,
            Err(e) => {
                (self.hdr.backing_file, self.hdr.backing_format) = old;
                return Err(e);
            }
        };
        // The extensions after the backing format's moved with it.
        self.bitmaps.ext_pos = if self.bitmaps.ext_pos.is_some() {
            format::extension_offset(&head, &self.hdr, ext::BITMAPS).map(|p| p as u64)
        } else {
            None
        };
        self.sync()
    }

    /// Writes the whole header cluster from `hdr` (QEMU rewrites it the same way); returns
    /// the bytes written.
    fn rewrite_header(&mut self) -> Result<Vec<u8>> {
        let mut hdr = self.hdr.clone();
        let b = hdr.serialize()?;
        self.write_meta(&b, 0, "the header")?;
        self.hdr = hdr;
        Ok(b)
    }

    /// Queues the frees of a metadata range (no longer referenced once the header switch is
    /// durable).
    fn free_meta_range(&mut self, off: u64, len: u64) {
        for c in off >> self.cb..(off + len.max(1)).div_ceil(self.cs) {
            self.meta_set.remove(&c);
            self.free_later(HostCluster(c));
        }
    }

    /// Queues the frees of a replaced or removed bitmap's table and data clusters.
    fn free_bitmap_clusters(&mut self, d: OnDisk) {
        let bytes = u64::from(d.table_size) * 8;
        let mut t = vec![0u8; bytes as usize];
        match self.read_meta(&mut t, d.table_offset, "a bitmap table") {
            Ok(()) => {
                for raw in decode_table(&t) {
                    if let Ok(off) = check_table_entry(raw, self.cs, self.file_len) {
                        if off != 0 {
                            self.free_meta_range(off, self.cs);
                        }
                    }
                }
            }
            // Its data clusters leak (the check repairs leaks).
            Err(e) => tracing::warn!("cannot read an old bitmap table to free it: {e}"),
        }
        self.free_meta_range(d.table_offset, bytes);
    }

    /// Before a resize: every bitmap is loaded and kept `in_use` on disk until close (their
    /// tables have the old size). Inconsistent bitmaps forbid a resize (as in QEMU).
    pub(crate) fn bitmaps_before_resize(&mut self, new_size: u64) -> Result<()> {
        if self.bitmaps.list.is_empty() {
            return Ok(());
        }
        if let Some(b) = self.bitmaps.list.iter().find(|b| b.inconsistent) {
            return Err(inconsistent(&String::from_utf8_lossy(&b.name)));
        }
        if new_size == 0 {
            return Err(Error::InvalidArgument(
                "an image with persistent bitmaps cannot be resized to 0 bytes".into(),
            ));
        }
        let need: u64 = self
            .bitmaps
            .list
            .iter()
            .map(|b| bitmap_bytes_for(new_size.max(self.hdr.size), b.gran_bits))
            .sum();
        if need > self.bitmaps.memory_limit {
            return Err(Error::Unsupported(format!(
                "the bitmaps of {} would need more than {} MiB of memory at the new size",
                self.file.name(),
                self.bitmaps.memory_limit >> 20
            )));
        }
        for i in 0..self.bitmaps.list.len() {
            check_bitmap_size(new_size, self.bitmaps.list[i].gran_bits, self.cb)?;
            self.load_bitmap(i)?;
            self.bitmaps.list[i].pin_in_use = true;
        }
        self.store_bitmaps(Store::InUse)
    }

    /// After the header has the new size: the bitmaps take it.
    pub(crate) fn bitmaps_resized(&mut self, new_size: u64) -> Result<()> {
        for b in &mut self.bitmaps.list {
            if let Some(bits) = &mut b.bits {
                bits.resize(new_size)?;
                b.changed = true;
            }
        }
        Ok(())
    }

    // ---- operations (qemu-img bitmap) -------------------------------------------------

    fn check_bitmap_writable(&self) -> Result<()> {
        if !self.bitmaps.writable {
            return Err(Error::ReadOnly);
        }
        Ok(())
    }

    /// Adds a bitmap (QEMU's `block-dirty-bitmap-add` with `persistent`): `granularity`
    /// bytes per bit (default: the cluster size within 4 KiB to 64 KiB, as QEMU), enabled
    /// or not. Stored at once.
    pub(crate) fn add_bitmap(
        &mut self,
        name: &str,
        granularity: Option<u64>,
        enabled: bool,
    ) -> Result<()> {
        self.check_bitmap_writable()?;
        if self.hdr.version < 3 {
            return Err(Error::Unsupported(
                "Cannot store dirty bitmaps in qcow2 v2 files".into(),
            ));
        }
        if name.is_empty() {
            return Err(Error::InvalidArgument("Bitmap name cannot be empty".into()));
        }
        if self.hdr.size == 0 {
            return Err(Error::InvalidArgument(
                "an image of 0 bytes cannot have bitmaps".into(),
            ));
        }
        if self.bitmaps.list.iter().any(|b| b.name == name.as_bytes()) {
            return Err(Error::InvalidArgument(format!(
                "Bitmap already exists: {name}"
            )));
        }
        if name.len() > MAX_NAME_BYTES {
            return Err(Error::InvalidArgument(format!(
                "Name length exceeds maximum ({MAX_NAME_BYTES} characters)"
            )));
        }
        let g = granularity.unwrap_or_else(|| self.cs.clamp(4096, 65536));
        if !g.is_power_of_two() || g < 1 << MIN_GRANULARITY_BITS {
            return Err(Error::InvalidArgument(
                "Granularity must be power of 2 and at least 512".into(),
            ));
        }
        let gran_bits = g.trailing_zeros();
        if gran_bits > MAX_GRANULARITY_BITS {
            return Err(Error::InvalidArgument(format!(
                "Granularity exceeds maximum ({} bytes)",
                1u64 << MAX_GRANULARITY_BITS
            )));
        }
        check_bitmap_size(self.hdr.size, gran_bits, self.cb)?;
        if self.bitmaps.list.len() as u32 >= MAX_BITMAPS {
            return Err(Error::InvalidArgument(
                "Maximum number of persistent bitmaps is already reached".into(),
            ));
        }
        let dir: u64 = self
            .bitmaps
            .list
            .iter()
            .map(|b| (ENTRY_HEADER + (b.extra.len() + b.name.len()) as u64).next_multiple_of(8))
            .sum::<u64>()
            + (ENTRY_HEADER + name.len() as u64).next_multiple_of(8);
        if dir > MAX_DIRECTORY_BYTES {
            return Err(Error::InvalidArgument(
                "Not enough space in the bitmap directory".into(),
            ));
        }
        let need = bitmap_bytes_for(self.hdr.size, gran_bits);
        if self.bitmaps.memory_in_use().saturating_add(need) > self.bitmaps.memory_limit {
            return Err(Error::Unsupported(format!(
                "the bitmaps of {} would need more than {} MiB of memory",
                self.file.name(),
                self.bitmaps.memory_limit >> 20
            )));
        }
        let bits = DirtyBitmap::new(self.hdr.size, gran_bits, self.cb)?;
        self.bitmaps.list.push(Bitmap {
            name: name.as_bytes().to_vec(),
            gran_bits,
            enabled,
            inconsistent: false,
            extra_flags: 0,
            extra: Vec::new(),
            disk: None,
            bits: Some(bits),
            changed: true,
            pin_in_use: false,
        });
        self.bitmaps.update_tracking();
        let r = self.store_bitmaps(Store::InUse);
        if r.is_err() {
            // Not on disk: forget it.
            self.bitmaps.list.pop();
            self.bitmaps.update_tracking();
        }
        r
    }

    /// Removes a bitmap (an inconsistent one too) and frees its clusters.
    pub(crate) fn remove_bitmap(&mut self, name: &str) -> Result<()> {
        self.check_bitmap_writable()?;
        let i = self.bitmaps.find(name)?;
        let b = self.bitmaps.list.remove(i);
        if let Some(d) = b.disk {
            self.bitmaps.removed.push(d);
        }
        self.bitmaps.update_tracking();
        self.store_bitmaps(Store::InUse)
    }

    /// Index of a bitmap an operation may change (inconsistent ones may only be removed).
    fn usable_bitmap(&self, name: &str) -> Result<usize> {
        self.check_bitmap_writable()?;
        let i = self.bitmaps.find(name)?;
        if self.bitmaps.list[i].inconsistent {
            return Err(inconsistent(name));
        }
        Ok(i)
    }

    /// Clears a bitmap.
    pub(crate) fn clear_bitmap(&mut self, name: &str) -> Result<()> {
        let i = self.usable_bitmap(name)?;
        if self.bitmaps.list[i].bits.is_none() {
            self.load_bitmap(i)?;
        }
        let b = &mut self.bitmaps.list[i];
        if let Some(bits) = &mut b.bits {
            bits.clear();
        }
        b.changed = true;
        self.store_bitmaps(Store::InUse)
    }

    /// Enables or disables a bitmap.
    pub(crate) fn set_bitmap_enabled(&mut self, name: &str, enabled: bool) -> Result<()> {
        let i = self.usable_bitmap(name)?;
        if enabled {
            self.load_bitmap(i)?;
        }
        self.bitmaps.list[i].enabled = enabled;
        self.bitmaps.update_tracking();
        self.store_bitmaps(Store::InUse)
    }

    /// Merges `src` into bitmap `name`: every range dirty in `src` becomes dirty in it.
    pub(crate) fn merge_bitmap(&mut self, name: &str, src: &DirtyBitmap) -> Result<()> {
        let i = self.usable_bitmap(name)?;
        if src.size() != self.hdr.size {
            return Err(Error::InvalidArgument(
                "Bitmaps are incompatible and can't be merged (their sizes differ)".into(),
            ));
        }
        self.load_bitmap(i)?;
        let b = &mut self.bitmaps.list[i];
        if let Some(bits) = &mut b.bits {
            bits.merge(src);
        }
        b.changed = true;
        self.store_bitmaps(Store::InUse)
    }

    /// A copy of bitmap `name`'s bits (read from disk if they are not in memory).
    pub(crate) fn bitmap_bits(&self, name: &str) -> Result<DirtyBitmap> {
        let i = self.bitmaps.find(name)?;
        let b = &self.bitmaps.list[i];
        if b.inconsistent {
            return Err(inconsistent(name));
        }
        if let Some(bits) = &b.bits {
            return Ok(bits.clone());
        }
        if !b.extra.is_empty() && b.extra_flags & flags::EXTRA_DATA_COMPATIBLE == 0 {
            return Err(Error::Unsupported(format!(
                "bitmap '{name}' has extra data xdisk does not know and may not be used"
            )));
        }
        if bitmap_bytes_for(self.hdr.size, b.gran_bits) > self.bitmaps.memory_limit {
            return Err(Error::Unsupported(format!(
                "bitmap '{name}' needs more than {} MiB of memory",
                self.bitmaps.memory_limit >> 20
            )));
        }
        self.read_bitmap(b.disk, self.hdr.size, b.gran_bits, name)
    }
}

/// QEMU's error for an inconsistent bitmap.
fn inconsistent(name: &str) -> Error {
    Error::InvalidArgument(format!(
        "Bitmap '{name}' is inconsistent and cannot be used\nTry block-dirty-bitmap-remove \
         to delete this bitmap from disk"
    ))
}

/// QEMU's bound on a bitmap's data ("Too much space will be occupied by the bitmap").
fn check_bitmap_size(size: u64, gran_bits: u32, cluster_bits: u32) -> Result<()> {
    let bytes = bitmap_bytes_for(size, gran_bits);
    if bytes > MAX_BITMAP_BYTES || bytes > MAX_TABLE_ENTRIES << cluster_bits {
        return Err(Error::InvalidArgument(
            "Too much space will be occupied by the bitmap. Use larger granularity".into(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_at_walks_runs_as_dirty_ranges_says() {
        // 512-byte clusters: chunks of 4096 bits; granules of 4 KiB.
        let size = 3 * 4096 * 4096 + 12345;
        let mut b = DirtyBitmap::new(size, 12, 9).unwrap();
        for (o, l) in [
            (0u64, 4096u64),
            (5 * 4096, 70 * 4096),
            (4096 * 4096 - 4096, 3 * 4096),
            (2 * 4096 * 4096 + 64 * 4096, 64 * 4096),
            (size - 100, 100),
        ] {
            b.set_range(o, l);
        }
        let mut runs = Vec::new();
        let mut pos = 0;
        while pos < size {
            let (d, n) = b.run_at(pos, size - pos);
            assert!(n > 0);
            if d {
                runs.push((pos, n));
            }
            pos += n;
        }
        assert_eq!(runs, b.dirty_ranges());
        // Bounded by max, unaligned starts.
        assert_eq!(b.run_at(100, 50), (true, 50));
        assert_eq!(b.run_at(4096 + 10, 4096), (false, 4096));
        assert_eq!(b.run_at(size, 10), (false, 0));
    }

    #[test]
    fn directory_roundtrip_with_extra_data_and_padding() {
        let entries = vec![
            DirEntry {
                table_offset: 0x30000,
                table_size: 1,
                flags: flags::AUTO,
                kind: 1,
                granularity_bits: 16,
                name: b"b0".to_vec(),
                extra: Vec::new(),
            },
            DirEntry {
                table_offset: 0x40000,
                table_size: 3,
                flags: flags::IN_USE | flags::EXTRA_DATA_COMPATIBLE,
                kind: 1,
                granularity_bits: 9,
                name: b"a longer name".to_vec(),
                extra: vec![1, 2, 3],
            },
        ];
        let b = encode_directory(&entries);
        assert_eq!(b.len() % 8, 0);
        assert_eq!(
            b.len() as u64,
            entries.iter().map(DirEntry::size).sum::<u64>()
        );
        assert_eq!(parse_directory(&b, 2).unwrap(), entries);
        assert!(parse_directory(&b, 1).is_err(), "entries left over");
        assert!(parse_directory(&b, 3).is_err(), "an entry missing");
        assert!(parse_directory(&b[..b.len() - 8], 2).is_err(), "truncated");
    }

    #[test]
    fn ext_checks_follow_qemu() {
        let e = BitmapsExt {
            nb_bitmaps: 2,
            dir_size: 64,
            dir_offset: 0x10000,
        };
        assert_eq!(BitmapsExt::parse(&e.encode(), 65536).unwrap(), e);
        let mut bad = e.encode();
        bad[7] = 1;
        assert!(BitmapsExt::parse(&bad, 65536).is_err(), "reserved field");
        assert!(BitmapsExt::parse(&e.encode()[..20], 65536).is_err());
        for f in [
            BitmapsExt { nb_bitmaps: 0, ..e },
            BitmapsExt {
                nb_bitmaps: 65536,
                ..e
            },
            BitmapsExt {
                dir_offset: 0x10200,
                ..e
            },
            BitmapsExt { dir_size: 0, ..e },
            BitmapsExt {
                dir_size: MAX_DIRECTORY_BYTES + 1,
                ..e
            },
        ] {
            assert!(BitmapsExt::parse(&f.encode(), 65536).is_err(), "{f:?}");
        }
    }

    #[test]
    fn bits_are_little_endian_one_per_granule() {
        // 1 MiB at 64 KiB granularity: 16 bits, one chunk of a 512-byte cluster.
        let mut b = DirtyBitmap::new(1 << 20, 16, 9).unwrap();
        b.set_range(65536, 1); // bit 1
        b.set_range(9 * 65536 + 100, 65536); // bits 9 and 10
        let ChunkState::Data(words) = b.chunk_state(0) else {
            panic!("chunk 0 has data");
        };
        let bytes = chunk_bytes(words, 512);
        assert_eq!(bytes[0], 0b0000_0010);
        assert_eq!(bytes[1], 0b0000_0110);
        assert!(bytes[2..].iter().all(|&x| x == 0));
        assert_eq!(
            b.dirty_ranges(),
            vec![(65536, 65536), (9 * 65536, 2 * 65536)]
        );
        assert!(b.is_dirty(65536 + 5) && !b.is_dirty(0));
        // Loading the bytes back gives the same bitmap.
        let mut c = DirtyBitmap::new(1 << 20, 16, 9).unwrap();
        c.load_chunk(0, &bytes);
        assert_eq!(c.dirty_ranges(), b.dirty_ranges());
    }

    #[test]
    fn tail_bits_stay_zero_and_resize_drops_them() {
        // 100 KiB at 512 bytes: 200 bits.
        let mut b = DirtyBitmap::new(100 << 10, 9, 9).unwrap();
        b.set_range(0, u64::MAX);
        assert_eq!(b.dirty_ranges(), vec![(0, 100 << 10)]);
        let mut ones = vec![0xffu8; 512];
        ones[30] = 0xff;
        let mut c = DirtyBitmap::new(100 << 10, 9, 9).unwrap();
        c.load_chunk(0, &ones);
        assert_eq!(
            c.dirty_ranges(),
            vec![(0, 100 << 10)],
            "garbage past the end"
        );
        b.resize(50 << 10).unwrap();
        b.resize(100 << 10).unwrap();
        assert_eq!(b.dirty_ranges(), vec![(0, 50 << 10)]);
        // A full chunk of ones is stored as an all-ones entry, a partial one as data.
        let mut big = DirtyBitmap::new(3 << 21, 9, 9).unwrap(); // 12288 bits: 3 chunks
        big.set_range(0, 1 << 21);
        assert!(matches!(big.chunk_state(0), ChunkState::Ones));
        assert!(matches!(big.chunk_state(1), ChunkState::Zero));
        let mut small = DirtyBitmap::new(1000 * 512, 9, 9).unwrap();
        small.set_range(0, u64::MAX);
        assert!(matches!(small.chunk_state(0), ChunkState::Data(_)));
    }

    #[test]
    fn merge_across_granularities() {
        let mut a = DirtyBitmap::new(1 << 20, 16, 16).unwrap();
        let mut b = DirtyBitmap::new(1 << 20, 9, 16).unwrap();
        b.set_range(70000, 10);
        a.merge(&b);
        assert_eq!(a.dirty_ranges(), vec![(65536, 65536)]);
        let mut c = DirtyBitmap::new(1 << 20, 9, 16).unwrap();
        c.merge(&a);
        assert_eq!(c.dirty_ranges(), vec![(65536, 65536)]);
    }

    #[test]
    fn table_size_matches_qemu() {
        // 100 MiB at 64 KiB: 1600 bits = 200 bytes: one cluster.
        assert_eq!(table_entries_for(100 << 20, 16, 16), 1);
        // 1 TiB at 512 bytes: 2^31 bits = 256 MiB: 4096 clusters of 64 KiB.
        assert_eq!(table_entries_for(1 << 40, 9, 16), 4096);
        assert_eq!(table_entries_for(1, 9, 9), 1);
    }
}
