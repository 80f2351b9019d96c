//! `fetch-data --synthetic N`: a generated dataset in exactly the real layout (JPEG photos of
//! varying sizes, trimap PNGs, list/trainval/test files), deterministic per seed. Each photo
//! holds one animal-like shape from several families (four-legged silhouette, polar blob, bean,
//! lobes), textured like fur (spots, stripes, fur, patches) with a fuzzy edge that the border
//! class marks, on textured backgrounds (wood, plaid, tiles, bokeh, carpet, gradients) with
//! pet-coloured distractors, so a model must learn shape and texture rather than one colour.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use image::{GrayImage, Luma, Rgb, RgbImage};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::{DatasetLayout, SplitFile, TRIMAP_BACKGROUND, TRIMAP_BORDER, TRIMAP_PET};
use crate::progress::{ProgressMode, Unit};
use crate::util::rng::Rng;

/// Bumped whenever the images a seed produces change.
const GENERATOR_VERSION: u32 = 5;
/// Half-width of the border ring, as a fraction of the image's shorter side.
const BORDER_HALF_WIDTH: f32 = 0.05;
/// Marker file written into a generated dataset root.
pub const MARKER_FILE: &str = ".segctl-synthetic.json";
/// Name prefix of the staging folder a dataset is generated in.
const STAGING_PREFIX: &str = ".segctl-synthetic-";

#[derive(Clone, Copy)]
enum ShapeFamily {
    Quadruped,
    Polar { spiky: bool },
    Bean,
    Lobes,
}

struct Breed {
    name: &'static str,
    /// 1 = cat (capitalised name, as in the real dataset), 2 = dog.
    species: u32,
    breed_id: u32,
    shape: ShapeFamily,
}

const BREEDS: [Breed; 8] = [
    Breed { name: "Roundling", species: 1, breed_id: 1, shape: ShapeFamily::Quadruped },
    Breed { name: "Lobecat", species: 1, breed_id: 2, shape: ShapeFamily::Lobes },
    Breed { name: "Starcat", species: 1, breed_id: 3, shape: ShapeFamily::Polar { spiky: true } },
    Breed { name: "Blobby_Shorthair", species: 1, breed_id: 4, shape: ShapeFamily::Polar { spiky: false } },
    Breed { name: "bean_hound", species: 2, breed_id: 1, shape: ShapeFamily::Bean },
    Breed { name: "lobed_terrier", species: 2, breed_id: 2, shape: ShapeFamily::Lobes },
    Breed { name: "four_legged_setter", species: 2, breed_id: 3, shape: ShapeFamily::Quadruped },
    Breed { name: "wavy_spaniel", species: 2, breed_id: 4, shape: ShapeFamily::Polar { spiky: false } },
];

/// What to generate.
#[derive(Debug, Clone)]
pub struct SyntheticOptions {
    pub root: PathBuf,
    pub samples: usize,
    pub seed: u64,
    pub progress: ProgressMode,
}

