//! `export`: turns a training checkpoint into a servable, versioned model folder in the model
//! repository (`<repository>/<name>/<version>/model.safetensors` + `model.yaml`), optionally
//! folding inference BatchNorm into the convolutions when the outputs stay within tolerance.
//!
//! Publishing is crash-safe and race-free: a writer claims its version by creating
//! `<name>/.staging-<version>/` (exclusive creation) and locking the `.lock` file inside it,
//! writes and fsyncs the files there, fsyncs the folder, renames it to `<version>/` and fsyncs
//! the model folder. Concurrent exports never share a version or a staging folder; a killed
//! export leaves only an unlocked staging folder, which the next export removes or reuses.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use candle_core::{Device, Tensor};
use serde::Serialize;

use crate::config::{Config, is_valid_model_name};
use crate::engine::{Plan, PlanOptions, Precision, Session};
use crate::model::{self, ModelState};
use crate::model_store::{self, MANIFEST_FILE, ModelManifest, PrecisionCheck, WEIGHTS_FILE};
use crate::util::fs::FileLock;
use crate::util::rng::Rng;

/// Largest logit difference accepted between the folded and the original model, relative to
/// the logits' magnitude (at least 1): f32 rounding differs between the two forms.
pub const FOLD_TOLERANCE: f32 = 1e-4;

/// Largest logit difference accepted between `model.onnx` as the engine runs it and the candle
/// model, relative to the logits' magnitude (at least 1): Winograd convolutions round
/// differently from candle's direct ones.
pub const ONNX_TOLERANCE: f32 = 1e-3;

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
    /// Also write `model.onnx`.
    pub onnx: bool,
    /// The version's precision; anything but f32 passes the gate ([`precision_gate`]) first.
    pub precision: Precision,
    /// `export.max_miou_drop`.
    pub max_miou_drop: f64,
    /// The configuration whose `data` section names the validation split the gate scores.
    pub config: Option<Config>,
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
    pub precision: Precision,
    /// The gate's figures of a reduced-precision version.
    pub precision_check: Option<PrecisionCheck>,
    /// `model.onnx`, when written: its path, SHA-256, and the largest logit difference between
    /// the file (read back and run by the engine) and the candle model on a probe batch.
    pub onnx: Option<OnnxReport>,
}

/// The ONNX file of an export.
#[derive(Debug, Clone, Serialize)]
pub struct OnnxReport {
    pub path: PathBuf,
    pub sha256: String,
    pub bytes: usize,
    pub opset: i64,
    pub max_abs_diff: f32,
}

/// Executes `segctl export`.
pub fn export(options: &ExportOptions) -> Result<ExportReport> {
    if !is_valid_model_name(&options.name) {
        bail!("`{}` is not a model name: use letters, digits, `-`, `_` and `.`", options.name);
    }
    if let Some(remote) = crate::storage::remote(&options.repository)? {
        return export_to_bucket(options, &remote);
    }
    let device = Device::Cpu;
    let loaded = model_store::load_checkpoint(&options.checkpoint, &device)?;
    let meta = loaded.checkpoint_meta.clone().context("not a training checkpoint")?;
    let state = loaded.state;
    let model_dir = options.repository.join(&options.name);
    if let Some(v) = options.version {
        if v == 0 {
            bail!("--version must be at least 1");
        }
        check_free(&model_dir, &options.name, v)?;
    }

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
    // The gate runs before a version is claimed: a refused precision publishes nothing.
    let (precision_check, calibration) = match options.precision {
        Precision::F32 => (None, None),
        precision => {
            let config = options.config.as_ref().context("a reduced-precision export needs the configuration of its validation data")?;
            let state = ModelState::from_tensors(&spec, &tensors, &device)?;
            let calibration = match precision {
                Precision::Int8 => Some(calibrate_on_training_images(config, &state)?),
                _ => None,
            };
            let check = precision_gate(config, state, precision, options.max_miou_drop, calibration.as_ref())?;
            (Some(check), calibration.map(|c| c.ranges))
        }
    };
    let claim = claim_version(&model_dir, &options.name, options.version)?;
    let version = claim.version;
    let onnx = if options.onnx {
        let state = ModelState::from_tensors(&spec, &tensors, &device)?;
        Some(onnx_file(&state, &options.name, version, calibration.as_ref())?)
    } else {
        None
    };
    let manifest = ModelManifest {
        name: options.name.clone(),
        version,
        model: spec.clone(),
        metrics,
        config_digest: meta.config_digest.clone(),
        dataset_digest: meta.dataset_digest.clone(),
        weights_sha256: String::new(),
        onnx_sha256: None,
        precision: options.precision,
        precision_check: precision_check.clone(),
        calibration,
        source_checkpoint: loaded.origin.path.display().to_string(),
        created: crate::util::utc_timestamp(),
        segctl_version: env!("CARGO_PKG_VERSION").into(),
    };
    let (weights_sha256, onnx_sha256) = claim.stage(&manifest, &tensors, onnx.as_ref().map(|(bytes, _)| bytes.as_slice()))?;
    let version_dir = claim.publish()?;
    let onnx = match (onnx, onnx_sha256) {
        (Some((bytes, max_abs_diff)), Some(sha256)) => {
            Some(OnnxReport { path: version_dir.join(model_store::ONNX_FILE), sha256, bytes: bytes.len(), opset: model::onnx::OPSET, max_abs_diff })
        }
        _ => None,
    };
    Ok(ExportReport {
        name: options.name.clone(),
        version,
        path: version_dir,
        batchnorm_folded: spec.batchnorm_folded,
        fold_max_abs_diff: fold_diff,
        parameters: tensors.iter().filter(|(n, _)| !n.contains("running_")).map(|(_, t)| t.elem_count()).sum(),
        weights_sha256,
        source_checkpoint: loaded.origin.path,
        precision: options.precision,
        precision_check,
        onnx,
    })
}

