//! The versioned HTTP/JSON API (`/v1`): parses requests into [`Command`]s for the [`Core`] and
//! renders its replies.
//!
//! Decisions:
//! - **One route table** (`atoll_api::routes`) declares every endpoint once: its method, path,
//!   access, body and reply. The router below registers each route of it with one generic
//!   handler ([`run`]), which checks the route's access, then parses the request into a
//!   [`Command`](atoll_api::Command) with the table's parser; the OpenAPI document
//!   (`/openapi.json`, checked in as `docs/openapi.json` and compared by a test) and the typed
//!   client are built from the same table. The core never sees HTTP.
//! - **Every error is JSON** ([`ErrorBody`]) with a stable `code` and, for bad input, the
//!   offending `field`: syntax errors and type errors name their path (`quotas.vcpus`), unknown
//!   fields are rejected, bodies over the limit get 413, unknown routes 404, wrong methods 405.
//! - **Actions without input** are `POST`s with no documented body. A VM's `start` and `stop`
//!   a cloud's token rotation and accepting an offer accept no body or an empty JSON object (`{}`) and refuse anything else like every other
//!   body (unknown fields by name), so a client cannot believe an option was honoured (`detach`
//!   predates this and ignores a body).
//! - Bearer tokens in `Authorization`; see [`Core::authenticate`]. **The body is read only
//!   after authentication and authorization** (in [`run`], not in a layer before routing):
//!   a caller without a valid token for the route gets its 401 or 403 without the server
//!   reading a byte of the body, however large or slow; a body announced over the limit is
//!   refused (413) before it is read, and one that does not arrive within the request timeout
//!   gets 408.
//! - **A 500 carries an error id, never internals.** Store errors name keys, SQL and etcd URLs;
//!   they are logged as an error event `error <id>: <error>` (field `error_id`) and the caller gets the code,
//!   a generic message and the same `id`, which an operator finds in the log.
//! - Serving (timeouts, connection cap) is [`server`]'s.
//! - **Every request is counted once** ([`crate::metrics::api_request`]), by one layer around
//!   the whole router ([`count`]): each route's handler labels its response with the route's id
//!   ([`RouteLabel`]), `/openapi.json` and `/mcp` with their own names, and what has no label
//!   matched no route (404, 405: `Unmatched`).

mod guest;
mod server;

pub use server::Limits;

use std::{collections::HashMap, sync::Arc, time::Duration};

use atoll_api::routes::{
    self, cloud_param, name_param, Access, Method, Route, OPENAPI_PATH, ROUTES,
};
use axum::{
    body::{Body, Bytes},
    extract::{Path, Query, State},
    http::{header, HeaderMap, StatusCode},
    response::{IntoResponse, Response},
    routing::{get, on, MethodFilter, MethodRouter},
    Router,
};
use http_body_util::BodyExt;

pub use atoll_api::routes::parse_body;

use crate::{
    core::{Core, CoreError, Principal},
    model::*,
    store::StoreError,
};

/// Largest accepted request body.
pub const MAX_BODY_BYTES: usize = 1 << 20;

/// An API error: status plus JSON body.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub body: ErrorBody,
}

impl ApiError {
    pub fn new(
        status: StatusCode,
        code: &str,
        message: impl Into<String>,
        field: Option<String>,
    ) -> Self {
        ApiError {
            status,
            body: ErrorBody {
                error: ErrorDetail {
                    code: code.to_string(),
                    message: message.into(),
                    field,
                    id: None,
                },
            },
        }
    }

    /// A 500: `err` is logged (an error event) under a new error id; the caller gets `code`, a message
    /// that names no internals, and the id.
    pub(crate) fn internal(code: &str, message: &str, err: &dyn std::fmt::Display) -> Self {
        let id = error_id();
        tracing::error!(error_id = %id, "error {id}: {err}");
        let mut e = ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            code,
            format!("{message} (error id {id}; the control plane's log has the details)"),
            None,
        );
        e.body.error.id = Some(id);
        e
    }

    fn field(field: impl Into<String>, message: impl Into<String>) -> Self {
        let field = field.into();
        let message = message.into();
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_field",
            format!("{field}: {message}"),
            Some(field),
        )
    }
}

