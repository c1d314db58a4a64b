//! `xdisk boot` / `pygrub` end to end on disks made the way distributions make them (mkfs -d,
//! mtools, xorriso, sfdisk/sgdisk, qemu-img), without mounting. Where Xen 4.17's own pygrub
//! runs (`tests/boot/pygrub-oracle`, set in XDISK_PYGRUB by scripts/test), every raw image it
//! can read is also booted by it and the results compared: the same kernel and ramdisk bytes,
//! the same command line.

use std::path::{Path, PathBuf};
use std::process::Command;

mod boot_support;

use boot_support::{blob, disk, mkfs_ext, run, tree};

const XDISK: &str = env!("CARGO_BIN_EXE_xdisk");

fn mkfs_fat(root: &Path, out: &Path, mib: u64) {
    let _ = std::fs::remove_file(out);
    run(
        Command::new("mkfs.fat")
            .args(["-F", "16", "-C"])
            .arg(out)
            .arg((mib * 1024).to_string()),
        "dosfstools",
    );
    for e in std::fs::read_dir(root).unwrap() {
        let e = e.unwrap();
        run(
            Command::new("mcopy")
                .args(["-s", "-i"])
                .arg(out)
                .arg(e.path())
                .arg("::/"),
            "mtools",
        );
    }
}

/// What a bootloader run produced.
#[derive(Debug, PartialEq)]
struct Booted {
    kernel: Vec<u8>,
    ramdisk: Option<Vec<u8>>,
    args: Option<String>,
}

/// Parses the simple format and reads (then removes) the extracted files.
fn parse_simple(text: &str) -> Booted {
    let mut b = Booted {
        kernel: Vec::new(),
        ramdisk: None,
        args: None,
    };
    for line in text.split('\n') {
        if let Some(k) = line.strip_prefix("kernel ") {
            b.kernel = std::fs::read(k).unwrap_or_else(|e| panic!("{k}: {e}"));
            std::fs::remove_file(k).unwrap();
        } else if let Some(r) = line.strip_prefix("ramdisk ") {
            b.ramdisk = Some(std::fs::read(r).unwrap());
            std::fs::remove_file(r).unwrap();
        } else if let Some(a) = line.strip_prefix("args ") {
            b.args = Some(a.to_string());
        }
    }
    b
}

fn boot_with(prog: &[&str], disk: &Path, extra: &[&str]) -> Result<Booted, String> {
    let out_dir = tempfile::tempdir().unwrap();
    let out = Command::new(prog[0])
        .args(&prog[1..])
        .args(["-q", "--output-format=simple"])
        .arg(format!("--output-directory={}", out_dir.path().display()))
        .args(extra)
        .arg(disk)
        .output()
        .unwrap();
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    let b = parse_simple(&String::from_utf8_lossy(&out.stdout));
    let left: Vec<_> = std::fs::read_dir(out_dir.path()).unwrap().collect();
    assert!(
        left.is_empty(),
        "files left in the output directory: {left:?}"
    );
    Ok(b)
}

fn xdisk_boot(disk: &Path, extra: &[&str]) -> Booted {
    boot_with(&[XDISK, "boot"], disk, extra).unwrap_or_else(|e| panic!("xdisk boot {disk:?}: {e}"))
}

/// Compares with Xen's pygrub when the oracle is available (raw images only).
fn oracle(disk: &Path, extra: &[&str], ours: &Booted) {
    let Ok(pygrub) = std::env::var("XDISK_PYGRUB") else {
        eprintln!("XDISK_PYGRUB not set: no comparison with Xen's pygrub");
        return;
    };
    let theirs =
        boot_with(&[&pygrub], disk, extra).unwrap_or_else(|e| panic!("pygrub {disk:?}: {e}"));
    assert_eq!(
        ours, &theirs,
        "xdisk boot and pygrub differ on {disk:?} {extra:?}"
    );
}

const KVER: &str = "6.1.0-99-amd64";

