//! Boot Loader Specification entries (`/loader/entries/*.conf`, `/boot/loader/entries/*.conf`)
//! as GRUB's `blscfg` command reads them (Fedora/RHEL's GRUB, `grub-core/commands/blscfg.c`).
//! pygrub 4.17 does not read BLS entries at all; RHEL 8+/Fedora 30+ guests have a grub.cfg
//! that only says `blscfg`, so without this there is nothing to boot.
//!
//! - Each entry is one file; its id is the file name without `.conf`. A line is
//!   `KEY VALUE`: the key runs to the first space (or tab), the value starts after the
//!   blanks that follow and is trimmed; `#` lines are comments. Keys used: `title` (the first;
//!   when missing the `version`, else the id — blscfg shows the `linux` path instead),
//!   `linux` (the first; an entry without one is skipped, as blscfg does), `initrd` (every
//!   line may name several files; the first file of the first line is taken), `options` (the
//!   first; when missing, grubenv's `default_kernelopts`, as blscfg does). `version`,
//!   `machine-id` and `sort-key` are read but, like blscfg, not used for ordering. blscfg stops
//!   reading a file at a line without a value (such as a blank line); we skip such lines.
//! - `$name` and `${name}` in `options` are replaced by grubenv values (`$kernelopts`,
//!   `$tuned_params`, `$tuned_initrd`); an unset or empty variable is dropped together with
//!   the extra blank it leaves, so `root=x $tuned_params quiet` becomes `root=x quiet`.
//!   blscfg expands the same way (its `expand_val`), from the environment GRUB loaded from the
//!   grubenv.
//! - Order: newest first, comparing ids as blscfg's `bls_cmp` does: the id is split like an
//!   RPM name-version-release at its last two `-`, and name, version, release are compared in
//!   turn with rpmvercmp (blscfg's `vercmp`: alphanumeric segments, digits beat letters, `~`
//!   sorts first, `+` as blscfg handles it). Two entries comparing equal: blscfg keeps the
//!   first one read and drops the other; so do we. (The BLS document itself says to sort by
//!   `sort-key`, then `machine-id`, then `version`; GRUB does not, and we follow GRUB since
//!   that is what the guest boots.)
//! - Default: grubenv's `saved_entry` naming an id (grub.cfg's `set default="${saved_entry}"`
//!   after `blscfg`), else a title, else a number (GRUB's `default` rules, see
//!   [`super::grub2`]); otherwise entry 0, the newest.
//!
//! Limits: the caller bounds the number of files (and each file's size); more than
//! [`MAX_ENTRIES`] entries is an error; lines longer than [`super::MAX_LINE`] are skipped.

use super::grubenv::GrubEnv;
use super::{lines, non_empty, split_first_word, BootConfig, BootEntry, ConfigKind, MAX_ENTRIES};
use crate::{Error, Result};
use std::cmp::Ordering;

/// blscfg's `vercmp` (rpmvercmp with blscfg's `+` handling) on bytes; `Greater` when `a` is
/// newer.
pub fn vercmp(a: &str, b: &str) -> Ordering {
    if a == b {
        return Ordering::Equal;
    }
    let a = a.as_bytes();
    let b = b.as_bytes();
    let (mut i, mut j) = (0usize, 0usize);
    let at = |s: &[u8], k: usize| s.get(k).copied().unwrap_or(0);
    let is_sep = |c: u8| c != 0 && !c.is_ascii_alphanumeric() && c != b'~' && c != b'+';
    // Each pass consumes at least one byte of `a` or `b`, so the loop is bounded.
    while at(a, i) != 0 || at(b, j) != 0 {
        while is_sep(at(a, i)) {
            i += 1;
        }
        while is_sep(at(b, j)) {
            j += 1;
        }
        let (ca, cb) = (at(a, i), at(b, j));
        if ca == b'~' || cb == b'~' {
            if ca != b'~' {
                return Ordering::Greater;
            }
            if cb != b'~' {
                return Ordering::Less;
            }
            i += 1;
            j += 1;
            continue;
        }
        if ca == b'+' || cb == b'+' {
            if ca == 0 {
                return Ordering::Less;
            }
            if cb == 0 {
                return Ordering::Greater;
            }
            if ca != b'+' {
                return Ordering::Greater;
            }
            if cb != b'+' {
                return Ordering::Less;
            }
            i += 1;
            j += 1;
            continue;
        }
        if ca == 0 || cb == 0 {
            break;
        }
        let numeric = ca.is_ascii_digit();
        let seg = |s: &[u8], start: usize| -> usize {
            let mut k = start;
            while at(s, k) != 0
                && (if numeric {
                    at(s, k).is_ascii_digit()
                } else {
                    at(s, k).is_ascii_alphabetic()
                })
            {
                k += 1;
            }
            k
        };
        let (ea, eb) = (seg(a, i), seg(b, j));
        if eb == j {
            // Different kinds of segment: numeric is newer than alphabetic.
            return if numeric {
                Ordering::Greater
            } else {
                Ordering::Less
            };
        }
        let mut sa = a.get(i..ea).unwrap_or(&[]);
        let mut sb = b.get(j..eb).unwrap_or(&[]);
        if numeric {
            while sa.first() == Some(&b'0') {
                sa = sa.get(1..).unwrap_or(&[]);
            }
            while sb.first() == Some(&b'0') {
                sb = sb.get(1..).unwrap_or(&[]);
            }
            match sa.len().cmp(&sb.len()) {
                Ordering::Equal => {}
                other => return other,
            }
        }
        match sa.cmp(sb) {
            Ordering::Equal => {}
            other => return other,
        }
        i = ea;
        j = eb;
    }
    match (at(a, i) == 0, at(b, j) == 0) {
        (true, true) => Ordering::Equal,
        (true, false) => Ordering::Less,
        _ => Ordering::Greater,
    }
}

