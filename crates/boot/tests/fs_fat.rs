//! FAT12/16/32 through `fs::open`: real images made with mkfs.fat and filled with mtools,
//! read back and compared; hostile images (random and hand-made corruption) give errors,
//! never panics or hangs.

use std::collections::HashMap;
use std::io;
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, OnceLock};

use proptest::prelude::*;
use xdisk_boot::disk::{check_range, MemDisk, ReadAt};
use xdisk_boot::fs::{self, FileSystem, NodeKind};
use xdisk_boot::{Error, Limits};

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(7).wrapping_add(seed as u32) as u8 ^ (i >> 11) as u8)
        .collect()
}

const BIG: usize = 300_000;
const LONG: &str = "a very long file name with spaces, more than eight dot three, \
                    repeated to be well over one hundred and twenty characters \
                    so that it needs many long-name entries.cfg";

fn run(cmd: &mut Command, pkg: &str) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e} (install the Debian package {pkg})"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn mtools(img: &Path, args: &[&str]) {
    let mut c = Command::new(args[0]);
    c.arg("-i").arg(img).args(&args[1..]);
    c.env("MTOOLS_SKIP_CHECK", "1");
    run(&mut c, "mtools");
}

/// The tree put into every image, with a fragmented file: `frag` is written after every
/// other small file was deleted, so its clusters are not contiguous.
fn make_image(fat_bits: u32, kib: u32, big_dir: bool) -> Vec<u8> {
    make_image_with(fat_bits, kib, big_dir, &["-s", "1", "-n", "BOOTVOL"])
}

/// [`make_image`] with other mkfs.fat options (sector and cluster sizes).
fn make_image_with(fat_bits: u32, kib: u32, big_dir: bool, mkfs: &[&str]) -> Vec<u8> {
    let tmp = tempfile::TempDir::new().unwrap();
    let src = tmp.path().join("src");
    let w = |p: &str, data: &[u8]| {
        let p = src.join(p);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, data).unwrap();
    };
    w("boot/vmlinuz-6.1.0-amd64", &pattern(BIG, 1));
    w("boot/initrd.img", &pattern(70_000, 2));
    w("EMPTY.TXT", b"");
    w("a/b/c/deep.txt", b"deep file\n");
    w(LONG, b"long name\n");
    w("grüße.txt", b"unicode\n");
    w("UPPER.CFG", b"upper\n");
    w("lower.cfg", b"lower\n");
    if big_dir {
        for i in 0..600 {
            w(
                &format!("big/entry_with_a_longish_name_{i}"),
                i.to_string().as_bytes(),
            );
        }
    }
    let img = tmp.path().join("img");
    run(
        Command::new("mkfs.fat")
            .args(["-C", "-F", &fat_bits.to_string()])
            .args(mkfs)
            .arg(&img)
            .arg(kib.to_string()),
        "dosfstools",
    );
    let mut args = vec!["mcopy".to_string(), "-s".into()];
    for e in std::fs::read_dir(&src).unwrap() {
        args.push(e.unwrap().path().to_string_lossy().into_owned());
    }
    args.push("::/".into());
    let args: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    mtools(&img, &args);
    // Fragmentation: small files, every other one deleted, then a multi-cluster file.
    let small = tmp.path().join("small");
    std::fs::write(&small, [7u8; 700]).unwrap();
    for i in 0..12 {
        mtools(
            &img,
            &["mcopy", small.to_str().unwrap(), &format!("::/s{i}")],
        );
    }
    for i in (0..12).step_by(2) {
        mtools(&img, &["mdel", &format!("::/s{i}")]);
    }
    let frag = tmp.path().join("frag");
    std::fs::write(&frag, pattern(20_000, 9)).unwrap();
    mtools(&img, &["mcopy", frag.to_str().unwrap(), "::/frag"]);
    std::fs::read(&img).unwrap()
}

fn open_mem(img: Vec<u8>) -> Box<dyn FileSystem> {
    let disk: Arc<dyn ReadAt> = Arc::new(MemDisk(img));
    fs::open(disk, &Limits::default())
        .unwrap()
        .expect("no filesystem found")
}

