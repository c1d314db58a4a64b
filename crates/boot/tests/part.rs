//! Partition tables made by the real tools (sfdisk, sgdisk) and by hand for the hostile ones.

use std::process::Command;

use proptest::prelude::*;
use xdisk_boot::disk::MemDisk;
use xdisk_boot::part::{filesystems, PartType, Partition};

fn tool(cmd: &mut Command, pkg: &str) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e} (install Debian's {pkg})"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn sfdisk(script: &str, size_mib: u64) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(size_mib << 20)
        .unwrap();
    let mut child = Command::new("sfdisk")
        .arg("-q")
        .arg(&img)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("sfdisk (Debian's fdisk)");
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    assert!(child.wait().unwrap().success());
    std::fs::read(&img).unwrap()
}

fn starts(parts: &[Partition]) -> Vec<(u32, u64)> {
    parts.iter().map(|p| (p.number, p.start)).collect()
}

#[test]
fn no_signature_means_the_whole_disk() {
    let parts = filesystems(&MemDisk(vec![0u8; 4096])).unwrap();
    assert_eq!(parts.len(), 1);
    assert_eq!(parts[0].kind, PartType::Whole);
    assert_eq!(parts[0].len, 4096);
    // Smaller than a sector: still the whole disk, no error.
    assert_eq!(filesystems(&MemDisk(vec![1u8; 100])).unwrap()[0].len, 100);
}

#[test]
fn mbr_primaries_in_table_order_then_logical_partitions() {
    let d = sfdisk(
        "label: dos\nstart=2048, size=4096, type=83\nstart=8192, size=2048, type=c, bootable\n\
         start=12288, size=20480, type=5\nstart=14336, size=2048, type=83\nstart=18432, size=4096, type=83\n",
        32,
    );
    let parts = filesystems(&MemDisk(d)).unwrap();
    // The bootable flag does not reorder (pygrub 4.17 under Python 3 never does).
    assert_eq!(
        starts(&parts),
        vec![
            (1, 2048 * 512),
            (2, 8192 * 512),
            (5, 14336 * 512),
            (6, 18432 * 512)
        ]
    );
    assert_eq!(parts[0].len, 4096 * 512);
    assert_eq!(parts[1].kind, PartType::Mbr(0x0c));
}

#[test]
fn gpt_entries_in_order_and_empty_ones_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(32 << 20)
        .unwrap();
    tool(
        Command::new("sgdisk")
            .args([
                "-n",
                "1:2048:+4M",
                "-t",
                "1:ef02",
                "-n",
                "3:20480:+8M",
                "-n",
                "2:12288:+2M",
            ])
            .arg(&img),
        "gdisk",
    );
    let parts = filesystems(&MemDisk(std::fs::read(&img).unwrap())).unwrap();
    assert_eq!(
        starts(&parts),
        vec![(1, 2048 * 512), (2, 12288 * 512), (3, 20480 * 512)]
    );
    assert_eq!(parts[2].len, 8 << 20);
    assert!(matches!(parts[0].kind, PartType::Gpt(_)));
}

#[test]
fn hybrid_iso_is_read_at_offset_zero_first() {
    let mut d = sfdisk("label: dos\nstart=2048, size=2048, type=ef\n", 4);
    d[0x8001..0x8006].copy_from_slice(b"CD001");
    let parts = filesystems(&MemDisk(d)).unwrap();
    assert_eq!(parts[0].kind, PartType::Whole);
    assert_eq!(parts[0].start, 0);
    assert_eq!(starts(&parts[1..]), vec![(1, 2048 * 512)]);
}

#[test]
fn fat_boot_sector_with_0x55aa_is_not_a_table() {
    // A filesystem boot sector ends in 0x55AA too; its "entries" have junk status bytes.
    let mut d = vec![0u8; 1 << 20];
    d[510] = 0x55;
    d[511] = 0xAA;
    for (i, b) in d[446..510].iter_mut().enumerate() {
        *b = (i as u8).wrapping_mul(37).wrapping_add(3);
    }
    let parts = filesystems(&MemDisk(d)).unwrap();
    assert_eq!(parts.len(), 1);
    assert_eq!(parts[0].kind, PartType::Whole);
}

