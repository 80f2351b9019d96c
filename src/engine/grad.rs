//! Weight gradients of convolutions on padded NHWC maps, over [`gemm::outer_tile`].
//!
//! A convolution pairs pixels of two maps through each kernel tap `t = (ty, tx)`: pixel
//! `(y, x)` of the *small-side* map `A` meets pixel `(y·s + ty − p, x·s + tx − p)` of the map
//! `B` (stride `s`, padding `p`). For a convolution `A` is the output gradient and `B` the
//! input; for a transposed convolution `A` is the input and `B` the output gradient. Either
//! way the weight gradient is
//!
//! `G[a][b][t] = Σ_(pixels of A) A[·][a] · B[paired pixel][b]`,
//!
//! which is candle's (and PyTorch's) weight layout in both cases: `[cout][cin][ky][kx]` for a
//! convolution, `[cin][cout][ky][kx]` for a transposed one. Each row of `A` is one segment of
//! the reduction (both operands step by a pixel, `B` by `s` pixels), and the channels of
//! whichever map has more of them are the tile's vectors.
//!
//! Items are blocks of rows of `A`, each adding into a buffer of its own that the caller sums
//! (where the maps outweigh the gradient), or `(tap, block of row tiles)` pairs over every
//! pixel, packed into contiguous panels chunk by chunk, each writing its own part of one
//! buffer. Tiles add into a `[tap][rows][vectors]` buffer with
//! vector stores; [`WeightGrad::finish`] transposes it into the weight layout.

use anyhow::{Result, ensure};

use super::gemm::outer_tile;
use super::simd::Simd;
use super::{Isa, SimdJob, dispatch};

/// A padded NHWC map: `h × w` pixels of `c` channels, `cs` floats per pixel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapShape {
    pub h: usize,
    pub w: usize,
    pub c: usize,
    pub cs: usize,
}

impl MapShape {
    pub fn new(h: usize, w: usize, c: usize) -> MapShape {
        MapShape { h, w, c, cs: c }
    }

    /// Floats per image, border included.
    pub fn image_floats(&self) -> usize {
        (self.h + 2) * (self.w + 2) * self.cs
    }
}

/// The weight gradient of one convolution (see the module docs).
#[derive(Debug, Clone)]
pub struct WeightGrad {
    pub isa: Isa,
    pub a: MapShape,
    pub b: MapShape,
    pub k: usize,
    pub stride: usize,
    pub pad: usize,
    pub n: usize,
    /// The broadcast side is `B` (else `A`).
    rows_from_b: bool,
    /// Vectors per tile (1 or 2).
    nv: usize,
    /// Rows are `(tx, channel of B)` pairs of one kernel row `ty`: B's `k` pixels along a row
    /// are `k · b.c` consecutive floats, so a map of few channels (a first layer's 3, a
    /// logits layer's 3) fills a row tile with `k` taps instead of one (see [`Self::new`]).
    merge_taps: bool,
    /// Rows of `A` (over the whole batch, crossing images) per block of the reduction.
    rows_per_block: usize,
    /// Items are blocks of rows, each adding into a buffer of its own (else items are
    /// `(tap, block of row tiles)` pairs over every pixel, writing their own part of one buffer).
    split_pixels: bool,
    /// Row tiles per item when the gradient is split.
    r_block: usize,
    /// Rows of `A` per pass over an item's tiles when the gradient is split: the pass's
    /// panels (the item's rows-side channels, every vector-side channel) stay under
    /// [`CHUNK_BYTES`].
    chunk_rows: usize,
}

/// `(rows, vectors)` of a tile's channels: the broadcast side's (B's with `rows_from_b`; with
/// merged taps `k · b.c` tap-channel pairs) and the vector side's.
fn tile_sides(a: MapShape, b: MapShape, k: usize, rows_from_b: bool, merge_taps: bool) -> (usize, usize) {
    if rows_from_b { (if merge_taps { k * b.c } else { b.c }, a.c) } else { (a.c, b.c) }
}

