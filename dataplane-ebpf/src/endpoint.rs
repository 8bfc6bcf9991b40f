//! Endpoint identity: which cloud, addresses and MACs belong to the device a frame is on.

use atoll_dataplane_common::EndpointInfo;
use aya_ebpf::{macros::map, maps::HashMap};

/// Host-side ifindex → endpoint identity. Written by the agent only. The default size is
/// overridden by the agent at load time from its configuration.
#[map]
pub static ENDPOINTS: HashMap<u32, EndpointInfo> = HashMap::with_max_entries(65536, 0);

#[inline(always)]
pub fn lookup(ifindex: u32) -> Option<EndpointInfo> {
    // SAFETY: the value is copied out immediately; a concurrent agent update can at worst make
    // this copy a mix of old and new fields of the same endpoint, which the agent avoids by
    // never rewriting a live entry in place (delete, then create).
    unsafe { ENDPOINTS.get(&ifindex).copied() }
}
