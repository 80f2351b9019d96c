use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::util::*;

fn sha256_hex(path: &Path) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(std::fs::read(path).unwrap()))
}

fn manifest(version_dir: &Path) -> serde_yaml::Value {
    serde_yaml::from_str(&std::fs::read_to_string(version_dir.join("model.yaml")).unwrap()).unwrap()
}

fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    names
}

fn export_cmd(config: &Path, checkpoint: &Path, repo: &Path) -> std::process::Command {
    let mut cmd = segctl();
    cmd.args(["export", "--json", "--config"]).arg(config).arg("--checkpoint").arg(checkpoint).args(["--name", "pets", "--repository"]).arg(repo);
    cmd
}

/// Every version folder holds exactly its weights and manifest, and they agree.
fn assert_consistent(model_dir: &Path) -> Vec<(u64, String, String)> {
    let mut out = Vec::new();
    for name in entries(model_dir) {
        let version: u64 = name.parse().unwrap_or_else(|_| panic!("`{name}` in the model folder is not a version"));
        let dir = model_dir.join(&name);
        assert_eq!(entries(&dir), vec!["model.safetensors", "model.yaml"], "version {version}");
        let m = manifest(&dir);
        assert_eq!(m["version"].as_u64(), Some(version));
        let sha = sha256_hex(&dir.join("model.safetensors"));
        assert_eq!(m["weights_sha256"].as_str(), Some(sha.as_str()), "version {version}: weights match the manifest");
        out.push((version, m["source_checkpoint"].as_str().unwrap().to_string(), sha));
    }
    out
}

#[test]
fn concurrent_exports_get_distinct_versions_matching_their_manifests() {
    let dir = tempfile::tempdir().unwrap();
    let (config, run_dir, _) = trained_model(dir.path(), 16);
    let checkpoints = [run_dir.join("checkpoints/epoch-0001.safetensors"), run_dir.join("checkpoints/epoch-0002.safetensors")];
    let repo = dir.path().join("repo");
    let children: Vec<_> = (0..8)
        .map(|i| export_cmd(&config, &checkpoints[i % 2], &repo).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap())
        .collect();
    let mut reported = Vec::new();
    for child in children {
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
        reported.push(json(&out)["version"].as_u64().unwrap());
    }
    reported.sort_unstable();
    assert_eq!(reported, (1..=8).collect::<Vec<_>>(), "8 distinct versions");
    let versions = assert_consistent(&repo.join("pets"));
    assert_eq!(versions.len(), 8, "nothing else in the model folder");
    for (_, source, sha) in &versions {
        // Exports of one checkpoint are identical; the two checkpoints differ.
        let same: Vec<_> = versions.iter().filter(|(_, s, _)| s == source).collect();
        assert_eq!(same.len(), 4, "{versions:?}");
        assert!(same.iter().all(|(_, _, h)| h == sha), "{versions:?}");
    }
    assert_ne!(versions.iter().find(|v| v.1.ends_with("0001.safetensors")).unwrap().2, versions.iter().find(|v| v.1.ends_with("0002.safetensors")).unwrap().2);
}

