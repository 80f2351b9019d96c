//! How a run shows its progress, kept out of the loop (burn-train's renderer): a bar per epoch
//! on a terminal (periodic log lines when stderr is not one) plus a line per epoch, the epoch
//! lines alone, or nothing.

use super::EpochRecord;
use crate::progress::{Bar, ProgressMode, Unit};

/// A step's running figures, for the bar's message.
#[derive(Debug, Clone, Copy)]
pub(crate) struct StepView {
    /// Loader batches of this epoch done so far.
    pub batches_done: usize,
    pub mean_loss: f64,
    pub pixel_accuracy: f64,
    pub images_per_s: f64,
    pub lr: f64,
}

/// Receives the loop's events.
pub(crate) trait Renderer {
    /// Epoch `epoch` (1-based) of `epochs` starts, `batches` long, `done` of them already done
    /// (a resumed epoch).
    fn epoch_start(&mut self, epoch: usize, epochs: usize, batches: usize, done: usize);
    fn step(&mut self, view: &StepView);
    fn epoch_end(&mut self, record: &EpochRecord, epochs: usize, best: bool);
}

/// The renderer for a progress mode: bars and epoch lines; with bars hidden (`--json`), the
/// epoch lines alone; nothing when info lines are filtered out (`--quiet`).
pub(crate) fn for_mode(mode: ProgressMode) -> Box<dyn Renderer> {
    match mode {
        ProgressMode::Hidden if log::log_enabled!(log::Level::Info) => Box::new(LogLines),
        ProgressMode::Hidden => Box::new(Silent),
        mode => Box::new(Bars { mode, bar: None }),
    }
}

/// An epoch bar (or its log-line fallback) and the epoch lines.
pub(crate) struct Bars {
    mode: ProgressMode,
    bar: Option<Bar>,
}

impl Renderer for Bars {
    fn epoch_start(&mut self, epoch: usize, epochs: usize, batches: usize, done: usize) {
        let bar = self.mode.bar(&format!("epoch {epoch}/{epochs}"), Some(batches as u64), Unit::Items("batches"));
        bar.set_position(done as u64);
        self.bar = Some(bar);
    }

    fn step(&mut self, view: &StepView) {
        if let Some(bar) = &self.bar {
            bar.set_position(view.batches_done as u64);
            bar.set_message(&format!(
                "loss {:.4} acc {:.1}% {:.1} img/s lr {:.2e}",
                view.mean_loss,
                100.0 * view.pixel_accuracy,
                view.images_per_s,
                view.lr
            ));
        }
    }

    fn epoch_end(&mut self, record: &EpochRecord, epochs: usize, best: bool) {
        if let Some(bar) = self.bar.take() {
            bar.finish();
        }
        LogLines.epoch_end(record, epochs, best);
    }
}

/// One log line per epoch.
pub(crate) struct LogLines;

impl Renderer for LogLines {
    fn epoch_start(&mut self, _: usize, _: usize, _: usize, _: usize) {}
    fn step(&mut self, _: &StepView) {}
    fn epoch_end(&mut self, record: &EpochRecord, epochs: usize, best: bool) {
        log::info!("{}", epoch_line(record, epochs, best));
    }
}

/// Nothing at all.
pub(crate) struct Silent;

impl Renderer for Silent {
    fn epoch_start(&mut self, _: usize, _: usize, _: usize, _: usize) {}
    fn step(&mut self, _: &StepView) {}
    fn epoch_end(&mut self, _: &EpochRecord, _: usize, _: bool) {}
}

/// `epoch 3/42: train loss … acc …% (… img/s); val loss … acc …% mIoU …, lr …, …s (best)`.
pub(crate) fn epoch_line(r: &EpochRecord, epochs: usize, best: bool) -> String {
    format!(
        "epoch {}/{epochs}: train loss {:.4} acc {:.1}% ({:.1} img/s){}, lr {:.2e}, {:.1}s{}",
        r.epoch,
        r.train_loss,
        100.0 * r.train_pixel_accuracy,
        r.train_images_per_s,
        match (&r.val_loss, &r.val_pixel_accuracy, &r.val_mean_iou) {
            (Some(l), Some(a), Some(m)) => format!("; val loss {l:.4} acc {:.1}% mIoU {m:.4}", 100.0 * a),
            _ => String::new(),
        },
        r.lr,
        r.epoch_seconds,
        if best && r.val_mean_iou.is_some() { " (best)" } else { "" }
    )
}
