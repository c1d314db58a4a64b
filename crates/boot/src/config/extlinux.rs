//! Not yet implemented.
use super::BootConfig;
use crate::{Error, Result};
pub fn parse(_text: &str, _config_dir: &str) -> Result<BootConfig> {
    Err(Error::Unsupported("extlinux".into()))
}
