//! The client side of the NBD wire format: what a client sends in the handshake (option
//! requests) and how it reads what a server answers (the greeting, option replies, export
//! information, reply headers, structured reply chunks, block status payloads).
//!
//! Everything a server sends is hostile input: every length is checked against the bytes
//! there are and against a limit before anything is allocated, and every parser returns a
//! typed value or a [`WireError`], never panics. Checking a reply against the request it
//! answers (chunks inside the request, reads fully covered, no overlap) is
//! [`ReadCoverage`]'s job.

use std::collections::BTreeMap;

use crate::wire::{
    cmd_flags, info, reply, BlockSize, Cursor, Extent, OptionHeader, WireError,
    EXTENDED_REPLY_MAGIC, IHAVEOPT, MAX_STRING, NBD_MAGIC, OPT_REPLY_MAGIC, SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
};

/// Length of the server's greeting (NBDMAGIC, IHAVEOPT, handshake flags).
pub const GREETING_LEN: usize = 18;
/// Length of an option reply header (magic, option, type, length).
pub const OPTION_REPLY_HEADER_LEN: usize = 20;
/// The largest option reply payload a client reads (names, descriptions and messages are
/// at most [`MAX_STRING`] bytes; anything larger is a hostile server).
pub const MAX_OPTION_REPLY: u32 = 64 * 1024;
/// Length of a simple reply header.
pub const SIMPLE_REPLY_LEN: usize = 16;
/// Length of a structured reply chunk header.
pub const STRUCTURED_REPLY_LEN: usize = 20;
/// Length of an extended reply chunk header.
pub const EXTENDED_REPLY_LEN: usize = 32;
/// The largest payload of a chunk that is not read data: a block status reply of 2^20
/// extended extents (the spec's advice to servers) plus its header.
pub const MAX_METADATA_CHUNK: u64 = 8 + 16 * (1 << 20);
/// The most extents one block status chunk may carry.
pub const MAX_EXTENTS: usize = 1 << 20;
/// The most disjoint pieces a read reply may arrive in before the client gives up on it.
pub const MAX_READ_PIECES: usize = 1 << 16;

/// Text a server sent for humans: lossy UTF-8, cut to [`MAX_STRING`] bytes.
pub fn message_text(b: &[u8]) -> String {
    String::from_utf8_lossy(&b[..b.len().min(MAX_STRING)]).into_owned()
}

/// Parses the server's greeting; returns its handshake flags. An oldstyle server (whose
/// second magic is not `IHAVEOPT`) is refused with [`WireError::BadMagic`].
pub fn parse_greeting(b: &[u8; GREETING_LEN]) -> Result<u16, WireError> {
    let mut c = Cursor {
        buf: b,
        what: "greeting",
    };
    let magic = c.u64()?;
    if magic != NBD_MAGIC {
        return Err(WireError::BadMagic(magic));
    }
    let opt = c.u64()?;
    if opt != IHAVEOPT {
        return Err(WireError::BadMagic(opt));
    }
    c.u16()
}

/// An option request as the client sends it: header and data.
pub fn option_request(option: u32, data: &[u8]) -> Vec<u8> {
    let h = OptionHeader {
        option,
        len: data.len() as u32,
    };
    let mut b = Vec::with_capacity(16 + data.len());
    b.extend_from_slice(&h.encode());
    b.extend_from_slice(data);
    b
}

/// The header of an option reply; `len` bytes of data follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionReplyHeader {
    /// The option it answers.
    pub option: u32,
    /// The reply type (`rep::*`).
    pub reply_type: u32,
    /// Bytes of data that follow (at most [`MAX_OPTION_REPLY`]).
    pub len: u32,
}

impl OptionReplyHeader {
    /// Parses the 20 bytes of an option reply header; a length over [`MAX_OPTION_REPLY`]
    /// is an error.
    pub fn parse(b: &[u8; OPTION_REPLY_HEADER_LEN]) -> Result<OptionReplyHeader, WireError> {
        let mut c = Cursor {
            buf: b,
            what: "option reply",
        };
        let magic = c.u64()?;
        if magic != OPT_REPLY_MAGIC {
            return Err(WireError::BadMagic(magic));
        }
        let option = c.u32()?;
        let reply_type = c.u32()?;
        let len = c.u32()?;
        if len > MAX_OPTION_REPLY {
            return Err(WireError::TooLong {
                what: "option reply",
                len: len.into(),
                max: MAX_OPTION_REPLY.into(),
            });
        }
        Ok(OptionReplyHeader {
            option,
            reply_type,
            len,
        })
    }

