//! Early stopping as its own rule: it reads an epoch's validation score and says whether the
//! run improved and whether it should stop. Its memory (best score, best epoch, epochs without
//! improvement) lives in the checkpoint's [`TrainingProgress`], so a resumed run counts on.

use crate::checkpoint::TrainingProgress;
use crate::config::EarlyStoppingConfig;

/// The rule's answer for one epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Verdict {
    pub improved: bool,
    pub stop: bool,
}

/// Stop after `patience` epochs whose score did not beat the best by more than `min_delta`
/// (Keras's `EarlyStopping(monitor="val_mean_iou", mode="max")`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct EarlyStopping {
    patience: Option<usize>,
    min_delta: f64,
}

impl EarlyStopping {
    pub fn new(config: &EarlyStoppingConfig) -> Self {
        Self { patience: config.patience, min_delta: config.min_delta }
    }

    /// Records epoch `epoch`'s score (none without a validation split: every epoch counts as
    /// the best, and nothing stops).
    pub fn observe(&self, progress: &mut TrainingProgress, epoch: usize, score: Option<f64>) -> Verdict {
        let score = score.unwrap_or(f64::INFINITY);
        let improved = progress.best_mean_iou.is_none_or(|best| score > best + self.min_delta);
        if improved {
            progress.best_mean_iou = Some(score.min(1.0));
            progress.best_epoch = Some(epoch);
            progress.epochs_without_improvement = 0;
        } else {
            progress.epochs_without_improvement += 1;
        }
        let stop = self.patience.is_some_and(|p| progress.epochs_without_improvement >= p);
        Verdict { improved, stop }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::EpochTotals;

    fn progress() -> TrainingProgress {
        TrainingProgress {
            epochs_completed: 0,
            step: 0,
            batch_in_epoch: 0,
            epoch_seed: 0,
            rng_state: 0,
            best_mean_iou: None,
            best_epoch: None,
            epochs_without_improvement: 0,
            partial: EpochTotals::default(),
        }
    }

    #[test]
    fn stops_after_patience_epochs_without_a_real_improvement() {
        let rule = EarlyStopping::new(&EarlyStoppingConfig { patience: Some(2), min_delta: 0.01 });
        let mut p = progress();
        let scores = [0.50, 0.60, 0.605, 0.59, 0.70];
        let verdicts: Vec<Verdict> = scores.iter().enumerate().map(|(i, s)| rule.observe(&mut p, i + 1, Some(*s))).collect();
        assert_eq!(verdicts.iter().map(|v| v.improved).collect::<Vec<_>>(), [true, true, false, false, true]);
        // 0.605 is within min_delta of 0.60: epochs 3 and 4 do not count, so epoch 4 stops.
        assert_eq!(verdicts.iter().position(|v| v.stop), Some(3));
        assert_eq!((p.best_epoch, p.best_mean_iou), (Some(5), Some(0.70)));
    }

    #[test]
    fn without_patience_or_validation_nothing_stops() {
        let rule = EarlyStopping::new(&EarlyStoppingConfig { patience: None, min_delta: 0.0 });
        let mut p = progress();
        assert!((1..10).all(|e| !rule.observe(&mut p, e, Some(0.1)).stop));
        // Without a validation split every epoch is the newest best and patience never runs out.
        let rule = EarlyStopping::new(&EarlyStoppingConfig { patience: Some(1), min_delta: 0.0 });
        let mut p = progress();
        for e in 1..5 {
            assert_eq!(rule.observe(&mut p, e, None), Verdict { improved: true, stop: false }, "epoch {e}");
        }
        assert_eq!(p.best_epoch, Some(4));
    }
}
