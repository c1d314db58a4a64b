//! The NBD wire format: magics, flags, option and command numbers, and typed parsing and
//! encoding of every message, as NetworkBlockDevice/nbd `doc/proto.md` defines them (fixed
//! newstyle negotiation; structured replies; the `EXTENDED_HEADERS` extension's 32-byte
//! requests and replies). No I/O: callers read the fixed-size headers and payloads and hand
//! them here.
//!
//! Every parser takes bytes a peer sent and returns a typed value or a typed error; lengths
//! are checked against the buffer and against limits before anything is allocated.

use std::fmt;

/// `NBDMAGIC`: the first 8 bytes a server sends.
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: newstyle negotiation's magic, and the magic of every client option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of option replies.
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of a compact (28-byte) request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of an extended (32-byte) request.
pub const EXTENDED_REQUEST_MAGIC: u32 = 0x21e4_1c71;
/// Magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
/// Magic of an extended reply chunk.
pub const EXTENDED_REPLY_MAGIC: u32 = 0x6e8a_278c;

/// Handshake flags (16 bits, server to client).
pub mod handshake {
    /// The server speaks fixed newstyle.
    pub const FIXED_NEWSTYLE: u16 = 1 << 0;
    /// The server can leave out the 124 zero bytes after `NBD_OPT_EXPORT_NAME`.
    pub const NO_ZEROES: u16 = 1 << 1;
}

/// Client flags (32 bits, client to server).
pub mod client {
    /// The client speaks fixed newstyle.
    pub const FIXED_NEWSTYLE: u32 = 1 << 0;
    /// The client does not want the 124 zero bytes after `NBD_OPT_EXPORT_NAME`.
    pub const NO_ZEROES: u32 = 1 << 1;
}

/// Transmission flags (16 bits): what the export supports.
pub mod flags {
    /// Always set.
    pub const HAS_FLAGS: u16 = 1 << 0;
    /// The export is read-only.
    pub const READ_ONLY: u16 = 1 << 1;
    /// `NBD_CMD_FLUSH` is supported.
    pub const SEND_FLUSH: u16 = 1 << 2;
    /// `NBD_CMD_FLAG_FUA` is supported.
    pub const SEND_FUA: u16 = 1 << 3;
    /// The export behaves like a rotational medium.
    pub const ROTATIONAL: u16 = 1 << 4;
    /// `NBD_CMD_TRIM` is supported.
    pub const SEND_TRIM: u16 = 1 << 5;
    /// `NBD_CMD_WRITE_ZEROES` (and `NO_HOLE`) is supported.
    pub const SEND_WRITE_ZEROES: u16 = 1 << 6;
    /// `NBD_CMD_FLAG_DF` is supported on reads (structured replies only).
    pub const SEND_DF: u16 = 1 << 7;
    /// A flush on any connection makes every completed write of every connection durable.
    pub const CAN_MULTI_CONN: u16 = 1 << 8;
    /// `NBD_CMD_RESIZE` (the experimental RESIZE extension).
    pub const SEND_RESIZE: u16 = 1 << 9;
    /// `NBD_CMD_CACHE` is understood.
    pub const SEND_CACHE: u16 = 1 << 10;
    /// `NBD_CMD_FLAG_FAST_ZERO` is supported.
    pub const SEND_FAST_ZERO: u16 = 1 << 11;
    /// `NBD_CMD_BLOCK_STATUS` takes a payload (extended headers).
    pub const BLOCK_STATUS_PAYLOAD: u16 = 1 << 12;
}

/// Option numbers (`NBD_OPT_*`).
pub mod opt {
    /// Choose an export and enter transmission (no error reply possible).
    pub const EXPORT_NAME: u32 = 1;
    /// End the negotiation.
    pub const ABORT: u32 = 2;
    /// List the exports.
    pub const LIST: u32 = 3;
    /// Upgrade the connection to TLS.
    pub const STARTTLS: u32 = 5;
    /// Ask about an export.
    pub const INFO: u32 = 6;
    /// Ask about an export and enter transmission.
    pub const GO: u32 = 7;
    /// Use structured replies.
    pub const STRUCTURED_REPLY: u32 = 8;
    /// List metadata contexts.
    pub const LIST_META_CONTEXT: u32 = 9;
    /// Select metadata contexts for `NBD_CMD_BLOCK_STATUS`.
    pub const SET_META_CONTEXT: u32 = 10;
    /// Use extended (64-bit) headers.
    pub const EXTENDED_HEADERS: u32 = 11;
}