fn debian_grub_cfg(prefix: &str) -> String {
    format!(
        "if [ -s $prefix/grubenv ]; then\n  load_env\nfi\n\
         if [ \"${{next_entry}}\" ] ; then\n   set default=\"${{next_entry}}\"\nelse\n   set default=\"1\"\nfi\n\
         function load_video {{\n  insmod all_video\n}}\nset timeout=5\n\
         menuentry 'Debian GNU/Linux' --class debian $menuentry_id_option 'gnulinux-simple-x' {{\n\
         \tload_video\n\tset root='hd0,msdos1'\n\tlinux\t{prefix}/vmlinuz-{KVER} root=UUID=1234 ro  quiet\n\tinitrd\t{prefix}/initrd.img-{KVER}\n}}\n\
         menuentry 'Debian GNU/Linux, second' --class debian {{\n\
         \tlinux\t{prefix}/vmlinuz-{KVER} root=/dev/xvda2 ro console=hvc0  \"x y\" $foo\n\tinitrd\t{prefix}/initrd.img-{KVER}\n}}\n\
         submenu 'Advanced options for Debian GNU/Linux' $menuentry_id_option 'gnulinux-advanced-x' {{\n\
         \tmenuentry 'Debian GNU/Linux, with Linux {KVER} (recovery mode)' {{\n\
         \t\tlinux\t{prefix}/vmlinuz-{KVER} root=/dev/xvda2 ro single\n\t\tinitrd\t{prefix}/initrd.img-{KVER}\n\t}}\n}}\n"
    )
}

#[test]
fn debian_grub2_on_mbr_boots_the_default_entry_like_pygrub() {
    let dir = tempfile::tempdir().unwrap();
    let (k, r) = (blob(1, 300_000), blob(2, 70_000));
    let root = tree(
        dir.path(),
        &[
            (&format!("/boot/vmlinuz-{KVER}"), k.clone()),
            (&format!("/boot/initrd.img-{KVER}"), r.clone()),
            ("/boot/grub/grub.cfg", debian_grub_cfg("/boot").into_bytes()),
            ("/etc/fstab", b"# nothing\n".to_vec()),
        ],
        &[("/vmlinuz", "boot/vmlinuz-6.1.0-99-amd64")],
    );
    let fs = dir.path().join("root.ext4");
    mkfs_ext("ext4", &root, &fs, 32);
    let img = disk(dir.path(), "dos", &[(2048, Some(&fs), "83", 65536)], 40);
    let b = xdisk_boot(&img, &[]);
    assert_eq!(b.kernel, k);
    assert_eq!(b.ramdisk.as_deref(), Some(&r[..]));
    assert_eq!(
        b.args.as_deref(),
        Some("root=/dev/xvda2 ro console=hvc0  \"x y\" $foo")
    );
    oracle(&img, &[], &b);
    // --entry by number (every entry counts, the submenu's too) and by title; --args appended.
    let b = xdisk_boot(&img, &["--entry=2", "--args=extra=1"]);
    assert_eq!(b.args.as_deref(), Some("root=/dev/xvda2 ro single extra=1"));
    oracle(&img, &["--entry=2", "--args=extra=1"], &b);
    let b = xdisk_boot(&img, &["--entry=Debian GNU/Linux"]);
    assert_eq!(b.args.as_deref(), Some("root=UUID=1234 ro  quiet"));
    oracle(&img, &["--entry=Debian GNU/Linux"], &b);
    // --kernel skips the config; a symlink in the guest is followed inside it.
    let b = xdisk_boot(&img, &["--kernel=/vmlinuz", "--args=root=/dev/xvda1"]);
    assert_eq!(b.kernel, k);
    assert_eq!(b.ramdisk, None);
    assert_eq!(b.args.as_deref(), Some("root=/dev/xvda1"));
    // The same disk as a compressed qcow2: the same result.
    let q = dir.path().join("disk.qcow2");
    run(
        Command::new("qemu-img")
            .args(["convert", "-c", "-f", "raw", "-O", "qcow2"])
            .arg(&img)
            .arg(&q),
        "qemu-utils",
    );
    let bq = xdisk_boot(&q, &[]);
    assert_eq!(bq.kernel, k);
    assert_eq!(
        bq.args.as_deref(),
        Some("root=/dev/xvda2 ro console=hvc0  \"x y\" $foo")
    );
}