impl From<CoreError> for ApiError {
    fn from(e: CoreError) -> Self {
        let msg = e.to_string();
        match e {
            CoreError::Unauthenticated => {
                ApiError::new(StatusCode::UNAUTHORIZED, "unauthenticated", msg, None)
            }
            CoreError::Forbidden(_) => ApiError::new(StatusCode::FORBIDDEN, "forbidden", msg, None),
            CoreError::Invalid(f) => ApiError::field(f.field, f.message),
            CoreError::NotFound(_) => ApiError::new(StatusCode::NOT_FOUND, "not_found", msg, None),
            CoreError::Conflict { code, .. } => {
                ApiError::new(StatusCode::CONFLICT, code, msg, None)
            }
            CoreError::QuotaExceeded { field, .. } => ApiError::new(
                StatusCode::CONFLICT,
                "quota_exceeded",
                msg,
                Some(format!("quotas.{field}")),
            ),
            CoreError::OfferRefused(_) => {
                ApiError::new(StatusCode::CONFLICT, "offer_refused", msg, None)
            }
            CoreError::NoHost => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "no_host", msg, None)
            }
            CoreError::Contention(_) => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "contention", msg, None)
            }
            CoreError::TxnTooLarge { .. } => {
                ApiError::new(StatusCode::CONFLICT, "txn_too_large", msg, None)
            }
            // Not planned for by the core (a bug or a misconfiguration): still say which limit.
            CoreError::Store(
                StoreError::TxnTooLarge { .. } | StoreError::EtcdTooManyOps { .. },
            ) => ApiError::internal(
                "store_txn_limit",
                "a store transaction is over the store's limit (store.etcd_max_txn_ops and \
                 etcd's --max-txn-ops)",
                &msg,
            ),
            CoreError::Store(_) | CoreError::CorruptRecord { .. } | CoreError::Random(_) => {
                ApiError::internal("internal", "internal error", &msg)
            }
        }
    }
}

impl From<FieldError> for ApiError {
    fn from(e: FieldError) -> Self {
        ApiError::field(e.field, e.message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        json_response(self.status, &self.body)
    }
}

fn json_response<T: serde::Serialize>(status: StatusCode, v: &T) -> Response {
    let body = serde_json::to_vec(v).expect("API types serialize");
    (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

type ApiResult = Result<Response, ApiError>;

/// A new error id: 16 hex digits, random (a counter would tell callers how many errors others
/// had).
fn error_id() -> String {
    let mut b = [0u8; 8];
    if getrandom::fill(&mut b).is_err() {
        // No randomness: still an id to match the log line by.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        b = t.to_be_bytes();
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// What handlers share: the core and the request timeout.
struct Ctx {
    core: Arc<Core>,
    request_timeout: Duration,
    guests: guest::Forwarder,
}

/// Reads a request's body (after authorization, see the module docs).
async fn read_body(headers: &HeaderMap, body: Body, timeout: Duration) -> Result<Bytes, ApiError> {
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!("request bodies are limited to {MAX_BODY_BYTES} bytes"),
            Some("body".into()),
        )
    };
    let announced = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if announced.is_some_and(|n| n > MAX_BODY_BYTES as u64) {
        return Err(too_large());
    }
    let limited = http_body_util::Limited::new(body, MAX_BODY_BYTES);
    match tokio::time::timeout(timeout, limited.collect()).await {
        Ok(Ok(c)) => Ok(c.to_bytes()),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => Err(too_large()),
        Ok(Err(e)) => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_body",
            format!("reading the body: {e}"),
            Some("body".into()),
        )),
        Err(_) => Err(ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "request_timeout",
            format!(
                "the body did not arrive within {} s (api.request_timeout_secs)",
                timeout.as_secs_f64()
            ),
            Some("body".into()),
        )),
    }
}

/// The caller's principal from `Authorization: Bearer <token>`.
async fn principal(core: &Core, headers: &HeaderMap) -> Result<Principal, ApiError> {
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or(CoreError::Unauthenticated)?;
    Ok(core.authenticate(token.trim()).await?)
}

/// Serves one request on `route`: authenticates and authorizes it (by the route's [`Access`],
/// before anything else is read), then reads the body (if the route takes one), parses the
/// command and executes it.
async fn run(
    ctx: &Ctx,
    route: &'static Route,
    headers: &HeaderMap,
    params: &HashMap<String, String>,
    query: &HashMap<String, String>,
    body: Body,
) -> ApiResult {
    let p = principal(&ctx.core, headers).await?;
    authorize(route, &p, params)?;
    // An upload's body (a file, an exec's stdin) is streamed to the VM's host, not read here.
    if route.stream == Some(routes::Stream::BytesBody) {
        return execute(ctx, route, p, params, query, &[], Some((headers, body))).await;
    }
    // Routes without a documented body still read one: "no body, or `{}`" is checked.
    let bytes = match route.method {
        Method::GET | Method::DELETE => Bytes::new(),
        _ => read_body(headers, body, ctx.request_timeout).await?,
    };
    execute(ctx, route, p, params, query, &bytes, None).await
}

