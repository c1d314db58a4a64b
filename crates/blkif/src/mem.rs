//! Memory shared with a guest, and the only place the ring code touches it.
//!
//! A ring lives in pages the other domain can write at any moment, so it is
//! never seen as Rust data (`&[u8]`, `&Struct`): that would let the
//! compiler assume it does not change and read a field twice ("double
//! fetch", XSA-155). [`SharedMem`] offers only single, bounds-checked
//! accesses that copy: a 32-bit index load/store (one access, never torn)
//! and byte copies in and out. Ordering between them is the caller's job:
//! the ring code puts `fence`s exactly where xen/io/ring.h has `xen_mb`,
//! `xen_rmb` and `xen_wmb`, so accesses here can be relaxed/volatile.
//!
//! [`VecMem`] is an in-process implementation over atomics, in safe code,
//! for tests and fuzzing: both ends of a ring (or two threads) can share it
//! through an `Arc`. The grant-mapped implementation comes with the backend
//! loop; its `unsafe` (volatile reads of a mapping) belongs in one small
//! module behind this trait.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

/// An out-of-bounds or misaligned access.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum MemError {
    /// `offset + len` is past the end of the region (or overflows).
    #[error("access of {len} bytes at offset {offset} is outside the {size}-byte region")]
    OutOfBounds {
        /// Offset of the access.
        offset: usize,
        /// Length of the access.
        len: usize,
        /// Size of the region.
        size: usize,
    },
    /// A 32-bit access at an offset that is not a multiple of 4.
    #[error("32-bit access at unaligned offset {0}")]
    Unaligned(usize),
}

/// A region of memory shared with another domain.
///
/// Every method is one bounds-checked access; none hands out a reference
/// into the region. Implementations must make `read_u32_volatile` and
/// `write_u32_volatile` single (untorn) 32-bit accesses, and must not be
/// elided or merged by the compiler (volatile or atomic accesses).
pub trait SharedMem {
    /// Size of the region in bytes.
    fn size(&self) -> usize;

    /// Loads the little-endian `u32` at `offset` (a multiple of 4) in one access.
    fn read_u32_volatile(&self, offset: usize) -> Result<u32, MemError>;

    /// Stores a little-endian `u32` at `offset` (a multiple of 4) in one access.
    fn write_u32_volatile(&self, offset: usize, value: u32) -> Result<(), MemError>;

    /// Copies `dst.len()` bytes starting at `offset` out of the region.
    fn copy_from(&self, offset: usize, dst: &mut [u8]) -> Result<(), MemError>;

    /// Copies `src` into the region at `offset`.
    fn copy_to(&self, offset: usize, src: &[u8]) -> Result<(), MemError>;
}

/// Checks `offset..offset + len` against `size`.
pub fn check_bounds(offset: usize, len: usize, size: usize) -> Result<(), MemError> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(MemError::OutOfBounds { offset, len, size }),
    }
}

fn check_u32(offset: usize, size: usize) -> Result<(), MemError> {
    check_bounds(offset, 4, size)?;
    if !offset.is_multiple_of(4) {
        return Err(MemError::Unaligned(offset));
    }
    Ok(())
}

/// Shared memory in this process: a vector of `AtomicU32` words, byte
/// `i` being byte `i % 4` (little-endian) of word `i / 4`. All accesses are
/// relaxed atomics, so it is `Sync` and can be shared by a front ring, a
/// back ring and several threads without `unsafe`.
#[derive(Debug)]
pub struct VecMem {
    words: Vec<AtomicU32>,
    size: usize,
}

impl VecMem {
    /// `size` zero bytes.
    pub fn new(size: usize) -> VecMem {
        let words = (0..size.div_ceil(4)).map(|_| AtomicU32::new(0)).collect();
        VecMem { words, size }
    }

    /// `n` zeroed 4 KiB pages.
    pub fn pages(n: usize) -> VecMem {
        VecMem::new(n.saturating_mul(crate::wire::PAGE_SIZE))
    }

    /// A region holding a copy of `bytes` (fuzzing, tests).
    pub fn from_bytes(bytes: &[u8]) -> VecMem {
        let mem = VecMem::new(bytes.len());
        // In bounds by construction.
        let _ = mem.copy_to(0, bytes);
        mem
    }

    /// A snapshot of the whole region.
    pub fn to_vec(&self) -> Vec<u8> {
        let mut v = vec![0u8; self.size];
        let _ = self.copy_from(0, &mut v);
        v
    }

    fn word(&self, index: usize) -> Result<&AtomicU32, MemError> {
        self.words.get(index).ok_or(MemError::OutOfBounds {
            offset: index.saturating_mul(4),
            len: 4,
            size: self.size,
        })
    }
}

