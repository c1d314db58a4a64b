//! Xenstore side of the block protocol: xenbus states (xen/io/xenbus.h),
//! the node names of blkif.h's "Feature and Parameter Negotiation" section
//! and its multi-queue section, and a parser for the nodes a frontend
//! publishes before connecting.
//!
//! Nothing here talks to xenstore: the backend loop reads and writes the
//! nodes and hands the values to these functions. Every value under the
//! frontend's directory is written by the guest and is parsed as hostile:
//! strict decimal, bounded, typed errors, no panics.

use std::fmt;
use std::str::FromStr;

use crate::abi::{truncate_for_display, Abi, UnknownProtocol};
use crate::ring::MAX_RING_PAGE_ORDER;

/// `enum xenbus_state` (xen/io/xenbus.h lines 19-50).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u32)]
pub enum XenbusState {
    /// `XenbusStateUnknown` = 0.
    Unknown = 0,
    /// `XenbusStateInitialising` = 1.
    Initialising = 1,
    /// `XenbusStateInitWait` = 2: early init done, waiting for the peer or
    /// the hotplug scripts.
    InitWait = 2,
    /// `XenbusStateInitialised` = 3: waiting for a connection from the peer.
    Initialised = 3,
    /// `XenbusStateConnected` = 4.
    Connected = 4,
    /// `XenbusStateClosing` = 5: closing because of an error or an unplug.
    Closing = 5,
    /// `XenbusStateClosed` = 6.
    Closed = 6,
    /// `XenbusStateReconfiguring` = 7.
    Reconfiguring = 7,
    /// `XenbusStateReconfigured` = 8.
    Reconfigured = 8,
}

impl XenbusState {
    /// All states, by value.
    pub const ALL: [XenbusState; 9] = [
        XenbusState::Unknown,
        XenbusState::Initialising,
        XenbusState::InitWait,
        XenbusState::Initialised,
        XenbusState::Connected,
        XenbusState::Closing,
        XenbusState::Closed,
        XenbusState::Reconfiguring,
        XenbusState::Reconfigured,
    ];

    /// From the numeric value.
    pub const fn from_u32(v: u32) -> Option<XenbusState> {
        match v {
            0 => Some(XenbusState::Unknown),
            1 => Some(XenbusState::Initialising),
            2 => Some(XenbusState::InitWait),
            3 => Some(XenbusState::Initialised),
            4 => Some(XenbusState::Connected),
            5 => Some(XenbusState::Closing),
            6 => Some(XenbusState::Closed),
            7 => Some(XenbusState::Reconfiguring),
            8 => Some(XenbusState::Reconfigured),
            _ => None,
        }
    }

    /// The numeric value.
    pub const fn to_u32(self) -> u32 {
        self as u32
    }

    /// The name without the `XenbusState` prefix, for logs.
    pub const fn name(self) -> &'static str {
        match self {
            XenbusState::Unknown => "Unknown",
            XenbusState::Initialising => "Initialising",
            XenbusState::InitWait => "InitWait",
            XenbusState::Initialised => "Initialised",
            XenbusState::Connected => "Connected",
            XenbusState::Closing => "Closing",
            XenbusState::Closed => "Closed",
            XenbusState::Reconfiguring => "Reconfiguring",
            XenbusState::Reconfigured => "Reconfigured",
        }
    }
}

/// Writes the value as stored in a `state` node: the decimal number, so
/// that `state.to_string()` is what to write and `parse()` reads it back.
/// Use [`XenbusState::name`] for humans.
impl fmt::Display for XenbusState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.to_u32())
    }
}

impl FromStr for XenbusState {
    type Err = NodeError;
    /// Parses a `state` node value (decimal, as written by the peer).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let v = parse_u32(s)?;
        XenbusState::from_u32(v).ok_or(NodeError::OutOfRange {
            value: u64::from(v),
            max: 8,
        })
    }
}

/// Node names (relative to the backend's or frontend's device directory).
pub mod keys {
    /// Both ends: the xenbus state.
    pub const STATE: &str = "state";

