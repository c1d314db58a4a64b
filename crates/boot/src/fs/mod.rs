//! Read-only filesystems of guest disks, read without mounting.
//!
//! Two levels:
//! - [`FileSystem`]: what the bootloader needs — read a whole file (size checked against a
//!   limit before anything is copied) and list a directory, by absolute path inside the guest
//!   filesystem. Paths never leave it: `..` at the root stays at the root, symbolic links are
//!   followed inside it (absolute ones from its root), and loops end with
//!   [`Error::SymlinkLoop`].
//! - [`Inodes`]: node-level access; every filesystem here (ext2/3/4, FAT, ISO9660, XFS) is
//!   read by our own code, bounded for hostile images. [`Walk`] turns one into a
//!   [`FileSystem`] with the path rules above, so each format only implements lookup, read,
//!   readdir and readlink. (ext4-view was tried for ext2/3/4 and dropped: a crafted extent
//!   tree of shared index blocks makes it walk for hours; see fs/ext4.rs.)
//!
//! [`open`] probes a disk (or partition) for each known filesystem.

use std::sync::Arc;

use crate::disk::ReadAt;
use crate::{Error, Limits, Result};

pub mod ext4;
pub mod fat;
pub mod iso9660;
pub mod xfs;

/// What a path names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeKind {
    /// A regular file.
    File,
    /// A directory.
    Dir,
    /// A symbolic link.
    Symlink,
    /// Devices, fifos, sockets, ...
    Other,
}

/// A read-only filesystem seen by absolute paths ("/boot/grub/grub.cfg").
pub trait FileSystem: Send + Sync {
    /// "ext4", "fat", "iso9660", "xfs", ...
    fn fs_type(&self) -> &'static str;
    /// The whole regular file at `path` (symlinks followed). A file larger than `limit`
    /// is [`Error::TooLarge`], decided from its size before any data is read.
    fn read_file(&self, path: &str, limit: u64) -> Result<Vec<u8>>;
    /// The names in the directory at `path` (symlinks followed), without "." and "..",
    /// at most `limits.max_dir_entries` of them.
    fn read_dir(&self, path: &str) -> Result<Vec<String>>;
    /// What `path` names after following symlinks; `Ok(None)` if it does not exist.
    fn kind(&self, path: &str) -> Result<Option<NodeKind>>;
}

/// Node-level access to a filesystem (see the module docs). All methods are bounded by the
/// implementation (a directory read stops after `max` entries, a link target is at most
/// 4 KiB, reads are clamped to the file size).
pub trait Inodes: Send + Sync {
    /// A node (inode, directory record...): what the filesystem needs to find its data again.
    type Node: Clone + Send + Sync;
    /// "ext4", "fat", "iso9660", "xfs", ... (see [`FileSystem::fs_type`]).
    fn fs_type(&self) -> &'static str;
    /// The root directory.
    fn root(&self) -> Result<Self::Node>;
    /// What a node is.
    fn kind(&self, node: &Self::Node) -> NodeKind;
    /// Size in bytes of a file (or of a symlink's target string).
    fn size(&self, node: &Self::Node) -> u64;
    /// The entry `name` (a single component, never "." or "..") of directory `dir`.
    fn lookup(&self, dir: &Self::Node, name: &[u8]) -> Result<Option<Self::Node>>;
    /// The entries of `dir` except "." and "..", at most `max`.
    fn read_dir(&self, dir: &Self::Node, max: usize) -> Result<Vec<(Vec<u8>, Self::Node)>>;
    /// Reads file data at `offset`; returns the bytes read (0 at or past the end).
    fn read(&self, node: &Self::Node, offset: u64, buf: &mut [u8]) -> Result<usize>;
    /// A symlink's target.
    fn read_link(&self, node: &Self::Node) -> Result<Vec<u8>>;
}

/// A [`FileSystem`] over an [`Inodes`], resolving paths inside it.
pub struct Walk<T: Inodes> {
    /// The filesystem's node-level access.
    pub inodes: T,
    /// Bounds on path resolution and directory listing ([`Limits::max_symlinks`],
    /// [`Limits::max_path_components`], [`Limits::max_dir_entries`]).
    pub limits: Limits,
}

impl<T: Inodes> Walk<T> {
    /// A [`FileSystem`] over `inodes`, bounded by `limits`.
    pub fn new(inodes: T, limits: Limits) -> Walk<T> {
        Walk { inodes, limits }
    }

    /// Resolves `path` from the root. `follow_last`: whether a symlink as the last component
    /// is followed. Returns `None` if a component does not exist.
    pub fn resolve(&self, path: &str, follow_last: bool) -> Result<Option<T::Node>> {
        let root = self.inodes.root()?;
        // The directories from the root down to the current one (for ".."), and the
        // components still to walk (a stack: the next one is last).
        let mut stack: Vec<T::Node> = vec![root.clone()];
        let mut todo: Vec<Vec<u8>> = components(path.as_bytes()).rev().collect();
        let mut links = 0u32;
        let mut seen = 0usize;
        while let Some(name) = todo.pop() {
            seen += 1;
            if seen > self.limits.max_path_components.saturating_mul(4) {
                return Err(Error::SymlinkLoop(path.to_string()));
            }
            let cur = stack.last().cloned().unwrap_or_else(|| root.clone());
            if name == b"." {
                continue;
            }
            if name == b".." {
                if stack.len() > 1 {
                    stack.pop();
                }
                continue;
            }
            if self.inodes.kind(&cur) != NodeKind::Dir {
                return Err(Error::NotADirectory(path.to_string()));
            }
            let Some(node) = self.inodes.lookup(&cur, &name)? else {
                return Ok(None);
            };
            let is_last = todo.is_empty();
            if self.inodes.kind(&node) == NodeKind::Symlink && (!is_last || follow_last) {
                links += 1;
                if links > self.limits.max_symlinks {
                    return Err(Error::SymlinkLoop(path.to_string()));
                }
                let target = self.inodes.read_link(&node)?;
                if target.is_empty() {
                    return Ok(None);
                }
                if target[0] == b'/' {
                    stack.truncate(1);
                }
                let more: Vec<Vec<u8>> = components(&target).collect();
                if todo.len() + more.len() > self.limits.max_path_components {
                    return Err(Error::SymlinkLoop(path.to_string()));
                }
                todo.extend(more.into_iter().rev());
                continue;
            }
            if stack.len() >= self.limits.max_path_components {
                return Err(Error::Unsupported(format!("{path}: path too deep")));
            }
            stack.push(node);
        }
        Ok(stack.pop())
    }

