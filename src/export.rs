//! `export`: turns a training checkpoint into a servable, versioned model folder in the model
//! repository (`<repository>/<name>/<version>/model.safetensors` + `model.yaml`), optionally
//! folding inference BatchNorm into the convolutions when the outputs stay within tolerance.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use candle_core::{Device, Tensor};
use serde::Serialize;

use crate::config::is_valid_model_name;
use crate::model::{self, ModelState};
use crate::model_store::{self, ModelManifest};
use crate::util::rng::Rng;

/// Largest logit difference accepted between the folded and the original model, relative to
/// the logits' magnitude (at least 1): f32 rounding differs between the two forms.
pub const FOLD_TOLERANCE: f32 = 1e-4;

/// What `export` does.
#[derive(Debug, Clone)]
pub struct ExportOptions {
    pub checkpoint: PathBuf,
    pub name: String,
    /// None = one more than the newest existing version.
    pub version: Option<u64>,
    pub repository: PathBuf,
    pub fold_batchnorm: bool,
    /// An `evaluate --json` report to record as the model's metrics.
    pub metrics: Option<PathBuf>,
}

/// What was written.
#[derive(Debug, Clone, Serialize)]
pub struct ExportReport {
    pub name: String,
    pub version: u64,
    pub path: PathBuf,
    pub batchnorm_folded: bool,
    /// Largest logit difference of the folded model on a probe batch.
    pub fold_max_abs_diff: Option<f32>,
    pub parameters: usize,
    pub weights_sha256: String,
    pub source_checkpoint: PathBuf,
}

/// Executes `segctl export`.
pub fn export(options: &ExportOptions) -> Result<ExportReport> {
    if !is_valid_model_name(&options.name) {
        bail!("`{}` is not a model name: use letters, digits, `-`, `_` and `.`", options.name);
    }
    let device = Device::Cpu;
    let loaded = model_store::load_checkpoint(&options.checkpoint, &device)?;
    let meta = loaded.checkpoint_meta.clone().context("not a training checkpoint")?;
    let state = loaded.state;
    let model_dir = options.repository.join(&options.name);
    let existing = model_store::list_versions(&model_dir);
    let version = match options.version {
        Some(0) => bail!("--version must be at least 1"),
        Some(v) if existing.contains(&v) => bail!(
            "version {v} of `{}` already exists in `{}`; versions are never overwritten (omit --version for {})",
            options.name,
            options.repository.display(),
            existing.last().map_or(1, |l| l + 1)
        ),
        Some(v) => v,
        None => existing.last().map_or(1, |l| l + 1),
    };

    let mut spec = state.spec.clone();
    let mut tensors = state.named_tensors();
    let mut fold_diff = None;
    if options.fold_batchnorm {
        let folded = model::fold_batchnorm(&tensors, &state.model.conv_bn_pairs())?;
        let mut folded_spec = spec.clone();
        folded_spec.batchnorm_folded = true;
        let folded_state = ModelState::from_tensors(&folded_spec, &folded, &device)?;
        let (diff, scale) = probe_difference(&state, &folded_state)?;
        fold_diff = Some(diff);
        if diff <= FOLD_TOLERANCE * scale.max(1.0) {
            spec = folded_spec;
            tensors = folded;
        } else {
            log::warn!("BatchNorm folding changes logits by {diff:.2e} (> {FOLD_TOLERANCE:.0e} of their scale {scale:.1}); exporting unfolded");
        }
    }
    let metrics = match &options.metrics {
        Some(path) => {
            let text = crate::util::fs::read_to_string(path)?;
            Some(serde_json::from_str(&text).with_context(|| format!("`{}` is not JSON", path.display()))?)
        }
        None => meta.val_mean_iou.map(|m| serde_json::json!({ "source": "validation", "mean_iou": m })),
    };
    let manifest = ModelManifest {
        name: options.name.clone(),
        version,
        model: spec.clone(),
        metrics,
        config_digest: meta.config_digest.clone(),
        dataset_digest: meta.dataset_digest.clone(),
        weights_sha256: String::new(),
        source_checkpoint: loaded.origin.path.display().to_string(),
        created: crate::util::utc_timestamp(),
        segctl_version: env!("CARGO_PKG_VERSION").into(),
    };
    let version_dir = model_dir.join(version.to_string());
    model_store::write_exported(&version_dir, &manifest, &tensors)?;
    let written = model_store::read_manifest(&version_dir)?;
    Ok(ExportReport {
        name: options.name.clone(),
        version,
        path: version_dir,
        batchnorm_folded: spec.batchnorm_folded,
        fold_max_abs_diff: fold_diff,
        parameters: tensors.iter().filter(|(n, _)| !n.contains("running_")).map(|(_, t)| t.elem_count()).sum(),
        weights_sha256: written.weights_sha256,
        source_checkpoint: loaded.origin.path,
    })
}

/// Largest absolute logit difference between two models on a fixed random batch, and the
/// largest absolute logit of the first.
fn probe_difference(a: &ModelState, b: &ModelState) -> Result<(f32, f32)> {
    let size = a.spec.input_size;
    let mut rng = Rng::new(0x5eed);
    let values: Vec<f32> = (0..2 * 3 * size * size).map(|_| rng.normal()).collect();
    let x = Tensor::from_vec(values, (2, 3, size, size), &a.device)?;
    let reference = a.forward(&x, false)?;
    let diff = (&reference - b.forward(&x, false)?)?.abs()?.flatten_all()?.max(0)?;
    let scale = reference.abs()?.flatten_all()?.max(0)?;
    Ok((diff.to_scalar::<f32>()?, scale.to_scalar::<f32>()?))
}
