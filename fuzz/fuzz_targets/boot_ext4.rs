//! ext2/3/4 over arbitrary bytes: open, list and read everything reachable with small limits
//! ([`xdisk_boot::fs::exercise`]). Errors are fine; panics, hangs and unbounded allocations
//! are not.
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use xdisk_boot::disk::ReadAt;
use xdisk_boot::fs::{exercise, small_limits};

fuzz_target!(|data: &[u8]| {
    let disk: Arc<dyn ReadAt> = xdisk_fuzz::disk(data);
    let Ok(fs) = xdisk_boot::fs::ext4::Ext4Fs::open(disk, &small_limits()) else {
        return;
    };
    exercise(&fs, 200);
});
