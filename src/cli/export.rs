//! `segctl export`: flags → `export::export` → the new version's folder.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::Args;
use segctl::export::{ExportOptions, PrecisionRefused, export};

use super::{EXIT_REJECTED, GlobalArgs, Overrides, print_json};

#[derive(Debug, Args)]
pub struct ExportArgs {
    /// Checkpoint file or run folder (its best checkpoint).
    #[arg(long, value_name = "PATH")]
    checkpoint: PathBuf,
    /// Model name (a folder in the repository and a URL segment).
    #[arg(long, value_name = "NAME")]
    name: String,
    /// Version number (default: the next one); an existing version is never overwritten.
    #[arg(long, value_name = "N")]
    version: Option<u64>,
    /// Model repository [config: export.repository].
    #[arg(long, value_name = "DIR")]
    repository: Option<PathBuf>,
    /// Record this `segctl evaluate --json` report as the model's metrics.
    #[arg(long, value_name = "FILE.json")]
    metrics: Option<PathBuf>,
    /// Keep BatchNorm layers instead of folding them into the convolutions [config:
    /// export.fold_batchnorm].
    #[arg(long)]
    no_fold: bool,
    /// Also write `model.onnx` (opset 17, checked against the model) [config: export.onnx].
    #[arg(long)]
    onnx: bool,
    /// f32 or bf16: the arithmetic the version is checked at on the validation split and
    /// served at [config: export.precision].
    #[arg(long, value_name = "P")]
    precision: Option<String>,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

pub fn exec(args: ExportArgs, global: &GlobalArgs) -> Result<ExitCode> {
    let config = global.load_config(
        Overrides::default()
            .add("export.repository", args.repository)
            .add("export.fold_batchnorm", args.no_fold.then_some(false))
            .add("export.onnx", args.onnx.then_some(true))
            .add("export.precision", args.precision),
    )?;
    let options = ExportOptions {
        checkpoint: args.checkpoint,
        name: args.name,
        version: args.version,
        repository: config.export.repository.clone(),
        fold_batchnorm: config.export.fold_batchnorm,
        metrics: args.metrics,
        onnx: config.export.onnx,
        precision: config.export.precision.into(),
        max_miou_drop: config.export.max_miou_drop,
        config: Some(config.clone()),
    };
    let report = match export(&options) {
        Ok(report) => report,
        Err(e) if e.downcast_ref::<PrecisionRefused>().is_some() => {
            eprintln!("error: {e:#}");
            return Ok(ExitCode::from(EXIT_REJECTED));
        }
        Err(e) => return Err(e),
    };
    if args.json {
        print_json(&report)?;
    } else {
        println!("exported {} version {} to {}", report.name, report.version, report.path.display());
        println!(
            "  {} parameters, BatchNorm {}{}, weights sha256 {}",
            report.parameters,
            if report.batchnorm_folded { "folded" } else { "kept" },
            report.fold_max_abs_diff.map(|d| format!(" (max logit change {d:.1e})")).unwrap_or_default(),
            &report.weights_sha256[..16]
        );
        if let Some(check) = &report.precision_check {
            println!(
                "  {}: validation mIoU {:.4} (f32 {:.4}, drop {:.4} within {}), {:.2} % of {} images' pixels agree",
                report.precision,
                check.miou,
                check.f32_miou,
                check.miou_drop,
                check.max_miou_drop,
                check.mask_agreement * 100.0,
                check.images
            );
        }
        if let Some(onnx) = &report.onnx {
            println!(
                "  {} (opset {}, {} bytes, sha256 {}; logits within {:.1e} of the model)",
                onnx.path.display(),
                onnx.opset,
                onnx.bytes,
                &onnx.sha256[..16],
                onnx.max_abs_diff
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
