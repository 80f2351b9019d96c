//! The engine's plans of the models against candle's eval forward of the same weights, for both architectures, every
//! instruction set this CPU has, several batch sizes, thread counts and input shapes.

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

use crate::engine::plan::{Plan, PlanOptions, WinogradPolicy, kind_name};
use crate::engine::{Isa, Session};
use crate::config::{Arch, Config};
use crate::model::{ModelSpec, ModelState};
use crate::util::rng::Rng;

/// A model with random weights *and* random BatchNorm statistics (so folding is exercised).
pub(crate) fn random_model(arch: Arch, widths: Option<Vec<usize>>, seed: u64) -> ModelState {
    let mut config = Config::default();
    config.model.arch = arch;
    if let Some(w) = widths {
        config.model.unet.widths = Some(w);
    }
    let spec = ModelSpec::from_config(&config);
    let state = ModelState::new(&spec, &Device::Cpu, seed).unwrap();
    let mut rng = Rng::new(seed ^ 0x5eed);
    for (name, var) in state.named_vars() {
        let n = var.elem_count();
        let values: Vec<f32> = if name.ends_with("running_var") {
            (0..n).map(|_| 0.5 + rng.f32()).collect()
        } else if name.ends_with("running_mean") || name.ends_with(".bias") {
            (0..n).map(|_| 0.2 * rng.normal()).collect()
        } else if var.dims().len() == 1 {
            (0..n).map(|_| 0.8 + 0.4 * rng.f32()).collect()
        } else {
            continue;
        };
        var.set(&Tensor::from_vec(values, var.dims(), &Device::Cpu).unwrap()).unwrap();
    }
    // Logits of a trained model's size (|logit| up to about 8): random deep nets grow
    // activations, and the absolute bound below is meant for realistic values.
    let probe = random_input(1, 64, 64, 99);
    let scale = candle_logits(&state, &probe, 1, 64, 64).iter().fold(0f32, |m, v| m.max(v.abs()));
    for (name, var) in state.named_vars() {
        if name.starts_with("head.") || name.starts_with("decoder.head.") {
            var.set(&(var.as_tensor() * (8.0 / scale as f64)).unwrap()).unwrap();
        }
    }
    state
}

pub(crate) fn random_input(n: usize, h: usize, w: usize, seed: u64) -> Vec<f32> {
    let mut rng = Rng::new(seed);
    (0..n * 3 * h * w).map(|_| rng.normal()).collect()
}

fn candle_logits(state: &ModelState, input: &[f32], n: usize, h: usize, w: usize) -> Vec<f32> {
    let x = Tensor::from_vec(input.to_vec(), (n, 3, h, w), &Device::Cpu).unwrap();
    state.forward(&x, false).unwrap().to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap()
}

fn isas() -> Vec<Isa> {
    [Isa::Avx512, Isa::Avx2, Isa::Portable].into_iter().filter(|i| i.supported()).collect()
}

/// (max |difference|, share of pixels whose argmax agrees).
fn compare(a: &[f32], b: &[f32], classes: usize, plane: usize) -> (f32, f64) {
    let diff = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
    let images = a.len() / (classes * plane);
    let mut agree = 0usize;
    for i in 0..images {
        for p in 0..plane {
            let arg = |v: &[f32]| (0..classes).max_by(|&x, &y| v[(i * classes + x) * plane + p].total_cmp(&v[(i * classes + y) * plane + p])).unwrap();
            agree += (arg(a) == arg(b)) as usize;
        }
    }
    (diff, agree as f64 / (images * plane) as f64)
}

fn check(state: &ModelState, h: usize, w: usize, batches: &[usize], threads: &[usize], policy: WinogradPolicy) {
    let graph = state.model.lower().unwrap();
    let cases: Vec<(usize, Vec<f32>, Vec<f32>)> = batches
        .iter()
        .map(|&n| {
            let input = random_input(n, h, w, n as u64 * 31);
            let expected = candle_logits(state, &input, n, h, w);
            (n, input, expected)
        })
        .collect();
    for isa in isas() {
        let options = PlanOptions { height: h, width: w, isa: Some(isa), winograd: policy, batch: 1, ..PlanOptions::new(h, w) };
        let plan = Arc::new(Plan::compile(&graph, &options).unwrap());
        for &t in threads {
            let mut session = Session::new(Arc::clone(&plan), t).unwrap();
            for (n, input, expected) in &cases {
                let n = *n;
                let uses_winograd = plan.steps.iter().any(|s| kind_name(s.for_batch(n)).starts_with("winograd"));
                let bound = if uses_winograd { 1e-3 } else { 1e-4 };
                let got = session.run(input, n).unwrap().to_vec();
                let (diff, agree) = compare(&got, expected, 3, h * w);
                assert!(
                    diff <= bound && (!uses_winograd || agree >= 0.9999),
                    "{isa:?} {h}×{w} batch {n} threads {t}: max difference {diff} (bound {bound}), argmax agreement {agree}"
                );
                // A second call on the same session (arena reused) gives the same logits.
                let again = session.run(input, n).unwrap();
                assert_eq!(again, &got[..], "{isa:?} batch {n} threads {t}: a second call differs");
                // Fewer of the session's threads (a server's free cores): the same logits
                // within the bound.
                if t > 1 {
                    let fewer = session.run_threads(input, n, 1).unwrap().to_vec();
                    let (diff, _) = compare(&fewer, expected, 3, h * w);
                    assert!(diff <= bound, "{isa:?} batch {n}: 1 of {t} threads differs by {diff}");
                }
            }
        }
    }
}