/// What was generated.
#[derive(Debug, Clone, Serialize)]
pub struct SyntheticReport {
    pub root: PathBuf,
    pub samples: usize,
    pub trainval: usize,
    pub test: usize,
    pub seed: u64,
    /// The same dataset was already there: nothing was written.
    pub already_present: bool,
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct Marker {
    generator_version: u32,
    samples: usize,
    seed: u64,
}

/// Stem and split-file row of sample `index`.
fn sample_row(index: usize) -> (String, u32, u32, u32, bool) {
    let breed_index = index % BREEDS.len();
    let breed = &BREEDS[breed_index];
    let n = index / BREEDS.len() + 1;
    // Alternate within each breed, like the real ~50/50 trainval/test split.
    let trainval = n % 2 == 1;
    (format!("{}_{n}", breed.name), breed_index as u32 + 1, breed.species, breed.breed_id, trainval)
}

/// Writes the dataset; a second run with the same N and seed does nothing.
pub fn generate(options: &SyntheticOptions) -> Result<SyntheticReport> {
    // Into a bucket: generated in the local mirror, then uploaded (split files last).
    if let Some(remote) = crate::storage::remote(&options.root)? {
        let local = remote.cache_dir();
        let mut report = generate(&SyntheticOptions { root: local.clone(), ..options.clone() })?;
        crate::storage::upload_dir(&local, &remote, &super::SPLIT_FILES_LAST)?;
        report.root = options.root.clone();
        return Ok(report);
    }
    if options.samples == 0 {
        bail!("--synthetic needs at least 1 sample");
    }
    let layout = DatasetLayout::new(&options.root);
    let marker = Marker { generator_version: GENERATOR_VERSION, samples: options.samples, seed: options.seed };
    let marker_path = options.root.join(MARKER_FILE);
    let rows: Vec<_> = (0..options.samples).map(sample_row).collect();
    let trainval = rows.iter().filter(|r| r.4).count();
    let mut report = SyntheticReport {
        root: options.root.clone(),
        samples: options.samples,
        trainval,
        test: options.samples - trainval,
        seed: options.seed,
        already_present: false,
    };
    // Checked before taking the lock (a complete dataset on a read-only root is fine) and again
    // once holding it (another run may have just written one).
    let present = || -> Result<bool> {
        if !layout.images_dir().exists() && !layout.annotations_dir().exists() {
            return Ok(false);
        }
        let existing: Option<Marker> = std::fs::read(&marker_path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        if existing.as_ref() == Some(&marker) {
            return Ok(true);
        }
        bail!(
            "`{}` already holds a dataset{}; remove it or choose another --root",
            options.root.display(),
            match existing {
                Some(m) => format!(" (synthetic, {} samples, seed {})", m.samples, m.seed),
                None => String::new(),
            }
        );
    };
    if present()? {
        report.already_present = true;
        return Ok(report);
    }
    // One `fetch-data` per root at a time; then what a killed one left can go.
    crate::util::fs::create_dir_all(&options.root)?;
    let lock_path = options.root.join(super::fetch::LOCK_FILE);
    let _lock = crate::util::fs::FileLock::try_acquire(&lock_path)?.with_context(|| {
        format!("another `segctl fetch-data` is working on `{}` (it holds `{}`); wait for it to finish", options.root.display(), lock_path.display())
    })?;
    if present()? {
        report.already_present = true;
        return Ok(report);
    }
    crate::util::fs::remove_leftovers(&options.root, STAGING_PREFIX)?;

    let staging = tempfile::Builder::new()
        .prefix(STAGING_PREFIX)
        .tempdir_in(&options.root)
        .with_context(|| format!("failed to create a staging folder in `{}`", options.root.display()))?;
    let stage = DatasetLayout::new(staging.path());
    crate::util::fs::create_dir_all(&stage.images_dir())?;
    crate::util::fs::create_dir_all(&stage.trimaps_dir())?;

    let bar = options.progress.bar("synthetic", Some(options.samples as u64), Unit::Items("samples"));
    (0..options.samples).into_par_iter().try_for_each(|index| -> Result<()> {
        let (stem, ..) = sample_row(index);
        let mut rng = Rng::derive(options.seed, index as u64);
        let (photo, trimap) = render_sample(&mut rng, BREEDS[index % BREEDS.len()].shape);
        let quality = rng.range_usize(72, 96) as u8;
        let mut jpeg = Vec::with_capacity(64 << 10);
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, quality)
            .encode_image(&photo)
            .context("JPEG encoding failed")?;
        let image_path = stage.image_path(&stem);
        std::fs::write(&image_path, jpeg)
            .with_context(|| format!("failed to write `{}`", image_path.display()))?;
        let mask_path = stage.mask_path(&stem);
        trimap
            .save_with_format(&mask_path, image::ImageFormat::Png)
            .with_context(|| format!("failed to write `{}`", mask_path.display()))?;
        bar.inc(1);
        Ok(())
    })?;
    bar.finish();

    write_split_files(&stage, &rows)?;
    // Move into place: annotations last, so a crash leaves no half-valid dataset.
    std::fs::rename(stage.images_dir(), layout.images_dir())
        .with_context(|| format!("failed to move images into `{}`", options.root.display()))?;
    std::fs::rename(stage.annotations_dir(), layout.annotations_dir())
        .with_context(|| format!("failed to move annotations into `{}`", options.root.display()))?;
    crate::util::fs::write_atomic(&marker_path, &serde_json::to_vec_pretty(&marker)?)?;
    Ok(report)
}

fn write_split_files(stage: &DatasetLayout, rows: &[(String, u32, u32, u32, bool)]) -> Result<()> {
    let line = |r: &(String, u32, u32, u32, bool)| format!("{} {} {} {}\n", r.0, r.1, r.2, r.3);
    let mut list = String::from(
        "#Image CLASS-ID SPECIES BREED ID\n#ID: 1:8 Class ids\n#SPECIES: 1:Cat 2:Dog\n#BREED ID: 1-4:Cat 1-4:Dog\n#All images with 1st letter as captial are cat images\n#images with small first letter are dog images\n",
    );
    let mut trainval = String::new();
    let mut test = String::new();
    for r in rows {
        list.push_str(&line(r));
        if r.4 { trainval.push_str(&line(r)) } else { test.push_str(&line(r)) }
    }
    for (file, text) in [(SplitFile::List, list), (SplitFile::Trainval, trainval), (SplitFile::Test, test)] {
        let path = stage.split_file(file);
        std::fs::write(&path, text).with_context(|| format!("failed to write `{}`", path.display()))?;
    }
    Ok(())
}

/// Renders one photo and its trimap.
fn render_sample(rng: &mut Rng, family: ShapeFamily) -> (RgbImage, GrayImage) {
    let width = rng.range_usize(160, 400);
    let aspect = rng.range_f32(0.65, 1.5);
    let height = ((width as f32 / aspect) as usize).clamp(140, 420);
    let short = width.min(height) as f32;

    let shape = Shape::random(rng, family, width as f32, height as f32);
    let inside: Vec<bool> = (0..width * height)
        .map(|i| shape.contains((i % width) as f32 + 0.5, (i / width) as f32 + 0.5))
        .collect();
    let signed = signed_distance(&inside, width, height);
    let ring = (BORDER_HALF_WIDTH * short).max(2.0);

    let background = Texture::random_background(rng);
    let fur = Texture::random_fur(rng);
    let distractors: Vec<Distractor> =
        (0..rng.range_usize(0, 3)).map(|_| Distractor::random(rng, width as f32, height as f32, &fur)).collect();
    let light_angle = rng.range_f32(0.0, std::f32::consts::TAU);
    let light_strength = rng.range_f32(0.0, 0.25);
    let noise_sigma = rng.range_f32(2.0, 7.0);
    let fuzz_seed = rng.next_u64() as u32;

    let mut photo = RgbImage::new(width as u32, height as u32);
    let mut trimap = GrayImage::new(width as u32, height as u32);
    for y in 0..height {
        for x in 0..width {
            let (fx, fy) = (x as f32 + 0.5, y as f32 + 0.5);
            let mut bg = background.sample(fx / short, fy / short);
            for d in &distractors {
                if let Some(c) = d.sample(fx, fy) {
                    bg = c;
                }
            }
            let (u, v) = shape.local(fx, fy);
            // Every coat has a fine grain along the body axis (fur), unlike the backgrounds.
            let grain = 0.75 + 0.5 * fbm(fuzz_seed ^ 0x5eed, u * 70.0, v * 9.0, 2);
            let pet = shade(fur.sample(u, v), grain * (1.0 - 0.25 * (u * u + v * v).min(1.5)));
            let sd = signed[y * width + x];
            // Inside the ring, fur and background mix (a noisy blend, never pure either);
            // outside it the pixel is all pet or all background. The border class marks
            // exactly this band.
            let fuzz = fbm(fuzz_seed, fx / (0.4 * ring), fy / (0.4 * ring), 2) - 0.5;
            let alpha = if sd >= ring {
                1.0
            } else if sd <= -ring {
                0.0
            } else {
                (0.5 + 0.15 * sd / ring + 0.6 * fuzz).clamp(0.3, 0.7)
            };
            let mut color = [0.0f32; 3];
            for c in 0..3 {
                color[c] = alpha * pet[c] + (1.0 - alpha) * bg[c];
            }
            let light = 1.0 + light_strength * ((fx / width as f32 - 0.5) * light_angle.cos() + (fy / height as f32 - 0.5) * light_angle.sin());
            let px = Rgb(std::array::from_fn(|c| {
                (color[c] * 255.0 * light + noise_sigma * rng.normal()).clamp(0.0, 255.0) as u8
            }));
            photo.put_pixel(x as u32, y as u32, px);
            let class = if sd >= ring { TRIMAP_PET } else if sd <= -ring { TRIMAP_BACKGROUND } else { TRIMAP_BORDER };
            trimap.put_pixel(x as u32, y as u32, Luma([class]));
        }
    }
    (photo, trimap)
}

fn shade(c: [f32; 3], k: f32) -> [f32; 3] {
    [c[0] * k, c[1] * k, c[2] * k]
}

/// An animal-like region, in image coordinates, with its own rotated frame.
struct Shape {
    family: ShapeFamily,
    cx: f32,
    cy: f32,
    scale: f32,
    cos: f32,
    sin: f32,
    params: [f32; 12],
}

impl Shape {
    fn random(rng: &mut Rng, family: ShapeFamily, width: f32, height: f32) -> Self {
        let short = width.min(height);
        let angle = rng.range_f32(-0.6, 0.6) + if rng.chance(0.5) { std::f32::consts::PI } else { 0.0 };
        Shape {
            family,
            cx: width * rng.range_f32(0.38, 0.62),
            cy: height * rng.range_f32(0.38, 0.62),
            scale: short * rng.range_f32(0.3, 0.42),
            cos: angle.cos(),
            sin: angle.sin(),
            params: std::array::from_fn(|_| rng.f32()),
        }
    }

