//! The server side of the fixed newstyle handshake (proto.md "Handshake" and "Option
//! types"), over any blocking stream: from the greeting to the transmission phase (or the
//! client's abort), with the export list and metadata contexts the caller provides.
//!
//! What the client sends is hostile input: option data is bounded ([`MAX_OPTION_DATA`]), the
//! number of options per connection is bounded ([`MAX_OPTIONS`]), and every refusal is the
//! error reply the spec names, or a dropped connection where the spec allows no reply.

use std::io::{self, Read, Write};

use crate::wire::*;

/// The most options one client may send before it is dropped (a client looping over
/// `NBD_OPT_LIST` must not keep a server thread for ever).
pub const MAX_OPTIONS: u32 = 1024;

/// An export as the server offers it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportInfo {
    /// Its name (`NBD_OPT_GO`'s name; empty for the default export).
    pub name: String,
    /// A description for humans (`NBD_INFO_DESCRIPTION`; empty: none).
    pub description: String,
    /// Size in bytes.
    pub size: u64,
    /// Transmission flags (`flags::*`); `HAS_FLAGS` is added, `SEND_DF` only once structured
    /// replies are negotiated.
    pub flags: u16,
    /// Block size constraints.
    pub block: BlockSize,
}

/// What the handshake needs from the server: its exports and metadata contexts.
pub trait Exports {
    /// Every export name, for `NBD_OPT_LIST`.
    fn names(&self) -> Vec<String>;
    /// The export called `name` (empty: the default export), if there is one.
    fn lookup(&self, name: &str) -> Option<ExportInfo>;
    /// Metadata contexts the server can report for block status on the export `export`
    /// (as the client named it; empty: the default export), e.g. `base:allocation`, in the
    /// order their IDs are given (ID = index + 1).
    fn contexts(&self, export: &str) -> Vec<String> {
        let _ = export;
        vec!["base:allocation".to_owned()]
    }
}

/// How the handshake ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The transmission phase starts, on this export, with what was negotiated.
    Transmission {
        /// The export chosen.
        export: ExportInfo,
        /// What requests are validated against.
        negotiated: Negotiated,
        /// The metadata contexts selected, as (ID, name).
        contexts: Vec<(u32, String)>,
    },
    /// The client sent `NBD_OPT_ABORT` (answered) or closed the connection.
    Closed,
    /// The client sent `NBD_OPT_STARTTLS` and it was acknowledged ([`Tls::Required`]): the
    /// caller runs the TLS handshake, then [`negotiate_in_tls`] over the TLS session.
    StartTls {
        /// Whether the client asked for no zeroes after `NBD_OPT_EXPORT_NAME`'s reply
        /// (its flags, sent before TLS, still apply).
        no_zeroes: bool,
    },
}

/// Where the handshake stands with TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tls {
    /// The server has no TLS: `NBD_OPT_STARTTLS` is refused with `NBD_REP_ERR_POLICY`.
    Off,
    /// The server serves TLS only (proto.md's FORCEDTLS) and it is not negotiated yet: every
    /// option but `NBD_OPT_STARTTLS` and `NBD_OPT_ABORT` is refused with
    /// `NBD_REP_ERR_TLS_REQD`, and `NBD_OPT_EXPORT_NAME` drops the connection.
    Required,
    /// TLS is negotiated: a second `NBD_OPT_STARTTLS` is refused with `NBD_REP_ERR_INVALID`.
    Active,
}

/// Why the server dropped the client during the handshake.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// The connection failed.
    #[error("connection: {0}")]
    Io(#[from] io::Error),
    /// The client broke the protocol where no error reply is possible.
    #[error("protocol: {0}")]
    Protocol(String),
    /// The client asked for an export by `NBD_OPT_EXPORT_NAME` that does not exist (the
    /// spec leaves no way but to close the connection).
    #[error("no export named {0:?}")]
    UnknownExport(String),
}

impl From<WireError> for HandshakeError {
    fn from(e: WireError) -> Self {
        HandshakeError::Protocol(e.to_string())
    }
}

/// Negotiation state that options change.
#[derive(Debug, Default)]
struct State {
    no_zeroes: bool,
    structured: bool,
    extended: bool,
    tls: Option<Tls>,
    /// Selected contexts and the export name they were selected for.
    contexts: Vec<(u32, String)>,
    contexts_for: Option<String>,
}

