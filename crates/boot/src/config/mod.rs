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
    Grub2,
    GrubLegacy,
    Extlinux,
    Bls,
}

/// One boot entry. Paths are inside the filesystem the config was found on.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BootEntry {
    pub title: String,
    pub kernel: Option<String>,
    pub initrd: Option<String>,
    /// The kernel command line (verbatim per the format's rules).
    pub args: String,
}

/// A parsed config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootConfig {
    pub kind: ConfigKind,
    /// Entries in file order (for GRUB 2: every menuentry, including those in submenus).
    pub entries: Vec<BootEntry>,
    /// The default entry's index into `entries` (resolved by the format's rules; 0 when the
    /// config names none or names one that does not exist).
    pub default: usize,
    /// Menu timeout in seconds, if the config sets one.
    pub timeout: Option<u32>,
}
