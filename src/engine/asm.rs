//! Hand-scheduled register tiles for [`super::gemm::tile`], as inline assembly: the
//! compiler's own schedule of the generic tile hoists every broadcast ahead of the
//! multiply-adds and spills accumulators (measured at a third of the FMA peak on AVX-512).
//! Each loop step loads the `NV` weight vectors once, then per row broadcasts one input value
//! and issues `NV` multiply-adds; rows are addressed as `base + {0, 1, 2}·lda` from one base
//! register per three rows. The `outer_*` tiles are [`super::gemm::outer_tile`]'s (weight
//! gradients): rows broadcast from consecutive floats, both operands stepping by a pixel.
//!
//! Written by `scripts/dev/gen_asm_kernels.py` (edit the script, not this file).

#![allow(unsafe_op_in_unsafe_fn, clippy::too_many_arguments)]

use std::arch::asm;
use std::arch::x86_64::*;

/// `12×2` tile of 16-float vectors (AVX-512F).
///
/// # Safety
/// As [`super::gemm::tile`]; the CPU must have AVX-512F.
#[target_feature(enable = "avx512f")]
pub unsafe fn tile_avx512_12x2(a: *const f32, lda: usize, offsets: &[isize], kc: usize, b: *const f32) -> [[__m512; 2]; 12] {
    let mut acc = [[_mm512_setzero_ps(); 2]; 12];
    if kc == 0 {
        return acc;
    }
    let mut bp = b;
    for &offset in offsets {
        let a0 = a.offset(offset);
        let rows: [*const f32; 4] = std::array::from_fn(|i| a0.add(3 * i * lda));
        // SAFETY: the caller guarantees every row and panel address is readable.
        asm!(
                "2:",
                "vmovups {b0}, [{bp} + 0]",
                "vmovups {b1}, [{bp} + 64]",
                "prefetcht0 [{bp} + 4096]",
                "prefetcht0 [{bp} + 4160]",
                "vbroadcastss {t0}, dword ptr [{r0}]",
                "vfmadd231ps {c0_0}, {b0}, {t0}",
                "vfmadd231ps {c0_1}, {b1}, {t0}",
                "vbroadcastss {t1}, dword ptr [{r0} + {l}]",
                "vfmadd231ps {c1_0}, {b0}, {t1}",
                "vfmadd231ps {c1_1}, {b1}, {t1}",
                "vbroadcastss {t0}, dword ptr [{r0} + {l}*2]",
                "vfmadd231ps {c2_0}, {b0}, {t0}",
                "vfmadd231ps {c2_1}, {b1}, {t0}",
                "vbroadcastss {t1}, dword ptr [{r1}]",
                "vfmadd231ps {c3_0}, {b0}, {t1}",
                "vfmadd231ps {c3_1}, {b1}, {t1}",
                "vbroadcastss {t0}, dword ptr [{r1} + {l}]",
                "vfmadd231ps {c4_0}, {b0}, {t0}",
                "vfmadd231ps {c4_1}, {b1}, {t0}",
                "vbroadcastss {t1}, dword ptr [{r1} + {l}*2]",
                "vfmadd231ps {c5_0}, {b0}, {t1}",
                "vfmadd231ps {c5_1}, {b1}, {t1}",
                "vbroadcastss {t0}, dword ptr [{r2}]",
                "vfmadd231ps {c6_0}, {b0}, {t0}",
                "vfmadd231ps {c6_1}, {b1}, {t0}",
                "vbroadcastss {t1}, dword ptr [{r2} + {l}]",
                "vfmadd231ps {c7_0}, {b0}, {t1}",
                "vfmadd231ps {c7_1}, {b1}, {t1}",
                "vbroadcastss {t0}, dword ptr [{r2} + {l}*2]",
                "vfmadd231ps {c8_0}, {b0}, {t0}",
                "vfmadd231ps {c8_1}, {b1}, {t0}",
                "vbroadcastss {t1}, dword ptr [{r3}]",
                "vfmadd231ps {c9_0}, {b0}, {t1}",
                "vfmadd231ps {c9_1}, {b1}, {t1}",
                "vbroadcastss {t0}, dword ptr [{r3} + {l}]",
                "vfmadd231ps {c10_0}, {b0}, {t0}",
                "vfmadd231ps {c10_1}, {b1}, {t0}",
                "vbroadcastss {t1}, dword ptr [{r3} + {l}*2]",
                "vfmadd231ps {c11_0}, {b0}, {t1}",
                "vfmadd231ps {c11_1}, {b1}, {t1}",
                "add {r0}, 4",
                "add {r1}, 4",
                "add {r2}, 4",
                "add {r3}, 4",
                "add {bp}, 128",
                "dec {k}",
                "jnz 2b",
                r0 = inout(reg) rows[0] => _,
                r1 = inout(reg) rows[1] => _,
                r2 = inout(reg) rows[2] => _,
                r3 = inout(reg) rows[3] => _,
                l = in(reg) lda * 4,
                bp = inout(reg) bp,
                k = inout(reg) kc => _,
                b0 = out(zmm_reg) _,
                b1 = out(zmm_reg) _,
                t0 = out(zmm_reg) _,
                t1 = out(zmm_reg) _,
                c0_0 = inout(zmm_reg) acc[0][0],
                c0_1 = inout(zmm_reg) acc[0][1],
                c1_0 = inout(zmm_reg) acc[1][0],
                c1_1 = inout(zmm_reg) acc[1][1],
                c2_0 = inout(zmm_reg) acc[2][0],
                c2_1 = inout(zmm_reg) acc[2][1],
                c3_0 = inout(zmm_reg) acc[3][0],
                c3_1 = inout(zmm_reg) acc[3][1],
                c4_0 = inout(zmm_reg) acc[4][0],
                c4_1 = inout(zmm_reg) acc[4][1],
                c5_0 = inout(zmm_reg) acc[5][0],
                c5_1 = inout(zmm_reg) acc[5][1],
                c6_0 = inout(zmm_reg) acc[6][0],
                c6_1 = inout(zmm_reg) acc[6][1],
                c7_0 = inout(zmm_reg) acc[7][0],
                c7_1 = inout(zmm_reg) acc[7][1],
                c8_0 = inout(zmm_reg) acc[8][0],
                c8_1 = inout(zmm_reg) acc[8][1],
                c9_0 = inout(zmm_reg) acc[9][0],
                c9_1 = inout(zmm_reg) acc[9][1],
                c10_0 = inout(zmm_reg) acc[10][0],
                c10_1 = inout(zmm_reg) acc[10][1],
                c11_0 = inout(zmm_reg) acc[11][0],
                c11_1 = inout(zmm_reg) acc[11][1],
                options(nostack, readonly)
        );
    }
    acc
}

