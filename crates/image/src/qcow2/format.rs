//! qcow2 on-disk format: header, header extensions, table entries, snapshot table.
//!
//! Everything here follows QEMU's `docs/interop/qcow2.txt`; section names in comments refer to
//! it. All integers on disk are big-endian. Parsing treats the file as hostile: every field is
//! range-checked before anything is allocated from it.

use crate::{Error, Result};

/// The magic of header bytes 0-3: `QFI\xfb`.
pub const MAGIC: u32 = 0x5146_49fb; // "QFI\xfb"

/// Smallest `cluster_bits` the spec allows (512-byte clusters).
pub const MIN_CLUSTER_BITS: u32 = 9;
/// Largest `cluster_bits` QEMU supports (2 MiB clusters).
pub const MAX_CLUSTER_BITS: u32 = 21;
/// QEMU refuses L1 tables larger than 32 MiB (QCOW_MAX_L1_SIZE).
pub const MAX_L1_BYTES: u64 = 32 << 20;
/// QEMU refuses refcount tables larger than 8 MiB (QCOW_MAX_REFTABLE_SIZE).
pub const MAX_REFTABLE_BYTES: u64 = 8 << 20;
/// QEMU's limit on the backing file name (1023 bytes).
pub const MAX_BACKING_NAME: u32 = 1023;
/// QEMU's limit on the number of internal snapshots (QCOW_MAX_SNAPSHOTS).
pub const MAX_SNAPSHOTS: u32 = 65536;
/// QEMU's limit on the virtual size (QCOW_MAX_IMAGE_SIZE... 2^61 is the largest offset a
/// 64-bit L1/L2 walk can express with 512-byte clusters; we use QEMU's INT64_MAX-bound).
pub const MAX_VIRTUAL_SIZE: u64 = 1 << 61;
/// Header extensions are read only from the first cluster; we bound their total size anyway.
pub const MAX_EXTENSION_BYTES: u32 = 1 << 21;

/// Incompatible feature bits ("Header", bytes 72-79).
pub mod incompat {
    /// Bit 0, dirty bit: refcounts may be inconsistent (lazy refcounts, unclean shutdown);
    /// they must be rebuilt from the L1/L2 tables before the image is trusted.
    pub const DIRTY: u64 = 1 << 0;
    /// Bit 1, corrupt bit: any data structure may be corrupt; the image must not be written
    /// to, except to repair it.
    pub const CORRUPT: u64 = 1 << 1;
    /// Bit 2, external data file: guest data lives in another file, named by the
    /// [`super::ext::DATA_FILE`] extension (refused by this engine).
    pub const EXTERNAL_DATA_FILE: u64 = 1 << 2;
    /// Bit 3, compression type: header byte 104 holds a compression type other than zlib.
    pub const COMPRESSION_TYPE: u64 = 1 << 3;
    /// Bit 4, extended L2 entries: 128-bit L2 entries with subcluster bitmaps (refused by
    /// this engine).
    pub const EXTENDED_L2: u64 = 1 << 4;
    /// The bits this implementation understands.
    pub const KNOWN: u64 = DIRTY | CORRUPT | EXTERNAL_DATA_FILE | COMPRESSION_TYPE | EXTENDED_L2;
}

/// Compatible feature bits (bytes 80-87).
pub mod compat {
    /// Bit 0, lazy refcounts: refcount updates may be postponed while the image is marked
    /// [`super::incompat::DIRTY`].
    pub const LAZY_REFCOUNTS: u64 = 1 << 0;
}

/// Autoclear feature bits (bytes 88-95).
pub mod autoclear {
    /// Bit 0: the data of the [`super::ext::BITMAPS`] extension is consistent.
    pub const BITMAPS: u64 = 1 << 0;
    /// Bit 1, raw external data: the external data file is a consistent raw image by itself.
    pub const DATA_FILE_RAW: u64 = 1 << 1;
}

/// Header extension types ("Header extensions").
pub mod ext {
    /// End of the header extension area.
    pub const END: u32 = 0;
    /// Backing file format name string (`raw`, `qcow2`, ...).
    pub const BACKING_FORMAT: u32 = 0xe279_2aca;
    /// Feature name table: names of feature bits, for messages.
    pub const FEATURE_TABLE: u32 = 0x6803_f857;
    /// Bitmaps extension (persistent dirty bitmaps).
    pub const BITMAPS: u32 = 0x2385_2875;
    /// Full disk encryption header pointer.
    pub const CRYPTO: u32 = 0x0537_be77;
    /// External data file name string.
    pub const DATA_FILE: u32 = 0x4441_5441;
}

/// L1 entry: bits 9-55 L2 table offset, bit 63 "refcount is exactly one" (COPIED).
pub const L1E_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Reserved bits of an L1 entry: 0-8 and 56-62 (must be zero).
pub const L1E_RESERVED_MASK: u64 = 0x7f00_0000_0000_01ff;
/// L2 entry flags ("Cluster mapping").
pub const L2E_COPIED: u64 = 1 << 63;
/// Bit 62: the entry is a compressed cluster descriptor.
pub const L2E_COMPRESSED: u64 = 1 << 62;
/// Bit 0 of a standard entry (v3): the cluster reads as zeroes.
pub const L2E_ZERO: u64 = 1;
/// Bits 9-55 of a standard entry: the host cluster offset (0: unallocated).
pub const L2E_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Reserved bits of a standard (uncompressed) L2 entry: 1-8 and 56-61.
pub const L2E_STD_RESERVED_MASK: u64 = 0x3f00_0000_0000_01fe;
/// Refcount table entry: bits 9-63 refcount block offset, 0-8 reserved.
pub const REFT_OFFSET_MASK: u64 = 0xffff_ffff_ffff_fe00;
/// Reserved bits of a refcount table entry: 0-8 (must be zero).
pub const REFT_RESERVED_MASK: u64 = 0x1ff;

