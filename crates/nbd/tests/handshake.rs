//! The server handshake against a scripted client (every option, hostile ones included) and
//! against libnbd's `nbdinfo` (a real client) over a unix socket.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::process::Command;
use std::thread;

use xdisk_nbd::handshake::{negotiate, ExportInfo, Exports, HandshakeError, Outcome, MAX_OPTIONS};
use xdisk_nbd::wire::*;

struct Two;

fn export(name: &str, size: u64) -> ExportInfo {
    ExportInfo {
        name: name.to_owned(),
        description: format!("the {name} disk"),
        size,
        flags: flags::SEND_FLUSH | flags::SEND_FUA | flags::SEND_TRIM | flags::SEND_DF,
        block: BlockSize {
            minimum: 1,
            preferred: 4096,
            maximum: 32 << 20,
        },
    }
}

impl Exports for Two {
    fn names(&self) -> Vec<String> {
        vec!["disk".into(), "backup".into()]
    }
    fn lookup(&self, name: &str) -> Option<ExportInfo> {
        match name {
            "" | "disk" => Some(export("disk", 1 << 30)),
            "backup" => Some(export("backup", 4 << 20)),
            _ => None,
        }
    }
}

/// A client that speaks the raw protocol, for the scripted tests.
struct Client {
    s: UnixStream,
}

impl Client {
    /// Connects to a server thread; reads the greeting and sends `flags`.
    fn start(flags_: u32) -> (Client, thread::JoinHandle<Result<Outcome, HandshakeError>>) {
        let (a, mut b) = UnixStream::pair().unwrap();
        let server = thread::spawn(move || negotiate(&mut b, &Two));
        let mut c = Client { s: a };
        let mut g = [0u8; 18];
        c.s.read_exact(&mut g).unwrap();
        assert_eq!(&g[..8], &NBD_MAGIC.to_be_bytes());
        assert_eq!(&g[8..16], &IHAVEOPT.to_be_bytes());
        let hf = u16::from_be_bytes([g[16], g[17]]);
        assert_eq!(hf, handshake::FIXED_NEWSTYLE | handshake::NO_ZEROES);
        c.s.write_all(&flags_.to_be_bytes()).unwrap();
        (c, server)
    }

    fn send(&mut self, option: u32, data: &[u8]) {
        let h = OptionHeader {
            option,
            len: data.len() as u32,
        };
        self.s.write_all(&h.encode()).unwrap();
        self.s.write_all(data).unwrap();
    }

    /// One option reply: (option, type, data).
    fn reply(&mut self) -> (u32, u32, Vec<u8>) {
        let mut h = [0u8; 20];
        self.s.read_exact(&mut h).unwrap();
        assert_eq!(&h[..8], &OPT_REPLY_MAGIC.to_be_bytes());
        let o = u32::from_be_bytes(h[8..12].try_into().unwrap());
        let t = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let n = u32::from_be_bytes(h[16..20].try_into().unwrap());
        let mut d = vec![0u8; n as usize];
        self.s.read_exact(&mut d).unwrap();
        (o, t, d)
    }

    /// Replies until a final one (ACK or error); returns all of them.
    fn replies(&mut self) -> Vec<(u32, u32, Vec<u8>)> {
        let mut v = Vec::new();
        loop {
            let r = self.reply();
            let last = r.1 == rep::ACK || r.1 & (1 << 31) != 0;
            v.push(r);
            if last {
                return v;
            }
        }
    }
}

const BOTH: u32 = client::FIXED_NEWSTYLE | client::NO_ZEROES;

