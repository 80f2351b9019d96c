//! The Open Inference Protocol (KServe v2, as Triton speaks it) over REST: health, server and
//! model metadata, model readiness and `infer`, with JSON tensors and the binary tensor data
//! extension (`Inference-Header-Content-Length`, `binary_data_size`, `binary_data_output`).
//!
//! Inputs: one tensor, either `UINT8` `[N, H, W, 3]` pixels or `BYTES` `[N]` JPEG/PNG/GIF files
//! (any name; in JSON a `BYTES` element is the file in base64). Outputs: `mask` `UINT8`
//! `[N, H, W]` class ids at the photos' size, and `probabilities` `FP32` `[N, C, H, W]`; the
//! request's `outputs` choose them (none listed = both, as the protocol says). Errors are the
//! protocol's `{"error": "..."}` with 4xx/5xx codes.

use std::time::Instant;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use image::{GrayImage, RgbImage};
use serde::Deserialize;
use serde::de::{DeserializeSeed, SeqAccess, Visitor};
use serde_json::value::RawValue;
use serde_json::json;

use super::super::AppState;
use super::super::error::ApiError;
use super::{Answer, Answerer, Source, Timing, blocking, or_discard, read_body, request_deadline, run};

/// Length of the JSON part of a request or answer with binary tensors.
pub const HEADER_LENGTH: &str = "inference-header-content-length";
/// Output names.
pub const MASK: &str = "mask";
pub const PROBABILITIES: &str = "probabilities";

/// How one output is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Out {
    No,
    Json,
    Binary,
}

impl Out {
    pub fn wanted(self) -> bool {
        self != Out::No
    }
}

/// The outputs a request asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outputs {
    pub mask: Out,
    pub probabilities: Out,
}

impl Outputs {
    pub fn any_json(self) -> bool {
        self.mask == Out::Json || self.probabilities == Out::Json
    }

    /// Upper bound of the answer for `pixels` mask pixels of `classes` classes.
    pub fn bytes_bound(self, pixels: u64, classes: u64) -> u64 {
        let mask = match self.mask {
            Out::No => 0,
            Out::Json => 4 * pixels,
            Out::Binary => pixels,
        };
        // A JSON float is at most ~16 characters and a comma.
        let probabilities = match self.probabilities {
            Out::No => 0,
            Out::Json => 17 * classes * pixels,
            Out::Binary => 4 * classes * pixels,
        };
        mask + probabilities + 4096
    }
}

// Nothing of a request becomes a JSON tree: the fields are typed, `parameters` keeps the keys
// segctl reads and skips the others unparsed (any value, however large or deep, costs no
// memory), lists are bounded, and `data` stays a borrowed slice of the body.

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct InferRequest<'a> {
    #[serde(default)]
    #[allow(dead_code)]
    id: Option<String>,
    #[serde(default)]
    parameters: Option<Parameters>,
    #[serde(borrow, deserialize_with = "bounded::<_, MAX_TENSORS, _>")]
    inputs: Vec<InputTensor<'a>>,
    #[serde(default, deserialize_with = "bounded_option::<_, MAX_TENSORS, _>")]
    outputs: Option<Vec<OutputRequest>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct InputTensor<'a> {
    name: String,
    #[serde(deserialize_with = "bounded::<_, MAX_DIMS, _>")]
    shape: Vec<i64>,
    datatype: String,
    #[serde(default)]
    parameters: Option<Parameters>,
    #[serde(default, borrow)]
    data: Option<&'a RawValue>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct OutputRequest {
    name: String,
    #[serde(default)]
    parameters: Option<Parameters>,
}

/// The `parameters` segctl reads; any other key is skipped without being parsed into a tree.
#[derive(Debug, Default, Deserialize)]
struct Parameters {
    binary_data_output: Option<bool>,
    binary_data: Option<bool>,
    binary_data_size: Option<u64>,
}

/// Most tensors in `inputs` or `outputs` (segctl takes one input and has two outputs).
const MAX_TENSORS: usize = 16;
/// Most dimensions of a shape.
const MAX_DIMS: usize = 8;

