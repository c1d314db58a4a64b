//! Not yet implemented.
use super::grubenv::GrubEnv;
use super::BootConfig;
use crate::{Error, Result};
pub fn parse(_text: &str, _env: &GrubEnv) -> Result<BootConfig> {
    Err(Error::Unsupported("grub2".into()))
}
