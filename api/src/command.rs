//! The commands of the API and their replies: what a client asks for and what it gets back,
//! the same types on both sides of the wire (the control plane's core executes them; the
//! typed [`Client`](crate::client::Client) sends them along the route table).
//!
//! Decisions:
//! - **One command enum** (Firecracker's shape): each variant has named fields and a doc line
//!   ending with who may issue it, which [`Command::issuer`] returns; the core authorizes on
//!   it, and the route table's access check (made before a request's body is read) is tested
//!   to agree with it.
//! - A host's sync is a command too ([`Command::Sync`]), so the converger speaks to an
//!   embedded core and to a remote control plane through one interface
//!   ([`ControlPlane`](crate::ControlPlane)).

use crate::model::*;

/// A request to the core. Each variant's doc line ends with who may issue it, which is
/// what [`Command::issuer`] returns and the control plane's core enforces.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    /// Create a cloud and its token. Operator.
    CreateCloud { spec: CreateCloud },
    /// List clouds: all of them (paged by `after`, `limit`) for the operator, its own for a
    /// cloud. Operator or any cloud.
    ListClouds {
        after: Option<CloudId>,
        limit: usize,
    },
    /// Get a cloud. The cloud or the operator.
    GetCloud { cloud: CloudId },
    /// Delete a cloud and everything in it. The cloud or the operator.
    DeleteCloud { cloud: CloudId },
    /// Give the cloud a new token; the old one stops working at once. The cloud or the
    /// operator.
    RotateCloudToken { cloud: CloudId },
    /// Set when the cloud expires (deleted with everything it holds), or that it never does.
    /// The cloud or the operator.
    SetCloudExpiry { cloud: CloudId, expiry: CloudExpiry },
    /// Create a VM (address, placement, DNS name). The cloud or the operator.
    CreateVm { cloud: CloudId, spec: CreateVm },
    /// List a cloud's VMs with their status. The cloud or the operator.
    ListVms { cloud: CloudId },
    /// Get a VM with its status. The cloud or the operator.
    GetVm { cloud: CloudId, vm: String },
    /// Delete a VM, releasing its address and detaching its volumes. The cloud or the operator.
    DeleteVm { cloud: CloudId, vm: String },
    /// Set the VM's power to running (a no-op if it is). The cloud or the operator.
    StartVm { cloud: CloudId, vm: String },
    /// Set the VM's power to stopped (a no-op if it is). The cloud or the operator.
    StopVm { cloud: CloudId, vm: String },
    /// The tail of the VM's console as its host last reported it. The cloud or the operator.
    GetConsole { cloud: CloudId, vm: String },
    /// Run a command in a VM (answered with where its guest agent is: [`Reply::Guest`]). The
    /// cloud or the operator.
    ExecVm {
        cloud: CloudId,
        vm: String,
        spec: ExecVm,
    },
    /// Stream stdin to a running exec ([`Reply::Guest`]). The cloud or the operator.
    WriteExecStdin {
        cloud: CloudId,
        vm: String,
        exec: String,
    },
    /// Read a file in a VM ([`Reply::Guest`]). The cloud or the operator.
    ReadFile {
        cloud: CloudId,
        vm: String,
        spec: FileSpec,
    },
    /// Write a file in a VM ([`Reply::Guest`]). The cloud or the operator.
    WriteFile {
        cloud: CloudId,
        vm: String,
        spec: FileSpec,
    },
    /// Create a volume. The cloud or the operator.
    CreateVolume { cloud: CloudId, spec: CreateVolume },
    /// List a cloud's volumes. The cloud or the operator.
    ListVolumes { cloud: CloudId },
    /// Get a volume. The cloud or the operator.
    GetVolume { cloud: CloudId, volume: String },
    /// Delete a detached volume. The cloud or the operator.
    DeleteVolume { cloud: CloudId, volume: String },
    /// Attach a volume to a VM. The cloud or the operator.
    AttachVolume {
        cloud: CloudId,
        volume: String,
        spec: AttachVolume,
    },
    /// Detach a volume. The cloud or the operator.
    DetachVolume { cloud: CloudId, volume: String },
    /// Create or replace a record set. The cloud or the operator.
    PutRecordSet {
        cloud: CloudId,
        name: String,
        rtype: RecordType,
        spec: PutRecordSet,
    },
    /// List a cloud's record sets. The cloud or the operator.
    ListRecordSets { cloud: CloudId },
    /// Delete a record set. The cloud or the operator.
    DeleteRecordSet {
        cloud: CloudId,
        name: String,
        rtype: RecordType,
    },
    /// Create an exposure of some of the cloud's VMs. The cloud (the provider) or the operator.
    CreateExposure {
        cloud: CloudId,
        spec: CreateExposure,
    },
    /// List a cloud's exposures. The cloud or the operator.
    ListExposures { cloud: CloudId },
    /// Get an exposure. The cloud or the operator.
    GetExposure { cloud: CloudId, exposure: String },
    /// Delete an exposure, revoking its grants and offers. The cloud or the operator.
    DeleteExposure { cloud: CloudId, exposure: String },
    /// Offer an exposure to a consumer (accepted at once if the consumer's policy lists the
    /// provider). The providing cloud or the operator.
    CreateGrant {
        cloud: CloudId,
        exposure: String,
        spec: CreateGrant,
    },
    /// List an exposure's grants as they stand. The providing cloud or the operator.
    ListGrants { cloud: CloudId, exposure: String },
    /// Revoke a grant, or withdraw a pending offer. The providing cloud or the operator.
    RevokeGrant {
        cloud: CloudId,
        exposure: String,
        consumer: CloudId,
    },
    /// The provider's pending offers of an exposure. The providing cloud or the operator.
    ListExposureOffers { cloud: CloudId, exposure: String },
    /// The grants a cloud received. The consuming cloud or the operator.
    ListImports { cloud: CloudId },
    /// Give up a grant received. The consuming cloud or the operator.
    DeleteImport {
        cloud: CloudId,
        provider: CloudId,
        exposure: String,
    },
    /// The pending offers a cloud received. The consuming cloud or the operator.
    ListOffers { cloud: CloudId },
    /// Make an offer received an active grant. The consuming cloud or the operator.
    AcceptOffer {
        cloud: CloudId,
        provider: CloudId,
        exposure: String,
    },
    /// Decline an offer received. The consuming cloud or the operator.
    DeclineOffer {
        cloud: CloudId,
        provider: CloudId,
        exposure: String,
    },
    /// Which providers' offers the cloud accepts at once. The cloud or the operator.
    GetOfferPolicy { cloud: CloudId },
    /// Replace the cloud's offer policy. The cloud or the operator.
    PutOfferPolicy { cloud: CloudId, policy: OfferPolicy },
    /// What the cloud's VMs may reach outside the cloud. The cloud or the operator.
    GetEgressPolicy { cloud: CloudId },
    /// Replace the cloud's egress policy (live flows it no longer allows are cut). The cloud
    /// or the operator.
    PutEgressPolicy {
        cloud: CloudId,
        policy: EgressPolicy,
    },
    /// The cloud's recent denied destinations, from every host. The cloud or the operator.
    ListDenied { cloud: CloudId },
    /// The cloud's own egress address. The cloud or the operator.
    GetEgressAddress { cloud: CloudId },
    /// Give the cloud an egress address of the pool (replacing the one it had). Operator.
    AssignEgressAddress {
        cloud: CloudId,
        spec: AssignEgressAddress,
    },
    /// Take the cloud's egress address back to the pool. Operator.
    ReleaseEgressAddress { cloud: CloudId },
    /// Set (or raise) the cloud's spend budget. Operator.
    SetBudget { cloud: CloudId, budget: Budget },
    /// Lift the cloud's budget (what it stopped starts again). Operator.
    LiftBudget { cloud: CloudId },
    /// Publish a VM's port on the internet (an address of the pool, the same port). The
    /// cloud or the operator.
    Publish { cloud: CloudId, spec: Publish },
    /// The cloud's publications. The cloud or the operator.
    ListPublications { cloud: CloudId },
    /// Unpublish (live connections are cut). The cloud or the operator.
    Unpublish { cloud: CloudId, publication: String },
    /// Register a host (idempotent). The host itself or the operator.
    RegisterHost { host: String },
    /// Issue a host a new token. Operator.
    IssueHostToken { host: String },
    /// Register the host's underlay address. The host itself or the operator.
    SetHostUnderlay { host: String, spec: HostUnderlay },
    /// Register where the host's guest agents are reached. The host itself or the operator.
    SetGuestAccess { host: String, spec: GuestAccess },
    /// Cordon (`true`) or uncordon a host. Operator.
    CordonHost { host: String, cordoned: bool },
    /// List hosts with their load and liveness. Operator.
    ListHosts,
    /// A host's delivery of usage records. The host itself or the operator.
    IngestUsage { host: String, batch: UsageBatch },
    /// A cloud's metered quantities in a period. The cloud or the operator.
    GetUsage { cloud: CloudId, from: u64, to: u64 },
    /// Every cloud's usage in a period, as JSON or FOCUS CSV. The operator.
    GetFleetUsage { from: u64, to: u64, focus: bool },
    /// A host's report of the state it reached. The host itself or the operator.
    ReportStatus { host: String, report: StatusReport },
    /// A host's desired-state changes after revision `after`, waiting up to `wait_ms`
    /// (bounded by the server's longest wait) for some. The host itself or the operator.
    Sync {
        host: String,
        after: u64,
        wait_ms: u64,
    },
}