#[test]
fn gpt_with_a_separate_boot_partition() {
    let dir = tempfile::tempdir().unwrap();
    let (k, r) = (blob(3, 200_000), blob(4, 50_000));
    let boot = tree(
        dir.path(),
        &[
            (&format!("/vmlinuz-{KVER}"), k.clone()),
            (&format!("/initrd.img-{KVER}"), r.clone()),
            ("/grub/grub.cfg", debian_grub_cfg("").into_bytes()),
        ],
        &[],
    );
    let fs = dir.path().join("boot.ext2");
    mkfs_ext("ext2", &boot, &fs, 16);
    let img = disk(
        dir.path(),
        "gpt",
        &[
            (2048, None, "21686148-6449-6E6F-744E-656564454649", 2048),
            (
                4096,
                Some(&fs),
                "0FC63DAF-8483-4772-8E79-3D69D8477DE4",
                32768,
            ),
        ],
        24,
    );
    let b = xdisk_boot(&img, &[]);
    assert_eq!(b.kernel, k);
    assert_eq!(b.ramdisk.as_deref(), Some(&r[..]));
    oracle(&img, &[], &b);
}

#[test]
fn centos_grub_legacy_on_ext3() {
    let dir = tempfile::tempdir().unwrap();
    let (k, r) = (blob(5, 100_000), blob(6, 40_000));
    let cfg = "# grub.conf generated by anaconda\ndefault=1\ntimeout=5\nsplashimage=(hd0,0)/grub/splash.xpm.gz\nhiddenmenu\n\
               title CentOS (2.6.32-754.el6.x86_64)\n\troot (hd0,0)\n\tkernel /vmlinuz-2.6.32-754.el6.x86_64 ro root=/dev/mapper/vg-root rd_NO_LUKS\n\tinitrd /initramfs-2.6.32-754.el6.x86_64.img\n\
               title CentOS (2.6.32-696.el6.x86_64)\n\troot (hd0,0)\n\tkernel (hd0,0)/vmlinuz-2.6.32-696.el6.x86_64 ro root=/dev/xvda2 console=hvc0\n\tinitrd /initramfs-2.6.32-696.el6.x86_64.img\n";
    let boot = tree(
        dir.path(),
        &[
            ("/vmlinuz-2.6.32-754.el6.x86_64", blob(7, 1000)),
            ("/vmlinuz-2.6.32-696.el6.x86_64", k.clone()),
            ("/initramfs-2.6.32-754.el6.x86_64.img", blob(8, 1000)),
            ("/initramfs-2.6.32-696.el6.x86_64.img", r.clone()),
            ("/grub/grub.conf", cfg.as_bytes().to_vec()),
        ],
        &[("/grub/menu.lst", "./grub.conf")],
    );
    let fs = dir.path().join("boot.ext3");
    mkfs_ext("ext3", &boot, &fs, 16);
    let img = disk(dir.path(), "dos", &[(63, Some(&fs), "83", 32768)], 20);
    let b = xdisk_boot(&img, &[]);
    assert_eq!(b.kernel, k);
    assert_eq!(b.ramdisk.as_deref(), Some(&r[..]));
    assert_eq!(b.args.as_deref(), Some("ro root=/dev/xvda2 console=hvc0"));
    oracle(&img, &[], &b);
}

