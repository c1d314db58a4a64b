//! The NBD client against real servers: qemu-nbd, nbdkit, and hostile ones written here.
//! Each test skips (with a printed reason) only if its server program is not installed.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use xdisk_io::sys::EventFd;
use xdisk_io::{AlignedBuf, Allocation, EngineConfig, IoSlice, Op, OpKind, Storage};
use xdisk_nbd_client::{ClientConfig, Error, NbdStorage, NbdUri};

fn have(tool: &str) -> bool {
    let ok = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        eprintln!("SKIP: {tool} is not installed");
    }
    ok
}

fn tmp() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("xdisk-nbd-client-")
        .tempdir_in("/var/tmp")
        .unwrap()
}

fn run(cmd: &mut Command) -> String {
    let o = cmd.output().unwrap();
    assert!(
        o.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A server process, killed when dropped.
struct Server {
    child: Child,
    sock: PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    fn start(mut cmd: Command, sock: &Path) -> Server {
        let mut child = cmd.spawn().unwrap();
        let start = Instant::now();
        while !sock.exists() {
            if let Ok(Some(st)) = child.try_wait() {
                panic!("{cmd:?} exited early: {st}");
            }
            assert!(start.elapsed() < Duration::from_secs(20), "no socket");
            std::thread::sleep(Duration::from_millis(20));
        }
        Server {
            child,
            sock: sock.to_path_buf(),
        }
    }
    fn uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.sock.display())
    }
}

fn qemu_nbd(dir: &Path, file: &Path, fmt: &str, extra: &[&str]) -> Server {
    let sock = dir.join("qemu-nbd.sock");
    let mut c = Command::new("qemu-nbd");
    c.args(["-f", fmt, "-x", "disk", "-k"])
        .arg(&sock)
        .args(extra)
        .arg(file);
    Server::start(c, &sock)
}

fn nbdkit(dir: &Path, args: &[&str]) -> Server {
    let sock = dir.join("nbdkit.sock");
    let mut c = Command::new("nbdkit");
    c.args(["-f", "-U"]).arg(&sock).args(args);
    Server::start(c, &sock)
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn open(uri: &str) -> NbdStorage {
    NbdStorage::open_uri(uri, &ClientConfig::default()).unwrap()
}

#[test]
fn qemu_nbd_raw_round_trip_both_ways() {
    if !have("qemu-nbd") || !have("qemu-io") {
        return;
    }
    let dir = tmp();
    let img = dir.path().join("disk.raw");
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "raw"])
        .arg(&img)
        .arg("64M"));
    run(Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 0x5a 8M 1M"])
        .arg(&img));
    let srv = qemu_nbd(dir.path(), &img, "raw", &["-t"]);
    {
        let s = open(&srv.uri("disk"));
        let n = *s.negotiated();
        assert_eq!(n.size, 64 << 20);
        assert!(n.structured, "{n:?}");
        assert!(n.allocation.is_some(), "{n:?}");
        // What qemu-io wrote, read back through the client.
        let mut b = vec![0u8; 1 << 20];
        s.read_at(&mut b, 8 << 20).unwrap();
        assert!(b.iter().all(|&x| x == 0x5a));
        // Large (split) and unaligned writes, then read back.
        let big = pattern(5 << 20, 7);
        s.write_at(&big, 20 << 20).unwrap();
        let odd = pattern(1000, 99);
        s.write_at(&odd, (30 << 20) + 17).unwrap();
        s.flush().unwrap();
        let mut back = vec![0u8; big.len()];
        s.read_at(&mut back, 20 << 20).unwrap();
        assert!(back == big);
        let mut back = vec![0u8; odd.len()];
        s.read_at(&mut back, (30 << 20) + 17).unwrap();
        assert_eq!(back, odd);
        // Past the end: zeroes, and writes refused.
        let mut tail = vec![1u8; 8192];
        s.read_at(&mut tail, (64 << 20) - 4096).unwrap();
        assert!(tail.iter().all(|&x| x == 0));
        let e = s.write_at(&[1; 4096], 64 << 20).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOSPC));
        // Zeroes and discard.
        s.write_zeroes(8 << 20, 4096).unwrap();
        let mut z = vec![1u8; 4096];
        s.read_at(&mut z, 8 << 20).unwrap();
        assert!(z.iter().all(|&x| x == 0));
        s.discard(40 << 20, 1 << 20).unwrap();
        // Block status: a sparse raw file has holes.
        assert!(matches!(
            s.allocation(50 << 20, 1 << 20),
            Allocation::Hole { .. }
        ));
        assert!(matches!(
            s.allocation((8 << 20) + 4096, 4096),
            Allocation::Data { .. }
        ));
        assert!(s.set_size(1).is_err());
    }
    drop(srv);
    // What the client wrote, read with qemu-io on the file.
    run(Command::new("qemu-io")
        .args([
            "-f",
            "raw",
            "-c",
            "read -P 0x5a 8196k 4k",
            "-c",
            "read -P 0 8M 4k",
        ])
        .arg(&img));
    let mut f = std::fs::File::open(&img).unwrap();
    let mut all = Vec::new();
    f.read_to_end(&mut all).unwrap();
    assert!(all[20 << 20..25 << 20] == pattern(5 << 20, 7)[..]);
    assert_eq!(
        &all[(30 << 20) + 17..(30 << 20) + 1017],
        &pattern(1000, 99)[..]
    );
}