/// A JSON array of at most `MAX` elements, refused at the first one over.
fn bounded<'de, T: Deserialize<'de>, const MAX: usize, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<T>, D::Error> {
    struct Bounded<T, const MAX: usize>(std::marker::PhantomData<T>);
    impl<'de, T: Deserialize<'de>, const MAX: usize> Visitor<'de> for Bounded<T, MAX> {
        type Value = Vec<T>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            write!(f, "an array of at most {MAX} elements")
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<T>, A::Error> {
            let mut out = Vec::new();
            while let Some(v) = seq.next_element()? {
                if out.len() == MAX {
                    return Err(serde::de::Error::custom(format!("more than {MAX} elements")));
                }
                out.push(v);
            }
            Ok(out)
        }
    }
    d.deserialize_seq(Bounded::<T, MAX>(std::marker::PhantomData))
}

fn bounded_option<'de, T: Deserialize<'de>, const MAX: usize, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Vec<T>>, D::Error> {
    bounded::<T, MAX, D>(d).map(Some)
}

fn bad(message: impl Into<String>) -> ApiError {
    ApiError::BadRequest(message.into())
}

/// Base64 strings of a JSON array decoded one by one into files (at most `max`), without a
/// `Vec<String>` of the whole array.
struct Base64Files {
    max: usize,
}

impl<'de> DeserializeSeed<'de> for Base64Files {
    type Value = Vec<Vec<u8>>;
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for Base64Files {
    type Value = Vec<Vec<u8>>;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("an array of base64 strings")
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut files = Vec::new();
        while let Some(text) = seq.next_element::<std::borrow::Cow<'de, str>>()? {
            if files.len() == self.max {
                return Err(serde::de::Error::custom(format!("more than the {} elements the shape declares", self.max)));
            }
            let file = base64::engine::general_purpose::STANDARD
                .decode(text.trim())
                .map_err(|e| serde::de::Error::custom(format!("data[{}] is not base64: {e}", files.len())))?;
            files.push(file);
        }
        Ok(files)
    }
}

/// Appends every number of a (possibly nested) JSON array of `u8` to a vector, refusing more
/// than `limit` values, without building a JSON tree.
struct FlatU8<'v> {
    out: &'v mut Vec<u8>,
    limit: usize,
}

impl<'de> DeserializeSeed<'de> for FlatU8<'_> {
    type Value = ();
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for FlatU8<'_> {
    type Value = ();
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("an array of integers 0..=255")
    }
    fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<(), E> {
        let v = u8::try_from(v).map_err(|_| E::custom(format!("{v} is not a UINT8")))?;
        if self.out.len() >= self.limit {
            return Err(E::custom(format!("more than {} values", self.limit)));
        }
        self.out.push(v);
        Ok(())
    }
    fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<(), E> {
        Err(E::custom(format!("{v} is not a UINT8")))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element_seed(FlatU8 { out: &mut *self.out, limit: self.limit })?.is_some() {}
        Ok(())
    }
}

