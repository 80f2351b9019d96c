//! Where trained weights live on disk and how any of them becomes a runnable model: training
//! checkpoints (a file, a run folder, its `checkpoints/` folder) and exported model versions
//! (`<repository>/<name>/<version>/model.safetensors` + `model.yaml`, the serving format).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::checkpoint;
use crate::model::{ModelSpec, ModelState};

/// File names inside an exported version folder.
pub const WEIGHTS_FILE: &str = "model.safetensors";
pub const MANIFEST_FILE: &str = "model.yaml";

/// `model.yaml` of an exported version.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ModelManifest {
    pub name: String,
    pub version: u64,
    /// Architecture, settings, input size, normalization, class names.
    pub model: ModelSpec,
    /// Evaluation metrics known at export (`segctl evaluate` JSON), if any.
    #[serde(default)]
    pub metrics: Option<serde_json::Value>,
    pub config_digest: String,
    pub dataset_digest: String,
    /// SHA-256 of `model.safetensors`.
    pub weights_sha256: String,
    pub source_checkpoint: String,
    pub created: String,
    pub segctl_version: String,
}

/// Where a loaded model came from.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ModelOrigin {
    /// `checkpoint` or `exported`.
    pub kind: &'static str,
    pub path: PathBuf,
    pub name: Option<String>,
    pub version: Option<u64>,
}

/// A model ready to run, with its provenance.
pub struct LoadedModel {
    pub state: ModelState,
    pub origin: ModelOrigin,
    pub manifest: Option<ModelManifest>,
    pub checkpoint_meta: Option<checkpoint::CheckpointMeta>,
}

/// Version folders of a model (`<name>/<N>/`), sorted ascending.
pub fn list_versions(model_dir: &Path) -> Vec<u64> {
    let mut versions: Vec<u64> = std::fs::read_dir(model_dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    versions.sort_unstable();
    versions
}

/// Reads `model.yaml` of a version folder.
pub fn read_manifest(version_dir: &Path) -> Result<ModelManifest> {
    let path = version_dir.join(MANIFEST_FILE);
    let text = crate::util::fs::read_to_string(&path)?;
    serde_yaml::from_str(&text).with_context(|| format!("`{}` is not a valid model manifest", path.display()))
}

/// Loads an exported version folder.
pub fn load_exported(version_dir: &Path, device: &Device) -> Result<LoadedModel> {
    let manifest = read_manifest(version_dir)?;
    let weights = version_dir.join(WEIGHTS_FILE);
    let tensors = candle_core::safetensors::load(&weights, device)
        .with_context(|| format!("failed to read `{}`", weights.display()))?;
    let state = ModelState::from_tensors(&manifest.model, &tensors, device)
        .with_context(|| format!("`{}` does not match its model.yaml", weights.display()))?;
    let origin = ModelOrigin {
        kind: "exported",
        path: version_dir.to_path_buf(),
        name: Some(manifest.name.clone()),
        version: Some(manifest.version),
    };
    Ok(LoadedModel { state, origin, manifest: Some(manifest), checkpoint_meta: None })
}

/// Loads a training checkpoint (a file, or a run folder meaning its best checkpoint).
pub fn load_checkpoint(path: &Path, device: &Device) -> Result<LoadedModel> {
    let file = checkpoint::resolve(path)?;
    let ckpt = checkpoint::load(&file, device)?;
    let state = ModelState::from_tensors(&ckpt.meta.spec, &ckpt.model, device)
        .with_context(|| format!("`{}` does not match its own model spec", file.display()))?;
    let origin = ModelOrigin { kind: "checkpoint", path: file, name: None, version: None };
    Ok(LoadedModel { state, origin, manifest: None, checkpoint_meta: Some(ckpt.meta) })
}

/// Loads whatever `path` names: an exported version folder, a model folder (its newest
/// version), a checkpoint file, or a run folder.
pub fn load_any(path: &Path, device: &Device) -> Result<LoadedModel> {
    if path.join(MANIFEST_FILE).is_file() {
        return load_exported(path, device);
    }
    if path.is_dir() && !path.join("checkpoints").is_dir() && path.file_name().is_none_or(|n| n != "checkpoints") {
        let versions = list_versions(path);
        if let Some(v) = versions.last() {
            return load_exported(&path.join(v.to_string()), device);
        }
        bail!("`{}` is not a model version folder, a model folder, a checkpoint or a run folder", path.display());
    }
    load_checkpoint(path, device)
}

/// Writes an exported version folder from tensors (never over an existing version).
pub fn write_exported(version_dir: &Path, manifest: &ModelManifest, tensors: &HashMap<String, Tensor>) -> Result<()> {
    let staging = version_dir.with_extension("partial");
    crate::util::fs::remove_dir_all_if_exists(&staging)?;
    crate::util::fs::create_dir_all(&staging)?;
    let sorted: BTreeMap<&String, &Tensor> = tensors.iter().collect();
    let weights = staging.join(WEIGHTS_FILE);
    candle_core::safetensors::save(&sorted.into_iter().map(|(k, v)| (k.clone(), v.clone())).collect(), &weights)
        .with_context(|| format!("failed to write `{}`", weights.display()))?;
    let mut manifest = manifest.clone();
    manifest.weights_sha256 = crate::util::sha256_file(&weights)?;
    let yaml = serde_yaml::to_string(&manifest)?;
    crate::util::fs::write_atomic(&staging.join(MANIFEST_FILE), yaml.as_bytes())?;
    // The version appears all at once: a server polling the repository never sees half of it.
    if version_dir.exists() {
        bail!("version folder `{}` already exists; versions are never overwritten", version_dir.display());
    }
    std::fs::rename(&staging, version_dir)
        .with_context(|| format!("failed to move `{}` into place", version_dir.display()))?;
    Ok(())
}
