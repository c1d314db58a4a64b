//! ext2/3/4 through `fs::open`: real images made with mke2fs -d (e2fsprogs), read back and
//! compared; hostile images (random and hand-made corruption) give errors, never panics.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use proptest::prelude::*;
use xdisk_boot::disk::{MemDisk, ReadAt};
use xdisk_boot::fs::{self, FileSystem, NodeKind};
use xdisk_boot::{Error, Limits};

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(7).wrapping_add(seed as u32) as u8 ^ (i >> 11) as u8)
        .collect()
}

const BIG: usize = 300_000;
const SLOW_TARGET: &str = "./././././././././././././././././././././././a/b/c/../c/deep.txt";

/// The source tree put into every image.
fn make_tree(dir: &Path, big_dir: bool) {
    use std::os::unix::fs::symlink;
    let w = |p: &str, data: &[u8]| {
        let p = dir.join(p);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, data).unwrap();
    };
    w("boot/vmlinuz", &pattern(BIG, 1));
    w("boot/initrd.img", &pattern(70_000, 2));
    w("empty", b"");
    w("a/b/c/deep.txt", b"deep file\n");
    let long = "L".repeat(200);
    w(&format!("a/{long}"), b"long name\n");
    // Sparse: 8 MiB with data at 0 and at 6 MiB (holes spanning whole indirect blocks).
    {
        use std::io::{Seek, SeekFrom, Write};
        let mut f = std::fs::File::create(dir.join("sparse")).unwrap();
        f.write_all(b"start").unwrap();
        f.seek(SeekFrom::Start(6 << 20)).unwrap();
        f.write_all(b"middle").unwrap();
        f.set_len(8 << 20).unwrap();
        // 64 chunks of 4 KiB every 8 KiB: 64 extents, more than the inode's 4 (an extent
        // index node); in ext2/3 with 1 KiB blocks, 70 MiB reaches the triple indirect block.
        let mut f = std::fs::File::create(dir.join("holes")).unwrap();
        for i in 0..64u64 {
            f.seek(SeekFrom::Start(i * 8192)).unwrap();
            f.write_all(&pattern(4096, i as u8)).unwrap();
        }
        f.seek(SeekFrom::Start(70 << 20)).unwrap();
        f.write_all(b"end").unwrap();
    }
    symlink("vmlinuz", dir.join("boot/fast")).unwrap();
    assert!(SLOW_TARGET.len() > 60);
    symlink(SLOW_TARGET, dir.join("slow")).unwrap();
    symlink("/boot/vmlinuz", dir.join("abs")).unwrap();
    symlink("loop2", dir.join("loop1")).unwrap();
    symlink("loop1", dir.join("loop2")).unwrap();
    symlink("../../../../../../../boot/vmlinuz", dir.join("a/b/escape")).unwrap();
    symlink("/a/b", dir.join("dirlink")).unwrap();
    if big_dir {
        std::fs::create_dir_all(dir.join("big")).unwrap();
        for i in 0..600 {
            std::fs::write(
                dir.join(format!("big/entry_with_a_longish_name_{i}")),
                i.to_string(),
            )
            .unwrap();
        }
    }
}

