//! Seconds and GFLOP/s of each step of a plan:
//! `cargo run --release --example plan_profile -- [smoke|unet|mobilenetv2_unet] [f32|bf16|int8] [batch] [threads]`
//! (int8 calibrated on random images). `VIA_MODEL=1` times the same network through
//! `InferenceModel` (as `segctl benchmark` runs it) instead of per step.
use std::sync::Arc;

use segctl::config::{Arch, Config};
use segctl::engine::{Plan, PlanOptions, Precision, Session};
use segctl::model::{ModelSpec, ModelState};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arch = args.get(1).map_or("smoke", |s| s.as_str());
    let precision = Precision::parse(args.get(2).map_or("bf16", |s| s.as_str())).unwrap();
    let batch: usize = args.get(3).map_or(1, |s| s.parse().unwrap());
    let threads: usize = args.get(4).map_or(1, |s| s.parse().unwrap());
    let mut config = Config::default();
    config.data.image_size = 128;
    match arch {
        "smoke" => config.model.unet.widths = Some(vec![12, 16, 32, 64, 128, 256]),
        "unet" => {
            config.model.unet.depth = 4;
            config.model.unet.base_width = 32;
        }
        _ => {
            config.model.arch = Arch::Mobilenetv2Unet;
            config.model.encoder.weights = "none".into();
        }
    }
    let spec = ModelSpec::from_config(&config);
    let state = ModelState::new(&spec, &candle_core::Device::Cpu, 1).unwrap();
    if std::env::var("VIA_MODEL").is_ok() {
        use segctl::model::inference::{InferenceModel, InferenceOptions, calibrate};
        let n = 3 * 128 * 128;
        let mut rng = segctl::util::rng::Rng::new(7);
        let input: Vec<f32> = if std::env::var("UNIFORM").is_ok() {
            (0..batch * n).map(|_| rng.f32() * 4.0 - 2.0).collect()
        } else {
            (0..batch * n).map(|_| rng.normal()).collect()
        };
        let calibration = (precision == Precision::Int8).then(|| Arc::new(calibrate(&state, &input[..n], 1).unwrap()));
        let model = InferenceModel::new(state, InferenceOptions { threads, precision: Some(precision), calibration, ..Default::default() }).unwrap();
        let mut out = Vec::new();
        for _ in 0..5 {
            model.logits_into(&input, batch, &mut out).unwrap();
        }
        let start = std::time::Instant::now();
        for _ in 0..20 {
            model.logits_into(&input, batch, &mut out).unwrap();
        }
        println!("InferenceModel wall {:.3} ms per call", start.elapsed().as_secs_f64() / 20.0 * 1e3);
        return;
    }
    let graph = state.model.lower().unwrap();
    let mut rng = 0x9e3779b97f4a7c15u64;
    let input: Vec<f32> = (0..batch * 3 * 128 * 128)
        .map(|_| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            ((rng >> 40) as f32 / (1u64 << 24) as f32 * 4.0 - 2.0) * std::env::var("SCALE").map_or(1.0, |s| s.parse().unwrap())
        })
        .collect();
    let mut options = PlanOptions { batch, ..PlanOptions::new(128, 128).with_precision(precision) };
    match std::env::var("WINOGRAD").as_deref() {
        Ok("always") => options.winograd = segctl::engine::WinogradPolicy::Always,
        Ok("never") => options.winograd = segctl::engine::WinogradPolicy::Never,
        _ => {}
    }
    if precision == Precision::Int8 {
        let f32_plan = Arc::new(Plan::compile(&graph, &PlanOptions::new(128, 128)).unwrap());
        let calibration = Session::new(f32_plan, 1).unwrap().observe(&input[..3 * 128 * 128], 1).unwrap();
        options = options.int8(Arc::new(calibration));
    }
    let plan = Arc::new(Plan::compile(&graph, &options).unwrap());
    let mut session = Session::new(Arc::clone(&plan), threads).unwrap();
    for _ in 0..5 {
        session.run(&input, batch).unwrap();
    }
    session.set_profiling(true);
    let rounds = 20;
    let mut total = vec![0f64; plan.steps.len()];
    for _ in 0..rounds {
        session.run(&input, batch).unwrap();
        for (t, s) in total.iter_mut().zip(session.step_seconds()) {
            *t += s / rounds as f64;
        }
    }
    session.set_profiling(false);
    let start = std::time::Instant::now();
    for _ in 0..rounds {
        session.run(&input, batch).unwrap();
    }
    let wall = start.elapsed().as_secs_f64() / rounds as f64;
    println!("wall {:.3} ms per call unprofiled", wall * 1e3);
    let sum: f64 = total.iter().sum();
    for (i, (step, t)) in plan.steps.iter().zip(&total).enumerate() {
        let gflops = step.flops as f64 * batch as f64 / t / 1e9;
        println!("{i:3} {:22} {:8.3} ms {:5.1} % {:7.1} GFLOP/s", kind_label(step), t * 1e3, 100.0 * t / sum, gflops);
    }
    println!("total {:.3} ms per call, {:.1} images/s", sum * 1e3, batch as f64 / sum);
}

fn kind_label(step: &segctl::engine::plan::Step) -> String {
    match &step.kind {
        segctl::engine::plan::StepKind::Bf16(b) => format!("bf16 {}x{} k{} c{}{}", b.grid.0, b.grid.1, b.kp, b.cout, if b.row_k.is_some() { " r" } else { "" }),
        segctl::engine::plan::StepKind::Int8(b) => format!("int8 {}x{} k{} c{}{}", b.grid.0, b.grid.1, b.kp, b.cout, if b.row_k.is_some() { " r" } else { "" }),
        _ => step.name().to_string(),
    }
}

// The allocator segctl's binary uses.
#[global_allocator]
static ALLOCATOR: segctl::util::alloc::CachingAllocator = segctl::util::alloc::CachingAllocator;
