//! Times training steps (forward, cross-entropy, backward, AdamW) of a segctl model on random
//! data, the same work `scripts/bench/train_bench.py` times in PyTorch. Prints one JSON line.
//!
//! `cargo run --release --example train_step_bench -- --arch unet --batch 32 --size 128 --steps 10`

use std::time::Instant;

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use segctl::config::{Arch, Config, LossConfig, OptimizerConfig};
use segctl::loss::SegLoss;
use segctl::model::{ModelSpec, ModelState};
use segctl::optim::AdamW;

/// `mi_option_purge_delay` in mimalloc.h (v2 and v3); libmimalloc-sys does not export it.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

#[global_allocator]
static ALLOCATOR: segctl::util::alloc::CachingAllocator = segctl::util::alloc::CachingAllocator;

fn arg(args: &[String], name: &str, default: &str) -> String {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned().unwrap_or_else(|| default.to_string())
}

fn main() -> Result<()> {
    // As in the segctl binary: keep freed pages for reuse.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
    segctl::util::alloc::set_cache_limit(segctl::util::alloc::training_cache_limit());
    // As `segctl train` does (see src/main.rs).
    if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
        // SAFETY: first thing in `main`, no other thread yet.
        unsafe { std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", "200") };
    }
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--help" || a == "-h") {
        println!("usage: train_step_bench [--arch unet|mobilenetv2_unet] [--batch 32] [--size 128] [--steps 10] [--warmup 3] [--base-width 32] [--depth 4] [--widths 8,24,48,96] [--frozen-encoder] [--profile] [--precision f32|bf16] [--inference [--folded]] [--plan [--threads N] [--winograd auto|never|always] [--profile]]");
        return Ok(());
    }
    let arch = arg(&args, "--arch", "unet");
    let batch: usize = arg(&args, "--batch", "32").parse()?;
    let size: usize = arg(&args, "--size", "128").parse()?;
    let steps: usize = arg(&args, "--steps", "10").parse()?;
    let warmup: usize = arg(&args, "--warmup", "3").parse()?;
    let width: usize = arg(&args, "--base-width", "32").parse()?;
    let depth: usize = arg(&args, "--depth", "4").parse()?;
    let frozen = args.iter().any(|a| a == "--frozen-encoder");
    // Inference only: forward in eval mode (running statistics), no loss, no backward.
    let inference = args.iter().any(|a| a == "--inference");
    let widths = arg(&args, "--widths", "");
    let mut config = Config::default();
    config.data.image_size = size;
    config.model.arch = if arch == "unet" { Arch::Unet } else { Arch::Mobilenetv2Unet };
    config.model.unet.base_width = width;
    config.model.unet.depth = depth;
    if !widths.is_empty() {
        config.model.unet.widths = Some(widths.split(',').map(|w| w.parse()).collect::<Result<_, _>>()?);
    }
    config.model.encoder.trainable = !frozen;
    let mut spec = ModelSpec::from_config(&config);
    // As exported models are: BatchNorm folded into the convolutions (inference only).
    spec.batchnorm_folded = inference && args.iter().any(|a| a == "--folded");
    let device = Device::Cpu;
    let state = ModelState::new(&spec, &device, 1)?;
    if args.iter().any(|a| a == "--plan") {
        return plan_bench(&state, &args, &arch, batch, size, steps, warmup);
    }
    if args.iter().any(|a| a == "--rss-probe") {
        rss("state built");
        let m = segctl::model::inference::InferenceModel::new(state, segctl::model::inference::InferenceOptions { threads: 1, ..Default::default() })?;
        rss("inference model");
        let input = vec![0.1f32; 3 * size * size];
        m.logits(&input, 1)?;
        rss("one call");
        let s = m.plan_summary().unwrap();
        eprintln!("weights {} arena {} scratch {}", s.weight_bytes, s.arena_bytes_per_image, s.scratch_bytes_per_thread);
        unsafe { libmimalloc_sys::mi_stats_print_out(None, std::ptr::null_mut()) };
        return Ok(());
    }
    // `--precision bf16`: the convolutions in bfloat16, as `train.precision: bf16`.
    let precision = arg(&args, "--precision", "f32");
    segctl::model::ops::fmap::set_bf16(precision == "bf16");
    let mut opt = AdamW::new(state.trainable_vars(), OptimizerConfig::default())?;
    let loss = SegLoss::new(&LossConfig::default(), &device)?;
    let x = Tensor::randn(0f32, 1f32, (batch, 3, size, size), &device)?;
    let y = Tensor::rand(0f32, 3f32, (batch, size, size), &device)?.floor()?.to_dtype(DType::U32)?;
    let mut times = Vec::new();
    let op_profile = args.iter().any(|a| a == "--profile");
    let (mut fwd, mut bwd, mut optim) = (0f64, 0f64, 0f64);
    for i in 0..warmup + steps {
        if op_profile && i == warmup {
            segctl::model::ops::fmap::profile::set_profiling(true);
        }
        let t0 = Instant::now();
        if inference {
            state.forward(&x, false)?.sum_all()?.to_scalar::<f32>()?;
            if i >= warmup {
                times.push(t0.elapsed().as_secs_f64());
            }
            continue;
        }
        let logits = state.forward(&x, true)?;
        let l = loss.compute(&logits, &y)?;
        let t1 = Instant::now();
        let grads = l.backward()?;
        let t2 = Instant::now();
        opt.step(&grads, 1e-3)?;
        l.to_scalar::<f32>()?;
        if std::env::var("BENCH_VERBOSE").is_ok() {
            let faults = std::fs::read_to_string("/proc/self/stat").ok().and_then(|s| s.rsplit(')').next().and_then(|r| r.split_whitespace().nth(7).map(String::from))).unwrap_or_default();
            eprintln!("forward {:.3}s backward {:.3}s optimizer {:.3}s (minor faults so far: {faults})", (t1 - t0).as_secs_f64(), (t2 - t1).as_secs_f64(), t2.elapsed().as_secs_f64());
        }
        if i >= warmup {
            times.push(t0.elapsed().as_secs_f64());
            fwd += (t1 - t0).as_secs_f64();
            bwd += (t2 - t1).as_secs_f64();
            optim += t2.elapsed().as_secs_f64();
        }
    }
    if op_profile && !inference {
        // Where one step's time goes: per op, per step (the ops' wall time on the calling
        // thread, parallel parts included).
        let per = steps as f64;
        eprintln!("per step: forward + loss {:.1} ms, backward {:.1} ms, optimizer {:.1} ms", 1e3 * fwd / per, 1e3 * bwd / per, 1e3 * optim / per);
        let report = segctl::model::ops::fmap::profile::report();
        let total: f64 = report.iter().map(|r| r.2).sum();
        eprintln!("custom ops {:.1} ms per step; the rest is candle's own ops (gradient sums, loss, element-wise)", 1e3 * total / per);
        for (name, calls, secs) in report {
            eprintln!("{:8.2} ms {:5.1}% {:4} calls  {name}", 1e3 * secs / per, 100.0 * secs / (fwd + bwd + optim), calls / steps as u64);
        }
        // Each pass of the convolutions: GFLOP/s as the layers define their work (Winograd
        // multiplies less), and the share of the threads' measured FMA peak.
        let peak = fma_peak_gflops(rayon::current_num_threads());
        eprintln!("convolution passes (measured f32 FMA peak of {} threads: {peak:.0} GFLOP/s):", rayon::current_num_threads());
        for (pass, flops, secs) in segctl::model::ops::fmap::profile::pass_report().into_iter().filter(|p| p.0 != "nested") {
            let rate = flops / secs / 1e9;
            eprintln!("  {pass:<16} {:7.2} GFLOP per step in {:7.1} ms: {rate:6.1} GFLOP/s, {:5.1}% of peak", flops / per / 1e9, 1e3 * secs / per, 100.0 * rate / peak);
        }
    }
    times.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let median = times[times.len() / 2];
    let fastest = times[0];
    println!(
        "{{\"impl\": \"segctl-candle\", \"mode\": \"{}\", \"arch\": \"{arch}\", \"batch\": {batch}, \"size\": {size}, \"steps\": {steps}, \"precision\": \"{precision}\", \"median_step_s\": {median:.4}, \"min_step_s\": {fastest:.4}, \"images_per_s\": {:.2}, \"parameters\": {}}}",
        if inference { "inference" } else { "train" },
        batch as f64 / median,
        state.parameter_count()
    );
    Ok(())
}

