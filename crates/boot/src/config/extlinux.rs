//! extlinux / syslinux / isolinux configs (`extlinux.conf`, `syslinux.cfg`, `isolinux.cfg`).
//!
//! Follows Xen 4.17's pygrub (`tools/pygrub/src/ExtLinuxConf.py`) and, where pygrub leaves
//! things out, the syslinux documentation (`doc/syslinux.txt`, `doc/menu.txt`):
//! - Keywords are case-insensitive; a keyword and its argument are split as pygrub's
//!   `grub_split` does. Lines are trimmed; blank lines and `#` comments are skipped, and so
//!   are `TEXT HELP` … `ENDTEXT` blocks (syslinux; pygrub would read their lines as
//!   directives).
//! - `LABEL name` starts an entry whose title is `name` (pygrub; `MENU LABEL` is display text
//!   only and does not change the title, so `--entry=name` matches what `DEFAULT` names).
//! - `KERNEL`/`LINUX PATH [ARGS]` (pygrub reads only `KERNEL`), `INITRD FILE[,FILE…]` (the
//!   first; pygrub has no `INITRD`), `APPEND ARGS`: every `initrd=FILE[,FILE…]` word is taken
//!   out of the arguments and names the initrd (the first file of the first such word; it
//!   overrides `INITRD`); `APPEND -` means no arguments. Values wrapped whole in double quotes
//!   lose them (pygrub's `re.sub('^"(.+)"$', …)`). When `KERNEL` has extra words and there is
//!   no `APPEND`, they are the arguments (pygrub's `set_kernel`).
//! - `KERNEL mboot.c32` with `APPEND xen.gz ARGS --- vmlinuz ARGS --- initrd` (Xen's
//!   multiboot loader): the part after the first `---` is the kernel (path + args) and the
//!   next the initrd; with only two parts, the first is the kernel (pygrub's special case).
//! - Relative paths are made absolute against `config_dir` (syslinux resolves them against
//!   the config file's directory; pygrub 4.17 keeps them as written, which finds nothing
//!   unless the config sits at the root).
//! - `DEFAULT`: when it names a label, that entry; a menu module (`DEFAULT menu.c32`,
//!   `DEFAULT vesamenu.c32`, or any `UI` directive) makes the label marked `MENU DEFAULT` the
//!   default (menu.txt: it overrides `DEFAULT`); otherwise the first entry. pygrub matches the
//!   whole `DEFAULT` value against the labels and ignores `MENU DEFAULT`. Global directives
//!   (`DEFAULT`, `TIMEOUT`, `UI`) count wherever they appear (syslinux; pygrub only reads
//!   them before the first `LABEL`).
//! - `TIMEOUT` is in tenths of a second (syslinux); converted to whole seconds rounding up;
//!   `TIMEOUT 0` (wait for the user) gives `None`. pygrub takes the number as seconds.
//! - `INCLUDE`/`MENU INCLUDE`/`CONFIG` are not followed (as in pygrub): entries in included
//!   files are not seen. The caller may parse an included file on its own.
//!
//! Limits: more than [`MAX_ENTRIES`] entries is an error; lines longer than
//! [`super::MAX_LINE`] are skipped.

use super::{
    lines, non_empty, split_directive, split_first_word, BootConfig, BootEntry, ConfigKind,
    MAX_ENTRIES,
};
use crate::{Error, Result};

#[derive(Default)]
struct Label {
    name: String,
    kernel: Option<String>,
    kernel_args: String,
    append: Option<String>,
    initrd: Option<String>,
    menu_default: bool,
}

/// `"x"` → `x` (only when the quotes wrap the whole value, as pygrub does).
fn unquote(s: &str) -> &str {
    let s = s.trim();
    match s.strip_prefix('"').and_then(|r| r.strip_suffix('"')) {
        Some(inner) if !inner.is_empty() => inner,
        _ => s,
    }
}

/// The first file of a comma-separated list.
fn first_of_list(s: &str) -> &str {
    s.split(',').next().unwrap_or("").trim()
}

/// A path made absolute against `dir` when it is relative.
fn absolute(dir: &str, path: &str) -> String {
    if path.is_empty() || path.starts_with('/') {
        return path.to_string();
    }
    let dir = dir.trim_end_matches('/');
    if dir.is_empty() {
        format!("/{path}")
    } else if dir.starts_with('/') {
        format!("{dir}/{path}")
    } else {
        format!("/{dir}/{path}")
    }
}

/// Takes the `initrd=` words out of an `APPEND` line: (the remaining arguments with the rest
/// of the spacing kept, the first initrd file named).
fn take_initrd(append: &str) -> (String, Option<String>) {
    let mut out = String::with_capacity(append.len());
    let mut initrd: Option<String> = None;
    let mut rest = append;
    loop {
        let trimmed = rest.trim_start_matches([' ', '\t']);
        let ws = rest.get(..rest.len() - trimmed.len()).unwrap_or("");
        if trimmed.is_empty() {
            break;
        }
        let end = trimmed.find([' ', '\t']).unwrap_or(trimmed.len());
        let (word, after) = trimmed.split_at(end);
        let is_initrd = word
            .get(..7)
            .is_some_and(|p| p.eq_ignore_ascii_case("initrd="));
        if is_initrd {
            if initrd.is_none() {
                initrd = non_empty(first_of_list(word.get(7..).unwrap_or("")));
            }
        } else {
            if !out.is_empty() {
                out.push_str(ws);
            }
            out.push_str(word);
        }
        rest = after;
    }
    (out, initrd)
}

