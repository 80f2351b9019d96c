//! The register-blocked multiply-accumulate tile every dense kernel of the plan is built on:
//! `MR` rows of a broadcast operand (pixels or Winograd tiles, read in place with a row
//! stride, never packed) times `NV` vectors of a pre-packed operand (weights, `NV·LANES`
//! output channels per panel), accumulated in `MR × NV` vector registers.
//!
//! The reduction runs over *segments*: each is `kc` consecutive floats of every row, starting
//! at its own offset. A 3×3 convolution on a padded NHWC map is nine segments (one per tap:
//! the same pixels shifted by a row or a column), a 1×1 convolution or a Winograd GEMM is one.

#![allow(unsafe_op_in_unsafe_fn)]

use super::simd::Simd;

/// Register tile shapes `(MR, NV)` per vector width: "wide" panels of two vectors for layers
/// with more output channels than one vector holds, "narrow" panels of one vector otherwise.
/// AVX-512 has 32 registers (12×2 or 24×1 accumulators), AVX2 16 (6×2 or 12×1).
pub const fn tile_rows(lanes: usize, nv: usize) -> usize {
    match (lanes, nv) {
        (16, 2) => 12,
        (16, _) => 24,
        (_, 2) => 6,
        _ => 12,
    }
}

/// The panel width (in vectors) for a layer of `cout` output channels.
pub fn panel_vectors(lanes: usize, cout: usize) -> usize {
    if cout > lanes { 2 } else { 1 }
}

/// `acc[r][j] = Σ_s Σ_{c<kc} a[offsets[s] + r·lda + c] · b[(s·kc + c)·NV·L + j·L ..]`.
///
/// # Safety
/// Every address named above must be readable; the instruction set of `S` must be present.
#[inline(always)]
pub unsafe fn tile<S: Simd, const MR: usize, const NV: usize>(
    a: *const f32,
    lda: usize,
    offsets: &[isize],
    kc: usize,
    b: *const f32,
) -> [[S::V; NV]; MR] {
    debug_assert!(MR <= 24 && NV <= 2);
    #[cfg(target_arch = "x86_64")]
    {
        use super::{Isa, asm};
        // SAFETY (all of them): `S::ISA` says the CPU has the instructions; the tile types are
        // the same `[[vector; NV]; MR]` arrays.
        match (S::ISA, MR, NV) {
            (Isa::Avx512, 12, 2) => return std::mem::transmute_copy(&asm::tile_avx512_12x2(a, lda, offsets, kc, b)),
            (Isa::Avx512, 24, 1) => return std::mem::transmute_copy(&asm::tile_avx512_24x1(a, lda, offsets, kc, b)),
            (Isa::Avx512, 8, 2) => return std::mem::transmute_copy(&asm::tile_avx512_8x2(a, lda, offsets, kc, b)),
            (Isa::Avx2, 6, 2) => return std::mem::transmute_copy(&asm::tile_avx2_6x2(a, lda, offsets, kc, b)),
            (Isa::Avx2, 12, 1) => return std::mem::transmute_copy(&asm::tile_avx2_12x1(a, lda, offsets, kc, b)),
            _ => {}
        }
    }
    // The accumulators are separate locals (not an array, which the compiler keeps in memory
    // and stores to on every step), the rows unrolled with constant indices.
    macro_rules! kernel {
        ($($r:literal $x:ident $y:ident),*) => {{
            $(let mut $x = S::zero(); let mut $y = S::zero();)*
            let mut bp = b;
            for &offset in offsets {
                // Rows 3i, 3i+1, 3i+2 are `base[i]`, `base[i] + lda`, `base[i] + 2·lda`: x86
                // address modes (base + index·scale, scales 4 and 8), so eight base registers
                // and one stride address 24 rows.
                let mut base = [a; 8];
                for (i, p) in base.iter_mut().enumerate().take(MR.div_ceil(3)) {
                    *p = a.offset(offset).add(3 * i * lda);
                }
                for _ in 0..kc {
                    let b0 = S::load(bp);
                    let b1 = if NV > 1 { S::load(bp.add(S::LANES)) } else { b0 };
                    $(
                        if $r < MR {
                            let av = S::splat(*base[$r / 3].add(($r % 3) * lda));
                            $x = S::fma(av, b0, $x);
                            if NV > 1 {
                                $y = S::fma(av, b1, $y);
                            }
                        }
                    )*
                    for p in base.iter_mut().take(MR.div_ceil(3)) {
                        *p = p.add(1);
                    }
                    bp = bp.add(NV * S::LANES);
                }
            }
            let mut acc = [[S::zero(); NV]; MR];
            $(
                if $r < MR {
                    acc[$r][0] = $x;
                    if NV > 1 {
                        acc[$r][NV - 1] = $y;
                    }
                }
            )*
            acc
        }};
    }
    kernel!(0 x0 y0, 1 x1 y1, 2 x2 y2, 3 x3 y3, 4 x4 y4, 5 x5 y5, 6 x6 y6, 7 x7 y7, 8 x8 y8, 9 x9 y9, 10 x10 y10, 11 x11 y11, 12 x12 y12, 13 x13 y13, 14 x14 y14, 15 x15 y15, 16 x16 y16, 17 x17 y17, 18 x18 y18, 19 x19 y19, 20 x20 y20, 21 x21 y21, 22 x22 y22, 23 x23 y23)
}

