//! The vector instructions the inference kernels are written against: one trait, [`Simd`],
//! with an implementation per instruction set (AVX-512, AVX2+FMA, and a portable one that
//! is plain Rust on arrays). Kernels are generic over it and are instantiated once per
//! instruction set inside a `#[target_feature]` entry point (see [`super::Isa`]), so every
//! method here is `#[inline(always)]` and compiles to the single instruction it names.

// Kernel code is unsafe end to end (raw pointers into the arena, instructions the caller
// checked for): spelling `unsafe {}` around every vector operation adds nothing.
#![allow(unsafe_op_in_unsafe_fn)]

/// Lane masks for partial loads and stores on AVX2: `MASKS[8 - n..][..8]` enables `n` lanes.
#[cfg(target_arch = "x86_64")]
static AVX2_MASKS: [i32; 16] = [-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0];

/// One vector width of `f32` lanes and the operations the kernels use.
///
/// # Safety
/// Every method may only be called where the instruction set of the implementation is
/// available (inside the matching `#[target_feature]` function); pointer methods read or
/// write `LANES` floats (or `n` for the partial ones) at the given address.
pub unsafe trait Simd: Copy + Send + Sync + 'static {
    /// Floats per vector.
    const LANES: usize;
    /// Which hand-written tiles of [`super::asm`] apply.
    const ISA: super::Isa;
    type V: Copy;

    unsafe fn zero() -> Self::V;
    unsafe fn splat(x: f32) -> Self::V;
    unsafe fn load(p: *const f32) -> Self::V;
    unsafe fn store(p: *mut f32, v: Self::V);
    /// The first `n` lanes from `p`, zero in the rest (`n < LANES`).
    unsafe fn load_partial(p: *const f32, n: usize) -> Self::V;
    /// Writes the first `n` lanes of `v` to `p` (`n < LANES`).
    unsafe fn store_partial(p: *mut f32, v: Self::V, n: usize);
    /// `a·b + c`.
    unsafe fn fma(a: Self::V, b: Self::V, c: Self::V) -> Self::V;
    unsafe fn add(a: Self::V, b: Self::V) -> Self::V;
    unsafe fn sub(a: Self::V, b: Self::V) -> Self::V;
    unsafe fn mul(a: Self::V, b: Self::V) -> Self::V;
    unsafe fn max(a: Self::V, b: Self::V) -> Self::V;
    unsafe fn min(a: Self::V, b: Self::V) -> Self::V;
    /// Sum of the lanes.
    unsafe fn sum(v: Self::V) -> f32;
    /// `x` in the lanes where `a == b`, `y` elsewhere.
    unsafe fn select_eq(a: Self::V, b: Self::V, x: Self::V, y: Self::V) -> Self::V;
    /// `x` in the lanes where `lo < z < hi`, zero elsewhere.
    unsafe fn select_between(z: Self::V, lo: Self::V, hi: Self::V, x: Self::V) -> Self::V;

    /// `n` lanes from `p` (all when `n >= LANES`), zero in the rest.
    #[inline(always)]
    unsafe fn load_n(p: *const f32, n: usize) -> Self::V {
        if n >= Self::LANES { Self::load(p) } else { Self::load_partial(p, n) }
    }

    /// Writes `n` lanes (all when `n >= LANES`).
    #[inline(always)]
    unsafe fn store_n(p: *mut f32, v: Self::V, n: usize) {
        if n >= Self::LANES { Self::store(p, v) } else { Self::store_partial(p, v, n) }
    }

    /// `a·s + c` with a scalar `s`.
    #[inline(always)]
    unsafe fn fma_s(a: Self::V, s: f32, c: Self::V) -> Self::V {
        Self::fma(a, Self::splat(s), c)
    }
}

/// AVX-512F: 16 lanes.
#[cfg(target_arch = "x86_64")]
#[derive(Debug, Clone, Copy)]
pub struct Avx512;

#[cfg(target_arch = "x86_64")]
unsafe impl Simd for Avx512 {
    const LANES: usize = 16;
    const ISA: super::Isa = super::Isa::Avx512;
    type V = std::arch::x86_64::__m512;

