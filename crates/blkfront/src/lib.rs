//! A Xen PV block frontend ("blkfront") in Rust, driving the ring the way Linux's
//! `xen-blkfront` does, for tests and benchmarks of xdisk's backend on the simulation
//! ([`xdisk_xensim`]): it runs as a simulated guest domain
//! ([`SimDomain`](xdisk_xensim::SimDomain)) with its own xenstore connection, grants its pages
//! and allocates event channels.
//!
//! * [`Frontend::connect`]: the frontend side of the xenbus handshake (xen/io/xenbus.h,
//!   xen/io/blkif.h "Feature and Parameter Negotiation"): waits for the backend's `InitWait`,
//!   reads its features, chooses the ring order, the number of queues, indirect segments and
//!   persistent grants, grants the ring pages, allocates event channels, writes its nodes and
//!   `Initialised`, waits for `Connected`, reads the disk properties and goes `Connected`.
//! * [`Frontend::submit`] / [`Frontend::poll`]: requests on any queue; large requests use
//!   `BLKIF_OP_INDIRECT`; with persistent grants, data is copied through a per-queue pool of
//!   pages granted once (Linux's `persistent_gnts` LIFO list), otherwise each request's pages
//!   are granted and revoked.
//! * [`Frontend::disconnect`] / [`Frontend::reconnect`]: `Closing`/`Closed` and back.
//! * [`Misbehave`] and the raw methods ([`Frontend::push_raw`], [`Frontend::set_req_prod`],
//!   ...): a hostile guest for tests.
//!
//! Layout (private modules; everything public is re-exported here):
//! - `frontend`: the [`Frontend`] itself, [`Frontend::connect`] and its accessors.
//! - `xenbus`: [`FrontConfig`], [`DiskInfo`], the handshake through the `state` nodes, reading
//!   the backend's nodes, and teardown and reconnection.
//! - `queue`: [`Op`], [`Completion`], the rings and their tables of requests in flight,
//!   request building (direct and indirect), submission with plugging, and completion.
//! - `grants`: the allocator of guest pages and the data and indirect grants, with each
//!   queue's pool of persistent grants.
//! - `blocking`: [`Frontend::run`], [`Frontend::read`], [`Frontend::write`] and the like.
//! - `misbehave`: [`Misbehave`] and the raw methods.
//! - `error`: [`Error`] and [`Result`].

#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod blocking;
mod error;
mod frontend;
mod grants;
mod misbehave;
mod queue;
mod xenbus;

pub use error::{Error, Result};
pub use frontend::Frontend;
pub use misbehave::Misbehave;
pub use queue::{Completion, Op};
pub use xenbus::{DiskInfo, FrontConfig};
