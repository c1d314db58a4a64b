//! Virtual device numbers of Xen vbds and their `xvd` names (xen/include/public/io/blkif.h,
//! docs/misc/vbd-interface.pandoc): `xvdX` with disk index `i` is `(202 << 8) | (i << 4)` for
//! `i < 16` and `(1 << 28) | (i << 8)` beyond (the extended scheme); Linux names disk `i` as
//! `xvd` + letters the way it names `sd` disks (a..z, aa..zz, aaa...).

/// The Xen vbd major number.
pub const XVD_MAJOR: u32 = 202;
/// The extended-scheme flag.
pub const EXTENDED: u32 = 1 << 28;
/// Largest disk index of the extended scheme (20 bits).
pub const MAX_INDEX: u32 = (1 << 20) - 1;

/// The device number of whole disk `index` (`xvda` is 0).
pub fn devid_of_index(index: u32) -> Option<u32> {
    if index < 16 {
        Some((XVD_MAJOR << 8) | (index << 4))
    } else if index <= MAX_INDEX {
        Some(EXTENDED | (index << 8))
    } else {
        None
    }
}

/// The disk index and partition of a device number, for `xvd` devices.
pub fn index_of_devid(devid: u32) -> Option<(u32, u32)> {
    if devid & EXTENDED != 0 {
        if devid >> 29 != 0 {
            return None;
        }
        Some(((devid >> 8) & MAX_INDEX, devid & 0xff))
    } else if devid >> 8 == XVD_MAJOR {
        Some(((devid & 0xff) >> 4, devid & 0xf))
    } else {
        None
    }
}

/// `xvd` + the letters of disk `index` (0 → `xvda`, 25 → `xvdz`, 26 → `xvdaa`).
pub fn name_of_index(index: u32) -> String {
    let mut letters = Vec::new();
    let mut n = u64::from(index) + 1;
    while n > 0 {
        n -= 1;
        letters.push(b'a' + (n % 26) as u8);
        n /= 26;
    }
    letters.reverse();
    format!("xvd{}", String::from_utf8(letters).unwrap_or_default())
}

/// The disk index of an `xvd` name (`xvdb`, `/dev/xvdb`); partitions are refused.
pub fn index_of_name(name: &str) -> Option<u32> {
    let letters = name
        .strip_prefix("/dev/")
        .unwrap_or(name)
        .strip_prefix("xvd")?;
    if letters.is_empty() || letters.len() > 5 || !letters.bytes().all(|b| b.is_ascii_lowercase()) {
        return None;
    }
    let mut n: u64 = 0;
    for b in letters.bytes() {
        n = n * 26 + u64::from(b - b'a') + 1;
    }
    u32::try_from(n - 1).ok().filter(|&i| i <= MAX_INDEX)
}

/// The name of a whole-disk device number (`None` for partitions and non-xvd numbers).
pub fn name_of_devid(devid: u32) -> Option<String> {
    match index_of_devid(devid)? {
        (index, 0) => Some(name_of_index(index)),
        _ => None,
    }
}

/// A device given as a number (`51712`) or a name (`xvda`, `/dev/xvda`).
pub fn parse_device(s: &str) -> Option<u32> {
    if !s.is_empty() && s.len() <= 10 && s.bytes().all(|b| b.is_ascii_digit()) {
        return s.parse().ok();
    }
    devid_of_index(index_of_name(s)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_numbers() {
        assert_eq!(devid_of_index(0), Some(51712));
        assert_eq!(devid_of_index(1), Some(51728));
        assert_eq!(name_of_devid(51712).as_deref(), Some("xvda"));
        assert_eq!(name_of_devid(51728).as_deref(), Some("xvdb"));
        assert_eq!(name_of_devid(51713), None, "a partition");
        assert_eq!(name_of_devid(768), None, "hda");
        assert_eq!(name_of_index(25), "xvdz");
        assert_eq!(name_of_index(26), "xvdaa");
        assert_eq!(name_of_index(701), "xvdzz");
        assert_eq!(name_of_index(702), "xvdaaa");
        for i in [0, 1, 15, 16, 17, 25, 26, 27, 701, 702, 5000, MAX_INDEX] {
            let d = devid_of_index(i).unwrap();
            assert_eq!(index_of_devid(d), Some((i, 0)));
            assert_eq!(index_of_name(&name_of_index(i)), Some(i));
            assert_eq!(parse_device(&name_of_index(i)), Some(d));
        }
        assert_eq!(devid_of_index(16), Some(EXTENDED | (16 << 8)));
        assert_eq!(parse_device("/dev/xvdb"), Some(51728));
        assert_eq!(parse_device("51728"), Some(51728));
        for bad in [
            "",
            "xvd",
            "xvdA",
            "xvda1",
            "sda",
            "xvdzzzzzz",
            "99999999999",
            "-1",
        ] {
            assert_eq!(parse_device(bad), None, "{bad}");
        }
    }
}