/// Who may issue a [`Command`]; the operator may issue every command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Issuer<'a> {
    /// The operator only.
    Operator,
    /// The operator or a cloud (each cloud sees only its own; never a host).
    AnyCloud,
    /// The operator or the token of this cloud.
    Cloud(CloudId),
    /// The operator or the token of this host.
    Host(&'a str),
}

impl Command {
    /// Who may issue this command (the table the variants' doc lines state).
    pub fn issuer(&self) -> Issuer<'_> {
        use Command::*;
        match self {
            CreateCloud { .. } | IssueHostToken { .. } | CordonHost { .. } | ListHosts => {
                Issuer::Operator
            }
            ListClouds { .. } => Issuer::AnyCloud,
            RegisterHost { host }
            | SetHostUnderlay { host, .. }
            | SetGuestAccess { host, .. }
            | ReportStatus { host, .. }
            | IngestUsage { host, .. }
            | Sync { host, .. } => Issuer::Host(host),
            GetCloud { cloud }
            | DeleteCloud { cloud }
            | RotateCloudToken { cloud }
            | SetCloudExpiry { cloud, .. }
            | CreateVm { cloud, .. }
            | ListVms { cloud }
            | GetVm { cloud, .. }
            | DeleteVm { cloud, .. }
            | StartVm { cloud, .. }
            | StopVm { cloud, .. }
            | GetConsole { cloud, .. }
            | ExecVm { cloud, .. }
            | WriteExecStdin { cloud, .. }
            | ReadFile { cloud, .. }
            | WriteFile { cloud, .. }
            | CreateVolume { cloud, .. }
            | ListVolumes { cloud }
            | GetVolume { cloud, .. }
            | DeleteVolume { cloud, .. }
            | AttachVolume { cloud, .. }
            | DetachVolume { cloud, .. }
            | PutRecordSet { cloud, .. }
            | ListRecordSets { cloud }
            | DeleteRecordSet { cloud, .. }
            | CreateExposure { cloud, .. }
            | ListExposures { cloud }
            | GetExposure { cloud, .. }
            | DeleteExposure { cloud, .. }
            | CreateGrant { cloud, .. }
            | ListGrants { cloud, .. }
            | RevokeGrant { cloud, .. }
            | ListExposureOffers { cloud, .. }
            | ListImports { cloud }
            | DeleteImport { cloud, .. }
            | ListOffers { cloud }
            | AcceptOffer { cloud, .. }
            | DeclineOffer { cloud, .. }
            | GetOfferPolicy { cloud }
            | PutOfferPolicy { cloud, .. }
            | GetEgressPolicy { cloud }
            | PutEgressPolicy { cloud, .. }
            | GetEgressAddress { cloud }
            | Publish { cloud, .. }
            | ListPublications { cloud }
            | Unpublish { cloud, .. }
            | ListDenied { cloud }
            | GetUsage { cloud, .. } => Issuer::Cloud(*cloud),
            AssignEgressAddress { .. }
            | ReleaseEgressAddress { .. }
            | GetFleetUsage { .. }
            | SetBudget { .. }
            | LiftBudget { .. } => Issuer::Operator,
        }
    }

    /// What the command does, for refusals ("may not `<what>`").
    pub fn refusal(&self) -> &'static str {
        use Command::*;
        match self {
            CreateCloud { .. } => "create clouds",
            ListClouds { .. } => "list clouds",
            _ => "manage hosts",
        }
    }
}

