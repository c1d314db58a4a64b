//! `xdisk boot` (also installed as `pygrub`): a drop-in for Xen's pygrub. Same options, same
//! outputs (sxp, simple, simple0), same files (`boot_kernel.XXXXXXXX` in the output
//! directory), so libxl's `bootloader=` runs it unchanged; reads raw and qcow2 images (any
//! backing chain, compressed clusters) and block devices directly, with xdisk-boot's bounded
//! readers.

use std::fs::File;
use std::io::{IsTerminal, Write};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use clap::Parser;
use xdisk_boot::config::{grub2, grubenv::GrubEnv, BootConfig};
use xdisk_boot::disk::ReadAt;
use xdisk_boot::find::{self, BootRequest};
use xdisk_boot::Limits;
use xdisk_image::{CacheMode, Format, Image, OpenOptions};

/// pygrub's default output directory (Xen 4.17).
const DEFAULT_OUTPUT_DIR: &str = "/var/run/xen/pygrub";

#[derive(clap::Args, Debug, Clone)]
#[command(
    about = "pygrub-compatible PV bootloader: extracts the kernel, ramdisk and command \
line a guest's boot config names from a raw or qcow2 disk image or a block device"
)]
pub struct BootArgs {
    /// Non-interactive: boot the config's default entry.
    #[arg(short, long)]
    pub quiet: bool,
    /// Interactive menu (the default unless -q, --entry or -l).
    #[arg(short, long)]
    pub interactive: bool,
    /// List the entries of the config(s) found and exit.
    #[arg(short, long = "list-entries")]
    pub list_entries: bool,
    /// Do not extract anything; print what would be booted.
    #[arg(short, long = "not-really")]
    pub not_really: bool,
    /// Write the result here instead of standard output ("-": standard output).
    #[arg(long, value_name = "FILE")]
    pub output: Option<PathBuf>,
    /// sxp (default), simple (newline-separated) or simple0 (NUL-separated).
    #[arg(long = "output-format", value_name = "FORMAT", default_value = "sxp")]
    pub output_format: String,
    /// Directory for the extracted kernel and ramdisk (must exist).
    #[arg(long = "output-directory", value_name = "DIR")]
    pub output_directory: Option<PathBuf>,
    /// The entry to boot: a number (every entry counts, submenus included) or a title.
    #[arg(long, value_name = "N|TITLE")]
    pub entry: Option<String>,
    /// Boot this kernel (a path in the guest filesystem) instead of reading a config.
    #[arg(long, value_name = "PATH")]
    pub kernel: Option<String>,
    /// The ramdisk to go with --kernel.
    #[arg(long, value_name = "PATH")]
    pub ramdisk: Option<String>,
    /// The command line with --kernel; otherwise appended to the entry's.
    #[arg(long, value_name = "ARGS", allow_hyphen_values = true)]
    pub args: Option<String>,
    /// Byte offset of the filesystem (skips the partition table).
    #[arg(long, value_name = "BYTES")]
    pub offset: Option<u64>,
    /// DISK is a GRUB 2 config file to parse (debugging): prints kernel/initrd/args.
    #[arg(long)]
    pub isconfig: bool,
    /// After opening the disk and the output files, run as this user id (in an empty
    /// root directory) for everything that reads guest data. Needs -q or --entry.
    #[arg(long, value_name = "UID")]
    pub runas: Option<u32>,
    /// The image format (raw or qcow2). Default: block devices are raw; files are probed,
    /// and a probed qcow2 that names a backing file needs --format=qcow2 (a guest that
    /// writes a qcow2 header into its raw disk must not make dom0 open files it names).
    #[arg(long, value_name = "FORMAT")]
    pub format: Option<String>,
    /// Largest kernel or ramdisk to extract, in bytes (default 256 MiB).
    #[arg(long = "max-file-size", value_name = "BYTES")]
    pub max_file_size: Option<u64>,
    /// More detail on stderr.
    #[arg(long)]
    pub debug: bool,
    /// The disk: a raw or qcow2 image, or a block device.
    pub disk: PathBuf,
}

/// `pygrub ARGS...`: the same command under pygrub's name (libxl's `bootloader=`).
#[derive(Parser, Debug)]
#[command(name = "pygrub", version, disable_help_subcommand = true)]
pub struct PygrubCli {
    #[command(flatten)]
    pub args: BootArgs,
}

