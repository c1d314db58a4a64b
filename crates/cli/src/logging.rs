//! Where logs go: journald natively when the process runs under systemd (its stderr is the
//! journal stream: `JOURNAL_STREAM` names that file), human text otherwise (colours only on a
//! terminal), or JSON lines with `--log-format=json` / `XDISK_LOG_FORMAT=json`. The level
//! filter is `XDISK_LOG` (tracing's env-filter syntax, default `warn`). Structured fields of
//! the events (device, domid, devid, image, ...) become journal fields (upper-cased by
//! tracing-journald) and JSON keys.

use std::io::IsTerminal;
use std::os::unix::fs::MetadataExt;

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

/// The log formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// journald under systemd, text elsewhere.
    Auto,
    Text,
    Json,
    Journald,
}

/// Whether stderr is the journal stream systemd set up for this service
/// (systemd.exec(5): `JOURNAL_STREAM=DEVICE:INODE` of the stream).
fn stderr_is_journal() -> bool {
    let Ok(v) = std::env::var("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = v.split_once(':') else {
        return false;
    };
    let (Ok(dev), Ok(ino)) = (dev.parse::<u64>(), ino.parse::<u64>()) else {
        return false;
    };
    std::fs::metadata("/proc/self/fd/2").is_ok_and(|m| m.dev() == dev && m.ino() == ino)
}

/// The format `auto` resolves to, and the one asked for by the environment.
pub fn resolve(asked: Option<LogFormat>) -> LogFormat {
    let env = std::env::var("XDISK_LOG_FORMAT")
        .ok()
        .and_then(|v| <LogFormat as clap::ValueEnum>::from_str(&v, true).ok());
    match asked.or(env).unwrap_or(LogFormat::Auto) {
        LogFormat::Auto if stderr_is_journal() => LogFormat::Journald,
        LogFormat::Auto => LogFormat::Text,
        f => f,
    }
}

fn filter() -> EnvFilter {
    EnvFilter::try_from_env("XDISK_LOG").unwrap_or_else(|_| EnvFilter::new("warn"))
}

/// Installs the global subscriber. journald that cannot be reached falls back to text.
pub fn init(format: LogFormat) {
    let text = || {
        tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(std::io::stderr().is_terminal())
    };
    match format {
        LogFormat::Json => {
            let _ = tracing_subscriber::registry()
                .with(filter())
                .with(
                    tracing_subscriber::fmt::layer()
                        .json()
                        .flatten_event(true)
                        .with_current_span(true)
                        .with_span_list(false)
                        .with_writer(std::io::stderr),
                )
                .try_init();
        }
        LogFormat::Journald => match tracing_journald::layer() {
            Ok(j) => {
                let _ = tracing_subscriber::registry()
                    .with(filter())
                    .with(
                        j.with_syslog_identifier("xdisk".to_string())
                            .with_field_prefix(None),
                    )
                    .try_init();
            }
            Err(e) => {
                let _ = tracing_subscriber::registry()
                    .with(filter())
                    .with(text())
                    .try_init();
                tracing::warn!("journald not reachable ({e}); logging text to stderr");
            }
        },
        LogFormat::Text | LogFormat::Auto => {
            let _ = tracing_subscriber::registry()
                .with(filter())
                .with(text())
                .try_init();
        }
    }
}