/// The core's answer to a [`Command`].
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    CreatedCloud(Box<CreatedCloud>),
    CloudToken(Box<CloudToken>),
    Cloud(Box<Cloud>),
    Clouds(Vec<Cloud>),
    Vm(Box<Vm>),
    Vms(Vec<Vm>),
    Console(Console),
    Volume(Volume),
    Volumes(Vec<Volume>),
    RecordSet(RecordSet),
    RecordSets(Vec<RecordSet>),
    Exposure(Exposure),
    Exposures(Vec<Exposure>),
    Grant(Grant),
    Grants(Vec<Grant>),
    /// Rendered as 202 Accepted: an offer is not a grant yet.
    Offer(Offer),
    Offers(Vec<Offer>),
    OfferPolicy(OfferPolicy),
    EgressPolicy(EgressPolicy),
    EgressAddress(EgressAddress),
    Publication(Publication),
    Publications(Vec<Publication>),
    Denied(Vec<DeniedDestination>),
    Host(HostInfo),
    HostToken(Box<HostToken>),
    Hosts(Vec<HostInfo>),
    Sync(Box<SyncDelta>),
    UsageIngested(UsageIngested),
    Usage(Box<CloudUsage>),
    FleetUsage(Box<FleetUsage>),
    BudgetStatus(Box<BudgetStatus>),
    /// A FOCUS export (`text/csv`).
    Csv(String),
    /// An exec's events, collected (the typed client's [`Client::execute`] of an exec; the
    /// streaming form is [`crate::client::Client::exec`]).
    ///
    /// [`Client::execute`]: crate::client::Client::execute
    Exec(Vec<ExecEvent>),
    /// Where an exec or file command goes (the HTTP layer forwards it; never rendered).
    Guest(Box<GuestTarget>),
    /// Created-or-replaced/deleted with nothing to return.
    Done,
}

