//! NBD URIs as QEMU and libnbd spell them (NetworkBlockDevice/nbd `doc/uri.md`):
//! `nbd://HOST[:PORT]/EXPORT`, `nbd+unix:///EXPORT?socket=PATH`, and QEMU's legacy
//! `nbd:HOST:PORT[:exportname=NAME]` and `nbd:unix:PATH[:exportname=NAME]`; with TLS,
//! `nbds://HOST[:PORT]/EXPORT` and `nbds+unix:///EXPORT?socket=PATH`, with libnbd's query
//! parameters `tls-certificates=DIR`, `tls-verify-peer=false` and `tls-hostname=NAME`.

use std::fmt;
use std::path::PathBuf;

use crate::Error;

/// The IANA port of NBD.
pub const DEFAULT_PORT: u16 = 10809;

/// How to reach the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transport {
    /// TCP to a host name or address and port.
    Tcp {
        /// Host name or address (IPv6 without brackets).
        host: String,
        /// Port.
        port: u16,
    },
    /// A unix domain socket.
    Unix {
        /// The socket's path.
        path: PathBuf,
    },
}

/// A parsed NBD URI: where the server is and which export to ask for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdUri {
    /// Where the server is.
    pub transport: Transport,
    /// The export name ("" is the server's default export).
    pub export: String,
    /// TLS (`nbds://`, `nbds+unix://`), `None` without.
    pub tls: Option<UriTls>,
}

/// The TLS settings of an `nbds` URI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UriTls {
    /// `tls-certificates=DIR`: `ca-cert.pem` (and `client-cert.pem`, `client-key.pem` for
    /// client authentication); `None`: the system's CAs.
    pub certificates: Option<PathBuf>,
    /// `tls-verify-peer=false` turns verification of the server off.
    pub verify_peer: bool,
    /// `tls-hostname=NAME`: the name the server's certificate must hold instead of the
    /// URI's host (over a unix socket: without it, the name is not checked).
    pub hostname: Option<String>,
}

impl Default for UriTls {
    fn default() -> Self {
        UriTls {
            certificates: None,
            verify_peer: true,
            hostname: None,
        }
    }
}

impl NbdUri {
    /// The TLS client options of this URI, if it asks for TLS: the name checked is
    /// `tls-hostname`, else the TCP host.
    pub fn tls_options(&self) -> Option<xdisk_nbd_tls::ClientOptions> {
        let t = self.tls.as_ref()?;
        let host = match &self.transport {
            Transport::Tcp { host, .. } => Some(host.clone()),
            Transport::Unix { .. } => None,
        };
        Some(xdisk_nbd_tls::ClientOptions {
            certificates: t.certificates.clone(),
            verify_peer: t.verify_peer,
            hostname: t.hostname.clone().or(host),
        })
    }
}

/// Whether a disk name looks like an NBD URI (any spelling, TLS or not).
pub fn is_nbd_uri(name: &str) -> bool {
    ["nbd:", "nbds:", "nbd+", "nbds+"]
        .iter()
        .any(|p| name.starts_with(p))
}

fn bad(uri: &str, why: impl fmt::Display) -> Error {
    Error::Uri(format!("{uri}: {why}"))
}

/// Decodes `%XX` escapes; refuses malformed ones and NUL.
pub fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = b.get(i + 1..i + 3)?;
            let hex = std::str::from_utf8(hex).ok()?;
            let v = u8::from_str_radix(hex, 16).ok()?;
            out.push(v);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    if out.contains(&0) {
        return None;
    }
    String::from_utf8(out).ok()
}

