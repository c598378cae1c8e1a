//! Capsule figures through the control plane: create latency split into control-plane overhead
//! and agent time (from the create response's `Server-Timing: agent;dur=` header), foreground
//! exec round trip p50/p99 through the control plane beside the same call straight to envd, and
//! file upload/download throughput through the control plane beside straight to envd.
//!
//! `cargo bench --bench capsules` runs one of two stacks:
//!
//! - A real stack, when `WRENN_BENCH_CP_URL` (e.g. `http://cp:8000`) and `WRENN_BENCH_API_KEY`
//!   (`wrn_...`) are set. Optional: `WRENN_BENCH_TEMPLATE` (default `minimal`),
//!   `WRENN_BENCH_ENVD_URL` (envd of the created capsule as this machine reaches it; default
//!   `http://<guest_ip>:49983`, reachable on the agent's host) and `WRENN_BENCH_ENVD_TOKEN`
//!   (envd's access token, if one is set). Direct-to-envd figures are skipped when envd cannot
//!   be reached.
//! - Otherwise a local stack: a private PostgreSQL, the control plane in-process, and the agent
//!   test double of `tests/support/agent_double.rs` whose sandboxes are real `wrenn envd`
//!   processes. Its create figures measure only the control plane and the double; exec and file
//!   figures show the cost of the two extra hops (control plane and agent proxy) on loopback.
//!
//! Sizes: `WRENN_BENCH_CREATES` (default 10), `WRENN_BENCH_EXECS` (default 300) and
//! `WRENN_BENCH_FILE_MB` (default 64).

#[path = "../tests/support/agent_double.rs"]
#[allow(dead_code)]
mod agent_double;

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
    client: Client<HttpConnector, Body>,
}

