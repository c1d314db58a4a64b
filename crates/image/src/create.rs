//! Creating images: one entry point for every format, with qemu-img's options.

use std::path::Path;
use std::str::FromStr;

use crate::{Error, Format, Result};

/// Creates (or truncates) `path` as an image of `format` (qemu-img create).
pub fn create(path: &Path, format: Format, opts: &CreateOptions) -> Result<()> {
    match format {
        Format::Raw if opts.backing_file.is_some() => Err(Error::InvalidArgument(
            "raw images cannot have a backing file".into(),
        )),
        Format::Raw => crate::raw::create(path, opts.size, opts.preallocation),
        Format::Qcow2 => crate::qcow2::create::create(path, opts),
    }
}

/// Writes a new image of `format` into `storage` (a fresh, empty or zeroed one: an RBD image
/// just created), as [`create`] writes it into a file.
pub fn create_on(
    storage: &dyn xdisk_io::Storage,
    format: Format,
    opts: &CreateOptions,
) -> Result<()> {
    match format {
        Format::Raw if opts.backing_file.is_some() => Err(Error::InvalidArgument(
            "raw images cannot have a backing file".into(),
        )),
        Format::Raw => crate::raw::fill(storage, opts.size, opts.preallocation),
        Format::Qcow2 => crate::qcow2::create::create_on(storage, opts),
    }
}

/// Creates (or truncates) the host file `path` and lets `fill` write the image into it. On
/// failure a file this call created is removed again (an existing one is left as it is: it
/// may be a device node).
pub(crate) fn create_file(
    path: &Path,
    fill: impl FnOnce(&xdisk_io::ImageFile) -> Result<()>,
) -> Result<()> {
    let existed = path.symlink_metadata().is_ok();
    let file =
        xdisk_io::ImageFile::create(path, xdisk_io::CacheMode::WriteBack).map_err(Error::Engine)?;
    let res = fill(&file);
    if res.is_err() && !existed {
        drop(file);
        let _ = std::fs::remove_file(path);
    }
    res
}

/// Wraps an I/O error of image creation with what was being done.
pub(crate) fn io_ctx(what: &'static str) -> impl Fn(std::io::Error) -> Error {
    move |e| Error::io(format!("cannot create image: {what}"), e)
}

/// How much of the image to allocate up front (qemu-img's `preallocation=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Preallocation {
    /// Only the metadata qemu-img always writes (header, refcounts, L1).
    #[default]
    Off,
    /// All L2 tables and data clusters are allocated and refcounted; the file is extended
    /// (sparsely) to cover them.
    Metadata,
    /// Like `Metadata`, and the data clusters are allocated on the host (fallocate).
    Falloc,
    /// Like `Metadata`, and the data clusters are written with zeroes.
    Full,
}

impl Preallocation {
    /// The name as qemu-img spells it (`off`, `metadata`, `falloc`, `full`), also what
    /// `parse` accepts.
    pub fn as_str(self) -> &'static str {
        match self {
            Preallocation::Off => "off",
            Preallocation::Metadata => "metadata",
            Preallocation::Falloc => "falloc",
            Preallocation::Full => "full",
        }
    }
}

impl FromStr for Preallocation {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "off" => Preallocation::Off,
            "metadata" => Preallocation::Metadata,
            "falloc" => Preallocation::Falloc,
            "full" => Preallocation::Full,
            _ => {
                return Err(Error::InvalidArgument(format!(
                    "Invalid parameter '{s}' (preallocation: off, metadata, falloc, full)"
                )))
            }
        })
    }
}

impl std::fmt::Display for Preallocation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Options of [`create`], named after qemu-img's `-o` options (those a format does not have
/// are ignored by it: raw uses `size` and `preallocation`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateOptions {
    /// Virtual size in bytes; rounded up to a multiple of 512 like qemu-img does.
    pub size: u64,
    /// `cluster_size`: a power of two from 512 to 2 MiB.
    pub cluster_size: u64,
    /// 3 = `compat=1.1` (default), 2 = `compat=0.10`.
    pub version: u32,
    /// `refcount_bits`: a power of two from 1 to 64 (anything but 16 needs version 3).
    pub refcount_bits: u32,
    /// `backing_file`: the name written in the image, as is (a relative name is resolved
    /// against the image's directory when it is opened, see [`crate::resolve_backing`]).
    /// qcow2 only; needs `backing_format`, at most 1023 bytes.
    pub backing_file: Option<String>,
    /// Format of the backing file (recorded in the backing format header extension).
    pub backing_format: Option<String>,
    /// `preallocation`: how much to allocate up front (qcow2: not with a backing file; raw:
    /// `metadata` is refused).
    pub preallocation: Preallocation,
    /// `compression_type` of compressed clusters; `zstd` needs version 3.
    pub compression_type: crate::CompressionType,
    /// `lazy_refcounts`: set the qcow2 compatible feature bit, so refcount updates may be
    /// deferred while the image is marked dirty; needs version 3.
    pub lazy_refcounts: bool,
    /// Options of the RBD image made for an image on RBD (object size, features, data
    /// pool, striping); refused for other destinations.
    pub rbd: xdisk_rbd::CreateOptions,
}

impl Default for CreateOptions {
    fn default() -> Self {
        CreateOptions {
            size: 0,
            cluster_size: 65536,
            version: 3,
            refcount_bits: 16,
            backing_file: None,
            backing_format: None,
            preallocation: Preallocation::Off,
            compression_type: crate::CompressionType::Zlib,
            lazy_refcounts: false,
            rbd: xdisk_rbd::CreateOptions::default(),
        }
    }
}

/// Rounds a size up to a multiple of 512 the way qemu-img does, refusing what it refuses.
pub(crate) fn round_size(size: u64) -> Result<u64> {
    if size > i64::MAX as u64 {
        return Err(Error::InvalidArgument(
            "Invalid image size specified. Must be between 0 and 9223372036854775807.".into(),
        ));
    }
    Ok(size.div_ceil(512) * 512)
}
