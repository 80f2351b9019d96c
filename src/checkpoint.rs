//! Training checkpoints and run folders. A checkpoint is one safetensors file written
//! atomically: model tensors (`model.*`: what evaluation and inference use, the weight average
//! when `train.ema_decay` is set), the raw training weights behind an average (`online.*`),
//! optimizer state (`optim.*`) and, in the header
//! metadata, the model spec, the resolved config and the exact training position (epoch,
//! step, batch within the epoch, RNG state, best score so far). Checkpoint retention (last K
//! plus the best) lives here too.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::model::ModelSpec;

/// Bumped when the checkpoint layout changes incompatibly.
pub const FORMAT_VERSION: u32 = 1;
/// Header-metadata key holding [`CheckpointMeta`] as JSON.
const METADATA_KEY: &str = "segctl";
const MODEL_PREFIX: &str = "model.";
const OPTIM_PREFIX: &str = "optim.";
const ONLINE_PREFIX: &str = "online.";

/// Sums over the batches of an epoch (kept across an interruption so a resumed epoch reports
/// the same numbers as an uninterrupted one).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct EpochTotals {
    pub loss_sum: f64,
    pub batches: usize,
    pub correct_pixels: u64,
    pub pixels: u64,
    pub images: usize,
    /// Seconds spent in training steps (for images/s).
    pub step_seconds: f64,
}

/// Where training stands.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainingProgress {
    /// Fully completed epochs.
    pub epochs_completed: usize,
    /// Optimizer steps taken.
    pub step: u64,
    /// Batches already done in epoch `epochs_completed` (0 at an epoch boundary).
    pub batch_in_epoch: usize,
    /// Data-order seed of epoch `epochs_completed` (valid when `batch_in_epoch > 0`).
    pub epoch_seed: u64,
    /// State of the trainer's RNG (draws each epoch's data-order seed).
    pub rng_state: u64,
    pub best_mean_iou: Option<f64>,
    pub best_epoch: Option<usize>,
    pub epochs_without_improvement: usize,
    /// Totals of the unfinished epoch.
    pub partial: EpochTotals,
}

/// Header metadata of a checkpoint.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CheckpointMeta {
    pub format_version: u32,
    pub segctl_version: String,
    pub created: String,
    pub spec: ModelSpec,
    pub config: Config,
    pub progress: TrainingProgress,
    /// Validation mean IoU of the epoch this checkpoint closes, if any.
    pub val_mean_iou: Option<f64>,
    /// SHA-256 of the resolved config (YAML).
    pub config_digest: String,
    /// Digest of the training data files.
    pub dataset_digest: String,
    /// `train.precision` of the run (master weights are f32 either way, so any export
    /// precision can be taken from it).
    #[serde(default)]
    pub precision: crate::config::Precision,
}

/// A loaded checkpoint.
pub struct Checkpoint {
    pub path: PathBuf,
    pub meta: CheckpointMeta,
    pub model: HashMap<String, Tensor>,
    pub optimizer: HashMap<String, Tensor>,
    /// The weights the optimizer trains, when `model` holds their moving average (else empty).
    pub online: HashMap<String, Tensor>,
}

fn tensor_bytes(t: &Tensor) -> Result<Vec<u8>> {
    let values = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    Ok(values.iter().flat_map(|v| v.to_le_bytes()).collect())
}

/// Writes a checkpoint atomically and durably (temporary file, fsync, rename, fsync of the folder).
pub fn save(
    path: &Path,
    meta: &CheckpointMeta,
    model: &HashMap<String, Tensor>,
    optimizer: &HashMap<String, Tensor>,
    online: &HashMap<String, Tensor>,
) -> Result<()> {
    let mut named: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::with_capacity(model.len() + optimizer.len() + online.len());
    for (prefix, map) in [(MODEL_PREFIX, model), (OPTIM_PREFIX, optimizer), (ONLINE_PREFIX, online)] {
        for (name, t) in map {
            named.push((format!("{prefix}{name}"), t.dims().to_vec(), tensor_bytes(t)?));
        }
    }
    named.sort_by(|a, b| a.0.cmp(&b.0));
    let views = named
        .iter()
        .map(|(name, shape, bytes)| {
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), bytes).map(|v| (name.clone(), v))
        })
        .collect::<Result<Vec<_>, _>>()
        .context("failed to lay out checkpoint tensors")?;
    let metadata = HashMap::from([(METADATA_KEY.to_string(), serde_json::to_string(meta)?)]);
    let bytes = safetensors::tensor::serialize(views, Some(metadata)).context("failed to serialize checkpoint")?;
    crate::util::fs::write_durable(path, &bytes)
}

