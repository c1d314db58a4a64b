//! Properties of the NBD wire module: any bytes parse to a value or an error (never a panic),
//! parsed messages encode back to the same bytes, and request validation follows the
//! spec's rules (the error a request gets, or a dropped connection).

use proptest::prelude::*;
use xdisk_nbd::wire::*;

fn negotiated(size: u64, flags_: u16, extended: bool) -> Negotiated {
    Negotiated {
        size,
        flags: flags_ | flags::HAS_FLAGS,
        structured: true,
        extended,
        block: BlockSize {
            minimum: 512,
            preferred: 4096,
            maximum: 32 << 20,
        },
        meta_contexts: true,
    }
}

const ALL_FLAGS: u16 = flags::SEND_FLUSH
    | flags::SEND_FUA
    | flags::SEND_TRIM
    | flags::SEND_WRITE_ZEROES
    | flags::SEND_DF
    | flags::SEND_CACHE
    | flags::SEND_FAST_ZERO;

proptest! {
    #[test]
    fn any_option_header_parses_or_errs(b in proptest::array::uniform16(any::<u8>())) {
        if let Ok(h) = OptionHeader::parse(&b) {
            prop_assert!(h.len <= MAX_OPTION_DATA);
            prop_assert_eq!(h.encode(), b);
        }
    }

    #[test]
    fn any_option_data_parses_or_errs(data in proptest::collection::vec(any::<u8>(), 0..600)) {
        if let Ok(r) = InfoRequest::parse(&data) {
            prop_assert_eq!(r.encode(), data.clone());
        }
        if let Ok(r) = MetaContextRequest::parse(&data) {
            prop_assert!(r.queries.len() <= MAX_QUERIES as usize);
            prop_assert_eq!(r.encode(), data);
        }
    }

    #[test]
    fn info_requests_round_trip(name in "[a-z0-9/._-]{0,40}", reqs in proptest::collection::btree_set(any::<u16>(), 0..8)) {
        let r = InfoRequest { name, requests: reqs.into_iter().collect() };
        prop_assert_eq!(InfoRequest::parse(&r.encode()), Ok(r));
    }

    #[test]
    fn meta_context_requests_round_trip(name in "[a-z]{0,20}", queries in proptest::collection::vec("[a-z:]{1,30}", 0..10)) {
        let r = MetaContextRequest { name, queries };
        prop_assert_eq!(MetaContextRequest::parse(&r.encode()), Ok(r));
    }

    #[test]
    fn any_request_bytes_validate_or_err(
        mut compact in proptest::array::uniform28(any::<u8>()),
        mut ext in proptest::array::uniform32(any::<u8>()),
        size in 0u64..(1 << 40),
        flags_ in any::<u16>(),
        magic_ok in any::<bool>(),
    ) {
        // Mostly the right magic (random bytes would almost never have it), so that the
        // fields behind it get exercised; sometimes anything.
        if magic_ok {
            compact[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
            ext[..4].copy_from_slice(&EXTENDED_REQUEST_MAGIC.to_be_bytes());
            // Small kinds and plausible flags more often than not.
            compact[6] = 0;
            compact[7] %= 10;
            ext[6] = 0;
            ext[7] %= 10;
        }
        let n = negotiated(size, flags_, false);
        if let Ok(h) = RequestHeader::parse_compact(&compact) {
            prop_assert_eq!(h.encode(), compact.to_vec());
            check_command(&h, &n)?;
        }
        let n = negotiated(size, flags_, true);
        if let Ok(h) = RequestHeader::parse_extended(&ext) {
            prop_assert_eq!(h.encode(), ext.to_vec());
            check_command(&h, &n)?;
        }
    }

    #[test]
    fn structured_requests_round_trip(
        flags_ in any::<u16>(), kind in 0u16..10, cookie in any::<u64>(),
        offset in any::<u64>(), length in any::<u32>(), extended in any::<bool>(),
    ) {
        let h = RequestHeader { flags: flags_, kind, cookie, offset, length: length.into(), extended };
        let b = h.encode();
        let back = if extended {
            RequestHeader::parse_extended(b.as_slice().try_into().unwrap())
        } else {
            RequestHeader::parse_compact(b.as_slice().try_into().unwrap())
        };
        prop_assert_eq!(back, Ok(h));
    }
}

/// Whatever `Command::from_header` accepts is inside the export, aligned, within the
/// payload limit and allowed by the negotiated flags.
fn check_command(h: &RequestHeader, n: &Negotiated) -> Result<(), TestCaseError> {
    match Command::from_header(h, n) {
        Ok(c) => {
            let (off, len) = match c {
                Command::Read { offset, len, .. } | Command::Write { offset, len, .. } => {
                    prop_assert!(len <= n.block.maximum);
                    (offset, u64::from(len))
                }
                Command::Trim { offset, len, .. }
                | Command::Cache { offset, len }
                | Command::WriteZeroes { offset, len, .. }
                | Command::BlockStatus { offset, len, .. } => (offset, len),
                Command::Disconnect | Command::Flush => return Ok(()),
            };
            prop_assert!(off.checked_add(len).is_some_and(|e| e <= n.size));
            if matches!(
                c,
                Command::Write { .. } | Command::Trim { .. } | Command::WriteZeroes { .. }
            ) {
                prop_assert_eq!(n.flags & flags::READ_ONLY, 0);
            }
        }
        Err(RequestError::Reply { errno, .. }) => {
            prop_assert!([errno::EINVAL, errno::EPERM, errno::ENOSPC].contains(&errno));
        }
        Err(RequestError::Fatal(_)) => {}
    }
    Ok(())
}

fn header(kind: u16, flags_: u16, offset: u64, length: u64, extended: bool) -> RequestHeader {
    RequestHeader {
        flags: flags_,
        kind,
        cookie: 7,
        offset,
        length,
        extended,
    }
}

fn errno_of(r: Result<Command, RequestError>) -> Option<u32> {
    match r {
        Err(RequestError::Reply { errno, .. }) => Some(errno),
        _ => None,
    }
}

#[test]
fn requests_get_the_errors_the_spec_names() {
    let n = negotiated(1 << 20, ALL_FLAGS, false);
    let ro = negotiated(1 << 20, ALL_FLAGS | flags::READ_ONLY, false);
    // Past the end: reads and trims EINVAL, writes and write zeroes ENOSPC.
    let past = |kind| Command::from_header(&header(kind, 0, 1 << 20, 512, false), &n);
    assert_eq!(errno_of(past(cmd::READ)), Some(errno::EINVAL));
    assert_eq!(errno_of(past(cmd::TRIM)), Some(errno::EINVAL));
    assert_eq!(errno_of(past(cmd::WRITE)), Some(errno::ENOSPC));
    assert_eq!(errno_of(past(cmd::WRITE_ZEROES)), Some(errno::ENOSPC));
    // Read-only exports: EPERM for anything that writes.
    for kind in [cmd::WRITE, cmd::TRIM, cmd::WRITE_ZEROES] {
        let r = Command::from_header(&header(kind, 0, 0, 512, false), &ro);
        assert_eq!(errno_of(r), Some(errno::EPERM), "kind {kind}");
    }
    // Unaligned to the minimum block size: EINVAL.
    let r = Command::from_header(&header(cmd::READ, 0, 100, 512, false), &n);
    assert_eq!(errno_of(r), Some(errno::EINVAL));
    // Offset + length overflowing u64 is past the end, not a wrap.
    let r = Command::from_header(&header(cmd::TRIM, 0, u64::MAX - 511, 1024, false), &n);
    assert_eq!(errno_of(r), Some(errno::EINVAL));
    // Flags on the wrong command, unknown commands and unknown flags: EINVAL.
    let r = Command::from_header(&header(cmd::WRITE, cmd_flags::DF, 0, 512, false), &n);
    assert_eq!(errno_of(r), Some(errno::EINVAL));
    let r = Command::from_header(&header(99, 0, 0, 0, false), &n);
    assert_eq!(errno_of(r), Some(errno::EINVAL));
    let r = Command::from_header(&header(cmd::FLUSH, 1 << 9, 0, 0, false), &n);
    assert_eq!(errno_of(r), Some(errno::EINVAL));
    // A payload over the maximum cannot be skipped safely: drop the client.
    let r = Command::from_header(&header(cmd::WRITE, 0, 0, 64 << 20, false), &n);
    assert!(matches!(r, Err(RequestError::Fatal(_))));
    // A header of the style not negotiated: drop.
    let r = Command::from_header(&header(cmd::READ, 0, 0, 512, true), &n);
    assert!(matches!(r, Err(RequestError::Fatal(_))));
    // Extended: writes carry PAYLOAD_LEN, nothing else does.
    let x = negotiated(1 << 20, ALL_FLAGS, true);
    let w = Command::from_header(
        &header(cmd::WRITE, cmd_flags::PAYLOAD_LEN, 0, 4096, true),
        &x,
    );
    assert_eq!(
        w,
        Ok(Command::Write {
            offset: 0,
            len: 4096,
            fua: false
        })
    );
    let r = Command::from_header(&header(cmd::WRITE, 0, 0, 4096, true), &x);
    assert_eq!(errno_of(r), Some(errno::EINVAL));
    // Extended effect lengths may be 64-bit (trim of a big export).
    let big = negotiated(1 << 42, ALL_FLAGS, true);
    let t = Command::from_header(&header(cmd::TRIM, 0, 0, 1 << 41, true), &big);
    assert_eq!(
        t,
        Ok(Command::Trim {
            offset: 0,
            len: 1 << 41,
            fua: false
        })
    );
}

#[test]
fn replies_have_the_documented_layout() {
    let s = simple_reply(0x1122334455667788, errno::EIO);
    assert_eq!(&s[..4], &SIMPLE_REPLY_MAGIC.to_be_bytes());
    assert_eq!(&s[4..8], &5u32.to_be_bytes());
    let c = chunk_header(false, reply::FLAG_DONE, reply::OFFSET_DATA, 9, 0, 4104);
    assert_eq!(c.len(), 20);
    let e = chunk_header(true, reply::FLAG_DONE, reply::OFFSET_DATA, 9, 4096, 4104);
    assert_eq!(e.len(), 32);
    assert_eq!(
        &e[16..24],
        &4096u64.to_be_bytes(),
        "extended replies echo the offset"
    );
    let p = error_payload(errno::EINVAL, &"x".repeat(5000), Some(12));
    assert_eq!(
        p.len(),
        4 + 2 + MAX_STRING + 8,
        "messages are cut to 4096 bytes"
    );
    let r = option_reply(opt::GO, rep::ACK, &[]);
    assert_eq!(r.len(), 20);
    assert_eq!(info_export(1 << 30, flags::HAS_FLAGS).len(), 12);
    assert_eq!(
        BlockSize {
            minimum: 1,
            preferred: 4096,
            maximum: 32 << 20
        }
        .encode()
        .len(),
        14
    );
    let bs = block_status_payload(
        false,
        1,
        &[Extent {
            len: 1 << 33,
            flags: allocation::HOLE | allocation::ZERO,
        }],
    );
    assert_eq!(bs.len(), 4 + 8);
    assert_eq!(&bs[4..8], &(!4095u32).to_be_bytes(), "cut, 4 KiB aligned");
}

#[test]
fn strings_with_nul_or_bad_utf8_and_duplicate_infos_are_refused() {
    let mut b = Vec::new();
    b.extend_from_slice(&3u32.to_be_bytes());
    b.extend_from_slice(b"a\0b");
    b.extend_from_slice(&0u16.to_be_bytes());
    assert_eq!(
        InfoRequest::parse(&b),
        Err(WireError::BadString("export name"))
    );
    let dup = InfoRequest {
        name: String::new(),
        requests: vec![info::BLOCK_SIZE, info::BLOCK_SIZE],
    };
    assert_eq!(
        InfoRequest::parse(&dup.encode()),
        Err(WireError::Duplicate(info::BLOCK_SIZE))
    );
    // A name length beyond the data: truncated, not a panic or a huge allocation.
    let mut b = Vec::new();
    b.extend_from_slice(&4000u32.to_be_bytes());
    assert!(matches!(
        InfoRequest::parse(&b),
        Err(WireError::Truncated { .. })
    ));
    let mut b = Vec::new();
    b.extend_from_slice(&u32::MAX.to_be_bytes());
    assert!(matches!(
        MetaContextRequest::parse(&b),
        Err(WireError::TooLong { .. })
    ));
}
