//! bfloat16 convolutions: operands rounded to bf16, products summed in f32.
//!
//! A [`Bf16Conv`] is an explicit GEMM per block of output pixels: the block's input patches
//! (every tap of every input channel, converted to bf16) are gathered into a per-thread
//! panel `A` of `rows × kp` values (`kp` = taps × input channels rounded up to 32, zeros
//! past the end), multiplied by the pre-packed weights `B` (`kp × cout`, in the pair-
//! interleaved layout the AMX tile unit reads), and the f32 sums go through the same
//! epilogue as the f32 kernels (bias, optional residual, clamp, store into the output's
//! channel range). The maps between steps stay f32; only the convolutions' operands are bf16.
//!
//! Gathering only the pixels a step writes (not the padded border) lets small maps waste
//! nothing, and packing every tap into one K dimension keeps the tile unit busy on layers
//! with few channels (12 channels × 9 taps = 108 of K = 128) where per-tap K would be 3/8
//! empty.
//!
//! Two units compute the product ([`Bf16Unit`]): the AMX tile unit (`tdpbf16ps` on 32×32
//! blocks of output, four accumulator tiles), and a portable path that computes the same
//! bf16 products in f32 on any CPU (slow; it exists so that a bf16 plan runs, with bf16's
//! numerics, everywhere).

#![allow(unsafe_op_in_unsafe_fn)]

use std::sync::OnceLock;

use super::conv::{Phase, Split, range};
use super::plan::{Ctx, View};

/// What multiplies the bf16 operands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Bf16Unit {
    /// Intel AMX tiles (`amx_bf16`): 16×16 f32 accumulators, `tdpbf16ps`.
    Amx,
    /// AVX512-BF16 `vdpbf16ps`: pairs of bf16 products summed into 16 f32 lanes.
    Avx512Bf16,
    /// Plain Rust: the same bf16 products, summed in f32.
    Portable,
}

impl Bf16Unit {
    pub fn name(self) -> &'static str {
        match self {
            Bf16Unit::Amx => "amx",
            Bf16Unit::Avx512Bf16 => "avx512bf16",
            Bf16Unit::Portable => "portable",
        }
    }

    pub fn supported(self) -> bool {
        match self {
            Bf16Unit::Portable => true,
            Bf16Unit::Amx => amx_available(),
            Bf16Unit::Avx512Bf16 => avx512bf16_available(),
        }
    }

    /// The fastest unit this CPU has.
    pub fn detect() -> Bf16Unit {
        if amx_available() {
            Bf16Unit::Amx
        } else if avx512bf16_available() {
            Bf16Unit::Avx512Bf16
        } else {
            Bf16Unit::Portable
        }
    }
}

/// Whether the CPU has AVX512-BF16 (with the AVX-512 subsets its kernels use).
pub fn avx512bf16_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx512f")
            && std::is_x86_feature_detected!("avx512bw")
            && std::is_x86_feature_detected!("avx512vl")
            && std::is_x86_feature_detected!("avx512bf16")
            && std::is_x86_feature_detected!("avx2")
            && std::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether the CPU has AMX-BF16 and Linux lets this process use the tile data (asked once,
/// with `arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`).
pub fn amx_available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
        {
            use std::arch::x86_64::__cpuid_count;
            if !(std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("avx512bw") && std::is_x86_feature_detected!("avx512bf16")) {
                return false;
            }
            let leaf = __cpuid_count(7, 0);
            let (bf16, tile) = (leaf.edx & (1 << 22) != 0, leaf.edx & (1 << 24) != 0);
            if !(bf16 && tile) {
                return false;
            }
            const ARCH_REQ_XCOMP_PERM: i64 = 0x1023;
            const XFEATURE_XTILEDATA: i64 = 18;
            const SYS_ARCH_PRCTL: i64 = 158;
            let result: i64;
            // SAFETY: arch_prctl only changes this process's permitted extended state.
            unsafe {
                std::arch::asm!("syscall", inlateout("rax") SYS_ARCH_PRCTL => result, in("rdi") ARCH_REQ_XCOMP_PERM, in("rsi") XFEATURE_XTILEDATA,
                    lateout("rcx") _, lateout("r11") _, options(nostack));
            }
            result == 0
        }
        #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
        {
            false
        }
    })
}

/// `x` rounded to the nearest bfloat16 (ties to even), as its 16 bits; NaN stays NaN.
#[inline(always)]
pub fn to_bf16(x: f32) -> u16 {
    let bits = x.to_bits();
    if x.is_nan() {
        return ((bits >> 16) | 0x40) as u16;
    }
    let round = 0x7fff + ((bits >> 16) & 1);
    (bits.wrapping_add(round) >> 16) as u16
}

#[inline(always)]
pub fn from_bf16(x: u16) -> f32 {
    f32::from_bits((x as u32) << 16)
}

