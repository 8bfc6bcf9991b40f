//! The store's key layout: every key the core reads or writes is built here, so the layout
//! is written once. `clouds/<id>` holds a cloud's record; everything a cloud owns is under
//! `c/<id>/`; what a host applies is under `h/<host>/`; offers to a consumer are under
//! `offers/<consumer>/`, outside the consumer's own keys.

use super::CloudId;

pub fn cloud(c: CloudId) -> String {
    format!("clouds/{c}")
}
pub fn inside(c: CloudId) -> String {
    format!("c/{c}/")
}
pub fn vms(c: CloudId) -> String {
    format!("c/{c}/vms/")
}
pub fn vm(c: CloudId, vm: &str) -> String {
    format!("c/{c}/vms/{vm}")
}
pub fn vm_status(c: CloudId, vm: &str) -> String {
    format!("c/{c}/vmstatus/{vm}")
}
pub fn vm_statuses(c: CloudId) -> String {
    format!("c/{c}/vmstatus/")
}
/// The tail of a VM's console. Like the status key, not a kind that [`super::zone_cloud`]
/// or [`super::service_cloud`] name, so its changes never reach host syncs.
pub fn vm_console(c: CloudId, vm: &str) -> String {
    format!("c/{c}/vmconsole/{vm}")
}
pub fn ips(c: CloudId) -> String {
    format!("c/{c}/ip/")
}
pub fn ip(c: CloudId, ip: std::net::Ipv4Addr) -> String {
    format!("c/{c}/ip/{ip}")
}
pub fn volumes(c: CloudId) -> String {
    format!("c/{c}/volumes/")
}
pub fn volume(c: CloudId, v: &str) -> String {
    format!("c/{c}/volumes/{v}")
}
pub fn records(c: CloudId) -> String {
    format!("c/{c}/dns/")
}
pub fn record(c: CloudId, name: &str, t: &str) -> String {
    format!("c/{c}/dns/{name}/{t}")
}
pub fn exposures(c: CloudId) -> String {
    format!("c/{c}/exposures/")
}
pub fn exposure(c: CloudId, e: &str) -> String {
    format!("c/{c}/exposures/{e}")
}
pub fn grants(c: CloudId, e: &str) -> String {
    format!("c/{c}/grants/{e}/")
}
pub fn all_grants(c: CloudId) -> String {
    format!("c/{c}/grants/")
}
pub fn grant(c: CloudId, e: &str, consumer: CloudId) -> String {
    format!("c/{c}/grants/{e}/{consumer}")
}
/// The global index of grants (`grantidx/<provider>/<consumer>/<exposure>`, value empty),
/// written and deleted with each grant: the feed loads it at start to know which providers'
/// changes concern which consumers' hosts, which the per-cloud grant keys cannot tell without
/// ranging over every cloud.
pub fn grant_index(provider: CloudId, consumer: CloudId, e: &str) -> String {
    format!("grantidx/{provider}/{consumer}/{e}")
}
pub fn grant_indexes() -> &'static str {
    "grantidx/"
}
/// `(provider, consumer, exposure)` of a [`grant_index`] key.
pub fn parse_grant_index(key: &str) -> Option<(CloudId, CloudId, &str)> {
    let rest = key.strip_prefix(grant_indexes())?;
    let (p, rest) = rest.split_once('/')?;
    let (c, e) = rest.split_once('/')?;
    Some((p.parse().ok()?, c.parse().ok()?, e))
}
/// Written once every grant written before the index has its index key.
pub fn grant_index_migrated() -> &'static str {
    "migrations/grantidx"
}
/// A host's failure to install the grant `(provider, consumer, vip)`: under the provider,
/// so deleting the provider removes it, and of no kind that reaches host syncs.
pub fn service_failure(provider: CloudId, consumer: CloudId, vip: std::net::Ipv4Addr) -> String {
    format!("c/{provider}/svcstatus/{consumer}/{vip}")
}
pub fn service_failures(provider: CloudId) -> String {
    format!("c/{provider}/svcstatus/")
}
pub fn imports(c: CloudId) -> String {
    format!("c/{c}/imports/")
}
pub fn import(consumer: CloudId, provider: CloudId, e: &str) -> String {
    format!("c/{consumer}/imports/{provider}/{e}")
}
/// The provider's record of a pending offer.
pub fn offer(c: CloudId, e: &str, consumer: CloudId) -> String {
    format!("c/{c}/offers/{e}/{consumer}")
}
pub fn offers(c: CloudId, e: &str) -> String {
    format!("c/{c}/offers/{e}/")
}
pub fn all_offers(c: CloudId) -> String {
    format!("c/{c}/offers/")
}
/// The consumer's copy of a pending offer: outside the consumer's own keys (`c/<cloud>/`),
/// so that an offer writes nothing into a cloud, and the same whether the cloud exists.
pub fn inbox_entry(consumer: CloudId, provider: CloudId, e: &str) -> String {
    format!("offers/{consumer}/{provider}/{e}")
}
pub fn inbox(consumer: CloudId) -> String {
    format!("offers/{consumer}/")
}
pub fn inbox_from(consumer: CloudId, provider: CloudId) -> String {
    format!("offers/{consumer}/{provider}/")
}
/// The cloud's [`super::OfferPolicy`]; no trailing kind, so no zone or service depends on it.
pub fn offer_policy(c: CloudId) -> String {
    format!("c/{c}/offerpolicy")
}
/// The cloud's [`super::EgressPolicy`].
pub fn egress_policy(c: CloudId) -> String {
    format!("c/{c}/egress")
}
/// What `host` last reported the cloud was refused (not a kind hosts sync).
pub fn denied(c: CloudId, host: &str) -> String {
    format!("c/{c}/denied/{host}")
}
pub fn all_denied(c: CloudId) -> String {
    format!("c/{c}/denied/")
}
/// The cloud's own [`super::EgressAddress`].
pub fn egress_address(c: CloudId) -> String {
    format!("c/{c}/egressaddr")
}
/// Which cloud holds overlay network id `vni` (so no two live clouds hold it).
pub fn vni_holder(vni: u32) -> String {
    format!("vni/{vni}")
}

