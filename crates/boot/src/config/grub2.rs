//! GRUB 2 `grub.cfg`.
//!
//! GRUB's config is a shell-like script that GRUB runs; like pygrub we do not run it, we read
//! the parts that define the menu. The behaviour follows Xen 4.17's pygrub
//! (`tools/pygrub/src/GrubConf.py`, `Grub2ConfigFile`/`Grub2Image`, and `image_index` in
//! `tools/pygrub/src/pygrub`) and, where noted, GRUB's own meaning (GRUB manual,
//! "Shell-like scripting", "menuentry", "submenu", "default"; `grub-core/normal/menu.c`).
//!
//! What is read:
//! - `menuentry [options] TITLE [options] {` … `}`: one [`BootEntry`]. The title is the first
//!   argument that is not an option, unquoted as GRUB does (`'…'`, `"…"`, backslash, or bare;
//!   pygrub only accepts a quoted title and cuts it at the first quote of either kind).
//!   Options: `--class X`, `--users X`, `--hotkey X`, `--source X`, `--id X`,
//!   `--unrestricted`; `$menuentry_id_option` (which grub-mkconfig sets to `--id`) counts as
//!   `--id`.
//! - `submenu [options] TITLE {` … `}`: its entries are part of the flat entry list, in file
//!   order (so `--entry=N` counts every menuentry, as pygrub does); the tree is kept to
//!   resolve `default`.
//! - `function NAME {` … `}`: skipped with everything inside (braces counted, so a `{`…`}`
//!   inside the body does not end it early; pygrub stops at the first line starting `}`).
//! - Inside an entry: `linux`/`linux16`/`linuxefi PATH ARGS…` (kernel; ARGS are the rest of
//!   the command verbatim: inner spacing, quotes and `$variables` kept, ends trimmed —
//!   pygrub's rule, since pygrub does not expand variables either). A command ends at an
//!   unquoted `;` and a word starting with `#` starts a comment (GRUB's lexer, as in sh), so
//!   neither is part of the args; pygrub keeps the whole rest of the line. `initrd`/`initrd16`/
//!   `initrdefi FILE…` (the first file; pygrub takes the whole argument string as one path,
//!   which fails when there are several, e.g. a microcode image before the initramfs). The
//!   last such line of an entry wins (pygrub: the last assignment wins). A `(hd0,msdos1)` or
//!   `($root)` device prefix is stripped from paths (pygrub's `get_path`); `set root=` and
//!   `search` inside entries are ignored for paths.
//! - Xen entries (`multiboot`/`multiboot2 xen.gz` + `module`/`module2` lines, from
//!   grub-mkconfig's `20_linux_xen`): when an entry has no `linux` line, its first module is
//!   the kernel (path + args) and its second the initrd — the multiboot convention that
//!   pygrub applies to extlinux's `mboot.c32`. pygrub's GRUB 2 parser ignores these lines and
//!   finds no kernel in such an entry.
//! - Entries without any kernel line are kept in the list (`kernel: None`), as pygrub keeps
//!   them; the caller decides what to do when one is chosen.
//! - Top level, outside entries and functions: `set default=V` / `default=V` and
//!   `set timeout=N` / `timeout=N`. `if`/`else` is not evaluated: the last assignment in the
//!   file wins (pygrub's rule). A negative or non-numeric timeout gives `None`.
//!
//! The default (GRUB's meaning, `grub-core/normal/menu.c`: `get_entry_number`,
//! `menuentry_eq`, and the `>` handling when a submenu is entered):
//! - A value that is just a variable (`${saved_entry}`, `$saved_entry`, `"${next_entry}"`,
//!   any name) is looked up in the grubenv; unset or empty → entry 0. pygrub maps
//!   `${saved_entry}`/`${next_entry}` to 0 always. We do not evaluate grub-mkconfig's
//!   `if [ "${next_entry}" ]` one-shot block (the last `set default` wins): GRUB clears
//!   `next_entry` after using it, and a read-only reader that honoured it would boot the
//!   one-shot entry forever.
//! - The value is a path of levels separated by `>` (`>>` is a literal `>` in a title).
//!   Each level is a number (leading decimal digits, or `0x` hex, as `grub_strtoul` reads
//!   them) counting the items of that menu level — menuentries and submenus alike — or a
//!   title or `--id` of an item at that level (the first match). GRUB's meaning differs
//!   from pygrub's here: pygrub counts numbers in the flat list of every menuentry and, for a
//!   path, matches only the last level's title over the flat list. We follow GRUB because
//!   that is what the guest's own GRUB would boot; for configs without submenus (or with the
//!   submenu after the entries the number points at) both agree.
//! - Naming a submenu without going further picks that submenu's first entry; a level that
//!   does not resolve inside a submenu picks the submenu's first entry (GRUB falls back to
//!   item 0 of the menu it is showing); a first level that does not resolve gives entry 0.
//!
//! Limits: more than [`MAX_ENTRIES`] entries or nesting deeper than [`MAX_DEPTH`] is an
//! error; lines longer than [`MAX_LINE`] are skipped. Not supported (as in pygrub): line
//! continuations with a trailing backslash, quoted strings spanning lines, `source`/
//! `configfile`, `blscfg` (the caller reads BLS entries with [`super::bls`]).

