//! The one evaluation loop: a model (candle's training graph or the compiled inference plan)
//! over every batch of a loader, into a confusion matrix, per-image IoU and, when asked, the
//! loss. `train`'s per-epoch validation and `evaluate` both run it, so a validation mIoU and an
//! evaluate mIoU are the same computation.

use anyhow::{Result, bail};
use candle_core::{DType, Device, Tensor};

use crate::config::Config;
use crate::data::pipeline::{Batch, Loader, LoaderConfig};
use crate::loss::SegLoss;
use crate::metrics::{ConfusionMatrix, PerImageIou};
use crate::model::inference::{InferenceModel, argmax_classes};
use crate::model::{ModelSpec, ModelState};
use crate::progress::{ProgressMode, Unit};

/// Model inputs and targets of a batch, on `device`.
pub fn batch_tensors(batch: &Batch, device: &Device) -> candle_core::Result<(Tensor, Tensor)> {
    let (n, s) = (batch.len(), batch.size);
    let images = Tensor::from_slice(&batch.images, (n, 3, s, s), &Device::Cpu)?.to_device(device)?;
    let targets = Tensor::from_slice(&batch.masks, (n, s, s), &Device::Cpu)?.to_dtype(DType::U32)?.to_device(device)?;
    Ok((images, targets))
}

/// Class ids `[N·H·W]` from logits `[N, C, H, W]`.
pub fn predictions(logits: &Tensor) -> candle_core::Result<Vec<u8>> {
    logits.argmax(1)?.to_dtype(DType::U8)?.flatten_all()?.to_vec1::<u8>()
}

/// Result of one pass over a loader.
pub struct EvalOutcome {
    pub confusion: ConfusionMatrix,
    pub per_image: PerImageIou,
    pub samples: usize,
    /// Mean loss per batch, when a loss was given.
    pub loss: Option<f64>,
}

/// A model the evaluation loop can run: class ids for a batch and, when asked, its loss.
pub trait EvalModel {
    fn spec(&self) -> &ModelSpec;
    /// Class ids `[N·S·S]` of `batch`, and the batch's loss when `loss` is given.
    fn predict(&self, batch: &Batch, loss: Option<&SegLoss>) -> Result<(Vec<u8>, Option<f64>)>;
}

/// candle's eval forward (training's validation).
impl EvalModel for ModelState {
    fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    fn predict(&self, batch: &Batch, loss: Option<&SegLoss>) -> Result<(Vec<u8>, Option<f64>)> {
        let (images, targets) = batch_tensors(batch, &self.device)?;
        let logits = self.forward(&images, false)?;
        let loss = match loss {
            Some(l) => Some(l.compute(&logits, &targets)?.to_scalar::<f32>()? as f64),
            None => None,
        };
        Ok((predictions(&logits)?, loss))
    }
}

/// The compiled inference plan (a saved model).
impl EvalModel for InferenceModel {
    fn spec(&self) -> &ModelSpec {
        InferenceModel::spec(self)
    }

    fn predict(&self, batch: &Batch, loss: Option<&SegLoss>) -> Result<(Vec<u8>, Option<f64>)> {
        if loss.is_some() {
            bail!("the inference engine computes no loss");
        }
        let logits = self.logits(&batch.images, batch.len())?;
        Ok((argmax_classes(&logits, self.spec().num_classes(), batch.size * batch.size), None))
    }
}

/// Runs `model` in inference mode over every batch of `loader`.
pub fn evaluate_loader(model: &dyn EvalModel, loader: &Loader, loss: Option<&SegLoss>, progress: ProgressMode, label: &str) -> Result<EvalOutcome> {
    let classes = model.spec().num_classes();
    let mut confusion = ConfusionMatrix::new(classes);
    let mut per_image = PerImageIou::default();
    let mut samples = 0;
    let (mut loss_sum, mut batches) = (0.0, 0usize);
    let bar = progress.bar(label, Some(loader.dataset().len() as u64), Unit::Items("images"));
    for batch in loader.epoch(0, 0) {
        if batch.is_empty() {
            continue;
        }
        let (predicted, batch_loss) = model.predict(&batch, loss)?;
        if let Some(l) = batch_loss {
            loss_sum += l;
            batches += 1;
        }
        confusion.update(&batch.masks, &predicted);
        let plane = batch.size * batch.size;
        for (t, p) in batch.masks.chunks(plane).zip(predicted.chunks(plane)) {
            per_image.update(classes, t, p);
        }
        samples += batch.len();
        bar.inc(batch.len() as u64);
    }
    bar.finish();
    Ok(EvalOutcome { confusion, per_image, samples, loss: (batches > 0).then(|| loss_sum / batches as f64) })
}

/// The loader configuration for inference over a split (no shuffle, no flips, every sample).
pub fn eval_loader_config(config: &Config, spec: &ModelSpec, batch_size: usize) -> LoaderConfig {
    LoaderConfig {
        batch_size,
        image_size: spec.input_size as u32,
        normalization: spec.normalization,
        shuffle: false,
        hflip: false,
        augment: None,
        seed: config.data.seed,
        drop_last: false,
        prefetch: config.data.prefetch_batches,
        cache_dir: config.data.cache_dir.clone(),
        workers: config.data.workers,
        memory_cache_bytes: config.data.memory_cache_mb << 20,
        jpeg_dct_scaling: config.serve.jpeg_dct_scaling,
    }
}

