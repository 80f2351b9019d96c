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
//! Items are blocks of rows of `A`, each adding into a buffer of its own that the caller sums
//! (where the maps outweigh the gradient), or `(tap, row tile)` pairs over every pixel, each
//! writing its own part of one buffer. Tiles add into a `[tap][rows][vectors]` buffer with
//! vector stores; [`WeightGrad::finish`] transposes it into the weight layout.

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
    pub n: usize,
    /// The broadcast side is `B` (else `A`).
    rows_from_b: bool,
    /// Vectors per tile (1 or 2).
    nv: usize,
    /// Rows of `A` (over the whole batch, crossing images) per block of the reduction.
    rows_per_block: usize,
    /// Items are blocks of rows, each adding into a buffer of its own (else items are
    /// `(tap, row tile)` pairs over every pixel, writing their own part of one buffer).
    split_pixels: bool,
}

/// Pixels of `A` per block of rows (both maps' blocks stay in L2).
const BLOCK_PIXELS: usize = 512;

impl WeightGrad {
    /// The weight gradient over a batch of `n` on `threads` threads.
    pub fn new(a: MapShape, b: MapShape, k: usize, stride: usize, pad: usize, n: usize, threads: usize, isa: Isa) -> Result<WeightGrad> {
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
        let rows_per_block = (BLOCK_PIXELS / a.w.max(1)).clamp(1, n * a.h);
        // Split the pixels (partial sums per item, added by the caller) where the maps
        // outweigh the gradient; else split the gradient among items.
        let pixels = n * a.h * a.w;
        let grad = a.c * b.c * k * k;
        let split_pixels = pixels * (a.c + b.c) >= 8 * grad && (n * a.h).div_ceil(rows_per_block) >= 2 * threads.min(2);
        Ok(WeightGrad { isa, a, b, k, stride, pad, n, rows_from_b: best.1, nv: best.2, rows_per_block, split_pixels })
    }

