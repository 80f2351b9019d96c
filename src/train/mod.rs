//! `train`: the training loop, in burn-train's pieces. [`step`] is one training step (forward,
//! loss, backward, accumulation, clipping, AdamW, the weight average); this module's epoch loop
//! feeds it batches and, per epoch, runs the shared evaluation loop ([`crate::validation`]) on
//! the validation split; [`checkpointer`] writes checkpoints as its strategy decides;
//! [`early_stopping`] is the stopping rule; [`renderer`] shows progress; [`history`] writes
//! `metrics.jsonl`, `curves.png` and TensorBoard events. Resumption is exact: weights,
//! optimizer moments, the weight average, the position within the epoch and the RNG.

mod checkpointer;
mod early_stopping;
mod history;
mod renderer;
mod step;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use candle_core::Device;
use serde::{Deserialize, Serialize};

use self::checkpointer::{CheckpointKind, Checkpointer, EpochEnd, KeepLastAndBest};
use self::early_stopping::EarlyStopping;
use self::renderer::{Renderer, StepView};
use self::step::Learner;
use crate::checkpoint::{self, Checkpoint, EpochTotals, RunLayout, RunOrCheckpoint, TrainingProgress};
use crate::config::{Arch, Config};
use crate::data::pipeline::{self, Loader, LoaderConfig};
use crate::data::{PetDataset, Split};
use crate::loss::SegLoss;
use crate::metrics::SegmentationReport;
use crate::model::{self, ModelSpec, ModelState};
use crate::optim::{AdamW, WeightAverage, learning_rate};
use crate::progress::ProgressMode;
use crate::storage;
use crate::tensorboard::EventWriter;
use crate::util::rng::Rng;
use crate::validation::{eval_loader_config, evaluate_loader};

/// What `train` does.
#[derive(Debug, Clone)]
pub struct TrainOptions {
    pub config: Config,
    /// Continue from this checkpoint file or run folder.
    pub resume: Option<PathBuf>,
    pub device: Device,
    pub progress: ProgressMode,
    /// Set by a signal handler: save a checkpoint and stop after the current step.
    pub stop: Arc<AtomicBool>,
}

/// One line of `metrics.jsonl`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EpochRecord {
    pub epoch: usize,
    pub step: u64,
    pub lr: f64,
    pub train_loss: f64,
    pub train_pixel_accuracy: f64,
    pub train_images_per_s: f64,
    pub val_loss: Option<f64>,
    pub val_pixel_accuracy: Option<f64>,
    pub val_mean_iou: Option<f64>,
    pub val_per_class_iou: Option<BTreeMap<String, f64>>,
    pub epoch_seconds: f64,
    /// Batches of the epoch skipped because every sample in them was unreadable.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub skipped_batches: usize,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

/// What happened.
#[derive(Debug, Clone, Serialize)]
pub struct TrainReport {
    pub run_dir: PathBuf,
    pub device: String,
    pub model: String,
    pub parameters: usize,
    pub epochs_completed: usize,
    pub steps: u64,
    pub best_epoch: Option<usize>,
    pub best_val_mean_iou: Option<f64>,
    pub last: Option<EpochRecord>,
    /// Stopped by a signal (a checkpoint was written first).
    pub interrupted: bool,
    pub stopped_early: bool,
    pub resumed_from: Option<PathBuf>,
    /// Checkpoints of the run `--resume` passed over (newer but unloadable), with why.
    pub skipped_checkpoints: Vec<checkpoint::SkippedCheckpoint>,
    pub best_checkpoint: Option<PathBuf>,
    pub elapsed_s: f64,
}

impl EpochTotals {
    fn add(&mut self, loss: f64, correct: u64, pixels: u64, images: usize, seconds: f64) {
        self.loss_sum += loss;
        self.batches += 1;
        self.correct_pixels += correct;
        self.pixels += pixels;
        self.images += images;
        self.step_seconds += seconds;
    }
    fn mean_loss(&self) -> f64 {
        if self.batches == 0 { f64::NAN } else { self.loss_sum / self.batches as f64 }
    }
    fn accuracy(&self) -> f64 {
        if self.pixels == 0 { 0.0 } else { self.correct_pixels as f64 / self.pixels as f64 }
    }
    fn images_per_s(&self) -> f64 {
        if self.step_seconds <= 0.0 { 0.0 } else { self.images as f64 / self.step_seconds }
    }
}

