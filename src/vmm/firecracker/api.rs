//! Firecracker's HTTP API as typed requests (one struct per endpoint, unset optionals left out
//! of the JSON because Firecracker rejects fields it does not know), and a client for one
//! keep-alive HTTP/1.1 connection on the API socket.

use std::path::{Path, PathBuf};

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use tokio::net::UnixStream;

#[derive(Debug, thiserror::Error)]
pub enum FirecrackerApiError {
    #[error("Firecracker refused {method} {path} ({status}): {fault_message}")]
    Fault {
        method: Method,
        path: String,
        status: StatusCode,
        fault_message: String,
    },
    #[error("Firecracker API {method} {path} failed: {source}")]
    Transport {
        method: Method,
        path: String,
        source: hyper::Error,
    },
    #[error("could not connect to the Firecracker API socket {socket}: {source}")]
    Connect {
        socket: PathBuf,
        source: std::io::Error,
    },
    #[error("Firecracker API handshake on {socket} failed: {source}")]
    Handshake {
        socket: PathBuf,
        source: hyper::Error,
    },
    #[error("Firecracker answered {method} {path} with an unreadable body: {detail}")]
    BadResponse {
        method: Method,
        path: String,
        detail: String,
    },
    #[error("path {0} is not UTF-8 and cannot be sent to Firecracker")]
    NonUtf8Path(PathBuf),
}

/// One request ready to send: what the boot sequence is made of, and what the contract tests
/// check against the swagger.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiCall {
    pub method: Method,
    pub path: String,
    pub body: Option<serde_json::Value>,
}

/// A typed request body and the endpoint it goes to.
pub trait Endpoint: Serialize {
    const METHOD: Method;
    fn path(&self) -> String;

    fn call(&self) -> ApiCall {
        ApiCall {
            method: Self::METHOD,
            path: self.path(),
            body: Some(serde_json::to_value(self).expect("request types serialize")),
        }
    }
}

pub(crate) fn utf8(path: &Path) -> Result<String, FirecrackerApiError> {
    path.to_str()
        .map(str::to_owned)
        .ok_or_else(|| FirecrackerApiError::NonUtf8Path(path.to_path_buf()))
}

/// `PUT /machine-config`.
#[derive(Debug, Clone, Serialize)]
pub struct MachineConfig {
    pub vcpu_count: u32,
    pub mem_size_mib: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub smt: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub track_dirty_pages: Option<bool>,
}

impl Endpoint for MachineConfig {
    const METHOD: Method = Method::PUT;
    fn path(&self) -> String {
        "/machine-config".into()
    }
}

/// `PUT /boot-source`. `boot_args` replaces Firecracker's default command line entirely.
#[derive(Debug, Clone, Serialize)]
pub struct BootSource {
    pub kernel_image_path: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub boot_args: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub initrd_path: Option<String>,
}

impl Endpoint for BootSource {
    const METHOD: Method = Method::PUT;
    fn path(&self) -> String {
        "/boot-source".into()
    }
}

/// `PUT /drives/{drive_id}`: a virtio-blk device backed by a host file.
#[derive(Debug, Clone, Serialize)]
pub struct Drive {
    pub drive_id: String,
    pub path_on_host: String,
    pub is_root_device: bool,
    pub is_read_only: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cache_type: Option<CacheType>,
}

#[derive(Debug, Clone, Copy, Serialize)]
pub enum CacheType {
    Unsafe,
    Writeback,
}

impl Endpoint for Drive {
    const METHOD: Method = Method::PUT;
    fn path(&self) -> String {
        format!("/drives/{}", self.drive_id)
    }
}

/// `PUT /network-interfaces/{iface_id}`: a virtio-net device backed by a host TAP.
#[derive(Debug, Clone, Serialize)]
pub struct NetworkInterface {
    pub iface_id: String,
    pub host_dev_name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guest_mac: Option<String>,
}

impl Endpoint for NetworkInterface {
    const METHOD: Method = Method::PUT;
    fn path(&self) -> String {
        format!("/network-interfaces/{}", self.iface_id)
    }
}

/// `PUT /vsock`: Firecracker binds `uds_path` now, so it must not exist.
#[derive(Debug, Clone, Serialize)]
pub struct Vsock {
    pub guest_cid: u32,
    pub uds_path: String,
}

impl Endpoint for Vsock {
    const METHOD: Method = Method::PUT;
    fn path(&self) -> String {
        "/vsock".into()
    }
}

/// `PUT /actions`.
#[derive(Debug, Clone, Serialize)]
pub struct InstanceAction {
    pub action_type: ActionType,
}

#[derive(Debug, Clone, Copy, Serialize)]
pub enum ActionType {
    InstanceStart,
    /// Presses Ctrl+Alt+Del on the i8042 keyboard controller: the guest reboots and, booted with
    /// `reboot=k`, Firecracker exits.
    SendCtrlAltDel,
}

impl Endpoint for InstanceAction {
    const METHOD: Method = Method::PUT;
    fn path(&self) -> String {
        "/actions".into()
    }
}

/// `PATCH /vm`: pauses or resumes the vCPUs.
#[derive(Debug, Clone, Serialize)]
pub struct VmState {
    pub state: VmRunState,
}

#[derive(Debug, Clone, Copy, Serialize)]
pub enum VmRunState {
    Paused,
    Resumed,
}

