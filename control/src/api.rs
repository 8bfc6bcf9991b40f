//! The versioned HTTP/JSON API (`/v1`): parses requests into [`Command`]s for the [`Core`] and
//! renders its replies.
//!
//! Decisions:
//! - **One route table** ([`ROUTES`]) drives both the router's documentation and the OpenAPI 3
//!   document (`/openapi.json`, checked in as `docs/openapi.json` and compared by a test), with
//!   the schemas derived from the model types, so the document cannot drift from the code.
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

mod server;

pub use server::Limits;

use std::{collections::HashMap, sync::Arc, time::Duration};

use axum::{
    body::{Body, Bytes},
    extract::{Path, Query, State},
    http::{header, HeaderMap, Method, StatusCode},
    response::{IntoResponse, Response},
    routing::{get, post},
    Router,
};
use http_body_util::BodyExt;
use serde::de::DeserializeOwned;

use crate::{
    core::{Command, Core, CoreError, Principal, Reply},
    model::*,
    store::StoreError,
};

/// Largest accepted request body.
pub const MAX_BODY_BYTES: usize = 1 << 20;
/// Longest a host sync may wait for changes.
pub const MAX_SYNC_WAIT: Duration = Duration::from_secs(60);

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
    fn internal(code: &str, message: &str, err: &dyn std::fmt::Display) -> Self {
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

/// Parses a JSON body strictly, naming the failing field.
pub fn parse_body<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    if bytes.is_empty() {
        return Err(ApiError::field("body", "a JSON body is required"));
    }
    // serde would also accept a struct as a positional array; bodies are objects only.
    if bytes.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(ApiError::field("body", "must be a JSON object"));
    }
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        // `?`: serde_path_to_error could not tell the field (a truncated object, `{`).
        let mut field = if path == "." || path == "?" {
            "body".to_string()
        } else {
            path
        };
        let msg = inner.to_string();
        // serde names an unknown or missing field in the message only; put it in the path.
        for marker in ["unknown field `", "missing field `"] {
            if let Some(rest) = msg.split(marker).nth(1) {
                if let Some(name) = rest.split('`').next().filter(|n| !field.ends_with(n)) {
                    field = if field == "body" {
                        name.to_string()
                    } else {
                        format!("{field}.{name}")
                    };
                }
            }
        }
        ApiError::field(field, msg)
    })
}

/// The body of a route that takes none: empty, or an empty JSON object.
fn parse_no_body(bytes: &[u8]) -> Result<(), ApiError> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Empty {}
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(());
    }
    parse_body::<Empty>(bytes).map(|_| ())
}

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

fn cloud_param(p: &HashMap<String, String>, name: &str) -> Result<CloudId, ApiError> {
    let raw = p.get(name).map(String::as_str).unwrap_or_default();
    raw.parse::<CloudId>()
        .map_err(|e| ApiError::field(name, e.message))
}

fn name_param(p: &HashMap<String, String>, name: &str) -> Result<String, ApiError> {
    let raw = p.get(name).cloned().unwrap_or_default();
    if name == "name" {
        // DNS record names may be dotted or `@`; validated by the core.
        return Ok(raw);
    }
    validate_label(name, &raw).map_err(|e| ApiError::field(e.field, e.message))?;
    Ok(raw)
}

fn record_type(p: &HashMap<String, String>) -> Result<RecordType, ApiError> {
    let raw = p.get("type").map(String::as_str).unwrap_or_default();
    match raw.to_ascii_uppercase().as_str() {
        "A" => Ok(RecordType::A),
        "AAAA" => Ok(RecordType::Aaaa),
        "CNAME" => Ok(RecordType::Cname),
        "TXT" => Ok(RecordType::Txt),
        _ => Err(ApiError::field(
            "type",
            format!("{raw:?} is not one of A, AAAA, CNAME, TXT"),
        )),
    }
}

/// Who may call a route, checked before the request is parsed so that a foreign or missing
/// token never learns anything from validation errors.
#[derive(Clone, Copy)]
enum Access {
    /// The operator, or the token of the cloud in the path.
    Cloud,
    Operator,
    /// The operator, or the token of the host in the path (an agent).
    Host,
    /// Any valid token (the core narrows what it returns).
    Any,
}

