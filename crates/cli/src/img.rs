//! `xdisk img`: create, info, check, convert, map, resize, compare, bench, bitmap — in qemu-img's
//! spelling, with qemu-img's output formats and exit codes where scripts depend on them.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use xdisk_io::is_zero;

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Subcommand, ValueEnum};
use serde_json::{json, Value};

use xdisk_image::{check, CompressionType, CreateOptions, Preallocation, Repair};
use xdisk_image::{CacheMode, Format, Image, OpenOptions};

use crate::size::{human, parse_size};

#[derive(Subcommand)]
pub enum ImgCommand {
    /// Create an image: `create [-f fmt] [-o options] [-b backing [-F backing_fmt]] file [size]`.
    Create(CreateArgs),
    /// Show information about an image (and its backing chain with --backing-chain).
    Info(InfoArgs),
    /// Check a qcow2 image for leaks and corruptions; `-r leaks|all` repairs.
    Check(CheckArgs),
    /// Convert an image to another format (sparse output).
    Convert(ConvertArgs),
    /// Print the allocation map of an image.
    Map(MapArgs),
    /// Change the virtual size of an image.
    Resize(ResizeArgs),
    /// Compare the guest-visible contents of two images.
    Compare(CompareArgs),
    /// Run a simple I/O benchmark, like `qemu-img bench`.
    Bench(crate::img_bench::BenchArgs),
    /// Change the persistent dirty bitmaps of a qcow2 image, like `qemu-img bitmap`.
    ///
    /// `bitmap (--merge SOURCE | --add | --remove | --clear | --enable | --disable)...
    /// [-b SOURCE_FILE [-F SOURCE_FMT]] [-g GRANULARITY] [-f FMT] FILENAME BITMAP`: the
    /// actions apply to BITMAP in the order given; `xdisk img info` lists the bitmaps. An
    /// image opened writable keeps its enabled bitmaps up to date (see README, "Persistent
    /// dirty bitmaps").
    #[command(
        after_long_help = "Examples:\n  xdisk img bitmap --add -g 64k disk.qcow2 backup-0\n  xdisk img bitmap --add --disable disk.qcow2 frozen\n  xdisk img bitmap --merge backup-0 -b old.qcow2 -F qcow2 disk.qcow2 all\n  xdisk img bitmap --clear --enable disk.qcow2 backup-0\n  xdisk img bitmap --remove disk.qcow2 backup-0"
    )]
    Bitmap(crate::img_bitmap::BitmapArgs),
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum OutputFormat {
    Human,
    Json,
}

#[derive(Args)]
pub struct CreateArgs {
    /// Image format (raw or qcow2).
    #[arg(short = 'f', default_value = "raw")]
    format: String,
    /// Format options, comma separated: cluster_size, backing_file, backing_fmt,
    /// preallocation (off|metadata|falloc|full), compression_type (zlib|zstd),
    /// lazy_refcounts (on|off), compat (0.10|1.1|v2|v3), refcount_bits; for an image on
    /// RBD also object_size (4K-32M; a raw image's cluster_size too, as QEMU),
    /// features (layering+exclusive-lock+object-map+fast-diff+deep-flatten+journaling+
    /// striping, or none), data_pool, stripe_unit, stripe_count, and for a raw one
    /// librbd's encryption: encrypt.format (luks|luks2), encrypt.key-secret (the id of an
    /// --object secret), encrypt.cipher-alg (aes-128|aes-256).
    #[arg(short = 'o', action = clap::ArgAction::Append)]
    options: Vec<String>,
    /// Backing file.
    #[arg(short = 'b')]
    backing: Option<String>,
    /// Backing file format.
    #[arg(short = 'F')]
    backing_fmt: Option<String>,
    /// Quiet.
    #[arg(short = 'q')]
    quiet: bool,
    file: PathBuf,
    size: Option<String>,
}

#[derive(Args)]
pub struct InfoArgs {
    #[arg(short = 'f')]
    format: Option<String>,
    #[arg(long = "output", value_enum, default_value = "human")]
    output: OutputFormat,
    /// Show every image of the backing chain.
    #[arg(long = "backing-chain")]
    backing_chain: bool,
    /// Accepted for compatibility with qemu-img (xdisk never locks images).
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    file: PathBuf,
    /// Backing files must lie in one of these directories (comma separated; symbolic links
    /// resolved). Default: anywhere (regular files and block devices outside /proc, /sys).
    #[arg(long = "backing-dirs", value_delimiter = ',')]
    backing_dirs: Vec<PathBuf>,
}

#[derive(Args)]
pub struct CheckArgs {
    #[arg(short = 'f')]
    format: Option<String>,
    /// Repair: leaks or all.
    #[arg(short = 'r')]
    repair: Option<String>,
    #[arg(long = "output", value_enum, default_value = "human")]
    output: OutputFormat,
    #[arg(short = 'q')]
    quiet: bool,
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    file: PathBuf,
}

