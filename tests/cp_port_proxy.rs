//! The port proxy end to end with real parts: a control plane (and a second replica) over a
//! private PostgreSQL, a real agent, and a `code-runner-beta` capsule (a QEMU/TCG microVM) whose
//! Jupyter server listens on all interfaces and whose test server listens on the guest's
//! loopback only. Requests go to `{port}-{capsule_id}.localhost:<control plane port>` as the
//! public SDK builds them: who may pass, what of their credentials the guest sees, redirects,
//! streamed bodies both ways, the SDK code runner's Jupyter protocol over the proxied WebSocket,
//! traffic tokens, public ports, the connection limit and idle timeout, activity, auto-resume,
//! and nothing left behind.

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper::{HeaderMap, Method, Request, StatusCode};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};
use sha2::Digest;
use support::agent::{add_agent_in, wait_clean, Agent, VM_TURNS};
use support::{Auth, CpReplica, TestCp, User};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use wrenn_test_support::guest;

type Body = UnsyncBoxBody<Bytes, std::io::Error>;

/// The guest's test service, on `127.0.0.1:9000` only (so the agent reaches it through envd):
/// echoes what it was sent, redirects to its own address, streams events and takes uploads.
const SERVER: &str = r#"
import hashlib, http.server, json, time

class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def reply(self, code, body, kind="text/plain", extra=()):
        self.send_response(code)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        for name, value in extra:
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.path == "/hello":
            self.reply(200, b"hello from the loopback")
        elif self.path == "/headers":
            seen = {k.lower(): v for k, v in self.headers.items()}
            self.reply(200, json.dumps(seen).encode(), "application/json")
        elif self.path == "/redirect":
            self.reply(302, b"", extra=[("Location", "http://localhost:9000/hello?from=redirect")])
        elif self.path == "/events":
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for i in range(3):
                event = b"data: %d\n\n" % i
                self.wfile.write(b"%x\r\n%s\r\n" % (len(event), event))
                self.wfile.flush()
                time.sleep(2)
            self.wfile.write(b"0\r\n\r\n")
        elif self.path == "/cookies":
            self.reply(200, b"", extra=[("Set-Cookie", "session=1; Domain=localhost; Path=/"),
                                        ("Set-Cookie", "wrenn_traffic=planted; Path=/")])
        elif self.path == "/silent":
            time.sleep(300)
            self.reply(200, b"too late")
        else:
            self.reply(404, b"no such page")

    def do_POST(self):
        digest, size = hashlib.sha256(), 0
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            while True:
                length = int(self.rfile.readline().strip(), 16)
                if length == 0:
                    self.rfile.readline()
                    break
                chunk = self.rfile.read(length)
                self.rfile.readline()
                digest.update(chunk)
                size += len(chunk)
        else:
            left = int(self.headers.get("Content-Length", "0"))
            while left:
                chunk = self.rfile.read(min(left, 1 << 16))
                digest.update(chunk)
                size += len(chunk)
                left -= len(chunk)
        body = json.dumps({"bytes": size, "sha256": digest.hexdigest()}).encode()
        self.reply(200, body, "application/json")

http.server.ThreadingHTTPServer(("127.0.0.1", 9000), Handler).serve_forever()
"#;

/// The connections one sandbox's ports may have open, and how long one may stay silent.
const MAX_CONNECTIONS: usize = 6;
const IDLE_TIMEOUT: Duration = Duration::from_secs(20);
/// Seconds without a call after which the capsule pauses itself.
const CAPSULE_TIMEOUT_SECS: u64 = 10;

struct Proxy {
    cp: SocketAddr,
    id: String,
    client: Client<HttpConnector, Body>,
}

struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|_| panic!("{}: {}", self.status, String::from_utf8_lossy(&self.body)))
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    fn error_code(&self) -> String {
        self.json()["error"]["code"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }
}

fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

impl Proxy {
    /// `{port}-{id}.localhost:<port>`, as the SDK builds it for a local stack.
    fn host(&self, port: u16) -> String {
        format!("{port}-{}.localhost:{}", self.id, self.cp.port())
    }

