//! The compiled inference plan: what [`Plan::compile`](super::compile) makes of a
//! [`Graph`](super::graph::Graph) and what a [`Session`](super::session::Session) runs.
//!
//! Steps work on padded NHWC maps (one zero pixel around each image, so 3×3 taps never test
//! bounds), each buffer at an offset in one arena; offsets are in floats *per image*, so one
//! plan serves every batch size.

use anyhow::Result;
use serde::Serialize;

use super::Isa;
use super::bf16::{Bf16Conv, Bf16Unit};
use super::graph::NodeId;
use super::int8::{Int8Conv, Int8Unit};
use super::conv::{DirectConv, Positions, SmallKConv, Split};
use super::graph::ConvOp;
use super::pool::{DepthwiseStep, EltwiseStep, InputStep, MaxPoolStep, OutputStep};
use super::winograd::WinogradConv;

/// A map in the arena: `h × w` pixels (plus the zero border) of channels `c0..c0 + c` in a
/// buffer of `cs` channels per pixel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct View {
    pub buffer: usize,
    pub h: usize,
    pub w: usize,
    pub cs: usize,
    pub c0: usize,
    pub c: usize,
}

/// Floats a kernel may read past the last image of a map `w` pixels wide with `cs` channels
/// per pixel (tiles of up to 24 pixels, two pixels apart when strided, plus two rows).
pub fn slack_floats(w: usize, cs: usize) -> usize {
    (64 + 2 * (w + 2)) * cs
}

impl View {
    /// Padded pixels per image.
    pub fn positions(&self) -> usize {
        (self.h + 2) * (self.w + 2)
    }
}

/// One buffer of the arena.
#[derive(Debug, Clone, Serialize)]
pub struct Buffer {
    pub h: usize,
    pub w: usize,
    pub cs: usize,
    /// Floats per image, zero border included.
    pub per_image: usize,
    /// Floats past the end that kernels may read (and ignore).
    pub slack: usize,
    /// Offset in floats per image of batch.
    pub offset: usize,
    /// Steps that write first and read last.
    pub first: usize,
    pub last: usize,
}

/// Raw pointers a step works with during one call: where each buffer's first image starts
/// (a plan's arena at each buffer's offset, or separate allocations of a caller's own).
pub struct Ctx {
    bases: *const usize,
    pub n: usize,
    pub input: *const f32,
    pub output: *mut f32,
}

// SAFETY: a Ctx is shared by the threads of one call; steps write disjoint parts of the
// buffers (separate items), and the buffers it points to outlive the call.
unsafe impl Sync for Ctx {}

impl Ctx {
    /// A context over `bases[b]`, the address of image 0 of buffer `b` (as `usize`), for a
    /// batch of `n`.
    ///
    /// # Safety
    /// `bases` must outlive the context, and every step run with it must find the buffers it
    /// names at those addresses, each holding `n` images (and the buffer's slack).
    pub unsafe fn new(bases: &[usize], n: usize, input: *const f32, output: *mut f32) -> Ctx {
        Ctx { bases: bases.as_ptr(), n, input, output }
    }

    /// The first float of `view` (image 0, padded position 0, channel `c0`).
    ///
    /// # Safety
    /// `view.buffer` must be a buffer of this context.
    #[inline(always)]
    pub unsafe fn ptr(&self, view: &View) -> *mut f32 {
        unsafe { (*self.bases.add(view.buffer) as *mut f32).add(view.c0) }
    }
}

/// What a step computes.
#[derive(Debug, Clone)]
pub enum StepKind {
    Input(InputStep),
    Output(OutputStep),
    Direct(DirectConv),
    SmallK(SmallKConv),
    Winograd(WinogradConv),
    Depthwise(DepthwiseStep),
    MaxPool(MaxPoolStep),
    Eltwise(EltwiseStep),
    Bf16(Bf16Conv),
    Int8(Int8Conv),
}

/// One step of the plan.
#[derive(Debug, Clone)]
pub struct Step {
    pub kind: StepKind,
    /// The kernel for batches of [`LARGE_BATCH`] and more, where it differs (Winograd's
    /// larger weights pay only when reused over more images): built on the first such batch,
    /// so a server that only ever sees single images never holds its weights.
    pub alt: Option<Box<LazyKernel>>,
    /// Buffers whose zero border this step writes (it writes them first).
    pub zero_borders: Vec<usize>,
    /// Floating-point operations per image (multiply-adds count two).
    pub flops: u64,
    /// The graph node whose map a convolution step reads (for calibration).
    pub source: Option<NodeId>,
}