#[test]
fn alpine_extlinux_on_a_whole_disk_filesystem() {
    let dir = tempfile::tempdir().unwrap();
    let (k, r) = (blob(9, 150_000), blob(10, 30_000));
    let cfg = "DEFAULT menu.c32\nPROMPT 0\nMENU TITLE Alpine/Linux Boot Menu\nMENU HIDDEN\nTIMEOUT 10\n\
               LABEL lts\n  MENU DEFAULT\n  MENU LABEL Linux lts\n  LINUX vmlinuz-lts\n  INITRD initramfs-lts\n  APPEND root=/dev/xvda modules=sd-mod,usb-storage,ext4 quiet rootfstype=ext4\n\
               LABEL old\n  MENU LABEL Linux old\n  LINUX vmlinuz-old\n  APPEND root=/dev/xvda\n";
    let root = tree(
        dir.path(),
        &[
            ("/boot/vmlinuz-lts", k.clone()),
            ("/boot/initramfs-lts", r.clone()),
            ("/boot/vmlinuz-old", blob(11, 100)),
            ("/boot/extlinux.conf", cfg.as_bytes().to_vec()),
        ],
        &[],
    );
    let img = dir.path().join("whole.ext4");
    mkfs_ext("ext4", &root, &img, 16);
    let b = xdisk_boot(&img, &[]);
    assert_eq!(b.kernel, k);
    assert_eq!(b.ramdisk.as_deref(), Some(&r[..]));
    assert_eq!(
        b.args.as_deref(),
        Some("root=/dev/xvda modules=sd-mod,usb-storage,ext4 quiet rootfstype=ext4")
    );
}

#[test]
fn fat_boot_partition_with_grub2() {
    let dir = tempfile::tempdir().unwrap();
    let (k, r) = (blob(12, 120_000), blob(13, 20_000));
    let boot = tree(
        dir.path(),
        &[
            ("/vmlinuz", k.clone()),
            ("/initrd.img", r.clone()),
            (
                "/grub/grub.cfg",
                b"set default=0\nmenuentry 'FAT' {\n linux /vmlinuz root=/dev/xvda2 ro\n initrd /initrd.img\n}\n".to_vec(),
            ),
        ],
        &[],
    );
    let fs = dir.path().join("boot.fat");
    mkfs_fat(&boot, &fs, 16);
    let img = disk(dir.path(), "dos", &[(2048, Some(&fs), "e", 32768)], 20);
    let b = xdisk_boot(&img, &[]);
    assert_eq!(b.kernel, k);
    assert_eq!(b.ramdisk.as_deref(), Some(&r[..]));
    assert_eq!(b.args.as_deref(), Some("root=/dev/xvda2 ro"));
}

#[test]
fn isolinux_iso_boots_the_menu_default() {
    let dir = tempfile::tempdir().unwrap();
    let (k, r) = (blob(14, 90_000), blob(15, 10_000));
    let cfg = "default vesamenu.c32\nprompt 0\ntimeout 50\nlabel install\n  menu label ^Install\n  kernel /install.amd/vmlinuz\n  append vga=788 initrd=/install.amd/initrd.gz --- quiet\n\
               label xen\n  menu label ^Xen install\n  menu default\n  kernel /install.amd/xen/vmlinuz\n  append initrd=/install.amd/xen/initrd.gz,/other.gz console=hvc0 ---\n";
    let root = tree(
        dir.path(),
        &[
            ("/isolinux/isolinux.cfg", cfg.as_bytes().to_vec()),
            ("/install.amd/vmlinuz", blob(16, 100)),
            ("/install.amd/initrd.gz", blob(17, 100)),
            ("/install.amd/xen/vmlinuz", k.clone()),
            ("/install.amd/xen/initrd.gz", r.clone()),
        ],
        &[],
    );
    let iso = dir.path().join("d.iso");
    run(
        Command::new("xorriso")
            .args(["-as", "mkisofs", "-quiet", "-R", "-J", "-o"])
            .arg(&iso)
            .arg(&root),
        "xorriso",
    );
    let b = xdisk_boot(&iso, &[]);
    assert_eq!(b.kernel, k);
    assert_eq!(b.ramdisk.as_deref(), Some(&r[..]));
    assert_eq!(b.args.as_deref(), Some("console=hvc0 ---"));
}

