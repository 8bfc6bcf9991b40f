//! Endpoint identity: which cloud, addresses and MACs belong to the device a frame is on.

use atoll_dataplane_common::{
    EndpointInfo, EndpointSlot, ENDPOINT_CACHE_MASK, ENDPOINT_CACHE_SLOTS,
};
use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap},
};

/// Host-side ifindex → endpoint identity. Written by the agent only. The default size is
/// overridden by the agent at load time from its configuration.
#[map]
pub static ENDPOINTS: HashMap<u32, EndpointInfo> = HashMap::with_max_entries(65536, 0);

/// Direct-mapped cache in front of `ENDPOINTS`: slot `ifindex & MASK` holds the identity of the
/// endpoint with that ifindex if the agent could place it there (a slot held by another live
/// endpoint is left alone and the hash serves). Array lookups are inlined by the verifier, so
/// the common case costs no hashing.
#[map]
pub static ENDPOINT_CACHE: Array<EndpointSlot> = Array::with_max_entries(ENDPOINT_CACHE_SLOTS, 0);

/// The endpoint's identity, read in place (no copy to the stack).
#[inline(always)]
pub fn lookup(ifindex: u32) -> Option<&'static EndpointInfo> {
    if let Some(slot) = ENDPOINT_CACHE.get(ifindex & ENDPOINT_CACHE_MASK) {
        if slot.ifindex == ifindex {
            return Some(&slot.info);
        }
    }
    // SAFETY: the value stays valid for the whole program run (RCU). The agent writes an entry
    // (hash or cache slot) only while the endpoint's device is down or gone, so no program reads
    // a half-written identity.
    unsafe { ENDPOINTS.get(ifindex) }
}

/// The identity of the endpoint on device `ifindex` if `ENDPOINT_CACHE` holds it (no hash
/// fallback: for callers that have another way when it does not).
#[inline(always)]
pub fn cached(ifindex: u32) -> Option<&'static EndpointInfo> {
    ENDPOINT_CACHE
        .get(ifindex & ENDPOINT_CACHE_MASK)
        .filter(|slot| slot.ifindex == ifindex)
        .map(|slot| &slot.info)
}
