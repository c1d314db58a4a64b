//! [`CreateOptions`]: what `xdisk img create -o ...` may ask of a new RBD image, in the
//! spellings of the `rbd` command (`rbd create --object-size --image-feature --data-pool
//! --stripe-unit --stripe-count`); QEMU's `cluster_size` of a raw image is its object size.

use crate::ffi::CreateImageOptions;

/// Features a new image may be created with (`rbd create --image-feature`), as
/// `rbd/features.h` names them; the others are set by librbd itself.
pub const FEATURES: [(&str, u64); 7] = [
    ("layering", 1 << 0),
    ("striping", 1 << 1),
    ("exclusive-lock", 1 << 2),
    ("object-map", 1 << 3),
    ("fast-diff", 1 << 4),
    ("deep-flatten", 1 << 5),
    ("journaling", 1 << 6),
];

/// The smallest and largest object sizes librbd accepts (orders 12 to 25).
pub const OBJECT_SIZE_RANGE: (u64, u64) = (4 << 10, 32 << 20);

/// Options of a new RBD image (`None`: the cluster's default, `rbd_default_*`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CreateOptions {
    /// `object_size=`: bytes per RADOS object, a power of two from 4 KiB to 32 MiB.
    pub object_size: Option<u64>,
    /// `features=a+b+...`: the image features (`none` for none).
    pub features: Option<u64>,
    /// `data_pool=`: the pool for the data objects (an erasure-coded pool, say).
    pub data_pool: Option<String>,
    /// `stripe_unit=` (bytes) and `stripe_count=`: fancy striping (needs both).
    pub stripe_unit: Option<u64>,
    /// See `stripe_unit`.
    pub stripe_count: Option<u64>,
}

/// A size like `4M`, `64k`, `4194304` (binary units, as qemu-img and rbd read them).
fn parse_size(v: &str) -> Option<u64> {
    let v = v.trim();
    let (num, mult) = match v.char_indices().last()? {
        (i, 'k' | 'K') => (&v[..i], 1u64 << 10),
        (i, 'm' | 'M') => (&v[..i], 1 << 20),
        (i, 'g' | 'G') => (&v[..i], 1 << 30),
        (i, 'b' | 'B') => (&v[..i], 1),
        _ => (v, 1),
    };
    num.parse::<u64>().ok()?.checked_mul(mult)
}

impl CreateOptions {
    /// Whether no option is set.
    pub fn is_empty(&self) -> bool {
        *self == CreateOptions::default()
    }

    /// Sets `key` (one of `object_size`, `features`, `data_pool`, `stripe_unit`,
    /// `stripe_count`) to `value`. `Ok(false)`: not an RBD option; `Err`: why the value is
    /// refused.
    pub fn set(&mut self, key: &str, value: &str) -> Result<bool, String> {
        match key {
            "object_size" => {
                let (lo, hi) = OBJECT_SIZE_RANGE;
                let n = parse_size(value)
                    .filter(|n| n.is_power_of_two() && (lo..=hi).contains(n))
                    .ok_or_else(|| {
                        format!("invalid object_size '{value}': a power of two from 4K to 32M")
                    })?;
                self.object_size = Some(n);
            }
            "features" => {
                let mut bits = 0u64;
                if value != "none" {
                    for f in value.split(['+', ':']) {
                        let Some((_, b)) = FEATURES.iter().find(|(n, _)| *n == f) else {
                            let names: Vec<&str> = FEATURES.iter().map(|(n, _)| *n).collect();
                            return Err(format!(
                                "unknown RBD feature '{f}' in features={value} (features are joined with '+': {}, or none)",
                                names.join(", ")
                            ));
                        };
                        bits |= b;
                    }
                }
                self.features = Some(bits);
            }
            "data_pool" => {
                if value.is_empty() || value.len() > 255 || value.chars().any(|c| c.is_control()) {
                    return Err(format!("invalid data_pool '{value}'"));
                }
                self.data_pool = Some(value.to_owned());
            }
            "stripe_unit" => {
                let n = parse_size(value)
                    .filter(|&n| n > 0)
                    .ok_or_else(|| format!("invalid stripe_unit '{value}'"))?;
                self.stripe_unit = Some(n);
            }
            "stripe_count" => {
                let n = value
                    .parse::<u64>()
                    .ok()
                    .filter(|&n| n > 0)
                    .ok_or_else(|| format!("invalid stripe_count '{value}'"))?;
                self.stripe_count = Some(n);
            }
            _ => return Ok(false),
        }
        Ok(true)
    }

