//! The input pipeline: seeded shuffling, parallel decode + resize (rayon), random horizontal
//! flips, normalization, batching, and a prefetch thread with a bounded queue so the model
//! never waits on decoding; resized samples are kept in memory up to a budget (epochs after
//! the first decode nothing) and optionally in an on-disk cache keyed by a digest of the
//! dataset files and the input size.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::thread::JoinHandle;

use anyhow::{Context, Result};
use image::{GrayImage, RgbImage};
use rayon::prelude::*;

use super::PetDataset;
use super::transform::{self, Normalization};
use crate::util::rng::Rng;

/// Mixed into the seed of a sample's augmentation draws.
const AUGMENT_STREAM: u64 = 0xa06e_3a7e_5eed_0001;

/// Bumped when the cache file format changes.
const CACHE_VERSION: u32 = 1;

/// How batches are made.
#[derive(Debug, Clone)]
pub struct LoaderConfig {
    pub batch_size: usize,
    pub image_size: u32,
    pub normalization: Normalization,
    /// Shuffle each epoch (training).
    pub shuffle: bool,
    /// Random horizontal flips (training).
    pub hflip: bool,
    /// Augmentation beyond the flip (training; `None` = none).
    pub augment: Option<crate::config::AugmentConfig>,
    pub seed: u64,
    /// Drop a final incomplete batch (training: BatchNorm dislikes tiny batches).
    pub drop_last: bool,
    /// Batches decoded ahead.
    pub prefetch: usize,
    /// On-disk cache of resized samples.
    pub cache_dir: Option<PathBuf>,
    /// Decode threads (0 = one per core).
    pub workers: usize,
    /// Resized samples kept in memory, in bytes.
    pub memory_cache_bytes: usize,
    /// Decode JPEG photos at the reduced DCT scale `serve` and `predict` use for the model
    /// input (`serve.jpeg_dct_scaling`), so that training and evaluation see what is served.
    pub jpeg_dct_scaling: bool,
}

/// A batch ready for the model: `images` is `[len, 3, size, size]` normalized, `masks` is
/// `[len, size, size]` class ids.
#[derive(Debug, Clone)]
pub struct Batch {
    pub images: Vec<f32>,
    pub masks: Vec<u8>,
    pub stems: Vec<String>,
    pub size: usize,
    /// Index of this batch within its epoch.
    pub index: usize,
}

impl Batch {
    pub fn len(&self) -> usize {
        self.stems.len()
    }
    pub fn is_empty(&self) -> bool {
        self.stems.is_empty()
    }
}

/// A resized sample (before flip and normalization).
struct Prepared {
    image: RgbImage,
    mask: GrayImage,
}

/// Resized samples kept in memory while they fit the budget.
#[derive(Default)]
struct MemoryCache {
    samples: std::collections::HashMap<usize, Arc<Prepared>>,
    bytes: usize,
}

type SharedMemoryCache = Arc<std::sync::Mutex<MemoryCache>>;

/// Batches over one dataset split.
pub struct Loader {
    dataset: Arc<PetDataset>,
    config: LoaderConfig,
    cache: Option<PathBuf>,
    memory: SharedMemoryCache,
    pool: Arc<rayon::ThreadPool>,
}

impl Loader {
    pub fn new(dataset: Arc<PetDataset>, config: LoaderConfig) -> Result<Self> {
        let cache = match &config.cache_dir {
            Some(dir) => {
                let key = dataset_digest(&dataset, config.image_size)?;
                // The decode is part of the key: a cache of full-size decodes is not reused
                // for DCT-scaled ones.
                let decode = decode_name(config.jpeg_dct_scaling);
                let path = dir.join(format!("{}-{}-{decode}", &key[..16], config.image_size));
                crate::util::fs::create_dir_all(&path)?;
                Some(path)
            }
            None => None,
        };
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(config.workers)
            .thread_name(|i| format!("segctl-decode-{i}"))
            .build()
            .context("failed to start the decode threads")?;
        Ok(Self { dataset, config, cache, memory: SharedMemoryCache::default(), pool: Arc::new(pool) })
    }

    pub fn dataset(&self) -> &PetDataset {
        &self.dataset
    }

    pub fn batches_per_epoch(&self) -> usize {
        let n = self.dataset.len();
        let b = self.config.batch_size;
        if self.config.drop_last && n >= b { n / b } else { n.div_ceil(b) }
    }

