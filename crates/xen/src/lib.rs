//! Xen plumbing for xdisk: what the backend and the daemon need on real Xen, and the interfaces
//! the simulation implements.
//!
//! - [`xenstore`]: the xenstore wire protocol ([`xenstore::wire`], including the parser of
//!   requests, [`xenstore::parse_message`]) and a synchronous client ([`xenstore::Client`],
//!   over the xenstored unix socket or `/dev/xen/xenbus`).
//!
//! - [`platform`]: grant mapping/copy and event channel interfaces the backend is written
//!   against.
//!
//! - [`iobuf`]: the zero-copy I/O buffer over mapped grants ([`iobuf::GrantIoBuf`]), whatever
//!   platform mapped them.
//!
//! - [`real`] (Linux): the platform on real Xen, over `/dev/xen/{gntdev,evtchn,gntalloc}`.
//!
//! The simulated Xen host (memfd guest memory, a grant table in shared memory, eventfd event
//! channels) and the in-process xenstored are not here but in the `xdisk-xensim` crate, built
//! on this one, so that production code links no simulation.
//!
//! `unsafe` is denied crate-wide; only the modules that map foreign memory or hand it to the
//! kernel allow it ([`iobuf`] and `real::sys`).

#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod iobuf;
pub mod platform;
#[cfg(target_os = "linux")]
pub mod real;
pub mod xenstore;
