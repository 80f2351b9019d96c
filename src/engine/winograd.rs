//! Winograd minimal filtering F(m×m, r×r) (Lavin & Gray 2016) for stride-1 correlations:
//! each m×m output tile costs α² = (m + r − 1)² multiplies per input/output channel pair
//! instead of m²·r².
//!
//! - 3×3 convolutions (padding 1) use F(4×4, 3×3) (points 0, ±1, ±2, ∞), with hand-written
//!   transforms: 36 multiplies instead of 144.
//! - A ConvTranspose(k4, s2, p1) is four 2×2 correlations, one per output phase (every other
//!   pixel of the doubled map), each with its own 2×2 kernel and input offset. They use
//!   F(m×m, 2×2) with m from 2 to 4 (the compiler picks m by the map size): 9, 16 or 25
//!   multiplies instead of 16, 36 or 64.
//! - A Conv(k4, s2, p1), the input gradient of such a ConvTranspose, is the same four 2×2
//!   correlations the other way round ("gather", `stride` 2): output pixel `i` sums, per
//!   dimension, the even input pixels `2(i + u)` through kernel taps `[1, 3]` and the odd ones
//!   `2(i + u) − 1` through taps `[0, 2]`. Each tile transforms the four stride-2 patches, and
//!   one GEMM reduces over all four phases' channels at once (`V`'s rows hold the phases side
//!   by side, the GEMM's segments step across them), into one output map.
//!
//! The transform matrices come from the Cook–Toom construction in double precision:
//! `Bᵀ = C⁻ᵀ` for the Vandermonde matrix `C` of the points (with ∞), `G = V_r`, `Aᵀ = V_mᵀ`.
//!
//! Per block of tiles, in one thread's scratch: the input transform `V = Bᵀ d B` of every
//! tile's α×α patch (vectorized along channels), then for each panel of output channels the
//! α² GEMMs `M[ξ] = V[ξ] · U[ξ]` on [`gemm::tile`] (weights transformed `U = G g Gᵀ` and
//! packed at compile time), then the output transform `Y = Aᵀ M A` with bias and clamp,
//! stored into the output's channel range.

#![allow(unsafe_op_in_unsafe_fn)]

use super::conv::{Split, range};
use super::gemm::{self, tile, tile_rows};
use super::plan::{Ctx, View};
use super::simd::Simd;

/// Largest patch side supported (F(4, 3) and F(4, 2) need 6 and 5).
pub const MAX_ALPHA: usize = 6;

/// The matrices of one F(m, r).
#[derive(Debug, Clone)]
pub struct Transform {
    pub m: usize,
    pub r: usize,
    pub alpha: usize,
    /// `Bᵀ`, α×α row-major.
    pub bt: Vec<f32>,
    /// `Aᵀ`, m×α row-major.
    pub at: Vec<f32>,
    /// `G`, α×r row-major (double precision: only used to transform weights).
    pub g: Vec<f64>,
}

impl Transform {
    /// F(m, r) for 2 ≤ m ≤ 4, 2 ≤ r ≤ 3.
    pub fn new(m: usize, r: usize) -> Transform {
        let alpha = m + r - 1;
        assert!((2..=4).contains(&m) && (2..=3).contains(&r) && alpha <= MAX_ALPHA, "F({m}, {r})");
        // α − 1 finite points and ∞; small points first keep the transforms well conditioned.
        let all = [0.0, 1.0, -1.0, 2.0, -2.0, 0.5, -0.5];
        let points: Vec<f64> = match (m, r) {
            (4, 3) => vec![0.0, 1.0, -1.0, 2.0, -2.0],
            (4, 2) => vec![0.0, 1.0, -1.0, 0.5],
            _ => all[..alpha - 1].to_vec(),
        };
        // Evaluation of a polynomial of n coefficients at the points and ∞ (α × n).
        let vander = |n: usize| -> Vec<f64> {
            let mut v = vec![0f64; alpha * n];
            for (i, p) in points.iter().enumerate() {
                for j in 0..n {
                    v[i * n + j] = p.powi(j as i32);
                }
            }
            v[(alpha - 1) * n + n - 1] = 1.0;
            v
        };
        let vm = vander(m);
        let at: Vec<f32> = (0..m * alpha).map(|k| vm[(k % alpha) * m + k / alpha] as f32).collect();
        if (m, r) == (4, 3) {
            // Lavin & Gray's scaling of the same points (integer Bᵀ), which the hand-written
            // transforms below implement.
            return Transform { m, r, alpha, bt: F43_BT.iter().map(|&v| v as f32).collect(), at, g: F43_G.to_vec() };
        }
        let c_inv = invert(&vander(alpha), alpha);
        // Bᵀ = C⁻ᵀ: Bᵀ[i][j] = C⁻¹[j][i].
        let bt: Vec<f32> = (0..alpha * alpha).map(|k| c_inv[(k % alpha) * alpha + k / alpha] as f32).collect();
        Transform { m, r, alpha, bt, at, g: vander(r) }
    }