/// Output rows per register block (two 16-row tiles).
const MB: usize = 32;
/// K values per tile row.
const KT: usize = 32;
/// Output channels per weight panel.
const NP: usize = 16;

/// A convolution in bf16 (see the module docs). Output pixel `(y·up + a, x·up + b)` of phase
/// `(a, b)` sums, over the phase's taps `(dy, dx)`, input pixel `(y·stride + dy, x·stride +
/// dx)` times the tap's weights, for `(y, x)` over the `grid`.
#[derive(Debug, Clone)]
pub struct Bf16Conv {
    pub input: View,
    pub output: View,
    pub residual: Option<View>,
    pub phases: Vec<Phase>,
    pub stride: usize,
    pub up: usize,
    pub grid: (usize, usize),
    pub cin: usize,
    pub cout: usize,
    /// Taps × input channels, rounded up to [`KT`] on AMX, to 2 otherwise.
    pub kp: usize,
    /// Weight panels of [`NP`] output channels.
    pub panels: usize,
    /// `[phase][panel][kp / 2][NP][2]` bf16: rows of K pairs, as `tdpbf16ps` reads B.
    pub packed: Vec<u16>,
    /// `[phase][panels · NP]`.
    pub bias: Vec<f32>,
    pub min: f32,
    pub max: f32,
    /// Rows of A gathered at a time (a multiple of [`MB`]).
    pub rows: usize,
    /// Row mode (see [`Bf16Conv::row_mode`]): K values per kernel row (`k · cin` rounded up
    /// to [`KT`]); `None`: every tap gathered.
    pub row_k: Option<usize>,
    /// Where tap `t`'s `cin` values start in a row of A.
    pub tap_k: Vec<usize>,
    /// `[phase][tap]`: floats from a pixel of the padded input to the tap's pixel.
    pub offsets: Vec<Vec<isize>>,
    pub unit: Bf16Unit,
}

