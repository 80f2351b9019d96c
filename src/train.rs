//! `train`: the training loop. AdamW with a learning-rate schedule, per-epoch validation
//! (loss, pixel accuracy, mean IoU), atomic checkpoints (last K plus the best by validation
//! mIoU), exact resumption (weights, optimizer, position within the epoch, RNG), early
//! stopping, a graceful stop on Ctrl-C/SIGTERM, a JSON-lines metrics log and a curves PNG.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use candle_core::Device;
use serde::{Deserialize, Serialize};

use crate::checkpoint::{self, CheckpointMeta, EpochTotals, RunLayout, TrainingProgress};
use crate::config::{Arch, Config};
use crate::data::pipeline::{self, Loader, LoaderConfig};
use crate::data::{PetDataset, Split};
use crate::evaluate::{EvalModel, batch_tensors, evaluate_loader, eval_loader_config, predictions};
use crate::loss::SegLoss;
use crate::metrics::SegmentationReport;
use crate::model::{self, ModelSpec, ModelState};
use crate::optim::{AdamW, WeightAverage, learning_rate};
use crate::plot::{Panel, Series, write_chart};
use crate::progress::{ProgressMode, Unit};
use crate::tensorboard::EventWriter;
use crate::util::rng::Rng;

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
    let name = match &config.train.run_name {
        Some(n) => n.clone(),
        None => crate::util::utc_timestamp().replace([':', '-'], "").replace('T', "-").trim_end_matches('Z').to_string(),
    };
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

