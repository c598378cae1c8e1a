//! The control plane's client for the host agent API (its contract: `agent::wire`): sandbox lifecycle calls, and the agent's transparent proxy to each
//! sandbox's envd (`/v1/sandboxes/{id}/envd/...`) for JSON calls, streamed file transfers and
//! WebSocket sessions. Every call carries `Authorization: Bearer <agent secret>`, a timeout and
//! the `x-request-id` of the API request being served (`crate::request_id`);
//! failures are typed so the API can tell "the agent said no" from "the agent is not there".

use std::time::Duration;

use bytes::Bytes;
use futures::{Stream, TryStreamExt};
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::agent::wire::{envd_proxy_path, AgentPing, CreateSandbox, SandboxInfo, SandboxList};
use crate::error_code::{ErrorBody, ErrorCode, ErrorEnvelope};
use crate::id::{HostId, SandboxId};

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type RequestBody = UnsyncBoxBody<Bytes, BoxError>;

/// A WebSocket to a sandbox's envd, through the agent.
pub type EnvdSocket = WebSocketStream<MaybeTlsStream<tokio::net::TcpStream>>;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("host agent {host} at {address} is unreachable: {reason}")]
    Unreachable {
        host: HostId,
        address: String,
        reason: String,
    },
    #[error("host agent {host} did not answer within {}s", .after.as_secs())]
    Timeout { host: HostId, after: Duration },
    /// The agent (or envd behind it) refused the request with a client error.
    #[error("{message}")]
    Rejected {
        status: StatusCode,
        code: ErrorCode,
        message: String,
    },
    /// The agent answered 5xx (or 401: the control plane and agent disagree on the secret).
    #[error("host agent {host} failed: {message} ({status})")]
    Failed {
        host: HostId,
        status: StatusCode,
        message: String,
    },
    #[error("unexpected answer from host agent {host}: {reason}")]
    Decode { host: HostId, reason: String },
}

impl AgentError {
    /// The error code the agent or envd answered with, if it refused the request.
    pub fn rejected_code(&self) -> Option<ErrorCode> {
        match self {
            AgentError::Rejected { code, .. } => Some(*code),
            _ => None,
        }
    }
}

/// Where and how to reach one host's agent.
#[derive(Debug, Clone)]
pub struct AgentTarget {
    pub host: HostId,
    /// `host:port`.
    pub address: String,
    pub secret: String,
}

/// Timeouts for agent calls; creation waits for a VM to boot, so it has its own.
#[derive(Debug, Clone, Copy)]
pub struct AgentTimeouts {
    pub request: Duration,
    pub create: Duration,
}

impl Default for AgentTimeouts {
    fn default() -> Self {
        Self {
            request: Duration::from_secs(30),
            create: Duration::from_secs(180),
        }
    }
}

/// One HTTP connection pool for every agent.
#[derive(Clone, Debug)]
pub struct AgentClient {
    http: Client<HttpConnector, RequestBody>,
    timeouts: AgentTimeouts,
}

