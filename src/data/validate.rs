//! `validate`: checks every sample of a dataset root against the contract (decodable image,
//! RGB after conversion, single-channel trimap of the image's size holding only {1,2,3}, split
//! rows naming existing pairs, every pair in a split, no duplicates, no stray files), in
//! parallel, and gathers the statistics a data engineer looks at first.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Result, bail};
use rayon::prelude::*;
use serde::Serialize;

use super::image_io::{self, ColorNote, DecodeError, FileFormat, MaskError};
use super::{DatasetLayout, SplitFile, parse_split_text};
use crate::config::CLASS_NAMES;
use crate::progress::{ProgressMode, Unit};

/// What to check.
#[derive(Debug, Clone)]
pub struct ValidateOptions {
    pub root: PathBuf,
    /// Errors tolerated before the report says "failed".
    pub max_errors: usize,
    pub progress: ProgressMode,
}

/// One problem found.
#[derive(Debug, Clone, Serialize, PartialEq, Eq, PartialOrd, Ord)]
pub struct Finding {
    /// Sample stem, when the problem belongs to one.
    pub stem: Option<String>,
    /// Machine-readable kind, e.g. `image_truncated`.
    pub code: &'static str,
    /// File concerned, relative to the root.
    pub file: Option<String>,
    pub message: String,
}

/// Minimum, median and maximum of a quantity.
#[derive(Debug, Clone, Copy, Serialize, Default, PartialEq)]
pub struct Spread {
    pub min: u32,
    pub median: u32,
    pub max: u32,
}

impl Spread {
    fn of(mut values: Vec<u32>) -> Self {
        if values.is_empty() {
            return Spread::default();
        }
        values.sort_unstable();
        Spread { min: values[0], median: values[values.len() / 2], max: values[values.len() - 1] }
    }
}

/// Rows in a split file, and how many of them name a valid pair.
#[derive(Debug, Clone, Serialize, Default)]
pub struct SplitCount {
    pub rows: usize,
    pub valid: usize,
}

/// Image size distribution.
#[derive(Debug, Clone, Serialize, Default)]
pub struct ImageSizes {
    pub width: Spread,
    pub height: Spread,
}

/// The full result of `validate`.
#[derive(Debug, Clone, Serialize)]
pub struct ValidationReport {
    pub root: PathBuf,
    /// `true` when errors ≤ `max_errors`.
    pub passed: bool,
    pub max_errors: usize,
    pub images: usize,
    pub masks: usize,
    /// Stems with both an image and a trimap.
    pub pairs: usize,
    /// Pairs that decode and satisfy the contract.
    pub valid_pairs: usize,
    pub splits: BTreeMap<&'static str, SplitCount>,
    /// Share of each class among the pixels of valid pairs.
    pub class_pixel_fractions: BTreeMap<&'static str, f64>,
    pub image_sizes: ImageSizes,
    pub error_count: usize,
    pub warning_count: usize,
    pub errors_by_code: BTreeMap<&'static str, usize>,
    pub warnings_by_code: BTreeMap<&'static str, usize>,
    pub errors: Vec<Finding>,
    pub warnings: Vec<Finding>,
    pub elapsed_s: f64,
    pub samples_per_s: f64,
}

#[derive(Default)]
struct PairResult {
    errors: Vec<Finding>,
    warnings: Vec<Finding>,
    size: Option<(u32, u32)>,
    class_pixels: [u64; 3],
    valid: bool,
}

fn finding(stem: Option<&str>, code: &'static str, file: Option<String>, message: String) -> Finding {
    Finding { stem: stem.map(str::to_string), code, file, message }
}

