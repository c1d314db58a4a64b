//! Compares the crate's layout constants with what a C compiler makes of
//! `/usr/include/xen/io/blkif.h` (Debian's libxen-dev).
//!
//! Two passes over the same list of `sizeof`/`offsetof`/constant
//! expressions, generated from the expectations below:
//!
//! 1. native (x86_64): a program that prints every value, compiled and run.
//!    It also declares the x86_32 structs under `#pragma pack(push, 4)` the
//!    way Linux's xen-blkback/common.h and QEMU's xen_blkif.h do, and the
//!    x86_64 ones with `id` aligned to 8 as QEMU does, and builds rings of
//!    both with ring.h's `DEFINE_RING_TYPES` / `__CONST_RING_SIZE`.
//! 2. `-m32`: the real i386 layout of blkif.h (its `__i386__` padding
//!    included). Without 32-bit libc (gcc-multilib) nothing can be linked,
//!    so it is compiled freestanding to assembly and the values are read
//!    back from the emitted `const int` data. Skipped (with a message) if
//!    the compiler cannot target i386 at all.
//!
//! The test skips, with a message on stderr, if there is no C compiler or
//! no Xen headers; set `XDISK_REQUIRE_C_LAYOUT=1` to make that a failure.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use xdisk_blkif::abi::{segment, sring, Layout, LAYOUT_X86_32, LAYOUT_X86_64};
use xdisk_blkif::ring::const_ring_size;
use xdisk_blkif::wire::*;
use xdisk_blkif::xenbus::{XenbusState, VDISK_CDROM, VDISK_READONLY, VDISK_REMOVABLE};
use xdisk_blkif::Abi;

const HEADER: &str = "/usr/include/xen/io/blkif.h";

#[derive(Debug, Clone, PartialEq)]
enum Expect {
    Num(i64),
    Str(String),
}

struct Entry {
    name: String,
    expr: String,
    expect: Expect,
}

struct Structs {
    prefix: &'static str,
    request: &'static str,
    discard: &'static str,
    indirect: &'static str,
    response: &'static str,
    tag: &'static str,
}

const NATIVE: Structs = Structs {
    prefix: "native",
    request: "struct blkif_request",
    discard: "struct blkif_request_discard",
    indirect: "struct blkif_request_indirect",
    response: "struct blkif_response",
    tag: "blkif",
};
const T32: Structs = Structs {
    prefix: "x86_32",
    request: "struct t32_request",
    discard: "struct t32_discard",
    indirect: "struct t32_indirect",
    response: "struct t32_response",
    tag: "t32",
};
const T64: Structs = Structs {
    prefix: "x86_64",
    request: "struct t64_request",
    discard: "struct t64_discard",
    indirect: "struct t64_indirect",
    response: "struct t64_response",
    tag: "t64",
};

/// Our own declarations of the non-native ABIs, from blkif.h's struct
/// definitions and the packing rules the backends document.
const DECLS: &str = r#"
/* x86_32: uint64_t aligned to 4, as under Linux xen-blkback/common.h's and
 * QEMU xen_blkif.h's #pragma pack(push, 4); the indirect request carries
 * blkif.h's __i386__ pad. */
#pragma pack(push, 4)
struct t32_request {
    uint8_t operation; uint8_t nr_segments; uint16_t handle;
    uint64_t id; uint64_t sector_number;
    struct blkif_request_segment seg[BLKIF_MAX_SEGMENTS_PER_REQUEST];
};
struct t32_discard {
    uint8_t operation; uint8_t flag; uint16_t handle;
    uint64_t id; uint64_t sector_number; uint64_t nr_sectors;
};
struct t32_indirect {
    uint8_t operation; uint8_t indirect_op; uint16_t nr_segments;
    uint64_t id; uint64_t sector_number; uint16_t handle;
    grant_ref_t indirect_grefs[BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST];
    uint64_t pad;
};
struct t32_response { uint64_t id; uint8_t operation; int16_t status; };
#pragma pack(pop)
DEFINE_RING_TYPES(t32, struct t32_request, struct t32_response);

