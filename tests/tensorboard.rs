use std::path::Path;
use std::process::Command;

use crate::util::*;

fn read_events(python: &str, run_dir: &Path) -> serde_json::Value {
    let out = Command::new(python).arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/check/tensorboard_check.py")).arg(run_dir).output().unwrap();
    assert!(out.status.success(), "EventAccumulator failed:\n{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn steps(v: &serde_json::Value) -> Vec<u64> {
    v.as_array().unwrap().iter().map(|e| e[0].as_u64().unwrap()).collect()
}

#[test]
fn tensorboard_reads_every_scalar_and_image_once_across_a_resume() {
    let Some(python) = checker_python("tensorboard.backend.event_processing.event_accumulator", "pip install tensorboard") else { return };
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("pets");
    synthetic_dataset(&root, 16, 5);
    let config = tiny_config(dir.path(), &root, 2);
    assert!(run(segctl().args(["train", "--config"]).arg(&config)).status.success());
    let run_dir = dir.path().join("runs/tiny");
    let records: Vec<serde_json::Value> = std::fs::read_to_string(run_dir.join("metrics.jsonl")).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let epoch_steps: Vec<u64> = records.iter().map(|r| r["step"].as_u64().unwrap()).collect();
    let last = *epoch_steps.last().unwrap();

    // Train epoch 2 again from the epoch-1 checkpoint: its steps were already logged once.
    let out = run(segctl().args(["train", "--config"]).arg(&config).arg("--resume").arg(run_dir.join("checkpoints/epoch-0001.safetensors")));
    assert!(out.status.success());
    let files = std::fs::read_dir(&run_dir).unwrap().flatten().filter(|e| e.file_name().to_string_lossy().starts_with("events.out.tfevents.")).count();
    assert_eq!(files, 2, "one event file per start");

    let v = read_events(&python, &run_dir);
    let scalars = &v["scalars"];
    assert_eq!(steps(&scalars["train/loss"]), (1..=last).collect::<Vec<_>>(), "every step once, in order");
    assert_eq!(steps(&scalars["train/learning_rate"]), (1..=last).collect::<Vec<_>>());
    for tag in ["val/loss", "val/pixel_accuracy", "val/mean_iou", "val/iou/pet", "val/iou/background", "val/iou/border", "train/images_per_s", "epoch"] {
        assert_eq!(steps(&scalars[tag]), epoch_steps, "{tag}");
    }
    // The values are those of metrics.jsonl as rewritten by the resumed run (f32 in the file).
    let records: Vec<serde_json::Value> = std::fs::read_to_string(run_dir.join("metrics.jsonl")).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    for (i, r) in records.iter().enumerate() {
        let logged = scalars["val/mean_iou"][i][1].as_f64().unwrap();
        assert!((logged - r["val_mean_iou"].as_f64().unwrap()).abs() < 1e-6, "epoch {}: {logged} vs {}", i + 1, r["val_mean_iou"]);
    }
    let lr = scalars["train/learning_rate"].as_array().unwrap();
    assert!(lr.iter().all(|e| e[1].as_f64().unwrap() > 0.0));
    // Up to three validation photos per epoch (this split has fewer), each photo | truth |
    // prediction at 32×32.
    let images = v["images"].as_object().unwrap();
    assert!((2..=3).contains(&images.len()), "{images:?}");
    for (tag, list) in images {
        assert!(tag.starts_with("val/"), "{tag}");
        assert_eq!(steps(list), epoch_steps, "{tag}");
        assert_eq!(list[0][1], 3 * 32 + 8);
        assert_eq!(list[0][2], 32);
    }

    // train.tensorboard: false writes none.
    let dir = tempfile::tempdir().unwrap();
    synthetic_dataset(&dir.path().join("pets"), 8, 5);
    let config = tiny_config(dir.path(), &dir.path().join("pets"), 1);
    assert!(run(segctl().args(["train", "--set", "train.tensorboard=false", "--config"]).arg(&config)).status.success());
    let any = std::fs::read_dir(dir.path().join("runs/tiny")).unwrap().flatten().any(|e| e.file_name().to_string_lossy().contains("tfevents"));
    assert!(!any);
}