    /// `U = G g Gᵀ` of one r×r kernel (row-major), α×α.
    pub fn kernel(&self, g: &[f32]) -> Vec<f32> {
        let (a, r) = (self.alpha, self.r);
        let mut tmp = vec![0f64; a * r];
        for i in 0..a {
            for j in 0..r {
                tmp[i * r + j] = (0..r).map(|k| self.g[i * r + k] * g[k * r + j] as f64).sum();
            }
        }
        let mut u = vec![0f32; a * a];
        for i in 0..a {
            for j in 0..a {
                u[i * a + j] = (0..r).map(|k| tmp[i * r + k] * self.g[j * r + k]).sum::<f64>() as f32;
            }
        }
        u
    }

}

/// Bᵀ of F(4, 3), row-major 6×6.
const F43_BT: [f64; 36] = [
    4., 0., -5., 0., 1., 0., //
    0., -4., -4., 1., 1., 0., //
    0., 4., -4., -1., 1., 0., //
    0., -2., -1., 2., 1., 0., //
    0., 2., -1., -2., 1., 0., //
    0., 4., 0., -5., 0., 1.,
];

/// G of F(4, 3), row-major 6×3.
const F43_G: [f64; 18] = [
    1. / 4., 0., 0., //
    -1. / 6., -1. / 6., -1. / 6., //
    -1. / 6., 1. / 6., -1. / 6., //
    1. / 24., 1. / 12., 1. / 6., //
    1. / 24., -1. / 12., 1. / 6., //
    0., 0., 1.,
];

/// Inverse of an n×n matrix (Gauss–Jordan with partial pivoting).
fn invert(a: &[f64], n: usize) -> Vec<f64> {
    let mut m = a.to_vec();
    let mut inv: Vec<f64> = (0..n * n).map(|k| if k / n == k % n { 1.0 } else { 0.0 }).collect();
    for col in 0..n {
        let pivot = (col..n).max_by(|&x, &y| m[x * n + col].abs().total_cmp(&m[y * n + col].abs())).unwrap_or(col);
        for k in 0..n {
            m.swap(col * n + k, pivot * n + k);
            inv.swap(col * n + k, pivot * n + k);
        }
        let d = m[col * n + col];
        for k in 0..n {
            m[col * n + k] /= d;
            inv[col * n + k] /= d;
        }
        for row in 0..n {
            if row != col {
                let f = m[row * n + col];
                for k in 0..n {
                    m[row * n + k] -= f * m[col * n + k];
                    inv[row * n + k] -= f * inv[col * n + k];
                }
            }
        }
    }
    inv
}

/// `Bᵀ d` for one column of six vectors, F(4, 3).
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

/// `Aᵀ m` for one column of six vectors, F(4, 3).
#[inline(always)]
unsafe fn output_1d<S: Simd>(m: [S::V; 6]) -> [S::V; 4] {
    let [m0, m1, m2, m3, m4, m5] = m;
    let a = S::add(m1, m2);
    let b = S::sub(m1, m2);
    let c = S::add(m3, m4);
    let d = S::sub(m3, m4);
    [S::add(m0, S::add(a, c)), S::fma(S::splat(2.0), d, b), S::fma(S::splat(4.0), c, a), S::add(S::fma(S::splat(8.0), d, b), m5)]
}

