//! Inference, shared by `predict` and `serve`: a loaded model that turns photos of any size
//! into class-id masks at their own size (the same preprocessing as training, bilinear
//! up-sampling of the logits, then argmax), and the renderings users look at: the colour
//! mask, the overlay on the photo and the side-by-side figure.

use std::path::Path;

use anyhow::{Context, Result};
use candle_core::Device;
use image::{GrayImage, Luma, Rgb, RgbImage};
use rayon::prelude::*;

use crate::data::transform;
use crate::model::ModelSpec;
use crate::model::inference::{InferenceModel, InferenceOptions};
use crate::model_store::{self, LoadedModel, ModelManifest, ModelOrigin};

pub use crate::data::transform::{PALETTE, colorize};
pub use crate::model::upsample::{upsample_argmax, upsample_argmax_with, upsample_softmax};
/// Opacity of the colour mask over the photo in overlays.
const OVERLAY_ALPHA: f32 = 0.45;

/// A model ready to segment photos: its compiled inference plan (on CPU) and provenance.
pub struct Predictor {
    model: InferenceModel,
    origin: ModelOrigin,
    manifest: Option<ModelManifest>,
    device: Device,
}

impl Predictor {
    /// Loads a checkpoint file, run folder, exported model folder or version folder.
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        Self::load_with(path, device, InferenceOptions::default())
    }

    pub fn load_with(path: &Path, device: &Device, options: InferenceOptions) -> Result<Self> {
        Self::from_loaded(model_store::load_any(path, device)?, options)
    }

    /// Compiles a loaded model for inference (the candle model is dropped on CPU).
    /// A version runs at the precision its export checked (`options.precision` overrides).
    pub fn from_loaded(loaded: LoadedModel, mut options: InferenceOptions) -> Result<Self> {
        options.precision = options.precision.or(Some(loaded.precision()));
        if options.calibration.is_none() {
            options.calibration = loaded.calibration();
        }
        let device = loaded.state.device.clone();
        let model = InferenceModel::new(loaded.state, options)?;
        Ok(Self { model, origin: loaded.origin, manifest: loaded.manifest, device })
    }

    /// The precision the compiled model runs at (a version's own unless overridden).
    pub fn precision(&self) -> crate::engine::Precision {
        self.model.precision()
    }

    /// The engine and kernels running the model (for example `plan (avx512, int8 on avx512vnni)`).
    pub fn engine(&self) -> String {
        self.model.engine()
    }

    pub fn spec(&self) -> &ModelSpec {
        self.model.spec()
    }

    pub fn origin(&self) -> &ModelOrigin {
        &self.origin
    }

    pub fn manifest(&self) -> Option<&ModelManifest> {
        self.manifest.as_ref()
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The model as the inference engine runs it.
    pub fn model(&self) -> &InferenceModel {
        &self.model
    }

    /// Normalized model input `[3, S, S]` for one photo (the training preprocessing).
    pub fn prepare(&self, image: &RgbImage) -> Vec<f32> {
        let spec = self.spec();
        transform::preprocess(image, spec.input_size as u32, &spec.normalization)
    }

    /// Logits `[classes, S, S]` for each prepared input, in one model call.
    pub fn logits(&self, inputs: &[Vec<f32>]) -> Result<Vec<Vec<f32>>> {
        self.logits_with(inputs, 0)
    }

    /// Threads one model call may use (the most [`Self::logits_with`] runs on).
    pub fn max_threads(&self) -> usize {
        self.model.max_threads()
    }

    /// [`Self::logits`] on `threads` threads (0 = [`Self::max_threads`]).
    pub fn logits_with(&self, inputs: &[Vec<f32>], threads: usize) -> Result<Vec<Vec<f32>>> {
        if inputs.is_empty() {
            return Ok(Vec::new());
        }
        let spec = self.spec();
        let size = spec.input_size;
        let mut flat = Vec::with_capacity(inputs.len() * 3 * size * size);
        for input in inputs {
            if input.len() != 3 * size * size {
                anyhow::bail!("input has {} values, the model expects 3x{size}x{size}", input.len());
            }
            flat.extend_from_slice(input);
        }
        let mut values = Vec::new();
        self.model.logits_into_threads(&flat, inputs.len(), threads, &mut values).context("inference failed")?;
        Ok(values.chunks(spec.num_classes() * size * size).map(|c| c.to_vec()).collect())
    }

    /// The class-id mask at `width`×`height` from one image's logits.
    pub fn mask_from_logits(&self, logits: &[f32], width: u32, height: u32) -> GrayImage {
        let spec = self.spec();
        upsample_argmax(logits, spec.num_classes(), spec.input_size, width, height)
    }

    /// [`Self::mask_from_logits`] on the calling thread only (a server stage holding one core).
    pub fn mask_from_logits_seq(&self, logits: &[f32], width: u32, height: u32) -> GrayImage {
        let spec = self.spec();
        upsample_argmax_with(logits, spec.num_classes(), spec.input_size, width, height, false)
    }

    /// Class-id masks, each at its photo's size.
    pub fn segment(&self, images: &[&RgbImage]) -> Result<Vec<GrayImage>> {
        let sized: Vec<(&RgbImage, u32, u32)> = images.iter().map(|img| (*img, img.width(), img.height())).collect();
        self.segment_sized(&sized)
    }

    /// Class-id masks of `width`×`height` each, the model input resized from the given pixels
    /// (a photo decoded at a reduced DCT scale, masked at its full size).
    pub fn segment_sized(&self, photos: &[(&RgbImage, u32, u32)]) -> Result<Vec<GrayImage>> {
        let inputs: Vec<Vec<f32>> = photos.par_iter().map(|(img, _, _)| self.prepare(img)).collect();
        let logits = self.logits(&inputs)?;
        Ok(logits.par_iter().zip(photos.par_iter()).map(|(l, (_, w, h))| self.mask_from_logits(l, *w, *h)).collect())
    }
}

