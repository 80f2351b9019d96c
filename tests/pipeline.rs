use std::io::Read;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::util::*;

#[test]
fn train_writes_a_complete_run_folder() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("pets");
    synthetic_dataset(&root, 24, 1);
    let config = tiny_config(dir.path(), &root, 2);
    let out = run(segctl().args(["train", "--json", "--config"]).arg(&config));
    assert!(out.status.success());
    let report = json(&out);
    assert_eq!(report["epochs_completed"], 2);
    assert_eq!(report["interrupted"], false);
    let run_dir = dir.path().join("runs/tiny");
    for file in ["config.yaml", "metrics.jsonl", "curves.png", "summary.json", "checkpoints/best.safetensors", "checkpoints/epoch-0002.safetensors"] {
        assert!(run_dir.join(file).is_file(), "{file} missing");
    }
    let log = std::fs::read_to_string(run_dir.join("metrics.jsonl")).unwrap();
    let records: Vec<serde_json::Value> = log.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(records.len(), 2);
    for (i, r) in records.iter().enumerate() {
        assert_eq!(r["epoch"], i + 1);
        for key in ["train_loss", "train_pixel_accuracy", "train_images_per_s", "val_loss", "val_pixel_accuracy", "val_mean_iou", "lr"] {
            assert!(r[key].as_f64().is_some_and(f64::is_finite), "{key} in {r}");
        }
    }
    assert!(records[1]["train_loss"].as_f64() < records[0]["train_loss"].as_f64(), "the loss goes down");
    assert_eq!(&std::fs::read(run_dir.join("curves.png")).unwrap()[..4], b"\x89PNG");

    // A second fresh run into the same folder is refused, pointing at --resume.
    let out = run(segctl().args(["train", "--config"]).arg(&config));
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("--resume"), "{}", stderr(&out));
}

