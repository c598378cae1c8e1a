//! The audit layer: one row in `audit_logs` for every mutating API request by an identified
//! caller, with the caller, their address, the resource and the outcome.
//!
//! The auth extractors run inside the handler, after this layer has passed the request on, so
//! they write the caller into an [`AuditSlot`] the layer put in the request and reads back
//! once the response is made. Routes whose services record their changes themselves (in the
//! transaction that makes them, with more detail) get a row from here only when refused.
//! Signups and logins identify nobody to this layer; the accounts service records them.
//! Not recorded: reads that happen to be POSTs (file reads and listings), logins naming no
//! account (the login limits count them) and the host agents' own traffic (heartbeats, token
//! refreshes; their service records registrations and token reuse).

use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::extract::{MatchedPath, RawPathParams, Request, State};
use axum::http::request::Parts;
use axum::http::{Method, Response};
use axum::middleware::Next;
use serde_json::{json, Value};
use uuid::Uuid;

use super::events::Actor;
use super::extract::ClientAddr;
use super::state::AppState;
use crate::db::audit_logs::{self, Entry, RequestEntry};

/// The caller of a request, as its auth extractor found it.
#[derive(Debug, Clone)]
pub struct Caller {
    pub team: Option<Uuid>,
    pub actor: Actor,
}

#[derive(Debug, Clone, Default)]
pub struct AuditSlot(Arc<Mutex<Option<Caller>>>);

/// Called by the auth extractors once they know who calls.
pub fn note(parts: &Parts, team: Option<Uuid>, actor: Actor) {
    if let Some(slot) = parts.extensions.get::<AuditSlot>() {
        *slot.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(Caller { team, actor });
    }
}

/// How a mutating route is audited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Audit {
    /// By this layer, every outcome.
    Request {
        resource: &'static str,
        action: &'static str,
    },
    /// By its service on success; by this layer when refused.
    Service {
        resource: &'static str,
        action: &'static str,
    },
    Skip,
}

const fn request(resource: &'static str, action: &'static str) -> Audit {
    Audit::Request { resource, action }
}

const fn service(resource: &'static str, action: &'static str) -> Audit {
    Audit::Service { resource, action }
}