#[test]
fn list_then_info_then_go_enters_transmission() {
    let (mut c, server) = Client::start(BOTH);
    c.send(opt::LIST, &[]);
    let r = c.replies();
    let names: Vec<&[u8]> = r
        .iter()
        .filter(|x| x.1 == rep::SERVER)
        .map(|x| &x.2[4..])
        .collect();
    assert_eq!(names, vec![&b"disk"[..], b"backup"]);
    // Unknown export: an error, and the negotiation goes on.
    let req = |name: &str, infos: Vec<u16>| {
        InfoRequest {
            name: name.into(),
            requests: infos,
        }
        .encode()
    };
    c.send(opt::INFO, &req("nope", vec![]));
    assert_eq!(c.replies().last().unwrap().1, rep::ERR_UNKNOWN);
    c.send(opt::STRUCTURED_REPLY, &[]);
    assert_eq!(c.replies().last().unwrap().1, rep::ACK);
    c.send(
        opt::GO,
        &req(
            "backup",
            vec![info::NAME, info::DESCRIPTION, info::BLOCK_SIZE],
        ),
    );
    let r = c.replies();
    assert_eq!(r.last().unwrap().1, rep::ACK);
    let infos: Vec<u16> = r
        .iter()
        .filter(|x| x.1 == rep::INFO)
        .map(|x| u16::from_be_bytes([x.2[0], x.2[1]]))
        .collect();
    assert_eq!(
        infos,
        vec![
            info::EXPORT,
            info::NAME,
            info::DESCRIPTION,
            info::BLOCK_SIZE
        ]
    );
    let ex = &r[0].2;
    assert_eq!(u64::from_be_bytes(ex[2..10].try_into().unwrap()), 4 << 20);
    let f = u16::from_be_bytes([ex[10], ex[11]]);
    assert_ne!(f & flags::SEND_DF, 0, "DF once structured replies are on");
    match server.join().unwrap().unwrap() {
        Outcome::Transmission {
            export, negotiated, ..
        } => {
            assert_eq!(export.name, "backup");
            assert!(negotiated.structured && !negotiated.extended);
            assert_eq!(negotiated.flags, f);
        }
        o => panic!("{o:?}"),
    }
}

#[test]
fn export_name_sends_size_flags_and_zeroes_unless_no_zeroes() {
    for (flags_, zeroes) in [(client::FIXED_NEWSTYLE, 124usize), (BOTH, 0)] {
        let (mut c, server) = Client::start(flags_);
        c.send(opt::EXPORT_NAME, b"disk");
        let mut b = vec![0u8; 10 + zeroes];
        c.s.read_exact(&mut b).unwrap();
        assert_eq!(u64::from_be_bytes(b[..8].try_into().unwrap()), 1 << 30);
        let f = u16::from_be_bytes([b[8], b[9]]);
        assert_eq!(f & flags::SEND_DF, 0, "no DF without structured replies");
        assert!(matches!(
            server.join().unwrap(),
            Ok(Outcome::Transmission { .. })
        ));
    }
    // An unknown name: the only answer is closing the connection.
    let (mut c, server) = Client::start(BOTH);
    c.send(opt::EXPORT_NAME, b"nope");
    assert!(matches!(
        server.join().unwrap(),
        Err(HandshakeError::UnknownExport(_))
    ));
    let mut b = [0u8; 1];
    assert_eq!(c.s.read(&mut b).unwrap(), 0, "closed without a reply");
}

#[test]
fn meta_contexts_are_listed_set_and_bound_to_their_export() {
    let (mut c, server) = Client::start(BOTH);
    let q = |name: &str, queries: &[&str]| {
        MetaContextRequest {
            name: name.into(),
            queries: queries.iter().map(|s| s.to_string()).collect(),
        }
        .encode()
    };
    // Before structured replies: invalid.
    c.send(opt::SET_META_CONTEXT, &q("disk", &["base:allocation"]));
    assert_eq!(c.replies().last().unwrap().1, rep::ERR_INVALID);
    c.send(opt::EXTENDED_HEADERS, &[]);
    assert_eq!(c.replies().last().unwrap().1, rep::ACK);
    c.send(opt::STRUCTURED_REPLY, &[]);
    assert_eq!(
        c.replies().last().unwrap().1,
        rep::ERR_EXT_HEADER_REQD,
        "structured replies after extended headers"
    );
    c.send(opt::LIST_META_CONTEXT, &q("disk", &["base:"]));
    let r = c.replies();
    assert_eq!(r[0].1, rep::META_CONTEXT);
    assert_eq!(&r[0].2[4..], b"base:allocation");
    c.send(
        opt::SET_META_CONTEXT,
        &q("disk", &["base:allocation", "qemu:dirty-bitmap:x"]),
    );
    let r = c.replies();
    assert_eq!(
        r.len(),
        2,
        "one context selected, unknown namespaces ignored"
    );
    assert_eq!(u32::from_be_bytes(r[0].2[..4].try_into().unwrap()), 1);
    c.send(
        opt::GO,
        &InfoRequest {
            name: "disk".into(),
            requests: vec![],
        }
        .encode(),
    );
    c.replies();
    match server.join().unwrap().unwrap() {
        Outcome::Transmission {
            negotiated,
            contexts,
            ..
        } => {
            assert!(negotiated.extended && negotiated.meta_contexts);
            assert_eq!(contexts, vec![(1, "base:allocation".to_owned())]);
        }
        o => panic!("{o:?}"),
    }
}