fn check_tree(fs: &dyn FileSystem, big_dir: bool) {
    assert_eq!(fs.fs_type(), "fat");
    let lim = 1 << 30;
    assert_eq!(
        fs.read_file("/boot/vmlinuz-6.1.0-amd64", lim).unwrap(),
        pattern(BIG, 1)
    );
    assert_eq!(
        fs.read_file("boot//initrd.img", lim).unwrap(),
        pattern(70_000, 2)
    );
    assert_eq!(fs.read_file("/EMPTY.TXT", lim).unwrap(), b"");
    assert_eq!(
        fs.read_file("/a/b/c/deep.txt", lim).unwrap(),
        b"deep file\n"
    );
    assert_eq!(
        fs.read_file(&format!("/{LONG}"), lim).unwrap(),
        b"long name\n"
    );
    assert_eq!(fs.read_file("/grüße.txt", lim).unwrap(), b"unicode\n");
    assert_eq!(fs.read_file("/frag", lim).unwrap(), pattern(20_000, 9));
    // Case-insensitive lookups, of long and 8.3 names.
    assert_eq!(fs.read_file("/upper.cfg", lim).unwrap(), b"upper\n");
    assert_eq!(fs.read_file("/LOWER.CFG", lim).unwrap(), b"lower\n");
    assert_eq!(
        fs.read_file("/BOOT/VMLINUZ-6.1.0-AMD64", lim).unwrap(),
        pattern(BIG, 1)
    );
    assert_eq!(fs.read_file("/GRÜSSE.txt", lim).ok(), None);
    assert_eq!(fs.read_file("/GRÜßE.TXT", lim).unwrap(), b"unicode\n");
    // ".." at the root stays there.
    assert_eq!(
        fs.read_file("/../../a/../boot/./initrd.img", lim).unwrap(),
        pattern(70_000, 2)
    );
    assert!(matches!(
        fs.read_file("/nope", lim),
        Err(Error::NotFound(_))
    ));
    assert!(matches!(
        fs.read_file("/boot", lim),
        Err(Error::NotAFile(_))
    ));
    assert!(matches!(
        fs.read_file("/EMPTY.TXT/x", lim),
        Err(Error::NotADirectory(_))
    ));
    assert_eq!(fs.kind("/boot").unwrap(), Some(NodeKind::Dir));
    assert_eq!(fs.kind("/a/b/c/deep.txt").unwrap(), Some(NodeKind::File));
    assert_eq!(fs.kind("/nope").unwrap(), None);
    assert_eq!(fs.kind("/").unwrap(), Some(NodeKind::Dir));
    let mut root = fs.read_dir("/").unwrap();
    root.sort();
    let mut want = vec![
        "EMPTY.TXT",
        LONG,
        "UPPER.CFG",
        "a",
        "boot",
        "frag",
        "grüße.txt",
        "lower.cfg",
        "s1",
        "s11",
        "s3",
        "s5",
        "s7",
        "s9",
    ];
    if big_dir {
        want.push("big");
    }
    want.sort();
    assert_eq!(root, want);
    let mut boot = fs.read_dir("/a/b/../../boot").unwrap();
    boot.sort();
    assert_eq!(boot, ["initrd.img", "vmlinuz-6.1.0-amd64"]);
    assert_eq!(fs.read_dir("/a/b/c").unwrap(), ["deep.txt"]);
    if big_dir {
        let names = fs.read_dir("/big").unwrap();
        assert_eq!(names.len(), 600);
        for i in [0, 1, 299, 599] {
            let p = format!("/big/ENTRY_with_a_longish_name_{i}");
            assert_eq!(fs.read_file(&p, lim).unwrap(), i.to_string().as_bytes());
        }
    }
}

#[test]
fn fat12_round_trip() {
    check_tree(&*open_mem(make_image(12, 2048, false)), false);
}

#[test]
fn fat16_round_trip_with_large_directory() {
    check_tree(&*open_mem(make_image(16, 8192, true)), true);
}

#[test]
fn fat32_round_trip_with_large_directory() {
    check_tree(&*open_mem(make_image(32, 36 * 1024, true)), true);
}

#[test]
fn other_sector_and_cluster_sizes_round_trip() {
    // 2 KiB sectors; 4 KiB sectors; 512-byte sectors in 4-sector clusters.
    check_tree(
        &*open_mem(make_image_with(
            16,
            20480,
            false,
            &["-S", "2048", "-s", "1"],
        )),
        false,
    );
    check_tree(
        &*open_mem(make_image_with(12, 8192, false, &["-S", "4096", "-s", "1"])),
        false,
    );
    check_tree(
        &*open_mem(make_image_with(12, 4096, false, &["-s", "4"])),
        false,
    );
}