#[test]
fn qcow2_over_qemu_nbd_reads_what_qemu_io_wrote() {
    if !have("qemu-nbd") || !have("qemu-io") {
        return;
    }
    let dir = tmp();
    let img = dir.path().join("disk.qcow2");
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&img)
        .arg("16M"));
    run(Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "write -P 0x3c 1M 64k"])
        .arg(&img));
    // The qcow2 file exported as raw bytes: the client sees the qcow2 container.
    let srv = qemu_nbd(dir.path(), &img, "raw", &[]);
    let s = open(&srv.uri("disk"));
    let mut magic = [0u8; 4];
    s.read_at(&mut magic, 0).unwrap();
    assert_eq!(&magic, b"QFI\xfb");
}

#[test]
fn nbdkit_block_size_limits_split_and_align() {
    if !have("nbdkit") {
        return;
    }
    let dir = tmp();
    let srv = nbdkit(
        dir.path(),
        &[
            "--filter=blocksize-policy",
            "memory",
            "16M",
            "blocksize-minimum=512",
            "blocksize-preferred=4096",
            "blocksize-maximum=65536",
            "blocksize-error-policy=error",
        ],
    );
    let s = open(&srv.uri(""));
    let n = *s.negotiated();
    assert_eq!((n.block.minimum, n.block.maximum), (512, 65536), "{n:?}");
    assert_eq!(s.alignment().offset, 512);
    // 1 MiB in 64 KiB pieces; an unaligned write by read-modify-write.
    let big = pattern(1 << 20, 3);
    s.write_at(&big, 1 << 20).unwrap();
    s.write_at(b"hello", (1 << 20) + 1000).unwrap();
    let mut back = vec![0u8; 1 << 20];
    s.read_at(&mut back, 1 << 20).unwrap();
    let mut want = big.clone();
    want[1000..1005].copy_from_slice(b"hello");
    assert!(back == want);
    let mut odd = [0u8; 7];
    s.read_at(&mut odd, (1 << 20) + 999).unwrap();
    assert_eq!(&odd[1..6], b"hello");
    // Write zeroes with unaligned edges.
    s.write_zeroes((1 << 20) + 100, 5000).unwrap();
    let mut z = vec![1u8; 5000];
    s.read_at(&mut z, (1 << 20) + 100).unwrap();
    assert!(z.iter().all(|&x| x == 0));
    let mut keep = [0u8; 100];
    s.read_at(&mut keep, 1 << 20).unwrap();
    assert_eq!(&keep[..], &big[..100]);
    s.flush().unwrap();
    // nbdkit's memory plugin reports holes.
    assert!(matches!(
        s.allocation(8 << 20, 1 << 20),
        Allocation::Hole { .. }
    ));
}

