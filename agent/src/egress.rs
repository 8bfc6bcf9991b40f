//! The host's side of egress (issue 17): which device leads to the internet, which addresses
//! are the host's, which destinations no guest may ever reach, and the NAT port range.
//!
//! [`enable`] programs it into the dataplane (`endpoint::Host::enable_egress`) when
//! `egress.enabled`; [`rules`] keeps each cloud's policy in the rule tries; the packet path is
//! `dataplane-ebpf/src/egress.rs`.
//!
//! Decisions:
//! - **The uplink** is `egress.uplink`, or else the device of the IPv4 default route of the
//!   agent's network namespace (`/proc/thread-self/net/route`: the namespace of the calling
//!   thread, so a test or an agent that entered a namespace sees that namespace's routes).
//! - **Never reachable**, whatever a cloud's policy ([`never()`]): every address of the host
//!   and every network connected to it (so the uplink's LAN, the underlay and any management
//!   network; the next hop is a route, never a destination), loopback, link-local and metadata
//!   (169.254.0.0/16), "this network" (0.0.0.0/8), multicast, the reserved 240.0.0.0/4 and
//!   broadcast, and the operator's `egress.never`.
//! - **NAT ports** are a range the host's own sockets never use: the agent refuses a range
//!   that overlaps the ephemeral ports (`net.ipv4.ip_local_port_range`, default
//!   32768-60999, so the default 61000-65535 is clear of it) and adds the range to
//!   `net.ipv4.ip_local_reserved_ports` ([`reserve_nat_ports`]), so no bind to port 0 picks
//!   one. A listener bound explicitly to a reserved port still can, but is unreachable from
//!   the uplink on the host's egress address: the dataplane drops TCP and UDP to a NAT port
//!   there that no flow holds (`uplink_no_flow`). Both settings are per network namespace.

use std::{
    ffi::CStr,
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use crate::config::{EgressConfig, Ipv4Network, NatPorts};

pub mod rules;

#[derive(Debug, thiserror::Error)]
pub enum EgressError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("writing {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not what the kernel writes there: {text:?}")]
    Unreadable { path: PathBuf, text: String },
    #[error("no IPv4 default route in this network namespace: set egress.uplink")]
    NoDefaultRoute,
    #[error("egress.uplink {0:?}: no such device")]
    NoUplink(String),
    #[error("the uplink {0} has no IPv4 address to send from")]
    NoUplinkAddress(String),
    #[error("programming egress: {0}")]
    Program(#[source] Box<crate::endpoint::EndpointError>),
    #[error("listing the host's addresses (getifaddrs): {0}")]
    Addresses(#[source] std::io::Error),
    #[error(
        "egress.nat_ports {ours} overlaps the host's ephemeral ports {first}-{last} \
         (net.ipv4.ip_local_port_range): NAT and the host's own sockets would take the same \
         ports; choose a range outside it"
    )]
    PortsOverlap {
        ours: NatPorts,
        first: u16,
        last: u16,
    },
}

/// The device towards the internet and its IPv4 addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Uplink {
    pub name: String,
    pub ifindex: u32,
    /// Each address with its prefix length.
    pub addresses: Vec<(Ipv4Addr, u8)>,
}

/// An IPv4 address of an interface of this host, with its prefix length.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostAddress {
    pub device: String,
    pub ipv4: Ipv4Addr,
    pub prefix: u8,
}

/// What [`enable`] set up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Enabled {
    pub uplink: Uplink,
    /// The host's egress address (the uplink's first address).
    pub address: Ipv4Addr,
    pub never: Vec<Ipv4Network>,
}

/// Turns egress on for `host` per `cfg`: finds the uplink and its address, reserves the NAT
/// ports (refusing a range that overlaps the ephemeral ports), computes the never-reachable
/// set and programs all of it (`Host::enable_egress`).
pub fn enable(
    host: &mut crate::endpoint::Host,
    cfg: &EgressConfig,
) -> Result<Enabled, EgressError> {
    let uplink = uplink(cfg)?;
    let address = uplink
        .addresses
        .first()
        .map(|(a, _)| *a)
        .ok_or_else(|| EgressError::NoUplinkAddress(uplink.name.clone()))?;
    reserve_nat_ports(cfg.nat_ports)?;
    let never = never(cfg, &host_addresses()?);
    host.enable_egress(&uplink, address, cfg.nat_ports, &never)
        .and_then(|()| host.set_egress_flow_rate(cfg.max_new_flows_per_sec))
        .map_err(|e| EgressError::Program(Box::new(e)))?;
    Ok(Enabled {
        uplink,
        address,
        never,
    })
}

