//! The HTTP surface: every route, registered once through [`Routes`] so the list of what we
//! serve (checked against `docs/openapi.yaml` by the tests) cannot drift from the router.

mod accounts;
mod api_keys;
mod audit_logs;
mod builds;
mod capsule_ws;
mod capsules;
mod channels;
mod events;
mod hosts;
mod meta;
mod pools;

pub use meta::OPENAPI_YAML;
mod teams;
mod templates;
mod users;

use axum::http::{Method, StatusCode};
use axum::routing::MethodRouter;
use axum::Router;

use super::error::ApiError;
use super::state::AppState;

/// A served route: method and path as the OpenAPI document spells them (`/v1/...`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub method: Method,
    pub path: &'static str,
}

/// Collects routes and the list of them.
#[derive(Default)]
struct Routes {
    router: Router<AppState>,
    served: Vec<Route>,
}

impl Routes {
    fn add(mut self, method: Method, path: &'static str, handler: MethodRouter<AppState>) -> Self {
        self.served.push(Route { method, path });
        self.router = self.router.route(path, handler);
        self
    }
}

/// The capsule API under `$base` (`/v1/capsules`, and `/v1/sandboxes` as an alias).
macro_rules! capsule_routes {
    ($routes:expr, $base:literal) => {{
        use axum::extract::DefaultBodyLimit;
        use axum::routing::{delete, get, post};
        let upload = || post(capsules::write_file).layer(DefaultBodyLimit::disable());
        $routes
            .add(Method::POST, $base, post(capsules::create))
            .add(Method::GET, $base, get(capsules::list))
            .add(Method::GET, concat!($base, "/{id}"), get(capsules::get))
            .add(
                Method::DELETE,
                concat!($base, "/{id}"),
                delete(capsules::destroy),
            )
            .add(
                Method::POST,
                concat!($base, "/{id}/ping"),
                post(capsules::ping),
            )
            .add(
                Method::POST,
                concat!($base, "/{id}/pause"),
                post(capsules::pause),
            )
            .add(
                Method::POST,
                concat!($base, "/{id}/resume"),
                post(capsules::resume),
            )
            .add(
                Method::POST,
                concat!($base, "/{id}/exec"),
                post(capsules::exec),
            )
            .add(
                Method::GET,
                concat!($base, "/{id}/exec/stream"),
                get(capsule_ws::exec_stream),
            )
            .add(
                Method::GET,
                concat!($base, "/{id}/processes"),
                get(capsules::list_processes),
            )
            .add(
                Method::DELETE,
                concat!($base, "/{id}/processes/{selector}"),
                delete(capsules::kill_process),
            )
            .add(
                Method::GET,
                concat!($base, "/{id}/processes/{selector}/stream"),
                get(capsule_ws::process_stream),
            )
            .add(
                Method::GET,
                concat!($base, "/{id}/pty"),
                get(capsule_ws::pty),
            )
            .add(Method::POST, concat!($base, "/{id}/files/write"), upload())
            .add(
                Method::POST,
                concat!($base, "/{id}/files/stream/write"),
                upload(),
            )
            .add(
                Method::POST,
                concat!($base, "/{id}/files/read"),
                post(capsules::read_file),
            )
            .add(
                Method::POST,
                concat!($base, "/{id}/files/stream/read"),
                post(capsules::stream_read_file),
            )
            .add(
                Method::POST,
                concat!($base, "/{id}/files/list"),
                post(capsules::list_dir),
            )
            .add(
                Method::POST,
                concat!($base, "/{id}/files/mkdir"),
                post(capsules::mkdir),
            )
            .add(
                Method::POST,
                concat!($base, "/{id}/files/remove"),
                post(capsules::remove),
            )
    }};
}

