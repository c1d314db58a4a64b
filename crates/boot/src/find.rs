//! Finding what to boot: the filesystems on the disk ([`crate::part`]), the boot config on
//! each ([`CONFIG_PATHS`], first found wins), the chosen entry, its kernel and ramdisk.
//! The first filesystem whose config yields a kernel wins (pygrub's rule).

use std::sync::Arc;

use crate::config::grubenv::GrubEnv;
use crate::config::{bls, extlinux, grub2, legacy, BootConfig, BootEntry, ConfigKind};
use crate::disk::{ReadAt, Slice};
use crate::fs::{self, FileSystem, NodeKind};
use crate::part::{self, Partition};
use crate::{Error, Limits, Result};

/// Where configs are looked for on each filesystem, in order (pygrub 4.17's list, with
/// extlinux's usual places added).
pub const CONFIG_PATHS: &[(&str, ConfigKind)] = &[
    ("/boot/grub/grub.cfg", ConfigKind::Grub2),
    ("/grub/grub.cfg", ConfigKind::Grub2),
    ("/boot/grub2/grub.cfg", ConfigKind::Grub2),
    ("/grub2/grub.cfg", ConfigKind::Grub2),
    ("/boot/isolinux/isolinux.cfg", ConfigKind::Extlinux),
    ("/isolinux/isolinux.cfg", ConfigKind::Extlinux),
    ("/boot/extlinux/extlinux.conf", ConfigKind::Extlinux),
    ("/boot/extlinux.conf", ConfigKind::Extlinux),
    ("/extlinux/extlinux.conf", ConfigKind::Extlinux),
    ("/extlinux.conf", ConfigKind::Extlinux),
    ("/boot/grub/menu.lst", ConfigKind::GrubLegacy),
    ("/boot/grub/grub.conf", ConfigKind::GrubLegacy),
    ("/grub/menu.lst", ConfigKind::GrubLegacy),
    ("/grub/grub.conf", ConfigKind::GrubLegacy),
];

/// Where Boot Loader Specification entries live (used when grub.cfg runs `blscfg`, or when no
/// other config is found).
pub const BLS_DIRS: &[&str] = &["/boot/loader/entries", "/loader/entries"];

/// What the caller asks for (pygrub's options).
#[derive(Debug, Clone, Default)]
pub struct BootRequest {
    /// `--entry`: a number (counting every entry in file order) or an exact title.
    pub entry: Option<String>,
    /// `--kernel`: skip the config and boot this path.
    pub kernel: Option<String>,
    /// `--ramdisk` (with `--kernel`).
    pub ramdisk: Option<String>,
    /// `--args`: with `--kernel`, the command line; otherwise appended to the entry's.
    pub args: Option<String>,
    /// `--offset`: the filesystem's byte offset, bypassing the partition table.
    pub offset: Option<u64>,
    /// Bounds on what the disk's contents may make us do.
    pub limits: Limits,
}

/// A filesystem found on the disk, with its config if it has one.
pub struct Found {
    /// Where the filesystem is.
    pub partition: Partition,
    /// The filesystem, open (to read the kernel and ramdisk from).
    pub fs: Box<dyn FileSystem>,
    /// The config's path and contents.
    pub config: Option<(String, BootConfig)>,
}

impl std::fmt::Debug for Found {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Found")
            .field("partition", &self.partition)
            .field("fs", &self.fs.fs_type())
            .field("config", &self.config)
            .finish()
    }
}

/// The decision: what to boot and from where.
pub struct Choice {
    /// The filesystem to boot from (and its config, unless `--kernel` was given).
    pub found: Found,
    /// Index of the chosen entry in the config (None with `--kernel`).
    pub entry: Option<usize>,
    /// Absolute path of the kernel inside `found.fs`, checked to exist (see [`locate`]).
    pub kernel: String,
    /// Absolute path of the ramdisk inside `found.fs`, checked to exist, if there is one.
    pub ramdisk: Option<String>,
    /// The kernel command line: the entry's, then `--args` (if given) after a space; with
    /// `--kernel`, `--args` alone.
    pub args: String,
}