    /// Whether the reply is an error (`NBD_REP_ERR_*`).
    pub fn is_error(&self) -> bool {
        self.reply_type & (1 << 31) != 0
    }
}

/// One `NBD_REP_INFO` item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InfoReply {
    /// Size and transmission flags.
    Export {
        /// Size in bytes.
        size: u64,
        /// Transmission flags (`flags::*`).
        flags: u16,
    },
    /// Block size constraints (checked: powers of two, consistent).
    BlockSize(BlockSize),
    /// The canonical name.
    Name(String),
    /// A description for humans.
    Description(String),
    /// An information type this client does not know (to be ignored).
    Unknown(u16),
}

/// The largest minimum block size the spec allows.
pub const MAX_MINIMUM_BLOCK: u32 = 64 * 1024;

/// Checks block size constraints as a server sent them.
pub fn check_block_size(b: &BlockSize) -> Result<(), WireError> {
    let bad = |what: &'static str, len: u32, max: u32| WireError::TooLong {
        what,
        len: len.into(),
        max: max.into(),
    };
    if !b.minimum.is_power_of_two() || b.minimum > MAX_MINIMUM_BLOCK {
        return Err(bad(
            "minimum block size (a power of two)",
            b.minimum,
            MAX_MINIMUM_BLOCK,
        ));
    }
    if !b.preferred.is_power_of_two() || b.preferred < b.minimum {
        return Err(bad(
            "preferred block size (a power of two, at least the minimum)",
            b.preferred,
            u32::MAX,
        ));
    }
    if b.maximum < b.minimum || (b.maximum != u32::MAX && !b.maximum.is_multiple_of(b.minimum)) {
        return Err(bad(
            "maximum payload (a multiple of the minimum)",
            b.maximum,
            u32::MAX,
        ));
    }
    Ok(())
}

impl InfoReply {
    /// Parses the data of an `NBD_REP_INFO` reply.
    pub fn parse(data: &[u8]) -> Result<InfoReply, WireError> {
        let mut c = Cursor {
            buf: data,
            what: "info reply",
        };
        let kind = c.u16()?;
        let r = match kind {
            info::EXPORT => {
                let size = c.u64()?;
                let flags = c.u16()?;
                c.end()?;
                InfoReply::Export { size, flags }
            }
            info::BLOCK_SIZE => {
                let b = BlockSize {
                    minimum: c.u32()?,
                    preferred: c.u32()?,
                    maximum: c.u32()?,
                };
                c.end()?;
                check_block_size(&b)?;
                InfoReply::BlockSize(b)
            }
            info::NAME | info::DESCRIPTION => {
                let s = c.rest();
                if s.len() > MAX_STRING {
                    return Err(WireError::TooLong {
                        what: "info string",
                        len: s.len() as u64,
                        max: MAX_STRING as u64,
                    });
                }
                let s = message_text(s);
                if kind == info::NAME {
                    InfoReply::Name(s)
                } else {
                    InfoReply::Description(s)
                }
            }
            other => InfoReply::Unknown(other),
        };
        Ok(r)
    }
}

/// Parses the data of an `NBD_REP_META_CONTEXT` reply: the context ID and its name.
pub fn parse_meta_context(data: &[u8]) -> Result<(u32, String), WireError> {
    let mut c = Cursor {
        buf: data,
        what: "meta context reply",
    };
    let id = c.u32()?;
    let name = c.rest();
    if name.len() > MAX_STRING {
        return Err(WireError::TooLong {
            what: "meta context name",
            len: name.len() as u64,
            max: MAX_STRING as u64,
        });
    }
    let name = std::str::from_utf8(name).map_err(|_| WireError::BadString("meta context"))?;
    Ok((id, name.to_owned()))
}

/// Length of the reply to `NBD_OPT_EXPORT_NAME` without the 124 zero bytes.
pub const EXPORT_NAME_REPLY_LEN: usize = 10;

/// Parses the first 10 bytes of the reply to `NBD_OPT_EXPORT_NAME`: size and flags.
pub fn parse_export_name_reply(b: &[u8; EXPORT_NAME_REPLY_LEN]) -> (u64, u16) {
    let mut s = [0u8; 8];
    s.copy_from_slice(&b[..8]);
    (u64::from_be_bytes(s), u16::from_be_bytes([b[8], b[9]]))
}

