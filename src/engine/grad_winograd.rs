//! The weight gradient of a k4, stride-2, padding-1 pairing (a ConvTranspose(k4, s2, p1), or
//! a Conv(k4, s2, p1)) by Winograd's minimal filtering, F(2, m) per dimension.
//!
//! Pixel `i` of the small-side map `A` meets pixel `2i − 1 + ky` of `B` through kernel row
//! `ky` (see [`super::grad`]). Taken per parity of `B`'s rows, that is two correlations of
//! two taps each: with `P_a[t] = B[2t + a]`,
//!
//! `G[ky = TAPS[a][u]] = Σ_i A[i] · P_a[i + u − a]`,  `u ∈ {0, 1}`, `TAPS = [[1, 3], [0, 2]]`,
//!
//! and in two dimensions four phases `(a, b)` of 2×2 taps each. A 2-output correlation is
//! F(2, m) with `A`'s m×m tile as the "filter" and `P`'s α×α patch (α = m + 1) as the data:
//! per tile and channel pair α² multiplies instead of 4m² (9 instead of 16 for m = 2), and
//! since the output transform `Aᵀ (·) A` is linear, the sum over tiles comes first:
//!
//! `G_phase = Aᵀ [Σ_tiles (G x Gᵀ)_ξ ⊙ (Bᵀ d B)_ξ] A`,
//!
//! α² GEMMs (one per ξ) of `A`'s channels × `B`'s channels over the tiles, on
//! [`gemm::outer_tile`]. `A`'s transform does not depend on the phase: one transform serves
//! all four. The output transform is fused: each ξ's register tile is added, scaled by
//! `Aᵀ[u][ξx]·Aᵀ[v][ξy]`, into four tap accumulators that are stored once.
//!
//! Two kinds of work items: [`GradWinograd::transform`] (blocks of tiles: both operands
//! transformed into packed panels `[ξ][row tile][tile][MR]` and `[ξ][phase][vector
//! tile][tile][NR]`) and [`GradWinograd::gemm`] (a phase and a block of row tiles: writes
//! its taps' rows of the `[tap][A channel][B channel]` buffer, every float once).

#![allow(unsafe_op_in_unsafe_fn)]

use anyhow::{Result, ensure};

use super::gemm::{self, outer_tile};
use super::grad::MapShape;
use super::simd::Simd;
use super::winograd::Transform;
use super::{Isa, SimdJob, dispatch};

use super::conv::K4S2_PHASE_TAPS as TAPS;

/// Tiles per transform item.
const TILES_PER_ITEM: usize = 8;

/// Bytes of one block's `A` panels (one ξ, one chunk of tiles) and accumulators: what stays
/// cached while the `B` panels stream past it.
const BLOCK_BYTES: usize = 256 << 10;

/// Tiles per chunk of the reduction (the GEMMs' depth between visits of the accumulators).
const CHUNK_TILES: usize = 256;

/// The Winograd weight gradient of one k4 s2 p1 pairing (see the module docs).
#[derive(Debug, Clone)]
pub struct GradWinograd {
    isa: Isa,
    a: MapShape,
    b: MapShape,
    n: usize,
    transform: Transform,
    /// `G` (α × m) in f32.
    g: Vec<f32>,
    tiles_y: usize,
    tiles_x: usize,
    /// Row tiles per GEMM item.
    r_block: usize,
}

impl GradWinograd {
    /// F(2, m) tiles of `A` (`m` 2 or 3) over a batch of `n`; `B` must be twice `A`'s size.
    pub fn new(a: MapShape, b: MapShape, n: usize, m: usize, isa: Isa) -> Result<GradWinograd> {
        ensure!(isa.supported(), "this CPU cannot run the {} kernels", isa.name());
        ensure!((2..=3).contains(&m), "F(2, {m}) weight gradients are not supported");
        ensure!(b.h == 2 * a.h && b.w == 2 * a.w, "a {}×{} map does not pair with a {}×{} map through a k4 s2 p1 kernel", a.h, a.w, b.h, b.w);
        ensure!(n >= 1 && a.c >= 1 && b.c >= 1, "empty weight gradient");
        let transform = Transform::new(2, m);
        let g = transform.g.iter().map(|v| *v as f32).collect();
        let (tiles_y, tiles_x) = (a.h.div_ceil(m), a.w.div_ceil(m));
        let mut wg = GradWinograd { isa, a, b, n, transform, g, tiles_y, tiles_x, r_block: 1 };
        // A block's A panels of one ξ and chunk, and its accumulators (four taps of every
        // vector tile), within BLOCK_BYTES; the blocks of one size. (Vector tile by vector
        // tile with every ξ inside, for larger blocks where the accumulators are many, ran
        // the 4² 320 → 512 layer 1.3× slower.)
        let (mr, nr) = (wg.mr(), wg.nr());
        let per_row_tile = (wg.tiles().min(CHUNK_TILES) * mr + wg.vector_tiles() * 4 * mr * nr) * 4;
        let most = (BLOCK_BYTES / per_row_tile).clamp(1, wg.row_tiles());
        wg.r_block = wg.row_tiles().div_ceil(wg.row_tiles().div_ceil(most));
        Ok(wg)
    }

