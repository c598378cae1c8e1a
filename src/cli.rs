//! The `wrenn` command line: one binary, one subcommand per component.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config;

#[derive(Debug, Parser)]
#[command(name = "wrenn", version = crate::version::VERSION, about = "Wrenn microVM sandbox platform")]
pub struct Cli {
    /// Configuration file (default: $WRENN_CONFIG, else ./wrenn.toml when present).
    #[arg(long, global = true, value_name = "PATH")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the host agent: register with the control plane and run microVMs.
    Agent {
        /// One-time registration token from `POST /v1/hosts` (first start only).
        #[arg(long, value_name = "TOKEN")]
        register: Option<String>,
        /// Address (ip:port) the control plane reaches this agent at.
        #[arg(long, value_name = "ADDR")]
        address: Option<String>,
    },
    /// Configuration tools.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Print the version and build details.
    Version,
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Print the resolved configuration, where each value came from, and the derived paths.
    Show,
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("wrenn: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn load_config(flag: Option<PathBuf>) -> anyhow::Result<config::Loaded> {
    Ok(config::load(&config::Sources::from_process(flag))?)
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

/// Cancelled on SIGINT or SIGTERM, so every long-running component shuts down the same way.
fn shutdown_on_signals() -> tokio_util::sync::CancellationToken {
    let token = tokio_util::sync::CancellationToken::new();
    let trigger = token.clone();
    tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler installs");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::info!("shutdown requested");
        trigger.cancel();
    });
    token
}

pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Agent { register, address } => {
            let loaded = load_config(cli.config)?;
            crate::logging::init(&loaded.config.log)?;
            let args = crate::agent::AgentArgs { register, address };
            runtime()?.block_on(async {
                crate::agent::run(&loaded.config, args, shutdown_on_signals()).await
            })?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Version => {
            println!("{}", crate::version::long());
            Ok(ExitCode::SUCCESS)
        }
        Command::Config {
            command: ConfigCommand::Show,
        } => {
            let loaded = load_config(cli.config)?;
            print!("{}", config::render_show(&loaded));
            Ok(ExitCode::SUCCESS)
        }
    }
}
