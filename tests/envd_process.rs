//! envd processes end to end: a real `wrenn envd` on loopback driven through the typed client.

use std::path::Path;
use std::time::Duration;

use base64::Engine;
use wrenn::envd::api::{
    AttachRequest, ClientMessage, Encoding, InitRequest, ProcessSpec, PtySize, RunRequest,
    StartRequest, REPLAY_BYTES,
};
use wrenn::envd::client::{EnvdClient, ProcessEvent};
use wrenn_test_support::envd::EnvdProcess;

fn envd() -> EnvdProcess {
    EnvdProcess::start(Path::new(env!("CARGO_BIN_EXE_wrenn"))).expect("envd starts")
}

fn run_request(cmd: &str, args: &[&str]) -> RunRequest {
    RunRequest {
        process: ProcessSpec::new(cmd, args),
        timeout_sec: None,
    }
}

fn sh(script: &str) -> ProcessSpec {
    ProcessSpec::new("sh", &["-c", script])
}

fn start(process: ProcessSpec) -> StartRequest {
    StartRequest {
        process,
        tag: None,
        pty: None,
    }
}

async fn next_event(session: &mut wrenn::envd::client::ProcessSession) -> ProcessEvent {
    tokio::time::timeout(Duration::from_secs(30), session.next_event())
        .await
        .expect("an event within 30 s")
        .expect("the session works")
        .expect("the session is open")
}

#[tokio::test]
async fn health_metrics_init_and_envs() {
    let envd = envd();
    let client = envd.client();
    assert_eq!(
        client.health().await.unwrap().version,
        wrenn::version::VERSION
    );
    let metrics = client.metrics().await.unwrap();
    assert!(metrics.mem_total > 0 && metrics.mem_used > 0 && metrics.mem_used < metrics.mem_total);
    assert!(metrics.disk_total > 0 && metrics.cpu_count > 0);

    let init = InitRequest {
        env_vars: [("WRENN_SANDBOX_ID".to_owned(), "cl-123".to_owned())].into(),
        default_workdir: Some("/tmp".into()),
        ..InitRequest::default()
    };
    client.init(&init).await.unwrap();
    assert_eq!(client.envs().await.unwrap()["WRENN_SANDBOX_ID"], "cl-123");
    let out = client
        .run(&run_request(
            "sh",
            &["-c", "echo $WRENN_SANDBOX_ID $(pwd) $HOME"],
        ))
        .await
        .unwrap();
    assert_eq!(out.stdout, "cl-123 /tmp /root\n");

    let bad = InitRequest {
        default_user: Some("no-such-user".into()),
        ..InitRequest::default()
    };
    assert_eq!(
        client
            .init(&bad)
            .await
            .unwrap_err()
            .code()
            .map(|c| c.as_str()),
        Some("not_found")
    );
}

#[tokio::test]
async fn foreground_runs_report_output_exit_and_encoding() {
    let envd = envd();
    let client = envd.client();
    let out = client
        .run(&run_request(
            "sh",
            &["-c", "echo out; echo err >&2; exit 7"],
        ))
        .await
        .unwrap();
    assert_eq!(
        (out.stdout.as_str(), out.stderr.as_str(), out.exit_code),
        ("out\n", "err\n", 7)
    );
    assert_eq!(out.encoding, Encoding::Utf8);

    let binary = client
        .run(&run_request("printf", &["\\377\\000\\001"]))
        .await
        .unwrap();
    assert_eq!(binary.encoding, Encoding::Base64);
    let engine = base64::engine::general_purpose::STANDARD;
    assert_eq!(engine.decode(&binary.stdout).unwrap(), vec![0xff, 0, 1]);
    assert_eq!(binary.stderr, "");

    let mut spec = sh("echo \"$FOO\"; pwd");
    spec.envs.insert("FOO".into(), "bar baz".into());
    spec.cwd = Some("/usr".into());
    let out = client
        .run(&RunRequest {
            process: spec,
            timeout_sec: None,
        })
        .await
        .unwrap();
    assert_eq!(out.stdout, "bar baz\n/usr\n");

    let killed = client
        .run(&run_request("sh", &["-c", "kill -9 $$"]))
        .await
        .unwrap();
    assert_eq!(
        (killed.exit_code, killed.signal.as_deref()),
        (137, Some("SIGKILL"))
    );

    let slow = RunRequest {
        process: ProcessSpec::new("sleep", &["30"]),
        timeout_sec: Some(1),
    };
    let out = client.run(&slow).await.unwrap();
    assert!(out.timed_out);
    assert!(out.duration_ms < 10_000);
}

