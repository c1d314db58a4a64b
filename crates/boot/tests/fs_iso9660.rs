//! ISO 9660 (with Rock Ridge and Joliet) read through `fs::open`, on images made by xorriso,
//! and on damaged / hostile copies of them.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use proptest::prelude::*;
use tempfile::TempDir;
use xdisk_boot::disk::{MemDisk, ReadAt};
use xdisk_boot::fs::iso9660::{self, Iso9660};
use xdisk_boot::fs::{self, FileSystem, NodeKind};
use xdisk_boot::{Error, Limits};

const CFG: &[u8] = b"default linux\nlabel linux\n  kernel vmlinuz\n  append initrd=initrd.img\n";
const LONG: &str = "a_rather_long_rock_ridge_file_name_that_does_not_fit_in_one_directory_record_\
                    because_it_is_well_over_two_hundred_bytes_long_and_needs_a_continuation_area_\
                    or_several_name_entries_to_be_stored.txt";

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ ((i >> 11) as u8))
        .collect()
}

fn need_xorriso() {
    let ok = Command::new("xorriso").arg("-version").output();
    assert!(
        matches!(ok, Ok(o) if o.status.success()),
        "xorriso not found: install the Debian package xorriso"
    );
}

fn write(root: &Path, rel: &str, data: &[u8]) {
    let p = root.join(rel);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, data).unwrap();
}

fn symlink(root: &Path, rel: &str, target: &str) {
    std::os::unix::fs::symlink(target, root.join(rel)).unwrap();
}

const DEEP: &str = "d1/d2/d3/d4/d5/d6/d7/d8/d9/d10/d11/deep.txt";

/// The files of the test tree (relative path, contents) that every mode shows (names of at
/// most 8.3 characters in lower case, so plain ISO level 1 keeps them).
fn files() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("isolinux/isolinux.cfg", CFG.to_vec()),
        ("isolinux/vmlinuz", pattern(300_001, 1)),
        ("isolinux/initrd.img", pattern(1_048_576 + 4321, 2)),
        ("empty", Vec::new()),
        ("docs/readme.txt", b"hello\n".to_vec()),
        (DEEP, b"deep\n".to_vec()),
    ]
}

/// Builds the test tree (with Rock Ridge-only extras: long names, symlinks) in `root`.
fn make_tree(root: &Path, links: bool) {
    for (p, d) in files() {
        write(root, p, &d);
    }
    if links {
        write(root, &format!("long/{LONG}"), b"long\n");
        write(root, "long/MixedCase.Txt", b"mixed\n");
        symlink(root, "isolinux/linux", "vmlinuz");
        symlink(root, "abs", "/isolinux/isolinux.cfg");
        symlink(root, "escape", "../../../../isolinux/isolinux.cfg");
        symlink(root, "docs/up", "../../../isolinux");
        symlink(root, "boot", "isolinux");
        symlink(root, "loop1", "loop2");
        symlink(root, "loop2", "loop1");
        symlink(root, "dangling", "nowhere/at/all");
        // A target longer than a directory record: SL entries continued (and in a CE area).
        let long_target = format!("{}isolinux/vmlinuz", "./".repeat(200));
        symlink(root, "longlink", &long_target);
    }
}

