//! Property tests of the wire encoding: round trips for valid messages, no panics (and only
//! bounded reads) on arbitrary bytes.

use proptest::prelude::*;

use xdisk_xen::xenstore::wire::{
    self, join_strings, split_strings, Header, Message, MsgType, HEADER_LEN, XENSTORE_PAYLOAD_MAX,
};
use xdisk_xen::xenstore::{parse_message, Access, Errno, MessageError, Perm, XsRequest};

fn component() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9_@-]{1,12}"
}

fn abs_path() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("/".to_string()),
        prop::collection::vec(component(), 1..8).prop_map(|c| format!("/{}", c.join("/"))),
    ]
}

fn rel_path() -> impl Strategy<Value = String> {
    // A relative path may not start with '@' (that would be a special name).
    ("[a-z0-9_-]{1,12}", prop::collection::vec(component(), 0..5)).prop_map(|(first, rest)| {
        std::iter::once(first)
            .chain(rest)
            .collect::<Vec<_>>()
            .join("/")
    })
}

fn path() -> impl Strategy<Value = String> {
    prop_oneof![abs_path(), rel_path()]
}

fn watch_path() -> impl Strategy<Value = String> {
    prop_oneof![path(), "@[a-zA-Z]{1,20}"]
}

fn token() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(1u8..=255, 0..40)
}

fn perm() -> impl Strategy<Value = Perm> {
    (
        prop_oneof![
            Just(Access::None),
            Just(Access::Read),
            Just(Access::Write),
            Just(Access::Both)
        ],
        any::<u16>(),
    )
        .prop_map(|(a, d)| Perm::new(a, d))
}

fn request() -> impl Strategy<Value = XsRequest> {
    prop_oneof![
        path().prop_map(|path| XsRequest::Read { path }),
        (path(), prop::collection::vec(any::<u8>(), 0..200))
            .prop_map(|(path, value)| XsRequest::Write { path, value }),
        path().prop_map(|path| XsRequest::Mkdir { path }),
        path().prop_map(|path| XsRequest::Rm { path }),
        path().prop_map(|path| XsRequest::Directory { path }),
        (path(), any::<u32>()).prop_map(|(path, offset)| XsRequest::DirectoryPart { path, offset }),
        watch_path().prop_map(|path| XsRequest::GetPerms { path }),
        (watch_path(), prop::collection::vec(perm(), 1..8))
            .prop_map(|(path, perms)| XsRequest::SetPerms { path, perms }),
        (watch_path(), token()).prop_map(|(path, token)| XsRequest::Watch { path, token }),
        (watch_path(), token()).prop_map(|(path, token)| XsRequest::Unwatch { path, token }),
        Just(XsRequest::TransactionStart),
        any::<bool>().prop_map(|commit| XsRequest::TransactionEnd { commit }),
        any::<u16>().prop_map(|domid| XsRequest::GetDomainPath { domid }),
        (any::<u16>(), any::<u64>(), any::<u32>())
            .prop_map(|(domid, mfn, evtchn)| XsRequest::Introduce { domid, mfn, evtchn }),
        any::<u16>().prop_map(|domid| XsRequest::Release { domid }),
        any::<u16>().prop_map(|domid| XsRequest::IsDomainIntroduced { domid }),
        any::<u16>().prop_map(|domid| XsRequest::Resume { domid }),
        (any::<u16>(), any::<u16>())
            .prop_map(|(domid, target)| XsRequest::SetTarget { domid, target }),
        Just(XsRequest::ResetWatches),
        prop::collection::vec(prop::collection::vec(1u8..=255, 1..10), 1..4)
            .prop_map(|args| XsRequest::Control { args }),
    ]
}