/// The length of the reply header that starts with `magic` (16, 20 or 32 bytes).
pub fn reply_header_len(magic: u32) -> Result<usize, WireError> {
    match magic {
        SIMPLE_REPLY_MAGIC => Ok(SIMPLE_REPLY_LEN),
        STRUCTURED_REPLY_MAGIC => Ok(STRUCTURED_REPLY_LEN),
        EXTENDED_REPLY_MAGIC => Ok(EXTENDED_REPLY_LEN),
        other => Err(WireError::BadMagic(other.into())),
    }
}

/// A reply header as read off the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyHeader {
    /// A simple reply (a successful read's data follows).
    Simple {
        /// The request's cookie.
        cookie: u64,
        /// The NBD error (0: success).
        error: u32,
    },
    /// A structured or extended reply chunk; `len` payload bytes follow.
    Chunk {
        /// `reply::FLAG_*`.
        flags: u16,
        /// The chunk type (`reply::*`).
        kind: u16,
        /// The request's cookie.
        cookie: u64,
        /// Extended chunks echo the request's offset.
        offset: Option<u64>,
        /// Payload length.
        len: u64,
    },
}

impl ReplyHeader {
    /// Parses a whole reply header (its length from [`reply_header_len`]).
    pub fn parse(b: &[u8]) -> Result<ReplyHeader, WireError> {
        let mut c = Cursor {
            buf: b,
            what: "reply header",
        };
        let magic = c.u32()?;
        let need = reply_header_len(magic)?;
        if b.len() != need {
            return Err(WireError::Truncated {
                what: "reply header",
                need,
                got: b.len(),
            });
        }
        Ok(match magic {
            SIMPLE_REPLY_MAGIC => {
                let error = c.u32()?;
                ReplyHeader::Simple {
                    error,
                    cookie: c.u64()?,
                }
            }
            STRUCTURED_REPLY_MAGIC => ReplyHeader::Chunk {
                flags: c.u16()?,
                kind: c.u16()?,
                cookie: c.u64()?,
                offset: None,
                len: c.u32()?.into(),
            },
            _ => ReplyHeader::Chunk {
                flags: c.u16()?,
                kind: c.u16()?,
                cookie: c.u64()?,
                offset: Some(c.u64()?),
                len: c.u64()?,
            },
        })
    }

    /// The cookie of the request it answers.
    pub fn cookie(&self) -> u64 {
        match *self {
            ReplyHeader::Simple { cookie, .. } | ReplyHeader::Chunk { cookie, .. } => cookie,
        }
    }
}

/// The payload of a chunk that is not read data, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Chunk {
    /// `NONE`: no payload.
    None,
    /// `OFFSET_DATA`: `len` bytes of data at `offset` (the data itself is not part of
    /// what [`parse_chunk`] sees when the client reads it straight into its buffer).
    Data {
        /// Offset in the export.
        offset: u64,
        /// Bytes of data.
        len: u64,
    },
    /// `OFFSET_HOLE`: `len` bytes at `offset` read as zeroes.
    Hole {
        /// Offset in the export.
        offset: u64,
        /// Bytes (nonzero).
        len: u64,
    },
    /// `BLOCK_STATUS` or `BLOCK_STATUS_EXT`.
    BlockStatus {
        /// The metadata context.
        id: u32,
        /// The extents (at least one, each nonzero).
        extents: Vec<Extent>,
    },
    /// An error chunk (`ERROR`, `ERROR_OFFSET`, or an unknown type with bit 15 set).
    Error {
        /// The NBD error (nonzero).
        errno: u32,
        /// For humans.
        message: String,
        /// Where (`ERROR_OFFSET`).
        offset: Option<u64>,
    },
}

/// Bytes of an `OFFSET_DATA` payload before the data (the offset).
pub const DATA_PREFIX_LEN: usize = 8;

