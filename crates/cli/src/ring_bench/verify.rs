//! `--verify=crc32c`, in the spirit of fio's: each block written carries a header (magic,
//! offset, length, generation, seed) and a crc32c of everything after the crc field; a read
//! block is checked against it.
//!
//! ```text
//! 0..4    magic "xdkv" (0x766b6478 little-endian)
//! 4..8    crc32c of bytes 8..len
//! 8..16   offset of the block in bytes
//! 16..20  length of the block
//! 20..24  generation: the how-many-th write of this block in the run (1, 2, ...)
//! 24..32  seed of the run
//! 32..len pseudo-random data derived from (offset, generation, seed)
//! ```

/// Bytes of the header.
pub const HEADER: usize = 32;
const MAGIC: u32 = 0x766b_6478;

/// CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), slicing-by-8 tables.
const fn tables() -> [[u32; 256]; 8] {
    let mut t = [[0u32; 256]; 8];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                (c >> 1) ^ 0x82F6_3B78
            } else {
                c >> 1
            };
            k += 1;
        }
        t[0][i] = c;
        i += 1;
    }
    let mut i = 0;
    while i < 256 {
        let mut j = 1;
        while j < 8 {
            let prev = t[j - 1][i];
            t[j][i] = (prev >> 8) ^ t[0][(prev & 0xff) as usize];
            j += 1;
        }
        i += 1;
    }
    t
}

static T: [[u32; 256]; 8] = tables();

/// CRC-32C of `data`.
pub fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    let mut chunks = data.chunks_exact(8);
    for c in &mut chunks {
        let lo = u32::from_le_bytes([c[0], c[1], c[2], c[3]]) ^ crc;
        let hi = u32::from_le_bytes([c[4], c[5], c[6], c[7]]);
        crc = T[7][(lo & 0xff) as usize]
            ^ T[6][((lo >> 8) & 0xff) as usize]
            ^ T[5][((lo >> 16) & 0xff) as usize]
            ^ T[4][(lo >> 24) as usize]
            ^ T[3][(hi & 0xff) as usize]
            ^ T[2][((hi >> 8) & 0xff) as usize]
            ^ T[1][((hi >> 16) & 0xff) as usize]
            ^ T[0][(hi >> 24) as usize];
    }
    for &b in chunks.remainder() {
        crc = (crc >> 8) ^ T[0][((crc ^ u32::from(b)) & 0xff) as usize];
    }
    !crc
}

fn rd32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn rd64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// Fills `buf` (a whole block, at least [`HEADER`] bytes) as written at `offset`.
pub fn fill(buf: &mut [u8], offset: u64, generation: u32, seed: u64) {
    assert!(buf.len() >= HEADER && buf.len() <= u32::MAX as usize);
    let len = buf.len() as u32;
    buf[0..4].copy_from_slice(&MAGIC.to_le_bytes());
    buf[8..16].copy_from_slice(&offset.to_le_bytes());
    buf[16..20].copy_from_slice(&len.to_le_bytes());
    buf[20..24].copy_from_slice(&generation.to_le_bytes());
    buf[24..32].copy_from_slice(&seed.to_le_bytes());
    // xorshift64*, seeded from the block's identity.
    let mut x = (offset ^ seed.rotate_left(17) ^ (u64::from(generation) << 40))
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        | 1;
    let mut chunks = buf[HEADER..].chunks_exact_mut(8);
    for c in &mut chunks {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        c.copy_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    for b in chunks.into_remainder() {
        *b = x as u8;
    }
    let crc = crc32c(&buf[8..]);
    buf[4..8].copy_from_slice(&crc.to_le_bytes());
}

/// What a block was expected to hold.
#[derive(Debug, Clone, Copy)]
pub struct Expect {
    pub offset: u64,
    /// The generation of the last write of the block in this run (`None`: not written in
    /// this run, any generation will do).
    pub generation: Option<u32>,
}

/// Why a block failed verification.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error("bad magic header {got:#010x}, wanted {want:#010x}")]
    Magic { got: u32, want: u32 },
    #[error("bad length {got}, wanted {want}")]
    Length { got: u32, want: u32 },
    #[error("header names offset {got}, wanted {want}")]
    Offset { got: u64, want: u64 },
    #[error("crc32c mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    Crc { stored: u32, computed: u32 },
    #[error("stale data: generation {got}, wanted {want} (a lost write?)")]
    Generation { got: u32, want: u32 },
}

