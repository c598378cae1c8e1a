//! A throwaway PostgreSQL cluster: `initdb` + `postgres` in a temporary directory on a free
//! loopback port, stopped and removed on drop. A watchdog process removes it too if the owning
//! process dies without unwinding (a `kill -9` or an abort), so no cluster outlives its test.

use std::fs;
use std::io;
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::{chown, Pid, User};

/// PostgreSQL refuses to run as root, so as root the cluster runs as this user.
const UNPRIVILEGED_USER: &str = "nobody";
const READY_TIMEOUT: Duration = Duration::from_secs(30);
const DATABASE: &str = "wrenn";
const SUPERUSER: &str = "wrenn";

#[derive(Debug, thiserror::Error)]
pub enum PgError {
    #[error("{what} failed: {source}")]
    Io { what: String, source: io::Error },
    #[error("{command} failed: {output}")]
    Command { command: String, output: String },
    #[error("postgres did not become ready within {READY_TIMEOUT:?}; log:\n{log}")]
    NotReady { log: String },
    #[error("user `{UNPRIVILEGED_USER}` is needed to run postgres as root but does not exist")]
    NoUnprivilegedUser,
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> PgError {
    let what = what.into();
    move |source| PgError::Io { what, source }
}

#[derive(Debug, Clone, Copy)]
struct RunAs {
    uid: u32,
    gid: u32,
}

fn run_as() -> Result<Option<RunAs>, PgError> {
    if !nix::unistd::geteuid().is_root() {
        return Ok(None);
    }
    let user = User::from_name(UNPRIVILEGED_USER)
        .ok()
        .flatten()
        .ok_or(PgError::NoUnprivilegedUser)?;
    Ok(Some(RunAs {
        uid: user.uid.as_raw(),
        gid: user.gid.as_raw(),
    }))
}

fn command(program: &str, as_user: Option<RunAs>) -> Command {
    let mut cmd = Command::new(program);
    if let Some(user) = as_user {
        cmd.uid(user.uid).gid(user.gid);
    }
    cmd.env("LC_ALL", "C").env_remove("PGDATA");
    cmd
}

fn check(mut cmd: Command, what: &str) -> Result<(), PgError> {
    let output = cmd.output().map_err(io_err(format!("running {what}")))?;
    if output.status.success() {
        return Ok(());
    }
    Err(PgError::Command {
        command: what.to_owned(),
        output: format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ),
    })
}

fn chown_tree(path: &Path, user: RunAs) -> Result<(), PgError> {
    let status = Command::new("chown")
        .arg("-R")
        .arg(format!("{}:{}", user.uid, user.gid))
        .arg(path)
        .status()
        .map_err(io_err("running chown"))?;
    if status.success() {
        Ok(())
    } else {
        Err(PgError::Command {
            command: "chown -R".into(),
            output: status.to_string(),
        })
    }
}

/// One `initdb` per process: later clusters copy this template, which is much faster.
fn template(as_user: Option<RunAs>) -> Result<&'static Path, PgError> {
    static TEMPLATE: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let result = TEMPLATE.get_or_init(|| make_template(as_user).map_err(|e| e.to_string()));
    match result {
        Ok(path) => Ok(path.as_path()),
        Err(msg) => Err(PgError::Command {
            command: "initdb (template)".into(),
            output: msg.clone(),
        }),
    }
}

fn make_template(as_user: Option<RunAs>) -> Result<PathBuf, PgError> {
    let base = std::env::temp_dir().join(format!("wrenn-pg-template-{}", std::process::id()));
    let _ = fs::remove_dir_all(&base);
    fs::create_dir_all(&base).map_err(io_err("creating the template directory"))?;
    if let Some(user) = as_user {
        chown(&base, Some(user.uid.into()), Some(user.gid.into())).map_err(|e| PgError::Io {
            what: "chown template".into(),
            source: e.into(),
        })?;
    }
    let data = base.join("data");
    let mut initdb = command("initdb", as_user);
    initdb.args([
        "--no-sync",
        "--auth=trust",
        "--encoding=UTF8",
        "--no-instructions",
    ]);
    initdb
        .arg(format!("--username={SUPERUSER}"))
        .arg("-D")
        .arg(&data);
    check(initdb, "initdb")?;
    let mut single = command("postgres", as_user);
    single.args(["--single", "-D"]).arg(&data).arg("postgres");
    single
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = single
        .spawn()
        .map_err(io_err("starting postgres --single"))?;
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().expect("piped stdin");
        writeln!(stdin, "CREATE DATABASE {DATABASE};")
            .map_err(io_err("writing to postgres --single"))?;
    }
    let output = child
        .wait_with_output()
        .map_err(io_err("waiting for postgres --single"))?;
    if !output.status.success() {
        return Err(PgError::Command {
            command: "postgres --single".into(),
            output: String::from_utf8_lossy(&output.stderr).into_owned(),
        });
    }
    // Removed when the process that made it exits, whichever way it exits.
    spawn_watchdog(&base, None)?;
    Ok(data)
}

