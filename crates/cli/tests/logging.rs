//! Log formats: JSON lines with --log-format=json; journald natively when stderr is the journal
//! stream systemd set up (JOURNAL_STREAM), checked against a stand-in journald socket that
//! receives the native protocol's datagrams; text otherwise.

use std::os::unix::fs::MetadataExt;
use std::process::Command;

const XDISK: &str = env!("CARGO_BIN_EXE_xdisk");

fn image(dir: &std::path::Path) -> std::path::PathBuf {
    let p = dir.join("l.qcow2");
    let ok = Command::new(XDISK)
        .args(["img", "create", "-q", "-f", "qcow2"])
        .arg(&p)
        .arg("16M")
        .status()
        .unwrap()
        .success();
    assert!(ok);
    p
}

#[test]
fn json_lines_carry_the_event_fields() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path());
    let out = Command::new(XDISK)
        .env("XDISK_LOG", "debug")
        .args(["--log-format=json", "img", "check"])
        .arg(&img)
        .output()
        .unwrap();
    let err = String::from_utf8(out.stderr).unwrap();
    let line = err.lines().next().expect("a log line");
    let v: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{line}: {e}"));
    assert_eq!(v["level"], "DEBUG");
    assert!(v["message"].is_string(), "{line}");
    assert_eq!(v["path"], img.display().to_string(), "{line}");
    // The same from the environment.
    let out = Command::new(XDISK)
        .env("XDISK_LOG", "debug")
        .env("XDISK_LOG_FORMAT", "json")
        .args(["img", "check"])
        .arg(&img)
        .output()
        .unwrap();
    assert!(String::from_utf8(out.stderr).unwrap().starts_with('{'));
}

#[test]
fn journald_native_under_systemd() {
    let sock_path = std::path::Path::new("/run/systemd/journal/socket");
    if sock_path.exists() {
        eprintln!("a journald runs here; not replacing its socket");
        return;
    }
    if std::fs::create_dir_all("/run/systemd/journal").is_err() {
        eprintln!("cannot create /run/systemd/journal (not root?)");
        return;
    }
    let sock = std::os::unix::net::UnixDatagram::bind(sock_path).unwrap();
    sock.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path());
    // stderr is "the journal stream": a file whose device and inode JOURNAL_STREAM names.
    let stream = dir.path().join("stream");
    let f = std::fs::File::create(&stream).unwrap();
    let m = f.metadata().unwrap();
    let status = Command::new(XDISK)
        .env("XDISK_LOG", "debug")
        .env("JOURNAL_STREAM", format!("{}:{}", m.dev(), m.ino()))
        .args(["img", "check"])
        .arg(&img)
        .stdout(std::process::Stdio::null())
        .stderr(f)
        .status()
        .unwrap();
    // tracing-journald first sends an empty datagram (its probe), then one per event.
    let mut buf = vec![0u8; 65536];
    let mut fields = std::collections::HashMap::new();
    for _ in 0..50 {
        match sock.recv(&mut buf) {
            Ok(0) => continue,
            Ok(n) => {
                fields = parse_native(&buf[..n]);
                break;
            }
            Err(_) => break,
        }
    }
    let _ = std::fs::remove_file(sock_path);
    assert!(status.success());
    let get = |k: &str| fields.get(k).map(String::as_str);
    assert_eq!(get("SYSLOG_IDENTIFIER"), Some("xdisk"), "{fields:?}");
    assert_eq!(get("MESSAGE"), Some("opened image file"), "{fields:?}");
    assert_eq!(get("PATH"), Some(&*img.display().to_string()), "{fields:?}");
    // tracing-journald maps DEBUG to informational (6), TRACE to debug (7).
    assert_eq!(get("PRIORITY"), Some("6"), "{fields:?}");
    assert_eq!(
        std::fs::read(&stream).unwrap(),
        b"",
        "nothing as text on the journal stream"
    );
}

/// journald's native protocol (systemd's "Native Journal Protocol"): `KEY=VALUE\n`, or
/// `KEY\n` + 64-bit little-endian length + value + `\n` for binary-safe values.
fn parse_native(mut b: &[u8]) -> std::collections::HashMap<String, String> {
    let mut out = std::collections::HashMap::new();
    while !b.is_empty() {
        let Some(end) = b.iter().position(|&c| c == b'=' || c == b'\n') else {
            break;
        };
        let key = String::from_utf8_lossy(&b[..end]).into_owned();
        if b[end] == b'=' {
            let rest = &b[end + 1..];
            let nl = rest.iter().position(|&c| c == b'\n').unwrap_or(rest.len());
            out.insert(key, String::from_utf8_lossy(&rest[..nl]).into_owned());
            b = &rest[(nl + 1).min(rest.len())..];
        } else {
            let len = u64::from_le_bytes(b[end + 1..end + 9].try_into().unwrap()) as usize;
            let v = &b[end + 9..end + 9 + len];
            out.insert(key, String::from_utf8_lossy(v).into_owned());
            b = &b[(end + 10 + len).min(b.len())..];
        }
    }
    out
}
