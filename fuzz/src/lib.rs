//! Helpers shared by the fuzz targets.
//!
//! # Sparse inputs
//! A filesystem or an image worth fuzzing is mostly zeroes: a fresh XFS needs 300 MB, of which
//! about 50 KiB are not zero. Targets that read a disk therefore accept, besides plain bytes, a
//! *sparse* encoding: the magic `XSPARSE1`, the disk's size (u64 little endian, capped at
//! [`MAX_SPARSE_SIZE`]) and then chunks, each an offset (u64 LE), a length (u16 LE) and that many
//! bytes; everything else reads as zeroes, a later chunk wins where chunks overlap, and a chunk
//! cut short by the end of the input keeps what is there. The seeds under `fuzz/seeds/` made
//! by `fuzz/make-seeds` from real `mkfs`, `xorriso`, `sfdisk` and `qemu-img` output use it, so
//! the fuzzer starts inside real metadata instead of having to guess a superblock magic.

use std::io;
use std::sync::Arc;

use xdisk_boot::disk::{check_range, MemDisk, ReadAt};

/// The magic that starts a sparse input.
pub const SPARSE_MAGIC: &[u8; 8] = b"XSPARSE1";
/// Largest disk a sparse input may describe (1 TiB: nothing is allocated for the zeroes).
pub const MAX_SPARSE_SIZE: u64 = 1 << 40;
/// Largest file a sparse input is written out as ([`write_image`]): files are sparse too, but
/// a qcow2 engine may still walk a large size.
pub const MAX_SPARSE_FILE: u64 = 4 << 30;

/// A disk of `size` bytes made of a few chunks of data and zeroes elsewhere.
#[derive(Debug, Default)]
pub struct SparseDisk {
    size: u64,
    chunks: Vec<(u64, Vec<u8>)>,
}

impl SparseDisk {
    /// Decodes a sparse input; `None` when `data` does not start with [`SPARSE_MAGIC`].
    pub fn decode(data: &[u8]) -> Option<SparseDisk> {
        let rest = data.strip_prefix(SPARSE_MAGIC.as_slice())?;
        let (size, mut rest) = take_u64(rest)?;
        let size = size.min(MAX_SPARSE_SIZE);
        let mut chunks = Vec::new();
        while let Some((off, r)) = take_u64(rest) {
            let Some((len, r)) = r.split_first_chunk::<2>() else {
                break;
            };
            let len = usize::from(u16::from_le_bytes(*len)).min(r.len());
            let (bytes, r) = r.split_at(len);
            rest = r;
            // Chunks past the end are dropped; one that crosses it is cut.
            if off >= size {
                continue;
            }
            let keep = (size - off).min(bytes.len() as u64) as usize;
            chunks.push((off, bytes[..keep].to_vec()));
        }
        Some(SparseDisk { size, chunks })
    }

    /// The chunks, in input order (a later one wins where they overlap).
    pub fn chunks(&self) -> &[(u64, Vec<u8>)] {
        &self.chunks
    }
}

fn take_u64(b: &[u8]) -> Option<(u64, &[u8])> {
    let (v, rest) = b.split_first_chunk::<8>()?;
    Some((u64::from_le_bytes(*v), rest))
}

impl ReadAt for SparseDisk {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        check_range(offset, buf.len(), self.size)?;
        buf.fill(0);
        let end = offset + buf.len() as u64;
        for (off, bytes) in &self.chunks {
            let cend = off + bytes.len() as u64;
            if cend <= offset || *off >= end {
                continue;
            }
            let from = offset.max(*off);
            let to = end.min(cend);
            let dst = (from - offset) as usize..(to - offset) as usize;
            let src = (from - off) as usize..(to - off) as usize;
            buf[dst].copy_from_slice(&bytes[src]);
        }
        Ok(())
    }
}

/// The disk a boot target reads: the sparse encoding when `data` has its magic, else the bytes.
pub fn disk(data: &[u8]) -> Arc<dyn ReadAt> {
    match SparseDisk::decode(data) {
        Some(d) => Arc::new(d),
        None => Arc::new(MemDisk(data.to_vec())),
    }
}

/// Writes `data` to `path` as an image file: plain bytes, or a sparse input as a sparse file
/// (its size capped at [`MAX_SPARSE_FILE`]).
pub fn write_image(path: &std::path::Path, data: &[u8]) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    let Some(d) = SparseDisk::decode(data) else {
        return std::fs::write(path, data);
    };
    let f = std::fs::File::create(path)?;
    let size = d.size.min(MAX_SPARSE_FILE);
    f.set_len(size)?;
    for (off, bytes) in &d.chunks {
        if *off >= size {
            continue;
        }
        let keep = (size - off).min(bytes.len() as u64) as usize;
        f.write_all_at(&bytes[..keep], *off)?;
    }
    Ok(())
}
