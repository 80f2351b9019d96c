//! Checkpoints of a run: the [`Checkpointer`] writes them (atomically, with the run's
//! metadata), a [`CheckpointStrategy`] decides which to write and which to keep (burn-train's
//! split between the checkpointer and its strategy).

use std::path::PathBuf;

use anyhow::Result;

use super::step::Learner;
use crate::checkpoint::{self, CheckpointMeta, RunLayout, TrainingProgress};
use crate::config::{CheckpointConfig, Config};
use crate::model::ModelSpec;

/// Which checkpoint file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CheckpointKind {
    /// `best.safetensors`: the best epoch by validation mean IoU so far.
    Best,
    /// `epoch-NNNN.safetensors`, after that epoch.
    Epoch(usize),
    /// `interrupted.safetensors`: where a stopped run continues.
    Interrupted,
}

/// What the strategy wants done at the end of an epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CheckpointAction {
    Save(CheckpointKind),
    /// Delete periodic checkpoints beyond the newest `n`.
    KeepLast(usize),
}

/// How an epoch ended, as far as checkpoints care.
#[derive(Debug, Clone, Copy)]
pub(crate) struct EpochEnd {
    pub epoch: usize,
    /// The validation score improved (or there is no validation split).
    pub improved: bool,
    /// No epoch follows (the last one, early stopping, or a stop request).
    pub last: bool,
}

/// Decides which checkpoints an epoch leaves.
pub(crate) trait CheckpointStrategy {
    fn at_epoch_end(&self, end: EpochEnd) -> Vec<CheckpointAction>;
}

/// `train.checkpoint`: the best epoch, every `every_epochs`-th epoch and the last one, keeping
/// the newest `keep_last` periodic checkpoints.
pub(crate) struct KeepLastAndBest {
    pub every_epochs: usize,
    pub keep_last: usize,
}

impl From<&CheckpointConfig> for KeepLastAndBest {
    fn from(c: &CheckpointConfig) -> Self {
        Self { every_epochs: c.every_epochs, keep_last: c.keep_last }
    }
}

impl CheckpointStrategy for KeepLastAndBest {
    fn at_epoch_end(&self, end: EpochEnd) -> Vec<CheckpointAction> {
        let mut actions = Vec::new();
        if end.improved {
            actions.push(CheckpointAction::Save(CheckpointKind::Best));
        }
        if end.epoch.is_multiple_of(self.every_epochs) || end.last {
            actions.push(CheckpointAction::Save(CheckpointKind::Epoch(end.epoch)));
            actions.push(CheckpointAction::KeepLast(self.keep_last));
        }
        actions
    }
}

/// Writes a run's checkpoints.
pub(crate) struct Checkpointer {
    run: RunLayout,
    spec: ModelSpec,
    config: Config,
    config_digest: String,
    dataset_digest: String,
    strategy: Box<dyn CheckpointStrategy>,
}

impl Checkpointer {
    pub fn new(run: RunLayout, spec: ModelSpec, config: Config, config_digest: String, dataset_digest: String, strategy: Box<dyn CheckpointStrategy>) -> Self {
        Self { run, spec, config, config_digest, dataset_digest, strategy }
    }

    pub fn path(&self, kind: CheckpointKind) -> PathBuf {
        match kind {
            CheckpointKind::Best => self.run.best(),
            CheckpointKind::Epoch(e) => self.run.epoch_checkpoint(e),
            CheckpointKind::Interrupted => self.run.interrupted(),
        }
    }

    /// Writes one checkpoint of the learner at `progress`.
    pub fn save(&self, kind: CheckpointKind, progress: &TrainingProgress, learner: &Learner, val_mean_iou: Option<f64>) -> Result<PathBuf> {
        let meta = CheckpointMeta {
            format_version: checkpoint::FORMAT_VERSION,
            segctl_version: env!("CARGO_PKG_VERSION").into(),
            created: crate::util::utc_timestamp(),
            spec: self.spec.clone(),
            config: self.config.clone(),
            progress: progress.clone(),
            val_mean_iou,
            config_digest: self.config_digest.clone(),
            dataset_digest: self.dataset_digest.clone(),
            precision: self.config.train.precision,
        };
        let (model, optimizer, online) = learner.checkpoint_tensors();
        let path = self.path(kind);
        checkpoint::save(&path, &meta, &model, &optimizer, &online)?;
        Ok(path)
    }

    /// Does what the strategy asks at the end of an epoch.
    pub fn epoch_end(&self, end: EpochEnd, progress: &TrainingProgress, learner: &Learner, val_mean_iou: Option<f64>) -> Result<()> {
        for action in self.strategy.at_epoch_end(end) {
            match action {
                CheckpointAction::Save(kind) => {
                    self.save(kind, progress, learner, val_mean_iou)?;
                }
                CheckpointAction::KeepLast(n) => self.run.prune(n)?,
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_best_every_nth_and_the_last() {
        let s = KeepLastAndBest { every_epochs: 5, keep_last: 2 };
        let at = |epoch, improved, last| s.at_epoch_end(EpochEnd { epoch, improved, last });
        assert_eq!(at(1, true, false), [CheckpointAction::Save(CheckpointKind::Best)]);
        assert!(at(2, false, false).is_empty());
        assert_eq!(at(5, false, false), [CheckpointAction::Save(CheckpointKind::Epoch(5)), CheckpointAction::KeepLast(2)]);
        assert_eq!(
            at(7, true, true),
            [CheckpointAction::Save(CheckpointKind::Best), CheckpointAction::Save(CheckpointKind::Epoch(7)), CheckpointAction::KeepLast(2)]
        );
    }
}