/* x86_64: natural alignment, spelled out so it holds under -m32 too. */
struct t64_request {
    uint8_t operation; uint8_t nr_segments; uint16_t handle;
    uint64_t __attribute__((__aligned__(8))) id; uint64_t sector_number;
    struct blkif_request_segment seg[BLKIF_MAX_SEGMENTS_PER_REQUEST];
};
struct t64_discard {
    uint8_t operation; uint8_t flag; uint16_t handle;
    uint64_t __attribute__((__aligned__(8))) id; uint64_t sector_number;
    uint64_t nr_sectors;
};
struct t64_indirect {
    uint8_t operation; uint8_t indirect_op; uint16_t nr_segments;
    uint64_t __attribute__((__aligned__(8))) id; uint64_t sector_number;
    uint16_t handle;
    grant_ref_t indirect_grefs[BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST];
};
struct t64_response {
    uint64_t __attribute__((__aligned__(8))) id; uint8_t operation; int16_t status;
};
DEFINE_RING_TYPES(t64, struct t64_request, struct t64_response);
"#;

fn num(v: usize) -> Expect {
    Expect::Num(v as i64)
}

fn push(out: &mut Vec<Entry>, name: String, expr: String, expect: Expect) {
    out.push(Entry { name, expr, expect });
}

fn struct_entries(out: &mut Vec<Entry>, s: &Structs, l: &Layout, abi: Abi) {
    let p = s.prefix;
    let mut off = |what: &str, ty: &str, field: &str, v: usize| {
        push(
            out,
            format!("{p}__{what}__{}", field.trim_start_matches('_')),
            format!("offsetof({ty}, {field})"),
            num(v),
        );
    };
    off("req", s.request, "operation", 0);
    off("req", s.request, "nr_segments", l.req_nr_segments);
    off("req", s.request, "handle", l.req_handle);
    off("req", s.request, "id", l.req_id);
    off("req", s.request, "sector_number", l.req_sector_number);
    off("req", s.request, "seg", l.req_seg);
    off("discard", s.discard, "operation", 0);
    off("discard", s.discard, "flag", l.discard_flag);
    off("discard", s.discard, "handle", l.discard_handle);
    off("discard", s.discard, "id", l.discard_id);
    off(
        "discard",
        s.discard,
        "sector_number",
        l.discard_sector_number,
    );
    off("discard", s.discard, "nr_sectors", l.discard_nr_sectors);
    off("indirect", s.indirect, "operation", 0);
    off("indirect", s.indirect, "indirect_op", l.indirect_op);
    off(
        "indirect",
        s.indirect,
        "nr_segments",
        l.indirect_nr_segments,
    );
    off("indirect", s.indirect, "id", l.indirect_id);
    off(
        "indirect",
        s.indirect,
        "sector_number",
        l.indirect_sector_number,
    );
    off("indirect", s.indirect, "handle", l.indirect_handle);
    off("indirect", s.indirect, "indirect_grefs", l.indirect_grefs);
    off("rsp", s.response, "id", l.rsp_id);
    off("rsp", s.response, "operation", l.rsp_operation);
    off("rsp", s.response, "status", l.rsp_status);
    let sring_ty = format!("struct {}_sring", s.tag);
    off("sring", &sring_ty, "req_prod", sring::REQ_PROD);
    off("sring", &sring_ty, "req_event", sring::REQ_EVENT);
    off("sring", &sring_ty, "rsp_prod", sring::RSP_PROD);
    off("sring", &sring_ty, "rsp_event", sring::RSP_EVENT);
    off("sring", &sring_ty, "pvt", sring::PVT);
    off("sring", &sring_ty, "__pad", sring::PAD);
    off("sring", &sring_ty, "ring", sring::RING);
    for (what, ty, v) in [
        ("req", s.request, l.req_size),
        ("discard", s.discard, l.discard_size),
        ("indirect", s.indirect, l.indirect_size),
        ("rsp", s.response, l.rsp_size),
    ] {
        push(
            out,
            format!("{p}__{what}__size"),
            format!("sizeof({ty})"),
            num(v),
        );
    }
    push(
        out,
        format!("{p}__entry__size"),
        format!("sizeof(union {}_sring_entry)", s.tag),
        num(l.entry_size),
    );
    for order in 0..=4u32 {
        let bytes = 4096usize << order;
        push(
            out,
            format!("{p}__ring_size__order{order}"),
            format!("__CONST_RING_SIZE({}, {bytes})", s.tag),
            Expect::Num(i64::from(const_ring_size(abi, bytes))),
        );
    }
}

