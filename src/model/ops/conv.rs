//! Convolutions on CPU feature maps as candle custom ops with their own backward passes, on
//! the inference engine's kernels:
//!
//! - forward: the engine's convolution for the layer ([`Kernel::conv`]: direct register
//!   tiles, Winograd where its cost model says so, the dot-product kernel for the logits),
//!   weights packed on each call;
//! - input gradient: a stride-1 convolution's is the convolution of the output gradient with
//!   the flipped, transposed kernel, and a transposed convolution's is a strided
//!   convolution — both on the same engine kernels; a strided convolution's and a stride-2
//!   depthwise one's spread each output gradient over its window;
//! - weight gradient: [`WeightGrad`] (one outer-product reduction per tap on the engine's
//!   register tile), or the depthwise kernel's per-channel sums; bias gradients are sums of
//!   the output gradient.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor, bail};
use rayon::prelude::*;

use super::fmap::{self, alloc_map, profile, data, map_of, par_items, row_grain, shape_of, storage, sum_rows, with_scratch, with_slack};
use crate::engine::graph::{Act, ConvKind, ConvOp};
use crate::engine::grad::{WeightGrad, tap_major_to_weights};
use crate::engine::grad_winograd::GradWinograd;
use crate::engine::kernels::{Kernel, KernelOptions, zero_borders};
use crate::engine::maps::{CPtr, DepthwiseGradInputS2, DepthwiseGradWeight, MapShape, Ptr, RowSums, StridedGradInput};
use crate::engine::{Isa, WinogradPolicy};

/// A convolution's geometry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvGeometry {
    pub kind: ConvKind,
    pub k: usize,
    pub stride: usize,
    pub pad: usize,
}

impl ConvGeometry {
    /// `(cin, cout)` from a weight's dims (`Dense [cout, cin, k, k]`, `Depthwise [c, 1, k, k]`,
    /// `Transposed [cin, cout, k, k]`), checking the kernel size.
    pub(super) fn channels(&self, w: &[usize]) -> Result<(usize, usize)> {
        let [a, b, kh, kw] = w else { bail!("convolution weights must be 4-D, not {w:?}") };
        if *kh != self.k || *kw != self.k {
            bail!("convolution weights {w:?} are not {}×{}", self.k, self.k);
        }
        Ok(match self.kind {
            ConvKind::Dense => (*b, *a),
            ConvKind::Depthwise => (*a, *a),
            ConvKind::Transposed => (*a, *b),
        })
    }
}

/// Runs a compiled kernel over `n` maps: `out` gets the output, border zeroed.
fn run_kernel(kernel: &Kernel, x: &[f32], n: usize) -> Vec<f32> {
    let (oh, ow, oc) = kernel.output_shape();
    let om = MapShape::new(oh, ow, oc);
    let mut out = alloc_map(n, om);
    let threads = rayon::current_num_threads();
    let work = kernel.work(n, threads);
    let scratch = kernel.scratch_floats();
    let (xp, op) = (CPtr(x.as_ptr()), Ptr(out.as_mut_ptr()));
    // SAFETY: `out` holds n output maps; the border is not written by the kernel.
    unsafe { zero_borders(op.0, n, oh, ow, oc) };
    let run = |item: usize| {
        let (xp, op) = (&xp, &op);
        with_scratch(scratch, |s| {
            // SAFETY: `x` holds n input maps and their slack (the caller's `with_slack`), `out`
            // n output maps; items write disjoint outputs; each thread has its own scratch.
            unsafe { kernel.run(xp.0, op.0, n, &work, item, s) }
        })
    };
    if threads <= 1 || work.items <= 1 {
        (0..work.items).for_each(run);
    } else {
        (0..work.items).into_par_iter().for_each(run);
    }
    out
}