/// Authenticates and authorizes the request, then reads `body` (if the route takes one), then
/// builds the command with `cmd` and executes it.
async fn run(
    ctx: &Ctx,
    headers: &HeaderMap,
    access: Access,
    params: &HashMap<String, String>,
    body: Option<Body>,
    cmd: impl FnOnce(Bytes) -> Result<Command, ApiError>,
    created: bool,
) -> ApiResult {
    let core = &ctx.core;
    let p = principal(core, headers).await?;
    match (access, &p) {
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
        (Access::Host, _) => crate::core::authorize_host(&p, &name_param(params, "host")?)?,
    }
    let bytes = match body {
        Some(body) => read_body(headers, body, ctx.request_timeout).await?,
        None => Bytes::new(),
    };
    let reply = core.execute(p, cmd(bytes)?).await?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok(match reply {
        Reply::CreatedCloud(c) => json_response(status, &*c),
        Reply::CloudToken(c) => json_response(status, &*c),
        Reply::Cloud(c) => json_response(status, &*c),
        Reply::Clouds(v) => json_response(status, &v),
        Reply::Vm(v) => json_response(status, &*v),
        Reply::Vms(v) => json_response(status, &v),
        Reply::Console(v) => json_response(status, &v),
        Reply::Volume(v) => json_response(status, &v),
        Reply::Volumes(v) => json_response(status, &v),
        Reply::RecordSet(v) => json_response(status, &v),
        Reply::RecordSets(v) => json_response(status, &v),
        Reply::Exposure(v) => json_response(status, &v),
        Reply::Exposures(v) => json_response(status, &v),
        Reply::Grant(v) => json_response(status, &v),
        Reply::Grants(v) => json_response(status, &v),
        // Not a grant yet: 202 whatever the consumer (see `Core`'s "Grants are offers").
        Reply::Offer(v) => json_response(StatusCode::ACCEPTED, &v),
        Reply::Offers(v) => json_response(status, &v),
        Reply::OfferPolicy(v) => json_response(status, &v),
        Reply::Host(v) => json_response(status, &v),
        Reply::HostToken(v) => json_response(status, &*v),
        Reply::Hosts(v) => json_response(status, &v),
        Reply::Done => StatusCode::NO_CONTENT.into_response(),
    })
}

type P = Path<HashMap<String, String>>;
type S = State<Arc<Ctx>>;
type Q = Query<HashMap<String, String>>;

/// A handler for a route with path parameters `p` (and a body `b` when `$body`), building its
/// command with `$cmd`.
macro_rules! handler {
    ($name:ident, $access:expr, $created:expr, |$p:ident| $cmd:expr) => {
        async fn $name(State(ctx): S, headers: HeaderMap, Path($p): P) -> ApiResult {
            run(&ctx, &headers, $access, &$p, None, |_| Ok($cmd), $created).await
        }
    };
    ($name:ident, $access:expr, $created:expr, |$p:ident, $b:ident| $cmd:expr) => {
        async fn $name(State(ctx): S, headers: HeaderMap, Path($p): P, body: Body) -> ApiResult {
            run(
                &ctx,
                &headers,
                $access,
                &$p,
                Some(body),
                |$b| Ok($cmd),
                $created,
            )
            .await
        }
    };
}

const C: Access = Access::Cloud;

async fn create_cloud(State(ctx): S, headers: HeaderMap, body: Body) -> ApiResult {
    let cmd = |b: Bytes| {
        Ok(Command::CreateCloud {
            spec: parse_body(&b)?,
        })
    };
    run(
        &ctx,
        &headers,
        Access::Operator,
        &HashMap::new(),
        Some(body),
        cmd,
        true,
    )
    .await
}

async fn list_clouds(State(ctx): S, headers: HeaderMap, Query(q): Q) -> ApiResult {
    let cmd = |_| {
        let mut after = None;
        let mut limit = 100;
        for (k, v) in &q {
            match k.as_str() {
                "after" => {
                    after = Some(
                        v.parse::<CloudId>()
                            .map_err(|e| ApiError::field("after", e.message))?,
                    )
                }
                "limit" => {
                    limit = v
                        .parse::<usize>()
                        .ok()
                        .filter(|l| (1..=1000).contains(l))
                        .ok_or_else(|| ApiError::field("limit", "must be 1 to 1000"))?
                }
                other => return Err(ApiError::field(other, "unknown query parameter")),
            }
        }
        Ok(Command::ListClouds { after, limit })
    };
    run(
        &ctx,
        &headers,
        Access::Any,
        &HashMap::new(),
        None,
        cmd,
        false,
    )
    .await
}

