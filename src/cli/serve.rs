//! `segctl serve`: flags → config overrides → `server::serve` (prints where it listens).

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::Args;
use segctl::server::{ServeOptions, serve};

use super::{GlobalArgs, Overrides};

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Model repository [config: serve.repository, else export.repository].
    #[arg(long, value_name = "DIR")]
    repository: Option<PathBuf>,
    /// Address to bind [config: serve.host].
    #[arg(long, value_name = "HOST")]
    host: Option<String>,
    /// Port (0 = any free port) [config: serve.port].
    #[arg(long, value_name = "PORT")]
    port: Option<u16>,
    /// auto, cpu, cuda or cuda:N [config: serve.device].
    #[arg(long, value_name = "DEVICE")]
    device: Option<String>,
    /// Print the bound address and the models found as one JSON line at start-up (for
    /// scripts using port 0).
    #[arg(long)]
    json: bool,
}

pub fn exec(args: ServeArgs, global: &GlobalArgs) -> Result<ExitCode> {
    let config = global.load_config(
        Overrides::default()
            .add("serve.repository", args.repository)
            .add("serve.host", args.host)
            .add("serve.port", args.port)
            .add("serve.device", args.device),
    )?;
    let device = segctl::model::select_device(config.serve.device)?;
    let options = ServeOptions { repository: config.serve_repository(), config: config.serve.clone(), device };
    if !segctl::storage::is_url(&options.repository) && !options.repository.is_dir() {
        log::warn!("model repository `{}` does not exist yet; models appear as they are exported", options.repository.display());
    }
    let json = args.json;
    serve(&options, |address, models| {
        if json {
            let line = serde_json::json!({
                "address": address.to_string(),
                "url": format!("http://{address}"),
                "port": address.port(),
                "repository": options.repository,
                "models": models,
            });
            println!("{line}");
        } else {
            println!("segctl serve: listening on http://{address} (repository {})", options.repository.display());
        }
        let _ = std::io::stdout().flush();
    })?;
    Ok(ExitCode::SUCCESS)
}
