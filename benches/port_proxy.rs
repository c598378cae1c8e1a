//! Port proxy figures on a local stack of real parts (as root: a private PostgreSQL, `wrenn cp
//! serve` as its own process, a registered `wrenn agent`, a QEMU/TCG `python` capsule): a small
//! GET's round trip and a large download's throughput through the proxy
//! (`9000-<id>.localhost:<port>`) beside the same requests straight to the guest's address, a
//! WebSocket echo's round trip both ways, and how long the first request to a paused capsule
//! waits for it to resume.
//!
//! `cargo bench --bench port_proxy`. Sizes: `WRENN_BENCH_REQUESTS` (default 300),
//! `WRENN_BENCH_FILE_MB` (default 128), `WRENN_BENCH_RESUMES` (default 3).

#[path = "../tests/support/mod.rs"]
mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Empty};
use hyper::{Method, Request, StatusCode};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

/// An HTTP server on port 9000 (`/small`, and `/big?mb=N` streamed) and a WebSocket echo server
/// on 9001, both on all of the guest's interfaces, from Python's standard library.
const SERVER: &str = r#"
import base64, hashlib, http.server, socket, struct, threading

class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *args):
        pass
    def do_GET(self):
        if self.path.startswith("/big"):
            mb = int(self.path.split("mb=")[1])
            self.send_response(200)
            self.send_header("Content-Length", str(mb << 20))
            self.end_headers()
            chunk = b"\x5a" * (1 << 20)
            for _ in range(mb):
                self.wfile.write(chunk)
        else:
            body = b"hello, proxy!"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

