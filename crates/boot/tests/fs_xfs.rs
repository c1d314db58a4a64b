//! XFS reader against images made by the real mkfs.xfs (xfsprogs) from a protofile, and
//! against hostile variants of them. Extent lists that mkfs cannot produce (many extents,
//! holes, unwritten extents, a B+tree) are written into real images with `xfs_db -x`
//! (inode fields) and, for the B+tree leaf block, by hand.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use proptest::prelude::*;
use tempfile::TempDir;
use xdisk_boot::disk::{FileDisk, MemDisk, ReadAt};
use xdisk_boot::fs::xfs::{self, Xfs};
use xdisk_boot::fs::{self as bfs, FileSystem, NodeKind, Walk};
use xdisk_boot::{Error, Limits};

fn tool(name: &str) -> Command {
    let found = ["/usr/sbin", "/sbin", "/usr/bin", "/bin"]
        .iter()
        .any(|d| Path::new(d).join(name).exists());
    assert!(
        found,
        "{name} is missing: install the Debian package xfsprogs"
    );
    Command::new(name)
}

/// Deterministic bytes (an LCG), different per seed.
fn pattern(seed: u32, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2_654_435_761).wrapping_add(12345);
    (0..len)
        .map(|_| {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
            (x >> 16) as u8
        })
        .collect()
}

/// Runs mkfs.xfs on a sparse image file from `proto`. Small filesystems need the fstests
/// escape hatch (TEST_DIR, TEST_DEV and QA_CHECK_FS set), otherwise xfsprogs >= 5.19
/// insists on 300 MiB and a 64 MiB log; without it we fall back to 300 MiB (sparse, but
/// mkfs zeroes the log).
fn mkfs(dir: &Path, name: &str, proto: &str, opts: &[&str]) -> PathBuf {
    let img = dir.join(name);
    let proto_path = dir.join(format!("{name}.proto"));
    fs::write(&proto_path, proto).unwrap();
    for size in ["32m", "300m"] {
        let _ = fs::remove_file(&img);
        let out = tool("mkfs.xfs")
            .env("TEST_DIR", dir)
            .env("TEST_DEV", "none")
            .env("QA_CHECK_FS", "1")
            .args(["-q", "-f"])
            .args(opts)
            .arg("-p")
            .arg(&proto_path)
            .arg("-d")
            .arg(format!("file,name={},size={size}", img.display()))
            .output()
            .unwrap();
        if out.status.success() {
            return img;
        }
        eprintln!("mkfs.xfs {size}: {}", String::from_utf8_lossy(&out.stderr));
    }
    panic!("mkfs.xfs failed");
}

fn xfs_db(img: &Path, write: bool, cmds: &[String]) -> String {
    let mut c = tool("xfs_db");
    c.arg(if write { "-x" } else { "-r" });
    for cmd in cmds {
        c.arg("-c").arg(cmd);
    }
    let out = c.arg(img).output().unwrap();
    assert!(out.status.success(), "xfs_db {cmds:?}: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The inode number of `name` in directory `dir`, as xfs_db lists it.
fn ino_of(img: &Path, dir: &str, name: &str) -> u64 {
    let out = xfs_db(img, false, &[format!("ls {dir}")]);
    for line in out.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() >= 6 && f[5] == name {
            return f[1].parse().unwrap();
        }
    }
    panic!("{name} not in {dir}: {out}");
}

/// (startoff, startblock, count) of a file's data extents, as xfs_db maps them.
fn bmap(img: &Path, ino: u64) -> Vec<(u64, u64, u64, u64)> {
    let out = xfs_db(img, false, &[format!("inode {ino}"), "bmap".into()]);
    out.lines()
        .filter(|l| l.starts_with("data offset"))
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (
                f[2].parse().unwrap(),
                f[4].parse().unwrap(),
                f[7].parse().unwrap(),
                f[9].parse().unwrap(),
            )
        })
        .collect()
}

fn byte_of_inode(img: &Path, ino: u64) -> u64 {
    let out = xfs_db(img, false, &[format!("convert inode {ino} byte")]);
    let n = out.split_whitespace().nth(1).unwrap();
    n.trim_matches(|c| c == '(' || c == ')').parse().unwrap()
}

fn open_file(img: &Path) -> Box<dyn FileSystem> {
    let f = fs::File::open(img).unwrap();
    let size = f.metadata().unwrap().len();
    let disk: Arc<dyn ReadAt> = Arc::new(FileDisk::new(f, size));
    let fs = bfs::open(disk, &Limits::default())
        .unwrap()
        .expect("xfs found");
    assert_eq!(fs.fs_type(), "xfs");
    fs
}