    /// Sample order of an epoch: a permutation seeded by (`seed`, `epoch_seed`), or the
    /// dataset order when not shuffling.
    pub fn order(&self, epoch_seed: u64) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.dataset.len()).collect();
        if self.config.shuffle {
            Rng::derive(self.config.seed, epoch_seed).shuffle(&mut order);
        }
        order
    }

    /// Streams the batches of one epoch, starting at batch `start` (for exact resumption),
    /// decoded on a background thread `prefetch` batches ahead.
    pub fn epoch(&self, epoch_seed: u64, start: usize) -> BatchStream {
        let order = self.order(epoch_seed);
        let (tx, rx) = sync_channel(self.config.prefetch.max(1));
        let dataset = self.dataset.clone();
        let config = self.config.clone();
        let cache = self.cache.clone();
        let memory = self.memory.clone();
        let total = self.batches_per_epoch();
        let pool = self.pool.clone();
        let handle = std::thread::Builder::new()
            .name("segctl-prefetch".into())
            .spawn(move || pool.install(|| produce(dataset, config, cache, memory, order, epoch_seed, start, total, tx)))
            .expect("spawn prefetch thread");
        BatchStream { rx, handle: Some(handle) }
    }
}

#[allow(clippy::too_many_arguments)]
fn produce(
    dataset: Arc<PetDataset>,
    config: LoaderConfig,
    cache: Option<PathBuf>,
    memory: SharedMemoryCache,
    order: Vec<usize>,
    epoch_seed: u64,
    start: usize,
    total: usize,
    tx: SyncSender<Batch>,
) {
    let size = config.image_size as usize;
    let augmenter = config.augment.clone().filter(|a| a.any()).map(super::augment::Augmenter::new);
    for index in start..total {
        let begin = index * config.batch_size;
        let end = (begin + config.batch_size).min(order.len());
        let items: Vec<(usize, Arc<Prepared>)> = order[begin..end]
            .par_iter()
            .filter_map(|&i| {
                prepare_cached(&dataset, i, config.image_size, config.jpeg_dct_scaling, cache.as_deref(), &memory, config.memory_cache_bytes).map(|p| (i, p))
            })
            .collect();
        let mut batch = Batch {
            images: vec![0f32; items.len() * 3 * size * size],
            masks: vec![0u8; items.len() * size * size],
            stems: Vec::with_capacity(items.len()),
            size,
            index,
        };
        batch
            .images
            .par_chunks_mut(3 * size * size)
            .zip(batch.masks.par_chunks_mut(size * size))
            .zip(items.par_iter())
            .for_each(|((img_out, mask_out), (i, p))| {
                // Flip decisions depend only on (seed, epoch, sample), never on thread timing.
                let flip = config.hflip && Rng::derive(config.seed ^ epoch_seed.rotate_left(17), *i as u64).chance(0.5);
                match &augmenter {
                    Some(aug) => {
                        // Its own stream, so turning augmentation on changes no flip.
                        let mut rng = Rng::derive(config.seed ^ epoch_seed.rotate_left(29) ^ AUGMENT_STREAM, *i as u64);
                        let (image, mask) = aug.apply(&p.image, &p.mask, &mut rng);
                        transform::normalize_into(&image, &config.normalization, flip, img_out);
                        transform::mask_into(&mask, flip, mask_out);
                    }
                    None => {
                        transform::normalize_into(&p.image, &config.normalization, flip, img_out);
                        transform::mask_into(&p.mask, flip, mask_out);
                    }
                }
            });
        batch.stems = items.iter().map(|(i, _)| dataset.stems[*i].clone()).collect();
        if tx.send(batch).is_err() {
            return; // the consumer stopped early
        }
    }
}

/// [`prepare`] through the memory cache.
fn prepare_cached(
    dataset: &PetDataset,
    index: usize,
    size: u32,
    dct: bool,
    cache: Option<&Path>,
    memory: &SharedMemoryCache,
    budget: usize,
) -> Option<Arc<Prepared>> {
    if let Some(hit) = memory.lock().ok().and_then(|m| m.samples.get(&index).cloned()) {
        return Some(hit);
    }
    let prepared = Arc::new(prepare(dataset, index, size, dct, cache)?);
    if let Ok(mut m) = memory.lock() {
        let bytes = prepared.image.len() + prepared.mask.len();
        if m.bytes + bytes <= budget {
            m.bytes += bytes;
            m.samples.insert(index, prepared.clone());
        }
    }
    Some(prepared)
}