impl NbdUri {
    /// Parses an NBD URI (TLS parameters only count with `nbds`; `tls-psk-file` is refused:
    /// x509 is the only TLS mode).
    pub fn parse(uri: &str) -> Result<NbdUri, Error> {
        let (scheme, rest) = match uri.split_once("://") {
            Some((s, r)) if !s.contains(':') => (s, r),
            _ => return Self::parse_legacy(uri),
        };
        let (unix, tls) = match scheme {
            "nbd" | "nbd+tcp" => (false, false),
            "nbd+unix" => (true, false),
            "nbds" | "nbds+tcp" => (false, true),
            "nbds+unix" => (true, true),
            other => return Err(bad(uri, format!("unknown scheme '{other}'"))),
        };
        let rest = rest.split_once('#').map_or(rest, |(r, _)| r);
        let (before_query, query) = match rest.split_once('?') {
            Some((a, q)) => (a, Some(q)),
            None => (rest, None),
        };
        let (authority, path) = match before_query.find('/') {
            Some(i) => (&before_query[..i], &before_query[i + 1..]),
            None => (before_query, ""),
        };
        let export = percent_decode(path).ok_or_else(|| bad(uri, "bad %-escape in the export"))?;
        if export.len() > xdisk_nbd::wire::MAX_STRING {
            return Err(bad(uri, "export name longer than 4096 bytes"));
        }
        let mut socket = None;
        let mut t = UriTls::default();
        for kv in query.unwrap_or("").split('&').filter(|s| !s.is_empty()) {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            let v = percent_decode(v).ok_or_else(|| bad(uri, "bad %-escape in the query"))?;
            match k {
                "socket" => socket = Some(v),
                "tls-certificates" => t.certificates = Some(v.into()),
                "tls-hostname" => t.hostname = Some(v),
                "tls-verify-peer" => {
                    t.verify_peer = match v.as_str() {
                        "true" | "on" | "yes" | "1" => true,
                        "false" | "off" | "no" | "0" => false,
                        _ => return Err(bad(uri, "tls-verify-peer takes true or false")),
                    }
                }
                "tls-psk-file" => {
                    return Err(Error::Tls(format!(
                        "{uri}: TLS-PSK is not supported (x509 certificates only)"
                    )))
                }
                _ => tracing::debug!(uri, key = k, "ignoring an unknown NBD URI parameter"),
            }
        }
        let transport = if unix {
            if !authority.is_empty() {
                return Err(bad(
                    uri,
                    "nbd+unix:// takes no host (nbd+unix:///EXPORT?socket=PATH)",
                ));
            }
            let path = socket.ok_or_else(|| bad(uri, "nbd+unix:// needs ?socket=PATH"))?;
            if path.is_empty() {
                return Err(bad(uri, "empty socket path"));
            }
            Transport::Unix { path: path.into() }
        } else {
            if socket.is_some() {
                return Err(bad(uri, "socket= is only for nbd+unix://"));
            }
            let authority = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
            let (host, port) = split_host_port(authority).ok_or_else(|| bad(uri, "bad host"))?;
            let host = percent_decode(host).ok_or_else(|| bad(uri, "bad host"))?;
            if host.is_empty() {
                return Err(bad(uri, "no host (nbd://HOST[:PORT]/EXPORT)"));
            }
            Transport::Tcp {
                host,
                port: port.unwrap_or(DEFAULT_PORT),
            }
        };
        Ok(NbdUri {
            transport,
            export,
            tls: tls.then_some(t),
        })
    }

    /// QEMU's legacy `nbd:HOST:PORT[:exportname=NAME]` and `nbd:unix:PATH[:exportname=NAME]`.
    fn parse_legacy(uri: &str) -> Result<NbdUri, Error> {
        let Some(rest) = uri.strip_prefix("nbd:") else {
            return Err(bad(uri, "not an NBD URI"));
        };
        let (rest, export) = match rest.find(":exportname=") {
            Some(i) => (&rest[..i], rest[i + ":exportname=".len()..].to_owned()),
            None => (rest, String::new()),
        };
        if export.len() > xdisk_nbd::wire::MAX_STRING || export.contains('\0') {
            return Err(bad(uri, "bad export name"));
        }
        if let Some(path) = rest.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(bad(uri, "empty socket path"));
            }
            return Ok(NbdUri {
                transport: Transport::Unix { path: path.into() },
                export,
                tls: None,
            });
        }
        let (host, port) = split_host_port(rest).ok_or_else(|| bad(uri, "bad HOST:PORT"))?;
        if host.is_empty() {
            return Err(bad(uri, "no host (nbd:HOST:PORT)"));
        }
        Ok(NbdUri {
            transport: Transport::Tcp {
                host: host.to_owned(),
                port: port.unwrap_or(DEFAULT_PORT),
            },
            export,
            tls: None,
        })
    }
}

