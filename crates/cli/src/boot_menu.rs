//! The bootloader's interactive menu on a VT100 terminal (what libxl gives the bootloader: a
//! pty, TERM=vt100): the entries, the default highlighted, a countdown from the config's
//! timeout; arrow keys (or j/k) move, Enter boots, any key stops the countdown.

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::time::Instant;

use anyhow::Result;
use xdisk_boot::config::BootConfig;

/// Countdown when the config sets no timeout.
const DEFAULT_TIMEOUT: u32 = 5;

/// Puts the terminal in raw mode until dropped.
struct RawMode {
    fd: i32,
    saved: libc::termios,
}

impl RawMode {
    fn enter(fd: i32) -> Option<RawMode> {
        // SAFETY: termios is plain old data; tcgetattr fills it.
        let mut t: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: fd is our open stdin; t is a valid termios to fill.
        if unsafe { libc::tcgetattr(fd, &mut t) } != 0 {
            return None;
        }
        let saved = t;
        t.c_lflag &= !(libc::ICANON | libc::ECHO);
        t.c_cc[libc::VMIN] = 0;
        t.c_cc[libc::VTIME] = 1; // reads wait at most 0.1 s
                                 // SAFETY: as above; t is a valid termios.
        if unsafe { libc::tcsetattr(fd, libc::TCSANOW, &t) } != 0 {
            return None;
        }
        Some(RawMode { fd, saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        // SAFETY: restores the settings read in enter() on the same fd.
        unsafe { libc::tcsetattr(self.fd, libc::TCSANOW, &self.saved) };
    }
}

fn draw(out: &mut impl Write, cfg: &BootConfig, sel: usize) -> std::io::Result<()> {
    let mut s = String::from("\x1b[2J\x1b[H    xdisk boot (pygrub-compatible)\r\n\r\n");
    let first = sel.saturating_sub(15);
    for (i, e) in cfg.entries.iter().enumerate().skip(first).take(16) {
        let title: String = e
            .title
            .chars()
            .filter(|c| !c.is_control())
            .take(70)
            .collect();
        if i == sel {
            s.push_str(&format!("  \x1b[7m {title:<70}\x1b[0m\r\n"));
        } else {
            s.push_str(&format!("   {title:<70}\r\n"));
        }
    }
    s.push_str("\r\n    Use the up and down keys to select an entry; Enter boots it.\r\n");
    out.write_all(s.as_bytes())?;
    out.flush()
}

/// Rewrites only the countdown line (few bytes: nobody may be reading the console, and a
/// full pty must not block the countdown).
fn draw_countdown(out: &mut impl Write, left: Option<u64>) -> std::io::Result<()> {
    let s = match left {
        Some(n) => format!("\r    Will boot the selected entry in {n:2} seconds"),
        None => format!("\r{:60}\r", ""),
    };
    out.write_all(s.as_bytes())?;
    out.flush()
}

/// What waiting for input found.
enum Input {
    Ready,
    Timeout,
    /// The terminal went away (hang-up or error): nobody can choose any more.
    Gone,
}

/// Waits up to `ms` milliseconds for input on `fd`.
fn wait_input(fd: i32, ms: i32) -> Input {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: poll reads and writes the one pollfd we pass, for the duration of the call.
    let n = unsafe { libc::poll(&mut p, 1, ms) };
    if n < 0 {
        return if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
            Input::Timeout
        } else {
            Input::Gone
        };
    }
    if n == 0 {
        Input::Timeout
    } else if p.revents & libc::POLLIN != 0 {
        Input::Ready
    } else {
        Input::Gone
    }
}

/// Shows the menu; returns the chosen entry's index.
pub fn run(cfg: &BootConfig, default: usize) -> Result<usize> {
    let n = cfg.entries.len();
    if n == 0 {
        return Ok(default);
    }
    let stdin = std::io::stdin();
    let Some(_raw) = RawMode::enter(stdin.as_raw_fd()) else {
        return Ok(default);
    };
    let mut out = std::io::stderr();
    let mut sel = default.min(n - 1);
    let timeout = u64::from(cfg.timeout.unwrap_or(DEFAULT_TIMEOUT));
    let start = Instant::now();
    let mut counting = true;
    let fd = stdin.as_raw_fd();
    let mut input = stdin.lock();
    let mut pending: Vec<u8> = Vec::new();
    let mut redraw = true;
    let mut shown: Option<Option<u64>> = None;
    loop {
        let left = counting.then(|| timeout.saturating_sub(start.elapsed().as_secs()));
        if left == Some(0) {
            break;
        }
        // Output errors (a console nobody reads) never stop the countdown.
        if redraw {
            let _ = draw(&mut out, cfg, sel);
            redraw = false;
            shown = None;
        }
        if shown != Some(left) {
            let _ = draw_countdown(&mut out, left);
            shown = Some(left);
        }
        let mut buf = [0u8; 16];
        // Wait for input with poll(), not with the terminal's VMIN/VTIME: libxl makes the pty
        // raw (cfmakeraw: VMIN=1) from its side after starting us, which would turn a timed
        // read into one that blocks until a key arrives, and the countdown would never end.
        match wait_input(fd, 100) {
            Input::Ready => {}
            Input::Timeout => continue,
            Input::Gone => break,
        }
        let got = match input.read(&mut buf) {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Ok(0) | Err(_) => break, // end of input: boot what is selected
            Ok(n) => n,
        };
        counting = false;
        redraw = true;
        pending.extend_from_slice(&buf[..got]);
        while !pending.is_empty() {
            // Arrows: ESC [ A/B, or ESC O A/B from a terminal left in keypad (application)
            // mode, as curses programs (pygrub among them) leave it.
            let arrow = |k: u8| {
                pending.len() >= 3
                    && pending[0] == 0x1b
                    && matches!(pending[1], b'[' | b'O')
                    && pending[2] == k
            };
            if arrow(b'A') {
                sel = sel.saturating_sub(1);
                pending.drain(..3);
            } else if arrow(b'B') {
                sel = (sel + 1).min(n - 1);
                pending.drain(..3);
            } else if pending[0] == b'k' {
                sel = sel.saturating_sub(1);
                pending.remove(0);
            } else if pending[0] == b'j' {
                sel = (sel + 1).min(n - 1);
                pending.remove(0);
            } else if pending[0] == b'\r' || pending[0] == b'\n' {
                let _ = out.write_all(b"\r\n");
                return Ok(sel);
            } else if matches!(&pending[..], [0x1b] | [0x1b, b'['] | [0x1b, b'O']) {
                break; // the start of an arrow key, the rest still arriving
            } else {
                pending.remove(0);
            }
        }
    }
    let _ = out.write_all(b"\r\n");
    Ok(sel)
}
