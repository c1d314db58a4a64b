//! ISO 9660 (Rock Ridge, Joliet) over arbitrary bytes: open, list and read everything
//! reachable with small limits. Must never panic, hang or allocate without bound.
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use xdisk_boot::disk::MemDisk;
use xdisk_boot::fs::iso9660::Iso9660;
use xdisk_boot::fs::{FileSystem, NodeKind, Walk};
use xdisk_boot::Limits;

fuzz_target!(|data: &[u8]| {
    let Ok(iso) = Iso9660::open(Arc::new(MemDisk(data.to_vec()))) else {
        return;
    };
    let limits = Limits {
        max_file: 1 << 20,
        max_config: 64 << 10,
        max_dir_entries: 64,
        max_symlinks: 8,
        max_path_components: 32,
    };
    let fs = Walk::new(iso, limits);
    for p in ["/isolinux/isolinux.cfg", "/boot/grub/grub.cfg", "/a/../b/./c"] {
        let _ = fs.read_file(p, 64 << 10);
    }
    // Breadth-first over the tree, bounded in depth and in total entries.
    let mut todo = vec![(String::new(), 0u32)];
    let mut seen = 0u32;
    while let Some((dir, depth)) = todo.pop() {
        let path = if dir.is_empty() { "/".to_string() } else { dir.clone() };
        let Ok(names) = fs.read_dir(&path) else {
            continue;
        };
        for name in names {
            seen += 1;
            if seen > 256 {
                return;
            }
            let p = format!("{dir}/{name}");
            match fs.kind(&p) {
                Ok(Some(NodeKind::Dir)) if depth < 8 => todo.push((p, depth + 1)),
                Ok(Some(NodeKind::File)) => {
                    let _ = fs.read_file(&p, 64 << 10);
                }
                _ => {}
            }
        }
    }
});