/// Everything to check; `native` is the ABI `blkif.h`'s own structs have
/// under the compiler flags used.
fn entries(native: Abi, with_strings: bool) -> Vec<Entry> {
    let mut out = Vec::new();
    struct_entries(&mut out, &NATIVE, native.layout(), native);
    struct_entries(&mut out, &T32, &LAYOUT_X86_32, Abi::X86_32);
    struct_entries(&mut out, &T64, &LAYOUT_X86_64, Abi::X86_64);
    assert_eq!(native.layout().entry_size, native.entry_size());

    let seg_ty = "struct blkif_request_segment";
    for (field, v) in [
        ("gref", segment::GREF),
        ("first_sect", segment::FIRST_SECT),
        ("last_sect", segment::LAST_SECT),
    ] {
        push(
            &mut out,
            format!("seg__{field}"),
            format!("offsetof({seg_ty}, {field})"),
            num(v),
        );
    }
    push(
        &mut out,
        "seg__size".into(),
        format!("sizeof({seg_ty})"),
        num(segment::SIZE),
    );

    let consts: &[(&str, i64)] = &[
        ("BLKIF_OP_READ", BLKIF_OP_READ.into()),
        ("BLKIF_OP_WRITE", BLKIF_OP_WRITE.into()),
        ("BLKIF_OP_WRITE_BARRIER", BLKIF_OP_WRITE_BARRIER.into()),
        ("BLKIF_OP_FLUSH_DISKCACHE", BLKIF_OP_FLUSH_DISKCACHE.into()),
        ("BLKIF_OP_RESERVED_1", BLKIF_OP_RESERVED_1.into()),
        ("BLKIF_OP_DISCARD", BLKIF_OP_DISCARD.into()),
        ("BLKIF_OP_INDIRECT", BLKIF_OP_INDIRECT.into()),
        (
            "BLKIF_MAX_SEGMENTS_PER_REQUEST",
            BLKIF_MAX_SEGMENTS_PER_REQUEST as i64,
        ),
        (
            "BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST",
            BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST as i64,
        ),
        ("BLKIF_DISCARD_SECURE", BLKIF_DISCARD_SECURE.into()),
        ("BLKIF_RSP_EOPNOTSUPP", BLKIF_RSP_EOPNOTSUPP.into()),
        ("BLKIF_RSP_ERROR", BLKIF_RSP_ERROR.into()),
        ("BLKIF_RSP_OKAY", BLKIF_RSP_OKAY.into()),
        ("VDISK_CDROM", VDISK_CDROM.into()),
        ("VDISK_REMOVABLE", VDISK_REMOVABLE.into()),
        ("VDISK_READONLY", VDISK_READONLY.into()),
        ("SEGS_PER_INDIRECT_FRAME", SEGS_PER_INDIRECT_FRAME as i64),
    ];
    for (name, v) in consts {
        let expr = if *name == "SEGS_PER_INDIRECT_FRAME" {
            // blkif.h: PAGE_SIZE / sizeof(struct blkif_request_segment).
            format!("4096 / sizeof({seg_ty})")
        } else {
            (*name).to_string()
        };
        push(&mut out, format!("const__{name}"), expr, Expect::Num(*v));
    }
    for s in XenbusState::ALL {
        push(
            &mut out,
            format!("xenbus__{}", s.name()),
            format!("XenbusState{}", s.name()),
            Expect::Num(s.to_u32().into()),
        );
    }
    if with_strings {
        for (name, v) in [
            ("XEN_IO_PROTO_ABI_X86_32", Abi::X86_32.protocol_name()),
            ("XEN_IO_PROTO_ABI_X86_64", Abi::X86_64.protocol_name()),
            ("XEN_IO_PROTO_ABI_NATIVE", native.protocol_name()),
        ] {
            push(
                &mut out,
                format!("proto__{name}"),
                name.to_string(),
                Expect::Str(v.to_string()),
            );
        }
    }
    out
}

fn c_source(entries: &[Entry], print: bool) -> String {
    let mut s = String::new();
    s.push_str("#include <stddef.h>\n#include <stdint.h>\n");
    if print {
        s.push_str("#include <stdio.h>\n");
    }
    s.push_str(
        "#include <xen/io/blkif.h>\n#include <xen/io/protocols.h>\n#include <xen/io/xenbus.h>\n",
    );
    s.push_str(DECLS);
    if print {
        s.push_str("int main(void) {\n");
        for e in entries {
            match e.expect {
                Expect::Num(_) => s.push_str(&format!(
                    "    printf(\"{} %lld\\n\", (long long)({}));\n",
                    e.name, e.expr
                )),
                Expect::Str(_) => {
                    s.push_str(&format!("    printf(\"{} %s\\n\", {});\n", e.name, e.expr))
                }
            }
        }
        s.push_str("    return 0;\n}\n");
    } else {
        for e in entries {
            s.push_str(&format!(
                "__attribute__((used)) const int v__{} = (int)({});\n",
                e.name, e.expr
            ));
        }
    }
    s
}

