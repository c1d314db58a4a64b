//! Hostile clients against the in-process server: garbage, oversized lengths, truncated
//! messages, floods beyond quotas, random messages. The server must stay up and keep serving
//! everybody else.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::thread;
use std::time::{Duration, Instant};

use xdisk_xen::xenstore::wire::{self, Header, Message, MsgType, XENSTORE_PAYLOAD_MAX};
use xdisk_xen::xenstore::{Access, Client, Errno, Perm};
use xdisk_xensim::xenstored::{Config, Server};

const T: Duration = Duration::from_secs(10);

fn server_with(cfg: Config) -> (tempfile::TempDir, Server) {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::bind_with_config(dir.path().join("xs.sock"), cfg).unwrap();
    (dir, server)
}

fn server() -> (tempfile::TempDir, Server) {
    server_with(Config::default())
}

fn raw(dir: &tempfile::TempDir) -> UnixStream {
    let s = UnixStream::connect(dir.path().join("xs.sock")).unwrap();
    s.set_read_timeout(Some(T)).unwrap();
    s
}

fn frame(ty: MsgType, req_id: u32, tx_id: u32, payload: &[u8]) -> Vec<u8> {
    let mut v = Header {
        msg_type: ty,
        req_id,
        tx_id,
        len: payload.len() as u32,
    }
    .encode()
    .to_vec();
    v.extend_from_slice(payload);
    v
}

/// Reads messages until the reply to `req_id` (skipping watch events).
fn reply(s: &mut UnixStream, req_id: u32) -> Message {
    loop {
        let m = wire::read_message(s)
            .expect("read")
            .expect("connection closed");
        if m.header.msg_type != MsgType::WatchEvent {
            assert_eq!(
                m.header.req_id, req_id,
                "replies come in order on one connection"
            );
            return m;
        }
    }
}

fn error_of(m: &Message) -> Option<Errno> {
    (m.header.msg_type == MsgType::Error).then(|| Errno::from_payload(&m.payload))
}

/// Waits until the server closed `s` (EOF or reset on read).
fn assert_closed(s: &mut UnixStream) {
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + T;
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(_) => assert!(Instant::now() < deadline, "connection not closed"),
        }
    }
}

fn wait_connections(s: &Server, n: usize) {
    let deadline = Instant::now() + T;
    while s.connection_count() != n {
        assert!(
            Instant::now() < deadline,
            "{} connections, expected {n}",
            s.connection_count()
        );
        thread::sleep(Duration::from_millis(5));
    }
}

/// A healthy client can still do everything.
fn healthy(dir: &tempfile::TempDir) {
    let c = Client::connect_unix(dir.path().join("xs.sock")).unwrap();
    c.write("/health/check", "ok").unwrap();
    assert_eq!(c.read_string("/health/check").unwrap(), "ok");
}

#[test]
fn oversized_length_closes_only_that_connection() {
    let (dir, s) = server();
    let bystander = Client::connect_unix(dir.path().join("xs.sock")).unwrap();
    bystander.write("/b", "1").unwrap();
    for len in [XENSTORE_PAYLOAD_MAX as u32 + 1, 1 << 20, u32::MAX] {
        let mut c = raw(&dir);
        c.write_all(
            &Header {
                msg_type: MsgType::Write,
                req_id: 1,
                tx_id: 0,
                len,
            }
            .encode(),
        )
        .unwrap();
        assert_closed(&mut c);
    }
    assert_eq!(bystander.read_string("/b").unwrap(), "1");
    healthy(&dir);
    wait_connections(&s, 1);
}

#[test]
fn maximum_payload_is_accepted() {
    let (dir, _s) = server();
    let mut c = raw(&dir);
    let mut payload = b"/max\0".to_vec();
    payload.resize(XENSTORE_PAYLOAD_MAX, b'v');
    c.write_all(&frame(MsgType::Write, 7, 0, &payload)).unwrap();
    let r = reply(&mut c, 7);
    assert_eq!(r.header.msg_type, MsgType::Write);
    assert_eq!(r.payload, b"OK\0");
    c.write_all(&frame(MsgType::Read, 8, 0, b"/max\0")).unwrap();
    assert_eq!(reply(&mut c, 8).payload.len(), XENSTORE_PAYLOAD_MAX - 5);
}