#[test]
fn smoke_unet_plan_matches_candle() {
    let state = random_model(Arch::Unet, Some(vec![12, 16, 32, 64, 128, 256]), 3);
    check(&state, 64, 64, &[1, 3, 8], &[1, 2, 4], WinogradPolicy::Auto);
}

#[test]
fn direct_only_plan_matches_candle_within_1e4() {
    let state = random_model(Arch::Unet, Some(vec![8, 16, 24]), 4);
    check(&state, 40, 24, &[1, 3, 8], &[1, 2, 4], WinogradPolicy::Never);
}

#[test]
fn winograd_everywhere_on_odd_tiles() {
    // 40×24 → 20×12 → 10×6: tiles of 4 that do not divide the maps.
    let state = random_model(Arch::Unet, Some(vec![8, 16, 24]), 5);
    check(&state, 40, 24, &[1, 3, 8], &[1, 2, 4], WinogradPolicy::Always);
}

#[test]
fn mobilenetv2_unet_plan_matches_candle() {
    let state = random_model(Arch::Mobilenetv2Unet, None, 6);
    check(&state, 64, 96, &[1, 3, 8], &[1, 2, 4], WinogradPolicy::Auto);
}

// ---- Each kernel alone, against candle's op on the same weights ----

mod single {
    use super::*;
    use crate::engine::graph::{Act, ConvKind};
    use crate::engine::graph::{ConvOp, Graph, GraphBuilder};

    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = Rng::new(seed);
        (0..n).map(|_| rng.normal()).collect()
    }

    fn op(kind: ConvKind, cin: usize, cout: usize, k: usize, stride: usize, pad: usize, act: Act, seed: u64) -> ConvOp {
        let len = match kind {
            ConvKind::Depthwise => cin * k * k,
            _ => cin * cout * k * k,
        };
        let scale = 1.0 / ((len / cout.max(1)) as f32).sqrt();
        let weight = values(len, seed).into_iter().map(|v| v * scale).collect();
        ConvOp { kind, cin, cout, k, stride, pad, weight, bias: values(cout, seed + 1), act }
    }

    pub(super) fn tensor(v: &[f32], shape: &[usize]) -> Tensor {
        Tensor::from_vec(v.to_vec(), shape, &Device::Cpu).unwrap()
    }

    /// candle's convolution with bias and activation.
    fn reference_conv(op: &ConvOp, x: &Tensor) -> Tensor {
        let k = op.k;
        let y = match op.kind {
            ConvKind::Dense => x.conv2d(&tensor(&op.weight, &[op.cout, op.cin, k, k]), op.pad, op.stride, 1, 1),
            ConvKind::Depthwise => x.conv2d(&tensor(&op.weight, &[op.cin, 1, k, k]), op.pad, op.stride, 1, op.cin),
            ConvKind::Transposed => x.conv_transpose2d(&tensor(&op.weight, &[op.cin, op.cout, k, k]), op.pad, 0, op.stride, 1),
        }
        .unwrap();
        let y = y.broadcast_add(&tensor(&op.bias, &[1, op.cout, 1, 1])).unwrap();
        crate::model::blocks::activate(op.act, &y).unwrap()
    }

    /// `[N, C·4, H, W]` → `[N, C, 2H, 2W]`, channel `c·4 + 2a + b` to sub-pixel `(a, b)`.
    fn depth_to_space_nchw(x: &Tensor) -> Tensor {
        let (n, c4, h, w) = x.dims4().unwrap();
        x.reshape((n, c4 / 4, 2, 2, h, w)).unwrap().permute((0, 1, 4, 2, 5, 3)).unwrap().reshape((n, c4 / 4, 2 * h, 2 * w)).unwrap()
    }

    /// Runs `graph` on every instruction set, thread count and batch, and compares with
    /// `reference(input tensor)`.
    fn check_graph(graph: &Graph, cin: usize, h: usize, w: usize, policy: WinogradPolicy, bound: f32, reference: impl Fn(&Tensor) -> Tensor) {
        check_graph_on(graph, cin, h, w, policy, bound, false, reference)
    }

    /// With `grid`, inputs are multiples of 0.5 (equal values, for ties).
    #[allow(clippy::too_many_arguments)]
    fn check_graph_on(graph: &Graph, cin: usize, h: usize, w: usize, policy: WinogradPolicy, bound: f32, grid: bool, reference: impl Fn(&Tensor) -> Tensor) {
        for n in [1, 3, 8] {
            let mut input = values(n * cin * h * w, 40 + n as u64);
            if grid {
                input.iter_mut().for_each(|v| *v = (*v * 2.0).round() / 2.0);
            }
            let expected: Vec<f32> = reference(&tensor(&input, &[n, cin, h, w])).flatten_all().unwrap().to_vec1().unwrap();
            for isa in isas() {
                let options = PlanOptions { height: h, width: w, isa: Some(isa), winograd: policy, batch: 1, ..PlanOptions::new(h, w) };
                let plan = Arc::new(Plan::compile(graph, &options).unwrap());
                for threads in [1, 2, 4] {
                    let mut session = Session::new(Arc::clone(&plan), threads).unwrap();
                    let got = session.run(&input, n).unwrap();
                    assert_eq!(got.len(), expected.len());
                    let diff = got.iter().zip(&expected).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
                    let kernels: Vec<&str> = plan.steps.iter().map(|s| kind_name(s.for_batch(n))).collect();
                    assert!(diff <= bound, "{isa:?} batch {n} threads {threads} {kernels:?}: max difference {diff}");
                }
            }
        }
    }

    fn single_conv(op: ConvOp, cin: usize, h: usize, w: usize, policy: WinogradPolicy, bound: f32) {
        let mut g = GraphBuilder::new(cin);
        let x = g.input();
        let y = g.conv(x, op.clone());
        let graph = g.finish(y);
        check_graph(&graph, cin, h, w, policy, bound, |x| reference_conv(&op, x));
    }

    #[test]
    fn dense_3x3_direct_all_panel_shapes() {
        // 3 (dot kernel), 12 and 16 (one vector or a tail), 24 and 40 (two-vector panels, tails).
        for (i, cout) in [3, 12, 16, 24, 40].into_iter().enumerate() {
            single_conv(op(ConvKind::Dense, 5, cout, 3, 1, 1, Act::Relu6, i as u64), 5, 9, 13, WinogradPolicy::Never, 1e-4);
        }
    }

    #[test]
    fn eight_pixel_wide_maps_tile_along_rows() {
        // On AVX-512 these take the 8-pixel row tiles (plain, transposed, with a residual).
        single_conv(op(ConvKind::Dense, 5, 40, 3, 1, 1, Act::Relu6, 5), 5, 5, 8, WinogradPolicy::Never, 1e-4);
        single_conv(op(ConvKind::Transposed, 12, 40, 4, 2, 1, Act::Relu, 6), 12, 3, 8, WinogradPolicy::Never, 1e-4);
        single_conv(op(ConvKind::Dense, 40, 33, 1, 1, 0, Act::Identity, 7), 40, 8, 8, WinogradPolicy::Never, 1e-4);
        if Isa::Avx512.supported() {
            let mut g = GraphBuilder::new(5);
            let x = g.input();
            let y = g.conv(x, op(ConvKind::Dense, 5, 40, 3, 1, 1, Act::Relu6, 5));
            let options = PlanOptions { height: 5, width: 8, isa: Some(Isa::Avx512), winograd: WinogradPolicy::Never, batch: 1, ..PlanOptions::new(5, 8) };
            let plan = Plan::compile(&g.finish(y), &options).unwrap();
            assert!(plan.steps.iter().any(|s| s.name() == "direct-rows"), "{:?}", plan.summary().kernels);
        }
    }

    #[test]
    fn dense_3x3_winograd() {
        for (i, (cin, cout)) in [(9, 12), (16, 24), (20, 40)].into_iter().enumerate() {
            single_conv(op(ConvKind::Dense, cin, cout, 3, 1, 1, Act::Relu, 10 + i as u64), cin, 9, 13, WinogradPolicy::Always, 1e-3);
        }
    }

    #[test]
    fn pointwise_and_strided() {
        single_conv(op(ConvKind::Dense, 24, 20, 1, 1, 0, Act::Identity, 20), 24, 7, 10, WinogradPolicy::Auto, 1e-4);
        single_conv(op(ConvKind::Dense, 3, 16, 3, 2, 1, Act::Relu6, 21), 3, 9, 14, WinogradPolicy::Auto, 1e-4);
        single_conv(op(ConvKind::Dense, 8, 40, 3, 2, 1, Act::Relu, 22), 8, 16, 11, WinogradPolicy::Auto, 1e-4);
    }

    #[test]
    fn depthwise_stride_1_and_2() {
        for (i, stride) in [1, 2].into_iter().enumerate() {
            single_conv(op(ConvKind::Depthwise, 20, 20, 3, stride, 1, Act::Relu6, 30 + i as u64), 20, 9, 11, WinogradPolicy::Auto, 1e-4);
        }
    }

    #[test]
    fn transposed_direct_and_winograd() {
        for (i, cout) in [3, 20].into_iter().enumerate() {
            let o = op(ConvKind::Transposed, 12, cout, 4, 2, 1, Act::Relu, 40 + i as u64);
            single_conv(o.clone(), 12, 5, 7, WinogradPolicy::Never, 1e-4);
            single_conv(o, 12, 5, 7, WinogradPolicy::Always, 1e-3);
        }
    }

    #[test]
    fn pointwise_then_depth_to_space() {
        let o = op(ConvKind::Dense, 8, 24, 1, 1, 0, Act::Relu, 50);
        let mut g = GraphBuilder::new(8);
        let x = g.input();
        let y = g.conv(x, o.clone());
        let z = g.depth_to_space(y, 2);
        let graph = g.finish(z);
        check_graph(&graph, 8, 5, 6, WinogradPolicy::Auto, 1e-4, |x| depth_to_space_nchw(&reference_conv(&o, x)));
    }

    #[test]
    fn max_pool_with_ties_and_odd_edges() {
        let mut g = GraphBuilder::new(20);
        let x = g.input();
        let y = g.max_pool2x2(x);
        let graph = g.finish(y);
        // Values on a coarse grid, so windows hold equal maxima; 9×11 drops the odd edges.
        check_graph_on(&graph, 20, 9, 11, WinogradPolicy::Auto, 0.0, true, |x| {
            let (_, _, h, w) = x.dims4().unwrap();
            x.narrow(2, 0, h / 2 * 2).unwrap().narrow(3, 0, w / 2 * 2).unwrap().max_pool2d(2).unwrap()
        });
    }

    #[test]
    fn residual_sum_and_concatenation() {
        // y = relu6(conv1x1(x) + x) concatenated with a 3×3 branch, written in place.
        let a = op(ConvKind::Dense, 24, 24, 1, 1, 0, Act::Identity, 60);
        let b = op(ConvKind::Dense, 24, 8, 3, 1, 1, Act::Relu, 61);
        let mut g = GraphBuilder::new(24);
        let x = g.input();
        let ya = g.conv(x, a.clone());
        let sum = g.add(ya, x);
        let yb = g.conv(x, b.clone());
        let cat = g.concat(&[sum, yb]);
        let graph = g.finish(cat);
        // 8 pixels wide: the residual sum goes through the row tiles too.
        check_graph(&graph, 24, 6, 8, WinogradPolicy::Never, 1e-4, |x| {
            let s = (reference_conv(&a, x) + x).unwrap();
            Tensor::cat(&[&s, &reference_conv(&b, x)], 1).unwrap()
        });
    }
}