/// The f32 FMA peak of `threads` threads in GFLOP/s: independent multiply-adds on registers
/// (AVX-512 where the CPU has it, else AVX2), no memory traffic.
fn fma_peak_gflops(threads: usize) -> f64 {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::*;
        #[target_feature(enable = "avx512f")]
        unsafe fn run512(iters: usize) -> f32 {
            let mut acc = [_mm512_set1_ps(0.0); 16];
            let (a, b) = (_mm512_set1_ps(1.000_000_1), _mm512_set1_ps(0.999_999));
            for _ in 0..iters {
                for v in acc.iter_mut() {
                    *v = _mm512_fmadd_ps(*v, a, b);
                }
            }
            acc.iter().map(|v| _mm512_reduce_add_ps(*v)).sum()
        }
        #[target_feature(enable = "avx2,fma")]
        unsafe fn run256(iters: usize) -> f32 {
            let mut acc = [_mm256_set1_ps(0.0); 12];
            let (a, b) = (_mm256_set1_ps(1.000_000_1), _mm256_set1_ps(0.999_999));
            for _ in 0..iters {
                for v in acc.iter_mut() {
                    *v = _mm256_fmadd_ps(*v, a, b);
                }
            }
            let mut out = [0f32; 8];
            unsafe { _mm256_storeu_ps(out.as_mut_ptr(), acc[0]) };
            out.iter().sum()
        }
        let wide = std::is_x86_feature_detected!("avx512f");
        if !wide && !std::is_x86_feature_detected!("fma") {
            return f64::NAN;
        }
        let iters = 20_000_000;
        let start = Instant::now();
        let sum: f32 = std::thread::scope(|s| {
            let handles: Vec<_> = (0..threads).map(|_| s.spawn(move || unsafe { if wide { run512(iters) } else { run256(iters) } })).collect();
            handles.into_iter().map(|h| h.join().unwrap()).sum()
        });
        let flops_per_iter = if wide { 16.0 * 16.0 * 2.0 } else { 12.0 * 8.0 * 2.0 };
        std::hint::black_box(sum);
        return threads as f64 * iters as f64 * flops_per_iter / start.elapsed().as_secs_f64() / 1e9;
    }
    #[allow(unreachable_code)]
    f64::NAN
}