/// `host`, `host:port`, `[v6]`, `[v6]:port`.
fn split_host_port(s: &str) -> Option<(&str, Option<u16>)> {
    if let Some(r) = s.strip_prefix('[') {
        let (h, after) = r.split_once(']')?;
        return match after {
            "" => Some((h, None)),
            p => Some((h, Some(p.strip_prefix(':')?.parse().ok()?))),
        };
    }
    match s.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') => Some((h, Some(p.parse().ok()?))),
        Some(_) => None,
        None => Some((s, None)),
    }
}

impl fmt::Display for NbdUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let export = escape(&self.export);
        let s = if self.tls.is_some() { "nbds" } else { "nbd" };
        let mut query = Vec::new();
        match &self.transport {
            Transport::Tcp { host, port } => {
                let host = if host.contains(':') {
                    format!("[{host}]")
                } else {
                    host.clone()
                };
                if *port == DEFAULT_PORT {
                    write!(f, "{s}://{host}/{export}")?;
                } else {
                    write!(f, "{s}://{host}:{port}/{export}")?;
                }
            }
            Transport::Unix { path } => {
                write!(f, "{s}+unix:///{export}")?;
                // Escaped as the other values: a path with `&`, `%` or `#` must read back.
                query.push(format!("socket={}", escape(&path.display().to_string())));
            }
        }
        if let Some(t) = &self.tls {
            if let Some(d) = &t.certificates {
                query.push(format!(
                    "tls-certificates={}",
                    escape(&d.display().to_string())
                ));
            }
            if let Some(h) = &t.hostname {
                query.push(format!("tls-hostname={}", escape(h)));
            }
            if !t.verify_peer {
                query.push("tls-verify-peer=false".into());
            }
        }
        if !query.is_empty() {
            write!(f, "?{}", query.join("&"))?;
        }
        Ok(())
    }
}

