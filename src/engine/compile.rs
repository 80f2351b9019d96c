//! [`Plan::compile`]: a layout-free [`Graph`] into steps over padded NHWC maps.
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

use anyhow::{Context, Result, bail, ensure};

use super::Isa;
use super::bf16::{Bf16Conv, Bf16Unit};
use super::int8::{Int8Conv, Int8Unit, activation_quant};
use super::conv::{self, DirectConv, Phase, Positions, SMALL_K, SmallKConv};
use super::gemm::{self, panel_vectors};
use super::graph::{ConvKind, ConvOp, Graph, NodeId, Op};
use super::plan::{Buffer, LARGE_BATCH, LazyKernel, Plan, PlanOptions, Precision, Step, StepKind, View, WinogradPolicy};
use super::pool::{DepthwiseStep, EltwiseStep, InputStep, MaxPoolStep, OutputStep};
use super::winograd::{self, WinogradConv};

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
                slack: super::plan::slack_floats(bw, cs),
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
            steps.push(Step { kind, alt: None, zero_borders: Vec::new(), flops, source: None });
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
                    let (kind, alt) = lower_conv_pair(conv, x, view(x)?, view(id)?, None, 1, lanes, options).with_context(|| format!("node {id}"))?;
                    push(&mut steps, kind, 2 * pixels * conv.macs_per_output_pixel() as u64);
                    set_alt(&mut steps, alt, x);
                }
                Op::DepthToSpace(_) => {
                    let src = node.inputs[0];
                    let Op::Conv(conv) = &nodes[src].op else { unreachable!("checked above") };
                    let (kind, alt) = lower_conv_pair(conv, nodes[src].inputs[0], view(nodes[src].inputs[0])?, view(id)?, None, 2, lanes, options).with_context(|| format!("node {src}"))?;
                    let in_pixels = (sizes[src].0 * sizes[src].1) as u64;
                    push(&mut steps, kind, 2 * in_pixels * conv.macs_per_output_pixel() as u64);
                    set_alt(&mut steps, alt, nodes[src].inputs[0]);
                }
                Op::Add => match residual_of[id] {
                    Some(other) => {
                        let conv_node = if node.inputs[0] == other { node.inputs[1] } else { node.inputs[0] };
                        let Op::Conv(conv) = &nodes[conv_node].op else { unreachable!("checked above") };
                        let (kind, alt) = lower_conv_pair(conv, nodes[conv_node].inputs[0], view(nodes[conv_node].inputs[0])?, view(id)?, Some(view(other)?), 1, lanes, options)
                            .with_context(|| format!("node {conv_node}"))?;
                        push(&mut steps, kind, 2 * pixels * (conv.macs_per_output_pixel() + conv.cout) as u64);
                        set_alt(&mut steps, alt, nodes[conv_node].inputs[0]);
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
        let bf16_unit = steps.iter().find_map(|s| match &s.kind {
            StepKind::Bf16(b) => Some(b.unit),
            _ => None,
        });
        let int8_unit = steps.iter().find_map(|s| match &s.kind {
            StepKind::Int8(b) => Some(b.unit),
            _ => None,
        });
        Ok(Plan { isa, precision: options.precision, bf16_unit, int8_unit, height: h, width: w, in_channels, out_channels, out_size, steps, buffers, offsets, arena_per_image, scratch_floats })
    }
}

/// Sets the large-batch kernel of the convolution step just pushed, and the node it reads.
fn set_alt(steps: &mut [Step], alt: Option<Box<LazyKernel>>, source: NodeId) {
    if let Some(last) = steps.last_mut() {
        last.alt = alt;
        last.source = Some(source);
    }
}

/// The kernel for `options.batch`, and the one for [`LARGE_BATCH`] when it differs.
#[allow(clippy::too_many_arguments)]
fn lower_conv_pair(conv: &ConvOp, source: NodeId, input: View, output: View, residual: Option<View>, up: usize, lanes: usize, options: &PlanOptions) -> Result<(StepKind, Option<Box<LazyKernel>>)> {
    if options.precision == Precision::Int8 {
        let calibration = options.calibration.as_ref().context("an int8 plan needs a calibration (the activation ranges)")?;
        let unit = match options.int8_unit {
            Some(unit) => unit,
            None => Int8Unit::active()?,
        };
        if let Some(kind) = lower_int8(conv, input, output, residual, up, calibration.range(source), unit)? {
            return Ok((kind, None));
        }
    }
    if options.precision == Precision::Bf16 {
        let unit = match options.bf16_unit {
            Some(unit) => unit,
            None => Bf16Unit::active()?,
        };
        if let Some(kind) = lower_bf16(conv, input, output, residual, up, unit)? {
            return Ok((kind, None));
        }
    }
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
    let gather = gathers(conv, residual, up) && input.h >= 2 && input.w >= 2;
    if !(dense3 || transposed || gather) || conv.cout <= SMALL_K {
        return None;
    }
    let (r, phases) = if dense3 { (3, 1) } else { (2, 4) };
    let candidates: &[usize] = if dense3 { &[4] } else { &[2, 3, 4] };
    // The phase grid: the input map, or a gathering convolution's output.
    let (h, w) = if gather { (input.h / 2, input.w / 2) } else { (input.h, input.w) };
    choose_winograd(h, w, conv.cin, conv.cout, phases, r, candidates, lanes, batch, policy)
}