#[derive(Args)]
pub struct ConvertArgs {
    /// Source format (probed if absent).
    #[arg(short = 'f')]
    format: Option<String>,
    /// Output format.
    #[arg(short = 'O', default_value = "raw")]
    out_format: String,
    /// Output format options (as for create).
    #[arg(short = 'o', action = clap::ArgAction::Append)]
    options: Vec<String>,
    /// Compressed output (qcow2 only): data clusters are stored compressed with the
    /// image's compression_type (zlib or zstd).
    #[arg(short = 'c')]
    compress: bool,
    /// Show progress.
    #[arg(short = 'p')]
    progress: bool,
    /// Cache mode of the source (qemu-img's -T) and of the output (-t).
    #[arg(short = 'T', default_value = "writeback")]
    src_cache: String,
    #[arg(short = 't', default_value = "writeback")]
    cache: String,
    /// Consecutive zero bytes needed to leave a hole in the output (qemu-img -S, default 4k;
    /// 0 writes everything).
    #[arg(short = 'S', default_value = "4k")]
    sparse: String,
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    #[arg(short = 'q')]
    quiet: bool,
    /// Do not create the output: write into an existing image (a file, a block device, an
    /// NBD export) at least as large as the source, of format -O.
    #[arg(short = 'n')]
    no_create: bool,
    /// With -n: the output already reads as zeroes, so zero ranges of the source are skipped
    /// rather than zeroed in it.
    #[arg(long = "target-is-zero", requires = "no_create")]
    target_is_zero: bool,
    /// Copy with this many threads at once (qemu-img's coroutines), each on its own 2 MiB
    /// chunk (compression runs in them too, on every core).
    #[arg(short = 'm', default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=64))]
    parallel: u32,
    /// Accepted for qemu-img's spelling: with -m above 1, chunks are always written as they
    /// are ready (out of order), as qemu-img -W.
    #[arg(short = 'W')]
    out_of_order: bool,
    src: PathBuf,
    dst: PathBuf,
    /// Backing files must lie in one of these directories (comma separated; symbolic links
    /// resolved). Default: anywhere (regular files and block devices outside /proc, /sys).
    #[arg(long = "backing-dirs", value_delimiter = ',')]
    backing_dirs: Vec<PathBuf>,
}

#[derive(Args)]
pub struct MapArgs {
    #[arg(short = 'f')]
    format: Option<String>,
    #[arg(long = "output", value_enum, default_value = "human")]
    output: OutputFormat,
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    file: PathBuf,
    /// Backing files must lie in one of these directories (comma separated; symbolic links
    /// resolved). Default: anywhere (regular files and block devices outside /proc, /sys).
    #[arg(long = "backing-dirs", value_delimiter = ',')]
    backing_dirs: Vec<PathBuf>,
}

#[derive(Args)]
pub struct ResizeArgs {
    #[arg(short = 'f')]
    format: Option<String>,
    /// Allow shrinking (data past the new end is lost).
    #[arg(long)]
    shrink: bool,
    #[arg(short = 'q')]
    quiet: bool,
    file: PathBuf,
    /// New size, or +N / -N relative to the current size.
    #[arg(allow_hyphen_values = true)]
    size: String,
    /// Backing files must lie in one of these directories (comma separated; symbolic links
    /// resolved). Default: anywhere (regular files and block devices outside /proc, /sys).
    #[arg(long = "backing-dirs", value_delimiter = ',')]
    backing_dirs: Vec<PathBuf>,
}

#[derive(Args)]
pub struct CompareArgs {
    #[arg(short = 'f')]
    format1: Option<String>,
    #[arg(short = 'F')]
    format2: Option<String>,
    /// Strict: images of different size are different.
    #[arg(short = 's')]
    strict: bool,
    #[arg(short = 'q')]
    quiet: bool,
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    file1: PathBuf,
    file2: PathBuf,
    /// Backing files must lie in one of these directories (comma separated; symbolic links
    /// resolved). Default: anywhere (regular files and block devices outside /proc, /sys).
    #[arg(long = "backing-dirs", value_delimiter = ',')]
    backing_dirs: Vec<PathBuf>,
}

pub fn run(cmd: ImgCommand) -> Result<i32> {
    match cmd {
        ImgCommand::Create(a) => cmd_create(a),
        ImgCommand::Info(a) => cmd_info(a),
        ImgCommand::Check(a) => cmd_check(a),
        ImgCommand::Convert(a) => cmd_convert(a),
        ImgCommand::Map(a) => cmd_map(a),
        ImgCommand::Resize(a) => cmd_resize(a),
        ImgCommand::Compare(a) => cmd_compare(a),
        ImgCommand::Bench(a) => crate::img_bench::run(a),
        ImgCommand::Bitmap(a) => crate::img_bitmap::run(a),
    }
}

/// A disk name for messages: a path as given, a storage name with its secrets (an RBD
/// `key=`) hidden.
pub fn shown(p: &Path) -> String {
    match xdisk_image::DiskSource::parse(&p.to_string_lossy(), None) {
        Ok(src) if src.local_path().is_none() => src.to_string(),
        _ => p.display().to_string(),
    }
}

fn parse_format(s: Option<&str>) -> Result<Option<Format>> {
    s.map(|f| f.parse::<Format>().map_err(|e| anyhow!("{e}")))
        .transpose()
}

pub fn open(
    path: &Path,
    format: Option<&str>,
    read_only: bool,
    cache: CacheMode,
) -> Result<Arc<Image>> {
    open_in(path, format, read_only, cache, &[])
}

/// [`open`] with backing files confined to `backing_dirs` (if not empty).
pub fn open_in(
    path: &Path,
    format: Option<&str>,
    read_only: bool,
    cache: CacheMode,
    backing_dirs: &[PathBuf],
) -> Result<Arc<Image>> {
    let opts = OpenOptions {
        format: parse_format(format)?,
        read_only,
        cache,
        backing_dirs: backing_dirs.to_vec(),
        ..OpenOptions::default()
    };
    let name = path.to_string_lossy();
    xdisk_image::DiskSource::parse(&name, opts.format)
        .and_then(|src| src.open(&opts))
        .with_context(|| format!("could not open '{}'", shown(path)))
}

fn parse_on_off(key: &str, v: &str) -> Result<bool> {
    match v {
        "on" | "true" | "yes" => Ok(true),
        "off" | "false" | "no" => Ok(false),
        _ => bail!("invalid value '{v}' for {key} (on/off)"),
    }
}

