//! Opens arbitrary bytes as ext2/3/4 and lists and
//! reads everything, with small limits: errors are fine, panics and hangs are not.
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use xdisk_boot::disk::{MemDisk, ReadAt};
use xdisk_boot::fs::ext4::Ext4Fs;
use xdisk_boot::fs::{FileSystem, NodeKind};
use xdisk_boot::Limits;

/// Lists `dir` and everything under it (depth and count bounded), reading every file.
fn walk(fs: &dyn FileSystem, dir: &str, depth: u32, budget: &mut u32) {
    let Ok(names) = fs.read_dir(dir) else { return };
    for name in names {
        if *budget == 0 {
            return;
        }
        *budget -= 1;
        let path = format!("{}/{name}", dir.trim_end_matches('/'));
        match fs.kind(&path) {
            Ok(Some(NodeKind::Dir)) if depth > 0 => walk(fs, &path, depth - 1, budget),
            _ => {
                let _ = fs.read_file(&path, 1 << 20);
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let limits = Limits {
        max_file: 1 << 20,
        max_config: 64 << 10,
        max_dir_entries: 64,
        max_symlinks: 8,
        max_path_components: 32,
    };
    let disk: Arc<dyn ReadAt> = Arc::new(MemDisk(data.to_vec()));
    let Ok(fs) = Ext4Fs::open(disk, &limits) else { return };
    let mut budget = 200;
    walk(&fs, "/", 4, &mut budget);
    for p in ["/boot/grub/grub.cfg", "/vmlinuz", "/../x/../boot/../"] {
        let _ = fs.kind(p);
        let _ = fs.read_file(p, 1 << 20);
    }
});
