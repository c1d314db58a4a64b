//! GRUB legacy menu.lst parsing of arbitrary bytes: no panic, a default inside the list.
#![no_main]

use libfuzzer_sys::fuzz_target;
use xdisk_boot::config::legacy;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Ok(c) = legacy::parse(&text) {
        assert!(c.entries.is_empty() || c.default < c.entries.len());
    }
});
