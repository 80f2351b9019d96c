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

use crate::config::is_valid_model_name;
use crate::model::{self, ModelState};
use crate::model_store::{self, MANIFEST_FILE, ModelManifest, WEIGHTS_FILE};
use crate::util::fs::FileLock;
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
    let claim = claim_version(&model_dir, &options.name, options.version)?;
    let version = claim.version;
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
    let weights_sha256 = claim.stage(&manifest, &tensors)?;
    let version_dir = claim.publish()?;
    Ok(ExportReport {
        name: options.name.clone(),
        version,
        path: version_dir,
        batchnorm_folded: spec.batchnorm_folded,
        fold_max_abs_diff: fold_diff,
        parameters: tensors.iter().filter(|(n, _)| !n.contains("running_")).map(|(_, t)| t.elem_count()).sum(),
        weights_sha256,
        source_checkpoint: loaded.origin.path,
    })
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
    fn stage(&self, manifest: &ModelManifest, tensors: &HashMap<String, Tensor>) -> Result<String> {
        let weights = self.dir.join(WEIGHTS_FILE);
        candle_core::safetensors::save(tensors, &weights).with_context(|| format!("failed to write `{}`", weights.display()))?;
        crate::util::fs::sync_file(&weights)?;
        let mut manifest = manifest.clone();
        manifest.weights_sha256 = crate::util::sha256_file(&weights)?;
        crate::util::fs::write_durable(&self.dir.join(MANIFEST_FILE), serde_yaml::to_string(&manifest)?.as_bytes())?;
        Ok(manifest.weights_sha256)
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
