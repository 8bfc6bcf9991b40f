//! The split-horizon view: which cloud each endpoint slot belongs to, each cloud's zone, and the
//! answer to a question asked from a slot.
//!
//! Decisions:
//! - **The view is data the control plane converges.** `set_endpoint` / `remove_endpoint` follow
//!   the endpoints of this host, `set_zone` replaces a cloud's whole zone (compiled and checked
//!   first; an invalid zone leaves the previous one in place), `remove_zone` drops it. A
//!   [`DnsView`] is a cheap handle (`Arc`); readers take a read lock for two map lookups and an
//!   `Arc` clone, never while answering.
//! - **Zones are authoritative and small**: A, AAAA, CNAME and TXT records; no wildcards, no
//!   delegation. The apex always exists (it carries a synthetic SOA whose serial changes with
//!   every `set_zone`); names between a record and the apex exist as empty non-terminals
//!   (NOERROR/NODATA), all other names are NXDOMAIN. Negative answers carry the SOA (TTL and
//!   minimum [`NEGATIVE_TTL`]) so resolvers cache them briefly.
//! - **CNAMEs are chased inside the zone** (at most [`MAX_CNAME_CHAIN`] links, loops stop); a
//!   target outside the zone ends the chain and the client resolves it itself.
//! - Names are compared case-insensitively (stored lowercase).
//! - **Egress through DNS** (issue 17): with a cloud's egress policy set (`set_egress`), a name
//!   outside the suffix is forwarded upstream only if the policy allows it (`allow`: every
//!   name; `allowlist`: a name its domain rules name; `deny`: none), and is refused without
//!   being forwarded otherwise, so a cloud cannot tunnel data out through queries. The A
//!   records of an allowed name's answer are *learnt* for the cloud ([`DnsView::learn`]) for
//!   their TTL plus [`EGRESS_GRACE`], at most [`MAX_LEARNT_PER_CLOUD`] addresses per cloud
//!   (the soonest to expire go first): they are what the egress dataplane will let the
//!   cloud reach for that name. A cloud whose policy this host does not know (an agent that
//!   follows no control plane) keeps the host's forwarding as configured.

use std::{
    collections::{HashMap, HashSet},
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::{
        atomic::{AtomicU32, Ordering},
        Arc, RwLock,
    },
};

use hickory_proto::{
    op::ResponseCode,
    rr::{
        rdata::{A, AAAA, CNAME, SOA, TXT},
        LowerName, Name, RData, Record as RR, RecordType,
    },
    ProtoError,
};

use atoll_api::model::{
    DeniedDestination, DeniedReport, DenyReason, EgressMode, EgressPolicy, MAX_DENIED_PER_HOST,
};

use crate::types::CloudId;

/// How long a learnt address outlives its record's TTL: a client that resolved just before
/// the TTL ran out still connects, and a long-lived connection is not cut at once.
pub const EGRESS_GRACE: std::time::Duration = std::time::Duration::from_secs(60);
/// The most addresses learnt for one cloud (one answer's worth is at most a few dozen).
pub const MAX_LEARNT_PER_CLOUD: usize = 4096;

/// What a cloud's egress policy says about names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EgressNames {
    mode: EgressMode,
    /// `name` or `*.name` (a wildcard matches names strictly under), lower case, no final dot.
    domains: Vec<String>,
}

impl EgressNames {
    pub fn new(policy: &EgressPolicy) -> Self {
        EgressNames {
            mode: policy.mode,
            domains: policy
                .allow
                .iter()
                .filter_map(|r| r.domain.as_deref())
                .map(|d| d.trim_end_matches('.').to_ascii_lowercase())
                .collect(),
        }
    }

    /// Whether a question for `name` may be forwarded upstream.
    pub fn allows(&self, name: &str) -> bool {
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        match self.mode {
            EgressMode::Deny => false,
            EgressMode::Allow => true,
            EgressMode::Allowlist => self
                .domains
                .iter()
                .any(|d| crate::egress::rules::domain_matches(d, &name)),
        }
    }

    /// Whether answers to this cloud's questions are learnt (only an allowlist needs them).
    pub fn learns(&self) -> bool {
        self.mode == EgressMode::Allowlist
    }
}

/// TTL of negative answers (and of the synthetic SOA), seconds: short, so a name created by the
/// control plane is seen quickly by guests that asked before.
pub const NEGATIVE_TTL: u32 = 30;
/// Longest CNAME chain followed inside a zone.
pub const MAX_CNAME_CHAIN: usize = 8;

