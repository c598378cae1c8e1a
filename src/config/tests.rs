use std::path::Path;

use super::*;

fn sources(dir: &Path, file: Option<&str>, env: &[(&str, &str)]) -> Sources {
    if let Some(text) = file {
        std::fs::write(dir.join(DEFAULT_CONFIG_FILE), text).unwrap();
    }
    Sources {
        config_flag: None,
        env: env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        cwd: dir.to_path_buf(),
    }
}

/// A distinct valid value per key for the file layer and another for the environment layer.
fn sample_values(path: &str) -> (&'static str, &'static str) {
    match path {
        "database_url" => ("postgres://file@db/wrenn", "postgres://env@db/wrenn"),
        "log.level" => ("debug", "trace"),
        "log.format" => ("json", "text"),
        "cp.listen_addr" => ("127.0.0.1:9000", ":9100"),
        "cp.host_agent_addr" => ("agent.file:1", "agent.env:2"),
        "cp.proxy_domain" => ("sandboxes.file.example", "localhost:8000"),
        "cp.port_proxy_idle_timeout_secs" => ("60", "7200"),
        "cp.jwt_secret" => (
            "file-secret-file-secret-file-secret",
            "env-secret-env-secret-env-secret-x",
        ),
        "cp.metrics_token" => ("file-metrics-token", "env-metrics-token"),
        "cp.jwt_previous_secrets" => (
            "old-secret-old-secret-old-secret-old",
            "env-old-env-old-env-old-env-old-env,second-second-second-second-second",
        ),
        "cp.allow_loopback_hosts" => ("true", "false"),
        "cp.host_unreachable_after_secs" => ("30", "45"),
        "cp.host_monitor_interval_secs" => ("5", "7"),
        "cp.cpu_overcommit" => ("2.5", "3"),
        "cp.memory_overcommit" => ("1.25", "1.5"),
        "cp.disk_overcommit" => ("1", "4.5"),
        "cp.reconcile_interval_secs" => ("5", "9"),
        "cp.usage_sample_interval_secs" => ("5", "30"),
        "cp.channel_retry_secs" => ("2", "60"),
        "cp.channel_allow_private_targets" => ("true", "false"),
        "cp.agent_timeout_secs" => ("10", "20"),
        "cp.agent_create_timeout_secs" => ("60", "90"),
        "cp.host_refresh_grace_secs" => ("0", "120"),
        "cp.login_email_max_failures" => ("5", "0"),
        "cp.login_email_window_secs" => ("60", "3600"),
        "cp.login_address_max_failures" => ("20", "100"),
        "cp.login_address_window_secs" => ("300", "1800"),
        "cp.trusted_proxies" => ("10.0.0.0/8", "127.0.0.1/32,fd00::/8"),
        "cp.signup" => ("closed", "open"),
        "cp.signup_address_max" => ("3", "0"),
        "cp.signup_address_window_secs" => ("60", "7200"),
        "cp.password_hash_permits" => ("1", "16"),
        "cp.team_max_execs" => ("2", "0"),
        "cp.team_max_transfers" => ("4", "64"),
        "cp.team_max_sessions" => ("1", "128"),
        "cp.team_max_event_streams" => ("2", "0"),
        "cp.build_context_max_bytes" => ("1048576", "2097152"),
        "agent.listen_addr" => (":7000", "127.0.0.1:7001"),
        "agent.files_rootdir" => ("/srv/file", "/srv/env"),
        "agent.cp_url" => ("http://cp.file:8000", "https://cp.env"),
        "agent.cp_ca_file" => ("/etc/wrenn/file-ca.pem", "/etc/wrenn/env-ca.pem"),
        "agent.allow_plain_http" => ("true", "false"),
        "agent.heartbeat_interval_secs" => ("5", "7"),
        "agent.envd_ready_timeout_secs" => ("20", "40"),
        "agent.destroy_sandboxes_on_stop" => ("true", "false"),
        "agent.boot_snapshots" => ("false", "true"),
        "agent.port_proxy_max_connections" => ("16", "1024"),
        "agent.port_proxy_idle_timeout_secs" => ("60", "3600"),
        "agent.store_paused_sandboxes" => ("false", "true"),
        "agent.network_name_prefix" => ("wrnfile", "wrnenv"),
        "agent.sandbox_host_range" => ("10.51.0.0/16", "10.61.0.0/24"),
        "agent.sandbox_transit_range" => ("10.52.0.0/16", "10.62.0.0/24"),
        "agent.egress_interface" => ("uplink0", "bond0.7"),
        "agent.metrics_addr" => ("127.0.0.1:9101", ":9102"),
        "agent.metrics_token" => ("file-agent-metrics", "env-agent-metrics"),
        "agent.egress_deny" => ("10.0.0.0/8", "192.168.0.0/16,172.16.0.0/12"),
        "agent.dns_servers" => ("192.0.2.53:53", "192.0.2.54:53,192.0.2.55:5353"),
        "agent.vmm" => ("qemu", "firecracker"),
        "agent.qemu_accel" => ("kvm", "tcg"),
        "agent.firecracker_bin" => ("/opt/file/firecracker", "/opt/env/firecracker"),
        "agent.firecracker_lazy_memory" => ("false", "true"),
        "agent.firecracker_jailer_bin" => ("/opt/file/jailer", "/opt/env/jailer"),
        "agent.qemu_bin" => ("/opt/file/qemu", "qemu-system-x86_64-env"),
        "agent.console_log_max_bytes" => ("65536", "2097152"),
        "agent.cgroup_parent" => ("wrenn/file", "wrenn-env"),
        "agent.vmm_id_base" => ("500000", "600000"),
        "agent.vm_io_bytes_per_sec" => ("1048576", "2097152"),
        "agent.vm_io_ops_per_sec" => ("100", "200"),
        "agent.envd_binary" => ("/opt/file/wrenn", "/opt/env/wrenn"),
        "store.url" => ("file:///srv/file-store", "s3://env-bucket/templates"),
        "store.s3_endpoint" => ("http://minio.file:9000", "https://s3.env"),
        "store.s3_region" => ("eu-west-1", "eu-central-1"),
        "store.s3_access_key_id" => ("FILEKEY", "ENVKEY"),
        "store.s3_secret_access_key" => ("file-secret", "env-secret"),
        "store.s3_allow_http" => ("true", "false"),
        other => panic!("add sample values for new key {other}"),
    }
}

