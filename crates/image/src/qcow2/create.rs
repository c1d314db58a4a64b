//! Creating qcow2 images, the way `qemu-img create` lays them out (the entry point for
//! every format is [`crate::create::create`]).
//!
//! Layout of a new qcow2 image (QEMU's `docs/interop/qcow2.txt`, sections "Header",
//! "Host cluster management" and "Cluster mapping"):
//!
//! ```text
//! cluster 0          header, header extensions, backing file name
//! cluster 1..        refcount table (refcount_table_clusters clusters)
//! then               refcount blocks covering every cluster written below
//! then               active L1 table (l1_size entries, may end mid-cluster)
//! preallocation:     every L2 table, then every data cluster, contiguous
//! ```
//!
//! Every cluster listed above has refcount 1; nothing else is referenced, so the result passes
//! `qemu-img check` without errors or leaks.

use std::path::Path;
use std::str::FromStr;

use xdisk_io::Storage;

pub use super::format::CompressionType;
use super::format::{
    compat, incompat, refcount_set, Header, L2E_COPIED, MAX_BACKING_NAME, MAX_CLUSTER_BITS,
    MAX_L1_BYTES, MAX_REFTABLE_BYTES, MIN_CLUSTER_BITS,
};
use crate::create::{create_file, io_ctx, round_size};
pub use crate::create::{CreateOptions, Preallocation};
use crate::{Error, Format, Result};

impl FromStr for CompressionType {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "zlib" => Ok(CompressionType::Zlib),
            "zstd" => Ok(CompressionType::Zstd),
            _ => Err(Error::InvalidArgument(format!(
                "Invalid parameter '{s}' (compression_type: zlib, zstd)"
            ))),
        }
    }
}

fn invalid(msg: impl Into<String>) -> Error {
    Error::InvalidArgument(msg.into())
}

/// Where everything of a new image goes, in clusters.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Layout {
    cluster_bits: u32,
    refcount_order: u32,
    size: u64,
    l1_entries: u64,
    reftable_clusters: u64,
    refblocks: u64,
    l1_clusters: u64,
    l2_tables: u64,
    data_clusters: u64,
}

impl Layout {
    fn compute(opts: &CreateOptions, size: u64) -> Result<Layout> {
        let cluster_bits = opts.cluster_size.trailing_zeros();
        let cs = opts.cluster_size;
        let refcount_order = opts.refcount_bits.trailing_zeros();
        // "Cluster mapping": one L1 entry per L2 table of cluster_size / 8 entries.
        let l1_entries = Header::l1_entries_for(size, cluster_bits);
        if l1_entries * 8 > MAX_L1_BYTES {
            return Err(invalid(
                "The image size is too large for file format 'qcow2' (try using a larger \
                 cluster size)",
            ));
        }
        let l1_clusters = (l1_entries * 8).div_ceil(cs);
        let (l2_tables, data_clusters) = if opts.preallocation == Preallocation::Off {
            (0, 0)
        } else {
            (l1_entries, size.div_ceil(cs))
        };
        // "Host cluster management": a refcount block holds cluster_size * 8 / refcount_bits
        // entries; the table and the blocks must cover themselves too. Iterate to the
        // smallest fixed point.
        let per_block = (cs * 8) >> refcount_order;
        let (mut rt, mut rb) = (1u64, 1u64);
        loop {
            let total = 1 + rt + rb + l1_clusters + l2_tables + data_clusters;
            let need_rb = total.div_ceil(per_block);
            let need_rt = (need_rb * 8).div_ceil(cs);
            if need_rb <= rb && need_rt <= rt {
                break;
            }
            rb = rb.max(need_rb);
            rt = rt.max(need_rt);
        }
        if rt * cs > MAX_REFTABLE_BYTES {
            return Err(invalid(format!(
                "The image size is too large for file format 'qcow2' with \
                 preallocation={} (the refcount table would exceed {} MiB; try a larger \
                 cluster size or refcount_bits)",
                opts.preallocation,
                MAX_REFTABLE_BYTES >> 20
            )));
        }
        Ok(Layout {
            cluster_bits,
            refcount_order,
            size,
            l1_entries,
            reftable_clusters: rt,
            refblocks: rb,
            l1_clusters,
            l2_tables,
            data_clusters,
        })
    }

    fn cs(&self) -> u64 {
        1 << self.cluster_bits
    }
    fn reftable_start(&self) -> u64 {
        1
    }
    fn refblock_start(&self) -> u64 {
        1 + self.reftable_clusters
    }
    fn l1_start(&self) -> u64 {
        self.refblock_start() + self.refblocks
    }
    fn l2_start(&self) -> u64 {
        self.l1_start() + self.l1_clusters
    }
    fn data_start(&self) -> u64 {
        self.l2_start() + self.l2_tables
    }
    /// Clusters in use (all with refcount 1).
    fn total_clusters(&self) -> u64 {
        self.data_start() + self.data_clusters
    }
}