/// The run folder a new run writes to.
fn new_run_dir(config: &Config) -> Result<RunLayout> {
    let name = run_name(config);
    if config.train.run_name.is_none() {
        // A timestamp names the run: claimed by exclusive creation (runs started in the same
        // second get `-2`, `-3`, …).
        let run = RunLayout::new(crate::util::fs::create_unique_dir(&config.train.output_dir, &name)?);
        crate::util::fs::create_dir_all(&run.checkpoints_dir())?;
        return Ok(run);
    }
    let run = RunLayout::new(config.train.output_dir.join(name));
    if run.checkpoints_dir().exists() {
        bail!(
            "run folder `{}` already holds checkpoints: continue it with `--resume {}` or pick another train.run_name",
            run.root.display(),
            run.root.display()
        );
    }
    crate::util::fs::create_dir_all(&run.checkpoints_dir())?;
    Ok(run)
}

/// How many suffixes (`-2`, `-3`, …) a timestamped run name tries in a bucket.
const MAX_RUN_CLAIMS: usize = 64;

/// A timestamped run in a bucket: its name is claimed by creating `<name>/.segctl-claim` only
/// if absent, as `export` claims versions, so trainings started in the same second on
/// different machines (whose local locks cannot see each other) get `<name>-2`, `<name>-3`, ….
fn claim_bucket_run(output: &storage::Remote, name: &str) -> Result<storage::Remote> {
    for k in 1..=MAX_RUN_CLAIMS {
        let candidate = if k == 1 { name.to_string() } else { format!("{name}-{k}") };
        let run = output.child(&candidate);
        if run.list()?.is_empty() && output.claim(&candidate)? {
            return Ok(run);
        }
    }
    bail!("no free run name `{name}-N` in `{}` after {MAX_RUN_CLAIMS} tries", output.url())
}

/// `--resume` without a path: the named run, or the run under `output_dir` with the most
/// recently written checkpoint.
pub fn default_resume_target(config: &Config) -> Result<PathBuf> {
    if let Some(name) = &config.train.run_name {
        return Ok(config.train.output_dir.join(name));
    }
    if let Some(remote) = storage::remote(&config.train.output_dir)? {
        let mut newest: Option<(i64, String)> = None;
        for run in remote.list_children()? {
            for object in remote.child(&run).child("checkpoints").list()? {
                if newest.as_ref().is_none_or(|(t, _)| object.modified > *t) {
                    newest = Some((object.modified, run.clone()));
                }
            }
        }
        return newest
            .map(|(_, run)| PathBuf::from(remote.child(&run).url()))
            .with_context(|| format!("no runs with checkpoints in `{}`", remote.url()));
    }
    let mut newest: Option<(std::time::SystemTime, PathBuf)> = None;
    for entry in std::fs::read_dir(&config.train.output_dir)
        .with_context(|| format!("no runs to resume in `{}`", config.train.output_dir.display()))?
        .flatten()
    {
        let run = RunLayout::new(entry.path());
        for (_, path) in run.epoch_checkpoints().into_iter().chain([(0, run.interrupted())]) {
            if let Ok(modified) = std::fs::metadata(&path).and_then(|m| m.modified()) {
                if newest.as_ref().is_none_or(|(t, _)| modified > *t) {
                    newest = Some((modified, run.root.clone()));
                }
            }
        }
    }
    newest.map(|(_, p)| p).with_context(|| format!("no runs with checkpoints in `{}`", config.train.output_dir.display()))
}

/// Where a run's files live: a local folder, or a bucket prefix whose local mirror the run
/// writes first and uploads after every epoch (each file one object, replaced whole).
struct RunPlace {
    run: RunLayout,
    sync: Option<storage::DirSync>,
    /// What the user sees as the run folder (the URL for a bucket).
    shown: PathBuf,
    /// This process's lock on the run folder (or its local mirror), held for the whole run.
    _lock: Option<crate::util::fs::DirLock>,
}