impl std::fmt::Debug for Choice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Choice")
            .field("found", &self.found)
            .field("entry", &self.entry)
            .field("kernel", &self.kernel)
            .field("ramdisk", &self.ramdisk)
            .field("args", &self.args)
            .finish()
    }
}

/// Describes a partition for messages: "partition 2 at byte 1048576" or "the whole disk".
pub fn describe(p: &Partition) -> String {
    if p.number == 0 {
        if p.start == 0 {
            "the whole disk".to_string()
        } else {
            format!("the filesystem at byte {}", p.start)
        }
    } else {
        format!("partition {} at byte {}", p.number, p.start)
    }
}

/// The places to try: `--offset` or the partition table.
pub fn places(disk: &dyn ReadAt, offset: Option<u64>) -> Result<Vec<Partition>> {
    match offset {
        Some(off) => {
            if off >= disk.size() {
                return Err(Error::NoBoot(format!(
                    "offset {off} is past the disk's end ({} bytes)",
                    disk.size()
                )));
            }
            Ok(vec![Partition {
                number: 0,
                start: off,
                len: disk.size() - off,
                kind: part::PartType::Whole,
            }])
        }
        None => part::filesystems(disk),
    }
}

/// Opens the filesystem of one place (`Ok(None)`: none we know of).
pub fn open_fs(
    disk: &Arc<dyn ReadAt>,
    p: &Partition,
    limits: &Limits,
) -> Result<Option<Box<dyn FileSystem>>> {
    let slice: Arc<dyn ReadAt> = Arc::new(Slice::new(disk.clone(), p.start, p.len));
    fs::open(slice, limits)
}

