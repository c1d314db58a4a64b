//! TLS for xdisk's NBD server and client (proto.md, "TLS support"; `NBD_OPT_STARTTLS`).
//!
//! - Credentials are x509 only, laid out as QEMU's `tls-creds-x509` object reads them from
//!   one directory: `ca-cert.pem`, `server-cert.pem` and `server-key.pem` for a server,
//!   `ca-cert.pem` and optionally `client-cert.pem` and `client-key.pem` for a client
//!   ([`server_config`], [`client_config`]). No PSK: rustls does not offer TLS-PSK.
//! - TLS 1.3 and 1.2, with rustls and its `ring` provider.
//! - A rustls session is one state machine, while the NBD server and client each read on one
//!   thread and write on another. [`pump`] gives the session a thread of its own that moves
//!   bytes between the socket (encrypted) and one end of a unix socket pair (plain): the
//!   threads keep blocking reads and writes on their end of the pair, exactly as on a plain
//!   socket. Connections without TLS do not go through it at all. Memory stays bounded: the
//!   pump reads a side only when it has room for what it reads ([`PUMP_BUF`] each way).

#![forbid(unsafe_code)]
#![warn(missing_docs)]

use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};

pub use rustls::{
    ClientConfig as TlsClientConfig, ClientConnection, Connection, ServerConfig as TlsServerConfig,
    ServerConnection, Stream as TlsStream,
};

/// The CA certificate (both sides).
pub const CA_CERT: &str = "ca-cert.pem";
/// The server's certificate (chain).
pub const SERVER_CERT: &str = "server-cert.pem";
/// The server's private key.
pub const SERVER_KEY: &str = "server-key.pem";
/// The client's certificate (chain), for client authentication.
pub const CLIENT_CERT: &str = "client-cert.pem";
/// The client's private key.
pub const CLIENT_KEY: &str = "client-key.pem";
/// The system's trust store, used by a client given no `tls-certificates` directory.
pub const SYSTEM_CA: &str = "/etc/ssl/certs/ca-certificates.crt";

/// Errors of setting TLS up.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A credentials file could not be read.
    #[error("{path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A credentials file holds no usable PEM.
    #[error("{path}: {why}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Config(String),
}

/// rustls's `ring` provider (aws-lc-rs, with post-quantum key exchange, needs cmake to
/// build).
#[allow(deprecated)]
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read(path: &Path) -> Result<Vec<u8>, Error> {
    std::fs::read(path).map_err(|source| Error::Read {
        path: path.to_owned(),
        source,
    })
}

/// Every certificate of a PEM file (at least one).
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, Error> {
    let pem = |why: String| Error::Pem {
        path: path.to_owned(),
        why,
    };
    let certs = CertificateDer::pem_slice_iter(&read(path)?)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem(e.to_string()))?;
    if certs.is_empty() {
        return Err(pem("no certificate in the file".into()));
    }
    Ok(certs)
}

/// The private key of a PEM file (PKCS#8, PKCS#1 or SEC1).
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, Error> {
    PrivateKeyDer::from_pem_slice(&read(path)?).map_err(|e| Error::Pem {
        path: path.to_owned(),
        why: format!("no private key: {e}"),
    })
}

/// A trust store of the certificates of a PEM file.
pub fn load_roots(path: &Path) -> Result<RootCertStore, Error> {
    let mut roots = RootCertStore::empty();
    for c in load_certs(path)? {
        roots.add(c).map_err(|e| Error::Pem {
            path: path.to_owned(),
            why: format!("not a CA certificate: {e}"),
        })?;
    }
    Ok(roots)
}

fn config_err(e: impl std::fmt::Display) -> Error {
    Error::Config(e.to_string())
}

/// A server's TLS configuration from a credentials directory (qemu-nbd's
/// `tls-creds-x509,endpoint=server,dir=DIR[,verify-peer=on]`): `server-cert.pem`,
/// `server-key.pem`, and with `verify_peer`, `ca-cert.pem` to verify client certificates
/// against (clients without one are refused).
pub fn server_config(dir: &Path, verify_peer: bool) -> Result<Arc<rustls::ServerConfig>, Error> {
    let certs = load_certs(&dir.join(SERVER_CERT))?;
    let key = load_key(&dir.join(SERVER_KEY))?;
    let b = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(config_err)?;
    let b = if verify_peer {
        let roots = load_roots(&dir.join(CA_CERT))?;
        let v = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
            .build()
            .map_err(config_err)?;
        b.with_client_cert_verifier(v)
    } else {
        b.with_no_client_auth()
    };
    let cfg = b.with_single_cert(certs, key).map_err(config_err)?;
    Ok(Arc::new(cfg))
}

