//! A typed async client for envd: one method per endpoint, streamed file transfers both ways, and
//! WebSocket sessions for process I/O and watches. The host agent and the tests talk to envd
//! directly with its access token; the control plane talks to the same API through the agent's
//! proxy (`/v1/sandboxes/{id}/envd/`) with the agent secret, over its own connection pool and
//! the agent API's mTLS.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::stream::{SplitSink, SplitStream};
use futures::{SinkExt, Stream, StreamExt, TryStreamExt};
use http::{header, HeaderValue, Method, Request, Uri};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, LengthLimitError, Limited, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use super::api::port_tunnel_path;
use super::api::{
    AttachRequest, ClientMessage, EntryInfo, ErrorBody, ErrorCode, ErrorEnvelope, ExitInfo,
    FileQuery, Health, InitRequest, ListRequest, ListResponse, Metrics, MoveRequest, PathRequest,
    ProcessInfo, ProcessList, PtySize, RunRequest, RunResponse, ServerMessage, SignalRequest,
    StartRequest, StartResponse, WatchMessage, ACCESS_TOKEN_HEADER, FRAME_PTY, FRAME_STDERR,
    FRAME_STDOUT, PORT_TUNNEL_PROTOCOL,
};

/// The request body every envd call sends; a pool built for it can be shared with other calls.
pub type RequestBody = UnsyncBoxBody<Bytes, std::io::Error>;
/// An HTTP connection pool envd clients can share.
/// Plain HTTP to envd itself, TLS to the agent's proxy: one pool type for both.
pub type HttpClient = Client<HttpsConnector<HttpConnector>, RequestBody>;
type Socket = WebSocketStream<MaybeTlsStream<tokio::net::TcpStream>>;

#[derive(Debug, thiserror::Error)]
pub enum EnvdClientError {
    #[error("invalid envd address `{0}`: expected http://host:port[/path]")]
    BadAddress(String),
    #[error("the credential for envd is not a valid header value")]
    BadCredential,
    #[error("request to envd failed: {0}")]
    Transport(String),
    #[error("envd answered {status}: {} ({})", .detail.message, .detail.code)]
    Api { status: u16, detail: ErrorBody },
    #[error("unexpected answer from envd: {0}")]
    Decode(String),
    #[error("envd WebSocket failed: {0}")]
    WebSocket(String),
    /// The answer was longer than any legitimate one: the guest is misbehaving.
    #[error("envd's answer exceeds {limit} bytes")]
    TooLarge { limit: usize },
}

/// The largest JSON answer read: a foreground run's two capped outputs, base64-encoded, fit.
const ANSWER_LIMIT: usize = 64 << 20;
/// The largest answer to a control call (health, init, shutdown) or an error body: a guest
/// cannot make the agent hold more than this for them.
const CONTROL_LIMIT: usize = 64 << 10;

/// Reads a whole body of at most `limit` bytes; a longer one is [`EnvdClientError::TooLarge`]
/// and is not buffered beyond the limit.
async fn read_capped(body: Incoming, limit: usize) -> Result<Bytes> {
    match Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(error) if error.is::<LengthLimitError>() => Err(EnvdClientError::TooLarge { limit }),
        Err(error) => Err(transport(&*error)),
    }
}

impl EnvdClientError {
    /// The envd error code (`not_found`, `conflict`, ...) when envd answered with one.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            Self::Api { detail, .. } => Some(detail.code),
            _ => None,
        }
    }
}

type Result<T, E = EnvdClientError> = std::result::Result<T, E>;

/// A failed exchange, with every cause (hyper's own message alone says little).
fn transport(error: impl std::error::Error) -> EnvdClientError {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    EnvdClientError::Transport(text)
}

fn ws_error(error: impl std::fmt::Display) -> EnvdClientError {
    EnvdClientError::WebSocket(error.to_string())
}

/// How requests prove they may talk to envd.
#[derive(Clone)]
enum Credential {
    /// envd's own access token (`X-Access-Token`), for callers that reach envd directly.
    AccessToken(String),
    /// `Authorization: Bearer` for a proxy in front of envd, which adds envd's token itself.
    ProxyBearer(HeaderValue),
}

