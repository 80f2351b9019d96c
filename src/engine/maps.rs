//! Memory-bound kernels on padded NHWC maps for training's CPU ops: layout conversions,
//! BatchNorm with its activation (statistics, normalization and the backward pass),
//! max-pooling's backward pass, depth-to-space, channel concatenation, depthwise
//! convolutions' gradients, and bias gradients. Each is a [`RowKernel`]: independent items
//! (an image row, usually) that a caller spreads over its threads with [`run_items`].
//!
//! Maps are `n` images of `(h + 2) × (w + 2)` pixels of `cs` floats, the border zero (no
//! kernel here writes a border, except where it says so), vectorized along channels.

#![allow(unsafe_op_in_unsafe_fn)]

use std::ops::Range;

use super::graph::Act;
use super::simd::Simd;
use super::{Isa, SimdJob, dispatch};

pub use super::grad::MapShape;

/// Work made of independent items.
pub trait RowKernel: Sync {
    /// How many items there are.
    fn items(&self) -> usize;

    /// Runs item `i`.
    ///
    /// # Safety
    /// The instruction set of `S` is available; the kernel's pointers are valid; no other
    /// thread runs the same item meanwhile.
    unsafe fn item<S: Simd>(&self, i: usize);
}

/// Runs items `range` of `kernel` with the kernels of `isa`.
///
/// # Safety
/// As [`RowKernel::item`]; `isa` is supported by this CPU.
pub unsafe fn run_items<K: RowKernel>(isa: Isa, kernel: &K, range: Range<usize>) {
    struct Job<'a, K> {
        kernel: &'a K,
        range: Range<usize>,
    }
    impl<K: RowKernel> SimdJob for Job<'_, K> {
        #[inline(always)]
        unsafe fn run<S: Simd>(&self) {
            for i in self.range.clone() {
                self.kernel.item::<S>(i);
            }
        }
    }
    dispatch(isa, &Job { kernel, range })
}

/// A raw pointer that may cross threads (the kernels' items write disjoint memory).
#[derive(Debug, Clone, Copy)]
pub struct Ptr(pub *mut f32);
// SAFETY: kernels only write through it at item-disjoint addresses.
unsafe impl Send for Ptr {}
unsafe impl Sync for Ptr {}

/// A read-only counterpart of [`Ptr`].
#[derive(Debug, Clone, Copy)]
pub struct CPtr(pub *const f32);
// SAFETY: read-only.
unsafe impl Send for CPtr {}
unsafe impl Sync for CPtr {}

impl MapShape {
    /// Address of pixel `(y, x)` (padded coordinates) of image `img`.
    #[inline(always)]
    unsafe fn at(&self, base: *const f32, img: usize, y: usize, x: usize) -> *const f32 {
        base.add(img * self.image_floats() + (y * (self.w + 2) + x) * self.cs)
    }
}

/// `dst[x·cs_d + c] = src[x·cs_s + c]` for `w` pixels of `c` channels.
#[inline(always)]
unsafe fn copy_pixels<S: Simd>(dst: *mut f32, cs_d: usize, src: *const f32, cs_s: usize, w: usize, c: usize) {
    for x in 0..w {
        let mut k = 0;
        while k < c {
            S::store_n(dst.add(x * cs_d + k), S::load_n(src.add(x * cs_s + k), c - k), c - k);
            k += S::LANES;
        }
    }
}

// ---- Layout conversions ----

/// Planar `[n, c, h, w]` → padded NHWC, border included (zeroed): one item per image row
/// (the first and last rows of each image also zero the top and bottom borders).
pub struct ToPadded {
    pub map: MapShape,
    pub n: usize,
    pub src: CPtr,
    pub dst: Ptr,
}

impl RowKernel for ToPadded {
    fn items(&self) -> usize {
        self.n * self.map.h
    }

