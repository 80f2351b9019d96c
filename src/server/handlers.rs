//! The HTTP endpoints: classic `/infer`, TF-Serving `:predict`, raw-image `:segment`, model
//! status and metadata, health, metrics and the page.
//!
//! An inference request: its body is read within the memory budget; the image headers give
//! every photo's size before anything is decoded, so the pixel cap, the JSON-answer cap and
//! the request's share of the memory budget are checked first; decoding and resizing run on
//! the blocking pool holding a CPU-budget token, the model call on the version's batcher, and
//! up-sampling + argmax + encoding on the blocking pool again. The async runtime only moves
//! bytes.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use base64::Engine;
use image::{GrayImage, RgbImage};
use serde::Deserialize;
use serde_json::{Value, json};

use super::AppState;
use super::budget::{MemoryPermit, Refused};
use super::error::ApiError;
use super::registry::ServedVersion;
use super::worker::{Job, SubmitError};
use crate::data::image_io::{self, DecodeOptions};
use crate::infer;

mod nested;
pub mod v2;
use nested::{InferBody, Instance, PredictBody};

/// The upload page.
const PAGE: &str = include_str!("page.html");

/// Time spent per stage of one request.
#[derive(Debug, Default, Clone, Copy)]
pub struct Timing {
    pub decode: Duration,
    pub resize: Duration,
    pub queue: Duration,
    pub inference: Duration,
    pub postprocess: Duration,
    pub encode: Duration,
}

impl Timing {
    fn stages(&self) -> [(&'static str, Duration); 6] {
        [
            ("decode", self.decode),
            ("resize", self.resize),
            ("queue", self.queue),
            ("inference", self.inference),
            ("postprocess", self.postprocess),
            ("encode", self.encode),
        ]
    }

    fn header(&self) -> String {
        self.stages().iter().map(|(n, d)| format!("{n};dur={:.2}", d.as_secs_f64() * 1000.0)).collect::<Vec<_>>().join(", ")
    }

    fn json(&self) -> Value {
        let ms = |d: Duration| (d.as_secs_f64() * 1e6).round() / 1000.0;
        let mut map: serde_json::Map<String, Value> = self.stages().iter().map(|(n, d)| (n.to_string(), json!(ms(*d)))).collect();
        map.insert("total".into(), json!(ms(self.stages().iter().map(|(_, d)| *d).sum())));
        Value::Object(map)
    }

    fn record(&self, state: &AppState) {
        for (name, d) in self.stages() {
            state.metrics.stage(name, d);
        }
    }
}

/// Set when the request's future is dropped (its deadline passed, or its client left): the
/// blocking stages it started stop at their next boundary instead of finishing unseen.
struct Abandon(Arc<std::sync::atomic::AtomicBool>);

impl Abandon {
    fn new() -> Self {
        Self(Arc::new(std::sync::atomic::AtomicBool::new(false)))
    }

    /// A check for the blocking stages: `Err` once the request is abandoned.
    fn watch(&self) -> impl Fn() -> Result<(), ApiError> + Send + 'static {
        let flag = self.0.clone();
        move || {
            if flag.load(std::sync::atomic::Ordering::Relaxed) {
                Err(ApiError::Timeout("the request was abandoned (deadline passed or client gone)".into()))
            } else {
                Ok(())
            }
        }
    }
}

impl Drop for Abandon {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Runs CPU work off the async runtime, holding one token of the CPU budget.
async fn blocking<T: Send + 'static>(state: &AppState, f: impl FnOnce() -> Result<T, ApiError> + Send + 'static) -> Result<T, ApiError> {
    let cpu = state.cpu.clone();
    tokio::task::spawn_blocking(move || {
        let _token = cpu.acquire_stage();
        f()
    })
    .await
    .map_err(|e| ApiError::Internal(format!("worker task failed: {e}")))?
}

/// The media type of a request, lower-case, without parameters.
fn media_type(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(header::CONTENT_TYPE)?.to_str().ok()?;
    Some(value.split(';').next().unwrap_or("").trim().to_ascii_lowercase())
}