    /// Coordinates in the shape's frame (unit ≈ body radius).
    fn local(&self, x: f32, y: f32) -> (f32, f32) {
        let (dx, dy) = ((x - self.cx) / self.scale, (y - self.cy) / self.scale);
        (dx * self.cos + dy * self.sin, -dx * self.sin + dy * self.cos)
    }

    // 6.28 rather than TAU: the literal is part of what every seed generates, and changing
    // it would change every synthetic dataset (and the smoke quality reference).
    #[allow(clippy::approx_constant)]
    fn contains(&self, x: f32, y: f32) -> bool {
        let (u, v) = self.local(x, y);
        let p = &self.params;
        match self.family {
            ShapeFamily::Quadruped => {
                let ellipse = |u: f32, v: f32, cu: f32, cv: f32, a: f32, b: f32| {
                    let (du, dv) = ((u - cu) / a, (v - cv) / b);
                    du * du + dv * dv < 1.0
                };
                let body = ellipse(u, v, 0.0, 0.0, 1.0, 0.5 + 0.15 * p[0]);
                let head_v = -0.45 - 0.2 * p[1];
                let head_r = 0.36 + 0.12 * p[2];
                let head = ellipse(u, v, 0.95, head_v, head_r, head_r * 0.9);
                // Ears: triangles on top of the head.
                let ear = |cu: f32| {
                    let base = head_v - head_r * 0.6;
                    let tip = base - 0.3 - 0.15 * p[3];
                    let half = 0.13 * (v - tip) / (base - tip);
                    v > tip && v < base && (u - cu).abs() < half
                };
                let ears = ear(0.95 - 0.17) || ear(0.95 + 0.17);
                let leg = |cu: f32| (u - cu).abs() < 0.09 && v > 0.2 && v < 0.95 + 0.15 * p[4];
                let legs = leg(-0.6) || leg(-0.35) || leg(0.35) || leg(0.6);
                let tail_dir = -0.4 - 0.8 * p[5];
                let (tu, tv) = (u + 0.95, v + 0.1);
                let along = tu * (-1.0) + tv * tail_dir.sin();
                let across = tu * tail_dir.sin() + tv;
                let tail = along > 0.0 && along < 0.75 && across.abs() < 0.07 + 0.03 * p[6];
                body || head || ears || legs || tail
            }
            ShapeFamily::Polar { spiky } => {
                let r = (u * u + v * v).sqrt();
                let theta = v.atan2(u);
                let mut radius = 0.95;
                let (k_lo, k_hi, amp) = if spiky { (4, 9, 0.16) } else { (2, 5, 0.12) };
                for (i, k) in (k_lo..=k_hi).enumerate() {
                    let a = amp * p[i % 12] / (1.0 + 0.3 * i as f32);
                    radius += a * (k as f32 * theta + 6.28 * p[(i + 6) % 12]).cos();
                }
                r < radius
            }
            ShapeFamily::Bean => {
                let a = 1.0 + 0.25 * p[0];
                let b = 0.5 + 0.2 * p[1];
                let power = 2.0 + 2.0 * p[2];
                let bend = (p[3] - 0.5) * 0.8;
                let vv = v - bend * u * u;
                (u / a).abs().powf(power) + (vv / b).abs().powf(power) < 1.0
            }
            ShapeFamily::Lobes => {
                let lobes = 3 + (p[0] * 3.0) as usize;
                let mut inside = u * u + v * v < 0.5 * 0.5;
                for i in 0..lobes {
                    let angle = 6.28 * (i as f32 / lobes as f32 + 0.15 * p[1 + i]);
                    let dist = 0.45 + 0.2 * p[5 + i];
                    let radius = 0.32 + 0.2 * p[(7 + i) % 12];
                    let (du, dv) = (u - dist * angle.cos(), v - dist * angle.sin());
                    inside |= du * du + dv * dv < radius * radius;
                }
                inside
            }
        }
    }
}

/// Pixel-wise signed Euclidean distance to the region's edge: positive inside, negative outside.
fn signed_distance(inside: &[bool], width: usize, height: usize) -> Vec<f32> {
    let to_outside = distance_transform(inside, width, height, false);
    let to_inside = distance_transform(inside, width, height, true);
    inside
        .iter()
        .enumerate()
        .map(|(i, &is_in)| if is_in { to_outside[i].sqrt() } else { -to_inside[i].sqrt() })
        .collect()
}

/// Squared distance from each pixel to the nearest pixel whose `inside` equals `target`
/// (Felzenszwalb & Huttenlocher's separable transform).
fn distance_transform(inside: &[bool], width: usize, height: usize, target: bool) -> Vec<f32> {
    const FAR: f32 = 1e12;
    let mut grid: Vec<f32> = inside.iter().map(|&v| if v == target { 0.0 } else { FAR }).collect();
    let mut column = vec![0.0; height];
    let mut out = vec![0.0; width.max(height)];
    for x in 0..width {
        for y in 0..height {
            column[y] = grid[y * width + x];
        }
        edt_1d(&column, &mut out[..height]);
        for y in 0..height {
            grid[y * width + x] = out[y];
        }
    }
    let mut row = vec![0.0; width];
    for y in 0..height {
        row.copy_from_slice(&grid[y * width..(y + 1) * width]);
        edt_1d(&row, &mut out[..width]);
        grid[y * width..(y + 1) * width].copy_from_slice(&out[..width]);
    }
    grid
}

fn edt_1d(f: &[f32], d: &mut [f32]) {
    let n = f.len();
    if n == 0 {
        return;
    }
    let key = |i: usize| f[i] as f64 + (i * i) as f64;
    let mut v = vec![0usize; n];
    let mut z = vec![0f64; n + 1];
    let mut k = 0usize;
    z[0] = f64::NEG_INFINITY;
    z[1] = f64::INFINITY;
    for q in 1..n {
        let mut s = (key(q) - key(v[k])) / (2.0 * (q - v[k]) as f64);
        while s <= z[k] {
            k -= 1;
            s = (key(q) - key(v[k])) / (2.0 * (q - v[k]) as f64);
        }
        k += 1;
        v[k] = q;
        z[k] = s;
        z[k + 1] = f64::INFINITY;
    }
    k = 0;
    for (q, out) in d.iter_mut().enumerate() {
        while z[k + 1] < q as f64 {
            k += 1;
        }
        let p = v[k];
        *out = (q as f32 - p as f32).powi(2) + f[p];
    }
}

/// Lattice value noise in [0, 1).
fn value_noise(seed: u32, x: f32, y: f32) -> f32 {
    let (x0, y0) = (x.floor(), y.floor());
    let (tx, ty) = (x - x0, y - y0);
    let (sx, sy) = (tx * tx * (3.0 - 2.0 * tx), ty * ty * (3.0 - 2.0 * ty));
    let (ix, iy) = (x0 as i32, y0 as i32);
    let h = |i: i32, j: i32| hash01(seed, i, j);
    let a = h(ix, iy) + sx * (h(ix + 1, iy) - h(ix, iy));
    let b = h(ix, iy + 1) + sx * (h(ix + 1, iy + 1) - h(ix, iy + 1));
    a + sy * (b - a)
}

fn hash01(seed: u32, i: i32, j: i32) -> f32 {
    let mut h = seed ^ (i as u32).wrapping_mul(0x27d4_eb2d) ^ (j as u32).wrapping_mul(0x1656_67b1);
    h = (h ^ (h >> 15)).wrapping_mul(0x85eb_ca6b);
    h = (h ^ (h >> 13)).wrapping_mul(0xc2b2_ae35);
    h ^= h >> 16;
    (h >> 8) as f32 / (1u32 << 24) as f32
}

/// Fractal (octave-summed) value noise in [0, 1).
fn fbm(seed: u32, x: f32, y: f32, octaves: u32) -> f32 {
    let (mut sum, mut amp, mut freq, mut norm) = (0.0, 1.0, 1.0, 0.0);
    for o in 0..octaves {
        sum += amp * value_noise(seed.wrapping_add(o * 7919), x * freq, y * freq);
        norm += amp;
        amp *= 0.5;
        freq *= 2.0;
    }
    sum / norm
}

fn hsv(h: f32, s: f32, v: f32) -> [f32; 3] {
    let c = v * s;
    let hp = (h.rem_euclid(360.0)) / 60.0;
    let x = c * (1.0 - (hp % 2.0 - 1.0).abs());
    let (r, g, b) = match hp as u32 {
        0 => (c, x, 0.0),
        1 => (x, c, 0.0),
        2 => (0.0, c, x),
        3 => (0.0, x, c),
        4 => (x, 0.0, c),
        _ => (c, 0.0, x),
    };
    let m = v - c;
    [r + m, g + m, b + m]
}

fn random_color(rng: &mut Rng) -> [f32; 3] {
    // Fur-like browns, greys and creams half the time; anything otherwise (for both pets and
    // backgrounds, so colour alone never separates them).
    if rng.chance(0.5) {
        hsv(rng.range_f32(15.0, 45.0), rng.range_f32(0.1, 0.7), rng.range_f32(0.2, 0.95))
    } else {
        hsv(rng.range_f32(0.0, 360.0), rng.range_f32(0.15, 0.85), rng.range_f32(0.25, 0.95))
    }
}

fn mix(a: [f32; 3], b: [f32; 3], t: f32) -> [f32; 3] {
    std::array::from_fn(|c| a[c] + (b[c] - a[c]) * t)
}

enum TextureKind {
    // Fur textures (in the shape's frame).
    Spots,
    Stripes,
    Fur,
    Patches,
    // Background textures (in image coordinates, unit = shorter side).
    Wood,
    Plaid,
    Tiles,
    Bokeh,
    Carpet,
    Gradient,
}

struct Texture {
    kind: TextureKind,
    a: [f32; 3],
    b: [f32; 3],
    seed: u32,
    freq: f32,
    angle: f32,
    blobs: Vec<(f32, f32, f32, [f32; 3])>,
}

impl Texture {
    fn random_fur(rng: &mut Rng) -> Self {
        let kind = match rng.range_usize(0, 4) {
            0 => TextureKind::Spots,
            1 => TextureKind::Stripes,
            2 => TextureKind::Fur,
            _ => TextureKind::Patches,
        };
        Self::with_kind(rng, kind)
    }

