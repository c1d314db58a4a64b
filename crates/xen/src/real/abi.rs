//! The Linux Xen device ABI: ioctl numbers and argument layouts of `/dev/xen/gntdev`,
//! `/dev/xen/gntalloc` and `/dev/xen/evtchn`, plus the hypervisor's grant status codes.
//!
//! Sources (cited by name in the comments below):
//! - Linux `include/uapi/xen/gntdev.h` ("gntdev.h"),
//! - Linux `include/uapi/xen/gntalloc.h` ("gntalloc.h"),
//! - Linux `include/uapi/xen/evtchn.h` ("evtchn.h"),
//! - Xen `xen/include/public/grant_table.h` ("grant_table.h"): `GNTST_*`, `GNTCOPY_*`.
//!
//! Every ioctl there is `_IOC(_IOC_NONE, type, nr, sizeof(struct ...))`: direction bits 0, so
//! the number is `size << 16 | type << 8 | nr` (asm-generic/ioctl.h, which x86 and arm use).
//! The unit tests compare all of this with the C headers when a compiler and the headers
//! (Debian's `linux-libc-dev`) are installed.

use std::os::raw::{c_uint, c_ulong, c_void};

use crate::platform::GrantStatus;

/// `_IOC(_IOC_NONE, ty, nr, size)` (asm-generic/ioctl.h: nr bits 0-7, type 8-15, size 16-29,
/// direction 30-31).
pub const fn ioc_none(ty: u8, nr: u8, size: usize) -> c_ulong {
    ((size as c_ulong) << 16) | ((ty as c_ulong) << 8) | nr as c_ulong
}

// --- gntdev.h -----------------------------------------------------------------------------

/// `struct ioctl_gntdev_grant_ref` (gntdev.h): one grant to map.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct GntdevGrantRef {
    /// The domain that granted the page.
    pub domid: u32,
    /// The grant reference in that domain's grant table (the header's `ref`).
    pub gref: u32,
}

/// The fixed head of `struct ioctl_gntdev_map_grant_ref` (gntdev.h): `count`, `pad`, then the
/// OUT `index` (the mmap offset); `refs[count]` follow it.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct GntdevMapGrantRefHead {
    /// IN: number of grants in `refs`, that is of pages to map.
    pub count: u32,
    /// Padding, zero.
    pub pad: u32,
    /// OUT: the offset to pass to `mmap()` to map these pages (and later to unmap them).
    pub index: u64,
}

/// `sizeof(struct ioctl_gntdev_map_grant_ref)`, with its declared `refs[1]`.
pub const GNTDEV_MAP_GRANT_REF_SIZE: usize =
    std::mem::size_of::<GntdevMapGrantRefHead>() + std::mem::size_of::<GntdevGrantRef>();

/// gntdev.h `IOCTL_GNTDEV_MAP_GRANT_REF`.
pub const IOCTL_GNTDEV_MAP_GRANT_REF: c_ulong = ioc_none(b'G', 0, GNTDEV_MAP_GRANT_REF_SIZE);

/// `struct ioctl_gntdev_unmap_grant_ref` (gntdev.h).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct GntdevUnmapGrantRef {
    /// The `index` the map ioctl returned; the pages must be `munmap`ped first.
    pub index: u64,
    /// Number of pages to remove from the device's mapping table.
    pub count: u32,
    /// Padding, zero.
    pub pad: u32,
}

/// gntdev.h `IOCTL_GNTDEV_UNMAP_GRANT_REF`.
pub const IOCTL_GNTDEV_UNMAP_GRANT_REF: c_ulong =
    ioc_none(b'G', 1, std::mem::size_of::<GntdevUnmapGrantRef>());

/// `struct ioctl_gntdev_unmap_notify` (gntdev.h); `struct ioctl_gntalloc_unmap_notify`
/// (gntalloc.h) has the same layout.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct UnmapNotify {
    /// mmap offset of the byte concerned (the mapping's index plus the byte's offset).
    pub index: u64,
    /// What to do on unmap: [`UNMAP_NOTIFY_CLEAR_BYTE`] and/or [`UNMAP_NOTIFY_SEND_EVENT`].
    pub action: u32,
    /// The local event channel port to notify (with [`UNMAP_NOTIFY_SEND_EVENT`]).
    pub event_channel_port: u32,
}

