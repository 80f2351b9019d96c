//! The Oxford-IIIT Pet dataset contract: folder layout, split files, and the sample reader every
//! later stage uses (decode to RGB u8 + class-id mask u8, skipping invalid samples with a count).

pub mod augment;
pub mod fetch;
pub mod image_io;
pub mod pipeline;
pub mod synthetic;
pub mod transform;
pub mod validate;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::{Context, Result, bail};
use image::{GrayImage, RgbImage};

use crate::util::rng::Rng;

/// Trimap values as stored in the PNGs.
pub const TRIMAP_PET: u8 = 1;
pub const TRIMAP_BACKGROUND: u8 = 2;
pub const TRIMAP_BORDER: u8 = 3;

/// Where each part of a dataset lives under its root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatasetLayout {
    pub root: PathBuf,
}

impl DatasetLayout {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }
    pub fn images_dir(&self) -> PathBuf {
        self.root.join("images")
    }
    pub fn annotations_dir(&self) -> PathBuf {
        self.root.join("annotations")
    }
    pub fn trimaps_dir(&self) -> PathBuf {
        self.annotations_dir().join("trimaps")
    }
    /// `annotations/list.txt`, `trainval.txt` or `test.txt`.
    pub fn split_file(&self, file: SplitFile) -> PathBuf {
        self.annotations_dir().join(file.file_name())
    }
    pub fn image_path(&self, stem: &str) -> PathBuf {
        self.images_dir().join(format!("{stem}.jpg"))
    }
    pub fn mask_path(&self, stem: &str) -> PathBuf {
        self.trimaps_dir().join(format!("{stem}.png"))
    }
}

/// The three list files of the dataset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SplitFile {
    List,
    Trainval,
    Test,
}

impl SplitFile {
    pub const ALL: [SplitFile; 3] = [SplitFile::List, SplitFile::Trainval, SplitFile::Test];
    pub fn file_name(self) -> &'static str {
        match self {
            SplitFile::List => "list.txt",
            SplitFile::Trainval => "trainval.txt",
            SplitFile::Test => "test.txt",
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            SplitFile::List => "list",
            SplitFile::Trainval => "trainval",
            SplitFile::Test => "test",
        }
    }
}

pub use crate::config::Split;

/// A dataset's files uploaded last when a root is published to a bucket: readers find samples
/// through them.
pub const SPLIT_FILES_LAST: [&str; 3] = ["annotations/list.txt", "annotations/trainval.txt", "annotations/test.txt"];

/// One row of a split file: `<stem> <class-id> <species> <breed-id>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SplitRow {
    pub stem: String,
    pub class_id: u32,
    pub species: u32,
    pub breed_id: u32,
}

/// A malformed row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowError {
    pub line: usize,
    pub text: String,
    pub reason: String,
}

/// Longest sample name accepted in a split file.
pub const MAX_STEM_LEN: usize = 200;

/// Whether `stem` follows the dataset's naming (`Abyssinian_100`, `great_pyrenees_7`): ASCII
/// letters, digits, `_` and `-`. A split file names samples, never paths: no separators, no
/// `.`, so `images/<stem>.jpg` always stays inside the root.
pub fn is_valid_stem(stem: &str) -> bool {
    !stem.is_empty()
        && stem.len() <= MAX_STEM_LEN
        && stem.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Parses split-file text: comment lines (`#`) and blank lines are skipped; malformed rows
/// (including names that are not sample names, see [`is_valid_stem`]) are returned apart so a
/// validator can report them and a reader can skip them.
pub fn parse_split_text(text: &str) -> (Vec<SplitRow>, Vec<RowError>) {
    let mut rows = Vec::new();
    let mut errors = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let trimmed = line.trim();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        let fields: Vec<&str> = trimmed.split_whitespace().collect();
        let parsed = (fields.len() == 4)
            .then(|| {
                Some(SplitRow {
                    stem: fields[0].to_string(),
                    class_id: fields[1].parse().ok()?,
                    species: fields[2].parse().ok()?,
                    breed_id: fields[3].parse().ok()?,
                })
            })
            .flatten();
        match parsed {
            Some(row) if is_valid_stem(&row.stem) => rows.push(row),
            Some(row) => errors.push(RowError {
                line: i + 1,
                text: trimmed.to_string(),
                reason: format!(
                    "`{}` is not a sample name (letters, digits, `_` and `-`, at most {MAX_STEM_LEN}; no paths)",
                    row.stem
                ),
            }),
            None => errors.push(RowError {
                line: i + 1,
                text: trimmed.to_string(),
                reason: "expected `<name> <class-id> <species> <breed-id>`".into(),
            }),
        }
    }
    (rows, errors)
}