    // ---- Backend, device identification (PRIVATE) ----
    /// `"r"` or `"w"`.
    pub const MODE: &str = "mode";
    /// Free-form string for the hotplug script / backend (image path).
    pub const PARAMS: &str = "params";
    /// `"file"`, `"phy"`, `"tap"`, ...
    pub const TYPE: &str = "type";
    /// Set by the toolstack: 1 while the device should stay connected.
    pub const ONLINE: &str = "online";
    /// Written by the backend/hotplug script: `"connected"` when ready.
    pub const HOTPLUG_STATUS: &str = "hotplug-status";
    /// `"MAJOR:MINOR"` of the backing device (Linux, NetBSD).
    pub const PHYSICAL_DEVICE: &str = "physical-device";
    /// Toolstack: whether the backend should offer discard (default 1).
    pub const DISCARD_ENABLE: &str = "discard-enable";

    // ---- Backend features ----
    /// 0/1: `BLKIF_OP_WRITE_BARRIER` supported.
    pub const FEATURE_BARRIER: &str = "feature-barrier";
    /// 0/1: `BLKIF_OP_FLUSH_DISKCACHE` supported.
    pub const FEATURE_FLUSH_CACHE: &str = "feature-flush-cache";
    /// 0/1: `BLKIF_OP_DISCARD` supported.
    pub const FEATURE_DISCARD: &str = "feature-discard";
    /// 0/1 (both ends): persistent grants.
    pub const FEATURE_PERSISTENT: &str = "feature-persistent";
    /// Maximum segments per indirect request (node absent: no indirect).
    pub const FEATURE_MAX_INDIRECT_SEGMENTS: &str = "feature-max-indirect-segments";
    /// Largest ring page order the backend maps.
    pub const MAX_RING_PAGE_ORDER: &str = "max-ring-page-order";
    /// Deprecated page-count form of the above (not used by xdisk).
    pub const MAX_RING_PAGES: &str = "max-ring-pages";
    /// Largest number of queues (rings) the backend accepts.
    pub const MULTI_QUEUE_MAX_QUEUES: &str = "multi-queue-max-queues";

    // ---- Backend device properties ----
    /// Bytes: first addressable discard extent.
    pub const DISCARD_ALIGNMENT: &str = "discard-alignment";
    /// Bytes: discard extent size.
    pub const DISCARD_GRANULARITY: &str = "discard-granularity";
    /// 0/1: `BLKIF_DISCARD_SECURE` honoured.
    pub const DISCARD_SECURE: &str = "discard-secure";
    /// `VDISK_*` bitmap.
    pub const INFO: &str = "info";
    /// Logical block size in bytes.
    pub const SECTOR_SIZE: &str = "sector-size";
    /// Physical block size in bytes.
    pub const PHYSICAL_SECTOR_SIZE: &str = "physical-sector-size";
    /// Disk size in `sector-size` units.
    pub const SECTORS: &str = "sectors";

    // ---- Frontend transport parameters ----
    /// Event channel port of a ring.
    pub const EVENT_CHANNEL: &str = "event-channel";
    /// Grant ref of a single-page ring.
    pub const RING_REF: &str = "ring-ref";
    /// Ring page order chosen by the frontend.
    pub const RING_PAGE_ORDER: &str = "ring-page-order";
    /// Deprecated page-count form of the above (not used by xdisk).
    pub const NUM_RING_PAGES: &str = "num-ring-pages";
    /// Ring ABI (`XEN_IO_PROTO_ABI_*`).
    pub const PROTOCOL: &str = "protocol";
    /// Number of queues the frontend uses.
    pub const MULTI_QUEUE_NUM_QUEUES: &str = "multi-queue-num-queues";
    /// 0/1: frontend handles `sector-size` other than 512.
    pub const FEATURE_LARGE_SECTOR_SIZE: &str = "feature-large-sector-size";
    /// Frontend virtual device properties.
    pub const VIRTUAL_DEVICE: &str = "virtual-device";
    /// `"disk"`, `"cdrom"`, ...
    pub const DEVICE_TYPE: &str = "device-type";

    /// `ring-ref%u`: grant ref of page `i` of a multi-page ring.
    pub fn ring_ref(i: u32) -> String {
        format!("ring-ref{i}")
    }

    /// `queue-%u/`: directory prefix of queue `i` when there are several.
    pub fn queue_dir(i: u32) -> String {
        format!("queue-{i}/")
    }
}