/// `out[i] = Σ_j mat[i·cols + j] · x[j]` for `rows` outputs (the generic transforms).
#[inline(always)]
unsafe fn apply<S: Simd>(mat: &[f32], rows: usize, cols: usize, x: &[S::V; MAX_ALPHA], out: &mut [S::V; MAX_ALPHA]) {
    for i in 0..rows {
        let mut acc = S::zero();
        for j in 0..cols {
            let w = mat[i * cols + j];
            if w != 0.0 {
                acc = S::fma_s(x[j], w, acc);
            }
        }
        out[i] = acc;
    }
}

/// The transforms of one F(m, r), applied to a column of vectors (inlined with constant
/// coefficients, so zeros and ±1 cost nothing).
trait Transforms {
    /// `Bᵀ x` (α outputs).
    unsafe fn input<S: Simd>(tr: &Transform, x: &[S::V; MAX_ALPHA]) -> [S::V; MAX_ALPHA];
    /// `Aᵀ x` (m outputs).
    unsafe fn output<S: Simd>(tr: &Transform, x: &[S::V; MAX_ALPHA]) -> [S::V; MAX_ALPHA];
}

/// Hand-written F(4, 3).
struct F43;

impl Transforms for F43 {
    #[inline(always)]
    unsafe fn input<S: Simd>(_: &Transform, x: &[S::V; MAX_ALPHA]) -> [S::V; MAX_ALPHA] {
        input_1d::<S>(*x)
    }
    #[inline(always)]
    unsafe fn output<S: Simd>(_: &Transform, x: &[S::V; MAX_ALPHA]) -> [S::V; MAX_ALPHA] {
        let o = output_1d::<S>(*x);
        [o[0], o[1], o[2], o[3], S::zero(), S::zero()]
    }
}

/// `out[i] = Σ_j mat[i][j] · x[j]` with constant coefficients.
#[inline(always)]
unsafe fn apply_const<S: Simd, const ROWS: usize, const COLS: usize>(mat: &[[f32; COLS]; ROWS], x: &[S::V; MAX_ALPHA]) -> [S::V; MAX_ALPHA] {
    let mut out = [S::zero(); MAX_ALPHA];
    for i in 0..ROWS {
        let mut acc = S::zero();
        for j in 0..COLS {
            let w = mat[i][j];
            if w == 1.0 {
                acc = S::add(acc, x[j]);
            } else if w == -1.0 {
                acc = S::sub(acc, x[j]);
            } else if w != 0.0 {
                acc = S::fma_s(x[j], w, acc);
            }
        }
        out[i] = acc;
    }
    out
}

/// F(m, 2) with the matrices of [`Transform::new`] as constants (points 0, 1[, −1[, ½]], ∞).
macro_rules! const_transform {
    ($name:ident, $alpha:literal, $m:literal, $bt:expr, $at:expr) => {
        struct $name;
        impl $name {
            const BT: [[f32; $alpha]; $alpha] = $bt;
            const AT: [[f32; $alpha]; $m] = $at;
        }
        impl Transforms for $name {
            #[inline(always)]
            unsafe fn input<S: Simd>(_: &Transform, x: &[S::V; MAX_ALPHA]) -> [S::V; MAX_ALPHA] {
                apply_const::<S, $alpha, $alpha>(&Self::BT, x)
            }
            #[inline(always)]
            unsafe fn output<S: Simd>(_: &Transform, x: &[S::V; MAX_ALPHA]) -> [S::V; MAX_ALPHA] {
                apply_const::<S, $m, $alpha>(&Self::AT, x)
            }
        }
    };
}

const_transform!(F22, 3, 2, [[1., -1., 0.], [0., 1., 0.], [0., -1., 1.]], [[1., 1., 0.], [0., 1., 1.]]);
const_transform!(
    F32,
    4,
    3,
    [[1., 0., -1., 0.], [0., 0.5, 0.5, 0.], [0., -0.5, 0.5, 0.], [0., -1., 0., 1.]],
    [[1., 1., 1., 0.], [0., 1., -1., 0.], [0., 1., 1., 1.]]
);
const_transform!(
    F42,
    5,
    4,
    [
        [1., -2., -1., 2., 0.],
        [0., -0.5, 0.5, 1., 0.],
        [0., -1. / 6., 0.5, -1. / 3., 0.],
        [0., 8. / 3., 0., -8. / 3., 0.],
        [0., 0.5, -1., -0.5, 1.]
    ],
    [[1., 1., 1., 1., 0.], [0., 1., -1., 0.5, 0.], [0., 1., 1., 0.25, 0.], [0., 1., -1., 0.125, 1.]]
);