#[test]
fn truncated_messages_and_disconnects() {
    let (dir, s) = server();
    // Half a header.
    let mut c = raw(&dir);
    c.write_all(&[1, 2, 3]).unwrap();
    drop(c);
    // A header announcing a payload that never comes.
    let mut c = raw(&dir);
    c.write_all(
        &Header {
            msg_type: MsgType::Read,
            req_id: 1,
            tx_id: 0,
            len: 100,
        }
        .encode(),
    )
    .unwrap();
    drop(c);
    // Part of the payload.
    let mut c = raw(&dir);
    let f = frame(MsgType::Write, 1, 0, b"/partial\0value");
    c.write_all(&f[..f.len() - 3]).unwrap();
    drop(c);
    // A header, then silence while the connection stays open: others are not blocked.
    let mut silent = raw(&dir);
    silent
        .write_all(
            &Header {
                msg_type: MsgType::Read,
                req_id: 1,
                tx_id: 0,
                len: 10,
            }
            .encode(),
        )
        .unwrap();
    healthy(&dir);
    drop(silent);
    wait_connections(&s, 0);
    assert_eq!(s.read_node("/partial"), None);
    healthy(&dir);
}

#[test]
fn garbage_bytes() {
    let (dir, s) = server();
    let bystander = Client::connect_unix(dir.path().join("xs.sock")).unwrap();
    let mut seed = 0x9e3779b97f4a7c15u64;
    let mut rnd = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for round in 0..40 {
        let mut c = raw(&dir);
        let n = (rnd() % 9000) as usize + 1;
        let bytes: Vec<u8> = (0..n).map(|_| rnd() as u8).collect();
        // The server may close the connection in the middle of our write.
        let _ = c.write_all(&bytes);
        if round % 2 == 0 {
            // Half of them hang up right away, half wait for the server to give up or answer.
            let _ = c.shutdown(std::net::Shutdown::Write);
            let mut sink = Vec::new();
            let _ = c.read_to_end(&mut sink);
        }
    }
    bystander.write("/after-garbage", "still here").unwrap();
    assert_eq!(
        bystander.read_string("/after-garbage").unwrap(),
        "still here"
    );
    healthy(&dir);
    drop(bystander);
    wait_connections(&s, 0);
}

#[test]
fn malformed_requests_get_errors_and_the_connection_stays() {
    let (dir, _s) = server();
    let mut c = raw(&dir);
    let cases: Vec<(MsgType, u32, &[u8], Errno)> = vec![
        (MsgType::Read, 0, b"/no-nul", Errno::EINVAL),
        (MsgType::Read, 0, b"/a\0/b\0", Errno::EINVAL),
        (MsgType::Read, 0, b"", Errno::EINVAL),
        (MsgType::Read, 0, b"\xff\xfe\0", Errno::EINVAL),
        (MsgType::Write, 0, b"no-nul-at-all", Errno::EINVAL),
        (MsgType::Write, 0, b"/bad..path\0v", Errno::EINVAL),
        (MsgType::Mkdir, 0, b"//\0", Errno::EINVAL),
        (MsgType::Unknown(999), 0, b"", Errno::ENOSYS),
        (MsgType::Unknown(20), 0, b"", Errno::ENOSYS), // XS_RESTRICT, removed
        (MsgType::Error, 0, b"EINVAL\0", Errno::ENOSYS),
        (MsgType::WatchEvent, 0, b"/a\0t\0", Errno::ENOSYS),
        (MsgType::Watch, 0, b"/only-path\0", Errno::EINVAL),
        (MsgType::Watch, 0, b"@\0tok\0", Errno::EINVAL),
        (MsgType::SetPerms, 0, b"/\0x5\0", Errno::EINVAL),
        (MsgType::SetPerms, 0, b"/\0", Errno::EINVAL),
        (MsgType::SetPerms, 0, b"/\0r99999\0", Errno::EINVAL),
        (MsgType::GetDomainPath, 0, b"abc\0", Errno::EINVAL),
        (MsgType::GetDomainPath, 0, b"70000\0", Errno::EINVAL),
        (MsgType::DirectoryPart, 0, b"/\0", Errno::EINVAL),
        (MsgType::DirectoryPart, 0, b"/\0-1\0", Errno::EINVAL),
        (MsgType::TransactionEnd, 0, b"T\0", Errno::ENOENT),
        (MsgType::TransactionEnd, 12345, b"T\0", Errno::ENOENT),
        (MsgType::TransactionEnd, 0, b"maybe\0", Errno::EINVAL),
        (MsgType::Read, 4242, b"/\0", Errno::ENOENT), // unknown transaction
        (MsgType::Introduce, 0, b"1\0", Errno::EINVAL),
        (MsgType::Introduce, 0, b"70000\x001\x001\x00", Errno::EINVAL),
        (MsgType::Control, 0, b"", Errno::EINVAL),
        (MsgType::Rm, 0, b"/\0", Errno::EINVAL),
    ];
    for (i, (ty, tx, payload, want)) in cases.into_iter().enumerate() {
        let id = 100 + i as u32;
        c.write_all(&frame(ty, id, tx, payload)).unwrap();
        let r = reply(&mut c, id);
        assert_eq!(error_of(&r), Some(want), "case {i}: {ty:?} {payload:?}");
        assert_eq!(r.header.tx_id, tx, "tx_id is echoed");
    }
    // Still usable.
    c.write_all(&frame(MsgType::Write, 1, 0, b"/fine\0yes"))
        .unwrap();
    assert_eq!(reply(&mut c, 1).payload, b"OK\0");
    c.write_all(&frame(MsgType::Read, 2, 0, b"/fine\0"))
        .unwrap();
    assert_eq!(reply(&mut c, 2).payload, b"yes");
}

