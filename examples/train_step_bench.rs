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
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn arg(args: &[String], name: &str, default: &str) -> String {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned().unwrap_or_else(|| default.to_string())
}

fn main() -> Result<()> {
    // As in the segctl binary: keep freed pages for reuse.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--help" || a == "-h") {
        println!("usage: train_step_bench [--arch unet|mobilenetv2_unet] [--batch 32] [--size 128] [--steps 10] [--warmup 3] [--base-width 32] [--depth 4] [--widths 8,24,48,96] [--frozen-encoder] [--inference [--folded]]");
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
    let mut opt = AdamW::new(state.trainable_vars(), OptimizerConfig::default())?;
    let loss = SegLoss::new(&LossConfig::default(), &device)?;
    let x = Tensor::randn(0f32, 1f32, (batch, 3, size, size), &device)?;
    let y = Tensor::rand(0f32, 3f32, (batch, size, size), &device)?.floor()?.to_dtype(DType::U32)?;
    let mut times = Vec::new();
    for i in 0..warmup + steps {
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
            eprintln!("forward {:.3}s backward {:.3}s optimizer {:.3}s", (t1 - t0).as_secs_f64(), (t2 - t1).as_secs_f64(), t2.elapsed().as_secs_f64());
        }
        if i >= warmup {
            times.push(t0.elapsed().as_secs_f64());
        }
    }
    times.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let median = times[times.len() / 2];
    println!(
        "{{\"impl\": \"segctl-candle\", \"mode\": \"{}\", \"arch\": \"{arch}\", \"batch\": {batch}, \"size\": {size}, \"steps\": {steps}, \"median_step_s\": {median:.4}, \"images_per_s\": {:.2}, \"parameters\": {}}}",
        if inference { "inference" } else { "train" },
        batch as f64 / median,
        state.parameter_count()
    );
    Ok(())
}
