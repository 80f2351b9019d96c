//! Where trained weights live on disk and how any of them becomes a runnable model: training
//! checkpoints (a file, a run folder, its `checkpoints/` folder) and exported model versions
//! (`<repository>/<name>/<version>/model.safetensors` + `model.yaml`, the serving format).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use candle_core::Device;
use serde::{Deserialize, Serialize};

use crate::checkpoint;
use crate::engine::Precision;
use crate::model::{ModelSpec, ModelState};

/// File names inside an exported version folder.
pub const WEIGHTS_FILE: &str = "model.safetensors";
pub const MANIFEST_FILE: &str = "model.yaml";
pub const ONNX_FILE: &str = "model.onnx";

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
    /// SHA-256 of `model.onnx`, when the version has one (`segctl export --onnx`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub onnx_sha256: Option<String>,
    /// The arithmetic the version was checked at and is served at (`f32`, `bf16`); absent in
    /// versions written before precisions existed, which are f32.
    #[serde(default)]
    pub precision: Precision,
    /// The export gate's measurement of a reduced-precision version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub precision_check: Option<PrecisionCheck>,
    /// An int8 version's activation ranges (`[node, min, max]` per convolution input of the
    /// network's graph), measured on the calibration images `precision_check` names.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub calibration: Option<crate::engine::Calibration>,
    pub source_checkpoint: String,
    pub created: String,
    pub segctl_version: String,
}

/// How a reduced-precision version was checked at export: the validation split through the
/// f32 plan and through the version's own plan.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PrecisionCheck {
    pub f32_miou: f64,
    pub miou: f64,
    /// `f32_miou − miou`, the gate's `export.max_miou_drop` held it to.
    pub miou_drop: f64,
    pub max_miou_drop: f64,
    /// Validation images evaluated.
    pub images: usize,
    /// Share of validation pixels whose class is the same in both plans.
    pub mask_agreement: f64,
    /// Calibration images and the SHA-256 of their names in order, for precisions that
    /// calibrate (bf16 needs none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub calibration_samples: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub calibration_digest: Option<String>,
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

impl LoadedModel {
    /// The precision the model runs at: an exported version's own, f32 for checkpoints.
    pub fn precision(&self) -> Precision {
        self.manifest.as_ref().map_or(Precision::F32, |m| m.precision)
    }

