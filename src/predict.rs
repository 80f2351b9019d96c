//! `predict`: segments photos (files or folders) with a local model or through a running
//! `segctl serve` (the client), writing per photo a class-id mask PNG and a colour mask PNG at
//! the photo's own size (EXIF orientation applied), plus optional overlay and side-by-side
//! figures. Unreadable inputs are reported and skipped.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use image::{GrayImage, RgbImage};
use rayon::prelude::*;
use serde::Serialize;

use crate::data::image_io::{self, DecodeOptions};
use crate::infer::{self, Predictor};
use crate::progress::{ProgressMode, Unit};
use crate::storage;

/// Extensions picked up from folders.
const IMAGE_EXTENSIONS: [&str; 4] = ["jpg", "jpeg", "png", "gif"];

/// Where masks come from.
pub enum Backend<'a> {
    Local(&'a Predictor),
    /// A running server: base URL, model name (none = the server's default model), and the
    /// bearer token it asks for, if any.
    Server { url: String, model: Option<String>, timeout: Duration, token: Option<String> },
}

/// What to write.
#[derive(Debug, Clone)]
pub struct PredictOptions {
    pub inputs: Vec<PathBuf>,
    pub out_dir: PathBuf,
    pub overlay: bool,
    pub side_by_side: bool,
    pub batch_size: usize,
    pub max_pixels: u64,
    /// Most scans of a progressive JPEG (`serve.max_jpeg_scans`).
    pub max_jpeg_scans: u32,
    /// Decode JPEGs for a local model at a reduced DCT scale (`serve.jpeg_dct_scaling`), as
    /// `serve` does, so both give the same masks.
    pub jpeg_dct_scaling: bool,
    /// Largest input file read (`serve.max_body_bytes`).
    pub max_input_bytes: u64,
    /// Only this share of the inputs (`--shard INDEX/COUNT`); `None` = all of them.
    pub shard: Option<Shard>,
    pub progress: ProgressMode,
}

/// One of `count` deterministic shares of the inputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
}

impl Shard {
    /// `INDEX/COUNT`, 0-based.
    pub fn parse(text: &str) -> Result<Shard> {
        let (i, n) = text.split_once('/').with_context(|| format!("--shard `{text}`: expected INDEX/COUNT, e.g. 0/3"))?;
        let index: usize = i.trim().parse().with_context(|| format!("--shard `{text}`: `{i}` is not a shard index"))?;
        let count: usize = n.trim().parse().with_context(|| format!("--shard `{text}`: `{n}` is not a shard count"))?;
        Shard::new(index, count).with_context(|| format!("--shard `{text}`"))
    }

    pub fn new(index: usize, count: usize) -> Result<Shard> {
        if count == 0 || index >= count {
            bail!("shard {index} of {count}: the index must be below the count (0-based)");
        }
        Ok(Shard { index, count })
    }

    /// Whether `input` belongs to this shard: by a stable hash of its path (FNV-1a), so every
    /// pod agrees whatever order it listed the inputs in, and adding inputs moves no others.
    pub fn owns(&self, input: &Path) -> bool {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in input.as_os_str().as_encoded_bytes() {
            h = (h ^ *b as u64).wrapping_mul(0x0000_0100_0000_01b3);
        }
        (h % self.count as u64) as usize == self.index
    }
}

/// File name of a shard's summary in the output folder.
pub fn shard_summary_name(shard: Shard) -> String {
    format!("shard-{}-of-{}.json", shard.index, shard.count)
}

/// Files written for one photo.
#[derive(Debug, Clone, Serialize)]
pub struct PredictedImage {
    pub input: PathBuf,
    pub width: u32,
    pub height: u32,
    pub mask: PathBuf,
    pub color: PathBuf,
    pub overlay: Option<PathBuf>,
    pub side_by_side: Option<PathBuf>,
    /// Share of each class, in class order.
    pub class_fractions: Vec<f64>,
}