use super::grubenv::GrubEnv;
use super::{
    non_empty, strip_device, BootConfig, BootEntry, ConfigKind, MAX_DEPTH, MAX_ENTRIES, MAX_LINE,
};
use crate::{Error, Result};

/// One word of a command: its text with quotes and escapes removed, where it lies in the raw
/// line, and whether any of it was quoted or escaped (a quoted `{` is not a brace).
#[derive(Debug, Clone)]
struct Word {
    text: String,
    end: usize,
    quoted: bool,
}

impl Word {
    fn is_bare(&self, s: &str) -> bool {
        !self.quoted && self.text == s
    }
}

/// Splits one line into commands (separated by unquoted `;`, and after a bare `{`), each a
/// list of words. A `#` at
/// the start of a word starts a comment that runs to the end of the line (GRUB's lexer, as
/// in sh). An unterminated quote runs to the end of the line.
fn tokenize(line: &str) -> Vec<Vec<Word>> {
    let mut commands: Vec<Vec<Word>> = Vec::new();
    let mut current: Vec<Word> = Vec::new();
    let mut chars = line.char_indices().peekable();
    while let Some(&(i, c)) = chars.peek() {
        if c == ' ' || c == '\t' || c == '\r' {
            chars.next();
            continue;
        }
        if c == ';' {
            chars.next();
            if !current.is_empty() {
                commands.push(std::mem::take(&mut current));
            }
            continue;
        }
        if c == '#' {
            break;
        }
        // A word.
        let mut end = i;
        let mut text = String::new();
        let mut quoted = false;
        while let Some(&(j, c)) = chars.peek() {
            match c {
                ' ' | '\t' | '\r' | ';' => break,
                '\'' => {
                    quoted = true;
                    chars.next();
                    end = j + 1;
                    for (k, q) in chars.by_ref() {
                        end = k + q.len_utf8();
                        if q == '\'' {
                            break;
                        }
                        text.push(q);
                    }
                }
                '"' => {
                    quoted = true;
                    chars.next();
                    end = j + 1;
                    while let Some((k, q)) = chars.next() {
                        end = k + q.len_utf8();
                        match q {
                            '"' => break,
                            '\\' => {
                                // In double quotes a backslash escapes only `"`, `\`, `$` and a
                                // newline; elsewhere it stays (sh, and GRUB's lexer).
                                match chars.peek() {
                                    Some(&(k2, n)) if matches!(n, '"' | '\\' | '$') => {
                                        text.push(n);
                                        end = k2 + n.len_utf8();
                                        chars.next();
                                    }
                                    _ => text.push('\\'),
                                }
                            }
                            _ => text.push(q),
                        }
                    }
                }
                '\\' => {
                    quoted = true;
                    chars.next();
                    end = j + 1;
                    if let Some((k, n)) = chars.next() {
                        text.push(n);
                        end = k + n.len_utf8();
                    }
                }
                _ => {
                    text.push(c);
                    end = j + c.len_utf8();
                    chars.next();
                }
            }
        }
        let opens = !quoted && text == "{";
        current.push(Word { text, end, quoted });
        // A bare `{` ends the command that opens a block (`menuentry 'x' { linux /k; }`).
        if opens {
            commands.push(std::mem::take(&mut current));
        }
    }
    if !current.is_empty() {
        commands.push(current);
    }
    commands
}