impl SharedMem for VecMem {
    fn size(&self) -> usize {
        self.size
    }

    fn read_u32_volatile(&self, offset: usize) -> Result<u32, MemError> {
        check_u32(offset, self.size)?;
        Ok(self.word(offset / 4)?.load(Ordering::Relaxed))
    }

    fn write_u32_volatile(&self, offset: usize, value: u32) -> Result<(), MemError> {
        check_u32(offset, self.size)?;
        self.word(offset / 4)?.store(value, Ordering::Relaxed);
        Ok(())
    }

    fn copy_from(&self, offset: usize, dst: &mut [u8]) -> Result<(), MemError> {
        check_bounds(offset, dst.len(), self.size)?;
        let mut cached: Option<(usize, [u8; 4])> = None;
        for (i, d) in dst.iter_mut().enumerate() {
            let at = offset + i;
            let w = at / 4;
            let bytes = match cached {
                Some((cw, b)) if cw == w => b,
                _ => {
                    // One load per word: a word is read once even if several
                    // of its bytes are wanted.
                    let b = self.word(w)?.load(Ordering::Relaxed).to_le_bytes();
                    cached = Some((w, b));
                    b
                }
            };
            *d = bytes[at % 4];
        }
        Ok(())
    }

    fn copy_to(&self, offset: usize, src: &[u8]) -> Result<(), MemError> {
        check_bounds(offset, src.len(), self.size)?;
        for (i, &s) in src.iter().enumerate() {
            let at = offset + i;
            let shift = 8 * (at % 4) as u32;
            let word = self.word(at / 4)?;
            // Only this byte's lane changes; concurrent writers of the other
            // lanes of the same word are not disturbed.
            word.fetch_and(!(0xffu32 << shift), Ordering::Relaxed);
            word.fetch_or(u32::from(s) << shift, Ordering::Relaxed);
        }
        Ok(())
    }
}

impl<T: SharedMem + ?Sized> SharedMem for &T {
    fn size(&self) -> usize {
        (**self).size()
    }
    fn read_u32_volatile(&self, offset: usize) -> Result<u32, MemError> {
        (**self).read_u32_volatile(offset)
    }
    fn write_u32_volatile(&self, offset: usize, value: u32) -> Result<(), MemError> {
        (**self).write_u32_volatile(offset, value)
    }
    fn copy_from(&self, offset: usize, dst: &mut [u8]) -> Result<(), MemError> {
        (**self).copy_from(offset, dst)
    }
    fn copy_to(&self, offset: usize, src: &[u8]) -> Result<(), MemError> {
        (**self).copy_to(offset, src)
    }
}

impl<T: SharedMem + ?Sized> SharedMem for Arc<T> {
    fn size(&self) -> usize {
        (**self).size()
    }
    fn read_u32_volatile(&self, offset: usize) -> Result<u32, MemError> {
        (**self).read_u32_volatile(offset)
    }
    fn write_u32_volatile(&self, offset: usize, value: u32) -> Result<(), MemError> {
        (**self).write_u32_volatile(offset, value)
    }
    fn copy_from(&self, offset: usize, dst: &mut [u8]) -> Result<(), MemError> {
        (**self).copy_from(offset, dst)
    }
    fn copy_to(&self, offset: usize, src: &[u8]) -> Result<(), MemError> {
        (**self).copy_to(offset, src)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_and_words_agree() {
        let m = VecMem::new(10);
        m.copy_to(1, &[1, 2, 3, 4, 5]).unwrap();
        assert_eq!(m.to_vec(), vec![0, 1, 2, 3, 4, 5, 0, 0, 0, 0]);
        assert_eq!(m.read_u32_volatile(0).unwrap(), 0x0302_0100);
        m.write_u32_volatile(4, 0xaabb_ccdd).unwrap();
        let mut b = [0u8; 6];
        m.copy_from(3, &mut b).unwrap();
        assert_eq!(b, [3, 0xdd, 0xcc, 0xbb, 0xaa, 0]);
    }

    #[test]
    fn bounds() {
        let m = VecMem::new(10);
        assert!(m.read_u32_volatile(8).is_err()); // 8..12 > 10
        assert_eq!(m.read_u32_volatile(2), Err(MemError::Unaligned(2)));
        assert!(m.copy_from(usize::MAX, &mut [0u8; 2]).is_err());
        assert!(m.copy_to(9, &[0u8; 2]).is_err());
        assert!(m.copy_to(10, &[]).is_ok());
        assert!(m.write_u32_volatile(usize::MAX - 3, 0).is_err());
        let empty = VecMem::new(0);
        assert!(empty.read_u32_volatile(0).is_err());
        assert_eq!(VecMem::from_bytes(&[9, 8, 7]).to_vec(), vec![9, 8, 7]);
    }
}