/// gntdev.h `IOCTL_GNTDEV_SET_UNMAP_NOTIFY`.
pub const IOCTL_GNTDEV_SET_UNMAP_NOTIFY: c_ulong =
    ioc_none(b'G', 7, std::mem::size_of::<UnmapNotify>());

/// gntdev.h / gntalloc.h `UNMAP_NOTIFY_CLEAR_BYTE`: zero the byte at `index` on unmap.
pub const UNMAP_NOTIFY_CLEAR_BYTE: u32 = 0x1;
/// gntdev.h / gntalloc.h `UNMAP_NOTIFY_SEND_EVENT`: notify `event_channel_port` on unmap.
pub const UNMAP_NOTIFY_SEND_EVENT: u32 = 0x2;

/// The `foreign` member of the unions in `struct gntdev_grant_copy_segment` (gntdev.h).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct GntdevCopyForeign {
    /// The grant reference (`ref`) of the foreign page.
    pub gref: u32,
    /// Byte offset of the copy inside the foreign page.
    pub offset: u16,
    /// The domain that granted the page.
    pub domid: u16,
}

/// The `source`/`dest` union of `struct gntdev_grant_copy_segment` (gntdev.h): a local
/// virtual address or a foreign grant.
#[repr(C)]
#[derive(Clone, Copy)]
pub union GntdevCopyPtr {
    /// A buffer in our address space (when the segment's `flags` do not mark this side as a
    /// grant).
    pub virt: *mut c_void,
    /// A granted page of another domain (when `flags` has `GNTCOPY_source_gref` or
    /// `GNTCOPY_dest_gref` for this side).
    pub foreign: GntdevCopyForeign,
}

/// `struct gntdev_grant_copy_segment` (gntdev.h).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct GntdevGrantCopySegment {
    /// Where to copy from.
    pub source: GntdevCopyPtr,
    /// Where to copy to.
    pub dest: GntdevCopyPtr,
    /// Bytes to copy; a foreign side's `offset + len` must stay within its page.
    pub len: u16,
    /// `GNTCOPY_*`: which of `source`/`dest` is a grant.
    pub flags: u16,
    /// OUT: `GNTST_*`.
    pub status: i16,
}

/// `struct ioctl_gntdev_grant_copy` (gntdev.h).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct GntdevGrantCopy {
    /// Number of segments.
    pub count: c_uint,
    /// The segments, each of which gets its own `status`.
    pub segments: *mut GntdevGrantCopySegment,
}

/// gntdev.h `IOCTL_GNTDEV_GRANT_COPY`.
pub const IOCTL_GNTDEV_GRANT_COPY: c_ulong =
    ioc_none(b'G', 8, std::mem::size_of::<GntdevGrantCopy>());

/// grant_table.h `GNTCOPY_source_gref`.
pub const GNTCOPY_SOURCE_GREF: u16 = 1 << 0;
/// grant_table.h `GNTCOPY_dest_gref`.
pub const GNTCOPY_DEST_GREF: u16 = 1 << 1;

// --- gntalloc.h ---------------------------------------------------------------------------

/// The fixed head of `struct ioctl_gntalloc_alloc_gref` (gntalloc.h); `gref_ids[count]`
/// (OUT) follow it.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct GntallocAllocGrefHead {
    /// IN: the domain to be given access to the pages.
    pub domid: u16,
    /// IN: [`GNTALLOC_FLAG_WRITABLE`] to let it write, else read-only grants.
    pub flags: u16,
    /// IN: number of pages to allocate and grant.
    pub count: u32,
    /// OUT: the offset to pass to `mmap()` to map the pages here.
    pub index: u64,
}

/// `sizeof(struct ioctl_gntalloc_alloc_gref)`, with its declared `gref_ids[1]` and the tail
/// padding to the struct's 8-byte alignment.
pub const GNTALLOC_ALLOC_GREF_SIZE: usize =
    (std::mem::size_of::<GntallocAllocGrefHead>() + 4).next_multiple_of(8);

