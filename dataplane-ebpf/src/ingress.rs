//! Public ingress: a VM port published at an address and port on the host's uplink.
//!
//! This module owns the maps and answers two questions; the translation itself is the
//! `egress` module's (the same rewrite and the same way out), which calls in here:
//! - [`published`]: what a packet arriving on the uplink for `(address, port, protocol)`
//!   leads to, if its source may connect (`allow_from`, an LPM trie keyed by the
//!   publication's serial);
//! - [`reply`]: whether a guest's packet belongs to a connection to one of its published
//!   ports (`INGRESS_FLOWS`, recorded by `from_uplink` as connections arrive) that is still
//!   published. A guest's reply to a connection it accepted is not egress: the cloud's policy
//!   does not apply to it (its limits do).
//!
//! Decisions:
//! - **Unpublishing cuts live flows** as a revoked grant does: a flow records the serial of
//!   the publication it came in under; a guest's packet of a flow whose publication is gone
//!   or has another serial is dropped (`ingress_revoked`) and the flow forgotten. Packets
//!   arriving for an unpublished address and port are no longer translated: they pass to
//!   the host, which does not own the address.
//! - **Flows expire by LRU eviction** (`dataplane.max_flows`), like every flow table: a
//!   connection silent while the table churns loses its entry, and the guest's next reply
//!   meets the egress policy instead (the client's next packet records it again).

use atoll_dataplane_common::{
    DropReason, FlowKey, IngressAllowKey, IngressFlow, IngressKey, IngressTarget,
};
use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    macros::map,
    maps::{lpm_trie::Key, HashMap, LpmTrie, LruHashMap},
};

/// `(public address, port, protocol)` → the VM port. Not preallocated: entries are replaced
/// whole by the agent.
#[map]
pub static INGRESS: HashMap<IngressKey, IngressTarget> =
    HashMap::with_max_entries(65536, BPF_F_NO_PREALLOC);

/// `(serial, source prefix)` → 1: the sources a restricted publication accepts.
#[map]
pub static INGRESS_ALLOW: LpmTrie<IngressAllowKey, u8> = LpmTrie::with_max_entries(65536, 0);

/// The guest's view of a connection to a published port → its public side. Sized by the
/// agent (`dataplane.max_flows`).
#[map]
pub static INGRESS_FLOWS: LruHashMap<FlowKey, IngressFlow> =
    LruHashMap::with_max_entries(131072, 0);

const BPF_ANY: u64 = 0;

/// The VM port `(daddr, dport, protocol)` is published for, if any; `Err` if `saddr` may not
/// connect to it. Ports as read natively.
#[inline(always)]
pub fn published(
    daddr: u32,
    dport: u16,
    protocol: u8,
    saddr: u32,
) -> Result<Option<IngressTarget>, DropReason> {
    let key = IngressKey {
        ipv4: daddr,
        port: dport,
        protocol,
        _pad: 0,
    };
    // SAFETY: the value is copied out at once; entries are replaced whole.
    let Some(target) = (unsafe { INGRESS.get(key) }).copied() else {
        return Ok(None);
    };
    if target.restricted != 0
        && INGRESS_ALLOW
            .get(Key::new(
                64,
                IngressAllowKey {
                    serial: target.serial,
                    ipv4: saddr,
                },
            ))
            .is_none()
    {
        return Err(DropReason::IngressNotAllowed);
    }
    Ok(Some(target))
}

/// Records the connection `key` (the guest's view) as coming in through `flow`.
#[inline(always)]
pub fn record(key: &FlowKey, flow: IngressFlow) {
    // SAFETY: the value is only compared.
    if unsafe { INGRESS_FLOWS.get(key) }.is_some_and(|f| *f == flow) {
        return;
    }
    let _ = INGRESS_FLOWS.insert(key, flow, BPF_ANY);
}

/// The public side of the guest's connection `key`, if it is one to a port still published;
/// `Err` (and the flow forgotten) if it was unpublished.
#[inline(always)]
pub fn reply(key: &FlowKey) -> Result<Option<IngressFlow>, DropReason> {
    // SAFETY: the value is copied out at once.
    let Some(flow) = (unsafe { INGRESS_FLOWS.get(key) }).copied() else {
        return Ok(None);
    };
    let public = IngressKey {
        ipv4: flow.public_ipv4,
        port: flow.public_port,
        protocol: key.protocol,
        _pad: 0,
    };
    // SAFETY: only read.
    let live = unsafe { INGRESS.get(public) }.is_some_and(|t| t.serial == flow.serial);
    if !live {
        let _ = INGRESS_FLOWS.remove(key);
        return Err(DropReason::IngressRevoked);
    }
    Ok(Some(flow))
}
