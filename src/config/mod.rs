//! Configuration: defaults < `wrenn.toml` < environment variables, resolved once at start-up into
//! one typed [`Config`]. Nothing else in the tree reads the environment for settings.

mod keys;
mod layout;
mod show;
mod types;

use std::collections::BTreeMap;
use std::path::PathBuf;

use figment::providers::{Format, Serialized, Toml};
use figment::value::{Dict, Map, Value};
use figment::{Figment, Metadata, Profile, Provider, Source};
use serde::{Deserialize, Serialize};

use crate::secret::SecretText;

pub use keys::{Key, KEYS};
pub use layout::{Layout, LayoutError};
pub use types::{
    ConsoleLogMaxBytes, DatabaseUrl, DnsServerList, HostPort, HttpUrl, InterfaceName, IpCidr,
    IpCidrList, Ipv4Cidr, Ipv4CidrList, ListenAddr, LogFormat, QemuAccel, SecretList, SignupMode,
    StoreUrl, VmmKind,
};

/// The variable that names the configuration file when `--config` is not given.
pub const CONFIG_FILE_ENV: &str = "WRENN_CONFIG";
/// Read when present and neither `--config` nor `WRENN_CONFIG` names a file.
pub const DEFAULT_CONFIG_FILE: &str = "wrenn.toml";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub database_url: DatabaseUrl,
    pub log: LogConfig,
    pub cp: CpConfig,
    pub agent: AgentConfig,
    pub store: StoreConfig,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    pub level: String,
    pub format: LogFormat,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CpConfig {
    pub listen_addr: ListenAddr,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_agent_addr: Option<HostPort>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxy_domain: Option<String>,
    pub port_proxy_idle_timeout_secs: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwt_secret: Option<SecretText>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwt_previous_secrets: Option<SecretList>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics_token: Option<SecretText>,
    pub allow_loopback_hosts: bool,
    pub host_unreachable_after_secs: u64,
    pub host_monitor_interval_secs: u64,
    pub cpu_overcommit: f64,
    pub memory_overcommit: f64,
    pub disk_overcommit: f64,
    pub reconcile_interval_secs: u64,
    pub usage_sample_interval_secs: u64,
    pub channel_retry_secs: u64,
    pub channel_allow_private_targets: bool,
    pub agent_timeout_secs: u64,
    pub agent_create_timeout_secs: u64,
    pub host_refresh_grace_secs: u64,
    pub login_email_max_failures: u32,
    pub login_email_window_secs: u64,
    pub login_address_max_failures: u32,
    pub login_address_window_secs: u64,
    pub trusted_proxies: IpCidrList,
    pub signup: SignupMode,
    pub signup_address_max: u32,
    pub signup_address_window_secs: u64,
    pub password_hash_permits: usize,
    pub team_max_execs: usize,
    pub team_max_transfers: usize,
    pub team_max_sessions: usize,
    pub team_max_event_streams: usize,
    pub build_context_max_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    pub listen_addr: ListenAddr,
    pub files_rootdir: PathBuf,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cp_url: Option<HttpUrl>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cp_ca_file: Option<PathBuf>,
    pub allow_plain_http: bool,
    pub heartbeat_interval_secs: u64,
    pub envd_ready_timeout_secs: u64,
    pub port_proxy_max_connections: usize,
    pub port_proxy_idle_timeout_secs: u64,
    pub destroy_sandboxes_on_stop: bool,
    /// Creates restore their template's boot snapshot instead of booting.
    pub boot_snapshots: bool,
    /// Paused sandboxes are copied to a shared template store, resumable on any host.
    pub store_paused_sandboxes: bool,
    pub network_name_prefix: String,
    pub sandbox_host_range: Ipv4Cidr,
    pub sandbox_transit_range: Ipv4Cidr,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress_interface: Option<InterfaceName>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics_addr: Option<ListenAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics_token: Option<SecretText>,
    pub egress_deny: Ipv4CidrList,
    pub dns_servers: DnsServerList,
    pub vmm: VmmKind,
    pub qemu_accel: QemuAccel,
    pub firecracker_bin: PathBuf,
    pub firecracker_jailer_bin: PathBuf,
    /// Restored Firecracker guests get their memory from a userfaultfd page server.
    pub firecracker_lazy_memory: bool,
    pub qemu_bin: PathBuf,
    pub console_log_max_bytes: ConsoleLogMaxBytes,
    pub cgroup_parent: PathBuf,
    pub vmm_id_base: u32,
    pub vm_io_bytes_per_sec: u64,
    pub vm_io_ops_per_sec: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub envd_binary: Option<PathBuf>,
}

