//! Guests the tests drive: a veth endpoint whose peer is a real kernel stack in a namespace of
//! its own ([`VethGuest`], one type for every suite), and the child processes run in them
//! ([`ChildGuard`]).

use std::{
    net::Ipv4Addr,
    process::{Child, Command, Stdio},
};

use atoll_agent::{
    endpoint::{DeviceSpec, Endpoint, EndpointSpec, Host},
    types::{CloudId, MacAddr},
};

use crate::{unique_name, NetNs};

/// A veth endpoint and its guest: the peer `eth0` in a namespace of its own, at `ip`/24 with a
/// default route via the gateway.
#[derive(Debug)]
pub struct VethGuest {
    /// What messages call it (`cloud 1 veth 10.0.0.2`).
    pub label: String,
    /// The host-side device's name.
    pub host: String,
    pub ns: NetNs,
    pub mac: MacAddr,
    pub ip: Ipv4Addr,
    /// The endpoint as the agent created it.
    pub ep: Endpoint,
}

/// Creates a veth guest: namespace named with `ns_tag`, host device named with `dev_tag`
/// (see [`unique_name`]).
#[allow(clippy::too_many_arguments)]
pub fn veth_guest(
    rt: &tokio::runtime::Runtime,
    host: &mut Host,
    (ns_tag, dev_tag): (&str, &str),
    cloud: CloudId,
    ip: Ipv4Addr,
    mac: MacAddr,
    gateway: Ipv4Addr,
) -> VethGuest {
    let ns = NetNs::new(&unique_name(ns_tag)).expect("creating the guest's namespace");
    let name = unique_name(dev_tag);
    let spec = EndpointSpec {
        name: name.clone(),
        cloud,
        ipv4: ip,
        mac,
        gateway,
        device: DeviceSpec::Veth {
            peer_name: "eth0".into(),
            netns: ns.path(),
        },
    };
    let ep = rt
        .block_on(host.create_endpoint(&spec))
        .unwrap_or_else(|e| panic!("creating veth endpoint {name}: {e} ({e:?})"));
    ns.configure_guest("eth0", ip, 24, gateway)
        .expect("configuring the guest");
    VethGuest {
        label: format!("cloud {cloud} veth {ip}"),
        host: name,
        ns,
        mac,
        ip,
        ep,
    }
}

impl VethGuest {
    /// Whether one ping from the guest to `dst` is answered within a second.
    pub fn ping(&self, dst: Ipv4Addr) -> bool {
        self.ns
            .succeeds(&["ping", "-c", "1", "-W", "1", "-q", &dst.to_string()])
            .expect("running ping")
    }

    /// Starts `ping -c1` with a payload pattern; the caller answers it.
    pub fn spawn_ping(&self, dst: Ipv4Addr, pattern: &str) -> ChildGuard {
        let child = Command::new("ip")
            .args(["netns", "exec", self.ns.name()])
            .args(["ping", "-c", "1", "-W", "2", "-q", "-p", pattern])
            .arg(dst.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawning ping");
        ChildGuard(Some(child))
    }
}

/// A child process that is killed and reaped if the test fails before waiting for it.
#[derive(Debug)]
pub struct ChildGuard(pub Option<Child>);

impl ChildGuard {
    /// Waits for the child and asserts it succeeded (its output in the message otherwise).
    pub fn expect_success(mut self, what: &str) {
        let out = self
            .0
            .take()
            .expect("not yet waited")
            .wait_with_output()
            .expect("waiting for child");
        assert!(
            out.status.success(),
            "{what}: {}\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
