# Generates src/model/kernels/asm.rs (hand-scheduled microkernels as inline assembly).
# Run: python3 scripts/dev/gen_asm_kernels.py
PREFETCH = 4096

def kernel(name, isa, vec, mr, nv, lanes, feature, embedded):
    regs_per_base = 3
    bases = (mr + 2) // 3
    lines = []
    lines.append("2:")
    for j in range(nv):
        lines.append(f"vmovups {{b{j}}}, [{{bp}} + {j * lanes * 4}]")
    # The weight panel streams from L2 (or beyond): fetch it a few steps ahead, one cache
    # line per 64 bytes the step consumes.
    step = nv * lanes * 4
    for line in range(0, step, 64):
        lines.append(f"prefetcht0 [{{bp}} + {PREFETCH + line}]")
    for r in range(mr):
        base = f"{{r{r // 3}}}"
        off = ["", " + {l}", " + {l}*2"][r % 3]
        addr = f"[{base}{off}]"
        if embedded and nv == 1:
            bc = "{1to16}" if lanes == 16 else "{1to8}"
            lines.append(f"vfmadd231ps {{c{r}_0}}, {{b0}}, dword ptr {addr}{bc}")
        else:
            t = f"{{t{r % 2}}}"
            lines.append(f"vbroadcastss {t}, dword ptr {addr}")
            for j in range(nv):
                lines.append(f"vfmadd231ps {{c{r}_{j}}}, {{b{j}}}, {t}")
    for i in range(bases):
        lines.append(f"add {{r{i}}}, 4")
    lines.append(f"add {{bp}}, {nv * lanes * 4}")
    lines.append("dec {k}")
    lines.append("jnz 2b")
    body = ",\n                ".join('"' + l.replace("{", "{{").replace("}", "}}").replace("{{", "{").replace("}}", "}") + '"' for l in lines)
    # the replace dance above keeps {name} operands; escape the {1toN} braces
    body = body.replace("{1to16}", "{{1to16}}").replace("{1to8}", "{{1to8}}")
    ops = []
    for i in range(bases):
        ops.append(f"r{i} = inout(reg) rows[{i}] => _")
    ops.append("l = in(reg) lda * 4")
    ops.append("bp = inout(reg) bp")
    ops.append("k = inout(reg) kc => _")
    for j in range(nv):
        ops.append(f"b{j} = out({vec}) _")
    if not (embedded and nv == 1):
        ops.append(f"t0 = out({vec}) _")
        ops.append(f"t1 = out({vec}) _")
    for r in range(mr):
        for j in range(nv):
            ops.append(f"c{r}_{j} = inout({vec}) acc[{r}][{j}]")
    ops.append("options(nostack, readonly)")
    opstr = ",\n                ".join(ops)
    vty = "__m512" if lanes == 16 else "__m256"
    zero = "_mm512_setzero_ps()" if lanes == 16 else "_mm256_setzero_ps()"
    return f'''
/// `{mr}×{nv}` tile of {lanes}-float vectors ({isa}).
///
/// # Safety
/// As [`super::gemm::tile`]; the CPU must have {isa}.
#[target_feature(enable = "{feature}")]
pub unsafe fn {name}(a: *const f32, lda: usize, offsets: &[isize], kc: usize, b: *const f32) -> [[{vty}; {nv}]; {mr}] {{
    let mut acc = [[{zero}; {nv}]; {mr}];
    if kc == 0 {{
        return acc;
    }}
    let mut bp = b;
    for &offset in offsets {{
        let a0 = a.offset(offset);
        let rows: [*const f32; {bases}] = std::array::from_fn(|i| a0.add(3 * i * lda));
        // SAFETY: the caller guarantees every row and panel address is readable.
        asm!(
                {body},
                {opstr}
        );
    }}
    acc
}}
'''