handler!(get_cloud, C, false, |p| Command::GetCloud {
    cloud: cloud_param(&p, "cloud")?
});
handler!(delete_cloud, C, false, |p| Command::DeleteCloud {
    cloud: cloud_param(&p, "cloud")?
});
handler!(rotate_cloud_token, C, true, |p, b| {
    let cmd = Command::RotateCloudToken {
        cloud: cloud_param(&p, "cloud")?,
    };
    parse_no_body(&b)?;
    cmd
});
handler!(create_vm, C, true, |p, b| Command::CreateVm {
    cloud: cloud_param(&p, "cloud")?,
    spec: parse_body(&b)?
});
handler!(list_vms, C, false, |p| Command::ListVms {
    cloud: cloud_param(&p, "cloud")?
});
handler!(get_vm, C, false, |p| Command::GetVm {
    cloud: cloud_param(&p, "cloud")?,
    vm: name_param(&p, "vm")?
});
handler!(delete_vm, C, false, |p| Command::DeleteVm {
    cloud: cloud_param(&p, "cloud")?,
    vm: name_param(&p, "vm")?
});
handler!(start_vm, C, false, |p, b| {
    let cmd = Command::StartVm {
        cloud: cloud_param(&p, "cloud")?,
        vm: name_param(&p, "vm")?,
    };
    parse_no_body(&b)?;
    cmd
});
handler!(stop_vm, C, false, |p, b| {
    let cmd = Command::StopVm {
        cloud: cloud_param(&p, "cloud")?,
        vm: name_param(&p, "vm")?,
    };
    parse_no_body(&b)?;
    cmd
});
handler!(get_console, C, false, |p| Command::GetConsole {
    cloud: cloud_param(&p, "cloud")?,
    vm: name_param(&p, "vm")?
});
handler!(create_volume, C, true, |p, b| Command::CreateVolume {
    cloud: cloud_param(&p, "cloud")?,
    spec: parse_body(&b)?
});
handler!(list_volumes, C, false, |p| Command::ListVolumes {
    cloud: cloud_param(&p, "cloud")?
});
handler!(get_volume, C, false, |p| Command::GetVolume {
    cloud: cloud_param(&p, "cloud")?,
    volume: name_param(&p, "volume")?
});
handler!(delete_volume, C, false, |p| Command::DeleteVolume {
    cloud: cloud_param(&p, "cloud")?,
    volume: name_param(&p, "volume")?
});
handler!(attach_volume, C, false, |p, b| Command::AttachVolume {
    cloud: cloud_param(&p, "cloud")?,
    volume: name_param(&p, "volume")?,
    spec: parse_body(&b)?
});
handler!(detach_volume, C, false, |p| Command::DetachVolume {
    cloud: cloud_param(&p, "cloud")?,
    volume: name_param(&p, "volume")?
});
handler!(list_records, C, false, |p| Command::ListRecordSets {
    cloud: cloud_param(&p, "cloud")?
});
handler!(put_record, C, false, |p, b| Command::PutRecordSet {
    cloud: cloud_param(&p, "cloud")?,
    name: name_param(&p, "name")?,
    rtype: record_type(&p)?,
    spec: parse_body(&b)?
});
handler!(delete_record, C, false, |p| Command::DeleteRecordSet {
    cloud: cloud_param(&p, "cloud")?,
    name: name_param(&p, "name")?,
    rtype: record_type(&p)?
});
handler!(create_exposure, C, true, |p, b| Command::CreateExposure {
    cloud: cloud_param(&p, "cloud")?,
    spec: parse_body(&b)?
});
handler!(list_exposures, C, false, |p| Command::ListExposures {
    cloud: cloud_param(&p, "cloud")?
});
handler!(get_exposure, C, false, |p| Command::GetExposure {
    cloud: cloud_param(&p, "cloud")?,
    exposure: name_param(&p, "exposure")?
});
handler!(delete_exposure, C, false, |p| Command::DeleteExposure {
    cloud: cloud_param(&p, "cloud")?,
    exposure: name_param(&p, "exposure")?
});
handler!(create_grant, C, true, |p, b| Command::CreateGrant {
    cloud: cloud_param(&p, "cloud")?,
    exposure: name_param(&p, "exposure")?,
    spec: parse_body(&b)?
});
handler!(list_grants, C, false, |p| Command::ListGrants {
    cloud: cloud_param(&p, "cloud")?,
    exposure: name_param(&p, "exposure")?
});
handler!(revoke_grant, C, false, |p| Command::RevokeGrant {
    cloud: cloud_param(&p, "cloud")?,
    exposure: name_param(&p, "exposure")?,
    consumer: cloud_param(&p, "consumer")?
});
handler!(list_exposure_offers, C, false, |p| {
    Command::ListExposureOffers {
        cloud: cloud_param(&p, "cloud")?,
        exposure: name_param(&p, "exposure")?,
    }
});
handler!(list_imports, C, false, |p| Command::ListImports {
    cloud: cloud_param(&p, "cloud")?
});
handler!(list_offers, C, false, |p| Command::ListOffers {
    cloud: cloud_param(&p, "cloud")?
});
handler!(accept_offer, C, false, |p, b| {
    let cmd = Command::AcceptOffer {
        cloud: cloud_param(&p, "cloud")?,
        provider: cloud_param(&p, "provider")?,
        exposure: name_param(&p, "exposure")?,
    };
    parse_no_body(&b)?;
    cmd
});
handler!(decline_offer, C, false, |p| Command::DeclineOffer {
    cloud: cloud_param(&p, "cloud")?,
    provider: cloud_param(&p, "provider")?,
    exposure: name_param(&p, "exposure")?
});
handler!(get_offer_policy, C, false, |p| Command::GetOfferPolicy {
    cloud: cloud_param(&p, "cloud")?
});
handler!(put_offer_policy, C, false, |p, b| Command::PutOfferPolicy {
    cloud: cloud_param(&p, "cloud")?,
    policy: parse_body(&b)?
});
handler!(delete_import, C, false, |p| Command::DeleteImport {
    cloud: cloud_param(&p, "cloud")?,
    provider: cloud_param(&p, "provider")?,
    exposure: name_param(&p, "exposure")?
});
handler!(register_host, Access::Host, false, |p| {
    Command::RegisterHost {
        host: name_param(&p, "host")?,
    }
});
handler!(issue_host_token, Access::Operator, true, |p| {
    Command::IssueHostToken {
        host: name_param(&p, "host")?,
    }
});
handler!(cordon_host, Access::Operator, false, |p| {
    Command::CordonHost {
        host: name_param(&p, "host")?,
        cordoned: true,
    }
});
handler!(uncordon_host, Access::Operator, false, |p| {
    Command::CordonHost {
        host: name_param(&p, "host")?,
        cordoned: false,
    }
});
handler!(report_status, Access::Host, false, |p, b| {
    Command::ReportStatus {
        host: name_param(&p, "host")?,
        report: parse_body(&b)?,
    }
});