/// Runs `xorriso -as mkisofs ARGS -o IMG TREE` and returns the image.
fn mkisofs(tree: &Path, args: &[&str]) -> Vec<u8> {
    need_xorriso();
    let out = tree.parent().unwrap().join("out.iso");
    let o = Command::new("xorriso")
        .args(["-as", "mkisofs", "-quiet"])
        .args(args)
        .arg("-o")
        .arg(&out)
        .arg(tree)
        .output()
        .expect("running xorriso");
    assert!(
        o.status.success(),
        "xorriso failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    std::fs::read(&out).unwrap()
}

fn image(args: &[&str], links: bool) -> Vec<u8> {
    let tmp = TempDir::new().unwrap();
    let tree = tmp.path().join("tree");
    std::fs::create_dir(&tree).unwrap();
    make_tree(&tree, links);
    mkisofs(&tree, args)
}

fn open(img: Vec<u8>) -> Box<dyn FileSystem> {
    let fs = fs::open(Arc::new(MemDisk(img)), &Limits::default())
        .expect("open")
        .expect("a filesystem");
    assert_eq!(fs.fs_type(), "iso9660");
    fs
}

fn names(fs: &dyn FileSystem, path: &str) -> BTreeSet<String> {
    fs.read_dir(path).unwrap().into_iter().collect()
}

fn set(v: &[&str]) -> BTreeSet<String> {
    v.iter().map(|s| s.to_string()).collect()
}

fn check_files(fs: &dyn FileSystem) {
    for (p, d) in files() {
        let got = fs.read_file(&format!("/{p}"), 16 << 20).unwrap();
        assert!(
            got == d,
            "{p}: contents differ ({} vs {} bytes)",
            got.len(),
            d.len()
        );
        assert_eq!(fs.kind(&format!("/{p}")).unwrap(), Some(NodeKind::File));
    }
    assert_eq!(fs.kind("/isolinux").unwrap(), Some(NodeKind::Dir));
    assert_eq!(fs.kind("/nothing").unwrap(), None);
    assert!(matches!(
        fs.read_file("/nothing", 100),
        Err(Error::NotFound(_))
    ));
    assert!(matches!(
        fs.read_file("/isolinux", 100),
        Err(Error::NotAFile(_))
    ));
    assert!(matches!(
        fs.read_dir("/empty"),
        Err(Error::NotADirectory(_))
    ));
}

#[test]
fn rock_ridge_and_joliet_round_trip_uses_rock_ridge_names() {
    let fs = open(image(&["-R", "-J"], true));
    check_files(&*fs);
    assert_eq!(
        names(&*fs, "/"),
        set(&[
            "abs", "boot", "d1", "dangling", "docs", "empty", "escape", "isolinux", "long",
            "longlink", "loop1", "loop2"
        ])
    );
    assert_eq!(
        names(&*fs, "/isolinux"),
        set(&["initrd.img", "isolinux.cfg", "linux", "vmlinuz"])
    );
    assert_eq!(names(&*fs, "/long"), set(&[LONG, "MixedCase.Txt"]));
    assert_eq!(
        fs.read_file(&format!("/long/{LONG}"), 100).unwrap(),
        b"long\n"
    );
    assert_eq!(
        fs.read_file("/long/MixedCase.Txt", 100).unwrap(),
        b"mixed\n"
    );
    // Rock Ridge names are exact.
    assert_eq!(fs.kind("/long/mixedcase.txt").unwrap(), None);
    assert_eq!(fs.kind("/ISOLINUX").unwrap(), None);
    assert!(names(&*fs, "/d1/d2/d3/d4/d5/d6/d7/d8/d9/d10/d11").contains("deep.txt"));
}

#[test]
fn rock_ridge_symlinks_stay_inside() {
    let fs = open(image(&["-R", "-J"], true));
    let kernel = pattern(300_001, 1);
    assert_eq!(fs.read_file("/isolinux/linux", 1 << 20).unwrap(), kernel);
    assert_eq!(fs.read_file("/abs", 100).unwrap(), CFG);
    assert_eq!(fs.read_file("/escape", 100).unwrap(), CFG);
    assert_eq!(fs.read_file("/docs/up/isolinux.cfg", 100).unwrap(), CFG);
    assert_eq!(fs.read_file("/boot/isolinux.cfg", 100).unwrap(), CFG);
    assert_eq!(fs.read_file("/longlink", 1 << 20).unwrap(), kernel);
    assert_eq!(fs.kind("/boot").unwrap(), Some(NodeKind::Dir));
    assert_eq!(fs.kind("/dangling").unwrap(), None);
    assert!(matches!(
        fs.read_file("/loop1", 100),
        Err(Error::SymlinkLoop(_))
    ));
    assert!(matches!(fs.kind("/loop2/x"), Err(Error::SymlinkLoop(_))));
}

#[test]
fn rock_ridge_relocated_deep_directories_are_followed() {
    // mkisofs-style deep directory relocation: RRIP CL/RE entries (and rr_moved).
    let img = image(&["-R", "-rr_reloc_dir", "rr_moved"], true);
    assert!(
        img.windows(4).any(|w| w == b"CL\x0c\x01"),
        "xorriso did not relocate"
    );
    let fs = open(img);
    check_files(&*fs);
    let d8 = "/d1/d2/d3/d4/d5/d6/d7/d8";
    assert_eq!(names(&*fs, d8), set(&["d9"]));
    assert_eq!(fs.kind(&format!("{d8}/d9")).unwrap(), Some(NodeKind::Dir));
    // Entries marked RE (xorriso marks rr_moved itself) are hidden, as Linux does.
    assert!(!names(&*fs, "/")
        .iter()
        .any(|n| n.eq_ignore_ascii_case("rr_moved")));
}

#[test]
fn joliet_only_names_are_case_insensitive() {
    let fs = open(image(&["--norock", "-J"], true));
    check_files(&*fs);
    assert!(names(&*fs, "/long").contains("MixedCase.Txt"));
    assert_eq!(
        fs.read_file("/long/mixedcase.txt", 100).unwrap(),
        b"mixed\n"
    );
    assert_eq!(fs.read_file("/ISOLINUX/ISOLINUX.CFG", 100).unwrap(), CFG);
    assert_eq!(
        names(&*fs, "/isolinux"),
        set(&["initrd.img", "isolinux.cfg", "vmlinuz"])
    );
}

#[test]
fn plain_iso_level1_upper_case_names_match_lower_case_paths() {
    let fs = open(image(&["--norock"], false));
    check_files(&*fs);
    assert_eq!(
        names(&*fs, "/ISOLINUX"),
        set(&["INITRD.IMG", "ISOLINUX.CFG", "VMLINUZ"])
    );
    assert_eq!(names(&*fs, "/"), set(&["D1", "DOCS", "EMPTY", "ISOLINUX"]));
}

#[test]
fn plain_iso_level3_round_trip() {
    let fs = open(image(&["--norock", "-iso-level", "3"], true));
    check_files(&*fs);
    assert_eq!(
        fs.read_file("/long/mixedcase.txt", 100).unwrap(),
        b"mixed\n"
    );
}

#[test]
fn hybrid_iso_with_mbr_is_read_whole() {
    let mut img = image(&["-R", "-J"], false);
    // A (fake) isohybrid MBR: one partition over the whole image, the 0x55AA signature.
    let sectors = (img.len() / 512) as u32;
    img[446] = 0x80;
    img[446 + 4] = 0x17;
    img[446 + 8..446 + 12].copy_from_slice(&0u32.to_le_bytes());
    img[446 + 12..446 + 16].copy_from_slice(&sectors.to_le_bytes());
    img[510] = 0x55;
    img[511] = 0xAA;
    let fs = open(img);
    check_files(&*fs);
}

/// Counts the bytes read through it.
struct Counting(MemDisk, AtomicU64);

impl ReadAt for Counting {
    fn size(&self) -> u64 {
        self.0.size()
    }
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.1.fetch_add(buf.len() as u64, Ordering::Relaxed);
        self.0.read_exact_at(buf, offset)
    }
}

