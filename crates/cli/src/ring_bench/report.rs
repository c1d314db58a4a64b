//! The report of a run: fio's normal output (its summary lines and number formatting) or
//! fio's JSON shape (`--output-format=json`), with xdisk's own lines and fields (backend
//! counters, verification, soak).

use std::time::Duration;

use serde_json::{json, Value};

use xdisk_backend::{DataPath, DeviceStats};
use xdisk_image::CacheMode;

use super::cpu::Usage;
use super::hist::FIO_PERCENTILES;
use super::options::Params;
use super::soak::{Memory, ResizeSeen};
use super::workload::Side;

pub struct Report<'a> {
    pub p: &'a Params,
    pub format: &'a str,
    pub runtime: Duration,
    pub read: &'a Side,
    pub write: &'a Side,
    pub usr_pct: f64,
    pub sys_pct: f64,
    pub cpu: Usage,
    /// CPU time of the backend's threads over the run (the part of `cpu` dom0 would spend).
    pub backend_cpu: Duration,
    pub stats: DeviceStats,
    pub front_persistent: usize,
    pub verified: u64,
    pub verify_pass_blocks: u64,
    pub errors: u64,
    pub soak: Soak,
}

/// What the soak options saw.
#[derive(Default)]
pub struct Soak {
    pub mismatches: u64,
    pub reconnects: u64,
    pub resubmitted: u64,
    pub leaked_grants: usize,
    pub resize: Option<ResizeSeen>,
    pub memory: Memory,
}

impl Soak {
    fn resize_json(&self, p: &Params) -> Value {
        let (Some(plan), Some(r)) = (p.resize, &self.resize) else {
            return Value::Null;
        };
        let ms = |d: Option<Duration>| d.map(|d| d.as_millis() as u64);
        json!({
            "at_ms": plan.at.as_millis() as u64,
            "size": plan.size,
            "done_ms": ms(r.done_at),
            "error": r.error,
            "seen": r.seen_at.is_some(),
            "seen_ms": ms(r.seen_at),
            "sectors": r.sectors,
            "blocks_before": r.blocks_before,
            "blocks_after": r.blocks_after,
        })
    }

    fn text(&self, p: &Params) -> String {
        let mut o = String::new();
        if let Some((min, max)) = p.reconnect {
            o += &format!(
                "  reconnects   : {} (every {:.1}-{:.1}s), {} requests resubmitted, {} grants leaked\n",
                self.reconnects,
                min.as_secs_f64(),
                max.as_secs_f64(),
                self.resubmitted,
                self.leaked_grants
            );
        }
        if let (Some(plan), Some(r)) = (p.resize, &self.resize) {
            let secs = |d: Option<Duration>| {
                d.map_or_else(|| "-".to_owned(), |d| format!("{:.2}s", d.as_secs_f64()))
            };
            o += &format!(
                "  resize       : to {} bytes at {:.1}s: backend at {}, frontend saw {} sectors at {}{}, region {} -> {} blocks\n",
                plan.size,
                plan.at.as_secs_f64(),
                secs(r.done_at),
                r.sectors,
                secs(r.seen_at),
                if r.seen_at.is_some() { "" } else { " (not seen)" },
                r.blocks_before,
                r.blocks_after
            );
            if let Some(e) = &r.error {
                o += &format!("  resize error : {e}\n");
            }
        }
        if let Some(m) = self.memory.text() {
            o += &m;
        }
        o
    }
}

fn side_json(s: &Side, runtime: Duration) -> Value {
    let secs = runtime.as_secs_f64().max(1e-9);
    let h = &s.clat;
    let mut pct = serde_json::Map::new();
    for p in FIO_PERCENTILES {
        pct.insert(format!("{p:.6}"), json!(h.percentile(p)));
    }
    let clat = json!({
        "min": h.min(),
        "max": h.max(),
        "mean": h.mean(),
        "stddev": h.stddev(),
        "N": h.count(),
        "percentile": pct,
    });
    let bw_bytes = (s.bytes as f64 / secs) as u64;
    json!({
        "io_bytes": s.bytes,
        "io_kbytes": s.bytes / 1024,
        "bw_bytes": bw_bytes,
        "bw": bw_bytes / 1024,
        "iops": s.ios as f64 / secs,
        "runtime": runtime.as_millis() as u64,
        "total_ios": s.ios,
        "short_ios": 0,
        "drop_ios": 0,
        "clat_ns": clat.clone(),
        "lat_ns": clat,
    })
}

