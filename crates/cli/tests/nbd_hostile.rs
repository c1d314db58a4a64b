//! `xdisk nbd` against clients that break the rules, and the server's promises that only a
//! hand-made client can check: every malformed request gets the error the spec names (or a
//! dropped connection) and the export stays up for everyone else; a client that does not
//! read its replies holds bounded memory; clients over the limit and slow handshakes are
//! closed; a flush on one connection covers another's writes (CAN_MULTI_CONN), proven with
//! SIGKILL; sparse reads come back as holes; several exports; --fork and --pid-file.

mod support;
use support::{ok_cmd as ok, xdisk};

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use xdisk_nbd::wire::{
    self, client, cmd, cmd_flags, errno, flags, opt, rep, reply, InfoRequest, OptionHeader,
    RequestHeader,
};

fn tmpdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("xdisk-nbd-hostile-")
        .tempdir_in("/var/tmp")
        .unwrap()
}

/// A running `xdisk nbd`, killed when dropped.
struct Server {
    child: Child,
    sock: PathBuf,
}

impl Server {
    fn start(dir: &Path, args: &[&str], image: Option<&Path>) -> Server {
        let sock = dir.join("nbd.sock");
        let child = xdisk()
            .arg("nbd")
            .args(args)
            .arg("-k")
            .arg(&sock)
            .args(image)
            .spawn()
            .unwrap();
        let mut s = Server { child, sock };
        let start = Instant::now();
        while !s.sock.exists() {
            if let Ok(Some(st)) = s.child.try_wait() {
                panic!("xdisk nbd exited early: {st}");
            }
            assert!(start.elapsed() < Duration::from_secs(20), "no socket");
            std::thread::sleep(Duration::from_millis(20));
        }
        s
    }

    fn assert_running(&mut self) {
        assert!(self.child.try_wait().unwrap().is_none(), "the server died");
    }

    fn rss_kib(&self) -> u64 {
        let st = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        st.lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A hand-made NBD client: fixed newstyle, NBD_OPT_GO, simple or structured replies.
struct Client {
    s: UnixStream,
    size: u64,
    flags: u16,
}

fn read_n(s: &mut UnixStream, n: usize) -> Vec<u8> {
    let mut b = vec![0u8; n];
    s.read_exact(&mut b).unwrap();
    b
}

fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().unwrap())
}
fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().unwrap())
}
fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes(b[..2].try_into().unwrap())
}

fn send_option(s: &mut UnixStream, option: u32, data: &[u8]) {
    let h = OptionHeader {
        option,
        len: data.len() as u32,
    };
    s.write_all(&h.encode()).unwrap();
    s.write_all(data).unwrap();
}

/// One option reply: (type, data).
fn option_reply(s: &mut UnixStream) -> (u32, Vec<u8>) {
    let h = read_n(s, 20);
    assert_eq!(be64(&h), wire::OPT_REPLY_MAGIC);
    let len = be32(&h[16..]) as usize;
    (be32(&h[12..]), read_n(s, len))
}

impl Client {
    fn connect(sock: &Path, export: &str, contexts: &[&str]) -> Client {
        let mut s = UnixStream::connect(sock).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let g = read_n(&mut s, 18);
        assert_eq!(be64(&g), wire::NBD_MAGIC);
        assert_eq!(be64(&g[8..]), wire::IHAVEOPT);
        s.write_all(&(client::FIXED_NEWSTYLE | client::NO_ZEROES).to_be_bytes())
            .unwrap();
        if !contexts.is_empty() {
            send_option(&mut s, opt::STRUCTURED_REPLY, &[]);
            assert_eq!(option_reply(&mut s).0, rep::ACK);
            let mut d = Vec::new();
            d.extend_from_slice(&(export.len() as u32).to_be_bytes());
            d.extend_from_slice(export.as_bytes());
            d.extend_from_slice(&(contexts.len() as u32).to_be_bytes());
            for c in contexts {
                d.extend_from_slice(&(c.len() as u32).to_be_bytes());
                d.extend_from_slice(c.as_bytes());
            }
            send_option(&mut s, opt::SET_META_CONTEXT, &d);
            while option_reply(&mut s).0 != rep::ACK {}
        }
        let go = InfoRequest {
            name: export.into(),
            requests: vec![],
        };
        send_option(&mut s, opt::GO, &go.encode());
        let (mut size, mut fl) = (0, 0);
        loop {
            let (t, d) = option_reply(&mut s);
            match t {
                rep::ACK => break,
                rep::INFO if be16(&d) == 0 => {
                    size = be64(&d[2..]);
                    fl = be16(&d[10..]);
                }
                rep::INFO => {}
                t => panic!("NBD_OPT_GO for {export:?} refused: {t:#x} {d:?}"),
            }
        }
        Client { s, size, flags: fl }
    }