/// Option reply types (`NBD_REP_*`).
pub mod rep {
    /// Success (or the end of a list).
    pub const ACK: u32 = 1;
    /// One export of a list.
    pub const SERVER: u32 = 2;
    /// One item of information about an export.
    pub const INFO: u32 = 3;
    /// One metadata context.
    pub const META_CONTEXT: u32 = 4;
    const ERR: u32 = 1 << 31;
    /// The option is not known.
    pub const ERR_UNSUP: u32 = ERR + 1;
    /// Forbidden by policy.
    pub const ERR_POLICY: u32 = ERR + 2;
    /// Syntactically or semantically invalid.
    pub const ERR_INVALID: u32 = ERR + 3;
    /// Not supported on this platform.
    pub const ERR_PLATFORM: u32 = ERR + 4;
    /// TLS must be negotiated first.
    pub const ERR_TLS_REQD: u32 = ERR + 5;
    /// No such export.
    pub const ERR_UNKNOWN: u32 = ERR + 6;
    /// The server is shutting down.
    pub const ERR_SHUTDOWN: u32 = ERR + 7;
    /// The client must ask for block size constraints.
    pub const ERR_BLOCK_SIZE_REQD: u32 = ERR + 8;
    /// The request or reply is too large.
    pub const ERR_TOO_BIG: u32 = ERR + 9;
    /// Extended headers must be negotiated first.
    pub const ERR_EXT_HEADER_REQD: u32 = ERR + 10;
}

/// Information types of `NBD_REP_INFO` (`NBD_INFO_*`).
pub mod info {
    /// Size and transmission flags.
    pub const EXPORT: u16 = 0;
    /// The export's canonical name.
    pub const NAME: u16 = 1;
    /// A description for humans.
    pub const DESCRIPTION: u16 = 2;
    /// Block size constraints.
    pub const BLOCK_SIZE: u16 = 3;
}

/// Command types (`NBD_CMD_*`).
pub mod cmd {
    /// Read.
    pub const READ: u16 = 0;
    /// Write.
    pub const WRITE: u16 = 1;
    /// Disconnect.
    pub const DISC: u16 = 2;
    /// Flush.
    pub const FLUSH: u16 = 3;
    /// Discard.
    pub const TRIM: u16 = 4;
    /// Prefetch.
    pub const CACHE: u16 = 5;
    /// Write zeroes.
    pub const WRITE_ZEROES: u16 = 6;
    /// Block status.
    pub const BLOCK_STATUS: u16 = 7;
    /// Resize (experimental).
    pub const RESIZE: u16 = 8;
}

/// Command flags (`NBD_CMD_FLAG_*`).
pub mod cmd_flags {
    /// Force unit access: reply only once the written data is durable.
    pub const FUA: u16 = 1 << 0;
    /// Write zeroes must allocate (not punch a hole).
    pub const NO_HOLE: u16 = 1 << 1;
    /// Read: reply with at most one content chunk.
    pub const DF: u16 = 1 << 2;
    /// Block status: one extent per context.
    pub const REQ_ONE: u16 = 1 << 3;
    /// Write zeroes: fail with `ENOTSUP` unless it is fast.
    pub const FAST_ZERO: u16 = 1 << 4;
    /// Extended headers: the length is a payload length.
    pub const PAYLOAD_LEN: u16 = 1 << 5;
    /// Every flag this module knows.
    pub const ALL: u16 = FUA | NO_HOLE | DF | REQ_ONE | FAST_ZERO | PAYLOAD_LEN;
}

/// Structured/extended reply chunk types (`NBD_REPLY_TYPE_*`).
pub mod reply {
    /// No payload: the end of a reply.
    pub const NONE: u16 = 0;
    /// Data at an offset.
    pub const OFFSET_DATA: u16 = 1;
    /// A range that reads as zeroes.
    pub const OFFSET_HOLE: u16 = 2;
    /// Block status extents (32-bit lengths).
    pub const BLOCK_STATUS: u16 = 5;
    /// Block status extents (64-bit lengths, extended headers).
    pub const BLOCK_STATUS_EXT: u16 = 6;
    /// An error for the whole request.
    pub const ERROR: u16 = (1 << 15) + 1;
    /// An error at an offset.
    pub const ERROR_OFFSET: u16 = (1 << 15) + 2;
    /// Flag of the last chunk of a reply.
    pub const FLAG_DONE: u16 = 1 << 0;
}