/// The photos of one input tensor, checked against the request limits.
fn sources(input: &InputTensor, binary: &mut &[u8], max_pixels: u64, max_instances: usize) -> Result<Vec<Source>, ApiError> {
    let what = format!("input `{}`", input.name);
    let binary_size = input.parameters.as_ref().and_then(|p| p.binary_data_size);
    let mut take_binary = |n: u64| -> Result<&[u8], ApiError> {
        let n = usize::try_from(n).map_err(|_| bad(format!("{what}: binary_data_size {n}")))?;
        if n > binary.len() {
            return Err(bad(format!("{what}: binary_data_size {n} is more than the {} bytes left after the JSON header", binary.len())));
        }
        let (head, rest) = binary.split_at(n);
        *binary = rest;
        Ok(head)
    };
    match input.datatype.as_str() {
        "UINT8" => {
            let [n, h, w, c] = input.shape[..] else {
                return Err(bad(format!("{what}: UINT8 pixels take the shape [N, H, W, 3], not {:?}", input.shape)));
            };
            if c != 3 || n < 1 || h < 1 || w < 1 {
                return Err(bad(format!("{what}: UINT8 pixels take the shape [N, H, W, 3], not {:?}", input.shape)));
            }
            let (n, h, w) = (n as u64, h as u64, w as u64);
            if n as usize > max_instances {
                return Err(bad(format!("{what}: {n} images, more than {max_instances} (serve.queue_capacity)")));
            }
            let pixels = n.saturating_mul(h).saturating_mul(w);
            if pixels > max_pixels || h > u32::MAX as u64 || w > u32::MAX as u64 {
                return Err(ApiError::TooLarge(format!("{what}: {pixels} pixels, over the limit of {max_pixels} per request (serve.max_pixels)")));
            }
            let count = (pixels * 3) as usize;
            let values: Vec<u8> = match (binary_size, input.data) {
                (Some(size), None) => take_binary(size)?.to_vec(),
                (None, Some(raw)) => {
                    let mut out = Vec::with_capacity(count.min(1 << 24));
                    let mut d = serde_json::Deserializer::from_str(raw.get());
                    FlatU8 { out: &mut out, limit: count }.deserialize(&mut d).map_err(|e| bad(format!("{what}: data: {e}")))?;
                    out
                }
                (Some(_), Some(_)) => return Err(bad(format!("{what}: both data and binary_data_size"))),
                (None, None) => return Err(bad(format!("{what}: no data (give data or binary_data_size)"))),
            };
            if values.len() != count {
                return Err(bad(format!("{what}: {} values for the shape {:?} ({count})", values.len(), input.shape)));
            }
            let frame = (h * w * 3) as usize;
            Ok(values
                .chunks_exact(frame)
                .map(|f| Source::Pixels(RgbImage::from_raw(w as u32, h as u32, f.to_vec()).expect("the frame has H×W×3 values")))
                .collect())
        }
        "BYTES" => {
            let n = match input.shape[..] {
                [n] | [n, 1] if n >= 1 => n as usize,
                _ => return Err(bad(format!("{what}: BYTES take the shape [N] (one encoded photo each), not {:?}", input.shape))),
            };
            if n > max_instances {
                return Err(bad(format!("{what}: {n} images, more than {max_instances} (serve.queue_capacity)")));
            }
            let files: Vec<Vec<u8>> = match (binary_size, input.data) {
                (Some(size), None) => {
                    // Each element: a 4-byte little-endian length, then the bytes.
                    let mut data = take_binary(size)?;
                    let mut files = Vec::with_capacity(n);
                    while !data.is_empty() {
                        if data.len() < 4 || files.len() == n {
                            return Err(bad(format!("{what}: the binary BYTES data does not hold {n} length-prefixed elements")));
                        }
                        let len = u32::from_le_bytes([data[0], data[1], data[2], data[3]]) as usize;
                        if data.len() - 4 < len {
                            return Err(bad(format!("{what}: element {} says {len} bytes, {} are left", files.len(), data.len() - 4)));
                        }
                        files.push(data[4..4 + len].to_vec());
                        data = &data[4 + len..];
                    }
                    files
                }
                (None, Some(raw)) => {
                    let mut de = serde_json::Deserializer::from_str(raw.get());
                    serde::de::DeserializeSeed::deserialize(Base64Files { max: n }, &mut de)
                        .map_err(|e| bad(format!("{what}: data: {e} (BYTES in JSON are base64 strings)")))?
                }
                (Some(_), Some(_)) => return Err(bad(format!("{what}: both data and binary_data_size"))),
                (None, None) => return Err(bad(format!("{what}: no data (give data or binary_data_size)"))),
            };
            if files.len() != n {
                return Err(bad(format!("{what}: {} elements for the shape {:?}", files.len(), input.shape)));
            }
            let sources = files.into_iter().enumerate().map(|(i, f)| Source::encoded(f, format!("{what}[{i}]"))).collect::<Result<Vec<_>, _>>()?;
            let total: u64 = sources.iter().map(Source::pixels).sum();
            if total > max_pixels {
                return Err(ApiError::TooLarge(format!("{what}: the photos have {total} pixels, over the limit of {max_pixels} per request (serve.max_pixels)")));
            }
            Ok(sources)
        }
        other => Err(bad(format!("{what}: datatype {other} is not accepted (UINT8 [N,H,W,3] pixels or BYTES [N] encoded photos)"))),
    }
}

