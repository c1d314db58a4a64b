//! `xdisk img bitmap`: changes the persistent dirty bitmaps of a qcow2 image, spelled like
//! `qemu-img bitmap`: one or more actions (`--add`, `--remove`, `--clear`, `--enable`,
//! `--disable`, `--merge SOURCE`) applied in the order given to bitmap BITMAP of FILENAME,
//! `-g` for the granularity of `--add`, `-b`/`-F` for the file `--merge` takes its source
//! bitmap from. Errors are qemu-img's ("Operation add on bitmap b failed: ..."), exit 1.

use std::path::PathBuf;

use anyhow::{anyhow, bail, Result};
use clap::{value_parser, Arg, ArgAction, ArgMatches, Args, Command, FromArgMatches};

use xdisk_image::qcow2::bitmap::DirtyBitmap;
use xdisk_image::{CacheMode, Error, Format, OpenOptions};

use crate::size::parse_size;

/// One action, in command-line order.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Action {
    Add,
    Remove,
    Clear,
    Enable,
    Disable,
    Merge(String),
}

impl Action {
    /// The word qemu-img's messages use.
    fn name(&self) -> &'static str {
        match self {
            Action::Add => "add",
            Action::Remove => "remove",
            Action::Clear => "clear",
            Action::Enable => "enable",
            Action::Disable => "disable",
            Action::Merge(_) => "merge",
        }
    }
}

/// The arguments of `xdisk img bitmap` (parsed by hand from clap's matches, so that the
/// actions keep their order).
#[derive(Debug)]
pub struct BitmapArgs {
    actions: Vec<Action>,
    granularity: Option<String>,
    format: Option<String>,
    source_file: Option<PathBuf>,
    source_format: Option<String>,
    file: PathBuf,
    bitmap: String,
}

const FLAGS: [(&str, &str); 5] = [
    (
        "add",
        "Create BITMAP, enabled to record future edits (-g sets its granularity)",
    ),
    ("remove", "Remove BITMAP"),
    ("clear", "Clear BITMAP"),
    ("enable", "Change BITMAP to start recording future edits"),
    ("disable", "Change BITMAP to stop recording future edits"),
];

impl Args for BitmapArgs {
    fn augment_args(cmd: Command) -> Command {
        let mut cmd = cmd;
        for (id, help) in FLAGS {
            // A flag that may repeat, each occurrence with its index (an empty value).
            let mut a = Arg::new(id)
                .long(id)
                .action(ArgAction::Append)
                .num_args(0)
                .default_missing_value("")
                .help(help);
            if id == "disable" {
                a = a.visible_alias("disabled");
            }
            cmd = cmd.arg(a);
        }
        cmd.arg(
            Arg::new("merge")
                .long("merge")
                .value_name("SOURCE")
                .action(ArgAction::Append)
                .help("Merge the contents of the SOURCE bitmap into BITMAP"),
        )
        .arg(
            Arg::new("granularity")
                .short('g')
                .long("granularity")
                .value_name("GRANULARITY")
                .help(
                    "Bytes per bit of a bitmap --add creates: a power of two from 512 to 2G \
                     (default: the cluster size, within 4k to 64k)",
                ),
        )
        .arg(
            Arg::new("source_file")
                .short('b')
                .long("source-file")
                .value_name("SOURCE_FILE")
                .value_parser(value_parser!(PathBuf))
                .help("Take the SOURCE bitmaps of --merge from this image"),
        )
        .arg(
            Arg::new("source_format")
                .short('F')
                .long("source-format")
                .value_name("SOURCE_FMT")
                .help("Format of SOURCE_FILE"),
        )
        .arg(
            Arg::new("format")
                .short('f')
                .value_name("FMT")
                .help("Image format (qcow2; probed if absent)"),
        )
        .arg(
            Arg::new("file")
                .value_name("FILENAME")
                .required(true)
                .value_parser(value_parser!(PathBuf)),
        )
        .arg(Arg::new("bitmap").value_name("BITMAP").required(true))
    }

    fn augment_args_for_update(cmd: Command) -> Command {
        Self::augment_args(cmd)
    }
}