    fn request(&mut self, kind: u16, fl: u16, cookie: u64, offset: u64, len: u64) {
        let h = RequestHeader {
            flags: fl,
            kind,
            cookie,
            offset,
            length: len,
            extended: false,
        };
        self.s.write_all(&h.encode()).unwrap();
    }

    /// A simple reply: (error, cookie).
    fn simple(&mut self) -> (u32, u64) {
        let r = read_n(&mut self.s, 16);
        assert_eq!(be32(&r), wire::SIMPLE_REPLY_MAGIC);
        (be32(&r[4..]), be64(&r[8..]))
    }

    /// A structured chunk: (flags, type, cookie, payload).
    fn chunk(&mut self) -> (u16, u16, u64, Vec<u8>) {
        let h = read_n(&mut self.s, 20);
        assert_eq!(be32(&h), wire::STRUCTURED_REPLY_MAGIC);
        let len = be32(&h[16..]) as usize;
        (
            be16(&h[4..]),
            be16(&h[6..]),
            be64(&h[8..]),
            read_n(&mut self.s, len),
        )
    }

    fn write(&mut self, cookie: u64, offset: u64, data: &[u8]) -> u32 {
        self.request(cmd::WRITE, 0, cookie, offset, data.len() as u64);
        self.s.write_all(data).unwrap();
        let (e, c) = self.simple();
        assert_eq!(c, cookie);
        e
    }

    fn read(&mut self, cookie: u64, offset: u64, len: usize) -> Vec<u8> {
        self.request(cmd::READ, 0, cookie, offset, len as u64);
        let (e, c) = self.simple();
        assert_eq!((e, c), (0, cookie));
        read_n(&mut self.s, len)
    }

    /// Whether the server closed the connection (within the read timeout).
    fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.s.read(&mut b), Ok(0) | Err(_))
    }
}

fn raw_image(dir: &Path, size: usize) -> PathBuf {
    let p = dir.join("disk.raw");
    let data: Vec<u8> = (0..size).map(|i| (i / 4096 % 251) as u8).collect();
    std::fs::write(&p, data).unwrap();
    p
}