/// %-escapes all but unreserved characters and `/`.
fn escape(s: &str) -> String {
    s.bytes()
        .map(|c| {
            if c.is_ascii_alphanumeric() || b"-._~/".contains(&c) {
                (c as char).to_string()
            } else {
                format!("%{c:02X}")
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tcp(host: &str, port: u16, export: &str) -> NbdUri {
        NbdUri {
            transport: Transport::Tcp {
                host: host.into(),
                port,
            },
            export: export.into(),
            tls: None,
        }
    }

    fn unix(path: &str, export: &str) -> NbdUri {
        NbdUri {
            transport: Transport::Unix { path: path.into() },
            export: export.into(),
            tls: None,
        }
    }

    #[test]
    fn uris_parse_as_qemu_and_libnbd_spell_them() {
        let cases = [
            ("nbd://host/disk", tcp("host", 10809, "disk")),
            ("nbd://host", tcp("host", 10809, "")),
            ("nbd://host/", tcp("host", 10809, "")),
            ("nbd://host:1234/a%20b", tcp("host", 1234, "a b")),
            ("nbd://[::1]:99/x", tcp("::1", 99, "x")),
            ("nbd://[::1]/x", tcp("::1", 10809, "x")),
            ("nbd://h//abs", tcp("h", 10809, "/abs")),
            ("nbd+tcp://h/e", tcp("h", 10809, "e")),
            ("nbd+unix:///e?socket=/run/s.sock", unix("/run/s.sock", "e")),
            ("nbd+unix://?socket=/s", unix("/s", "")),
            ("nbd+unix:///?socket=%2Fs", unix("/s", "")),
            ("nbd:host:1234", tcp("host", 1234, "")),
            ("nbd:host:1234:exportname=d", tcp("host", 1234, "d")),
            ("nbd:unix:/run/s:exportname=d", unix("/run/s", "d")),
            ("nbd:unix:/run/s", unix("/run/s", "")),
        ];
        for (s, want) in cases {
            assert_eq!(NbdUri::parse(s).unwrap(), want, "{s}");
        }
        assert_eq!(
            NbdUri::parse("nbd://h:5/a b").unwrap().to_string(),
            "nbd://h:5/a%20b"
        );
        // What Display writes parses back to the same URI (xdisk attach writes it into
        // xenstore for the daemon), socket paths with URI syntax in them included.
        for u in [
            unix("/run/s.sock", "e"),
            unix("/run/a&b c%d#e?f=g.sock", "x/y"),
            unix("/run/nbd:raw+1.sock", ""),
            tcp("::1", 99, "a b"),
        ] {
            assert_eq!(NbdUri::parse(&u.to_string()).unwrap(), u, "{u}");
        }
        assert_eq!(
            unix("/run/s.sock", "e").to_string(),
            "nbd+unix:///e?socket=/run/s.sock"
        );
        let tls = |u: NbdUri, t: UriTls| NbdUri { tls: Some(t), ..u };
        let certs = |d: &str| UriTls {
            certificates: Some(d.into()),
            ..UriTls::default()
        };
        let tls_cases = [
            ("nbds://h/e", tls(tcp("h", 10809, "e"), UriTls::default())),
            (
                "nbds+unix:///e?socket=/s&tls-certificates=/c",
                tls(unix("/s", "e"), certs("/c")),
            ),
            (
                "nbds+unix:///e?socket=/s&tls-certificates=/c&tls-hostname=srv",
                tls(
                    unix("/s", "e"),
                    UriTls {
                        hostname: Some("srv".into()),
                        ..certs("/c")
                    },
                ),
            ),
            (
                "nbds://h:99/e?tls-verify-peer=false",
                tls(
                    tcp("h", 99, "e"),
                    UriTls {
                        verify_peer: false,
                        ..UriTls::default()
                    },
                ),
            ),
            // TLS parameters of a plain URI do not turn TLS on (as libnbd).
            ("nbd://h/e?tls-certificates=/x", tcp("h", 10809, "e")),
        ];
        for (s, want) in tls_cases {
            let got = NbdUri::parse(s).unwrap();
            assert_eq!(got, want, "{s}");
            if got.tls.is_some() {
                assert_eq!(NbdUri::parse(&got.to_string()).unwrap(), got, "{s}");
            }
        }
        let o = NbdUri::parse("nbds://h/e").unwrap().tls_options().unwrap();
        assert_eq!(o.hostname.as_deref(), Some("h"));
        let o = NbdUri::parse("nbds+unix:///e?socket=/s")
            .unwrap()
            .tls_options()
            .unwrap();
        assert_eq!(o.hostname, None);
        let e = NbdUri::parse("nbds://h/e?tls-psk-file=/k").unwrap_err();
        assert!(e.to_string().contains("x509"), "{e}");
        for s in [
            "nbd://",
            "nbd://h:port/e",
            "nbd://h:70000/e",
            "nbd+unix:///e",
            "nbd+unix://host/e?socket=/s",
            "nbd://h/%zz",
            "nbd://h/%00",
            "nbd+foo://h/e",
            "nbd:",
            "nbd:unix:",
            "nbd://h/e?socket=/s",
        ] {
            assert!(NbdUri::parse(s).is_err(), "{s}");
        }
        assert!(is_nbd_uri("nbd+unix:///x?socket=/s"));
        assert!(!is_nbd_uri("/var/lib/disk.raw"));
    }

    proptest::proptest! {
        /// What Display prints parses back to the same URI; no input panics the parser.
        #[test]
        fn display_round_trips(export in "[^\\x00]{0,40}", host in "[a-z][a-z0-9.-]{0,20}",
                               port in proptest::prelude::any::<u16>(), unix in proptest::prelude::any::<bool>()) {
            let u = if unix {
                NbdUri { transport: Transport::Unix { path: format!("/run/{host}.sock").into() }, export, tls: None }
            } else {
                NbdUri { transport: Transport::Tcp { host, port }, export, tls: None }
            };
            let back = NbdUri::parse(&u.to_string());
            proptest::prop_assert_eq!(back.ok(), Some(u));
        }

        #[test]
        fn parse_never_panics(s in "nbd[a-z+:/?=%\\[\\]0-9@#&.]{0,40}") {
            let _ = NbdUri::parse(&s);
            let _ = percent_decode(&s);
        }
    }
}