impl RunPlace {
    /// A new run under `train.output_dir`.
    fn create(config: &Config) -> Result<Self> {
        let Some(remote) = storage::remote(&config.train.output_dir)? else {
            let run = new_run_dir(config)?;
            let lock = Some(crate::util::fs::DirLock::acquire(&run.root, "training")?);
            return Ok(Self { shown: run.root.clone(), run, sync: None, _lock: lock });
        };
        let remote = match &config.train.run_name {
            Some(name) => remote.child(name),
            None => claim_bucket_run(&remote, &run_name(config))?,
        };
        if !remote.child("checkpoints").list()?.is_empty() {
            bail!(
                "run folder `{}` already holds checkpoints: continue it with `--resume {}` or pick another train.run_name",
                remote.url(),
                remote.url()
            );
        }
        // The local mirror is ours once locked: whatever an earlier run of that name left
        // there goes (not the lock another training on this machine may hold).
        let local = remote.cache_dir();
        crate::util::fs::create_dir_all(&local)?;
        let lock = crate::util::fs::DirLock::acquire(&local, "training")?;
        for entry in std::fs::read_dir(&local).with_context(|| format!("failed to read `{}`", local.display()))?.flatten() {
            if entry.file_name() == crate::util::fs::LOCK_FILE {
                continue;
            }
            let path = entry.path();
            let removed = if path.is_dir() { std::fs::remove_dir_all(&path) } else { std::fs::remove_file(&path) };
            removed.with_context(|| format!("failed to clear `{}`", path.display()))?;
        }
        let run = RunLayout::new(&local);
        crate::util::fs::create_dir_all(&run.checkpoints_dir())?;
        log::info!("run folder `{}` (written locally in `{}` and uploaded after every epoch)", remote.url(), local.display());
        let shown = PathBuf::from(remote.url());
        let mut sync = storage::DirSync::new(local, remote);
        sync.skip_top_level_prefix = Some(".segctl");
        Ok(Self { shown, run, sync: Some(sync), _lock: Some(lock) })
    }

    /// `--resume URL`: the run (or the run of the checkpoint) mirrored down; the local path to
    /// resume from.
    fn resume_remote(remote: storage::Remote) -> Result<(PathBuf, Self)> {
        // A checkpoint file's run is two levels up: <run>/checkpoints/<file>.
        let (run_remote, file) = match remote.split_last() {
            Some((dir, file)) if file.ends_with(".safetensors") => match dir.split_last() {
                Some((run, checkpoints)) if checkpoints == "checkpoints" => (run, Some(file)),
                _ => bail!("`{}` is not inside a run folder (<run>/checkpoints/)", remote.url()),
            },
            _ => (remote, None),
        };
        let local = storage::localize(Path::new(run_remote.url()))?;
        let lock = Some(crate::util::fs::DirLock::acquire(&local, "training")?);
        let mut sync = storage::DirSync::new(local.clone(), run_remote.clone());
        sync.skip_top_level_prefix = Some(".segctl");
        sync.assume_pushed()?;
        let target = match file {
            Some(f) => local.join("checkpoints").join(f),
            None => local.clone(),
        };
        Ok((target, Self { shown: PathBuf::from(run_remote.url()), run: RunLayout::new(&local), sync: Some(sync), _lock: lock }))
    }

    /// Uploads what changed (`summary.json` last).
    fn push(&mut self) -> Result<()> {
        if let Some(sync) = self.sync.as_mut() {
            let n = sync.push(&["summary.json"])?;
            log::debug!("uploaded {n} files to `{}`", sync.remote.url());
        }
        Ok(())
    }
}

fn run_name(config: &Config) -> String {
    match &config.train.run_name {
        Some(n) => n.clone(),
        None => crate::util::utc_timestamp().replace([':', '-'], "").replace('T', "-").trim_end_matches('Z').to_string(),
    }
}

/// Where a run starts: nothing (a new run) or the checkpoint `--resume` names, with the newer
/// checkpoints it passed over.
struct StartPoint {
    resumed: Option<Checkpoint>,
    skipped: Vec<checkpoint::SkippedCheckpoint>,
}

impl StartPoint {
    fn locate(resume: Option<&std::path::Path>, device: &Device) -> Result<Self> {
        let Some(path) = resume else { return Ok(Self { resumed: None, skipped: Vec::new() }) };
        match checkpoint::locate(path).context("--resume")? {
            RunOrCheckpoint::File(file) => Ok(Self { resumed: Some(checkpoint::load(&file, device)?), skipped: Vec::new() }),
            RunOrCheckpoint::Run(run) => {
                let (checkpoint, skipped) = run.load_latest(device)?;
                for s in &skipped {
                    log::warn!("skipped checkpoint `{}`: {}", s.path.display(), s.reason);
                }
                Ok(Self { resumed: Some(checkpoint), skipped })
            }
        }
    }

    /// The model a resumed run continues (it must be the one the config describes).
    fn spec(&self, config: &Config) -> Result<ModelSpec> {
        let wanted = ModelSpec::from_config(config);
        let Some(c) = &self.resumed else { return Ok(wanted) };
        if wanted.arch != c.meta.spec.arch || wanted.unet != c.meta.spec.unet || wanted.input_size != c.meta.spec.input_size {
            bail!(
                "the config describes {} but `{}` holds {}; resume with the run's own config",
                wanted.describe(),
                c.path.display(),
                c.meta.spec.describe()
            );
        }
        Ok(c.meta.spec.clone())
    }
}

