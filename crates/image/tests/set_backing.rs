//! `Qcow2Image::set_backing` (the backing link change at the end of a live stream), checked
//! with qemu-img: the header names the new backing file and format (or none), the image is
//! clean, a bitmap of the image survives the move of its header extension, and the data
//! reads the same through the new link.

use std::path::Path;
use std::process::Command;

use xdisk_image::{Format, Image, OpenOptions};

fn qemu_img(args: &[&str]) -> std::process::Output {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img");
    assert!(
        out.status.success(),
        "qemu-img {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn info(p: &Path) -> serde_json::Value {
    let out = qemu_img(&["info", "--output=json", p.to_str().unwrap()]);
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn set_backing_rewrites_the_link_and_keeps_bitmaps() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.qcow2");
    let top = dir.path().join("top.qcow2");
    let (b, t) = (base.to_str().unwrap(), top.to_str().unwrap());
    qemu_img(&["create", "-q", "-f", "qcow2", b, "4M"]);
    qemu_img(&["create", "-q", "-f", "qcow2", "-b", b, "-F", "qcow2", t]);
    qemu_img(&["bitmap", "--add", t, "b0"]);
    let opts = OpenOptions {
        format: Some(Format::Qcow2),
        read_only: false,
        ..OpenOptions::default()
    };
    {
        let img = Image::open(&base, &opts).unwrap();
        img.write_at(&vec![0x5a; 1 << 20], 0).unwrap();
        img.close().unwrap();
        let img = Image::open(&top, &opts).unwrap();
        img.write_at(&vec![0x33; 65536], 2 << 20).unwrap();
        img.close().unwrap();
    }
    let mut want = vec![0u8; 4 << 20];
    want[..1 << 20].fill(0x5a);
    want[2 << 20..(2 << 20) + 65536].fill(0x33);
    {
        // The base's data copied up first, as a stream does; then the link goes.
        let img = Image::open(&top, &opts).unwrap();
        let mut buf = vec![0u8; 1 << 20];
        img.read_at(&mut buf, 0).unwrap();
        img.write_at(&buf, 0).unwrap();
        img.as_qcow2().unwrap().set_backing(None, None).unwrap();
        img.as_qcow2()
            .unwrap()
            .add_bitmap("b1", None, true)
            .unwrap();
        img.close().unwrap();
    }
    qemu_img(&["check", t]);
    let i = info(&top);
    assert!(i["backing-filename"].is_null(), "{i}");
    let names: Vec<&str> = i["format-specific"]["data"]["bitmaps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["b0", "b1"], "{i}");
    let raw = dir.path().join("top.raw");
    qemu_img(&["convert", "-O", "raw", t, raw.to_str().unwrap()]);
    assert!(
        std::fs::read(&raw).unwrap() == want,
        "the top alone reads other data"
    );
    {
        // And back: a link with its format.
        let img = Image::open(&top, &opts).unwrap();
        img.as_qcow2()
            .unwrap()
            .set_backing(Some(b), Some("qcow2"))
            .unwrap();
        img.close().unwrap();
    }
    qemu_img(&["check", t]);
    let i = info(&top);
    assert_eq!(i["backing-filename"], b, "{i}");
    assert_eq!(i["backing-filename-format"], "qcow2", "{i}");
    // A read-only image refuses.
    let ro = Image::open(
        &top,
        &OpenOptions {
            read_only: true,
            ..opts.clone()
        },
    )
    .unwrap();
    assert!(ro.as_qcow2().unwrap().set_backing(None, None).is_err());
}