#[test]
fn read_file_over_limit_is_too_large_without_reading_it() {
    let disk = Arc::new(Counting(MemDisk(image(&["-R"], false)), AtomicU64::new(0)));
    let fs = fs::open(disk.clone(), &Limits::default()).unwrap().unwrap();
    let before = disk.1.load(Ordering::Relaxed);
    match fs.read_file("/isolinux/initrd.img", 1 << 20) {
        Err(Error::TooLarge { size, limit, .. }) => {
            assert_eq!(size, 1_048_576 + 4321);
            assert_eq!(limit, 1 << 20);
        }
        other => panic!("expected TooLarge, got {other:?}"),
    }
    let read = disk.1.load(Ordering::Relaxed) - before;
    assert!(read < 64 << 10, "{read} bytes read");
}

// ---- hand-made images and corruptions ----

fn le32(img: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(img[at..at + 4].try_into().unwrap())
}

fn put_both32(img: &mut [u8], at: usize, v: u32) {
    img[at..at + 4].copy_from_slice(&v.to_le_bytes());
    img[at + 4..at + 8].copy_from_slice(&v.to_be_bytes());
}

const PVD: usize = 0x8000;
const ROOT: usize = PVD + 156;

/// (offset in the image, identifier) of the records of the directory at `start`.
fn records(img: &[u8], start: usize, len: usize) -> Vec<(usize, Vec<u8>)> {
    let mut out = Vec::new();
    let mut pos = start;
    while pos < start + len {
        let l = img[pos] as usize;
        if l == 0 {
            pos = (pos / 2048 + 1) * 2048;
            continue;
        }
        let fi = img[pos + 32] as usize;
        out.push((pos, img[pos + 33..pos + 33 + fi].to_vec()));
        pos += l;
    }
    out
}

