use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use crate::util::*;

fn masks_in(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir).unwrap().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).filter(|n| n.ends_with("_mask.png")).collect()
}

fn predict_shard(repo: &Path, inputs: &Path, out: &Path, shard: &str) -> serde_json::Value {
    let o = run(segctl().args(["predict", "--json", "--shard", shard, "--model"]).arg(repo.join("pets")).arg(inputs).arg("--out").arg(out));
    assert!(o.status.success());
    json(&o)
}

#[test]
fn three_shards_cover_every_photo_once_and_a_rerun_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let (_, _, repo) = trained_model(dir.path(), 12);
    let photos_root = dir.path().join("photos");
    synthetic_dataset(&photos_root, 40, 9);
    let photos = photos_root.join("images");
    let all: Vec<PathBuf> = {
        let mut v: Vec<PathBuf> = std::fs::read_dir(&photos).unwrap().flatten().map(|e| e.path()).collect();
        v.sort();
        v
    };
    assert_eq!(all.len(), 40);
    let out = dir.path().join("out");

    // Three shards: disjoint, together every photo, each with its summary.
    let mut seen = BTreeSet::new();
    let mut sizes = Vec::new();
    for i in 0..3 {
        let report = predict_shard(&repo, &photos, &out, &format!("{i}/3"));
        assert_eq!(report["shard"], serde_json::json!({ "index": i, "count": 3 }));
        let inputs: Vec<String> = report["images"].as_array().unwrap().iter().map(|m| m["input"].as_str().unwrap().to_string()).collect();
        assert_eq!(report["inputs"].as_u64().unwrap() as usize, inputs.len());
        for input in &inputs {
            assert!(seen.insert(input.clone()), "{input} is in two shards");
        }
        sizes.push(inputs.len());
        let summary: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join(format!("shard-{i}-of-3.json"))).unwrap()).unwrap();
        assert_eq!(summary["images"], report["images"]);
    }
    assert_eq!(seen.len(), 40, "shards {sizes:?} must cover every photo");
    assert!(sizes.iter().all(|&n| n >= 5), "a lopsided split: {sizes:?}");
    assert_eq!(masks_in(&out).len(), 40);

    // A shard that died part-way (half its masks missing) resumes: only the missing are redone.
    let first: Vec<String> = predict_shard(&repo, &photos, &dir.path().join("probe"), "1/3")["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["mask"].as_str().unwrap().replace(dir.path().join("probe").to_str().unwrap(), out.to_str().unwrap()))
        .collect();
    let removed: Vec<&String> = first.iter().step_by(2).collect();
    for m in &removed {
        std::fs::remove_file(m).unwrap();
    }
    let report = predict_shard(&repo, &photos, &out, "1/3");
    assert_eq!(report["images"].as_array().unwrap().len(), removed.len(), "only the missing photos are segmented again");
    assert_eq!(report["skipped_existing"].as_array().unwrap().len(), first.len() - removed.len());
    assert_eq!(masks_in(&out).len(), 40);

    // The index of an Indexed Job's pod, and a list file of inputs, give the same share.
    let list = dir.path().join("photos.txt");
    std::fs::write(&list, all.iter().map(|p| format!("{}\n", p.display())).collect::<String>()).unwrap();
    let o = run(segctl()
        .env("JOB_COMPLETION_INDEX", "2")
        .args(["predict", "--json", "--shard-count", "3", "--model"])
        .arg(repo.join("pets"))
        .arg(&list)
        .arg("--out")
        .arg(dir.path().join("by-env")));
    assert!(o.status.success());
    let by_env: BTreeSet<String> = json(&o)["images"].as_array().unwrap().iter().map(|m| m["input"].as_str().unwrap().to_string()).collect();
    let by_flag: BTreeSet<String> = serde_json::from_slice::<serde_json::Value>(&std::fs::read(out.join("shard-2-of-3.json")).unwrap()).unwrap()["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["input"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(by_env, by_flag);

    // Mistakes are one clear line and exit 2.
    for (args, needle) in [(vec!["--shard", "3/3"], "below the count"), (vec!["--shard", "x"], "INDEX/COUNT"), (vec!["--shard-count", "3"], "JOB_COMPLETION_INDEX")] {
        let o = run(segctl().env_remove("JOB_COMPLETION_INDEX").arg("predict").args(&args).arg("--model").arg(repo.join("pets")).arg(&photos));
        assert_eq!(o.status.code(), Some(2), "{args:?}");
        assert!(stderr(&o).contains(needle), "{args:?}: {}", stderr(&o));
    }
}
