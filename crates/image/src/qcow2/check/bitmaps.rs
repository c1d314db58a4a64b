//! The bitmaps extension's clusters: directory, bitmap tables and bitmap data.

use super::{be64_at, Checker};
use crate::qcow2::format::{autoclear, ext};

/// Our bound on the bitmap directory and on each bitmap table.
const MAX_BITMAP_TABLE: u64 = 64 << 20;

impl Checker<'_> {
    /// "Bitmaps": the directory, each bitmap table and each bitmap data cluster. Like QEMU,
    /// only when the extension is marked consistent (autoclear bit 0); otherwise the
    /// bitmaps' clusters show up as leaks.
    pub(super) fn bitmaps(&mut self) {
        if self.h.autoclear_features & autoclear::BITMAPS == 0 {
            return;
        }
        let Some(data) = self
            .h
            .unknown_extensions
            .iter()
            .find(|(t, _)| *t == ext::BITMAPS)
            .map(|(_, d)| d.clone())
        else {
            return;
        };
        if data.len() < 24 {
            self.corrupt("ERROR bitmaps extension too short".into());
            return;
        }
        let nb = u32::from_be_bytes(data[0..4].try_into().expect("4"));
        let dir_size = u64::from_be_bytes(data[8..16].try_into().expect("8"));
        let dir_off = u64::from_be_bytes(data[16..24].try_into().expect("8"));
        if nb == 0 {
            return;
        }
        let file_len = self.file_len;
        let fits = |off: u64, len: u64| off.checked_add(len).is_some_and(|e| e <= file_len);
        if dir_off & (self.cs - 1) != 0
            || !(24..=MAX_BITMAP_TABLE).contains(&dir_size)
            || !fits(dir_off, dir_size)
        {
            self.corrupt(format!(
                "ERROR bitmap directory at {dir_off:#x}+{dir_size:#x} is invalid"
            ));
            return;
        }
        self.count_exclusive(dir_off, dir_size, "bitmap directory");
        let mut dir = vec![0u8; dir_size as usize];
        if !self.read(&mut dir, dir_off, "the bitmap directory") {
            return;
        }
        let mut pos = 0usize;
        for i in 0..nb {
            if pos + 24 > dir.len() {
                self.corrupt(format!("ERROR bitmap directory entry {i} truncated"));
                return;
            }
            let e = &dir[pos..];
            let table_off = u64::from_be_bytes(e[0..8].try_into().expect("8"));
            let table_size = u64::from(u32::from_be_bytes(e[8..12].try_into().expect("4")));
            let name_size = u16::from_be_bytes([e[18], e[19]]) as usize;
            let extra = u32::from_be_bytes(e[20..24].try_into().expect("4")) as usize;
            pos = match (24usize + extra + name_size).checked_next_multiple_of(8) {
                Some(l) if pos + l <= dir.len() => pos + l,
                _ => {
                    self.corrupt(format!("ERROR bitmap directory entry {i} truncated"));
                    return;
                }
            };
            let bytes = table_size * 8;
            if table_off & (self.cs - 1) != 0 || bytes > MAX_BITMAP_TABLE || !fits(table_off, bytes)
            {
                self.corrupt(format!(
                    "ERROR bitmap {i}: table at {table_off:#x} ({table_size} entries) is invalid"
                ));
                continue;
            }
            if bytes == 0 {
                continue;
            }
            self.count_exclusive(table_off, bytes, "bitmap table");
            let mut t = vec![0u8; bytes as usize];
            if !self.read(&mut t, table_off, "a bitmap table") {
                return;
            }
            for j in 0..table_size as usize {
                let raw = be64_at(&t, j);
                let off = raw & 0x00ff_ffff_ffff_fe00;
                if raw & 0xff00_0000_0000_01fe != 0
                    || (off != 0 && raw & 1 != 0)
                    || off & (self.cs - 1) != 0
                {
                    self.corrupt(format!(
                        "ERROR bitmap {i}: invalid bitmap table entry {raw:#x}"
                    ));
                    continue;
                }
                if off == 0 {
                    continue;
                }
                if off / self.cs >= self.nb_clusters {
                    self.corrupt(format!(
                        "ERROR bitmap {i}: bitmap data cluster {off:#x} lies outside the image \
                         file"
                    ));
                    self.unfixable_refs = true;
                    continue;
                }
                self.refs.add(off / self.cs, 1);
            }
        }
    }
}
