//! The lifecycle against a real S3 server on loopback: moto's server mode, started by the test.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::util::*;

/// `python -m moto.server` on a free loopback port, with one bucket; killed on drop.
struct Moto {
    child: Child,
    endpoint: String,
    python: String,
}

impl Moto {
    fn start(bucket: &str) -> Option<Moto> {
        let python = checker_python("moto.server", "pip install \"moto[server]\"")?;
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let child = Command::new(&python)
            .args(["-m", "moto.server", "-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let moto = Moto { child, endpoint: format!("http://127.0.0.1:{port}"), python };
        let start = Instant::now();
        while ureq::get(&moto.endpoint).call().is_err() {
            assert!(start.elapsed() < Duration::from_secs(30), "moto did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
        moto.put(&format!("/{bucket}"), &[]);
        Some(moto)
    }

    /// An unsigned PUT (moto accepts them): a bucket or an object.
    fn put(&self, path: &str, body: &[u8]) {
        ureq::put(&format!("{}{path}", self.endpoint)).set("Content-Type", "application/octet-stream").send_bytes(body).unwrap();
    }

    /// An object's bytes, read with boto3 (moto refuses anonymous object reads).
    fn get(&self, path: &str) -> Vec<u8> {
        let (bucket, key) = path.trim_start_matches('/').split_once('/').unwrap();
        let script = "import sys, boto3\n\
            s3 = boto3.client('s3', endpoint_url=sys.argv[1], aws_access_key_id='test', aws_secret_access_key='test', region_name='us-east-1')\n\
            sys.stdout.buffer.write(s3.get_object(Bucket=sys.argv[2], Key=sys.argv[3])['Body'].read())\n";
        let out = Command::new(&self.python).args(["-c", script, &self.endpoint, bucket, key]).output().unwrap();
        assert!(out.status.success(), "get {path}: {}", String::from_utf8_lossy(&out.stderr));
        out.stdout
    }

    /// Keys under `prefix` in `bucket` (ListObjectsV2, every page).
    fn keys(&self, bucket: &str, prefix: &str) -> Vec<String> {
        let mut keys = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let mut url = format!("{}/{bucket}?list-type=2&prefix={prefix}", self.endpoint);
            if let Some(t) = &token {
                url.push_str(&format!("&continuation-token={t}"));
            }
            let text = ureq::get(&url).call().unwrap().into_string().unwrap();
            keys.extend(text.split("<Key>").skip(1).map(|s| s.split("</Key>").next().unwrap().to_string()));
            match text.split("<NextContinuationToken>").nth(1) {
                Some(rest) => token = Some(rest.split("</NextContinuationToken>").next().unwrap().to_string()),
                None => return keys,
            }
        }
    }

    /// The environment a user sets for an S3-compatible endpoint.
    fn env(&self, endpoint: &str, cache: &Path) -> Vec<(String, String)> {
        [
            ("AWS_ENDPOINT_URL", endpoint),
            ("AWS_ACCESS_KEY_ID", "test"),
            ("AWS_SECRET_ACCESS_KEY", "test"),
            ("AWS_REGION", "us-east-1"),
            ("AWS_ALLOW_HTTP", "true"),
            ("SEGCTL_CACHE_DIR", cache.to_str().unwrap()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn bucket_config(dir: &Path, bucket: &str, epochs: usize) -> std::path::PathBuf {
    let path = dir.join("bucket.yaml");
    let yaml = format!(
        "data:\n  root: s3://{bucket}/data\n  image_size: 32\n  val_fraction: 0.25\n  seed: 1\n\
         model:\n  arch: unet\n  unet:\n    depth: 2\n    base_width: 4\n\
         train:\n  epochs: {epochs}\n  batch_size: 4\n  device: cpu\n  output_dir: s3://{bucket}/runs\n  run_name: tiny\n  seed: 3\n  optimizer:\n    lr: 0.01\n\
         evaluate:\n  batch_size: 8\n\
         export:\n  repository: s3://{bucket}/models\n\
         serve:\n  device: cpu\n  poll_interval_ms: 200\n\
         storage:\n  timeout_s: 5\n  retries: 1\n"
    );
    std::fs::write(&path, yaml).unwrap();
    path
}

#[test]
fn the_whole_lifecycle_runs_against_a_bucket() {
    let Some(moto) = Moto::start("pets") else { return };
    let dir = tempfile::tempdir().unwrap();
    let config = bucket_config(dir.path(), "pets", 2);
    let env = moto.env(&moto.endpoint, &dir.path().join("cache"));
    let segctl_s3 = || {
        let mut cmd = segctl();
        cmd.envs(env.clone()).arg("--config").arg(&config);
        cmd
    };

    // fetch-data into the bucket: every sample, split files included.
    let out = run(segctl_s3().args(["fetch-data", "--synthetic", "32", "--seed", "2"]));
    assert!(out.status.success(), "{}", stderr(&out));
    let data = moto.keys("pets", "data/");
    assert_eq!(data.iter().filter(|k| k.starts_with("data/images/")).count(), 32, "{data:?}");
    assert!(data.contains(&"data/annotations/trainval.txt".to_string()) && data.contains(&"data/annotations/test.txt".to_string()));
    assert!(!data.iter().any(|k| k.contains(".segctl")), "no bookkeeping files in the bucket: {data:?}");

    // Train from it and into it, with a credential given as a config value: it reaches no
    // file segctl writes, in the bucket or on disk, and no log line.
    let secret = "moto-secret-Zq81xQ";
    let out = run(segctl_s3().args(["train", "--json", "--set", &format!("storage.options={{aws_secret_access_key: {secret}, aws_access_key_id: test}}")]));
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(!stderr(&out).contains(secret) && !stdout(&out).contains(secret));
    for key in moto.keys("pets", "runs/") {
        let body = moto.get(&format!("/pets/{key}"));
        assert!(!body.windows(secret.len()).any(|w| w == secret.as_bytes()), "the secret is in s3://pets/{key}");
    }
    let config_yaml = String::from_utf8(moto.get("/pets/runs/tiny/config.yaml")).unwrap();
    assert!(config_yaml.contains("aws_secret_access_key: <redacted>"), "{config_yaml}");
    fn files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() { files(&path, out) } else { out.push(path) }
        }
    }
    let mut written = Vec::new();
    files(dir.path(), &mut written);
    assert!(written.len() > 5, "{written:?}");
    for file in &written {
        let body = std::fs::read(file).unwrap();
        assert!(!body.windows(secret.len()).any(|w| w == secret.as_bytes()), "the secret is in {}", file.display());
    }
    let report = json(&out);
    assert_eq!(report["run_dir"], "s3://pets/runs/tiny");
    assert_eq!(report["best_checkpoint"], "s3://pets/runs/tiny/checkpoints/best.safetensors");
    let runs = moto.keys("pets", "runs/tiny/");
    for key in ["config.yaml", "metrics.jsonl", "summary.json", "curves.png", "checkpoints/best.safetensors", "checkpoints/epoch-0002.safetensors"] {
        assert!(runs.contains(&format!("runs/tiny/{key}")), "{key} missing: {runs:?}");
    }
    // A fresh run of the same name is refused (the bucket holds its checkpoints).
    let out = run(segctl_s3().args(["train"]));
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("--resume"), "{}", stderr(&out));

    // Resume it on "another machine" (an empty cache), one more epoch.
    let other = moto.env(&moto.endpoint, &dir.path().join("cache-2"));
    let out = run(segctl().envs(other.clone()).arg("--config").arg(&config).args(["train", "--json", "--epochs", "3", "--resume"]));
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(json(&out)["epochs_completed"], 3);
    let log = String::from_utf8(moto.get("/pets/runs/tiny/metrics.jsonl")).unwrap();
    assert_eq!(log.lines().count(), 3, "each epoch logged once: {log}");
    assert!(moto.keys("pets", "runs/tiny/checkpoints/").contains(&"runs/tiny/checkpoints/epoch-0003.safetensors".to_string()));

    // Evaluate a checkpoint in the bucket.
    let out = run(segctl_s3().args(["evaluate", "--json", "--checkpoint", "s3://pets/runs/tiny"]));
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(json(&out)["mean_iou"].as_f64().is_some());

    // Export into it; serve from it; a new export appears while serving.
    let out = run(segctl_s3().args(["export", "--json", "--checkpoint", "s3://pets/runs/tiny", "--name", "pets"]));
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(json(&out)["path"], "s3://pets/models/pets/1");
    let mut server = segctl_s3().args(["serve", "--json", "--port", "0"]).stdout(Stdio::piped()).stderr(Stdio::null()).spawn().unwrap();
    let mut line = String::new();
    BufReader::new(server.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let started: serde_json::Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
    let url = started["url"].as_str().unwrap().to_string();
    let versions = |url: &str| -> Vec<String> {
        let status: serde_json::Value = ureq::get(&format!("{url}/v1/models/pets")).call().map(|r| r.into_json().unwrap()).unwrap_or_default();
        status["model_version_status"].as_array().into_iter().flatten().filter(|v| v["state"] == "AVAILABLE").map(|v| v["version"].as_str().unwrap().to_string()).collect()
    };
    let wait = |want: &str| {
        let start = Instant::now();
        while !versions(&url).contains(&want.to_string()) {
            assert!(start.elapsed() < Duration::from_secs(20), "version {want} not served: {:?}", versions(&url));
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    wait("1");
    let out = run(segctl_s3().args(["export", "--checkpoint", "s3://pets/runs/tiny/checkpoints/best.safetensors", "--name", "pets"]));
    assert!(out.status.success(), "{}", stderr(&out));
    wait("2");
    let _ = server.kill();
    let _ = server.wait();
    // A mirror left with a version without its weights (another process's interrupted copy)
    // is repaired by the next server sharing the cache.
    let mirrors: Vec<_> = std::fs::read_dir(dir.path().join("cache/repositories")).unwrap().flatten().map(|e| e.path()).collect();
    assert_eq!(mirrors.len(), 1, "{mirrors:?}");
    let weights = mirrors[0].join("pets/1/model.safetensors");
    std::fs::remove_file(&weights).unwrap();
    let mut again = segctl_s3().args(["serve", "--json", "--port", "0"]).stdout(Stdio::piped()).stderr(Stdio::null()).spawn().unwrap();
    let mut line = String::new();
    BufReader::new(again.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let url2 = serde_json::from_str::<serde_json::Value>(&line).unwrap()["url"].as_str().unwrap().to_string();
    let start = Instant::now();
    while !(weights.is_file() && versions(&url2) == ["2"]) {
        assert!(start.elapsed() < Duration::from_secs(20), "the damaged version was not repaired: {:?}", versions(&url2));
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = again.kill();
    let _ = again.wait();

    // predict over 300 photos in the bucket, in three shards, one of them killed and rerun.
    let images: Vec<_> = std::fs::read_dir(dir.path().join("cache/objects/s3/pets/data/images")).unwrap().map(|e| e.unwrap().path()).collect();
    for i in 0..300 {
        moto.put(&format!("/pets/photos/p{i:03}.jpg"), &std::fs::read(&images[i % images.len()]).unwrap());
    }
    let shard = |i: usize| {
        let mut cmd = segctl_s3();
        cmd.args(["predict", "--json", "--model", "s3://pets/models/pets", "s3://pets/photos", "--out", "s3://pets/out", "--shard"]).arg(format!("{i}/3"));
        cmd
    };
    // Two shards at once on one cache; each fetches only the version it uses (the newest).
    let together: Vec<_> = [0, 2].into_iter().map(|i| shard(i).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap()).collect();
    for child in together {
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
    }
    let cached = dir.path().join("cache/objects/s3/pets/models/pets");
    assert!(cached.join("2/model.safetensors").is_file(), "version 2 not in the cache");
    assert!(!cached.join("1").exists(), "predict downloaded a version it does not use");
    let mut killed = shard(1).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    let before = moto.keys("pets", "out/").len();
    let start = Instant::now();
    while moto.keys("pets", "out/").len() < before + 10 && start.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(20));
    }
    signal(killed.id(), "KILL");
    let _ = killed.wait();
    let out = run(&mut shard(1));
    assert!(out.status.success(), "{}", stderr(&out));
    let rerun = json(&out);
    assert!(!rerun["skipped_existing"].as_array().unwrap().is_empty(), "the rerun resumes: {rerun}");

    let outputs = moto.keys("pets", "out/");
    let masks: BTreeSet<String> = outputs.iter().filter_map(|k| k.strip_prefix("out/")?.strip_suffix("_mask.png").map(str::to_string)).collect();
    let colors = outputs.iter().filter(|k| k.ends_with("_color.png")).count();
    let expected: BTreeSet<String> = (0..300).map(|i| format!("p{i:03}")).collect();
    assert_eq!(masks, expected, "exactly one mask per photo");
    assert_eq!(colors, 300);
    let mut assigned = 0;
    for i in 0..3 {
        let summary: serde_json::Value = serde_json::from_slice(&moto.get(&format!("/pets/out/shard-{i}-of-3.json"))).unwrap();
        assigned += summary["inputs"].as_u64().unwrap();
    }
    assert_eq!(assigned, 300, "the shards split the inputs without overlap");
    let mask = image::load_from_memory(&moto.get("/pets/out/p007_mask.png")).unwrap().to_luma8();
    assert_eq!(mask.dimensions(), image::load_from_memory(&std::fs::read(&images[7 % images.len()]).unwrap()).unwrap().to_luma8().dimensions());
    assert!(mask.pixels().all(|p| p.0[0] <= 2));
}

/// A proxy to `upstream` that dies (and stays dead) when an upload of a `model.yaml` passes:
/// the store going away just before an export's last upload.
fn dying_proxy(upstream: String, dead: Arc<AtomicBool>) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(client) = client else { continue };
            if dead.load(Ordering::SeqCst) {
                drop(client);
                continue;
            }
            let server = TcpStream::connect(upstream.trim_start_matches("http://")).unwrap();
            let (mut c_read, mut s_write) = (client.try_clone().unwrap(), server.try_clone().unwrap());
            let (mut s_read, mut c_write) = (server, client);
            let dead_up = dead.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 16384];
                let mut tail = Vec::new();
                while let Ok(n) = c_read.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    tail.extend_from_slice(&buf[..n]);
                    let text = String::from_utf8_lossy(&tail);
                    if text.split("\r\n").any(|l| l.starts_with("PUT ") && l.contains("/model.yaml")) {
                        dead_up.store(true, Ordering::SeqCst);
                        let _ = c_read.shutdown(std::net::Shutdown::Both);
                        let _ = s_write.shutdown(std::net::Shutdown::Both);
                        return;
                    }
                    let keep = tail.len().saturating_sub(512);
                    tail.drain(..keep);
                    if s_write.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
                let _ = s_write.shutdown(std::net::Shutdown::Write);
            });
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut s_read, &mut c_write);
                let _ = c_write.shutdown(std::net::Shutdown::Write);
            });
        }
    });
    format!("http://{address}")
}

