//! What [`check`](super::check) is asked to do and what it reports: qemu-img's `-r` values,
//! counters, exit status, human and JSON output.

use crate::{Error, Result};

/// What to repair (qemu-img's `-r`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Repair {
    /// Only report.
    #[default]
    None,
    /// Lower the refcounts of leaked clusters.
    Leaks,
    /// Fix leaks and corruptions: drop entries that point outside the file or are
    /// malformed, rebuild the refcount structures, fix COPIED flags, clear the dirty bit.
    All,
}

impl std::str::FromStr for Repair {
    type Err = Error;
    fn from_str(s: &str) -> Result<Repair> {
        match s {
            "leaks" => Ok(Repair::Leaks),
            "all" => Ok(Repair::All),
            _ => Err(Error::InvalidArgument(format!(
                "Unknown option value for -r (expecting 'leaks' or 'all'): {s}"
            ))),
        }
    }
}

/// The result of [`check`](super::check), with qemu-img's counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckReport {
    /// Problems that remain and may corrupt data.
    pub corruptions: u64,
    /// Clusters whose refcount is higher than their references (remaining).
    pub leaks: u64,
    /// Internal errors that kept the check from completing (I/O errors, limits).
    pub check_errors: u64,
    /// Corruptions repaired (with [`Repair::All`]).
    pub corruptions_fixed: u64,
    /// Leaked clusters repaired (with [`Repair::Leaks`] or [`Repair::All`]).
    pub leaks_fixed: u64,
    /// End of the last cluster in use (referenced or with a nonzero refcount).
    pub image_end_offset: u64,
    /// Clusters of the virtual disk.
    pub total_clusters: u64,
    /// Allocated guest clusters of the active L1 table.
    pub allocated_clusters: u64,
    /// Allocated guest clusters whose host cluster does not directly follow the previous
    /// one's in the same L2 table; compressed clusters always count (as in qemu-img).
    pub fragmented_clusters: u64,
    /// Allocated guest clusters stored compressed.
    pub compressed_clusters: u64,
    /// What was found (and repaired), in qemu-img's words; qemu-img prints these on stderr.
    pub messages: Vec<String>,
    /// The image file name (for the JSON output).
    pub filename: String,
}

impl CheckReport {
    /// qemu-img check's exit status: 0 no errors, 1 check not completed, 2 corruptions,
    /// 3 leaks only.
    pub fn exit_code(&self) -> i32 {
        if self.check_errors > 0 {
            1
        } else if self.corruptions > 0 {
            2
        } else if self.leaks > 0 {
            3
        } else {
            0
        }
    }

    /// qemu-img check's human output (stdout).
    pub fn human(&self) -> String {
        let mut s = String::new();
        if self.corruptions_fixed > 0 || self.leaks_fixed > 0 {
            s.push_str(&format!(
                "The following inconsistencies were found and repaired:\n\n    {} leaked \
                 clusters\n    {} corruptions\n\nDouble checking the fixed image now...\n",
                self.leaks_fixed, self.corruptions_fixed
            ));
        }
        if self.corruptions == 0 && self.leaks == 0 && self.check_errors == 0 {
            s.push_str("No errors were found on the image.\n");
        } else {
            if self.corruptions > 0 {
                s.push_str(&format!(
                    "\n{} errors were found on the image.\nData may be corrupted, or further \
                     writes to the image may corrupt it.\n",
                    self.corruptions
                ));
            }
            if self.leaks > 0 {
                s.push_str(&format!(
                    "\n{} leaked clusters were found on the image.\nThis means waste of disk \
                     space, but no harm to data.\n",
                    self.leaks
                ));
            }
            if self.check_errors > 0 {
                s.push_str(&format!(
                    "\n{} internal errors have occurred during the check.\n",
                    self.check_errors
                ));
            }
        }
        if self.total_clusters != 0 && self.allocated_clusters != 0 {
            let a = self.allocated_clusters as f64;
            s.push_str(&format!(
                "{}/{} = {:.2}% allocated, {:.2}% fragmented, {:.2}% compressed clusters\n",
                self.allocated_clusters,
                self.total_clusters,
                a * 100.0 / self.total_clusters as f64,
                self.fragmented_clusters as f64 * 100.0 / a,
                self.compressed_clusters as f64 * 100.0 / a
            ));
        }
        if self.image_end_offset != 0 {
            s.push_str(&format!("Image end offset: {}\n", self.image_end_offset));
        }
        s
    }

    /// qemu-img check's JSON output (`--output=json`): the optional counters appear only
    /// when nonzero, as in qemu-img.
    pub fn json(&self) -> serde_json::Value {
        let mut m = serde_json::Map::new();
        let mut opt = |k: &str, v: u64| {
            if v != 0 {
                m.insert(k.to_string(), v.into());
            }
        };
        opt("image-end-offset", self.image_end_offset);
        opt("total-clusters", self.total_clusters);
        opt("allocated-clusters", self.allocated_clusters);
        opt("fragmented-clusters", self.fragmented_clusters);
        opt("compressed-clusters", self.compressed_clusters);
        opt("corruptions", self.corruptions);
        opt("leaks", self.leaks);
        opt("corruptions-fixed", self.corruptions_fixed);
        opt("leaks-fixed", self.leaks_fixed);
        m.insert("check-errors".into(), self.check_errors.into());
        m.insert("filename".into(), self.filename.clone().into());
        m.insert("format".into(), "qcow2".into());
        serde_json::Value::Object(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_and_texts() {
        let mut r = CheckReport::default();
        assert_eq!(r.exit_code(), 0);
        assert!(r.human().starts_with("No errors were found on the image."));
        r.leaks = 2;
        assert_eq!(r.exit_code(), 3);
        assert!(r
            .human()
            .contains("2 leaked clusters were found on the image."));
        r.corruptions = 1;
        assert_eq!(r.exit_code(), 2);
        r.check_errors = 1;
        assert_eq!(r.exit_code(), 1);
        r.total_clusters = 1024;
        r.allocated_clusters = 17;
        r.image_end_offset = 1441792;
        let h = r.human();
        assert!(
            h.contains("17/1024 = 1.66% allocated, 0.00% fragmented, 0.00% compressed clusters\n")
        );
        assert!(h.ends_with("Image end offset: 1441792\n"));
        let j = r.json();
        assert_eq!(j["leaks"], 2);
        assert_eq!(j["check-errors"], 1);
        assert!(j.get("leaks-fixed").is_none());
    }
}
