//! The DNS plane: atoll's DNS network namespace, the veth pair into it, and the dataplane's view
//! of both (the `from_dns` link and the `DNS_SERVICE` entry).
//!
//! ```text
//! host namespace                         | DNS namespace (dns.namespace)
//! <dns.device> ──[TCX ingress: from_dns]─┼── dns0: <server_address>/32, NOARP, up
//!   (no address, IPv6 off)               |   route <proxy_network> dev dns0 scope link
//!                                        |   DNS server sockets: <server_address>:53 UDP+TCP
//! ```
//!
//! Decisions:
//! - `dns0` is NOARP, so the namespace's stack sends replies to every proxy address without
//!   asking for a MAC (it uses its own); `from_dns` rewrites both MACs anyway. Queries arrive
//!   addressed to `dns0`'s MAC, which `from_vm` writes from `DNS_SERVICE`.
//! - Proxy addresses are on-link through `dns0` by one route; the server address is a /32, so
//!   no subnet broadcast address exists and every proxy address is a plain unicast address.
//! - IPv6 is off in the namespace (before `dns0` arrives) and on the host side, so neither
//!   stack sends anything `from_dns` would have to drop.
//! - [`DnsPlane::ensure`] is idempotent and reuses what exists (an agent restart keeps the
//!   namespace, the devices and the pinned link). A half-present pair (one end missing) is
//!   deleted and made again. The dataplane entry is written last, when the path works.
//! - Removal ([`DnsPlane::remove`], `Host::destroy`) deletes the device pair, then the
//!   namespace's mount.

use std::{
    io,
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
};

use atoll_dataplane_common::{ipv4_to_map, DnsService, DNS_PORT};
use futures::TryStreamExt;
use netlink_packet_route::{link::LinkAttribute, route::RouteScope};
use rtnetlink::{LinkUnspec, RouteMessageBuilder};

use super::{netns, server::Settings};
use crate::{
    config::DnsConfig,
    dataplane::DataplaneError,
    device::{self, DeviceError, Devices},
    endpoint::Host,
    types::MacAddr,
};

/// Name of the DNS namespace's end of the veth pair.
pub const PEER_NAME: &str = "dns0";
/// MAC given to `dns0` when the pair is created.
pub const PEER_MAC: MacAddr = MacAddr([0x02, 0xa7, 0x53, 0x00, 0x00, 0x01]);