/// 415 unless the body is JSON.
fn require_json(headers: &HeaderMap) -> Result<(), ApiError> {
    match media_type(headers) {
        Some(t) if t == "application/json" || (t.starts_with("application/") && t.ends_with("+json")) => Ok(()),
        other => Err(ApiError::UnsupportedMediaType(format!(
            "Content-Type `{}`: this endpoint takes application/json",
            other.as_deref().unwrap_or("(none)")
        ))),
    }
}

/// 415 unless the body is declared as an image (or raw bytes).
fn require_image(headers: &HeaderMap) -> Result<(), ApiError> {
    match media_type(headers) {
        Some(t) if t.starts_with("image/") || t == "application/octet-stream" => Ok(()),
        other => Err(ApiError::UnsupportedMediaType(format!(
            "Content-Type `{}`: send the raw JPEG or PNG bytes as image/jpeg, image/png or application/octet-stream (or use :predict for JSON)",
            other.as_deref().unwrap_or("(none)")
        ))),
    }
}

fn refused(r: Refused, what: &str) -> ApiError {
    match r {
        Refused::OverBudget { bytes, budget } => ApiError::TooLarge(format!(
            "{what} needs {} MiB of memory, more than the server's whole budget of {} MiB (serve.memory_budget_bytes)",
            bytes.div_ceil(1 << 20),
            budget >> 20
        )),
        Refused::Busy => ApiError::Overloaded("the server's memory budget is in use by other requests (serve.memory_budget_bytes); retry shortly".into()),
    }
}

/// Reads the request body within `serve.max_body_bytes`, reserving memory-budget bytes as
/// they arrive (never for a length a header declares), and dropping an upload that stalls:
/// the whole body must arrive within `serve.body_read_timeout_ms`, and after its first 2 s at
/// `serve.min_body_bytes_per_s` on average.
async fn read_body(state: &AppState, headers: &HeaderMap, body: Body, deadline: tokio::time::Instant) -> Result<(Bytes, MemoryPermit), ApiError> {
    use http_body_util::BodyExt;
    let limits = state.limits;
    let limit = limits.max_body_bytes;
    let too_large = || ApiError::TooLarge(format!("request body is over the limit of {limit} bytes (serve.max_body_bytes)"));
    let declared = headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if let Some(n) = declared.filter(|n| *n > limit as u64) {
        // The client is still sending: read it off (bounded) so it gets the 413, not a reset.
        discard_up_to(body, n.min(MAX_DISCARD_BYTES) as usize).await;
        return Err(too_large());
    }
    let started = tokio::time::Instant::now();
    let read_by = (started + limits.body_read_timeout).min(deadline);
    let mut permit = state.memory.reserve(0, deadline).await.map_err(|r| refused(r, "the request body"))?;
    let mut buffer: Vec<u8> = Vec::new();
    let mut body = body;
    loop {
        // The next frame is due when the average rate would fall below the minimum.
        let due = match limits.min_body_bytes_per_s {
            0 => read_by,
            rate => (started + MIN_RATE_GRACE + Duration::from_secs_f64(buffer.len() as f64 / rate as f64)).min(read_by),
        };
        let frame = match tokio::time::timeout_at(due, body.frame()).await {
            Ok(None) => break,
            Ok(Some(Ok(frame))) => frame,
            Ok(Some(Err(e))) => return Err(ApiError::BadRequest(format!("cannot read the request body: {e}"))),
            Err(_) if due >= deadline => {
                return Err(ApiError::Timeout(format!("request took longer than {} ms (serve.request_timeout_ms)", limits.request_timeout.as_millis())));
            }
            Err(_) if due >= read_by => {
                return Err(ApiError::RequestTimeout(format!(
                    "the request body did not arrive within {} ms ({} of {} bytes; serve.body_read_timeout_ms)",
                    limits.body_read_timeout.as_millis(),
                    buffer.len(),
                    declared.map_or("?".to_string(), |n| n.to_string())
                )));
            }
            Err(_) => {
                return Err(ApiError::RequestTimeout(format!(
                    "the request body arrives too slowly ({} bytes in {:.1} s, under serve.min_body_bytes_per_s = {})",
                    buffer.len(),
                    started.elapsed().as_secs_f64(),
                    limits.min_body_bytes_per_s
                )));
            }
        };
        let Ok(data) = frame.into_data() else { continue };
        let len = buffer.len() + data.len();
        if len > limit {
            return Err(too_large());
        }
        if len > buffer.capacity() {
            // The buffer grows geometrically (toward the declared length, never past the
            // limit), and its new capacity is reserved before it is allocated.
            let want = declared.map_or(usize::MAX, |n| n as usize).max(len);
            let capacity = len.max(buffer.capacity().saturating_mul(2)).max(64 << 10).min(want).min(limit);
            state.memory.grow(&mut permit, (capacity - buffer.capacity()) as u64, deadline).await.map_err(|r| refused(r, "the request body"))?;
            buffer.reserve_exact(capacity - buffer.len());
        }
        buffer.extend_from_slice(&data);
    }
    Ok((Bytes::from(buffer), permit))
}