/// Python's `repr()` of a str, which pygrub's sxp output uses.
pub fn python_repr(s: &str) -> String {
    let quote = if s.contains('\'') && !s.contains('"') {
        '"'
    } else {
        '\''
    };
    let mut out = String::with_capacity(s.len() + 2);
    out.push(quote);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                out.push_str(&format!("\\x{:02x}", c as u32));
            }
            c if (0x80..0xa0).contains(&(c as u32)) => {
                out.push_str(&format!("\\x{:02x}", c as u32));
            }
            c => out.push(c),
        }
    }
    out.push(quote);
    out
}

/// The result in pygrub's formats.
pub fn format_output(
    format: &str,
    kernel: &str,
    ramdisk: Option<&str>,
    args: Option<&str>,
) -> Result<Vec<u8>> {
    match format {
        "sxp" => {
            let mut s = format!("linux (kernel {})", python_repr(kernel));
            if let Some(r) = ramdisk {
                s.push_str(&format!("(ramdisk {})", python_repr(r)));
            }
            if let Some(a) = args.filter(|a| !a.is_empty()) {
                s.push_str(&format!("(args {})", python_repr(a)));
            }
            Ok(s.into_bytes())
        }
        "simple" | "simple0" => {
            let sep = if format == "simple" { '\n' } else { '\0' };
            for v in [Some(kernel), ramdisk, args].into_iter().flatten() {
                if v.contains(sep) {
                    bail!("simple format cannot represent delimiter-containing value");
                }
            }
            let mut s = format!("kernel {kernel}{sep}");
            if let Some(r) = ramdisk {
                s.push_str(&format!("ramdisk {r}{sep}"));
            }
            if let Some(a) = args.filter(|a| !a.is_empty()) {
                s.push_str(&format!("args {a}{sep}"));
            }
            s.push(sep);
            Ok(s.into_bytes())
        }
        other => bail!("unknown output format {other}"),
    }
}

/// An opened image as the bootloader's disk.
struct ImageDisk(Arc<Image>);

impl ReadAt for ImageDisk {
    fn size(&self) -> u64 {
        self.0.size()
    }
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        xdisk_boot::disk::check_range(offset, buf.len(), self.size())?;
        self.0
            .read_at(buf, offset)
            .map_err(|e| std::io::Error::other(e.to_string()))
    }
}

/// Opens DISK read-only with the format rules of `--format` (see BootArgs::format).
fn open_disk(path: &Path, format: Option<&str>) -> Result<Arc<dyn ReadAt>> {
    let meta =
        std::fs::metadata(path).with_context(|| format!("cannot open {}", path.display()))?;
    let explicit: Option<Format> = match format {
        Some(f) => Some(f.parse().map_err(|e| anyhow!("{e}"))?),
        None => None,
    };
    let format = match explicit {
        Some(f) => f,
        None if meta.file_type().is_block_device() => Format::Raw,
        None => {
            // Probe: qcow2 magic. A probed qcow2 naming a backing file is refused.
            let mut head = [0u8; 16];
            let f = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
            use std::os::unix::fs::FileExt;
            let n = f.read_at(&mut head, 0).unwrap_or(0);
            if n >= 16 && head[0..4] == *b"QFI\xfb" {
                let backing = u64::from_be_bytes([
                    head[8], head[9], head[10], head[11], head[12], head[13], head[14], head[15],
                ]);
                if backing != 0 {
                    bail!(
                        "{} is a qcow2 image with a backing file: give --format=qcow2 to open its backing chain (format probing does not follow backing files)",
                        path.display()
                    );
                }
                Format::Qcow2
            } else {
                Format::Raw
            }
        }
    };
    let opts = OpenOptions {
        format: Some(format),
        read_only: true,
        cache: CacheMode::WriteBack,
        open_backing: true,
        no_repair: true,
        ..OpenOptions::default()
    };
    let img = Image::open(path, &opts).map_err(|e| anyhow!("{}: {e}", path.display()))?;
    Ok(Arc::new(ImageDisk(img)))
}

/// An extracted file: created exclusively, mode 0600, `boot_<kind>.XXXXXXXX`, removed on
/// drop unless kept.
struct OutFile {
    path: PathBuf,
    file: Option<File>,
    keep: bool,
}

impl OutFile {
    fn create(dir: &Path, kind: &str) -> Result<OutFile> {
        use rand::Rng;
        const CHARS: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789_";
        let mut rng = rand::thread_rng();
        for _ in 0..100 {
            let suffix: String = (0..8)
                .map(|_| CHARS[rng.gen_range(0..CHARS.len())] as char)
                .collect();
            let path = dir.join(format!("boot_{kind}.{suffix}"));
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW)
                .open(&path)
            {
                Ok(file) => {
                    return Ok(OutFile {
                        path,
                        file: Some(file),
                        keep: false,
                    })
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => {
                    return Err(e).with_context(|| format!("cannot create {}", path.display()))
                }
            }
        }
        bail!(
            "cannot create a unique boot_{kind} file in {}",
            dir.display()
        )
    }