/// Any other F(m, r): the matrices read at run time.
struct Dynamic;

impl Transforms for Dynamic {
    #[inline(always)]
    unsafe fn input<S: Simd>(tr: &Transform, x: &[S::V; MAX_ALPHA]) -> [S::V; MAX_ALPHA] {
        let mut out = [S::zero(); MAX_ALPHA];
        apply::<S>(&tr.bt, tr.alpha, tr.alpha, x, &mut out);
        out
    }
    #[inline(always)]
    unsafe fn output<S: Simd>(tr: &Transform, x: &[S::V; MAX_ALPHA]) -> [S::V; MAX_ALPHA] {
        let mut out = [S::zero(); MAX_ALPHA];
        apply::<S>(&tr.at, tr.m, tr.alpha, x, &mut out);
        out
    }
}

/// One phase of a Winograd step: where its patches start (input pixels, relative to the
/// tile's first output times the stride) and which sub-pixel of an up-sampled output it
/// writes (gathering steps write one output and ignore `sub`).
#[derive(Debug, Clone, Copy)]
pub struct WinogradPhase {
    pub origin: (isize, isize),
    pub sub: (usize, usize),
}

/// A stride-1 correlation by F(m×m, r×r), for one or more output phases, or (`stride` 2) the
/// sum of one or more stride-2 phase correlations into one output.
#[derive(Debug, Clone)]
pub struct WinogradConv {
    pub input: View,
    pub output: View,
    pub transform: Transform,
    pub phases: Vec<WinogradPhase>,
    /// Output map size over the phase grid (1, or 2 for transposed convolutions).
    pub up: usize,
    /// 1: every phase is its own output (items per phase); 2: the phases read every other
    /// input pixel and are summed into one output (`V` rows hold all phases).
    pub stride: usize,
    pub cin: usize,
    pub cout: usize,
    pub nv: usize,
    pub lanes: usize,
    /// Tiles per block (a multiple of the GEMM tile rows).
    pub block: usize,
    /// `[phase][ξ][panel][cin][nv·lanes]`; gathering, `[ξ][panel][phase][cin][nv·lanes]`.
    pub u: Vec<f32>,
    /// Zero-padded to whole panels, `[phase][panel·nr]` (one phase when gathering).
    pub bias: Vec<f32>,
    pub min: f32,
    pub max: f32,
}

impl WinogradConv {
    pub fn panels(&self) -> usize {
        self.cout.div_ceil(self.nv * self.lanes)
    }

    fn xi(&self) -> usize {
        self.transform.alpha * self.transform.alpha
    }

    /// Input channels rounded up to whole vectors (the row stride of `V`).
    pub fn cin_padded(&self) -> usize {
        self.cin.div_ceil(self.lanes) * self.lanes
    }

    /// Phases transformed into one `V` row, and output items per block.
    fn row_phases(&self) -> (usize, usize) {
        if self.stride == 1 { (1, self.phases.len()) } else { (self.phases.len(), 1) }
    }

    /// The phase grid: the output map over the sub-pixels.
    fn grid(&self) -> (usize, usize) {
        (self.output.h / self.up, self.output.w / self.up)
    }

    /// Tiles per image and phase.
    fn tiles_per_image(&self) -> (usize, usize) {
        let m = self.transform.m;
        let (gh, gw) = self.grid();
        (gh.div_ceil(m), gw.div_ceil(m))
    }

    /// Floats of per-thread scratch: `V` for a block, `M` for one panel of it.
    pub fn scratch_floats(&self) -> usize {
        self.xi() * self.block * (self.row_phases().0 * self.cin_padded() + self.nv * self.lanes)
    }

    pub fn split(&self, n: usize, threads: usize) -> Split {
        let (th, tw) = self.tiles_per_image();
        let blocks = (n * th * tw).div_ceil(self.block);
        let outer = blocks * self.row_phases().1;
        if threads <= 1 {
            return Split { groups: 1, chunks: blocks };
        }
        // Every block is an item; too few of them, and panels are split too (each group
        // repeats the block's input transform).
        let groups = if outer >= 2 * threads { 1 } else { self.panels().min((2 * threads).div_ceil(outer)) };
        Split { groups, chunks: blocks }
    }