    fn random_background(rng: &mut Rng) -> Self {
        let kind = match rng.range_usize(0, 6) {
            0 => TextureKind::Wood,
            1 => TextureKind::Plaid,
            2 => TextureKind::Tiles,
            3 => TextureKind::Bokeh,
            4 => TextureKind::Carpet,
            _ => TextureKind::Gradient,
        };
        let mut t = Self::with_kind(rng, kind);
        if let TextureKind::Bokeh = t.kind {
            t.blobs = (0..rng.range_usize(8, 20))
                .map(|_| (rng.range_f32(0.0, 2.0), rng.range_f32(0.0, 2.0), rng.range_f32(0.05, 0.25), random_color(rng)))
                .collect();
        }
        t
    }

    fn with_kind(rng: &mut Rng, kind: TextureKind) -> Self {
        let a = random_color(rng);
        let mut b = random_color(rng);
        if (0..3).map(|c| (a[c] - b[c]).abs()).sum::<f32>() < 0.3 {
            b = mix(a, [1.0 - a[0], 1.0 - a[1], 1.0 - a[2]], 0.5);
        }
        Texture {
            kind,
            a,
            b,
            seed: rng.next_u64() as u32,
            freq: rng.range_f32(0.7, 1.4),
            angle: rng.range_f32(0.0, std::f32::consts::PI),
            blobs: Vec::new(),
        }
    }