/// Whether a convolution is a Conv(k4, s2, p1) (a ConvTranspose(k4, s2, p1)'s input
/// gradient), which Winograd runs as four gathered 2×2 phases.
fn gathers(conv: &ConvOp, residual: Option<View>, up: usize) -> bool {
    conv.kind == ConvKind::Dense && conv.k == 4 && conv.stride == 2 && conv.pad == 1 && up == 1 && residual.is_none()
}

/// Per-thread scratch floats the kernels need.
pub(super) fn max_scratch<'a>(kinds: impl Iterator<Item = &'a StepKind>) -> usize {
    kinds
        .map(|k| match k {
            StepKind::Winograd(w) => w.scratch_floats(),
            StepKind::Bf16(b) => b.scratch_floats(),
            StepKind::Int8(b) => b.scratch_floats(),
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
        StepKind::Bf16(d) => (d.residual.iter().map(|r| r.buffer).chain([d.input.buffer]).collect(), vec![d.output.buffer]),
        StepKind::Int8(d) => (d.residual.iter().map(|r| r.buffer).chain([d.input.buffer]).collect(), vec![d.output.buffer]),
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

/// A convolution as the reduced-precision kernels compute it: phases of taps over a grid,
/// weights `[phase][tap][c][o]` and biases `[phase][o]`.
struct GemmForm {
    phases: Vec<Phase>,
    stride: usize,
    up: usize,
    grid: (usize, usize),
    cin: usize,
    cout: usize,
    weights: Vec<f32>,
    bias: Vec<f32>,
}

impl GemmForm {
    fn weight(&self, p: usize, t: usize, c: usize, o: usize) -> f32 {
        let taps = self.phases[0].taps.len();
        self.weights[((p * taps + t) * self.cin + c) * self.cout + o]
    }
}

/// The GEMM form of a convolution, or `None` for the layers that stay f32 in every
/// precision: depthwise (memory-bound, as their sums are few), and the logits (at most
/// [`SMALL_K`] channels).
fn gemm_form(conv: &ConvOp, input: View, output: View, residual: Option<View>, up: usize) -> Result<Option<GemmForm>> {
    if !runs_reduced(conv, up) {
        return Ok(None);
    }
    let (cin, k, w) = (conv.cin, conv.k, &conv.weight);
    let grid = (input.h, input.w);
    let form = |phases: Vec<Phase>, stride: usize, up: usize, grid: (usize, usize), cout: usize, weight: &dyn Fn(usize, usize, usize, usize) -> f32, bias: &dyn Fn(usize, usize) -> f32| {
        let taps = phases[0].taps.len();
        let mut weights = vec![0f32; phases.len() * taps * cin * cout];
        let mut biases = vec![0f32; phases.len() * cout];
        for p in 0..phases.len() {
            for t in 0..taps {
                for c in 0..cin {
                    for o in 0..cout {
                        weights[((p * taps + t) * cin + c) * cout + o] = weight(p, t, c, o);
                    }
                }
            }
            for o in 0..cout {
                biases[p * cout + o] = bias(p, o);
            }
        }
        GemmForm { phases, stride, up, grid, cin, cout, weights, bias: biases }
    };
    let lowered = match conv.kind {
        ConvKind::Transposed => {
            ensure!(k == 4 && conv.stride == 2 && conv.pad == 1 && up == 1 && residual.is_none(), "transposed convolutions must be 4×4, stride 2, padding 1");
            let cout = conv.cout;
            // Output 2i + a sees input i + d through kernel tap t: a = 0: (0, 1), (−1, 3);
            // a = 1: (1, 0), (0, 2).
            let taps_1d = |a: usize| if a == 0 { [(0isize, 1usize), (-1, 3)] } else { [(1, 0), (0, 2)] };
            let mut phases = Vec::new();
            let mut kernel_taps = Vec::new();
            for a in 0..2 {
                for b in 0..2 {
                    let pairs: Vec<_> = taps_1d(a).into_iter().flat_map(|y| taps_1d(b).map(move |x| (y, x))).collect();
                    phases.push(Phase { taps: pairs.iter().map(|&((dy, _), (dx, _))| (dy, dx)).collect(), sub: (a, b) });
                    kernel_taps.push(pairs.iter().map(|&((_, ty), (_, tx))| (ty, tx)).collect::<Vec<_>>());
                }
            }
            let weight = |p: usize, t: usize, c: usize, o: usize| {
                let (ty, tx) = kernel_taps[p][t];
                w[((c * cout + o) * 4 + ty) * 4 + tx]
            };
            form(phases, 1, 2, grid, cout, &weight, &|_, o| conv.bias[o])
        }
        ConvKind::Dense if up == 2 => {
            ensure!(k == 1 && residual.is_none(), "internal: depth-to-space after a {k}×{k} convolution");
            let cout = conv.cout / 4;
            let phases = (0..4).map(|p| Phase { taps: vec![(0, 0)], sub: (p / 2, p % 2) }).collect();
            let weight = |p: usize, _: usize, c: usize, o: usize| w[(o * 4 + p) * cin + c];
            form(phases, 1, 2, grid, cout, &weight, &|p, o| conv.bias[o * 4 + p])
        }
        _ => {
            ensure!(conv.pad <= 1 || conv.stride == 1, "strided convolutions with padding over 1 are not supported");
            if conv.stride == 1 {
                ensure!(2 * conv.pad + 1 == k, "stride-1 convolutions must keep the map size (padding (k − 1)/2)");
            }
            let pad = conv.pad as isize;
            let taps = (0..k * k).map(|t| ((t / k) as isize - pad, (t % k) as isize - pad)).collect();
            let weight = |_: usize, t: usize, c: usize, o: usize| w[(o * cin + c) * k * k + t];
            form(vec![Phase { taps, sub: (0, 0) }], conv.stride, 1, (output.h, output.w), conv.cout, &weight, &|_, o| conv.bias[o])
        }
    };
    Ok(Some(lowered))
}

/// Whether a convolution (followed by depth-to-space by 2 when `up` = 2) runs in a plan's
/// reduced precision: all but the depthwise ones and the logits (at most [`SMALL_K`]
/// channels). The ONNX writer quantizes exactly these.
pub fn runs_reduced(conv: &ConvOp, up: usize) -> bool {
    conv.kind != ConvKind::Depthwise && conv.cout / if up == 2 && conv.kind == ConvKind::Dense { 4 } else { 1 } > SMALL_K
}

/// A convolution in bf16 ([`Bf16Conv`]), or `None` for the layers that stay f32.
fn lower_bf16(conv: &ConvOp, input: View, output: View, residual: Option<View>, up: usize, unit: Bf16Unit) -> Result<Option<StepKind>> {
    let Some(f) = gemm_form(conv, input, output, residual, up)? else { return Ok(None) };
    ensure!(unit.supported(), "this CPU cannot run the {} bf16 kernels", unit.name());
    let residual = if f.up == 1 { residual } else { None };
    let kind = Bf16Conv::new(input, output, residual, f.phases.clone(), f.stride, f.up, f.grid, f.cin, f.cout, &|p, t, c, o| f.weight(p, t, c, o), &|p, o| f.bias[p * f.cout + o], conv.act.bounds(), unit);
    Ok(Some(StepKind::Bf16(kind)))
}

/// A convolution in int8 ([`Int8Conv`]) quantizing its input with `range`, or `None` for the
/// layers that stay f32 (those of [`gemm_form`], and any without a calibrated range).
#[allow(clippy::too_many_arguments)]
fn lower_int8(conv: &ConvOp, input: View, output: View, residual: Option<View>, up: usize, range: Option<(f32, f32)>, unit: Int8Unit) -> Result<Option<StepKind>> {
    let Some((lo, hi)) = range else { return Ok(None) };
    let Some(f) = gemm_form(conv, input, output, residual, up)? else { return Ok(None) };
    ensure!(unit.supported(), "this CPU cannot run the {} int8 kernels", unit.name());
    let residual = if f.up == 1 { residual } else { None };
    let quant = activation_quant(lo, hi);
    let kind = Int8Conv::new(input, output, residual, f.phases.clone(), f.stride, f.up, f.grid, f.cin, f.cout, &|p, t, c, o| f.weight(p, t, c, o), &|p, o| f.bias[p * f.cout + o], conv.act.bounds(), quant, conv.kind == ConvKind::Transposed, unit);
    Ok(Some(StepKind::Int8(kind)))
}

/// Chooses a kernel for one convolution and packs its weights.
#[allow(clippy::too_many_arguments)]
pub(super) fn lower_conv(conv: &ConvOp, input: View, output: View, residual: Option<View>, up: usize, lanes: usize, policy: WinogradPolicy, batch: usize) -> Result<StepKind> {
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
            // phases of 2×2 correlations), Conv(k4, s2, p1) (four gathered phases).
            let dense3 = conv.kind == ConvKind::Dense && k == 3 && conv.stride == 1 && up == 1 && residual.is_none();
            let gather = gathers(conv, residual, up);
            if let Some(m) = winograd_choice(conv, input, residual, up, lanes, policy, batch) {
                let transform = winograd::Transform::new(m, if dense3 { 3 } else { 2 });
                let mr = gemm::tile_rows(lanes, nv);
                let cin_padded = cin.div_ceil(lanes) * lanes;
                let xi = transform.alpha * transform.alpha;
                let (gh, gw) = if gather { (output.h, output.w) } else { (input.h, input.w) };
                let tiles = gh.div_ceil(m) * gw.div_ceil(m);
                // Rows of V: all four phases' channels when gathering.
                let row_phases = if gather { 4 } else { 1 };
                // V and one panel of M for a block within half of a core's L2; when the
                // transformed weights (read once per block) are larger than that themselves,
                // within all of it: fewer, larger blocks read them fewer times.
                let u_bytes = xi * row_phases * cin * cout * 4;
                let budget = if u_bytes > l2_bytes() / 2 { l2_bytes() / 4 } else { l2_bytes() / 2 / 4 };
                let per_tile = xi * (row_phases * cin_padded + nr);
                let block = ((budget / per_tile) / mr).clamp(1, tiles.div_ceil(mr).max(1)) * mr;
                let (wphases, u) = if dense3 {
                    let phase = winograd::WinogradPhase { origin: (-1, -1), sub: (0, 0) };
                    (vec![phase], winograd::pack(&transform, cin, cout, nr, |o, c, g| g.copy_from_slice(&conv.weight[(o * cin + c) * 9..][..9])))
                } else if gather {
                    // Phase (a, b) reads input pixels 2(i + u) − a, 2(j + v) − b through kernel
                    // taps [1, 3] (a = 0) or [0, 2] (a = 1); U's channels are the phases'
                    // channels in turn, `q·cin + c`.
                    let taps = |a: usize| conv::K4S2_PHASE_TAPS[a];
                    let wphases = (0..4).map(|q| winograd::WinogradPhase { origin: (-((q / 2) as isize), -((q % 2) as isize)), sub: (0, 0) }).collect();
                    let u = winograd::pack(&transform, 4 * cin, cout, nr, |o, qc, g| {
                        let (q, c) = (qc / cin, qc % cin);
                        for (i, ty) in taps(q / 2).into_iter().enumerate() {
                            for (j, tx) in taps(q % 2).into_iter().enumerate() {
                                g[i * 2 + j] = conv.weight[((o * cin + c) * 4 + ty) * 4 + tx];
                            }
                        }
                    });
                    (wphases, u)
                } else {
                    // Phase (a, b) correlates 2×2 inputs from offset (a − 1, b − 1) with kernel
                    // taps [3, 1] (a = 0) or [2, 0] (a = 1) of the 4×4 transposed kernel.
                    let taps = |a: usize| {
                        let [near, far] = conv::K4S2_PHASE_TAPS[a];
                        [far, near]
                    };
                    let mut wphases = Vec::new();
                    let mut u = Vec::with_capacity(4 * xi * cout.div_ceil(nr) * cin * nr);
                    for a in 0..2 {
                        for b in 0..2 {
                            wphases.push(winograd::WinogradPhase { origin: (a as isize - 1, b as isize - 1), sub: (a, b) });
                            u.extend(winograd::pack(&transform, cin, cout, nr, |o, c, g| {
                                for (i, ty) in taps(a).into_iter().enumerate() {
                                    for (j, tx) in taps(b).into_iter().enumerate() {
                                        g[i * 2 + j] = conv.weight[((c * cout + o) * 4 + ty) * 4 + tx];
                                    }
                                }
                            }));
                        }
                    }
                    (wphases, u)
                };
                let (up, stride) = match (dense3, gather) {
                    (true, _) => (1, 1),
                    (_, true) => (1, 2),
                    _ => (2, 1),
                };
                return Ok(StepKind::Winograd(WinogradConv { input, output, transform, phases: wphases, up, stride, cin, cout, nv, lanes, block, u, bias, min, max }));
            }
            // 8-pixel-wide maps: tiles along rows waste no border pixels (AVX-512 tile 8×2).
            let positions = match positions {
                Positions::Flat { up } if lanes == 16 && nv == 2 && input.w == super::conv::ROW_TILE => Positions::Rows { up },
                other => other,
            };
            let mut packed = Vec::new();
            if conv.kind == ConvKind::Dense && up == 1 {
                // One phase of every tap, weights `[cout][cin][k·k]`: without the per-value call.
                packed = gemm::pack_dense(&conv.weight, k * k, cin, cout, nr);
            } else if conv.kind == ConvKind::Transposed {
                // The four phases of a ConvTranspose(k4, s2, p1), weights `[cin][cout][4][4]`
                // (the kernel taps of phase (a, b) as in its closure above).
                packed = gemm::pack_transposed_k4(&conv.weight, cin, cout, nr);
            } else {
                for (phase, f) in &phases {
                    packed.extend(gemm::pack_panels(phase.taps.len(), cin, cout, nr, f));
                }
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
        (macs / (macs_per_cycle * direct_efficiency(lanes, r, batch)))
            .max(traffic(p * (r * r) as f64 * c * k * 4.0, 1.0))
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
    // Weights packed on every call (training) cost as much again: on one thread of `threads`
    // while the convolution runs on all, at about PACK_CYCLES per packed float.
    let pack = |floats: f64, per: f64| match policy {
        WinogradPolicy::AutoRepacked { threads } => floats * per * threads.max(1) as f64,
        _ => 0.0,
    };
    let winograd_total = |m: usize| {
        let alpha = (m + r - 1) as f64;
        winograd(m) + pack(p * alpha * alpha * c * k, WINOGRAD_PACK_CYCLES)
    };
    let best = candidates.iter().copied().filter(|&m| h >= m && w >= m).min_by(|&a, &b| winograd_total(a).total_cmp(&winograd_total(b)))?;
    let direct_total = direct + pack(p * (r * r) as f64 * c * k, DIRECT_PACK_CYCLES);
    match policy {
        WinogradPolicy::Never => None,
        WinogradPolicy::Always => Some(best),
        WinogradPolicy::Tile(m) => (candidates.contains(&m) && h >= m && w >= m).then_some(m),
        WinogradPolicy::Auto | WinogradPolicy::AutoRepacked { .. } => (cin >= WINOGRAD_MIN_CHANNELS && winograd_total(best) < direct_total).then_some(best),
    }
}

/// The direct kernel's share of the FMA peak, relative to the AVX-512 calibration above. With
/// 8 lanes (AVX2's 16 ymm registers hold smaller register tiles than AVX-512's 32 zmm, and a
/// 12-channel map pads to 16) it reached 54–73% of the one-core FMA peak on a Zen 3 (92
/// GFLOP/s, `examples/dot_peak.rs`), while Winograd's transforms cost about the same per
/// point: the smoke UNet's 128² 12→12 layers and its 8² 128- and 256-channel layers ran 1.6–1.8×
/// faster as Winograd there at batch 1, where the AVX-512 calibration picks the direct kernel.
/// The 2×2 phase form (strided and transposed layers) keeps the calibration: as Winograd
/// F(2×2, 2×2) `mobilenetv2_unet`'s decoder ran 7% slower there. So do larger batches: at
/// batch 8 the 128² layers' Winograd tiles lost to the direct kernel again (10.6 against
/// 9.0 ms for eight images), and the 8² layers are Winograd under the calibration already.
fn direct_efficiency(lanes: usize, r: usize, batch: usize) -> f64 {
    if lanes >= 16 || r != 3 || batch > 1 {
        1.0
    } else {
        0.6
    }
}

/// Cycles per float of packing Winograd weights (`U = G g Gᵀ`, scattered stores) and direct
/// weights (a copy into panels), measured on AVX-512 for training's per-call packing.
const WINOGRAD_PACK_CYCLES: f64 = 6.0;
const DIRECT_PACK_CYCLES: f64 = 2.0;

/// This machine's per-core L2 size (Linux sysfs), 1 MiB when unknown.
pub fn l2_bytes() -> usize {
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
