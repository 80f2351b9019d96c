//! Training-time augmentation of a resized sample (`data.augment`): one geometric warp — random
//! resized crop and rotation composed into a single inverse mapping — applied to the photo
//! (bilinear) and its mask (nearest neighbour) together, with borders reflected so no label is
//! invented; then colour jitter, blur and noise on the photo only. Every draw comes from the
//! sample's own generator (derived from the run's seed, the epoch and the sample), so a resumed
//! run sees the same augmentations and thread timing changes nothing.

use image::{GrayImage, Luma, Rgb, RgbImage};

use crate::config::AugmentConfig;
use crate::util::rng::Rng;

/// Folds `v` into `[0, n - 1]` by reflection about the edges (…2 1 0 1 2… n-2 n-1 n-2…).
fn reflect(v: f32, n: usize) -> f32 {
    let max = (n - 1) as f32;
    if max <= 0.0 {
        return 0.0;
    }
    let period = 2.0 * max;
    let mut t = v.rem_euclid(period);
    if t > max {
        t = period - t;
    }
    t
}

/// Where each output pixel samples its source: `src = centre + M · (out − out_centre)`.
#[derive(Debug, Clone, Copy)]
struct Warp {
    centre: (f32, f32),
    /// Row-major 2×2 matrix.
    m: [f32; 4],
}

impl Warp {
    fn identity(size: usize) -> Self {
        let c = (size as f32 - 1.0) / 2.0;
        Warp { centre: (c, c), m: [1.0, 0.0, 0.0, 1.0] }
    }

    fn source(&self, x: f32, y: f32, size: usize) -> (f32, f32) {
        let c = (size as f32 - 1.0) / 2.0;
        let (dx, dy) = (x - c, y - c);
        (self.centre.0 + self.m[0] * dx + self.m[1] * dy, self.centre.1 + self.m[2] * dx + self.m[3] * dy)
    }
}

/// Applies `data.augment` to one `size`×`size` sample.
pub struct Augmenter {
    config: AugmentConfig,
}

impl Augmenter {
    pub fn new(config: AugmentConfig) -> Self {
        Self { config }
    }

    /// The augmented photo and mask (same size as given).
    pub fn apply(&self, image: &RgbImage, mask: &GrayImage, rng: &mut Rng) -> (RgbImage, GrayImage) {
        let size = image.width() as usize;
        debug_assert_eq!((image.width(), image.height()), mask.dimensions());
        let c = &self.config;
        // Draw every decision up front, in a fixed order, whether or not a transform is on.
        let (crop, crop_area, crop_ratio, crop_x, crop_y) = (rng.chance(c.crop.p), rng.f32(), rng.f32(), rng.f32(), rng.f32());
        let (rotate, angle) = (rng.chance(c.rotate.p), rng.range_f32(-1.0, 1.0));
        let (color, jitter) = (rng.chance(c.color.p), [rng.range_f32(-1.0, 1.0), rng.range_f32(-1.0, 1.0), rng.range_f32(-1.0, 1.0), rng.range_f32(-1.0, 1.0)]);
        let (blur, blur_t) = (rng.chance(c.blur.p), rng.f32());
        let noise = rng.chance(c.noise.p);

        let mut warp = Warp::identity(size);
        if crop {
            let s = size as f32;
            let area = c.crop.scale[0] + (c.crop.scale[1] - c.crop.scale[0]) * crop_area;
            let (lr0, lr1) = (c.crop.ratio[0].ln(), c.crop.ratio[1].ln());
            let ratio = (lr0 + (lr1 - lr0) * crop_ratio).exp();
            let w = (s * (area * ratio).sqrt()).min(s);
            let h = (s * (area / ratio).sqrt()).min(s);
            let x0 = (s - w) * crop_x;
            let y0 = (s - h) * crop_y;
            warp.centre = (x0 + w / 2.0 - 0.5, y0 + h / 2.0 - 0.5);
            warp.m = [w / s, 0.0, 0.0, h / s];
        }
        if rotate {
            let theta = (c.rotate.degrees * angle).to_radians();
            let (sin, cos) = theta.sin_cos();
            let [a, b, cc, d] = warp.m;
            // Rotate the output grid, then apply the crop's scaling.
            warp.m = [a * cos - b * sin, a * sin + b * cos, cc * cos - d * sin, cc * sin + d * cos];
        }
        let (mut photo, mask) = if crop || rotate { warp_pair(image, mask, &warp) } else { (image.clone(), mask.clone()) };
        if color {
            jitter_colors(&mut photo, &c.color, jitter);
        }
        if blur {
            let sigma = c.blur.sigma[0] + (c.blur.sigma[1] - c.blur.sigma[0]) * blur_t;
            photo = gaussian_blur(&photo, sigma);
        }
        if noise {
            let std = c.noise.std * 255.0;
            for p in photo.pixels_mut() {
                for v in p.0.iter_mut() {
                    *v = (*v as f32 + rng.normal() * std).round().clamp(0.0, 255.0) as u8;
                }
            }
        }
        (photo, mask)
    }
}