/// The engine path: many operations in flight on one connection, completions through
/// reap and the notify eventfd.
#[test]
fn engine_pipelines_reads_and_writes() {
    if !have("nbdkit") {
        return;
    }
    let dir = tmp();
    let srv = nbdkit(dir.path(), &["memory", "32M"]);
    let s = Arc::new(open(&srv.uri("")));
    let notify = Arc::new(EventFd::new().unwrap());
    let cfg = EngineConfig {
        queue_depth: 64,
        ..EngineConfig::default()
    };
    let mut e = s
        .clone()
        .open_engine(&cfg, notify.clone())
        .unwrap()
        .unwrap();
    let n = 48usize;
    let mut bufs: Vec<AlignedBuf> = (0..n)
        .map(|i| {
            let mut b = AlignedBuf::new(64 * 1024, 4096);
            b.copy_from_slice(&pattern(64 * 1024, i as u8));
            b
        })
        .collect();
    let slice = |b: &mut AlignedBuf| {
        let len = b.len();
        // SAFETY: the buffers outlive every operation (all are reaped below).
        #[allow(unsafe_code)]
        unsafe {
            IoSlice::new(b, 0, len)
        }
    };
    for (i, b) in bufs.iter_mut().enumerate() {
        let op = Op {
            kind: OpKind::Write,
            fd: -1,
            offset: (i * 64 * 1024) as u64,
            buf: Some(slice(b)),
            user_data: i as u64,
        };
        assert!(e.submit(op).is_ok());
    }
    e.commit().unwrap();
    let mut out = Vec::new();
    while out.len() < n {
        let want = n - out.len();
        e.reap(&mut out, want, None).unwrap();
    }
    assert!(out.iter().all(|c| matches!(c.result, Ok(65536))));
    assert!(notify.drain());
    // Flush, then read everything back into zeroed buffers.
    assert!(e
        .submit(Op {
            kind: OpKind::Flush,
            fd: -1,
            offset: 0,
            buf: None,
            user_data: 999
        })
        .is_ok());
    out.clear();
    e.reap(&mut out, 1, None).unwrap();
    assert!(out[0].result.is_ok());
    let mut rbufs: Vec<AlignedBuf> = (0..n).map(|_| AlignedBuf::new(64 * 1024, 4096)).collect();
    for (i, b) in rbufs.iter_mut().enumerate() {
        let op = Op {
            kind: OpKind::Read,
            fd: -1,
            offset: (i * 64 * 1024) as u64,
            buf: Some(slice(b)),
            user_data: i as u64,
        };
        assert!(e.submit(op).is_ok());
    }
    out.clear();
    while out.len() < n {
        let want = n - out.len();
        e.reap(&mut out, want, Some(Duration::from_secs(10)))
            .unwrap();
    }
    assert!(out.iter().all(|c| matches!(c.result, Ok(65536))));
    drop(out);
    for (i, b) in rbufs.iter().enumerate() {
        assert!(b[..] == pattern(64 * 1024, i as u8)[..], "buffer {i}");
    }
    // A read at the end of the export is short, like pread.
    let mut tail = AlignedBuf::new(8192, 4096);
    assert!(e
        .submit(Op {
            kind: OpKind::Read,
            fd: -1,
            offset: (32 << 20) - 4096,
            buf: Some(slice(&mut tail)),
            user_data: 1,
        })
        .is_ok());
    let mut out = Vec::new();
    e.reap(&mut out, 1, None).unwrap();
    assert!(matches!(out[0].result, Ok(4096)));
    assert_eq!(e.in_flight(), 0);
    // nbdkit's memory plugin advertises multi-conn: the engine wrote on a connection of its
    // own, and the storage's connection (the synchronous path) sees every write.
    assert!(s.negotiated().has(xdisk_nbd::wire::flags::CAN_MULTI_CONN));
    for i in [0usize, 17, n - 1] {
        let mut b = vec![0u8; 64 * 1024];
        s.read_at(&mut b, (i * 64 * 1024) as u64).unwrap();
        assert!(b == pattern(64 * 1024, i as u8), "sync read of buffer {i}");
    }
}

