//! The HTTP endpoints: classic `/infer`, TF-Serving `:predict`, raw-image `:segment`, model
//! status and metadata, health, metrics and the page. Each request is decoded and prepared on
//! the blocking pool, queued to its model version's batcher, and post-processed on the
//! blocking pool again; the async runtime only moves bytes.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use base64::Engine;
use image::{GrayImage, RgbImage};
use serde::Deserialize;
use serde_json::{Value, json};

use super::AppState;
use super::error::ApiError;
use super::registry::ServedVersion;
use super::worker::{Job, SubmitError};
use crate::data::image_io::{self, DecodeOptions};
use crate::infer;

/// The upload page.
const PAGE: &str = include_str!("page.html");

/// Time spent per stage of one request.
#[derive(Debug, Default, Clone, Copy)]
pub struct Timing {
    pub decode: Duration,
    pub queue: Duration,
    pub inference: Duration,
    pub encode: Duration,
}

impl Timing {
    fn header(&self) -> String {
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        format!(
            "decode;dur={:.2}, queue;dur={:.2}, inference;dur={:.2}, encode;dur={:.2}",
            ms(self.decode),
            ms(self.queue),
            ms(self.inference),
            ms(self.encode)
        )
    }

    fn json(&self) -> Value {
        let ms = |d: Duration| (d.as_secs_f64() * 1e6).round() / 1000.0;
        json!({
            "decode": ms(self.decode),
            "queue": ms(self.queue),
            "inference": ms(self.inference),
            "encode": ms(self.encode),
            "total": ms(self.decode + self.queue + self.inference + self.encode),
        })
    }

    fn record(&self, state: &AppState) {
        state.metrics.stage("decode", self.decode);
        state.metrics.stage("queue", self.queue);
        state.metrics.stage("inference", self.inference);
        state.metrics.stage("encode", self.encode);
    }
}

/// Runs blocking work off the async runtime.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T, ApiError> + Send + 'static) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| ApiError::Internal(format!("worker task failed: {e}")))?
}

/// Decodes image bytes (JPEG/PNG/GIF, EXIF orientation applied) within the pixel limit.
fn decode_bytes(bytes: &[u8], max_pixels: u64) -> Result<RgbImage, ApiError> {
    let options = DecodeOptions { max_pixels, apply_exif_orientation: true };
    Ok(image_io::decode_rgb(bytes, options)?.image)
}

/// Builds an image from `H×W×3` nested numbers in 0–255.
fn image_from_nested(value: &Value, max_pixels: u64, what: &str) -> Result<RgbImage, ApiError> {
    let shape_error = |m: String| ApiError::BadRequest(format!("{what}: {m}; expected an H×W×3 array of numbers in 0-255"));
    let rows = value.as_array().ok_or_else(|| shape_error("not an array".into()))?;
    let height = rows.len();
    let width = rows.first().and_then(|r| r.as_array()).map(|r| r.len()).unwrap_or(0);
    if height == 0 || width == 0 {
        return Err(shape_error("empty image".into()));
    }
    if (height as u64) * (width as u64) > max_pixels {
        return Err(ApiError::TooLarge(format!("{what}: {width}x{height} pixels is over the limit of {max_pixels} (serve.max_pixels)")));
    }
    let mut data = Vec::with_capacity(height * width * 3);
    for (y, row) in rows.iter().enumerate() {
        let row = row.as_array().ok_or_else(|| shape_error(format!("row {y} is not an array")))?;
        if row.len() != width {
            return Err(shape_error(format!("row {y} has {} pixels, row 0 has {width}", row.len())));
        }
        for (x, px) in row.iter().enumerate() {
            let px = px.as_array().filter(|p| p.len() == 3).ok_or_else(|| shape_error(format!("pixel ({x}, {y}) is not [r, g, b]")))?;
            for v in px {
                let v = v.as_f64().ok_or_else(|| shape_error(format!("pixel ({x}, {y}) holds a non-number")))?;
                if !(0.0..=255.0).contains(&v) {
                    return Err(shape_error(format!("pixel ({x}, {y}) holds {v}, outside 0-255")));
                }
                data.push(v.round() as u8);
            }
        }
    }
    RgbImage::from_raw(width as u32, height as u32, data).ok_or_else(|| ApiError::Internal("image buffer size".into()))
}