/// `kill -9` while an export stages (a model big enough that writing, flushing and hashing its
/// weights takes a while), then the staging folder a killed run leaves, planted by hand.
#[test]
fn a_killed_export_publishes_nothing_and_the_next_one_succeeds() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("pets");
    synthetic_dataset(&root, 12, 2);
    let config = tiny_config(dir.path(), &root, 1);
    let sets = ["model.unet.depth=4", "model.unet.base_width=32", "train.max_steps_per_epoch=1"];
    let mut train = segctl();
    train.args(["train", "--config"]).arg(&config);
    for s in sets {
        train.args(["--set", s]);
    }
    assert!(run(&mut train).status.success());
    let checkpoint = dir.path().join("runs/tiny/checkpoints/epoch-0001.safetensors");
    let repo = dir.path().join("models");
    let model_dir = repo.join("pets");

    let mut caught = None;
    for _attempt in 0..3 {
        let mut child = export_cmd(&config, &checkpoint, &repo).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
        let start = Instant::now();
        // Killed once its weights file is being written in its staging folder.
        let staging = loop {
            let staging = std::fs::read_dir(&model_dir)
                .into_iter()
                .flatten()
                .flatten()
                .map(|e| e.path())
                .find(|p| p.file_name().unwrap().to_string_lossy().starts_with(".staging-") && p.join("model.safetensors").exists());
            if staging.is_some() || child.try_wait().unwrap().is_some() {
                break staging;
            }
            assert!(start.elapsed() < Duration::from_secs(120), "export did not start");
            std::thread::sleep(Duration::from_millis(1));
        };
        let Some(staging) = staging else { continue };
        signal(child.id(), "KILL");
        child.wait().unwrap();
        let written = std::fs::metadata(staging.join("model.safetensors")).map(|m| m.len());
        eprintln!("killed while staging `{}` (weights at {written:?} bytes)", staging.display());
        caught = Some(staging);
        break;
    }
    let staging: PathBuf = caught.expect("an export was killed while staging");
    let published = assert_consistent_versions(&model_dir);
    let killed_version: u64 = staging.file_name().unwrap().to_string_lossy().trim_start_matches(".staging-").parse().unwrap();
    assert!(!published.contains(&killed_version), "the killed export published nothing: {published:?}");

    // The next export succeeds and takes the killed one's version; nothing of it is left.
    let out = run(&mut export_cmd(&config, &checkpoint, &repo));
    assert!(out.status.success());
    assert_eq!(json(&out)["version"].as_u64(), Some(killed_version));
    assert!(entries(&model_dir).iter().all(|n| !n.starts_with('.')), "{:?}", entries(&model_dir));
    assert_consistent(&model_dir);

    // A staging folder exactly as a killed export leaves it: lock free, weights half written.
    let next = killed_version + 1;
    let planted = model_dir.join(format!(".staging-{next}"));
    std::fs::create_dir_all(&planted).unwrap();
    std::fs::write(planted.join(".lock"), b"").unwrap();
    std::fs::write(planted.join("model.safetensors"), b"half").unwrap();
    let out = run(&mut export_cmd(&config, &checkpoint, &repo));
    assert!(out.status.success());
    assert_eq!(json(&out)["version"].as_u64(), Some(next));
    assert!(!planted.exists());
    let versions = assert_consistent(&model_dir);
    assert_eq!(versions.iter().map(|v| v.0).collect::<Vec<_>>(), published.iter().copied().chain([killed_version, next]).collect::<Vec<_>>());
    let photo = std::fs::read_dir(root.join("images")).unwrap().next().unwrap().unwrap().path();
    let out = run(segctl().args(["predict", "--model"]).arg(&model_dir).arg(&photo).arg("--out").arg(dir.path().join("out")));
    assert!(out.status.success());
}

/// Published version numbers (only complete, consistent folders may exist).
fn assert_consistent_versions(model_dir: &Path) -> Vec<u64> {
    let visible: Vec<String> = entries(model_dir).into_iter().filter(|n| !n.starts_with('.')).collect();
    visible.iter().map(|n| n.parse::<u64>().unwrap_or_else(|_| panic!("`{n}` is not a version"))).inspect(|v| {
        let dir = model_dir.join(v.to_string());
        assert_eq!(manifest(&dir)["weights_sha256"].as_str().unwrap(), sha256_hex(&dir.join("model.safetensors")));
    }).collect()
}

