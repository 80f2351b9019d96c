//! Direct convolutions on padded NHWC maps, as an implicit GEMM over [`gemm::tile`]: output
//! pixels are the broadcast rows (read straight from the input map, one segment per kernel
//! tap), output channels the pre-packed panels. Three position schemes cover the networks:
//!
//! - [`Positions::Flat`]: stride 1. Positions run over the *flattened* padded input of the
//!   whole batch, so a tile of `MR` pixels may cross rows and images; border positions are
//!   computed and thrown away. With `up = 2` each of four *phases* writes every other pixel
//!   of a map twice the size: a ConvTranspose(k4, s2, p1) is four 2×2 phase convolutions,
//!   and a 1×1 convolution followed by depth-to-space is four 1×1 phases.
//! - [`Positions::Strided`]: stride > 1, tiles along each output row, the broadcast rows
//!   `stride` pixels apart.
//!
//! The epilogue adds the bias, an optional residual map, clamps (ReLU/ReLU6) and stores into
//! the output's channel range (a concatenation buffer is written in place). [`SmallKConv`]
//! is the same for layers with at most [`SMALL_K`] output channels (the logits), vectorized
//! over input channels instead.

#![allow(unsafe_op_in_unsafe_fn)]

use super::gemm::{self, tile, tile_rows};
use super::plan::{Ctx, View};
use super::simd::Simd;

/// The kernel taps of a k4, stride-2, padding-1 pairing per phase along one dimension: pixel
/// `i` of the small map meets pixel `2i − 1 + t` of the large one through tap `t`, so the
/// large map's even pixels (phase 0) meet taps `[1, 3]` (at `2i`, `2i + 2`) and its odd ones
/// (phase 1) taps `[0, 2]` (at `2i − 1`, `2i + 1`). A ConvTranspose(k4, s2, p1), its input
/// gradient and its weight gradient all split into these four 2×2 phases.
pub const K4S2_PHASE_TAPS: [[usize; 2]; 2] = [[1, 3], [0, 2]];

/// Layers with at most this many output channels use [`SmallKConv`].
pub const SMALL_K: usize = 4;

/// How the tiles of a direct convolution map to pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Positions {
    /// Stride 1 over the flattened padded input; outputs on a map `up`× the input's size.
    Flat { up: usize },
    /// Output rows of a strided convolution whose top-left tap is at `(y·stride − pad,
    /// x·stride − pad)`.
    Strided { stride: usize, pad: usize },
    /// Stride 1 like `Flat`, but tiles of [`ROW_TILE`] pixels along each row: on 8-pixel-wide
    /// maps a flat tile would spend a quarter of its rows on border pixels.
    Rows { up: usize },
}

/// Pixels per tile in [`Positions::Rows`] (AVX-512, two-vector panels).
pub const ROW_TILE: usize = 8;

/// One phase: the taps it sums (input offsets in pixels `(dy, dx)` relative to the
/// position) and the sub-pixel it writes when the output is up-sampled.
#[derive(Debug, Clone)]
pub struct Phase {
    pub taps: Vec<(isize, isize)>,
    pub sub: (usize, usize),
}

/// A dense convolution computed directly (see the module docs).
#[derive(Debug, Clone)]
pub struct DirectConv {
    pub input: View,
    pub output: View,
    /// Added before the activation (same map as the output).
    pub residual: Option<View>,
    pub positions: Positions,
    pub phases: Vec<Phase>,
    pub cin: usize,
    pub cout: usize,
    /// Vectors per weight panel.
    pub nv: usize,
    pub lanes: usize,
    /// `[phase][panel][tap][cin][nv·lanes]`.
    pub packed: Vec<f32>,
    /// `[phase][panel·nv·lanes]`.
    pub bias: Vec<f32>,
    pub min: f32,
    pub max: f32,
}

/// Work split of one step: `groups` of output-channel panels times position chunks.
#[derive(Debug, Clone, Copy)]
pub struct Split {
    pub groups: usize,
    pub chunks: usize,
}