impl Report<'_> {
    pub fn json(&self) -> Value {
        let p = self.p;
        let st = &self.stats;
        json!({
            "xdisk version": env!("CARGO_PKG_VERSION"),
            "jobs": [{
                "jobname": p.name,
                "groupid": 0,
                "error": self.errors,
                "job options": {
                    "rw": p.rw.name(),
                    "bs": p.bs.to_string(),
                    "iodepth": p.iodepth.to_string(),
                    "numjobs": p.jobs.to_string(),
                    "direct": if p.cache == CacheMode::None { "1" } else { "0" },
                    "ioengine": p.aio.to_string(),
                },
                "read": side_json(self.read, self.runtime),
                "write": side_json(self.write, self.runtime),
                "job_runtime": self.runtime.as_millis() as u64,
                "usr_cpu": self.usr_pct,
                "sys_cpu": self.sys_pct,
                "ctx": self.cpu.ctx,
                "majf": self.cpu.majf,
                "minf": self.cpu.minf,
                "xdisk": {
                    "format": self.format,
                    "datapath": match p.data_path { DataPath::Map => "map", DataPath::Copy => "copy" },
                    "queues": p.jobs,
                    "persistent_grants_frontend": self.front_persistent,
                    "persistent_grants_backend": st.persistent_grants,
                    "backend_requests": st.rd_req + st.wr_req,
                    "backend_cpu_us": self.backend_cpu.as_secs_f64() * 1e6,
                    "backend_cpu_us_per_request": self.backend_cpu_per_request(),
                    "backend_indirect_requests": st.indirect_req,
                    "backend_errors": st.errors,
                    "verify": p.verify,
                    "verified_blocks": self.verified,
                    "verify_pass_blocks": self.verify_pass_blocks,
                    "verify_mismatches": self.soak.mismatches,
                    "backend_connects": st.connects,
                    "reconnects": self.soak.reconnects,
                    "reconnect_resubmitted": self.soak.resubmitted,
                    "leaked_grants": self.soak.leaked_grants,
                    "resize": self.soak.resize_json(p),
                    "memory": self.soak.memory.json(),
                },
            }],
        })
    }

    /// The backend threads' CPU time per request the frontend completed.
    fn backend_cpu_per_request(&self) -> f64 {
        let n = self.read.ios + self.write.ios;
        if n == 0 {
            return 0.0;
        }
        self.backend_cpu.as_secs_f64() * 1e6 / n as f64
    }

    pub fn normal(&self) -> String {
        let p = self.p;
        let mut o = String::new();
        let engine = p.aio.to_string();
        o += &format!(
            "{}: (g=0): rw={}, bs=(R) {b}B-{b}B, (W) {b}B-{b}B, (T) {b}B-{b}B, ioengine={engine}, iodepth={}\n",
            p.name,
            p.rw.name(),
            p.iodepth,
            b = p.bs
        );
        o += &format!(
            "xdisk bench {}: {} image, {} queue(s), datapath={}, persistent grants {}, backend direct={}\n",
            env!("CARGO_PKG_VERSION"),
            self.format,
            p.jobs,
            match p.data_path {
                DataPath::Map => "map",
                DataPath::Copy => "copy",
            },
            if self.front_persistent > 0 { "on" } else { "off" },
            u8::from(p.cache == CacheMode::None),
        );
        o += &format!(
            "\n{}: (groupid=0, jobs={}): err={:2}: pid={}\n",
            p.name,
            p.jobs,
            self.errors,
            std::process::id()
        );
        for (label, s) in [("read", self.read), ("write", self.write)] {
            if s.ios == 0 {
                continue;
            }
            o += &side_text(label, s, self.runtime);
        }
        o += &format!(
            "  cpu          : usr={:.2}%, sys={:.2}%, ctx={}, majf={}, minf={}\n",
            self.usr_pct, self.sys_pct, self.cpu.ctx, self.cpu.majf, self.cpu.minf
        );
        let st = &self.stats;
        o += &format!(
            "  backend      : requests={}, cpu={:.1}us/request, indirect={}, errors={}, persistent grants={} (frontend {})\n",
            st.rd_req + st.wr_req,
            self.backend_cpu_per_request(),
            st.indirect_req,
            st.errors,
            st.persistent_grants,
            self.front_persistent
        );
        if p.verify {
            o += &format!(
                "  verify       : crc32c, {} blocks verified ({} in the verification pass), {} mismatches\n",
                self.verified, self.verify_pass_blocks, self.soak.mismatches
            );
        }
        o += &self.soak.text(p);
        o += "\nRun status group 0 (all jobs):\n";
        for (label, s) in [("READ", self.read), ("WRITE", self.write)] {
            if s.ios == 0 {
                continue;
            }
            let secs = self.runtime.as_secs_f64().max(1e-9);
            let bw = s.bytes as f64 / secs;
            o += &format!(
                "{label:>7}: bw={} ({}), io={} ({}), run={ms}-{ms}msec\n",
                bw_iec(bw),
                bw_si(bw),
                bytes_iec(s.bytes as f64),
                bytes_si(s.bytes as f64),
                ms = self.runtime.as_millis()
            );
        }
        o
    }
}