/// `24×1` tile of 16-float vectors (AVX-512F).
///
/// # Safety
/// As [`super::gemm::tile`]; the CPU must have AVX-512F.
#[target_feature(enable = "avx512f")]
pub unsafe fn tile_avx512_24x1(a: *const f32, lda: usize, offsets: &[isize], kc: usize, b: *const f32) -> [[__m512; 1]; 24] {
    let mut acc = [[_mm512_setzero_ps(); 1]; 24];
    if kc == 0 {
        return acc;
    }
    let mut bp = b;
    for &offset in offsets {
        let a0 = a.offset(offset);
        let rows: [*const f32; 8] = std::array::from_fn(|i| a0.add(3 * i * lda));
        // SAFETY: the caller guarantees every row and panel address is readable.
        asm!(
                "2:",
                "vmovups {b0}, [{bp} + 0]",
                "prefetcht0 [{bp} + 4096]",
                "vfmadd231ps {c0_0}, {b0}, dword ptr [{r0}]{{1to16}}",
                "vfmadd231ps {c1_0}, {b0}, dword ptr [{r0} + {l}]{{1to16}}",
                "vfmadd231ps {c2_0}, {b0}, dword ptr [{r0} + {l}*2]{{1to16}}",
                "vfmadd231ps {c3_0}, {b0}, dword ptr [{r1}]{{1to16}}",
                "vfmadd231ps {c4_0}, {b0}, dword ptr [{r1} + {l}]{{1to16}}",
                "vfmadd231ps {c5_0}, {b0}, dword ptr [{r1} + {l}*2]{{1to16}}",
                "vfmadd231ps {c6_0}, {b0}, dword ptr [{r2}]{{1to16}}",
                "vfmadd231ps {c7_0}, {b0}, dword ptr [{r2} + {l}]{{1to16}}",
                "vfmadd231ps {c8_0}, {b0}, dword ptr [{r2} + {l}*2]{{1to16}}",
                "vfmadd231ps {c9_0}, {b0}, dword ptr [{r3}]{{1to16}}",
                "vfmadd231ps {c10_0}, {b0}, dword ptr [{r3} + {l}]{{1to16}}",
                "vfmadd231ps {c11_0}, {b0}, dword ptr [{r3} + {l}*2]{{1to16}}",
                "vfmadd231ps {c12_0}, {b0}, dword ptr [{r4}]{{1to16}}",
                "vfmadd231ps {c13_0}, {b0}, dword ptr [{r4} + {l}]{{1to16}}",
                "vfmadd231ps {c14_0}, {b0}, dword ptr [{r4} + {l}*2]{{1to16}}",
                "vfmadd231ps {c15_0}, {b0}, dword ptr [{r5}]{{1to16}}",
                "vfmadd231ps {c16_0}, {b0}, dword ptr [{r5} + {l}]{{1to16}}",
                "vfmadd231ps {c17_0}, {b0}, dword ptr [{r5} + {l}*2]{{1to16}}",
                "vfmadd231ps {c18_0}, {b0}, dword ptr [{r6}]{{1to16}}",
                "vfmadd231ps {c19_0}, {b0}, dword ptr [{r6} + {l}]{{1to16}}",
                "vfmadd231ps {c20_0}, {b0}, dword ptr [{r6} + {l}*2]{{1to16}}",
                "vfmadd231ps {c21_0}, {b0}, dword ptr [{r7}]{{1to16}}",
                "vfmadd231ps {c22_0}, {b0}, dword ptr [{r7} + {l}]{{1to16}}",
                "vfmadd231ps {c23_0}, {b0}, dword ptr [{r7} + {l}*2]{{1to16}}",
                "add {r0}, 4",
                "add {r1}, 4",
                "add {r2}, 4",
                "add {r3}, 4",
                "add {r4}, 4",
                "add {r5}, 4",
                "add {r6}, 4",
                "add {r7}, 4",
                "add {bp}, 64",
                "dec {k}",
                "jnz 2b",
                r0 = inout(reg) rows[0] => _,
                r1 = inout(reg) rows[1] => _,
                r2 = inout(reg) rows[2] => _,
                r3 = inout(reg) rows[3] => _,
                r4 = inout(reg) rows[4] => _,
                r5 = inout(reg) rows[5] => _,
                r6 = inout(reg) rows[6] => _,
                r7 = inout(reg) rows[7] => _,
                l = in(reg) lda * 4,
                bp = inout(reg) bp,
                k = inout(reg) kc => _,
                b0 = out(zmm_reg) _,
                c0_0 = inout(zmm_reg) acc[0][0],
                c1_0 = inout(zmm_reg) acc[1][0],
                c2_0 = inout(zmm_reg) acc[2][0],
                c3_0 = inout(zmm_reg) acc[3][0],
                c4_0 = inout(zmm_reg) acc[4][0],
                c5_0 = inout(zmm_reg) acc[5][0],
                c6_0 = inout(zmm_reg) acc[6][0],
                c7_0 = inout(zmm_reg) acc[7][0],
                c8_0 = inout(zmm_reg) acc[8][0],
                c9_0 = inout(zmm_reg) acc[9][0],
                c10_0 = inout(zmm_reg) acc[10][0],
                c11_0 = inout(zmm_reg) acc[11][0],
                c12_0 = inout(zmm_reg) acc[12][0],
                c13_0 = inout(zmm_reg) acc[13][0],
                c14_0 = inout(zmm_reg) acc[14][0],
                c15_0 = inout(zmm_reg) acc[15][0],
                c16_0 = inout(zmm_reg) acc[16][0],
                c17_0 = inout(zmm_reg) acc[17][0],
                c18_0 = inout(zmm_reg) acc[18][0],
                c19_0 = inout(zmm_reg) acc[19][0],
                c20_0 = inout(zmm_reg) acc[20][0],
                c21_0 = inout(zmm_reg) acc[21][0],
                c22_0 = inout(zmm_reg) acc[22][0],
                c23_0 = inout(zmm_reg) acc[23][0],
                options(nostack, readonly)
        );
    }
    acc
}