/// How photos are decoded for the model: `dct-scaled` (JPEGs at the reduced DCT scale that
/// `serve` uses) or `full-size`.
pub fn decode_name(jpeg_dct_scaling: bool) -> &'static str {
    if jpeg_dct_scaling { "dct-scaled" } else { "full-size" }
}

/// Loads and resizes one sample, through the disk cache when there is one.
fn prepare(dataset: &PetDataset, index: usize, size: u32, dct: bool, cache: Option<&Path>) -> Option<Prepared> {
    let stem = &dataset.stems[index];
    // Stems are sample names (checked when split files are read), so this stays in the cache.
    let cache_file = cache.filter(|_| super::is_valid_stem(stem)).map(|dir| dir.join(format!("{stem}.bin")));
    let plane = (size * size) as usize;
    if let Some(file) = &cache_file {
        // Only a regular file of exactly the expected size is read.
        let fits = std::fs::symlink_metadata(file).is_ok_and(|m| m.is_file() && m.len() == 4 * plane as u64);
        if let Some(bytes) = fits.then(|| std::fs::read(file).ok()).flatten()
            && bytes.len() == 4 * plane
        {
            let image = RgbImage::from_raw(size, size, bytes[..3 * plane].to_vec())?;
            let mask = GrayImage::from_raw(size, size, bytes[3 * plane..].to_vec())?;
            return Some(Prepared { image, mask });
        }
    }
    let sample = dataset.get_for_model(index, dct.then_some(size))?;
    let image = transform::resize_image(&sample.image, size);
    let mask = transform::resize_mask(&sample.mask, size);
    if let Some(file) = &cache_file {
        let mut bytes = image.as_raw().clone();
        bytes.extend_from_slice(mask.as_raw());
        if let Err(e) = crate::util::fs::write_atomic(file, &bytes) {
            log::warn!("cache write failed: {e:#}");
        }
    }
    Some(Prepared { image, mask })
}

/// A digest of the split's files (names, sizes, modification times) and the input size:
/// a changed dataset never reads stale cache entries.
pub fn dataset_digest(dataset: &PetDataset, image_size: u32) -> Result<String> {
    let mut text = format!("v{CACHE_VERSION} size {image_size}\n");
    for stem in &dataset.stems {
        for path in [dataset.layout.image_path(stem), dataset.layout.mask_path(stem)] {
            let meta = std::fs::metadata(&path).with_context(|| format!("failed to read `{}`", path.display()));
            let (len, mtime) = match meta {
                Ok(m) => (m.len(), m.modified().ok().and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok()).map(|d| d.as_nanos()).unwrap_or(0)),
                Err(_) => (0, 0),
            };
            text.push_str(&format!("{stem} {len} {mtime}\n"));
        }
    }
    Ok(crate::util::sha256_hex(text.as_bytes()))
}

/// The batches of an epoch, as they are decoded.
pub struct BatchStream {
    rx: Receiver<Batch>,
    handle: Option<JoinHandle<()>>,
}

impl Iterator for BatchStream {
    type Item = Batch;
    fn next(&mut self) -> Option<Batch> {
        self.rx.recv().ok()
    }
}