def outer_kernel(name, isa, vec, mr, nv, lanes, feature, embedded):
    """The weight-gradient tile: rows broadcast from `a + r` (consecutive channels of one
    pixel), vectors from `b + j·lanes`, both pointers advancing by their own pixel step; the
    loop over segments runs inside, so the accumulators stay in registers throughout."""
    lines = ["3:", "mov {ap}, [{sp}]", "mov {bp}, [{sp} + 8]", "mov {k}, {kc}", "2:"]
    for j in range(nv):
        lines.append(f"vmovups {{b{j}}}, [{{bp}} + {j * lanes * 4}]")
    for r in range(mr):
        addr = f"[{{ap}} + {r * 4}]"
        if embedded and nv == 1:
            bc = "{1to16}" if lanes == 16 else "{1to8}"
            lines.append(f"vfmadd231ps {{c{r}_0}}, {{b0}}, dword ptr {addr}{bc}")
        else:
            t = f"{{t{r % 2}}}"
            lines.append(f"vbroadcastss {t}, dword ptr {addr}")
            for j in range(nv):
                lines.append(f"vfmadd231ps {{c{r}_{j}}}, {{b{j}}}, {t}")
    lines += ["add {ap}, {sa}", "add {bp}, {sb}", "dec {k}", "jnz 2b", "add {sp}, 16", "dec {ns}", "jnz 3b"]
    body = ",\n                ".join('"' + l + '"' for l in lines)
    body = body.replace("{1to16}", "{{1to16}}").replace("{1to8}", "{{1to8}}")
    ops = ["sp = inout(reg) segments.as_ptr() => _", "ns = inout(reg) segments.len() => _", "ap = out(reg) _", "bp = out(reg) _",
           "kc = in(reg) kc", "sa = in(reg) a_step * 4", "sb = in(reg) b_step * 4", "k = out(reg) _"]
    for j in range(nv):
        ops.append(f"b{j} = out({vec}) _")
    if not (embedded and nv == 1):
        ops.append(f"t0 = out({vec}) _")
        ops.append(f"t1 = out({vec}) _")
    for r in range(mr):
        for j in range(nv):
            ops.append(f"c{r}_{j} = inout({vec}) acc[{r}][{j}]")
    ops.append("options(nostack, readonly)")
    opstr = ",\n                ".join(ops)
    vty = "__m512" if lanes == 16 else "__m256"
    zero = "_mm512_setzero_ps()" if lanes == 16 else "_mm256_setzero_ps()"
    return f'''
/// `{mr}×{nv}` weight-gradient tile of {lanes}-float vectors ({isa}).
///
/// # Safety
/// As [`super::gemm::outer_tile`]; the CPU must have {isa}.
#[target_feature(enable = "{feature}")]
pub unsafe fn {name}(segments: &[(*const f32, *const f32)], kc: usize, a_step: usize, b_step: usize) -> [[{vty}; {nv}]; {mr}] {{
    let mut acc = [[{zero}; {nv}]; {mr}];
    if kc == 0 || segments.is_empty() {{
        return acc;
    }}
    // SAFETY: the caller guarantees every address the segments step through is readable.
    asm!(
            {body},
            {opstr}
    );
    acc
}}
'''

out = '''//! Hand-scheduled register tiles for [`super::gemm::tile`], as inline assembly: the
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
'''
out += kernel("tile_avx512_12x2", "AVX-512F", "zmm_reg", 12, 2, 16, "avx512f", False)
out += kernel("tile_avx512_24x1", "AVX-512F", "zmm_reg", 24, 1, 16, "avx512f", True)
out += kernel("tile_avx512_8x2", "AVX-512F", "zmm_reg", 8, 2, 16, "avx512f", False)
out += kernel("tile_avx2_6x2", "AVX2 and FMA", "ymm_reg", 6, 2, 8, "avx2,fma", False)
out += kernel("tile_avx2_12x1", "AVX2 and FMA", "ymm_reg", 12, 1, 8, "avx2,fma", False)
out += outer_kernel("outer_avx512_12x2", "AVX-512F", "zmm_reg", 12, 2, 16, "avx512f", False)
out += outer_kernel("outer_avx512_24x1", "AVX-512F", "zmm_reg", 24, 1, 16, "avx512f", True)
out += outer_kernel("outer_avx2_6x2", "AVX2 and FMA", "ymm_reg", 6, 2, 8, "avx2,fma", False)
out += outer_kernel("outer_avx2_12x1", "AVX2 and FMA", "ymm_reg", 12, 1, 8, "avx2,fma", False)
import os; open(os.path.join(os.path.dirname(__file__), "../../src/engine/asm.rs"), "w").write(out)