#[test]
fn read_file_over_limit_is_too_large_before_reading() {
    let fs = open_mem(make_image(12, 2048, false));
    match fs.read_file("/boot/vmlinuz-6.1.0-amd64", 1000) {
        Err(Error::TooLarge { size, limit, .. }) => assert_eq!((size, limit), (BIG as u64, 1000)),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        fs.read_file("/boot/vmlinuz-6.1.0-amd64", BIG as u64)
            .unwrap()
            .len(),
        BIG
    );
}

#[test]
fn fat_has_no_symlinks() {
    let fs = open_mem(make_image(12, 2048, false));
    for p in ["/", "/boot", "/boot/initrd.img", "/EMPTY.TXT"] {
        assert_ne!(fs.kind(p).unwrap(), Some(NodeKind::Symlink));
    }
}

/// Geometry of a FAT12/16 image, for the hand-made corruptions.
struct Geo {
    bps: usize,
    fat: usize,
    root: usize,
    data: usize,
    spc: usize,
}

fn geo(img: &[u8]) -> Geo {
    let u16at = |o: usize| u16::from_le_bytes([img[o], img[o + 1]]) as usize;
    let bps = u16at(11);
    let rsvd = u16at(14);
    let nfats = img[16] as usize;
    let root_ent = u16at(17);
    let fatsz = u16at(22);
    let root = (rsvd + nfats * fatsz) * bps;
    Geo {
        bps,
        fat: rsvd * bps,
        root,
        data: root + root_ent * 32,
        spc: img[13] as usize,
    }
}

/// Offset of the 8.3 entry `name11` (11 bytes, padded) anywhere in the image.
fn find_entry(img: &[u8], name11: &[u8]) -> usize {
    img.windows(11)
        .enumerate()
        .find(|(i, w)| *w == name11 && i % 32 == 0)
        .map(|(i, _)| i)
        .expect("entry not found")
}

fn fat16_set(img: &mut [u8], g: &Geo, cluster: usize, v: u16) {
    let o = g.fat + cluster * 2;
    img[o..o + 2].copy_from_slice(&v.to_le_bytes());
}

#[test]
fn hand_made_corruptions_give_clean_errors() {
    let img = make_image(16, 8192, false);
    let g = geo(&img);
    assert_eq!(g.bps, 512);
    let lim = 1 << 30;
    let e = find_entry(&img, b"INITRD  IMG");
    let first = u16::from_le_bytes([img[e + 26], img[e + 27]]) as usize;
    // A chain looping to itself, and a two-cluster cycle.
    let mut bad = img.clone();
    fat16_set(&mut bad, &g, first, first as u16);
    let r = open_mem(bad).read_file("/boot/initrd.img", lim);
    assert!(matches!(r, Err(Error::Corrupt { .. })), "{r:?}");
    let mut bad = img.clone();
    fat16_set(&mut bad, &g, first + 1, first as u16);
    let r = open_mem(bad).read_file("/boot/initrd.img", lim);
    assert!(matches!(r, Err(Error::Corrupt { .. })), "{r:?}");
    // A chain ending early (EOC after the first cluster), or running into a free cluster.
    let mut bad = img.clone();
    fat16_set(&mut bad, &g, first, 0xFFFF);
    assert!(matches!(
        open_mem(bad).read_file("/boot/initrd.img", lim),
        Err(Error::Corrupt { .. })
    ));
    let mut bad = img.clone();
    fat16_set(&mut bad, &g, first, 0);
    assert!(matches!(
        open_mem(bad).read_file("/boot/initrd.img", lim),
        Err(Error::Corrupt { .. })
    ));
    // A huge size: over the limit, then (within the limit) longer than its chain.
    let mut bad = img.clone();
    bad[e + 28..e + 32].copy_from_slice(&u32::MAX.to_le_bytes());
    assert!(matches!(
        open_mem(bad.clone()).read_file("/boot/initrd.img", lim),
        Err(Error::TooLarge { .. })
    ));
    bad[e + 28..e + 32].copy_from_slice(&(10u32 << 20).to_le_bytes());
    assert!(matches!(
        open_mem(bad).read_file("/boot/initrd.img", 64 << 20),
        Err(Error::Corrupt { .. })
    ));
    // A first cluster past the last one.
    let mut bad = img.clone();
    bad[e + 26..e + 28].copy_from_slice(&0xFFF0u16.to_le_bytes());
    assert!(matches!(
        open_mem(bad).read_file("/boot/initrd.img", lim),
        Err(Error::Corrupt { .. })
    ));
    // A directory whose chain loops: "boot" is one cluster; make it point to itself.
    let d = find_entry(&img, b"BOOT       ");
    let dc = u16::from_le_bytes([img[d + 26], img[d + 27]]) as usize;
    let mut bad = img.clone();
    fat16_set(&mut bad, &g, dc, dc as u16);
    let fs = open_mem(bad);
    assert!(matches!(fs.read_dir("/boot"), Err(Error::Corrupt { .. })));
    assert!(fs.read_file("/boot/nothing-here", lim).is_err());
    // The directory's cluster points at data (the file's cluster): entries are garbage,
    // reading stays bounded.
    let mut bad = img.clone();
    bad[d + 26..d + 28].copy_from_slice(&(first as u16).to_le_bytes());
    let fs = open_mem(bad);
    let _ = fs.read_dir("/boot");
    let _ = fs.read_file("/boot/initrd.img", lim);
    // A FAT too small for the cluster count.
    let mut bad = img.clone();
    bad[22..24].copy_from_slice(&1u16.to_le_bytes());
    assert!(matches!(
        fs::open(Arc::new(MemDisk(bad)), &Limits::default()),
        Err(Error::Corrupt { .. })
    ));
    // A root directory of garbage (0xFF: long-name pieces and odd entries everywhere).
    let mut bad = img.clone();
    bad[g.root..g.data].fill(0xFF);
    let fs = open_mem(bad);
    let _ = fs.read_dir("/");
    assert!(fs.read_file("/boot/initrd.img", lim).is_err());
    // Truncated image: data past the end.
    let short = img[..g.data + 4 * g.spc * g.bps].to_vec();
    let fs = open_mem(short);
    assert!(fs.read_file("/boot/vmlinuz-6.1.0-amd64", lim).is_err());
}