/// What to do with names outside the global suffix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ForwardPolicy {
    /// Answer REFUSED.
    Refuse,
    /// Ask these resolvers, in order, from the host's network namespace.
    Forward(Vec<SocketAddr>),
}

impl ForwardPolicy {
    /// `Refuse` for an empty list (the `dns.forward` default).
    pub fn from_upstreams(upstreams: &[SocketAddr]) -> Self {
        if upstreams.is_empty() {
            ForwardPolicy::Refuse
        } else {
            ForwardPolicy::Forward(upstreams.to_vec())
        }
    }
}

/// One cloud's zone, as the control plane describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Zone {
    /// The zone apex, e.g. `"prod.atoll.internal."` (a trailing dot is optional).
    pub apex: String,
    pub records: Vec<Record>,
}

/// A record of a [`Zone`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Owner name: the apex or a name under it (a trailing dot is optional).
    pub name: String,
    pub ttl: u32,
    pub data: RecordData,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecordData {
    A(Ipv4Addr),
    Aaaa(Ipv6Addr),
    /// Target name (absolute).
    Cname(String),
    /// Character strings of at most 255 bytes each.
    Txt(Vec<String>),
}

#[derive(Debug, thiserror::Error)]
pub enum ZoneError {
    #[error("zone {zone}: invalid name {name:?}: {source}")]
    ParseName {
        zone: String,
        name: String,
        source: ProtoError,
    },
    #[error("zone {zone}: {message}")]
    Invalid { zone: String, message: String },
}

/// Parses `s` as an absolute, lowercase domain name (`what` names it in errors).
pub(crate) fn parse_fqdn(s: &str, what: &str) -> Result<Name, ZoneError> {
    let parse_err = |source| ZoneError::ParseName {
        zone: what.into(),
        name: s.into(),
        source,
    };
    if s.is_empty() {
        return Err(ZoneError::Invalid {
            zone: what.into(),
            message: "empty name".into(),
        });
    }
    let mut name = Name::from_ascii(s).map_err(parse_err)?;
    name.set_fqdn(true);
    Ok(name.to_lowercase())
}

/// A zone ready to answer from.
#[derive(Debug)]
pub(crate) struct CompiledZone {
    apex: LowerName,
    soa: RR,
    names: HashMap<LowerName, Vec<RR>>,
    /// Names between a record's owner and the apex that own no record themselves.
    nonterminals: HashSet<LowerName>,
}

/// The result of looking a question up in a zone.
#[derive(Debug, PartialEq)]
pub(crate) struct Lookup {
    pub rcode: ResponseCode,
    pub answers: Vec<RR>,
    /// The zone's SOA, for the authority section of negative answers.
    pub soa: Option<RR>,
}

impl CompiledZone {
    pub(crate) fn compile(zone: &Zone, serial: u32) -> Result<Self, ZoneError> {
        let apex_name = parse_fqdn(zone.apex.trim(), &zone.apex)?;
        let invalid = |message: String| ZoneError::Invalid {
            zone: apex_name.to_string(),
            message,
        };
        if apex_name.is_root() {
            return Err(invalid("the apex must not be the root".into()));
        }
        let apex = LowerName::new(&apex_name);
        let soa = synthetic_soa(&apex_name, serial);
        let mut names: HashMap<LowerName, Vec<RR>> = HashMap::new();
        names.insert(apex.clone(), vec![soa.clone()]);
        let zone_name = apex_name.to_string();
        for r in &zone.records {
            let owner = parse_fqdn(r.name.trim(), &zone_name)?;
            let lower = LowerName::new(&owner);
            if !apex.zone_of(&lower) {
                return Err(invalid(format!("{owner} is not under the apex")));
            }
            let rdata = match &r.data {
                RecordData::A(a) => RData::A(A(*a)),
                RecordData::Aaaa(a) => RData::AAAA(AAAA(*a)),
                RecordData::Cname(target) => {
                    RData::CNAME(CNAME(parse_fqdn(target.trim(), &zone_name)?))
                }
                RecordData::Txt(strings) => {
                    if strings.iter().any(|s| s.len() > 255) {
                        return Err(invalid(format!(
                            "a TXT string of {owner} is longer than 255 bytes"
                        )));
                    }
                    RData::TXT(TXT::new(strings.clone()))
                }
            };
            let rr = RR::from_rdata(owner.clone(), r.ttl, rdata);
            let set = names.entry(lower).or_default();
            let cname = rr.record_type() == RecordType::CNAME;
            if set
                .iter()
                .any(|x| cname || x.record_type() == RecordType::CNAME)
            {
                return Err(invalid(format!(
                    "{owner} has a CNAME and other records (or a second CNAME)"
                )));
            }
            if !set.contains(&rr) {
                set.push(rr);
            }
        }
        let mut nonterminals = HashSet::new();
        for name in names.keys() {
            let mut n = name.base_name();
            while n != apex && apex.zone_of(&n) {
                if !names.contains_key(&n) {
                    nonterminals.insert(n.clone());
                }
                n = n.base_name();
            }
        }
        Ok(CompiledZone {
            apex,
            soa,
            names,
            nonterminals,
        })
    }