/// An item of one menu level: an entry (by its index in the flat list) or a submenu.
#[derive(Debug)]
enum Item {
    Entry {
        index: usize,
        title: String,
        id: Option<String>,
    },
    Submenu {
        title: String,
        id: Option<String>,
        items: Vec<Item>,
    },
}

impl Item {
    fn title(&self) -> &str {
        match self {
            Item::Entry { title, .. } | Item::Submenu { title, .. } => title,
        }
    }
    fn id(&self) -> Option<&str> {
        match self {
            Item::Entry { id, .. } | Item::Submenu { id, .. } => id.as_deref(),
        }
    }
}

/// What an open `{` belongs to.
#[derive(Debug)]
enum Frame {
    /// A submenu being filled: its title, id and the items read so far.
    Submenu {
        title: String,
        id: Option<String>,
        items: Vec<Item>,
    },
    /// A menuentry being read.
    Entry(Box<EntryState>),
    /// A function body, or any other brace block, whose contents we skip.
    Skip,
}

#[derive(Debug, Default)]
struct EntryState {
    title: String,
    id: Option<String>,
    kernel: Option<(String, String)>,
    initrd: Option<String>,
    /// `module`/`module2` lines (path, args) for multiboot entries; at most two kept.
    modules: Vec<(String, String)>,
}

impl EntryState {
    fn finish(self) -> BootEntry {
        let (kernel, args, initrd) = match self.kernel {
            Some((path, args)) => (non_empty(&path), args, self.initrd),
            None => {
                let mut modules = self.modules.into_iter();
                match modules.next() {
                    Some((path, args)) => (
                        non_empty(&path),
                        args,
                        modules.next().and_then(|m| non_empty(&m.0)),
                    ),
                    None => (None, String::new(), self.initrd),
                }
            }
        };
        BootEntry {
            title: self.title,
            kernel,
            initrd,
            args,
        }
    }
}

/// The title and id of a `menuentry`/`submenu` command (`words[0]` is the command), and
/// whether it ends with a bare `{`.
fn title_and_id(words: &[Word]) -> (String, Option<String>, bool) {
    let mut title: Option<String> = None;
    let mut id: Option<String> = None;
    let opens = words.last().is_some_and(|w| w.is_bare("{"));
    let body = if opens {
        words.get(1..words.len().saturating_sub(1)).unwrap_or(&[])
    } else {
        words.get(1..).unwrap_or(&[])
    };
    let mut it = body.iter();
    while let Some(w) = it.next() {
        let t = w.text.as_str();
        let is_id_var = t == "$menuentry_id_option" || t == "${menuentry_id_option}";
        if is_id_var || t == "--id" {
            if let Some(v) = it.next() {
                id = Some(v.text.clone());
            }
        } else if let Some(opt) = t.strip_prefix("--") {
            if let Some((name, value)) = opt.split_once('=') {
                if name == "id" {
                    id = Some(value.to_string());
                }
            } else if matches!(opt, "class" | "users" | "hotkey" | "source") {
                it.next();
            }
            // `--unrestricted` and unknown options take no argument.
        } else if title.is_none() {
            title = Some(w.text.clone());
        }
    }
    (title.unwrap_or_default(), id, opens)
}