/// Error values of replies (`NBD_E*`), errno-like.
pub mod errno {
    /// Operation not permitted.
    pub const EPERM: u32 = 1;
    /// Input/output error.
    pub const EIO: u32 = 5;
    /// Cannot allocate memory.
    pub const ENOMEM: u32 = 12;
    /// Invalid argument.
    pub const EINVAL: u32 = 22;
    /// No space left on device.
    pub const ENOSPC: u32 = 28;
    /// Value too large.
    pub const EOVERFLOW: u32 = 75;
    /// Operation not supported.
    pub const ENOTSUP: u32 = 95;
    /// The server is shutting down.
    pub const ESHUTDOWN: u32 = 108;

    /// The NBD error for a host errno (unknown ones become `EINVAL`, as the spec says).
    pub fn from_errno(e: i32) -> u32 {
        match e {
            1 | 13 => EPERM,         // EPERM, EACCES
            5 => EIO,                // EIO
            12 => ENOMEM,            // ENOMEM
            28 | 27 | 122 => ENOSPC, // ENOSPC, EFBIG, EDQUOT
            75 => EOVERFLOW,         // EOVERFLOW
            95 => ENOTSUP,           // EOPNOTSUPP
            108 => ESHUTDOWN,        // ESHUTDOWN
            _ => EINVAL,
        }
    }
}

/// The longest string (export name, query, message) the spec allows.
pub const MAX_STRING: usize = 4096;
/// The largest option payload the server reads (an option's data is at most a name, a few
/// queries and their lengths; more is refused and the connection dropped).
pub const MAX_OPTION_DATA: u32 = 64 * 1024;
/// Length of an option header (magic, option, length).
pub const OPTION_HEADER_LEN: usize = 16;
/// Length of a compact request header.
pub const REQUEST_LEN: usize = 28;
/// Length of an extended request header.
pub const EXTENDED_REQUEST_LEN: usize = 32;

/// Why bytes from a peer were refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// A magic number that is not the one this message must start with.
    #[error("bad magic {0:#x}")]
    BadMagic(u64),
    /// Fewer bytes than the message needs.
    #[error("message truncated: {what} needs {need} bytes, got {got}")]
    Truncated {
        /// What was being read.
        what: &'static str,
        /// Bytes it needs.
        need: usize,
        /// Bytes there were.
        got: usize,
    },
    /// A length larger than this implementation accepts.
    #[error("{what} of {len} bytes is larger than {max}")]
    TooLong {
        /// What the length was of.
        what: &'static str,
        /// The length sent.
        len: u64,
        /// The largest accepted.
        max: u64,
    },
    /// A string that is not UTF-8 or contains NUL.
    #[error("{0} is not a valid string (UTF-8 without NUL)")]
    BadString(&'static str),
    /// Bytes left over after the last field.
    #[error("{0} has trailing bytes")]
    Trailing(&'static str),
    /// The same information request twice.
    #[error("information type {0} requested twice")]
    Duplicate(u16),
}

/// A reader over a peer's bytes that checks every length (server and client side).
pub(crate) struct Cursor<'a> {
    pub(crate) buf: &'a [u8],
    pub(crate) what: &'static str,
}

impl<'a> Cursor<'a> {
    pub(crate) fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        if self.buf.len() < n {
            return Err(WireError::Truncated {
                what: self.what,
                need: n,
                got: self.buf.len(),
            });
        }
        let (a, b) = self.buf.split_at(n);
        self.buf = b;
        Ok(a)
    }
    pub(crate) fn u16(&mut self) -> Result<u16, WireError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    pub(crate) fn u32(&mut self) -> Result<u32, WireError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    pub(crate) fn u64(&mut self) -> Result<u64, WireError> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_be_bytes(a))
    }
    /// A string preceded by its 32-bit length.
    fn string32(&mut self, what: &'static str) -> Result<String, WireError> {
        let len = self.u32()?;
        if len as usize > MAX_STRING {
            return Err(WireError::TooLong {
                what,
                len: len.into(),
                max: MAX_STRING as u64,
            });
        }
        let b = self.take(len as usize)?;
        string(b, what)
    }
    pub(crate) fn end(&self) -> Result<(), WireError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(WireError::Trailing(self.what))
        }
    }
    /// Everything left.
    pub(crate) fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.buf)
    }
}

fn string(b: &[u8], what: &'static str) -> Result<String, WireError> {
    if b.contains(&0) {
        return Err(WireError::BadString(what));
    }
    String::from_utf8(b.to_vec()).map_err(|_| WireError::BadString(what))
}

/// The header of a client option: which option and how many bytes of data follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    /// The option number (`opt::*`).
    pub option: u32,
    /// Bytes of data that follow.
    pub len: u32,
}

