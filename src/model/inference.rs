//! A trained network made ready to run: on CPU its graph compiled once into a
//! [`engine::Plan`] (the candle model is dropped), elsewhere candle's eval forward. Used by
//! `evaluate` of a saved model and, through `infer::Predictor`, by `predict` and `serve`.

use std::sync::{Arc, Mutex};

use anyhow::{Context, Result, ensure};
use candle_core::{Device, Tensor};

use crate::engine::{self, Plan, PlanOptions, PlanSummary, Precision, Session};
use super::{ModelSpec, ModelState};

/// How to prepare a model for inference.
#[derive(Debug, Clone)]
pub struct InferenceOptions {
    /// Threads one model call may use (0 = one per core).
    pub threads: usize,
    /// Spin rounds the plan's worker threads wait for the next call before sleeping (`None` =
    /// the engine's default, best for back-to-back calls; a server passes a small number so
    /// idle inference threads leave the cores to the request stages).
    pub idle_spin: Option<usize>,
    /// Compile the large-batch kernels on the first batch of 4 or more (faster there, but
    /// their re-packed weights can double the plan's memory: `mobilenetv2_unet` +170 MB).
    pub large_batch_kernels: bool,
    /// The arithmetic of the plan's convolutions; `None`: an exported version's own
    /// `precision` (see [`crate::infer::Predictor::from_loaded`]), f32 for a bare state.
    pub precision: Option<Precision>,
    /// The activation ranges an int8 plan quantizes with (an int8 version's own, from its
    /// `model.yaml`; see [`calibrate`]).
    pub calibration: Option<Arc<engine::Calibration>>,
}

impl Default for InferenceOptions {
    fn default() -> Self {
        Self { threads: 0, idle_spin: None, large_batch_kernels: true, precision: None, calibration: None }
    }
}

impl From<crate::config::Precision> for Precision {
    fn from(p: crate::config::Precision) -> Precision {
        match p {
            crate::config::Precision::F32 => Precision::F32,
            crate::config::Precision::Bf16 => Precision::Bf16,
            crate::config::Precision::Int8 => Precision::Int8,
        }
    }
}

/// The activation ranges of `state`'s convolution inputs over `images` (`n` normalized
/// images of `spec.input_size`², one at a time through the f32 plan): what an int8 plan of
/// it quantizes with.
pub fn calibrate(state: &ModelState, images: &[f32], n: usize) -> Result<engine::Calibration> {
    let size = state.spec.input_size;
    let graph = state.model.lower().context("failed to describe the model for the inference engine")?;
    let plan = Arc::new(Plan::compile(&graph, &PlanOptions::new(size, size)).context("failed to compile the f32 calibration plan")?);
    let per = plan.input_len();
    ensure!(n > 0 && images.len() == n * per, "calibration needs at least one {size}² image");
    let mut session = Session::new(plan, 1)?;
    let mut calibration = engine::Calibration::default();
    for image in images.chunks(per) {
        calibration.merge(&session.observe(image, 1)?);
    }
    Ok(calibration)
}

/// The number of cores this process may use.
pub fn available_cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

enum Backend {
    /// The compiled plan, and idle sessions (one is taken per concurrent call).
    Plan { plan: Arc<Plan>, sessions: Mutex<Vec<Session>>, threads: usize, idle_spin: Option<usize>, large_batch_kernels: bool },
    Candle(ModelState),
}

/// A network ready for inference.
pub struct InferenceModel {
    spec: ModelSpec,
    backend: Backend,
}

impl InferenceModel {
    /// Prepares `state`: on CPU, compiles its plan for `spec.input_size`² inputs.
    pub fn new(state: ModelState, options: InferenceOptions) -> Result<Self> {
        let spec = state.spec.clone();
        if !state.device.is_cpu() {
            return Ok(Self { spec, backend: Backend::Candle(state) });
        }
        let graph = state.model.lower().context("failed to describe the model for the inference engine")?;
        drop(state);
        let precision = options.precision.unwrap_or_default();
        let mut plan_options = PlanOptions::new(spec.input_size, spec.input_size).with_precision(precision);
        if precision == Precision::Int8 {
            let calibration = options.calibration.clone().context("an int8 model needs its calibration (an int8 version carries it in model.yaml)")?;
            plan_options = plan_options.int8(calibration);
        }
        let plan = Plan::compile(&graph, &plan_options)
            .with_context(|| format!("failed to compile the {precision} inference plan"))?;
        ensure!(
            plan.out_size == (spec.input_size, spec.input_size) && plan.out_channels == spec.num_classes(),
            "the network's logits are {}×{:?}, expected {}×{}²",
            plan.out_channels,
            plan.out_size,
            spec.num_classes(),
            spec.input_size
        );
        let threads = if options.threads == 0 { available_cores() } else { options.threads };
        drop(graph);
        // Loading held the checkpoint, the candle model and the graph: give that memory back.
        crate::util::release_free_memory();
        Ok(Self { spec, backend: Backend::Plan { plan: Arc::new(plan), sessions: Mutex::new(Vec::new()), threads, idle_spin: options.idle_spin, large_batch_kernels: options.large_batch_kernels } })
    }