impl Drop for BatchStream {
    fn drop(&mut self) {
        // Unblock the producer (its send fails once the receiver is gone), then join it.
        let (_tx, rx) = sync_channel(0);
        drop(std::mem::replace(&mut self.rx, rx));
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::Split;
    use crate::data::synthetic::{SyntheticOptions, generate};
    use crate::progress::ProgressMode;

    fn dataset(dir: &Path, n: usize) -> Arc<PetDataset> {
        let root = dir.join("pets");
        generate(&SyntheticOptions { root: root.clone(), samples: n, seed: 1, progress: ProgressMode::Hidden }).unwrap();
        Arc::new(PetDataset::open(&root, Split::Trainval, 0.0, 0).unwrap())
    }

    fn config(cache: Option<PathBuf>) -> LoaderConfig {
        LoaderConfig {
            batch_size: 3,
            image_size: 32,
            normalization: Normalization::UNIT,
            shuffle: true,
            hflip: true,
            augment: None,
            seed: 4,
            drop_last: true,
            prefetch: 2,
            cache_dir: cache,
            workers: 2,
            memory_cache_bytes: 0,
            jpeg_dct_scaling: false,
        }
    }

    #[test]
    fn photos_decode_as_served_and_the_cache_knows_it() {
        // Serve's decode of each photo for a 32² input (JPEG at a reduced DCT scale), resized
        // and normalized exactly as `serve` does, is what the loader hands training.
        let dir = tempfile::tempdir().unwrap();
        let ds = dataset(dir.path(), 8);
        let cache = dir.path().join("cache");
        let served = LoaderConfig { shuffle: false, hflip: false, drop_last: false, jpeg_dct_scaling: true, ..config(Some(cache.clone())) };
        let full = LoaderConfig { jpeg_dct_scaling: false, ..served.clone() };
        let a: Vec<Batch> = Loader::new(ds.clone(), served).unwrap().epoch(1, 0).collect();
        let b: Vec<Batch> = Loader::new(ds.clone(), full).unwrap().epoch(1, 0).collect();
        let stem = &a[0].stems[0];
        let bytes = std::fs::read(ds.layout.image_path(stem)).unwrap();
        let photo = crate::data::image_io::decode_rgb_for_model(&bytes, Default::default(), 32).unwrap();
        assert!(photo.scale > 1, "the synthetic photos are large enough to scale");
        let expected = transform::preprocess(&photo.image, 32, &Normalization::UNIT);
        assert_eq!(&a[0].images[..3 * 32 * 32], &expected[..], "the served decode");
        assert_ne!(a[0].images, b[0].images, "a full-size decode differs");
        assert_eq!(a[0].masks, b[0].masks, "masks come from the full-size trimap either way");
        let names: Vec<String> = std::fs::read_dir(&cache).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        assert!(names.iter().any(|n| n.ends_with("-dct-scaled")) && names.iter().any(|n| n.ends_with("-full-size")), "{names:?}");
    }

    #[test]
    fn epochs_are_seeded_batched_and_resumable() {
        let dir = tempfile::tempdir().unwrap();
        let ds = dataset(dir.path(), 16); // 8 trainval samples
        let loader = Loader::new(ds.clone(), config(None)).unwrap();
        assert_eq!(loader.batches_per_epoch(), 2);
        let a: Vec<Batch> = loader.epoch(1, 0).collect();
        let b: Vec<Batch> = loader.epoch(1, 0).collect();
        assert_eq!(a.len(), 2);
        assert_eq!(a[0].len(), 3);
        assert_eq!(a[0].images.len(), 3 * 3 * 32 * 32);
        assert!(a[0].masks.iter().all(|m| *m <= 2));
        assert_eq!(a[0].stems, b[0].stems);
        assert_eq!(a[1].images, b[1].images, "same seed, same flips");
        let resumed: Vec<Batch> = loader.epoch(1, 1).collect();
        assert_eq!(resumed.len(), 1);
        assert_eq!(resumed[0].stems, a[1].stems);
        assert_eq!(resumed[0].images, a[1].images);
        let other: Vec<String> = loader.epoch(2, 0).flat_map(|b| b.stems).collect();
        assert_ne!(other, a.iter().flat_map(|b| b.stems.clone()).collect::<Vec<_>>(), "epochs reshuffle");
    }

    #[test]
    fn cache_gives_identical_batches() {
        let dir = tempfile::tempdir().unwrap();
        let ds = dataset(dir.path(), 16);
        let plain: Vec<Batch> = Loader::new(ds.clone(), config(None)).unwrap().epoch(3, 0).collect();
        let cached_loader = Loader::new(ds.clone(), config(Some(dir.path().join("cache")))).unwrap();
        let first: Vec<Batch> = cached_loader.epoch(3, 0).collect();
        let second: Vec<Batch> = cached_loader.epoch(3, 0).collect();
        for ((p, f), s) in plain.iter().zip(&first).zip(&second) {
            assert_eq!(p.images, f.images);
            assert_eq!(p.images, s.images);
            assert_eq!(p.masks, s.masks);
        }
        let files = std::fs::read_dir(dir.path().join("cache")).unwrap().next().unwrap().unwrap().path();
        assert!(std::fs::read_dir(files).unwrap().count() >= 6, "cache files written");
    }

    #[test]
    fn dropping_a_stream_early_stops_the_producer() {
        let dir = tempfile::tempdir().unwrap();
        let ds = dataset(dir.path(), 16);
        let loader = Loader::new(ds, config(None)).unwrap();
        let mut stream = loader.epoch(0, 0);
        assert!(stream.next().is_some());
        drop(stream); // must not hang
    }
}
