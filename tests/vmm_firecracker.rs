//! The Firecracker backend against its contract. Firecracker cannot run on the CI machine, so:
//! every request the driver builds is validated against the v1.16.1 swagger; the driver is
//! run against a fake Firecracker process (this test binary, re-entered through a wrapper
//! script given as the Firecracker path) that validates every request it receives and records
//! their order; and an opt-in suite boots a real Firecracker where one can run.

#[path = "support/swagger.rs"]
mod swagger;
#[path = "support/uffd.rs"]
mod uffd;

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Value};
use swagger::Swagger;
use wrenn::config::{Config, ConsoleLogMaxBytes, Layout};
use wrenn::vmm::firecracker::api::{self, ActionType, Endpoint, InstanceAction};
use wrenn::vmm::firecracker::jail::{self, Jail};
use wrenn::vmm::firecracker::{boot_sequence, pause_sequence, restore_sequence};
use wrenn::vmm::{
    console_tail, find_leftovers, AdoptRefusal, AfterFailedPause, CgroupVersion, Cgroups,
    Confinement, Drive, FirecrackerApiError, FirecrackerVmm, Leftover, NetAttachment,
    SnapshotError, SnapshotFiles, VmFiles, VmSpec, VmStatus, Vmm, VmmError, VmmExit, VmmKind,
};

fn full_spec(layout: &Layout, id: &str) -> VmSpec {
    VmSpec {
        id: id.into(),
        vcpus: 2,
        memory_mib: 512,
        kernel: layout.default_kernel(),
        initrd: Some(layout.kernels_dir().join("initramfs.cpio.gz")),
        extra_boot_args: "ip=10.11.0.2::10.11.0.1:255.255.255.252::eth0:off".into(),
        drives: vec![
            Drive {
                id: "root".into(),
                path: layout.images_dir().join("base/rootfs.ext4"),
                read_only: true,
            },
            Drive {
                id: "data".into(),
                path: layout.sandbox_dir(id).join("data.ext4"),
                read_only: false,
            },
        ],
        net: Some(NetAttachment {
            tap: "tap0".into(),
            mac: "02:FC:00:00:00:05".into(),
            netns: None,
        }),
        vsock_cid: Some(3),
        files: VmFiles::for_sandbox(layout, id),
        confinement: None,
    }
}

fn console_cap() -> ConsoleLogMaxBytes {
    Config::default().agent.console_log_max_bytes
}

fn call_line(call: &api::ApiCall) -> String {
    format!("{} {}", call.method, call.path)
}

#[test]
fn every_request_the_driver_builds_is_valid_against_the_swagger() {
    let swagger = Swagger::load();
    let layout = Layout::new("/var/lib/wrenn");
    let mut minimal = full_spec(&layout, "cl-min");
    minimal.initrd = None;
    minimal.drives.truncate(1);
    minimal.net = None;
    minimal.vsock_cid = None;
    let mut calls = boot_sequence(&full_spec(&layout, "cl-full")).unwrap();
    calls.extend(boot_sequence(&minimal).unwrap());
    calls.push(
        InstanceAction {
            action_type: ActionType::SendCtrlAltDel,
        }
        .call(),
    );
    calls.push(api::get_version());
    calls.push(api::get_instance_info());
    let snapshot = SnapshotFiles::for_sandbox(&layout, "cl-full");
    calls.extend(pause_sequence(&snapshot).unwrap());
    calls.extend(restore_sequence(&full_spec(&layout, "cl-full"), &snapshot, None).unwrap());
    calls.extend(restore_sequence(&minimal, &snapshot, None).unwrap());
    calls.push(
        api::VmState {
            state: api::VmRunState::Resumed,
        }
        .call(),
    );
    for call in &calls {
        swagger
            .validate_call(call.method.as_str(), &call.path, call.body.as_ref())
            .unwrap_or_else(|e| panic!("{}: {e}\nbody: {:?}", call_line(call), call.body));
    }
}

#[test]
fn boot_sequence_follows_the_documented_order_and_boot_args() {
    let layout = Layout::new("/var/lib/wrenn");
    let calls = boot_sequence(&full_spec(&layout, "cl-order")).unwrap();
    let order: Vec<String> = calls.iter().map(call_line).collect();
    assert_eq!(
        order,
        [
            "PUT /machine-config",
            "PUT /boot-source",
            "PUT /drives/root",
            "PUT /drives/data",
            "PUT /network-interfaces/eth0",
            "PUT /vsock",
            "PUT /actions",
        ]
    );
    let boot = calls[1].body.as_ref().unwrap();
    assert!(
        boot["boot_args"]
            .as_str()
            .unwrap()
            .starts_with("console=ttyS0 reboot=k panic=1 pci=off ip=10.11.0.2"),
        "{boot}"
    );
    assert_eq!(calls[2].body.as_ref().unwrap()["is_read_only"], true);
    assert_eq!(calls[3].body.as_ref().unwrap()["is_read_only"], false);
    // Unset optionals are left out rather than sent as null.
    assert_eq!(
        calls[0].body,
        Some(json!({"vcpu_count": 2, "mem_size_mib": 512}))
    );
    assert_eq!(calls[6].body, Some(json!({"action_type": "InstanceStart"})));
}

#[test]
fn pause_and_restore_follow_the_documented_calls() {
    let layout = Layout::new("/var/lib/wrenn");
    let snapshot = SnapshotFiles::for_sandbox(&layout, "cl-snap");
    let pause = pause_sequence(&snapshot).unwrap();
    assert_eq!(
        pause.iter().map(call_line).collect::<Vec<_>>(),
        ["PATCH /vm", "PUT /snapshot/create"]
    );
    assert_eq!(pause[0].body, Some(json!({"state": "Paused"})));
    assert_eq!(
        pause[1].body,
        Some(json!({
            "snapshot_type": "Full",
            "snapshot_path": "/var/lib/wrenn/snapshots/cl-snap/vmstate.partial",
            "mem_file_path": "/var/lib/wrenn/snapshots/cl-snap/memory.partial",
        }))
    );
    let mut spec = full_spec(&layout, "cl-snap");
    spec.net.as_mut().unwrap().tap = "tap7".into();
    let restore = restore_sequence(&spec, &snapshot, None).unwrap();
    assert_eq!(
        restore.iter().map(call_line).collect::<Vec<_>>(),
        ["PUT /snapshot/load"]
    );
    assert_eq!(
        restore[0].body,
        Some(json!({
            "snapshot_path": "/var/lib/wrenn/snapshots/cl-snap/vmstate",
            "mem_backend": {
                "backend_type": "File",
                "backend_path": "/var/lib/wrenn/snapshots/cl-snap/memory",
            },
            "resume_vm": true,
            "network_overrides": [{"iface_id": "eth0", "host_dev_name": "tap7"}],
            "vsock_override": {"uds_path": "/var/lib/wrenn/sandboxes/cl-snap/vsock.sock"},
        }))
    );
    spec.net = None;
    spec.vsock_cid = None;
    let bare = restore_sequence(&spec, &snapshot, None).unwrap();
    let body = bare[0].body.as_ref().unwrap();
    assert!(
        body.get("network_overrides").is_none() && body.get("vsock_override").is_none(),
        "{body}"
    );
}

#[test]
fn the_validator_rejects_what_firecracker_rejects() {
    let swagger = Swagger::load();
    let bad: &[(&str, &str, Option<Value>, &str)] = &[
        (
            "PUT",
            "/machine-config",
            Some(json!({"vcpu_count": 1, "mem_size_mib": 128, "bogus": 1})),
            "unknown field",
        ),
        (
            "PUT",
            "/machine-config",
            Some(json!({"vcpu_count": 1})),
            "mem_size_mib",
        ),
        (
            "PUT",
            "/machine-config",
            Some(json!({"vcpu_count": 0, "mem_size_mib": 128})),
            "minimum",
        ),
        (
            "PUT",
            "/machine-config",
            Some(json!({"vcpu_count": 33, "mem_size_mib": 128})),
            "maximum",
        ),
        (
            "PUT",
            "/actions",
            Some(json!({"action_type": "Reboot"})),
            "not one of",
        ),
        (
            "PUT",
            "/vsock",
            Some(json!({"guest_cid": 2, "uds_path": "/x"})),
            "minimum",
        ),
        (
            "PUT",
            "/drives/root",
            Some(json!({"drive_id": "data", "is_root_device": false})),
            "differs",
        ),
        (
            "PUT",
            "/boot-source",
            Some(json!({"kernel_image_path": 5})),
            "expected a string",
        ),
        ("PUT", "/boot-source", None, "needs a body"),
        ("GET", "/version", Some(json!({})), "takes no body"),
        (
            "PUT",
            "/snapshot/load",
            Some(
                json!({"snapshot_path": "/s", "mem_backend": {"backend_type": "Disk", "backend_path": "/m"}}),
            ),
            "not one of",
        ),
        (
            "PUT",
            "/snapshot/create",
            Some(json!({"snapshot_path": "/s"})),
            "mem_file_path",
        ),
        (
            "PATCH",
            "/vm",
            Some(json!({"state": "Stopped"})),
            "not one of",
        ),
        (
            "POST",
            "/actions",
            Some(json!({"action_type": "InstanceStart"})),
            "not an operation",
        ),
        ("PUT", "/nonexistent", Some(json!({})), "no path matches"),
    ];
    for (method, path, body, needle) in bad {
        let err = swagger
            .validate_call(method, path, body.as_ref())
            .expect_err(&format!("{method} {path} {body:?}"));
        assert!(
            err.contains(needle),
            "{method} {path}: `{needle}` not in: {err}"
        );
    }
}