fn root_records(img: &[u8]) -> Vec<(usize, Vec<u8>)> {
    records(
        img,
        le32(img, ROOT + 2) as usize * 2048,
        le32(img, ROOT + 10) as usize,
    )
}

/// The record of `id` in the directory whose record is `dir` (an offset).
fn record_in(img: &[u8], dir: usize, id: &[u8]) -> usize {
    records(
        img,
        le32(img, dir + 2) as usize * 2048,
        le32(img, dir + 10) as usize,
    )
    .into_iter()
    .find(|r| r.1 == id)
    .unwrap_or_else(|| panic!("no record {}", String::from_utf8_lossy(id)))
    .0
}

fn open_err(img: Vec<u8>) -> Error {
    match Iso9660::open(Arc::new(MemDisk(img))) {
        Ok(_) => panic!("opened"),
        Err(e) => e,
    }
}

fn is_corrupt<T: std::fmt::Debug>(r: Result<T, Error>) -> bool {
    matches!(r, Err(Error::Corrupt { fs: "iso9660", .. }))
}

#[test]
fn multi_extent_file_is_concatenated() {
    let tmp = TempDir::new().unwrap();
    let tree = tmp.path().join("tree");
    std::fs::create_dir(&tree).unwrap();
    let (a, b) = (pattern(4096, 7), pattern(3000, 9));
    write(&tree, "a", &a);
    write(&tree, "b", &b);
    let mut img = mkisofs(&tree, &["--norock"]);
    let recs = root_records(&img);
    let ra = recs.iter().find(|r| r.1 == b"A.;1").unwrap().0;
    let rb = recs.iter().find(|r| r.1 == b"B.;1").unwrap().0;
    assert_eq!(rb, ra + img[ra] as usize, "records not adjacent");
    // 9.1.6 bit 7 on the first record, the second one takes the same identifier.
    img[ra + 25] |= 0x80;
    img[rb + 33] = b'A';
    let fs = open(img.clone());
    assert_eq!(names(&*fs, "/"), set(&["A"]));
    assert_eq!(fs.read_file("/a", 1 << 20).unwrap(), [a, b].concat());
    // A multi-extent file whose last record is missing.
    img[rb + 25] |= 0x80;
    let fs = open(img);
    assert!(is_corrupt(fs.read_dir("/")));
}

fn plain() -> Vec<u8> {
    image(&["--norock"], false)
}

#[test]
fn missing_magic_is_not_iso9660() {
    let mut img = plain();
    img[PVD + 1..PVD + 6].copy_from_slice(b"XXXXX");
    assert!(!iso9660::probe(&MemDisk(img.clone())));
    assert!(matches!(open_err(img), Error::Corrupt { .. }));
    assert!(!iso9660::probe(&MemDisk(vec![0; 100])));
}

#[test]
fn bad_logical_block_size_is_corrupt() {
    let mut img = plain();
    img[PVD + 128..PVD + 132].copy_from_slice(&[0, 0, 0, 0]);
    assert!(matches!(open_err(img), Error::Corrupt { .. }));
}

#[test]
fn endless_descriptor_set_is_bounded() {
    let mut img = vec![0u8; 16 * 2048];
    for _ in 0..200 {
        let mut vd = vec![0u8; 2048];
        vd[1..7].copy_from_slice(b"CD001\x01");
        img.extend(vd);
    }
    assert!(iso9660::probe(&MemDisk(img.clone())));
    assert!(matches!(open_err(img), Error::Corrupt { .. }));
}

#[test]
fn root_extent_past_the_end_is_corrupt() {
    for args in [&["--norock"][..], &["-R"][..]] {
        let mut img = image(args, false);
        put_both32(&mut img, ROOT + 2, 0x00ff_0000);
        match Iso9660::open(Arc::new(MemDisk(img.clone()))) {
            Err(e) => assert!(matches!(e, Error::Corrupt { .. }), "{e}"),
            Ok(_) => assert!(is_corrupt(open(img).read_dir("/"))),
        }
    }
}