async fn list_hosts(State(ctx): S, headers: HeaderMap) -> ApiResult {
    run(
        &ctx,
        &headers,
        Access::Operator,
        &HashMap::new(),
        None,
        |_| Ok(Command::ListHosts),
        false,
    )
    .await
}

async fn sync(
    State(ctx): S,
    headers: HeaderMap,
    Path(p): P,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult {
    let core = &ctx.core;
    let principal = principal(core, &headers).await?;
    let host = name_param(&p, "host")?;
    // Authorization before the query is parsed (see `Access`).
    crate::core::authorize_host(&principal, &host)?;
    let mut after = 0;
    let mut wait = Duration::from_secs(30);
    for (k, v) in &q {
        match k.as_str() {
            "after" => {
                after = v
                    .parse()
                    .map_err(|_| ApiError::field("after", "must be a revision (integer)"))?
            }
            "wait_ms" => {
                let ms: u64 = v
                    .parse()
                    .map_err(|_| ApiError::field("wait_ms", "must be milliseconds"))?;
                wait = Duration::from_millis(ms).min(MAX_SYNC_WAIT);
            }
            other => return Err(ApiError::field(other, "unknown query parameter")),
        }
    }
    let delta = core.sync(principal, &host, after, wait).await?;
    Ok(json_response(StatusCode::OK, &delta))
}

async fn openapi_json() -> Response {
    json_response(StatusCode::OK, &openapi())
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "no_route", "no such route", None)
}

/// One documented route.
#[derive(Debug)]
pub struct RouteDoc {
    pub method: &'static str,
    pub path: &'static str,
    pub summary: &'static str,
    pub body: Option<&'static str>,
    pub status: u16,
    /// Schema of the success response; `[X]` is an array of `X`.
    pub response: Option<&'static str>,
    /// `false` for routes that need no token.
    pub auth: bool,
}

macro_rules! r {
    ($m:literal, $p:literal, $s:literal, $b:expr, $st:literal, $r:expr) => {
        RouteDoc {
            method: $m,
            path: $p,
            summary: $s,
            body: $b,
            status: $st,
            response: $r,
            auth: true,
        }
    };
}