fn capsule_api(routes: Routes) -> Routes {
    let routes = capsule_routes!(routes, "/v1/capsules");
    capsule_routes!(routes, "/v1/sandboxes")
        .add(
            Method::POST,
            "/v1/capsules/{id}/fork",
            axum::routing::post(capsules::fork),
        )
        .add(
            Method::GET,
            "/v1/capsules/{id}/network",
            axum::routing::get(capsules::network),
        )
        .add(
            Method::PUT,
            "/v1/capsules/{id}/network",
            axum::routing::put(capsules::set_network),
        )
        .add(
            Method::POST,
            "/v1/capsules/{id}/traffic-token",
            axum::routing::post(capsules::traffic_token),
        )
        .add(
            Method::GET,
            "/v1/capsules/{id}/metrics",
            axum::routing::get(capsules::metrics),
        )
        .add(
            Method::GET,
            "/v1/capsules/stats",
            axum::routing::get(pools::stats),
        )
        .add(
            Method::GET,
            "/v1/capsules/usage",
            axum::routing::get(pools::usage),
        )
}

fn api() -> Routes {
    use axum::extract::DefaultBodyLimit;
    use axum::routing::{delete, get, patch, post, put};
    let routes = Routes::default()
        .add(Method::POST, "/v1/auth/signup", post(accounts::signup))
        .add(Method::POST, "/v1/auth/login", post(accounts::login))
        .add(
            Method::POST,
            "/v1/auth/switch-team",
            post(accounts::switch_team),
        )
        .add(Method::GET, "/v1/me", get(accounts::me))
        .add(Method::PATCH, "/v1/me", patch(accounts::rename_me))
        .add(Method::POST, "/v1/api-keys", post(api_keys::create))
        .add(Method::GET, "/v1/api-keys", get(api_keys::list))
        .add(
            Method::DELETE,
            "/v1/api-keys/{id}",
            delete(api_keys::revoke),
        )
        .add(Method::GET, "/v1/snapshots", get(templates::list))
        .add(
            Method::POST,
            "/v1/snapshots",
            post(templates::create_snapshot),
        )
        .add(
            Method::DELETE,
            "/v1/snapshots/{name}",
            delete(templates::delete),
        )
        .add(Method::GET, "/v1/teams", get(teams::list))
        .add(Method::POST, "/v1/teams", post(teams::create))
        .add(Method::GET, "/v1/teams/{id}", get(teams::get))
        .add(Method::PATCH, "/v1/teams/{id}", patch(teams::rename))
        .add(Method::DELETE, "/v1/teams/{id}", delete(teams::delete))
        .add(Method::GET, "/v1/teams/{id}/members", get(teams::members))
        .add(
            Method::POST,
            "/v1/teams/{id}/members",
            post(teams::add_member),
        )
        .add(
            Method::PATCH,
            "/v1/teams/{id}/members/{uid}",
            patch(teams::set_member_role),
        )
        .add(
            Method::DELETE,
            "/v1/teams/{id}/members/{uid}",
            delete(teams::remove_member),
        )
        .add(Method::POST, "/v1/teams/{id}/leave", post(teams::leave))
        .add(Method::GET, "/v1/teams/{id}/pool", get(pools::team_pool))
        .add(Method::GET, "/v1/events/stream", get(events::stream))
        .add(Method::GET, "/v1/audit-logs", get(audit_logs::list))
        .add(Method::POST, "/v1/channels", post(channels::create))
        .add(Method::GET, "/v1/channels", get(channels::list))
        .add(Method::POST, "/v1/channels/test", post(channels::test))
        .add(Method::GET, "/v1/channels/{id}", get(channels::get))
        .add(Method::PATCH, "/v1/channels/{id}", patch(channels::update))
        .add(
            Method::DELETE,
            "/v1/channels/{id}",
            delete(channels::delete),
        )
        .add(
            Method::PUT,
            "/v1/channels/{id}/config",
            put(channels::rotate_config),
        )
        .add(
            Method::GET,
            "/v1/channels/{id}/deliveries",
            get(channels::deliveries),
        )
        .add(Method::GET, "/v1/admin/plans", get(pools::list_plans))
        .add(Method::POST, "/v1/admin/plans", post(pools::create_plan))
        .add(Method::GET, "/v1/admin/plans/{name}", get(pools::get_plan))
        .add(
            Method::PATCH,
            "/v1/admin/plans/{name}",
            patch(pools::update_plan),
        )
        .add(
            Method::DELETE,
            "/v1/admin/plans/{name}",
            delete(pools::delete_plan),
        )
        .add(
            Method::PUT,
            "/v1/admin/teams/{id}/plan",
            put(pools::assign_plan),
        )
        .add(Method::POST, "/v1/hosts", post(hosts::create))
        .add(Method::GET, "/v1/hosts", get(hosts::list))
        .add(Method::GET, "/v1/hosts/{id}", get(hosts::get))
        .add(Method::DELETE, "/v1/hosts/{id}", delete(hosts::delete))
        .add(
            Method::POST,
            "/v1/hosts/{id}/token",
            post(hosts::regenerate_token),
        )
        .add(Method::POST, "/v1/hosts/register", post(hosts::register))
        .add(
            Method::POST,
            "/v1/hosts/{id}/heartbeat",
            post(hosts::heartbeat),
        )
        .add(Method::POST, "/v1/hosts/auth/refresh", post(hosts::refresh))
        .add(
            Method::GET,
            "/v1/hosts/{id}/delete-preview",
            get(hosts::delete_preview),
        )
        .add(Method::GET, "/v1/hosts/{id}/tags", get(hosts::tags))
        .add(Method::POST, "/v1/hosts/{id}/tags", post(hosts::add_tag))
        .add(
            Method::DELETE,
            "/v1/hosts/{id}/tags/{tag}",
            delete(hosts::remove_tag),
        )
        .add(
            Method::PUT,
            "/v1/admin/users/{id}/active",
            put(users::set_active),
        )
        .add(
            Method::POST,
            "/v1/admin/templates/{name}/publish",
            post(templates::publish),
        )
        .add(
            Method::POST,
            "/v1/admin/templates/{name}/import",
            post(templates::import).layer(DefaultBodyLimit::disable()),
        )
        .add(
            Method::POST,
            "/v1/admin/builds",
            post(builds::create).layer(DefaultBodyLimit::disable()),
        )
        .add(Method::GET, "/v1/admin/builds", get(builds::list))
        .add(Method::GET, "/v1/admin/builds/{id}", get(builds::get))
        .add(
            Method::POST,
            "/v1/admin/builds/{id}/cancel",
            post(builds::cancel),
        )
        .add(Method::GET, "/v1/admin/builds/{id}/logs", get(builds::logs));
    capsule_api(routes)
}

fn unversioned() -> Routes {
    use axum::routing::get;
    Routes::default()
        .add(Method::GET, "/health", get(meta::health))
        .add(Method::GET, "/openapi.yaml", get(meta::openapi))
        .add(Method::GET, "/metrics", get(super::prometheus::scrape))
}

/// Every route the control plane serves (API routes also answer under `/api`).
pub fn served() -> Vec<Route> {
    let mut all = unversioned().served;
    all.extend(api().served);
    all
}

async fn not_found() -> ApiError {
    ApiError::NotFound("no such endpoint".into())
}

async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed("method not allowed on this endpoint".into())
}

/// The router without middleware: `/health`, `/openapi.yaml`, and the API under both `/v1` and
/// `/api/v1` (SDK base URLs may end in `/api`).
pub fn router(state: AppState) -> Router {
    let api = api().router;
    Router::new()
        .merge(unversioned().router)
        .merge(api.clone())
        .nest("/api", api)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            super::audit::record,
        ))
        .layer(axum::middleware::from_fn(super::prometheus::count))
        .with_state(state)
}

/// `204 No Content` for handlers with nothing to return.
pub(crate) fn no_content() -> StatusCode {
    StatusCode::NO_CONTENT
}