/// Queues prepared images to a version and waits for every answer; returns masks at each
/// image's size and the timing.
async fn segment_images(
    served: &Arc<ServedVersion>,
    images: Vec<RgbImage>,
    mut timing: Timing,
) -> Result<(Vec<RgbImage>, Vec<GrayImage>, Timing), ApiError> {
    let prepare_start = Instant::now();
    let predictor = served.predictor.clone();
    let (images, inputs) = blocking(move || {
        let inputs: Vec<Vec<f32>> = images.iter().map(|img| predictor.prepare(img)).collect();
        Ok((images, inputs))
    })
    .await?;
    timing.decode += prepare_start.elapsed();
    let mut answers = Vec::with_capacity(inputs.len());
    for input in inputs {
        let (reply, answer) = tokio::sync::oneshot::channel();
        served.worker.submit(Job { input, enqueued: Instant::now(), reply }).map_err(|e| match e {
            SubmitError::QueueFull => ApiError::Overloaded(format!(
                "model `{}` version {} is overloaded ({} requests queued); retry shortly",
                served.name,
                served.version,
                served.worker.capacity()
            )),
            SubmitError::Closed => ApiError::Unavailable(format!("model `{}` version {} is unloading", served.name, served.version)),
        })?;
        answers.push(answer);
    }
    let mut logits = Vec::with_capacity(answers.len());
    for answer in answers {
        let out = answer
            .await
            .map_err(|_| ApiError::Unavailable("the model stopped before answering".into()))?
            .map_err(|e| ApiError::Internal(format!("model call failed: {e}")))?;
        timing.queue = timing.queue.max(out.queued);
        timing.inference = timing.inference.max(out.inference);
        logits.push(out.logits);
    }
    let predictor = served.predictor.clone();
    let post_start = Instant::now();
    let (images, masks) = blocking(move || {
        let masks: Vec<GrayImage> =
            images.iter().zip(&logits).map(|(img, l)| predictor.mask_from_logits(l, img.width(), img.height())).collect();
        Ok((images, masks))
    })
    .await?;
    timing.encode += post_start.elapsed();
    Ok((images, masks, timing))
}

fn mask_rows(mask: &GrayImage) -> Vec<&[u8]> {
    mask.as_raw().chunks(mask.width() as usize).collect()
}

fn with_model_headers(mut response: Response, served: &ServedVersion, timing: &Timing) -> Response {
    let headers = response.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&served.name) {
        headers.insert("x-model-name", v);
    }
    headers.insert("x-model-version", HeaderValue::from(served.version));
    if let Ok(v) = HeaderValue::from_str(&timing.header()) {
        headers.insert("server-timing", v);
    }
    response
}

fn parse_json(body: &[u8]) -> Result<Value, ApiError> {
    if body.is_empty() {
        return Err(ApiError::BadRequest("empty body: send a JSON document".into()));
    }
    serde_json::from_slice(body).map_err(|e| ApiError::BadRequest(format!("invalid JSON: {e}")))
}

/// `POST /infer` — `{"image": [[[r,g,b], …], …], "model"?: name, "version"?: n}`.
pub async fn infer(State(state): State<AppState>, body: Result<Bytes, BytesRejection>) -> Result<Response, ApiError> {
    let started = Instant::now();
    let body = body?;
    let max_pixels = state.limits.max_pixels;
    let (value, image) = blocking(move || {
        let value = parse_json(&body)?;
        let image = value.get("image").ok_or_else(|| ApiError::BadRequest("missing `image`: send {\"image\": [[[r,g,b], ...], ...]}".into()))?;
        let image = image_from_nested(image, max_pixels, "`image`")?;
        Ok((value, image))
    })
    .await?;
    let name = match value.get("model").and_then(|m| m.as_str()) {
        Some(n) => n.to_string(),
        None => state.registry.default_model().ok_or_else(|| ApiError::Unavailable("no model is served".into()))?,
    };
    let version = value.get("version").and_then(|v| v.as_u64().or_else(|| v.as_str()?.parse().ok()));
    let served = state.registry.resolve(&name, version)?;
    let timing = Timing { decode: started.elapsed(), ..Default::default() };
    let (_, masks, mut timing) = segment_images(&served, vec![image], timing).await?;
    let encode_start = Instant::now();
    let mask = &masks[0];
    let body = json!({
        "mask": mask_rows(mask),
        "width": mask.width(),
        "height": mask.height(),
        "classes": served.predictor.spec().class_names,
        "model": served.name,
        "version": served.version,
        "timing_ms": Value::Null,
    });
    timing.encode += encode_start.elapsed();
    timing.record(&state);
    let mut body = body;
    body["timing_ms"] = timing.json();
    Ok(with_model_headers(axum::Json(body).into_response(), &served, &timing))
}

