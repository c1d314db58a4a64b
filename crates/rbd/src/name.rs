//! RBD image names as QEMU spells them (`block/rbd.c`, `qemu_rbd_parse_filename`), so that
//! libxl's qdisk configurations (`target=rbd:pool/img`) work unchanged:
//!
//! ```text
//! rbd:POOL/IMAGE[@SNAP][:KEY=VALUE...]
//! rbd:POOL/NAMESPACE/IMAGE[@SNAP][:KEY=VALUE...]
//! ```
//!
//! `id=USER` is the Ceph user (`client.USER`; default `admin`), `conf=PATH` the ceph.conf to
//! read (default: Ceph's own search, `/etc/ceph/ceph.conf`...); every other pair is a Ceph
//! option set on the connection (`mon_host=`, `keyring=`, `key=`, `rados_osd_op_timeout=`...).
//! A `\` makes the next character literal (`mon_host=10.0.0.1\:6789`, as QEMU reads it).
//! Some keys are xdisk's own, not Ceph's (never passed to Ceph; QEMU would refuse them):
//! `xdisk_deadline=SECONDS`, the per-request deadline ([`RbdName::deadline`]),
//! `xdisk_lock=exclusive|auto` ([`RbdName::exclusive`]), librbd's LUKS encryption
//! ([`RbdName::encrypt`]: `encrypt.format=luks|luks2` with `encrypt.key-file=PATH` or
//! `encrypt.key-secret=ID`, and `encrypt.cipher-alg=aes-128|aes-256` for a new image: the
//! names of QEMU's `encrypt.*` options of its rbd driver), and `xdisk_luks=raw`
//! ([`RbdName::luks_raw`]: an image that starts with a LUKS header is served as stored).
//!
//! The parse follows QEMU's tokenizer step by step (the pool ends at the first unescaped
//! `/`; if an unescaped `@` appears anywhere after it, the image ends there and the snapshot
//! at the next `:`; otherwise the image ends at the first `:`; a `/` inside the image part
//! splits off the namespace), and adds what QEMU leaves to librbd: empty pool, image and
//! snapshot names, empty or valueless option keys and overlong names are refused here, with
//! a message.

use std::fmt;
use std::time::Duration;

/// The longest name accepted, as given and as [`RbdName::to_spec`] writes it back (QEMU's
/// own limits are about as large; librbd's image names are far shorter).
pub const MAX_NAME_LEN: usize = 4096;

/// A parsed `rbd:` name.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct RbdName {
    /// The RADOS pool.
    pub pool: String,
    /// The RADOS namespace inside the pool (`None`: the default one).
    pub namespace: Option<String>,
    /// The RBD image.
    pub image: String,
    /// The snapshot (`@SNAP`): such an image is read-only.
    pub snapshot: Option<String>,
    /// `id=`: the Ceph user, without `client.`.
    pub user: Option<String>,
    /// `conf=`: the ceph.conf to read.
    pub conf: Option<String>,
    /// Every other `KEY=VALUE`, in order: Ceph options set on the connection.
    pub options: Vec<(String, String)>,
    /// `xdisk_deadline=SECONDS`: how long one request may take before it fails with
    /// ETIMEDOUT (`0`: no deadline); `None`: the default ([`DEFAULT_DEADLINE`]).
    pub deadline: Option<Duration>,
    /// `xdisk_lock=exclusive`: a writable open takes the image's exclusive lock and keeps
    /// it (other writers fail); `xdisk_lock=auto` (the default, as QEMU): librbd hands the
    /// lock over to whichever client writes.
    pub exclusive: bool,
    /// `encrypt.*`: librbd's LUKS encryption, loaded when the image is opened (and
    /// formatted when it is created).
    pub encrypt: Option<Encryption>,
    /// `xdisk_luks=raw`: an image that starts with a LUKS header opens without
    /// `encrypt.*` and reads as stored (the LUKS volume of a guest that encrypts its disk
    /// itself); without it such an open is refused (it would read ciphertext).
    pub luks_raw: bool,
}