/// A photo that could not be segmented.
#[derive(Debug, Clone, Serialize)]
pub struct PredictFailure {
    pub input: PathBuf,
    pub error: String,
}

/// What `predict` did.
#[derive(Debug, Clone, Serialize)]
pub struct PredictReport {
    pub model: String,
    pub out_dir: PathBuf,
    pub images: Vec<PredictedImage>,
    pub failures: Vec<PredictFailure>,
    pub elapsed_s: f64,
    pub images_per_s: f64,
    /// With `--shard`: which share, how many inputs it holds, and how many were already done
    /// (their outputs existed: a retried pod resumes).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shard: Option<Shard>,
    pub inputs: usize,
    pub skipped_existing: Vec<PathBuf>,
}

/// Largest list file read.
const MAX_LIST_BYTES: u64 = 256 << 20;

/// Reads a list file (local or in a bucket): one image path or URL per line (blank lines and
/// `#` comments skipped).
fn read_list(path: &Path) -> Result<Vec<PathBuf>> {
    let text = match storage::remote(path)? {
        Some(remote) => {
            let (dir, name) = remote.split_last().with_context(|| format!("`{}` names no object", path.display()))?;
            String::from_utf8(dir.read(&name, MAX_LIST_BYTES)?).with_context(|| format!("`{}` is not UTF-8 text", path.display()))?
        }
        None => crate::util::fs::read_to_string(path)?,
    };
    Ok(text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).map(PathBuf::from).collect())
}

fn has_image_extension(name: &str) -> bool {
    Path::new(name).extension().and_then(|e| e.to_str()).is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

/// The bytes of an input: a local file, or an object in a bucket.
fn read_input(input: &Path, max: u64) -> Result<Vec<u8>> {
    match storage::remote(input)? {
        Some(remote) => {
            let (dir, name) = remote.split_last().with_context(|| format!("`{}` names no object", input.display()))?;
            dir.read(&name, max)
        }
        None => {
            let path = storage::local_path(input);
            let size = std::fs::metadata(&path).with_context(|| format!("cannot read `{}`", path.display()))?.len();
            if size > max {
                bail!("`{}` is {size} bytes, more than the {max} allowed (serve.max_body_bytes)", path.display());
            }
            std::fs::read(&path).with_context(|| format!("cannot read `{}`", path.display()))
        }
    }
}

/// Expands folders and bucket prefixes into their image files (sorted) and `.txt` list files
/// into the paths and URLs they list, and keeps files and object URLs as given.
pub fn collect_inputs(inputs: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for input in inputs {
        let is_list = input.extension().is_some_and(|e| e.eq_ignore_ascii_case("txt"));
        if let Some(remote) = storage::remote(input)? {
            if is_list {
                out.extend(read_list(input)?);
            } else if remote.split_last().is_some_and(|(_, name)| has_image_extension(&name)) {
                out.push(input.clone());
            } else {
                let objects = remote.list()?;
                out.extend(objects.iter().filter(|o| has_image_extension(&o.rel)).map(|o| PathBuf::from(remote.child(&o.rel).url())));
            }
            continue;
        }
        let input = &storage::local_path(input);
        if input.is_dir() {
            let mut files: Vec<PathBuf> = std::fs::read_dir(input)
                .with_context(|| format!("failed to list `{}`", input.display()))?
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.is_file())
                .filter(|p| {
                    p.extension().and_then(|e| e.to_str()).is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
                })
                .collect();
            files.sort();
            out.extend(files);
        } else if is_list {
            out.extend(read_list(input)?);
        } else {
            out.push(input.clone());
        }
    }
    if out.is_empty() {
        bail!("no images to segment (give image files or folders holding .jpg/.png files)");
    }
    Ok(out)
}