#[test]
fn partitions_past_the_end_are_dropped_or_clamped() {
    let mut d = vec![0u8; 1 << 20];
    d[510] = 0x55;
    d[511] = 0xAA;
    let entry = |d: &mut [u8], i: usize, t: u8, start: u32, len: u32| {
        let e = &mut d[446 + 16 * i..446 + 16 * (i + 1)];
        e[4] = t;
        e[8..12].copy_from_slice(&start.to_le_bytes());
        e[12..16].copy_from_slice(&len.to_le_bytes());
    };
    entry(&mut d, 0, 0x83, 1 << 30, 100); // starts past the end
    entry(&mut d, 1, 0x83, 1024, u32::MAX); // runs past the end
    let parts = filesystems(&MemDisk(d)).unwrap();
    assert_eq!(starts(&parts), vec![(2, 1024 * 512)]);
    assert_eq!(parts[0].len, (1 << 20) - 1024 * 512);
}

#[test]
fn extended_chain_loop_ends() {
    let mut d = vec![0u8; 1 << 20];
    let sig = |d: &mut [u8], at: usize| {
        d[at + 510] = 0x55;
        d[at + 511] = 0xAA;
    };
    sig(&mut d, 0);
    // Extended partition at sector 100; its EBR's "next" points back to itself (offset 0
    // is "none", so point at +0 via a second EBR at 200 that points back to 100).
    let e = &mut d[446..462];
    e[4] = 0x05;
    e[8..12].copy_from_slice(&100u32.to_le_bytes());
    e[12..16].copy_from_slice(&1000u32.to_le_bytes());
    for (ebr, next) in [(100usize, 100u32), (200, 0)] {
        let at = ebr * 512;
        sig(&mut d, at);
        let l = &mut d[at + 446..at + 462];
        l[4] = 0x83;
        l[8..12].copy_from_slice(&10u32.to_le_bytes());
        l[12..16].copy_from_slice(&10u32.to_le_bytes());
        let n = &mut d[at + 462..at + 478];
        n[4] = 0x05;
        n[8..12].copy_from_slice(&next.to_le_bytes());
    }
    let parts = filesystems(&MemDisk(d)).unwrap();
    assert_eq!(starts(&parts), vec![(5, 110 * 512), (6, 210 * 512)]);
}

/// A 64 KiB disk with a protective MBR and a GPT header by hand: the entry array at sector
/// `entries_lba`, `count` entries of 128 bytes.
fn hand_gpt(entries_lba: u64, count: u32) -> Vec<u8> {
    let mut d = vec![0u8; 64 << 10];
    d[510] = 0x55;
    d[511] = 0xAA;
    let e = &mut d[446..462];
    e[4] = 0xEE;
    e[8..12].copy_from_slice(&1u32.to_le_bytes());
    e[12..16].copy_from_slice(&100u32.to_le_bytes());
    let h = &mut d[512..512 + 92];
    h[0..8].copy_from_slice(b"EFI PART");
    h[12..16].copy_from_slice(&92u32.to_le_bytes());
    h[72..80].copy_from_slice(&entries_lba.to_le_bytes());
    h[80..84].copy_from_slice(&count.to_le_bytes());
    h[84..88].copy_from_slice(&128u32.to_le_bytes());
    d
}

#[test]
fn gpt_with_an_entry_array_past_the_end_is_an_error() {
    let d = hand_gpt(1 << 40, 128);
    let err = filesystems(&MemDisk(d)).unwrap_err().to_string();
    assert!(err.contains("gpt: corrupt"), "{err}");
}

#[test]
fn gpt_entry_ending_at_the_last_possible_sector_is_skipped() {
    // Found by the boot_part fuzzer: first 0, last u64::MAX overflowed `last - first + 1`.
    let mut d = hand_gpt(2, 4);
    let entry = &mut d[1024..1024 + 128];
    entry[0] = 1; // a type GUID
    entry[32..40].copy_from_slice(&0u64.to_le_bytes());
    entry[40..48].copy_from_slice(&u64::MAX.to_le_bytes());
    let parts = filesystems(&MemDisk(d)).unwrap();
    assert!(parts.iter().all(|p| p.number != 1), "{parts:?}");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]
    /// Arbitrary first sectors and GPT headers: an answer or an error, never a panic, and every
    /// place returned lies inside the disk.
    #[test]
    fn arbitrary_tables_never_panic(mut head in proptest::collection::vec(any::<u8>(), 0..2048), sig in any::<bool>()) {
        head.resize(1 << 16, 0);
        if sig { head[510] = 0x55; head[511] = 0xAA; }
        let len = head.len() as u64;
        if let Ok(parts) = filesystems(&MemDisk(head)) {
            for p in parts {
                prop_assert!(p.start < len || (p.start == 0 && len == 0));
                prop_assert!(p.start + p.len <= len);
            }
        }
    }
}
