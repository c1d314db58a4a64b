//! Local attach: a disk of the backend domain for the backend domain itself (dom0's own
//! `/dev/xvdX`), the way `xl block-attach 0 ...,backendtype=qdisk` writes it (see
//! `shared/xen-lab/README.md`, measured with QEMU's qdisk):
//!
//! ```text
//! B=/local/domain/0/backend/<type>/0/<devid>   F=/local/domain/0/device/vbd/<devid>
//! B: frontend=F frontend-id=0 online=1 removable=0 bootable=1 state=1 dev=xvdX type=<type>
//!    mode=w|r device-type=disk params=aio:/path|qcow2:/path|aio:nbd+unix:///e?socket=/s|...
//!    discard-enable=1 [direct-io-safe=1]
//! F: backend=B backend-id=0 state=1 virtual-device=<devid> device-type=disk
//! ```
//!
//! in one transaction; dom0's `xen-blkfront` sees the new `device/vbd/<devid>` and connects
//! to whichever backend serves `B` (the xdisk daemon). Detach is libxl's
//! `libxl__initiate_device_generic_remove`: `online` 0 and `state` Closing (5) in one
//! transaction, wait for the backend's Closed (6), then remove both directories and the
//! parents left empty (`libxl__xs_path_cleanup`).
//!
//! The frontend domain is a parameter so that the simulation (whose dom0 has no memory to
//! grant) can play it with a guest domain; on real Xen it is 0.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use xdisk_blkif::XenbusState;
use xdisk_image::{DiskSource, Format, Location};
use xdisk_xen::platform::DomId;
use xdisk_xen::xenstore::{Access, Client, Errno, Perm, Transaction};

use crate::devid;
use crate::error::{Error, Result};

/// How long `detach` waits for the backend to close (libxl's `LIBXL_DESTROY_TIMEOUT`).
pub const DETACH_TIMEOUT: Duration = Duration::from_secs(10);
/// How far `attach` looks for a free `xvd` name.
pub const MAX_AUTO_INDEX: u32 = 256;

/// What to attach.
#[derive(Debug, Clone)]
pub struct AttachOptions {
    /// The image: a host file or block device (its canonical path goes into `params` after
    /// the format, `aio:` for raw, `qcow2:`), an NBD export (its URI in the `nbd://` or
    /// `nbd+unix:///EXPORT?socket=PATH` spelling, the socket's path made absolute, goes
    /// there: `aio:nbd+unix:///...`), or an RBD image (its `rbd:` name, secrets included).
    pub image: Location,
    /// `None`: probed here, once, and written explicitly into `params`.
    pub format: Option<Format>,
    /// Serve it read-only: `mode` `r` (else `w`).
    pub read_only: bool,
    /// `None`: the first free `xvd` name.
    pub devid: Option<u32>,
    /// The backend type the daemon watches (`qdisk` or `xdisk`).
    pub backend_type: String,
    /// The domain whose backend serves the disk (`B` is under its `/local/domain/<be>`): the
    /// daemon's own, 0 on Xen.
    pub backend_domid: DomId,
    /// The domain that gets the disk (`F` is under its `/local/domain/<fe>`): 0 on Xen; on
    /// the simulation a guest standing in for dom0's blkfront.
    pub frontend_domid: DomId,
    /// Write `direct-io-safe` 1 (the daemon then opens the image with O_DIRECT).
    pub direct_io_safe: bool,
    /// `discard-enable`: 1 (the default) lets the backend offer discard to the frontend.
    pub discard: bool,
    /// Device numbers to skip when choosing one (e.g. because `/dev/xvdX` exists).
    pub skip: fn(&str) -> bool,
}

impl AttachOptions {
    /// Defaults for dom0 attaching the image file `image` to itself under `backend_type`.
    pub fn new(image: impl Into<PathBuf>, backend_type: impl Into<String>) -> AttachOptions {
        AttachOptions::of(Location::Path(image.into()), backend_type)
    }

    /// Defaults for dom0 attaching `image` (a file or an NBD export, as
    /// [`xdisk_image::DiskSource::parse`] names them) to itself under `backend_type`.
    pub fn of(image: Location, backend_type: impl Into<String>) -> AttachOptions {
        AttachOptions {
            image,
            format: None,
            read_only: false,
            devid: None,
            backend_type: backend_type.into(),
            backend_domid: 0,
            frontend_domid: 0,
            direct_io_safe: false,
            discard: true,
            skip: |_| false,
        }
    }
}

