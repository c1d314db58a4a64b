//! XFS (v4, v5) over arbitrary bytes: open, list and read everything reachable with small limits
//! ([`xdisk_boot::fs::exercise`]). Errors are fine; panics, hangs and unbounded allocations
//! are not.
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use xdisk_boot::disk::ReadAt;
use xdisk_boot::fs::{exercise, small_limits};

fuzz_target!(|data: &[u8]| {
    let disk: Arc<dyn ReadAt> = xdisk_fuzz::disk(data);
    let Ok(xfs) = xdisk_boot::fs::xfs::Xfs::open(disk) else {
        return;
    };
    exercise(&xdisk_boot::fs::Walk::new(xfs, small_limits()), 256);
});