#[test]
fn hostile_clients_get_errors_or_are_dropped() {
    // Unknown client flags, and a client without fixed newstyle: dropped.
    for f in [1u32 << 7 | BOTH, 0] {
        let (_c, server) = Client::start(f);
        assert!(matches!(
            server.join().unwrap(),
            Err(HandshakeError::Protocol(_))
        ));
    }
    // Unknown options, data where none is allowed, garbage option data: error replies.
    let (mut c, server) = Client::start(BOTH);
    c.send(999, b"x");
    assert_eq!(c.replies().last().unwrap().1, rep::ERR_UNSUP);
    c.send(opt::LIST, b"junk");
    assert_eq!(c.replies().last().unwrap().1, rep::ERR_INVALID);
    c.send(opt::GO, &[0xff; 3]);
    assert_eq!(c.replies().last().unwrap().1, rep::ERR_INVALID);
    c.send(opt::STARTTLS, &[]);
    assert_eq!(c.replies().last().unwrap().1, rep::ERR_POLICY);
    c.send(opt::ABORT, &[]);
    assert_eq!(c.replies().last().unwrap().1, rep::ACK);
    assert!(matches!(server.join().unwrap(), Ok(Outcome::Closed)));
    // An option claiming more data than the server reads: dropped before reading it.
    let (mut c, server) = Client::start(BOTH);
    let h = OptionHeader {
        option: opt::GO,
        len: 0,
    }
    .encode();
    let mut h = h.to_vec();
    h[12..16].copy_from_slice(&(MAX_OPTION_DATA + 1).to_be_bytes());
    c.s.write_all(&h).unwrap();
    assert!(matches!(
        server.join().unwrap(),
        Err(HandshakeError::Protocol(_))
    ));
    // A client that never stops sending options: dropped after MAX_OPTIONS.
    let (mut c, server) = Client::start(BOTH);
    let t = thread::spawn(move || {
        for _ in 0..MAX_OPTIONS + 1 {
            c.send(opt::LIST, &[]);
            if c.replies().is_empty() {
                break;
            }
        }
    });
    assert!(matches!(
        server.join().unwrap(),
        Err(HandshakeError::Protocol(_))
    ));
    let _ = t.join();
    // Closing mid-negotiation is a clean end.
    let (c, server) = Client::start(BOTH);
    drop(c);
    assert!(matches!(server.join().unwrap(), Ok(Outcome::Closed)));
}

/// A transmission phase good enough for nbdinfo: reads return zeroes (a hole chunk when
/// structured replies are on), until the client disconnects.
fn serve_zeroes(s: &mut UnixStream, n: &Negotiated) {
    loop {
        let mut h = [0u8; REQUEST_LEN];
        if s.read_exact(&mut h).is_err() {
            return;
        }
        let r = RequestHeader::parse_compact(&h).unwrap();
        match xdisk_nbd::wire::Command::from_header(&r, n) {
            Ok(xdisk_nbd::wire::Command::Read { offset, len, .. }) if n.structured => {
                let mut b = chunk_header(
                    false,
                    reply::FLAG_DONE,
                    reply::OFFSET_HOLE,
                    r.cookie,
                    offset,
                    12,
                );
                b.extend_from_slice(&offset.to_be_bytes());
                b.extend_from_slice(&len.to_be_bytes());
                s.write_all(&b).unwrap();
            }
            Ok(xdisk_nbd::wire::Command::Disconnect) => return,
            other => panic!("unexpected request {other:?}"),
        }
    }
}

/// libnbd's nbdinfo negotiates with the server (structured replies, meta contexts, GO with
/// every info type) and prints what it learnt; the test serves the handshake, then answers
/// its disconnect request.
#[test]
fn nbdinfo_reads_the_export_list_and_sizes() {
    if Command::new("nbdinfo").arg("--version").output().is_err() {
        panic!("nbdinfo not found: run scripts/setup (package libnbd-bin)");
    }
    let dir = std::env::temp_dir().join(format!("xdisk-nbd-hs-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("nbd.sock");
    let _ = std::fs::remove_file(&sock);
    let listener = UnixListener::bind(&sock).unwrap();
    let server = thread::spawn(move || {
        let mut outcomes = Vec::new();
        for _ in 0..2 {
            let (mut s, _) = listener.accept().unwrap();
            let o = negotiate(&mut s, &Two).unwrap();
            if let Outcome::Transmission { negotiated, .. } = &o {
                serve_zeroes(&mut s, negotiated);
            }
            outcomes.push(o);
        }
        outcomes
    });
    let uri = format!("nbd+unix:///backup?socket={}", sock.display());
    let out = Command::new("nbdinfo")
        .arg("--json")
        .arg(&uri)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "nbdinfo: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("\"export-size\": 4194304"), "{text}");
    assert!(text.contains("the backup disk"), "{text}");
    assert!(text.contains("base:allocation"), "{text}");
    let list = Command::new("nbdinfo")
        .args(["--list", "--json"])
        .arg(format!("nbd+unix://?socket={}", sock.display()))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&list.stdout);
    assert!(
        list.status.success() && text.contains("\"disk\"") && text.contains("\"backup\""),
        "nbdinfo --list: {text}{}",
        String::from_utf8_lossy(&list.stderr)
    );
    let outcomes = server.join().unwrap();
    assert!(matches!(outcomes[0], Outcome::Transmission { .. }));
    let _ = std::fs::remove_dir_all(&dir);
}