/// Removes leading `then`/`else`/`do` keywords, so that `then set default=1` reads as `set`.
fn strip_keywords(words: &[Word]) -> &[Word] {
    let mut w = words;
    while let Some(first) = w.first() {
        if !first.quoted && matches!(first.text.as_str(), "then" | "else" | "do") {
            w = w.get(1..).unwrap_or(&[]);
        } else {
            break;
        }
    }
    w
}

/// The `name=value` of a `set` command or a bare assignment, if `words` is one.
fn assignment(words: &[Word]) -> Option<(&str, &str)> {
    let first = words.first()?;
    let w = if first.is_bare("set") {
        words.get(1)?
    } else {
        first
    };
    let (name, value) = w.text.split_once('=')?;
    if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return None;
    }
    Some((name, value))
}

struct Parser<'e> {
    env: &'e GrubEnv,
    stack: Vec<Frame>,
    top: Vec<Item>,
    entries: Vec<BootEntry>,
    default: Option<String>,
    timeout: Option<u32>,
    /// A `menuentry`/`submenu`/`function` whose `{` has not been seen yet.
    pending: Option<Frame>,
}

impl Parser<'_> {
    fn push(&mut self, frame: Frame) -> Result<()> {
        if self.stack.len() >= MAX_DEPTH {
            return Err(Error::Config(format!(
                "grub.cfg: blocks nested deeper than {MAX_DEPTH}"
            )));
        }
        self.stack.push(frame);
        Ok(())
    }

    fn add_item(&mut self, item: Item) {
        // An item belongs to the innermost submenu, or to the top level; entries inside a
        // skipped block (a function body) never get here.
        match self.stack.last_mut() {
            Some(Frame::Submenu { items, .. }) => items.push(item),
            _ => self.top.push(item),
        }
    }

    fn close(&mut self) -> Result<()> {
        match self.stack.pop() {
            None => {} // A stray `}`: pygrub raises an error; we ignore it.
            Some(Frame::Skip) => {}
            Some(Frame::Entry(state)) => {
                if self.entries.len() >= MAX_ENTRIES {
                    return Err(Error::Config(format!(
                        "grub.cfg: more than {MAX_ENTRIES} menu entries"
                    )));
                }
                let index = self.entries.len();
                let title = state.title.clone();
                let id = state.id.clone();
                self.entries.push(state.finish());
                self.add_item(Item::Entry { index, title, id });
            }
            Some(Frame::Submenu { title, id, items }) => {
                self.add_item(Item::Submenu { title, id, items });
            }
        }
        Ok(())
    }

    fn command(&mut self, line: &str, words: &[Word]) -> Result<()> {
        let words = strip_keywords(words);
        let Some(first) = words.first() else {
            return Ok(());
        };

        // A `{` on its own, opening a block whose command was on an earlier line.
        if first.is_bare("{") {
            let frame = self.pending.take().unwrap_or(Frame::Skip);
            return self.push(frame);
        }
        self.pending = None;

        if first.is_bare("}") {
            self.close()?;
            // Anything after `}` on the same command is ignored.
            return Ok(());
        }

        let opens = words.last().is_some_and(|w| w.is_bare("{"));
        let cmd = if first.quoted {
            ""
        } else {
            first.text.as_str()
        };

        // Inside a function body or another skipped block: only braces matter.
        if self.stack.iter().any(|f| matches!(f, Frame::Skip)) {
            if opens {
                self.push(Frame::Skip)?;
            }
            return Ok(());
        }

        // Inside a menuentry.
        if let Some(Frame::Entry(state)) = self.stack.last_mut() {
            match cmd {
                "linux" | "linux16" | "linuxefi" => {
                    if let Some(path) = words.get(1) {
                        let rest_start = path.end;
                        let rest_end = words.last().map_or(rest_start, |w| w.end);
                        let args = line.get(rest_start..rest_end).unwrap_or("").trim();
                        state.kernel =
                            Some((strip_device(&path.text).to_string(), args.to_string()));
                    }
                }
                "initrd" | "initrd16" | "initrdefi" => {
                    if let Some(path) = words.get(1) {
                        state.initrd = non_empty(strip_device(&path.text));
                    }
                }
                "module" | "module2" => {
                    // `module [--nounzip] PATH ARGS…`
                    let mut rest = words.get(1..).unwrap_or(&[]);
                    while rest.first().is_some_and(|w| w.text.starts_with("--")) {
                        rest = rest.get(1..).unwrap_or(&[]);
                    }
                    if let Some(path) = rest.first() {
                        if state.modules.len() < 2 {
                            let rest_end = words.last().map_or(path.end, |w| w.end);
                            let args = line.get(path.end..rest_end).unwrap_or("").trim();
                            state
                                .modules
                                .push((strip_device(&path.text).to_string(), args.to_string()));
                        }
                    }
                }
                "menuentry" | "submenu" | "function" => {
                    // Nested definitions run only when the entry is booted: skip them.
                    if opens {
                        self.push(Frame::Skip)?;
                    } else {
                        self.pending = Some(Frame::Skip);
                    }
                }
                _ => {
                    if opens {
                        self.push(Frame::Skip)?;
                    }
                }
            }
            return Ok(());
        }

        // Top level or directly inside a submenu.
        match cmd {
            "menuentry" => {
                let (title, id, opens) = title_and_id(words);
                let frame = Frame::Entry(Box::new(EntryState {
                    title,
                    id,
                    ..EntryState::default()
                }));
                if opens {
                    self.push(frame)?;
                } else {
                    self.pending = Some(frame);
                }
            }
            "submenu" => {
                let (title, id, opens) = title_and_id(words);
                let frame = Frame::Submenu {
                    title,
                    id,
                    items: Vec::new(),
                };
                if opens {
                    self.push(frame)?;
                } else {
                    self.pending = Some(frame);
                }
            }
            "function" => {
                if opens {
                    self.push(Frame::Skip)?;
                } else {
                    self.pending = Some(Frame::Skip);
                }
            }
            _ => {
                if let Some((name, value)) = assignment(words) {
                    // Only top-level settings count (not those inside a submenu, which
                    // GRUB runs only when the submenu is entered).
                    if self.stack.is_empty() {
                        match name {
                            "default" => self.default = Some(value.to_string()),
                            "timeout" => self.timeout = value.trim().parse::<u32>().ok(),
                            _ => {}
                        }
                    }
                } else if opens {
                    self.push(Frame::Skip)?;
                }
            }
        }
        Ok(())
    }

    fn finish(mut self) -> Result<BootConfig> {
        // pygrub raises an error on a menuentry left open at the end of the file; we close
        // every open block, keeping what was read.
        while !self.stack.is_empty() {
            self.close()?;
        }
        let default = match self.default.as_deref() {
            None => 0,
            Some(v) => {
                let value = expand_whole_variable(v, self.env);
                resolve_default(&self.top, value.as_deref().unwrap_or(""))
            }
        };
        let default = if default < self.entries.len() {
            default
        } else {
            0
        };
        Ok(BootConfig {
            kind: ConfigKind::Grub2,
            entries: self.entries,
            default,
            timeout: self.timeout,
        })
    }
}