    pub(crate) fn apex(&self) -> &LowerName {
        &self.apex
    }

    /// Answers `qname`/`qtype`; `qname` must be under the apex.
    pub(crate) fn lookup(&self, qname: &LowerName, qtype: RecordType) -> Lookup {
        let mut answers: Vec<RR> = Vec::new();
        let mut name = qname.clone();
        let mut seen = HashSet::new();
        let negative = |rcode, answers| Lookup {
            rcode,
            answers,
            soa: Some(self.soa.clone()),
        };
        for _ in 0..=MAX_CNAME_CHAIN {
            if !self.apex.zone_of(&name) || !seen.insert(name.clone()) {
                // The chain left the zone (or loops): the client continues from here.
                break;
            }
            let Some(rrs) = self.names.get(&name) else {
                let rcode = if self.nonterminals.contains(&name) {
                    ResponseCode::NoError
                } else {
                    ResponseCode::NXDomain
                };
                return negative(rcode, answers);
            };
            let matching = rrs
                .iter()
                .filter(|r| qtype == RecordType::ANY || r.record_type() == qtype);
            let before = answers.len();
            answers.extend(matching.cloned());
            if answers.len() > before {
                break;
            }
            let Some(cname) = rrs.iter().find(|r| r.record_type() == RecordType::CNAME) else {
                return negative(ResponseCode::NoError, answers);
            };
            answers.push(cname.clone());
            let RData::CNAME(target) = &cname.data else {
                break;
            };
            name = LowerName::new(&target.0);
        }
        Lookup {
            rcode: ResponseCode::NoError,
            answers,
            soa: None,
        }
    }
}

/// The SOA every zone (and the suffix) carries at its apex: the apex is its own primary name
/// server, `hostmaster.<apex>` its contact.
pub(crate) fn synthetic_soa(apex: &Name, serial: u32) -> RR {
    let rname = Name::from_ascii("hostmaster")
        .and_then(|h| h.append_domain(apex))
        .unwrap_or_else(|_| apex.clone());
    RR::from_rdata(
        apex.clone(),
        NEGATIVE_TTL,
        RData::SOA(SOA::new(
            apex.clone(),
            rname,
            serial,
            3600,
            600,
            86400,
            NEGATIVE_TTL,
        )),
    )
}

/// Which endpoint slots belong to which cloud, and each cloud's zone. Cheap to clone; every
/// clone is the same view.
#[derive(Clone)]
pub struct DnsView {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for DnsView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DnsView").finish_non_exhaustive()
    }
}

struct Inner {
    forward: ForwardPolicy,
    serial: AtomicU32,
    state: RwLock<State>,
    /// Where learnt addresses are installed for the dataplane (see [`LearnSink`]).
    sink: RwLock<Option<Arc<dyn LearnSink>>>,
}

/// Where the addresses of allowed names' answers go, before the answer reaches the guest:
/// the dataplane's allow rules (`crate::egress::rules::EgressTables`).
pub trait LearnSink: Send + Sync {
    /// `cloud` asked for `name` (allowed) and got `addresses`, each reachable for the
    /// duration given (its TTL plus [`EGRESS_GRACE`]).
    fn learnt(&self, cloud: CloudId, name: &str, addresses: &[(Ipv4Addr, std::time::Duration)]);
}