const ROUTES: &str = "/proc/thread-self/net/route";
const PORT_RANGE: &str = "/proc/sys/net/ipv4/ip_local_port_range";
const RESERVED_PORTS: &str = "/proc/sys/net/ipv4/ip_local_reserved_ports";

/// The uplink per `cfg` (see the module docs).
pub fn uplink(cfg: &EgressConfig) -> Result<Uplink, EgressError> {
    let name = match &cfg.uplink {
        Some(name) => name.to_string(),
        None => default_route_device(Path::new(ROUTES))?,
    };
    let ifindex =
        crate::device::ifindex(&name).ok_or_else(|| EgressError::NoUplink(name.clone()))?;
    let addresses = host_addresses()?
        .into_iter()
        .filter(|a| a.device == name)
        .map(|a| (a.ipv4, a.prefix))
        .collect();
    Ok(Uplink {
        name,
        ifindex,
        addresses,
    })
}

/// The device of the IPv4 default route in a `/proc/net/route` table (the one with the
/// lowest metric if there are several).
pub fn default_route_device(path: &Path) -> Result<String, EgressError> {
    let text = std::fs::read_to_string(path).map_err(|source| EgressError::Read {
        path: path.into(),
        source,
    })?;
    default_route_in(&text).ok_or(EgressError::NoDefaultRoute)
}

/// [`default_route_device`] on the table's text.
fn default_route_in(text: &str) -> Option<String> {
    const RTF_UP: u32 = 0x1;
    text.lines()
        .skip(1)
        .filter_map(|line| {
            // Iface Destination Gateway Flags RefCnt Use Metric Mask ...
            let f: Vec<&str> = line.split_whitespace().collect();
            let flags = u32::from_str_radix(f.get(3)?, 16).ok()?;
            let metric: u32 = f.get(6)?.parse().ok()?;
            (*f.get(1)? == "00000000" && *f.get(7)? == "00000000" && flags & RTF_UP != 0)
                .then(|| (metric, f[0].to_string()))
        })
        .min()
        .map(|(_, dev)| dev)
}

/// Every IPv4 address of this network namespace's interfaces.
pub fn host_addresses() -> Result<Vec<HostAddress>, EgressError> {
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs writes a list it allocates to `list`; it is freed below.
    if unsafe { libc::getifaddrs(&mut list) } != 0 {
        return Err(EgressError::Addresses(std::io::Error::last_os_error()));
    }
    let mut out = Vec::new();
    let mut cur = list;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list getifaddrs returned, valid until freeifaddrs.
        let ifa = unsafe { &*cur };
        cur = ifa.ifa_next;
        if ifa.ifa_addr.is_null() || ifa.ifa_netmask.is_null() {
            continue;
        }
        // SAFETY: a non-null ifa_addr points at a sockaddr whose family says its type.
        if i32::from(unsafe { (*ifa.ifa_addr).sa_family }) != libc::AF_INET {
            continue;
        }
        // SAFETY: AF_INET: both are sockaddr_in; the name is a NUL-terminated string.
        let (addr, mask, name) = unsafe {
            (
                (*(ifa.ifa_addr as *const libc::sockaddr_in))
                    .sin_addr
                    .s_addr,
                (*(ifa.ifa_netmask as *const libc::sockaddr_in))
                    .sin_addr
                    .s_addr,
                CStr::from_ptr(ifa.ifa_name).to_string_lossy().into_owned(),
            )
        };
        out.push(HostAddress {
            device: name,
            ipv4: Ipv4Addr::from(u32::from_be(addr)),
            prefix: u32::from_be(mask).count_ones() as u8,
        });
    }
    // SAFETY: `list` came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(list) };
    Ok(out)
}

/// The networks no guest reaches whatever its cloud's policy: the built-in set, the host's
/// addresses and connected networks, and `cfg.never` (see the module docs). Sorted, without
/// duplicates.
pub fn never(cfg: &EgressConfig, host: &[HostAddress]) -> Vec<Ipv4Network> {
    let net = |a: [u8; 4], prefix: u8| Ipv4Network {
        addr: Ipv4Addr::from(a),
        prefix,
    };
    let mut out = vec![
        net([0, 0, 0, 0], 8),
        net([127, 0, 0, 0], 8),
        net([169, 254, 0, 0], 16),
        net([224, 0, 0, 0], 4),
        net([240, 0, 0, 0], 4),
    ];
    for a in host {
        out.push(net(a.ipv4.octets(), 32));
        let mask = u32::MAX.checked_shl(32 - u32::from(a.prefix)).unwrap_or(0);
        out.push(net((u32::from(a.ipv4) & mask).to_be_bytes(), a.prefix));
    }
    out.extend(cfg.never.iter().copied());
    out.sort_by_key(|n| (u32::from(n.addr), n.prefix));
    out.dedup();
    out
}

