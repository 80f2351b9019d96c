//! Every op on CPU feature maps against candle's own op on `[N, C, H, W]` tensors: outputs,
//! and the gradients of a random weighted sum with respect to every input, on every
//! instruction set this CPU has and with one and several threads.

use candle_core::{Device, Tensor, Var};

use super::*;
use crate::engine::Isa;
use crate::util::rng::Rng;

fn rand(shape: &[usize], seed: u64) -> Tensor {
    let mut rng = Rng::new(seed);
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| rng.normal()).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

fn max_abs(a: &Tensor) -> f32 {
    a.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

fn isas() -> Vec<Isa> {
    [Isa::Avx512, Isa::Avx2, Isa::Portable].into_iter().filter(|i| i.supported()).collect()
}

/// Runs `f` for every instruction set, in pools of 1 and 3 threads.
fn everywhere(f: impl Fn(Isa) + Sync) {
    for isa in isas() {
        for threads in [1, 3] {
            rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap().install(|| fmap::with_isa(isa, || f(isa)));
        }
    }
}

/// Compares `ours` (on feature maps) with `reference` (on NCHW) for outputs and for the
/// gradients of `Σ y·probe` with respect to `x` and every extra input; relative bound `tol`.
fn check(ours: impl Fn(&Tensor, &[Tensor]) -> Tensor, reference: impl Fn(&Tensor, &[Tensor]) -> Tensor, x_shape: &[usize], extra: &[&[usize]], tol: f32, what: &str) {
    let x = Var::from_tensor(&rand(x_shape, 1)).unwrap();
    let extra: Vec<Var> = extra.iter().enumerate().map(|(i, s)| Var::from_tensor(&rand(s, 2 + i as u64)).unwrap()).collect();
    let extra_t: Vec<Tensor> = extra.iter().map(|v| v.as_tensor().clone()).collect();
    let a = layout::from_map(&ours(&layout::to_map(x.as_tensor()).unwrap(), &extra_t)).unwrap();
    let b = reference(x.as_tensor(), &extra_t);
    assert_eq!(a.dims(), b.dims(), "{what}: shapes");
    let scale = max_abs(&b).max(1.0);
    let d = max_diff(&a, &b);
    assert!(d <= tol * scale, "{what}: forward differs by {d} (scale {scale})");
    let probe = rand(a.dims(), 9);
    let ga = (&a * &probe).unwrap().sum_all().unwrap().backward().unwrap();
    let gb = (&b * &probe).unwrap().sum_all().unwrap().backward().unwrap();
    for (name, v) in std::iter::once(("x", &x)).chain(extra.iter().map(|v| ("w", v))) {
        let (da, db) = (ga.get(v).expect("gradient"), gb.get(v).expect("reference gradient"));
        let scale = max_abs(db).max(1.0);
        let d = max_diff(da, db);
        assert!(d <= tol * scale, "{what}: d{name} differs by {d} (scale {scale})");
    }
}

#[test]
fn dense_convolutions_match_candle() {
    everywhere(|isa| {
        // (n, cin, cout, size, k, stride, pad): narrow and wide, 1×1, tile remainders, a map big
        // enough for Winograd at batch 4, strided.
        for (n, cin, cout, size, k, stride, pad) in [
            (2, 3, 8, 9, 3, 1, 1),
            (2, 8, 20, 7, 3, 1, 1),
            (1, 40, 24, 6, 3, 1, 1),
            (4, 16, 32, 16, 3, 1, 1),
            (2, 24, 40, 5, 1, 1, 0),
            (2, 3, 16, 10, 3, 2, 1),
            (2, 12, 8, 9, 3, 2, 1),
        ] {
            check(
                |x, e| conv2d(x, &e[0], None, stride, pad).unwrap(),
                |x, e| x.conv2d(&e[0], pad, stride, 1, 1).unwrap(),
                &[n, cin, size, size],
                &[&[cout, cin, k, k]],
                2e-4,
                &format!("{isa:?} conv {cin}→{cout} k{k} s{stride} {size}²"),
            );
        }
    });
}

#[test]
fn convolution_with_bias_matches_candle() {
    everywhere(|isa| {
        // The logits layer: 1×1 to three classes with a bias.
        check(
            |x, e| conv2d(x, &e[0], Some(&e[1]), 1, 0).unwrap(),
            |x, e| x.conv2d(&e[0], 0, 1, 1, 1).unwrap().broadcast_add(&e[1].reshape((1, 3, 1, 1)).unwrap()).unwrap(),
            &[2, 20, 6, 7],
            &[&[3, 20, 1, 1], &[3]],
            2e-4,
            &format!("{isa:?} logits"),
        );
    });
}

#[test]
fn transposed_convolutions_match_candle() {
    everywhere(|isa| {
        // The fourth: an input gradient the cost model runs as gathered Winograd phases; from
        // the third on, weight gradients by F(2, 2) tiles, the last by F(2, 3) tiles.
        for (n, cin, cout, size) in [(2, 8, 4, 5), (2, 20, 3, 4), (4, 24, 40, 8), (4, 96, 64, 16), (1, 12, 16, 25)] {
            check(
                |x, e| conv_transpose2d(x, &e[0], None, 2, 1).unwrap(),
                |x, e| x.conv_transpose2d(&e[0], 1, 0, 2, 1).unwrap(),
                &[n, cin, size, size],
                &[&[cin, cout, 4, 4]],
                2e-4,
                &format!("{isa:?} transposed {cin}→{cout} {size}²"),
            );
        }
    });
}

#[test]
fn depthwise_convolutions_match_candle() {
    everywhere(|isa| {
        for (c, size, stride) in [(4, 7, 1), (20, 8, 2), (17, 9, 2)] {
            check(
                |x, e| depthwise_conv2d(x, &e[0], stride, 1).unwrap(),
                |x, e| x.conv2d(&e[0], 1, stride, 1, c).unwrap(),
                &[2, c, size, size],
                &[&[c, 1, 3, 3]],
                2e-4,
                &format!("{isa:?} depthwise c{c} s{stride} {size}²"),
            );
        }
    });
}

#[test]
fn pooling_shuffle_and_concat_match_candle() {
    everywhere(|isa| {
        max_pool_forward_and_gradient(isa);
        check(
            |x, _| depth_to_space2(x).unwrap(),
            |x, _| {
                let (n, c4, h, w) = x.dims4().unwrap();
                x.reshape((n, c4 / 4, 2, 2, h, w)).unwrap().permute((0, 1, 4, 2, 5, 3)).unwrap().reshape((n, c4 / 4, 2 * h, 2 * w)).unwrap()
            },
            &[2, 12, 3, 5],
            &[],
            1e-6,
            &format!("{isa:?} depth-to-space"),
        );
        check(
            |x, e| concat_channels(x, &to_features(&e[0]).unwrap()).unwrap(),
            |x, e| Tensor::cat(&[x, &e[0]], 1).unwrap(),
            &[2, 5, 4, 6],
            &[&[2, 19, 4, 6]],
            1e-6,
            &format!("{isa:?} concat"),
        );
    });
}

/// Max pooling's output against candle's, and its gradient on each window's maximum, unscaled
/// (candle's own max-pool backward multiplies it by 1/4, so it is no reference here); odd
/// edges get none.
fn max_pool_forward_and_gradient(isa: Isa) {
    let x = Var::from_tensor(&rand(&[2, 3, 7, 6], 5)).unwrap();
    let ours = from_features(&max_pool2x2(&to_features(x.as_tensor()).unwrap()).unwrap()).unwrap();
    assert_eq!(max_diff(&ours, &x.as_tensor().max_pool2d(2).unwrap()), 0.0, "{isa:?}");
    let probe = rand(ours.dims(), 6);
    let grads = (&ours * &probe).unwrap().sum_all().unwrap().backward().unwrap();
    let dx = grads.get(&x).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let xs = x.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let ps = probe.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let mut expected = vec![0f32; xs.len()];
    for plane in 0..6 {
        for oy in 0..3 {
            for ox in 0..3 {
                let idx = [(0, 0), (0, 1), (1, 0), (1, 1)].map(|(dy, dx)| plane * 42 + (2 * oy + dy) * 6 + 2 * ox + dx);
                let best = *idx.iter().max_by(|a, b| xs[**a].partial_cmp(&xs[**b]).unwrap()).unwrap();
                expected[best] = ps[plane * 9 + oy * 3 + ox];
            }
        }
    }
    assert_eq!(dx, expected, "{isa:?}");
}

#[test]
fn max_pool_ties_route_the_gradient_to_the_first_maximum() {
    // Every window of this input is four equal values.
    let x = Var::from_tensor(&Tensor::ones((1, 2, 4, 4), candle_core::DType::F32, &Device::Cpu).unwrap()).unwrap();
    let y = from_features(&max_pool2x2(&to_features(x.as_tensor()).unwrap()).unwrap()).unwrap();
    let probe = rand(y.dims(), 8);
    let grads = (&y * &probe).unwrap().sum_all().unwrap().backward().unwrap();
    let dx = grads.get(&x).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let ps = probe.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    for plane in 0..2 {
        for oy in 0..2 {
            for ox in 0..2 {
                let first = plane * 16 + 2 * oy * 4 + 2 * ox;
                assert_eq!(dx[first], ps[plane * 4 + oy * 2 + ox]);
                for other in [first + 1, first + 4, first + 5] {
                    assert_eq!(dx[other], 0.0);
                }
            }
        }
    }
}

#[test]
fn feature_maps_keep_zero_borders_and_slack() {
    // A map made by candle (no slack) still convolves: the op copies it.
    let x = rand(&[2, 3, 5, 5], 1);
    let map = to_features(&x).unwrap();
    let plain = Tensor::from_vec(map.flatten_all().unwrap().to_vec1::<f32>().unwrap(), map.dims(), &Device::Cpu).unwrap();
    let w = rand(&[30, 3, 3, 3], 2);
    let a = from_features(&conv2d(&map, &w, None, 1, 1).unwrap()).unwrap();
    let b = from_features(&conv2d(&plain, &w, None, 1, 1).unwrap()).unwrap();
    assert_eq!(max_diff(&a, &b), 0.0);
    // Borders of an output are zero.
    let y = conv2d(&map, &w, None, 1, 1).unwrap().to_vec3::<f32>().err();
    assert!(y.is_some(), "a feature map is 4-D");
    let y = conv2d(&map, &w, None, 1, 1).unwrap();
    let v = y.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let (hp, wp, c) = (7, 7, 30);
    for img in 0..2 {
        for py in 0..hp {
            for px in 0..wp {
                if py == 0 || px == 0 || py == hp - 1 || px == wp - 1 {
                    for ch in 0..c {
                        assert_eq!(v[((img * hp + py) * wp + px) * c + ch], 0.0);
                    }
                }
            }
        }
    }
}

#[test]
fn fused_conv_bn_act_matches_the_separate_ops() {
    use crate::model::ops::batchnorm::BatchNorm;
    use candle_nn::{VarBuilder, VarMap};
    everywhere(|isa| {
        for (kind, cin, cout, k, stride, pad, wdims) in [
            (ConvKind::Dense, 6, 20, 3, 1, 1, [20usize, 6, 3, 3]),
            (ConvKind::Dense, 3, 16, 3, 2, 1, [16, 3, 3, 3]),
            (ConvKind::Depthwise, 12, 12, 3, 2, 1, [12, 1, 3, 3]),
            (ConvKind::Transposed, 10, 8, 4, 2, 1, [10, 8, 4, 4]),
        ] {
            for act in [Act::Relu, Act::Relu6, Act::Identity] {
                let varmap = VarMap::new();
                let vb = VarBuilder::from_varmap(&varmap, candle_core::DType::F32, &Device::Cpu);
                let bn = BatchNorm::new(cout, 1e-5, 0.1, vb).unwrap();
                let x = Var::from_tensor(&rand(&[2, cin, 8, 8], 11)).unwrap();
                let w = Var::from_tensor(&rand(&wdims, 12)).unwrap();
                let geometry = ConvGeometry { kind, k, stride, pad };
                let xm = to_features(x.as_tensor()).unwrap();
                let fused = from_features(&bn.forward_conv_act(&xm, w.as_tensor(), geometry, act).unwrap()).unwrap();
                let separate = from_features(&bn.forward_act(&convolution(&xm, w.as_tensor(), None, kind, stride, pad, Act::Identity).unwrap(), act, true).unwrap()).unwrap();
                let what = format!("{isa:?} {kind:?} {act:?}");
                assert!(max_diff(&fused, &separate) < 1e-4, "{what}: forward");
                let probe = rand(fused.dims(), 13);
                let ga = (&fused * &probe).unwrap().sum_all().unwrap().backward().unwrap();
                let gb = (&separate * &probe).unwrap().sum_all().unwrap().backward().unwrap();
                let gamma = varmap.data().lock().unwrap()["weight"].clone();
                for (name, t) in [("x", x.as_tensor()), ("w", w.as_tensor()), ("gamma", gamma.as_tensor())] {
                    let (a, b) = (ga.get(t).unwrap(), gb.get(t).unwrap());
                    let d = max_diff(a, b);
                    assert!(d <= 1e-3 * max_abs(b).max(1.0), "{what}: d{name} differs by {d}");
                }
            }
        }
    });
}

#[test]
fn bf16_convolutions_compute_on_rounded_operands() {
    let round = |t: &Tensor| {
        let v: Vec<f32> = t.flatten_all().unwrap().to_vec1::<f32>().unwrap().into_iter().map(fmap::round_bf16).collect();
        Tensor::from_vec(v, t.dims(), &Device::Cpu).unwrap()
    };
    // Rounding itself: ties to even, exact values kept.
    assert_eq!(fmap::round_bf16(1.0), 1.0);
    assert_eq!(fmap::round_bf16(1.0 + 1.0 / 256.0), 1.0, "a tie rounds to the even mantissa");
    assert_eq!(fmap::round_bf16(1.0 + 3.0 / 256.0), 1.0 + 4.0 / 256.0);
    everywhere(|isa| {
        let x = rand(&[2, 16, 12, 12], 21);
        let w = rand(&[24, 16, 3, 3], 22);
        let (xm, xr) = (to_features(&x).unwrap(), to_features(&round(&x)).unwrap());
        let bf = fmap::with_bf16(true, || from_features(&conv2d(&xm, &w, None, 1, 1).unwrap()).unwrap());
        let reference = from_features(&conv2d(&xr, &round(&w), None, 1, 1).unwrap()).unwrap();
        let f32_result = from_features(&conv2d(&xm, &w, None, 1, 1).unwrap()).unwrap();
        // bf16 is f32 arithmetic on rounded operands; it differs from f32 by bf16's precision.
        assert!(max_diff(&bf, &reference) < 1e-4, "{isa:?}: {}", max_diff(&bf, &reference));
        let d = max_diff(&bf, &f32_result);
        assert!(d > 1e-4 && d < 0.05 * max_abs(&f32_result), "{isa:?}: bf16 vs f32 differ by {d}");
    });
}