/// The forward pass: `x` (with slack) of `n` maps of `xm` through the layer with weights `w`
/// (candle's layout), optional bias and activation.
#[allow(clippy::too_many_arguments)]
pub(super) fn forward(g: ConvGeometry, x: &[f32], n: usize, xm: MapShape, w: &[f32], cin: usize, cout: usize, bias: Option<&[f32]>, act: Act, isa: Isa) -> Result<(Vec<f32>, MapShape)> {
    if xm.c != cin {
        bail!("convolution: the input has {} channels, the weights expect {cin}", xm.c);
    }
    let x = &*fmap::operand(x);
    let w = &*fmap::operand(w);
    let op = ConvOp {
        kind: g.kind,
        cin,
        cout,
        k: g.k,
        stride: g.stride,
        pad: g.pad,
        weight: w.to_vec(),
        bias: bias.map_or_else(|| vec![0.0; cout], |b| b.to_vec()),
        act,
    };
    let options = KernelOptions { isa, winograd: WinogradPolicy::AutoRepacked { threads: rayon::current_num_threads() }, batch: n };
    let what = || format!("{:?} k{} s{} {cin}→{cout} {}×{}", g.kind, g.k, g.stride, xm.h, xm.w);
    let kernel = profile::timed(|| format!("pack {}", what()), || Kernel::conv(&op, xm.h, xm.w, &options))
        .map_err(|e| candle_core::Error::Msg(format!("convolution: {e:#}")))?;
    let (oh, ow, oc) = kernel.output_shape();
    let started = profile::on().then(std::time::Instant::now);
    let out = profile::timed(|| format!("run  {} [{}]", what(), kernel.name()), || run_kernel(&kernel, x, n));
    if let Some(t) = started {
        profile::add_pass(None, layer_flops(g, n, xm, (oh, ow), cin, cout), t.elapsed().as_secs_f64());
    }
    Ok((out, MapShape::new(oh, ow, oc)))
}

/// Floating-point operations of a convolution layer as defined (multiply-adds count two; not
/// what Winograd multiplies): `xm` the input map, `(oh, ow)` the output size.
fn layer_flops(g: ConvGeometry, n: usize, xm: MapShape, (oh, ow): (usize, usize), cin: usize, cout: usize) -> f64 {
    let kk = (g.k * g.k) as f64;
    let n = n as f64;
    match g.kind {
        ConvKind::Dense => 2.0 * n * (oh * ow) as f64 * (cin * cout) as f64 * kk,
        ConvKind::Depthwise => 2.0 * n * (oh * ow) as f64 * cin as f64 * kk,
        ConvKind::Transposed => 2.0 * n * (xm.h * xm.w) as f64 * (cin * cout) as f64 * kk,
    }
}

/// Dense convolution weights `[cout][cin][k][k]` of the input gradient of a stride-1 'same'
/// convolution: `w'[ci][co][ky][kx] = w[co][ci][k−1−ky][k−1−kx]`.
fn flipped_transposed(w: &[f32], cin: usize, cout: usize, k: usize) -> Vec<f32> {
    let kk = k * k;
    let mut out = vec![0f32; w.len()];
    for co in 0..cout {
        for ci in 0..cin {
            for t in 0..kk {
                out[(ci * cout + co) * kk + (kk - 1 - t)] = w[(co * cin + ci) * kk + t];
            }
        }
    }
    out
}

/// The convolution forward op: `(x, w[, b])`.
#[derive(Debug, Clone)]
pub struct ConvOpFwd {
    pub geometry: ConvGeometry,
    pub act: Act,
}

impl ConvOpFwd {
    fn compute(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout, bias: Option<&[f32]>) -> Result<(CpuStorage, Shape)> {
        let (n, xm) = map_of(l1)?;
        let x = with_slack(s1, l1, fmap::slack_of(xm), "convolution")?;
        let w = data(s2, l2, "convolution")?;
        let (cin, cout) = self.geometry.channels(l2.shape().dims())?;
        let (out, om) = forward(self.geometry, &x, n, xm, w, cin, cout, bias, self.act, fmap::isa()?)?;
        Ok((storage(out), Shape::from(shape_of(n, om))))
    }

    /// `(dx, dw, db)` for an output gradient `dy`.
    fn backward(&self, x: &Tensor, w: &Tensor, dy: &Tensor, bias: bool) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        if self.act != Act::Identity {
            bail!("convolution: no backward pass through a fused activation");
        }
        let dy = dy.contiguous()?;
        let dx = if x.track_op() {
            Some(dy.apply_op2_no_bwd(&w.contiguous()?, &GradInput { geometry: self.geometry, x_dims: x.dims().to_vec() })?)
        } else {
            None
        };
        let dw = x.contiguous()?.apply_op2_no_bwd(&dy, &GradWeight { geometry: self.geometry, w_dims: w.dims().to_vec() })?;
        let db = if bias { Some(dy.apply_op1_no_bwd(&BiasGrad)?) } else { None };
        Ok((dx, Some(dw), db))
    }
}

