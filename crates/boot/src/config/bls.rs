//! Not yet implemented.
use super::grubenv::GrubEnv;
use super::BootConfig;
use crate::{Error, Result};
pub fn parse(_entries: &[(String, String)], _env: &GrubEnv) -> Result<BootConfig> {
    Err(Error::Unsupported("bls".into()))
}
