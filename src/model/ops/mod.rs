//! Tensor operations the models need beyond candle's built-ins, written for speed on CPU:
//! convolutions as im2col + one GEMM (and transposed convolutions as GEMM + col2im), whose
//! backward passes are GEMMs too instead of candle's direct-loop transposed convolution, and a
//! direct depthwise convolution (candle splits grouped convolutions into one call per group).
//! On other devices the same functions fall back to candle's own kernels.

use std::cell::RefCell;

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Device, InplaceOp1, Layout, Result, Shape, Tensor, bail};
use rayon::prelude::*;

pub mod batchnorm;
pub mod direct;

/// Geometry shared by im2col and col2im: an image side `[N, C, H, W]` and a column side
/// `[C·kh·kw, N·Ho·Wo]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ColGeometry {
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    kh: usize,
    kw: usize,
    stride: usize,
    pad: usize,
}

impl ColGeometry {
    fn out_h(&self) -> usize {
        (self.h + 2 * self.pad - self.kh) / self.stride + 1
    }
    fn out_w(&self) -> usize {
        (self.w + 2 * self.pad - self.kw) / self.stride + 1
    }
    fn rows(&self) -> usize {
        self.c * self.kh * self.kw
    }
    /// A 1×1, stride-1, unpadded convolution, whose columns are the image itself.
    fn is_pointwise(&self) -> bool {
        self.kh == 1 && self.kw == 1 && self.stride == 1 && self.pad == 0
    }
    fn cols(&self) -> usize {
        self.n * self.out_h() * self.out_w()
    }
}

fn contiguous_f32<'a>(storage: &'a CpuStorage, layout: &Layout, what: &str) -> Result<&'a [f32]> {
    let data = match storage {
        CpuStorage::F32(d) => d,
        _ => bail!("{what}: only f32 is supported"),
    };
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => bail!("{what}: input must be contiguous"),
    }
}

/// A buffer whose every element the caller writes before reading any (im2col columns, GEMM
/// outputs without accumulation). Zeroing such buffers was ~6% of a forward pass.
#[allow(clippy::uninit_vec)]
fn overwritten_buffer(len: usize) -> Vec<f32> {
    let mut buffer = Vec::with_capacity(len);
    // SAFETY: f32 has no invalid bit patterns, and every caller fills the whole buffer before
    // reading from it (as candle's own `alloc_uninit` does).
    unsafe { buffer.set_len(len) };
    buffer
}

/// Image `[N, C, H, W]` → columns `[C·kh·kw, N·Ho·Wo]`; its backward is [`Col2Im`].
struct Im2Col(ColGeometry);

impl CustomOp1 for Im2Col {
    fn name(&self) -> &'static str {
        "segctl-im2col"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = self.0;
        let x = contiguous_f32(storage, layout, "im2col")?;
        let (oh, ow) = (g.out_h(), g.out_w());
        let ncols = g.cols();
        let mut out = vec![0f32; g.rows() * ncols];
        out.par_chunks_mut(ncols).enumerate().for_each(|(row, dst)| {
            let c = row / (g.kh * g.kw);
            let ky = (row / g.kw) % g.kh;
            let kx = row % g.kw;
            for n in 0..g.n {
                let plane = &x[(n * g.c + c) * g.h * g.w..][..g.h * g.w];
                let dst = &mut dst[n * oh * ow..][..oh * ow];
                for oy in 0..oh {
                    let iy = (oy * g.stride + ky) as isize - g.pad as isize;
                    let dst_row = &mut dst[oy * ow..][..ow];
                    if iy < 0 || iy >= g.h as isize {
                        continue; // already zero
                    }
                    let src_row = &plane[iy as usize * g.w..][..g.w];
                    for (ox, d) in dst_row.iter_mut().enumerate() {
                        let ix = (ox * g.stride + kx) as isize - g.pad as isize;
                        if ix >= 0 && ix < g.w as isize {
                            *d = src_row[ix as usize];
                        }
                    }
                }
            }
        });
        Ok((CpuStorage::F32(out), Shape::from((g.rows(), ncols))))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad_res.contiguous()?.apply_op1(Col2Im(self.0))?))
    }
}

/// Columns `[C·kh·kw, N·Ho·Wo]` → image `[N, C, H, W]`, summing overlaps; its backward is
/// [`Im2Col`].
struct Col2Im(ColGeometry);

impl CustomOp1 for Col2Im {
    fn name(&self) -> &'static str {
        "segctl-col2im"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = self.0;
        let cols = contiguous_f32(storage, layout, "col2im")?;
        let (oh, ow) = (g.out_h(), g.out_w());
        let ncols = g.cols();
        let mut out = vec![0f32; g.n * g.c * g.h * g.w];
        out.par_chunks_mut(g.h * g.w).enumerate().for_each(|(plane_index, plane)| {
            let n = plane_index / g.c;
            let c = plane_index % g.c;
            for ky in 0..g.kh {
                for kx in 0..g.kw {
                    let row = (c * g.kh + ky) * g.kw + kx;
                    let src = &cols[row * ncols + n * oh * ow..][..oh * ow];
                    for oy in 0..oh {
                        let iy = (oy * g.stride + ky) as isize - g.pad as isize;
                        if iy < 0 || iy >= g.h as isize {
                            continue;
                        }
                        let dst_row = &mut plane[iy as usize * g.w..][..g.w];
                        let src_row = &src[oy * ow..][..ow];
                        for (ox, s) in src_row.iter().enumerate() {
                            let ix = (ox * g.stride + kx) as isize - g.pad as isize;
                            if ix >= 0 && ix < g.w as isize {
                                dst_row[ix as usize] += *s;
                            }
                        }
                    }
                }
            }
        });
        Ok((CpuStorage::F32(out), Shape::from((g.n, g.c, g.h, g.w))))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad_res.contiguous()?.apply_op1(Im2Col(self.0))?))
    }
}

/// Size of one block of im2col columns, in elements (256 KiB: within a core's L2 cache).
const COLUMN_BLOCK_ELEMENTS: usize = 1 << 16;