#[derive(Default)]
struct State {
    endpoints: HashMap<u32, CloudId>,
    zones: HashMap<CloudId, Arc<CompiledZone>>,
    egress: HashMap<CloudId, Arc<EgressNames>>,
    /// Per cloud: address → when it stops being reachable by name.
    learnt: HashMap<CloudId, HashMap<Ipv4Addr, std::time::Instant>>,
    /// Per cloud: names refused by its policy → (count, last seen, Unix seconds).
    denied: HashMap<CloudId, HashMap<String, (u64, u64)>>,
    /// Per cloud: destinations the dataplane refused ([`DnsView::set_refused`]).
    refused: HashMap<CloudId, Vec<DeniedDestination>>,
    /// Clouds whose refusals changed since [`DnsView::take_denied`].
    denied_changed: HashSet<CloudId>,
}

impl DnsView {
    /// An empty view: every question is refused until endpoints are set.
    pub fn new(forward: ForwardPolicy) -> Self {
        DnsView {
            inner: Arc::new(Inner {
                forward,
                serial: AtomicU32::new(1),
                state: RwLock::new(State::default()),
                sink: RwLock::new(None),
            }),
        }
    }

    /// The endpoint with counter `slot` belongs to `cloud` (call when it is created or found).
    pub fn set_endpoint(&self, slot: u32, cloud: CloudId) {
        self.write().endpoints.insert(slot, cloud);
    }

    /// The slot no longer has an endpoint: questions from it are refused.
    pub fn remove_endpoint(&self, slot: u32) {
        self.write().endpoints.remove(&slot);
    }

    /// Replaces `cloud`'s whole zone. An invalid zone is refused and the previous one stays.
    pub fn set_zone(&self, cloud: CloudId, zone: Zone) -> Result<(), ZoneError> {
        let serial = self.inner.serial.fetch_add(1, Ordering::Relaxed);
        let compiled = Arc::new(CompiledZone::compile(&zone, serial)?);
        self.write().zones.insert(cloud, compiled);
        Ok(())
    }

    /// Drops `cloud`'s zone: its names become NXDOMAIN (they are under the suffix).
    pub fn remove_zone(&self, cloud: CloudId) {
        self.write().zones.remove(&cloud);
    }

    /// Sets what `cloud`'s egress policy says about names. Addresses learnt under an earlier
    /// policy are forgotten when the cloud no longer learns (not `allowlist`).
    pub fn set_egress(&self, cloud: CloudId, policy: &EgressPolicy) {
        let names = Arc::new(EgressNames::new(policy));
        let mut state = self.write();
        if !names.learns() {
            state.learnt.remove(&cloud);
        }
        state.egress.insert(cloud, names);
    }

    /// Forgets `cloud`'s egress policy, what it learnt and what it was refused.
    pub fn remove_egress(&self, cloud: CloudId) {
        let mut state = self.write();
        state.egress.remove(&cloud);
        state.learnt.remove(&cloud);
        state.denied.remove(&cloud);
        state.refused.remove(&cloud);
        state.denied_changed.remove(&cloud);
    }

    /// Counts a question of `cloud` for `name` that its policy refused, at `unix_secs`. A
    /// cloud keeps the [`MAX_DENIED_PER_HOST`] most recent names.
    pub fn deny(&self, cloud: CloudId, name: &str, unix_secs: u64) {
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        let mut state = self.write();
        let log = state.denied.entry(cloud).or_default();
        let e = log.entry(name).or_insert((0, 0));
        e.0 += 1;
        e.1 = e.1.max(unix_secs);
        if log.len() > MAX_DENIED_PER_HOST {
            if let Some(oldest) = log
                .iter()
                .min_by_key(|(_, (_, t))| *t)
                .map(|(n, _)| n.clone())
            {
                log.remove(&oldest);
            }
        }
        state.denied_changed.insert(cloud);
    }

    /// The complete refusal lists of the clouds whose refusals changed since the last call.
    /// The destinations the dataplane refused for `cloud` (complete, as the kernel counts
    /// them); reported with the refused names when they changed.
    pub fn set_refused(&self, cloud: CloudId, mut entries: Vec<DeniedDestination>) {
        entries.sort_by(|a, b| {
            b.last_seen
                .cmp(&a.last_seen)
                .then(a.address.cmp(&b.address))
        });
        entries.truncate(MAX_DENIED_PER_HOST);
        let mut state = self.write();
        let known = state.refused.get(&cloud).map(|e| e == &entries);
        if known == Some(true) || (known.is_none() && entries.is_empty()) {
            return;
        }
        state.refused.insert(cloud, entries);
        state.denied_changed.insert(cloud);
    }

