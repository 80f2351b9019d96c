//! int8 convolutions: post-training static quantization.
//!
//! Weights are symmetric int8 per output channel (`q = round(w / s_w)`, `s_w = max|w| /
//! 127`); a convolution's input is quantized on the fly, per tensor, with the scale and zero
//! point of the range its map took on the calibration images (zero point 0 for maps that
//! are never negative, 128 otherwise). The sums are exact 32-bit integers; the epilogue
//! removes the zero point's share (`zp · Σ q_w`, precomputed per output channel), scales by
//! `s_x · s_w`, adds the bias and the residual, clamps and stores f32 into the output's
//! channel range — so requantization is fused into the epilogue and the maps between steps
//! keep f32 (the next int8 step quantizes as it reads).
//!
//! A [`Int8Conv`] feeds its GEMM like [`super::bf16::Bf16Conv`]: either *row mode* (a `k ×
//! k` centred convolution reads A straight from quantized copies of its input rows, `stride
//! · cin` bytes apart per pixel; K runs per kernel row) or *gather mode* (every tap × input
//! channel gathered into one K dimension, per block of rows). Weights are packed as
//! `[phase][panel of 16][K / 4][16][4]`, the layout `vpdpbusd` reads.
//!
//! Units ([`Int8Unit`]): AVX512-VNNI (`vpdpbusd` on zmm, 12 rows × 32 channels per register
//! block), AVX-VNNI (the VEX `vpdpbusd` on ymm, 6 rows × 16 channels), AVX2 (`vpmaddubsw` on
//! the low 7 bits of each activation and on its top bit separately — exact, as a plain
//! `vpmaddubsw` saturates at 255 · 127 · 2 — then `vpmaddwd`), and a portable path. All of
//! them compute the same integers, so a version's masks do not depend on the CPU.

#![allow(unsafe_op_in_unsafe_fn)]

use super::bf16::{RowSlots, Rows, centred_kernel, k_layout, tap_offsets};
use super::conv::{Phase, Split, range};
use super::plan::{Ctx, View};
use super::simd::Simd;

/// What multiplies the int8 operands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Int8Unit {
    /// AVX512-VNNI `vpdpbusd` on 512-bit vectors.
    Avx512Vnni,
    /// AVX-VNNI: the VEX-encoded `vpdpbusd` on 256-bit vectors.
    AvxVnni,
    /// AVX2 `vpmaddubsw` + `vpmaddwd`.
    Avx2,
    /// Plain Rust.
    Portable,
}

impl Int8Unit {
    pub fn name(self) -> &'static str {
        match self {
            Int8Unit::Avx512Vnni => "avx512vnni",
            Int8Unit::AvxVnni => "avxvnni",
            Int8Unit::Avx2 => "avx2",
            Int8Unit::Portable => "portable",
        }
    }

    pub fn supported(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            let avx2 = std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma");
            match self {
                Int8Unit::Portable => true,
                Int8Unit::Avx2 => avx2,
                Int8Unit::AvxVnni => avx2 && std::is_x86_feature_detected!("avxvnni"),
                Int8Unit::Avx512Vnni => {
                    avx2 && std::is_x86_feature_detected!("avx512f")
                        && std::is_x86_feature_detected!("avx512bw")
                        && std::is_x86_feature_detected!("avx512vl")
                        && std::is_x86_feature_detected!("avx512vnni")
                }
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            self == Int8Unit::Portable
        }
    }

    /// The fastest unit this CPU has.
    pub fn detect() -> Int8Unit {
        [Int8Unit::Avx512Vnni, Int8Unit::AvxVnni, Int8Unit::Avx2].into_iter().find(|u| u.supported()).unwrap_or(Int8Unit::Portable)
    }

    /// Rows per register block.
    fn mr(self) -> usize {
        match self {
            Int8Unit::Avx512Vnni => 12,
            _ => 6,
        }
    }
}