/// librbd's LUKS versions (QEMU's `encrypt.format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LuksFormat {
    /// `luks`: LUKS1.
    Luks1,
    /// `luks2`: LUKS2.
    Luks2,
}

impl LuksFormat {
    /// QEMU's name: `luks` or `luks2`.
    pub fn as_str(self) -> &'static str {
        match self {
            LuksFormat::Luks1 => "luks",
            LuksFormat::Luks2 => "luks2",
        }
    }

    /// From QEMU's name.
    pub fn parse(s: &str) -> Result<LuksFormat, NameError> {
        match s {
            "luks" => Ok(LuksFormat::Luks1),
            "luks2" => Ok(LuksFormat::Luks2),
            "luks-any" => Err(err(
                "encrypt.format=luks-any needs librbd 17 (Ceph Quincy; QEMU 8): librbd 16 takes luks or luks2",
            )),
            _ => Err(err(format!(
                "encrypt.format={s}: want luks or luks2 (librbd's LUKS encryption)"
            ))),
        }
    }
}

/// The cipher of a new encrypted image (QEMU's `encrypt.cipher-alg`; AES-XTS).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CipherAlg {
    /// `aes-128`.
    Aes128,
    /// `aes-256` (librbd's and QEMU's default).
    Aes256,
}

impl CipherAlg {
    /// QEMU's name.
    pub fn as_str(self) -> &'static str {
        match self {
            CipherAlg::Aes128 => "aes-128",
            CipherAlg::Aes256 => "aes-256",
        }
    }

    /// From QEMU's name.
    pub fn parse(s: &str) -> Result<CipherAlg, NameError> {
        match s {
            "aes-128" => Ok(CipherAlg::Aes128),
            "aes-256" => Ok(CipherAlg::Aes256),
            _ => Err(err(format!(
                "encrypt.cipher-alg={s}: want aes-128 or aes-256 (librbd encrypts with AES-XTS)"
            ))),
        }
    }
}

/// Where the passphrase of an encrypted image comes from.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum KeySource {
    /// `encrypt.key-file=PATH`: the whole content of the file.
    File(String),
    /// `encrypt.key-secret=ID`: the secret `xdisk img --object secret,id=ID,...` gave
    /// (QEMU's spelling; only `xdisk img` takes `--object`).
    Secret(String),
}

/// librbd's LUKS encryption of an image (`rbd_encryption_load`, `rbd_encryption_format`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Encryption {
    /// `encrypt.format`.
    pub format: LuksFormat,
    /// `encrypt.key-file` or `encrypt.key-secret`.
    pub key: KeySource,
    /// `encrypt.cipher-alg`: for a new image only (an existing one says its own).
    pub cipher: Option<CipherAlg>,
}

/// The prefix of the encryption options (QEMU's names).
pub const ENCRYPT_PREFIX: &str = "encrypt.";

/// The key of xdisk's own option to serve LUKS volumes as stored.
pub const LUKS_KEY: &str = "xdisk_luks";

/// The per-request deadline unless a name sets `xdisk_deadline`.
pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(30);

/// The longest `xdisk_deadline` accepted (a day).
pub const MAX_DEADLINE_SECS: u64 = 86_400;

/// The key of xdisk's own per-request deadline option.
pub const DEADLINE_KEY: &str = "xdisk_deadline";

/// The key of xdisk's own exclusive-lock option.
pub const LOCK_KEY: &str = "xdisk_lock";

/// Why a name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct NameError(pub String);

fn err(s: impl Into<String>) -> NameError {
    NameError(s.into())
}

/// Whether `s` is meant as an RBD name (it starts with `rbd:`).
pub fn is_rbd_name(s: &str) -> bool {
    s.starts_with("rbd:")
}