/// The training and validation data.
struct Data {
    train_set: Arc<PetDataset>,
    val_set: Option<Arc<PetDataset>>,
    train: Loader,
    val: Option<Loader>,
    /// Loader batches an epoch trains on (all, or `max_steps_per_epoch` groups).
    batches_per_epoch: usize,
    /// Optimizer steps per epoch.
    steps_per_epoch: usize,
}

impl Data {
    fn open(config: &Config, spec: &ModelSpec) -> Result<Self> {
        let (d, t) = (&config.data, &config.train);
        let train_set = Arc::new(PetDataset::open(&d.root, Split::Train, d.val_fraction, d.seed)?);
        let val_set = if d.val_fraction > 0.0 { Some(Arc::new(PetDataset::open(&d.root, Split::Val, d.val_fraction, d.seed)?)) } else { None };
        let train = Loader::new(
            train_set.clone(),
            LoaderConfig {
                batch_size: t.batch_size,
                image_size: spec.input_size as u32,
                normalization: spec.normalization,
                shuffle: true,
                hflip: d.hflip,
                augment: Some(d.augment.clone()),
                seed: t.seed,
                drop_last: true,
                prefetch: d.prefetch_batches,
                cache_dir: d.cache_dir.clone(),
                workers: d.workers,
                memory_cache_bytes: d.memory_cache_mb << 20,
                jpeg_dct_scaling: config.serve.jpeg_dct_scaling,
            },
        )?;
        let accumulate = t.accumulate_steps;
        let batches_per_epoch = t.max_steps_per_epoch.map_or(train.batches_per_epoch(), |m| (m * accumulate).min(train.batches_per_epoch()));
        if batches_per_epoch == 0 {
            bail!("the train split has {} samples, fewer than one batch of {}", train_set.len(), t.batch_size);
        }
        let val = match &val_set {
            Some(v) => Some(Loader::new(v.clone(), eval_loader_config(config, spec, t.batch_size))?),
            None => None,
        };
        Ok(Self { train_set, val_set, train, val, batches_per_epoch, steps_per_epoch: step::steps_for(batches_per_epoch, accumulate) })
    }
}