fn toml_line(path: &str, value: &str) -> String {
    let (table, field) = path
        .rsplit_once('.')
        .map_or((None, path), |(t, f)| (Some(t), f));
    let numeric = KEYS
        .iter()
        .any(|k| k.path == path && k.kind == keys::ValueKind::Scalar);
    let literal = if numeric {
        value.to_owned()
    } else {
        format!("{value:?}")
    };
    match table {
        Some(t) => format!("[{t}]\n{field} = {literal}\n"),
        None => format!("{field} = {literal}\n"),
    }
}

fn rendered(loaded: &Loaded, path: &str) -> String {
    let line = render_show(loaded)
        .lines()
        .find(|l| l.split_whitespace().next() == Some(path))
        .unwrap_or_else(|| panic!("{path} missing from config show"))
        .to_owned();
    line
}

#[test]
fn defaults_apply_with_no_file_and_no_env() {
    let tmp = tempfile::tempdir().unwrap();
    let loaded = load(&sources(tmp.path(), None, &[])).unwrap();
    assert_eq!(loaded.config, Config::default());
    assert_eq!(loaded.config.cp.listen_addr.to_string(), ":8000");
    assert_eq!(loaded.config.agent.listen_addr.to_string(), ":50051");
    assert_eq!(
        loaded.config.agent.files_rootdir,
        Path::new("/var/lib/wrenn")
    );
    assert_eq!(loaded.origins["cp.listen_addr"], Origin::Default);
    assert_eq!(loaded.origins["cp.jwt_secret"], Origin::Unset);
    assert!(loaded.file.is_none());
}