/// Applies `-o key=value,...` options to create options.
fn apply_options(opts: &mut CreateOptions, list: &[String]) -> Result<()> {
    for group in list {
        for kv in group.split(',').filter(|s| !s.is_empty()) {
            let (k, v) = kv
                .split_once('=')
                .ok_or_else(|| anyhow!("invalid option '{kv}' (expected key=value)"))?;
            match k {
                "size" => opts.size = parse_size(v)?,
                "cluster_size" => opts.cluster_size = parse_size(v)?,
                "backing_file" => opts.backing_file = Some(v.to_string()),
                "backing_fmt" => opts.backing_format = Some(v.to_string()),
                "preallocation" => {
                    opts.preallocation = match v {
                        "off" => Preallocation::Off,
                        "metadata" => Preallocation::Metadata,
                        "falloc" => Preallocation::Falloc,
                        "full" => Preallocation::Full,
                        _ => bail!("invalid preallocation '{v}' (off, metadata, falloc, full)"),
                    }
                }
                "compression_type" => {
                    opts.compression_type = match v {
                        "zlib" => CompressionType::Zlib,
                        "zstd" => CompressionType::Zstd,
                        _ => bail!("invalid compression_type '{v}' (zlib, zstd)"),
                    }
                }
                "lazy_refcounts" => opts.lazy_refcounts = parse_on_off(k, v)?,
                "compat" => {
                    opts.version = match v {
                        "0.10" | "v2" => 2,
                        "1.1" | "v3" => 3,
                        _ => bail!("invalid compat '{v}' (0.10 or 1.1)"),
                    }
                }
                "refcount_bits" => {
                    opts.refcount_bits = v
                        .parse()
                        .map_err(|_| anyhow!("invalid refcount_bits '{v}'"))?
                }
                _ => match opts.rbd.set(k, v) {
                    Ok(true) => {}
                    Ok(false) => bail!("unsupported option '{k}'"),
                    Err(why) => bail!("{why}"),
                },
            }
        }
    }
    Ok(())
}

/// Registers the secrets of `--object secret,id=ID,file=PATH|data=STRING[,format=raw|base64]
/// [,keyid=ID,iv=BASE64]` (qemu-img's spelling; `,,` is a literal comma; with `format=base64`
/// the data or the file's content is base64, as QEMU decodes it; with `keyid` it is
/// encrypted with AES-256-CBC by the 32-byte secret `keyid` given before, as libvirt passes
/// secrets to QEMU) for names and options that say `encrypt.key-secret=ID`. Messages never
/// echo a secret's data.
pub fn register_objects(objects: &[String]) -> Result<()> {
    for o in objects {
        let parts = split_qemu_opts(o);
        let mut parts = parts.iter().map(String::as_str);
        let kind = parts.next().unwrap_or("");
        if !matches!(kind, "secret" | "qom-type=secret") {
            let shown = if kind.contains('=') { "" } else { kind };
            bail!("--object {shown}...: only --object secret,id=ID,file=PATH is supported");
        }
        let (mut id, mut data, mut file, mut base64) = (None, None, None, false);
        let (mut keyid, mut iv) = (None, None);
        for kv in parts {
            let (k, v) = kv
                .split_once('=')
                .ok_or_else(|| anyhow!("--object secret: expected key=value after secret"))?;
            match k {
                "id" => id = Some(v.to_owned()),
                "data" => data = Some(v.as_bytes().to_vec()),
                "file" => file = Some(v.to_owned()),
                "keyid" => keyid = Some(v.to_owned()),
                "iv" => iv = Some(v.to_owned()),
                "format" if v == "raw" => base64 = false,
                "format" if v == "base64" => base64 = true,
                "format" => bail!("--object secret: format={v} is not supported (raw or base64)"),
                _ => bail!(
                    "--object secret: '{k}' is not supported (id, file, data, format=raw|base64, \
                     keyid, iv)"
                ),
            }
        }
        let id = id
            .filter(|i| !i.is_empty())
            .ok_or_else(|| anyhow!("--object secret needs id=ID"))?;
        let input = match (data, file) {
            (Some(d), None) => d,
            (None, Some(f)) => xdisk_rbd::Passphrase::from_file(&f)
                .map_err(|e| anyhow!("--object secret,id={id}: {e}"))?
                .as_bytes()
                .to_vec(),
            _ => bail!("--object secret,id={id}: give file=PATH or data=STRING (one of them)"),
        };
        let pass = match (keyid, iv) {
            (Some(k), Some(iv)) => {
                let master = xdisk_rbd::registered_secret(&k).ok_or_else(|| {
                    anyhow!("--object secret,id={id}: no secret '{k}' given before it (keyid)")
                })?;
                xdisk_rbd::Passphrase::decrypt(&master, &iv, input, base64)
            }
            (Some(_), None) => bail!("--object secret,id={id}: keyid needs iv=BASE64 too"),
            (None, Some(_)) => bail!("--object secret,id={id}: iv without keyid"),
            (None, None) if base64 => xdisk_rbd::Passphrase::from_base64(input),
            (None, None) => xdisk_rbd::Passphrase::new(input),
        }
        .map_err(|e| anyhow!("--object secret,id={id}: {e}"))?;
        xdisk_rbd::register_secret(&id, pass);
    }
    Ok(())
}

/// Splits QEMU's option syntax at commas, `,,` standing for a comma.
fn split_qemu_opts(s: &str) -> Vec<String> {
    let mut out = vec![String::new()];
    let mut it = s.chars().peekable();
    while let Some(c) = it.next() {
        if c == ',' {
            if it.peek() == Some(&',') {
                it.next();
                if let Some(l) = out.last_mut() {
                    l.push(',');
                }
            } else {
                out.push(String::new());
            }
        } else if let Some(l) = out.last_mut() {
            l.push(c);
        }
    }
    out
}

/// `encrypt.*` options of `-o`, as given (key, value).
type EncryptOptions = Vec<(String, String)>;