/// A long name whose checksum does not match its 8.3 entry is dropped: the entry is seen
/// (listed and found) by its 8.3 name.
#[test]
fn broken_long_name_falls_back_to_the_short_name() {
    let mut img = make_image(12, 2048, false);
    // The 8.3 alias of "vmlinuz-6.1.0-amd64" (mtools: VMLINU~1.0-A), in /boot.
    let e = find_entry(&img, b"VMLINU~10-A");
    // The long-name entries just before it: change their checksum (byte 13).
    let mut lfn = e - 32;
    while img[lfn + 11] == 0x0F {
        img[lfn + 13] ^= 0x55;
        if img[lfn] & 0x40 != 0 {
            break;
        }
        lfn -= 32;
    }
    let fs = open_mem(img);
    let mut boot = fs.read_dir("/boot").unwrap();
    boot.sort();
    assert_eq!(boot, ["VMLINU~1.0-A", "initrd.img"]);
    assert!(matches!(
        fs.read_file("/boot/vmlinuz-6.1.0-amd64", 1 << 30),
        Err(Error::NotFound(_))
    ));
    assert_eq!(
        fs.read_file("/boot/vmlinu~1.0-a", 1 << 30).unwrap(),
        pattern(BIG, 1)
    );
}

#[test]
fn non_fat_boot_sectors_are_not_claimed() {
    let img = make_image(12, 2048, false);
    let none = |b: Vec<u8>| {
        fs::open(Arc::new(MemDisk(b)), &Limits::default())
            .unwrap()
            .is_none()
    };
    // No 0x55AA.
    let mut b = img.clone();
    b[510] = 0;
    assert!(none(b));
    // Bytes per sector not a power of two in 512..4096, sectors per cluster not a power of two.
    for (at, v) in [(11usize, 300u16), (11, 256), (11, 8192), (11, 0)] {
        let mut b = img.clone();
        b[at..at + 2].copy_from_slice(&v.to_le_bytes());
        assert!(none(b), "bytes/sector {v}");
    }
    let mut b = img.clone();
    b[13] = 3;
    assert!(none(b));
    let mut b = img.clone();
    b[13] = 0;
    assert!(none(b));
    // No jump instruction.
    let mut b = img.clone();
    b[0] = 0;
    assert!(none(b));
    // exFAT and NTFS boot sectors (their BPB fields are zero where FAT needs them).
    let mut exfat = vec![0u8; 1 << 20];
    exfat[..11].copy_from_slice(b"\xEB\x76\x90EXFAT   ");
    exfat[510..512].copy_from_slice(&[0x55, 0xAA]);
    assert!(none(exfat));
    let mut ntfs = vec![0u8; 1 << 20];
    ntfs[..11].copy_from_slice(b"\xEB\x52\x90NTFS    ");
    ntfs[11..14].copy_from_slice(&[0x00, 0x02, 0x08]); // 512-byte sectors, 8 per cluster
    ntfs[21] = 0xF8;
    ntfs[24..26].copy_from_slice(&63u16.to_le_bytes());
    ntfs[40..48].copy_from_slice(&2047u64.to_le_bytes());
    ntfs[510..512].copy_from_slice(&[0x55, 0xAA]);
    assert!(none(ntfs));
    // An MBR made by sfdisk (0x55AA, partition table, no BPB) is not FAT.
    let tmp = tempfile::TempDir::new().unwrap();
    let disk = tmp.path().join("disk");
    std::fs::write(&disk, vec![0u8; 4 << 20]).unwrap();
    let mut c = Command::new("sfdisk");
    c.arg("--no-reread").arg("-q").arg(&disk);
    c.stdin(std::process::Stdio::piped());
    let mut child = c
        .spawn()
        .expect("sfdisk (install the Debian package fdisk)");
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"label: dos\nstart=2048, type=83\n")
        .unwrap();
    assert!(child.wait().unwrap().success());
    let mbr = std::fs::read(&disk).unwrap();
    assert_eq!(&mbr[510..512], &[0x55, 0xAA]);
    assert!(none(mbr.clone()));
    // Even with a GRUB-style jump at the start.
    let mut m = mbr;
    m[..3].copy_from_slice(&[0xEB, 0x63, 0x90]);
    assert!(none(m));
}