    fn sample(&self, x: f32, y: f32) -> [f32; 3] {
        let f = self.freq;
        let (ca, sa) = (self.angle.cos(), self.angle.sin());
        let along = x * ca + y * sa;
        let across = -x * sa + y * ca;
        match self.kind {
            TextureKind::Spots => {
                let (gx, gy) = (x * 4.0 * f, y * 4.0 * f);
                let (cx, cy) = (gx.floor(), gy.floor());
                let mut nearest = f32::MAX;
                for dy in -1..=1 {
                    for dx in -1..=1 {
                        let (ix, iy) = (cx as i32 + dx, cy as i32 + dy);
                        let px = ix as f32 + hash01(self.seed, ix, iy);
                        let py = iy as f32 + hash01(self.seed ^ 0x55, ix, iy);
                        nearest = nearest.min((gx - px).powi(2) + (gy - py).powi(2));
                    }
                }
                let grain = 0.85 + 0.3 * fbm(self.seed ^ 1, x * 25.0, y * 25.0, 2);
                let base = if nearest.sqrt() < 0.3 + 0.1 * f { self.b } else { self.a };
                shade(base, grain)
            }
            TextureKind::Stripes => {
                let wobble = 1.5 * fbm(self.seed, x * 2.0, y * 2.0, 3);
                let s = ((along * 9.0 * f + wobble * 3.0).sin() * 0.5 + 0.5).powf(0.7);
                let grain = 0.85 + 0.3 * fbm(self.seed ^ 2, along * 40.0, across * 6.0, 2);
                shade(mix(self.a, self.b, s), grain)
            }
            TextureKind::Fur => {
                let streak = fbm(self.seed, along * 45.0 * f, across * 5.0, 3);
                let patch = fbm(self.seed ^ 3, x * 1.5, y * 1.5, 2);
                shade(mix(self.a, self.b, patch * 0.6), 0.6 + 0.7 * streak)
            }
            TextureKind::Patches => {
                let n = fbm(self.seed, x * 1.6 * f, y * 1.6 * f, 4);
                let t = ((n - 0.5) * 12.0).clamp(-1.0, 1.0) * 0.5 + 0.5;
                let grain = 0.8 + 0.4 * fbm(self.seed ^ 4, along * 30.0, across * 30.0, 2);
                shade(mix(self.a, self.b, t), grain)
            }
            TextureKind::Wood => {
                let n = fbm(self.seed, along * 2.0, across * 0.5, 4);
                let s = ((across * 14.0 * f + 8.0 * n).sin() * 0.5 + 0.5).powf(2.0);
                mix(self.a, self.b, 0.7 * s)
            }
            TextureKind::Plaid => {
                let sq = |t: f32| if (t * 6.0 * f).fract() < 0.35 { 1.0 } else { 0.0 };
                let t = 0.5 * (sq(along) + sq(across));
                shade(mix(self.a, self.b, t), 0.96 + 0.08 * fbm(self.seed, x * 8.0, y * 8.0, 1))
            }
            TextureKind::Tiles => {
                let (tx, ty) = ((along * 5.0 * f).fract(), (across * 5.0 * f).fract());
                let mortar = tx < 0.08 || ty < 0.08;
                let tile_shade = 0.85 + 0.3 * hash01(self.seed, (along * 5.0 * f) as i32, (across * 5.0 * f) as i32);
                if mortar { shade(self.b, 0.9) } else { shade(self.a, tile_shade) }
            }
            TextureKind::Bokeh => {
                let mut c = shade(self.a, 0.8 + 0.4 * fbm(self.seed, x * 2.0, y * 2.0, 2));
                for &(bx, by, r, color) in &self.blobs {
                    let d = ((x - bx).powi(2) + (y - by).powi(2)).sqrt();
                    if d < r {
                        c = mix(c, color, 0.6 * (1.0 - d / r).min(0.3) / 0.3);
                    }
                }
                c
            }
            TextureKind::Carpet => {
                // Out-of-focus clutter: soft, low-frequency blotches.
                let n = fbm(self.seed, x * 3.0 * f, y * 3.0 * f, 3);
                mix(self.a, self.b, n)
            }
            TextureKind::Gradient => {
                let t = (along * 0.7).clamp(0.0, 1.0);
                shade(mix(self.a, self.b, t), 0.85 + 0.3 * fbm(self.seed, x * 6.0, y * 6.0, 3))
            }
        }
    }
}

/// A flat, hard-edged object in the background (a ball, a cushion) in a fur colour: colour
/// alone must not say "pet".
struct Distractor {
    cx: f32,
    cy: f32,
    rx: f32,
    ry: f32,
    square: bool,
    color: [f32; 3],
}

impl Distractor {
    fn random(rng: &mut Rng, width: f32, height: f32, fur: &Texture) -> Self {
        let short = width.min(height);
        Distractor {
            cx: rng.range_f32(0.0, width),
            cy: rng.range_f32(0.0, height),
            rx: short * rng.range_f32(0.05, 0.15),
            ry: short * rng.range_f32(0.05, 0.15),
            square: rng.chance(0.5),
            color: if rng.chance(0.6) { fur.a } else { random_color(rng) },
        }
    }