fn warp_pair(image: &RgbImage, mask: &GrayImage, warp: &Warp) -> (RgbImage, GrayImage) {
    let size = image.width() as usize;
    let raw = image.as_raw();
    let mut photo = RgbImage::new(size as u32, size as u32);
    let mut out_mask = GrayImage::new(size as u32, size as u32);
    for y in 0..size {
        for x in 0..size {
            let (sx, sy) = warp.source(x as f32, y as f32, size);
            let (sx, sy) = (reflect(sx, size), reflect(sy, size));
            // Mask: the nearest source label.
            let (nx, ny) = ((sx.round() as usize).min(size - 1), (sy.round() as usize).min(size - 1));
            out_mask.put_pixel(x as u32, y as u32, Luma([mask.get_pixel(nx as u32, ny as u32).0[0]]));
            // Photo: bilinear.
            let (x0, y0) = (sx.floor() as usize, sy.floor() as usize);
            let (x1, y1) = ((x0 + 1).min(size - 1), (y0 + 1).min(size - 1));
            let (fx, fy) = (sx - x0 as f32, sy - y0 as f32);
            let at = |xx: usize, yy: usize, c: usize| raw[(yy * size + xx) * 3 + c] as f32;
            let px = std::array::from_fn(|c| {
                let top = at(x0, y0, c) * (1.0 - fx) + at(x1, y0, c) * fx;
                let bottom = at(x0, y1, c) * (1.0 - fx) + at(x1, y1, c) * fx;
                (top * (1.0 - fy) + bottom * fy).round().clamp(0.0, 255.0) as u8
            });
            photo.put_pixel(x as u32, y as u32, Rgb(px));
        }
    }
    (photo, out_mask)
}

/// Brightness, contrast, saturation (factors 1 ± bound · t) and hue (a rotation of the chroma
/// plane in YIQ by bound · t of a turn), `t` in [-1, 1] each.
fn jitter_colors(photo: &mut RgbImage, c: &crate::config::ColorAugment, t: [f32; 4]) {
    let brightness = 1.0 + c.brightness * t[0];
    let contrast = 1.0 + c.contrast * t[1];
    let saturation = 1.0 + c.saturation * t[2];
    let (sin, cos) = (c.hue * t[3] * std::f32::consts::TAU).sin_cos();
    let gray = |p: [f32; 3]| 0.299 * p[0] + 0.587 * p[1] + 0.114 * p[2];
    let n = (photo.width() * photo.height()) as f32;
    let mean = photo.pixels().map(|p| gray(p.0.map(|v| v as f32 * brightness))).sum::<f32>() / n.max(1.0);
    for p in photo.pixels_mut() {
        let mut v = p.0.map(|x| x as f32 * brightness);
        v = v.map(|x| (x - mean) * contrast + mean);
        let g = gray(v);
        v = v.map(|x| g + (x - g) * saturation);
        // Hue: rotate I and Q.
        let (yy, i, q) = (g, 0.596 * v[0] - 0.274 * v[1] - 0.322 * v[2], 0.211 * v[0] - 0.523 * v[1] + 0.312 * v[2]);
        let (i, q) = (i * cos - q * sin, i * sin + q * cos);
        let rgb = [yy + 0.956 * i + 0.621 * q, yy - 0.272 * i - 0.647 * q, yy - 1.106 * i + 1.703 * q];
        p.0 = rgb.map(|x| x.round().clamp(0.0, 255.0) as u8);
    }
}