#[tokio::test]
async fn bad_input_gets_specific_errors_and_envd_keeps_serving() {
    let envd = envd();
    let client = envd.client();
    let code = |r: Result<_, wrenn::envd::client::EnvdClientError>| {
        r.unwrap_err().code().map(|c| c.as_str().to_owned())
    };
    assert_eq!(
        code(
            client
                .run(&run_request("no-such-command-xyz", &[]))
                .await
                .map(drop)
        )
        .as_deref(),
        Some("not_found")
    );
    assert_eq!(
        code(
            client
                .run(&run_request("/no/such/binary", &[]))
                .await
                .map(drop)
        )
        .as_deref(),
        Some("not_found")
    );
    assert_eq!(
        code(client.run(&run_request("", &[])).await.map(drop)).as_deref(),
        Some("invalid_request")
    );
    let mut spec = ProcessSpec::new("true", &[]);
    spec.cwd = Some("/no/such/dir".into());
    let request = RunRequest {
        process: spec,
        timeout_sec: None,
    };
    assert_eq!(
        code(client.run(&request).await.map(drop)).as_deref(),
        Some("invalid_request")
    );
    let mut spec = ProcessSpec::new("true", &[]);
    spec.user = Some("no-such-user".into());
    let request = RunRequest {
        process: spec,
        timeout_sec: None,
    };
    assert_eq!(
        code(client.run(&request).await.map(drop)).as_deref(),
        Some("not_found")
    );

    assert_eq!(
        code(client.signal("999999", "SIGTERM").await).as_deref(),
        Some("not_found")
    );
    assert_eq!(
        code(client.signal("no-such-tag", "SIGTERM").await).as_deref(),
        Some("not_found")
    );
    let started = client
        .start(&start(ProcessSpec::new("true", &[])))
        .await
        .unwrap();
    let mut session = client
        .attach(&AttachRequest::Connect {
            selector: started.tag.clone(),
        })
        .await
        .unwrap();
    session.wait().await.unwrap();
    assert_eq!(
        code(client.signal(&started.tag, "SIGTERM").await).as_deref(),
        Some("conflict")
    );
    let live = client
        .start(&start(ProcessSpec::new("sleep", &["30"])))
        .await
        .unwrap();
    assert_eq!(
        code(client.signal(&live.tag, "SIGBOGUS").await).as_deref(),
        Some("invalid_request")
    );
    assert_eq!(
        code(
            client
                .resize(&live.tag, PtySize { cols: 80, rows: 24 })
                .await
        )
        .as_deref(),
        Some("invalid_request")
    );
    let dup = StartRequest {
        process: ProcessSpec::new("true", &[]),
        tag: Some(live.tag.clone()),
        pty: None,
    };
    assert_eq!(
        code(client.start(&dup).await.map(drop)).as_deref(),
        Some("conflict")
    );
    client.kill(&live.tag, None).await.unwrap();

    // Malformed bodies, at the HTTP level.
    let http = reqwest_like(&envd.url(), "/processes/run", "{not json").await;
    assert_eq!(http.0, 400);
    assert!(http.1.contains("\"invalid_request\""), "{}", http.1);
    let http = reqwest_like(
        &envd.url(),
        "/processes/run",
        r#"{"process":{"cmd":"true","bogus":1}}"#,
    )
    .await;
    assert_eq!(http.0, 400);
    assert!(client.health().await.is_ok());
}

