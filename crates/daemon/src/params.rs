//! The toolstack's description of a disk, from its backend directory.
//!
//! What libxl writes for a `qdisk` vbd (tools/libs/light/libxl_disk.c, and the Xen lab's
//! notes): `params` = `<format>:<path>` where the format is
//! `libxl__device_disk_string_of_format` (`aio` for raw, `qcow2`, `qcow`, `vhd`, `qed`), `mode`
//! `w` or `r`, `discard-enable` `0`/`1`, `direct-io-safe` `0`/`1` (only written when set),
//! `device-type` `disk` or `cdrom`, plus `frontend`, `frontend-id`, `online`, `state`, `dev`,
//! `type`, `removable`, `bootable`. QEMU's xen-block reads the same nodes: `aio` means raw,
//! `vhd` means its `vpc` driver, a path without a known prefix is probed, and `direct-io-safe`
//! chooses `cache.direct`. Unlike QEMU, a probed image never opens a backing file (xdisk-image
//! refuses it, naming the fix `params=qcow2:<path>`): the first bytes of a raw disk are the
//! guest's to write, and a qcow2 header there would name any host file as backing file.
//!
//! The backend directory is writable only by the backend domain and the toolstack, so these
//! values are not guest-controlled; they are still parsed strictly (a mistake must fail one
//! device with a clear `error` node, not do something surprising).

use std::path::PathBuf;

use xdisk_image::{CacheMode, Format};

/// Longest `params` accepted (Linux PATH_MAX plus a format prefix).
pub const MAX_PARAMS_LEN: usize = 4096 + 16;

/// A backend node that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParamsError {
    /// A node the disk cannot do without is absent (the only such node is `params`).
    #[error("node {0} is missing")]
    Missing(&'static str),
    /// A node's value cannot be used.
    #[error("node {node}: invalid value {value:?} ({why})")]
    Invalid {
        /// The node, relative to the backend directory (`mode`, `params`, ...).
        node: &'static str,
        /// Its value, cut to 80 characters.
        value: String,
        /// What is wrong with it.
        why: String,
    },
    /// A well-formed disk that xdisk does not serve (VHD, qcow or qed images, a `params` of
    /// blktap or blkback, an empty CD-ROM drive); the message says what to do instead.
    #[error("{0}")]
    Unsupported(String),
}

/// The device type (`device-type` node).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceType {
    /// `disk` (also when the node is absent).
    Disk,
    /// `cdrom`: served read-only, and removable (`VDISK_REMOVABLE` in `info`).
    Cdrom,
}

impl DeviceType {
    /// The node's value: `disk` or `cdrom`.
    pub fn as_str(self) -> &'static str {
        match self {
            DeviceType::Disk => "disk",
            DeviceType::Cdrom => "cdrom",
        }
    }
}

/// How a disk is to be opened and served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskSpec {
    /// The image (an absolute path, an NBD URI or an RBD name).
    pub path: PathBuf,
    /// The format; `None`: probe (a plain path in `params`).
    pub format: Option<Format>,
    /// The format as written in `params` (`aio`, `raw`, `qcow2`, or empty when probed).
    pub format_tag: String,
    /// Serve read-only (`mode` `r`, or a CD-ROM).
    pub read_only: bool,
    /// Offer discard (`discard-enable`, default on).
    pub discard: bool,
    /// Host cache mode (`direct-io-safe` 1: `none`, else `writeback`; or the daemon's
    /// override).
    pub cache: CacheMode,
    /// Whether `direct-io-safe` was 1.
    pub direct_io_safe: bool,
    /// The `device-type` node.
    pub device_type: DeviceType,
    /// Backing files must lie in one of these directories (empty: anywhere allowed by
    /// xdisk-image's rules); from the daemon's `--backing-dirs`.
    pub backing_dirs: Vec<PathBuf>,
}

impl DiskSpec {
    /// The image as logs, status and metrics show it: a path as is, a storage name with its
    /// secrets (an RBD `key=`) hidden.
    pub fn shown(&self) -> String {
        let name = self.path.to_string_lossy();
        if is_rbd_name(&name) || is_nbd_url(&name) {
            if let Ok(src) = xdisk_image::DiskSource::parse(&name, None) {
                return src.to_string();
            }
        }
        self.path.display().to_string()
    }
}