#[test]
fn malformed_requests_get_the_spec_errors_and_the_export_stays_up() {
    let dir = tmpdir();
    let img = raw_image(dir.path(), 4 << 20);
    let mut srv = Server::start(dir.path(), &["-t", "-e", "4", "-f", "raw"], Some(&img));
    let mut c = Client::connect(&srv.sock, "", &[]);
    assert_eq!(c.size, 4 << 20);
    // Unknown command, unknown flag, past the end, over the maximum, DF without
    // structured replies, block status without a context: EINVAL, and the connection
    // goes on.
    c.request(99, 0, 1, 0, 512);
    assert_eq!(c.simple(), (errno::EINVAL, 1));
    c.request(cmd::READ, 1 << 9, 2, 0, 512);
    assert_eq!(c.simple(), (errno::EINVAL, 2));
    c.request(cmd::READ, 0, 3, (4 << 20) - 512, 1024);
    assert_eq!(c.simple(), (errno::EINVAL, 3));
    c.request(cmd::READ, 0, 4, 0, 64 << 20);
    assert_eq!(c.simple(), (errno::EINVAL, 4));
    c.request(cmd::READ, 0, 5, u64::MAX - 10, 512);
    assert_eq!(c.simple(), (errno::EINVAL, 5));
    c.request(cmd::READ, cmd_flags::DF, 6, 0, 512);
    assert_eq!(c.simple(), (errno::EINVAL, 6));
    c.request(cmd::BLOCK_STATUS, 0, 7, 0, 512);
    assert_eq!(c.simple(), (errno::EINVAL, 7));
    // A write past the end: ENOSPC, its payload skipped (the next request parses).
    assert_eq!(c.write(8, (4 << 20) - 512, &[0xee; 1024]), errno::ENOSPC);
    // Still serving, and nothing was written.
    assert_eq!(c.read(9, 4096, 4096), vec![1u8; 4096]);
    assert_eq!(c.write(10, 8192, &[0x77; 4096]), 0);
    assert_eq!(c.read(11, 8192, 4096), vec![0x77u8; 4096]);

    // A write payload over the maximum cannot be skipped: the client is dropped.
    c.request(cmd::WRITE, 0, 12, 0, 64 << 20);
    assert!(c.closed(), "a 64 MiB write payload must end the connection");
    // Bad magic: dropped.
    let mut c = Client::connect(&srv.sock, "", &[]);
    c.s.write_all(&[0x55; 28]).unwrap();
    assert!(c.closed());
    // Gone in the middle of a write payload, and in the middle of the handshake.
    let mut c = Client::connect(&srv.sock, "", &[]);
    c.request(cmd::WRITE, 0, 13, 0, 1 << 20);
    c.s.write_all(&[0xab; 4096]).unwrap();
    drop(c);
    let mut s = UnixStream::connect(&srv.sock).unwrap();
    read_n(&mut s, 18);
    s.write_all(&(client::FIXED_NEWSTYLE).to_be_bytes())
        .unwrap();
    s.write_all(&wire::IHAVEOPT.to_be_bytes()[..5]).unwrap();
    drop(s);
    // An export that does not exist: NBD_REP_ERR_UNKNOWN, and the client may go on.
    let mut s = UnixStream::connect(&srv.sock).unwrap();
    read_n(&mut s, 18);
    s.write_all(&(client::FIXED_NEWSTYLE).to_be_bytes())
        .unwrap();
    let go = InfoRequest {
        name: "nope".into(),
        requests: vec![],
    };
    send_option(&mut s, opt::GO, &go.encode());
    assert_eq!(option_reply(&mut s).0, rep::ERR_UNKNOWN);
    drop(s);

    srv.assert_running();
    let mut c = Client::connect(&srv.sock, "", &[]);
    assert_eq!(c.read(1, 8192, 4096), vec![0x77u8; 4096]);
    // The partial write of the client that left did not land.
    assert_eq!(c.read(2, 0, 4096), vec![0u8; 4096]);
    drop(c);
    srv.assert_running();
}

#[test]
fn a_client_that_does_not_read_its_replies_holds_bounded_memory() {
    let dir = tmpdir();
    let img = raw_image(dir.path(), 64 << 20);
    let mut srv = Server::start(dir.path(), &["-t", "-e", "2", "-f", "raw"], Some(&img));
    let mut c = Client::connect(&srv.sock, "", &[]);
    let before = srv.rss_kib();
    // 1 MiB reads, never reading a reply: the server must stop reading requests once its
    // budget (64 MiB by default) is spent, so the socket fills up.
    c.s.set_nonblocking(true).unwrap();
    let mut sent = 0u64;
    let mut stalled = false;
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(20) {
        let h = RequestHeader {
            flags: 0,
            kind: cmd::READ,
            cookie: sent,
            offset: (sent % 64) << 20,
            length: 1 << 20,
            extended: false,
        }
        .encode();
        match c.s.write(&h) {
            Ok(n) if n == h.len() => sent += 1,
            Ok(_) | Err(_) if sent > 0 => {
                // Give the server time to drain what it will, then try again.
                std::thread::sleep(Duration::from_millis(300));
                match c.s.write(&h) {
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        stalled = true;
                        break;
                    }
                    Ok(n) if n == h.len() => sent += 1,
                    r => panic!("{r:?}"),
                }
            }
            r => panic!("{r:?}"),
        }
        if sent > 500_000 {
            break;
        }
    }
    assert!(
        stalled,
        "the server read {sent} 1 MiB read requests without bound"
    );
    let grown = srv.rss_kib().saturating_sub(before);
    eprintln!("{sent} requests sent before the socket filled; server RSS grew {grown} KiB");
    assert!(
        grown < 400 << 10,
        "server memory grew by {grown} KiB for a client that does not read"
    );
    // Other clients are served meanwhile, and the greedy one is dropped cleanly.
    let mut other = Client::connect(&srv.sock, "", &[]);
    assert_eq!(other.read(1, 0, 4096), vec![0u8; 4096]);
    drop(c);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(other.read(2, 4096, 4096), vec![1u8; 4096]);
    srv.assert_running();
}

