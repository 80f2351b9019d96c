//! `evaluate`: runs a model over a split and reports pixel accuracy, dataset-level mean IoU,
//! per-class IoU, Dice, fg/bg IoU, per-image mean IoU and the confusion matrix, then applies
//! the CI gate (minimum mIoU, maximum drop against a baseline). The batch loop is
//! [`crate::validation`]'s, shared with `train`'s per-epoch validation.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use candle_core::Device;
use serde::Serialize;

use crate::config::Config;
use crate::data::pipeline::Loader;
use crate::data::{PetDataset, Split, image_io, transform};
use crate::metrics::{ConfusionMatrix, PerImageIou, SegmentationReport};
use crate::model::inference::{InferenceModel, InferenceOptions};
use crate::model::upsample::upsample_argmax;
use crate::model_store::{self, ModelOrigin};
use crate::progress::{ProgressMode, Unit};
use crate::validation::{EvalModel, eval_loader_config, evaluate_loader};

/// What `evaluate` does.
#[derive(Debug, Clone)]
pub struct EvaluateOptions {
    pub checkpoint: PathBuf,
    pub split: Split,
    /// A previous `evaluate --json` report, or any model path (evaluated on the same split).
    pub baseline: Option<PathBuf>,
    pub min_miou: Option<f64>,
    pub max_drop: Option<f64>,
    pub device: Device,
    pub progress: ProgressMode,
    /// Also score masks up-sampled to each photo's own size, as `predict` writes them.
    pub at_original_size: bool,
}

/// The baseline's score and how far the candidate is from it.
#[derive(Debug, Clone, Serialize)]
pub struct BaselineComparison {
    pub source: PathBuf,
    pub mean_iou: f64,
    /// Baseline mIoU − candidate mIoU (positive = worse than the baseline).
    pub drop: f64,
}

/// The CI decision.
#[derive(Debug, Clone, Serialize)]
pub struct Gate {
    pub accepted: bool,
    pub min_miou: Option<f64>,
    pub max_drop: Option<f64>,
    /// Why the model was rejected (empty when accepted).
    pub reasons: Vec<String>,
}

/// The evaluation report (`--json` prints it; its top level carries the metrics).
#[derive(Debug, Clone, Serialize)]
pub struct EvaluateReport {
    #[serde(flatten)]
    pub metrics: SegmentationReport,
    /// How `mean_iou` is computed.
    pub mean_iou_definition: &'static str,
    pub split: Split,
    /// How the photos were decoded for the model: `dct-scaled` (JPEGs at the reduced DCT
    /// scale `serve` and `predict` use; `serve.jpeg_dct_scaling: true`) or `full-size`.
    pub decode: &'static str,
    pub model: ModelOrigin,
    pub model_description: String,
    /// What ran the model: `plan (<kernels>)` on CPU, `candle` elsewhere.
    pub engine: String,
    pub device: String,
    /// Samples skipped as unreadable.
    pub skipped_samples: usize,
    /// `--at-original-size`: the same metrics on masks up-sampled to each photo's own size (as
    /// `predict` writes them) against the full-size trimaps. The top-level figures and the gate
    /// stay at the model's input resolution.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub at_original_size: Option<SegmentationReport>,
    pub baseline: Option<BaselineComparison>,
    pub gate: Gate,
    pub elapsed_s: f64,
    pub images_per_s: f64,
}

/// Executes `segctl evaluate`.
pub fn evaluate(config: &Config, options: &EvaluateOptions) -> Result<EvaluateReport> {
    let start = Instant::now();
    let loaded = model_store::load_any(&options.checkpoint, &options.device)?;
    let (precision, calibration) = (Some(loaded.precision()), loaded.calibration());
    let origin = loaded.origin;
    let model = InferenceModel::new(loaded.state, InferenceOptions { precision, calibration, ..Default::default() })?;
    let scoring = Instant::now();
    let (metrics, skipped) = score(config, &model, options.split, options.progress)?;
    let images_per_s = metrics.samples as f64 / scoring.elapsed().as_secs_f64().max(1e-9);
    let at_original_size = if options.at_original_size { Some(score_at_original_size(config, &model, options.split, options.progress)?) } else { None };
    let baseline = match &options.baseline {
        None => None,
        Some(path) => {
            let mean_iou = baseline_miou(config, path, options)?;
            Some(BaselineComparison { source: path.clone(), mean_iou, drop: mean_iou - metrics.mean_iou })
        }
    };
    let mut reasons = Vec::new();
    if let Some(min) = options.min_miou {
        if metrics.mean_iou < min {
            reasons.push(format!("mean IoU {:.4} is below --min-miou {min}", metrics.mean_iou));
        }
    }
    if let (Some(max_drop), Some(b)) = (options.max_drop, &baseline) {
        if b.drop > max_drop {
            reasons.push(format!(
                "mean IoU {:.4} is {:.4} below the baseline's {:.4} (--max-drop {max_drop})",
                metrics.mean_iou, b.drop, b.mean_iou
            ));
        }
    }
    if options.max_drop.is_some() && baseline.is_none() {
        bail!("--max-drop needs --baseline");
    }
    let elapsed = start.elapsed().as_secs_f64();
    Ok(EvaluateReport {
        images_per_s,
        mean_iou_definition: "mean over classes of IoU from the confusion matrix summed over the whole split, at the model's input resolution",
        split: options.split,
        decode: crate::data::pipeline::decode_name(config.serve.jpeg_dct_scaling),
        model_description: model.spec().describe(),
        engine: model.engine(),
        device: crate::model::device_name(&options.device),
        model: origin,
        skipped_samples: skipped,
        at_original_size,
        gate: Gate { accepted: reasons.is_empty(), min_miou: options.min_miou, max_drop: options.max_drop, reasons },
        baseline,
        metrics,
        elapsed_s: elapsed,
    })
}