/// The parts of a `/v1/models/...` path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelPath {
    pub name: String,
    pub version: Option<u64>,
    pub verb: Option<String>,
    pub metadata: bool,
}

/// Parses `name`, `name/versions/N`, `…/metadata` and `…:verb`.
pub fn parse_model_path(rest: &str) -> Result<ModelPath, ApiError> {
    let not_found = || ApiError::NotFound(format!("no such endpoint: /v1/models/{rest}"));
    let (path, verb) = match rest.rsplit_once(':') {
        Some((p, v)) if !v.contains('/') => (p, Some(v.to_string())),
        _ => (rest, None),
    };
    let parts: Vec<&str> = path.split('/').collect();
    let (name, version, metadata) = match parts.as_slice() {
        [name] => (*name, None, false),
        [name, "metadata"] => (*name, None, true),
        [name, "versions", v] => (*name, Some(*v), false),
        [name, "versions", v, "metadata"] => (*name, Some(*v), true),
        _ => return Err(not_found()),
    };
    if name.is_empty() || (metadata && verb.is_some()) {
        return Err(not_found());
    }
    let version = match version {
        Some(v) => Some(v.parse::<u64>().map_err(|_| ApiError::NotFound(format!("`{v}` is not a version number")))?),
        None => None,
    };
    Ok(ModelPath { name: name.to_string(), version, verb, metadata })
}

#[derive(Debug, Deserialize)]
pub struct SegmentQuery {
    format: Option<String>,
}

/// Everything under `/v1/models/`.
pub async fn models(
    State(state): State<AppState>,
    method: Method,
    Path(rest): Path<String>,
    Query(query): Query<SegmentQuery>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let path = parse_model_path(&rest)?;
    match (method, path.verb.as_deref(), path.metadata) {
        (Method::GET, None, false) => status(&state, &path),
        (Method::GET, None, true) => metadata(&state, &path),
        (Method::POST, Some("predict"), _) => predict(state, path, body?).await,
        (Method::POST, Some("segment"), _) => segment(state, path, query, headers, body?).await,
        (_, Some(verb), _) if verb != "predict" && verb != "segment" => {
            Err(ApiError::NotFound(format!("unknown method `:{verb}`: use :predict or :segment")))
        }
        (m, verb, _) => Err(ApiError::MethodNotAllowed(format!(
            "{m} is not allowed here: {}",
            if verb.is_some() { "use POST" } else { "use GET" }
        ))),
    }
}

fn status(state: &AppState, path: &ModelPath) -> Result<Response, ApiError> {
    let versions = state.registry.status(&path.name).ok_or_else(|| ApiError::NotFound(format!("model `{}` is not served here", path.name)))?;
    let selected: Vec<_> = versions.into_iter().filter(|v| path.version.is_none_or(|want| want == v.version)).collect();
    if selected.is_empty() {
        return Err(ApiError::NotFound(format!("model `{}` has no version {}", path.name, path.version.unwrap_or(0))));
    }
    let list: Vec<Value> = selected
        .iter()
        .map(|v| {
            json!({
                "version": v.version.to_string(),
                "state": v.state,
                "status": {
                    "error_code": if v.error.is_some() { "UNKNOWN" } else { "OK" },
                    "error_message": v.error.clone().unwrap_or_default(),
                }
            })
        })
        .collect();
    Ok(axum::Json(json!({ "model_version_status": list })).into_response())
}

