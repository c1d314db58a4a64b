//! Where the filesystems are: partition tables (MBR with its logical partitions, GPT), a
//! filesystem on the whole disk, hybrid ISOs.
//!
//! pygrub's rules (Xen 4.17, `get_partition_offsets`), kept: no 0x55AA signature at 510 →
//! the whole disk is one filesystem; MBR primaries in table order (pygrub 4.17's "active
//! first" test compares bytes with a str under Python 3 and never matches, so table order is
//! what it really does); a protective 0xEE entry → the GPT entries in order; a table that
//! yields nothing → the whole disk. Beyond pygrub: logical partitions (the extended chain,
//! after the primaries, as Linux numbers them 5, 6, ...); the GPT header is validated and
//! empty entries skipped (pygrub returns offset 0 for them); GPT on 4 KiB sectors; a hybrid
//! ISO ("CD001" at 0x8001) is read at offset 0 first (pygrub meant to; its bytes-vs-str test
//! never matches under Python 3).

use crate::bytes::{le32, le64};
use crate::disk::ReadAt;
use crate::{Error, Result};

/// Most logical partitions followed in an extended chain (Linux allows a few hundred; real
/// disks have a handful).
const MAX_LOGICAL: usize = 128;
/// Most GPT entries read (the spec's minimum array is 128; sgdisk allows more).
const MAX_GPT_ENTRIES: u32 = 1024;

/// What a partition table entry says a partition is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PartType {
    /// The whole disk (no table, or a hybrid ISO's filesystem at 0).
    Whole,
    /// An MBR primary or logical partition with its type byte.
    Mbr(u8),
    /// A GPT entry with its type GUID (as stored, mixed-endian).
    Gpt([u8; 16]),
}

/// A place where a filesystem may be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partition {
    /// Linux's number for it (1-4 primaries, 5.. logical, GPT entry index + 1); 0 for the
    /// whole disk.
    pub number: u32,
    /// Start and length in bytes. The length is clamped to the disk's end.
    pub start: u64,
    /// Length in bytes (see `start`).
    pub len: u64,
    /// What the table says it is.
    pub kind: PartType,
}

const SECTOR: u64 = 512;

fn read(disk: &dyn ReadAt, offset: u64, len: usize) -> Result<Vec<u8>> {
    crate::disk::read_vec(disk, offset, len)
        .map_err(|e| Error::io(format!("reading the partition table at byte {offset}"), e))
}

/// A partition from sector numbers, clamped to the disk; `None` if it starts past the end or
/// is empty.
fn from_sectors(
    disk_size: u64,
    number: u32,
    start_sector: u64,
    sectors: u64,
    sector: u64,
    kind: PartType,
) -> Option<Partition> {
    let start = start_sector.checked_mul(sector)?;
    if start >= disk_size || sectors == 0 {
        return None;
    }
    let len = sectors.saturating_mul(sector);
    let len = len.min(disk_size - start);
    Some(Partition {
        number,
        start,
        len,
        kind,
    })
}

/// The places to look for filesystems, in the order to try them.
pub fn filesystems(disk: &dyn ReadAt) -> Result<Vec<Partition>> {
    let size = disk.size();
    let whole = Partition {
        number: 0,
        start: 0,
        len: size,
        kind: PartType::Whole,
    };
    if size < SECTOR {
        return Ok(vec![whole]);
    }
    let mbr = read(disk, 0, SECTOR as usize)?;
    if mbr.get(510..512) != Some(&[0x55, 0xAA][..]) {
        return Ok(vec![whole]);
    }
    let mut out = Vec::new();
    if size >= 0x8006 && read(disk, 0x8001, 5)? == b"CD001" {
        out.push(whole.clone());
    }
    // A FAT (or other) filesystem boot sector also ends in 0x55AA: a table whose entries
    // make no sense is no table. An entry is plausible when its status byte is 0 or 0x80.
    let entries: Vec<&[u8]> = (0..4)
        .filter_map(|i| mbr.get(446 + 16 * i..446 + 16 * (i + 1)))
        .collect();
    let plausible = entries.iter().all(|e| e[0] == 0 || e[0] == 0x80);
    if plausible {
        let mut extended = None;
        for (i, e) in entries.iter().enumerate() {
            let ptype = e[4];
            let start = u64::from(le32(e, 8));
            let count = u64::from(le32(e, 12));
            if ptype == 0 || start == 0 {
                continue;
            }
            if ptype == 0xEE {
                match gpt(disk)? {
                    Some(parts) => out.extend(parts),
                    None => continue,
                }
                extended = None;
                break;
            }
            if matches!(ptype, 0x05 | 0x0F | 0x85) {
                if extended.is_none() {
                    extended = Some((start, count));
                }
                continue;
            }
            if let Some(p) = from_sectors(
                size,
                i as u32 + 1,
                start,
                count,
                SECTOR,
                PartType::Mbr(ptype),
            ) {
                out.push(p);
            }
        }
        if let Some((ext_start, ext_len)) = extended {
            out.extend(logical(disk, ext_start, ext_len)?);
        }
    }
    if out.is_empty() {
        out.push(whole);
    }
    Ok(out)
}