/// `8×2` tile of 16-float vectors (AVX-512F).
///
/// # Safety
/// As [`super::gemm::tile`]; the CPU must have AVX-512F.
#[target_feature(enable = "avx512f")]
pub unsafe fn tile_avx512_8x2(a: *const f32, lda: usize, offsets: &[isize], kc: usize, b: *const f32) -> [[__m512; 2]; 8] {
    let mut acc = [[_mm512_setzero_ps(); 2]; 8];
    if kc == 0 {
        return acc;
    }
    let mut bp = b;
    for &offset in offsets {
        let a0 = a.offset(offset);
        let rows: [*const f32; 3] = std::array::from_fn(|i| a0.add(3 * i * lda));
        // SAFETY: the caller guarantees every row and panel address is readable.
        asm!(
                "2:",
                "vmovups {b0}, [{bp} + 0]",
                "vmovups {b1}, [{bp} + 64]",
                "prefetcht0 [{bp} + 4096]",
                "prefetcht0 [{bp} + 4160]",
                "vbroadcastss {t0}, dword ptr [{r0}]",
                "vfmadd231ps {c0_0}, {b0}, {t0}",
                "vfmadd231ps {c0_1}, {b1}, {t0}",
                "vbroadcastss {t1}, dword ptr [{r0} + {l}]",
                "vfmadd231ps {c1_0}, {b0}, {t1}",
                "vfmadd231ps {c1_1}, {b1}, {t1}",
                "vbroadcastss {t0}, dword ptr [{r0} + {l}*2]",
                "vfmadd231ps {c2_0}, {b0}, {t0}",
                "vfmadd231ps {c2_1}, {b1}, {t0}",
                "vbroadcastss {t1}, dword ptr [{r1}]",
                "vfmadd231ps {c3_0}, {b0}, {t1}",
                "vfmadd231ps {c3_1}, {b1}, {t1}",
                "vbroadcastss {t0}, dword ptr [{r1} + {l}]",
                "vfmadd231ps {c4_0}, {b0}, {t0}",
                "vfmadd231ps {c4_1}, {b1}, {t0}",
                "vbroadcastss {t1}, dword ptr [{r1} + {l}*2]",
                "vfmadd231ps {c5_0}, {b0}, {t1}",
                "vfmadd231ps {c5_1}, {b1}, {t1}",
                "vbroadcastss {t0}, dword ptr [{r2}]",
                "vfmadd231ps {c6_0}, {b0}, {t0}",
                "vfmadd231ps {c6_1}, {b1}, {t0}",
                "vbroadcastss {t1}, dword ptr [{r2} + {l}]",
                "vfmadd231ps {c7_0}, {b0}, {t1}",
                "vfmadd231ps {c7_1}, {b1}, {t1}",
                "add {r0}, 4",
                "add {r1}, 4",
                "add {r2}, 4",
                "add {bp}, 128",
                "dec {k}",
                "jnz 2b",
                r0 = inout(reg) rows[0] => _,
                r1 = inout(reg) rows[1] => _,
                r2 = inout(reg) rows[2] => _,
                l = in(reg) lda * 4,
                bp = inout(reg) bp,
                k = inout(reg) kc => _,
                b0 = out(zmm_reg) _,
                b1 = out(zmm_reg) _,
                t0 = out(zmm_reg) _,
                t1 = out(zmm_reg) _,
                c0_0 = inout(zmm_reg) acc[0][0],
                c0_1 = inout(zmm_reg) acc[0][1],
                c1_0 = inout(zmm_reg) acc[1][0],
                c1_1 = inout(zmm_reg) acc[1][1],
                c2_0 = inout(zmm_reg) acc[2][0],
                c2_1 = inout(zmm_reg) acc[2][1],
                c3_0 = inout(zmm_reg) acc[3][0],
                c3_1 = inout(zmm_reg) acc[3][1],
                c4_0 = inout(zmm_reg) acc[4][0],
                c4_1 = inout(zmm_reg) acc[4][1],
                c5_0 = inout(zmm_reg) acc[5][0],
                c5_1 = inout(zmm_reg) acc[5][1],
                c6_0 = inout(zmm_reg) acc[6][0],
                c6_1 = inout(zmm_reg) acc[6][1],
                c7_0 = inout(zmm_reg) acc[7][0],
                c7_1 = inout(zmm_reg) acc[7][1],
                options(nostack, readonly)
        );
    }
    acc
}