    #[inline(always)]
    unsafe fn item<S: Simd>(&self, i: usize) {
        let m = self.map;
        let (img, y) = (i / m.h, i % m.h);
        let wp = m.w + 2;
        let image = self.dst.0.add(img * m.image_floats());
        if y == 0 {
            std::ptr::write_bytes(image, 0, wp * m.cs);
        }
        if y + 1 == m.h {
            std::ptr::write_bytes(image.add((m.h + 1) * wp * m.cs), 0, wp * m.cs);
        }
        let row = image.add((y + 1) * wp * m.cs);
        std::ptr::write_bytes(row, 0, m.cs);
        std::ptr::write_bytes(row.add((wp - 1) * m.cs), 0, m.cs);
        let plane = m.h * m.w;
        let src = self.src.0.add(img * m.c * plane + y * m.w);
        for x in 0..m.w {
            for c in 0..m.c {
                *row.add((x + 1) * m.cs + c) = *src.add(c * plane + x);
            }
        }
    }
}

/// Padded NHWC → planar `[n, c, h, w]`: one item per image row.
pub struct FromPadded {
    pub map: MapShape,
    pub n: usize,
    pub src: CPtr,
    pub dst: Ptr,
}

impl RowKernel for FromPadded {
    fn items(&self) -> usize {
        self.n * self.map.h
    }

    #[inline(always)]
    unsafe fn item<S: Simd>(&self, i: usize) {
        let m = self.map;
        let (img, y) = (i / m.h, i % m.h);
        let src = m.at(self.src.0, img, y + 1, 1);
        let plane = m.h * m.w;
        let dst = self.dst.0.add(img * m.c * plane + y * m.w);
        for c in 0..m.c {
            for x in 0..m.w {
                *dst.add(c * plane + x) = *src.add(x * m.cs + c);
            }
        }
    }
}

// ---- BatchNorm ----

/// Per-row statistics of a map for BatchNorm: for each channel, the row's sum of `x − K` and
/// of `(x − K)²` about the row's first pixel `K` (shifted sums stay accurate when the mean
/// is large against the spread), written to `out[item][3][c]` as `(K, Σ(x − K), Σ(x − K)²)`.
/// Combine rows with [`combine_stats`].
pub struct RowStats {
    pub map: MapShape,
    pub n: usize,
    pub x: CPtr,
    pub out: Ptr,
}

impl RowKernel for RowStats {
    fn items(&self) -> usize {
        self.n * self.map.h
    }

    #[inline(always)]
    unsafe fn item<S: Simd>(&self, i: usize) {
        let m = self.map;
        let (img, y) = (i / m.h, i % m.h);
        let row = m.at(self.x.0, img, y + 1, 1);
        let out = self.out.0.add(i * 3 * m.c);
        let mut c = 0;
        while c < m.c {
            let valid = m.c - c;
            let k = S::load_n(row.add(c), valid);
            let (mut s1, mut s2) = (S::zero(), S::zero());
            for x in 1..m.w {
                let d = S::sub(S::load_n(row.add(x * m.cs + c), valid), k);
                s1 = S::add(s1, d);
                s2 = S::fma(d, d, s2);
            }
            S::store_n(out.add(c), k, valid);
            S::store_n(out.add(m.c + c), s1, valid);
            S::store_n(out.add(2 * m.c + c), s2, valid);
            c += S::LANES;
        }
    }
}

/// Mean and biased variance per channel from [`RowStats`] rows of `w` pixels each (Chan et
/// al.'s pairwise combination, in f64).
pub fn combine_stats(rows: &[f32], c: usize, w: usize) -> (Vec<f64>, Vec<f64>) {
    let mut mean = vec![0f64; c];
    let mut m2 = vec![0f64; c];
    let mut count = 0f64;
    let nw = w as f64;
    for row in rows.chunks_exact(3 * c) {
        let total = count + nw;
        for ch in 0..c {
            let k = row[ch] as f64;
            let (s1, s2) = (row[c + ch] as f64, row[2 * c + ch] as f64);
            let row_mean = k + s1 / nw;
            let row_m2 = (s2 - s1 * s1 / nw).max(0.0);
            let delta = row_mean - mean[ch];
            mean[ch] += delta * nw / total;
            m2[ch] += row_m2 + delta * delta * count * nw / total;
        }
        count = total;
    }
    let var = m2.iter().map(|v| v / count.max(1.0)).collect();
    (mean, var)
}

/// `y = act(x·scale + shift)` per channel over the interior; `y`'s border is zeroed.
/// `scale` and `shift` are padded to whole vectors.
pub struct Affine {
    pub map: MapShape,
    pub n: usize,
    pub x: CPtr,
    pub y: Ptr,
    pub scale: CPtr,
    pub shift: CPtr,
    pub act: Act,
}

