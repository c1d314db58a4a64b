//! Little-endian fields of on-disk structures, read out of a byte slice: a field that is not
//! (wholly) inside the slice reads as 0, so a truncated structure never panics; callers
//! validate the values.

/// The 16-bit little-endian field at `at`, or 0.
pub(crate) fn le16(b: &[u8], at: usize) -> u16 {
    match at.checked_add(2).and_then(|end| b.get(at..end)) {
        Some(s) => u16::from_le_bytes([s[0], s[1]]),
        None => 0,
    }
}

/// The 32-bit little-endian field at `at`, or 0.
pub(crate) fn le32(b: &[u8], at: usize) -> u32 {
    match at.checked_add(4).and_then(|end| b.get(at..end)) {
        Some(s) => u32::from_le_bytes([s[0], s[1], s[2], s[3]]),
        None => 0,
    }
}

/// The 64-bit little-endian field at `at`, or 0.
pub(crate) fn le64(b: &[u8], at: usize) -> u64 {
    match at.checked_add(8).and_then(|end| b.get(at..end)) {
        Some(s) => u64::from_le_bytes([s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7]]),
        None => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_outside_the_slice_read_as_zero() {
        let b = [1u8, 2, 3, 4, 5, 6, 7, 8];
        assert_eq!(le16(&b, 0), 0x0201);
        assert_eq!(le32(&b, 4), 0x0807_0605);
        assert_eq!(le64(&b, 0), 0x0807_0605_0403_0201);
        assert_eq!(le32(&b, 6), 0);
        assert_eq!(le64(&b, usize::MAX), 0);
    }
}
