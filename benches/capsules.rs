//! Capsule figures through the control plane: create latency split into control-plane overhead
//! and agent time (from the create response's `Server-Timing: agent;dur=` header), foreground
//! exec round trip p50/p99 through the control plane beside the same call made without it, and
//! file upload/download throughput (into the guest's `/tmp`, a tmpfs) the same two ways.
//!
//! `cargo bench --bench capsules` runs one of two stacks:
//!
//! - A deployed stack, when `WRENN_BENCH_CP_URL` (e.g. `http://cp:8000`) and
//!   `WRENN_BENCH_API_KEY` (`wrn_...`) are set. Optional: `WRENN_BENCH_TEMPLATE` (default
//!   `minimal`); `WRENN_BENCH_ENVD_URL` (envd of the created capsule as this machine reaches it;
//!   default `http://<guest_ip>:49983`, reachable on the agent's host) with
//!   `WRENN_BENCH_ENVD_TOKEN` (envd's access token) for straight-to-envd figures (a deployed
//!   agent's proxy takes only the control plane's client certificate, so it is not measured
//!   alone). Each comparison is skipped, saying why, when its endpoint does not answer `/health`.
//! - Otherwise, as root, a local stack of real parts: a private PostgreSQL, `wrenn cp serve` as
//!   its own process (so its peak memory is its own and is printed), a registered `wrenn agent`
//!   and QEMU/TCG microVMs from the shared test images. The agent keeps each sandbox's envd
//!   access token in memory only, so the local comparison is the agent's envd proxy
//!   (`/v1/sandboxes/{id}/envd/...` with the agent secret): the difference from the
//!   through-the-CP figure is the control plane's hop, and the agent proxy's own hop is included
//!   in both.
//!
//! Sizes: `WRENN_BENCH_CREATES` (default 10), `WRENN_BENCH_EXECS` (default 300) and
//! `WRENN_BENCH_FILE_MB` (default 64).

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper::{Method, Request, StatusCode};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};

type Body = UnsyncBoxBody<Bytes, std::io::Error>;