/// Runs every check. Fails (exit 2 in the CLI) only when the root is not a dataset at all.
pub fn validate(options: &ValidateOptions) -> Result<ValidationReport> {
    let localized = ValidateOptions { root: crate::storage::localize(&options.root)?, ..options.clone() };
    let options = &localized;
    let start = Instant::now();
    let layout = DatasetLayout::new(&options.root);
    if !options.root.is_dir() {
        bail!("dataset root `{}` does not exist; run `segctl fetch-data` first", options.root.display());
    }
    for dir in [layout.images_dir(), layout.trimaps_dir()] {
        if !dir.is_dir() {
            bail!("`{}` is missing: `{}` is not a dataset root", dir.display(), options.root.display());
        }
    }
    let mut errors = Vec::new();
    let mut warnings = Vec::new();

    let images = list_stems(&layout.images_dir(), "jpg", "images", &mut errors)?;
    let masks = list_stems(&layout.trimaps_dir(), "png", "annotations/trimaps", &mut errors)?;
    check_case_duplicates(&images, "images", "jpg", &mut errors);

    // Split files.
    let mut split_stems: BTreeMap<SplitFile, Vec<String>> = BTreeMap::new();
    for file in SplitFile::ALL {
        let path = layout.split_file(file);
        let rel = format!("annotations/{}", file.file_name());
        let text = match std::fs::read(&path) {
            Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
            Err(_) => {
                errors.push(finding(None, "split_file_missing", Some(rel), format!("split file `{}` is missing", file.file_name())));
                continue;
            }
        };
        let (rows, bad_rows) = parse_split_text(&text);
        for bad in bad_rows {
            errors.push(finding(
                None,
                "split_row_malformed",
                Some(rel.clone()),
                format!("line {}: `{}`: {}", bad.line, bad.text, bad.reason),
            ));
        }
        let mut seen = BTreeSet::new();
        for row in &rows {
            if !seen.insert(row.stem.clone()) {
                errors.push(finding(Some(&row.stem), "split_duplicate_row", Some(rel.clone()), format!("listed more than once in {}", file.file_name())));
            }
        }
        for stem in &seen {
            let missing: Vec<&str> = [(images.contains(stem), "image"), (masks.contains(stem), "trimap")]
                .iter()
                .filter(|(present, _)| !present)
                .map(|(_, what)| *what)
                .collect();
            if !missing.is_empty() {
                errors.push(finding(
                    Some(stem),
                    "split_row_missing_files",
                    Some(rel.clone()),
                    format!("{} names a sample whose {} is missing", file.file_name(), missing.join(" and ")),
                ));
            }
        }
        split_stems.insert(file, seen.into_iter().collect());
    }
    let trainval: BTreeSet<&String> = split_stems.get(&SplitFile::Trainval).map(|v| v.iter().collect()).unwrap_or_default();
    let test: BTreeSet<&String> = split_stems.get(&SplitFile::Test).map(|v| v.iter().collect()).unwrap_or_default();
    for stem in trainval.intersection(&test) {
        errors.push(finding(Some(stem), "split_overlap", None, "listed in both trainval.txt and test.txt (test data leaks into training)".into()));
    }
    if let Some(list) = split_stems.get(&SplitFile::List) {
        let list: BTreeSet<&String> = list.iter().collect();
        for stem in trainval.union(&test) {
            if !list.contains(stem) {
                warnings.push(finding(Some(stem), "not_in_list", Some("annotations/list.txt".into()), "in a split file but not in list.txt".into()));
            }
        }
    }

    // Pairs.
    let all_stems: BTreeSet<&String> = images.iter().chain(masks.iter()).collect();
    let mut pairs = 0;
    for stem in &all_stems {
        match (images.contains(*stem), masks.contains(*stem)) {
            (true, false) => errors.push(finding(Some(stem), "mask_missing", Some(format!("annotations/trimaps/{stem}.png")), "image has no trimap".into())),
            (false, true) => errors.push(finding(Some(stem), "image_missing", Some(format!("images/{stem}.jpg")), "trimap has no image".into())),
            _ => {
                pairs += 1;
                if !trainval.contains(stem) && !test.contains(stem) {
                    errors.push(finding(Some(stem), "not_in_any_split", None, "pair is in neither trainval.txt nor test.txt".into()));
                }
            }
        }
    }

    // Decode every image and trimap in parallel.
    let bar = options.progress.bar("validate", Some(all_stems.len() as u64), Unit::Items("samples"));
    let results: Vec<(String, PairResult)> = all_stems
        .par_iter()
        .map(|stem| {
            let result = check_pair(&layout, stem, images.contains(*stem), masks.contains(*stem));
            bar.inc(1);
            ((*stem).clone(), result)
        })
        .collect();
    bar.finish();

    let mut class_pixels = [0u64; 3];
    let mut widths = Vec::new();
    let mut heights = Vec::new();
    let mut valid_stems = BTreeSet::new();
    for (stem, result) in results {
        errors.extend(result.errors);
        warnings.extend(result.warnings);
        if let Some((w, h)) = result.size {
            widths.push(w);
            heights.push(h);
        }
        if result.valid {
            for c in 0..3 {
                class_pixels[c] += result.class_pixels[c];
            }
            valid_stems.insert(stem);
        }
    }
    let total_pixels: u64 = class_pixels.iter().sum();
    let class_pixel_fractions = CLASS_NAMES
        .iter()
        .zip(class_pixels)
        .map(|(name, n)| (*name, if total_pixels > 0 { n as f64 / total_pixels as f64 } else { 0.0 }))
        .collect();
    let splits = split_stems
        .iter()
        .map(|(file, stems)| {
            (file.name(), SplitCount { rows: stems.len(), valid: stems.iter().filter(|s| valid_stems.contains(*s)).count() })
        })
        .collect();

    errors.sort();
    warnings.sort();
    let count_codes = |findings: &[Finding]| {
        let mut counts = BTreeMap::new();
        for f in findings {
            *counts.entry(f.code).or_insert(0) += 1;
        }
        counts
    };
    let elapsed = start.elapsed().as_secs_f64();
    Ok(ValidationReport {
        root: options.root.clone(),
        passed: errors.len() <= options.max_errors,
        max_errors: options.max_errors,
        images: images.len(),
        masks: masks.len(),
        pairs,
        valid_pairs: valid_stems.len(),
        splits,
        class_pixel_fractions,
        image_sizes: ImageSizes { width: Spread::of(widths), height: Spread::of(heights) },
        error_count: errors.len(),
        warning_count: warnings.len(),
        errors_by_code: count_codes(&errors),
        warnings_by_code: count_codes(&warnings),
        errors,
        warnings,
        elapsed_s: elapsed,
        samples_per_s: all_stems.len() as f64 / elapsed.max(1e-9),
    })
}

