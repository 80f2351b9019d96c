//! `segctl predict`: flags → a local `infer::Predictor` (or a server as backend) →
//! `predict::predict`; exit 1 when some inputs failed.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Args;
use segctl::infer::Predictor;
use segctl::model_store::default_version;
use segctl::predict::{Backend, PredictOptions, Shard, predict};

use super::{EXIT_REJECTED, GlobalArgs, Overrides, print_json};

/// Photos segmented per model call.
const DEFAULT_BATCH: usize = 8;

#[derive(Debug, Args)]
pub struct PredictArgs {
    /// Photos, folders of photos (.jpg, .jpeg, .png, .gif), or .txt files listing photos (one
    /// path per line).
    #[arg(required = true, value_name = "IMAGE|DIR")]
    inputs: Vec<PathBuf>,
    /// Checkpoint file or run folder (its best checkpoint). Without --checkpoint, --model or
    /// --server: the model `serve` answers with by default (newest version of
    /// `serve.default_model`, else the first model, in the model repository).
    #[arg(long, value_name = "PATH", conflicts_with_all = ["model", "server"])]
    checkpoint: Option<PathBuf>,
    /// Exported model: `<repository>/<name>` (newest version) or `<repository>/<name>/<version>`.
    #[arg(long, value_name = "DIR", conflicts_with = "server")]
    model: Option<PathBuf>,
    /// Send the photos to a running `segctl serve` at URL instead of running a model here.
    #[arg(long, value_name = "URL")]
    server: Option<String>,
    /// With --server: a file whose first token line is sent as `Authorization: Bearer` (the
    /// format of `serve.auth_token_file`).
    #[arg(long, value_name = "FILE", requires = "server")]
    token_file: Option<PathBuf>,
    /// With --server: the model name (default: the server's default model).
    #[arg(long, value_name = "NAME", requires = "server")]
    name: Option<String>,
    /// Output folder.
    #[arg(long, value_name = "DIR", default_value = "predictions")]
    out: PathBuf,
    /// Also write the photo with the mask blended over it.
    #[arg(long)]
    overlay: bool,
    /// Also write photo | mask | overlay side by side.
    #[arg(long)]
    side_by_side: bool,
    /// Photos per model call.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_BATCH)]
    batch_size: usize,
    /// auto, cpu, cuda or cuda:N [config: serve.device].
    #[arg(long, value_name = "DEVICE")]
    device: Option<String>,
    /// Only this deterministic share of the inputs (0-based INDEX of COUNT shards, by a hash of
    /// each path); inputs whose outputs exist are skipped, and `shard-INDEX-of-COUNT.json` is
    /// written into --out.
    #[arg(long, value_name = "INDEX/COUNT", conflicts_with = "shard_count")]
    shard: Option<String>,
    /// Shard count, the index coming from JOB_COMPLETION_INDEX (a Kubernetes Indexed Job).
    #[arg(long, value_name = "COUNT")]
    shard_count: Option<usize>,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

/// `--shard`, or `--shard-count` with the index of a Kubernetes Indexed Job's pod.
fn shard(args: &PredictArgs) -> Result<Option<Shard>> {
    match (&args.shard, args.shard_count) {
        (Some(text), _) => Ok(Some(Shard::parse(text)?)),
        (None, Some(count)) => {
            let index = std::env::var("JOB_COMPLETION_INDEX")
                .map_err(|_| anyhow::anyhow!("--shard-count {count}: JOB_COMPLETION_INDEX is not set (give --shard INDEX/COUNT instead)"))?;
            let index: usize = index.trim().parse().map_err(|_| anyhow::anyhow!("JOB_COMPLETION_INDEX `{index}` is not a shard index"))?;
            Ok(Some(Shard::new(index, count).map_err(|e| anyhow::anyhow!("--shard-count {count} with JOB_COMPLETION_INDEX={index}: {e}"))?))
        }
        (None, None) => Ok(None),
    }
}

pub fn exec(args: PredictArgs, global: &GlobalArgs) -> Result<ExitCode> {
    let config = global.load_config(Overrides::default().add("serve.device", args.device.clone()))?;
    let shard = shard(&args)?;
    let options = PredictOptions {
        inputs: args.inputs,
        out_dir: args.out,
        overlay: args.overlay,
        side_by_side: args.side_by_side,
        batch_size: args.batch_size.max(1),
        max_pixels: config.serve.max_pixels,
        max_jpeg_scans: config.serve.max_jpeg_scans,
        max_input_bytes: config.serve.max_body_bytes as u64,
        jpeg_dct_scaling: config.serve.jpeg_dct_scaling,
        shard,
        progress: global.progress(args.json),
    };
    let predictor;
    let backend = match (args.checkpoint, args.model, args.server) {
        (_, _, Some(url)) => Backend::Server {
            url,
            model: args.name,
            timeout: Duration::from_millis(config.serve.request_timeout_ms.saturating_add(5_000)),
            token: args.token_file.as_deref().map(first_token).transpose()?,
        },
        (Some(path), None, None) | (None, Some(path), None) => {
            let device = segctl::model::select_device(config.serve.device)?;
            predictor = Predictor::load(&path, &device)?;
            Backend::Local(&predictor)
        }
        (None, None, None) => {
            // The model `serve` would answer with by default.
            let repository = segctl::model_store::local_repository(&config.serve_repository())?;
            let served: Vec<String> = config.serve.models.iter().map(|m| m.name.clone()).collect();
            let (name, version, path) = default_version(&repository, &served, config.serve.default_model.as_deref())?;
            eprintln!("using model {name} version {version} ({})", path.display());
            let device = segctl::model::select_device(config.serve.device)?;
            predictor = Predictor::load(&path, &device)?;
            Backend::Local(&predictor)
        }
        _ => bail!("give one of --checkpoint PATH, --model DIR or --server URL"),
    };
    let report = predict(&backend, &options)?;
    if args.json {
        print_json(&report)?;
    } else {
        println!(
            "{} images segmented into {} ({:.1} images/s) with {}",
            report.images.len(),
            report.out_dir.display(),
            report.images_per_s,
            report.model
        );
        if let Some(s) = report.shard {
            println!(
                "shard {} of {}: {} inputs, {} already done, summary {}",
                s.index,
                s.count,
                report.inputs,
                report.skipped_existing.len(),
                report.out_dir.join(segctl::predict::shard_summary_name(s)).display()
            );
        }
        for f in &report.failures {
            println!("FAILED {}: {}", f.input.display(), f.error);
        }
    }
    Ok(if report.failures.is_empty() { ExitCode::SUCCESS } else { ExitCode::from(EXIT_REJECTED) })
}

/// The first token of a token file (blank lines and `#` comments skipped); errors name the
/// file, never its content.
fn first_token(path: &std::path::Path) -> Result<String> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read the token file `{}` (--token-file)", path.display()))?;
    segctl::server::access::token_lines(&text)
        .next()
        .map(|(_, token)| token.to_string())
        .with_context(|| format!("token file `{}` holds no token (--token-file)", path.display()))
}