/// Scores one model on one split. Returns the metrics and the number of skipped samples.
pub fn score(config: &Config, model: &dyn EvalModel, split: Split, progress: ProgressMode) -> Result<(SegmentationReport, usize)> {
    let dataset = Arc::new(PetDataset::open(&config.data.root, split, config.data.val_fraction, config.data.seed)?);
    let loader = Loader::new(dataset.clone(), eval_loader_config(config, model.spec(), config.evaluate.batch_size))?;
    let outcome = evaluate_loader(model, &loader, None, progress, &format!("evaluate {}", split.name()))?;
    if outcome.samples == 0 {
        bail!("no readable samples in split `{}` of `{}`", split.name(), config.data.root.display());
    }
    Ok((SegmentationReport::new(&outcome.confusion, &outcome.per_image, &model.spec().class_names, outcome.samples), dataset.skipped()))
}

/// Scores `model` on `split` with each mask at its photo's own size: the photo decoded as
/// `predict` decodes it (at a reduced JPEG DCT scale when `serve.jpeg_dct_scaling` is on),
/// resized to the model input, the logits bilinearly up-sampled to the photo's size and
/// arg-maxed, and compared with the full-size trimap.
pub fn score_at_original_size(config: &Config, model: &InferenceModel, split: Split, progress: ProgressMode) -> Result<SegmentationReport> {
    use rayon::prelude::*;
    let dataset = PetDataset::open(&config.data.root, split, config.data.val_fraction, config.data.seed)?;
    let spec = model.spec();
    let (classes, size) = (spec.num_classes(), spec.input_size);
    let mut confusion = ConfusionMatrix::new(classes);
    let mut per_image = PerImageIou::default();
    let mut samples = 0;
    let bar = progress.bar(&format!("evaluate {} at original size", split.name()), Some(dataset.len() as u64), Unit::Items("images"));
    let indices: Vec<usize> = (0..dataset.len()).collect();
    for chunk in indices.chunks(config.evaluate.batch_size) {
        let items: Vec<(Vec<f32>, image::GrayImage)> = chunk
            .par_iter()
            .filter_map(|&i| {
                let sample = dataset.get(i)?;
                let photo = if config.serve.jpeg_dct_scaling {
                    let bytes = crate::util::fs::read(&dataset.layout.image_path(&sample.stem)).ok()?;
                    let decoded = image_io::decode_rgb_for_model(&bytes, image_io::DecodeOptions::default(), size as u32).ok()?;
                    decoded.image
                } else {
                    sample.image
                };
                Some((transform::preprocess(&photo, size as u32, &spec.normalization), sample.mask))
            })
            .collect();
        if items.is_empty() {
            continue;
        }
        let flat: Vec<f32> = items.iter().flat_map(|(input, _)| input.iter().copied()).collect();
        let logits = model.logits(&flat, items.len())?;
        let planes = classes * size * size;
        let predicted: Vec<image::GrayImage> = items
            .par_iter()
            .enumerate()
            .map(|(k, (_, mask))| upsample_argmax(&logits[k * planes..][..planes], classes, size, mask.width(), mask.height()))
            .collect();
        for ((_, truth), pred) in items.iter().zip(&predicted) {
            confusion.update(truth.as_raw(), pred.as_raw());
            per_image.update(classes, truth.as_raw(), pred.as_raw());
        }
        samples += items.len();
        bar.inc(chunk.len() as u64);
    }
    bar.finish();
    if samples == 0 {
        bail!("no readable samples in split `{}` of `{}`", split.name(), config.data.root.display());
    }
    Ok(SegmentationReport::new(&confusion, &per_image, &spec.class_names, samples))
}

fn baseline_miou(config: &Config, path: &Path, options: &EvaluateOptions) -> Result<f64> {
    if path.extension().is_some_and(|e| e == "json") {
        let text = crate::util::fs::read_to_string(path)?;
        let value: serde_json::Value =
            serde_json::from_str(&text).with_context(|| format!("baseline `{}` is not JSON", path.display()))?;
        if let Some(split) = value.get("split").and_then(|s| s.as_str()) {
            if split != options.split.name() {
                bail!("baseline `{}` was measured on split `{split}`, not `{}`", path.display(), options.split.name());
            }
        }
        return value
            .get("mean_iou")
            .and_then(|v| v.as_f64())
            .with_context(|| format!("baseline `{}` has no `mean_iou`", path.display()));
    }
    let loaded = model_store::load_any(path, &options.device).with_context(|| format!("baseline `{}`", path.display()))?;
    let precision = Some(loaded.precision());
    let calibration = loaded.calibration();
    let model = InferenceModel::new(loaded.state, InferenceOptions { precision, calibration, ..Default::default() })?;
    Ok(score(config, &model, options.split, options.progress)?.0.mean_iou)
}