/// Daemon-wide defaults that apply to every disk.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ParamsDefaults {
    /// Use this cache mode whatever `direct-io-safe` says.
    pub cache_override: Option<CacheMode>,
    /// Backing files must lie in one of these directories (`xdisk serve --backing-dirs`).
    pub backing_dirs: Vec<PathBuf>,
}

/// The environment variable that confines backing files where no command-line flag can be
/// given: `xdisk qemu-shim` is started by libxl with QEMU's command line, so its policy comes
/// from here (the wrapper `dist/xen/xdisk-qemu-shim` reads it from `/etc/default/xdisk`).
pub const BACKING_DIRS_ENV: &str = "XDISK_BACKING_DIRS";

/// A comma-separated list of directories (`--backing-dirs`, [`BACKING_DIRS_ENV`]); empty
/// items are skipped.
pub fn parse_dir_list(s: &str) -> Vec<PathBuf> {
    s.split(',')
        .map(str::trim)
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .collect()
}

fn invalid(node: &'static str, value: &str, why: impl Into<String>) -> ParamsError {
    let mut v: String = value.chars().take(80).collect();
    if value.chars().count() > 80 {
        v.push('…');
    }
    ParamsError::Invalid {
        node,
        value: v,
        why: why.into(),
    }
}

fn parse_flag(node: &'static str, v: Option<String>, default: bool) -> Result<bool, ParamsError> {
    match v.as_deref() {
        None => Ok(default),
        Some("0") => Ok(false),
        Some("1") => Ok(true),
        Some(other) => Err(invalid(node, other, "expected 0 or 1")),
    }
}

/// Splits `params` into the format and the path, as libxl writes it and QEMU reads it.
pub fn parse_params(params: &str) -> Result<(Option<Format>, String, PathBuf), ParamsError> {
    const NODE: &str = "params";
    if params.len() > MAX_PARAMS_LEN {
        return Err(invalid(NODE, params, "too long"));
    }
    if params.chars().any(|c| c.is_control()) {
        return Err(invalid(NODE, params, "control characters"));
    }
    if params.is_empty() {
        return Err(ParamsError::Unsupported(
            "params is empty: no medium (empty CD-ROM drives are not supported)".into(),
        ));
    }
    let (tag, path) = if params.starts_with('/') || is_nbd_url(params) || is_rbd_name(params) {
        ("", params)
    } else {
        match params.split_once(':') {
            Some(("", _)) => return Err(invalid(NODE, params, "empty format")),
            Some((tag, path)) => (tag, path),
            None => return Err(invalid(NODE, params, "not an absolute path")),
        }
    };
    let format = match tag {
        "" => None,
        "aio" | "raw" | "file" => Some(Format::Raw),
        "qcow2" => Some(Format::Qcow2),
        "vhd" | "vpc" => {
            return Err(ParamsError::Unsupported(format!(
                "VHD images are not supported ({params}); convert with \
                 `xdisk img convert -O qcow2` or `qemu-img convert -O qcow2`"
            )))
        }
        "qcow" | "qed" => {
            return Err(ParamsError::Unsupported(format!(
                "{tag} images are not supported ({params}); convert them to qcow2"
            )))
        }
        "tap" | "tap2" | "phy" => {
            return Err(ParamsError::Unsupported(format!(
                "params {params:?} is for another backend (blktap or blkback), not qdisk"
            )))
        }
        _ => return Err(invalid(NODE, params, format!("unknown format {tag:?}"))),
    };
    if path.is_empty() {
        return Err(ParamsError::Unsupported(format!(
            "params {params:?} names no image (empty CD-ROM drives are not supported)"
        )));
    }
    if !path.starts_with('/') && !is_nbd_url(path) && !is_rbd_name(path) {
        return Err(invalid(NODE, params, "the image path must be absolute"));
    }
    Ok((format, tag.to_owned(), PathBuf::from(path)))
}

/// An NBD export in URI form (`nbd://`, `nbd+unix://`, `nbd+tcp://`, and the TLS spellings
/// that the client then refuses clearly); the image opens it through `DiskSource::parse`.
/// QEMU's legacy `nbd:HOST:PORT` is not taken here (it reads like a format tag).
pub fn is_nbd_url(s: &str) -> bool {
    [
        "nbd://",
        "nbd+unix://",
        "nbd+tcp://",
        "nbds://",
        "nbds+unix://",
        "nbds+tcp://",
    ]
    .iter()
    .any(|p| s.starts_with(p))
}

