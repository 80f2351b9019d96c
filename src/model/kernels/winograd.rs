//! 3×3, stride-1, padding-1 convolutions with Winograd's minimal filtering F(4×4, 3×3)
//! (Lavin & Gray 2016; interpolation points 0, ±1, ±2, ∞): each 4×4 output tile costs 36
//! multiplies per input/output channel pair instead of 144.
//!
//! Per block of tiles, in one thread's scratch: the input transform `V = Bᵀ d B` of every
//! tile's 6×6 patch (vectorized along channels), then for each panel of output channels the
//! 36 GEMMs `M[ξ] = V[ξ] · U[ξ]` on [`gemm::tile`] (weights transformed `U = G g Gᵀ` in
//! double precision and packed at compile time), then the output transform `Y = Aᵀ M A` with
//! bias and clamp, stored into the output's channel range.

#![allow(unsafe_op_in_unsafe_fn)]

use super::conv::{Split, range};
use super::gemm::{self, tile, tile_rows};
use super::plan::{Ctx, View};
use super::simd::Simd;

/// Output tile side.
pub const M: usize = 4;
/// Input patch side (`M + 3 − 1`).
pub const T: usize = 6;
/// Transform points per tile.
pub const XI: usize = T * T;

/// `G` (6×3), the kernel transform.
const G: [[f64; 3]; 6] = [
    [1.0 / 4.0, 0.0, 0.0],
    [-1.0 / 6.0, -1.0 / 6.0, -1.0 / 6.0],
    [-1.0 / 6.0, 1.0 / 6.0, -1.0 / 6.0],
    [1.0 / 24.0, 1.0 / 12.0, 1.0 / 6.0],
    [1.0 / 24.0, -1.0 / 12.0, 1.0 / 6.0],
    [0.0, 0.0, 1.0],
];

/// `U = G g Gᵀ` of one 3×3 kernel, row-major 6×6.
pub fn transform_kernel(g: &[f32; 9]) -> [f32; XI] {
    let mut tmp = [[0f64; 3]; 6];
    for i in 0..6 {
        for j in 0..3 {
            tmp[i][j] = (0..3).map(|k| G[i][k] * g[k * 3 + j] as f64).sum();
        }
    }
    let mut u = [0f32; XI];
    for i in 0..6 {
        for j in 0..6 {
            u[i * 6 + j] = (0..3).map(|k| tmp[i][k] * G[j][k]).sum::<f64>() as f32;
        }
    }
    u
}

/// `Bᵀ d` for one column of six vectors.
#[inline(always)]
unsafe fn input_1d<S: Simd>(d: [S::V; 6]) -> [S::V; 6] {
    let [d0, d1, d2, d3, d4, d5] = d;
    let four = S::splat(4.0);
    let five = S::splat(-5.0);
    let two = S::splat(2.0);
    let a = S::fma(S::splat(-4.0), d2, d4); // d4 − 4 d2
    let b = S::fma(S::splat(-4.0), d1, d3); // d3 − 4 d1
    let c = S::sub(d4, d2);
    let e = S::mul(two, S::sub(d3, d1));
    [
        S::fma(four, d0, S::fma(five, d2, d4)),
        S::add(a, b),
        S::sub(a, b),
        S::add(c, e),
        S::sub(c, e),
        S::fma(four, d1, S::fma(five, d3, d5)),
    ]
}

/// `Aᵀ m` for one column of six vectors.
#[inline(always)]
unsafe fn output_1d<S: Simd>(m: [S::V; 6]) -> [S::V; 4] {
    let [m0, m1, m2, m3, m4, m5] = m;
    let a = S::add(m1, m2);
    let b = S::sub(m1, m2);
    let c = S::add(m3, m4);
    let d = S::sub(m3, m4);
    [S::add(m0, S::add(a, c)), S::fma(S::splat(2.0), d, b), S::fma(S::splat(4.0), c, a), S::add(S::fma(S::splat(8.0), d, b), m5)]
}

