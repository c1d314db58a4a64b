//! Opens arbitrary bytes (plain or sparse, held in memory) as an image (qcow2 when the magic says so, raw otherwise) and reads
//! it all, maps it and asks for its block status; then opens it writable (a dirty image gets
//! repaired, within its memory limit; persistent bitmaps are loaded and marked in use) and
//! writes a little, works its bitmaps (add, read, merge, clear, disable, remove) and
//! flushes and closes (the bitmaps are stored): errors are fine, panics and hangs are not.
#![no_main]

use libfuzzer_sys::fuzz_target;
use xdisk_image::{CacheMode, Image, OpenOptions};

fuzz_target!(|data: &[u8]| {
    // The input lives in memory (xdisk_fuzz::FuzzStorage): the formats run over a storage
    // that is not a file, and no syscall slows the loop down.
    let opts = OpenOptions {
        read_only: true,
        cache: CacheMode::WriteBack,
        open_backing: false,
        // Hostile bitmaps may claim up to QEMU's 512 MiB each: keep the loop fast.
        bitmap_memory_limit: 16 << 20,
        // And a dirty image's refcount rebuild to 1 MiB of counts (half a million clusters of
        // the file): the rebuild and its refusal are both reached, each in milliseconds
        // (the default 256 MiB let one input walk 10^8 clusters).
        repair_memory_limit: 1 << 20,
        ..OpenOptions::default()
    };
    let Ok(img) = Image::open_on(xdisk_fuzz::storage(data, true), &opts) else {
        return;
    };
    // Bound the work: hostile headers may claim huge virtual sizes.
    let size = img.size().min(4 << 20);
    let mut buf = vec![0u8; 64 << 10];
    let mut off = 0;
    while off < size {
        let n = (size - off).min(buf.len() as u64) as usize;
        let _ = img.read_at(&mut buf[..n], off);
        let _ = img.block_status(off, n as u64);
        let mut ext = Vec::new();
        let _ = img.map(off, n as u64, false, &mut ext);
        off += n as u64;
    }
    drop(img);
    // Writable: the open may repair; a small write at the start and at the end, then a flush.
    let opts = OpenOptions {
        read_only: false,
        ..opts
    };
    let Ok(img) = Image::open_on(xdisk_fuzz::storage(data, false), &opts) else {
        return;
    };
    let size = img.size();
    let buf = vec![0x5au8; 4096];
    let _ = img.write_at(&buf[..4096.min(size as usize)], 0);
    if size > 8192 {
        let _ = img.write_at(&buf[..512], (size - 512) & !511);
    }
    if let Some(q) = img.as_qcow2() {
        let names: Vec<String> = q.bitmaps().into_iter().map(|b| b.name).collect();
        let _ = q.add_bitmap("fuzz", Some(65536), true);
        for n in names.iter().take(4) {
            if let Ok(bits) = q.bitmap(n) {
                let _ = bits.dirty_ranges();
                let _ = q.merge_bitmap("fuzz", &bits);
            }
            let _ = q.set_bitmap_enabled(n, false);
        }
        let _ = img.write_at(&buf[..512], 0);
        if let Some(n) = names.first() {
            let _ = q.clear_bitmap(n);
            let _ = q.remove_bitmap(n);
        }
    }
    let _ = img.flush();
    let _ = img.close();
});
