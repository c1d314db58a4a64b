//! Opens arbitrary bytes (plain or sparse, held in memory) as an image (qcow2 when the magic says so, raw otherwise) and reads
//! it all, maps it and asks for its block status; then opens it writable (a dirty image gets
//! repaired, within its memory limit) and writes and flushes a little: errors are fine,
//! panics and hangs are not.
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
    let _ = img.flush();
});