impl RowKernel for Affine {
    fn items(&self) -> usize {
        self.n * self.map.h
    }

    #[inline(always)]
    unsafe fn item<S: Simd>(&self, i: usize) {
        let m = self.map;
        let (img, y) = (i / m.h, i % m.h);
        zero_row_borders(self.y.0, m, img, y);
        let src = m.at(self.x.0, img, y + 1, 1);
        let dst = m.at(self.y.0, img, y + 1, 1) as *mut f32;
        let (lo, hi) = self.act.bounds();
        let (lo, hi) = (S::splat(lo), S::splat(hi));
        let mut c = 0;
        while c < m.c {
            let valid = m.c - c;
            let a = S::load(self.scale.0.add(c));
            let b = S::load(self.shift.0.add(c));
            for x in 0..m.w {
                let v = S::fma(S::load_n(src.add(x * m.cs + c), valid), a, b);
                S::store_n(dst.add(x * m.cs + c), S::min(S::max(v, lo), hi), valid);
            }
            c += S::LANES;
        }
    }
}

/// Zeroes the border pixels of row `y` (unpadded) of image `img`, and the top/bottom border
/// rows with the first/last row.
#[inline(always)]
unsafe fn zero_row_borders(map: *mut f32, m: MapShape, img: usize, y: usize) {
    let wp = m.w + 2;
    let image = map.add(img * m.image_floats());
    if y == 0 {
        std::ptr::write_bytes(image, 0, wp * m.cs);
    }
    if y + 1 == m.h {
        std::ptr::write_bytes(image.add((m.h + 1) * wp * m.cs), 0, wp * m.cs);
    }
    let row = image.add((y + 1) * wp * m.cs);
    std::ptr::write_bytes(row, 0, m.cs);
    std::ptr::write_bytes(row.add((wp - 1) * m.cs), 0, m.cs);
}

/// `g · act'(z)` from the pre-activation `z`: `g` where `lo < z < hi` (the derivative at
/// the bounds is taken as 0, as PyTorch's ReLU does at 0).
#[inline(always)]
unsafe fn act_mask<S: Simd>(act: Act, z: S::V, g: S::V, lo: S::V, hi: S::V) -> S::V {
    match act {
        Act::Identity => g,
        _ => S::select_between(z, lo, hi, g),
    }
}

/// Per-row sums for BatchNorm's backward pass: with `g = dy · act'(x·scale + shift)`, the
/// row's `Σ g` and `Σ g·(x − mean)` per channel, to `out[item][2][c]`.
pub struct NormGradSums {
    pub map: MapShape,
    pub n: usize,
    pub x: CPtr,
    pub dy: CPtr,
    pub scale: CPtr,
    pub shift: CPtr,
    pub mean: CPtr,
    pub act: Act,
    pub out: Ptr,
}

impl RowKernel for NormGradSums {
    fn items(&self) -> usize {
        self.n * self.map.h
    }

    #[inline(always)]
    unsafe fn item<S: Simd>(&self, i: usize) {
        let m = self.map;
        let (img, y) = (i / m.h, i % m.h);
        let xs = m.at(self.x.0, img, y + 1, 1);
        let gs = m.at(self.dy.0, img, y + 1, 1);
        let out = self.out.0.add(i * 2 * m.c);
        let (lo, hi) = self.act.bounds();
        let (lo, hi) = (S::splat(lo), S::splat(hi));
        let mut c = 0;
        while c < m.c {
            let valid = m.c - c;
            let (a, b, mu) = (S::load(self.scale.0.add(c)), S::load(self.shift.0.add(c)), S::load(self.mean.0.add(c)));
            let (mut sg, mut sgx) = (S::zero(), S::zero());
            for x in 0..m.w {
                let xv = S::load_n(xs.add(x * m.cs + c), valid);
                let g = act_mask::<S>(self.act, S::fma(xv, a, b), S::load_n(gs.add(x * m.cs + c), valid), lo, hi);
                sg = S::add(sg, g);
                sgx = S::fma(g, S::sub(xv, mu), sgx);
            }
            S::store_n(out.add(c), sg, valid);
            S::store_n(out.add(m.c + c), sgx, valid);
            c += S::LANES;
        }
    }
}

