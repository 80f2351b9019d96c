//! `segctl evaluate`: flags → `evaluate::evaluate` → a metrics table (or JSON) and the gate's
//! exit code: 0 accepted, 1 rejected, 2 could not run.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::Args;
use segctl::evaluate::{EvaluateOptions, EvaluateReport, evaluate};

use super::{EXIT_REJECTED, GlobalArgs, Overrides, print_json};

#[derive(Debug, Args)]
pub struct EvaluateArgs {
    /// Checkpoint file, run folder (its best checkpoint), or exported model version folder.
    #[arg(long, visible_alias = "model", value_name = "PATH")]
    checkpoint: PathBuf,
    /// test, trainval, train or val [config: evaluate.split].
    #[arg(long, value_name = "SPLIT")]
    split: Option<String>,
    /// The model to compare against: an earlier `evaluate --json` report or any model path.
    #[arg(long, value_name = "PATH")]
    baseline: Option<PathBuf>,
    /// Reject below this mean IoU [config: evaluate.min_miou].
    #[arg(long, value_name = "X")]
    min_miou: Option<f64>,
    /// Reject when more than X below the baseline's mean IoU [config: evaluate.max_drop].
    #[arg(long, value_name = "X")]
    max_drop: Option<f64>,
    /// auto, cpu, cuda or cuda:N [config: train.device].
    #[arg(long, value_name = "DEVICE")]
    device: Option<String>,
    /// Dataset root [config: data.root].
    #[arg(long, value_name = "DIR")]
    data: Option<PathBuf>,
    /// Also score masks up-sampled to each photo's own size, as `predict` writes them, against
    /// the full-size trimaps (reported beside the input-resolution figures)
    /// [config: evaluate.at_original_size].
    #[arg(long)]
    at_original_size: bool,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

pub fn exec(args: EvaluateArgs, global: &GlobalArgs) -> Result<ExitCode> {
    let config = global.load_config(
        Overrides::default()
            .add("evaluate.split", args.split)
            .add("evaluate.min_miou", args.min_miou)
            .add("evaluate.max_drop", args.max_drop)
            .add("train.device", args.device)
            .add("data.root", args.data)
            .add("evaluate.at_original_size", args.at_original_size.then_some(true)),
    )?;
    let device = segctl::model::select_device(config.train.device)?;
    let options = EvaluateOptions {
        checkpoint: args.checkpoint,
        split: config.evaluate.split,
        baseline: args.baseline,
        min_miou: config.evaluate.min_miou,
        max_drop: config.evaluate.max_drop,
        device,
        progress: global.progress(args.json),
        at_original_size: config.evaluate.at_original_size,
    };
    let report = evaluate(&config, &options)?;
    if args.json {
        print_json(&report)?;
    } else {
        print_table(&report);
    }
    Ok(if report.gate.accepted { ExitCode::SUCCESS } else { ExitCode::from(EXIT_REJECTED) })
}

fn print_table(r: &EvaluateReport) {
    let m = &r.metrics;
    println!("model: {} ({})", r.model.path.display(), r.model_description);
    println!("split: {} ({} images, {} skipped), {:.1} images/s on {}; photos decoded {}", r.split.name(), m.samples, r.skipped_samples, r.images_per_s, r.device, r.decode);
    println!();
    println!("{:<12} {:>8} {:>8}", "class", "IoU", "Dice");
    for name in &m.class_names {
        println!("{:<12} {:>8.4} {:>8.4}", name, m.per_class_iou[name], m.dice[name]);
    }
    println!();
    println!("pixel accuracy        {:.4}", m.pixel_accuracy);
    println!("mean IoU              {:.4}  (dataset-level confusion matrix)", m.mean_iou);
    println!("mean Dice             {:.4}", m.mean_dice);
    println!("per-image mean IoU    {:.4}", m.per_image_mean_iou);
    println!("fg/bg IoU (no border) {:.4} / {:.4}, mean {:.4}", m.fg_bg_iou.foreground, m.fg_bg_iou.background, m.fg_bg_iou.mean);
    if let Some(o) = &r.at_original_size {
        let classes: Vec<String> = o.class_names.iter().map(|c| format!("{c} {:.4}", o.per_class_iou[c])).collect();
        println!();
        println!("at each photo's own size ({} images): pixel accuracy {:.4}, mean IoU {:.4} ({})", o.samples, o.pixel_accuracy, o.mean_iou, classes.join(", "));
    }
    println!();
    println!("confusion matrix (rows: target, columns: prediction, pixels)");
    print!("{:<12}", "");
    for name in &m.class_names {
        print!(" {name:>12}");
    }
    println!();
    for (name, row) in m.class_names.iter().zip(&m.confusion_matrix) {
        print!("{name:<12}");
        for v in row {
            print!(" {v:>12}");
        }
        println!();
    }
    if let Some(b) = &r.baseline {
        println!();
        println!("baseline {}: mean IoU {:.4} (drop {:+.4})", b.source.display(), b.mean_iou, b.drop);
    }
    println!();
    if r.gate.accepted {
        println!("ACCEPTED");
    } else {
        for reason in &r.gate.reasons {
            println!("REJECTED: {reason}");
        }
    }
}