/// A Ceph RBD image as QEMU names it (`rbd:POOL/IMAGE[@SNAP][:KEY=VALUE...]`): libxl writes
/// `params=aio:rbd:pool/img` for `format=raw,target=rbd:pool/img` and `qcow2:rbd:...` for a
/// qcow2 image stored in RBD; the image opens it through `DiskSource::parse`. A bare
/// `rbd:...` (no format) is probed, like a bare path.
pub fn is_rbd_name(s: &str) -> bool {
    s.starts_with("rbd:")
}

/// Reads a disk's nodes through `read` (key relative to the backend directory; `None` when
/// the node does not exist).
pub fn parse(
    read: impl Fn(&'static str) -> Option<String>,
    defaults: &ParamsDefaults,
) -> Result<DiskSpec, ParamsError> {
    let params = read("params").ok_or(ParamsError::Missing("params"))?;
    let (format, format_tag, path) = parse_params(&params)?;
    let device_type = match read("device-type").as_deref() {
        None | Some("disk") => DeviceType::Disk,
        Some("cdrom") => DeviceType::Cdrom,
        Some(other) => return Err(invalid("device-type", other, "expected disk or cdrom")),
    };
    let read_only = match read("mode").as_deref() {
        None | Some("w") => false,
        Some("r") => true,
        Some(other) => return Err(invalid("mode", other, "expected r or w")),
    } || device_type == DeviceType::Cdrom;
    let discard = parse_flag("discard-enable", read("discard-enable"), true)?;
    let direct_io_safe = parse_flag("direct-io-safe", read("direct-io-safe"), false)?;
    let cache = defaults.cache_override.unwrap_or(if direct_io_safe {
        CacheMode::None
    } else {
        CacheMode::WriteBack
    });
    Ok(DiskSpec {
        path,
        format,
        format_tag,
        read_only,
        discard,
        cache,
        direct_io_safe,
        device_type,
        backing_dirs: defaults.backing_dirs.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backing_dir_lists_skip_empty_items() {
        assert_eq!(
            parse_dir_list(" /var/lib/xen/images,,/srv/a ,"),
            vec![
                PathBuf::from("/var/lib/xen/images"),
                PathBuf::from("/srv/a")
            ]
        );
        assert!(parse_dir_list("").is_empty());
    }
    use std::collections::HashMap;

    fn spec(nodes: &[(&'static str, &str)]) -> Result<DiskSpec, ParamsError> {
        let m: HashMap<&str, String> = nodes.iter().map(|(k, v)| (*k, v.to_string())).collect();
        parse(|k| m.get(k).cloned(), &ParamsDefaults::default())
    }

    #[test]
    fn libxl_formats() {
        let s = spec(&[("params", "qcow2:/var/lib/xen/a.qcow2"), ("mode", "w")]).unwrap();
        assert_eq!(s.format, Some(Format::Qcow2));
        assert_eq!(s.path, PathBuf::from("/var/lib/xen/a.qcow2"));
        assert!(!s.read_only && s.discard && !s.direct_io_safe);
        assert_eq!(s.cache, CacheMode::WriteBack);
        let s = spec(&[("params", "aio:nbd+unix:///x?socket=/run/x.sock")]).unwrap();
        assert_eq!(s.path, PathBuf::from("nbd+unix:///x?socket=/run/x.sock"));
        assert_eq!(s.format, Some(Format::Raw));
        let s = spec(&[("params", "qcow2:nbd://host/x")]).unwrap();
        assert_eq!(
            (s.path, s.format),
            (PathBuf::from("nbd://host/x"), Some(Format::Qcow2))
        );
        let s = spec(&[("params", "nbd://host:10810/x")]).unwrap();
        assert_eq!(
            (s.path, s.format),
            (PathBuf::from("nbd://host:10810/x"), None)
        );
        // What libxl writes for format=raw|qcow2,backendtype=qdisk,target=rbd:pool/img.
        let s = spec(&[("params", "aio:rbd:pool/img:id=xen:conf=/etc/ceph/ceph.conf")]).unwrap();
        assert_eq!(
            (s.path, s.format),
            (
                PathBuf::from("rbd:pool/img:id=xen:conf=/etc/ceph/ceph.conf"),
                Some(Format::Raw)
            )
        );
        let s = spec(&[("params", "qcow2:rbd:pool/ns/img")]).unwrap();
        assert_eq!(
            (s.path, s.format),
            (PathBuf::from("rbd:pool/ns/img"), Some(Format::Qcow2))
        );
        let s = spec(&[("params", "rbd:pool/img")]).unwrap();
        assert_eq!((s.path, s.format), (PathBuf::from("rbd:pool/img"), None));
        let s = spec(&[("params", "aio:/tmp/disk2.raw")]).unwrap();
        assert_eq!(s.format, Some(Format::Raw));
        assert_eq!(s.format_tag, "aio");
        let s = spec(&[("params", "raw:/x")]).unwrap();
        assert_eq!(s.format, Some(Format::Raw));
        let s = spec(&[("params", "/images/a:b.img")]).unwrap();
        assert_eq!(s.format, None, "plain paths are probed");
        assert_eq!(s.path, PathBuf::from("/images/a:b.img"));
        // Only the first colon separates the format.
        let s = spec(&[("params", "qcow2:/images/x:y.qcow2")]).unwrap();
        assert_eq!(s.path, PathBuf::from("/images/x:y.qcow2"));
    }

    #[test]
    fn flags() {
        let s = spec(&[
            ("params", "aio:/a"),
            ("mode", "r"),
            ("discard-enable", "0"),
            ("direct-io-safe", "1"),
        ])
        .unwrap();
        assert!(s.read_only && !s.discard && s.direct_io_safe);
        assert_eq!(s.cache, CacheMode::None);
        let s = spec(&[
            ("params", "aio:/a"),
            ("device-type", "cdrom"),
            ("mode", "w"),
        ])
        .unwrap();
        assert!(s.read_only, "a CD-ROM is read-only");
        assert_eq!(s.device_type, DeviceType::Cdrom);
        let m: HashMap<&str, String> = [("params", "aio:/a".to_string())].into();
        let s = parse(
            |k| m.get(k).cloned(),
            &ParamsDefaults {
                cache_override: Some(CacheMode::DirectSync),
                backing_dirs: vec![PathBuf::from("/images")],
            },
        )
        .unwrap();
        assert_eq!(s.cache, CacheMode::DirectSync);
        assert_eq!(s.backing_dirs, vec![PathBuf::from("/images")]);
    }

    #[test]
    fn refused_clearly() {
        let e = spec(&[("params", "vhd:/a.vhd")]).unwrap_err();
        assert!(
            e.to_string().contains("VHD images are not supported"),
            "{e}"
        );
        let e = spec(&[("params", "qcow:/a")]).unwrap_err();
        assert!(e.to_string().contains("not supported"), "{e}");
        assert_eq!(spec(&[]).unwrap_err(), ParamsError::Missing("params"));
        assert!(matches!(
            spec(&[("params", "")]).unwrap_err(),
            ParamsError::Unsupported(_)
        ));
        assert!(matches!(
            spec(&[("params", "aio:")]).unwrap_err(),
            ParamsError::Unsupported(_)
        ));
    }

    #[test]
    fn hostile_values() {
        let bad: &[&[(&'static str, &str)]] = &[
            &[("params", "relative/path.img")],
            &[("params", "aio:relative.img")],
            &[("params", "qcow2:../../etc/shadow")],
            &[("params", "nbd:/x")],
            &[("params", ":/x")],
            &[("params", "aio:/a\nb")],
            &[("params", "aio:/a\0b")],
            &[("params", "\u{1b}[31m/x")],
            &[("params", "aio:/a"), ("mode", "rw")],
            &[("params", "aio:/a"), ("mode", "w!")],
            &[("params", "aio:/a"), ("mode", "")],
            &[("params", "aio:/a"), ("discard-enable", "yes")],
            &[("params", "aio:/a"), ("discard-enable", "01")],
            &[("params", "aio:/a"), ("direct-io-safe", "-1")],
            &[("params", "aio:/a"), ("device-type", "floppy")],
        ];
        for nodes in bad {
            assert!(spec(nodes).is_err(), "{nodes:?} accepted");
        }
        let long = format!("aio:/{}", "a".repeat(MAX_PARAMS_LEN));
        let e = spec(&[("params", &long)]).unwrap_err();
        assert!(e.to_string().len() < 300, "error messages stay short: {e}");
    }
}
