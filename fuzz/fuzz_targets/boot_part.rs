//! Partition tables and the whole choice pipeline on arbitrary bytes: every place found lies
//! inside the disk, and finding a kernel errs or succeeds, never panics or hangs.
#![no_main]

use libfuzzer_sys::fuzz_target;
use xdisk_boot::disk::ReadAt;
use xdisk_boot::find::{choose, BootRequest};
use xdisk_boot::Limits;

fuzz_target!(|data: &[u8]| {
    let disk = xdisk_fuzz::disk(data);
    let len = disk.size();
    if let Ok(parts) = xdisk_boot::part::filesystems(&*disk) {
        for p in parts {
            assert!(p.start.saturating_add(p.len) <= len);
        }
    }
    let req = BootRequest {
        limits: Limits {
            max_file: 1 << 20,
            max_config: 64 << 10,
            max_dir_entries: 256,
            ..Limits::default()
        },
        ..BootRequest::default()
    };
    let _ = choose(&disk, &req);
});