    /// An int8 version's calibration.
    pub fn calibration(&self) -> Option<std::sync::Arc<crate::engine::Calibration>> {
        self.manifest.as_ref().and_then(|m| m.calibration.clone()).map(std::sync::Arc::new)
    }
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

/// [`list_versions`], telling a folder that is gone (no versions) from one that could not be
/// read (an error: the caller keeps what it serves).
pub fn try_list_versions(model_dir: &Path) -> std::io::Result<Vec<u64>> {
    let entries = match std::fs::read_dir(model_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut versions = Vec::new();
    for entry in entries {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            if let Some(v) = entry.file_name().to_str().and_then(|n| n.parse().ok()) {
                versions.push(v);
            }
        }
    }
    versions.sort_unstable();
    Ok(versions)
}

/// Reads `model.yaml` of a version folder.
pub fn read_manifest(version_dir: &Path) -> Result<ModelManifest> {
    let path = version_dir.join(MANIFEST_FILE);
    let text = crate::util::fs::read_to_string(&path)?;
    let manifest: ModelManifest =
        serde_yaml::from_str(&text).with_context(|| format!("`{}` is not a valid model manifest", path.display()))?;
    manifest.model.check().with_context(|| format!("`{}` holds an invalid model spec", path.display()))?;
    Ok(manifest)
}

/// Checks that the weights file is the one its manifest names (streamed SHA-256).
pub fn verify_weights(weights: &Path, manifest: &ModelManifest) -> Result<()> {
    let actual = crate::util::sha256_file(weights)?;
    if !actual.eq_ignore_ascii_case(&manifest.weights_sha256) {
        bail!(
            "`{}` does not match its {MANIFEST_FILE}: weights_sha256 is {} but the file's SHA-256 is {actual}; the version is damaged, export it again",
            weights.display(),
            manifest.weights_sha256
        );
    }
    Ok(())
}

/// Largest safetensors header read (names, dtypes, shapes and offsets; ours are a few KB).
const MAX_WEIGHTS_HEADER_BYTES: u64 = 16 << 20;

/// Checks a weights file against the network `spec` describes from the file's header alone:
/// the same tensor names, each with the spec's shape and f32 data, and a file exactly as long
/// as that data. Nothing of the network or the weights is allocated before it passes.
pub fn check_weights_header(weights: &Path, spec: &ModelSpec) -> Result<()> {
    use std::io::Read;
    let shown = weights.display();
    let mut file = std::fs::File::open(weights).with_context(|| format!("cannot open `{shown}`"))?;
    let file_len = file.metadata().with_context(|| format!("cannot read `{shown}`"))?.len();
    let mut prefix = [0u8; 8];
    file.read_exact(&mut prefix).with_context(|| format!("`{shown}` is not a safetensors file (shorter than its header)"))?;
    let header_len = u64::from_le_bytes(prefix);
    if header_len > MAX_WEIGHTS_HEADER_BYTES || header_len > file_len - 8 {
        bail!("`{shown}` declares a {header_len}-byte header in a {file_len}-byte file: not a safetensors file");
    }
    let mut buffer = prefix.to_vec();
    buffer.resize(8 + header_len as usize, 0);
    file.read_exact(&mut buffer[8..]).with_context(|| format!("cannot read the header of `{shown}`"))?;
    /// One entry of a safetensors header.
    #[derive(serde::Deserialize)]
    struct Entry {
        dtype: String,
        shape: Vec<usize>,
        data_offsets: [u64; 2],
    }
    let mut header: std::collections::BTreeMap<String, serde_json::Value> =
        serde_json::from_slice(&buffer[8..]).with_context(|| format!("`{shown}` has no valid safetensors header"))?;
    header.remove("__metadata__");
    let expected = crate::model::variable_shapes(spec)?;
    let mut data_bytes: u64 = 0;
    let mut spans = Vec::with_capacity(expected.len());
    for (name, shape) in &expected {
        let value = header.remove(name).with_context(|| format!("`{shown}` has no tensor `{name}`, which {MANIFEST_FILE}'s model needs"))?;
        let entry: Entry = serde_json::from_value(value).with_context(|| format!("`{shown}`: tensor `{name}` has an invalid header entry"))?;
        if entry.shape != *shape {
            bail!("`{shown}`: tensor `{name}` is {:?}, the model in {MANIFEST_FILE} needs {shape:?}", entry.shape);
        }
        if entry.dtype != "F32" {
            bail!("`{shown}`: tensor `{name}` is {}, not F32", entry.dtype);
        }
        let bytes = shape.iter().try_fold(4u64, |n, &d| n.checked_mul(d as u64));
        let bytes = bytes.with_context(|| format!("the model in {MANIFEST_FILE} is too large to exist"))?;
        data_bytes = data_bytes.checked_add(bytes).with_context(|| format!("the model in {MANIFEST_FILE} is too large to exist"))?;
        let [from, to] = entry.data_offsets;
        if to.checked_sub(from) != Some(bytes) {
            bail!("`{shown}`: tensor `{name}` spans bytes {from}..{to}, not the {bytes} its shape needs");
        }
        spans.push((from, to));
    }
    if let Some(name) = header.keys().next() {
        bail!("`{shown}` holds a tensor `{name}` the model in {MANIFEST_FILE} does not have ({} unexpected)", header.len());
    }
    // The tensors tile the data exactly: no overlaps, no gaps, nothing after them.
    spans.sort_unstable();
    let mut at = 0;
    for (from, to) in spans {
        if from != at {
            bail!("`{shown}`: its tensors do not tile the data (a gap or an overlap at byte {at})");
        }
        at = to;
    }
    if 8 + header_len + data_bytes != file_len {
        bail!("`{shown}` is {file_len} bytes, but its tensors and header make {}", 8 + header_len + data_bytes);
    }
    Ok(())
}

/// Loads an exported version folder: the manifest, then the weights' header against its
/// spec and their digest against its `weights_sha256`, and only then any tensor.
pub fn load_exported(version_dir: &Path, device: &Device) -> Result<LoadedModel> {
    let manifest = read_manifest(version_dir)?;
    let weights = version_dir.join(WEIGHTS_FILE);
    check_weights_header(&weights, &manifest.model)?;
    verify_weights(&weights, &manifest)?;
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
    let file = checkpoint::resolve(&crate::storage::localize(path)?)?;
    let ckpt = checkpoint::load(&file, device)?;
    let state = ModelState::from_tensors(&ckpt.meta.spec, &ckpt.model, device)
        .with_context(|| format!("`{}` does not match its own model spec", file.display()))?;
    let origin = ModelOrigin { kind: "checkpoint", path: file, name: None, version: None };
    Ok(LoadedModel { state, origin, manifest: None, checkpoint_meta: Some(ckpt.meta) })
}

/// The version `serve` answers with when no model is named: the newest version with a valid
/// `model.yaml` of `default_model`, else of the first of `served` (`serve.models`), else of the
/// first model folder (sorted) that has such a version.
pub fn default_version(repository: &Path, served: &[String], default_model: Option<&str>) -> Result<(String, u64, PathBuf)> {
    let names: Vec<String> = match (default_model, served.first()) {
        (Some(name), _) => vec![name.to_string()],
        (None, Some(first)) => vec![first.clone()],
        (None, None) => {
            let mut names: Vec<String> = std::fs::read_dir(repository)
                .into_iter()
                .flatten()
                .flatten()
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .filter_map(|e| e.file_name().to_str().map(str::to_string))
                .filter(|n| crate::config::is_valid_model_name(n))
                .collect();
            names.sort();
            names
        }
    };
    for name in &names {
        let dir = repository.join(name);
        for v in list_versions(&dir).into_iter().rev() {
            let version_dir = dir.join(v.to_string());
            match read_manifest(&version_dir) {
                Ok(_) => return Ok((name.clone(), v, version_dir)),
                Err(e) => log::warn!("skipping `{}`: {e:#}", version_dir.display()),
            }
        }
    }
    let which = match names.as_slice() {
        [one] if default_model.is_some() || !served.is_empty() => format!("model `{one}`"),
        _ => "model".to_string(),
    };
    bail!(
        "no exported {which} in the model repository `{}` (serve.repository / export.repository): make one with          `segctl export --checkpoint runs/<run>`, or pass --model DIR, --checkpoint PATH or --server URL",
        repository.display()
    )
}

/// For a model folder in a bucket (`s3://…/<name>`, versions below it): the URL of its newest
/// version with a manifest, so that only that version is downloaded. `None` for anything else
/// (a local path, a version folder, a checkpoint, a run).
fn newest_remote_version(path: &Path) -> Result<Option<PathBuf>> {
    let Some(remote) = crate::storage::remote(path)? else { return Ok(None) };
    if path.to_string_lossy().ends_with(".safetensors") || remote.head(MANIFEST_FILE)?.is_some() {
        return Ok(None);
    }
    let mut versions: Vec<u64> = remote.list_children()?.iter().filter_map(|n| n.parse().ok()).collect();
    versions.sort_unstable();
    for v in versions.into_iter().rev() {
        let version = remote.child(&v.to_string());
        if version.head(MANIFEST_FILE)?.is_some() {
            return Ok(Some(PathBuf::from(version.url())));
        }
    }
    Ok(None)
}

/// Loads whatever `path` names: an exported version folder, a model folder (its newest
/// version), a checkpoint file, or a run folder.
pub fn load_any(path: &Path, device: &Device) -> Result<LoadedModel> {
    let newest;
    let path = match newest_remote_version(path)? {
        Some(version) => {
            newest = version;
            newest.as_path()
        }
        None => path,
    };
    let local = crate::storage::localize(path)?;
    let path = local.as_path();
    if path.join(MANIFEST_FILE).is_file() {
        return load_exported(path, device);
    }
    match checkpoint::locate(path) {
        Ok(_) => load_checkpoint(path, device),
        // A model folder: its newest complete version (one with a model.yaml).
        Err(_) if path.is_dir() => match list_versions(path).into_iter().rev().find(|v| path.join(v.to_string()).join(MANIFEST_FILE).is_file()) {
            Some(v) => load_exported(&path.join(v.to_string()), device),
            None => bail!("`{}` is not a model version folder, a model folder, a checkpoint or a run folder", path.display()),
        },
        Err(e) => Err(e),
    }
}

/// A local folder holding `repository`'s complete versions: the folder itself, or for a bucket
/// its mirror, brought up to date.
pub fn local_repository(repository: &Path) -> Result<PathBuf> {
    match crate::storage::remote(repository)? {
        Some(remote) => Ok(BucketRepository::open(remote)?.local),
        None => Ok(crate::storage::local_path(repository)),
    }
}

/// A model repository in a bucket, mirrored into a local folder that `serve` watches as it
/// watches any repository. A version is mirrored once its `model.yaml` is in the bucket
/// (export uploads it last), into a staging folder renamed into place when complete, so the
/// local repository never shows half a version; versions gone from a listing that succeeded
/// are removed. A listing or download that fails changes nothing local.
pub struct BucketRepository {
    pub remote: crate::storage::Remote,
    pub local: PathBuf,
}

/// What one [`BucketRepository::sync`] changed.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SyncReport {
    pub added: Vec<(String, u64)>,
    pub removed: Vec<(String, u64)>,
}

