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
        /// One-time registration token from `POST /v1/hosts` (first start only). Every local
        /// user can read a command line: prefer WRENN_REGISTER_TOKEN or --register-file.
        #[arg(
            long,
            value_name = "TOKEN",
            env = "WRENN_REGISTER_TOKEN",
            hide_env_values = true
        )]
        register: Option<String>,
        /// A file holding the one-time registration token (first start only).
        #[arg(long, value_name = "PATH", conflicts_with = "register")]
        register_file: Option<PathBuf>,
        /// Address (ip:port) the control plane reaches this agent at.
        #[arg(long, value_name = "ADDR")]
        address: Option<String>,
    },
    /// The control plane.
    Cp {
        #[command(subcommand)]
        command: CpCommand,
    },
    /// Database schema migrations (embedded in the binary) against `database_url`.
    Migrate {
        #[command(subcommand)]
        command: MigrateCommand,
    },
    /// Configuration tools.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Template images on this host: import container images, publish to the template store.
    Template {
        #[command(subcommand)]
        command: TemplateCommand,
    },
    /// Run the guest agent (inside a capsule; PID 1 of the guest).
    Envd(crate::envd::EnvdArgs),
    /// Print the version and build details.
    Version,
    /// Serve a restored Firecracker guest's memory lazily from its snapshot (userfaultfd); the
    /// agent starts one per restore.
    #[command(hide = true)]
    UffdServe {
        /// The socket Firecracker's snapshot load connects to.
        #[arg(long, value_name = "PATH")]
        socket: PathBuf,
        /// The snapshot's memory file.
        #[arg(long, value_name = "PATH")]
        memory: PathBuf,
        /// Pages to copy in first: the list a previous restore recorded.
        #[arg(long, value_name = "PATH")]
        prefetch: Option<PathBuf>,
        /// Where to keep the list of pages this guest touches.
        #[arg(long, value_name = "PATH")]
        record: Option<PathBuf>,
        /// Owner of the socket, as UID:GID (a jailed Firecracker's).
        #[arg(long, value_name = "UID:GID", value_parser = parse_owner)]
        owner: Option<(u32, u32)>,
    },
}

fn parse_owner(text: &str) -> Result<(u32, u32), String> {
    let (uid, gid) = text
        .split_once(':')
        .ok_or_else(|| format!("`{text}` is not UID:GID"))?;
    let number = |n: &str| n.parse::<u32>().map_err(|e| format!("`{n}`: {e}"));
    Ok((number(uid)?, number(gid)?))
}

#[derive(Debug, Subcommand)]
pub enum CpCommand {
    /// Serve the REST API on `cp.listen_addr` until SIGINT/SIGTERM.
    Serve,
    /// Account administration for headless installs.
    Admin {
        #[command(subcommand)]
        command: AdminCommand,
    },
}

#[derive(Debug, Subcommand)]
pub enum AdminCommand {
    /// Create a platform admin account (or make an existing account an admin).
    Create {
        #[arg(long)]
        email: String,
        /// File whose first line is the password (kept off the command line).
        #[arg(long, value_name = "PATH")]
        password_file: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
pub enum TemplateCommand {
    /// Import a container image archive (`docker save` or OCI layout) as the image of template
    /// NAME under this host's files root, and publish it to the template store. Register it
    /// with `POST /v1/admin/templates/NAME/publish?host_id=...`.
    Import {
        /// The archive, a tar file on this host.
        archive: PathBuf,
        #[arg(long)]
        name: String,
        /// Start the image's entrypoint and command at every boot.
        #[arg(long)]
        start_entrypoint: bool,
    },
    /// Publish this host's image of template NAME to the template store.
    Publish { name: String },
}

#[derive(Debug, Subcommand)]
pub enum MigrateCommand {
    /// Apply every pending migration (a no-op when none is pending).
    Up,
    /// Revert the most recently applied migration.
    Down,
    /// List applied and pending migrations.
    Status,
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Print the resolved configuration, where each value came from, and the derived paths.
    Show,
}

pub fn main() -> ExitCode {
    // Test builds arm fail points from the FAILPOINTS environment variable.
    #[cfg(feature = "failpoints")]
    let _failpoints = fail::FailScenario::setup();
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

/// The registration token in `path`, without surrounding whitespace.
fn read_register_file(path: &std::path::Path) -> anyhow::Result<crate::secret::SecretText> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        anyhow::anyhow!(
            "cannot read the registration token file {}: {e}",
            path.display()
        )
    })?;
    let token = text.trim();
    if token.is_empty() {
        anyhow::bail!("the registration token file {} is empty", path.display());
    }
    Ok(crate::secret::SecretText::new(token))
}

pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Agent {
            register,
            register_file,
            address,
        } => {
            let loaded = load_config(cli.config)?;
            crate::logging::init(&loaded.config.log)?;
            let register = match register_file {
                Some(path) => Some(read_register_file(&path)?),
                None => register.map(crate::secret::SecretText::new),
            };
            let args = crate::agent::AgentArgs { register, address };
            let outcome = runtime()?.block_on(async {
                crate::agent::run(&loaded.config, args, shutdown_on_signals()).await
            });
            match outcome {
                Ok(()) => Ok(ExitCode::SUCCESS),
                Err(error) if error.needs_registration() => {
                    eprintln!("wrenn: {error}");
                    Ok(ExitCode::from(crate::agent::EXIT_NEEDS_REGISTRATION))
                }
                Err(error) => Err(error.into()),
            }
        }
        Command::Version => {
            println!("{}", crate::version::long());
            Ok(ExitCode::SUCCESS)
        }
        Command::Cp { command } => {
            let loaded = load_config(cli.config)?;
            crate::logging::init(&loaded.config.log)?;
            runtime()?.block_on(run_cp(command, &loaded.config))
        }
        Command::Migrate { command } => {
            let loaded = load_config(cli.config)?;
            runtime()?.block_on(run_migrate(command, &loaded.config))
        }
        Command::Template { command } => {
            let loaded = load_config(cli.config)?;
            crate::logging::init(&loaded.config.log)?;
            runtime()?.block_on(run_template(command, &loaded.config))
        }
        Command::UffdServe {
            socket,
            memory,
            prefetch,
            record,
            owner,
        } => {
            let options = crate::vmm::firecracker::uffd::ServeOptions {
                socket,
                memory,
                prefetch,
                record,
                owner,
            };
            // The agent waits for this line before the load.
            let served = crate::vmm::firecracker::uffd::serve(&options, || println!("ready"))?;
            eprintln!(
                "uffd-serve: faults={} prefetched={} zero_pages={}",
                served.faults, served.prefetched, served.zero_pages
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Envd(args) => {
            let loaded = load_config(cli.config)?;
            crate::logging::init(&loaded.config.log)?;
            Ok(crate::envd::run(args)?)
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

/// Host-local template work, with the agent's files root, store and envd binary; progress goes to
/// the log (stderr), the result as JSON to stdout.
async fn run_template(
    command: TemplateCommand,
    config: &config::Config,
) -> anyhow::Result<ExitCode> {
    use crate::agent::templates::{ImportSource, TemplateImages};
    let layout = config.layout();
    layout.prepare()?;
    let store = crate::store::TemplateStore::open(&config.store, &layout)?;
    let envd_binary = match &config.agent.envd_binary {
        Some(path) => path.clone(),
        None => std::env::current_exe()?,
    };
    let images = TemplateImages::new(layout, store, envd_binary);
    let answer = match command {
        TemplateCommand::Import {
            archive,
            name,
            start_entrypoint,
        } => {
            let name: crate::template::TemplateName = name.parse()?;
            let archive = std::path::absolute(&archive)?;
            let imported = images
                .import(&name, ImportSource::Path(archive), start_entrypoint)
                .await?;
            serde_json::to_string_pretty(&imported)?
        }
        TemplateCommand::Publish { name } => {
            let name: crate::template::TemplateName = name.parse()?;
            serde_json::to_string_pretty(&images.publish(&name).await?)?
        }
    };
    println!("{answer}");
    Ok(ExitCode::SUCCESS)
}

async fn connect(config: &config::Config) -> anyhow::Result<crate::db::Db> {
    let db = crate::db::connect_lazy(&config.database_url.0)?;
    crate::db::ping(&db).await.map_err(|e| {
        anyhow::anyhow!(
            "cannot reach the database at {}: {e}",
            config.database_url.redacted()
        )
    })?;
    Ok(db)
}

async fn run_cp(command: CpCommand, config: &config::Config) -> anyhow::Result<ExitCode> {
    use crate::cp::services::{accounts, input};
    match command {
        CpCommand::Serve => crate::cp::serve(config).await?,
        CpCommand::Admin {
            command:
                AdminCommand::Create {
                    email,
                    password_file,
                },
        } => {
            let text = std::fs::read_to_string(&password_file)
                .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", password_file.display()))?;
            let password = text.lines().next().unwrap_or_default();
            let email = input::Email::parse("--email", &email)?;
            let password = input::Password::parse("password", password)?;
            let db = connect(config).await?;
            let passwords = crate::cp::services::passwords::PasswordHashing::new(1);
            match accounts::ensure_admin(&db, &passwords, email, password).await? {
                accounts::AdminBootstrap::Created(id) => println!("created platform admin {id}"),
                accounts::AdminBootstrap::Promoted(id) => {
                    println!(
                        "{id} already existed and is now a platform admin (password unchanged)"
                    )
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn run_migrate(command: MigrateCommand, config: &config::Config) -> anyhow::Result<ExitCode> {
    use crate::db::migrate;
    let db = connect(config).await?;
    match command {
        MigrateCommand::Up => {
            let applied = migrate::up(&db).await?;
            if applied.is_empty() {
                println!("database is up to date");
            }
            for version in applied {
                println!("applied {version:04}");
            }
        }
        MigrateCommand::Down => match migrate::down(&db).await? {
            Some(version) => println!("reverted {version:04}"),
            None => println!("no migration is applied"),
        },
        MigrateCommand::Status => {
            for m in migrate::status(&db).await? {
                let state = m.applied_at.map_or("pending".to_owned(), |at| {
                    format!("applied {}", at.to_rfc3339())
                });
                println!("{:04} {:<24} {state}", m.version, m.description);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