/// gntalloc.h `IOCTL_GNTALLOC_ALLOC_GREF`.
pub const IOCTL_GNTALLOC_ALLOC_GREF: c_ulong = ioc_none(b'G', 5, GNTALLOC_ALLOC_GREF_SIZE);

/// gntalloc.h `GNTALLOC_FLAG_WRITABLE`.
pub const GNTALLOC_FLAG_WRITABLE: u16 = 1;

/// `struct ioctl_gntalloc_dealloc_gref` (gntalloc.h).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct GntallocDeallocGref {
    /// The `index` the alloc ioctl returned.
    pub index: u64,
    /// Number of pages (grant references) to release.
    pub count: u32,
}

/// gntalloc.h `IOCTL_GNTALLOC_DEALLOC_GREF`.
pub const IOCTL_GNTALLOC_DEALLOC_GREF: c_ulong =
    ioc_none(b'G', 6, std::mem::size_of::<GntallocDeallocGref>());

/// gntalloc.h `IOCTL_GNTALLOC_SET_UNMAP_NOTIFY`.
pub const IOCTL_GNTALLOC_SET_UNMAP_NOTIFY: c_ulong =
    ioc_none(b'G', 7, std::mem::size_of::<UnmapNotify>());

// --- evtchn.h -----------------------------------------------------------------------------

/// `struct ioctl_evtchn_bind_interdomain` (evtchn.h). The ioctl returns the local port.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct EvtchnBindInterdomain {
    /// The domain at the other end.
    pub remote_domain: c_uint,
    /// The unbound port that domain allocated for us (e.g. a frontend's `event-channel`).
    pub remote_port: c_uint,
}

/// evtchn.h `IOCTL_EVTCHN_BIND_INTERDOMAIN`.
pub const IOCTL_EVTCHN_BIND_INTERDOMAIN: c_ulong =
    ioc_none(b'E', 1, std::mem::size_of::<EvtchnBindInterdomain>());

/// `struct ioctl_evtchn_bind_unbound_port` (evtchn.h). The ioctl returns the local port.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct EvtchnBindUnboundPort {
    /// The domain that may bind to the new port.
    pub remote_domain: c_uint,
}

/// evtchn.h `IOCTL_EVTCHN_BIND_UNBOUND_PORT`.
pub const IOCTL_EVTCHN_BIND_UNBOUND_PORT: c_ulong =
    ioc_none(b'E', 2, std::mem::size_of::<EvtchnBindUnboundPort>());

/// `struct ioctl_evtchn_unbind` and `struct ioctl_evtchn_notify` (evtchn.h): one port.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct EvtchnPortArg {
    /// A local port bound through this device.
    pub port: c_uint,
}

/// evtchn.h `IOCTL_EVTCHN_UNBIND`.
pub const IOCTL_EVTCHN_UNBIND: c_ulong = ioc_none(b'E', 3, std::mem::size_of::<EvtchnPortArg>());
/// evtchn.h `IOCTL_EVTCHN_NOTIFY`.
pub const IOCTL_EVTCHN_NOTIFY: c_ulong = ioc_none(b'E', 4, std::mem::size_of::<EvtchnPortArg>());

// --- grant_table.h ------------------------------------------------------------------------

/// grant_table.h `GNTST_*` values.
pub mod gntst {
    /// `GNTST_okay`: normal return.
    pub const OKAY: i16 = 0;
    /// `GNTST_general_error`: general undefined error.
    pub const GENERAL_ERROR: i16 = -1;
    /// `GNTST_bad_domain`: unrecognised domain id.
    pub const BAD_DOMAIN: i16 = -2;
    /// `GNTST_bad_gntref`: unrecognised or inappropriate grant reference.
    pub const BAD_GNTREF: i16 = -3;
    /// `GNTST_permission_denied`: not enough privilege for the operation (e.g. writing
    /// through a read-only grant).
    pub const PERMISSION_DENIED: i16 = -8;
    /// `GNTST_bad_copy_arg`: copy arguments cross a page boundary.
    pub const BAD_COPY_ARG: i16 = -10;
}