fn run(cmd: &mut Command, pkg: &str) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e} (install the Debian package {pkg})"));
    // e2fsck exits 1 when it changed the filesystem (-D).
    let ok = out.status.success()
        || (format!("{cmd:?}").contains("e2fsck") && out.status.code() == Some(1));
    assert!(
        ok,
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// mke2fs -t `kind` -b `block` `extra` -d tree; with `index`, e2fsck -fyD afterwards (htree).
fn make_image(kind: &str, block: u32, extra: &[&str], index: bool) -> Vec<u8> {
    let tmp = tempfile::TempDir::new().unwrap();
    let src = tmp.path().join("src");
    std::fs::create_dir(&src).unwrap();
    make_tree(&src, index);
    let img = tmp.path().join("img");
    let mut c = Command::new("mke2fs");
    c.args(["-q", "-F", "-t", kind, "-b", &block.to_string()])
        .args(extra)
        .arg("-d")
        .arg(&src)
        .arg(&img)
        .arg("16M");
    run(&mut c, "e2fsprogs");
    if index {
        run(Command::new("e2fsck").arg("-fyD").arg(&img), "e2fsprogs");
    }
    std::fs::read(&img).unwrap()
}

fn open(img: Vec<u8>) -> Box<dyn FileSystem> {
    let disk: Arc<dyn ReadAt> = Arc::new(MemDisk(img));
    fs::open(disk, &Limits::default())
        .unwrap()
        .expect("no filesystem found")
}

fn check_tree(fs: &dyn FileSystem, big_dir: bool) {
    assert_eq!(fs.fs_type(), "ext4");
    let lim = 1 << 30;
    assert_eq!(fs.read_file("/boot/vmlinuz", lim).unwrap(), pattern(BIG, 1));
    assert_eq!(
        fs.read_file("boot//initrd.img", lim).unwrap(),
        pattern(70_000, 2)
    );
    assert_eq!(fs.read_file("/empty", lim).unwrap(), b"");
    assert_eq!(
        fs.read_file("/a/b/c/deep.txt", lim).unwrap(),
        b"deep file\n"
    );
    let long = "L".repeat(200);
    assert_eq!(
        fs.read_file(&format!("/a/{long}"), lim).unwrap(),
        b"long name\n"
    );
    // Symlinks: fast, slow, absolute, escaping with "..", through a directory link.
    assert_eq!(fs.read_file("/boot/fast", lim).unwrap(), pattern(BIG, 1));
    assert_eq!(fs.read_file("/slow", lim).unwrap(), b"deep file\n");
    assert_eq!(fs.read_file("/abs", lim).unwrap(), pattern(BIG, 1));
    assert_eq!(fs.read_file("/a/b/escape", lim).unwrap(), pattern(BIG, 1));
    assert_eq!(
        fs.read_file("/dirlink/c/deep.txt", lim).unwrap(),
        b"deep file\n"
    );
    assert_eq!(
        fs.read_file("/../../a/../boot/./vmlinuz", lim).unwrap(),
        pattern(BIG, 1)
    );
    assert!(matches!(
        fs.read_file("/loop1", lim),
        Err(Error::SymlinkLoop(_))
    ));
    assert!(matches!(
        fs.read_file("/nope", lim),
        Err(Error::NotFound(_))
    ));
    assert!(matches!(
        fs.read_file("/boot", lim),
        Err(Error::NotAFile(_))
    ));
    assert!(matches!(
        fs.read_file("/empty/x", lim),
        Err(Error::NotADirectory(_))
    ));
    // The sparse file (holes over whole indirect blocks in ext2/3): holes read as zeros.
    {
        let sparse = fs.read_file("/sparse", lim).unwrap();
        assert_eq!(sparse.len(), 8 << 20);
        assert_eq!(&sparse[..5], b"start");
        assert_eq!(&sparse[6 << 20..(6 << 20) + 6], b"middle");
        assert!(sparse[5..6 << 20].iter().all(|&b| b == 0));
    }
    let holes = fs.read_file("/holes", lim).unwrap();
    assert_eq!(holes.len(), (70 << 20) + 3);
    for i in 0..64usize {
        assert_eq!(
            &holes[i * 8192..i * 8192 + 4096],
            pattern(4096, i as u8),
            "chunk {i}"
        );
        assert!(holes[i * 8192 + 4096..(i + 1) * 8192]
            .iter()
            .all(|&b| b == 0));
    }
    assert!(holes[64 * 8192..70 << 20].iter().all(|&b| b == 0));
    assert_eq!(&holes[70 << 20..], b"end");
    // Kinds.
    assert_eq!(fs.kind("/boot").unwrap(), Some(NodeKind::Dir));
    assert_eq!(fs.kind("/boot/fast").unwrap(), Some(NodeKind::File));
    assert_eq!(fs.kind("/dirlink").unwrap(), Some(NodeKind::Dir));
    assert_eq!(fs.kind("/nope").unwrap(), None);
    assert_eq!(fs.kind("/").unwrap(), Some(NodeKind::Dir));
    // Directories.
    let mut root = fs.read_dir("/").unwrap();
    root.sort();
    let mut want = vec![
        "a",
        "abs",
        "boot",
        "dirlink",
        "empty",
        "holes",
        "loop1",
        "loop2",
        "lost+found",
        "slow",
        "sparse",
    ];
    if big_dir {
        want.push("big");
        want.sort();
    }
    assert_eq!(root, want);
    let mut boot = fs.read_dir("/dirlink/..//../boot").unwrap();
    boot.sort();
    assert_eq!(boot, ["fast", "initrd.img", "vmlinuz"]);
    if big_dir {
        let names = fs.read_dir("/big").unwrap();
        assert_eq!(names.len(), 600);
        for i in [0, 1, 299, 599] {
            let p = format!("/big/entry_with_a_longish_name_{i}");
            assert_eq!(fs.read_file(&p, lim).unwrap(), i.to_string().as_bytes());
        }
        assert!(matches!(
            fs.read_file("/big/entry_with_a_longish_name_600", lim),
            Err(Error::NotFound(_))
        ));
    }
}

#[test]
fn ext4_4k_round_trip_with_htree() {
    let img = make_image("ext4", 4096, &[], true);
    check_tree(&*open(img), true);
}

#[test]
fn ext4_1k_64bit_round_trip_with_htree() {
    let img = make_image("ext4", 1024, &["-O", "64bit"], true);
    check_tree(&*open(img), true);
}

#[test]
fn ext4_bigalloc_and_64k_blocks_round_trip() {
    let img = make_image("ext4", 4096, &["-O", "bigalloc", "-C", "16384"], false);
    check_tree(&*open(img), false);
    let img = make_image("ext4", 65536, &["-O", "^has_journal"], false);
    check_tree(&*open(img), false);
}

#[test]
fn ext3_block_maps_round_trip() {
    let img = make_image("ext3", 1024, &[], false);
    check_tree(&*open(img), false);
}

#[test]
fn ext2_block_maps_round_trip_with_htree() {
    let img = make_image("ext2", 4096, &[], true);
    check_tree(&*open(img), true);
}

#[test]
fn read_file_over_limit_is_too_large_before_reading() {
    let img = make_image("ext4", 4096, &[], false);
    let fs = open(img);
    match fs.read_file("/boot/vmlinuz", 1000) {
        Err(Error::TooLarge { size, limit, .. }) => {
            assert_eq!((size, limit), (BIG as u64, 1000))
        }
        other => panic!("{other:?}"),
    }
    // Through a symlink too.
    assert!(matches!(
        fs.read_file("/abs", 1000),
        Err(Error::TooLarge { .. })
    ));
    assert_eq!(
        fs.read_file("/boot/vmlinuz", BIG as u64).unwrap().len(),
        BIG
    );
}

/// Finds the inode table entry of `path` with debugfs ("stat" gives the inode number; the
/// image's geometry gives its offset).
fn debugfs(img: &Path, req: &str) -> String {
    let out = Command::new("debugfs")
        .arg("-R")
        .arg(req)
        .arg(img)
        .output()
        .expect("debugfs (install e2fsprogs)");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn not_ext_is_not_claimed_and_bad_magic_is_none() {
    let disk: Arc<dyn ReadAt> = Arc::new(MemDisk(vec![0u8; 1 << 16]));
    assert!(fs::open(disk, &Limits::default()).unwrap().is_none());
    let disk: Arc<dyn ReadAt> = Arc::new(MemDisk(vec![0u8; 100]));
    assert!(fs::open(disk, &Limits::default()).unwrap().is_none());
}

#[test]
fn hand_made_corruptions_give_clean_errors() {
    let tmp = tempfile::TempDir::new().unwrap();
    let img = make_image("ext4", 1024, &["-O", "^metadata_csum"], false);
    let path = tmp.path().join("img");
    std::fs::write(&path, &img).unwrap();
    // Truncated image: the superblock says more blocks than there are.
    let short = img[..img.len() / 2].to_vec();
    let r = fs::open(Arc::new(MemDisk(short)), &Limits::default());
    if let Ok(Some(fs)) = r {
        let _ = fs.read_file("/boot/vmlinuz", 1 << 30);
        let _ = fs.read_file("/sparse", 1 << 30);
    }
    // Superblock with an absurd block size (s_log_block_size at 1024+24).
    let mut bad = img.clone();
    bad[1024 + 24..1024 + 28].copy_from_slice(&40u32.to_le_bytes());
    assert!(fs::open(Arc::new(MemDisk(bad)), &Limits::default()).is_err());
    // Inode sizes set huge: the file's i_size_lo/high (offsets 4 and 108 in the inode).
    let ino: u64 = debugfs(&path, "stat /boot/vmlinuz")
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("inode number");
    let imap = debugfs(&path, &format!("imap <{ino}>"));
    // "Inode N is part of block group G\n\tlocated at block B, offset 0xOFF"
    let block: u64 = imap
        .split("block ")
        .nth(2)
        .and_then(|s| s.split(',').next())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or_else(|| panic!("imap: {imap}"));
    let off = imap
        .split("offset 0x")
        .nth(1)
        .and_then(|s| u64::from_str_radix(s.trim(), 16).ok())
        .expect("imap offset");
    let at = (block * 1024 + off) as usize;
    // The file's first extent (i_block at +40: header, then ee_block, ee_len, ee_start_hi,
    // ee_start_lo) moved past the end of the filesystem.
    let mut bad = img.clone();
    bad[at + 40 + 12 + 6..at + 40 + 12 + 12].copy_from_slice(&[0xFF; 6]);
    let r = open(bad).read_file("/boot/vmlinuz", 1 << 30);
    assert!(matches!(r, Err(Error::Corrupt { .. })), "{r:?}");
    // An extent tree claiming depth 7.
    let mut bad = img.clone();
    bad[at + 40 + 6..at + 40 + 8].copy_from_slice(&7u16.to_le_bytes());
    let r = open(bad).read_file("/boot/vmlinuz", 1 << 30);
    assert!(matches!(r, Err(Error::Corrupt { .. })), "{r:?}");
    // /boot's first directory block: a zero record length; then an entry naming inode
    // 0xFFFFFFF0.
    let boot_block: usize = debugfs(&path, "bmap /boot 0")
        .trim()
        .parse()
        .expect("bmap /boot");
    let d = boot_block * 1024;
    let mut bad = img.clone();
    bad[d + 4..d + 6].copy_from_slice(&0u16.to_le_bytes());
    let fs = open(bad);
    assert!(matches!(fs.read_dir("/boot"), Err(Error::Corrupt { .. })));
    assert!(matches!(
        fs.read_file("/boot/vmlinuz", 1 << 30),
        Err(Error::Corrupt { .. })
    ));
    let mut bad = img.clone();
    let e = d + bad[d..d + 1024]
        .windows(7)
        .position(|w| w == b"vmlinuz")
        .unwrap()
        - 8;
    bad[e..e + 4].copy_from_slice(&0xFFFF_FFF0u32.to_le_bytes());
    let r = open(bad).read_file("/boot/vmlinuz", 1 << 30);
    assert!(matches!(r, Err(Error::Corrupt { .. })), "{r:?}");
    // Features we do not read (meta_bg, compression): unsupported, not misread.
    for bit in [0x10u32, 0x1] {
        let mut bad = img.clone();
        let f = u32::from_le_bytes(bad[1024 + 0x60..1024 + 0x64].try_into().unwrap());
        bad[1024 + 0x60..1024 + 0x64].copy_from_slice(&(f | bit).to_le_bytes());
        let r = fs::open(Arc::new(MemDisk(bad)), &Limits::default());
        assert!(matches!(r, Err(Error::Unsupported(_))), "{:?}", r.err());
    }
    let mut huge = img.clone();
    // 64 GiB (a size over 2^32 blocks is refused by ext4-view itself as corrupt).
    huge[at + 4..at + 8].copy_from_slice(&0u32.to_le_bytes());
    huge[at + 108..at + 112].copy_from_slice(&16u32.to_le_bytes());
    let fs = open(huge.clone());
    let r = fs.read_file("/boot/vmlinuz", 1 << 30);
    assert!(
        matches!(
            r,
            Err(Error::TooLarge {
                size: 0x10_0000_0000,
                ..
            })
        ),
        "{r:?}"
    );
    // Over u32 blocks: a clean error too.
    huge[at + 108..at + 112].copy_from_slice(&u32::MAX.to_le_bytes());
    assert!(open(huge).read_file("/boot/vmlinuz", 1 << 30).is_err());
    // Same inode made a symlink with a huge target size: refused before reading.
    let mut link = img.clone();
    link[at + 4..at + 8].copy_from_slice(&u32::MAX.to_le_bytes());
    let mode = u16::from_le_bytes([link[at], link[at + 1]]);
    link[at..at + 2].copy_from_slice(&((mode & 0o7777) | 0o120000).to_le_bytes());
    let fs = open(link);
    assert!(fs.read_file("/boot/vmlinuz", 1 << 30).is_err());
}

/// Small images for the random corruption: ext4 (extents, no checksums so that corruption
/// reaches the structures), ext2 (block maps) and ext4 with inline data, 1 KiB blocks.
fn small_images() -> &'static [Vec<u8>] {
    static IMGS: std::sync::OnceLock<Vec<Vec<u8>>> = std::sync::OnceLock::new();
    IMGS.get_or_init(|| {
        let tmp = tempfile::TempDir::new().unwrap();
        let src = tmp.path().join("src");
        std::fs::create_dir_all(src.join("boot/grub")).unwrap();
        std::fs::write(src.join("boot/vmlinuz"), pattern(20_000, 3)).unwrap();
        std::fs::write(src.join("boot/grub/grub.cfg"), b"menuentry x {}\n").unwrap();
        std::os::unix::fs::symlink("boot/vmlinuz", src.join("vmlinuz")).unwrap();
        std::os::unix::fs::symlink(SLOW_TARGET, src.join("slow")).unwrap();
        [
            ("ext4", "^has_journal,^metadata_csum"),
            ("ext2", "^resize_inode"),
            ("ext4", "^has_journal,^metadata_csum,inline_data"),
        ]
        .iter()
        .enumerate()
        .map(|(i, (kind, features))| {
            let img = tmp.path().join(format!("{kind}-{i}"));
            run(
                Command::new("mke2fs")
                    .args([
                        "-q", "-F", "-t", kind, "-b", "1024", "-N", "32", "-I", "256",
                    ])
                    .args(["-O", features, "-d"])
                    .arg(&src)
                    .arg(&img)
                    .arg("256K"),
                "e2fsprogs",
            );
            std::fs::read(img).unwrap()
        })
        .collect()
    })
}

fn read_everything(img: Vec<u8>) {
    let limits = Limits {
        max_file: 1 << 20,
        max_dir_entries: 64,
        ..Limits::default()
    };
    let Ok(Some(fs)) = fs::open(Arc::new(MemDisk(img)), &limits) else {
        return;
    };
    for p in ["/", "/boot", "/boot/grub", "/lost+found"] {
        let _ = fs.read_dir(p);
    }
    for p in [
        "/boot/vmlinuz",
        "/boot/grub/grub.cfg",
        "/vmlinuz",
        "/slow",
        "/x/../boot/vmlinuz",
    ] {
        let _ = fs.kind(p);
        let _ = fs.read_file(p, 1 << 20);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

    /// Random overwrites anywhere in the metadata-heavy first 64 KiB, or spread over the image.
    #[test]
    fn corrupted_image_never_panics(
        which in 0usize..3,
        edits in proptest::collection::vec((0usize..(256 << 10), any::<u8>()), 1..40),
        low in any::<bool>(),
    ) {
        let mut img = small_images()[which].clone();
        for (at, b) in edits {
            let at = if low { at % (64 << 10) } else { at };
            if let Some(x) = img.get_mut(at) {
                *x = b;
            }
        }
        read_everything(img);
    }
}

/// An image whose /victim (one 4 KiB block) has an extent tree of `depth` levels where every
/// index entry of a level points to the same block and the leaf holds 340 zero-length
/// extents: 4 * 340^depth extents to go through before ext4-view finds the file's block.
fn extent_bomb(depth: u16) -> Vec<u8> {
    let tmp = tempfile::TempDir::new().unwrap();
    let src = tmp.path().join("src");
    std::fs::create_dir(&src).unwrap();
    std::fs::write(src.join("victim"), [1u8; 4096]).unwrap();
    let path = tmp.path().join("img");
    run(
        Command::new("mke2fs")
            .args(["-q", "-F", "-t", "ext4", "-b", "4096"])
            .args(["-O", "^has_journal,^metadata_csum", "-d"])
            .arg(&src)
            .arg(&path)
            .arg("16M"),
        "e2fsprogs",
    );
    let imap = debugfs(&path, "imap /victim");
    let block: usize = imap
        .split("block ")
        .nth(2)
        .and_then(|s| s.split(',').next())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or_else(|| panic!("imap: {imap}"));
    let off = imap
        .split("offset 0x")
        .nth(1)
        .and_then(|s| usize::from_str_radix(s.trim(), 16).ok())
        .expect("imap offset");
    let mut img = std::fs::read(&path).unwrap();
    let inode = block * 4096 + off;
    // Free blocks at the end of the 4096-block filesystem, one per level.
    let level_block = |level: u16| 4000 + level as usize;
    let header = |entries: u16, depth: u16| {
        let mut h = Vec::new();
        h.extend_from_slice(&0xF30Au16.to_le_bytes());
        h.extend_from_slice(&entries.to_le_bytes());
        h.extend_from_slice(&entries.to_le_bytes());
        h.extend_from_slice(&depth.to_le_bytes());
        h.extend_from_slice(&0u32.to_le_bytes());
        h
    };
    let index = |child: usize| {
        let mut e = Vec::new();
        e.extend_from_slice(&0u32.to_le_bytes());
        e.extend_from_slice(&(child as u32).to_le_bytes());
        e.extend_from_slice(&[0u8; 4]);
        e
    };
    // Root in the inode's i_block (offset 40, 60 bytes): 4 index entries.
    let mut root = header(4, depth);
    for _ in 0..4 {
        root.extend(index(level_block(depth - 1)));
    }
    img[inode + 40..inode + 100].copy_from_slice(&root);
    for level in (0..depth).rev() {
        let mut node = header(340, level);
        for _ in 0..340 {
            if level == 0 {
                // Zero-length extent at file block 0, starting at some block.
                let mut e = Vec::new();
                e.extend_from_slice(&0u32.to_le_bytes());
                e.extend_from_slice(&0u16.to_le_bytes());
                e.extend_from_slice(&0u16.to_le_bytes());
                e.extend_from_slice(&100u32.to_le_bytes());
                node.extend(e);
            } else {
                node.extend(index(level_block(level - 1)));
            }
        }
        let at = level_block(level) * 4096;
        img[at..at + node.len()].copy_from_slice(&node);
    }
    img
}

/// An extent tree whose index entries all point to one block per level, with leaves of
/// zero-length extents (4 * 340^depth extents in all): a lookup follows one path down, so
/// even depth 5 (which made ext4-view 1.0.0 run for years) reads at once.
#[test]
fn extent_tree_of_shared_nodes_and_empty_extents_reads_at_once() {
    for depth in [2, 5] {
        let fs = open(extent_bomb(depth));
        let t = std::time::Instant::now();
        let r = fs.read_file("/victim", 1 << 20);
        assert!(
            t.elapsed() < std::time::Duration::from_secs(2),
            "depth {depth}"
        );
        // No extent covers block 0: a hole.
        assert_eq!(r.unwrap(), vec![0u8; 4096]);
    }
}

/// The images the random corruption starts from are read whole when intact.
#[test]
fn corruption_fixtures_read_cleanly() {
    for img in small_images() {
        let fs = open(img.clone());
        assert_eq!(
            fs.read_file("/vmlinuz", 1 << 20).unwrap(),
            pattern(20_000, 3)
        );
        assert_eq!(
            fs.read_file("/slow", 1 << 20).err().map(|e| e.to_string()),
            Some("/slow: no such file or directory".into())
        );
        assert_eq!(fs.read_dir("/boot/grub").unwrap(), ["grub.cfg"]);
    }
}

/// inline_data: small files and directories kept in the inode (i_block and the
/// "system.data" attribute).
#[test]
fn inline_data_files_and_directories_read() {
    let tmp = tempfile::TempDir::new().unwrap();
    let src = tmp.path().join("src");
    std::fs::create_dir_all(src.join("boot/loader/entries")).unwrap();
    std::fs::write(src.join("boot/small.cfg"), b"tiny\n").unwrap();
    // Over 60 bytes: continues in the extended attribute.
    std::fs::write(src.join("boot/medium.cfg"), pattern(100, 4)).unwrap();
    std::fs::write(src.join("boot/loader/entries/a.conf"), b"title A\n").unwrap();
    std::fs::write(src.join("big"), pattern(10_000, 5)).unwrap();
    std::os::unix::fs::symlink("boot/small.cfg", src.join("link")).unwrap();
    let img = tmp.path().join("img");
    run(
        Command::new("mke2fs")
            .args([
                "-q",
                "-F",
                "-t",
                "ext4",
                "-I",
                "256",
                "-O",
                "inline_data",
                "-d",
            ])
            .arg(&src)
            .arg(&img)
            .arg("8M"),
        "e2fsprogs",
    );
    // /boot is inline (in i_block: mke2fs moves a directory to a block rather than into the
    // attribute), /boot/medium.cfg continues in the attribute.
    for (p, min) in [("/boot", 1), ("/boot/medium.cfg", 61)] {
        let st = debugfs(&img, &format!("stat {p}"));
        let inline: u32 = st
            .split("Size of inline data: ")
            .nth(1)
            .and_then(|s| s.split_whitespace().next())
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("{p} is not inline: {st}"));
        assert!(inline >= min, "{p}: {inline} bytes inline");
    }
    let fs = open(std::fs::read(&img).unwrap());
    let lim = 1 << 20;
    assert_eq!(fs.read_file("/big", lim).unwrap(), pattern(10_000, 5));
    assert_eq!(fs.read_file("/boot/small.cfg", lim).unwrap(), b"tiny\n");
    assert_eq!(
        fs.read_file("/boot/medium.cfg", lim).unwrap(),
        pattern(100, 4)
    );
    assert_eq!(fs.read_file("/link", lim).unwrap(), b"tiny\n");
    assert_eq!(
        fs.read_file("/boot/loader/entries/a.conf", lim).unwrap(),
        b"title A\n"
    );
    let mut boot = fs.read_dir("/boot").unwrap();
    boot.sort();
    assert_eq!(boot, ["loader", "medium.cfg", "small.cfg"]);
    assert_eq!(fs.read_dir("/boot/loader/entries").unwrap(), ["a.conf"]);
}