#[derive(Clone)]
pub struct EnvdClient {
    /// `host:port`.
    authority: String,
    /// Prepended to envd's paths: empty when talking to envd itself, `/v1/sandboxes/{id}/envd`
    /// through the agent's proxy.
    base_path: String,
    credential: Option<Credential>,
    http: HttpClient,
    /// How WebSockets reach the proxy when it speaks TLS; `None` for plain HTTP.
    tls: Option<Arc<rustls::ClientConfig>>,
}

/// A streamed download: its announced length and its chunks.
pub struct FileDownload {
    /// The `Content-Length` envd announced (it always does for files).
    pub size: Option<u64>,
    pub body: Pin<Box<dyn Stream<Item = Result<Bytes>> + Send>>,
}

/// `http[s]://host:port[/base/path][/]` as whether it is TLS, an authority and a base path
/// without a trailing slash.
fn parse_base(base: &str) -> Result<(bool, String, String)> {
    let bad = || EnvdClientError::BadAddress(base.to_owned());
    let uri: Uri = base.parse().map_err(|_| bad())?;
    let https = match uri.scheme_str() {
        Some("http") => false,
        Some("https") => true,
        _ => return Err(bad()),
    };
    match (uri.authority(), uri.query()) {
        (Some(authority), None) => Ok((
            https,
            authority.to_string(),
            uri.path().trim_end_matches('/').to_owned(),
        )),
        _ => Err(bad()),
    }
}

/// A pool over `connector` that speaks TLS with `tls` to `https://` addresses and plain HTTP to
/// `http://` ones.
pub fn pool(connector: HttpConnector, tls: Arc<rustls::ClientConfig>) -> HttpClient {
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config((*tls).clone())
        .https_or_http()
        .enable_http1()
        .wrap_connector(connector);
    Client::builder(TokioExecutor::new()).build(connector)
}

/// How long a direct client waits for envd to accept a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

impl EnvdClient {
    /// A client with its own connection pool; `base` is `http://host:port` (a trailing slash is
    /// fine).
    pub fn new(base: &str) -> Result<Self> {
        let (https, authority, base_path) = parse_base(base)?;
        if https {
            return Err(EnvdClientError::BadAddress(base.to_owned()));
        }
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        // A guest that does not accept (its network is down, a SYN was lost on the way) must
        // cost the caller a retry, not the kernel's two-minute SYN back-off.
        connector.set_connect_timeout(Some(CONNECT_TIMEOUT));
        connector.enforce_http(false);
        Ok(Self {
            authority,
            base_path,
            credential: None,
            http: pool(connector, crate::tls::trust_nothing()),
            tls: None,
        })
    }

    /// A client of the envd behind a proxy at `base` (e.g.
    /// `https://agent:port/v1/sandboxes/{id}/envd/`) that accepts `bearer` and adds envd's access
    /// token itself. It shares `http`'s connections with the caller's other requests; its
    /// WebSockets speak TLS with `tls` when `base` is `https://`.
    pub fn through_proxy(
        http: HttpClient,
        base: &str,
        bearer: &str,
        tls: Arc<rustls::ClientConfig>,
    ) -> Result<Self> {
        let (https, authority, base_path) = parse_base(base)?;
        let bearer = HeaderValue::from_str(&format!("Bearer {bearer}"))
            .map_err(|_| EnvdClientError::BadCredential)?;
        Ok(Self {
            authority,
            base_path,
            credential: Some(Credential::ProxyBearer(bearer)),
            http,
            tls: https.then_some(tls),
        })
    }

    /// Sends `token` as `X-Access-Token` on every later request.
    pub fn with_token(mut self, token: impl Into<String>) -> Self {
        self.set_token(Some(token.into()));
        self
    }

    pub fn set_token(&mut self, token: Option<String>) {
        self.credential = token.map(Credential::AccessToken);
    }

    /// This client's connection pool, for callers that proxy raw requests to the same envd: its
    /// connections live and die with this client, never reaching a later guest at the address.
    pub fn pool(&self) -> &HttpClient {
        &self.http
    }

    /// The `host:port` this client talks to, for callers that proxy raw requests to envd.
    pub fn authority(&self) -> &str {
        &self.authority
    }

    /// The access token sent with every request, if any.
    pub fn token(&self) -> Option<&str> {
        match &self.credential {
            Some(Credential::AccessToken(token)) => Some(token),
            Some(Credential::ProxyBearer(_)) | None => None,
        }
    }