#[test]
fn clients_over_the_limit_are_closed_and_slow_handshakes_time_out() {
    let dir = tmpdir();
    let img = raw_image(dir.path(), 1 << 20);
    let mut srv = Server::start(
        dir.path(),
        &["-t", "-e", "2", "-f", "raw", "--handshake-limit", "1"],
        Some(&img),
    );
    let start = Instant::now();
    let mut idle: Vec<UnixStream> = (0..300)
        .map(|_| UnixStream::connect(&srv.sock).unwrap())
        .collect();
    // One more trickles its handshake a byte at a time: the limit is for the whole
    // handshake, not for each read.
    let mut trickle = UnixStream::connect(&srv.sock).unwrap();
    let mut greeted = 0;
    for s in &mut idle {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut b = [0u8; 18];
        // Refused ones are closed at once, without a greeting.
        if s.read_exact(&mut b).is_ok() {
            greeted += 1;
            // Served: its handshake must time out.
            let mut x = [0u8; 1];
            assert!(matches!(s.read(&mut x), Ok(0) | Err(_)));
        }
    }
    assert!(
        greeted <= 2,
        "{greeted} idle clients were served past the limit of 2"
    );
    let t0 = Instant::now();
    trickle
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut closed = false;
    for _ in 0..40 {
        if trickle.write_all(&[0]).is_err() {
            closed = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let mut b = [0u8; 64];
    closed = closed
        || loop {
            match trickle.read(&mut b) {
                Ok(0) | Err(_) => break true,
                Ok(_) => {}
            }
        };
    assert!(closed && t0.elapsed() < Duration::from_secs(9));
    eprintln!("300 idle clients handled in {:?}", start.elapsed());
    // The server is free for a real client again.
    drop(idle);
    std::thread::sleep(Duration::from_millis(300));
    let mut c = Client::connect(&srv.sock, "", &[]);
    assert_eq!(c.read(1, 4096, 512), vec![1u8; 512]);
    srv.assert_running();
}

#[test]
fn a_flush_on_one_connection_makes_another_connections_writes_durable() {
    let dir = tmpdir();
    let img = dir.path().join("disk.qcow2");
    ok(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&img)
        .arg("64M"));
    let mut srv = Server::start(
        dir.path(),
        &["-t", "-e", "2", "-f", "qcow2", "--cache", "none"],
        Some(&img),
    );
    let mut a = Client::connect(&srv.sock, "", &[]);
    let mut b = Client::connect(&srv.sock, "", &[]);
    assert_ne!(a.flags & flags::CAN_MULTI_CONN, 0, "CAN_MULTI_CONN");
    // Writes that allocate clusters (new L2 tables, refcounts) on A, not flushed by A.
    for i in 0..8u64 {
        assert_eq!(
            a.write(i, (3 + i * 7) << 20, &vec![0x5a ^ i as u8; 256 << 10]),
            0
        );
    }
    b.request(cmd::FLUSH, 0, 99, 0, 0);
    assert_eq!(b.simple(), (0, 99));
    // A crash right after: what B's flush covered must be there.
    srv.child.kill().unwrap();
    srv.child.wait().unwrap();
    let check = Command::new("qemu-img")
        .args(["check", "-f", "qcow2"])
        .arg(&img)
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&check.stdout);
    assert!(
        !out.contains("ERROR") && !out.contains("corruption"),
        "qemu-img check: {out}"
    );
    for i in 0..8u64 {
        ok(Command::new("qemu-io")
            .args(["-f", "qcow2", "-c"])
            .arg(format!("read -P {} {}M 256k", 0x5a ^ i, 3 + i * 7))
            .arg(&img));
    }
}

