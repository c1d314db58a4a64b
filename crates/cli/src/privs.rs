//! Dropping privileges for the bootloader (`--runas`): the few process-wide syscalls std has
//! no wrapper for. Each is a plain syscall on integers; nothing here touches foreign memory.

use anyhow::{bail, Result};

/// Limits the size of any file this process writes from now on (RLIMIT_FSIZE).
pub fn set_fsize_limit(bytes: u64) -> Result<()> {
    let lim = libc::rlimit {
        rlim_cur: bytes as libc::rlim_t,
        rlim_max: bytes as libc::rlim_t,
    };
    // SAFETY: setrlimit reads the struct we pass by reference for the duration of the call.
    if unsafe { libc::setrlimit(libc::RLIMIT_FSIZE, &lim) } != 0 {
        bail!(
            "setrlimit(RLIMIT_FSIZE): {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

/// Becomes `uid` (and group `uid`, no supplementary groups), irrevocably.
pub fn become_user(uid: u32) -> Result<()> {
    // SAFETY: setgroups with a count of 0 reads no memory.
    if unsafe { libc::setgroups(0, std::ptr::null()) } != 0 {
        bail!("setgroups: {}", std::io::Error::last_os_error());
    }
    // SAFETY: integer-only syscalls.
    if unsafe { libc::setresgid(uid, uid, uid) } != 0 {
        bail!("setresgid({uid}): {}", std::io::Error::last_os_error());
    }
    // SAFETY: integer-only syscall.
    if unsafe { libc::setresuid(uid, uid, uid) } != 0 {
        bail!("setresuid({uid}): {}", std::io::Error::last_os_error());
    }
    // SAFETY: integer-only syscall; checks that root cannot be regained.
    if uid != 0 && unsafe { libc::setuid(0) } == 0 {
        bail!("could still become root after dropping to uid {uid}");
    }
    Ok(())
}
