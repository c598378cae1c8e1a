//! Guest kernel, initramfs and template images, booted for real under QEMU `microvm` (TCG): the
//! disk contract (read-only base on /dev/vda, sandbox disk on /dev/vdb, overlay root), the
//! network path a host uses to reach envd, envd itself as PID 1, failures that must power the VM off with a message,
//! and reproducible, idempotent and in-place-updatable image builds.
//!
//! Built files live in a files root outside the clone (`$WRENN_TEST_FILES_ROOT`, default
//! /var/tmp/wrenn-test-root) so later runs find them up to date.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use wrenn::config::Layout;
use wrenn::envd::api::{InitRequest, ProcessSpec, RunRequest, RunResponse};
use wrenn::envd::client::EnvdClient;
use wrenn_test_support::guest::{self, GuestSpec, GuestVm};

/// Generous: two cores shared with other TCG guests and compilers. A boot takes 2-5 s alone.
const BOOT_TIMEOUT: Duration = Duration::from_secs(180);

/// The shared files root with the kernel, initramfs, busybox and minimal images built (once per
/// run).
fn files() -> &'static Layout {
    guest::test_files()
}

/// The shared files root with the python image built too (a minute or two when cold:
/// mmdebstrap, with the packages the minimal image already fetched).
fn files_with_python() -> &'static Layout {
    static PYTHON: OnceLock<()> = OnceLock::new();
    let layout = files();
    PYTHON.get_or_init(|| {
        guest::build_image(layout, "python", &guest::static_binary())
            .unwrap_or_else(|e| panic!("{e}"));
    });
    layout
}

/// The shared files root with the code-runner-beta image built too (about a minute when cold:
/// the python Debian tree and the Jupyter wheels).
fn files_with_code_runner() -> &'static Layout {
    static CODE_RUNNER: OnceLock<()> = OnceLock::new();
    let layout = files_with_python();
    CODE_RUNNER.get_or_init(|| {
        guest::build_image(layout, "code-runner-beta", &guest::static_binary())
            .unwrap_or_else(|e| panic!("{e}"));
    });
    layout
}

fn sha256_file(path: &Path) -> String {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    hex::encode(Sha256::digest(bytes))
}

/// One HTTP/1.0 GET to the forwarded port, retried while the guest is still coming up.
fn http_get(port: u16, path: &str, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        let attempt = (|| -> std::io::Result<String> {
            let mut stream = TcpStream::connect(("127.0.0.1", port))?;
            stream.set_read_timeout(Some(Duration::from_secs(10)))?;
            write!(stream, "GET {path} HTTP/1.0\r\nHost: guest\r\n\r\n")?;
            let mut response = String::new();
            stream.read_to_string(&mut response)?;
            Ok(response)
        })();
        match attempt {
            // QEMU accepts forwarded connections before the guest listens, then closes them.
            Ok(response) if response.starts_with("HTTP/") => return response,
            _ if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(200)),
            other => panic!("GET {path} on port {port}: {other:?}"),
        }
    }
}

/// A stand-in for envd: checks the overlay from inside, configures eth0 from `ip=` the way envd
/// does, and serves files from the image on envd's port until the host asks it to power off.
const PROBE_INIT: &str = r#"#!/bin/sh
echo "probe: os=$(sed -n 's/^ID=//p' /etc/os-release)"
echo "written through the overlay" >/etc/overlay-probe && echo "probe: wrote /etc/overlay-probe"
if touch /run/wrenn/lower/etc/probe 2>/dev/null; then echo "probe: base writable"; else echo "probe: base read-only"; fi
grep -q '^overlay / overlay ' /proc/mounts && echo "probe: root is overlay"
grep -q '^/dev/vdb /run/wrenn/upper ' /proc/mounts && echo "probe: sandbox disk at /run/wrenn/upper"
ipconf=$(sed -n 's/.*[[:space:]]ip=\([^[:space:]]*\).*/\1/p' /proc/cmdline)
ip link set lo up
ip link set eth0 up
ifconfig eth0 "$(echo "$ipconf" | cut -d: -f1)" netmask "$(echo "$ipconf" | cut -d: -f4)"
route add default gw "$(echo "$ipconf" | cut -d: -f3)"
mkdir -p /tmp/www/cgi-bin
echo ok >/tmp/www/health
cp /etc/os-release /tmp/www/os-release
printf '#!/bin/sh\nprintf "Content-Type: text/plain\\r\\n\\r\\nbye\\n"\nsync\n(sleep 0.3; poweroff -f) &\n' >/tmp/www/cgi-bin/poweroff
chmod 0755 /tmp/www/cgi-bin/poweroff
echo "probe: serving"
exec httpd -f -p 49983 -h /tmp/www
"#;