/// How a client sets TLS up (libnbd's URI parameters).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientOptions {
    /// `tls-certificates=DIR`: `ca-cert.pem` to verify the server against, and
    /// `client-cert.pem`/`client-key.pem` if present. `None`: the system's CAs, no client
    /// certificate.
    pub certificates: Option<PathBuf>,
    /// `tls-verify-peer=false` turns verification of the server off.
    pub verify_peer: bool,
    /// The name the server's certificate must hold (the URI's host, or `tls-hostname=`).
    /// `None` (a unix socket without `tls-hostname`): the chain is verified, not the name.
    pub hostname: Option<String>,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            certificates: None,
            verify_peer: true,
            hostname: None,
        }
    }
}

/// A client's TLS configuration.
pub fn client_config(o: &ClientOptions) -> Result<Arc<rustls::ClientConfig>, Error> {
    let prov = provider();
    let b = rustls::ClientConfig::builder_with_provider(prov.clone())
        .with_safe_default_protocol_versions()
        .map_err(config_err)?;
    let verifier: Arc<dyn ServerCertVerifier> = if o.verify_peer {
        let ca = match &o.certificates {
            Some(d) => d.join(CA_CERT),
            None => PathBuf::from(SYSTEM_CA),
        };
        let roots = Arc::new(load_roots(&ca)?);
        if o.hostname.is_some() {
            WebPkiServerVerifier::builder_with_provider(roots, prov.clone())
                .build()
                .map_err(config_err)?
        } else {
            Arc::new(ChainOnly {
                roots,
                prov: prov.clone(),
            })
        }
    } else {
        Arc::new(NoVerify(prov.clone()))
    };
    let b = b.dangerous().with_custom_certificate_verifier(verifier);
    let cert = o
        .certificates
        .as_ref()
        .map(|d| (d.join(CLIENT_CERT), d.join(CLIENT_KEY)))
        .filter(|(c, k)| c.exists() && k.exists());
    let cfg = match cert {
        Some((c, k)) => b
            .with_client_auth_cert(load_certs(&c)?, load_key(&k)?)
            .map_err(config_err)?,
        None => b.with_no_client_auth(),
    };
    Ok(Arc::new(cfg))
}

/// A client session for `o.hostname` (no name: no SNI, the name is not checked).
pub fn client_connection(
    cfg: Arc<rustls::ClientConfig>,
    o: &ClientOptions,
) -> Result<ClientConnection, Error> {
    let name = match &o.hostname {
        Some(h) => ServerName::try_from(h.clone())
            .map_err(|e| Error::Config(format!("bad TLS host name {h:?}: {e}")))?,
        // Not looked at by the verifiers used without a name; an address sends no SNI.
        None => ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into()),
    };
    ClientConnection::new(cfg, name).map_err(config_err)
}

/// Verifies the server's chain against the CA, not its name (unix sockets).
#[derive(Debug)]
struct ChainOnly {
    roots: Arc<RootCertStore>,
    prov: Arc<CryptoProvider>,
}

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            self.prov.signature_verification_algorithms.all,
        )?;
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.prov.signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.prov.signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.prov
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// `tls-verify-peer=false`: any certificate is accepted (the handshake's signatures are
/// still checked, so the session is encrypted, but not authenticated).
#[derive(Debug)]
struct NoVerify(Arc<CryptoProvider>);

