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
use xdisk_io::{Storage, StorageRef};

/// The magic that starts a sparse input.
pub const SPARSE_MAGIC: &[u8; 8] = b"XSPARSE1";
/// Largest disk a sparse input may describe (1 TiB: nothing is allocated for the zeroes).
pub const MAX_SPARSE_SIZE: u64 = 1 << 40;
/// Largest image a sparse input is opened as ([`FuzzStorage`]): nothing is allocated for the
/// zeroes, but a qcow2 engine may still walk a large size cluster by cluster.
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

/// A fuzz input as a [`Storage`] in memory (no file, no syscalls): a sparse disk
/// (`XSPARSE1`) or the plain bytes, kept as 4 KiB pages in a sorted map, so that a read costs
/// what it covers, and pages never written read as zeroes and count as holes (formats skip
/// them as they skip holes of sparse files). Writes update the pages, within a bound.
#[derive(Debug)]
pub struct FuzzStorage {
    state: std::sync::Mutex<Pages>,
    read_only: bool,
}

const PAGE: u64 = 4096;

#[derive(Debug, Default)]
struct Pages {
    size: u64,
    pages: std::collections::BTreeMap<u64, Box<[u8; PAGE as usize]>>,
    /// Pages created by writes, bounded so that a hostile image cannot make a write loop
    /// grow memory without end.
    created: u64,
}

/// The most pages the formats may add to a [`FuzzStorage`] in one run (64 MiB).
pub const MAX_FUZZ_PAGES: u64 = (64 << 20) / PAGE;

impl Pages {
    /// Copies `bytes` to `at`; `count` charges new pages to the write bound.
    fn put(&mut self, at: u64, bytes: &[u8], count: bool) -> io::Result<()> {
        let mut pos = 0usize;
        while pos < bytes.len() {
            let a = at + pos as u64;
            let (page, in_page) = (a / PAGE, (a % PAGE) as usize);
            let n = (PAGE as usize - in_page).min(bytes.len() - pos);
            if !self.pages.contains_key(&page) {
                if xdisk_io::is_zero(&bytes[pos..pos + n]) {
                    pos += n;
                    continue;
                }
                if count {
                    self.created += 1;
                    if self.created > MAX_FUZZ_PAGES {
                        return Err(io::Error::from_raw_os_error(ENOSPC));
                    }
                }
            }
            let p = self
                .pages
                .entry(page)
                .or_insert_with(|| Box::new([0u8; PAGE as usize]));
            p[in_page..in_page + n].copy_from_slice(&bytes[pos..pos + n]);
            pos += n;
        }
        Ok(())
    }
}

const ENOSPC: i32 = 28;
const EBADF: i32 = 9;

