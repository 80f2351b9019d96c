//! The compiled inference plan and the session that runs it.
//!
//! [`Plan::compile`] turns a [`Graph`] into steps over padded NHWC maps (one zero pixel
//! around each image, so 3×3 taps never test bounds):
//!
//! - a 1×1 convolution followed by depth-to-space becomes one convolution with four output
//!   phases; a convolution whose only reader is a residual sum adds the other operand in its
//!   epilogue; each input of a concatenation is written by its producer straight into its
//!   channel range of the concatenation's buffer (readers see a channel stride);
//! - 3×3 stride-1 convolutions on maps with enough tiles run as Winograd F(4×4, 3×3), the
//!   rest as direct convolutions, logits (≤ [`SMALL_K`] channels) on the dot-product kernel;
//! - every buffer gets an offset in one arena, reused by buffers whose lifetimes do not
//!   overlap. Offsets are in floats *per image*: a batch of `n` uses `n ×` each offset, so
//!   one plan serves every batch size and the arena of batch 1 is the smallest.
//!
//! [`Session`] owns the arena, each thread's scratch and a fixed team of threads (the caller
//! plus `threads − 1` workers that spin between steps and sleep between calls). A call
//! allocates nothing once the arena has grown to the largest batch seen.

use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use anyhow::{Context, Result, bail, ensure};
use serde::Serialize;

use super::Isa;
use super::conv::{DirectConv, Phase, Positions, SMALL_K, SmallKConv, Split};
use super::gemm::{self, panel_vectors};
use super::pool::{DepthwiseStep, EltwiseStep, InputStep, MaxPoolStep, OutputStep};
use super::simd::Simd;
use super::winograd::{self, WinogradConv};
use crate::model::blocks::ConvKind;
use crate::model::graph::{ConvOp, Graph, NodeId, Op};

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

/// Raw pointers a step works with during one call.
pub struct Ctx {
    arena: *mut f32,
    offsets: *const usize,
    pub n: usize,
    pub input: *const f32,
    pub output: *mut f32,
}

// SAFETY: a Ctx is shared by the session's threads during one call; steps write disjoint
// parts of the arena (separate items), and the buffers it points to outlive the call.
unsafe impl Sync for Ctx {}

impl Ctx {
    /// The first float of `view` (image 0, padded position 0, channel `c0`).
    ///
    /// # Safety
    /// `view.buffer` must be a buffer of this plan.
    #[inline(always)]
    pub unsafe fn ptr(&self, view: &View) -> *mut f32 {
        unsafe { self.arena.add(*self.offsets.add(view.buffer) * self.n + view.c0) }
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
}

/// Batches from this size on run each step's `alt` kernel.
pub const LARGE_BATCH: usize = 4;

impl Step {
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
    conv: ConvOp,
    input: View,
    output: View,
    residual: Option<View>,
    up: usize,
    lanes: usize,
    policy: WinogradPolicy,
    built: std::sync::OnceLock<StepKind>,
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
    fn build(&self) -> Result<&StepKind> {
        if let Some(k) = self.built.get() {
            return Ok(k);
        }
        let kind = lower_conv(&self.conv, self.input, self.output, self.residual, self.up, self.lanes, self.policy, LARGE_BATCH.max(8))?;
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
            StepKind::Winograd(w) => match (w.transform.m, w.transform.r) {
                (4, 3) => "winograd-f4x4-3x3",
                (2, 2) => "winograd-f2x2-2x2",
                (3, 2) => "winograd-f3x3-2x2",
                _ => "winograd-f4x4-2x2",
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
    }
}

impl StepKind {
    fn split(&self, n: usize, threads: usize) -> Split {
        match self {
            StepKind::Direct(d) => d.split(n, threads),
            StepKind::SmallK(s) => s.split(n, threads),
            StepKind::Winograd(w) => w.split(n, threads),
            _ => Split { groups: 1, chunks: 1 },
        }
    }