/// The byte index of the first `delim` in `s` that no `\` escapes (QEMU's `qemu_rbd_strchr`).
fn find_unescaped(s: &str, delim: char) -> Option<usize> {
    let mut it = s.char_indices();
    while let Some((i, c)) = it.next() {
        if c == delim {
            return Some(i);
        }
        if c == '\\' {
            // The escaped character, whatever it is, is not a delimiter. A trailing `\` stays.
            it.next();
        }
    }
    None
}

/// Splits at the first unescaped `delim`: the token, and the rest after it if there was
/// one (QEMU's `qemu_rbd_next_tok`).
fn next_tok(s: &str, delim: char) -> (&str, Option<&str>) {
    match find_unescaped(s, delim) {
        Some(i) => (&s[..i], Some(&s[i + delim.len_utf8()..])),
        None => (s, None),
    }
}

/// Removes the escaping `\`s (QEMU's `qemu_rbd_unescape`): `\x` is `x`; a trailing `\` stays.
fn unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut it = s.chars().peekable();
    while let Some(c) = it.next() {
        if c == '\\' {
            if let Some(n) = it.next() {
                out.push(n);
                continue;
            }
        }
        out.push(c);
    }
    out
}

/// Escapes `\` and the characters in `special`, so that the result parses back to `s`.
fn escape(s: &str, special: &[char], out: &mut String) {
    for c in s.chars() {
        if c == '\\' || special.contains(&c) {
            out.push('\\');
        }
        out.push(c);
    }
}

/// What each part must escape (the delimiters the parser looks for where it lies).
const POOL: &[char] = &['/'];
const IMAGE: &[char] = &['/', '@', ':'];
const KEY: &[char] = &['=', ':', '@'];
const VALUE: &[char] = &[':', '@'];