#[test]
fn evaluate_reports_metrics_and_gates_on_them() {
    let dir = tempfile::tempdir().unwrap();
    let (config, run_dir, repo) = trained_model(dir.path(), 24);
    let out = run(segctl().args(["evaluate", "--json", "--config"]).arg(&config).arg("--checkpoint").arg(&run_dir));
    assert_eq!(out.status.code(), Some(0));
    let report = json(&out);
    for key in ["pixel_accuracy", "mean_iou", "per_class_iou", "dice", "fg_bg_iou", "confusion_matrix", "samples"] {
        assert!(!report[key].is_null(), "{key} missing");
    }
    for class in ["pet", "background", "border"] {
        assert!(report["per_class_iou"][class].as_f64().is_some());
    }
    let total: u64 = report["confusion_matrix"].as_array().unwrap().iter().flat_map(|r| r.as_array().unwrap()).map(|v| v.as_u64().unwrap()).sum();
    assert_eq!(total, report["samples"].as_u64().unwrap() * 32 * 32);
    assert_eq!(report["split"], "test");
    let miou = report["mean_iou"].as_f64().unwrap();
    let baseline = dir.path().join("baseline.json");
    std::fs::write(&baseline, &out.stdout).unwrap();

    // The human table.
    let out = run(segctl().args(["evaluate", "--config"]).arg(&config).arg("--checkpoint").arg(&run_dir));
    assert!(stdout(&out).contains("confusion matrix") && stdout(&out).contains("ACCEPTED"));
    // Gate: below --min-miou → 1; at the baseline with --max-drop 0 → 0; an exported model works too.
    let out = run(segctl().args(["evaluate", "--config"]).arg(&config).arg("--checkpoint").arg(&run_dir).args(["--min-miou", "0.999"]));
    assert_eq!(out.status.code(), Some(1));
    assert!(stdout(&out).contains("REJECTED"));
    let out = run(segctl().args(["evaluate", "--config"]).arg(&config).arg("--checkpoint").arg(repo.join("pets")).arg("--baseline").arg(&baseline).args(["--max-drop", "0.0001"]));
    assert_eq!(out.status.code(), Some(0), "the exported model scores like its checkpoint");
    let better = dir.path().join("better.json");
    std::fs::write(&better, format!("{{\"split\": \"test\", \"mean_iou\": {}}}", miou + 0.2)).unwrap();
    let out = run(segctl().args(["evaluate", "--json", "--config"]).arg(&config).arg("--checkpoint").arg(&run_dir).arg("--baseline").arg(&better).args(["--max-drop", "0.05"]));
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(json(&out)["gate"]["accepted"], false);
    // Could not run → 2.
    let out = run(segctl().args(["evaluate", "--config"]).arg(&config).arg("--checkpoint").arg(dir.path().join("nope")));
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn an_interrupted_run_resumes_where_it_stopped() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("pets");
    synthetic_dataset(&root, 64, 2);
    let config = tiny_config(dir.path(), &root, 8);
    // With a weight average, so resuming must restore both the trained and averaged weights.
    let set = |name: &str| {
        ["--set".to_string(), format!("train.run_name={name}"), "--set".to_string(), "train.ema_decay=0.9".to_string()]
    };

    let out = run(segctl().args(["train", "--config"]).arg(&config).args(set("straight")));
    assert!(out.status.success());

    let mut child = segctl().args(["train", "--config"]).arg(&config).args(set("stopped")).stdout(std::process::Stdio::piped()).spawn().unwrap();
    let log = dir.path().join("runs/stopped/metrics.jsonl");
    let start = Instant::now();
    while std::fs::read_to_string(&log).map_or(0, |t| t.lines().count()) < 2 {
        assert!(start.elapsed() < Duration::from_secs(120), "training did not progress");
        std::thread::sleep(Duration::from_millis(20));
    }
    signal(child.id(), "INT");
    let status = child.wait().unwrap();
    let mut text = String::new();
    child.stdout.take().unwrap().read_to_string(&mut text).unwrap();
    assert_eq!(status.code(), Some(130), "stopped by a signal: {text}");
    assert!(text.contains("--resume"), "{text}");
    let run_dir = dir.path().join("runs/stopped");
    assert!(run_dir.join("checkpoints/interrupted.safetensors").is_file(), "Ctrl-C writes checkpoints/interrupted.safetensors");

    let out = run(segctl().args(["train", "--json", "--config"]).arg(&config).args(set("stopped")).arg("--resume"));
    assert!(out.status.success());
    assert_eq!(json(&out)["epochs_completed"], 8);

    let read = |name: &str| -> Vec<serde_json::Value> {
        std::fs::read_to_string(dir.path().join("runs").join(name).join("metrics.jsonl")).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
    };
    let (a, b) = (read("straight"), read("stopped"));
    assert_eq!(a.len(), 8);
    assert_eq!(b.len(), 8, "each epoch logged once");
    for (x, y) in a.iter().zip(&b) {
        let (lx, ly) = (x["train_loss"].as_f64().unwrap(), y["train_loss"].as_f64().unwrap());
        assert!((lx - ly).abs() < 1e-3 * lx.abs().max(1.0), "epoch {}: loss {lx} vs {ly}", x["epoch"]);
    }
    let (ma, mb) = (a[7]["val_mean_iou"].as_f64().unwrap(), b[7]["val_mean_iou"].as_f64().unwrap());
    assert!((ma - mb).abs() < 0.005, "final mIoU {ma} vs {mb}");
    let checkpoint = std::fs::read(dir.path().join("runs/stopped/checkpoints/best.safetensors")).unwrap();
    let names = safetensors::SafeTensors::deserialize(&checkpoint).unwrap().names().into_iter().map(str::to_string).collect::<Vec<_>>();
    assert!(names.iter().any(|n| n.starts_with("online.")) && names.iter().any(|n| n.starts_with("model.")), "{names:?}");
}

