use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;

use crate::util::*;

/// A running `segctl serve` on an ephemeral loopback port.
struct Server {
    child: Child,
    url: String,
    log: Arc<Mutex<String>>,
}

impl Server {
    fn start(config: &Path, repo: &Path, sets: &[&str]) -> Server {
        let mut cmd = segctl();
        cmd.env("RUST_LOG", "segctl=info")
            .args(["serve", "--port", "0", "--config"])
            .arg(config)
            .arg("--repository")
            .arg(repo)
            .args(["--set", "serve.poll_interval_ms=100"]);
        for s in sets {
            cmd.args(["--set", s]);
        }
        let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let sink = log.clone();
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().unwrap().push_str(&(line + "\n"));
            }
        });
        let mut first = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut first).unwrap();
        let url = first.split_whitespace().find(|w| w.starts_with("http://")).unwrap_or_else(|| panic!("no address in {first:?}")).to_string();
        let server = Server { child, url, log };
        server.wait_ready();
        server
    }

    fn wait_ready(&self) {
        let start = Instant::now();
        loop {
            if let Ok(r) = ureq::get(&format!("{}/readyz", self.url)).call() {
                if r.status() == 200 {
                    return;
                }
            }
            assert!(start.elapsed() < Duration::from_secs(60), "not ready: {}", self.log.lock().unwrap());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.url)
    }

    /// Waits for the process to exit (at most `limit`): its exit code.
    fn wait_exit(&mut self, limit: Duration, what: &str) -> Option<i32> {
        let start = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s.code();
            }
            assert!(start.elapsed() < limit, "{what}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The `/metrics` text.
    fn metrics(&self) -> String {
        String::from_utf8(body_bytes(request("GET", &self.url("/metrics"), None, None, None).1)).unwrap()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// (status, headers of interest, body) of a request; HTTP errors are answers too.
fn request(method: &str, url: &str, content_type: Option<&str>, accept: Option<&str>, body: Option<&[u8]>) -> (u16, ureq::Response) {
    let headers: Vec<(&str, &str)> = [("Content-Type", content_type), ("Accept", accept)].into_iter().filter_map(|(k, v)| Some((k, v?))).collect();
    request_with(method, url, &headers, body)
}

/// [`request`] with any headers.
fn request_with(method: &str, url: &str, headers: &[(&str, &str)], body: Option<&[u8]>) -> (u16, ureq::Response) {
    let mut req = ureq::request(method, url).timeout(Duration::from_secs(60));
    for (name, value) in headers {
        req = req.set(name, value);
    }
    let result = match body {
        Some(b) => req.send_bytes(b),
        None => req.call(),
    };
    match result {
        Ok(r) => (r.status(), r),
        Err(ureq::Error::Status(code, r)) => (code, r),
        Err(e) => panic!("{method} {url}: {e}"),
    }
}

fn body_bytes(r: ureq::Response) -> Vec<u8> {
    let mut out = Vec::new();
    r.into_reader().read_to_end(&mut out).unwrap();
    out
}

fn body_json(r: ureq::Response) -> serde_json::Value {
    let bytes = body_bytes(r);
    serde_json::from_slice(&bytes).unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&bytes)))
}

fn a_photo(dir: &Path) -> (Vec<u8>, (u32, u32)) {
    let path = std::fs::read_dir(dir.join("pets/images")).unwrap().next().unwrap().unwrap().path();
    (std::fs::read(&path).unwrap(), image::image_dimensions(&path).unwrap())
}

#[test]
fn every_endpoint_answers() {
    let dir = tempfile::tempdir().unwrap();
    let (config, _, repo) = trained_model(dir.path(), 16);
    let server = Server::start(&config, &repo, &[]);
    let (photo, (w, h)) = a_photo(dir.path());

    let (status, r) = request("GET", &server.url("/"), None, None, None);
    assert_eq!(status, 200);
    assert!(r.content_type().starts_with("text/html"));
    assert!(String::from_utf8(body_bytes(r)).unwrap().contains("<html"));
    assert_eq!(request("GET", &server.url("/healthz"), None, None, None).0, 200);
    assert_eq!(request("GET", &server.url("/readyz"), None, None, None).0, 200);
    let models = body_json(request("GET", &server.url("/v1/models"), None, None, None).1);
    assert_eq!(models["models"][0]["name"], "pets");
    assert_eq!(models["models"][0]["default"], true);
    let status = body_json(request("GET", &server.url("/v1/models/pets"), None, None, None).1);
    assert_eq!(status["model_version_status"][0]["state"], "AVAILABLE");
    assert_eq!(status["model_version_status"][0]["version"], "1");
    assert_eq!(status["model_version_status"][0]["status"]["error_code"], "OK");
    assert_eq!(request("GET", &server.url("/v1/models/pets/versions/1"), None, None, None).0, 200);
    let meta = body_json(request("GET", &server.url("/v1/models/pets/metadata"), None, None, None).1);
    assert_eq!(meta["model_spec"]["name"], "pets");
    assert_eq!(meta["metadata"]["manifest"]["model"]["input_size"], 32);

    // :segment — class-id PNG at the photo's size, colour and overlay PNGs, JSON by Accept.
    for (query, expect_color) in [("", false), ("?format=color", true), ("?format=overlay", true)] {
        let (status, r) = request("POST", &server.url(&format!("/v1/models/pets:segment{query}")), Some("image/jpeg"), None, Some(&photo));
        assert_eq!(status, 200);
        assert_eq!(r.header("x-model-version"), Some("1"));
        assert!(r.header("server-timing").unwrap().contains("inference;dur="));
        let img = image::load_from_memory(&body_bytes(r)).unwrap();
        assert_eq!((img.width(), img.height()), (w, h));
        assert_eq!(matches!(img, image::DynamicImage::ImageRgb8(_)), expect_color);
    }
    let (status, r) = request("POST", &server.url("/v1/models/pets/versions/1:segment"), Some("image/jpeg"), Some("application/json"), Some(&photo));
    assert_eq!(status, 200);
    let v = body_json(r);
    assert_eq!((v["width"].as_u64(), v["height"].as_u64()), (Some(w as u64), Some(h as u64)));
    assert_eq!(v["mask"].as_array().unwrap().len(), h as usize);

    // :predict — nested arrays and base64 instances.
    let nested = serde_json::json!([[[10, 20, 30], [40, 50, 60], [70, 80, 90]], [[1, 2, 3], [4, 5, 6], [7, 8, 9]]]);
    let b64 = base64::engine::general_purpose::STANDARD.encode(&photo);
    let body = serde_json::json!({ "instances": [nested, { "b64": b64 }] });
    let (status, r) = request("POST", &server.url("/v1/models/pets:predict"), Some("application/json"), None, Some(body.to_string().as_bytes()));
    assert_eq!(status, 200);
    let v = body_json(r);
    let predictions = v["predictions"].as_array().unwrap();
    assert_eq!(predictions.len(), 2);
    assert_eq!((predictions[0].as_array().unwrap().len(), predictions[0][0].as_array().unwrap().len()), (2, 3));
    assert_eq!(predictions[1].as_array().unwrap().len(), h as usize);

    // /infer — the classic JSON payload.
    let (status, r) = request("POST", &server.url("/infer"), Some("application/json"), None, Some(serde_json::json!({ "image": nested }).to_string().as_bytes()));
    assert_eq!(status, 200);
    let v = body_json(r);
    assert_eq!(v["model"], "pets");
    assert_eq!(v["mask"].as_array().unwrap().len(), 2);
    assert!(v["timing_ms"]["inference"].as_f64().is_some());

    let metrics = server.metrics();
    for series in ["segctl_requests_total{route=\"segment\",status=\"200\"}", "segctl_stage_duration_seconds_bucket{stage=\"inference\"", "segctl_batch_size_count", "segctl_queue_depth", "segctl_loaded_model_versions 1"] {
        assert!(metrics.contains(series), "{series} missing from /metrics");
    }
    // One structured access-log line per request, with the request id echoed.
    let (_, r) = request("GET", &server.url("/healthz"), None, None, None);
    let id = r.header("x-request-id").unwrap().to_string();
    std::thread::sleep(Duration::from_millis(100));
    assert!(server.log.lock().unwrap().lines().any(|l| l.contains(&format!("\"request_id\":\"{id}\"")) && l.contains("\"status\":200")));
}