    /// Whether F(2, m) pays for a pairing, and which m. Measured on one Zen 5 thread
    /// (`examples/wgrad_bench`, batch 8, the mobilenetv2_unet decoder's layers): against the
    /// direct reduction F(2, 2) ran 1.71–1.75× on 4², 8² and 16² maps of 320–1088 channels,
    /// F(2, 3) 1.33× (F(2, 2) 1.13×) on a 32² map of 272 → 64 channels, where the panels'
    /// 2.25× expansion of the maps makes the transform memory-bound; a side of 3 channels
    /// ran at 0.1×.
    pub fn choose(a: MapShape, b: MapShape, k: usize, stride: usize, pad: usize) -> Option<usize> {
        let pairs = k == 4 && stride == 2 && pad == 1 && b.h == 2 * a.h && b.w == 2 * a.w;
        (pairs && a.h >= 2 && a.w >= 2 && a.c >= 8 && b.c >= 8).then_some(if a.h >= 24 && a.w >= 24 { 3 } else { 2 })
    }

    fn m(&self) -> usize {
        self.transform.r
    }

    fn alpha(&self) -> usize {
        self.transform.alpha
    }

    fn xi(&self) -> usize {
        self.alpha() * self.alpha()
    }

    fn mr(&self) -> usize {
        gemm::tile_rows(self.isa.lanes(), 2)
    }

    fn nr(&self) -> usize {
        2 * self.isa.lanes()
    }

    /// Tiles over the batch (the GEMMs' depth).
    pub fn tiles(&self) -> usize {
        self.n * self.tiles_y * self.tiles_x
    }

    fn row_tiles(&self) -> usize {
        self.a.c.div_ceil(self.mr())
    }

    fn vector_tiles(&self) -> usize {
        self.b.c.div_ceil(self.nr())
    }

    /// Floats of `A`'s panels (with a vector of slack).
    pub fn a_panels_len(&self) -> usize {
        self.xi() * self.row_tiles() * self.tiles() * self.mr() + self.isa.lanes()
    }

    /// Floats of `B`'s panels.
    pub fn b_panels_len(&self) -> usize {
        self.xi() * 4 * self.vector_tiles() * self.tiles() * self.nr()
    }

    /// Floats of the `[tap][A channel][B channel]` buffer [`Self::gemm`] writes.
    pub fn buffer_len(&self) -> usize {
        16 * self.a.c * self.b.c
    }

    pub fn transform_items(&self) -> usize {
        self.tiles().div_ceil(TILES_PER_ITEM)
    }

    pub fn gemm_items(&self) -> usize {
        4 * self.row_tiles().div_ceil(self.r_block)
    }