// ---- bf16 plans: every unit this CPU has, against candle ----

mod bf16 {
    use super::*;
    use crate::engine::bf16::{Bf16Unit, from_bf16, to_bf16};
    use crate::engine::graph::{Act, ConvKind, ConvOp, GraphBuilder};
    use crate::engine::plan::Precision;

    fn units() -> Vec<Bf16Unit> {
        [Bf16Unit::Amx, Bf16Unit::Avx512Bf16, Bf16Unit::Portable].into_iter().filter(|u| u.supported()).collect()
    }

    fn rounded(v: &[f32]) -> Vec<f32> {
        v.iter().map(|&x| from_bf16(to_bf16(x))).collect()
    }

    fn bf16_options(h: usize, w: usize, unit: Bf16Unit) -> PlanOptions {
        PlanOptions { bf16_unit: Some(unit), ..PlanOptions::new(h, w).with_precision(Precision::Bf16) }
    }

    pub(super) fn tensor(v: &[f32], shape: &[usize]) -> Tensor {
        Tensor::from_vec(v.to_vec(), shape, &Device::Cpu).unwrap()
    }

    fn op(kind: ConvKind, cin: usize, cout: usize, k: usize, stride: usize, pad: usize, act: Act, seed: u64) -> ConvOp {
        let mut rng = Rng::new(seed);
        let len = cin * cout * k * k;
        let scale = 1.0 / ((cin * k * k) as f32).sqrt();
        // Weights already on the bf16 grid: the plan's rounding of them is exact, so the
        // reference is candle's f32 convolution of the same numbers.
        let weight = rounded(&(0..len).map(|_| rng.normal() * scale).collect::<Vec<_>>());
        let bias = (0..cout).map(|_| rng.normal()).collect();
        ConvOp { kind, cin, cout, k, stride, pad, weight, bias, act }
    }

