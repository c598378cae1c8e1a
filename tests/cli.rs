//! The `wrenn` binary's frame: `version`, `config show`, and refusal of bad configuration,
//! exercised as an operator would, through the real executable.

use std::process::{Command, Output};

fn wrenn(args: &[&str], env: &[(&str, &str)]) -> Output {
    let tmp = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_wrenn"));
    cmd.args(args)
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .current_dir(tmp.path());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn version_prints_the_package_version() {
    let out = wrenn(&["version"], &[]);
    assert!(out.status.success());
    assert!(stdout(&out).starts_with(&format!("wrenn {}", env!("CARGO_PKG_VERSION"))));
}

#[test]
fn config_show_with_only_the_files_root_set() {
    let out = wrenn(&["config", "show"], &[("AGENT_FILES_ROOTDIR", "/srv/w")]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    for path in [
        "/srv/w/kernels/vmlinux",
        "/srv/w/images",
        "/srv/w/sandboxes",
        "/srv/w/snapshots",
        "/srv/w/host-token",
    ] {
        assert!(text.contains(path), "{path} missing:\n{text}");
    }
    assert!(text.contains("(env AGENT_FILES_ROOTDIR)"), "{text}");
    assert!(text.contains("(default)"), "{text}");
}

#[test]
fn config_show_reads_the_named_file() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("custom.toml");
    std::fs::write(&file, "[cp]\nlisten_addr = \"127.0.0.1:9999\"\n").unwrap();
    let out = wrenn(&["--config", file.to_str().unwrap(), "config", "show"], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("127.0.0.1:9999"), "{text}");
    assert!(
        text.contains(&format!("(file {})", file.display())),
        "{text}"
    );

    let out = wrenn(
        &["config", "show"],
        &[("WRENN_CONFIG", file.to_str().unwrap())],
    );
    assert!(stdout(&out).contains("127.0.0.1:9999"));
}

#[test]
fn every_retired_variable_is_refused_by_the_binary() {
    for name in [
        "AGENT_KERNEL_PATH",
        "AGENT_IMAGES_PATH",
        "AGENT_SANDBOXES_PATH",
        "AGENT_SNAPSHOTS_PATH",
        "AGENT_TOKEN_FILE",
    ] {
        let out = wrenn(&["config", "show"], &[(name, "/old/place")]);
        assert!(!out.status.success(), "{name} was accepted");
        let err = stderr(&out);
        assert!(err.contains(name), "{err}");
        assert!(err.contains("AGENT_FILES_ROOTDIR"), "{err}");
        assert!(err.contains("/var/lib/wrenn/"), "{err}");
    }
}

#[test]
fn bad_configuration_fails_fast_with_key_value_and_source() {
    let out = wrenn(
        &["config", "show"],
        &[("AGENT_LISTEN_ADDR", "not-an-address")],
    );
    assert!(!out.status.success());
    let err = stderr(&out);
    for needle in [
        "agent.listen_addr",
        "AGENT_LISTEN_ADDR",
        "not-an-address",
        "environment",
    ] {
        assert!(err.contains(needle), "`{needle}` missing: {err}");
    }
}

#[test]
fn agent_refuses_a_read_only_files_root_and_names_it() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    std::fs::create_dir(&root).unwrap();
    // A read-only tmpfs in a private mount namespace: even root cannot write there.
    let script = format!(
        "mount -t tmpfs -o ro tmpfs '{}' && exec '{}' agent",
        root.display(),
        env!("CARGO_BIN_EXE_wrenn")
    );
    let out = Command::new("unshare")
        .args(["--mount", "sh", "-c", &script])
        .env("AGENT_FILES_ROOTDIR", &root)
        .env("AGENT_CP_URL", "http://127.0.0.1:9")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains(&root.display().to_string()), "{err}");
    assert!(err.contains("Read-only file system"), "{err}");
}

#[test]
fn agent_creates_the_layout_then_explains_missing_registration() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("fresh/root");
    let out = wrenn(
        &["agent"],
        &[
            ("AGENT_FILES_ROOTDIR", root.to_str().unwrap()),
            ("AGENT_CP_URL", "http://127.0.0.1:9"),
        ],
    );
    // EX_CONFIG: restarting cannot help until an operator registers the agent.
    assert_eq!(out.status.code(), Some(78), "{}", stderr(&out));
    for dir in ["kernels", "images", "sandboxes", "snapshots"] {
        assert!(root.join(dir).is_dir(), "{dir} not created");
    }
    let err = stderr(&out);
    assert!(err.contains("--register"), "{err}");

    let out = wrenn(
        &["agent", "--register", "tok"],
        &[
            ("AGENT_FILES_ROOTDIR", root.to_str().unwrap()),
            ("AGENT_CP_URL", "http://127.0.0.1:9"),
        ],
    );
    assert!(
        stderr(&out).contains("--address is required"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn agent_with_refused_credentials_stops_at_once_and_says_how_to_register() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    std::fs::create_dir(&root).unwrap();
    let reason = "the control plane refused the refresh token of host host-1 (reuse detected); \
                  this host must be registered again";
    let creds = serde_json::json!({
        "host_id": "host-1", "token": "jwt", "refresh_token": "r", "agent_secret": "s",
        "revoked": reason,
    });
    std::fs::write(root.join("host-token"), creds.to_string()).unwrap();
    let out = wrenn(
        &["agent"],
        &[
            ("AGENT_FILES_ROOTDIR", root.to_str().unwrap()),
            // Nothing listens here: the agent must not need the control plane to say this.
            ("AGENT_CP_URL", "http://127.0.0.1:9"),
        ],
    );
    assert_eq!(out.status.code(), Some(78), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains(reason), "{err}");
    assert!(err.contains("host-token"), "{err}");
}