/// The request's JSON and binary parts, its photos and the outputs it wants.
fn parse(body: &[u8], header_length: Option<usize>, max_pixels: u64, max_instances: usize) -> Result<(Vec<Source>, Outputs), ApiError> {
    let json_len = header_length.unwrap_or(body.len());
    if json_len > body.len() {
        return Err(bad(format!("Inference-Header-Content-Length {json_len} is more than the body ({} bytes)", body.len())));
    }
    let (head, mut binary) = body.split_at(json_len);
    let text = std::str::from_utf8(head).map_err(|_| bad("the inference request header is not UTF-8 JSON"))?;
    let request: InferRequest = serde_json::from_str(text).map_err(|e| bad(format!("not an inference request: {e}")))?;
    let [input] = &request.inputs[..] else {
        return Err(bad(format!("{} inputs: segctl models take one (UINT8 pixels or BYTES photos)", request.inputs.len())));
    };
    let sources = sources(input, &mut binary, max_pixels, max_instances)?;
    if !binary.is_empty() {
        return Err(bad(format!("{} bytes of binary data are not claimed by any input's binary_data_size", binary.len())));
    }
    let all_binary = request.parameters.as_ref().and_then(|p| p.binary_data_output).unwrap_or(false);
    let mode = |params: &Option<Parameters>| if params.as_ref().and_then(|p| p.binary_data).unwrap_or(all_binary) { Out::Binary } else { Out::Json };
    let outputs = match &request.outputs {
        None => Outputs { mask: mode(&None), probabilities: mode(&None) },
        Some(list) => {
            let mut o = Outputs { mask: Out::No, probabilities: Out::No };
            for out in list {
                match out.name.as_str() {
                    MASK => o.mask = mode(&out.parameters),
                    PROBABILITIES => o.probabilities = mode(&out.parameters),
                    other => return Err(bad(format!("unknown output `{other}`: the outputs are `{MASK}` and `{PROBABILITIES}`"))),
                }
            }
            if !o.mask.wanted() && !o.probabilities.wanted() {
                return Err(bad("no outputs requested"));
            }
            o
        }
    };
    Ok((sources, outputs))
}

/// The answer's JSON and binary parts.
pub(super) fn encode(outputs: Outputs, who: &Answerer, masks: &[GrayImage], probabilities: &[Vec<f32>]) -> Result<super::Encoded, ApiError> {
    let first = masks.first().ok_or_else(|| ApiError::Internal("no masks".into()))?;
    let (w, h) = first.dimensions();
    if masks.iter().any(|m| m.dimensions() != (w, h)) {
        let sizes: Vec<String> = masks.iter().map(|m| format!("{}x{}", m.width(), m.height())).collect();
        return Err(bad(format!("the photos are of different sizes ({}): one output tensor needs one size; send them in separate requests", sizes.join(", "))));
    }
    let n = masks.len();
    let classes = who.classes.len();
    let mut binary: Vec<u8> = Vec::new();
    let mut tensors = Vec::new();
    if outputs.mask.wanted() {
        let shape = json!([n, h, w]);
        let mut t = json!({ "name": MASK, "datatype": "UINT8", "shape": shape });
        if outputs.mask == Out::Binary {
            let size: usize = masks.iter().map(|m| m.as_raw().len()).sum();
            for m in masks {
                binary.extend_from_slice(m.as_raw());
            }
            t["parameters"] = json!({ "binary_data_size": size });
        } else {
            let data: Vec<u8> = masks.iter().flat_map(|m| m.as_raw().iter().copied()).collect();
            t["data"] = json!(data);
        }
        tensors.push(t);
    }
    if outputs.probabilities.wanted() {
        let mut t = json!({ "name": PROBABILITIES, "datatype": "FP32", "shape": [n, classes, h, w] });
        if outputs.probabilities == Out::Binary {
            let start = binary.len();
            for p in probabilities {
                binary.extend(p.iter().flat_map(|v| v.to_le_bytes()));
            }
            t["parameters"] = json!({ "binary_data_size": binary.len() - start });
        } else {
            let data: Vec<f32> = probabilities.iter().flatten().copied().collect();
            t["data"] = json!(data);
        }
        tensors.push(t);
    }
    let header = json!({
        "model_name": who.name,
        "model_version": who.version.to_string(),
        "outputs": tensors,
        "parameters": { "classes": who.classes },
    });
    let mut bytes = serde_json::to_vec(&header).map_err(|e| ApiError::Internal(format!("encoding the answer failed: {e}")))?;
    if binary.is_empty() {
        return Ok((bytes, "application/json", None));
    }
    let header_length = bytes.len();
    bytes.extend_from_slice(&binary);
    Ok((bytes, "application/octet-stream", Some(header_length)))
}

/// `GET /v2` — server metadata.
pub async fn server_metadata() -> Response {
    axum::Json(json!({ "name": "segctl", "version": env!("CARGO_PKG_VERSION"), "extensions": ["binary_tensor_data"] })).into_response()
}

/// `GET /v2/health/live`.
pub async fn live() -> Response {
    axum::Json(json!({ "live": true })).into_response()
}