/// Runs the server side of the handshake on `s`, for a server without TLS. Returns when
/// the transmission phase starts, or the client aborts or closes the connection.
pub fn negotiate<S: Read + Write>(
    s: &mut S,
    exports: &dyn Exports,
) -> Result<Outcome, HandshakeError> {
    negotiate_with(s, exports, Tls::Off)
}

/// Continues the handshake over a freshly established TLS session, after
/// [`Outcome::StartTls`]: options only (no greeting), with nothing negotiated before TLS
/// kept but the client's flags.
pub fn negotiate_in_tls<S: Read + Write>(
    s: &mut S,
    exports: &dyn Exports,
    no_zeroes: bool,
) -> Result<Outcome, HandshakeError> {
    let mut st = State {
        no_zeroes,
        tls: Some(Tls::Active),
        ..State::default()
    };
    options(s, exports, &mut st)
}

/// Runs the server side of the handshake on `s` from the greeting, `tls` being
/// [`Tls::Off`] or [`Tls::Required`] (then [`Outcome::StartTls`] may come back).
pub fn negotiate_with<S: Read + Write>(
    s: &mut S,
    exports: &dyn Exports,
    tls: Tls,
) -> Result<Outcome, HandshakeError> {
    let mut greeting = Vec::with_capacity(18);
    greeting.extend_from_slice(&NBD_MAGIC.to_be_bytes());
    greeting.extend_from_slice(&IHAVEOPT.to_be_bytes());
    greeting.extend_from_slice(&(handshake::FIXED_NEWSTYLE | handshake::NO_ZEROES).to_be_bytes());
    s.write_all(&greeting)?;
    s.flush()?;
    let mut cf = [0u8; 4];
    if !read_or_eof(s, &mut cf)? {
        return Ok(Outcome::Closed);
    }
    let client_flags = u32::from_be_bytes(cf);
    if client_flags & !(client::FIXED_NEWSTYLE | client::NO_ZEROES) != 0 {
        return Err(HandshakeError::Protocol(format!(
            "unknown client flags {client_flags:#x}"
        )));
    }
    if client_flags & client::FIXED_NEWSTYLE == 0 {
        return Err(HandshakeError::Protocol(
            "the client does not speak fixed newstyle (oldstyle and plain newstyle are not \
             served)"
                .into(),
        ));
    }
    let mut st = State {
        no_zeroes: client_flags & client::NO_ZEROES != 0,
        tls: Some(tls),
        ..State::default()
    };
    options(s, exports, &mut st)
}

/// The option haggling, until the transmission phase, STARTTLS, or the end.
fn options<S: Read + Write>(
    s: &mut S,
    exports: &dyn Exports,
    st: &mut State,
) -> Result<Outcome, HandshakeError> {
    for _ in 0..MAX_OPTIONS {
        let mut hb = [0u8; OPTION_HEADER_LEN];
        if !read_or_eof(s, &mut hb)? {
            return Ok(Outcome::Closed);
        }
        let h = OptionHeader::parse(&hb)?;
        let mut data = vec![0u8; h.len as usize];
        s.read_exact(&mut data)?;
        if let Some(outcome) = option(s, exports, st, h.option, &data)? {
            s.flush()?;
            return Ok(outcome);
        }
        s.flush()?;
    }
    Err(HandshakeError::Protocol(format!(
        "more than {MAX_OPTIONS} options"
    )))
}

/// Reads exactly `buf.len()` bytes; false if the peer closed before the first byte.
fn read_or_eof<R: Read>(r: &mut R, buf: &mut [u8]) -> io::Result<bool> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) if got == 0 => return Ok(false),
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

fn reply<W: Write>(w: &mut W, option: u32, kind: u32, data: &[u8]) -> io::Result<()> {
    w.write_all(&option_reply(option, kind, data))
}

fn error<W: Write>(w: &mut W, option: u32, kind: u32, msg: &str) -> io::Result<()> {
    w.write_all(&option_error(option, kind, msg))
}

/// Transmission flags of `e` as negotiated.
fn transmission_flags(e: &ExportInfo, st: &State) -> u16 {
    let mut f = e.flags | flags::HAS_FLAGS;
    if !st.structured {
        f &= !flags::SEND_DF;
    }
    f & !flags::BLOCK_STATUS_PAYLOAD
}