// ---- The fake Firecracker process -------------------------------------------------------

/// The test binary's entry point when it plays Firecracker: the wrapper script sets
/// `FAKE_FC_ARGS` to Firecracker's command line. Ignored in normal runs.
#[test]
#[ignore = "entered by the fake-Firecracker wrapper script, not run directly"]
fn fake_firecracker_process() {
    let Ok(args) = std::env::var("FAKE_FC_ARGS") else {
        return;
    };
    let args: Vec<&str> = args.split_whitespace().collect();
    let flag = |name: &str| {
        args.iter()
            .position(|a| *a == name)
            .map(|i| PathBuf::from(args[i + 1]))
    };
    let socket = fake::host(
        &flag("--api-sock")
            .expect("--api-sock given")
            .to_string_lossy(),
    );
    let record = PathBuf::from(std::env::var("FAKE_FC_RECORD").expect("FAKE_FC_RECORD set"));
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(fake::serve(socket, record));
}

mod fake {
    use std::convert::Infallible;
    use std::io::Write;
    use std::path::PathBuf;
    use std::sync::{Arc, Mutex};

    use bytes::Bytes;
    use http_body_util::{BodyExt, Full};
    use hyper::body::Incoming;
    use hyper::{Request, Response, StatusCode};
    use hyper_util::rt::TokioIo;
    use serde_json::{json, Value};

    use super::Swagger;

    /// Where a path Firecracker is given is on the host: under `FAKE_FC_ROOT`, the jail a
    /// jailed Firecracker would be chrooted into, when the fake jailer set one.
    pub fn host(path: &str) -> PathBuf {
        match std::env::var("FAKE_FC_ROOT") {
            Ok(root) => PathBuf::from(root).join(path.trim_start_matches('/')),
            Err(_) => PathBuf::from(path),
        }
    }

    struct State {
        swagger: Swagger,
        record: PathBuf,
        started: bool,
        paused: bool,
        /// Anything but the logger was configured: a snapshot load is refused then.
        configured: bool,
        fail_path: Option<String>,
        ctrl_alt_del_exits: bool,
        /// Writes each request to the guest console.
        echo_requests: bool,
        /// The guest memory of a lazy load, served by the driver's page server.
        lazy: Option<super::uffd::LazyMemory>,
    }

    fn log(record: &PathBuf, line: &str) {
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(record)
            .unwrap();
        writeln!(file, "{line}").unwrap();
    }

    pub async fn serve(socket: PathBuf, record: PathBuf) {
        log(&record, &format!("PID {}", std::process::id()));
        // Like Firecracker, refuse to start over an existing socket file.
        let listener = match tokio::net::UnixListener::bind(&socket) {
            Ok(l) => l,
            Err(e) => {
                eprintln!("Failed to bind the API socket {}: {e}", socket.display());
                std::process::exit(1);
            }
        };
        println!("fake Firecracker serving on {}", socket.display());
        if let Ok(lines) = std::env::var("FAKE_FC_CONSOLE_FLOOD") {
            std::thread::spawn(move || flood_console(lines.parse().unwrap()));
        }
        let state = Arc::new(Mutex::new(State {
            swagger: Swagger::load(),
            record,
            started: false,
            paused: false,
            configured: false,
            fail_path: std::env::var("FAKE_FC_FAIL_PATH").ok(),
            ctrl_alt_del_exits: std::env::var("FAKE_FC_CTRL_ALT_DEL_EXITS").is_ok(),
            echo_requests: std::env::var("FAKE_FC_ECHO_REQUESTS").is_ok(),
            lazy: None,
        }));
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let state = state.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| handle(state.clone(), req));
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    }

    /// Writes numbered lines to stdout, the guest console, as fast as the pipe takes them, then
    /// `FLOOD-END` once the drain had a moment to catch up.
    fn flood_console(lines: u64) {
        use std::os::fd::AsFd;
        // Unbuffered: the agent made stdout non-blocking, and a full pipe is waited out here.
        let mut out = std::fs::File::from(std::io::stdout().as_fd().try_clone_to_owned().unwrap());
        let mut write = |mut bytes: &[u8]| {
            while !bytes.is_empty() {
                match out.write(bytes) {
                    Ok(n) => bytes = &bytes[n..],
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(std::time::Duration::from_millis(1))
                    }
                    Err(e) => panic!("console write failed: {e}"),
                }
            }
        };
        for i in 0..lines {
            write(format!("flood line {i}\n").as_bytes());
        }
        std::thread::sleep(std::time::Duration::from_secs(1));
        write(b"FLOOD-END\n");
    }

    fn reply(status: StatusCode, body: Option<Value>) -> Result<Response<Full<Bytes>>, Infallible> {
        let bytes = body.map(|b| Bytes::from(b.to_string())).unwrap_or_default();
        Ok(Response::builder()
            .status(status)
            .body(Full::new(bytes))
            .unwrap())
    }

    fn fault(message: &str) -> Result<Response<Full<Bytes>>, Infallible> {
        reply(
            StatusCode::BAD_REQUEST,
            Some(json!({ "fault_message": message })),
        )
    }

    async fn handle(
        state: Arc<Mutex<State>>,
        req: Request<Incoming>,
    ) -> Result<Response<Full<Bytes>>, Infallible> {
        let method = req.method().to_string();
        let path = req.uri().path().to_owned();
        let chunked = req.headers().contains_key(http::header::TRANSFER_ENCODING);
        let content_length = req.headers().get(http::header::CONTENT_LENGTH).cloned();
        let bytes = req.into_body().collect().await.unwrap().to_bytes();
        let mut state = state.lock().unwrap();
        log(&state.record, &format!("{method} {path}"));
        if state.echo_requests {
            // Like a guest's serial output: lost, not fatal, while nobody reads the console.
            let _ = writeln!(std::io::stdout(), "console: {method} {path}");
        }
        if chunked || (!bytes.is_empty() && content_length.is_none()) {
            log(&state.record, "VIOLATION body without Content-Length");
            return fault("send Content-Length, not chunked bodies");
        }
        let body: Option<Value> = if bytes.is_empty() {
            None
        } else {
            match serde_json::from_slice(&bytes) {
                Ok(v) => Some(v),
                Err(e) => return fault(&format!("bad JSON: {e}")),
            }
        };
        if let Err(e) = state.swagger.validate_call(&method, &path, body.as_ref()) {
            log(&state.record, &format!("VIOLATION {e}"));
            return fault(&e);
        }
        if state.fail_path.as_deref() == Some(path.as_str()) {
            return fault(&format!("fake failure injected for {path}"));
        }
        match (method.as_str(), path.as_str()) {
            ("GET", "/version") => reply(
                StatusCode::OK,
                Some(json!({"firecracker_version": "1.16.1"})),
            ),
            ("GET", "/") => {
                let s = match (state.started, state.paused) {
                    (true, true) => "Paused",
                    (true, false) => "Running",
                    (false, _) => "Not started",
                };
                reply(
                    StatusCode::OK,
                    Some(
                        json!({"app_name": "Firecracker", "id": "fake", "state": s, "vmm_version": "1.16.1"}),
                    ),
                )
            }
            ("PATCH", "/vm") if state.started => {
                state.paused = body.as_ref().unwrap()["state"] == "Paused";
                reply(StatusCode::NO_CONTENT, None)
            }
            ("PUT", "/snapshot/create") if state.started && state.paused => {
                let body = body.unwrap();
                // The guest's memory as it is now: what a lazy load brought in and the guest
                // wrote since.
                let memory = match &mut state.lazy {
                    Some(lazy) => {
                        let bytes = lazy.bytes();
                        let end = bytes.iter().position(|b| *b == 0).unwrap_or(bytes.len());
                        bytes[..end].to_vec()
                    }
                    None => b"fake memory".to_vec(),
                };
                for (key, content) in [
                    ("snapshot_path", b"fake vmstate".to_vec()),
                    ("mem_file_path", memory),
                ] {
                    let path = host(body[key].as_str().unwrap());
                    if let Err(e) = std::fs::write(&path, content) {
                        return fault(&format!("cannot write {}: {e}", path.display()));
                    }
                }
                reply(StatusCode::NO_CONTENT, None)
            }
            ("PUT", "/snapshot/create") => fault("the microVM must be paused"),
            ("PUT", "/snapshot/load") if state.started || state.configured => fault(
                "Loading a microVM snapshot not allowed after configuring boot-specific resources.",
            ),
            ("PUT", "/snapshot/load") => {
                let body = body.unwrap();
                log(&state.record, &format!("BODY {body}"));
                let state_file = host(body["snapshot_path"].as_str().unwrap());
                let backend = host(body["mem_backend"]["backend_path"].as_str().unwrap());
                let memory_ok = if body["mem_backend"]["backend_type"] == "Uffd" {
                    // Firecracker's side of the page server's handshake; then the guest reads
                    // its memory and writes one more mark after what it holds.
                    let mut lazy = super::uffd::LazyMemory::connect(&backend, super::uffd::PAGE);
                    let bytes = lazy.bytes();
                    let ok = bytes.starts_with(b"fake memory");
                    let end = bytes
                        .iter()
                        .position(|b| *b == 0)
                        .unwrap_or(bytes.len() - 1);
                    bytes[end] = b'+';
                    state.lazy = Some(lazy);
                    ok
                } else {
                    std::fs::read(&backend).is_ok_and(|m| m.starts_with(b"fake memory"))
                };
                if std::fs::read_to_string(state_file).ok().as_deref() != Some("fake vmstate")
                    || !memory_ok
                {
                    // A failed load ends Firecracker.
                    std::process::exit(1);
                }
                state.started = true;
                state.paused = body["resume_vm"] != true;
                reply(StatusCode::NO_CONTENT, None)
            }
            ("PUT", "/vsock") => {
                state.configured = true;
                let uds = host(body.as_ref().unwrap()["uds_path"].as_str().unwrap());
                match std::os::unix::net::UnixListener::bind(&uds) {
                    Ok(listener) => {
                        std::mem::forget(listener);
                        reply(StatusCode::NO_CONTENT, None)
                    }
                    Err(e) => fault(&format!("cannot bind vsock socket {}: {e}", uds.display())),
                }
            }
            ("PUT", "/actions") => match body.as_ref().unwrap()["action_type"].as_str() {
                Some("InstanceStart") if state.started => {
                    fault("The requested operation is not supported after starting the microVM.")
                }
                Some("InstanceStart") => {
                    state.started = true;
                    reply(StatusCode::NO_CONTENT, None)
                }
                Some("SendCtrlAltDel") if state.ctrl_alt_del_exits => {
                    // The guest reboots with reboot=k, and Firecracker exits 0.
                    std::process::exit(0)
                }
                _ => reply(StatusCode::NO_CONTENT, None),
            },
            _ if state.started => {
                fault("The requested operation is not supported after starting the microVM.")
            }
            _ => {
                state.configured = true;
                reply(StatusCode::NO_CONTENT, None)
            }
        }
    }
}