def echo(conn):
    data = b""
    while b"\r\n\r\n" not in data:
        data += conn.recv(4096)
    head = data.split(b"\r\n\r\n")[0].decode()
    key = [l.split(":", 1)[1].strip() for l in head.split("\r\n")
           if l.lower().startswith("sec-websocket-key")][0]
    accept = base64.b64encode(hashlib.sha1(
        (key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest()).decode()
    conn.sendall(("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                  "Connection: Upgrade\r\nSec-WebSocket-Accept: %s\r\n\r\n" % accept).encode())
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    stream = conn.makefile("rb")
    while True:
        head = stream.read(2)
        if len(head) < 2:
            return
        op, n = head[0] & 0x0F, head[1] & 0x7F
        if n == 126:
            n = struct.unpack(">H", stream.read(2))[0]
        elif n == 127:
            n = struct.unpack(">Q", stream.read(8))[0]
        mask = stream.read(4)
        payload = bytes(b ^ mask[i % 4] for i, b in enumerate(stream.read(n)))
        if op == 8:
            return
        size = bytes([n]) if n < 126 else struct.pack(">BH", 126, n)
        conn.sendall(bytes([0x80 | op]) + size + payload)

def websockets():
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("0.0.0.0", 9001))
    listener.listen(64)
    while True:
        conn, _ = listener.accept()
        threading.Thread(target=echo, args=(conn,), daemon=True).start()

threading.Thread(target=websockets, daemon=True).start()
http.server.ThreadingHTTPServer(("0.0.0.0", 9000), Handler).serve_forever()
"#;

fn number(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let rank = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

fn print_latencies(label: &str, mut values: Vec<Duration>) {
    values.sort();
    println!(
        "  {label:<22} p50 {:8.2} ms   p99 {:8.2} ms",
        percentile(&values, 0.5).as_secs_f64() * 1000.0,
        percentile(&values, 0.99).as_secs_f64() * 1000.0
    );
}

/// Where a request goes: the proxy (the control plane, with the proxy's host name and the API
/// key) or the guest itself.
struct Way {
    label: &'static str,
    connect: SocketAddr,
    host: String,
    headers: Vec<(&'static str, String)>,
}

impl Way {
    fn request(&self, path: &str) -> Request<Empty<Bytes>> {
        let mut request =
            Request::get(format!("http://{}{path}", self.connect)).header("host", &self.host);
        for (name, value) in &self.headers {
            request = request.header(*name, value);
        }
        request.body(Empty::new()).unwrap()
    }

    async fn websocket(&self) -> tokio_tungstenite::WebSocketStream<tokio::net::TcpStream> {
        let mut request = format!("ws://{}/", self.host)
            .into_client_request()
            .unwrap();
        for (name, value) in &self.headers {
            request.headers_mut().insert(*name, value.parse().unwrap());
        }
        let tcp = tokio::net::TcpStream::connect(self.connect).await.unwrap();
        tcp.set_nodelay(true).unwrap();
        tokio_tungstenite::client_async(request, tcp)
            .await
            .unwrap()
            .0
    }
}

async fn get(
    client: &Client<HttpConnector, Empty<Bytes>>,
    way: &Way,
    path: &str,
) -> (StatusCode, usize) {
    let response = client.request(way.request(path)).await.unwrap();
    let status = response.status();
    let mut body = response.into_body();
    let mut size = 0;
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.unwrap().into_data() {
            size += data.len();
        }
    }
    (status, size)
}

async fn bench() {
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
    let key = key["key"].as_str().unwrap().to_owned();
    let auth = support::Auth::ApiKey(key.clone());
    let replica = support::CpReplica::start(&cp).await;
    let (status, capsule) = cp
        .call(
            Method::POST,
            "/v1/capsules",
            &auth,
            Some(json!({"template": "python"})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{capsule}");
    let id = capsule["id"].as_str().unwrap().to_owned();
    let guest_ip: std::net::Ipv4Addr = capsule["guest_ip"].as_str().unwrap().parse().unwrap();
    let install = format!("cat > /tmp/server.py <<'PY'\n{SERVER}\nPY");
    for body in [
        json!({"cmd": "/bin/sh", "args": ["-c", install]}),
        json!({"cmd": "python3", "args": ["/tmp/server.py"], "background": true}),
    ] {
        let (status, out): (StatusCode, Value) = cp
            .call(
                Method::POST,
                &format!("/v1/capsules/{id}/exec"),
                &auth,
                Some(body),
            )
            .await;
        assert!(status.is_success(), "{out}");
    }

    let proxied = |port: u16| Way {
        label: "through the proxy",
        connect: replica.addr,
        host: format!("{port}-{id}.localhost:{}", replica.addr.port()),
        headers: vec![("x-api-key", key.clone())],
    };
    let direct = |port: u16| Way {
        label: "straight to the guest",
        connect: SocketAddr::from((guest_ip, port)),
        host: format!("{guest_ip}:{port}"),
        headers: Vec::new(),
    };
    let client: Client<HttpConnector, Empty<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !client
        .request(direct(9000).request("/small"))
        .await
        .is_ok_and(|r| r.status() == StatusCode::OK)
    {
        assert!(
            Instant::now() < deadline,
            "the guest's server never answered"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    let requests = number("WRENN_BENCH_REQUESTS", 300).max(1);
    println!("small GET round trip ({requests} requests, one connection each way reused)");
    for way in [proxied(9000), direct(9000)] {
        let mut times = Vec::with_capacity(requests);
        for _ in 0..requests {
            let started = Instant::now();
            let (status, _) = get(&client, &way, "/small").await;
            times.push(started.elapsed());
            assert_eq!(status, StatusCode::OK);
        }
        print_latencies(way.label, times);
    }

    let mb = number("WRENN_BENCH_FILE_MB", 128).max(1);
    println!("download of {mb} MiB");
    for way in [proxied(9000), direct(9000)] {
        let started = Instant::now();
        let (status, size) = get(&client, &way, &format!("/big?mb={mb}")).await;
        assert_eq!((status, size), (StatusCode::OK, mb << 20));
        println!(
            "  {:<22} {:8.1} MiB/s",
            way.label,
            mb as f64 / started.elapsed().as_secs_f64()
        );
    }

    println!("WebSocket echo of 64 bytes ({requests} messages)");
    for way in [proxied(9001), direct(9001)] {
        let mut socket = way.websocket().await;
        let mut times = Vec::with_capacity(requests);
        let message = "x".repeat(64);
        for _ in 0..requests {
            let started = Instant::now();
            socket
                .send(Message::Text(message.clone().into()))
                .await
                .unwrap();
            let echoed = socket.next().await.unwrap().unwrap();
            times.push(started.elapsed());
            assert_eq!(echoed.into_text().unwrap().as_str(), message);
        }
        print_latencies(way.label, times);
        let _ = socket.close(None).await;
    }

    let resumes = number("WRENN_BENCH_RESUMES", 3);
    let mut waits = Vec::new();
    for _ in 0..resumes {
        let (status, body) = cp
            .call(
                Method::POST,
                &format!("/v1/capsules/{id}/pause"),
                &auth,
                None,
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let started = Instant::now();
        let (status, _) = get(&client, &proxied(9000), "/small").await;
        waits.push(started.elapsed());
        assert_eq!(status, StatusCode::OK);
    }
    if !waits.is_empty() {
        println!("first request to a paused capsule ({resumes} pauses)");
        print_latencies("through the proxy", waits);
    }

    let (status, _) = cp
        .call(Method::DELETE, &format!("/v1/capsules/{id}"), &auth, None)
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    println!("peak resident memory over the run");
    for (name, pid) in [
        ("control plane", replica.pid()),
        ("agent", agent.child.as_ref().unwrap().id()),
    ] {
        println!(
            "  {name:<22} {:8.1} MiB",
            support::agent::peak_rss_kib(pid) as f64 / 1024.0
        );
    }
    drop(replica);
    support::agent::wait_clean(&agent);
    drop(agent);
    cp.stop().await;
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("port proxy benchmark: run it with `cargo bench --bench port_proxy`");
        return;
    }
    if !nix::unistd::geteuid().is_root() {
        println!("port proxy benchmark: the local stack boots VMs and needs root; skipped");
        return;
    }
    println!(
        "# local stack: `wrenn cp serve`, `wrenn agent`, a QEMU/TCG `python` capsule (1 vCPU), {} host CPUs",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(bench());
}