    fn uri(&self, path_and_query: &str) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!(
            "{scheme}://{}{}{}",
            self.authority, self.base_path, path_and_query
        )
    }

    /// Adds the credential, and the ID of the request being served so envd's log can be matched
    /// with the caller's.
    fn authorize(&self, headers: &mut http::HeaderMap) -> Result<()> {
        if let Some(id) = crate::request_id::current() {
            headers.insert(crate::request_id::HEADER, id);
        }
        match &self.credential {
            Some(Credential::AccessToken(token)) => {
                let value =
                    HeaderValue::from_str(token).map_err(|_| EnvdClientError::BadCredential)?;
                headers.insert(ACCESS_TOKEN_HEADER, value);
            }
            Some(Credential::ProxyBearer(bearer)) => {
                headers.insert(header::AUTHORIZATION, bearer.clone());
            }
            None => {}
        }
        Ok(())
    }

    fn request(
        &self,
        method: Method,
        path_and_query: &str,
        body: RequestBody,
        json: bool,
    ) -> Result<Request<RequestBody>> {
        let mut builder = Request::builder()
            .method(method)
            .uri(self.uri(path_and_query));
        if json {
            builder = builder.header(header::CONTENT_TYPE, "application/json");
        }
        let mut request = builder.body(body).map_err(transport)?;
        self.authorize(request.headers_mut())?;
        Ok(request)
    }

    async fn send(&self, request: Request<RequestBody>) -> Result<hyper::Response<Incoming>> {
        let response = self.http.request(request).await.map_err(transport)?;
        if response.status().is_success() {
            return Ok(response);
        }
        let status = response.status().as_u16();
        let body = read_capped(response.into_body(), CONTROL_LIMIT).await?;
        Err(EnvdClientError::Api {
            status,
            detail: ErrorEnvelope::body_of(&body),
        })
    }

    /// A TCP connection to `port` on the guest's loopback, carried by envd
    /// (`GET /ports/{port}/connect`); `Api` with `port_closed` when nothing listens there.
    pub async fn connect_port(&self, port: u16) -> Result<hyper::upgrade::Upgraded> {
        let mut request =
            self.request(Method::GET, &port_tunnel_path(port), Self::empty(), false)?;
        let headers = request.headers_mut();
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(
            header::UPGRADE,
            HeaderValue::from_static(PORT_TUNNEL_PROTOCOL),
        );
        let response = self.http.request(request).await.map_err(transport)?;
        if response.status() != http::StatusCode::SWITCHING_PROTOCOLS {
            let status = response.status().as_u16();
            let body = read_capped(response.into_body(), CONTROL_LIMIT).await?;
            return Err(EnvdClientError::Api {
                status,
                detail: ErrorEnvelope::body_of(&body),
            });
        }
        hyper::upgrade::on(response).await.map_err(transport)
    }

    fn full(bytes: impl Into<Bytes>) -> RequestBody {
        Full::new(bytes.into())
            .map_err(|never| match never {})
            .boxed_unsync()
    }

    fn empty() -> RequestBody {
        Self::full(Bytes::new())
    }

    async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&impl Serialize>,
    ) -> Result<T> {
        let body = self.send_json(method, path, body, ANSWER_LIMIT).await?;
        serde_json::from_slice(&body).map_err(|e| EnvdClientError::Decode(e.to_string()))
    }

    async fn send_json(
        &self,
        method: Method,
        path: &str,
        body: Option<&impl Serialize>,
        limit: usize,
    ) -> Result<Bytes> {
        let request = match body {
            Some(body) => {
                let json =
                    serde_json::to_vec(body).map_err(|e| EnvdClientError::Decode(e.to_string()))?;
                self.request(method, path, Self::full(json), true)?
            }
            None => self.request(method, path, Self::empty(), false)?,
        };
        let response = self.send(request).await?;
        read_capped(response.into_body(), limit).await
    }

    async fn call_empty(
        &self,
        method: Method,
        path: &str,
        body: Option<&impl Serialize>,
    ) -> Result<()> {
        self.send_json(method, path, body, CONTROL_LIMIT)
            .await
            .map(drop)
    }

    pub async fn health(&self) -> Result<Health> {
        let body = self
            .send_json(Method::GET, "/health", None::<&()>, CONTROL_LIMIT)
            .await?;
        serde_json::from_slice(&body).map_err(|e| EnvdClientError::Decode(e.to_string()))
    }

    pub async fn metrics(&self) -> Result<Metrics> {
        self.call(Method::GET, "/metrics", None::<&()>).await
    }

    pub async fn init(&self, request: &InitRequest) -> Result<()> {
        self.call_empty(Method::POST, "/init", Some(request)).await
    }

    pub async fn envs(&self) -> Result<std::collections::BTreeMap<String, String>> {
        self.call(Method::GET, "/envs", None::<&()>).await
    }

    /// Asks envd to stop every process and exit (power off, as PID 1).
    pub async fn shutdown(&self) -> Result<()> {
        self.call_empty(Method::POST, "/shutdown", None::<&()>)
            .await
    }

    pub async fn run(&self, request: &RunRequest) -> Result<RunResponse> {
        self.call(Method::POST, "/processes/run", Some(request))
            .await
    }

    pub async fn start(&self, request: &StartRequest) -> Result<StartResponse> {
        self.call(Method::POST, "/processes", Some(request)).await
    }

    pub async fn list(&self) -> Result<Vec<ProcessInfo>> {
        Ok(self
            .call::<ProcessList>(Method::GET, "/processes", None::<&()>)
            .await?
            .processes)
    }

    pub async fn signal(&self, selector: &str, signal: &str) -> Result<()> {
        let request = SignalRequest {
            signal: signal.to_owned(),
        };
        self.call_empty(
            Method::POST,
            &format!("/processes/{}/signal", segment(selector)),
            Some(&request),
        )
        .await
    }

    /// `DELETE /processes/{selector}`: SIGKILL unless another signal is named.
    pub async fn kill(&self, selector: &str, signal: Option<&str>) -> Result<()> {
        let mut path = format!("/processes/{}", segment(selector));
        if let Some(signal) = signal {
            path.push_str(&format!("?signal={}", segment(signal)));
        }
        self.call_empty(Method::DELETE, &path, None::<&()>).await
    }

    pub async fn write_stdin(&self, selector: &str, data: impl Into<Bytes>) -> Result<()> {
        let request = self.request(
            Method::POST,
            &format!("/processes/{}/stdin", segment(selector)),
            Self::full(data),
            false,
        )?;
        self.send(request).await.map(drop)
    }

    pub async fn close_stdin(&self, selector: &str) -> Result<()> {
        self.call_empty(
            Method::POST,
            &format!("/processes/{}/close-stdin", segment(selector)),
            None::<&()>,
        )
        .await
    }

    pub async fn resize(&self, selector: &str, size: PtySize) -> Result<()> {
        self.call_empty(
            Method::POST,
            &format!("/processes/{}/resize", segment(selector)),
            Some(&size),
        )
        .await
    }

    async fn websocket(&self, path_and_query: &str) -> Result<Socket> {
        let scheme = if self.tls.is_some() { "wss" } else { "ws" };
        let mut request = format!(
            "{scheme}://{}{}{}",
            self.authority, self.base_path, path_and_query
        )
        .into_client_request()
        .map_err(ws_error)?;
        self.authorize(request.headers_mut())?;
        let connector = self
            .tls
            .clone()
            .map(tokio_tungstenite::Connector::Rustls)
            .unwrap_or(tokio_tungstenite::Connector::Plain);
        match tokio_tungstenite::connect_async_tls_with_config(request, None, true, Some(connector))
            .await
        {
            Ok((socket, _)) => Ok(socket),
            Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
                let status = response.status().as_u16();
                let detail = match response.body().as_deref() {
                    Some(body) if !body.is_empty() => ErrorEnvelope::body_of(body),
                    _ => ErrorBody {
                        code: ErrorCode::Unknown,
                        message: format!("HTTP {status}"),
                    },
                };
                Err(EnvdClientError::Api { status, detail })
            }
            Err(error) => Err(ws_error(error)),
        }
    }

    /// Starts a process (or re-attaches to one) and streams its events.
    pub async fn attach(&self, request: &AttachRequest) -> Result<ProcessSession> {
        let mut socket = self.websocket("/processes/attach").await?;
        let first =
            serde_json::to_string(request).map_err(|e| EnvdClientError::Decode(e.to_string()))?;
        socket
            .send(Message::Text(first.into()))
            .await
            .map_err(ws_error)?;
        loop {
            match socket.next().await {
                Some(Ok(Message::Text(body))) => match parse_server_message(&body)? {
                    ServerMessage::Start { pid, tag } => {
                        let (sink, stream) = socket.split();
                        return Ok(ProcessSession {
                            pid,
                            tag,
                            input: SessionInput { sink },
                            output: SessionOutput { stream },
                        });
                    }
                    ServerMessage::Error(detail) => {
                        let status = if detail.code == ErrorCode::NotFound {
                            404
                        } else {
                            400
                        };
                        return Err(EnvdClientError::Api { status, detail });
                    }
                    other => {
                        return Err(EnvdClientError::Decode(format!(
                            "expected start, got {other:?}"
                        )))
                    }
                },
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                Some(Ok(other)) => {
                    return Err(EnvdClientError::Decode(format!(
                        "expected start, got {other:?}"
                    )))
                }
                Some(Err(error)) => return Err(ws_error(error)),
                None => return Err(ws_error("connection closed before the process started")),
            }
        }
    }

    fn file_query(path: &str, user: Option<&str>, recursive: Option<bool>) -> String {
        let query = FileQuery {
            path: path.to_owned(),
            user: user.map(str::to_owned),
            recursive,
        };
        let mut serializer = url::form_urlencoded::Serializer::new(String::new());
        serializer.append_pair("path", &query.path);
        if let Some(user) = &query.user {
            serializer.append_pair("user", user);
        }
        if let Some(recursive) = query.recursive {
            serializer.append_pair("recursive", if recursive { "true" } else { "false" });
        }
        serializer.finish()
    }

    /// Streams a file from the guest.
    pub async fn read_file(&self, path: &str, user: Option<&str>) -> Result<FileDownload> {
        let request = self.request(
            Method::GET,
            &format!("/files?{}", Self::file_query(path, user, None)),
            Self::empty(),
            false,
        )?;
        let response = self.send(request).await?;
        let size = response
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        let body = response.into_body().into_data_stream().map_err(transport);
        Ok(FileDownload {
            size,
            body: Box::pin(body),
        })
    }

    /// Streams `body` into a file in the guest, creating parent directories.
    pub async fn write_file<S>(&self, path: &str, user: Option<&str>, body: S) -> Result<EntryInfo>
    where
        S: Stream<Item = std::io::Result<Bytes>> + Send + 'static,
    {
        let body = StreamBody::new(body.map_ok(Frame::data)).boxed_unsync();
        let request = self.request(
            Method::PUT,
            &format!("/files?{}", Self::file_query(path, user, None)),
            body,
            false,
        )?;
        let response = self.send(request).await?;
        let body = read_capped(response.into_body(), CONTROL_LIMIT).await?;
        serde_json::from_slice(&body).map_err(|e| EnvdClientError::Decode(e.to_string()))
    }

    pub async fn write_file_bytes(
        &self,
        path: &str,
        user: Option<&str>,
        data: impl Into<Bytes>,
    ) -> Result<EntryInfo> {
        let data = data.into();
        self.write_file(path, user, futures::stream::once(async move { Ok(data) }))
            .await
    }

    pub async fn list_dir(&self, request: &ListRequest) -> Result<Vec<EntryInfo>> {
        Ok(self
            .call::<ListResponse>(Method::POST, "/files/list", Some(request))
            .await?
            .entries)
    }

    pub async fn stat(&self, path: &str, user: Option<&str>) -> Result<EntryInfo> {
        self.call(Method::POST, "/files/stat", Some(&path_request(path, user)))
            .await
    }

    pub async fn mkdir(&self, path: &str, user: Option<&str>) -> Result<EntryInfo> {
        self.call(
            Method::POST,
            "/files/mkdir",
            Some(&path_request(path, user)),
        )
        .await
    }

    pub async fn remove(&self, path: &str, user: Option<&str>) -> Result<()> {
        self.call_empty(
            Method::POST,
            "/files/remove",
            Some(&path_request(path, user)),
        )
        .await
    }

    pub async fn rename(&self, from: &str, to: &str, user: Option<&str>) -> Result<EntryInfo> {
        let request = MoveRequest {
            from: from.to_owned(),
            to: to.to_owned(),
            user: user.map(str::to_owned),
        };
        self.call(Method::POST, "/files/move", Some(&request)).await
    }

    /// Watches a directory; events arrive until the session is dropped.
    pub async fn watch(
        &self,
        path: &str,
        recursive: bool,
        user: Option<&str>,
    ) -> Result<WatchSession> {
        let socket = self
            .websocket(&format!(
                "/files/watch?{}",
                Self::file_query(path, user, Some(recursive))
            ))
            .await?;
        Ok(WatchSession { socket })
    }
}