/// A JPEG with an EXIF orientation tag (6 = rotate 90° clockwise to display).
fn exif_rotated_jpeg(path: &Path, width: u32, height: u32) {
    let img = image::RgbImage::from_fn(width, height, |x, y| image::Rgb([(x * 3) as u8, (y * 3) as u8, 80]));
    let mut jpeg = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, 90).encode_image(&img).unwrap();
    let mut payload = b"Exif\0\0MM\x00\x2a\x00\x00\x00\x08\x00\x01".to_vec();
    payload.extend_from_slice(b"\x01\x12\x00\x03\x00\x00\x00\x01\x00\x06\x00\x00\x00\x00\x00\x00");
    let mut out = jpeg[..2].to_vec();
    out.extend_from_slice(&[0xFF, 0xE1]);
    out.extend_from_slice(&((payload.len() + 2) as u16).to_be_bytes());
    out.extend_from_slice(&payload);
    out.extend_from_slice(&jpeg[2..]);
    std::fs::write(path, out).unwrap();
}

#[test]
fn predict_writes_masks_at_each_photo_size() {
    let dir = tempfile::tempdir().unwrap();
    let (_, run_dir, repo) = trained_model(dir.path(), 16);
    let photos = dir.path().join("photos");
    std::fs::create_dir_all(&photos).unwrap();
    exif_rotated_jpeg(&photos.join("rotated.jpg"), 90, 50);
    let first = std::fs::read_dir(dir.path().join("pets/images")).unwrap().next().unwrap().unwrap().path();
    std::fs::copy(&first, photos.join("plain.jpg")).unwrap();
    std::fs::write(photos.join("broken.jpg"), b"not an image at all").unwrap();
    let out_dir = dir.path().join("out");

    let out = run(segctl().args(["predict", "--json", "--overlay", "--side-by-side", "--checkpoint"]).arg(&run_dir).arg(&photos).arg("--out").arg(&out_dir));
    assert_eq!(out.status.code(), Some(1), "one input failed");
    let report = json(&out);
    assert_eq!(report["images"].as_array().unwrap().len(), 2);
    assert_eq!(report["failures"][0]["input"].as_str().unwrap(), photos.join("broken.jpg").to_str().unwrap());
    let size = |p: &str| image::image_dimensions(out_dir.join(p)).unwrap();
    // EXIF orientation 6: the 90×50 stored image displays as 50×90.
    assert_eq!(size("rotated_mask.png"), (50, 90));
    assert_eq!(size("rotated_color.png"), (50, 90));
    assert_eq!(size("rotated_overlay.png"), (50, 90));
    assert_eq!(size("rotated_side_by_side.png"), (3 * 50 + 16, 90));
    assert_eq!(size("plain_mask.png"), image::image_dimensions(&first).unwrap());
    let mask = image::open(out_dir.join("plain_mask.png")).unwrap().to_luma8();
    assert!(mask.pixels().all(|p| p.0[0] <= 2), "class ids only");

    // An exported model works the same way.
    let out = run(segctl().args(["predict", "--model"]).arg(repo.join("pets")).arg(photos.join("plain.jpg")).arg("--out").arg(dir.path().join("out2")));
    assert!(out.status.success());
    assert!(dir.path().join("out2/plain_mask.png").is_file());
}

#[test]
fn export_never_overwrites_a_version() {
    let dir = tempfile::tempdir().unwrap();
    let (config, run_dir, repo) = trained_model(dir.path(), 16);
    let manifest = std::fs::read_to_string(repo.join("pets/1/model.yaml")).unwrap();
    for key in ["arch: unet", "input_size: 32", "normalization:", "class_names:", "config_digest:", "dataset_digest:", "created:", "segctl_version:", "weights_sha256:"] {
        assert!(manifest.contains(key), "model.yaml lacks {key}:\n{manifest}");
    }
    let out = run(segctl().args(["export", "--json", "--config"]).arg(&config).arg("--checkpoint").arg(&run_dir).args(["--name", "pets", "--repository"]).arg(&repo));
    assert!(out.status.success());
    assert_eq!(json(&out)["version"], 2);
    let out = run(segctl().args(["export", "--config"]).arg(&config).arg("--checkpoint").arg(&run_dir).args(["--name", "pets", "--version", "1", "--repository"]).arg(&repo));
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("never overwritten"));
    let out = run(segctl().args(["export", "--config"]).arg(&config).arg("--checkpoint").arg(&run_dir).args(["--name", "../evil", "--repository"]).arg(&repo));
    assert_eq!(out.status.code(), Some(2));
}

