//! The server side of the NBD handshake fed a client's bytes (client flags, then any
//! options): it ends in transmission, a close or an error, never a panic or a hang, and
//! what it negotiated is consistent.
#![no_main]

use std::io::{self, Read, Write};

use libfuzzer_sys::fuzz_target;
use xdisk_nbd::handshake::{negotiate, ExportInfo, Exports, Outcome};
use xdisk_nbd::wire::{flags, BlockSize};

struct Client<'a> {
    input: &'a [u8],
    written: usize,
}

impl Read for Client<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.input.read(buf)
    }
}

impl Write for Client<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.written += buf.len();
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

struct One;

impl Exports for One {
    fn names(&self) -> Vec<String> {
        vec!["disk".into()]
    }
    fn lookup(&self, name: &str) -> Option<ExportInfo> {
        (name.is_empty() || name == "disk").then(|| ExportInfo {
            name: "disk".into(),
            description: "fuzz".into(),
            size: 1 << 30,
            flags: flags::SEND_FLUSH | flags::SEND_DF,
            block: BlockSize {
                minimum: 1,
                preferred: 4096,
                maximum: 32 << 20,
            },
        })
    }
    /// As a backup export offers them: QEMU's contexts beside base:allocation, a dirty
    /// bitmap among them (the `qemu:` and `qemu:dirty-bitmap:` list queries match prefixes).
    fn contexts(&self, export: &str) -> Vec<String> {
        if export.is_empty() || export == "disk" {
            vec![
                "base:allocation".into(),
                "qemu:allocation-depth".into(),
                "qemu:dirty-bitmap:b0".into(),
            ]
        } else {
            Vec::new()
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let mut c = Client {
        input: data,
        written: 0,
    };
    if let Ok(Outcome::Transmission {
        negotiated,
        contexts,
        ..
    }) = negotiate(&mut c, &One)
    {
        assert_eq!(negotiated.size, 1 << 30);
        assert!(!negotiated.extended || negotiated.structured);
        assert_eq!(negotiated.meta_contexts, !contexts.is_empty());
        // Only contexts the export offers, each once, with its own ID.
        let offered = One.contexts("disk");
        for (i, (id, name)) in contexts.iter().enumerate() {
            assert!(offered.contains(name), "{name:?} was not offered");
            assert!(contexts[..i].iter().all(|(o, n)| o != id && n != name));
        }
        if !negotiated.structured {
            assert_eq!(negotiated.flags & flags::SEND_DF, 0);
        }
    }
    // Replies are bounded by what the client sent (no amplification beyond a small factor).
    assert!(
        c.written <= 64 + data.len() * 8 + 4096 * 4,
        "{} bytes for {}",
        c.written,
        data.len()
    );
});
