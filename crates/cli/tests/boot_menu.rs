//! `xdisk boot`'s interactive menu as libxl runs it: on a pty that is the session's controlling
//! terminal and its stdin, stdout and stderr (libxl's login_tty), with TERM=vt100 and nothing
//! else in the environment (no PATH), the result in a pre-created `--output` file in the
//! simple format. A small python3 script (scripts/setup installs python3) holds the pty's
//! master side: tests must not use unsafe, so no openpty here.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

mod boot_support;

use boot_support::{blob, disk, mkfs_ext};

const XDISK: &str = env!("CARGO_BIN_EXE_xdisk");

/// The pty driver. argv[1] is a JSON object: `argv` (the program and its arguments, run with
/// the environment {TERM: vt100} plus `env`), `keys` (hex strings, each written to the master
/// after the menu's help line `ready` has appeared, 0.3 s apart), `deadline` (seconds before
/// SIGKILL), `raw` (when libxl's cfmakeraw lands: "before" the bootloader starts, or
/// "after-menu").
/// Prints one JSON object: `status` (exit code, or -signal), `elapsed` (seconds from fork to
/// exit), `menu_at` (seconds until the help line appeared, or null), `bytes` (total read
/// from the master), `output` (all of it, latin-1), `killed`.
const PTY_DRIVER: &str = r#"
import fcntl, json, os, select, signal, sys, termios, time, tty
p = json.loads(sys.argv[1])
t0 = time.monotonic()
master, slave = os.openpty()
# libxl puts the pty in raw mode (cfmakeraw on the master: on Linux that sets the slave's
# termios) in the parent right after fork, racing with the bootloader's own settings. "before"
# applies it before the fork (the usual outcome), "after-menu" once the menu is up (the
# outcome on a loaded dom0).
if p.get("raw", "before") == "before":
    tty.setraw(master)
pid = os.fork()
if pid == 0:
    try:
        # libxl's login_tty: a new session whose controlling terminal is the pty, on 0, 1, 2.
        os.close(master)
        os.setsid()
        fcntl.ioctl(slave, termios.TIOCSCTTY, 0)
        for fd in (0, 1, 2):
            os.dup2(slave, fd)
        os.close(slave)
        os.execve(p["argv"][0], p["argv"], dict(p.get("env", {}), TERM="vt100"))
    finally:
        os._exit(127)
os.close(slave)
raw_late = p.get("raw") == "after-menu"
out = bytearray()
menu_at = None
keys = [bytes.fromhex(k) for k in p["keys"]]
next_key = None
killed = False
status = None
while True:
    now = time.monotonic()
    if now - t0 > p["deadline"] and not killed:
        os.kill(pid, signal.SIGKILL)
        killed = True
    if menu_at is None and p.get("ready", "Use the up and down keys").encode() in out:
        menu_at = now - t0
        next_key = now
        if raw_late:
            tty.setraw(master)
    if keys and next_key is not None and now >= next_key:
        os.write(master, keys.pop(0))
        next_key = now + 0.3
    r, _, _ = select.select([master], [], [], 0.05)
    if r:
        try:
            b = os.read(master, 65536)
        except OSError:
            b = b""
        if not b:
            break
        out += b
    if status is None:
        w, st = os.waitpid(pid, os.WNOHANG)
        if w == pid:
            status = st
            elapsed = time.monotonic() - t0
if status is None:
    _, status = os.waitpid(pid, 0)
    elapsed = time.monotonic() - t0
code = os.waitstatus_to_exitcode(status)
print(json.dumps({"status": code, "elapsed": elapsed, "menu_at": menu_at, "bytes": len(out),
                  "output": out.decode("latin-1"), "killed": killed}))
"#;

/// What the pty driver saw.
#[derive(Debug)]
struct PtyRun {
    status: i64,
    elapsed: f64,
    menu_at: Option<f64>,
    bytes: u64,
    output: String,
    killed: bool,
}