    pub fn take_denied(&self) -> Vec<DeniedReport> {
        let mut state = self.write();
        let changed: Vec<CloudId> = state.denied_changed.drain().collect();
        let mut out: Vec<DeniedReport> = changed
            .into_iter()
            .map(|cloud| {
                let mut entries: Vec<DeniedDestination> = state
                    .denied
                    .get(&cloud)
                    .into_iter()
                    .flatten()
                    .map(|(name, (count, last_seen))| DeniedDestination {
                        name: Some(name.clone()),
                        address: None,
                        port: None,
                        protocol: None,
                        reason: DenyReason::NameNotAllowed,
                        count: *count,
                        last_seen: *last_seen,
                        host: String::new(),
                    })
                    .collect();
                entries.extend(state.refused.get(&cloud).into_iter().flatten().cloned());
                entries.sort_by(|a, b| {
                    b.last_seen
                        .cmp(&a.last_seen)
                        .then(a.name.cmp(&b.name))
                        .then(a.address.cmp(&b.address))
                });
                entries.truncate(MAX_DENIED_PER_HOST);
                DeniedReport { cloud, entries }
            })
            .collect();
        out.sort_by_key(|r| r.cloud);
        out
    }

    /// `cloud`'s egress policy as far as names go, if this host knows it.
    pub fn egress_of(&self, cloud: CloudId) -> Option<Arc<EgressNames>> {
        self.read().egress.get(&cloud).cloned()
    }

    /// Installs learnt addresses through `sink` from now on.
    pub fn set_learn_sink(&self, sink: Arc<dyn LearnSink>) {
        *self.inner.sink.write().unwrap_or_else(|p| p.into_inner()) = Some(sink);
    }

    /// Learns `addresses` (with their records' TTLs, seconds), the answer to `name`, for
    /// `cloud`: reachable until the TTL plus [`EGRESS_GRACE`] from `now`, a later answer
    /// extending it. Drops expired ones, then the soonest to expire beyond
    /// [`MAX_LEARNT_PER_CLOUD`]. The learn sink, if any, gets them before this returns.
    pub fn learn(
        &self,
        cloud: CloudId,
        name: &str,
        addresses: &[(Ipv4Addr, u32)],
        now: std::time::Instant,
    ) {
        let sink = self
            .inner
            .sink
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if let Some(sink) = sink {
            let reachable: Vec<(Ipv4Addr, std::time::Duration)> = addresses
                .iter()
                .map(|(ip, ttl)| {
                    (
                        *ip,
                        std::time::Duration::from_secs(u64::from(*ttl)) + EGRESS_GRACE,
                    )
                })
                .collect();
            sink.learnt(cloud, name, &reachable);
        }
        let mut state = self.write();
        let learnt = state.learnt.entry(cloud).or_default();
        for &(ip, ttl) in addresses {
            let until = now + std::time::Duration::from_secs(u64::from(ttl)) + EGRESS_GRACE;
            let e = learnt.entry(ip).or_insert(until);
            *e = (*e).max(until);
        }
        learnt.retain(|_, until| *until > now);
        if learnt.len() > MAX_LEARNT_PER_CLOUD {
            let mut by_expiry: Vec<(std::time::Instant, Ipv4Addr)> =
                learnt.iter().map(|(ip, t)| (*t, *ip)).collect();
            by_expiry.sort();
            for (_, ip) in &by_expiry[..by_expiry.len() - MAX_LEARNT_PER_CLOUD] {
                learnt.remove(ip);
            }
        }
    }

    /// The addresses `cloud` may reach by name at `now`, with how long each stays so.
    pub fn learnt(
        &self,
        cloud: CloudId,
        now: std::time::Instant,
    ) -> Vec<(Ipv4Addr, std::time::Duration)> {
        let state = self.read();
        let mut out: Vec<_> = state
            .learnt
            .get(&cloud)
            .into_iter()
            .flatten()
            .filter(|(_, until)| **until > now)
            .map(|(ip, until)| (*ip, *until - now))
            .collect();
        out.sort();
        out
    }

    pub fn forward_policy(&self) -> &ForwardPolicy {
        &self.inner.forward
    }

    /// The cloud of `slot`, if an endpoint holds it.
    pub fn cloud_of(&self, slot: u32) -> Option<CloudId> {
        self.read().endpoints.get(&slot).copied()
    }

    /// The cloud of `slot` and that cloud's zone, if any.
    pub(crate) fn lookup_slot(&self, slot: u32) -> Option<(CloudId, Option<Arc<CompiledZone>>)> {
        let state = self.read();
        let cloud = *state.endpoints.get(&slot)?;
        Some((cloud, state.zones.get(&cloud).cloned()))
    }