impl Bf16Conv {
    /// Packs `weight(phase, tap, c, o)` for the phases' taps.
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
        unit: Bf16Unit,
    ) -> Bf16Conv {
        let taps = phases[0].taps.len();
        debug_assert!(phases.iter().all(|p| p.taps.len() == taps));
        // The tiles take K in blocks of 32; vdpbf16ps and the portable path in pairs.
        let kt = if unit == Bf16Unit::Amx { KT } else { 2 };
        let row_k = Self::row_mode(&phases, stride, grid, input.w, unit).map(|k| (k * cin).div_ceil(kt) * kt);
        let (kp, tap_k) = k_layout(taps, cin, row_k, kt);
        let panels = cout.div_ceil(NP);
        let mut packed = vec![0u16; phases.len() * panels * kp * NP];
        let mut biases = vec![0f32; phases.len() * panels * NP];
        for p in 0..phases.len() {
            for panel in 0..panels {
                let dst = &mut packed[(p * panels + panel) * kp * NP..][..kp * NP];
                for (t, &k0) in tap_k.iter().enumerate() {
                    for c in 0..cin {
                        let k = k0 + c;
                        for j in 0..NP {
                            let o = panel * NP + j;
                            if o < cout {
                                dst[(k / 2) * 2 * NP + 2 * j + (k % 2)] = to_bf16(weight(p, t, c, o));
                            }
                        }
                    }
                }
            }
            for o in 0..cout {
                biases[p * panels * NP + o] = bias(p, o);
            }
        }
        // A block of A within a quarter of a core's L2 (with the panel pair it meets).
        let budget = super::compile::l2_bytes() / 4;
        let rows = (budget / (2 * kp) / MB).clamp(1, 32) * MB;
        let offsets = tap_offsets(&input, &phases);
        Bf16Conv { input, output, residual, phases, stride, up, grid, cin, cout, kp, panels, packed, bias: biases, min, max, rows, row_k, tap_k, offsets, unit }
    }

    /// The kernel size `k` when the AMX tiles can read A straight from bf16 copies of the
    /// input's rows: one phase of `k × k` taps centred on the pixel (`k` = 1 or 3), output
    /// rows a multiple of [`MB`] pixels (so a register block never crosses a row). Then the
    /// `k · cin` values of kernel row `dy` for consecutive output pixels are consecutive in
    /// the row copy, `stride · cin` apart, and a tile load with that row stride is the im2col
    /// block, with nothing gathered: the input is converted once per output row instead of
    /// once per tap. K then runs per kernel row, `k · cin` rounded up to [`KT`] (the values
    /// past `k · cin` are the next pixel's, met by zero weights).
    fn row_mode(phases: &[Phase], stride: usize, grid: (usize, usize), in_w: usize, unit: Bf16Unit) -> Option<usize> {
        if unit == Bf16Unit::Portable || grid.1 % MB != 0 {
            return None;
        }
        centred_kernel(phases, stride, grid.1, in_w)
    }

    /// u16 values of one converted input row, with slack for the last pixel's K tail.
    fn row_pitch(&self) -> usize {
        ((self.input.w + 2) * self.cin + 2 * KT).div_ceil(32) * 32
    }

    fn pairs(&self) -> usize {
        self.panels.div_ceil(2)
    }

    fn total_rows(&self, n: usize) -> usize {
        n * self.grid.0 * self.grid.1
    }

    /// Per-thread scratch in floats: a block of A, four accumulator tiles, alignment.
    pub fn scratch_floats(&self) -> usize {
        let a = match self.row_k {
            Some(kd) => (self.kp / kd) * self.row_pitch() / 2,
            None => self.rows * self.kp / 2,
        };
        a + 4 * 256 + 32
    }

    pub fn weight_bytes(&self) -> usize {
        self.packed.len() * 2 + self.bias.len() * 4
    }

    pub fn split(&self, n: usize, threads: usize) -> Split {
        let tiles = self.total_rows(n).div_ceil(MB);
        let weights = self.packed.len() * 2 / self.phases.len();
        let activations = self.total_rows(n) * self.kp * 2;
        if threads > 1 && weights > activations {
            // Deep layers on small maps: threads take different panels, so each weight is
            // read once.
            let groups = self.pairs().min((4 * threads).div_ceil(self.phases.len())).max(1);
            let chunks = if self.phases.len() * groups >= 2 * threads { 1 } else { (2 * threads).div_ceil(self.phases.len() * groups).min(tiles) };
            return Split { groups, chunks: chunks.max(1) };
        }
        Split::new(tiles, self.pairs(), self.phases.len(), threads, 2)
    }

    pub fn items(&self, split: Split) -> usize {
        self.phases.len() * split.groups * split.chunks
    }

    /// Runs work item `item` of `split`.
    ///
    /// # Safety
    /// `ctx` holds the step's buffers for `ctx.n` images; `scratch` holds
    /// [`Self::scratch_floats`] floats of this thread; `self.unit` is supported.
    pub unsafe fn run(&self, ctx: &Ctx, split: Split, item: usize, scratch: *mut f32) {
        let phase_index = item / (split.groups * split.chunks);
        let group = (item / split.chunks) % split.groups;
        let chunk = item % split.chunks;
        let (g_lo, g_hi) = range(self.pairs(), split.groups, group);
        let (p_lo, p_hi) = (2 * g_lo, (2 * g_hi).min(self.panels));
        let total = self.total_rows(ctx.n);
        let (t_lo, t_hi) = range(total.div_ceil(MB), split.chunks, chunk);
        let (r_lo, r_hi) = (t_lo * MB, (t_hi * MB).min(total));
        if r_lo >= r_hi || p_lo >= p_hi {
            return;
        }
        let aligned = scratch.add(scratch.align_offset(64));
        let acc = aligned;
        let a = aligned.add(4 * 256) as *mut u16;
        match self.unit {
            #[cfg(target_arch = "x86_64")]
            Bf16Unit::Amx => amx::run(self, ctx, phase_index, (p_lo, p_hi), (r_lo, r_hi), a, acc, true),
            #[cfg(target_arch = "x86_64")]
            Bf16Unit::Avx512Bf16 => amx::run(self, ctx, phase_index, (p_lo, p_hi), (r_lo, r_hi), a, acc, false),
            _ => self.run_portable(ctx, phase_index, (p_lo, p_hi), (r_lo, r_hi), a, acc),
        }
    }

    /// Where grid row `g` reads (the padded input position of its tap origin) and writes
    /// (the padded output position) for phase `phase`.
    #[inline(always)]
    fn positions(&self, g: usize, phase: &Phase) -> (usize, usize) {
        Rows::new(self, g, phase).positions()
    }

    /// The epilogue of one row of sums (`acc[j]` for output channel `o0 + j`).
    #[inline(always)]
    unsafe fn store_row(&self, ctx: &Ctx, phase_index: usize, g: usize, phase: &Phase, o0: usize, acc: &[f32]) {
        let (_, out_pos) = self.positions(g, phase);
        let dst = ctx.ptr(&self.output).add(out_pos * self.output.cs);
        let res = self.residual.as_ref().map(|r| ctx.ptr(r).add(out_pos * r.cs));
        let bias = &self.bias[phase_index * self.panels * NP..];
        for (j, &s) in acc.iter().enumerate().take(self.cout.saturating_sub(o0).min(acc.len())) {
            let o = o0 + j;
            let mut v = s + bias[o];
            if let Some(r) = res {
                v += *r.add(o);
            }
            *dst.add(o) = v.max(self.min).min(self.max);
        }
    }

    unsafe fn run_portable(&self, ctx: &Ctx, phase_index: usize, (p_lo, p_hi): (usize, usize), (r_lo, r_hi): (usize, usize), a: *mut u16, _acc: *mut f32) {
        let phase = &self.phases[phase_index];
        let offsets = &self.offsets[phase_index];
        let input = ctx.ptr(&self.input);
        let kp = self.kp;
        let mut sums = vec![0f32; NP];
        for g in r_lo..r_hi {
            let (in_pos, _) = self.positions(g, phase);
            let row = std::slice::from_raw_parts_mut(a, kp);
            row.fill(0);
            for (t, off) in offsets.iter().enumerate() {
                let src = input.offset(in_pos as isize * self.input.cs as isize + off);
                for c in 0..self.cin {
                    row[self.tap_k[t] + c] = to_bf16(*src.add(c));
                }
            }
            for panel in p_lo..p_hi {
                let b = &self.packed[(phase_index * self.panels + panel) * kp * NP..][..kp * NP];
                sums.fill(0.0);
                for k in 0..kp {
                    let x = from_bf16(row[k]);
                    if x == 0.0 {
                        continue;
                    }
                    let brow = &b[(k / 2) * 2 * NP + (k % 2)..];
                    for (j, s) in sums.iter_mut().enumerate() {
                        *s += x * from_bf16(brow[2 * j]);
                    }
                }
                self.store_row(ctx, phase_index, g, phase, panel * NP, &sums);
            }
        }
    }
}

