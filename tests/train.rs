use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::util::*;

/// Every tensor of a checkpoint (model, optimizer, online weights), as raw bytes by name.
fn tensors(path: &Path) -> BTreeMap<String, Vec<u8>> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors().into_iter().map(|(name, view)| (name, view.data().to_vec())).collect()
}

#[test]
fn resume_after_ctrl_c_is_bit_exact_with_pinned_threads() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("pets");
    synthetic_dataset(&root, 64, 2);
    let config = tiny_config(dir.path(), &root, 5);
    // The weight average and accumulation with a short last group, so all of them must come
    // back exactly.
    let set = |name: &str| {
        ["train.ema_decay=0.9", "train.accumulate_steps=4", "train.clip_grad_norm=0.5", &format!("train.run_name={name}")]
            .into_iter()
            .flat_map(|kv| ["--set".to_string(), kv.to_string()])
            .collect::<Vec<_>>()
    };
    let pinned = |cmd: &mut std::process::Command| {
        cmd.env("RAYON_NUM_THREADS", "2");
    };

    let mut straight = segctl();
    pinned(&mut straight);
    let out = run(straight.args(["train", "--json", "--config"]).arg(&config).args(set("straight")));
    assert!(out.status.success(), "{}", stderr(&out));
    // 64 samples: 32 trainval, 24 train; batches of 4: 6 batches, groups [4, 2] → 2 steps per epoch.
    assert_eq!(json(&out)["steps"], 10);

    let mut stopped = segctl();
    pinned(&mut stopped);
    let mut child = stopped.args(["train", "--config"]).arg(&config).args(set("stopped")).stdout(std::process::Stdio::null()).spawn().unwrap();
    let log = dir.path().join("runs/stopped/metrics.jsonl");
    let start = Instant::now();
    while std::fs::read_to_string(&log).map_or(0, |t| t.lines().count()) < 2 {
        assert!(start.elapsed() < Duration::from_secs(120), "training did not progress");
        std::thread::sleep(Duration::from_millis(10));
    }
    signal(child.id(), "INT");
    assert_eq!(child.wait().unwrap().code(), Some(130));
    let interrupted = dir.path().join("runs/stopped/checkpoints/interrupted.safetensors");
    assert!(interrupted.is_file());

    let mut resumed = segctl();
    pinned(&mut resumed);
    let out = run(resumed.args(["train", "--json", "--config"]).arg(&config).args(set("stopped")).arg("--resume"));
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(json(&out)["steps"], 10);

    let (a, b) = (tensors(&dir.path().join("runs/straight/checkpoints/epoch-0005.safetensors")), tensors(&dir.path().join("runs/stopped/checkpoints/epoch-0005.safetensors")));
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    assert!(a.keys().any(|k| k.starts_with("online.")) && a.keys().any(|k| k.starts_with("optim.")), "{:?}", a.keys().take(5).collect::<Vec<_>>());
    let differing: Vec<&String> = a.iter().filter(|(k, v)| b[*k] != **v).map(|(k, _)| k).collect();
    assert!(differing.is_empty(), "{} of {} tensors differ after resuming, e.g. {:?}", differing.len(), a.len(), &differing[..differing.len().min(5)]);
    // And the logs agree to the bit on every loss.
    let losses = |name: &str| -> Vec<String> {
        std::fs::read_to_string(dir.path().join("runs").join(name).join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| {
                let r: serde_json::Value = serde_json::from_str(l).unwrap();
                format!("{} {} {}", r["train_loss"], r["val_loss"], r["val_mean_iou"])
            })
            .collect()
    };
    assert_eq!(losses("straight"), losses("stopped"));
}

#[test]
fn a_batch_of_unreadable_samples_is_skipped_not_trained_on() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("pets");
    synthetic_dataset(&root, 32, 8);
    // Every other trainval photo is damaged after the fact: with batches of one, each of them
    // is a batch with no readable sample.
    let trainval = std::fs::read_to_string(root.join("annotations/trainval.txt")).unwrap();
    let stems: Vec<&str> = trainval.lines().filter(|l| !l.starts_with('#') && !l.trim().is_empty()).map(|l| l.split_whitespace().next().unwrap()).collect();
    assert_eq!(stems.len(), 16);
    for stem in stems.iter().step_by(2) {
        std::fs::write(root.join(format!("images/{stem}.jpg")), b"\xff\xd8 not a jpeg any more").unwrap();
    }
    let config = tiny_config(dir.path(), &root, 2);
    let out = run(segctl().args(["train", "--json", "--config"]).arg(&config).args(["--set", "train.batch_size=1"]));
    assert!(out.status.success(), "{}", stderr(&out));
    let report = json(&out);
    let records: Vec<serde_json::Value> = std::fs::read_to_string(dir.path().join("runs/tiny/metrics.jsonl")).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    // 12 train samples (32: 16 trainval, val_fraction 0.25): every skipped batch is one step fewer.
    let skipped: u64 = records.iter().map(|r| r["skipped_batches"].as_u64().unwrap_or(0)).sum();
    // 8 damaged, at most 4 of them in the validation split.
    assert!(skipped >= 2 * 4, "damaged train photos are skipped each epoch: {records:?}");
    assert_eq!(report["steps"].as_u64().unwrap(), 2 * 12 - skipped, "{report}");
    assert_eq!(records[1]["step"].as_u64().unwrap(), 2 * 12 - skipped);
    for r in &records {
        assert!(r["train_loss"].as_f64().is_some_and(f64::is_finite), "{r}");
    }
    assert!(stderr(&out).contains("none of its samples could be read"), "{}", stderr(&out));
}

