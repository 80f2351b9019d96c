//! The plan against candle's eval forward of the same weights, for both architectures, every
//! instruction set this CPU has, several batch sizes, thread counts and input shapes.

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

use super::plan::{Plan, PlanOptions, Session, WinogradPolicy, kind_name};
use super::Isa;
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
        let options = PlanOptions { height: h, width: w, isa: Some(isa), winograd: policy, batch: 1 };
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