    /// Transforms item `item`'s tiles of both maps into the panels.
    ///
    /// # Safety
    /// `a` and `b` hold `n` padded images of their shapes (zero borders); `pa` and `pb` hold
    /// [`Self::a_panels_len`] and [`Self::b_panels_len`] floats; items write disjoint parts.
    pub unsafe fn transform(&self, a: *const f32, b: *const f32, item: usize, pa: *mut f32, pb: *mut f32) {
        let (m, al) = (self.m(), self.alpha());
        let xi = self.xi();
        let (am, bm) = (self.a, self.b);
        let (ca, cb) = (am.c, bm.c);
        let (mr, nr) = (self.mr(), self.nr());
        let (rtiles, vtiles) = (self.row_tiles(), self.vector_tiles());
        let tiles = self.tiles();
        let g = &self.g;
        let bt = &self.transform.bt;
        let c_max = ca.max(cb);
        // [ξx][q][c] (the first pass), [ξx][ξy][c] (the transform).
        let mut tmp = vec![0f32; al * al * c_max];
        let mut out = vec![0f32; xi * c_max];
        let (awp, bwp) = (am.w + 2, bm.w + 2);
        let (bh_padded, bw_padded) = (bm.h + 2, bm.w + 2);
        let per_image = self.tiles_y * self.tiles_x;
        for t in item * TILES_PER_ITEM..((item + 1) * TILES_PER_ITEM).min(tiles) {
            let (img, rem) = (t / per_image, t % per_image);
            let (i0, j0) = ((rem / self.tiles_x) * m, (rem % self.tiles_x) * m);
            // A's tile `G x Gᵀ`, zero past the map.
            let a_img = a.add(img * am.image_floats());
            let pixel = |p: usize, q: usize| (i0 + p < am.h && j0 + q < am.w).then(|| a_img.add(((i0 + p + 1) * awp + j0 + q + 1) * am.cs));
            transform_patch(g, al, m, ca, pixel, &mut tmp, &mut out);
            scatter(&out, xi, ca, mr, |x, rt| pa.add(((x * rtiles + rt) * tiles + t) * mr));
            // B's patch `Bᵀ d B` of each phase (a, b): d[s][s'] = B[2(i0 + s) − a][2(j0 + s') − b]
            // (padded row 2(i0 + s) − a + 1), zero past the padded map.
            let b_img = b.add(img * bm.image_floats());
            for phase in 0..4 {
                let (ya, xb) = (1 - phase / 2, 1 - phase % 2);
                let pixel = |s: usize, s2: usize| {
                    let (y, x) = (2 * (i0 + s) + ya, 2 * (j0 + s2) + xb);
                    (y < bh_padded && x < bw_padded).then(|| b_img.add((y * bwp + x) * bm.cs))
                };
                transform_patch(bt, al, al, cb, pixel, &mut tmp, &mut out);
                scatter(&out, xi, cb, nr, |x, vt| pb.add((((x * 4 + phase) * vtiles + vt) * tiles + t) * nr));
            }
        }
    }