#[test]
fn a_damaged_or_unbounded_version_is_refused_wherever_it_is_loaded() {
    let dir = tempfile::tempdir().unwrap();
    let (config, _, repo) = trained_model(dir.path(), 16);
    let version = repo.join("pets/1");
    let weights = version.join("model.safetensors");
    let recorded = manifest(&version)["weights_sha256"].as_str().unwrap().to_string();
    let mut bytes = std::fs::read(&weights).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x40; // one bit of one weight
    std::fs::write(&weights, &bytes).unwrap();
    let actual = sha256_hex(&weights);
    let photo = std::fs::read_dir(dir.path().join("pets/images")).unwrap().next().unwrap().unwrap().path();

    let check = |out: &std::process::Output| {
        assert_eq!(out.status.code(), Some(2));
        let err = stderr(out);
        assert!(err.contains(&weights.display().to_string()) && err.contains(&recorded) && err.contains(&actual), "{err}");
    };
    check(&run(segctl().args(["predict", "--model"]).arg(repo.join("pets")).arg(&photo).arg("--out").arg(dir.path().join("out"))));
    check(&run(segctl().args(["evaluate", "--config"]).arg(&config).arg("--checkpoint").arg(&version)));

    // serve keeps running and reports the version as failed, with the reason.
    let mut child = segctl()
        .args(["serve", "--port", "0", "--config"])
        .arg(&config)
        .arg("--repository")
        .arg(&repo)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut first = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(child.stdout.take().unwrap()), &mut first).unwrap();
    let url = first.split_whitespace().find(|w| w.starts_with("http://")).unwrap_or_else(|| panic!("no address in {first:?}")).to_string();
    let start = Instant::now();
    let status = loop {
        let body: serde_json::Value = ureq::get(&format!("{url}/v1/models/pets")).call().map(|r| r.into_json().unwrap()).unwrap_or_default();
        let state = &body["model_version_status"][0];
        if state["state"] == "END" {
            break state.clone();
        }
        assert!(start.elapsed() < Duration::from_secs(60), "version never failed: {body}");
        std::thread::sleep(Duration::from_millis(50));
    };
    let _ = child.kill();
    let _ = child.wait();
    assert!(status["status"]["error_message"].as_str().unwrap().contains("weights_sha256"), "{status}");

    // A spec no config would allow is refused before any model is built.
    std::fs::write(&weights, {
        bytes[last] ^= 0x40;
        &bytes
    })
    .unwrap();
    let yaml = std::fs::read_to_string(version.join("model.yaml")).unwrap();
    for (from, to, key) in [("input_size: 32", "input_size: 1000000", "input_size"), ("depth: 2", "depth: 0", "unet.depth")] {
        assert!(yaml.contains(from), "{yaml}");
        std::fs::write(version.join("model.yaml"), yaml.replace(from, to)).unwrap();
        let out = run(segctl().args(["predict", "--model"]).arg(&version).arg(&photo).arg("--out").arg(dir.path().join("out")));
        assert_eq!(out.status.code(), Some(2));
        assert!(stderr(&out).contains(key) && stderr(&out).contains("model.yaml"), "{}", stderr(&out));
    }
}

/// A trained model wide enough (8 channels) that its convolutions run in bf16, at 32² (rows
/// of 32 pixels: the AMX row mode on such CPUs).
fn trained_wide(dir: &Path) -> (PathBuf, PathBuf) {
    let root = dir.join("pets");
    synthetic_dataset(&root, 24, 5);
    let config = tiny_config(dir, &root, 8);
    let yaml = std::fs::read_to_string(&config).unwrap().replace("base_width: 4", "base_width: 8");
    std::fs::write(&config, yaml).unwrap();
    let out = run(segctl().args(["train", "--config"]).arg(&config));
    assert!(out.status.success(), "training failed: {}", stderr(&out));
    (config, dir.join("runs/tiny"))
}