/// blscfg's `split_package_string`: (name, version, release) of an id.
fn split_nvr(id: &str) -> (&str, &str, &str) {
    match id.rsplit_once('-') {
        None => (id, "", ""),
        Some((head, release)) => match head.rsplit_once('-') {
            None => (head, release, ""),
            Some((name, version)) => (name, version, release),
        },
    }
}

/// blscfg's `bls_cmp`: `Greater` when entry id `a` is newer than `b`.
pub fn bls_cmp(a: &str, b: &str) -> Ordering {
    let (na, va, ra) = split_nvr(a);
    let (nb, vb, rb) = split_nvr(b);
    vercmp(na, nb)
        .then_with(|| vercmp(va, vb))
        .then_with(|| vercmp(ra, rb))
}

/// Expands `$name` and `${name}` from `env`, dropping unset/empty ones with the blank they
/// leave behind.
pub fn expand(value: &str, env: &GrubEnv) -> String {
    let mut out = String::with_capacity(value.len());
    let mut rest = value;
    // After an empty expansion, blanks that follow are dropped when a blank precedes.
    let mut drop_blank = false;
    while let Some(c) = rest.chars().next() {
        if drop_blank && (c == ' ' || c == '\t') && (out.is_empty() || out.ends_with([' ', '\t'])) {
            rest = rest.get(1..).unwrap_or("");
            continue;
        }
        drop_blank = false;
        if c == '$' {
            let after = rest.get(1..).unwrap_or("");
            let (name, consumed) = if let Some(braced) = after.strip_prefix('{') {
                match braced.find('}') {
                    Some(close) => (braced.get(..close).unwrap_or(""), close + 3),
                    None => ("", 0),
                }
            } else {
                let n = after
                    .find(|ch: char| !(ch.is_ascii_alphanumeric() || ch == '_'))
                    .unwrap_or(after.len());
                (after.get(..n).unwrap_or(""), n + 1)
            };
            let valid = !name.is_empty()
                && name
                    .chars()
                    .all(|ch| ch.is_ascii_alphanumeric() || ch == '_');
            if valid {
                let v = env.get(name).unwrap_or("").trim();
                if v.is_empty() {
                    drop_blank = true;
                } else {
                    out.push_str(v);
                }
                rest = rest.get(consumed..).unwrap_or("");
                continue;
            }
        }
        out.push(c);
        rest = rest.get(c.len_utf8()..).unwrap_or("");
    }
    out.trim().to_string()
}

/// A stable merge sort that tolerates a comparison which is not a total order.
fn merge_sort_by<T, F: Fn(&T, &T) -> Ordering>(v: &mut Vec<T>, cmp: &F) {
    if v.len() <= 1 {
        return;
    }
    let mut right = v.split_off(v.len() / 2);
    merge_sort_by(v, cmp);
    merge_sort_by(&mut right, cmp);
    let left = std::mem::take(v);
    v.reserve(left.len() + right.len());
    let mut l = left.into_iter().peekable();
    let mut r = right.into_iter().peekable();
    loop {
        let take_right = match (l.peek(), r.peek()) {
            (Some(a), Some(b)) => cmp(b, a) == Ordering::Less,
            (Some(_), None) => false,
            (None, Some(_)) => true,
            (None, None) => break,
        };
        let next = if take_right { r.next() } else { l.next() };
        if let Some(x) = next {
            v.push(x);
        }
    }
}

struct Parsed {
    id: String,
    title: Option<String>,
    version: Option<String>,
    linux: Option<String>,
    initrd: Option<String>,
    options: Option<String>,
}