    /// Item `item`'s phase and row tiles: the α² GEMMs over every tile with the output
    /// transform fused, stored into `buffer` (`[tap][A channel][B channel]`, every float of
    /// the item's taps and rows written once).
    ///
    /// # Safety
    /// The panels were filled by every [`Self::transform`] item; `buffer` holds
    /// [`Self::buffer_len`] floats; items write disjoint parts.
    pub unsafe fn gemm(&self, pa: *const f32, pb: *const f32, item: usize, buffer: *mut f32) {
        struct Job<'a> {
            g: &'a GradWinograd,
            pa: *const f32,
            pb: *const f32,
            item: usize,
            buffer: *mut f32,
        }
        impl SimdJob for Job<'_> {
            #[inline(always)]
            unsafe fn run<S: Simd>(&self) {
                match S::LANES {
                    16 => self.g.gemm_shape::<S, 12, 2>(self.pa, self.pb, self.item, self.buffer),
                    _ => self.g.gemm_shape::<S, 6, 2>(self.pa, self.pb, self.item, self.buffer),
                }
            }
        }
        dispatch(self.isa, &Job { g: self, pa, pb, item, buffer })
    }

    #[inline(always)]
    unsafe fn gemm_shape<S: Simd, const MR: usize, const NV: usize>(&self, pa: *const f32, pb: *const f32, item: usize, buffer: *mut f32) {
        debug_assert_eq!(MR, self.mr());
        let nr = NV * S::LANES;
        let (al, xi) = (self.alpha(), self.xi());
        let (ca, cb) = (self.a.c, self.b.c);
        let (rtiles, vtiles) = (self.row_tiles(), self.vector_tiles());
        let tiles = self.tiles();
        let blocks = rtiles.div_ceil(self.r_block);
        let (phase, rb) = (item / blocks, item % blocks);
        let rts = rb * self.r_block..((rb + 1) * self.r_block).min(rtiles);
        let at = &self.transform.at;
        // Aᵀ[u][ξx]·Aᵀ[v][ξy] for taps (u, v) = (0, 0), (0, 1), (1, 0), (1, 1).
        let coefs: Vec<[f32; 4]> = (0..xi)
            .map(|x| {
                let (ex, ey) = (x / al, x % al);
                [at[ex] * at[ey], at[ex] * at[al + ey], at[al + ex] * at[ey], at[al + ex] * at[al + ey]]
            })
            .collect();
        // [row tile][vector tile][tap] accumulators over all chunks of tiles.
        let zero = [[S::zero(); NV]; MR];
        let mut acc = vec![zero; rts.len() * vtiles * 4];
        // Per chunk of tiles and ξ: the block's A panels stay cached while each vector
        // tile's B panel passes all of them.
        for k0 in (0..tiles).step_by(CHUNK_TILES) {
            let kc = CHUNK_TILES.min(tiles - k0);
            for (x, vt) in (0..xi).flat_map(|x| (0..vtiles).map(move |vt| (x, vt))) {
                let coef = &coefs[x];
                let bp = pb.add((((x * 4 + phase) * vtiles + vt) * tiles + k0) * nr);
                for (i, rt) in rts.clone().enumerate() {
                    let ap = pa.add(((x * rtiles + rt) * tiles + k0) * MR);
                    let part = outer_tile::<S, MR, NV>(&[(ap, bp)], kc, MR, nr);
                    for (uv, &c) in coef.iter().enumerate() {
                        if c == 0.0 {
                            continue;
                        }
                        let cv = S::splat(c);
                        let dst = &mut acc[(i * vtiles + vt) * 4 + uv];
                        for (drow, prow) in dst.iter_mut().zip(&part) {
                            for (d, p) in drow.iter_mut().zip(prow) {
                                *d = S::fma(cv, *p, *d);
                            }
                        }
                    }
                }
            }
        }
        let (ta, tb) = (TAPS[phase / 2], TAPS[phase % 2]);
        for (i, rt) in rts.enumerate() {
            for vt in 0..vtiles {
                for uv in 0..4 {
                    let tap = ta[uv / 2] * 4 + tb[uv % 2];
                    for (r, row) in acc[(i * vtiles + vt) * 4 + uv].iter().enumerate() {
                        let ci = rt * MR + r;
                        if ci >= ca {
                            break;
                        }
                        let dst = buffer.add((tap * ca + ci) * cb);
                        for (j, v) in row.iter().enumerate() {
                            let co = vt * nr + j * S::LANES;
                            if co >= cb {
                                break;
                            }
                            S::store_n(dst.add(co), *v, (cb - co).min(S::LANES));
                        }
                    }
                }
            }
        }
    }
}

/// `out[x][y][·] = Σ_(s, s') M[x][s] · M[y][s'] · patch(s, s')[·]`: the separable transform of an
/// `n × n` patch of `c`-channel pixels by the α×n matrix `mat` (row-major), vectorized along
/// the channels; `pixel(s, s')` is `None` for a pixel that reads as zero. `tmp` holds
/// α·n·c floats, `out` α²·c.
///
/// # Safety
/// Every pixel `pixel` returns points to `c` readable floats.
#[inline(always)]
unsafe fn transform_patch(mat: &[f32], al: usize, n: usize, c: usize, pixel: impl Fn(usize, usize) -> Option<*const f32>, tmp: &mut [f32], out: &mut [f32]) {
    // tmp[x][s'] = Σ_s M[x][s] · patch(s, s').
    tmp[..al * n * c].fill(0.0);
    for s in 0..n {
        for s2 in 0..n {
            let Some(src) = pixel(s, s2) else { continue };
            let src = std::slice::from_raw_parts(src, c);
            for x in 0..al {
                let coef = mat[x * n + s];
                if coef != 0.0 {
                    let dst = &mut tmp[(x * n + s2) * c..][..c];
                    dst.iter_mut().zip(src).for_each(|(d, v)| *d += coef * v);
                }
            }
        }
    }
    // out[x][y] = Σ_s' M[y][s'] · tmp[x][s'].
    out[..al * al * c].fill(0.0);
    for x in 0..al {
        for y in 0..al {
            for s2 in 0..n {
                let coef = mat[y * n + s2];
                if coef != 0.0 {
                    let (dst, src) = (&mut out[(x * al + y) * c..][..c], &tmp[(x * n + s2) * c..][..c]);
                    dst.iter_mut().zip(src).for_each(|(d, v)| *d += coef * v);
                }
            }
        }
    }
}