    /// Floats of the gradient `[a.c][b.c][k·k]`.
    pub fn len(&self) -> usize {
        self.a.c * self.b.c * self.k * self.k
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether items add into buffers of their own (which the caller then sums), or each
    /// writes its own part of one buffer.
    pub fn splits_pixels(&self) -> bool {
        self.split_pixels
    }

    fn row_tile(&self) -> usize {
        super::gemm::tile_rows(self.isa.lanes(), self.nv)
    }

    /// Work items.
    pub fn items(&self) -> usize {
        if self.split_pixels {
            (self.n * self.a.h).div_ceil(self.rows_per_block)
        } else {
            let r_c = if self.rows_from_b { self.b.c } else { self.a.c };
            self.k * self.k * r_c.div_ceil(self.row_tile())
        }
    }

    /// Floats of the buffer [`Self::run`] adds into: `[tap][rows][vectors]` (rows and vectors
    /// being `A`'s and `B`'s channels in the order the tiles use); [`Self::finish`] turns it
    /// into the weight layout.
    pub fn buffer_len(&self) -> usize {
        self.len()
    }

    /// Writes weight-layout rows `a_range` (`[a][b][tap]`, candle's layout) of `out` (which
    /// holds just those rows) from a buffer [`Self::run`] filled.
    pub fn finish(&self, buffer: &[f32], a_range: std::ops::Range<usize>, out: &mut [f32]) {
        let taps = self.k * self.k;
        let (ca, cb) = (self.a.c, self.b.c);
        let (r_c, v_c) = if self.rows_from_b { (cb, ca) } else { (ca, cb) };
        for (ia, a) in a_range.enumerate() {
            for b in 0..cb {
                let dst = &mut out[(ia * cb + b) * taps..][..taps];
                let (r, v) = if self.rows_from_b { (b, a) } else { (a, b) };
                for (t, d) in dst.iter_mut().enumerate() {
                    *d = buffer[(t * r_c + r) * v_c + v];
                }
            }
        }
    }

    /// Adds item `item`'s share of the gradient into `grad` (see [`Self::buffer_len`]; zeroed
    /// by the caller before the first item).
    ///
    /// # Safety
    /// `a` and `b` hold `n` padded images of their shapes, followed by [`super::kernels::slack_floats`]
    /// readable floats; `grad` holds [`Self::len`] floats; with [`Self::splits_pixels`] no
    /// other thread writes the same `grad` meanwhile.
    pub unsafe fn run(&self, a: *const f32, b: *const f32, item: usize, grad: *mut f32) {
        debug_assert!(item < self.items());
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
        let rows = self.n * am.h;
        let taps = self.k * self.k;
        let (r_c, v_c) = if self.rows_from_b { (bm.c, am.c) } else { (am.c, bm.c) };
        let nr = NV * S::LANES;
        let r_tiles = r_c.div_ceil(MR);
        // This item's rows, taps and row tiles.
        let (row_range, tap_range, r_range) = if self.split_pixels {
            let lo = item * self.rows_per_block;
            (lo..(lo + self.rows_per_block).min(rows), 0..taps, 0..r_tiles)
        } else {
            let (t, rt) = (item / r_tiles, item % r_tiles);
            (0..rows, t..t + 1, rt..rt + 1)
        };
        let (awp, bwp) = (am.w + 2, bm.w + 2);
        let (s, p) = (self.stride, self.pad);
        let (r_step, v_step) = if self.rows_from_b { (s * bm.cs, am.cs) } else { (am.cs, s * bm.cs) };
        let mut segments: Vec<(*const f32, *const f32)> = Vec::with_capacity(self.rows_per_block);
        let mut starts: Vec<(*const f32, *const f32, usize)> = Vec::with_capacity(self.rows_per_block);
        let mut lengths: Vec<usize> = Vec::with_capacity(4);
        // Stride 1 and same-size maps: rows chain into flat runs.
        let flat = s == 1 && am.w == bm.w && am.h == bm.h && am.cs == am.c;
        for block in row_range.clone().step_by(self.rows_per_block) {
            let block = block..(block + self.rows_per_block).min(row_range.end);
            for t in tap_range.clone() {
                let (ty, tx) = (t / self.k, t % self.k);
                // Row starts of this tap: A's pixel (y, 0) and B's pixel (y·s + ty − p, tx − p),
                // in padded coordinates (+1).
                starts.clear();
                let start = |row: usize| unsafe {
                    let (img, y) = (row / am.h, row % am.h);
                    let ap = a.add(img * am.image_floats() + ((y + 1) * awp + 1) * am.cs);
                    let bp = b.add(img * bm.image_floats() + ((y * s + ty + 1 - p) * bwp + tx + 1 - p) * bm.cs);
                    (ap, bp)
                };
                // Segments as (pointers, length), grouped by length below.
                if flat {
                    // Stride 1 on maps of one size: a run of rows of one image is one segment
                    // over the padded positions between them (A's border pixels are zero).
                    let mut row = block.start;
                    while row < block.end {
                        let end = block.end.min((row / am.h + 1) * am.h);
                        let (ap, bp) = start(row);
                        starts.push((ap, bp, (end - row) * awp - 2));
                        row = end;
                    }
                } else {
                    starts.extend(block.clone().map(|row| {
                        let (ap, bp) = start(row);
                        (ap, bp, am.w)
                    }));
                }
                lengths.clear();
                for &(_, _, kc) in &starts {
                    if !lengths.contains(&kc) {
                        lengths.push(kc);
                    }
                }
                for rt in r_range.clone() {
                    let r0 = rt * MR;
                    for v0 in (0..v_c).step_by(nr) {
                        let mut acc = [[unsafe { S::zero() }; NV]; MR];
                        for &kc in &lengths {
                            segments.clear();
                            segments.extend(starts.iter().filter(|s| s.2 == kc).map(|&(ap, bp, _)| unsafe {
                                if self.rows_from_b { (bp.add(r0), ap.add(v0)) } else { (ap.add(r0), bp.add(v0)) }
                            }));
                            let part = unsafe { outer_tile::<S, MR, NV>(&segments, kc, r_step, v_step) };
                            if lengths.len() == 1 {
                                acc = part;
                            } else {
                                for (row, prow) in acc.iter_mut().zip(&part) {
                                    for (v, pv) in row.iter_mut().zip(prow) {
                                        *v = unsafe { S::add(*v, *pv) };
                                    }
                                }
                            }
                        }
                        // acc[r][j] is (rows channel r0 + r, vector channels v0 + j·L ..): added
                        // into the [tap][rows][vectors] buffer with vector stores.
                        for (r, row) in acc.iter().enumerate() {
                            let rc = r0 + r;
                            if rc >= r_c {
                                break;
                            }
                            let dst = unsafe { grad.add((t * r_c + rc) * v_c) };
                            for (j, v) in row.iter().enumerate() {
                                let vc = v0 + j * S::LANES;
                                if vc >= v_c {
                                    break;
                                }
                                let valid = v_c - vc;
                                unsafe { S::store_n(dst.add(vc), S::add(S::load_n(dst.add(vc), valid), *v), valid) };
                            }
                        }
                    }
                }
            }
        }
    }
}