/// Batches from this size on run each step's `alt` kernel.
pub const LARGE_BATCH: usize = 4;

impl Step {
    /// The map a convolution step reads.
    pub fn input_view(&self) -> Option<View> {
        match &self.kind {
            StepKind::Direct(d) => Some(d.input),
            StepKind::SmallK(d) => Some(d.input),
            StepKind::Winograd(d) => Some(d.input),
            StepKind::Depthwise(d) => Some(d.input),
            StepKind::Bf16(d) => Some(d.input),
            StepKind::Int8(d) => Some(d.input),
            _ => None,
        }
    }

    /// Kernel name, for summaries.
    pub fn name(&self) -> &'static str {
        kind_name(&self.kind)
    }

    /// The kernel a batch of `n` runs (the large-batch one only once built).
    pub fn for_batch(&self, n: usize) -> &StepKind {
        match self.alt.as_ref().and_then(|a| a.built.get()) {
            Some(alt) if n >= LARGE_BATCH => alt,
            _ => &self.kind,
        }
    }
}

/// A kernel compiled on first use, from the layer it computes.
#[derive(Debug)]
pub struct LazyKernel {
    pub(super) conv: ConvOp,
    pub(super) input: View,
    pub(super) output: View,
    pub(super) residual: Option<View>,
    pub(super) up: usize,
    pub(super) lanes: usize,
    pub(super) policy: WinogradPolicy,
    pub(super) built: std::sync::OnceLock<StepKind>,
}

impl Clone for LazyKernel {
    fn clone(&self) -> Self {
        let built = std::sync::OnceLock::new();
        if let Some(k) = self.built.get() {
            let _ = built.set(k.clone());
        }
        Self { conv: self.conv.clone(), input: self.input, output: self.output, residual: self.residual, up: self.up, lanes: self.lanes, policy: self.policy, built }
    }
}

impl LazyKernel {
    pub(super) fn build(&self) -> Result<&StepKind> {
        if let Some(k) = self.built.get() {
            return Ok(k);
        }
        let kind = super::compile::lower_conv(&self.conv, self.input, self.output, self.residual, self.up, self.lanes, self.policy, LARGE_BATCH.max(8))?;
        Ok(self.built.get_or_init(|| kind))
    }
}

/// Kernel name of a step kind.
pub fn kind_name(kind: &StepKind) -> &'static str {
    match kind {
            StepKind::Input(_) => "input",
            StepKind::Output(_) => "output",
            StepKind::Direct(d) => match d.positions {
                Positions::Flat { up: 2 } => "direct-phases",
                Positions::Flat { .. } => "direct",
                Positions::Strided { .. } => "direct-strided",
                Positions::Rows { up: 2 } => "direct-phases-rows",
                Positions::Rows { .. } => "direct-rows",
            },
            StepKind::SmallK(_) => "dot",
            StepKind::Winograd(w) => match (w.transform.m, w.transform.r, w.stride) {
                (4, 3, _) => "winograd-f4x4-3x3",
                (2, 2, 1) => "winograd-f2x2-2x2",
                (3, 2, 1) => "winograd-f3x3-2x2",
                (_, _, 1) => "winograd-f4x4-2x2",
                (2, 2, _) => "winograd-gather-f2x2-2x2",
                (3, 2, _) => "winograd-gather-f3x3-2x2",
                _ => "winograd-gather-f4x4-2x2",
            },
            StepKind::Depthwise(_) => "depthwise",
            StepKind::MaxPool(_) => "maxpool",
            StepKind::Eltwise(e) => {
                if e.b.is_some() {
                    "add"
                } else {
                    "copy"
                }
            }
            StepKind::Bf16(b) => match b.unit {
                Bf16Unit::Amx => "bf16-amx",
                Bf16Unit::Avx512Bf16 => "bf16-avx512",
                Bf16Unit::Portable => "bf16-portable",
            },
            StepKind::Int8(i) => match i.unit {
                Int8Unit::Avx512Vnni => "int8-avx512vnni",
                Int8Unit::AvxVnni => "int8-avxvnni",
                Int8Unit::Avx2 => "int8-avx2",
                Int8Unit::Portable => "int8-portable",
            },
    }
}