/// Writes weight-layout rows `a_range` (`[a][b][tap]`) of `out` (which holds just those rows)
/// from a `[tap][rows][vectors]` buffer, its rows being `A`'s `ca` channels (or `B`'s `cb`
/// with `rows_from_b`) and its vectors the other map's.
pub fn tap_major_to_weights(buffer: &[f32], taps: usize, ca: usize, cb: usize, rows_from_b: bool, a_range: std::ops::Range<usize>, out: &mut [f32]) {
    let (r_c, v_c) = if rows_from_b { (cb, ca) } else { (ca, cb) };
    for (ia, a) in a_range.enumerate() {
        for b in 0..cb {
            let dst = &mut out[(ia * cb + b) * taps..][..taps];
            let (r, v) = if rows_from_b { (b, a) } else { (a, b) };
            for (t, d) in dst.iter_mut().enumerate() {
                *d = buffer[(t * r_c + r) * v_c + v];
            }
        }
    }
}

/// Pixels of `A` per block of rows when items split the pixels.
const BLOCK_PIXELS: usize = 512;

/// Bytes of the packed panels of one pass over a split-gradient item's tiles: a bound on the
/// panels' memory, not a cache size (L2-sized chunks measured slower: the item's share of the
/// gradient is read and written once per chunk).
const CHUNK_BYTES: usize = 4 << 20;

impl WeightGrad {
    /// The weight gradient over a batch of `n` on `threads` threads.
    pub fn new(a: MapShape, b: MapShape, k: usize, stride: usize, pad: usize, n: usize, threads: usize, isa: Isa) -> Result<WeightGrad> {
        ensure!(isa.supported(), "this CPU cannot run the {} kernels", isa.name());
        ensure!(pad <= 1 && stride >= 1 && k >= 1, "weight gradients support padding 0 or 1 (got k {k}, stride {stride}, padding {pad})");
        // Every paired pixel lies in B's padded map (its border is zero).
        ensure!(
            (a.h - 1) * stride + k - pad <= b.h + 1 && (a.w - 1) * stride + k - pad <= b.w + 1,
            "a {}×{} map does not pair with a {}×{} map through a {k}×{k} stride-{stride} kernel",
            a.h,
            a.w,
            b.h,
            b.w
        );
        let lanes = isa.lanes();
        // The assignment (broadcast side, vectors per tile) with the least padded work.
        let cost = |rows: usize, vectors: usize, nv: usize| {
            let mr = super::gemm::tile_rows(lanes, nv);
            rows.div_ceil(mr) * mr * vectors.div_ceil(nv * lanes) * nv * lanes
        };
        // Costs per kernel tap. Merged taps (rows from B, `k · b.c` of them in one tile) pay
        // for a tile once per kernel row.
        let mut best = (usize::MAX, false, 2, false);
        for (rows_from_b, merge) in [(false, false), (true, false), (true, true)] {
            for nv in [2, 1] {
                let mr = super::gemm::tile_rows(lanes, nv);
                if merge && !(k > 1 && b.cs == b.c && k * b.c <= mr) {
                    continue;
                }
                let (rows, vectors) = tile_sides(a, b, k, rows_from_b, merge);
                let c = cost(rows, vectors, nv) * if nv == 1 { 9 } else { 8 } / 8 / if merge { k } else { 1 };
                if c < best.0 {
                    best = (c, rows_from_b, nv, merge);
                }
            }
        }
        let rows_per_block = (BLOCK_PIXELS / a.w.max(1)).clamp(1, n * a.h);
        // Split the pixels (partial sums per item, added by the caller) where the maps
        // outweigh the gradient; else split the gradient among items.
        let pixels = n * a.h * a.w;
        let grad = a.c * b.c * k * k;
        let split_pixels = pixels * (a.c + b.c) >= 8 * grad && (n * a.h).div_ceil(rows_per_block) >= 2 * threads.min(2);
        // A split gradient: items of several row tiles (at least 8 items per thread), so the
        // vector side is packed once for up to 16 tiles; the pixels in chunks of at most
        // CHUNK_BYTES of panels.
        let (rows_from_b, nv, merge_taps) = (best.1, best.2, best.3);
        let mr = super::gemm::tile_rows(lanes, nv);
        let (r_c, v_c) = tile_sides(a, b, k, rows_from_b, merge_taps);
        let r_tiles = r_c.div_ceil(mr);
        let tap_items = if merge_taps { k } else { k * k };
        let r_block = (r_tiles * tap_items / (8 * threads.max(1))).clamp(1, 16).min(r_tiles);
        let line_bytes = |c: usize| c.div_ceil(16) * 64;
        // per pixel of A: its rows-side channels and the vector-side ones of its paired pixel
        let per_pixel = line_bytes((r_block * mr).min(r_c)) + line_bytes(v_c);
        let chunk_rows = (CHUNK_BYTES / per_pixel / a.w.max(1)).clamp(1, n * a.h);
        Ok(WeightGrad { isa, a, b, k, stride, pad, n, rows_from_b, nv, merge_taps, rows_per_block, split_pixels, r_block, chunk_rows })
    }

