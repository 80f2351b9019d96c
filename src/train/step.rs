//! The training step: forward, loss, backward, and — once per group of
//! `train.accumulate_steps` batches — gradient clipping, the optimizer step and the weight
//! average's update. Nothing here knows about epochs, files or progress output.

use std::collections::HashMap;

use anyhow::{Result, bail};
use candle_core::backprop::GradStore;
use candle_core::{Device, Tensor, Var};

use crate::data::pipeline::Batch;
use crate::loss::SegLoss;
use crate::model::ModelState;
use crate::optim::{AdamW, WeightAverage};
use crate::validation::{batch_tensors, predictions};

/// What one batch's forward/backward measured.
#[derive(Debug, Clone, Copy)]
pub(crate) struct BatchOutcome {
    /// The batch's loss, before any division for accumulation.
    pub loss: f64,
    pub correct_pixels: u64,
    pub pixels: u64,
}

/// What an optimizer step did.
#[derive(Debug, Clone, Copy)]
pub(crate) struct StepOutcome {
    /// Global L2 norm of the (accumulated) gradients before clipping.
    pub grad_norm: Option<f64>,
    pub clipped: bool,
}

/// The trained model, its optimizer and, when enabled, the weight average — and gradients
/// waiting for the end of their accumulation group.
pub(crate) struct Learner {
    pub state: ModelState,
    pub optimizer: AdamW,
    /// The moving average (validated, checkpointed as `model.*`, exported) and its updater.
    pub average: Option<(ModelState, WeightAverage)>,
    loss: SegLoss,
    vars: Vec<(String, Var)>,
    clip_grad_norm: Option<f64>,
    pending: Option<GradStore>,
    device: Device,
}

impl Learner {
    pub fn new(state: ModelState, optimizer: AdamW, average: Option<(ModelState, WeightAverage)>, loss: SegLoss, clip_grad_norm: Option<f64>) -> Self {
        let vars = state.trainable_vars();
        let device = state.device.clone();
        Self { state, optimizer, average, loss, vars, clip_grad_norm, pending: None, device }
    }

    /// The weights validation, checkpoints (`model.*`) and export use: the average when there
    /// is one, else the trained weights.
    pub fn evaluated(&self) -> &ModelState {
        self.average.as_ref().map_or(&self.state, |(a, _)| a)
    }

    pub fn loss_fn(&self) -> &SegLoss {
        &self.loss
    }

    /// Forward and backward of one batch whose group holds `group_len` batches: its gradients
    /// (of the loss divided by `group_len`) are added to those already waiting. An empty batch
    /// (every sample unreadable) contributes nothing and returns `None`.
    pub fn accumulate(&mut self, batch: &Batch, group_len: usize, step: u64) -> Result<Option<BatchOutcome>> {
        if batch.is_empty() {
            return Ok(None);
        }
        let (images, targets) = batch_tensors(batch, &self.device)?;
        let logits = self.state.forward(&images, true)?;
        let loss = self.loss.compute(&logits, &targets)?;
        let loss_value = loss.to_scalar::<f32>()? as f64;
        if !loss_value.is_finite() {
            bail!("training diverged: the loss is {loss_value} at step {step}; lower train.optimizer.lr");
        }
        let scaled = if group_len > 1 { loss.affine(1.0 / group_len as f64, 0.0)? } else { loss };
        let grads = scaled.backward()?;
        match self.pending.as_mut() {
            None => self.pending = Some(grads),
            Some(sum) => add_grads(sum, &grads, &self.vars)?,
        }
        let predicted = predictions(&logits)?;
        let correct = predicted.iter().zip(&batch.masks).filter(|(p, m)| p == m).count() as u64;
        Ok(Some(BatchOutcome { loss: loss_value, correct_pixels: correct, pixels: predicted.len() as u64 }))
    }