/// Separable Gaussian blur, borders reflected.
fn gaussian_blur(photo: &RgbImage, sigma: f32) -> RgbImage {
    let radius = (2.0 * sigma).ceil().max(1.0) as isize;
    let weights: Vec<f32> = (-radius..=radius).map(|d| (-(d * d) as f32 / (2.0 * sigma * sigma)).exp()).collect();
    let total: f32 = weights.iter().sum();
    let weights: Vec<f32> = weights.iter().map(|w| w / total).collect();
    let (w, h) = (photo.width() as usize, photo.height() as usize);
    let raw = photo.as_raw();
    let idx = |v: isize, n: usize| reflect(v as f32, n) as usize;
    let mut tmp = vec![0f32; w * h * 3];
    for y in 0..h {
        for x in 0..w {
            for c in 0..3 {
                tmp[(y * w + x) * 3 + c] = (-radius..=radius).zip(&weights).map(|(d, wt)| raw[(y * w + idx(x as isize + d, w)) * 3 + c] as f32 * wt).sum();
            }
        }
    }
    let mut out = RgbImage::new(w as u32, h as u32);
    for y in 0..h {
        for x in 0..w {
            let px = std::array::from_fn(|c| {
                let v: f32 = (-radius..=radius).zip(&weights).map(|(d, wt)| tmp[(idx(y as isize + d, h) * w + x) * 3 + c] * wt).sum();
                v.round().clamp(0.0, 255.0) as u8
            });
            out.put_pixel(x as u32, y as u32, Rgb(px));
        }
    }
    out
}

/// What `segctl train --preview-augment N` wrote.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Preview {
    pub path: std::path::PathBuf,
    pub samples: usize,
    /// Augmented samples per second through the loader (decode, resize, augment, normalize),
    /// on the loader's threads.
    pub samples_per_s: f64,
}