    /// Floats of the gradient `[a.c][b.c][k·k]`.
    pub fn len(&self) -> usize {
        self.a.c * self.b.c * self.k * self.k
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether items add into buffers of their own (which the caller then sums), or each
    /// writes its own part of one buffer.
    pub fn splits_pixels(&self) -> bool {
        self.split_pixels
    }

    fn row_tile(&self) -> usize {
        super::gemm::tile_rows(self.isa.lanes(), self.nv)
    }

    /// Channels on the rows side of a tile (with merged taps, `k · b.c` tap-channel pairs)
    /// and on the vector side.
    fn sides(&self) -> (usize, usize) {
        tile_sides(self.a, self.b, self.k, self.rows_from_b, self.merge_taps)
    }

    /// Taps a tile runs over: every kernel tap, or with merged taps every kernel row.
    fn tile_taps(&self) -> usize {
        if self.merge_taps { self.k } else { self.k * self.k }
    }

    /// Blocks of row tiles (items per tap) when the gradient is split.
    fn r_blocks(&self) -> usize {
        self.sides().0.div_ceil(self.row_tile()).div_ceil(self.r_block)
    }

    /// Work items.
    pub fn items(&self) -> usize {
        if self.split_pixels {
            (self.n * self.a.h).div_ceil(self.rows_per_block)
        } else {
            self.tile_taps() * self.r_blocks()
        }
    }

    /// Floats of the buffer [`Self::run`] adds into: `[tap][rows][vectors]` (rows and vectors
    /// being `A`'s and `B`'s channels in the order the tiles use); [`Self::finish`] turns it
    /// into the weight layout.
    pub fn buffer_len(&self) -> usize {
        self.len()
    }

    /// Writes weight-layout rows `a_range` (`[a][b][tap]`, candle's layout) of `out` (which
    /// holds just those rows) from a buffer [`Self::run`] filled.
    pub fn finish(&self, buffer: &[f32], a_range: std::ops::Range<usize>, out: &mut [f32]) {
        tap_major_to_weights(buffer, self.k * self.k, self.a.c, self.b.c, self.rows_from_b, a_range, out);
    }

    /// Adds item `item`'s share of the gradient into `grad` (see [`Self::buffer_len`]; zeroed
    /// by the caller before the first item).
    ///
    /// # Safety
    /// `a` and `b` hold `n` padded images of their shapes, followed by [`super::kernels::slack_floats`]
    /// readable floats; `grad` holds [`Self::len`] floats; with [`Self::splits_pixels`] no
    /// other thread writes the same `grad` meanwhile.
    pub unsafe fn run(&self, a: *const f32, b: *const f32, item: usize, grad: *mut f32) {
        debug_assert!(item < self.items());
        struct Job<'a> {
            g: &'a WeightGrad,
            a: *const f32,
            b: *const f32,
            item: usize,
            grad: *mut f32,
        }
        impl SimdJob for Job<'_> {
            #[inline(always)]
            unsafe fn run<S: Simd>(&self) {
                let g = self.g;
                unsafe {
                    match (S::LANES, g.nv) {
                        (16, 2) => g.run_shape::<S, 12, 2>(self.a, self.b, self.item, self.grad),
                        (16, _) => g.run_shape::<S, 24, 1>(self.a, self.b, self.item, self.grad),
                        (_, 2) => g.run_shape::<S, 6, 2>(self.a, self.b, self.item, self.grad),
                        _ => g.run_shape::<S, 12, 1>(self.a, self.b, self.item, self.grad),
                    }
                }
            }
        }
        unsafe { dispatch(self.isa, &Job { g: self, a, b, item, grad }) }
    }

    #[inline(always)]
    unsafe fn run_shape<S: Simd, const MR: usize, const NV: usize>(&self, a: *const f32, b: *const f32, item: usize, grad: *mut f32) {
        let (am, bm) = (self.a, self.b);
        let rows = self.n * am.h;
        let taps = self.tile_taps();
        let (r_c, v_c) = self.sides();
        // The buffer's rows per tap: B's (or A's) channels, merged taps or not.
        let buf_rc = if self.rows_from_b { bm.c } else { am.c };
        let nr = NV * S::LANES;
        let r_tiles = r_c.div_ceil(MR);
        // This item's rows, taps and row tiles.
        let (row_range, tap_range, r_range, step) = if self.split_pixels {
            let lo = item * self.rows_per_block;
            (lo..(lo + self.rows_per_block).min(rows), 0..taps, 0..r_tiles, self.rows_per_block)
        } else {
            let blocks = self.r_blocks();
            let (t, rb) = (item / blocks, item % blocks);
            let r0 = rb * self.r_block;
            (0..rows, t..t + 1, r0..(r0 + self.r_block).min(r_tiles), self.chunk_rows)
        };
        let (awp, bwp) = (am.w + 2, bm.w + 2);
        let (s, p) = (self.stride, self.pad);
        let (r_step, v_step) = if self.rows_from_b { (s * bm.cs, am.cs) } else { (am.cs, s * bm.cs) };
        let mut starts: Vec<(*const f32, *const f32, usize)> = Vec::with_capacity(step);
        let v_tiles = v_c.div_ceil(nr);
        let (mut pa, mut pb): (Vec<f32>, Vec<f32>) = (Vec::new(), Vec::new());
        let mut segments: Vec<(*const f32, *const f32)> = Vec::with_capacity(step);
        let mut lengths: Vec<usize> = Vec::with_capacity(4);
        // Stride 1 and same-size maps: rows chain into flat runs.
        let flat = s == 1 && am.w == bm.w && am.h == bm.h && am.cs == am.c;
        // A split gradient, and split pixels over rows that do not chain, pack their operands
        // (below); split pixels over flat runs read the maps in place.
        let packed = !self.split_pixels || !flat;
        for block in row_range.clone().step_by(step) {
            let block = block..(block + step).min(row_range.end);
            for t in tap_range.clone() {
                // Merged taps: t is the kernel row, its rows start at tap (ty, 0).
                let (ty, tx) = if self.merge_taps { (t, 0) } else { (t / self.k, t % self.k) };
                let t_buf = ty * self.k + tx;
                // Row starts of this tap: A's pixel (y, 0) and B's pixel (y·s + ty − p, tx − p),
                // in padded coordinates (+1).
                starts.clear();
                let start = |row: usize| unsafe {
                    let (img, y) = (row / am.h, row % am.h);
                    let ap = a.add(img * am.image_floats() + ((y + 1) * awp + 1) * am.cs);
                    let bp = b.add(img * bm.image_floats() + ((y * s + ty + 1 - p) * bwp + tx + 1 - p) * bm.cs);
                    (ap, bp)
                };
                // Segments as (pointers, length), grouped by length below.
                if flat {
                    // Stride 1 on maps of one size: a run of rows of one image is one segment
                    // over the padded positions between them (A's border pixels are zero).
                    let mut row = block.start;
                    while row < block.end {
                        let end = block.end.min((row / am.h + 1) * am.h);
                        let (ap, bp) = start(row);
                        starts.push((ap, bp, (end - row) * awp - 2));
                        row = end;
                    }
                } else {
                    starts.extend(block.clone().map(|row| {
                        let (ap, bp) = start(row);
                        (ap, bp, am.w)
                    }));
                }
                // A split gradient packs both operands of this tap into panels whose k-steps
                // are contiguous. Its items read few channels of each pixel (a fresh cache
                // line per k-step on each side, of which a tile used 24–64 bytes), so tiles
                // over the maps in place ran at 22–30% of the AVX2 FMA peak and packed ones
                // at 45–60% (`examples/wgrad_bench`). A row tile's panel is `[k][MR]`, a
                // vector tile's `[k][NR]`; channels past the map's are zero. Split pixels
                // (many pixels, few channels, stride-1 rows chained into long runs) read the
                // maps in place: packing them measured 0.8–1.0×; a stride-2 layer's split
                // pixels (short rows of a.w pixels) gain 1.4–1.6× from it.
                lengths.clear();
                if !packed {
                    for &(_, _, kc) in &starts {
                        if !lengths.contains(&kc) {
                            lengths.push(kc);
                        }
                    }
                }
                let kt: usize = if packed { starts.iter().map(|s| s.2).sum() } else { 0 };
                let r_tiles_here = r_range.len();
                // Every float of both panels is written below (pad lanes with zeros), so a
                // panel is only resized, never cleared; a row tile's vector stores run up to
                // a vector past its panel (into the next one, written after it, or the slack).
                let (na, nb) = if packed { (r_tiles_here * MR * kt + S::LANES, v_tiles * nr * kt) } else { (0, 0) };
                if pa.len() != na {
                    pa.resize(na, 0.0);
                }
                if pb.len() != nb {
                    pb.resize(nb, 0.0);
                }
                let r_vectors = MR.div_ceil(S::LANES);
                // SAFETY (both loops): the sources lie in the maps and their slack, as the
                // unpacked tiles read them; the panels were sized above.
                for (i, rt) in r_range.clone().enumerate() {
                    if !packed {
                        break;
                    }
                    let r0 = rt * MR;
                    let mut dst = unsafe { pa.as_mut_ptr().add(i * kt * MR) };
                    for &(ap, bp, kc) in &starts {
                        let rp = if self.rows_from_b { bp } else { ap };
                        for kk in 0..kc {
                            unsafe {
                                let rs = rp.add(kk * r_step + r0);
                                for j in 0..r_vectors {
                                    let c = r0 + j * S::LANES;
                                    let v = if c + S::LANES <= r_c { S::load(rs.add(j * S::LANES)) } else if c < r_c { S::load_n(rs.add(j * S::LANES), r_c - c) } else { S::zero() };
                                    S::store(dst.add(j * S::LANES), v);
                                }
                                dst = dst.add(MR);
                            }
                        }
                    }
                }
                let mut k = 0;
                for &(ap, bp, kc) in &starts {
                    if !packed {
                        break;
                    }
                    let vp = if self.rows_from_b { ap } else { bp };
                    for kk in 0..kc {
                        unsafe {
                            let vs = vp.add(kk * v_step);
                            for vt in 0..v_tiles {
                                let dst = pb.as_mut_ptr().add((vt * kt + k) * nr);
                                for j in 0..NV {
                                    let c = vt * nr + j * S::LANES;
                                    let v = if c + S::LANES <= v_c { S::load(vs.add(c)) } else if c < v_c { S::load_n(vs.add(c), v_c - c) } else { S::zero() };
                                    S::store(dst.add(j * S::LANES), v);
                                }
                            }
                        }
                        k += 1;
                    }
                }
                for (i, rt) in r_range.clone().enumerate() {
                    let r0 = rt * MR;
                    for vt in 0..v_tiles {
                        let v0 = vt * nr;
                        let acc = if packed {
                            // SAFETY: each panel holds kt steps of MR (NR) floats.
                            unsafe {
                                let panel = [(pa.as_ptr().add(i * kt * MR), pb.as_ptr().add(vt * kt * nr))];
                                outer_tile::<S, MR, NV>(&panel, kt, MR, nr)
                            }
                        } else {
                            let mut acc = [[unsafe { S::zero() }; NV]; MR];
                            for &kc in &lengths {
                                segments.clear();
                                segments.extend(starts.iter().filter(|s| s.2 == kc).map(|&(ap, bp, _)| unsafe {
                                    if self.rows_from_b { (bp.add(r0), ap.add(v0)) } else { (ap.add(r0), bp.add(v0)) }
                                }));
                                // SAFETY: the segments step through the maps and their slack.
                                let part = unsafe { outer_tile::<S, MR, NV>(&segments, kc, r_step, v_step) };
                                if lengths.len() == 1 {
                                    acc = part;
                                } else {
                                    for (row, prow) in acc.iter_mut().zip(&part) {
                                        for (v, pv) in row.iter_mut().zip(prow) {
                                            *v = unsafe { S::add(*v, *pv) };
                                        }
                                    }
                                }
                            }
                            acc
                        };
                        // acc[r][j] is (rows channel r0 + r, vector channels v0 + j·L ..): added
                        // into the [tap][rows][vectors] buffer with vector stores.
                        for (r, row) in acc.iter().enumerate() {
                            let rc = r0 + r;
                            if rc >= r_c {
                                break;
                            }
                            // Merged: rc = tx·b.c + channel, so tap (ty, tx)'s row lands at
                            // ((ty·k + tx)·b.c + channel), as unmerged.
                            let dst = unsafe { grad.add((t_buf * buf_rc + rc) * v_c) };
                            for (j, v) in row.iter().enumerate() {
                                let vc = v0 + j * S::LANES;
                                if vc >= v_c {
                                    break;
                                }
                                let valid = v_c - vc;
                                unsafe { S::store_n(dst.add(vc), S::add(S::load_n(dst.add(vc), valid), *v), valid) };
                            }
                        }
                    }
                }
            }
        }
    }
}