impl StepKind {
    /// Runs work item `item` of `split`.
    ///
    /// # Safety
    /// `ctx` holds the step's buffers for a batch of `ctx.n`; `scratch` holds the step's
    /// scratch floats; the instruction set of `S` is available.
    #[inline(always)]
    pub unsafe fn run_item<S: super::simd::Simd>(&self, ctx: &Ctx, split: Split, item: usize, scratch: *mut f32) {
        unsafe {
            match self {
                StepKind::Input(s) => s.run(ctx, item),
                StepKind::Output(s) => s.run(ctx, item),
                StepKind::Direct(s) => s.run::<S>(ctx, split, item),
                StepKind::SmallK(s) => s.run::<S>(ctx, split, item),
                StepKind::Winograd(s) => s.run::<S>(ctx, split, item, scratch),
                StepKind::Depthwise(s) => s.run::<S>(ctx, item),
                StepKind::MaxPool(s) => s.run::<S>(ctx, item),
                StepKind::Eltwise(s) => s.run::<S>(ctx, item),
                StepKind::Bf16(s) => s.run(ctx, split, item, scratch),
                StepKind::Int8(s) => s.run::<S>(ctx, split, item, scratch),
            }
        }
    }

    pub(super) fn split(&self, n: usize, threads: usize) -> Split {
        match self {
            StepKind::Direct(d) => d.split(n, threads),
            StepKind::SmallK(s) => s.split(n, threads),
            StepKind::Winograd(w) => w.split(n, threads),
            StepKind::Bf16(b) => b.split(n, threads),
            StepKind::Int8(b) => b.split(n, threads),
            _ => Split { groups: 1, chunks: 1 },
        }
    }

    pub(super) fn compute_items(&self, n: usize, split: Split) -> usize {
        match self {
            StepKind::Input(s) => s.items(n),
            StepKind::Output(s) => s.items(n),
            StepKind::Direct(d) => d.items(split),
            StepKind::SmallK(s) => s.items(split),
            StepKind::Winograd(w) => w.items(split),
            StepKind::Depthwise(s) => s.items(n),
            StepKind::MaxPool(s) => s.items(n),
            StepKind::Eltwise(s) => s.items(n),
            StepKind::Bf16(b) => b.items(split),
            StepKind::Int8(b) => b.items(split),
        }
    }
}

/// When to use Winograd convolutions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WinogradPolicy {
    /// Where the cost model expects it to pay.
    Auto,
    Never,
    /// Every layer it can run.
    Always,
    /// Every layer it can run with tiles of `m×m` outputs (where the map holds one): tests.
    Tile(usize),
    /// As `Auto`, for weights packed anew on every call (training, whose weights change every
    /// step): the packing counts too, on one of `threads` threads.
    AutoRepacked { threads: usize },
}

/// The arithmetic of a plan's convolutions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// f32 throughout.
    #[default]
    F32,
    /// Convolution operands (weights and activations) rounded to bfloat16, sums in f32; the
    /// logits, depthwise layers, pooling and sums stay f32.
    Bf16,
    /// Convolutions in int8 (weights per output channel, activations per tensor from a
    /// [`Calibration`]), exact integer sums; what `Bf16` keeps in f32 stays f32, and so does
    /// every convolution whose input has no calibrated range.
    Int8,
}