/// BatchNorm's input gradient: `dx = k·(g − mean_g − (x − mean)·q)` per channel, with
/// `k = γ/σ`, `q = mean(g·(x − mean))/σ²` and `g` as in [`NormGradSums`]; `dx`'s border is
/// zeroed. With `batch_stats` false (evaluation-mode statistics, a frozen layer) the
/// statistics are constants: `dx = scale·g`.
pub struct NormGradInput {
    pub map: MapShape,
    pub n: usize,
    pub x: CPtr,
    pub dy: CPtr,
    pub dx: Ptr,
    pub scale: CPtr,
    pub shift: CPtr,
    pub mean: CPtr,
    /// `mean_g` per channel.
    pub mean_g: CPtr,
    /// `q` per channel.
    pub q: CPtr,
    pub act: Act,
    pub batch_stats: bool,
}

impl RowKernel for NormGradInput {
    fn items(&self) -> usize {
        self.n * self.map.h
    }

    #[inline(always)]
    unsafe fn item<S: Simd>(&self, i: usize) {
        let m = self.map;
        let (img, y) = (i / m.h, i % m.h);
        zero_row_borders(self.dx.0, m, img, y);
        let xs = m.at(self.x.0, img, y + 1, 1);
        let gs = m.at(self.dy.0, img, y + 1, 1);
        let dst = m.at(self.dx.0, img, y + 1, 1) as *mut f32;
        let (lo, hi) = self.act.bounds();
        let (lo, hi) = (S::splat(lo), S::splat(hi));
        let mut c = 0;
        while c < m.c {
            let valid = m.c - c;
            let (a, b) = (S::load(self.scale.0.add(c)), S::load(self.shift.0.add(c)));
            if !self.batch_stats {
                for x in 0..m.w {
                    let xv = S::load_n(xs.add(x * m.cs + c), valid);
                    let g = act_mask::<S>(self.act, S::fma(xv, a, b), S::load_n(gs.add(x * m.cs + c), valid), lo, hi);
                    S::store_n(dst.add(x * m.cs + c), S::mul(g, a), valid);
                }
            } else {
                let (mu, mg, q) = (S::load(self.mean.0.add(c)), S::load(self.mean_g.0.add(c)), S::load(self.q.0.add(c)));
                for x in 0..m.w {
                    let xv = S::load_n(xs.add(x * m.cs + c), valid);
                    let g = act_mask::<S>(self.act, S::fma(xv, a, b), S::load_n(gs.add(x * m.cs + c), valid), lo, hi);
                    // k·(g − mean_g − (x − μ)·q), with k = scale.
                    let inner = S::sub(S::sub(g, mg), S::mul(S::sub(xv, mu), q));
                    S::store_n(dst.add(x * m.cs + c), S::mul(a, inner), valid);
                }
            }
            c += S::LANES;
        }
    }
}

/// Per-row sums of a map's channels (a bias gradient): `out[item][c]`.
pub struct RowSums {
    pub map: MapShape,
    pub n: usize,
    pub x: CPtr,
    pub out: Ptr,
}

impl RowKernel for RowSums {
    fn items(&self) -> usize {
        self.n * self.map.h
    }

    #[inline(always)]
    unsafe fn item<S: Simd>(&self, i: usize) {
        let m = self.map;
        let (img, y) = (i / m.h, i % m.h);
        let row = m.at(self.x.0, img, y + 1, 1);
        let out = self.out.0.add(i * m.c);
        let mut c = 0;
        while c < m.c {
            let valid = m.c - c;
            let mut s = S::zero();
            for x in 0..m.w {
                s = S::add(s, S::load_n(row.add(x * m.cs + c), valid));
            }
            S::store_n(out.add(c), s, valid);
            c += S::LANES;
        }
    }
}

// ---- Pooling, depth-to-space, concatenation ----

/// Max-pooling's input gradient: each window's gradient goes to its first maximum (row-major
/// order), the rest of the window gets zero; odd edges and the border are zero. One item per
/// output row.
pub struct MaxPoolGrad {
    /// The input map (`h`, `w` may be odd).
    pub map: MapShape,
    pub n: usize,
    pub x: CPtr,
    pub dy: CPtr,
    pub dx: Ptr,
}