/// Executes `segctl train`.
pub fn train(options: &TrainOptions) -> Result<TrainReport> {
    let start = Instant::now();
    let config = &options.config;
    let device = &options.device;
    let t = &config.train;
    if t.precision == crate::config::Precision::Bf16 && !device.is_cpu() {
        bail!("train.precision: bf16 runs on the CPU only in this version (the device is {})", crate::model::device_name(device));
    }
    // The convolutions' arithmetic for this process's training.
    crate::model::ops::fmap::set_bf16(t.precision == crate::config::Precision::Bf16);

    // A run in a bucket is mirrored down first and then continued like a local one.
    let (resume, remote_place) = match options.resume.as_deref().map(storage::remote).transpose()?.flatten() {
        Some(remote) => {
            let (target, place) = RunPlace::resume_remote(remote)?;
            (Some(target), Some(place))
        }
        None => (options.resume.clone(), None),
    };
    let start_point = StartPoint::locate(resume.as_deref(), device)?;
    let mut place = match (&start_point.resumed, remote_place) {
        (Some(_), Some(place)) => place,
        (Some(c), None) => {
            let run = RunLayout::new(checkpoint::run_of(&c.path).with_context(|| {
                format!("`{}` is not inside a run folder (<run>/checkpoints/)", c.path.display())
            })?);
            let lock = Some(crate::util::fs::DirLock::acquire(&run.root, "training")?);
            RunPlace { shown: run.root.clone(), run, sync: None, _lock: lock }
        }
        (None, _) => RunPlace::create(config)?,
    };
    let run = place.run.clone();
    // Temporary files of checkpoints and logs a killed run was writing.
    for dir in [run.root.clone(), run.checkpoints_dir()] {
        crate::util::fs::remove_leftovers(&dir, crate::util::fs::TEMP_PREFIX)?;
    }
    let spec = start_point.spec(config)?;
    let data = Data::open(config, &spec)?;
    let (learner, mut progress) = build_learner(config, &spec, device, &start_point, &run)?;

    // What the run writes down (config.yaml, checkpoints, digests) never holds credentials.
    let written_config = config.redacted();
    let config_digest = crate::util::sha256_hex(serde_yaml::to_string(&written_config)?.as_bytes());
    let dataset_digest = pipeline::dataset_digest(&data.train_set, spec.input_size as u32)?;
    let checkpointer = Checkpointer::new(
        run.clone(),
        spec.clone(),
        written_config,
        config_digest,
        dataset_digest,
        Box::new(KeepLastAndBest::from(&t.checkpoint)),
    );
    let mut history = history::read_history(&run.metrics_log(), progress.epochs_completed)?;
    history::rewrite_history(&run.metrics_log(), &history)?;
    log::info!(
        "training {} ({} parameters) on {} for {} epochs: {} train / {} val samples, {} steps per epoch{}, run folder {}",
        spec.describe(),
        learner.state.parameter_count(),
        model::device_name(device),
        t.epochs,
        data.train_set.len(),
        data.val_set.as_ref().map_or(0, |v| v.len()),
        data.steps_per_epoch,
        if t.accumulate_steps > 1 { format!(" ({} batches of {} per step)", t.accumulate_steps, t.batch_size) } else { String::new() },
        run.root.display()
    );
    // TensorBoard: a new event file per (re)start; a resumed run continues after its step.
    let events = if t.tensorboard { Some(EventWriter::create(&run.root, start_point.resumed.as_ref().map(|_| progress.step))?) } else { None };

    let mut epochs = EpochLoop {
        config,
        data: &data,
        learner,
        checkpointer: &checkpointer,
        early_stopping: EarlyStopping::new(&t.early_stopping),
        renderer: renderer::for_mode(options.progress),
        events,
        run: &run,
        place: &mut place,
        history: &mut history,
        stop: &options.stop,
    };
    let ending = epochs.run(&mut progress)?;
    let parameters = epochs.learner.state.parameter_count();

    let report = TrainReport {
        run_dir: place.shown.clone(),
        device: model::device_name(device),
        model: spec.describe(),
        parameters,
        epochs_completed: progress.epochs_completed,
        steps: progress.step,
        best_epoch: progress.best_epoch,
        best_val_mean_iou: progress.best_mean_iou.filter(|v| v.is_finite()),
        last: history.last().cloned(),
        interrupted: ending == Ending::Interrupted,
        stopped_early: ending == Ending::StoppedEarly,
        resumed_from: start_point.resumed.as_ref().map(|c| match (&place.sync, c.path.file_name()) {
            (Some(sync), Some(file)) => PathBuf::from(sync.remote.child("checkpoints").child(&file.to_string_lossy()).url()),
            _ => c.path.clone(),
        }),
        skipped_checkpoints: start_point.skipped,
        best_checkpoint: run.best().is_file().then(|| match &place.sync {
            Some(sync) => PathBuf::from(sync.remote.child("checkpoints/best.safetensors").url()),
            None => run.best(),
        }),
        elapsed_s: start.elapsed().as_secs_f64(),
    };
    crate::util::fs::write_atomic(&run.summary(), &serde_json::to_vec_pretty(&report)?)?;
    place.push()?;
    Ok(report)
}

/// The model, optimizer and weight average a run trains — fresh or as a checkpoint left them —
/// and where in the run it stands.
fn build_learner(config: &Config, spec: &ModelSpec, device: &Device, start: &StartPoint, run: &RunLayout) -> Result<(Learner, TrainingProgress)> {
    let t = &config.train;
    let state = ModelState::new(spec, device, t.seed)?;
    let mut optimizer;
    let progress = match &start.resumed {
        Some(c) => {
            // With a weight average, `model.*` is the average and `online.*` what trains.
            let trained = if c.online.is_empty() { &c.model } else { &c.online };
            state.assign(trained, &format!("checkpoint `{}`: ", c.path.display()))?;
            optimizer = AdamW::new(state.trainable_vars(), t.optimizer.clone())?;
            optimizer.load_state(&c.optimizer, c.meta.progress.step)?;
            let current = crate::util::sha256_hex(serde_yaml::to_string(&config.redacted())?.as_bytes());
            if current != c.meta.config_digest {
                log::warn!("the config differs from the one this run started with; continuing with the new values");
            }
            log::info!(
                "resuming `{}` at epoch {} (batch {}), step {}",
                c.path.display(),
                c.meta.progress.epochs_completed + 1,
                c.meta.progress.batch_in_epoch,
                c.meta.progress.step
            );
            c.meta.progress.clone()
        }
        None => {
            if spec.arch == Arch::Mobilenetv2Unet {
                if let Some(path) = model::resolve_encoder_weights(&config.model.encoder.weights)? {
                    let n = model::load_timm_encoder(&state, &path)?;
                    log::info!("loaded {n} pretrained encoder tensors from `{}`", path.display());
                }
            }
            optimizer = AdamW::new(state.trainable_vars(), t.optimizer.clone())?;
            crate::util::fs::write_atomic(&run.config(), serde_yaml::to_string(&config.redacted())?.as_bytes())?;
            TrainingProgress {
                epochs_completed: 0,
                step: 0,
                batch_in_epoch: 0,
                epoch_seed: 0,
                rng_state: Rng::new(t.seed).state(),
                best_mean_iou: None,
                best_epoch: None,
                epochs_without_improvement: 0,
                partial: EpochTotals::default(),
            }
        }
    };
    let average = match t.ema_decay {
        Some(decay) => {
            let average = ModelState::new(spec, device, t.seed)?;
            match &start.resumed {
                Some(c) => average.assign(&c.model, &format!("checkpoint `{}`: ", c.path.display()))?,
                None => average.assign(&state.named_tensors(), "")?,
            }
            let averager = WeightAverage::new(decay, average.named_vars(), state.named_vars())?;
            Some((average, averager))
        }
        None => None,
    };
    let loss = SegLoss::new(&t.loss, device)?;
    Ok((Learner::new(state, optimizer, average, loss, t.clip_grad_norm), progress))
}

