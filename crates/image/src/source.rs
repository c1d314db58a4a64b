//! How a disk is named: one parsed [`DiskSource`] (where its bytes are, and its format if
//! given) used by every command that opens or creates an image (`img`, `bench`, `nbd`,
//! `serve`, `attach`), so that a new kind of storage (an `nbd://` export, an `rbd:` image)
//! plugs in here, once.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use xdisk_io::{CacheMode, ImageFile, StorageRef};
use xdisk_nbd_client::{ClientConfig, NbdStorage, NbdUri, Transport};
use xdisk_rbd::{RbdName, RbdStorage};

use crate::{BackingRefusal, CreateOptions, Error, Format, Image, OpenOptions, Result};

/// Where a disk's bytes live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// A host file or block device.
    Path(PathBuf),
    /// An export of an NBD server (`nbd://`, `nbd+unix://`, QEMU's `nbd:HOST:PORT`).
    Nbd(NbdUri),
    /// A Ceph RBD image (`rbd:POOL/[NAMESPACE/]IMAGE[@SNAP][:KEY=VALUE...]`).
    Rbd(RbdName),
}

/// An RBD error as the image crate's: missing images and pools stay ENOENT, etc.
fn rbd_error(e: xdisk_rbd::Error) -> Error {
    match e {
        xdisk_rbd::Error::Name { .. }
        | xdisk_rbd::Error::Encryption { .. }
        | xdisk_rbd::Error::Encrypted { .. } => Error::InvalidArgument(e.to_string()),
        xdisk_rbd::Error::Rados { what, source } => Error::io(what, source),
        e => {
            let os = e.os_error().unwrap_or(libc::EIO);
            Error::io(e.to_string(), std::io::Error::from_raw_os_error(os))
        }
    }
}

/// Why a qcow2 image is refused in an RBD image with librbd's encryption: qcow2 has an
/// encryption of its own (QEMU's `encrypt.format` of qcow2, which xdisk does not implement,
/// and which is what `qemu-img create -f qcow2 -o encrypt.*` asks for), and QEMU 7.2 cannot
/// create one either; librbd's encryption holds raw images.
fn encrypted_qcow2(n: &RbdName) -> Error {
    Error::Unsupported(format!(
        "{n}: librbd's encryption (encrypt.format) holds raw images only; a qcow2 image in an encrypted RBD image is not supported (qcow2 has an encryption of its own, which xdisk does not implement)"
    ))
}

/// A disk as named by a user or a toolstack: its location and, if given, its format.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskSource {
    /// Where the bytes are.
    pub location: Location,
    /// The format, if given (`None`: probed, and then no backing file is opened).
    pub format: Option<Format>,
}

impl DiskSource {
    /// A host file or block device.
    pub fn path(path: impl Into<PathBuf>, format: Option<Format>) -> DiskSource {
        DiskSource {
            location: Location::Path(path.into()),
            format,
        }
    }

    /// Parses a disk name as commands take it: a path, or a storage name (NBD, RBD).
    pub fn parse(name: &str, format: Option<Format>) -> Result<DiskSource> {
        if name.is_empty() {
            return Err(Error::InvalidArgument("empty image name".into()));
        }
        if xdisk_nbd_client::is_nbd_uri(name) {
            let uri = NbdUri::parse(name).map_err(|e| match e {
                xdisk_nbd_client::Error::Tls(_) => Error::Unsupported(e.to_string()),
                e => Error::InvalidArgument(e.to_string()),
            })?;
            return Ok(DiskSource {
                location: Location::Nbd(uri),
                format,
            });
        }
        if xdisk_rbd::is_rbd_name(name) {
            let n = RbdName::parse(name).map_err(|e| {
                // Never echo a name that may hold a key: say where it went wrong only.
                Error::InvalidArgument(format!("bad RBD name: {e}"))
            })?;
            return Ok(DiskSource {
                location: Location::Rbd(n),
                format,
            });
        }
        Ok(DiskSource::path(name, format))
    }

    /// The same source with its relative paths made absolute against the current directory:
    /// a file's path, an NBD URI's unix socket. For a name handed to another process (`xdisk
    /// attach` writes it into xenstore for the daemon, which runs elsewhere). Nothing is
    /// resolved or opened: symbolic links stay, a missing file is not an error here.
    pub fn absolute(&self) -> Result<DiskSource> {
        let abs = |p: &Path| {
            std::path::absolute(p)
                .map_err(|e| Error::io(format!("cannot make {} absolute", p.display()), e))
        };
        let location = match &self.location {
            Location::Path(p) => Location::Path(abs(p)?),
            Location::Nbd(uri) => {
                let mut uri = uri.clone();
                if let Transport::Unix { path } = &mut uri.transport {
                    *path = abs(path)?;
                }
                Location::Nbd(uri)
            }
            Location::Rbd(n) => Location::Rbd(n.clone()),
        };
        Ok(DiskSource {
            location,
            format: self.format,
        })
    }

    /// The host path, for sources that are host files.
    pub fn local_path(&self) -> Option<&Path> {
        match &self.location {
            Location::Path(p) => Some(p),
            Location::Nbd(_) | Location::Rbd(_) => None,
        }
    }