impl OptionHeader {
    /// Parses the 16 bytes of an option header. A length over [`MAX_OPTION_DATA`] is an
    /// error (the server drops such a client rather than read unbounded data).
    pub fn parse(b: &[u8; OPTION_HEADER_LEN]) -> Result<OptionHeader, WireError> {
        let mut c = Cursor {
            buf: b,
            what: "option header",
        };
        let magic = c.u64()?;
        if magic != IHAVEOPT {
            return Err(WireError::BadMagic(magic));
        }
        let option = c.u32()?;
        let len = c.u32()?;
        if len > MAX_OPTION_DATA {
            return Err(WireError::TooLong {
                what: "option data",
                len: len.into(),
                max: MAX_OPTION_DATA.into(),
            });
        }
        Ok(OptionHeader { option, len })
    }

    /// The 16 bytes of this header (what a client sends).
    pub fn encode(&self) -> [u8; OPTION_HEADER_LEN] {
        let mut b = [0u8; OPTION_HEADER_LEN];
        b[..8].copy_from_slice(&IHAVEOPT.to_be_bytes());
        b[8..12].copy_from_slice(&self.option.to_be_bytes());
        b[12..].copy_from_slice(&self.len.to_be_bytes());
        b
    }
}

/// The data of `NBD_OPT_INFO` and `NBD_OPT_GO`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    /// The export (empty: the default export).
    pub name: String,
    /// Information types asked for (`info::*`), each at most once.
    pub requests: Vec<u16>,
}

impl InfoRequest {
    /// Parses the option data.
    pub fn parse(data: &[u8]) -> Result<InfoRequest, WireError> {
        let mut c = Cursor {
            buf: data,
            what: "NBD_OPT_INFO/GO data",
        };
        let name = c.string32("export name")?;
        let n = c.u16()?;
        let mut requests = Vec::with_capacity(usize::from(n).min(c.buf.len() / 2));
        for _ in 0..n {
            let r = c.u16()?;
            if requests.contains(&r) {
                return Err(WireError::Duplicate(r));
            }
            requests.push(r);
        }
        c.end()?;
        Ok(InfoRequest { name, requests })
    }

    /// The option data (what a client sends).
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::new();
        put_string32(&mut b, &self.name);
        b.extend_from_slice(&(self.requests.len() as u16).to_be_bytes());
        for r in &self.requests {
            b.extend_from_slice(&r.to_be_bytes());
        }
        b
    }
}

/// The data of `NBD_OPT_LIST_META_CONTEXT` and `NBD_OPT_SET_META_CONTEXT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaContextRequest {
    /// The export.
    pub name: String,
    /// Queries (`namespace:leaf`); empty lists every context (LIST only).
    pub queries: Vec<String>,
}

/// The most queries one meta context option may carry.
pub const MAX_QUERIES: u32 = 128;

impl MetaContextRequest {
    /// Parses the option data.
    pub fn parse(data: &[u8]) -> Result<MetaContextRequest, WireError> {
        let mut c = Cursor {
            buf: data,
            what: "meta context data",
        };
        let name = c.string32("export name")?;
        let n = c.u32()?;
        if n > MAX_QUERIES {
            return Err(WireError::TooLong {
                what: "query count",
                len: n.into(),
                max: MAX_QUERIES.into(),
            });
        }
        let mut queries = Vec::with_capacity(n as usize);
        for _ in 0..n {
            queries.push(c.string32("query")?);
        }
        c.end()?;
        Ok(MetaContextRequest { name, queries })
    }

    /// The option data (what a client sends).
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::new();
        put_string32(&mut b, &self.name);
        b.extend_from_slice(&(self.queries.len() as u32).to_be_bytes());
        for q in &self.queries {
            put_string32(&mut b, q);
        }
        b
    }
}

fn put_string32(b: &mut Vec<u8>, s: &str) {
    b.extend_from_slice(&(s.len() as u32).to_be_bytes());
    b.extend_from_slice(s.as_bytes());
}