fn path_request(path: &str, user: Option<&str>) -> PathRequest {
    PathRequest {
        path: path.to_owned(),
        user: user.map(str::to_owned),
    }
}

/// Percent-encodes one path segment.
fn segment(value: &str) -> String {
    url::form_urlencoded::byte_serialize(value.as_bytes()).collect()
}

fn parse_server_message(body: &str) -> Result<ServerMessage> {
    serde_json::from_str(body).map_err(|e| EnvdClientError::Decode(format!("{e}: {body}")))
}

/// What a process session delivers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProcessEvent {
    Stdout(Bytes),
    Stderr(Bytes),
    Pty(Bytes),
    /// Output bytes dropped before this client read them (it attached late).
    Lost(u64),
    Exit(ExitInfo),
    /// A request on this session failed; the session stays usable.
    Error(ErrorBody),
}

/// One attached process: events in, stdin and control out. Split it to read and write from
/// different tasks.
pub struct ProcessSession {
    pub pid: u32,
    pub tag: String,
    pub input: SessionInput,
    pub output: SessionOutput,
}

impl ProcessSession {
    pub async fn next_event(&mut self) -> Result<Option<ProcessEvent>> {
        self.output.next_event().await
    }

    pub async fn send_stdin(&mut self, data: impl Into<Bytes>) -> Result<()> {
        self.input.send_stdin(data).await
    }