    fn compute_items(&self, n: usize, split: Split) -> usize {
        match self {
            StepKind::Input(s) => s.items(n),
            StepKind::Output(s) => s.items(n),
            StepKind::Direct(d) => d.items(split),
            StepKind::SmallK(s) => s.items(split),
            StepKind::Winograd(w) => w.items(split),
            StepKind::Depthwise(s) => s.items(n),
            StepKind::MaxPool(s) => s.items(n),
            StepKind::Eltwise(s) => s.items(n),
        }
    }
}

/// When to use Winograd convolutions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WinogradPolicy {
    /// Where the cost model expects it to pay.
    Auto,
    Never,
    /// Every 3×3 stride-1 layer it can run.
    Always,
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
}

impl PlanOptions {
    pub fn new(height: usize, width: usize) -> Self {
        Self { height, width, isa: None, winograd: WinogradPolicy::Auto, batch: 1 }
    }
}

/// A compiled network.
#[derive(Debug)]
pub struct Plan {
    pub isa: Isa,
    pub height: usize,
    pub width: usize,
    pub in_channels: usize,
    pub out_channels: usize,
    /// Output map size (the input's, for segmentation networks).
    pub out_size: (usize, usize),
    pub steps: Vec<Step>,
    pub buffers: Vec<Buffer>,
    offsets: Vec<usize>,
    /// Arena floats per image of batch.
    pub arena_per_image: usize,
    /// Per-thread scratch floats.
    pub scratch_floats: usize,
}

/// What a plan holds, for logs and `segctl benchmark`.
#[derive(Debug, Clone, Serialize)]
pub struct PlanSummary {
    pub isa: &'static str,
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

/// Where a node's value lives while compiling.
#[derive(Debug, Clone, Copy)]
struct Placed {
    buffer: usize,
    c0: usize,
}

/// Below this many input channels, Winograd's transforms cost more than they save.
const WINOGRAD_MIN_CHANNELS: usize = 8;

impl Plan {
    /// Compiles `graph` for inputs of `options.height × options.width`.
    pub fn compile(graph: &Graph, options: &PlanOptions) -> Result<Plan> {
        let isa = match options.isa {
            Some(isa) => {
                ensure!(isa.supported(), "this CPU cannot run the {} kernels", isa.name());
                isa
            }
            None => Isa::active()?,
        };
        let lanes = isa.lanes();
        let (h, w) = (options.height, options.width);
        ensure!(h > 0 && w > 0, "input size {h}×{w}");
        let channels = graph.channels()?;
        let sizes = graph.sizes(h, w)?;
        let nodes = &graph.nodes;
        let count = nodes.len();
        let consumers: Vec<Vec<NodeId>> = (0..count).map(|i| graph.consumers(i)).collect();
        ensure!(matches!(nodes[0].op, Op::Input { .. }), "node 0 must be the input");

        // Fusions: a node absorbed into a later one has no map of its own.
        let mut absorbed = vec![false; count];
        let mut residual_of: Vec<Option<NodeId>> = vec![None; count];
        for (id, node) in nodes.iter().enumerate() {
            match &node.op {
                Op::DepthToSpace(r) => {
                    let src = node.inputs[0];
                    let fits = matches!(&nodes[src].op, Op::Conv(c) if c.kind == ConvKind::Dense && c.k == 1 && c.stride == 1 && c.pad == 0);
                    if *r != 2 || !fits || consumers[src].len() != 1 || src == graph.output {
                        bail!("node {id}: depth-to-space is only supported by 2 right after a 1×1 convolution");
                    }
                    absorbed[src] = true;
                }
                Op::Add => {
                    let fusable = |x: NodeId| {
                        matches!(&nodes[x].op, Op::Conv(c) if c.kind == ConvKind::Dense && c.stride == 1 && 2 * c.pad + 1 == c.k && c.cout > SMALL_K)
                            && consumers[x].len() == 1
                            && !absorbed[x]
                    };
                    let (a, b) = (node.inputs[0], node.inputs[1]);
                    if fusable(a) {
                        absorbed[a] = true;
                        residual_of[id] = Some(b);
                    } else if fusable(b) {
                        absorbed[b] = true;
                        residual_of[id] = Some(a);
                    }
                }
                _ => {}
            }
        }

        // Buffers and placements.
        let mut buffers: Vec<Buffer> = Vec::new();
        let mut placed: Vec<Option<Placed>> = vec![None; count];
        let new_buffer = |buffers: &mut Vec<Buffer>, (bh, bw): (usize, usize), cs: usize| {
            let positions = (bh + 2) * (bw + 2);
            buffers.push(Buffer {
                h: bh,
                w: bw,
                cs,
                per_image: (positions * cs).div_ceil(16) * 16,
                // Tiles of up to 24 pixels, two pixels apart when strided, plus two rows.
                slack: (64 + 2 * (bw + 2)) * cs,
                offset: 0,
                first: usize::MAX,
                last: 0,
            });
            buffers.len() - 1
        };
        // Concatenations first, so their inputs know where to write.
        let mut copies: Vec<(NodeId, NodeId, usize)> = Vec::new(); // (concat, input, c0)
        for (id, node) in nodes.iter().enumerate() {
            if let Op::Concat = node.op {
                let buffer = new_buffer(&mut buffers, sizes[id], channels[id]);
                placed[id] = Some(Placed { buffer, c0: 0 });
                let mut c0 = 0;
                for &input in &node.inputs {
                    let in_place = input != 0
                        && !absorbed[input]
                        && placed[input].is_none()
                        && !matches!(nodes[input].op, Op::Concat)
                        && input != graph.output;
                    if in_place {
                        placed[input] = Some(Placed { buffer, c0 });
                    } else {
                        copies.push((id, input, c0));
                    }
                    c0 += channels[input];
                }
            }
        }
        // A node whose value is computed by the node absorbing it shares that node's map.
        for id in 0..count {
            if placed[id].is_none() && !absorbed[id] {
                placed[id] = Some(Placed { buffer: new_buffer(&mut buffers, sizes[id], channels[id]), c0: 0 });
            }
        }
        let view = |id: NodeId| -> Result<View> {
            let p = placed[id].with_context(|| format!("node {id} has no map"))?;
            let b = &buffers[p.buffer];
            Ok(View { buffer: p.buffer, h: b.h, w: b.w, cs: b.cs, c0: p.c0, c: channels[id] })
        };

        // Steps.
        let mut steps: Vec<Step> = Vec::new();
        let push = |steps: &mut Vec<Step>, kind: StepKind, flops: u64| {
            steps.push(Step { kind, alt: None, zero_borders: Vec::new(), flops });
        };
        for (id, node) in nodes.iter().enumerate() {
            let out_size = sizes[id];
            let pixels = (out_size.0 * out_size.1) as u64;
            match &node.op {
                Op::Input { .. } => push(&mut steps, StepKind::Input(InputStep { output: view(id)? }), 0),
                Op::Conv(conv) => {
                    if absorbed[id] {
                        continue;
                    }
                    let x = node.inputs[0];
                    let (kind, alt) = lower_conv_pair(conv, view(x)?, view(id)?, None, 1, lanes, options).with_context(|| format!("node {id}"))?;
                    push(&mut steps, kind, 2 * pixels * conv.macs_per_output_pixel() as u64);
                    set_alt(&mut steps, alt);
                }
                Op::DepthToSpace(_) => {
                    let src = node.inputs[0];
                    let Op::Conv(conv) = &nodes[src].op else { unreachable!("checked above") };
                    let (kind, alt) = lower_conv_pair(conv, view(nodes[src].inputs[0])?, view(id)?, None, 2, lanes, options).with_context(|| format!("node {src}"))?;
                    let in_pixels = (sizes[src].0 * sizes[src].1) as u64;
                    push(&mut steps, kind, 2 * in_pixels * conv.macs_per_output_pixel() as u64);
                    set_alt(&mut steps, alt);
                }
                Op::Add => match residual_of[id] {
                    Some(other) => {
                        let conv_node = if node.inputs[0] == other { node.inputs[1] } else { node.inputs[0] };
                        let Op::Conv(conv) = &nodes[conv_node].op else { unreachable!("checked above") };
                        let (kind, alt) = lower_conv_pair(conv, view(nodes[conv_node].inputs[0])?, view(id)?, Some(view(other)?), 1, lanes, options)
                            .with_context(|| format!("node {conv_node}"))?;
                        push(&mut steps, kind, 2 * pixels * (conv.macs_per_output_pixel() + conv.cout) as u64);
                        set_alt(&mut steps, alt);
                    }
                    None => {
                        let step = EltwiseStep { a: view(node.inputs[0])?, b: Some(view(node.inputs[1])?), output: view(id)? };
                        push(&mut steps, StepKind::Eltwise(step), pixels * channels[id] as u64);
                    }
                },
                Op::MaxPool2x2 => {
                    let step = MaxPoolStep { input: view(node.inputs[0])?, output: view(id)? };
                    push(&mut steps, StepKind::MaxPool(step), 3 * pixels * channels[id] as u64);
                }
                Op::Concat => {
                    for &(concat, input, c0) in copies.iter().filter(|c| c.0 == id) {
                        let mut target = view(concat)?;
                        target.c0 = c0;
                        target.c = channels[input];
                        let step = EltwiseStep { a: view(input)?, b: None, output: target };
                        push(&mut steps, StepKind::Eltwise(step), 0);
                    }
                }
            }
        }
        push(&mut steps, StepKind::Output(OutputStep { input: view(graph.output)? }), 0);

        // Lifetimes, zero borders, offsets.
        for (s, step) in steps.iter().enumerate() {
            let (reads, writes) = step_buffers(&step.kind);
            for b in reads.into_iter().chain(writes) {
                buffers[b].first = buffers[b].first.min(s);
                buffers[b].last = buffers[b].last.max(s);
            }
        }
        for b in 0..buffers.len() {
            let first = buffers[b].first;
            if first != usize::MAX {
                steps[first].zero_borders.push(b);
            }
        }
        let arena_per_image = assign_offsets(&mut buffers);
        let offsets = buffers.iter().map(|b| b.offset).collect();
        let scratch_floats = max_scratch(steps.iter().map(|s| &s.kind));
        let in_channels = channels[0];
        let out_channels = channels[graph.output];
        let out_size = sizes[graph.output];
        Ok(Plan { isa, height: h, width: w, in_channels, out_channels, out_size, steps, buffers, offsets, arena_per_image, scratch_floats })
    }

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
                _ => 0,
            })
            .sum::<usize>()
            * 4;
        PlanSummary {
            isa: self.isa.name(),
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

/// Sets the large-batch kernel of the step just pushed.
fn set_alt(steps: &mut [Step], alt: Option<Box<LazyKernel>>) {
    if let Some(last) = steps.last_mut() {
        last.alt = alt;
    }
}

/// The kernel for `options.batch`, and the one for [`LARGE_BATCH`] when it differs.
#[allow(clippy::too_many_arguments)]
fn lower_conv_pair(conv: &ConvOp, input: View, output: View, residual: Option<View>, up: usize, lanes: usize, options: &PlanOptions) -> Result<(StepKind, Option<Box<LazyKernel>>)> {
    let kind = lower_conv(conv, input, output, residual, up, lanes, options.winograd, options.batch)?;
    if options.batch >= LARGE_BATCH {
        return Ok((kind, None));
    }
    let choice = |batch| winograd_choice(conv, input, residual, up, lanes, options.winograd, batch);
    if choice(options.batch) == choice(8) {
        return Ok((kind, None));
    }
    let lazy = LazyKernel { conv: conv.clone(), input, output, residual, up, lanes, policy: options.winograd, built: std::sync::OnceLock::new() };
    Ok((kind, Some(Box::new(lazy))))
}

/// The Winograd tile size a convolution runs with for `batch` (`None`: another kernel).
fn winograd_choice(conv: &ConvOp, input: View, residual: Option<View>, up: usize, lanes: usize, policy: WinogradPolicy, batch: usize) -> Option<usize> {
    let dense3 = conv.kind == ConvKind::Dense && conv.k == 3 && conv.stride == 1 && conv.pad == 1 && up == 1 && residual.is_none();
    let transposed = conv.kind == ConvKind::Transposed && conv.k == 4 && conv.stride == 2 && conv.pad == 1;
    if !(dense3 || transposed) || conv.cout <= SMALL_K {
        return None;
    }
    let (r, phases) = if dense3 { (3, 1) } else { (2, 4) };
    let candidates: &[usize] = if dense3 { &[4] } else { &[2, 3, 4] };
    choose_winograd(input.h, input.w, conv.cin, conv.cout, phases, r, candidates, lanes, batch, policy)
}

/// Per-thread scratch floats the kernels need.
fn max_scratch<'a>(kinds: impl Iterator<Item = &'a StepKind>) -> usize {
    kinds
        .map(|k| match k {
            StepKind::Winograd(w) => w.scratch_floats(),
            _ => 0,
        })
        .max()
        .unwrap_or(0)
}

/// Buffers a step reads and writes.
fn step_buffers(kind: &StepKind) -> (Vec<usize>, Vec<usize>) {
    match kind {
        StepKind::Input(s) => (vec![], vec![s.output.buffer]),
        StepKind::Output(s) => (vec![s.input.buffer], vec![]),
        StepKind::Direct(d) => (d.residual.iter().map(|r| r.buffer).chain([d.input.buffer]).collect(), vec![d.output.buffer]),
        StepKind::SmallK(d) => (vec![d.input.buffer], vec![d.output.buffer]),
        StepKind::Winograd(d) => (vec![d.input.buffer], vec![d.output.buffer]),
        StepKind::Depthwise(d) => (vec![d.input.buffer], vec![d.output.buffer]),
        StepKind::MaxPool(d) => (vec![d.input.buffer], vec![d.output.buffer]),
        StepKind::Eltwise(e) => (e.b.iter().map(|b| b.buffer).chain([e.a.buffer]).collect(), vec![e.output.buffer]),
    }
}

/// Greedy first-fit by decreasing size among buffers whose lifetimes overlap; returns the
/// arena's floats per image.
fn assign_offsets(buffers: &mut [Buffer]) -> usize {
    let mut order: Vec<usize> = (0..buffers.len()).filter(|&b| buffers[b].first != usize::MAX).collect();
    order.sort_by_key(|&b| std::cmp::Reverse(buffers[b].per_image + buffers[b].slack));
    let mut done: Vec<usize> = Vec::new();
    let mut end = 0;
    for b in order {
        let size = buffers[b].per_image + buffers[b].slack;
        let mut busy: Vec<(usize, usize)> = done
            .iter()
            .filter(|&&o| buffers[o].first <= buffers[b].last && buffers[b].first <= buffers[o].last)
            .map(|&o| (buffers[o].offset, buffers[o].offset + buffers[o].per_image + buffers[o].slack))
            .collect();
        busy.sort_unstable();
        let mut offset = 0;
        for (lo, hi) in busy {
            if offset + size <= lo {
                break;
            }
            offset = offset.max(hi);
        }
        // Keep every buffer 64-byte aligned.
        buffers[b].offset = offset;
        end = end.max(offset + size);
        done.push(b);
    }
    end.div_ceil(16) * 16
}

/// Chooses a kernel for one convolution and packs its weights.
#[allow(clippy::too_many_arguments)]
fn lower_conv(conv: &ConvOp, input: View, output: View, residual: Option<View>, up: usize, lanes: usize, policy: WinogradPolicy, batch: usize) -> Result<StepKind> {
    let (min, max) = conv.act.bounds();
    let (cin, k) = (conv.cin, conv.k);
    match conv.kind {
        ConvKind::Depthwise => {
            ensure!(k == 3 && conv.pad == 1 && (conv.stride == 1 || conv.stride == 2), "depthwise convolutions must be 3×3 with padding 1 and stride 1 or 2");
            ensure!(residual.is_none() && up == 1, "internal: fused depthwise");
            let padded_c = cin.div_ceil(lanes) * lanes;
            let mut weights = vec![0f32; 9 * padded_c];
            for c in 0..cin {
                for t in 0..9 {
                    weights[t * padded_c + c] = conv.weight[c * 9 + t];
                }
            }
            let mut bias = conv.bias.clone();
            bias.resize(padded_c, 0.0);
            Ok(StepKind::Depthwise(DepthwiseStep { input, output, stride: conv.stride, weights, bias, padded_c, min, max }))
        }
        ConvKind::Dense | ConvKind::Transposed => {
            // Phases: (taps, sub-pixel, weight of (tap index, c, k)).
            type Weight<'a> = Box<dyn Fn(usize, usize, usize) -> f32 + 'a>;
            let (cout, positions, phases): (usize, Positions, Vec<(Phase, Weight)>) = match conv.kind {
                ConvKind::Transposed => {
                    ensure!(k == 4 && conv.stride == 2 && conv.pad == 1 && up == 1, "transposed convolutions must be 4×4, stride 2, padding 1");
                    let cout = conv.cout;
                    // Output 2i + a sees input i + d through kernel tap t: a = 0: (0, 1), (−1, 3);
                    // a = 1: (1, 0), (0, 2).
                    let taps_1d = |a: usize| if a == 0 { [(0isize, 1usize), (-1, 3)] } else { [(1, 0), (0, 2)] };
                    let mut phases = Vec::new();
                    for a in 0..2 {
                        for b in 0..2 {
                            let mut taps = Vec::new();
                            let mut kernel_taps = Vec::new();
                            for (dy, ty) in taps_1d(a) {
                                for (dx, tx) in taps_1d(b) {
                                    taps.push((dy, dx));
                                    kernel_taps.push((ty, tx));
                                }
                            }
                            let weight = &conv.weight;
                            let f: Weight = Box::new(move |t, c, o| {
                                let (ty, tx) = kernel_taps[t];
                                weight[((c * cout + o) * 4 + ty) * 4 + tx]
                            });
                            phases.push((Phase { taps, sub: (a, b) }, f));
                        }
                    }
                    (cout, Positions::Flat { up: 2 }, phases)
                }
                _ if up == 2 => {
                    // 1×1 convolution to 4·C channels, then depth-to-space: channel c·4 + 2a + b
                    // goes to sub-pixel (a, b).
                    let cout = conv.cout / 4;
                    let mut phases = Vec::new();
                    for a in 0..2 {
                        for b in 0..2 {
                            let weight = &conv.weight;
                            let f: Weight = Box::new(move |_, c, o| weight[(o * 4 + a * 2 + b) * cin + c]);
                            phases.push((Phase { taps: vec![(0, 0)], sub: (a, b) }, f));
                        }
                    }
                    (cout, Positions::Flat { up: 2 }, phases)
                }
                _ => {
                    let cout = conv.cout;
                    let positions = if conv.stride == 1 {
                        ensure!(2 * conv.pad + 1 == k, "stride-1 convolutions must keep the map size (padding (k − 1)/2)");
                        Positions::Flat { up: 1 }
                    } else {
                        ensure!(conv.pad <= 1, "strided convolutions with padding over 1 are not supported");
                        Positions::Strided { stride: conv.stride, pad: conv.pad }
                    };
                    let origin = if conv.stride == 1 { conv.pad as isize } else { 0 };
                    let taps = (0..k * k).map(|t| ((t / k) as isize - origin, (t % k) as isize - origin)).collect();
                    let weight = &conv.weight;
                    let f: Weight = Box::new(move |t, c, o| weight[(o * cin + c) * k * k + t]);
                    (cout, positions, vec![(Phase { taps, sub: (0, 0) }, f)])
                }
            };
            let bias_of = |phase: usize, o: usize| if up == 2 && conv.kind == ConvKind::Dense { conv.bias[o * 4 + phase] } else { conv.bias[o] };
            let flat_up = match positions {
                Positions::Flat { up } | Positions::Rows { up } => Some(up),
                Positions::Strided { .. } => None,
            };
            if cout <= SMALL_K
                && let Some(up) = flat_up
                && residual.is_none()
            {
                let cin_padded = cin.div_ceil(lanes) * lanes;
                let mut weights = Vec::new();
                let mut bias = Vec::new();
                for (p, (phase, f)) in phases.iter().enumerate() {
                    for o in 0..cout {
                        for t in 0..phase.taps.len() {
                            let mut row = vec![0f32; cin_padded];
                            for (c, v) in row.iter_mut().enumerate().take(cin) {
                                *v = f(t, c, o);
                            }
                            weights.extend(row);
                        }
                        bias.push(bias_of(p, o));
                    }
                }
                let phases = phases.into_iter().map(|(p, _)| p).collect();
                return Ok(StepKind::SmallK(SmallKConv { input, output, up, phases, cin, cout, lanes, cin_padded, weights, bias, min, max }));
            }
            let nv = panel_vectors(lanes, cout);
            let nr = nv * lanes;
            let panels = cout.div_ceil(nr);
            let mut bias = vec![0f32; phases.len() * panels * nr];
            for p in 0..phases.len() {
                for o in 0..cout {
                    bias[p * panels * nr + o] = bias_of(p, o);
                }
            }
            // Winograd: 3×3 stride-1 convolutions (one phase), transposed convolutions (four
            // phases of 2×2 correlations).
            let dense3 = conv.kind == ConvKind::Dense && k == 3 && conv.stride == 1 && up == 1 && residual.is_none();
            if let Some(m) = winograd_choice(conv, input, residual, up, lanes, policy, batch) {
                let transform = winograd::Transform::new(m, if dense3 { 3 } else { 2 });
                let mr = gemm::tile_rows(lanes, nv);
                let cin_padded = cin.div_ceil(lanes) * lanes;
                let xi = transform.alpha * transform.alpha;
                let tiles = input.h.div_ceil(m) * input.w.div_ceil(m);
                // V and one panel of M for a block within half of a core's L2; when the
                // transformed weights (read once per block) are larger than that themselves,
                // within all of it: fewer, larger blocks read them fewer times.
                let u_bytes = xi * cin * cout * 4;
                let budget = if u_bytes > l2_bytes() / 2 { l2_bytes() / 4 } else { l2_bytes() / 2 / 4 };
                let per_tile = xi * (cin_padded + nr);
                let block = ((budget / per_tile) / mr).clamp(1, tiles.div_ceil(mr).max(1)) * mr;
                let (wphases, u) = if dense3 {
                    let phase = winograd::WinogradPhase { origin: (-1, -1), sub: (0, 0) };
                    (vec![phase], winograd::pack(&transform, cin, cout, nr, |o, c| conv.weight[(o * cin + c) * 9..][..9].to_vec()))
                } else {
                    // Phase (a, b) correlates 2×2 inputs from offset (a − 1, b − 1) with kernel
                    // taps [3, 1] (a = 0) or [2, 0] (a = 1) of the 4×4 transposed kernel.
                    let taps = |a: usize| if a == 0 { [3usize, 1] } else { [2, 0] };
                    let mut wphases = Vec::new();
                    let mut u = Vec::new();
                    for a in 0..2 {
                        for b in 0..2 {
                            wphases.push(winograd::WinogradPhase { origin: (a as isize - 1, b as isize - 1), sub: (a, b) });
                            u.extend(winograd::pack(&transform, cin, cout, nr, |o, c| {
                                let mut g = Vec::with_capacity(4);
                                for ty in taps(a) {
                                    for tx in taps(b) {
                                        g.push(conv.weight[((c * cout + o) * 4 + ty) * 4 + tx]);
                                    }
                                }
                                g
                            }));
                        }
                    }
                    (wphases, u)
                };
                let up = if dense3 { 1 } else { 2 };
                return Ok(StepKind::Winograd(WinogradConv { input, output, transform, phases: wphases, up, cin, cout, nv, lanes, block, u, bias, min, max }));
            }
            // 8-pixel-wide maps: tiles along rows waste no border pixels (AVX-512 tile 8×2).
            let positions = match positions {
                Positions::Flat { up } if lanes == 16 && nv == 2 && input.w == super::conv::ROW_TILE => Positions::Rows { up },
                other => other,
            };
            let mut packed = Vec::new();
            for (phase, f) in &phases {
                packed.extend(gemm::pack_panels(phase.taps.len(), cin, cout, nr, f));
            }
            let phases = phases.into_iter().map(|(p, _)| p).collect();
            Ok(StepKind::Direct(DirectConv { input, output, residual, positions, phases, cin, cout, nv, lanes, packed, bias, min, max }))
        }
    }
}

/// The Winograd tile size `m` for a layer, or `None` for the direct kernel, from a cost model
/// in cycles for a batch of `batch`: multiply-adds at `2·lanes` per cycle (output channels
/// padded to whole vectors; Winograd's GEMMs at 80% of the direct kernel's rate), Winograd's
/// transforms and bookkeeping at about `40 + 2·(input + output channel vectors)` cycles per
/// tile and transform point, against weight traffic (about 2.5 bytes per cycle for weights
/// beyond half the L2, what a core streams from memory on this class of machine), whichever
/// dominates. Calibrated on AVX-512 against measured layers: the UNets' 128² layers (12 and
/// 32 channels) and `mobilenetv2_unet`'s decoder, where at batch 1 the 2.25–6× larger
/// Winograd weights lose to the direct kernel and at batch 8 they win.
#[allow(clippy::too_many_arguments)]
fn choose_winograd(h: usize, w: usize, cin: usize, cout: usize, phases: usize, r: usize, candidates: &[usize], lanes: usize, batch: usize, policy: WinogradPolicy) -> Option<usize> {
    let macs_per_cycle = 2.0 * lanes as f64;
    let l2 = l2_bytes() as f64;
    let traffic = |bytes: f64, reads: f64| if bytes <= l2 / 2.0 { bytes * reads / 64.0 } else { bytes * reads / 2.5 };
    let k_padded = (cout.div_ceil(lanes) * lanes) as f64;
    let (c, k, n, p) = (cin as f64, cout as f64, batch.max(1) as f64, phases as f64);
    let vectors = (cin.div_ceil(lanes) + cout.div_ceil(lanes)) as f64;
    let direct = {
        let positions = ((h + 2) * (w + 2)) as f64;
        let macs = p * n * positions * c * k_padded * (r * r) as f64;
        (macs / macs_per_cycle).max(traffic(p * (r * r) as f64 * c * k * 4.0, 1.0))
    };
    let winograd = |m: usize| {
        let alpha = (m + r - 1) as f64;
        let tiles = n * (h.div_ceil(m) * w.div_ceil(m)) as f64;
        let macs = p * tiles * alpha * alpha * c * k_padded;
        let transforms = p * tiles * alpha * alpha * (40.0 + 2.0 * vectors);
        // Weights are read once per block of tiles; blocks hold tens of tiles.
        let blocks = (tiles / 48.0).ceil();
        (1.25 * macs / macs_per_cycle + transforms).max(traffic(p * alpha * alpha * c * k * 4.0, blocks))
    };
    let best = candidates.iter().copied().filter(|&m| h >= m && w >= m).min_by(|&a, &b| winograd(a).total_cmp(&winograd(b)))?;
    match policy {
        WinogradPolicy::Never => None,
        WinogradPolicy::Always => Some(best),
        WinogradPolicy::Auto => (cin >= WINOGRAD_MIN_CHANNELS && winograd(best) < direct).then_some(best),
    }
}

/// This machine's per-core L2 size (Linux sysfs), 1 MiB when unknown.
fn l2_bytes() -> usize {
    static L2: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *L2.get_or_init(|| {
        let text = std::fs::read_to_string("/sys/devices/system/cpu/cpu0/cache/index2/size").unwrap_or_default();
        let text = text.trim();
        let (digits, unit) = text.split_at(text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len()));
        let value: usize = digits.parse().unwrap_or(0);
        let bytes = match unit {
            "K" => value << 10,
            "M" => value << 20,
            _ => value,
        };
        if bytes >= 128 << 10 { bytes } else { 1 << 20 }
    })
}