/// Parses a chunk's payload. `OFFSET_DATA` payloads may be given whole or as their first
/// 8 bytes only (`len` is then the whole payload length, header's `len`); the data length
/// is `len - 8`. Unknown non-error types are errors (the client must hang up).
pub fn parse_chunk(kind: u16, len: u64, payload: &[u8]) -> Result<Chunk, WireError> {
    let mut c = Cursor {
        buf: payload,
        what: "reply chunk",
    };
    if kind == reply::OFFSET_DATA {
        let offset = c.u64()?;
        let data = len.saturating_sub(DATA_PREFIX_LEN as u64);
        if data == 0 {
            return Err(WireError::Truncated {
                what: "data chunk",
                need: DATA_PREFIX_LEN + 1,
                got: len.min(DATA_PREFIX_LEN as u64) as usize,
            });
        }
        return Ok(Chunk::Data { offset, len: data });
    }
    if payload.len() as u64 != len {
        return Err(WireError::Truncated {
            what: "reply chunk",
            need: len.min(usize::MAX as u64) as usize,
            got: payload.len(),
        });
    }
    if len > MAX_METADATA_CHUNK {
        return Err(WireError::TooLong {
            what: "reply chunk",
            len,
            max: MAX_METADATA_CHUNK,
        });
    }
    match kind {
        reply::NONE => {
            c.end()?;
            Ok(Chunk::None)
        }
        reply::OFFSET_HOLE => {
            let offset = c.u64()?;
            let hole = if payload.len() == 16 {
                c.u64()?
            } else {
                c.u32()?.into()
            };
            c.end()?;
            if hole == 0 {
                return Err(WireError::Truncated {
                    what: "hole of 0 bytes",
                    need: 1,
                    got: 0,
                });
            }
            Ok(Chunk::Hole { offset, len: hole })
        }
        reply::BLOCK_STATUS | reply::BLOCK_STATUS_EXT => {
            let (id, extents) = parse_block_status(kind == reply::BLOCK_STATUS_EXT, payload)?;
            Ok(Chunk::BlockStatus { id, extents })
        }
        k if k & (1 << 15) != 0 => {
            let errno = c.u32()?;
            let mlen = c.u16()?;
            if usize::from(mlen) > MAX_STRING {
                return Err(WireError::TooLong {
                    what: "error message",
                    len: mlen.into(),
                    max: MAX_STRING as u64,
                });
            }
            let message = message_text(c.take(mlen.into())?);
            let offset = if k == reply::ERROR_OFFSET {
                let o = c.u64()?;
                c.end()?;
                Some(o)
            } else {
                if k == reply::ERROR {
                    c.end()?;
                }
                None
            };
            // An error of 0 is still an error: report EIO rather than success.
            let errno = if errno == 0 { 5 } else { errno };
            Ok(Chunk::Error {
                errno,
                message,
                offset,
            })
        }
        other => Err(WireError::BadMagic(other.into())),
    }
}

/// Parses a block status payload: the context ID and its extents (at least one, each of
/// nonzero length, at most [`MAX_EXTENTS`]).
pub fn parse_block_status(extended: bool, payload: &[u8]) -> Result<(u32, Vec<Extent>), WireError> {
    let mut c = Cursor {
        buf: payload,
        what: "block status",
    };
    let id = c.u32()?;
    let (n, each) = if extended {
        let n = c.u32()? as usize;
        (n, 16)
    } else {
        (c.buf.len() / 8, 8)
    };
    if n == 0 || n > MAX_EXTENTS {
        return Err(WireError::TooLong {
            what: "extent count (1 to 2^20)",
            len: n as u64,
            max: MAX_EXTENTS as u64,
        });
    }
    if c.buf.len() != n * each {
        return Err(WireError::Trailing("block status"));
    }
    let mut extents = Vec::with_capacity(n);
    for _ in 0..n {
        let (len, flags) = if extended {
            let len = c.u64()?;
            let flags = c.u64()?;
            // Flags of base:allocation fit in 32 bits; others are cut.
            (len, flags as u32)
        } else {
            (c.u32()?.into(), c.u32()?)
        };
        if len == 0 {
            return Err(WireError::Truncated {
                what: "extent of 0 bytes",
                need: 1,
                got: 0,
            });
        }
        extents.push(Extent { len, flags });
    }
    Ok((id, extents))
}

/// The request flag a write carries with extended headers.
pub fn write_flags(extended: bool) -> u16 {
    if extended {
        cmd_flags::PAYLOAD_LEN
    } else {
        0
    }
}

/// Why a chunk does not fit the request it claims to answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CoverageError {
    /// Outside `[offset, offset + len)` of the request.
    #[error("chunk {offset}+{len} outside the request {req_offset}+{req_len}")]
    Outside {
        /// Chunk offset.
        offset: u64,
        /// Chunk length.
        len: u64,
        /// Request offset.
        req_offset: u64,
        /// Request length.
        req_len: u64,
    },
    /// Overlaps an earlier chunk of the same reply.
    #[error("chunk {offset}+{len} overlaps an earlier chunk")]
    Overlap {
        /// Chunk offset.
        offset: u64,
        /// Chunk length.
        len: u64,
    },
    /// More disjoint pieces than [`MAX_READ_PIECES`].
    #[error("read reply in more than {MAX_READ_PIECES} pieces")]
    TooFragmented,
}