/// Compression method of compressed clusters (header byte 104).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompressionType {
    /// 0: zlib/deflate (raw deflate stream, no zlib header); the only type of version 2
    /// images and the default.
    Zlib,
    /// 1: zstd; sets [`incompat::COMPRESSION_TYPE`].
    Zstd,
}

impl CompressionType {
    /// The name as qemu-img spells it (`zlib`, `zstd`).
    pub fn as_str(self) -> &'static str {
        match self {
            CompressionType::Zlib => "zlib",
            CompressionType::Zstd => "zstd",
        }
    }
}

/// The parsed qcow2 header plus its extensions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Bytes 4-7: 2 or 3 (the only versions accepted).
    pub version: u32,
    /// Bytes 8-15: file offset of the backing file name (0: none).
    pub backing_file_offset: u64,
    /// Bytes 16-19: length of the backing file name in bytes (at most
    /// [`MAX_BACKING_NAME`]).
    pub backing_file_size: u32,
    /// Bytes 20-23: the cluster size is `1 << cluster_bits` bytes
    /// ([`MIN_CLUSTER_BITS`]..=[`MAX_CLUSTER_BITS`]).
    pub cluster_bits: u32,
    /// Bytes 24-31: virtual disk size in bytes.
    pub size: u64,
    /// Bytes 32-35: 0 unencrypted, 1 AES, 2 LUKS; only 0 is accepted.
    pub crypt_method: u32,
    /// Bytes 36-39: number of entries of the active L1 table.
    pub l1_size: u32,
    /// Bytes 40-47: file offset of the active L1 table (cluster-aligned).
    pub l1_table_offset: u64,
    /// Bytes 48-55: file offset of the refcount table (cluster-aligned).
    pub refcount_table_offset: u64,
    /// Bytes 56-59: size of the refcount table in clusters.
    pub refcount_table_clusters: u32,
    /// Bytes 60-63: number of internal snapshots.
    pub nb_snapshots: u32,
    /// Bytes 64-71: file offset of the snapshot table (cluster-aligned).
    pub snapshots_offset: u64,
    /// Bytes 72-79 (v3; 0 for v2): the [`incompat`] bits; an image with a bit set that the
    /// reader does not know must not be opened.
    pub incompatible_features: u64,
    /// Bytes 80-87 (v3; 0 for v2): the [`compat`] bits; unknown ones may be ignored.
    pub compatible_features: u64,
    /// Bytes 88-95 (v3; 0 for v2): the [`autoclear`] bits; a writer that does not know a
    /// bit clears it.
    pub autoclear_features: u64,
    /// Bytes 96-99 (v3; 4 for v2): refcounts are `1 << refcount_order` bits wide (at most 6).
    pub refcount_order: u32,
    /// Bytes 100-103 (v3; 72 for v2): length of the header in bytes, extensions excluded.
    pub header_length: u32,
    /// Byte 104 (v3 headers longer than 104 bytes; zlib otherwise).
    pub compression_type: CompressionType,
    /// The backing file name (read from backing_file_offset).
    pub backing_file: Option<String>,
    /// The backing format extension ("raw", "qcow2", ...).
    pub backing_format: Option<String>,
    /// Feature name table entries: (type 0/1/2, bit, name).
    pub feature_names: Vec<(u8, u8, String)>,
    /// Extensions we do not interpret, kept verbatim so a rewrite of the header preserves them.
    pub unknown_extensions: Vec<(u32, Vec<u8>)>,
    /// External data file name, if the extension is present.
    pub data_file: Option<String>,
    /// Whether a bitmaps extension is present (kept in `unknown_extensions`; see the
    /// `bitmap` module for when it counts).
    pub has_bitmaps: bool,
}

fn be32(b: &[u8], off: usize) -> u32 {
    u32::from_be_bytes(b[off..off + 4].try_into().expect("4 bytes"))
}
fn be64(b: &[u8], off: usize) -> u64 {
    u64::from_be_bytes(b[off..off + 8].try_into().expect("8 bytes"))
}

fn corrupt(msg: impl Into<String>) -> Error {
    Error::Corrupt(msg.into())
}