/// Element counts from which an elementwise pass is worth spreading over threads.
const PARALLEL_ELEMENTS: usize = 1 << 16;

/// The output columns `[lo, hi)` whose input column `ox·stride + kx − pad` lies inside an
/// image row of width `w` (the rest read zero padding).
fn valid_columns(ow: usize, w: usize, kx: usize, stride: usize, pad: usize) -> (usize, usize) {
    // ix = ox·stride + kx − pad ≥ 0  ⇔  ox ≥ ⌈(pad − kx) / stride⌉
    let lo = if pad > kx { (pad - kx).div_ceil(stride) } else { 0 };
    // ix < w  ⇔  ox < ⌈(w + pad − kx) / stride⌉
    let hi = if w + pad > kx { (w + pad - kx).div_ceil(stride) } else { 0 };
    (lo.min(ow), hi.min(ow).max(lo.min(ow)))
}

/// Writes the columns of one image `[C, H, W]` into `out [C·kh·kw, Ho·Wo]`.
fn im2col_single(x: &[f32], g: &ColGeometry, out: &mut [f32], parallel: bool) {
    im2col_rows(x, g, 0..g.out_h(), out, parallel)
}

/// The columns of output rows `rows` only: `out [C·kh·kw, rows.len()·Wo]`.
fn im2col_rows(x: &[f32], g: &ColGeometry, rows: std::ops::Range<usize>, out: &mut [f32], parallel: bool) {
    let ow = g.out_w();
    let l = rows.len() * ow;
    let out = &mut out[..g.rows() * l];
    let fill = |row: usize, dst: &mut [f32]| {
        let c = row / (g.kh * g.kw);
        let ky = (row / g.kw) % g.kh;
        let kx = row % g.kw;
        let plane = &x[c * g.h * g.w..][..g.h * g.w];
        // Padding is only ever at the ends of a row: zero them, copy the middle.
        let (lo, hi) = valid_columns(ow, g.w, kx, g.stride, g.pad);
        for (local, oy) in rows.clone().enumerate() {
            let iy = (oy * g.stride + ky) as isize - g.pad as isize;
            let dst_row = &mut dst[local * ow..][..ow];
            if iy < 0 || iy >= g.h as isize || lo == hi {
                dst_row.fill(0.0);
                continue;
            }
            let src_row = &plane[iy as usize * g.w..][..g.w];
            dst_row[..lo].fill(0.0);
            dst_row[hi..].fill(0.0);
            let first = lo * g.stride + kx - g.pad;
            if g.stride == 1 {
                dst_row[lo..hi].copy_from_slice(&src_row[first..first + (hi - lo)]);
            } else {
                for (d, s) in dst_row[lo..hi].iter_mut().zip(src_row[first..].iter().step_by(g.stride)) {
                    *d = *s;
                }
            }
        }
    };
    if parallel {
        out.par_chunks_mut(l).enumerate().for_each(|(row, dst)| fill(row, dst));
    } else {
        out.chunks_mut(l).enumerate().for_each(|(row, dst)| fill(row, dst));
    }
}

/// Accumulates columns `[C·kh·kw, Ho·Wo]` of one image back into `out [C, H, W]`.
fn col2im_single(cols: &[f32], g: &ColGeometry, out: &mut [f32], parallel: bool) {
    let (oh, ow) = (g.out_h(), g.out_w());
    let l = oh * ow;
    let plane_fn = |c: usize, plane: &mut [f32]| {
        plane.fill(0.0);
        for ky in 0..g.kh {
            for kx in 0..g.kw {
                let row = (c * g.kh + ky) * g.kw + kx;
                let src = &cols[row * l..][..l];
                let (lo, hi) = valid_columns(ow, g.w, kx, g.stride, g.pad);
                if lo == hi {
                    continue;
                }
                let first = lo * g.stride + kx - g.pad;
                for oy in 0..oh {
                    let iy = (oy * g.stride + ky) as isize - g.pad as isize;
                    if iy < 0 || iy >= g.h as isize {
                        continue;
                    }
                    let dst_row = &mut plane[iy as usize * g.w..][..g.w];
                    let src_row = &src[oy * ow..][lo..hi];
                    if g.stride == 1 {
                        for (d, v) in dst_row[first..first + (hi - lo)].iter_mut().zip(src_row) {
                            *d += *v;
                        }
                    } else {
                        for (d, v) in dst_row[first..].iter_mut().step_by(g.stride).zip(src_row) {
                            *d += *v;
                        }
                    }
                }
            }
        }
    };
    if parallel {
        out.par_chunks_mut(g.h * g.w).enumerate().for_each(|(c, p)| plane_fn(c, p));
    } else {
        out.chunks_mut(g.h * g.w).enumerate().for_each(|(c, p)| plane_fn(c, p));
    }
}

/// `dst[m×n] (+)= lhs[m×k] · rhs[k×n]` on row-major slices, with explicit strides for the
/// operands (`(row stride, column stride)`).
#[allow(clippy::too_many_arguments)]
fn matmul_into(
    dst: &mut [f32],
    accumulate: bool,
    lhs: &[f32],
    lhs_strides: (usize, usize),
    rhs: &[f32],
    rhs_strides: (usize, usize),
    (m, n, k): (usize, usize, usize),
    parallel: bool,
) {
    matmul_into_rows(dst, n, accumulate, lhs, lhs_strides, rhs, rhs_strides, (m, n, k), parallel)
}