/// `6×2` tile of 8-float vectors (AVX2 and FMA).
///
/// # Safety
/// As [`super::gemm::tile`]; the CPU must have AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn tile_avx2_6x2(a: *const f32, lda: usize, offsets: &[isize], kc: usize, b: *const f32) -> [[__m256; 2]; 6] {
    let mut acc = [[_mm256_setzero_ps(); 2]; 6];
    if kc == 0 {
        return acc;
    }
    let mut bp = b;
    for &offset in offsets {
        let a0 = a.offset(offset);
        let rows: [*const f32; 2] = std::array::from_fn(|i| a0.add(3 * i * lda));
        // SAFETY: the caller guarantees every row and panel address is readable.
        asm!(
                "2:",
                "vmovups {b0}, [{bp} + 0]",
                "vmovups {b1}, [{bp} + 32]",
                "prefetcht0 [{bp} + 4096]",
                "vbroadcastss {t0}, dword ptr [{r0}]",
                "vfmadd231ps {c0_0}, {b0}, {t0}",
                "vfmadd231ps {c0_1}, {b1}, {t0}",
                "vbroadcastss {t1}, dword ptr [{r0} + {l}]",
                "vfmadd231ps {c1_0}, {b0}, {t1}",
                "vfmadd231ps {c1_1}, {b1}, {t1}",
                "vbroadcastss {t0}, dword ptr [{r0} + {l}*2]",
                "vfmadd231ps {c2_0}, {b0}, {t0}",
                "vfmadd231ps {c2_1}, {b1}, {t0}",
                "vbroadcastss {t1}, dword ptr [{r1}]",
                "vfmadd231ps {c3_0}, {b0}, {t1}",
                "vfmadd231ps {c3_1}, {b1}, {t1}",
                "vbroadcastss {t0}, dword ptr [{r1} + {l}]",
                "vfmadd231ps {c4_0}, {b0}, {t0}",
                "vfmadd231ps {c4_1}, {b1}, {t0}",
                "vbroadcastss {t1}, dword ptr [{r1} + {l}*2]",
                "vfmadd231ps {c5_0}, {b0}, {t1}",
                "vfmadd231ps {c5_1}, {b1}, {t1}",
                "add {r0}, 4",
                "add {r1}, 4",
                "add {bp}, 64",
                "dec {k}",
                "jnz 2b",
                r0 = inout(reg) rows[0] => _,
                r1 = inout(reg) rows[1] => _,
                l = in(reg) lda * 4,
                bp = inout(reg) bp,
                k = inout(reg) kc => _,
                b0 = out(ymm_reg) _,
                b1 = out(ymm_reg) _,
                t0 = out(ymm_reg) _,
                t1 = out(ymm_reg) _,
                c0_0 = inout(ymm_reg) acc[0][0],
                c0_1 = inout(ymm_reg) acc[0][1],
                c1_0 = inout(ymm_reg) acc[1][0],
                c1_1 = inout(ymm_reg) acc[1][1],
                c2_0 = inout(ymm_reg) acc[2][0],
                c2_1 = inout(ymm_reg) acc[2][1],
                c3_0 = inout(ymm_reg) acc[3][0],
                c3_1 = inout(ymm_reg) acc[3][1],
                c4_0 = inout(ymm_reg) acc[4][0],
                c4_1 = inout(ymm_reg) acc[4][1],
                c5_0 = inout(ymm_reg) acc[5][0],
                c5_1 = inout(ymm_reg) acc[5][1],
                options(nostack, readonly)
        );
    }
    acc
}

