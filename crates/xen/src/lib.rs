//! Xen plumbing for xdisk.
//!
//! - [`xenstore`]: the xenstore wire protocol ([`xenstore::wire`]), a synchronous client
//!   ([`xenstore::Client`], over the xenstored unix socket or `/dev/xen/xenbus`) and a small
//!   in-process xenstored ([`xenstore::server::Server`]) for hosts without Xen.
//!
//! - [`platform`]: grant mapping/copy and event channel interfaces the backend is written
//!   against.
//!
//! - [`sim`]: a simulated Xen host in one process (memfd guest memory, a grant table in shared
//!   memory, eventfd event channels, the in-process xenstored), with [`foreign`] holding the
//!   memory mappings and the zero-copy I/O buffer over granted pages ([`foreign::GrantIoBuf`]).
//!
//! - [`real`] (Linux): the platform on real Xen, over `/dev/xen/{gntdev,evtchn,gntalloc}`.
//!
//! `unsafe` is denied crate-wide; only the modules that map foreign memory allow it.

#![deny(unsafe_code)]

pub mod foreign;
pub mod platform;
#[cfg(target_os = "linux")]
pub mod real;
pub mod sim;
pub mod xenstore;