/// Largest safetensors header read (the safetensors crate's own limit).
const MAX_HEADER_BYTES: u64 = 100_000_000;

/// Reads only the metadata of a checkpoint: the safetensors header, not the tensors.
pub fn read_meta(path: &Path) -> Result<CheckpointMeta> {
    use std::io::Read;
    let mut file = std::fs::File::open(path).with_context(|| format!("failed to open `{}`", path.display()))?;
    let mut len = [0u8; 8];
    file.read_exact(&mut len).map_err(|e| anyhow::anyhow!("`{}` is not a safetensors file: {e}", path.display()))?;
    let len = u64::from_le_bytes(len);
    if len > MAX_HEADER_BYTES {
        bail!("`{}` is not a safetensors file: its header claims {len} bytes", path.display());
    }
    let mut header = Vec::with_capacity(len as usize);
    file.take(len).read_to_end(&mut header).with_context(|| format!("failed to read `{}`", path.display()))?;
    if header.len() as u64 != len {
        bail!("`{}` is not a safetensors file: its header is cut short", path.display());
    }
    #[derive(Deserialize)]
    struct Header {
        #[serde(rename = "__metadata__", default)]
        metadata: HashMap<String, String>,
    }
    let header: Header = serde_json::from_slice(&header)
        .map_err(|e| anyhow::anyhow!("`{}` is not a safetensors file: {e}", path.display()))?;
    meta_from_json(header.metadata.get(METADATA_KEY).map(String::as_str), path)
}

fn meta_from_bytes(bytes: &[u8], path: &Path) -> Result<CheckpointMeta> {
    let (_, metadata) = safetensors::SafeTensors::read_metadata(bytes)
        .map_err(|e| anyhow::anyhow!("`{}` is not a safetensors file: {e}", path.display()))?;
    meta_from_json(metadata.metadata().as_ref().and_then(|m| m.get(METADATA_KEY)).map(String::as_str), path)
}

/// Parses and checks the segctl metadata: format version, and the model spec against the
/// config's limits before anything is built from it.
fn meta_from_json(json: Option<&str>, path: &Path) -> Result<CheckpointMeta> {
    let json = json.with_context(|| format!("`{}` is not a segctl checkpoint (no `{METADATA_KEY}` metadata)", path.display()))?;
    let meta: CheckpointMeta = serde_json::from_str(json)
        .with_context(|| format!("`{}` has unreadable checkpoint metadata", path.display()))?;
    if meta.format_version != FORMAT_VERSION {
        bail!("`{}` has checkpoint format {}, this segctl reads {FORMAT_VERSION}", path.display(), meta.format_version);
    }
    meta.spec.check().with_context(|| format!("`{}` holds an invalid model spec", path.display()))?;
    Ok(meta)
}

/// Loads a checkpoint's tensors onto `device`.
pub fn load(path: &Path, device: &Device) -> Result<Checkpoint> {
    let bytes = crate::util::fs::read(path)?;
    let meta = meta_from_bytes(&bytes, path)?;
    let tensors = candle_core::safetensors::load_buffer(&bytes, device)
        .with_context(|| format!("failed to read tensors of `{}`", path.display()))?;
    let mut model = HashMap::new();
    let mut optimizer = HashMap::new();
    let mut online = HashMap::new();
    for (name, t) in tensors {
        if let Some(n) = name.strip_prefix(MODEL_PREFIX) {
            model.insert(n.to_string(), t);
        } else if let Some(n) = name.strip_prefix(OPTIM_PREFIX) {
            optimizer.insert(n.to_string(), t);
        } else if let Some(n) = name.strip_prefix(ONLINE_PREFIX) {
            online.insert(n.to_string(), t);
        }
    }
    Ok(Checkpoint { path: path.to_path_buf(), meta, model, optimizer, online })
}

/// The files of one training run.
#[derive(Debug, Clone)]
pub struct RunLayout {
    pub root: PathBuf,
}