/// The scale and zero point of a map whose values ranged over `[min, max]`: zero point 0
/// and 256 steps for maps that never went negative, 128 and symmetric steps otherwise.
pub fn activation_quant(min: f32, max: f32) -> (f32, u8) {
    let ok = |s: f32| if s.is_finite() && s > 0.0 { s } else { 1.0 };
    if min >= 0.0 { (ok(max / 255.0), 0) } else { (ok(min.abs().max(max.abs()) / 127.0), 128) }
}

/// The scale of a weight channel whose largest magnitude is `max_abs` (symmetric, ±127).
pub fn weight_scale(max_abs: f32) -> f32 {
    if max_abs > 0.0 && max_abs.is_finite() { max_abs / 127.0 } else { 1.0 }
}

/// A weight on the int8 grid of `scale`.
#[inline]
pub fn quantize_weight(w: f32, scale: f32) -> i8 {
    (w / scale).round_ties_even().clamp(-127.0, 127.0) as i8
}

/// `x` quantized with `1 / scale` = `inv` and zero point `zp` (ties to even; the
/// vector paths compute the same).
#[inline(always)]
pub fn quantize(x: f32, inv: f32, zp: i32) -> u8 {
    let v = (x * inv).clamp(-256.0, 256.0).round_ties_even() as i32 + zp;
    v.clamp(0, 255) as u8
}

/// Output channels per weight panel.
const NP: usize = 16;

/// Bytes on 64-byte boundaries: every weight vector a kernel loads is one cache line, whatever
/// the allocator's alignment.
#[derive(Clone)]
pub struct Lines {
    lines: Vec<Line>,
    len: usize,
}

#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([i8; 64]);

impl Lines {
    fn zeroed(len: usize) -> Lines {
        Lines { lines: vec![Line([0; 64]); len.div_ceil(64)], len }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn as_ptr(&self) -> *const i8 {
        self.lines.as_ptr() as *const i8
    }

    fn as_mut_slice(&mut self) -> &mut [i8] {
        // SAFETY: `lines` holds at least `len` bytes, contiguous.
        unsafe { std::slice::from_raw_parts_mut(self.lines.as_mut_ptr() as *mut i8, self.len) }
    }
}

impl std::fmt::Debug for Lines {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Lines({} bytes)", self.len)
    }
}
/// Largest rows per register block (of any unit).
const MR_MAX: usize = 12;

/// A convolution in int8 (see the module docs).
#[derive(Debug, Clone)]
pub struct Int8Conv {
    pub input: View,
    pub output: View,
    pub residual: Option<View>,
    pub phases: Vec<Phase>,
    pub stride: usize,
    pub up: usize,
    pub grid: (usize, usize),
    pub cin: usize,
    pub cout: usize,
    /// Bytes per row of A: taps × input channels (row mode: `k` kernel rows of `kd`),
    /// rounded up to 4.
    pub kp: usize,
    pub panels: usize,
    /// `[phase][panel][kp / 4][NP][4]`, 64-byte aligned.
    pub packed: Lines,
    /// `[phase][panels · NP]`: the zero point times the sum of the channel's int8 weights.
    pub comp: Vec<i32>,
    /// `[phase][panels · NP]`: input scale × weight scale.
    pub scale: Vec<f32>,
    pub bias: Vec<f32>,
    /// `1 / input scale` and the input's zero point.
    pub inv_scale: f32,
    pub zero: u8,
    pub min: f32,
    pub max: f32,
    /// Rows of A gathered at a time (gather mode).
    pub rows: usize,
    /// Row mode: bytes per kernel row (`k · cin` rounded up to 4).
    pub row_k: Option<usize>,
    pub tap_k: Vec<usize>,
    /// `[phase][tap]`: floats from a pixel of the padded input to the tap's pixel.
    pub offsets: Vec<Vec<isize>>,
    pub unit: Int8Unit,
}

