//! BLS entry parsing of arbitrary bytes. The input is cut at NUL bytes: the first piece is a
//! grubenv, then (file name, contents) pairs. No panic, a default inside the list.
#![no_main]

use libfuzzer_sys::fuzz_target;
use xdisk_boot::config::bls;
use xdisk_boot::config::grubenv::GrubEnv;

fuzz_target!(|data: &[u8]| {
    let mut pieces = data.split(|&b| b == 0).take(65);
    let env = GrubEnv::parse(&String::from_utf8_lossy(pieces.next().unwrap_or(&[])));
    let mut files: Vec<(String, String)> = Vec::new();
    while let Some(name) = pieces.next() {
        let body = pieces.next().unwrap_or(&[]);
        files.push((
            String::from_utf8_lossy(name).into_owned(),
            String::from_utf8_lossy(body).into_owned(),
        ));
    }
    if let Ok(c) = bls::parse(&files, &env) {
        assert!(c.entries.is_empty() || c.default < c.entries.len());
    }
});
