//! The plan's kernels one layer at a time, over a caller's own buffers: what training's CPU
//! ops run for their forward passes and input gradients (a convolution's input gradient is a
//! convolution too), with the same packing, Winograd choice and register tiles as a plan.
//!
//! Maps are padded NHWC, as in a plan: `n` images of `(h + 2) × (w + 2)` pixels of `c`
//! channels, the one-pixel border zero, followed by [`slack_floats`] readable floats. A
//! kernel writes the interior of its output and never its border (see [`zero_borders`]).

use anyhow::{Result, bail, ensure};

use super::compile::lower_conv;
use super::conv::Split;
use super::graph::{ConvKind, ConvOp};
use super::plan::{Ctx, StepKind, View, WinogradPolicy, kind_name};
use super::pool::MaxPoolStep;
use super::simd::Simd;
use super::{Isa, SimdJob, dispatch};

pub use super::plan::slack_floats;

/// How to compile one kernel.
#[derive(Debug, Clone, Copy)]
pub struct KernelOptions {
    pub isa: Isa,
    pub winograd: WinogradPolicy,
    /// The batch the kernel is chosen for.
    pub batch: usize,
}

/// One compiled layer.
#[derive(Debug, Clone)]
pub struct Kernel {
    isa: Isa,
    kind: StepKind,
    input: (usize, usize, usize),
    output: (usize, usize, usize),
}

/// How a call is divided among threads: `items` independent pieces of work.
#[derive(Debug, Clone, Copy)]
pub struct Work {
    split: Split,
    pub items: usize,
}

/// The output map size of `op` on an `h × w` input.
pub fn conv_output_size(op: &ConvOp, h: usize, w: usize) -> Result<(usize, usize)> {
    match op.kind {
        ConvKind::Transposed => {
            ensure!(op.k == 4 && op.stride == 2 && op.pad == 1, "transposed convolutions must be 4×4, stride 2, padding 1");
            Ok((2 * h, 2 * w))
        }
        _ => {
            ensure!(h + 2 * op.pad >= op.k && w + 2 * op.pad >= op.k, "a {h}×{w} map is smaller than the {}×{} kernel", op.k, op.k);
            Ok(((h + 2 * op.pad - op.k) / op.stride + 1, (w + 2 * op.pad - op.k) / op.stride + 1))
        }
    }
}

impl Kernel {
    /// A convolution of an `h × w` map of `op.cin` channels into a map of `op.cout`
    /// channels, its weights packed from `op` (bias and activation in the epilogue).
    pub fn conv(op: &ConvOp, h: usize, w: usize, options: &KernelOptions) -> Result<Kernel> {
        ensure!(options.isa.supported(), "this CPU cannot run the {} kernels", options.isa.name());
        let (oh, ow) = conv_output_size(op, h, w)?;
        let cout = op.cout;
        let input = View { buffer: 0, h, w, cs: op.cin, c0: 0, c: op.cin };
        let output = View { buffer: 1, h: oh, w: ow, cs: cout, c0: 0, c: cout };
        let kind = lower_conv(op, input, output, None, 1, options.isa.lanes(), options.winograd, options.batch.max(1))?;
        Ok(Kernel { isa: options.isa, kind, input: (h, w, op.cin), output: (oh, ow, cout) })
    }

    /// 2×2 max pooling, stride 2, of an `h × w` map of `c` channels.
    pub fn max_pool(h: usize, w: usize, c: usize, isa: Isa) -> Result<Kernel> {
        if h < 2 || w < 2 {
            bail!("max pooling needs a map of at least 2×2, not {h}×{w}");
        }
        let input = View { buffer: 0, h, w, cs: c, c0: 0, c };
        let output = View { buffer: 1, h: h / 2, w: w / 2, cs: c, c0: 0, c };
        Ok(Kernel { isa, kind: StepKind::MaxPool(MaxPoolStep { input, output }), input: (h, w, c), output: (h / 2, w / 2, c) })
    }

