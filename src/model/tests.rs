//! Model tests: shapes, timm parity, BatchNorm behaviour and folding, deterministic init.

use super::*;
use crate::config::{Arch, Config};

fn tiny_unet_spec() -> ModelSpec {
    let mut config = Config::default();
    config.data.image_size = 32;
    config.model.arch = Arch::Unet;
    config.model.unet.depth = 2;
    config.model.unet.base_width = 4;
    ModelSpec::from_config(&config)
}

fn input(n: usize, size: usize, seed: u64) -> Tensor {
    let mut rng = Rng::new(seed);
    let v: Vec<f32> = (0..n * 3 * size * size).map(|_| rng.normal()).collect();
    Tensor::from_vec(v, (n, 3, size, size), &Device::Cpu).unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

#[test]
fn unet_outputs_logits_at_input_size() {
    let state = ModelState::new(&tiny_unet_spec(), &Device::Cpu, 1).unwrap();
    let y = state.forward(&input(2, 32, 1), false).unwrap();
    assert_eq!(y.dims(), &[2, 3, 32, 32]);
}

#[test]
fn mobilenetv2_unet_outputs_logits_at_input_size() {
    let mut config = Config::default();
    config.model.arch = Arch::Mobilenetv2Unet;
    config.data.image_size = 64;
    let spec = ModelSpec::from_config(&config);
    let state = ModelState::new(&spec, &Device::Cpu, 1).unwrap();
    let y = state.forward(&input(1, 64, 2), false).unwrap();
    assert_eq!(y.dims(), &[1, 3, 64, 64]);
    assert_eq!(spec.normalization, Normalization::IMAGENET);
}

#[test]
fn init_is_deterministic_per_seed() {
    let spec = tiny_unet_spec();
    let a = ModelState::new(&spec, &Device::Cpu, 5).unwrap().named_tensors();
    let b = ModelState::new(&spec, &Device::Cpu, 5).unwrap().named_tensors();
    let c = ModelState::new(&spec, &Device::Cpu, 6).unwrap().named_tensors();
    let name = "down.0.conv1.weight";
    assert_eq!(max_abs_diff(&a[name], &b[name]), 0.0);
    assert!(max_abs_diff(&a[name], &c[name]) > 0.0);
    assert_eq!(a["down.0.bn1.running_var"].to_vec1::<f32>().unwrap(), vec![1.0; 4]);
}

#[test]
fn batchnorm_statistics_update_in_training_and_serve_evaluation() {
    let spec = tiny_unet_spec();
    let state = ModelState::new(&spec, &Device::Cpu, 3).unwrap();
    let x = input(4, 32, 4).affine(3.0, 2.0).unwrap();
    let before = state.named_tensors()["down.0.bn1.running_mean"].to_vec1::<f32>().unwrap();
    let eval_before = state.forward(&x, false).unwrap();
    state.forward(&x, true).unwrap();
    let after = state.named_tensors()["down.0.bn1.running_mean"].to_vec1::<f32>().unwrap();
    assert_ne!(before, after, "training updates running statistics");
    // Expected running mean after one step with momentum 0.1: 0.9·0 + 0.1·batch mean of conv1.
    let eval_after = state.forward(&x, false).unwrap();
    assert!(max_abs_diff(&eval_before, &eval_after) > 1e-4, "evaluation uses the running statistics");
    let train_a = state.forward(&x, true).unwrap();
    let train_b = state.forward(&x, true).unwrap();
    assert!(max_abs_diff(&train_a, &train_b) < 1e-5, "training mode normalizes with batch statistics");
}

#[test]
fn batchnorm_matches_hand_computed_values() {
    // One channel, values 1..4: batch mean 2.5, biased variance 1.25.
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let bn = super::ops::batchnorm::BatchNorm::new(1, 0.0, blocks::BN_MOMENTUM, vb).unwrap();
    let x = Tensor::new(&[1f32, 2., 3., 4.], &Device::Cpu).unwrap().reshape((4, 1, 1, 1)).unwrap();
    let xm = super::ops::to_features(&x).unwrap();
    let run = |act| super::ops::from_features(&bn.forward_act(&xm, act, true).unwrap()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let y = run(blocks::Act::Identity);
    let expect: Vec<f32> = [1f32, 2., 3., 4.].iter().map(|v| (v - 2.5) / 1.25f32.sqrt()).collect();
    for (a, b) in y.iter().zip(&expect) {
        assert!((a - b).abs() < 1e-5, "{y:?} vs {expect:?}");
    }
    let mean = varmap.data().lock().unwrap()["running_mean"].to_vec1::<f32>().unwrap()[0];
    let var = varmap.data().lock().unwrap()["running_var"].to_vec1::<f32>().unwrap()[0];
    assert!((mean - 0.25).abs() < 1e-6, "0.9·0 + 0.1·2.5, got {mean}");
    // Unbiased batch variance 5/3: 0.9·1 + 0.1·5/3.
    assert!((var - (0.9 + 0.1 * 5.0 / 3.0)).abs() < 1e-6, "got {var}");
    // ReLU fused in: negative normalized values clamp to zero.
    let y = run(blocks::Act::Relu);
    assert_eq!(&y[..2], &[0.0, 0.0]);
}

#[test]
fn folding_batchnorm_keeps_outputs() {
    for arch in [Arch::Unet, Arch::Mobilenetv2Unet] {
        let mut spec = tiny_unet_spec();
        spec.arch = arch;
        spec.input_size = 64;
        let state = ModelState::new(&spec, &Device::Cpu, 9).unwrap();
        // Non-trivial statistics: a few training-mode passes.
        for i in 0..3 {
            state.forward(&(input(2, 64, 10 + i) * 2.0).unwrap(), true).unwrap();
        }
        let x = input(2, 64, 20);
        let reference = state.forward(&x, false).unwrap();
        let folded = fold_batchnorm(&state.named_tensors(), &state.model.conv_bn_pairs()).unwrap();
        let mut folded_spec = spec.clone();
        folded_spec.batchnorm_folded = true;
        let folded_state = ModelState::from_tensors(&folded_spec, &folded, &Device::Cpu).unwrap();
        let y = folded_state.forward(&x, false).unwrap();
        let scale = reference.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
        assert!(max_abs_diff(&reference, &y) <= 1e-4 * scale.max(1.0), "{arch}: {}", max_abs_diff(&reference, &y));
    }
}

#[test]
fn frozen_encoder_is_not_trainable() {
    let mut config = Config::default();
    config.model.arch = Arch::Mobilenetv2Unet;
    config.model.encoder.trainable = false;
    let state = ModelState::new(&ModelSpec::from_config(&config), &Device::Cpu, 1).unwrap();
    let vars = state.trainable_vars();
    assert!(vars.iter().all(|(n, _)| !n.starts_with("encoder.") && !n.contains("running_")));
    assert!(vars.iter().any(|(n, _)| n.starts_with("decoder.")));
}

#[test]
fn timm_names_map_onto_the_encoder() {
    assert_eq!(timm_to_segctl("blocks.1.0.conv_pw.weight").as_deref(), Some("encoder.blocks.1.0.conv_pw.weight"));
    assert_eq!(timm_to_segctl("bn1.running_var").as_deref(), Some("encoder.bn1.running_var"));
    assert_eq!(timm_to_segctl("bn2.weight"), None);
    assert_eq!(timm_to_segctl("conv_head.weight"), None);
    assert_eq!(timm_to_segctl("classifier.bias"), None);
    assert_eq!(timm_to_segctl("blocks.1.0.bn1.num_batches_tracked"), None);
}

/// The committed fixture (scripts/make_mobilenetv2_fixture.py): timm's feature maps at the
/// five taps for random weights; ours must match within 1e-3 after loading through the same
/// name mapping as the real checkpoint.
#[test]
fn mobilenetv2_taps_match_timm() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/mobilenetv2_taps.safetensors");
    let fixture = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    let mut config = Config::default();
    config.model.arch = Arch::Mobilenetv2Unet;
    let state = ModelState::new(&ModelSpec::from_config(&config), &Device::Cpu, 1).unwrap();
    let loaded = load_timm_encoder(&state, &path).unwrap();
    assert!(loaded > 200, "loaded {loaded} encoder tensors");
    let SegModel::MobileNetV2Unet(model) = &state.model else { unreachable!() };
    let input = super::ops::to_features(&fixture["input"]).unwrap();
    let taps = model.encoder().taps(&input, false).unwrap();
    for (tap, name) in taps.iter().zip(mobilenetv2::TAP_NAMES) {
        let tap = &super::ops::from_features(tap).unwrap();
        let expected = &fixture[&format!("tap.{name}")];
        assert_eq!(tap.dims(), expected.dims(), "{name}");
        let diff = max_abs_diff(tap, expected);
        assert!(diff <= 1e-3, "{name}: max abs difference {diff}");
    }
}

#[test]
fn variable_shapes_are_the_networks_without_allocating_it() {
    let mut mnv2 = Config::default();
    mnv2.model.arch = Arch::Mobilenetv2Unet;
    mnv2.data.image_size = 64;
    for spec in [tiny_unet_spec(), ModelSpec::from_config(&mnv2)] {
        let state = ModelState::new(&spec, &Device::Cpu, 1).unwrap();
        let real: std::collections::BTreeMap<String, Vec<usize>> = state.named_tensors().into_iter().map(|(k, t)| (k, t.dims().to_vec())).collect();
        assert_eq!(variable_shapes(&spec).unwrap(), real, "{}", spec.describe());
    }
    // A network of several GB is described in an instant (nothing of it is allocated).
    let mut big = Config::default();
    big.model.unet.widths = Some(vec![2048; 5]);
    let spec = ModelSpec::from_config(&big);
    let started = std::time::Instant::now();
    let floats: usize = variable_shapes(&spec).unwrap().values().map(|s| s.iter().product::<usize>()).sum();
    assert!(floats * 4 > 1 << 30, "{floats} floats");
    assert!(started.elapsed() < std::time::Duration::from_secs(2), "{:?}", started.elapsed());
}