/// `12×1` tile of 8-float vectors (AVX2 and FMA).
///
/// # Safety
/// As [`super::gemm::tile`]; the CPU must have AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn tile_avx2_12x1(a: *const f32, lda: usize, offsets: &[isize], kc: usize, b: *const f32) -> [[__m256; 1]; 12] {
    let mut acc = [[_mm256_setzero_ps(); 1]; 12];
    if kc == 0 {
        return acc;
    }
    let mut bp = b;
    for &offset in offsets {
        let a0 = a.offset(offset);
        let rows: [*const f32; 4] = std::array::from_fn(|i| a0.add(3 * i * lda));
        // SAFETY: the caller guarantees every row and panel address is readable.
        asm!(
                "2:",
                "vmovups {b0}, [{bp} + 0]",
                "prefetcht0 [{bp} + 4096]",
                "vbroadcastss {t0}, dword ptr [{r0}]",
                "vfmadd231ps {c0_0}, {b0}, {t0}",
                "vbroadcastss {t1}, dword ptr [{r0} + {l}]",
                "vfmadd231ps {c1_0}, {b0}, {t1}",
                "vbroadcastss {t0}, dword ptr [{r0} + {l}*2]",
                "vfmadd231ps {c2_0}, {b0}, {t0}",
                "vbroadcastss {t1}, dword ptr [{r1}]",
                "vfmadd231ps {c3_0}, {b0}, {t1}",
                "vbroadcastss {t0}, dword ptr [{r1} + {l}]",
                "vfmadd231ps {c4_0}, {b0}, {t0}",
                "vbroadcastss {t1}, dword ptr [{r1} + {l}*2]",
                "vfmadd231ps {c5_0}, {b0}, {t1}",
                "vbroadcastss {t0}, dword ptr [{r2}]",
                "vfmadd231ps {c6_0}, {b0}, {t0}",
                "vbroadcastss {t1}, dword ptr [{r2} + {l}]",
                "vfmadd231ps {c7_0}, {b0}, {t1}",
                "vbroadcastss {t0}, dword ptr [{r2} + {l}*2]",
                "vfmadd231ps {c8_0}, {b0}, {t0}",
                "vbroadcastss {t1}, dword ptr [{r3}]",
                "vfmadd231ps {c9_0}, {b0}, {t1}",
                "vbroadcastss {t0}, dword ptr [{r3} + {l}]",
                "vfmadd231ps {c10_0}, {b0}, {t0}",
                "vbroadcastss {t1}, dword ptr [{r3} + {l}*2]",
                "vfmadd231ps {c11_0}, {b0}, {t1}",
                "add {r0}, 4",
                "add {r1}, 4",
                "add {r2}, 4",
                "add {r3}, 4",
                "add {bp}, 32",
                "dec {k}",
                "jnz 2b",
                r0 = inout(reg) rows[0] => _,
                r1 = inout(reg) rows[1] => _,
                r2 = inout(reg) rows[2] => _,
                r3 = inout(reg) rows[3] => _,
                l = in(reg) lda * 4,
                bp = inout(reg) bp,
                k = inout(reg) kc => _,
                b0 = out(ymm_reg) _,
                t0 = out(ymm_reg) _,
                t1 = out(ymm_reg) _,
                c0_0 = inout(ymm_reg) acc[0][0],
                c1_0 = inout(ymm_reg) acc[1][0],
                c2_0 = inout(ymm_reg) acc[2][0],
                c3_0 = inout(ymm_reg) acc[3][0],
                c4_0 = inout(ymm_reg) acc[4][0],
                c5_0 = inout(ymm_reg) acc[5][0],
                c6_0 = inout(ymm_reg) acc[6][0],
                c7_0 = inout(ymm_reg) acc[7][0],
                c8_0 = inout(ymm_reg) acc[8][0],
                c9_0 = inout(ymm_reg) acc[9][0],
                c10_0 = inout(ymm_reg) acc[10][0],
                c11_0 = inout(ymm_reg) acc[11][0],
                options(nostack, readonly)
        );
    }
    acc
}