/// Runs work item `item` of `step` (the border-zeroing items first).
#[inline(always)]
unsafe fn run_item<S: Simd>(plan: &Plan, step: &Step, ctx: &Ctx, split: Split, item: usize, scratch: *mut f32) {
    let borders = step.zero_borders.len() * ctx.n;
    if item < borders {
        let buffer = step.zero_borders[item / ctx.n];
        unsafe { zero_border(plan, ctx, buffer, item % ctx.n) };
        return;
    }
    let item = item - borders;
    unsafe {
        match step.for_batch(ctx.n) {
            StepKind::Input(s) => s.run(ctx, item),
            StepKind::Output(s) => s.run(ctx, item),
            StepKind::Direct(s) => s.run::<S>(ctx, split, item),
            StepKind::SmallK(s) => s.run::<S>(ctx, split, item),
            StepKind::Winograd(s) => s.run::<S>(ctx, split, item, scratch),
            StepKind::Depthwise(s) => s.run::<S>(ctx, item),
            StepKind::MaxPool(s) => s.run::<S>(ctx, item),
            StepKind::Eltwise(s) => s.run::<S>(ctx, item),
        }
    }
}

// The generic kernels are inlined into one function per instruction set, compiled for it.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn run_item_avx512(plan: &Plan, step: &Step, ctx: &Ctx, split: Split, item: usize, scratch: *mut f32) {
    unsafe { run_item::<super::simd::Avx512>(plan, step, ctx, split, item, scratch) }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn run_item_avx2(plan: &Plan, step: &Step, ctx: &Ctx, split: Split, item: usize, scratch: *mut f32) {
    unsafe { run_item::<super::simd::Avx2>(plan, step, ctx, split, item, scratch) }
}