/// `[phase][tap]`: floats from a pixel of the padded `input` to each tap's pixel (computed
/// once at compile time, not per work item).
pub(super) fn tap_offsets(input: &View, phases: &[Phase]) -> Vec<Vec<isize>> {
    let wp = (input.w + 2) as isize;
    phases.iter().map(|p| p.taps.iter().map(|&(dy, dx)| (dy * wp + dx) * input.cs as isize).collect()).collect()
}

/// Where each tap's `cin` values sit in a row of A, and the row's length `kp`: row mode
/// (`row_k` = `Some(kd)`) lays out `k` kernel rows of `kd` values (tap `t` at `(t / k)·kd + (t %
/// k)·cin`); gather mode every tap after the other, rounded up to `kt`.
pub(super) fn k_layout(taps: usize, cin: usize, row_k: Option<usize>, kt: usize) -> (usize, Vec<usize>) {
    match row_k {
        Some(kd) => {
            let k = (taps as f64).sqrt() as usize;
            (k * kd, (0..taps).map(|t| (t / k) * kd + (t % k) * cin).collect())
        }
        None => ((taps * cin).div_ceil(kt) * kt, (0..taps).map(|t| t * cin).collect()),
    }
}

/// `k` when `phases` is one phase of `k × k` taps centred on the pixel (`k` = 1 or 3) and
/// a row of `gw` outputs at `stride` reads inside a padded input row `in_w + 2` wide.
pub(super) fn centred_kernel(phases: &[Phase], stride: usize, gw: usize, in_w: usize) -> Option<usize> {
    if phases.len() != 1 {
        return None;
    }
    let taps = &phases[0].taps;
    let k = match taps.len() {
        1 => 1,
        9 => 3,
        _ => return None,
    };
    let pad = (k / 2) as isize;
    let centred = taps.iter().enumerate().all(|(t, &(dy, dx))| dy == (t / k) as isize - pad && dx == (t % k) as isize - pad);
    // Every read stays inside the padded row (the last pixel's window ends at its edge).
    (centred && stride * (gw - 1) + k <= in_w + 2).then_some(k)
}

/// The `k` (at most 3) converted input rows a row-mode output row reads, kept in `k` slots
/// of scratch: a 3×3 stride-1 layer converts each input row once, not once per output row it
/// feeds.
pub(super) struct RowSlots {
    /// The padded input row (of the whole batch) each slot holds.
    held: [usize; 3],
}

impl RowSlots {
    pub(super) fn new() -> RowSlots {
        RowSlots { held: [usize::MAX; 3] }
    }

    /// The slot of padded row `wanted(dy)` for each `dy < k`; `fill(slot, row)` converts the
    /// rows not yet held into slots no wanted row is in.
    #[inline(always)]
    pub(super) fn place(&mut self, k: usize, wanted: impl Fn(usize) -> usize, mut fill: impl FnMut(usize, usize)) -> [usize; 3] {
        let mut slot = [usize::MAX; 3];
        let mut taken = [false; 3];
        for dy in 0..k {
            if let Some(sl) = (0..k).find(|&sl| self.held[sl] == wanted(dy)) {
                slot[dy] = sl;
                taken[sl] = true;
            }
        }
        for dy in 0..k {
            if slot[dy] == usize::MAX {
                let sl = (0..k).find(|&sl| !taken[sl]).unwrap_or(dy);
                taken[sl] = true;
                slot[dy] = sl;
                self.held[sl] = wanted(dy);
                fill(sl, wanted(dy));
            }
        }
        slot
    }
}