/// How the epoch loop ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ending {
    Completed,
    StoppedEarly,
    Interrupted,
}

/// How one epoch's batches ended.
enum EpochOutcome {
    Finished { totals: EpochTotals, lr: f64, skipped_batches: usize },
    Interrupted,
}

/// The epoch loop: feeds the learner, validates, logs and checkpoints.
struct EpochLoop<'a> {
    config: &'a Config,
    data: &'a Data,
    learner: Learner,
    checkpointer: &'a Checkpointer,
    early_stopping: EarlyStopping,
    renderer: Box<dyn Renderer>,
    events: Option<EventWriter>,
    run: &'a RunLayout,
    place: &'a mut RunPlace,
    history: &'a mut Vec<EpochRecord>,
    stop: &'a AtomicBool,
}

impl EpochLoop<'_> {
    fn run(&mut self, progress: &mut TrainingProgress) -> Result<Ending> {
        let epochs = self.config.train.epochs;
        let mut rng = Rng::from_state(progress.rng_state);
        for epoch in progress.epochs_completed..epochs {
            let epoch_start = Instant::now();
            let (totals, lr, skipped_batches) = match self.train_epoch(epoch, progress, &mut rng)? {
                EpochOutcome::Finished { totals, lr, skipped_batches } => (totals, lr, skipped_batches),
                EpochOutcome::Interrupted => {
                    self.place.push()?;
                    return Ok(Ending::Interrupted);
                }
            };
            progress.epochs_completed = epoch + 1;
            progress.batch_in_epoch = 0;
            progress.partial = EpochTotals::default();
            let ending = self.end_epoch(epoch + 1, progress, &totals, lr, skipped_batches, epoch_start)?;
            self.place.push()?;
            if ending != Ending::Completed {
                return Ok(ending);
            }
        }
        Ok(Ending::Completed)
    }

    /// The batches of epoch `epoch` (0-based), from where `progress` stands.
    fn train_epoch(&mut self, epoch: usize, progress: &mut TrainingProgress, rng: &mut Rng) -> Result<EpochOutcome> {
        let t = &self.config.train;
        let (batches, steps_per_epoch, accumulate) = (self.data.batches_per_epoch, self.data.steps_per_epoch as u64, t.accumulate_steps);
        let total_steps = t.epochs as u64 * steps_per_epoch;
        let (epoch_seed, first_batch, mut totals) = if progress.batch_in_epoch > 0 {
            (progress.epoch_seed, progress.batch_in_epoch, progress.partial.clone())
        } else {
            (rng.next_u64(), 0, EpochTotals::default())
        };
        progress.epoch_seed = epoch_seed;
        progress.rng_state = rng.state();
        self.renderer.epoch_start(epoch + 1, t.epochs, batches, first_batch);
        let mut lr = learning_rate(t.optimizer.lr, &t.schedule, progress.step, steps_per_epoch, total_steps);
        let mut last_step_end = Instant::now();
        let mut skipped_batches = 0;
        // The group's losses, logged once per optimizer step.
        let (mut group_loss, mut group_batches) = (0.0, 0usize);
        for batch in self.data.train.epoch(epoch_seed, first_batch) {
            if batch.index >= batches {
                break;
            }
            lr = learning_rate(t.optimizer.lr, &t.schedule, progress.step, steps_per_epoch, total_steps);
            let group = step::group_len(batch.index, batches, accumulate);
            match self.learner.accumulate(&batch, group, progress.step)? {
                Some(b) => {
                    let now = Instant::now();
                    totals.add(b.loss, b.correct_pixels, b.pixels, batch.len(), (now - last_step_end).as_secs_f64());
                    last_step_end = now;
                    group_loss += b.loss;
                    group_batches += 1;
                }
                None => {
                    skipped_batches += 1;
                    log::warn!("skipping batch {} of epoch {}: none of its samples could be read", batch.index + 1, epoch + 1);
                }
            }
            progress.batch_in_epoch = batch.index + 1;
            if !step::closes_group(batch.index, batches, accumulate) {
                continue;
            }
            if let Some(out) = self.learner.step(lr, progress.step + 1)? {
                progress.step += 1;
                if let Some(events) = self.events.as_mut() {
                    let mut scalars = vec![("train/loss", group_loss / group_batches.max(1) as f64), ("train/learning_rate", lr)];
                    scalars.extend(out.grad_norm.map(|n| ("train/grad_norm", n)));
                    events.scalars(progress.step, &scalars)?;
                }
            }
            (group_loss, group_batches) = (0.0, 0);
            progress.partial = totals.clone();
            self.renderer.step(&StepView {
                batches_done: progress.batch_in_epoch,
                mean_loss: totals.mean_loss(),
                pixel_accuracy: totals.accuracy(),
                images_per_s: totals.images_per_s(),
                lr,
            });
            // Stops fall between optimizer steps, so no accumulated gradient is lost.
            if self.stop.load(Ordering::SeqCst) && progress.batch_in_epoch < batches {
                self.checkpointer.save(CheckpointKind::Interrupted, progress, &self.learner, None)?;
                log::warn!(
                    "stopped at epoch {} batch {} (step {}): checkpoint `{}`; continue with --resume {}",
                    epoch + 1,
                    progress.batch_in_epoch,
                    progress.step,
                    self.run.interrupted().display(),
                    self.place.shown.display()
                );
                return Ok(EpochOutcome::Interrupted);
            }
        }
        if totals.batches == 0 {
            bail!("epoch {}: no batch of the train split could be read", epoch + 1);
        }
        Ok(EpochOutcome::Finished { totals, lr, skipped_batches })
    }

    /// Validation, logs, early stopping and checkpoints after epoch `epoch` (1-based).
    fn end_epoch(&mut self, epoch: usize, progress: &mut TrainingProgress, totals: &EpochTotals, lr: f64, skipped_batches: usize, epoch_start: Instant) -> Result<Ending> {
        let t = &self.config.train;
        let evaluated = self.learner.evaluated();
        let val = match &self.data.val {
            Some(loader) => {
                let outcome = evaluate_loader(evaluated, loader, Some(self.learner.loss_fn()), ProgressMode::Hidden, "validate")?;
                Some((SegmentationReport::new(&outcome.confusion, &outcome.per_image, &evaluated.spec.class_names, outcome.samples), outcome.loss))
            }
            None => None,
        };
        let record = EpochRecord {
            epoch,
            step: progress.step,
            lr,
            train_loss: totals.mean_loss(),
            train_pixel_accuracy: totals.accuracy(),
            train_images_per_s: totals.images_per_s(),
            val_loss: val.as_ref().and_then(|v| v.1),
            val_pixel_accuracy: val.as_ref().map(|v| v.0.pixel_accuracy),
            val_mean_iou: val.as_ref().map(|v| v.0.mean_iou),
            val_per_class_iou: val.as_ref().map(|v| v.0.per_class_iou.clone()),
            epoch_seconds: epoch_start.elapsed().as_secs_f64(),
            skipped_batches,
        };
        history::append_history(&self.run.metrics_log(), &record)?;
        if let Some(events) = self.events.as_mut() {
            history::epoch_events(events, &record, self.data.val.as_ref().map(|l| (evaluated, l)))?;
        }
        self.history.push(record.clone());
        if let Err(e) = history::draw_curves(&self.run.curves(), self.history) {
            log::warn!("could not draw the training curves: {e:#}");
        }
        let verdict = self.early_stopping.observe(progress, epoch, record.val_mean_iou);
        let stop_requested = self.stop.load(Ordering::SeqCst);
        let last = epoch == t.epochs || verdict.stop || stop_requested;
        self.checkpointer.epoch_end(EpochEnd { epoch, improved: verdict.improved, last }, progress, &self.learner, record.val_mean_iou)?;
        self.renderer.epoch_end(&record, t.epochs, verdict.improved);
        if verdict.stop {
            log::info!("early stopping: no improvement for {} epochs", progress.epochs_without_improvement);
            return Ok(Ending::StoppedEarly);
        }
        if stop_requested {
            // A stop always leaves `interrupted.safetensors`, also between epochs (the periodic
            // checkpoint may not fall on this one).
            self.checkpointer.save(CheckpointKind::Interrupted, progress, &self.learner, record.val_mean_iou)?;
            log::warn!(
                "stopped after epoch {epoch}: checkpoint `{}`; continue with --resume {}",
                self.run.interrupted().display(),
                self.place.shown.display()
            );
            return Ok(Ending::Interrupted);
        }
        Ok(Ending::Completed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Arch, LossConfig, LossKind, OptimizerConfig};
    use candle_core::{DType, Tensor};

    fn batch(n: usize, size: usize, seed: u64) -> (Tensor, Tensor) {
        let mut rng = Rng::new(seed);
        let x: Vec<f32> = (0..n * 3 * size * size).map(|_| rng.normal()).collect();
        // Targets that depend on the input, so there is something to learn.
        let y: Vec<u32> = (0..n * size * size)
            .map(|i| {
                let (b, p) = (i / (size * size), i % (size * size));
                let v = x[b * 3 * size * size + p];
                if v > 0.5 { 0 } else if v < -0.5 { 1 } else { 2 }
            })
            .collect();
        (
            Tensor::from_vec(x, (n, 3, size, size), &Device::Cpu).unwrap(),
            Tensor::from_vec(y, (n, size, size), &Device::Cpu).unwrap().to_dtype(DType::U32).unwrap(),
        )
    }

    fn snapshot(state: &ModelState) -> BTreeMap<String, Vec<f32>> {
        state.named_tensors().into_iter().map(|(k, v)| (k, v.flatten_all().unwrap().to_vec1::<f32>().unwrap())).collect()
    }

    fn steps(state: &ModelState, steps: usize) -> (f32, f32) {
        let mut optimizer = AdamW::new(state.trainable_vars(), OptimizerConfig::default()).unwrap();
        let loss_fn = SegLoss::new(&LossConfig { kind: LossKind::CeDice, class_weights: None, dice_weight: 1.0 }, &Device::Cpu).unwrap();
        let (x, y) = batch(4, state.spec.input_size, 1);
        let mut first = None;
        let mut last = 0.0;
        for _ in 0..steps {
            let loss = loss_fn.compute(&state.forward(&x, true).unwrap(), &y).unwrap();
            last = loss.to_scalar::<f32>().unwrap();
            first.get_or_insert(last);
            optimizer.step(&loss.backward().unwrap(), 5e-3).unwrap();
        }
        (first.unwrap(), last)
    }

    #[test]
    fn training_steps_lower_the_loss_and_move_every_trainable_weight() {
        let mut config = Config::default();
        config.data.image_size = 32;
        config.model.unet.depth = 2;
        config.model.unet.base_width = 4;
        let state = ModelState::new(&ModelSpec::from_config(&config), &Device::Cpu, 2).unwrap();
        let before = snapshot(&state);
        let (first, last) = steps(&state, 8);
        assert!(last < first, "loss {first} -> {last}");
        let after = snapshot(&state);
        for (name, _) in state.trainable_vars() {
            assert_ne!(before[&name], after[&name], "{name} did not change");
        }
        for name in before.keys().filter(|n| n.contains("running_mean")) {
            assert_ne!(before[name], after[name], "{name}: statistics update in training");
        }
    }

    #[test]
    fn a_frozen_encoder_stays_frozen() {
        let mut config = Config::default();
        config.data.image_size = 32;
        config.model.arch = Arch::Mobilenetv2Unet;
        config.model.encoder.trainable = false;
        let state = ModelState::new(&ModelSpec::from_config(&config), &Device::Cpu, 3).unwrap();
        let before = snapshot(&state);
        steps(&state, 2);
        let after = snapshot(&state);
        for name in before.keys() {
            if name.starts_with("encoder.") {
                assert_eq!(before[name], after[name], "{name} changed although the encoder is frozen");
            } else if name.starts_with("decoder.") && !name.contains("running_") {
                assert_ne!(before[name], after[name], "{name} did not train");
            }
        }
    }
}