/// Reads a split file's rows (malformed rows skipped with a warning).
pub fn read_split_rows(path: &Path) -> Result<Vec<SplitRow>> {
    let text = crate::util::fs::read_to_string(path)?;
    let (rows, errors) = parse_split_text(&text);
    if !errors.is_empty() {
        log::warn!("{}: skipped {} malformed rows", path.display(), errors.len());
    }
    Ok(rows)
}

/// Carves a validation set out of trainval rows: the classes' stems are each shuffled with the
/// seed and dealt round-robin, and the first `val_fraction` of that order is validation, so the
/// split is stratified, the same on every machine, and never empty for tiny datasets.
pub fn carve_train_val(rows: &[SplitRow], val_fraction: f64, seed: u64) -> (Vec<String>, Vec<String>) {
    let mut by_class: BTreeMap<u32, Vec<String>> = BTreeMap::new();
    for row in rows {
        by_class.entry(row.class_id).or_default().push(row.stem.clone());
    }
    let mut rng = Rng::new(seed);
    let mut queues: Vec<std::collections::VecDeque<String>> = by_class
        .into_values()
        .map(|mut stems| {
            stems.sort();
            stems.dedup();
            rng.shuffle(&mut stems);
            stems.into()
        })
        .collect();
    let mut order = Vec::new();
    while queues.iter().any(|q| !q.is_empty()) {
        for q in queues.iter_mut() {
            if let Some(stem) = q.pop_front() {
                order.push(stem);
            }
        }
    }
    let total = order.len();
    let mut n_val = (total as f64 * val_fraction).round() as usize;
    if val_fraction > 0.0 && total > 1 {
        n_val = n_val.clamp(1, total - 1);
    }
    let mut train = order.split_off(n_val.min(total));
    let mut val = order;
    train.sort();
    val.sort();
    (train, val)
}

/// A decoded sample: RGB photo and class-id mask (trimap value − 1: 0 pet, 1 background,
/// 2 border), same size.
#[derive(Debug, Clone)]
pub struct Sample {
    pub stem: String,
    pub image: RgbImage,
    pub mask: GrayImage,
}

/// Reads and checks one image/trimap pair. Only sample names are accepted, and only regular
/// files are read (never a device or FIFO a link might lead to).
pub fn load_sample(layout: &DatasetLayout, stem: &str) -> Result<Sample> {
    load_sample_for_model(layout, stem, None)
}

/// [`load_sample`] with the photo decoded as `serve` decodes it for a `model_side`² input
/// (a JPEG at the reduced DCT scale of [`image_io::dct_scale_for`]); the trimap stays at
/// full size, checked against the photo's full size.
pub fn load_sample_for_model(layout: &DatasetLayout, stem: &str, model_side: Option<u32>) -> Result<Sample> {
    if !is_valid_stem(stem) {
        bail!("`{stem}` is not a sample name");
    }
    let image_path = layout.image_path(stem);
    let mask_path = layout.mask_path(stem);
    for path in [&image_path, &mask_path] {
        let meta = std::fs::metadata(path).with_context(|| format!("failed to read `{}`", path.display()))?;
        if !meta.is_file() {
            bail!("`{}` is not a regular file", path.display());
        }
    }
    let image_bytes = crate::util::fs::read(&image_path)?;
    let (image, full_size) = match model_side {
        Some(side) => {
            let photo = image_io::decode_rgb_for_model(&image_bytes, image_io::DecodeOptions::default(), side)
                .with_context(|| format!("`{}`", image_path.display()))?;
            (photo.image, (photo.width, photo.height))
        }
        None => {
            let image = image_io::decode_rgb(&image_bytes, image_io::DecodeOptions::default())
                .with_context(|| format!("`{}`", image_path.display()))?
                .image;
            let dims = image.dimensions();
            (image, dims)
        }
    };
    let mask_bytes = crate::util::fs::read(&mask_path)?;
    let mut mask = image_io::decode_trimap(&mask_bytes)
        .with_context(|| format!("`{}`", mask_path.display()))?;
    if mask.dimensions() != full_size {
        bail!(
            "`{}` is {}x{} but its image is {}x{}",
            mask_path.display(),
            mask.width(),
            mask.height(),
            full_size.0,
            full_size.1
        );
    }
    for value in mask.iter_mut() {
        if !(TRIMAP_PET..=TRIMAP_BORDER).contains(value) {
            bail!("`{}` holds the value {value}, outside {{1, 2, 3}}", mask_path.display());
        }
        *value -= 1;
    }
    Ok(Sample { stem: stem.to_string(), image, mask })
}

/// The samples of one split.
#[derive(Debug)]
pub struct PetDataset {
    pub layout: DatasetLayout,
    pub split: Split,
    pub stems: Vec<String>,
    skipped: AtomicUsize,
}