    /// `key=value` for each option set, as [`CreateOptions::set`] reads them.
    pub fn describe(&self) -> String {
        let mut v = Vec::new();
        if let Some(n) = self.object_size {
            v.push(format!("object_size={n}"));
        }
        if let Some(bits) = self.features {
            let names: Vec<&str> = FEATURES
                .iter()
                .filter(|(_, b)| bits & b != 0)
                .map(|(n, _)| *n)
                .collect();
            let f = if names.is_empty() {
                "none".to_owned()
            } else {
                names.join("+")
            };
            v.push(format!("features={f}"));
        }
        if let Some(p) = &self.data_pool {
            v.push(format!("data_pool={p}"));
        }
        if let Some(n) = self.stripe_unit {
            v.push(format!("stripe_unit={n}"));
        }
        if let Some(n) = self.stripe_count {
            v.push(format!("stripe_count={n}"));
        }
        v.join(",")
    }

    pub(crate) fn to_ffi(&self) -> Result<CreateImageOptions, String> {
        if self.stripe_unit.is_some() != self.stripe_count.is_some() {
            return Err("stripe_unit and stripe_count go together".into());
        }
        if let (Some(u), Some(o)) = (self.stripe_unit, self.object_size) {
            if u > o || o % u != 0 {
                return Err(format!("stripe_unit {u} must divide object_size {o}"));
            }
        }
        Ok(CreateImageOptions {
            order: self.object_size.map(|n| n.trailing_zeros() as u8),
            features: self.features,
            stripe_unit: self.stripe_unit,
            stripe_count: self.stripe_count,
            data_pool: self.data_pool.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_parse_and_bad_ones_say_why() {
        let mut o = CreateOptions::default();
        assert!(o.is_empty());
        assert_eq!(o.set("object_size", "1M"), Ok(true));
        assert_eq!(o.set("features", "layering+exclusive-lock"), Ok(true));
        assert_eq!(o.set("data_pool", "ec"), Ok(true));
        assert_eq!(o.set("cluster_size", "64k"), Ok(false));
        let f = o.to_ffi().unwrap();
        assert_eq!(f.order, Some(20));
        assert_eq!(f.features, Some(5));
        assert_eq!(f.data_pool.as_deref(), Some("ec"));
        assert_eq!(o.set("features", "none"), Ok(true));
        assert_eq!(o.features, Some(0));
        for (k, v) in [
            ("object_size", "3M"),
            ("object_size", "2k"),
            ("object_size", "64M"),
            ("object_size", "x"),
            ("object_size", "99999999999999999999G"),
            ("features", "layering+bogus"),
            ("features", ""),
            ("data_pool", ""),
            ("stripe_unit", "0"),
            ("stripe_count", "-1"),
        ] {
            let e = o.clone().set(k, v).unwrap_err();
            assert!(e.contains(k) || e.contains("feature"), "{k}={v}: {e}");
        }
        let mut s = CreateOptions::default();
        s.set("stripe_unit", "64k").unwrap();
        assert!(s.to_ffi().unwrap_err().contains("together"));
        s.set("stripe_count", "4").unwrap();
        s.set("object_size", "32k").unwrap();
        assert!(s.to_ffi().unwrap_err().contains("divide"));
    }
}