    /// The precision the model runs at (f32 off the CPU: candle's forward).
    pub fn precision(&self) -> Precision {
        match &self.backend {
            Backend::Plan { plan, .. } => plan.precision,
            Backend::Candle(_) => Precision::F32,
        }
    }

    pub fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    /// `plan` (the kernel set is named) or `candle`.
    pub fn engine(&self) -> String {
        match &self.backend {
            Backend::Plan { plan, .. } => match (plan.bf16_unit.map(|u| u.name()), plan.int8_unit.map(|u| u.name())) {
                (Some(unit), _) | (None, Some(unit)) => format!("plan ({}, {} on {})", plan.isa.name(), plan.precision, unit),
                (None, None) => format!("plan ({})", plan.isa.name()),
            },
            Backend::Candle(_) => "candle".into(),
        }
    }

    /// What the compiled plan holds (`None` when candle runs the model).
    pub fn plan_summary(&self) -> Option<PlanSummary> {
        match &self.backend {
            Backend::Plan { plan, .. } => Some(plan.summary()),
            Backend::Candle(_) => None,
        }
    }

    /// Logits `[n, classes, S, S]` for a normalized batch `[n, 3, S, S]`, appended to `out`
    /// (cleared first).
    pub fn logits_into(&self, input: &[f32], n: usize, out: &mut Vec<f32>) -> Result<()> {
        self.logits_into_threads(input, n, 0, out)
    }

    /// Threads one call uses at most (the plan's `threads` option).
    pub fn max_threads(&self) -> usize {
        match &self.backend {
            Backend::Plan { threads, .. } => *threads,
            Backend::Candle(_) => 1,
        }
    }

    /// [`Self::logits_into`] on `threads` threads (0 or more than [`Self::max_threads`] = the
    /// maximum): a server passes the cores its CPU budget has free.
    pub fn logits_into_threads(&self, input: &[f32], n: usize, threads: usize, out: &mut Vec<f32>) -> Result<()> {
        let size = self.spec.input_size;
        ensure!(input.len() == n * 3 * size * size, "input has {} values, the model expects {n}×3×{size}×{size}", input.len());
        out.clear();
        if n == 0 {
            return Ok(());
        }
        match &self.backend {
            Backend::Plan { plan, sessions, threads: max, idle_spin, large_batch_kernels } => {
                let want = if threads == 0 { *max } else { threads.min(*max) };
                // Every session has the full team; a call runs on `want` of its threads, so one
                // arena serves every thread count.
                let idle = sessions.lock().unwrap_or_else(|e| e.into_inner()).pop();
                let mut session = match idle {
                    Some(s) => s,
                    None => {
                        let mut s = Session::new(Arc::clone(plan), *max)?;
                        if let Some(rounds) = idle_spin {
                            s.set_idle_spin(*rounds);
                        }
                        s.set_large_batch_kernels(*large_batch_kernels);
                        s
                    }
                };
                let result = session.run_threads(input, n, want).map(|logits| out.extend_from_slice(logits));
                sessions.lock().unwrap_or_else(|e| e.into_inner()).push(session);
                result
            }
            Backend::Candle(state) => {
                let batch = Tensor::from_slice(input, (n, 3, size, size), &Device::Cpu)?.to_device(&state.device)?;
                let logits = state.forward(&batch, false).context("inference failed")?;
                out.extend(logits.to_device(&Device::Cpu)?.flatten_all()?.to_vec1::<f32>()?);
                Ok(())
            }
        }
    }

    /// [`Self::logits_into`] into a new vector.
    pub fn logits(&self, input: &[f32], n: usize) -> Result<Vec<f32>> {
        let mut out = Vec::new();
        self.logits_into(input, n, &mut out)?;
        Ok(out)
    }

    /// Bytes the idle sessions hold (arenas, scratch).
    pub fn session_bytes(&self) -> usize {
        match &self.backend {
            Backend::Plan { sessions, .. } => sessions.lock().unwrap_or_else(|e| e.into_inner()).iter().map(|s| s.memory_bytes()).sum(),
            Backend::Candle(_) => 0,
        }
    }
}

/// Class ids `[n·S·S]` from logits `[n, classes, S, S]` (first maximum wins).
pub fn argmax_classes(logits: &[f32], classes: usize, plane: usize) -> Vec<u8> {
    let images = logits.len() / (classes * plane).max(1);
    let mut out = vec![0u8; images * plane];
    for i in 0..images {
        let base = &logits[i * classes * plane..][..classes * plane];
        let dst = &mut out[i * plane..][..plane];
        let mut best: Vec<f32> = base[..plane].to_vec();
        for c in 1..classes {
            for (p, (b, d)) in best.iter_mut().zip(dst.iter_mut()).enumerate() {
                let v = base[c * plane + p];
                if v > *b {
                    *b = v;
                    *d = c as u8;
                }
            }
        }
    }
    out
}

/// The instruction set the plan's kernels use on this machine.
pub fn kernel_isa() -> Result<&'static str> {
    Ok(engine::Isa::active()?.name())
}