/// Every mutating route, by method and path as the router matches them (`/v1/sandboxes/...`
/// and `/api/...` are looked up as their `/v1/capsules/...` and `/v1/...` twins).
const ROUTES: &[(&str, &str, Audit)] = &[
    ("POST", "/v1/capsules", request("capsule", "create")),
    ("DELETE", "/v1/capsules/{id}", request("capsule", "destroy")),
    (
        "POST",
        "/v1/capsules/{id}/pause",
        request("capsule", "pause"),
    ),
    (
        "POST",
        "/v1/capsules/{id}/resume",
        request("capsule", "resume"),
    ),
    ("POST", "/v1/capsules/{id}/fork", request("capsule", "fork")),
    (
        "PUT",
        "/v1/capsules/{id}/network",
        request("capsule", "set_network"),
    ),
    (
        "POST",
        "/v1/capsules/{id}/traffic-token",
        request("capsule", "issue_traffic_token"),
    ),
    ("POST", "/v1/capsules/{id}/ping", request("capsule", "ping")),
    ("POST", "/v1/capsules/{id}/exec", request("capsule", "exec")),
    (
        "DELETE",
        "/v1/capsules/{id}/processes/{selector}",
        request("capsule", "kill_process"),
    ),
    (
        "POST",
        "/v1/capsules/{id}/files/write",
        request("capsule", "write_file"),
    ),
    (
        "POST",
        "/v1/capsules/{id}/files/stream/write",
        request("capsule", "write_file"),
    ),
    (
        "POST",
        "/v1/capsules/{id}/files/mkdir",
        request("capsule", "mkdir"),
    ),
    (
        "POST",
        "/v1/capsules/{id}/files/remove",
        request("capsule", "remove_file"),
    ),
    // Reads that take their arguments in a POST body change nothing.
    ("POST", "/v1/capsules/{id}/files/read", Audit::Skip),
    ("POST", "/v1/capsules/{id}/files/stream/read", Audit::Skip),
    ("POST", "/v1/capsules/{id}/files/list", Audit::Skip),
    // Nobody is identified before signing in, so this layer records nothing here: the accounts
    // service records signups and the logins to existing accounts, refused or not; the login
    // limits count the rest.
    ("POST", "/v1/auth/signup", service("user", "signup")),
    ("POST", "/v1/auth/login", service("user", "login")),
    (
        "POST",
        "/v1/auth/switch-team",
        request("user", "switch_team"),
    ),
    ("PATCH", "/v1/me", request("user", "rename")),
    ("POST", "/v1/api-keys", service("api_key", "create")),
    ("DELETE", "/v1/api-keys/{id}", service("api_key", "revoke")),
    ("POST", "/v1/snapshots", request("template", "snapshot")),
    (
        "DELETE",
        "/v1/snapshots/{name}",
        request("template", "delete"),
    ),
    ("POST", "/v1/teams", request("team", "create")),
    ("PATCH", "/v1/teams/{id}", request("team", "rename")),
    ("DELETE", "/v1/teams/{id}", service("team", "delete")),
    ("POST", "/v1/teams/{id}/members", request("member", "add")),
    (
        "PATCH",
        "/v1/teams/{id}/members/{uid}",
        request("member", "set_role"),
    ),
    (
        "DELETE",
        "/v1/teams/{id}/members/{uid}",
        request("member", "remove"),
    ),
    ("POST", "/v1/teams/{id}/leave", request("member", "leave")),
    ("POST", "/v1/channels", service("channel", "create")),
    ("POST", "/v1/channels/test", request("channel", "test")),
    ("PATCH", "/v1/channels/{id}", service("channel", "update")),
    ("DELETE", "/v1/channels/{id}", service("channel", "delete")),
    (
        "PUT",
        "/v1/channels/{id}/config",
        service("channel", "rotate_config"),
    ),
    ("POST", "/v1/admin/plans", service("plan", "create")),
    ("PATCH", "/v1/admin/plans/{name}", service("plan", "update")),
    (
        "DELETE",
        "/v1/admin/plans/{name}",
        service("plan", "delete"),
    ),
    (
        "PUT",
        "/v1/admin/teams/{id}/plan",
        service("team", "assign_plan"),
    ),
    (
        "PUT",
        "/v1/admin/users/{id}/active",
        service("user", "set_active"),
    ),
    ("POST", "/v1/hosts", service("host", "create")),
    ("DELETE", "/v1/hosts/{id}", service("host", "delete")),
    (
        "POST",
        "/v1/hosts/{id}/token",
        request("host", "regenerate_token"),
    ),
    ("POST", "/v1/hosts/{id}/tags", request("host", "add_tag")),
    (
        "DELETE",
        "/v1/hosts/{id}/tags/{tag}",
        request("host", "remove_tag"),
    ),
    // The agent's own traffic: its service records registrations and token reuse.
    ("POST", "/v1/hosts/register", Audit::Skip),
    ("POST", "/v1/hosts/{id}/heartbeat", Audit::Skip),
    ("POST", "/v1/hosts/auth/refresh", Audit::Skip),
    (
        "POST",
        "/v1/admin/templates/{name}/publish",
        request("template", "publish"),
    ),
    (
        "POST",
        "/v1/admin/templates/{name}/import",
        request("template", "import"),
    ),
    ("POST", "/v1/admin/builds", request("build", "create")),
    (
        "POST",
        "/v1/admin/builds/{id}/cancel",
        request("build", "cancel"),
    ),
];

pub fn mutating(method: &Method) -> bool {
    matches!(
        *method,
        Method::POST | Method::PUT | Method::PATCH | Method::DELETE
    )
}

/// How `method` on the route `path` is audited; `None` for a route missing from the table
/// (a test keeps it complete).
pub fn audit_of(method: &Method, path: &str) -> Option<Audit> {
    let path = path.strip_prefix("/api").unwrap_or(path);
    let canonical;
    let path = match path.strip_prefix("/v1/sandboxes") {
        Some(rest) => {
            canonical = format!("/v1/capsules{rest}");
            canonical.as_str()
        }
        None => path,
    };
    ROUTES
        .iter()
        .find(|(m, p, _)| *m == method.as_str() && *p == path)
        .map(|(_, _, audit)| *audit)
}

