//! `xdisk img` on images built to exhaust memory or time (issue 9, finding 1), run as the
//! review did: a dirty image with 200 snapshots whose 32 MiB L1 tables overlap in a sparse
//! file, opened writable by `img resize IMG +0`, under an address-space limit.

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

const XDISK: &str = env!("CARGO_BIN_EXE_xdisk");

fn be32(f: &std::fs::File, off: u64) -> u32 {
    let mut b = [0u8; 4];
    f.read_exact_at(&mut b, off).unwrap();
    u32::from_be_bytes(b)
}

/// `n` snapshots all naming one L1 table of `l1_size` entries (a hole past the end of the
/// file), and the dirty bit.
fn craft_dirty_overlapping_snapshots(p: &Path, n: u32, l1_size: u32) {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(p)
        .unwrap();
    let cs = 1u64 << be32(&f, 20);
    let end = f.metadata().unwrap().len().next_multiple_of(cs);
    let l1b = (u64::from(l1_size) * 8).next_multiple_of(cs);
    let mut tab = Vec::new();
    for i in 0..n {
        let id = (i + 1).to_string();
        tab.extend_from_slice(&end.to_be_bytes());
        tab.extend_from_slice(&l1_size.to_be_bytes());
        tab.extend_from_slice(&(id.len() as u16).to_be_bytes());
        tab.extend_from_slice(&(id.len() as u16).to_be_bytes());
        tab.extend_from_slice(&[0u8; 20]);
        tab.extend_from_slice(&16u32.to_be_bytes());
        tab.extend_from_slice(&[0u8; 16]);
        tab.extend_from_slice(id.as_bytes());
        tab.extend_from_slice(id.as_bytes());
        tab.resize(tab.len().next_multiple_of(8), 0);
    }
    let toff = end + l1b;
    f.write_all_at(&tab, toff).unwrap();
    f.set_len((toff + tab.len() as u64).next_multiple_of(cs))
        .unwrap();
    let mut h = [0u8; 12];
    h[..4].copy_from_slice(&n.to_be_bytes());
    h[4..].copy_from_slice(&toff.to_be_bytes());
    f.write_all_at(&h, 60).unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, 79).unwrap();
    b[0] |= 1;
    f.write_all_at(&b, 79).unwrap();
}

#[test]
fn dirty_image_with_overlapping_snapshot_l1_tables_is_refused_within_bounded_memory() {
    let d = tempfile::Builder::new()
        .prefix("xdisk-cli-limits-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let p = d.path().join("bomb.qcow2");
    let o = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", p.to_str().unwrap(), "64M"])
        .output()
        .unwrap();
    assert!(o.status.success());
    craft_dirty_overlapping_snapshots(&p, 200, 4 << 20);
    // 300 MB of address space (before the fix the rebuild asked for 200 x 32 MiB and
    // aborted: SIGABRT after 18.7 s at 2.99 GB under a 3 GB limit).
    let start = Instant::now();
    let o = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "ulimit -v 300000; exec {XDISK} img resize -f qcow2 {} +0",
            p.display()
        ))
        .output()
        .unwrap();
    let took = start.elapsed();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{:?}: {err}", o.status);
    assert!(err.contains("overlap"), "{err}");
    assert!(took < Duration::from_secs(10), "took {took:?}");
}

#[test]
fn dirty_sparse_image_of_small_clusters_is_refused_over_the_repair_budget() {
    // 512-byte clusters in a 100 GiB sparse file: 200 Mi clusters, 400 MiB of counts. Before:
    // counted in memory and 400 MB of refcount blocks written into the file (17.9 s); now
    // refused at once, the image unchanged.
    let d = tempfile::Builder::new()
        .prefix("xdisk-cli-limits-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let p = d.path().join("sparse.qcow2");
    let o = Command::new("qemu-img")
        .args([
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=512,lazy_refcounts=on",
        ])
        .arg(&p)
        .arg("64M")
        .output()
        .unwrap();
    assert!(o.status.success());
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&p)
        .unwrap();
    f.set_len(100 << 30).unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, 79).unwrap();
    b[0] |= 1;
    f.write_all_at(&b, 79).unwrap();
    drop(f);
    let start = Instant::now();
    let o = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "ulimit -v 300000; exec {XDISK} img resize -f qcow2 {} +0",
            p.display()
        ))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{:?}: {err}", o.status);
    assert!(
        err.contains("over the limit of 256 MiB") && err.contains("qemu-img check -r all"),
        "{err}"
    );
    assert!(start.elapsed() < Duration::from_secs(10));
    let m = std::fs::metadata(&p).unwrap();
    assert_eq!(m.len(), 100 << 30, "the image was changed");
    use std::os::unix::fs::MetadataExt;
    assert!(m.blocks() * 512 < 16 << 20, "refcount blocks were written");
}
