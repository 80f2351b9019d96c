//! Feature maps on CPU: what a CPU f32 tensor between the layers of a model holds.
//!
//! A map of `n` images, `c` channels, `h × w` pixels is a candle tensor of shape
//! `[n, h + 2, w + 2, c]`: padded NHWC, the one-pixel border zero, exactly the layout of the
//! inference engine's maps, so training runs the engine's kernels on it. Every op here keeps
//! the border zero in what it returns (outputs and gradients alike), so candle's own sums of
//! gradients keep it too. Storages this module allocates carry
//! [`slack_floats`](crate::engine::kernels::slack_floats) zero floats past the end, which the
//! register tiles may read; an input without them (one candle made) is copied once.

use std::borrow::Cow;
use std::cell::RefCell;

use candle_core::{CpuStorage, DType, Device, Layout, Result, Tensor, bail};
use rayon::prelude::*;

use crate::engine::Isa;
use crate::engine::kernels::slack_floats;
use crate::engine::maps::{MapShape, RowKernel, run_items};

static BF16: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Makes the CPU convolutions compute in bfloat16 (`train.precision: bf16`): their operands
/// (feature maps, gradients, weights) rounded to bfloat16, products accumulated in f32.
pub fn set_bf16(on: bool) {
    BF16.store(on, std::sync::atomic::Ordering::Relaxed);
}

thread_local! {
    static FORCED_BF16: std::cell::Cell<Option<bool>> = const { std::cell::Cell::new(None) };
}

/// Whether the CPU convolutions compute in bfloat16 ([`set_bf16`], or [`with_bf16`] on this
/// thread).
pub fn bf16() -> bool {
    FORCED_BF16.with(|f| f.get()).unwrap_or_else(|| BF16.load(std::sync::atomic::Ordering::Relaxed))
}

/// Runs `f` with the ops called on this thread computing in bfloat16 or not (tests).
pub fn with_bf16<R>(on: bool, f: impl FnOnce() -> R) -> R {
    let before = FORCED_BF16.with(|c| c.replace(Some(on)));
    let out = f();
    FORCED_BF16.with(|c| c.set(before));
    out
}

/// `x` rounded to the nearest bfloat16 (ties to even), as f32; NaN stays NaN.
#[inline]
pub fn round_bf16(x: f32) -> f32 {
    let bits = x.to_bits();
    if x.is_nan() {
        return x;
    }
    let rounded = bits.wrapping_add(0x7fff + ((bits >> 16) & 1)) & 0xffff_0000;
    f32::from_bits(rounded)
}

/// A copy of `x` rounded to bfloat16, in parallel chunks.
pub fn rounded_bf16(x: &[f32]) -> Vec<f32> {
    let mut out = vec![0f32; x.len()];
    out.par_chunks_mut(1 << 15).zip(x.par_chunks(1 << 15)).for_each(|(o, i)| {
        for (o, i) in o.iter_mut().zip(i) {
            *o = round_bf16(*i);
        }
    });
    out
}

/// `x` as the convolutions read it: rounded to bfloat16 under [`set_bf16`], else as is.
pub fn operand(x: &[f32]) -> Cow<'_, [f32]> {
    if bf16() { Cow::Owned(rounded_bf16(x)) } else { Cow::Borrowed(x) }
}

/// Whether `x` takes the CPU path (a padded NHWC feature map), not candle's own NCHW ops.
pub fn on_cpu_path(x: &Tensor) -> bool {
    matches!(x.device(), Device::Cpu) && x.dtype() == DType::F32
}

thread_local! {
    /// An instruction set forced on this thread (tests of every path).
    static FORCED_ISA: std::cell::Cell<Option<Isa>> = const { std::cell::Cell::new(None) };
}

/// The instruction set of the CPU kernels: [`Isa::active`], or one forced on this thread by
/// [`with_isa`].
pub fn isa() -> Result<Isa> {
    if let Some(isa) = FORCED_ISA.with(|f| f.get()) {
        return Ok(isa);
    }
    Isa::active().map_err(|e| candle_core::Error::Msg(e.to_string()))
}

/// Runs `f` with the ops on this thread using `isa`'s kernels (which the CPU must have).
pub fn with_isa<R>(isa: Isa, f: impl FnOnce() -> R) -> R {
    let before = FORCED_ISA.with(|c| c.replace(Some(isa)));
    let out = f();
    FORCED_ISA.with(|c| c.set(before));
    out
}

/// `(n, shape)` of a feature map's layout `[n, h + 2, w + 2, c]`.
pub fn map_of(layout: &Layout) -> Result<(usize, MapShape)> {
    let (n, hp, wp, c) = layout.shape().dims4()?;
    if hp < 3 || wp < 3 {
        bail!("not a padded feature map: shape {:?}", layout.shape().dims());
    }
    Ok((n, MapShape::new(hp - 2, wp - 2, c)))
}