impl RbdName {
    /// Parses `rbd:POOL/[NAMESPACE/]IMAGE[@SNAP][:KEY=VALUE...]`.
    pub fn parse(name: &str) -> Result<RbdName, NameError> {
        let Some(rest) = name.strip_prefix("rbd:") else {
            return Err(err("an RBD name starts with 'rbd:'"));
        };
        if name.len() > MAX_NAME_LEN {
            return Err(err(format!(
                "longer than {MAX_NAME_LEN} bytes ({} bytes)",
                name.len()
            )));
        }
        if name.chars().any(|c| c.is_control()) {
            return Err(err("control characters in the name"));
        }
        let (pool, rest) = next_tok(rest, '/');
        let Some(rest) = rest else {
            return Err(err("a pool name is required (rbd:POOL/IMAGE)"));
        };
        let pool = unescape(pool);
        // As QEMU: an unescaped '@' anywhere in the rest starts the snapshot name.
        let (image_part, snapshot, opts) = if find_unescaped(rest, '@').is_some() {
            let (image, rest) = next_tok(rest, '@');
            let (snap, opts) = next_tok(rest.unwrap_or(""), ':');
            (image, Some(unescape(snap)), opts)
        } else {
            let (image, opts) = next_tok(rest, ':');
            (image, None, opts)
        };
        let (namespace, image) = match next_tok(image_part, '/') {
            (ns, Some(image)) => (Some(unescape(ns)), unescape(image)),
            (image, None) => (None, unescape(image)),
        };
        if pool.is_empty() {
            return Err(err("empty pool name"));
        }
        if image.is_empty() {
            return Err(err("empty image name"));
        }
        if snapshot.as_deref() == Some("") {
            return Err(err("empty snapshot name after '@'"));
        }
        let mut n = RbdName {
            pool,
            // QEMU passes an empty namespace on, which librados takes as the default one.
            namespace: namespace.filter(|ns| !ns.is_empty()),
            image,
            snapshot,
            user: None,
            conf: None,
            options: Vec::new(),
            deadline: None,
            exclusive: false,
            encrypt: None,
            luks_raw: false,
        };
        let (mut format, mut key_file, mut key_secret, mut cipher) = (None, None, None, None);
        let mut p = opts;
        while let Some(s) = p {
            let (key, rest) = next_tok(s, '=');
            let key = unescape(key);
            let Some(rest) = rest else {
                return Err(err(format!("option '{key}' has no value (KEY=VALUE)")));
            };
            if key.is_empty() {
                return Err(err("an option with an empty name"));
            }
            let (value, rest) = next_tok(rest, ':');
            let value = unescape(value);
            p = rest;
            match key.as_str() {
                "conf" => n.conf = Some(value),
                "id" => n.user = Some(value),
                DEADLINE_KEY => {
                    let secs = value
                        .parse::<u64>()
                        .ok()
                        .filter(|&s| s <= MAX_DEADLINE_SECS)
                        .ok_or_else(|| {
                            err(format!(
                                "{DEADLINE_KEY}={value}: want whole seconds, 0 to {MAX_DEADLINE_SECS} (0: no deadline)"
                            ))
                        })?;
                    n.deadline = Some(Duration::from_secs(secs));
                }
                LOCK_KEY => {
                    n.exclusive = match value.as_str() {
                        "exclusive" => true,
                        "auto" => false,
                        _ => {
                            return Err(err(format!("{LOCK_KEY}={value}: want exclusive or auto")))
                        }
                    }
                }
                LUKS_KEY => {
                    n.luks_raw = match value.as_str() {
                        "raw" => true,
                        "refuse" => false,
                        _ => return Err(err(format!("{LUKS_KEY}={value}: want raw or refuse"))),
                    }
                }
                "encrypt.format" => format = Some(LuksFormat::parse(&value)?),
                "encrypt.cipher-alg" => cipher = Some(CipherAlg::parse(&value)?),
                "encrypt.key-file" | "encrypt.key-secret" if value.is_empty() => {
                    return Err(err(format!("{key} is empty")))
                }
                "encrypt.key-file" => key_file = Some(value),
                "encrypt.key-secret" => key_secret = Some(value),
                // Never passed to Ceph, never echoed (a passphrase given inline, say).
                k if k.starts_with(ENCRYPT_PREFIX) => {
                    return Err(err(format!(
                        "unknown encryption option '{k}' (encrypt.format, encrypt.key-file, encrypt.key-secret, encrypt.cipher-alg; a passphrase is never given in the name)"
                    )))
                }
                _ => n.options.push((key, value)),
            }
        }
        n.encrypt = match (format, key_file, key_secret) {
            (None, None, None) if cipher.is_none() => None,
            (None, ..) => {
                return Err(err(
                    "encrypt.key-file, encrypt.key-secret and encrypt.cipher-alg go with encrypt.format=luks|luks2",
                ))
            }
            (Some(f), None, None) => {
                return Err(err(format!(
                    "encrypt.format={} needs the passphrase: encrypt.key-file=PATH (or, for xdisk img, encrypt.key-secret=ID with --object secret,id=ID,file=PATH)",
                    f.as_str()
                )))
            }
            (Some(_), Some(_), Some(_)) => {
                return Err(err("give encrypt.key-file or encrypt.key-secret, not both"))
            }
            (Some(format), Some(f), None) => Some(Encryption {
                format,
                key: KeySource::File(f),
                cipher,
            }),
            (Some(format), None, Some(id)) => Some(Encryption {
                format,
                key: KeySource::Secret(id),
                cipher,
            }),
        };
        if n.encrypt.is_some() && n.luks_raw {
            return Err(err(format!(
                "{LUKS_KEY}=raw reads a LUKS volume as stored: not with encrypt.format"
            )));
        }
        // Escaping may lengthen a name: bound the form it prints back to (`to_spec`), so
        // that every name accepted here is one `to_spec` writes in a form accepted too.
        let spec = n.to_spec().len();
        if spec > MAX_NAME_LEN {
            return Err(err(format!(
                "longer than {MAX_NAME_LEN} bytes once escaped ({spec} bytes)"
            )));
        }
        Ok(n)
    }