    #[inline(always)]
    unsafe fn zero() -> Self::V {
        unsafe { std::arch::x86_64::_mm512_setzero_ps() }
    }
    #[inline(always)]
    unsafe fn splat(x: f32) -> Self::V {
        unsafe { std::arch::x86_64::_mm512_set1_ps(x) }
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self::V {
        unsafe { std::arch::x86_64::_mm512_loadu_ps(p) }
    }
    #[inline(always)]
    unsafe fn store(p: *mut f32, v: Self::V) {
        unsafe { std::arch::x86_64::_mm512_storeu_ps(p, v) }
    }
    #[inline(always)]
    unsafe fn load_partial(p: *const f32, n: usize) -> Self::V {
        unsafe { std::arch::x86_64::_mm512_maskz_loadu_ps(((1u32 << n) - 1) as u16, p) }
    }
    #[inline(always)]
    unsafe fn store_partial(p: *mut f32, v: Self::V, n: usize) {
        unsafe { std::arch::x86_64::_mm512_mask_storeu_ps(p, ((1u32 << n) - 1) as u16, v) }
    }
    #[inline(always)]
    unsafe fn fma(a: Self::V, b: Self::V, c: Self::V) -> Self::V {
        unsafe { std::arch::x86_64::_mm512_fmadd_ps(a, b, c) }
    }
    #[inline(always)]
    unsafe fn add(a: Self::V, b: Self::V) -> Self::V {
        unsafe { std::arch::x86_64::_mm512_add_ps(a, b) }
    }
    #[inline(always)]
    unsafe fn sub(a: Self::V, b: Self::V) -> Self::V {
        unsafe { std::arch::x86_64::_mm512_sub_ps(a, b) }
    }
    #[inline(always)]
    unsafe fn mul(a: Self::V, b: Self::V) -> Self::V {
        unsafe { std::arch::x86_64::_mm512_mul_ps(a, b) }
    }
    #[inline(always)]
    unsafe fn max(a: Self::V, b: Self::V) -> Self::V {
        unsafe { std::arch::x86_64::_mm512_max_ps(a, b) }
    }
    #[inline(always)]
    unsafe fn min(a: Self::V, b: Self::V) -> Self::V {
        unsafe { std::arch::x86_64::_mm512_min_ps(a, b) }
    }
    #[inline(always)]
    unsafe fn sum(v: Self::V) -> f32 {
        unsafe { std::arch::x86_64::_mm512_reduce_add_ps(v) }
    }
    #[inline(always)]
    unsafe fn select_eq(a: Self::V, b: Self::V, x: Self::V, y: Self::V) -> Self::V {
        use std::arch::x86_64::*;
        unsafe { _mm512_mask_blend_ps(_mm512_cmp_ps_mask::<_CMP_EQ_OQ>(a, b), y, x) }
    }
    #[inline(always)]
    unsafe fn select_between(z: Self::V, lo: Self::V, hi: Self::V, x: Self::V) -> Self::V {
        use std::arch::x86_64::*;
        unsafe {
            let m = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(z, lo) & _mm512_cmp_ps_mask::<_CMP_LT_OQ>(z, hi);
            _mm512_maskz_mov_ps(m, x)
        }
    }
}

/// AVX2 with FMA: 8 lanes.
#[cfg(target_arch = "x86_64")]
#[derive(Debug, Clone, Copy)]
pub struct Avx2;

#[cfg(target_arch = "x86_64")]
impl Avx2 {
    #[inline(always)]
    unsafe fn mask(n: usize) -> std::arch::x86_64::__m256i {
        unsafe { std::arch::x86_64::_mm256_loadu_si256(AVX2_MASKS.as_ptr().add(8 - n) as *const _) }
    }
}

#[cfg(target_arch = "x86_64")]
unsafe impl Simd for Avx2 {
    const LANES: usize = 8;
    const ISA: super::Isa = super::Isa::Avx2;
    type V = std::arch::x86_64::__m256;

