//! extlinux/syslinux/isolinux config parsing of arbitrary bytes: no panic, a default inside
//! the list, and every relative path made absolute.
#![no_main]

use libfuzzer_sys::fuzz_target;
use xdisk_boot::config::extlinux;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Ok(c) = extlinux::parse(&text, "/boot/extlinux") {
        assert!(c.entries.is_empty() || c.default < c.entries.len());
        for e in &c.entries {
            for p in e.kernel.iter().chain(e.initrd.iter()) {
                assert!(p.starts_with('/'));
            }
        }
    }
});