impl Header {
    /// Bytes of the fixed header for this version (72 for v2, header_length for v3).
    pub fn fixed_len(&self) -> u32 {
        if self.version == 2 {
            72
        } else {
            self.header_length
        }
    }
    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }
    /// Width of a refcount in bits (1 to 64).
    pub fn refcount_bits(&self) -> u32 {
        1 << self.refcount_order
    }
    /// L2 entries per L2 table.
    pub fn l2_entries(&self) -> u64 {
        self.cluster_size() / 8
    }
    /// Refcount entries per refcount block.
    pub fn refcount_block_entries(&self) -> u64 {
        (self.cluster_size() * 8) >> self.refcount_order
    }
    /// Whether the [`incompat::DIRTY`] bit is set (refcounts need a rebuild).
    pub fn is_dirty(&self) -> bool {
        self.incompatible_features & incompat::DIRTY != 0
    }
    /// Whether the [`compat::LAZY_REFCOUNTS`] bit is set.
    pub fn lazy_refcounts(&self) -> bool {
        self.compatible_features & compat::LAZY_REFCOUNTS != 0
    }
    /// Number of L1 entries needed for `size` bytes with these cluster parameters.
    pub fn l1_entries_for(size: u64, cluster_bits: u32) -> u64 {
        let l2_span = 1u64 << (cluster_bits + cluster_bits - 3);
        size.div_ceil(l2_span)
    }

    /// Parses and validates the header from the first bytes of the file (at least the first
    /// cluster, or the whole file if shorter). `file_len` bounds every offset.
    ///
    /// Images with features we cannot serve (encryption, extended L2, external data files,
    /// unknown incompatible bits) are refused with [`Error::Unsupported`]; malformed ones with
    /// [`Error::Corrupt`].
    pub fn parse(buf: &[u8], file_len: u64) -> Result<Header> {
        if buf.len() < 72 {
            return Err(corrupt(format!(
                "file too short for a qcow2 header ({} bytes)",
                buf.len()
            )));
        }
        if be32(buf, 0) != MAGIC {
            return Err(corrupt("bad qcow2 magic"));
        }
        let version = be32(buf, 4);
        if version != 2 && version != 3 {
            return Err(Error::Unsupported(format!("qcow2 version {version}")));
        }
        let cluster_bits = be32(buf, 20);
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
            return Err(corrupt(format!(
                "cluster_bits {cluster_bits} out of range {MIN_CLUSTER_BITS}..={MAX_CLUSTER_BITS}"
            )));
        }
        let cluster_size = 1u64 << cluster_bits;
        let mut h = Header {
            version,
            backing_file_offset: be64(buf, 8),
            backing_file_size: be32(buf, 16),
            cluster_bits,
            size: be64(buf, 24),
            crypt_method: be32(buf, 32),
            l1_size: be32(buf, 36),
            l1_table_offset: be64(buf, 40),
            refcount_table_offset: be64(buf, 48),
            refcount_table_clusters: be32(buf, 56),
            nb_snapshots: be32(buf, 60),
            snapshots_offset: be64(buf, 64),
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: 72,
            compression_type: CompressionType::Zlib,
            backing_file: None,
            backing_format: None,
            feature_names: Vec::new(),
            unknown_extensions: Vec::new(),
            data_file: None,
            has_bitmaps: false,
        };
        if version == 3 {
            if buf.len() < 104 {
                return Err(corrupt("file too short for a qcow2 v3 header"));
            }
            h.incompatible_features = be64(buf, 72);
            h.compatible_features = be64(buf, 80);
            h.autoclear_features = be64(buf, 88);
            h.refcount_order = be32(buf, 96);
            h.header_length = be32(buf, 100);
            if h.header_length < 104 || !h.header_length.is_multiple_of(8) && h.header_length != 104
            {
                return Err(corrupt(format!(
                    "header_length {} invalid",
                    h.header_length
                )));
            }
            if u64::from(h.header_length) > cluster_size || h.header_length as usize > buf.len() {
                return Err(corrupt(format!(
                    "header_length {} larger than the first cluster",
                    h.header_length
                )));
            }
            if h.refcount_order > 6 {
                return Err(corrupt(format!("refcount_order {} > 6", h.refcount_order)));
            }
            if h.header_length > 104 {
                h.compression_type = match buf[104] {
                    0 => CompressionType::Zlib,
                    1 => CompressionType::Zstd,
                    t => return Err(Error::Unsupported(format!("compression type {t}"))),
                };
            }
            if h.incompatible_features & incompat::COMPRESSION_TYPE == 0
                && h.compression_type != CompressionType::Zlib
            {
                return Err(corrupt(
                    "compression type set without the compression-type feature bit",
                ));
            }
        }
        if h.crypt_method != 0 {
            return Err(Error::Unsupported(
                "encrypted qcow2 images are not supported".into(),
            ));
        }
        let unknown = h.incompatible_features & !incompat::KNOWN;
        if unknown != 0 {
            return Err(Error::Unsupported(format!(
                "unknown incompatible qcow2 features {unknown:#x}"
            )));
        }
        if h.incompatible_features & incompat::EXTENDED_L2 != 0 {
            return Err(Error::Unsupported(
                "qcow2 extended L2 entries (extended_l2=on) are not supported".into(),
            ));
        }
        if h.incompatible_features & incompat::EXTERNAL_DATA_FILE != 0 {
            return Err(Error::Unsupported(
                "qcow2 external data files (data_file=...) are not supported".into(),
            ));
        }
        if h.size > MAX_VIRTUAL_SIZE {
            return Err(corrupt(format!("virtual size {} too large", h.size)));
        }
        // L1 table (section "Cluster mapping").
        let need_l1 = Self::l1_entries_for(h.size, cluster_bits);
        if u64::from(h.l1_size) < need_l1 {
            return Err(corrupt(format!(
                "L1 table too small: {} entries for a virtual size needing {need_l1}",
                h.l1_size
            )));
        }
        if u64::from(h.l1_size) * 8 > MAX_L1_BYTES {
            return Err(corrupt(format!(
                "L1 table too large ({} entries)",
                h.l1_size
            )));
        }
        check_table(
            "L1 table",
            h.l1_table_offset,
            u64::from(h.l1_size) * 8,
            cluster_size,
            file_len,
            h.l1_size == 0,
        )?;
        // Refcount table.
        let reft_bytes = u64::from(h.refcount_table_clusters) * cluster_size;
        if h.refcount_table_clusters == 0 {
            return Err(corrupt("refcount table has no clusters"));
        }
        if reft_bytes > MAX_REFTABLE_BYTES {
            return Err(corrupt(format!(
                "refcount table too large ({} clusters)",
                h.refcount_table_clusters
            )));
        }
        check_table(
            "refcount table",
            h.refcount_table_offset,
            reft_bytes,
            cluster_size,
            file_len,
            false,
        )?;
        // Snapshot table.
        if h.nb_snapshots > MAX_SNAPSHOTS {
            return Err(corrupt(format!("too many snapshots ({})", h.nb_snapshots)));
        }
        if h.nb_snapshots > 0 {
            check_table(
                "snapshot table",
                h.snapshots_offset,
                u64::from(h.nb_snapshots) * 40,
                cluster_size,
                file_len,
                false,
            )?;
        }
        // Backing file name: stored in the first cluster by QEMU, anywhere by the spec.
        if h.backing_file_offset != 0 {
            if h.backing_file_size == 0 || h.backing_file_size > MAX_BACKING_NAME {
                return Err(corrupt(format!(
                    "backing file name length {} invalid",
                    h.backing_file_size
                )));
            }
            let start = h.backing_file_offset;
            let end = start
                .checked_add(u64::from(h.backing_file_size))
                .ok_or_else(|| corrupt("backing file name offset overflows"))?;
            if end > buf.len() as u64 {
                return Err(corrupt(
                    "backing file name lies outside the first cluster of the image",
                ));
            }
            let name = &buf[start as usize..end as usize];
            h.backing_file = Some(
                String::from_utf8(name.to_vec())
                    .map_err(|_| corrupt("backing file name is not UTF-8"))?,
            );
        }
        h.parse_extensions(buf)?;
        if h.data_file.is_some() && h.incompatible_features & incompat::EXTERNAL_DATA_FILE == 0 {
            // An orphaned data-file extension is harmless; QEMU ignores it too.
            h.data_file = None;
        }
        Ok(h)
    }

    /// Header extensions start right after the fixed header and end with type 0
    /// (section "Header extensions"). They must lie inside the first cluster buffer and
    /// before the backing file name if there is one.
    fn parse_extensions(&mut self, buf: &[u8]) -> Result<()> {
        let mut off = self.fixed_len() as usize;
        let mut limit = buf.len().min(self.cluster_size() as usize);
        if self.backing_file_offset != 0 {
            limit = limit.min(self.backing_file_offset as usize);
        }
        let mut total = 0u32;
        loop {
            if off + 8 > limit {
                // QEMU tolerates a missing end marker when the header fills the cluster.
                return Ok(());
            }
            let ty = be32(buf, off);
            let len = be32(buf, off + 4);
            off += 8;
            if ty == ext::END {
                return Ok(());
            }
            total = total.saturating_add(len);
            if total > MAX_EXTENSION_BYTES || off + len as usize > limit {
                return Err(corrupt(format!(
                    "header extension {ty:#x} of {len} bytes overruns the header"
                )));
            }
            let data = &buf[off..off + len as usize];
            match ty {
                ext::BACKING_FORMAT => {
                    self.backing_format = Some(
                        String::from_utf8(data.to_vec())
                            .map_err(|_| corrupt("backing format is not UTF-8"))?,
                    );
                }
                ext::FEATURE_TABLE => {
                    for e in data.chunks_exact(48) {
                        let name_end = e[2..].iter().position(|&c| c == 0).unwrap_or(46);
                        let name = String::from_utf8_lossy(&e[2..2 + name_end]).into_owned();
                        self.feature_names.push((e[0], e[1], name));
                    }
                }
                ext::DATA_FILE => {
                    self.data_file = Some(String::from_utf8_lossy(data).into_owned());
                }
                ext::CRYPTO => {
                    return Err(Error::Unsupported(
                        "encrypted qcow2 images (LUKS) are not supported".into(),
                    ));
                }
                ext::BITMAPS => {
                    self.has_bitmaps = true;
                    self.unknown_extensions.push((ty, data.to_vec()));
                }
                _ => self.unknown_extensions.push((ty, data.to_vec())),
            }
            off += (len as usize).next_multiple_of(8);
        }
    }

    /// Serialises the header, its extensions and the backing file name into one buffer of
    /// `cluster_size` bytes (QEMU keeps all of it in the first cluster). Sets
    /// `backing_file_offset/size` to where the name lands. Fails if it does not fit.
    pub fn serialize(&mut self) -> Result<Vec<u8>> {
        let cs = self.cluster_size() as usize;
        let mut b = vec![0u8; cs];
        let fixed = self.fixed_len() as usize;
        // Extensions first, to know where the backing name goes.
        let mut exts: Vec<u8> = Vec::new();
        let mut push = |ty: u32, data: &[u8]| {
            exts.extend_from_slice(&ty.to_be_bytes());
            exts.extend_from_slice(&(data.len() as u32).to_be_bytes());
            exts.extend_from_slice(data);
            exts.resize(exts.len().next_multiple_of(8), 0);
        };
        if let Some(fmt) = &self.backing_format {
            push(ext::BACKING_FORMAT, fmt.as_bytes());
        }
        if self.version == 3 {
            let table = feature_table();
            push(ext::FEATURE_TABLE, &table);
        }
        for (ty, data) in &self.unknown_extensions {
            push(*ty, data);
        }
        push(ext::END, &[]);
        let name = self.backing_file.clone().unwrap_or_default();
        let name_off = fixed + exts.len();
        if name_off + name.len() > cs {
            return Err(Error::InvalidArgument(
                "header, extensions and backing file name do not fit in the first cluster".into(),
            ));
        }
        if name.len() > MAX_BACKING_NAME as usize {
            return Err(Error::InvalidArgument("backing file name too long".into()));
        }
        if name.is_empty() {
            self.backing_file_offset = 0;
            self.backing_file_size = 0;
        } else {
            self.backing_file_offset = name_off as u64;
            self.backing_file_size = name.len() as u32;
        }
        b[0..4].copy_from_slice(&MAGIC.to_be_bytes());
        b[4..8].copy_from_slice(&self.version.to_be_bytes());
        b[8..16].copy_from_slice(&self.backing_file_offset.to_be_bytes());
        b[16..20].copy_from_slice(&self.backing_file_size.to_be_bytes());
        b[20..24].copy_from_slice(&self.cluster_bits.to_be_bytes());
        b[24..32].copy_from_slice(&self.size.to_be_bytes());
        b[32..36].copy_from_slice(&self.crypt_method.to_be_bytes());
        b[36..40].copy_from_slice(&self.l1_size.to_be_bytes());
        b[40..48].copy_from_slice(&self.l1_table_offset.to_be_bytes());
        b[48..56].copy_from_slice(&self.refcount_table_offset.to_be_bytes());
        b[56..60].copy_from_slice(&self.refcount_table_clusters.to_be_bytes());
        b[60..64].copy_from_slice(&self.nb_snapshots.to_be_bytes());
        b[64..72].copy_from_slice(&self.snapshots_offset.to_be_bytes());
        if self.version == 3 {
            b[72..80].copy_from_slice(&self.incompatible_features.to_be_bytes());
            b[80..88].copy_from_slice(&self.compatible_features.to_be_bytes());
            b[88..96].copy_from_slice(&self.autoclear_features.to_be_bytes());
            b[96..100].copy_from_slice(&self.refcount_order.to_be_bytes());
            b[100..104].copy_from_slice(&self.header_length.to_be_bytes());
            if self.header_length > 104 {
                b[104] = match self.compression_type {
                    CompressionType::Zlib => 0,
                    CompressionType::Zstd => 1,
                };
            }
        }
        b[fixed..fixed + exts.len()].copy_from_slice(&exts);
        b[name_off..name_off + name.len()].copy_from_slice(name.as_bytes());
        Ok(b)
    }

    /// A fresh v3 (or v2) header with QEMU's defaults for the fields not given.
    pub fn new(version: u32, cluster_bits: u32, size: u64, refcount_order: u32) -> Header {
        Header {
            version,
            backing_file_offset: 0,
            backing_file_size: 0,
            cluster_bits,
            size,
            crypt_method: 0,
            l1_size: Self::l1_entries_for(size, cluster_bits) as u32,
            l1_table_offset: 0,
            refcount_table_offset: 0,
            refcount_table_clusters: 0,
            nb_snapshots: 0,
            snapshots_offset: 0,
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order,
            header_length: if version == 3 { 112 } else { 72 },
            compression_type: CompressionType::Zlib,
            backing_file: None,
            backing_format: None,
            feature_names: Vec::new(),
            unknown_extensions: Vec::new(),
            data_file: None,
            has_bitmaps: false,
        }
    }
}