#[test]
fn bad_input_gets_a_4xx_json_error_and_the_server_stays_healthy() {
    let dir = tempfile::tempdir().unwrap();
    let (config, _, repo) = trained_model(dir.path(), 16);
    let server = Server::start(&config, &repo, &["serve.max_body_bytes=1000000", "serve.max_pixels=4000000"]);
    let (photo, _) = a_photo(dir.path());
    let mut bomb = b"\x89PNG\r\n\x1a\n\0\0\0\x0dIHDR".to_vec();
    bomb.extend_from_slice(&100_000u32.to_be_bytes());
    bomb.extend_from_slice(&100_000u32.to_be_bytes());
    bomb.extend_from_slice(&[8, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, b'I', b'D', b'A', b'T']);
    let big = vec![0xFFu8; 1_500_000];
    let cases: Vec<(&str, &str, Option<&str>, Vec<u8>, u16)> = vec![
        ("POST", "/infer", Some("application/json"), b"{not json".to_vec(), 400),
        ("POST", "/infer", Some("application/json"), b"{\"image\": [[1, 2, 3]]}".to_vec(), 400),
        ("POST", "/infer", Some("application/json"), b"{\"image\": [[[1, 2, 3]], [[1, 2, 3], [4, 5, 6]]]}".to_vec(), 400),
        ("POST", "/infer", Some("application/json"), b"{\"picture\": 1}".to_vec(), 400),
        ("POST", "/infer", Some("application/json"), Vec::new(), 400),
        ("POST", "/v1/models/pets:predict", Some("application/json"), b"{\"instances\": [[[1, 2]]]}".to_vec(), 400),
        ("POST", "/v1/models/pets:predict", Some("application/json"), b"{\"instances\": [{\"b64\": \"%%%\"}]}".to_vec(), 400),
        ("POST", "/v1/models/pets:predict", Some("application/json"), b"{\"inputs\": []}".to_vec(), 400),
        ("POST", "/v1/models/pets:segment", Some("image/jpeg"), b"definitely not an image".to_vec(), 400),
        ("POST", "/v1/models/pets:segment", Some("image/jpeg"), photo[..photo.len() / 2].to_vec(), 400),
        ("POST", "/v1/models/pets:segment", Some("image/png"), bomb, 413),
        ("POST", "/v1/models/pets:segment", Some("image/jpeg"), Vec::new(), 400),
        ("POST", "/v1/models/pets:segment", Some("image/jpeg"), big, 413),
        ("POST", "/v1/models/pets:segment?format=gif", Some("image/jpeg"), photo.clone(), 400),
        ("POST", "/v1/models/nope:segment", Some("image/jpeg"), photo.clone(), 404),
        ("POST", "/v1/models/pets/versions/7:segment", Some("image/jpeg"), photo.clone(), 404),
        ("GET", "/v1/models/nope", None, Vec::new(), 404),
        ("GET", "/v1/models/pets/versions/7", None, Vec::new(), 404),
        ("POST", "/v1/models/pets:classify", Some("image/jpeg"), photo.clone(), 404),
        ("GET", "/v1/models/pets:segment", None, Vec::new(), 405),
        ("GET", "/nowhere", None, Vec::new(), 404),
    ];
    for (method, path, ct, body, expected) in cases {
        let body_ref = (method == "POST").then_some(body.as_slice());
        let (status, r) = request(method, &server.url(path), ct, None, body_ref);
        assert_eq!(status, expected, "{method} {path}");
        let v = body_json(r);
        assert!(v["error"].as_str().is_some_and(|e| !e.is_empty()), "{method} {path}: {v}");
        assert_eq!(request("GET", &server.url("/healthz"), None, None, None).0, 200, "healthy after {method} {path}");
    }
    assert!(server.child.try_wait_id().is_none(), "still running");
    let (status, _) = request("POST", &server.url("/v1/models/pets:segment"), Some("image/jpeg"), None, Some(&photo));
    assert_eq!(status, 200, "still serving");
}

trait TryWait {
    fn try_wait_id(&self) -> Option<i32>;
}

impl TryWait for Child {
    fn try_wait_id(&self) -> Option<i32> {
        // /proc/<pid> exists while the process runs (and is not a zombie we reaped).
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.id())).ok()?;
        stat.contains(") Z ").then_some(0)
    }
}

fn batch_counts(metrics: &str) -> (u64, u64) {
    let value = |prefix: &str| -> u64 {
        metrics.lines().filter(|l| l.starts_with(prefix)).filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok()).sum()
    };
    (value("segctl_batch_size_bucket{model=\"pets\",version=\"1\",le=\"1\"}"), value("segctl_batch_size_count{model=\"pets\",version=\"1\"}"))
}

#[test]
fn concurrent_requests_are_batched_and_a_full_queue_answers_503() {
    let dir = tempfile::tempdir().unwrap();
    let (config, _, repo) = trained_model(dir.path(), 16);
    let (photo, _) = a_photo(dir.path());
    let photo = Arc::new(photo);
    {
        let server = Server::start(&config, &repo, &["serve.max_batch_size=16", "serve.max_delay_ms=100"]);
        let url = server.url("/v1/models/pets:segment");
        let threads: Vec<_> = (0..32)
            .map(|_| {
                let (url, photo) = (url.clone(), photo.clone());
                std::thread::spawn(move || request("POST", &url, Some("image/jpeg"), None, Some(&photo)).0)
            })
            .collect();
        for t in threads {
            assert_eq!(t.join().unwrap(), 200);
        }
        let metrics = server.metrics();
        let (single, calls) = batch_counts(&metrics);
        // 33 images (warm-up included) in fewer model calls than images: batches > 1.
        assert!(calls > 0 && single < calls && calls < 33, "batch sizes: {single} single of {calls} calls");
    }
    // Queue of 1, batches of 2 gathered for up to 1 s: a burst overflows at once.
    let server = Server::start(&config, &repo, &["serve.queue_capacity=1", "serve.max_batch_size=2", "serve.max_delay_ms=1000"]);
    let url = server.url("/v1/models/pets:segment");
    let threads: Vec<_> = (0..12)
        .map(|_| {
            let (url, photo) = (url.clone(), photo.clone());
            std::thread::spawn(move || {
                let (status, r) = request("POST", &url, Some("image/jpeg"), None, Some(&photo));
                (status, r.header("retry-after").map(str::to_string))
            })
        })
        .collect();
    let results: Vec<(u16, Option<String>)> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    assert!(results.iter().all(|(s, _)| *s == 200 || *s == 503), "{results:?}");
    assert!(results.iter().any(|(s, retry)| *s == 503 && retry.is_some()), "{results:?}");
    assert!(results.iter().any(|(s, _)| *s == 200), "{results:?}");
    assert_eq!(request("GET", &server.url("/healthz"), None, None, None).0, 200);
}

