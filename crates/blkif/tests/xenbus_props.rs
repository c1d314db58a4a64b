//! Hostile xenstore values: the frontend connect parser and the value
//! parsers never panic, and whatever they accept is within bounds.

use std::collections::BTreeMap;

use proptest::prelude::*;
use xdisk_blkif::ring::{rd32, MAX_RING_PAGE_ORDER};
use xdisk_blkif::xenbus::{
    keys, parse_bool, parse_u32, parse_u64, ConnectLimits, FrontendConnect, XenbusState,
    MAX_QUEUES_LIMIT,
};

/// Values that are sometimes valid, often not.
fn value() -> impl Strategy<Value = String> {
    prop_oneof![
        (0u64..40).prop_map(|v| v.to_string()),
        any::<u32>().prop_map(|v| v.to_string()),
        any::<u64>().prop_map(|v| v.to_string()),
        Just("x86_32-abi".to_string()),
        Just("x86_64-abi".to_string()),
        Just("arm-abi".to_string()),
        Just(String::new()),
        Just("-1".to_string()),
        Just(" 1".to_string()),
        Just("99999999999999999999999999".to_string()),
        ".{0,40}",
    ]
}

fn key() -> impl Strategy<Value = String> {
    let base = prop_oneof![
        Just(keys::RING_REF.to_string()),
        (0u32..20).prop_map(keys::ring_ref),
        Just(keys::EVENT_CHANNEL.to_string()),
    ];
    prop_oneof![
        Just(keys::PROTOCOL.to_string()),
        Just(keys::RING_PAGE_ORDER.to_string()),
        Just(keys::MULTI_QUEUE_NUM_QUEUES.to_string()),
        Just(keys::FEATURE_PERSISTENT.to_string()),
        base.clone(),
        ((0u32..6), base).prop_map(|(q, k)| format!("{}{k}", keys::queue_dir(q))),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1024))]

    #[test]
    fn connect_parser_is_total_and_bounded(
        nodes in prop::collection::btree_map(key(), value(), 0..30),
        max_order in 0u32..10,
        max_queues in prop_oneof![0u32..8, Just(u32::MAX)],
    ) {
        let limits = ConnectLimits { max_ring_page_order: max_order, max_queues };
        let nodes: BTreeMap<String, String> = nodes;
        if let Ok(c) = FrontendConnect::parse(|k| nodes.get(k).cloned(), &limits) {
            prop_assert!(c.ring_page_order <= max_order.min(MAX_RING_PAGE_ORDER));
            prop_assert!(!c.queues.is_empty());
            prop_assert!(c.queues.len() as u32 <= max_queues.clamp(1, MAX_QUEUES_LIMIT));
            for q in &c.queues {
                prop_assert_eq!(q.ring_refs.len(), 1usize << c.ring_page_order);
            }
        }
    }

    #[test]
    fn value_parsers_are_strict(s in ".{0,30}") {
        if let Ok(v) = parse_u64(&s) {
            prop_assert!(s.bytes().all(|b| b.is_ascii_digit()));
            prop_assert_eq!(s.trim_start_matches('0').parse::<u64>().unwrap_or(0), v);
        }
        if let Ok(v) = parse_u32(&s) {
            prop_assert_eq!(parse_u64(&s), Ok(u64::from(v)));
        }
        if let Ok(b) = parse_bool(&s) {
            prop_assert_eq!(s.as_str(), if b { "1" } else { "0" });
        }
        if let Ok(st) = s.parse::<XenbusState>() {
            prop_assert!(st.to_u32() <= 8);
        }
    }

    #[test]
    fn decimal_round_trip(v in any::<u64>()) {
        prop_assert_eq!(parse_u64(&v.to_string()), Ok(v));
    }

    #[test]
    fn rd32_rounds_down_to_a_power_of_two(x in any::<u32>()) {
        let r = rd32(x);
        if x == 0 {
            prop_assert_eq!(r, 0);
        } else {
            prop_assert!(r.is_power_of_two());
            prop_assert!(r <= x);
            prop_assert!(u64::from(r) * 2 > u64::from(x));
        }
    }
}