/// Times segctl's compiled inference plan (what `serve`, `predict` and `evaluate` run).
fn plan_bench(state: &ModelState, args: &[String], arch: &str, batch: usize, size: usize, steps: usize, warmup: usize) -> Result<()> {
    use segctl::engine::{Plan, PlanOptions, Session, WinogradPolicy};
    let threads: usize = arg(args, "--threads", "1").parse()?;
    let mut options = PlanOptions::new(size, size);
    options.winograd = match arg(args, "--winograd", "auto").as_str() {
        "never" => WinogradPolicy::Never,
        "always" => WinogradPolicy::Always,
        _ => WinogradPolicy::Auto,
    };
    options.batch = arg(args, "--plan-batch", "1").parse()?;
    rss("model built");
    let graph = state.model.lower()?;
    rss("graph lowered");
    let plan = std::sync::Arc::new(Plan::compile(&graph, &options)?);
    rss("plan compiled");
    if std::env::var_os("BENCH_STATS").is_some() { unsafe { libmimalloc_sys::mi_stats_print_out(None, std::ptr::null_mut()) }; }
    drop(graph);
    rss("graph dropped");
    let mut session = Session::new(plan.clone(), threads)?;
    rss("session made");
    if std::env::var_os("BENCH_RSS").is_some() { eprintln!("arena/img {} scratch {} out {}", plan.arena_per_image, plan.scratch_floats, plan.output_len()); }
    let input: Vec<f32> = (0..batch * plan.input_len()).map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0).collect();
    let profile = args.iter().any(|a| a == "--profile");
    let mut times = Vec::new();
    let mut per_step = vec![f64::INFINITY; plan.steps.len()];
    for i in 0..warmup + steps {
        session.set_profiling(profile && i >= warmup);
        let t0 = Instant::now();
        session.run(&input, batch)?;
        if i < 2 {
            rss("a call");
        }
        if i >= warmup {
            times.push(t0.elapsed().as_secs_f64());
            if profile {
                // The fastest of the calls: this VM's neighbours only ever slow a step down.
                for (acc, s) in per_step.iter_mut().zip(session.step_seconds()) {
                    *acc = acc.min(s);
                }
            }
        }
    }
    rss("after runs");
    times.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let median = times[times.len() / 2];
    let summary = plan.summary();
    if profile {
        for (step, s) in plan.steps.iter().zip(&per_step) {
            let gflops = step.flops as f64 * batch as f64 / s / 1e9;
            eprintln!("{:>16} {:>8.3} ms {:>7.1} GFLOP/s  {:?}", step.name(), s * 1e3, gflops, step_shape(step));
        }
    }
    println!(
        "{{\"impl\": \"segctl-plan\", \"isa\": \"{}\", \"arch\": \"{arch}\", \"batch\": {batch}, \"size\": {size}, \"threads\": {threads}, \"median_s\": {median:.5}, \"best_s\": {:.5}, \"images_per_s\": {:.2}, \"best_images_per_s\": {:.2}, \"gflops_per_image\": {:.3}, \"gflop_per_s\": {:.1}}}",
        summary.isa,
        times[0],
        batch as f64 / median,
        batch as f64 / times[0],
        summary.flops_per_image as f64 / 1e9,
        summary.flops_per_image as f64 * batch as f64 / median / 1e9
    );
    Ok(())
}