fn poke(img: &Path, at: u64, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = fs::OpenOptions::new().write(true).open(img).unwrap();
    f.write_all_at(bytes, at).unwrap();
}

/// The source tree of the round-trip images, with its protofile.
struct Tree {
    vmlinuz: Vec<u8>,
    initrd: Vec<u8>,
    long_name: String,
    long_link: String,
}

const DIR_SIZES: [(&str, usize); 4] = [("d3", 3), ("d60", 60), ("d400", 400), ("d5000", 5000)];

fn make_tree(src: &Path) -> (Tree, String) {
    let t = Tree {
        vmlinuz: pattern(1, 300_001),
        initrd: pattern(2, 1 << 20),
        long_name: "n".repeat(200) + &"x".repeat(55),
        // Longer than the inode literal area (336 bytes with 512-byte v5 inodes, 156 on
        // v4 with 256-byte inodes): stored in a remote block.
        long_link: "../boot/".repeat(50) + "vmlinuz",
    };
    fs::create_dir_all(src).unwrap();
    let file = |name: &str, data: &[u8]| {
        let p = src.join(name);
        fs::write(&p, data).unwrap();
        p.display().to_string()
    };
    let vml = file("vmlinuz", &t.vmlinuz);
    let ini = file("initrd", &t.initrd);
    let cfg = file("grub.cfg", b"menuentry 'x' { linux /vmlinuz }\n");
    let empty = file("empty", b"");
    let mut p = String::from("xdisk-test\n0 0\nd--755 0 0\n");
    p += "boot d--755 0 0\n";
    p += &format!("vmlinuz ---644 0 0 {vml}\n");
    p += &format!("initrd ---644 0 0 {ini}\n");
    p += &format!("empty ---644 0 0 {empty}\n");
    p += &format!("{} ---644 0 0 {cfg}\n", t.long_name);
    p += "grub2 d--755 0 0\n";
    p += &format!("grub.cfg ---644 0 0 {cfg}\n");
    p += "$\n";
    p += "short l--777 0 0 vmlinuz\n";
    p += &format!("long l--777 0 0 {}\n", t.long_link);
    p += "abs l--777 0 0 /boot/grub2/grub.cfg\n";
    p += "escape l--777 0 0 ../../../../boot/vmlinuz\n";
    p += "outside l--777 0 0 ../../../etc/passwd\n";
    p += "$\n";
    p += "loop1 l--777 0 0 loop2\n";
    p += "loop2 l--777 0 0 /loop1\n";
    for (dir, n) in DIR_SIZES {
        p += &format!("{dir} d--755 0 0\n");
        for i in 0..n {
            p += &format!("entry-{i:05} ---644 0 0 {empty}\n");
        }
        p += "$\n";
    }
    p += "$\n";
    (t, p)
}

