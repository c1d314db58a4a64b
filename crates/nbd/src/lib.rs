//! The Network Block Device protocol for xdisk (NetworkBlockDevice/nbd `doc/proto.md`).
//!
//! - [`wire`]: magics, flags and numbers, and typed parsing and encoding of every message of
//!   the fixed newstyle handshake and of transmission (compact and extended headers, simple
//!   and structured replies). Protocol only, no I/O (like `xdisk-blkif` for blkif): the
//!   server (`xdisk nbd`) and the client (`nbd://` images) read and write the bytes.
//! - [`handshake`]: the server side of the fixed newstyle handshake over any blocking stream,
//!   given the exports and metadata contexts: list, info/go, export name, abort, structured
//!   replies, extended headers, list/set meta context; TLS is refused for now.
//!
//! Everything a peer sends is hostile input: every length is checked against the buffer and
//! against a limit before anything is allocated; a request either becomes a typed
//! [`wire::Command`] or a [`wire::RequestError`] saying which error to reply with, or that
//! the connection must be dropped.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod client;
pub mod handshake;
pub mod wire;