#[test]
fn sparse_reads_come_back_as_holes_unless_the_client_says_df() {
    let dir = tmpdir();
    let img = dir.path().join("disk.qcow2");
    ok(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&img)
        .arg("16M"));
    ok(Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "write -P 0x11 1M 1M"])
        .arg(&img));
    let srv = Server::start(dir.path(), &["-t", "-f", "qcow2"], Some(&img));
    let mut c = Client::connect(&srv.sock, "", &["base:allocation"]);
    assert_ne!(c.flags & flags::SEND_DF, 0);
    c.request(cmd::READ, 0, 1, 4 << 20, 1 << 20);
    let (f, t, cookie, p) = c.chunk();
    assert_eq!((f, t, cookie), (reply::FLAG_DONE, reply::OFFSET_HOLE, 1));
    assert_eq!((be64(&p), be32(&p[8..])), (4 << 20, 1 << 20));
    c.request(cmd::READ, cmd_flags::DF, 2, 4 << 20, 1 << 20);
    let (_, t, _, p) = c.chunk();
    assert_eq!(t, reply::OFFSET_DATA);
    assert!(p[8..].iter().all(|&x| x == 0) && p.len() == 8 + (1 << 20));
    c.request(cmd::READ, 0, 3, 1 << 20, 1 << 20);
    let (_, t, _, p) = c.chunk();
    assert_eq!(t, reply::OFFSET_DATA);
    assert!(p[8..].iter().all(|&x| x == 0x11));
}

#[test]
fn several_exports_each_with_its_format_and_allocation_depth() {
    let dir = tmpdir();
    let base = dir.path().join("base.qcow2");
    let top = dir.path().join("top.qcow2");
    let raw = raw_image(dir.path(), 2 << 20);
    ok(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&base)
        .arg("8M"));
    ok(Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "write -P 0x22 0 1M"])
        .arg(&base));
    ok(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
        .arg(&base)
        .arg(&top));
    ok(Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "write -P 0x33 512k 1M"])
        .arg(&top));
    let srv = Server::start(
        dir.path(),
        &[
            "-t",
            "-e",
            "4",
            "--export",
            &format!("raw=raw:{}", raw.display()),
            "--export",
            &format!("top=qcow2:{}", top.display()),
        ],
        None,
    );
    let uri = |e: &str| format!("nbd+unix:///{e}?socket={}", srv.sock.display());
    let list = ok(Command::new("nbdinfo").arg("--list").arg(uri("")));
    assert!(
        list.contains("export=\"raw\"") || list.contains("raw"),
        "{list}"
    );
    assert!(list.contains("top"), "{list}");
    ok(Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(&raw)
        .arg(uri("raw")));
    ok(Command::new("qemu-img")
        .args(["compare", "-f", "qcow2", "-F", "raw"])
        .arg(&top)
        .arg(uri("top")));
    // qemu:allocation-depth: 1 where the top allocates, 2 where its backing file does, 0
    // elsewhere, as qemu-nbd reports it.
    let text = ok(Command::new("nbdinfo")
        .arg("--map=qemu:allocation-depth")
        .arg(uri("top")));
    let rows: Vec<(u64, u64, u64)> = text
        .lines()
        .filter_map(|l| {
            let v: Vec<&str> = l.split_whitespace().collect();
            Some((
                v.first()?.parse().ok()?,
                v.get(1)?.parse().ok()?,
                v.get(2)?.parse().ok()?,
            ))
        })
        .collect();
    assert_eq!(
        rows,
        vec![
            (0, 512 << 10, 2),
            (512 << 10, 1 << 20, 1),
            (1536 << 10, 6656 << 10, 0)
        ],
        "{text}"
    );
}