/// Checks a block read at `e.offset`.
pub fn check(buf: &[u8], e: Expect) -> Result<(), VerifyError> {
    if buf.len() < HEADER {
        return Err(VerifyError::Length {
            got: buf.len() as u32,
            want: HEADER as u32,
        });
    }
    let magic = rd32(buf, 0);
    if magic != MAGIC {
        return Err(VerifyError::Magic {
            got: magic,
            want: MAGIC,
        });
    }
    let len = rd32(buf, 16);
    if len as usize != buf.len() {
        return Err(VerifyError::Length {
            got: len,
            want: buf.len() as u32,
        });
    }
    let off = rd64(buf, 8);
    if off != e.offset {
        return Err(VerifyError::Offset {
            got: off,
            want: e.offset,
        });
    }
    let stored = rd32(buf, 4);
    let computed = crc32c(&buf[8..]);
    if stored != computed {
        return Err(VerifyError::Crc { stored, computed });
    }
    let generation = rd32(buf, 20);
    if let Some(want) = e.generation {
        if generation != want {
            return Err(VerifyError::Generation {
                got: generation,
                want,
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_known_answers() {
        assert_eq!(crc32c(b""), 0);
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        // RFC 3720 B.4: 32 bytes of zeroes, of 0xff.
        assert_eq!(crc32c(&[0u8; 32]), 0x8A91_36AA);
        assert_eq!(crc32c(&[0xffu8; 32]), 0x62A8_AB43);
        let inc: Vec<u8> = (0..32).collect();
        assert_eq!(crc32c(&inc), 0x46DD_794E);
    }

    #[test]
    fn crc32c_slicing_matches_bytewise() {
        let data: Vec<u8> = (0..1000u32).map(|i| (i * 7 + 3) as u8).collect();
        for len in [0, 1, 7, 8, 9, 63, 64, 65, 999, 1000] {
            let mut crc = !0u32;
            for &b in &data[..len] {
                crc = (crc >> 8) ^ T[0][((crc ^ u32::from(b)) & 0xff) as usize];
            }
            assert_eq!(crc32c(&data[..len]), !crc, "len {len}");
        }
    }

    #[test]
    fn good_blocks_pass() {
        for len in [512usize, 4096, 65536] {
            let mut b = vec![0u8; len];
            fill(&mut b, 8192, 3, 42);
            let e = Expect {
                offset: 8192,
                generation: Some(3),
            };
            assert_eq!(check(&b, e), Ok(()));
            assert_eq!(
                check(
                    &b,
                    Expect {
                        generation: None,
                        ..e
                    }
                ),
                Ok(())
            );
        }
    }

    #[test]
    fn every_corruption_is_caught() {
        let mut good = vec![0u8; 4096];
        fill(&mut good, 4096, 1, 7);
        let e = Expect {
            offset: 4096,
            generation: Some(1),
        };
        // Any single flipped bit, anywhere.
        for at in (0..4096).step_by(97).chain([4, 8, 4095]) {
            let mut b = good.clone();
            b[at] ^= 0x10;
            assert!(check(&b, e).is_err(), "flip at {at} missed");
        }
        // The right block at the wrong place.
        assert!(matches!(
            check(
                &good,
                Expect {
                    offset: 0,
                    generation: Some(1)
                }
            ),
            Err(VerifyError::Offset { .. })
        ));
        // An older write of the same block.
        let mut old = vec![0u8; 4096];
        fill(&mut old, 4096, 0, 7);
        assert!(matches!(
            check(&old, e),
            Err(VerifyError::Generation { got: 0, want: 1 })
        ));
        // Never written.
        assert!(matches!(
            check(&[0u8; 4096], e),
            Err(VerifyError::Magic { .. })
        ));
        // Truncated.
        assert!(check(&good[..100], e).is_err());
    }
}
