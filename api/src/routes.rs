//! The route table: for every [`Command`], its method, path, who may call it, its body and its
//! reply. The server's router and its access check, the request parser, the OpenAPI document
//! ([`crate::openapi()`]) and the typed [`Client`](crate::client::Client) are all built from it;
//! no `/v1/` path is written anywhere else (tests use [`Route::at`] for raw requests).
//!
//! Decisions:
//! - **A table of constants, two matches.** Each route is a `const` [`Route`];
//!   [`Command::route`] and [`Command::path_params`] map a command onto its route (the
//!   compiler checks they cover every command) and [`parse`] maps a route's request back onto
//!   the command. A unit test round-trips a sample of every command through both and checks
//!   that each route's [`Access`] agrees with the parsed command's [`Command::issuer`], so the
//!   table cannot silently disagree with itself.
//! - **Access is checked before the body is read** (the server's rule), so it lives on the
//!   route, where it is known from the method and path alone; [`Command::issuer`] is what the
//!   core enforces after parsing. Both are tested equal.
//! - **Why not Dropshot and progenitor** (Oxide's pair): progenitor reads OpenAPI 3.0, this
//!   document is 3.1 (utoipa 5), and its generated client is reqwest-based, while atoll's
//!   client needs its own TLS trust (a pinned fingerprint, see [`crate::tls`]). Generating the
//!   client from the same table the server routes by gives the same guarantee, one
//!   declaration per endpoint, with no second toolchain.

use std::collections::HashMap;

use serde::de::DeserializeOwned;

use crate::{command::Command, model::*};

/// The longest a host's sync may wait for changes.
pub const MAX_SYNC_WAIT_MS: u64 = 60_000;

/// An HTTP method of the API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Method {
    GET,
    POST,
    PUT,
    DELETE,
}

impl Method {
    pub fn as_str(self) -> &'static str {
        match self {
            Method::GET => "GET",
            Method::POST => "POST",
            Method::PUT => "PUT",
            Method::DELETE => "DELETE",
        }
    }

    /// As hyper's (and axum's) type.
    pub fn http(self) -> hyper::Method {
        match self {
            Method::GET => hyper::Method::GET,
            Method::POST => hyper::Method::POST,
            Method::PUT => hyper::Method::PUT,
            Method::DELETE => hyper::Method::DELETE,
        }
    }
}

impl std::fmt::Display for Method {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Who may call a route. Checked before the request's body is read, so that a foreign or
/// missing token learns nothing from validation errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// The operator, or the token of the cloud in the path (`{cloud}`).
    Cloud,
    /// The operator only.
    Operator,
    /// The operator, or the token of the host in the path (`{host}`, an agent).
    Host,
    /// Any valid token (the core narrows what it returns).
    Any,
}

/// The type of a query parameter, as the OpenAPI document states it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueryType {
    Text,
    Integer,
    /// An integer in `min..=max`.
    Bounded(u64, u64),
}

/// A route whose body or reply is not one JSON document.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    /// The reply is newline-delimited JSON (`application/x-ndjson`) of the reply schema.
    NdjsonReply,
    /// The reply is raw bytes (`application/octet-stream`).
    BytesReply,
    /// The request body is raw bytes (`application/octet-stream`, `Content-Length` required).
    BytesBody,
    /// The reply is JSON of the reply schema, or with `format=focus` a FOCUS CSV
    /// (`text/csv`).
    JsonOrCsv,
}

/// Names the routes, so that [`parse`] is checked by the compiler to cover every one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RouteId {
    CreateCloud,
    ListClouds,
    GetCloud,
    DeleteCloud,
    RotateCloudToken,
    SetCloudExpiry,
    CreateVm,
    ListVms,
    GetVm,
    DeleteVm,
    StartVm,
    StopVm,
    GetConsole,
    ExecVm,
    WriteExecStdin,
    ReadFile,
    WriteFile,
    CreateVolume,
    ListVolumes,
    GetVolume,
    DeleteVolume,
    AttachVolume,
    DetachVolume,
    ListRecordSets,
    PutRecordSet,
    DeleteRecordSet,
    CreateExposure,
    ListExposures,
    GetExposure,
    DeleteExposure,
    CreateGrant,
    ListGrants,
    RevokeGrant,
    ListExposureOffers,
    ListImports,
    DeleteImport,
    ListOffers,
    AcceptOffer,
    DeclineOffer,
    GetOfferPolicy,
    PutOfferPolicy,
    GetEgressPolicy,
    PutEgressPolicy,
    ListDenied,
    GetUsage,
    GetFleetUsage,
    SetBudget,
    LiftBudget,
    GetEgressAddress,
    AssignEgressAddress,
    ReleaseEgressAddress,
    Publish,
    ListPublications,
    Unpublish,
    ListHosts,
    RegisterHost,
    IssueHostToken,
    SetHostUnderlay,
    SetGuestAccess,
    CordonHost,
    UncordonHost,
    Sync,
    ReportStatus,
    IngestUsage,
}

/// One route of the API.
#[derive(Debug, Clone, Copy)]
pub struct Route {
    pub id: RouteId,
    pub method: Method,
    /// The path template; `{name}` segments are path parameters.
    pub path: &'static str,
    pub access: Access,
    pub summary: &'static str,
    /// Schema of the JSON body, if the route takes one.
    pub body: Option<&'static str>,
    /// Status of a success.
    pub status: u16,
    /// Schema of the success response; `[X]` is an array of `X`.
    pub response: Option<&'static str>,
    /// Query parameters (all optional, unless the summary says otherwise).
    pub query: &'static [(&'static str, QueryType)],
    /// Streamed bodies or replies (`None`: JSON in, JSON out).
    pub stream: Option<Stream>,
}

impl Route {
    const fn new(
        id: RouteId,
        method: Method,
        path: &'static str,
        access: Access,
        status: u16,
    ) -> Self {
        Route {
            id,
            method,
            path,
            access,
            summary: "",
            body: None,
            status,
            response: None,
            query: &[],
            stream: None,
        }
    }

    const fn stream(self, stream: Stream) -> Self {
        Route {
            stream: Some(stream),
            ..self
        }
    }

    const fn summary(self, summary: &'static str) -> Self {
        Route { summary, ..self }
    }

    const fn body(self, body: &'static str) -> Self {
        Route {
            body: Some(body),
            ..self
        }
    }

    const fn reply(self, response: &'static str) -> Self {
        Route {
            response: Some(response),
            ..self
        }
    }

    const fn query(self, query: &'static [(&'static str, QueryType)]) -> Self {
        Route { query, ..self }
    }

    /// The names of the path parameters, in order.
    pub fn params(&self) -> impl Iterator<Item = &'static str> {
        self.path
            .split('/')
            .filter_map(|s| s.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
    }

    /// The path with `values` in place of the parameters, in order (raw: a test may put an
    /// invalid value there). Missing values leave the template's `{name}`.
    pub fn at(&self, values: &[&(dyn std::fmt::Display + Sync)]) -> String {
        let mut values = values.iter();
        self.path
            .split('/')
            .map(|s| match s.starts_with('{') {
                true => values
                    .next()
                    .map_or_else(|| s.to_string(), |v| v.to_string()),
                false => s.to_string(),
            })
            .collect::<Vec<_>>()
            .join("/")
    }

    /// The OpenAPI operation id (`get_v1_clouds__cloud_`).
    pub fn operation_id(&self) -> String {
        format!(
            "{}{}",
            self.method.as_str().to_ascii_lowercase(),
            self.path.replace(['/', '{', '}', '.'], "_")
        )
    }
}

use Access::{Any, Cloud as C, Host as H, Operator as O};

pub const CREATE_CLOUD: Route =
    Route::new(RouteId::CreateCloud, Method::POST, "/v1/clouds", O, 201)
        .summary("Create a cloud (operator); returns its cloud-scoped token once")
        .body("CreateCloud")
        .reply("CreatedCloud");
pub const LIST_CLOUDS: Route = Route::new(RouteId::ListClouds, Method::GET, "/v1/clouds", Any, 200)
    .summary("List clouds (operator: all, by `after`/`limit`; cloud token: its own)")
    .reply("[Cloud]")
    .query(&[
        ("after", QueryType::Text),
        ("limit", QueryType::Bounded(1, 1000)),
    ]);
pub const GET_CLOUD: Route =
    Route::new(RouteId::GetCloud, Method::GET, "/v1/clouds/{cloud}", C, 200)
        .summary("Get a cloud")
        .reply("Cloud");