#[test]
fn new_versions_are_picked_up_and_old_ones_unloaded_without_failed_requests() {
    let dir = tempfile::tempdir().unwrap();
    let (config, run_dir, repo) = trained_model(dir.path(), 16);
    let server = Server::start(&config, &repo, &["serve.models=[{name: pets, version_policy: {latest: 1}}]"]);
    let (photo, _) = a_photo(dir.path());
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let url = server.url("/v1/models/pets:segment");
    let client = {
        let (stop, photo) = (stop.clone(), photo.clone());
        std::thread::spawn(move || {
            let mut statuses = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let (status, r) = request("POST", &url, Some("image/jpeg"), None, Some(&photo));
                statuses.push((status, r.header("x-model-version").map(str::to_string)));
            }
            statuses
        })
    };
    let out = run(segctl().args(["export", "--config"]).arg(&config).arg("--checkpoint").arg(&run_dir).args(["--name", "pets", "--repository"]).arg(&repo));
    assert!(out.status.success());
    let start = Instant::now();
    loop {
        let v = body_json(request("GET", &server.url("/v1/models/pets"), None, None, None).1);
        let list = v["model_version_status"].as_array().unwrap().clone();
        if list.len() == 1 && list[0]["version"] == "2" && list[0]["state"] == "AVAILABLE" {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(60), "version 2 not picked up: {v}");
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let statuses = client.join().unwrap();
    assert!(statuses.iter().all(|(s, _)| *s == 200), "failed requests during the switch: {statuses:?}");
    assert!(statuses.iter().any(|(_, v)| v.as_deref() == Some("2")), "version 2 answered");

    // A version that cannot load is reported and does not take the server down.
    std::fs::create_dir_all(repo.join("pets/3")).unwrap();
    std::fs::write(repo.join("pets/3/model.yaml"), "name: pets\nversion: 3\n").unwrap();
    let start = Instant::now();
    loop {
        let v = body_json(request("GET", &server.url("/v1/models/pets"), None, None, None).1);
        let entry = v["model_version_status"].as_array().unwrap().iter().find(|e| e["version"] == "3").cloned();
        if let Some(e) = entry.filter(|e| e["state"] == "END") {
            assert_ne!(e["status"]["error_message"], "");
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(30), "failed version not reported: {v}");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(request("POST", &server.url("/v1/models/pets/versions/3:segment"), Some("image/jpeg"), None, Some(&photo)).0, 503);
    assert_eq!(request("GET", &server.url("/healthz"), None, None, None).0, 200);
}

#[test]
fn sigterm_lets_an_in_flight_request_finish() {
    let dir = tempfile::tempdir().unwrap();
    let (config, _, repo) = trained_model(dir.path(), 16);
    let mut server = Server::start(&config, &repo, &["serve.max_batch_size=8", "serve.max_delay_ms=1500"]);
    let (photo, (w, h)) = a_photo(dir.path());
    let url = server.url("/v1/models/pets:segment");
    let in_flight = std::thread::spawn(move || {
        let (status, r) = request("POST", &url, Some("image/jpeg"), None, Some(&photo));
        (status, image::load_from_memory(&body_bytes(r)).map(|i| (i.width(), i.height())).ok())
    });
    std::thread::sleep(Duration::from_millis(400));
    signal(server.child.id(), "TERM");
    let (status, size) = in_flight.join().unwrap();
    assert_eq!(status, 200);
    assert_eq!(size, Some((w, h)));
    assert_eq!(server.wait_exit(Duration::from_secs(20), "server did not exit"), Some(0));
}

/// Peak resident memory of a process (`VmHWM`), in bytes.
fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok()).unwrap();
    kb * 1024
}

/// `process_resident_memory_bytes` from `/metrics`.
fn metrics_rss(server: &Server) -> u64 {
    let text = server.metrics();
    text.lines().find_map(|l| l.strip_prefix("process_resident_memory_bytes ")).and_then(|v| v.trim().parse().ok()).expect("process_resident_memory_bytes")
}

fn png_bytes<P: image::PixelWithColorType<Subpixel = u8>>(img: &image::ImageBuffer<P, Vec<u8>>) -> Vec<u8> {
    let mut out = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png).unwrap();
    out
}

#[test]
fn every_endpoint_gives_the_mask_predict_writes_pixel_for_pixel() {
    let dir = tempfile::tempdir().unwrap();
    let (config, _, repo) = trained_model(dir.path(), 16);
    let photo_path = std::fs::read_dir(dir.path().join("pets/images")).unwrap().next().unwrap().unwrap().path();
    let photo = std::fs::read(&photo_path).unwrap();
    let out = dir.path().join("out");
    let r = run(segctl().args(["predict", "--model"]).arg(repo.join("pets/1")).arg(&photo_path).arg("--out").arg(&out));
    assert!(r.status.success(), "{}", stderr(&r));
    let stem = photo_path.file_stem().unwrap().to_string_lossy().to_string();
    let expected = image::open(out.join(format!("{stem}_mask.png"))).unwrap().into_luma8();
    let (w, h) = expected.dimensions();
    // A mask that is all one class would make the comparison weak.
    let classes: std::collections::BTreeSet<u8> = expected.pixels().map(|p| p.0[0]).collect();
    assert!(classes.len() >= 2, "the trained model predicts a single class: {classes:?}");
    let rows = |v: &serde_json::Value| -> Vec<u8> {
        let rows = v.as_array().unwrap();
        assert_eq!(rows.len() as u32, h);
        rows.iter().flat_map(|r| r.as_array().unwrap().iter().map(|p| p.as_u64().unwrap() as u8).collect::<Vec<_>>()).collect()
    };

    let server = Server::start(&config, &repo, &[]);
    let (status, r) = request("POST", &server.url("/v1/models/pets:segment"), Some("image/jpeg"), None, Some(&photo));
    assert_eq!(status, 200);
    let png = image::load_from_memory(&body_bytes(r)).unwrap().into_luma8();
    assert_eq!(png.as_raw(), expected.as_raw(), ":segment mask differs from predict --model");

    let (status, r) = request("POST", &server.url("/v1/models/pets:segment?format=json"), Some("image/jpeg"), None, Some(&photo));
    assert_eq!(status, 200);
    assert_eq!(rows(&body_json(r)["mask"]), *expected.as_raw(), ":segment?format=json");

    let b64 = base64::engine::general_purpose::STANDARD.encode(&photo);
    let body = serde_json::json!({ "instances": [{ "b64": b64 }, { "b64": b64 }] }).to_string();
    let (status, r) = request("POST", &server.url("/v1/models/pets:predict"), Some("application/json"), None, Some(body.as_bytes()));
    assert_eq!(status, 200);
    let v = body_json(r);
    for i in 0..2 {
        assert_eq!(rows(&v["predictions"][i]), *expected.as_raw(), ":predict instance {i}");
    }

    // /infer takes pixels: the decoded photo (EXIF-free synthetic JPEG) as numbers. Pixels are
    // used as given (no reduced-scale JPEG decode), so its mask is predict's with
    // serve.jpeg_dct_scaling off.
    let full = dir.path().join("out-full");
    let r = run(segctl().args(["predict", "--set", "serve.jpeg_dct_scaling=false", "--model"]).arg(repo.join("pets/1")).arg(&photo_path).arg("--out").arg(&full));
    assert!(r.status.success(), "{}", stderr(&r));
    let expected_full = image::open(full.join(format!("{stem}_mask.png"))).unwrap().into_luma8();
    let differing = expected.pixels().zip(expected_full.pixels()).filter(|(a, b)| a != b).count();
    // (A 2-epoch model at 32² input, the photo decoded at 1/8: its boundaries move a little.)
    assert!(differing * 20 < (w * h) as usize, "the reduced-scale decode changes {differing} of {} mask pixels", w * h);
    let decoded = image::load_from_memory(&photo).unwrap().into_rgb8();
    let nested: Vec<Vec<[u8; 3]>> = (0..h).map(|y| (0..w).map(|x| decoded.get_pixel(x, y).0).collect()).collect();
    let body = serde_json::json!({ "image": nested }).to_string();
    let (status, r) = request("POST", &server.url("/infer"), Some("application/json"), None, Some(body.as_bytes()));
    assert_eq!(status, 200);
    assert_eq!(rows(&body_json(r)["mask"]), *expected_full.as_raw(), "/infer");

    let remote = dir.path().join("remote");
    let r = run(segctl().args(["predict", "--server"]).arg(&server.url)
        .arg(&photo_path).arg("--out").arg(&remote));
    assert!(r.status.success(), "{}", stderr(&r));
    let via_server = image::open(remote.join(format!("{stem}_mask.png"))).unwrap().into_luma8();
    assert_eq!(via_server.as_raw(), expected.as_raw(), "predict --server");
}