    fn resolve_existing(&self, path: &str) -> Result<T::Node> {
        self.resolve(path, true)?
            .ok_or_else(|| Error::NotFound(path.to_string()))
    }
}

/// The non-empty components of a path, split on '/'.
fn components(path: &[u8]) -> impl DoubleEndedIterator<Item = Vec<u8>> + '_ {
    path.split(|&b| b == b'/')
        .filter(|c| !c.is_empty())
        .map(|c| c.to_vec())
}

impl<T: Inodes> FileSystem for Walk<T> {
    fn fs_type(&self) -> &'static str {
        self.inodes.fs_type()
    }

    fn read_file(&self, path: &str, limit: u64) -> Result<Vec<u8>> {
        let node = self.resolve_existing(path)?;
        if self.inodes.kind(&node) != NodeKind::File {
            return Err(Error::NotAFile(path.to_string()));
        }
        let size = self.inodes.size(&node);
        if size > limit {
            return Err(Error::TooLarge {
                path: path.to_string(),
                size,
                limit,
            });
        }
        let len = usize::try_from(size).map_err(|_| Error::TooLarge {
            path: path.to_string(),
            size,
            limit,
        })?;
        let mut data = vec![0u8; len];
        let mut done = 0usize;
        while done < len {
            let n = self.inodes.read(&node, done as u64, &mut data[done..])?;
            if n == 0 {
                return Err(Error::corrupt(
                    self.inodes.fs_type(),
                    format!("{path}: file data ends at {done} of {len} bytes"),
                ));
            }
            done += n;
        }
        Ok(data)
    }

    fn read_dir(&self, path: &str) -> Result<Vec<String>> {
        let node = self.resolve_existing(path)?;
        if self.inodes.kind(&node) != NodeKind::Dir {
            return Err(Error::NotADirectory(path.to_string()));
        }
        Ok(self
            .inodes
            .read_dir(&node, self.limits.max_dir_entries)?
            .into_iter()
            .map(|(name, _)| String::from_utf8_lossy(&name).into_owned())
            .collect())
    }

    fn kind(&self, path: &str) -> Result<Option<NodeKind>> {
        Ok(self.resolve(path, true)?.map(|n| self.inodes.kind(&n)))
    }
}

/// Limits small enough for fuzzing and for exercising a hostile filesystem quickly.
pub fn small_limits() -> Limits {
    Limits {
        max_file: 1 << 20,
        max_config: 64 << 10,
        max_dir_entries: 64,
        max_symlinks: 8,
        max_path_components: 32,
    }
}

/// Lists the tree (at most `budget` entries, 8 levels deep) and reads every file in it, plus
/// a few paths a bootloader asks for: what the fuzz targets do to a filesystem. Errors are
/// ignored; only panics, hangs and unbounded allocations are bugs here.
pub fn exercise(fs: &dyn FileSystem, mut budget: u32) {
    for p in [
        "/boot/grub/grub.cfg",
        "/isolinux/isolinux.cfg",
        "/vmlinuz",
        "/a/../b/./c",
        "/../x/../boot/../",
    ] {
        let _ = fs.kind(p);
        let _ = fs.read_file(p, 1 << 20);
    }
    let mut todo = vec![("/".to_string(), 0u32)];
    while let Some((dir, depth)) = todo.pop() {
        let Ok(names) = fs.read_dir(&dir) else {
            continue;
        };
        for name in names {
            if budget == 0 {
                return;
            }
            budget -= 1;
            let path = format!("{}/{name}", dir.trim_end_matches('/'));
            match fs.kind(&path) {
                Ok(Some(NodeKind::Dir)) if depth < 8 => todo.push((path, depth + 1)),
                _ => {
                    let _ = fs.read_file(&path, 1 << 20);
                }
            }
        }
    }
}

/// Opens the filesystem on `disk`: ext2/3/4, XFS, ISO9660, FAT (probed by their magic
/// numbers in that order). `Ok(None)`: no filesystem we know of is there.
pub fn open(disk: Arc<dyn ReadAt>, limits: &Limits) -> Result<Option<Box<dyn FileSystem>>> {
    if ext4::probe(&*disk) {
        return Ok(Some(Box::new(ext4::Ext4Fs::open(disk, limits)?)));
    }
    if xfs::probe(&*disk) {
        return Ok(Some(Box::new(Walk::new(
            xfs::Xfs::open(disk)?,
            limits.clone(),
        ))));
    }
    if iso9660::probe(&*disk) {
        return Ok(Some(Box::new(Walk::new(
            iso9660::Iso9660::open(disk)?,
            limits.clone(),
        ))));
    }
    if fat::probe(&*disk) {
        return Ok(Some(Box::new(Walk::new(
            fat::Fat::open(disk)?,
            limits.clone(),
        ))));
    }
    Ok(None)
}