/// Stores the `xi` rows of `out` (`c` channels each) into panels `width` channels wide: row
/// ξ's channels `[w·width, (w + 1)·width)` at `dst(ξ, w)`, zero past `c`.
///
/// # Safety
/// Every `dst` has room for `width` floats.
#[inline(always)]
unsafe fn scatter(out: &[f32], xi: usize, c: usize, width: usize, dst: impl Fn(usize, usize) -> *mut f32) {
    for x in 0..xi {
        for w in 0..c.div_ceil(width) {
            let c0 = w * width;
            let valid = width.min(c - c0);
            let d = dst(x, w);
            std::ptr::copy_nonoverlapping(out.as_ptr().add(x * c + c0), d, valid);
            std::ptr::write_bytes(d.add(valid), 0, width - valid);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::grad::WeightGrad;

    /// Padded NHWC maps of `n` images with zero borders and deterministic interiors.
    fn map(n: usize, s: MapShape, seed: u32) -> Vec<f32> {
        let mut v = vec![0f32; n * s.image_floats() + 64];
        let mut state = seed;
        for img in 0..n {
            for y in 0..s.h {
                for x in 0..s.w {
                    for c in 0..s.c {
                        state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                        v[img * s.image_floats() + ((y + 1) * (s.w + 2) + x + 1) * s.cs + c] = (state >> 8) as f32 / (1 << 24) as f32 - 0.5;
                    }
                }
            }
        }
        v
    }

    fn winograd(a: MapShape, b: MapShape, n: usize, m: usize, isa: Isa, xa: &[f32], xb: &[f32]) -> Vec<f32> {
        let wg = GradWinograd::new(a, b, n, m, isa).unwrap();
        let mut pa = vec![f32::NAN; wg.a_panels_len()];
        let mut pb = vec![f32::NAN; wg.b_panels_len()];
        for item in 0..wg.transform_items() {
            unsafe { wg.transform(xa.as_ptr(), xb.as_ptr(), item, pa.as_mut_ptr(), pb.as_mut_ptr()) };
        }
        pa[wg.a_panels_len() - isa.lanes()..].fill(0.0);
        let mut buffer = vec![f32::NAN; wg.buffer_len()];
        for item in 0..wg.gemm_items() {
            unsafe { wg.gemm(pa.as_ptr(), pb.as_ptr(), item, buffer.as_mut_ptr()) };
        }
        buffer
    }

    /// Against the direct reduction on every ISA this CPU has, odd sizes, channel counts off
    /// the tiles, several chunks of tiles and many vector tiles included.
    #[test]
    fn matches_the_direct_weight_gradient() {
        for isa in [Isa::Avx512, Isa::Avx2, Isa::Portable].into_iter().filter(|i| i.supported()) {
            for &(n, h, w, ca, cb, m) in &[(2, 4, 4, 13, 17, 2), (1, 5, 3, 24, 40, 2), (3, 8, 8, 30, 9, 3), (2, 7, 6, 12, 33, 3), (8, 16, 16, 20, 35, 2), (2, 4, 4, 320, 500, 2)] {
                let a = MapShape::new(h, w, ca);
                let b = MapShape::new(2 * h, 2 * w, cb);
                let (xa, xb) = (map(n, a, 7), map(n, b, 11));
                let got = winograd(a, b, n, m, isa, &xa, &xb);
                let direct = WeightGrad::new(a, b, 4, 2, 1, n, 1, isa).unwrap();
                let mut want = vec![0f32; direct.buffer_len()];
                for item in 0..direct.items() {
                    unsafe { direct.run(xa.as_ptr(), xb.as_ptr(), item, want.as_mut_ptr()) };
                }
                // Both buffers are [tap][A channel][B channel] when A's channels are the rows.
                let mut got_w = vec![0f32; ca * cb * 16];
                let mut want_w = vec![0f32; ca * cb * 16];
                super::super::grad::tap_major_to_weights(&got, 16, ca, cb, false, 0..ca, &mut got_w);
                direct.finish(&want, 0..ca, &mut want_w);
                let scale = want_w.iter().fold(0f32, |m, v| m.max(v.abs()));
                for (i, (g, e)) in got_w.iter().zip(&want_w).enumerate() {
                    assert!((g - e).abs() <= 1e-4 * scale.max(1.0), "{isa:?} n {n} {h}×{w} {ca}→{cb} m {m}: weight {i}: {g} vs {e}");
                }
            }
        }
    }
}