/// Runs one item with the kernels of the plan's instruction set.
///
/// # Safety
/// The plan was compiled for an instruction set this CPU has (checked then); `ctx` and
/// `scratch` are laid out for the plan and batch.
#[inline]
unsafe fn dispatch(plan: &Plan, step: &Step, ctx: &Ctx, split: Split, item: usize, scratch: *mut f32) {
    unsafe {
        match plan.isa {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => run_item_avx512(plan, step, ctx, split, item, scratch),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => run_item_avx2(plan, step, ctx, split, item, scratch),
            _ => run_item::<super::simd::Portable>(plan, step, ctx, split, item, scratch),
        }
    }
}

/// Zeroes the one-pixel border of image `img` of `buffer`.
unsafe fn zero_border(plan: &Plan, ctx: &Ctx, buffer: usize, img: usize) {
    let b = &plan.buffers[buffer];
    let view = View { buffer, h: b.h, w: b.w, cs: b.cs, c0: 0, c: b.cs };
    let wp = b.w + 2;
    unsafe {
        let base = ctx.ptr(&view).add(img * view.positions() * b.cs);
        std::ptr::write_bytes(base, 0, wp * b.cs);
        std::ptr::write_bytes(base.add((b.h + 1) * wp * b.cs), 0, wp * b.cs);
        for y in 1..=b.h {
            let row = base.add(y * wp * b.cs);
            std::ptr::write_bytes(row, 0, b.cs);
            std::ptr::write_bytes(row.add((wp - 1) * b.cs), 0, b.cs);
        }
    }
}