/// The export gate's refusal (the CLI exits 1, as for a model rejected by `evaluate`'s gate).
#[derive(Debug)]
pub struct PrecisionRefused(pub String);

impl std::fmt::Display for PrecisionRefused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for PrecisionRefused {}

/// The export gate of a reduced precision: the validation split scored through the f32 plan
/// and through the `precision` plan (the plan `serve` will run), each image's mask compared
/// pixel by pixel; refuses (an error naming both mIoUs) when the mIoU drops by more than
/// `max_drop`.
pub fn precision_gate(config: &Config, state: ModelState, precision: Precision, max_drop: f64, calibration: Option<&CalibrationSet>) -> Result<PrecisionCheck> {
    use crate::config::Split;
    use crate::model::inference::{InferenceModel, InferenceOptions};
    use crate::validation::EvalModel;
    let quiet = crate::progress::ProgressMode::Hidden;
    let options = |p| InferenceOptions { precision: Some(p), calibration: calibration.map(|c| std::sync::Arc::new(c.ranges.clone())), ..Default::default() };
    let graph_state = ModelState::from_tensors(&state.spec, &state.named_tensors(), &state.device)?;
    let reduced = InferenceModel::new(graph_state, options(precision)).with_context(|| format!("the {precision} plan"))?;
    let reference = InferenceModel::new(state, options(Precision::F32))?;

    /// Runs both plans on every batch; answers with the reduced plan's classes and counts the
    /// pixels whose class both give.
    struct Both<'a> {
        reduced: &'a InferenceModel,
        reference: &'a InferenceModel,
        same: std::sync::atomic::AtomicUsize,
        pixels: std::sync::atomic::AtomicUsize,
    }
    impl EvalModel for Both<'_> {
        fn spec(&self) -> &crate::model::ModelSpec {
            self.reduced.spec()
        }
        fn predict(&self, batch: &crate::data::pipeline::Batch, loss: Option<&crate::loss::SegLoss>) -> Result<(Vec<u8>, Option<f64>)> {
            let (ours, _) = self.reduced.predict(batch, loss)?;
            let (theirs, _) = self.reference.predict(batch, loss)?;
            let same = ours.iter().zip(&theirs).filter(|(a, b)| a == b).count();
            self.same.fetch_add(same, std::sync::atomic::Ordering::Relaxed);
            self.pixels.fetch_add(ours.len(), std::sync::atomic::Ordering::Relaxed);
            Ok((ours, None))
        }
    }
    let (f32_report, _) = crate::evaluate::score(config, &reference, Split::Val, quiet).context("the export gate scores the validation split")?;
    let both = Both { reduced: &reduced, reference: &reference, same: Default::default(), pixels: Default::default() };
    let (report, _) = crate::evaluate::score(config, &both, Split::Val, quiet)?;
    let (f32_miou, miou) = (f32_report.mean_iou, report.mean_iou);
    let drop = f32_miou - miou;
    let pixels = both.pixels.into_inner().max(1);
    let agreement = both.same.into_inner() as f64 / pixels as f64;
    log::info!("export gate: validation mIoU {f32_miou:.4} at f32, {miou:.4} at {precision} (drop {drop:.4}, {:.2} % of pixels agree)", agreement * 100.0);
    if drop > max_drop {
        return Err(PrecisionRefused(format!(
            "{precision} loses too much accuracy: validation mIoU {miou:.4} against {f32_miou:.4} at f32, a drop of {drop:.4} > export.max_miou_drop {max_drop}; nothing was published (export at f32, or raise export.max_miou_drop)"
        ))
        .into());
    }
    Ok(PrecisionCheck {
        f32_miou,
        miou,
        miou_drop: drop,
        max_miou_drop: max_drop,
        images: report.samples,
        mask_agreement: agreement,
        calibration_samples: calibration.map(|c| c.samples),
        calibration_digest: calibration.map(|c| c.digest.clone()),
    })
}

