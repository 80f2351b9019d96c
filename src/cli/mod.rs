//! Command-line surface: the clap definitions, shared flags, and one `exec` per subcommand.
//! Each subcommand only turns flags into config overrides and options, then calls the library.

mod benchmark;
mod completions;
mod evaluate;
mod export;
mod fetch_data;
mod predict;
mod serve;
mod train;
mod validate;

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use segctl::config::Config;
use segctl::progress::ProgressMode;

/// Exit code for "could not run" (bad flags, bad config, missing files).
pub const EXIT_FAILURE: u8 = 2;
/// Exit code for "ran, and the answer is no" (validation failed, model rejected, some inputs failed).
pub const EXIT_REJECTED: u8 = 1;

/// Fetch, validate, train, evaluate, export, serve and predict a pet-segmentation model.
#[derive(Debug, Parser)]
#[command(name = "segctl", version, about, disable_version_flag = true, subcommand_required = false, arg_required_else_help = true)]
pub struct Cli {
    /// Print the version, the commit and features it was built with, the CPU kernels it will
    /// use and whether a CUDA device answers.
    #[arg(long, short = 'V')]
    pub version: bool,
    /// With --version: print it as one JSON object.
    #[arg(long, requires = "version")]
    pub json: bool,
    #[command(flatten)]
    pub global: GlobalArgs,
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// Flags every subcommand takes.
#[derive(Debug, Args)]
pub struct GlobalArgs {
    /// YAML configuration file (defaults apply to every key it leaves out).
    #[arg(long, short = 'c', global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Override one config value: dotted key, value parsed as YAML (repeatable).
    #[arg(long = "set", global = true, value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// More log output (-v debug, -vv trace).
    #[arg(long, short = 'v', global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// Only warnings and errors; no progress bars.
    #[arg(long, short = 'q', global = true)]
    pub quiet: bool,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Download and extract Oxford-IIIT Pet, or generate a synthetic dataset.
    FetchData(fetch_data::FetchDataArgs),
    /// Check a dataset against the data contract and report statistics.
    Validate(validate::ValidateArgs),
    /// Train a model; checkpoints, metrics log and curves go to a run folder.
    Train(train::TrainArgs),
    /// Score a model on a split and gate it on its mean IoU (exit 0 accepted, 1 rejected).
    Evaluate(evaluate::EvaluateArgs),
    /// Turn a checkpoint into a versioned model in the model repository.
    Export(export::ExportArgs),
    /// Serve the model repository over HTTP (TF-Serving-style API, dynamic batching).
    Serve(serve::ServeArgs),
    /// Segment photos: class-id and colour masks at each photo's size, overlays on request.
    Predict(predict::PredictArgs),
    /// Time the inference engine on this machine: images/s and latency per model call.
    Benchmark(benchmark::BenchmarkArgs),
    /// Print a shell completion script (bash, zsh, fish, powershell, elvish).
    Completions(completions::CompletionsArgs),
    /// Print the manual page (roff), or write every page into a folder.
    Man(completions::ManArgs),
}

/// Runs the chosen subcommand (or prints the version).
pub fn run(cli: Cli) -> Result<ExitCode> {
    if cli.version {
        let info = segctl::build_info::collect();
        if cli.json {
            print_json(&info)?;
        } else {
            print!("{}", info.render());
        }
        return Ok(ExitCode::SUCCESS);
    }
    let Some(command) = cli.command else {
        // Unreachable through clap (arg_required_else_help), kept for a clear message.
        anyhow::bail!("no subcommand given: see `segctl --help`");
    };
    match command {
        Command::FetchData(args) => fetch_data::exec(args, &cli.global),
        Command::Validate(args) => validate::exec(args, &cli.global),
        Command::Train(args) => train::exec(args, &cli.global),
        Command::Evaluate(args) => evaluate::exec(args, &cli.global),
        Command::Export(args) => export::exec(args, &cli.global),
        Command::Serve(args) => serve::exec(args, &cli.global),
        Command::Predict(args) => predict::exec(args, &cli.global),
        Command::Benchmark(args) => benchmark::exec(args, &cli.global),
        Command::Completions(args) => completions::exec_completions(args),
        Command::Man(args) => completions::exec_man(args),
    }
}

/// Sets up `log` through env_logger: `RUST_LOG` wins, else -q/-v pick the level.
pub fn init_logging(global: &GlobalArgs) {
    let level = match (global.quiet, global.verbose) {
        (true, _) => "warn",
        (false, 0) => "info",
        (false, 1) => "debug",
        (false, _) => "trace",
    };
    let filter = format!("segctl={level},warn");
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(filter))
        .format_target(false)
        .format_timestamp_secs()
        .init();
}

impl GlobalArgs {
    /// Loads the config with `--set` overrides, then the subcommand's own flag overrides.
    pub fn load_config(&self, flags: Overrides) -> Result<Config> {
        let mut overrides = Vec::new();
        for item in &self.set {
            let (key, value) = item
                .split_once('=')
                .with_context(|| format!("--set `{item}`: expected KEY=VALUE, e.g. train.epochs=5"))?;
            overrides.push((key.trim().to_string(), value.to_string()));
        }
        overrides.extend(flags.0);
        let config = segctl::config::load(self.config.as_deref(), &overrides)?;
        segctl::storage::configure(&config.storage)?;
        Ok(config)
    }

    /// Progress bars unless quiet or the output is machine-readable.
    pub fn progress(&self, json: bool) -> ProgressMode {
        if self.quiet || json { ProgressMode::Hidden } else { ProgressMode::Auto }
    }
}

/// Config overrides coming from typed flags (applied after `--set`).
#[derive(Debug, Default)]
pub struct Overrides(Vec<(String, String)>);

impl Overrides {
    /// Adds `key = value` when the flag was given.
    pub fn add<T: serde::Serialize>(mut self, key: &str, value: Option<T>) -> Self {
        if let Some(v) = value {
            let yaml = serde_yaml::to_string(&v).expect("flag values serialize to YAML");
            self.0.push((key.to_string(), yaml));
        }
        self
    }
}

/// Writes a value as pretty JSON to stdout.
pub fn print_json<T: serde::Serialize>(value: &T) -> Result<()> {
    let mut out = std::io::stdout().lock();
    serde_json::to_writer_pretty(&mut out, value)?;
    writeln!(out)?;
    Ok(())
}
