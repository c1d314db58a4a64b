//! Every config parser on 1 MiB (the caller's cap) of pathological input: finishes quickly
//! (linear work), never panics, keeps the default in range.

use std::time::{Duration, Instant};
use xdisk_boot::config::grubenv::GrubEnv;
use xdisk_boot::config::{bls, extlinux, grub2, legacy, BootConfig};

const MIB: usize = 1 << 20;

fn patterns() -> Vec<String> {
    let fill = |unit: &str| unit.repeat(MIB / unit.len());
    vec![
        fill("'"),
        fill("\""),
        fill("\\"),
        fill("{ "),
        fill("}\n"),
        fill("$"),
        fill(">"),
        fill(";"),
        fill("\n"),
        fill("menuentry 'x' {\nlinux /k a b\n}\n"),
        fill("submenu s {\n}\n"),
        fill("set default=1>1>1>1\n"),
        fill("title t\nkernel /k\n"),
        fill("module /m a\n"),
        fill("label l\nkernel k\nappend initrd=a,b c\n"),
        fill("initrd="),
        fill("--- "),
        fill("linux /k $a ${b} $\n"),
        fill("\u{10ffff}"),
        format!(
            "menuentry 'x' {{\nlinux /k {}\n}}\n",
            "a ".repeat(MIB / 2 - 20)
        ),
    ]
}

fn check(cfg: &BootConfig) {
    assert!(cfg.entries.is_empty() || cfg.default < cfg.entries.len());
}

#[test]
fn one_mebibyte_of_pathological_input_is_handled_quickly() {
    let start = Instant::now();
    let mut env = GrubEnv::new();
    env.set("saved_entry", &">".repeat(4096));
    for text in patterns() {
        let env2 = GrubEnv::parse(&text);
        for e in [&env, &env2] {
            if let Ok(c) = grub2::parse(&text, e) {
                check(&c);
            }
        }
        if let Ok(c) = legacy::parse(&text) {
            check(&c);
        }
        if let Ok(c) = extlinux::parse(&text, "/boot") {
            check(&c);
        }
        let files = vec![
            ("a-1-1.conf".to_string(), text.clone()),
            (text.chars().take(255).collect::<String>(), text.clone()),
        ];
        if let Ok(c) = bls::parse(&files, &env2) {
            check(&c);
        }
    }
    // Generous for a debug build on a shared machine; quadratic work would take minutes.
    assert!(
        start.elapsed() < Duration::from_secs(60),
        "took {:?}",
        start.elapsed()
    );
}

#[test]
fn many_bls_entries_with_long_similar_names_sort_quickly() {
    let start = Instant::now();
    let files: Vec<(String, String)> = (0..4096)
        .map(|i| {
            (
                format!("{}-{}.{i}-{}.conf", "m".repeat(200), "1.".repeat(20), i % 7),
                "linux /k\noptions $a $b\n".to_string(),
            )
        })
        .collect();
    let cfg = bls::parse(&files, &GrubEnv::new()).unwrap();
    assert_eq!(cfg.entries.len(), 4096);
    assert!(start.elapsed() < Duration::from_secs(30));
}