impl Label {
    fn finish(self, dir: &str) -> BootEntry {
        let mut kernel = self.kernel.clone();
        let mut initrd = self.initrd.clone();
        let mut args = self.kernel_args.clone();
        let is_mboot = kernel
            .as_deref()
            .is_some_and(|k| k.to_ascii_lowercase().ends_with("mboot.c32"));
        if let Some(append) = self.append.as_deref() {
            if is_mboot {
                let parts: Vec<&str> = append.split("---").collect();
                let (k, i) = match parts.as_slice() {
                    [_, k, i] => (Some(*k), Some(*i)),
                    [k, i] => (Some(*k), Some(*i)),
                    _ => (None, None),
                };
                if let Some(k) = k {
                    let (path, rest) = split_first_word(k.trim());
                    kernel = non_empty(path);
                    args = rest.trim().to_string();
                }
                if let Some(i) = i {
                    let (path, _) = split_first_word(i.trim());
                    initrd = non_empty(path);
                }
                if k.is_none() {
                    args = append.to_string();
                }
            } else {
                let (rest, from_append) = take_initrd(append);
                args = rest;
                if from_append.is_some() {
                    initrd = from_append;
                }
            }
        }
        BootEntry {
            title: self.name,
            kernel: kernel.map(|k| absolute(dir, &k)),
            initrd: initrd.map(|i| absolute(dir, &i)),
            args,
        }
    }
}

/// Parses an extlinux/syslinux/isolinux config. `config_dir` is the directory the config
/// was read from (inside the guest filesystem), used for relative paths.
pub fn parse(text: &str, config_dir: &str) -> Result<BootConfig> {
    let mut labels: Vec<Label> = Vec::new();
    let mut current: Option<Label> = None;
    let mut default: Option<String> = None;
    let mut menu_ui = false;
    let mut timeout: Option<u32> = None;
    let mut in_text = false;

    for line in lines(text) {
        if in_text {
            if line.eq_ignore_ascii_case("endtext") {
                in_text = false;
            }
            continue;
        }
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (cmd, arg) = split_directive(line);
        let cmd = cmd.to_ascii_lowercase();
        match cmd.as_str() {
            "label" => {
                if let Some(l) = current.take() {
                    if labels.len() >= MAX_ENTRIES {
                        return Err(Error::Config(format!(
                            "extlinux: more than {MAX_ENTRIES} labels"
                        )));
                    }
                    labels.push(l);
                }
                current = Some(Label {
                    name: unquote(arg).to_string(),
                    ..Label::default()
                });
            }
            "text" if split_first_word(arg).0.eq_ignore_ascii_case("help") => in_text = true,
            "default" => default = Some(unquote(arg).to_string()),
            "ui" => menu_ui = true,
            "timeout" => {
                timeout = match arg.parse::<u32>() {
                    Ok(0) | Err(_) => None,
                    Ok(t) => Some(t.div_ceil(10)),
                }
            }
            "kernel" | "linux" => {
                if let Some(l) = current.as_mut() {
                    let (path, rest) = split_first_word(unquote(arg));
                    l.kernel = non_empty(path);
                    l.kernel_args = rest.trim().to_string();
                }
            }
            "initrd" => {
                if let Some(l) = current.as_mut() {
                    l.initrd = non_empty(first_of_list(split_first_word(unquote(arg)).0));
                }
            }
            "append" => {
                if let Some(l) = current.as_mut() {
                    let a = unquote(arg);
                    l.append = Some(if a == "-" {
                        String::new()
                    } else {
                        a.to_string()
                    });
                }
            }
            "menu" => {
                if let Some(l) = current.as_mut() {
                    if split_first_word(arg).0.eq_ignore_ascii_case("default") {
                        l.menu_default = true;
                    }
                }
            }
            _ => {}
        }
    }
    if let Some(l) = current.take() {
        if labels.len() >= MAX_ENTRIES {
            return Err(Error::Config(format!(
                "extlinux: more than {MAX_ENTRIES} labels"
            )));
        }
        labels.push(l);
    }

    let default_word = default
        .as_deref()
        .map(|d| split_first_word(d).0.to_string())
        .unwrap_or_default();
    if default_word.to_ascii_lowercase().ends_with(".c32") {
        menu_ui = true;
    }
    let by_name = |name: &str| -> Option<usize> {
        labels.iter().position(|l| l.name == name).or_else(|| {
            labels
                .iter()
                .position(|l| l.name.eq_ignore_ascii_case(name))
        })
    };
    let menu_default = labels.iter().position(|l| l.menu_default);
    let default_index = match (menu_ui, menu_default) {
        (true, Some(i)) => i,
        _ => {
            if default_word.is_empty() {
                0
            } else {
                by_name(&default_word).unwrap_or(0)
            }
        }
    };

    let entries: Vec<BootEntry> = labels.into_iter().map(|l| l.finish(config_dir)).collect();
    let default = if default_index < entries.len() {
        default_index
    } else {
        0
    };
    Ok(BootConfig {
        kind: ConfigKind::Extlinux,
        entries,
        default,
        timeout,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn initrd_words_leave_the_append_line() {
        let (args, initrd) = take_initrd("vga=788 initrd=/a.gz,/b.gz  --- quiet initrd=/c");
        assert_eq!(args, "vga=788  --- quiet");
        assert_eq!(initrd.as_deref(), Some("/a.gz"));
        assert_eq!(
            absolute("/boot/extlinux", "vmlinuz"),
            "/boot/extlinux/vmlinuz"
        );
        assert_eq!(absolute("/", "vmlinuz"), "/vmlinuz");
        assert_eq!(absolute("/boot", "/vmlinuz"), "/vmlinuz");
    }
}