/// The pretrained encoder comes through hf-hub from `HF_ENDPOINT` (here a loopback server
/// serving timm-named MobileNetV2 weights), lands in `HF_HOME`, and is reused offline.
#[test]
fn pretrained_encoder_weights_come_through_hf_hub() {
    let dir = tempfile::tempdir().unwrap();
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/mobilenetv2_taps.safetensors");
    let hub = dir.path().join("hub");
    let file = hub.join("timm-test/mobilenet/resolve/main/model.safetensors");
    std::fs::create_dir_all(file.parent().unwrap()).unwrap();
    std::fs::copy(&fixture, &file).unwrap();
    let server = FileServer::start(&hub, Faults::default());
    let root = dir.path().join("pets");
    synthetic_dataset(&root, 16, 4);
    let config = tiny_config(dir.path(), &root, 1);
    let train = |run_name: &str, weights: &str, offline: bool| {
        let mut cmd = segctl();
        cmd.env("RUST_LOG", "segctl=info")
            .env("HF_ENDPOINT", server.url().trim_end_matches('/'))
            .env("HF_HOME", dir.path().join("hf"))
            .args(["train", "--config"])
            .arg(&config)
            .args(["--set", "model.arch=mobilenetv2_unet", "--set", "model.encoder.trainable=false"])
            .args(["--set", &format!("model.encoder.weights={weights}"), "--set", &format!("train.run_name={run_name}")])
            .args(["--set", "train.max_steps_per_epoch=1"]);
        if offline {
            cmd.env("HF_HUB_OFFLINE", "1");
        }
        run(&mut cmd)
    };
    let out = train("hub", "timm-test/mobilenet", false);
    assert!(out.status.success());
    assert!(stderr(&out).contains("pretrained encoder tensors"), "{}", stderr(&out));
    let requests = server.seen().len();
    assert!(requests >= 2, "metadata and download requests: {:?}", server.seen());
    // A frozen encoder keeps exactly the downloaded weights.
    let ckpt = candle_core::safetensors::load(dir.path().join("runs/hub/checkpoints/epoch-0001.safetensors"), &candle_core::Device::Cpu).unwrap();
    let theirs = candle_core::safetensors::load(&fixture, &candle_core::Device::Cpu).unwrap();
    let a = ckpt["model.encoder.blocks.3.0.conv_dw.weight"].flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let b = theirs["blocks.3.0.conv_dw.weight"].to_dtype(candle_core::DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(a, b);

    // Offline: served from the cache, no request.
    let out = train("offline", "timm-test/mobilenet", true);
    assert!(out.status.success());
    assert_eq!(server.seen().len(), requests);
    let out = train("missing", "timm-test/not-cached", true);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("HF_HUB_OFFLINE"), "{}", stderr(&out));
    // A local .safetensors path works without any hub.
    let out = train("local", fixture.to_str().unwrap(), true);
    assert!(out.status.success());
}

