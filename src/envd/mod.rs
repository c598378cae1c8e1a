//! `wrenn envd`, the guest agent: runs processes and terminals, moves files and watches
//! directories for the host, over HTTP on TCP and (inside a VM) vsock. As PID 1 of a guest it also
//! boots the userland minimum and powers the machine off. The API is in docs/envd-api.md.

pub mod api;
pub mod client;
mod clock;
mod files;
mod identity;
mod init;
mod metrics;
mod output;
mod ports;
mod process;
mod server;
pub mod template;
pub(crate) mod users;
mod watch;

use std::future::IntoFuture;
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use axum::serve::ListenerExt;
use nix::sys::signal::Signal;
use tokio::signal::unix::{signal, SignalKind};

pub use api::DEFAULT_PORT;
pub use init::{IpConfig, KernelArgs};

/// How long children get between SIGTERM and SIGKILL at shutdown.
const STOP_GRACE: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, clap::Args)]
pub struct EnvdArgs {
    /// TCP port of the API; 0 picks a free one (the chosen port is printed on stdout).
    #[arg(long, default_value_t = DEFAULT_PORT)]
    pub port: u16,
    /// Address the TCP listener binds.
    #[arg(long, default_value_t = IpAddr::V4(Ipv4Addr::UNSPECIFIED))]
    pub address: IpAddr,
    /// vsock port of the API; 0 disables it. Failing to bind it is logged, not fatal.
    #[arg(long, default_value_t = u32::from(DEFAULT_PORT))]
    pub vsock_port: u32,
    /// Perform the PID-1 duties (mounts, hostname, network, reaping, power-off) even when not
    /// PID 1. Only meaningful inside a guest or a disposable mount/UTS namespace.
    #[arg(long)]
    pub init: bool,
    /// Where the kernel arguments (`ip=`, `wrenn.dns=`) are read from in PID-1 mode.
    #[arg(long, default_value = "/proc/cmdline")]
    pub cmdline_file: PathBuf,
    /// The template's settings (defaults and processes started at boot); absent is none.
    #[arg(long, default_value = template::TEMPLATE_CONFIG)]
    pub template_config: PathBuf,
}

/// Why envd could not run.
#[derive(Debug, thiserror::Error)]
pub enum EnvdError {
    #[error("could not start the runtime: {0}")]
    Runtime(std::io::Error),
    #[error("could not listen on tcp {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("could not watch for child exits: {0}")]
    Reaper(std::io::Error),
    #[error("could not install signal handlers: {0}")]
    Signals(std::io::Error),
    #[error("the template's settings are unusable: {0}")]
    TemplateConfig(#[from] template::TemplateConfigError),
}

pub fn run(args: EnvdArgs) -> Result<ExitCode, EnvdError> {
    let is_init = args.init || nix::unistd::getpid().as_raw() == 1;
    let system = is_init.then(|| {
        let cmdline = std::fs::read_to_string(&args.cmdline_file).unwrap_or_default();
        init::InitSystem::boot(&KernelArgs::parse(&cmdline))
    });
    // One thread: envd must stay small, and spawning and reaping on the same thread is what
    // keeps std's post-exec-failure wait from racing the reaper.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .max_blocking_threads(8)
        .thread_keep_alive(Duration::from_secs(5))
        .build()
        .map_err(EnvdError::Runtime)?;
    let result = runtime.block_on(serve(args, is_init));
    if let Some(system) = system {
        if let Err(error) = &result {
            tracing::error!(%error, "envd failed as PID 1; powering off");
        }
        system.unmount_all();
        init::power_off();
    }
    result.map(|()| ExitCode::SUCCESS)
}

async fn serve(args: EnvdArgs, is_init: bool) -> Result<(), EnvdError> {
    // A broken template must fail the sandbox's start with the reason on its console, not run
    // without what the template promised.
    let template = template::TemplateConfig::load(&args.template_config)?.unwrap_or_default();
    let reaper = process::Reaper::start().map_err(EnvdError::Reaper)?;
    let state = Arc::new(server::AppState::new(
        process::Processes::new(reaper),
        template.defaults(),
        template.start_requests(),
    ));
    let router = server::router(state.clone());

    let addr = SocketAddr::new(args.address, args.port);
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| EnvdError::Listen { addr, source })?;
    let bound = listener
        .local_addr()
        .map_err(|source| EnvdError::Listen { addr, source })?;
    // Written without println!, which panics when stdout is gone (a guest without a console).
    let _ = writeln!(std::io::stdout(), "envd listening on tcp {bound}");
    tracing::info!(%bound, version = crate::version::VERSION, is_init, "envd listening");
    let tcp = listener.tap_io(|stream| {
        let _ = stream.set_nodelay(true);
    });
    tokio::spawn(axum::serve(tcp, router.clone()).into_future());
    if args.vsock_port != 0 {
        serve_vsock(args.vsock_port, router);
    }

    let mut terminate = signal(SignalKind::terminate()).map_err(EnvdError::Signals)?;
    let mut interrupt = signal(SignalKind::interrupt()).map_err(EnvdError::Signals)?;
    tokio::select! {
        _ = terminate.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = interrupt.recv() => tracing::info!("SIGINT: shutting down"),
        () = state.shutdown.notified() => tracing::info!("shutdown requested"),
    }
    stop_children(&state.processes).await;
    Ok(())
}

fn serve_vsock(port: u32, router: axum::Router) {
    let addr = tokio_vsock::VsockAddr::new(tokio_vsock::VMADDR_CID_ANY, port);
    match tokio_vsock::VsockListener::bind(addr) {
        Ok(listener) => {
            tracing::info!(port, "envd listening on vsock");
            tokio::spawn(axum::serve(VsockIncoming(listener), router).into_future());
        }
        Err(error) => tracing::warn!(port, %error, "vsock unavailable; serving TCP only"),
    }
}

struct VsockIncoming(tokio_vsock::VsockListener);

impl axum::serve::Listener for VsockIncoming {
    type Io = tokio_vsock::VsockStream;
    type Addr = tokio_vsock::VsockAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match self.0.accept().await {
                Ok(connection) => return connection,
                Err(error) => {
                    tracing::warn!(%error, "vsock accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.0.local_addr()
    }
}

/// SIGTERM to every process (as PID 1: every process in the system), a grace period, then
/// SIGKILL for whatever is left.
async fn stop_children(processes: &process::Processes) {
    let is_pid1 = nix::unistd::getpid().as_raw() == 1;
    for (signal, wait) in [
        (Signal::SIGTERM, STOP_GRACE),
        (Signal::SIGKILL, Duration::from_secs(2)),
    ] {
        processes.signal_all(signal);
        if is_pid1 {
            // -1 reaches every process but init itself; never sent outside PID 1.
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(-1), signal);
        }
        let deadline = tokio::time::Instant::now() + wait;
        while process::Reaper::has_children() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if !process::Reaper::has_children() {
            return;
        }
    }
}
