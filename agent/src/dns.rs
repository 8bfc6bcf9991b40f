//! The per-host DNS server guests reach at their gateway address, with split horizon keyed by
//! the asking *endpoint*.
//!
//! Path of a query (see docs/design.md, "DNS"):
//! 1. A guest sends DNS (UDP or TCP, port 53) to its gateway address. `from_vm` (eBPF) rewrites
//!    it statelessly to `proxy(slot):port → server:53`, where `proxy(slot)` is the address of
//!    the endpoint's counter slot in `dns.proxy_network`, and redirects it into atoll's DNS
//!    network namespace through a dedicated veth pair ([`DnsPlane`]).
//! 2. The server ([`DnsServer`], hickory-server on the agent's tokio runtime, with sockets
//!    opened inside the DNS namespace) maps the client address back to the slot, the slot to
//!    the endpoint's cloud ([`DnsView`]) and answers from that cloud's zone.
//! 3. The reply leaves the namespace; `from_dns` (eBPF) maps the proxy address back to the
//!    endpoint and rewrites it to `gateway:53 → guest:port`.
//!
//! Answers ([`DnsView`]): names under the asker's own zone apex come from its zone
//! (authoritative; NXDOMAIN / NODATA with a synthetic SOA); names under the global suffix
//! (`dns.suffix`) but outside the asker's apex are NXDOMAIN, whether or not another cloud has
//! them; other names are refused or forwarded to `dns.forward`; an address with no endpoint
//! behind it is refused.
//!
//! Decisions:
//! - **Keyed by endpoint, not address.** Clouds overlap in address space, so the only identity
//!   the server can trust is the one the dataplane puts into the source address: the slot of the
//!   device the query arrived on. A guest cannot choose it (anti-spoofing runs first).
//! - **Own namespace.** Proxy and server addresses exist only in the DNS namespace, so they
//!   collide with nothing on the host and the host stack never sees guests' DNS.
//! - **No state in the dataplane.** The translation is stateless in both directions; the only
//!   state is the view the control plane converges (`set_endpoint`, `set_zone`).
//!
//! Submodules: [`view`] (zones and answers), [`server`] (hickory request handler and
//! forwarder), [`plane`] (namespace, devices, dataplane wiring), [`netns`] (named network
//! namespaces).

pub mod netns;
pub mod plane;
pub mod server;
pub mod view;

pub use plane::{DnsPlane, PlaneError};
pub use server::{DnsServer, ServerError};
pub use view::{DnsView, ForwardPolicy, LearnSink, Record, RecordData, Zone, ZoneError};

/// Parses the configured global suffix (`dns.suffix`) into a lowercase FQDN, refusing the root
/// and malformed names.
pub fn parse_suffix(suffix: &str) -> Result<hickory_proto::rr::Name, ZoneError> {
    view::parse_fqdn(suffix, "the DNS suffix").and_then(|n| {
        if n.is_root() {
            Err(ZoneError::Invalid {
                zone: suffix.into(),
                message: "the suffix must not be the root".into(),
            })
        } else {
            Ok(n)
        }
    })
}