/// Executes `segctl predict`.
pub fn predict(backend: &Backend, options: &PredictOptions) -> Result<PredictReport> {
    let start = Instant::now();
    let all_inputs = collect_inputs(&options.inputs)?;
    let out = Output::open(&options.out_dir)?;
    // Names over every input (so they do not depend on the shard), then this shard's share,
    // less what an earlier attempt already wrote.
    let all_names = output_names(&all_inputs);
    let (mut inputs, mut names, mut skipped) = (Vec::new(), Vec::new(), Vec::new());
    for (input, name) in all_inputs.into_iter().zip(all_names) {
        if options.shard.is_some_and(|s| !s.owns(&input)) {
            continue;
        }
        if options.shard.is_some() && outputs_exist(&name, options, &out) {
            skipped.push(input);
            continue;
        }
        inputs.push(input);
        names.push(name);
    }
    let assigned = inputs.len() + skipped.len();
    // A local model's input comes from a reduced-scale JPEG decode (as in `serve`); a server
    // decodes for itself, so here the photo is only needed at full size.
    let model_side = match backend {
        Backend::Local(p) if options.jpeg_dct_scaling => p.spec().input_size as u32,
        _ => u32::MAX,
    };
    let figures = options.overlay || options.side_by_side;
    let model = match backend {
        Backend::Local(p) => format!("{} ({})", p.origin().path.display(), p.spec().describe()),
        Backend::Server { url, model, .. } => format!("{url} ({})", model.as_deref().unwrap_or("default model")),
    };
    let bar = options.progress.bar("predict", Some(inputs.len() as u64), Unit::Items("images"));
    let mut images = Vec::new();
    let mut failures = Vec::new();
    for chunk in inputs.iter().zip(&names).collect::<Vec<_>>().chunks(options.batch_size.max(1)) {
        // Decode in parallel; failures are reported, the rest goes on.
        let decoded: Vec<(&PathBuf, &String, Result<(Decoded, Vec<u8>)>)> = chunk
            .par_iter()
            .map(|(path, name)| {
                let result = read_input(path, options.max_input_bytes)
                    .and_then(|bytes| Ok((decode_photo(&bytes, model_side, figures, options.max_pixels, options.max_jpeg_scans)?, bytes)));
                (*path, *name, result)
            })
            .collect();
        let mut ok = Vec::new();
        for (path, name, result) in decoded {
            match result {
                Ok((image, bytes)) => ok.push((path, name, image, bytes)),
                Err(e) => {
                    log::warn!("skipping `{}`: {e:#}", path.display());
                    failures.push(PredictFailure { input: path.clone(), error: format!("{e:#}") });
                    bar.inc(1);
                }
            }
        }
        let masks: Vec<Result<GrayImage>> = match backend {
            Backend::Local(predictor) => {
                let photos: Vec<(&RgbImage, u32, u32)> = ok.iter().map(|(_, _, d, _)| (&d.model_pixels, d.width, d.height)).collect();
                match predictor.segment_sized(&photos) {
                    Ok(m) => m.into_iter().map(Ok).collect(),
                    Err(e) => ok.iter().map(|_| Err(anyhow::anyhow!("{e:#}"))).collect(),
                }
            }
            Backend::Server { url, model, timeout, token } => ok
                .iter()
                .map(|(_, _, d, bytes)| segment_remote(url, model.as_deref(), *timeout, token.as_deref(), bytes, (d.width, d.height)))
                .collect(),
        };
        let written: Vec<Result<PredictedImage>> = ok
            .par_iter()
            .zip(masks)
            .map(|((path, name, d, _), mask)| write_outputs(path, name, d, &mask?, options, &out))
            .collect();
        for ((path, ..), result) in ok.iter().zip(written) {
            match result {
                Ok(done) => images.push(done),
                Err(e) => {
                    log::warn!("failed on `{}`: {e:#}", path.display());
                    failures.push(PredictFailure { input: (*path).clone(), error: format!("{e:#}") });
                }
            }
            bar.inc(1);
        }
    }
    bar.finish();
    let elapsed = start.elapsed().as_secs_f64();
    let report = PredictReport {
        model,
        out_dir: options.out_dir.clone(),
        images_per_s: images.len() as f64 / elapsed.max(1e-9),
        images,
        failures,
        elapsed_s: elapsed,
        shard: options.shard,
        inputs: assigned,
        skipped_existing: skipped,
    };
    if let Some(shard) = options.shard {
        out.write(&shard_summary_name(shard), serde_json::to_vec_pretty(&report)?)?;
    }
    Ok(report)
}

