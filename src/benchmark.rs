//! `benchmark`: times the inference engine on this machine, as `serve` and `predict` run it
//! (the compiled plan on CPU): images per second and the latency of each model call, after a
//! warm-up, for a given batch size and thread count. Sizes a deployment without a script.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Result, ensure};
use candle_core::Device;
use serde::Serialize;

use crate::model::inference::{InferenceModel, InferenceOptions, available_cores};
use crate::engine::{PlanSummary, Precision};
use crate::model::{ModelSpec, ModelState};
use crate::model_store;
use crate::util::rng::Rng;

/// What to time.
#[derive(Debug, Clone)]
pub struct BenchmarkOptions {
    /// An exported model or version folder, a checkpoint or a run folder; `None` times an
    /// untrained model of `spec` (the speed does not depend on the weights).
    pub model: Option<PathBuf>,
    pub spec: ModelSpec,
    pub batch: usize,
    /// Threads of one model call (0 = one per core).
    pub threads: usize,
    pub iterations: usize,
    pub warmup: usize,
    pub device: Device,
    /// Converts the model to this precision for timing (`None`: the version's own).
    pub precision: Option<Precision>,
}

/// The measurement (`--json` prints it).
#[derive(Debug, Clone, Serialize)]
pub struct BenchmarkReport {
    /// The model folder, or `untrained` for a model built from the configuration.
    pub model: String,
    pub description: String,
    pub engine: String,
    pub device: String,
    pub batch: usize,
    pub threads: usize,
    /// The precision of the timed plan (`f32`, `bf16`).
    pub precision: Precision,
    pub iterations: usize,
    pub images_per_s: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub min_ms: f64,
    pub mean_ms: f64,
    /// Floating-point operations of one image as the layers define them.
    pub gflop_per_image: f64,
    /// `gflop_per_image × images_per_s` (Winograd layers do fewer multiplies than counted).
    pub gflop_per_s: f64,
    pub plan: Option<PlanSummary>,
}

/// Executes `segctl benchmark`.
pub fn benchmark(options: &BenchmarkOptions) -> Result<BenchmarkReport> {
    ensure!(options.batch >= 1, "--batch must be at least 1");
    ensure!(options.iterations >= 1, "--iterations must be at least 1");
    let (state, name, own, calibration) = match &options.model {
        Some(path) => {
            let loaded = model_store::load_any(path, &options.device)?;
            let (own, calibration) = (loaded.precision(), loaded.calibration());
            (loaded.state, path.display().to_string(), own, calibration)
        }
        None => (ModelState::new(&options.spec, &options.device, 1)?, "untrained".to_string(), Precision::F32, None),
    };
    let precision = options.precision.unwrap_or(own);
    ensure!(precision == Precision::F32 || options.device.is_cpu(), "--precision {precision} runs on the CPU engine only");
    let threads = if options.threads == 0 { available_cores() } else { options.threads };
    let size = state.spec.input_size;
    let mut rng = Rng::new(7);
    let input: Vec<f32> = (0..options.batch * 3 * size * size).map(|_| rng.normal()).collect();
    // An f32 model timed at int8 is calibrated on the timing input itself.
    let calibration = match (precision, calibration) {
        (Precision::Int8, None) => Some(std::sync::Arc::new(crate::model::inference::calibrate(&state, &input[..3 * size * size], 1)?)),
        (_, c) => c,
    };
    let model = InferenceModel::new(state, InferenceOptions { threads, precision: Some(precision), calibration, ..Default::default() })?;
    let spec = model.spec().clone();
    let mut out = Vec::new();
    for _ in 0..options.warmup {
        model.logits_into(&input, options.batch, &mut out)?;
    }
    let mut times = Vec::with_capacity(options.iterations);
    for _ in 0..options.iterations {
        let start = Instant::now();
        model.logits_into(&input, options.batch, &mut out)?;
        times.push(start.elapsed().as_secs_f64());
    }
    let mut sorted = times.clone();
    sorted.sort_by(f64::total_cmp);
    let quantile = |q: f64| sorted[((sorted.len() - 1) as f64 * q).round() as usize] * 1e3;
    let plan = model.plan_summary();
    let flops = plan.as_ref().map_or(0, |p| p.flops_per_image) as f64;
    let p50 = quantile(0.5);
    let images_per_s = options.batch as f64 / (p50 / 1e3);
    Ok(BenchmarkReport {
        model: name,
        description: spec.describe(),
        engine: model.engine(),
        device: crate::model::device_name(&options.device),
        batch: options.batch,
        threads,
        precision: model.precision(),
        iterations: options.iterations,
        images_per_s,
        p50_ms: p50,
        p90_ms: quantile(0.9),
        p99_ms: quantile(0.99),
        min_ms: sorted[0] * 1e3,
        mean_ms: times.iter().sum::<f64>() / times.len() as f64 * 1e3,
        gflop_per_image: flops / 1e9,
        gflop_per_s: flops / 1e9 * images_per_s,
        plan,
    })
}
