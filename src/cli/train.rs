//! `segctl train`: flags → config overrides → `train::train`, with Ctrl-C/SIGTERM wired to a
//! graceful stop (a second Ctrl-C exits at once).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use anyhow::{Context, Result};
use clap::Args;
use segctl::train::{TrainOptions, default_resume_target, train};

use super::{GlobalArgs, Overrides, print_json};

/// Exit code after a stop by signal (128 + SIGINT, the shell convention).
const EXIT_INTERRUPTED: u8 = 130;

#[derive(Debug, Args)]
pub struct TrainArgs {
    /// Continue a run from its latest checkpoint: a run folder or checkpoint file (default:
    /// the most recent run under train.output_dir).
    #[arg(long, value_name = "PATH", num_args = 0..=1)]
    resume: Option<Option<PathBuf>>,
    /// auto, cpu, cuda or cuda:N [config: train.device].
    #[arg(long, value_name = "DEVICE")]
    device: Option<String>,
    /// Number of epochs [config: train.epochs].
    #[arg(long, value_name = "N")]
    epochs: Option<usize>,
    /// Dataset root [config: data.root].
    #[arg(long, value_name = "DIR")]
    data: Option<PathBuf>,
    /// Write a PNG contact sheet of N training samples as the model will see them
    /// (`data.augment`, `data.hflip`; masks blended over the photos) to --preview-out, and exit.
    #[arg(long, value_name = "N")]
    preview_augment: Option<usize>,
    /// Where --preview-augment writes its sheet.
    #[arg(long, value_name = "FILE.png", default_value = "augment-preview.png", requires = "preview_augment")]
    preview_out: PathBuf,
    /// Print the final report as JSON.
    #[arg(long)]
    json: bool,
}

pub fn exec(args: TrainArgs, global: &GlobalArgs) -> Result<ExitCode> {
    let config = global.load_config(
        Overrides::default().add("train.device", args.device).add("train.epochs", args.epochs).add("data.root", args.data),
    )?;
    if let Some(n) = args.preview_augment {
        let preview = segctl::data::augment::preview(&config, n, &args.preview_out)?;
        if args.json {
            print_json(&preview)?;
        } else {
            println!("{} augmented training samples in {} ({:.0} samples/s through the loader)", preview.samples, preview.path.display(), preview.samples_per_s);
        }
        return Ok(ExitCode::SUCCESS);
    }
    let device = segctl::model::select_device(config.train.device)?;
    let resume = match args.resume {
        Some(None) => Some(default_resume_target(&config)?),
        Some(Some(path)) => Some(path),
        None => None,
    };
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        // The first signal asks for a checkpoint and a clean stop; a second one exits at once.
        signal_hook::flag::register_conditional_shutdown(signal, EXIT_INTERRUPTED as i32, stop.clone())
            .context("failed to install the signal handler")?;
        signal_hook::flag::register(signal, stop.clone()).context("failed to install the signal handler")?;
    }
    let options = TrainOptions { config, resume, device, progress: global.progress(args.json), stop };
    let report = train(&options)?;
    if args.json {
        print_json(&report)?;
    } else {
        println!("run folder: {}", report.run_dir.display());
        for skipped in &report.skipped_checkpoints {
            println!("skipped checkpoint {}: {}", skipped.path.display(), skipped.reason);
        }
        if let Some(from) = &report.resumed_from {
            println!("resumed from: {}", from.display());
        }
        println!("model: {} ({} parameters) on {}", report.model, report.parameters, report.device);
        println!("epochs completed: {} ({} steps) in {:.1}s", report.epochs_completed, report.steps, report.elapsed_s);
        if let (Some(e), Some(m)) = (report.best_epoch, report.best_val_mean_iou) {
            println!("best validation mean IoU: {m:.4} at epoch {e}");
        }
        if let Some(best) = &report.best_checkpoint {
            println!("best checkpoint: {}", best.display());
        }
        if report.stopped_early {
            println!("stopped early (no validation improvement)");
        }
        if report.interrupted {
            println!("interrupted: continue with `segctl train --config <same config> --resume {}`", report.run_dir.display());
        }
    }
    Ok(if report.interrupted { ExitCode::from(EXIT_INTERRUPTED) } else { ExitCode::SUCCESS })
}