/// fio's num2str: 3 significant digits and k/M/G.
fn num3(v: f64, base: f64, units: &[&str]) -> String {
    let mut v = v;
    let mut i = 0;
    while v >= 1000.0 && i + 1 < units.len() {
        v /= base;
        i += 1;
    }
    let s = if i == 0 || v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    };
    format!("{s}{}", units[i])
}

fn bw_iec(v: f64) -> String {
    num3(v, 1024.0, &["B", "KiB", "MiB", "GiB", "TiB"]) + "/s"
}

fn bw_si(v: f64) -> String {
    num3(v, 1000.0, &["B", "kB", "MB", "GB", "TB"]) + "/s"
}

fn bytes_iec(v: f64) -> String {
    num3(v, 1024.0, &["B", "KiB", "MiB", "GiB", "TiB"])
}

fn bytes_si(v: f64) -> String {
    num3(v, 1000.0, &["B", "kB", "MB", "GB", "TB"])
}

fn side_text(label: &str, s: &Side, runtime: Duration) -> String {
    let secs = runtime.as_secs_f64().max(1e-9);
    let iops = s.ios as f64 / secs;
    let bw = s.bytes as f64 / secs;
    let h = &s.clat;
    // Units by the mean: nsec below 10 us, usec below 10 ms, else msec.
    let mean = h.mean();
    let (unit, div) = if mean < 10_000.0 {
        ("nsec", 1.0)
    } else if mean < 10_000_000.0 {
        ("usec", 1e3)
    } else {
        ("msec", 1e6)
    };
    let mut o = format!(
        "  {label}: IOPS={}, BW={} ({})({}/{}msec)\n",
        num3(iops, 1000.0, &["", "k", "M", "G"]),
        bw_iec(bw),
        bw_si(bw),
        bytes_iec(s.bytes as f64),
        runtime.as_millis()
    );
    o += &format!(
        "    clat ({unit}): min={:.0}, max={:.0}, avg={:.2}, stdev={:.2}\n",
        h.min() as f64 / div,
        h.max() as f64 / div,
        h.mean() / div,
        h.stddev() / div
    );
    o += &format!("    clat percentiles ({unit}):\n");
    for (i, p) in FIO_PERCENTILES.iter().enumerate() {
        if i % 4 == 0 {
            o += "     |";
        }
        let v = (h.percentile(*p) as f64 / div).round();
        o += &format!(" {:>5.2}th=[{:>5}]", p, v);
        if i % 4 == 3 || i + 1 == FIO_PERCENTILES.len() {
            o += if i + 1 == FIO_PERCENTILES.len() {
                "\n"
            } else {
                ",\n"
            };
        } else {
            o += ",";
        }
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_print_like_fio() {
        assert_eq!(num3(97_234.0, 1000.0, &["", "k", "M"]), "97.2k");
        assert_eq!(num3(512.0, 1000.0, &["", "k", "M"]), "512");
        assert_eq!(bw_iec(380.0 * 1048576.0), "380MiB/s");
        assert_eq!(bw_si(1.5e9), "1.50GB/s");
    }
}
