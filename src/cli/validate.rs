//! `segctl validate`: flags → `data::validate::validate` → a readable summary, a JSON report,
//! and exit code 0 (passed), 1 (too many errors) or 2 (could not run).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::Args;
use segctl::data::validate::{ValidateOptions, ValidationReport, validate};

use super::{EXIT_REJECTED, GlobalArgs, Overrides, print_json};

/// How many findings of each kind the text summary lists before "... and N more".
const LISTED_PER_CODE: usize = 20;

#[derive(Debug, Args)]
pub struct ValidateArgs {
    /// Dataset root [config: data.root].
    #[arg(long, value_name = "DIR")]
    root: Option<PathBuf>,
    /// Write the full report as JSON to FILE.
    #[arg(long, value_name = "FILE.json")]
    report: Option<PathBuf>,
    /// Errors tolerated before exiting with 1.
    #[arg(long, value_name = "N", default_value_t = 0)]
    max_errors: usize,
    /// Print the report as JSON instead of the summary.
    #[arg(long)]
    json: bool,
}

pub fn exec(args: ValidateArgs, global: &GlobalArgs) -> Result<ExitCode> {
    let config = global.load_config(Overrides::default().add("data.root", args.root))?;
    let options = ValidateOptions {
        root: config.data.root.clone(),
        max_errors: args.max_errors,
        progress: global.progress(args.json),
    };
    let report = validate(&options)?;
    if let Some(path) = &args.report {
        segctl::util::fs::write_atomic(path, &serde_json::to_vec_pretty(&report)?)?;
    }
    if args.json {
        print_json(&report)?;
    } else {
        print_summary(&report);
        if let Some(path) = &args.report {
            println!("report written to {}", path.display());
        }
    }
    Ok(if report.passed { ExitCode::SUCCESS } else { ExitCode::from(EXIT_REJECTED) })
}

fn print_summary(r: &ValidationReport) {
    println!("dataset {}", r.root.display());
    println!(
        "  files: {} images, {} trimaps, {} pairs, {} valid",
        r.images, r.masks, r.pairs, r.valid_pairs
    );
    for (name, count) in &r.splits {
        println!("  split {name:<9} {:>6} rows, {:>6} valid", count.rows, count.valid);
    }
    let fractions: Vec<String> =
        r.class_pixel_fractions.iter().map(|(name, f)| format!("{name} {:.1}%", 100.0 * f)).collect();
    println!("  class pixels: {}", fractions.join(", "));
    let (w, h) = (&r.image_sizes.width, &r.image_sizes.height);
    println!(
        "  image size (min / median / max): width {} / {} / {}, height {} / {} / {}",
        w.min, w.median, w.max, h.min, h.median, h.max
    );
    for (title, findings, by_code) in
        [("errors", &r.errors, &r.errors_by_code), ("warnings", &r.warnings, &r.warnings_by_code)]
    {
        if findings.is_empty() {
            continue;
        }
        println!("{title} ({}):", findings.len());
        for (code, count) in by_code.iter() {
            println!("  {code} ({count})");
            for f in findings.iter().filter(|f| f.code == *code).take(LISTED_PER_CODE) {
                let who = f.stem.clone().or_else(|| f.file.clone()).unwrap_or_default();
                println!("    {who}: {}", f.message);
            }
            if *count > LISTED_PER_CODE {
                println!("    ... and {} more (see --report)", count - LISTED_PER_CODE);
            }
        }
    }
    println!(
        "{}: {} errors (max {}), {} warnings; checked {:.0} samples/s in {:.1}s",
        if r.passed { "PASSED" } else { "FAILED" },
        r.error_count,
        r.max_errors,
        r.warning_count,
        r.samples_per_s,
        r.elapsed_s
    );
}
