//! Parses arbitrary bytes as a xenstore wire message, as the simulated xenstored does.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = xdisk_xen::xenstore::parse_message(data);
});
