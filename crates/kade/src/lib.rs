//! The `kade` binary's library: configuration, wiring and the command line.
//!
//! # Layout
//! - [`cli`]: the clap command tree (every command has `--help` with examples).
//! - [`config`]: the typed, documented configuration (TOML + `KADE_*` env + `*_FILE` secrets).
//! - [`node`]: opening the data directory, index, blob store, ingest and audit.
//! - [`serve`]: `kade serve`, one shutdown signal fanned out to the listeners.
//! - [`https`]: the TLS listener and its certificate (configured, or generated on first start).
//! - [`viewer`]: `kade viewer install` and the OHIF viewer's files under `/viewer/`.
//! - [`admin`]: `kade peer`, `stats`, `verify`, `fsck`, `audit`.
//! - [`exchange`]: `kade mailbox …` and `kade exchange …`, and the receiving poller.

pub mod admin;
pub mod cli;
pub mod config;
pub mod exchange;
pub mod gateway;
pub mod https;
pub mod node;
pub mod serve;
pub mod users;
pub mod viewer;

use cli::{Cli, Command};
use tracing_subscriber::EnvFilter;

/// Runs the command line; returns the process exit code.
pub async fn main(cli: Cli) -> anyhow::Result<i32> {
    let cfg = config::Config::load(cli.global.config.as_deref(), cli.global.data_dir.as_deref())?;
    init_logging(
        &cfg.log,
        matches!(
            cli.command,
            Command::Serve(_) | Command::Mailbox(cli::MailboxCommand::Serve { .. })
        ),
    );
    let clean = match cli.command {
        Command::Serve(args) => serve::run(cfg, args).await.map(|()| true)?,
        Command::Peer(cmd) => admin::peer(&cfg, cmd).await.map(|()| true)?,
        Command::Stats { json } => admin::stats(&cfg, json).await.map(|()| true)?,
        Command::Verify { json } => admin::verify(&cfg, json).await?,
        Command::Fsck(args) => admin::fsck(&cfg, args).await?,
        Command::Audit(cmd) => admin::audit(&cfg, cmd).await?,
        Command::User(cmd) => users::user(&cfg, cmd).await.map(|()| true)?,
        Command::Token(cmd) => users::token(&cfg, cmd).await.map(|()| true)?,
        Command::Mailbox(cmd) => exchange::mailbox(&cfg, cmd).await.map(|()| true)?,
        Command::Exchange(cmd) => exchange::exchange(&cfg, cmd).await?,
        Command::Route(cmd) => gateway::route(&cfg, cmd).await.map(|()| true)?,
        Command::Jobs(cmd) => gateway::jobs(&cfg, cmd).await.map(|()| true)?,
        Command::Viewer(cli::ViewerCommand::Install { ohif_version, from }) => {
            let dir = viewer::install(&cfg.data_dir, &ohif_version, from.as_deref())?;
            println!(
                "kade: viewer installed in {}; open https://HOST:{}/viewer/",
                dir.display(),
                cfg.http.port
            );
            true
        }
    };
    Ok(if clean { 0 } else { 1 })
}

fn init_logging(log: &config::LogConfig, serving: bool) {
    // Admin commands log warnings only, so their output stays readable.
    let level = if serving {
        log.level.clone()
    } else {
        format!("warn,{}", log.level.replace("info", "warn"))
    };
    let filter = EnvFilter::try_new(&level).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    if log.format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}