/// Runs `argv` on a pty as libxl does, typing `keys` once the menu is up.
fn on_pty(argv: &[String], keys: &[&[u8]], deadline: f64) -> PtyRun {
    pty_run(
        argv,
        keys,
        deadline,
        &[],
        "Use the up and down keys",
        "before",
    )
}

/// on_pty with more environment, another text that tells the menu is up, and the moment
/// libxl's cfmakeraw lands (see PTY_DRIVER).
fn pty_run(
    argv: &[String],
    keys: &[&[u8]],
    deadline: f64,
    env: &[(&str, String)],
    ready: &str,
    raw: &str,
) -> PtyRun {
    let hex = |k: &[u8]| k.iter().map(|b| format!("{b:02x}")).collect::<String>();
    let env: serde_json::Map<String, serde_json::Value> = env
        .iter()
        .map(|(k, v)| (k.to_string(), serde_json::Value::from(v.as_str())))
        .collect();
    let params = serde_json::json!({
        "argv": argv,
        "keys": keys.iter().map(|k| hex(k)).collect::<Vec<_>>(),
        "deadline": deadline,
        "env": env,
        "ready": ready,
        "raw": raw,
    });
    let out = Command::new("python3")
        .arg("-c")
        .arg(PTY_DRIVER)
        .arg(params.to_string())
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("python3: {e} (install Debian's python3)"));
    assert!(
        out.status.success(),
        "pty driver: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("pty driver JSON");
    PtyRun {
        status: v["status"].as_i64().expect("status"),
        elapsed: v["elapsed"].as_f64().expect("elapsed"),
        menu_at: v["menu_at"].as_f64(),
        bytes: v["bytes"].as_u64().expect("bytes"),
        output: v["output"].as_str().expect("output").to_string(),
        killed: v["killed"].as_bool().unwrap_or(false),
    }
}

const KVER: &str = "6.1.0-99-amd64";
const ARGS0: &str = "root=UUID=1234 ro quiet";
const ARGS1: &str = "root=/dev/xvda2 ro console=hvc0";
const ARGS2: &str = "root=/dev/xvda2 ro single";

/// A Debian-shaped grub.cfg: default 0, the given timeout, two entries and a submenu.
fn grub_cfg(timeout: u32) -> String {
    format!(
        "if [ -s $prefix/grubenv ]; then\n  load_env\nfi\n\
         if [ \"${{next_entry}}\" ] ; then\n   set default=\"${{next_entry}}\"\nelse\n   set default=\"0\"\nfi\n\
         function load_video {{\n  insmod all_video\n}}\n\
         if [ \"${{recordfail}}\" = 1 ] ; then\n  set timeout=30\nelse\n  set timeout={timeout}\nfi\n\
         menuentry 'Debian GNU/Linux' --class debian $menuentry_id_option 'gnulinux-simple-x' {{\n\
         \tload_video\n\tset root='hd0,msdos1'\n\tlinux\t/boot/vmlinuz-{KVER} {ARGS0}\n\tinitrd\t/boot/initrd.img-{KVER}\n}}\n\
         menuentry 'Debian GNU/Linux, second' --class debian {{\n\
         \tlinux\t/boot/vmlinuz-{KVER} {ARGS1}\n\tinitrd\t/boot/initrd.img-{KVER}\n}}\n\
         submenu 'Advanced options for Debian GNU/Linux' $menuentry_id_option 'gnulinux-advanced-x' {{\n\
         \tmenuentry 'Debian GNU/Linux, with Linux {KVER} (recovery mode)' {{\n\
         \t\tlinux\t/boot/vmlinuz-{KVER} {ARGS2}\n\t\tinitrd\t/boot/initrd.img-{KVER}\n\t}}\n}}\n"
    )
}

/// A Debian-like MBR disk whose grub.cfg sets `timeout`; returns the disk, kernel, ramdisk.
/// The bootloader's output directory (made) and the result file libxl pre-creates (a path).
fn out_paths(dir: &Path) -> (PathBuf, PathBuf) {
    let out_dir = dir.join("out");
    std::fs::create_dir(&out_dir).unwrap();
    (out_dir, dir.join("result"))
}