impl Split {
    /// Enough items for `threads` to share dynamically, none smaller than `min_tiles` tiles.
    pub fn new(tiles: usize, panels: usize, outer: usize, threads: usize, min_tiles: usize) -> Split {
        if threads <= 1 {
            return Split { groups: 1, chunks: 1 };
        }
        let want = 4 * threads;
        let chunks = (want / outer.max(1)).clamp(1, tiles.div_ceil(min_tiles).max(1));
        let groups = if outer * chunks >= 2 * threads { 1 } else { panels.min((2 * threads).div_ceil(outer * chunks)).max(1) };
        Split { groups, chunks }
    }
}

impl DirectConv {
    pub fn panels(&self) -> usize {
        self.cout.div_ceil(self.nv * self.lanes)
    }

    fn tap_offsets(&self, phase: &Phase) -> Vec<isize> {
        let wp = (self.input.w + 2) as isize;
        phase.taps.iter().map(|&(dy, dx)| (dy * wp + dx) * self.input.cs as isize).collect()
    }

    /// Tiles of the whole batch: along the flattened map, or per output row.
    fn tiles(&self, n: usize, mr: usize) -> (usize, usize) {
        match self.positions {
            Positions::Flat { .. } => {
                let wp = self.input.w + 2;
                let span = n * self.input.positions() - 2 * (wp + 1);
                (span.div_ceil(mr), 1)
            }
            Positions::Strided { .. } => (n * self.output.h, self.output.w.div_ceil(mr)),
            Positions::Rows { .. } => (n * self.input.h, self.input.w.div_ceil(mr)),
        }
    }

    pub fn mr(&self) -> usize {
        match self.positions {
            Positions::Rows { .. } => ROW_TILE,
            _ if self.narrow_strided() => ROW_TILE,
            _ => tile_rows(self.lanes, self.nv),
        }
    }

    /// A strided convolution on AVX-512 with two-vector panels whose output rows fill
    /// [`ROW_TILE`]-pixel tiles better than 12-pixel ones, by more than the 8-pixel tile's
    /// lower rate (taken as 85% of the 12-pixel one's): rows of at most 8 pixels (a 12-pixel
    /// tile would spend a third of its rows past the row's end) and 16-pixel rows (12 + 4:
    /// two thirds used; the input gradient of mobilenetv2_unet's 16² → 32² transposed layer).
    fn narrow_strided(&self) -> bool {
        if !(matches!(self.positions, Positions::Strided { .. }) && self.lanes == 16 && self.nv == 2) {
            return false;
        }
        let w = self.output.w;
        let filled = |mr: usize| w as f64 / w.div_ceil(mr) as f64 / mr as f64;
        filled(12) < 0.85 * filled(ROW_TILE)
    }

    pub fn split(&self, n: usize, threads: usize) -> Split {
        let (rows, per_row) = self.tiles(n, self.mr());
        let tiles = rows * per_row;
        // When the weights outweigh the activations (deep layers, small batches), threads
        // take different panels, so each weight is streamed from memory once, not once per
        // thread.
        let weights = self.packed.len() / self.phases.len();
        let activations = n * self.input.positions() * self.cin;
        if threads > 1 && weights > activations {
            let want = 4 * threads;
            let groups = self.panels().min(want.div_ceil(self.phases.len())).max(1);
            let chunks = if self.phases.len() * groups >= 2 * threads { 1 } else { (2 * threads).div_ceil(self.phases.len() * groups).min(tiles) };
            return Split { groups, chunks: chunks.max(1) };
        }
        Split::new(tiles, self.panels(), self.phases.len(), threads, 4)
    }

    pub fn items(&self, split: Split) -> usize {
        self.phases.len() * split.groups * split.chunks
    }

    /// Runs work item `item` of `split`.
    ///
    /// # Safety
    /// `ctx` must point at an arena laid out for this plan and batch; `S` must be available.
    #[inline(always)]
    pub unsafe fn run<S: Simd>(&self, ctx: &Ctx, split: Split, item: usize) {
        if matches!(self.positions, Positions::Rows { .. }) || (self.narrow_strided() && S::LANES == 16) {
            // Chosen only for 16 lanes and two-vector panels (see the compiler).
            return self.run_shape::<S, ROW_TILE, 2>(ctx, split, item);
        }
        match (S::LANES, self.nv) {
            (16, 2) => self.run_shape::<S, 12, 2>(ctx, split, item),
            (16, _) => self.run_shape::<S, 24, 1>(ctx, split, item),
            (_, 2) => self.run_shape::<S, 6, 2>(ctx, split, item),
            _ => self.run_shape::<S, 12, 1>(ctx, split, item),
        }
    }