/// `VDISK_CDROM` (blkif.h).
pub const VDISK_CDROM: u32 = 0x1;
/// `VDISK_REMOVABLE` (blkif.h).
pub const VDISK_REMOVABLE: u32 = 0x2;
/// `VDISK_READONLY` (blkif.h).
pub const VDISK_READONLY: u32 = 0x4;

/// The backend `mode` node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mode {
    /// `"r"`.
    ReadOnly,
    /// `"w"`.
    ReadWrite,
}

impl Mode {
    /// The node value.
    pub const fn as_str(self) -> &'static str {
        match self {
            Mode::ReadOnly => "r",
            Mode::ReadWrite => "w",
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Mode {
    type Err = NodeError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "r" => Ok(Mode::ReadOnly),
            "w" => Ok(Mode::ReadWrite),
            _ => Err(NodeError::Invalid(truncate_for_display(s))),
        }
    }
}

/// A node value that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NodeError {
    /// Not a plain decimal number / boolean / known word.
    #[error("invalid value {0:?}")]
    Invalid(String),
    /// A number above the allowed maximum.
    #[error("value {value} exceeds the maximum {max}")]
    OutOfRange {
        /// The value.
        value: u64,
        /// The maximum.
        max: u64,
    },
}

/// The longest numeric node value accepted (u64::MAX has 20 digits; allow
/// some leading zeros, reject megabyte-long digit strings early).
const MAX_NUMBER_LEN: usize = 32;

/// Parses a decimal u64 node value strictly: ASCII digits only (leading
/// zeros allowed), no sign, no whitespace, non-empty, no overflow.
pub fn parse_u64(s: &str) -> Result<u64, NodeError> {
    let invalid = || NodeError::Invalid(truncate_for_display(s));
    if s.is_empty() || s.len() > MAX_NUMBER_LEN || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(invalid());
    }
    s.bytes().try_fold(0u64, |acc, b| {
        acc.checked_mul(10)
            .and_then(|v| v.checked_add(u64::from(b - b'0')))
            .ok_or_else(invalid)
    })
}

/// Parses a decimal u32 node value strictly (see [`parse_u64`]).
pub fn parse_u32(s: &str) -> Result<u32, NodeError> {
    let v = parse_u64(s)?;
    u32::try_from(v).map_err(|_| NodeError::OutOfRange {
        value: v,
        max: u64::from(u32::MAX),
    })
}

/// Parses a 0/1 boolean node value.
pub fn parse_bool(s: &str) -> Result<bool, NodeError> {
    match s {
        "0" => Ok(false),
        "1" => Ok(true),
        _ => Err(NodeError::Invalid(truncate_for_display(s))),
    }
}

/// What the backend publishes: its features and transport limits (before
/// InitWait) and the device properties (before Connected).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendFeatures {
    /// "feature-flush-cache".
    pub flush_cache: bool,
    /// "feature-barrier".
    pub barrier: bool,
    /// "feature-discard", with "discard-granularity",
    /// "discard-alignment" (bytes) and "discard-secure".
    pub discard: Option<DiscardParams>,
    /// "feature-max-indirect-segments" (0: node not written, no indirect).
    pub max_indirect_segments: u16,
    /// "feature-persistent".
    pub persistent: bool,
    /// "max-ring-page-order" (at most [`MAX_RING_PAGE_ORDER`]).
    pub max_ring_page_order: u32,
    /// "multi-queue-max-queues" (1: node not written).
    pub max_queues: u32,
}

/// Discard parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiscardParams {
    /// "discard-granularity" in bytes.
    pub granularity: u32,
    /// "discard-alignment" in bytes.
    pub alignment: u32,
    /// "discard-secure".
    pub secure: bool,
}

fn bool_str(b: bool) -> String {
    if b { "1" } else { "0" }.to_owned()
}