/// The `encrypt.*` options of `-o` (QEMU's rbd driver's create options), taken out of the
/// lists; when given, the output's name says them (`:encrypt.format=...`), so that creating
/// it formats it and every later open of it loads the encryption.
fn take_encrypt(list: &[String]) -> Result<(Vec<String>, EncryptOptions)> {
    let mut rest = Vec::new();
    let mut enc = Vec::new();
    for group in list {
        let mut keep = Vec::new();
        for kv in group.split(',').filter(|s| !s.is_empty()) {
            match kv.split_once('=') {
                Some((k, v)) if k.starts_with("encrypt.") => {
                    if !matches!(
                        k,
                        "encrypt.format" | "encrypt.key-secret" | "encrypt.cipher-alg"
                    ) {
                        bail!("unsupported option '{k}' (encrypt.format, encrypt.key-secret, encrypt.cipher-alg)");
                    }
                    enc.push((k.to_owned(), v.to_owned()))
                }
                _ => keep.push(kv),
            }
        }
        rest.push(keep.join(","));
    }
    Ok((rest, enc))
}

/// The output's name with the `-o encrypt.*` options in it (see [`take_encrypt`]).
fn encrypted_name(file: &str, format: Format, enc: &[(String, String)]) -> Result<String> {
    if enc.is_empty() {
        return Ok(file.to_owned());
    }
    if format == Format::Qcow2 {
        bail!(
            "-o encrypt.* with -f qcow2 asks for qcow2's own encryption (as qemu-img reads it), which xdisk does not implement; librbd's encryption of an RBD image holds raw images (-f raw)"
        );
    }
    if !xdisk_rbd::is_rbd_name(file) {
        bail!("-o encrypt.*: librbd's encryption, for images on RBD only (rbd:POOL/IMAGE)");
    }
    let mut n = xdisk_rbd::RbdName::parse(file).map_err(|e| anyhow!("bad RBD name: {e}"))?;
    if n.encrypt.is_some() {
        bail!("{n}: give the encryption once, in the name or with -o encrypt.*");
    }
    let get = |k: &str| enc.iter().rev().find(|(key, _)| key == k).map(|(_, v)| v);
    let format = get("encrypt.format")
        .ok_or_else(|| anyhow!("-o encrypt.*: encrypt.format=luks|luks2 is required"))?;
    let format = xdisk_rbd::LuksFormat::parse(format).map_err(|e| anyhow!("{e}"))?;
    let id = get("encrypt.key-secret").ok_or_else(|| {
        anyhow!(
            "-o encrypt.format needs encrypt.key-secret=ID (with --object secret,id=ID,file=PATH)"
        )
    })?;
    let cipher = get("encrypt.cipher-alg")
        .map(|c| xdisk_rbd::CipherAlg::parse(c).map_err(|e| anyhow!("{e}")))
        .transpose()?;
    n.encrypt = Some(xdisk_rbd::Encryption {
        format,
        key: xdisk_rbd::KeySource::Secret(id.clone()),
        cipher,
    });
    Ok(n.to_spec())
}

/// QEMU's rbd driver takes a raw image's `cluster_size` as the RBD object size.
fn rbd_cluster_size(opts: &mut CreateOptions, format: Format, file: &str, list: &[String]) {
    let given = list
        .iter()
        .flat_map(|g| g.split(','))
        .any(|kv| kv.starts_with("cluster_size="));
    if given && format == Format::Raw && file.starts_with("rbd:") && opts.rbd.object_size.is_none()
    {
        opts.rbd.object_size = Some(opts.cluster_size);
    }
}

fn cmd_create(mut a: CreateArgs) -> Result<i32> {
    let format: Format = a.format.parse().map_err(|e| anyhow!("{e}"))?;
    let mut opts = CreateOptions::default();
    if let Some(s) = &a.size {
        opts.size = parse_size(s)?;
    }
    let (options, enc) = take_encrypt(&a.options)?;
    a.file = encrypted_name(&a.file.to_string_lossy(), format, &enc)?.into();
    apply_options(&mut opts, &options)?;
    rbd_cluster_size(&mut opts, format, &a.file.to_string_lossy(), &options);
    if a.backing.is_some() {
        opts.backing_file = a.backing.clone();
    }
    if a.backing_fmt.is_some() {
        opts.backing_format = a.backing_fmt.clone();
    }
    let dst = xdisk_image::DiskSource::parse(&a.file.to_string_lossy(), Some(format))?;
    if opts.backing_file.is_some() && dst.local_path().is_none() {
        bail!("{dst}: backing files of images that are not host files are not supported yet");
    }
    if let Some(b) = &opts.backing_file {
        // Like qemu-img: the backing file must open, and gives the size when none is given.
        let bpath = xdisk_image::resolve_backing(&a.file, b);
        let backing = open(
            &bpath,
            opts.backing_format.as_deref(),
            true,
            CacheMode::WriteBack,
        )
        .with_context(|| format!("could not open backing file '{b}'"))?;
        if opts.backing_format.is_none() {
            opts.backing_format = Some(backing.format().to_string());
        }
        if a.size.is_none() && opts.size == 0 {
            opts.size = backing.size();
        }
    } else if a.size.is_none() && opts.size == 0 {
        bail!("image creation needs a size parameter");
    }
    // qemu-img rounds the size up to a multiple of 512.
    opts.size = opts.size.div_ceil(512) * 512;
    if !a.quiet {
        let mut line = format!("Formatting '{dst}', fmt={} size={}", format, opts.size);
        if format == Format::Qcow2 {
            if let Some(b) = &opts.backing_file {
                line += &format!(" backing_file={b}");
            }
            if let Some(b) = &opts.backing_format {
                line += &format!(" backing_fmt={b}");
            }
            line += &format!(
                " cluster_size={} compression_type={} lazy_refcounts={} refcount_bits={}",
                opts.cluster_size,
                opts.compression_type.as_str(),
                if opts.lazy_refcounts { "on" } else { "off" },
                opts.refcount_bits
            );
        }
        println!("{line}");
    }
    dst.create(format, &opts)?;
    Ok(0)
}

