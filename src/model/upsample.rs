//! From a model's logits at its input size to a photo's own size: bilinear up-sampling of the
//! logit planes (pixel-centre alignment, as PyTorch's `align_corners=False`), then argmax or
//! softmax. `predict`, `serve` and `evaluate --at-original-size` all use these, so a mask
//! scored by `evaluate` is the mask `predict` writes.

use image::GrayImage;
use rayon::prelude::*;

/// Bilinearly resizes `classes` logit planes of `size`×`size` to `width`×`height` (pixel-centre
/// alignment, like PyTorch's `align_corners=False`) and takes the argmax per pixel.
pub fn upsample_argmax(logits: &[f32], classes: usize, size: usize, width: u32, height: u32) -> GrayImage {
    upsample_argmax_with(logits, classes, size, width, height, true)
}

/// For each of `dst` output pixels, the two source pixels of a `size`-pixel axis and the weight
/// of the second (pixel-centre alignment, as PyTorch's `align_corners=False`).
fn bilinear_axis(dst: u32, size: usize) -> Vec<(usize, usize, f32)> {
    let scale = size as f32 / dst as f32;
    (0..dst)
        .map(|d| {
            let src = ((d as f32 + 0.5) * scale - 0.5).clamp(0.0, (size - 1) as f32);
            let lo = src.floor() as usize;
            (lo, (lo + 1).min(size - 1), src - lo as f32)
        })
        .collect()
}

/// Every class's row of an output line: source rows `y0` and `y1` blended by `fy`, into
/// `blend` (`classes × size` values).
fn blend_rows(logits: &[f32], classes: usize, size: usize, (y0, y1, fy): (usize, usize, f32), blend: &mut Vec<f32>) {
    let plane = size * size;
    blend.clear();
    for c in 0..classes {
        let p = &logits[c * plane..][..plane];
        let (top, bottom) = (&p[y0 * size..][..size], &p[y1 * size..][..size]);
        blend.extend(top.iter().zip(bottom).map(|(t, b)| t * (1.0 - fy) + b * fy));
    }
}

/// [`upsample_argmax`], its rows spread over rayon's threads when `parallel`. Bilinear
/// interpolation is separable: each output row first blends its two source rows of every
/// class (`classes × size` values), then each pixel blends two neighbours of that row.
pub fn upsample_argmax_with(logits: &[f32], classes: usize, size: usize, width: u32, height: u32, parallel: bool) -> GrayImage {
    let (xs, ys) = (bilinear_axis(width, size), bilinear_axis(height, size));
    let mut mask = GrayImage::new(width, height);
    let row_fn = |blend: &mut Vec<f32>, (y, row): (usize, &mut [u8])| {
        blend_rows(logits, classes, size, ys[y], blend);
        if classes == 3 {
            // The common case, unrolled (same arithmetic and tie rule as the loop below).
            let (r0, rest) = blend.split_at(size);
            let (r1, r2) = rest.split_at(size);
            for (out, &(x0, x1, fx)) in row.iter_mut().zip(&xs) {
                let lerp = |r: &[f32]| r[x0] * (1.0 - fx) + r[x1] * fx;
                let (v0, v1, v2) = (lerp(r0), lerp(r1), lerp(r2));
                *out = if v1 > v0 {
                    if v2 > v1 { 2 } else { 1 }
                } else if v2 > v0 {
                    2
                } else {
                    0
                };
            }
            return;
        }
        for (out, &(x0, x1, fx)) in row.iter_mut().zip(&xs) {
            let mut best = (f32::NEG_INFINITY, 0u8);
            for c in 0..classes {
                let r = &blend[c * size..][..size];
                let v = r[x0] * (1.0 - fx) + r[x1] * fx;
                if v > best.0 {
                    best = (v, c as u8);
                }
            }
            *out = best.1;
        }
    };
    if parallel {
        mask.par_chunks_mut(width as usize).enumerate().for_each_init(Vec::new, row_fn);
    } else {
        let mut blend = Vec::with_capacity(classes * size);
        mask.chunks_mut(width as usize).enumerate().for_each(|r| row_fn(&mut blend, r));
    }
    mask
}

/// Class probabilities `[classes, height, width]` at the photo's size: the logits up-sampled
/// with the arithmetic of [`upsample_argmax_with`] (so their argmax is its mask), then a
/// softmax per pixel.
pub fn upsample_softmax(logits: &[f32], classes: usize, size: usize, width: u32, height: u32) -> Vec<f32> {
    let (xs, ys) = (bilinear_axis(width, size), bilinear_axis(height, size));
    let (w, h) = (width as usize, height as usize);
    let mut out = vec![0f32; classes * w * h];
    let mut blend = Vec::with_capacity(classes * size);
    let mut v = vec![0f32; classes];
    for y in 0..h {
        blend_rows(logits, classes, size, ys[y], &mut blend);
        for (x, &(x0, x1, fx)) in xs.iter().enumerate() {
            let mut max = f32::NEG_INFINITY;
            for c in 0..classes {
                let r = &blend[c * size..][..size];
                v[c] = r[x0] * (1.0 - fx) + r[x1] * fx;
                max = max.max(v[c]);
            }
            let mut sum = 0.0;
            for value in v.iter_mut() {
                *value = (*value - max).exp();
                sum += *value;
            }
            for c in 0..classes {
                out[(c * h + y) * w + x] = v[c] / sum;
            }
        }
    }
    out
}