/// Which cloud holds pool address `ip` (so no two clouds hold it).
pub fn egress_address_holder(ip: std::net::Ipv4Addr) -> String {
    format!("egressaddr/{ip}")
}
pub fn publications(c: CloudId) -> String {
    format!("c/{c}/pub/")
}
pub fn publication(c: CloudId, name: &str) -> String {
    format!("c/{c}/pub/{name}")
}
/// The holder of a public address, protocol and port: one publication each.
pub fn published_port(ip: std::net::Ipv4Addr, protocol: &str, port: u16) -> String {
    format!("pubport/{ip}/{protocol}/{port}")
}
pub fn published_ports() -> &'static str {
    "pubport/"
}
pub fn egress_address_holders() -> &'static str {
    "egressaddr/"
}
/// The expiry index: one key per cloud that expires, `expiry/<time, 20 digits>/<cloud>`, so
/// a range read from the start lists the clouds due first (see `super::expiry`).
pub fn expiries() -> &'static str {
    "expiry/"
}
pub fn expiry(at: u64, c: CloudId) -> String {
    format!("expiry/{at:020}/{c}")
}
/// The time and cloud of an expiry index key.
pub fn parse_expiry(key: &str) -> Option<(u64, CloudId)> {
    let (at, c) = key.strip_prefix("expiry/")?.split_once('/')?;
    if at.len() != 20 {
        return None;
    }
    Some((at.parse().ok()?, c.parse().ok()?))
}

pub fn hosts() -> &'static str {
    "hosts/"
}
pub fn host(h: &str) -> String {
    format!("hosts/{h}")
}
/// Host `h`'s underlay address, kept apart from its record (which every heartbeat rewrites)
/// so that only a change of the address reaches the hosts sharing a cloud with it.
pub fn underlay(h: &str) -> String {
    format!("underlays/{h}")
}
pub fn underlays() -> &'static str {
    "underlays/"
}
/// Until when (seconds since the epoch) host `h` may deliver usage of deleted cloud `c`.
pub fn usage_grace(c: CloudId, h: &str) -> String {
    format!("usagegrace/{c}/{h}")
}
/// Where control planes reach host `h`'s guest agents (with the secret they present): apart
/// from the host record, which the API returns and hosts' feeds read.
pub fn guest_access(h: &str) -> String {
    format!("guestaccess/{h}")
}
pub fn host_all(h: &str) -> String {
    format!("h/{h}/")
}
pub fn placement(h: &str, c: CloudId, vm: &str) -> String {
    format!("h/{h}/vms/{c}/{vm}")
}
pub fn placements_of(h: &str, c: CloudId) -> String {
    format!("h/{h}/vms/{c}/")
}
pub fn volume_placement(h: &str, c: CloudId, v: &str) -> String {
    format!("h/{h}/volumes/{c}/{v}")
}
pub fn volume_placements_of(h: &str, c: CloudId) -> String {
    format!("h/{h}/volumes/{c}/")
}
