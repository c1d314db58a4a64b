//! Boot configurations: GRUB 2 (`grub.cfg`), GRUB legacy (`menu.lst`/`grub.conf`),
//! extlinux/syslinux/isolinux, and Boot Loader Specification entries, parsed into one shape.
//! Parsers take text (and, where the format needs it, GRUB's environment block or the
//! config's directory) and never touch the disk themselves.

pub mod bls;
pub mod extlinux;
pub mod grub2;
pub mod grubenv;
pub mod legacy;

/// Which kind of config an entry list came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfigKind {
    /// GRUB 2's `grub.cfg` ([`grub2`]).
    Grub2,
    /// GRUB legacy's `menu.lst` or `grub.conf` ([`legacy`]).
    GrubLegacy,
    /// extlinux/syslinux/isolinux configs ([`extlinux`]).
    Extlinux,
    /// Boot Loader Specification entries, one file per entry ([`bls`]).
    Bls,
}

/// One boot entry. Paths are inside the filesystem the config was found on.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BootEntry {
    /// The entry's title, what `--entry=TITLE` matches (GRUB `menuentry`/`title`, syslinux
    /// `LABEL`, BLS `title`).
    pub title: String,
    /// `None` when the entry has no kernel line (a GRUB `fwsetup` or chainloader entry, a
    /// syslinux `LOCALBOOT` label, ...). Such entries are kept so that indexes match the menu
    /// (and pygrub's `--entry=N`); choosing one is the caller's error to report.
    pub kernel: Option<String>,
    /// The ramdisk (initrd) path, if the entry loads one (the first, if it names several).
    pub initrd: Option<String>,
    /// The kernel command line (verbatim per the format's rules).
    pub args: String,
}

/// A parsed config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootConfig {
    /// The format it was parsed as.
    pub kind: ConfigKind,
    /// Entries in file order (for GRUB 2: every menuentry, including those in submenus).
    pub entries: Vec<BootEntry>,
    /// The default entry's index into `entries` (resolved by the format's rules; 0 when the
    /// config names none or names one that does not exist).
    pub default: usize,
    /// Menu timeout in seconds, if the config sets one.
    pub timeout: Option<u32>,
}

/// Most entries one config may define; more is an error (no real config comes near).
pub const MAX_ENTRIES: usize = 4096;
/// Deepest nesting of blocks (`submenu`, `menuentry`, `function`, braces) in a GRUB 2 config.
pub const MAX_DEPTH: usize = 32;
/// Longest line the parsers look at; longer lines are skipped as if they were comments
/// (Linux's command line is at most a few KiB, so nothing useful is lost).
pub const MAX_LINE: usize = 64 * 1024;

/// Strips a GRUB device prefix such as `(hd0,msdos1)` or `($root)` from a path, as pygrub's
/// `GrubConf.get_path` does: when the path starts with `(`, everything up to the first `)`
/// goes. A `(` without `)` is kept as is (pygrub raises an error; the path then simply does
/// not exist in the filesystem).
pub fn strip_device(path: &str) -> &str {
    if path.starts_with('(') {
        if let Some(close) = path.find(')') {
            return path.get(close + 1..).unwrap_or("");
        }
    }
    path
}

/// Splits `s` (already trimmed) into its first whitespace-separated word and the rest, the
/// rest with leading whitespace removed and its inner spacing kept (Python's
/// `s.split(None, 1)`, which pygrub uses for `kernel`/`linux` lines).
pub fn split_first_word(s: &str) -> (&str, &str) {
    let s = s.trim_start();
    match s.find(char::is_whitespace) {
        Some(i) => {
            let (a, b) = s.split_at(i);
            (a, b.trim_start())
        }
        None => (s, ""),
    }
}

/// pygrub's `grub_split(s, 1)`: a directive and its argument are separated by the first `=`
/// when it comes before the first space or tab (`default=0`), else by whitespace
/// (`default 0`). The argument is trimmed.
pub fn split_directive(line: &str) -> (&str, &str) {
    let line = line.trim();
    let ws = line.find([' ', '\t']);
    match line.find('=') {
        Some(eq) if ws.is_none_or(|w| eq < w) => {
            let cmd = line.get(..eq).unwrap_or("");
            let arg = line.get(eq + 1..).unwrap_or("");
            (cmd.trim(), arg.trim())
        }
        _ => {
            let (a, b) = split_first_word(line);
            (a, b.trim())
        }
    }
}

/// A path or string of `kernel`/`initrd` values, empty → `None`.
pub(crate) fn non_empty(s: &str) -> Option<String> {
    if s.is_empty() {
        None
    } else {
        Some(s.to_string())
    }
}

/// Lines of `text`, each trimmed, over-long ones dropped (see [`MAX_LINE`]).
pub(crate) fn lines(text: &str) -> impl Iterator<Item = &str> {
    text.split('\n')
        .filter(|l| l.len() <= MAX_LINE)
        .map(|l| l.trim())
}