/// Whether `p` may call `route` with these path parameters (its [`Access`]).
fn authorize(
    route: &'static Route,
    p: &Principal,
    params: &HashMap<String, String>,
) -> Result<(), ApiError> {
    match (route.access, p) {
        (_, Principal::Operator) | (Access::Any, _) => {}
        (Access::Operator, _) => {
            return Err(CoreError::Forbidden("use operator routes".into()).into())
        }
        (Access::Cloud, Principal::Cloud(own)) => {
            if cloud_param(params, "cloud")? != *own {
                return Err(CoreError::Forbidden("access another cloud".into()).into());
            }
        }
        (Access::Cloud, Principal::Host(_)) => {
            return Err(CoreError::Forbidden("a host token reaches only its host".into()).into())
        }
        (Access::Host, _) => crate::core::authorize_host(p, &name_param(params, "host")?)?,
    }
    Ok(())
}

/// Parses an authorized request's command and executes it; an exec or file command goes on
/// to the VM's host (with `upload`, the request's headers and unread body, for an upload).
async fn execute(
    ctx: &Ctx,
    route: &'static Route,
    p: Principal,
    params: &HashMap<String, String>,
    query: &HashMap<String, String>,
    bytes: &[u8],
    upload: Option<(&HeaderMap, Body)>,
) -> ApiResult {
    let cmd = routes::parse(route, params, query, bytes)?;
    let reply = ctx.core.execute(p, cmd.clone()).await?;
    if let atoll_api::Reply::Guest(target) = reply {
        let empty = HeaderMap::new();
        let (headers, body) = match upload {
            Some((h, b)) => (h, Some(b)),
            None => (&empty, None),
        };
        return ctx.guests.forward(*target, &cmd, headers, body).await;
    }
    if let atoll_api::Reply::Csv(body) = reply {
        return Ok((
            StatusCode::OK,
            [(header::CONTENT_TYPE, "text/csv; charset=utf-8")],
            body,
        )
            .into_response());
    }
    Ok(match reply.to_json() {
        Some(json) => {
            let status = StatusCode::from_u16(route.status).unwrap_or(StatusCode::OK);
            (status, [(header::CONTENT_TYPE, "application/json")], json).into_response()
        }
        None => StatusCode::NO_CONTENT.into_response(),
    })
}

/// The MCP endpoint (streamable HTTP; `atoll_api::mcp`): `POST` one JSON-RPC message with a
/// cloud's or the operator's token, get its reply as JSON (a notification gets 202 and no
/// body). The server sends no requests or notifications of its own, so there is no stream to
/// open (`GET` and `DELETE`: 405) and no session. Tool calls run here, through the same
/// authorization, parser and core as the API's routes, as the token's principal.
pub const MCP_PATH: &str = "/mcp";

struct CoreBackend {
    ctx: Arc<Ctx>,
    principal: Principal,
}

impl atoll_api::mcp::Backend for CoreBackend {
    fn call<'a>(&'a self, call: &'a atoll_api::mcp::ToolCall) -> atoll_api::mcp::Pending<'a> {
        Box::pin(async move {
            let bytes = call
                .body
                .as_ref()
                .map(|b| serde_json::to_vec(b).expect("JSON values serialize"))
                .unwrap_or_default();
            // An upload's contents go on as the request's body would.
            let mut headers = HeaderMap::new();
            let upload = call.raw.as_ref().map(|raw| {
                headers.insert(header::CONTENT_LENGTH, raw.len().into());
                Body::from(raw.clone())
            });
            let result = match authorize(call.route, &self.principal, &call.params) {
                Ok(()) => {
                    execute(
                        &self.ctx,
                        call.route,
                        self.principal.clone(),
                        &call.params,
                        &call.query,
                        &bytes,
                        upload.map(|b| (&headers, b)),
                    )
                    .await
                }
                Err(e) => Err(e),
            };
            let response = match result {
                Ok(r) => r,
                Err(e) => e.into_response(),
            };
            let status = response.status().as_u16();
            let (parts, body) = response.into_parts();
            let body = axum::body::to_bytes(body, MAX_MCP_REPLY)
                .await
                .unwrap_or_default();
            if (200..300).contains(&status) {
                let header = |n: &str| {
                    parts
                        .headers
                        .get(n)
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_string)
                };
                return (
                    status,
                    atoll_api::mcp::reply_value(call.route, &body, header),
                );
            }
            let v = serde_json::from_slice(&body)
                .unwrap_or_else(|_| serde_json::json!({"text": String::from_utf8_lossy(&body)}));
            (status, v)
        })
    }
}

/// The largest reply a tool call hands back (a page of 1000 clouds is far below).
const MAX_MCP_REPLY: usize = 16 << 20;

async fn mcp(State(ctx): State<Arc<Ctx>>, headers: HeaderMap, body: Body) -> ApiResult {
    let p = principal(&ctx.core, &headers).await?;
    if matches!(p, Principal::Host(_)) {
        return Err(CoreError::Forbidden("a host token reaches only its host".into()).into());
    }
    let bytes = read_body(&headers, body, ctx.request_timeout).await?;
    let message = String::from_utf8_lossy(&bytes);
    let server = atoll_api::mcp::Server::new(
        CoreBackend {
            ctx: ctx.clone(),
            principal: p,
        },
        env!("CARGO_PKG_VERSION"),
    );
    Ok(match server.handle(&message).await {
        Some(reply) => json_response(StatusCode::OK, &reply),
        None => StatusCode::ACCEPTED.into_response(),
    })
}

