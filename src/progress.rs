//! Progress reporting kept out of the work itself (burn's renderer idea): an indicatif bar on a
//! terminal, periodic log lines when stderr is not a terminal (CI logs), or nothing.

use std::io::IsTerminal;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// How a command reports progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ProgressMode {
    /// A bar on a terminal, log lines otherwise.
    #[default]
    Auto,
    /// Periodic log lines only.
    Log,
    /// Nothing (tests, `--quiet`, `--json`).
    Hidden,
}

/// What a bar counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    /// Bytes: shown with binary prefixes, rate and ETA.
    Bytes,
    /// Countable things, named (e.g. "samples", "images").
    Items(&'static str),
}

/// How often the log-line fallback reports.
const LOG_INTERVAL: Duration = Duration::from_secs(5);

impl ProgressMode {
    /// Starts a bar for `total` units (unknown when `None`).
    pub fn bar(self, label: &str, total: Option<u64>, unit: Unit) -> Bar {
        let kind = match self {
            ProgressMode::Hidden => Kind::Hidden,
            ProgressMode::Auto if std::io::stderr().is_terminal() => {
                Kind::Tty(indicatif_bar(label, total, unit))
            }
            _ => Kind::Log,
        };
        Bar {
            kind,
            label: label.to_string(),
            total: AtomicU64::new(total.unwrap_or(0)),
            unit,
            start: Instant::now(),
            position: AtomicU64::new(0),
            last_log: Mutex::new(Instant::now()),
        }
    }
}

fn indicatif_bar(label: &str, total: Option<u64>, unit: Unit) -> indicatif::ProgressBar {
    let bar = match total {
        Some(t) => indicatif::ProgressBar::new(t),
        None => indicatif::ProgressBar::new_spinner(),
    };
    let template = match (unit, total.is_some()) {
        (Unit::Bytes, true) => {
            "{prefix} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta} {msg}"
        }
        (Unit::Bytes, false) => "{prefix} {spinner} {bytes} {bytes_per_sec} {msg}",
        (Unit::Items(_), true) => "{prefix} [{bar:30}] {pos}/{len} {per_sec} ETA {eta} {msg}",
        (Unit::Items(_), false) => "{prefix} {spinner} {pos} {per_sec} {msg}",
    };
    if let Ok(style) = indicatif::ProgressStyle::with_template(template) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_prefix(label.to_string());
    bar
}

enum Kind {
    Tty(indicatif::ProgressBar),
    Log,
    Hidden,
}

/// One running progress indicator. Cheap to update from many threads.
pub struct Bar {
    kind: Kind,
    label: String,
    /// 0 = unknown.
    total: AtomicU64,
    unit: Unit,
    start: Instant,
    position: AtomicU64,
    last_log: Mutex<Instant>,
}

impl Bar {
    /// Advances by `n` units.
    pub fn inc(&self, n: u64) {
        let position = self.position.fetch_add(n, Ordering::Relaxed) + n;
        match &self.kind {
            Kind::Tty(bar) => bar.inc(n),
            Kind::Log => self.maybe_log(position, ""),
            Kind::Hidden => {}
        }
    }

    /// Sets the total once it is known (e.g. from a Content-Length header).
    pub fn set_total(&self, total: u64) {
        self.total.store(total, Ordering::Relaxed);
        if let Kind::Tty(bar) = &self.kind {
            let styled = indicatif_bar(&self.label, Some(total), self.unit);
            bar.set_style(styled.style());
            bar.set_length(total);
        }
    }

    /// Sets the absolute position (e.g. a resumed download).
    pub fn set_position(&self, position: u64) {
        self.position.store(position, Ordering::Relaxed);
        if let Kind::Tty(bar) = &self.kind {
            bar.set_position(position);
        }
    }

    /// Sets the trailing message (loss, accuracy, ...).
    pub fn set_message(&self, message: &str) {
        match &self.kind {
            Kind::Tty(bar) => bar.set_message(message.to_string()),
            Kind::Log => self.maybe_log(self.position.load(Ordering::Relaxed), message),
            Kind::Hidden => {}
        }
    }

    /// Prints a line above the bar (or logs it).
    pub fn println(&self, line: &str) {
        match &self.kind {
            Kind::Tty(bar) => bar.println(line),
            _ => log::info!("{line}"),
        }
    }

    /// Ends the bar.
    pub fn finish(&self) {
        match &self.kind {
            Kind::Tty(bar) => bar.finish_and_clear(),
            Kind::Log => {
                let position = self.position.load(Ordering::Relaxed);
                log::info!("{}: done, {}", self.label, self.describe(position));
            }
            Kind::Hidden => {}
        }
    }

    fn maybe_log(&self, position: u64, message: &str) {
        let Ok(mut last) = self.last_log.try_lock() else { return };
        if last.elapsed() < LOG_INTERVAL {
            return;
        }
        *last = Instant::now();
        let suffix = if message.is_empty() { String::new() } else { format!(" {message}") };
        log::info!("{}: {}{suffix}", self.label, self.describe(position));
    }

    fn describe(&self, position: u64) -> String {
        let secs = self.start.elapsed().as_secs_f64().max(1e-9);
        let rate = position as f64 / secs;
        let fmt = |v: u64| match self.unit {
            Unit::Bytes => crate::util::human_bytes(v),
            Unit::Items(name) => format!("{v} {name}"),
        };
        let rate_text = match self.unit {
            Unit::Bytes => format!("{}/s", crate::util::human_bytes(rate as u64)),
            Unit::Items(name) => format!("{rate:.1} {name}/s"),
        };
        match self.total.load(Ordering::Relaxed) {
            total if total > 0 => {
                let eta = if rate > 0.0 { (total.saturating_sub(position)) as f64 / rate } else { 0.0 };
                format!(
                    "{} of {} ({:.0}%), {rate_text}, ETA {eta:.0}s",
                    fmt(position),
                    fmt(total),
                    100.0 * position as f64 / total as f64
                )
            }
            _ => format!("{}, {rate_text}", fmt(position)),
        }
    }
}

impl Drop for Bar {
    fn drop(&mut self) {
        if let Kind::Tty(bar) = &self.kind {
            if !bar.is_finished() {
                bar.finish_and_clear();
            }
        }
    }
}