    pub(super) fn reference(op: &ConvOp, x: &Tensor, up: bool) -> Tensor {
        let k = op.k;
        let y = match op.kind {
            ConvKind::Transposed => x.conv_transpose2d(&tensor(&op.weight, &[op.cin, op.cout, k, k]), op.pad, 0, op.stride, 1),
            _ => x.conv2d(&tensor(&op.weight, &[op.cout, op.cin, k, k]), op.pad, op.stride, 1, 1),
        }
        .unwrap();
        let y = crate::model::blocks::activate(op.act, &y.broadcast_add(&tensor(&op.bias, &[1, op.cout, 1, 1])).unwrap()).unwrap();
        if !up {
            return y;
        }
        let (n, c4, h, w) = y.dims4().unwrap();
        y.reshape((n, c4 / 4, 2, 2, h, w)).unwrap().permute((0, 1, 4, 2, 5, 3)).unwrap().reshape((n, c4 / 4, 2 * h, 2 * w)).unwrap()
    }

    /// One convolution (optionally followed by depth-to-space, or plus a residual) in a bf16
    /// plan against candle on bf16-exact inputs: only the order of the f32 sums differs.
    fn single(op: ConvOp, h: usize, w: usize, up: bool, residual: bool) {
        let mut g = GraphBuilder::new(op.cin);
        let x = g.input();
        let mut y = g.conv(x, op.clone());
        if up {
            y = g.depth_to_space(y, 2);
        }
        if residual {
            y = g.add(y, x);
        }
        let graph = g.finish(y);
        for n in [1, 3, 8] {
            let mut rng = Rng::new(70 + n as u64);
            let input = rounded(&(0..n * op.cin * h * w).map(|_| rng.normal()).collect::<Vec<_>>());
            let x = tensor(&input, &[n, op.cin, h, w]);
            let mut expected = reference(&op, &x, up);
            if residual {
                expected = (expected + &x).unwrap();
            }
            let expected: Vec<f32> = expected.flatten_all().unwrap().to_vec1().unwrap();
            for unit in units() {
                let plan = Arc::new(Plan::compile(&graph, &bf16_options(h, w, unit)).unwrap());
                let names: Vec<&str> = plan.steps.iter().map(|s| s.name()).collect();
                assert!(names.iter().any(|k| k.starts_with("bf16-")), "{unit:?}: no bf16 step in {names:?}");
                for threads in [1, 2] {
                    let mut session = Session::new(Arc::clone(&plan), threads).unwrap();
                    let got = session.run(&input, n).unwrap();
                    assert_eq!(got.len(), expected.len());
                    let diff = got.iter().zip(&expected).map(|(a, b)| (a - b).abs() / (1.0 + b.abs())).fold(0f32, f32::max);
                    assert!(diff <= 2e-5, "{unit:?} {:?} {h}×{w} batch {n} threads {threads}: relative difference {diff}", op.kind);
                }
            }
        }
    }

