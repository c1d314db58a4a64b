//! The three blkif ring ABIs and their byte layouts.
//!
//! `xen/io/blkif.h` defines one set of structs (`blkif_request`,
//! `blkif_request_discard`, `blkif_request_indirect`, `blkif_response`,
//! `blkif_request_segment`) whose layout depends on the C ABI of the guest
//! that fills the ring. The frontend tells which one it uses in its
//! `protocol` node (`xen/io/protocols.h`): `"x86_32-abi"`, `"x86_64-abi"`
//! (or `"arm-abi"`); a missing node means the backend's native ABI
//! (blkif.h, frontend node `protocol`, "Default Value: XEN_IO_PROTO_ABI_NATIVE").
//!
//! * x86_64 (and arm, whose EABI also aligns `uint64_t` to 8): natural
//!   alignment; `id` sits at offset 8 after 4 bytes of padding.
//! * x86_32: the i386 SysV ABI aligns `uint64_t` to 4 inside structs, so
//!   `id` sits at offset 4 and everything after it moves up by 4 bytes. The
//!   backends that speak it spell that out: QEMU's `hw/block/xen_blkif.h` and
//!   Linux's `drivers/block/xen-blkback/common.h` declare
//!   `struct blkif_x86_32_request` (and the response) under
//!   `#pragma pack(push, 4)` / `__attribute__((packed))`, and blkif.h itself
//!   pads `blkif_request_indirect` under `#ifdef __i386__` ("Make it 64 byte
//!   aligned on i386").
//!
//! The offsets below are the numbers those declarations give; the
//! `c_layout` integration test compiles C against `/usr/include/xen/io/blkif.h`
//! (natively, and with `-m32` for the real i386 layout) and compares every
//! offset and size with these constants.
//!
//! Nothing here is ever accessed through a `#[repr(C)]` struct: requests are
//! parsed from (and responses written to) byte slices with these offsets,
//! little-endian (every ABI Xen's blkif supports is little-endian).

use std::fmt;
use std::str::FromStr;

/// `XEN_IO_PROTO_ABI_X86_32` (xen/io/protocols.h).
pub const PROTO_ABI_X86_32: &str = "x86_32-abi";
/// `XEN_IO_PROTO_ABI_X86_64` (xen/io/protocols.h).
pub const PROTO_ABI_X86_64: &str = "x86_64-abi";
/// `XEN_IO_PROTO_ABI_ARM` (xen/io/protocols.h).
pub const PROTO_ABI_ARM: &str = "arm-abi";

/// Byte offsets of the fields of `struct blkif_request_segment` (blkif.h).
/// The struct is `{ grant_ref_t gref; uint8_t first_sect, last_sect; }`,
/// padded to 8 bytes by `gref`'s 4-byte alignment; the same in every ABI.
pub mod segment {
    /// `gref`.
    pub const GREF: usize = 0;
    /// `first_sect`.
    pub const FIRST_SECT: usize = 4;
    /// `last_sect`.
    pub const LAST_SECT: usize = 5;
    /// `sizeof(struct blkif_request_segment)`.
    pub const SIZE: usize = 8;
}

/// Byte offsets in the shared ring header, `struct __name##_sring`
/// (xen/io/ring.h lines 100-114, `DEFINE_RING_TYPES`): four `RING_IDX`
/// (`unsigned int`) indices, a 4-byte private union, 44 bytes of padding,
/// then the entries. Identical in every ABI (only 4-byte fields).
pub mod sring {
    /// `req_prod`.
    pub const REQ_PROD: usize = 0;
    /// `req_event`.
    pub const REQ_EVENT: usize = 4;
    /// `rsp_prod`.
    pub const RSP_PROD: usize = 8;
    /// `rsp_event`.
    pub const RSP_EVENT: usize = 12;
    /// `pvt` (`pvt_pad[4]`).
    pub const PVT: usize = 16;
    /// `__pad[44]`.
    pub const PAD: usize = 20;
    /// `ring[]`: the first entry.
    pub const RING: usize = 64;
}