/// An int8 calibration and the images it was measured on.
pub struct CalibrationSet {
    pub ranges: crate::engine::Calibration,
    /// Images used, and the SHA-256 of their names, one per line, in order.
    pub samples: usize,
    pub digest: String,
}

/// `export.calibration_samples` images of the training split (never the validation split
/// the gate scores), drawn with `data.seed`, decoded and resized as for evaluation, through
/// the f32 plan: the range of every convolution input.
pub fn calibrate_on_training_images(config: &Config, state: &ModelState) -> Result<CalibrationSet> {
    let data = &config.data;
    let dataset = crate::data::PetDataset::open(&data.root, crate::config::Split::Train, data.val_fraction, data.seed).context("calibration reads the training split")?;
    let mut order: Vec<usize> = (0..dataset.len()).collect();
    // Fisher–Yates with a splitmix64 stream of `data.seed`.
    let mut x = data.seed ^ 0x5eed_ca1b;
    let mut next = || {
        x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    for i in (1..order.len()).rev() {
        order.swap(i, (next() % (i as u64 + 1)) as usize);
    }
    let size = state.spec.input_size as u32;
    let want = config.export.calibration_samples;
    let (mut images, mut names) = (Vec::new(), Vec::new());
    for &i in &order {
        if names.len() == want {
            break;
        }
        if let Some(sample) = dataset.get(i) {
            images.extend(crate::data::transform::preprocess(&sample.image, size, &state.spec.normalization));
            names.push(sample.stem);
        }
    }
    anyhow::ensure!(!names.is_empty(), "no readable training image to calibrate int8 with in `{}`", data.root.display());
    if names.len() < want {
        log::warn!("int8 calibration: {} training images readable, export.calibration_samples asks for {want}", names.len());
    }
    let ranges = crate::model::inference::calibrate(state, &images, names.len())?;
    let digest = crate::util::sha256_hex(names.join("\n").as_bytes());
    log::info!("int8 calibration: {} training images, {} convolution inputs", names.len(), ranges.ranges.len());
    Ok(CalibrationSet { ranges, samples: names.len(), digest })
}

/// `export --repository s3://…`: the version is claimed in the bucket by creating
/// `<name>/<v>/.segctl-claim` only if absent (so two exports never share a number), exported
/// locally, then uploaded with `model.yaml` last: readers (`serve`, `predict --model`) treat a
/// version as present only once its `model.yaml` is, so a version is visible only when
/// complete, and an upload cut short leaves nothing visible.
fn export_to_bucket(options: &ExportOptions, repository: &crate::storage::Remote) -> Result<ExportReport> {
    let model = repository.child(&options.name);
    let taken = |v: u64| -> Result<bool> { Ok(!model.child(&v.to_string()).list()?.is_empty()) };
    let version = match options.version {
        Some(0) => bail!("--version must be at least 1"),
        Some(v) => {
            if taken(v)? || !model.claim(&v.to_string())? {
                bail!("version {v} of `{}` already exists in `{}`; versions are never overwritten (omit --version for the next one)", options.name, repository.url());
            }
            v
        }
        None => {
            let newest = model.list_children()?.iter().filter_map(|n| n.parse::<u64>().ok()).max().unwrap_or(0);
            let mut claimed = None;
            for v in newest + 1..newest + 1 + MAX_CLAIM_ATTEMPTS {
                if !taken(v)? && model.claim(&v.to_string())? {
                    claimed = Some(v);
                    break;
                }
            }
            claimed.with_context(|| format!("no free version of `{}` in `{}` after {MAX_CLAIM_ATTEMPTS} tries", options.name, repository.url()))?
        }
    };
    let staging = tempfile::Builder::new()
        .prefix(crate::util::fs::TEMP_PREFIX)
        .tempdir_in({
            let dir = crate::storage::cache_root().join("staging");
            crate::util::fs::create_dir_all(&dir)?;
            dir
        })
        .context("failed to create a staging folder for the export")?;
    let local = ExportOptions { repository: staging.path().to_path_buf(), version: Some(version), ..options.clone() };
    let mut report = export(&local)?;
    let target = model.child(&version.to_string());
    let mut files: Vec<String> = std::fs::read_dir(&report.path)
        .with_context(|| format!("failed to list `{}`", report.path.display()))?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != model_store::MANIFEST_FILE)
        .collect();
    files.sort();
    files.push(model_store::MANIFEST_FILE.to_string());
    for file in &files {
        target.upload(file, &report.path.join(file)).with_context(|| format!("version {version} of `{}` was not published", options.name))?;
    }
    log::info!("published `{}` ({} files, {} last)", target.url(), files.len(), model_store::MANIFEST_FILE);
    report.path = PathBuf::from(target.url());
    if let Some(onnx) = report.onnx.as_mut() {
        onnx.path = PathBuf::from(target.child(model_store::ONNX_FILE).url());
    }
    Ok(report)
}