    fn sample(&self, x: f32, y: f32) -> Option<[f32; 3]> {
        let (dx, dy) = ((x - self.cx) / self.rx, (y - self.cy) / self.ry);
        let inside = if self.square { dx.abs() < 1.0 && dy.abs() < 1.0 } else { dx * dx + dy * dy < 1.0 };
        inside.then(|| shade(self.color, 1.0 - 0.15 * dy.clamp(-1.0, 1.0)))
    }
}

/// Path of the generated dataset marker (for callers that want to know a root is synthetic).
pub fn marker_path(root: &Path) -> PathBuf {
    root.join(MARKER_FILE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distance_transform_matches_brute_force() {
        let (w, h) = (23, 17);
        let mut rng = Rng::new(3);
        let inside: Vec<bool> = (0..w * h).map(|_| rng.chance(0.1)).collect();
        let fast = distance_transform(&inside, w, h, true);
        for y in 0..h {
            for x in 0..w {
                let mut best = f32::MAX;
                for j in 0..h {
                    for i in 0..w {
                        if inside[j * w + i] {
                            best = best.min(((x as f32 - i as f32).powi(2)) + ((y as f32 - j as f32).powi(2)));
                        }
                    }
                }
                assert_eq!(fast[y * w + x], best, "at ({x}, {y})");
            }
        }
    }

    #[test]
    fn samples_are_deterministic_and_hold_all_classes() {
        for (i, breed) in BREEDS.iter().enumerate() {
            let (photo, trimap) = render_sample(&mut Rng::derive(7, i as u64), breed.shape);
            let (photo2, trimap2) = render_sample(&mut Rng::derive(7, i as u64), breed.shape);
            assert_eq!(photo, photo2);
            assert_eq!(trimap, trimap2);
            assert_eq!(photo.dimensions(), trimap.dimensions());
            let mut counts = [0usize; 4];
            for p in trimap.pixels() {
                counts[p.0[0] as usize] += 1;
            }
            let total = trimap.len() as f32;
            assert_eq!(counts[0], 0);
            for c in 1..=3 {
                assert!(counts[c] as f32 / total > 0.02, "{}: class {c} has {}", breed.name, counts[c]);
            }
        }
    }

    #[test]
    fn rows_follow_the_real_format() {
        let (stem, class, species, breed, trainval) = sample_row(0);
        assert_eq!((stem.as_str(), class, species, breed, trainval), ("Roundling_1", 1, 1, 1, true));
        let (stem, class, species, ..) = sample_row(BREEDS.len() + 4);
        assert_eq!((stem.as_str(), class, species), ("bean_hound_2", 5, 2));
    }
}