impl PetDataset {
    /// Opens `split` under `root`; `train`/`val` are carved from trainval with
    /// `val_fraction` and `seed`.
    pub fn open(root: &Path, split: Split, val_fraction: f64, seed: u64) -> Result<Self> {
        // A bucket prefix is read from its local mirror (downloaded once, kept by ETag).
        let local = crate::storage::localize(root)?;
        let root = local.as_path();
        let layout = DatasetLayout::new(root);
        if !layout.images_dir().is_dir() || !layout.trimaps_dir().is_dir() {
            bail!(
                "`{}` is not a dataset root (no images/ and annotations/trimaps/); run `segctl fetch-data` first",
                root.display()
            );
        }
        let file = match split {
            Split::Test => SplitFile::Test,
            _ => SplitFile::Trainval,
        };
        let rows = read_split_rows(&layout.split_file(file))?;
        let stems = match split {
            Split::Trainval | Split::Test => {
                let mut s: Vec<String> = rows.into_iter().map(|r| r.stem).collect();
                s.sort();
                s.dedup();
                s
            }
            Split::Train => carve_train_val(&rows, val_fraction, seed).0,
            Split::Val => carve_train_val(&rows, val_fraction, seed).1,
        };
        if stems.is_empty() {
            bail!("split `{}` of `{}` has no samples", split.name(), root.display());
        }
        Ok(Self { layout, split, stems, skipped: AtomicUsize::new(0) })
    }

    pub fn len(&self) -> usize {
        self.stems.len()
    }

    /// The name of sample `index`.
    pub fn stem(&self, index: usize) -> &str {
        &self.stems[index]
    }

    pub fn is_empty(&self) -> bool {
        self.stems.is_empty()
    }

    /// Loads sample `index`, or `None` (with a warning and a count) when it is invalid.
    pub fn get(&self, index: usize) -> Option<Sample> {
        self.get_for_model(index, None)
    }

    /// [`Self::get`] with the photo decoded for a `model_side`² model input as `serve` does
    /// (`None`: at full size).
    pub fn get_for_model(&self, index: usize, model_side: Option<u32>) -> Option<Sample> {
        match load_sample_for_model(&self.layout, &self.stems[index], model_side) {
            Ok(sample) => Some(sample),
            Err(e) => {
                self.skipped.fetch_add(1, Ordering::Relaxed);
                log::warn!("skipping sample `{}`: {e:#}", self.stems[index]);
                None
            }
        }
    }

    /// Iterates the valid samples in order.
    pub fn iter(&self) -> impl Iterator<Item = Sample> + '_ {
        (0..self.len()).filter_map(|i| self.get(i))
    }

    /// How many samples were skipped as invalid so far.
    pub fn skipped(&self) -> usize {
        self.skipped.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_rows_skip_comments_and_report_malformed() {
        let (rows, errors) =
            parse_split_text("#Image CLASS-ID SPECIES BREED ID\nAbyssinian_100 1 1 1\n\nbad row\nbeagle_1 x 2 3\n");
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].stem, "Abyssinian_100");
        assert_eq!(errors.iter().map(|e| e.line).collect::<Vec<_>>(), vec![4, 5]);
    }

    #[test]
    fn split_rows_name_stems_not_paths() {
        let (rows, errors) = parse_split_text(
            "great_pyrenees_7 25 2 12\n/tmp/t/x 1 1 1\n../images/a 1 1 1\nimages/a 1 1 1\na.b 1 1 1\n.. 1 1 1\nb\\c 1 1 1\n",
        );
        assert_eq!(rows.iter().map(|r| r.stem.as_str()).collect::<Vec<_>>(), vec!["great_pyrenees_7"]);
        assert_eq!(errors.iter().map(|e| e.line).collect::<Vec<_>>(), vec![2, 3, 4, 5, 6, 7]);
        assert!(errors[0].reason.contains("`/tmp/t/x` is not a sample name"), "{:?}", errors[0]);
        assert!(!is_valid_stem(&"a".repeat(MAX_STEM_LEN + 1)));
        assert!(is_valid_stem("bean-hound_2"));
    }

    #[test]
    fn carving_is_deterministic_disjoint_and_stratified() {
        let rows: Vec<SplitRow> = (0..100)
            .map(|i| SplitRow { stem: format!("s_{i}"), class_id: 1 + i % 4, species: 1, breed_id: 1 })
            .collect();
        let (t1, v1) = carve_train_val(&rows, 0.2, 5);
        let (t2, v2) = carve_train_val(&rows, 0.2, 5);
        assert_eq!((&t1, &v1), (&t2, &v2));
        assert_eq!(v1.len(), 20);
        assert_eq!(t1.len(), 80);
        assert!(v1.iter().all(|s| !t1.contains(s)));
        let (_, v3) = carve_train_val(&rows, 0.2, 6);
        assert_ne!(v1, v3);
    }
}
