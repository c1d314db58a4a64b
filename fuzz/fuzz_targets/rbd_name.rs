//! RBD image names (`rbd:POOL/[NAMESPACE/]IMAGE[@SNAP][:KEY=VALUE...]`, QEMU's spelling) as
//! every command and Xen's `params` take them (`xdisk_rbd::RbdName::parse`, through
//! `DiskSource::parse`). No panic; whatever parses prints back (escaped) to a name that parses
//! to the same thing; the name shown in messages parses too (unless hiding secrets made it
//! longer than a name may be), with every `key=` value hidden; xdisk's own keys (`encrypt.*`,
//! `xdisk_deadline`, `xdisk_lock`, `xdisk_luks`) never become Ceph options.
#![no_main]

use libfuzzer_sys::fuzz_target;
use xdisk_image::{DiskSource, Location};
use xdisk_rbd::RbdName;

fuzz_target!(|data: &[u8]| {
    let s = String::from_utf8_lossy(data);
    let prefixed = format!("rbd:{s}");
    for input in [s.as_ref(), prefixed.as_str()] {
        let parsed = RbdName::parse(input);
        if let Ok(n) = &parsed {
            assert!(!n.pool.is_empty() && !n.image.is_empty());
            for (k, _) in &n.options {
                assert!(
                    !k.starts_with("encrypt.")
                        && ![
                            xdisk_rbd::name::DEADLINE_KEY,
                            xdisk_rbd::name::LOCK_KEY,
                            xdisk_rbd::name::LUKS_KEY
                        ]
                        .contains(&k.as_str()),
                    "{k} passed to Ceph"
                );
            }
            // librbd's encryption is loaded or the LUKS header is read as stored, not both.
            assert!(!(n.encrypt.is_some() && n.luks_raw));
            let again = RbdName::parse(&n.to_spec()).expect("the spec of a name parses");
            assert_eq!(&again, n);
            // The shown name parses too, unless hiding short secrets behind `<hidden>` made
            // it longer than any name may be (it is a message then, never a name to use).
            let text = n.to_string();
            match RbdName::parse(&text) {
                Ok(shown) => {
                    for (k, v) in &shown.options {
                        if k == "key" {
                            assert_eq!(v, "<hidden>");
                        }
                    }
                }
                Err(e) => assert!(
                    text.len() > xdisk_rbd::name::MAX_NAME_LEN,
                    "the shown name parses: {e:?}"
                ),
            }
        }
        // The one place every command parses names agrees.
        match DiskSource::parse(input, None) {
            Ok(DiskSource {
                location: Location::Rbd(n),
                ..
            }) => assert_eq!(parsed.as_ref().ok(), Some(&n)),
            _ => assert!(parsed.is_err() || !input.starts_with("rbd:")),
        }
    }
});