#[test]
fn huge_directory_is_refused() {
    let mut img = plain();
    put_both32(&mut img, ROOT + 10, 0xffff_ffff);
    let fs = open(img);
    assert!(matches!(fs.read_dir("/"), Err(Error::Unsupported(_))));
}

#[test]
fn record_crossing_a_sector_is_corrupt() {
    let mut img = plain();
    let recs = root_records(&img);
    // Fill the root's first sector after ".." with 200-byte records, the last one crossing.
    let mut pos = recs[1].0 + img[recs[1].0] as usize;
    let end = (pos / 2048 + 1) * 2048;
    while pos < end {
        let len = if (end - pos).is_multiple_of(200) {
            199
        } else {
            200
        };
        img[pos..pos + len].fill(0);
        img[pos] = len as u8;
        img[pos + 32] = 1;
        img[pos + 33] = b'F';
        pos += len;
    }
    let fs = open(img);
    let e = fs.read_dir("/").unwrap_err();
    assert!(e.to_string().contains("crosses a sector"), "{e}");
}

#[test]
fn record_with_bad_identifier_length_is_corrupt() {
    let mut img = plain();
    let r = root_records(&img)[2].0;
    img[r + 32] = 250;
    assert!(is_corrupt(open(img).read_dir("/")));
}

#[test]
fn file_extent_past_the_end_is_corrupt() {
    let mut img = plain();
    let isolinux = root_records(&img)
        .into_iter()
        .find(|r| r.1 == b"ISOLINUX")
        .unwrap()
        .0;
    let k = record_in(&img, isolinux, b"VMLINUZ.;1");
    put_both32(&mut img, k + 2, 0x7fff_0000);
    let fs = open(img);
    assert_eq!(fs.kind("/isolinux/vmlinuz").unwrap(), Some(NodeKind::File));
    let e = fs.read_file("/isolinux/vmlinuz", 1 << 20).unwrap_err();
    assert!(e.to_string().contains("past the end"), "{e}");
}

#[test]
fn interleaved_file_is_refused() {
    let mut img = plain();
    let isolinux = root_records(&img)
        .into_iter()
        .find(|r| r.1 == b"ISOLINUX")
        .unwrap()
        .0;
    let k = record_in(&img, isolinux, b"VMLINUZ.;1");
    img[k + 26] = 1;
    img[k + 27] = 1;
    let fs = open(img);
    assert!(matches!(
        fs.read_file("/isolinux/vmlinuz", 1 << 20),
        Err(Error::Unsupported(_))
    ));
}

#[test]
fn susp_continuation_loop_is_bounded() {
    let mut img = image(&["-R"], true);
    // Point every CE entry at itself.
    let mut n = 0;
    for p in 0..img.len() - 28 {
        if &img[p..p + 4] == b"CE\x1c\x01" {
            put_both32(&mut img, p + 4, (p / 2048) as u32);
            put_both32(&mut img, p + 12, (p % 2048) as u32);
            put_both32(&mut img, p + 20, 28);
            n += 1;
        }
    }
    assert!(n > 0, "no CE entries in the image");
    let fs = open(img);
    let e = fs.read_dir("/long").unwrap_err();
    assert!(e.to_string().contains("continuation"), "{e}");
}

#[test]
fn directory_cycle_is_bounded() {
    // A subdirectory whose extent is the root: paths may go round, but not forever.
    let mut img = plain();
    let root_extent = le32(&img, ROOT + 2);
    let root_size = le32(&img, ROOT + 10);
    let docs = root_records(&img)
        .into_iter()
        .find(|r| r.1 == b"DOCS")
        .unwrap()
        .0;
    put_both32(&mut img, docs + 2, root_extent);
    put_both32(&mut img, docs + 10, root_size);
    let fs = open(img);
    let deep = "/docs".repeat(300) + "/isolinux/isolinux.cfg";
    assert!(fs.read_file(&deep, 100).is_err());
    assert_eq!(
        fs.read_file("/docs/docs/isolinux/isolinux.cfg", 100)
            .unwrap(),
        CFG
    );
}

#[test]
fn truncated_image_gives_errors() {
    let img = image(&["-R", "-J"], true);
    for len in [
        0x8000 + 2048,
        0x8000 + 6 * 2048,
        img.len() / 2,
        img.len() - 1,
    ] {
        let disk = Arc::new(MemDisk(img[..len].to_vec()));
        if let Ok(Some(fs)) = fs::open(disk, &Limits::default()) {
            read_everything(&*fs);
        }
    }
}