impl RowKernel for MaxPoolGrad {
    fn items(&self) -> usize {
        self.n * self.map.h.div_ceil(2)
    }

    #[inline(always)]
    unsafe fn item<S: Simd>(&self, i: usize) {
        let m = self.map;
        let oh = m.h / 2;
        let ow = m.w / 2;
        let rows = m.h.div_ceil(2);
        let (img, oy) = (i / rows, i % rows);
        let o = MapShape { h: oh, w: ow, c: m.c, cs: m.c };
        for y in [2 * oy, 2 * oy + 1] {
            if y < m.h {
                zero_row_borders(self.dx.0, m, img, y);
            }
        }
        if oy >= oh {
            // The odd last row: no window.
            let row = m.at(self.dx.0, img, 2 * oy + 1, 1) as *mut f32;
            std::ptr::write_bytes(row, 0, m.w * m.cs);
            return;
        }
        let r0 = m.at(self.x.0, img, 2 * oy + 1, 1);
        let r1 = r0.add((m.w + 2) * m.cs);
        let d0 = m.at(self.dx.0, img, 2 * oy + 1, 1) as *mut f32;
        let d1 = d0.add((m.w + 2) * m.cs);
        let g = o.at(self.dy.0, img, oy + 1, 1);
        if m.w % 2 == 1 {
            std::ptr::write_bytes(d0.add((m.w - 1) * m.cs), 0, m.cs);
            std::ptr::write_bytes(d1.add((m.w - 1) * m.cs), 0, m.cs);
        }
        let zero = S::zero();
        for ox in 0..ow {
            let (p00, p01) = (r0.add(2 * ox * m.cs), r0.add((2 * ox + 1) * m.cs));
            let (p10, p11) = (r1.add(2 * ox * m.cs), r1.add((2 * ox + 1) * m.cs));
            let mut c = 0;
            while c < m.c {
                let valid = m.c - c;
                let (a, b) = (S::load_n(p00.add(c), valid), S::load_n(p01.add(c), valid));
                let (e, f) = (S::load_n(p10.add(c), valid), S::load_n(p11.add(c), valid));
                let best = S::max(S::max(a, b), S::max(e, f));
                let gv = S::load_n(g.add(ox * m.cs + c), valid);
                // The first maximum in order a, b, e, f takes the gradient.
                let ga = S::select_eq(a, best, gv, zero);
                let rest = S::select_eq(a, best, zero, gv);
                let gb = S::select_eq(b, best, rest, zero);
                let rest = S::select_eq(b, best, zero, rest);
                let ge = S::select_eq(e, best, rest, zero);
                let gf = S::select_eq(e, best, zero, rest);
                S::store_n(d0.add(2 * ox * m.cs + c), ga, valid);
                S::store_n(d0.add((2 * ox + 1) * m.cs + c), gb, valid);
                S::store_n(d1.add(2 * ox * m.cs + c), ge, valid);
                S::store_n(d1.add((2 * ox + 1) * m.cs + c), gf, valid);
                c += S::LANES;
            }
        }
    }
}

/// Depth-to-space by 2 (`[C·4, H, W] → [C, 2H, 2W]`, channel `c·4 + 2a + b` to sub-pixel
/// `(a, b)`), or its inverse (space-to-depth, the backward pass) with `inverse`. `map` is the
/// small side (`C·4` channels); one item per row of it; the large side's border is zeroed.
pub struct DepthToSpace {
    pub map: MapShape,
    pub n: usize,
    pub src: CPtr,
    pub dst: Ptr,
    pub inverse: bool,
}

impl RowKernel for DepthToSpace {
    fn items(&self) -> usize {
        self.n * self.map.h
    }

