//! Runs `check` (read-only) on arbitrary bytes (plain or sparse, held in memory): errors are
//! fine, panics and hangs are not.
#![no_main]

use libfuzzer_sys::fuzz_target;
use xdisk_image::{check, Format, Repair};

fuzz_target!(|data: &[u8]| {
    let storage = xdisk_fuzz::storage(data, true);
    let _ = check(&*storage, Format::Qcow2, Repair::None);
});