/// A Firecracker stand-in: a script that answers `--version` and otherwise re-enters this
/// test binary as [`fake_firecracker_process`], with knobs passed through the environment.
/// Firecracker's arguments follow on the command line, where adoption looks for `--api-sock`
/// (the test harness takes them as test-name filters that match nothing).
struct FakeFirecracker {
    _tmp: tempfile::TempDir,
    bin: PathBuf,
    record: PathBuf,
    layout: Layout,
}

/// Writes the executable script `path` from a child process. Written from this process, its
/// file descriptor open for writing would be inherited by whatever another test thread spawns
/// at that moment, and executing the script before that child's `exec` fails with
/// `ETXTBSY` ("Text file busy").
fn install_executable(path: &Path, script: &str) {
    use std::io::Write;
    let mut child = std::process::Command::new("sh")
        .args(["-c", "cat > \"$0\" && chmod 755 \"$0\""])
        .arg(path)
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    assert!(child.wait().unwrap().success());
}

impl FakeFirecracker {
    fn new(knobs: &[(&str, &str)]) -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let layout = Layout::new(tmp.path().join("root"));
        layout.prepare().unwrap();
        let record = tmp.path().join("calls.log");
        let exports: String = knobs
            .iter()
            .map(|(k, v)| format!("export {k}='{v}'\n"))
            .collect();
        let script = format!(
            "#!/bin/sh\ncase \"$1\" in --version) echo 'Firecracker v1.16.1'; echo; exit 0;; \
             --snapshot-version) echo 'v10.0.0'; exit 0;; esac\n\
             export FAKE_FC_ARGS=\"$*\"\nexport FAKE_FC_RECORD='{}'\n{exports}\
             exec '{}' --exact --ignored --nocapture --test-threads=1 fake_firecracker_process -- \"$@\"\n",
            record.display(),
            std::env::current_exe().unwrap().display()
        );
        let bin = tmp.path().join("firecracker");
        install_executable(&bin, &script);
        Self {
            _tmp: tmp,
            bin,
            record,
            layout,
        }
    }

    fn vmm(&self) -> FirecrackerVmm {
        FirecrackerVmm::new(self.bin.clone(), console_cap())
    }

    /// A jailer stand-in: records its arguments, then runs the fake Firecracker the way the
    /// jailer runs Firecracker (its `--id` first, then Firecracker's own arguments), with the
    /// paths Firecracker is given resolved in the jail instead of chrooting into it.
    fn jailer(&self) -> (PathBuf, PathBuf) {
        let dir = self.bin.parent().unwrap();
        let record = dir.join("jailer.log");
        let script = format!(
            "#!/bin/sh
echo \"$*\" >> '{}'
             while [ \"$1\" != -- ]; do
               case \"$1\" in --id) id=$2;; --exec-file) exe=$2;; --chroot-base-dir) base=$2;; esac
               shift 2
             done
shift
             export FAKE_FC_ROOT=\"$base/$(basename \"$exe\")/$id/root\"
             exec \"$exe\" --id \"$id\" \"$@\"
",
            record.display()
        );
        let bin = dir.join("jailer");
        install_executable(&bin, &script);
        (bin, record)
    }

    fn calls(&self) -> Vec<String> {
        std::fs::read_to_string(&self.record)
            .unwrap_or_default()
            .lines()
            .filter(|l| !l.starts_with("PID ") && !l.starts_with("BODY "))
            .map(str::to_owned)
            .collect()
    }

    /// The bodies of the snapshot loads the fakes received.
    fn load_bodies(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.record)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.strip_prefix("BODY "))
            .map(|b| serde_json::from_str(b).unwrap())
            .collect()
    }

    /// The pids of every fake process started so far, in order.
    fn pids(&self) -> Vec<u32> {
        std::fs::read_to_string(&self.record)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.strip_prefix("PID "))
            .map(|p| p.parse().unwrap())
            .collect()
    }

    fn pid(&self) -> u32 {
        let text = std::fs::read_to_string(&self.record).unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix("PID "))
            .unwrap()
            .parse()
            .unwrap()
    }
}