/// File offset of the data of header extension `ty` in the header cluster `head` (as
/// [`Header::parse`] walks the extensions), if the header has it.
pub fn extension_offset(head: &[u8], hdr: &Header, ty: u32) -> Option<usize> {
    let mut off = hdr.fixed_len() as usize;
    let mut limit = head.len().min(hdr.cluster_size() as usize);
    if hdr.backing_file_offset != 0 {
        limit = limit.min(usize::try_from(hdr.backing_file_offset).unwrap_or(usize::MAX));
    }
    while off + 8 <= limit {
        let t = be32(head, off);
        let len = be32(head, off + 4) as usize;
        if t == ext::END {
            return None;
        }
        if t == ty {
            return (off + 8 + len <= limit).then_some(off + 8);
        }
        off = off.checked_add(8 + len.next_multiple_of(8))?;
    }
    None
}

/// The feature name table QEMU writes for v3 images (names as QEMU spells them).
fn feature_table() -> Vec<u8> {
    let entries: [(u8, u8, &str); 7] = [
        (0, 0, "dirty bit"),
        (0, 1, "corrupt bit"),
        (0, 2, "external data file"),
        (0, 3, "compression type"),
        (0, 4, "extended L2 entries"),
        (1, 0, "lazy refcounts"),
        (2, 0, "bitmaps"),
    ];
    let mut v = Vec::with_capacity(entries.len() * 48);
    for (ty, bit, name) in entries {
        let mut e = [0u8; 48];
        e[0] = ty;
        e[1] = bit;
        e[2..2 + name.len()].copy_from_slice(name.as_bytes());
        v.extend_from_slice(&e);
    }
    v
}

