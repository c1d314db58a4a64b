//! FAT12/16/32 over arbitrary bytes: open, list and read everything reachable with small limits
//! ([`xdisk_boot::fs::exercise`]). Errors are fine; panics, hangs and unbounded allocations
//! are not.
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use xdisk_boot::disk::ReadAt;
use xdisk_boot::fs::{exercise, small_limits};

fuzz_target!(|data: &[u8]| {
    let disk: Arc<dyn ReadAt> = xdisk_fuzz::disk(data);
    let Ok(fat) = xdisk_boot::fs::fat::Fat::open(disk) else {
        return;
    };
    exercise(&xdisk_boot::fs::Walk::new(fat, small_limits()), 200);
});