impl Int8Conv {
    /// Quantizes and packs `weight(phase, tap, c, o)`, one scale per output channel of each
    /// phase, or of all phases together when `shared_scales` (a transposed convolution,
    /// whose phases are parts of one kernel); the input is quantized with `(scale, zero
    /// point)` = `input_quant`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        input: View,
        output: View,
        residual: Option<View>,
        phases: Vec<Phase>,
        stride: usize,
        up: usize,
        grid: (usize, usize),
        cin: usize,
        cout: usize,
        weight: &dyn Fn(usize, usize, usize, usize) -> f32,
        bias: &dyn Fn(usize, usize) -> f32,
        (min, max): (f32, f32),
        input_quant: (f32, u8),
        shared_scales: bool,
        unit: Int8Unit,
    ) -> Int8Conv {
        let taps = phases[0].taps.len();
        // Row mode saves the quantization of every tap (k² per input value → one), but its
        // register blocks stop at the end of a row: on rows under four blocks wide (16 pixels:
        // a third of the block wasted) gathering is faster (unet-d4w32 on one Zen 5 core:
        // 16×16 and 8×8 layers 480–580 → 640–780 GOP/s; 64×64 ones 600 → 700 in row mode).
        let rows_fit = grid.1 % unit.mr() == 0 || grid.1 >= 4 * unit.mr();
        let row_k = (unit != Int8Unit::Portable && rows_fit).then(|| centred_kernel(&phases, stride, grid.1, input.w)).flatten().map(|k| (k * cin).div_ceil(4) * 4);
        let (kp, tap_k) = k_layout(taps, cin, row_k, 4);
        let panels = cout.div_ceil(NP);
        let (in_scale, zero) = input_quant;
        let mut packed = Lines::zeroed(phases.len() * panels * kp * NP);
        let mut comp = vec![0i32; phases.len() * panels * NP];
        let mut scale = vec![0f32; phases.len() * panels * NP];
        let mut biases = vec![0f32; phases.len() * panels * NP];
        let max_abs = |p: usize, o: usize| {
            let mut m = 0f32;
            for t in 0..taps {
                for c in 0..cin {
                    m = m.max(weight(p, t, c, o).abs());
                }
            }
            m
        };
        for p in 0..phases.len() {
            for o in 0..cout {
                let m = if shared_scales { (0..phases.len()).map(|q| max_abs(q, o)).fold(0f32, f32::max) } else { max_abs(p, o) };
                let s_w = weight_scale(m);
                let (panel, j) = (o / NP, o % NP);
                let dst = &mut packed.as_mut_slice()[(p * panels + panel) * kp * NP..][..kp * NP];
                let mut sum = 0i32;
                for (t, &k0) in tap_k.iter().enumerate() {
                    for c in 0..cin {
                        let k = k0 + c;
                        let q = quantize_weight(weight(p, t, c, o), s_w);
                        dst[(k / 4) * 4 * NP + 4 * j + (k % 4)] = q;
                        sum += q as i32;
                    }
                }
                let i = p * panels * NP + o;
                comp[i] = zero as i32 * sum;
                scale[i] = in_scale * s_w;
                biases[i] = bias(p, o);
            }
        }
        let mr = unit.mr();
        let budget = super::compile::l2_bytes() / 4;
        let rows = (budget / kp.max(1) / MR_MAX).clamp(1, 32) * MR_MAX;
        debug_assert!(rows % mr == 0);
        let offsets = tap_offsets(&input, &phases);
        Int8Conv {
            offsets,
            input,
            output,
            residual,
            phases,
            stride,
            up,
            grid,
            cin,
            cout,
            kp,
            panels,
            packed,
            comp,
            scale,
            bias: biases,
            inv_scale: 1.0 / in_scale,
            zero,
            min,
            max,
            rows,
            row_k,
            tap_k,
            unit,
        }
    }

    /// Bytes of one quantized input row: every padded pixel, then slack for the reads of a
    /// register block running past the row's end (computed, never stored).
    fn row_pitch(&self) -> usize {
        let kd = self.row_k.unwrap_or(0);
        ((self.input.w + 2) * self.cin + MR_MAX * self.stride * self.cin + kd + 64).div_ceil(64) * 64
    }

    fn pairs(&self) -> usize {
        self.panels.div_ceil(2)
    }

    fn total_rows(&self, n: usize) -> usize {
        n * self.grid.0 * self.grid.1
    }

    /// Work items per phase group: phases that read the same taps (the four of a 1×1
    /// convolution before depth-to-space) share one gathered A, so they run in one item.
    fn item_phases(&self) -> usize {
        if self.shared_a() { 1 } else { self.phases.len() }
    }

    fn shared_a(&self) -> bool {
        self.row_k.is_none() && self.phases.len() > 1 && self.phases.iter().all(|p| p.taps == self.phases[0].taps)
    }

    /// Per-thread scratch in floats: sums of a register block, A, alignment.
    pub fn scratch_floats(&self) -> usize {
        let a = match self.row_k {
            Some(kd) => (self.kp / kd) * self.row_pitch(),
            None => self.rows * self.kp,
        };
        MR_MAX * 2 * NP + a.div_ceil(4) + 32
    }

    pub fn weight_bytes(&self) -> usize {
        self.packed.len() + (self.comp.len() + self.scale.len() + self.bias.len()) * 4
    }

    pub fn split(&self, n: usize, threads: usize) -> Split {
        let tiles = self.total_rows(n).div_ceil(MR_MAX);
        let outer = self.item_phases();
        let weights = self.packed.len() / outer;
        let activations = self.total_rows(n) * self.kp;
        if threads > 1 && weights > activations {
            // Deep layers on small maps: threads take different panels.
            let groups = self.pairs().min((4 * threads).div_ceil(outer)).max(1);
            let chunks = if outer * groups >= 2 * threads { 1 } else { (2 * threads).div_ceil(outer * groups).min(tiles) };
            return Split { groups, chunks: chunks.max(1) };
        }
        Split::new(tiles, self.pairs(), outer, threads, 2)
    }

    pub fn items(&self, split: Split) -> usize {
        self.item_phases() * split.groups * split.chunks
    }

    /// Runs work item `item` of `split`.
    ///
    /// # Safety
    /// `ctx` holds the step's buffers for `ctx.n` images; `scratch` holds
    /// [`Self::scratch_floats`] floats of this thread; `self.unit` and `S` are supported.
    #[inline(always)]
    pub unsafe fn run<S: Simd>(&self, ctx: &Ctx, split: Split, item: usize, scratch: *mut f32) {
        let phase_index = item / (split.groups * split.chunks);
        let group = (item / split.chunks) % split.groups;
        let chunk = item % split.chunks;
        let (g_lo, g_hi) = range(self.pairs(), split.groups, group);
        let panels = (2 * g_lo, (2 * g_hi).min(self.panels));
        let total = self.total_rows(ctx.n);
        let (t_lo, t_hi) = range(total.div_ceil(MR_MAX), split.chunks, chunk);
        let rows = (t_lo * MR_MAX, (t_hi * MR_MAX).min(total));
        if rows.0 >= rows.1 || panels.0 >= panels.1 {
            return;
        }
        let aligned = scratch.add(scratch.align_offset(64));
        let acc = aligned;
        let a = aligned.add(MR_MAX * 2 * NP) as *mut u8;
        match self.row_k {
            Some(kd) => self.run_rows::<S>(ctx, panels, rows, kd, a, acc),
            None if self.shared_a() => self.run_gather::<S>(ctx, (0, self.phases.len()), panels, rows, a, acc),
            None => self.run_gather::<S>(ctx, (phase_index, phase_index + 1), panels, rows, a, acc),
        }
    }

    #[inline(always)]
    /// Gather mode, for the phases `ph_lo..ph_hi` (more than one only when they read the
    /// same taps: A is gathered once for all of them).
    unsafe fn run_gather<S: Simd>(&self, ctx: &Ctx, (ph_lo, ph_hi): (usize, usize), (p_lo, p_hi): (usize, usize), (r_lo, r_hi): (usize, usize), a: *mut u8, acc: *mut f32) {
        let phase = &self.phases[ph_lo];
        let offsets = &self.offsets[ph_lo];
        let input = ctx.ptr(&self.input);
        let (kp, cs) = (self.kp, self.input.cs as isize);
        let mr = self.unit.mr();
        let mut block = r_lo;
        while block < r_hi {
            let rows = self.rows.min(r_hi - block);
            let mut cursor = Rows::at(&self.input, &self.output, self.grid, self.stride, self.up, block, phase);
            for r in 0..rows {
                let (in_pos, _) = cursor.positions();
                cursor.advance();
                for (t, &off) in offsets.iter().enumerate() {
                    let src = input.offset(in_pos as isize * cs + off);
                    quantize_run(self.unit, src, a.add(r * kp + self.tap_k[t]), self.cin, self.inv_scale, self.zero as i32);
                }
            }
            for phase_index in ph_lo..ph_hi {
                let mut panel = p_lo;
                while panel < p_hi {
                    let count = (p_hi - panel).min(2);
                    let b = self.packed.as_ptr().add((phase_index * self.panels + panel) * kp * NP);
                    let comp = self.comp.as_ptr().add(phase_index * self.panels * NP + panel * NP);
                    let mut m = 0;
                    while m < rows {
                        let n = mr.min(rows - m);
                        dot(self.unit, &[(a.add(m * kp) as *const u8, b)], kp / 4, kp, kp * NP, n, count, comp, acc);
                        self.epilogue::<S>(ctx, phase_index, block + m, n, panel, count, acc);
                        m += mr;
                    }
                    panel += 2;
                }
            }
            block += rows;
        }
    }

    /// Row mode: each output row's `k` input rows quantized once, then register blocks of
    /// consecutive pixels of the row read A `stride · cin` bytes apart.
    #[inline(always)]
    unsafe fn run_rows<S: Simd>(&self, ctx: &Ctx, (p_lo, p_hi): (usize, usize), (r_lo, r_hi): (usize, usize), kd: usize, rows: *mut u8, acc: *mut f32) {
        let (gh, gw) = self.grid;
        let k = self.kp / kd;
        let pitch = self.row_pitch();
        let (cin, s) = (self.cin, self.stride);
        let (iw, ih) = (self.input.w + 2, self.input.h + 2);
        let input = ctx.ptr(&self.input);
        let mr = self.unit.mr();
        let mut slots = RowSlots::new();
        let mut g = r_lo;
        while g < r_hi {
            let image_row = g / gw;
            let x0 = g % gw;
            let end = (image_row * gw + gw).min(r_hi);
            let (img, y) = (image_row / gh, image_row % gh);
            // Padded input row of kernel row dy: y·stride + 1 + dy − k/2.
            let slot = slots.place(k, |dy| img * ih + y * s + 1 + dy - k / 2, |sl, row| {
                let src = input.add(row * iw * self.input.cs);
                let dst = rows.add(sl * pitch);
                if self.input.cs == cin {
                    quantize_run(self.unit, src, dst, iw * cin, self.inv_scale, self.zero as i32);
                } else {
                    for px in 0..iw {
                        quantize_run(self.unit, src.add(px * self.input.cs), dst.add(px * cin), cin, self.inv_scale, self.zero as i32);
                    }
                }
            });
            let mut panel = p_lo;
            while panel < p_hi {
                let count = (p_hi - panel).min(2);
                let b = self.packed.as_ptr().add(panel * self.kp * NP);
                let comp = self.comp.as_ptr().add(panel * NP);
                let mut x = x0;
                let mut at = g;
                while at < end {
                    let n = mr.min(end - at);
                    let mut segments = [(rows as *const u8, b); 3];
                    for (dy, seg) in segments.iter_mut().enumerate().take(k) {
                        // Padded column of the window's first tap: x·stride + 1 − k/2.
                        *seg = (rows.add(slot[dy] * pitch + (x * s + 1 - k / 2) * cin) as *const u8, b.add(dy * kd * NP));
                    }
                    dot(self.unit, &segments[..k], kd / 4, s * cin, self.kp * NP, n, count, comp, acc);
                    self.epilogue::<S>(ctx, 0, at, n, panel, count, acc);
                    x += n;
                    at += n;
                }
                panel += 2;
            }
            g = end;
        }
    }

    /// Scale, bias, residual, clamp and store of `rows` rows of sums (`acc`, 32 per row:
    /// the zero point's share already removed, as f32).
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn epilogue<S: Simd>(&self, ctx: &Ctx, phase_index: usize, g0: usize, rows: usize, panel: usize, count: usize, acc: *const f32) {
        let phase = &self.phases[phase_index];
        let out_base = ctx.ptr(&self.output);
        let res_base = self.residual.as_ref().map(|r| (ctx.ptr(r), r.cs));
        let base = phase_index * self.panels * NP;
        let (scale, bias) = (self.scale.as_ptr().add(base), self.bias.as_ptr().add(base));
        let (lo, hi) = (S::splat(self.min), S::splat(self.max));
        let mut cursor = Rows::at(&self.input, &self.output, self.grid, self.stride, self.up, g0, phase);
        for r in 0..rows {
            let (_, out_pos) = cursor.positions();
            cursor.advance();
            let dst = out_base.add(out_pos * self.output.cs);
            for j in 0..count {
                let o0 = (panel + j) * NP;
                if o0 >= self.cout {
                    break;
                }
                let width = (self.cout - o0).min(NP);
                let mut l = 0;
                while l < width {
                    let n = (width - l).min(S::LANES);
                    let o = o0 + l;
                    let mut v = S::fma(S::load(acc.add(r * 2 * NP + j * NP + l)), S::load(scale.add(o)), S::load(bias.add(o)));
                    if let Some((res, res_cs)) = res_base {
                        v = S::add(v, S::load_n(res.add(out_pos * res_cs + o), n));
                    }
                    S::store_n(dst.add(o), S::min(S::max(v, lo), hi), n);
                    l += S::LANES;
                }
            }
        }
    }
}