#[test]
fn accumulation_takes_one_step_per_group_and_bad_values_name_their_key() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("pets");
    synthetic_dataset(&root, 32, 3);
    let config = tiny_config(dir.path(), &root, 2);
    // 32 samples: 16 trainval, 12 train in batches of 4: 3 batches, groups [2, 1] → 2 steps per
    // epoch.
    let out = run(segctl().args(["train", "--json", "--config"]).arg(&config).args(["--set", "train.accumulate_steps=2"]));
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(json(&out)["steps"], 4);
    for (kv, key) in [("train.accumulate_steps=0", "train.accumulate_steps"), ("train.clip_grad_norm=-1", "train.clip_grad_norm")] {
        let out = run(segctl().args(["train", "--config"]).arg(&config).args(["--set", kv]));
        assert_eq!(out.status.code(), Some(2));
        assert!(stderr(&out).contains(key), "{}", stderr(&out));
    }
}

#[test]
fn evaluate_at_original_size_scores_the_masks_predict_writes() {
    let dir = tempfile::tempdir().unwrap();
    let (config, run_dir, _) = trained_model(dir.path(), 24);
    let out = run(segctl().args(["evaluate", "--json", "--at-original-size", "--config"]).arg(&config).arg("--checkpoint").arg(&run_dir));
    assert!(out.status.success(), "{}", stderr(&out));
    let report = json(&out);
    let original = &report["at_original_size"];
    assert!(report["confusion_matrix"].is_array() && original["confusion_matrix"].is_array(), "{report}");

    // The same confusion matrix, built here from `predict`'s masks and the trimaps.
    let root = dir.path().join("pets");
    let stems: Vec<String> = std::fs::read_to_string(root.join("annotations/test.txt"))
        .unwrap()
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| l.split_whitespace().next().unwrap().to_string())
        .collect();
    let photos = dir.path().join("test-photos");
    std::fs::create_dir_all(&photos).unwrap();
    for stem in &stems {
        std::fs::copy(root.join(format!("images/{stem}.jpg")), photos.join(format!("{stem}.jpg"))).unwrap();
    }
    let masks = dir.path().join("masks");
    let out = run(segctl().args(["predict", "--config"]).arg(&config).arg("--checkpoint").arg(&run_dir).arg(&photos).arg("--out").arg(&masks));
    assert!(out.status.success(), "{}", stderr(&out));
    let mut confusion = vec![vec![0u64; 3]; 3];
    let mut pixels = 0u64;
    for stem in &stems {
        let truth = image::open(root.join(format!("annotations/trimaps/{stem}.png"))).unwrap().to_luma8();
        let predicted = image::open(masks.join(format!("{stem}_mask.png"))).unwrap().to_luma8();
        assert_eq!(truth.dimensions(), predicted.dimensions(), "{stem}: the mask has the photo's size");
        for (t, p) in truth.pixels().zip(predicted.pixels()) {
            confusion[(t.0[0] - 1) as usize][p.0[0] as usize] += 1;
        }
        pixels += u64::from(truth.width() * truth.height());
    }
    assert_eq!(original["samples"].as_u64().unwrap(), stems.len() as u64);
    assert_eq!(original["pixels"].as_u64().unwrap(), pixels);
    assert_eq!(original["confusion_matrix"], serde_json::json!(confusion), "evaluate --at-original-size scores exactly predict's masks");
    // The input-resolution figures are still there, over 32² masks.
    assert_eq!(report["pixels"].as_u64().unwrap(), stems.len() as u64 * 32 * 32);

    // The table says it too.
    let out = run(segctl().args(["evaluate", "--at-original-size", "--config"]).arg(&config).arg("--checkpoint").arg(&run_dir));
    assert!(stdout(&out).contains("at each photo's own size"), "{}", stdout(&out));
}