    pub fn items(&self, split: Split) -> usize {
        self.row_phases().1 * split.groups * split.chunks
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
        match (self.transform.m, self.transform.r) {
            (4, 3) => self.run_with::<S, MR, NV, F43>(ctx, split, item, scratch),
            (2, 2) => self.run_with::<S, MR, NV, F22>(ctx, split, item, scratch),
            (3, 2) => self.run_with::<S, MR, NV, F32>(ctx, split, item, scratch),
            (4, 2) => self.run_with::<S, MR, NV, F42>(ctx, split, item, scratch),
            _ => self.run_with::<S, MR, NV, Dynamic>(ctx, split, item, scratch),
        }
    }

    #[inline(always)]
    unsafe fn run_with<S: Simd, const MR: usize, const NV: usize, X: Transforms>(&self, ctx: &Ctx, split: Split, item: usize, scratch: *mut f32) {
        debug_assert_eq!(tile_rows(self.lanes, self.nv), MR);
        let per_phase = split.groups * split.chunks;
        let (phase_index, rest) = (item / per_phase, item % per_phase);
        let (block_index, group) = (rest / split.groups, rest % split.groups);
        let (row_phases, _) = self.row_phases();
        let stride = self.stride;
        let sub = if stride == 1 { self.phases[phase_index].sub } else { (0, 0) };
        let tr = &self.transform;
        let (tm, alpha) = (tr.m, tr.alpha);
        let xi_count = alpha * alpha;
        let (th, tw) = self.tiles_per_image();
        let per_image = th * tw;
        let total = ctx.n * per_image;
        let t0 = block_index * self.block;
        let count = self.block.min(total - t0);
        let cp = self.cin_padded();
        // V's row: the phases' channels side by side.
        let ldv = row_phases * cp;
        let nr = NV * S::LANES;
        let v = scratch;
        let mbuf = scratch.add(xi_count * self.block * ldv);
        let input = ctx.ptr(&self.input);
        let output = ctx.ptr(&self.output);
        let (ih, iw, ics) = (self.input.h, self.input.w, self.input.cs);
        let wp = iw + 2;
        let image_floats = self.input.positions() * ics;

        // Input transform: V[ξ][t][phase·cp + c].
        for t in 0..self.block {
            if t >= count {
                for xi in 0..xi_count {
                    std::ptr::write_bytes(v.add((xi * self.block + t) * ldv), 0, ldv);
                }
                continue;
            }
            let g = t0 + t;
            let (img, local) = (g / per_image, g % per_image);
            let (ty, tx) = (local / tw, local % tw);
            for q in 0..row_phases {
                let phase = self.phases[if stride == 1 { phase_index } else { q }];
                // Padded coordinates of the patch's top-left corner (origin ≥ −1); its
                // points are `stride` pixels apart.
                let py = (stride * ty * tm) as isize + phase.origin.0 + 1;
                let px = (stride * tx * tm) as isize + phase.origin.1 + 1;
                let (py, px) = (py as usize, px as usize);
                let span = stride * (alpha - 1);
                let inside = py + span < ih + 2 && px + span < iw + 2;
                let base = input.add(img * image_floats + (py * wp + px) * ics);
                let vq = v.add(q * cp);
                let mut c = 0;
                while c < self.cin {
                    let n = self.cin - c;
                    let mut rows = [[S::zero(); MAX_ALPHA]; MAX_ALPHA];
                    for (y, row) in rows.iter_mut().enumerate().take(alpha) {
                        let mut d = [S::zero(); MAX_ALPHA];
                        for (x, dv) in d.iter_mut().enumerate().take(alpha) {
                            if inside || (py + stride * y < ih + 2 && px + stride * x < iw + 2) {
                                *dv = S::load_n(base.add((stride * (y * wp + x)) * ics + c), n);
                            }
                        }
                        *row = X::input::<S>(tr, &d);
                    }
                    for xi_x in 0..alpha {
                        let mut column = [S::zero(); MAX_ALPHA];
                        for (y, col) in column.iter_mut().enumerate().take(alpha) {
                            *col = rows[y][xi_x];
                        }
                        let out = X::input::<S>(tr, &column);
                        for (xi_y, value) in out.iter().enumerate().take(alpha) {
                            S::store(vq.add(((xi_y * alpha + xi_x) * self.block + t) * ldv + c), *value);
                        }
                    }
                    c += S::LANES;
                }
            }
        }

        let panels = self.panels();
        let (p_lo, p_hi) = range(panels, split.groups, group);
        let (ow, ocs) = (self.output.w, self.output.cs);
        let owp = ow + 2;
        let out_image = self.output.positions() * ocs;
        let (lo, hi) = (S::splat(self.min), S::splat(self.max));
        let rows = count.div_ceil(MR);
        let up = self.up;
        let (gh, gw) = self.grid();
        let segment = row_phases * self.cin * nr;
        let u = self.u.as_ptr().add(phase_index * xi_count * panels * segment);
        let bias_base = self.bias.as_ptr().add(phase_index * panels * nr);
        // The GEMM's segments: each phase's channels of the row.
        let offsets: [isize; 4] = std::array::from_fn(|q| (q * cp) as isize);
        let offsets = &offsets[..row_phases];
        for p in p_lo..p_hi {
            // The α² GEMMs of this panel: M[ξ][t][k].
            for xi in 0..xi_count {
                let a = v.add(xi * self.block * ldv);
                let b = u.add((xi * panels + p) * segment);
                for rt in 0..rows {
                    let acc = tile::<S, MR, NV>(a.add(rt * MR * ldv), ldv, offsets, self.cin, b);
                    let dst = mbuf.add((xi * self.block + rt * MR) * nr);
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
                let (oy, ox) = (ty * tm, tx * tm);
                for j in 0..NV {
                    let k = p * nr + j * S::LANES;
                    if k >= self.cout {
                        break;
                    }
                    let valid = self.cout - k;
                    // cols[ξx][dy] = Σ_ξy Aᵀ[dy][ξy] · M[ξy][ξx].
                    let mut cols = [[S::zero(); MAX_ALPHA]; MAX_ALPHA];
                    for (xi_x, col) in cols.iter_mut().enumerate().take(alpha) {
                        let mut column = [S::zero(); MAX_ALPHA];
                        for (xi_y, c) in column.iter_mut().enumerate().take(alpha) {
                            *c = S::load(mbuf.add(((xi_y * alpha + xi_x) * self.block + t) * nr + j * S::LANES));
                        }
                        *col = X::output::<S>(tr, &column);
                    }
                    let bias = S::load(bias_base.add(k));
                    for dy in 0..tm {
                        if oy + dy >= gh {
                            break;
                        }
                        let mut row = [S::zero(); MAX_ALPHA];
                        for (xi_x, r) in row.iter_mut().enumerate().take(alpha) {
                            *r = cols[xi_x][dy];
                        }
                        let out = X::output::<S>(tr, &row);
                        let y = (oy + dy) * up + sub.0 + 1;
                        for (dx, value) in out.iter().enumerate().take(tm) {
                            if ox + dx >= gw {
                                break;
                            }
                            let x = (ox + dx) * up + sub.1 + 1;
                            let value = S::min(S::max(S::add(*value, bias), lo), hi);
                            S::store_n(output.add(img * out_image + (y * owp + x) * ocs + k), value, valid);
                        }
                    }
                }
            }
        }
    }
}

/// Transforms and packs one phase's weights for [`WinogradConv`], `[ξ][panel][cin][nr]`:
/// `g(k, c, out)` writes the r×r kernel (row-major) of output channel `k` and input channel
/// `c`. The transform `U = G g Gᵀ` runs a panel of output channels at a time (vectorized
/// along them), in f32.
pub fn pack(transform: &Transform, cin: usize, cout: usize, nr: usize, g: impl Fn(usize, usize, &mut [f32]) + Sync) -> Vec<f32> {
    let (a, r) = (transform.alpha, transform.r);
    let xi_count = a * a;
    let panels = cout.div_ceil(nr);
    let gm: Vec<f32> = transform.g.iter().map(|v| *v as f32).collect();
    let len = xi_count * panels * cin * nr;
    let mut out = Vec::with_capacity(len);
    let base = gemm::PackPtr(out.as_mut_ptr());
    // One panel of output channels per call, on up to four threads (weights transformed on
    // every training step).
    let pack_panel = |p: usize| {
        let base = &base;
        let mut one = [0f32; 9];
        // [i][j][lane], [x][j][lane], [x][y][lane].
        let mut kern = vec![0f32; r * r * nr];
        let mut tmp = vec![0f32; a * r * nr];
        let mut u = vec![0f32; a * a * nr];
        for c in 0..cin {
            for lane in 0..nr {
                let k = p * nr + lane;
                if k < cout {
                    g(k, c, &mut one[..r * r]);
                } else {
                    one[..r * r].fill(0.0);
                }
                for q in 0..r * r {
                    kern[q * nr + lane] = one[q];
                }
            }
            tmp.fill(0.0);
            for x in 0..a {
                for i in 0..r {
                    let coef = gm[x * r + i];
                    if coef == 0.0 {
                        continue;
                    }
                    for jj in 0..r {
                        let (dst, src) = (&mut tmp[(x * r + jj) * nr..][..nr], &kern[(i * r + jj) * nr..][..nr]);
                        dst.iter_mut().zip(src).for_each(|(d, s)| *d += coef * s);
                    }
                }
            }
            u.fill(0.0);
            for x in 0..a {
                for y in 0..a {
                    for jj in 0..r {
                        let coef = gm[y * r + jj];
                        if coef == 0.0 {
                            continue;
                        }
                        let (dst, src) = (&mut u[(x * a + y) * nr..][..nr], &tmp[(x * r + jj) * nr..][..nr]);
                        dst.iter_mut().zip(src).for_each(|(d, s)| *d += coef * s);
                    }
                }
            }
            for xi in 0..xi_count {
                // SAFETY: row (ξ, p, c) lies in `out`'s capacity; each panel `p` is written
                // by one call only.
                unsafe { std::ptr::copy_nonoverlapping(u.as_ptr().add(xi * nr), base.0.add(((xi * panels + p) * cin + c) * nr), nr) };
            }
        }
    };
    gemm::for_indices(panels, len, &pack_panel);
    // SAFETY: every (ξ, panel, channel) row of `nr` floats was written above.
    unsafe { out.set_len(len) };
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// F(m, r) on one row against the direct correlation.
    fn check_1d(m: usize, r: usize) {
        let t = Transform::new(m, r);
        let a = t.alpha;
        let d: Vec<f64> = (0..a).map(|i| (i as f64 * 0.7 - 1.3).sin()).collect();
        let g: Vec<f64> = (0..r).map(|i| (i as f64 * 1.1 + 0.2).cos()).collect();
        let gg: Vec<f64> = (0..a).map(|i| (0..r).map(|k| t.g[i * r + k] * g[k]).sum()).collect();
        let bd: Vec<f64> = (0..a).map(|i| (0..a).map(|j| t.bt[i * a + j] as f64 * d[j]).sum()).collect();
        for o in 0..m {
            let y: f64 = (0..a).map(|i| t.at[o * a + i] as f64 * gg[i] * bd[i]).sum();
            let direct: f64 = (0..r).map(|u| d[o + u] * g[u]).sum();
            assert!((y - direct).abs() < 1e-5, "F({m},{r}) output {o}: {y} vs {direct}");
        }
    }

    #[test]
    fn constant_transforms_are_the_computed_ones() {
        fn same<const A: usize, const M: usize>(m: usize, bt: &[[f32; A]; A], at: &[[f32; A]; M]) {
            let t = Transform::new(m, 2);
            let flat_bt: Vec<f32> = bt.iter().flatten().copied().collect();
            let flat_at: Vec<f32> = at.iter().flatten().copied().collect();
            for (a, b) in t.bt.iter().zip(&flat_bt).chain(t.at.iter().zip(&flat_at)) {
                assert!((a - b).abs() < 1e-6, "F({m}, 2): {a} vs {b}");
            }
            assert_eq!((t.bt.len(), t.at.len()), (flat_bt.len(), flat_at.len()));
        }
        same(2, &F22::BT, &F22::AT);
        same(3, &F32::BT, &F32::AT);
        same(4, &F42::BT, &F42::AT);
    }

    /// A Conv(k4, s2, p1) (a ConvTranspose's input gradient) as gathered Winograd phases, with
    /// every tile size, on every instruction set, split for one and three threads, against the
    /// definition: odd and even maps, partial tiles, channel counts off whole vectors.
    #[test]
    fn gathered_phases_compute_the_strided_convolution() {
        use crate::engine::graph::{Act, ConvKind, ConvOp};
        use crate::engine::kernels::{Kernel, KernelOptions, slack_floats, zero_borders};
        use crate::engine::{Isa, WinogradPolicy};
        let isas = [Isa::Avx512, Isa::Avx2, Isa::Portable].into_iter().filter(|i| i.supported());
        for isa in isas {
            for (n, cin, cout, h, w) in [(2, 8, 20, 8, 8), (1, 24, 40, 9, 7), (3, 17, 33, 4, 6), (2, 40, 24, 16, 16)] {
                let wlen = cout * cin * 16;
                let weight: Vec<f32> = (0..wlen).map(|i| ((i * 7919 % 1009) as f32 / 504.5 - 1.0) * 0.3).collect();
                let bias: Vec<f32> = (0..cout).map(|o| o as f32 * 0.01 - 0.1).collect();
                let op = ConvOp { kind: ConvKind::Dense, cin, cout, k: 4, stride: 2, pad: 1, weight: weight.clone(), bias: bias.clone(), act: Act::Identity };
                let (oh, ow) = (h / 2, w / 2);
                let (wp, owp) = (w + 2, ow + 2);
                let image = (h + 2) * wp * cin;
                let mut x = vec![0f32; n * image + slack_floats(w, cin)];
                let value = |i: usize, y: usize, xx: usize, c: usize| ((i * 131 + y * 31 + xx * 17 + c * 7) % 97) as f32 / 48.5 - 1.0;
                for i in 0..n {
                    for y in 0..h {
                        for xx in 0..w {
                            for c in 0..cin {
                                x[i * image + ((y + 1) * wp + xx + 1) * cin + c] = value(i, y, xx, c);
                            }
                        }
                    }
                }
                for m in [2, 3, 4] {
                    if oh < m || ow < m {
                        continue;
                    }
                    let options = KernelOptions { isa, winograd: WinogradPolicy::Tile(m), batch: n };
                    let kernel = Kernel::conv(&op, h, w, &options).unwrap();
                    assert!(kernel.name().starts_with("winograd-gather"), "{isa:?} m {m}: {}", kernel.name());
                    for threads in [1, 3] {
                        let oimage = (oh + 2) * owp * cout;
                        let mut out = vec![f32::NAN; n * oimage];
                        let work = kernel.work(n, threads);
                        let mut scratch = vec![0f32; kernel.scratch_floats()];
                        unsafe {
                            zero_borders(out.as_mut_ptr(), n, oh, ow, cout);
                            for item in 0..work.items {
                                kernel.run(x.as_ptr(), out.as_mut_ptr(), n, &work, item, scratch.as_mut_ptr());
                            }
                        }
                        for i in 0..n {
                            for oy in 0..oh {
                                for ox in 0..ow {
                                    for o in 0..cout {
                                        let mut want = bias[o] as f64;
                                        for c in 0..cin {
                                            for ky in 0..4 {
                                                for kx in 0..4 {
                                                    let (y, xx) = ((2 * oy + ky) as isize - 1, (2 * ox + kx) as isize - 1);
                                                    if y >= 0 && xx >= 0 && (y as usize) < h && (xx as usize) < w {
                                                        want += weight[((o * cin + c) * 4 + ky) * 4 + kx] as f64 * value(i, y as usize, xx as usize, c) as f64;
                                                    }
                                                }
                                            }
                                        }
                                        let got = out[i * oimage + ((oy + 1) * owp + ox + 1) * cout + o] as f64;
                                        assert!((got - want).abs() <= 1e-3 * want.abs().max(1.0), "{isa:?} m {m} threads {threads} {cin}→{cout} {h}×{w} image {i} ({oy}, {ox}) channel {o}: {got} vs {want}");
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn transforms_compute_the_correlation() {
        for (m, r) in [(2, 2), (3, 2), (4, 2), (2, 3), (4, 3)] {
            check_1d(m, r);
        }
    }
}