impl CustomOp2 for ConvOpFwd {
    fn name(&self) -> &'static str {
        "segctl-conv"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        self.compute(s1, l1, s2, l2, None)
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, _) = self.backward(x, w, dy, false)?;
        Ok((dx, dw))
    }
}

impl CustomOp3 for ConvOpFwd {
    fn name(&self) -> &'static str {
        "segctl-conv-bias"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout, s3: &CpuStorage, l3: &Layout) -> Result<(CpuStorage, Shape)> {
        let b = data(s3, l3, "convolution bias")?;
        self.compute(s1, l1, s2, l2, Some(b))
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, _b: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        self.backward(x, w, dy, true)
    }
}

/// `(dy, w) → dx`.
struct GradInput {
    geometry: ConvGeometry,
    x_dims: Vec<usize>,
}

impl CustomOp2 for GradInput {
    fn name(&self) -> &'static str {
        "segctl-conv-grad-input"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, om) = map_of(l1)?;
        let w = data(s2, l2, "convolution gradient")?;
        let dy = with_slack(s1, l1, fmap::slack_of(om), "convolution gradient")?;
        let (out, xm) = grad_input(self.geometry, &dy, n, om, w, l2.shape().dims(), &self.x_dims, fmap::isa()?)?;
        Ok((storage(out), Shape::from(shape_of(n, xm))))
    }
}

/// A convolution's input gradient from the output gradient `dy` (`n` maps of `om`, with
/// slack) and the weights `w` (dims `w_dims`); the input's candle dims are `x_dims`.
#[allow(clippy::too_many_arguments)]
pub(super) fn grad_input(g: ConvGeometry, dy: &[f32], n: usize, om: MapShape, w: &[f32], w_dims: &[usize], x_dims: &[usize], isa: Isa) -> Result<(Vec<f32>, MapShape)> {
    let started = profile::on().then(std::time::Instant::now);
    let (nested, xm) = profile::in_pass("nested", || grad_input_inner(g, dy, n, om, w, w_dims, x_dims, isa))?;
    if let Some(t) = started {
        let (cin, cout) = g.channels(w_dims)?;
        profile::add_pass(Some("input-gradient"), layer_flops(g, n, xm, (om.h, om.w), cin, cout), t.elapsed().as_secs_f64());
    }
    Ok((nested, xm))
}