impl AgentClient {
    pub fn new(timeouts: AgentTimeouts) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_secs(5)));
        let http = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .build(connector);
        Self { http, timeouts }
    }

    pub fn timeouts(&self) -> AgentTimeouts {
        self.timeouts
    }

    fn full(bytes: impl Into<Bytes>) -> RequestBody {
        Full::new(bytes.into())
            .map_err(|never| match never {})
            .boxed_unsync()
    }

    fn request(
        target: &AgentTarget,
        method: Method,
        path_and_query: &str,
        body: RequestBody,
        content_type: Option<&str>,
    ) -> Request<RequestBody> {
        let mut builder = Request::builder()
            .method(method)
            .uri(format!("http://{}{}", target.address, path_and_query))
            .header(header::AUTHORIZATION, format!("Bearer {}", target.secret));
        if let Some(content_type) = content_type {
            builder = builder.header(header::CONTENT_TYPE, content_type);
        }
        if let Some(id) = crate::request_id::current() {
            builder = builder.header(crate::request_id::HEADER, id);
        }
        builder
            .body(body)
            .expect("method, URI and headers are valid")
    }

    /// Sends a request and waits up to `timeout` for the response head; a non-success answer
    /// becomes a typed error. The body is left to stream.
    async fn send(
        &self,
        target: &AgentTarget,
        request: Request<RequestBody>,
        timeout: Duration,
    ) -> Result<Response<Incoming>, AgentError> {
        let response = match tokio::time::timeout(timeout, self.http.request(request)).await {
            Err(_) => {
                return Err(AgentError::Timeout {
                    host: target.host,
                    after: timeout,
                })
            }
            Ok(Err(error)) => {
                return Err(AgentError::Unreachable {
                    host: target.host,
                    address: target.address.clone(),
                    reason: error_chain(&error),
                })
            }
            Ok(Ok(response)) => response,
        };
        if response.status().is_success() {
            return Ok(response);
        }
        let status = response.status();
        let body = tokio::time::timeout(timeout, response.into_body().collect())
            .await
            .ok()
            .and_then(Result::ok)
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        Err(answer_error(target.host, status, &body))
    }

    async fn json<T: DeserializeOwned>(
        &self,
        target: &AgentTarget,
        method: Method,
        path: &str,
        body: Option<&impl Serialize>,
        timeout: Duration,
    ) -> Result<T, AgentError> {
        let bytes = self.send_json(target, method, path, body, timeout).await?;
        serde_json::from_slice(&bytes).map_err(|e| AgentError::Decode {
            host: target.host,
            reason: e.to_string(),
        })
    }

    async fn send_json(
        &self,
        target: &AgentTarget,
        method: Method,
        path: &str,
        body: Option<&impl Serialize>,
        timeout: Duration,
    ) -> Result<Bytes, AgentError> {
        let request = match body {
            Some(body) => {
                let json = serde_json::to_vec(body).expect("request types serialize");
                Self::request(
                    target,
                    method,
                    path,
                    Self::full(json),
                    Some("application/json"),
                )
            }
            None => Self::request(target, method, path, Self::full(Bytes::new()), None),
        };
        let response = self.send(target, request, timeout).await?;
        let collected = tokio::time::timeout(timeout, response.into_body().collect())
            .await
            .map_err(|_| AgentError::Timeout {
                host: target.host,
                after: timeout,
            })?
            .map_err(|e| AgentError::Unreachable {
                host: target.host,
                address: target.address.clone(),
                reason: error_chain(&e),
            })?;
        Ok(collected.to_bytes())
    }

    pub async fn ping(&self, target: &AgentTarget) -> Result<AgentPing, AgentError> {
        self.json(
            target,
            Method::GET,
            "/v1/ping",
            None::<&()>,
            self.timeouts.request,
        )
        .await
    }

    /// Creates a sandbox and waits until its envd answers; on failure the agent has already
    /// removed whatever it built.
    pub async fn create_sandbox(
        &self,
        target: &AgentTarget,
        request: &CreateSandbox,
    ) -> Result<SandboxInfo, AgentError> {
        self.json(
            target,
            Method::POST,
            "/v1/sandboxes",
            Some(request),
            self.timeouts.create,
        )
        .await
    }

    pub async fn list_sandboxes(
        &self,
        target: &AgentTarget,
    ) -> Result<Vec<SandboxInfo>, AgentError> {
        let list: SandboxList = self
            .json(
                target,
                Method::GET,
                "/v1/sandboxes",
                None::<&()>,
                self.timeouts.request,
            )
            .await?;
        Ok(list.sandboxes)
    }

    pub async fn get_sandbox(
        &self,
        target: &AgentTarget,
        id: SandboxId,
    ) -> Result<SandboxInfo, AgentError> {
        self.json(
            target,
            Method::GET,
            &format!("/v1/sandboxes/{id}"),
            None::<&()>,
            self.timeouts.request,
        )
        .await
    }

    pub async fn destroy_sandbox(
        &self,
        target: &AgentTarget,
        id: SandboxId,
    ) -> Result<(), AgentError> {
        self.send_json(
            target,
            Method::DELETE,
            &format!("/v1/sandboxes/{id}"),
            None::<&()>,
            self.timeouts.request,
        )
        .await
        .map(drop)
    }

    /// Resets the sandbox's idle timer.
    pub async fn ping_sandbox(
        &self,
        target: &AgentTarget,
        id: SandboxId,
    ) -> Result<(), AgentError> {
        self.send_json(
            target,
            Method::POST,
            &format!("/v1/sandboxes/{id}/ping"),
            None::<&()>,
            self.timeouts.request,
        )
        .await
        .map(drop)
    }

    /// A JSON call to the sandbox's envd, e.g. `POST /processes/run`. `extra` extends the
    /// request timeout for calls that legitimately run long (a foreground command).
    pub async fn envd_json<T: DeserializeOwned>(
        &self,
        target: &AgentTarget,
        id: SandboxId,
        method: Method,
        envd_path: &str,
        body: Option<&impl Serialize>,
        extra: Duration,
    ) -> Result<T, AgentError> {
        self.json(
            target,
            method,
            &envd_proxy_path(id, envd_path),
            body,
            self.timeouts.request + extra,
        )
        .await
    }

    /// Like [`Self::envd_json`] for calls whose answer has no body worth reading.
    pub async fn envd_call(
        &self,
        target: &AgentTarget,
        id: SandboxId,
        method: Method,
        envd_path: &str,
        body: Option<&impl Serialize>,
    ) -> Result<(), AgentError> {
        self.send_json(
            target,
            method,
            &envd_proxy_path(id, envd_path),
            body,
            self.timeouts.request,
        )
        .await
        .map(drop)
    }

    /// Streams `body` to envd (`PUT /files?path=...`) without holding it in memory. The request
    /// timeout covers only the wait for the answer's head after the body has been sent.
    pub async fn envd_upload<S>(
        &self,
        target: &AgentTarget,
        id: SandboxId,
        envd_path_and_query: &str,
        body: S,
    ) -> Result<Bytes, AgentError>
    where
        S: Stream<Item = Result<Bytes, BoxError>> + Send + 'static,
    {
        let body = StreamBody::new(body.map_ok(Frame::data)).boxed_unsync();
        let request = Self::request(
            target,
            Method::PUT,
            &envd_proxy_path(id, envd_path_and_query),
            body,
            Some("application/octet-stream"),
        );
        // Uploads take as long as the client takes to send; only a silent agent is an error.
        let response = self
            .send(target, request, Duration::from_secs(24 * 3600))
            .await?;
        let collected = tokio::time::timeout(self.timeouts.request, response.into_body().collect())
            .await
            .map_err(|_| AgentError::Timeout {
                host: target.host,
                after: self.timeouts.request,
            })?
            .map_err(|e| AgentError::Unreachable {
                host: target.host,
                address: target.address.clone(),
                reason: error_chain(&e),
            })?;
        Ok(collected.to_bytes())
    }

    /// Starts a download from envd (`GET /files?path=...`); the body streams as it arrives.
    pub async fn envd_download(
        &self,
        target: &AgentTarget,
        id: SandboxId,
        envd_path_and_query: &str,
    ) -> Result<Response<Incoming>, AgentError> {
        let request = Self::request(
            target,
            Method::GET,
            &envd_proxy_path(id, envd_path_and_query),
            Self::full(Bytes::new()),
            None,
        );
        self.send(target, request, self.timeouts.request).await
    }

    /// Opens a WebSocket to envd (e.g. `/processes/attach`) through the agent.
    pub async fn envd_websocket(
        &self,
        target: &AgentTarget,
        id: SandboxId,
        envd_path: &str,
    ) -> Result<EnvdSocket, AgentError> {
        use tokio_tungstenite::tungstenite::Error as WsError;
        let url = format!("ws://{}{}", target.address, envd_proxy_path(id, envd_path));
        let mut request = url.into_client_request().map_err(|e| AgentError::Decode {
            host: target.host,
            reason: e.to_string(),
        })?;
        request.headers_mut().insert(
            header::AUTHORIZATION,
            format!("Bearer {}", target.secret)
                .parse()
                .expect("hex secrets are valid header values"),
        );
        if let Some(id) = crate::request_id::current() {
            request.headers_mut().insert(crate::request_id::HEADER, id);
        }
        let connect = tokio_tungstenite::connect_async_with_config(request, None, true);
        match tokio::time::timeout(self.timeouts.request, connect).await {
            Err(_) => Err(AgentError::Timeout {
                host: target.host,
                after: self.timeouts.request,
            }),
            Ok(Ok((socket, _))) => Ok(socket),
            Ok(Err(WsError::Http(response))) => {
                let body = response.body().clone().unwrap_or_default();
                Err(answer_error(target.host, response.status(), &body))
            }
            Ok(Err(error)) => Err(AgentError::Unreachable {
                host: target.host,
                address: target.address.clone(),
                reason: error.to_string(),
            }),
        }
    }
}