/// Checks the options where qemu-img refuses them; returns the rounded size.
fn validate(opts: &CreateOptions) -> Result<u64> {
    if opts.version != 2 && opts.version != 3 {
        return Err(invalid(format!(
            "Invalid compatibility level: qcow2 version {} (use 2 = compat 0.10 or 3 = \
             compat 1.1)",
            opts.version
        )));
    }
    let cs = opts.cluster_size;
    if !cs.is_power_of_two() || !((1 << MIN_CLUSTER_BITS)..=(1 << MAX_CLUSTER_BITS)).contains(&cs) {
        return Err(invalid(
            "Cluster size must be a power of two between 512 and 2048k",
        ));
    }
    if !opts.refcount_bits.is_power_of_two() || opts.refcount_bits > 64 {
        return Err(invalid(
            "Refcount width must be a power of two and may not exceed 64 bits",
        ));
    }
    if opts.version < 3 && opts.refcount_bits != 16 {
        return Err(invalid(
            "Different refcount widths than 16 bits require compatibility level 1.1 or above \
             (use version=v3 or greater)",
        ));
    }
    if opts.version < 3 && opts.lazy_refcounts {
        return Err(invalid(
            "Lazy refcounts only supported with compatibility level 1.1 and above (use \
             version=v3 or greater)",
        ));
    }
    if opts.version < 3 && opts.compression_type != CompressionType::Zlib {
        return Err(invalid(
            "Non-zlib compression type is only supported with compatibility level 1.1 and \
             above (use version=v3 or greater)",
        ));
    }
    if let Some(name) = &opts.backing_file {
        if name.is_empty() {
            return Err(invalid("Backing file name must not be empty"));
        }
        if name.len() > MAX_BACKING_NAME as usize {
            return Err(invalid(format!(
                "Backing file name too long (at most {MAX_BACKING_NAME} bytes)"
            )));
        }
        if opts.preallocation != Preallocation::Off {
            return Err(invalid(
                "Backing file and preallocation can only be used at the same time if \
                 extended_l2 is on",
            ));
        }
        match &opts.backing_format {
            None => return Err(invalid("Backing file specified without backing format")),
            Some(f) => {
                if f.parse::<Format>().is_err() {
                    return Err(invalid(format!("Unknown driver '{f}'")));
                }
            }
        }
        if opts.size == 0 {
            return Err(invalid(
                "Image size must be given with a backing file (the size of the backing \
                 image is not known here; pass it as the size)",
            ));
        }
    } else if opts.backing_format.is_some() {
        return Err(invalid("Backing format specified without a backing file"));
    }
    round_size(opts.size)
}

/// Creates (or truncates) `path` as a qcow2 image. On failure a file this call created is
/// removed again (an existing one is left as it is: it may be a device node).
pub fn create(path: &Path, opts: &CreateOptions) -> Result<()> {
    let size = validate(opts)?;
    let layout = Layout::compute(opts, size)?;
    create_file(path, |file| write_image(file, opts, &layout))
}

/// Writes a new qcow2 image into `file` (fresh, reading as zeroes: an RBD image just
/// created), as [`create`] does into a file.
pub fn create_on(file: &dyn Storage, opts: &CreateOptions) -> Result<()> {
    let size = validate(opts)?;
    let layout = Layout::compute(opts, size)?;
    write_image(file, opts, &layout)
}