/// When `v` is exactly one variable reference (`$name` or `${name}`), its value from the
/// grubenv (`None` when unset); otherwise `v` itself.
fn expand_whole_variable(v: &str, env: &GrubEnv) -> Option<String> {
    let v = v.trim();
    let name = if let Some(inner) = v.strip_prefix("${").and_then(|s| s.strip_suffix('}')) {
        Some(inner)
    } else {
        v.strip_prefix('$')
    };
    match name {
        Some(n) if !n.is_empty() && n.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') => {
            env.get(n).map(str::to_string)
        }
        _ => Some(v.to_string()),
    }
}

/// Splits a default path at single `>`; `>>` stands for a literal `>` (GRUB's
/// `menuentry_eq`).
fn split_path(spec: &str) -> Vec<String> {
    let mut parts = vec![String::new()];
    let mut chars = spec.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '>' {
            if chars.peek() == Some(&'>') {
                chars.next();
                if let Some(last) = parts.last_mut() {
                    last.push('>');
                }
            } else {
                // Bounded: a path has at most MAX_DEPTH useful levels.
                if parts.len() > MAX_DEPTH {
                    break;
                }
                parts.push(String::new());
            }
        } else if let Some(last) = parts.last_mut() {
            last.push(c);
        }
    }
    parts
}

