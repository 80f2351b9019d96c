//! [`Session`]: runs a compiled [`Plan`] on batches with the arena, scratch and a fixed
//! [`Team`] of threads of one caller (the caller plus `threads − 1` workers that spin between
//! steps and sleep between calls). A call allocates nothing once the arena has grown to the
//! largest batch seen.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use anyhow::{Result, ensure};

use super::Isa;
use super::compile::max_scratch;
use super::conv::Split;
use super::plan::{Calibration, Ctx, LARGE_BATCH, Plan, Step, View};
use super::simd::Simd;
use super::team::{SpinBarrier, Team};

/// Runs work item `item` of `step` (the border-zeroing items first).
#[inline(always)]
unsafe fn run_item<S: Simd>(plan: &Plan, step: &Step, ctx: &Ctx, split: Split, item: usize, scratch: *mut f32) {
    let borders = step.zero_borders.len() * ctx.n;
    if item < borders {
        let buffer = step.zero_borders[item / ctx.n];
        unsafe { zero_border(plan, ctx, buffer, item % ctx.n) };
        return;
    }
    let item = item - borders;
    unsafe { step.for_batch(ctx.n).run_item::<S>(ctx, split, item, scratch) }
}

// The generic kernels are inlined into one function per instruction set, compiled for it.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn run_item_avx512(plan: &Plan, step: &Step, ctx: &Ctx, split: Split, item: usize, scratch: *mut f32) {
    unsafe { run_item::<super::simd::Avx512>(plan, step, ctx, split, item, scratch) }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn run_item_avx2(plan: &Plan, step: &Step, ctx: &Ctx, split: Split, item: usize, scratch: *mut f32) {
    unsafe { run_item::<super::simd::Avx2>(plan, step, ctx, split, item, scratch) }
}

/// Runs one item with the kernels of the plan's instruction set.
///
/// # Safety
/// The plan was compiled for an instruction set this CPU has (checked then); `ctx` and
/// `scratch` are laid out for the plan and batch.
#[inline]
unsafe fn dispatch(plan: &Plan, step: &Step, ctx: &Ctx, split: Split, item: usize, scratch: *mut f32) {
    unsafe {
        match plan.isa {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => run_item_avx512(plan, step, ctx, split, item, scratch),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => run_item_avx2(plan, step, ctx, split, item, scratch),
            _ => run_item::<super::simd::Portable>(plan, step, ctx, split, item, scratch),
        }
    }
}

/// Zeroes the one-pixel border of image `img` of `buffer`.
unsafe fn zero_border(plan: &Plan, ctx: &Ctx, buffer: usize, img: usize) {
    let b = &plan.buffers[buffer];
    let view = View { buffer, h: b.h, w: b.w, cs: b.cs, c0: 0, c: b.cs };
    unsafe { super::kernels::zero_borders(ctx.ptr(&view).add(img * view.positions() * b.cs), 1, b.h, b.w, b.cs) }
}

/// Runs a compiled [`Plan`] on batches: the arena, scratch and threads of one caller.
pub struct Session {
    plan: Arc<Plan>,
    threads: usize,
    arena: Vec<f32>,
    scratch: Vec<f32>,
    output: Vec<f32>,
    counters: Vec<AtomicUsize>,
    /// Nanoseconds per step of the last call, when profiling.
    timings: Vec<AtomicU64>,
    profile: bool,
    team: Option<Team>,
    large_batch_kernels: bool,
    /// Each buffer's address in the arena for the current call.
    bases: Vec<usize>,
}

impl Session {
    /// A session using `threads` threads (the caller and `threads − 1` workers).
    pub fn new(plan: Arc<Plan>, threads: usize) -> Result<Session> {
        let threads = threads.max(1);
        let team = if threads > 1 { Some(Team::new(threads - 1)?) } else { None };
        let counters = (0..plan.steps.len()).map(|_| AtomicUsize::new(0)).collect();
        let scratch = vec![0f32; plan.scratch_floats * threads];
        let timings = (0..plan.steps.len()).map(|_| AtomicU64::new(0)).collect();
        Ok(Session { plan, threads, arena: Vec::new(), scratch, output: Vec::new(), counters, timings, profile: false, team, large_batch_kernels: true, bases: Vec::new() })
    }

