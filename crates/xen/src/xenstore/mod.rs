//! Xenstore: the wire protocol and a client. (The in-process xenstored of the simulation is
//! `xdisk_xensim::xenstored`, built on [`wire`].)
//!
//! References (cited by section in the code):
//! - `docs/misc/xenstore.txt` of the Xen tree ("xenstore.txt" below): path syntax, message
//!   payloads, watches, transactions, domain management.
//! - `xen/include/public/io/xs_wire.h` ("xs_wire.h" below): message type numbers, the
//!   `xsd_sockmsg` header, the error names, `XENSTORE_PAYLOAD_MAX` and the path length limits.
//!
//! Layout:
//! - [`wire`]: header, message types, error names, payload encoding, path and permission rules;
//!   request decoding ([`parse_message`], what a xenstored does with each message it reads) is
//!   hostile-input safe.
//! - [`Client`]: a synchronous, thread-safe client with a reader thread that demultiplexes
//!   replies (by `req_id`) and watch events (by token), over any [`Transport`] (a unix socket or
//!   the xenbus character device).

mod client;
mod transport;
pub mod wire;

pub use client::{
    Client, Error, Transaction, Watch, WatchCallback, WatchEvent, DEFAULT_TIMEOUT, MAX_TX_RETRIES,
};
pub use transport::{Transport, XenbusDevice, DEFAULT_DEVICE_PATH, DEFAULT_SOCKET_PATH};
pub use wire::{
    parse_message, Access, DomId, Errno, Header, MessageError, MsgType, ParsedMessage, Perm,
    XsRequest,
};

/// Result type of the client API.
pub type Result<T, E = Error> = std::result::Result<T, E>;