fn debian_disk(dir: &Path, timeout: u32) -> (PathBuf, Vec<u8>, Vec<u8>) {
    disk_with_cfg(dir, &grub_cfg(timeout))
}

/// The same disk with another grub.cfg.
fn disk_with_cfg(dir: &Path, cfg: &str) -> (PathBuf, Vec<u8>, Vec<u8>) {
    let (k, r) = (blob(1, 200_000), blob(2, 60_000));
    let root = dir.join("tree");
    for (p, data) in [
        (format!("boot/vmlinuz-{KVER}"), k.clone()),
        (format!("boot/initrd.img-{KVER}"), r.clone()),
        ("boot/grub/grub.cfg".to_string(), cfg.as_bytes().to_vec()),
        ("etc/fstab".to_string(), b"# nothing\n".to_vec()),
    ] {
        let f = root.join(p);
        std::fs::create_dir_all(f.parent().unwrap()).unwrap();
        std::fs::write(&f, data).unwrap();
    }
    let fs = dir.join("root.ext4");
    mkfs_ext("ext4", &root, &fs, 16);
    let sectors = std::fs::metadata(&fs).unwrap().len() / 512;
    (
        disk(dir, "dos", &[(2048, Some(&fs), "83", sectors)], 20),
        k,
        r,
    )
}

/// libxl's command line: the result in a pre-created file, simple format.
fn libxl_argv(disk: &Path, out_dir: &Path, output: &Path, extra: &[&str]) -> Vec<String> {
    std::fs::write(output, b"").unwrap();
    let mut v = vec![
        XDISK.to_string(),
        "boot".to_string(),
        format!("--output={}", output.display()),
        "--output-format=simple".to_string(),
        format!("--output-directory={}", out_dir.display()),
    ];
    v.extend(extra.iter().map(|s| s.to_string()));
    v.push(disk.display().to_string());
    v
}

/// Xen's pygrub (XDISK_PYGRUB, tests/boot/pygrub-oracle) on the same pty, typing `keys`; its
/// result, or None when the oracle is not set. Its curses menu puts the terminal in keypad
/// transmit mode, so a VT100 then sends ESC O A/B for the arrows: that is what to type to it.
fn pygrub_on_pty(disk: &Path, out_dir: &Path, output: &Path, keys: &[&[u8]]) -> Option<Result3> {
    let Ok(pygrub) = std::env::var("XDISK_PYGRUB") else {
        eprintln!("XDISK_PYGRUB not set: no comparison with Xen's pygrub");
        return None;
    };
    let mut argv = libxl_argv(disk, out_dir, output, &[]);
    argv.splice(0..2, [pygrub]);
    // The oracle script finds Xen's packages in the Xen lab's cache under HOME.
    let env: Vec<(&str, String)> = ["HOME", "XDISK_XEN_CACHE"]
        .iter()
        .filter_map(|k| std::env::var(k).ok().map(|v| (*k, v)))
        .collect();
    let run = pty_run(&argv, keys, 60.0, &env, "Use the", "before");
    assert_eq!(run.status, 0, "pygrub: {run:?}");
    assert!(run.menu_at.is_some(), "no pygrub menu: {:?}", run.output);
    Some(read_result(output))
}

type Result3 = (Vec<u8>, Option<Vec<u8>>, Option<String>);

/// The simple-format result: (kernel bytes, ramdisk bytes, args); removes the files.
fn read_result(output: &Path) -> Result3 {
    let text = std::fs::read_to_string(output).unwrap();
    let (mut k, mut r, mut a) = (Vec::new(), None, None);
    for line in text.split('\n') {
        if let Some(p) = line.strip_prefix("kernel ") {
            k = std::fs::read(p).unwrap_or_else(|e| panic!("{p}: {e}"));
            std::fs::remove_file(p).unwrap();
        } else if let Some(p) = line.strip_prefix("ramdisk ") {
            r = Some(std::fs::read(p).unwrap());
            std::fs::remove_file(p).unwrap();
        } else if let Some(s) = line.strip_prefix("args ") {
            a = Some(s.to_string());
        }
    }
    assert!(
        text.ends_with("\n\n"),
        "simple format ends with an empty item: {text:?}"
    );
    (k, r, a)
}

