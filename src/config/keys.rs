//! The table of every configuration key: its place in `wrenn.toml`, its environment variable,
//! its default and whether it is a secret. `wrenn.toml.example`, `config show` and the error
//! messages are all driven from here so they cannot drift apart.

/// How an environment value is turned into a configuration value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValueKind {
    /// Kept verbatim as a string; the typed field parses it (addresses, URLs, paths, secrets).
    Text,
    /// Parsed as a TOML-like scalar first (integers, booleans).
    Scalar,
}

#[derive(Debug, Clone, Copy)]
pub struct Key {
    /// Dotted path in `wrenn.toml`, e.g. `cp.listen_addr`.
    pub path: &'static str,
    pub env: &'static str,
    /// Default shown in documentation; `None` means unset unless configured.
    pub default: Option<&'static str>,
    pub secret: bool,
    pub kind: ValueKind,
    pub help: &'static str,
}

const fn key(
    path: &'static str,
    env: &'static str,
    default: Option<&'static str>,
    help: &'static str,
) -> Key {
    Key {
        path,
        env,
        default,
        secret: false,
        kind: ValueKind::Text,
        help,
    }
}

const fn secret(path: &'static str, env: &'static str, help: &'static str) -> Key {
    Key {
        path,
        env,
        default: None,
        secret: true,
        kind: ValueKind::Text,
        help,
    }
}

const fn scalar(
    path: &'static str,
    env: &'static str,
    default: &'static str,
    help: &'static str,
) -> Key {
    Key {
        path,
        env,
        default: Some(default),
        secret: false,
        kind: ValueKind::Scalar,
        help,
    }
}