/// The host's ephemeral port range (`net.ipv4.ip_local_port_range`).
pub fn ephemeral_ports() -> Result<(u16, u16), EgressError> {
    let text = read(Path::new(PORT_RANGE))?;
    let mut it = text.split_whitespace().map(str::parse::<u16>);
    match (it.next(), it.next()) {
        (Some(Ok(a)), Some(Ok(b))) => Ok((a, b)),
        _ => Err(EgressError::Unreadable {
            path: PORT_RANGE.into(),
            text,
        }),
    }
}

/// Refuses `ports` if they overlap the host's ephemeral ports, else adds them to the ports the
/// kernel never picks for a bind to port 0 (`net.ipv4.ip_local_reserved_ports`, merged with
/// what is there). Idempotent.
pub fn reserve_nat_ports(ports: NatPorts) -> Result<(), EgressError> {
    let (first, last) = ephemeral_ports()?;
    if ports.overlaps(first, last) {
        return Err(EgressError::PortsOverlap {
            ours: ports,
            first,
            last,
        });
    }
    let path = Path::new(RESERVED_PORTS);
    let current = read(path)?;
    let ours = ports.to_string();
    let mut items: Vec<&str> = current
        .trim()
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    if items.contains(&ours.as_str()) {
        return Ok(());
    }
    items.push(&ours);
    std::fs::write(path, items.join(",")).map_err(|source| EgressError::Write {
        path: path.into(),
        source,
    })
}

/// True if every port of `ports` is in the host's reserved ports.
pub fn nat_ports_reserved(ports: NatPorts) -> Result<bool, EgressError> {
    let text = read(Path::new(RESERVED_PORTS))?;
    let ranges: Vec<(u16, u16)> = text
        .trim()
        .split(',')
        .filter(|s| !s.trim().is_empty())
        .filter_map(|s| match s.trim().split_once('-') {
            Some((a, b)) => Some((a.parse().ok()?, b.parse().ok()?)),
            None => s.trim().parse().ok().map(|p| (p, p)),
        })
        .collect();
    // The kernel prints merged, sorted ranges: one of them must cover ours.
    Ok(ranges
        .iter()
        .any(|&(a, b)| a <= ports.first && ports.last <= b))
}

fn read(path: &Path) -> Result<String, EgressError> {
    std::fs::read_to_string(path).map_err(|source| EgressError::Read {
        path: path.into(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_route_with_the_lowest_metric_wins() {
        let table =
            "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
            eth1\t00000000\t0100A8C0\t0003\t0\t0\t200\t00000000\t0\t0\t0\n\
            eth0\t00000000\t010012C6\t0003\t0\t0\t100\t00000000\t0\t0\t0\n\
            eth0\t000012C6\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n\
            eth2\t00000000\t01000A0A\t0002\t0\t0\t0\t00000000\t0\t0\t0\n";
        // eth2's default route is down (no RTF_UP).
        assert_eq!(default_route_in(table).as_deref(), Some("eth0"));
        assert_eq!(default_route_in("Iface\tDestination\n"), None);
        assert_eq!(default_route_in(""), None);
    }

    #[test]
    fn never_holds_the_built_ins_the_host_and_the_operators_networks() {
        let cfg = EgressConfig {
            never: vec!["10.200.0.0/16".parse().unwrap()],
            ..EgressConfig::default()
        };
        let host = [HostAddress {
            device: "uplink0".into(),
            ipv4: Ipv4Addr::new(198, 18, 0, 2),
            prefix: 24,
        }];
        let got: Vec<String> = never(&cfg, &host).iter().map(|n| n.to_string()).collect();
        assert_eq!(
            got,
            [
                "0.0.0.0/8",
                "10.200.0.0/16",
                "127.0.0.0/8",
                "169.254.0.0/16",
                "198.18.0.0/24",
                "198.18.0.2/32",
                "224.0.0.0/4",
                "240.0.0.0/4",
            ]
        );
    }

    #[test]
    fn nat_ports_are_a_range_clear_of_the_privileged_ports() {
        let ok = NatPorts::try_from("61000-65535".to_string()).unwrap();
        assert_eq!((ok.first, ok.last, ok.count()), (61000, 65535, 4536));
        assert!(ok.overlaps(32768, 61000) && !ok.overlaps(32768, 60999));
        for bad in ["", "61000", "65535-61000", "80-2000", "61000-61100", "a-b"] {
            assert!(NatPorts::try_from(bad.to_string()).is_err(), "{bad:?}");
        }
    }
}
