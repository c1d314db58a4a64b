//! A guest's writes through the rings land in the image's persistent dirty bitmaps: a
//! frontend writes (direct and indirect requests), zeroes nothing, discards, and the enabled
//! bitmap QEMU made before holds exactly the written ranges at its granularity once the
//! device is gone and the image closed (QEMU's view: `qemu-nbd -B` + `nbdinfo --map`); the
//! disabled bitmap is unchanged and `qemu-img check` clean.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;
use xdisk_blkfront::{FrontConfig, Op};
use xdisk_blkif::wire::Status;
use xdisk_blkif::XenbusState;

/// Dirty ranges of bitmap `name` as QEMU exports them.
fn qemu_dirty(p: &Path, name: &str) -> Vec<(u64, u64)> {
    let sock = p.with_extension(format!("{name}.sock"));
    let pid = p.with_extension(format!("{name}.pid"));
    let o = Command::new("qemu-nbd")
        .args(["--fork", "-r", "-f", "qcow2", "-B", name, "-k"])
        .arg(&sock)
        .arg("--pid-file")
        .arg(&pid)
        .arg(p)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = Command::new("nbdinfo")
        .arg(format!("--map=qemu:dirty-bitmap:{name}"))
        .arg(format!("nbd+unix:///?socket={}", sock.display()))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // qemu-nbd exits (a zombie until reaped) once nbdinfo leaves.
    if let Some(n) = std::fs::read_to_string(&pid)
        .ok()
        .and_then(|t| t.trim().parse::<u32>().ok())
    {
        for _ in 0..500 {
            let st = std::fs::read_to_string(format!("/proc/{n}/status")).unwrap_or_default();
            if !st
                .lines()
                .any(|l| l.starts_with("State:") && !l.contains("Z (zombie)"))
            {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    let mut v: Vec<(u64, u64)> = Vec::new();
    for line in String::from_utf8_lossy(&o.stdout).lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() >= 3 && f[2] == "1" {
            let (off, len): (u64, u64) = (f[0].parse().unwrap(), f[1].parse().unwrap());
            match v.last_mut() {
                Some((a, b)) if *a + *b == off => *b += len,
                _ => v.push((off, len)),
            }
        }
    }
    v
}

#[test]
fn guest_writes_through_the_rings_land_in_the_enabled_bitmap() {
    let host = host();
    let disk = qcow2_disk(16 << 20);
    let p = disk.path.to_str().unwrap();
    qemu_img(&["bitmap", "--add", "-g", "4k", p, "on"]);
    qemu_img(&["bitmap", "--add", "--disable", p, "off"]);
    let image = open_image(&disk.path, false);
    let mut pr = pair(&host, 1, 768, image.clone(), |_| {}, FrontConfig::default());
    // (sector, bytes): a sector, a page, a full direct request, an indirect one, the end.
    let sectors = pr.front.info().sectors;
    let writes: [(u64, usize); 5] = [
        (1, 512),
        (64, 4096),
        (2048, 45056),
        (8192, 512 * 1024),
        (sectors - 8, 4096),
    ];
    for (i, &(sector, len)) in writes.iter().enumerate() {
        pr.front
            .write(sector, &pattern(i as u64, len))
            .expect("write");
    }
    // A second write to the same place (the fast path: mapped, in place).
    pr.front.write(64, &pattern(9, 4096)).expect("rewrite");
    let g = u64::from(pr.front.info().discard_granularity / 512);
    let discard = Op::Discard {
        sector: 4 * g,
        nr_sectors: g,
        secure: false,
    };
    assert_eq!(pr.front.run(0, discard).unwrap().status, Status::Okay);
    pr.front.flush().expect("flush");
    pr.front.disconnect().expect("disconnect");
    wait_until("backend Closed", Duration::from_secs(10), || {
        pr.device.state() == XenbusState::Closed
    });
    pr.device.shutdown().expect("shutdown");
    image.close().unwrap();
    drop(image);
    check_clean(&disk);
    // The written ranges at 4 KiB granularity, merged.
    let mut want: Vec<(u64, u64)> = Vec::new();
    let mut ranges: Vec<(u64, u64)> = writes
        .iter()
        .map(|&(s, l)| (s * 512, l as u64))
        .chain([(4 * g * 512, g * 512)])
        .collect();
    ranges.sort_unstable();
    for (off, len) in ranges {
        let (a, b) = (off / 4096 * 4096, (off + len).div_ceil(4096) * 4096);
        match want.last_mut() {
            Some((o, l)) if *o + *l >= a => *l = (*l).max(b - *o),
            _ => want.push((a, b - a)),
        }
    }
    assert_eq!(qemu_dirty(&disk.path, "on"), want);
    assert_eq!(qemu_dirty(&disk.path, "off"), []);
}