pub const DELETE_CLOUD: Route = Route::new(
    RouteId::DeleteCloud,
    Method::DELETE,
    "/v1/clouds/{cloud}",
    C,
    204,
)
.summary("Delete a cloud and everything in it, on every host");
pub const ROTATE_CLOUD_TOKEN: Route = Route::new(
    RouteId::RotateCloudToken,
    Method::POST,
    "/v1/clouds/{cloud}/token",
    C,
    201,
)
.summary(
    "Issue the cloud a new token (the cloud or the operator; no body, or `{}`); the old \
             one stops working at once. Returned once",
)
.reply("CloudToken");
pub const SET_CLOUD_EXPIRY: Route = Route::new(
    RouteId::SetCloudExpiry,
    Method::PUT,
    "/v1/clouds/{cloud}/expiry",
    C,
    200,
)
.summary(
    "Set when the cloud expires, from now on: `ttl_secs` from now or `expires_at`; `{}`: \
     never. At expiry it is deleted with everything it holds, on every host",
)
.body("CloudExpiry")
.reply("Cloud");
pub const CREATE_VM: Route = Route::new(
    RouteId::CreateVm,
    Method::POST,
    "/v1/clouds/{cloud}/vms",
    C,
    201,
)
.summary("Create a VM: address, placement, DNS name")
.body("CreateVm")
.reply("Vm");
pub const LIST_VMS: Route = Route::new(
    RouteId::ListVms,
    Method::GET,
    "/v1/clouds/{cloud}/vms",
    C,
    200,
)
.summary("List VMs with their status")
.reply("[Vm]");
pub const GET_VM: Route = Route::new(
    RouteId::GetVm,
    Method::GET,
    "/v1/clouds/{cloud}/vms/{vm}",
    C,
    200,
)
.summary("Get a VM with its status")
.reply("Vm");
pub const DELETE_VM: Route = Route::new(
    RouteId::DeleteVm,
    Method::DELETE,
    "/v1/clouds/{cloud}/vms/{vm}",
    C,
    204,
)
.summary("Delete a VM (its volumes are detached, not deleted)");
pub const START_VM: Route = Route::new(
    RouteId::StartVm,
    Method::POST,
    "/v1/clouds/{cloud}/vms/{vm}/start",
    C,
    200,
)
.summary("Start a VM: its power becomes `running` (no body, or `{}`; a no-op if it is running)")
.reply("Vm");
pub const STOP_VM: Route = Route::new(
    RouteId::StopVm,
    Method::POST,
    "/v1/clouds/{cloud}/vms/{vm}/stop",
    C,
    200,
)
.summary(
    "Stop a VM: its power becomes `stopped`; its address, name and volumes stay (no body, \
         or `{}`; a no-op if it is stopped)",
)
.reply("Vm");
pub const GET_CONSOLE: Route = Route::new(
    RouteId::GetConsole,
    Method::GET,
    "/v1/clouds/{cloud}/vms/{vm}/console",
    C,
    200,
)
.summary("The tail of a VM's serial console as its host last reported it (at most 16 KiB)")
.reply("Console");
/// The query parameters of the file routes.
const FILE_QUERY: &[(&str, QueryType)] = &[
    ("path", QueryType::Text),
    ("mode", QueryType::Text),
    ("uid", QueryType::Integer),
    ("gid", QueryType::Integer),
];
pub const EXEC_VM: Route = Route::new(
    RouteId::ExecVm,
    Method::POST,
    "/v1/clouds/{cloud}/vms/{vm}/exec",
    C,
    200,
)
.summary(
    "Run a command in a running VM (through its guest agent, not its network). The reply \
         streams `ExecEvent`s, one JSON object per line (`application/x-ndjson`): `started`, \
         `stdout`/`stderr` chunks (base64) as they come, `truncated` past `max_output_bytes`, \
         and last `exit` (or `error`). Closing the connection kills the command",
)
.body("ExecVm")
.reply("ExecEvent")
.stream(Stream::NdjsonReply);
pub const WRITE_EXEC_STDIN: Route = Route::new(
    RouteId::WriteExecStdin,
    Method::POST,
    "/v1/clouds/{cloud}/vms/{vm}/execs/{exec}/stdin",
    C,
    204,
)
.summary(
    "Stream stdin to a running exec started with `stdin_stream` (its `exec_id`): the request \
         body (`application/octet-stream`, chunked or with a length) goes to the command as it \
         arrives; its end closes the command's stdin. Once per exec",
)
.stream(Stream::BytesBody);
pub const READ_FILE: Route = Route::new(
    RouteId::ReadFile,
    Method::GET,
    "/v1/clouds/{cloud}/vms/{vm}/files",
    C,
    200,
)
.summary(
    "Download the file at `path` in a running VM: its bytes (`application/octet-stream`, \
         streamed, at most 1 GiB), its mode and owner in `x-atoll-mode` (octal), `x-atoll-uid`, \
         `x-atoll-gid`",
)
.query(&[("path", QueryType::Text)])
.stream(Stream::BytesReply);
pub const WRITE_FILE: Route = Route::new(
    RouteId::WriteFile,
    Method::PUT,
    "/v1/clouds/{cloud}/vms/{vm}/files",
    C,
    204,
)
.summary(
    "Upload the request body (`application/octet-stream`, streamed, at most 1 GiB, \
         `Content-Length` required) to `path` in a running VM, with `mode` (octal, default 644) \
         and owner `uid`/`gid` (default 0); it replaces the file whole once complete",
)
.query(FILE_QUERY)
.stream(Stream::BytesBody);
pub const CREATE_VOLUME: Route = Route::new(
    RouteId::CreateVolume,
    Method::POST,
    "/v1/clouds/{cloud}/volumes",
    C,
    201,
)
.summary("Create a sparse volume")
.body("CreateVolume")
.reply("Volume");
pub const LIST_VOLUMES: Route = Route::new(
    RouteId::ListVolumes,
    Method::GET,
    "/v1/clouds/{cloud}/volumes",
    C,
    200,
)
.summary("List volumes")
.reply("[Volume]");
pub const GET_VOLUME: Route = Route::new(
    RouteId::GetVolume,
    Method::GET,
    "/v1/clouds/{cloud}/volumes/{volume}",
    C,
    200,
)
.summary("Get a volume")
.reply("Volume");
pub const DELETE_VOLUME: Route = Route::new(
    RouteId::DeleteVolume,
    Method::DELETE,
    "/v1/clouds/{cloud}/volumes/{volume}",
    C,
    204,
)
.summary("Delete a detached volume");
pub const ATTACH_VOLUME: Route = Route::new(
    RouteId::AttachVolume,
    Method::POST,
    "/v1/clouds/{cloud}/volumes/{volume}/attach",
    C,
    200,
)
.summary("Attach a volume to a VM on its host")
.body("AttachVolume")
.reply("Volume");
pub const DETACH_VOLUME: Route = Route::new(
    RouteId::DetachVolume,
    Method::POST,
    "/v1/clouds/{cloud}/volumes/{volume}/detach",
    C,
    200,
)
.summary("Detach a volume")
.reply("Volume");
pub const LIST_RECORD_SETS: Route = Route::new(
    RouteId::ListRecordSets,
    Method::GET,
    "/v1/clouds/{cloud}/dns",
    C,
    200,
)
.summary("List record sets, including the automatic ones")
.reply("[RecordSet]");
pub const PUT_RECORD_SET: Route = Route::new(
    RouteId::PutRecordSet,
    Method::PUT,
    "/v1/clouds/{cloud}/dns/{name}/{type}",
    C,
    200,
)
.summary("Create or replace a record set (A, AAAA, CNAME, TXT)")
.body("PutRecordSet")
.reply("RecordSet");
pub const DELETE_RECORD_SET: Route = Route::new(
    RouteId::DeleteRecordSet,
    Method::DELETE,
    "/v1/clouds/{cloud}/dns/{name}/{type}",
    C,
    204,
)
.summary("Delete a record set");
pub const CREATE_EXPOSURE: Route = Route::new(
    RouteId::CreateExposure,
    Method::POST,
    "/v1/clouds/{cloud}/exposures",
    C,
    201,
)
.summary("Expose a service of this cloud")
.body("CreateExposure")
.reply("Exposure");
pub const LIST_EXPOSURES: Route = Route::new(
    RouteId::ListExposures,
    Method::GET,
    "/v1/clouds/{cloud}/exposures",
    C,
    200,
)
.summary("List exposures")
.reply("[Exposure]");
pub const GET_EXPOSURE: Route = Route::new(
    RouteId::GetExposure,
    Method::GET,
    "/v1/clouds/{cloud}/exposures/{exposure}",
    C,
    200,
)
.summary("Get an exposure")
.reply("Exposure");
pub const DELETE_EXPOSURE: Route = Route::new(
    RouteId::DeleteExposure,
    Method::DELETE,
    "/v1/clouds/{cloud}/exposures/{exposure}",
    C,
    204,
)
.summary("Delete an exposure and its grants");
pub const CREATE_GRANT: Route = Route::new(
    RouteId::CreateGrant,
    Method::POST,
    "/v1/clouds/{cloud}/exposures/{exposure}/grants",
    C,
    202,
)
.summary(
    "Offer an exposure to another cloud: a grant once the consumer accepts (or at once if its \
     offer policy lists this cloud). The same reply whether the consumer exists",
)
.body("CreateGrant")
.reply("Offer");
pub const LIST_GRANTS: Route = Route::new(
    RouteId::ListGrants,
    Method::GET,
    "/v1/clouds/{cloud}/exposures/{exposure}/grants",
    C,
    200,
)
.summary("List an exposure's grants")
.reply("[Grant]");
pub const REVOKE_GRANT: Route = Route::new(
    RouteId::RevokeGrant,
    Method::DELETE,
    "/v1/clouds/{cloud}/exposures/{exposure}/grants/{consumer}",
    C,
    204,
)
.summary("Revoke a grant, or withdraw a pending offer");
pub const LIST_EXPOSURE_OFFERS: Route = Route::new(
    RouteId::ListExposureOffers,
    Method::GET,
    "/v1/clouds/{cloud}/exposures/{exposure}/offers",
    C,
    200,
)
.summary("List an exposure's pending offers")
.reply("[Offer]");
pub const LIST_IMPORTS: Route = Route::new(
    RouteId::ListImports,
    Method::GET,
    "/v1/clouds/{cloud}/imports",
    C,
    200,
)
.summary("List exposures granted to this cloud")
.reply("[Grant]");
pub const DELETE_IMPORT: Route = Route::new(
    RouteId::DeleteImport,
    Method::DELETE,
    "/v1/clouds/{cloud}/imports/{provider}/{exposure}",
    C,
    204,
)
.summary("Give up a grant");
pub const LIST_OFFERS: Route = Route::new(
    RouteId::ListOffers,
    Method::GET,
    "/v1/clouds/{cloud}/offers",
    C,
    200,
)
.summary("List the offers made to this cloud and pending")
.reply("[Offer]");
pub const ACCEPT_OFFER: Route = Route::new(
    RouteId::AcceptOffer,
    Method::POST,
    "/v1/clouds/{cloud}/offers/{provider}/{exposure}/accept",
    C,
    200,
)
.summary(
    "Accept an offer: it becomes a grant, with a VIP and a name in this cloud (no body, or `{}`)",
)
.reply("Grant");
pub const DECLINE_OFFER: Route = Route::new(
    RouteId::DeclineOffer,
    Method::DELETE,
    "/v1/clouds/{cloud}/offers/{provider}/{exposure}",
    C,
    204,
)
.summary("Decline an offer");
pub const GET_OFFER_POLICY: Route = Route::new(
    RouteId::GetOfferPolicy,
    Method::GET,
    "/v1/clouds/{cloud}/offer-policy",
    C,
    200,
)
.summary("The providers whose offers this cloud accepts without being asked")
.reply("OfferPolicy");
pub const PUT_OFFER_POLICY: Route = Route::new(
    RouteId::PutOfferPolicy,
    Method::PUT,
    "/v1/clouds/{cloud}/offer-policy",
    C,
    200,
)
.summary("Set the providers whose offers this cloud accepts without being asked (later offers)")
.body("OfferPolicy")
.reply("OfferPolicy");
pub const GET_EGRESS_POLICY: Route = Route::new(
    RouteId::GetEgressPolicy,
    Method::GET,
    "/v1/clouds/{cloud}/egress",
    C,
    200,
)
.summary("What this cloud's VMs may reach outside the cloud")
.reply("EgressPolicy");
pub const PUT_EGRESS_POLICY: Route = Route::new(
    RouteId::PutEgressPolicy,
    Method::PUT,
    "/v1/clouds/{cloud}/egress",
    C,
    200,
)
.summary("Set what this cloud's VMs may reach outside the cloud (live flows it no longer allows are cut)")
.body("EgressPolicy")
.reply("EgressPolicy");
pub const LIST_DENIED: Route = Route::new(
    RouteId::ListDenied,
    Method::GET,
    "/v1/clouds/{cloud}/egress/denied",
    C,
    200,
)
.summary("What this cloud's VMs were refused recently, and why, from every host")
.reply("[DeniedDestination]");
pub const GET_EGRESS_ADDRESS: Route = Route::new(
    RouteId::GetEgressAddress,
    Method::GET,
    "/v1/clouds/{cloud}/egress/address",
    C,
    200,
)
.summary("This cloud's own egress address")
.reply("EgressAddress");
pub const ASSIGN_EGRESS_ADDRESS: Route = Route::new(
    RouteId::AssignEgressAddress,
    Method::PUT,
    "/v1/clouds/{cloud}/egress/address",
    O,
    200,
)
.summary("Give the cloud an egress address of the pool, its alone (operator)")
.body("AssignEgressAddress")
.reply("EgressAddress");
pub const RELEASE_EGRESS_ADDRESS: Route = Route::new(
    RouteId::ReleaseEgressAddress,
    Method::DELETE,
    "/v1/clouds/{cloud}/egress/address",
    O,
    204,
)
.summary("Take the cloud's egress address back to the pool (operator)");
pub const PUBLISH: Route = Route::new(
    RouteId::Publish,
    Method::POST,
    "/v1/clouds/{cloud}/publications",
    C,
    201,
)
.summary("Publish a VM's port on the internet, at an address of the pool and the same port")
.body("Publish")
.reply("Publication");
pub const LIST_PUBLICATIONS: Route = Route::new(
    RouteId::ListPublications,
    Method::GET,
    "/v1/clouds/{cloud}/publications",
    C,
    200,
)
.summary("This cloud's published ports")
.reply("[Publication]");
pub const UNPUBLISH: Route = Route::new(
    RouteId::Unpublish,
    Method::DELETE,
    "/v1/clouds/{cloud}/publications/{publication}",
    C,
    204,
)
.summary("Unpublish a port (live connections are cut)");
pub const GET_USAGE: Route = Route::new(
    RouteId::GetUsage,
    Method::GET,
    "/v1/clouds/{cloud}/usage",
    C,
    200,
)
.summary(
    "A cloud's metered quantities (vCPU and memory time, volume time, network bytes per \
         direction and class) and their cost, itemised, in the hours [`from`, `to`) (seconds \
         since the Unix epoch, widened to whole hours; default: the last hour), with the time \
         its hosts' usage is complete up to and its budget",
)
.query(&[("from", QueryType::Integer), ("to", QueryType::Integer)])
.reply("CloudUsage");
pub const GET_FLEET_USAGE: Route = Route::new(
    RouteId::GetFleetUsage,
    Method::GET,
    "/v1/usage",
    O,
    200,
)
.summary(
    "Every cloud's metered quantities and cost in the hours [`from`, `to`) (seconds since the \
         Unix epoch, widened to whole hours; default: the last hour; at most 31 days); with \
         `format=focus`, the same as FOCUS 1.2 CSV rows, one per cloud, hour and SKU (operator)",
)
.query(&[
    ("from", QueryType::Integer),
    ("to", QueryType::Integer),
    ("format", QueryType::Text),
])
.reply("FleetUsage")
.stream(Stream::JsonOrCsv);
pub const SET_BUDGET: Route = Route::new(
    RouteId::SetBudget,
    Method::PUT,
    "/v1/clouds/{cloud}/budget",
    O,
    200,
)
.summary(
    "Set or raise the cloud's spend budget per calendar month (UTC): past `warn_percent` a \
         warning is recorded; at the amount the cloud's egress stops and its VMs stop \
         (`stopped_by: budget`) until the budget is raised or lifted, or the month ends \
         (operator)",
)
.body("Budget")
.reply("BudgetStatus");
pub const LIFT_BUDGET: Route = Route::new(
    RouteId::LiftBudget,
    Method::DELETE,
    "/v1/clouds/{cloud}/budget",
    O,
    204,
)
.summary("Lift the cloud's budget: what it stopped runs again (operator)");
pub const INGEST_USAGE: Route = Route::new(
    RouteId::IngestUsage,
    Method::POST,
    "/v1/hosts/{host}/usage",
    H,
    200,
)
.summary(
    "Deliver journaled usage records (the host's own token; at most 256 per batch; each id \
         kept once)",
)
.body("UsageBatch")
.reply("UsageIngested");
pub const LIST_HOSTS: Route = Route::new(RouteId::ListHosts, Method::GET, "/v1/hosts", O, 200)
    .summary("List registered hosts (operator)")
    .reply("[HostInfo]");
