//! The Xen PV block backend of xdisk, for one device at a time ([`Device`]).
//!
//! Protocol and I/O are kept apart: [`Device::start`] takes everything it touches as
//! parameters — a xenstore [`Client`](xdisk_xen::xenstore::Client), a
//! [`GrantMapper`](xdisk_xen::platform::GrantMapper), an
//! [`EventChannels`](xdisk_xen::platform::EventChannels) and the
//! [`Image`](xdisk_image::Image) — so the same code runs on the in-process simulation and on
//! real Xen. There are no globals. The simulation (the `xdisk-xensim` crate) is only a
//! dev-dependency: this library links no simulation code.
//!
//! * [`device`]: the xenbus state machine (xen/io/xenbus.h) and the negotiation of
//!   xen/io/blkif.h, one control thread per device.
//! * `reactor`: one thread per queue (ring): consumes requests, runs them on an
//!   [`ImageQueue`](xdisk_image::queue::ImageQueue), answers them.
//! * `datapath`: guest data by mapping (zero copy, persistent grants with an LRU cache) or by
//!   grant copy through a bounce buffer ([`DataPath`]).
//! * [`stats`]: counters ([`Device::stats`]).
//! * [`live`]: changing a running device's image under its queues ([`Device::quiesce`]):
//!   live snapshots and bitmap changes.
//!
//! No `unsafe` here: guest memory is only reached through the platform traits.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod config;
mod datapath;
pub mod device;
pub mod error;
pub mod live;
mod reactor;
mod region;
pub mod stats;

pub use config::{
    DataPath, DeviceConfig, DEFAULT_MAX_MAPPED_GRANTS, DEFAULT_MAX_PERSISTENT_GRANTS, MAX_POLL_US,
};
pub use device::{Device, DeviceHandle};
pub use error::{Error, Result};
pub use live::{QuiesceFn, Switch};
pub use stats::{DeviceStats, Histogram, LATENCY_BOUNDS_US, LATENCY_BUCKETS};
