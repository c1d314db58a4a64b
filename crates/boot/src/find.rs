//! Finding what to boot: filesystems on the disk, configs on each, the chosen entry.