    #[inline(always)]
    unsafe fn run_shape<S: Simd, const MR: usize, const NV: usize>(&self, ctx: &Ctx, split: Split, item: usize) {
        debug_assert_eq!(MR, self.mr());
        let phase_index = item / (split.groups * split.chunks);
        let group = (item / split.chunks) % split.groups;
        let chunk = item % split.chunks;
        let phase = &self.phases[phase_index];
        let offsets = self.tap_offsets(phase);
        let panels = self.panels();
        let nr = NV * S::LANES;
        let (p_lo, p_hi) = range(panels, split.groups, group);
        let n = ctx.n;
        let input = ctx.ptr(&self.input);
        let output = ctx.ptr(&self.output);
        let residual = self.residual.as_ref().map(|r| ctx.ptr(r));
        let weights = self.packed.as_ptr().add(phase_index * panels * phase.taps.len() * self.cin * nr);
        let bias = self.bias.as_ptr().add(phase_index * panels * nr);
        let panel_len = phase.taps.len() * self.cin * nr;
        let (rows, per_row) = self.tiles(n, MR);
        let (t_lo, t_hi) = range(rows * per_row, split.chunks, chunk);
        let cs_in = self.input.cs;
        let res_cs = self.residual.as_ref().map_or(0, |r| r.cs);
        let out = Out { output, cs: self.output.cs, cout: self.cout, bias, residual, res_cs, min: self.min, max: self.max };
        match self.positions {
            Positions::Flat { up } => {
                let (w, h) = (self.input.w, self.input.h);
                let wp = w + 2;
                let per_image = self.input.positions();
                let first = wp + 1;
                let last = n * per_image - wp - 1;
                let (ow, oh) = (w * up, h * up);
                let out_per_image = (oh + 2) * (ow + 2);
                // Panels outer: each weight panel is read once per item and stays in cache
                // while the item's tiles stream past it.
                for p in p_lo..p_hi {
                    for t in t_lo..t_hi {
                        let q0 = first + t * MR;
                        // Where each row of the tile goes (None: a border or past the end).
                        let mut targets = [None; MR];
                        let (mut img, mut local) = (q0 / per_image, q0 % per_image);
                        let (mut py, mut px) = (local / wp, local % wp);
                        let mut any = false;
                        for (r, target) in targets.iter_mut().enumerate() {
                            if q0 + r < last && py >= 1 && py <= h && px >= 1 && px <= w {
                                let out = if up == 1 {
                                    q0 + r
                                } else {
                                    img * out_per_image + ((py - 1) * up + phase.sub.0 + 1) * (ow + 2) + (px - 1) * up + phase.sub.1 + 1
                                };
                                *target = Some((out, Some(q0 + r)));
                                any = true;
                            }
                            local += 1;
                            px += 1;
                            if px == wp {
                                px = 0;
                                py += 1;
                            }
                            if local == per_image {
                                local = 0;
                                img += 1;
                                py = 0;
                                px = 0;
                            }
                        }
                        if !any {
                            continue;
                        }
                        let acc = tile::<S, MR, NV>(input.add(q0 * cs_in), cs_in, &offsets, self.cin, weights.add(p * panel_len));
                        out.store::<S, MR, NV>(&acc, &targets, p);
                    }
                }
            }
            Positions::Rows { up } => {
                let (w, h) = (self.input.w, self.input.h);
                let wp = w + 2;
                let per_image = self.input.positions();
                let (ow, oh) = (w * up, h * up);
                let out_per_image = (oh + 2) * (ow + 2);
                for p in p_lo..p_hi {
                    for t in t_lo..t_hi {
                        let (row, col) = (t / per_row, t % per_row);
                        let (img, y) = (row / h, row % h);
                        let x0 = col * MR;
                        let q0 = img * per_image + (y + 1) * wp + x0 + 1;
                        let mut targets = [None; MR];
                        for (r, target) in targets.iter_mut().enumerate() {
                            if x0 + r < w {
                                let out = if up == 1 {
                                    q0 + r
                                } else {
                                    img * out_per_image + (y * up + phase.sub.0 + 1) * (ow + 2) + (x0 + r) * up + phase.sub.1 + 1
                                };
                                *target = Some((out, Some(q0 + r)));
                            }
                        }
                        let acc = tile::<S, MR, NV>(input.add(q0 * cs_in), cs_in, &offsets, self.cin, weights.add(p * panel_len));
                        out.store::<S, MR, NV>(&acc, &targets, p);
                    }
                }
            }
            Positions::Strided { stride, pad } => {
                let wp = self.input.w + 2;
                let per_image = self.input.positions();
                let (ow, oh) = (self.output.w, self.output.h);
                let out_per_image = self.output.positions();
                for p in p_lo..p_hi {
                    for t in t_lo..t_hi {
                        let (row, col) = (t / per_row, t % per_row);
                        let (img, oy) = (row / oh, row % oh);
                        let ox0 = col * MR;
                        let mut targets = [None; MR];
                        for (r, target) in targets.iter_mut().enumerate() {
                            if ox0 + r < ow {
                                *target = Some((img * out_per_image + (oy + 1) * (ow + 2) + ox0 + r + 1, None));
                            }
                        }
                        // Padded coordinates of the top-left tap of the first pixel.
                        let q = img * per_image + (oy * stride + 1 - pad) * wp + ox0 * stride + 1 - pad;
                        let acc = tile::<S, MR, NV>(input.add(q * cs_in), stride * cs_in, &offsets, self.cin, weights.add(p * panel_len));
                        out.store::<S, MR, NV>(&acc, &targets, p);
                    }
                }
            }
        }
    }
}