/// A body's first seconds are not held to `serve.min_body_bytes_per_s` (a slow start).
const MIN_RATE_GRACE: Duration = Duration::from_secs(2);

/// Most bytes of an over-long body read off before its 413 (as Nginx's lingering close).
const MAX_DISCARD_BYTES: u64 = 16 << 20;

/// Reads and drops up to 1 MiB of a body (for at most 2 s) before an early error answer, so
/// that a client still sending gets the JSON error instead of a reset connection.
pub(super) async fn discard(body: Body) {
    discard_up_to(body, 1 << 20).await
}

/// [`discard`] with a byte budget: frames are dropped as they arrive, nothing is kept.
async fn discard_up_to(body: Body, budget: usize) {
    use http_body_util::BodyExt;
    let mut body = body;
    let mut left: usize = budget.max(1);
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while let Some(Ok(frame)) = body.frame().await {
            let n = frame.data_ref().map_or(0, |d| d.len());
            if n >= left {
                break;
            }
            left -= n;
        }
    })
    .await;
}

/// `result`, draining `body` first when it is an error.
async fn or_discard<T>(result: Result<T, ApiError>, body: Body) -> Result<(T, Body), ApiError> {
    match result {
        Ok(v) => Ok((v, body)),
        Err(e) => {
            discard(body).await;
            Err(e)
        }
    }
}

/// One photo of a request, before decoding.
enum Source {
    /// JPEG/PNG/GIF bytes, and the size their header declares.
    Encoded { bytes: Vec<u8>, width: u32, height: u32, what: String },
    /// Pixels sent as numbers.
    Pixels(RgbImage),
}

impl Source {
    fn encoded(bytes: Vec<u8>, what: String) -> Result<Self, ApiError> {
        let header = image_io::read_header(&bytes).map_err(|e| prefix(ApiError::from(e), &what))?;
        Ok(Source::Encoded { width: header.width, height: header.height, bytes, what })
    }

    fn pixels(&self) -> u64 {
        match self {
            Source::Encoded { width, height, .. } => *width as u64 * *height as u64,
            Source::Pixels(img) => img.width() as u64 * img.height() as u64,
        }
    }
}

fn prefix(e: ApiError, what: &str) -> ApiError {
    match e {
        ApiError::BadRequest(m) if !what.is_empty() => ApiError::BadRequest(format!("{what}: {m}")),
        other => other,
    }
}

/// How a request is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Answer {
    /// `/infer`: one mask as JSON rows.
    InferJson,
    /// `:predict`: every mask as JSON rows.
    Predictions,
    /// `:segment`: a PNG of the class ids, the colour mask or the overlay, or JSON.
    Png(PngKind),
    SegmentJson,
    /// `/v2/.../infer`: the Open Inference Protocol's outputs.
    V2(v2::Outputs),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PngKind {
    Mask,
    Color,
    Overlay,
}

