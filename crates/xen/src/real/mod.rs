//! The platform on real Xen, through Linux's Xen devices:
//!
//! - [`GntDev`] ([`GrantMapper`](crate::platform::GrantMapper)) over `/dev/xen/gntdev`,
//! - [`EvtchnDev`] ([`EventChannels`](crate::platform::EventChannels)) over `/dev/xen/evtchn`,
//! - [`GntAlloc`] over `/dev/xen/gntalloc`, to grant our own pages (the frontend side, for
//!   self-tests and local attach).
//!
//! The ioctl numbers and argument layouts are in [`abi`], checked against the C headers by its
//! tests. All `unsafe` (ioctls, mmap, volatile accesses, poll) is in one private module,
//! `sys`, behind fully typed functions.

pub mod abi;
pub mod evtchn;
pub mod gntalloc;
pub mod gntdev;
mod sys;

pub use evtchn::{EvtchnDev, EvtchnPort, EVTCHN_PATH};
pub use gntalloc::{GntAlloc, GrantedPages, GNTALLOC_PATH};
pub use gntdev::{GntDev, GntDevRegion, GNTDEV_PATH, MAX_MAP_PAGES};
