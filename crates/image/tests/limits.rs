//! Work and memory driven by image metadata are bounded (issue 9, finding 1): snapshot L1
//! tables that overlap are refused at open, the refcount rebuild of a dirty image is refused
//! over its memory budget (leaving the image as it was), and thousands of snapshots do not
//! make an open slow. Images are made by qemu-img, then snapshot tables are crafted.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use xdisk_image::{CacheMode, Error, Format, Image, OpenOptions};

mod support;

fn tmp() -> tempfile::TempDir {
    support::tmpdir("xdisk-limits-")
}

fn opts(read_only: bool) -> OpenOptions {
    OpenOptions {
        format: Some(Format::Qcow2),
        read_only,
        cache: CacheMode::WriteBack,
        ..OpenOptions::default()
    }
}

fn create(dir: &Path, name: &str, size: &str, o: &str) -> PathBuf {
    let p = dir.join(name);
    support::qemu_img_ok(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        o,
        p.to_str().unwrap(),
        size,
    ]);
    p
}

fn be32(f: &std::fs::File, off: u64) -> u32 {
    let mut b = [0u8; 4];
    f.read_exact_at(&mut b, off).unwrap();
    u32::from_be_bytes(b)
}

/// Replaces the snapshot table of `p` by `n` snapshots whose L1 tables of `l1_size` entries
/// are holes past the end of the file: each its own (`overlap` false) or all the same one.
/// The refcounts are not updated (the image is only opened read-only or marked dirty).
fn craft_snapshots(p: &Path, n: u32, l1_size: u32, overlap: bool) {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(p)
        .unwrap();
    let cb = be32(&f, 20);
    let cs = 1u64 << cb;
    let l1b = (u64::from(l1_size) * 8).next_multiple_of(cs);
    let end = f.metadata().unwrap().len().next_multiple_of(cs);
    let mut tab = Vec::new();
    for i in 0..u64::from(n) {
        let off = if overlap { end } else { end + i * l1b };
        let id = (i + 1).to_string();
        let name = format!("s{i}");
        tab.extend_from_slice(&off.to_be_bytes());
        tab.extend_from_slice(&l1_size.to_be_bytes());
        tab.extend_from_slice(&(id.len() as u16).to_be_bytes());
        tab.extend_from_slice(&(name.len() as u16).to_be_bytes());
        tab.extend_from_slice(&[0u8; 20]); // dates, vm clock, vm state size
        tab.extend_from_slice(&16u32.to_be_bytes()); // extra data: 16 bytes
        tab.extend_from_slice(&[0u8; 16]);
        tab.extend_from_slice(id.as_bytes());
        tab.extend_from_slice(name.as_bytes());
        tab.resize(tab.len().next_multiple_of(8), 0);
    }
    let toff = end + if overlap { l1b } else { u64::from(n) * l1b };
    f.write_all_at(&tab, toff).unwrap();
    f.set_len((toff + tab.len() as u64).next_multiple_of(cs))
        .unwrap();
    let mut h = [0u8; 12];
    h[..4].copy_from_slice(&n.to_be_bytes());
    h[4..].copy_from_slice(&toff.to_be_bytes());
    f.write_all_at(&h, 60).unwrap();
}

fn set_dirty(p: &Path) {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(p)
        .unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, 79).unwrap();
    b[0] |= 1;
    f.write_all_at(&b, 79).unwrap();
}

#[test]
fn clean_image_with_4096_snapshots_of_512_byte_clusters_opens_quickly() {
    // 2 GiB of 512-byte clusters: 65,536 L1 entries (1,024 clusters) per snapshot.
    let d = tmp();
    let p = create(d.path(), "many.qcow2", "2G", "cluster_size=512");
    let f = std::fs::File::open(&p).unwrap();
    let l1_size = be32(&f, 36);
    drop(f);
    craft_snapshots(&p, 4096, l1_size, false);
    let start = Instant::now();
    let img = Image::open(&p, &opts(true)).unwrap();
    let took = start.elapsed();
    assert_eq!(img.as_qcow2().expect("qcow2").snapshots().len(), 4096);
    // Before: 4.5 s (every snapshot L1 cluster inserted into a hash set); after: ~0.05 s.
    assert!(took < Duration::from_secs(2), "open took {took:?}");
}