impl Answer {
    fn is_json(self) -> bool {
        match self {
            Answer::Png(_) => false,
            Answer::V2(o) => o.any_json(),
            _ => true,
        }
    }

    /// An upper bound of the answer's size for masks of `pixels` pixels in `rows` rows.
    fn bytes_bound(self, pixels: u64, rows: u64, classes: u64) -> u64 {
        match self {
            Answer::V2(o) => o.bytes_bound(pixels, classes),
            // Each class id is one digit and a comma; each row adds brackets.
            _ if self.is_json() => 2 * pixels + 3 * rows + 4096,
            // PNG of a 1- or 3-channel image: at most the raw size plus framing.
            Answer::Png(PngKind::Mask) => pixels + rows + 4096,
            _ => 3 * pixels + rows + 4096,
        }
    }
}

/// Who answered, for the answer's body and headers.
#[derive(Clone)]
struct Answerer {
    name: String,
    version: u64,
    classes: Vec<String>,
}

fn mask_rows(mask: &GrayImage) -> Vec<&[u8]> {
    mask.as_raw().chunks(mask.width().max(1) as usize).collect()
}

#[derive(serde::Serialize)]
struct InferJson<'a> {
    mask: Vec<&'a [u8]>,
    width: u32,
    height: u32,
    classes: &'a [String],
    model: &'a str,
    version: u64,
    timing_ms: Value,
}

#[derive(serde::Serialize)]
struct PredictJson<'a> {
    predictions: Vec<Vec<&'a [u8]>>,
}

#[derive(serde::Serialize)]
struct SegmentJson<'a> {
    model: &'a str,
    version: u64,
    width: u32,
    height: u32,
    classes: &'a [String],
    class_fractions: serde_json::Map<String, Value>,
    mask: Vec<&'a [u8]>,
}

/// A photo of a request: its displayed size (the mask's), and its pixels when an overlay
/// needs them.
struct Photo {
    width: u32,
    height: u32,
    full: Option<RgbImage>,
}