/// A qcow2 overlay whose clusters change grub.cfg over a raw backing file: the overlay's
/// config counts (and probing refuses to follow a backing file without --format=qcow2).
#[test]
fn qcow2_overlay_changes_the_config_of_its_backing_file() {
    let dir = tempfile::tempdir().unwrap();
    let k = blob(18, 64_000);
    let cfg_a = "set default=0\nmenuentry 'A' {\n linux /boot/vmlinuz marker=from-base\n}\n";
    let cfg_b = "set default=0\nmenuentry 'B' {\n linux /boot/vmlinuz marker=from-over\n}\n";
    assert_eq!(cfg_a.len(), cfg_b.len());
    let root = tree(
        dir.path(),
        &[
            ("/boot/vmlinuz", k.clone()),
            ("/boot/grub/grub.cfg", cfg_a.as_bytes().to_vec()),
        ],
        &[],
    );
    let base = dir.path().join("base.raw");
    mkfs_ext("ext4", &root, &base, 16);
    let raw = std::fs::read(&base).unwrap();
    let at = raw
        .windows(cfg_a.len())
        .position(|w| w == cfg_a.as_bytes())
        .expect("config bytes in the image");
    let over = dir.path().join("over.qcow2");
    run(
        Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
            .arg(&base)
            .arg(&over),
        "qemu-utils",
    );
    let patch = dir.path().join("patch");
    std::fs::write(&patch, cfg_b).unwrap();
    run(
        Command::new("qemu-io")
            .args(["-f", "qcow2", "-c"])
            .arg(format!("write -s {} {at} {}", patch.display(), cfg_b.len()))
            .arg(&over),
        "qemu-utils",
    );
    assert_eq!(
        xdisk_boot(&base, &[]).args.as_deref(),
        Some("marker=from-base")
    );
    let b = xdisk_boot(&over, &["--format=qcow2"]);
    assert_eq!(b.kernel, k);
    assert_eq!(b.args.as_deref(), Some("marker=from-over"));
    let err = boot_with(&[XDISK, "boot"], &over, &[]).unwrap_err();
    assert!(err.contains("backing file"), "{err}");
}

#[test]
fn outputs_are_pygrubs_formats() {
    let dir = tempfile::tempdir().unwrap();
    let root = tree(
        dir.path(),
        &[
            ("/boot/vmlinuz", blob(19, 1000)),
            ("/boot/initrd", blob(20, 1000)),
            (
                "/boot/grub/grub.cfg",
                b"menuentry 'it''s' {\n linux /boot/vmlinuz a='b c' d\n initrd /boot/initrd\n}\n"
                    .to_vec(),
            ),
        ],
        &[],
    );
    let img = dir.path().join("fs.ext4");
    mkfs_ext("ext4", &root, &img, 8);
    let out_dir = dir.path().join("out");
    std::fs::create_dir(&out_dir).unwrap();
    let out = run(
        Command::new(XDISK)
            .args(["boot", "-q"])
            .arg(format!("--output-directory={}", out_dir.display()))
            .arg(&img),
        "",
    );
    let s = String::from_utf8(out.stdout).unwrap();
    let re_ok = s.starts_with(&format!(
        "linux (kernel '{}/boot_kernel.",
        out_dir.display()
    )) && s.contains(&format!(")(ramdisk '{}/boot_ramdisk.", out_dir.display()))
        && s.ends_with(")(args \"a='b c' d\")");
    assert!(re_ok, "{s}");
    // simple0 through --output (libxl pre-creates the file), and -n extracts nothing.
    let o = dir.path().join("o");
    std::fs::write(&o, b"").unwrap();
    run(
        Command::new(XDISK)
            .args(["boot", "-q", "--output-format=simple0"])
            .arg(format!("--output={}", o.display()))
            .arg(format!("--output-directory={}", out_dir.display()))
            .arg(&img),
        "",
    );
    let v = std::fs::read(&o).unwrap();
    assert!(v.ends_with(b"\0args a='b c' d\0\0"), "{v:?}");
    assert_eq!(std::fs::read_dir(&out_dir).unwrap().count(), 4);
    // Under pygrub's name, from a symlink, as libxl runs it.
    let link = dir.path().join("pygrub");
    std::os::unix::fs::symlink(XDISK, &link).unwrap();
    let out = run(
        Command::new(&link)
            .args(["-q", "-n", "--output-format=simple"])
            .arg(&img),
        "",
    );
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        "kernel <kernel:/boot/vmlinuz>\nramdisk <ramdisk:/boot/initrd>\nargs a='b c' d\n\n"
    );
    // A missing output directory is exit 1, as pygrub.
    let out = Command::new(&link)
        .args(["-q", "--output-directory=/nonexistent/x"])
        .arg(&img)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    // -l lists every entry.
    let out = run(Command::new(XDISK).args(["boot", "-l"]).arg(&img), "");
    assert!(String::from_utf8(out.stdout)
        .unwrap()
        .starts_with("title: its\n"));
}