/// An option reply: header (magic, option, type, length) followed by `data`.
pub fn option_reply(option: u32, reply_type: u32, data: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(20 + data.len());
    b.extend_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
    b.extend_from_slice(&option.to_be_bytes());
    b.extend_from_slice(&reply_type.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    b
}

/// An error reply with a message for humans (cut to [`MAX_STRING`] bytes).
pub fn option_error(option: u32, reply_type: u32, message: &str) -> Vec<u8> {
    let mut m = message.as_bytes();
    if m.len() > MAX_STRING {
        let mut end = MAX_STRING;
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        m = &m[..end];
    }
    option_reply(option, reply_type, m)
}

/// `NBD_REP_SERVER` data: an export name for `NBD_OPT_LIST`.
pub fn rep_server(name: &str) -> Vec<u8> {
    let mut b = Vec::new();
    put_string32(&mut b, name);
    b
}

/// `NBD_REP_INFO` data of type `NBD_INFO_EXPORT`.
pub fn info_export(size: u64, transmission_flags: u16) -> Vec<u8> {
    let mut b = Vec::with_capacity(12);
    b.extend_from_slice(&info::EXPORT.to_be_bytes());
    b.extend_from_slice(&size.to_be_bytes());
    b.extend_from_slice(&transmission_flags.to_be_bytes());
    b
}

/// `NBD_REP_INFO` data of type `NBD_INFO_NAME` or `NBD_INFO_DESCRIPTION`.
pub fn info_string(kind: u16, s: &str) -> Vec<u8> {
    let mut b = Vec::with_capacity(2 + s.len());
    b.extend_from_slice(&kind.to_be_bytes());
    b.extend_from_slice(s.as_bytes());
    b
}

/// Block size constraints (`NBD_INFO_BLOCK_SIZE`), in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSize {
    /// Minimum (1 or a power of two up to 64 KiB): offsets and lengths are multiples of it.
    pub minimum: u32,
    /// Preferred (a power of two, at least the minimum).
    pub preferred: u32,
    /// Largest payload of a read or write.
    pub maximum: u32,
}

impl BlockSize {
    /// `NBD_REP_INFO` data of type `NBD_INFO_BLOCK_SIZE`.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(14);
        b.extend_from_slice(&info::BLOCK_SIZE.to_be_bytes());
        b.extend_from_slice(&self.minimum.to_be_bytes());
        b.extend_from_slice(&self.preferred.to_be_bytes());
        b.extend_from_slice(&self.maximum.to_be_bytes());
        b
    }
}

/// `NBD_REP_META_CONTEXT` data: a context ID and its name.
pub fn rep_meta_context(id: u32, name: &str) -> Vec<u8> {
    let mut b = Vec::with_capacity(4 + name.len());
    b.extend_from_slice(&id.to_be_bytes());
    b.extend_from_slice(name.as_bytes());
    b
}

/// A transmission request header, compact or extended, as sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    /// Command flags (`cmd_flags::*`).
    pub flags: u16,
    /// Command type (`cmd::*`).
    pub kind: u16,
    /// Chosen by the client; returned in every reply to this request.
    pub cookie: u64,
    /// Byte offset in the export.
    pub offset: u64,
    /// Length: the payload length of a write (compact) or with `PAYLOAD_LEN` (extended);
    /// otherwise the effect length.
    pub length: u64,
    /// Whether it came in an extended (32-byte) header.
    pub extended: bool,
}

impl RequestHeader {
    /// Parses a compact request (28 bytes).
    pub fn parse_compact(b: &[u8; REQUEST_LEN]) -> Result<RequestHeader, WireError> {
        let mut c = Cursor {
            buf: b,
            what: "request",
        };
        let magic = c.u32()?;
        if magic != REQUEST_MAGIC {
            return Err(WireError::BadMagic(magic.into()));
        }
        Ok(RequestHeader {
            flags: c.u16()?,
            kind: c.u16()?,
            cookie: c.u64()?,
            offset: c.u64()?,
            length: c.u32()?.into(),
            extended: false,
        })
    }

    /// Parses an extended request (32 bytes).
    pub fn parse_extended(b: &[u8; EXTENDED_REQUEST_LEN]) -> Result<RequestHeader, WireError> {
        let mut c = Cursor {
            buf: b,
            what: "extended request",
        };
        let magic = c.u32()?;
        if magic != EXTENDED_REQUEST_MAGIC {
            return Err(WireError::BadMagic(magic.into()));
        }
        Ok(RequestHeader {
            flags: c.u16()?,
            kind: c.u16()?,
            cookie: c.u64()?,
            offset: c.u64()?,
            length: c.u64()?,
            extended: true,
        })
    }

    /// The bytes of this header (what a client sends): 28 or 32 of them. A compact header
    /// carries only the low 32 bits of the length.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(EXTENDED_REQUEST_LEN);
        let magic = if self.extended {
            EXTENDED_REQUEST_MAGIC
        } else {
            REQUEST_MAGIC
        };
        b.extend_from_slice(&magic.to_be_bytes());
        b.extend_from_slice(&self.flags.to_be_bytes());
        b.extend_from_slice(&self.kind.to_be_bytes());
        b.extend_from_slice(&self.cookie.to_be_bytes());
        b.extend_from_slice(&self.offset.to_be_bytes());
        if self.extended {
            b.extend_from_slice(&self.length.to_be_bytes());
        } else {
            b.extend_from_slice(&(self.length as u32).to_be_bytes());
        }
        b
    }

    /// How many payload bytes follow the header on the wire.
    pub fn payload_len(&self) -> u64 {
        if self.extended {
            if self.flags & cmd_flags::PAYLOAD_LEN != 0 {
                self.length
            } else {
                0
            }
        } else if self.kind == cmd::WRITE {
            self.length
        } else {
            0
        }
    }
}