impl RunLayout {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }
    pub fn checkpoints_dir(&self) -> PathBuf {
        self.root.join("checkpoints")
    }
    pub fn best(&self) -> PathBuf {
        self.checkpoints_dir().join("best.safetensors")
    }
    pub fn epoch_checkpoint(&self, epoch: usize) -> PathBuf {
        self.checkpoints_dir().join(format!("epoch-{epoch:04}.safetensors"))
    }
    pub fn interrupted(&self) -> PathBuf {
        self.checkpoints_dir().join("interrupted.safetensors")
    }
    pub fn metrics_log(&self) -> PathBuf {
        self.root.join("metrics.jsonl")
    }
    pub fn curves(&self) -> PathBuf {
        self.root.join("curves.png")
    }
    pub fn config(&self) -> PathBuf {
        self.root.join("config.yaml")
    }
    pub fn summary(&self) -> PathBuf {
        self.root.join("summary.json")
    }

    /// Periodic checkpoints, oldest first.
    pub fn epoch_checkpoints(&self) -> Vec<(usize, PathBuf)> {
        let mut out: Vec<(usize, PathBuf)> = std::fs::read_dir(self.checkpoints_dir())
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                let epoch = name.strip_prefix("epoch-")?.strip_suffix(".safetensors")?.parse().ok()?;
                Some((epoch, e.path()))
            })
            .collect();
        out.sort();
        out
    }

    /// Deletes periodic checkpoints beyond the newest `keep`.
    pub fn prune(&self, keep: usize) -> Result<()> {
        let all = self.epoch_checkpoints();
        for (_, path) in all.iter().take(all.len().saturating_sub(keep)) {
            crate::util::fs::remove_file_if_exists(path)?;
        }
        Ok(())
    }

    /// The run's checkpoints whose metadata reads, furthest along (highest step) first, and
    /// those that could not be read, with why.
    pub fn candidates(&self) -> (Vec<(PathBuf, CheckpointMeta)>, Vec<SkippedCheckpoint>) {
        let mut readable = Vec::new();
        let mut skipped = Vec::new();
        let paths = self.epoch_checkpoints().into_iter().map(|(_, p)| p).chain([self.interrupted(), self.best()]);
        for path in paths.filter(|p| p.is_file()) {
            match read_meta(&path) {
                Ok(meta) => readable.push((path, meta)),
                Err(e) => skipped.push(SkippedCheckpoint { path, reason: format!("{e:#}") }),
            }
        }
        // Stable: among equals, periodic checkpoints come before `interrupted` and `best`.
        readable.sort_by_key(|(_, m)| std::cmp::Reverse((m.progress.step, m.progress.batch_in_epoch)));
        (readable, skipped)
    }

    /// The checkpoint furthest along whose metadata reads (unreadable ones are skipped with a
    /// warning).
    pub fn latest(&self) -> Result<PathBuf> {
        let (readable, skipped) = self.candidates();
        for s in &skipped {
            log::warn!("skipping checkpoint `{}`: {}", s.path.display(), s.reason);
        }
        readable
            .into_iter()
            .next()
            .map(|(p, _)| p)
            .with_context(|| format!("`{}` holds no readable checkpoint{}", self.root.display(), describe_skipped(&skipped)))
    }

    /// Loads the checkpoint furthest along that loads completely — what `--resume` continues
    /// from — and says which newer or unreadable ones were skipped, and why.
    pub fn load_latest(&self, device: &Device) -> Result<(Checkpoint, Vec<SkippedCheckpoint>)> {
        let (readable, mut skipped) = self.candidates();
        for (path, _) in readable {
            match load(&path, device) {
                Ok(checkpoint) => return Ok((checkpoint, skipped)),
                Err(e) => skipped.push(SkippedCheckpoint { path, reason: format!("{e:#}") }),
            }
        }
        bail!("`{}` holds no checkpoint to resume from{}", self.root.display(), describe_skipped(&skipped))
    }
}

/// A checkpoint `--resume` passed over.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SkippedCheckpoint {
    pub path: PathBuf,
    pub reason: String,
}

fn describe_skipped(skipped: &[SkippedCheckpoint]) -> String {
    skipped.iter().map(|s| format!("; skipped `{}`: {}", s.path.display(), s.reason)).collect()
}

/// What a path given for a checkpoint names.
#[derive(Debug, Clone)]
pub enum RunOrCheckpoint {
    /// A checkpoint file.
    File(PathBuf),
    /// A run folder (given as the folder or as its `checkpoints/`).
    Run(RunLayout),
}