    pub async fn send(&mut self, message: &ClientMessage) -> Result<()> {
        self.input.send(message).await
    }

    /// Reads events until the exit, collecting stdout, stderr (or terminal output).
    pub async fn wait(&mut self) -> Result<(Vec<u8>, Vec<u8>, ExitInfo)> {
        let (mut out, mut err) = (Vec::new(), Vec::new());
        while let Some(event) = self.next_event().await? {
            match event {
                ProcessEvent::Stdout(d) | ProcessEvent::Pty(d) => out.extend_from_slice(&d),
                ProcessEvent::Stderr(d) => err.extend_from_slice(&d),
                ProcessEvent::Exit(exit) => return Ok((out, err, exit)),
                ProcessEvent::Lost(_) | ProcessEvent::Error(_) => {}
            }
        }
        Err(ws_error("session ended before the process exited"))
    }

    pub fn split(self) -> (SessionInput, SessionOutput) {
        (self.input, self.output)
    }
}

pub struct SessionInput {
    sink: SplitSink<Socket, Message>,
}

impl SessionInput {
    pub async fn send_stdin(&mut self, data: impl Into<Bytes>) -> Result<()> {
        self.sink
            .send(Message::Binary(data.into()))
            .await
            .map_err(ws_error)
    }

    pub async fn send(&mut self, message: &ClientMessage) -> Result<()> {
        let body =
            serde_json::to_string(message).map_err(|e| EnvdClientError::Decode(e.to_string()))?;
        self.sink
            .send(Message::Text(body.into()))
            .await
            .map_err(ws_error)
    }