#[allow(clippy::too_many_arguments)]
fn grad_input_inner(g: ConvGeometry, dy: &[f32], n: usize, om: MapShape, w: &[f32], w_dims: &[usize], x_dims: &[usize], isa: Isa) -> Result<(Vec<f32>, MapShape)> {
    let (cin, cout) = g.channels(w_dims)?;
    let [_, hp, wp, _] = x_dims[..] else { bail!("convolution gradient: bad input shape {x_dims:?}") };
    let dy = &*fmap::operand(dy);
    let w = &*fmap::operand(w);
    let xm = MapShape::new(hp - 2, wp - 2, cin);
let out = match g.kind {
        ConvKind::Dense if g.stride == 1 => {
            let wt = flipped_transposed(w, cin, cout, g.k);
            let flipped = ConvGeometry { pad: g.k - 1 - g.pad, ..g };
            forward(flipped, &dy, n, om, &wt, cout, cin, None, Act::Identity, isa)?.0
        }
        ConvKind::Dense => profile::timed(|| format!("grad-input strided k{} s{} {cout}→{cin} {}×{}", g.k, g.stride, om.h, om.w), || -> Result<Vec<f32>> {
            let pc = fmap::padded(cin, isa);
            let kk = g.k * g.k;
            // [tap][cout][cin rounded up].
            let mut packed = vec![0f32; kk * cout * pc];
            for co in 0..cout {
                for ci in 0..cin {
                    for t in 0..kk {
                        packed[(t * cout + co) * pc + ci] = w[(co * cin + ci) * kk + t];
                    }
                }
            }
            let mut out = alloc_map(n, xm);
            let kernel = StridedGradInput {
                map: xm,
                out: om,
                n,
                k: g.k,
                stride: g.stride,
                pad: g.pad,
                dy: CPtr(dy.as_ptr()),
                dx: Ptr(out.as_mut_ptr()),
                weights: CPtr(packed.as_ptr()),
                padded_c: pc,
            };
            par_items(isa, &kernel, 1);
            Ok(out)
        })?,
        ConvKind::Transposed => {
            // dx[i] = Σ_t dy[2i + t − 1] · w[ci][co][t]: a stride-2 convolution of dy whose
            // weights [out = ci][in = co][t] are the transposed kernel as it is.
            let conv = ConvGeometry { kind: ConvKind::Dense, ..g };
            forward(conv, &dy, n, om, w, cout, cin, None, Act::Identity, isa)?.0
        }
        ConvKind::Depthwise if g.stride == 1 => {
            let kk = g.k * g.k;
            let flipped: Vec<f32> = (0..cin * kk).map(|i| w[(i / kk) * kk + kk - 1 - i % kk]).collect();
            forward(ConvGeometry { pad: g.k - 1 - g.pad, ..g }, &dy, n, om, &flipped, cin, cin, None, Act::Identity, isa)?.0
        }
        ConvKind::Depthwise => profile::timed(|| format!("grad-input depthwise s2 c{cin} {}×{}", om.h, om.w), || -> Result<Vec<f32>> {
            if g.k != 3 || g.pad != 1 || g.stride != 2 {
                bail!("depthwise convolution gradients need 3×3 kernels, padding 1, stride 1 or 2");
            }
            let pc = fmap::padded(cin, isa);
            let mut packed = vec![0f32; 9 * pc];
            for c in 0..cin {
                for t in 0..9 {
                    packed[t * pc + c] = w[c * 9 + t];
                }
            }
            let mut out = alloc_map(n, xm);
            let kernel = DepthwiseGradInputS2 { map: xm, out: om, n, dy: CPtr(dy.as_ptr()), dx: Ptr(out.as_mut_ptr()), weights: CPtr(packed.as_ptr()), padded_c: pc };
            par_items(isa, &kernel, 1);
            Ok(out)
        })?,
    };
    Ok((out, xm))
}

/// `(x, dy) → dw` in the weight's layout.
struct GradWeight {
    geometry: ConvGeometry,
    w_dims: Vec<usize>,
}

impl CustomOp2 for GradWeight {
    fn name(&self) -> &'static str {
        "segctl-conv-grad-weight"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = self.geometry;
        let (_, xm) = map_of(l1)?;
        let what = || format!("grad-weight {:?} k{} s{} {:?} {}×{}", g.kind, g.k, g.stride, self.w_dims, xm.h, xm.w);
        profile::timed(what, || self.compute(s1, l1, s2, l2))
    }
}

impl GradWeight {
    fn compute(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, xm) = map_of(l1)?;
        let (_, om) = map_of(l2)?;
        let x = with_slack(s1, l1, fmap::slack_of(xm), "convolution gradient")?;
        let dy = with_slack(s2, l2, fmap::slack_of(om), "convolution gradient")?;
        let out = grad_weight(self.geometry, &x, xm, &dy, om, n, fmap::isa()?)?;
        Ok((storage(out), Shape::from(self.w_dims.clone())))
    }
}

/// A convolution's weight gradient, in the weight's layout, from its input `x` (`n` maps of
/// `xm`) and output gradient `dy` (`n` maps of `om`), both with slack.
pub(super) fn grad_weight(g: ConvGeometry, x: &[f32], xm: MapShape, dy: &[f32], om: MapShape, n: usize, isa: Isa) -> Result<Vec<f32>> {
    let started = profile::on().then(std::time::Instant::now);
    let out = grad_weight_inner(g, x, xm, dy, om, n, isa)?;
    if let Some(t) = started {
        let (cin, cout) = if g.kind == ConvKind::Depthwise { (xm.c, xm.c) } else { (xm.c, om.c) };
        profile::add_pass(Some("weight-gradient"), layer_flops(g, n, xm, (om.h, om.w), cin, cout), t.elapsed().as_secs_f64());
    }
    Ok(out)
}