#[test]
fn resume_skips_a_truncated_newest_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("pets");
    synthetic_dataset(&root, 24, 1);
    let config = tiny_config(dir.path(), &root, 2);
    assert!(run(segctl().args(["train", "--config"]).arg(&config)).status.success());
    let checkpoints = dir.path().join("runs/tiny/checkpoints");
    // The newest checkpoints cut short, as a full disk or a copy interrupted would leave them
    // (`best` may be the same epoch).
    for name in ["epoch-0002.safetensors", "best.safetensors"] {
        let bytes = std::fs::read(checkpoints.join(name)).unwrap();
        std::fs::write(checkpoints.join(name), &bytes[..bytes.len() / 2]).unwrap();
    }
    std::fs::write(checkpoints.join(".tmp-Qw12Er"), b"half a checkpoint of a killed run").unwrap();

    let out = run(segctl().args(["train", "--json", "--config"]).arg(&config).args(["--epochs", "3", "--resume"]));
    assert!(out.status.success());
    let report = json(&out);
    assert!(report["resumed_from"].as_str().unwrap().ends_with("epoch-0001.safetensors"), "{report}");
    let skipped = report["skipped_checkpoints"].as_array().unwrap();
    assert!(skipped[0]["path"].as_str().unwrap().ends_with("epoch-0002.safetensors"), "{skipped:?}");
    assert!(skipped.iter().all(|s| s["reason"].as_str().unwrap().contains("safetensors")), "{skipped:?}");
    assert_eq!(report["epochs_completed"], 3);
    let log = std::fs::read_to_string(dir.path().join("runs/tiny/metrics.jsonl")).unwrap();
    let epochs: Vec<u64> = log.lines().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["epoch"].as_u64().unwrap()).collect();
    assert_eq!(epochs, vec![1, 2, 3], "epoch 2 redone once");
    assert!(!checkpoints.join(".tmp-Qw12Er").exists(), "a killed run's temporary file is removed");
    let out = run(segctl().args(["evaluate", "--config"]).arg(&config).arg("--checkpoint").arg(checkpoints.join("epoch-0003.safetensors")));
    assert_eq!(out.status.code(), Some(0));
}

#[test]
fn preview_augment_writes_a_contact_sheet_and_trains_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("pets");
    synthetic_dataset(&root, 24, 3);
    let config = tiny_config(dir.path(), &root, 1);
    let sheet = dir.path().join("sheet.png");
    let out = run(segctl()
        .args(["train", "--json", "--preview-augment", "9", "--config"])
        .arg(&config)
        .args(["--set", "data.augment.crop.p=1", "--set", "data.augment.rotate.p=1", "--set", "data.augment.color.p=1", "--preview-out"])
        .arg(&sheet));
    assert!(out.status.success());
    let report = json(&out);
    assert_eq!(report["samples"], 9);
    assert!(report["samples_per_s"].as_f64().unwrap() > 0.0);
    // 3×3 cells of 32² with 4-pixel gaps.
    assert_eq!(image::image_dimensions(&sheet).unwrap(), (3 * 32 + 2 * 4, 3 * 32 + 2 * 4));
    assert!(!dir.path().join("runs").exists(), "a preview trains nothing");
    let out = run(segctl().args(["train", "--preview-augment", "4", "--set", "data.augment.rotate.degrees=90", "--config"]).arg(&config));
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("data.augment.rotate.degrees"), "{}", stderr(&out));
}

#[test]
fn early_stopping_stops_after_patience_epochs_without_improvement() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("pets");
    synthetic_dataset(&root, 16, 4);
    let config = tiny_config(dir.path(), &root, 8);
    // No epoch can beat the first by a whole IoU point: epoch 1 is the best, 2 and 3 do not
    // improve, patience 2 stops after epoch 3.
    let out = run(segctl()
        .args(["train", "--json", "--config"])
        .arg(&config)
        .args(["--set", "train.early_stopping.patience=2", "--set", "train.early_stopping.min_delta=1.0"]));
    assert!(out.status.success());
    let report = json(&out);
    assert_eq!(report["epochs_completed"], 3, "{report}");
    assert_eq!(report["stopped_early"], true);
    assert_eq!(report["best_epoch"], 1);
    let lines = std::fs::read_to_string(dir.path().join("runs/tiny/metrics.jsonl")).unwrap().lines().count();
    assert_eq!(lines, 3);
}