impl FromArgMatches for BitmapArgs {
    fn from_arg_matches(m: &ArgMatches) -> std::result::Result<Self, clap::Error> {
        let mut actions: Vec<(usize, Action)> = Vec::new();
        for (id, _) in FLAGS {
            let Some(idx) = m.indices_of(id) else {
                continue;
            };
            let act = match id {
                "add" => Action::Add,
                "remove" => Action::Remove,
                "clear" => Action::Clear,
                "enable" => Action::Enable,
                _ => Action::Disable,
            };
            actions.extend(idx.map(|i| (i, act.clone())));
        }
        if let (Some(idx), Some(vals)) = (m.indices_of("merge"), m.get_many::<String>("merge")) {
            actions.extend(idx.zip(vals).map(|(i, v)| (i, Action::Merge(v.clone()))));
        }
        actions.sort_by_key(|a| a.0);
        let string = |id: &str| m.get_one::<String>(id).cloned();
        Ok(BitmapArgs {
            actions: actions.into_iter().map(|a| a.1).collect(),
            granularity: string("granularity"),
            format: string("format"),
            source_file: m.get_one::<PathBuf>("source_file").cloned(),
            source_format: string("source_format"),
            file: m.get_one::<PathBuf>("file").cloned().unwrap_or_default(),
            bitmap: string("bitmap").unwrap_or_default(),
        })
    }

    fn update_from_arg_matches(&mut self, m: &ArgMatches) -> std::result::Result<(), clap::Error> {
        *self = Self::from_arg_matches(m)?;
        Ok(())
    }
}

/// The message of an engine error as qemu-img words it (without our category prefix).
fn message(e: &Error) -> String {
    match e {
        Error::InvalidArgument(m) | Error::Unsupported(m) => m.clone(),
        other => other.to_string(),
    }
}

pub fn run(a: BitmapArgs) -> Result<i32> {
    if a.actions.is_empty() {
        bail!("Need at least one of --add, --remove, --clear, --enable, --disable, or --merge");
    }
    if a.granularity.is_some() && !a.actions.contains(&Action::Add) {
        bail!("granularity only supported with --add");
    }
    if a.source_format.is_some() && a.source_file.is_none() {
        bail!("-F only supported with -b");
    }
    if a.source_file.is_some() && !a.actions.iter().any(|x| matches!(x, Action::Merge(_))) {
        bail!("Merge bitmap source file only supported with --merge");
    }
    let granularity = a
        .granularity
        .as_deref()
        .map(|g| parse_size(g).map_err(|_| anyhow!("Invalid granularity specified")))
        .transpose()?;
    let parse_format = |f: &Option<String>| -> Result<Option<Format>> {
        f.as_deref()
            .map(|f| f.parse::<Format>().map_err(|e| anyhow!("{e}")))
            .transpose()
    };
    let open = |path: &PathBuf, format: Option<Format>, read_only: bool| {
        let opts = OpenOptions {
            format,
            read_only,
            cache: CacheMode::WriteBack,
            // Bitmaps are this layer's: the backing chain is not needed.
            open_backing: false,
            ..OpenOptions::default()
        };
        xdisk_image::DiskSource::parse(&path.to_string_lossy(), opts.format)
            .and_then(|src| src.open(&opts))
            .map_err(|e| anyhow!("Could not open '{}': {e}", path.display()))
    };
    let img = open(&a.file, parse_format(&a.format)?, false)?;
    let src_img = match &a.source_file {
        Some(p) => Some(open(p, parse_format(&a.source_format)?, true)?),
        None => None,
    };
    let mut code = 0;
    for act in &a.actions {
        let r = match img.as_qcow2() {
            None => Err(Error::Unsupported(format!(
                "persistent bitmaps need a qcow2 image ('{}' is {})",
                a.file.display(),
                img.format()
            ))),
            Some(q) => match act {
                Action::Add => q.add_bitmap(&a.bitmap, granularity, true),
                Action::Remove => q.remove_bitmap(&a.bitmap),
                Action::Clear => q.clear_bitmap(&a.bitmap),
                Action::Enable => q.set_bitmap_enabled(&a.bitmap, true),
                Action::Disable => q.set_bitmap_enabled(&a.bitmap, false),
                Action::Merge(src) => source_bits(q, src_img.as_deref(), src)
                    .and_then(|bits| q.merge_bitmap(&a.bitmap, &bits)),
            },
        };
        if let Err(e) = r {
            eprintln!(
                "xdisk: Operation {} on bitmap {} failed: {}",
                act.name(),
                a.bitmap,
                message(&e)
            );
            code = 1;
            break;
        }
    }
    img.close()
        .map_err(|e| anyhow!("cannot close '{}': {e}", a.file.display()))?;
    Ok(code)
}

/// The bits of bitmap `name` of the source image (`-b`), or of the image itself.
fn source_bits(
    own: &xdisk_image::qcow2::Qcow2Image,
    src: Option<&xdisk_image::Image>,
    name: &str,
) -> xdisk_image::Result<DirtyBitmap> {
    match src {
        None => own.bitmap(name),
        Some(img) => match img.as_qcow2() {
            Some(q) => q.bitmap(name),
            None => Err(Error::InvalidArgument(format!(
                "Dirty bitmap '{name}' not found"
            ))),
        },
    }
}