    #[inline(always)]
    unsafe fn item<S: Simd>(&self, i: usize) {
        let m = self.map;
        let c = m.c / 4;
        let big = MapShape { h: 2 * m.h, w: 2 * m.w, c, cs: c };
        let (img, y) = (i / m.h, i % m.h);
        if !self.inverse {
            zero_row_borders(self.dst.0, big, img, 2 * y);
            zero_row_borders(self.dst.0, big, img, 2 * y + 1);
        } else {
            zero_row_borders(self.dst.0, m, img, y);
        }
        let small = m.at(if self.inverse { self.dst.0 } else { self.src.0 }, img, y + 1, 1) as *mut f32;
        for a in 0..2 {
            let large = big.at(if self.inverse { self.src.0 } else { self.dst.0 }, img, 2 * y + a + 1, 1) as *mut f32;
            for x in 0..m.w {
                for b in 0..2 {
                    let s = small.add(x * m.cs);
                    let l = large.add((2 * x + b) * c);
                    for k in 0..c {
                        if self.inverse {
                            *s.add(k * 4 + 2 * a + b) = *l.add(k);
                        } else {
                            *l.add(k) = *s.add(k * 4 + 2 * a + b);
                        }
                    }
                }
            }
        }
    }
}

/// Copies channels between maps of the same size: `dst[..][d0..d0 + c] = src[..][s0..s0 + c]`
/// (a concatenation writes each input into its channel range; its backward pass reads each
/// range back out). One item per row; zeroes `dst`'s border pixels of the row when
/// `zero_border` (set it for one of the copies into a fresh map).
pub struct CopyChannels {
    pub h: usize,
    pub w: usize,
    pub n: usize,
    pub src: CPtr,
    pub src_cs: usize,
    pub s0: usize,
    pub dst: Ptr,
    pub dst_cs: usize,
    pub d0: usize,
    pub c: usize,
    pub zero_border: bool,
}

impl RowKernel for CopyChannels {
    fn items(&self) -> usize {
        self.n * self.h
    }

    #[inline(always)]
    unsafe fn item<S: Simd>(&self, i: usize) {
        let (img, y) = (i / self.h, i % self.h);
        let sm = MapShape { h: self.h, w: self.w, c: self.src_cs, cs: self.src_cs };
        let dm = MapShape { h: self.h, w: self.w, c: self.dst_cs, cs: self.dst_cs };
        if self.zero_border {
            zero_row_borders(self.dst.0, dm, img, y);
        }
        let src = sm.at(self.src.0, img, y + 1, 1).add(self.s0);
        let dst = (dm.at(self.dst.0, img, y + 1, 1) as *mut f32).add(self.d0);
        copy_pixels::<S>(dst, self.dst_cs, src, self.src_cs, self.w, self.c);
    }
}

// ---- Depthwise convolutions' gradients ----

/// Input gradient of a depthwise 3×3 convolution with stride 2 and padding 1: each output
/// pixel's gradient spreads over its 3×3 input window, `dx[in] += dy[out]·w[tap]`. One item
/// per image (windows of neighbouring rows overlap); `dx` is overwritten, border zero.
/// `weights` is `[tap][C rounded up to vectors]`.
pub struct DepthwiseGradInputS2 {
    /// The input map (the gradient's shape).
    pub map: MapShape,
    /// The output map.
    pub out: MapShape,
    pub n: usize,
    pub dy: CPtr,
    pub dx: Ptr,
    pub weights: CPtr,
    pub padded_c: usize,
}

impl RowKernel for DepthwiseGradInputS2 {
    fn items(&self) -> usize {
        self.n
    }

    #[inline(always)]
    unsafe fn item<S: Simd>(&self, img: usize) {
        let (m, o) = (self.map, self.out);
        let base = self.dx.0.add(img * m.image_floats());
        std::ptr::write_bytes(base, 0, m.image_floats());
        let wp = m.w + 2;
        for oy in 0..o.h {
            let g = o.at(self.dy.0, img, oy + 1, 1);
            for ky in 0..3 {
                // Padded input row oy·2 − 1 + ky + 1.
                let row = base.add((2 * oy + ky) * wp * m.cs);
                for ox in 0..o.w {
                    let mut c = 0;
                    while c < m.c {
                        let valid = m.c - c;
                        let gv = S::load_n(g.add(ox * o.cs + c), valid);
                        for kx in 0..3 {
                            let w = S::load(self.weights.0.add((ky * 3 + kx) * self.padded_c + c));
                            let p = row.add((2 * ox + kx) * m.cs + c);
                            S::store_n(p, S::fma(gv, w, S::load_n(p, valid)), valid);
                        }
                        c += S::LANES;
                    }
                }
            }
        }
        // What landed on the border belongs to the padding.
        super::kernels::zero_borders(base, 1, m.h, m.w, m.cs);
    }
}