#[test]
fn watch_flood_beyond_quota() {
    let (dir, s) = server_with(Config {
        max_watches_per_conn: 64,
        ..Config::default()
    });
    let bystander = Client::connect_unix(dir.path().join("xs.sock")).unwrap();
    let bw = bystander.watch("/flood", "bystander").unwrap();
    bw.recv_timeout(T).unwrap();

    let mut keep = Vec::new();
    for domid in [0u16, 5] {
        let mut c = s.connect_as(domid).unwrap();
        c.set_read_timeout(Some(T)).unwrap();
        let mut ok = 0;
        let mut e2big = 0;
        for i in 0..500u32 {
            let payload = format!("/flood/w{i}\0token{i}\0");
            c.write_all(&frame(MsgType::Watch, i + 1, 0, payload.as_bytes()))
                .unwrap();
            match error_of(&reply(&mut c, i + 1)) {
                None => ok += 1,
                Some(Errno::E2BIG) => e2big += 1,
                Some(e) => panic!("unexpected {e}"),
            }
        }
        assert_eq!(ok, 64, "dom{domid}");
        assert_eq!(e2big, 500 - 64);
        // Same path and token twice is EEXIST.
        c.write_all(&frame(MsgType::Watch, 9999, 0, b"/flood/w0\0token0\0"))
            .unwrap();
        assert!(error_of(&reply(&mut c, 9999)).is_some());
        keep.push(c);
    }
    assert_eq!(s.watch_count(), 1 + 64 + 64);
    bystander.write("/flood/x", "1").unwrap();
    assert_eq!(bw.recv_timeout(T).unwrap().path, "/flood/x");
    healthy(&dir);
}

#[test]
fn client_that_never_reads_is_disconnected() {
    let (dir, s) = server_with(Config {
        max_outstanding: 16,
        max_outstanding_dom0: 64,
        ..Config::default()
    });
    let writer = Client::connect_unix(dir.path().join("xs.sock")).unwrap();
    writer.write("/big", vec![b'x'; 4000]).unwrap();

    // A dom0 socket client that watches everything and never reads.
    let mut lazy = raw(&dir);
    lazy.write_all(&frame(MsgType::Watch, 1, 0, b"/\0all\0"))
        .unwrap();
    let deadline = Instant::now() + T;
    while s.watch_count() == 0 {
        assert!(Instant::now() < deadline);
        thread::sleep(Duration::from_millis(5));
    }
    // Each event is small; the socket buffers absorb many before the queue fills.
    let mut i = 0;
    while s.connection_count() > 1 {
        writer
            .write(&format!("/spam/{}", i % 1000), vec![b'y'; 3000])
            .unwrap();
        i += 1;
        assert!(i < 200_000, "lazy client never disconnected");
    }
    assert_closed(&mut lazy);

    // A domain that floods requests without reading replies.
    writer
        .set_perms("/big", &[Perm::new(Access::Read, 0)])
        .unwrap();
    let mut flood = s.connect_as(5).unwrap();
    flood.set_write_timeout(Some(T)).unwrap();
    let req = frame(MsgType::Read, 1, 0, b"/big\0");
    let mut sent = 0;
    while flood.write_all(&req).is_ok() {
        sent += 1;
        assert!(sent < 1_000_000, "flooding domain never disconnected");
    }
    assert_closed(&mut flood);
    assert_eq!(writer.read("/big").unwrap().len(), 4000);
    healthy(&dir);
}

