//! Persistent dirty bitmaps against QEMU as the oracle: bitmaps QEMU made are kept up to date
//! by xdisk's writes (the dirty ranges QEMU then exports over NBD, `qemu-nbd -B` +
//! `nbdinfo --map=qemu:dirty-bitmap:NAME`, are exactly the written ranges rounded to the
//! granularity), bitmaps xdisk made are read and used by qemu-img and qemu-nbd, disabled
//! bitmaps are left alone, a writer killed while the image is open leaves its bitmaps
//! `in_use` (inconsistent) and the image clean for `qemu-img check`, hostile bitmap metadata
//! fails cleanly, and random write sequences match a model bitmap.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use proptest::prelude::*;
use rand::{Rng, SeedableRng};
use xdisk_image::qcow2::bitmap::BitmapInfo;
use xdisk_image::qcow2::Qcow2Image;
use xdisk_image::queue::{ImageQueue, IoDone, IoKind, IoRequest, QueueConfig};
use xdisk_image::{AioKind, CacheMode, CreateOptions, Error, Format, Image, OpenOptions};
use xdisk_io::AlignedBuf;

mod support;
use support::{qemu_dirty, qemu_img, qemu_img_ok, qemu_io, tmpdir};

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn qemu_create(dir: &Path, name: &str, size: &str, opts: &str) -> PathBuf {
    let p = dir.join(name);
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    if !opts.is_empty() {
        args.extend(["-o", opts]);
    }
    args.extend([s(&p), size]);
    qemu_img_ok(&args);
    p
}

fn opts(read_only: bool) -> OpenOptions {
    OpenOptions {
        format: Some(Format::Qcow2),
        read_only,
        cache: CacheMode::WriteBack,
        open_backing: false,
        ..OpenOptions::default()
    }
}

fn open_rw(p: &Path) -> Arc<Image> {
    Image::open(p, &opts(false)).unwrap_or_else(|e| panic!("open {}: {e}", p.display()))
}

fn open_ro(p: &Path) -> Arc<Image> {
    Image::open(p, &opts(true)).unwrap()
}

fn q(img: &Image) -> &Qcow2Image {
    img.as_qcow2().expect("a qcow2 image")
}