#[test]
fn hostile_requests_get_json_errors_within_the_memory_bound() {
    let dir = tempfile::tempdir().unwrap();
    let (config, _, repo) = trained_model(dir.path(), 16);
    let server = Server::start(&config, &repo, &[]);
    let (photo, _) = a_photo(dir.path());
    // A 6300×6300 PNG compresses to a few tens of KB.
    let huge = png_bytes(&image::GrayImage::new(6300, 6300));
    assert!(huge.len() < 400_000, "{} bytes", huge.len());
    let b64 = base64::engine::general_purpose::STANDARD.encode(&huge);
    let many = serde_json::json!({ "instances": (0..48).map(|_| serde_json::json!({ "b64": b64 })).collect::<Vec<_>>() }).to_string();
    let started = Instant::now();
    let (status, r) = request("POST", &server.url("/v1/models/pets:predict"), Some("application/json"), None, Some(many.as_bytes()));
    assert_eq!(status, 413);
    assert!(body_json(r)["error"].as_str().unwrap().contains("serve.max_pixels"));
    assert!(started.elapsed() < Duration::from_secs(5), "refused before decoding");

    let (status, r) = request("POST", &server.url("/v1/models/pets:segment?format=json"), Some("image/png"), None, Some(&huge));
    assert_eq!(status, 413);
    assert!(body_json(r)["error"].as_str().unwrap().contains("serve.max_json_response_bytes"));

    // The same photo answered as a PNG is allowed: the mask at 6300×6300, within the budget.
    let (status, r) = request("POST", &server.url("/v1/models/pets:segment"), Some("image/png"), None, Some(&huge));
    assert_eq!(status, 200);
    assert_eq!(image::load_from_memory(&body_bytes(r)).unwrap().width(), 6300);

    // Browsers: a simple cross-site POST, a text body, a foreign origin, a wrong method.
    let cross_site = ureq::post(&server.url("/infer")).set("Content-Type", "text/plain").set("Origin", "https://evil.example").send_bytes(b"{}");
    match cross_site {
        Err(ureq::Error::Status(code, r)) => {
            assert!(code == 403 || code == 415, "{code}");
            assert!(r.header("access-control-allow-origin").is_none());
            assert!(body_json(r)["error"].is_string());
        }
        other => panic!("served a cross-site request: {:?}", other.map(|r| r.status())),
    }
    let (status, r) = request("POST", &server.url("/infer"), Some("text/plain"), None, Some(b"{}"));
    assert_eq!(status, 415);
    assert!(body_json(r)["error"].is_string());
    let (status, r) = request("POST", &server.url("/v1/models/pets:segment"), Some("application/x-www-form-urlencoded"), None, Some(&photo));
    assert_eq!(status, 415);
    assert!(body_json(r)["error"].is_string());
    for (method, path, code) in [("GET", "/infer", 405), ("DELETE", "/healthz", 405), ("GET", "/v1/models/pets:segment", 405), ("GET", "/nowhere", 404)] {
        let (status, r) = request(method, &server.url(path), None, None, None);
        assert_eq!(status, code, "{method} {path}");
        assert!(body_json(r)["error"].as_str().is_some_and(|e| !e.is_empty()), "{method} {path}");
    }
    let (status, r) = request("POST", &server.url("/v1/models/pets:segment?format=json&format=x"), Some("image/jpeg"), None, Some(&photo));
    assert_eq!(status, 400);
    assert!(body_json(r)["error"].is_string());
    let long = "x".repeat(40_000);
    let r = ureq::get(&server.url("/healthz")).set("X-Padding", &long).call();
    match r {
        Err(ureq::Error::Status(431, r)) => assert!(body_json(r)["error"].as_str().unwrap().contains("serve.max_header_bytes")),
        other => panic!("expected 431: {:?}", other.map(|r| r.status())),
    }

    let peak = peak_rss(server.child.id());
    assert!(peak < 400 << 20, "peak RSS {} MB", peak >> 20);
    assert!(metrics_rss(&server) < 400 << 20);
    let (status, _) = request("POST", &server.url("/v1/models/pets:segment"), Some("image/jpeg"), None, Some(&photo));
    assert_eq!(status, 200, "still serving");
}

/// Opens `n` connections that send half a request header and stop.
fn half_header_clients(addr: &str, n: usize) -> Vec<std::net::TcpStream> {
    (0..n)
        .map(|_| {
            let mut s = std::net::TcpStream::connect(addr).unwrap();
            std::io::Write::write_all(&mut s, b"POST /v1/models/pets:segment HTTP/1.1\r\nHost: x\r\nContent-Ty").unwrap();
            s
        })
        .collect()
}

/// Whether the server closed `s` (a read answers end-of-file or an error).
fn closed_by_server(s: &mut std::net::TcpStream) -> bool {
    s.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    let mut buf = [0u8; 256];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue, // an error response before closing
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => return false,
            Err(_) => return true,
        }
    }
}