impl BackendFeatures {
    /// The nodes to write under the backend directory, in order.
    pub fn nodes(&self) -> Vec<(&'static str, String)> {
        let mut v = vec![
            (keys::FEATURE_FLUSH_CACHE, bool_str(self.flush_cache)),
            (keys::FEATURE_BARRIER, bool_str(self.barrier)),
            (keys::FEATURE_DISCARD, bool_str(self.discard.is_some())),
        ];
        if let Some(d) = self.discard {
            v.push((keys::DISCARD_GRANULARITY, d.granularity.to_string()));
            v.push((keys::DISCARD_ALIGNMENT, d.alignment.to_string()));
            v.push((keys::DISCARD_SECURE, bool_str(d.secure)));
        }
        if self.max_indirect_segments > 0 {
            v.push((
                keys::FEATURE_MAX_INDIRECT_SEGMENTS,
                self.max_indirect_segments.to_string(),
            ));
        }
        v.push((keys::FEATURE_PERSISTENT, bool_str(self.persistent)));
        v.push((
            keys::MAX_RING_PAGE_ORDER,
            self.max_ring_page_order
                .min(MAX_RING_PAGE_ORDER)
                .to_string(),
        ));
        let max_queues = self.limits().max_queues;
        if max_queues > 1 {
            v.push((keys::MULTI_QUEUE_MAX_QUEUES, max_queues.to_string()));
        }
        v
    }

    /// The limits to check the frontend's choices against.
    pub fn limits(&self) -> ConnectLimits {
        ConnectLimits {
            max_ring_page_order: self.max_ring_page_order.min(MAX_RING_PAGE_ORDER),
            max_queues: self.max_queues.clamp(1, MAX_QUEUES_LIMIT),
        }
    }
}

/// Device properties published before Connected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceProperties {
    /// "sectors", in `sector_size` units.
    pub sectors: u64,
    /// "sector-size": power of two, at least 512.
    pub sector_size: u32,
    /// "physical-sector-size": a multiple of `sector_size`.
    pub physical_sector_size: u32,
    /// "info": `VDISK_*` bits.
    pub info: u32,
}

impl DeviceProperties {
    /// The nodes to write under the backend directory.
    pub fn nodes(&self) -> Vec<(&'static str, String)> {
        vec![
            (keys::SECTORS, self.sectors.to_string()),
            (keys::INFO, self.info.to_string()),
            (keys::SECTOR_SIZE, self.sector_size.to_string()),
            (
                keys::PHYSICAL_SECTOR_SIZE,
                self.physical_sector_size.to_string(),
            ),
        ]
    }
}

/// The most queues [`FrontendConnect::parse`] accepts whatever the backend
/// advertised, bounding the work and memory a frontend can ask for.
pub const MAX_QUEUES_LIMIT: u32 = 256;

/// Bounds on what a frontend may ask for (what the backend advertised).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectLimits {
    /// Advertised "max-ring-page-order" (at most [`MAX_RING_PAGE_ORDER`]).
    pub max_ring_page_order: u32,
    /// Advertised "multi-queue-max-queues" (1 if not advertised; at most
    /// [`MAX_QUEUES_LIMIT`]).
    pub max_queues: u32,
}

impl Default for ConnectLimits {
    fn default() -> Self {
        ConnectLimits {
            max_ring_page_order: 0,
            max_queues: 1,
        }
    }
}

/// One queue (ring) of a frontend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueConnect {
    /// Grant refs of the ring pages, `2^ring_page_order` of them, in order.
    pub ring_refs: Vec<u32>,
    /// "event-channel".
    pub event_channel: u32,
}

/// The frontend's transport parameters, read when it reaches Initialised
/// (or Connected).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrontendConnect {
    /// "protocol" (absent: native).
    pub protocol: Abi,
    /// "ring-page-order" (absent: 0).
    pub ring_page_order: u32,
    /// "feature-persistent" (absent: false).
    pub persistent: bool,
    /// One entry per queue ("multi-queue-num-queues", absent: 1).
    pub queues: Vec<QueueConnect>,
}

/// Why a frontend's connect-time nodes were refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConnectError {
    /// A required node is absent.
    #[error("frontend node {0:?} is missing")]
    Missing(String),
    /// A node has a value that does not parse.
    #[error("frontend node {key:?}: {error}")]
    Invalid {
        /// The node.
        key: String,
        /// What is wrong.
        error: NodeError,
    },
    /// Unknown "protocol".
    #[error("frontend node \"protocol\": {0}")]
    Protocol(#[from] UnknownProtocol),
    /// "ring-page-order" above the advertised maximum.
    #[error("ring-page-order {order} exceeds the advertised maximum {max}")]
    RingOrderTooLarge {
        /// Requested.
        order: u32,
        /// Advertised.
        max: u32,
    },
    /// "multi-queue-num-queues" is 0 or above the advertised maximum.
    #[error("multi-queue-num-queues {queues} is not in 1..={max}")]
    BadQueueCount {
        /// Requested.
        queues: u32,
        /// Advertised.
        max: u32,
    },
}

