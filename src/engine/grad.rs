//! Weight gradients of convolutions on padded NHWC maps, over [`gemm::outer_tile`].
//!
//! A convolution pairs pixels of two maps through each kernel tap `t = (ty, tx)`: pixel
//! `(y, x)` of the *small-side* map `A` meets pixel `(y·s + ty − p, x·s + tx − p)` of the map
//! `B` (stride `s`, padding `p`). For a convolution `A` is the output gradient and `B` the
//! input; for a transposed convolution `A` is the input and `B` the output gradient. Either
//! way the weight gradient is
//!
//! `G[a][b][t] = Σ_(pixels of A) A[·][a] · B[paired pixel][b]`,
//!
//! which is candle's (and PyTorch's) weight layout in both cases: `[cout][cin][ky][kx]` for a
//! convolution, `[cin][cout][ky][kx]` for a transposed one. Each row of `A` is one segment of
//! the reduction (both operands step by a pixel, `B` by `s` pixels), and the channels of
//! whichever map has more of them are the tile's vectors.
//!
//! Work items are blocks of rows of `A`; each adds its share into a gradient buffer of its
//! own (the caller sums them), so items never write the same memory.

use anyhow::{Result, ensure};

use super::gemm::outer_tile;
use super::simd::Simd;
use super::{Isa, SimdJob, dispatch};

/// A padded NHWC map: `h × w` pixels of `c` channels, `cs` floats per pixel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapShape {
    pub h: usize,
    pub w: usize,
    pub c: usize,
    pub cs: usize,
}

impl MapShape {
    pub fn new(h: usize, w: usize, c: usize) -> MapShape {
        MapShape { h, w, c, cs: c }
    }

    /// Floats per image, border included.
    pub fn image_floats(&self) -> usize {
        (self.h + 2) * (self.w + 2) * self.cs
    }
}

/// The weight gradient of one convolution (see the module docs).
#[derive(Debug, Clone)]
pub struct WeightGrad {
    pub isa: Isa,
    pub a: MapShape,
    pub b: MapShape,
    pub k: usize,
    pub stride: usize,
    pub pad: usize,
    /// The broadcast side is `B` (else `A`).
    rows_from_b: bool,
    /// Vectors per tile (1 or 2).
    nv: usize,
    /// Rows of `A` per work item.
    rows_per_item: usize,
}

/// Rows of `A` per item: about this many pixels (both maps' blocks stay in L2).
const ITEM_PIXELS: usize = 512;

impl WeightGrad {
    pub fn new(a: MapShape, b: MapShape, k: usize, stride: usize, pad: usize, isa: Isa) -> Result<WeightGrad> {
        ensure!(isa.supported(), "this CPU cannot run the {} kernels", isa.name());
        ensure!(pad <= 1 && stride >= 1 && k >= 1, "weight gradients support padding 0 or 1 (got k {k}, stride {stride}, padding {pad})");
        // Every paired pixel lies in B's padded map (its border is zero).
        ensure!(
            (a.h - 1) * stride + k - pad <= b.h + 1 && (a.w - 1) * stride + k - pad <= b.w + 1,
            "a {}×{} map does not pair with a {}×{} map through a {k}×{k} stride-{stride} kernel",
            a.h,
            a.w,
            b.h,
            b.w
        );
        let lanes = isa.lanes();
        // The assignment (broadcast side, vectors per tile) with the least padded work.
        let cost = |rows: usize, vectors: usize, nv: usize| {
            let mr = super::gemm::tile_rows(lanes, nv);
            rows.div_ceil(mr) * mr * vectors.div_ceil(nv * lanes) * nv * lanes
        };
        let mut best = (usize::MAX, false, 2);
        for rows_from_b in [false, true] {
            for nv in [2, 1] {
                let (rows, vectors) = if rows_from_b { (b.c, a.c) } else { (a.c, b.c) };
                let c = cost(rows, vectors, nv) * if nv == 1 { 9 } else { 8 } / 8;
                if c < best.0 {
                    best = (c, rows_from_b, nv);
                }
            }
        }
        let rows_per_item = (ITEM_PIXELS / a.w.max(1)).clamp(1, a.h);
        Ok(WeightGrad { isa, a, b, k, stride, pad, rows_from_b: best.1, nv: best.2, rows_per_item })
    }

