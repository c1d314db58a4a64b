//! ext2/3/4 (read-only), through the ext4-view crate. Not yet implemented.

use std::sync::Arc;

use super::{FileSystem, NodeKind};
use crate::disk::ReadAt;
use crate::{Error, Limits, Result};

/// Whether `disk` holds ext2/3/4 (superblock magic 0xEF53 at 1024+56).
pub fn probe(_disk: &dyn ReadAt) -> bool {
    false
}

pub struct Ext4Fs {}

impl Ext4Fs {
    pub fn open(_disk: Arc<dyn ReadAt>, _limits: &Limits) -> Result<Ext4Fs> {
        Err(Error::Unsupported("ext4".into()))
    }
}

impl FileSystem for Ext4Fs {
    fn fs_type(&self) -> &'static str {
        "ext4"
    }
    fn read_file(&self, path: &str, _limit: u64) -> Result<Vec<u8>> {
        Err(Error::NotFound(path.into()))
    }
    fn read_dir(&self, path: &str) -> Result<Vec<String>> {
        Err(Error::NotFound(path.into()))
    }
    fn kind(&self, _path: &str) -> Result<Option<NodeKind>> {
        Ok(None)
    }
}
