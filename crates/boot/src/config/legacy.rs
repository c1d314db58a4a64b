//! GRUB legacy (0.97) `menu.lst` / `grub.conf`.
//!
//! Follows Xen 4.17's pygrub (`tools/pygrub/src/GrubConf.py`: `GrubConfigFile.parse`,
//! `GrubImage`, `_GrubConfigFile._set_default`, `grub_split`, `get_path`):
//! - Lines are trimmed; blank lines and lines starting with `#` are skipped.
//! - A line starting with `title` starts an entry; its title is the rest of the line,
//!   trimmed. Every later line belongs to the current entry, so global directives only count
//!   before the first `title` (GRUB legacy reads the file the same way).
//! - A directive and its argument are split at the first `=` when it comes before the first
//!   space or tab (`default=1`), else at whitespace (pygrub's `grub_split`).
//! - Global: `default N` (`saved`, a negative or a non-numeric value → 0, as pygrub 4.17),
//!   `timeout N` (non-numeric → none); `hiddenmenu`, `fallback`, `splashimage`, `password`,
//!   `color`, `serial`, `terminal` and other directives are ignored (pygrub refuses to boot
//!   without the password when `password` is set; that interactive check is the caller's).
//! - Entry: `kernel PATH ARGS…` (the first word is the path, the rest verbatim, inner spacing
//!   kept, ends trimmed), `initrd PATH` (the first word: GRUB legacy's `initrd FILE [ARG…]`;
//!   pygrub takes the whole argument), `root`/`rootnoverify` ignored for paths. A `(hd0,0)`
//!   device prefix is stripped from paths (`get_path`). The last `kernel`/`initrd` line of an
//!   entry wins.
//! - Xen multiboot entries (`kernel /boot/xen.gz …` followed by `module /boot/vmlinuz ARGS`
//!   and `module /boot/initrd.img`): the first `module` is the kernel (path + args) and the
//!   second the initrd, the hypervisor and its arguments being dropped — the multiboot
//!   convention pygrub applies to extlinux's `mboot.c32` (`ExtLinuxConf.py`). pygrub's
//!   `GrubImage` ignores `module` lines (its command table maps `module` to `None`) and so
//!   would hand xen.gz to Xen as the guest kernel, which cannot boot; we differ on purpose.
//! - The default index is clamped to the entry list (pygrub's `image_index` falls back to 0
//!   when the number is past the end).
//!
//! Limits: more than [`MAX_ENTRIES`] entries is an error; lines longer than [`MAX_LINE`]
//! are skipped.

#[cfg(doc)]
use super::MAX_LINE;
use super::{
    lines, non_empty, split_directive, split_first_word, strip_device, BootConfig, BootEntry,
    ConfigKind, MAX_ENTRIES,
};
use crate::{Error, Result};

#[derive(Default)]
struct Entry {
    title: String,
    kernel: Option<(String, String)>,
    initrd: Option<String>,
    modules: Vec<(String, String)>,
}

impl Entry {
    fn finish(self) -> BootEntry {
        if !self.modules.is_empty() {
            let mut modules = self.modules.into_iter();
            let (path, args) = modules.next().unwrap_or_default();
            return BootEntry {
                title: self.title,
                kernel: non_empty(&path),
                initrd: modules.next().and_then(|m| non_empty(&m.0)),
                args,
            };
        }
        let (kernel, args) = match self.kernel {
            Some((path, args)) => (non_empty(&path), args),
            None => (None, String::new()),
        };
        BootEntry {
            title: self.title,
            kernel,
            initrd: self.initrd,
            args,
        }
    }
}

/// `PATH ARGS…` of a `kernel` or `module` line: the device-stripped path and the verbatim rest.
fn path_and_args(arg: &str) -> (String, String) {
    let (path, rest) = split_first_word(arg);
    (strip_device(path).to_string(), rest.trim().to_string())
}

/// Parses a GRUB legacy `menu.lst` / `grub.conf`.
pub fn parse(text: &str) -> Result<BootConfig> {
    let mut entries: Vec<BootEntry> = Vec::new();
    let mut current: Option<Entry> = None;
    let mut default: usize = 0;
    let mut timeout: Option<u32> = None;

    for line in lines(text) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some(rest) = line.strip_prefix("title") {
            if rest.is_empty() || rest.starts_with([' ', '\t', '=']) {
                if let Some(e) = current.take() {
                    if entries.len() >= MAX_ENTRIES {
                        return Err(Error::Config(format!(
                            "menu.lst: more than {MAX_ENTRIES} entries"
                        )));
                    }
                    entries.push(e.finish());
                }
                let title = rest.strip_prefix('=').unwrap_or(rest).trim();
                current = Some(Entry {
                    title: title.to_string(),
                    ..Entry::default()
                });
                continue;
            }
        }
        let (cmd, arg) = split_directive(line);
        match current.as_mut() {
            Some(e) => match cmd {
                "kernel" => e.kernel = Some(path_and_args(arg)),
                "initrd" => {
                    let (path, _) = split_first_word(arg);
                    e.initrd = non_empty(strip_device(path));
                }
                "module" | "modulenounzip" if e.modules.len() < 2 => {
                    e.modules.push(path_and_args(arg));
                }
                _ => {}
            },
            None => match cmd {
                "default" => default = arg.parse::<usize>().unwrap_or(0),
                "timeout" => timeout = arg.parse::<u32>().ok(),
                _ => {}
            },
        }
    }
    if let Some(e) = current.take() {
        if entries.len() >= MAX_ENTRIES {
            return Err(Error::Config(format!(
                "menu.lst: more than {MAX_ENTRIES} entries"
            )));
        }
        entries.push(e.finish());
    }
    if default >= entries.len() {
        default = 0;
    }
    Ok(BootConfig {
        kind: ConfigKind::GrubLegacy,
        entries,
        default,
        timeout,
    })
}
