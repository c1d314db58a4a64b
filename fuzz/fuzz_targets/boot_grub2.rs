//! GRUB 2 grub.cfg parsing of arbitrary bytes. The input is split at the first NUL: before it
//! the grub.cfg, after it a grubenv (for `saved_entry`). Checks the parser's promises: no
//! panic, and a default inside the entry list.
#![no_main]

use libfuzzer_sys::fuzz_target;
use xdisk_boot::config::grub2;
use xdisk_boot::config::grubenv::GrubEnv;

fuzz_target!(|data: &[u8]| {
    let (cfg, env) = match data.iter().position(|&b| b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    let text = String::from_utf8_lossy(cfg);
    let env = GrubEnv::parse(&String::from_utf8_lossy(env));
    if let Ok(c) = grub2::parse(&text, &env) {
        assert!(c.entries.is_empty() || c.default < c.entries.len());
    }
});