    #[inline(always)]
    unsafe fn zero() -> Self::V {
        unsafe { std::arch::x86_64::_mm256_setzero_ps() }
    }
    #[inline(always)]
    unsafe fn splat(x: f32) -> Self::V {
        unsafe { std::arch::x86_64::_mm256_set1_ps(x) }
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self::V {
        unsafe { std::arch::x86_64::_mm256_loadu_ps(p) }
    }
    #[inline(always)]
    unsafe fn store(p: *mut f32, v: Self::V) {
        unsafe { std::arch::x86_64::_mm256_storeu_ps(p, v) }
    }
    #[inline(always)]
    unsafe fn load_partial(p: *const f32, n: usize) -> Self::V {
        unsafe { std::arch::x86_64::_mm256_maskload_ps(p, Self::mask(n)) }
    }
    #[inline(always)]
    unsafe fn store_partial(p: *mut f32, v: Self::V, n: usize) {
        unsafe { std::arch::x86_64::_mm256_maskstore_ps(p, Self::mask(n), v) }
    }
    #[inline(always)]
    unsafe fn fma(a: Self::V, b: Self::V, c: Self::V) -> Self::V {
        unsafe { std::arch::x86_64::_mm256_fmadd_ps(a, b, c) }
    }
    #[inline(always)]
    unsafe fn add(a: Self::V, b: Self::V) -> Self::V {
        unsafe { std::arch::x86_64::_mm256_add_ps(a, b) }
    }
    #[inline(always)]
    unsafe fn sub(a: Self::V, b: Self::V) -> Self::V {
        unsafe { std::arch::x86_64::_mm256_sub_ps(a, b) }
    }
    #[inline(always)]
    unsafe fn mul(a: Self::V, b: Self::V) -> Self::V {
        unsafe { std::arch::x86_64::_mm256_mul_ps(a, b) }
    }
    #[inline(always)]
    unsafe fn max(a: Self::V, b: Self::V) -> Self::V {
        unsafe { std::arch::x86_64::_mm256_max_ps(a, b) }
    }
    #[inline(always)]
    unsafe fn min(a: Self::V, b: Self::V) -> Self::V {
        unsafe { std::arch::x86_64::_mm256_min_ps(a, b) }
    }
    #[inline(always)]
    unsafe fn sum(v: Self::V) -> f32 {
        use std::arch::x86_64::*;
        unsafe {
            let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
            let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
            _mm_cvtss_f32(s)
        }
    }
    #[inline(always)]
    unsafe fn select_eq(a: Self::V, b: Self::V, x: Self::V, y: Self::V) -> Self::V {
        use std::arch::x86_64::*;
        unsafe { _mm256_blendv_ps(y, x, _mm256_cmp_ps::<_CMP_EQ_OQ>(a, b)) }
    }
    #[inline(always)]
    unsafe fn select_between(z: Self::V, lo: Self::V, hi: Self::V, x: Self::V) -> Self::V {
        use std::arch::x86_64::*;
        unsafe { _mm256_and_ps(_mm256_and_ps(_mm256_cmp_ps::<_CMP_GT_OQ>(z, lo), _mm256_cmp_ps::<_CMP_LT_OQ>(z, hi)), x) }
    }
}

/// Plain Rust on 8-float arrays (the compiler vectorizes what the target allows); the
/// reference path on machines without AVX2, and selectable anywhere for tests.
#[derive(Debug, Clone, Copy)]
pub struct Portable;

unsafe impl Simd for Portable {
    const LANES: usize = 8;
    const ISA: super::Isa = super::Isa::Portable;
    type V = [f32; 8];

    #[inline(always)]
    unsafe fn zero() -> Self::V {
        [0.0; 8]
    }
    #[inline(always)]
    unsafe fn splat(x: f32) -> Self::V {
        [x; 8]
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self::V {
        unsafe { std::ptr::read_unaligned(p as *const [f32; 8]) }
    }
    #[inline(always)]
    unsafe fn store(p: *mut f32, v: Self::V) {
        unsafe { std::ptr::write_unaligned(p as *mut [f32; 8], v) }
    }
    #[inline(always)]
    unsafe fn load_partial(p: *const f32, n: usize) -> Self::V {
        let mut v = [0.0; 8];
        for (i, lane) in v.iter_mut().enumerate().take(n) {
            *lane = unsafe { *p.add(i) };
        }
        v
    }
    #[inline(always)]
    unsafe fn store_partial(p: *mut f32, v: Self::V, n: usize) {
        for (i, lane) in v.iter().enumerate().take(n) {
            unsafe { *p.add(i) = *lane };
        }
    }
    #[inline(always)]
    unsafe fn fma(a: Self::V, b: Self::V, c: Self::V) -> Self::V {
        std::array::from_fn(|i| a[i] * b[i] + c[i])
    }
    #[inline(always)]
    unsafe fn add(a: Self::V, b: Self::V) -> Self::V {
        std::array::from_fn(|i| a[i] + b[i])
    }
    #[inline(always)]
    unsafe fn sub(a: Self::V, b: Self::V) -> Self::V {
        std::array::from_fn(|i| a[i] - b[i])
    }
    #[inline(always)]
    unsafe fn mul(a: Self::V, b: Self::V) -> Self::V {
        std::array::from_fn(|i| a[i] * b[i])
    }
    #[inline(always)]
    unsafe fn max(a: Self::V, b: Self::V) -> Self::V {
        std::array::from_fn(|i| a[i].max(b[i]))
    }
    #[inline(always)]
    unsafe fn min(a: Self::V, b: Self::V) -> Self::V {
        std::array::from_fn(|i| a[i].min(b[i]))
    }
    #[inline(always)]
    unsafe fn sum(v: Self::V) -> f32 {
        v.iter().sum()
    }
    #[inline(always)]
    unsafe fn select_eq(a: Self::V, b: Self::V, x: Self::V, y: Self::V) -> Self::V {
        std::array::from_fn(|i| if a[i] == b[i] { x[i] } else { y[i] })
    }
    #[inline(always)]
    unsafe fn select_between(z: Self::V, lo: Self::V, hi: Self::V, x: Self::V) -> Self::V {
        std::array::from_fn(|i| if lo[i] < z[i] && z[i] < hi[i] { x[i] } else { 0.0 })
    }
}
