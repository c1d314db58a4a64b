//! NBD messages as a server parses them: option headers and the data of INFO/GO and the
//! meta context options, then request headers (compact and extended) validated against a
//! negotiated state taken from the input. No panic; whatever parses encodes back to the same
//! bytes; whatever validates lies inside the export and the payload limit.
#![no_main]

use libfuzzer_sys::fuzz_target;
use xdisk_nbd::wire::*;

fuzz_target!(|data: &[u8]| {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    match sel % 4 {
        0 => {
            if let Ok(b) =
                <&[u8; OPTION_HEADER_LEN]>::try_from(rest.get(..OPTION_HEADER_LEN).unwrap_or(&[]))
            {
                if let Ok(h) = OptionHeader::parse(b) {
                    assert_eq!(&h.encode(), b);
                    assert!(h.len <= MAX_OPTION_DATA);
                }
            }
        }
        1 => {
            if let Ok(r) = InfoRequest::parse(rest) {
                assert_eq!(r.encode(), rest);
            }
            if let Ok(r) = MetaContextRequest::parse(rest) {
                assert_eq!(r.encode(), rest);
            }
        }
        _ => {
            // 10 bytes of negotiated state (size, transmission flags), then a header.
            let Some((state, hdr)) = rest.split_first_chunk::<10>() else {
                return;
            };
            let size = u64::from_le_bytes(state[..8].try_into().unwrap_or([0; 8]));
            let flags_ = u16::from_le_bytes([state[8], state[9]]);
            let extended = sel % 4 == 3;
            let n = Negotiated {
                size,
                flags: flags_ | flags::HAS_FLAGS,
                structured: true,
                extended,
                block: BlockSize {
                    minimum: 1 << (sel % 13),
                    preferred: 4096,
                    maximum: 32 << 20,
                },
                meta_contexts: sel & 0x80 != 0,
            };
            let h = if extended {
                hdr.first_chunk::<EXTENDED_REQUEST_LEN>()
                    .and_then(|b| RequestHeader::parse_extended(b).ok())
            } else {
                hdr.first_chunk::<REQUEST_LEN>()
                    .and_then(|b| RequestHeader::parse_compact(b).ok())
            };
            let Some(h) = h else { return };
            if let Ok(c) = Command::from_header(&h, &n) {
                let (off, len) = match c {
                    Command::Read { offset, len, .. } | Command::Write { offset, len, .. } => {
                        assert!(len <= n.block.maximum);
                        (offset, u64::from(len))
                    }
                    Command::Trim { offset, len, .. }
                    | Command::Cache { offset, len }
                    | Command::WriteZeroes { offset, len, .. }
                    | Command::BlockStatus { offset, len, .. } => (offset, len),
                    Command::Disconnect | Command::Flush => return,
                };
                assert!(off.checked_add(len).is_some_and(|e| e <= n.size));
            }
        }
    }
});