/// Packs weights for [`tile`]: `w(segment, c, k)` into panels of `nr` output channels,
/// `[panel][segment][c][nr]`, zero beyond `cout`.
pub fn pack_panels(segments: usize, cin: usize, cout: usize, nr: usize, w: impl Fn(usize, usize, usize) -> f32) -> Vec<f32> {
    let panels = cout.div_ceil(nr);
    let mut out = vec![0f32; panels * segments * cin * nr];
    for p in 0..panels {
        for s in 0..segments {
            for c in 0..cin {
                let dst = &mut out[((p * segments + s) * cin + c) * nr..][..nr];
                for (j, d) in dst.iter_mut().enumerate() {
                    let k = p * nr + j;
                    if k < cout {
                        *d = w(s, c, k);
                    }
                }
            }
        }
    }
    out
}

/// [`pack_panels`] of a dense convolution's weights `[cout][cin][taps]` (segment = tap).
pub fn pack_dense(weight: &[f32], taps: usize, cin: usize, cout: usize, nr: usize) -> Vec<f32> {
    let panels = cout.div_ceil(nr);
    let per_panel = taps * cin * nr;
    let mut out = Vec::with_capacity(panels * per_panel);
    let base = PackPtr(out.as_mut_ptr());
    // Panel by panel, in blocks of `cb` input channels: each of the panel's `nr` weight rows
    // gives `cb · taps` consecutive floats (whole cache lines), transposed through `tmp` into
    // `cb · taps` rows of the panel. Reading one float of each of `nr` rows per step instead
    // (rows `cin · taps` floats apart, often a multiple of 4 KiB: one L1 set) measured
    // 3.5 GB/s on 17.8 MB of weights, repacked on every training step.
    let cb = (64 / taps.max(1)).clamp(1, cin.max(1));
    let pack = |p: usize| {
        let base = &base;
        let mut tmp = vec![0f32; cb * taps * nr];
        for c0 in (0..cin).step_by(cb) {
            let cn = cb.min(cin - c0);
            for j in 0..nr {
                let k = p * nr + j;
                if k < cout {
                    let src = &weight[(k * cin + c0) * taps..][..cn * taps];
                    for (q, v) in src.iter().enumerate() {
                        tmp[q * nr + j] = *v;
                    }
                } else {
                    for q in 0..cn * taps {
                        tmp[q * nr + j] = 0.0;
                    }
                }
            }
            for cc in 0..cn {
                for s in 0..taps {
                    // SAFETY: row (s, c0 + cc) of panel `p` lies in `out`'s capacity; each
                    // panel is written by one call only, every float of it once.
                    unsafe {
                        let dst = base.0.add(p * per_panel + (s * cin + c0 + cc) * nr);
                        std::ptr::copy_nonoverlapping(tmp.as_ptr().add((cc * taps + s) * nr), dst, nr);
                    }
                }
            }
        }
    };
    for_indices(panels, panels * per_panel, &pack);
    // SAFETY: every panel's `taps · cin` rows of `nr` floats were written above.
    unsafe { out.set_len(panels * per_panel) };
    out
}