#[test]
fn slow_header_clients_are_dropped_and_sigterm_ends_within_its_bound() {
    let dir = tempfile::tempdir().unwrap();
    let (config, _, repo) = trained_model(dir.path(), 16);
    let mut server = Server::start(&config, &repo, &["serve.header_read_timeout_ms=1000", "serve.keep_alive_timeout_ms=1500", "serve.shutdown_timeout_ms=2000", "serve.min_body_bytes_per_s=0"]);
    let addr = server.url.trim_start_matches("http://").to_string();
    let (photo, _) = a_photo(dir.path());
    let mut slow = half_header_clients(&addr, 100);
    // Served meanwhile.
    let (status, _) = request("POST", &server.url("/v1/models/pets:segment"), Some("image/jpeg"), None, Some(&photo));
    assert_eq!(status, 200);
    std::thread::sleep(Duration::from_millis(2000));
    let closed = slow.iter_mut().map(closed_by_server).filter(|c| *c).count();
    assert_eq!(closed, 100, "slow-header connections still open after the header timeout");
    // An idle keep-alive connection is closed too (after a served request).
    let mut idle = std::net::TcpStream::connect(&addr).unwrap();
    std::io::Write::write_all(&mut idle, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert!(!closed_by_server(&mut idle), "kept alive at first");
    std::thread::sleep(Duration::from_millis(2500));
    assert!(closed_by_server(&mut idle), "idle keep-alive connection still open");
    let metrics = server.metrics();
    let header_timeouts: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("segctl_connections_closed_total{reason=\"header_timeout\"} "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap();
    assert!(header_timeouts >= 100, "{metrics}");

    // SIGTERM with slow clients connected and one request in flight: the request is answered,
    // the process exits within the shutdown bound.
    let _slow = half_header_clients(&addr, 20);
    let mut stalled = std::net::TcpStream::connect(&addr).unwrap();
    // Headers complete, body never sent: an in-flight request that cannot finish.
    std::io::Write::write_all(&mut stalled, b"POST /v1/models/pets:segment HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\nContent-Length: 100000\r\n\r\nab").unwrap();
    let url = server.url("/v1/models/pets:segment");
    let in_flight = std::thread::spawn(move || request("POST", &url, Some("image/jpeg"), None, Some(&photo)).0);
    std::thread::sleep(Duration::from_millis(100));
    let start = Instant::now();
    signal(server.child.id(), "TERM");
    assert_eq!(server.wait_exit(Duration::from_secs(6), "server did not exit within the bound"), Some(0));
    assert!(start.elapsed() >= Duration::from_millis(1500), "exited before the bound although a request was stalled");
    assert_eq!(in_flight.join().unwrap(), 200);
}

#[test]
fn a_soak_at_64_connections_has_no_errors_and_flat_memory() {
    let dir = tempfile::tempdir().unwrap();
    let (config, _, repo) = trained_model(dir.path(), 16);
    let server = Server::start(&config, &repo, &[]);
    let (photo, _) = a_photo(dir.path());
    let photo = Arc::new(photo);
    let seconds: u64 = std::env::var("SEGCTL_SOAK_SECONDS").ok().and_then(|v| v.parse().ok()).unwrap_or(60);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let url = server.url("/v1/models/pets:segment");
    let clients: Vec<_> = (0..64)
        .map(|_| {
            let (url, photo, stop) = (url.clone(), photo.clone(), stop.clone());
            std::thread::spawn(move || {
                let agent = ureq::AgentBuilder::new().timeout(Duration::from_secs(30)).build();
                let (mut ok, mut errors) = (0u64, Vec::new());
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    match agent.post(&url).set("Content-Type", "image/jpeg").send_bytes(&photo) {
                        Ok(r) if r.status() == 200 => {
                            let mut b = Vec::new();
                            r.into_reader().read_to_end(&mut b).unwrap();
                            assert!(b.starts_with(b"\x89PNG"));
                            ok += 1;
                        }
                        Ok(r) => errors.push(r.status().to_string()),
                        Err(e) => errors.push(e.to_string()),
                    }
                }
                (ok, errors)
            })
        })
        .collect();
    let start = Instant::now();
    let mut samples = Vec::new();
    while start.elapsed() < Duration::from_secs(seconds) {
        std::thread::sleep(Duration::from_secs(5).min(Duration::from_secs(seconds)));
        samples.push(metrics_rss(&server));
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let (mut ok, mut errors) = (0, Vec::new());
    for c in clients {
        let (o, e) = c.join().unwrap();
        ok += o;
        errors.extend(e);
    }
    assert!(errors.is_empty(), "{} errors, e.g. {:?}", errors.len(), &errors[..errors.len().min(5)]);
    assert!(ok > 64, "{ok} requests served");
    // Flat: after the first samples (allocator warm-up) resident memory does not grow.
    let settled = samples[samples.len().min(2) - 1];
    let last = *samples.last().unwrap();
    assert!(last <= settled + settled / 4 + (16 << 20), "RSS grew from {} to {} MB: {samples:?}", settled >> 20, last >> 20);
    assert!(peak_rss(server.child.id()) < 400 << 20);
}

#[test]
fn listed_origins_get_cors_and_an_unreadable_repository_unloads_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (config, _, repo) = trained_model(dir.path(), 12);
    let server = Server::start(&config, &repo, &["serve.models=[{name: pets}]", "serve.cors_origins=[https://app.example]"]);
    let (photo, (w, h)) = a_photo(dir.path());

    // A preflight from the listed origin is answered; the request then carries CORS headers.
    let pre = ureq::request("OPTIONS", &server.url("/v1/models/pets:segment"))
        .set("Origin", "https://app.example")
        .set("Access-Control-Request-Method", "POST")
        .set("Access-Control-Request-Headers", "content-type")
        .call()
        .unwrap();
    assert_eq!(pre.status(), 204);
    assert_eq!(pre.header("access-control-allow-origin"), Some("https://app.example"));
    assert!(pre.header("access-control-allow-methods").unwrap().contains("POST"));
    let r = ureq::post(&server.url("/v1/models/pets:segment")).set("Origin", "https://app.example").set("Content-Type", "image/jpeg").send_bytes(&photo).unwrap();
    assert_eq!(r.header("access-control-allow-origin"), Some("https://app.example"));
    assert!(r.header("access-control-expose-headers").unwrap().contains("server-timing"));
    assert_eq!(image::load_from_memory(&body_bytes(r)).unwrap().to_luma8().dimensions(), (w, h));
    // Another origin's preflight is refused with a JSON error and no CORS header.
    match ureq::request("OPTIONS", &server.url("/v1/models/pets:segment")).set("Origin", "https://evil.example").set("Access-Control-Request-Method", "POST").call() {
        Err(ureq::Error::Status(403, r)) => {
            assert!(r.header("access-control-allow-origin").is_none());
            assert!(body_json(r)["error"].as_str().unwrap().contains("serve.cors_origins"));
        }
        other => panic!("foreign preflight answered: {:?}", other.map(|r| r.status())),
    }

    // The model folder cannot be read (here: a file where the folder was) for many polls:
    // the version keeps serving; once the folder is back, nothing changed.
    let moved = repo.join("pets.away");
    std::fs::rename(repo.join("pets"), &moved).unwrap();
    std::fs::write(repo.join("pets"), b"not a folder").unwrap();
    let start = Instant::now();
    while !server.log.lock().unwrap().contains("keeping the versions of `pets`") {
        assert!(start.elapsed() < Duration::from_secs(20), "no warning: {}", server.log.lock().unwrap());
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(500));
    let (status, r) = request("POST", &server.url("/v1/models/pets:segment"), Some("image/jpeg"), None, Some(&photo));
    assert_eq!(status, 200, "served through the read errors");
    assert_eq!(r.header("x-model-version"), Some("1"));
    assert_eq!(request("GET", &server.url("/readyz"), None, None, None).0, 200);
    std::fs::remove_file(repo.join("pets")).unwrap();
    std::fs::rename(&moved, repo.join("pets")).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let status = body_json(request("GET", &server.url("/v1/models/pets"), None, None, None).1);
    assert_eq!(status["model_version_status"][0]["state"], "AVAILABLE", "{status}");
    assert!(!server.log.lock().unwrap().contains("unloaded"), "{}", server.log.lock().unwrap());
}

/// Sends raw bytes on a new connection and reads the answer until the server closes it or
/// `limit` passes: (status, the whole answer as text).
fn raw_exchange(addr: &str, bytes: &[u8], limit: Duration) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    std::io::Write::write_all(&mut s, bytes).unwrap();
    s.set_read_timeout(Some(limit)).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out).to_string();
    let status = text.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (status, text)
}