/// Checks that a table lies at a cluster-aligned offset and inside the file.
fn check_table(
    what: &str,
    offset: u64,
    bytes: u64,
    cluster_size: u64,
    file_len: u64,
    may_be_empty: bool,
) -> Result<()> {
    if may_be_empty && bytes == 0 {
        return Ok(());
    }
    if offset == 0 || !offset.is_multiple_of(cluster_size) {
        return Err(corrupt(format!(
            "{what} offset {offset:#x} is not cluster-aligned"
        )));
    }
    let end = offset
        .checked_add(bytes)
        .ok_or_else(|| corrupt(format!("{what} offset overflows")))?;
    if end > file_len {
        return Err(corrupt(format!(
            "{what} at {offset:#x}+{bytes:#x} lies past the end of the file ({file_len:#x})"
        )));
    }
    Ok(())
}

/// A decoded L2 entry (section "Cluster mapping"). Reserved bits set are reported as
/// `Corrupt` by [`L2Entry::decode`]'s caller when it validates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum L2Entry {
    /// Not allocated in this image: read from the backing file (or zeroes).
    Unallocated,
    /// Reads as zeroes (v3 zero flag). `prealloc` is a host cluster kept allocated, if any.
    Zero {
        /// Byte offset of the preallocated host cluster, if any.
        prealloc: Option<u64>,
        /// The COPIED flag (bit 63): the host cluster's refcount is exactly one.
        copied: bool,
    },
    /// Data at a host cluster offset.
    Normal {
        /// Byte offset of the host cluster (cluster-aligned).
        host: u64,
        /// The COPIED flag (bit 63): the refcount is exactly one, so the cluster may be
        /// written in place (no copy-on-write).
        copied: bool,
    },
    /// Compressed data: `host` is the byte offset of the stream, `len` its maximum length.
    Compressed {
        /// Byte offset of the compressed stream in the file (not aligned).
        host: u64,
        /// Bytes from `host` to the end of the last 512-byte sector the entry covers (the
        /// stream may be shorter).
        len: u64,
    },
}