/// The template store (`crate::store`): read by the agents, which pull and publish template
/// images, and by the control plane, which checks what it registers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<StoreUrl>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub s3_endpoint: Option<HttpUrl>,
    pub s3_region: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub s3_access_key_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub s3_secret_access_key: Option<SecretText>,
    pub s3_allow_http: bool,
}

impl Default for Config {
    fn default() -> Self {
        let default = |path: &str| -> &'static str {
            keys::by_path(path)
                .and_then(|k| k.default)
                .expect("every defaulted key is in KEYS")
        };
        let parse = |path: &str| default(path).parse().expect("defaults in KEYS parse");
        Self {
            database_url: DatabaseUrl(default("database_url").to_owned()),
            log: LogConfig {
                level: default("log.level").to_owned(),
                format: default("log.format")
                    .parse()
                    .expect("default log format parses"),
            },
            cp: CpConfig {
                listen_addr: parse("cp.listen_addr"),
                host_agent_addr: None,
                proxy_domain: None,
                port_proxy_idle_timeout_secs: default("cp.port_proxy_idle_timeout_secs")
                    .parse()
                    .expect("default is a number"),
                jwt_secret: None,
                jwt_previous_secrets: None,
                metrics_token: None,
                allow_loopback_hosts: default("cp.allow_loopback_hosts")
                    .parse()
                    .expect("default is a boolean"),
                host_unreachable_after_secs: default("cp.host_unreachable_after_secs")
                    .parse()
                    .expect("default is a number"),
                host_monitor_interval_secs: default("cp.host_monitor_interval_secs")
                    .parse()
                    .expect("default is a number"),
                cpu_overcommit: default("cp.cpu_overcommit")
                    .parse()
                    .expect("default is a number"),
                memory_overcommit: default("cp.memory_overcommit")
                    .parse()
                    .expect("default is a number"),
                disk_overcommit: default("cp.disk_overcommit")
                    .parse()
                    .expect("default is a number"),
                reconcile_interval_secs: default("cp.reconcile_interval_secs")
                    .parse()
                    .expect("default is a number"),
                usage_sample_interval_secs: default("cp.usage_sample_interval_secs")
                    .parse()
                    .expect("default is a number"),
                channel_retry_secs: default("cp.channel_retry_secs")
                    .parse()
                    .expect("default is a number"),
                channel_allow_private_targets: default("cp.channel_allow_private_targets")
                    .parse()
                    .expect("default is a boolean"),
                agent_timeout_secs: default("cp.agent_timeout_secs")
                    .parse()
                    .expect("default is a number"),
                agent_create_timeout_secs: default("cp.agent_create_timeout_secs")
                    .parse()
                    .expect("default is a number"),
                host_refresh_grace_secs: default("cp.host_refresh_grace_secs")
                    .parse()
                    .expect("default is a number"),
                login_email_max_failures: default("cp.login_email_max_failures")
                    .parse()
                    .expect("default is a number"),
                login_email_window_secs: default("cp.login_email_window_secs")
                    .parse()
                    .expect("default is a number"),
                login_address_max_failures: default("cp.login_address_max_failures")
                    .parse()
                    .expect("default is a number"),
                login_address_window_secs: default("cp.login_address_window_secs")
                    .parse()
                    .expect("default is a number"),
                trusted_proxies: default("cp.trusted_proxies")
                    .parse()
                    .expect("defaults in KEYS parse"),
                signup: default("cp.signup")
                    .parse()
                    .expect("defaults in KEYS parse"),
                signup_address_max: default("cp.signup_address_max")
                    .parse()
                    .expect("defaults in KEYS parse"),
                signup_address_window_secs: default("cp.signup_address_window_secs")
                    .parse()
                    .expect("defaults in KEYS parse"),
                password_hash_permits: default("cp.password_hash_permits")
                    .parse()
                    .expect("defaults in KEYS parse"),
                team_max_execs: default("cp.team_max_execs")
                    .parse()
                    .expect("defaults in KEYS parse"),
                team_max_transfers: default("cp.team_max_transfers")
                    .parse()
                    .expect("defaults in KEYS parse"),
                team_max_sessions: default("cp.team_max_sessions")
                    .parse()
                    .expect("defaults in KEYS parse"),
                team_max_event_streams: default("cp.team_max_event_streams")
                    .parse()
                    .expect("defaults in KEYS parse"),
                build_context_max_bytes: default("cp.build_context_max_bytes")
                    .parse()
                    .expect("defaults in KEYS parse"),
            },
            agent: AgentConfig {
                listen_addr: parse("agent.listen_addr"),
                files_rootdir: PathBuf::from(default("agent.files_rootdir")),
                cp_url: None,
                cp_ca_file: None,
                allow_plain_http: default("agent.allow_plain_http")
                    .parse()
                    .expect("default is a boolean"),
                network_name_prefix: default("agent.network_name_prefix").to_owned(),
                envd_ready_timeout_secs: default("agent.envd_ready_timeout_secs")
                    .parse()
                    .expect("default is a number"),
                port_proxy_max_connections: default("agent.port_proxy_max_connections")
                    .parse()
                    .expect("default is a number"),
                port_proxy_idle_timeout_secs: default("agent.port_proxy_idle_timeout_secs")
                    .parse()
                    .expect("default is a number"),
                boot_snapshots: default("agent.boot_snapshots").parse().expect("default"),
                store_paused_sandboxes: default("agent.store_paused_sandboxes")
                    .parse()
                    .expect("default is a boolean"),
                destroy_sandboxes_on_stop: default("agent.destroy_sandboxes_on_stop")
                    .parse()
                    .expect("default is a boolean"),
                heartbeat_interval_secs: default("agent.heartbeat_interval_secs")
                    .parse()
                    .expect("default is a number"),
                sandbox_host_range: default("agent.sandbox_host_range")
                    .parse()
                    .expect("defaults in KEYS parse"),
                sandbox_transit_range: default("agent.sandbox_transit_range")
                    .parse()
                    .expect("defaults in KEYS parse"),
                egress_interface: None,
                metrics_addr: None,
                metrics_token: None,
                egress_deny: default("agent.egress_deny")
                    .parse()
                    .expect("defaults in KEYS parse"),
                dns_servers: DnsServerList::default(),
                vmm: default("agent.vmm")
                    .parse()
                    .expect("defaults in KEYS parse"),
                qemu_accel: default("agent.qemu_accel")
                    .parse()
                    .expect("defaults in KEYS parse"),
                firecracker_bin: PathBuf::from(default("agent.firecracker_bin")),
                firecracker_jailer_bin: PathBuf::from(default("agent.firecracker_jailer_bin")),
                firecracker_lazy_memory: default("agent.firecracker_lazy_memory")
                    .parse()
                    .expect("default"),
                qemu_bin: PathBuf::from(default("agent.qemu_bin")),
                console_log_max_bytes: default("agent.console_log_max_bytes")
                    .parse()
                    .expect("defaults in KEYS parse"),
                cgroup_parent: PathBuf::from(default("agent.cgroup_parent")),
                vmm_id_base: default("agent.vmm_id_base")
                    .parse()
                    .expect("default is a number"),
                vm_io_bytes_per_sec: default("agent.vm_io_bytes_per_sec")
                    .parse()
                    .expect("default is a number"),
                vm_io_ops_per_sec: default("agent.vm_io_ops_per_sec")
                    .parse()
                    .expect("default is a number"),
                envd_binary: None,
            },
            store: StoreConfig {
                url: None,
                s3_endpoint: None,
                s3_region: default("store.s3_region").to_owned(),
                s3_access_key_id: None,
                s3_secret_access_key: None,
                s3_allow_http: default("store.s3_allow_http")
                    .parse()
                    .expect("default is a boolean"),
            },
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration file {path} could not be read: {source}")]
    FileUnreadable {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("configuration file {path} is not valid TOML: {message}")]
    FileSyntax { path: PathBuf, message: String },
    #[error("unknown configuration key `{key}` in {source_name}")]
    UnknownKey { key: String, source_name: String },
    #[error("invalid value for `{key}`{env_hint} from {source_name}: {detail}")]
    InvalidValue {
        key: String,
        env_hint: String,
        source_name: String,
        detail: String,
    },
    #[error("{}", retired_message(.0))]
    RetiredVariables(Vec<RetiredVariable>),
}

/// A retired variable that is set, with the path that replaced it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetiredVariable {
    pub name: &'static str,
    pub now_at: PathBuf,
}