pub const REGISTER_HOST: Route = Route::new(
    RouteId::RegisterHost,
    Method::PUT,
    "/v1/hosts/{host}",
    H,
    200,
)
.summary("Register a host (operator, or the host's own token)")
.reply("HostInfo");
pub const ISSUE_HOST_TOKEN: Route = Route::new(
    RouteId::IssueHostToken,
    Method::POST,
    "/v1/hosts/{host}/token",
    O,
    201,
)
.summary(
    "Issue the host's token (operator; registers the host, replaces an earlier token); \
         returned once",
)
.reply("HostToken");
pub const SET_HOST_UNDERLAY: Route = Route::new(
    RouteId::SetHostUnderlay,
    Method::PUT,
    "/v1/hosts/{host}/underlay",
    H,
    200,
)
.summary(
    "Register the host's address on the overlay's underlay (operator, or the host's own token)",
)
.body("HostUnderlay")
.reply("HostInfo");
pub const SET_GUEST_ACCESS: Route = Route::new(
    RouteId::SetGuestAccess,
    Method::PUT,
    "/v1/hosts/{host}/guest-access",
    H,
    204,
)
.summary(
    "Register where control planes reach the host's guest agents for exec and files (the \
         host's own token; never returned)",
)
.body("GuestAccess");
pub const CORDON_HOST: Route = Route::new(
    RouteId::CordonHost,
    Method::POST,
    "/v1/hosts/{host}/cordon",
    O,
    200,
)
.summary("Place no new VMs or volumes on the host (operator); what runs there stays")
.reply("HostInfo");
pub const UNCORDON_HOST: Route = Route::new(
    RouteId::UncordonHost,
    Method::POST,
    "/v1/hosts/{host}/uncordon",
    O,
    200,
)
.summary("Place on the host again (operator)")
.reply("HostInfo");
pub const SYNC: Route = Route::new(RouteId::Sync, Method::GET, "/v1/hosts/{host}/sync", H, 200)
    .summary(
        "Long-poll a host's desired-state changes after `after` (up to `wait_ms`; operator, or \
         the host's own token)",
    )
    .reply("SyncDelta")
    .query(&[
        ("after", QueryType::Integer),
        ("wait_ms", QueryType::Integer),
    ]);
