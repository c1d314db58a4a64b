//! Sizes as qemu-img reads and prints them.

use anyhow::{bail, Result};

/// Parses `1024`, `64k`, `1.5G`, `10M`, `2T` (binary units, like qemu-img; `b` = bytes).
pub fn parse_size(s: &str) -> Result<u64> {
    let s = s.trim();
    let (num, mult) = match s.chars().last() {
        Some(c) if c.is_ascii_alphabetic() => {
            let m: u64 = match c.to_ascii_lowercase() {
                'b' => 1,
                'k' => 1 << 10,
                'm' => 1 << 20,
                'g' => 1 << 30,
                't' => 1 << 40,
                'p' => 1 << 50,
                'e' => 1 << 60,
                _ => bail!("invalid size suffix in '{s}' (use k, M, G, T, P or E)"),
            };
            (&s[..s.len() - 1], m)
        }
        _ => (s, 1),
    };
    if num.is_empty() {
        bail!("invalid size '{s}'");
    }
    if let Ok(n) = num.parse::<u64>() {
        return n
            .checked_mul(mult)
            .ok_or_else(|| anyhow::anyhow!("size '{s}' too large"));
    }
    let f: f64 = num
        .parse()
        .map_err(|_| anyhow::anyhow!("invalid size '{s}'"))?;
    if !f.is_finite() || f < 0.0 {
        bail!("invalid size '{s}'");
    }
    let v = f * mult as f64;
    if v >= u64::MAX as f64 {
        bail!("size '{s}' too large");
    }
    Ok(v as u64)
}

/// Formats like QEMU's size_to_str: three significant digits and a binary unit.
pub fn human(size: u64) -> String {
    const UNITS: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    let mut v = size as f64;
    let mut i = 0;
    // QEMU switches unit when the value reaches 1000 (so that at most 3 digits show).
    while v >= 999.5 && i < UNITS.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        return format!("{size} B");
    }
    let s = if v >= 99.95 {
        format!("{v:.0}")
    } else if v >= 9.995 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    };
    // %g drops trailing zeros.
    let s = if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    };
    format!("{s} {}", UNITS[i])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_like_qemu_img() {
        assert_eq!(parse_size("1024").unwrap(), 1024);
        assert_eq!(parse_size("64k").unwrap(), 65536);
        assert_eq!(parse_size("1G").unwrap(), 1 << 30);
        assert_eq!(parse_size("1.5M").unwrap(), 1536 * 1024);
        assert!(parse_size("x").is_err());
        assert!(parse_size("99999999E").is_err());
        assert!(parse_size("").is_err());
    }

    #[test]
    fn sizes_print_like_qemu_img() {
        assert_eq!(human(64 << 20), "64 MiB");
        assert_eq!(human(397312), "388 KiB");
        assert_eq!(human(458752), "448 KiB");
        assert_eq!(human(1536 << 20), "1.5 GiB");
        assert_eq!(human(512), "512 B");
    }
}