/// `12×2` weight-gradient tile of 16-float vectors (AVX-512F).
///
/// # Safety
/// As [`super::gemm::outer_tile`]; the CPU must have AVX-512F.
#[target_feature(enable = "avx512f")]
pub unsafe fn outer_avx512_12x2(segments: &[(*const f32, *const f32)], kc: usize, a_step: usize, b_step: usize) -> [[__m512; 2]; 12] {
    let mut acc = [[_mm512_setzero_ps(); 2]; 12];
    if kc == 0 || segments.is_empty() {
        return acc;
    }
    // SAFETY: the caller guarantees every address the segments step through is readable.
    asm!(
            "3:",
                "mov {ap}, [{sp}]",
                "mov {bp}, [{sp} + 8]",
                "mov {k}, {kc}",
                "2:",
                "vmovups {b0}, [{bp} + 0]",
                "vmovups {b1}, [{bp} + 64]",
                "vbroadcastss {t0}, dword ptr [{ap} + 0]",
                "vfmadd231ps {c0_0}, {b0}, {t0}",
                "vfmadd231ps {c0_1}, {b1}, {t0}",
                "vbroadcastss {t1}, dword ptr [{ap} + 4]",
                "vfmadd231ps {c1_0}, {b0}, {t1}",
                "vfmadd231ps {c1_1}, {b1}, {t1}",
                "vbroadcastss {t0}, dword ptr [{ap} + 8]",
                "vfmadd231ps {c2_0}, {b0}, {t0}",
                "vfmadd231ps {c2_1}, {b1}, {t0}",
                "vbroadcastss {t1}, dword ptr [{ap} + 12]",
                "vfmadd231ps {c3_0}, {b0}, {t1}",
                "vfmadd231ps {c3_1}, {b1}, {t1}",
                "vbroadcastss {t0}, dword ptr [{ap} + 16]",
                "vfmadd231ps {c4_0}, {b0}, {t0}",
                "vfmadd231ps {c4_1}, {b1}, {t0}",
                "vbroadcastss {t1}, dword ptr [{ap} + 20]",
                "vfmadd231ps {c5_0}, {b0}, {t1}",
                "vfmadd231ps {c5_1}, {b1}, {t1}",
                "vbroadcastss {t0}, dword ptr [{ap} + 24]",
                "vfmadd231ps {c6_0}, {b0}, {t0}",
                "vfmadd231ps {c6_1}, {b1}, {t0}",
                "vbroadcastss {t1}, dword ptr [{ap} + 28]",
                "vfmadd231ps {c7_0}, {b0}, {t1}",
                "vfmadd231ps {c7_1}, {b1}, {t1}",
                "vbroadcastss {t0}, dword ptr [{ap} + 32]",
                "vfmadd231ps {c8_0}, {b0}, {t0}",
                "vfmadd231ps {c8_1}, {b1}, {t0}",
                "vbroadcastss {t1}, dword ptr [{ap} + 36]",
                "vfmadd231ps {c9_0}, {b0}, {t1}",
                "vfmadd231ps {c9_1}, {b1}, {t1}",
                "vbroadcastss {t0}, dword ptr [{ap} + 40]",
                "vfmadd231ps {c10_0}, {b0}, {t0}",
                "vfmadd231ps {c10_1}, {b1}, {t0}",
                "vbroadcastss {t1}, dword ptr [{ap} + 44]",
                "vfmadd231ps {c11_0}, {b0}, {t1}",
                "vfmadd231ps {c11_1}, {b1}, {t1}",
                "add {ap}, {sa}",
                "add {bp}, {sb}",
                "dec {k}",
                "jnz 2b",
                "add {sp}, 16",
                "dec {ns}",
                "jnz 3b",
            sp = inout(reg) segments.as_ptr() => _,
                ns = inout(reg) segments.len() => _,
                ap = out(reg) _,
                bp = out(reg) _,
                kc = in(reg) kc,
                sa = in(reg) a_step * 4,
                sb = in(reg) b_step * 4,
                k = out(reg) _,
                b0 = out(zmm_reg) _,
                b1 = out(zmm_reg) _,
                t0 = out(zmm_reg) _,
                t1 = out(zmm_reg) _,
                c0_0 = inout(zmm_reg) acc[0][0],
                c0_1 = inout(zmm_reg) acc[0][1],
                c1_0 = inout(zmm_reg) acc[1][0],
                c1_1 = inout(zmm_reg) acc[1][1],
                c2_0 = inout(zmm_reg) acc[2][0],
                c2_1 = inout(zmm_reg) acc[2][1],
                c3_0 = inout(zmm_reg) acc[3][0],
                c3_1 = inout(zmm_reg) acc[3][1],
                c4_0 = inout(zmm_reg) acc[4][0],
                c4_1 = inout(zmm_reg) acc[4][1],
                c5_0 = inout(zmm_reg) acc[5][0],
                c5_1 = inout(zmm_reg) acc[5][1],
                c6_0 = inout(zmm_reg) acc[6][0],
                c6_1 = inout(zmm_reg) acc[6][1],
                c7_0 = inout(zmm_reg) acc[7][0],
                c7_1 = inout(zmm_reg) acc[7][1],
                c8_0 = inout(zmm_reg) acc[8][0],
                c8_1 = inout(zmm_reg) acc[8][1],
                c9_0 = inout(zmm_reg) acc[9][0],
                c9_1 = inout(zmm_reg) acc[9][1],
                c10_0 = inout(zmm_reg) acc[10][0],
                c10_1 = inout(zmm_reg) acc[10][1],
                c11_0 = inout(zmm_reg) acc[11][0],
                c11_1 = inout(zmm_reg) acc[11][1],
                options(nostack, readonly)
    );
    acc
}

