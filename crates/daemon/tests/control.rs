//! The control socket: private from the start, never replaces what is not a socket, and a
//! client that trickles bytes (or sends nothing) holds up nobody else.

mod common;

use std::io::Write;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use xdisk_daemon::control::{self, ControlServer};
use xdisk_daemon::SupervisorConfig;

#[test]
fn trickling_client_does_not_block_status() {
    let host = host();
    let sup = Arc::new(supervisor(&host, SupervisorConfig::default()));
    let dir = tmpdir();
    let sock = dir.path().join("control.sock");
    let s2 = sup.clone();
    let _server = ControlServer::start(&sock, Arc::new(move || s2.status())).unwrap();
    // Two clients: one trickles a byte every 200 ms, one connected and silent.
    let silent = UnixStream::connect(&sock).unwrap();
    let mut slow = UnixStream::connect(&sock).unwrap();
    let trickler = std::thread::spawn(move || {
        for b in b"{\"cmd\":   \"ping\"}".iter().cycle().take(40) {
            if slow.write_all(&[*b]).is_err() {
                break;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    });
    std::thread::sleep(Duration::from_millis(100));
    for _ in 0..3 {
        let t = Instant::now();
        let st = control::status(&sock).expect("status while a client trickles");
        assert!(st.serves("qdisk", 1));
        let dt = t.elapsed();
        assert!(dt < Duration::from_secs(2), "status took {dt:?}");
    }
    drop(silent);
    trickler.join().unwrap();
}

#[test]
fn control_socket_is_private_and_never_replaces_a_file() {
    let dir = tmpdir();
    let status: control::StatusFn = Arc::new(|| panic!("not asked"));
    // A regular file at the path is refused and left alone.
    let path = dir.path().join("control.sock");
    std::fs::write(&path, b"precious").unwrap();
    let e = ControlServer::start(&path, status.clone()).unwrap_err();
    assert!(e.to_string().contains("not a socket"), "{e}");
    assert_eq!(std::fs::read(&path).unwrap(), b"precious");
    std::fs::remove_file(&path).unwrap();
    // The socket is 0600 in a directory of 0700 created for it; nothing else is left behind.
    let sub = dir.path().join("run").join("x");
    let sock = sub.join("control.sock");
    let server = ControlServer::start(&sock, status.clone()).unwrap();
    let m = std::fs::symlink_metadata(&sock).unwrap();
    assert!(m.file_type().is_socket());
    assert_eq!(m.permissions().mode() & 0o777, 0o600);
    let dm = std::fs::metadata(&sub).unwrap();
    assert_eq!(dm.permissions().mode() & 0o777, 0o700);
    let names: Vec<_> = std::fs::read_dir(&sub)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec![std::ffi::OsString::from("control.sock")]);
    drop(server);
    // A stale socket is replaced.
    let l = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    drop(l);
    let _server = ControlServer::start(&sock, status).unwrap();
}