/// The one reading of a path that names "a run folder or a checkpoint" (`--checkpoint`,
/// `--resume`, `evaluate`, `export`, `predict`): a file is a checkpoint; a folder holding
/// `checkpoints/` is a run; a folder named `checkpoints` is its parent's run; anything else is
/// an error.
pub fn locate(path: &Path) -> Result<RunOrCheckpoint> {
    if path.is_file() {
        return Ok(RunOrCheckpoint::File(path.to_path_buf()));
    }
    if !path.exists() {
        bail!("checkpoint `{}` does not exist", path.display());
    }
    if path.join("checkpoints").is_dir() {
        return Ok(RunOrCheckpoint::Run(RunLayout::new(path)));
    }
    if path.is_dir()
        && path.file_name().is_some_and(|n| n == "checkpoints")
        && let Some(parent) = path.parent()
    {
        return Ok(RunOrCheckpoint::Run(RunLayout::new(parent)));
    }
    bail!("`{}` is neither a checkpoint file nor a run folder (one holding checkpoints/)", path.display())
}

/// Resolves a `--checkpoint PATH` to a file: a checkpoint file, or a run's best checkpoint
/// (its latest when no best exists).
pub fn resolve(path: &Path) -> Result<PathBuf> {
    match locate(path)? {
        RunOrCheckpoint::File(file) => Ok(file),
        RunOrCheckpoint::Run(run) if run.best().is_file() => Ok(run.best()),
        RunOrCheckpoint::Run(run) => run.latest(),
    }
}