/// A hypervisor `GNTST_*` value as a [`GrantStatus`] (values without a variant of their own
/// become [`GrantStatus::GeneralError`]).
pub fn grant_status(st: i16) -> GrantStatus {
    match st {
        gntst::OKAY => GrantStatus::Okay,
        gntst::BAD_DOMAIN => GrantStatus::BadDomain,
        gntst::BAD_GNTREF => GrantStatus::BadGntref,
        gntst::PERMISSION_DENIED => GrantStatus::PermissionDenied,
        gntst::BAD_COPY_ARG => GrantStatus::BadCopyArg,
        _ => GrantStatus::GeneralError,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::{align_of, offset_of, size_of};
    use std::path::Path;
    use std::process::Command;

    #[test]
    fn layouts_match_the_uapi_headers() {
        // Sizes and offsets as declared in gntdev.h / gntalloc.h / evtchn.h (LP64).
        assert_eq!(size_of::<GntdevGrantRef>(), 8);
        assert_eq!(GNTDEV_MAP_GRANT_REF_SIZE, 24);
        assert_eq!(offset_of!(GntdevMapGrantRefHead, index), 8);
        assert_eq!(size_of::<GntdevUnmapGrantRef>(), 16);
        assert_eq!(size_of::<UnmapNotify>(), 16);
        assert_eq!(size_of::<GntdevCopyPtr>(), 8);
        assert_eq!(size_of::<GntdevGrantCopySegment>(), 24);
        assert_eq!(offset_of!(GntdevGrantCopySegment, len), 16);
        assert_eq!(offset_of!(GntdevGrantCopySegment, flags), 18);
        assert_eq!(offset_of!(GntdevGrantCopySegment, status), 20);
        assert_eq!(offset_of!(GntdevCopyForeign, offset), 4);
        assert_eq!(offset_of!(GntdevCopyForeign, domid), 6);
        assert_eq!(size_of::<GntdevGrantCopy>(), 16);
        assert_eq!(offset_of!(GntdevGrantCopy, segments), 8);
        assert_eq!(GNTALLOC_ALLOC_GREF_SIZE, 24);
        assert_eq!(align_of::<GntallocAllocGrefHead>(), 8);
        assert_eq!(size_of::<GntallocDeallocGref>(), 16);
        assert_eq!(size_of::<EvtchnBindInterdomain>(), 8);
        assert_eq!(size_of::<EvtchnPortArg>(), 4);
        assert_eq!(IOCTL_GNTDEV_MAP_GRANT_REF, 0x0018_4700);
        assert_eq!(IOCTL_EVTCHN_NOTIFY, 0x0004_4504);
    }

    #[test]
    fn grant_status_values() {
        assert_eq!(grant_status(0), GrantStatus::Okay);
        assert_eq!(grant_status(-3), GrantStatus::BadGntref);
        assert_eq!(grant_status(-2), GrantStatus::BadDomain);
        assert_eq!(grant_status(-8), GrantStatus::PermissionDenied);
        assert_eq!(grant_status(-10), GrantStatus::BadCopyArg);
        assert_eq!(grant_status(-12), GrantStatus::GeneralError);
    }

    /// Compiles a C program against the installed headers and compares every number.
    #[test]
    #[allow(clippy::unnecessary_cast)] // c_ulong is u32 on 32-bit targets
    fn numbers_match_the_installed_c_headers() {
        let headers = [
            "gntdev.h",
            "gntalloc.h",
            "evtchn.h",
            "grant_table.h",
            "xen.h",
        ];
        if headers
            .iter()
            .any(|h| !Path::new("/usr/include/xen").join(h).exists())
        {
            println!(
                "SKIPPED: /usr/include/xen/{{gntdev,gntalloc,evtchn}}.h (linux-libc-dev) or \
                 {{xen,grant_table}}.h (libxen-dev) missing"
            );
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("abi.c");
        let exe = dir.path().join("abi");
        std::fs::write(&src, C_PROGRAM).unwrap();
        let cc = match Command::new("cc").arg("-o").arg(&exe).arg(&src).output() {
            Ok(o) if o.status.success() => o,
            Ok(o) => panic!(
                "compiling the header check failed:\n{}",
                String::from_utf8_lossy(&o.stderr)
            ),
            Err(e) => {
                println!("SKIPPED: no C compiler ({e})");
                return;
            }
        };
        drop(cc);
        let out = Command::new(&exe).output().unwrap();
        assert!(out.status.success());
        let text = String::from_utf8(out.stdout).unwrap();
        let ours: &[(&str, u64)] = &[
            (
                "IOCTL_GNTDEV_MAP_GRANT_REF",
                IOCTL_GNTDEV_MAP_GRANT_REF as u64,
            ),
            (
                "IOCTL_GNTDEV_UNMAP_GRANT_REF",
                IOCTL_GNTDEV_UNMAP_GRANT_REF as u64,
            ),
            (
                "IOCTL_GNTDEV_SET_UNMAP_NOTIFY",
                IOCTL_GNTDEV_SET_UNMAP_NOTIFY as u64,
            ),
            ("IOCTL_GNTDEV_GRANT_COPY", IOCTL_GNTDEV_GRANT_COPY as u64),
            (
                "IOCTL_GNTALLOC_ALLOC_GREF",
                IOCTL_GNTALLOC_ALLOC_GREF as u64,
            ),
            (
                "IOCTL_GNTALLOC_DEALLOC_GREF",
                IOCTL_GNTALLOC_DEALLOC_GREF as u64,
            ),
            (
                "IOCTL_GNTALLOC_SET_UNMAP_NOTIFY",
                IOCTL_GNTALLOC_SET_UNMAP_NOTIFY as u64,
            ),
            (
                "IOCTL_EVTCHN_BIND_INTERDOMAIN",
                IOCTL_EVTCHN_BIND_INTERDOMAIN as u64,
            ),
            (
                "IOCTL_EVTCHN_BIND_UNBOUND_PORT",
                IOCTL_EVTCHN_BIND_UNBOUND_PORT as u64,
            ),
            ("IOCTL_EVTCHN_UNBIND", IOCTL_EVTCHN_UNBIND as u64),
            ("IOCTL_EVTCHN_NOTIFY", IOCTL_EVTCHN_NOTIFY as u64),
            (
                "sizeof_gntdev_grant_copy_segment",
                size_of::<GntdevGrantCopySegment>() as u64,
            ),
            (
                "offsetof_seg_len",
                offset_of!(GntdevGrantCopySegment, len) as u64,
            ),
            (
                "offsetof_seg_flags",
                offset_of!(GntdevGrantCopySegment, flags) as u64,
            ),
            (
                "offsetof_seg_status",
                offset_of!(GntdevGrantCopySegment, status) as u64,
            ),
            (
                "offsetof_seg_foreign_offset",
                offset_of!(GntdevCopyForeign, offset) as u64,
            ),
            (
                "offsetof_seg_foreign_domid",
                offset_of!(GntdevCopyForeign, domid) as u64,
            ),
            (
                "offsetof_map_refs",
                size_of::<GntdevMapGrantRefHead>() as u64,
            ),
            (
                "offsetof_alloc_grefs",
                size_of::<GntallocAllocGrefHead>() as u64,
            ),
            ("GNTCOPY_source_gref", GNTCOPY_SOURCE_GREF as u64),
            ("GNTCOPY_dest_gref", GNTCOPY_DEST_GREF as u64),
            ("UNMAP_NOTIFY_CLEAR_BYTE", UNMAP_NOTIFY_CLEAR_BYTE as u64),
            ("UNMAP_NOTIFY_SEND_EVENT", UNMAP_NOTIFY_SEND_EVENT as u64),
            ("GNTALLOC_FLAG_WRITABLE", GNTALLOC_FLAG_WRITABLE as u64),
            ("GNTST_bad_gntref", gntst::BAD_GNTREF as i64 as u64),
            ("GNTST_bad_domain", gntst::BAD_DOMAIN as i64 as u64),
            (
                "GNTST_permission_denied",
                gntst::PERMISSION_DENIED as i64 as u64,
            ),
            ("GNTST_bad_copy_arg", gntst::BAD_COPY_ARG as i64 as u64),
        ];
        for (name, value) in ours {
            let line = text
                .lines()
                .find(|l| l.split_whitespace().next() == Some(name))
                .unwrap_or_else(|| panic!("{name} missing from:\n{text}"));
            let c: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
            assert_eq!(c, *value, "{name}");
        }
    }

    const C_PROGRAM: &str = r#"
#include <stdio.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/ioctl.h>
#include <xen/xen.h>
#include <xen/grant_table.h>
#include <xen/gntdev.h>
#include <xen/gntalloc.h>
#include <xen/evtchn.h>
#define P(n, v) printf("%s %llu\n", n, (unsigned long long)(v))
#define PS(n, v) printf("%s %llu\n", n, (unsigned long long)(long long)(v))
int main(void) {
  P("IOCTL_GNTDEV_MAP_GRANT_REF", IOCTL_GNTDEV_MAP_GRANT_REF);
  P("IOCTL_GNTDEV_UNMAP_GRANT_REF", IOCTL_GNTDEV_UNMAP_GRANT_REF);
  P("IOCTL_GNTDEV_SET_UNMAP_NOTIFY", IOCTL_GNTDEV_SET_UNMAP_NOTIFY);
  P("IOCTL_GNTDEV_GRANT_COPY", IOCTL_GNTDEV_GRANT_COPY);
  P("IOCTL_GNTALLOC_ALLOC_GREF", IOCTL_GNTALLOC_ALLOC_GREF);
  P("IOCTL_GNTALLOC_DEALLOC_GREF", IOCTL_GNTALLOC_DEALLOC_GREF);
  P("IOCTL_GNTALLOC_SET_UNMAP_NOTIFY", IOCTL_GNTALLOC_SET_UNMAP_NOTIFY);
  P("IOCTL_EVTCHN_BIND_INTERDOMAIN", IOCTL_EVTCHN_BIND_INTERDOMAIN);
  P("IOCTL_EVTCHN_BIND_UNBOUND_PORT", IOCTL_EVTCHN_BIND_UNBOUND_PORT);
  P("IOCTL_EVTCHN_UNBIND", IOCTL_EVTCHN_UNBIND);
  P("IOCTL_EVTCHN_NOTIFY", IOCTL_EVTCHN_NOTIFY);
  P("sizeof_gntdev_grant_copy_segment", sizeof(struct gntdev_grant_copy_segment));
  P("offsetof_seg_len", offsetof(struct gntdev_grant_copy_segment, len));
  P("offsetof_seg_flags", offsetof(struct gntdev_grant_copy_segment, flags));
  P("offsetof_seg_status", offsetof(struct gntdev_grant_copy_segment, status));
  P("offsetof_seg_foreign_offset", offsetof(struct gntdev_grant_copy_segment, source.foreign.offset));
  P("offsetof_seg_foreign_domid", offsetof(struct gntdev_grant_copy_segment, source.foreign.domid));
  P("offsetof_map_refs", offsetof(struct ioctl_gntdev_map_grant_ref, refs));
  P("offsetof_alloc_grefs", offsetof(struct ioctl_gntalloc_alloc_gref, gref_ids));
  P("UNMAP_NOTIFY_CLEAR_BYTE", UNMAP_NOTIFY_CLEAR_BYTE);
  P("UNMAP_NOTIFY_SEND_EVENT", UNMAP_NOTIFY_SEND_EVENT);
  P("GNTALLOC_FLAG_WRITABLE", GNTALLOC_FLAG_WRITABLE);
  /* xen/grant_table.h (libxen-dev) also gives gntdev.h its grant_ref_t and domid_t. */
  P("GNTCOPY_source_gref", GNTCOPY_source_gref);
  P("GNTCOPY_dest_gref", GNTCOPY_dest_gref);
  PS("GNTST_bad_domain", GNTST_bad_domain);
  PS("GNTST_bad_gntref", GNTST_bad_gntref);
  PS("GNTST_permission_denied", GNTST_permission_denied);
  PS("GNTST_bad_copy_arg", GNTST_bad_copy_arg);
  return 0;
}
"#;
}