    /// Detaches; the process keeps running.
    pub async fn close(mut self) -> Result<()> {
        self.sink.close().await.map_err(ws_error)
    }
}

pub struct SessionOutput {
    stream: SplitStream<Socket>,
}

impl SessionOutput {
    /// The next event; `None` once envd closed the session (after the exit event).
    pub async fn next_event(&mut self) -> Result<Option<ProcessEvent>> {
        loop {
            let Some(message) = self.stream.next().await else {
                return Ok(None);
            };
            match message.map_err(ws_error)? {
                Message::Binary(frame) => {
                    let Some((&kind, _)) = frame.split_first() else {
                        continue;
                    };
                    let data = frame.slice(1..);
                    return Ok(Some(match kind {
                        FRAME_STDOUT => ProcessEvent::Stdout(data),
                        FRAME_STDERR => ProcessEvent::Stderr(data),
                        FRAME_PTY => ProcessEvent::Pty(data),
                        other => {
                            return Err(EnvdClientError::Decode(format!(
                                "unknown frame kind {other}"
                            )))
                        }
                    }));
                }
                Message::Text(body) => {
                    return Ok(Some(match parse_server_message(&body)? {
                        ServerMessage::Lost { bytes } => ProcessEvent::Lost(bytes),
                        ServerMessage::Exit(exit) => ProcessEvent::Exit(exit),
                        ServerMessage::Error(detail) => ProcessEvent::Error(detail),
                        ServerMessage::Start { .. } => continue,
                    }));
                }
                Message::Close(_) => return Ok(None),
                _ => continue,
            }
        }
    }
}