pub const REPORT_STATUS: Route = Route::new(
    RouteId::ReportStatus,
    Method::POST,
    "/v1/hosts/{host}/status",
    H,
    204,
)
.summary("Report what a host applied (operator, or the host's own token)")
.body("StatusReport");

/// Every route of the API, in the OpenAPI document's order.
pub const ROUTES: &[&Route] = &[
    &CREATE_CLOUD,
    &LIST_CLOUDS,
    &GET_CLOUD,
    &DELETE_CLOUD,
    &ROTATE_CLOUD_TOKEN,
    &SET_CLOUD_EXPIRY,
    &CREATE_VM,
    &LIST_VMS,
    &GET_VM,
    &DELETE_VM,
    &START_VM,
    &STOP_VM,
    &GET_CONSOLE,
    &EXEC_VM,
    &WRITE_EXEC_STDIN,
    &READ_FILE,
    &WRITE_FILE,
    &CREATE_VOLUME,
    &LIST_VOLUMES,
    &GET_VOLUME,
    &DELETE_VOLUME,
    &ATTACH_VOLUME,
    &DETACH_VOLUME,
    &LIST_RECORD_SETS,
    &PUT_RECORD_SET,
    &DELETE_RECORD_SET,
    &CREATE_EXPOSURE,
    &LIST_EXPOSURES,
    &GET_EXPOSURE,
    &DELETE_EXPOSURE,
    &CREATE_GRANT,
    &LIST_GRANTS,
    &REVOKE_GRANT,
    &LIST_EXPOSURE_OFFERS,
    &LIST_IMPORTS,
    &DELETE_IMPORT,
    &LIST_OFFERS,
    &ACCEPT_OFFER,
    &DECLINE_OFFER,
    &GET_OFFER_POLICY,
    &PUT_OFFER_POLICY,
    &GET_EGRESS_POLICY,
    &PUT_EGRESS_POLICY,
    &LIST_DENIED,
    &GET_EGRESS_ADDRESS,
    &ASSIGN_EGRESS_ADDRESS,
    &RELEASE_EGRESS_ADDRESS,
    &PUBLISH,
    &LIST_PUBLICATIONS,
    &UNPUBLISH,
    &LIST_HOSTS,
    &REGISTER_HOST,
    &ISSUE_HOST_TOKEN,
    &SET_HOST_UNDERLAY,
    &SET_GUEST_ACCESS,
    &CORDON_HOST,
    &UNCORDON_HOST,
    &SYNC,
    &REPORT_STATUS,
    &INGEST_USAGE,
    &GET_USAGE,
    &GET_FLEET_USAGE,
    &SET_BUDGET,
    &LIFT_BUDGET,
];

/// The path of the OpenAPI document (served without a token).
pub const OPENAPI_PATH: &str = "/openapi.json";