impl FuzzStorage {
    /// The input as a storage.
    pub fn new(data: &[u8], read_only: bool) -> FuzzStorage {
        let mut p = Pages::default();
        match SparseDisk::decode(data) {
            Some(d) => {
                // As big as an image file the targets used to write (a larger size only
                // multiplies per-cluster walks over nothing).
                p.size = d.size.min(MAX_SPARSE_FILE);
                for (off, bytes) in &d.chunks {
                    // Within MAX_SPARSE_SIZE by construction; the input bounds the pages.
                    let _ = p.put(*off, bytes, false);
                }
            }
            None => {
                p.size = data.len() as u64;
                let _ = p.put(0, data, false);
            }
        }
        FuzzStorage {
            state: std::sync::Mutex::new(p),
            read_only,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Pages> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Storage for FuzzStorage {
    fn name(&self) -> std::borrow::Cow<'_, str> {
        std::borrow::Cow::Borrowed("fuzz input")
    }
    fn size(&self) -> io::Result<u64> {
        Ok(self.lock().size)
    }
    fn set_size(&self, len: u64) -> io::Result<()> {
        if len > MAX_SPARSE_SIZE {
            return Err(io::Error::from_raw_os_error(ENOSPC));
        }
        let mut s = self.lock();
        s.size = len;
        // Bytes past the new end read as zeroes if it grows again, as with a file.
        let first_gone = len.div_ceil(PAGE);
        let _ = s.pages.split_off(&first_gone);
        if len % PAGE != 0 {
            if let Some(p) = s.pages.get_mut(&(len / PAGE)) {
                p[(len % PAGE) as usize..].fill(0);
            }
        }
        Ok(())
    }
    fn read_at(&self, buf: &mut [u8], at: u64) -> io::Result<()> {
        buf.fill(0);
        let s = self.lock();
        let end = at.saturating_add(buf.len() as u64).min(s.size);
        if at >= end {
            return Ok(());
        }
        for (&page, p) in s.pages.range(at / PAGE..=(end - 1) / PAGE) {
            let pstart = page * PAGE;
            let from = at.max(pstart);
            let to = end.min(pstart + PAGE);
            buf[(from - at) as usize..(to - at) as usize]
                .copy_from_slice(&p[(from - pstart) as usize..(to - pstart) as usize]);
        }
        Ok(())
    }
    fn write_at(&self, buf: &[u8], at: u64) -> io::Result<()> {
        if self.read_only {
            return Err(io::Error::from_raw_os_error(EBADF));
        }
        let end = at
            .checked_add(buf.len() as u64)
            .filter(|&e| e <= MAX_SPARSE_SIZE)
            .ok_or_else(|| io::Error::from_raw_os_error(ENOSPC))?;
        let mut s = self.lock();
        s.put(at, buf, true)?;
        s.size = s.size.max(end);
        Ok(())
    }
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
    fn discard(&self, off: u64, len: u64) -> io::Result<()> {
        self.write_zeroes(off, len)
    }
    fn discard_zeroes(&self) -> bool {
        true
    }
    fn write_zeroes(&self, off: u64, len: u64) -> io::Result<()> {
        if self.read_only {
            return Err(io::Error::from_raw_os_error(EBADF));
        }
        let mut s = self.lock();
        let end = off.saturating_add(len).min(s.size);
        if off >= end {
            return Ok(());
        }
        let pages: Vec<u64> = s
            .pages
            .range(off / PAGE..=(end - 1) / PAGE)
            .map(|(k, _)| *k)
            .collect();
        for page in pages {
            let pstart = page * PAGE;
            let from = off.max(pstart);
            let to = end.min(pstart + PAGE);
            if let Some(p) = s.pages.get_mut(&page) {
                p[(from - pstart) as usize..(to - pstart) as usize].fill(0);
            }
        }
        Ok(())
    }
    fn preallocate(&self, off: u64, len: u64) -> io::Result<()> {
        let end = off.saturating_add(len);
        if end > self.lock().size {
            self.set_size(end)?;
        }
        Ok(())
    }
    fn allocation(&self, at: u64, len: u64) -> xdisk_io::Allocation {
        let s = self.lock();
        let end = at.saturating_add(len);
        let page = at / PAGE;
        if s.pages.contains_key(&page) {
            // Data up to the end of this run of pages.
            let mut p = page + 1;
            while p * PAGE < end && s.pages.contains_key(&p) {
                p += 1;
            }
            return xdisk_io::Allocation::Data {
                len: (p * PAGE).min(end) - at,
            };
        }
        let next = s
            .pages
            .range(page..)
            .next()
            .map_or(end, |(k, _)| (k * PAGE).min(end));
        xdisk_io::Allocation::Hole {
            len: next.saturating_sub(at).max(1),
        }
    }
    fn read_only(&self) -> bool {
        self.read_only
    }
    fn cache(&self) -> xdisk_io::CacheMode {
        xdisk_io::CacheMode::WriteBack
    }
    fn is_broken(&self) -> bool {
        false
    }
    fn mark_broken(&self, _err: &io::Error) {}
}

/// The input as a shared storage handle.
pub fn storage(data: &[u8], read_only: bool) -> StorageRef {
    Arc::new(FuzzStorage::new(data, read_only))
}