/// Turns a non-success answer into an error: client errors keep the agent's (or envd's) code,
/// everything else is the agent failing.
fn answer_error(host: HostId, status: StatusCode, body: &[u8]) -> AgentError {
    let detail = serde_json::from_slice::<ErrorEnvelope>(body)
        .map(|e| e.error)
        .unwrap_or_else(|_| ErrorBody {
            code: ErrorCode::Unknown,
            message: String::from_utf8_lossy(body)
                .trim()
                .chars()
                .take(500)
                .collect(),
        });
    if status.is_client_error() && status != StatusCode::UNAUTHORIZED {
        AgentError::Rejected {
            status,
            code: detail.code,
            message: detail.message,
        }
    } else {
        let message = if status == StatusCode::UNAUTHORIZED {
            format!(
                "it rejected the control plane's agent secret ({})",
                detail.message
            )
        } else {
            detail.message
        };
        AgentError::Failed {
            host,
            status,
            message,
        }
    }
}

fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::template::TemplateName;
    use std::collections::BTreeMap;

    #[test]
    fn client_errors_keep_their_code_and_the_rest_is_the_agent_failing() {
        let host = HostId(uuid::Uuid::nil());
        let body = br#"{"error":{"code":"not_found","message":"no such file"}}"#;
        match answer_error(host, StatusCode::NOT_FOUND, body) {
            AgentError::Rejected {
                status,
                code,
                message,
            } => {
                assert_eq!(
                    (status, code.as_str(), message.as_str()),
                    (StatusCode::NOT_FOUND, "not_found", "no such file")
                );
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            answer_error(host, StatusCode::BAD_GATEWAY, b"boom"),
            AgentError::Failed { status: StatusCode::BAD_GATEWAY, ref message, .. } if message == "boom"
        ));
        assert!(matches!(
            answer_error(host, StatusCode::UNAUTHORIZED, b"{}"),
            AgentError::Failed {
                status: StatusCode::UNAUTHORIZED,
                ..
            }
        ));
        assert_eq!(
            envd_proxy_path(SandboxId(uuid::Uuid::from_u128(35)), "/processes/run"),
            format!("/v1/sandboxes/cl-{}z/envd/processes/run", "0".repeat(24))
        );
    }

    #[test]
    fn create_request_matches_the_contract() {
        let request = CreateSandbox {
            sandbox_id: SandboxId(uuid::Uuid::nil()),
            template: TemplateName::default_template(),
            vcpus: 1,
            memory_mb: 512,
            disk_mb: 5120,
            timeout_sec: 0,
            envs: BTreeMap::new(),
            user: None,
        };
        let value = serde_json::to_value(&request).unwrap();
        let mut keys: Vec<&str> = value
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        keys.sort_unstable();
        assert_eq!(
            keys,
            [
                "disk_mb",
                "envs",
                "memory_mb",
                "sandbox_id",
                "template",
                "timeout_sec",
                "user",
                "vcpus"
            ]
        );
    }
}