fn read_text(fs: &dyn FileSystem, path: &str, limits: &Limits) -> Result<String> {
    let bytes = fs.read_file(path, limits.max_config)?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

fn exists(fs: &dyn FileSystem, path: &str) -> bool {
    matches!(fs.kind(path), Ok(Some(NodeKind::File)))
}

/// GRUB's environment block next to a config (`/boot/grub/grubenv` for
/// `/boot/grub/grub.cfg`), else empty.
fn grubenv_for(fs: &dyn FileSystem, config_dir: &str, limits: &Limits) -> GrubEnv {
    let mut candidates = vec![format!("{config_dir}/grubenv")];
    for d in ["/boot/grub2", "/boot/grub", "/grub2", "/grub"] {
        candidates.push(format!("{d}/grubenv"));
    }
    for c in candidates {
        if let Ok(text) = read_text(fs, &c, limits) {
            return GrubEnv::parse(&text);
        }
    }
    GrubEnv::default()
}

/// BLS entries (`*.conf` in the first entries directory that has any), or `None`.
fn bls_config(fs: &dyn FileSystem, env: &GrubEnv, limits: &Limits) -> Result<Option<BootConfig>> {
    for dir in BLS_DIRS {
        let Ok(names) = fs.read_dir(dir) else {
            continue;
        };
        let mut entries = Vec::new();
        for name in names.into_iter().filter(|n| n.ends_with(".conf")) {
            let path = format!("{dir}/{name}");
            if let Ok(text) = read_text(fs, &path, limits) {
                entries.push((name, text));
            }
        }
        if !entries.is_empty() {
            return bls::parse(&entries, env).map(Some);
        }
    }
    Ok(None)
}

/// Whether a grub.cfg hands its menu to BLS entries (Fedora/RHEL: a `blscfg` command).
fn uses_blscfg(text: &str) -> bool {
    text.lines()
        .any(|l| l.trim() == "blscfg" || l.trim().starts_with("blscfg "))
}

/// The config on `fs`: the first of [`CONFIG_PATHS`] that exists, parsed; BLS entries when a
/// grub.cfg runs `blscfg` (its own menuentries follow them) or when nothing else is there.
pub fn load_config(fs: &dyn FileSystem, limits: &Limits) -> Result<Option<(String, BootConfig)>> {
    for (path, kind) in CONFIG_PATHS {
        if !exists(fs, path) {
            continue;
        }
        let text = read_text(fs, path, limits)?;
        let dir = path.rsplit_once('/').map(|(d, _)| d).unwrap_or("");
        let dir = if dir.is_empty() { "/" } else { dir };
        let cfg = match kind {
            ConfigKind::Grub2 => {
                let env = grubenv_for(fs, dir, limits);
                let mut cfg = grub2::parse(&text, &env)?;
                if uses_blscfg(&text) {
                    if let Some(mut b) = bls_config(fs, &env, limits)? {
                        // GRUB's blscfg puts the BLS entries where the command stands; the
                        // default then names a BLS entry (saved_entry), which bls::parse
                        // resolved.
                        let n = b.entries.len();
                        b.entries.append(&mut cfg.entries);
                        if b.entries.len() > limits.max_dir_entries {
                            b.entries.truncate(limits.max_dir_entries);
                        }
                        b.timeout = cfg.timeout.or(b.timeout);
                        if b.default >= n {
                            b.default = 0;
                        }
                        cfg = b;
                    }
                }
                cfg
            }
            ConfigKind::Extlinux => extlinux::parse(&text, dir)?,
            ConfigKind::GrubLegacy => legacy::parse(&text)?,
            ConfigKind::Bls => continue,
        };
        return Ok(Some((path.to_string(), cfg)));
    }
    let env = grubenv_for(fs, "/boot/grub2", limits);
    if let Some(cfg) = bls_config(fs, &env, limits)? {
        return Ok(Some(("/boot/loader/entries".to_string(), cfg)));
    }
    Ok(None)
}

/// Every filesystem on the disk that we can read, with its config (for `--list-entries`).
/// Places with no known filesystem or an unreadable one are skipped; their reasons are
/// returned alongside.
pub fn scan(disk: &Arc<dyn ReadAt>, req: &BootRequest) -> Result<(Vec<Found>, Vec<String>)> {
    let mut found = Vec::new();
    let mut why = Vec::new();
    for p in places(&**disk, req.offset)? {
        match open_fs(disk, &p, &req.limits) {
            Ok(Some(fs)) => match load_config(&*fs, &req.limits) {
                Ok(config) => found.push(Found {
                    partition: p,
                    fs,
                    config,
                }),
                Err(e) => why.push(format!("{} ({}): {e}", describe(&p), fs.fs_type())),
            },
            Ok(None) => why.push(format!("{}: no filesystem xdisk can read", describe(&p))),
            Err(e) => why.push(format!("{}: {e}", describe(&p))),
        }
    }
    Ok((found, why))
}

/// pygrub's `get_entry_idx`: a number (in range) or an exact title.
pub fn entry_index(cfg: &BootConfig, entry: &str) -> Option<usize> {
    if let Ok(n) = entry.trim().parse::<i64>() {
        return usize::try_from(n).ok().filter(|&i| i < cfg.entries.len());
    }
    cfg.entries.iter().position(|e| e.title == entry)
}

/// A path that exists on `fs`: as given, or with `/boot` added or removed (a config on a
/// separate /boot partition names `/vmlinuz`; one inside the root names `/boot/vmlinuz`, and
/// BLS entries are written for either).
pub fn locate(fs: &dyn FileSystem, path: &str) -> Option<String> {
    let path = if path.starts_with('/') {
        path.to_string()
    } else {
        format!("/{path}")
    };
    if exists(fs, &path) {
        return Some(path);
    }
    let alt = match path.strip_prefix("/boot/") {
        Some(rest) => format!("/{rest}"),
        None => format!("/boot{path}"),
    };
    exists(fs, &alt).then_some(alt)
}

/// Chooses what to boot (pygrub's main loop): the first filesystem whose config (or, with
/// `--kernel`, whose files) yields a kernel that exists there.
pub fn choose(disk: &Arc<dyn ReadAt>, req: &BootRequest) -> Result<Choice> {
    let mut why = Vec::new();
    for p in places(&**disk, req.offset)? {
        let fs = match open_fs(disk, &p, &req.limits) {
            Ok(Some(fs)) => fs,
            Ok(None) => {
                why.push(format!("{}: no filesystem xdisk can read", describe(&p)));
                continue;
            }
            Err(e) => {
                why.push(format!("{}: {e}", describe(&p)));
                continue;
            }
        };
        let fs_type = fs.fs_type();
        if let Some(kernel) = &req.kernel {
            // --kernel: no config; the files must exist on this filesystem.
            let Some(k) = locate(&*fs, kernel) else {
                why.push(format!("{} ({fs_type}): no {kernel}", describe(&p)));
                continue;
            };
            let ramdisk = match &req.ramdisk {
                Some(r) => match locate(&*fs, r) {
                    Some(r) => Some(r),
                    None => {
                        why.push(format!("{} ({fs_type}): no {r}", describe(&p)));
                        continue;
                    }
                },
                None => None,
            };
            return Ok(Choice {
                found: Found {
                    partition: p,
                    fs,
                    config: None,
                },
                entry: None,
                kernel: k,
                ramdisk,
                args: req.args.clone().unwrap_or_default(),
            });
        }
        let config = match load_config(&*fs, &req.limits) {
            Ok(Some(c)) => c,
            Ok(None) => {
                why.push(format!("{} ({fs_type}): no boot config", describe(&p)));
                continue;
            }
            Err(e) => {
                why.push(format!("{} ({fs_type}): {e}", describe(&p)));
                continue;
            }
        };
        let cfg = &config.1;
        if cfg.entries.is_empty() {
            why.push(format!(
                "{} ({fs_type}): {} has no entries",
                describe(&p),
                config.0
            ));
            continue;
        }
        let mut sel = cfg.default.min(cfg.entries.len() - 1);
        if let Some(e) = &req.entry {
            if let Some(i) = entry_index(cfg, e) {
                sel = i;
            }
        }
        let entry: &BootEntry = &cfg.entries[sel];
        let Some(kernel) = &entry.kernel else {
            why.push(format!(
                "{} ({fs_type}): entry '{}' of {} names no kernel",
                describe(&p),
                entry.title,
                config.0
            ));
            continue;
        };
        let Some(k) = locate(&*fs, kernel) else {
            why.push(format!(
                "{} ({fs_type}): entry '{}' of {}: kernel {kernel} not found",
                describe(&p),
                entry.title,
                config.0
            ));
            continue;
        };
        let ramdisk = match &entry.initrd {
            Some(r) => match locate(&*fs, r) {
                Some(r) => Some(r),
                None => {
                    why.push(format!(
                        "{} ({fs_type}): entry '{}' of {}: ramdisk {r} not found",
                        describe(&p),
                        entry.title,
                        config.0
                    ));
                    continue;
                }
            },
            None => None,
        };
        // pygrub: the entry's args, then " " + --args when given.
        let mut args = entry.args.clone();
        if let Some(extra) = req.args.as_deref().filter(|a| !a.is_empty()) {
            args.push(' ');
            args.push_str(extra);
        }
        return Ok(Choice {
            found: Found {
                partition: p,
                fs,
                config: Some(config),
            },
            entry: Some(sel),
            kernel: k,
            ramdisk,
            args,
        });
    }
    Err(Error::NoBoot(if why.is_empty() {
        "unable to find a partition containing a kernel".to_string()
    } else {
        format!(
            "unable to find a partition containing a kernel: {}",
            why.join("; ")
        )
    }))
}