/// Reads back everything of the round-trip tree through `fs::open`.
fn check_tree(fs: &dyn FileSystem, t: &Tree) {
    let max = 1 << 30;
    assert_eq!(fs.read_file("/boot/vmlinuz", max).unwrap(), t.vmlinuz);
    assert_eq!(fs.read_file("/boot/initrd", max).unwrap(), t.initrd);
    assert_eq!(fs.read_file("/boot/empty", max).unwrap(), b"");
    let cfg = b"menuentry 'x' { linux /vmlinuz }\n".to_vec();
    assert_eq!(fs.read_file("/boot/grub2/grub.cfg", max).unwrap(), cfg);
    let long = format!("/boot/{}", t.long_name);
    assert_eq!(fs.read_file(&long, max).unwrap(), cfg);
    // Symlinks: inline, remote, absolute, escaping upwards (stays inside), loops.
    assert_eq!(fs.read_file("/boot/short", max).unwrap(), t.vmlinuz);
    assert_eq!(fs.read_file("/boot/long", max).unwrap(), t.vmlinuz);
    assert_eq!(fs.read_file("/boot/abs", max).unwrap(), cfg);
    assert_eq!(fs.read_file("/boot/escape", max).unwrap(), t.vmlinuz);
    assert!(matches!(
        fs.read_file("/boot/outside", max),
        Err(Error::NotFound(_))
    ));
    assert_eq!(fs.kind("/boot/outside").unwrap(), None);
    assert!(matches!(
        fs.read_file("/loop1", max),
        Err(Error::SymlinkLoop(_))
    ));
    assert_eq!(
        fs.read_file("/../../boot/./grub2/../vmlinuz", max).unwrap(),
        t.vmlinuz
    );
    // Kinds and lookups are exact.
    assert_eq!(fs.kind("/boot").unwrap(), Some(NodeKind::Dir));
    assert_eq!(fs.kind("/boot/short").unwrap(), Some(NodeKind::File));
    assert_eq!(fs.kind("/BOOT").unwrap(), None);
    assert_eq!(fs.kind("/boot/vmlinu").unwrap(), None);
    assert!(matches!(
        fs.read_file("/boot", max),
        Err(Error::NotAFile(_))
    ));
    assert!(matches!(
        fs.read_dir("/boot/vmlinuz"),
        Err(Error::NotADirectory(_))
    ));
    // The size limit is checked before reading.
    match fs.read_file("/boot/initrd", 1000) {
        Err(Error::TooLarge { size, limit, .. }) => assert_eq!((size, limit), (1 << 20, 1000)),
        other => panic!("{other:?}"),
    }
    // Directory listings.
    let names: BTreeSet<String> = fs.read_dir("/").unwrap().into_iter().collect();
    let want: BTreeSet<String> = ["boot", "loop1", "loop2", "d3", "d60", "d400", "d5000"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    assert_eq!(names, want);
    let names: BTreeSet<String> = fs.read_dir("/boot").unwrap().into_iter().collect();
    assert_eq!(names.len(), 10, "{names:?}");
    assert!(names.contains(&t.long_name));
    for (dir, n) in DIR_SIZES {
        let names = fs.read_dir(&format!("/{dir}")).unwrap();
        let want = n.min(Limits::default().max_dir_entries);
        assert_eq!(names.len(), want, "{dir}");
        let set: BTreeSet<String> = names.into_iter().collect();
        assert_eq!(set.len(), want, "{dir}: duplicates");
        if n <= want {
            let all: BTreeSet<String> = (0..n).map(|i| format!("entry-{i:05}")).collect();
            assert_eq!(set, all, "{dir}");
        }
        // Lookups of the first, the last and a missing entry.
        for i in [0, n / 2, n - 1] {
            let path = format!("/{dir}/entry-{i:05}");
            assert_eq!(fs.kind(&path).unwrap(), Some(NodeKind::File), "{path}");
        }
        assert_eq!(fs.kind(&format!("/{dir}/entry-{n:05}")).unwrap(), None);
    }
}

/// The form of a directory as xfs_db sees it: the data fork format, then the magic of the
/// block at the leaf offset (32 GiB): a single leaf ("leaf") or a da-btree node ("node").
fn dir_form(img: &Path, ino: u64) -> &'static str {
    let out = xfs_db(
        img,
        false,
        &[format!("inode {ino}"), "p core.format".into()],
    );
    if out.contains("local") {
        return "shortform";
    }
    let sb = xfs_db(img, false, &["sb".into(), "p blocksize".into()]);
    let bs: u64 = sb
        .trim()
        .trim_start_matches("blocksize = ")
        .parse()
        .unwrap();
    let leaf = (32u64 << 30) / bs;
    if !bmap(img, ino).iter().any(|e| e.0 >= leaf) {
        return "block";
    }
    let out = xfs_db(
        img,
        false,
        &[format!("inode {ino}"), format!("dblock {leaf}"), "p".into()],
    );
    if out.contains("lhdr.info.hdr.magic") || out.contains("hdr.info.magic = 0xd2f1") {
        "leaf"
    } else if out.contains("nhdr.info.hdr.magic") || out.contains("hdr.info.magic = 0xfebe") {
        "node"
    } else {
        panic!("directory {ino}: {out}")
    }
}

fn round_trip(name: &str, opts: &[&str]) {
    let tmp = TempDir::new().unwrap();
    let (t, proto) = make_tree(&tmp.path().join("src"));
    let img = mkfs(tmp.path(), name, &proto, opts);
    // The directories are in the forms we want to cover (xfs_db's view).
    for (dir, form) in [("d3", "shortform"), ("d60", "block"), ("d400", "leaf")] {
        assert_eq!(dir_form(&img, ino_of(&img, "/", dir)), form, "{dir}");
    }
    assert_eq!(dir_form(&img, ino_of(&img, "/", "d5000")), "node");
    check_tree(&*open_file(&img), &t);
}

#[test]
fn v5_4k_blocks_round_trip() {
    round_trip("v5-4k.img", &[]);
}

#[test]
fn v5_1k_blocks_8k_dir_blocks_round_trip() {
    round_trip("v5-1k.img", &["-b", "size=1024", "-n", "size=8192"]);
}

#[test]
fn v4_4k_blocks_no_ftype_round_trip() {
    // Directory entries without the file type byte.
    round_trip("v4-4k.img", &["-m", "crc=0", "-n", "ftype=0"]);
}

