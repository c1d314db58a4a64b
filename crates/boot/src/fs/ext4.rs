//! ext2/3/4 (read-only), through the ext4-view crate.
//!
//! ext4-view keeps its state in an `Rc` (not `Send`), so [`Ext4Fs`] keeps only the disk and
//! loads the filesystem (superblock, group descriptors, journal block map) again for each
//! call: cheap next to reading a kernel, and a bootloader makes a few dozen calls.
//!
//! Paths are resolved here, one component at a time (see [`Ext4Fs::resolve`]), instead of by
//! ext4-view's own walk, so that:
//! - the rules are those of [`super::Walk`] and our [`Limits`] (`..` at the root stays at the
//!   root, absolute links restart at the fs root, `max_symlinks`, `max_path_components`);
//! - every directory is checked against [`MAX_DIR_BYTES`] before it is searched or listed, and
//!   every symlink's size against [`MAX_LINK`] before its target is read (ext4-view reads
//!   a slow symlink's target into a buffer of the inode's size, whatever that is);
//! - ext4-view is only ever handed paths made of directories we have checked plus one final
//!   component, looked up without following it.

use std::sync::Arc;

use ext4_view::{Ext4, Ext4Error, Ext4Read, FileType, Metadata};

use super::{FileSystem, NodeKind};
use crate::disk::ReadAt;
use crate::{Error, Limits, Result};

const FS: &str = "ext4";

/// Largest directory (in bytes) we search or list. A directory with 100 000 entries of
/// 20-character names is about 3 MiB; the bound keeps a hostile directory (huge size, holes
/// or blocks repeated) from making us walk billions of blocks.
pub const MAX_DIR_BYTES: u64 = 64 << 20;

/// Longest symlink target we read (Linux's PATH_MAX).
pub const MAX_LINK: u64 = 4096;

/// Byte offset of the superblock's `s_magic` (superblock at 1024, magic at +0x38).
const MAGIC_OFFSET: u64 = 1024 + 0x38;
const MAGIC: u16 = 0xEF53;

/// Whether `disk` holds ext2/3/4 (superblock magic 0xEF53 at 1024+56).
pub fn probe(disk: &dyn ReadAt) -> bool {
    let mut m = [0u8; 2];
    disk.read_exact_at(&mut m, MAGIC_OFFSET).is_ok() && u16::from_le_bytes(m) == MAGIC
}

/// ext4-view's reader over our disk.
struct Reader(Arc<dyn ReadAt>);

impl Ext4Read for Reader {
    fn read(
        &mut self,
        start_byte: u64,
        dst: &mut [u8],
    ) -> std::result::Result<(), Box<dyn std::error::Error + Send + Sync + 'static>> {
        self.0
            .read_exact_at(dst, start_byte)
            .map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync + 'static>)
    }
}

/// An ext2/3/4 filesystem.
pub struct Ext4Fs {
    disk: Arc<dyn ReadAt>,
    limits: Limits,
}

/// A resolved path: its canonical form (only directories before the last component, no
/// symlinks, "." or "..") and what it names.
struct Node {
    path: Vec<u8>,
    meta: Metadata,
}

impl Ext4Fs {
    /// Opens the filesystem (reads and checks its superblock, group descriptors and journal).
    pub fn open(disk: Arc<dyn ReadAt>, limits: &Limits) -> Result<Ext4Fs> {
        if !probe(&*disk) {
            return Err(Error::corrupt(FS, "no ext2/3/4 superblock magic"));
        }
        let fs = Ext4Fs {
            disk,
            limits: limits.clone(),
        };
        fs.load()?;
        Ok(fs)
    }

    fn load(&self) -> Result<Ext4> {
        Ext4::load(Box::new(Reader(self.disk.clone()))).map_err(|e| map_err(e, "superblock"))
    }