#[test]
fn nobody_typing_boots_the_default_entry_after_the_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let (img, k, r) = debian_disk(dir.path(), 1);
    let (out_dir, output) = out_paths(dir.path());
    let run = on_pty(&libxl_argv(&img, &out_dir, &output, &[]), &[], 60.0);
    assert!(!run.killed, "still running after 60 s: {run:?}");
    assert_eq!(run.status, 0, "{run:?}");
    assert!(
        run.menu_at.is_some(),
        "no menu on the pty: {:?}",
        run.output
    );
    assert!(
        run.output.contains("Debian GNU/Linux, second"),
        "{:?}",
        run.output
    );
    // It waited for the countdown (1 s), and not much more.
    let shown = run.elapsed - run.menu_at.unwrap();
    assert!(
        (0.8..15.0).contains(&shown),
        "menu shown for {shown:.2} s (total {:.2} s)",
        run.elapsed
    );
    assert!(run.elapsed < 20.0, "took {:.2} s", run.elapsed);
    let (kb, rb, args) = read_result(&output);
    assert_eq!(kb, k);
    assert_eq!(rb.as_deref(), Some(&r[..]));
    assert_eq!(args.as_deref(), Some(ARGS0));
    assert_eq!(std::fs::read_dir(&out_dir).unwrap().count(), 0);
    // The result went to the file, not to the console.
    assert!(!run.output.contains("kernel "), "{:?}", run.output);
    // pygrub's menu, left alone, boots the same.
    if let Some(theirs) = pygrub_on_pty(&img, &out_dir, &output, &[]) {
        assert_eq!(theirs, (k, Some(r), Some(ARGS0.to_string())));
    }
}

#[test]
fn down_arrow_then_enter_boots_the_next_entry() {
    let dir = tempfile::tempdir().unwrap();
    let (img, k, r) = debian_disk(dir.path(), 30);
    let (out_dir, output) = out_paths(dir.path());
    let argv = libxl_argv(&img, &out_dir, &output, &[]);
    let run = on_pty(&argv, &[b"\x1b[B", b"\r"], 60.0);
    assert!(!run.killed, "still running after 60 s: {run:?}");
    assert_eq!(run.status, 0, "{run:?}");
    // Enter answered at once, not after the 30 s countdown.
    let shown = run.elapsed - run.menu_at.expect("menu shown");
    assert!(shown < 20.0, "menu shown for {shown:.2} s");
    let (kb, rb, args) = read_result(&output);
    assert_eq!(kb, k);
    assert_eq!(rb.as_deref(), Some(&r[..]));
    assert_eq!(args.as_deref(), Some(ARGS1));
    // pygrub's menu picks the same entry with its down key.
    if let Some(theirs) = pygrub_on_pty(&img, &out_dir, &output, &[b"\x1bOB", b"\r"]) {
        assert_eq!(
            theirs,
            (k.clone(), Some(r.clone()), Some(ARGS1.to_string()))
        );
    }

    // Down twice reaches the submenu's entry (every entry counts); down past the end stays on
    // the last one; up comes back (VT100 cursor keys, and vi's j/k): 2, 2, 1, 0, 1.
    let run = on_pty(&argv, &[b"\x1b[B\x1b[B\x1b[B\x1b[B", b"\r"], 60.0);
    assert_eq!(run.status, 0, "{run:?}");
    assert_eq!(read_result(&output).2.as_deref(), Some(ARGS2));
    let run = on_pty(&argv, &[b"jjj", b"\x1b[A", b"k", b"j", b"\r"], 60.0);
    assert_eq!(run.status, 0, "{run:?}");
    assert_eq!(read_result(&output).2.as_deref(), Some(ARGS1));
    // A key stops the countdown: the menu then waits for Enter past the timeout.
    let dir2 = tempfile::tempdir().unwrap();
    let (img1, _, _) = debian_disk(dir2.path(), 2);
    let argv1 = libxl_argv(&img1, &out_dir, &output, &[]);
    let mut wait: Vec<&[u8]> = vec![b"\x1b[B"];
    wait.extend([&b"x"[..]; 12]); // 3.6 s of ignored keys, then Enter
    wait.push(b"\r");
    let run = on_pty(&argv1, &wait, 20.0);
    assert_eq!(run.status, 0, "{run:?}");
    let shown = run.elapsed - run.menu_at.expect("menu shown");
    assert!(shown > 3.4, "booted after {shown:.2} s, before Enter");
    assert_eq!(read_result(&output).2.as_deref(), Some(ARGS1));
    assert_eq!(std::fs::read_dir(&out_dir).unwrap().count(), 0);
}