fn step_shape(step: &segctl::engine::plan::Step) -> String {
    use segctl::engine::plan::StepKind;
    match &step.kind {
        StepKind::Direct(d) => format!("{}x{} {}->{} taps {}", d.input.h, d.input.w, d.cin, d.cout, d.phases[0].taps.len()),
        StepKind::Winograd(w) => format!("{}x{} {}->{} block {} phases {}", w.input.h, w.input.w, w.cin, w.cout, w.block, w.phases.len()),
        StepKind::SmallK(d) => format!("{}x{} {}->{}", d.input.h, d.input.w, d.cin, d.cout),
        StepKind::Depthwise(d) => format!("{}x{} c{} s{}", d.input.h, d.input.w, d.input.c, d.stride),
        StepKind::MaxPool(d) => format!("{}x{} c{}", d.input.h, d.input.w, d.input.c),
        _ => String::new(),
    }
}

fn rss(stage: &str) {
    if std::env::var_os("BENCH_RSS").is_some() {
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        let line = status.lines().find(|l| l.starts_with("VmRSS")).unwrap_or("");
        eprintln!("{stage}: {line}");
        if std::env::var_os("BENCH_SMAPS").is_some() {
            let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap_or_default();
            let mut range = "";
            for l in smaps.lines() {
                if l.contains('-') && !l.starts_with(|c: char| c.is_ascii_uppercase()) {
                    range = l;
                } else if let Some(v) = l.strip_prefix("AnonHugePages:").or_else(|| l.strip_prefix("Rss:")) {
                    let kb: usize = v.trim().trim_end_matches(" kB").trim().parse().unwrap_or(0);
                    if kb > 4096 {
                        eprintln!("    {kb} kB {range}");
                    }
                }
            }
        }
    }
}
#[allow(dead_code)]
fn _unused() {}