fn grad_weight_inner(g: ConvGeometry, x: &[f32], xm: MapShape, dy: &[f32], om: MapShape, n: usize, isa: Isa) -> Result<Vec<f32>> {
        let (x, dy) = (&*fmap::operand(x), &*fmap::operand(dy));
        let threads = rayon::current_num_threads();
        let out = if g.kind == ConvKind::Depthwise {
            let c = xm.c;
            let pc = fmap::padded(c, isa);
            let kernel = DepthwiseGradWeight { map: xm, out: om, n, stride: g.stride, x: CPtr(x.as_ptr()), dy: CPtr(dy.as_ptr()), sums: Ptr(std::ptr::null_mut()), padded_c: pc };
            let items = n * om.h;
            let mut sums = fmap::zeros(items * 9 * pc);
            let kernel = DepthwiseGradWeight { sums: Ptr(sums.as_mut_ptr()), ..kernel };
            par_items(isa, &kernel, row_grain(om.w, c));
            let total = sum_rows(&sums, 9 * pc);
            let mut out = vec![0f32; c * 9];
            for ch in 0..c {
                for t in 0..9 {
                    out[ch * 9 + t] = total[t * pc + ch] as f32;
                }
            }
            out
        } else {
            // A: the small-side map (output gradient of a convolution, input of a transposed one).
            let (a, am, b, bm) = if g.kind == ConvKind::Transposed { (x, xm, dy, om) } else { (dy, om, x, xm) };
            if let Some(m) = GradWinograd::choose(am, bm, g.k, g.stride, g.pad) {
                return grad_weight_winograd(a, am, b, bm, n, m, threads, isa);
            }
            let wg = WeightGrad::new(am, bm, g.k, g.stride, g.pad, n, threads, isa).map_err(|e| candle_core::Error::Msg(format!("convolution gradient: {e:#}")))?;
            let items = wg.items();
            let len = wg.buffer_len();
            let (ap, bp) = (CPtr(a.as_ptr()), CPtr(b.as_ptr()));
            let buffer = if wg.splits_pixels() {
                // Partial sums per chunk of items, added at the end.
                let chunks = (2 * threads).min(items).max(1);
                let run = |chunk: usize| {
                    let mut grad = fmap::zeros(len);
                    let (ap, bp) = (&ap, &bp);
                    for item in chunk * items / chunks..(chunk + 1) * items / chunks {
                        // SAFETY: both maps hold n images and their slack; `grad` is this chunk's.
                        unsafe { wg.run(ap.0, bp.0, item, grad.as_mut_ptr()) };
                    }
                    grad
                };
                let add = |mut a: Vec<f32>, b: Vec<f32>| {
                    a.iter_mut().zip(&b).for_each(|(x, y)| *x += y);
                    a
                };
                if chunks == 1 { run(0) } else { (0..chunks).into_par_iter().map(run).reduce_with(add).unwrap_or_else(|| fmap::zeros(len)) }
            } else {
                let mut grad = fmap::zeros(len);
                let gp = Ptr(grad.as_mut_ptr());
                (0..items).into_par_iter().for_each(|item| {
                    let (ap, bp, gp) = (&ap, &bp, &gp);
                    // SAFETY: as above; items write disjoint parts of `grad`.
                    unsafe { wg.run(ap.0, bp.0, item, gp.0) };
                });
                grad
            };
            into_weight_layout(am.c, bm.c * g.k * g.k, threads, |rows, chunk| wg.finish(&buffer, rows, chunk))
        };
        Ok(out)
}