    /// Applies the waiting gradients: clipping, the optimizer step at `lr`, then the weight
    /// average's update for optimizer step `step` (1-based). `None` when nothing was waiting
    /// (a group of unreadable batches).
    pub fn step(&mut self, lr: f64, step: u64) -> Result<Option<StepOutcome>> {
        let Some(mut grads) = self.pending.take() else { return Ok(None) };
        let mut outcome = StepOutcome { grad_norm: None, clipped: false };
        if let Some(max) = self.clip_grad_norm {
            let norm = global_norm(&grads, &self.vars)?;
            outcome.grad_norm = Some(norm);
            if norm > max {
                scale_grads(&mut grads, &self.vars, max / (norm + 1e-6))?;
                outcome.clipped = true;
            }
        }
        self.optimizer.step(&grads, lr)?;
        if let Some((_, averager)) = &self.average {
            averager.update(step)?;
        }
        Ok(Some(outcome))
    }

    /// The tensors a checkpoint stores: `model.*` (the evaluated weights), the optimizer's
    /// state, and `online.*` (the trained weights, only when `model.*` is their average).
    pub fn checkpoint_tensors(&self) -> (HashMap<String, Tensor>, HashMap<String, Tensor>, HashMap<String, Tensor>) {
        let online = if self.average.is_some() { self.state.named_tensors() } else { HashMap::new() };
        (self.evaluated().named_tensors(), self.optimizer.state_tensors(), online)
    }
}

/// `sum += other` for each variable's gradient.
fn add_grads(sum: &mut GradStore, other: &GradStore, vars: &[(String, Var)]) -> Result<()> {
    for (_, var) in vars {
        if let Some(g) = other.get(var.as_tensor()) {
            let next = match sum.get(var.as_tensor()) {
                Some(s) => (s + g)?,
                None => g.clone(),
            };
            sum.insert(var.as_tensor(), next);
        }
    }
    Ok(())
}

/// The L2 norm of all variables' gradients taken together.
pub(crate) fn global_norm(grads: &GradStore, vars: &[(String, Var)]) -> Result<f64> {
    let mut sum = 0f64;
    for (_, var) in vars {
        if let Some(g) = grads.get(var.as_tensor()) {
            sum += g.sqr()?.sum_all()?.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
        }
    }
    Ok(sum.sqrt())
}

fn scale_grads(grads: &mut GradStore, vars: &[(String, Var)], factor: f64) -> Result<()> {
    for (_, var) in vars {
        if let Some(g) = grads.get(var.as_tensor()) {
            let scaled = g.affine(factor, 0.0)?;
            grads.insert(var.as_tensor(), scaled);
        }
    }
    Ok(())
}

/// Sizes of the accumulation groups of an epoch of `batches` batches: `accumulate` each, the
/// last one shorter when `accumulate` does not divide `batches`.
pub(crate) fn group_len(batch_index: usize, batches: usize, accumulate: usize) -> usize {
    let start = batch_index - batch_index % accumulate;
    accumulate.min(batches - start)
}

/// Whether batch `batch_index` closes its group (an optimizer step follows it).
pub(crate) fn closes_group(batch_index: usize, batches: usize, accumulate: usize) -> bool {
    (batch_index + 1).is_multiple_of(accumulate) || batch_index + 1 == batches
}

