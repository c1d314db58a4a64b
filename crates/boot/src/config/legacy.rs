//! Not yet implemented.
use super::BootConfig;
use crate::{Error, Result};
pub fn parse(_text: &str) -> Result<BootConfig> {
    Err(Error::Unsupported("grub legacy".into()))
}