/// Every route of the API, as documented in the OpenAPI document.
pub const ROUTES: &[RouteDoc] = &[
    r!(
        "post",
        "/v1/clouds",
        "Create a cloud (operator); returns its cloud-scoped token once",
        Some("CreateCloud"),
        201,
        Some("CreatedCloud")
    ),
    r!(
        "get",
        "/v1/clouds",
        "List clouds (operator: all, by `after`/`limit`; cloud token: its own)",
        None,
        200,
        Some("[Cloud]")
    ),
    r!(
        "get",
        "/v1/clouds/{cloud}",
        "Get a cloud",
        None,
        200,
        Some("Cloud")
    ),
    r!(
        "delete",
        "/v1/clouds/{cloud}",
        "Delete a cloud and everything in it, on every host",
        None,
        204,
        None
    ),
    r!(
        "post",
        "/v1/clouds/{cloud}/token",
        "Issue the cloud a new token (the cloud or the operator; no body, or `{}`); the old one \
         stops working at once. Returned once",
        None,
        201,
        Some("CloudToken")
    ),
    r!(
        "post",
        "/v1/clouds/{cloud}/vms",
        "Create a VM: address, placement, DNS name",
        Some("CreateVm"),
        201,
        Some("Vm")
    ),
    r!(
        "get",
        "/v1/clouds/{cloud}/vms",
        "List VMs with their status",
        None,
        200,
        Some("[Vm]")
    ),
    r!(
        "get",
        "/v1/clouds/{cloud}/vms/{vm}",
        "Get a VM with its status",
        None,
        200,
        Some("Vm")
    ),
    r!(
        "delete",
        "/v1/clouds/{cloud}/vms/{vm}",
        "Delete a VM (its volumes are detached, not deleted)",
        None,
        204,
        None
    ),
    r!(
        "post",
        "/v1/clouds/{cloud}/vms/{vm}/start",
        "Start a VM: its power becomes `running` (no body, or `{}`; a no-op if it is running)",
        None,
        200,
        Some("Vm")
    ),
    r!(
        "post",
        "/v1/clouds/{cloud}/vms/{vm}/stop",
        "Stop a VM: its power becomes `stopped`; its address, name and volumes stay (no body, \
         or `{}`; a no-op if it is stopped)",
        None,
        200,
        Some("Vm")
    ),
    r!(
        "get",
        "/v1/clouds/{cloud}/vms/{vm}/console",
        "The tail of a VM's serial console as its host last reported it (at most 16 KiB)",
        None,
        200,
        Some("Console")
    ),
    r!(
        "post",
        "/v1/clouds/{cloud}/volumes",
        "Create a sparse volume",
        Some("CreateVolume"),
        201,
        Some("Volume")
    ),
    r!(
        "get",
        "/v1/clouds/{cloud}/volumes",
        "List volumes",
        None,
        200,
        Some("[Volume]")
    ),
    r!(
        "get",
        "/v1/clouds/{cloud}/volumes/{volume}",
        "Get a volume",
        None,
        200,
        Some("Volume")
    ),
    r!(
        "delete",
        "/v1/clouds/{cloud}/volumes/{volume}",
        "Delete a detached volume",
        None,
        204,
        None
    ),
    r!(
        "post",
        "/v1/clouds/{cloud}/volumes/{volume}/attach",
        "Attach a volume to a VM on its host",
        Some("AttachVolume"),
        200,
        Some("Volume")
    ),
    r!(
        "post",
        "/v1/clouds/{cloud}/volumes/{volume}/detach",
        "Detach a volume",
        None,
        200,
        Some("Volume")
    ),
    r!(
        "get",
        "/v1/clouds/{cloud}/dns",
        "List record sets, including the automatic ones",
        None,
        200,
        Some("[RecordSet]")
    ),
    r!(
        "put",
        "/v1/clouds/{cloud}/dns/{name}/{type}",
        "Create or replace a record set (A, AAAA, CNAME, TXT)",
        Some("PutRecordSet"),
        200,
        Some("RecordSet")
    ),
    r!(
        "delete",
        "/v1/clouds/{cloud}/dns/{name}/{type}",
        "Delete a record set",
        None,
        204,
        None
    ),
    r!(
        "post",
        "/v1/clouds/{cloud}/exposures",
        "Expose a service of this cloud",
        Some("CreateExposure"),
        201,
        Some("Exposure")
    ),
    r!(
        "get",
        "/v1/clouds/{cloud}/exposures",
        "List exposures",
        None,
        200,
        Some("[Exposure]")
    ),
    r!(
        "get",
        "/v1/clouds/{cloud}/exposures/{exposure}",
        "Get an exposure",
        None,
        200,
        Some("Exposure")
    ),
    r!(
        "delete",
        "/v1/clouds/{cloud}/exposures/{exposure}",
        "Delete an exposure and its grants",
        None,
        204,
        None
    ),
    r!(
        "post",
        "/v1/clouds/{cloud}/exposures/{exposure}/grants",
        "Offer an exposure to another cloud: a grant once the consumer accepts (or at once if its \
         offer policy lists this cloud). The same reply whether the consumer exists",
        Some("CreateGrant"),
        202,
        Some("Offer")
    ),
    r!(
        "get",
        "/v1/clouds/{cloud}/exposures/{exposure}/grants",
        "List an exposure's grants",
        None,
        200,
        Some("[Grant]")
    ),
    r!(
        "delete",
        "/v1/clouds/{cloud}/exposures/{exposure}/grants/{consumer}",
        "Revoke a grant, or withdraw a pending offer",
        None,
        204,
        None
    ),
    r!(
        "get",
        "/v1/clouds/{cloud}/exposures/{exposure}/offers",
        "List an exposure's pending offers",
        None,
        200,
        Some("[Offer]")
    ),
    r!(
        "get",
        "/v1/clouds/{cloud}/imports",
        "List exposures granted to this cloud",
        None,
        200,
        Some("[Grant]")
    ),
    r!(
        "delete",
        "/v1/clouds/{cloud}/imports/{provider}/{exposure}",
        "Give up a grant",
        None,
        204,
        None
    ),
    r!(
        "get",
        "/v1/clouds/{cloud}/offers",
        "List the offers made to this cloud and pending",
        None,
        200,
        Some("[Offer]")
    ),
    r!(
        "post",
        "/v1/clouds/{cloud}/offers/{provider}/{exposure}/accept",
        "Accept an offer: it becomes a grant, with a VIP and a name in this cloud (no body, or \
         `{}`)",
        None,
        200,
        Some("Grant")
    ),
    r!(
        "delete",
        "/v1/clouds/{cloud}/offers/{provider}/{exposure}",
        "Decline an offer",
        None,
        204,
        None
    ),
    r!(
        "get",
        "/v1/clouds/{cloud}/offer-policy",
        "The providers whose offers this cloud accepts without being asked",
        None,
        200,
        Some("OfferPolicy")
    ),
    r!(
        "put",
        "/v1/clouds/{cloud}/offer-policy",
        "Set the providers whose offers this cloud accepts without being asked (later offers)",
        Some("OfferPolicy"),
        200,
        Some("OfferPolicy")
    ),
    r!(
        "get",
        "/v1/hosts",
        "List registered hosts (operator)",
        None,
        200,
        Some("[HostInfo]")
    ),
    r!(
        "put",
        "/v1/hosts/{host}",
        "Register a host (operator, or the host's own token)",
        None,
        200,
        Some("HostInfo")
    ),
    r!(
        "post",
        "/v1/hosts/{host}/token",
        "Issue the host's token (operator; registers the host, replaces an earlier token); returned once",
        None,
        201,
        Some("HostToken")
    ),
    r!(
        "post",
        "/v1/hosts/{host}/cordon",
        "Place no new VMs or volumes on the host (operator); what runs there stays",
        None,
        200,
        Some("HostInfo")
    ),
    r!(
        "post",
        "/v1/hosts/{host}/uncordon",
        "Place on the host again (operator)",
        None,
        200,
        Some("HostInfo")
    ),
    r!(
        "get",
        "/v1/hosts/{host}/sync",
        "Long-poll a host's desired-state changes after `after` (up to `wait_ms`; operator, or the host's own token)",
        None,
        200,
        Some("SyncDelta")
    ),
    r!(
        "post",
        "/v1/hosts/{host}/status",
        "Report what a host applied (operator, or the host's own token)",
        Some("StatusReport"),
        204,
        None
    ),
    RouteDoc {
        method: "get",
        path: "/openapi.json",
        summary: "This document",
        body: None,
        status: 200,
        response: None,
        auth: false,
    },
];