/// `n` floats from `src` quantized into `dst`.
#[inline(always)]
unsafe fn quantize_run(unit: Int8Unit, src: *const f32, dst: *mut u8, n: usize, inv: f32, zp: i32) {
    #[cfg(target_arch = "x86_64")]
    match unit {
        Int8Unit::Avx512Vnni => return x86::quantize_run_avx512(src, dst, n, inv, zp),
        Int8Unit::AvxVnni | Int8Unit::Avx2 => return x86::quantize_run(src, dst, n, inv, zp),
        Int8Unit::Portable => {}
    }
    let _ = unit;
    for i in 0..n {
        *dst.add(i) = quantize(*src.add(i), inv, zp);
    }
}

/// Sums of `rows` rows (at most the unit's register block) × `count` panels into `acc` (32
/// per row, panel `j` at `16·j`), less `comp`: over the `segments` (A of row 0, `lda`
/// bytes per row; B of panel 0, panel 1 `b_next` bytes on), `quads` K quads each. Rows past
/// `rows` up to the block are computed from the bytes that follow and never stored.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn dot(unit: Int8Unit, segments: &[(*const u8, *const i8)], quads: usize, lda: usize, b_next: usize, rows: usize, count: usize, comp: *const i32, acc: *mut f32) {
    match unit {
        #[cfg(target_arch = "x86_64")]
        Int8Unit::Avx512Vnni => {
            if count == 2 {
                x86::dot_avx512vnni::<2>(segments, quads, lda, b_next, rows, comp, acc)
            } else {
                x86::dot_avx512vnni::<1>(segments, quads, lda, b_next, rows, comp, acc)
            }
        }
        #[cfg(target_arch = "x86_64")]
        Int8Unit::AvxVnni => {
            for j in 0..count {
                x86::dot_avxvnni(segments, j * b_next, quads, lda, rows, comp.add(j * NP), acc.add(j * NP));
            }
        }
        #[cfg(target_arch = "x86_64")]
        Int8Unit::Avx2 => {
            for j in 0..count {
                x86::dot_avx2(segments, j * b_next, quads, lda, rows, comp.add(j * NP), acc.add(j * NP));
            }
        }
        _ => dot_portable(segments, quads, lda, b_next, rows, count, comp, acc),
    }
}