/// Where outputs go: a local folder, or a bucket prefix (each file one object, written whole).
enum Output {
    Local(PathBuf),
    /// The prefix, and the names already in it (listed once).
    Bucket(storage::Remote, HashSet<String>),
}

impl Output {
    fn open(out_dir: &Path) -> Result<Output> {
        match storage::remote(out_dir)? {
            Some(remote) => {
                let existing = remote.list()?.into_iter().map(|o| o.rel).collect();
                Ok(Output::Bucket(remote, existing))
            }
            None => {
                let dir = storage::local_path(out_dir);
                crate::util::fs::create_dir_all(&dir)?;
                Ok(Output::Local(dir))
            }
        }
    }

    fn path(&self, file: &str) -> PathBuf {
        match self {
            Output::Local(dir) => dir.join(file),
            Output::Bucket(remote, _) => PathBuf::from(remote.child(file).url()),
        }
    }

    fn exists(&self, file: &str) -> bool {
        match self {
            Output::Local(dir) => dir.join(file).is_file(),
            Output::Bucket(_, existing) => existing.contains(file),
        }
    }

    fn write(&self, file: &str, bytes: Vec<u8>) -> Result<()> {
        match self {
            Output::Local(dir) => crate::util::fs::write_atomic(&dir.join(file), &bytes),
            Output::Bucket(remote, _) => remote.put(file, bytes),
        }
    }
}

/// Every file `write_outputs` writes for `name` exists (they are written atomically, so an
/// existing one is complete).
fn outputs_exist(name: &str, options: &PredictOptions, out: &Output) -> bool {
    let mut suffixes = vec!["mask", "color"];
    if options.overlay {
        suffixes.push("overlay");
    }
    if options.side_by_side {
        suffixes.push("side_by_side");
    }
    suffixes.iter().all(|s| out.exists(&format!("{name}_{s}.png")))
}

/// Output base names: the file stem, made unique when two inputs share one.
fn output_names(inputs: &[PathBuf]) -> Vec<String> {
    let mut seen = HashSet::new();
    inputs
        .iter()
        .map(|p| {
            let stem = p.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "image".into());
            let mut name = stem.clone();
            let mut n = 2;
            while !seen.insert(name.clone()) {
                name = format!("{stem}-{n}");
                n += 1;
            }
            name
        })
        .collect()
}

/// A photo as predict needs it: the model's pixels, the displayed size, and the full-size
/// pixels when figures are drawn.
struct Decoded {
    model_pixels: RgbImage,
    width: u32,
    height: u32,
    full: Option<RgbImage>,
}

fn decode_photo(bytes: &[u8], model_side: u32, figures: bool, max_pixels: u64, max_jpeg_scans: u32) -> Result<Decoded> {
    let options = DecodeOptions { max_pixels, apply_exif_orientation: true, max_jpeg_scans };
    let photo = image_io::decode_rgb_for_model(bytes, options, model_side)?;
    let full = match (figures, photo.scale) {
        (false, _) => None,
        (true, 1) => Some(photo.image.clone()),
        (true, _) => Some(image_io::decode_rgb(bytes, options)?.image),
    };
    Ok(Decoded { model_pixels: photo.image, width: photo.width, height: photo.height, full })
}