fn info_json(path: &Path, img: &Image) -> Result<Value> {
    let mut v = json!({
        "filename": path.display().to_string(),
        "format": img.format().as_str(),
        "virtual-size": img.size(),
        "dirty-flag": false,
    });
    if let Some(n) = img.actual_size()? {
        v["actual-size"] = json!(n);
    }
    // librbd's encryption loaded (as qemu-img says of LUKS images).
    if xdisk_rbd::RbdName::parse(&path.to_string_lossy()).is_ok_and(|n| n.encrypt.is_some()) {
        v["encrypted"] = json!(true);
    }
    let info = img.info();
    if let Some(cs) = info.cluster_size {
        v["cluster-size"] = json!(cs);
    }
    v["dirty-flag"] = json!(info.dirty);
    if !info.specific.is_empty() {
        let mut data = serde_json::Map::new();
        for (k, text) in &info.specific {
            data.insert((*k).to_owned(), serde_json::from_str(text)?);
        }
        v["format-specific"] = json!({"type": img.format().as_str(), "data": data});
    }
    if let Some(b) = &info.backing_file {
        v["backing-filename"] = json!(b);
        // As qemu-img: no full name when a relative name cannot be resolved (the image is
        // not a host file); a URI is its own full name.
        let here = img.storage().local_path().map(|_| path);
        match xdisk_image::backing_target(here, b) {
            Ok(xdisk_image::BackingTarget::File(p)) => {
                v["full-backing-filename"] = json!(p.display().to_string())
            }
            Ok(xdisk_image::BackingTarget::Uri(_)) => v["full-backing-filename"] = json!(b),
            Ok(xdisk_image::BackingTarget::Unresolvable) | Err(_) => {}
        }
    }
    if let Some(f) = &info.backing_format {
        v["backing-filename-format"] = json!(f);
    }
    if !info.snapshots.is_empty() {
        v["snapshots"] = Value::Array(
            info.snapshots
                .iter()
                .map(|s| {
                    json!({
                        "id": s.id, "name": s.name, "vm-state-size": s.vm_state_size,
                        "date-sec": s.date_sec, "date-nsec": s.date_nsec,
                        "vm-clock-sec": s.vm_clock_nsec / 1_000_000_000,
                        "vm-clock-nsec": s.vm_clock_nsec % 1_000_000_000,
                    })
                })
                .collect(),
        );
    }
    Ok(v)
}