#[test]
fn overlapping_snapshot_l1_tables_are_refused_at_open() {
    // 200 snapshots all naming the same 32 MiB L1 table in a 33 MiB sparse file, dirty:
    // before, the rebuild read all 200 tables into memory (6.4 GB).
    let d = tmp();
    let p = create(d.path(), "overlap.qcow2", "64M", "cluster_size=65536");
    craft_snapshots(&p, 200, 4 << 20, true);
    set_dirty(&p);
    let before = std::fs::read(&p).unwrap();
    for ro in [true, false] {
        let start = Instant::now();
        let e = Image::open(&p, &opts(ro)).unwrap_err();
        assert!(
            matches!(e, Error::Corrupt(ref m) if m.contains("overlap")),
            "{e}"
        );
        assert!(start.elapsed() < Duration::from_secs(5));
    }
    assert!(
        std::fs::read(&p).unwrap() == before,
        "the image was changed"
    );
}

#[test]
fn refcount_rebuild_over_the_memory_limit_is_refused_and_leaves_the_image_alone() {
    // A dirty image of 512-byte clusters in a 1 GiB sparse file: 2 Mi clusters, 4 MiB of
    // counts.
    let d = tmp();
    let p = create(
        d.path(),
        "big.qcow2",
        "64M",
        "cluster_size=512,lazy_refcounts=on",
    );
    support::qemu_io(&p, &["write -P 0x71 0 256k"]);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&p)
        .unwrap()
        .set_len(1 << 30)
        .unwrap();
    set_dirty(&p);
    let before = std::fs::read(&p).unwrap();
    let small = OpenOptions {
        repair_memory_limit: 1 << 20,
        ..opts(false)
    };
    let e = Image::open(&p, &small).unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("needs 5 MiB, over the limit of 1 MiB")
            && msg.contains("qemu-img check -r all"),
        "{msg}"
    );
    assert!(
        std::fs::read(&p).unwrap() == before,
        "the image was changed"
    );
    // Within the (default) limit it is repaired.
    let img = Image::open(&p, &opts(false)).unwrap();
    let mut b = vec![0u8; 4096];
    img.read_at(&mut b, 4096).unwrap();
    assert!(b.iter().all(|&x| x == 0x71));
    img.close().unwrap();
    drop(img);
    let o = support::qemu_img(&["check", p.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));
}

#[test]
fn refcount_rebuild_counts_shared_l2_tables_once_per_snapshot() {
    // Three snapshots share L2 tables and data with the active image: each distinct L2 table
    // is read once, its references counted once per L1 entry naming it.
    let d = tmp();
    let p = create(
        d.path(),
        "snaps.qcow2",
        "8M",
        "cluster_size=4096,lazy_refcounts=on",
    );
    support::qemu_io(&p, &["write -P 0x11 0 3M"]);
    for s in ["a", "b", "c"] {
        support::qemu_img_ok(&["snapshot", "-c", s, p.to_str().unwrap()]);
    }
    support::qemu_io(&p, &["write -P 0x22 1M 64k"]);
    set_dirty(&p);
    let img = Image::open(&p, &opts(false)).unwrap();
    let mut b = vec![0u8; 65536];
    img.read_at(&mut b, 1 << 20).unwrap();
    assert!(b.iter().all(|&x| x == 0x22));
    img.write_at(&[0x33; 8192], 0).unwrap();
    img.close().unwrap();
    drop(img);
    let o = support::qemu_img(&["check", p.to_str().unwrap()]);
    assert!(
        o.status.success(),
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}