/// The weights `[cin][cout][4][4]` of a ConvTranspose(k4, s2, p1) packed for its four phases:
/// `[phase (a, b)][panel][tap t][cin][nr]`, tap `t` of phase `(a, b)` being kernel tap
/// `(taps(a)[t / 2], taps(b)[t % 2])` with `taps(0) = [1, 3]`, `taps(1) = [0, 2]`. Each
/// panel's `nr × 16` floats per input channel are read once for all four phases.
pub fn pack_transposed_k4(weight: &[f32], cin: usize, cout: usize, nr: usize) -> Vec<f32> {
    let taps_1d = |a: usize| super::conv::K4S2_PHASE_TAPS[a];
    let panels = cout.div_ceil(nr);
    let per_chunk = 4 * cin * nr;
    let len = 4 * panels * per_chunk;
    let mut out = Vec::with_capacity(len);
    let base = PackPtr(out.as_mut_ptr());
    let pack = |p: usize| {
        let base = &base;
        let mut tmp = vec![0f32; 16 * nr];
        for c in 0..cin {
            for j in 0..nr {
                let o = p * nr + j;
                if o < cout {
                    for (q, v) in weight[(c * cout + o) * 16..][..16].iter().enumerate() {
                        tmp[q * nr + j] = *v;
                    }
                } else {
                    for q in 0..16 {
                        tmp[q * nr + j] = 0.0;
                    }
                }
            }
            for phase in 0..4 {
                let (a, b) = (phase / 2, phase % 2);
                for (t, (ty, tx)) in taps_1d(a).into_iter().flat_map(|ty| taps_1d(b).map(move |tx| (ty, tx))).enumerate() {
                    let q = ty * 4 + tx;
                    // SAFETY: chunk (phase, p) row (t, c) lies in `out`'s capacity; each
                    // panel `p` is written by one call only.
                    unsafe {
                        let dst = base.0.add((phase * panels + p) * per_chunk + (t * cin + c) * nr);
                        std::ptr::copy_nonoverlapping(tmp.as_ptr().add(q * nr), dst, nr);
                    }
                }
            }
        }
    };
    for_indices(panels, len, &pack);
    // SAFETY: all four phases' `4 · cin` rows of every panel were written above.
    unsafe { out.set_len(len) };
    out
}

/// A pointer into a buffer that several packing threads write, each its own part.
pub struct PackPtr(pub *mut f32);
// SAFETY: the callers write disjoint parts of one buffer through it.
unsafe impl Sync for PackPtr {}

/// Threads for packing `floats` floats: up to four when there is enough to pay for starting
/// them (weights packed on every training step), never more than `parts`.
fn pack_threads(floats: usize, parts: usize) -> usize {
    const PER_THREAD: usize = 1 << 19;
    // Asked once: `available_parallelism` reads the cgroup files on every call (about 200
    // opens per training step when asked per pack).
    static CORES: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    let cores = *CORES.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    cores.min(4).min(floats / PER_THREAD).min(parts).max(1)
}

/// Runs `f(i)` for `i` in `0..count` on [`pack_threads`] threads, contiguous ranges each.
pub fn for_indices(count: usize, floats: usize, f: &(dyn Fn(usize) + Sync)) {
    let threads = pack_threads(floats, count);
    if threads == 1 {
        (0..count).for_each(f);
        return;
    }
    let per = count.div_ceil(threads);
    std::thread::scope(|scope| {
        for t in 0..threads {
            scope.spawn(move || (t * per..((t + 1) * per).min(count)).for_each(f));
        }
    });
}