/// A scripted peer: reads come from `input`, writes gather in `output`.
struct Script {
    input: std::io::Cursor<Vec<u8>>,
    output: Vec<u8>,
}

impl Read for Script {
    fn read(&mut self, b: &mut [u8]) -> std::io::Result<usize> {
        self.input.read(b)
    }
}

impl Write for Script {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.output.extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn opt_bytes(option: u32, data: &[u8]) -> Vec<u8> {
    let mut b = OptionHeader {
        option,
        len: data.len() as u32,
    }
    .encode()
    .to_vec();
    b.extend_from_slice(data);
    b
}

/// The (option, reply type) of each option reply in a server's output.
fn reply_types(out: &[u8]) -> Vec<(u32, u32)> {
    let mut v = Vec::new();
    let mut at = 0;
    while at + 20 <= out.len() {
        let h = &out[at..at + 20];
        let option = u32::from_be_bytes(h[8..12].try_into().unwrap());
        let t = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize;
        v.push((option, t));
        at += 20 + len;
    }
    v
}

#[test]
fn a_tls_only_server_wants_starttls_first_and_only_once() {
    use xdisk_nbd::handshake::{negotiate_in_tls, negotiate_with, Tls};
    let go = InfoRequest {
        name: "disk".into(),
        requests: vec![],
    }
    .encode();
    let mut input = client::FIXED_NEWSTYLE.to_be_bytes().to_vec();
    input.extend(opt_bytes(opt::GO, &go));
    input.extend(opt_bytes(opt::LIST, &[]));
    input.extend(opt_bytes(opt::STARTTLS, &[]));
    let mut s = Script {
        input: std::io::Cursor::new(input),
        output: Vec::new(),
    };
    let o = negotiate_with(&mut s, &Two, Tls::Required).unwrap();
    assert_eq!(o, Outcome::StartTls { no_zeroes: false });
    assert_eq!(
        reply_types(&s.output[18..]),
        vec![
            (opt::GO, rep::ERR_TLS_REQD),
            (opt::LIST, rep::ERR_TLS_REQD),
            (opt::STARTTLS, rep::ACK)
        ]
    );

    // EXPORT_NAME before TLS: dropped.
    let mut input = client::FIXED_NEWSTYLE.to_be_bytes().to_vec();
    input.extend(opt_bytes(opt::EXPORT_NAME, b"disk"));
    let mut s = Script {
        input: std::io::Cursor::new(input),
        output: Vec::new(),
    };
    assert!(negotiate_with(&mut s, &Two, Tls::Required).is_err());

    // Over TLS: a second STARTTLS is invalid, the rest as usual.
    let mut input = opt_bytes(opt::STARTTLS, &[]);
    input.extend(opt_bytes(opt::GO, &go));
    let mut s = Script {
        input: std::io::Cursor::new(input),
        output: Vec::new(),
    };
    let o = negotiate_in_tls(&mut s, &Two, true).unwrap();
    assert!(matches!(o, Outcome::Transmission { .. }));
    let r = reply_types(&s.output);
    assert_eq!(r[0], (opt::STARTTLS, rep::ERR_INVALID));
    assert_eq!(r.last(), Some(&(opt::GO, rep::ACK)));

    // Without TLS configured: POLICY, as before.
    let mut input = client::FIXED_NEWSTYLE.to_be_bytes().to_vec();
    input.extend(opt_bytes(opt::STARTTLS, &[]));
    let mut s = Script {
        input: std::io::Cursor::new(input),
        output: Vec::new(),
    };
    assert_eq!(negotiate(&mut s, &Two).unwrap(), Outcome::Closed);
    assert_eq!(
        reply_types(&s.output[18..]),
        vec![(opt::STARTTLS, rep::ERR_POLICY)]
    );
}