#[test]
fn every_key_precedence_default_file_env() {
    for key in KEYS {
        let (file_value, env_value) = sample_values(key.path);
        let tmp = tempfile::tempdir().unwrap();

        let from_file = load(&sources(
            tmp.path(),
            Some(&toml_line(key.path, file_value)),
            &[],
        ))
        .unwrap_or_else(|e| panic!("{}: {e}", key.path));
        assert!(
            matches!(&from_file.origins[key.path], Origin::File(_)),
            "{} should come from the file",
            key.path
        );
        let shown = rendered(&from_file, key.path);
        assert!(shown.contains("(file "), "{shown}");
        if !key.secret {
            assert!(shown.contains(file_value), "{shown}");
        }

        let both = load(&sources(tmp.path(), None, &[(key.env, env_value)]))
            .unwrap_or_else(|e| panic!("{}: {e}", key.path));
        assert_eq!(both.origins[key.path], Origin::Env(key.env), "{}", key.path);
        let shown = rendered(&both, key.path);
        assert!(shown.contains(&format!("(env {})", key.env)), "{shown}");
        if !key.secret {
            assert!(shown.contains(env_value), "{shown}");
        }
        assert_ne!(
            from_file.config, both.config,
            "{} changed nothing",
            key.path
        );
    }
}

#[test]
fn secrets_are_redacted_in_config_show() {
    let tmp = tempfile::tempdir().unwrap();
    let loaded = load(&sources(
        tmp.path(),
        None,
        &[
            ("JWT_SECRET", "super-secret-value-that-is-long-enough"),
            ("DATABASE_URL", "postgres://u:hunter2@db/wrenn"),
        ],
    ))
    .unwrap();
    let out = render_show(&loaded);
    assert!(!out.contains("super-secret"), "{out}");
    assert!(!out.contains("hunter2"), "{out}");
    assert!(out.contains("<redacted>"), "{out}");
}

#[test]
fn only_files_rootdir_moves_all_derived_paths() {
    let tmp = tempfile::tempdir().unwrap();
    let loaded = load(&sources(
        tmp.path(),
        None,
        &[("AGENT_FILES_ROOTDIR", "/srv/w")],
    ))
    .unwrap();
    let out = render_show(&loaded);
    for path in [
        "/srv/w/kernels/vmlinux",
        "/srv/w/images",
        "/srv/w/sandboxes",
        "/srv/w/snapshots",
        "/srv/w/host-token",
    ] {
        assert!(out.contains(path), "{path} missing from:\n{out}");
    }
}

#[test]
fn explicit_file_beats_wrenn_config_beats_cwd() {
    let tmp = tempfile::tempdir().unwrap();
    let flag = tmp.path().join("flag.toml");
    let envfile = tmp.path().join("env.toml");
    std::fs::write(&flag, "[cp]\nlisten_addr = \":1\"\n").unwrap();
    std::fs::write(&envfile, "[cp]\nlisten_addr = \":2\"\n").unwrap();
    let mut src = sources(tmp.path(), Some("[cp]\nlisten_addr = \":3\"\n"), &[]);
    assert_eq!(load(&src).unwrap().config.cp.listen_addr.to_string(), ":3");
    src.env
        .push((CONFIG_FILE_ENV.into(), envfile.display().to_string()));
    assert_eq!(load(&src).unwrap().config.cp.listen_addr.to_string(), ":2");
    src.config_flag = Some(flag.clone());
    let loaded = load(&src).unwrap();
    assert_eq!(loaded.config.cp.listen_addr.to_string(), ":1");
    assert_eq!(loaded.file.as_deref(), Some(flag.as_path()));
}