    /// Resolves `path` from the root with the rules of [`super::Walk`]. `Ok(None)`: a
    /// component does not exist.
    fn resolve(&self, fs: &Ext4, path: &str, follow_last: bool) -> Result<Option<Node>> {
        let root = fs.symlink_metadata("/").map_err(|e| map_err(e, "/"))?;
        // The names from the root to the current directory, and their metadata (metas[0]
        // is the root's; metas.len() == names.len() + 1).
        let mut names: Vec<Vec<u8>> = Vec::new();
        let mut metas: Vec<Metadata> = vec![root];
        let mut todo: Vec<Vec<u8>> = components(path.as_bytes()).rev().collect();
        let mut links = 0u32;
        let mut seen = 0usize;
        while let Some(name) = todo.pop() {
            seen += 1;
            if seen > self.limits.max_path_components.saturating_mul(4) {
                return Err(Error::SymlinkLoop(path.to_string()));
            }
            if name == b"." {
                continue;
            }
            if name == b".." {
                if !names.is_empty() {
                    names.pop();
                    metas.pop();
                }
                continue;
            }
            let cur = metas
                .last()
                .ok_or_else(|| Error::corrupt(FS, "path walk lost its root"))?;
            if !cur.is_dir() {
                return Err(Error::NotADirectory(path.to_string()));
            }
            if cur.len() > MAX_DIR_BYTES {
                return Err(Error::corrupt(
                    FS,
                    format!(
                        "{path}: directory of {} bytes is over {MAX_DIR_BYTES}",
                        cur.len()
                    ),
                ));
            }
            // ext4 names are at most 255 bytes and never contain NUL (components never
            // contain '/'): such a name cannot exist.
            if name.len() > 255 || name.contains(&0) {
                return Ok(None);
            }
            let child_path = join(&names, &name);
            let meta = match fs.symlink_metadata(child_path.as_slice()) {
                Ok(m) => m,
                Err(Ext4Error::NotFound) => return Ok(None),
                Err(e) => return Err(map_err(e, path)),
            };
            let is_last = todo.is_empty();
            if meta.is_symlink() && (!is_last || follow_last) {
                links += 1;
                if links > self.limits.max_symlinks {
                    return Err(Error::SymlinkLoop(path.to_string()));
                }
                let target = self.read_link(fs, &child_path, &meta)?;
                if target.first() == Some(&b'/') {
                    names.clear();
                    metas.truncate(1);
                }
                let more: Vec<Vec<u8>> = components(&target).collect();
                if todo.len() + more.len() > self.limits.max_path_components {
                    return Err(Error::SymlinkLoop(path.to_string()));
                }
                todo.extend(more.into_iter().rev());
                continue;
            }
            if names.len() >= self.limits.max_path_components {
                return Err(Error::Unsupported(format!("{path}: path too deep")));
            }
            names.push(name);
            metas.push(meta);
        }
        let meta = metas
            .pop()
            .ok_or_else(|| Error::corrupt(FS, "path walk lost its root"))?;
        let path = if names.is_empty() {
            b"/".to_vec()
        } else {
            let last = names.pop().unwrap_or_default();
            join(&names, &last)
        };
        Ok(Some(Node { path, meta }))
    }

    /// A symlink's target, its size checked before ext4-view reads it.
    fn read_link(&self, fs: &Ext4, link: &[u8], meta: &Metadata) -> Result<Vec<u8>> {
        let shown = String::from_utf8_lossy(link).into_owned();
        if meta.len() == 0 || meta.len() > MAX_LINK {
            return Err(Error::corrupt(
                FS,
                format!("{shown}: symlink target of {} bytes", meta.len()),
            ));
        }
        let target = fs.read_link(link).map_err(|e| map_err(e, &shown))?;
        Ok(target.as_ref().to_vec())
    }

    fn resolve_existing(&self, fs: &Ext4, path: &str) -> Result<Node> {
        self.resolve(fs, path, true)?
            .ok_or_else(|| Error::NotFound(path.to_string()))
    }
}

/// "/" + names joined with "/" + "/" + last.
fn join(names: &[Vec<u8>], last: &[u8]) -> Vec<u8> {
    let mut p = Vec::new();
    for n in names {
        p.push(b'/');
        p.extend_from_slice(n);
    }
    p.push(b'/');
    p.extend_from_slice(last);
    p
}

/// The non-empty components of a path, split on '/'.
fn components(path: &[u8]) -> impl DoubleEndedIterator<Item = Vec<u8>> + '_ {
    path.split(|&b| b == b'/')
        .filter(|c| !c.is_empty())
        .map(|c| c.to_vec())
}