fn info_human(v: &Value) -> String {
    let mut s = String::new();
    let g = |k: &str| v.get(k).cloned().unwrap_or(Value::Null);
    s += &format!("image: {}\n", g("filename").as_str().unwrap_or(""));
    s += &format!("file format: {}\n", g("format").as_str().unwrap_or(""));
    let vs = g("virtual-size").as_u64().unwrap_or(0);
    s += &format!("virtual size: {} ({vs} bytes)\n", human(vs));
    // qemu-img's words when the storage cannot tell.
    s += &format!(
        "disk size: {}\n",
        g("actual-size")
            .as_u64()
            .map_or_else(|| "unavailable".to_owned(), human)
    );
    if g("encrypted").as_bool() == Some(true) {
        s += "encrypted: yes\n";
    }
    if let Some(cs) = g("cluster-size").as_u64() {
        s += &format!("cluster_size: {cs}\n");
    }
    if let Some(b) = g("backing-filename").as_str() {
        match g("full-backing-filename").as_str() {
            Some(full) if full != b => s += &format!("backing file: {b} (actual path: {full})\n"),
            Some(_) => s += &format!("backing file: {b}\n"),
            None => s += &format!("backing file: {b} (cannot determine actual path)\n"),
        }
    }
    if let Some(b) = g("backing-filename-format").as_str() {
        s += &format!("backing file format: {b}\n");
    }
    if let Some(why) = g("backing-refused").as_str() {
        s += &format!("backing file not opened: {why}\n");
    }
    if let Some(snaps) = g("snapshots").as_array() {
        s += "Snapshot list:\nID        TAG               VM SIZE                DATE     VM CLOCK     ICOUNT\n";
        for sn in snaps {
            s += &format!(
                "{:<9} {:<17} {:>7} {:>20} {:>12}\n",
                sn["id"].as_str().unwrap_or(""),
                sn["name"].as_str().unwrap_or(""),
                human(sn["vm-state-size"].as_u64().unwrap_or(0)),
                sn["date-sec"].as_u64().unwrap_or(0),
                sn["vm-clock-sec"].as_u64().unwrap_or(0),
            );
        }
    }
    if let Some(d) = v.pointer("/format-specific/data") {
        s += "Format specific information:\n";
        for (k, label) in [
            ("compat", "compat"),
            ("compression-type", "compression type"),
            ("lazy-refcounts", "lazy refcounts"),
            ("bitmaps", "bitmaps"),
            ("refcount-bits", "refcount bits"),
            ("corrupt", "corrupt"),
            ("extended-l2", "extended l2"),
        ] {
            if let (Some(list), "bitmaps") = (d.get(k).and_then(Value::as_array), k) {
                // qemu-img's layout of a list of objects.
                s += "    bitmaps:\n";
                for (i, b) in list.iter().enumerate() {
                    s += &format!("        [{i}]:\n            flags:\n");
                    for (j, f) in b["flags"].as_array().into_iter().flatten().enumerate() {
                        s += &format!("                [{j}]: {}\n", f.as_str().unwrap_or(""));
                    }
                    s += &format!(
                        "            name: {}\n            granularity: {}\n",
                        b["name"].as_str().unwrap_or(""),
                        b["granularity"]
                    );
                }
                continue;
            }
            if let Some(x) = d.get(k) {
                let t = match x {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                s += &format!("    {label}: {t}\n");
            }
        }
    }
    s
}

fn cmd_info(a: InfoArgs) -> Result<i32> {
    let _ = a.force_share;
    let opts = OpenOptions {
        format: parse_format(a.format.as_deref())?,
        read_only: true,
        cache: CacheMode::WriteBack,
        open_backing: a.backing_chain,
        backing_dirs: a.backing_dirs.clone(),
        ..OpenOptions::default()
    };
    // The chain is opened as far as it may be: a backing file that is refused (or fails to
    // open) ends it, and is shown with the reason, so that an operator sees what the image
    // would open.
    let (img, refusal) = xdisk_image::DiskSource::parse(&a.file.to_string_lossy(), opts.format)
        .and_then(|src| src.open_for_inspection(&opts))
        .with_context(|| format!("could not open '{}'", shown(&a.file)))?;
    let mut infos = vec![info_json(Path::new(&shown(&a.file)), &img)?];
    if a.backing_chain {
        let mut layer = img.backing().cloned();
        while let Some(l) = layer {
            infos.push(info_json(Path::new(&*l.storage().name()), &l)?);
            layer = l.backing().cloned();
        }
    }
    if let (Some(r), Some(last)) = (&refusal, infos.last_mut()) {
        last["backing-refused"] = json!(r.error.to_string());
    }
    match a.output {
        OutputFormat::Json => {
            let v = if a.backing_chain {
                Value::Array(infos)
            } else {
                infos.remove(0)
            };
            println!("{}", serde_json::to_string_pretty(&v)?);
        }
        OutputFormat::Human => {
            let texts: Vec<String> = infos.iter().map(info_human).collect();
            print!("{}", texts.join("\n"));
        }
    }
    Ok(0)
}

fn cmd_check(a: CheckArgs) -> Result<i32> {
    let _ = a.force_share;
    let repair = match a.repair.as_deref() {
        None => Repair::None,
        Some("leaks") => Repair::Leaks,
        Some("all") => Repair::All,
        Some(r) => bail!("invalid repair mode '{r}' (leaks or all)"),
    };
    let file = xdisk_image::DiskSource::parse(&a.file.to_string_lossy(), None)
        .and_then(|src| src.open_storage(repair == Repair::None, CacheMode::WriteBack))
        .with_context(|| format!("could not open '{}'", shown(&a.file)))?;
    let format = match parse_format(a.format.as_deref())? {
        Some(f) => f,
        None => xdisk_image::probe_format(&*file)?,
    };
    let report = match check(&*file, format, repair) {
        Ok(r) => r,
        Err(xdisk_image::Error::Unsupported(msg)) => {
            eprintln!("xdisk: {msg}");
            return Ok(63);
        }
        Err(e) => {
            eprintln!("xdisk: Check failed: {e}");
            return Ok(1);
        }
    };
    match a.output {
        OutputFormat::Json => {
            let mut v = report.json();
            v["filename"] = json!(shown(&a.file));
            v["format"] = json!("qcow2");
            println!("{}", serde_json::to_string_pretty(&v)?);
        }
        OutputFormat::Human => {
            if !a.quiet {
                print!("{}", report.human());
            }
        }
    }
    Ok(report.exit_code())
}

fn parse_cache(s: &str) -> Result<CacheMode> {
    s.parse::<CacheMode>().map_err(|e| anyhow!("{e}"))
}

fn cmd_convert(mut a: ConvertArgs) -> Result<i32> {
    let _ = a.force_share;
    let src = open_in(
        &a.src,
        a.format.as_deref(),
        true,
        parse_cache(&a.src_cache)?,
        &a.backing_dirs,
    )?;
    let out_format: Format = a.out_format.parse().map_err(|e| anyhow!("{e}"))?;
    if a.compress && out_format != Format::Qcow2 {
        bail!(
            "Compression not supported for format '{}'",
            out_format.as_str()
        );
    }
    let sparse = parse_size(&a.sparse)?;
    let size = src.size();
    let mut copts = CreateOptions {
        size,
        ..CreateOptions::default()
    };
    let (options, enc) = take_encrypt(&a.options)?;
    if !enc.is_empty() && a.no_create {
        bail!("-o encrypt.* formats a new output: not with -n (name the encryption of an existing one in its rbd: name)");
    }
    a.dst = encrypted_name(&a.dst.to_string_lossy(), out_format, &enc)?.into();
    apply_options(&mut copts, &options)?;
    rbd_cluster_size(&mut copts, out_format, &a.dst.to_string_lossy(), &options);
    copts.size = size;
    if copts.backing_file.is_some() {
        bail!("convert with a backing file for the output is not supported yet");
    }
    if !a.no_create {
        xdisk_image::DiskSource::parse(&a.dst.to_string_lossy(), Some(out_format))?
            .create(out_format, &copts)?;
    } else if a.compress {
        bail!("-c needs a new output: it cannot be used with -n");
    }
    let dst = open(
        &a.dst,
        Some(out_format.as_str()),
        false,
        parse_cache(&a.cache)?,
    )?;
    if dst.size() < size {
        bail!(
            "the output ({} bytes) is smaller than the source ({size} bytes)",
            dst.size()
        );
    }
    // A fresh output reads as zeroes (not an RBD image with librbd's encryption: see
    // DiskSource::zero_initialized); an existing one (-n) may not, unless told.
    let zero_init = xdisk_image::DiskSource::parse(&a.dst.to_string_lossy(), None)
        .map(|d| d.zero_initialized())
        .unwrap_or(true);
    let fresh = (!a.no_create && zero_init) || a.target_is_zero;
    let sparse = if fresh { sparse } else { 0 };
    let _ = a.out_of_order;
    let job = ConvertJob {
        src: &src,
        dst: &dst,
        size,
        fresh,
        sparse,
        cluster: if a.compress { dst.cluster_size() } else { None },
        next: AtomicU64::new(0),
        done: AtomicU64::new(0),
        failed: AtomicBool::new(false),
    };
    let workers = u64::from(a.parallel)
        .min(size.div_ceil(CONVERT_CHUNK))
        .max(1);
    let progress = a.progress;
    let errors: Vec<anyhow::Error> = std::thread::scope(|sc| {
        let handles: Vec<_> = (0..workers)
            .map(|i| {
                let job = &job;
                sc.spawn(move || job.work(progress && i == 0))
            })
            .collect();
        handles
            .into_iter()
            .filter_map(|h| match h.join() {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(e),
                Err(_) => Some(anyhow!("a convert thread panicked")),
            })
            .collect()
    });
    if let Some(e) = errors.into_iter().next() {
        return Err(e);
    }
    dst.flush()?;
    dst.close()?;
    if a.progress {
        eprintln!();
    }
    Ok(0)
}

/// Chunks that the convert threads take in turn (a multiple of every qcow2 cluster size).
const CONVERT_CHUNK: u64 = 2 << 20;

/// One `img convert`: the threads take chunks in order from `next`.
struct ConvertJob<'a> {
    src: &'a Image,
    dst: &'a Image,
    size: u64,
    /// The output reads as zeroes where nothing is written.
    fresh: bool,
    /// `-S` (0 when the output is not fresh: everything is written).
    sparse: u64,
    /// Compressed output: its cluster size.
    cluster: Option<u64>,
    next: AtomicU64,
    done: AtomicU64,
    failed: AtomicBool,
}

