//! NBD over TLS with real peers: `xdisk nbd --tls-creds` against nbdinfo, qemu-img, qemu-io
//! and xdisk's own client; xdisk's client against `qemu-nbd --tls-creds`; refusals (an
//! unknown CA, a missing client certificate, a plain client on a TLS-only server) and
//! hostile clients (garbage instead of a ClientHello, a stalled TLS handshake). The
//! certificates are made by the test with the openssl command.

mod support;
use support::{ok_cmd as ok, xdisk};

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

use xdisk_nbd::wire::{client, opt, rep, InfoRequest, OptionHeader};

/// Makes DIR/server (ca-cert, server-cert, server-key: "localhost", 127.0.0.1),
/// DIR/client (ca-cert, client-cert, client-key), DIR/caonly (ca-cert) and DIR/other (an
/// unrelated CA), all EC P-256.
const MAKE_CERTS: &str = r#"
set -e
D=$1; mkdir -p $D/server $D/client $D/caonly $D/other $D/work; cd $D/work
ca() {
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout $1-key.pem \
    -out $1-cert.pem -days 3650 -subj "/CN=$2" \
    -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign
}
leaf() {
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout $1-key.pem \
    -out $1.csr -subj "/CN=$2"
  printf '%s\n' "basicConstraints=critical,CA:FALSE" \
    "keyUsage=critical,digitalSignature,keyEncipherment" "$3" "$4" > $1.ext
  openssl x509 -req -in $1.csr -CA ca-cert.pem -CAkey ca-key.pem -CAcreateserial \
    -out $1-cert.pem -days 3650 -extfile $1.ext
}
ca ca "xdisk test CA"
ca other "another CA"
leaf server localhost extendedKeyUsage=serverAuth subjectAltName=DNS:localhost,IP:127.0.0.1
leaf client client extendedKeyUsage=clientAuth subjectAltName=DNS:client
cp ca-cert.pem server-cert.pem server-key.pem ../server/
cp ca-cert.pem client-cert.pem client-key.pem ../client/
cp ca-cert.pem ../caonly/
cp other-cert.pem ../other/ca-cert.pem
"#;

fn have(tool: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .output()
        .is_ok_and(|o| o.status.success())
}

fn tools(list: &[&str]) -> bool {
    let missing: Vec<&&str> = list.iter().filter(|t| !have(t)).collect();
    if !missing.is_empty() {
        eprintln!("skipped: {missing:?} not installed");
    }
    missing.is_empty()
}

fn out(cmd: &mut Command) -> Output {
    cmd.output().unwrap()
}

/// Fails, and says so on stderr; returns stdout + stderr.
fn fails(cmd: &mut Command) -> String {
    let o = out(cmd);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(!o.status.success(), "{cmd:?} succeeded: {text}");
    text
}

struct Setup {
    dir: tempfile::TempDir,
    certs: PathBuf,
    image: PathBuf,
}