impl Command {
    /// The route this command is sent along.
    pub fn route(&self) -> &'static Route {
        use Command::*;
        match self {
            CreateCloud { .. } => &CREATE_CLOUD,
            ListClouds { .. } => &LIST_CLOUDS,
            GetCloud { .. } => &GET_CLOUD,
            DeleteCloud { .. } => &DELETE_CLOUD,
            RotateCloudToken { .. } => &ROTATE_CLOUD_TOKEN,
            SetCloudExpiry { .. } => &SET_CLOUD_EXPIRY,
            CreateVm { .. } => &CREATE_VM,
            ListVms { .. } => &LIST_VMS,
            GetVm { .. } => &GET_VM,
            DeleteVm { .. } => &DELETE_VM,
            StartVm { .. } => &START_VM,
            StopVm { .. } => &STOP_VM,
            GetConsole { .. } => &GET_CONSOLE,
            ExecVm { .. } => &EXEC_VM,
            WriteExecStdin { .. } => &WRITE_EXEC_STDIN,
            ReadFile { .. } => &READ_FILE,
            WriteFile { .. } => &WRITE_FILE,
            CreateVolume { .. } => &CREATE_VOLUME,
            ListVolumes { .. } => &LIST_VOLUMES,
            GetVolume { .. } => &GET_VOLUME,
            DeleteVolume { .. } => &DELETE_VOLUME,
            AttachVolume { .. } => &ATTACH_VOLUME,
            DetachVolume { .. } => &DETACH_VOLUME,
            ListRecordSets { .. } => &LIST_RECORD_SETS,
            PutRecordSet { .. } => &PUT_RECORD_SET,
            DeleteRecordSet { .. } => &DELETE_RECORD_SET,
            CreateExposure { .. } => &CREATE_EXPOSURE,
            ListExposures { .. } => &LIST_EXPOSURES,
            GetExposure { .. } => &GET_EXPOSURE,
            DeleteExposure { .. } => &DELETE_EXPOSURE,
            CreateGrant { .. } => &CREATE_GRANT,
            ListGrants { .. } => &LIST_GRANTS,
            RevokeGrant { .. } => &REVOKE_GRANT,
            ListExposureOffers { .. } => &LIST_EXPOSURE_OFFERS,
            ListImports { .. } => &LIST_IMPORTS,
            DeleteImport { .. } => &DELETE_IMPORT,
            ListOffers { .. } => &LIST_OFFERS,
            AcceptOffer { .. } => &ACCEPT_OFFER,
            DeclineOffer { .. } => &DECLINE_OFFER,
            GetOfferPolicy { .. } => &GET_OFFER_POLICY,
            PutOfferPolicy { .. } => &PUT_OFFER_POLICY,
            GetEgressPolicy { .. } => &GET_EGRESS_POLICY,
            PutEgressPolicy { .. } => &PUT_EGRESS_POLICY,
            GetEgressAddress { .. } => &GET_EGRESS_ADDRESS,
            ListDenied { .. } => &LIST_DENIED,
            Publish { .. } => &PUBLISH,
            ListPublications { .. } => &LIST_PUBLICATIONS,
            Unpublish { .. } => &UNPUBLISH,
            AssignEgressAddress { .. } => &ASSIGN_EGRESS_ADDRESS,
            ReleaseEgressAddress { .. } => &RELEASE_EGRESS_ADDRESS,
            ListHosts => &LIST_HOSTS,
            RegisterHost { .. } => &REGISTER_HOST,
            IssueHostToken { .. } => &ISSUE_HOST_TOKEN,
            SetHostUnderlay { .. } => &SET_HOST_UNDERLAY,
            SetGuestAccess { .. } => &SET_GUEST_ACCESS,
            CordonHost { cordoned: true, .. } => &CORDON_HOST,
            CordonHost {
                cordoned: false, ..
            } => &UNCORDON_HOST,
            Sync { .. } => &SYNC,
            ReportStatus { .. } => &REPORT_STATUS,
            IngestUsage { .. } => &INGEST_USAGE,
            GetUsage { .. } => &GET_USAGE,
            GetFleetUsage { .. } => &GET_FLEET_USAGE,
            SetBudget { .. } => &SET_BUDGET,
            LiftBudget { .. } => &LIFT_BUDGET,
        }
    }

    /// The values of the route's path parameters, in the route's order.
    pub fn path_params(&self) -> Vec<String> {
        use Command::*;
        match self {
            CreateCloud { .. } | ListClouds { .. } | ListHosts | GetFleetUsage { .. } => vec![],
            GetCloud { cloud }
            | DeleteCloud { cloud }
            | RotateCloudToken { cloud }
            | SetCloudExpiry { cloud, .. }
            | CreateVm { cloud, .. }
            | ListVms { cloud }
            | CreateVolume { cloud, .. }
            | ListVolumes { cloud }
            | ListRecordSets { cloud }
            | CreateExposure { cloud, .. }
            | ListExposures { cloud }
            | ListImports { cloud }
            | ListOffers { cloud }
            | GetOfferPolicy { cloud }
            | PutOfferPolicy { cloud, .. }
            | GetEgressPolicy { cloud }
            | PutEgressPolicy { cloud, .. }
            | GetEgressAddress { cloud }
            | ListDenied { cloud }
            | GetUsage { cloud, .. }
            | Publish { cloud, .. }
            | ListPublications { cloud }
            | AssignEgressAddress { cloud, .. }
            | SetBudget { cloud, .. }
            | LiftBudget { cloud }
            | ReleaseEgressAddress { cloud } => vec![cloud.to_string()],
            Unpublish { cloud, publication } => vec![cloud.to_string(), publication.clone()],
            GetVm { cloud, vm }
            | DeleteVm { cloud, vm }
            | StartVm { cloud, vm }
            | StopVm { cloud, vm }
            | GetConsole { cloud, vm }
            | ExecVm { cloud, vm, .. }
            | ReadFile { cloud, vm, .. }
            | WriteFile { cloud, vm, .. } => vec![cloud.to_string(), vm.clone()],
            WriteExecStdin { cloud, vm, exec } => {
                vec![cloud.to_string(), vm.clone(), exec.clone()]
            }
            GetVolume { cloud, volume }
            | DeleteVolume { cloud, volume }
            | AttachVolume { cloud, volume, .. }
            | DetachVolume { cloud, volume } => vec![cloud.to_string(), volume.clone()],
            PutRecordSet {
                cloud, name, rtype, ..
            }
            | DeleteRecordSet { cloud, name, rtype } => {
                vec![cloud.to_string(), name.clone(), rtype.as_str().to_string()]
            }
            GetExposure { cloud, exposure }
            | DeleteExposure { cloud, exposure }
            | CreateGrant {
                cloud, exposure, ..
            }
            | ListGrants { cloud, exposure }
            | ListExposureOffers { cloud, exposure } => vec![cloud.to_string(), exposure.clone()],
            RevokeGrant {
                cloud,
                exposure,
                consumer,
            } => vec![cloud.to_string(), exposure.clone(), consumer.to_string()],
            DeleteImport {
                cloud,
                provider,
                exposure,
            }
            | AcceptOffer {
                cloud,
                provider,
                exposure,
            }
            | DeclineOffer {
                cloud,
                provider,
                exposure,
            } => vec![cloud.to_string(), provider.to_string(), exposure.clone()],
            RegisterHost { host }
            | IssueHostToken { host }
            | SetHostUnderlay { host, .. }
            | SetGuestAccess { host, .. }
            | CordonHost { host, .. }
            | Sync { host, .. }
            | ReportStatus { host, .. }
            | IngestUsage { host, .. } => vec![host.clone()],
        }
    }

    /// The query parameters this command sends.
    pub fn query(&self) -> Vec<(&'static str, String)> {
        match self {
            Command::ListClouds { after, limit } => after
                .iter()
                .map(|a| ("after", a.to_string()))
                .chain([("limit", limit.to_string())])
                .collect(),
            Command::ReadFile { spec, .. } => vec![("path", encode_query(&spec.path))],
            Command::WriteFile { spec, .. } => std::iter::once(("path", encode_query(&spec.path)))
                .chain(spec.mode.map(|m| ("mode", format!("{m:o}"))))
                .chain(spec.uid.map(|u| ("uid", u.to_string())))
                .chain(spec.gid.map(|g| ("gid", g.to_string())))
                .collect(),
            Command::GetUsage { from, to, .. } => {
                vec![("from", from.to_string()), ("to", to.to_string())]
            }
            Command::GetFleetUsage { from, to, focus } => {
                let mut q = vec![("from", from.to_string()), ("to", to.to_string())];
                if *focus {
                    q.push(("format", "focus".into()));
                }
                q
            }
            Command::Sync { after, wait_ms, .. } => {
                vec![
                    ("after", after.to_string()),
                    ("wait_ms", wait_ms.to_string()),
                ]
            }
            _ => vec![],
        }
    }

    /// The path and query this command is sent to.
    pub fn path(&self) -> String {
        let params = self.path_params();
        let values: Vec<&(dyn std::fmt::Display + Sync)> = params
            .iter()
            .map(|p| p as &(dyn std::fmt::Display + Sync))
            .collect();
        let mut path = self.route().at(&values);
        for (i, (k, v)) in self.query().into_iter().enumerate() {
            path.push(if i == 0 { '?' } else { '&' });
            path.push_str(k);
            path.push('=');
            path.push_str(&v);
        }
        path
    }

    /// The JSON body this command sends, if its route takes one.
    pub fn body(&self) -> Option<serde_json::Value> {
        use Command::*;
        let v = match self {
            CreateCloud { spec } => serde_json::to_value(spec),
            SetCloudExpiry { expiry, .. } => serde_json::to_value(expiry),
            CreateVm { spec, .. } => serde_json::to_value(spec),
            CreateVolume { spec, .. } => serde_json::to_value(spec),
            AttachVolume { spec, .. } => serde_json::to_value(spec),
            PutRecordSet { spec, .. } => serde_json::to_value(spec),
            CreateExposure { spec, .. } => serde_json::to_value(spec),
            CreateGrant { spec, .. } => serde_json::to_value(spec),
            PutOfferPolicy { policy, .. } => serde_json::to_value(policy),
            PutEgressPolicy { policy, .. } => serde_json::to_value(policy),
            AssignEgressAddress { spec, .. } => serde_json::to_value(spec),
            SetBudget { budget, .. } => serde_json::to_value(budget),
            Publish { spec, .. } => serde_json::to_value(spec),
            ReportStatus { report, .. } => serde_json::to_value(report),
            SetHostUnderlay { spec, .. } => serde_json::to_value(spec),
            SetGuestAccess { spec, .. } => serde_json::to_value(spec),
            IngestUsage { batch, .. } => serde_json::to_value(batch),
            ExecVm { spec, .. } => serde_json::to_value(spec),
            _ => return None,
        };
        Some(v.expect("request types serialize"))
    }

    /// How much longer than a plain request the reply may take (a sync's long poll).
    pub fn wait(&self) -> std::time::Duration {
        match self {
            Command::Sync { wait_ms, .. } => {
                std::time::Duration::from_millis((*wait_ms).min(MAX_SYNC_WAIT_MS))
            }
            _ => std::time::Duration::ZERO,
        }
    }
}