/// Tracks which bytes of a read request the chunks of its reply covered: every chunk must
/// lie inside the request and not overlap an earlier one; the reply is complete when every
/// byte was covered. Memory is bounded ([`MAX_READ_PIECES`] disjoint pieces).
#[derive(Debug, Clone)]
pub struct ReadCoverage {
    offset: u64,
    len: u64,
    covered: u64,
    /// Disjoint covered ranges, start -> end, adjacent ones merged.
    pieces: BTreeMap<u64, u64>,
}

impl ReadCoverage {
    /// Coverage of a read of `len` bytes at `offset`.
    pub fn new(offset: u64, len: u64) -> ReadCoverage {
        ReadCoverage {
            offset,
            len,
            covered: 0,
            pieces: BTreeMap::new(),
        }
    }

    /// Where in the request buffer a chunk at `offset` of `len` bytes goes, after checking
    /// it lies inside the request and overlaps nothing earlier; records it.
    pub fn add(&mut self, offset: u64, len: u64) -> Result<u64, CoverageError> {
        let end = offset.checked_add(len);
        let req_end = self.offset.saturating_add(self.len);
        let outside = CoverageError::Outside {
            offset,
            len,
            req_offset: self.offset,
            req_len: self.len,
        };
        let end = match end {
            Some(e) if offset >= self.offset && e <= req_end && len > 0 => e,
            _ => return Err(outside),
        };
        // The piece starting at or before `offset`, and the first one after it.
        if let Some((_, &pe)) = self.pieces.range(..=offset).next_back() {
            if pe > offset {
                return Err(CoverageError::Overlap { offset, len });
            }
        }
        if let Some((&ns, _)) = self.pieces.range(offset..).next() {
            if ns < end {
                return Err(CoverageError::Overlap { offset, len });
            }
        }
        let mut start = offset;
        let mut stop = end;
        // Merge with the neighbours it touches.
        if let Some((&ps, &pe)) = self.pieces.range(..offset).next_back() {
            if pe == offset {
                self.pieces.remove(&ps);
                start = ps;
            }
        }
        if let Some(ne) = self.pieces.get(&end).copied() {
            self.pieces.remove(&end);
            stop = ne;
        }
        if self.pieces.len() >= MAX_READ_PIECES {
            return Err(CoverageError::TooFragmented);
        }
        self.pieces.insert(start, stop);
        self.covered += len;
        Ok(offset - self.offset)
    }

    /// Whether every byte of the request was covered.
    pub fn complete(&self) -> bool {
        self.covered == self.len
    }