/// `model.onnx` of `state`, checked: the bytes are read back into a graph, compiled by the
/// engine and run on a probe batch against the candle model. Returns the bytes and the
/// largest logit difference.
fn onnx_file(state: &ModelState, name: &str, version: u64, calibration: Option<&crate::engine::Calibration>) -> Result<(Vec<u8>, f32)> {
    let spec = &state.spec;
    let graph = state.model.lower().context("failed to describe the model as a graph")?;
    let metadata = vec![
        ("model_name".to_string(), name.to_string()),
        ("model_version".to_string(), version.to_string()),
        ("class_names".to_string(), serde_json::to_string(&spec.class_names)?),
        ("normalization".to_string(), serde_json::to_string(&serde_json::json!({ "mean": spec.normalization.mean, "std": spec.normalization.std }))?),
        ("input_size".to_string(), spec.input_size.to_string()),
        ("segctl_model_spec".to_string(), serde_json::to_string(spec)?),
    ];
    let info = model::onnx::ModelInfo {
        input_size: spec.input_size,
        num_classes: spec.num_classes(),
        model_version: i64::try_from(version).unwrap_or(i64::MAX),
        doc: format!(
            "{}: input `image` float32 [N,3,{s},{s}], RGB scaled to [0,1] then (x - mean) / std per channel; output `logits` [N,{c},{s},{s}], argmax over classes {:?}",
            spec.describe(),
            spec.class_names,
            s = spec.input_size,
            c = spec.num_classes()
        ),
        metadata,
    };
    let bytes = model::onnx::write_quantized(&graph, &info, calibration)?;
    let back = model::onnx::read(&bytes).context("the ONNX file segctl wrote does not read back")?;
    let size = spec.input_size;
    let options = match calibration {
        Some(c) => PlanOptions::new(size, size).int8(std::sync::Arc::new(c.clone())),
        None => PlanOptions::new(size, size),
    };
    let plan = Plan::compile(&back.graph, &options).context("the ONNX file does not compile in the engine")?;
    let mut session = Session::new(std::sync::Arc::new(plan), 0)?;
    let mut rng = Rng::new(0x0cc5);
    let n = 2;
    let values: Vec<f32> = (0..n * 3 * size * size).map(|_| rng.normal()).collect();
    let engine = session.run(&values, n)?.to_vec();
    // An int8 file read back holds the dequantized weights, which requantize to the same
    // integers: its int8 plan is compared with the version's own; an f32 file with candle.
    let reference: Vec<f32> = match calibration {
        Some(_) => Session::new(std::sync::Arc::new(Plan::compile(&graph, &options)?), 0)?.run(&values, n)?.to_vec(),
        None => {
            let x = Tensor::from_vec(values, (n, 3, size, size), &state.device)?;
            state.forward(&x, false)?.flatten_all()?.to_vec1()?
        }
    };
    drop(graph);
    if engine.len() != reference.len() {
        bail!("model.onnx gives {} logits, the model {}", engine.len(), reference.len());
    }
    let diff = engine.iter().zip(&reference).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    let scale = reference.iter().map(|v| v.abs()).fold(0f32, f32::max);
    if !(diff <= ONNX_TOLERANCE * scale.max(1.0)) {
        bail!("model.onnx gives logits {diff:.2e} away from the model's (scale {scale:.1}, tolerance {ONNX_TOLERANCE:.0e}): not exported");
    }
    Ok((bytes, diff))
}