/// The run folder a checkpoint file belongs to (`<run>/checkpoints/<file>`).
pub fn run_of(checkpoint: &Path) -> Option<PathBuf> {
    let dir = checkpoint.parent()?;
    (dir.file_name()? == "checkpoints").then(|| dir.parent().map(Path::to_path_buf)).flatten()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{ModelSpec, ModelState};

    fn meta(spec: ModelSpec, step: u64) -> CheckpointMeta {
        CheckpointMeta {
            format_version: FORMAT_VERSION,
            segctl_version: "test".into(),
            created: "now".into(),
            spec,
            config: Config::default(),
            progress: TrainingProgress {
                epochs_completed: 1,
                step,
                batch_in_epoch: 0,
                epoch_seed: 9,
                rng_state: 12345,
                best_mean_iou: Some(0.5),
                best_epoch: Some(1),
                epochs_without_improvement: 0,
                partial: EpochTotals::default(),
            },
            val_mean_iou: Some(0.5),
            config_digest: "c".into(),
            dataset_digest: "d".into(),
            precision: Default::default(),
        }
    }

    #[test]
    fn a_run_folder_or_a_checkpoint_has_one_reading() {
        let dir = tempfile::tempdir().unwrap();
        let run = RunLayout::new(dir.path().join("run"));
        std::fs::create_dir_all(run.checkpoints_dir()).unwrap();
        std::fs::write(run.best(), b"x").unwrap();
        let is_run = |p: &Path| matches!(locate(p).unwrap(), RunOrCheckpoint::Run(r) if r.root == run.root);
        assert!(is_run(&run.root), "the run folder");
        assert!(is_run(&run.checkpoints_dir()), "its checkpoints/ folder");
        assert!(matches!(locate(&run.best()).unwrap(), RunOrCheckpoint::File(f) if f == run.best()));
        let other = dir.path().join("photos");
        std::fs::create_dir_all(&other).unwrap();
        let err = format!("{:#}", locate(&other).unwrap_err());
        assert!(err.contains("neither a checkpoint file nor a run folder"), "{err}");
        assert!(format!("{:#}", locate(&dir.path().join("nope")).unwrap_err()).contains("does not exist"));
        // `--checkpoint` of a run means its best checkpoint.
        assert_eq!(resolve(&run.root).unwrap(), run.best());
    }

    #[test]
    fn round_trip_is_bit_exact() {
        let mut config = Config::default();
        config.model.unet.depth = 2;
        config.model.unet.base_width = 4;
        config.data.image_size = 32;
        let spec = ModelSpec::from_config(&config);
        let state = ModelState::new(&spec, &Device::Cpu, 3).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let run = RunLayout::new(dir.path());
        let path = run.epoch_checkpoint(1);
        let model = state.named_tensors();
        let optim = HashMap::from([("m.x".to_string(), Tensor::new(&[1.5f32, -2.25], &Device::Cpu).unwrap())]);
        let online = HashMap::from([("w".to_string(), Tensor::new(&[0.125f32], &Device::Cpu).unwrap())]);
        save(&path, &meta(spec.clone(), 7), &model, &optim, &online).unwrap();
        let loaded = load(&path, &Device::Cpu).unwrap();
        assert_eq!(loaded.meta.progress, meta(spec.clone(), 7).progress);
        assert_eq!(loaded.meta.spec, spec);
        for (name, t) in &model {
            let a = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let b = loaded.model[name].flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()), "{name} differs");
        }
        assert_eq!(loaded.optimizer["m.x"].to_vec1::<f32>().unwrap(), vec![1.5, -2.25]);
        assert_eq!(loaded.online["w"].to_vec1::<f32>().unwrap(), vec![0.125]);
        assert_eq!(loaded.model.len(), model.len(), "online tensors stay out of the model");
    }

    #[test]
    fn retention_latest_and_resolution() {
        let mut config = Config::default();
        config.model.unet.depth = 1;
        config.model.unet.base_width = 2;
        let spec = ModelSpec::from_config(&config);
        let dir = tempfile::tempdir().unwrap();
        let run = RunLayout::new(dir.path().join("run"));
        let empty = HashMap::new();
        for epoch in 1..=4 {
            save(&run.epoch_checkpoint(epoch), &meta(spec.clone(), epoch as u64 * 10), &empty, &empty, &empty).unwrap();
        }
        save(&run.best(), &meta(spec.clone(), 20), &empty, &empty, &empty).unwrap();
        run.prune(2).unwrap();
        assert_eq!(run.epoch_checkpoints().iter().map(|(e, _)| *e).collect::<Vec<_>>(), vec![3, 4]);
        assert_eq!(run.latest().unwrap(), run.epoch_checkpoint(4));
        assert_eq!(resolve(&run.root).unwrap(), run.best());
        assert_eq!(resolve(&run.checkpoints_dir()).unwrap(), run.best());
        assert_eq!(resolve(&run.epoch_checkpoint(3)).unwrap(), run.epoch_checkpoint(3));
        assert_eq!(run_of(&run.best()).unwrap(), run.root);
        assert!(resolve(&dir.path().join("nope")).is_err());
    }

    #[test]
    fn resume_skips_unloadable_checkpoints_and_says_why() {
        let mut config = Config::default();
        config.model.unet.depth = 1;
        config.model.unet.base_width = 2;
        config.data.image_size = 32;
        let spec = ModelSpec::from_config(&config);
        let state = ModelState::new(&spec, &Device::Cpu, 1).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let run = RunLayout::new(dir.path().join("run"));
        let (model, empty) = (state.named_tensors(), HashMap::new());
        for epoch in 1..=3 {
            save(&run.epoch_checkpoint(epoch), &meta(spec.clone(), epoch as u64), &model, &empty, &empty).unwrap();
        }
        // Epoch 3: tensors cut short (header intact). Epoch 2: garbage.
        let bytes = std::fs::read(run.epoch_checkpoint(3)).unwrap();
        std::fs::write(run.epoch_checkpoint(3), &bytes[..bytes.len() - 100]).unwrap();
        std::fs::write(run.epoch_checkpoint(2), b"not a checkpoint").unwrap();
        let (loaded, skipped) = run.load_latest(&Device::Cpu).unwrap();
        assert_eq!(loaded.path, run.epoch_checkpoint(1));
        let paths: Vec<_> = skipped.iter().map(|s| s.path.clone()).collect();
        assert_eq!(paths, vec![run.epoch_checkpoint(2), run.epoch_checkpoint(3)]);
        assert!(skipped.iter().all(|s| s.reason.contains("safetensors")), "{skipped:?}");
        std::fs::write(run.epoch_checkpoint(1), b"").unwrap();
        let err = format!("{:#}", run.load_latest(&Device::Cpu).err().unwrap());
        assert!(err.contains("no checkpoint to resume from") && err.contains("epoch-0001"), "{err}");
    }

    #[test]
    fn a_checkpoint_spec_is_bounded_before_use() {
        let mut config = Config::default();
        config.model.unet.depth = 1;
        config.model.unet.base_width = 2;
        let mut spec = ModelSpec::from_config(&config);
        spec.input_size = 1_000_000;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.safetensors");
        let empty = HashMap::new();
        save(&path, &meta(spec.clone(), 1), &empty, &empty, &empty).unwrap();
        let err = format!("{:#}", read_meta(&path).unwrap_err());
        assert!(err.contains("input_size") && err.contains("1000000"), "{err}");
        assert!(format!("{:#}", load(&path, &Device::Cpu).err().unwrap()).contains("input_size"));
        spec.input_size = 128;
        spec.unet.as_mut().unwrap().depth = 0;
        save(&path, &meta(spec, 1), &empty, &empty, &empty).unwrap();
        assert!(format!("{:#}", read_meta(&path).unwrap_err()).contains("unet.depth"));
    }
}