    /// Bytes covered so far.
    pub fn covered(&self) -> u64 {
        self.covered
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{block_status_payload, chunk_header, error_payload, option_reply, rep};
    use proptest::prelude::*;

    #[test]
    fn greeting_and_option_replies_round_trip() {
        let mut g = [0u8; GREETING_LEN];
        g[..8].copy_from_slice(&NBD_MAGIC.to_be_bytes());
        g[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
        g[16..].copy_from_slice(&3u16.to_be_bytes());
        assert_eq!(parse_greeting(&g), Ok(3));
        g[8] = 0;
        assert!(parse_greeting(&g).is_err());

        let r = option_reply(7, rep::INFO, &crate::wire::info_export(1 << 30, 0x1ed));
        let mut h = [0u8; OPTION_REPLY_HEADER_LEN];
        h.copy_from_slice(&r[..20]);
        let h = OptionReplyHeader::parse(&h).unwrap();
        assert_eq!((h.option, h.reply_type, h.len), (7, rep::INFO, 12));
        assert_eq!(
            InfoReply::parse(&r[20..]).unwrap(),
            InfoReply::Export {
                size: 1 << 30,
                flags: 0x1ed
            }
        );
        let bs = BlockSize {
            minimum: 512,
            preferred: 4096,
            maximum: 1 << 25,
        };
        assert_eq!(
            InfoReply::parse(&bs.encode()).unwrap(),
            InfoReply::BlockSize(bs)
        );
        let bad = BlockSize {
            minimum: 3,
            preferred: 4096,
            maximum: 1 << 25,
        };
        assert!(InfoReply::parse(&bad.encode()).is_err());
        let mut big = [0u8; OPTION_REPLY_HEADER_LEN];
        big.copy_from_slice(&option_reply(7, rep::ACK, &[])[..20]);
        big[16..].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(OptionReplyHeader::parse(&big).is_err());
    }

    #[test]
    fn chunks_parse_as_the_server_encodes_them() {
        for extended in [false, true] {
            let h = chunk_header(extended, reply::FLAG_DONE, reply::ERROR, 9, 4096, 20);
            let p = ReplyHeader::parse(&h).unwrap();
            assert_eq!(
                p,
                ReplyHeader::Chunk {
                    flags: reply::FLAG_DONE,
                    kind: reply::ERROR,
                    cookie: 9,
                    offset: extended.then_some(4096),
                    len: 20
                }
            );
            let e = [
                Extent {
                    len: 4096,
                    flags: 3,
                },
                Extent { len: 512, flags: 0 },
            ];
            let kind = if extended {
                reply::BLOCK_STATUS_EXT
            } else {
                reply::BLOCK_STATUS
            };
            let pl = block_status_payload(extended, 1, &e);
            assert_eq!(
                parse_chunk(kind, pl.len() as u64, &pl).unwrap(),
                Chunk::BlockStatus {
                    id: 1,
                    extents: e.to_vec()
                }
            );
        }
        let pl = error_payload(28, "full", Some(4096));
        assert_eq!(
            parse_chunk(reply::ERROR_OFFSET, pl.len() as u64, &pl).unwrap(),
            Chunk::Error {
                errno: 28,
                message: "full".into(),
                offset: Some(4096)
            }
        );
        assert_eq!(
            parse_chunk(reply::OFFSET_DATA, 8 + 512, &4096u64.to_be_bytes()).unwrap(),
            Chunk::Data {
                offset: 4096,
                len: 512
            }
        );
        assert!(parse_chunk(reply::OFFSET_DATA, 8, &4096u64.to_be_bytes()).is_err());
        assert!(parse_chunk(77, 0, &[]).is_err());
        let s = crate::wire::simple_reply(5, 0);
        assert_eq!(
            ReplyHeader::parse(&s).unwrap(),
            ReplyHeader::Simple {
                cookie: 5,
                error: 0
            }
        );
    }

    #[test]
    fn coverage_refuses_outside_and_overlapping_chunks() {
        let mut c = ReadCoverage::new(4096, 8192);
        assert_eq!(c.add(8192, 4096), Ok(4096));
        assert!(matches!(c.add(0, 4096), Err(CoverageError::Outside { .. })));
        assert!(matches!(c.add(8192, 1), Err(CoverageError::Overlap { .. })));
        assert!(matches!(
            c.add(8000, 200),
            Err(CoverageError::Overlap { .. })
        ));
        assert!(matches!(
            c.add(12000, 1000),
            Err(CoverageError::Outside { .. })
        ));
        assert!(!c.complete());
        assert_eq!(c.add(4096, 4096), Ok(0));
        assert!(c.complete());
        assert!(c.add(u64::MAX, 2).is_err());
    }

    proptest! {
        #[test]
        fn parsers_never_panic(kind in any::<u16>(), data in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = parse_chunk(kind, data.len() as u64, &data);
            let _ = parse_block_status(kind & 1 == 0, &data);
            let _ = InfoReply::parse(&data);
            let _ = parse_meta_context(&data);
            let _ = ReplyHeader::parse(&data);
        }

        #[test]
        fn coverage_matches_a_bitmap(req_off in 0u64..64, req_len in 1u64..64,
                                     chunks in proptest::collection::vec((0u64..140, 0u64..40), 0..30)) {
            let mut c = ReadCoverage::new(req_off, req_len);
            let mut bits = vec![false; 256];
            for (o, l) in chunks {
                let inside = l > 0 && o >= req_off && o + l <= req_off + req_len;
                let free = inside && (o..o + l).all(|i| !bits[i as usize]);
                let r = c.add(o, l);
                prop_assert_eq!(r.is_ok(), free, "{}+{}", o, l);
                if free {
                    for i in o..o + l { bits[i as usize] = true; }
                }
            }
            let all = (req_off..req_off + req_len).all(|i| bits[i as usize]);
            prop_assert_eq!(c.complete(), all);
        }
    }
}