impl L2Entry {
    /// Decodes a raw L2 entry. `cluster_bits` is needed for the compressed layout.
    pub fn decode(raw: u64, cluster_bits: u32) -> Result<L2Entry> {
        if raw & L2E_COMPRESSED != 0 {
            // x = 62 - (cluster_bits - 8); bits 0..x-1 offset, x..61 additional sectors.
            let x = 62 - (cluster_bits - 8);
            let offset_mask = (1u64 << x) - 1;
            let host = raw & offset_mask;
            let sectors = (raw & !(L2E_COMPRESSED | L2E_COPIED)) >> x;
            let len = (sectors + 1) * 512 - (host & 511);
            if raw & L2E_COPIED != 0 {
                return Err(corrupt(format!(
                    "compressed L2 entry {raw:#x} has the COPIED flag"
                )));
            }
            return Ok(L2Entry::Compressed { host, len });
        }
        let copied = raw & L2E_COPIED != 0;
        let host = raw & L2E_OFFSET_MASK;
        if raw & L2E_STD_RESERVED_MASK != 0 {
            return Err(corrupt(format!("L2 entry {raw:#x} has reserved bits set")));
        }
        if raw & L2E_ZERO != 0 {
            return Ok(L2Entry::Zero {
                prealloc: (host != 0).then_some(host),
                copied,
            });
        }
        if host == 0 {
            // An unallocated entry may carry no flags at all.
            return Ok(L2Entry::Unallocated);
        }
        if host & ((1u64 << cluster_bits) - 1) != 0 {
            return Err(corrupt(format!(
                "L2 entry {raw:#x} points to an unaligned cluster"
            )));
        }
        Ok(L2Entry::Normal { host, copied })
    }

    /// Encodes a standard entry.
    pub fn encode(self, cluster_bits: u32) -> u64 {
        match self {
            L2Entry::Unallocated => 0,
            L2Entry::Zero { prealloc, copied } => {
                prealloc.unwrap_or(0) | L2E_ZERO | if copied { L2E_COPIED } else { 0 }
            }
            L2Entry::Normal { host, copied } => host | if copied { L2E_COPIED } else { 0 },
            L2Entry::Compressed { host, len } => {
                let x = 62 - (cluster_bits - 8);
                let end = host + len;
                let sectors = end.div_ceil(512) - host / 512 - 1;
                L2E_COMPRESSED | (sectors << x) | host
            }
        }
    }
}

/// One internal snapshot as listed by `qemu-img snapshot -l` / `info`
/// (section "Snapshots").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// File offset of the snapshot's L1 table.
    pub l1_table_offset: u64,
    /// Number of entries of the snapshot's L1 table.
    pub l1_size: u32,
    /// Unique ID string.
    pub id: String,
    /// Name of the snapshot.
    pub name: String,
    /// When it was taken, seconds since the epoch.
    pub date_sec: u32,
    /// Nanoseconds part of the creation time.
    pub date_nsec: u32,
    /// How long the guest had run when it was taken, in nanoseconds.
    pub vm_clock_nsec: u64,
    /// Size of the saved VM state in bytes (0: none); the 64-bit field of the extra data
    /// when present, else the 32-bit one.
    pub vm_state_size: u64,
    /// Virtual disk size at the time of the snapshot (extra data, if present).
    pub disk_size: Option<u64>,
}

