//! Xen plumbing for xdisk.
//!
//! - [`xenstore`]: the xenstore wire protocol ([`xenstore::wire`]), a synchronous client
//!   ([`xenstore::Client`], over the xenstored unix socket or `/dev/xen/xenbus`) and a small
//!   in-process xenstored ([`xenstore::server::Server`]) for hosts without Xen.
//!
//! No `unsafe` code lives in this crate.

#![forbid(unsafe_code)]

pub mod xenstore;