/// The API router; bodies must arrive within `request_timeout` once a handler reads them.
pub fn router(core: Arc<Core>, request_timeout: Duration) -> Router {
    Router::new()
        .route("/openapi.json", get(openapi_json))
        .route("/v1/clouds", post(create_cloud).get(list_clouds))
        .route("/v1/clouds/{cloud}", get(get_cloud).delete(delete_cloud))
        .route("/v1/clouds/{cloud}/token", post(rotate_cloud_token))
        .route("/v1/clouds/{cloud}/vms", post(create_vm).get(list_vms))
        .route("/v1/clouds/{cloud}/vms/{vm}", get(get_vm).delete(delete_vm))
        .route("/v1/clouds/{cloud}/vms/{vm}/start", post(start_vm))
        .route("/v1/clouds/{cloud}/vms/{vm}/stop", post(stop_vm))
        .route("/v1/clouds/{cloud}/vms/{vm}/console", get(get_console))
        .route(
            "/v1/clouds/{cloud}/volumes",
            post(create_volume).get(list_volumes),
        )
        .route(
            "/v1/clouds/{cloud}/volumes/{volume}",
            get(get_volume).delete(delete_volume),
        )
        .route(
            "/v1/clouds/{cloud}/volumes/{volume}/attach",
            post(attach_volume),
        )
        .route(
            "/v1/clouds/{cloud}/volumes/{volume}/detach",
            post(detach_volume),
        )
        .route("/v1/clouds/{cloud}/dns", get(list_records))
        .route(
            "/v1/clouds/{cloud}/dns/{name}/{type}",
            axum::routing::put(put_record).delete(delete_record),
        )
        .route(
            "/v1/clouds/{cloud}/exposures",
            post(create_exposure).get(list_exposures),
        )
        .route(
            "/v1/clouds/{cloud}/exposures/{exposure}",
            get(get_exposure).delete(delete_exposure),
        )
        .route(
            "/v1/clouds/{cloud}/exposures/{exposure}/grants",
            post(create_grant).get(list_grants),
        )
        .route(
            "/v1/clouds/{cloud}/exposures/{exposure}/grants/{consumer}",
            axum::routing::delete(revoke_grant),
        )
        .route(
            "/v1/clouds/{cloud}/exposures/{exposure}/offers",
            get(list_exposure_offers),
        )
        .route("/v1/clouds/{cloud}/imports", get(list_imports))
        .route(
            "/v1/clouds/{cloud}/imports/{provider}/{exposure}",
            axum::routing::delete(delete_import),
        )
        .route("/v1/clouds/{cloud}/offers", get(list_offers))
        .route(
            "/v1/clouds/{cloud}/offers/{provider}/{exposure}/accept",
            post(accept_offer),
        )
        .route(
            "/v1/clouds/{cloud}/offers/{provider}/{exposure}",
            axum::routing::delete(decline_offer),
        )
        .route(
            "/v1/clouds/{cloud}/offer-policy",
            get(get_offer_policy).put(put_offer_policy),
        )
        .route("/v1/hosts", get(list_hosts))
        .route("/v1/hosts/{host}", axum::routing::put(register_host))
        .route("/v1/hosts/{host}/sync", get(sync))
        .route("/v1/hosts/{host}/status", post(report_status))
        .route("/v1/hosts/{host}/token", post(issue_host_token))
        .route("/v1/hosts/{host}/cordon", post(cordon_host))
        .route("/v1/hosts/{host}/uncordon", post(uncordon_host))
        .fallback(not_found)
        .method_not_allowed_fallback(|m: Method| async move {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                format!("{m} is not allowed on this route"),
                None,
            )
        })
        .with_state(Arc::new(Ctx {
            core,
            request_timeout,
        }))
}