/// A small shell loop that waits for this process to die, then kills postgres and deletes its
/// directory. Started in its own session so signals to the test's process group spare it.
fn spawn_watchdog(dir: &Path, postgres: Option<u32>) -> Result<Child, PgError> {
    let me = std::process::id();
    let kill_pg = postgres
        .map(|pid| format!("kill -QUIT {pid} 2>/dev/null; sleep 1; "))
        .unwrap_or_default();
    let script = format!(
        "while kill -0 {me} 2>/dev/null; do sleep 1; done; {kill_pg}rm -rf '{}'",
        dir.display()
    );
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(script)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    cmd.process_group(0);
    cmd.spawn().map_err(io_err("starting the cleanup watchdog"))
}

fn free_port() -> Result<u16, PgError> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(io_err("finding a free port"))?;
    Ok(listener
        .local_addr()
        .map_err(io_err("finding a free port"))?
        .port())
}

/// A running private PostgreSQL server.
#[derive(Debug)]
pub struct PgCluster {
    dir: PathBuf,
    port: u16,
    as_user: Option<RunAs>,
    postgres: Option<Child>,
    watchdog: Option<Child>,
}

impl PgCluster {
    /// Starts a fresh, empty cluster with a `wrenn` database owned by superuser `wrenn`.
    pub fn start() -> Result<Self, PgError> {
        let as_user = run_as()?;
        let template = template(as_user)?;
        let dir = tempfile::Builder::new()
            .prefix("wrenn-pg-")
            .tempdir()
            .map_err(io_err("creating the cluster directory"))?
            .keep();
        let mut cluster = Self {
            dir: dir.clone(),
            port: 0,
            as_user,
            postgres: None,
            watchdog: None,
        };
        let status = Command::new("cp")
            .arg("-a")
            .arg(template)
            .arg(dir.join("data"))
            .status()
            .map_err(io_err("copying the template cluster"))?;
        if !status.success() {
            return Err(PgError::Command {
                command: "cp -a template".into(),
                output: status.to_string(),
            });
        }
        if let Some(user) = as_user {
            chown_tree(&dir, user)?;
        }
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700))
            .map_err(io_err("setting cluster directory permissions"))?;
        cluster.port = free_port()?;
        cluster.start_server()?;
        Ok(cluster)
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join("postgres.log")
    }

    fn start_server(&mut self) -> Result<(), PgError> {
        let log = fs::File::create(self.log_path()).map_err(io_err("creating the postgres log"))?;
        if let Some(user) = self.as_user {
            chown(
                &self.log_path(),
                Some(user.uid.into()),
                Some(user.gid.into()),
            )
            .map_err(|e| PgError::Io {
                what: "chown log".into(),
                source: e.into(),
            })?;
        }
        let mut cmd = command("postgres", self.as_user);
        cmd.arg("-D").arg(self.dir.join("data"));
        cmd.arg("-p").arg(self.port.to_string());
        cmd.arg("-k").arg(&self.dir);
        for setting in [
            "listen_addresses=127.0.0.1",
            "fsync=off",
            "synchronous_commit=off",
            "full_page_writes=off",
            "max_connections=200",
            "shared_buffers=32MB",
        ] {
            cmd.arg("-c").arg(setting);
        }
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone().map_err(io_err("cloning the log handle"))?)
            .stderr(log);
        let child = cmd.spawn().map_err(io_err("starting postgres"))?;
        let pid = child.id();
        self.postgres = Some(child);
        if let Some(mut old) = self.watchdog.take() {
            let _ = old.kill();
            let _ = old.wait();
        }
        self.watchdog = Some(spawn_watchdog(&self.dir, Some(pid))?);
        self.wait_ready()
    }

    fn wait_ready(&mut self) -> Result<(), PgError> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let log = fs::read_to_string(self.log_path()).unwrap_or_default();
            if log.contains("ready to accept connections") {
                return Ok(());
            }
            let exited = self
                .postgres
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            if exited.is_some() || Instant::now() > deadline {
                return Err(PgError::NotReady { log });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `postgres://wrenn@127.0.0.1:PORT/wrenn`.
    pub fn url(&self) -> String {
        format!("postgres://{SUPERUSER}@127.0.0.1:{}/{DATABASE}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Stops the server (fast shutdown), keeping its data, to test outages.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.postgres.take() {
            let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGINT);
            let _ = child.wait();
        }
    }

    /// Starts a stopped server again on the same port with the same data.
    pub fn restart(&mut self) -> Result<(), PgError> {
        self.stop();
        self.start_server()
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        if let Some(mut child) = self.postgres.take() {
            let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGQUIT);
            let _ = child.wait();
        }
        if let Some(mut watchdog) = self.watchdog.take() {
            let _ = watchdog.kill();
            let _ = watchdog.wait();
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}
