//! The Xen PV block protocol ("blkif"), as a library with no I/O of its own.
//!
//! * [`abi`]: the three ring ABIs (native, `x86_32-abi`, `x86_64-abi`) and
//!   the byte offsets of every blkif struct in each.
//! * [`wire`]: requests ([`Request::parse`], validated, typed errors mapped
//!   to `BLKIF_RSP_*`) and responses ([`Response::write`]), indirect
//!   segment pages.
//! * [`mem`]: the [`SharedMem`] trait through which all guest memory is
//!   accessed (single bounds-checked copies), and [`VecMem`] for tests.
//! * [`ring`]: xen/io/ring.h's shared ring: [`BackRing`] (hostile-frontend
//!   checks, one copy per slot) and [`FrontRing`], with ring.h's index
//!   arithmetic, barriers and notification rules.
//! * [`xenbus`]: xenbus states, xenstore node names, and a hostile-input
//!   parser for the frontend's connect-time nodes.
//!
//! Sources: `/usr/include/xen/io/{blkif,ring,xenbus,protocols}.h` (Debian's
//! libxen-dev); the x86_32 layout as Linux's xen-blkback/common.h and QEMU's
//! hw/block/xen_blkif.h declare it. A backend loop built on this crate takes
//! xenstore, event channels and storage as parameters.

#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod abi;
pub mod mem;
pub mod ring;
pub mod wire;
pub mod xenbus;

pub use abi::{Abi, Layout, SLOT_SIZE};
pub use mem::{MemError, SharedMem, VecMem};
pub use ring::{BackRing, FrontRing, RingError, RingIdx};
pub use wire::{
    parse_indirect_segments, DirectIo, Indirect, IndirectGrefs, IndirectOp, InvalidRequest,
    ParseLimits, Request, RequestError, RequestKind, Response, ResponseError, Segment, Segments,
    Status,
};
pub use xenbus::{FrontendConnect, XenbusState};