fn metadata(state: &AppState, path: &ModelPath) -> Result<Response, ApiError> {
    let served = state.registry.resolve(&path.name, path.version)?;
    let spec = served.predictor.spec();
    let size = spec.input_size;
    Ok(axum::Json(json!({
        "model_spec": { "name": served.name, "signature_name": "serving_default", "version": served.version.to_string() },
        "metadata": {
            "signature_def": {
                "inputs": { "image": { "dtype": "uint8", "shape": [-1, -1, 3], "note": format!("any size; resized to {size}x{size} for the model") } },
                "outputs": { "mask": { "dtype": "uint8", "shape": [-1, -1], "classes": spec.class_names } }
            },
            "manifest": served.manifest,
        }
    }))
    .into_response())
}

/// `:predict` — TF-Serving `{"instances": [...]}`, each an H×W×3 array or `{"b64": …}`.
async fn predict(state: AppState, path: ModelPath, body: Bytes) -> Result<Response, ApiError> {
    let started = Instant::now();
    let served = state.registry.resolve(&path.name, path.version)?;
    let max_pixels = state.limits.max_pixels;
    let max_batch = state.limits.max_instances;
    let images = blocking(move || {
        let value = parse_json(&body)?;
        let instances = value
            .get("instances")
            .and_then(|i| i.as_array())
            .ok_or_else(|| ApiError::BadRequest("expected {\"instances\": [...]}".into()))?;
        if instances.is_empty() {
            return Err(ApiError::BadRequest("`instances` is empty".into()));
        }
        if instances.len() > max_batch {
            return Err(ApiError::TooLarge(format!("{} instances in one request; the limit is {max_batch}", instances.len())));
        }
        instances
            .iter()
            .enumerate()
            .map(|(i, inst)| {
                let what = format!("instances[{i}]");
                match inst.get("b64").and_then(|b| b.as_str()) {
                    Some(b64) => {
                        let bytes = base64::engine::general_purpose::STANDARD
                            .decode(b64.trim())
                            .map_err(|e| ApiError::BadRequest(format!("{what}.b64 is not base64: {e}")))?;
                        decode_bytes(&bytes, max_pixels).map_err(|e| match e {
                            ApiError::BadRequest(m) => ApiError::BadRequest(format!("{what}: {m}")),
                            other => other,
                        })
                    }
                    None if inst.is_object() => Err(ApiError::BadRequest(format!("{what}: an object must be {{\"b64\": \"...\"}}"))),
                    None => image_from_nested(inst, max_pixels, &what),
                }
            })
            .collect::<Result<Vec<_>, _>>()
    })
    .await?;
    let timing = Timing { decode: started.elapsed(), ..Default::default() };
    let (_, masks, mut timing) = segment_images(&served, images, timing).await?;
    let encode_start = Instant::now();
    let predictions: Vec<Vec<&[u8]>> = masks.iter().map(mask_rows).collect();
    let response = axum::Json(json!({ "predictions": predictions })).into_response();
    timing.encode += encode_start.elapsed();
    timing.record(&state);
    Ok(with_model_headers(response, &served, &timing))
}

