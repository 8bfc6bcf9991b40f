//! Endpoint identity: which cloud, addresses and MACs belong to the device a frame is on.

use atoll_dataplane_common::EndpointInfo;
use aya_ebpf::{macros::map, maps::HashMap};

/// Host-side ifindex → endpoint identity. Written by the agent only. The default size is
/// overridden by the agent at load time from its configuration.
#[map]
pub static ENDPOINTS: HashMap<u32, EndpointInfo> = HashMap::with_max_entries(65536, 0);

/// The endpoint's identity, read in place (no copy to the stack).
#[inline(always)]
pub fn lookup(ifindex: u32) -> Option<&'static EndpointInfo> {
    // SAFETY: the value stays valid for the whole program run (RCU); the agent never rewrites a
    // live entry in place (delete, then create), so the fields read are never half-updated.
    unsafe { ENDPOINTS.get(ifindex) }
}
