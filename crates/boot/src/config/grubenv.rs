//! Not yet implemented.
use std::collections::BTreeMap;
#[derive(Debug, Clone, Default)]
pub struct GrubEnv(BTreeMap<String, String>);
impl GrubEnv {
    pub fn parse(_text: &str) -> GrubEnv {
        GrubEnv::default()
    }
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(|s| s.as_str())
    }
}