#[test]
fn bf16_export_is_gated_recorded_and_served_at_its_precision() {
    let dir = tempfile::tempdir().unwrap();
    let (config, run_dir) = trained_wide(dir.path());
    let repo = dir.path().join("repo");

    // Refused: a gate that demands a gain publishes nothing and names both mIoUs.
    let out = run(export_cmd(&config, &run_dir, &repo).args(["--precision", "bf16", "--set", "export.max_miou_drop=-1"]));
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("validation mIoU") && err.contains("at f32") && err.contains("export.max_miou_drop"), "{err}");
    assert!(!repo.join("pets").exists() || entries(&repo.join("pets")).iter().all(|e| !e.chars().all(|c| c.is_ascii_digit())), "nothing published");

    // Version 1 at bf16, version 2 at f32.
    let out = run(export_cmd(&config, &run_dir, &repo).args(["--precision", "bf16"]));
    assert!(out.status.success(), "{}", stderr(&out));
    let report = json(&out);
    assert_eq!(report["version"], 1);
    assert_eq!(report["precision"], "bf16");
    let check = &report["precision_check"];
    let (f32_miou, miou) = (check["f32_miou"].as_f64().unwrap(), check["miou"].as_f64().unwrap());
    assert!(f32_miou > 0.25 && miou > 0.25, "a trained model: {check}");
    assert!(f32_miou - miou <= 0.005, "the gate held the drop: {check}");
    assert!(check["mask_agreement"].as_f64().unwrap() >= 0.995, "{check}");
    assert!(check["images"].as_u64().unwrap() >= 4, "{check}");
    let m = manifest(&repo.join("pets/1"));
    assert_eq!(m["precision"].as_str(), Some("bf16"));
    assert_eq!(m["precision_check"]["miou"].as_f64(), Some(miou));
    assert_eq!(m["precision_check"]["f32_miou"].as_f64(), Some(f32_miou));
    let out = run(&mut export_cmd(&config, &run_dir, &repo));
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(manifest(&repo.join("pets/2")).get("precision").is_none_or(|p| p.as_str() == Some("f32")));

    // evaluate --model and benchmark run version 1 at bf16: the gate's own mIoU comes back.
    let evaluate = |version: &str, kernels: Option<&str>| evaluated_miou(&config, &repo, version, kernels);
    assert!((evaluate("1", None) - miou).abs() < 1e-9, "evaluate runs the version at bf16");
    assert!((evaluate("2", None) - f32_miou).abs() < 1e-9, "and the f32 version at f32");
    // The portable bf16 path computes the same products: the same mIoU within rounding.
    assert!((evaluate("1", Some("portable")) - miou).abs() < 0.01);
    let out = run(segctl().args(["benchmark", "--json", "--iterations", "2", "--warmup", "0", "--model"]).arg(repo.join("pets/1")));
    assert!(out.status.success(), "{}", stderr(&out));
    let bench = json(&out);
    assert_eq!(bench["precision"], "bf16");
    assert_eq!(bench["plan"]["precision"], "bf16");
    assert!(bench["plan"]["kernels"].as_object().unwrap().keys().any(|k| k.starts_with("bf16-")), "{bench}");
    let out = run(segctl().args(["benchmark", "--json", "--iterations", "2", "--warmup", "0", "--precision", "f32", "--model"]).arg(repo.join("pets/1")));
    assert_eq!(json(&out)["precision"], "f32", "--precision converts for timing");

    // predict with either version: masks of the synthetic photos agree on ≥ 99.5 % of pixels.
    let (same, total) = predicted_mask_agreement(dir.path(), &repo, "1", "2");
    assert!(same as f64 >= 0.995 * total as f64, "bf16 and f32 masks agree on {same} of {total} pixels");
}

/// `predict --model` of two versions over the synthetic photos: pixels whose class both give,
/// of all.
fn predicted_mask_agreement(dir: &Path, repo: &Path, a: &str, b: &str) -> (usize, usize) {
    let photos = dir.join("pets/images");
    let masks = |version: &str| {
        let out_dir = dir.join(format!("pred{version}"));
        let out = run(segctl().args(["predict", "--model"]).arg(repo.join("pets").join(version)).arg(&photos).arg("--out").arg(&out_dir));
        assert!(out.status.success(), "{}", stderr(&out));
        out_dir
    };
    let (a, b) = (masks(a), masks(b));
    let (mut same, mut total) = (0usize, 0usize);
    for name in entries(&a).into_iter().filter(|n| n.ends_with("_mask.png")) {
        let x = image::open(a.join(&name)).unwrap().to_luma8();
        let y = image::open(b.join(&name)).unwrap().to_luma8();
        same += x.pixels().zip(y.pixels()).filter(|(p, q)| p == q).count();
        total += x.pixels().len();
    }
    assert!(total > 24 * 1000, "{total} pixels");
    (same, total)
}