/// `24×1` weight-gradient tile of 16-float vectors (AVX-512F).
///
/// # Safety
/// As [`super::gemm::outer_tile`]; the CPU must have AVX-512F.
#[target_feature(enable = "avx512f")]
pub unsafe fn outer_avx512_24x1(segments: &[(*const f32, *const f32)], kc: usize, a_step: usize, b_step: usize) -> [[__m512; 1]; 24] {
    let mut acc = [[_mm512_setzero_ps(); 1]; 24];
    if kc == 0 || segments.is_empty() {
        return acc;
    }
    // SAFETY: the caller guarantees every address the segments step through is readable.
    asm!(
            "3:",
                "mov {ap}, [{sp}]",
                "mov {bp}, [{sp} + 8]",
                "mov {k}, {kc}",
                "2:",
                "vmovups {b0}, [{bp} + 0]",
                "vfmadd231ps {c0_0}, {b0}, dword ptr [{ap} + 0]{{1to16}}",
                "vfmadd231ps {c1_0}, {b0}, dword ptr [{ap} + 4]{{1to16}}",
                "vfmadd231ps {c2_0}, {b0}, dword ptr [{ap} + 8]{{1to16}}",
                "vfmadd231ps {c3_0}, {b0}, dword ptr [{ap} + 12]{{1to16}}",
                "vfmadd231ps {c4_0}, {b0}, dword ptr [{ap} + 16]{{1to16}}",
                "vfmadd231ps {c5_0}, {b0}, dword ptr [{ap} + 20]{{1to16}}",
                "vfmadd231ps {c6_0}, {b0}, dword ptr [{ap} + 24]{{1to16}}",
                "vfmadd231ps {c7_0}, {b0}, dword ptr [{ap} + 28]{{1to16}}",
                "vfmadd231ps {c8_0}, {b0}, dword ptr [{ap} + 32]{{1to16}}",
                "vfmadd231ps {c9_0}, {b0}, dword ptr [{ap} + 36]{{1to16}}",
                "vfmadd231ps {c10_0}, {b0}, dword ptr [{ap} + 40]{{1to16}}",
                "vfmadd231ps {c11_0}, {b0}, dword ptr [{ap} + 44]{{1to16}}",
                "vfmadd231ps {c12_0}, {b0}, dword ptr [{ap} + 48]{{1to16}}",
                "vfmadd231ps {c13_0}, {b0}, dword ptr [{ap} + 52]{{1to16}}",
                "vfmadd231ps {c14_0}, {b0}, dword ptr [{ap} + 56]{{1to16}}",
                "vfmadd231ps {c15_0}, {b0}, dword ptr [{ap} + 60]{{1to16}}",
                "vfmadd231ps {c16_0}, {b0}, dword ptr [{ap} + 64]{{1to16}}",
                "vfmadd231ps {c17_0}, {b0}, dword ptr [{ap} + 68]{{1to16}}",
                "vfmadd231ps {c18_0}, {b0}, dword ptr [{ap} + 72]{{1to16}}",
                "vfmadd231ps {c19_0}, {b0}, dword ptr [{ap} + 76]{{1to16}}",
                "vfmadd231ps {c20_0}, {b0}, dword ptr [{ap} + 80]{{1to16}}",
                "vfmadd231ps {c21_0}, {b0}, dword ptr [{ap} + 84]{{1to16}}",
                "vfmadd231ps {c22_0}, {b0}, dword ptr [{ap} + 88]{{1to16}}",
                "vfmadd231ps {c23_0}, {b0}, dword ptr [{ap} + 92]{{1to16}}",
                "add {ap}, {sa}",
                "add {bp}, {sb}",
                "dec {k}",
                "jnz 2b",
                "add {sp}, 16",
                "dec {ns}",
                "jnz 3b",
            sp = inout(reg) segments.as_ptr() => _,
                ns = inout(reg) segments.len() => _,
                ap = out(reg) _,
                bp = out(reg) _,
                kc = in(reg) kc,
                sa = in(reg) a_step * 4,
                sb = in(reg) b_step * 4,
                k = out(reg) _,
                b0 = out(zmm_reg) _,
                c0_0 = inout(zmm_reg) acc[0][0],
                c1_0 = inout(zmm_reg) acc[1][0],
                c2_0 = inout(zmm_reg) acc[2][0],
                c3_0 = inout(zmm_reg) acc[3][0],
                c4_0 = inout(zmm_reg) acc[4][0],
                c5_0 = inout(zmm_reg) acc[5][0],
                c6_0 = inout(zmm_reg) acc[6][0],
                c7_0 = inout(zmm_reg) acc[7][0],
                c8_0 = inout(zmm_reg) acc[8][0],
                c9_0 = inout(zmm_reg) acc[9][0],
                c10_0 = inout(zmm_reg) acc[10][0],
                c11_0 = inout(zmm_reg) acc[11][0],
                c12_0 = inout(zmm_reg) acc[12][0],
                c13_0 = inout(zmm_reg) acc[13][0],
                c14_0 = inout(zmm_reg) acc[14][0],
                c15_0 = inout(zmm_reg) acc[15][0],
                c16_0 = inout(zmm_reg) acc[16][0],
                c17_0 = inout(zmm_reg) acc[17][0],
                c18_0 = inout(zmm_reg) acc[18][0],
                c19_0 = inout(zmm_reg) acc[19][0],
                c20_0 = inout(zmm_reg) acc[20][0],
                c21_0 = inout(zmm_reg) acc[21][0],
                c22_0 = inout(zmm_reg) acc[22][0],
                c23_0 = inout(zmm_reg) acc[23][0],
                options(nostack, readonly)
    );
    acc
}

/// `6×2` weight-gradient tile of 8-float vectors (AVX2 and FMA).
///
/// # Safety
/// As [`super::gemm::outer_tile`]; the CPU must have AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn outer_avx2_6x2(segments: &[(*const f32, *const f32)], kc: usize, a_step: usize, b_step: usize) -> [[__m256; 2]; 6] {
    let mut acc = [[_mm256_setzero_ps(); 2]; 6];
    if kc == 0 || segments.is_empty() {
        return acc;
    }
    // SAFETY: the caller guarantees every address the segments step through is readable.
    asm!(
            "3:",
                "mov {ap}, [{sp}]",
                "mov {bp}, [{sp} + 8]",
                "mov {k}, {kc}",
                "2:",
                "vmovups {b0}, [{bp} + 0]",
                "vmovups {b1}, [{bp} + 32]",
                "vbroadcastss {t0}, dword ptr [{ap} + 0]",
                "vfmadd231ps {c0_0}, {b0}, {t0}",
                "vfmadd231ps {c0_1}, {b1}, {t0}",
                "vbroadcastss {t1}, dword ptr [{ap} + 4]",
                "vfmadd231ps {c1_0}, {b0}, {t1}",
                "vfmadd231ps {c1_1}, {b1}, {t1}",
                "vbroadcastss {t0}, dword ptr [{ap} + 8]",
                "vfmadd231ps {c2_0}, {b0}, {t0}",
                "vfmadd231ps {c2_1}, {b1}, {t0}",
                "vbroadcastss {t1}, dword ptr [{ap} + 12]",
                "vfmadd231ps {c3_0}, {b0}, {t1}",
                "vfmadd231ps {c3_1}, {b1}, {t1}",
                "vbroadcastss {t0}, dword ptr [{ap} + 16]",
                "vfmadd231ps {c4_0}, {b0}, {t0}",
                "vfmadd231ps {c4_1}, {b1}, {t0}",
                "vbroadcastss {t1}, dword ptr [{ap} + 20]",
                "vfmadd231ps {c5_0}, {b0}, {t1}",
                "vfmadd231ps {c5_1}, {b1}, {t1}",
                "add {ap}, {sa}",
                "add {bp}, {sb}",
                "dec {k}",
                "jnz 2b",
                "add {sp}, 16",
                "dec {ns}",
                "jnz 3b",
            sp = inout(reg) segments.as_ptr() => _,
                ns = inout(reg) segments.len() => _,
                ap = out(reg) _,
                bp = out(reg) _,
                kc = in(reg) kc,
                sa = in(reg) a_step * 4,
                sb = in(reg) b_step * 4,
                k = out(reg) _,
                b0 = out(ymm_reg) _,
                b1 = out(ymm_reg) _,
                t0 = out(ymm_reg) _,
                t1 = out(ymm_reg) _,
                c0_0 = inout(ymm_reg) acc[0][0],
                c0_1 = inout(ymm_reg) acc[0][1],
                c1_0 = inout(ymm_reg) acc[1][0],
                c1_1 = inout(ymm_reg) acc[1][1],
                c2_0 = inout(ymm_reg) acc[2][0],
                c2_1 = inout(ymm_reg) acc[2][1],
                c3_0 = inout(ymm_reg) acc[3][0],
                c3_1 = inout(ymm_reg) acc[3][1],
                c4_0 = inout(ymm_reg) acc[4][0],
                c4_1 = inout(ymm_reg) acc[4][1],
                c5_0 = inout(ymm_reg) acc[5][0],
                c5_1 = inout(ymm_reg) acc[5][1],
                options(nostack, readonly)
    );
    acc
}