#[test]
fn v4_1k_blocks_256_byte_inodes_round_trip() {
    round_trip(
        "v4-1k.img",
        &["-m", "crc=0", "-b", "size=1024", "-i", "size=256"],
    );
}

/// An image with `/big` (64 blocks of a pattern) and `/spare` (two blocks we may
/// overwrite).
fn remap_image(tmp: &TempDir, opts: &[&str]) -> (PathBuf, Vec<u8>, u64) {
    let bs = if opts.contains(&"size=1024") {
        1024
    } else {
        4096
    };
    let big = pattern(7, 64 * bs);
    let src = tmp.path().join("src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("big"), &big).unwrap();
    fs::write(src.join("spare"), vec![0u8; 2 * bs]).unwrap();
    let proto = format!(
        "x\n0 0\nd--755 0 0\nbig ---644 0 0 {}\nspare ---644 0 0 {}\n$\n$\n",
        src.join("big").display(),
        src.join("spare").display()
    );
    let img = mkfs(tmp.path(), "remap.img", &proto, opts);
    (img, big, bs as u64)
}

/// The expected contents of `/big` once mapped by `recs` (logical block, index of the
/// original block or None for zeros, count).
fn expected(big: &[u8], bs: usize, recs: &[(u64, Option<u64>, u64)]) -> Vec<u8> {
    let mut out = vec![0u8; big.len()];
    for &(off, src, count) in recs {
        if let Some(src) = src {
            for i in 0..count as usize {
                let d = (off as usize + i) * bs;
                let s = (src as usize + i) * bs;
                out[d..d + bs].copy_from_slice(&big[s..s + bs]);
            }
        }
    }
    out
}

/// 2-block extents in reverse physical order, with a hole (logical 10..12 unmapped) and
/// an unwritten extent (logical 20..22), as (logical, original block or None, count,
/// unwritten flag).
fn scrambled(n: u64) -> Vec<(u64, u64, u64, bool)> {
    (0..n / 2)
        .filter(|j| *j != 5)
        .map(|j| (2 * j, n - 2 - 2 * j, 2, j == 10))
        .collect()
}

#[test]
fn extent_list_with_holes_and_unwritten_extents_maps_offsets() {
    let tmp = TempDir::new().unwrap();
    let (img, big, bs) = remap_image(&tmp, &["-b", "size=1024"]);
    let ino = ino_of(&img, "/", "big");
    let start = bmap(&img, ino)[0].1;
    // 12 extents: fits the inode's literal area (extents format).
    let recs = scrambled(24);
    let mut cmds = vec![
        format!("inode {ino}"),
        format!("write core.nextents {}", recs.len()),
    ];
    for (i, (off, src, count, unwritten)) in recs.iter().enumerate() {
        cmds.push(format!("write u3.bmx[{i}].startoff {off}"));
        cmds.push(format!("write u3.bmx[{i}].startblock {}", start + src));
        cmds.push(format!("write u3.bmx[{i}].blockcount {count}"));
        cmds.push(format!(
            "write u3.bmx[{i}].extentflag {}",
            u8::from(*unwritten)
        ));
    }
    // The file ends at logical block 24 (later blocks are not mapped any more).
    cmds.push(format!("write core.size {}", 24 * bs));
    xfs_db(&img, true, &cmds);
    assert_eq!(bmap(&img, ino).len(), recs.len());
    let want_recs: Vec<_> = recs
        .iter()
        .map(|&(o, s, c, u)| (o, (!u).then_some(s), c))
        .collect();
    let want = expected(&big[..24 * bs as usize], bs as usize, &want_recs);
    let fs = open_file(&img);
    assert_eq!(fs.read_file("/big", 1 << 30).unwrap(), want);
}

/// A long-format B+tree block header ("BMA3" on v5, "BMAP" on v4); returns its length.
fn bmbt_header(
    block: &mut [u8],
    v5: bool,
    level: u16,
    numrecs: usize,
    fsb: u64,
    ino: u64,
) -> usize {
    block[0..4].copy_from_slice(if v5 { b"BMA3" } else { b"BMAP" });
    block[4..6].copy_from_slice(&level.to_be_bytes());
    block[6..8].copy_from_slice(&(numrecs as u16).to_be_bytes());
    block[8..24].fill(0xff); // no siblings
    if !v5 {
        return 24;
    }
    let sectors = fsb * block.len() as u64 / 512;
    block[24..32].copy_from_slice(&sectors.to_be_bytes());
    block[56..64].copy_from_slice(&ino.to_be_bytes());
    72
}

/// Builds a two-level extent B+tree for `/big` by hand: the root in the inode (written
/// with xfs_db, which places the pointers), a node block and a leaf block in `/spare`'s
/// blocks.
fn btree_maps_offsets(opts: &[&str], v5: bool) {
    let tmp = TempDir::new().unwrap();
    let (img, big, bs) = remap_image(&tmp, opts);
    let ino = ino_of(&img, "/", "big");
    let start = bmap(&img, ino)[0].1;
    let spare = bmap(&img, ino_of(&img, "/", "spare"));
    assert_eq!(spare[0].2, 2, "{spare:?}");
    let (node, leaf) = (spare[0].1, spare[0].1 + 1);
    let recs = scrambled(64); // 31 extents: more than the inode holds

    let mut leaf_block = vec![0u8; bs as usize];
    let hdr = bmbt_header(&mut leaf_block, v5, 0, recs.len(), leaf, ino);
    for (i, &(off, src, count, unwritten)) in recs.iter().enumerate() {
        let sb = start + src; // AG 0: the AG-encoded block is the block
        let l0 = (u64::from(unwritten) << 63) | (off << 9) | (sb >> 43);
        let l1 = (sb << 21) | count;
        let at = hdr + i * 16;
        leaf_block[at..at + 8].copy_from_slice(&l0.to_be_bytes());
        leaf_block[at + 8..at + 16].copy_from_slice(&l1.to_be_bytes());
    }
    poke(&img, leaf * bs, &leaf_block);
    // The node: one key (startoff 0) and, after room for all keys, one pointer.
    let mut node_block = vec![0u8; bs as usize];
    let hdr = bmbt_header(&mut node_block, v5, 1, 1, node, ino);
    let maxrecs = (bs as usize - hdr) / 16;
    let ptr_at = hdr + maxrecs * 8;
    node_block[ptr_at..ptr_at + 8].copy_from_slice(&leaf.to_be_bytes());
    poke(&img, node * bs, &node_block);

    let fork = if v5 { "u3" } else { "u" };
    xfs_db(
        &img,
        true,
        &[
            format!("inode {ino}"),
            "write core.format 3".into(),
            format!("write core.nextents {}", recs.len()),
            format!("inode {ino}"),
            format!("write {fork}.bmbt.level 2"),
            format!("write {fork}.bmbt.numrecs 1"),
            format!("write {fork}.bmbt.keys[1].startoff 0"),
            format!("write {fork}.bmbt.ptrs[1] {node}"),
        ],
    );
    let want_recs: Vec<_> = recs
        .iter()
        .map(|&(o, s, c, u)| (o, (!u).then_some(s), c))
        .collect();
    let want = expected(&big, bs as usize, &want_recs);
    let fs = open_file(&img);
    assert_eq!(fs.read_file("/big", 1 << 30).unwrap(), want);
    // xfs_db walks the hand-made tree to the same extents.
    let theirs = bmap(&img, ino);
    let ours: Vec<_> = recs
        .iter()
        .map(|&(o, src, c, u)| (o, start + src, c, u64::from(u)))
        .collect();
    assert_eq!(theirs, ours);

    // A node pointing at itself (a cycle) is refused, not followed.
    let mut cyclic = node_block.clone();
    cyclic[ptr_at..ptr_at + 8].copy_from_slice(&node.to_be_bytes());
    poke(&img, node * bs, &cyclic);
    assert!(matches!(
        open_file(&img).read_file("/big", 1 << 30),
        Err(Error::Corrupt { .. })
    ));
    // A leaf claiming more records than fit in a block.
    poke(&img, node * bs, &node_block);
    poke(&img, leaf * bs + 6, &u16::MAX.to_be_bytes());
    assert!(matches!(
        open_file(&img).read_file("/big", 1 << 30),
        Err(Error::Corrupt { .. })
    ));
}

#[test]
fn v5_btree_extent_list_maps_offsets() {
    btree_maps_offsets(&[], true);
}

#[test]
fn v4_btree_extent_list_maps_offsets() {
    btree_maps_offsets(&["-m", "crc=0", "-b", "size=1024"], false);
}

/// A small image for the hostile tests, and the byte ranges worth damaging (superblock,
/// the first inode chunk, the data and directory blocks after it).
fn small_image() -> (Vec<u8>, Vec<(u64, u64)>, u64) {
    let tmp = TempDir::new().unwrap();
    let src = tmp.path().join("src");
    fs::create_dir_all(&src).unwrap();
    let f = src.join("f");
    fs::write(&f, pattern(3, 20_000)).unwrap();
    let f = f.display();
    let mut proto = format!("x\n0 0\nd--755 0 0\nboot d--755 0 0\nvmlinuz ---644 0 0 {f}\n");
    let long = "../boot/".repeat(50) + "vmlinuz";
    proto += &format!("l1 l--777 0 0 {long}\nl2 l--777 0 0 vmlinuz\n");
    proto += "d d--755 0 0\n";
    for i in 0..80 {
        proto += &format!("entry-{i} ---644 0 0 {f}\n");
    }
    proto += "$\n$\n$\n";
    let img = mkfs(tmp.path(), "small.img", &proto, &["-b", "size=1024"]);
    let out = xfs_db(&img, false, &["sb".into(), "p rootino".into()]);
    let rootino: u64 = out.trim().trim_start_matches("rootino = ").parse().unwrap();
    let root = byte_of_inode(&img, rootino);
    let data = fs::read(&img).unwrap();
    (
        data,
        vec![(0, 512), (root, 64 * 512), (root + 64 * 512, 256 << 10)],
        root,
    )
}

fn walk_everything(fs: &dyn FileSystem) {
    let mut todo = vec![("/".to_string(), 0)];
    let mut n = 0;
    while let Some((path, depth)) = todo.pop() {
        n += 1;
        if n > 300 {
            break;
        }
        match fs.kind(&path) {
            Ok(Some(NodeKind::Dir)) if depth < 4 => {
                if let Ok(names) = fs.read_dir(&path) {
                    for name in names {
                        todo.push((format!("{}/{name}", path.trim_end_matches('/')), depth + 1));
                    }
                }
            }
            Ok(Some(_)) => {
                let _ = fs.read_file(&path, 1 << 20);
            }
            _ => {}
        }
    }
}

fn small_limits() -> Limits {
    Limits {
        max_file: 1 << 20,
        max_config: 1 << 16,
        max_dir_entries: 256,
        max_symlinks: 8,
        max_path_components: 256,
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]
    #[test]
    fn damaged_images_never_panic_or_hang(
        edits in proptest::collection::vec((0usize..3, any::<u64>(), any::<u8>(), any::<bool>()), 1..24)
    ) {
        thread_local!(static IMG: (Vec<u8>, Vec<(u64, u64)>, u64) = small_image());
        let (mut data, ranges) = IMG.with(|i| (i.0.clone(), i.1.clone()));
        for (r, off, byte, big) in edits {
            let (start, len) = ranges[r];
            let at = (start + off % len) as usize;
            // Either a random byte, or an extreme value likely to be a count or size.
            data[at] = if big { 0xff } else { byte };
        }
        let t = Instant::now();
        if let Ok(x) = Xfs::open(Arc::new(MemDisk(data))) {
            walk_everything(&Walk::new(x, small_limits()));
        }
        prop_assert!(t.elapsed() < Duration::from_secs(2));
    }
}

fn open_mem(data: Vec<u8>) -> xdisk_boot::Result<Walk<Xfs>> {
    Ok(Walk::new(
        Xfs::open(Arc::new(MemDisk(data)))?,
        small_limits(),
    ))
}

#[test]
fn bad_superblock_magic_is_not_xfs() {
    let (mut data, _, _) = small_image();
    data[0] = b'Y';
    let disk = MemDisk(data.clone());
    assert!(!xfs::probe(&disk));
    assert!(matches!(open_mem(data), Err(Error::Corrupt { .. })));
    assert!(!xfs::probe(&MemDisk(vec![0; 3])));
}

#[test]
fn unknown_incompat_feature_is_unsupported() {
    let (mut data, _, _) = small_image();
    data[216] |= 0x80; // bit 31 of sb_features_incompat
    match open_mem(data) {
        Err(Error::Unsupported(m)) => assert!(m.contains("incompatible features"), "{m}"),
        other => panic!("{:?}", other.map(|_| ())),
    }
}

#[test]
fn absurd_geometry_is_corrupt() {
    let (data, _, _) = small_image();
    for (at, bytes) in [
        (4usize, vec![0, 0, 0, 3]), // block size 3
        (88, vec![0, 0, 0, 0]),     // no AGs
        (104, vec![0xff, 0xff]),    // inode size
        (124, vec![60]),            // agblklog
        (192, vec![12]),            // directory blocks of 2^22 bytes
    ] {
        let mut d = data.clone();
        d[at..at + bytes.len()].copy_from_slice(&bytes);
        assert!(
            matches!(open_mem(d), Err(Error::Corrupt { .. })),
            "byte {at}"
        );
    }
}

#[test]
fn truncated_image_gives_io_errors() {
    let (data, _, root) = small_image();
    // The superblock alone: the root inode is past the end.
    assert!(matches!(
        open_mem(data[..4096].to_vec()),
        Err(Error::Io { .. })
    ));
    // Up to the inodes: file data past the end.
    let cut = root as usize + 64 * 512;
    let fs = open_mem(data[..cut].to_vec()).unwrap();
    assert!(fs.read_file("/boot/vmlinuz", 1 << 20).is_err());
}

#[test]
fn hostile_inode_fields_give_clean_errors() {
    let tmp = TempDir::new().unwrap();
    let (img, _, bs) = remap_image(&tmp, &[]);
    let ino = ino_of(&img, "/", "big");
    let at = byte_of_inode(&img, ino);
    let pristine = fs::read(&img).unwrap();
    let with = |edits: &[(u64, &[u8])]| {
        let mut d = pristine.clone();
        for (off, bytes) in edits {
            let o = (at + off) as usize;
            d[o..o + bytes.len()].copy_from_slice(bytes);
        }
        open_mem(d).unwrap()
    };
    // A huge size is refused before anything is read.
    let fs = with(&[(56, &(1u64 << 40).to_be_bytes())]);
    assert!(matches!(
        fs.read_file("/big", 1 << 20),
        Err(Error::TooLarge { .. })
    ));
    // A negative size.
    let fs = with(&[(56, &u64::MAX.to_be_bytes())]);
    assert!(matches!(
        fs.read_file("/big", 1 << 20),
        Err(Error::Corrupt { .. })
    ));
    // More extents than the fork holds.
    let fs = with(&[(76, &1000u32.to_be_bytes())]);
    assert!(matches!(
        fs.read_file("/big", 1 << 20),
        Err(Error::Corrupt { .. })
    ));
    // An extent past the end of its AG (startblock bits all set, count 2^21-1).
    let fs = with(&[(176, &[0x7f; 16])]);
    assert!(matches!(
        fs.read_file("/big", 1 << 20),
        Err(Error::Corrupt { .. })
    ));
    // A B+tree root of absurd depth.
    let fs = with(&[(5, &[3]), (176, &[0, 9, 0, 1])]);
    assert!(matches!(
        fs.read_file("/big", 1 << 20),
        Err(Error::Corrupt { .. })
    ));
    // Bad inode magic.
    let fs = with(&[(0, b"XX")]);
    assert!(matches!(
        fs.read_file("/big", 1 << 20),
        Err(Error::Corrupt { .. })
    ));
    // An attribute fork offset past the inode.
    let fs = with(&[(82, &[0xff])]);
    assert!(matches!(
        fs.read_file("/big", 1 << 20),
        Err(Error::Corrupt { .. })
    ));
    // The untouched image reads fine.
    assert_eq!(
        with(&[]).read_file("/big", 1 << 20).unwrap().len(),
        64 * bs as usize
    );
}

#[test]
fn hostile_directories_give_clean_errors() {
    let (data, _, _) = small_image();
    let fs = open_mem(data.clone()).unwrap();
    assert_eq!(fs.read_dir("/boot/d").unwrap().len(), 80);
    // Shortform: a count larger than the entries present.
    let img_dir = TempDir::new().unwrap();
    let img = img_dir.path().join("i");
    fs::write(&img, &data).unwrap();
    let boot_ino = ino_of(&img, "/", "boot");
    let at = byte_of_inode(&img, boot_ino) as usize;
    let mut bad = data.clone();
    bad[at + 176] = 0xff;
    let fs2 = open_mem(bad).unwrap();
    assert!(matches!(fs2.read_dir("/boot"), Err(Error::Corrupt { .. })));
    // Block/leaf directory: an entry whose name runs past the block.
    let d_ino = ino_of(&img, "/boot", "d");
    let first = bmap(&img, d_ino)[0].1;
    let blk = first as usize * 1024;
    let mut bad = data.clone();
    // The first entry ("." at the data header end) gets a name length of 255 and its
    // free tag is not 0xffff: it no longer fits the 1 KiB-block... directory block.
    let hdr = 64;
    bad[blk + hdr + 8] = 255;
    let fs3 = open_mem(bad.clone()).unwrap();
    let _ = fs3.read_dir("/boot/d"); // a clean result or error, no panic
                                     // A free region of length 0 (would never advance).
    bad[blk + hdr..blk + hdr + 4].copy_from_slice(&[0xff, 0xff, 0, 0]);
    let fs4 = open_mem(bad).unwrap();
    assert!(matches!(
        fs4.read_dir("/boot/d"),
        Err(Error::Corrupt { .. })
    ));
}

#[test]
fn v5_remote_symlink_with_header_is_read() {
    let (mut data, _, _) = small_image();
    let tmp = TempDir::new().unwrap();
    let img = tmp.path().join("i");
    fs::write(&img, &data).unwrap();
    let ino = ino_of(&img, "/boot", "l1");
    let blk = bmap(&img, ino)[0].1 as usize * 1024;
    let target = "../boot/".repeat(50) + "vmlinuz";
    // mkfs.xfs 6.1 wrote the bare target (no header); we read that too.
    assert_eq!(&data[blk..blk + target.len()], target.as_bytes());
    let want = open_mem(data.clone())
        .unwrap()
        .read_file("/boot/vmlinuz", 1 << 20)
        .unwrap();
    assert_eq!(
        open_mem(data.clone())
            .unwrap()
            .read_file("/boot/l1", 1 << 20)
            .unwrap(),
        want
    );
    // The kernel's layout: xfs_dsymlink_hdr (magic, offset, bytes, crc, uuid, owner,
    // blkno, lsn: 56 bytes), then the target.
    let mut block = vec![0u8; 1024];
    block[0..4].copy_from_slice(b"XSLM");
    block[8..12].copy_from_slice(&(target.len() as u32).to_be_bytes());
    block[32..40].copy_from_slice(&ino.to_be_bytes());
    block[56..56 + target.len()].copy_from_slice(target.as_bytes());
    data[blk..blk + 1024].copy_from_slice(&block);
    assert_eq!(
        open_mem(data.clone())
            .unwrap()
            .read_file("/boot/l1", 1 << 20)
            .unwrap(),
        want
    );
    // A symlink longer than 1024 bytes is corrupt.
    let at = byte_of_inode(&img, ino) as usize;
    data[at + 56..at + 64].copy_from_slice(&5000u64.to_be_bytes());
    assert!(matches!(
        open_mem(data).unwrap().read_file("/boot/l1", 1 << 20),
        Err(Error::Corrupt { .. })
    ));
}

#[test]
fn v5_nrext64_round_trip() {
    round_trip("v5-nrext64.img", &["-i", "nrext64=1"]);
}

/// A shortform directory with 8-byte inode numbers (i8count != 0), which needs inode
/// numbers above 2^32 to appear naturally: `/boot` of the small image rewritten in that
/// form, checked with xfs_db, then read.
#[test]
fn shortform_directory_with_8_byte_inode_numbers() {
    let (data, _, _) = small_image();
    let tmp = TempDir::new().unwrap();
    let img = tmp.path().join("i");
    fs::write(&img, &data).unwrap();
    let ino = ino_of(&img, "/", "boot");
    let at = byte_of_inode(&img, ino) as usize;
    let fork = at + 176;
    let size = u64::from_be_bytes(data[at + 56..at + 64].try_into().unwrap()) as usize;
    let old = &data[fork..fork + size];
    assert_eq!(old[1], 0, "already 8-byte");
    let count = old[0];
    // Header: count, i8count, parent; entries: namelen, offset, name, ftype, inode.
    let mut new = vec![count, count];
    new.extend_from_slice(
        &u64::from(u32::from_be_bytes(old[2..6].try_into().unwrap())).to_be_bytes(),
    );
    let mut p = 6;
    for _ in 0..count {
        let len = old[p] as usize;
        new.extend_from_slice(&old[p..p + 3 + len + 1]);
        let q = p + 3 + len + 1;
        let e = u32::from_be_bytes(old[q..q + 4].try_into().unwrap());
        new.extend_from_slice(&u64::from(e).to_be_bytes());
        p = q + 4;
    }
    assert_eq!(p, size);
    poke(&img, fork as u64, &new);
    poke(&img, at as u64 + 56, &(new.len() as u64).to_be_bytes());
    let out = xfs_db(&img, false, &[format!("inode {ino}"), "p".into()]);
    assert!(
        out.contains(&format!("u3.sfdir3.hdr.i8count = {count}")),
        "{out}"
    );
    assert!(out.contains("u3.sfdir3.list[0].inumber.i8"), "{out}");
    let fs = open_mem(fs::read(&img).unwrap()).unwrap();
    let names: BTreeSet<String> = fs.read_dir("/boot").unwrap().into_iter().collect();
    let want: BTreeSet<String> = ["vmlinuz", "l1", "l2", "d"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    assert_eq!(names, want);
    assert_eq!(
        fs.read_file("/boot/vmlinuz", 1 << 20).unwrap(),
        pattern(3, 20_000)
    );
    assert_eq!(fs.read_dir("/boot/d").unwrap().len(), 80);
}