    pub fn plan(&self) -> &Arc<Plan> {
        &self.plan
    }

    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Whether this session compiles and runs the large-batch kernels (on by default: faster
    /// for batches of [`LARGE_BATCH`] and more, but their re-packed weights can double the
    /// plan's memory, which a memory-bound server may not want). Kernels another session
    /// already built are used either way.
    pub fn set_large_batch_kernels(&mut self, on: bool) {
        self.large_batch_kernels = on;
    }

    /// How long the worker threads spin for the next call before sleeping, in spin rounds
    /// (default 65 536, a few ms): a server that runs other work between calls wants few.
    pub fn set_idle_spin(&mut self, rounds: usize) {
        if let Some(team) = &self.team {
            team.shared.idle_spin.store(rounds, Ordering::Relaxed);
        }
    }

    /// Records the wall time of each step from now on (see [`Session::step_seconds`]).
    pub fn set_profiling(&mut self, on: bool) {
        self.profile = on;
    }

    /// Seconds each step took in the last profiled call.
    pub fn step_seconds(&self) -> Vec<f64> {
        self.timings.iter().map(|t| t.load(Ordering::Relaxed) as f64 * 1e-9).collect()
    }

    /// Bytes this session holds (arena, scratch, output).
    pub fn memory_bytes(&self) -> usize {
        (self.arena.capacity() + self.scratch.capacity() + self.output.capacity()) * 4
    }

    /// Logits `[n, classes, H, W]` for a normalized batch `[n, C, H, W]`.
    pub fn run(&mut self, input: &[f32], n: usize) -> Result<&[f32]> {
        self.run_threads(input, n, self.threads)
    }

    /// [`Self::run`] on the caller and `threads − 1` of the session's workers (at most all).
    pub fn run_threads(&mut self, input: &[f32], n: usize, threads: usize) -> Result<&[f32]> {
        let plan = Arc::clone(&self.plan);
        ensure!(n > 0, "empty batch");
        ensure!(input.len() == n * plan.input_len(), "input has {} values, the plan expects {n}×{}", input.len(), plan.input_len());
        if self.output.len() < n * plan.output_len() {
            self.output = vec![0f32; n * plan.output_len()];
        }
        // A bf16 plan computes 3–4× faster than it can stream maps that have left the cache:
        // a batch runs a few images at a time, about 6 MB of maps per thread (measured on
        // 2 MB-L2 cores: unet-d4w32, 9.7 MB per image, 192 → 235 img/s at batch 8 in chunks
        // of one; the smoke UNet, 3.2 MB, best in chunks of 3–4 on two threads).
        let chunk = match plan.precision {
            super::Precision::Bf16 | super::Precision::Int8 => (threads.clamp(1, self.threads) * (6 << 20) / (plan.arena_per_image * 4).max(1)).clamp(1, n),
            _ => n,
        };
        for first in (0..n).step_by(chunk) {
            let m = chunk.min(n - first);
            self.run_chunk(&input[first * plan.input_len()..(first + m) * plan.input_len()], m, threads, first * plan.output_len(), None)?;
        }
        Ok(&self.output[..n * plan.output_len()])
    }

    /// Runs the plan on `n` images (on one thread) and returns the range each convolution's
    /// input map took (its interior pixels and channels), by graph node: what an int8 plan
    /// is calibrated with. Merge the results of several calls with [`Calibration::merge`].
    pub fn observe(&mut self, input: &[f32], n: usize) -> Result<Calibration> {
        let plan = Arc::clone(&self.plan);
        ensure!(n > 0, "empty batch");
        ensure!(input.len() == n * plan.input_len(), "input has {} values, the plan expects {n}×{}", input.len(), plan.input_len());
        if self.output.len() < n * plan.output_len() {
            self.output = vec![0f32; n * plan.output_len()];
        }
        let seen = std::sync::Mutex::new(Calibration::default());
        let hook = |s: usize, ctx: &Ctx| {
            let step = &plan.steps[s];
            let Some(node) = step.source else { return };
            let Some(view) = step.input_view() else { return };
            let (mut lo, mut hi) = (f32::INFINITY, f32::NEG_INFINITY);
            let b = &plan.buffers[view.buffer];
            let wp = view.w + 2;
            // SAFETY: the step's input lies in the arena for `ctx.n` images.
            unsafe {
                let base = ctx.ptr(&view);
                for img in 0..ctx.n {
                    for y in 1..=view.h {
                        for x in 1..=view.w {
                            let px = base.add(((img * (view.h + 2) + y) * wp + x) * b.cs);
                            for c in 0..view.c {
                                let v = *px.add(c);
                                lo = lo.min(v);
                                hi = hi.max(v);
                            }
                        }
                    }
                }
            }
            let one = Calibration { ranges: vec![(node, lo, hi)] };
            seen.lock().unwrap_or_else(|e| e.into_inner()).merge(&one);
        };
        self.run_chunk(input, n, 1, 0, Some(&hook))?;
        Ok(seen.into_inner().unwrap_or_else(|e| e.into_inner()))
    }

    /// Runs `n` images, writing their logits from `self.output[out_offset]` on; `hook` (on
    /// thread 0, before each step) sees the arena.
    fn run_chunk(&mut self, input: &[f32], n: usize, threads: usize, out_offset: usize, hook: Option<&(dyn Fn(usize, &Ctx) + Sync)>) -> Result<()> {
        let threads = threads.clamp(1, self.threads);
        let plan = Arc::clone(&self.plan);
        if n >= LARGE_BATCH && self.large_batch_kernels {
            // The large-batch kernels, compiled on the first large batch (once per plan).
            for step in &plan.steps {
                if let Some(alt) = &step.alt {
                    alt.build()?;
                }
            }
        }
        let scratch_floats = max_scratch(plan.steps.iter().map(|s| s.for_batch(n)));
        if self.scratch.len() < scratch_floats * self.threads {
            self.scratch = vec![0f32; scratch_floats * self.threads];
        }
        // Grown to the largest batch seen; every buffer offset scales with n.
        let arena_len = n * plan.arena_per_image + 16;
        if self.arena.len() < arena_len + 16 {
            self.arena = vec![0f32; arena_len + 16];
        }
        // 64-byte alignment of the arena start.
        let align = self.arena.as_ptr().align_offset(64).min(15);
        let arena = unsafe { self.arena.as_mut_ptr().add(align) };
        self.bases.clear();
        self.bases.extend(plan.offsets.iter().map(|&o| arena as usize + o * n * 4));
        // SAFETY: every buffer of the plan lies in the arena at its offset, scaled by n.
        let ctx = unsafe { Ctx::new(&self.bases, n, input.as_ptr(), self.output.as_mut_ptr().add(out_offset)) };
        let work: Vec<(Split, usize)> = plan
            .steps
            .iter()
            .map(|s| {
                let kind = s.for_batch(n);
                let split = kind.split(n, threads);
                (split, s.zero_borders.len() * n + kind.compute_items(n, split))
            })
            .collect();
        for c in &self.counters {
            c.store(0, Ordering::Relaxed);
        }
        let scratch = self.scratch.as_mut_ptr() as usize;
        let per_thread = scratch_floats;
        let counters = &self.counters;
        let (profile, timings) = (self.profile, &self.timings);
        let body = |tid: usize, barrier: Option<&SpinBarrier>| {
            let scratch = (scratch as *mut f32).wrapping_add(tid * per_thread);
            let mut clock = (profile && tid == 0).then(std::time::Instant::now);
            for (s, step) in plan.steps.iter().enumerate() {
                let (split, items) = work[s];
                if let Some(hook) = hook.filter(|_| tid == 0) {
                    hook(s, &ctx);
                }
                loop {
                    let item = counters[s].fetch_add(1, Ordering::Relaxed);
                    if item >= items {
                        break;
                    }
                    // SAFETY: items of one step write disjoint parts of the arena.
                    unsafe { dispatch(&plan, step, &ctx, split, item, scratch) };
                }
                if let Some(b) = barrier {
                    b.wait();
                }
                if let Some(start) = clock.as_mut() {
                    let now = std::time::Instant::now();
                    timings[s].store((now - *start).as_nanos() as u64, Ordering::Relaxed);
                    *start = now;
                }
            }
        };
        match &self.team {
            None => body(0, None),
            Some(team) => team.run(&|tid, barrier| body(tid, Some(barrier)), threads),
        }
        Ok(())
    }
}