/// Handles one option; `Some` when the handshake is over.
fn option<S: Read + Write>(
    s: &mut S,
    exports: &dyn Exports,
    st: &mut State,
    opt_: u32,
    data: &[u8],
) -> Result<Option<Outcome>, HandshakeError> {
    let tls = st.tls.unwrap_or(Tls::Off);
    if tls == Tls::Required {
        return match opt_ {
            opt::ABORT => option_any(s, exports, st, opt_, data),
            opt::STARTTLS => {
                if !data.is_empty() {
                    error(s, opt_, rep::ERR_INVALID, "NBD_OPT_STARTTLS takes no data")?;
                    return Ok(None);
                }
                reply(s, opt_, rep::ACK, &[])?;
                Ok(Some(Outcome::StartTls {
                    no_zeroes: st.no_zeroes,
                }))
            }
            // No error reply is possible: the spec has the server drop the client.
            opt::EXPORT_NAME => Err(HandshakeError::Protocol(
                "NBD_OPT_EXPORT_NAME before TLS on a TLS-only server".into(),
            )),
            _ => {
                error(
                    s,
                    opt_,
                    rep::ERR_TLS_REQD,
                    "this server requires TLS (NBD_OPT_STARTTLS)",
                )?;
                Ok(None)
            }
        };
    }
    option_any(s, exports, st, opt_, data)
}

/// Handles one option outside [`Tls::Required`].
fn option_any<S: Read + Write>(
    s: &mut S,
    exports: &dyn Exports,
    st: &mut State,
    opt_: u32,
    data: &[u8],
) -> Result<Option<Outcome>, HandshakeError> {
    match opt_ {
        opt::EXPORT_NAME => {
            let name = std::str::from_utf8(data)
                .ok()
                .filter(|n| !n.contains('\0') && n.len() <= MAX_STRING)
                .ok_or_else(|| HandshakeError::Protocol("export name is not a string".into()))?;
            let Some(e) = exports.lookup(name) else {
                return Err(HandshakeError::UnknownExport(name.to_owned()));
            };
            let f = transmission_flags(&e, st);
            let mut b = Vec::with_capacity(10 + 124);
            b.extend_from_slice(&e.size.to_be_bytes());
            b.extend_from_slice(&f.to_be_bytes());
            if !st.no_zeroes {
                b.extend_from_slice(&[0u8; 124]);
            }
            s.write_all(&b)?;
            Ok(Some(transmission(e, f, st, name)))
        }
        opt::ABORT => {
            // The client may already be gone: a failed ACK is not an error.
            let _ = reply(s, opt_, rep::ACK, &[]);
            Ok(Some(Outcome::Closed))
        }
        opt::LIST => {
            if !data.is_empty() {
                error(s, opt_, rep::ERR_INVALID, "NBD_OPT_LIST takes no data")?;
                return Ok(None);
            }
            for n in exports.names() {
                reply(s, opt_, rep::SERVER, &rep_server(&n))?;
            }
            reply(s, opt_, rep::ACK, &[])?;
            Ok(None)
        }
        opt::STARTTLS if st.tls == Some(Tls::Active) => {
            error(s, opt_, rep::ERR_INVALID, "TLS is already negotiated")?;
            Ok(None)
        }
        opt::STARTTLS => {
            error(
                s,
                opt_,
                rep::ERR_POLICY,
                "TLS is not configured on this server",
            )?;
            Ok(None)
        }
        opt::INFO | opt::GO => {
            let req = match InfoRequest::parse(data) {
                Ok(r) => r,
                Err(e) => {
                    error(s, opt_, rep::ERR_INVALID, &e.to_string())?;
                    return Ok(None);
                }
            };
            let Some(e) = exports.lookup(&req.name) else {
                error(
                    s,
                    opt_,
                    rep::ERR_UNKNOWN,
                    &format!("no export named {:?}", req.name),
                )?;
                return Ok(None);
            };
            let f = transmission_flags(&e, st);
            reply(s, opt_, rep::INFO, &info_export(e.size, f))?;
            if req.requests.contains(&info::NAME) {
                reply(s, opt_, rep::INFO, &info_string(info::NAME, &e.name))?;
            }
            if req.requests.contains(&info::DESCRIPTION) && !e.description.is_empty() {
                reply(
                    s,
                    opt_,
                    rep::INFO,
                    &info_string(info::DESCRIPTION, &e.description),
                )?;
            }
            // Always: clients that did not ask ignore it, and it tells them the maximum.
            reply(s, opt_, rep::INFO, &e.block.encode())?;
            reply(s, opt_, rep::ACK, &[])?;
            if opt_ == opt::GO {
                let name = req.name.clone();
                return Ok(Some(transmission(e, f, st, &name)));
            }
            Ok(None)
        }
        opt::STRUCTURED_REPLY => {
            if !data.is_empty() {
                error(
                    s,
                    opt_,
                    rep::ERR_INVALID,
                    "NBD_OPT_STRUCTURED_REPLY takes no data",
                )?;
            } else if st.extended {
                error(
                    s,
                    opt_,
                    rep::ERR_EXT_HEADER_REQD,
                    "extended headers are already negotiated",
                )?;
            } else {
                st.structured = true;
                reply(s, opt_, rep::ACK, &[])?;
            }
            Ok(None)
        }
        opt::EXTENDED_HEADERS => {
            if !data.is_empty() {
                error(
                    s,
                    opt_,
                    rep::ERR_INVALID,
                    "NBD_OPT_EXTENDED_HEADERS takes no data",
                )?;
            } else {
                st.extended = true;
                st.structured = true;
                reply(s, opt_, rep::ACK, &[])?;
            }
            Ok(None)
        }
        opt::LIST_META_CONTEXT | opt::SET_META_CONTEXT => {
            meta_context(s, exports, st, opt_, data)?;
            Ok(None)
        }
        _ => {
            error(
                s,
                opt_,
                rep::ERR_UNSUP,
                &format!("option {opt_} is not supported"),
            )?;
            Ok(None)
        }
    }
}

