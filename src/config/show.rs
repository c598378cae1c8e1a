//! `wrenn config show`: the resolved configuration, where each value came from, and the derived
//! files-root paths, with secrets redacted.

use std::fmt::Write;

use super::{Loaded, Origin, KEYS};

pub fn render(loaded: &Loaded) -> String {
    let config = &loaded.config;
    let value_of = |path: &str| -> Option<String> {
        let c = config;
        Some(match path {
            "database_url" => c.database_url.redacted(),
            "log.level" => c.log.level.clone(),
            "log.format" => c.log.format.to_string(),
            "cp.listen_addr" => c.cp.listen_addr.to_string(),
            "cp.host_agent_addr" => c.cp.host_agent_addr.as_ref()?.to_string(),
            "cp.proxy_domain" => c.cp.proxy_domain.clone()?,
            "cp.port_proxy_idle_timeout_secs" => c.cp.port_proxy_idle_timeout_secs.to_string(),
            "cp.jwt_secret" => c.cp.jwt_secret.as_ref().map(|_| "<redacted>".to_owned())?,
            "cp.metrics_token" => {
                c.cp.metrics_token
                    .as_ref()
                    .map(|_| "<redacted>".to_owned())?
            }
            "cp.jwt_previous_secrets" => {
                c.cp.jwt_previous_secrets
                    .as_ref()
                    .map(|l| format!("<{} redacted>", l.0.len()))?
            }
            "cp.allow_loopback_hosts" => c.cp.allow_loopback_hosts.to_string(),
            "cp.host_unreachable_after_secs" => c.cp.host_unreachable_after_secs.to_string(),
            "cp.host_monitor_interval_secs" => c.cp.host_monitor_interval_secs.to_string(),
            "cp.cpu_overcommit" => c.cp.cpu_overcommit.to_string(),
            "cp.memory_overcommit" => c.cp.memory_overcommit.to_string(),
            "cp.disk_overcommit" => c.cp.disk_overcommit.to_string(),
            "cp.reconcile_interval_secs" => c.cp.reconcile_interval_secs.to_string(),
            "cp.usage_sample_interval_secs" => c.cp.usage_sample_interval_secs.to_string(),
            "cp.channel_retry_secs" => c.cp.channel_retry_secs.to_string(),
            "cp.channel_allow_private_targets" => c.cp.channel_allow_private_targets.to_string(),
            "cp.agent_timeout_secs" => c.cp.agent_timeout_secs.to_string(),
            "cp.agent_create_timeout_secs" => c.cp.agent_create_timeout_secs.to_string(),
            "cp.host_refresh_grace_secs" => c.cp.host_refresh_grace_secs.to_string(),
            "cp.login_email_max_failures" => c.cp.login_email_max_failures.to_string(),
            "cp.login_email_window_secs" => c.cp.login_email_window_secs.to_string(),
            "cp.login_address_max_failures" => c.cp.login_address_max_failures.to_string(),
            "cp.login_address_window_secs" => c.cp.login_address_window_secs.to_string(),
            "cp.trusted_proxies" => c.cp.trusted_proxies.to_string(),
            "cp.signup" => c.cp.signup.to_string(),
            "cp.signup_address_max" => c.cp.signup_address_max.to_string(),
            "cp.signup_address_window_secs" => c.cp.signup_address_window_secs.to_string(),
            "cp.password_hash_permits" => c.cp.password_hash_permits.to_string(),
            "cp.team_max_execs" => c.cp.team_max_execs.to_string(),
            "cp.team_max_transfers" => c.cp.team_max_transfers.to_string(),
            "cp.team_max_sessions" => c.cp.team_max_sessions.to_string(),
            "cp.team_max_event_streams" => c.cp.team_max_event_streams.to_string(),
            "cp.build_context_max_bytes" => c.cp.build_context_max_bytes.to_string(),
            "agent.listen_addr" => c.agent.listen_addr.to_string(),
            "agent.files_rootdir" => c.agent.files_rootdir.display().to_string(),
            "agent.cp_url" => c.agent.cp_url.as_ref()?.to_string(),
            "agent.cp_ca_file" => c.agent.cp_ca_file.as_ref()?.display().to_string(),
            "agent.allow_plain_http" => c.agent.allow_plain_http.to_string(),
            "agent.network_name_prefix" => c.agent.network_name_prefix.clone(),
            "agent.envd_ready_timeout_secs" => c.agent.envd_ready_timeout_secs.to_string(),
            "agent.destroy_sandboxes_on_stop" => c.agent.destroy_sandboxes_on_stop.to_string(),
            "agent.port_proxy_max_connections" => c.agent.port_proxy_max_connections.to_string(),
            "agent.port_proxy_idle_timeout_secs" => {
                c.agent.port_proxy_idle_timeout_secs.to_string()
            }
            "agent.boot_snapshots" => c.agent.boot_snapshots.to_string(),
            "agent.store_paused_sandboxes" => c.agent.store_paused_sandboxes.to_string(),
            "agent.heartbeat_interval_secs" => c.agent.heartbeat_interval_secs.to_string(),
            "agent.sandbox_host_range" => c.agent.sandbox_host_range.to_string(),
            "agent.sandbox_transit_range" => c.agent.sandbox_transit_range.to_string(),
            "agent.egress_interface" => c.agent.egress_interface.as_ref()?.to_string(),
            "agent.metrics_addr" => c.agent.metrics_addr.as_ref()?.to_string(),
            "agent.metrics_token" => c
                .agent
                .metrics_token
                .as_ref()
                .map(|_| "<redacted>".to_owned())?,
            "agent.egress_deny" => c.agent.egress_deny.to_string(),
            "agent.dns_servers" => {
                (!c.agent.dns_servers.0.is_empty()).then(|| c.agent.dns_servers.to_string())?
            }
            "agent.vmm" => c.agent.vmm.to_string(),
            "agent.qemu_accel" => c.agent.qemu_accel.to_string(),
            "agent.firecracker_bin" => c.agent.firecracker_bin.display().to_string(),
            "agent.firecracker_lazy_memory" => c.agent.firecracker_lazy_memory.to_string(),
            "agent.firecracker_jailer_bin" => c.agent.firecracker_jailer_bin.display().to_string(),
            "agent.qemu_bin" => c.agent.qemu_bin.display().to_string(),
            "agent.console_log_max_bytes" => c.agent.console_log_max_bytes.to_string(),
            "agent.cgroup_parent" => c.agent.cgroup_parent.display().to_string(),
            "agent.vmm_id_base" => c.agent.vmm_id_base.to_string(),
            "agent.vm_io_bytes_per_sec" => c.agent.vm_io_bytes_per_sec.to_string(),
            "agent.vm_io_ops_per_sec" => c.agent.vm_io_ops_per_sec.to_string(),
            "agent.envd_binary" => c.agent.envd_binary.as_ref()?.display().to_string(),
            "store.url" => c.store.url.as_ref()?.to_string(),
            "store.s3_endpoint" => c.store.s3_endpoint.as_ref()?.to_string(),
            "store.s3_region" => c.store.s3_region.clone(),
            "store.s3_access_key_id" => c.store.s3_access_key_id.clone()?,
            "store.s3_secret_access_key" => c
                .store
                .s3_secret_access_key
                .as_ref()
                .map(|_| "<redacted>".to_owned())?,
            "store.s3_allow_http" => c.store.s3_allow_http.to_string(),
            other => unreachable!("config key {other} has no renderer"),
        })
    };

    let mut out = String::new();
    match &loaded.file {
        Some(path) => writeln!(out, "# configuration file: {}", path.display()),
        None => writeln!(out, "# configuration file: none"),
    }
    .expect("writing to a String");
    let rows: Vec<(String, String, String)> = KEYS
        .iter()
        .map(|key| {
            let value = value_of(key.path).unwrap_or_else(|| "(unset)".to_owned());
            let origin = match loaded.origins.get(key.path) {
                Some(Origin::Env(name)) => format!("env {name}"),
                Some(Origin::File(path)) => format!("file {}", path.display()),
                Some(Origin::Default) => "default".to_owned(),
                Some(Origin::Unset) | None => "unset".to_owned(),
            };
            (key.path.to_owned(), value, origin)
        })
        .collect();
    let width_key = rows.iter().map(|r| r.0.len()).max().unwrap_or(0);
    let width_value = rows.iter().map(|r| r.1.len()).max().unwrap_or(0);
    for (key, value, origin) in &rows {
        writeln!(out, "{key:width_key$}  {value:width_value$}  ({origin})")
            .expect("writing to a String");
    }
    writeln!(out, "\n# derived from agent.files_rootdir").expect("writing to a String");
    let layout = config.layout();
    for (name, path) in layout.derived() {
        writeln!(out, "{name:width_key$}  {}", path.display()).expect("writing to a String");
    }
    out
}
