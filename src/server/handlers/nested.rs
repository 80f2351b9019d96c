//! Streaming parsers of the JSON request bodies: images sent as `H×W×3` nested numbers go
//! straight into pixel buffers (never into a `serde_json::Value` tree, which costs ~100 bytes
//! per pixel), with the request's pixel cap enforced while parsing.

use std::cell::Cell;
use std::fmt;

use image::RgbImage;
use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

use crate::server::error::ApiError;

/// `/infer`'s body.
pub struct InferBody {
    pub image: RgbImage,
    pub model: Option<String>,
    pub version: Option<u64>,
}

/// One `:predict` instance.
pub enum Instance {
    B64(String),
    Pixels(RgbImage),
}

/// `:predict`'s body.
pub struct PredictBody {
    pub instances: Vec<Instance>,
}

/// Marks the error of a request over the pixel cap (413, not 400).
const OVER_PIXELS: &str = "\u{1}over-pixels\u{1}";
/// Marks the error of a request with too many instances (413).
const OVER_INSTANCES: &str = "\u{1}over-instances\u{1}";

fn map_error(e: serde_json::Error, max_pixels: u64) -> ApiError {
    let text = e.to_string();
    if text.contains(OVER_PIXELS) {
        return ApiError::TooLarge(format!("the images hold more than {max_pixels} pixels in all (serve.max_pixels)"));
    }
    if text.contains(OVER_INSTANCES) {
        return ApiError::TooLarge("too many instances in one request; the limit is serve.queue_capacity".into());
    }
    if e.is_eof() && text.starts_with("EOF while parsing a value at line 1 column 0") {
        return ApiError::BadRequest("empty body: send a JSON document".into());
    }
    ApiError::BadRequest(format!("invalid request: {text}"))
}

/// Parses `{"image": [[[r,g,b], …], …], "model"?: "…", "version"?: n | "n"}`.
pub fn parse_infer(body: &[u8], max_pixels: u64) -> Result<InferBody, ApiError> {
    let budget = Cell::new(max_pixels);
    let mut de = serde_json::Deserializer::from_slice(body);
    let parsed = InferSeed { budget: &budget }.deserialize(&mut de).and_then(|b| de.end().map(|_| b)).map_err(|e| map_error(e, max_pixels))?;
    parsed.ok_or_else(|| ApiError::BadRequest("missing `image`: send {\"image\": [[[r,g,b], ...], ...]}".into()))
}

/// Parses `{"instances": [ [[[r,g,b], …], …] | {"b64": "…"}, … ]}` (other keys ignored).
pub fn parse_predict(body: &[u8], max_pixels: u64, max_instances: usize) -> Result<PredictBody, ApiError> {
    let budget = Cell::new(max_pixels);
    let mut de = serde_json::Deserializer::from_slice(body);
    let parsed = PredictSeed { budget: &budget, max_instances }
        .deserialize(&mut de)
        .and_then(|b| de.end().map(|_| b))
        .map_err(|e| map_error(e, max_pixels))?;
    let instances = parsed.ok_or_else(|| ApiError::BadRequest("expected {\"instances\": [...]}".into()))?;
    if instances.is_empty() {
        return Err(ApiError::BadRequest("`instances` is empty".into()));
    }
    Ok(PredictBody { instances })
}

struct InferSeed<'a> {
    budget: &'a Cell<u64>,
}

impl<'de> DeserializeSeed<'de> for InferSeed<'_> {
    type Value = Option<InferBody>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for InferSeed<'_> {
    type Value = Option<InferBody>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object {\"image\": ...}")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let (mut image, mut model, mut version) = (None, None, None);
        while let Some(key) = map.next_key::<String>()? {
            match key.as_str() {
                "image" => image = Some(map.next_value_seed(PixelsSeed { budget: self.budget, what: "`image`" })?),
                "model" => model = Some(map.next_value::<String>()?),
                "version" => version = Some(map.next_value_seed(VersionNumber)?),
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(image.map(|image| InferBody { image, model, version }))
    }
}

/// `version`: a number or a string of digits; anything else is refused at its first token,
/// without being parsed into a tree.
struct VersionNumber;

impl<'de> DeserializeSeed<'de> for VersionNumber {
    type Value = u64;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<u64, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for VersionNumber {
    type Value = u64;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("`version` as a version number")
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<u64, E> {
        Ok(v)
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<u64, E> {
        v.parse().map_err(|_| E::custom("`version` must be a version number"))
    }
}

struct PredictSeed<'a> {
    budget: &'a Cell<u64>,
    max_instances: usize,
}

impl<'de> DeserializeSeed<'de> for PredictSeed<'_> {
    type Value = Option<Vec<Instance>>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for PredictSeed<'_> {
    type Value = Option<Vec<Instance>>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object {\"instances\": [...]}")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut instances = None;
        while let Some(key) = map.next_key::<String>()? {
            if key == "instances" {
                instances = Some(map.next_value_seed(InstancesSeed { budget: self.budget, max: self.max_instances })?);
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(instances)
    }
}

struct InstancesSeed<'a> {
    budget: &'a Cell<u64>,
    max: usize,
}

impl<'de> DeserializeSeed<'de> for InstancesSeed<'_> {
    type Value = Vec<Instance>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for InstancesSeed<'_> {
    type Value = Vec<Instance>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("`instances`: an array of images")
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut out = Vec::new();
        while let Some(instance) = seq.next_element_seed(InstanceSeed { budget: self.budget, index: out.len() })? {
            out.push(instance);
            if out.len() > self.max {
                return Err(de::Error::custom(OVER_INSTANCES));
            }
        }
        Ok(out)
    }
}