/// Name prefix of the folders exports stage in (`<model>/.staging-<version>/`).
pub const STAGING_PREFIX: &str = ".staging-";
/// The lock file inside a staging folder; held by its writer for as long as it runs.
const CLAIM_LOCK: &str = ".lock";
/// How many taken version numbers a new export steps over before giving up.
const MAX_CLAIM_ATTEMPTS: u64 = 10_000;

/// An error unless version `v` of the model is free (neither published nor being exported).
fn check_free(model_dir: &Path, name: &str, v: u64) -> Result<()> {
    if model_dir.join(v.to_string()).exists() {
        let next = model_store::list_versions(model_dir).last().map_or(1, |l| l + 1);
        bail!(
            "version {v} of `{name}` already exists in `{}`; versions are never overwritten (omit --version for {next})",
            model_dir.parent().unwrap_or(model_dir).display()
        );
    }
    Ok(())
}

/// A version number this process holds: its staging folder, locked. Dropped unpublished, the
/// staging folder is removed.
struct Claim {
    version: u64,
    dir: PathBuf,
    model_dir: PathBuf,
    published: bool,
    _lock: FileLock,
}

/// Claims `requested`, or the next free version: one more than the newest published, stepping
/// over versions other exports are writing.
fn claim_version(model_dir: &Path, name: &str, requested: Option<u64>) -> Result<Claim> {
    crate::util::fs::create_dir_all(model_dir)?;
    remove_stale_staging(model_dir)?;
    if let Some(v) = requested {
        check_free(model_dir, name, v)?;
        return match try_claim(model_dir, v)? {
            Some(claim) => Ok(claim),
            None => {
                check_free(model_dir, name, v)?;
                bail!("version {v} of `{name}` is being exported by another `segctl export` right now")
            }
        };
    }
    let first = model_store::list_versions(model_dir).last().map_or(1, |l| l + 1);
    for v in first..first.saturating_add(MAX_CLAIM_ATTEMPTS) {
        if let Some(claim) = try_claim(model_dir, v)? {
            return Ok(claim);
        }
    }
    bail!("no free version of `{name}` in `{}` after {MAX_CLAIM_ATTEMPTS} tries", model_dir.display())
}

fn staging_dir(model_dir: &Path, version: u64) -> PathBuf {
    model_dir.join(format!("{STAGING_PREFIX}{version}"))
}