fn compare(what: &str, entries: &[Entry], got: &BTreeMap<String, Expect>) {
    let mut bad = Vec::new();
    for e in entries {
        match got.get(&e.name) {
            Some(v) if *v == e.expect => {}
            Some(v) => bad.push(format!(
                "{}: C says {:?}, Rust says {:?} ({})",
                e.name, v, e.expect, e.expr
            )),
            None => bad.push(format!("{}: missing from the C output", e.name)),
        }
    }
    assert!(
        bad.is_empty(),
        "{what}: layout mismatches:\n{}",
        bad.join("\n")
    );
    assert_eq!(got.len(), entries.len(), "{what}: unexpected extra values");
    eprintln!("c_layout {what}: {} values match", entries.len());
}

fn skip(why: &str) {
    if std::env::var_os("XDISK_REQUIRE_C_LAYOUT").is_some_and(|v| v == "1") {
        panic!("c_layout cannot run: {why}");
    }
    eprintln!("SKIP c_layout: {why}");
}

fn compiler() -> Option<String> {
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".to_string());
    let ok = Command::new(&cc)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    ok.then_some(cc)
}

fn run(cmd: &mut Command) -> Result<String, String> {
    let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{cmd:?} failed: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[test]
fn native_layout_matches_c() {
    let Some(cc) = compiler() else {
        return skip("no C compiler (set CC or install gcc)");
    };
    if !Path::new(HEADER).exists() {
        return skip(&format!("{HEADER} not found (install libxen-dev)"));
    }
    if !cfg!(target_arch = "x86_64") {
        return skip("the native pass expects an x86_64 host");
    }
    let dir = tempfile::tempdir().unwrap();
    let list = entries(Abi::Native, true);
    let src = dir.path().join("layout.c");
    std::fs::write(&src, c_source(&list, true)).unwrap();
    let exe = dir.path().join("layout");
    run(Command::new(&cc)
        .arg("-std=gnu11")
        .arg("-Wall")
        .arg("-o")
        .arg(&exe)
        .arg(&src))
    .unwrap();
    let stdout = run(&mut Command::new(&exe)).unwrap();
    let mut got = BTreeMap::new();
    for line in stdout.lines() {
        let (name, value) = line.split_once(' ').expect("name value");
        let v = match value.parse::<i64>() {
            Ok(n) if !name.starts_with("proto__") => Expect::Num(n),
            _ => Expect::Str(value.to_string()),
        };
        got.insert(name.to_string(), v);
    }
    compare("native", &list, &got);
}

/// Parses `v__NAME:` labels followed by `.long N` / `.zero 4` from gcc's
/// i386 assembly.
fn parse_asm(asm: &str) -> BTreeMap<String, Expect> {
    let mut got = BTreeMap::new();
    let mut lines = asm.lines().map(str::trim);
    while let Some(line) = lines.next() {
        let Some(name) = line.strip_prefix("v__").and_then(|l| l.strip_suffix(':')) else {
            continue;
        };
        let Some(data) = lines.next() else { break };
        let mut parts = data.split_whitespace();
        let v = match (parts.next(), parts.next()) {
            (Some(".long"), Some(n)) => n.parse::<i64>().expect("number"),
            (Some(".zero"), Some("4")) => 0,
            other => panic!("unexpected data for {name}: {other:?}"),
        };
        got.insert(name.to_string(), Expect::Num(v));
    }
    got
}

#[test]
fn i386_layout_matches_c() {
    let Some(cc) = compiler() else {
        return skip("no C compiler (set CC or install gcc)");
    };
    if !Path::new(HEADER).exists() {
        return skip(&format!("{HEADER} not found (install libxen-dev)"));
    }
    let dir = tempfile::tempdir().unwrap();
    // Can the compiler target i386 at all?
    let probe = dir.path().join("probe.c");
    std::fs::write(&probe, "int x;\n").unwrap();
    let m32 = |src: &Path| {
        run(Command::new(&cc)
            .args([
                "-m32",
                "-ffreestanding",
                "-std=gnu11",
                "-O0",
                "-S",
                "-o",
                "-",
            ])
            .arg("-fno-zero-initialized-in-bss")
            .arg(src))
    };
    if let Err(e) = m32(&probe) {
        eprintln!("SKIP c_layout i386 pass: {cc} cannot target -m32: {e}");
        return;
    }
    let list = entries(Abi::X86_32, false);
    let src = dir.path().join("layout32.c");
    std::fs::write(&src, c_source(&list, false)).unwrap();
    let asm = m32(&src).unwrap();
    compare(
        "i386 (-m32, blkif.h's own __i386__ layout)",
        &list,
        &parse_asm(&asm),
    );
}