/// Consecutive grid rows' input and output positions, without a division per row.
#[derive(Clone, Copy)]
pub(super) struct Rows {
    x: usize,
    gw: usize,
    input: usize,
    output: usize,
    /// Input positions from one grid column to the next, and from the end of a grid row to
    /// the next row's start (which may cross into the next image).
    in_step: usize,
    in_row_step: usize,
    out_step: usize,
    out_row_step: usize,
    y: usize,
    gh: usize,
    in_image_step: usize,
    out_image_step: usize,
}

impl Rows {
    #[inline(always)]
    fn new(conv: &Bf16Conv, g: usize, phase: &Phase) -> Rows {
        Rows::at(&conv.input, &conv.output, conv.grid, conv.stride, conv.up, g, phase)
    }

    /// Grid row `g` of a convolution from `input` to `output` over `grid`, reading with
    /// `stride` and writing phase `phase` of `up × up` output pixels per grid pixel.
    #[inline(always)]
    pub(super) fn at(input: &View, output: &View, grid: (usize, usize), s: usize, up: usize, g: usize, phase: &Phase) -> Rows {
        let (gh, gw) = grid;
        let (img, rem) = (g / (gh * gw), g % (gh * gw));
        let (y, x) = (rem / gw, rem % gw);
        let (iw, ih) = (input.w + 2, input.h + 2);
        let (ow, oh) = (output.w + 2, output.h + 2);
        let input = (img * ih + y * s + 1) * iw + x * s + 1;
        let output = (img * oh + y * up + phase.sub.0 + 1) * ow + x * up + phase.sub.1 + 1;
        Rows {
            x,
            gw,
            input,
            output,
            in_step: s,
            in_row_step: s * iw - s * (gw - 1),
            out_step: up,
            out_row_step: up * ow - up * (gw - 1),
            y,
            gh,
            // From the last grid row's start of one image to the first of the next.
            in_image_step: (ih - s * (gh - 1)) * iw - s * (gw - 1),
            out_image_step: (oh - up * (gh - 1)) * ow - up * (gw - 1),
        }
    }

    #[inline(always)]
    pub(super) fn positions(&self) -> (usize, usize) {
        (self.input, self.output)
    }