/// `GET /v2/health/ready` — 200 when every model serves (as `/readyz`), else 400 (the
/// protocol's "false").
pub async fn ready(State(state): State<AppState>) -> Response {
    let (ready, problems) = state.registry.readiness();
    let status = if ready { StatusCode::OK } else { StatusCode::BAD_REQUEST };
    (status, axum::Json(json!({ "ready": ready, "problems": problems }))).into_response()
}

/// The parts of a `/v2/models/...` path: name, version, and `ready` / `infer` / metadata.
fn parse_path(rest: &str) -> Result<(String, Option<u64>, Option<&str>), ApiError> {
    let not_found = || ApiError::NotFound(format!("no such endpoint: /v2/models/{rest}"));
    let parts: Vec<&str> = rest.split('/').collect();
    let (name, version, verb) = match parts.as_slice() {
        [name] => (*name, None, None),
        [name, verb @ ("ready" | "infer")] => (*name, None, Some(*verb)),
        [name, "versions", v] => (*name, Some(*v), None),
        [name, "versions", v, verb @ ("ready" | "infer")] => (*name, Some(*v), Some(*verb)),
        _ => return Err(not_found()),
    };
    if name.is_empty() {
        return Err(not_found());
    }
    let version = match version {
        Some(v) => Some(v.parse::<u64>().map_err(|_| ApiError::NotFound(format!("`{v}` is not a version number")))?),
        None => None,
    };
    Ok((name.to_string(), version, verb))
}

/// Everything under `/v2/models/`.
pub async fn models(State(state): State<AppState>, method: Method, Path(rest): Path<String>, headers: HeaderMap, body: Body) -> Result<Response, ApiError> {
    let (parsed, body) = or_discard(parse_path(&rest), body).await?;
    let (name, version, verb) = parsed;
    match (method, verb) {
        (Method::GET, None) => model_metadata(&state, &name, version),
        (Method::GET, Some("ready")) => Ok(model_ready(&state, &name, version)),
        (Method::POST, Some("infer")) => infer(state, &name, version, headers, body).await,
        (m, _) => {
            let allowed = if verb == Some("infer") { "POST" } else { "GET" };
            or_discard(Err(ApiError::MethodNotAllowed(format!("{m} is not allowed here: use {allowed}"))), body).await.map(|(r, _)| r)
        }
    }
}

fn model_metadata(state: &AppState, name: &str, version: Option<u64>) -> Result<Response, ApiError> {
    let served = state.registry.resolve(name, version)?;
    let spec = served.predictor.spec();
    let versions: Vec<String> = match version {
        Some(v) => vec![v.to_string()],
        None => state.registry.status(name).unwrap_or_default().iter().filter(|v| v.state == "AVAILABLE").map(|v| v.version.to_string()).collect(),
    };
    Ok(axum::Json(json!({
        "name": served.name,
        "versions": versions,
        "platform": "segctl",
        "inputs": [
            { "name": "image", "datatype": "UINT8", "shape": [-1, -1, -1, 3] },
            { "name": "image_bytes", "datatype": "BYTES", "shape": [-1] },
        ],
        "outputs": [
            { "name": MASK, "datatype": "UINT8", "shape": [-1, -1, -1] },
            { "name": PROBABILITIES, "datatype": "FP32", "shape": [-1, spec.num_classes(), -1, -1] },
        ],
        "parameters": {
            "classes": spec.class_names,
            "input_size": spec.input_size,
            "note": "send one input: UINT8 pixels [N,H,W,3] or BYTES [N] JPEG/PNG files (base64 in JSON); masks come at the photos' size",
        },
    }))
    .into_response())
}

fn model_ready(state: &AppState, name: &str, version: Option<u64>) -> Response {
    match state.registry.resolve(name, version) {
        Ok(served) if served.worker.healthy() => {
            axum::Json(json!({ "name": served.name, "version": served.version.to_string(), "ready": true })).into_response()
        }
        Ok(_) => (StatusCode::BAD_REQUEST, axum::Json(json!({ "error": format!("model `{name}`: its last model calls failed") }))).into_response(),
        Err(e) => {
            let message = e.to_string();
            (StatusCode::BAD_REQUEST, axum::Json(json!({ "error": message }))).into_response()
        }
    }
}