    #[test]
    fn dense_stride_1_every_k_tail_and_panel_shape() {
        // K = 27 (one K block, padded), 9·12 = 108, 9·40 = 360; cout 5 (one short panel),
        // 16, 40 (a pair and a single panel), 72.
        for (i, (cin, cout)) in [(3, 16), (12, 5), (12, 40), (40, 72)].into_iter().enumerate() {
            single(op(ConvKind::Dense, cin, cout, 3, 1, 1, Act::Relu6, 80 + i as u64), 9, 13, false, false);
        }
        single(op(ConvKind::Dense, 24, 24, 1, 1, 0, Act::Identity, 85), 7, 10, false, true);
    }

    #[test]
    fn row_mode_tiles_read_the_converted_rows() {
        // Output rows of 32 and 64 pixels: on AMX and AVX512-BF16 the kernels read bf16 row copies (3×3 and
        // 1×1, stride 1 and 2, K per kernel row with a tail, one panel and pairs, residual).
        for (i, (cin, cout)) in [(3, 12), (12, 40), (24, 16), (40, 72)].into_iter().enumerate() {
            single(op(ConvKind::Dense, cin, cout, 3, 1, 1, Act::Relu6, 100 + i as u64), 5, 64, false, false);
        }
        single(op(ConvKind::Dense, 8, 40, 3, 2, 1, Act::Relu, 105), 6, 64, false, false);
        single(op(ConvKind::Dense, 20, 20, 1, 1, 0, Act::Identity, 106), 3, 32, false, true);
        let o = op(ConvKind::Dense, 12, 24, 3, 1, 1, Act::Relu, 107);
        let graph = {
            let mut g = GraphBuilder::new(12);
            let x = g.input();
            let y = g.conv(x, o.clone());
            g.finish(y)
        };
        let plan = Plan::compile(&graph, &bf16_options(4, 32, Bf16Unit::detect())).unwrap();
        let row_mode = plan.steps.iter().any(|s| matches!(&s.kind, crate::engine::plan::StepKind::Bf16(b) if b.row_k.is_some()));
        assert_eq!(row_mode, Bf16Unit::detect() != Bf16Unit::Portable);
    }

    #[test]
    fn strided_transposed_and_depth_to_space() {
        single(op(ConvKind::Dense, 8, 40, 3, 2, 1, Act::Relu, 90), 16, 11, false, false);
        single(op(ConvKind::Transposed, 12, 20, 4, 2, 1, Act::Relu, 91), 5, 7, false, false);
        single(op(ConvKind::Dense, 8, 96, 1, 1, 0, Act::Relu, 92), 5, 6, true, false);
    }