/// Claims version `v`: creates its staging folder exclusively and locks it, or takes over a
/// staging folder whose writer died (its lock is free). `None` when a live writer holds it or
/// it is already published.
fn try_claim(model_dir: &Path, v: u64) -> Result<Option<Claim>> {
    if model_dir.join(v.to_string()).exists() {
        return Ok(None);
    }
    let dir = staging_dir(model_dir, v);
    let lock_path = dir.join(CLAIM_LOCK);
    let lock = match std::fs::create_dir(&dir) {
        Ok(()) => FileLock::try_acquire(&lock_path)?,
        // Another writer's, live or dead: only its existing lock decides.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => FileLock::try_acquire_existing(&lock_path)?,
        Err(e) => return Err(e).with_context(|| format!("failed to create `{}`", dir.display())),
    };
    let Some(lock) = lock else { return Ok(None) };
    // Between creating (or finding) the folder and locking, another writer may have published
    // it or replaced it: the lock must still be the file at the staging path.
    if !lock.is_at(&lock_path) {
        return Ok(None);
    }
    let claim = Claim { version: v, dir, model_dir: model_dir.to_path_buf(), published: false, _lock: lock };
    if model_dir.join(v.to_string()).exists() {
        return Ok(None); // published just before our claim; dropping the claim removes the folder
    }
    // What a killed writer left goes; the lock file stays (we hold it).
    for entry in std::fs::read_dir(&claim.dir).with_context(|| format!("failed to list `{}`", claim.dir.display()))?.flatten() {
        if entry.file_name() != CLAIM_LOCK {
            let path = entry.path();
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                crate::util::fs::remove_dir_all_if_exists(&path)?;
            } else {
                crate::util::fs::remove_file_if_exists(&path)?;
            }
        }
    }
    Ok(Some(claim))
}

/// Removes staging folders whose writer died (killed mid-export): their lock is free.
fn remove_stale_staging(model_dir: &Path) -> Result<()> {
    let Ok(entries) = std::fs::read_dir(model_dir) else { return Ok(()) };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.starts_with(STAGING_PREFIX) || !entry.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let dir = entry.path();
        let lock_path = dir.join(CLAIM_LOCK);
        if let Some(lock) = FileLock::try_acquire_existing(&lock_path)?
            && lock.is_at(&lock_path)
        {
            log::info!("removing `{}`, left by an interrupted export", dir.display());
            crate::util::fs::remove_dir_all_if_exists(&dir)?;
        }
    }
    Ok(())
}

impl Claim {
    /// Writes the weights and the manifest (with their digest) into the staging folder, each
    /// flushed to disk. Returns the weights' SHA-256.
    /// Writes the weights, `model.onnx` if given, and the manifest (last, with their hashes).
    fn stage(&self, manifest: &ModelManifest, tensors: &HashMap<String, Tensor>, onnx: Option<&[u8]>) -> Result<(String, Option<String>)> {
        let weights = self.dir.join(WEIGHTS_FILE);
        candle_core::safetensors::save(tensors, &weights).with_context(|| format!("failed to write `{}`", weights.display()))?;
        crate::util::fs::sync_file(&weights)?;
        let mut manifest = manifest.clone();
        manifest.weights_sha256 = crate::util::sha256_file(&weights)?;
        if let Some(bytes) = onnx {
            let path = self.dir.join(model_store::ONNX_FILE);
            crate::util::fs::write_durable(&path, bytes)?;
            manifest.onnx_sha256 = Some(crate::util::sha256_file(&path)?);
        }
        crate::util::fs::write_durable(&self.dir.join(MANIFEST_FILE), serde_yaml::to_string(&manifest)?.as_bytes())?;
        Ok((manifest.weights_sha256, manifest.onnx_sha256))
    }

    /// Renames the staging folder to `<version>/`: the version appears at once, complete and
    /// on disk (a server polling the repository never sees half of it).
    fn publish(mut self) -> Result<PathBuf> {
        let target = self.model_dir.join(self.version.to_string());
        crate::util::fs::sync_dir(&self.dir)?;
        if target.exists() {
            bail!("version folder `{}` already exists; versions are never overwritten", target.display());
        }
        std::fs::rename(&self.dir, &target).with_context(|| format!("failed to move `{}` into place", target.display()))?;
        self.published = true;
        crate::util::fs::sync_dir(&self.model_dir)?;
        // The lock file travelled with the folder; nobody looks at it there.
        if let Err(e) = std::fs::remove_file(target.join(CLAIM_LOCK)) {
            log::debug!("could not remove `{}`: {e}", target.join(CLAIM_LOCK).display());
        }
        Ok(target)
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        if !self.published {
            // Still holding the lock: nobody else can be using the folder.
            if let Err(e) = crate::util::fs::remove_dir_all_if_exists(&self.dir) {
                log::warn!("{e:#}");
            }
        }
    }
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