/// What the server negotiated for transmission, which decides what a request may be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Negotiated {
    /// The export's size in bytes.
    pub size: u64,
    /// The transmission flags sent (`flags::*`).
    pub flags: u16,
    /// Structured replies are in use.
    pub structured: bool,
    /// Extended headers are in use.
    pub extended: bool,
    /// Block size constraints.
    pub block: BlockSize,
    /// A metadata context was selected (block status is allowed).
    pub meta_contexts: bool,
}

/// A request the server can act on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// Read `len` bytes at `offset`; `df`: one content chunk.
    Read {
        /// Byte offset.
        offset: u64,
        /// Bytes.
        len: u32,
        /// Don't fragment.
        df: bool,
    },
    /// Write the `len` payload bytes that follow at `offset`.
    Write {
        /// Byte offset.
        offset: u64,
        /// Bytes (the payload that follows).
        len: u32,
        /// Durable before the reply.
        fua: bool,
    },
    /// Disconnect.
    Disconnect,
    /// Make every completed write durable.
    Flush,
    /// Discard.
    Trim {
        /// Byte offset.
        offset: u64,
        /// Bytes.
        len: u64,
        /// Durable before the reply.
        fua: bool,
    },
    /// Prefetch (advisory).
    Cache {
        /// Byte offset.
        offset: u64,
        /// Bytes.
        len: u64,
    },
    /// Write zeroes.
    WriteZeroes {
        /// Byte offset.
        offset: u64,
        /// Bytes.
        len: u64,
        /// Durable before the reply.
        fua: bool,
        /// Must not punch a hole.
        no_hole: bool,
        /// Fail fast unless cheaper than writing.
        fast: bool,
    },
    /// Block status of the selected contexts.
    BlockStatus {
        /// Byte offset.
        offset: u64,
        /// Bytes asked about.
        len: u64,
        /// One extent per context.
        req_one: bool,
    },
}

/// Why a request is refused: the error to reply with (the connection stays up), or a
/// violation after which the server must drop the client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// Reply with this NBD error (`errno::*`) and a message; payload bytes (if any) have
    /// to be read and dropped first.
    #[error("{message} (NBD error {errno})")]
    Reply {
        /// The NBD error value.
        errno: u32,
        /// For humans (structured replies carry it).
        message: String,
    },
    /// The client broke the protocol in a way that leaves no safe way on (a payload too
    /// large to read, a header of the wrong style): drop the connection.
    #[error("protocol violation: {0}")]
    Fatal(String),
}

fn reply_err(errno: u32, message: impl Into<String>) -> RequestError {
    RequestError::Reply {
        errno,
        message: message.into(),
    }
}