    /// The name in the form [`RbdName::parse`] reads back (escaped), secrets included: for
    /// handing the image to another program (the daemon, through xenstore), never for
    /// messages. xdisk's own `xdisk_deadline` and `xdisk_lock` are kept (so that it parses
    /// back to the same name); QEMU would refuse them (it passes unknown keys to Ceph).
    pub fn to_spec(&self) -> String {
        self.write(false)
    }

    /// The per-request deadline: `xdisk_deadline` if given (`None` for 0), else
    /// [`DEFAULT_DEADLINE`].
    pub fn request_deadline(&self) -> Option<Duration> {
        match self.deadline {
            Some(d) if d.is_zero() => None,
            Some(d) => Some(d),
            None => Some(DEFAULT_DEADLINE),
        }
    }

    /// `pool/[namespace/]image[@snap]`, as the `rbd` command names images.
    pub fn image_spec(&self) -> String {
        let mut s = self.pool.clone();
        if let Some(ns) = &self.namespace {
            s.push('/');
            s.push_str(ns);
        }
        s.push('/');
        s.push_str(&self.image);
        if let Some(snap) = &self.snapshot {
            s.push('@');
            s.push_str(snap);
        }
        s
    }

    fn write(&self, redact: bool) -> String {
        let mut s = String::from("rbd:");
        escape(&self.pool, POOL, &mut s);
        s.push('/');
        if let Some(ns) = &self.namespace {
            escape(ns, IMAGE, &mut s);
            s.push('/');
        }
        escape(&self.image, IMAGE, &mut s);
        if let Some(snap) = &self.snapshot {
            s.push('@');
            escape(snap, IMAGE, &mut s);
        }
        let special = [("id", &self.user), ("conf", &self.conf)];
        let pairs = special
            .iter()
            .filter_map(|(k, v)| v.as_ref().map(|v| (*k, v.as_str())))
            .chain(self.options.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        for (k, v) in pairs {
            s.push(':');
            escape(k, KEY, &mut s);
            s.push('=');
            if redact && is_secret(k) {
                s.push_str("<hidden>");
            } else {
                escape(v, VALUE, &mut s);
            }
        }
        if let Some(d) = self.deadline {
            s.push_str(&format!(":{DEADLINE_KEY}={}", d.as_secs()));
        }
        if self.exclusive {
            s.push_str(&format!(":{LOCK_KEY}=exclusive"));
        }
        if let Some(e) = &self.encrypt {
            s.push_str(":encrypt.format=");
            s.push_str(e.format.as_str());
            let (k, v) = match &e.key {
                KeySource::File(p) => ("key-file", p),
                KeySource::Secret(id) => ("key-secret", id),
            };
            s.push_str(&format!(":encrypt.{k}="));
            escape(v, VALUE, &mut s);
            if let Some(c) = e.cipher {
                s.push_str(":encrypt.cipher-alg=");
                s.push_str(c.as_str());
            }
        }
        if self.luks_raw {
            s.push_str(&format!(":{LUKS_KEY}=raw"));
        }
        s
    }
}

/// Ceph options whose values are secrets (never shown in messages or logs): `key=`, and to
/// be safe whatever names a secret, password or passphrase. (The encryption's passphrase
/// is never in a name: `encrypt.key-file` names the file holding it, `encrypt.key-secret`
/// the `--object secret` holding it.)
fn is_secret(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    matches!(k.as_str(), "key" | "keyfile_contents" | "secret")
        || k.ends_with("_secret")
        || k.contains("password")
        || k.contains("passphrase")
}

/// For messages and logs: the name with secrets (`key=`) hidden.
impl fmt::Display for RbdName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.write(true))
    }
}