impl Reply {
    /// The JSON body the server sends for this reply (`None`: no content).
    pub fn to_json(&self) -> Option<Vec<u8>> {
        fn j<T: serde::Serialize + ?Sized>(v: &T) -> Option<Vec<u8>> {
            Some(serde_json::to_vec(v).expect("API types serialize"))
        }
        match self {
            Reply::CreatedCloud(v) => j(&**v),
            Reply::CloudToken(v) => j(&**v),
            Reply::Cloud(v) => j(&**v),
            Reply::Clouds(v) => j(v),
            Reply::Vm(v) => j(&**v),
            Reply::Vms(v) => j(v),
            Reply::Console(v) => j(v),
            Reply::Volume(v) => j(v),
            Reply::Volumes(v) => j(v),
            Reply::RecordSet(v) => j(v),
            Reply::RecordSets(v) => j(v),
            Reply::Exposure(v) => j(v),
            Reply::Exposures(v) => j(v),
            Reply::Grant(v) => j(v),
            Reply::Grants(v) => j(v),
            Reply::Offer(v) => j(v),
            Reply::Offers(v) => j(v),
            Reply::OfferPolicy(v) => j(v),
            Reply::EgressPolicy(v) => j(v),
            Reply::EgressAddress(v) => j(v),
            Reply::Publication(v) => j(v),
            Reply::Publications(v) => j(v),
            Reply::Denied(v) => j(v),
            Reply::Host(v) => j(v),
            Reply::HostToken(v) => j(&**v),
            Reply::Hosts(v) => j(v),
            Reply::Sync(v) => j(&**v),
            Reply::UsageIngested(v) => j(v),
            Reply::Usage(v) => j(&**v),
            Reply::FleetUsage(v) => j(&**v),
            Reply::BudgetStatus(v) => j(&**v),
            Reply::Csv(v) => Some(v.clone().into_bytes()),
            Reply::Exec(events) => {
                let mut out = Vec::new();
                for e in events {
                    out.extend(serde_json::to_vec(e).expect("API types serialize"));
                    out.push(b'\n');
                }
                Some(out)
            }
            Reply::Guest(_) | Reply::Done => None,
        }
    }