impl Http {
    fn new() -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
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

/// Where a capsule's envd can be reached directly, given its ID and its API representation.
type DirectEnvd = Box<dyn Fn(&str, &Value) -> Option<String>>;

/// The control plane to measure, and how to reach envd directly for a capsule.
struct Target {
    cp_url: String,
    api_key: String,
    template: String,
    envd_token: Option<String>,
    direct_envd: DirectEnvd,
}

struct LocalStack {
    _pg: wrenn::testing::pg::PgCluster,
    double: std::sync::Arc<agent_double::AgentDouble>,
}

async fn local_stack() -> (Target, LocalStack) {
    use wrenn::cp::state::AppState;
    use wrenn::cp::tokens::TokenKeys;
    let pg = tokio::task::spawn_blocking(wrenn::testing::pg::PgCluster::start)
        .await
        .unwrap()
        .expect("postgres starts");
    let db = wrenn::db::connect_lazy(&pg.url()).unwrap();
    wrenn::db::migrate::up(&db).await.expect("migrations apply");
    let state = AppState::new(db, TokenKeys::new(&[42u8; 32]).unwrap());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let cp_url = format!("http://{}", listener.local_addr().unwrap());
    let monitor = wrenn::cp::monitor::MonitorSettings {
        interval: Duration::from_secs(3600),
        unreachable_after: Duration::from_secs(3600),
    };
    tokio::spawn(async move {
        wrenn::cp::run(listener, state, monitor, std::future::pending())
            .await
            .expect("control plane runs")
    });
    let http = Http::new();
    let (status, _, admin) = http
        .json(
            Method::POST,
            &format!("{cp_url}/v1/auth/signup"),
            &[],
            &json!({"email": "bench@example.com", "password": "correct horse battery", "name": "Bench"}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{admin}");
    let jwt = vec![(
        "authorization",
        format!("Bearer {}", admin["token"].as_str().unwrap()),
    )];
    let double = std::sync::Arc::new(agent_double::AgentDouble::start().await);
    let (_, _, host) = http
        .json(
            Method::POST,
            &format!("{cp_url}/v1/hosts"),
            &jwt,
            &json!({"type": "regular"}),
        )
        .await;
    let (status, _, creds) = http
        .json(
            Method::POST,
            &format!("{cp_url}/v1/hosts/register"),
            &[],
            &json!({"token": host["registration_token"], "arch": "x86_64", "cpu_cores": 64,
                    "memory_mb": 1 << 20, "disk_gb": 10_000, "address": double.address()}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{creds}");
    double.set_secret(creds["agent_secret"].as_str().unwrap());
    let (_, _, key) = http
        .json(
            Method::POST,
            &format!("{cp_url}/v1/api-keys"),
            &jwt,
            &json!({"name": "bench"}),
        )
        .await;
    let lookup = double.clone();
    let target = Target {
        cp_url,
        api_key: key["key"].as_str().unwrap().to_owned(),
        template: "minimal".into(),
        envd_token: None,
        direct_envd: Box::new(move |id, _| lookup.envd_url(id)),
    };
    (target, LocalStack { _pg: pg, double })
}

fn real_stack(cp_url: String, api_key: String) -> Target {
    let fixed = setting("WRENN_BENCH_ENVD_URL");
    Target {
        cp_url: cp_url.trim_end_matches('/').to_owned(),
        api_key,
        template: setting("WRENN_BENCH_TEMPLATE").unwrap_or_else(|| "minimal".into()),
        envd_token: setting("WRENN_BENCH_ENVD_TOKEN"),
        direct_envd: Box::new(move |_, capsule| {
            fixed.clone().or_else(|| {
                capsule["guest_ip"]
                    .as_str()
                    .map(|ip| format!("http://{ip}:49983"))
            })
        }),
    }
}

fn server_timing_agent(headers: &hyper::HeaderMap) -> Option<Duration> {
    let value = headers.get("server-timing")?.to_str().ok()?;
    let dur = value
        .split(';')
        .find_map(|p| p.trim().strip_prefix("dur="))?;
    Some(Duration::from_secs_f64(dur.parse::<f64>().ok()? / 1000.0))
}

async fn bench(target: Target) {
    let http = Http::new();
    let key = vec![("x-api-key", target.api_key.clone())];
    let cp = &target.cp_url;

    // Create latency.
    let creates = number("WRENN_BENCH_CREATES", 10).max(1);
    let (mut totals, mut agents, mut overheads) = (Vec::new(), Vec::new(), Vec::new());
    let mut kept: Option<Value> = None;
    for i in 0..creates {
        let started = Instant::now();
        let (status, headers, capsule) = http
            .json(
                Method::POST,
                &format!("{cp}/v1/capsules"),
                &key,
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
            kept = Some(capsule);
        } else {
            let id = capsule["id"].as_str().unwrap();
            http.send(
                Method::DELETE,
                &format!("{cp}/v1/capsules/{id}"),
                &key,
                Http::full(Bytes::new()),
            )
            .await;
        }
    }
    for list in [&mut totals, &mut agents, &mut overheads] {
        list.sort();
    }
    println!("capsule create ({creates} sequential)");
    println!(
        "  total            p50 {:9.2} ms   p99 {:9.2} ms",
        ms(percentile(&totals, 0.5)),
        ms(percentile(&totals, 0.99))
    );
    println!(
        "  agent            p50 {:9.2} ms   p99 {:9.2} ms",
        ms(percentile(&agents, 0.5)),
        ms(percentile(&agents, 0.99))
    );
    println!(
        "  control plane    p50 {:9.2} ms   p99 {:9.2} ms",
        ms(percentile(&overheads, 0.5)),
        ms(percentile(&overheads, 0.99))
    );

    let capsule = kept.expect("one capsule kept");
    let id = capsule["id"].as_str().unwrap().to_owned();
    let direct = (target.direct_envd)(&id, &capsule);
    let envd_headers: Vec<(&str, String)> = target
        .envd_token
        .iter()
        .map(|t| ("x-access-token", t.clone()))
        .collect();
    let direct = match direct {
        Some(url) => {
            let probe = Request::builder()
                .uri(format!("{url}/health"))
                .body(Http::full(Bytes::new()))
                .unwrap();
            match tokio::time::timeout(Duration::from_secs(3), http.client.request(probe)).await {
                Ok(Ok(r)) if r.status().is_success() => Some(url),
                _ => {
                    println!("(envd at {url} is not reachable from here: direct figures skipped)");
                    None
                }
            }
        }
        None => None,
    };

    // Exec round trip.
    let execs = number("WRENN_BENCH_EXECS", 300).max(1);
    let mut through = Vec::with_capacity(execs);
    for _ in 0..execs {
        let started = Instant::now();
        let (status, _, out) = http
            .json(
                Method::POST,
                &format!("{cp}/v1/capsules/{id}/exec"),
                &key,
                &json!({"cmd": "/bin/true"}),
            )
            .await;
        through.push(started.elapsed());
        assert_eq!(status, StatusCode::OK, "exec: {out}");
    }
    through.sort();
    println!("exec /bin/true round trip ({execs} sequential)");
    println!(
        "  through the CP   p50 {:9.2} ms   p99 {:9.2} ms",
        ms(percentile(&through, 0.5)),
        ms(percentile(&through, 0.99))
    );
    if let Some(envd) = &direct {
        let mut straight = Vec::with_capacity(execs);
        for _ in 0..execs {
            let started = Instant::now();
            let (status, _, out) = http
                .json(
                    Method::POST,
                    &format!("{envd}/processes/run"),
                    &envd_headers,
                    &json!({"process": {"cmd": "/bin/true"}}),
                )
                .await;
            straight.push(started.elapsed());
            assert_eq!(status, StatusCode::OK, "envd run: {out}");
        }
        straight.sort();
        println!(
            "  straight to envd p50 {:9.2} ms   p99 {:9.2} ms",
            ms(percentile(&straight, 0.5)),
            ms(percentile(&straight, 0.99))
        );
    }

    // File throughput.
    let mib = number("WRENN_BENCH_FILE_MB", 64).max(1);
    let size = mib << 20;
    let rate = |d: Duration| size as f64 / (1 << 20) as f64 / d.as_secs_f64();
    let path = "/tmp/wrenn-bench.bin";
    let (body, content_type) = generated(size, Some(path));
    let mut headers = key.clone();
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
    let mut read_headers = key.clone();
    read_headers.push(("content-type", "application/json".into()));
    let started = Instant::now();
    let (status, _, data) = http
        .send(
            Method::POST,
            &format!("{cp}/v1/capsules/{id}/files/stream/read"),
            &read_headers,
            Http::full(serde_json::to_vec(&json!({"path": path})).unwrap()),
        )
        .await;
    let down = started.elapsed();
    assert_eq!((status, data.len()), (StatusCode::OK, size));
    println!("file transfer ({mib} MiB)");
    println!(
        "  through the CP   upload {:8.1} MiB/s   download {:8.1} MiB/s",
        rate(up),
        rate(down)
    );
    if let Some(envd) = &direct {
        let query = format!("{envd}/files?path=%2Ftmp%2Fwrenn-bench-direct.bin");
        let (body, _) = generated(size, None);
        let started = Instant::now();
        let (status, _, answer) = http.send(Method::PUT, &query, &envd_headers, body).await;
        let up = started.elapsed();
        assert!(status.is_success(), "envd upload: {answer:?}");
        let started = Instant::now();
        let (status, _, data) = http
            .send(Method::GET, &query, &envd_headers, Http::full(Bytes::new()))
            .await;
        let down = started.elapsed();
        assert_eq!((status, data.len()), (StatusCode::OK, size));
        println!(
            "  straight to envd upload {:8.1} MiB/s   download {:8.1} MiB/s",
            rate(up),
            rate(down)
        );
    }
    http.send(
        Method::DELETE,
        &format!("{cp}/v1/capsules/{id}"),
        &key,
        Http::full(Bytes::new()),
    )
    .await;
}

fn main() {
    // `cargo test --all-targets` runs benchmarks too, without `--bench`: measure nothing then.
    if !std::env::args().any(|a| a == "--bench") {
        println!("capsules benchmark: run it with `cargo bench --bench capsules`");
        return;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        match (setting("WRENN_BENCH_CP_URL"), setting("WRENN_BENCH_API_KEY")) {
            (Some(url), Some(key)) => {
                println!("# real stack at {url}");
                bench(real_stack(url, key)).await;
            }
            _ => {
                println!("# local stack: in-process control plane, agent test double, real envd processes");
                let (target, stack) = local_stack().await;
                bench(target).await;
                drop(stack.double);
            }
        }
    });
}