/// A 3×3 convolution by F(4×4, 3×3).
#[derive(Debug, Clone)]
pub struct WinogradConv {
    pub input: View,
    pub output: View,
    pub cin: usize,
    pub cout: usize,
    pub nv: usize,
    pub lanes: usize,
    /// Tiles per block (a multiple of the GEMM tile rows).
    pub block: usize,
    /// `[ξ][panel][cin][nv·lanes]`.
    pub u: Vec<f32>,
    /// Zero-padded to whole panels.
    pub bias: Vec<f32>,
    pub min: f32,
    pub max: f32,
}

impl WinogradConv {
    pub fn panels(&self) -> usize {
        self.cout.div_ceil(self.nv * self.lanes)
    }

    /// Input channels rounded up to whole vectors (the row stride of `V`).
    pub fn cin_padded(&self) -> usize {
        self.cin.div_ceil(self.lanes) * self.lanes
    }

    fn tiles_per_image(&self) -> (usize, usize) {
        (self.output.h.div_ceil(M), self.output.w.div_ceil(M))
    }

    /// Floats of per-thread scratch: `V` for a block, `M` for one panel of it.
    pub fn scratch_floats(&self) -> usize {
        XI * self.block * (self.cin_padded() + self.nv * self.lanes)
    }

    pub fn split(&self, n: usize, threads: usize) -> Split {
        let (th, tw) = self.tiles_per_image();
        let blocks = (n * th * tw).div_ceil(self.block);
        if threads <= 1 {
            return Split { groups: 1, chunks: blocks };
        }
        // Every block is an item; too few of them, and panels are split too (each group
        // repeats the block's input transform).
        let groups = if blocks >= 2 * threads { 1 } else { self.panels().min((2 * threads).div_ceil(blocks)) };
        Split { groups, chunks: blocks }
    }

    pub fn items(&self, split: Split) -> usize {
        split.groups * split.chunks
    }

    /// # Safety
    /// As [`super::conv::DirectConv::run`]; `scratch` holds [`Self::scratch_floats`] floats.
    #[inline(always)]
    pub unsafe fn run<S: Simd>(&self, ctx: &Ctx, split: Split, item: usize, scratch: *mut f32) {
        match (S::LANES, self.nv) {
            (16, 2) => self.run_shape::<S, 12, 2>(ctx, split, item, scratch),
            (16, _) => self.run_shape::<S, 24, 1>(ctx, split, item, scratch),
            (_, 2) => self.run_shape::<S, 6, 2>(ctx, split, item, scratch),
            _ => self.run_shape::<S, 12, 1>(ctx, split, item, scratch),
        }
    }