fn setting(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

fn number(name: &str, default: usize) -> usize {
    setting(name)
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

struct Http {
    client: Client<hyper_rustls::HttpsConnector<HttpConnector>, Body>,
}

impl Http {
    /// Plain HTTP to the control plane and envd; `https://` (the agent) with `tls`.
    fn new(tls: std::sync::Arc<rustls::ClientConfig>) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.enforce_http(false);
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config((*tls).clone())
            .https_or_http()
            .enable_http1()
            .wrap_connector(connector);
        Self {
            client: Client::builder(TokioExecutor::new()).build(connector),
        }
    }

    fn full(bytes: impl Into<Bytes>) -> Body {
        Full::new(bytes.into())
            .map_err(|never| match never {})
            .boxed_unsync()
    }

    async fn send(
        &self,
        method: Method,
        url: &str,
        headers: &[(&str, String)],
        body: Body,
    ) -> (StatusCode, hyper::HeaderMap, Bytes) {
        let mut request = Request::builder().method(method).uri(url);
        for (name, value) in headers {
            request = request.header(*name, value);
        }
        let response = self
            .client
            .request(request.body(body).unwrap())
            .await
            .unwrap_or_else(|e| panic!("{url}: {e}"));
        let (parts, body) = response.into_parts();
        let bytes = body.collect().await.unwrap().to_bytes();
        (parts.status, parts.headers, bytes)
    }

    async fn json(
        &self,
        method: Method,
        url: &str,
        headers: &[(&str, String)],
        body: &Value,
    ) -> (StatusCode, hyper::HeaderMap, Value) {
        let mut headers = headers.to_vec();
        headers.push(("content-type", "application/json".into()));
        let (status, map, bytes) = self
            .send(
                method,
                url,
                &headers,
                Self::full(serde_json::to_vec(body).unwrap()),
            )
            .await;
        (
            status,
            map,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }
}

/// A body of `size` bytes made on the fly, in 64 KiB chunks, optionally wrapped as a multipart
/// `path` + `file` form.
fn generated(size: usize, multipart_path: Option<&str>) -> (Body, Option<String>) {
    const BOUNDARY: &str = "wrenn-bench-boundary";
    let chunk = Bytes::from(vec![0x5au8; 64 << 10]);
    let chunks = size.div_ceil(chunk.len());
    let last = size - (chunks.saturating_sub(1)) * chunk.len();
    let data = futures::stream::iter((0..chunks).map(move |i| {
        Ok::<_, std::io::Error>(if i + 1 == chunks {
            chunk.slice(..last)
        } else {
            chunk.clone()
        })
    }));
    match multipart_path {
        None => (
            StreamBody::new(data.map(|c| c.map(Frame::data))).boxed_unsync(),
            None,
        ),
        Some(path) => {
            let head = Bytes::from(format!(
                "--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"path\"\r\n\r\n{path}\r\n\
                 --{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"f\"\r\n\
                 Content-Type: application/octet-stream\r\n\r\n"
            ));
            let tail = Bytes::from(format!("\r\n--{BOUNDARY}--\r\n"));
            let stream = futures::stream::once(async move { Ok(head) })
                .chain(data)
                .chain(futures::stream::once(async move { Ok(tail) }));
            (
                StreamBody::new(stream.map(|c| c.map(Frame::data))).boxed_unsync(),
                Some(format!("multipart/form-data; boundary={BOUNDARY}")),
            )
        }
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// A way to reach a capsule's envd API without the control plane.
struct Bypass {
    /// What the figures measure, as printed.
    label: &'static str,
    /// The prefix to which envd paths (`/processes/run`, `/files`) are appended.
    base: String,
    headers: Vec<(&'static str, String)>,
}

impl Bypass {
    fn agent_proxy(agent_url: &str, id: &str, secret: &str) -> Self {
        Self {
            label: "agent proxy only",
            base: format!("{}/v1/sandboxes/{id}/envd", agent_url.trim_end_matches('/')),
            headers: vec![("authorization", format!("Bearer {secret}"))],
        }
    }

    fn envd(url: &str, token: Option<&str>) -> Self {
        Self {
            label: "straight to envd",
            base: url.trim_end_matches('/').to_owned(),
            headers: token
                .map(|t| ("x-access-token", t.to_owned()))
                .into_iter()
                .collect(),
        }
    }
}

/// The comparisons available for a capsule, given its ID and its API representation.
type Bypasses = Box<dyn Fn(&str, &Value) -> Vec<Bypass>>;

/// The control plane to measure and the ways around it.
struct Target {
    cp_url: String,
    api_key: String,
    template: String,
    bypasses: Bypasses,
    /// Processes whose peak memory is printed at the end.
    processes: Vec<(&'static str, u32)>,
    /// The control plane's client identity, which the agent's proxy requires (local stack only).
    agent_tls: Option<std::sync::Arc<rustls::ClientConfig>>,
}

/// The parts of the local stack, kept alive while it is measured.
struct LocalStack {
    cp: support::TestCp,
    agent: support::agent::Agent,
    replica: support::CpReplica,
}

async fn local_stack() -> (Target, LocalStack) {
    let (cp, agent, _, admin) = support::agent::stack().await;
    let (status, key) = cp
        .call(
            Method::POST,
            "/v1/api-keys",
            &admin,
            Some(json!({"name": "bench"})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{key}");
    let replica = support::CpReplica::start(&cp).await;
    let (agent_url, secret) = (agent.url(""), agent.secret.clone());
    let target = Target {
        cp_url: format!("http://{}", replica.addr),
        api_key: key["key"].as_str().unwrap().to_owned(),
        template: "minimal".into(),
        bypasses: Box::new(move |id, _| vec![Bypass::agent_proxy(&agent_url, id, &secret)]),
        processes: vec![
            ("control plane", replica.pid()),
            ("agent", agent.child.as_ref().unwrap().id()),
        ],
        agent_tls: Some(agent.tls.rustls()),
    };
    (target, LocalStack { cp, agent, replica })
}

fn deployed_stack(cp_url: String, api_key: String) -> Target {
    let envd_url = setting("WRENN_BENCH_ENVD_URL");
    let envd_token = setting("WRENN_BENCH_ENVD_TOKEN");
    Target {
        cp_url: cp_url.trim_end_matches('/').to_owned(),
        api_key,
        template: setting("WRENN_BENCH_TEMPLATE").unwrap_or_else(|| "minimal".into()),
        bypasses: Box::new(move |_, capsule| {
            let mut bypasses = Vec::new();
            let envd = envd_url.clone().or_else(|| {
                capsule["guest_ip"]
                    .as_str()
                    .map(|ip| format!("http://{ip}:49983"))
            });
            if let Some(url) = envd {
                bypasses.push(Bypass::envd(&url, envd_token.as_deref()));
            }
            bypasses
        }),
        processes: Vec::new(),
        agent_tls: None,
    }
}

fn server_timing_agent(headers: &hyper::HeaderMap) -> Option<Duration> {
    let value = headers.get("server-timing")?.to_str().ok()?;
    let dur = value
        .split(';')
        .find_map(|p| p.trim().strip_prefix("dur="))?;
    Some(Duration::from_secs_f64(dur.parse::<f64>().ok()? / 1000.0))
}

fn print_latencies(label: &str, mut values: Vec<Duration>) {
    values.sort();
    println!(
        "  {label:<16} p50 {:9.2} ms   p99 {:9.2} ms",
        ms(percentile(&values, 0.5)),
        ms(percentile(&values, 0.99))
    );
}

/// Creates capsules one after another, printing the latency split, and keeps the last one.
async fn create_figures(http: &Http, target: &Target, key: &[(&str, String)]) -> Value {
    let cp = &target.cp_url;
    let creates = number("WRENN_BENCH_CREATES", 10).max(1);
    let (mut totals, mut agents, mut overheads) = (Vec::new(), Vec::new(), Vec::new());
    let mut kept = Value::Null;
    for i in 0..creates {
        let started = Instant::now();
        let (status, headers, capsule) = http
            .json(
                Method::POST,
                &format!("{cp}/v1/capsules"),
                key,
                &json!({"template": target.template}),
            )
            .await;
        let total = started.elapsed();
        assert_eq!(status, StatusCode::CREATED, "create: {capsule}");
        let agent = server_timing_agent(&headers).unwrap_or_default();
        totals.push(total);
        agents.push(agent);
        overheads.push(total.saturating_sub(agent));
        if i + 1 == creates {
            kept = capsule;
        } else {
            let id = capsule["id"].as_str().unwrap();
            let (status, _, _) = http
                .send(
                    Method::DELETE,
                    &format!("{cp}/v1/capsules/{id}"),
                    key,
                    Http::full(Bytes::new()),
                )
                .await;
            assert!(status.is_success(), "delete {id}: {status}");
        }
    }
    println!("capsule create ({creates} sequential)");
    print_latencies("total", totals);
    print_latencies("agent", agents);
    print_latencies("control plane", overheads);
    kept
}

/// The bypasses whose `/health` answers; says why each other one is skipped.
async fn reachable(http: &Http, bypasses: Vec<Bypass>) -> Vec<Bypass> {
    let mut usable = Vec::new();
    for bypass in bypasses {
        let mut probe = Request::builder().uri(format!("{}/health", bypass.base));
        for (name, value) in &bypass.headers {
            probe = probe.header(*name, value);
        }
        let probe = probe.body(Http::full(Bytes::new())).unwrap();
        match tokio::time::timeout(Duration::from_secs(3), http.client.request(probe)).await {
            Ok(Ok(r)) if r.status().is_success() => usable.push(bypass),
            Ok(Ok(r)) => println!(
                "({} at {} answers {}: its figures are skipped)",
                bypass.label,
                bypass.base,
                r.status()
            ),
            Ok(Err(e)) => println!(
                "({} at {} is not reachable from here ({e}): its figures are skipped)",
                bypass.label, bypass.base
            ),
            Err(_) => println!(
                "({} at {} did not answer within 3 s: its figures are skipped)",
                bypass.label, bypass.base
            ),
        }
    }
    usable
}

/// Foreground `/bin/true` round trips; the routes take turns so that load from elsewhere on the
/// machine falls on all of them alike.
async fn exec_figures(
    http: &Http,
    target: &Target,
    key: &[(&str, String)],
    id: &str,
    bypasses: &[Bypass],
) {
    let execs = number("WRENN_BENCH_EXECS", 300).max(1);
    let mut through = Vec::with_capacity(execs);
    let mut around = vec![Vec::with_capacity(execs); bypasses.len()];
    for _ in 0..execs {
        let started = Instant::now();
        let (status, _, out) = http
            .json(
                Method::POST,
                &format!("{}/v1/capsules/{id}/exec", target.cp_url),
                key,
                &json!({"cmd": "/bin/true"}),
            )
            .await;
        through.push(started.elapsed());
        assert_eq!(status, StatusCode::OK, "exec: {out}");
        for (bypass, times) in bypasses.iter().zip(&mut around) {
            let started = Instant::now();
            let (status, _, out) = http
                .json(
                    Method::POST,
                    &format!("{}/processes/run", bypass.base),
                    &bypass.headers,
                    &json!({"process": {"cmd": "/bin/true"}}),
                )
                .await;
            times.push(started.elapsed());
            assert_eq!(status, StatusCode::OK, "{}: run: {out}", bypass.label);
        }
    }
    println!("exec /bin/true round trip ({execs} sequential)");
    print_latencies("through the CP", through);
    for (bypass, times) in bypasses.iter().zip(around) {
        print_latencies(bypass.label, times);
    }
}

async fn file_figures(
    http: &Http,
    target: &Target,
    key: &[(&str, String)],
    id: &str,
    bypasses: &[Bypass],
) {
    let cp = &target.cp_url;
    let mib = number("WRENN_BENCH_FILE_MB", 64).max(1);
    let size = mib << 20;
    let rate = |d: Duration| mib as f64 / d.as_secs_f64();
    let print = |label: &str, up: Duration, down: Duration| {
        println!(
            "  {label:<16} upload {:8.1} MiB/s   download {:8.1} MiB/s",
            rate(up),
            rate(down)
        )
    };
    println!("file transfer ({mib} MiB each way)");

    let path = "/tmp/wrenn-bench.bin";
    let (body, content_type) = generated(size, Some(path));
    let mut headers = key.to_vec();
    headers.push(("content-type", content_type.unwrap()));
    let started = Instant::now();
    let (status, _, answer) = http
        .send(
            Method::POST,
            &format!("{cp}/v1/capsules/{id}/files/stream/write"),
            &headers,
            body,
        )
        .await;
    let up = started.elapsed();
    assert_eq!(status, StatusCode::NO_CONTENT, "upload: {answer:?}");
    let mut headers = key.to_vec();
    headers.push(("content-type", "application/json".into()));
    let started = Instant::now();
    let (status, _, data) = http
        .send(
            Method::POST,
            &format!("{cp}/v1/capsules/{id}/files/stream/read"),
            &headers,
            Http::full(serde_json::to_vec(&json!({"path": path})).unwrap()),
        )
        .await;
    let down = started.elapsed();
    assert_eq!((status, data.len()), (StatusCode::OK, size));
    print("through the CP", up, down);

    for bypass in bypasses {
        let url = format!("{}/files?path=%2Ftmp%2Fwrenn-bench-bypass.bin", bypass.base);
        let (body, _) = generated(size, None);
        let started = Instant::now();
        let (status, _, answer) = http.send(Method::PUT, &url, &bypass.headers, body).await;
        let up = started.elapsed();
        assert!(status.is_success(), "{}: upload: {answer:?}", bypass.label);
        let started = Instant::now();
        let (status, _, data) = http
            .send(Method::GET, &url, &bypass.headers, Http::full(Bytes::new()))
            .await;
        let down = started.elapsed();
        assert_eq!(
            (status, data.len()),
            (StatusCode::OK, size),
            "{}",
            bypass.label
        );
        print(bypass.label, up, down);
    }
}

async fn bench(target: &Target) {
    let tls = target
        .agent_tls
        .clone()
        .unwrap_or_else(wrenn::tls::trust_nothing);
    let http = Http::new(tls);
    let key = vec![("x-api-key", target.api_key.clone())];
    let capsule = create_figures(&http, target, &key).await;
    let id = capsule["id"].as_str().unwrap().to_owned();
    let bypasses = reachable(&http, (target.bypasses)(&id, &capsule)).await;
    exec_figures(&http, target, &key, &id, &bypasses).await;
    file_figures(&http, target, &key, &id, &bypasses).await;
    if !target.processes.is_empty() {
        println!("peak resident memory over the run");
        for (name, pid) in &target.processes {
            println!(
                "  {name:<16} {:8.1} MiB",
                support::agent::peak_rss_kib(*pid) as f64 / 1024.0
            );
        }
    }
    let (status, _, _) = http
        .send(
            Method::DELETE,
            &format!("{}/v1/capsules/{id}", target.cp_url),
            &key,
            Http::full(Bytes::new()),
        )
        .await;
    assert!(status.is_success(), "delete {id}: {status}");
}

fn main() {
    // `cargo test --all-targets` runs benchmarks too, without `--bench`: measure nothing then.
    if !std::env::args().any(|a| a == "--bench") {
        println!("capsules benchmark: run it with `cargo bench --bench capsules`");
        return;
    }
    let deployed = setting("WRENN_BENCH_CP_URL").zip(setting("WRENN_BENCH_API_KEY"));
    if deployed.is_none() && !nix::unistd::geteuid().is_root() {
        println!("capsules benchmark: the local stack boots VMs and needs root; skipped");
        return;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        match deployed {
            Some((url, key)) => {
                println!("# deployed stack at {url}");
                bench(&deployed_stack(url, key)).await;
            }
            None => {
                println!(
                    "# local stack: `wrenn cp serve`, `wrenn agent`, QEMU/TCG microVMs \
                     (1 vCPU, 512 MiB), {} host CPUs",
                    std::thread::available_parallelism().map_or(0, |n| n.get())
                );
                let (target, stack) = local_stack().await;
                bench(&target).await;
                drop(stack.replica);
                support::agent::wait_clean(&stack.agent);
                drop(stack.agent);
                stack.cp.stop().await;
            }
        }
    });
}