    /// Opens the storage alone (no format), as `read_only` with `cache`.
    pub fn open_storage(&self, read_only: bool, cache: CacheMode) -> Result<StorageRef> {
        match &self.location {
            Location::Path(p) => Ok(Arc::new(
                ImageFile::open(p, read_only, cache).map_err(Error::Engine)?,
            )),
            Location::Nbd(uri) => {
                let cfg = ClientConfig {
                    read_only,
                    cache,
                    ..ClientConfig::default()
                };
                let s = NbdStorage::open(uri, &cfg).map_err(|e| {
                    Error::io(
                        format!("cannot open {uri}"),
                        std::io::Error::other(e.to_string()),
                    )
                })?;
                Ok(Arc::new(s))
            }
            Location::Rbd(n) => Ok(Arc::new(
                RbdStorage::open(n, read_only, cache).map_err(rbd_error)?,
            )),
        }
    }

    /// Creates the image (qemu-img create): a host file is created or truncated; an RBD
    /// image is created (`rbd create`, its size the virtual size for raw, grown as the
    /// qcow2 image grows for qcow2) and must not exist; NBD exports cannot be created.
    pub fn create(&self, format: Format, opts: &CreateOptions) -> Result<()> {
        if !opts.rbd.is_empty() && !matches!(self.location, Location::Rbd(_)) {
            return Err(Error::Unsupported(format!(
                "{}: only images on RBD take RBD options ({})",
                self,
                opts.rbd.describe()
            )));
        }
        match &self.location {
            Location::Path(p) => crate::create(p, format, opts),
            Location::Nbd(u) => Err(Error::Unsupported(format!(
                "cannot create an image on the NBD export {u}: write into it (convert -n)"
            ))),
            Location::Rbd(n) => {
                if n.encrypt.is_some() && format != Format::Raw {
                    return Err(encrypted_qcow2(n));
                }
                if opts.backing_file.is_some() {
                    return Err(Error::Unsupported(
                        "backing files of images on RBD are not supported yet".into(),
                    ));
                }
                let size = match format {
                    Format::Raw => crate::create::round_size(opts.size)?,
                    Format::Qcow2 => 0,
                };
                RbdStorage::create_with(n, size, &opts.rbd).map_err(rbd_error)?;
                let fill = || -> Result<()> {
                    let s = RbdStorage::open(n, false, CacheMode::WriteBack).map_err(rbd_error)?;
                    crate::create::create_on(&s, format, opts)
                };
                let r = fill();
                if r.is_err() {
                    // Leave nothing half made (as a file that create made is removed).
                    if let Err(e) = RbdStorage::remove(n) {
                        tracing::warn!("cannot remove {n} after a failed create: {e}");
                    }
                }
                r
            }
        }
    }

    /// Whether the image exists: a host path that exists, an RBD image that opens (read-only;
    /// a missing image or pool is `false`, any other error is returned); an NBD export always
    /// "exists" (it cannot be created, only written into).
    pub fn exists(&self) -> Result<bool> {
        match &self.location {
            Location::Path(p) => Ok(p.exists()),
            Location::Nbd(_) => Ok(true),
            Location::Rbd(n) => match RbdStorage::open(n, true, CacheMode::WriteBack) {
                Ok(_) => Ok(true),
                Err(e) if e.os_error() == Some(libc::ENOENT) => Ok(false),
                Err(e) => Err(rbd_error(e)),
            },
        }
    }

    /// Removes the image (a host file, an RBD image without snapshots), e.g. one that
    /// [`DiskSource::create`] made for an operation that then failed; an NBD export cannot
    /// be removed.
    pub fn remove(&self) -> Result<()> {
        match &self.location {
            Location::Path(p) => std::fs::remove_file(p)
                .map_err(|e| Error::io(format!("cannot remove {}", p.display()), e)),
            Location::Nbd(u) => Err(Error::Unsupported(format!(
                "cannot remove the NBD export {u}"
            ))),
            Location::Rbd(n) => RbdStorage::remove(n).map_err(rbd_error),
        }
    }

    /// Opens the image and its backing chain. The source's format, if given, wins over
    /// `opts.format`.
    pub fn open(&self, opts: &OpenOptions) -> Result<Arc<Image>> {
        let opts = self.options(opts);
        match &self.location {
            Location::Path(p) => Image::open(p, &opts),
            // A storage without a host path: a backing file it names must be an absolute
            // path or a URI (and a probed format never opens one, see Image::open).
            Location::Nbd(_) | Location::Rbd(_) => {
                let image = Image::open_on(self.open_storage(opts.read_only, opts.cache)?, &opts)?;
                self.check_encrypted_format(image.format())?;
                Ok(image)
            }
        }
    }

    /// Whether a new image made by [`DiskSource::create`] reads as zeroes where nothing was
    /// written, so that a copy into it may skip the source's zeroes. Not an RBD image with
    /// librbd's encryption: there the unwritten parts of an object written in part read as
    /// decrypted zeroes, i.e. noise (librbd 16), so every byte must be written.
    pub fn zero_initialized(&self) -> bool {
        !matches!(&self.location, Location::Rbd(n) if n.encrypt.is_some())
    }