fn setup() -> Setup {
    let dir = tempfile::Builder::new()
        .prefix("xdisk-nbd-tls-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let certs = dir.path().join("certs");
    ok(Command::new("sh")
        .arg("-c")
        .arg(MAKE_CERTS)
        .arg("sh")
        .arg(&certs)
        .stderr(std::process::Stdio::null()));
    let image = dir.path().join("disk.raw");
    let mut data = vec![0u8; 8 << 20];
    for (i, b) in data.iter_mut().enumerate().take(3 << 20) {
        *b = (i * 7 % 251) as u8;
    }
    std::fs::write(&image, &data).unwrap();
    Setup { dir, certs, image }
}

impl Setup {
    fn certs(&self, which: &str) -> String {
        self.certs.join(which).display().to_string()
    }
}

/// A running server, killed when dropped.
struct Server {
    child: Child,
    sock: PathBuf,
}

impl Server {
    fn spawn(mut cmd: Command, sock: PathBuf) -> Server {
        let child = cmd.spawn().unwrap();
        let mut s = Server { child, sock };
        let start = Instant::now();
        while !s.sock.exists() {
            if let Ok(Some(st)) = s.child.try_wait() {
                panic!("the server exited early: {st}");
            }
            assert!(start.elapsed() < Duration::from_secs(20), "no socket");
            std::thread::sleep(Duration::from_millis(20));
        }
        s
    }

    /// `xdisk nbd -t --tls-creds DIR/server` with `args`.
    fn xdisk(s: &Setup, name: &str, args: &[&str]) -> Server {
        let sock = s.dir.path().join(name);
        let mut cmd = xdisk();
        cmd.args(["nbd", "-f", "raw", "-t", "-e", "4", "--tls-creds"])
            .arg(s.certs.join("server"))
            .args(args)
            .arg("-k")
            .arg(&sock)
            .arg(&s.image);
        Server::spawn(cmd, sock)
    }

    fn uri(&self, certs: &str) -> String {
        format!(
            "nbds+unix:///?socket={}&tls-certificates={certs}",
            self.sock.display()
        )
    }

    fn assert_running(&mut self) {
        assert!(self.child.try_wait().unwrap().is_none(), "the server died");
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn tls_object(dir: &str, endpoint: &str) -> String {
    format!("tls-creds-x509,id=tls0,dir={dir},endpoint={endpoint}")
}

fn qemu_opts(srv: &Server) -> String {
    format!(
        "driver=nbd,server.type=unix,server.path={},tls-creds=tls0,tls-hostname=localhost",
        srv.sock.display()
    )
}

#[test]
fn nbdinfo_qemu_and_xdisk_clients_over_tls() {
    if !tools(&["openssl", "nbdinfo", "qemu-img", "qemu-io"]) {
        return;
    }
    let s = setup();
    let mut srv = Server::xdisk(&s, "tls.sock", &[]);
    let client = s.certs("client");

    let info = ok(Command::new("nbdinfo").arg(srv.uri(&client)));
    assert!(info.contains("with TLS"), "{info}");
    assert!(info.contains("export-size: 8388608"), "{info}");
    // A client without TLS is refused (NBD_REP_ERR_TLS_REQD).
    fails(Command::new("nbdinfo").arg(format!("nbd+unix:///?socket={}", srv.sock.display())));
    let e = fails(
        xdisk()
            .args(["img", "info"])
            .arg(format!("nbd+unix:///?socket={}", srv.sock.display())),
    );
    assert!(e.contains("requires TLS"), "{e}");

    // qemu-img and qemu-io, with QEMU's own x509 credentials object.
    let info = ok(Command::new("qemu-img")
        .args([
            "info",
            "--object",
            &tls_object(&client, "client"),
            "--image-opts",
        ])
        .arg(qemu_opts(&srv)));
    assert!(info.contains("8 MiB"), "{info}");
    let copy = s.dir.path().join("qemu-copy.raw");
    ok(Command::new("qemu-img")
        .args([
            "convert",
            "--object",
            &tls_object(&client, "client"),
            "--image-opts",
        ])
        .arg(qemu_opts(&srv))
        .args(["-O", "raw"])
        .arg(&copy));
    assert_eq!(
        std::fs::read(&copy).unwrap(),
        std::fs::read(&s.image).unwrap()
    );
    let io = ok(Command::new("qemu-io")
        .args(["--object", &tls_object(&client, "client"), "--image-opts"])
        .arg(qemu_opts(&srv))
        .args(["-c", "write -P 0x5a 5M 1M", "-c", "read -P 0x5a 5M 1M"]));
    assert!(!io.contains("fail"), "{io}");

    // xdisk's client: info, and a convert back whose bytes match.
    let info = ok(xdisk()
        .args(["img", "info", "-f", "raw"])
        .arg(srv.uri(&client)));
    assert!(info.contains("8388608"), "{info}");
    let copy = s.dir.path().join("xdisk-copy.raw");
    ok(xdisk()
        .args(["img", "convert", "-f", "raw", "-O", "raw"])
        .arg(srv.uri(&client))
        .arg(&copy));
    let got = std::fs::read(&copy).unwrap();
    assert_eq!(got, std::fs::read(&s.image).unwrap());
    assert!(got[5 << 20..6 << 20].iter().all(|&b| b == 0x5a));
    srv.assert_running();
}

#[test]
fn xdisk_client_against_qemu_nbd_with_tls() {
    if !tools(&["openssl", "qemu-nbd"]) {
        return;
    }
    let s = setup();
    let sock = s.dir.path().join("qemu.sock");
    let mut cmd = Command::new("qemu-nbd");
    cmd.args([
        "--object",
        &tls_object(&s.certs("server"), "server"),
        "--tls-creds",
        "tls0",
        "-f",
        "raw",
        "-t",
        "-k",
    ])
    .arg(&sock)
    .arg(&s.image);
    let srv = Server::spawn(cmd, sock);
    let uri = srv.uri(&s.certs("client"));
    let info = ok(xdisk().args(["img", "info", "-f", "raw"]).arg(&uri));
    assert!(info.contains("8388608"), "{info}");
    let copy = s.dir.path().join("copy.raw");
    ok(xdisk()
        .args(["img", "convert", "-f", "raw", "-O", "raw"])
        .arg(&uri)
        .arg(&copy));
    assert_eq!(
        std::fs::read(&copy).unwrap(),
        std::fs::read(&s.image).unwrap()
    );
    // Without TLS: qemu-nbd requires it, and the error says how to ask for it.
    let e = fails(
        xdisk()
            .args(["img", "info"])
            .arg(format!("nbd+unix:///?socket={}", srv.sock.display())),
    );
    assert!(e.contains("requires TLS"), "{e}");
}

#[test]
fn unknown_cas_and_missing_client_certificates_are_refused() {
    if !tools(&["openssl"]) {
        return;
    }
    let s = setup();
    let mut srv = Server::xdisk(&s, "tls.sock", &[]);
    // The client trusts another CA: refused, with the reason.
    let e = fails(
        xdisk()
            .args(["img", "info"])
            .arg(srv.uri(&s.certs("other"))),
    );
    assert!(
        e.contains("UnknownIssuer") || e.contains("certificate"),
        "{e}"
    );
    srv.assert_running();
    // Unless it does not verify at all.
    ok(xdisk()
        .args(["img", "info"])
        .arg(srv.uri(&s.certs("other")) + "&tls-verify-peer=false"));
    // The name is checked when given: the certificate is for localhost.
    let e = fails(
        xdisk()
            .args(["img", "info"])
            .arg(srv.uri(&s.certs("client")) + "&tls-hostname=elsewhere"),
    );
    assert!(e.contains("certificate"), "{e}");
    ok(xdisk()
        .args(["img", "info"])
        .arg(srv.uri(&s.certs("client")) + "&tls-hostname=localhost"));

    // --tls-verify-peer: a client without a certificate is refused, one with it served.
    let mut vsrv = Server::xdisk(&s, "verify.sock", &["--tls-verify-peer"]);
    let e = fails(
        xdisk()
            .args(["img", "info"])
            .arg(vsrv.uri(&s.certs("caonly"))),
    );
    // (With TLS 1.3 the refusal comes after the client's side of the handshake: an alert,
    // or the connection closing under the next option.)
    assert!(
        ["TLS", "alert", "hung up", "closed"]
            .iter()
            .any(|w| e.contains(w)),
        "{e}"
    );
    vsrv.assert_running();
    ok(xdisk()
        .args(["img", "info"])
        .arg(vsrv.uri(&s.certs("client"))));
    if have("nbdinfo") {
        fails(Command::new("nbdinfo").arg(vsrv.uri(&s.certs("caonly"))));
        ok(Command::new("nbdinfo").arg(vsrv.uri(&s.certs("client"))));
    }
    vsrv.assert_running();
}

/// Greeting read, fixed newstyle flags sent.
fn greeted(sock: &Path) -> UnixStream {
    let mut c = UnixStream::connect(sock).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut g = [0u8; 18];
    c.read_exact(&mut g).unwrap();
    c.write_all(&(client::FIXED_NEWSTYLE | client::NO_ZEROES).to_be_bytes())
        .unwrap();
    c
}

fn option(c: &mut UnixStream, option: u32, data: &[u8]) -> u32 {
    let h = OptionHeader {
        option,
        len: data.len() as u32,
    };
    c.write_all(&h.encode()).unwrap();
    c.write_all(data).unwrap();
    let mut r = [0u8; 20];
    c.read_exact(&mut r).unwrap();
    let len = u32::from_be_bytes(r[16..20].try_into().unwrap()) as usize;
    let mut d = vec![0u8; len];
    c.read_exact(&mut d).unwrap();
    assert_eq!(u32::from_be_bytes(r[8..12].try_into().unwrap()), option);
    u32::from_be_bytes(r[12..16].try_into().unwrap())
}

/// Whether the server closed `c` (EOF or reset) within `within`.
fn closed_within(c: &mut UnixStream, within: Duration) -> bool {
    c.set_read_timeout(Some(within)).unwrap();
    let mut b = [0u8; 4096];
    loop {
        match c.read(&mut b) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(_) => return false,
        }
    }
}

#[test]
fn hostile_clients_over_tls() {
    if !tools(&["openssl"]) {
        return;
    }
    let s = setup();
    let mut srv = Server::xdisk(&s, "tls.sock", &["--handshake-limit", "2"]);

    // Before TLS: every option but STARTTLS and ABORT is TLS_REQD.
    let mut c = greeted(&srv.sock);
    let go = InfoRequest {
        name: String::new(),
        requests: vec![],
    }
    .encode();
    assert_eq!(option(&mut c, opt::GO, &go), rep::ERR_TLS_REQD);
    assert_eq!(option(&mut c, opt::LIST, &[]), rep::ERR_TLS_REQD);
    assert_eq!(
        option(&mut c, opt::STRUCTURED_REPLY, &[]),
        rep::ERR_TLS_REQD
    );
    // EXPORT_NAME before TLS: no reply possible, the connection is dropped.
    c.write_all(
        &OptionHeader {
            option: opt::EXPORT_NAME,
            len: 0,
        }
        .encode(),
    )
    .unwrap();
    assert!(closed_within(&mut c, Duration::from_secs(5)));

    // Garbage instead of a ClientHello after STARTTLS: dropped.
    let mut c = greeted(&srv.sock);
    assert_eq!(option(&mut c, opt::STARTTLS, &[]), rep::ACK);
    c.write_all(&[0x55u8; 512]).unwrap();
    assert!(closed_within(&mut c, Duration::from_secs(5)));
    srv.assert_running();

    // A client stalling mid-handshake (half a ClientHello record) is dropped at the limit.
    let mut c = greeted(&srv.sock);
    assert_eq!(option(&mut c, opt::STARTTLS, &[]), rep::ACK);
    let t = Instant::now();
    c.write_all(&[0x16, 0x03, 0x01, 0x01, 0x00, 0x01]).unwrap();
    assert!(closed_within(&mut c, Duration::from_secs(10)));
    let took = t.elapsed();
    assert!(took >= Duration::from_millis(1500), "{took:?}");
    assert!(took < Duration::from_secs(6), "{took:?}");

    // Everyone else is still served.
    srv.assert_running();
    ok(xdisk()
        .args(["img", "info"])
        .arg(srv.uri(&s.certs("client"))));
}