/// 415 unless the body is JSON or binary (Triton's clients send no Content-Type at all; a
/// browser's cross-site form or text post is refused).
fn content_type_ok(headers: &HeaderMap) -> Result<(), ApiError> {
    match super::media_type(headers) {
        None => Ok(()),
        Some(t) if t == "application/json" || t == "application/octet-stream" => Ok(()),
        Some(t) => Err(ApiError::UnsupportedMediaType(format!("Content-Type `{t}`: send application/json or application/octet-stream (binary tensor data)"))),
    }
}

/// `POST /v2/models/{name}[/versions/{v}]/infer`.
async fn infer(state: AppState, name: &str, version: Option<u64>, headers: HeaderMap, body: Body) -> Result<Response, ApiError> {
    let started = Instant::now();
    let header_length = headers.get(HEADER_LENGTH).map(|v| v.to_str().ok().and_then(|s| s.trim().parse::<usize>().ok()).ok_or_else(|| bad("Inference-Header-Content-Length is not a byte count")));
    let checked = content_type_ok(&headers).and_then(|()| header_length.transpose()).and_then(|h| Ok((h, state.registry.resolve(name, version)?)));
    let ((header_length, served), body) = or_discard(checked, body).await?;
    let deadline = request_deadline(&state);
    let (body, _body_memory) = read_body(&state, &headers, body, deadline).await?;
    let (max_pixels, max_instances) = (state.limits.max_pixels, state.limits.max_instances);
    let (sources, outputs) = blocking(&state, move || parse(&body, header_length, max_pixels, max_instances)).await?;
    let timing = Timing { decode: started.elapsed(), ..Default::default() };
    run(&state, &served, sources, Answer::V2(outputs), timing, deadline).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_pixels_and_binary_bytes_parse_with_their_outputs() {
        let body = br#"{"inputs":[{"name":"image","shape":[1,2,2,3],"datatype":"UINT8","data":[[1,2,3,4,5,6],[7,8,9,10,11,12]]}],"outputs":[{"name":"mask"}]}"#;
        let (sources, outputs) = parse(body, None, 100, 4).unwrap();
        assert_eq!(outputs, Outputs { mask: Out::Json, probabilities: Out::No });
        match &sources[..] {
            [Source::Pixels(img)] => assert_eq!(img.as_raw(), &(1..=12).collect::<Vec<u8>>()),
            _ => panic!("one pixel image"),
        }
        // Wrong counts, values, shapes and datatypes are refused by name.
        for (bad_body, needle) in [
            (r#"{"inputs":[{"name":"image","shape":[1,2,2,3],"datatype":"UINT8","data":[1,2,3]}]}"#, "3 values"),
            (r#"{"inputs":[{"name":"image","shape":[1,2,2,3],"datatype":"UINT8","data":[300]}]}"#, "not a UINT8"),
            (r#"{"inputs":[{"name":"image","shape":[2,2,3],"datatype":"UINT8","data":[]}]}"#, "[N, H, W, 3]"),
            (r#"{"inputs":[{"name":"image","shape":[1],"datatype":"FP32","data":[1.0]}]}"#, "FP32"),
            (r#"{"inputs":[{"name":"image","shape":[1,9,9,3],"datatype":"UINT8","data":[]}]}"#, "serve.max_pixels"),
            (r#"{"inputs":[]}"#, "0 inputs"),
            (r#"{"inputs":[{"name":"image","shape":[1,1,1,3],"datatype":"UINT8","data":[1,2,3]}],"outputs":[{"name":"logits"}]}"#, "unknown output"),
        ] {
            let err = parse(bad_body.as_bytes(), None, 50, 4).err().unwrap().to_string();
            assert!(err.contains(needle), "{bad_body}: {err}");
        }
        // Binary BYTES: length-prefixed elements after the JSON header; outputs binary.
        let header = br#"{"inputs":[{"name":"image_bytes","shape":[1],"datatype":"BYTES","parameters":{"binary_data_size":12}}],"parameters":{"binary_data_output":true}}"#;
        let mut body = header.to_vec();
        body.extend_from_slice(&8u32.to_le_bytes());
        body.extend_from_slice(b"notimage");
        let err = parse(&body, Some(header.len()), 100, 4).err().unwrap().to_string();
        assert!(err.contains("image_bytes"), "{err}");
        let mut truncated = header.to_vec();
        truncated.extend_from_slice(&100u32.to_le_bytes());
        assert!(parse(&truncated, Some(header.len()), 100, 4).is_err());
    }
}