/// `:segment` — a raw JPEG/PNG body; answers a PNG (class ids, colour or overlay) or JSON.
async fn segment(state: AppState, path: ModelPath, query: SegmentQuery, headers: HeaderMap, body: Bytes) -> Result<Response, ApiError> {
    let started = Instant::now();
    let served = state.registry.resolve(&path.name, path.version)?;
    let wants_json = headers
        .get(header::ACCEPT)
        .and_then(|a| a.to_str().ok())
        .is_some_and(|a| a.contains("application/json"));
    let format = match query.format.as_deref() {
        Some(f @ ("mask" | "color" | "overlay" | "json")) => f.to_string(),
        Some(other) => return Err(ApiError::BadRequest(format!("unknown format `{other}`: use mask, color, overlay or json"))),
        None if wants_json => "json".to_string(),
        None => "mask".to_string(),
    };
    if let Some(ct) = headers.get(header::CONTENT_TYPE).and_then(|c| c.to_str().ok()) {
        if ct.starts_with("application/json") || ct.starts_with("multipart/") {
            return Err(ApiError::UnsupportedMediaType(format!(
                "`{ct}`: send the raw JPEG or PNG bytes as the body (or use :predict for JSON)"
            )));
        }
    }
    let max_pixels = state.limits.max_pixels;
    let image = blocking(move || decode_bytes(&body, max_pixels)).await?;
    let timing = Timing { decode: started.elapsed(), ..Default::default() };
    let (images, masks, mut timing) = segment_images(&served, vec![image], timing).await?;
    let encode_start = Instant::now();
    let classes = served.predictor.spec().class_names.clone();
    let (name, version) = (served.name.clone(), served.version);
    let fmt = format.clone();
    let (bytes, content_type) = blocking(move || {
        let (image, mask) = (&images[0], &masks[0]);
        let png = |r: anyhow::Result<Vec<u8>>| r.map_err(|e| ApiError::Internal(format!("{e:#}")));
        Ok(match fmt.as_str() {
            "mask" => (png(infer::encode_png(mask))?, "image/png"),
            "color" => (png(infer::encode_png(&infer::colorize(mask)))?, "image/png"),
            "overlay" => (png(infer::encode_png(&infer::overlay(image, mask)))?, "image/png"),
            _ => {
                let fractions = infer::class_fractions(mask, classes.len());
                let body = json!({
                    "model": name,
                    "version": version,
                    "width": mask.width(),
                    "height": mask.height(),
                    "classes": classes,
                    "class_fractions": classes.iter().zip(&fractions).map(|(c, f)| (c.clone(), json!(f))).collect::<serde_json::Map<_, _>>(),
                    "mask": mask_rows(mask),
                });
                (serde_json::to_vec(&body).map_err(|e| ApiError::Internal(e.to_string()))?, "application/json")
            }
        })
    })
    .await?;
    timing.encode += encode_start.elapsed();
    timing.record(&state);
    let mut response = (StatusCode::OK, [(header::CONTENT_TYPE, content_type)], bytes).into_response();
    if format == "json" {
        // The timing is in the Server-Timing header for every format.
        response.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    Ok(with_model_headers(response, &served, &timing))
}

/// `GET /v1/models` — every model, its versions and states.
pub async fn list_models(State(state): State<AppState>) -> Response {
    axum::Json(json!({ "models": state.registry.list() })).into_response()
}

/// `GET /healthz` — the process is up.
pub async fn healthz() -> Response {
    axum::Json(json!({ "status": "ok" })).into_response()
}

/// `GET /readyz` — every served model has loaded and answered a warm-up inference.
pub async fn readyz(State(state): State<AppState>) -> Response {
    let (ready, problems) = state.registry.readiness();
    let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, axum::Json(json!({ "ready": ready, "problems": problems }))).into_response()
}

/// `GET /metrics` — Prometheus text format.
pub async fn metrics(State(state): State<AppState>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        state.metrics.render(),
    )
        .into_response()
}

/// `GET /` — the upload page.
pub async fn page() -> Html<&'static str> {
    Html(PAGE)
}

/// Any other route.
pub async fn not_found(method: Method, uri: axum::http::Uri) -> ApiError {
    ApiError::NotFound(format!("no such endpoint: {method} {}", uri.path()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_paths() {
        let p = parse_model_path("pets:predict").unwrap();
        assert_eq!((p.name.as_str(), p.version, p.verb.as_deref(), p.metadata), ("pets", None, Some("predict"), false));
        let p = parse_model_path("pets/versions/3:segment").unwrap();
        assert_eq!((p.version, p.verb.as_deref()), (Some(3), Some("segment")));
        let p = parse_model_path("pets/versions/2/metadata").unwrap();
        assert!(p.metadata && p.version == Some(2));
        assert!(parse_model_path("pets/versions/x").is_err());
        assert!(parse_model_path("pets/other").is_err());
        assert!(parse_model_path("").is_err());
    }

    #[test]
    fn nested_images_are_checked() {
        let ok = json!([[[0, 1, 2], [3, 4, 5]], [[6, 7, 8], [9, 10, 255]]]);
        let img = image_from_nested(&ok, 100, "image").unwrap();
        assert_eq!(img.dimensions(), (2, 2));
        assert_eq!(img.get_pixel(1, 1).0, [9, 10, 255]);
        for bad in [json!([[[0, 1]]]), json!([[[0, 1, 2]], [[0, 1, 2], [0, 1, 2]]]), json!([[[0, 1, 300]]]), json!("x"), json!([]), json!([[["a", 1, 2]]])] {
            assert!(matches!(image_from_nested(&bad, 100, "image"), Err(ApiError::BadRequest(_))), "{bad}");
        }
        assert!(matches!(image_from_nested(&ok, 3, "image"), Err(ApiError::TooLarge(_))));
    }
}