/// `qemu-img check` finds nothing at all (no corruption, no leak).
fn check_clean(p: &Path) {
    let o = qemu_img(&["check", s(p)]);
    assert!(
        o.status.success(),
        "qemu-img check {} (exit {:?}):\n{}{}",
        p.display(),
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

/// `qemu-img check` finds no corruption (leaks allowed).
fn check_no_corruption(p: &Path) {
    let o = qemu_img(&["check", s(p)]);
    assert!(
        matches!(o.status.code(), Some(0) | Some(3)),
        "qemu-img check {} (exit {:?}):\n{}{}",
        p.display(),
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

/// The bitmaps qemu-img info reports: (name, granularity, flags).
fn qemu_bitmaps(p: &Path) -> Vec<(String, u64, Vec<String>)> {
    let out = qemu_img_ok(&["info", "-U", "--output=json", s(p)]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let Some(list) = v.pointer("/format-specific/data/bitmaps") else {
        return Vec::new();
    };
    list.as_array()
        .unwrap()
        .iter()
        .map(|b| {
            (
                b["name"].as_str().unwrap().to_owned(),
                b["granularity"].as_u64().unwrap(),
                b["flags"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|f| f.as_str().unwrap().to_owned())
                    .collect(),
            )
        })
        .collect()
}

/// A model bitmap: one flag per granule.
struct Model {
    size: u64,
    gran: u64,
    bits: Vec<bool>,
}

impl Model {
    fn new(size: u64, gran: u64) -> Model {
        Model {
            size,
            gran,
            bits: vec![false; size.div_ceil(gran) as usize],
        }
    }
    fn write(&mut self, off: u64, len: u64) {
        if len == 0 {
            return;
        }
        let end = (off + len).min(self.size);
        for g in off / self.gran..end.div_ceil(self.gran) {
            self.bits[g as usize] = true;
        }
    }
    fn ranges(&self) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        for (g, &b) in self.bits.iter().enumerate() {
            if !b {
                continue;
            }
            let off = g as u64 * self.gran;
            let end = (off + self.gran).min(self.size);
            match out.last_mut() {
                Some((o, l)) if *o + *l == off => *l = end - *o,
                _ => out.push((off, end - off)),
            }
        }
        out
    }
}

fn info_of<'a>(list: &'a [BitmapInfo], name: &str) -> &'a BitmapInfo {
    list.iter()
        .find(|b| b.name == name)
        .unwrap_or_else(|| panic!("bitmap {name} in {list:?}"))
}

/// The writes of the first tests: unaligned, large, zeroes (with and without unmap), a
/// discard and the last sector.
fn write_pattern(img: &Image, size: u64) -> Vec<(u64, u64)> {
    let ops = [
        (3000u64, 5000u64, 0u8),
        (8 << 20, 1 << 20, 0),
        (20 << 20, 128 << 10, 1),
        ((21 << 20) + 512, 1000, 2),
        (30 << 20, (64 << 10) + 100, 3),
        (size - 512, 512, 0),
    ];
    for &(off, len, kind) in &ops {
        match kind {
            0 => img.write_at(&vec![0x5a; len as usize], off).unwrap(),
            1 => img.write_zeroes(off, len, false).unwrap(),
            2 => img.write_zeroes(off, len, true).unwrap(),
            _ => img.discard(off, len).unwrap(),
        }
    }
    ops.iter().map(|&(o, l, _)| (o, l)).collect()
}

#[test]
fn qemu_made_bitmaps_record_exactly_what_xdisk_writes_and_disabled_ones_stay() {
    let d = tmpdir("xdisk-bitmaps-");
    let size = 64u64 << 20;
    let img = qemu_create(d.path(), "q.qcow2", "64M", "");
    let p = s(&img);
    for (name, g) in [("b64", "64k"), ("b4", "4k"), ("b512", "512")] {
        qemu_img_ok(&["bitmap", "--add", "-g", g, p, name]);
    }
    qemu_img_ok(&["bitmap", "--add", p, "off"]);
    // Bits QEMU set before xdisk opens the image: kept.
    qemu_io(&img, &["write -P 7 1M 64k"]);
    qemu_img_ok(&["bitmap", "--disable", p, "off"]);
    qemu_io(&img, &["write -P 8 40M 4k"]);

    let x = open_rw(&img);
    // While open: the enabled bitmaps are in use on disk, the disabled one is not.
    let flags: Vec<(String, Vec<String>)> = qemu_bitmaps(&img)
        .into_iter()
        .map(|(n, _, f)| (n, f))
        .collect();
    for (n, f) in &flags {
        let want: &[&str] = if n == "off" { &[] } else { &["in-use", "auto"] };
        assert_eq!(f, want, "bitmap {n} while xdisk has the image open");
    }
    let written = write_pattern(&x, size);
    x.close().unwrap();
    drop(x);

    check_clean(&img);
    let got = qemu_bitmaps(&img);
    assert_eq!(
        got,
        vec![
            ("b64".to_owned(), 65536, vec!["auto".to_owned()]),
            ("b4".to_owned(), 4096, vec!["auto".to_owned()]),
            ("b512".to_owned(), 512, vec!["auto".to_owned()]),
            ("off".to_owned(), 65536, vec![]),
        ]
    );
    let ro = open_ro(&img);
    for (name, gran) in [("b64", 65536), ("b4", 4096), ("b512", 512)] {
        let mut m = Model::new(size, gran);
        m.write(1 << 20, 64 << 10);
        m.write(40 << 20, 4096);
        for &(o, l) in &written {
            m.write(o, l);
        }
        assert_eq!(
            qemu_dirty(&img, name),
            m.ranges(),
            "bitmap {name}, QEMU's view"
        );
        assert_eq!(
            q(&ro).bitmap(name).unwrap().dirty_ranges(),
            m.ranges(),
            "bitmap {name}, xdisk's view"
        );
    }
    assert_eq!(qemu_dirty(&img, "off"), vec![(1 << 20, 64 << 10)]);
}

#[test]
fn xdisk_made_bitmaps_are_read_merged_and_updated_by_qemu() {
    let d = tmpdir("xdisk-bitmaps-");
    let img = d.path().join("x.qcow2");
    let size = 32u64 << 20;
    xdisk_image::create(
        &img,
        Format::Qcow2,
        &CreateOptions {
            size,
            ..CreateOptions::default()
        },
    )
    .unwrap();
    let x = open_rw(&img);
    q(&x).add_bitmap("x", None, true).unwrap();
    q(&x).add_bitmap("y", Some(512), false).unwrap();
    q(&x).add_bitmap("z", Some(1 << 20), true).unwrap();
    let e = q(&x).add_bitmap("x", None, true).unwrap_err();
    assert!(e.to_string().contains("Bitmap already exists: x"), "{e}");
    let w = [(5000u64, 100u64), (3 << 20, 2 << 20), (size - 1, 1)];
    for &(o, l) in &w {
        x.write_at(&vec![1; l as usize], o).unwrap();
    }
    x.close().unwrap();
    drop(x);
    check_clean(&img);
    assert_eq!(
        qemu_bitmaps(&img),
        vec![
            ("x".to_owned(), 65536, vec!["auto".to_owned()]),
            ("y".to_owned(), 512, vec![]),
            ("z".to_owned(), 1 << 20, vec!["auto".to_owned()]),
        ]
    );
    let model = |gran: u64, extra: &[(u64, u64)]| {
        let mut m = Model::new(size, gran);
        for &(o, l) in w.iter().chain(extra) {
            m.write(o, l);
        }
        m.ranges()
    };
    assert_eq!(qemu_dirty(&img, "x"), model(65536, &[]));
    assert_eq!(qemu_dirty(&img, "y"), vec![]);
    assert_eq!(qemu_dirty(&img, "z"), model(1 << 20, &[]));
    // qemu-img merges xdisk's bitmap into one of its own, at its own granularity.
    let p = s(&img);
    qemu_img_ok(&["bitmap", "--add", "-g", "4k", p, "fresh"]);
    qemu_img_ok(&["bitmap", "--merge", "x", p, "fresh"]);
    assert_eq!(qemu_dirty(&img, "fresh"), model(65536, &[]));
    // QEMU's writes land in xdisk's enabled bitmaps, and xdisk reads them.
    qemu_io(&img, &["write 20M 4k"]);
    check_clean(&img);
    let ro = open_ro(&img);
    assert_eq!(
        q(&ro).bitmap("x").unwrap().dirty_ranges(),
        model(65536, &[(20 << 20, 4096)])
    );
    assert_eq!(q(&ro).bitmap("y").unwrap().dirty_ranges(), vec![]);
    drop(ro);
    // qemu-img removes one; xdisk goes on with the others.
    qemu_img_ok(&["bitmap", "--remove", p, "z"]);
    check_clean(&img);
    let x = open_rw(&img);
    let names: Vec<String> = q(&x).bitmaps().into_iter().map(|b| b.name).collect();
    assert_eq!(names, ["x", "y", "fresh"]);
    x.write_at(&[9; 512], 10 << 20).unwrap();
    x.close().unwrap();
    drop(x);
    check_clean(&img);
    assert_eq!(
        qemu_dirty(&img, "x"),
        model(65536, &[(20 << 20, 4096), (10 << 20, 512)])
    );
}

#[test]
fn bitmap_operations_follow_qemu_img_bitmap() {
    let d = tmpdir("xdisk-bitmaps-");
    let img = qemu_create(d.path(), "ops.qcow2", "8M", "cluster_size=4096");
    let x = open_rw(&img);
    let b = q(&x);
    b.add_bitmap("a", Some(4096), true).unwrap();
    b.add_bitmap("d", Some(65536), false).unwrap();
    x.write_at(&[1; 4096], 0).unwrap();
    // Disabled: no record; enabled later: records from then on.
    b.set_bitmap_enabled("d", true).unwrap();
    x.write_at(&[1; 4096], 1 << 20).unwrap();
    b.set_bitmap_enabled("a", false).unwrap();
    x.write_at(&[1; 4096], 2 << 20).unwrap();
    assert_eq!(
        b.bitmap("a").unwrap().dirty_ranges(),
        [(0, 4096), (1 << 20, 4096)]
    );
    assert_eq!(
        b.bitmap("d").unwrap().dirty_ranges(),
        [(1 << 20, 65536), (2 << 20, 65536)]
    );
    // Merge (across granularities), clear, remove.
    let src = b.bitmap("d").unwrap();
    b.merge_bitmap("a", &src).unwrap();
    assert_eq!(
        b.bitmap("a").unwrap().dirty_ranges(),
        [(0, 4096), (1 << 20, 65536), (2 << 20, 65536)]
    );
    b.clear_bitmap("d").unwrap();
    assert_eq!(b.bitmap("d").unwrap().dirty_ranges(), []);
    for (r, what) in [
        (b.remove_bitmap("nope"), "Dirty bitmap 'nope' not found"),
        (b.clear_bitmap("nope"), "Dirty bitmap 'nope' not found"),
        (b.add_bitmap("", None, true), "Bitmap name cannot be empty"),
        (
            b.add_bitmap("g", Some(3000), true),
            "Granularity must be power of 2 and at least 512",
        ),
        (
            b.add_bitmap("g", Some(256), true),
            "Granularity must be power of 2 and at least 512",
        ),
        (
            b.add_bitmap("g", Some(1 << 32), true),
            "Granularity exceeds maximum",
        ),
        (
            b.add_bitmap(&"n".repeat(1024), None, true),
            "Name length exceeds maximum (1023 characters)",
        ),
    ] {
        let e = r.unwrap_err();
        assert!(e.to_string().contains(what), "{e} (wanted {what})");
    }
    x.close().unwrap();
    drop(x);
    check_clean(&img);
    assert_eq!(
        qemu_bitmaps(&img),
        [
            ("a".to_owned(), 4096, vec![]),
            ("d".to_owned(), 65536, vec!["auto".to_owned()])
        ]
    );
    assert_eq!(
        qemu_dirty(&img, "a"),
        [(0, 4096), (1 << 20, 65536), (2 << 20, 65536)]
    );
    let x = open_rw(&img);
    q(&x).remove_bitmap("a").unwrap();
    q(&x).remove_bitmap("d").unwrap();
    x.close().unwrap();
    drop(x);
    // No bitmap left: no extension, no autoclear bit, nothing leaked.
    check_clean(&img);
    assert!(qemu_bitmaps(&img).is_empty());
    let h = open_ro(&img);
    assert!(!q(&h).header().has_bitmaps);
    assert_eq!(q(&h).header().autoclear_features, 0);
    // v2 images cannot have bitmaps (QEMU's rule).
    let v2 = qemu_create(d.path(), "v2.qcow2", "1M", "compat=0.10");
    let x = open_rw(&v2);
    let e = q(&x).add_bitmap("b", None, true).unwrap_err();
    assert!(e.to_string().contains("qcow2 v2"), "{e}");
}

#[test]
fn a_read_only_open_changes_nothing_and_reads_the_bits() {
    let d = tmpdir("xdisk-bitmaps-");
    let img = qemu_create(d.path(), "ro.qcow2", "4M", "");
    qemu_img_ok(&["bitmap", "--add", s(&img), "b"]);
    qemu_io(&img, &["write 64k 64k"]);
    let before = std::fs::read(&img).unwrap();
    let x = open_ro(&img);
    assert_eq!(
        q(&x).bitmaps(),
        [BitmapInfo {
            name: "b".into(),
            granularity: 65536,
            in_use: false,
            auto: true,
            inconsistent: false
        }]
    );
    assert_eq!(q(&x).bitmap("b").unwrap().dirty_ranges(), [(65536, 65536)]);
    assert!(matches!(q(&x).clear_bitmap("b"), Err(Error::ReadOnly)));
    x.close().unwrap();
    drop(x);
    assert!(std::fs::read(&img).unwrap() == before);
}

/// The child of the kill test: opens the image through xdisk and writes until killed.
#[test]
fn bitmap_kill_child_entry() {
    let Ok(path) = std::env::var("XDISK_BITMAP_KILL_CHILD") else {
        return;
    };
    let x = open_rw(Path::new(&path));
    println!("XDISK-OPEN");
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    loop {
        let off = rng.gen_range(0..(8u64 << 20) / 4096) * 4096;
        x.write_at(&[3; 4096], off).unwrap();
        if rng.gen_range(0..16) == 0 {
            x.flush().unwrap();
        }
    }
}

#[test]
fn a_killed_writer_leaves_enabled_bitmaps_in_use_and_the_image_clean() {
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;
    let d = tmpdir("xdisk-bitmaps-");
    let img = qemu_create(d.path(), "k.qcow2", "8M", "cluster_size=4096");
    let p = s(&img);
    qemu_img_ok(&["bitmap", "--add", p, "on"]);
    qemu_img_ok(&["bitmap", "--add", "--disable", p, "off"]);
    let mut ch = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "bitmap_kill_child_entry",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("XDISK_BITMAP_KILL_CHILD", p)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(ch.stdout.take().unwrap()).lines();
    assert!(lines.any(|l| l.is_ok_and(|l| l.contains("XDISK-OPEN"))));
    std::thread::sleep(Duration::from_millis(300));
    ch.kill().unwrap();
    ch.wait().unwrap();

    check_no_corruption(&img);
    assert_eq!(
        qemu_bitmaps(&img),
        [
            (
                "on".to_owned(),
                4096,
                vec!["in-use".to_owned(), "auto".to_owned()]
            ),
            ("off".to_owned(), 4096, vec![])
        ],
        "the enabled bitmap was not saved: inconsistent; the disabled one is intact"
    );
    // xdisk keeps the inconsistent bitmap as it is, reports it, tracks nothing in it, and
    // only removes it (QEMU's rules).
    let x = open_rw(&img);
    let b = q(&x);
    let on = info_of(&b.bitmaps(), "on").clone();
    assert!(on.inconsistent && on.in_use && on.auto, "{on:?}");
    for r in [
        b.bitmap("on").map(|_| ()),
        b.clear_bitmap("on"),
        b.set_bitmap_enabled("on", false),
    ] {
        let e = r.unwrap_err();
        assert!(e.to_string().contains("is inconsistent"), "{e}");
    }
    assert!(x
        .resize(16 << 20)
        .unwrap_err()
        .to_string()
        .contains("inconsistent"));
    x.write_at(&[4; 4096], 0).unwrap();
    x.close().unwrap();
    drop(x);
    check_no_corruption(&img);
    assert_eq!(qemu_bitmaps(&img)[0].2, ["in-use", "auto"]);
    // qemu-img check -r leaves it alone too; removing it is clean.
    qemu_img_ok(&["check", "-r", "all", p]);
    assert_eq!(qemu_bitmaps(&img)[0].2, ["in-use", "auto"]);
    let x = open_rw(&img);
    q(&x).remove_bitmap("on").unwrap();
    x.close().unwrap();
    drop(x);
    check_clean(&img);
    assert_eq!(qemu_bitmaps(&img), [("off".to_owned(), 4096, vec![])]);
}

#[test]
fn a_stale_bitmaps_extension_is_ignored_and_dropped_like_qemu() {
    let d = tmpdir("xdisk-bitmaps-");
    let img = qemu_create(d.path(), "stale.qcow2", "4M", "");
    qemu_img_ok(&["bitmap", "--add", s(&img), "b"]);
    qemu_io(&img, &["write 0 64k"]);
    // A writer without bitmap support cleared autoclear bit 0.
    let mut bytes = std::fs::read(&img).unwrap();
    bytes[95] &= !1;
    std::fs::write(&img, &bytes).unwrap();
    let ro = open_ro(&img);
    assert!(q(&ro).bitmaps().is_empty(), "ignored when reading");
    drop(ro);
    let mine = d.path().join("mine.qcow2");
    std::fs::copy(&img, &mine).unwrap();
    let x = open_rw(&mine);
    assert!(q(&x).bitmaps().is_empty());
    x.write_at(&[1; 512], 0).unwrap();
    x.close().unwrap();
    drop(x);
    // QEMU does the same with its copy: the extension is gone, its clusters leak.
    qemu_io(&img, &["write 0 512"]);
    for p in [&img, &mine] {
        assert!(qemu_bitmaps(p).is_empty(), "{}", p.display());
        let h = open_ro(p);
        assert!(!q(&h).header().has_bitmaps);
        drop(h);
        check_no_corruption(p);
        qemu_img_ok(&["check", "-r", "leaks", s(p)]);
        check_clean(p);
    }
}

#[test]
fn resize_keeps_bitmaps_valid_and_leaves_the_grown_range_clean() {
    let d = tmpdir("xdisk-bitmaps-");
    let img = qemu_create(d.path(), "r.qcow2", "4M", "cluster_size=4096");
    let p = s(&img);
    qemu_img_ok(&["bitmap", "--add", "-g", "4k", p, "on"]);
    qemu_img_ok(&["bitmap", "--add", "-g", "64k", p, "off"]);
    qemu_io(&img, &["write 1M 4k", "write 3M 4k"]);
    qemu_img_ok(&["bitmap", "--disable", p, "off"]);
    // The same on a copy with qemu-img, for the oracle.
    let theirs = d.path().join("theirs.qcow2");
    std::fs::copy(&img, &theirs).unwrap();

    let x = open_rw(&img);
    x.resize(10 << 20).unwrap();
    x.write_at(&[1; 4096], 8 << 20).unwrap();
    x.close().unwrap();
    drop(x);
    qemu_img_ok(&["resize", s(&theirs), "10M"]);
    qemu_io(&theirs, &["write 8M 4k"]);
    for f in [&img, &theirs] {
        check_clean(f);
        assert_eq!(
            qemu_dirty(f, "on"),
            [(1 << 20, 4096), (3 << 20, 4096), (8 << 20, 4096)]
        );
        assert_eq!(qemu_dirty(f, "off"), [(1 << 20, 65536), (3 << 20, 65536)]);
    }
    // Shrinking drops the bits past the new end.
    let x = open_rw(&img);
    x.resize(2 << 20).unwrap();
    x.close().unwrap();
    drop(x);
    check_clean(&img);
    assert_eq!(qemu_dirty(&img, "on"), [(1 << 20, 4096)]);
    assert_eq!(qemu_dirty(&img, "off"), [(1 << 20, 65536)]);
    assert_eq!(
        qemu_bitmaps(&img),
        [
            ("on".to_owned(), 4096, vec!["auto".to_owned()]),
            ("off".to_owned(), 65536, vec![])
        ]
    );
}

#[test]
fn a_dirty_image_with_bitmaps_is_rebuilt_counting_the_bitmap_clusters() {
    let d = tmpdir("xdisk-bitmaps-");
    let img = qemu_create(
        d.path(),
        "lazy.qcow2",
        "8M",
        "cluster_size=4096,lazy_refcounts=on",
    );
    let p = s(&img);
    qemu_img_ok(&["bitmap", "--add", "-g", "4k", p, "b"]);
    qemu_io(&img, &["write 0 64k"]);
    // QEMU aborts mid-session: the image is dirty and its bitmap in use.
    let code = Command::new("qemu-io")
        .args(["-c", "write 1M 64k", "-c", "abort", p])
        .output()
        .unwrap()
        .status
        .code();
    assert_ne!(code, Some(0));
    let ro = open_ro(&img);
    assert!(q(&ro).header().is_dirty());
    drop(ro);
    let copy = d.path().join("consistent.qcow2");
    std::fs::copy(&img, &copy).unwrap();
    // As QEMU left it (the bitmap inconsistent) ...
    let x = open_rw(&img);
    assert!(info_of(&q(&x).bitmaps(), "b").inconsistent);
    x.write_at(&[1; 4096], 2 << 20).unwrap();
    x.close().unwrap();
    drop(x);
    check_clean(&img);
    // ... and with its in_use flag cleared by hand: the rebuild keeps the bitmap's clusters
    // and xdisk tracks it.
    let bytes = std::fs::read(&copy).unwrap();
    let hdr = {
        let h = open_ro(&copy);
        q(&h).header()
    };
    let ext = hdr
        .unknown_extensions
        .iter()
        .find(|(t, _)| *t == xdisk_image::qcow2::format::ext::BITMAPS)
        .unwrap()
        .1
        .clone();
    let dir_off = u64::from_be_bytes(ext[16..24].try_into().unwrap()) as usize;
    let mut bytes = bytes;
    bytes[dir_off + 15] &= !1;
    std::fs::write(&copy, &bytes).unwrap();
    let x = open_rw(&copy);
    assert!(!info_of(&q(&x).bitmaps(), "b").inconsistent);
    x.write_at(&[1; 4096], 2 << 20).unwrap();
    x.close().unwrap();
    drop(x);
    check_clean(&copy);
    let dirty = qemu_dirty(&copy, "b");
    assert!(
        dirty.contains(&(0, 65536)) && dirty.contains(&(2 << 20, 4096)),
        "{dirty:?}"
    );
}

#[test]
fn bitmap_memory_is_bounded_by_the_open_options() {
    let d = tmpdir("xdisk-bitmaps-");
    let img = qemu_create(d.path(), "mem.qcow2", "1G", "");
    qemu_img_ok(&["bitmap", "--add", "-g", "512", s(&img), "b"]); // 256 KiB of bits
    let e = Image::open(
        &img,
        &OpenOptions {
            bitmap_memory_limit: 64 << 10,
            ..opts(false)
        },
    )
    .unwrap_err();
    assert!(e.to_string().contains("MiB of memory"), "{e}");
    // Read-only opens do not load bitmaps.
    Image::open(
        &img,
        &OpenOptions {
            bitmap_memory_limit: 64 << 10,
            ..opts(true)
        },
    )
    .unwrap();
    let x = open_rw(&img);
    let e = q(&x).add_bitmap("huge", Some(512), true);
    assert!(e.is_ok(), "2 x 256 KiB fit in the default limit");
    let x2 = Image::open(
        &img,
        &OpenOptions {
            bitmap_memory_limit: 300 << 10,
            ..opts(false)
        },
    );
    drop(x2);
    drop(x);
}

/// Hostile bitmap metadata: every writable open fails cleanly or works (never a panic or a
/// huge allocation), and a read-only open still reads the disk.
#[test]
fn hostile_bitmap_metadata_fails_cleanly() {
    let d = tmpdir("xdisk-bitmaps-");
    let img = qemu_create(d.path(), "h.qcow2", "4M", "cluster_size=4096");
    let p = s(&img);
    qemu_img_ok(&["bitmap", "--add", "-g", "4k", p, "a"]);
    qemu_img_ok(&["bitmap", "--add", "-g", "512", p, "b"]);
    qemu_io(&img, &["write 0 1M"]);
    let good = std::fs::read(&img).unwrap();
    let hdr = {
        let h = open_ro(&img);
        q(&h).header()
    };
    let ext_pos = {
        // The extension's data in the header: find its type.
        let ty = xdisk_image::qcow2::format::ext::BITMAPS.to_be_bytes();
        good.windows(4).position(|w| w == ty).unwrap() + 8
    };
    let dir_off = u64::from_be_bytes(good[ext_pos + 16..ext_pos + 24].try_into().unwrap()) as usize;
    let t0 = u64::from_be_bytes(good[dir_off..dir_off + 8].try_into().unwrap()) as usize;
    let e2 = dir_off + 24 + 8; // the second entry ("a" pads to 32 bytes)
    let l1 = hdr.l1_table_offset;
    let mut cases: Vec<(&str, usize, Vec<u8>)> = vec![
        ("nb 0", ext_pos, 0u32.to_be_bytes().to_vec()),
        ("nb 3", ext_pos, 3u32.to_be_bytes().to_vec()),
        ("nb max", ext_pos, u32::MAX.to_be_bytes().to_vec()),
        ("reserved", ext_pos + 4, 1u32.to_be_bytes().to_vec()),
        ("dir size 0", ext_pos + 8, 0u64.to_be_bytes().to_vec()),
        (
            "dir size huge",
            ext_pos + 8,
            (1u64 << 40).to_be_bytes().to_vec(),
        ),
        ("dir size odd", ext_pos + 8, 57u64.to_be_bytes().to_vec()),
        (
            "dir unaligned",
            ext_pos + 16,
            0x1200u64.to_be_bytes().to_vec(),
        ),
        (
            "dir past eof",
            ext_pos + 16,
            (1u64 << 40).to_be_bytes().to_vec(),
        ),
        ("dir at 0", ext_pos + 16, 0u64.to_be_bytes().to_vec()),
        ("dir on L1", ext_pos + 16, l1.to_be_bytes().to_vec()),
        ("table 0", dir_off, 0u64.to_be_bytes().to_vec()),
        ("table unaligned", dir_off, 0x1234u64.to_be_bytes().to_vec()),
        (
            "table past eof",
            dir_off,
            (1u64 << 50).to_be_bytes().to_vec(),
        ),
        ("table on L1", dir_off, l1.to_be_bytes().to_vec()),
        ("table of b", dir_off, good[e2..e2 + 8].to_vec()),
        ("table size 0", dir_off + 8, 0u32.to_be_bytes().to_vec()),
        ("table size 2", dir_off + 8, 2u32.to_be_bytes().to_vec()),
        (
            "table size max",
            dir_off + 8,
            u32::MAX.to_be_bytes().to_vec(),
        ),
        (
            "flags reserved",
            dir_off + 12,
            0x10u32.to_be_bytes().to_vec(),
        ),
        ("flags in use", dir_off + 12, 3u32.to_be_bytes().to_vec()),
        ("flags extra ok", dir_off + 12, 6u32.to_be_bytes().to_vec()),
        ("type 0", dir_off + 16, vec![0]),
        ("type 2", dir_off + 16, vec![2]),
        ("gran 0", dir_off + 17, vec![0]),
        ("gran 8", dir_off + 17, vec![8]),
        ("gran 32", dir_off + 17, vec![32]),
        ("gran 63", dir_off + 17, vec![63]),
        ("gran 255", dir_off + 17, vec![255]),
        ("name 0", dir_off + 18, 0u16.to_be_bytes().to_vec()),
        ("name 5", dir_off + 18, 5u16.to_be_bytes().to_vec()),
        ("name max", dir_off + 18, u16::MAX.to_be_bytes().to_vec()),
        ("extra 8", dir_off + 20, 8u32.to_be_bytes().to_vec()),
        ("extra huge", dir_off + 20, u32::MAX.to_be_bytes().to_vec()),
        ("same names", e2 + 24, b"a".to_vec()),
        (
            "entry reserved",
            t0,
            0x0100_0000_0000_0000u64.to_be_bytes().to_vec(),
        ),
        ("entry unaligned", t0, 0x10200u64.to_be_bytes().to_vec()),
        ("entry ones+off", t0, 0x10001u64.to_be_bytes().to_vec()),
        ("entry past eof", t0, (1u64 << 40).to_be_bytes().to_vec()),
        ("entry on L1", t0, l1.to_be_bytes().to_vec()),
        ("entry all ones", t0, 0x1u64.to_be_bytes().to_vec()),
        (
            "entry on the directory",
            t0,
            (dir_off as u64).to_be_bytes().to_vec(),
        ),
        ("entry on its table", t0, (t0 as u64).to_be_bytes().to_vec()),
        (
            "unknown ext type",
            ext_pos - 8,
            0x1234_5678u32.to_be_bytes().to_vec(),
        ),
    ];
    // A second bitmap's entry sharing a's data cluster.
    let tb = u64::from_be_bytes(good[e2..e2 + 8].try_into().unwrap()) as usize;
    cases.push(("shared data", tb, good[t0..t0 + 8].to_vec()));
    for (what, off, bytes) in cases {
        let mut b = good.clone();
        b[off..off + bytes.len()].copy_from_slice(&bytes);
        let f = d.path().join("m.qcow2");
        std::fs::write(&f, &b).unwrap();
        // Read-only: the data is readable whatever the bitmaps say.
        let ro = Image::open(&f, &opts(true))
            .unwrap_or_else(|e| panic!("{what}: read-only open failed: {e}"));
        let mut buf = vec![0u8; 4096];
        ro.read_at(&mut buf, 0).unwrap();
        drop(ro);
        let r = Image::open(&f, &opts(false));
        // Well-formed variations open; everything else is refused before any write.
        let well_formed = [
            "flags in use",
            "flags extra ok",
            "entry all ones",
            "unknown ext type",
            "name 5",
        ];
        assert_eq!(
            r.is_ok(),
            well_formed.contains(&what),
            "{what}: {:?}",
            r.as_ref().map(|_| ()).map_err(|e| e.to_string())
        );
        if r.is_err() {
            assert!(
                std::fs::read(&f).unwrap() == b,
                "{what}: refused, yet written"
            );
        }
        match r {
            Ok(x) => {
                let _ = x.write_at(&[1; 512], 4096);
                let _ = x.close();
                drop(x);
                // What xdisk accepted and wrote back must still be sound for QEMU.
                let o = qemu_img(&["check", s(&f)]);
                let qemu_ok_before = {
                    std::fs::write(&f, &b).unwrap();
                    matches!(qemu_img(&["check", s(&f)]).status.code(), Some(0) | Some(3))
                };
                if qemu_ok_before {
                    assert!(
                        matches!(o.status.code(), Some(0) | Some(3)),
                        "{what}: accepted, and qemu-img check then fails:\n{}",
                        String::from_utf8_lossy(&o.stdout)
                    );
                }
            }
            Err(e) => {
                assert!(
                    matches!(e, Error::Corrupt(_) | Error::Unsupported(_)),
                    "{what}: {e}"
                );
            }
        }
    }
}

/// The backend's path: requests through an ImageQueue (fast-path mapped writes and the slow
/// path) set the bits.
#[test]
fn queue_writes_fast_and_slow_path_are_recorded() {
    for aio in [AioKind::IoUring, AioKind::Threads] {
        let d = tmpdir("xdisk-bitmaps-");
        let size = 16u64 << 20;
        let img = qemu_create(d.path(), "queue.qcow2", "16M", "cluster_size=4096");
        qemu_img_ok(&["bitmap", "--add", "-g", "4k", s(&img), "b"]);
        let image = Image::open(
            &img,
            &OpenOptions {
                format: Some(Format::Qcow2),
                cache: CacheMode::None,
                ..OpenOptions::default()
            },
        )
        .unwrap();
        let align = image.storage().alignment().buffer_align();
        let mut model = Model::new(size, 4096);
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        let mut qu: ImageQueue<AlignedBuf> = ImageQueue::new(
            image.clone(),
            &QueueConfig {
                aio,
                queue_depth: 32,
                slow_threads: 2,
                submit_batch: 1,
            },
        )
        .unwrap();
        let mut done: Vec<IoDone<AlignedBuf>> = Vec::new();
        let mut inflight = 0usize;
        for round in 0..600 {
            let len = rng.gen_range(1..=32u64) * 512;
            // Rewrites of the first megabyte take the fast path once it is allocated.
            let span = if round % 2 == 0 { 1 << 20 } else { size };
            let off = rng.gen_range(0..(span - len) / 512) * 512;
            let kind = if rng.gen_range(0..8) == 0 {
                IoKind::WriteZeroes { len, unmap: false }
            } else {
                IoKind::Write
            };
            let buf = matches!(kind, IoKind::Write).then(|| {
                let mut b = AlignedBuf::new(len as usize, align);
                rng.fill(&mut b[..]);
                b
            });
            model.write(off, len);
            qu.submit(IoRequest {
                kind,
                offset: off,
                buf,
                user_data: round,
            });
            inflight += 1;
            while inflight >= 16 {
                done.clear();
                qu.reap(&mut done, 1, Some(Duration::from_secs(30)))
                    .unwrap();
                for x in done.drain(..) {
                    x.result.unwrap();
                    inflight -= 1;
                }
            }
        }
        while inflight > 0 {
            done.clear();
            qu.reap(&mut done, 1, Some(Duration::from_secs(30)))
                .unwrap();
            for x in done.drain(..) {
                x.result.unwrap();
                inflight -= 1;
            }
        }
        let stats = qu.stats();
        drop(qu);
        assert_eq!(
            q(&image).bitmap("b").unwrap().dirty_ranges(),
            model.ranges(),
            "{aio}: xdisk's view"
        );
        image.close().unwrap();
        drop(image);
        check_clean(&img);
        assert_eq!(qemu_dirty(&img, "b"), model.ranges(), "{aio}: QEMU's view");
        assert!(
            stats.fast > 0,
            "{aio}: some writes took the fast path ({stats:?})"
        );
    }
}

#[derive(Debug, Clone)]
enum Op {
    Write(u64, u64),
    Zero(u64, u64, bool),
    Discard(u64, u64),
    Flush,
    Reopen,
    Clear,
}

fn op_strategy(size: u64) -> impl Strategy<Value = Op> {
    let range = (0..size, 1u64..(300 << 10)).prop_map(move |(o, l)| (o, l.min(size - o)));
    prop_oneof![
        6 => range.clone().prop_map(|(o, l)| Op::Write(o, l)),
        2 => (range.clone(), any::<bool>()).prop_map(|((o, l), u)| Op::Zero(o, l, u)),
        1 => range.prop_map(|(o, l)| Op::Discard(o, l)),
        1 => Just(Op::Flush),
        1 => Just(Op::Reopen),
        1 => Just(Op::Clear),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// Random writes, zeroes, discards, flushes, close/reopen and clears: every bitmap
    /// equals a model (the union of what was written since its last clear, rounded to its
    /// granularity); at the end QEMU sees the same and the image is clean.
    #[test]
    fn random_write_sequences_match_a_model_bitmap(
        ops in proptest::collection::vec(op_strategy(6 << 20), 1..40),
        cluster in prop_oneof![Just(512u64), Just(4096), Just(65536)],
    ) {
        let d = tmpdir("xdisk-bitmaps-prop-");
        let size = 6u64 << 20;
        let img = d.path().join("p.qcow2");
        xdisk_image::create(&img, Format::Qcow2, &CreateOptions {
            size,
            cluster_size: cluster,
            ..CreateOptions::default()
        }).unwrap();
        let grans = [512u64, 4096, 65536, 1 << 20];
        let mut x = open_rw(&img);
        for (i, g) in grans.iter().enumerate() {
            q(&x).add_bitmap(&format!("g{i}"), Some(*g), true).unwrap();
        }
        let mut models: Vec<Model> = grans.iter().map(|&g| Model::new(size, g)).collect();
        for op in &ops {
            match *op {
                Op::Write(o, l) => x.write_at(&vec![0xa5; l as usize], o).unwrap(),
                Op::Zero(o, l, u) => x.write_zeroes(o, l, u).unwrap(),
                Op::Discard(o, l) => x.discard(o, l).unwrap(),
                Op::Flush => x.flush().unwrap(),
                Op::Reopen => {
                    x.close().unwrap();
                    drop(x);
                    x = open_rw(&img);
                }
                Op::Clear => {
                    q(&x).clear_bitmap("g1").unwrap();
                    models[1] = Model::new(size, grans[1]);
                }
            }
            if let Op::Write(o, l) | Op::Zero(o, l, _) | Op::Discard(o, l) = *op {
                for m in &mut models {
                    m.write(o, l);
                }
            }
        }
        for (i, m) in models.iter().enumerate() {
            prop_assert_eq!(q(&x).bitmap(&format!("g{i}")).unwrap().dirty_ranges(), m.ranges());
        }
        x.close().unwrap();
        drop(x);
        check_clean(&img);
        for (i, m) in models.iter().enumerate() {
            prop_assert_eq!(qemu_dirty(&img, &format!("g{i}")), m.ranges());
        }
    }
}

/// What tracking costs on the fast path, without I/O: `map` of in-place 4k writes (what an
/// ImageQueue does for each guest write) with no bitmap, one at 64 KiB and one at 512 bytes.
/// Run by hand: `cargo test --release -p xdisk-image --test bitmaps -- --ignored
/// --nocapture map_write_cost`.
#[test]
#[ignore]
fn map_write_cost_with_and_without_bitmaps() {
    let d = tmpdir("xdisk-bitmaps-cost-");
    let img = qemu_create(d.path(), "cost.qcow2", "256M", "preallocation=falloc");
    let x = open_rw(&img);
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let offs: Vec<u64> = (0..1 << 20)
        .map(|_| rng.gen_range(0..(256u64 << 20) / 4096) * 4096)
        .collect();
    let mut out = Vec::new();
    // Load the L2 table (the fast path only uses cached metadata).
    x.read_at(&mut [0u8; 4096], 0).unwrap();
    let mut run = |label: &str| {
        let mut best = f64::MAX;
        for _ in 0..5 {
            let t = std::time::Instant::now();
            for &o in &offs {
                out.clear();
                let m = x.map(o, 4096, true, &mut out).unwrap();
                assert!(matches!(m, xdisk_image::Mapping::Mapped(_)));
            }
            best = best.min(t.elapsed().as_secs_f64());
        }
        eprintln!(
            "map(write) 4k, {label}: {:.1} ns per call",
            best * 1e9 / offs.len() as f64
        );
    };
    run("no bitmap");
    q(&x).add_bitmap("b64k", Some(65536), true).unwrap();
    run("one bitmap, 64 KiB granularity");
    q(&x).remove_bitmap("b64k").unwrap();
    q(&x).add_bitmap("b512", Some(512), true).unwrap();
    run("one bitmap, 512-byte granularity");
    q(&x).add_bitmap("b64k", Some(65536), true).unwrap();
    run("two bitmaps (512 bytes and 64 KiB)");
}