/// The quality guard: a short training on synthetic data must reach a stated test mIoU.
/// Measured on the 2-vCPU VM (release build): 0.78 test mIoU after these 60 epochs (≈ 50 s;
/// the test profile takes somewhat longer), 0.19 for the untrained network. The bar, 0.70,
/// leaves room for seeds, thread counts and instruction sets, and is far above anything a
/// network that does not learn reaches.
#[test]
fn a_short_training_learns_the_synthetic_task() {
    const MIN_TEST_MIOU: f64 = 0.70;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("pets");
    synthetic_dataset(&root, 300, 7);
    let config = dir.path().join("quality.yaml");
    let yaml = format!(
        "data:\n  root: {}\n  image_size: 64\n  val_fraction: 0.1\n  seed: 1\n\
         model:\n  arch: unet\n  unet:\n    widths: [8, 16, 32, 64]\n\
         train:\n  epochs: 60\n  batch_size: 8\n  device: cpu\n  output_dir: {}\n  run_name: quality\n  seed: 3\n  optimizer:\n    lr: 0.004\n  schedule:\n    kind: cosine\n    warmup_epochs: 1\n  loss:\n    kind: ce_dice\n\
         evaluate:\n  split: test\n  batch_size: 16\n",
        root.display(),
        dir.path().join("runs").display()
    );
    std::fs::write(&config, yaml).unwrap();
    let started = Instant::now();
    let mut train = segctl();
    train.env("RAYON_NUM_THREADS", "2");
    let out = run(train.args(["train", "--json", "--config"]).arg(&config));
    assert!(out.status.success(), "{}", stderr(&out));
    let out = run(segctl().args(["evaluate", "--json", "--config"]).arg(&config).arg("--checkpoint").arg(dir.path().join("runs/quality")));
    assert!(out.status.success(), "{}", stderr(&out));
    let report = json(&out);
    let miou = report["mean_iou"].as_f64().unwrap();
    eprintln!("quality guard: test mIoU {miou:.4} after {:.0} s", started.elapsed().as_secs_f64());
    assert_eq!(report["decode"], "dct-scaled", "measured on what is served");
    assert!(miou >= MIN_TEST_MIOU, "test mIoU {miou:.4} is below the guard's {MIN_TEST_MIOU}");
    // It learned along the way: the first epoch's validation was far below the last.
    let log = std::fs::read_to_string(dir.path().join("runs/quality/metrics.jsonl")).unwrap();
    let val: Vec<f64> = log.lines().filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()?.get("val_mean_iou")?.as_f64()).collect();
    assert!(val.len() >= 2 && val[0] + 0.2 < *val.last().unwrap(), "validation mIoU by epoch: {val:?}");
}

#[test]
fn trainings_started_in_one_second_get_their_own_folders_and_resume_locks_a_run() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("pets");
    synthetic_dataset(&root, 16, 4);
    let config = tiny_config(dir.path(), &root, 1);
    // Three trainings named by the same second's timestamp.
    let children: Vec<std::process::Child> = (0..3)
        .map(|_| {
            segctl()
                .env("RAYON_NUM_THREADS", "1")
                .args(["train", "--json", "--config"])
                .arg(&config)
                .args(["--set", "train.run_name=null"])
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut folders = std::collections::BTreeSet::new();
    for child in children {
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
        folders.insert(json(&out)["run_dir"].as_str().unwrap().to_string());
    }
    assert_eq!(folders.len(), 3, "runs shared a folder: {folders:?}");
    for f in &folders {
        let run = Path::new(f);
        assert!(run.join("checkpoints/best.safetensors").is_file() && run.join("summary.json").is_file(), "{f}");
        let summary: serde_json::Value = serde_json::from_slice(&std::fs::read(run.join("summary.json")).unwrap()).unwrap();
        assert_eq!(summary["run_dir"].as_str(), Some(f.as_str()), "each run wrote its own summary");
    }

    // A training in progress holds its run: `--resume` of it is refused while it runs.
    let mut long = segctl()
        .args(["train", "--config"])
        .arg(&config)
        .args(["--set", "train.run_name=held", "--set", "train.epochs=400"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let held = dir.path().join("runs/held");
    let started = Instant::now();
    while !held.join("checkpoints/epoch-0001.safetensors").is_file() {
        assert!(started.elapsed() < Duration::from_secs(60), "the long run wrote no checkpoint");
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = run(segctl().args(["train", "--config"]).arg(&config).args(["--set", "train.run_name=held", "--set", "train.epochs=500", "--resume"]).arg(&held));
    let _ = long.kill();
    let _ = long.wait();
    assert!(!out.status.success());
    assert!(stderr(&out).contains("in use by another training"), "{}", stderr(&out));
    // Once it has ended (killed here), the run resumes.
    let out = run(segctl().args(["train", "--json", "--config"]).arg(&config).args(["--set", "train.run_name=held", "--set", "train.epochs=2", "--resume"]).arg(&held));
    assert!(out.status.success(), "{}", stderr(&out));
}
