use std::path::Path;
use std::process::Command;

use crate::util::*;

fn checker() -> Option<String> {
    checker_python("onnx, onnxruntime, numpy", "pip install onnx onnxruntime numpy")
}

fn write_f32(path: &Path, values: &[f32]) {
    std::fs::write(path, values.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>()).unwrap();
}

/// Exports `run_dir` with --onnx and checks the file with onnx.checker and onnxruntime against
/// the logits segctl's engine computes for the same version.
fn export_and_check(dir: &Path, config: &Path, run_dir: &Path, python: &str, size: usize) {
    let repo = dir.join("models");
    let out = run(segctl().args(["export", "--onnx", "--json", "--config"]).arg(config).arg("--checkpoint").arg(run_dir).args(["--name", "pets", "--repository"]).arg(&repo));
    assert!(out.status.success());
    let report = json(&out);
    let version_dir = Path::new(report["path"].as_str().unwrap()).to_path_buf();
    let onnx_path = version_dir.join("model.onnx");
    assert_eq!(report["onnx"]["path"].as_str().unwrap(), onnx_path.to_str().unwrap());
    assert!(report["onnx"]["max_abs_diff"].as_f64().unwrap() < 1e-2, "{report}");
    // model.yaml records the file's SHA-256.
    let manifest: serde_yaml::Value = serde_yaml::from_str(&std::fs::read_to_string(version_dir.join("model.yaml")).unwrap()).unwrap();
    let sha = sha256_hex(&onnx_path);
    assert_eq!(manifest["onnx_sha256"].as_str(), Some(sha.as_str()));
    assert_eq!(report["onnx"]["sha256"].as_str(), Some(sha.as_str()));

    // segctl's logits for a probe batch, from the exported version as serve runs it.
    let predictor = segctl::infer::Predictor::load(&version_dir, &candle_core::Device::Cpu).unwrap();
    let n = 3;
    let mut seed = 11u64;
    let inputs: Vec<Vec<f32>> = (0..n)
        .map(|_| {
            (0..3 * size * size)
                .map(|_| {
                    seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    ((seed >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0
                })
                .collect()
        })
        .collect();
    let logits = predictor.logits(&inputs).unwrap();
    write_f32(&dir.join("input.f32"), &inputs.concat());
    write_f32(&dir.join("logits.f32"), &logits.concat());
    let out = Command::new(python)
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/check/onnx_check.py"))
        .arg(&onnx_path)
        .arg(dir.join("input.f32"))
        .arg(n.to_string())
        .arg(size.to_string())
        .arg(dir.join("logits.f32"))
        .output()
        .unwrap();
    assert!(out.status.success(), "onnx check failed:\n{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    eprintln!("onnx check: {v}");
    assert_eq!(v["checker"], "ok");
    assert_eq!(v["opset"], 17);
    let bound = 1e-4 * v["scale"].as_f64().unwrap().max(1.0);
    assert!(v["max_abs_diff"].as_f64().unwrap() <= bound, "onnxruntime vs segctl: {v}");
    assert!(v["batch1_max_abs_diff"].as_f64().unwrap() <= bound, "batch 1: {v}");
    assert_eq!(v["inputs"][0]["name"], "image");
    assert_eq!(v["inputs"][0]["shape"], serde_json::json!(["N", 3, size, size]));
    assert_eq!(v["outputs"][0]["name"], "logits");
    assert_eq!(v["outputs"][0]["shape"], serde_json::json!(["N", 3, size, size]));
    let classes: Vec<String> = serde_json::from_str(v["metadata"]["class_names"].as_str().unwrap()).unwrap();
    assert_eq!(classes, ["pet", "background", "border"]);
    let norm: serde_json::Value = serde_json::from_str(v["metadata"]["normalization"].as_str().unwrap()).unwrap();
    assert_eq!(norm["mean"].as_array().unwrap().len(), 3);
}

fn sha256_hex(path: &Path) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(std::fs::read(path).unwrap()))
}

#[test]
fn exported_onnx_passes_the_checker_and_matches_in_onnxruntime() {
    let Some(python) = checker() else { return };
    // unet.
    let dir = tempfile::tempdir().unwrap();
    let (config, run_dir, _) = trained_model(dir.path(), 12);
    export_and_check(dir.path(), &config, &run_dir, &python, 32);

    // mobilenetv2_unet (64×64: the encoder halves the map five times).
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("pets");
    synthetic_dataset(&root, 8, 4);
    let config = tiny_config(dir.path(), &root, 1);
    let text = std::fs::read_to_string(&config).unwrap().replace("image_size: 32", "image_size: 64").replace("arch: unet", "arch: mobilenetv2_unet\n  encoder:\n    weights: none");
    std::fs::write(&config, text).unwrap();
    let out = run(segctl().args(["train", "--config"]).arg(&config));
    assert!(out.status.success());
    export_and_check(dir.path(), &config, &dir.path().join("runs/tiny"), &python, 64);
}

#[test]
fn export_onnx_from_the_config_key() {
    let dir = tempfile::tempdir().unwrap();
    let (config, run_dir, repo) = trained_model(dir.path(), 12);
    let out = run(segctl().args(["export", "--set", "export.onnx=true", "--config"]).arg(&config).arg("--checkpoint").arg(&run_dir).args(["--name", "pets", "--repository"]).arg(&repo));
    assert!(out.status.success());
    assert!(stdout(&out).contains("model.onnx (opset 17"), "{}", stdout(&out));
    assert!(repo.join("pets/2/model.onnx").is_file());
    assert!(!repo.join("pets/1/model.onnx").exists(), "off by default");
    // A version with model.onnx still serves and predicts as before.
    let photo = std::fs::read_dir(dir.path().join("pets/images")).unwrap().next().unwrap().unwrap().path();
    let out = run(segctl().args(["predict", "--model"]).arg(repo.join("pets/2")).arg(&photo).arg("--out").arg(dir.path().join("p")));
    assert!(out.status.success());
}

#[test]
fn an_int8_version_exports_qdq_onnx_that_onnxruntime_runs_as_segctl_does() {
    let Some(python) = checker() else { return };
    let dir = tempfile::tempdir().unwrap();
    let (config, run_dir, _) = trained_model(dir.path(), 12);
    let repo = dir.path().join("models");
    let out = run(segctl().args(["export", "--onnx", "--precision", "int8", "--json", "--config"]).arg(&config).arg("--checkpoint").arg(&run_dir).args(["--name", "pets", "--repository"]).arg(&repo));
    assert!(out.status.success(), "{}", stderr(&out));
    let report = json(&out);
    assert_eq!(report["precision"], "int8");
    // Read back by segctl, its int8 plan gives the version's own logits.
    assert!(report["onnx"]["max_abs_diff"].as_f64().unwrap() < 1e-3, "{report}");
    let version_dir = Path::new(report["path"].as_str().unwrap()).to_path_buf();
    let predictor = segctl::infer::Predictor::load(&version_dir, &candle_core::Device::Cpu).unwrap();
    let size = 32;
    let n = 3;
    let mut seed = 5u64;
    let inputs: Vec<Vec<f32>> = (0..n)
        .map(|_| {
            (0..3 * size * size)
                .map(|_| {
                    seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    (seed >> 40) as f32 / (1u64 << 24) as f32
                })
                .collect()
        })
        .collect();
    let logits = predictor.logits(&inputs).unwrap();
    write_f32(&dir.path().join("input.f32"), &inputs.concat());
    write_f32(&dir.path().join("logits.f32"), &logits.concat());
    let out = Command::new(&python)
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/check/onnx_check.py"))
        .arg(version_dir.join("model.onnx"))
        .arg(dir.path().join("input.f32"))
        .arg(n.to_string())
        .arg(size.to_string())
        .arg(dir.path().join("logits.f32"))
        .output()
        .unwrap();
    assert!(out.status.success(), "onnx check failed:\n{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    eprintln!("int8 onnx check: {v}");
    assert_eq!(v["checker"], "ok");
    // QDQ: every int8 convolution reads a quantized activation and int8 weights.
    let ops = &v["op_types"];
    let convs = ops["Conv"].as_u64().unwrap() + ops["ConvTranspose"].as_u64().unwrap_or(0);
    let (q, dq) = (ops["QuantizeLinear"].as_u64().unwrap_or(0), ops["DequantizeLinear"].as_u64().unwrap_or(0));
    // (This UNet's 4-channel layers and the logits stay f32: at most 4 channels.)
    assert!(q >= 5 && dq > q && dq - q < convs, "one QDQ pair per quantized input, one DequantizeLinear per int8 weight: {ops}");
    // onnxruntime's reference run of the QDQ graph (as written, in float) computes the same
    // quantized numbers in its own order.
    let bound = 2e-3 * v["scale"].as_f64().unwrap().max(1.0);
    assert!(v["reference_max_abs_diff"].as_f64().unwrap() <= bound, "onnxruntime (QDQ as written) vs segctl int8: {v}");
    assert!(v["reference_argmax_agreement"].as_f64().unwrap() >= 0.999, "{v}");
    // Its fused int8 kernels agree as closely where they are exact: with VNNI. Without it,
    // they multiply with vpmaddubsw, whose pair sums saturate, and differ by that much
    // (segctl's AVX2 path splits the activations so that they cannot).
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let vnni = cpuinfo.split_whitespace().any(|f| f == "avx512_vnni" || f == "avx_vnni" || f == "amx_int8");
    if vnni {
        assert!(v["max_abs_diff"].as_f64().unwrap() <= bound, "onnxruntime vs segctl int8: {v}");
        assert!(v["argmax_agreement"].as_f64().unwrap() >= 0.999, "{v}");
    } else {
        assert!(v["argmax_agreement"].as_f64().unwrap() >= 0.9, "onnxruntime's saturating kernels: {v}");
    }
}
