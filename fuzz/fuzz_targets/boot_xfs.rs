//! The XFS reader on arbitrary bytes: open, then list and read everything reachable from
//! the root (bounded), with small limits. Must never panic, hang or allocate without bound.
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use xdisk_boot::disk::MemDisk;
use xdisk_boot::fs::xfs::Xfs;
use xdisk_boot::fs::{FileSystem, NodeKind, Walk};
use xdisk_boot::Limits;

fuzz_target!(|data: &[u8]| {
    let disk = Arc::new(MemDisk(data.to_vec()));
    let Ok(xfs) = Xfs::open(disk) else {
        return;
    };
    let limits = Limits {
        max_file: 1 << 20,
        max_config: 1 << 16,
        max_dir_entries: 64,
        max_symlinks: 8,
        max_path_components: 32,
    };
    let fs = Walk::new(xfs, limits);
    // Breadth-first over at most 256 paths, 4 levels deep.
    let mut todo = vec![(String::from("/"), 0u32)];
    let mut visited = 0;
    while let Some((path, depth)) = todo.pop() {
        visited += 1;
        if visited > 256 {
            break;
        }
        match fs.kind(&path) {
            Ok(Some(NodeKind::Dir)) if depth < 4 => {
                if let Ok(names) = fs.read_dir(&path) {
                    for name in names {
                        let child = format!("{}/{}", path.trim_end_matches('/'), name);
                        todo.push((child, depth + 1));
                    }
                }
            }
            Ok(Some(NodeKind::File)) => {
                let _ = fs.read_file(&path, 1 << 20);
            }
            _ => {}
        }
    }
});