impl Command {
    /// Checks a request header against what was negotiated (proto.md, "Request types" and
    /// "Error values"): the flags each command allows, alignment to the minimum block size,
    /// lengths within the maximum payload, ranges within the export, writes on a read-only
    /// export. The returned error says whether to reply or to drop the client.
    pub fn from_header(h: &RequestHeader, n: &Negotiated) -> Result<Command, RequestError> {
        if h.extended != n.extended {
            return Err(RequestError::Fatal(format!(
                "{} request header, {} negotiated",
                if h.extended { "extended" } else { "compact" },
                if n.extended {
                    "extended headers"
                } else {
                    "compact headers"
                }
            )));
        }
        let payload = h.payload_len();
        if payload > u64::from(n.block.maximum) {
            return Err(RequestError::Fatal(format!(
                "payload of {payload} bytes over the maximum {}",
                n.block.maximum
            )));
        }
        if h.flags & !cmd_flags::ALL != 0 {
            return Err(reply_err(
                errno::EINVAL,
                format!("unknown command flags {:#x}", h.flags & !cmd_flags::ALL),
            ));
        }
        let fua = h.flags & cmd_flags::FUA != 0;
        if fua && n.flags & flags::SEND_FUA == 0 {
            return Err(reply_err(errno::EINVAL, "FUA was not negotiated"));
        }
        // Flags valid only on one command.
        let only = |flag: u16, kind: u16, name: &str| -> Result<(), RequestError> {
            if h.flags & flag != 0 && h.kind != kind {
                Err(reply_err(
                    errno::EINVAL,
                    format!("flag {name} on a command that does not take it"),
                ))
            } else {
                Ok(())
            }
        };
        only(cmd_flags::DF, cmd::READ, "DF")?;
        only(cmd_flags::REQ_ONE, cmd::BLOCK_STATUS, "REQ_ONE")?;
        only(cmd_flags::NO_HOLE, cmd::WRITE_ZEROES, "NO_HOLE")?;
        only(cmd_flags::FAST_ZERO, cmd::WRITE_ZEROES, "FAST_ZERO")?;
        if h.extended {
            let has = h.flags & cmd_flags::PAYLOAD_LEN != 0;
            if has != (h.kind == cmd::WRITE) {
                return Err(reply_err(
                    errno::EINVAL,
                    "PAYLOAD_LEN must be set on writes and only on writes",
                ));
            }
        } else if h.flags & cmd_flags::PAYLOAD_LEN != 0 {
            return Err(reply_err(
                errno::EINVAL,
                "PAYLOAD_LEN without extended headers",
            ));
        }
        let (offset, len) = (h.offset, h.length);
        let aligned = |what: &str| -> Result<(), RequestError> {
            let m = u64::from(n.block.minimum.max(1));
            if !offset.is_multiple_of(m) || !len.is_multiple_of(m) {
                return Err(reply_err(
                    errno::EINVAL,
                    format!("{what} at {offset}+{len} not aligned to {m} bytes"),
                ));
            }
            Ok(())
        };
        let inside = |e: u32| -> Result<(), RequestError> {
            match offset.checked_add(len) {
                Some(end) if end <= n.size => Ok(()),
                _ => Err(reply_err(
                    e,
                    format!("{offset}+{len} is past the end of the export ({})", n.size),
                )),
            }
        };
        let writable = |what: &str| -> Result<(), RequestError> {
            if n.flags & flags::READ_ONLY != 0 {
                Err(reply_err(
                    errno::EPERM,
                    format!("{what} on a read-only export"),
                ))
            } else {
                Ok(())
            }
        };
        let payload_sized = |what: &str| -> Result<u32, RequestError> {
            if len > u64::from(n.block.maximum) {
                return Err(reply_err(
                    errno::EINVAL,
                    format!("{what} of {len} bytes over the maximum {}", n.block.maximum),
                ));
            }
            Ok(len as u32)
        };
        match h.kind {
            cmd::READ => {
                if h.flags & cmd_flags::DF != 0 && n.flags & flags::SEND_DF == 0 {
                    return Err(reply_err(errno::EINVAL, "DF was not negotiated"));
                }
                let len = payload_sized("read")?;
                aligned("read")?;
                inside(errno::EINVAL)?;
                Ok(Command::Read {
                    offset,
                    len,
                    df: h.flags & cmd_flags::DF != 0,
                })
            }
            cmd::WRITE => {
                let len = payload_sized("write")?;
                writable("write")?;
                aligned("write")?;
                inside(errno::ENOSPC)?;
                Ok(Command::Write { offset, len, fua })
            }
            cmd::DISC => Ok(Command::Disconnect),
            cmd::FLUSH => {
                if n.flags & flags::SEND_FLUSH == 0 {
                    return Err(reply_err(errno::EINVAL, "FLUSH was not negotiated"));
                }
                Ok(Command::Flush)
            }
            cmd::TRIM => {
                if n.flags & flags::SEND_TRIM == 0 {
                    return Err(reply_err(errno::EINVAL, "TRIM was not negotiated"));
                }
                writable("trim")?;
                aligned("trim")?;
                inside(errno::EINVAL)?;
                Ok(Command::Trim { offset, len, fua })
            }
            cmd::CACHE => {
                if n.flags & flags::SEND_CACHE == 0 {
                    return Err(reply_err(errno::EINVAL, "CACHE was not negotiated"));
                }
                inside(errno::EINVAL)?;
                Ok(Command::Cache { offset, len })
            }
            cmd::WRITE_ZEROES => {
                if n.flags & flags::SEND_WRITE_ZEROES == 0 {
                    return Err(reply_err(errno::EINVAL, "WRITE_ZEROES was not negotiated"));
                }
                let fast = h.flags & cmd_flags::FAST_ZERO != 0;
                if fast && n.flags & flags::SEND_FAST_ZERO == 0 {
                    return Err(reply_err(errno::EINVAL, "FAST_ZERO was not negotiated"));
                }
                writable("write zeroes")?;
                aligned("write zeroes")?;
                inside(errno::ENOSPC)?;
                Ok(Command::WriteZeroes {
                    offset,
                    len,
                    fua,
                    no_hole: h.flags & cmd_flags::NO_HOLE != 0,
                    fast,
                })
            }
            cmd::BLOCK_STATUS => {
                if !n.meta_contexts {
                    return Err(reply_err(errno::EINVAL, "no metadata context was selected"));
                }
                if len == 0 {
                    return Err(reply_err(errno::EINVAL, "block status of 0 bytes"));
                }
                inside(errno::EINVAL)?;
                Ok(Command::BlockStatus {
                    offset,
                    len,
                    req_one: h.flags & cmd_flags::REQ_ONE != 0,
                })
            }
            other => Err(reply_err(errno::EINVAL, format!("unknown command {other}"))),
        }
    }
}

