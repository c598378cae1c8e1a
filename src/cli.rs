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

pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
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