/// Stems of `dir/<stem>.<ext>`; anything else in the folder is reported as a stray file.
fn list_stems(dir: &Path, ext: &str, rel: &str, errors: &mut Vec<Finding>) -> Result<BTreeSet<String>> {
    let mut stems = BTreeSet::new();
    let entries = std::fs::read_dir(dir).map_err(|e| anyhow::anyhow!("failed to list `{}`: {e}", dir.display()))?;
    for entry in entries {
        let entry = entry.map_err(|e| anyhow::anyhow!("failed to list `{}`: {e}", dir.display()))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let is_file = entry.file_type().map(|t| t.is_file()).unwrap_or(false);
        let stem = name.strip_suffix(&format!(".{ext}"));
        match stem {
            Some(stem) if is_file && !stem.is_empty() && !name.starts_with('.') => {
                stems.insert(stem.to_string());
            }
            _ => {
                let why = if name.starts_with("._") {
                    "macOS metadata file (AppleDouble), not an image".to_string()
                } else if !is_file {
                    "not a regular file".to_string()
                } else {
                    format!("not a `<name>.{ext}` file")
                };
                errors.push(finding(None, "stray_file", Some(format!("{rel}/{name}")), why));
            }
        }
    }
    Ok(stems)
}

/// Stems that differ only in case collide on case-insensitive file systems, and case carries
/// meaning here (capitalised = cat).
fn check_case_duplicates(stems: &BTreeSet<String>, rel: &str, ext: &str, errors: &mut Vec<Finding>) {
    let mut by_lower: BTreeMap<String, Vec<&String>> = BTreeMap::new();
    for stem in stems {
        by_lower.entry(stem.to_lowercase()).or_default().push(stem);
    }
    for group in by_lower.values().filter(|g| g.len() > 1) {
        for stem in group {
            errors.push(finding(
                Some(stem),
                "duplicate_stem",
                Some(format!("{rel}/{stem}.{ext}")),
                format!("names differ only in case: {}", group.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")),
            ));
        }
    }
}

fn check_pair(layout: &DatasetLayout, stem: &str, has_image: bool, has_mask: bool) -> PairResult {
    let mut result = PairResult::default();
    let image_rel = format!("images/{stem}.jpg");
    let mask_rel = format!("annotations/trimaps/{stem}.png");
    let mut image_ok = false;
    if has_image {
        match std::fs::read(layout.image_path(stem)) {
            Err(e) => result.errors.push(finding(Some(stem), "image_unreadable", Some(image_rel.clone()), format!("cannot read: {e}"))),
            Ok(bytes) => {
                let format = image_io::sniff(&bytes);
                if matches!(format, FileFormat::Png | FileFormat::Gif) {
                    result.errors.push(finding(
                        Some(stem),
                        "image_format_mismatch",
                        Some(image_rel.clone()),
                        format!("file is {format}, not JPEG (decoded by content)"),
                    ));
                }
                match image_io::decode_rgb(&bytes, image_io::DecodeOptions::default()) {
                    Ok(decoded) => {
                        image_ok = true;
                        result.size = Some(decoded.image.dimensions());
                        for note in decoded.notes {
                            result.warnings.push(finding(Some(stem), color_code(note), Some(image_rel.clone()), note.describe().into()));
                        }
                    }
                    Err(e) => {
                        let code = match e {
                            DecodeError::Truncated(_) => "image_truncated",
                            DecodeError::NotAnImage | DecodeError::Empty => "image_not_an_image",
                            _ => "image_corrupt",
                        };
                        result.errors.push(finding(Some(stem), code, Some(image_rel.clone()), e.to_string()));
                    }
                }
            }
        }
    }
    if has_mask {
        match std::fs::read(layout.mask_path(stem)) {
            Err(e) => result.errors.push(finding(Some(stem), "mask_unreadable", Some(mask_rel.clone()), format!("cannot read: {e}"))),
            Ok(bytes) => match image_io::decode_trimap(&bytes) {
                Err(e) => {
                    let code = match e {
                        MaskError::NotPng(_) => "mask_not_png",
                        MaskError::NotSingleChannel(_) => "mask_not_single_channel",
                        MaskError::Decode(DecodeError::Truncated(_)) => "mask_truncated",
                        MaskError::Decode(_) => "mask_corrupt",
                    };
                    result.errors.push(finding(Some(stem), code, Some(mask_rel.clone()), e.to_string()));
                }
                Ok(mask) => {
                    let mut histogram = [0u64; 256];
                    for v in mask.iter() {
                        histogram[*v as usize] += 1;
                    }
                    let bad: Vec<String> = histogram
                        .iter()
                        .enumerate()
                        .filter(|(v, n)| **n > 0 && !(1..=3).contains(v))
                        .map(|(v, n)| format!("{v} ({n} px)"))
                        .collect();
                    let mut mask_ok = true;
                    if !bad.is_empty() {
                        mask_ok = false;
                        result.errors.push(finding(
                            Some(stem),
                            "mask_bad_values",
                            Some(mask_rel.clone()),
                            format!("values outside {{1, 2, 3}}: {}", bad.join(", ")),
                        ));
                    }
                    if let Some((w, h)) = result.size {
                        if mask.dimensions() != (w, h) {
                            mask_ok = false;
                            result.errors.push(finding(
                                Some(stem),
                                "mask_size_mismatch",
                                Some(mask_rel.clone()),
                                format!("trimap is {}x{}, image is {w}x{h}", mask.width(), mask.height()),
                            ));
                        }
                    }
                    if mask_ok && image_ok {
                        result.valid = true;
                        result.class_pixels = [histogram[1], histogram[2], histogram[3]];
                    }
                }
            },
        }
    }
    result
}

fn color_code(note: ColorNote) -> &'static str {
    match note {
        ColorNote::Grayscale => "grayscale_converted",
        ColorNote::Cmyk => "cmyk_converted",
        ColorNote::Alpha => "alpha_dropped",
        ColorNote::HighBitDepth => "high_bit_depth_reduced",
    }
}