/// Optimizer steps of an epoch of `batches` batches.
pub(crate) fn steps_for(batches: usize, accumulate: usize) -> usize {
    batches.div_ceil(accumulate)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, LossConfig, LossKind, OptimizerConfig};
    use crate::model::ModelSpec;
    use crate::util::rng::Rng;

    fn tiny_state(seed: u64) -> ModelState {
        let mut config = Config::default();
        config.data.image_size = 32;
        config.model.unet.depth = 2;
        config.model.unet.base_width = 4;
        ModelState::new(&ModelSpec::from_config(&config), &Device::Cpu, seed).unwrap()
    }

    fn batch(n: usize, size: usize, seed: u64) -> Batch {
        let mut rng = Rng::new(seed);
        let images: Vec<f32> = (0..n * 3 * size * size).map(|_| rng.normal()).collect();
        let masks: Vec<u8> = (0..n * size * size)
            .map(|i| {
                let v = images[(i / (size * size)) * 3 * size * size + i % (size * size)];
                if v > 0.5 { 0 } else if v < -0.5 { 1 } else { 2 }
            })
            .collect();
        Batch { images, masks, stems: (0..n).map(|i| format!("s{i}")).collect(), size, index: 0 }
    }

    fn learner(seed: u64, clip: Option<f64>) -> Learner {
        let state = tiny_state(seed);
        let optimizer = AdamW::new(state.trainable_vars(), OptimizerConfig::default()).unwrap();
        let loss = SegLoss::new(&LossConfig { kind: LossKind::Ce, class_weights: None, dice_weight: 1.0 }, &Device::Cpu).unwrap();
        Learner::new(state, optimizer, None, loss, clip)
    }

    fn grads_of(l: &Learner) -> Vec<Vec<f32>> {
        let g = l.pending.as_ref().unwrap();
        l.vars.iter().map(|(_, v)| g.get(v.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap()).collect()
    }

    #[test]
    fn accumulated_gradients_are_the_mean_of_the_group() {
        // Two batches in a group of two give (g1 + g2) / 2, where g1, g2 are each batch's own
        // gradients with the same weights.
        let (a, b) = (batch(2, 32, 1), batch(2, 32, 2));
        let mut one = learner(5, None);
        one.accumulate(&a, 1, 0).unwrap();
        let ga = grads_of(&one);
        let mut two = learner(5, None);
        two.accumulate(&b, 1, 0).unwrap();
        let gb = grads_of(&two);
        let mut both = learner(5, None);
        both.accumulate(&a, 2, 0).unwrap();
        both.accumulate(&b, 2, 0).unwrap();
        let gab = grads_of(&both);
        let mut worst = 0f32;
        for ((x, y), z) in ga.iter().zip(&gb).zip(&gab) {
            for ((x, y), z) in x.iter().zip(y).zip(z) {
                worst = worst.max((0.5 * (x + y) - z).abs() / (1e-6 + z.abs().max(0.5 * (x + y).abs())));
            }
        }
        // BatchNorm statistics update between the two forwards but do not enter training-mode
        // gradients, so the sum matches to rounding.
        assert!(worst < 1e-3, "relative error {worst}");
        // And a group applies one optimizer step.
        assert!(both.step(1e-3, 1).unwrap().is_some());
        assert_eq!(both.optimizer.steps(), 1);
        assert!(both.step(1e-3, 2).unwrap().is_none(), "nothing waits after a step");
    }

    #[test]
    fn clipping_bounds_the_global_norm() {
        let mut l = learner(6, Some(1e-3));
        l.accumulate(&batch(2, 32, 3), 1, 0).unwrap();
        let before = global_norm(l.pending.as_ref().unwrap(), &l.vars).unwrap();
        assert!(before > 1e-3, "the test needs a gradient larger than the bound: {before}");
        let mut grads = l.pending.take().unwrap();
        scale_grads(&mut grads, &l.vars, 1e-3 / (before + 1e-6)).unwrap();
        let after = global_norm(&grads, &l.vars).unwrap();
        assert!((after - 1e-3).abs() < 1e-5, "clipped norm {after}");
        // Through the step: the norm reported is the one before clipping.
        l.accumulate(&batch(2, 32, 3), 1, 0).unwrap();
        let out = l.step(1e-3, 1).unwrap().unwrap();
        assert!(out.clipped && (out.grad_norm.unwrap() - before).abs() < 1e-6 * before.max(1.0), "{out:?} vs {before}");
    }

    #[test]
    fn an_empty_batch_trains_nothing() {
        let mut l = learner(7, None);
        let empty = Batch { images: Vec::new(), masks: Vec::new(), stems: Vec::new(), size: 32, index: 0 };
        assert!(l.accumulate(&empty, 1, 0).unwrap().is_none());
        assert!(l.pending.is_none());
        assert!(l.step(1e-3, 1).unwrap().is_none());
        assert_eq!(l.optimizer.steps(), 0);
    }

    #[test]
    fn groups_cover_the_epoch() {
        // 7 batches in groups of 3: [0,1,2] [3,4,5] [6].
        let closes: Vec<usize> = (0..7).filter(|&b| closes_group(b, 7, 3)).collect();
        assert_eq!(closes, [2, 5, 6]);
        assert_eq!((0..7).map(|b| group_len(b, 7, 3)).collect::<Vec<_>>(), [3, 3, 3, 3, 3, 3, 1]);
        assert_eq!(steps_for(7, 3), 3);
        assert_eq!(steps_for(6, 1), 6);
    }
}