fn kind_of(t: FileType) -> NodeKind {
    if t.is_regular_file() {
        NodeKind::File
    } else if t.is_dir() {
        NodeKind::Dir
    } else if t.is_symlink() {
        NodeKind::Symlink
    } else {
        NodeKind::Other
    }
}

/// Maps ext4-view's errors to ours (`what`: the path or structure concerned).
fn map_err(e: Ext4Error, what: &str) -> Error {
    match e {
        Ext4Error::NotFound => Error::NotFound(what.to_string()),
        Ext4Error::NotADirectory => Error::NotADirectory(what.to_string()),
        Ext4Error::IsADirectory | Ext4Error::IsASpecialFile => Error::NotAFile(what.to_string()),
        Ext4Error::TooManySymlinks => Error::SymlinkLoop(what.to_string()),
        Ext4Error::Io(inner) => Error::io(
            format!("ext4: {what}"),
            std::io::Error::other(inner.to_string()),
        ),
        Ext4Error::Incompatible(i) => Error::Unsupported(format!("ext4: {what}: {i}")),
        Ext4Error::Encrypted => Error::Unsupported(format!("ext4: {what}: encrypted")),
        Ext4Error::Corrupt(c) => Error::corrupt(FS, format!("{what}: {c}")),
        Ext4Error::PathTooLong | Ext4Error::MalformedPath | Ext4Error::NotAbsolute => {
            Error::Unsupported(format!("ext4: {what}: path too long or malformed"))
        }
        other => Error::corrupt(FS, format!("{what}: {other}")),
    }
}

impl FileSystem for Ext4Fs {
    fn fs_type(&self) -> &'static str {
        FS
    }

    fn read_file(&self, path: &str, limit: u64) -> Result<Vec<u8>> {
        let fs = self.load()?;
        let node = self.resolve_existing(&fs, path)?;
        if !node.meta.file_type().is_regular_file() {
            return Err(Error::NotAFile(path.to_string()));
        }
        // The size comes from the inode: checked before any data block is read.
        let size = node.meta.len();
        let too_large = || Error::TooLarge {
            path: path.to_string(),
            size,
            limit,
        };
        if size > limit {
            return Err(too_large());
        }
        let len = usize::try_from(size).map_err(|_| too_large())?;
        let mut file = fs
            .open(node.path.as_slice())
            .map_err(|e| map_err(e, path))?;
        let mut data = vec![0u8; len];
        let mut done = 0usize;
        while done < len {
            let rest = data.get_mut(done..).unwrap_or_default();
            let n = file.read_bytes(rest).map_err(|e| map_err(e, path))?;
            if n == 0 {
                return Err(Error::corrupt(
                    FS,
                    format!("{path}: file data ends at {done} of {len} bytes"),
                ));
            }
            done = done.saturating_add(n);
        }
        Ok(data)
    }

    fn read_dir(&self, path: &str) -> Result<Vec<String>> {
        let fs = self.load()?;
        let node = self.resolve_existing(&fs, path)?;
        if !node.meta.is_dir() {
            return Err(Error::NotADirectory(path.to_string()));
        }
        if node.meta.len() > MAX_DIR_BYTES {
            return Err(Error::corrupt(
                FS,
                format!(
                    "{path}: directory of {} bytes is over {MAX_DIR_BYTES}",
                    node.meta.len()
                ),
            ));
        }
        let iter = fs
            .read_dir(node.path.as_slice())
            .map_err(|e| map_err(e, path))?;
        let mut out = Vec::new();
        for entry in iter {
            if out.len() >= self.limits.max_dir_entries {
                break;
            }
            let entry = entry.map_err(|e| map_err(e, path))?;
            let name = entry.file_name();
            let name = name.as_ref();
            if name == b"." || name == b".." {
                continue;
            }
            out.push(String::from_utf8_lossy(name).into_owned());
        }
        Ok(out)
    }

    fn kind(&self, path: &str) -> Result<Option<NodeKind>> {
        let fs = self.load()?;
        Ok(self
            .resolve(&fs, path, true)?
            .map(|n| kind_of(n.meta.file_type())))
    }
}