#[derive(utoipa::OpenApi)]
#[openapi(components(schemas(
    CreateCloud,
    Cloud,
    CreatedCloud,
    CloudToken,
    Quotas,
    Usage,
    CreateVm,
    Vm,
    Power,
    VmStatus,
    VmState,
    Console,
    CreateVolume,
    Volume,
    VolumeFormat,
    AttachVolume,
    PutRecordSet,
    RecordSet,
    RecordType,
    CreateExposure,
    Exposure,
    Backend,
    Protocol,
    CreateGrant,
    Grant,
    GrantState,
    Offer,
    OfferState,
    OfferPolicy,
    HostInfo,
    HostToken,
    SyncDelta,
    ProviderServices,
    Service,
    ServiceBackend,
    Placement,
    VolumePlacement,
    Zone,
    ZoneRecord,
    VmRef,
    VolumeRef,
    StatusReport,
    VmReport,
    ErrorBody,
    ErrorDetail,
    CloudId
)))]
struct Schemas;

fn schema_ref(name: &str) -> serde_json::Value {
    match name.strip_prefix('[').and_then(|n| n.strip_suffix(']')) {
        Some(inner) => {
            serde_json::json!({"type": "array", "items": {"$ref": format!("#/components/schemas/{inner}")}})
        }
        None => serde_json::json!({"$ref": format!("#/components/schemas/{name}")}),
    }
}

/// A DNS label as `validate_label` accepts it: 1-63 of a-z, 0-9 and '-', not starting or
/// ending with '-'.
const LABEL_PATTERN: &str = "^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$";

/// What the server accepts for path parameter `name` (the parsers `cloud_param`, `name_param`
/// and `record_type` enforce these), so that clients and fuzzers reading the document build
/// valid paths.
fn path_param_schema(name: &str) -> serde_json::Value {
    match name {
        "cloud" | "consumer" | "provider" => serde_json::json!({
            "type": "string",
            "description": "A cloud id: `c` and 8 lowercase hex digits, not all zero.",
            "pattern": "^c[0-9a-f]{8}$",
            "minLength": 9,
            "maxLength": 9,
        }),
        "name" => serde_json::json!({
            "type": "string",
            "description": "A record set's name relative to the cloud's zone: `@` (the apex) or \
                            dot-separated DNS labels; with the zone it fits 253 characters.",
            "pattern": "^(@|[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*)$",
            "minLength": 1,
            "maxLength": 253,
        }),
        "type" => serde_json::json!({
            "type": "string",
            "description": "A record type (case-insensitive).",
            "enum": ["A", "AAAA", "CNAME", "TXT"],
        }),
        _ => serde_json::json!({
            "type": "string",
            "description": "A name: a DNS label.",
            "pattern": LABEL_PATTERN,
            "minLength": 1,
            "maxLength": 63,
        }),
    }
}

