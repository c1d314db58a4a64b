//! What an NBD server sends, as xdisk's client parses it: the greeting, option reply
//! headers and their data (info, meta context), reply headers (simple, structured,
//! extended), chunk payloads and block status, and read coverage of chunks against a
//! request. No panic; limits hold (option replies, extents, coverage inside the request).
#![no_main]

use libfuzzer_sys::fuzz_target;
use xdisk_nbd::client::*;

fuzz_target!(|data: &[u8]| {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    match sel % 5 {
        0 => {
            if let Some(g) = rest.get(..GREETING_LEN) {
                if let Ok(g) = <&[u8; GREETING_LEN]>::try_from(g) {
                    let _ = parse_greeting(g);
                }
            }
        }
        1 => {
            if let Some(h) = rest.get(..OPTION_REPLY_HEADER_LEN) {
                if let Ok(h) = <&[u8; OPTION_REPLY_HEADER_LEN]>::try_from(h) {
                    if let Ok(h) = OptionReplyHeader::parse(h) {
                        assert!(h.len <= MAX_OPTION_REPLY);
                    }
                }
            }
            let body = rest.get(OPTION_REPLY_HEADER_LEN..).unwrap_or(&[]);
            if let Ok(InfoReply::BlockSize(b)) = InfoReply::parse(body) {
                assert!(check_block_size(&b).is_ok());
            }
            let _ = parse_meta_context(body);
        }
        2 => {
            let magic = rest
                .get(..4)
                .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]));
            if let Some(Ok(n)) = magic.map(reply_header_len) {
                if let Some(h) = rest.get(..n) {
                    let _ = ReplyHeader::parse(h);
                }
            }
            let _ = ReplyHeader::parse(rest);
        }
        3 => {
            if rest.len() < 2 {
                return;
            }
            let kind = u16::from_be_bytes([rest[0], rest[1]]);
            let payload = &rest[2..];
            if let Ok(Chunk::BlockStatus { extents, .. }) =
                parse_chunk(kind, payload.len() as u64, payload)
            {
                assert!(!extents.is_empty() && extents.len() <= MAX_EXTENTS);
                assert!(extents.iter().all(|e| e.len > 0));
            }
            let _ = parse_block_status(kind & 1 == 1, payload);
        }
        _ => {
            // Chunks (offset, len pairs) against a request from the first 16 bytes.
            if rest.len() < 16 {
                return;
            }
            let off = u64::from_be_bytes(rest[..8].try_into().unwrap_or([0; 8])) >> 8;
            let len = u64::from(u32::from_be_bytes(rest[8..12].try_into().unwrap_or([0; 4])));
            let mut c = ReadCoverage::new(off, len);
            for p in rest[16..].chunks_exact(12) {
                let o = off.wrapping_add(u64::from(u32::from_be_bytes([p[0], p[1], p[2], p[3]])));
                let l = u64::from_be_bytes(p[4..12].try_into().unwrap_or([0; 8])) >> 32;
                if let Ok(at) = c.add(o, l) {
                    assert!(at + l <= len);
                }
                assert!(c.covered() <= len);
            }
        }
    }
});