fn parse_one(file_name: &str, text: &str) -> Parsed {
    let id = file_name.strip_suffix(".conf").unwrap_or(file_name);
    let mut p = Parsed {
        id: id.to_string(),
        title: None,
        version: None,
        linux: None,
        initrd: None,
        options: None,
    };
    for line in lines(text) {
        if line.starts_with('#') {
            continue;
        }
        let sep = line.find(' ').or_else(|| line.find('\t'));
        let Some(sep) = sep else { continue };
        let key = line.get(..sep).unwrap_or("");
        let value = line.get(sep..).unwrap_or("").trim();
        if value.is_empty() {
            continue;
        }
        let first = |slot: &mut Option<String>| {
            if slot.is_none() {
                *slot = Some(value.to_string());
            }
        };
        match key {
            "title" => first(&mut p.title),
            "version" => first(&mut p.version),
            "linux" => first(&mut p.linux),
            "options" => first(&mut p.options),
            "initrd" if p.initrd.is_none() => {
                p.initrd = non_empty(split_first_word(value).0);
            }
            _ => {}
        }
    }
    p
}

/// Parses BLS entries: `(file name, contents)` pairs in any order. `env` is the grubenv
/// (for `saved_entry` and option variables).
pub fn parse(entries: &[(String, String)], env: &GrubEnv) -> Result<BootConfig> {
    if entries.len() > MAX_ENTRIES {
        return Err(Error::Config(format!(
            "BLS: more than {MAX_ENTRIES} entries"
        )));
    }
    let mut parsed: Vec<Parsed> = entries
        .iter()
        .map(|(name, text)| parse_one(name, text))
        .filter(|p| p.linux.is_some())
        .collect();
    // Newest first. `slice::sort_by` may panic when the comparison is not a total order, and
    // rpmvercmp on hostile names need not be one, so a merge sort of our own (stable, never
    // panics, O(n log n)) does it.
    merge_sort_by(&mut parsed, &|a: &Parsed, b: &Parsed| bls_cmp(&b.id, &a.id));
    // blscfg refuses an entry comparing equal to one it already has.
    let mut kept: Vec<Parsed> = Vec::with_capacity(parsed.len());
    for p in parsed {
        if kept
            .last()
            .is_some_and(|q| bls_cmp(&q.id, &p.id) == Ordering::Equal)
        {
            continue;
        }
        kept.push(p);
    }
    let parsed = kept;

    let default_kernelopts = env.get("default_kernelopts");
    let ids: Vec<String> = parsed.iter().map(|p| p.id.clone()).collect();
    let boot: Vec<BootEntry> = parsed
        .into_iter()
        .map(|p| {
            let options = p.options.as_deref().or(default_kernelopts).unwrap_or("");
            BootEntry {
                title: p.title.or(p.version).unwrap_or_else(|| p.id.clone()),
                kernel: p.linux,
                initrd: p.initrd,
                args: expand(options, env),
            }
        })
        .collect();

    let default = match env.get("saved_entry").map(str::trim) {
        Some(saved) if !saved.is_empty() => ids
            .iter()
            .position(|id| id == saved)
            .or_else(|| boot.iter().position(|e| e.title == saved))
            .or_else(|| {
                if saved.bytes().all(|b| b.is_ascii_digit()) {
                    saved.parse::<usize>().ok()
                } else {
                    None
                }
            })
            .filter(|&i| i < boot.len())
            .unwrap_or(0),
        _ => 0,
    };
    Ok(BootConfig {
        kind: ConfigKind::Bls,
        entries: boot,
        default,
        timeout: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rpm_version_order() {
        use Ordering::*;
        assert_eq!(vercmp("1.0", "1.0"), Equal);
        assert_eq!(vercmp("1.0", "1.1"), Less);
        assert_eq!(vercmp("1.10", "1.9"), Greater);
        assert_eq!(vercmp("1.0~rc1", "1.0"), Less);
        assert_eq!(vercmp("1.0a", "1.0"), Greater);
        assert_eq!(vercmp("1a", "1.1"), Less);
        assert_eq!(vercmp("5.14.0-70.el9", "5.14.0-162.el9"), Less);
        assert_eq!(vercmp("001", "1"), Equal);
        assert_eq!(
            bls_cmp(
                "abc-5.14.0-70.el9.x86_64",
                "abc-5.14.0-162.6.1.el9_1.x86_64"
            ),
            Less
        );
        assert_eq!(bls_cmp("abc-6.0.0-1.fc37", "abc-5.19.0-1.fc37"), Greater);
    }

    #[test]
    fn variables_expand_and_empty_ones_vanish() {
        let mut env = GrubEnv::new();
        env.set("kernelopts", "root=/dev/vda2 ro");
        env.set("empty", "");
        assert_eq!(
            expand("$kernelopts $tuned_params quiet ${empty} x", &env),
            "root=/dev/vda2 ro quiet x"
        );
        assert_eq!(expand("${kernelopts}", &env), "root=/dev/vda2 ro");
        assert_eq!(expand("a $ b ${ c", &env), "a $ b ${ c");
        assert_eq!(expand("$missing", &env), "");
    }
}