/// `(n, shape)` of a feature-map tensor.
pub fn tensor_map(x: &Tensor) -> Result<(usize, MapShape)> {
    let (n, hp, wp, c) = x.dims4()?;
    if hp < 3 || wp < 3 {
        bail!("not a padded feature map: shape {:?}", x.dims());
    }
    Ok((n, MapShape::new(hp - 2, wp - 2, c)))
}

/// The candle shape of `n` maps of `m`.
pub fn shape_of(n: usize, m: MapShape) -> (usize, usize, usize, usize) {
    (n, m.h + 2, m.w + 2, m.c)
}

/// Floats of `n` maps of `m`, without slack.
pub fn floats(n: usize, m: MapShape) -> usize {
    n * m.image_floats()
}

/// The contiguous f32 data of a storage.
pub fn data<'a>(storage: &'a CpuStorage, layout: &Layout, what: &str) -> Result<&'a [f32]> {
    let all = match storage {
        CpuStorage::F32(d) => d.as_slice(),
        _ => bail!("{what}: only f32 is supported"),
    };
    match layout.contiguous_offsets() {
        Some((a, b)) => Ok(&all[a..b]),
        None => bail!("{what}: the input must be contiguous"),
    }
}

/// A map's data with at least `slack` readable floats past its end: in place when the storage
/// has them (this module's allocations do), else a copy.
pub fn with_slack<'a>(storage: &'a CpuStorage, layout: &Layout, slack: usize, what: &str) -> Result<Cow<'a, [f32]>> {
    let all = match storage {
        CpuStorage::F32(d) => d.as_slice(),
        _ => bail!("{what}: only f32 is supported"),
    };
    let Some((a, b)) = layout.contiguous_offsets() else { bail!("{what}: the input must be contiguous") };
    if all.len() >= b + slack {
        Ok(Cow::Borrowed(&all[a..b + slack]))
    } else {
        let mut copy = Vec::with_capacity(b - a + slack);
        copy.extend_from_slice(&all[a..b]);
        copy.resize(b - a + slack, 0.0);
        Ok(Cow::Owned(copy))
    }
}

/// Slack of a map `m` (floats the tiles may read past its end).
pub fn slack_of(m: MapShape) -> usize {
    slack_floats(m.w, m.cs)
}

/// A buffer for `n` maps of `m` and their slack: every float of the maps is written by the
/// caller before it is read (kernels that write the whole map, borders included); the slack is
/// zero.
#[allow(clippy::uninit_vec)]
pub fn alloc_map(n: usize, m: MapShape) -> Vec<f32> {
    let len = floats(n, m);
    let slack = slack_of(m);
    let mut buffer = Vec::with_capacity(len + slack);
    // SAFETY: f32 has no invalid bit patterns; callers overwrite `..len` before reading, and
    // the slack is zeroed here.
    unsafe { buffer.set_len(len + slack) };
    buffer[len..].fill(0.0);
    buffer
}

/// [`alloc_map`] followed by `extra` more zero floats after the slack (a map and a few
/// per-channel results in one storage), allocated once.
#[allow(clippy::uninit_vec)]
pub fn alloc_map_extra(n: usize, m: MapShape, extra: usize) -> Vec<f32> {
    let len = floats(n, m);
    let total = len + slack_of(m) + extra;
    let mut buffer = Vec::with_capacity(total);
    // SAFETY: as in `alloc_map`; everything after the map is zeroed here.
    unsafe { buffer.set_len(total) };
    buffer[len..].fill(0.0);
    buffer
}

/// Zeroed floats (gradient accumulators and the like).
pub fn zeros(len: usize) -> Vec<f32> {
    vec![0f32; len]
}

/// Runs every item of `kernel` on the current rayon pool, in chunks of about `grain` items.
pub fn par_items<K: RowKernel>(isa: Isa, kernel: &K, grain: usize) {
    let items = kernel.items();
    let threads = rayon::current_num_threads();
    if threads <= 1 || items <= 1 {
        // SAFETY: the caller built the kernel over valid buffers; `isa` is supported.
        unsafe { run_items(isa, kernel, 0..items) };
        return;
    }
    let grain = grain.max(1).min(items.div_ceil(threads));
    (0..items.div_ceil(grain)).into_par_iter().for_each(|chunk| {
        let lo = chunk * grain;
        // SAFETY: items write disjoint memory.
        unsafe { run_items(isa, kernel, lo..(lo + grain).min(items)) };
    });
}

/// Items per parallel chunk for a kernel over rows of `w` pixels of `c` channels: about
/// 64 KiB of data each.
pub fn row_grain(w: usize, c: usize) -> usize {
    ((16 << 10) / (w * c).max(1)).max(1)
}