impl Endpoint for VmState {
    const METHOD: Method = Method::PATCH;
    fn path(&self) -> String {
        "/vm".into()
    }
}

/// `PUT /snapshot/create`: writes the vmstate and the guest memory of a paused VM; both files
/// are created or truncated.
#[derive(Debug, Clone, Serialize)]
pub struct SnapshotCreate {
    pub snapshot_type: SnapshotType,
    pub snapshot_path: String,
    pub mem_file_path: String,
}

#[derive(Debug, Clone, Copy, Serialize)]
pub enum SnapshotType {
    Full,
    Diff,
}

impl Endpoint for SnapshotCreate {
    const METHOD: Method = Method::PUT;
    fn path(&self) -> String {
        "/snapshot/create".into()
    }
}

/// `PUT /snapshot/load`: accepted only by a fresh process that has configured nothing; a
/// failed load leaves the process unusable.
#[derive(Debug, Clone, Serialize)]
pub struct SnapshotLoad {
    pub snapshot_path: String,
    pub mem_backend: MemBackend,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resume_vm: Option<bool>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub network_overrides: Vec<NetworkOverride>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vsock_override: Option<VsockOverride>,
}

/// Where a restored guest's memory comes from.
#[derive(Debug, Clone, Serialize)]
pub struct MemBackend {
    pub backend_type: MemBackendType,
    pub backend_path: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum MemBackendType {
    /// Firecracker maps the memory file privately; it must stay unchanged while the VM runs.
    File,
    /// A page-fault handler listening on `backend_path` serves the memory (lazy loading).
    Uffd,
}

#[derive(Debug, Clone, Serialize)]
pub struct NetworkOverride {
    pub iface_id: String,
    pub host_dev_name: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct VsockOverride {
    pub uds_path: String,
}

impl Endpoint for SnapshotLoad {
    const METHOD: Method = Method::PUT;
    fn path(&self) -> String {
        "/snapshot/load".into()
    }
}

/// `GET /version`.
pub fn get_version() -> ApiCall {
    ApiCall {
        method: Method::GET,
        path: "/version".into(),
        body: None,
    }
}

/// `GET /`.
pub fn get_instance_info() -> ApiCall {
    ApiCall {
        method: Method::GET,
        path: "/".into(),
        body: None,
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct FirecrackerVersion {
    pub firecracker_version: String,
}

#[derive(Debug, Clone, Deserialize)]
pub struct InstanceInfo {
    pub state: String,
}

#[derive(Debug, Deserialize)]
struct Fault {
    fault_message: String,
}

/// One HTTP/1.1 connection to a Firecracker API socket; requests are sent one at a time, as
/// Firecracker serves them.
pub struct ApiClient {
    sender: SendRequest<Full<Bytes>>,
}

impl ApiClient {
    pub async fn handshake(stream: UnixStream, socket: &Path) -> Result<Self, FirecrackerApiError> {
        let (sender, connection) =
            http1::handshake(TokioIo::new(stream))
                .await
                .map_err(|source| FirecrackerApiError::Handshake {
                    socket: socket.to_path_buf(),
                    source,
                })?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "Firecracker API connection closed");
            }
        });
        Ok(Self { sender })
    }

    /// Sends one call; a 2xx yields the body (empty for 204), anything else a typed error
    /// carrying Firecracker's `fault_message`.
    pub async fn send(&mut self, call: &ApiCall) -> Result<Bytes, FirecrackerApiError> {
        let transport = |source| FirecrackerApiError::Transport {
            method: call.method.clone(),
            path: call.path.clone(),
            source,
        };
        let body = match &call.body {
            Some(json) => Bytes::from(serde_json::to_vec(json).expect("JSON values serialize")),
            None => Bytes::new(),
        };
        let mut request = Request::builder()
            .method(call.method.clone())
            .uri(call.path.as_str())
            .header(http::header::HOST, "localhost")
            .header(http::header::ACCEPT, "application/json");
        if call.body.is_some() {
            // Full bodies have an exact length, so hyper sends Content-Length, never chunks.
            request = request.header(http::header::CONTENT_TYPE, "application/json");
        }
        let request = request
            .body(Full::new(body))
            .expect("method, path and headers are valid");
        self.sender.ready().await.map_err(transport)?;
        let response = self.sender.send_request(request).await.map_err(transport)?;
        let status = response.status();
        let bytes = response
            .into_body()
            .collect()
            .await
            .map_err(transport)?
            .to_bytes();
        if status.is_success() {
            return Ok(bytes);
        }
        let fault_message = serde_json::from_slice::<Fault>(&bytes)
            .map(|f| f.fault_message)
            .unwrap_or_else(|_| String::from_utf8_lossy(&bytes).into_owned());
        Err(FirecrackerApiError::Fault {
            method: call.method.clone(),
            path: call.path.clone(),
            status,
            fault_message,
        })
    }

    pub async fn get<T: for<'de> Deserialize<'de>>(
        &mut self,
        call: &ApiCall,
    ) -> Result<T, FirecrackerApiError> {
        let bytes = self.send(call).await?;
        serde_json::from_slice(&bytes).map_err(|e| FirecrackerApiError::BadResponse {
            method: call.method.clone(),
            path: call.path.clone(),
            detail: e.to_string(),
        })
    }
}
