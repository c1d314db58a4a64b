//! The process's CPUs: fio's `--cpus_allowed` (affinity) and the CPU time and context
//! switches of the run (getrusage). The only `unsafe` of `xdisk bench`.

use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};

/// Parses fio's CPU list (`0-3,5`).
pub fn parse_cpus(s: &str) -> Result<Vec<usize>> {
    let mut cpus = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (a, b) = match part.split_once('-') {
            Some((a, b)) => (a, b),
            None => (part, part),
        };
        let a: usize = a
            .trim()
            .parse()
            .map_err(|_| anyhow!("invalid CPU list '{s}'"))?;
        let b: usize = b
            .trim()
            .parse()
            .map_err(|_| anyhow!("invalid CPU list '{s}'"))?;
        if a > b || b >= libc::CPU_SETSIZE as usize {
            bail!("invalid CPU range '{part}'");
        }
        cpus.extend(a..=b);
    }
    if cpus.is_empty() {
        bail!("empty CPU list '{s}'");
    }
    Ok(cpus)
}

/// Restricts this thread, and so every thread it starts afterwards, to `cpus`.
pub fn set_affinity(cpus: &[usize]) -> Result<()> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET stays within it (each CPU is
    // below CPU_SETSIZE, checked by parse_cpus); sched_setaffinity reads the set.
    let r = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for &c in cpus {
            libc::CPU_SET(c, &mut set);
        }
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error()).context("sched_setaffinity");
    }
    Ok(())
}

#[derive(Debug, Clone, Copy, Default)]
pub struct Usage {
    pub user: Duration,
    pub sys: Duration,
    pub ctx: u64,
    pub majf: u64,
    pub minf: u64,
}

pub fn usage() -> Usage {
    // SAFETY: getrusage fills the struct it is given; a zeroed rusage is a valid value.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: RUSAGE_SELF and a valid pointer.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) } != 0 {
        return Usage::default();
    }
    let tv = |t: libc::timeval| {
        Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64)
    };
    Usage {
        user: tv(ru.ru_utime),
        sys: tv(ru.ru_stime),
        ctx: (ru.ru_nvcsw + ru.ru_nivcsw) as u64,
        majf: ru.ru_majflt as u64,
        minf: ru.ru_minflt as u64,
    }
}

/// Names (as the kernel keeps them: 15 bytes) of the threads that serve the device: the
/// queues' reactors, their slow-path workers and a thread engine's workers. Everything else
/// in `xdisk bench` is the frontend and the simulation, which a guest would run.
const BACKEND_THREADS: [&str; 3] = ["xdisk-blkback-q", "xdisk-slow-", "xdisk-io-"];

/// CPU time the backend's threads have run so far (the first field of each thread's
/// `/proc/self/task/TID/schedstat`, in nanoseconds). Threads that ended are not counted:
/// sample while the device is connected.
pub fn backend_cpu() -> Duration {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return Duration::ZERO;
    };
    let mut ns = 0u64;
    for t in tasks.flatten() {
        let dir = t.path();
        let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        if !BACKEND_THREADS
            .iter()
            .any(|b| comm.trim_end().starts_with(b))
        {
            continue;
        }
        let stat = std::fs::read_to_string(dir.join("schedstat")).unwrap_or_default();
        if let Some(run) = stat
            .split_whitespace()
            .next()
            .and_then(|f| f.parse::<u64>().ok())
        {
            ns = ns.saturating_add(run);
        }
    }
    Duration::from_nanos(ns)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists_parse_like_fio() {
        assert_eq!(parse_cpus("1").unwrap(), vec![1]);
        assert_eq!(parse_cpus("0-2,5").unwrap(), vec![0, 1, 2, 5]);
        assert!(parse_cpus("").is_err());
        assert!(parse_cpus("3-1").is_err());
        assert!(parse_cpus("x").is_err());
        assert!(parse_cpus("99999").is_err());
    }
}