/// [`matmul_into`] with `dst` rows `dst_row_stride` apart (a column block of a wider matrix).
#[allow(clippy::too_many_arguments)]
fn matmul_into_rows(
    dst: &mut [f32],
    dst_row_stride: usize,
    accumulate: bool,
    lhs: &[f32],
    lhs_strides: (usize, usize),
    rhs: &[f32],
    rhs_strides: (usize, usize),
    (m, n, k): (usize, usize, usize),
    parallel: bool,
) {
    assert!(m == 0 || dst.len() >= (m - 1) * dst_row_stride + n, "GEMM destination too small");
    let parallelism = if parallel && rayon::current_num_threads() > 1 {
        gemm::Parallelism::Rayon(rayon::current_num_threads())
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the slices hold at least the m×k, k×n and m×n elements the strides address.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_row_stride as isize,
            accumulate,
            lhs.as_ptr(),
            lhs_strides.1 as isize,
            lhs_strides.0 as isize,
            rhs.as_ptr(),
            rhs_strides.1 as isize,
            rhs_strides.0 as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
}

thread_local! {
    /// Each thread's column buffer, kept between calls: at 128² these are tens of MB, blocks
    /// the allocator hands back to the kernel on free, which then zeroes fresh pages each time.
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` with this thread's scratch buffer of `len` elements (contents unspecified: the
/// caller overwrites before reading), or a fresh one when the thread's buffer is in use (a
/// rayon task stolen while this thread waits inside a parallel GEMM).
fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    SCRATCH.with(|cell| match cell.try_borrow_mut() {
        Ok(mut buffer) => {
            if buffer.len() < len {
                *buffer = overwritten_buffer(len);
            }
            f(&mut buffer[..len])
        }
        Err(_) => f(&mut overwritten_buffer(len)),
    })
}

/// Runs `f(sample index, scratch buffer)` for every sample, either one after the other, each
/// call free to use every thread (fewer samples than threads, as in single-image inference),
/// or in parallel with single-threaded calls: a whole GEMM per thread beats splitting each
/// one, at every spatial size (measured with `examples/train_step_bench`: batch-8 UNet
/// inference 13.3 vs 10.7–12.8 img/s, batch-32 training 3.63 vs 3.45 img/s, 2 threads).
fn per_sample<T: Send>(
    n: usize,
    scratch_len: usize,
    out: &mut [T],
    out_per_sample: usize,
    f: impl Fn(usize, &mut [f32], &mut [T], bool) + Sync,
) {
    if n < rayon::current_num_threads() {
        with_scratch(scratch_len, |scratch| {
            for (i, dst) in out.chunks_mut(out_per_sample).enumerate().take(n) {
                f(i, scratch, dst, true);
            }
        });
    } else {
        out.par_chunks_mut(out_per_sample)
            .enumerate()
            .take(n)
            .for_each(|(i, dst)| with_scratch(scratch_len, |scratch| f(i, scratch, dst, false)));
    }
}

/// The direct kernels' shape, when a convolution is 3×3, stride 1, padding 1 and narrow.
fn direct_shape(g: &ColGeometry, cout: usize) -> Option<direct::Shape3x3> {
    let fits = g.kh == 3 && g.kw == 3 && g.stride == 1 && g.pad == 1 && g.w >= 2;
    let narrow = g.c <= direct::MAX_DIRECT_IN_CHANNELS && cout <= direct::MAX_DIRECT_OUT_CHANNELS;
    (fits && narrow).then_some(direct::Shape3x3 { n: g.n, cin: g.c, cout, h: g.h, w: g.w })
}

/// Dense convolution `(x [N,C,H,W], w [Cout,C,kh,kw]) → [N,Cout,Ho,Wo]`, one image at a time
/// (im2col into a cache-sized buffer, then one GEMM straight into the output).
struct Conv2dOp {
    stride: usize,
    pad: usize,
    /// Inference only: bias and activation applied while each image's output is in cache.
    epilogue: Option<Epilogue>,
}

/// `y ← clamp(y + bias[channel], min, max)`: a folded BatchNorm's shift and the activation
/// (ReLU: `[0, ∞)`, ReLU6: `[0, 6]`, none: `(−∞, ∞)`).
#[derive(Debug, Clone)]
pub struct Epilogue {
    pub bias: Vec<f32>,
    pub min: f32,
    pub max: f32,
}

impl Epilogue {
    /// Applies to `[C, L]` planes, channel `c` at `out[c·L..]` (samples back to back).
    fn apply(&self, out: &mut [f32], plane: usize) {
        let channels = self.bias.len();
        for (index, values) in out.chunks_mut(plane).enumerate() {
            let b = self.bias[index % channels];
            for v in values {
                *v = (*v + b).max(self.min).min(self.max);
            }
        }
    }
}

impl InplaceOp1 for Epilogue {
    fn name(&self) -> &'static str {
        "segctl-bias-clamp"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> Result<()> {
        let (start, end) = match layout.contiguous_offsets() {
            Some(range) => range,
            None => bail!("bias-clamp: input must be contiguous"),
        };
        let data = match storage {
            CpuStorage::F32(d) => &mut d[start..end],
            _ => bail!("bias-clamp: only f32 is supported"),
        };
        let (_, c, h, w) = layout.shape().dims4()?;
        if c != self.bias.len() {
            bail!("bias-clamp: {c} channels, {} biases", self.bias.len());
        }
        let plane = h * w;
        let parallel = data.len() >= PARALLEL_ELEMENTS;
        if parallel {
            // Whole samples per task, so channel indices stay aligned.
            data.par_chunks_mut(c * plane).for_each(|sample| self.apply(sample, plane));
        } else {
            self.apply(data, plane);
        }
        Ok(())
    }
}

impl Conv2dOp {
    fn geometry(&self, x: &Layout, w: &Layout) -> Result<(ColGeometry, usize)> {
        let (n, c, h, wd) = x.shape().dims4()?;
        let (cout, cin, kh, kw) = w.shape().dims4()?;
        if cin != c {
            bail!("conv2d: input has {c} channels, weight expects {cin}");
        }
        Ok((ColGeometry { n, c, h, w: wd, kh, kw, stride: self.stride, pad: self.pad }, cout))
    }
}

impl CustomOp2 for Conv2dOp {
    fn name(&self) -> &'static str {
        "segctl-conv2d"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s1, l1, "conv2d")?;
        let w = contiguous_f32(s2, l2, "conv2d")?;
        let (g, cout) = self.geometry(l1, l2)?;
        if let Some(shape) = direct_shape(&g, cout) {
            let mut out = direct::forward(x, w, shape);
            if let Some(epilogue) = &self.epilogue {
                epilogue.apply(&mut out, g.h * g.w);
            }
            return Ok((CpuStorage::F32(out), Shape::from((g.n, cout, g.h, g.w))));
        }
        let (oh, ow, k) = (g.out_h(), g.out_w(), g.rows());
        let l = oh * ow;
        // One thread per image: columns in blocks of output rows that stay in the core's L2,
        // instead of the whole image's (tens of MB at 128², which two threads streaming at
        // once made memory-bound). A lone image split over threads keeps whole-image GEMMs.
        let tiled = g.n >= rayon::current_num_threads();
        let rows_per_block = if tiled { (COLUMN_BLOCK_ELEMENTS / (k * ow).max(1)).clamp(1, oh) } else { oh };
        let pointwise = g.is_pointwise();
        let scratch = if pointwise { 0 } else { k * rows_per_block * ow };
        let mut out = overwritten_buffer(g.n * cout * l);
        per_sample(g.n, scratch, &mut out, cout * l, |i, cols, dst, parallel| {
            let image = &x[i * g.c * g.h * g.w..][..g.c * g.h * g.w];
            if pointwise {
                // A 1×1 convolution's columns are the image itself.
                matmul_into(dst, false, w, (k, 1), image, (l, 1), (cout, l, k), parallel);
            }
            for first in (0..oh).step_by(rows_per_block).filter(|_| !pointwise) {
                let rows = first..(first + rows_per_block).min(oh);
                let block = rows.len() * ow;
                im2col_rows(image, &g, rows, cols, parallel);
                matmul_into_rows(&mut dst[first * ow..], l, false, w, (k, 1), &cols[..k * block], (block, 1), (cout, block, k), parallel);
            }
            if let Some(epilogue) = &self.epilogue {
                epilogue.apply(dst, l);
            }
        });
        Ok((CpuStorage::F32(out), Shape::from((g.n, cout, g.out_h(), g.out_w()))))
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dy = dy.contiguous()?;
        let (cout, c, kh, kw) = w.dims4()?;
        let same_size = self.stride == 1 && kh == kw && 2 * self.pad == kh - 1;
        let dx = if same_size {
            // Stride 1, "same" padding: the input gradient is the convolution of the output
            // gradient with the transposed, spatially flipped kernel.
            let flip = Tensor::new((0..kh as u32).rev().collect::<Vec<u32>>(), w.device())?;
            let wt = w.transpose(0, 1)?.contiguous()?.index_select(&flip, 2)?.index_select(&flip, 3)?;
            dy.apply_op2_no_bwd(&wt, &Conv2dOp { stride: 1, pad: self.pad, epilogue: None })?
        } else {
            let (_, _, h, wd) = x.dims4()?;
            dy.apply_op2_no_bwd(&w.contiguous()?, &ConvGradInput { stride: self.stride, pad: self.pad, h, w: wd })?
        };
        let dw = x.contiguous()?.apply_op2_no_bwd(&dy, &ConvGradWeight { stride: self.stride, pad: self.pad, kh, kw })?;
        debug_assert_eq!(dw.dims(), &[cout, c, kh, kw]);
        Ok((Some(dx), Some(dw)))
    }
}

/// `(dy [N,Cout,Ho,Wo], w [Cout,C,kh,kw]) → dx [N,C,H,W]` through columns and col2im (any stride).
struct ConvGradInput {
    stride: usize,
    pad: usize,
    h: usize,
    w: usize,
}

impl CustomOp2 for ConvGradInput {
    fn name(&self) -> &'static str {
        "segctl-conv2d-grad-input"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let dy = contiguous_f32(s1, l1, "conv2d grad")?;
        let w = contiguous_f32(s2, l2, "conv2d grad")?;
        let (n, cout, oh, ow) = l1.shape().dims4()?;
        let (_, c, kh, kw) = l2.shape().dims4()?;
        let g = ColGeometry { n, c, h: self.h, w: self.w, kh, kw, stride: self.stride, pad: self.pad };
        let (l, k) = (oh * ow, g.rows());
        let mut out = vec![0f32; n * c * self.h * self.w];
        per_sample(n, k * l, &mut out, c * self.h * self.w, |i, cols, dst, parallel| {
            // cols [K, L] = wᵀ [K, Cout] · dy_i [Cout, L]
            matmul_into(cols, false, w, (1, k), &dy[i * cout * l..][..cout * l], (l, 1), (k, l, cout), parallel);
            col2im_single(cols, &g, dst, parallel);
        });
        Ok((CpuStorage::F32(out), Shape::from((n, c, self.h, self.w))))
    }
}

/// `(x [N,C,H,W], dy [N,Cout,Ho,Wo]) → dw [Cout,C,kh,kw] = Σ_n dy_n · im2col(x_n)ᵀ`.
struct ConvGradWeight {
    stride: usize,
    pad: usize,
    kh: usize,
    kw: usize,
}

impl CustomOp2 for ConvGradWeight {
    fn name(&self) -> &'static str {
        "segctl-conv2d-grad-weight"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s1, l1, "conv2d grad")?;
        let dy = contiguous_f32(s2, l2, "conv2d grad")?;
        let (n, c, h, w) = l1.shape().dims4()?;
        let (_, cout, oh, ow) = l2.shape().dims4()?;
        let g = ColGeometry { n, c, h, w, kh: self.kh, kw: self.kw, stride: self.stride, pad: self.pad };
        if let Some(shape) = direct_shape(&g, cout) {
            let out = direct::grad_weight(x, dy, shape);
            return Ok((CpuStorage::F32(out), Shape::from((cout, c, self.kh, self.kw))));
        }
        let (l, k) = (oh * ow, g.rows());
        // Whole-image columns: splitting the reduction into row blocks (as the forward pass
        // does) re-reads the [Cout, K] accumulator per block and measured no faster.
        let pointwise = g.is_pointwise();
        let sample = |i: usize, cols: &mut [f32], dst: &mut [f32], accumulate: bool, parallel: bool| {
            let image = &x[i * c * h * w..][..c * h * w];
            let cols: &[f32] = if pointwise {
                image
            } else {
                im2col_single(image, &g, cols, parallel);
                cols
            };
            // dst [Cout, K] += dy_i [Cout, L] · colsᵀ [L, K]
            matmul_into(dst, accumulate, &dy[i * cout * l..][..cout * l], (l, 1), cols, (1, l), (cout, k, l), parallel);
        };
        let scratch = if pointwise { 0 } else { k * l };
        let out = if n < rayon::current_num_threads() {
            let mut cols = overwritten_buffer(scratch);
            let mut out = vec![0f32; cout * k];
            for i in 0..n {
                sample(i, &mut cols, &mut out, i > 0, true);
            }
            out
        } else {
            // Per-thread partial sums, added at the end.
            (0..n)
                .into_par_iter()
                .fold(
                    || (overwritten_buffer(scratch), vec![0f32; cout * k], false),
                    |(mut cols, mut acc, started), i| {
                        sample(i, &mut cols, &mut acc, started, false);
                        (cols, acc, true)
                    },
                )
                .map(|(_, acc, _)| acc)
                .reduce(|| vec![0f32; cout * k], |mut a, b| {
                    a.iter_mut().zip(&b).for_each(|(x, y)| *x += y);
                    a
                })
        };
        Ok((CpuStorage::F32(out), Shape::from((cout, c, self.kh, self.kw))))
    }
}

fn uses_gemm_path(x: &Tensor) -> bool {
    matches!(x.device(), Device::Cpu) && x.dtype() == candle_core::DType::F32
}

/// 2-D convolution, `x [N, Cin, H, W]`, `weight [Cout, Cin, k, k]`, optional `bias [Cout]`.
pub fn conv2d(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>, stride: usize, pad: usize) -> Result<Tensor> {
    let out = if uses_gemm_path(x) {
        x.contiguous()?.apply_op2(&weight.contiguous()?, Conv2dOp { stride, pad, epilogue: None })?
    } else {
        x.conv2d(weight, pad, stride, 1, 1)?
    };
    match bias {
        Some(b) => out.broadcast_add(&b.reshape((1, (), 1, 1))?),
        None => Ok(out),
    }
}

/// Inference-only 2-D convolution with a per-channel bias and a clamp fused in (a folded
/// BatchNorm and its activation): one pass over the output, and no autograd graph recorded.
pub fn conv2d_inference(x: &Tensor, weight: &Tensor, epilogue: Epilogue, stride: usize, pad: usize) -> Result<Tensor> {
    if uses_gemm_path(x) {
        x.contiguous()?.apply_op2_no_bwd(&weight.contiguous()?, &Conv2dOp { stride, pad, epilogue: Some(epilogue) })
    } else {
        bias_clamp(x.conv2d(weight, pad, stride, 1, 1)?, &epilogue)
    }
}

/// `clamp(y + bias[channel], min, max)`, inference only. On CPU it overwrites `y`, which must
/// be a fresh result nothing else holds (the output of the convolution just run).
pub fn bias_clamp(y: Tensor, epilogue: &Epilogue) -> Result<Tensor> {
    if uses_gemm_path(&y) && y.is_contiguous() {
        y.inplace_op1(epilogue)?;
        return Ok(y);
    }
    let bias = Tensor::new(epilogue.bias.as_slice(), y.device())?.reshape((1, (), 1, 1))?;
    y.broadcast_add(&bias)?.clamp(epilogue.min, epilogue.max)
}

/// Transposed 2-D convolution (PyTorch `ConvTranspose2d`, no output padding),
/// `x [N, Cin, h, w]`, `weight [Cin, Cout, k, k]`.
pub fn conv_transpose2d(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    stride: usize,
    pad: usize,
) -> Result<Tensor> {
    let out = if uses_gemm_path(x) {
        let (n, c, h, w) = x.dims4()?;
        let (cin, cout, kh, kw) = weight.dims4()?;
        if cin != c {
            bail!("conv_transpose2d: input has {c} channels, weight expects {cin}");
        }
        let out_h = (h - 1) * stride + kh - 2 * pad;
        let out_w = (w - 1) * stride + kw - 2 * pad;
        let g = ColGeometry { n, c: cout, h: out_h, w: out_w, kh, kw, stride, pad };
        debug_assert_eq!((g.out_h(), g.out_w()), (h, w));
        let x_flat = x.transpose(0, 1)?.reshape((cin, n * h * w))?;
        let cols = weight.reshape((cin, cout * kh * kw))?.t()?.matmul(&x_flat)?; // [Cout·k·k, N·h·w]
        cols.apply_op1(Col2Im(g))?
    } else {
        x.conv_transpose2d(weight, pad, 0, stride, 1)?
    };
    match bias {
        Some(b) => out.broadcast_add(&b.reshape((1, (), 1, 1))?),
        None => Ok(out),
    }
}

/// Output columns `lo..hi` of a row and the input column the first of them reads.
#[derive(Debug, Clone, Copy)]
struct RowSpan {
    lo: usize,
    hi: usize,
    first: usize,
}

#[derive(Debug, Clone, Copy)]
struct DwGeometry {
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    k: usize,
    stride: usize,
    pad: usize,
}

impl DwGeometry {
    fn oh(&self) -> usize {
        (self.h + 2 * self.pad - self.k) / self.stride + 1
    }
    fn ow(&self) -> usize {
        (self.w + 2 * self.pad - self.k) / self.stride + 1
    }
    /// Calls `f(oy, iy, tap, span)` for every output row `oy`, input row `iy` and kernel tap
    /// that meet: output columns `span.lo..span.hi` read input columns `span.first`,
    /// `span.first + stride`, … (row-wise, so the callers' inner loops vectorize).
    #[inline]
    fn for_each_row_tap(&self, mut f: impl FnMut(usize, usize, usize, RowSpan)) {
        let (oh, ow) = (self.oh(), self.ow());
        let spans: Vec<RowSpan> = (0..self.k)
            .map(|kx| {
                let (lo, hi) = valid_columns(ow, self.w, kx, self.stride, self.pad);
                let first = (lo * self.stride + kx).saturating_sub(self.pad);
                RowSpan { lo, hi, first }
            })
            .collect();
        for oy in 0..oh {
            for ky in 0..self.k {
                let iy = (oy * self.stride + ky) as isize - self.pad as isize;
                if iy < 0 || iy >= self.h as isize {
                    continue;
                }
                for (kx, span) in spans.iter().enumerate() {
                    if span.lo < span.hi {
                        f(oy, iy as usize, ky * self.k + kx, *span);
                    }
                }
            }
        }
    }
}

/// Depthwise convolution forward: `(x [N,C,H,W], w [C,1,k,k]) → [N,C,Ho,Wo]`.
struct Depthwise(DwGeometry);

impl CustomOp2 for Depthwise {
    fn name(&self) -> &'static str {
        "segctl-depthwise"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = self.0;
        let x = contiguous_f32(s1, l1, "depthwise")?;
        let w = contiguous_f32(s2, l2, "depthwise")?;
        let (oh, ow) = (g.oh(), g.ow());
        let mut out = vec![0f32; g.n * g.c * oh * ow];
        out.par_chunks_mut(oh * ow).enumerate().for_each(|(plane_index, dst)| {
            let c = plane_index % g.c;
            let src = &x[plane_index * g.h * g.w..][..g.h * g.w];
            let taps = &w[c * g.k * g.k..][..g.k * g.k];
            g.for_each_row_tap(|oy, iy, t, span| {
                let (tap, out_row, in_row) = (taps[t], &mut dst[oy * ow..][span.lo..span.hi], &src[iy * g.w..][span.first..]);
                for (d, x) in out_row.iter_mut().zip(in_row.iter().step_by(g.stride)) {
                    *d += tap * *x;
                }
            });
        });
        Ok((CpuStorage::F32(out), Shape::from((g.n, g.c, oh, ow))))
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let gx = grad.apply_op2_no_bwd(&w.contiguous()?, &DepthwiseGradInput(self.0))?;
        let gw = x.contiguous()?.apply_op2_no_bwd(&grad, &DepthwiseGradWeight(self.0))?;
        Ok((Some(gx), Some(gw)))
    }
}

/// `(grad_out [N,C,Ho,Wo], w [C,1,k,k]) → grad_x [N,C,H,W]`.
struct DepthwiseGradInput(DwGeometry);

impl CustomOp2 for DepthwiseGradInput {
    fn name(&self) -> &'static str {
        "segctl-depthwise-grad-input"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = self.0;
        let go = contiguous_f32(s1, l1, "depthwise grad")?;
        let w = contiguous_f32(s2, l2, "depthwise grad")?;
        let (oh, ow) = (g.oh(), g.ow());
        let mut out = vec![0f32; g.n * g.c * g.h * g.w];
        out.par_chunks_mut(g.h * g.w).enumerate().for_each(|(plane_index, dst)| {
            let c = plane_index % g.c;
            let src = &go[plane_index * oh * ow..][..oh * ow];
            let taps = &w[c * g.k * g.k..][..g.k * g.k];
            g.for_each_row_tap(|oy, iy, t, span| {
                let (tap, grad_row, in_row) = (taps[t], &src[oy * ow..][span.lo..span.hi], &mut dst[iy * g.w..][span.first..]);
                for (d, gy) in in_row.iter_mut().step_by(g.stride).zip(grad_row) {
                    *d += tap * *gy;
                }
            });
        });
        Ok((CpuStorage::F32(out), Shape::from((g.n, g.c, g.h, g.w))))
    }
}

/// `(x [N,C,H,W], grad_out [N,C,Ho,Wo]) → grad_w [C,1,k,k]`.
struct DepthwiseGradWeight(DwGeometry);

impl CustomOp2 for DepthwiseGradWeight {
    fn name(&self) -> &'static str {
        "segctl-depthwise-grad-weight"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = self.0;
        let x = contiguous_f32(s1, l1, "depthwise grad")?;
        let go = contiguous_f32(s2, l2, "depthwise grad")?;
        let (oh, ow) = (g.oh(), g.ow());
        let kk = g.k * g.k;
        let mut out = vec![0f32; g.c * kk];
        out.par_chunks_mut(kk).enumerate().for_each(|(c, dst)| {
            for n in 0..g.n {
                let plane = n * g.c + c;
                let src = &x[plane * g.h * g.w..][..g.h * g.w];
                let grad = &go[plane * oh * ow..][..oh * ow];
                g.for_each_row_tap(|oy, iy, t, span| {
                    let (grad_row, in_row) = (&grad[oy * ow..][span.lo..span.hi], &src[iy * g.w..][span.first..]);
                    dst[t] += grad_row.iter().zip(in_row.iter().step_by(g.stride)).map(|(gy, x)| gy * x).sum::<f32>();
                });
            }
        });
        Ok((CpuStorage::F32(out), Shape::from((g.c, 1, g.k, g.k))))
    }
}

/// Depthwise 3×3-style convolution, `x [N,C,H,W]`, `weight [C,1,k,k]`, symmetric padding.
pub fn depthwise_conv2d(x: &Tensor, weight: &Tensor, stride: usize, pad: usize) -> Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    let (wc, one, k, k2) = weight.dims4()?;
    if wc != c || one != 1 || k != k2 {
        bail!("depthwise_conv2d: weight {:?} does not fit input {:?}", weight.dims(), x.dims());
    }
    if uses_gemm_path(x) {
        let g = DwGeometry { n, c, h, w, k, stride, pad };
        x.contiguous()?.apply_op2(&weight.contiguous()?, Depthwise(g))
    } else {
        x.conv2d(weight, pad, stride, 1, c)
    }
}

/// 2×2 max pooling with stride 2 (`[N,C,H,W] → [N,C,H/2,W/2]`, odd edges dropped); its
/// backward routes each gradient to the first maximum of its window.
struct MaxPool2x2;

impl CustomOp1 for MaxPool2x2 {
    fn name(&self) -> &'static str {
        "segctl-maxpool2x2"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(storage, layout, "max-pool")?;
        let (n, c, h, w) = layout.shape().dims4()?;
        let (oh, ow) = (h / 2, w / 2);
        let mut out = vec![0f32; n * c * oh * ow];
        out.par_chunks_mut(oh * ow).zip(x.par_chunks(h * w)).for_each(|(dst, src)| {
            for oy in 0..oh {
                let (r0, r1) = (&src[2 * oy * w..][..w], &src[(2 * oy + 1) * w..][..w]);
                for ox in 0..ow {
                    dst[oy * ow + ox] = r0[2 * ox].max(r0[2 * ox + 1]).max(r1[2 * ox]).max(r1[2 * ox + 1]);
                }
            }
        });
        Ok((CpuStorage::F32(out), Shape::from((n, c, oh, ow))))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(x.contiguous()?.apply_op2_no_bwd(&grad.contiguous()?, &MaxPool2x2Grad)?))
    }
}

/// `(x, dy) → dx` for [`MaxPool2x2`].
struct MaxPool2x2Grad;

impl CustomOp2 for MaxPool2x2Grad {
    fn name(&self) -> &'static str {
        "segctl-maxpool2x2-grad"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s1, l1, "max-pool grad")?;
        let dy = contiguous_f32(s2, l2, "max-pool grad")?;
        let (n, c, h, w) = l1.shape().dims4()?;
        let (oh, ow) = (h / 2, w / 2);
        let mut out = vec![0f32; n * c * h * w];
        out.par_chunks_mut(h * w).zip(x.par_chunks(h * w)).zip(dy.par_chunks(oh * ow)).for_each(|((dst, src), g)| {
            for oy in 0..oh {
                for ox in 0..ow {
                    let idx = [2 * oy * w + 2 * ox, 2 * oy * w + 2 * ox + 1, (2 * oy + 1) * w + 2 * ox, (2 * oy + 1) * w + 2 * ox + 1];
                    let mut best = idx[0];
                    for &i in &idx[1..] {
                        if src[i] > src[best] {
                            best = i;
                        }
                    }
                    dst[best] = g[oy * ow + ox];
                }
            }
        });
        Ok((CpuStorage::F32(out), Shape::from((n, c, h, w))))
    }
}

/// 2×2 max pooling, stride 2.
pub fn max_pool2x2(x: &Tensor) -> Result<Tensor> {
    if uses_gemm_path(x) { x.contiguous()?.apply_op1(MaxPool2x2) } else { x.max_pool2d(2) }
}

/// Nearest-neighbour 2× upsampling through broadcasting (differentiable on every device;
/// candle's own upsample backward is slow and overwrites other gradients of its input).
pub fn upsample_nearest2x(x: &Tensor) -> Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    x.reshape((n, c, h, 1, w, 1))?.broadcast_as((n, c, h, 2, w, 2))?.reshape((n, c, 2 * h, 2 * w))
}

/// Depth-to-space: `[N, C·r², H, W]` → `[N, C, H·r, W·r]`.
pub fn pixel_shuffle(x: &Tensor, r: usize) -> Result<Tensor> {
    let (n, crr, h, w) = x.dims4()?;
    let c = crr / (r * r);
    x.reshape((n, c, r, r, h, w))?.permute((0, 1, 4, 2, 5, 3))?.reshape((n, c, h * r, w * r))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Var;

    fn rand(shape: &[usize], seed: u64) -> Tensor {
        let mut rng = crate::util::rng::Rng::new(seed);
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| rng.normal()).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
    }

    /// Compares an op and candle's reference for outputs and for gradients of a weighted sum.
    fn check(
        ours: impl Fn(&Tensor, &Tensor) -> Result<Tensor>,
        reference: impl Fn(&Tensor, &Tensor) -> Result<Tensor>,
        x_shape: &[usize],
        w_shape: &[usize],
    ) {
        let x = Var::from_tensor(&rand(x_shape, 1)).unwrap();
        let w = Var::from_tensor(&rand(w_shape, 2)).unwrap();
        let a = ours(x.as_tensor(), w.as_tensor()).unwrap();
        let b = reference(x.as_tensor(), w.as_tensor()).unwrap();
        assert_eq!(a.dims(), b.dims());
        assert!(max_diff(&a, &b) < 1e-4, "forward differs by {}", max_diff(&a, &b));
        let probe = rand(a.dims(), 3);
        let ga = (&a * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        let gb = (&b * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        for v in [&x, &w] {
            let (da, db) = (ga.get(v).unwrap(), gb.get(v).unwrap());
            assert!(max_diff(da, db) < 1e-3, "gradient differs by {}", max_diff(da, db));
        }
    }

    #[test]
    fn fused_inference_epilogue_matches_separate_ops() {
        // Direct 3×3 kernel (narrow), GEMM path (wide), strided GEMM path.
        for (cin, cout, k, stride, pad) in [(4, 6, 3, 1, 1), (40, 24, 3, 1, 1), (5, 7, 3, 2, 1)] {
            let x = rand(&[2, cin, 9, 9], 1);
            let w = rand(&[cout, cin, k, k], 2);
            let bias: Vec<f32> = (0..cout).map(|c| c as f32 * 0.7 - 2.0).collect();
            let b = Tensor::new(bias.as_slice(), &Device::Cpu).unwrap().reshape((1, (), 1, 1)).unwrap();
            let reference = conv2d(&x, &w, None, stride, pad).unwrap().broadcast_add(&b).unwrap().clamp(0f32, 6f32).unwrap();
            let epilogue = Epilogue { bias: bias.clone(), min: 0.0, max: 6.0 };
            let fused = conv2d_inference(&x, &w, epilogue.clone(), stride, pad).unwrap();
            assert!(max_diff(&fused, &reference) < 1e-5, "fused conv differs by {}", max_diff(&fused, &reference));
            let in_place = bias_clamp(conv2d(&x, &w, None, stride, pad).unwrap(), &epilogue).unwrap();
            assert!(max_diff(&in_place, &reference) < 1e-5);
            // Both clamp ends are actually exercised.
            let values = fused.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert!(values.iter().any(|v| *v == 0.0) && values.iter().any(|v| *v == 6.0));
        }
    }

    #[test]
    fn gemm_conv_matches_candle() {
        for (stride, pad, k) in [(1, 1, 3), (2, 1, 3), (1, 0, 1), (2, 0, 1), (1, 2, 5), (2, 3, 7), (3, 1, 3)] {
            check(
                |x, w| conv2d(x, w, None, stride, pad),
                |x, w| x.conv2d(w, pad, stride, 1, 1),
                &[2, 3, 9, 9], // square: candle's reference backward mishandles unequal H and W
                &[5, 3, k, k],
            );
        }
    }

    #[test]
    fn batch_of_one_forward_and_gradients() {
        // In a pool of 4 threads one image takes the every-thread-per-image path, in a pool of
        // 1 the image-per-thread path: both, whatever this machine's core count.
        for threads in [1, 4] {
            rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap().install(batch_of_one_cases);
        }
    }

    fn batch_of_one_cases() {
        check(|x, w| conv2d(x, w, None, 1, 1), |x, w| x.conv2d(w, 1, 1, 1, 1), &[1, 24, 9, 9], &[6, 24, 3, 3]);
        check(|x, w| conv2d(x, w, None, 1, 1), |x, w| x.conv2d(w, 1, 1, 1, 1), &[1, 8, 9, 9], &[8, 8, 3, 3]);
        check(|x, w| conv2d(x, w, None, 2, 1), |x, w| x.conv2d(w, 1, 2, 1, 1), &[1, 3, 9, 9], &[5, 3, 3, 3]);
        check(|x, w| conv_transpose2d(x, w, None, 2, 1), |x, w| x.conv_transpose2d(w, 1, 0, 2, 1), &[1, 4, 5, 5], &[4, 3, 4, 4]);
        check(|x, w| depthwise_conv2d(x, w, 1, 1), |x, w| x.conv2d(w, 1, 1, 1, 4), &[1, 4, 7, 7], &[4, 1, 3, 3]);
    }

    #[test]
    fn max_pool_ties_route_the_gradient_to_the_first_maximum() {
        // Every window of this input is four equal values.
        let x = Var::from_tensor(&Tensor::ones((1, 2, 4, 4), candle_core::DType::F32, &Device::Cpu).unwrap()).unwrap();
        let y = max_pool2x2(x.as_tensor()).unwrap();
        let probe = rand(y.dims(), 8);
        let grads = (&y * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        let dx = grads.get(&x).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let ps = probe.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for plane in 0..2 {
            for oy in 0..2 {
                for ox in 0..2 {
                    let first = plane * 16 + 2 * oy * 4 + 2 * ox;
                    assert_eq!(dx[first], ps[plane * 4 + oy * 2 + ox]);
                    for other in [first + 1, first + 4, first + 5] {
                        assert_eq!(dx[other], 0.0);
                    }
                }
            }
        }
    }

    #[test]
    fn gemm_conv_in_column_blocks_matches_candle() {
        // 40·9 rows × 64 columns: two output rows per L2 block, so 32 blocks per image.
        check(
            |x, w| conv2d(x, w, None, 1, 1),
            |x, w| x.conv2d(w, 1, 1, 1, 1),
            &[2, 40, 64, 64],
            &[8, 40, 3, 3],
        );
    }

    #[test]
    fn direct_and_gemm_convolutions_agree() {
        // 8 channels take the direct kernels, 24 the GEMM path; both against candle.
        for c in [8, 24] {
            check(
                |x, w| conv2d(x, w, None, 1, 1),
                |x, w| x.conv2d(w, 1, 1, 1, 1),
                &[2, c, 17, 17],
                &[c, c, 3, 3],
            );
        }
    }

    #[test]
    fn gemm_conv_transpose_matches_candle() {
        check(
            |x, w| conv_transpose2d(x, w, None, 2, 1),
            |x, w| x.conv_transpose2d(w, 1, 0, 2, 1),
            &[2, 4, 5, 6],
            &[4, 3, 4, 4],
        );
    }

    #[test]
    fn depthwise_matches_grouped_conv() {
        for stride in [1, 2] {
            check(
                |x, w| depthwise_conv2d(x, w, stride, 1),
                |x, w| x.conv2d(w, 1, stride, 1, 4),
                &[2, 4, 7, 7],
                &[4, 1, 3, 3],
            );
        }
    }

    #[test]
    fn max_pool_forward_and_gradient() {
        let x = Var::from_tensor(&rand(&[2, 3, 6, 6], 5)).unwrap();
        let ours = max_pool2x2(x.as_tensor()).unwrap();
        assert_eq!(max_diff(&ours, &x.as_tensor().max_pool2d(2).unwrap()), 0.0);
        // The gradient lands on each window's maximum, unscaled (candle's own max-pool
        // backward multiplies it by 1/4, so it is no reference here).
        let probe = rand(ours.dims(), 6);
        let grads = (&ours * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        let dx = grads.get(&x).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let xs = x.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let ps = probe.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for plane in 0..6 {
            for oy in 0..3 {
                for ox in 0..3 {
                    let idx: Vec<usize> = [(0, 0), (0, 1), (1, 0), (1, 1)]
                        .iter()
                        .map(|(dy, dx)| plane * 36 + (2 * oy + dy) * 6 + 2 * ox + dx)
                        .collect();
                    let best = *idx.iter().max_by(|a, b| xs[**a].partial_cmp(&xs[**b]).unwrap()).unwrap();
                    for i in idx {
                        let expect = if i == best { ps[plane * 9 + oy * 3 + ox] } else { 0.0 };
                        assert_eq!(dx[i], expect);
                    }
                }
            }
        }
    }

    #[test]
    fn upsample_and_shuffle() {
        let x = Tensor::arange(0f32, 4., &Device::Cpu).unwrap().reshape((1, 1, 2, 2)).unwrap();
        let up = upsample_nearest2x(&x).unwrap();
        assert_eq!(up.flatten_all().unwrap().to_vec1::<f32>().unwrap(), vec![0., 0., 1., 1., 0., 0., 1., 1., 2., 2., 3., 3., 2., 2., 3., 3.]);
        let y = Tensor::arange(0f32, 4., &Device::Cpu).unwrap().reshape((1, 4, 1, 1)).unwrap();
        let s = pixel_shuffle(&y, 2).unwrap();
        assert_eq!(s.flatten_all().unwrap().to_vec1::<f32>().unwrap(), vec![0., 1., 2., 3.]);
    }
}