/// Where a tile's results go: the epilogue of [`DirectConv`] (a function, not a closure, so
/// that it is compiled with the caller's instruction set).
struct Out {
    output: *mut f32,
    cs: usize,
    cout: usize,
    bias: *const f32,
    residual: Option<*mut f32>,
    res_cs: usize,
    min: f32,
    max: f32,
}

impl Out {
    /// Adds bias (and the residual), clamps and stores each row with a target: `(output
    /// position, residual position)`.
    #[inline(always)]
    unsafe fn store<S: Simd, const MR: usize, const NV: usize>(&self, acc: &[[S::V; NV]; MR], targets: &[Option<(usize, Option<usize>)>; MR], panel: usize) {
        let (lo, hi) = (S::splat(self.min), S::splat(self.max));
        let k0 = panel * NV * S::LANES;
        for (r, target) in targets.iter().enumerate() {
            let Some((out_pos, res_pos)) = *target else { continue };
            let dst = self.output.add(out_pos * self.cs + k0);
            for j in 0..NV {
                let k = k0 + j * S::LANES;
                if k >= self.cout {
                    break;
                }
                let mut v = S::add(acc[r][j], S::load(self.bias.add(k)));
                if let (Some(res), Some(rp)) = (self.residual, res_pos) {
                    v = S::add(v, S::load_n(res.add(rp * self.res_cs + k), self.cout - k));
                }
                v = S::min(S::max(v, lo), hi);
                S::store_n(dst.add(j * S::LANES), v, self.cout - k);
            }
        }
    }
}

/// Part `i` of `parts` of `0..total`.
pub fn range(total: usize, parts: usize, i: usize) -> (usize, usize) {
    (total * i / parts, total * (i + 1) / parts)
}

/// Packs the weights of one phase for [`DirectConv`]: `w(tap, c, k)`.
pub fn pack_phase(taps: usize, cin: usize, cout: usize, nr: usize, w: impl Fn(usize, usize, usize) -> f32) -> Vec<f32> {
    gemm::pack_panels(taps, cin, cout, nr, w)
}

/// A convolution with few output channels (the logits): each output is a dot product over
/// taps × input channels, vectorized along the channels, four pixels at a time.
#[derive(Debug, Clone)]
pub struct SmallKConv {
    pub input: View,
    pub output: View,
    /// Flat positions only (`up` 1 or 2).
    pub up: usize,
    pub phases: Vec<Phase>,
    pub cin: usize,
    pub cout: usize,
    pub lanes: usize,
    /// Input channels rounded up to whole vectors.
    pub cin_padded: usize,
    /// `[phase][k][tap][cin_padded]`, zero-padded.
    pub weights: Vec<f32>,
    /// `[phase][k]`.
    pub bias: Vec<f32>,
    pub min: f32,
    pub max: f32,
}