    /// The kernel's name (as in a plan's summary: `direct`, `winograd-f4x4-3x3`, …).
    pub fn name(&self) -> &'static str {
        kind_name(&self.kind)
    }

    /// `(h, w, c)` of the input and the output map.
    pub fn input_shape(&self) -> (usize, usize, usize) {
        self.input
    }

    pub fn output_shape(&self) -> (usize, usize, usize) {
        self.output
    }

    /// Per-thread scratch floats a call needs.
    pub fn scratch_floats(&self) -> usize {
        match &self.kind {
            StepKind::Winograd(w) => w.scratch_floats(),
            _ => 0,
        }
    }

    /// The division of a batch of `n` among `threads`.
    pub fn work(&self, n: usize, threads: usize) -> Work {
        let split = self.kind.split(n, threads);
        Work { split, items: self.kind.compute_items(n, split) }
    }

    /// Runs item `item` of `work` on `n` images.
    ///
    /// # Safety
    /// `input` holds `n` padded images of the input shape with zero borders and
    /// [`slack_floats`] more readable floats; `output` has room for `n` padded output images;
    /// `scratch` holds [`Self::scratch_floats`] floats; concurrent items of one call are
    /// given different scratch.
    pub unsafe fn run(&self, input: *const f32, output: *mut f32, n: usize, work: &Work, item: usize, scratch: *mut f32) {
        struct Job<'a> {
            kind: &'a StepKind,
            bases: [usize; 2],
            n: usize,
            split: Split,
            item: usize,
            scratch: *mut f32,
        }
        impl SimdJob for Job<'_> {
            #[inline(always)]
            unsafe fn run<S: Simd>(&self) {
                unsafe {
                    let ctx = Ctx::new(&self.bases, self.n, std::ptr::null(), std::ptr::null_mut());
                    self.kind.run_item::<S>(&ctx, self.split, self.item, self.scratch)
                }
            }
        }
        let job = Job { kind: &self.kind, bases: [input as usize, output as usize], n, split: work.split, item, scratch };
        unsafe { dispatch(self.isa, &job) }
    }
}

/// Zeroes the one-pixel border of each of `n` padded `h × w` images of `cs` channels.
///
/// A row's right border and the next row's left border are adjacent, so an image's border is
/// `h + 1` runs: the top row with row 1's left pixel, one pair of pixels between each two
/// rows, and row `h`'s right pixel with the bottom row. The runs are stored inline
/// ([`zero_run`]): a `memset` call per 64–512-byte run cost more than the stores.
///
/// # Safety
/// `map` must hold the `n` images.
pub unsafe fn zero_borders(map: *mut f32, n: usize, h: usize, w: usize, cs: usize) {
    let wp = w + 2;
    let image = (h + 2) * wp * cs;
    for img in 0..n {
        unsafe {
            let base = map.add(img * image);
            zero_run(base, (wp + 1) * cs);
            for y in 1..h {
                zero_run(base.add((y * wp + wp - 1) * cs), 2 * cs);
            }
            zero_run(base.add((h * wp + wp - 1) * cs), (wp + 1) * cs);
        }
    }
}

/// Zeroes `len` floats at `p`: a short run in 16-float stores without a call to `memset`
/// (an empty `asm!` in the loop keeps LLVM from turning it back into one), a long one through
/// `memset`.
///
/// # Safety
/// `p..p + len` must be writable.
#[inline]
unsafe fn zero_run(p: *mut f32, len: usize) {
    if len >= 256 {
        unsafe { std::ptr::write_bytes(p, 0, len) };
        return;
    }
    let blocks = len / 16;
    unsafe {
        for i in 0..blocks {
            p.add(i * 16).cast::<[f32; 16]>().write_unaligned([0.0; 16]);
            #[cfg(target_arch = "x86_64")]
            std::arch::asm!("", options(nostack, preserves_flags));
        }
        for i in blocks * 16..len {
            std::ptr::write_volatile(p.add(i), 0.0);
        }
    }
}