#[test]
fn the_menu_writes_little_to_the_console_during_the_countdown() {
    let dir = tempfile::tempdir().unwrap();
    let (img, _, _) = debian_disk(dir.path(), 2);
    let (out_dir, output) = out_paths(dir.path());
    let run = on_pty(&libxl_argv(&img, &out_dir, &output, &[]), &[], 60.0);
    assert_eq!(run.status, 0, "{run:?}");
    let shown = run.elapsed - run.menu_at.expect("menu shown");
    assert!(shown > 1.8, "countdown of 2 s lasted {shown:.2} s");
    eprintln!("{} bytes on the pty over a 2 s countdown", run.bytes);
    // One full draw (a few hundred bytes) and one short line per second, not a redraw per
    // tick of the input poll.
    assert!(
        run.bytes < 3 * 1024,
        "{} bytes written to the pty over a 2 s countdown: {:?}",
        run.bytes,
        run.output
    );
    assert_eq!(
        run.output.matches("\x1b[2J").count(),
        1,
        "the screen was cleared more than once: {:?}",
        run.output
    );
    assert!(run.output.contains("in  2 seconds") && run.output.contains("in  1 seconds"));
    assert_eq!(read_result(&output).2.as_deref(), Some(ARGS0));
}

#[test]
fn runas_with_an_interactive_menu_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (img, _, _) = debian_disk(dir.path(), 1);
    let (out_dir, output) = out_paths(dir.path());
    // pygrub's rule: --runas needs -q or --entry (no menu once privileges are dropped).
    let run = on_pty(
        &libxl_argv(&img, &out_dir, &output, &["--runas=65534"]),
        &[],
        60.0,
    );
    assert_eq!(run.status, 1, "{run:?}");
    assert!(
        run.output
            .contains("In order to use --runas, you must also set --entry or -q"),
        "{:?}",
        run.output
    );
    assert!(run.menu_at.is_none(), "a menu was shown: {:?}", run.output);
    assert_eq!(std::fs::read(&output).unwrap(), b"");
    assert_eq!(std::fs::read_dir(&out_dir).unwrap().count(), 0);
    // With --entry (or -q) there is no menu: --runas is accepted. As root it boots as that
    // user in an empty root directory; otherwise dropping privileges fails, for another reason.
    let run = on_pty(
        &libxl_argv(&img, &out_dir, &output, &["--entry=1", "--runas=65534"]),
        &[],
        60.0,
    );
    assert!(!run.output.contains("In order to use --runas"), "{run:?}");
    use std::os::unix::fs::MetadataExt;
    if std::fs::metadata("/proc/self").unwrap().uid() == 0 {
        assert_eq!(run.status, 0, "{run:?}");
        assert_eq!(read_result(&output).2.as_deref(), Some(ARGS1));
    }
}