#[test]
fn hostile_disks_give_one_line_errors_and_write_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("out");
    std::fs::create_dir(&out_dir).unwrap();
    let check = |img: &Path, want: &str| {
        let out = Command::new(XDISK)
            .args(["boot", "-q"])
            .arg(format!("--output-directory={}", out_dir.display()))
            .arg(img)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{img:?}: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{img:?}: {err}");
        assert!(err.contains(want), "{img:?}: {err}");
        assert_eq!(
            std::fs::read_dir(&out_dir).unwrap().count(),
            0,
            "{img:?} left files"
        );
    };
    // Zeros: no filesystem.
    let z = dir.path().join("zeros");
    std::fs::File::create(&z).unwrap().set_len(8 << 20).unwrap();
    check(&z, "no filesystem");
    // A kernel over the size limit (sparse, so the image stays small).
    let root = tree(
        dir.path(),
        &[(
            "/boot/grub/grub.cfg",
            b"menuentry 'big' {\n linux /boot/vmlinuz\n}\nmenuentry 'loop' {\n linux /boot/loop\n}\n".to_vec(),
        )],
        &[("/boot/loop", "/boot/loop2"), ("/boot/loop2", "loop")],
    );
    let f = std::fs::File::create(root.join("boot/vmlinuz")).unwrap();
    f.set_len(300 << 20).unwrap();
    let img = dir.path().join("big.ext4");
    mkfs_ext("ext4", &root, &img, 16);
    check(&img, "over the limit");
    // A config naming a symlink loop: not found as a kernel, clean.
    let out = Command::new(XDISK)
        .args(["boot", "-q", "--entry=1"])
        .arg(format!("--output-directory={}", out_dir.display()))
        .arg(&img)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(std::fs::read_dir(&out_dir).unwrap().count(), 0);
    // A qcow2 with an L1 table pointing past the end of the file.
    let q = dir.path().join("bad.qcow2");
    run(
        Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "qcow2"])
            .arg(&img)
            .arg(&q),
        "qemu-utils",
    );
    let mut data = std::fs::read(&q).unwrap();
    let l1 = u64::from_be_bytes(data[40..48].try_into().unwrap()) as usize;
    data[l1..l1 + 8].copy_from_slice(&(0x8000_0000_0000_0000u64 | (1u64 << 40)).to_be_bytes());
    std::fs::write(&q, &data).unwrap();
    let out = Command::new(XDISK)
        .args(["boot", "-q", "--format=qcow2"])
        .arg(format!("--output-directory={}", out_dir.display()))
        .arg(&q)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(std::fs::read_dir(&out_dir).unwrap().count(), 0);
}

