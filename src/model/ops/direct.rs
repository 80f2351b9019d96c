//! Direct 3×3, stride-1, padding-1 convolution kernels for layers with few channels (the
//! full-resolution levels of a UNet), where im2col + GEMM spends its time moving memory: each
//! output row accumulates 9·C_in shifted input rows in L1-resident buffers, vectorized with
//! AVX2/FMA when the CPU has them (checked at run time).

use rayon::prelude::*;

/// Use the direct kernels when the output has at most this many channels…
pub const MAX_DIRECT_OUT_CHANNELS: usize = 16;
/// …and the input at most this many (a UNet merge concatenates two such maps).
pub const MAX_DIRECT_IN_CHANNELS: usize = 32;

/// Shape of a 3×3 same-padding convolution.
#[derive(Debug, Clone, Copy)]
pub struct Shape3x3 {
    pub n: usize,
    pub cin: usize,
    pub cout: usize,
    pub h: usize,
    pub w: usize,
}

/// `a·b + c`, fused when the caller is compiled with FMA (a software `fmaf` call otherwise,
/// hence the flag).
#[inline(always)]
fn madd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA { a.mul_add(b, c) } else { a * b + c }
}

/// `lanes += a[x] · b[x + dx]` over the valid range, for dx ∈ {−1, 0, 1}, kept in 8 partial
/// sums (reduced once at the end) so the loop vectorizes.
#[inline(always)]
fn shifted_dot_into<const FMA: bool>(lanes: &mut [f32; 8], a: &[f32], b: &[f32], dx: isize) {
    let w = a.len();
    let (a, b) = match dx {
        -1 => (&a[1..], &b[..w - 1]),
        0 => (a, b),
        _ => (&a[..w - 1], &b[1..]),
    };
    let mut chunks_a = a.chunks_exact(8);
    let mut chunks_b = b.chunks_exact(8);
    for (ca, cb) in (&mut chunks_a).zip(&mut chunks_b) {
        for l in 0..8 {
            lanes[l] = madd::<FMA>(ca[l], cb[l], lanes[l]);
        }
    }
    for (l, (x, y)) in chunks_a.remainder().iter().zip(chunks_b.remainder()).enumerate() {
        lanes[l] = madd::<FMA>(*x, *y, lanes[l]);
    }
}

/// `acc[x] += k · row[x + dx]` over the valid range, for dx ∈ {−1, 0, 1}.
#[inline(always)]
fn shifted_axpy<const FMA: bool>(acc: &mut [f32], row: &[f32], k: f32, dx: isize) {
    let w = acc.len();
    let (acc, row) = match dx {
        -1 => (&mut acc[1..], &row[..w - 1]),
        0 => (acc, row),
        _ => (&mut acc[..w - 1], &row[1..]),
    };
    for (a, r) in acc.iter_mut().zip(row) {
        *a = madd::<FMA>(*r, k, *a);
    }
}

/// One output plane `(n, co)` of the forward convolution.
#[inline(always)]
fn forward_plane<const FMA: bool>(x: &[f32], weight: &[f32], s: Shape3x3, index: usize, dst: &mut [f32]) {
    let plane = s.h * s.w;
    let (n, co) = (index / s.cout, index % s.cout);
    dst.fill(0.0);
    for ci in 0..s.cin {
        let src = &x[(n * s.cin + ci) * plane..][..plane];
        let k = &weight[(co * s.cin + ci) * 9..][..9];
        for y in 0..s.h {
            let acc = &mut dst[y * s.w..][..s.w];
            for ky in 0..3 {
                let iy = y as isize + ky as isize - 1;
                if iy < 0 || iy >= s.h as isize {
                    continue;
                }
                let row = &src[iy as usize * s.w..][..s.w];
                for kx in 0..3 {
                    shifted_axpy::<FMA>(acc, row, k[ky * 3 + kx], kx as isize - 1);
                }
            }
        }
    }
}

/// One `(co, ci)` 3×3 block of the weight gradient.
#[inline(always)]
fn grad_weight_block<const FMA: bool>(x: &[f32], dy: &[f32], s: Shape3x3, index: usize, dst: &mut [f32]) {
    let plane = s.h * s.w;
    let (co, ci) = (index / s.cin, index % s.cin);
    let mut lanes = [[0f32; 8]; 9];
    for n in 0..s.n {
        let g = &dy[(n * s.cout + co) * plane..][..plane];
        let src = &x[(n * s.cin + ci) * plane..][..plane];
        for y in 0..s.h {
            let grow = &g[y * s.w..][..s.w];
            for ky in 0..3 {
                let iy = y as isize + ky as isize - 1;
                if iy < 0 || iy >= s.h as isize {
                    continue;
                }
                let row = &src[iy as usize * s.w..][..s.w];
                for kx in 0..3 {
                    shifted_dot_into::<FMA>(&mut lanes[ky * 3 + kx], grow, row, kx as isize - 1);
                }
            }
        }
    }
    for (d, l) in dst.iter_mut().zip(&lanes) {
        *d = l.iter().sum();
    }
}

// The per-task kernels carry the target features themselves: closures handed to rayon do not
// inherit them from an enclosing function.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn forward_plane_avx2(x: &[f32], weight: &[f32], s: Shape3x3, index: usize, dst: &mut [f32]) {
    forward_plane::<true>(x, weight, s, index, dst)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn grad_weight_block_avx2(x: &[f32], dy: &[f32], s: Shape3x3, index: usize, dst: &mut [f32]) {
    grad_weight_block::<true>(x, dy, s, index, dst)
}

/// Whether the AVX2/FMA build of these kernels runs: the plan's dispatch rule
/// ([`crate::engine::Isa::active`], so `SEGCTL_KERNELS=portable` selects the portable loops here too).
fn has_avx2_fma() -> bool {
    matches!(crate::engine::Isa::active(), Ok(crate::engine::Isa::Avx512 | crate::engine::Isa::Avx2))
}

/// `y [N, Cout, H, W] = conv3x3(x [N, Cin, H, W], w [Cout, Cin, 3, 3])`, padding 1.
pub fn forward(x: &[f32], weight: &[f32], s: Shape3x3) -> Vec<f32> {
    let mut out = vec![0f32; s.n * s.cout * s.h * s.w];
    let fast = has_avx2_fma();
    out.par_chunks_mut(s.h * s.w).enumerate().for_each(|(index, dst)| {
        #[cfg(target_arch = "x86_64")]
        if fast {
            // SAFETY: the CPU has AVX2 and FMA (checked above).
            return unsafe { forward_plane_avx2(x, weight, s, index, dst) };
        }
        let _ = fast;
        forward_plane::<false>(x, weight, s, index, dst)
    });
    out
}

/// `dw [Cout, Cin, 3, 3] = Σ_n dy_n ⋆ x_n` for the convolution above.
pub fn grad_weight(x: &[f32], dy: &[f32], s: Shape3x3) -> Vec<f32> {
    let mut out = vec![0f32; s.cout * s.cin * 9];
    let fast = has_avx2_fma();
    out.par_chunks_mut(9).enumerate().for_each(|(index, dst)| {
        #[cfg(target_arch = "x86_64")]
        if fast {
            // SAFETY: as in `forward`.
            return unsafe { grad_weight_block_avx2(x, dy, s, index, dst) };
        }
        let _ = fast;
        grad_weight_block::<false>(x, dy, s, index, dst)
    });
    out
}