/// A number as `grub_strtoul(s, 0, 0)` reads the start of a default value: `0x` hex or
/// decimal digits, trailing text ignored; `None` when there are no digits.
fn leading_number(s: &str) -> Option<usize> {
    let s = s.trim_start();
    let (digits, radix) = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) if hex.starts_with(|c: char| c.is_ascii_hexdigit()) => (hex, 16),
        _ => (s, 10),
    };
    let end = digits
        .find(|c: char| !c.is_digit(radix))
        .unwrap_or(digits.len());
    let d = digits.get(..end)?;
    if d.is_empty() {
        return None;
    }
    // Too large for usize: no such item.
    Some(usize::from_str_radix(d, radix).unwrap_or(usize::MAX))
}

/// The flat index of the first entry under `item` (the entry itself, or a submenu's first).
fn first_entry(item: &Item, depth: usize) -> Option<usize> {
    if depth > MAX_DEPTH {
        return None;
    }
    match item {
        Item::Entry { index, .. } => Some(*index),
        Item::Submenu { items, .. } => items.iter().find_map(|i| first_entry(i, depth + 1)),
    }
}

/// Resolves a default value against the menu tree (GRUB's rules, see the module docs).
fn resolve_default(top: &[Item], value: &str) -> usize {
    let parts = split_path(value);
    let mut level = top;
    for (depth, part) in parts.iter().enumerate() {
        let found = match leading_number(part) {
            Some(n) => level.get(n),
            None => level
                .iter()
                .find(|i| i.title() == part.as_str() || i.id() == Some(part.as_str())),
        };
        let Some(item) = found else {
            // Top level: GRUB falls back to item 0; inside a submenu, to its item 0.
            return if depth == 0 {
                0
            } else {
                level.iter().find_map(|i| first_entry(i, 0)).unwrap_or(0)
            };
        };
        match item {
            Item::Entry { index, .. } => return *index,
            Item::Submenu { items, .. } => {
                if depth + 1 >= parts.len() {
                    return first_entry(item, 0).unwrap_or(0);
                }
                level = items;
            }
        }
    }
    0
}

/// Parses a `grub.cfg`. `env` is the grubenv next to it (empty when there is none).
pub fn parse(text: &str, env: &GrubEnv) -> Result<BootConfig> {
    let mut parser = Parser {
        env,
        stack: Vec::new(),
        top: Vec::new(),
        entries: Vec::new(),
        default: None,
        timeout: None,
        pending: None,
    };
    for raw in text.split('\n') {
        if raw.len() > MAX_LINE {
            continue;
        }
        for words in tokenize(raw) {
            parser.command(raw, &words)?;
        }
    }
    parser.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokenizer_keeps_positions_and_unquotes() {
        let line = r#"menuentry 'It'\''s "x"' --class a $menuentry_id_option 'id-1' {"#;
        let cmds = tokenize(line);
        assert_eq!(cmds.len(), 1);
        let words = &cmds[0];
        assert_eq!(words[1].text, "It's \"x\"");
        let (title, id, opens) = title_and_id(words);
        assert_eq!(title, "It's \"x\"");
        assert_eq!(id.as_deref(), Some("id-1"));
        assert!(opens);
    }

    #[test]
    fn path_split_and_numbers() {
        assert_eq!(split_path("a>b>>c>d"), vec!["a", "b>c", "d"]);
        assert_eq!(leading_number("12>3"), Some(12));
        assert_eq!(leading_number("0x10"), Some(16));
        assert_eq!(leading_number("Debian"), None);
    }
}