fn write_image(file: &dyn Storage, opts: &CreateOptions, l: &Layout) -> Result<()> {
    let cs = l.cs();
    let total = l.total_clusters();
    let data_off = l.data_start() * cs;
    let data_len = l.data_clusters * cs;

    // Size the file first, so that a file system that cannot hold it fails us early.
    match opts.preallocation {
        Preallocation::Off => {}
        Preallocation::Metadata | Preallocation::Full => file
            .set_size(total * cs)
            .map_err(io_ctx("extending the file"))?,
        Preallocation::Falloc => {
            file.set_size(total * cs)
                .map_err(io_ctx("extending the file"))?;
            if data_len > 0 {
                file.preallocate(data_off, data_len)
                    .map_err(io_ctx("allocating the data clusters (fallocate)"))?;
            }
        }
    }

    // Refcount table ("Host cluster management"): entry i points to refcount block i.
    let mut reftable = vec![0u8; (l.reftable_clusters * cs) as usize];
    for i in 0..l.refblocks {
        let off = (l.refblock_start() + i) * cs;
        reftable[(i * 8) as usize..(i * 8 + 8) as usize].copy_from_slice(&off.to_be_bytes());
    }
    file.write_at(&reftable, l.reftable_start() * cs)
        .map_err(io_ctx("writing the refcount table"))?;

    // Refcount blocks: every cluster below `total` has refcount 1.
    let per_block = (cs * 8) >> l.refcount_order;
    let mut block = vec![0u8; cs as usize];
    for i in 0..l.refblocks {
        block.fill(0);
        let first = i * per_block;
        let n = total.saturating_sub(first).min(per_block);
        for idx in 0..n as usize {
            refcount_set(&mut block, idx, l.refcount_order, 1);
        }
        file.write_at(&block, (l.refblock_start() + i) * cs)
            .map_err(io_ctx("writing a refcount block"))?;
    }

    let l1_off = l.l1_start() * cs;
    if opts.preallocation != Preallocation::Off {
        // "Cluster mapping": L1 entries point to the L2 tables, L2 entries to the data
        // clusters; bit 63 (COPIED) is set because every refcount is exactly one.
        let mut l1 = vec![0u8; (l.l1_entries * 8) as usize];
        for i in 0..l.l1_entries {
            let e = ((l.l2_start() + i) * cs) | L2E_COPIED;
            l1[(i * 8) as usize..(i * 8 + 8) as usize].copy_from_slice(&e.to_be_bytes());
        }
        file.write_at(&l1, l1_off)
            .map_err(io_ctx("writing the L1 table"))?;
        let l2_entries = cs / 8;
        let mut l2 = vec![0u8; cs as usize];
        for t in 0..l.l2_tables {
            l2.fill(0);
            for j in 0..l2_entries {
                let guest = t * l2_entries + j;
                if guest >= l.data_clusters {
                    break;
                }
                let e = ((l.data_start() + guest) * cs) | L2E_COPIED;
                l2[(j * 8) as usize..(j * 8 + 8) as usize].copy_from_slice(&e.to_be_bytes());
            }
            file.write_at(&l2, (l.l2_start() + t) * cs)
                .map_err(io_ctx("writing an L2 table"))?;
        }
        if opts.preallocation == Preallocation::Full && data_len > 0 {
            file.write_zeroes_by_writing(data_off, data_len)
                .map_err(io_ctx("writing zeroes to the data clusters"))?;
        }
    } else {
        // An empty L1 table: zeroes, which a sparse extension of the file provides. The
        // file ends right after it, as with qemu-img.
        file.set_size(l1_off + l.l1_entries * 8)
            .map_err(io_ctx("extending the file"))?;
    }

    // The header last: until it is written the file is not a qcow2 image.
    let mut h = Header::new(opts.version, l.cluster_bits, l.size, l.refcount_order);
    h.l1_size = l.l1_entries as u32;
    h.l1_table_offset = l1_off;
    h.refcount_table_offset = l.reftable_start() * cs;
    h.refcount_table_clusters = l.reftable_clusters as u32;
    if opts.lazy_refcounts {
        h.compatible_features |= compat::LAZY_REFCOUNTS;
    }
    // Header byte 104 and incompatible bit 3 ("Compression type bit").
    h.compression_type = opts.compression_type;
    if opts.compression_type != CompressionType::Zlib {
        h.incompatible_features |= incompat::COMPRESSION_TYPE;
    }
    h.backing_file = opts.backing_file.clone();
    h.backing_format = opts.backing_file.as_ref().and(opts.backing_format.clone());
    let hdr = h.serialize()?;
    file.write_at(&hdr, 0)
        .map_err(io_ctx("writing the header"))?;
    file.flush().map_err(io_ctx("flushing"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(size: u64) -> CreateOptions {
        CreateOptions {
            size,
            ..Default::default()
        }
    }

    #[test]
    fn layout_small_image_matches_qemu() {
        let o = opts(1 << 30);
        let l = Layout::compute(&o, 1 << 30).unwrap();
        assert_eq!(l.reftable_clusters, 1);
        assert_eq!(l.refblocks, 1);
        assert_eq!(l.l1_start(), 3);
        assert_eq!(l.l1_entries, 2);
    }

    #[test]
    fn layout_covers_itself() {
        for cs_bits in [9u32, 12, 16, 21] {
            for order in 0..=6u32 {
                for prealloc in [Preallocation::Off, Preallocation::Metadata] {
                    let o = CreateOptions {
                        size: 1 << 30,
                        cluster_size: 1 << cs_bits,
                        refcount_bits: 1 << order,
                        preallocation: prealloc,
                        ..Default::default()
                    };
                    let Ok(l) = Layout::compute(&o, o.size) else {
                        continue;
                    };
                    let per_block = ((1u64 << cs_bits) * 8) >> order;
                    assert!(l.refblocks * per_block >= l.total_clusters());
                    assert!(l.reftable_clusters * (1 << cs_bits) / 8 >= l.refblocks);
                }
            }
        }
    }

    #[test]
    fn validation_messages() {
        let bad = |o: CreateOptions| match validate(&o) {
            Err(Error::InvalidArgument(m)) => m,
            r => panic!("accepted: {r:?}"),
        };
        assert!(bad(CreateOptions {
            cluster_size: 1000,
            ..opts(1)
        })
        .contains("power of two between 512"));
        assert!(bad(CreateOptions {
            refcount_bits: 3,
            ..opts(1)
        })
        .contains("Refcount width"));
        assert!(bad(CreateOptions {
            version: 2,
            refcount_bits: 8,
            ..opts(1)
        })
        .contains("1.1"));
        assert!(bad(CreateOptions {
            backing_file: Some("b".into()),
            backing_format: Some("qcow2".into()),
            ..opts(0)
        })
        .contains("size"));
        assert_eq!(validate(&opts(1000)).unwrap(), 1024);
        assert_eq!(validate(&opts(0)).unwrap(), 0);
    }
}