/// Byte layout of the blkif structs in one ABI. Field names follow blkif.h:
/// `req_*` is `struct blkif_request`, `discard_*` is
/// `struct blkif_request_discard`, `indirect_*` is
/// `struct blkif_request_indirect`, `rsp_*` is `struct blkif_response`.
/// Every struct starts with `uint8_t operation` at offset 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// `blkif_request.nr_segments` (u8).
    pub req_nr_segments: usize,
    /// `blkif_request.handle` (u16).
    pub req_handle: usize,
    /// `blkif_request.id` (u64).
    pub req_id: usize,
    /// `blkif_request.sector_number` (u64).
    pub req_sector_number: usize,
    /// `blkif_request.seg[11]`.
    pub req_seg: usize,
    /// `sizeof(struct blkif_request)`.
    pub req_size: usize,
    /// `blkif_request_discard.flag` (u8).
    pub discard_flag: usize,
    /// `blkif_request_discard.handle` (u16).
    pub discard_handle: usize,
    /// `blkif_request_discard.id` (u64).
    pub discard_id: usize,
    /// `blkif_request_discard.sector_number` (u64).
    pub discard_sector_number: usize,
    /// `blkif_request_discard.nr_sectors` (u64).
    pub discard_nr_sectors: usize,
    /// `sizeof(struct blkif_request_discard)`.
    pub discard_size: usize,
    /// `blkif_request_indirect.indirect_op` (u8).
    pub indirect_op: usize,
    /// `blkif_request_indirect.nr_segments` (u16).
    pub indirect_nr_segments: usize,
    /// `blkif_request_indirect.id` (u64).
    pub indirect_id: usize,
    /// `blkif_request_indirect.sector_number` (u64).
    pub indirect_sector_number: usize,
    /// `blkif_request_indirect.handle` (u16).
    pub indirect_handle: usize,
    /// `blkif_request_indirect.indirect_grefs[8]` (u32 each).
    pub indirect_grefs: usize,
    /// `sizeof(struct blkif_request_indirect)`.
    pub indirect_size: usize,
    /// `blkif_response.id` (u64).
    pub rsp_id: usize,
    /// `blkif_response.operation` (u8).
    pub rsp_operation: usize,
    /// `blkif_response.status` (i16).
    pub rsp_status: usize,
    /// `sizeof(struct blkif_response)`.
    pub rsp_size: usize,
    /// `sizeof(union blkif_sring_entry)`: the stride of ring entries, the
    /// larger of the request and the response, rounded to the union's
    /// alignment.
    pub entry_size: usize,
}

/// x86_64 (and arm) layout: natural alignment, blkif.h compiled for
/// x86_64; QEMU's `blkif_x86_64_request` (`__aligned__(8)` on `id`) and
/// Linux's `blkif_x86_64_request_*` (explicit `_pad1` "offsetof(..id)==8").
pub const LAYOUT_X86_64: Layout = Layout {
    req_nr_segments: 1,
    req_handle: 2,
    req_id: 8,
    req_sector_number: 16,
    req_seg: 24,
    req_size: 112,
    discard_flag: 1,
    discard_handle: 2,
    discard_id: 8,
    discard_sector_number: 16,
    discard_nr_sectors: 24,
    discard_size: 32,
    indirect_op: 1,
    indirect_nr_segments: 2,
    indirect_id: 8,
    indirect_sector_number: 16,
    indirect_handle: 24,
    indirect_grefs: 28,
    indirect_size: 64,
    rsp_id: 0,
    rsp_operation: 8,
    rsp_status: 10,
    rsp_size: 16,
    entry_size: 112,
};

/// x86_32 layout: `uint64_t` aligned to 4 (i386 SysV), as blkif.h compiled
/// with `-m32`, QEMU's `#pragma pack(push, 4)` `blkif_x86_32_request`, and
/// Linux's packed `blkif_x86_32_request_*` (indirect: `_pad1` after
/// `handle`, `uint64_t _pad2` "make it 64 byte aligned").
pub const LAYOUT_X86_32: Layout = Layout {
    req_nr_segments: 1,
    req_handle: 2,
    req_id: 4,
    req_sector_number: 12,
    req_seg: 20,
    req_size: 108,
    discard_flag: 1,
    discard_handle: 2,
    discard_id: 4,
    discard_sector_number: 12,
    discard_nr_sectors: 20,
    discard_size: 28,
    indirect_op: 1,
    indirect_nr_segments: 2,
    indirect_id: 4,
    indirect_sector_number: 12,
    indirect_handle: 20,
    indirect_grefs: 24,
    indirect_size: 64,
    rsp_id: 0,
    rsp_operation: 8,
    rsp_status: 10,
    rsp_size: 12,
    entry_size: 108,
};

/// Size of the buffer a request is copied into: the largest ring entry of
/// any ABI (`sizeof(union blkif_sring_entry)` on x86_64). For x86_32 only
/// the first 108 bytes are part of the slot; the rest is ignored by
/// [`crate::Request::parse`] and written as zero by
/// [`crate::Request::write`].
pub const SLOT_SIZE: usize = 112;

// The wire code indexes fixed-size buffers with these constants: make sure
// at compile time that every field fits, so no input can make it panic.
const _: () = {
    let layouts = [LAYOUT_X86_64, LAYOUT_X86_32];
    let mut i = 0;
    while i < layouts.len() {
        let l = layouts[i];
        assert!(l.entry_size <= SLOT_SIZE);
        assert!(l.req_size <= l.entry_size && l.rsp_size <= l.entry_size);
        assert!(l.discard_size <= l.entry_size && l.indirect_size <= l.entry_size);
        assert!(l.req_seg + 11 * segment::SIZE <= l.req_size);
        assert!(l.discard_nr_sectors + 8 <= l.discard_size);
        assert!(l.indirect_grefs + 8 * 4 <= l.indirect_size);
        assert!(l.indirect_handle + 2 <= l.indirect_grefs);
        assert!(l.rsp_status + 2 <= l.rsp_size);
        // Linux reads `u.other.id` for unknown operations: the id must be at
        // the same place in every request format of one ABI.
        assert!(l.req_id == l.discard_id && l.req_id == l.indirect_id);
        i += 1;
    }
};