/// The encoded answer: bytes, content type, and for a binary Open Inference Protocol answer
/// the length of its JSON header (`Inference-Header-Content-Length`).
type Encoded = (Vec<u8>, &'static str, Option<usize>);

/// Encodes the answer (on the blocking pool).
fn encode_answer(answer: Answer, who: &Answerer, images: &[Photo], masks: &[GrayImage], probabilities: &[Vec<f32>], timing: &Timing) -> Result<Encoded, ApiError> {
    let internal = |e: &dyn std::fmt::Display| ApiError::Internal(format!("encoding the answer failed: {e}"));
    fn json<T: serde::Serialize>(v: &T) -> Result<Vec<u8>, ApiError> {
        serde_json::to_vec(v).map_err(|e| ApiError::Internal(format!("encoding the answer failed: {e}")))
    }
    if let Answer::V2(outputs) = answer {
        return v2::encode(outputs, who, masks, probabilities);
    }
    let (bytes, content_type) = match answer {
        Answer::V2(_) => unreachable!("answered above"),
        Answer::InferJson => {
            let mask = &masks[0];
            let body = InferJson {
                mask: mask_rows(mask),
                width: mask.width(),
                height: mask.height(),
                classes: &who.classes,
                model: &who.name,
                version: who.version,
                timing_ms: timing.json(),
            };
            (json(&body)?, "application/json")
        }
        Answer::Predictions => (json(&PredictJson { predictions: masks.iter().map(mask_rows).collect() })?, "application/json"),
        Answer::SegmentJson => {
            let mask = &masks[0];
            let fractions = infer::class_fractions(mask, who.classes.len());
            let body = SegmentJson {
                model: &who.name,
                version: who.version,
                width: mask.width(),
                height: mask.height(),
                classes: &who.classes,
                class_fractions: who.classes.iter().zip(&fractions).map(|(c, f)| (c.clone(), json!(f))).collect(),
                mask: mask_rows(mask),
            };
            (json(&body)?, "application/json")
        }
        Answer::Png(kind) => {
            let mask = &masks[0];
            let bytes = match kind {
                PngKind::Mask => infer::encode_png_fast(mask),
                PngKind::Color => infer::encode_png_fast(&infer::colorize(mask)),
                PngKind::Overlay => {
                    let image = images[0].full.as_ref().ok_or_else(|| ApiError::Internal("the overlay's photo was not decoded".into()))?;
                    infer::encode_png_fast(&infer::overlay(image, mask))
                }
            };
            (bytes.map_err(|e| internal(&e))?, "image/png")
        }
    };
    Ok((bytes, content_type, None))
}


/// Everything after the body is read: the caps (pixels, JSON answer, memory), decoding and
/// resizing, the model call, up-sampling + argmax and the encoded answer.
async fn run(
    state: &AppState,
    served: &Arc<ServedVersion>,
    sources: Vec<Source>,
    answer: Answer,
    mut timing: Timing,
    deadline: tokio::time::Instant,
) -> Result<Response, ApiError> {
    let limits = state.limits;
    let total: u64 = sources.iter().map(Source::pixels).sum();
    if total > limits.max_pixels {
        return Err(ApiError::TooLarge(format!(
            "{} image(s) with {total} pixels in all, over the limit of {} per request (serve.max_pixels)",
            sources.len(),
            limits.max_pixels
        )));
    }
    let rows: u64 = sources
        .iter()
        .map(|s| match s {
            Source::Encoded { width, height, .. } => (*width).max(*height) as u64,
            Source::Pixels(img) => img.height() as u64,
        })
        .sum();
    let classes = served.predictor.spec().num_classes() as u64;
    let answer_bytes = answer.bytes_bound(total, rows, classes);
    if answer.is_json() && answer_bytes > limits.max_json_response_bytes {
        return Err(ApiError::TooLarge(format!(
            "the JSON answer for {total} pixels would be up to {answer_bytes} bytes, over the limit of {} (serve.max_json_response_bytes); ask :segment for a PNG mask instead",
            limits.max_json_response_bytes
        )));
    }
    let spec = served.predictor.spec();
    let plane = (spec.input_size * spec.input_size) as u64;
    // Decoded photos, masks, the answer, model inputs and logits.
    // An overlay decodes its photo twice (reduced for the model, full for the figure).
    let overlay_extra = match answer {
        Answer::Png(PngKind::Overlay) => total,
        // Probabilities as floats before they are encoded.
        Answer::V2(o) if o.probabilities.wanted() => 4 * classes * total,
        _ => 0,
    };
    let need = 4 * total + overlay_extra + answer_bytes + sources.len() as u64 * (3 + spec.num_classes() as u64) * plane * 4;
    let _memory = state.memory.reserve(need, deadline).await.map_err(|r| refused(r, "this request"))?;
    // Slots for this request's images between decoding and the model (a request with more
    // images than slots takes them all: it is bounded by serve.max_pixels instead).
    let want = (sources.len() as u32).clamp(1, served.prepared_slots);
    let slots = match tokio::time::timeout_at(deadline, served.prepared.clone().acquire_many_owned(want)).await {
        Ok(Ok(p)) => p,
        _ => return Err(ApiError::Timeout(format!("request took longer than {} ms (serve.request_timeout_ms)", limits.request_timeout.as_millis()))),
    };

    let predictor = served.predictor.clone();
    let max_pixels = limits.max_pixels;
    let overlay = matches!(answer, Answer::Png(PngKind::Overlay));
    // `serve.jpeg_dct_scaling: false` decodes every photo at full size.
    let model_side = if limits.jpeg_dct_scaling { spec.input_size as u32 } else { u32::MAX };
    let max_jpeg_scans = limits.max_jpeg_scans;
    let abandon = Abandon::new();
    let alive = abandon.watch();
    let (images, inputs, decode, resize) = blocking(state, move || {
        let (mut images, mut inputs) = (Vec::with_capacity(sources.len()), Vec::with_capacity(sources.len()));
        let (mut decode, mut resize) = (Duration::ZERO, Duration::ZERO);
        for source in sources {
            alive()?;
            let t = Instant::now();
            // The model input comes from a JPEG decoded at a reduced DCT scale; the photo
            // itself is decoded at full size only for an overlay.
            let (model_pixels, photo) = match source {
                Source::Encoded { bytes, what, .. } => {
                    let options = DecodeOptions { max_pixels, apply_exif_orientation: true, max_jpeg_scans };
                    let decoded = image_io::decode_rgb_for_model(&bytes, options, model_side).map_err(|e| prefix(ApiError::from(e), &what))?;
                    let full = match (overlay, decoded.scale) {
                        (false, _) => None,
                        (true, 1) => Some(decoded.image.clone()),
                        (true, _) => Some(image_io::decode_rgb(&bytes, options).map_err(|e| prefix(ApiError::from(e), &what))?.image),
                    };
                    let photo = Photo { width: decoded.width, height: decoded.height, full };
                    (decoded.image, photo)
                }
                Source::Pixels(image) => {
                    let photo = Photo { width: image.width(), height: image.height(), full: overlay.then(|| image.clone()) };
                    (image, photo)
                }
            };
            let t2 = Instant::now();
            decode += t2 - t;
            inputs.push(predictor.prepare(&model_pixels));
            resize += t2.elapsed();
            images.push(photo);
        }
        Ok((images, inputs, decode, resize))
    })
    .await?;
    timing.decode += decode;
    timing.resize += resize;

    let mut answers = Vec::with_capacity(inputs.len());
    for input in inputs {
        let (reply, answer) = tokio::sync::oneshot::channel();
        let job = Job { input, enqueued: Instant::now(), deadline: deadline.into_std(), reply };
        served.worker.submit(job).map_err(|e| match e {
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
    drop(slots);

    let predictor = served.predictor.clone();
    let who = Answerer { name: served.name.clone(), version: served.version, classes: spec.class_names.clone() };
    let alive = abandon.watch();
    let (encoded, timing) = blocking(state, move || {
        alive()?;
        let mut timing = timing;
        let t = Instant::now();
        let masks: Vec<GrayImage> = images.iter().zip(&logits).map(|(p, l)| predictor.mask_from_logits_seq(l, p.width, p.height)).collect();
        let probabilities: Vec<Vec<f32>> = match answer {
            Answer::V2(o) if o.probabilities.wanted() => {
                let (classes, size) = (predictor.spec().num_classes(), predictor.spec().input_size);
                images.iter().zip(&logits).map(|(p, l)| infer::upsample_softmax(l, classes, size, p.width, p.height)).collect()
            }
            _ => Vec::new(),
        };
        drop(logits);
        let t2 = Instant::now();
        timing.postprocess += t2 - t;
        alive()?;
        let encoded = encode_answer(answer, &who, &images, &masks, &probabilities, &timing)?;
        timing.encode += t2.elapsed();
        Ok((encoded, timing))
    })
    .await?;
    let (bytes, content_type, header_length) = encoded;
    timing.record(state);
    let mut response = (StatusCode::OK, [(header::CONTENT_TYPE, content_type)], bytes).into_response();
    if let Some(n) = header_length {
        response.headers_mut().insert(v2::HEADER_LENGTH, HeaderValue::from(n));
    }
    if answer.is_json() {
        response.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    Ok(with_model_headers(response, served, &timing))
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

fn request_deadline(state: &AppState) -> tokio::time::Instant {
    tokio::time::Instant::now() + state.limits.request_timeout
}

/// `POST /infer` — `{"image": [[[r,g,b], …], …], "model"?: name, "version"?: n}`.
pub async fn infer(State(state): State<AppState>, headers: HeaderMap, body: Body) -> Result<Response, ApiError> {
    let started = Instant::now();
    let ((), body) = or_discard(require_json(&headers), body).await?;
    let deadline = request_deadline(&state);
    let (body, _body_memory) = read_body(&state, &headers, body, deadline).await?;
    let max_pixels = state.limits.max_pixels;
    let request: InferBody = blocking(&state, move || nested::parse_infer(&body, max_pixels)).await?;
    let name = match request.model {
        Some(n) => n,
        None => state.registry.default_model().ok_or_else(|| ApiError::Unavailable("no model is served".into()))?,
    };
    let served = state.registry.resolve(&name, request.version)?;
    let timing = Timing { decode: started.elapsed(), ..Default::default() };
    run(&state, &served, vec![Source::Pixels(request.image)], Answer::InferJson, timing, deadline).await
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
    query: Result<Query<SegmentQuery>, QueryRejection>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let (path, body) = or_discard(parse_model_path(&rest), body).await?;
    match (method, path.verb.as_deref(), path.metadata) {
        (Method::GET, None, false) => status(&state, &path),
        (Method::GET, None, true) => metadata(&state, &path),
        (Method::POST, Some("predict"), _) => predict(state, path, headers, body).await,
        (Method::POST, Some("segment"), _) => {
            let query = query.map(|Query(q)| q).map_err(|e| ApiError::BadRequest(format!("bad query string: {}", e.body_text())));
            let (query, body) = or_discard(query, body).await?;
            segment(state, path, query, headers, body).await
        }
        (_, Some(verb), _) if verb != "predict" && verb != "segment" => {
            let e = ApiError::NotFound(format!("unknown method `:{verb}`: use :predict or :segment"));
            or_discard(Err(e), body).await.map(|(r, _)| r)
        }
        (m, verb, _) => {
            let e = ApiError::MethodNotAllowed(format!("{m} is not allowed here: {}", if verb.is_some() { "use POST" } else { "use GET" }));
            or_discard(Err(e), body).await.map(|(r, _)| r)
        }
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
            "runtime": { "precision": served.predictor.precision().name(), "engine": served.predictor.engine() },
        }
    }))
    .into_response())
}

/// `:predict` — TF-Serving `{"instances": [...]}`, each an H×W×3 array or `{"b64": …}`.
async fn predict(state: AppState, path: ModelPath, headers: HeaderMap, body: Body) -> Result<Response, ApiError> {
    let started = Instant::now();
    let checked = require_json(&headers).and_then(|()| state.registry.resolve(&path.name, path.version));
    let (served, body) = or_discard(checked, body).await?;
    let deadline = request_deadline(&state);
    let (body, _body_memory) = read_body(&state, &headers, body, deadline).await?;
    let (max_pixels, max_instances) = (state.limits.max_pixels, state.limits.max_instances);
    let sources = blocking(&state, move || {
        let PredictBody { instances } = nested::parse_predict(&body, max_pixels, max_instances)?;
        drop(body);
        instances
            .into_iter()
            .enumerate()
            .map(|(i, instance)| match instance {
                Instance::B64(text) => {
                    let what = format!("instances[{i}]");
                    let bytes = base64::engine::general_purpose::STANDARD
                        .decode(text.trim())
                        .map_err(|e| ApiError::BadRequest(format!("{what}.b64 is not base64: {e}")))?;
                    Source::encoded(bytes, what)
                }
                Instance::Pixels(image) => Ok(Source::Pixels(image)),
            })
            .collect::<Result<Vec<_>, _>>()
    })
    .await?;
    let timing = Timing { decode: started.elapsed(), ..Default::default() };
    run(&state, &served, sources, Answer::Predictions, timing, deadline).await
}

/// `:segment` — a raw JPEG/PNG body; answers a PNG (class ids, colour or overlay) or JSON.
async fn segment(state: AppState, path: ModelPath, query: SegmentQuery, headers: HeaderMap, body: Body) -> Result<Response, ApiError> {
    let started = Instant::now();
    let checked = segment_checks(&state, &path, &query, &headers);
    let ((served, answer), body) = or_discard(checked, body).await?;
    let deadline = request_deadline(&state);
    let (body, _body_memory) = read_body(&state, &headers, body, deadline).await?;
    let source = Source::encoded(body.to_vec(), String::new())?;
    drop(body);
    let timing = Timing { decode: started.elapsed(), ..Default::default() };
    run(&state, &served, vec![source], answer, timing, deadline).await
}

/// What `:segment` checks before reading the body: the version, the answer format, the
/// content type.
fn segment_checks(state: &AppState, path: &ModelPath, query: &SegmentQuery, headers: &HeaderMap) -> Result<(Arc<ServedVersion>, Answer), ApiError> {
    let served = state.registry.resolve(&path.name, path.version)?;
    let wants_json = headers
        .get(header::ACCEPT)
        .and_then(|a| a.to_str().ok())
        .is_some_and(|a| a.contains("application/json"));
    let answer = match query.format.as_deref() {
        Some("mask") => Answer::Png(PngKind::Mask),
        Some("color") => Answer::Png(PngKind::Color),
        Some("overlay") => Answer::Png(PngKind::Overlay),
        Some("json") => Answer::SegmentJson,
        Some(other) => return Err(ApiError::BadRequest(format!("unknown format `{other}`: use mask, color, overlay or json"))),
        None if wants_json => Answer::SegmentJson,
        None => Answer::Png(PngKind::Mask),
    };
    require_image(headers)?;
    Ok((served, answer))
}

/// `GET /v1/models` — every model, its versions and states.
pub async fn list_models(State(state): State<AppState>) -> Response {
    axum::Json(json!({ "models": state.registry.list() })).into_response()
}

/// `GET /healthz` — the process is up.
pub async fn healthz() -> Response {
    axum::Json(json!({ "status": "ok" })).into_response()
}

/// `GET /readyz` — every served model has a version that loaded, answered its warm-up and
/// whose model calls are not failing.
pub async fn readyz(State(state): State<AppState>) -> Response {
    let (ready, problems) = state.registry.readiness();
    let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, axum::Json(json!({ "ready": ready, "problems": problems }))).into_response()
}

/// `GET /metrics` — Prometheus text format.
pub async fn metrics(State(state): State<AppState>) -> Response {
    let mut text = state.metrics.render();
    use std::fmt::Write;
    let _ = write!(
        text,
        "# HELP process_resident_memory_bytes Resident memory size in bytes.\n# TYPE process_resident_memory_bytes gauge\nprocess_resident_memory_bytes {}\n\
         # HELP segctl_memory_in_flight_bytes Bytes of the memory budget held by requests.\n# TYPE segctl_memory_in_flight_bytes gauge\nsegctl_memory_in_flight_bytes {}\n\
         # HELP segctl_memory_budget_bytes The memory budget (serve.memory_budget_bytes).\n# TYPE segctl_memory_budget_bytes gauge\nsegctl_memory_budget_bytes {}\n",
        crate::util::resident_bytes(),
        state.memory.in_flight_bytes(),
        state.memory.total_bytes()
    );
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], text).into_response()
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
    fn content_types_are_checked() {
        let with = |ct: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::CONTENT_TYPE, HeaderValue::from_str(ct).unwrap());
            h
        };
        assert!(require_json(&with("application/json; charset=utf-8")).is_ok());
        assert!(require_json(&with("text/plain")).is_err());
        assert!(require_json(&HeaderMap::new()).is_err());
        assert!(require_image(&with("image/jpeg")).is_ok());
        assert!(require_image(&with("application/octet-stream")).is_ok());
        assert!(require_image(&with("application/x-www-form-urlencoded")).is_err());
        assert!(require_image(&with("text/plain")).is_err());
    }

    #[test]
    fn json_answers_are_bounded_above() {
        let mask = GrayImage::from_fn(37, 5, |x, y| image::Luma([((x + y) % 3) as u8]));
        let who = Answerer { name: "pets".into(), version: 1, classes: vec!["a".into(), "b".into(), "c".into()] };
        for answer in [Answer::InferJson, Answer::Predictions, Answer::SegmentJson] {
            let (bytes, _, _) = encode_answer(answer, &who, &[], std::slice::from_ref(&mask), &[], &Timing::default()).unwrap();
            assert!((bytes.len() as u64) <= answer.bytes_bound(37 * 5, 5, 3), "{answer:?}: {} bytes", bytes.len());
        }
    }
}