fn retired_message(vars: &[RetiredVariable]) -> String {
    let mut msg = String::from(
        "retired configuration variables are set; every agent path now derives from AGENT_FILES_ROOTDIR:",
    );
    for var in vars {
        msg.push_str(&format!(
            "\n  {} is no longer read: that path is now {}",
            var.name,
            var.now_at.display()
        ));
    }
    msg.push_str(
        "\nUnset these variables; to move the files, set AGENT_FILES_ROOTDIR (or agent.files_rootdir in wrenn.toml).",
    );
    msg
}

/// Where a resolved value came from, for `config show`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    Default,
    File(PathBuf),
    Env(&'static str),
    Unset,
}

/// A loaded configuration together with where each key's value came from.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub config: Config,
    pub file: Option<PathBuf>,
    pub origins: BTreeMap<&'static str, Origin>,
}

/// Inputs to [`load`], explicit so tests need not mutate the process environment.
#[derive(Debug, Clone, Default)]
pub struct Sources {
    /// `--config PATH` from the command line.
    pub config_flag: Option<PathBuf>,
    pub env: Vec<(String, String)>,
    /// Directory in which `wrenn.toml` is looked for.
    pub cwd: PathBuf,
}

impl Sources {
    pub fn from_process(config_flag: Option<PathBuf>) -> Self {
        Self {
            config_flag,
            env: std::env::vars().collect(),
            cwd: std::env::current_dir().unwrap_or_else(|_| PathBuf::from(".")),
        }
    }