/// The largest created-resource answer read for its ID.
const CREATED_BODY_LIMIT: u64 = 64 * 1024;

/// The layer (`axum::middleware::from_fn_with_state`).
pub async fn record(
    State(state): State<AppState>,
    matched: Option<MatchedPath>,
    params: Result<RawPathParams, axum::extract::rejection::RawPathParamsRejection>,
    client: ClientAddr,
    mut request: Request,
    next: Next,
) -> Response<Body> {
    let method = request.method().clone();
    let audit = match (&matched, mutating(&method)) {
        (Some(path), true) => audit_of(&method, path.as_str()),
        _ => None,
    };
    let (resource, action, by_service) = match audit {
        Some(Audit::Request { resource, action }) => (resource, action, false),
        Some(Audit::Service { resource, action }) => (resource, action, true),
        Some(Audit::Skip) | None => return next.run(request).await,
    };
    let slot = AuditSlot::default();
    request.extensions_mut().insert(slot.clone());
    let response = next.run(request).await;
    let caller = slot.0.lock().unwrap_or_else(|e| e.into_inner()).take();
    let Some(caller) = caller else {
        // Nobody identified (a 401): nothing to say who did it.
        return response;
    };
    let success = response.status().is_success();
    if success && by_service {
        return response;
    }
    let path_params: serde_json::Map<String, Value> = params
        .map(|params| {
            params
                .iter()
                .map(|(name, value)| (name.to_owned(), Value::from(value)))
                .collect()
        })
        .unwrap_or_default();
    // A member row is about the member (`uid`), not the team the path names first.
    let mut resource_id = ["uid", "id", "name"]
        .iter()
        .find_map(|name| path_params.get(*name).and_then(Value::as_str))
        .map(str::to_owned);
    let response = if success && resource_id.is_none() {
        let (response, created) = created_id(response).await;
        resource_id = created;
        response
    } else {
        response
    };
    let entry = RequestEntry {
        entry: Entry {
            team_id: caller.team,
            actor_type: caller.actor.kind,
            actor_id: caller.actor.id,
            resource_type: resource,
            resource_id,
            action,
            metadata: json!({"method": method.as_str(),
                             "path": matched.as_ref().map(MatchedPath::as_str),
                             "params": path_params,
                             "http_status": response.status().as_u16()}),
        },
        actor_name: caller.actor.name,
        status: if success { "success" } else { "error" },
        client_address: client.0.map(|ip| ip.to_string()),
    };
    if let Err(error) = audit_logs::insert_request(&state.db, entry).await {
        tracing::warn!(%error, resource, action, "could not record an audit log row");
    }
    response
}

/// The ID of what a create made, from its (small, JSON) answer, which is passed on unchanged.
async fn created_id(response: Response<Body>) -> (Response<Body>, Option<String>) {
    use axum::body::HttpBody as _;
    let small = response
        .body()
        .size_hint()
        .exact()
        .is_some_and(|n| n <= CREATED_BODY_LIMIT);
    if !small {
        return (response, None);
    }
    let (parts, body) = response.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, CREATED_BODY_LIMIT as usize).await else {
        return (Response::from_parts(parts, Body::empty()), None);
    };
    let id = serde_json::from_slice::<Value>(&bytes).ok().and_then(|v| {
        ["id", "capsule_id", "name"]
            .iter()
            .find_map(|key| v.get(*key).and_then(Value::as_str).map(str::to_owned))
    });
    (Response::from_parts(parts, Body::from(bytes)), id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cp::routes;

    #[test]
    fn every_mutating_route_says_how_it_is_audited() {
        let missing: Vec<String> = routes::served()
            .into_iter()
            .filter(|r| mutating(&r.method) && audit_of(&r.method, r.path).is_none())
            .map(|r| format!("{} {}", r.method, r.path))
            .collect();
        assert!(missing.is_empty(), "not in the audit table: {missing:?}");
        for (method, path, _) in ROUTES {
            let method: Method = method.parse().unwrap();
            assert!(
                routes::served()
                    .iter()
                    .any(|r| r.method == method && r.path == *path),
                "{method} {path} is not served"
            );
        }
        assert_eq!(
            audit_of(&Method::DELETE, "/api/v1/sandboxes/{id}"),
            Some(request("capsule", "destroy"))
        );
    }
}