    fn write_all(&mut self, data: &[u8]) -> Result<()> {
        let f = self.file.as_mut().ok_or_else(|| anyhow!("file closed"))?;
        f.write_all(data)
            .with_context(|| format!("writing {}", self.path.display()))?;
        Ok(())
    }
}

impl Drop for OutFile {
    fn drop(&mut self) {
        self.file.take();
        if !self.keep {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Drops privileges: an empty root directory, no supplementary groups, `uid` as user and
/// group (pygrub's depriv), and a file size limit of `max_file` for anything written after.
fn drop_privileges(uid: u32, max_file: u64) -> Result<()> {
    let dir = tempfile::Builder::new()
        .prefix("xdisk-boot-root.")
        .tempdir()
        .context("creating an empty root directory")?;
    // The directory stays (empty, root-owned) until we exit: we are inside it.
    let dir = dir.keep();
    std::os::unix::fs::chroot(&dir).with_context(|| format!("chroot {}", dir.display()))?;
    std::env::set_current_dir("/").context("chdir / in the new root")?;
    crate::privs::set_fsize_limit(max_file)?;
    crate::privs::become_user(uid)?;
    Ok(())
}

/// Runs `xdisk boot` / `pygrub`. Returns the exit code.
pub fn run(a: BootArgs) -> Result<i32> {
    let limits = Limits {
        max_file: a.max_file_size.unwrap_or(Limits::default().max_file),
        ..Limits::default()
    };
    if !["sxp", "simple", "simple0"].contains(&a.output_format.as_str()) {
        eprintln!("unknown output format {}", a.output_format);
        return Ok(1);
    }
    let output_dir = match &a.output_directory {
        Some(d) => {
            if !d.is_dir() {
                eprintln!("{} is not an existing directory", d.display());
                return Ok(1);
            }
            d.clone()
        }
        None => PathBuf::from(DEFAULT_OUTPUT_DIR),
    };
    // pygrub's rule: interactive unless -q or --entry; --runas (a non-root uid) needs that.
    let interactive = !a.quiet && a.entry.is_none();
    if a.runas.is_some_and(|u| u != 0) && interactive {
        eprintln!("In order to use --runas, you must also set --entry or -q");
        return Ok(1);
    }

    if a.isconfig {
        return run_isconfig(&a, &limits);
    }

    if !a.not_really && !a.list_entries {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&output_dir)
            .with_context(|| format!("cannot create {}", output_dir.display()))?;
    }
    let mut out: Box<dyn Write> = match &a.output {
        Some(p) if p.as_os_str() != "-" => Box::new(
            std::fs::OpenOptions::new()
                .write(true)
                .open(p)
                .with_context(|| format!("cannot open {}", p.display()))?,
        ),
        _ => Box::new(std::io::stdout()),
    };
    let (mut kfile, mut rfile) = if a.not_really || a.list_entries {
        (None, None)
    } else {
        (
            Some(OutFile::create(&output_dir, "kernel")?),
            Some(OutFile::create(&output_dir, "ramdisk")?),
        )
    };
    let disk = open_disk(&a.disk, a.format.as_deref())?;
    if let Some(uid) = a.runas {
        drop_privileges(uid, limits.max_file)?;
    }

    let mut req = BootRequest {
        entry: a.entry.clone(),
        kernel: a.kernel.clone(),
        ramdisk: a.ramdisk.clone(),
        args: a.args.clone(),
        offset: a.offset,
        limits: limits.clone(),
    };

    if a.list_entries {
        let (found, why) = find::scan(&disk, &req)?;
        for f in &found {
            let Some((path, cfg)) = &f.config else {
                continue;
            };
            if a.debug {
                eprintln!(
                    "{} ({}): {path}",
                    find::describe(&f.partition),
                    f.fs.fs_type()
                );
            }
            print_entries(cfg);
        }
        if found.iter().all(|f| f.config.is_none()) {
            for w in why {
                eprintln!("{w}");
            }
        }
        return Ok(0);
    }

    let mut choice = find::choose(&disk, &req)?;
    if a.debug {
        if let Some((path, _)) = &choice.found.config {
            eprintln!(
                "Using {path} on {} ({})",
                find::describe(&choice.found.partition),
                choice.found.fs.fs_type()
            );
        }
    }
    if interactive && !a.list_entries && req.kernel.is_none() && std::io::stdin().is_terminal() {
        if let (Some((_, cfg)), Some(sel)) = (&choice.found.config, choice.entry) {
            let picked = crate::boot_menu::run(cfg, sel)?;
            if picked != sel {
                req.entry = Some(picked.to_string());
                req.offset = Some(choice.found.partition.start);
                choice = find::choose(&disk, &req)?;
            }
        }
    }

    let fs = &*choice.found.fs;
    let (kernel_out, ramdisk_out) = if a.not_really {
        (
            format!("<kernel:{}>", choice.kernel),
            choice.ramdisk.as_ref().map(|r| format!("<ramdisk:{r}>")),
        )
    } else {
        let mut kf = kfile.take().ok_or_else(|| anyhow!("no kernel file"))?;
        let data = fs
            .read_file(&choice.kernel, limits.max_file)
            .map_err(|e| anyhow!("reading the kernel from the guest: {e}"))?;
        kf.write_all(&data)?;
        drop(data);
        let ramdisk = match &choice.ramdisk {
            Some(r) => {
                let mut rf = rfile.take().ok_or_else(|| anyhow!("no ramdisk file"))?;
                let data = fs
                    .read_file(r, limits.max_file)
                    .map_err(|e| anyhow!("reading the ramdisk from the guest: {e}"))?;
                rf.write_all(&data)?;
                Some(rf)
            }
            None => None, // the empty ramdisk file is removed on drop
        };
        let kp = kf.path.display().to_string();
        let rp = ramdisk.as_ref().map(|r| r.path.display().to_string());
        kf.keep = true;
        if let Some(mut r) = ramdisk {
            r.keep = true;
        }
        (kp, rp)
    };
    let args = (!choice.args.is_empty()).then_some(choice.args.as_str());
    let text = format_output(&a.output_format, &kernel_out, ramdisk_out.as_deref(), args)?;
    out.write_all(&text)
        .and_then(|_| out.flush())
        .context("writing the result")?;
    Ok(0)
}

fn print_entries(cfg: &BootConfig) {
    for e in &cfg.entries {
        println!("title: {}", e.title);
        println!("  kernel: {}", e.kernel.as_deref().unwrap_or("None"));
        println!("  args: {}", e.args);
        println!("  initrd: {}", e.initrd.as_deref().unwrap_or("None"));
    }
}

/// `--isconfig`: DISK is a GRUB 2 config; prints what it boots (pygrub's debug mode).
fn run_isconfig(a: &BootArgs, limits: &Limits) -> Result<i32> {
    let meta = std::fs::metadata(&a.disk)
        .with_context(|| format!("Unable to access {}", a.disk.display()))?;
    if meta.len() > limits.max_config {
        bail!(
            "{}: {} bytes is over the limit of {} bytes",
            a.disk.display(),
            meta.len(),
            limits.max_config
        );
    }
    let bytes =
        std::fs::read(&a.disk).with_context(|| format!("Unable to access {}", a.disk.display()))?;
    let cfg = grub2::parse(&String::from_utf8_lossy(&bytes), &GrubEnv::default())?;
    if cfg.entries.is_empty() {
        bail!("{}: no entries", a.disk.display());
    }
    let mut sel = cfg.default.min(cfg.entries.len() - 1);
    if let Some(i) = a.entry.as_deref().and_then(|e| find::entry_index(&cfg, e)) {
        sel = i;
    }
    let e = &cfg.entries[sel];
    let mut args = e.args.clone();
    if let Some(extra) = a.args.as_deref().filter(|x| !x.is_empty()) {
        args.push(' ');
        args.push_str(extra);
    }
    println!("  kernel: {}", e.kernel.as_deref().unwrap_or("None"));
    if let Some(i) = &e.initrd {
        println!("  initrd: {i}");
    }
    println!("  args: {args}");
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sxp_quotes_like_python_repr() {
        assert_eq!(python_repr("a b"), "'a b'");
        assert_eq!(python_repr("it's"), "\"it's\"");
        assert_eq!(python_repr("a'b\"c"), "'a\\'b\"c'");
        assert_eq!(python_repr("x\\y\n"), "'x\\\\y\\n'");
        let out = format_output("sxp", "/k", Some("/r"), Some("root=/dev/xvda1 ro")).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "linux (kernel '/k')(ramdisk '/r')(args 'root=/dev/xvda1 ro')"
        );
    }

    #[test]
    fn simple_formats_end_with_an_empty_item() {
        let out = format_output("simple", "/k", None, Some("a")).unwrap();
        assert_eq!(out, b"kernel /k\nargs a\n\n");
        let out = format_output("simple0", "/k", Some("/r"), None).unwrap();
        assert_eq!(out, b"kernel /k\0ramdisk /r\0\0");
        assert!(format_output("simple", "/k", None, Some("a\nb")).is_err());
    }
}