/// A GIF whose screen is 1×1 and whose one frame is `side`² (what decoders allocate for).
fn gif_frame_bomb(side: u16) -> Vec<u8> {
    let mut g = b"GIF89a".to_vec();
    g.extend_from_slice(&[1, 0, 1, 0, 0, 0, 0, 0x2C, 0, 0, 0, 0]);
    g.extend_from_slice(&side.to_le_bytes());
    g.extend_from_slice(&side.to_le_bytes());
    g.extend_from_slice(&[0x80, 0, 0, 0, 255, 255, 255, 2, 2, 0x4C, 0x01, 0, 0x3B]);
    g
}

/// `jpeg` with its scan repeated until it has `scans` of them.
fn with_scans(jpeg: &[u8], scans: usize) -> Vec<u8> {
    let sos = jpeg.windows(2).position(|w| w == [0xFF, 0xDA]).unwrap();
    let eoi = jpeg.len() - 2;
    let mut out = jpeg[..eoi].to_vec();
    for _ in 1..scans {
        out.extend_from_slice(&jpeg[sos..eoi]);
    }
    out.extend_from_slice(&jpeg[eoi..]);
    out
}

#[test]
fn stalled_uploads_and_image_bombs_do_not_stall_or_bloat_the_server() {
    let dir = tempfile::tempdir().unwrap();
    let (config, _, repo) = trained_model(dir.path(), 16);
    let server = Server::start(&config, &repo, &[]);
    let addr = server.url.trim_start_matches("http://").to_string();
    let (photo, (w, h)) = a_photo(dir.path());
    assert_eq!(&photo[..2], &[0xFF, 0xD8], "the fixture photos are JPEGs");

    // 24 uploads that declare a 32 MiB JPEG (768 MiB in all, three times the memory budget),
    // send 4 KiB and stall.
    let head = format!("POST /v1/models/pets:segment HTTP/1.1\r\nHost: {addr}\r\nContent-Type: image/jpeg\r\nContent-Length: {}\r\n\r\n", 32 << 20);
    let mut stalled: Vec<std::net::TcpStream> = (0..24)
        .map(|_| {
            let mut s = std::net::TcpStream::connect(&addr).unwrap();
            std::io::Write::write_all(&mut s, head.as_bytes()).unwrap();
            std::io::Write::write_all(&mut s, &photo[..4096.min(photo.len())]).unwrap();
            s
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let started = Instant::now();
    let (status, r) = request("POST", &server.url("/v1/models/pets:segment"), Some("image/jpeg"), None, Some(&photo));
    let waited = started.elapsed();
    assert_eq!(status, 200);
    assert_eq!(image::load_from_memory(&body_bytes(r)).unwrap().width(), w);
    assert!(waited < Duration::from_secs(3), "a normal request behind 24 stalled uploads took {waited:?}");
    eprintln!("a normal request behind 24 stalled uploads: {waited:?}");
    // Under serve.min_body_bytes_per_s after its first 2 s: each stalled upload gets a 408.
    let mut timed_out = 0;
    for s in &mut stalled {
        s.set_read_timeout(Some(Duration::from_secs(8))).unwrap();
        let mut answer = Vec::new();
        let _ = s.read_to_end(&mut answer);
        let text = String::from_utf8_lossy(&answer);
        if text.starts_with("HTTP/1.1 408") && text.contains("serve.min_body_bytes_per_s") {
            timed_out += 1;
        }
    }
    assert_eq!(timed_out, 24, "stalled uploads not answered 408");

    // A GIF with a 1×1 screen and a 12000² frame: refused from its structure, before decoding.
    let started = Instant::now();
    let (status, r) = request("POST", &server.url("/v1/models/pets:segment"), Some("image/gif"), None, Some(&gif_frame_bomb(12_000)));
    assert_eq!(status, 413);
    assert!(body_json(r)["error"].as_str().unwrap().contains("serve.max_pixels"));
    assert!(started.elapsed() < Duration::from_secs(2));
    // A JPEG with hundreds of scans (within serve.max_body_bytes): refused before any is
    // decoded, on the reduced-scale path too.
    let scans = (8_000_000 / photo.len()).clamp(100, 2000);
    let bomb = with_scans(&photo, scans);
    let started = Instant::now();
    for query in ["", "?format=overlay"] {
        let (status, r) = request("POST", &server.url(&format!("/v1/models/pets:segment{query}")), Some("image/jpeg"), None, Some(&bomb));
        assert_eq!(status, 413, "{query}");
        assert!(body_json(r)["error"].as_str().unwrap().contains("serve.max_jpeg_scans"));
    }
    assert!(started.elapsed() < Duration::from_secs(10), "the scan bomb took {:?}", started.elapsed());
    // The predict command refuses it too.
    let bomb_path = dir.path().join("bomb.jpg");
    std::fs::write(&bomb_path, &bomb).unwrap();
    let out = run(segctl().args(["predict", "--config"]).arg(&config).arg("--model").arg(repo.join("pets")).arg(&bomb_path).arg("--out").arg(dir.path().join("p")));
    assert!(stderr(&out).contains("scans"), "{}", stderr(&out));

    let peak = peak_rss(server.child.id());
    assert!(peak < 400 << 20, "peak RSS {} MB", peak >> 20);
    eprintln!("peak RSS through stalled uploads, the GIF frame and the scan bomb: {} MB", peak >> 20);
    let (status, r) = request("POST", &server.url("/v1/models/pets:segment"), Some("image/jpeg"), None, Some(&photo));
    assert_eq!(status, 200, "still serving");
    assert_eq!(image::load_from_memory(&body_bytes(r)).unwrap().height(), h);
}

#[test]
fn tokens_guard_every_route_but_the_probes_and_hosts_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let (config, _, repo) = trained_model(dir.path(), 16);
    let tokens = dir.path().join("tokens");
    let token = "serve-token-0123456789abcdef";
    std::fs::write(&tokens, format!("# segctl tokens\n{token}\nsecond-token-zyxwvutsrq\n")).unwrap();
    let server = Server::start(&config, &repo, &[&format!("serve.auth_token_file={}", tokens.display())]);
    let addr = server.url.trim_start_matches("http://").to_string();
    let (photo, (w, h)) = a_photo(dir.path());
    assert!(!server.log.lock().unwrap().contains(token), "a token in the log");

    for path in ["/healthz", "/readyz", "/v2/health/live", "/v2/health/ready", "/"] {
        assert_eq!(request("GET", &server.url(path), None, None, None).0, 200, "{path} is open");
    }
    let pixels = serde_json::json!({ "image": [[[1, 2, 3]]] }).to_string();
    let v2 = serde_json::json!({ "inputs": [{ "name": "image", "shape": [1, 1, 3], "datatype": "UINT8", "data": [1, 2, 3] }] }).to_string();
    let guarded: Vec<(&str, &str, Option<&str>, Option<&[u8]>)> = vec![
        ("GET", "/metrics", None, None),
        ("GET", "/v1/models", None, None),
        ("GET", "/v1/models/pets", None, None),
        ("GET", "/v1/models/pets/metadata", None, None),
        ("POST", "/v1/models/pets:segment", Some("image/jpeg"), Some(&photo)),
        ("POST", "/v1/models/pets:predict", Some("application/json"), Some(b"{\"instances\": []}")),
        ("POST", "/infer", Some("application/json"), Some(pixels.as_bytes())),
        ("GET", "/v2", None, None),
        ("GET", "/v2/models/pets", None, None),
        ("POST", "/v2/models/pets/infer", Some("application/json"), Some(v2.as_bytes())),
        ("GET", "/nowhere", None, None),
    ];
    let send = |method: &str, path: &str, ct: Option<&str>, body: Option<&[u8]>, auth: Option<&str>| {
        let headers: Vec<(&str, &str)> = [("Content-Type", ct), ("Authorization", auth)].into_iter().filter_map(|(k, v)| Some((k, v?))).collect();
        request_with(method, &server.url(path), &headers, body)
    };
    for (method, path, ct, body) in &guarded {
        let (status, r) = send(method, path, *ct, *body, None);
        assert_eq!(status, 401, "{method} {path} without a token");
        assert_eq!(r.header("www-authenticate"), Some("Bearer realm=\"segctl\""));
        assert!(body_json(r)["error"].as_str().unwrap().contains("bearer token"));
        let (status, r) = send(method, path, *ct, *body, Some("Bearer serve-token-0123456789abcdeF"));
        assert_eq!(status, 401, "{method} {path} with a wrong token");
        assert!(r.header("www-authenticate").unwrap().contains("invalid_token"));
        let (status, _) = send(method, path, *ct, *body, Some("Basic c2VydmU6dG9rZW4="));
        assert_eq!(status, 401, "{method} {path} with another scheme");
        let (status, r) = send(method, path, *ct, *body, Some(&format!("Bearer {token}")));
        assert_ne!(status, 401, "{method} {path} with the token");
        if *path == "/v1/models/pets:segment" {
            assert_eq!(status, 200);
            let mask = image::load_from_memory(&body_bytes(r)).unwrap();
            assert_eq!((mask.width(), mask.height()), (w, h));
        }
    }
    let (status, _) = send("GET", "/v1/models", None, None, Some("bearer second-token-zyxwvutsrq"));
    assert_eq!(status, 200, "every token in the file, scheme in any case");

    // predict --server sends the token from --token-file; without it the server refuses.
    let photos = dir.path().join("one");
    std::fs::create_dir_all(&photos).unwrap();
    std::fs::write(photos.join("a.jpg"), &photo).unwrap();
    let out = run(segctl().args(["predict", "--server", &server.url, "--token-file"]).arg(&tokens).arg(&photos).arg("--out").arg(dir.path().join("with")));
    assert!(out.status.success(), "{}", stderr(&out));
    let mask = image::open(dir.path().join("with/a_mask.png")).unwrap();
    assert_eq!((mask.width(), mask.height()), (w, h));
    let out = run(segctl().args(["predict", "--server", &server.url]).arg(&photos).arg("--out").arg(dir.path().join("without")));
    assert!(!out.status.success());
    assert!(stderr(&out).contains("401"), "{}", stderr(&out));

    // Host names: on a loopback address only the loopback names are answered (DNS rebinding).
    let port = addr.rsplit(':').next().unwrap();
    for (host, code) in [("evil.example", 421), (&format!("evil.example:{port}") as &str, 421), ("localhost", 200), (&format!("127.0.0.1:{port}"), 200), ("[::1]", 200)] {
        let (status, text) = raw_exchange(&addr, format!("GET /healthz HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes(), Duration::from_secs(5));
        assert_eq!(status, code, "Host {host}: {text}");
        if code == 421 {
            assert!(text.contains("application/json") && text.contains("serve.allowed_hosts"), "{text}");
        }
    }
    // A foreign name with a valid token and a matching Origin is still refused.
    let (status, _) = raw_exchange(
        &addr,
        format!("GET /v1/models HTTP/1.1\r\nHost: rebound.example:{port}\r\nOrigin: http://rebound.example:{port}\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n").as_bytes(),
        Duration::from_secs(5),
    );
    assert_eq!(status, 421);
}

#[test]
fn a_model_bomb_is_refused_from_the_weights_header_and_the_old_version_serves_on() {
    let dir = tempfile::tempdir().unwrap();
    let (config, _, repo) = trained_model(dir.path(), 16);
    let server = Server::start(&config, &repo, &[]);
    let (photo, _) = a_photo(dir.path());
    // Version 2: version 1's weights (its digest matches) under a 1 KB model.yaml asking for a
    // network of about 1.5 GB.
    let (v1, v2) = (repo.join("pets/1"), repo.join("pets/2"));
    let staging = dir.path().join("staging");
    std::fs::create_dir_all(&staging).unwrap();
    for entry in std::fs::read_dir(&v1).unwrap().flatten() {
        std::fs::copy(entry.path(), staging.join(entry.file_name())).unwrap();
    }
    let mut manifest: serde_yaml::Value = serde_yaml::from_str(&std::fs::read_to_string(staging.join("model.yaml")).unwrap()).unwrap();
    manifest["version"] = 2.into();
    manifest["model"]["unet"] = serde_yaml::from_str("{depth: 4, base_width: 32, widths: [2048, 2048, 2048, 2048, 2048]}").unwrap();
    let text = serde_yaml::to_string(&manifest).unwrap();
    assert!(text.len() < 2048);
    std::fs::write(staging.join("model.yaml"), text).unwrap();
    std::fs::rename(&staging, &v2).unwrap();
    let started = Instant::now();
    let error = loop {
        let status = body_json(request("GET", &server.url("/v1/models/pets"), None, None, None).1);
        let v2 = status["model_version_status"].as_array().unwrap().iter().find(|v| v["version"] == "2").cloned();
        if let Some(v) = v2.filter(|v| v["state"] == "END") {
            break v["status"]["error_message"].as_str().unwrap_or_default().to_string();
        }
        assert!(started.elapsed() < Duration::from_secs(30), "version 2 not refused: {status}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(error.contains("needs") && error.contains("model.yaml"), "{error}");
    let peak = peak_rss(server.child.id());
    assert!(peak < 400 << 20, "peak RSS {} MB: the network was allocated", peak >> 20);
    eprintln!("peak RSS with the model bomb refused: {} MB", peak >> 20);
    let (status, r) = request("POST", &server.url("/v1/models/pets:segment"), Some("image/jpeg"), None, Some(&photo));
    assert_eq!(status, 200);
    assert_eq!(r.header("x-model-version"), Some("1"), "the old version serves on");
}

#[test]
fn probes_pass_a_full_server_and_a_slow_reader_gets_its_whole_answer() {
    let dir = tempfile::tempdir().unwrap();
    let (config, _, repo) = trained_model(dir.path(), 16);
    let sets = [
        "serve.max_connections=4",
        "serve.keep_alive_timeout_ms=1000",
        "serve.response_write_timeout_ms=8000",
        "serve.max_json_response_bytes=67108864",
    ];
    let server = Server::start(&config, &repo, &sets);
    let addr = server.url.trim_start_matches("http://").to_string();

    // Every connection taken by clients that send nothing: the probes are still answered,
    // anything else gets a quick 503.
    let idle: Vec<std::net::TcpStream> = (0..4).map(|_| std::net::TcpStream::connect(&addr).unwrap()).collect();
    let saturated = Instant::now();
    loop {
        let (status, text) = raw_exchange(&addr, b"GET /v1/models HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n", Duration::from_secs(5));
        if status == 503 {
            assert!(text.contains("serve.max_connections") && text.contains("application/json"), "{text}");
            break;
        }
        assert!(saturated.elapsed() < Duration::from_secs(10), "never at the connection limit: {text}");
        std::thread::sleep(Duration::from_millis(100));
    }
    for path in ["/healthz", "/readyz", "/v2/health/live", "/v2/health/ready"] {
        let started = Instant::now();
        let (status, text) = raw_exchange(&addr, format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").as_bytes(), Duration::from_secs(5));
        assert_eq!(status, 200, "{path} at the connection limit: {text}");
        assert!(started.elapsed() < Duration::from_secs(3), "{path} took {:?} (the connection must close after one request): {text}", started.elapsed());
    }
    drop(idle);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(request("GET", &server.url("/v1/models"), None, None, None).0, 200, "slots are freed");

    // A 4000×4000 photo answered as a JSON mask of about 32 MB, read slowly for longer than
    // the keep-alive timeout: it arrives whole.
    let photo = png_bytes(&image::RgbImage::from_fn(4000, 4000, |x, y| image::Rgb([(x / 16) as u8, (y / 16) as u8, 128])));
    let head = format!(
        "POST /v1/models/pets:segment?format=json HTTP/1.1\r\nHost: localhost\r\nContent-Type: image/png\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        photo.len()
    );
    let send = || {
        let mut s = std::net::TcpStream::connect(&addr).unwrap();
        std::io::Write::write_all(&mut s, head.as_bytes()).unwrap();
        std::io::Write::write_all(&mut s, &photo).unwrap();
        s
    };
    let mut slow = send();
    slow.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut answer = Vec::new();
    let mut chunk = vec![0u8; 256 << 10];
    let started = Instant::now();
    loop {
        match slow.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => answer.extend_from_slice(&chunk[..n]),
            Err(e) => panic!("slow reader cut after {} bytes: {e}", answer.len()),
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let text = String::from_utf8(answer).unwrap();
    let (headers, body) = text.split_once("\r\n\r\n").unwrap();
    assert!(headers.starts_with("HTTP/1.1 200"), "{headers}");
    assert!(body.len() > 30 << 20 && started.elapsed() > Duration::from_millis(1500), "{} bytes in {:?}", body.len(), started.elapsed());
    let v: serde_json::Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("answer cut ({e}): {} bytes", body.len()));
    assert_eq!(v["mask"].as_array().unwrap().len(), 4000);
    assert_eq!(v["mask"][3999].as_array().unwrap().len(), 4000);

    // A reader that stops altogether is cut by serve.response_write_timeout_ms.
    let mut stuck = send();
    std::thread::sleep(Duration::from_secs(11));
    stuck.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut got = Vec::new();
    let _ = stuck.read_to_end(&mut got);
    assert!(got.len() < 30 << 20, "a stuck reader still got {} bytes", got.len());
    let metrics = server.metrics();
    assert!(metrics.contains("segctl_connections_closed_total{reason=\"write_timeout\"} 1"), "{metrics}");
}

#[test]
fn json_that_is_not_pixels_never_becomes_a_tree() {
    let dir = tempfile::tempdir().unwrap();
    let (config, _, repo) = trained_model(dir.path(), 16);
    let server = Server::start(&config, &repo, &[]);
    let (photo, (w, h)) = a_photo(dir.path());
    let b64 = base64::engine::general_purpose::STANDARD.encode(&photo);
    // 14 million numbers in 28 MB (under serve.max_body_bytes): as a serde_json tree, ~450 MB.
    let filler = format!("[{}0]", "0,".repeat(14_000_000));
    let v2 = server.url("/v2/models/pets/infer");
    let json = Some("application/json");

    // Unknown `parameters` are skipped unparsed; the request is answered.
    let body = format!(r#"{{"parameters": {{"junk": {filler}}}, "inputs": [{{"name": "image_bytes", "shape": [1], "datatype": "BYTES", "data": ["{b64}"]}}], "outputs": [{{"name": "mask"}}]}}"#);
    let (status, r) = request("POST", &v2, json, None, Some(body.as_bytes()));
    assert_eq!(status, 200);
    let answer = body_json(r);
    assert_eq!(answer["outputs"][0]["name"], "mask");
    assert_eq!(answer["outputs"][0]["shape"], serde_json::json!([1, h, w]));
    // BYTES as millions of strings, a shape of millions of dimensions, an /infer `version` tree.
    let strings = format!("[{}\"\"]", "\"\",".repeat(9_000_000));
    let body = format!(r#"{{"inputs": [{{"name": "image_bytes", "shape": [1], "datatype": "BYTES", "data": {strings}}}]}}"#);
    let (status, r) = request("POST", &v2, json, None, Some(body.as_bytes()));
    assert_eq!(status, 400);
    assert!(body_json(r)["error"].as_str().unwrap().contains("more than"));
    let shape = format!("[{}1]", "1,".repeat(14_000_000));
    let body = format!(r#"{{"inputs": [{{"name": "image", "shape": {shape}, "datatype": "UINT8", "data": [1, 2, 3]}}]}}"#);
    let (status, r) = request("POST", &v2, json, None, Some(body.as_bytes()));
    assert_eq!(status, 400);
    assert!(body_json(r)["error"].as_str().unwrap().contains("more than 8 elements"), "the shape is refused");
    let body = format!(r#"{{"version": {filler}, "image": [[[1, 2, 3]]]}}"#);
    let (status, r) = request("POST", &server.url("/infer"), json, None, Some(body.as_bytes()));
    assert_eq!(status, 400);
    assert!(body_json(r)["error"].as_str().unwrap().contains("version"));

    let peak = peak_rss(server.child.id());
    eprintln!("peak RSS after four 28 MB JSON bodies: {} MB", peak >> 20);
    assert!(peak < 300 << 20, "peak RSS {} MB: a JSON tree was built", peak >> 20);
}
