//! The xdisk backend daemon, as a library:
//!
//! * [`params`]: the toolstack's backend nodes of a disk (`params`, `mode`, `discard-enable`,
//!   `direct-io-safe`, `device-type`, ...) as libxl writes them for a `qdisk` vbd.
//! * [`supervisor`]: watches backend directories in xenstore
//!   (`/local/domain/<own domid>/backend/<type>/<frontend domid>/<devid>`) and runs one
//!   [`xdisk_backend::Device`] for each device found there, isolated from the others.
//! * [`metrics`]: Prometheus metrics of the devices (`xdisk serve --metrics`).
//! * [`control`]: the daemon's control socket (status and per-device counters, for
//!   `xdisk stat` and `xdisk attach`).
//! * [`attach`]: local attach/detach in the backend domain (dom0's own disks), as
//!   `xl block-attach 0` would write them.
//! * [`dm`]: registering as a domain's device model, so that libxl hot-plugs `qdisk` disks
//!   of the daemon's own domain (`xl block-attach 0`).
//! * [`qemu`]: what a stand-in for QEMU needs to satisfy libxl (its command line, QMP).
//! * [`platform`]: the one place where the simulation or real Xen is chosen.
//! * `simguest` (feature `sim`): a simulated guest whose frontend connects to every disk given
//!   to it, for demos and tests on the simulation.
//!
//! Features: `sim` (off by default) adds the simulation: `Platform::sim`, `simguest` and
//! `Error::Sim`, with the `xdisk-xensim` and `xdisk-blkfront` crates. Without it the library
//! serves real Xen only and links no simulation code (`cargo tree -p xdisk-daemon -e normal`
//! shows neither crate); the `xdisk` binary enables it for its simulation modes.
//!
//! No `unsafe`: guest memory is only reached through the platform traits.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod attach;
pub mod control;
pub mod devid;
pub mod dm;
pub mod error;
pub mod jobs;
pub mod metrics;
pub mod params;
pub mod platform;
pub mod qemu;
#[cfg(feature = "sim")]
pub mod simguest;
pub mod status;
pub mod supervisor;

pub use error::{Error, Result};
pub use platform::Platform;
pub use supervisor::{Supervisor, SupervisorConfig};