/// A locally attached disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attached {
    /// The virtual device number (`virtual-device`; 51712 is `xvda`).
    pub devid: u32,
    /// `xvdX`.
    pub vdev: Option<String>,
    /// The backend directory `B`: `/local/domain/<be>/backend/<type>/<fe>/<devid>`.
    pub backend_path: String,
    /// The frontend directory `F`: `/local/domain/<fe>/device/vbd/<devid>`.
    pub frontend_path: String,
    /// The domain the disk is attached to.
    pub frontend_domid: DomId,
}

/// `/local/domain/<fe>/device/vbd/<devid>`.
pub fn frontend_path(frontend_domid: DomId, devid: u32) -> String {
    format!("/local/domain/{frontend_domid}/device/vbd/{devid}")
}

/// `/local/domain/<be>/backend/<type>/<fe>/<devid>`.
pub fn backend_path(backend_domid: DomId, t: &str, frontend_domid: DomId, devid: u32) -> String {
    format!("/local/domain/{backend_domid}/backend/{t}/{frontend_domid}/{devid}")
}

fn xs_err(path: &str) -> impl FnOnce(xdisk_xen::xenstore::Error) -> Error + '_ {
    move |e| Error::xs(path, e)
}

fn exists(
    tx: &Transaction<'_>,
    path: &str,
) -> std::result::Result<bool, xdisk_xen::xenstore::Error> {
    match tx.read(path) {
        Ok(_) => Ok(true),
        Err(e) if e.errno() == Some(Errno::ENOENT) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Removes `path` and then each parent left empty, stopping at `/local/domain/<d>` (as
/// libxl's `libxl__xs_path_cleanup`).
pub(crate) fn rm_with_empty_parents(
    tx: &Transaction<'_>,
    path: &str,
) -> std::result::Result<(), xdisk_xen::xenstore::Error> {
    match tx.rm(path) {
        Ok(()) => {}
        Err(e) if e.errno() == Some(Errno::ENOENT) => {}
        Err(e) => return Err(e),
    }
    let mut p = Path::new(path);
    while let Some(parent) = p.parent() {
        let ps = parent.to_string_lossy();
        // Never above a domain's own directory.
        if ps.matches('/').count() <= 3 {
            break;
        }
        match tx.directory(&ps) {
            Ok(c) if c.is_empty() => tx.rm(&ps)?,
            _ => break,
        }
        p = parent;
    }
    Ok(())
}

/// What the image's first bytes say (format, backing file named), read through the image
/// engine's storage (a FIFO or socket put where the image should be is refused, not waited
/// on; an NBD export is connected to, read, and let go).
fn probe(source: &DiskSource) -> Result<xdisk_image::Probed> {
    let io = |e: xdisk_image::Error| Error::Invalid(format!("{source}: {e}"));
    let storage = source
        .open_storage(true, xdisk_image::CacheMode::WriteBack)
        .map_err(io)?;
    xdisk_image::probe(&*storage).map_err(io)
}

/// The image as `params` names it after the format, and the source to probe: a file's
/// canonical path (it must exist and not be a directory), or an NBD URI in the spelling the
/// daemon takes ([`crate::params::is_nbd_url`]), with an absolute socket path, or an RBD
/// name as given.
fn image_name(image: &Location) -> Result<(String, DiskSource)> {
    let source = match image {
        Location::Path(p) => {
            let image = std::fs::canonicalize(p)
                .map_err(|e| Error::io(format!("cannot open {}", p.display()), e))?;
            let meta = std::fs::metadata(&image)
                .map_err(|e| Error::io(format!("cannot open {}", image.display()), e))?;
            if meta.is_dir() {
                return Err(Error::Invalid(format!(
                    "{} is a directory",
                    image.display()
                )));
            }
            DiskSource::path(image, None)
        }
        Location::Nbd(_) | Location::Rbd(_) => DiskSource {
            location: image.clone(),
            format: None,
        }
        .absolute()
        .map_err(|e| Error::Invalid(e.to_string()))?,
    };
    let name = match &source.location {
        Location::Path(p) => p.to_str().map(str::to_owned),
        Location::Nbd(_) => Some(source.to_string()),
        // The whole name: its Display hides secrets (key=).
        Location::Rbd(n) => Some(n.to_spec()),
    }
    .filter(|s| !s.chars().any(|c| c.is_control()))
    .ok_or_else(|| Error::Invalid(format!("unusable image name {source}")))?;
    Ok((name, source))
}

/// Writes the backend and frontend nodes in one transaction; returns where.
pub fn write_nodes(xs: &Client, opts: &AttachOptions) -> Result<Attached> {
    let (image_str, source) = image_name(&opts.image)?;
    let format = match opts.format {
        Some(f) => f,
        // A probed image never opens a backing file (xdisk-image's rule): writing the probed
        // format into params would vouch for a header anybody (a guest of a raw disk) may
        // have written.
        None => match probe(&source)? {
            xdisk_image::Probed {
                names_backing_file: true,
                ..
            } => {
                return Err(Error::Invalid(format!(
                    "{source} is a qcow2 image naming a backing file: give --format qcow2 to \
                     attach it with its backing chain (a probed format never opens backing \
                     files)"
                )))
            }
            p => p.format,
        },
    };
    let params = match format {
        Format::Raw => format!("aio:{image_str}"),
        Format::Qcow2 => format!("qcow2:{image_str}"),
    };
    // What the daemon will read back: the same format and image, or nothing is written.
    match crate::params::parse_params(&params) {
        Ok((Some(f), _, p)) if f == format && p.as_os_str() == image_str.as_str() => {}
        Ok(_) => {
            return Err(Error::Invalid(format!(
                "{source}: this name would not read back from params {params:?}"
            )))
        }
        Err(e) => return Err(Error::Invalid(format!("{source}: {e}"))),
    }
    if let Some(d) = opts.devid {
        if devid::name_of_devid(d).is_none() {
            return Err(Error::Invalid(format!(
                "device number {d} is not an xvd disk (e.g. 51712 = xvda, 51728 = xvdb)"
            )));
        }
    }
    let (be_dom, fe_dom, t) = (opts.backend_domid, opts.frontend_domid, &opts.backend_type);
    let candidates: Vec<u32> = match opts.devid {
        Some(d) => vec![d],
        None => (0..MAX_AUTO_INDEX)
            .filter_map(devid::devid_of_index)
            .filter(|&d| !devid::name_of_devid(d).is_some_and(|n| (opts.skip)(&n)))
            .collect(),
    };
    let chosen = xs
        .transaction(|tx| {
            let mut chosen = None;
            for &d in &candidates {
                let fe = frontend_path(fe_dom, d);
                let be = backend_path(be_dom, t, fe_dom, d);
                if exists(tx, &fe)? || exists(tx, &be)? {
                    continue;
                }
                chosen = Some((d, fe, be));
                break;
            }
            let Some((d, fe, be)) = chosen else {
                return Ok(None);
            };
            let vdev = devid::name_of_devid(d).unwrap_or_default();
            tx.mkdir(&be)?;
            tx.set_perms(
                &be,
                &[
                    Perm::new(Access::None, be_dom),
                    Perm::new(Access::Read, fe_dom),
                ],
            )?;
            let mut nodes = vec![
                ("frontend", fe.clone()),
                ("frontend-id", fe_dom.to_string()),
                ("online", "1".into()),
                ("removable", "0".into()),
                ("bootable", "1".into()),
                ("state", XenbusState::Initialising.to_string()),
                ("dev", vdev),
                ("type", t.clone()),
                ("mode", if opts.read_only { "r" } else { "w" }.into()),
                ("device-type", "disk".into()),
                ("params", params.clone()),
                (
                    "discard-enable",
                    if opts.discard { "1" } else { "0" }.into(),
                ),
            ];
            if opts.direct_io_safe {
                nodes.push(("direct-io-safe", "1".into()));
            }
            for (k, v) in &nodes {
                tx.write(&format!("{be}/{k}"), v)?;
            }
            tx.mkdir(&fe)?;
            tx.set_perms(
                &fe,
                &[
                    Perm::new(Access::None, fe_dom),
                    Perm::new(Access::Read, be_dom),
                ],
            )?;
            for (k, v) in [
                ("backend", be.clone()),
                ("backend-id", be_dom.to_string()),
                ("state", XenbusState::Initialising.to_string()),
                ("virtual-device", d.to_string()),
                ("device-type", "disk".into()),
            ] {
                tx.write(&format!("{fe}/{k}"), v)?;
            }
            Ok(Some((d, fe, be)))
        })
        .map_err(xs_err(&frontend_path(fe_dom, 0)))?;
    let Some((d, fe, be)) = chosen else {
        return Err(Error::Invalid(match opts.devid {
            Some(d) => format!(
                "device {d} ({}) is already in use for domain {fe_dom}",
                devid::name_of_devid(d).unwrap_or_default()
            ),
            None => format!("no free xvd device among the first {MAX_AUTO_INDEX}"),
        }));
    };
    Ok(Attached {
        devid: d,
        vdev: devid::name_of_devid(d),
        backend_path: be,
        frontend_path: fe,
        frontend_domid: fe_dom,
    })
}

fn read_opt(xs: &Client, path: &str) -> Result<Option<String>> {
    match xs.read_string(path) {
        Ok(v) => Ok(Some(v)),
        Err(e) if e.errno() == Some(Errno::ENOENT) => Ok(None),
        Err(e) => Err(Error::xs(path, e)),
    }
}

fn state_of(xs: &Client, dir: &str) -> Result<Option<XenbusState>> {
    Ok(read_opt(xs, &format!("{dir}/state"))?.and_then(|s| s.parse().ok()))
}

fn state_name(s: Option<XenbusState>) -> &'static str {
    s.map_or("absent", |s| s.name())
}

/// Watches on some paths, delivered to one channel; removed on drop.
struct Watches<'a> {
    xs: &'a Client,
    set: Vec<(String, String)>,
    rx: mpsc::Receiver<xdisk_xen::xenstore::WatchEvent>,
}

impl<'a> Watches<'a> {
    fn new(xs: &'a Client, paths: &[String]) -> Result<Watches<'a>> {
        static N: AtomicU64 = AtomicU64::new(0);
        let (tx, rx) = mpsc::channel();
        let mut w = Watches {
            xs,
            set: Vec::new(),
            rx,
        };
        for p in paths {
            let token = format!(
                "xdisk-attach:{}:{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            );
            xs.watch_with_sender(p, &token, tx.clone())
                .map_err(xs_err(p))?;
            w.set.push((p.clone(), token));
        }
        Ok(w)
    }

    fn wait(&self, until: Instant) -> bool {
        let now = Instant::now();
        if now >= until {
            return false;
        }
        // Also wake up now and then: a lost event must not cost the whole timeout.
        let _ = self
            .rx
            .recv_timeout((until - now).min(Duration::from_millis(500)));
        true
    }
}

impl Drop for Watches<'_> {
    fn drop(&mut self) {
        for (p, t) in &self.set {
            let _ = self.xs.unwatch(p, t);
        }
    }
}

/// Waits until the frontend is Connected. Fails at once when the daemon reports an error
/// (`hotplug-status` `error`), when the backend closes, or when the nodes vanish.
pub fn wait_connected(xs: &Client, a: &Attached, timeout: Duration) -> Result<()> {
    let be = &a.backend_path;
    let fe = &a.frontend_path;
    let w = Watches::new(
        xs,
        &[
            format!("{be}/state"),
            format!("{be}/hotplug-status"),
            format!("{fe}/state"),
        ],
    )?;
    let until = Instant::now() + timeout;
    loop {
        if read_opt(xs, &format!("{be}/hotplug-status"))?.as_deref() == Some("error") {
            let why = read_opt(xs, &format!("{be}/error"))?.unwrap_or_else(|| "no details".into());
            return Err(Error::Device(format!("the daemon refused the disk: {why}")));
        }
        let bs = state_of(xs, be)?;
        let fs = state_of(xs, fe)?;
        if fs == Some(XenbusState::Connected) && bs == Some(XenbusState::Connected) {
            return Ok(());
        }
        if read_opt(xs, &format!("{be}/frontend"))?.is_none() {
            return Err(Error::Device(format!("{be} was removed")));
        }
        if matches!(bs, Some(XenbusState::Closing | XenbusState::Closed)) {
            let why = read_opt(xs, &format!("{be}/error"))?.unwrap_or_default();
            // The daemon writes hotplug-status, error and state in one transaction: it may
            // have landed between the reads above.
            if read_opt(xs, &format!("{be}/hotplug-status"))?.as_deref() == Some("error") {
                return Err(Error::Device(format!("the daemon refused the disk: {why}")));
            }
            return Err(Error::Device(format!(
                "the backend closed the device (state {}){}",
                state_name(bs),
                if why.is_empty() {
                    String::new()
                } else {
                    format!(": {why}")
                }
            )));
        }
        if !w.wait(until) {
            let hint = if bs == Some(XenbusState::Initialising) || bs.is_none() {
                "no backend picked the device up: is the xdisk daemon watching this backend type?"
            } else {
                "the frontend did not connect: in dom0, is the xen-blkfront module loaded?"
            };
            return Err(Error::Timeout(format!(
                "timed out after {:?}: backend {}, frontend {} ({hint})",
                timeout,
                state_name(bs),
                state_name(fs)
            )));
        }
    }
}

/// Attaches and waits for the frontend; on failure, takes the nodes away again.
pub fn attach(xs: &Client, opts: &AttachOptions, timeout: Duration) -> Result<Attached> {
    let a = write_nodes(xs, opts)?;
    if let Err(e) = wait_connected(xs, &a, timeout) {
        let _ = detach(xs, &a, Duration::from_secs(2), true);
        return Err(e);
    }
    Ok(a)
}

/// Finds an attached disk of `frontend_domid` by number or name (`51728`, `xvdb`,
/// `/dev/xvdb`).
pub fn find(xs: &Client, frontend_domid: DomId, dev: &str) -> Result<Attached> {
    let d = devid::parse_device(dev)
        .ok_or_else(|| Error::Invalid(format!("{dev:?} is not a device number or xvd name")))?;
    let fe = frontend_path(frontend_domid, d);
    let be = read_opt(xs, &format!("{fe}/backend"))?.ok_or_else(|| {
        Error::Invalid(format!("no disk {dev} attached to domain {frontend_domid}"))
    })?;
    Ok(Attached {
        devid: d,
        vdev: devid::name_of_devid(d),
        backend_path: be,
        frontend_path: fe,
        frontend_domid,
    })
}

/// Detaches as libxl does: `online` 0 and `state` Closing, waits for Closed, removes both
/// directories. With `force`, removes them even if the backend did not close in time.
pub fn detach(xs: &Client, a: &Attached, timeout: Duration, force: bool) -> Result<()> {
    let be = &a.backend_path;
    let fe = &a.frontend_path;
    let closing = xs
        .transaction(|tx| {
            let state = match tx.read(&format!("{be}/state")) {
                Ok(s) => String::from_utf8_lossy(&s).parse::<XenbusState>().ok(),
                Err(e) if e.errno() == Some(Errno::ENOENT) => return Ok(false),
                Err(e) => return Err(e),
            };
            if state == Some(XenbusState::Closed) {
                return Ok(false);
            }
            if exists(tx, &format!("{be}/online"))? {
                tx.write(&format!("{be}/online"), "0")?;
            }
            tx.write(&format!("{be}/state"), XenbusState::Closing.to_string())?;
            Ok(true)
        })
        .map_err(xs_err(be))?;
    let mut result = Ok(());
    if closing {
        let w = Watches::new(xs, &[format!("{be}/state")])?;
        let until = Instant::now() + timeout;
        loop {
            let bs = state_of(xs, be)?;
            if bs.is_none() || bs == Some(XenbusState::Closed) {
                break;
            }
            if !w.wait(until) {
                let fs = state_of(xs, fe)?;
                result = Err(Error::Timeout(format!(
                    "the backend did not close within {timeout:?} (backend {}, frontend {}: \
                     is the disk still in use?)",
                    state_name(bs),
                    state_name(fs)
                )));
                break;
            }
        }
    }
    if result.is_err() && !force {
        return result;
    }
    xs.transaction(|tx| {
        rm_with_empty_parents(tx, fe)?;
        rm_with_empty_parents(tx, be)
    })
    .map_err(xs_err(be))?;
    if let Err(e) = &result {
        tracing::warn!("removed the nodes anyway: {e}");
    }
    Ok(())
}