impl ConvertJob<'_> {
    /// Copies chunks until none is left or a thread failed; `progress`: this thread prints.
    fn work(&self, progress: bool) -> Result<()> {
        // Aligned for O_DIRECT (-t none / -T none): no bounce buffer in the way; in a huge
        // page, so a chunk reaches the disk as one segment (see `AlignedBuf::large`).
        let mut buf = xdisk_io::AlignedBuf::large(CONVERT_CHUNK as usize, 4096);
        let mut last_pct = u64::MAX;
        loop {
            if self.failed.load(Ordering::Relaxed) {
                return Ok(());
            }
            let off = self.next.fetch_add(1, Ordering::Relaxed) * CONVERT_CHUNK;
            if off >= self.size {
                return Ok(());
            }
            let end = (off + CONVERT_CHUNK).min(self.size);
            let r = match self.cluster {
                Some(cs) => self.compressed_chunk(&mut buf, off, end, cs),
                None => self.chunk(&mut buf, off, end),
            };
            if let Err(e) = r {
                self.failed.store(true, Ordering::Relaxed);
                return Err(e);
            }
            let done = self.done.fetch_add(end - off, Ordering::Relaxed) + (end - off);
            if progress {
                let pct = (done * 100).checked_div(self.size).unwrap_or(100);
                if pct != last_pct {
                    last_pct = pct;
                    eprint!("\r    ({pct}.00/100%)");
                    let _ = std::io::stderr().flush();
                }
            }
        }
    }

    fn chunk(&self, buf: &mut [u8], mut off: u64, end: u64) -> Result<()> {
        while off < end {
            let st = self.src.block_status(off, end - off)?;
            let n = st.len.max(1).min(end - off);
            if st.zero && !st.data {
                // Zero in the source: a fresh output already reads zero there.
                if !self.fresh {
                    self.dst.write_zeroes(off, n, false)?;
                }
            } else {
                let b = &mut buf[..n as usize];
                self.src.read_at(b, off)?;
                write_sparse(self.dst, b, off, self.sparse)?;
            }
            off += n;
        }
        Ok(())
    }

    /// Compressed output goes cluster by cluster, each read whole; a cluster that is zero
    /// in the source (by status, or by its bytes) is left unallocated: the fresh output
    /// already reads zero there.
    fn compressed_chunk(&self, buf: &mut [u8], mut off: u64, end: u64, cs: u64) -> Result<()> {
        while off < end {
            let n = (end - off).min(cs);
            let b = &mut buf[..n as usize];
            let st = self.src.block_status(off, n)?;
            if !(st.zero && !st.data && st.len >= n) {
                self.src.read_at(b, off)?;
                if !is_zero(b) {
                    self.dst.write_compressed_cluster(off / cs, b)?;
                }
            }
            off += n;
        }
        Ok(())
    }
}

/// Writes `data` at `off`, leaving runs of at least `min_zero` zero bytes unwritten (the
/// destination was freshly created and reads zero there). `min_zero == 0`: write all.
fn write_sparse(dst: &Image, data: &[u8], off: u64, min_zero: u64) -> Result<()> {
    if min_zero == 0 {
        dst.write_at(data, off)?;
        return Ok(());
    }
    let step = min_zero.clamp(512, data.len() as u64) as usize;
    let mut i = 0usize;
    while i < data.len() {
        let end = (i + step).min(data.len());
        let chunk = &data[i..end];
        if !is_zero(chunk) {
            // Extend over following non-zero chunks to write in one go.
            let mut j = end;
            while j < data.len() {
                let e = (j + step).min(data.len());
                if is_zero(&data[j..e]) {
                    break;
                }
                j = e;
            }
            dst.write_at(&data[i..j], off + i as u64)?;
            i = j;
        } else {
            i = end;
        }
    }
    Ok(())
}