    // A panic while holding the lock cannot leave the maps half-updated (each update is one
    // insert or remove), so a poisoned lock is still consistent.
    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.inner
            .state
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        self.inner
            .state
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Refused names are counted per cloud, bounded (the least recent go), and reported once
    /// per change, complete.
    #[test]
    fn refusals_are_counted_bounded_and_taken_once() {
        let view = DnsView::new(ForwardPolicy::Refuse);
        let (a, b) = (CloudId::new(1).unwrap(), CloudId::new(2).unwrap());
        assert!(view.take_denied().is_empty());
        view.deny(a, "Evil.Example.", 10);
        view.deny(a, "evil.example", 20);
        view.deny(a, "other.example", 15);
        let taken = view.take_denied();
        assert_eq!(taken.len(), 1);
        let names: Vec<(Option<&str>, u64, u64)> = taken[0]
            .entries
            .iter()
            .map(|e| (e.name.as_deref(), e.count, e.last_seen))
            .collect();
        assert_eq!(
            (taken[0].cloud, names),
            (
                a,
                vec![
                    (Some("evil.example"), 2, 20),
                    (Some("other.example"), 1, 15)
                ]
            )
        );
        assert!(view.take_denied().is_empty(), "nothing changed since");
        for i in 0..MAX_DENIED_PER_HOST as u64 + 5 {
            view.deny(b, &format!("n{i}.example"), 100 + i);
        }
        let taken = view.take_denied();
        assert_eq!(taken[0].entries.len(), MAX_DENIED_PER_HOST);
        assert!(
            !taken[0]
                .entries
                .iter()
                .any(|e| e.name.as_deref() == Some("n0.example")),
            "the least recent went"
        );
        view.remove_egress(b);
        view.deny(a, "evil.example", 30);
        assert_eq!(
            view.take_denied()
                .iter()
                .map(|r| r.cloud)
                .collect::<Vec<_>>(),
            vec![a]
        );
    }

    /// Learnt addresses last their TTL plus the grace, a later answer extends them, expired
    /// ones go, a cloud keeps at most its bound (the soonest to expire go first), and leaving
    /// `allowlist` forgets them.
    #[test]
    fn refused_destinations_join_the_refused_names_most_recent_first() {
        let view = DnsView::new(ForwardPolicy::Refuse);
        let c = CloudId::new(1).unwrap();
        view.deny(c, "evil.example.", 100);
        let packet = |ip: [u8; 4], last_seen: u64| DeniedDestination {
            name: None,
            address: Some(Ipv4Addr::from(ip)),
            port: Some(443),
            protocol: Some(atoll_api::model::Protocol::Tcp),
            reason: DenyReason::AddressNotAllowed,
            count: 3,
            last_seen,
            host: String::new(),
        };
        view.set_refused(
            c,
            vec![packet([192, 0, 2, 1], 50), packet([192, 0, 2, 2], 150)],
        );
        let r = view.take_denied();
        assert_eq!(r.len(), 1);
        let order: Vec<(Option<&str>, Option<Ipv4Addr>)> = r[0]
            .entries
            .iter()
            .map(|e| (e.name.as_deref(), e.address))
            .collect();
        assert_eq!(
            order,
            vec![
                (None, Some(Ipv4Addr::new(192, 0, 2, 2))),
                (Some("evil.example"), None),
                (None, Some(Ipv4Addr::new(192, 0, 2, 1))),
            ]
        );
        // The same list again changes nothing; an empty list for a cloud never seen neither.
        view.set_refused(
            c,
            vec![packet([192, 0, 2, 2], 150), packet([192, 0, 2, 1], 50)],
        );
        view.set_refused(CloudId::new(2).unwrap(), Vec::new());
        assert!(view.take_denied().is_empty());
        // Bounded per cloud.
        let many = (0..200u8)
            .map(|i| packet([198, 51, 100, i], u64::from(i)))
            .collect();
        view.set_refused(c, many);
        assert_eq!(view.take_denied()[0].entries.len(), MAX_DENIED_PER_HOST);
    }

