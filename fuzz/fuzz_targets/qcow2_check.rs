//! Runs `check` (read-only) on arbitrary bytes: errors are fine, panics and hangs are not.
#![no_main]

use libfuzzer_sys::fuzz_target;
use xdisk_image::qcow2::check::{check, Repair};
use xdisk_image::{CacheMode, ImageFile};

fuzz_target!(|data: &[u8]| {
    let dir = std::env::temp_dir().join(format!("xdisk-fuzz-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    let path = dir.join("check");
    if xdisk_fuzz::write_image(&path, data).is_err() {
        return;
    }
    if let Ok(f) = ImageFile::open(&path, true, CacheMode::WriteBack) {
        let _ = check(&f, Repair::None);
    }
});