    fn env_var(&self, name: &str) -> Option<&str> {
        self.env
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    fn config_file(&self) -> Option<(PathBuf, bool)> {
        if let Some(path) = &self.config_flag {
            return Some((path.clone(), true));
        }
        if let Some(path) = self.env_var(CONFIG_FILE_ENV).filter(|v| !v.is_empty()) {
            return Some((PathBuf::from(path), true));
        }
        let implicit = self.cwd.join(DEFAULT_CONFIG_FILE);
        implicit.is_file().then_some((implicit, false))
    }
}

const ENV_SOURCE_NAME: &str = "environment";

/// The configured environment variables, as a figment provider.
struct EnvProvider {
    values: Vec<(&'static Key, String)>,
}

impl Provider for EnvProvider {
    fn metadata(&self) -> Metadata {
        Metadata::named(ENV_SOURCE_NAME)
    }

    fn data(&self) -> figment::Result<Map<Profile, Dict>> {
        let mut root = Dict::new();
        for (key, raw) in &self.values {
            let value = match key.kind {
                keys::ValueKind::Text => Value::from(raw.clone()),
                keys::ValueKind::Scalar => {
                    raw.parse::<Value>().expect("Value parsing is infallible")
                }
            };
            insert_dotted(&mut root, key.path, value);
        }
        Ok(Profile::Default.collect(root))
    }
}

fn insert_dotted(dict: &mut Dict, path: &str, value: Value) {
    match path.split_once('.') {
        None => {
            dict.insert(path.to_owned(), value);
        }
        Some((head, rest)) => {
            let entry = dict
                .entry(head.to_owned())
                .or_insert_with(|| Value::from(Dict::new()));
            if let Value::Dict(_, inner) = entry {
                insert_dotted(inner, rest, value);
            }
        }
    }
}

/// Resolves the configuration from defaults, the file and the environment.
pub fn load(sources: &Sources) -> Result<Loaded, ConfigError> {
    let mut figment = Figment::from(Serialized::defaults(Config::default()));
    let file = sources.config_file();
    if let Some((path, explicit)) = &file {
        if *explicit && !path.is_file() {
            return Err(ConfigError::FileUnreadable {
                path: path.clone(),
                source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"),
            });
        }
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::FileUnreadable {
            path: path.clone(),
            source,
        })?;
        if let Err(e) = text.parse::<toml::Table>() {
            return Err(ConfigError::FileSyntax {
                path: path.clone(),
                message: e.to_string(),
            });
        }
        figment = figment.merge(Toml::file_exact(path));
    }
    let env_values: Vec<(&'static Key, String)> = sources
        .env
        .iter()
        .filter(|(_, v)| !v.is_empty())
        .filter_map(|(name, value)| {
            KEYS.iter()
                .find(|k| k.env == name)
                .map(|k| (k, value.clone()))
        })
        .collect();
    figment = figment.merge(EnvProvider { values: env_values });

    let config: Config = figment.extract().map_err(|e| describe(e, &file))?;
    let origins = KEYS
        .iter()
        .map(|key| (key.path, origin_of(&figment, key)))
        .collect();

    let retired: Vec<RetiredVariable> = keys::RETIRED
        .iter()
        .filter(|(name, _)| sources.env_var(name).is_some())
        .map(|(name, what)| {
            let layout = Layout::new(&config.agent.files_rootdir);
            RetiredVariable {
                name,
                now_at: layout.path_named(what),
            }
        })
        .collect();
    if !retired.is_empty() {
        return Err(ConfigError::RetiredVariables(retired));
    }

    Ok(Loaded {
        config,
        file: file.map(|(p, _)| p),
        origins,
    })
}

fn origin_of(figment: &Figment, key: &Key) -> Origin {
    let Some(metadata) = figment.find_metadata(key.path) else {
        return Origin::Unset;
    };
    match &metadata.source {
        Some(Source::File(path)) => Origin::File(path.clone()),
        _ if metadata.name == ENV_SOURCE_NAME => Origin::Env(key.env),
        _ => Origin::Default,
    }
}

/// Turns a figment error into one that names the key, the value's source and the problem.
fn describe(error: figment::Error, file: &Option<(PathBuf, bool)>) -> ConfigError {
    let source_name = match error.metadata.as_ref().map(|m| (&m.name, &m.source)) {
        Some((_, Some(Source::File(path)))) => format!("file {}", path.display()),
        Some((name, _)) if name == ENV_SOURCE_NAME => "the environment".to_owned(),
        Some((name, _)) => name.to_string(),
        None => match file {
            Some((path, _)) => format!("file {}", path.display()),
            None => "the configuration".to_owned(),
        },
    };
    let parent = error.path.join(".");
    let join = |field: &str| {
        if parent.is_empty() || parent == field || parent.ends_with(&format!(".{field}")) {
            if parent.is_empty() {
                field.to_owned()
            } else {
                parent.clone()
            }
        } else {
            format!("{parent}.{field}")
        }
    };
    match &error.kind {
        figment::error::Kind::UnknownField(field, _) => ConfigError::UnknownKey {
            key: join(field),
            source_name,
        },
        figment::error::Kind::MissingField(field) => ConfigError::InvalidValue {
            key: join(field),
            env_hint: String::new(),
            source_name,
            detail: "a value is required".into(),
        },
        kind => {
            let key = parent;
            let env_hint = keys::by_path(&key)
                .map(|k| {
                    if source_name == "the environment" {
                        format!(" (environment variable {})", k.env)
                    } else {
                        format!(" (env {})", k.env)
                    }
                })
                .unwrap_or_default();
            ConfigError::InvalidValue {
                key,
                env_hint,
                source_name,
                detail: kind.to_string(),
            }
        }
    }
}

impl Config {
    pub fn layout(&self) -> Layout {
        Layout::new(&self.agent.files_rootdir)
    }
}

pub use show::render as render_show;

#[cfg(test)]
mod tests;