impl ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Runs the TLS handshake of `conn` over the blocking stream `io` (whose timeouts bound
/// it). A peer that is not speaking TLS, or fails verification, is an `InvalidData` error.
pub fn handshake<C, D, S>(conn: &mut C, io: &mut S) -> io::Result<()>
where
    C: std::ops::DerefMut<Target = rustls::ConnectionCommon<D>>,
    D: rustls::SideData,
    S: Read + Write,
{
    while conn.is_handshaking() {
        conn.complete_io(io)?;
    }
    // Flush what the handshake left to send (a TLS 1.3 server's tickets).
    while conn.wants_write() {
        conn.write_tls(io)?;
    }
    Ok(())
}

/// Bytes the pump holds at most in each direction, beside rustls's own records.
pub const PUMP_BUF: usize = 256 << 10;

/// Hands the established session `conn` over `sock` to a thread of its own and returns the
/// plain end: what is written to it is sent encrypted, what the peer sends is read from it.
/// Closing (or shutting down) the plain end sends `close_notify` and closes `sock`; the
/// peer's closing, a TLS error or a socket error closes the plain end (its reads see EOF).
pub fn pump<S>(conn: impl Into<Connection>, sock: S) -> io::Result<UnixStream>
where
    S: Read + Write + AsRawFd + Send + 'static,
{
    let (plain, local) = UnixStream::pair()?;
    let conn = conn.into();
    std::thread::Builder::new()
        .name("xdisk-nbd-tls".into())
        .spawn(move || {
            if let Err(e) = run_pump(conn, sock, local) {
                tracing::debug!(error = %e, "TLS connection ended");
            }
        })?;
    Ok(plain)
}

/// A buffer being emptied.
struct Pending {
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl Pending {
    fn is_empty(&self) -> bool {
        self.start == self.end
    }
}

/// How long a closing pump waits for the peer to take its last records.
const CLOSE_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

fn run_pump<S: Read + Write + AsRawFd>(
    mut conn: Connection,
    mut sock: S,
    mut local: UnixStream,
) -> io::Result<()> {
    xdisk_io::sys::set_nonblocking(sock.as_raw_fd())?;
    local.set_nonblocking(true)?;
    // Bounded by the loop instead: plaintext is taken only once everything is sent.
    conn.set_buffer_limit(None);
    let mut down = Pending {
        buf: vec![0u8; PUMP_BUF],
        start: 0,
        end: 0,
    };
    let mut up = vec![0u8; PUMP_BUF];
    // The peer is done sending (close_notify, EOF, or an error after which it cannot go on).
    let mut peer_done = false;
    // The local side is done sending: close_notify queued.
    let mut local_done = false;
    let mut closing_since: Option<std::time::Instant> = None;
    let would_block = |e: &io::Error| e.kind() == io::ErrorKind::WouldBlock;
    loop {
        // Plaintext from the session to the local end.
        let mut plain_drained = false;
        while down.is_empty() {
            down.start = 0;
            down.end = 0;
            match conn.reader().read(&mut down.buf) {
                Ok(0) => {
                    peer_done = true;
                    break;
                }
                Ok(n) => down.end = n,
                Err(e) if would_block(&e) => {
                    plain_drained = true;
                    break;
                }
                Err(_) => {
                    // Closed without close_notify.
                    peer_done = true;
                    break;
                }
            }
        }
        while !down.is_empty() {
            match local.write(&down.buf[down.start..down.end]) {
                Ok(n) => down.start += n,
                Err(e) if would_block(&e) => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // The local side is gone: tell the peer.
                Err(_) => {
                    local_done = true;
                    down.start = down.end;
                    conn.send_close_notify();
                }
            }
        }
        // Plaintext from the local end into the session, when what it holds is sent.
        if !local_done && !conn.wants_write() {
            match local.read(&mut up) {
                Ok(0) => {
                    local_done = true;
                    conn.send_close_notify();
                }
                Ok(n) => conn.writer().write_all(&up[..n])?,
                Err(e) if would_block(&e) || e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        // Records from the peer, when everything decrypted so far is delivered: first those
        // read already (rustls decrypts no more than its plaintext limit at a time), then
        // the socket's.
        if !peer_done && plain_drained && down.is_empty() {
            match conn.process_new_packets() {
                Ok(st) if st.plaintext_bytes_to_read() > 0 => continue,
                Ok(st) if st.peer_has_closed() => peer_done = true,
                Ok(_) => {}
                Err(e) => {
                    // Tell the peer why (best effort), and stop.
                    let _ = conn.write_tls(&mut sock);
                    return Err(io::Error::new(io::ErrorKind::InvalidData, e));
                }
            }
        }
        if !peer_done && plain_drained && down.is_empty() {
            match conn.read_tls(&mut sock) {
                Ok(0) => peer_done = true,
                Ok(_) => continue,
                Err(e) if would_block(&e) || e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        // Records to the peer.
        while conn.wants_write() {
            match conn.write_tls(&mut sock) {
                Ok(_) => {}
                Err(e) if would_block(&e) => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if local_done && !conn.wants_write() {
            return Ok(());
        }
        if peer_done && down.is_empty() {
            // Dropping the local end shows EOF to the reader and EPIPE to the writer.
            return Ok(());
        }
        if !peer_done && !plain_drained && down.is_empty() {
            // Delivered all it held: see whether the session has more before sleeping.
            continue;
        }
        let want_sock_read = !peer_done && down.is_empty();
        let want_sock_write = conn.wants_write();
        let want_local_read = !local_done && !conn.wants_write();
        let want_local_write = !down.is_empty();
        if !(want_sock_read || want_sock_write || want_local_read || want_local_write) {
            continue;
        }
        // Once the local side is done, a peer that does not take the last records is not
        // waited for long.
        if local_done {
            let since = *closing_since.get_or_insert_with(std::time::Instant::now);
            if since.elapsed() >= CLOSE_WAIT {
                return Ok(());
            }
        }
        let timeout = if local_done { 100 } else { -1 };
        xdisk_io::sys::poll_rw(
            &[
                (sock.as_raw_fd(), want_sock_read, want_sock_write),
                (local.as_raw_fd(), want_local_read, want_local_write),
            ],
            timeout,
        )?;
    }
}