/// The photo with the colour mask blended over it.
pub fn overlay(photo: &RgbImage, mask: &GrayImage) -> RgbImage {
    RgbImage::from_fn(photo.width(), photo.height(), |x, y| {
        let Rgb(p) = *photo.get_pixel(x, y);
        let Luma([c]) = *mask.get_pixel(x.min(mask.width() - 1), y.min(mask.height() - 1));
        let color = PALETTE.get(c as usize).copied().unwrap_or([0, 0, 0]);
        Rgb(std::array::from_fn(|i| (p[i] as f32 * (1.0 - OVERLAY_ALPHA) + color[i] as f32 * OVERLAY_ALPHA) as u8))
    })
}

/// Photo | colour mask | overlay, side by side with a thin white gap.
pub fn side_by_side(photo: &RgbImage, mask: &GrayImage) -> RgbImage {
    const GAP: u32 = 8;
    let (w, h) = photo.dimensions();
    let mut out = RgbImage::from_pixel(3 * w + 2 * GAP, h, Rgb([255, 255, 255]));
    for (i, panel) in [photo.clone(), colorize(mask), overlay(photo, mask)].iter().enumerate() {
        image::imageops::replace(&mut out, panel, (i as u32 * (w + GAP)) as i64, 0);
    }
    out
}

/// PNG bytes of any 8-bit image.
pub fn encode_png<P, C>(image: &image::ImageBuffer<P, C>) -> Result<Vec<u8>>
where
    P: image::PixelWithColorType<Subpixel = u8>,
    C: std::ops::Deref<Target = [u8]>,
{
    let mut out = Vec::new();
    image
        .write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png)
        .context("PNG encoding failed")?;
    Ok(out)
}