pub const KEYS: &[Key] = &[
    Key {
        path: "database_url",
        env: "DATABASE_URL",
        default: Some("postgres://wrenn@localhost:5432/wrenn"),
        secret: true,
        kind: ValueKind::Text,
        help: "PostgreSQL connection URL used by the control plane and `wrenn migrate`.",
    },
    key("log.level", "LOG_LEVEL", Some("info"), "Log level or filter (`RUST_LOG` wins when set)."),
    key("log.format", "LOG_FORMAT", Some("text"), "Log output format: `text` or `json`."),
    key("cp.listen_addr", "CP_LISTEN_ADDR", Some(":8000"), "Control-plane HTTP listen address; `:8000` means all interfaces."),
    key("cp.host_agent_addr", "CP_HOST_AGENT_ADDR", None, "Address (host:port) the control plane dials for host agents instead of the address a host registered with; for single-host setups behind NAT."),
    key("cp.proxy_domain", "CP_PROXY_DOMAIN", None, "Domain of the port proxy: `{port}-{capsule_id}.<domain>` reaches a port inside a capsule (with a `:port` if clients use one, as `localhost:8000`). Unset, any host name of that form is proxied, so a local stack answers `8888-<id>.localhost:8000`."),
    scalar("cp.port_proxy_idle_timeout_secs", "CP_PORT_PROXY_IDLE_TIMEOUT_SECS", "900", "Seconds a proxied WebSocket (or other upgraded connection) may pass with no byte either way before the control plane closes it."),
    secret("cp.jwt_secret", "JWT_SECRET", "HS256 signing secret for user and host tokens, at least 32 bytes. Required by `wrenn cp serve`."),
    secret("cp.metrics_token", "CP_METRICS_TOKEN", "Bearer token `GET /metrics` (Prometheus) requires; unset leaves it open to anyone who reaches the API."),
    secret("cp.jwt_previous_secrets", "JWT_PREVIOUS_SECRETS", "Comma-separated JWT secrets `cp.jwt_secret` replaced: tokens they signed are still accepted, so a rotation signs nobody out and no agent restarts. Remove one once its tokens have expired (user tokens last 6 hours, host tokens 7 days; an agent whose host token is refused refreshes it)."),
    scalar("cp.allow_loopback_hosts", "CP_ALLOW_LOOPBACK_HOSTS", "false", "Whether hosts may register with a loopback address (agent and control plane on one machine: local stacks and tests). Link-local, cloud metadata and the control plane's other own addresses are always refused."),
    scalar("cp.host_unreachable_after_secs", "CP_HOST_UNREACHABLE_AFTER_SECS", "90", "Seconds without a heartbeat after which a host is marked unreachable."),
    scalar("cp.host_monitor_interval_secs", "CP_HOST_MONITOR_INTERVAL_SECS", "15", "How often, in seconds, the control plane looks for hosts whose heartbeat stopped."),
    scalar("cp.cpu_overcommit", "CP_CPU_OVERCOMMIT", "4.0", "vCPUs the scheduler may place per physical core of a host."),
    scalar("cp.memory_overcommit", "CP_MEMORY_OVERCOMMIT", "1.0", "Guest memory the scheduler may place per MiB of host memory."),
    scalar("cp.disk_overcommit", "CP_DISK_OVERCOMMIT", "2.0", "Sandbox disk the scheduler may place per MiB of host disk (sandbox disks are sparse)."),
    scalar("cp.reconcile_interval_secs", "CP_RECONCILE_INTERVAL_SECS", "15", "How often, in seconds, the control plane compares its sandboxes with each online agent's list."),
    scalar("cp.channel_retry_secs", "CP_CHANNEL_RETRY_SECS", "10", "Seconds (1-3600) before a failed notification-channel delivery is first retried; later retries wait 3, 12, 60 and 360 times as long."),
    scalar("cp.channel_allow_private_targets", "CP_CHANNEL_ALLOW_PRIVATE_TARGETS", "false", "Whether notification channels may send to internal addresses (loopback, private and link-local networks, metadata services): off, a team admin cannot make the control plane call into its own network."),
    scalar("cp.usage_sample_interval_secs", "CP_USAGE_SAMPLE_INTERVAL_SECS", "10", "Seconds between samples of what each team reserves (usage metering, stats); every replica must use the same value."),
    scalar("cp.agent_timeout_secs", "CP_AGENT_TIMEOUT_SECS", "30", "Seconds the control plane waits for a host agent's answer (sandbox creation excepted)."),
    scalar("cp.agent_create_timeout_secs", "CP_AGENT_CREATE_TIMEOUT_SECS", "180", "Seconds the control plane waits for a host agent to create a sandbox (boot until envd answers)."),
    scalar("cp.host_refresh_grace_secs", "CP_HOST_REFRESH_GRACE_SECS", "60", "Seconds after a host refresh token is rotated during which that previous token may be presented once more (an agent retrying a refresh whose answer it lost) instead of counting as reuse, which revokes all of the host's credentials; 0 disables the grace."),
    scalar("cp.login_email_max_failures", "CP_LOGIN_EMAIL_MAX_FAILURES", "10", "Failed password logins for one email within `cp.login_email_window_secs` after which further logins for it (from any address) get 429 until the window ends; 0 turns the limit off."),
    scalar("cp.login_email_window_secs", "CP_LOGIN_EMAIL_WINDOW_SECS", "900", "Length in seconds of an email's failed-login window, counted from its first failure."),
    scalar("cp.login_address_max_failures", "CP_LOGIN_ADDRESS_MAX_FAILURES", "50", "Failed password logins from one client address (IPv6: its /64) within `cp.login_address_window_secs` after which further logins from it get 429 until the window ends; 0 turns the limit off."),
    scalar("cp.login_address_window_secs", "CP_LOGIN_ADDRESS_WINDOW_SECS", "900", "Length in seconds of a client address's failed-login window, counted from its first failure."),
    key("cp.trusted_proxies", "CP_TRUSTED_PROXIES", Some(""), "Comma-separated networks of reverse proxies (load balancers, Caddy) whose X-Forwarded-For names the client address; empty means the TCP peer is the client. Behind a proxy this must name it, or every client shares the proxy's address limit."),
    key("cp.signup", "CP_SIGNUP", Some("open"), "Whether anyone may create an account with `POST /v1/auth/signup` (`open`) or only `wrenn cp admin create` makes accounts (`closed`: signup answers 403). Open by default because signup is how ordinary accounts are made and the reference API's flow starts with it; its cost is bounded by the per-address throttle and `cp.password_hash_permits`. Close it on an install reachable by strangers once its users exist."),
    scalar("cp.signup_address_max", "CP_SIGNUP_ADDRESS_MAX", "10", "Signups from one client address (IPv6: its /64) within `cp.signup_address_window_secs` after which further signups from it get 429 until the window ends; 0 turns the limit off."),
    scalar("cp.signup_address_window_secs", "CP_SIGNUP_ADDRESS_WINDOW_SECS", "3600", "Length in seconds of a client address's signup window, counted from its first signup."),
    scalar("cp.password_hash_permits", "CP_PASSWORD_HASH_PERMITS", "4", "Password hashes (signup) and checks (login) computed at once; each takes about 19 MiB and a core for a moment, so a burst of signups or logins waits here instead of taking gigabytes. At least 1."),
    scalar("cp.team_max_execs", "CP_TEAM_MAX_EXECS", "8", "Execs (`POST /exec`) one team may have in progress at once on this control plane; more get 429 with Retry-After. A foreground exec's answer is held until it is sent, up to 64 MiB; 0 turns the limit off."),
    scalar("cp.team_max_transfers", "CP_TEAM_MAX_TRANSFERS", "16", "File transfers (uploads, downloads, directory listings) one team may have in progress at once on this control plane; more get 429 with Retry-After; 0 turns the limit off."),
    scalar("cp.team_max_sessions", "CP_TEAM_MAX_SESSIONS", "32", "WebSocket process sessions (exec streams, process streams, PTYs) one team may have open at once on this control plane; more are refused with 429 (or, when authenticated by frame, an error frame); 0 turns the limit off."),
    scalar("cp.team_max_event_streams", "CP_TEAM_MAX_EVENT_STREAMS", "16", "Event streams (`GET /v1/events/stream`) one team may have open at once on this control plane; more get 429 with Retry-After; 0 turns the limit off."),
    scalar("cp.build_context_max_bytes", "CP_BUILD_CONTEXT_MAX_BYTES", "1073741824", "The largest archive a template build may upload for its COPY steps, counted as it arrives and again unpacked; larger ones are refused with 413 while streaming."),
    key("agent.listen_addr", "AGENT_LISTEN_ADDR", Some(":50051"), "Host-agent API listen address."),
    key("agent.files_rootdir", "AGENT_FILES_ROOTDIR", Some("/var/lib/wrenn"), "Files root: kernels/, images/, sandboxes/, snapshots/ and host-token live under it."),
    key("agent.cp_url", "AGENT_CP_URL", None, "Control-plane base URL the agent registers and heartbeats with, e.g. https://cp.example.com. Plain http:// is accepted only to a loopback address unless `agent.allow_plain_http` is set."),
    key("agent.cp_ca_file", "AGENT_CP_CA_FILE", None, "PEM file of the CA(s) the control plane's https:// certificate must chain to, instead of the public web PKI: a private deployment pins its own CA."),
    scalar("agent.allow_plain_http", "AGENT_ALLOW_PLAIN_HTTP", "false", "Whether `agent.cp_url` may be plain http:// to a non-loopback address: the registration token, host token and refresh token would cross the network unencrypted."),
    key("agent.network_name_prefix", "AGENT_NETWORK_NAME_PREFIX", Some("wrenn"), "Names this agent's sandbox namespaces and host links (`<prefix>-<slot>`) and its nft table; lowercase letters and digits. Give each agent on one machine its own prefix and address ranges."),
    scalar("agent.envd_ready_timeout_secs", "AGENT_ENVD_READY_TIMEOUT_SECS", "60", "Seconds a new sandbox's envd has to answer before the create is rolled back."),
    scalar("agent.port_proxy_max_connections", "AGENT_PORT_PROXY_MAX_CONNECTIONS", "256", "Proxied connections (requests in flight, WebSockets) one sandbox's ports may have open at once; more are refused with 429."),
    scalar("agent.port_proxy_idle_timeout_secs", "AGENT_PORT_PROXY_IDLE_TIMEOUT_SECS", "900", "Seconds a proxied connection to a sandbox's port may pass with no byte either way before it is closed."),
    scalar("agent.boot_snapshots", "AGENT_BOOT_SNAPSHOTS", "true", "Whether creates restore a boot snapshot of their template (booted once per template, shape, kernel and VMM version, in the background after the first create) instead of booting a kernel each time. Off, every create boots."),
    scalar("agent.store_paused_sandboxes", "AGENT_STORE_PAUSED_SANDBOXES", "true", "Whether a paused sandbox's snapshot and disk are copied to the template store after the pause, so that another host can resume it when this one is gone or full. Only with a shared store (`store.url` set); the default store is this host's own directory."),
    scalar("agent.destroy_sandboxes_on_stop", "AGENT_DESTROY_SANDBOXES_ON_STOP", "false", "Whether a graceful stop destroys this host's sandboxes. By default they run on and the next agent process adopts them (an upgrade or restart costs them nothing); a deleted host always destroys its sandboxes."),
    scalar("agent.heartbeat_interval_secs", "AGENT_HEARTBEAT_INTERVAL_SECS", "30", "Seconds between the agent's heartbeats to the control plane."),
    key("agent.sandbox_host_range", "AGENT_SANDBOX_HOST_RANGE", Some("10.11.0.0/16"), "Per-sandbox host-routable addresses (one per network slot) through which the agent reaches envd and guest ports."),
    key("agent.sandbox_transit_range", "AGENT_SANDBOX_TRANSIT_RANGE", Some("10.12.0.0/16"), "Addresses of the veth /31 pairs between the host and each sandbox namespace (two per slot)."),
    key("agent.metrics_addr", "AGENT_METRICS_ADDR", None, "Address the agent serves Prometheus `GET /metrics` on, apart from its API (which only the control plane may call); unset serves none."),
    secret("agent.metrics_token", "AGENT_METRICS_TOKEN", "Bearer token the agent's `/metrics` requires; unset leaves it open to anyone who reaches `agent.metrics_addr`."),
    key("agent.egress_interface", "AGENT_EGRESS_INTERFACE", None, "Interface sandbox egress is NAT'd through; unset means the interface of the default route at start-up."),
    key("agent.dns_servers", "AGENT_DNS_SERVERS", None, "Comma-separated DNS servers (ADDRESS or ADDRESS:PORT) that sandboxes' look-ups are forwarded to; unset uses the host's /etc/resolv.conf."),
    key("agent.egress_deny", "AGENT_EGRESS_DENY", Some("10.0.0.0/8,100.64.0.0/10,169.254.0.0/16,172.16.0.0/12,192.168.0.0/16"), "Comma-separated networks sandboxes may never reach (private LANs, CGNAT, link-local and cloud metadata); may be empty."),
    key("agent.vmm", "AGENT_VMM", Some("firecracker"), "VMM that runs sandboxes: `firecracker` or `qemu`."),
    key("agent.qemu_accel", "AGENT_QEMU_ACCEL", Some("auto"), "QEMU accelerator: `kvm`, `tcg`, or `auto` (probe KVM once, fall back to TCG, with a warning, when it cannot run a guest). Production hosts set `kvm`, which never runs a guest under TCG."),
    key("agent.firecracker_bin", "AGENT_FIRECRACKER_BIN", Some("/usr/local/bin/firecracker"), "Firecracker executable."),
    scalar("agent.firecracker_lazy_memory", "AGENT_FIRECRACKER_LAZY_MEMORY", "true", "Whether a Firecracker restore loads the guest's memory lazily, page by page as the guest touches it, from a userfaultfd page server (`wrenn uffd-serve`) that copies in the pages touched after the previous restore first. Off, Firecracker maps the whole memory file (copied into the jail)."),
    key("agent.firecracker_jailer_bin", "AGENT_FIRECRACKER_JAILER_BIN", Some("/usr/local/bin/jailer"), "Firecracker's jailer, through which every Firecracker VM starts: chrooted into `<files root>/jails/<firecracker binary name>/<sandbox id>/root`, as its own unprivileged user, under Firecracker's seccomp filters."),
    key("agent.qemu_bin", "AGENT_QEMU_BIN", Some("qemu-system-x86_64"), "QEMU executable, a path or a name looked up in PATH."),
    key("agent.cgroup_parent", "AGENT_CGROUP_PARENT", Some("wrenn"), "This agent's cgroup, relative to /sys/fs/cgroup (under cgroup v1: to each controller's hierarchy); each VM gets a cgroup `<parent>/<sandbox id>` with its CPU, memory, process and disk I/O limits. Give each agent on one machine its own."),
    scalar("agent.vmm_id_base", "AGENT_VMM_ID_BASE", "900000000", "VMM processes drop to uid and gid `base + network slot`, one unprivileged identity per running VM; the range must belong to no user of the host."),
    scalar("agent.vm_io_bytes_per_sec", "AGENT_VM_IO_BYTES_PER_SEC", "209715200", "Bytes per second each VM may read, and as many write, on the disk holding the files root."),
    scalar("agent.vm_io_ops_per_sec", "AGENT_VM_IO_OPS_PER_SEC", "4000", "I/O operations per second each VM may issue for reads, and as many for writes, on the disk holding the files root."),
    key("agent.envd_binary", "AGENT_ENVD_BINARY", None, "The static wrenn binary the agent puts into the container images it imports as templates (as /usr/local/bin/wrenn, which guests run as envd). Unset means the agent's own executable, which must then be a static build."),
    scalar("agent.console_log_max_bytes", "AGENT_CONSOLE_LOG_MAX_BYTES", "1048576", "Bytes each sandbox's guest console may take on the host (`console.log` plus the older half in `console.log.1`); at least 8192. Output beyond it pushes out the oldest."),
    key("store.url", "STORE_URL", None, "Template store every agent pulls template images from and publishes them to: `file:///srv/wrenn-store` (a directory; on several hosts, a shared mount) or `s3://bucket/prefix` (any S3-compatible service, see the `store.s3_*` keys). Unset means the directory `store/` under `agent.files_rootdir`, which serves a single machine."),
    key("store.s3_endpoint", "STORE_S3_ENDPOINT", None, "Endpoint of an S3-compatible service other than AWS (MinIO, Ceph, R2), e.g. https://minio.example:9000; unset means AWS S3."),
    key("store.s3_region", "STORE_S3_REGION", Some("us-east-1"), "Region of the S3 bucket."),
    key("store.s3_access_key_id", "STORE_S3_ACCESS_KEY_ID", None, "Access key ID for the S3 bucket; unset means the host's instance role (cloud metadata credentials)."),
    secret("store.s3_secret_access_key", "STORE_S3_SECRET_ACCESS_KEY", "Secret access key for the S3 bucket."),
    scalar("store.s3_allow_http", "STORE_S3_ALLOW_HTTP", "false", "Whether `store.s3_endpoint` may be plain http:// (template images would cross the network unencrypted and unauthenticated)."),
];

pub fn by_path(path: &str) -> Option<&'static Key> {
    KEYS.iter().find(|k| k.path == path)
}

/// Variables an older agent read; they now derive from `AGENT_FILES_ROOTDIR`.
pub const RETIRED: &[(&str, &str)] = &[
    ("AGENT_KERNEL_PATH", "kernel"),
    ("AGENT_IMAGES_PATH", "images"),
    ("AGENT_SANDBOXES_PATH", "sandboxes"),
    ("AGENT_SNAPSHOTS_PATH", "snapshots"),
    ("AGENT_TOKEN_FILE", "host_token"),
];