/// Longest value accepted for a string node (protocol).
const MAX_STRING_LEN: usize = 64;

fn node<F>(read: &mut F, key: &str) -> Option<String>
where
    F: FnMut(&str) -> Option<String>,
{
    read(key)
}

fn parse_node<T, F>(
    read: &mut F,
    key: &str,
    parse: fn(&str) -> Result<T, NodeError>,
) -> Result<Option<T>, ConnectError>
where
    F: FnMut(&str) -> Option<String>,
{
    match node(read, key) {
        None => Ok(None),
        Some(v) => parse(&v).map(Some).map_err(|error| ConnectError::Invalid {
            key: key.to_owned(),
            error,
        }),
    }
}

fn required_u32<F>(read: &mut F, key: &str) -> Result<u32, ConnectError>
where
    F: FnMut(&str) -> Option<String>,
{
    parse_node(read, key, parse_u32)?.ok_or_else(|| ConnectError::Missing(key.to_owned()))
}

impl FrontendConnect {
    /// Reads the frontend's transport nodes through `read` (a lookup of a
    /// node path relative to the frontend's directory; `None` for an absent
    /// node), following blkif.h:
    ///
    /// * "protocol": absent means native; otherwise one of protocols.h's names.
    /// * "multi-queue-num-queues": absent means 1; must be in `1..=max_queues`.
    ///   With one queue the ring nodes are at the top level, with several
    ///   under "queue-N/" (blkif.h, "Multiple hardware queues/rings").
    /// * "ring-page-order": absent means 0; at most `max_ring_page_order`.
    ///   Order 0 uses "ring-ref" (falling back to "ring-ref0", which Linux
    ///   blkback also accepts when "ring-page-order" is written); order > 0
    ///   uses "ring-ref0".."ring-ref{2^order-1}" (blkif.h note 6).
    /// * "event-channel" per queue, required.
    /// * "feature-persistent": absent means 0.
    ///
    /// The deprecated "num-ring-pages" scheme is not supported.
    ///
    /// `read` must report read failures by not calling this (read the
    /// directory first): `None` means "absent" and selects the defaults.
    pub fn parse<F>(mut read: F, limits: &ConnectLimits) -> Result<FrontendConnect, ConnectError>
    where
        F: FnMut(&str) -> Option<String>,
    {
        let protocol = match node(&mut read, keys::PROTOCOL) {
            None => Abi::Native,
            Some(p) if p.len() > MAX_STRING_LEN => {
                return Err(ConnectError::Protocol(UnknownProtocol(
                    truncate_for_display(&p),
                )))
            }
            Some(p) => Abi::from_protocol(&p)?,
        };

        let max_queues = limits.max_queues.clamp(1, MAX_QUEUES_LIMIT);
        let nr_queues =
            parse_node(&mut read, keys::MULTI_QUEUE_NUM_QUEUES, parse_u32)?.unwrap_or(1);
        if nr_queues == 0 || nr_queues > max_queues {
            return Err(ConnectError::BadQueueCount {
                queues: nr_queues,
                max: max_queues,
            });
        }

        let max_order = limits.max_ring_page_order.min(MAX_RING_PAGE_ORDER);
        let order = parse_node(&mut read, keys::RING_PAGE_ORDER, parse_u32)?.unwrap_or(0);
        if order > max_order {
            return Err(ConnectError::RingOrderTooLarge {
                order,
                max: max_order,
            });
        }
        let nr_pages = 1u32 << order;

        let persistent =
            parse_node(&mut read, keys::FEATURE_PERSISTENT, parse_bool)?.unwrap_or(false);

        let mut queues = Vec::with_capacity(nr_queues as usize);
        for q in 0..nr_queues {
            let dir = if nr_queues == 1 {
                String::new()
            } else {
                keys::queue_dir(q)
            };
            let event_channel = required_u32(&mut read, &format!("{dir}{}", keys::EVENT_CHANNEL))?;
            let mut ring_refs = Vec::with_capacity(nr_pages as usize);
            if order == 0 {
                let single = format!("{dir}{}", keys::RING_REF);
                let r = match parse_node(&mut read, &single, parse_u32)? {
                    Some(r) => r,
                    None => {
                        let key = format!("{dir}{}", keys::ring_ref(0));
                        parse_node(&mut read, &key, parse_u32)?
                            .ok_or(ConnectError::Missing(single))?
                    }
                };
                ring_refs.push(r);
            } else {
                for i in 0..nr_pages {
                    let key = format!("{dir}{}", keys::ring_ref(i));
                    ring_refs.push(required_u32(&mut read, &key)?);
                }
            }
            queues.push(QueueConnect {
                ring_refs,
                event_channel,
            });
        }

        Ok(FrontendConnect {
            protocol,
            ring_page_order: order,
            persistent,
            queues,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn parse(
        m: &BTreeMap<String, String>,
        limits: ConnectLimits,
    ) -> Result<FrontendConnect, ConnectError> {
        FrontendConnect::parse(|k| m.get(k).cloned(), &limits)
    }

    const LIMITS: ConnectLimits = ConnectLimits {
        max_ring_page_order: 2,
        max_queues: 4,
    };

    #[test]
    fn states() {
        for s in XenbusState::ALL {
            assert_eq!(s.to_string().parse::<XenbusState>(), Ok(s));
            assert_eq!(XenbusState::from_u32(s.to_u32()), Some(s));
        }
        assert_eq!("4".parse::<XenbusState>(), Ok(XenbusState::Connected));
        assert_eq!(XenbusState::Connected.name(), "Connected");
        for bad in [
            "9",
            "",
            " 4",
            "4 ",
            "-1",
            "+4",
            "0x4",
            "Connected",
            "99999999999999999999999",
        ] {
            assert!(bad.parse::<XenbusState>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn numbers() {
        assert_eq!(parse_u64("0"), Ok(0));
        assert_eq!(parse_u64("007"), Ok(7));
        assert_eq!(parse_u64("18446744073709551615"), Ok(u64::MAX));
        assert!(parse_u64("18446744073709551616").is_err());
        assert!(parse_u32("4294967296").is_err());
        assert_eq!(parse_u32("4294967295"), Ok(u32::MAX));
        assert!(parse_u64(&"1".repeat(1000)).is_err());
        assert!(parse_u64("١").is_err()); // non-ASCII digit
        assert_eq!(parse_bool("1"), Ok(true));
        assert!(parse_bool("true").is_err());
        assert_eq!("w".parse::<Mode>(), Ok(Mode::ReadWrite));
        assert!("rw".parse::<Mode>().is_err());
    }

    #[test]
    fn single_queue_single_page() {
        let m = map(&[
            ("ring-ref", "8"),
            ("event-channel", "15"),
            ("protocol", "x86_32-abi"),
        ]);
        let c = parse(&m, LIMITS).unwrap();
        assert_eq!(c.protocol, Abi::X86_32);
        assert_eq!(c.ring_page_order, 0);
        assert!(!c.persistent);
        assert_eq!(
            c.queues,
            vec![QueueConnect {
                ring_refs: vec![8],
                event_channel: 15
            }]
        );
        // ring-ref0 accepted in place of ring-ref.
        let m = map(&[
            ("ring-ref0", "9"),
            ("event-channel", "1"),
            ("ring-page-order", "0"),
        ]);
        assert_eq!(parse(&m, LIMITS).unwrap().queues[0].ring_refs, vec![9]);
        // Default protocol is native.
        let m = map(&[("ring-ref", "9"), ("event-channel", "1")]);
        assert_eq!(parse(&m, LIMITS).unwrap().protocol, Abi::Native);
    }

    #[test]
    fn multi_queue_multi_page() {
        // The example of blkif.h's multi-queue section.
        let m = map(&[
            ("multi-queue-num-queues", "2"),
            ("ring-page-order", "1"),
            ("queue-0/ring-ref0", "100"),
            ("queue-0/ring-ref1", "101"),
            ("queue-0/event-channel", "20"),
            ("queue-1/ring-ref0", "102"),
            ("queue-1/ring-ref1", "103"),
            ("queue-1/event-channel", "21"),
            ("feature-persistent", "1"),
        ]);
        let c = parse(&m, LIMITS).unwrap();
        assert_eq!(c.ring_page_order, 1);
        assert!(c.persistent);
        assert_eq!(c.queues.len(), 2);
        assert_eq!(c.queues[1].ring_refs, vec![102, 103]);
        assert_eq!(c.queues[1].event_channel, 21);
    }

    #[test]
    fn hostile_values() {
        let base = [("ring-ref", "8"), ("event-channel", "15")];
        let with = |k: &'static str, v: &'static str| {
            let mut m = map(&base);
            m.insert(k.into(), v.into());
            m
        };
        assert!(matches!(
            parse(&with("ring-ref", "-1"), LIMITS),
            Err(ConnectError::Invalid { .. })
        ));
        assert!(matches!(
            parse(&with("event-channel", "4294967296"), LIMITS),
            Err(ConnectError::Invalid { .. })
        ));
        assert!(matches!(
            parse(&with("protocol", "x86_16-abi"), LIMITS),
            Err(ConnectError::Protocol(_))
        ));
        let long: &'static str = Box::leak("a".repeat(100_000).into_boxed_str());
        assert!(matches!(
            parse(&with("protocol", long), LIMITS),
            Err(ConnectError::Protocol(_))
        ));
        assert!(matches!(
            parse(&with("ring-page-order", "3"), LIMITS),
            Err(ConnectError::RingOrderTooLarge { order: 3, max: 2 })
        ));
        assert!(matches!(
            parse(&with("ring-page-order", "4294967295"), LIMITS),
            Err(ConnectError::RingOrderTooLarge { .. })
        ));
        assert!(matches!(
            parse(&with("multi-queue-num-queues", "0"), LIMITS),
            Err(ConnectError::BadQueueCount { .. })
        ));
        assert!(matches!(
            parse(&with("multi-queue-num-queues", "5"), LIMITS),
            Err(ConnectError::BadQueueCount { queues: 5, max: 4 })
        ));
        assert!(matches!(
            parse(&with("feature-persistent", "yes"), LIMITS),
            Err(ConnectError::Invalid { .. })
        ));
        // Order 1 needs ring-ref0 and ring-ref1.
        assert_eq!(
            parse(&with("ring-page-order", "1"), LIMITS),
            Err(ConnectError::Missing("ring-ref0".into()))
        );
        // Two queues need per-queue nodes.
        assert_eq!(
            parse(&with("multi-queue-num-queues", "2"), LIMITS),
            Err(ConnectError::Missing("queue-0/event-channel".into()))
        );
        assert_eq!(
            parse(&map(&[("ring-ref", "1")]), LIMITS),
            Err(ConnectError::Missing("event-channel".into()))
        );
        assert_eq!(
            parse(&map(&[("event-channel", "1")]), LIMITS),
            Err(ConnectError::Missing("ring-ref".into()))
        );
        // Default limits: one queue, one page.
        assert!(parse(&with("ring-page-order", "1"), ConnectLimits::default()).is_err());
    }

    #[test]
    fn backend_nodes() {
        let f = BackendFeatures {
            flush_cache: true,
            barrier: false,
            discard: Some(DiscardParams {
                granularity: 4096,
                alignment: 0,
                secure: false,
            }),
            max_indirect_segments: 256,
            persistent: false,
            max_ring_page_order: 9,
            max_queues: 4,
        };
        let nodes: BTreeMap<_, _> = f.nodes().into_iter().collect();
        assert_eq!(nodes["feature-flush-cache"], "1");
        assert_eq!(nodes["feature-barrier"], "0");
        assert_eq!(nodes["feature-discard"], "1");
        assert_eq!(nodes["discard-granularity"], "4096");
        assert_eq!(nodes["feature-max-indirect-segments"], "256");
        assert_eq!(nodes["max-ring-page-order"], "4");
        assert_eq!(nodes["multi-queue-max-queues"], "4");
        assert_eq!(f.limits().max_ring_page_order, 4);
        let props = DeviceProperties {
            sectors: 2048,
            sector_size: 512,
            physical_sector_size: 4096,
            info: VDISK_READONLY,
        };
        let nodes: BTreeMap<_, _> = props.nodes().into_iter().collect();
        assert_eq!(nodes["info"], "4");
        assert_eq!(nodes["sectors"], "2048");
        assert_eq!(keys::ring_ref(3), "ring-ref3");
        assert_eq!(keys::queue_dir(1), "queue-1/");
    }
}