/// The logical partitions of the extended partition at `ext_start` (sectors), following the
/// chain of EBRs: each EBR's first entry is a partition relative to that EBR, its second the
/// next EBR relative to the extended partition's start. Bounded and loop-proof.
fn logical(disk: &dyn ReadAt, ext_start: u64, ext_len: u64) -> Result<Vec<Partition>> {
    let size = disk.size();
    let mut out = Vec::new();
    let mut ebr = ext_start;
    let mut seen = std::collections::HashSet::new();
    let mut number = 5u32;
    for _ in 0..MAX_LOGICAL {
        if !seen.insert(ebr) {
            break; // a loop in the chain
        }
        let Some(at) = ebr
            .checked_mul(SECTOR)
            .filter(|&a| a.saturating_add(SECTOR) <= size)
        else {
            break;
        };
        let b = read(disk, at, SECTOR as usize)?;
        if b.get(510..512) != Some(&[0x55, 0xAA][..]) {
            break;
        }
        let (t1, s1, c1) = (
            b[446 + 4],
            u64::from(le32(&b, 446 + 8)),
            u64::from(le32(&b, 446 + 12)),
        );
        if t1 != 0 && s1 != 0 {
            if let Some(p) = ebr
                .checked_add(s1)
                .and_then(|s| from_sectors(size, number, s, c1, SECTOR, PartType::Mbr(t1)))
            {
                out.push(p);
            }
            number += 1;
        }
        let (t2, s2) = (b[462 + 4], u64::from(le32(&b, 462 + 8)));
        if t2 == 0 || s2 == 0 || (ext_len != 0 && s2 >= ext_len) {
            break;
        }
        match ext_start.checked_add(s2) {
            Some(next) => ebr = next,
            None => break,
        }
    }
    Ok(out)
}

/// The GPT's used entries in order, trying 512-byte then 4096-byte sectors; `None` when no
/// valid header is found (UEFI spec 2.10, 5.3.2: "EFI PART" at LBA 1, header size 92..=sector,
/// entry size a multiple of 128).
fn gpt(disk: &dyn ReadAt) -> Result<Option<Vec<Partition>>> {
    let size = disk.size();
    for sector in [512u64, 4096] {
        if size < sector * 2 {
            continue;
        }
        let h = read(disk, sector, 92)?;
        if h.get(0..8) != Some(&b"EFI PART"[..]) {
            continue;
        }
        let header_size = le32(&h, 12);
        let entries_lba = le64(&h, 72);
        let count = le32(&h, 80);
        let entry_size = le32(&h, 84);
        if !(92..=sector as u32).contains(&header_size)
            || entry_size < 128
            || !entry_size.is_multiple_of(128)
            || entry_size > 4096
        {
            return Err(Error::corrupt(
                "gpt",
                format!("header size {header_size} or entry size {entry_size} out of range"),
            ));
        }
        let count = count.min(MAX_GPT_ENTRIES);
        let Some(table_at) = entries_lba.checked_mul(sector) else {
            return Err(Error::corrupt(
                "gpt",
                "partition entry array past the disk's end",
            ));
        };
        let table_len = u64::from(count) * u64::from(entry_size);
        if table_at.checked_add(table_len).is_none_or(|end| end > size) {
            return Err(Error::corrupt(
                "gpt",
                "partition entry array past the disk's end",
            ));
        }
        let table = read(disk, table_at, table_len as usize)?;
        let mut out = Vec::new();
        for i in 0..count as usize {
            let Some(e) = table.get(i * entry_size as usize..(i + 1) * entry_size as usize) else {
                break;
            };
            let mut guid = [0u8; 16];
            guid.copy_from_slice(&e[0..16]);
            if guid == [0u8; 16] {
                continue;
            }
            let first = le64(e, 32);
            let last = le64(e, 40);
            // `last` is inclusive: a range up to u64::MAX has no length that fits.
            let Some(sectors) = last.checked_sub(first).and_then(|n| n.checked_add(1)) else {
                continue;
            };
            if let Some(p) = from_sectors(
                size,
                i as u32 + 1,
                first,
                sectors,
                sector,
                PartType::Gpt(guid),
            ) {
                out.push(p);
            }
        }
        return Ok(Some(out));
    }
    Ok(None)
}