#[test]
fn busybox_image_boots_on_an_overlay_of_read_only_base_and_sandbox_disk() {
    let layout = files();
    let base = layout.image_rootfs("busybox");
    let base_before = sha256_file(&base);
    let tmp = tempfile::tempdir().unwrap();
    let disk = guest::sandbox_disk(tmp.path(), Some(PROBE_INIT)).unwrap();
    let port = guest::free_port().unwrap();
    let mut spec = GuestSpec::new(layout);
    spec.base_image = Some(base.clone());
    spec.sandbox_disk = Some(disk.clone());
    spec.forward_port = Some(port);
    spec.extra_cmdline
        .push(format!("wrenn.init={}", guest::TEST_INIT));

    let mut vm = GuestVm::boot(&spec).unwrap();
    vm.wait_for_console("probe: serving", BOOT_TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}"));
    let console = vm.console();
    for line in [
        "probe: os=wrenn-busybox",
        "probe: wrote /etc/overlay-probe",
        "probe: base read-only",
        "probe: root is overlay",
        "probe: sandbox disk at /run/wrenn/upper",
    ] {
        assert!(
            console.contains(line),
            "missing {line:?}; console:\n{console}"
        );
    }

    let health = http_get(port, "/health", Duration::from_secs(60));
    assert!(
        health.starts_with("HTTP/1.1 200") && health.ends_with("\r\n\r\nok\n"),
        "{health}"
    );
    let os_release = http_get(port, "/os-release", Duration::from_secs(10));
    assert!(os_release.contains("ID=wrenn-busybox"), "{os_release}");
    http_get(port, "/cgi-bin/poweroff", Duration::from_secs(10));
    vm.wait_for_exit(BOOT_TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}"));

    guest::recover_journal(&disk).unwrap();
    assert_eq!(
        guest::read_from_ext4(&disk, "/upper/etc/overlay-probe").unwrap(),
        "written through the overlay\n",
        "the write did not land in the sandbox disk's upper layer"
    );
    assert_eq!(sha256_file(&base), base_before, "the base image changed");
    assert!(guest::read_from_ext4(&base, "/etc/overlay-probe")
        .unwrap()
        .is_empty());
}

/// Boots `spec`, expects `message` on the console and the VM to end by itself.
fn assert_fails_and_powers_off(spec: &GuestSpec, message: &str) -> String {
    let mut vm = GuestVm::boot(spec).unwrap();
    vm.wait_for_console(message, BOOT_TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}"));
    vm.wait_for_exit(BOOT_TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}"));
    let console = vm.console();
    assert!(
        console.contains("wrenn-initramfs: powering off"),
        "{console}"
    );
    console
}

#[test]
fn missing_base_disk_powers_off_with_a_message() {
    let spec = GuestSpec::new(files());
    assert_fails_and_powers_off(
        &spec,
        "wrenn-initramfs: FATAL: root disk /dev/vda (the template base image) not found",
    );
}

#[test]
fn corrupt_base_disk_powers_off_with_a_message() {
    let tmp = tempfile::tempdir().unwrap();
    let garbage = tmp.path().join("garbage.ext4");
    std::fs::write(&garbage, vec![0x5a; 16 << 20]).unwrap();
    let mut spec = GuestSpec::new(files());
    spec.base_image = Some(garbage);
    assert_fails_and_powers_off(
        &spec,
        "wrenn-initramfs: FATAL: cannot mount /dev/vda (the template base image) read-only as ext4",
    );
}

#[test]
fn unformatted_sandbox_disk_powers_off_with_a_message() {
    let layout = files();
    let tmp = tempfile::tempdir().unwrap();
    let blank = tmp.path().join("blank.ext4");
    std::fs::File::create(&blank)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let mut spec = GuestSpec::new(layout);
    spec.base_image = Some(layout.image_rootfs("busybox"));
    spec.sandbox_disk = Some(blank);
    assert_fails_and_powers_off(
        &spec,
        "wrenn-initramfs: FATAL: cannot mount /dev/vdb (the sandbox disk) as ext4",
    );
}