/// Polls the console log (drained asynchronously) until it shows `needle`.
async fn wait_for_console(files: &VmFiles, needle: &str) {
    let started = std::time::Instant::now();
    loop {
        let console = std::fs::read_to_string(&files.console_log).unwrap_or_default();
        if console.contains(needle) {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "`{needle}` never reached the console log:\n{console}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn gone(pid: u32) -> bool {
    !Path::new(&format!("/proc/{pid}")).exists()
}

#[tokio::test]
async fn driver_configures_the_fake_in_order_after_removing_stale_sockets() {
    let fake = FakeFirecracker::new(&[]);
    let spec = full_spec(&fake.layout, "cl-fake");
    std::fs::create_dir_all(&spec.files.dir).unwrap();
    std::fs::write(&spec.files.firecracker_socket, b"stale").unwrap();
    std::fs::write(&spec.files.vsock_socket, b"stale").unwrap();

    assert_eq!(fake.vmm().version().await.unwrap(), "Firecracker v1.16.1");
    let mut vm = fake.vmm().start(&spec).await.unwrap();
    assert_eq!(vm.vmm_version(), "1.16.1");
    assert_eq!(vm.pid(), fake.pid());
    assert_eq!(vm.serial_log(), spec.files.console_log);
    assert_eq!(
        fake.calls(),
        [
            "GET /version",
            "PUT /machine-config",
            "PUT /boot-source",
            "PUT /drives/root",
            "PUT /drives/data",
            "PUT /network-interfaces/eth0",
            "PUT /vsock",
            "PUT /actions",
        ]
    );
    assert_eq!(vm.status().await.unwrap(), VmStatus::Running);
    // Firecracker's stdout is the guest console, drained into the console log.
    wait_for_console(&spec.files, "fake Firecracker serving").await;
    let status = vm.kill().await.unwrap();
    assert!(!status.status().unwrap().success());
    assert!(gone(fake.pid()));
    assert!(!spec.files.firecracker_socket.exists() && !spec.files.vsock_socket.exists());
}

#[tokio::test]
async fn a_flooded_console_stays_within_the_cap_keeps_the_latest_lines_and_the_api_answers() {
    const CAP: u64 = 16384;
    // About 1.8 MB of numbered lines.
    let fake = FakeFirecracker::new(&[("FAKE_FC_CONSOLE_FLOOD", "100000")]);
    let spec = full_spec(&fake.layout, "cl-flood");
    let cap = ConsoleLogMaxBytes::try_from(CAP).unwrap();
    let mut vm = FirecrackerVmm::new(fake.bin.clone(), cap)
        .start(&spec)
        .await
        .unwrap();
    let sizes = || {
        let size = |p: &Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
        (
            size(&spec.files.console_log),
            size(&spec.files.previous_console_log),
        )
    };
    let started = std::time::Instant::now();
    while console_tail(&spec.files, 1) != ["FLOOD-END"] {
        let (current, previous) = sizes();
        assert!(current + previous <= CAP, "{current} + {previous}");
        assert_eq!(vm.status().await.unwrap(), VmStatus::Running);
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the flood never ended: {:?}",
            console_tail(&spec.files, 3)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (current, previous) = sizes();
    assert!(current + previous <= CAP, "{current} + {previous}");
    assert_eq!(previous, CAP / 2);
    // The newest output, in order. The fake floods at memory speed, faster than a debug build
    // writes files on a busy machine: where the log fell behind, a note on a line of its own
    // says how much was dropped, and the lines on either side of it may be cut.
    let tail = console_tail(&spec.files, 2000);
    assert_eq!(tail.last().map(String::as_str), Some("FLOOD-END"));
    let is_note =
        |l: &str| l.starts_with("[wrenn: ") && l.ends_with(" bytes of console output dropped]");
    let whole: Vec<&str> = (0..tail.len() - 1)
        .filter(|&i| !is_note(&tail[i]))
        .filter(|&i| !is_note(&tail[i + 1]) && (i == 0 || !is_note(&tail[i - 1])))
        .map(|i| tail[i].as_str())
        .collect();
    let numbers: Vec<u64> = whole
        .iter()
        .map(|l| {
            l.strip_prefix("flood line ")
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("`{l}` in {tail:?}"))
        })
        .collect();
    assert!(numbers.windows(2).all(|w| w[0] < w[1]), "{tail:?}");
    assert!(numbers[0] > 50_000, "old output is gone: {tail:?}");
    vm.kill().await.unwrap();
    assert!(gone(fake.pid()));
}

#[tokio::test]
async fn a_refused_request_maps_fault_message_and_rolls_back() {
    let fake = FakeFirecracker::new(&[("FAKE_FC_FAIL_PATH", "/network-interfaces/eth0")]);
    let spec = full_spec(&fake.layout, "cl-refused");
    let err = fake.vmm().start(&spec).await.err().expect("start fails");
    match &err {
        VmmError::FirecrackerApi(FirecrackerApiError::Fault {
            status,
            path,
            fault_message,
            ..
        }) => {
            assert_eq!(status.as_u16(), 400);
            assert_eq!(path, "/network-interfaces/eth0");
            assert!(
                fault_message.contains("fake failure injected"),
                "{fault_message}"
            );
        }
        other => panic!("expected a Firecracker fault, got {other}"),
    }
    assert!(err.to_string().contains("fake failure injected"), "{err}");
    assert!(
        gone(fake.pid()),
        "the half-configured Firecracker was not killed"
    );
    assert!(!spec.files.firecracker_socket.exists());
    assert!(
        !fake.calls().contains(&"PUT /actions".to_owned()),
        "{:?}",
        fake.calls()
    );
}

#[tokio::test]
async fn shutdown_sends_ctrl_alt_del_and_waits_for_the_exit() {
    let fake = FakeFirecracker::new(&[("FAKE_FC_CTRL_ALT_DEL_EXITS", "1")]);
    let spec = full_spec(&fake.layout, "cl-cad");
    let mut vm = fake.vmm().start(&spec).await.unwrap();
    let status = vm.shutdown(Duration::from_secs(30)).await.unwrap();
    assert!(status.status().unwrap().success(), "{status}");
    assert_eq!(
        fake.calls().last().map(String::as_str),
        Some("PUT /actions")
    );
    assert_eq!(
        fake.calls().iter().filter(|c| *c == "PUT /actions").count(),
        2
    );
}

#[tokio::test]
async fn shutdown_kills_a_guest_that_ignores_ctrl_alt_del() {
    let fake = FakeFirecracker::new(&[]);
    let spec = full_spec(&fake.layout, "cl-deaf");
    let mut vm = fake.vmm().start(&spec).await.unwrap();
    let status = vm.shutdown(Duration::from_millis(300)).await.unwrap();
    assert!(
        !status.status().unwrap().success(),
        "killed, not exited: {status}"
    );
    assert!(gone(fake.pid()));
}

#[tokio::test]
async fn a_binary_that_exits_at_once_is_reported_with_its_stderr() {
    let tmp = tempfile::tempdir().unwrap();
    let bin = tmp.path().join("firecracker");
    install_executable(
        &bin,
        "#!/bin/sh\necho 'Error: KVM is not available' >&2\nexit 1\n",
    );
    let layout = Layout::new(tmp.path().join("root"));
    let spec = full_spec(&layout, "cl-dies");
    let err = FirecrackerVmm::new(bin, console_cap())
        .start(&spec)
        .await
        .err()
        .expect("start fails");
    assert!(matches!(err, VmmError::ExitedEarly { .. }), "{err}");
    assert!(err.to_string().contains("KVM is not available"), "{err}");
}

#[tokio::test]
async fn a_missing_binary_is_a_spawn_error() {
    let tmp = tempfile::tempdir().unwrap();
    let layout = Layout::new(tmp.path());
    let vmm = FirecrackerVmm::new(tmp.path().join("no-firecracker"), console_cap());
    let err = vmm
        .start(&full_spec(&layout, "cl-nobin"))
        .await
        .err()
        .expect("start fails");
    assert!(matches!(err, VmmError::Spawn { .. }), "{err}");
    assert!(matches!(vmm.version().await, Err(VmmError::Spawn { .. })));
}

/// A files root on tmpfs for the snapshot tests: a pause first checks there is room for the
/// whole guest memory, which the shared test machine's disk may not have.
fn roomy_layout() -> (tempfile::TempDir, Layout) {
    let tmp = tempfile::tempdir_in("/dev/shm").unwrap();
    let layout = Layout::new(tmp.path().join("root"));
    layout.prepare().unwrap();
    (tmp, layout)
}

#[tokio::test]
async fn pause_writes_a_full_snapshot_and_restore_loads_it_into_a_fresh_process() {
    let fake = FakeFirecracker::new(&[]);
    let (_tmp, layout) = roomy_layout();
    let spec = full_spec(&layout, "cl-snap");
    // The writable disk is synced as part of the pause.
    std::fs::create_dir_all(&spec.files.dir).unwrap();
    std::fs::write(&spec.drives[1].path, b"disk").unwrap();
    let snap = SnapshotFiles::for_sandbox(&layout, "cl-snap");
    let mut vm = fake.vmm().start(&spec).await.unwrap();
    let first = vm.pid();
    let meta = vm.pause_to(&snap).await.unwrap();
    assert!(gone(first), "Firecracker still runs after the snapshot");
    assert!(matches!(vm.status().await.unwrap(), VmStatus::Exited(_)));
    assert_eq!(
        fake.calls()[8..],
        ["GET /", "PATCH /vm", "PUT /snapshot/create"]
    );
    assert_eq!(meta.vmm, VmmKind::Firecracker);
    assert_eq!(meta.vmm_version, "1.16.1");
    assert_eq!(meta.vmm_snapshot_version.as_deref(), Some("10.0.0"));
    assert_eq!(meta.machine.memory_mib, 512);
    let names: Vec<&str> = meta.files.iter().map(|f| f.name.as_str()).collect();
    assert_eq!(names, ["vmstate", "memory"]);
    assert!(snap.meta.is_file() && snap.state.is_file() && snap.memory.is_file());
    assert!(!spec.files.firecracker_socket.exists());

    // Into another TAP: the guest keeps its address, the new process gets the new device.
    let mut moved = spec.clone();
    moved.net.as_mut().unwrap().tap = "tap9".into();
    let mut vm = fake.vmm().restore(&moved, &snap).await.unwrap();
    assert_eq!(vm.pid(), fake.pids()[1]);
    assert_eq!(vm.status().await.unwrap(), VmStatus::Running);
    assert_eq!(
        fake.calls()[11..],
        ["GET /version", "PUT /snapshot/load", "GET /"]
    );
    let load = &fake.load_bodies()[0];
    assert_eq!(load["network_overrides"][0]["host_dev_name"], "tap9");
    assert_eq!(load["mem_backend"]["backend_type"], "File");
    assert_eq!(load["resume_vm"], true);

    // Restored once: the guest has run on.
    let err = fake
        .vmm()
        .restore(&moved, &snap)
        .await
        .err()
        .expect("refused");
    assert!(
        matches!(
            err,
            VmmError::Snapshot(SnapshotError::AlreadyRestored { .. })
        ),
        "{err}"
    );
    assert_eq!(fake.pids().len(), 2, "a refused restore started a process");

    // Pausing the restored VM replaces the snapshot; its memory file is written under a new
    // name, never over the one the running VM maps.
    vm.pause_to(&snap).await.unwrap();
    let mut meta: Value = serde_json::from_slice(&std::fs::read(&snap.meta).unwrap()).unwrap();
    meta["vmm_snapshot_version"] = "9.0.0".into();
    std::fs::write(&snap.meta, meta.to_string()).unwrap();
    let err = fake
        .vmm()
        .restore(&moved, &snap)
        .await
        .err()
        .expect("refused");
    assert!(
        matches!(err, VmmError::Snapshot(SnapshotError::VmmVersion { .. })),
        "{err}"
    );
    assert!(err.to_string().contains("9.0.0"), "{err}");
    assert_eq!(fake.pids().len(), 2, "a refused restore started a process");
}

#[tokio::test]
async fn a_failed_snapshot_resumes_the_vm_and_leaves_nothing_loadable() {
    let fake = FakeFirecracker::new(&[("FAKE_FC_FAIL_PATH", "/snapshot/create")]);
    let (_tmp, layout) = roomy_layout();
    let mut spec = full_spec(&layout, "cl-snapfail");
    spec.drives.truncate(1);
    let snap = SnapshotFiles::for_sandbox(&layout, "cl-snapfail");
    let mut vm = fake.vmm().start(&spec).await.unwrap();
    let err = vm.pause_to(&snap).await.expect_err("injected failure");
    assert!(
        matches!(
            err,
            VmmError::PauseFailed {
                after: AfterFailedPause::Running,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("fake failure injected"), "{err}");
    assert_eq!(
        fake.calls()[7..],
        ["GET /", "PATCH /vm", "PUT /snapshot/create", "PATCH /vm"]
    );
    assert_eq!(vm.status().await.unwrap(), VmStatus::Running);
    let left: Vec<_> = std::fs::read_dir(&snap.dir).unwrap().collect();
    assert!(left.is_empty(), "{left:?}");
    vm.kill().await.unwrap();
}

#[tokio::test]
async fn a_refused_load_ends_the_process_and_keeps_the_snapshot() {
    let fake = FakeFirecracker::new(&[("FAKE_FC_FAIL_PATH", "/snapshot/load")]);
    let (_tmp, layout) = roomy_layout();
    let mut spec = full_spec(&layout, "cl-loadfail");
    spec.drives.truncate(1);
    let snap = SnapshotFiles::for_sandbox(&layout, "cl-loadfail");
    let mut vm = fake.vmm().start(&spec).await.unwrap();
    vm.pause_to(&snap).await.unwrap();
    let err = fake
        .vmm()
        .restore(&spec, &snap)
        .await
        .err()
        .expect("refused");
    assert!(
        matches!(
            err,
            VmmError::FirecrackerApi(FirecrackerApiError::Fault { .. })
        ),
        "{err}"
    );
    assert!(gone(fake.pids()[1]), "the failed process was not killed");
    assert!(
        snap.meta.is_file(),
        "the guest never ran: the snapshot stays"
    );
}

// ---- Adoption: a VMM started by an earlier agent process -------------------------------

/// Ended: gone, or a zombie its parent has not reaped yet.
fn ended(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat.rsplit_once(')').unwrap().1.split_whitespace().next() == Some("Z"),
        Err(_) => true,
    }
}

/// Kills the fakes left running for a layout's sandboxes when dropped: a test that hands VMs
/// over by dropping their handles would otherwise leave them running if it fails.
struct KillLeftovers<'a>(&'a Layout);

impl Drop for KillLeftovers<'_> {
    fn drop(&mut self) {
        for leftover in find_leftovers(self.0) {
            let pid = nix::unistd::Pid::from_raw(leftover.pid as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
        }
    }
}

#[tokio::test]
async fn an_adopted_fake_pauses_to_disk_restores_and_is_killed_with_valid_requests() {
    let fake = FakeFirecracker::new(&[("FAKE_FC_ECHO_REQUESTS", "1")]);
    let (_tmp, layout) = roomy_layout();
    let _cleanup = KillLeftovers(&layout);
    let spec = full_spec(&layout, "cl-adopt");
    std::fs::create_dir_all(&spec.files.dir).unwrap();
    std::fs::write(&spec.drives[1].path, b"disk").unwrap();
    let snap = SnapshotFiles::for_sandbox(&layout, "cl-adopt");
    let vmm = fake.vmm();
    let vm = vmm.start(&spec).await.unwrap();
    let pid = vm.pid();
    // As when the agent process dies: the handle goes, the process runs on, and the next
    // agent process finds it by its command line.
    drop(vm);
    let leftover = Leftover {
        sandbox_id: "cl-adopt".into(),
        pid,
        kind: VmmKind::Firecracker,
    };
    assert_eq!(find_leftovers(&layout), [leftover]);

    // Only this sandbox's Firecracker is taken over; refusals leave it running.
    let refused = |err: VmmError, socket: &Path| {
        match &err {
            VmmError::NotAdoptable { refusal, .. } => assert_eq!(
                refusal,
                &AdoptRefusal::OtherProcess {
                    socket: socket.to_path_buf()
                },
                "{err}"
            ),
            other => panic!("expected a refusal, got {other}"),
        }
        assert!(!ended(pid), "a refused adoption touched the VMM");
    };
    let other = full_spec(&layout, "cl-other");
    let err = vmm.adopt(&other, pid).await.err().expect("another sandbox");
    refused(err, &other.files.firecracker_socket);
    let err = vmm
        .adopt(&spec, std::process::id())
        .await
        .err()
        .expect("not a VMM");
    refused(err, &spec.files.firecracker_socket);

    let mut vm = vmm.adopt(&spec, pid).await.unwrap();
    assert_eq!(vm.pid(), pid);
    assert_eq!(vm.vmm_version(), "1.16.1");
    assert_eq!(vm.serial_log(), spec.files.console_log);
    assert_eq!(vm.status().await.unwrap(), VmStatus::Running);
    // What the VMM writes to its console after the adoption reaches the same log, after what
    // the first agent process drained.
    wait_for_console(&spec.files, "console: GET /\n").await;
    let console = std::fs::read_to_string(&spec.files.console_log).unwrap();
    let before = console
        .find("console: PUT /actions\n")
        .expect("the boot's output is kept");
    assert!(
        before < console.find("console: GET /\n").unwrap(),
        "{console}"
    );

    let meta = vm.pause_to(&snap).await.unwrap();
    assert!(ended(pid), "Firecracker still runs after the snapshot");
    assert_eq!(
        vm.status().await.unwrap(),
        VmStatus::Exited(VmmExit::Unobserved)
    );
    assert_eq!(meta.vmm_version, "1.16.1");
    assert_eq!(meta.vmm_snapshot_version.as_deref(), Some("10.0.0"));
    assert_eq!(meta.machine.memory_mib, 512);
    assert!(!spec.files.firecracker_socket.exists());

    let vm = vmm.restore(&spec, &snap).await.unwrap();
    let restored = vm.pid();
    drop(vm);
    let mut vm = vmm.adopt(&spec, restored).await.unwrap();
    assert_eq!(vm.status().await.unwrap(), VmStatus::Running);
    assert_eq!(vm.kill().await.unwrap(), VmmExit::Unobserved);
    assert!(ended(restored));
    assert_eq!(
        vm.status().await.unwrap(),
        VmStatus::Exited(VmmExit::Unobserved)
    );
    assert!(!spec.files.firecracker_socket.exists() && !spec.files.vsock_socket.exists());
    let err = vmm.adopt(&spec, restored).await.err().expect("gone");
    assert!(
        matches!(
            err,
            VmmError::NotAdoptable {
                refusal: AdoptRefusal::Gone | AdoptRefusal::OtherProcess { .. },
                ..
            }
        ),
        "{err}"
    );

    // Every request, before and after each adoption, was valid against the swagger.
    let calls = fake.calls();
    assert!(
        !calls.iter().any(|c| c.starts_with("VIOLATION")),
        "{calls:?}"
    );
    let after_boot = &calls[8..];
    assert_eq!(
        after_boot,
        [
            "GET /version",
            "GET /",
            "GET /",
            "PATCH /vm",
            "PUT /snapshot/create",
            "GET /version",
            "PUT /snapshot/load",
            "GET /version",
            "GET /",
        ]
    );
}

// ---- Opt-in: a real Firecracker ----------------------------------------------------------

/// The real suite's VMs are confined: through /usr/local/bin/jailer, as an unprivileged user,
/// in a cgroup under a parent of the test's own (removed when the returned guard drops).
fn real_vmm(layout: &Layout) -> (FirecrackerVmm, Confinement, CgroupParent) {
    let parent = PathBuf::from(format!("wrenn-tests/vmm-fc-real-{}", std::process::id()));
    let cgroups =
        Cgroups::detect(Path::new(wrenn::vmm::cgroup::DEFAULT_ROOT), &parent, None).unwrap();
    let vmm = FirecrackerVmm::new("/usr/local/bin/firecracker".into(), console_cap())
        .jailed("/usr/local/bin/jailer".into(), layout.jails_dir());
    let confinement = Confinement {
        uid: 900_000_077,
        gid: 900_000_077,
        cgroups,
    };
    (vmm, confinement, CgroupParent(parent))
}

/// A running VMM is unprivileged, filtered and chrooted.
fn assert_jailed(pid: u32) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name}:")))
            .unwrap()
            .trim()
            .to_owned()
    };
    assert!(
        field("Uid").split_whitespace().all(|u| u == "900000077"),
        "{status}"
    );
    assert_eq!(field("Seccomp"), "2");
    assert_ne!(
        std::fs::read_link(format!("/proc/{pid}/root")).unwrap(),
        Path::new("/")
    );
}