/// A server killed while requests are in flight: they fail with EIO, soon; later requests
/// fail with EIO once reconnection is given up; nothing hangs.
#[test]
fn killed_server_fails_requests_with_eio_and_reconnects_when_back() {
    if !have("qemu-nbd") {
        return;
    }
    let dir = tmp();
    let img = dir.path().join("disk.raw");
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "raw"])
        .arg(&img)
        .arg("256M"));
    let mut srv = qemu_nbd(dir.path(), &img, "raw", &["-t"]);
    let cfg = ClientConfig {
        reconnect_attempts: 3,
        reconnect_delay: Duration::from_millis(100),
        io_timeout: Duration::from_secs(5),
        ..ClientConfig::default()
    };
    let s = Arc::new(NbdStorage::open_uri(&srv.uri("disk"), &cfg).unwrap());
    let t = {
        let s = s.clone();
        std::thread::spawn(move || {
            let mut b = vec![0u8; 4 << 20];
            let start = Instant::now();
            loop {
                if let Err(e) = s.read_at(&mut b, 0) {
                    return (e, start.elapsed());
                }
                assert!(start.elapsed() < Duration::from_secs(60), "no error");
            }
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    let killed = Instant::now();
    let _ = srv.child.kill();
    let _ = srv.child.wait();
    let _ = std::fs::remove_file(&srv.sock);
    let (e, _) = t.join().unwrap();
    eprintln!(
        "in-flight read failed {:?} after the kill: {e}",
        killed.elapsed()
    );
    assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
    // In flight: EIO at once, or after the reconnection attempts (0.1+0.2+0.4 s).
    assert!(
        killed.elapsed() < Duration::from_secs(10),
        "{:?}",
        killed.elapsed()
    );
    // Later requests: EIO, bounded.
    let t0 = Instant::now();
    let mut b = [0u8; 512];
    assert_eq!(
        s.read_at(&mut b, 0).unwrap_err().raw_os_error(),
        Some(libc::EIO)
    );
    eprintln!(
        "a later read failed after {:?} (reconnection given up)",
        t0.elapsed()
    );
    assert!(t0.elapsed() < Duration::from_secs(10));

    // A server that comes back within the attempts is reconnected to.
    let srv2 = qemu_nbd(dir.path(), &img, "raw", &["-t"]);
    let s2 = NbdStorage::open_uri(&srv2.uri("disk"), &cfg).unwrap();
    s2.write_at(&[9u8; 4096], 0).unwrap();
    let restart = {
        let img = img.clone();
        let dir = dir.path().to_path_buf();
        move || qemu_nbd(&dir, &img, "raw", &["-t"])
    };
    drop(srv2);
    let _ = std::fs::remove_file(dir.path().join("qemu-nbd.sock"));
    let h = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(150));
        restart()
    });
    let mut b = [0u8; 4096];
    // The first request after the loss may fail (in flight on the dead connection) or
    // reconnect; the next one reconnects.
    let _ = s2.read_at(&mut b, 0);
    let srv3 = h.join().unwrap();
    let mut ok = false;
    for _ in 0..3 {
        if s2.read_at(&mut b, 0).is_ok() {
            ok = true;
            break;
        }
    }
    assert!(ok, "no reconnection");
    assert!(b.iter().all(|&x| x == 9));
    drop(srv3);
}

#[test]
fn tls_uris_and_missing_exports_are_clear_errors() {
    let e = NbdStorage::open_uri(
        "nbds://localhost/x?tls-psk-file=/k",
        &ClientConfig::default(),
    )
    .unwrap_err();
    assert!(e.to_string().contains("x509"), "{e}");
    let e = NbdStorage::open_uri(
        "nbds://localhost/x?tls-certificates=/nonexistent",
        &ClientConfig::default(),
    )
    .unwrap_err();
    assert!(e.to_string().contains("ca-cert.pem"), "{e}");
    if !have("qemu-nbd") {
        return;
    }
    let dir = tmp();
    let img = dir.path().join("d.raw");
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "raw"])
        .arg(&img)
        .arg("1M"));
    let srv = qemu_nbd(dir.path(), &img, "raw", &["-t"]);
    let e = NbdStorage::open_uri(&srv.uri("nope"), &ClientConfig::default()).unwrap_err();
    assert!(matches!(e, Error::NoSuchExport(_)), "{e}");
    let _ = NbdUri::parse(&srv.uri("disk")).unwrap();
}

// ---- hostile servers ----

const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const OPT_REPLY: u64 = 0x0003_e889_0455_65a9;

fn opt_reply(option: u32, t: u32, data: &[u8]) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&OPT_REPLY.to_be_bytes());
    b.extend_from_slice(&option.to_be_bytes());
    b.extend_from_slice(&t.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    b
}