impl BucketRepository {
    pub fn new(remote: crate::storage::Remote) -> Self {
        let local = crate::storage::cache_root().join("repositories").join(&crate::util::sha256_hex(remote.url().as_bytes())[..24]);
        Self { remote, local }
    }

    /// The mirror of `remote`, brought up to date once (an unreadable bucket is an error).
    pub fn open(remote: crate::storage::Remote) -> Result<Self> {
        let bucket = Self::new(remote);
        crate::util::fs::create_dir_all(&bucket.local)?;
        bucket.sync().with_context(|| format!("cannot read the model repository `{}`", bucket.remote.url()))?;
        Ok(bucket)
    }

    /// Brings the mirror up to date. Several processes may share it: they take turns (a lock
    /// on the mirror), stage each version in a folder of their own and rename it into place,
    /// and a version found without its weights (an interrupted copy) is fetched again.
    pub fn sync(&self) -> Result<SyncReport> {
        let _lock = crate::util::fs::DirLock::wait(&crate::storage::lock_path(self.remote.url()))?;
        let mut report = SyncReport::default();
        let mut present = std::collections::BTreeSet::new();
        for name in self.remote.list_children()?.into_iter().filter(|n| crate::config::is_valid_model_name(n)) {
            let model = self.remote.child(&name);
            for v in model.list_children()?.into_iter().filter_map(|n| n.parse::<u64>().ok()) {
                let dir = self.local.join(&name).join(v.to_string());
                if dir.join(MANIFEST_FILE).is_file() {
                    if std::fs::metadata(dir.join(WEIGHTS_FILE)).is_ok_and(|m| m.is_file() && m.len() > 0) {
                        present.insert((name.clone(), v));
                        continue;
                    }
                    log::warn!("`{}` has no weights: fetching the version again", dir.display());
                    std::fs::remove_dir_all(&dir).with_context(|| format!("failed to clear `{}`", dir.display()))?;
                }
                let version = model.child(&v.to_string());
                if version.head(MANIFEST_FILE)?.is_none() {
                    continue; // still uploading (or abandoned): not visible
                }
                let staging = self.local.join(&name).join(format!("{}sync-{v}-{}", crate::util::fs::TEMP_PREFIX, std::process::id()));
                if staging.exists() {
                    std::fs::remove_dir_all(&staging).with_context(|| format!("failed to clear `{}`", staging.display()))?;
                }
                for object in version.list()? {
                    if object.rel == MANIFEST_FILE || object.rel.starts_with(".segctl") || object.rel.contains('/') {
                        continue;
                    }
                    version.download(&object.rel, &staging.join(&object.rel))?;
                }
                version.download(MANIFEST_FILE, &staging.join(MANIFEST_FILE))?;
                if let Err(e) = std::fs::rename(&staging, &dir) {
                    // Another process's copy got there first (a folder that is not empty).
                    let _ = std::fs::remove_dir_all(&staging);
                    if !dir.join(MANIFEST_FILE).is_file() {
                        return Err(e).with_context(|| format!("failed to move `{}` into place", staging.display()));
                    }
                }
                log::info!("mirrored `{}` into `{}`", version.url(), dir.display());
                present.insert((name.clone(), v));
                report.added.push((name.clone(), v));
            }
        }
        for entry in std::fs::read_dir(&self.local).into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            for v in list_versions(&entry.path()) {
                if !present.contains(&(name.clone(), v)) {
                    let dir = entry.path().join(v.to_string());
                    std::fs::remove_dir_all(&dir).with_context(|| format!("failed to remove `{}`", dir.display()))?;
                    report.removed.push((name.clone(), v));
                }
            }
        }
        Ok(report)
    }
}
