//! Registering the daemon as a domain's device model, so that libxl lets it serve `qdisk`.
//!
//! libxl refuses to hot-plug a `backendtype=qdisk` disk (`xl block-attach`) when the disk's
//! backend domain is the domain itself and no device model runs for that domain:
//! `libxl__device_disk_add` → `libxl__dm_check_start` → "device model required but not
//! running". Whether one runs, `libxl__dm_active`, is the existence of
//! `/local/domain/<domid>/image/device-model-pid` (or `.../device-model-domid`). For a domU
//! libxl writes that node itself when it spawns QEMU (or `xdisk qemu-shim`); for dom0, whose
//! qdisk backend is started at boot outside libxl (upstream's
//! `xen-qemu-dom0-disk-backend.service`), nothing does, so `xl block-attach 0
//! 'backendtype=qdisk,...'` fails. `xdisk serve` serving `qdisk` disks of its own domain writes
//! the node with its pid, as libxl would for a device model it started, and removes it when it
//! stops — only if it is still its own: a node naming another live process (a QEMU already
//! registered) is left alone, with a warning.

use std::sync::Arc;

use xdisk_xen::platform::DomId;
use xdisk_xen::xenstore::{Client, Errno};

use crate::error::{Error, Result};

/// `/local/domain/<domid>/image/device-model-pid`.
pub fn pid_path(domid: DomId) -> String {
    format!("/local/domain/{domid}/image/device-model-pid")
}

/// What [`register`] found and did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The node now names us; [`Registration`] removes it again.
    Registered,
    /// Another live process is registered (its pid); nothing written.
    Other(u32),
}

/// The node written by [`register`]; removed on [`Registration::release`] or drop if it
/// still names our pid.
#[derive(Debug)]
pub struct Registration {
    xs: Arc<Client>,
    path: String,
    pid: u32,
    released: bool,
}

fn pid_alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// Registers `pid` as the device model of `domid` unless another live process already is.
/// A node naming a dead process (a previous daemon killed with SIGKILL) is taken over.
pub fn register(
    xs: &Arc<Client>,
    domid: DomId,
    pid: u32,
) -> Result<(Outcome, Option<Registration>)> {
    let path = pid_path(domid);
    let outcome = xs
        .transaction(|tx| {
            let current = match tx.read(&path) {
                Ok(v) => Some(String::from_utf8_lossy(&v).trim().to_owned()),
                Err(e) if e.errno() == Some(Errno::ENOENT) => None,
                Err(e) => return Err(e),
            };
            if let Some(other) = current
                .as_deref()
                .and_then(|c| c.parse::<u32>().ok())
                .filter(|&p| p != pid && pid_alive(p))
            {
                return Ok(Outcome::Other(other));
            }
            tx.write(&path, pid.to_string())?;
            Ok(Outcome::Registered)
        })
        .map_err(|e| Error::xs(&path, e))?;
    let reg = (outcome == Outcome::Registered).then(|| Registration {
        xs: xs.clone(),
        path,
        pid,
        released: false,
    });
    Ok((outcome, reg))
}

impl Registration {
    /// Removes the node if it still names our pid.
    pub fn release(mut self) -> Result<()> {
        self.released = true;
        self.remove()
    }

    fn remove(&self) -> Result<()> {
        let path = &self.path;
        let pid = self.pid.to_string();
        self.xs
            .transaction(|tx| {
                match tx.read(path) {
                    Ok(v) if String::from_utf8_lossy(&v).trim() == pid => tx.rm(path)?,
                    Ok(_) => {}
                    Err(e) if e.errno() == Some(Errno::ENOENT) => {}
                    Err(e) => return Err(e),
                }
                Ok(())
            })
            .map_err(|e| Error::xs(path, e))
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        if !self.released {
            if let Err(e) = self.remove() {
                tracing::warn!(error = %e, "could not remove the device-model registration");
            }
        }
    }
}