/// `--runas`: the disk and the output files are opened first, then everything that reads
/// guest data runs as that user in an empty root; the result is the same.
#[test]
fn runas_drops_privileges_and_still_extracts() {
    if unsafe_free_is_root() {
        let dir = tempfile::tempdir().unwrap();
        let (k, r) = (blob(21, 50_000), blob(22, 5_000));
        let root = tree(
            dir.path(),
            &[
                ("/boot/vmlinuz", k.clone()),
                ("/boot/initrd", r.clone()),
                (
                    "/boot/grub/grub.cfg",
                    b"menuentry 'x' {\n linux /boot/vmlinuz ro\n initrd /boot/initrd\n}\n".to_vec(),
                ),
            ],
            &[],
        );
        let img = dir.path().join("fs.ext4");
        mkfs_ext("ext4", &root, &img, 8);
        let b = xdisk_boot(&img, &["--runas=65534"]);
        assert_eq!(b.kernel, k);
        assert_eq!(b.ramdisk.as_deref(), Some(&r[..]));
        assert_eq!(b.args.as_deref(), Some("ro"));
    } else {
        eprintln!("not root: --runas needs root to chroot and change user");
    }
    // Interactive + --runas is refused (pygrub's rule).
    let out = Command::new(XDISK)
        .args(["boot", "--runas=65534", "/nonexistent"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
}

fn unsafe_free_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .map(|s| {
            s.lines()
                .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

/// Paths in configs and symlinks stay inside the guest filesystem: `..` at its root stays at
/// its root, absolute links start from its root, never dom0's.
#[test]
fn guest_paths_never_reach_dom0_files() {
    let dir = tempfile::tempdir().unwrap();
    let k = blob(23, 10_000);
    let root = tree(
        dir.path(),
        &[
            ("/vmlinuz", k.clone()),
            (
                "/boot/grub/grub.cfg",
                b"menuentry 'up' {\n linux /boot/../../../../../vmlinuz ro\n}\n\
                  menuentry 'passwd' {\n linux /boot/passwd\n initrd /boot/shadow\n}\n"
                    .to_vec(),
            ),
        ],
        &[
            ("/boot/passwd", "/etc/passwd"),
            ("/boot/shadow", "../../../../etc/shadow"),
        ],
    );
    let img = dir.path().join("fs.ext4");
    mkfs_ext("ext4", &root, &img, 8);
    let b = xdisk_boot(&img, &[]);
    assert_eq!(
        b.kernel, k,
        "the guest's /vmlinuz, reached through ../ at its root"
    );
    let err = boot_with(&[XDISK, "boot"], &img, &["--entry=1"]).unwrap_err();
    assert!(err.contains("not found"), "{err}");
}

/// A config larger than the 1 MiB limit is refused with a clear message, not read.
#[test]
fn huge_config_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = b"menuentry 'x' {\n linux /vmlinuz\n}\n".to_vec();
    cfg.resize(2 << 20, b'#');
    let root = tree(
        dir.path(),
        &[("/vmlinuz", blob(24, 100)), ("/boot/grub/grub.cfg", cfg)],
        &[],
    );
    let img = dir.path().join("fs.ext4");
    mkfs_ext("ext4", &root, &img, 16);
    let err = boot_with(&[XDISK, "boot"], &img, &[]).unwrap_err();
    assert!(err.contains("over the limit"), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
}

/// mkfs.xfs from a tree described as a protofile (xfsprogs cannot copy a directory as mkfs.ext4
/// -d can). Small filesystems need the fstests escape hatch (TEST_DIR, TEST_DEV, QA_CHECK_FS).
fn mkfs_xfs(dir: &Path, files: &[(String, Vec<u8>)], out: &Path) {
    use std::collections::BTreeMap;
    // directory -> (files, subdirectories), from the paths.
    #[derive(Default)]
    struct D {
        files: Vec<(String, PathBuf)>,
        dirs: BTreeMap<String, D>,
    }
    let mut root = D::default();
    for (i, (p, data)) in files.iter().enumerate() {
        let src = dir.join(format!("src-{i}"));
        std::fs::write(&src, data).unwrap();
        let parts: Vec<&str> = p.trim_start_matches('/').split('/').collect();
        let mut d = &mut root;
        for c in &parts[..parts.len() - 1] {
            d = d.dirs.entry(c.to_string()).or_default();
        }
        d.files.push((parts[parts.len() - 1].to_string(), src));
    }
    fn emit(d: &D, s: &mut String) {
        for (name, src) in &d.files {
            s.push_str(&format!("{name} ---644 0 0 {}\n", src.display()));
        }
        for (name, sub) in &d.dirs {
            s.push_str(&format!("{name} d--755 0 0\n"));
            emit(sub, s);
            s.push_str("$\n");
        }
    }
    let mut proto = String::from("xdisk-test\n0 0\nd--755 0 0\n");
    emit(&root, &mut proto);
    proto.push_str("$\n");
    let proto_path = dir.join("proto");
    std::fs::write(&proto_path, proto).unwrap();
    run(
        Command::new("mkfs.xfs")
            .env("TEST_DIR", dir)
            .env("TEST_DEV", "none")
            .env("QA_CHECK_FS", "1")
            .args(["-q", "-f", "-p"])
            .arg(&proto_path)
            .arg("-d")
            .arg(format!("file,name={},size=32m", out.display())),
        "xfsprogs",
    );
}

/// RHEL 9 / Fedora: a separate XFS /boot, grub.cfg hands the menu to BLS entries (`blscfg`),
/// grubenv's saved_entry picks an older kernel and holds `kernelopts`.
#[test]
fn rhel_bls_entries_on_an_xfs_boot_partition() {
    let dir = tempfile::tempdir().unwrap();
    let (k, r) = (blob(25, 90_000), blob(26, 20_000));
    let mid = "8d3a5b1f2c6e4f0a9b7c1d2e3f405162";
    let new = "5.14.0-162.6.1.el9_1.x86_64";
    let old = "5.14.0-70.13.1.el9_0.x86_64";
    let entry = |v: &str| {
        format!(
            "title Red Hat Enterprise Linux ({v}) 9.1 (Plow)\nversion {v}\nlinux /vmlinuz-{v}\ninitrd /initramfs-{v}.img $tuned_initrd\n\
             options root=/dev/mapper/rhel-root ro $kernelopts $tuned_params\ngrub_users $grub_users\ngrub_arg --unrestricted\ngrub_class rhel\n"
        )
        .into_bytes()
    };
    let mut env = format!(
        "# GRUB Environment Block\nsaved_entry={mid}-{old}\nkernelopts=root=/dev/mapper/rhel-root ro crashkernel=1G-4G:192M resume=/dev/mapper/rhel-swap console=hvc0\nboot_success=0\n"
    )
    .into_bytes();
    env.resize(1024, b'#');
    let files = vec![
        ("/grub2/grub.cfg".to_string(), b"set pager=1\nif [ -f ${config_directory}/grubenv ]; then\n  load_env -f ${config_directory}/grubenv\nelif [ -s $prefix/grubenv ]; then\n  load_env\nfi\nif [ \"${next_entry}\" ] ; then\n   set default=\"${next_entry}\"\n   set next_entry=\nelse\n   set default=\"${saved_entry}\"\nfi\nset timeout=5\ninsmod blscfg\nblscfg\n".to_vec()),
        ("/grub2/grubenv".to_string(), env),
        (format!("/loader/entries/{mid}-{new}.conf"), entry(new)),
        (format!("/loader/entries/{mid}-{old}.conf"), entry(old)),
        (format!("/vmlinuz-{new}"), blob(27, 1000)),
        (format!("/initramfs-{new}.img"), blob(28, 1000)),
        (format!("/vmlinuz-{old}"), k.clone()),
        (format!("/initramfs-{old}.img"), r.clone()),
    ];
    let fs = dir.path().join("boot.xfs");
    mkfs_xfs(dir.path(), &files, &fs);
    let img = disk(dir.path(), "dos", &[(2048, Some(&fs), "83", 65536)], 40);
    let b = xdisk_boot(&img, &[]);
    assert_eq!(b.kernel, k);
    assert_eq!(b.ramdisk.as_deref(), Some(&r[..]));
    assert_eq!(
        b.args.as_deref(),
        Some("root=/dev/mapper/rhel-root ro root=/dev/mapper/rhel-root ro crashkernel=1G-4G:192M resume=/dev/mapper/rhel-swap console=hvc0")
    );
    // -l: newest first, as GRUB's blscfg sorts them.
    let out = run(Command::new(XDISK).args(["boot", "-l"]).arg(&img), "");
    let list = String::from_utf8(out.stdout).unwrap();
    let first = list.lines().next().unwrap();
    assert!(first.contains(new), "{list}");
}