/// Pixels per [`SmallKConv`] tile: accumulators for `rows × k` plus `k` weight vectors fit
/// the registers (32 on AVX-512, 16 otherwise).
fn small_k_rows(lanes: usize) -> usize {
    if lanes == 16 { 8 } else { 4 }
}

impl SmallKConv {
    fn tiles(&self, n: usize) -> usize {
        let wp = self.input.w + 2;
        (n * self.input.positions() - 2 * (wp + 1)).div_ceil(small_k_rows(self.lanes))
    }

    pub fn split(&self, n: usize, threads: usize) -> Split {
        Split::new(self.tiles(n), 1, self.phases.len(), threads, 16)
    }

    pub fn items(&self, split: Split) -> usize {
        self.phases.len() * split.chunks
    }

    /// # Safety
    /// As [`DirectConv::run`].
    #[inline(always)]
    pub unsafe fn run<S: Simd>(&self, ctx: &Ctx, split: Split, item: usize) {
        match (S::LANES, self.cout) {
            (16, 1) => self.run_k::<S, 1, 8>(ctx, split, item),
            (16, 2) => self.run_k::<S, 2, 8>(ctx, split, item),
            (16, 3) => self.run_k::<S, 3, 8>(ctx, split, item),
            (16, _) => self.run_k::<S, 4, 8>(ctx, split, item),
            (_, 1) => self.run_k::<S, 1, 4>(ctx, split, item),
            (_, 2) => self.run_k::<S, 2, 4>(ctx, split, item),
            (_, 3) => self.run_k::<S, 3, 4>(ctx, split, item),
            _ => self.run_k::<S, 4, 4>(ctx, split, item),
        }
    }

    #[inline(always)]
    unsafe fn run_k<S: Simd, const K: usize, const R: usize>(&self, ctx: &Ctx, split: Split, item: usize) {
        debug_assert!(self.cout == K && R == small_k_rows(S::LANES));
        let phase_index = item / split.chunks;
        let chunk = item % split.chunks;
        let phase = &self.phases[phase_index];
        let n = ctx.n;
        let input = ctx.ptr(&self.input);
        let output = ctx.ptr(&self.output);
        let (w, h) = (self.input.w, self.input.h);
        let wp = w + 2;
        let per_image = self.input.positions();
        let first = wp + 1;
        let last = n * per_image - wp - 1;
        let (ow, oh) = (w * self.up, h * self.up);
        let out_per_image = (oh + 2) * (ow + 2);
        let cs = self.input.cs;
        let ntaps = phase.taps.len();
        let weights = self.weights.as_ptr().add(phase_index * K * ntaps * self.cin_padded);
        let bias = &self.bias[phase_index * K..][..K];
        let (t_lo, t_hi) = range(self.tiles(n), split.chunks, chunk);
        for t in t_lo..t_hi {
            let q0 = first + t * R;
            let mut acc = [[S::zero(); K]; R];
            let a = input.add(q0 * cs);
            for (ti, &(dy, dx)) in phase.taps.iter().enumerate() {
                let at = a.offset((dy * wp as isize + dx) * cs as isize);
                let mut c = 0;
                while c < self.cin {
                    let valid = self.cin - c;
                    let mut wv = [S::zero(); K];
                    for (k, v) in wv.iter_mut().enumerate() {
                        *v = S::load(weights.add((k * ntaps + ti) * self.cin_padded + c));
                    }
                    for (r, row) in acc.iter_mut().enumerate() {
                        let x = S::load_n(at.add(r * cs + c), valid);
                        for k in 0..K {
                            row[k] = S::fma(x, wv[k], row[k]);
                        }
                    }
                    c += S::LANES;
                }
            }
            for (r, row) in acc.iter().enumerate() {
                let q = q0 + r;
                let (img, local) = (q / per_image, q % per_image);
                let (py, px) = (local / wp, local % wp);
                if q >= last || py < 1 || py > h || px < 1 || px > w {
                    continue;
                }
                let out = if self.up == 1 {
                    q
                } else {
                    img * out_per_image + ((py - 1) * self.up + phase.sub.0 + 1) * (ow + 2) + (px - 1) * self.up + phase.sub.1 + 1
                };
                let dst = output.add(out * self.output.cs);
                for k in 0..K {
                    *dst.add(k) = (S::sum(row[k]) + bias[k]).max(self.min).min(self.max);
                }
            }
        }
    }
}