#[test]
fn domain_transaction_and_node_floods_hit_quotas() {
    let (dir, s) = server_with(Config {
        max_transaction_bytes: 64 * 1024,
        max_nodes_per_domain: 50,
        ..Config::default()
    });
    let dom0 = s.client_as(0).unwrap();
    dom0.mkdir("/local/domain/5").unwrap();
    dom0.set_perms("/local/domain/5", &[Perm::new(Access::None, 5)])
        .unwrap();
    let d5 = s.client_as(5).unwrap();

    // Reading ever new paths inside a transaction is bounded.
    let tx = d5.transaction_start().unwrap();
    let mut i = 0;
    let err = loop {
        match tx.read(&format!("missing-{i}-{}", "p".repeat(200))) {
            Err(e) if e.errno() == Some(Errno::ENOENT) => i += 1,
            Err(e) => break e,
            Ok(_) => panic!("exists?"),
        }
        assert!(i < 100_000);
    };
    assert_eq!(err.errno(), Some(Errno::ENOSPC));
    tx.abort().unwrap();

    // So is rewriting one node over and over.
    let tx = d5.transaction_start().unwrap();
    let mut i = 0;
    let err = loop {
        match tx.write("v", vec![b'z'; 2000]) {
            Ok(()) => i += 1,
            Err(e) => break e,
        }
        assert!(i < 100_000);
    };
    assert_eq!(err.errno(), Some(Errno::ENOSPC));
    drop(tx);

    // Node quota also holds across a transaction's commit.
    let r = d5.transaction(|tx| {
        for k in 0..100 {
            tx.write(&format!("n{k}"), "")?;
        }
        Ok(())
    });
    assert_eq!(r.unwrap_err().errno(), Some(Errno::ENOSPC));
    assert!(s.nodes_owned_by(5) <= 50);
    healthy(&dir);
}

#[test]
fn connection_limit() {
    let (dir, s) = server_with(Config {
        max_connections: 4,
        ..Config::default()
    });
    let conns: Vec<Client> = (0..4).map(|d| s.client_as(d).unwrap()).collect();
    assert!(s.connect_as(9).is_err());
    // A socket connection beyond the limit is dropped at once.
    let mut extra = raw(&dir);
    let _ = extra.write_all(&frame(MsgType::Read, 1, 0, b"/\0"));
    assert_closed(&mut extra);
    drop(conns);
    wait_connections(&s, 0);
    healthy(&dir);
}

#[test]
fn random_framed_messages_from_a_domain() {
    let (dir, s) = server();
    let dom0 = s.client_as(0).unwrap();
    dom0.mkdir("/local/domain/7").unwrap();
    dom0.set_perms("/local/domain/7", &[Perm::new(Access::None, 7)])
        .unwrap();
    let mut c = s.connect_as(7).unwrap();
    c.set_read_timeout(Some(T)).unwrap();
    let mut seed = 0x2545f4914f6cdd1du64;
    let mut rnd = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let alphabet: &[u8] = b"/ab@_-0\0\0\0Tr5n7";
    for id in 1..=3000u32 {
        let ty = MsgType::from_u32((rnd() % 26) as u32);
        let len = match rnd() % 4 {
            0 => 0,
            1 => (rnd() % 16) as usize,
            2 => (rnd() % 200) as usize,
            _ => (rnd() % (XENSTORE_PAYLOAD_MAX as u64 + 1)) as usize,
        };
        let payload: Vec<u8> = if rnd() % 2 == 0 {
            (0..len)
                .map(|_| alphabet[(rnd() % alphabet.len() as u64) as usize])
                .collect()
        } else {
            (0..len).map(|_| rnd() as u8).collect()
        };
        let tx_id = if rnd() % 8 == 0 {
            (rnd() % 4) as u32
        } else {
            0
        };
        c.write_all(&frame(ty, id, tx_id, &payload)).unwrap();
        // Every message gets exactly one reply; the connection survives.
        let r = reply(&mut c, id);
        assert!(r.header.msg_type == ty || r.header.msg_type == MsgType::Error);
        assert!(r.payload.len() <= XENSTORE_PAYLOAD_MAX);
    }
    c.write_all(&frame(MsgType::GetDomainPath, 1, 0, b"7\0"))
        .unwrap();
    assert_eq!(reply(&mut c, 1).payload, b"/local/domain/7\0");
    healthy(&dir);
}

#[test]
fn long_tokens_and_deep_paths() {
    let (dir, s) = server();
    let c = s.client_as(0).unwrap();
    // A token so long that events on deep paths cannot be sent: they are dropped, not sent
    // oversized.
    let token = "t".repeat(3000);
    let w = c.watch("/d", &token).unwrap();
    assert_eq!(w.recv_timeout(T).unwrap().path, "/d");
    let deep = format!("/d{}", "/x".repeat(1000));
    c.write(&deep, "").unwrap();
    c.write("/d/y", "").unwrap();
    assert_eq!(w.recv_timeout(T).unwrap().path, "/d/y");
    c.rm("/d").unwrap();
    assert_eq!(w.recv_timeout(T).unwrap().path, "/d");
    healthy(&dir);
}