    /// Argmax agreement over the pixels whose reference margin (top logit minus the
    /// runner-up) exceeds `margin`.
    pub(super) fn decided_agreement(got: &[f32], expected: &[f32], classes: usize, plane: usize, margin: f32) -> f64 {
        let images = got.len() / (classes * plane);
        let (mut agree, mut decided) = (0usize, 0usize);
        for i in 0..images {
            for p in 0..plane {
                let at = |v: &[f32], c: usize| v[(i * classes + c) * plane + p];
                let arg = |v: &[f32]| (0..classes).max_by(|&x, &y| at(v, x).total_cmp(&at(v, y))).unwrap();
                let top = arg(expected);
                let second = (0..classes).filter(|&c| c != top).map(|c| at(expected, c)).fold(f32::MIN, f32::max);
                if at(expected, top) - second > margin {
                    decided += 1;
                    agree += (arg(got) == top) as usize;
                }
            }
        }
        agree as f64 / decided.max(1) as f64
    }

    /// Whole models: the bf16 plan's masks against candle's f32 forward.
    fn model(state: &ModelState, h: usize, w: usize, bound: f32) {
        let graph = state.model.lower().unwrap();
        for unit in units() {
            let plan = Arc::new(Plan::compile(&graph, &bf16_options(h, w, unit)).unwrap());
            assert_eq!(plan.precision, Precision::Bf16);
            assert_eq!(plan.bf16_unit, Some(unit));
            for threads in [1, 2] {
                let mut session = Session::new(Arc::clone(&plan), threads).unwrap();
                for n in [1, 3, 8] {
                    let input = random_input(n, h, w, n as u64 * 17);
                    let expected = candle_logits(state, &input, n, h, w);
                    let got = session.run(&input, n).unwrap().to_vec();
                    let (diff, agree) = compare(&got, &expected, 3, h * w);
                    // Random deep nets leave many pixels near a tie, which any rounding flips;
                    // every pixel the reference decides by more than the bound keeps its class.
                    // (Trained models: the export gate and tests/export.rs hold 99.5 %.)
                    let decided = decided_agreement(&got, &expected, 3, h * w, bound);
                    assert!(
                        diff <= bound && decided >= 0.999 && agree >= 0.98,
                        "{unit:?} {h}×{w} batch {n} threads {threads}: max logit difference {diff} (bound {bound}), mask agreement {agree}, {decided} where decided"
                    );
                    // Not f32 by accident: bf16 rounding shows.
                    assert!(diff > 1e-4, "{unit:?}: the bf16 plan matches f32 to {diff}");
                }
            }
        }
    }

    #[test]
    fn smoke_unet_bf16_plan_masks_agree_with_candle() {
        let state = random_model(Arch::Unet, Some(vec![12, 16, 32, 64, 128, 256]), 3);
        model(&state, 64, 64, 0.3);
    }

    #[test]
    fn mobilenetv2_unet_bf16_plan_masks_agree_with_candle() {
        let state = random_model(Arch::Mobilenetv2Unet, None, 6);
        model(&state, 64, 96, 0.5);
    }
}

// ---- int8 plans: every unit this CPU has, against candle on the dequantized operands ----

mod int8 {
    use super::bf16::{decided_agreement, reference, tensor};
    use super::*;
    use crate::engine::graph::{Act, ConvKind, ConvOp, GraphBuilder};
    use crate::engine::int8::{Int8Unit, activation_quant, quantize};
    use crate::engine::plan::{Calibration, Precision};

    fn units() -> Vec<Int8Unit> {
        [Int8Unit::Avx512Vnni, Int8Unit::AvxVnni, Int8Unit::Avx2, Int8Unit::Portable].into_iter().filter(|u| u.supported()).collect()
    }

    fn int8_options(h: usize, w: usize, unit: Int8Unit, calibration: Calibration) -> PlanOptions {
        PlanOptions { int8_unit: Some(unit), ..PlanOptions::new(h, w).int8(Arc::new(calibration)) }
    }

    fn op(kind: ConvKind, cin: usize, cout: usize, k: usize, stride: usize, pad: usize, act: Act, seed: u64) -> ConvOp {
        let mut rng = Rng::new(seed);
        let scale = 1.0 / ((cin * k * k) as f32).sqrt();
        let weight = (0..cin * cout * k * k).map(|_| rng.normal() * scale).collect();
        let bias = (0..cout).map(|_| rng.normal()).collect();
        ConvOp { kind, cin, cout, k, stride, pad, weight, bias, act }
    }

    /// `op`'s weights as the plan computes with them: int8 per output channel, dequantized.
    fn dequantized_weights(op: &ConvOp) -> ConvOp {
        let per = op.cin * op.k * op.k;
        let mut out = op.clone();
        for o in 0..op.cout {
            let w = &mut out.weight[o * per..][..per];
            let m = w.iter().fold(0f32, |m, x| m.max(x.abs()));
            let s = if m > 0.0 { m / 127.0 } else { 1.0 };
            for x in w.iter_mut() {
                *x = (*x / s).round_ties_even().clamp(-127.0, 127.0) * s;
            }
        }
        out
    }

