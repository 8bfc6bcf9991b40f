//! Helpers shared by the end-to-end tests (`isolation`, `metering`): their names and
//! addresses, creating tap and veth guests (the guests themselves, the bounded waits and the
//! frames are the testbed's), and the leftover check.
//!
//! Each test binary uses a different subset of it and of its re-exports, hence the `allow`.
#![allow(dead_code, unused_imports)]

use std::net::Ipv4Addr;

use atoll_agent::{
    endpoint::{DeviceSpec, Endpoint, EndpointSpec, Host},
    types::{CloudId, MacAddr},
};
use atoll_testbed::{guest::veth_guest, unique_name, LinkGuard};
pub use atoll_testbed::{
    guest::{in_netns, join, spawn_in_netns, GuestUdp, Sniffer, TapGuest, VethGuest, TAP_TTL},
    wait::{assert_silent, remaining, wait_for, wait_readable, Sink, ARRIVE, SILENCE},
};
use frame::Mac;

/// Every cloud's gateway address in the tests.
pub const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
/// Default TTL of the veth guests' kernels.
pub const KERNEL_TTL: u8 = 64;

/// The `testbed::unique_name` tags of one test: its names are recognisable (and checked for
/// leftovers) by these.
pub struct Tags {
    pub tap: &'static str,
    pub veth: &'static str,
    pub netns: &'static str,
    pub pins: &'static str,
}

impl Tags {
    pub fn all(&self) -> [&'static str; 4] {
        [self.tap, self.veth, self.netns, self.pins]
    }
}

pub fn cloud_id(n: u32) -> CloudId {
    CloudId::new(n).expect("non-zero")
}

pub fn guest_mac(cloud: u32, ip: Ipv4Addr) -> MacAddr {
    MacAddr::local(0x00c1_0000 | cloud << 8 | u32::from(ip.octets()[3]))
}

/// Creates a tap endpoint (gateway [`GATEWAY`]) and attaches the test to it as its guest.
pub fn create_tap(
    rt: &tokio::runtime::Runtime,
    host: &mut Host,
    links: &mut Vec<LinkGuard>,
    tags: &Tags,
    cloud: u32,
    ip: Ipv4Addr,
    gw_mac: Mac,
) -> (Endpoint, TapGuest) {
    let name = unique_name(tags.tap);
    links.push(LinkGuard(name.clone()));
    let mac = guest_mac(cloud, ip);
    let spec = EndpointSpec {
        name: name.clone(),
        cloud: cloud_id(cloud),
        ipv4: ip,
        mac,
        gateway: GATEWAY,
        device: DeviceSpec::Tap { owner_uid: None },
    };
    let ep = rt
        .block_on(host.create_endpoint(&spec))
        .unwrap_or_else(|e| panic!("creating tap endpoint {name}: {e} ({e:?})"));
    let tap = TapGuest::attach(&format!("cloud {cloud} tap {ip}"), &name, mac.0, ip, gw_mac);
    (ep, tap)
}

/// Creates a veth endpoint whose peer `eth0` is a configured guest (`ip`/24, default route via
/// [`GATEWAY`]) in a new namespace.
pub fn create_veth(
    rt: &tokio::runtime::Runtime,
    host: &mut Host,
    links: &mut Vec<LinkGuard>,
    tags: &Tags,
    cloud: u32,
    ip: Ipv4Addr,
) -> (Endpoint, VethGuest) {
    let guest = veth_guest(
        rt,
        host,
        (tags.netns, tags.veth),
        cloud_id(cloud),
        ip,
        guest_mac(cloud, ip),
        GATEWAY,
    );
    links.push(LinkGuard(guest.host.clone()));
    (guest.ep.clone(), guest)
}

// ---------------------------------------------------------------------------------------------
// Cleanup check

/// The prefix of every name `unique_name(tag)` gives this process, for each of `tags`.
pub fn prefixes(tags: &Tags) -> Vec<String> {
    tags.all()
        .iter()
        .map(|t| atoll_testbed::unique_prefix(t))
        .collect()
}

/// Prefix of the spare taps this process's `Host` creates.
pub fn pool_prefix() -> String {
    atoll_agent::endpoint::pool_process_prefix()
}

pub use atoll_testbed::host_links;

/// This process's spare taps.
pub fn pool_links() -> Vec<String> {
    let prefix = pool_prefix();
    host_links()
        .into_iter()
        .filter(|n| n.starts_with(&prefix))
        .collect()
}

/// Deletes this process's spare taps on drop (they are persistent and carry no testbed name).
pub struct PoolGuard;

impl Drop for PoolGuard {
    fn drop(&mut self) {
        for name in pool_links() {
            drop(LinkGuard(name));
        }
    }
}

/// Links, namespaces and pins whose names carry this test's prefixes.
/// Runs an end-to-end scenario as root, then fails if anything it created (names with `tags`'
/// prefixes, spare taps, pins) is left behind, also when the scenario panicked.
pub fn run_scenario(name: &str, tags: &Tags, scenario: fn()) {
    atoll_testbed::require_root(&format!("the {name} test"));
    let started = std::time::Instant::now();
    let mut prefixes = prefixes(tags);
    prefixes.push(pool_prefix());
    atoll_testbed::leaves_nothing(&prefixes, scenario);
    println!("{name}: passed in {:.2?}", started.elapsed());
}

pub fn leftovers(tags: &Tags) -> Vec<String> {
    let mut prefixes = prefixes(tags);
    prefixes.push(pool_prefix());
    atoll_testbed::leftovers(&prefixes)
}

// ---------------------------------------------------------------------------------------------
// Frames

/// Building and parsing Ethernet, ARP, IPv4, UDP and ICMP, with checksums.
pub use atoll_testbed::frame::layers as frame;
