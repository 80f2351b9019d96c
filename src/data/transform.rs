//! The one preprocessing path used by training, evaluation and inference alike: resize
//! (bilinear for photos, nearest for masks), optional horizontal flip, and normalization
//! into planar CHW floats.

use image::{GrayImage, RgbImage, imageops::FilterType};
use serde::{Deserialize, Serialize};

/// Per-channel normalization recorded with a model: `(pixel / 255 − mean) / std`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Normalization {
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

impl Normalization {
    /// ImageNet statistics, for encoders pretrained on ImageNet.
    pub const IMAGENET: Normalization = Normalization { mean: [0.485, 0.456, 0.406], std: [0.229, 0.224, 0.225] };
    /// Plain [0, 1] scaling, for models trained from scratch.
    pub const UNIT: Normalization = Normalization { mean: [0.0; 3], std: [1.0; 3] };
}

/// Resizes a photo to `size`×`size` with bilinear filtering.
pub fn resize_image(image: &RgbImage, size: u32) -> RgbImage {
    if image.dimensions() == (size, size) {
        return image.clone();
    }
    image::imageops::resize(image, size, size, FilterType::Triangle)
}

/// Resizes a class-id mask to `size`×`size` with nearest-neighbour sampling (no new labels).
pub fn resize_mask(mask: &GrayImage, size: u32) -> GrayImage {
    if mask.dimensions() == (size, size) {
        return mask.clone();
    }
    image::imageops::resize(mask, size, size, FilterType::Nearest)
}

/// Writes a `size`×`size` RGB image as normalized planar floats `[3, size, size]` into `out`,
/// mirrored left-right when `flip` is set.
pub fn normalize_into(image: &RgbImage, norm: &Normalization, flip: bool, out: &mut [f32]) {
    let (w, h) = image.dimensions();
    let (w, h) = (w as usize, h as usize);
    debug_assert_eq!(out.len(), 3 * w * h);
    let scale: [f32; 3] = std::array::from_fn(|c| 1.0 / (255.0 * norm.std[c]));
    let shift: [f32; 3] = std::array::from_fn(|c| norm.mean[c] / norm.std[c]);
    let raw = image.as_raw();
    for y in 0..h {
        for x in 0..w {
            let sx = if flip { w - 1 - x } else { x };
            let px = &raw[(y * w + sx) * 3..][..3];
            for c in 0..3 {
                out[c * w * h + y * w + x] = px[c] as f32 * scale[c] - shift[c];
            }
        }
    }
}

/// Copies a `size`×`size` mask into `out` (class ids), mirrored when `flip` is set.
pub fn mask_into(mask: &GrayImage, flip: bool, out: &mut [u8]) {
    let (w, h) = mask.dimensions();
    let (w, h) = (w as usize, h as usize);
    let raw = mask.as_raw();
    for y in 0..h {
        for x in 0..w {
            let sx = if flip { w - 1 - x } else { x };
            out[y * w + x] = raw[y * w + sx];
        }
    }
}

/// Full preprocessing of one photo for a model: resize then normalize (no flip).
pub fn preprocess(image: &RgbImage, size: u32, norm: &Normalization) -> Vec<f32> {
    let resized = resize_image(image, size);
    let mut out = vec![0f32; 3 * (size * size) as usize];
    normalize_into(&resized, norm, false, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalization_and_flip() {
        let mut img = RgbImage::new(2, 1);
        img.put_pixel(0, 0, image::Rgb([255, 0, 0]));
        img.put_pixel(1, 0, image::Rgb([0, 255, 0]));
        let mut out = vec![0f32; 6];
        normalize_into(&img, &Normalization::UNIT, false, &mut out);
        assert_eq!(out, vec![1.0, 0.0, 0.0, 1.0, 0.0, 0.0]);
        normalize_into(&img, &Normalization::UNIT, true, &mut out);
        assert_eq!(out, vec![0.0, 1.0, 1.0, 0.0, 0.0, 0.0]);
        normalize_into(&img, &Normalization::IMAGENET, false, &mut out);
        assert!((out[0] - (1.0 - 0.485) / 0.229).abs() < 1e-5);
    }

    #[test]
    fn masks_resize_without_new_labels() {
        let mask = GrayImage::from_fn(37, 23, |x, _| image::Luma([(x % 3) as u8]));
        let small = resize_mask(&mask, 16);
        assert!(small.pixels().all(|p| p.0[0] <= 2));
        assert_eq!(small.dimensions(), (16, 16));
    }
}