#[allow(clippy::too_many_arguments)]
unsafe fn dot_portable(segments: &[(*const u8, *const i8)], quads: usize, lda: usize, b_next: usize, rows: usize, count: usize, comp: *const i32, acc: *mut f32) {
    for r in 0..rows {
        for j in 0..count {
            let mut sums = [0i32; NP];
            for &(a, b) in segments {
                let (a, b) = (a.add(r * lda), b.add(j * b_next));
                for k in 0..quads * 4 {
                    let x = *a.add(k) as i32;
                    let w = b.add((k / 4) * 4 * NP + (k % 4));
                    for (l, s) in sums.iter_mut().enumerate() {
                        *s += x * *w.add(4 * l) as i32;
                    }
                }
            }
            for (l, s) in sums.iter().enumerate() {
                *acc.add(r * 2 * NP + j * NP + l) = (s - *comp.add(j * NP + l)) as f32;
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::NP;

    /// [`super::quantize`] on 8 floats at a time (the same rounding: `cvtps2dq` ties to
    /// even under the default MXCSR; saturating packs clamp to 0..=255).
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn quantize_run(src: *const f32, dst: *mut u8, n: usize, inv: f32, zp: i32) {
        let (vinv, vzp) = (_mm256_set1_ps(inv), _mm256_set1_epi32(zp));
        let (lo, hi) = (_mm256_set1_ps(-256.0), _mm256_set1_ps(256.0));
        let mut i = 0;
        while i + 8 <= n {
            let x = _mm256_min_ps(_mm256_max_ps(_mm256_mul_ps(_mm256_loadu_ps(src.add(i)), vinv), lo), hi);
            let q = _mm256_add_epi32(_mm256_cvtps_epi32(x), vzp);
            let w = _mm_packs_epi32(_mm256_castsi256_si128(q), _mm256_extracti128_si256::<1>(q));
            _mm_storel_epi64(dst.add(i) as *mut __m128i, _mm_packus_epi16(w, w));
            i += 8;
        }
        while i < n {
            *dst.add(i) = super::quantize(*src.add(i), inv, zp);
            i += 1;
        }
    }

    /// [`quantize_run`] 16 floats at a time (`vcvtps2dq`, then unsigned saturation to a byte).
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
    pub(super) unsafe fn quantize_run_avx512(src: *const f32, dst: *mut u8, n: usize, inv: f32, zp: i32) {
        let (vinv, vzp, zero) = (_mm512_set1_ps(inv), _mm512_set1_epi32(zp), _mm512_setzero_si512());
        let (lo, hi) = (_mm512_set1_ps(-256.0), _mm512_set1_ps(256.0));
        let q = |x: __m512| _mm512_max_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(_mm512_min_ps(_mm512_max_ps(_mm512_mul_ps(x, vinv), lo), hi)), vzp), zero);
        let mut i = 0;
        while i + 16 <= n {
            _mm_storeu_si128(dst.add(i) as *mut __m128i, _mm512_cvtusepi32_epi8(q(_mm512_loadu_ps(src.add(i)))));
            i += 16;
        }
        if i < n {
            let mask: __mmask16 = ((1u32 << (n - i)) - 1) as __mmask16;
            _mm512_mask_cvtusepi32_storeu_epi8(dst.add(i) as *mut i8, mask, q(_mm512_maskz_loadu_ps(mask, src.add(i))));
        }
    }

    #[inline(always)]
    unsafe fn a32(p: *const u8) -> i32 {
        (p as *const i32).read_unaligned()
    }

    /// 12 rows × `P` panels on `vpdpbusd` zmm: 12·P accumulators.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma")]
    pub(super) unsafe fn dot_avx512vnni<const P: usize>(segments: &[(*const u8, *const i8)], quads: usize, lda: usize, b_next: usize, rows: usize, comp: *const i32, acc: *mut f32) {
        const MR: usize = 12;
        let mut c = [[_mm512_setzero_si512(); P]; MR];
        for &(a, b) in segments {
            for q in 0..quads {
                let mut w = [_mm512_setzero_si512(); P];
                for (j, w) in w.iter_mut().enumerate() {
                    *w = _mm512_loadu_si512(b.add(j * b_next + q * 4 * NP) as *const __m512i);
                }
                for (i, row) in c.iter_mut().enumerate() {
                    let x = _mm512_set1_epi32(a32(a.add(i * lda + 4 * q)));
                    for j in 0..P {
                        row[j] = _mm512_dpbusd_epi32(row[j], x, w[j]);
                    }
                }
            }
        }
        for (i, row) in c.iter().enumerate().take(rows) {
            for (j, v) in row.iter().enumerate() {
                let s = _mm512_sub_epi32(*v, _mm512_loadu_si512(comp.add(j * NP) as *const __m512i));
                _mm512_storeu_ps(acc.add(i * 2 * NP + j * NP), _mm512_cvtepi32_ps(s));
            }
        }
    }

    /// 6 rows × one panel (two ymm of 8 channels) on the VEX `vpdpbusd`.
    #[target_feature(enable = "avxvnni,avx2,fma")]
    pub(super) unsafe fn dot_avxvnni(segments: &[(*const u8, *const i8)], b_off: usize, quads: usize, lda: usize, rows: usize, comp: *const i32, acc: *mut f32) {
        const MR: usize = 6;
        let mut c = [[_mm256_setzero_si256(); 2]; MR];
        for &(a, b) in segments {
            let b = b.add(b_off);
            for q in 0..quads {
                let w0 = _mm256_loadu_si256(b.add(q * 4 * NP) as *const __m256i);
                let w1 = _mm256_loadu_si256(b.add(q * 4 * NP + 32) as *const __m256i);
                for (i, row) in c.iter_mut().enumerate() {
                    let x = _mm256_set1_epi32(a32(a.add(i * lda + 4 * q)));
                    row[0] = _mm256_dpbusd_avx_epi32(row[0], x, w0);
                    row[1] = _mm256_dpbusd_avx_epi32(row[1], x, w1);
                }
            }
        }
        store_ymm(&c, rows, comp, acc);
    }

    /// 6 rows × one panel on AVX2: `vpmaddubsw` of the low 7 bits of each activation (at
    /// most 127 · 127 · 2, no saturation) and of its top bit, each widened by `vpmaddwd`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dot_avx2(segments: &[(*const u8, *const i8)], b_off: usize, quads: usize, lda: usize, rows: usize, comp: *const i32, acc: *mut f32) {
        const MR: usize = 6;
        let mut c = [[_mm256_setzero_si256(); 2]; MR];
        let ones = _mm256_set1_epi16(1);
        let (low7, top) = (_mm256_set1_epi8(0x7f), _mm256_set1_epi8(1));
        for &(a, b) in segments {
            let b = b.add(b_off);
            for q in 0..quads {
                let w0 = _mm256_loadu_si256(b.add(q * 4 * NP) as *const __m256i);
                let w1 = _mm256_loadu_si256(b.add(q * 4 * NP + 32) as *const __m256i);
                for (i, row) in c.iter_mut().enumerate() {
                    let x = _mm256_set1_epi32(a32(a.add(i * lda + 4 * q)));
                    let (xl, xh) = (_mm256_and_si256(x, low7), _mm256_and_si256(_mm256_srli_epi16::<7>(x), top));
                    for (h, w) in [w0, w1].into_iter().enumerate() {
                        let l = _mm256_madd_epi16(_mm256_maddubs_epi16(xl, w), ones);
                        let t = _mm256_madd_epi16(_mm256_maddubs_epi16(xh, w), ones);
                        row[h] = _mm256_add_epi32(row[h], _mm256_add_epi32(l, _mm256_slli_epi32::<7>(t)));
                    }
                }
            }
        }
        store_ymm(&c, rows, comp, acc);
    }

    #[inline(always)]
    unsafe fn store_ymm(c: &[[__m256i; 2]; 6], rows: usize, comp: *const i32, acc: *mut f32) {
        let (k0, k1) = (_mm256_loadu_si256(comp as *const __m256i), _mm256_loadu_si256(comp.add(8) as *const __m256i));
        for (i, row) in c.iter().enumerate().take(rows) {
            _mm256_storeu_ps(acc.add(i * 2 * NP), _mm256_cvtepi32_ps(_mm256_sub_epi32(row[0], k0)));
            _mm256_storeu_ps(acc.add(i * 2 * NP + 8), _mm256_cvtepi32_ps(_mm256_sub_epi32(row[1], k1)));
        }
    }
}