impl Precision {
    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
            Precision::Int8 => "int8",
        }
    }

    pub fn parse(text: &str) -> Result<Precision> {
        match text.trim().to_ascii_lowercase().as_str() {
            "f32" | "fp32" | "float32" => Ok(Precision::F32),
            "bf16" | "bfloat16" => Ok(Precision::Bf16),
            "int8" | "i8" => Ok(Precision::Int8),
            other => anyhow::bail!("precision {other:?}: expected f32, bf16 or int8"),
        }
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// How to compile.
#[derive(Debug, Clone)]
pub struct PlanOptions {
    pub height: usize,
    pub width: usize,
    /// `None`: [`Isa::active`].
    pub isa: Option<Isa>,
    pub winograd: WinogradPolicy,
    /// The batch size the kernels are chosen for (any batch runs; this one runs fastest).
    pub batch: usize,
    pub precision: Precision,
    /// The unit of bf16 convolutions; `None`: [`Bf16Unit::active`].
    pub bf16_unit: Option<Bf16Unit>,
    /// The unit of int8 convolutions; `None`: [`Int8Unit::active`].
    pub int8_unit: Option<Int8Unit>,
    /// The activation ranges an int8 plan quantizes with (required for [`Precision::Int8`]).
    pub calibration: Option<std::sync::Arc<Calibration>>,
}

impl PlanOptions {
    pub fn new(height: usize, width: usize) -> Self {
        Self { height, width, isa: None, winograd: WinogradPolicy::Auto, batch: 1, precision: Precision::F32, bf16_unit: None, int8_unit: None, calibration: None }
    }

    /// An int8 plan quantizing with `calibration`.
    pub fn int8(mut self, calibration: std::sync::Arc<Calibration>) -> Self {
        self.precision = Precision::Int8;
        self.calibration = Some(calibration);
        self
    }

    pub fn with_precision(mut self, precision: Precision) -> Self {
        self.precision = precision;
        self
    }
}

/// The range each convolution input took on calibration images ([`super::Session::observe`]),
/// by graph node: what an int8 plan quantizes with.
#[derive(Debug, Clone, Default, PartialEq, Serialize, serde::Deserialize)]
pub struct Calibration {
    /// `(node, min, max)`, by node.
    pub ranges: Vec<(NodeId, f32, f32)>,
}

impl Calibration {
    pub fn range(&self, node: NodeId) -> Option<(f32, f32)> {
        self.ranges.iter().find(|r| r.0 == node).map(|r| (r.1, r.2))
    }

    /// The union of two calibrations' ranges.
    pub fn merge(&mut self, other: &Calibration) {
        for &(node, lo, hi) in &other.ranges {
            match self.ranges.iter_mut().find(|r| r.0 == node) {
                Some(r) => {
                    r.1 = r.1.min(lo);
                    r.2 = r.2.max(hi);
                }
                None => self.ranges.push((node, lo, hi)),
            }
        }
        self.ranges.sort_by_key(|r| r.0);
    }
}

/// A compiled network.
#[derive(Debug)]
pub struct Plan {
    pub isa: Isa,
    pub precision: Precision,
    /// The unit of the bf16 convolutions (a bf16 plan only).
    pub bf16_unit: Option<Bf16Unit>,
    /// The unit of the int8 convolutions (an int8 plan only).
    pub int8_unit: Option<Int8Unit>,
    pub height: usize,
    pub width: usize,
    pub in_channels: usize,
    pub out_channels: usize,
    /// Output map size (the input's, for segmentation networks).
    pub out_size: (usize, usize),
    pub steps: Vec<Step>,
    pub buffers: Vec<Buffer>,
    pub(super) offsets: Vec<usize>,
    /// Arena floats per image of batch.
    pub arena_per_image: usize,
    /// Per-thread scratch floats.
    pub scratch_floats: usize,
}

/// What a plan holds, for logs and `segctl benchmark`.
#[derive(Debug, Clone, Serialize)]
pub struct PlanSummary {
    pub isa: &'static str,
    pub precision: &'static str,
    pub input: [usize; 3],
    pub steps: usize,
    /// Steps per kernel.
    pub kernels: std::collections::BTreeMap<&'static str, usize>,
    /// Floating-point operations of one image (multiply-adds count two), as the layers
    /// define them (not what Winograd actually multiplies).
    pub flops_per_image: u64,
    pub weight_bytes: usize,
    pub arena_bytes_per_image: usize,
    pub scratch_bytes_per_thread: usize,
}

impl Plan {
    /// Floats of one input image (`C × H × W`) and of one output (`classes × H × W`).
    pub fn input_len(&self) -> usize {
        self.in_channels * self.height * self.width
    }

    pub fn output_len(&self) -> usize {
        self.out_channels * self.out_size.0 * self.out_size.1
    }

    pub fn summary(&self) -> PlanSummary {
        let mut kernels = std::collections::BTreeMap::new();
        for s in &self.steps {
            *kernels.entry(s.name()).or_insert(0) += 1;
        }
        let weight_bytes = self
            .steps
            .iter()
            .flat_map(|s| std::iter::once(&s.kind).chain(s.alt.as_ref().and_then(|a| a.built.get())))
            .map(|k| match k {
                StepKind::Direct(d) => d.packed.len() + d.bias.len(),
                StepKind::SmallK(d) => d.weights.len() + d.bias.len(),
                StepKind::Winograd(w) => w.u.len() + w.bias.len(),
                StepKind::Depthwise(d) => d.weights.len() + d.bias.len(),
                StepKind::Bf16(b) => b.weight_bytes().div_ceil(4),
                StepKind::Int8(b) => b.weight_bytes().div_ceil(4),
                _ => 0,
            })
            .sum::<usize>()
            * 4;
        PlanSummary {
            isa: self.isa.name(),
            precision: self.precision.name(),
            input: [self.in_channels, self.height, self.width],
            steps: self.steps.len(),
            kernels,
            flops_per_image: self.steps.iter().map(|s| s.flops).sum(),
            weight_bytes,
            arena_bytes_per_image: self.arena_per_image * 4,
            scratch_bytes_per_thread: self.scratch_floats * 4,
        }
    }
}