#[derive(Debug, thiserror::Error)]
pub enum PlaneError {
    #[error(
        "dns.proxy_network {network} has {size} addresses but the dataplane has {capacity} \
         endpoint slots: use a shorter prefix"
    )]
    ProxyRangeTooSmall {
        network: String,
        size: u64,
        capacity: u32,
    },
    #[error("DNS namespace: {0}")]
    Namespace(#[source] netns::NetnsError),
    #[error("opening a netlink socket in the DNS namespace: {0}")]
    Netlink(#[source] io::Error),
    #[error("DNS device: {0}")]
    Device(#[source] DeviceError),
    #[error("{operation} in the DNS namespace: {source}")]
    Configure {
        operation: &'static str,
        source: Box<rtnetlink::Error>,
    },
    #[error("{PEER_NAME} is missing in the DNS namespace after creating the DNS device")]
    PeerMissing,
    #[error("reading the MAC address of {name}: {source}")]
    ReadMac { name: String, source: io::Error },
    #[error("programming the dataplane for DNS: {0}")]
    Program(#[source] DataplaneError),
    #[error("binding the DNS server's {protocol} socket to {addr}: {source}")]
    Bind {
        protocol: &'static str,
        addr: SocketAddr,
        source: io::Error,
    },
}

/// The DNS plane of one host, ready for a server ([`super::DnsServer::start`]).
#[derive(Debug, Clone)]
pub struct DnsPlane {
    cfg: DnsConfig,
    netns: PathBuf,
    ifindex: u32,
    service: DnsService,
}

impl DnsPlane {
    /// Creates or reuses the DNS namespace and device pair named in `cfg`, attaches `from_dns`
    /// and points `from_vm` at it. Must be called inside a tokio runtime.
    pub async fn ensure(host: &mut Host, cfg: &DnsConfig) -> Result<DnsPlane, PlaneError> {
        let capacity = host.dataplane().max_endpoints();
        let net = cfg.proxy_network;
        if net.size() < u64::from(capacity) {
            return Err(PlaneError::ProxyRangeTooSmall {
                network: net.to_string(),
                size: net.size(),
                capacity,
            });
        }
        let ns = netns::ensure(&cfg.namespace).map_err(PlaneError::Namespace)?;
        netns::run_in(&ns, disable_ipv6_here).map_err(PlaneError::Namespace)?;
        let nl = netlink_in(&ns)?;
        let devices = Devices::new().map_err(PlaneError::Device)?;
        let mut peer = find_link(&nl, PEER_NAME).await?;
        let host_side = device::ifindex(&cfg.device);
        let ifindex = match (host_side, &peer) {
            (Some(ifindex), Some(_)) => ifindex,
            _ => {
                if let Some(i) = host_side {
                    devices
                        .delete(&cfg.device, i)
                        .await
                        .map_err(PlaneError::Device)?;
                }
                if let Some((index, _)) = peer {
                    nl.link()
                        .del(index)
                        .execute()
                        .await
                        .map_err(configure("deleting a stale dns0"))?;
                }
                let ifindex = devices
                    .create_veth(&cfg.device, PEER_NAME, PEER_MAC, &ns)
                    .await
                    .map_err(PlaneError::Device)?;
                peer = find_link(&nl, PEER_NAME).await?;
                ifindex
            }
        };
        let (peer_index, peer_mac) = peer.ok_or(PlaneError::PeerMissing)?;
        nl.link()
            .set(
                LinkUnspec::new_with_index(peer_index)
                    .arp(false)
                    .up()
                    .build(),
            )
            .execute()
            .await
            .map_err(configure("setting dns0 up"))?;
        nl.address()
            .add(peer_index, cfg.server_address.into(), 32)
            .replace()
            .execute()
            .await
            .map_err(configure("adding the server address"))?;
        let route = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(net.addr, net.prefix)
            .output_interface(peer_index)
            .scope(RouteScope::Link)
            .build();
        nl.route()
            .add(route)
            .replace()
            .execute()
            .await
            .map_err(configure("routing the proxy network"))?;
        devices
            .set_up(&cfg.device, ifindex)
            .await
            .map_err(PlaneError::Device)?;
        let device_mac = host_mac(&cfg.device)?;
        let service = DnsService {
            ifindex,
            server_ipv4: ipv4_to_map(cfg.server_address.octets()),
            proxy_base: ipv4_to_map(net.addr.octets()),
            proxy_count: u32::try_from(net.size()).unwrap_or(u32::MAX),
            server_mac: peer_mac.0,
            device_mac: device_mac.0,
        };
        let dp = host.dataplane_mut();
        dp.attach_dns(&cfg.device, ifindex)
            .map_err(PlaneError::Program)?;
        dp.set_dns_service(service).map_err(PlaneError::Program)?;
        host.set_dns_namespace(Some(cfg.namespace.to_string()));
        Ok(DnsPlane {
            cfg: cfg.clone(),
            netns: ns,
            ifindex,
            service,
        })
    }

    /// Opens the DNS server's UDP and TCP sockets on `server_address:53` inside the DNS
    /// namespace (blocking; the caller registers them with its runtime).
    pub fn bind_sockets(&self) -> Result<(std::net::UdpSocket, std::net::TcpListener), PlaneError> {
        let addr = self.server_addr();
        netns::run_in(&self.netns, || {
            let udp = std::net::UdpSocket::bind(addr).map_err(|source| PlaneError::Bind {
                protocol: "UDP",
                addr,
                source,
            })?;
            let tcp = std::net::TcpListener::bind(addr).map_err(|source| PlaneError::Bind {
                protocol: "TCP",
                addr,
                source,
            })?;
            Ok((udp, tcp))
        })
        .map_err(PlaneError::Namespace)?
    }

    /// What the server needs to map client addresses to slots.
    pub fn settings(&self) -> Settings {
        Settings {
            suffix: self.cfg.suffix.to_string(),
            proxy_base: self.cfg.proxy_network.addr,
            proxy_count: self.service.proxy_count,
        }
    }

    /// The server's address inside the DNS namespace.
    pub fn server_addr(&self) -> SocketAddr {
        SocketAddr::from((self.cfg.server_address, DNS_PORT))
    }

    /// Path of the DNS namespace (for `setns`).
    pub fn netns_path(&self) -> &Path {
        &self.netns
    }

    /// Host-side DNS device: name and ifindex.
    pub fn device(&self) -> (&str, u32) {
        (&self.cfg.device, self.ifindex)
    }

    /// The `DNS_SERVICE` entry written for this plane.
    pub fn service(&self) -> DnsService {
        self.service
    }

    /// Deletes the device pair and the namespace named in `cfg`, whatever state they are in
    /// (`atoll-agent cleanup`). The dataplane is not touched (`Host::destroy` clears it). Must
    /// be called inside a tokio runtime.
    pub async fn remove(cfg: &DnsConfig) -> Result<(), PlaneError> {
        if let Some(ifindex) = device::ifindex(&cfg.device) {
            let devices = Devices::new().map_err(PlaneError::Device)?;
            devices
                .delete(&cfg.device, ifindex)
                .await
                .map_err(PlaneError::Device)?;
        }
        netns::remove(&cfg.namespace).map_err(PlaneError::Namespace)
    }
}

fn configure(operation: &'static str) -> impl Fn(rtnetlink::Error) -> PlaneError {
    move |source| PlaneError::Configure {
        operation,
        source: Box::new(source),
    }
}

/// A netlink connection whose socket lives in the namespace at `ns`, driven by the current
/// runtime.
fn netlink_in(ns: &Path) -> Result<rtnetlink::Handle, PlaneError> {
    let runtime = tokio::runtime::Handle::current();
    netns::run_in(ns, move || {
        // The socket registers with the runtime's reactor when it is created.
        let _entered = runtime.enter();
        let (conn, handle, _) = rtnetlink::new_connection()?;
        tokio::spawn(conn);
        Ok(handle)
    })
    .map_err(PlaneError::Namespace)?
    .map_err(PlaneError::Netlink)
}

/// Index and MAC of the link `name`, if it exists.
async fn find_link(
    nl: &rtnetlink::Handle,
    name: &str,
) -> Result<Option<(u32, MacAddr)>, PlaneError> {
    let mut links = nl.link().get().match_name(name.to_string()).execute();
    let msg = match links.try_next().await {
        Ok(Some(msg)) => msg,
        Ok(None) => return Ok(None),
        Err(rtnetlink::Error::NetlinkError(e)) if -e.raw_code() == libc::ENODEV => return Ok(None),
        Err(e) => return Err(configure("looking up dns0")(e)),
    };
    let mac = msg.attributes.iter().find_map(|a| match a {
        LinkAttribute::Address(b) => <[u8; 6]>::try_from(b.as_slice()).ok(),
        _ => None,
    });
    match mac {
        Some(mac) => Ok(Some((msg.header.index, MacAddr(mac)))),
        None => Err(PlaneError::ReadMac {
            name: name.into(),
            source: io::Error::other("no Ethernet address in the link message"),
        }),
    }
}

/// Disables IPv6 for every (current and future) device of the calling thread's namespace.
fn disable_ipv6_here() {
    for conf in ["all", "default"] {
        // Missing when IPv6 is compiled out: nothing to disable then.
        let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{conf}/disable_ipv6"), "1");
    }
}

/// MAC of a device of the agent's namespace.
fn host_mac(name: &str) -> Result<MacAddr, PlaneError> {
    crate::device::mac_of(name).map_err(|source| PlaneError::ReadMac {
        name: name.into(),
        source,
    })
}