/// The weight-gradient tile: `acc[r][j] = Σ_s Σ_{k<kc} a_s[k·a_step + r] · b_s[k·b_step + j·L ..]`
/// over segments `(a_s, b_s)`: `MR` consecutive channels of one map's pixel broadcast, `NV`
/// vectors of consecutive channels of another map's pixel, each pointer stepping by its own
/// pixel stride. A convolution's weight gradient is one such reduction per kernel tap, over
/// the pixels that meet through that tap.
///
/// # Safety
/// Every address named above must be readable; the instruction set of `S` must be present.
#[inline(always)]
pub unsafe fn outer_tile<S: Simd, const MR: usize, const NV: usize>(
    segments: &[(*const f32, *const f32)],
    kc: usize,
    a_step: usize,
    b_step: usize,
) -> [[S::V; NV]; MR] {
    debug_assert!(MR <= 24 && NV <= 2);
    #[cfg(target_arch = "x86_64")]
    {
        use super::{Isa, asm};
        // SAFETY (all of them): `S::ISA` says the CPU has the instructions; the tile types are
        // the same `[[vector; NV]; MR]` arrays.
        match (S::ISA, MR, NV) {
            (Isa::Avx512, 12, 2) => return std::mem::transmute_copy(&asm::outer_avx512_12x2(segments, kc, a_step, b_step)),
            (Isa::Avx512, 24, 1) => return std::mem::transmute_copy(&asm::outer_avx512_24x1(segments, kc, a_step, b_step)),
            (Isa::Avx2, 6, 2) => return std::mem::transmute_copy(&asm::outer_avx2_6x2(segments, kc, a_step, b_step)),
            (Isa::Avx2, 12, 1) => return std::mem::transmute_copy(&asm::outer_avx2_12x1(segments, kc, a_step, b_step)),
            _ => {}
        }
    }
    let mut acc = [[S::zero(); NV]; MR];
    for &(a, b) in segments {
        let (mut ap, mut bp) = (a, b);
        for _ in 0..kc {
            let b0 = S::load(bp);
            let b1 = if NV > 1 { S::load(bp.add(S::LANES)) } else { b0 };
            for (r, row) in acc.iter_mut().enumerate() {
                let av = S::splat(*ap.add(r));
                row[0] = S::fma(av, b0, row[0]);
                if NV > 1 {
                    row[NV - 1] = S::fma(av, b1, row[NV - 1]);
                }
            }
            ap = ap.add(a_step);
            bp = bp.add(b_step);
        }
    }
    acc
}

#[cfg(test)]
mod tests {
    use super::*;

    fn weights(len: usize) -> Vec<f32> {
        (0..len).map(|i| (i as f32 * 0.37).sin()).collect()
    }

    #[test]
    fn dense_packing_is_the_per_value_packing() {
        // Taps 1, 9, 16; channel blocks with a remainder (cin not a multiple of 64 / taps);
        // a partial last panel; one large enough for two threads.
        for (taps, cin, cout, nr) in [(1, 70, 40, 32), (9, 13, 20, 16), (16, 5, 33, 32), (16, 9, 8, 8), (16, 256, 300, 32)] {
            let w = weights(cout * cin * taps);
            let expected = pack_panels(taps, cin, cout, nr, |s, c, k| w[(k * cin + c) * taps + s]);
            assert_eq!(pack_dense(&w, taps, cin, cout, nr), expected, "taps {taps} cin {cin} cout {cout} nr {nr}");
        }
    }

    #[test]
    fn transposed_packing_is_the_per_value_packing() {
        let taps_1d = |a: usize| crate::engine::conv::K4S2_PHASE_TAPS[a];
        for (cin, cout, nr) in [(7, 40, 32), (3, 5, 16), (300, 70, 32), (1100, 64, 32)] {
            let w = weights(cin * cout * 16);
            let mut expected = Vec::new();
            for a in 0..2 {
                for b in 0..2 {
                    let taps: Vec<(usize, usize)> = taps_1d(a).into_iter().flat_map(|ty| taps_1d(b).map(move |tx| (ty, tx))).collect();
                    expected.extend(pack_panels(4, cin, cout, nr, |t, c, o| w[((c * cout + o) * 4 + taps[t].0) * 4 + taps[t].1]));
                }
            }
            assert_eq!(pack_transposed_k4(&w, cin, cout, nr), expected, "cin {cin} cout {cout} nr {nr}");
        }
    }
}