fn transmission(e: ExportInfo, flags_: u16, st: &State, name: &str) -> Outcome {
    // Contexts selected for another export do not apply.
    let contexts = if st.contexts_for.as_deref() == Some(name) {
        st.contexts.clone()
    } else {
        Vec::new()
    };
    Outcome::Transmission {
        negotiated: Negotiated {
            size: e.size,
            flags: flags_,
            structured: st.structured,
            extended: st.extended,
            block: e.block,
            meta_contexts: !contexts.is_empty(),
        },
        contexts,
        export: e,
    }
}

/// Whether `query` selects the context `name` (exact, or `namespace:` for all of it, for
/// LIST only).
fn matches(query: &str, name: &str, list: bool) -> bool {
    query == name || (list && query.ends_with(':') && name.starts_with(query))
}

fn meta_context<S: Write>(
    s: &mut S,
    exports: &dyn Exports,
    st: &mut State,
    opt_: u32,
    data: &[u8],
) -> io::Result<()> {
    let set = opt_ == opt::SET_META_CONTEXT;
    if set {
        // Replaced even when the option fails.
        st.contexts.clear();
        st.contexts_for = None;
    }
    if !st.structured {
        return error(
            s,
            opt_,
            rep::ERR_INVALID,
            "negotiate structured replies before metadata contexts",
        );
    }
    let req = match MetaContextRequest::parse(data) {
        Ok(r) => r,
        Err(e) => return error(s, opt_, rep::ERR_INVALID, &e.to_string()),
    };
    if exports.lookup(&req.name).is_none() {
        return error(
            s,
            opt_,
            rep::ERR_UNKNOWN,
            &format!("no export named {:?}", req.name),
        );
    }
    if req.queries.iter().any(|q| !q.contains(':')) {
        return error(s, opt_, rep::ERR_INVALID, "a query lacks its namespace");
    }
    let available = exports.contexts(&req.name);
    let mut chosen = Vec::new();
    for (i, name) in available.iter().enumerate() {
        let id = i as u32 + 1;
        let hit = if req.queries.is_empty() {
            !set
        } else {
            req.queries.iter().any(|q| matches(q, name, !set))
        };
        if hit {
            chosen.push((id, name.clone()));
        }
    }
    for (id, name) in &chosen {
        // IDs are reserved (zero) in LIST replies.
        let id = if set { *id } else { 0 };
        reply(s, opt_, rep::META_CONTEXT, &rep_meta_context(id, name))?;
    }
    if set {
        st.contexts = chosen;
        st.contexts_for = Some(req.name);
    }
    reply(s, opt_, rep::ACK, &[])
}