/// Runs a compiled [`Plan`] on batches: the arena, scratch and threads of one caller.
pub struct Session {
    plan: Arc<Plan>,
    threads: usize,
    arena: Vec<f32>,
    scratch: Vec<f32>,
    output: Vec<f32>,
    counters: Vec<AtomicUsize>,
    /// Nanoseconds per step of the last call, when profiling.
    timings: Vec<AtomicU64>,
    profile: bool,
    team: Option<Team>,
    large_batch_kernels: bool,
}

impl Session {
    /// A session using `threads` threads (the caller and `threads − 1` workers).
    pub fn new(plan: Arc<Plan>, threads: usize) -> Result<Session> {
        let threads = threads.max(1);
        let team = if threads > 1 { Some(Team::new(threads - 1)?) } else { None };
        let counters = (0..plan.steps.len()).map(|_| AtomicUsize::new(0)).collect();
        let scratch = vec![0f32; plan.scratch_floats * threads];
        let timings = (0..plan.steps.len()).map(|_| AtomicU64::new(0)).collect();
        Ok(Session { plan, threads, arena: Vec::new(), scratch, output: Vec::new(), counters, timings, profile: false, team, large_batch_kernels: true })
    }

    pub fn plan(&self) -> &Arc<Plan> {
        &self.plan
    }

    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Whether this session compiles and runs the large-batch kernels (on by default: faster
    /// for batches of [`LARGE_BATCH`] and more, but their re-packed weights can double the
    /// plan's memory, which a memory-bound server may not want). Kernels another session
    /// already built are used either way.
    pub fn set_large_batch_kernels(&mut self, on: bool) {
        self.large_batch_kernels = on;
    }

    /// How long the worker threads spin for the next call before sleeping, in spin rounds
    /// (default 65 536, a few ms): a server that runs other work between calls wants few.
    pub fn set_idle_spin(&mut self, rounds: usize) {
        if let Some(team) = &self.team {
            team.shared.idle_spin.store(rounds, Ordering::Relaxed);
        }
    }

    /// Records the wall time of each step from now on (see [`Session::step_seconds`]).
    pub fn set_profiling(&mut self, on: bool) {
        self.profile = on;
    }

    /// Seconds each step took in the last profiled call.
    pub fn step_seconds(&self) -> Vec<f64> {
        self.timings.iter().map(|t| t.load(Ordering::Relaxed) as f64 * 1e-9).collect()
    }

    /// Bytes this session holds (arena, scratch, output).
    pub fn memory_bytes(&self) -> usize {
        (self.arena.capacity() + self.scratch.capacity() + self.output.capacity()) * 4
    }

    /// Logits `[n, classes, H, W]` for a normalized batch `[n, C, H, W]`.
    pub fn run(&mut self, input: &[f32], n: usize) -> Result<&[f32]> {
        self.run_threads(input, n, self.threads)
    }

    /// [`Self::run`] on the caller and `threads − 1` of the session's workers (at most all).
    pub fn run_threads(&mut self, input: &[f32], n: usize, threads: usize) -> Result<&[f32]> {
        let threads = threads.clamp(1, self.threads);
        let plan = Arc::clone(&self.plan);
        ensure!(n > 0, "empty batch");
        if n >= LARGE_BATCH && self.large_batch_kernels {
            // The large-batch kernels, compiled on the first large batch (once per plan).
            for step in &plan.steps {
                if let Some(alt) = &step.alt {
                    alt.build()?;
                }
            }
        }
        let scratch_floats = max_scratch(plan.steps.iter().map(|s| s.for_batch(n)));
        if self.scratch.len() < scratch_floats * self.threads {
            self.scratch = vec![0f32; scratch_floats * self.threads];
        }
        ensure!(input.len() == n * plan.input_len(), "input has {} values, the plan expects {n}×{}", input.len(), plan.input_len());
        // Grown to the largest batch seen; every buffer offset scales with n.
        let arena_len = n * plan.arena_per_image + 16;
        if self.arena.len() < arena_len + 16 {
            self.arena = vec![0f32; arena_len + 16];
        }
        if self.output.len() < n * plan.output_len() {
            self.output = vec![0f32; n * plan.output_len()];
        }
        // 64-byte alignment of the arena start.
        let align = self.arena.as_ptr().align_offset(64).min(15);
        let arena = unsafe { self.arena.as_mut_ptr().add(align) };
        let ctx = Ctx { arena, offsets: plan.offsets.as_ptr(), n, input: input.as_ptr(), output: self.output.as_mut_ptr() };
        let work: Vec<(Split, usize)> = plan
            .steps
            .iter()
            .map(|s| {
                let kind = s.for_batch(n);
                let split = kind.split(n, threads);
                (split, s.zero_borders.len() * n + kind.compute_items(n, split))
            })
            .collect();
        for c in &self.counters {
            c.store(0, Ordering::Relaxed);
        }
        let scratch = self.scratch.as_mut_ptr() as usize;
        let per_thread = scratch_floats;
        let counters = &self.counters;
        let (profile, timings) = (self.profile, &self.timings);
        let body = |tid: usize, barrier: Option<&SpinBarrier>| {
            let scratch = (scratch as *mut f32).wrapping_add(tid * per_thread);
            let mut clock = (profile && tid == 0).then(std::time::Instant::now);
            for (s, step) in plan.steps.iter().enumerate() {
                let (split, items) = work[s];
                loop {
                    let item = counters[s].fetch_add(1, Ordering::Relaxed);
                    if item >= items {
                        break;
                    }
                    // SAFETY: items of one step write disjoint parts of the arena.
                    unsafe { dispatch(&plan, step, &ctx, split, item, scratch) };
                }
                if let Some(b) = barrier {
                    b.wait();
                }
                if let Some(start) = clock.as_mut() {
                    let now = std::time::Instant::now();
                    timings[s].store((now - *start).as_nanos() as u64, Ordering::Relaxed);
                    *start = now;
                }
            }
        };
        match &self.team {
            None => body(0, None),
            Some(team) => team.run(&|tid, barrier| body(tid, Some(barrier)), threads),
        }
        Ok(&self.output[..n * plan.output_len()])
    }
}

/// A fixed team of worker threads that runs one job at a time together with the caller.
struct Team {
    shared: Arc<TeamShared>,
    handles: Vec<JoinHandle<()>>,
}

type Job = dyn Fn(usize, &SpinBarrier) + Sync + 'static;

struct TeamShared {
    /// The current job, valid while `pending > 0`.
    job: UnsafeCell<Option<*const Job>>,
    epoch: AtomicU64,
    pending: AtomicUsize,
    stop: AtomicBool,
    sleepers: AtomicUsize,
    /// Spin rounds a worker waits for the next call before sleeping.
    idle_spin: AtomicUsize,
    /// Threads (caller included) taking part in the current job.
    participants: AtomicUsize,
    lock: Mutex<()>,
    wake: Condvar,
    barrier: SpinBarrier,
}

// SAFETY: `job` is written only by the caller while no worker reads it (before the epoch is
// published and after every worker reported done).
unsafe impl Sync for TeamShared {}
unsafe impl Send for TeamShared {}

/// Spins this many rounds for the next job before sleeping.
const SPIN_ROUNDS: usize = 1 << 16;

impl Team {
    fn new(workers: usize) -> Result<Team> {
        let shared = Arc::new(TeamShared {
            job: UnsafeCell::new(None),
            epoch: AtomicU64::new(0),
            pending: AtomicUsize::new(0),
            stop: AtomicBool::new(false),
            sleepers: AtomicUsize::new(0),
            idle_spin: AtomicUsize::new(SPIN_ROUNDS),
            participants: AtomicUsize::new(workers + 1),
            lock: Mutex::new(()),
            wake: Condvar::new(),
            barrier: SpinBarrier::new(workers + 1),
        });
        let mut handles = Vec::with_capacity(workers);
        for tid in 1..=workers {
            let shared = Arc::clone(&shared);
            let handle = std::thread::Builder::new()
                .name(format!("segctl-infer-{tid}"))
                .spawn(move || worker(&shared, tid))
                .context("failed to start an inference thread")?;
            handles.push(handle);
        }
        Ok(Team { shared, handles })
    }