fn any_type() -> impl Strategy<Value = MsgType> {
    prop_oneof![
        (0u32..30).prop_map(MsgType::from_u32),
        any::<u32>().prop_map(MsgType::from_u32)
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn header_round_trip(ty in any::<u32>(), req_id in any::<u32>(), tx_id in any::<u32>(), len in any::<u32>()) {
        let h = Header { msg_type: MsgType::from_u32(ty), req_id, tx_id, len };
        let b = h.encode();
        prop_assert_eq!(Header::decode(&b), h);
        prop_assert_eq!(u32::from_le_bytes([b[0], b[1], b[2], b[3]]), ty);
        prop_assert_eq!(h.check_len().is_ok(), len as usize <= XENSTORE_PAYLOAD_MAX);
    }

    #[test]
    fn request_round_trip(req in request(), req_id in any::<u32>(), tx_id in any::<u32>()) {
        let (ty, payload) = req.encode();
        prop_assert_eq!(XsRequest::decode(ty, &payload), Ok(req.clone()));
        // Through a full message and the server's parser.
        let msg = Message::new(ty, req_id, tx_id, payload).unwrap();
        let bytes = msg.encode();
        let parsed = parse_message(&bytes).unwrap();
        prop_assert_eq!(parsed.header, msg.header);
        prop_assert_eq!(parsed.request, Ok(req));
        prop_assert_eq!(parsed.consumed, bytes.len());
        // And through the stream reader.
        let read = wire::read_message(&mut &bytes[..]).unwrap().unwrap();
        prop_assert_eq!(read, msg);
    }

    #[test]
    fn parse_message_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..5000)) {
        match parse_message(&bytes) {
            Ok(p) => {
                prop_assert!(p.consumed <= bytes.len());
                prop_assert_eq!(p.consumed, HEADER_LEN + p.header.len as usize);
            }
            Err(MessageError::ShortHeader(n)) => prop_assert!(n < HEADER_LEN),
            Err(MessageError::TooLong(len)) => prop_assert!(len as usize > XENSTORE_PAYLOAD_MAX),
            Err(MessageError::ShortPayload { expected, got }) => prop_assert!(got < expected),
        }
        // The stream reader agrees on framing.
        let r = wire::read_message(&mut &bytes[..]);
        prop_assert_eq!(r.is_ok() && r.as_ref().unwrap().is_some(), parse_message(&bytes).is_ok());
    }

    #[test]
    fn framed_garbage_is_an_errno_not_a_panic(ty in any_type(), payload in prop::collection::vec(any::<u8>(), 0..600)) {
        let msg = Message::new(ty, 1, 0, payload).unwrap();
        let parsed = parse_message(&msg.encode()).unwrap();
        if let Err(e) = parsed.request {
            prop_assert!(Errno::ALL.contains(&e));
        }
    }

    #[test]
    fn framed_near_miss_requests(ty in (0u32..23).prop_map(MsgType::from_u32),
                                 parts in prop::collection::vec(prop::collection::vec(prop::sample::select(b"/ab@_-0.T5rn\xff".to_vec()), 0..12), 0..5),
                                 terminated in any::<bool>()) {
        let mut payload = join_strings(&parts);
        if !terminated {
            payload.pop();
        }
        // Decoding must not panic; a success re-encodes to something that decodes the same.
        if let Ok(req) = XsRequest::decode(ty, &payload) {
            let (ty2, p2) = req.encode();
            prop_assert_eq!(ty2, ty);
            prop_assert_eq!(XsRequest::decode(ty2, &p2), Ok(req));
        }
    }

    #[test]
    fn strings_round_trip(parts in prop::collection::vec(prop::collection::vec(1u8..=255, 0..20), 0..10)) {
        let payload = join_strings(&parts);
        let split = split_strings(&payload).unwrap();
        if parts.is_empty() {
            prop_assert!(split.is_empty());
        } else {
            prop_assert_eq!(split, parts.iter().map(Vec::as_slice).collect::<Vec<_>>());
        }
    }

    #[test]
    fn perm_round_trip(p in perm()) {
        prop_assert_eq!(p.to_string().parse::<Perm>(), Ok(p));
    }

    #[test]
    fn errno_round_trip(i in 0usize..16) {
        let e = Errno::ALL[i];
        prop_assert_eq!(Errno::from_payload(&e.to_payload()), e);
        prop_assert_eq!(Errno::from_name(e.as_str().as_bytes()), Some(e));
    }
}