/// Weight gradient of a depthwise 3×3 convolution (padding 1, stride 1 or 2): per output
/// row, `Σ dy[out]·x[in]` per tap and channel, to `out[item][tap][padded_c]`.
pub struct DepthwiseGradWeight {
    pub map: MapShape,
    pub out: MapShape,
    pub n: usize,
    pub stride: usize,
    pub x: CPtr,
    pub dy: CPtr,
    pub sums: Ptr,
    pub padded_c: usize,
}

impl RowKernel for DepthwiseGradWeight {
    fn items(&self) -> usize {
        self.n * self.out.h
    }

    #[inline(always)]
    unsafe fn item<S: Simd>(&self, i: usize) {
        let (m, o) = (self.map, self.out);
        let (img, oy) = (i / o.h, i % o.h);
        let s = self.stride;
        let g = o.at(self.dy.0, img, oy + 1, 1);
        // Padded input row of the top taps: oy·s − 1 + 1.
        let top = m.at(self.x.0, img, oy * s, 0);
        let wp = m.w + 2;
        let out = self.sums.0.add(i * 9 * self.padded_c);
        let mut c = 0;
        while c < m.c {
            let valid = m.c - c;
            let mut acc = [S::zero(); 9];
            for ox in 0..o.w {
                let gv = S::load_n(g.add(ox * o.cs + c), valid);
                let p = top.add(ox * s * m.cs + c);
                for ky in 0..3 {
                    for kx in 0..3 {
                        let xv = S::load_n(p.add((ky * wp + kx) * m.cs), valid);
                        acc[ky * 3 + kx] = S::fma(gv, xv, acc[ky * 3 + kx]);
                    }
                }
            }
            for (t, a) in acc.iter().enumerate() {
                S::store(out.add(t * self.padded_c + c), *a);
            }
            c += S::LANES;
        }
    }
}

/// Input gradient of a dense convolution with stride > 1 (any kernel, padding ≤ 1), one image
/// per item: `dx[in][c] += Σ_k dy[out][k] · w[tap][k][c]`, vectorized along the input
/// channels (`weights` is `[tap][cout][C rounded up]`). `dx` is overwritten, border zero.
pub struct StridedGradInput {
    pub map: MapShape,
    pub out: MapShape,
    pub n: usize,
    pub k: usize,
    pub stride: usize,
    pub pad: usize,
    pub dy: CPtr,
    pub dx: Ptr,
    pub weights: CPtr,
    pub padded_c: usize,
}

impl RowKernel for StridedGradInput {
    fn items(&self) -> usize {
        self.n
    }

    #[inline(always)]
    unsafe fn item<S: Simd>(&self, img: usize) {
        let (m, o) = (self.map, self.out);
        let base = self.dx.0.add(img * m.image_floats());
        std::ptr::write_bytes(base, 0, m.image_floats());
        let wp = m.w + 2;
        let (s, p, k) = (self.stride, self.pad, self.k);
        for oy in 0..o.h {
            let g = o.at(self.dy.0, img, oy + 1, 1);
            for ty in 0..k {
                let py = oy * s + ty + 1 - p;
                if py > m.h + 1 {
                    continue;
                }
                for tx in 0..k {
                    let t = ty * k + tx;
                    for ox in 0..o.w {
                        let px = ox * s + tx + 1 - p;
                        if px > m.w + 1 {
                            continue;
                        }
                        let dst = base.add((py * wp + px) * m.cs);
                        let mut c = 0;
                        while c < m.c {
                            let valid = m.c - c;
                            let mut acc = S::load_n(dst.add(c), valid);
                            for kk in 0..o.c {
                                let gv = *g.add(ox * o.cs + kk);
                                acc = S::fma_s(S::load(self.weights.0.add((t * o.c + kk) * self.padded_c + c)), gv, acc);
                            }
                            S::store_n(dst.add(c), acc, valid);
                            c += S::LANES;
                        }
                    }
                }
            }
        }
        super::kernels::zero_borders(base, 1, m.h, m.w, m.cs);
    }
}