/// Writes a contact sheet of `n` training samples as the loader gives them with
/// `data.augment` and `data.hflip` (masks blended over the photos), to `out`.
pub fn preview(config: &crate::config::Config, n: usize, out: &std::path::Path) -> anyhow::Result<Preview> {
    use super::pipeline::{Loader, LoaderConfig};
    use super::transform::{Normalization, PALETTE};
    anyhow::ensure!(n >= 1, "--preview-augment needs at least 1 sample");
    let set = std::sync::Arc::new(super::PetDataset::open(&config.data.root, super::Split::Train, config.data.val_fraction, config.data.seed)?);
    let size = config.data.image_size;
    // Identity normalization: the batch holds the pixels / 255.
    let norm = Normalization { mean: [0.0; 3], std: [1.0; 3] };
    let loader = Loader::new(
        set.clone(),
        LoaderConfig {
            batch_size: n.min(set.len()).max(1),
            image_size: size as u32,
            normalization: norm,
            shuffle: true,
            hflip: config.data.hflip,
            augment: Some(config.data.augment.clone()),
            seed: config.train.seed,
            drop_last: false,
            prefetch: 1,
            cache_dir: None,
            workers: config.data.workers,
            memory_cache_bytes: 0,
            jpeg_dct_scaling: config.serve.jpeg_dct_scaling,
        },
    )?;
    let started = std::time::Instant::now();
    let batch = loader.epoch(1, 0).next().ok_or_else(|| anyhow::anyhow!("the train split is empty"))?;
    let seconds = started.elapsed().as_secs_f64();
    let count = batch.len();
    let cols = (count as f64).sqrt().ceil() as usize;
    let rows = count.div_ceil(cols);
    let gap = 4;
    let cell = size + gap;
    let mut sheet = RgbImage::from_pixel((cols * cell - gap) as u32, (rows * cell - gap) as u32, Rgb([255, 255, 255]));
    let plane = size * size;
    for k in 0..count {
        let img = &batch.images[k * 3 * plane..][..3 * plane];
        let mask = &batch.masks[k * plane..][..plane];
        let (ox, oy) = ((k % cols) * cell, (k / cols) * cell);
        for y in 0..size {
            for x in 0..size {
                let at = y * size + x;
                let color = PALETTE.get(mask[at] as usize).copied().unwrap_or([0, 0, 0]);
                let px = std::array::from_fn(|c| ((img[c * plane + at] * 255.0) * 0.6 + color[c] as f32 * 0.4).round().clamp(0.0, 255.0) as u8);
                sheet.put_pixel((ox + x) as u32, (oy + y) as u32, Rgb(px));
            }
        }
    }
    let mut png = Vec::new();
    sheet.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)?;
    crate::util::fs::write_atomic(out, &png)?;
    Ok(Preview { path: out.to_path_buf(), samples: count, samples_per_s: count as f64 / seconds.max(1e-9) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::AugmentConfig;

    /// A photo whose every pixel's colour says its class exactly (blocks of three colours).
    fn labelled(size: u32) -> (RgbImage, GrayImage) {
        let colors = [[250u8, 10, 10], [10, 250, 10], [10, 10, 250]];
        let class = |x: u32, y: u32| (((x / 11) + 2 * (y / 7)) % 3) as u8;
        let photo = RgbImage::from_fn(size, size, |x, y| Rgb(colors[class(x, y) as usize]));
        let mask = GrayImage::from_fn(size, size, |x, y| Luma([class(x, y)]));
        (photo, mask)
    }

    fn every_geometric() -> AugmentConfig {
        let mut c = AugmentConfig::default();
        c.crop.p = 1.0;
        c.crop.scale = [0.3, 1.0];
        c.rotate.p = 1.0;
        c.rotate.degrees = 30.0;
        c
    }

    #[test]
    fn masks_stay_aligned_with_their_photos_through_every_warp() {
        let (photo, mask) = labelled(64);
        let aug = Augmenter::new(every_geometric());
        for seed in 0..50 {
            let (p, m) = aug.apply(&photo, &mask, &mut Rng::new(seed));
            assert!(m.pixels().all(|l| l.0[0] <= 2), "no invented labels");
            let mut checked = 0;
            for y in 1..63 {
                for x in 1..63 {
                    // Away from block edges (where bilinear blends colours), the colour is the label's.
                    let l = m.get_pixel(x, y).0[0];
                    let uniform = (-1i32..=1).all(|dy| (-1i32..=1).all(|dx| m.get_pixel((x as i32 + dx) as u32, (y as i32 + dy) as u32).0[0] == l));
                    if !uniform {
                        continue;
                    }
                    let px = p.get_pixel(x, y).0;
                    let brightest = (0..3).max_by_key(|&c| px[c]).unwrap();
                    assert_eq!(brightest as u8, l, "seed {seed} at ({x}, {y}): colour {px:?}, label {l}");
                    checked += 1;
                }
            }
            assert!(checked > 500, "seed {seed}: only {checked} interior pixels");
        }
    }

    #[test]
    fn the_same_generator_gives_the_same_sample_and_off_means_untouched() {
        let (photo, mask) = labelled(32);
        let mut all = every_geometric();
        all.color.p = 1.0;
        all.blur.p = 1.0;
        all.noise.p = 1.0;
        let aug = Augmenter::new(all);
        let a = aug.apply(&photo, &mask, &mut Rng::new(7));
        let b = aug.apply(&photo, &mask, &mut Rng::new(7));
        assert_eq!(a, b);
        let c = aug.apply(&photo, &mask, &mut Rng::new(8));
        assert_ne!(a.0, c.0);
        let off = Augmenter::new(AugmentConfig::default()).apply(&photo, &mask, &mut Rng::new(7));
        assert_eq!(off, (photo, mask));
    }

    #[test]
    fn colour_jitter_and_blur_change_the_photo_only() {
        let (photo, mask) = labelled(32);
        let mut c = AugmentConfig::default();
        c.color.p = 1.0;
        c.color.brightness = 0.5;
        c.blur.p = 1.0;
        let (p, m) = Augmenter::new(c).apply(&photo, &mask, &mut Rng::new(3));
        assert_eq!(m, mask);
        assert_ne!(p, photo);
        assert_eq!(reflect(-1.0, 5), 1.0);
        assert_eq!(reflect(5.0, 5), 3.0);
        assert_eq!(reflect(2.5, 5), 2.5);
    }
}