struct InstanceSeed<'a> {
    budget: &'a Cell<u64>,
    index: usize,
}

impl<'de> DeserializeSeed<'de> for InstanceSeed<'_> {
    type Value = Instance;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for InstanceSeed<'_> {
    type Value = Instance;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "instances[{}]: an H×W×3 array of numbers in 0-255 or {{\"b64\": \"...\"}}", self.index)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut b64 = None;
        while let Some(key) = map.next_key::<String>()? {
            if key == "b64" {
                b64 = Some(map.next_value::<String>()?);
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        b64.map(Instance::B64).ok_or_else(|| de::Error::custom(format!("instances[{}]: an object must be {{\"b64\": \"...\"}}", self.index)))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
        let what = format!("instances[{}]", self.index);
        PixelsSeed { budget: self.budget, what: &what }.visit_seq(seq).map(Instance::Pixels)
    }
}

/// An `H×W×3` array into an image, charging its pixels to the request's budget.
struct PixelsSeed<'a> {
    budget: &'a Cell<u64>,
    what: &'a str,
}

impl<'de> DeserializeSeed<'de> for PixelsSeed<'_> {
    type Value = RgbImage;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for PixelsSeed<'_> {
    type Value = RgbImage;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "{}: an H×W×3 array of numbers in 0-255", self.what)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut data = Vec::new();
        let mut width: Option<usize> = None;
        let mut height = 0usize;
        while let Some(n) = seq.next_element_seed(RowSeed { budget: self.budget, data: &mut data, what: self.what, row: height })? {
            match width {
                None => width = Some(n),
                Some(w) if w != n => {
                    return Err(de::Error::custom(format!("{}: row {height} has {n} pixels, row 0 has {w}", self.what)));
                }
                _ => {}
            }
            height += 1;
        }
        let width = width.unwrap_or(0);
        if width == 0 || height == 0 {
            return Err(de::Error::custom(format!("{}: empty image; expected an H×W×3 array of numbers in 0-255", self.what)));
        }
        RgbImage::from_raw(width as u32, height as u32, data).ok_or_else(|| de::Error::custom("image buffer size"))
    }
}

/// One row: appends its pixels, returns how many.
struct RowSeed<'a> {
    budget: &'a Cell<u64>,
    data: &'a mut Vec<u8>,
    what: &'a str,
    row: usize,
}

impl<'de> DeserializeSeed<'de> for RowSeed<'_> {
    type Value = usize;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for RowSeed<'_> {
    type Value = usize;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "{}: row {} as an array of [r, g, b] pixels", self.what, self.row)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut n = 0usize;
        while let Some(px) = seq.next_element::<[f64; 3]>()? {
            let left = self.budget.get();
            if left == 0 {
                return Err(de::Error::custom(OVER_PIXELS));
            }
            self.budget.set(left - 1);
            for v in px {
                if !(0.0..=255.0).contains(&v) {
                    return Err(de::Error::custom(format!("{}: pixel ({n}, {}) holds {v}, outside 0-255", self.what, self.row)));
                }
                self.data.push(v.round() as u8);
            }
            n += 1;
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nested_images_are_parsed_and_checked() {
        let ok = br#"{"image": [[[0, 1, 2], [3, 4, 5]], [[6, 7, 8], [9, 10, 255]]], "version": "2", "extra": {"x": 1}}"#;
        let body = parse_infer(ok, 100).unwrap();
        assert_eq!(body.image.dimensions(), (2, 2));
        assert_eq!(body.image.get_pixel(1, 1).0, [9, 10, 255]);
        assert_eq!(body.version, Some(2));
        for bad in [
            &br#"{"image": [[[0, 1]]]}"#[..],
            br#"{"image": [[[0, 1, 2]], [[0, 1, 2], [0, 1, 2]]]}"#,
            br#"{"image": [[[0, 1, 300]]]}"#,
            br#"{"image": "x"}"#,
            br#"{"image": []}"#,
            br#"{"image": [[["a", 1, 2]]]}"#,
            br#"{"picture": 1}"#,
            b"",
            b"{not json",
        ] {
            assert!(matches!(parse_infer(bad, 100), Err(ApiError::BadRequest(_))), "{}", String::from_utf8_lossy(bad));
        }
        assert!(matches!(parse_infer(ok, 3), Err(ApiError::TooLarge(_))));
    }

    #[test]
    fn predict_instances_share_the_pixel_cap() {
        let one = r#"[[[1, 2, 3], [4, 5, 6]]]"#;
        let body = format!(r#"{{"instances": [{one}, {{"b64": "AAAA"}}, {one}], "signature_name": "x"}}"#);
        let parsed = parse_predict(body.as_bytes(), 4, 8).unwrap();
        assert_eq!(parsed.instances.len(), 3);
        assert!(matches!(parsed.instances[1], Instance::B64(ref s) if s == "AAAA"));
        assert!(matches!(parse_predict(body.as_bytes(), 3, 8), Err(ApiError::TooLarge(_))));
        assert!(matches!(parse_predict(body.as_bytes(), 4, 2), Err(ApiError::TooLarge(_))));
        assert!(matches!(parse_predict(br#"{"instances": []}"#, 4, 2), Err(ApiError::BadRequest(_))));
        assert!(matches!(parse_predict(br#"{"inputs": []}"#, 4, 2), Err(ApiError::BadRequest(_))));
    }
}