/// Parses the snapshot table (`nb` entries starting at the buffer's start). The buffer is
/// what was read from snapshots_offset; entries that overrun it are `Corrupt`.
pub fn parse_snapshots(
    buf: &[u8],
    nb: u32,
    cluster_bits: u32,
    file_len: u64,
) -> Result<Vec<Snapshot>> {
    let mut out = Vec::with_capacity(nb.min(1024) as usize);
    let mut off = 0usize;
    for i in 0..nb {
        if off + 40 > buf.len() {
            return Err(corrupt(format!("snapshot table entry {i} truncated")));
        }
        let l1_table_offset = be64(buf, off);
        let l1_size = be32(buf, off + 8);
        let id_len = u16::from_be_bytes([buf[off + 12], buf[off + 13]]) as usize;
        let name_len = u16::from_be_bytes([buf[off + 14], buf[off + 15]]) as usize;
        let date_sec = be32(buf, off + 16);
        let date_nsec = be32(buf, off + 20);
        let vm_clock_nsec = be64(buf, off + 24);
        let vm_state_size32 = be32(buf, off + 32);
        let extra_len = be32(buf, off + 36) as usize;
        if extra_len > 1024 {
            return Err(corrupt(format!("snapshot {i} extra data too large")));
        }
        let extra_start = off + 40;
        let id_start = extra_start + extra_len;
        let name_start = id_start + id_len;
        let end = name_start + name_len;
        if end > buf.len() {
            return Err(corrupt(format!("snapshot table entry {i} truncated")));
        }
        let extra = &buf[extra_start..id_start];
        let vm_state_size = if extra.len() >= 8 {
            be64(extra, 0)
        } else {
            u64::from(vm_state_size32)
        };
        let disk_size = (extra.len() >= 16).then(|| be64(extra, 8));
        if u64::from(l1_size) * 8 > MAX_L1_BYTES {
            return Err(corrupt(format!("snapshot {i} L1 table too large")));
        }
        check_table(
            "snapshot L1 table",
            l1_table_offset,
            u64::from(l1_size) * 8,
            1 << cluster_bits,
            file_len,
            l1_size == 0,
        )?;
        out.push(Snapshot {
            l1_table_offset,
            l1_size,
            id: String::from_utf8_lossy(&buf[id_start..name_start]).into_owned(),
            name: String::from_utf8_lossy(&buf[name_start..end]).into_owned(),
            date_sec,
            date_nsec,
            vm_clock_nsec,
            vm_state_size,
            disk_size,
        });
        off = end.next_multiple_of(8);
    }
    Ok(out)
}

/// Length in bytes of a snapshot table of `nb` entries at the start of `buf` (each entry is
/// padded to a multiple of 8, section "Snapshots"); `None` if the buffer ends first.
pub fn snapshot_table_len(buf: &[u8], nb: u32) -> Option<usize> {
    let mut off = 0usize;
    for _ in 0..nb {
        if off.checked_add(40)? > buf.len() {
            return None;
        }
        let id_len = u16::from_be_bytes([buf[off + 12], buf[off + 13]]) as usize;
        let name_len = u16::from_be_bytes([buf[off + 14], buf[off + 15]]) as usize;
        let extra_len = be32(buf, off + 36) as usize;
        let end = off + 40 + extra_len + id_len + name_len;
        if end > buf.len() {
            return None;
        }
        off = end.next_multiple_of(8);
    }
    Some(off)
}

/// Reads refcount entry `idx` of a refcount block with `1 << order`-bit entries
/// (section "Refcounts": big-endian for widths of 8 bits and more; narrower entries are packed
/// into bytes starting at the least significant bit).
pub fn refcount_get(block: &[u8], idx: usize, order: u32) -> u64 {
    match order {
        0..=2 => {
            let bits = 1usize << order;
            let per_byte = 8 / bits;
            let byte = block[idx / per_byte];
            let shift = (idx % per_byte) * bits;
            u64::from((byte >> shift) & ((1u16 << bits) - 1) as u8)
        }
        3 => u64::from(block[idx]),
        4 => u64::from(u16::from_be_bytes([block[2 * idx], block[2 * idx + 1]])),
        5 => u64::from(be32(block, 4 * idx)),
        _ => be64(block, 8 * idx),
    }
}

/// Writes refcount entry `idx`; `value` must fit in `1 << order` bits (see [`refcount_max`]).
pub fn refcount_set(block: &mut [u8], idx: usize, order: u32, value: u64) {
    debug_assert!(value <= refcount_max(order));
    match order {
        0..=2 => {
            let bits = 1usize << order;
            let per_byte = 8 / bits;
            let shift = (idx % per_byte) * bits;
            let mask = (((1u16 << bits) - 1) as u8) << shift;
            let b = &mut block[idx / per_byte];
            *b = (*b & !mask) | (((value as u8) << shift) & mask);
        }
        3 => block[idx] = value as u8,
        4 => block[2 * idx..2 * idx + 2].copy_from_slice(&(value as u16).to_be_bytes()),
        5 => block[4 * idx..4 * idx + 4].copy_from_slice(&(value as u32).to_be_bytes()),
        _ => block[8 * idx..8 * idx + 8].copy_from_slice(&value.to_be_bytes()),
    }
}

