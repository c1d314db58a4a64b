//! iso9660 (read-only). Not yet implemented: [`probe`] finds nothing.

use std::sync::Arc;

use super::{Inodes, NodeKind};
use crate::disk::ReadAt;
use crate::{Error, Result};

/// Whether `disk` holds this filesystem (by its magic numbers).
pub fn probe(_disk: &dyn ReadAt) -> bool {
    false
}

pub struct Iso9660 {}

impl Iso9660 {
    pub fn open(_disk: Arc<dyn ReadAt>) -> Result<Iso9660> {
        Err(Error::Unsupported("iso9660".into()))
    }
}

impl Inodes for Iso9660 {
    type Node = u64;
    fn fs_type(&self) -> &'static str {
        "iso9660"
    }
    fn root(&self) -> Result<u64> {
        Err(Error::Unsupported("iso9660".into()))
    }
    fn kind(&self, _node: &u64) -> NodeKind {
        NodeKind::Other
    }
    fn size(&self, _node: &u64) -> u64 {
        0
    }
    fn lookup(&self, _dir: &u64, _name: &[u8]) -> Result<Option<u64>> {
        Ok(None)
    }
    fn read_dir(&self, _dir: &u64, _max: usize) -> Result<Vec<(Vec<u8>, u64)>> {
        Ok(Vec::new())
    }
    fn read(&self, _node: &u64, _offset: u64, _buf: &mut [u8]) -> Result<usize> {
        Ok(0)
    }
    fn read_link(&self, _node: &u64) -> Result<Vec<u8>> {
        Ok(Vec::new())
    }
}