async fn openapi_json() -> Response {
    json_response(StatusCode::OK, &atoll_api::openapi())
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "no_route", "no such route", None)
}

/// The API router, one entry per route of the table; bodies must arrive within
/// `request_timeout` once a request is authorized.
pub fn router(core: Arc<Core>, request_timeout: Duration) -> Router {
    let mut paths: Vec<(&'static str, MethodRouter<Arc<Ctx>>)> = Vec::new();
    for &route in ROUTES {
        let handler = move |State(ctx): State<Arc<Ctx>>,
                            headers: HeaderMap,
                            params: Option<Path<HashMap<String, String>>>,
                            Query(query): Query<HashMap<String, String>>,
                            body: Body| async move {
            let params = params.map(|Path(p)| p).unwrap_or_default();
            let label = crate::metrics::route_label(route.id);
            labelled(label, run(&ctx, route, &headers, &params, &query, body)).await
        };
        let filter = match route.method {
            Method::GET => MethodFilter::GET,
            Method::POST => MethodFilter::POST,
            Method::PUT => MethodFilter::PUT,
            Method::DELETE => MethodFilter::DELETE,
        };
        match paths.iter_mut().find(|(p, _)| *p == route.path) {
            Some((_, m)) => *m = std::mem::take(m).on(filter, handler),
            None => paths.push((route.path, on(filter, handler))),
        }
    }
    let router = paths
        .into_iter()
        .fold(Router::new(), |r, (path, m)| r.route(path, m));
    router
        .route(
            OPENAPI_PATH,
            get(|| labelled(crate::metrics::ROUTE_OPENAPI, openapi_json())),
        )
        .route(
            MCP_PATH,
            axum::routing::post(|ctx: State<Arc<Ctx>>, headers: HeaderMap, body: Body| {
                labelled(crate::metrics::ROUTE_MCP, mcp(ctx, headers, body))
            }),
        )
        .fallback(not_found)
        .method_not_allowed_fallback(|m: axum::http::Method| async move {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                format!("{m} is not allowed on this route"),
                None,
            )
        })
        .layer(axum::middleware::from_fn(count))
        .with_state(Arc::new(Ctx {
            core,
            request_timeout,
            guests: guest::Forwarder::default(),
        }))
}

/// The `route` label of a response, for [`count`].
#[derive(Debug, Clone, Copy)]
struct RouteLabel(&'static str);

/// `reply`'s response, labelled with `route`.
async fn labelled<R: IntoResponse>(
    route: &'static str,
    reply: impl std::future::Future<Output = R>,
) -> Response {
    let mut response = reply.await.into_response();
    response.extensions_mut().insert(RouteLabel(route));
    response
}

/// Counts every request once, by its response's [`RouteLabel`] (none: it matched no route),
/// status and time to the response's head.
async fn count(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let started = std::time::Instant::now();
    let response = next.run(req).await;
    let route = response
        .extensions()
        .get::<RouteLabel>()
        .map_or(crate::metrics::ROUTE_UNMATCHED, |l| l.0);
    crate::metrics::api_request(
        route,
        response.status().as_u16(),
        started.elapsed().as_secs_f64(),
    );
    response
}

/// Serves the API on `listener` with the default [`Limits`] until `shutdown` resolves.
pub async fn serve(
    core: Arc<Core>,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    serve_with_limits(core, listener, Limits::default(), shutdown).await
}

/// Serves the API on `listener` within `limits` until `shutdown` resolves.
pub async fn serve_with_limits(
    core: Arc<Core>,
    listener: tokio::net::TcpListener,
    limits: Limits,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    serve_tls(core, listener, limits, None, shutdown).await
}

/// Serves the API on `listener` within `limits`, over TLS with `tls` (plain HTTP without),
/// until `shutdown` resolves.
pub async fn serve_tls(
    core: Arc<Core>,
    listener: tokio::net::TcpListener,
    limits: Limits,
    tls: Option<Arc<rustls::ServerConfig>>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let router = router(core, limits.request_timeout);
    server::serve(router, listener, limits, tls, shutdown).await
}

/// Serves another `router` (the metrics listener's, [`crate::metrics::serve`]) over plain HTTP
/// with the API server's connection handling within `limits`, until `shutdown` resolves.
pub(crate) async fn serve_router(
    router: Router,
    listener: tokio::net::TcpListener,
    limits: Limits,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    server::serve(router, listener, limits, None, shutdown).await
}
