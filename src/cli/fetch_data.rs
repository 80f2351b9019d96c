//! `segctl fetch-data`: flags → options → `data::fetch::fetch` or `data::synthetic::generate`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Result;
use clap::Args;
use segctl::data::{fetch, synthetic};

use super::{GlobalArgs, Overrides, print_json};

#[derive(Debug, Args)]
pub struct FetchDataArgs {
    /// Destination dataset root [config: data.root].
    #[arg(long, value_name = "DIR")]
    root: Option<PathBuf>,
    /// A mirror URL prefix, or a local folder holding images.tar.gz and annotations.tar.gz
    /// [config: data.fetch.source].
    #[arg(long, value_name = "URL_PREFIX|DIR")]
    source: Option<String>,
    /// md5sum-format file with the sums of the two archives, replacing the official ones
    /// [config: data.fetch.checksums].
    #[arg(long, value_name = "FILE")]
    checksums: Option<PathBuf>,
    /// Generate N synthetic samples in the real layout instead of downloading.
    #[arg(long, value_name = "N")]
    synthetic: Option<usize>,
    /// Seed of the synthetic dataset.
    #[arg(long, value_name = "S", default_value_t = 0, requires = "synthetic")]
    seed: u64,
    /// Replace `images/` and `annotations/` even when they hold files segctl did not extract,
    /// moving them to `<root>/.segctl-trash-<time>/` first (never deleting them).
    #[arg(long, conflicts_with = "synthetic")]
    force: bool,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

pub fn exec(args: FetchDataArgs, global: &GlobalArgs) -> Result<ExitCode> {
    let config = global.load_config(
        Overrides::default()
            .add("data.root", args.root)
            .add("data.fetch.source", args.source)
            .add("data.fetch.checksums", args.checksums),
    )?;
    let progress = global.progress(args.json);
    if let Some(samples) = args.synthetic {
        let options = synthetic::SyntheticOptions { root: config.data.root.clone(), samples, seed: args.seed, progress };
        let report = synthetic::generate(&options)?;
        if args.json {
            print_json(&report)?;
        } else if report.already_present {
            println!("{}: synthetic dataset ({} samples, seed {}) already present; nothing to do", report.root.display(), report.samples, report.seed);
        } else {
            println!(
                "{}: wrote {} synthetic samples (seed {}): {} trainval, {} test",
                report.root.display(),
                report.samples,
                report.seed,
                report.trainval,
                report.test
            );
        }
        return Ok(ExitCode::SUCCESS);
    }
    let f = &config.data.fetch;
    let options = fetch::FetchOptions {
        root: config.data.root.clone(),
        source: fetch::Source::parse(f.source.as_deref()),
        checksums: f.checksums.clone(),
        retries: f.retries,
        retry_backoff: Duration::from_millis(f.retry_backoff_ms),
        timeout: Duration::from_secs(f.timeout_s),
        limits: fetch::ExtractLimits {
            max_bytes: f.max_extract_bytes,
            max_members: f.max_members,
            max_member_bytes: f.max_member_bytes,
        },
        force: args.force,
        progress,
    };
    let report = fetch::fetch(&options)?;
    if args.json {
        print_json(&report)?;
    } else if report.already_complete {
        println!("{}: dataset already complete and verified; nothing to do", report.root.display());
    } else {
        for a in &report.archives {
            let how = match (a.downloaded_bytes, a.resumed_from) {
                (0, _) => "already present".to_string(),
                (n, Some(from)) => format!("resumed at {from} bytes, downloaded {}", segctl::util::human_bytes(n)),
                (n, None) => format!("downloaded {}", segctl::util::human_bytes(n)),
            };
            println!("{}: {} ({}), MD5 {} verified, from {}", a.name, segctl::util::human_bytes(a.bytes), how, a.md5, a.source);
        }
        if let Some(trash) = &report.trash {
            println!("moved the old {} to {}", report.moved_to_trash.join(" and "), trash.display());
        }
        println!(
            "{}: extracted {} files ({})",
            report.root.display(),
            report.extracted_files,
            segctl::util::human_bytes(report.extracted_bytes)
        );
    }
    Ok(ExitCode::SUCCESS)
}