/// A server that shakes hands properly (structured replies, no extended headers, no meta
/// context, a 1 MiB export) and then answers the first request with `reply(cookie)`.
fn hostile(reply: impl Fn(u64) -> Vec<u8> + Send + 'static) -> String {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let Ok((mut c, _)) = l.accept() else { return };
        let mut g = Vec::new();
        g.extend_from_slice(&NBD_MAGIC.to_be_bytes());
        g.extend_from_slice(&IHAVEOPT.to_be_bytes());
        g.extend_from_slice(&3u16.to_be_bytes());
        let _ = c.write_all(&g);
        let mut cf = [0u8; 4];
        if c.read_exact(&mut cf).is_err() {
            return;
        }
        loop {
            let mut h = [0u8; 16];
            if c.read_exact(&mut h).is_err() {
                return;
            }
            let option = u32::from_be_bytes([h[8], h[9], h[10], h[11]]);
            let len = u32::from_be_bytes([h[12], h[13], h[14], h[15]]);
            let mut d = vec![0u8; len as usize];
            if c.read_exact(&mut d).is_err() {
                return;
            }
            let r = match option {
                8 => opt_reply(8, 1, &[]), // STRUCTURED_REPLY: ack
                7 => {
                    let mut info = vec![0, 0];
                    info.extend_from_slice(&(1u64 << 20).to_be_bytes());
                    info.extend_from_slice(&(1u16 | 4).to_be_bytes());
                    let mut r = opt_reply(7, 3, &info);
                    r.extend(opt_reply(7, 1, &[]));
                    let _ = c.write_all(&r);
                    break;
                }
                o => opt_reply(o, (1 << 31) + 1, &[]), // everything else: unsupported
            };
            let _ = c.write_all(&r);
        }
        // Transmission: answer the first request.
        let mut req = [0u8; 28];
        if c.read_exact(&mut req).is_err() {
            return;
        }
        let cookie = u64::from_be_bytes(req[8..16].try_into().unwrap());
        let _ = c.write_all(&reply(cookie));
        std::thread::sleep(Duration::from_secs(2));
    });
    format!("nbd://127.0.0.1:{port}/")
}

fn chunk(flags: u16, kind: u16, cookie: u64, payload: &[u8], len: u32) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&0x668e_33efu32.to_be_bytes());
    b.extend_from_slice(&flags.to_be_bytes());
    b.extend_from_slice(&kind.to_be_bytes());
    b.extend_from_slice(&cookie.to_be_bytes());
    b.extend_from_slice(&len.to_be_bytes());
    b.extend_from_slice(payload);
    b
}

#[test]
fn hostile_servers_get_clean_errors() {
    let cfg = ClientConfig {
        reconnect_attempts: 0,
        io_timeout: Duration::from_secs(5),
        ..ClientConfig::default()
    };
    type Reply = Box<dyn Fn(u64) -> Vec<u8> + Send>;
    let cases: Vec<(&str, Reply)> = vec![
        (
            "bad magic",
            Box::new(|_| vec![0xde, 0xad, 0xbe, 0xef, 0, 0, 0, 0]),
        ),
        (
            "oversized data chunk",
            Box::new(|c| chunk(1, 1, c, &0u64.to_be_bytes(), u32::MAX)),
        ),
        (
            "chunk outside the request",
            Box::new(|c| {
                let mut p = (1u64 << 19).to_be_bytes().to_vec();
                p.extend(vec![7u8; 4096]);
                chunk(1, 1, c, &p, p.len() as u32)
            }),
        ),
        (
            "hole past the end",
            Box::new(|c| {
                let mut p = u64::MAX.to_be_bytes().to_vec();
                p.extend_from_slice(&4096u32.to_be_bytes());
                chunk(1, 2, c, &p, 12)
            }),
        ),
        (
            "reply not covering the read",
            Box::new(|c| {
                let mut p = 0u64.to_be_bytes().to_vec();
                p.extend(vec![7u8; 100]);
                chunk(1, 1, c, &p, p.len() as u32)
            }),
        ),
        ("unknown cookie", Box::new(|c| chunk(1, 0, c + 77, &[], 0))),
        ("unknown chunk type", Box::new(|c| chunk(1, 77, c, &[], 0))),
        (
            "huge metadata chunk",
            Box::new(|c| chunk(1, 5, c, &[], 0x7fff_ffff)),
        ),
        (
            "simple reply to a structured read",
            Box::new(|c| {
                let mut b = 0x6744_6698u32.to_be_bytes().to_vec();
                b.extend_from_slice(&0u32.to_be_bytes());
                b.extend_from_slice(&c.to_be_bytes());
                b
            }),
        ),
        ("hang up", Box::new(|_| Vec::new())),
    ];
    for (what, reply) in cases {
        let uri = hostile(reply);
        let s = NbdStorage::open_uri(&uri, &cfg).unwrap();
        let t = Instant::now();
        let mut b = vec![0u8; 4096];
        let e = s.read_at(&mut b, 0).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EIO), "{what}: {e}");
        assert!(
            t.elapsed() < Duration::from_secs(8),
            "{what}: {:?}",
            t.elapsed()
        );
        // The connection is dead and not reconnected: later requests fail at once.
        assert!(s.read_at(&mut b, 0).is_err(), "{what}");
    }
    // Handshakes that go wrong.
    for (what, bytes) in [
        ("oldstyle", {
            let mut g = NBD_MAGIC.to_be_bytes().to_vec();
            g.extend_from_slice(&0x0000_4202_8186_1253_u64.to_be_bytes());
            g.extend(vec![0u8; 8 + 4 + 124]);
            g
        }),
        ("garbage", b"HTTP/1.1 400 Bad Request\r\n\r\n".to_vec()),
        ("silence", Vec::new()),
    ] {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        std::thread::spawn(move || {
            if let Ok((mut c, _)) = l.accept() {
                let _ = c.write_all(&bytes);
                std::thread::sleep(Duration::from_secs(3));
            }
        });
        let cfg = ClientConfig {
            handshake_timeout: Duration::from_secs(1),
            ..cfg.clone()
        };
        let t = Instant::now();
        let r = NbdStorage::open_uri(&format!("nbd://127.0.0.1:{port}/"), &cfg);
        assert!(r.is_err(), "{what}");
        assert!(t.elapsed() < Duration::from_secs(3), "{what}");
    }
}