pub struct WatchSession {
    socket: Socket,
}

impl WatchSession {
    pub async fn next(&mut self) -> Result<Option<WatchMessage>> {
        loop {
            let Some(message) = self.socket.next().await else {
                return Ok(None);
            };
            match message.map_err(ws_error)? {
                Message::Text(body) => {
                    return serde_json::from_str(&body)
                        .map(Some)
                        .map_err(|e| EnvdClientError::Decode(e.to_string()));
                }
                Message::Close(_) => return Ok(None),
                _ => continue,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A server that answers every request with a 200 whose chunked body never ends.
    async fn endless_server() -> std::net::SocketAddr {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut request = [0u8; 4096];
                    let _ = stream.read(&mut request).await;
                    let head = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\
                                transfer-encoding: chunked\r\n\r\n";
                    if stream.write_all(head.as_bytes()).await.is_err() {
                        return;
                    }
                    let chunk = format!("10000\r\n{}\r\n", " ".repeat(0x10000));
                    while stream.write_all(chunk.as_bytes()).await.is_ok() {}
                });
            }
        });
        addr
    }

    #[tokio::test]
    async fn an_endless_answer_is_refused_at_its_limit_not_buffered() {
        let addr = endless_server().await;
        let envd = EnvdClient::new(&format!("http://{addr}")).unwrap();
        match envd.health().await {
            Err(EnvdClientError::TooLarge { limit }) => assert_eq!(limit, CONTROL_LIMIT),
            other => panic!("{other:?}"),
        }
        match envd.list().await {
            Err(EnvdClientError::TooLarge { limit }) => assert_eq!(limit, ANSWER_LIMIT),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_base_is_an_authority_and_a_path() {
        assert_eq!(
            parse_base("http://10.0.0.2:49983").unwrap(),
            (false, "10.0.0.2:49983".to_owned(), String::new())
        );
        assert_eq!(
            parse_base("https://agent:8080/v1/sandboxes/cl-1/envd/").unwrap(),
            (
                true,
                "agent:8080".to_owned(),
                "/v1/sandboxes/cl-1/envd".to_owned()
            )
        );
        assert!(matches!(
            EnvdClient::new("https://a:1"),
            Err(EnvdClientError::BadAddress(_))
        ));
        for bad in ["ftp://a:1", "a:1", "http://a:1/x?y=1", ""] {
            assert!(
                matches!(parse_base(bad), Err(EnvdClientError::BadAddress(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn the_credential_goes_where_its_reader_looks() {
        let direct = EnvdClient::new("http://a:1").unwrap().with_token("t0k");
        let mut headers = http::HeaderMap::new();
        direct.authorize(&mut headers).unwrap();
        assert_eq!(headers[ACCESS_TOKEN_HEADER], "t0k");
        assert_eq!(direct.token(), Some("t0k"));
        assert_eq!(direct.uri("/health"), "http://a:1/health");

        let tls = crate::tls::trust_nothing();
        let http = pool(HttpConnector::new(), tls.clone());
        let proxied = EnvdClient::through_proxy(
            http,
            "https://agent:2/v1/sandboxes/cl-1/envd/",
            "s3cret",
            tls,
        )
        .unwrap();
        let mut headers = http::HeaderMap::new();
        proxied.authorize(&mut headers).unwrap();
        assert_eq!(headers[header::AUTHORIZATION], "Bearer s3cret");
        assert!(!headers.contains_key(ACCESS_TOKEN_HEADER));
        assert_eq!(proxied.token(), None);
        assert_eq!(
            proxied.uri("/processes/run"),
            "https://agent:2/v1/sandboxes/cl-1/envd/processes/run"
        );
    }

    #[test]
    fn refusals_keep_their_envelope() {
        let detail = ErrorEnvelope::body_of(br#"{"error":{"code":"conflict","message":"exists"}}"#);
        assert_eq!(
            (detail.code, detail.message.as_str()),
            (ErrorCode::Conflict, "exists")
        );
        let page = ErrorEnvelope::body_of("x".repeat(2000).as_bytes());
        assert_eq!((page.code, page.message.len()), (ErrorCode::Unknown, 500));
    }
}