    /// Runs `job(tid, barrier)` on every thread (the caller is thread 0) and waits.
    /// Runs `job(tid, barrier)` on the caller (thread 0) and the first `participants − 1`
    /// workers, and waits; the other workers skip it.
    fn run(&self, job: &(dyn Fn(usize, &SpinBarrier) + Sync), participants: usize) {
        let s = &self.shared;
        // SAFETY: no worker is running a job (the previous call waited for all), so none
        // reads `job`; the reference outlives this call, which waits for every worker.
        unsafe {
            *s.job.get() = Some(std::mem::transmute::<&(dyn Fn(usize, &SpinBarrier) + Sync), *const Job>(job));
        }
        s.pending.store(self.handles.len(), Ordering::Relaxed);
        s.participants.store(participants.clamp(1, self.handles.len() + 1), Ordering::Relaxed);
        s.barrier.total.store(participants.clamp(1, self.handles.len() + 1), Ordering::Relaxed);
        s.epoch.fetch_add(1, Ordering::Release);
        if s.sleepers.load(Ordering::Acquire) > 0 {
            let _guard = s.lock.lock().unwrap_or_else(|e| e.into_inner());
            s.wake.notify_all();
        }
        job(0, &s.barrier);
        let mut spins = 0usize;
        while s.pending.load(Ordering::Acquire) > 0 {
            spins += 1;
            if spins < SPIN_ROUNDS {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
    }
}

impl Drop for Team {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        self.shared.epoch.fetch_add(1, Ordering::Release);
        {
            let _guard = self.shared.lock.lock().unwrap_or_else(|e| e.into_inner());
            self.shared.wake.notify_all();
        }
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}

fn worker(s: &TeamShared, tid: usize) {
    let mut seen = 0u64;
    loop {
        let mut spins = 0usize;
        loop {
            let epoch = s.epoch.load(Ordering::Acquire);
            if epoch != seen {
                seen = epoch;
                break;
            }
            spins += 1;
            if spins < s.idle_spin.load(Ordering::Relaxed) {
                std::hint::spin_loop();
                continue;
            }
            let guard = s.lock.lock().unwrap_or_else(|e| e.into_inner());
            s.sleepers.fetch_add(1, Ordering::AcqRel);
            let guard = s
                .wake
                .wait_while(guard, |_| s.epoch.load(Ordering::Acquire) == seen)
                .unwrap_or_else(|e| e.into_inner());
            s.sleepers.fetch_sub(1, Ordering::AcqRel);
            drop(guard);
        }
        if s.stop.load(Ordering::Acquire) {
            return;
        }
        // SAFETY: the epoch was published after the job was set; the caller keeps it alive
        // until `pending` reaches zero.
        let job = unsafe { (*s.job.get()).map(|j| &*j) };
        if let Some(job) = job {
            if tid < s.participants.load(Ordering::Relaxed) {
                job(tid, &s.barrier);
            }
        }
        s.pending.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A sense-reversing spin barrier for the team (yields after a while, so an oversubscribed
/// machine still makes progress).
pub struct SpinBarrier {
    count: AtomicUsize,
    generation: AtomicUsize,
    /// Threads taking part in the current job.
    total: AtomicUsize,
}

impl SpinBarrier {
    fn new(total: usize) -> Self {
        Self { count: AtomicUsize::new(0), generation: AtomicUsize::new(0), total: AtomicUsize::new(total) }
    }

    pub fn wait(&self) {
        let generation = self.generation.load(Ordering::Acquire);
        if self.count.fetch_add(1, Ordering::AcqRel) + 1 == self.total.load(Ordering::Relaxed) {
            self.count.store(0, Ordering::Relaxed);
            self.generation.fetch_add(1, Ordering::Release);
            return;
        }
        let mut spins = 0usize;
        while self.generation.load(Ordering::Acquire) == generation {
            spins += 1;
            if spins < SPIN_ROUNDS {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
    }
}