/// Parses a request on `route` into its command: path parameters `params`, query `query`,
/// body `body`. Every error names the field (a path parameter, a query parameter, or a path
/// into the body).
pub fn parse(
    route: &Route,
    params: &HashMap<String, String>,
    query: &HashMap<String, String>,
    body: &[u8],
) -> Result<Command, FieldError> {
    use Command::*;
    let cloud = || cloud_param(params, "cloud");
    let name = |n: &str| name_param(params, n);
    if route.query.is_empty() {
        if let Some(k) = query.keys().next() {
            return Err(FieldError::new(k.clone(), "unknown query parameter"));
        }
    }
    let cmd = match route.id {
        RouteId::CreateCloud => CreateCloud {
            spec: parse_body(body)?,
        },
        RouteId::ListClouds => {
            let mut after = None;
            let mut limit = 100;
            for (k, v) in query {
                match k.as_str() {
                    "after" => {
                        after = Some(
                            v.parse::<CloudId>()
                                .map_err(|e| FieldError::new("after", e.message))?,
                        )
                    }
                    "limit" => {
                        limit = v
                            .parse::<usize>()
                            .ok()
                            .filter(|l| (1..=1000).contains(l))
                            .ok_or_else(|| FieldError::new("limit", "must be 1 to 1000"))?
                    }
                    other => return Err(FieldError::new(other, "unknown query parameter")),
                }
            }
            ListClouds { after, limit }
        }
        RouteId::GetCloud => GetCloud { cloud: cloud()? },
        RouteId::DeleteCloud => DeleteCloud { cloud: cloud()? },
        RouteId::RotateCloudToken => {
            let cmd = RotateCloudToken { cloud: cloud()? };
            parse_no_body(body)?;
            cmd
        }
        RouteId::SetCloudExpiry => SetCloudExpiry {
            cloud: cloud()?,
            expiry: parse_body(body)?,
        },
        RouteId::CreateVm => CreateVm {
            cloud: cloud()?,
            spec: parse_body(body)?,
        },
        RouteId::ListVms => ListVms { cloud: cloud()? },
        RouteId::GetVm => GetVm {
            cloud: cloud()?,
            vm: name("vm")?,
        },
        RouteId::DeleteVm => DeleteVm {
            cloud: cloud()?,
            vm: name("vm")?,
        },
        RouteId::StartVm => {
            let cmd = StartVm {
                cloud: cloud()?,
                vm: name("vm")?,
            };
            parse_no_body(body)?;
            cmd
        }
        RouteId::StopVm => {
            let cmd = StopVm {
                cloud: cloud()?,
                vm: name("vm")?,
            };
            parse_no_body(body)?;
            cmd
        }
        RouteId::GetConsole => GetConsole {
            cloud: cloud()?,
            vm: name("vm")?,
        },
        RouteId::ExecVm => {
            let spec: crate::model::ExecVm = parse_body(body)?;
            spec.validate()?;
            ExecVm {
                cloud: cloud()?,
                vm: name("vm")?,
                spec,
            }
        }
        RouteId::WriteExecStdin => WriteExecStdin {
            cloud: cloud()?,
            vm: name("vm")?,
            exec: name("exec")?,
        },
        RouteId::ReadFile | RouteId::WriteFile => {
            let spec = file_query(query, route.id == RouteId::WriteFile)?;
            let (cloud, vm) = (cloud()?, name("vm")?);
            match route.id {
                RouteId::ReadFile => ReadFile { cloud, vm, spec },
                _ => WriteFile { cloud, vm, spec },
            }
        }
        RouteId::CreateVolume => CreateVolume {
            cloud: cloud()?,
            spec: parse_body(body)?,
        },
        RouteId::ListVolumes => ListVolumes { cloud: cloud()? },
        RouteId::GetVolume => GetVolume {
            cloud: cloud()?,
            volume: name("volume")?,
        },
        RouteId::DeleteVolume => DeleteVolume {
            cloud: cloud()?,
            volume: name("volume")?,
        },
        RouteId::AttachVolume => AttachVolume {
            cloud: cloud()?,
            volume: name("volume")?,
            spec: parse_body(body)?,
        },
        // `detach` predates the no-body rule and ignores a body.
        RouteId::DetachVolume => DetachVolume {
            cloud: cloud()?,
            volume: name("volume")?,
        },
        RouteId::ListRecordSets => ListRecordSets { cloud: cloud()? },
        RouteId::PutRecordSet => PutRecordSet {
            cloud: cloud()?,
            name: name("name")?,
            rtype: record_type(params)?,
            spec: parse_body(body)?,
        },
        RouteId::DeleteRecordSet => DeleteRecordSet {
            cloud: cloud()?,
            name: name("name")?,
            rtype: record_type(params)?,
        },
        RouteId::CreateExposure => CreateExposure {
            cloud: cloud()?,
            spec: parse_body(body)?,
        },
        RouteId::ListExposures => ListExposures { cloud: cloud()? },
        RouteId::GetExposure => GetExposure {
            cloud: cloud()?,
            exposure: name("exposure")?,
        },
        RouteId::DeleteExposure => DeleteExposure {
            cloud: cloud()?,
            exposure: name("exposure")?,
        },
        RouteId::CreateGrant => CreateGrant {
            cloud: cloud()?,
            exposure: name("exposure")?,
            spec: parse_body(body)?,
        },
        RouteId::ListGrants => ListGrants {
            cloud: cloud()?,
            exposure: name("exposure")?,
        },
        RouteId::RevokeGrant => RevokeGrant {
            cloud: cloud()?,
            exposure: name("exposure")?,
            consumer: cloud_param(params, "consumer")?,
        },
        RouteId::ListExposureOffers => ListExposureOffers {
            cloud: cloud()?,
            exposure: name("exposure")?,
        },
        RouteId::ListImports => ListImports { cloud: cloud()? },
        RouteId::DeleteImport => DeleteImport {
            cloud: cloud()?,
            provider: cloud_param(params, "provider")?,
            exposure: name("exposure")?,
        },
        RouteId::ListOffers => ListOffers { cloud: cloud()? },
        RouteId::AcceptOffer => {
            let cmd = AcceptOffer {
                cloud: cloud()?,
                provider: cloud_param(params, "provider")?,
                exposure: name("exposure")?,
            };
            parse_no_body(body)?;
            cmd
        }
        RouteId::DeclineOffer => DeclineOffer {
            cloud: cloud()?,
            provider: cloud_param(params, "provider")?,
            exposure: name("exposure")?,
        },
        RouteId::GetOfferPolicy => GetOfferPolicy { cloud: cloud()? },
        RouteId::PutOfferPolicy => PutOfferPolicy {
            cloud: cloud()?,
            policy: parse_body(body)?,
        },
        RouteId::GetEgressPolicy => GetEgressPolicy { cloud: cloud()? },
        RouteId::GetEgressAddress => GetEgressAddress { cloud: cloud()? },
        RouteId::ListDenied => ListDenied { cloud: cloud()? },
        RouteId::Publish => Publish {
            cloud: cloud()?,
            spec: parse_body(body)?,
        },
        RouteId::ListPublications => ListPublications { cloud: cloud()? },
        RouteId::Unpublish => Unpublish {
            cloud: cloud()?,
            publication: name("publication")?,
        },
        RouteId::AssignEgressAddress => AssignEgressAddress {
            cloud: cloud()?,
            spec: parse_body(body)?,
        },
        RouteId::ReleaseEgressAddress => ReleaseEgressAddress { cloud: cloud()? },
        RouteId::SetBudget => {
            let budget: Budget = parse_body(body)?;
            budget.validate()?;
            SetBudget {
                cloud: cloud()?,
                budget,
            }
        }
        RouteId::LiftBudget => LiftBudget { cloud: cloud()? },
        RouteId::PutEgressPolicy => PutEgressPolicy {
            cloud: cloud()?,
            policy: parse_body(body)?,
        },
        RouteId::ListHosts => ListHosts,
        RouteId::RegisterHost => RegisterHost {
            host: name("host")?,
        },
        RouteId::IssueHostToken => IssueHostToken {
            host: name("host")?,
        },
        RouteId::SetHostUnderlay => SetHostUnderlay {
            host: name("host")?,
            spec: parse_body(body)?,
        },
        RouteId::SetGuestAccess => {
            let spec: GuestAccess = parse_body(body)?;
            spec.validate()?;
            SetGuestAccess {
                host: name("host")?,
                spec,
            }
        }
        RouteId::CordonHost => CordonHost {
            host: name("host")?,
            cordoned: true,
        },
        RouteId::UncordonHost => CordonHost {
            host: name("host")?,
            cordoned: false,
        },
        RouteId::Sync => {
            let host = name("host")?;
            let mut after = 0;
            let mut wait_ms = 30_000;
            for (k, v) in query {
                match k.as_str() {
                    "after" => {
                        after = v
                            .parse()
                            .map_err(|_| FieldError::new("after", "must be a revision (integer)"))?
                    }
                    "wait_ms" => {
                        wait_ms = v
                            .parse::<u64>()
                            .map_err(|_| FieldError::new("wait_ms", "must be milliseconds"))?
                            .min(MAX_SYNC_WAIT_MS)
                    }
                    other => return Err(FieldError::new(other, "unknown query parameter")),
                }
            }
            Sync {
                host,
                after,
                wait_ms,
            }
        }
        RouteId::ReportStatus => ReportStatus {
            host: name("host")?,
            report: parse_body(body)?,
        },
        RouteId::IngestUsage => {
            let batch: UsageBatch = parse_body(body)?;
            batch.validate()?;
            IngestUsage {
                host: name("host")?,
                batch,
            }
        }
        RouteId::GetUsage | RouteId::GetFleetUsage => {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            let (mut from, mut to, mut focus) = (None, None, false);
            for (k, v) in query {
                if k == "format" && route.id == RouteId::GetFleetUsage {
                    focus = match v.as_str() {
                        "json" => false,
                        "focus" => true,
                        _ => return Err(FieldError::new("format", "json or focus")),
                    };
                    continue;
                }
                let n = v.parse::<u64>().map_err(|_| {
                    FieldError::new(k.clone(), "must be seconds since the Unix epoch")
                })?;
                match k.as_str() {
                    "from" => from = Some(n),
                    "to" => to = Some(n),
                    other => return Err(FieldError::new(other, "unknown query parameter")),
                }
            }
            let to = to.unwrap_or(now + 1);
            let from = from.unwrap_or(to.saturating_sub(3600));
            if from >= to {
                return Err(FieldError::new("from", "must be before to"));
            }
            if route.id == RouteId::GetFleetUsage {
                GetFleetUsage { from, to, focus }
            } else {
                GetUsage {
                    cloud: cloud()?,
                    from,
                    to,
                }
            }
        }
    };
    Ok(cmd)
}

