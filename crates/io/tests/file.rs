//! ImageFile: synchronous I/O at any alignment, on O_DIRECT and buffered files alike.

mod support;

use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};
use support::direct_capable_dir;
use xdisk_io::{Alignment, CacheMode, ImageFile};

fn pair(size: usize, seed: u64) -> (tempfile::TempDir, ImageFile, ImageFile, Vec<u8>) {
    let dir = direct_capable_dir();
    let mut data = vec![0u8; size];
    StdRng::seed_from_u64(seed).fill_bytes(&mut data);
    let a = dir.path().join("direct.img");
    let b = dir.path().join("buffered.img");
    std::fs::write(&a, &data).unwrap();
    std::fs::write(&b, &data).unwrap();
    let direct = ImageFile::open(&a, false, CacheMode::None).unwrap();
    let buffered = ImageFile::open(&b, false, CacheMode::WriteBack).unwrap();
    (dir, direct, buffered, data)
}

fn contents(f: &ImageFile) -> Vec<u8> {
    std::fs::read(f.path()).unwrap()
}

#[test]
fn alignment_probe_is_sane() {
    let (_dir, direct, buffered, _) = pair(64 * 1024, 1);
    assert_eq!(buffered.alignment(), Alignment::NONE);
    let a = direct.alignment();
    assert!(
        a.offset.is_power_of_two() && (512..=65536).contains(&a.offset),
        "{a:?}"
    );
    assert!(a.memory.is_power_of_two() && a.memory <= 65536, "{a:?}");
    assert!(a.buffer_align() >= 4096 && a.buffer_align() % a.offset as usize == 0);
    assert!(a.allows(0, a.offset as usize, 0));
    assert!(!a.allows(1, a.offset as usize, 0));
    assert_eq!(direct.cache(), CacheMode::None);

    // An empty file probes to something sane too (trial reads return nothing).
    let dir = direct_capable_dir();
    let p = dir.path().join("empty.img");
    let empty = ImageFile::create(&p, CacheMode::None).unwrap();
    let a = empty.alignment();
    assert!(
        a.offset.is_power_of_two() && (512..=65536).contains(&a.offset),
        "{a:?}"
    );
    assert!(empty.is_empty().unwrap());
}

/// Random unaligned reads and writes (from unaligned memory too) give the same bytes, and
/// the same file size, on an O_DIRECT file as on a buffered one.
#[test]
fn unaligned_io_matches_buffered() {
    const SIZE: usize = 256 * 1024 + 1234;
    let (_dir, direct, buffered, mut model) = pair(SIZE, 2);
    let mut rng = StdRng::seed_from_u64(3);
    let mut scratch = vec![0u8; 70_000];
    for i in 0..400 {
        let len = match rng.gen_range(0..4) {
            0 => rng.gen_range(1..16),
            1 => rng.gen_range(1..5000),
            2 => 4096 * rng.gen_range(1..4),
            _ => rng.gen_range(1..60_000),
        };
        let off = if rng.gen_bool(0.3) {
            rng.gen_range(0..(SIZE - len) as u64 / 4096) * 4096
        } else {
            rng.gen_range(0..(SIZE - len) as u64)
        };
        // Memory misaligned by 0..8 bytes.
        let skew = rng.gen_range(0..8);
        let buf = &mut scratch[skew..skew + len];
        if i % 2 == 0 {
            rng.fill_bytes(buf);
            direct.write_at(buf, off).unwrap();
            buffered.write_at(buf, off).unwrap();
            model[off as usize..off as usize + len].copy_from_slice(buf);
        } else {
            direct.read_at(buf, off).unwrap();
            assert!(
                buf == &model[off as usize..off as usize + len],
                "direct read at {off}+{len}"
            );
            buf.fill(0);
            buffered.read_at(buf, off).unwrap();
            assert!(
                buf == &model[off as usize..off as usize + len],
                "buffered read at {off}+{len}"
            );
        }
    }
    assert!(contents(&direct) == model);
    assert!(contents(&buffered) == model);
}

/// Reads past the end of the file read zeroes; writes past the end extend the file to
/// exactly where the write ends, as a buffered write would (not to the next block).
#[test]
fn io_at_end_of_file() {
    const SIZE: usize = 3 * 4096 + 100;
    let (_dir, direct, buffered, mut model) = pair(SIZE, 4);
    for f in [&direct, &buffered] {
        let mut buf = vec![0xffu8; 300];
        f.read_at(&mut buf, SIZE as u64 - 100).unwrap();
        assert_eq!(&buf[..100], &model[SIZE - 100..]);
        assert!(buf[100..].iter().all(|&b| b == 0));
        let mut buf = vec![0xffu8; 50];
        f.read_at(&mut buf, 1 << 20).unwrap();
        assert!(buf.iter().all(|&b| b == 0));
    }
    // Unaligned write straddling the end of the file.
    let data = vec![0x77u8; 200];
    direct.write_at(&data, SIZE as u64 - 50).unwrap();
    buffered.write_at(&data, SIZE as u64 - 50).unwrap();
    model.truncate(SIZE - 50);
    model.extend_from_slice(&data);
    assert_eq!(direct.len().unwrap(), model.len() as u64);
    assert_eq!(buffered.len().unwrap(), model.len() as u64);
    assert!(contents(&direct) == model);
    assert!(contents(&buffered) == model);
    // Unaligned write beyond the end (leaves a gap of zeroes).
    let at = model.len() + 5000;
    direct.write_at(&data, at as u64).unwrap();
    buffered.write_at(&data, at as u64).unwrap();
    model.resize(at, 0);
    model.extend_from_slice(&data);
    assert_eq!(direct.len().unwrap(), model.len() as u64);
    assert!(contents(&direct) == model);
    assert!(contents(&buffered) == model);
}