thread_local! {
    /// Each thread's scratch, kept between calls.
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` with this thread's scratch of `len` floats (or a fresh buffer when the thread's
/// is in use: a rayon task stolen while this thread waits).
pub fn with_scratch<R>(len: usize, f: impl FnOnce(*mut f32) -> R) -> R {
    SCRATCH.with(|cell| match cell.try_borrow_mut() {
        Ok(mut buffer) => {
            if buffer.len() < len {
                *buffer = vec![0f32; len];
            }
            f(buffer.as_mut_ptr())
        }
        Err(_) => f(vec![0f32; len.max(1)].as_mut_ptr()),
    })
}

/// Sums rows of `width` floats (per-item partial results) into one row, in f64.
pub fn sum_rows(rows: &[f32], width: usize) -> Vec<f64> {
    let mut out = vec![0f64; width];
    for row in rows.chunks_exact(width) {
        for (o, v) in out.iter_mut().zip(row) {
            *o += *v as f64;
        }
    }
    out
}

/// `CpuStorage` of a buffer.
pub fn storage(buffer: Vec<f32>) -> CpuStorage {
    CpuStorage::F32(buffer)
}

/// Rounds `c` up to whole vectors of `isa`.
pub fn padded(c: usize, isa: Isa) -> usize {
    c.div_ceil(isa.lanes()) * isa.lanes()
}

/// Wall time per op, when profiling is on ([`set_profiling`]): what `train_step_bench
/// --profile` prints to say where a training step's time goes.
pub mod profile {
    use std::collections::BTreeMap;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Instant;

    static ON: AtomicBool = AtomicBool::new(false);
    static TIMES: Mutex<BTreeMap<String, (u64, f64)>> = Mutex::new(BTreeMap::new());

    /// Turns the per-op clock on or off (and clears it when turning it on).
    pub fn set_profiling(on: bool) {
        if on {
            TIMES.lock().unwrap_or_else(|e| e.into_inner()).clear();
            PASSES.lock().unwrap_or_else(|e| e.into_inner()).clear();
        }
        ON.store(on, Ordering::Relaxed);
    }

    /// `(op, calls, seconds)` since profiling was turned on, longest first.
    pub fn report() -> Vec<(String, u64, f64)> {
        let times = TIMES.lock().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<(String, u64, f64)> = times.iter().map(|(k, (n, s))| (k.clone(), *n, *s)).collect();
        out.sort_by(|a, b| b.2.total_cmp(&a.2));
        out
    }

    static PASSES: Mutex<BTreeMap<&'static str, (f64, f64)>> = Mutex::new(BTreeMap::new());

    thread_local! {
        static PASS: std::cell::Cell<&'static str> = const { std::cell::Cell::new("forward") };
    }

    /// Runs `f` with the convolutions it runs counted as pass `name` (`input-gradient`, …).
    pub fn in_pass<R>(name: &'static str, f: impl FnOnce() -> R) -> R {
        let before = PASS.with(|p| p.replace(name));
        let out = f();
        PASS.with(|p| p.set(before));
        out
    }

    /// Adds a kernel's floating-point operations (multiply-adds count two, as the layer
    /// defines them) and seconds to the current pass, or to `pass` when given.
    pub fn add_pass(pass: Option<&'static str>, flops: f64, secs: f64) {
        if !ON.load(Ordering::Relaxed) {
            return;
        }
        let name = pass.unwrap_or_else(|| PASS.with(|p| p.get()));
        let mut passes = PASSES.lock().unwrap_or_else(|e| e.into_inner());
        let entry = passes.entry(name).or_insert((0.0, 0.0));
        entry.0 += flops;
        entry.1 += secs;
    }

    /// `(pass, flops, seconds)` of the convolutions since profiling was turned on.
    pub fn pass_report() -> Vec<(&'static str, f64, f64)> {
        PASSES.lock().unwrap_or_else(|e| e.into_inner()).iter().map(|(k, (f, s))| (*k, *f, *s)).collect()
    }

    /// Whether profiling is on.
    pub fn on() -> bool {
        ON.load(Ordering::Relaxed)
    }

    /// Runs `f`, charging its time to `name()` when profiling.
    pub fn timed<R>(name: impl FnOnce() -> String, f: impl FnOnce() -> R) -> R {
        if !ON.load(Ordering::Relaxed) {
            return f();
        }
        let start = Instant::now();
        let out = f();
        let dt = start.elapsed().as_secs_f64();
        let mut times = TIMES.lock().unwrap_or_else(|e| e.into_inner());
        let entry = times.entry(name()).or_insert((0, 0.0));
        entry.0 += 1;
        entry.1 += dt;
        out
    }
}