#[test]
fn missing_explicit_file_is_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    let mut src = sources(tmp.path(), None, &[]);
    src.config_flag = Some(tmp.path().join("nope.toml"));
    let err = load(&src).unwrap_err().to_string();
    assert!(err.contains("nope.toml"), "{err}");
}

#[test]
fn each_retired_variable_is_refused_with_its_new_path() {
    for (name, new_path) in [
        ("AGENT_KERNEL_PATH", "/srv/w/kernels/vmlinux"),
        ("AGENT_IMAGES_PATH", "/srv/w/images"),
        ("AGENT_SANDBOXES_PATH", "/srv/w/sandboxes"),
        ("AGENT_SNAPSHOTS_PATH", "/srv/w/snapshots"),
        ("AGENT_TOKEN_FILE", "/srv/w/host-token"),
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let err = load(&sources(
            tmp.path(),
            None,
            &[(name, "/old"), ("AGENT_FILES_ROOTDIR", "/srv/w")],
        ))
        .unwrap_err();
        let ConfigError::RetiredVariables(vars) = &err else {
            panic!("{err}")
        };
        assert_eq!(vars.len(), 1);
        let msg = err.to_string();
        assert!(msg.contains(name) && msg.contains(new_path), "{msg}");
        assert!(msg.contains("AGENT_FILES_ROOTDIR"), "{msg}");
    }
}

#[test]
fn all_retired_variables_are_named_at_once() {
    let tmp = tempfile::tempdir().unwrap();
    let env: Vec<(&str, &str)> = keys::RETIRED.iter().map(|(n, _)| (*n, "/x")).collect();
    let err = load(&sources(tmp.path(), None, &env))
        .unwrap_err()
        .to_string();
    for (name, _) in keys::RETIRED {
        assert!(err.contains(name), "{err}");
    }
    assert!(err.contains("/var/lib/wrenn/host-token"), "{err}");
}

#[test]
fn unknown_toml_key_is_named_with_its_file() {
    let tmp = tempfile::tempdir().unwrap();
    let err = load(&sources(
        tmp.path(),
        Some("[cp]\nlisten_adr = \":1\"\n"),
        &[],
    ))
    .unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, ConfigError::UnknownKey { .. }), "{msg}");
    assert!(
        msg.contains("cp.listen_adr") && msg.contains("wrenn.toml"),
        "{msg}"
    );

    let err = load(&sources(tmp.path(), Some("bogus = 1\n"), &[]))
        .unwrap_err()
        .to_string();
    assert!(err.contains("`bogus`"), "{err}");
}

#[test]
fn toml_syntax_error_names_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let err = load(&sources(tmp.path(), Some("[cp\nlisten_addr = "), &[])).unwrap_err();
    assert!(matches!(err, ConfigError::FileSyntax { .. }), "{err}");
    assert!(err.to_string().contains("wrenn.toml"), "{err}");
}