    /// Decodes a success body whose schema the route table names `schema` (`None`: no
    /// content, [`Reply::Done`]).
    pub fn from_json(schema: Option<&str>, body: &[u8]) -> Result<Reply, serde_json::Error> {
        use serde::de::Error;
        fn d<T: serde::de::DeserializeOwned>(b: &[u8]) -> Result<T, serde_json::Error> {
            serde_json::from_slice(b)
        }
        Ok(match schema {
            None => Reply::Done,
            Some("CreatedCloud") => Reply::CreatedCloud(d(body)?),
            Some("CloudToken") => Reply::CloudToken(d(body)?),
            Some("Cloud") => Reply::Cloud(d(body)?),
            Some("[Cloud]") => Reply::Clouds(d(body)?),
            Some("Vm") => Reply::Vm(d(body)?),
            Some("[Vm]") => Reply::Vms(d(body)?),
            Some("Console") => Reply::Console(d(body)?),
            Some("Volume") => Reply::Volume(d(body)?),
            Some("[Volume]") => Reply::Volumes(d(body)?),
            Some("RecordSet") => Reply::RecordSet(d(body)?),
            Some("[RecordSet]") => Reply::RecordSets(d(body)?),
            Some("Exposure") => Reply::Exposure(d(body)?),
            Some("[Exposure]") => Reply::Exposures(d(body)?),
            Some("Grant") => Reply::Grant(d(body)?),
            Some("[Grant]") => Reply::Grants(d(body)?),
            Some("Offer") => Reply::Offer(d(body)?),
            Some("[Offer]") => Reply::Offers(d(body)?),
            Some("OfferPolicy") => Reply::OfferPolicy(d(body)?),
            Some("EgressPolicy") => Reply::EgressPolicy(d(body)?),
            Some("EgressAddress") => Reply::EgressAddress(d(body)?),
            Some("Publication") => Reply::Publication(d(body)?),
            Some("[Publication]") => Reply::Publications(d(body)?),
            Some("[DeniedDestination]") => Reply::Denied(d(body)?),
            Some("HostInfo") => Reply::Host(d(body)?),
            Some("HostToken") => Reply::HostToken(d(body)?),
            Some("[HostInfo]") => Reply::Hosts(d(body)?),
            Some("SyncDelta") => Reply::Sync(d(body)?),
            Some("UsageIngested") => Reply::UsageIngested(d(body)?),
            Some("CloudUsage") => Reply::Usage(d(body)?),
            Some("BudgetStatus") => Reply::BudgetStatus(d(body)?),
            Some("FleetUsage") => match std::str::from_utf8(body) {
                // A FOCUS export is CSV, never a JSON object.
                Ok(t) if !t.trim_start().starts_with('{') => Reply::Csv(t.to_string()),
                _ => Reply::FleetUsage(d(body)?),
            },
            Some("ExecEvent") => Reply::Exec(
                body.split(|&b| b == b'\n')
                    .filter(|l| !l.iter().all(u8::is_ascii_whitespace))
                    .map(d)
                    .collect::<Result<_, _>>()?,
            ),
            Some(other) => {
                return Err(serde_json::Error::custom(format!(
                    "no reply has the schema {other}"
                )))
            }
        })
    }
}

/// A reply's payload as its own type: `let vm: Vm = client.run(&cmd).await?`.
macro_rules! payload {
    ($($variant:ident => $t:ty $(, boxed $b:tt)?;)*) => {$(
        impl TryFrom<Reply> for $t {
            type Error = Reply;
            fn try_from(r: Reply) -> Result<$t, Reply> {
                match r {
                    Reply::$variant(v) => Ok(payload!(@unbox v $($b)?)),
                    other => Err(other),
                }
            }
        }
    )*};
    (@unbox $v:ident) => { $v };
    (@unbox $v:ident $b:tt) => { *$v };
}

payload! {
    CreatedCloud => CreatedCloud, boxed 1;
    CloudToken => CloudToken, boxed 1;
    Cloud => Cloud, boxed 1;
    Clouds => Vec<Cloud>;
    Vm => Vm, boxed 1;
    Vms => Vec<Vm>;
    Console => Console;
    Volume => Volume;
    Volumes => Vec<Volume>;
    RecordSet => RecordSet;
    RecordSets => Vec<RecordSet>;
    Exposure => Exposure;
    Exposures => Vec<Exposure>;
    Grant => Grant;
    Grants => Vec<Grant>;
    Offer => Offer;
    Offers => Vec<Offer>;
    OfferPolicy => OfferPolicy;
    EgressPolicy => EgressPolicy;
    EgressAddress => EgressAddress;
    Publication => Publication;
    Publications => Vec<Publication>;
    Denied => Vec<DeniedDestination>;
    Host => HostInfo;
    HostToken => HostToken, boxed 1;
    Hosts => Vec<HostInfo>;
    Sync => SyncDelta, boxed 1;
    Exec => Vec<ExecEvent>;
    UsageIngested => UsageIngested;
    Usage => CloudUsage, boxed 1;
    FleetUsage => FleetUsage, boxed 1;
    BudgetStatus => BudgetStatus, boxed 1;
    Csv => String;
}

impl TryFrom<Reply> for () {
    type Error = Reply;
    fn try_from(r: Reply) -> Result<(), Reply> {
        match r {
            Reply::Done => Ok(()),
            other => Err(other),
        }
    }
}