    /// librbd's encryption holds raw images only (see [`encrypted_qcow2`]).
    fn check_encrypted_format(&self, format: Format) -> Result<()> {
        match &self.location {
            Location::Rbd(n) if n.encrypt.is_some() && format != Format::Raw => {
                Err(encrypted_qcow2(n))
            }
            _ => Ok(()),
        }
    }

    /// Opens the image and as much of its chain as can be (see
    /// [`Image::open_for_inspection`]).
    pub fn open_for_inspection(
        &self,
        opts: &OpenOptions,
    ) -> Result<(Arc<Image>, Option<BackingRefusal>)> {
        let opts = self.options(opts);
        match &self.location {
            Location::Path(p) => Image::open_for_inspection(p, &opts),
            Location::Nbd(_) | Location::Rbd(_) => {
                let (image, refusal) = Image::open_on_for_inspection(
                    self.open_storage(opts.read_only, opts.cache)?,
                    &opts,
                )?;
                self.check_encrypted_format(image.format())?;
                Ok((image, refusal))
            }
        }
    }

    fn options(&self, opts: &OpenOptions) -> OpenOptions {
        let mut o = opts.clone();
        if self.format.is_some() {
            o.format = self.format;
        }
        o
    }
}

impl fmt::Display for DiskSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.location {
            Location::Path(p) => write!(f, "{}", p.display()),
            Location::Nbd(u) => write!(f, "{u}"),
            // Secrets (key=) hidden.
            Location::Rbd(n) => write!(f, "{n}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_nbd_uris_and_rbd_names_parse() {
        let s = DiskSource::parse("/var/lib/xen/disk.qcow2", Some(Format::Qcow2)).unwrap();
        assert_eq!(s.local_path(), Some(Path::new("/var/lib/xen/disk.qcow2")));
        assert_eq!(s.to_string(), "/var/lib/xen/disk.qcow2");
        assert_eq!(
            DiskSource::parse("disk.raw", None).unwrap().local_path(),
            Some(Path::new("disk.raw"))
        );
        let s = DiskSource::parse("nbd+unix:///e?socket=/run/s.sock", Some(Format::Qcow2)).unwrap();
        assert!(matches!(s.location, Location::Nbd(_)));
        assert_eq!(s.local_path(), None);
        assert_eq!(s.to_string(), "nbd+unix:///e?socket=/run/s.sock");
        for uri in [
            "nbd://host/export",
            "nbd:host:10809:exportname=e",
            "nbd:unix:/s",
            "nbds://host/e",
        ] {
            let s = DiskSource::parse(uri, None).unwrap();
            assert!(matches!(s.location, Location::Nbd(_)), "{uri}");
        }
        let s =
            DiskSource::parse("rbd:pool/ns/img@snap:id=u:key=SECRET", Some(Format::Raw)).unwrap();
        let Location::Rbd(n) = &s.location else {
            panic!("rbd: {s:?}")
        };
        assert_eq!((n.pool.as_str(), n.image.as_str()), ("pool", "img"));
        assert_eq!(s.local_path(), None);
        assert_eq!(s.to_string(), "rbd:pool/ns/img@snap:id=u:key=<hidden>");
        let e = DiskSource::parse("rbd:pool:key=SECRET", None).unwrap_err();
        assert!(matches!(e, Error::InvalidArgument(_)), "rbd: {e}");
        assert!(!e.to_string().contains("SECRET"), "{e}");
        assert!(matches!(
            DiskSource::parse("nbd+unix:///e", None),
            Err(Error::InvalidArgument(_))
        ));
        assert!(DiskSource::parse("", None).is_err());
    }

    #[test]
    fn absolute_makes_file_and_socket_paths_absolute_and_keeps_the_rest() {
        let cwd = std::env::current_dir().unwrap();
        let s = DiskSource::parse("images/d.qcow2", Some(Format::Qcow2))
            .unwrap()
            .absolute()
            .unwrap();
        assert_eq!(s.local_path(), Some(cwd.join("images/d.qcow2").as_path()));
        assert_eq!(s.format, Some(Format::Qcow2));
        let s = DiskSource::parse("/a/b.raw", None).unwrap();
        assert_eq!(s.absolute().unwrap(), s);
        // QEMU's legacy spelling with a relative socket: a URI with an absolute one.
        let s = DiskSource::parse("nbd:unix:run/x.sock:exportname=e", None)
            .unwrap()
            .absolute()
            .unwrap();
        let Location::Nbd(uri) = &s.location else {
            panic!("{s:?}")
        };
        assert_eq!(
            uri.transport,
            Transport::Unix {
                path: cwd.join("run/x.sock")
            }
        );
        assert_eq!(uri.export, "e");
        assert!(s.to_string().starts_with("nbd+unix:///e?socket=/"), "{s}");
        assert_eq!(DiskSource::parse(&s.to_string(), None).unwrap(), s);
        let tcp = DiskSource::parse("nbd://host:10810/e", None).unwrap();
        assert_eq!(tcp.absolute().unwrap(), tcp);
    }
}