/// The largest refcount an entry of `1 << order` bits holds.
pub fn refcount_max(order: u32) -> u64 {
    if order >= 6 {
        u64::MAX
    } else {
        (1u64 << (1u32 << order)) - 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Header {
        let mut h = Header::new(3, 16, 1 << 30, 4);
        h.l1_table_offset = 3 << 16;
        h.refcount_table_offset = 1 << 16;
        h.refcount_table_clusters = 1;
        h
    }

    #[test]
    fn header_roundtrip_v3_with_backing() {
        let mut h = sample();
        h.backing_file = Some("base.qcow2".into());
        h.backing_format = Some("qcow2".into());
        h.unknown_extensions.push((0x1234_5678, vec![1, 2, 3]));
        let b = h.serialize().unwrap();
        let mut p = Header::parse(&b, 1 << 20).unwrap();
        p.feature_names.clear();
        assert_eq!(p, h);
    }

    #[test]
    fn header_roundtrip_v2() {
        let mut h = sample();
        h.version = 2;
        h.header_length = 72;
        let b = h.serialize().unwrap();
        let p = Header::parse(&b, 1 << 20).unwrap();
        assert_eq!(p.version, 2);
        assert_eq!(p.refcount_order, 4);
        assert_eq!(p.size, 1 << 30);
    }

    #[test]
    fn hostile_headers_are_refused_not_panicking() {
        let mut h = sample();
        let good = h.serialize().unwrap();
        let cases: Vec<(usize, Vec<u8>)> = vec![
            (20, 40u32.to_be_bytes().to_vec()),        // cluster_bits
            (20, 8u32.to_be_bytes().to_vec()),         // cluster_bits too small
            (24, u64::MAX.to_be_bytes().to_vec()),     // size
            (36, 0u32.to_be_bytes().to_vec()),         // l1_size too small
            (40, 0x1234u64.to_be_bytes().to_vec()),    // unaligned L1
            (40, (!0xffffu64).to_be_bytes().to_vec()), // L1 past the end / overflow
            (48, (1u64 << 40).to_be_bytes().to_vec()), // reftable past end
            (56, u32::MAX.to_be_bytes().to_vec()),     // reftable clusters huge
            (60, u32::MAX.to_be_bytes().to_vec()),     // snapshots
            (96, 7u32.to_be_bytes().to_vec()),         // refcount_order
            (100, 4096u32.to_be_bytes().to_vec()),     // header_length > buffer ok? < cluster
            (100, 0u32.to_be_bytes().to_vec()),        // header_length too small
            (72, (1u64 << 40).to_be_bytes().to_vec()), // unknown incompatible bit
            (8, 60000u64.to_be_bytes().to_vec()),      // backing name offset with size 0
            (32, 1u32.to_be_bytes().to_vec()),         // encryption
        ];
        for (off, bytes) in cases {
            let mut b = good.clone();
            b[off..off + bytes.len()].copy_from_slice(&bytes);
            // Must not panic; most must fail.
            let _ = Header::parse(&b, 1 << 20);
        }
        assert!(Header::parse(&good[..50], 1 << 20).is_err());
        assert!(Header::parse(&good, 100).is_err(), "tables past EOF");
    }

    #[test]
    fn refcount_entries_every_width() {
        for order in 0..=6u32 {
            let mut block = vec![0u8; 512];
            let n = (512 * 8) >> order;
            let max = refcount_max(order);
            for i in 0..n {
                refcount_set(&mut block, i, order, (i as u64 * 7 + 3) & max);
            }
            for i in 0..n {
                assert_eq!(
                    refcount_get(&block, i, order),
                    (i as u64 * 7 + 3) & max,
                    "order {order} idx {i}"
                );
            }
        }
        // Sub-byte packing starts at the least significant bit.
        let mut b = [0u8; 1];
        refcount_set(&mut b, 0, 0, 1);
        assert_eq!(b[0], 1);
        refcount_set(&mut b, 1, 1, 1);
        assert_eq!(b[0], 0b0000_0101 & 0b1111_1101 | 0b100);
    }

    #[test]
    fn l2_entry_roundtrip() {
        for cb in [9u32, 12, 16, 21] {
            let host = 5u64 << cb;
            for e in [
                L2Entry::Unallocated,
                L2Entry::Normal { host, copied: true },
                L2Entry::Normal {
                    host,
                    copied: false,
                },
                L2Entry::Zero {
                    prealloc: None,
                    copied: false,
                },
                L2Entry::Zero {
                    prealloc: Some(host),
                    copied: true,
                },
                L2Entry::Compressed {
                    host: 123_456,
                    len: 300,
                },
            ] {
                let raw = e.encode(cb);
                let d = L2Entry::decode(raw, cb).unwrap();
                match (e, d) {
                    (
                        L2Entry::Compressed { host: h1, len: l1 },
                        L2Entry::Compressed { host: h2, len: l2 },
                    ) => {
                        assert_eq!(h1, h2);
                        assert!(
                            l2 >= l1,
                            "decoded length covers the stream: cb {cb} {l1} {l2} raw {raw:#x}"
                        );
                    }
                    _ => assert_eq!(e, d),
                }
            }
        }
        assert!(L2Entry::decode(1 << 56, 16).is_err());
        assert!(L2Entry::decode(0x1200, 16).is_err(), "unaligned cluster");
    }
}
