//! The one place where the daemon's platform is chosen: real Xen (xenstored, gntdev, evtchn)
//! or the in-process simulation (feature `sim`).

use std::path::Path;
use std::sync::Arc;

use xdisk_xen::platform::{DomId, EventChannels, GrantMapper};
use xdisk_xen::xenstore::Client;
#[cfg(feature = "sim")]
use xdisk_xensim::SimXen;

use crate::error::{Error, Result};

/// Which platform.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlatformKind {
    /// Real Xen: xenstore over `$XENSTORED_PATH`, `/run/xenstored/socket` or
    /// `/dev/xen/xenbus`; grants through `/dev/xen/gntdev`; event channels through
    /// `/dev/xen/evtchn`.
    Xen,
    /// The simulation of the `xdisk-xensim` crate, in this process (`Platform::sim`, with
    /// the `sim` feature).
    Sim,
}

impl PlatformKind {
    /// Its name, `xen` or `sim`: the value of `xdisk serve --platform` and of
    /// [`DaemonStatus::platform`](crate::status::DaemonStatus::platform).
    pub fn as_str(self) -> &'static str {
        match self {
            PlatformKind::Xen => "xen",
            PlatformKind::Sim => "sim",
        }
    }
}

impl std::str::FromStr for PlatformKind {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<PlatformKind, String> {
        match s {
            "xen" => Ok(PlatformKind::Xen),
            "sim" => Ok(PlatformKind::Sim),
            _ => Err(format!("unknown platform {s:?} (xen or sim)")),
        }
    }
}

/// What devices are served with: a xenstore connection, grant mapping and event channels,
/// and the domain we run in.
#[derive(Clone)]
pub struct Platform {
    /// Real Xen or the simulation.
    pub kind: PlatformKind,
    /// The daemon's xenstore connection, shared by the supervisor and its devices.
    pub xs: Arc<Client>,
    /// Maps and copies the pages frontends grant us (`/dev/xen/gntdev` on Xen).
    pub gnt: Arc<dyn GrantMapper>,
    /// Binds and signals the devices' event channels (`/dev/xen/evtchn` on Xen).
    pub evt: Arc<dyn EventChannels>,
    /// Our own domain (the backend domain).
    pub domid: DomId,
    /// The simulated host, kept alive while the platform is (simulation only).
    #[cfg(feature = "sim")]
    pub sim: Option<Arc<SimXen>>,
}

impl std::fmt::Debug for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Platform")
            .field("kind", &self.kind)
            .field("domid", &self.domid)
            .finish()
    }
}

impl Platform {
    /// The backend domain `domid` of a simulated host (normally 0), with a new xenstore
    /// connection.
    #[cfg(feature = "sim")]
    pub fn sim(xen: &Arc<SimXen>, domid: DomId) -> Result<Platform> {
        Ok(Platform {
            kind: PlatformKind::Sim,
            xs: Arc::new(xen.xenstore(domid)?),
            gnt: xen.grant_mapper(domid),
            evt: xen.event_channels(domid),
            domid,
            sim: Some(xen.clone()),
        })
    }

    /// Real Xen, from inside the backend domain (normally dom0).
    pub fn xen() -> Result<Platform> {
        real_xen()
    }

    /// A new xenstore connection on the same platform (for clients such as `xdisk attach`).
    pub fn connect_xenstore(&self) -> Result<Client> {
        #[cfg(feature = "sim")]
        if let Some(sim) = &self.sim {
            return Ok(sim.xenstore(self.domid)?);
        }
        Client::open().map_err(Error::Connect)
    }

    /// The xenstored socket of the simulated host (what xl tools need as `XENSTORED_PATH`);
    /// `None` on real Xen.
    pub fn sim_xenstore_path(&self) -> Option<&Path> {
        #[cfg(feature = "sim")]
        {
            self.sim.as_ref().map(|s| s.xenstore_path())
        }
        #[cfg(not(feature = "sim"))]
        {
            None
        }
    }
}

/// Our domain id, as xenstored says (`domid` under our own domain path, relative).
pub fn own_domid(xs: &Client) -> DomId {
    xs.read_string("domid")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

#[cfg(target_os = "linux")]
fn real_xen() -> Result<Platform> {
    use xdisk_xen::real::{EvtchnDev, GntDev};
    let xs = Client::open().map_err(Error::Connect)?;
    let gnt = GntDev::open()?;
    let evt = EvtchnDev::open()?;
    let domid = own_domid(&xs);
    Ok(Platform {
        kind: PlatformKind::Xen,
        xs: Arc::new(xs),
        gnt: Arc::new(gnt),
        evt: Arc::new(evt),
        domid,
        #[cfg(feature = "sim")]
        sim: None,
    })
}

#[cfg(not(target_os = "linux"))]
fn real_xen() -> Result<Platform> {
    Err(Error::Unsupported(
        "real Xen support (gntdev, evtchn) is only built on Linux".into(),
    ))
}