    #[inline(always)]
    pub(super) fn advance(&mut self) {
        self.x += 1;
        if self.x < self.gw {
            self.input += self.in_step;
            self.output += self.out_step;
            return;
        }
        self.x = 0;
        self.y += 1;
        if self.y < self.gh {
            self.input += self.in_row_step;
            self.output += self.out_row_step;
        } else {
            self.y = 0;
            self.input += self.in_image_step;
            self.output += self.out_image_step;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod amx {
    use std::arch::asm;
    use std::arch::x86_64::*;

    use super::{Bf16Conv, KT, MB, NP};
    use crate::engine::plan::Ctx;

    /// Palette 1, eight tiles of 16 rows × 64 bytes.
    #[repr(C, align(64))]
    struct TileConfig([u8; 64]);

    const CONFIG: TileConfig = {
        let mut c = [0u8; 64];
        c[0] = 1;
        let mut t = 0;
        while t < 8 {
            c[16 + 2 * t] = 64;
            c[48 + t] = 16;
            t += 1;
        }
        TileConfig(c)
    };

    /// The register blocks on the AMX tiles (`tiles`) or on `vdpbf16ps` (AVX512-BF16).
    ///
    /// # Safety
    /// AVX512-BF16 is available, and AMX (permitted) when `tiles`; the pointers are as
    /// [`Bf16Conv::run`] describes.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16,avx512vl")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn run(conv: &Bf16Conv, ctx: &Ctx, phase_index: usize, (p_lo, p_hi): (usize, usize), (r_lo, r_hi): (usize, usize), a: *mut u16, acc: *mut f32, tiles: bool) {
        let phase = &conv.phases[phase_index];
        let offsets = &conv.offsets[phase_index];
        let input = ctx.ptr(&conv.input);
        let kp = conv.kp;
        let kc = kp / KT;
        let lda = kp * 2;
        if tiles {
            asm!("ldtilecfg [{0}]", in(reg) CONFIG.0.as_ptr(), options(nostack, readonly));
        }
        if let Some(kd) = conv.row_k {
            run_rows(conv, ctx, (p_lo, p_hi), (r_lo, r_hi), kd, a, acc, tiles);
            if tiles {
                asm!("tilerelease", options(nostack, nomem));
            }
            return;
        }
        let mut block = r_lo;
        while block < r_hi {
            let rows = conv.rows.min(r_hi - block);
            gather(conv, input, &offsets, phase, block, rows, a);
            let mut panel = p_lo;
            while panel < p_hi {
                let pair = panel + 1 < p_hi;
                let b0 = conv.packed.as_ptr().add((phase_index * conv.panels + panel) * kp * NP);
                let b1 = b0.add(kp * NP);
                let mut m = 0;
                while m < rows {
                    let a0 = a.add(m * kp);
                    let a1 = a0.add(16 * kp);
                    if tiles {
                        zero_tiles();
                        if pair {
                            dot_2x2(a0, a1, b0, b1, kc, lda);
                        } else {
                            dot_2x1(a0, a1, b0, kc, lda);
                        }
                        store_tiles(acc);
                    } else {
                        vector_block(&[(a0, b0)], kp / 2, kp, kp * NP, pair, acc);
                    }
                    epilogue(conv, ctx, phase_index, block + m, (rows - m).min(MB), panel, pair, acc);
                    m += MB;
                }
                panel += 2;
            }
            block += rows;
        }
        if tiles {
            asm!("tilerelease", options(nostack, nomem));
        }
    }

    /// Row mode: for each output row, its `k` input rows converted to bf16 (`cin` values
    /// per pixel, border included), then every block of [`MB`] pixels × panel pair from tile
    /// loads that step `stride · cin` values per pixel through the row copies.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16,avx512vl")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn run_rows(conv: &Bf16Conv, ctx: &Ctx, (p_lo, p_hi): (usize, usize), (r_lo, r_hi): (usize, usize), kd: usize, rows: *mut u16, acc: *mut f32, tiles: bool) {
        let (gh, gw) = conv.grid;
        let k = conv.kp / kd;
        let pitch = conv.row_pitch();
        let (cin, s) = (conv.cin, conv.stride);
        let (iw, ih) = (conv.input.w + 2, conv.input.h + 2);
        let input = ctx.ptr(&conv.input);
        let lda = s * cin * 2;
        let chunks = kd / KT;
        let mut slots = super::RowSlots::new();
        let mut current = usize::MAX;
        let mut slot = [0usize; 3];
        let mut g = r_lo;
        while g < r_hi {
            let image_row = g / gw;
            let x0 = g % gw;
            if image_row != current {
                current = image_row;
                let (img, y) = (image_row / gh, image_row % gh);
                // Padded input row of kernel row dy: y·stride + 1 + dy − k/2.
                slot = slots.place(k, |dy| img * ih + y * s + 1 + dy - k / 2, |sl, row| {
                    convert_row(input.add(row * iw * conv.input.cs), iw, cin, conv.input.cs, rows.add(sl * pitch), pitch)
                });
            }
            let mut panel = p_lo;
            while panel < p_hi {
                let pair = panel + 1 < p_hi;
                let b = conv.packed.as_ptr().add(panel * conv.kp * NP);
                let b1 = b.add(conv.kp * NP);
                if !tiles {
                    let mut segments = [(rows as *const u16, b); 3];
                    for (dy, seg) in segments.iter_mut().enumerate().take(k) {
                        *seg = (rows.add(slot[dy] * pitch + (x0 * s + 1 - k / 2) * cin), b.add(dy * kd * NP));
                    }
                    vector_block(&segments[..k], kd / 2, s * cin, conv.kp * NP, pair, acc);
                    epilogue(conv, ctx, 0, g, MB.min(r_hi - g), panel, pair, acc);
                    panel += 2;
                    continue;
                }
                zero_tiles();
                for dy in 0..k {
                    // Padded column of the window's first tap: x·stride + 1 − k/2.
                    let a0 = rows.add(slot[dy] * pitch + (x0 * s + 1 - k / 2) * cin);
                    let a1 = a0.add(16 * s * cin);
                    if pair {
                        dot_2x2(a0, a1, b.add(dy * kd * NP), b1.add(dy * kd * NP), chunks, lda);
                    } else {
                        dot_2x1(a0, a1, b.add(dy * kd * NP), chunks, lda);
                    }
                }
                store_tiles(acc);
                epilogue(conv, ctx, 0, g, MB.min(r_hi - g), panel, pair, acc);
                panel += 2;
            }
            g += MB;
        }
    }

    /// [`MB`] rows × one or two panels of sums into `acc` in the tiles' layout (row `r` of
    /// panel `j` at `acc + (2·(r / 16) + j)·256 + (r % 16)·16`) with `vdpbf16ps`: over the
    /// `segments` (A of row 0, `lda` values per row; B of panel 0, the second panel
    /// `b_next` values on), `pairs` K pairs each. Eight rows × two panels or 16 rows × one
    /// at a time: 16 accumulators, the weight vectors and one broadcast pair of A per step.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16,avx512vl")]
    unsafe fn vector_block(segments: &[(*const u16, *const u16)], pairs: usize, lda: usize, b_next: usize, pair: bool, acc: *mut f32) {
        if pair {
            for r0 in (0..MB).step_by(8) {
                vector_rows::<8, 2>(segments, pairs, lda, b_next, r0, acc);
            }
        } else {
            for r0 in (0..MB).step_by(16) {
                vector_rows::<16, 1>(segments, pairs, lda, b_next, r0, acc);
            }
        }
    }

    #[inline(always)]
    unsafe fn vector_rows<const R: usize, const P: usize>(segments: &[(*const u16, *const u16)], pairs: usize, lda: usize, b_next: usize, r0: usize, acc: *mut f32) {
        let mut c = [[_mm512_setzero_ps(); P]; R];
        for &(a, b) in segments {
            let a = a.add(r0 * lda);
            for q in 0..pairs {
                let mut w = [_mm512_setzero_si512(); P];
                for (j, w) in w.iter_mut().enumerate() {
                    *w = _mm512_loadu_si512(b.add(j * b_next + q * 2 * NP) as *const __m512i);
                }
                for (i, row) in c.iter_mut().enumerate() {
                    let x = _mm512_set1_epi32((a.add(i * lda + 2 * q) as *const i32).read_unaligned());
                    for j in 0..P {
                        row[j] = _mm512_dpbf16_ps(row[j], std::mem::transmute::<__m512i, __m512bh>(x), std::mem::transmute::<__m512i, __m512bh>(w[j]));
                    }
                }
            }
        }
        for (i, row) in c.iter().enumerate() {
            let r = r0 + i;
            for (j, v) in row.iter().enumerate() {
                _mm512_storeu_ps(acc.add((2 * (r / 16) + j) * 256 + (r % 16) * 16), *v);
            }
        }
    }

    #[inline(always)]
    unsafe fn zero_tiles() {
        asm!("tilezero tmm0", "tilezero tmm1", "tilezero tmm2", "tilezero tmm3", options(nostack, nomem));
    }

    /// The four accumulator tiles to `acc`: tile (m, j) (row block m, panel j) at
    /// `acc + (2m + j)·256` floats, 16 floats per row.
    #[inline(always)]
    unsafe fn store_tiles(acc: *mut f32) {
        asm!(
            "tilestored [{c} + {ldc}*1], tmm0",
            "tilestored [{c1} + {ldc}*1], tmm1",
            "tilestored [{c2} + {ldc}*1], tmm2",
            "tilestored [{c3} + {ldc}*1], tmm3",
            ldc = in(reg) 64usize, c = in(reg) acc, c1 = in(reg) acc.add(256), c2 = in(reg) acc.add(512), c3 = in(reg) acc.add(768),
            options(nostack),
        );
    }

    /// Accumulates rows 0–15 (`a0`) and 16–31 (`a1`) of A, `lda` bytes per row, times the
    /// panels `b0` and `b1` (pair-interleaved, 1 KB per K block) into tiles 0–3, over `chunks`
    /// K blocks of [`KT`].
    #[inline(always)]
    unsafe fn dot_2x2(a0: *const u16, a1: *const u16, b0: *const u16, b1: *const u16, chunks: usize, lda: usize) {
        asm!(
            "2:",
            "tileloadd tmm4, [{a0} + {lda}*1]",
            "tileloadd tmm6, [{b0} + {ldb}*1]",
            "tdpbf16ps tmm0, tmm4, tmm6",
            "tileloadd tmm7, [{b1} + {ldb}*1]",
            "tdpbf16ps tmm1, tmm4, tmm7",
            "tileloadd tmm5, [{a1} + {lda}*1]",
            "tdpbf16ps tmm2, tmm5, tmm6",
            "tdpbf16ps tmm3, tmm5, tmm7",
            "add {a0}, 64", "add {a1}, 64", "add {b0}, 1024", "add {b1}, 1024",
            "dec {k}", "jnz 2b",
            a0 = inout(reg) a0 => _, a1 = inout(reg) a1 => _, b0 = inout(reg) b0 => _, b1 = inout(reg) b1 => _,
            k = inout(reg) chunks => _, lda = in(reg) lda, ldb = in(reg) 64usize,
            options(nostack, readonly),
        );
    }

    /// [`dot_2x2`] with one panel: tiles 0 and 2.
    #[inline(always)]
    unsafe fn dot_2x1(a0: *const u16, a1: *const u16, b0: *const u16, chunks: usize, lda: usize) {
        asm!(
            "2:",
            "tileloadd tmm6, [{b0} + {ldb}*1]",
            "tileloadd tmm4, [{a0} + {lda}*1]",
            "tdpbf16ps tmm0, tmm4, tmm6",
            "tileloadd tmm5, [{a1} + {lda}*1]",
            "tdpbf16ps tmm2, tmm5, tmm6",
            "add {a0}, 64", "add {a1}, 64", "add {b0}, 1024",
            "dec {k}", "jnz 2b",
            a0 = inout(reg) a0 => _, a1 = inout(reg) a1 => _, b0 = inout(reg) b0 => _,
            k = inout(reg) chunks => _, lda = in(reg) lda, ldb = in(reg) 64usize,
            options(nostack, readonly),
        );
    }

    /// One padded input row (`w` pixels, `cin` of every `cs` channels) as bf16, `cin` values
    /// per pixel; zeros to `pitch`.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16,avx512vl")]
    unsafe fn convert_row(src: *const f32, w: usize, cin: usize, cs: usize, dst: *mut u16, pitch: usize) {
        let cvt = |x: __m512| std::mem::transmute::<__m256bh, __m256i>(_mm512_cvtneps_pbh(x));
        let run = |src: *const f32, dst: *mut u16, n: usize| {
            let mut i = 0;
            while i + 16 <= n {
                _mm256_storeu_si256(dst.add(i) as *mut __m256i, cvt(_mm512_loadu_ps(src.add(i))));
                i += 16;
            }
            if i < n {
                let mask: __mmask16 = ((1u32 << (n - i)) - 1) as __mmask16;
                _mm256_mask_storeu_epi16(dst.add(i) as *mut i16, mask, cvt(_mm512_maskz_loadu_ps(mask, src.add(i))));
            }
        };
        if cs == cin {
            run(src, dst, w * cin);
        } else {
            for px in 0..w {
                run(src.add(px * cs), dst.add(px * cin), cin);
            }
        }
        std::ptr::write_bytes(dst.add(w * cin), 0, pitch - w * cin);
    }

    /// Gathers rows `g0..g0 + rows` of A (bf16 patches, zeros past taps × cin).
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16,avx512vl")]
    unsafe fn gather(conv: &Bf16Conv, input: *const f32, offsets: &[isize], phase: &crate::engine::conv::Phase, g0: usize, rows: usize, a: *mut u16) {
        let (cin, kp, cs) = (conv.cin, conv.kp, conv.input.cs as isize);
        let used = offsets.len() * cin;
        let full = cin / 16;
        let tail = cin % 16;
        let tail_mask: __mmask16 = ((1u32 << tail) - 1) as __mmask16;
        let mut cursor = super::Rows::new(conv, g0, phase);
        for r in 0..rows {
            let (in_pos, _) = cursor.positions();
            cursor.advance();
            let row = a.add(r * kp);
            for (t, &off) in offsets.iter().enumerate() {
                let src = input.offset(in_pos as isize * cs + off);
                let dst = row.add(t * cin);
                for v in 0..full {
                    let x = _mm512_loadu_ps(src.add(16 * v));
                    _mm256_storeu_si256(dst.add(16 * v) as *mut __m256i, std::mem::transmute::<__m256bh, __m256i>(_mm512_cvtneps_pbh(x)));
                }
                if tail != 0 {
                    let x = _mm512_maskz_loadu_ps(tail_mask, src.add(16 * full));
                    _mm256_mask_storeu_epi16(dst.add(16 * full) as *mut i16, tail_mask, std::mem::transmute::<__m256bh, __m256i>(_mm512_cvtneps_pbh(x)));
                }
            }
            let mut k = used;
            while k < kp {
                let n = (kp - k).min(32);
                _mm512_mask_storeu_epi16(row.add(k) as *mut i16, ((1u64 << n) - 1) as __mmask32, _mm512_setzero_si512());
                k += n;
            }
        }
        // Rows of the last register block past the end: zeros, so the tiles see numbers.
        let padded = rows.div_ceil(MB) * MB;
        if padded > rows {
            std::ptr::write_bytes(a.add(rows * kp), 0, (padded - rows) * kp);
        }
    }

    /// Bias, residual, clamp and store of `rows` rows from the accumulator tiles.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16,avx512vl")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn epilogue(conv: &Bf16Conv, ctx: &Ctx, phase_index: usize, g0: usize, rows: usize, panel: usize, pair: bool, acc: *const f32) {
        let phase = &conv.phases[phase_index];
        let out_base = ctx.ptr(&conv.output);
        let res_base = conv.residual.as_ref().map(|r| (ctx.ptr(r), r.cs));
        let bias = conv.bias.as_ptr().add(phase_index * conv.panels * NP);
        let (lo, hi) = (_mm512_set1_ps(conv.min), _mm512_set1_ps(conv.max));
        let panels = if pair { 2 } else { 1 };
        let mut cursor = super::Rows::new(conv, g0, phase);
        for r in 0..rows {
            let (_, out_pos) = cursor.positions();
            cursor.advance();
            let dst = out_base.add(out_pos * conv.output.cs);
            // Tile (m, j) at acc + (2m + j)·256 floats, 16 floats per row.
            let (m, rr) = (r / 16, r % 16);
            for j in 0..panels {
                let o0 = (panel + j) * NP;
                if o0 >= conv.cout {
                    break;
                }
                let count = (conv.cout - o0).min(NP);
                let mask: __mmask16 = ((1u32 << count) - 1) as __mmask16;
                let mut v = _mm512_loadu_ps(acc.add((2 * m + j) * 256 + rr * 16));
                v = _mm512_add_ps(v, _mm512_loadu_ps(bias.add(o0)));
                if let Some((res, res_cs)) = res_base {
                    v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, res.add(out_pos * res_cs + o0)));
                }
                v = _mm512_min_ps(_mm512_max_ps(v, lo), hi);
                _mm512_mask_storeu_ps(dst.add(o0), mask, v);
            }
        }
    }
}