/// `--resume` without a path: the named run, or the run under `output_dir` with the most
/// recently written checkpoint.
pub fn default_resume_target(config: &Config) -> Result<PathBuf> {
    if let Some(name) = &config.train.run_name {
        return Ok(config.train.output_dir.join(name));
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

/// Executes `segctl train`.
pub fn train(options: &TrainOptions) -> Result<TrainReport> {
    let start = Instant::now();
    let config = &options.config;
    let device = &options.device;
    let t = &config.train;

    // Where we start from: a named file, or the newest checkpoint of a run that loads.
    let mut skipped_checkpoints = Vec::new();
    let resumed = match &options.resume {
        Some(path) if path.is_dir() => {
            let run = if path.join("checkpoints").is_dir() { RunLayout::new(path) } else { RunLayout::new(path.parent().unwrap_or(path)) };
            let (checkpoint, skipped) = run.load_latest(device)?;
            for s in &skipped {
                log::warn!("skipped checkpoint `{}`: {}", s.path.display(), s.reason);
            }
            skipped_checkpoints = skipped;
            Some(checkpoint)
        }
        Some(path) => Some(checkpoint::load(path, device)?),
        None => None,
    };
    let run = match &resumed {
        Some(c) => RunLayout::new(checkpoint::run_of(&c.path).with_context(|| {
            format!("`{}` is not inside a run folder (<run>/checkpoints/)", c.path.display())
        })?),
        None => new_run_dir(config)?,
    };
    // Temporary files of checkpoints and logs a killed run was writing.
    for dir in [run.root.clone(), run.checkpoints_dir()] {
        crate::util::fs::remove_leftovers(&dir, crate::util::fs::TEMP_PREFIX)?;
    }
    let spec = match &resumed {
        Some(c) => {
            let wanted = ModelSpec::from_config(config);
            if wanted.arch != c.meta.spec.arch || wanted.unet != c.meta.spec.unet || wanted.input_size != c.meta.spec.input_size {
                bail!(
                    "the config describes {} but `{}` holds {}; resume with the run's own config",
                    wanted.describe(),
                    c.path.display(),
                    c.meta.spec.describe()
                );
            }
            c.meta.spec.clone()
        }
        None => ModelSpec::from_config(config),
    };

    // Data.
    let root = &config.data.root;
    let train_set = Arc::new(PetDataset::open(root, Split::Train, config.data.val_fraction, config.data.seed)?);
    let val_set = if config.data.val_fraction > 0.0 {
        Some(Arc::new(PetDataset::open(root, Split::Val, config.data.val_fraction, config.data.seed)?))
    } else {
        None
    };
    let train_loader = Loader::new(
        train_set.clone(),
        LoaderConfig {
            batch_size: t.batch_size,
            image_size: spec.input_size as u32,
            normalization: spec.normalization,
            shuffle: true,
            hflip: config.data.hflip,
            augment: Some(config.data.augment.clone()),
            seed: t.seed,
            drop_last: true,
            prefetch: config.data.prefetch_batches,
            cache_dir: config.data.cache_dir.clone(),
            workers: config.data.workers,
            memory_cache_bytes: config.data.memory_cache_mb << 20,
        },
    )?;
    let steps_per_epoch = t.max_steps_per_epoch.map_or(train_loader.batches_per_epoch(), |m| m.min(train_loader.batches_per_epoch()));
    if steps_per_epoch == 0 {
        bail!("the train split has {} samples, fewer than one batch of {}", train_set.len(), t.batch_size);
    }
    let total_steps = (t.epochs * steps_per_epoch) as u64;

    // Model and optimizer.
    let state = ModelState::new(&spec, device, t.seed)?;
    let mut optimizer;
    let mut progress = match &resumed {
        Some(c) => {
            // With a weight average, `model.*` is the average and `online.*` what trains.
            let trained = if c.online.is_empty() { &c.model } else { &c.online };
            state.assign(trained, &format!("checkpoint `{}`: ", c.path.display()))?;
            optimizer = AdamW::new(state.trainable_vars(), t.optimizer.clone())?;
            optimizer.load_state(&c.optimizer, c.meta.progress.step)?;
            let current = crate::util::sha256_hex(serde_yaml::to_string(config)?.as_bytes());
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
            crate::util::fs::write_atomic(&run.config(), serde_yaml::to_string(config)?.as_bytes())?;
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
    // The weight average, when enabled: validated, checkpointed as `model.*` and exported.
    let average = match t.ema_decay {
        Some(decay) => {
            let average = ModelState::new(&spec, device, t.seed)?;
            match &resumed {
                Some(c) => average.assign(&c.model, &format!("checkpoint `{}`: ", c.path.display()))?,
                None => average.assign(&state.named_tensors(), "")?,
            }
            let averager = WeightAverage::new(decay, average.named_vars(), state.named_vars())?;
            Some((average, averager))
        }
        None => None,
    };
    let evaluated = average.as_ref().map_or(&state, |(a, _)| a);
    let val_loader = match &val_set {
        Some(v) => Some(Loader::new(v.clone(), eval_loader_config(config, &state.spec, t.batch_size))?),
        None => None,
    };
    let loss_fn = SegLoss::new(&t.loss, device)?;
    let config_digest = crate::util::sha256_hex(serde_yaml::to_string(config)?.as_bytes());
    let dataset_digest = pipeline::dataset_digest(&train_set, spec.input_size as u32)?;
    let mut history = read_history(&run.metrics_log(), progress.epochs_completed)?;
    rewrite_history(&run.metrics_log(), &history)?;

    log::info!(
        "training {} ({} parameters) on {} for {} epochs: {} train / {} val samples, {} steps per epoch, run folder {}",
        spec.describe(),
        state.parameter_count(),
        model::device_name(device),
        t.epochs,
        train_set.len(),
        val_set.as_ref().map_or(0, |v| v.len()),
        steps_per_epoch,
        run.root.display()
    );

    let save = |path: &Path, progress: &TrainingProgress, optimizer: &AdamW, val: Option<f64>| -> Result<()> {
        let meta = CheckpointMeta {
            format_version: checkpoint::FORMAT_VERSION,
            segctl_version: env!("CARGO_PKG_VERSION").into(),
            created: crate::util::utc_timestamp(),
            spec: spec.clone(),
            config: config.clone(),
            progress: progress.clone(),
            val_mean_iou: val,
            config_digest: config_digest.clone(),
            dataset_digest: dataset_digest.clone(),
        };
        let online = if average.is_some() { state.named_tensors() } else { Default::default() };
        checkpoint::save(path, &meta, &evaluated.named_tensors(), &optimizer.state_tensors(), &online)
    };

    // TensorBoard: a new event file per (re)start; a resumed run continues after its step.
    let mut events = if t.tensorboard { Some(EventWriter::create(&run.root, resumed.as_ref().map(|_| progress.step))?) } else { None };
    let mut rng = Rng::from_state(progress.rng_state);
    let mut interrupted = false;
    let mut stopped_early = false;
    let run_start = Instant::now();
    'epochs: for epoch in progress.epochs_completed..t.epochs {
        let (epoch_seed, first_batch, mut totals) = if progress.batch_in_epoch > 0 {
            (progress.epoch_seed, progress.batch_in_epoch, progress.partial.clone())
        } else {
            (rng.next_u64(), 0, EpochTotals::default())
        };
        progress.epoch_seed = epoch_seed;
        progress.rng_state = rng.state();
        let epoch_start = Instant::now();
        let bar = options.progress.bar(&format!("epoch {}/{}", epoch + 1, t.epochs), Some(steps_per_epoch as u64), Unit::Items("batches"));
        bar.set_position(first_batch as u64);
        let mut lr = learning_rate(t.optimizer.lr, &t.schedule, progress.step, steps_per_epoch as u64, total_steps);
        let mut last_step_end = Instant::now();
        for batch in train_loader.epoch(epoch_seed, first_batch) {
            if batch.index >= steps_per_epoch {
                break;
            }
            lr = learning_rate(t.optimizer.lr, &t.schedule, progress.step, steps_per_epoch as u64, total_steps);
            let (images, targets) = batch_tensors(&batch, device)?;
            let logits = state.forward(&images, true)?;
            let loss = loss_fn.compute(&logits, &targets)?;
            let grads = loss.backward()?;
            optimizer.step(&grads, lr)?;
            if let Some((_, averager)) = &average {
                averager.update(progress.step + 1)?;
            }
            let loss_value = loss.to_scalar::<f32>()? as f64;
            if !loss_value.is_finite() {
                bail!("training diverged: the loss is {loss_value} at step {}; lower train.optimizer.lr", progress.step);
            }
            let predicted = predictions(&logits)?;
            let correct = predicted.iter().zip(&batch.masks).filter(|(p, m)| p == m).count() as u64;
            let now = Instant::now();
            totals.add(loss_value, correct, predicted.len() as u64, batch.len(), (now - last_step_end).as_secs_f64());
            last_step_end = now;
            progress.step += 1;
            if let Some(events) = events.as_mut() {
                events.scalars(progress.step, &[("train/loss", loss_value), ("train/learning_rate", lr)])?;
            }
            progress.batch_in_epoch = batch.index + 1;
            progress.partial = totals.clone();
            bar.inc(1);
            bar.set_message(&format!(
                "loss {:.4} acc {:.1}% {:.1} img/s lr {lr:.2e}",
                totals.mean_loss(),
                100.0 * totals.accuracy(),
                totals.images_per_s()
            ));
            if options.stop.load(Ordering::SeqCst) {
                bar.finish();
                save(&run.interrupted(), &progress, &optimizer, None)?;
                log::warn!(
                    "stopped at epoch {} batch {} (step {}): checkpoint `{}`; continue with --resume {}",
                    epoch + 1,
                    progress.batch_in_epoch,
                    progress.step,
                    run.interrupted().display(),
                    run.root.display()
                );
                interrupted = true;
                break 'epochs;
            }
        }
        bar.finish();

        // End of epoch: validation, logs, checkpoints.
        progress.epochs_completed = epoch + 1;
        progress.batch_in_epoch = 0;
        progress.partial = EpochTotals::default();
        let val = match &val_loader {
            Some(loader) => {
                let outcome = evaluate_loader(evaluated, loader, Some(&loss_fn), ProgressMode::Hidden, "validate")?;
                Some((SegmentationReport::new(&outcome.confusion, &outcome.per_image, &spec.class_names, outcome.samples), outcome.loss))
            }
            None => None,
        };
        let record = EpochRecord {
            epoch: epoch + 1,
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
        };
        append_history(&run.metrics_log(), &record)?;
        if let Some(events) = events.as_mut() {
            epoch_events(events, &record, val_loader.as_ref().map(|l| (evaluated, l)))?;
        }
        history.push(record.clone());
        if let Err(e) = draw_curves(&run.curves(), &history) {
            log::warn!("could not draw the training curves: {e:#}");
        }
        // Without a validation split, the latest epoch counts as the best.
        let score = record.val_mean_iou.unwrap_or(f64::INFINITY);
        let improved = progress.best_mean_iou.is_none_or(|best| score > best + t.early_stopping.min_delta);
        if improved {
            progress.best_mean_iou = Some(score.min(1.0));
            progress.best_epoch = Some(epoch + 1);
            progress.epochs_without_improvement = 0;
        } else {
            progress.epochs_without_improvement += 1;
        }
        stopped_early = t.early_stopping.patience.is_some_and(|p| progress.epochs_without_improvement >= p);
        let last_epoch = epoch + 1 == t.epochs || stopped_early || options.stop.load(Ordering::SeqCst);
        if improved {
            save(&run.best(), &progress, &optimizer, record.val_mean_iou)?;
        }
        if (epoch + 1) % t.checkpoint.every_epochs == 0 || last_epoch {
            save(&run.epoch_checkpoint(epoch + 1), &progress, &optimizer, record.val_mean_iou)?;
            run.prune(t.checkpoint.keep_last)?;
        }
        log::info!(
            "epoch {}/{}: train loss {:.4} acc {:.1}% ({:.1} img/s){}, lr {:.2e}, {:.1}s{}",
            epoch + 1,
            t.epochs,
            record.train_loss,
            100.0 * record.train_pixel_accuracy,
            record.train_images_per_s,
            match (&record.val_loss, &record.val_pixel_accuracy, &record.val_mean_iou) {
                (Some(l), Some(a), Some(m)) => format!("; val loss {l:.4} acc {:.1}% mIoU {m:.4}", 100.0 * a),
                _ => String::new(),
            },
            lr,
            record.epoch_seconds,
            if improved && record.val_mean_iou.is_some() { " (best)" } else { "" }
        );
        if stopped_early {
            log::info!("early stopping: no improvement for {} epochs", progress.epochs_without_improvement);
            break;
        }
        if options.stop.load(Ordering::SeqCst) {
            // A stop always leaves `interrupted.safetensors`, also between epochs (the periodic
            // checkpoint may not fall on this one).
            save(&run.interrupted(), &progress, &optimizer, record.val_mean_iou)?;
            interrupted = true;
            log::warn!(
                "stopped after epoch {}: checkpoint `{}`; continue with --resume {}",
                epoch + 1,
                run.interrupted().display(),
                run.root.display()
            );
            break;
        }
    }

    let report = TrainReport {
        run_dir: run.root.clone(),
        device: model::device_name(device),
        model: spec.describe(),
        parameters: state.parameter_count(),
        epochs_completed: progress.epochs_completed,
        steps: progress.step,
        best_epoch: progress.best_epoch,
        best_val_mean_iou: progress.best_mean_iou.filter(|v| v.is_finite()),
        last: history.last().cloned(),
        interrupted,
        stopped_early,
        resumed_from: resumed.as_ref().map(|c| c.path.clone()),
        skipped_checkpoints,
        best_checkpoint: run.best().is_file().then(|| run.best()),
        elapsed_s: start.elapsed().as_secs_f64(),
    };
    log::debug!("training loop took {:.1}s", run_start.elapsed().as_secs_f64());
    crate::util::fs::write_atomic(&run.summary(), &serde_json::to_vec_pretty(&report)?)?;
    Ok(report)
}

/// Validation images shown in TensorBoard per epoch.
const TENSORBOARD_IMAGES: usize = 3;

/// An epoch's scalars (at its last step) and, with a validation split, a few validation photos
/// beside their true and predicted masks.
fn epoch_events(events: &mut EventWriter, record: &EpochRecord, val: Option<(&ModelState, &Loader)>) -> Result<()> {
    let step = record.step;
    let mut scalars = vec![
        ("epoch", record.epoch as f64),
        ("train/epoch_loss", record.train_loss),
        ("train/pixel_accuracy", record.train_pixel_accuracy),
        ("train/images_per_s", record.train_images_per_s),
    ];
    scalars.extend(record.val_loss.map(|v| ("val/loss", v)));
    scalars.extend(record.val_pixel_accuracy.map(|v| ("val/pixel_accuracy", v)));
    scalars.extend(record.val_mean_iou.map(|v| ("val/mean_iou", v)));
    let per_class: Vec<(String, f64)> = record.val_per_class_iou.iter().flatten().map(|(c, v)| (format!("val/iou/{c}"), *v)).collect();
    scalars.extend(per_class.iter().map(|(t, v)| (t.as_str(), *v)));
    events.scalars(step, &scalars)?;
    if let Some((model, loader)) = val {
        if let Some(batch) = loader.epoch(0, 0).find(|b| !b.is_empty()) {
            let (predicted, _) = model.predict(&batch, None)?;
            let spec = model.spec();
            for i in 0..batch.len().min(TENSORBOARD_IMAGES) {
                let figure = validation_figure(&batch, &predicted, i, &spec.normalization);
                events.image(step, &format!("val/{}", batch.stems[i]), &figure)?;
            }
        }
    }
    events.flush()
}

/// Photo | true mask | predicted mask of sample `i` of a batch (normalized input undone).
fn validation_figure(batch: &pipeline::Batch, predicted: &[u8], i: usize, norm: &crate::data::transform::Normalization) -> image::RgbImage {
    let s = batch.size;
    let plane = s * s;
    let img = &batch.images[i * 3 * plane..][..3 * plane];
    let photo = image::RgbImage::from_fn(s as u32, s as u32, |x, y| {
        let at = y as usize * s + x as usize;
        image::Rgb(std::array::from_fn(|c| ((img[c * plane + at] * norm.std[c] + norm.mean[c]) * 255.0).round().clamp(0.0, 255.0) as u8))
    });
    let as_mask = |ids: &[u8]| image::GrayImage::from_raw(s as u32, s as u32, ids.to_vec()).expect("a mask per sample");
    let truth = crate::data::transform::colorize(&as_mask(&batch.masks[i * plane..][..plane]));
    let pred = crate::data::transform::colorize(&as_mask(&predicted[i * plane..][..plane]));
    let gap = 4;
    let mut out = image::RgbImage::from_pixel(3 * s as u32 + 2 * gap, s as u32, image::Rgb([255, 255, 255]));
    for (k, panel) in [photo, truth, pred].iter().enumerate() {
        image::imageops::overlay(&mut out, panel, (k as u32 * (s as u32 + gap)) as i64, 0);
    }
    out
}

/// Records of epochs up to `up_to` from an existing log (a resumed run drops what came after
/// its checkpoint, so the log never holds an epoch twice).
fn read_history(path: &Path, up_to: usize) -> Result<Vec<EpochRecord>> {
    let Ok(text) = std::fs::read_to_string(path) else { return Ok(Vec::new()) };
    Ok(text
        .lines()
        .filter_map(|l| serde_json::from_str::<EpochRecord>(l).ok())
        .filter(|r| r.epoch <= up_to)
        .collect())
}

fn rewrite_history(path: &Path, records: &[EpochRecord]) -> Result<()> {
    let mut text = String::new();
    for r in records {
        text.push_str(&serde_json::to_string(r)?);
        text.push('\n');
    }
    crate::util::fs::write_atomic(path, text.as_bytes())
}

fn append_history(path: &Path, record: &EpochRecord) -> Result<()> {
    use std::io::Write;
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("failed to open `{}`", path.display()))?;
    writeln!(file, "{}", serde_json::to_string(record)?).with_context(|| format!("failed to write `{}`", path.display()))
}

/// Loss and metric curves, one panel each.
pub fn draw_curves(path: &Path, history: &[EpochRecord]) -> Result<()> {
    let series = |label, color, f: &dyn Fn(&EpochRecord) -> Option<f64>| Series {
        label,
        color,
        points: history.iter().filter_map(|r| f(r).map(|v| (r.epoch as f64, v))).collect(),
    };
    let loss = Panel {
        title: "loss",
        x_label: "epoch",
        series: vec![
            series("train", [31, 119, 180], &|r| Some(r.train_loss)),
            series("val", [255, 127, 14], &|r| r.val_loss),
        ],
        y_range: None,
        integer_x: true,
    };
    let metrics = Panel {
        title: "accuracy and mean IoU",
        x_label: "epoch",
        series: vec![
            series("train acc", [31, 119, 180], &|r| Some(r.train_pixel_accuracy)),
            series("val acc", [255, 127, 14], &|r| r.val_pixel_accuracy),
            series("val miou", [44, 160, 44], &|r| r.val_mean_iou),
        ],
        y_range: Some((0.0, 1.0)),
        integer_x: true,
    };
    write_chart(path, &[loss, metrics])
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