/// Lists and reads everything reachable (bounded), ignoring errors.
fn read_everything(fs: &dyn FileSystem) {
    let mut todo = vec![(String::new(), 0)];
    let mut seen = 0;
    while let Some((dir, depth)) = todo.pop() {
        let Ok(names) = fs.read_dir(if dir.is_empty() { "/" } else { &dir }) else {
            continue;
        };
        for n in names {
            seen += 1;
            if seen > 300 {
                return;
            }
            let p = format!("{dir}/{n}");
            match fs.kind(&p) {
                Ok(Some(NodeKind::Dir)) if depth < 14 => todo.push((p, depth + 1)),
                Ok(Some(NodeKind::File)) => {
                    let _ = fs.read_file(&p, 64 << 10);
                }
                _ => {}
            }
        }
    }
}

fn small_image() -> &'static [u8] {
    use std::sync::OnceLock;
    static IMG: OnceLock<Vec<u8>> = OnceLock::new();
    IMG.get_or_init(|| {
        let tmp = TempDir::new().unwrap();
        let tree = tmp.path().join("tree");
        std::fs::create_dir(&tree).unwrap();
        write(&tree, "isolinux/isolinux.cfg", CFG);
        write(&tree, "isolinux/vmlinuz", &pattern(5000, 3));
        write(&tree, &format!("long/{LONG}"), b"x");
        write(&tree, "a/b/c/d/e/f/g/h/i/j.txt", b"j");
        symlink(&tree, "boot", "isolinux");
        symlink(&tree, "up", "../../isolinux/vmlinuz");
        symlink(&tree, "l1", "l2");
        symlink(&tree, "l2", "l1");
        mkisofs(&tree, &["-R", "-J"])
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    /// Random bytes written over a real image (mostly over its metadata) never panic and
    /// every path is read quickly.
    #[test]
    fn corrupted_image_never_panics(
        writes in proptest::collection::vec((0.0f64..1.0, any::<u8>(), any::<bool>()), 1..24),
    ) {
        let mut img = small_image().to_vec();
        // The metadata (descriptors, path tables, directories, CE areas) is in the first
        // sectors after 16; aim most writes there.
        let meta_end = (img.len()).min(0x8000 + 40 * 2048);
        for (at, byte, meta) in writes {
            let p = if meta {
                0x8000 + ((meta_end - 0x8000) as f64 * at) as usize
            } else {
                (img.len() as f64 * at) as usize
            };
            if let Some(b) = img.get_mut(p) {
                *b = byte;
            }
        }
        let started = std::time::Instant::now();
        if let Ok(Some(fs)) = fs::open(Arc::new(MemDisk(img)), &Limits::default()) {
            read_everything(&*fs);
            for p in ["/boot/isolinux.cfg", "/up", "/l1", "/a/b/c/d/e/f/g/h/i/j.txt"] {
                let _ = fs.read_file(p, 1 << 20);
            }
        }
        prop_assert!(started.elapsed().as_secs() < 2);
    }
}

#[test]
fn relocation_to_the_root_or_to_garbage_is_bounded() {
    let img = image(&["-R", "-rr_reloc_dir", "rr_moved"], true);
    // d8 is at ISO level 9: relocated, d7 has the CL entry.
    let cl = img.windows(4).position(|w| w == b"CL\x0c\x01").unwrap();
    let d8 = "/d1/d2/d3/d4/d5/d6/d7/d8";
    // CL pointing at the root: a directory cycle.
    let mut looped = img.clone();
    put_both32(&mut looped, cl + 4, le32(&img, ROOT + 2));
    let fs = open(looped);
    let cfg = format!("{d8}/isolinux/isolinux.cfg");
    assert_eq!(fs.read_file(&cfg, 100).unwrap(), CFG);
    let deep = d8.repeat(40) + "/isolinux/isolinux.cfg";
    assert!(fs.read_file(&deep, 100).is_err());
    // CL pointing at file data (not a "." record), and past the end.
    for block in [le32(&img, ROOT + 2) + 40, 0x00ff_ffff] {
        let mut bad = img.clone();
        put_both32(&mut bad, cl + 4, block);
        assert!(is_corrupt(open(bad).read_dir("/d1/d2/d3/d4/d5/d6/d7")));
    }
}