#[test]
fn missing_init_program_powers_off_and_no_sandbox_disk_means_tmpfs() {
    let layout = files();
    let mut spec = GuestSpec::new(layout);
    spec.base_image = Some(layout.image_rootfs("busybox"));
    spec.extra_cmdline
        .push("wrenn.init=/usr/local/bin/absent".into());
    let console = assert_fails_and_powers_off(
        &spec,
        "wrenn-initramfs: FATAL: init program /usr/local/bin/absent is missing or not executable",
    );
    assert!(
        console.contains("no sandbox disk /dev/vdb; writes go to memory"),
        "{console}"
    );
}

#[test]
fn image_builds_are_reproducible_and_idempotent() {
    let bin = guest::static_binary();
    let roots = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let mut digests = Vec::new();
    for root in &roots {
        let layout = Layout::new(root.path());
        let log = guest::build_image(&layout, "busybox", &bin).unwrap_or_else(|e| panic!("{e}"));
        assert!(log.contains("done:"), "{log}");
        digests.push(sha256_file(&layout.image_rootfs("busybox")));
    }
    assert_eq!(
        digests[0], digests[1],
        "two builds from the same inputs differ"
    );

    let layout = Layout::new(roots[0].path());
    let again = guest::build_image(&layout, "busybox", &bin).unwrap();
    assert!(again.contains("up to date"), "{again}");
    let meta: serde_json::Value = serde_json::from_slice(
        &std::fs::read(layout.image_dir("busybox").join("meta.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(meta["template"], "busybox");
    assert_eq!(meta["sha256"], digests[0].as_str());
    assert!(
        meta["envd_version"].as_str().unwrap().starts_with("wrenn "),
        "{meta}"
    );
    let passwd = guest::read_from_ext4(&layout.image_rootfs("busybox"), "/etc/passwd").unwrap();
    assert!(passwd.contains("root:x:0:0:"), "{passwd}");
    assert!(
        passwd.contains("user:x:1000:1000:Wrenn sandbox user:/home/user:/bin/sh"),
        "{passwd}"
    );
}

#[test]
fn update_envd_replaces_the_binary_in_place() {
    let layout = files();
    let tmp = tempfile::tempdir().unwrap();
    let image = tmp.path().join("rootfs.ext4");
    std::fs::copy(layout.image_rootfs("busybox"), &image).unwrap();
    // A different but still runnable binary: ELF files ignore trailing bytes.
    let mut new_bin = std::fs::read(guest::static_binary()).unwrap();
    new_bin.extend(std::iter::repeat_n(0xa5u8, 8 << 20));
    let new_bin_path = tmp.path().join("wrenn");
    std::fs::write(&new_bin_path, &new_bin).unwrap();
    Command::new("chmod")
        .arg("0755")
        .arg(&new_bin_path)
        .status()
        .unwrap();

    let log = guest::update_envd(&image, &new_bin_path).unwrap_or_else(|e| panic!("{e}"));
    assert!(log.contains("done:"), "{log}");
    let dumped = tmp.path().join("dumped");
    let status = Command::new("debugfs")
        .args([
            "-R",
            &format!("dump -p /usr/local/bin/wrenn {}", dumped.display()),
        ])
        .arg(&image)
        .output()
        .unwrap();
    assert!(status.status.success());
    assert_eq!(
        std::fs::read(&dumped).unwrap(),
        new_bin,
        "the image holds another binary"
    );
    let fsck = Command::new("e2fsck")
        .arg("-fn")
        .arg(&image)
        .output()
        .unwrap();
    assert!(
        fsck.status.success(),
        "{}",
        String::from_utf8_lossy(&fsck.stdout)
    );
}

/// A guest booted the production way: envd as PID 1 of the overlay root, reached through a
/// forwarded port, with a fresh sandbox disk.
struct EnvdGuest {
    vm: GuestVm,
    client: EnvdClient,
    disk: PathBuf,
    runtime: tokio::runtime::Runtime,
    dir: tempfile::TempDir,
}

impl EnvdGuest {
    fn boot(layout: &Layout, template: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let disk = guest::sandbox_disk(dir.path(), None).unwrap();
        let port = guest::free_port().unwrap();
        let mut spec = GuestSpec::new(layout);
        spec.base_image = Some(layout.image_rootfs(template));
        spec.sandbox_disk = Some(disk.clone());
        spec.forward_port = Some(port);
        let vm = GuestVm::boot(&spec).unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let client = EnvdClient::new(&format!("http://127.0.0.1:{port}")).unwrap();
        let deadline = Instant::now() + BOOT_TIMEOUT;
        // QEMU accepts forwarded connections before envd listens and then drops them.
        while runtime.block_on(client.health()).is_err() {
            assert!(
                Instant::now() < deadline,
                "envd never answered; console:\n{}",
                vm.console()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        // As the agent does first: the template's processes start with the first /init.
        runtime
            .block_on(client.init(&InitRequest::default()))
            .unwrap_or_else(|e| panic!("/init: {e}; console:\n{}", vm.console()));
        Self {
            vm,
            client,
            disk,
            runtime,
            dir,
        }
    }

    fn run(&self, user: Option<&str>, cmd: &str, args: &[&str]) -> RunResponse {
        let mut process = ProcessSpec::new(cmd, args);
        process.user = user.map(str::to_owned);
        let request = RunRequest {
            process,
            timeout_sec: Some(300),
        };
        let response = self.runtime.block_on(self.client.run(&request));
        let response = response.unwrap_or_else(|e| panic!("{cmd} {args:?}: {e}"));
        assert_eq!(response.exit_code, 0, "{cmd} {args:?}: {response:?}");
        response
    }

    /// envd's shutdown: stops processes, syncs, powers off; QEMU exits. Returns the sandbox
    /// disk with its journal replayed, and the directory that keeps it.
    fn shut_down(mut self) -> (PathBuf, tempfile::TempDir) {
        self.runtime.block_on(self.client.shutdown()).unwrap();
        self.vm
            .wait_for_exit(BOOT_TIMEOUT)
            .unwrap_or_else(|e| panic!("{e}"));
        guest::recover_journal(&self.disk).unwrap();
        (self.disk, self.dir)
    }
}

#[test]
fn envd_starts_in_the_busybox_image_and_runs_commands_on_the_overlay() {
    let layout = files();
    let guest = EnvdGuest::boot(layout, "busybox");
    assert!(
        guest
            .vm
            .console()
            .contains("wrenn-initramfs: starting /usr/local/bin/wrenn envd"),
        "{}",
        guest.vm.console()
    );
    let os_release = guest.run(None, "cat", &["/etc/os-release"]);
    assert!(
        os_release.stdout.contains("ID=wrenn-busybox"),
        "{os_release:?}"
    );
    let whoami = guest.run(Some("user"), "sh", &["-c", "id -un; pwd; echo kept >note"]);
    assert_eq!(whoami.stdout, "user\n/home/user\n", "{whoami:?}");
    let mounts = guest.run(None, "cat", &["/proc/mounts"]);
    for mount in [
        "overlay / overlay",
        "/dev/vda /run/wrenn/lower ext4 ro",
        "/dev/vdb /run/wrenn/upper",
    ] {
        assert!(
            mounts.stdout.contains(mount),
            "no {mount:?} in {}",
            mounts.stdout
        );
    }
    let (disk, _dir) = guest.shut_down();
    assert_eq!(
        guest::read_from_ext4(&disk, "/upper/home/user/note").unwrap(),
        "kept\n"
    );
}

#[test]
fn minimal_image_is_debian_with_a_shell_git_and_sudo_for_user() {
    let layout = files();
    let guest = EnvdGuest::boot(layout, "minimal");
    let os_release = guest.run(None, "cat", &["/etc/os-release"]);
    assert!(
        os_release.stdout.contains("VERSION_CODENAME=bookworm"),
        "{os_release:?}"
    );
    // What the SDKs reach for: a login bash (the PTY's default shell), git, curl, and the
    // tools of a Debian machine; `user` may sudo without a password.
    let tools = guest.run(
        Some("user"),
        "bash",
        &[
            "-lc",
            "echo $SHELL; git --version && curl --version | head -n1 && ps -p $$ -o comm= && \
             ip -V && tar --version | head -n1 && xz --version | head -n1 && \
             echo hi | gzip | gunzip && less --version | head -n1 && sudo -n id -un",
        ],
    );
    for expected in [
        "git version 2.",
        "curl 7.",
        "bash\n",
        "ip utility",
        "tar (GNU tar)",
        "xz (XZ Utils)",
        "hi\n",
        "less ",
        "root\n",
    ] {
        assert!(tools.stdout.contains(expected), "{expected:?}: {tools:?}");
    }
    let passwd = guest.run(None, "getent", &["passwd", "user"]);
    assert_eq!(
        passwd.stdout,
        "user:x:1000:1000:Wrenn sandbox user:/home/user:/bin/bash\n"
    );
    guest.shut_down();
}

#[test]
fn python_image_runs_python_through_envd() {
    let layout = files_with_python();
    let guest = EnvdGuest::boot(layout, "python");
    let python = guest.run(
        Some("user"),
        "python3",
        &[
            "-c",
            "import platform, ssl, sqlite3, os; print(platform.python_version(), os.getcwd())",
        ],
    );
    assert!(python.stdout.starts_with("3.11."), "{python:?}");
    assert!(python.stdout.ends_with(" /home/user\n"), "{python:?}");
    let tools = guest.run(
        None,
        "bash",
        &[
            "-c",
            "git --version && python3 -V && python3 -m pip --version && python3 -m venv /tmp/v && \
             sudo -n true && curl --version",
        ],
    );
    assert!(tools.stdout.contains("git version 2."), "{tools:?}");
    assert!(tools.stdout.contains("pip 23"), "{tools:?}");
    guest.shut_down();
}

/// What the SDK's code runner does, from inside the guest: find the `wrenn` kernelspec on the
/// Jupyter server envd started at boot, start a kernel of it through the server and run code
/// over the kernel's WebSocket.
const KERNEL_CHECK: &str = r#"
import json, time, urllib.request, uuid
import websocket

base = "http://127.0.0.1:8888"
deadline = time.time() + 240
while True:
    try:
        specs = json.load(urllib.request.urlopen(base + "/api/kernelspecs", timeout=10))
        break
    except OSError:
        if time.time() > deadline:
            raise
        time.sleep(0.5)
assert "wrenn" in specs["kernelspecs"], specs
request = urllib.request.Request(
    base + "/api/kernels", data=json.dumps({"name": "wrenn"}).encode(),
    headers={"Content-Type": "application/json"}, method="POST")
kernel = json.load(urllib.request.urlopen(request, timeout=120))
ws = websocket.create_connection(
    "ws://127.0.0.1:8888/api/kernels/%s/channels" % kernel["id"], timeout=240)
msg_id = uuid.uuid4().hex
ws.send(json.dumps({
    "header": {"msg_id": msg_id, "username": "check", "session": uuid.uuid4().hex,
               "msg_type": "execute_request", "version": "5.3", "date": ""},
    "parent_header": {}, "metadata": {}, "channel": "shell", "buffers": [],
    "content": {"code": "print(6 * 7)", "silent": False, "store_history": False,
                "user_expressions": {}, "allow_stdin": False, "stop_on_error": True}}))
while True:
    message = json.loads(ws.recv())
    if message.get("parent_header", {}).get("msg_id") != msg_id:
        continue
    if message["msg_type"] == "stream":
        print("kernel says", message["content"]["text"].strip())
    if message["msg_type"] == "status" and message["content"]["execution_state"] == "idle":
        break
"#;

#[test]
fn code_runner_image_serves_a_wrenn_jupyter_kernel_started_at_boot() {
    let layout = files_with_code_runner();
    let guest = EnvdGuest::boot(layout, "code-runner-beta");
    let processes = guest.runtime.block_on(guest.client.list()).unwrap();
    assert!(
        processes.iter().any(|p| p.tag == "jupyter"),
        "{processes:?}; console:\n{}",
        guest.vm.console()
    );
    let check = guest.run(Some("user"), "python3", &["-c", KERNEL_CHECK]);
    assert!(check.stdout.contains("kernel says 42"), "{check:?}");
    guest.shut_down();
}