/// With multi-conn each engine (a Xen disk's queue) has a connection of its own. Once one of
/// them gives up reconnecting to a server that is gone, the others fail at once too: a disk
/// with N queues must not stall each queue through its own round of attempts.
#[test]
fn giving_up_on_one_connection_fails_every_connection_at_once() {
    if !have("nbdkit") {
        return;
    }
    let dir = tmp();
    let mut srv = nbdkit(dir.path(), &["memory", "8M"]);
    let cfg = ClientConfig {
        reconnect_attempts: 3,
        reconnect_delay: Duration::from_millis(500),
        ..ClientConfig::default()
    };
    let s = Arc::new(NbdStorage::open_uri(&srv.uri(""), &cfg).unwrap());
    assert!(s.negotiated().has(xdisk_nbd::wire::flags::CAN_MULTI_CONN));
    let engine = || {
        s.clone()
            .open_engine(&EngineConfig::default(), Arc::new(EventFd::new().unwrap()))
            .unwrap()
            .unwrap()
    };
    let (mut e1, mut e2) = (engine(), engine());
    let mut buf = AlignedBuf::new(4096, 4096);
    // One read through an engine; its result and how long it took.
    let mut read = |e: &mut Box<dyn xdisk_io::Engine<IoSlice>>| {
        // SAFETY: the buffer outlives the operation (reaped before returning).
        #[allow(unsafe_code)]
        let slice = unsafe { IoSlice::new(&mut buf, 0, 4096) };
        let op = Op {
            kind: OpKind::Read,
            fd: -1,
            offset: 0,
            buf: Some(slice),
            user_data: 1,
        };
        let t0 = Instant::now();
        assert!(e.submit(op).is_ok());
        e.commit().unwrap();
        let mut out = Vec::new();
        e.reap(&mut out, 1, Some(Duration::from_secs(30))).unwrap();
        assert_eq!(out.len(), 1, "no completion within 30 s");
        let r = out.pop().map(|c| c.result.map(|_| ()));
        (r.unwrap_or(Ok(())), t0.elapsed())
    };
    assert!(read(&mut e1).0.is_ok() && read(&mut e2).0.is_ok());
    let _ = srv.child.kill();
    let _ = srv.child.wait();
    let _ = std::fs::remove_file(&srv.sock);
    // The first engine to try reconnects (0.5 + 1 + 2 s), then gives up. (A request sent
    // before its reader saw the connection die fails at once: then the next one tries.)
    let mut tried = false;
    for _ in 0..2 {
        let (r, took) = read(&mut e1);
        assert_eq!(r.unwrap_err().raw_os_error(), Some(libc::EIO));
        if took >= Duration::from_millis(1500) {
            tried = true;
            break;
        }
    }
    assert!(tried, "the first engine never tried to reconnect");
    // The other engine's connection, and the storage's own, fail at once.
    for _ in 0..2 {
        let (r, took) = read(&mut e2);
        assert_eq!(r.unwrap_err().raw_os_error(), Some(libc::EIO));
        assert!(
            took < Duration::from_millis(400),
            "the second queue retried: {took:?}"
        );
    }
    let t0 = Instant::now();
    let mut b = [0u8; 512];
    assert_eq!(
        s.read_at(&mut b, 0).unwrap_err().raw_os_error(),
        Some(libc::EIO)
    );
    assert!(
        t0.elapsed() < Duration::from_millis(400),
        "{:?}",
        t0.elapsed()
    );
}