#[test]
fn fork_returns_once_listening_and_sigterm_stops_the_server() {
    let dir = tmpdir();
    let img = raw_image(dir.path(), 1 << 20);
    let sock = dir.path().join("bg.sock");
    let pid_file = dir.path().join("nbd.pid");
    let t0 = Instant::now();
    ok(xdisk()
        .args(["nbd", "--fork", "-t", "-f", "raw", "-k"])
        .arg(&sock)
        .arg("--pid-file")
        .arg(&pid_file)
        .arg(&img));
    assert!(t0.elapsed() < Duration::from_secs(20));
    // Listening already when --fork returns.
    assert!(sock.exists());
    let pid: i32 = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let mut c = Client::connect(&sock, "", &[]);
    assert_eq!(c.write(1, 0, &[0x42; 4096]), 0);
    // SIGTERM with a client connected: the server closes it, flushes, and exits.
    ok(Command::new("kill").arg("-TERM").arg(pid.to_string()));
    assert!(c.closed());
    let start = Instant::now();
    while Path::new(&format!("/proc/{pid}")).exists() {
        assert!(start.elapsed() < Duration::from_secs(10), "still running");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!pid_file.exists() && !sock.exists());
    assert_eq!(&std::fs::read(&img).unwrap()[..4096], &[0x42; 4096][..]);
    // A server that cannot start makes --fork fail.
    let o = xdisk()
        .args(["nbd", "--fork", "-f", "raw", "-k"])
        .arg(&sock)
        .arg(dir.path().join("missing.raw"))
        .output()
        .unwrap();
    assert!(!o.status.success());
}

#[test]
fn detect_zeroes_stores_zero_writes_as_zero_clusters() {
    let dir = tmpdir();
    let img = dir.path().join("disk.qcow2");
    ok(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&img)
        .arg("8M"));
    let srv = Server::start(
        dir.path(),
        &[
            "-f",
            "qcow2",
            "--detect-zeroes",
            "unmap",
            "--discard",
            "unmap",
        ],
        Some(&img),
    );
    let mut c = Client::connect(&srv.sock, "", &[]);
    assert_eq!(c.write(1, 0, &vec![0u8; 1 << 20]), 0);
    assert_eq!(c.write(2, 2 << 20, &vec![7u8; 1 << 20]), 0);
    // FAST_ZERO: whole clusters of a qcow2 v3 image are a metadata update; part of a
    // cluster would be written, so the client is told to write it itself.
    assert_ne!(c.flags & flags::SEND_FAST_ZERO, 0);
    c.request(cmd::WRITE_ZEROES, cmd_flags::FAST_ZERO, 4, 4 << 20, 1 << 20);
    assert_eq!(c.simple(), (0, 4));
    c.request(cmd::WRITE_ZEROES, cmd_flags::FAST_ZERO, 5, 4096, 4096);
    assert_eq!(c.simple(), (errno::ENOTSUP, 5));
    c.request(cmd::DISC, 0, 3, 0, 0);
    drop(c);
    let mut srv = srv;
    let _ = srv.child.wait();
    let map = ok(Command::new("qemu-img")
        .args(["map", "--output=json", "-f", "qcow2"])
        .arg(&img));
    // Nothing stored for the zero write; the data write has its clusters.
    let first = map.lines().find(|l| l.contains("\"start\": 0")).unwrap();
    assert!(first.contains("\"data\": false"), "{map}");
    assert!(
        map.contains("\"start\": 2097152") && map.contains("\"data\": true"),
        "{map}"
    );
}

/// CPU time (user + system) of a process, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let st = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which is in parentheses): utime is the 14th field.
    let rest = &st[st.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

/// A connected client that has done I/O and then waits costs the server no CPU: the I/O
/// thread sleeps in poll(2) (a completion eventfd left readable once made it spin).
#[test]
fn an_idle_connection_costs_no_cpu() {
    let dir = tmpdir();
    let img = raw_image(dir.path(), 4 << 20);
    let srv = Server::start(
        dir.path(),
        &["-t", "-f", "raw", "--cache", "none"],
        Some(&img),
    );
    let mut c = Client::connect(&srv.sock, "", &[]);
    for i in 0..64 {
        assert_eq!(c.read(i, (i % 1024) * 4096, 4096).len(), 4096);
    }
    assert_eq!(c.write(99, 0, &[1u8; 4096]), 0);
    std::thread::sleep(Duration::from_millis(200));
    let before = cpu_ticks(srv.child.id());
    std::thread::sleep(Duration::from_secs(2));
    let used = cpu_ticks(srv.child.id()) - before;
    // A spinning thread would use about 200 ticks (100 per second).
    assert!(
        used < 40,
        "an idle connection used {used} ticks of CPU in 2 s"
    );
    drop(c);
}