impl fmt::Debug for RbdName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RbdName({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn p(s: &str) -> RbdName {
        RbdName::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn qemu_spellings_parse() {
        let n = p("rbd:pool/img");
        assert_eq!((n.pool.as_str(), n.image.as_str()), ("pool", "img"));
        assert_eq!(
            (n.namespace, n.snapshot, n.user, n.conf),
            (None, None, None, None)
        );
        assert!(n.options.is_empty());

        let n = p("rbd:pool/ns/img@snap:id=libvirt:conf=/etc/ceph/c.conf:mon_host=10.0.0.1\\:6789:key=AQBx==");
        assert_eq!(n.pool, "pool");
        assert_eq!(n.namespace.as_deref(), Some("ns"));
        assert_eq!(n.image, "img");
        assert_eq!(n.snapshot.as_deref(), Some("snap"));
        assert_eq!(n.user.as_deref(), Some("libvirt"));
        assert_eq!(n.conf.as_deref(), Some("/etc/ceph/c.conf"));
        // The value ends at the first unescaped ':'; '=' inside a value is kept.
        assert_eq!(
            n.options,
            vec![
                ("mon_host".into(), "10.0.0.1:6789".into()),
                ("key".into(), "AQBx==".into())
            ]
        );
        assert_eq!(n.image_spec(), "pool/ns/img@snap");

        let n = p("rbd:rbd/disk:keyring=/etc/ceph/k:rados_osd_op_timeout=5");
        assert_eq!(n.image, "disk");
        assert_eq!(n.options.len(), 2);

        // Escaped '@' and '/' belong to the names.
        let n = p("rbd:po\\/ol/im\\@g");
        assert_eq!((n.pool.as_str(), n.image.as_str()), ("po/ol", "im@g"));
        assert_eq!(n.snapshot, None);
        // An empty namespace is the default one.
        assert_eq!(p("rbd:pool//img").namespace, None);
    }

    #[test]
    fn bad_names_are_refused_with_a_reason() {
        for (s, why) in [
            ("nbd://x", "starts with"),
            ("rbd:", "pool name is required"),
            ("rbd:pool", "pool name is required"),
            ("rbd:/img", "empty pool"),
            ("rbd:pool/", "empty image"),
            ("rbd:pool/img@", "empty snapshot"),
            ("rbd:pool/img:", "has no value"),
            ("rbd:pool/img:id", "has no value"),
            ("rbd:pool/img:=x", "empty name"),
            ("rbd:pool/im\ng", "control"),
        ] {
            let e = RbdName::parse(s).unwrap_err();
            assert!(e.0.contains(why), "{s}: {e}");
        }
        let long = format!("rbd:p/{}", "i".repeat(MAX_NAME_LEN));
        assert!(RbdName::parse(&long).unwrap_err().0.contains("longer"));
        // Short enough as given, too long once escaped (found by the rbd_name fuzz target:
        // the '@' quirk puts ':'s in the image name, which the printed form escapes).
        let quirk = format!("rbd:p/{}@s", "a:".repeat(2040));
        assert!(quirk.len() <= MAX_NAME_LEN);
        assert!(RbdName::parse(&quirk)
            .unwrap_err()
            .0
            .contains("once escaped"));
    }

    #[test]
    fn display_hides_the_key_and_spec_keeps_it() {
        let n = p("rbd:p/i:id=u:key=SECRET:mon_host=h");
        assert_eq!(n.to_string(), "rbd:p/i:id=u:key=<hidden>:mon_host=h");
        assert_eq!(n.to_spec(), "rbd:p/i:id=u:key=SECRET:mon_host=h");
        assert!(!format!("{n:?}").contains("SECRET"));
    }

    #[test]
    fn qemu_quirk_an_at_sign_in_an_option_value_starts_the_snapshot() {
        // QEMU looks for '@' in everything after the pool (escape it in values).
        let n = p("rbd:p/img:id=a@b");
        assert_eq!(n.image, "img:id=a");
        assert_eq!(n.snapshot.as_deref(), Some("b"));
        let n = p("rbd:p/img:id=a\\@b");
        assert_eq!(n.image, "img");
        assert_eq!(n.user.as_deref(), Some("a@b"));
    }

    fn component() -> impl Strategy<Value = String> {
        // Every character the grammar treats specially, and some others.
        proptest::collection::vec(
            prop_oneof![
                Just('a'),
                Just('Z'),
                Just('.'),
                Just('-'),
                Just('/'),
                Just('@'),
                Just(':'),
                Just('='),
                Just('\\'),
                Just('é'),
            ],
            1..8,
        )
        .prop_map(|v| v.into_iter().collect())
    }

    fn name() -> impl Strategy<Value = RbdName> {
        (
            (
                component(),
                proptest::option::of(component()),
                component(),
                proptest::option::of(component()),
                proptest::option::of(component()),
                proptest::option::of(component()),
                proptest::collection::vec(
                    (
                        component().prop_filter("special keys", |k| {
                            k != "id"
                                && k != "conf"
                                && k != DEADLINE_KEY
                                && k != LOCK_KEY
                                && k != LUKS_KEY
                                && !k.starts_with(ENCRYPT_PREFIX)
                        }),
                        component(),
                    ),
                    0..3,
                ),
            ),
            (
                proptest::option::of(0u64..=MAX_DEADLINE_SECS),
                any::<bool>(),
                proptest::option::of(encryption()),
                any::<bool>(),
            ),
        )
            .prop_map(
                |(
                    (pool, namespace, image, snapshot, user, conf, options),
                    (deadline, exclusive, encrypt, luks_raw),
                )| RbdName {
                    pool,
                    namespace,
                    image,
                    snapshot,
                    user,
                    conf,
                    options,
                    deadline: deadline.map(Duration::from_secs),
                    exclusive,
                    luks_raw: luks_raw && encrypt.is_none(),
                    encrypt,
                },
            )
    }

    fn encryption() -> impl Strategy<Value = Encryption> {
        (
            prop_oneof![Just(LuksFormat::Luks1), Just(LuksFormat::Luks2)],
            prop_oneof![
                component().prop_map(KeySource::File),
                component().prop_map(KeySource::Secret)
            ],
            proptest::option::of(prop_oneof![
                Just(CipherAlg::Aes128),
                Just(CipherAlg::Aes256)
            ]),
        )
            .prop_map(|(format, key, cipher)| Encryption {
                format,
                key,
                cipher,
            })
    }

    #[test]
    fn the_deadline_is_xdisks_own_option() {
        let n = p("rbd:pool/img:xdisk_deadline=7:rados_osd_op_timeout=5");
        assert_eq!(n.deadline, Some(Duration::from_secs(7)));
        assert_eq!(n.request_deadline(), Some(Duration::from_secs(7)));
        assert_eq!(n.options, vec![("rados_osd_op_timeout".into(), "5".into())]);
        assert_eq!(
            n.to_spec(),
            "rbd:pool/img:rados_osd_op_timeout=5:xdisk_deadline=7"
        );
        assert_eq!(RbdName::parse(&n.to_spec()).unwrap(), n);
        assert!(n.to_string().contains("xdisk_deadline=7"), "{n}");
        assert_eq!(p("rbd:pool/img").request_deadline(), Some(DEFAULT_DEADLINE));
        assert_eq!(p("rbd:pool/img:xdisk_deadline=0").request_deadline(), None);
        let n = p("rbd:pool/img:xdisk_lock=exclusive");
        assert!(n.exclusive && n.options.is_empty());
        assert_eq!(RbdName::parse(&n.to_spec()).unwrap(), n);
        assert!(!p("rbd:pool/img:xdisk_lock=auto").exclusive);
        assert!(RbdName::parse("rbd:pool/img:xdisk_lock=mine").is_err());
        for bad in ["-1", "1.5", "", "x", "86401", "99999999999999999999999"] {
            let e = RbdName::parse(&format!("rbd:pool/img:xdisk_deadline={bad}")).unwrap_err();
            assert!(e.0.contains("xdisk_deadline"), "{bad}: {e}");
        }
    }

    #[test]
    fn encryption_keys_are_xdisks_own_and_never_reach_ceph() {
        let n = p("rbd:pool/img:encrypt.format=luks:encrypt.key-file=/etc/k\\:1:id=u");
        assert!(n.options.is_empty(), "{:?}", n.options);
        assert_eq!(
            n.encrypt,
            Some(Encryption {
                format: LuksFormat::Luks1,
                key: KeySource::File("/etc/k:1".into()),
                cipher: None
            })
        );
        assert_eq!(RbdName::parse(&n.to_spec()).unwrap(), n);
        // The path is no secret: shown, so that a missing file can be told.
        assert!(n.to_string().contains("encrypt.key-file=/etc/k\\:1"), "{n}");
        let n = p(
            "rbd:pool/img:encrypt.format=luks2:encrypt.key-secret=sec0:encrypt.cipher-alg=aes-128",
        );
        let e = n.encrypt.clone().unwrap();
        assert_eq!(e.format, LuksFormat::Luks2);
        assert_eq!(e.key, KeySource::Secret("sec0".into()));
        assert_eq!(e.cipher, Some(CipherAlg::Aes128));
        assert_eq!(RbdName::parse(&n.to_spec()).unwrap(), n);
        let n = p("rbd:pool/img:xdisk_luks=raw");
        assert!(n.luks_raw && n.options.is_empty());
        assert_eq!(RbdName::parse(&n.to_spec()).unwrap(), n);
        assert!(!p("rbd:pool/img:xdisk_luks=refuse").luks_raw);
        for (s, why) in [
            ("rbd:p/i:encrypt.format=luks", "needs the passphrase"),
            ("rbd:p/i:encrypt.key-file=/k", "go with encrypt.format"),
            (
                "rbd:p/i:encrypt.cipher-alg=aes-256",
                "go with encrypt.format",
            ),
            (
                "rbd:p/i:encrypt.format=luks-any:encrypt.key-file=/k",
                "librbd 17",
            ),
            (
                "rbd:p/i:encrypt.format=aes:encrypt.key-file=/k",
                "luks or luks2",
            ),
            ("rbd:p/i:encrypt.format=luks:encrypt.key-file=", "empty"),
            (
                "rbd:p/i:encrypt.format=luks:encrypt.key-file=/k:encrypt.key-secret=s",
                "not both",
            ),
            (
                "rbd:p/i:encrypt.format=luks:encrypt.key-file=/k:encrypt.cipher-alg=des",
                "aes-128",
            ),
            (
                "rbd:p/i:encrypt.format=luks:encrypt.key-file=/k:xdisk_luks=raw",
                "not with",
            ),
            ("rbd:p/i:xdisk_luks=yes", "raw or refuse"),
        ] {
            let e = RbdName::parse(s).unwrap_err();
            assert!(e.0.contains(why), "{s}: {e}");
        }
        // A passphrase put in the name by mistake is refused without being echoed.
        let e = RbdName::parse("rbd:p/i:encrypt.format=luks:encrypt.key=SECRET").unwrap_err();
        assert!(
            e.0.contains("encrypt.key'") && !e.0.contains("SECRET"),
            "{e}"
        );
        let n = p("rbd:p/i:password=SECRET:rbd_passphrase=SECRET2");
        assert!(!n.to_string().contains("SECRET"), "{n}");
    }

    proptest! {
        #[test]
        fn hostile_input_never_panics(s in "rbd:[a-z/@:=\\\\é.]{0,40}") {
            let _ = RbdName::parse(&s);
        }

        #[test]
        fn arbitrary_bytes_never_panic(b in proptest::collection::vec(any::<u8>(), 0..64)) {
            let s = format!("rbd:{}", String::from_utf8_lossy(&b));
            if let Ok(n) = RbdName::parse(&s) {
                // What parses prints back to something that parses to the same name.
                prop_assert_eq!(RbdName::parse(&n.to_spec()).unwrap(), n);
            }
        }

        #[test]
        fn spec_round_trips(n in name()) {
            let s = n.to_spec();
            prop_assert_eq!(RbdName::parse(&s).unwrap(), n);
        }
    }
}