    /// Floats of the gradient `[a.c][b.c][k·k]`.
    pub fn len(&self) -> usize {
        self.a.c * self.b.c * self.k * self.k
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Work items for a batch of `n`.
    pub fn items(&self, n: usize) -> usize {
        n * self.a.h.div_ceil(self.rows_per_item)
    }

    /// Adds item `item`'s share of the gradient into `grad` (`[a.c][b.c][k·k]`).
    ///
    /// # Safety
    /// `a` and `b` hold `n` padded images of their shapes, followed by [`super::kernels::slack_floats`]
    /// readable floats; `grad` holds [`Self::len`] floats no other thread writes meanwhile.
    pub unsafe fn run(&self, a: *const f32, b: *const f32, n: usize, item: usize, grad: *mut f32) {
        debug_assert!(item < self.items(n));
        struct Job<'a> {
            g: &'a WeightGrad,
            a: *const f32,
            b: *const f32,
            item: usize,
            grad: *mut f32,
        }
        impl SimdJob for Job<'_> {
            #[inline(always)]
            unsafe fn run<S: Simd>(&self) {
                let g = self.g;
                unsafe {
                    match (S::LANES, g.nv) {
                        (16, 2) => g.run_shape::<S, 12, 2>(self.a, self.b, self.item, self.grad),
                        (16, _) => g.run_shape::<S, 24, 1>(self.a, self.b, self.item, self.grad),
                        (_, 2) => g.run_shape::<S, 6, 2>(self.a, self.b, self.item, self.grad),
                        _ => g.run_shape::<S, 12, 1>(self.a, self.b, self.item, self.grad),
                    }
                }
            }
        }
        unsafe { dispatch(self.isa, &Job { g: self, a, b, item, grad }) }
    }

    #[inline(always)]
    unsafe fn run_shape<S: Simd, const MR: usize, const NV: usize>(&self, a: *const f32, b: *const f32, item: usize, grad: *mut f32) {
        let (am, bm) = (self.a, self.b);
        let blocks = am.h.div_ceil(self.rows_per_item);
        let (img, block) = (item / blocks, item % blocks);
        let y0 = block * self.rows_per_item;
        let y1 = (y0 + self.rows_per_item).min(am.h);
        let (awp, bwp) = (am.w + 2, bm.w + 2);
        let a_img = unsafe { a.add(img * am.image_floats()) };
        let b_img = unsafe { b.add(img * bm.image_floats()) };
        let (s, p) = (self.stride, self.pad);
        let taps = self.k * self.k;
        // Tile roles: rows (broadcast) from `r`, vectors from `v`.
        let (r_c, v_c) = if self.rows_from_b { (bm.c, am.c) } else { (am.c, bm.c) };
        let nr = NV * S::LANES;
        let mut segments: Vec<(*const f32, *const f32)> = Vec::with_capacity(y1 - y0);
        for t in 0..taps {
            let (ty, tx) = (t / self.k, t % self.k);
            // Row starts of this tap: A's pixel (y, 0) and B's pixel (y·s + ty − p, tx − p),
            // in padded coordinates (+1).
            let starts: Vec<(*const f32, *const f32)> = (y0..y1)
                .map(|y| unsafe {
                    let ap = a_img.add(((y + 1) * awp + 1) * am.cs);
                    let bp = b_img.add(((y * s + ty + 1 - p) * bwp + tx + 1 - p) * bm.cs);
                    (ap, bp)
                })
                .collect();
            let (r_step, v_step) = if self.rows_from_b { (s * bm.cs, am.cs) } else { (am.cs, s * bm.cs) };
            for r0 in (0..r_c).step_by(MR) {
                for v0 in (0..v_c).step_by(nr) {
                    segments.clear();
                    segments.extend(starts.iter().map(|&(ap, bp)| unsafe {
                        if self.rows_from_b { (bp.add(r0), ap.add(v0)) } else { (ap.add(r0), bp.add(v0)) }
                    }));
                    let mut acc = [[unsafe { S::zero() }; NV]; MR];
                    unsafe { outer_tile::<S, MR, NV>(&mut acc, &segments, am.w, r_step, v_step) };
                    // Store: acc[r][j] lane l is (rows channel r0 + r, vector channel v0 + j·L + l).
                    let mut lanes = [0f32; 16];
                    for (r, row) in acc.iter().enumerate() {
                        let rc = r0 + r;
                        if rc >= r_c {
                            break;
                        }
                        for (j, v) in row.iter().enumerate() {
                            unsafe { S::store(lanes.as_mut_ptr(), *v) };
                            for (l, value) in lanes.iter().enumerate().take(S::LANES) {
                                let vc = v0 + j * S::LANES + l;
                                if vc >= v_c {
                                    break;
                                }
                                let (ca, cb) = if self.rows_from_b { (vc, rc) } else { (rc, vc) };
                                unsafe { *grad.add((ca * bm.c + cb) * taps + t) += *value };
                            }
                        }
                    }
                }
            }
        }
    }
}