#[test]
fn zero_range_and_punch_hole() {
    const SIZE: usize = 1 << 20;
    for cache in [CacheMode::None, CacheMode::WriteBack] {
        let dir = direct_capable_dir();
        let p = dir.path().join("z.img");
        std::fs::write(&p, vec![0xeeu8; SIZE]).unwrap();
        let f = ImageFile::open(&p, false, cache).unwrap();
        let mut model = vec![0xeeu8; SIZE];
        let before = f.allocated_bytes().unwrap();

        // Aligned: fallocate ZERO_RANGE (or PUNCH_HOLE).
        f.zero_range(64 * 1024, 128 * 1024).unwrap();
        model[64 * 1024..192 * 1024].fill(0);
        // Unaligned: falls back to writing zeroes (read-modify-write on O_DIRECT).
        f.zero_range(300_001, 12_345).unwrap();
        model[300_001..312_346].fill(0);
        // Past the end: clipped, the size does not change.
        f.zero_range(SIZE as u64 - 1000, 1 << 20).unwrap();
        model[SIZE - 1000..].fill(0);
        f.zero_range(SIZE as u64 * 2, 4096).unwrap();
        f.zero_range(0, 0).unwrap();
        assert_eq!(f.len().unwrap(), SIZE as u64);

        f.punch_hole(512 * 1024, 256 * 1024).unwrap();
        model[512 * 1024..768 * 1024].fill(0);
        f.punch_hole(0, 0).unwrap();
        assert_eq!(f.len().unwrap(), SIZE as u64, "punch_hole keeps the size");
        let after = f.allocated_bytes().unwrap();
        assert!(
            after <= before - 256 * 1024,
            "{cache}: punching 256 KiB freed only {} bytes",
            before - after
        );

        let mut buf = vec![0u8; SIZE];
        f.read_at(&mut buf, 0).unwrap();
        assert!(buf == model, "{cache}: contents differ after zeroing");
        assert!(contents(&f) == model);

        f.write_zeroes_by_writing(10, 100).unwrap();
        model[10..110].fill(0);
        f.flush().unwrap();
        assert!(contents(&f) == model);

        // allocate extends the file.
        f.allocate(SIZE as u64, 4096).unwrap();
        assert_eq!(f.len().unwrap(), SIZE as u64 + 4096);
    }
}

#[test]
fn set_len_and_metadata() {
    let dir = direct_capable_dir();
    let p = dir.path().join("m.img");
    let f = ImageFile::create(&p, CacheMode::None).unwrap();
    assert!(!f.read_only() && !f.is_block_device());
    f.set_len(10 * 4096).unwrap();
    assert_eq!(f.len().unwrap(), 10 * 4096);
    let ro = ImageFile::open(&p, true, CacheMode::WriteBack).unwrap();
    assert!(ro.read_only());
    assert!(ro.write_at(b"x", 0).is_err());
    let missing = ImageFile::open(&dir.path().join("nope"), false, CacheMode::None);
    assert!(missing.is_err());
}

#[test]
fn opening_a_fifo_fails_instead_of_blocking() {
    // A FIFO swapped in where an image or a checked backing file was used to block the open
    // until a writer came (for ever); now the open is non-blocking and the type refused.
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("fifo");
    let st = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(st.success());
    let (tx, rx) = std::sync::mpsc::channel();
    let path = fifo.clone();
    std::thread::spawn(move || {
        for ro in [true, false] {
            let r = ImageFile::open(&path, ro, CacheMode::WriteBack).map(|_| ());
            let _ = tx.send(r.map_err(|e| e.to_string()));
        }
    });
    for _ in 0..2 {
        let r = rx
            .recv_timeout(std::time::Duration::from_secs(30))
            .expect("opening a FIFO blocked");
        let e = r.expect_err("a FIFO opened as an image");
        assert!(e.contains("not a regular file or block device"), "{e}");
    }
}

#[test]
fn opened_files_do_blocking_io() {
    // O_NONBLOCK is only for the open: the file's flags no longer carry it.
    let (_dir, direct, buffered, _) = pair(8192, 3);
    for f in [&direct, &buffered] {
        use std::os::unix::io::AsRawFd;
        let flags =
            std::fs::read_to_string(format!("/proc/self/fdinfo/{}", f.file().as_raw_fd())).unwrap();
        let flags = flags
            .lines()
            .find_map(|l| l.strip_prefix("flags:"))
            .map(|v| u32::from_str_radix(v.trim(), 8).unwrap())
            .unwrap();
        assert_eq!(flags & libc::O_NONBLOCK as u32, 0, "O_NONBLOCK left set");
    }
}