/// A file body (if any), environment variables, and the words the error must contain.
type BadValueCase<'a> = (Option<&'a str>, &'a [(&'a str, &'a str)], &'a [&'a str]);

#[test]
fn bad_values_name_key_value_and_source() {
    let cases: &[BadValueCase] = &[
        (
            None,
            &[("CP_LISTEN_ADDR", "nope")],
            &["cp.listen_addr", "CP_LISTEN_ADDR", "nope", "environment"],
        ),
        (
            Some("[agent]\nlisten_addr = \"1.2.3.4\"\n"),
            &[],
            &["agent.listen_addr", "1.2.3.4", "wrenn.toml"],
        ),
        (
            None,
            &[("AGENT_CP_URL", "cp:8000")],
            &["agent.cp_url", "AGENT_CP_URL", "cp:8000"],
        ),
        (
            None,
            &[("DATABASE_URL", "mysql://x/y")],
            &["database_url", "DATABASE_URL", "mysql"],
        ),
        (None, &[("LOG_FORMAT", "xml")], &["log.format", "xml"]),
        (
            None,
            &[("CP_HOST_AGENT_ADDR", "no port")],
            &["cp.host_agent_addr", "no port"],
        ),
        (
            Some("[cp]\nlisten_addr = 8000\n"),
            &[],
            &["cp.listen_addr", "8000", "wrenn.toml"],
        ),
        (
            None,
            &[("CP_HOST_UNREACHABLE_AFTER_SECS", "soon")],
            &["cp.host_unreachable_after_secs", "soon"],
        ),
        (
            Some("[agent]\nfiles_rootdir = 5\n"),
            &[],
            &["agent.files_rootdir", "5"],
        ),
        (
            None,
            &[("AGENT_SANDBOX_HOST_RANGE", "10.11.0.1/16")],
            &["agent.sandbox_host_range", "10.11.0.1/16", "host bits"],
        ),
        (
            None,
            &[("AGENT_SANDBOX_TRANSIT_RANGE", "10.12.0.0")],
            &["agent.sandbox_transit_range", "10.12.0.0"],
        ),
        (
            None,
            &[("AGENT_EGRESS_INTERFACE", "way-too-long-name")],
            &["agent.egress_interface", "way-too-long-name"],
        ),
        (
            None,
            &[("AGENT_EGRESS_DENY", "10.0.0.0/8,lan")],
            &["agent.egress_deny", "lan"],
        ),
        (
            None,
            &[("AGENT_VMM", "xen")],
            &["agent.vmm", "AGENT_VMM", "xen", "firecracker"],
        ),
        (
            Some("[agent]\nqemu_accel = \"hvf\"\n"),
            &[],
            &["agent.qemu_accel", "hvf", "wrenn.toml"],
        ),
        (
            None,
            &[("AGENT_CONSOLE_LOG_MAX_BYTES", "100")],
            &[
                "agent.console_log_max_bytes",
                "AGENT_CONSOLE_LOG_MAX_BYTES",
                "100",
                "8192",
            ],
        ),
        (
            Some("[agent]\nconsole_log_max_bytes = \"1MiB\"\n"),
            &[],
            &["agent.console_log_max_bytes", "1MiB", "wrenn.toml"],
        ),
    ];
    for (file, env, needles) in cases {
        let tmp = tempfile::tempdir().unwrap();
        let err = load(&sources(tmp.path(), *file, env)).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, ConfigError::InvalidValue { .. }), "{msg}");
        for needle in *needles {
            assert!(msg.contains(needle), "`{needle}` missing from: {msg}");
        }
    }
}

#[test]
fn empty_environment_values_count_as_unset() {
    let tmp = tempfile::tempdir().unwrap();
    let loaded = load(&sources(tmp.path(), None, &[("CP_LISTEN_ADDR", "")])).unwrap();
    assert_eq!(loaded.origins["cp.listen_addr"], Origin::Default);
}

#[test]
fn example_file_documents_every_key_and_parses_to_defaults() {
    let example = include_str!("../../wrenn.toml.example");
    for key in KEYS {
        let field = key.path.rsplit('.').next().unwrap();
        assert!(example.contains(key.env), "{} undocumented", key.env);
        assert!(
            example.contains(&format!("{field} =")),
            "{} undocumented",
            key.path
        );
        if let Some(default) = key.default {
            assert!(
                example.contains(default),
                "default of {} undocumented",
                key.path
            );
        }
    }
    // With the comment markers removed, the example is a valid file equal to the defaults.
    let uncommented: String = example
        .lines()
        .filter_map(|l| {
            l.strip_prefix("# ")
                .filter(|l| l.contains(" = ") || l.starts_with('['))
        })
        .filter(|l| !l.contains("(unset)"))
        .map(|l| format!("{l}\n"))
        .collect();
    let tmp = tempfile::tempdir().unwrap();
    let loaded = load(&sources(tmp.path(), Some(&uncommented), &[])).unwrap();
    assert_eq!(loaded.config, Config::default());
}