fn write_outputs(input: &Path, name: &str, photo: &Decoded, mask: &GrayImage, options: &PredictOptions, out: &Output) -> Result<PredictedImage> {
    if mask.dimensions() != (photo.width, photo.height) {
        bail!("mask is {:?} but the photo is {:?}", mask.dimensions(), (photo.width, photo.height));
    }
    let figure = || photo.full.as_ref().context("the photo was not decoded for figures");
    let file = |suffix: &str| format!("{name}_{suffix}.png");
    let path = |suffix: &str| out.path(&file(suffix));
    out.write(&file("mask"), infer::encode_png(mask)?)?;
    out.write(&file("color"), infer::encode_png(&infer::colorize(mask))?)?;
    let overlay = if options.overlay {
        out.write(&file("overlay"), infer::encode_png(&infer::overlay(figure()?, mask))?)?;
        Some(path("overlay"))
    } else {
        None
    };
    let side_by_side = if options.side_by_side {
        out.write(&file("side_by_side"), infer::encode_png(&infer::side_by_side(figure()?, mask))?)?;
        Some(path("side_by_side"))
    } else {
        None
    };
    Ok(PredictedImage {
        input: input.to_path_buf(),
        width: photo.width,
        height: photo.height,
        mask: path("mask"),
        color: path("color"),
        overlay,
        side_by_side,
        class_fractions: infer::class_fractions(mask, crate::config::CLASS_NAMES.len()),
    })
}

/// Sends the original file bytes to `<url>/v1/models/<name>:segment` and reads back the
/// class-id mask PNG (the server applies EXIF orientation too, so sizes agree).
fn segment_remote(url: &str, model: Option<&str>, timeout: Duration, token: Option<&str>, bytes: &[u8], size: (u32, u32)) -> Result<GrayImage> {
    let base = url.trim_end_matches('/');
    let agent = ureq::AgentBuilder::new().timeout(timeout).build();
    let authorization = token.map(|t| format!("Bearer {t}"));
    let name = match model {
        Some(m) => m.to_string(),
        None => default_remote_model(&agent, base, authorization.as_deref())?,
    };
    let endpoint = format!("{base}/v1/models/{name}:segment");
    let mut request = agent.post(&endpoint).set("Content-Type", "application/octet-stream").set("Accept", "image/png");
    if let Some(a) = &authorization {
        request = request.set("Authorization", a);
    }
    let response = match request.send_bytes(bytes) {
        Ok(r) => r,
        Err(ureq::Error::Status(code, r)) => {
            let body = r.into_string().unwrap_or_default();
            let message = serde_json::from_str::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_string))
                .unwrap_or(body);
            bail!("{endpoint}: HTTP {code}: {message}");
        }
        Err(e) => bail!("{endpoint}: {e}"),
    };
    let mut png = Vec::new();
    std::io::Read::read_to_end(&mut response.into_reader(), &mut png).with_context(|| format!("{endpoint}: reading the answer"))?;
    let mask = image::load_from_memory_with_format(&png, image::ImageFormat::Png)
        .with_context(|| format!("{endpoint}: the answer is not a PNG"))?
        .to_luma8();
    if mask.dimensions() != size {
        bail!("{endpoint}: mask is {:?}, the photo {size:?}", mask.dimensions());
    }
    Ok(mask)
}

fn default_remote_model(agent: &ureq::Agent, base: &str, authorization: Option<&str>) -> Result<String> {
    let url = format!("{base}/v1/models");
    let mut request = agent.get(&url);
    if let Some(a) = authorization {
        request = request.set("Authorization", a);
    }
    let list: serde_json::Value = request
        .call()
        .with_context(|| format!("cannot reach `{url}`"))?
        .into_json()
        .with_context(|| format!("`{url}` did not answer JSON"))?;
    let models = list.get("models").and_then(|m| m.as_array()).cloned().unwrap_or_default();
    let pick = models.iter().find(|m| m.get("default").and_then(|d| d.as_bool()) == Some(true)).or(models.first());
    pick.and_then(|m| m.get("name")).and_then(|n| n.as_str()).map(str::to_string).with_context(|| format!("`{url}` lists no models"))
}