    fn request(
        &self,
        method: Method,
        port: u16,
        path: &str,
        headers: &[(&str, &str)],
        body: Body,
    ) -> Request<Body> {
        let mut request = Request::builder()
            .method(method)
            .uri(format!("http://{}{path}", self.cp))
            .header("host", self.host(port));
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        request.body(body).unwrap()
    }

    async fn send(&self, request: Request<Body>) -> Answer {
        let response = self.client.request(request).await.unwrap();
        let status = response.status();
        let headers = response.headers().clone();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        Answer {
            status,
            headers,
            body,
        }
    }

    async fn get(&self, port: u16, path: &str, headers: &[(&str, &str)]) -> Answer {
        self.send(self.request(Method::GET, port, path, headers, full(Bytes::new())))
            .await
    }

    /// Waits until `path` on `port` answers 200 (the guest's service is starting).
    async fn await_ready(&self, port: u16, path: &str, key: &str) {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let answer = self.get(port, path, &[("x-api-key", key)]).await;
            if answer.status == StatusCode::OK {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "port {port} never served {path}: {} {}",
                answer.status,
                answer.text()
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

async fn api_key(cp: &TestCp, user: &User) -> String {
    let (status, key) = cp
        .call(
            Method::POST,
            "/v1/api-keys",
            &user.auth(),
            Some(json!({"name": "proxy"})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{key}");
    key["key"].as_str().unwrap().to_owned()
}

/// The sandbox's phase as its agent sees it (the control plane learns of a pause the agent
/// decided only when it reconciles).
fn agent_phase(agent: &Agent, id: &str) -> String {
    let (status, info) = agent.call(Method::GET, &format!("/v1/sandboxes/{id}"), None);
    assert_eq!(status, StatusCode::OK, "{info}");
    info["status"].as_str().unwrap().to_owned()
}

/// Runs 1+1 in a Jupyter kernel as the public SDK's code runner does: the kernel list, a new
/// kernel of the template's `wrenn` spec, then an `execute_request` over the kernel's
/// WebSocket, all through the proxy with `X-API-Key`.
async fn jupyter_one_plus_one(proxy: &Proxy, key: &str) {
    proxy.await_ready(8888, "/api/kernels", key).await;
    let created = proxy
        .send(proxy.request(
            Method::POST,
            8888,
            "/api/kernels",
            &[("x-api-key", key), ("content-type", "application/json")],
            full(json!({"name": "wrenn"}).to_string()),
        ))
        .await;
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.text());
    let kernel = created.json()["id"].as_str().unwrap().to_owned();

    let url = format!("ws://{}/api/kernels/{kernel}/channels", proxy.host(8888));
    let mut request = url.into_client_request().unwrap();
    request
        .headers_mut()
        .insert("x-api-key", key.parse().unwrap());
    let tcp = tokio::net::TcpStream::connect(proxy.cp).await.unwrap();
    let (mut socket, _) = tokio_tungstenite::client_async(request, tcp)
        .await
        .expect("the kernel's WebSocket opens through the proxy");
    let msg_id = uuid::Uuid::new_v4().to_string();
    let execute = json!({
        "header": {"msg_id": msg_id, "msg_type": "execute_request", "username": "wrenn-sdk",
                   "session": uuid::Uuid::new_v4().to_string(), "date": "", "version": "5.3"},
        "parent_header": {}, "metadata": {}, "buffers": [], "channel": "shell",
        "content": {"code": "1+1", "silent": false, "store_history": true,
                    "user_expressions": {}, "allow_stdin": false, "stop_on_error": true}});
    socket
        .send(Message::Text(execute.to_string().into()))
        .await
        .unwrap();
    let result = tokio::time::timeout(Duration::from_secs(120), async {
        while let Some(message) = socket.next().await {
            let Message::Text(text) = message.unwrap() else {
                continue;
            };
            let message: Value = serde_json::from_str(&text).unwrap();
            if message["parent_header"]["msg_id"] == msg_id.as_str()
                && message["msg_type"] == "execute_result"
            {
                return message["content"]["data"]["text/plain"].clone();
            }
        }
        panic!("the kernel's WebSocket closed before the result");
    })
    .await
    .expect("the kernel answers within two minutes");
    assert_eq!(result, "2");
    socket.close(None).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_port_proxy_serves_a_capsules_ports_to_those_it_should_and_streams_everything() {
    let _turn = VM_TURNS.acquire().await.unwrap();
    tokio::task::spawn_blocking(|| {
        guest::build_image(
            guest::test_files(),
            "code-runner-beta",
            &guest::static_binary(),
        )
        .unwrap_or_else(|e| panic!("{e}"))
    })
    .await
    .unwrap();
    let cp = TestCp::start().await;
    let admin = cp.signup("admin@example.com").await;
    let root = tokio::task::spawn_blocking(Agent::new_root).await.unwrap();
    let max = MAX_CONNECTIONS.to_string();
    let idle = IDLE_TIMEOUT.as_secs().to_string();
    let metrics_addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .to_string();
    let (agent, _) = add_agent_in(
        &cp,
        &admin.auth(),
        root,
        &[
            ("AGENT_PORT_PROXY_MAX_CONNECTIONS", &max),
            ("AGENT_PORT_PROXY_IDLE_TIMEOUT_SECS", &idle),
            ("AGENT_METRICS_ADDR", &metrics_addr),
        ],
    )
    .await;
    let owner = cp.signup("owner@example.com").await;
    let stranger = cp.signup("stranger@example.com").await;
    let key = api_key(&cp, &owner).await;
    let strangers_key = api_key(&cp, &stranger).await;
    let auth = Auth::ApiKey(key.clone());

    let (status, capsule) = cp
        .call(
            Method::POST,
            "/v1/capsules",
            &auth,
            Some(json!({"template": "code-runner-beta", "timeout_sec": CAPSULE_TIMEOUT_SECS})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{capsule}");
    let id = capsule["id"].as_str().unwrap().to_owned();
    let install = format!("cat > /tmp/server.py <<'PY'\n{SERVER}\nPY");
    let (status, out) = cp
        .call(
            Method::POST,
            &format!("/v1/capsules/{id}/exec"),
            &auth,
            Some(json!({"cmd": "/bin/sh", "args": ["-c", install]})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{out}");
    let (status, out) = cp
        .call(
            Method::POST,
            &format!("/v1/capsules/{id}/exec"),
            &auth,
            Some(
                json!({"cmd": "python3", "args": ["/tmp/server.py"], "background": true,
                        "tag": "server"}),
            ),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{out}");

    let proxy = Proxy {
        cp: cp.addr,
        id: id.clone(),
        client: Client::builder(TokioExecutor::new()).build_http(),
    };
    proxy.await_ready(9000, "/hello", &key).await;
    let hello = proxy.get(9000, "/hello", &[("x-api-key", &key)]).await;
    assert_eq!(hello.text(), "hello from the loopback");

    // Who may not pass never reaches the guest.
    let anonymous = proxy.get(9000, "/hello", &[]).await;
    assert_eq!(
        anonymous.status,
        StatusCode::UNAUTHORIZED,
        "{}",
        anonymous.text()
    );
    assert_eq!(anonymous.error_code(), "unauthorized");
    let wrong_key = proxy
        .get(9000, "/hello", &[("x-api-key", "wrn_nope")])
        .await;
    assert_eq!(wrong_key.status, StatusCode::UNAUTHORIZED);
    let foreign = proxy
        .get(9000, "/hello", &[("x-api-key", &strangers_key)])
        .await;
    assert_eq!(foreign.status, StatusCode::NOT_FOUND, "{}", foreign.text());
    let forged = proxy
        .get(9000, "/hello", &[("authorization", "Bearer not.a.jwt")])
        .await;
    assert_eq!(forged.status, StatusCode::UNAUTHORIZED);
    let envd_port = proxy.get(49983, "/health", &[("x-api-key", &key)]).await;
    assert_eq!(
        envd_port.status,
        StatusCode::FORBIDDEN,
        "{}",
        envd_port.text()
    );
    let closed = proxy.get(9999, "/", &[("x-api-key", &key)]).await;
    assert_eq!(closed.status, StatusCode::BAD_GATEWAY, "{}", closed.text());
    assert_eq!(closed.error_code(), "port_closed");
    let nobody = Proxy {
        cp: cp.addr,
        id: "cl-0000000000000000000000001".into(),
        client: proxy.client.clone(),
    };
    let missing = nobody.get(9000, "/hello", &[("x-api-key", &key)]).await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
    // Whether a capsule exists is nothing an anonymous caller learns.
    let missing = nobody.get(9000, "/hello", &[]).await;
    assert_eq!(missing.status, StatusCode::UNAUTHORIZED);

    // What the guest sees: the public host name, the client's own credentials for it, none of
    // Wrenn's.
    let seen = proxy
        .get(
            9000,
            "/headers",
            &[
                ("x-api-key", &key),
                ("authorization", "Basic dXNlcjpwYXNz"),
                ("cookie", "theme=dark; wrenn_traffic=stale"),
            ],
        )
        .await
        .json();
    assert_eq!(seen["host"], proxy.host(9000));
    assert_eq!(seen["x-forwarded-host"], proxy.host(9000));
    assert_eq!(seen["x-forwarded-proto"], "http");
    assert_eq!(seen["authorization"], "Basic dXNlcjpwYXNz");
    assert_eq!(seen["cookie"], "theme=dark");
    assert!(seen.get("x-api-key").is_none(), "{seen}");
    assert!(seen.get("x-wrenn-authorization").is_none(), "{seen}");
    let with_jwt = proxy
        .get(
            9000,
            "/headers",
            &[("authorization", &format!("Bearer {}", owner.token))],
        )
        .await;
    assert_eq!(with_jwt.status, StatusCode::OK, "{}", with_jwt.text());
    assert!(with_jwt.json().get("authorization").is_none());

    // A redirect to the guest's own address comes back as the public one.
    let redirect = proxy.get(9000, "/redirect", &[("x-api-key", &key)]).await;
    assert_eq!(redirect.status, StatusCode::FOUND);
    assert_eq!(
        redirect.headers["location"],
        format!("http://{}/hello?from=redirect", proxy.host(9000))
    );

    // Server-sent events arrive as they are sent, not when the stream ends.
    let response = proxy
        .client
        .request(proxy.request(
            Method::GET,
            9000,
            "/events",
            &[("x-api-key", &key)],
            full(Bytes::new()),
        ))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let mut body = response.into_body();
    let mut arrivals = Vec::new();
    let mut events = String::new();
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.unwrap().into_data() {
            events.push_str(std::str::from_utf8(&data).unwrap());
            arrivals.push(Instant::now());
        }
    }
    assert_eq!(events, "data: 0\n\ndata: 1\n\ndata: 2\n\n");
    let spread = *arrivals.last().unwrap() - arrivals[0];
    assert!(
        spread >= Duration::from_secs(3),
        "events were held back: {spread:?}"
    );

    // A chunked upload streams through to the guest whole.
    const UPLOAD: usize = 32 << 20;
    let chunk = Bytes::from((0..1 << 20).map(|i| (i % 251) as u8).collect::<Vec<u8>>());
    let mut digest = sha2::Sha256::new();
    for _ in 0..UPLOAD / chunk.len() {
        digest.update(&chunk);
    }
    let frames = futures::stream::iter(
        (0..UPLOAD / chunk.len()).map(move |_| Ok::<_, std::io::Error>(Frame::data(chunk.clone()))),
    );
    let uploaded = proxy
        .send(proxy.request(
            Method::POST,
            9000,
            "/upload",
            &[("x-api-key", &key)],
            StreamBody::new(frames).boxed_unsync(),
        ))
        .await
        .json();
    assert_eq!(uploaded["bytes"], UPLOAD);
    assert_eq!(uploaded["sha256"], hex::encode(digest.finalize()));

    // The SDK code runner's path: Jupyter on 8888 (all interfaces, dialled directly).
    jupyter_one_plus_one(&proxy, &key).await;

    // Any control-plane replica proxies.
    let replica = CpReplica::start(&cp).await;
    let through_replica = Proxy {
        cp: replica.addr,
        id: id.clone(),
        client: proxy.client.clone(),
    };
    let hello = through_replica
        .get(9000, "/hello", &[("x-api-key", &key)])
        .await;
    assert_eq!(hello.status, StatusCode::OK, "{}", hello.text());
    drop(replica);

    // A traffic token opens the capsule in a browser: given once, kept in a host cookie.
    let (status, token) = cp
        .call(
            Method::POST,
            &format!("/v1/capsules/{id}/traffic-token"),
            &auth,
            Some(json!({"expires_in": 600})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{token}");
    let token = token["token"].as_str().unwrap().to_owned();
    let (status, _) = cp
        .call(
            Method::POST,
            &format!("/v1/capsules/{id}/traffic-token"),
            &Auth::ApiKey(strangers_key.clone()),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let opened = proxy
        .get(9000, &format!("/hello?x=1&wrenn_token={token}"), &[])
        .await;
    assert_eq!(opened.status, StatusCode::SEE_OTHER, "{}", opened.text());
    assert_eq!(opened.headers["location"], "/hello?x=1");
    let cookie = opened.headers["set-cookie"].to_str().unwrap().to_owned();
    assert!(
        cookie.starts_with(&format!("wrenn_traffic={token};")),
        "{cookie}"
    );
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Lax"),
        "{cookie}"
    );
    let cookie_header = format!("wrenn_traffic={token}");
    let by_cookie = proxy
        .get(9000, "/hello", &[("cookie", &cookie_header)])
        .await;
    assert_eq!(by_cookie.status, StatusCode::OK, "{}", by_cookie.text());
    let junk = proxy.get(9000, "/hello?wrenn_token=not.a.token", &[]).await;
    assert_eq!(junk.status, StatusCode::UNAUTHORIZED);
    // Another capsule's page is the same site: its requests carry the cookie, which must not
    // count for them.
    let other_page = format!(
        "http://80-cl-0000000000000000000000001.localhost:{}",
        cp.addr.port()
    );
    let riding = proxy
        .get(
            9000,
            "/hello",
            &[
                ("cookie", &cookie_header),
                ("origin", &other_page),
                ("sec-fetch-site", "same-site"),
                ("sec-fetch-mode", "cors"),
            ],
        )
        .await;
    assert_eq!(riding.status, StatusCode::UNAUTHORIZED, "{}", riding.text());
    // A redirect never leaves the capsule's host.
    let sneaky = proxy
        .get(9000, &format!("//evil.example/x?wrenn_token={token}"), &[])
        .await;
    assert_eq!(sneaky.status, StatusCode::SEE_OTHER);
    assert_eq!(sneaky.headers["location"], "/evil.example/x");
    // A guest sets cookies for itself only, and never Wrenn's.
    let cookies = proxy
        .get(9000, "/cookies", &[("cookie", &cookie_header)])
        .await;
    let set: Vec<&str> = cookies
        .headers
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().unwrap())
        .collect();
    assert_eq!(set, vec!["session=1; Path=/"]);
    // A WebSocket cannot follow the redirect: it is let in with the token as it is.
    let url = format!("ws://{}/api/kernels?wrenn_token={token}", proxy.host(8888));
    let tcp = tokio::net::TcpStream::connect(proxy.cp).await.unwrap();
    match tokio_tungstenite::client_async(url.into_client_request().unwrap(), tcp).await {
        // Jupyter has no WebSocket at that path: its answer, not the proxy's redirect.
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_ne!(response.status(), StatusCode::SEE_OTHER);
            assert_ne!(response.status(), StatusCode::UNAUTHORIZED);
        }
        Err(other) => panic!("{other}"),
        Ok(_) => {}
    }

    // Public ports need nothing, and still never pass Wrenn's credentials on.
    let network = format!("/v1/capsules/{id}/network");
    let (status, set) = cp
        .call(
            Method::PUT,
            &network,
            &auth,
            Some(json!({"public_ports": [9000]})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{set}");
    let settings = json!({"public_ports": [9000], "egress": {"default": "allow"}});
    assert_eq!(set, settings);
    let (status, got) = cp.call(Method::GET, &network, &auth, None).await;
    assert_eq!((status, got), (StatusCode::OK, settings));
    let (status, bad) = cp
        .call(
            Method::PUT,
            &network,
            &auth,
            Some(json!({"public_ports": [49983]})),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}");
    let (status, _) = cp
        .call(
            Method::PUT,
            &network,
            &Auth::ApiKey(strangers_key.clone()),
            Some(json!({"public_ports": [8888]})),
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let public = proxy.get(9000, "/hello", &[]).await;
    assert_eq!(public.status, StatusCode::OK, "{}", public.text());
    let seen = proxy
        .get(9000, "/headers", &[("x-api-key", &strangers_key)])
        .await
        .json();
    assert!(seen.get("x-api-key").is_none(), "{seen}");
    let still_private = proxy.get(8888, "/api/kernels", &[]).await;
    assert_eq!(still_private.status, StatusCode::UNAUTHORIZED);

    // The connection limit, and the idle timeout that ends a silent service's connections.
    // While they are open the capsule is in use, longer than its own timeout.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let started = Instant::now();
    let silent: Vec<_> = (0..MAX_CONNECTIONS)
        .map(|_| {
            let request = proxy.request(
                Method::GET,
                9000,
                "/silent",
                &[("x-api-key", &key)],
                full(Bytes::new()),
            );
            let client = proxy.client.clone();
            tokio::spawn(async move {
                let response = client.request(request).await;
                let outcome = match response {
                    Ok(response) => response.status(),
                    Err(_) => StatusCode::BAD_GATEWAY,
                };
                (outcome, started.elapsed())
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let refused = proxy.get(9000, "/hello", &[("x-api-key", &key)]).await;
    assert_eq!(
        refused.status,
        StatusCode::TOO_MANY_REQUESTS,
        "{}",
        refused.text()
    );
    assert_eq!(refused.error_code(), "rate_limited");
    tokio::time::sleep(Duration::from_secs(CAPSULE_TIMEOUT_SECS + 3)).await;
    assert_eq!(agent_phase(&agent, &id), "running");
    for waiting in silent {
        let (status, after) = waiting.await.unwrap();
        assert_eq!(status, StatusCode::GATEWAY_TIMEOUT);
        assert!(
            after >= IDLE_TIMEOUT - Duration::from_secs(1) && after < IDLE_TIMEOUT * 3,
            "a silent connection ended after {after:?}"
        );
    }
    let hello = proxy.get(9000, "/hello", &[]).await;
    assert_eq!(hello.status, StatusCode::OK, "{}", hello.text());

    // A paused capsule is resumed by the first request, its services as they were.
    let (status, paused) = cp
        .call(
            Method::POST,
            &format!("/v1/capsules/{id}/pause"),
            &auth,
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{paused}");
    let asked = Instant::now();
    let resumed = proxy.get(9000, "/hello", &[]).await;
    let waited = asked.elapsed();
    assert_eq!(resumed.status, StatusCode::OK, "{}", resumed.text());
    assert_eq!(resumed.text(), "hello from the loopback");
    eprintln!("first request to a paused capsule answered in {waited:?}");

    // The agent counted the bytes it carried, both ways (its /metrics, open without a token).
    let metrics = {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(&metrics_addr).await.unwrap();
        stream
            .write_all(b"GET /metrics HTTP/1.0\r\n\r\n")
            .await
            .unwrap();
        let mut text = String::new();
        stream.read_to_string(&mut text).await.unwrap();
        text
    };
    for direction in ["to_guest", "from_guest"] {
        let counted: u64 = metrics
            .lines()
            .find_map(|l| {
                l.strip_prefix(&format!(
                    "wrenn_agent_proxied_bytes_total{{direction=\"{direction}\"}} "
                ))
            })
            .unwrap_or_else(|| panic!("no {direction} bytes in\n{metrics}"))
            .parse()
            .unwrap();
        assert!(counted > 1024, "{direction}: {counted} bytes");
    }

    let (status, _) = cp
        .call(Method::DELETE, &format!("/v1/capsules/{id}"), &auth, None)
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    // A destroyed capsule's ports are gone, as its other calls are.
    let gone = proxy.get(9000, "/hello", &[]).await;
    assert_eq!(gone.status, StatusCode::CONFLICT, "{}", gone.text());
    assert_eq!(gone.error_code(), "invalid_state");
    tokio::task::spawn_blocking(move || {
        wait_clean(&agent);
        drop(agent);
    })
    .await
    .unwrap();
    drop(admin);
}
