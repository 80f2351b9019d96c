//! `segctl benchmark`: flags → `benchmark::benchmark` → a summary (or JSON).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::Args;
use segctl::benchmark::{BenchmarkOptions, benchmark};
use segctl::engine::Precision;
use segctl::model::ModelSpec;

use super::{GlobalArgs, Overrides};

#[derive(Debug, Args)]
pub struct BenchmarkArgs {
    /// Exported model (`<repository>/<name>` or a version folder), checkpoint or run folder;
    /// without it, an untrained model of the configured architecture (`model.*`, `data.image_size`).
    #[arg(long, value_name = "PATH")]
    model: Option<PathBuf>,
    /// Images per model call.
    #[arg(long, value_name = "N", default_value_t = 1)]
    batch: usize,
    /// Threads one model call may use (0 = one per core).
    #[arg(long, value_name = "N", default_value_t = 0)]
    threads: usize,
    /// Timed model calls (after the warm-up).
    #[arg(long, value_name = "N", default_value_t = 50)]
    iterations: usize,
    /// Untimed calls first.
    #[arg(long, value_name = "N", default_value_t = 5)]
    warmup: usize,
    /// f32 or bf16: converts the model on the fly for timing (default: the version's own
    /// precision, f32 for checkpoints and untrained models).
    #[arg(long, value_name = "P", value_parser = parse_precision)]
    precision: Option<Precision>,
    /// auto, cpu, cuda or cuda:N [config: serve.device].
    #[arg(long, value_name = "DEVICE")]
    device: Option<String>,
    /// Print the report as one JSON object.
    #[arg(long)]
    json: bool,
}

pub fn exec(args: BenchmarkArgs, global: &GlobalArgs) -> Result<ExitCode> {
    let config = global.load_config(Overrides::default().add("serve.device", args.device))?;
    let device = segctl::model::select_device(config.serve.device)?;
    let options = BenchmarkOptions {
        model: args.model,
        spec: ModelSpec::from_config(&config),
        batch: args.batch,
        threads: args.threads,
        iterations: args.iterations,
        warmup: args.warmup,
        device,
        precision: args.precision,
    };
    let report = benchmark(&options)?;
    if args.json {
        let mut out = std::io::stdout().lock();
        serde_json::to_writer(&mut out, &report)?;
        use std::io::Write;
        writeln!(out)?;
        return Ok(ExitCode::SUCCESS);
    }
    println!("model      {} ({})", report.model, report.description);
    println!("engine     {} on {}, {} thread(s), batch {}", report.engine, report.device, report.threads, report.batch);
    println!(
        "throughput {:.1} images/s ({:.1} GFLOP/s of {:.3} GFLOP per image)",
        report.images_per_s, report.gflop_per_s, report.gflop_per_image
    );
    println!(
        "latency    p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, min {:.2} ms per call ({} calls)",
        report.p50_ms, report.p90_ms, report.p99_ms, report.min_ms, report.iterations
    );
    if let Some(plan) = &report.plan {
        let kernels: Vec<String> = plan.kernels.iter().map(|(k, n)| format!("{k} ×{n}")).collect();
        println!("plan       {} steps: {}", plan.steps, kernels.join(", "));
        println!(
            "memory     weights {:.1} MB, activations {:.1} MB per image, scratch {:.1} MB per thread",
            plan.weight_bytes as f64 / 1e6,
            plan.arena_bytes_per_image as f64 / 1e6,
            plan.scratch_bytes_per_thread as f64 / 1e6
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn parse_precision(text: &str) -> Result<Precision, String> {
    Precision::parse(text).map_err(|e| e.to_string())
}