/// Entry titles come from the guest: their control characters (ESC, BEL, C1 controls such as
/// U+009B CSI) must not reach the console of the dom0 admin, where they could set the window
/// title, clear the screen or worse.
#[test]
fn guest_titles_cannot_send_escape_sequences_to_the_console() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = format!(
        "set default=0\nset timeout=5\n\
         menuentry 'Evil \x1b]2;pwned\x07 \x1b[2J\x1b[31m \u{9b}1m \r fake' {{\n\
         \tlinux\t/boot/vmlinuz-{KVER} {ARGS0}\n\tinitrd\t/boot/initrd.img-{KVER}\n}}\n\
         menuentry 'Plain' {{\n\tlinux\t/boot/vmlinuz-{KVER} {ARGS1}\n}}\n"
    );
    let (img, _, _) = disk_with_cfg(dir.path(), &cfg);
    let (out_dir, output) = out_paths(dir.path());
    let run = on_pty(&libxl_argv(&img, &out_dir, &output, &[]), &[b"\r"], 60.0);
    assert_eq!(run.status, 0, "{run:?}");
    assert!(run.output.contains("Evil"), "{:?}", run.output);
    for bad in ["\x1b]", "\x07", "\x1b[31m", "\u{9b}", "\r fake"] {
        assert!(
            !run.output.contains(bad),
            "{bad:?} reached the console: {:?}",
            run.output
        );
    }
    assert_eq!(run.output.matches("\x1b[2J").count(), 1, "{:?}", run.output);
    assert_eq!(read_result(&output).2.as_deref(), Some(ARGS0));
}

/// libxl sets the pty raw (cfmakeraw: VMIN=1, VTIME=0) from the parent right after the fork,
/// racing with the bootloader. When it lands after the menu has set its own VMIN=0/VTIME=1 (a
/// loaded dom0), a menu that relies on VTIME blocks in read() until a key arrives: nobody
/// typing, the countdown never ends and the guest never boots. The menu (like pygrub's curses)
/// waits for keys with poll(), which this guards.
#[test]
fn the_countdown_ends_when_libxl_sets_raw_mode_late() {
    let dir = tempfile::tempdir().unwrap();
    let (img, _, _) = debian_disk(dir.path(), 1);
    let (out_dir, output) = out_paths(dir.path());
    let argv = libxl_argv(&img, &out_dir, &output, &[]);
    let run = pty_run(
        &argv,
        &[],
        10.0,
        &[],
        "Use the up and down keys",
        "after-menu",
    );
    assert!(!run.killed, "no boot 10 s after a 1 s countdown: {run:?}");
    assert_eq!(run.status, 0, "{run:?}");
    assert_eq!(read_result(&output).2.as_deref(), Some(ARGS0));
}

/// An Escape typed alone (a user giving up on a choice) must not eat the next keys: Enter
/// after it boots. (The menu once waited for 3 bytes after any ESC, so Enter was swallowed and
/// the menu, its countdown stopped, waited for ever.)
#[test]
fn a_lone_escape_does_not_swallow_enter() {
    let dir = tempfile::tempdir().unwrap();
    let (img, _, _) = debian_disk(dir.path(), 5);
    let (out_dir, output) = out_paths(dir.path());
    let run = on_pty(
        &libxl_argv(&img, &out_dir, &output, &[]),
        &[b"\x1b", b"\r"],
        4.0,
    );
    assert!(!run.killed, "Enter after Escape did not boot: {run:?}");
    assert_eq!(read_result(&output).2.as_deref(), Some(ARGS0));
}

/// The arrows in VT100 application cursor mode (ESC O A/B: what the user's terminal sends
/// after pygrub, or any curses program, left it in keypad transmit mode) move like ESC [ A/B.
#[test]
fn application_mode_arrows_move_too() {
    let dir = tempfile::tempdir().unwrap();
    let (img, _, _) = debian_disk(dir.path(), 5);
    let (out_dir, output) = out_paths(dir.path());
    let run = on_pty(
        &libxl_argv(&img, &out_dir, &output, &[]),
        &[b"\x1bOB", b"\r"],
        10.0,
    );
    assert_eq!(run.status, 0, "{run:?}");
    assert_eq!(read_result(&output).2.as_deref(), Some(ARGS1));
}