/// Boots a real VM with /usr/local/bin/firecracker through its jailer; set
/// `WRENN_TEST_FIRECRACKER=1` on a host with working KVM.
#[tokio::test]
async fn real_firecracker_boots_a_guest() {
    if std::env::var("WRENN_TEST_FIRECRACKER").as_deref() != Ok("1") {
        println!(
            "skipped: set WRENN_TEST_FIRECRACKER=1 on a KVM host with /usr/local/bin/firecracker"
        );
        return;
    }
    let kernel = wrenn_test_support::kernel::test_kernel().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let layout = Layout::new(tmp.path().join("root"));
    layout.prepare().unwrap();
    let init = "#!/bin/busybox sh\n/bin/busybox echo WRENN-FC-MARKER\n/bin/busybox reboot -f\n";
    let initrd = wrenn_test_support::kernel::busybox_initramfs(tmp.path(), init, &[]).unwrap();
    let spec = VmSpec {
        id: "cl-real".into(),
        vcpus: 1,
        memory_mib: 256,
        kernel: kernel.vmlinux,
        initrd: Some(initrd),
        extra_boot_args: String::new(),
        drives: vec![],
        net: None,
        vsock_cid: None,
        files: VmFiles::for_sandbox(&layout, "cl-real"),
        confinement: None,
    };
    let (vmm, confinement, _parent) = real_vmm(&layout);
    let spec = VmSpec {
        confinement: Some(confinement),
        ..spec
    };
    println!("{}", vmm.version().await.unwrap());
    let mut vm = vmm.start(&spec).await.unwrap();
    assert_jailed(vm.pid());
    let status = tokio::time::timeout(Duration::from_secs(60), vm.wait_exit())
        .await
        .unwrap()
        .unwrap();
    assert!(status.status().unwrap().success(), "{status}");
    let console = std::fs::read_to_string(&spec.files.console_log).unwrap();
    assert!(console.contains("WRENN-FC-MARKER"), "{console}");
}