    #[test]
    fn learnt_addresses_expire_and_are_bounded() {
        use std::time::{Duration, Instant};
        let view = DnsView::new(ForwardPolicy::Refuse);
        let c = CloudId::new(1).unwrap();
        let list: EgressPolicy = serde_json::from_value(
            serde_json::json!({"mode": "allowlist", "allow": [{"domain": "a.example"}]}),
        )
        .unwrap();
        view.set_egress(c, &list);
        let t0 = Instant::now();
        let ip = |n: u32| Ipv4Addr::from(0xc612_0000 + n);
        view.learn(c, "x.example", &[(ip(1), 30), (ip(2), 300)], t0);
        assert_eq!(
            view.learnt(c, t0),
            vec![
                (ip(1), Duration::from_secs(30) + EGRESS_GRACE),
                (ip(2), Duration::from_secs(300) + EGRESS_GRACE)
            ]
        );
        // A later, shorter answer does not shorten; a longer one extends.
        view.learn(c, "x.example", &[(ip(2), 1)], t0 + Duration::from_secs(10));
        view.learn(
            c,
            "x.example",
            &[(ip(1), 100)],
            t0 + Duration::from_secs(10),
        );
        let at = t0 + Duration::from_secs(100);
        assert_eq!(
            view.learnt(c, at),
            vec![
                (ip(1), Duration::from_secs(10 + 100 - 100) + EGRESS_GRACE),
                (ip(2), Duration::from_secs(300 - 100) + EGRESS_GRACE)
            ]
        );
        // Past TTL + grace: gone.
        let late = t0 + Duration::from_secs(10 + 100) + EGRESS_GRACE;
        assert_eq!(view.learnt(c, late).len(), 1);
        // The bound: the soonest to expire are dropped.
        let many: Vec<(Ipv4Addr, u32)> = (0..MAX_LEARNT_PER_CLOUD as u32 + 10)
            .map(|n| (ip(1000 + n), 1000 + n))
            .collect();
        view.learn(c, "x.example", &many, t0);
        let kept = view.learnt(c, t0);
        assert_eq!(kept.len(), MAX_LEARNT_PER_CLOUD);
        assert!(
            !kept.iter().any(|(a, _)| *a == ip(1)),
            "the soonest went first"
        );
        // Leaving allowlist forgets them.
        view.set_egress(c, &EgressPolicy::deny_all());
        assert!(view.learnt(c, t0).is_empty());
    }

    fn zone() -> Zone {
        let rec = |name: &str, data| Record {
            name: name.into(),
            ttl: 60,
            data,
        };
        Zone {
            apex: "Prod.Atoll.Internal".into(),
            records: vec![
                rec(
                    "web.prod.atoll.internal.",
                    RecordData::A(Ipv4Addr::new(10, 0, 0, 2)),
                ),
                rec(
                    "web.prod.atoll.internal.",
                    RecordData::Aaaa("fd00::2".parse().unwrap()),
                ),
                rec(
                    "www.prod.atoll.internal",
                    RecordData::Cname("WEB.prod.atoll.internal.".into()),
                ),
                rec(
                    "ext.prod.atoll.internal.",
                    RecordData::Cname("example.com.".into()),
                ),
                rec(
                    "loop1.prod.atoll.internal.",
                    RecordData::Cname("loop2.prod.atoll.internal.".into()),
                ),
                rec(
                    "loop2.prod.atoll.internal.",
                    RecordData::Cname("loop1.prod.atoll.internal.".into()),
                ),
                rec(
                    "dangling.prod.atoll.internal.",
                    RecordData::Cname("gone.prod.atoll.internal.".into()),
                ),
                rec(
                    "a.b.c.prod.atoll.internal.",
                    RecordData::Txt(vec!["hello".into(), "world".into()]),
                ),
            ],
        }
    }

    fn lower(s: &str) -> LowerName {
        LowerName::new(&Name::from_ascii(s).unwrap())
    }

    fn types(l: &Lookup) -> Vec<RecordType> {
        l.answers.iter().map(|r| r.record_type()).collect()
    }