/// The file routes' query: `path`, and for an upload `mode` (octal), `uid`, `gid`.
fn file_query(query: &HashMap<String, String>, write: bool) -> Result<FileSpec, FieldError> {
    let mut spec = FileSpec {
        path: String::new(),
        mode: None,
        uid: None,
        gid: None,
    };
    for (k, v) in query {
        let int = |radix| {
            u32::from_str_radix(v, radix)
                .map_err(|_| FieldError::new(k.clone(), "must be a number"))
        };
        match k.as_str() {
            "path" => spec.path = v.clone(),
            "mode" if write => spec.mode = Some(int(8)?),
            "uid" if write => spec.uid = Some(int(10)?),
            "gid" if write => spec.gid = Some(int(10)?),
            other => return Err(FieldError::new(other, "unknown query parameter")),
        }
    }
    if spec.path.is_empty() {
        return Err(FieldError::new("path", "is required"));
    }
    spec.validate()?;
    Ok(spec)
}

/// A query value percent-encoded (everything but unreserved characters and `/`).
pub fn encode_query(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for b in v.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~/".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A query component percent-decoded (`+` stays a plus); `None` if malformed or not UTF-8.
pub fn decode_query(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// A cloud id in path parameter `name`.
pub fn cloud_param(p: &HashMap<String, String>, name: &str) -> Result<CloudId, FieldError> {
    let raw = p.get(name).map(String::as_str).unwrap_or_default();
    raw.parse::<CloudId>()
        .map_err(|e| FieldError::new(name, e.message))
}

/// A name (a DNS label) in path parameter `name`; a record set's `name` is validated by the
/// core (it may be dotted or `@`).
pub fn name_param(p: &HashMap<String, String>, name: &str) -> Result<String, FieldError> {
    let raw = p.get(name).cloned().unwrap_or_default();
    if name == "name" {
        return Ok(raw);
    }
    validate_label(name, &raw)?;
    Ok(raw)
}

/// The record type in path parameter `type` (case-insensitive).
pub fn record_type(p: &HashMap<String, String>) -> Result<RecordType, FieldError> {
    let raw = p.get("type").map(String::as_str).unwrap_or_default();
    match raw.to_ascii_uppercase().as_str() {
        "A" => Ok(RecordType::A),
        "AAAA" => Ok(RecordType::Aaaa),
        "CNAME" => Ok(RecordType::Cname),
        "TXT" => Ok(RecordType::Txt),
        _ => Err(FieldError::new(
            "type",
            format!("{raw:?} is not one of A, AAAA, CNAME, TXT"),
        )),
    }
}

/// Parses a JSON body strictly, naming the failing field.
pub fn parse_body<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, FieldError> {
    if bytes.is_empty() {
        return Err(FieldError::new("body", "a JSON body is required"));
    }
    // serde would also accept a struct as a positional array; bodies are objects only.
    if bytes.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(FieldError::new("body", "must be a JSON object"));
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
        FieldError::new(field, msg)
    })
}

