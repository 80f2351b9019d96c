//! `segctl completions SHELL` and `segctl man`: generated from the clap definitions, so they
//! never drift from the flags.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::{Args, CommandFactory};
use clap_complete::Shell;

use super::Cli;

#[derive(Debug, Args)]
pub struct CompletionsArgs {
    /// The shell to complete for.
    #[arg(value_enum, value_name = "SHELL")]
    shell: Shell,
}

#[derive(Debug, Args)]
pub struct ManArgs {
    /// The page of one subcommand (`segctl-train(1)`) instead of segctl(1).
    #[arg(value_name = "SUBCOMMAND")]
    subcommand: Option<String>,
    /// Write segctl.1 and one segctl-<subcommand>.1 per subcommand into DIR instead.
    #[arg(long, value_name = "DIR", conflicts_with = "subcommand")]
    out: Option<PathBuf>,
}

pub fn exec_completions(args: CompletionsArgs) -> Result<ExitCode> {
    let mut cmd = Cli::command();
    let mut out = std::io::stdout().lock();
    clap_complete::generate(args.shell, &mut cmd, "segctl", &mut out);
    out.flush()?;
    Ok(ExitCode::SUCCESS)
}

/// Pages: segctl(1), then segctl-<sub>(1) for every subcommand (the top page's SEE ALSO).
fn pages() -> Vec<(String, clap::Command)> {
    let mut top = Cli::command();
    top.build();
    let mut pages = vec![("segctl".to_string(), top.clone())];
    for sub in top.get_subcommands() {
        if sub.get_name() == "help" {
            continue;
        }
        // After build() its display name is `segctl-<sub>` (the page title) and its bin name
        // `segctl <sub>` (the synopsis).
        pages.push((format!("segctl-{}", sub.get_name()), sub.clone()));
    }
    pages
}

fn render(cmd: clap::Command) -> Result<Vec<u8>> {
    let mut bytes = Vec::new();
    clap_mangen::Man::new(cmd).section("1").source(concat!("segctl ", env!("CARGO_PKG_VERSION"))).manual("segctl manual").render(&mut bytes)?;
    Ok(bytes)
}

pub fn exec_man(args: ManArgs) -> Result<ExitCode> {
    let pages = pages();
    if let Some(dir) = &args.out {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create `{}`", dir.display()))?;
        for (name, cmd) in pages {
            let path = dir.join(format!("{name}.1"));
            std::fs::write(&path, render(cmd)?).with_context(|| format!("cannot write `{}`", path.display()))?;
        }
        return Ok(ExitCode::SUCCESS);
    }
    let wanted = args.subcommand.map(|s| format!("segctl-{s}")).unwrap_or_else(|| "segctl".into());
    let Some((_, cmd)) = pages.into_iter().find(|(name, _)| *name == wanted) else {
        bail!("no subcommand `{}`: see `segctl --help`", wanted.trim_start_matches("segctl-"));
    };
    let mut out = std::io::stdout().lock();
    out.write_all(&render(cmd)?)?;
    out.flush()?;
    Ok(ExitCode::SUCCESS)
}