/// The OpenAPI 3 document of this API.
pub fn openapi() -> serde_json::Value {
    use utoipa::OpenApi;
    let components =
        serde_json::to_value(Schemas::openapi().components).expect("schemas serialize");
    let mut paths = serde_json::Map::new();
    let error = serde_json::json!({
        "description": "Error",
        "content": {"application/json": {"schema": schema_ref("ErrorBody")}}
    });
    for r in ROUTES {
        let mut op = serde_json::Map::new();
        op.insert("summary".into(), r.summary.into());
        op.insert(
            "operationId".into(),
            format!("{}{}", r.method, r.path.replace(['/', '{', '}', '.'], "_")).into(),
        );
        let params: Vec<serde_json::Value> = r
            .path
            .split('/')
            .filter_map(|s| s.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
            .map(|n| serde_json::json!({"name": n, "in": "path", "required": true, "schema": path_param_schema(n)}))
            .chain(match r.path {
                "/v1/clouds" if r.method == "get" => vec![
                    serde_json::json!({"name": "after", "in": "query", "schema": {"type": "string"}}),
                    serde_json::json!({"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 1000}}),
                ],
                "/v1/hosts/{host}/sync" => vec![
                    serde_json::json!({"name": "after", "in": "query", "schema": {"type": "integer"}}),
                    serde_json::json!({"name": "wait_ms", "in": "query", "schema": {"type": "integer"}}),
                ],
                _ => vec![],
            })
            .collect();
        if !params.is_empty() {
            op.insert("parameters".into(), params.into());
        }
        if let Some(b) = r.body {
            op.insert(
                "requestBody".into(),
                serde_json::json!({"required": true, "content": {"application/json": {"schema": schema_ref(b)}}}),
            );
        }
        let mut responses = serde_json::Map::new();
        let ok = match r.response {
            Some(s) => {
                serde_json::json!({"description": "OK", "content": {"application/json": {"schema": schema_ref(s)}}})
            }
            None => serde_json::json!({"description": "OK"}),
        };
        responses.insert(r.status.to_string(), ok);
        if r.auth {
            responses.insert("default".into(), error.clone());
            op.insert("security".into(), serde_json::json!([{"bearer": []}]));
        }
        op.insert("responses".into(), responses.into());
        let entry = paths
            .entry(r.path.to_string())
            .or_insert_with(|| serde_json::json!({}));
        entry[r.method] = op.into();
    }
    let mut components = components;
    components["securitySchemes"] =
        serde_json::json!({"bearer": {"type": "http", "scheme": "bearer"}});
    serde_json::json!({
        "openapi": "3.1.0",
        "info": {
            "title": "atoll control plane",
            "version": "v1",
            "description": "Clouds, VMs, volumes, DNS, exposures and grants. Errors are JSON `ErrorBody`s naming the offending field."
        },
        "paths": paths,
        "components": components,
    })
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Every path parameter the document states carries what the server enforces (a pattern
    /// or an enumeration), and sample values that the parsers accept fit its bounds.
    #[test]
    fn path_parameters_state_what_the_server_enforces() {
        let doc = openapi();
        let mut seen = std::collections::BTreeSet::new();
        for (_, item) in doc["paths"].as_object().unwrap() {
            for (_, op) in item.as_object().unwrap() {
                for p in op["parameters"].as_array().into_iter().flatten() {
                    if p["in"] != "path" {
                        continue;
                    }
                    let schema = &p["schema"];
                    assert!(
                        schema.get("pattern").is_some() || schema.get("enum").is_some(),
                        "{p}"
                    );
                    seen.insert(p["name"].as_str().unwrap().to_string());
                }
            }
        }
        assert!(seen.contains("cloud") && seen.contains("vm") && seen.contains("type"));
        let params = |k: &str, v: &str| HashMap::from([(k.to_string(), v.to_string())]);
        let cloud = "c0000002a";
        assert!(cloud_param(&params("cloud", cloud), "cloud").is_ok());
        assert_eq!(
            cloud.len() as u64,
            path_param_schema("cloud")["maxLength"].as_u64().unwrap()
        );
        let label = "a".repeat(63);
        assert!(name_param(&params("vm", &label), "vm").is_ok());
        assert!(name_param(&params("vm", &format!("{label}a")), "vm").is_err());
        assert_eq!(path_param_schema("vm")["maxLength"], 63);
        for t in path_param_schema("type")["enum"].as_array().unwrap() {
            assert!(record_type(&params("type", t.as_str().unwrap())).is_ok());
        }
    }
}