/// The body of a route that takes none: empty, or an empty JSON object.
fn parse_no_body(bytes: &[u8]) -> Result<(), FieldError> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Empty {}
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(());
    }
    parse_body::<Empty>(bytes).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::command::{Issuer, Reply};
    use crate::model as m;

    /// One command of every route, with every field set.
    fn samples() -> Vec<Command> {
        use Command::*;
        let cloud = CloudId::new(0x2a).unwrap();
        let other = CloudId::new(0x2b).unwrap();
        let s = |v: &str| v.to_string();
        vec![
            CreateCloud {
                spec: m::CreateCloud {
                    name: Some(s("alpha")),
                    cidr: Some("10.1.0.0/16".parse().unwrap()),
                    quotas: None,
                    ttl_secs: Some(3600),
                    expires_at: None,
                },
            },
            ListClouds {
                after: Some(other),
                limit: 7,
            },
            GetCloud { cloud },
            DeleteCloud { cloud },
            RotateCloudToken { cloud },
            SetCloudExpiry {
                cloud,
                expiry: m::CloudExpiry {
                    ttl_secs: None,
                    expires_at: Some(1_900_000_000),
                },
            },
            CreateVm {
                cloud,
                spec: m::CreateVm {
                    name: s("web"),
                    vcpus: 2,
                    memory_mib: 256,
                    kernel: None,
                    image: Some(s("base")),
                    volumes: vec![s("data")],
                    user_data: Some(s("#!/bin/sh\n")),
                    start: false,
                    anti_affinity: None,
                    idle_timeout_secs: Some(300),
                },
            },
            ListVms { cloud },
            GetVm {
                cloud,
                vm: s("web"),
            },
            DeleteVm {
                cloud,
                vm: s("web"),
            },
            StartVm {
                cloud,
                vm: s("web"),
            },
            StopVm {
                cloud,
                vm: s("web"),
            },
            GetConsole {
                cloud,
                vm: s("web"),
            },
            ExecVm {
                cloud,
                vm: s("web"),
                spec: m::ExecVm::argv(["uname", "-a"]),
            },
            WriteExecStdin {
                cloud,
                vm: s("web"),
                exec: s("0123456789abcdef0123456789abcdef"),
            },
            ReadFile {
                cloud,
                vm: s("web"),
                spec: m::FileSpec {
                    path: s("/etc/a b%"),
                    mode: None,
                    uid: None,
                    gid: None,
                },
            },
            WriteFile {
                cloud,
                vm: s("web"),
                spec: m::FileSpec {
                    path: s("/root/x"),
                    mode: Some(0o755),
                    uid: Some(1000),
                    gid: Some(100),
                },
            },
            CreateVolume {
                cloud,
                spec: m::CreateVolume {
                    name: s("data"),
                    size_gib: 3,
                    format: VolumeFormat::Qcow2,
                },
            },
            ListVolumes { cloud },
            GetVolume {
                cloud,
                volume: s("data"),
            },
            DeleteVolume {
                cloud,
                volume: s("data"),
            },
            AttachVolume {
                cloud,
                volume: s("data"),
                spec: m::AttachVolume { vm: s("web") },
            },
            DetachVolume {
                cloud,
                volume: s("data"),
            },
            ListRecordSets { cloud },
            PutRecordSet {
                cloud,
                name: s("www.api"),
                rtype: RecordType::Cname,
                spec: m::PutRecordSet {
                    ttl: 30,
                    values: vec![s("web")],
                },
            },
            DeleteRecordSet {
                cloud,
                name: s("@"),
                rtype: RecordType::Txt,
            },
            CreateExposure {
                cloud,
                spec: m::CreateExposure {
                    name: s("pg"),
                    protocol: Protocol::Udp,
                    port: 5432,
                    backends: vec![Backend {
                        vm: s("db"),
                        port: 15432,
                    }],
                },
            },
            ListExposures { cloud },
            GetExposure {
                cloud,
                exposure: s("pg"),
            },
            DeleteExposure {
                cloud,
                exposure: s("pg"),
            },
            CreateGrant {
                cloud,
                exposure: s("pg"),
                spec: m::CreateGrant { consumer: other },
            },
            ListGrants {
                cloud,
                exposure: s("pg"),
            },
            RevokeGrant {
                cloud,
                exposure: s("pg"),
                consumer: other,
            },
            ListExposureOffers {
                cloud,
                exposure: s("pg"),
            },
            ListImports { cloud },
            DeleteImport {
                cloud,
                provider: other,
                exposure: s("pg"),
            },
            ListOffers { cloud },
            AcceptOffer {
                cloud,
                provider: other,
                exposure: s("pg"),
            },
            DeclineOffer {
                cloud,
                provider: other,
                exposure: s("pg"),
            },
            GetOfferPolicy { cloud },
            PutOfferPolicy {
                cloud,
                policy: m::OfferPolicy {
                    accept_from: vec![other],
                },
            },
            GetEgressPolicy { cloud },
            GetEgressAddress { cloud },
            ListDenied { cloud },
            GetUsage {
                cloud,
                from: 100,
                to: 200,
            },
            GetFleetUsage {
                from: 3600,
                to: 7200,
                focus: true,
            },
            IngestUsage {
                host: s("h1"),
                batch: m::UsageBatch {
                    complete_to_ms: Some(3),
                    records: vec![crate::usage::UsageEvent {
                        specversion: s("1.0"),
                        id: s("boot-7-1"),
                        source: s("h1"),
                        ty: crate::usage::EVENT_TYPE.into(),
                        subject: s("42/atv1"),
                        time: s("2026-12-06T00:00:00Z"),
                        datacontenttype: s("application/json"),
                        data: crate::usage::UsageData {
                            cloud: 42,
                            endpoint: s("atv1"),
                            incarnation: s("boot-7"),
                            seq: 1,
                            start_unix_ms: 1,
                            end_unix_ms: 2,
                            is_final: false,
                            usage: Default::default(),
                            cumulative: Default::default(),
                            resource: None,
                        },
                    }],
                },
            },
            Publish {
                cloud,
                spec: m::Publish {
                    vm: s("web"),
                    protocol: m::Protocol::Tcp,
                    port: 443,
                    allow_from: Vec::new(),
                },
            },
            ListPublications { cloud },
            Unpublish {
                cloud,
                publication: s("web-tcp-443"),
            },
            AssignEgressAddress {
                cloud,
                spec: m::AssignEgressAddress {
                    address: Some(std::net::Ipv4Addr::new(203, 0, 113, 7)),
                },
            },
            ReleaseEgressAddress { cloud },
            SetBudget {
                cloud,
                budget: m::Budget {
                    amount: 12.5,
                    warn_percent: 75,
                },
            },
            LiftBudget { cloud },
            PutEgressPolicy {
                cloud,
                policy: m::EgressPolicy {
                    mode: m::EgressMode::Allowlist,
                    allow: vec![m::EgressRule {
                        cidr: None,
                        domain: Some(s("*.example.com")),
                        protocol: Some(m::Protocol::Tcp),
                        ports: Some(m::PortRange {
                            first: 443,
                            last: 443,
                        }),
                    }],
                    deny: vec![m::EgressRule {
                        cidr: Some("198.18.0.0/24".parse().unwrap()),
                        domain: None,
                        protocol: None,
                        ports: None,
                    }],
                    limits: m::EgressLimits {
                        rate_bytes_per_sec: Some(1_000_000),
                        budget: Some(m::ByteBudget {
                            bytes: 10 << 30,
                            period: m::BudgetPeriod::Month,
                        }),
                    },
                },
            },
            ListHosts,
            RegisterHost { host: s("h1") },
            IssueHostToken { host: s("h1") },
            SetHostUnderlay {
                host: s("h1"),
                spec: m::HostUnderlay {
                    underlay: std::net::Ipv4Addr::new(10, 9, 0, 1),
                },
            },
            SetGuestAccess {
                host: s("h1"),
                spec: m::GuestAccess {
                    url: s("https://10.0.0.1:7444"),
                    fingerprint: ["AB"; 32].join(":"),
                    secret: "s".repeat(43),
                },
            },
            CordonHost {
                host: s("h1"),
                cordoned: true,
            },
            CordonHost {
                host: s("h1"),
                cordoned: false,
            },
            Sync {
                host: s("h1"),
                after: 9,
                wait_ms: 1500,
            },
            ReportStatus {
                host: s("h1"),
                report: m::StatusReport {
                    vms: vec![],
                    services: vec![],
                    denied: Vec::new(),
                    idle: vec![m::VmRef {
                        cloud,
                        vm: s("web"),
                    }],
                },
            },
        ]
    }

    /// The server's view of a request a client builds from `cmd`: the route matched by
    /// method and path, its parameters, its query and its body.
    fn serve(cmd: &Command) -> Result<Command, FieldError> {
        let full = cmd.path();
        let (path, query) = full.split_once('?').unwrap_or((&full, ""));
        let method = cmd.route().method;
        let segs: Vec<&str> = path.split('/').collect();
        let route = ROUTES
            .iter()
            .find(|r| {
                let t: Vec<&str> = r.path.split('/').collect();
                r.method == method
                    && t.len() == segs.len()
                    && t.iter()
                        .zip(&segs)
                        .all(|(t, s)| t.starts_with('{') || t == s)
            })
            .unwrap_or_else(|| panic!("no route for {method} {path}"));
        let params = route
            .path
            .split('/')
            .zip(&segs)
            .filter_map(|(t, s)| {
                let n = t.strip_prefix('{')?.strip_suffix('}')?;
                Some((n.to_string(), s.to_string()))
            })
            .collect();
        let query = query
            .split('&')
            .filter(|q| !q.is_empty())
            .map(|q| {
                let (k, v) = q.split_once('=').unwrap();
                (k.to_string(), decode_query(v).unwrap())
            })
            .collect();
        let body = cmd
            .body()
            .map(|b| serde_json::to_vec(&b).unwrap())
            .unwrap_or_default();
        parse(route, &params, &query, &body)
    }

    /// Every command goes out along its route and the server parses it back into the same
    /// command; every route is some command's; a route's access (checked before the body is
    /// read) is the command's issuer (what the core enforces).
    #[test]
    fn every_command_round_trips_through_its_route() {
        let mut used = std::collections::HashSet::new();
        for cmd in samples() {
            let route = cmd.route();
            assert_eq!(serve(&cmd).as_ref(), Ok(&cmd), "{}", cmd.path());
            assert_eq!(route.body.is_some(), cmd.body().is_some(), "{}", route.path);
            let access = match cmd.issuer() {
                Issuer::Operator => Access::Operator,
                Issuer::AnyCloud => Access::Any,
                Issuer::Cloud(_) => Access::Cloud,
                Issuer::Host(_) => Access::Host,
            };
            assert_eq!(route.access, access, "{} {}", route.method, route.path);
            used.insert(route.id);
        }
        for r in ROUTES {
            assert!(used.contains(&r.id), "{:?} has no sample", r.id);
        }
        assert_eq!(used.len(), ROUTES.len(), "route ids are unique");
    }

    /// A route's reply schema decodes into a reply, and the server's encoding of that reply
    /// decodes back (the typed client's half of the contract).
    #[test]
    fn every_reply_schema_decodes() {
        for r in ROUTES {
            if let Some(schema) = r.response {
                // Decoding an empty object or array must fail for the type's reasons, not for
                // an unknown schema.
                let e = Reply::from_json(Some(schema), b"{}").err();
                assert!(
                    !e.is_some_and(|e| e.to_string().contains("no reply has the schema")),
                    "{schema}"
                );
            }
        }
        let reply = Reply::Vms(vec![]);
        let json = reply.to_json().unwrap();
        assert_eq!(Reply::from_json(Some("[Vm]"), &json).unwrap(), reply);
        assert_eq!(Reply::from_json(None, b"").unwrap(), Reply::Done);
    }

    #[test]
    fn paths_fill_in_order_and_keep_missing_parameters() {
        assert_eq!(
            GET_VM.at(&[&CloudId::new(1).unwrap(), &"web"]),
            "/v1/clouds/c00000001/vms/web"
        );
        assert_eq!(GET_VM.at(&[&"x"]), "/v1/clouds/x/vms/{vm}");
        assert_eq!(
            Command::ListClouds {
                after: None,
                limit: 5
            }
            .path(),
            "/v1/clouds?limit=5"
        );
    }
}