/// A raw POST with a JSON content type, returning status and body.
async fn reqwest_like(base: &str, path: &str, body: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let authority = base.trim_start_matches("http://");
    let mut stream = tokio::net::TcpStream::connect(authority).await.unwrap();
    let request = format!(
        "POST {path} HTTP/1.1\r\nHost: {authority}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let status = response[9..12].parse().unwrap();
    (status, response)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_short_commands() {
    let envd = envd();
    let client = envd.client();
    let mut tasks = Vec::new();
    for worker in 0..4 {
        let client: EnvdClient = client.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..2500 {
                let n = format!("{worker}-{i}");
                let out = client.run(&run_request("echo", &[&n])).await.unwrap();
                assert_eq!(out.stdout, format!("{n}\n"));
                assert_eq!(out.exit_code, 0);
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    assert!(client.list().await.unwrap().is_empty());
}

#[tokio::test]
async fn background_processes_list_signal_and_stream() {
    let envd = envd();
    let client = envd.client();
    let started = client
        .start(&start(ProcessSpec::new("sleep", &["60"])))
        .await
        .unwrap();
    assert!(
        started.tag.starts_with("proc-") && started.tag.len() == 13,
        "{}",
        started.tag
    );
    let tagged = StartRequest {
        process: sh("trap 'echo got-term; exit 3' TERM; echo ready; while :; do sleep 0.05; done"),
        tag: Some("worker".into()),
        pty: None,
    };
    let worker = client.start(&tagged).await.unwrap();
    let list = client.list().await.unwrap();
    assert!(list
        .iter()
        .any(|p| p.pid == started.pid && p.cmd == "sleep" && p.args == ["60"]));
    assert!(list.iter().any(|p| p.tag == "worker"));

    let mut session = client
        .attach(&AttachRequest::Connect {
            selector: "worker".into(),
        })
        .await
        .unwrap();
    assert_eq!(session.pid, worker.pid);
    assert_eq!(
        next_event(&mut session).await,
        ProcessEvent::Stdout("ready\n".into())
    );
    client.signal("worker", "TERM").await.unwrap();
    let (out, _, exit) = session.wait().await.unwrap();
    assert_eq!(String::from_utf8(out).unwrap(), "got-term\n");
    assert_eq!(exit.exit_code, 3);

    client.kill(&started.pid.to_string(), None).await.unwrap();
    let mut session = client
        .attach(&AttachRequest::Connect {
            selector: started.tag.clone(),
        })
        .await
        .unwrap();
    let (_, _, exit) = session.wait().await.unwrap();
    assert_eq!(exit.signal.as_deref(), Some("SIGKILL"));
    assert!(client.list().await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stdin_round_trips_over_the_stream_and_http() {
    let envd = envd();
    let client = envd.client();
    let session = client
        .attach(&AttachRequest::Start(start(ProcessSpec::new("cat", &[]))))
        .await
        .unwrap();
    let (mut input, mut output) = session.split();
    // Far more than any pipe holds, so input and output must flow at the same time.
    let chunk: Vec<u8> = (0..=255u8).cycle().take(64 * 1024).collect();
    let rounds = 256;
    let sender_chunk = chunk.clone();
    let sender = tokio::spawn(async move {
        for _ in 0..rounds {
            input.send_stdin(sender_chunk.clone()).await.unwrap();
        }
        input.send(&ClientMessage::CloseStdin).await.unwrap();
        input
    });
    let mut received = 0usize;
    loop {
        match output.next_event().await.unwrap().unwrap() {
            ProcessEvent::Stdout(data) => {
                let offset = received % chunk.len();
                let expected: Vec<u8> = chunk
                    .iter()
                    .cycle()
                    .skip(offset)
                    .take(data.len())
                    .copied()
                    .collect();
                assert_eq!(&data[..], &expected[..]);
                received += data.len();
            }
            ProcessEvent::Exit(exit) => {
                assert_eq!(exit.exit_code, 0);
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(received, chunk.len() * rounds);
    drop(sender.await.unwrap());

    let cat = client
        .start(&start(ProcessSpec::new("cat", &[])))
        .await
        .unwrap();
    client.write_stdin(&cat.tag, "over http\n").await.unwrap();
    client.close_stdin(&cat.tag).await.unwrap();
    let mut session = client
        .attach(&AttachRequest::Connect {
            selector: cat.tag.clone(),
        })
        .await
        .unwrap();
    let (out, _, _) = session.wait().await.unwrap();
    assert_eq!(out, b"over http\n");
}

/// Checks a stream of `yes PATTERN` output chunk by chunk without keeping it.
struct YesChecker {
    line: Vec<u8>,
    offset: usize,
}

impl YesChecker {
    fn check(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            let at = self.offset % self.line.len();
            let n = (self.line.len() - at).min(data.len());
            assert_eq!(
                &data[..n],
                &self.line[at..at + n],
                "output corrupted at byte {}",
                self.offset
            );
            data = &data[n..];
            self.offset += n;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_gibibyte_of_output_arrives_complete() {
    let envd = envd();
    let client = envd.client();
    const TOTAL: usize = 1 << 30;
    let pattern = "wrenn-envd-0123456789-abcdefghijklmnopqrstuvwxyz";
    let script = format!("yes {pattern} | head -c {TOTAL}");
    let mut session = client
        .attach(&AttachRequest::Start(start(sh(&script))))
        .await
        .unwrap();
    let mut checker = YesChecker {
        line: format!("{pattern}\n").into_bytes(),
        offset: 0,
    };
    loop {
        match next_event(&mut session).await {
            ProcessEvent::Stdout(data) => checker.check(&data),
            ProcessEvent::Exit(exit) => {
                assert_eq!(exit.exit_code, 0);
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(checker.offset, TOTAL);
    let hwm = EnvdProcess::status_kib(envd.pid(), "VmHWM").unwrap();
    assert!(hwm < 64 * 1024, "envd peak RSS {hwm} KiB");
}

#[tokio::test]
async fn reattach_replays_recent_output_and_reports_what_was_lost() {
    let envd = envd();
    let client = envd.client();
    let request = StartRequest {
        process: sh("echo first; read line; echo \"second $line\"; sleep 30"),
        tag: Some("reattach".into()),
        pty: None,
    };
    let mut session = client.attach(&AttachRequest::Start(request)).await.unwrap();
    assert_eq!(
        next_event(&mut session).await,
        ProcessEvent::Stdout("first\n".into())
    );
    session.input.close().await.unwrap();
    drop(session.output);
    client.write_stdin("reattach", "again\n").await.unwrap();

    let mut session = client
        .attach(&AttachRequest::Connect {
            selector: "reattach".into(),
        })
        .await
        .unwrap();
    let mut seen = Vec::new();
    while seen != b"first\nsecond again\n" {
        match next_event(&mut session).await {
            ProcessEvent::Stdout(data) => seen.extend_from_slice(&data),
            other => panic!("unexpected {other:?}"),
        }
    }
    session.send(&ClientMessage::Kill).await.unwrap();
    let (_, _, exit) = session.wait().await.unwrap();
    assert_eq!(exit.signal.as_deref(), Some("SIGKILL"));

    // With nobody attached the process is not held back; a late reader learns the loss.
    let total = 3 * REPLAY_BYTES;
    let noisy = client
        .start(&start(sh(&format!("head -c {total} /dev/zero"))))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut session = client
        .attach(&AttachRequest::Connect {
            selector: noisy.tag,
        })
        .await
        .unwrap();
    let (mut lost, mut data) = (0u64, 0usize);
    loop {
        match next_event(&mut session).await {
            ProcessEvent::Lost(bytes) => lost += bytes,
            ProcessEvent::Stdout(chunk) => data += chunk.len(),
            ProcessEvent::Exit(_) => break,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(lost > 0);
    assert_eq!(lost as usize + data, total);
    assert!(data <= REPLAY_BYTES);
}

async fn read_pty_until(session: &mut wrenn::envd::client::ProcessSession, needle: &str) -> String {
    let mut screen = String::new();
    while !screen.contains(needle) {
        match next_event(session).await {
            ProcessEvent::Pty(data) => screen.push_str(&String::from_utf8_lossy(&data)),
            other => panic!("unexpected {other:?} (screen so far: {screen:?})"),
        }
    }
    screen
}

#[tokio::test]
async fn pty_runs_a_shell_with_typing_resize_and_reattach() {
    let envd = envd();
    let client = envd.client();
    let request = StartRequest {
        process: ProcessSpec::new("bash", &["--norc", "--noprofile", "-i"]),
        tag: None,
        pty: Some(PtySize {
            cols: 100,
            rows: 30,
        }),
    };
    let mut session = client.attach(&AttachRequest::Start(request)).await.unwrap();
    assert!(session.tag.starts_with("pty-"));
    session.send_stdin("stty size; tty\n").await.unwrap();
    let screen = read_pty_until(&mut session, "30 100").await;
    assert!(!screen.contains("not a tty"));
    session
        .send(&ClientMessage::Resize {
            cols: 132,
            rows: 43,
        })
        .await
        .unwrap();
    session.send_stdin("stty size\n").await.unwrap();
    read_pty_until(&mut session, "43 132").await;

    // Disconnect, type blind over HTTP, re-attach and find the output in the replay.
    let tag = session.tag.clone();
    session.input.close().await.unwrap();
    drop(session.output);
    client
        .write_stdin(&tag, "echo after-$((40+2))\n")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut session = client
        .attach(&AttachRequest::Connect {
            selector: tag.clone(),
        })
        .await
        .unwrap();
    read_pty_until(&mut session, "after-42").await;
    client
        .resize(&tag, PtySize { cols: 90, rows: 20 })
        .await
        .unwrap();
    session.send_stdin("stty size; exit 5\n").await.unwrap();
    read_pty_until(&mut session, "20 90").await;
    let (_, _, exit) = session.wait().await.unwrap();
    assert_eq!(exit.exit_code, 5);
}

#[tokio::test]
async fn access_token_is_enforced_once_set() {
    let envd = envd();
    let open = envd.client();
    open.init(&InitRequest {
        access_token: Some(wrenn::secret::SecretText::new("s3cret")),
        ..InitRequest::default()
    })
    .await
    .unwrap();
    let missing = open.health().await.unwrap_err();
    assert_eq!(missing.code().map(|c| c.as_str()), Some("unauthorized"));
    let wrong = envd.client().with_token("wrong");
    assert_eq!(
        wrong
            .run(&run_request("true", &[]))
            .await
            .unwrap_err()
            .code()
            .map(|c| c.as_str()),
        Some("unauthorized")
    );
    let err = wrong
        .attach(&AttachRequest::Start(start(ProcessSpec::new("true", &[]))))
        .await
        .err()
        .unwrap();
    assert_eq!(err.code().map(|c| c.as_str()), Some("unauthorized"));
    let authed = envd.client().with_token("s3cret");
    assert_eq!(
        authed
            .run(&run_request("echo", &["ok"]))
            .await
            .unwrap()
            .stdout,
        "ok\n"
    );
    let mut session = authed
        .attach(&AttachRequest::Start(start(ProcessSpec::new(
            "echo",
            &["ws"],
        ))))
        .await
        .unwrap();
    assert_eq!(session.wait().await.unwrap().0, b"ws\n");
}

#[tokio::test]
async fn envd_records_the_request_id_it_is_sent_in_its_request_span() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("envd.log");
    // envd's log goes to its stderr; a shell sends that to a file the test can read.
    let mut command = std::process::Command::new("sh");
    command
        .args([
            "-c",
            r#"exec "$0" envd --port 0 --address 127.0.0.1 --vsock-port 0 2>"$1""#,
            env!("CARGO_BIN_EXE_wrenn"),
        ])
        .arg(&log)
        .env("RUST_LOG", "wrenn::request_id=debug")
        .env("NO_COLOR", "1");
    let envd = EnvdProcess::start_command(command, "127.0.0.1").expect("envd starts");
    let response = tokio::task::spawn_blocking({
        let url = format!("{}/health", envd.url());
        move || {
            ureq::get(&url)
                .header("x-request-id", "trace-envd-51c2")
                .call()
                .unwrap()
        }
    })
    .await
    .unwrap();
    assert_eq!(response.headers()["x-request-id"], "trace-envd-51c2");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text
            .lines()
            .any(|l| l.contains("request_id=trace-envd-51c2") && l.contains("request finished"))
        {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{text}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_templates_settings_are_the_defaults_and_its_processes_start_at_boot() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("template.json");
    let workdir = dir.path().display().to_string();
    std::fs::write(
        &config,
        serde_json::json!({
            "env": {"FROM_TEMPLATE": "yes"},
            "workdir": workdir,
            "start": [
                {"process": {"cmd": "sh", "args": ["-c", "echo booted > booted; sleep 600"]},
                 "tag": "server"},
                {"process": {"cmd": "/no/such/program"}}
            ]
        })
        .to_string(),
    )
    .unwrap();
    let with_config = || {
        let mut command = EnvdProcess::command(Path::new(env!("CARGO_BIN_EXE_wrenn")));
        command.arg("--template-config").arg(&config);
        command
    };
    let command = with_config();
    let envd = EnvdProcess::start_command(command, "127.0.0.1").expect("envd starts");
    let client = envd.client();

    // Nothing of the template runs before the first /init: a guest saved before it (a boot
    // snapshot many sandboxes restore) must not hold processes all of them would share.
    assert!(client.list().await.unwrap().is_empty());
    client.init(&InitRequest::default()).await.unwrap();

    // The boot process runs under its tag, in the template's working directory; the one that
    // cannot start is left out and envd serves on.
    let tags: Vec<String> = client
        .list()
        .await
        .unwrap()
        .into_iter()
        .map(|p| p.tag)
        .collect();
    assert_eq!(tags, ["server"]);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !dir.path().join("booted").exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "the boot process never ran"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let out = client
        .run(&run_request("sh", &["-c", "echo $FROM_TEMPLATE $(pwd)"]))
        .await
        .unwrap();
    assert_eq!(out.stdout, format!("yes {workdir}\n"));
    // The agent's /init adds to the template's settings.
    let init = InitRequest {
        env_vars: [("LATER".to_owned(), "1".to_owned())].into(),
        ..InitRequest::default()
    };
    client.init(&init).await.unwrap();
    let out = client
        .run(&run_request("sh", &["-c", "echo $FROM_TEMPLATE$LATER"]))
        .await
        .unwrap();
    assert_eq!(out.stdout, "yes1\n");
    client.kill("server", None).await.unwrap();

    // Unusable settings stop envd with the reason, so the sandbox's start fails with it.
    std::fs::write(&config, br#"{"start": "not a list"}"#).unwrap();
    let refused = with_config().output().unwrap();
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("template.json") && stderr.contains("settings"),
        "{stderr}"
    );
}

#[tokio::test]
async fn ports_on_the_loopback_are_reached_through_a_tunnel() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let envd = envd();
    let client = envd.client();
    // A service only the loopback reaches, as a guest's `127.0.0.1` listener.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                while let Ok(n) = socket.read(&mut buf).await {
                    if n == 0 || socket.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    let mut tunnels = Vec::new();
    for i in 0..3 {
        let tunnel = client.connect_port(port).await.unwrap();
        let mut tunnel = hyper_util::rt::TokioIo::new(tunnel);
        let message = format!("hello {i}");
        tunnel.write_all(message.as_bytes()).await.unwrap();
        let mut echoed = vec![0u8; message.len()];
        tunnel.read_exact(&mut echoed).await.unwrap();
        assert_eq!(echoed, message.as_bytes());
        tunnels.push(tunnel);
    }

    // Nothing listens: `port_closed`, and envd serves on.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let closed_port = closed.local_addr().unwrap().port();
    drop(closed);
    match client.connect_port(closed_port).await {
        Err(wrenn::envd::client::EnvdClientError::Api { status, detail }) => {
            assert_eq!(status, 502);
            assert_eq!(detail.code, wrenn::error_code::ErrorCode::PortClosed);
        }
        Err(other) => panic!("{other}"),
        Ok(_) => panic!("a closed port was connected"),
    }
    // A plain request, without the upgrade, and a port that is not one.
    let (status, body) = reqwest_like(&envd.url(), &format!("/ports/{port}/connect"), "").await;
    assert_eq!(status, 400, "{body}");
    let (status, body) = reqwest_like(&envd.url(), "/ports/70000/connect", "").await;
    assert_eq!(status, 400, "{body}");
    client.health().await.unwrap();
}