    #[inline(always)]
    unsafe fn run_shape<S: Simd, const MR: usize, const NV: usize>(&self, ctx: &Ctx, split: Split, item: usize, scratch: *mut f32) {
        debug_assert_eq!(tile_rows(self.lanes, self.nv), MR);
        let (block_index, group) = (item / split.groups, item % split.groups);
        let (th, tw) = self.tiles_per_image();
        let per_image = th * tw;
        let total = ctx.n * per_image;
        let t0 = block_index * self.block;
        let count = self.block.min(total - t0);
        let cp = self.cin_padded();
        let nr = NV * S::LANES;
        let v = scratch;
        let m = scratch.add(XI * self.block * cp);
        let input = ctx.ptr(&self.input);
        let output = ctx.ptr(&self.output);
        let (ih, iw, ics) = (self.input.h, self.input.w, self.input.cs);
        let wp = iw + 2;
        let image_floats = self.input.positions() * ics;

        // Input transform: V[ξ][t][c].
        for t in 0..self.block {
            if t >= count {
                for xi in 0..XI {
                    std::ptr::write_bytes(v.add((xi * self.block + t) * cp), 0, cp);
                }
                continue;
            }
            let g = t0 + t;
            let (img, local) = (g / per_image, g % per_image);
            let (ty, tx) = (local / tw, local % tw);
            // Padded coordinates of the patch's top-left corner.
            let (py, px) = (ty * M, tx * M);
            let inside = py + T <= ih + 2 && px + T <= iw + 2;
            let base = input.add(img * image_floats + (py * wp + px) * ics);
            let mut c = 0;
            while c < self.cin {
                let n = self.cin - c;
                let mut rows = [[S::zero(); T]; T];
                for (y, row) in rows.iter_mut().enumerate() {
                    let mut d = [S::zero(); T];
                    for (x, dv) in d.iter_mut().enumerate() {
                        if inside || (py + y < ih + 2 && px + x < iw + 2) {
                            *dv = S::load_n(base.add((y * wp + x) * ics + c), n);
                        }
                    }
                    *row = input_1d::<S>(d);
                }
                for xi_x in 0..T {
                    let col = input_1d::<S>(std::array::from_fn(|y| rows[y][xi_x]));
                    for (xi_y, value) in col.iter().enumerate() {
                        S::store(v.add(((xi_y * T + xi_x) * self.block + t) * cp + c), *value);
                    }
                }
                c += S::LANES;
            }
        }

        let panels = self.panels();
        let (p_lo, p_hi) = range(panels, split.groups, group);
        let (oh, ow, ocs) = (self.output.h, self.output.w, self.output.cs);
        let owp = ow + 2;
        let out_image = self.output.positions() * ocs;
        let (lo, hi) = (S::splat(self.min), S::splat(self.max));
        let rows = count.div_ceil(MR);
        for p in p_lo..p_hi {
            // The 36 GEMMs of this panel: M[ξ][t][k].
            for xi in 0..XI {
                let a = v.add(xi * self.block * cp);
                let b = self.u.as_ptr().add((xi * panels + p) * self.cin * nr);
                for rt in 0..rows {
                    let acc = tile::<S, MR, NV>(a.add(rt * MR * cp), cp, &[0], self.cin, b);
                    let dst = m.add((xi * self.block + rt * MR) * nr);
                    for (r, row) in acc.iter().enumerate() {
                        for (j, value) in row.iter().enumerate() {
                            S::store(dst.add(r * nr + j * S::LANES), *value);
                        }
                    }
                }
            }
            // Output transform, bias, clamp, store.
            for t in 0..count {
                let g = t0 + t;
                let (img, local) = (g / per_image, g % per_image);
                let (ty, tx) = (local / tw, local % tw);
                let (oy, ox) = (ty * M, tx * M);
                let base = output.add(img * out_image + ((oy + 1) * owp + ox + 1) * ocs);
                for j in 0..NV {
                    let k = p * nr + j * S::LANES;
                    if k >= self.cout {
                        break;
                    }
                    let valid = self.cout - k;
                    let mut cols = [[S::zero(); M]; T];
                    for (xi_x, col) in cols.iter_mut().enumerate() {
                        let mut column = [S::zero(); T];
                        for (xi_y, c) in column.iter_mut().enumerate() {
                            *c = S::load(m.add(((xi_y * T + xi_x) * self.block + t) * nr + j * S::LANES));
                        }
                        *col = output_1d::<S>(column);
                    }
                    let bias = S::load(self.bias.as_ptr().add(k));
                    for dy in 0..M {
                        if oy + dy >= oh {
                            break;
                        }
                        let out = output_1d::<S>(std::array::from_fn(|xi_x| cols[xi_x][dy]));
                        for (dx, value) in out.iter().enumerate() {
                            if ox + dx >= ow {
                                break;
                            }
                            let y = S::min(S::max(S::add(*value, bias), lo), hi);
                            S::store_n(base.add((dy * owp + dx) * ocs + k), y, valid);
                        }
                    }
                }
            }
        }
    }
}

/// Transforms and packs weights `[cout, cin, 3, 3]` for [`WinogradConv`].
pub fn pack(weight: &[f32], cin: usize, cout: usize, nr: usize) -> Vec<f32> {
    let transformed: Vec<[f32; XI]> = (0..cout * cin)
        .map(|i| {
            let g: [f32; 9] = std::array::from_fn(|j| weight[i * 9 + j]);
            transform_kernel(&g)
        })
        .collect();
    let panels = cout.div_ceil(nr);
    let mut out = Vec::with_capacity(XI * panels * cin * nr);
    for xi in 0..XI {
        out.extend(gemm::pack_panels(1, cin, cout, nr, |_, c, k| transformed[k * cin + c][xi]));
    }
    out
}