/// [`grad_weight_inner`] of a k4 s2 p1 pairing by F(2, m) Winograd tiles ([`GradWinograd`]):
/// `a` the small-side map, `b` the one twice its size, both with slack.
#[allow(clippy::too_many_arguments)]
fn grad_weight_winograd(a: &[f32], am: MapShape, b: &[f32], bm: MapShape, n: usize, m: usize, threads: usize, isa: Isa) -> Result<Vec<f32>> {
    let wg = GradWinograd::new(am, bm, n, m, isa).map_err(|e| candle_core::Error::Msg(format!("convolution gradient: {e:#}")))?;
    let (ap, bp) = (CPtr(a.as_ptr()), CPtr(b.as_ptr()));
    // Not zeroed: the transform writes every float of both panels but A's slack vector
    // (tens of MB per layer and step).
    let (a_len, b_len, slack) = (wg.a_panels_len(), wg.b_panels_len(), isa.lanes());
    let mut pa: Vec<f32> = Vec::with_capacity(a_len);
    let mut pb: Vec<f32> = Vec::with_capacity(b_len);
    let (pap, pbp) = (Ptr(pa.as_mut_ptr()), Ptr(pb.as_mut_ptr()));
    (0..wg.transform_items()).into_par_iter().for_each(|item| {
        let (ap, bp, pap, pbp) = (&ap, &bp, &pap, &pbp);
        // SAFETY: both maps hold n padded images and their slack; the panels are sized by
        // `wg`; items write disjoint tiles of them.
        unsafe { wg.transform(ap.0, bp.0, item, pap.0, pbp.0) };
    });
    // SAFETY: the transform items wrote both panels, all but A's slack, zeroed here.
    unsafe {
        std::ptr::write_bytes(pa.as_mut_ptr().add(a_len - slack), 0, slack);
        pa.set_len(a_len);
        pb.set_len(b_len);
    }
    // Every float of the buffer is written once by the GEMM items.
    let mut buffer: Vec<f32> = Vec::with_capacity(wg.buffer_len());
    let gp = Ptr(buffer.as_mut_ptr());
    let (pa, pb) = (CPtr(pa.as_ptr()), CPtr(pb.as_ptr()));
    (0..wg.gemm_items()).into_par_iter().for_each(|item| {
        let (pa, pb, gp) = (&pa, &pb, &gp);
        // SAFETY: the panels are complete; items write disjoint (tap, row) ranges of the
        // buffer's capacity.
        unsafe { wg.gemm(pa.0, pb.0, item, gp.0) };
    });
    // SAFETY: the GEMM items together wrote all of it.
    unsafe { buffer.set_len(wg.buffer_len()) };
    Ok(into_weight_layout(am.c, bm.c * 16, threads, |rows, chunk| tap_major_to_weights(&buffer, 16, am.c, bm.c, false, rows, chunk)))
}

/// The weight gradient in the weight layout, `rows` rows (A's channels) of `per_row` floats,
/// written by `finish(rows, chunk)` in parallel chunks of rows.
fn into_weight_layout(rows: usize, per_row: usize, threads: usize, finish: impl Fn(std::ops::Range<usize>, &mut [f32]) + Sync) -> Vec<f32> {
    let mut out = vec![0f32; rows * per_row];
    let rows_per_chunk = rows.div_ceil(2 * threads).max(1);
    out.par_chunks_mut(rows_per_chunk * per_row).enumerate().for_each(|(i, chunk)| {
        let lo = i * rows_per_chunk;
        finish(lo..lo + chunk.len() / per_row, chunk);
    });
    out
}

/// `dy → db`: the sum of each channel over every pixel.
struct BiasGrad;

impl candle_core::CustomOp1 for BiasGrad {
    fn name(&self) -> &'static str {
        "segctl-bias-grad"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        profile::timed(|| "grad-bias".to_string(), || self.compute(s, l))
    }
}

impl BiasGrad {
    fn compute(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, m) = map_of(l)?;
        let dy = data(s, l, "bias gradient")?;
        let items = n * m.h;
        let mut rows = fmap::zeros(items * m.c);
        let kernel = RowSums { map: m, n, x: CPtr(dy.as_ptr()), out: Ptr(rows.as_mut_ptr()) };
        par_items(fmap::isa()?, &kernel, row_grain(m.w, m.c));
        let total: Vec<f32> = sum_rows(&rows, m.c).into_iter().map(|v| v as f32).collect();
        Ok((storage(total), Shape::from(m.c)))
    }
}

/// A convolution of a feature map (see the module docs); `act` other than identity is for
/// inference only (no backward pass).
pub fn conv(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>, geometry: ConvGeometry, act: Act) -> Result<Tensor> {
    let x = x.contiguous()?;
    let w = weight.contiguous()?;
    let op = ConvOpFwd { geometry, act };
    match (bias, act) {
        (Some(b), Act::Identity) => x.apply_op3(&w, &b.contiguous()?, op),
        (None, Act::Identity) => x.apply_op2(&w, op),
        (Some(b), _) => x.apply_op3_no_bwd(&w, &b.contiguous()?, &op),
        (None, _) => x.apply_op2_no_bwd(&w, &op),
    }
}