/// A disk that is a shared image plus a few overwritten bytes (cheap for large images).
struct Overlay {
    base: Arc<Vec<u8>>,
    edits: HashMap<u64, u8>,
}

impl ReadAt for Overlay {
    fn size(&self) -> u64 {
        self.base.len() as u64
    }
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        check_range(offset, buf.len(), self.size())?;
        let start = offset as usize;
        buf.copy_from_slice(&self.base[start..start + buf.len()]);
        let end = offset + buf.len() as u64;
        for (&at, &v) in &self.edits {
            if (offset..end).contains(&at) {
                buf[(at - offset) as usize] = v;
            }
        }
        Ok(())
    }
}

fn images() -> &'static [Arc<Vec<u8>>] {
    static IMGS: OnceLock<Vec<Arc<Vec<u8>>>> = OnceLock::new();
    IMGS.get_or_init(|| {
        vec![
            Arc::new(make_image(12, 1024, false)),
            Arc::new(make_image(16, 4200, false)),
            Arc::new(make_image(32, 34 * 1024, false)),
        ]
    })
}

fn read_everything(disk: Arc<dyn ReadAt>) {
    let limits = Limits {
        max_file: 1 << 20,
        max_dir_entries: 64,
        ..Limits::default()
    };
    let Ok(Some(fs)) = fs::open(disk, &limits) else {
        return;
    };
    for p in ["/", "/boot", "/a", "/a/b", "/a/b/c"] {
        let _ = fs.read_dir(p);
    }
    for p in [
        "/boot/vmlinuz-6.1.0-amd64",
        "/boot/initrd.img",
        "/a/b/c/deep.txt",
        "/frag",
        "/upper.cfg",
        "/grüße.txt",
    ] {
        let _ = fs.kind(p);
        let _ = fs.read_file(p, 1 << 20);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    /// Random bytes overwritten in the metadata (boot sector, FATs, root directory and the
    /// first directory clusters) or anywhere: never a panic, never a hang.
    #[test]
    fn corrupted_image_never_panics(
        which in 0usize..3,
        edits in proptest::collection::vec((any::<u32>(), any::<u8>()), 1..40),
        low in any::<bool>(),
    ) {
        let base = images()[which].clone();
        let len = base.len() as u64;
        // The first 256 KiB hold the boot sector, FATs, root and the first clusters.
        let span = if low { len.min(256 << 10) } else { len };
        let edits = edits
            .into_iter()
            .map(|(at, b)| (u64::from(at) % span, b))
            .collect();
        read_everything(Arc::new(Overlay { base, edits }));
    }
}