#[test]
fn a_store_that_dies_mid_export_publishes_no_half_version_and_serving_goes_on() {
    let Some(moto) = Moto::start("fault") else { return };
    let dir = tempfile::tempdir().unwrap();
    let (_, run_dir, _) = trained_model(dir.path(), 16);
    let config = bucket_config(dir.path(), "fault", 1);
    let direct = moto.env(&moto.endpoint, &dir.path().join("cache"));
    let out = run(segctl().envs(direct.clone()).arg("--config").arg(&config).args(["export", "--json", "--name", "pets", "--checkpoint"]).arg(&run_dir));
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(json(&out)["version"], 1);

    // A server and an exporter that reach the store through a proxy that dies when the
    // manifest upload passes.
    let dead = Arc::new(AtomicBool::new(false));
    let proxy = dying_proxy(moto.endpoint.clone(), dead.clone());
    let proxied = moto.env(&proxy, &dir.path().join("cache-proxied"));
    let mut server = segctl().envs(proxied.clone()).arg("--config").arg(&config).args(["serve", "--json", "--port", "0"]).stdout(Stdio::piped()).stderr(Stdio::null()).spawn().unwrap();
    let mut line = String::new();
    BufReader::new(server.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let started: serde_json::Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
    let url = started["url"].as_str().unwrap().to_string();
    let available = || -> bool {
        ureq::get(&format!("{url}/v1/models/pets/versions/1")).call().ok().and_then(|r| r.into_json::<serde_json::Value>().ok()).is_some_and(|v| v["model_version_status"][0]["state"] == "AVAILABLE")
    };
    let start = Instant::now();
    while !available() {
        assert!(start.elapsed() < Duration::from_secs(20), "version 1 not served");
        std::thread::sleep(Duration::from_millis(50));
    }

    let start = Instant::now();
    let out = run(segctl().envs(proxied).arg("--config").arg(&config).args(["export", "--name", "pets", "--checkpoint"]).arg(&run_dir));
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(dead.load(Ordering::SeqCst), "the proxy saw the manifest upload");
    let message = stderr(&out);
    assert!(message.contains("was not published") && message.contains("s3://fault/models/pets/2/model.yaml"), "{message}");
    assert!(start.elapsed() < Duration::from_secs(60), "gave up within the storage timeout");
    // The weights may be there, the manifest is not: no reader sees version 2.
    let keys = moto.keys("fault", "models/pets/2/");
    assert!(!keys.iter().any(|k| k.ends_with("model.yaml")), "{keys:?}");
    let out = run(segctl().envs(direct.clone()).arg("--config").arg(&config).args(["predict", "--json", "--model", "s3://fault/models/pets"]).arg(dir.path().join("pets/images")).arg("--out").arg(dir.path().join("out")));
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(json(&out)["model"].as_str().unwrap().contains("/1 ("), "the newest complete version is 1: {}", json(&out)["model"]);

    // The server's store is gone too: its polls fail, and it keeps serving version 1.
    std::thread::sleep(Duration::from_millis(1500));
    assert!(available(), "a failed listing unloads nothing");
    assert_eq!(ureq::get(&format!("{url}/readyz")).call().map(|r| r.status()).unwrap_or(0), 200);
    let photo = std::fs::read_dir(dir.path().join("pets/images")).unwrap().next().unwrap().unwrap().path();
    let answer = ureq::post(&format!("{url}/v1/models/pets:segment")).set("Content-Type", "application/octet-stream").send_bytes(&std::fs::read(photo).unwrap());
    assert_eq!(answer.map(|r| r.status()).unwrap_or(0), 200);
    let _ = server.kill();
    let _ = server.wait();

    // The next export, with the store back, takes the next number and completes.
    let out = run(segctl().envs(direct).arg("--config").arg(&config).args(["export", "--json", "--name", "pets", "--checkpoint"]).arg(&run_dir));
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(json(&out)["version"], 3);
    assert!(moto.keys("fault", "models/pets/3/").contains(&"models/pets/3/model.yaml".to_string()));
}

#[test]
fn trainings_started_in_one_second_on_different_machines_claim_their_own_run_in_the_bucket() {
    let Some(moto) = Moto::start("runs") else { return };
    let dir = tempfile::tempdir().unwrap();
    let config = bucket_config(dir.path(), "runs", 1);
    let out = run(segctl().envs(moto.env(&moto.endpoint, &dir.path().join("cache-0"))).arg("--config").arg(&config).args([
        "fetch-data",
        "--synthetic",
        "16",
        "--seed",
        "2",
    ]));
    assert!(out.status.success(), "{}", stderr(&out));
    // Three "machines": each has its own cache (so no local lock sees the others), and all
    // three name their run by the same second's timestamp.
    let children: Vec<Child> = (1..=3)
        .map(|m| {
            segctl()
                .envs(moto.env(&moto.endpoint, &dir.path().join(format!("cache-{m}"))))
                .env("RAYON_NUM_THREADS", "1")
                .arg("--config")
                .arg(&config)
                .args(["train", "--json", "--set", "train.run_name=null"])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut runs = BTreeSet::new();
    for child in children {
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
        let run_dir = json(&out)["run_dir"].as_str().unwrap().to_string();
        assert!(run_dir.starts_with("s3://runs/runs/"), "{run_dir}");
        runs.insert(run_dir);
    }
    assert_eq!(runs.len(), 3, "runs shared a bucket folder: {runs:?}");
    for run_dir in &runs {
        let prefix = run_dir.trim_start_matches("s3://runs/");
        let keys = moto.keys("runs", &format!("{prefix}/"));
        assert!(keys.contains(&format!("{prefix}/checkpoints/best.safetensors")), "{keys:?}");
        let summary: serde_json::Value = serde_json::from_slice(&moto.get(&format!("/runs/{prefix}/summary.json"))).unwrap();
        assert_eq!(summary["run_dir"].as_str(), Some(run_dir.as_str()), "each run wrote its own summary");
    }
}
