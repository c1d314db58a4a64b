//! ISO 9660 (Rock Ridge, Joliet) over arbitrary bytes: open, list and read everything reachable with small limits
//! ([`xdisk_boot::fs::exercise`]). Errors are fine; panics, hangs and unbounded allocations
//! are not.
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use xdisk_boot::disk::ReadAt;
use xdisk_boot::fs::{exercise, small_limits};

fuzz_target!(|data: &[u8]| {
    let disk: Arc<dyn ReadAt> = xdisk_fuzz::disk(data);
    let Ok(iso) = xdisk_boot::fs::iso9660::Iso9660::open(disk) else {
        return;
    };
    exercise(&xdisk_boot::fs::Walk::new(iso, small_limits()), 256);
});