/// PNG bytes with fast compression settings (what a server answers: a class-id mask is
/// mostly long runs, which fast deflate packs nearly as well).
pub fn encode_png_fast<P, C>(image: &image::ImageBuffer<P, C>) -> Result<Vec<u8>>
where
    P: image::PixelWithColorType<Subpixel = u8>,
    C: std::ops::Deref<Target = [u8]>,
{
    use image::ImageEncoder;
    use image::codecs::png::{CompressionType, FilterType, PngEncoder};
    let mut out = Vec::new();
    PngEncoder::new_with_quality(&mut out, CompressionType::Fast, FilterType::Adaptive)
        .write_image(image.as_raw(), image.width(), image.height(), P::COLOR_TYPE)
        .context("PNG encoding failed")?;
    Ok(out)
}

/// Share of each class in a mask.
pub fn class_fractions(mask: &GrayImage, classes: usize) -> Vec<f64> {
    let mut counts = vec![0u64; classes];
    for Luma([c]) in mask.pixels() {
        if let Some(n) = counts.get_mut(*c as usize) {
            *n += 1;
        }
    }
    let total = mask.len().max(1) as f64;
    counts.iter().map(|n| *n as f64 / total).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probabilities_sum_to_one_and_their_argmax_is_the_mask() {
        let mut seed = 3u32;
        let logits: Vec<f32> = (0..3 * 16 * 16)
            .map(|_| {
                seed = seed.wrapping_mul(1664525).wrapping_add(1013904223);
                (seed >> 8) as f32 / (1u32 << 24) as f32 * 8.0 - 4.0
            })
            .collect();
        let (w, h) = (37u32, 23u32);
        let probs = upsample_softmax(&logits, 3, 16, w, h);
        let mask = upsample_argmax(&logits, 3, 16, w, h);
        let n = (w * h) as usize;
        for i in 0..n {
            let p = [probs[i], probs[n + i], probs[2 * n + i]];
            assert!((p.iter().sum::<f32>() - 1.0).abs() < 1e-5);
            let best = (0..3).max_by(|&a, &b| p[a].total_cmp(&p[b])).unwrap();
            assert_eq!(best as u8, mask.as_raw()[i], "pixel {i}: {p:?}");
        }
    }

    #[test]
    fn upsampling_keeps_the_argmax_layout() {
        // 2×2 logits: class 0 wins on the left column, class 1 on the right.
        let logits = [5.0, -5.0, 5.0, -5.0, -5.0, 5.0, -5.0, 5.0];
        let mask = upsample_argmax(&logits, 2, 2, 6, 3);
        assert_eq!(mask.dimensions(), (6, 3));
        for y in 0..3 {
            assert_eq!(mask.get_pixel(0, y).0[0], 0);
            assert_eq!(mask.get_pixel(5, y).0[0], 1);
        }
    }

    #[test]
    fn the_three_class_path_agrees_with_the_general_one() {
        let mut seed = 7u32;
        let logits: Vec<f32> = (0..3 * 16 * 16)
            .map(|_| {
                seed = seed.wrapping_mul(1664525).wrapping_add(1013904223);
                ((seed >> 16) % 7) as f32 - 3.0 // many exact ties
            })
            .collect();
        // Four classes whose last never wins run the general loop.
        let mut four = logits.clone();
        four.extend(std::iter::repeat_n(-100.0, 16 * 16));
        for (w, h) in [(37, 23), (16, 16), (5, 40)] {
            let a = upsample_argmax(&logits, 3, 16, w, h);
            let b = upsample_argmax(&four, 4, 16, w, h);
            assert_eq!(a.as_raw(), b.as_raw(), "{w}x{h}");
        }
    }

    #[test]
    fn renderings_have_the_photo_size() {
        let photo = RgbImage::from_pixel(7, 5, Rgb([100, 100, 100]));
        let mask = GrayImage::from_fn(7, 5, |x, _| Luma([(x % 3) as u8]));
        assert_eq!(colorize(&mask).get_pixel(0, 0).0, PALETTE[0]);
        assert_eq!(overlay(&photo, &mask).dimensions(), (7, 5));
        assert_eq!(side_by_side(&photo, &mask).dimensions(), (7 * 3 + 16, 5));
        let f = class_fractions(&mask, 3);
        assert!((f.iter().sum::<f64>() - 1.0).abs() < 1e-12);
    }
}