/// A simple reply header (16 bytes); a successful read's data follows it.
pub fn simple_reply(cookie: u64, error: u32) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&error.to_be_bytes());
    b[8..].copy_from_slice(&cookie.to_be_bytes());
    b
}

/// The header of one reply chunk: structured (20 bytes) or extended (32 bytes, which also
/// echo the request's offset). `len` payload bytes follow.
pub fn chunk_header(
    extended: bool,
    flags: u16,
    kind: u16,
    cookie: u64,
    request_offset: u64,
    len: u64,
) -> Vec<u8> {
    let mut b = Vec::with_capacity(32);
    if extended {
        b.extend_from_slice(&EXTENDED_REPLY_MAGIC.to_be_bytes());
    } else {
        b.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    }
    b.extend_from_slice(&flags.to_be_bytes());
    b.extend_from_slice(&kind.to_be_bytes());
    b.extend_from_slice(&cookie.to_be_bytes());
    if extended {
        b.extend_from_slice(&request_offset.to_be_bytes());
        b.extend_from_slice(&len.to_be_bytes());
    } else {
        b.extend_from_slice(&(len as u32).to_be_bytes());
    }
    b
}

/// The payload of an error chunk (`reply::ERROR`), message cut to [`MAX_STRING`] bytes;
/// with `offset`, of an `ERROR_OFFSET` chunk.
pub fn error_payload(errno: u32, message: &str, offset: Option<u64>) -> Vec<u8> {
    let mut end = message.len().min(MAX_STRING);
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    let m = &message.as_bytes()[..end];
    let mut b = Vec::with_capacity(6 + m.len() + 8);
    b.extend_from_slice(&errno.to_be_bytes());
    b.extend_from_slice(&(m.len() as u16).to_be_bytes());
    b.extend_from_slice(m);
    if let Some(o) = offset {
        b.extend_from_slice(&o.to_be_bytes());
    }
    b
}

/// The status bits of the `base:allocation` context.
pub mod allocation {
    /// The range is a hole (not allocated).
    pub const HOLE: u32 = 1 << 0;
    /// The range reads as zeroes.
    pub const ZERO: u32 = 1 << 1;
}

/// One extent of a block status reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Bytes (nonzero).
    pub len: u64,
    /// Status flags of the context.
    pub flags: u32,
}

/// The payload of a block status chunk for context `id`: `BLOCK_STATUS` (32-bit lengths,
/// extents longer than 4 GiB - 4 KiB are cut) or `BLOCK_STATUS_EXT`.
pub fn block_status_payload(extended: bool, id: u32, extents: &[Extent]) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&id.to_be_bytes());
    if extended {
        b.extend_from_slice(&(extents.len() as u32).to_be_bytes());
        for e in extents {
            b.extend_from_slice(&e.len.to_be_bytes());
            b.extend_from_slice(&u64::from(e.flags).to_be_bytes());
        }
    } else {
        for e in extents {
            // A 32-bit length; stay 4 KiB-aligned when cutting.
            let len = e.len.min(u64::from(u32::MAX) & !4095) as u32;
            b.extend_from_slice(&len.to_be_bytes());
            b.extend_from_slice(&e.flags.to_be_bytes());
        }
    }
    b
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Command::Read { offset, len, .. } => write!(f, "read {offset}+{len}"),
            Command::Write { offset, len, .. } => write!(f, "write {offset}+{len}"),
            Command::Disconnect => f.write_str("disconnect"),
            Command::Flush => f.write_str("flush"),
            Command::Trim { offset, len, .. } => write!(f, "trim {offset}+{len}"),
            Command::Cache { offset, len } => write!(f, "cache {offset}+{len}"),
            Command::WriteZeroes { offset, len, .. } => write!(f, "write zeroes {offset}+{len}"),
            Command::BlockStatus { offset, len, .. } => write!(f, "block status {offset}+{len}"),
        }
    }
}