fn cmd_map(a: MapArgs) -> Result<i32> {
    let _ = a.force_share;
    let img = open_in(
        &a.file,
        a.format.as_deref(),
        true,
        CacheMode::WriteBack,
        &a.backing_dirs,
    )?;
    let size = img.size();
    let mut runs: Vec<(u64, xdisk_image::BlockStatus)> = Vec::new();
    let mut off = 0u64;
    while off < size {
        let st = img.block_status(off, size - off)?;
        let len = st.len.max(1);
        // Merge with the previous run when qemu-img would.
        if let Some((start, prev)) = runs.last_mut() {
            let contiguous = match (prev.offset, st.offset) {
                (Some(p), Some(o)) => p + prev.len == o,
                (None, None) => true,
                _ => false,
            };
            if prev.data == st.data
                && prev.zero == st.zero
                && prev.present == st.present
                && prev.depth == st.depth
                && prev.compressed == st.compressed
                && contiguous
                && *start + prev.len == off
            {
                prev.len += len;
                off += len;
                continue;
            }
        }
        runs.push((off, xdisk_image::BlockStatus { len, ..st }));
        off += len;
    }
    // Which file each depth lives in.
    let mut files = vec![img.storage().name().into_owned()];
    let mut layer = img.backing().cloned();
    while let Some(l) = layer {
        files.push(l.storage().name().into_owned());
        layer = l.backing().cloned();
    }
    match a.output {
        OutputFormat::Json => {
            let lines: Vec<String> = runs
                .iter()
                .map(|(start, s)| {
                    let mut line = format!(
                        "{{ \"start\": {start}, \"length\": {}, \"depth\": {}, \"present\": {}, \"zero\": {}, \"data\": {}, \"compressed\": {}",
                        s.len, s.depth, s.present, s.zero, s.data, s.compressed
                    );
                    if let Some(o) = s.offset {
                        line += &format!(", \"offset\": {o}");
                    }
                    line + "}"
                })
                .collect();
            println!("[{}]", lines.join(",\n"));
        }
        OutputFormat::Human => {
            println!("{:<16}{:<16}{:<16}File", "Offset", "Length", "Mapped to");
            for (start, s) in &runs {
                if let (true, Some(o)) = (s.data, s.offset) {
                    println!(
                        "{:<#16x}{:<#16x}{:<#16x}{}",
                        start,
                        s.len,
                        o,
                        files.get(s.depth as usize).map_or("", |f| f.as_str())
                    );
                }
            }
        }
    }
    Ok(0)
}

fn cmd_resize(a: ResizeArgs) -> Result<i32> {
    let img = open_in(
        &a.file,
        a.format.as_deref(),
        false,
        CacheMode::WriteBack,
        &a.backing_dirs,
    )?;
    let cur = img.size();
    let new = if let Some(d) = a.size.strip_prefix('+') {
        cur.checked_add(parse_size(d)?)
            .ok_or_else(|| anyhow!("size overflows"))?
    } else if let Some(d) = a.size.strip_prefix('-') {
        cur.checked_sub(parse_size(d)?)
            .ok_or_else(|| anyhow!("new size would be negative"))?
    } else {
        parse_size(&a.size)?
    };
    if new < cur && !a.shrink {
        bail!("Use the --shrink option to perform a shrink operation.\nWarning: shrinking an image will delete all data beyond the shrunken image's end. Before performing such an operation, make sure there is no important data there.");
    }
    img.resize(new)?;
    img.flush()?;
    img.close()?;
    if !a.quiet {
        println!("Image resized.");
    }
    Ok(0)
}

fn cmd_compare(a: CompareArgs) -> Result<i32> {
    let _ = a.force_share;
    let r = (|| -> Result<i32> {
        let d = &a.backing_dirs;
        let i1 = open_in(
            &a.file1,
            a.format1.as_deref(),
            true,
            CacheMode::WriteBack,
            d,
        )?;
        let i2 = open_in(
            &a.file2,
            a.format2.as_deref(),
            true,
            CacheMode::WriteBack,
            d,
        )?;
        let (s1, s2) = (i1.size(), i2.size());
        if s1 != s2 {
            if a.strict {
                if !a.quiet {
                    println!("Strict mode: Image size mismatch!");
                }
                return Ok(1);
            }
            if !a.quiet {
                println!("Warning: Image size mismatch!");
            }
        }
        const CHUNK: usize = 1 << 20;
        let (mut b1, mut b2) = (vec![0u8; CHUNK], vec![0u8; CHUNK]);
        let common = s1.min(s2);
        let mut off = 0u64;
        while off < common {
            let n = (common - off).min(CHUNK as u64) as usize;
            let st1 = i1.block_status(off, n as u64)?;
            let st2 = i2.block_status(off, n as u64)?;
            let n = n.min(st1.len as usize).min(st2.len as usize).max(1);
            let both_zero = st1.zero && !st1.data && st2.zero && !st2.data;
            if !both_zero {
                i1.read_at(&mut b1[..n], off)?;
                i2.read_at(&mut b2[..n], off)?;
                if let Some(p) = b1[..n].iter().zip(&b2[..n]).position(|(x, y)| x != y) {
                    let at = (off + p as u64) / 512 * 512;
                    if !a.quiet {
                        println!("Content mismatch at offset {at}!");
                    }
                    return Ok(1);
                }
            }
            off += n as u64;
        }
        // The longer image must read as zeroes past the shorter one's end.
        let (longer, end) = if s1 > s2 { (&i1, s1) } else { (&i2, s2) };
        while off < end {
            let n = (end - off).min(CHUNK as u64) as usize;
            longer.read_at(&mut b1[..n], off)?;
            if let Some(p) = b1[..n].iter().position(|&x| x != 0) {
                if !a.quiet {
                    println!(
                        "Content mismatch at offset {}!",
                        (off + p as u64) / 512 * 512
                    );
                }
                return Ok(1);
            }
            off += n as u64;
        }
        if !a.quiet {
            println!("Images are identical.");
        }
        Ok(0)
    })();
    match r {
        Ok(c) => Ok(c),
        Err(e) => {
            eprintln!("xdisk: {}", crate::error_text(&e));
            Ok(2)
        }
    }
}
