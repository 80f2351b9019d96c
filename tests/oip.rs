use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::util::*;

fn rows(v: &serde_json::Value) -> Vec<u8> {
    v.as_array().unwrap().iter().flat_map(|r| r.as_array().unwrap().iter().map(|p| p.as_u64().unwrap() as u8).collect::<Vec<_>>()).collect()
}

#[test]
fn triton_clients_get_the_masks_predict_writes() {
    let Some(python) = checker_python("tritonclient.http, numpy, PIL", "pip install 'tritonclient[http]' numpy pillow") else { return };
    let dir = tempfile::tempdir().unwrap();
    let (config, _, repo) = trained_model(dir.path(), 16);
    let photo = std::fs::read_dir(dir.path().join("pets/images")).unwrap().next().unwrap().unwrap().path();
    // What predict writes: from the JPEG (reduced-scale decode) and from the full pixels.
    let mask_of = |sets: &[&str], out: &str| -> image::GrayImage {
        let mut cmd = segctl();
        cmd.arg("predict").arg("--model").arg(repo.join("pets/1")).arg(&photo).arg("--out").arg(dir.path().join(out));
        for s in sets {
            cmd.args(["--set", s]);
        }
        assert!(run(&mut cmd).status.success());
        let stem = photo.file_stem().unwrap().to_string_lossy().to_string();
        image::open(dir.path().join(out).join(format!("{stem}_mask.png"))).unwrap().into_luma8()
    };
    let from_jpeg = mask_of(&[], "p-jpeg");
    let from_pixels = mask_of(&["serve.jpeg_dct_scaling=false"], "p-pixels");
    // The pixels as segctl decodes them, stored losslessly for the client.
    let pixels_png = dir.path().join("pixels.png");
    image::open(&photo).unwrap().into_rgb8().save(&pixels_png).unwrap();

    let server = JsonServer::start(&config, &repo);
    assert!(server.wait_for("/v2/health/ready"), "the server never got ready");
    let url = server.url.clone();
    let out = Command::new(&python)
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/check/triton_check.py"))
        .args([&url, "pets"])
        .arg(&photo)
        .arg(&pixels_png)
        .output()
        .unwrap();
    drop(server);
    assert!(out.status.success(), "tritonclient failed:\n{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["live"], true);
    assert_eq!(v["ready"], true);
    assert_eq!(v["model_ready"], true);
    assert_eq!(v["missing_ready"], false);
    assert_eq!(v["server"]["name"], "segctl");
    assert!(v["server"]["extensions"].as_array().unwrap().contains(&serde_json::json!("binary_tensor_data")));
    assert_eq!(v["metadata"]["name"], "pets");
    assert_eq!(v["metadata"]["versions"], serde_json::json!(["1"]));
    let (w, h) = from_jpeg.dimensions();
    assert_eq!(v["bytes_binary"]["shape"], serde_json::json!([1, h, w]));
    assert_eq!(v["bytes_binary"]["dtype"], "uint8");
    assert_eq!(rows(&v["bytes_binary"]["mask"]), *from_jpeg.as_raw(), "BYTES (JPEG) mask differs from predict's");
    assert_eq!(rows(&v["pixels_json"]["mask"]), *from_pixels.as_raw(), "UINT8 JSON mask differs from predict's");
    assert_eq!(rows(&v["pixels_binary"]["mask"]), *from_pixels.as_raw(), "UINT8 binary mask differs from predict's");
    assert_eq!(v["pixels_json"]["probabilities_shape"], serde_json::json!([1, 3, h, w]));
    assert!(v["pixels_json"]["probabilities_sum_error"].as_f64().unwrap() < 1e-5, "{v}");
    assert!(v["pixels_json"]["argmax_agrees"].as_f64().unwrap() > 0.999, "{v}");
    let classes: std::collections::BTreeSet<u8> = from_jpeg.pixels().map(|p| p.0[0]).collect();
    assert!(classes.len() >= 2, "a one-class mask makes the comparison weak: {classes:?}");
    let err = v["error"].as_str().expect("a wrong datatype is refused");
    assert!(err.contains("FP32"), "{err}");
}

#[test]
fn the_protocol_answers_errors_and_binary_data_by_itself() {
    let dir = tempfile::tempdir().unwrap();
    let (config, _, repo) = trained_model(dir.path(), 12);
    let server = JsonServer::start(&config, &repo);
    let url = server.url.clone();
    let call = |method: &str, path: &str, ct: Option<&str>, headers: &[(&str, String)], body: &[u8]| -> (u16, Vec<u8>, Option<String>) {
        let mut req = ureq::request(method, &format!("{url}{path}")).timeout(Duration::from_secs(30));
        if let Some(ct) = ct {
            req = req.set("Content-Type", ct);
        }
        for (k, v) in headers {
            req = req.set(k, v);
        }
        let r = if method == "GET" { req.call() } else { req.send_bytes(body) };
        let r = match r {
            Ok(r) => r,
            Err(ureq::Error::Status(_, r)) => r,
            Err(e) => panic!("{e}"),
        };
        let (status, hl) = (r.status(), r.header("inference-header-content-length").map(str::to_string));
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(&mut r.into_reader(), &mut bytes).unwrap();
        (status, bytes, hl)
    };
    assert!(server.wait_for("/v2/health/ready"), "the server never got ready");
    // 2×3 pixels as binary UINT8, both outputs binary: the answer splits at the header length.
    let pixels: Vec<u8> = (0..18).map(|i| (i * 13) as u8).collect();
    let header = serde_json::json!({
        "inputs": [{ "name": "image", "shape": [1, 2, 3, 3], "datatype": "UINT8", "parameters": { "binary_data_size": 18 } }],
        "parameters": { "binary_data_output": true }
    })
    .to_string();
    let mut body = header.clone().into_bytes();
    body.extend_from_slice(&pixels);
    let (status, bytes, hl) = call("POST", "/v2/models/pets/infer", None, &[("Inference-Header-Content-Length", header.len().to_string())], &body);
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&bytes));
    let hl: usize = hl.expect("binary answers say their header length").parse().unwrap();
    let head: serde_json::Value = serde_json::from_slice(&bytes[..hl]).unwrap();
    assert_eq!(head["model_name"], "pets");
    assert_eq!(head["outputs"][0]["name"], "mask");
    assert_eq!(head["outputs"][0]["shape"], serde_json::json!([1, 2, 3]));
    assert_eq!(head["outputs"][0]["parameters"]["binary_data_size"], 6);
    assert_eq!(head["outputs"][1]["name"], "probabilities");
    assert_eq!(head["outputs"][1]["parameters"]["binary_data_size"], 4 * 3 * 6);
    let tail = &bytes[hl..];
    assert_eq!(tail.len(), 6 + 72);
    assert!(tail[..6].iter().all(|&c| c <= 2));
    let probs: Vec<f32> = tail[6..].chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
    for px in 0..6 {
        let p = [probs[px], probs[6 + px], probs[12 + px]];
        assert!((p.iter().sum::<f32>() - 1.0).abs() < 1e-5);
        let best = (0..3).max_by(|&a, &b| p[a].total_cmp(&p[b])).unwrap();
        assert_eq!(best as u8, tail[px], "pixel {px}");
    }
    // Errors: the protocol's {"error": ...} with 4xx codes.
    for (method, path, ct, body, code, needle) in [
        ("POST", "/v2/models/nope/infer", None, &b"{}"[..], 404, "nope"),
        ("POST", "/v2/models/pets/infer", Some("text/plain"), &b"{}"[..], 415, "text/plain"),
        ("POST", "/v2/models/pets/infer", None, &b"{\"inputs\": 3}"[..], 400, "inference request"),
        ("GET", "/v2/models/pets/infer", None, &b""[..], 405, "POST"),
        ("GET", "/v2/models/pets/versions/9", None, &b""[..], 404, "9"),
        ("GET", "/v2/models/nope/ready", None, &b""[..], 400, "nope"),
    ] {
        let (status, bytes, _) = call(method, path, ct, &[], body);
        assert_eq!(status, code, "{method} {path}: {}", String::from_utf8_lossy(&bytes));
        let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert!(v["error"].as_str().unwrap().contains(needle), "{method} {path}: {v}");
    }
    let (status, bytes, _) = call("GET", "/v2", None, &[], b"");
    assert_eq!(status, 200);
    assert_eq!(serde_json::from_slice::<serde_json::Value>(&bytes).unwrap()["name"], "segctl");
}