/// Pauses a real guest with a counter to disk, restores it in a new Firecracker and adopts
/// that process after dropping its handle; set `WRENN_TEST_FIRECRACKER=1` on a host with
/// working KVM.
#[tokio::test]
async fn real_firecracker_pauses_to_disk_and_restores_a_guest() {
    if std::env::var("WRENN_TEST_FIRECRACKER").as_deref() != Ok("1") {
        println!(
            "skipped: set WRENN_TEST_FIRECRACKER=1 on a KVM host with /usr/local/bin/firecracker"
        );
        return;
    }
    let kernel = wrenn_test_support::kernel::test_kernel().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let layout = Layout::new(tmp.path().join("root"));
    layout.prepare().unwrap();
    let init = "#!/bin/busybox sh\nexport PATH=/bin\ni=0\n\
                while true; do i=$((i+1)); echo TICK $i; sleep 0.2; done\n";
    let initrd = wrenn_test_support::kernel::busybox_initramfs(tmp.path(), init, &[]).unwrap();
    let spec = VmSpec {
        id: "cl-real-snap".into(),
        vcpus: 1,
        memory_mib: 256,
        kernel: kernel.vmlinux,
        initrd: Some(initrd),
        extra_boot_args: String::new(),
        drives: vec![],
        net: None,
        vsock_cid: None,
        files: VmFiles::for_sandbox(&layout, "cl-real-snap"),
        confinement: None,
    };
    let (vmm, confinement, _parent) = real_vmm(&layout);
    let spec = VmSpec {
        confinement: Some(confinement),
        ..spec
    };
    let ticks = |files: &VmFiles| -> Vec<u64> {
        std::fs::read_to_string(&files.console_log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.strip_prefix("TICK ")?.trim().parse().ok())
            .collect()
    };
    let wait_ticks = |files: VmFiles| async move {
        let started = std::time::Instant::now();
        loop {
            let seen = ticks(&files);
            if seen.len() >= 2 {
                return seen;
            }
            assert!(started.elapsed() < Duration::from_secs(60), "no ticks");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let snap = SnapshotFiles::for_sandbox(&layout, "cl-real-snap");
    let mut vm = vmm.start(&spec).await.unwrap();
    assert_jailed(vm.pid());
    wait_ticks(spec.files.clone()).await;
    let pid = vm.pid();
    let meta = vm.pause_to(&snap).await.unwrap();
    assert!(gone(pid));
    println!(
        "snapshot: {:?}, {} KiB on disk",
        meta.vmm_snapshot_version,
        snap.allocated_bytes() / 1024
    );
    let paused_at = *ticks(&spec.files).last().unwrap();
    let vm = vmm.restore(&spec, &snap).await.unwrap();
    let after = wait_ticks(spec.files.clone()).await;
    assert!(
        after[0] > paused_at && after[0] <= paused_at + 2,
        "paused at {paused_at}, resumed with {after:?}"
    );
    // The restored VM's handle is dropped, as by an agent that died, and the VM is adopted:
    // its console is drained again and it can be killed.
    let pid = vm.pid();
    drop(vm);
    let before = ticks(&spec.files).last().copied().unwrap_or(0);
    let mut vm = vmm.adopt(&spec, pid).await.unwrap();
    assert_jailed(pid);
    let started = std::time::Instant::now();
    while ticks(&spec.files).last().copied().unwrap_or(0) <= before {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "no ticks after the adoption"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    vm.kill().await.unwrap();
    assert!(gone(pid));
}

/// The lazy path's no-lost-writes gate on a real Firecracker: a guest whose only state is in
/// memory (a shell counting in a variable) is paused and restored lazily twice, the second time
/// with the first restore's working set prefetched; each time it counts on from where it was.
#[tokio::test]
async fn real_firecracker_restores_lazily_from_the_page_server_and_loses_no_write() {
    if std::env::var("WRENN_TEST_FIRECRACKER").as_deref() != Ok("1") {
        println!(
            "skipped: set WRENN_TEST_FIRECRACKER=1 on a KVM host with /usr/local/bin/firecracker"
        );
        return;
    }
    let kernel = wrenn_test_support::kernel::test_kernel().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let layout = Layout::new(tmp.path().join("root"));
    layout.prepare().unwrap();
    let init = "#!/bin/busybox sh\nexport PATH=/bin\ni=0\n\
                while true; do i=$((i+1)); echo TICK $i; sleep 0.2; done\n";
    let initrd = wrenn_test_support::kernel::busybox_initramfs(tmp.path(), init, &[]).unwrap();
    let (vmm, confinement, _parent) = real_vmm(&layout);
    let vmm = vmm.lazy_memory(Some(env!("CARGO_BIN_EXE_wrenn").into()));
    let spec = VmSpec {
        id: "cl-real-lazy".into(),
        vcpus: 1,
        memory_mib: 256,
        kernel: kernel.vmlinux,
        initrd: Some(initrd),
        extra_boot_args: String::new(),
        drives: vec![],
        net: None,
        vsock_cid: None,
        files: VmFiles::for_sandbox(&layout, "cl-real-lazy"),
        confinement: Some(confinement),
    };
    let ticks = |files: &VmFiles| -> Vec<u64> {
        std::fs::read_to_string(&files.console_log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.strip_prefix("TICK ")?.trim().parse().ok())
            .collect()
    };
    let wait_past = |files: VmFiles, past: u64| async move {
        let started = std::time::Instant::now();
        loop {
            let seen: Vec<u64> = ticks(&files).into_iter().filter(|t| *t > past).collect();
            if seen.len() >= 2 {
                return seen;
            }
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "no ticks past {past}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let snap = SnapshotFiles::for_sandbox(&layout, "cl-real-lazy");
    let mut vm = vmm.start(&spec).await.unwrap();
    wait_past(spec.files.clone(), 0).await;
    for round in 1..=2 {
        vm.pause_to(&snap).await.unwrap();
        let paused_at = *ticks(&spec.files).last().unwrap();
        vm = vmm.restore(&spec, &snap).await.unwrap();
        let after = wait_past(spec.files.clone(), paused_at).await;
        assert_eq!(
            after[0],
            paused_at + 1,
            "round {round}: the guest counts on from its memory"
        );
        let served = std::fs::read_to_string(spec.files.dir.join("uffd.log")).unwrap_or_default();
        println!("round {round}: page server so far: {served}");
    }
    vm.pause_to(&snap).await.unwrap();
    let touched = wrenn::vmm::firecracker::uffd::read_pages(
        &snap.dir.join(wrenn::vmm::firecracker::TOUCHED_PAGES),
    );
    assert!(
        !touched.is_empty(),
        "the working set is kept with the snapshot"
    );
    let served = std::fs::read_to_string(spec.files.dir.join("uffd.log")).unwrap();
    assert!(
        !served.contains("prefetched=0 "),
        "the second restore prefetched: {served}"
    );
}

fn jailed_confinement() -> Confinement {
    Confinement {
        uid: 900_000_042,
        gid: 900_000_043,
        cgroups: Cgroups::with_version(
            CgroupVersion::V2,
            Path::new("/sys/fs/cgroup"),
            Path::new("wrenn"),
            None,
        )
        .unwrap(),
    }
}

#[test]
fn the_jailer_runs_firecracker_as_the_vms_user_in_its_namespace_and_its_chroot() {
    let swagger = Swagger::load();
    let layout = Layout::new("/var/lib/wrenn");
    // A real sandbox ID: `cl-` and 25 base36 digits.
    let id = "cl-0qp2v521i3pcwehe0y0z48h0m";
    let spec = full_spec(&layout, id);
    let jail = Jail::new(
        &layout.jails_dir(),
        Path::new("/usr/local/bin/firecracker"),
        &spec,
        &jailed_confinement(),
    );
    assert_eq!(
        jail.root(),
        Path::new(&format!("/var/lib/wrenn/jails/firecracker/{id}/root"))
    );
    let line: Vec<String> = jail
        .command_line(Some(Path::new("/run/netns/wrenn-5")))
        .iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        line.join(" "),
        format!(
            "--id {id} --exec-file /usr/local/bin/firecracker --uid 900000042 --gid 900000043 \
             --chroot-base-dir /var/lib/wrenn/jails --netns /run/netns/wrenn-5 \
             -- --api-sock /api.sock --log-path /firecracker.log --level Info"
        )
    );
    let api_socket = jail.host_path(jail::API_SOCKET);
    assert_eq!(api_socket, jail.root().join("api.sock"));
    assert!(
        api_socket.as_os_str().len() <= 107,
        "{}",
        api_socket.display()
    );

    // Firecracker is told only paths inside the jail, and the calls stay valid.
    let inside = jail.inside(&spec);
    let calls = boot_sequence(&inside).unwrap();
    for call in &calls {
        swagger
            .validate_call(call.method.as_str(), &call.path, call.body.as_ref())
            .unwrap_or_else(|e| panic!("{}: {e}", call_line(call)));
    }
    let body = |path: &str| {
        calls
            .iter()
            .find(|c| c.path == path)
            .and_then(|c| c.body.clone())
            .unwrap()
    };
    assert_eq!(body("/boot-source")["kernel_image_path"], "/vmlinux");
    assert_eq!(body("/boot-source")["initrd_path"], "/initrd");
    assert_eq!(body("/drives/root")["path_on_host"], "/drives/root");
    assert_eq!(body("/drives/data")["path_on_host"], "/drives/data");
    assert_eq!(body("/vsock")["uds_path"], "/vsock.sock");
}

#[test]
fn a_jail_links_the_kernel_and_disks_and_hands_the_writable_ones_to_the_vms_user() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let tmp = tempfile::tempdir().unwrap();
    let layout = Layout::new(tmp.path());
    layout.prepare().unwrap();
    let mut spec = full_spec(&layout, "cl-jail");
    let shm = tempfile::tempdir_in("/dev/shm").unwrap();
    let write = |path: &Path, mode: u32| {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, path.to_string_lossy().as_bytes()).unwrap();
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    };
    // The kernel is on another filesystem; the initrd readable by root alone.
    spec.kernel = shm.path().join("vmlinux");
    write(&spec.kernel, 0o644);
    write(spec.initrd.as_ref().unwrap(), 0o600);
    write(&spec.drives[0].path, 0o644);
    write(&spec.drives[1].path, 0o600);
    let confinement = jailed_confinement();
    let jail = Jail::new(
        &layout.jails_dir(),
        Path::new("/usr/local/bin/firecracker"),
        &spec,
        &confinement,
    );
    jail.populate(&spec).unwrap();
    // Populating again replaces the jail a previous VMM left.
    jail.populate(&spec).unwrap();

    let meta = |path: &Path| std::fs::metadata(path).unwrap();
    let inside = |p: &str| jail.host_path(p);
    let (root_image, data) = (&spec.drives[0].path, &spec.drives[1].path);
    // Linked, and left as they are: the shared image and the writable disk (now the VM's).
    assert_eq!(meta(&inside("/drives/root")).ino(), meta(root_image).ino());
    assert_eq!(meta(root_image).uid(), 0, "a shared image keeps its owner");
    assert_eq!(meta(&inside("/drives/data")).ino(), meta(data).ino());
    assert_eq!(meta(data).uid(), confinement.uid);
    assert_eq!(meta(data).gid(), confinement.gid);
    // Copied for the VM's user alone: across filesystems, and where others may not read.
    for (copy, original) in [
        (inside("/vmlinux"), spec.kernel.clone()),
        (inside("/initrd"), spec.initrd.clone().unwrap()),
    ] {
        assert_ne!(meta(&copy).ino(), meta(&original).ino());
        assert_eq!(
            std::fs::read(&copy).unwrap(),
            std::fs::read(&original).unwrap()
        );
        assert_eq!(meta(&copy).uid(), confinement.uid);
        assert_eq!(meta(&copy).mode() & 0o777, 0o400);
    }
    assert_eq!(meta(&inside("/firecracker.log")).uid(), confinement.uid);

    jail.remove().unwrap();
    assert!(!jail.root().exists());
    assert!(root_image.is_file() && data.is_file() && spec.kernel.is_file());
}

/// Removes a test's cgroup parent from every hierarchy.
struct CgroupParent(PathBuf);

impl Drop for CgroupParent {
    fn drop(&mut self) {
        let root = Path::new(wrenn::vmm::cgroup::DEFAULT_ROOT);
        let mut dirs = vec![root.join(&self.0)];
        if let Ok(hierarchies) = std::fs::read_dir(root) {
            dirs.extend(hierarchies.flatten().map(|h| h.path().join(&self.0)));
        }
        for dir in dirs {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

/// A confined VM starts through the jailer and is told only paths inside its jail; it pauses
/// (the snapshot leaves the jail for the snapshot directory), restores into a fresh jail, is
/// adopted (and refused as another sandbox's), and its jail and cgroup go with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_confined_firecracker_runs_in_its_jail_across_pause_restore_and_adoption() {
    use std::os::unix::fs::MetadataExt;
    let fake = FakeFirecracker::new(&[]);
    let (jailer, jailer_record) = fake.jailer();
    let layout = fake.layout.clone();
    let parent = PathBuf::from(format!("wrenn-tests/vmm-fc-{}", std::process::id()));
    let _parent = CgroupParent(parent.clone());
    let cgroups =
        Cgroups::detect(Path::new(wrenn::vmm::cgroup::DEFAULT_ROOT), &parent, None).unwrap();
    let vmm = fake.vmm().jailed(jailer, layout.jails_dir());
    let mut spec = full_spec(&layout, "cl-jailed");
    spec.net = None;
    spec.confinement = Some(Confinement {
        uid: 900_000_042,
        gid: 900_000_042,
        cgroups: cgroups.clone(),
    });
    for path in [
        &spec.kernel,
        spec.initrd.as_ref().unwrap(),
        &spec.drives[0].path,
        &spec.drives[1].path,
    ] {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, "contents").unwrap();
    }
    let jail = Jail::new(
        &layout.jails_dir(),
        &fake.bin,
        &spec,
        spec.confinement.as_ref().unwrap(),
    );
    let cgroup = cgroups.vm(&spec.id);

    let mut vm = vmm.start(&spec).await.unwrap();
    let recorded = std::fs::read_to_string(&jailer_record).unwrap();
    let expected: Vec<String> = jail
        .command_line(None)
        .iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    assert_eq!(recorded.trim(), expected.join(" "));
    assert!(jail.host_path(jail::API_SOCKET).exists());
    assert!(
        jail.host_path(jail::VSOCK_SOCKET).exists(),
        "the vsock socket is inside the jail"
    );
    let data = std::fs::metadata(&spec.drives[1].path).unwrap();
    assert_eq!(
        std::fs::metadata(jail.host_path("/drives/data"))
            .unwrap()
            .ino(),
        data.ino()
    );
    assert_eq!(data.uid(), 900_000_042);
    assert_eq!(cgroup.pids(), [vm.pid()]);
    let found = find_leftovers(&layout);
    assert_eq!(
        found,
        [Leftover {
            sandbox_id: spec.id.clone(),
            pid: vm.pid(),
            kind: VmmKind::Firecracker
        }]
    );

    let snap = SnapshotFiles::for_sandbox(&layout, &spec.id);
    vm.pause_to(&snap).await.unwrap();
    assert_eq!(
        std::fs::read_to_string(&snap.state).unwrap(),
        "fake vmstate"
    );
    assert_eq!(
        std::fs::read_to_string(&snap.memory).unwrap(),
        "fake memory"
    );
    assert!(!jail.root().exists(), "the jail goes with its VMM");
    assert!(cgroup.dirs().iter().all(|d| !d.exists()));

    let vm = vmm.restore(&spec, &snap).await.unwrap();
    let load = fake.load_bodies().pop().unwrap();
    let inside = jail.snapshot_inside(&snap);
    assert_eq!(load["snapshot_path"], inside.state.to_str().unwrap());
    assert_eq!(
        load["mem_backend"]["backend_path"],
        inside.memory.to_str().unwrap()
    );
    assert_eq!(load["vsock_override"]["uds_path"], jail::VSOCK_SOCKET);

    let pid = vm.pid();
    drop(vm);
    let mut other = spec.clone();
    other.id = "cl-other".into();
    other.files = VmFiles::for_sandbox(&layout, "cl-other");
    let err = vmm
        .adopt(&other, pid)
        .await
        .err()
        .expect("another sandbox's VMM");
    assert!(matches!(err, VmmError::NotAdoptable { .. }), "{err}");
    let mut vm = vmm.adopt(&spec, pid).await.unwrap();
    assert_eq!(vm.status().await.unwrap(), VmStatus::Running);
    assert_eq!(cgroup.pids(), [pid]);
    vm.kill().await.unwrap();
    assert!(!jail.root().exists());
    assert!(cgroup.dirs().iter().all(|d| !d.exists()));
    assert!(find_leftovers(&layout).is_empty());
}

#[tokio::test]
async fn a_shared_snapshot_starts_several_jailed_vms_with_valid_loads_and_is_never_retired() {
    use std::os::unix::fs::MetadataExt;
    let fake = FakeFirecracker::new(&[]);
    let (jailer, _record) = fake.jailer();
    let layout = fake.layout.clone();
    let parent = PathBuf::from(format!("wrenn-tests/vmm-fc-shared-{}", std::process::id()));
    let _parent = CgroupParent(parent.clone());
    let cgroups =
        Cgroups::detect(Path::new(wrenn::vmm::cgroup::DEFAULT_ROOT), &parent, None).unwrap();
    let spec_of = |id: &str, uid: u32| {
        let mut spec = full_spec(&layout, id);
        spec.net = None;
        spec.confinement = Some(Confinement {
            uid,
            gid: uid,
            cgroups: cgroups.clone(),
        });
        for path in [
            &spec.kernel,
            spec.initrd.as_ref().unwrap(),
            &spec.drives[0].path,
            &spec.drives[1].path,
        ] {
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            if !path.exists() {
                std::fs::write(path, "contents").unwrap();
            }
        }
        spec
    };
    let jailed = || fake.vmm().jailed(jailer.clone(), layout.jails_dir());
    let spec = spec_of("cl-source", 900_000_051);
    let paused = SnapshotFiles::for_sandbox(&layout, "cl-source");
    let mut vm = jailed().start(&spec).await.unwrap();
    vm.pause_to(&paused).await.unwrap();

    let shared = SnapshotFiles::in_dir(layout.snapshots_dir().join("shared"));
    let meta = jailed().share(&spec, &paused, &shared).await.unwrap();
    assert!(meta.shared);
    assert_eq!(meta.vmm_snapshot_version.as_deref(), Some("10.0.0"));
    assert!(paused.meta.is_file(), "the paused snapshot stays loadable");
    let err = jailed()
        .restore(&spec, &shared)
        .await
        .err()
        .expect("refused");
    assert!(
        matches!(err, VmmError::Snapshot(SnapshotError::Kind { .. })),
        "{err}"
    );
    // Without the jailer a clone would open the drives the snapshot names, its source's.
    let err = fake
        .vmm()
        .restore_shared(&spec_of("cl-unjailed", 900_000_052), &shared)
        .await
        .err()
        .expect("refused");
    assert!(matches!(err, VmmError::InvalidSpec { .. }), "{err}");

    // Each VM has its own disk at its own path, and its own copy of the snapshot in its jail;
    // every load passed the swagger check in the fake.
    for (n, (id, uid)) in [("cl-clone-a", 900_000_053), ("cl-clone-b", 900_000_054)]
        .into_iter()
        .enumerate()
    {
        let clone = spec_of(id, uid);
        let mut vm = jailed().restore_shared(&clone, &shared).await.unwrap();
        assert_eq!(vm.status().await.unwrap(), VmStatus::Running);
        let load = &fake.load_bodies()[n];
        assert_eq!(load["mem_backend"]["backend_type"], "File");
        assert_eq!(load["resume_vm"], true);
        let jail = Jail::new(
            &layout.jails_dir(),
            &fake.bin,
            &clone,
            clone.confinement.as_ref().unwrap(),
        );
        let memory = jail.host_path(&jail.snapshot_inside(&shared).memory.to_string_lossy());
        let memory = std::fs::metadata(memory).unwrap();
        assert_eq!(memory.uid(), uid, "the VM's own copy");
        assert_ne!(
            memory.ino(),
            std::fs::metadata(&shared.memory).unwrap().ino()
        );
        vm.kill().await.unwrap();
    }
    assert!(shared.meta.is_file(), "a shared snapshot is never retired");
    assert_eq!(std::fs::metadata(&shared.memory).unwrap().uid(), 0);
}

/// Lazily loaded memory (`mem_backend` `Uffd`): the driver starts `wrenn uffd-serve` before the
/// load and names its socket inside the jail; the fake does Firecracker's side of the handshake
/// with a real userfaultfd, reads its memory through the page server and writes to it. Pause
/// and restore twice: every write is in the next snapshot (no lost writes), the memory never
/// goes into the jail, the pages touched are kept with the snapshot and prefetched by the next
/// restore, and the page server ends with its VM.
#[tokio::test]
async fn a_lazily_restored_vm_gets_its_memory_from_the_page_server_and_loses_no_write() {
    let fake = FakeFirecracker::new(&[]);
    let (jailer, _record) = fake.jailer();
    let layout = fake.layout.clone();
    let parent = PathBuf::from(format!("wrenn-tests/vmm-fc-lazy-{}", std::process::id()));
    let _parent = CgroupParent(parent.clone());
    let cgroups =
        Cgroups::detect(Path::new(wrenn::vmm::cgroup::DEFAULT_ROOT), &parent, None).unwrap();
    let mut spec = full_spec(&layout, "cl-lazy");
    spec.net = None;
    spec.confinement = Some(Confinement {
        uid: 900_000_061,
        gid: 900_000_061,
        cgroups,
    });
    for path in [
        &spec.kernel,
        spec.initrd.as_ref().unwrap(),
        &spec.drives[0].path,
        &spec.drives[1].path,
    ] {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        if !path.exists() {
            std::fs::write(path, "contents").unwrap();
        }
    }
    let lazy = || {
        fake.vmm()
            .jailed(jailer.clone(), layout.jails_dir())
            .lazy_memory(Some(env!("CARGO_BIN_EXE_wrenn").into()))
    };
    let snapshot = SnapshotFiles::for_sandbox(&layout, "cl-lazy");
    let mut vm = lazy().start(&spec).await.unwrap();
    vm.pause_to(&snapshot).await.unwrap();
    assert_eq!(std::fs::read(&snapshot.memory).unwrap(), b"fake memory");

    for (round, expected) in [(1, "fake memory+"), (2, "fake memory++")] {
        let mut vm = lazy().restore(&spec, &snapshot).await.unwrap();
        assert_eq!(vm.status().await.unwrap(), VmStatus::Running);
        let load = fake.load_bodies().last().unwrap().clone();
        assert_eq!(load["mem_backend"]["backend_type"], "Uffd", "{load}");
        assert_eq!(load["mem_backend"]["backend_path"], jail::UFFD_SOCKET);
        let jail = Jail::new(
            &layout.jails_dir(),
            &fake.bin,
            &spec,
            spec.confinement.as_ref().unwrap(),
        );
        let inside = jail.host_path(&jail.snapshot_inside(&snapshot).memory.to_string_lossy());
        assert!(!inside.exists(), "the memory stays out of the jail");
        // The page server records what the guest touched on its own time (at once for the
        // first pages); the pause keeps what it has recorded by then.
        let record = spec.files.dir.join("uffd-touched");
        let started = std::time::Instant::now();
        while !record.exists() {
            assert!(started.elapsed() < Duration::from_secs(10), "no record");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        vm.pause_to(&snapshot).await.unwrap();
        assert_eq!(
            String::from_utf8(std::fs::read(&snapshot.memory).unwrap()).unwrap(),
            expected,
            "round {round}: the guest's writes are in its snapshot"
        );
        let touched = wrenn::vmm::firecracker::uffd::read_pages(
            &snapshot.dir.join(wrenn::vmm::firecracker::TOUCHED_PAGES),
        );
        assert_eq!(touched, vec![0], "round {round}: the page it touched");
        let served = std::fs::read_to_string(spec.files.dir.join("uffd.log")).unwrap();
        let prefetched = if round == 1 { 0 } else { 1 };
        assert!(
            served.contains(&format!("prefetched={prefetched}")),
            "round {round}: {served}"
        );
    }
}