/// The ring ABI a frontend uses (its xenstore `protocol` node).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Abi {
    /// The backend's own ABI: what a frontend without a `protocol` node
    /// uses (blkif.h: "Default Value: XEN_IO_PROTO_ABI_NATIVE").
    ///
    /// Note: Linux's blkback defaults to x86_32 on x86 when the node is
    /// missing (`BLKIF_PROTOCOL_DEFAULT` in xen-blkback/common.h), for old
    /// 32-bit PV guests; xdisk follows the header.
    Native,
    /// `"x86_32-abi"`.
    X86_32,
    /// `"x86_64-abi"`.
    X86_64,
}

impl Abi {
    /// All three, for tests and fuzzers.
    pub const ALL: [Abi; 3] = [Abi::Native, Abi::X86_32, Abi::X86_64];

    /// The byte layout of this ABI's structs.
    pub const fn layout(self) -> &'static Layout {
        match self.resolve() {
            Abi::X86_32 => &LAYOUT_X86_32,
            _ => &LAYOUT_X86_64,
        }
    }

    /// `Native` replaced by the concrete ABI of the machine xdisk runs on:
    /// x86_32 on i386, x86_64's layout everywhere else (x86_64, and arm whose
    /// layout is the same).
    pub const fn resolve(self) -> Abi {
        match self {
            Abi::Native => {
                if cfg!(target_arch = "x86") {
                    Abi::X86_32
                } else {
                    Abi::X86_64
                }
            }
            other => other,
        }
    }

    /// The ring entry stride, `sizeof(union blkif_sring_entry)`.
    pub const fn entry_size(self) -> usize {
        self.layout().entry_size
    }

    /// The `protocol` node value naming this ABI (the native one for
    /// `Native`, `XEN_IO_PROTO_ABI_NATIVE` in protocols.h).
    pub const fn protocol_name(self) -> &'static str {
        match self {
            Abi::X86_32 => PROTO_ABI_X86_32,
            Abi::X86_64 => PROTO_ABI_X86_64,
            Abi::Native => {
                if cfg!(target_arch = "x86") {
                    PROTO_ABI_X86_32
                } else if cfg!(any(target_arch = "arm", target_arch = "aarch64")) {
                    PROTO_ABI_ARM
                } else {
                    PROTO_ABI_X86_64
                }
            }
        }
    }

    /// Parses a `protocol` node value. `"arm-abi"` is accepted only when it
    /// is this machine's native ABI (it cannot occur across architectures).
    pub fn from_protocol(s: &str) -> Result<Abi, UnknownProtocol> {
        match s {
            PROTO_ABI_X86_32 => Ok(Abi::X86_32),
            PROTO_ABI_X86_64 => Ok(Abi::X86_64),
            PROTO_ABI_ARM if cfg!(any(target_arch = "arm", target_arch = "aarch64")) => {
                Ok(Abi::Native)
            }
            _ => Err(UnknownProtocol(truncate_for_display(s))),
        }
    }
}

impl fmt::Display for Abi {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Abi::Native => write!(f, "native ({})", self.protocol_name()),
            other => f.write_str(other.protocol_name()),
        }
    }
}

impl FromStr for Abi {
    type Err = UnknownProtocol;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Abi::from_protocol(s)
    }
}

/// A `protocol` value that is none of protocols.h's names (or `arm-abi` on
/// a machine that is not arm).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown blkif protocol {0:?}")]
pub struct UnknownProtocol(pub String);

/// Keeps error messages built from hostile strings short.
pub(crate) fn truncate_for_display(s: &str) -> String {
    const MAX: usize = 64;
    if s.len() <= MAX {
        return s.to_owned();
    }
    let mut end = MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &s[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protocol_names_round_trip() {
        for abi in [Abi::X86_32, Abi::X86_64] {
            assert_eq!(Abi::from_protocol(abi.protocol_name()), Ok(abi));
            assert_eq!(abi.to_string().parse::<Abi>(), Ok(abi));
        }
        assert_eq!(
            Abi::from_protocol(Abi::Native.protocol_name()).map(Abi::resolve),
            Ok(Abi::Native.resolve())
        );
        assert!(Abi::from_protocol("x86_64-abi\n").is_err());
        assert!(Abi::from_protocol("").is_err());
        assert!(Abi::from_protocol("X86_64-ABI").is_err());
        let long = "é".repeat(100);
        let err = Abi::from_protocol(&long).unwrap_err();
        assert!(err.0.len() < 80);
    }

    #[test]
    fn native_is_x86_64_here() {
        if cfg!(target_arch = "x86_64") {
            assert_eq!(Abi::Native.resolve(), Abi::X86_64);
            assert_eq!(Abi::Native.layout(), &LAYOUT_X86_64);
            assert_eq!(Abi::Native.protocol_name(), PROTO_ABI_X86_64);
        }
    }

    #[test]
    fn entry_is_larger_of_request_and_response() {
        for l in [LAYOUT_X86_64, LAYOUT_X86_32] {
            assert_eq!(l.entry_size, l.req_size.max(l.rsp_size));
        }
    }
}