/// `12×1` weight-gradient tile of 8-float vectors (AVX2 and FMA).
///
/// # Safety
/// As [`super::gemm::outer_tile`]; the CPU must have AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn outer_avx2_12x1(segments: &[(*const f32, *const f32)], kc: usize, a_step: usize, b_step: usize) -> [[__m256; 1]; 12] {
    let mut acc = [[_mm256_setzero_ps(); 1]; 12];
    if kc == 0 || segments.is_empty() {
        return acc;
    }
    // SAFETY: the caller guarantees every address the segments step through is readable.
    asm!(
            "3:",
                "mov {ap}, [{sp}]",
                "mov {bp}, [{sp} + 8]",
                "mov {k}, {kc}",
                "2:",
                "vmovups {b0}, [{bp} + 0]",
                "vbroadcastss {t0}, dword ptr [{ap} + 0]",
                "vfmadd231ps {c0_0}, {b0}, {t0}",
                "vbroadcastss {t1}, dword ptr [{ap} + 4]",
                "vfmadd231ps {c1_0}, {b0}, {t1}",
                "vbroadcastss {t0}, dword ptr [{ap} + 8]",
                "vfmadd231ps {c2_0}, {b0}, {t0}",
                "vbroadcastss {t1}, dword ptr [{ap} + 12]",
                "vfmadd231ps {c3_0}, {b0}, {t1}",
                "vbroadcastss {t0}, dword ptr [{ap} + 16]",
                "vfmadd231ps {c4_0}, {b0}, {t0}",
                "vbroadcastss {t1}, dword ptr [{ap} + 20]",
                "vfmadd231ps {c5_0}, {b0}, {t1}",
                "vbroadcastss {t0}, dword ptr [{ap} + 24]",
                "vfmadd231ps {c6_0}, {b0}, {t0}",
                "vbroadcastss {t1}, dword ptr [{ap} + 28]",
                "vfmadd231ps {c7_0}, {b0}, {t1}",
                "vbroadcastss {t0}, dword ptr [{ap} + 32]",
                "vfmadd231ps {c8_0}, {b0}, {t0}",
                "vbroadcastss {t1}, dword ptr [{ap} + 36]",
                "vfmadd231ps {c9_0}, {b0}, {t1}",
                "vbroadcastss {t0}, dword ptr [{ap} + 40]",
                "vfmadd231ps {c10_0}, {b0}, {t0}",
                "vbroadcastss {t1}, dword ptr [{ap} + 44]",
                "vfmadd231ps {c11_0}, {b0}, {t1}",
                "add {ap}, {sa}",
                "add {bp}, {sb}",
                "dec {k}",
                "jnz 2b",
                "add {sp}, 16",
                "dec {ns}",
                "jnz 3b",
            sp = inout(reg) segments.as_ptr() => _,
                ns = inout(reg) segments.len() => _,
                ap = out(reg) _,
                bp = out(reg) _,
                kc = in(reg) kc,
                sa = in(reg) a_step * 4,
                sb = in(reg) b_step * 4,
                k = out(reg) _,
                b0 = out(ymm_reg) _,
                t0 = out(ymm_reg) _,
                t1 = out(ymm_reg) _,
                c0_0 = inout(ymm_reg) acc[0][0],
                c1_0 = inout(ymm_reg) acc[1][0],
                c2_0 = inout(ymm_reg) acc[2][0],
                c3_0 = inout(ymm_reg) acc[3][0],
                c4_0 = inout(ymm_reg) acc[4][0],
                c5_0 = inout(ymm_reg) acc[5][0],
                c6_0 = inout(ymm_reg) acc[6][0],
                c7_0 = inout(ymm_reg) acc[7][0],
                c8_0 = inout(ymm_reg) acc[8][0],
                c9_0 = inout(ymm_reg) acc[9][0],
                c10_0 = inout(ymm_reg) acc[10][0],
                c11_0 = inout(ymm_reg) acc[11][0],
                options(nostack, readonly)
    );
    acc
}