    #[test]
    fn records_cnames_nodata_and_nxdomain() {
        let z = CompiledZone::compile(&zone(), 7).unwrap();
        assert_eq!(z.apex(), &lower("prod.atoll.internal."));
        let l = z.lookup(&lower("WEB.prod.atoll.internal."), RecordType::A);
        assert_eq!(
            (l.rcode, types(&l), l.soa),
            (ResponseCode::NoError, vec![RecordType::A], None)
        );
        let l = z.lookup(&lower("web.prod.atoll.internal."), RecordType::ANY);
        assert_eq!(types(&l), vec![RecordType::A, RecordType::AAAA]);
        let l = z.lookup(&lower("www.prod.atoll.internal."), RecordType::AAAA);
        assert_eq!(types(&l), vec![RecordType::CNAME, RecordType::AAAA]);
        let l = z.lookup(&lower("www.prod.atoll.internal."), RecordType::CNAME);
        assert_eq!(types(&l), vec![RecordType::CNAME]);
        let l = z.lookup(&lower("ext.prod.atoll.internal."), RecordType::A);
        assert_eq!(
            (l.rcode, types(&l)),
            (ResponseCode::NoError, vec![RecordType::CNAME])
        );
        let l = z.lookup(&lower("loop1.prod.atoll.internal."), RecordType::A);
        assert_eq!(types(&l), vec![RecordType::CNAME, RecordType::CNAME]);
        // A chain ending at a missing name is NXDOMAIN for its last name (RFC 6604).
        let l = z.lookup(&lower("dangling.prod.atoll.internal."), RecordType::A);
        assert_eq!(
            (l.rcode, types(&l)),
            (ResponseCode::NXDomain, vec![RecordType::CNAME])
        );
        // NODATA: the name exists with other types; empty non-terminals exist.
        for (name, ty) in [
            ("web.prod.atoll.internal.", RecordType::TXT),
            ("b.c.prod.atoll.internal.", RecordType::A),
            ("c.prod.atoll.internal.", RecordType::A),
            ("prod.atoll.internal.", RecordType::A),
        ] {
            let l = z.lookup(&lower(name), ty);
            assert_eq!(
                (l.rcode, l.answers.len()),
                (ResponseCode::NoError, 0),
                "{name}"
            );
            assert_eq!(
                l.soa.as_ref().map(|s| s.record_type()),
                Some(RecordType::SOA)
            );
        }
        for name in ["nope.prod.atoll.internal.", "x.a.b.c.prod.atoll.internal."] {
            let l = z.lookup(&lower(name), RecordType::A);
            assert_eq!(l.rcode, ResponseCode::NXDomain, "{name}");
        }
        let l = z.lookup(&lower("prod.atoll.internal."), RecordType::SOA);
        assert_eq!(types(&l), vec![RecordType::SOA]);
        let RData::SOA(soa) = &l.answers[0].data else {
            panic!("not an SOA")
        };
        assert_eq!((soa.serial, soa.minimum), (7, NEGATIVE_TTL));
    }

    #[test]
    fn invalid_zones_are_refused() {
        let mut bad = Vec::new();
        let mut z = zone();
        z.apex = ".".into();
        bad.push(z);
        let mut z = zone();
        z.records[0].name = "web.dev.atoll.internal.".into();
        bad.push(z);
        let mut z = zone();
        z.records[0].name = "web..prod.atoll.internal.".into();
        bad.push(z);
        let mut z = zone();
        z.records.push(Record {
            name: "www.prod.atoll.internal.".into(),
            ttl: 1,
            data: RecordData::A(Ipv4Addr::LOCALHOST),
        });
        bad.push(z);
        let mut z = zone();
        z.records.push(Record {
            name: "prod.atoll.internal.".into(),
            ttl: 1,
            data: RecordData::Cname("web.prod.atoll.internal.".into()),
        });
        bad.push(z);
        let mut z = zone();
        z.records[0].data = RecordData::Txt(vec!["x".repeat(256)]);
        bad.push(z);
        let mut z = zone();
        z.apex = String::new();
        bad.push(z);
        for z in bad {
            assert!(CompiledZone::compile(&z, 1).is_err(), "{z:?}");
        }
    }

    #[test]
    fn view_updates() {
        let view = DnsView::new(ForwardPolicy::Refuse);
        let c1 = CloudId::new(1).unwrap();
        assert!(view.lookup_slot(3).is_none());
        view.set_endpoint(3, c1);
        let (cloud, compiled) = view.lookup_slot(3).unwrap();
        assert_eq!((cloud, compiled.is_none()), (c1, true));
        view.set_zone(c1, zone()).unwrap();
        assert!(view.lookup_slot(3).unwrap().1.is_some());
        let mut broken = zone();
        broken.apex = ".".into();
        assert!(view.set_zone(c1, broken).is_err());
        assert!(
            view.lookup_slot(3).unwrap().1.is_some(),
            "the old zone stays"
        );
        view.remove_zone(c1);
        assert!(view.lookup_slot(3).unwrap().1.is_none());
        view.remove_endpoint(3);
        assert!(view.lookup_slot(3).is_none());
        assert_eq!(ForwardPolicy::from_upstreams(&[]), ForwardPolicy::Refuse);
    }
}