    /// One dense convolution (optionally plus a residual) in an int8 plan against candle on
    /// the dequantized input and weights: the integer sums are exact, so only the order of
    /// candle's f32 sums differs. `(lo, hi)` is the calibrated input range (values outside
    /// it saturate, as they must).
    fn single(op: ConvOp, h: usize, w: usize, residual: bool, shift: f32) {
        let mut g = GraphBuilder::new(op.cin);
        let x = g.input();
        let mut y = g.conv(x, op.clone());
        if residual {
            y = g.add(y, x);
        }
        let graph = g.finish(y);
        let reference_op = dequantized_weights(&op);
        for n in [1, 3, 8] {
            let mut rng = Rng::new(170 + n as u64);
            let input: Vec<f32> = (0..n * op.cin * h * w).map(|_| (rng.normal() + shift).max(if shift > 0.0 { 0.0 } else { f32::MIN })).collect();
            let lo = input.iter().fold(f32::INFINITY, |a, &b| a.min(b));
            let hi = input.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) * 0.9;
            let (s, zp) = activation_quant(lo, hi);
            assert_eq!(zp == 0, shift > 0.0);
            let inv = 1.0 / s;
            let dq: Vec<f32> = input.iter().map(|&v| (quantize(v, inv, zp as i32) as f32 - zp as f32) * s).collect();
            let mut expected = reference(&reference_op, &tensor(&dq, &[n, op.cin, h, w]), false);
            if residual {
                expected = (expected + tensor(&input, &[n, op.cin, h, w])).unwrap();
            }
            let expected: Vec<f32> = expected.flatten_all().unwrap().to_vec1().unwrap();
            for unit in units() {
                let calibration = Calibration { ranges: vec![(0, lo, hi)] };
                let plan = Arc::new(Plan::compile(&graph, &int8_options(h, w, unit, calibration)).unwrap());
                let names: Vec<&str> = plan.steps.iter().map(|s| s.name()).collect();
                assert!(names.contains(&format!("int8-{}", unit.name()).as_str()), "{unit:?}: no int8 step in {names:?}");
                for threads in [1, 2] {
                    let mut session = Session::new(Arc::clone(&plan), threads).unwrap();
                    let got = session.run(&input, n).unwrap();
                    assert_eq!(got.len(), expected.len());
                    let diff = got.iter().zip(&expected).map(|(a, b)| (a - b).abs() / (1.0 + b.abs())).fold(0f32, f32::max);
                    assert!(diff <= 2e-5, "{unit:?} {}×{} k{} s{} {h}×{w} batch {n} threads {threads}: relative difference {diff}", op.cin, op.cout, op.k, op.stride);
                }
            }
        }
    }

    #[test]
    fn dense_convolutions_compute_the_exact_integer_sums() {
        // Row mode (3×3 and 1×1, stride 1 and 2, rows not a multiple of the register block)
        // and gather mode (5×5 taps); K tails; one short panel, pairs, a single panel.
        for (i, (cin, cout)) in [(3, 16), (12, 5), (12, 40), (40, 72)].into_iter().enumerate() {
            single(op(ConvKind::Dense, cin, cout, 3, 1, 1, Act::Relu6, 180 + i as u64), 9, 13, false, 0.0);
        }
        single(op(ConvKind::Dense, 16, 24, 3, 1, 1, Act::Relu, 185), 7, 29, false, 1.0);
        single(op(ConvKind::Dense, 8, 40, 3, 2, 1, Act::Relu, 186), 16, 11, false, 0.5);
        single(op(ConvKind::Dense, 24, 24, 1, 1, 0, Act::Identity, 187), 7, 10, true, 0.0);
        single(op(ConvKind::Dense, 6, 20, 5, 1, 2, Act::Identity, 188), 6, 9, false, 0.0);
        // Rows of 50 (four full register blocks and a partial one), 24 (whole blocks) and a
        // stride-2 row of 48: row mode on every unit but the portable one.
        single(op(ConvKind::Dense, 16, 24, 3, 1, 1, Act::Relu, 189), 5, 50, false, 1.0);
        single(op(ConvKind::Dense, 12, 40, 3, 1, 1, Act::Relu6, 190), 4, 24, false, 0.0);
        single(op(ConvKind::Dense, 8, 40, 3, 2, 1, Act::Relu, 191), 6, 96, false, 0.0);
        single(op(ConvKind::Dense, 20, 20, 1, 1, 0, Act::Identity, 192), 3, 48, true, 0.0);
    }

    #[test]
    fn row_and_gather_modes_are_both_used() {
        let graph = |o: ConvOp| {
            let mut g = GraphBuilder::new(o.cin);
            let x = g.input();
            let y = g.conv(x, o);
            g.finish(y)
        };
        let cal = || Calibration { ranges: vec![(0, -1.0, 1.0)] };
        for unit in units() {
            let modes = |o: ConvOp| {
                let plan = Plan::compile(&graph(o), &int8_options(5, 12, unit, cal())).unwrap();
                plan.steps.iter().find_map(|s| match &s.kind {
                    crate::engine::plan::StepKind::Int8(c) => Some(c.row_k.is_some()),
                    _ => None,
                })
            };
            assert_eq!(modes(op(ConvKind::Dense, 8, 16, 3, 1, 1, Act::Relu, 1)), Some(unit != Int8Unit::Portable), "{unit:?}");
            // (A 12-pixel row is whole register blocks on every unit.)
            assert_eq!(modes(op(ConvKind::Dense, 8, 16, 5, 1, 2, Act::Relu, 2)), Some(false), "{unit:?}");
        }
        // No calibrated range: the layer stays f32.
        let plan = Plan::compile(&graph(op(ConvKind::Dense, 8, 16, 3, 1, 1, Act::Relu, 3)), &PlanOptions::new(5, 12).int8(Arc::new(Calibration::default()))).unwrap();
        assert!(plan.steps.iter().all(|s| !s.name().starts_with("int8")));
    }

    #[test]
    fn transposed_and_depth_to_space_stay_close_to_f32() {
        // Per-phase weight scales: compared with the f32 convolution, within int8's rounding.
        for (o, h, w, up) in [(op(ConvKind::Transposed, 12, 20, 4, 2, 1, Act::Relu, 191), 5, 7, false), (op(ConvKind::Dense, 8, 96, 1, 1, 0, Act::Relu, 192), 5, 6, true)] {
            let mut g = GraphBuilder::new(o.cin);
            let x = g.input();
            let mut y = g.conv(x, o.clone());
            if up {
                y = g.depth_to_space(y, 2);
            }
            let graph = g.finish(y);
            let n = 3;
            let mut rng = Rng::new(5);
            let input: Vec<f32> = (0..n * o.cin * h * w).map(|_| rng.normal()).collect();
            let expected: Vec<f32> = reference(&o, &tensor(&input, &[n, o.cin, h, w]), up).flatten_all().unwrap().to_vec1().unwrap();
            let peak = expected.iter().fold(0f32, |m, x| m.max(x.abs()));
            for unit in units() {
                let plan = Arc::new(Plan::compile(&graph, &int8_options(h, w, unit, Calibration { ranges: vec![(0, -4.5, 4.5)] })).unwrap());
                assert!(plan.steps.iter().any(|s| s.name().starts_with("int8-")));
                let got = Session::new(plan, 2).unwrap().run(&input, n).unwrap().to_vec();
                let diff = got.iter().zip(&expected).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
                assert!(diff <= 0.03 * peak && diff > 0.0, "{unit:?} {:?}: max difference {diff} of {peak}", o.kind);
            }
        }
    }

    /// Whole models calibrated on their own inputs: int8 masks against candle's f32 forward.
    /// Random deep nets leave many pixels near a tie (mobilenetv2: 94.5 % of all pixels keep
    /// their class, 99.6 % of those decided by 0.5); trained models are held to 99 % by the
    /// export gate and tests/export.rs.
    fn model(state: &ModelState, h: usize, w: usize, bound: f32) {
        let graph = state.model.lower().unwrap();
        let f32_plan = Arc::new(Plan::compile(&graph, &PlanOptions::new(h, w)).unwrap());
        let mut observer = Session::new(f32_plan, 1).unwrap();
        let mut calibration = Calibration::default();
        for seed in 0..4 {
            calibration.merge(&observer.observe(&random_input(2, h, w, 900 + seed), 2).unwrap());
        }
        // Every dense convolution's input has a range; the input image's is the normalized one.
        assert!(calibration.ranges.iter().any(|r| r.0 == 0 && r.1 < 0.0 && r.2 > 0.0), "{:?}", calibration.ranges);
        let calibration = Arc::new(calibration);
        for unit in units() {
            let plan = Arc::new(Plan::compile(&graph, &PlanOptions { int8_unit: Some(unit), ..PlanOptions::new(h, w).int8(Arc::clone(&calibration)) }).unwrap());
            assert_eq!((plan.precision, plan.int8_unit), (Precision::Int8, Some(unit)));
            for threads in [1, 2] {
                let mut session = Session::new(Arc::clone(&plan), threads).unwrap();
                for n in [1, 3, 8] {
                    let input = random_input(n, h, w, n as u64 * 31);
                    let expected = candle_logits(state, &input, n, h, w);
                    let got = session.run(&input, n).unwrap().to_vec();
                    let (diff, agree) = compare(&got, &expected, 3, h * w);
                    let decided = decided_agreement(&got, &expected, 3, h * w, bound);
                    assert!(
                        diff <= 4.0 * bound && decided >= 0.99 && agree >= 0.9,
                        "{unit:?} {h}×{w} batch {n} threads {threads}: max logit difference {diff}, mask agreement {agree}, {decided} where decided by {bound}"
                    );
                    assert!(diff > 1e-3, "{unit:?}: the int8 plan matches f32 to {diff}");
                }
            }
        }
    }

    #[test]
    fn smoke_unet_int8_plan_masks_agree_with_candle() {
        let state = random_model(Arch::Unet, Some(vec![12, 16, 32, 64, 128, 256]), 3);
        model(&state, 64, 64, 0.3);
    }

    #[test]
    fn mobilenetv2_unet_int8_plan_masks_agree_with_candle() {
        let state = random_model(Arch::Mobilenetv2Unet, None, 6);
        model(&state, 64, 96, 0.5);
    }
}
