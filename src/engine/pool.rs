//! The plan's memory-bound steps on padded NHWC maps, vectorized along channels: the input
//! and output conversions (planar NCHW at the plan's edges), 2×2 max pooling, depthwise 3×3
//! convolution with its bias and clamp, elementwise sums and channel copies. Each works on
//! one output row per item.

#![allow(unsafe_op_in_unsafe_fn)]

use super::plan::{Ctx, View};
use super::simd::Simd;

/// Planar `[N, C, H, W]` input → a padded NHWC map.
#[derive(Debug, Clone)]
pub struct InputStep {
    pub output: View,
}

impl InputStep {
    pub fn items(&self, n: usize) -> usize {
        n * self.output.h
    }

    /// # Safety
    /// `ctx` must hold this plan's arena and an input of `n × C × H × W` floats.
    pub unsafe fn run(&self, ctx: &Ctx, item: usize) {
        let v = &self.output;
        let (img, y) = (item / v.h, item % v.h);
        let dst = ctx.ptr(v).add((img * v.positions() + (y + 1) * (v.w + 2) + 1) * v.cs);
        let plane = v.h * v.w;
        let src = ctx.input.add(img * v.c * plane + y * v.w);
        for x in 0..v.w {
            for c in 0..v.c {
                *dst.add(x * v.cs + c) = *src.add(c * plane + x);
            }
        }
    }
}

/// A padded NHWC map → planar `[N, C, H, W]` output.
#[derive(Debug, Clone)]
pub struct OutputStep {
    pub input: View,
}

impl OutputStep {
    pub fn items(&self, n: usize) -> usize {
        n * self.input.h
    }

    /// # Safety
    /// `ctx` must hold this plan's arena and an output of `n × C × H × W` floats.
    pub unsafe fn run(&self, ctx: &Ctx, item: usize) {
        let v = &self.input;
        let (img, y) = (item / v.h, item % v.h);
        let src = ctx.ptr(v).add((img * v.positions() + (y + 1) * (v.w + 2) + 1) * v.cs);
        let plane = v.h * v.w;
        let dst = ctx.output.add(img * v.c * plane + y * v.w);
        for c in 0..v.c {
            for x in 0..v.w {
                *dst.add(c * plane + x) = *src.add(x * v.cs + c);
            }
        }
    }
}

/// 2×2 max pooling, stride 2.
#[derive(Debug, Clone)]
pub struct MaxPoolStep {
    pub input: View,
    pub output: View,
}

impl MaxPoolStep {
    pub fn items(&self, n: usize) -> usize {
        n * self.output.h
    }

    /// # Safety
    /// As [`InputStep::run`]; `S` must be available.
    #[inline(always)]
    pub unsafe fn run<S: Simd>(&self, ctx: &Ctx, item: usize) {
        let (i, o) = (&self.input, &self.output);
        let (img, y) = (item / o.h, item % o.h);
        let src = ctx.ptr(i).add((img * i.positions() + (2 * y + 1) * (i.w + 2) + 1) * i.cs);
        let below = src.add((i.w + 2) * i.cs);
        let dst = ctx.ptr(o).add((img * o.positions() + (y + 1) * (o.w + 2) + 1) * o.cs);
        for x in 0..o.w {
            let (a, b) = (src.add(2 * x * i.cs), below.add(2 * x * i.cs));
            let mut c = 0;
            while c < o.c {
                let n = o.c - c;
                let m = S::max(
                    S::max(S::load_n(a.add(c), n), S::load_n(a.add(i.cs + c), n)),
                    S::max(S::load_n(b.add(c), n), S::load_n(b.add(i.cs + c), n)),
                );
                S::store_n(dst.add(x * o.cs + c), m, n);
                c += S::LANES;
            }
        }
    }
}

/// Depthwise 3×3 convolution (stride 1 or 2, padding 1) with bias and clamp.
#[derive(Debug, Clone)]
pub struct DepthwiseStep {
    pub input: View,
    pub output: View,
    pub stride: usize,
    /// `[tap][C rounded up to vectors]`.
    pub weights: Vec<f32>,
    /// `[C rounded up]`.
    pub bias: Vec<f32>,
    pub padded_c: usize,
    pub min: f32,
    pub max: f32,
}

impl DepthwiseStep {
    pub fn items(&self, n: usize) -> usize {
        n * self.output.h
    }

    /// # Safety
    /// As [`MaxPoolStep::run`].
    #[inline(always)]
    pub unsafe fn run<S: Simd>(&self, ctx: &Ctx, item: usize) {
        let (i, o) = (&self.input, &self.output);
        let (img, y) = (item / o.h, item % o.h);
        let s = self.stride;
        let wp = i.w + 2;
        // Padded input row of the top taps: y·s − 1 + 1.
        let top = ctx.ptr(i).add((img * i.positions() + y * s * wp) * i.cs);
        let dst = ctx.ptr(o).add((img * o.positions() + (y + 1) * (o.w + 2) + 1) * o.cs);
        let (lo, hi) = (S::splat(self.min), S::splat(self.max));
        let mut c = 0;
        while c < o.c {
            let n = o.c - c;
            let mut w = [S::zero(); 9];
            for (t, v) in w.iter_mut().enumerate() {
                *v = S::load(self.weights.as_ptr().add(t * self.padded_c + c));
            }
            let b = S::load(self.bias.as_ptr().add(c));
            for x in 0..o.w {
                let p = top.add(x * s * i.cs + c);
                let mut acc = b;
                for ky in 0..3 {
                    let row = p.add(ky * wp * i.cs);
                    for kx in 0..3 {
                        acc = S::fma(S::load_n(row.add(kx * i.cs), n), w[ky * 3 + kx], acc);
                    }
                }
                S::store_n(dst.add(x * o.cs + c), S::min(S::max(acc, lo), hi), n);
            }
            c += S::LANES;
        }
    }
}

/// `output = a + b` (a sum the compiler could not fold into a convolution), or a channel
/// copy when `b` is `None`.
#[derive(Debug, Clone)]
pub struct EltwiseStep {
    pub a: View,
    pub b: Option<View>,
    pub output: View,
}

impl EltwiseStep {
    pub fn items(&self, n: usize) -> usize {
        n * self.output.h
    }

    /// # Safety
    /// As [`MaxPoolStep::run`].
    #[inline(always)]
    pub unsafe fn run<S: Simd>(&self, ctx: &Ctx, item: usize) {
        let o = &self.output;
        let (img, y) = (item / o.h, item % o.h);
        let row = |v: &View| ctx.ptr(v).add((img * v.positions() + (y + 1) * (v.w + 2) + 1) * v.cs);
        let (pa, dst) = (row(&self.a), row(o));
        let pb = self.b.as_ref().map(|b| (row(b), b.cs));
        for x in 0..o.w {
            let mut c = 0;
            while c < o.c {
                let n = o.c - c;
                let mut v = S::load_n(pa.add(x * self.a.cs + c), n);
                if let Some((pb, cs)) = pb {
                    v = S::add(v, S::load_n(pb.add(x * cs + c), n));
                }
                S::store_n(dst.add(x * o.cs + c), v, n);
                c += S::LANES;
            }
        }
    }
}
