//! `xdisk gen-docs` (hidden; for packaging): man pages, one per command and subcommand
//! (`xdisk.1`, `xdisk-img.1`, `xdisk-img-create.1`, ...), and shell completions for bash, zsh
//! and fish, all generated from the clap definitions so they never drift from the binary.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::CommandFactory;

#[derive(clap::Args, Debug)]
pub struct GenDocsArgs {
    /// Write the man pages (section 1, uncompressed) into this directory.
    #[arg(long, value_name = "DIR")]
    pub man: Option<PathBuf>,
    /// Write the completions here: `xdisk` (bash), `_xdisk` (zsh), `xdisk.fish`.
    #[arg(long, value_name = "DIR")]
    pub completions: Option<PathBuf>,
}

fn man_pages(
    cmd: &clap::Command,
    name: &str,
    dir: &std::path::Path,
    out: &mut Vec<PathBuf>,
) -> Result<()> {
    let page = cmd
        .clone()
        .name(name.to_string())
        .bin_name(name.replace('-', " "));
    let mut buf = Vec::new();
    clap_mangen::Man::new(page)
        .render(&mut buf)
        .with_context(|| format!("rendering {name}.1"))?;
    let path = dir.join(format!("{name}.1"));
    std::fs::write(&path, buf).with_context(|| format!("writing {}", path.display()))?;
    out.push(path);
    for sub in cmd.get_subcommands() {
        if sub.is_hide_set() || sub.get_name() == "help" {
            continue;
        }
        man_pages(sub, &format!("{name}-{}", sub.get_name()), dir, out)?;
    }
    Ok(())
}

pub fn run<C: CommandFactory>(a: GenDocsArgs) -> Result<i32> {
    let mut cmd = C::command();
    cmd.build();
    if let Some(dir) = &a.man {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut pages = Vec::new();
        man_pages(&cmd, "xdisk", dir, &mut pages)?;
        eprintln!("{} man pages in {}", pages.len(), dir.display());
    }
    if let Some(dir) = &a.completions {
        use clap_complete::{generate_to, Shell};
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
            let mut c = C::command();
            generate_to(shell, &mut c, "xdisk", dir)
                .with_context(|| format!("{shell} completions"))?;
        }
        // bash-completion looks the file up by the command's name.
        let bash = dir.join("xdisk.bash");
        if bash.exists() {
            std::fs::rename(&bash, dir.join("xdisk")).context("renaming the bash completions")?;
        }
    }
    Ok(0)
}
