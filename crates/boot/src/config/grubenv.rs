//! GRUB's environment block (`/boot/grub/grubenv`, `/boot/grub2/grubenv`), read-only.
//!
//! Format (GRUB's `grub-core/lib/envblk.c`, written by `grub-editenv` and `save_env`): a
//! 1024-byte file starting with the signature line `# GRUB Environment Block`, then one
//! `name=value` per line, then `#` padding up to the block size. When GRUB writes a value it
//! puts a backslash before every `\` and every newline in it (`grub_envblk_set`), so a value
//! may span lines; reading undoes that (a backslash takes the next character literally).
//! Lines that start with `#` and lines without `=` are skipped, as GRUB's iterator does.
//!
//! We are lenient where GRUB is not: a missing signature is accepted (the block is still
//! parsed) because the only use of the result is to resolve `saved_entry`/`next_entry` and
//! BLS variables, and a wrong value there only changes which entry is the default.

/// Most variables kept (a real grubenv holds a handful; the block is 1 KiB).
const MAX_VARS: usize = 1024;

/// The variables of a GRUB environment block, in file order (the first of duplicate names
/// wins on lookup, as GRUB's `load_env` sets them in order and the block never holds
/// duplicates when GRUB wrote it).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GrubEnv {
    vars: Vec<(String, String)>,
}

impl GrubEnv {
    /// An empty environment (no grubenv found).
    pub fn new() -> GrubEnv {
        GrubEnv::default()
    }

    /// Parses the text of an environment block. Never fails: anything unparseable is skipped.
    pub fn parse(text: &str) -> GrubEnv {
        let mut vars: Vec<(String, String)> = Vec::new();
        let mut chars = text.chars().peekable();
        // One logical line at a time: `line` collects characters up to an unescaped newline,
        // undoing the backslash escapes. A comment is recognised by its first raw character.
        loop {
            if chars.peek().is_none() {
                break;
            }
            let first = chars.peek().copied();
            let mut line = String::new();
            let mut value_start: Option<usize> = None;
            while let Some(c) = chars.next() {
                match c {
                    '\n' => break,
                    '\\' => {
                        // GRUB: a backslash makes the next character literal (even a newline).
                        if let Some(n) = chars.next() {
                            line.push(n);
                        }
                    }
                    '=' if value_start.is_none() => {
                        line.push('=');
                        value_start = Some(line.len());
                    }
                    _ => line.push(c),
                }
            }
            if first == Some('#') {
                continue;
            }
            let Some(vs) = value_start else { continue };
            let name = line.get(..vs.saturating_sub(1)).unwrap_or("");
            let value = line.get(vs..).unwrap_or("");
            if name.is_empty() {
                continue;
            }
            if vars.len() >= MAX_VARS {
                break;
            }
            vars.push((name.to_string(), value.to_string()));
        }
        GrubEnv { vars }
    }

    /// The value of `key`, if the block sets it.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.vars
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// Sets (or replaces) a variable; for callers and tests that build an environment.
    pub fn set(&mut self, key: &str, value: &str) {
        if let Some(slot) = self.vars.iter_mut().find(|(k, _)| k == key) {
            slot.1 = value.to_string();
        } else if self.vars.len() < MAX_VARS {
            self.vars.push((key.to_string(), value.to_string()));
        }
    }

    /// All variables in file order.
    pub fn vars(&self) -> impl Iterator<Item = (&str, &str)> {
        self.vars.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// True when no variable is set.
    pub fn is_empty(&self) -> bool {
        self.vars.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_block_with_padding_and_escapes() {
        let mut text = String::from(
            "# GRUB Environment Block\nsaved_entry=abc-5.14\nkernelopts=root=/dev/vda1 ro\nodd=a\\\\b\\\nc\n",
        );
        while text.len() < 1024 {
            text.push('#');
        }
        let env = GrubEnv::parse(&text);
        assert_eq!(env.get("saved_entry"), Some("abc-5.14"));
        assert_eq!(env.get("kernelopts"), Some("root=/dev/vda1 ro"));
        assert_eq!(env.get("odd"), Some("a\\b\nc"));
        assert_eq!(env.get("missing"), None);
        assert_eq!(env.vars().count(), 3);
    }
}