#[test]
fn int8_export_is_calibrated_gated_recorded_and_served_at_its_precision() {
    let dir = tempfile::tempdir().unwrap();
    let (config, run_dir) = trained_wide(dir.path());
    let repo = dir.path().join("repo");

    // Version 1 at int8: calibrated on training images, gated on the validation split.
    let out = run(export_cmd(&config, &run_dir, &repo).args(["--precision", "int8"]));
    assert!(out.status.success(), "{}", stderr(&out));
    let report = json(&out);
    assert_eq!((report["version"].as_u64(), report["precision"].as_str()), (Some(1), Some("int8")), "{report}");
    let check = &report["precision_check"];
    let (f32_miou, miou) = (check["f32_miou"].as_f64().unwrap(), check["miou"].as_f64().unwrap());
    assert!(f32_miou > 0.25 && miou > 0.25, "a trained model: {check}");
    assert!(f32_miou - miou <= 0.005, "the gate held the drop: {check}");
    assert!(check["mask_agreement"].as_f64().unwrap() >= 0.99, "{check}");
    // The 12 training images (trainval's 16 less a quarter for validation): all of them,
    // fewer than export.calibration_samples' 64.
    assert_eq!(check["calibration_samples"].as_u64(), Some(12), "{check}");
    let digest = check["calibration_digest"].as_str().unwrap();
    assert!(digest.len() == 64 && digest.chars().all(|c| c.is_ascii_hexdigit()), "{check}");
    let m = manifest(&repo.join("pets/1"));
    assert_eq!(m["precision"].as_str(), Some("int8"));
    assert_eq!(m["precision_check"]["calibration_digest"].as_str(), Some(digest));
    let ranges = m["calibration"]["ranges"].as_sequence().unwrap();
    assert!(ranges.len() >= 10, "a range per convolution input: {m:?}");
    // The input image's range is the photos' (this config scales them to 0..1).
    let input = ranges.iter().find(|r| r[0].as_u64() == Some(0)).expect("the input's range");
    let (lo, hi) = (input[1].as_f64().unwrap(), input[2].as_f64().unwrap());
    assert!((0.0..0.5).contains(&lo) && (0.5..=1.0).contains(&hi), "{input:?}");
    // The same seed draws the same images: a second export records the same digest.
    let out = run(export_cmd(&config, &run_dir, &repo).args(["--precision", "int8", "--set", "export.calibration_samples=5"]));
    assert!(out.status.success(), "{}", stderr(&out));
    let five = json(&out)["precision_check"].clone();
    assert_eq!(five["calibration_samples"].as_u64(), Some(5));
    assert_ne!(five["calibration_digest"].as_str(), Some(digest));
    let out = run(export_cmd(&config, &run_dir, &repo).args(["--precision", "int8", "--set", "export.calibration_samples=5"]));
    assert_eq!(json(&out)["precision_check"]["calibration_digest"], five["calibration_digest"], "the draw follows data.seed");
    // Version 4 at f32.
    let out = run(&mut export_cmd(&config, &run_dir, &repo));
    assert!(out.status.success(), "{}", stderr(&out));

    // evaluate --model runs version 1 at int8: the gate's own mIoU; every int8 unit computes
    // the same integer sums.
    let evaluate = |version: &str, kernels: Option<&str>| evaluated_miou(&config, &repo, version, kernels);
    assert!((evaluate("1", None) - miou).abs() < 1e-9, "evaluate runs the version at int8");
    assert!((evaluate("4", None) - f32_miou).abs() < 1e-9, "and the f32 version at f32");
    let avx2 = std::fs::read_to_string("/proc/cpuinfo").is_ok_and(|c| c.split_whitespace().any(|f| f == "avx2"));
    for kernels in ["portable", "avx2"].into_iter().filter(|k| *k != "avx2" || avx2) {
        assert!((evaluate("1", Some(kernels)) - miou).abs() < 1e-3, "{kernels}");
    }
    let out = run(segctl().args(["benchmark", "--json", "--iterations", "2", "--warmup", "0", "--model"]).arg(repo.join("pets/1")));
    assert!(out.status.success(), "{}", stderr(&out));
    let bench = json(&out);
    assert_eq!(bench["precision"], "int8");
    assert!(bench["plan"]["kernels"].as_object().unwrap().keys().any(|k| k.starts_with("int8-")), "{bench}");
    // An f32 version converted on the fly for timing.
    let out = run(segctl().args(["benchmark", "--json", "--iterations", "2", "--warmup", "0", "--precision", "int8", "--model"]).arg(repo.join("pets/4")));
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(json(&out)["plan"]["precision"], "int8");

    // predict: int8 and f32 masks of the synthetic photos agree on ≥ 99 % of pixels.
    let (same, total) = predicted_mask_agreement(dir.path(), &repo, "1", "4");
    assert!(same as f64 >= 0.99 * total as f64, "int8 and f32 masks agree on {same} of {total} pixels");

    // serve runs version 1 at int8 (its metadata says so) and answers the mask predict
    // computes for the same photo.
    let repo8 = dir.path().join("repo8");
    std::fs::create_dir_all(repo8.join("pets")).unwrap();
    copy_dir(&repo.join("pets/1"), &repo8.join("pets/1"));
    let server = JsonServer::start(&config, &repo8);
    assert!(server.wait_for("/readyz"), "the server did not become ready");
    let agent = ureq::AgentBuilder::new().timeout(Duration::from_secs(30)).build();
    let meta: serde_json::Value = agent.get(&format!("{}/v1/models/pets/metadata", server.url)).call().unwrap().into_json().unwrap();
    let runtime = &meta["metadata"]["runtime"];
    assert_eq!(runtime["precision"], "int8", "{meta}");
    assert!(runtime["engine"].as_str().unwrap().contains("int8 on"), "{runtime}");
    let photo_name = entries(&photos_dir(dir.path())).into_iter().find(|n| n.ends_with(".jpg")).unwrap();
    let photo = std::fs::read(photos_dir(dir.path()).join(&photo_name)).unwrap();
    let answer = agent.post(&format!("{}/v1/models/pets:segment", server.url)).set("Content-Type", "image/jpeg").send_bytes(&photo).unwrap();
    let mut served_png = Vec::new();
    std::io::Read::read_to_end(&mut answer.into_reader(), &mut served_png).unwrap();
    let served_mask = image::load_from_memory(&served_png).unwrap().to_luma8();
    let predicted = image::open(dir.path().join("pred1").join(photo_name.replace(".jpg", "_mask.png"))).unwrap().to_luma8();
    assert_eq!(served_mask.dimensions(), predicted.dimensions());
    assert!(served_mask.pixels().zip(predicted.pixels()).all(|(a, b)| a.0 == b.0), "serve and predict give the same int8 mask");
    drop(server);

    // A calibration made to fail: every training photo black. The gate refuses, names both
    // mIoUs, and publishes nothing.
    let root = dir.path().join("pets");
    let train = segctl::data::PetDataset::open(&root, segctl::config::Split::Train, 0.25, 1).unwrap();
    for i in 0..train.len() {
        let path = root.join("images").join(format!("{}.jpg", train.stem(i)));
        let (w, h) = image::image_dimensions(&path).unwrap();
        image::RgbImage::new(w, h).save(&path).unwrap();
    }
    let before = entries(&repo.join("pets"));
    let out = run(export_cmd(&config, &run_dir, &repo).args(["--precision", "int8", "--set", "export.calibration_samples=1"]));
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("int8 loses too much accuracy") && err.contains("at f32") && err.contains("export.max_miou_drop"), "{err}");
    assert_eq!(entries(&repo.join("pets")), before, "nothing published");
}

fn photos_dir(dir: &Path) -> PathBuf {
    dir.join("pets/images")
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

/// `evaluate --model <repo>/pets/<version>` on the validation split (with `SEGCTL_KERNELS` =
/// `kernels`): its mIoU.
fn evaluated_miou(config: &Path, repo: &Path, version: &str, kernels: Option<&str>) -> f64 {
    let mut cmd = segctl();
    if let Some(k) = kernels {
        cmd.env("SEGCTL_KERNELS", k);
    }
    let out = run(cmd.args(["evaluate", "--json", "--split", "val", "--config"]).arg(config).arg("--model").arg(repo.join("pets").join(version)));
    assert!(out.status.success(), "{}", stderr(&out));
    json(&out)["mean_iou"].as_f64().unwrap()
}
