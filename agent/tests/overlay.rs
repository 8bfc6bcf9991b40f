//! One cloud across two hosts over the overlay, each host a network namespace with its own
//! agent dataplane (own bpffs root, own VXLAN device), joined by an underlay veth:
//! - two clouds with the same addresses span both hosts: ICMP, UDP and TCP cross between
//!   their guests, each cloud's traffic reaches only its own guests, counted `cross_host` on
//!   both ends;
//! - forged VXLAN frames written onto the underlay (unknown VNI, a VNI of a cloud the sender
//!   does not run, an unknown outer source, a known host speaking for another host's guest, a
//!   spoofed inner source, a destination that is not local, a non-IPv4 inner frame) are each
//!   dropped and counted under their own reason, and none reaches a guest.
//!
//! - the whole chain: VMs created through the control plane spread over both hosts, each
//!   host's converger installs the other's VM, and frames cross between their taps.
//!
//! The tests of this file run at once, so each names its namespaces, pins and devices with
//! tags of its own (a leftover check sees everything with its tags).

mod support;

use std::{
    collections::BTreeMap,
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream, UdpSocket},
    time::{Duration, Instant},
};

use atoll_agent::{
    config::{DataplaneConfig, DeviceName, EgressConfig, OverlayConfig},
    dns::netns,
    doctor::{self, Status},
    endpoint::Host,
    types::{CloudId, MacAddr},
};
use atoll_dataplane_common::{Direction, DropReason, TrafficClass};
use atoll_testbed::{
    frame::{self, layers},
    guest::{GuestUdp, Sniffer},
    unique_name,
    wait::{assert_silent, Sink, ARRIVE},
    NetNs, PinRoot,
};
use support::{require_root, VethGuest};

const A_UNDERLAY: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 1);
const B_UNDERLAY: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 2);
/// A second address of host B's underlay end that no host has: an unknown outer source.
const ROGUE_UNDERLAY: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 9);
/// A third host host A knows of (no namespace: only its routes and its peer entry).
const C_UNDERLAY: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 3);
const VXLAN_PORT: u16 = 4789;
const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
const ON_A: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
const ON_B: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 3);
/// Cloud 1's guest on host C.
const ON_C: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 4);
/// Guests leave room for the 50 bytes of encapsulation on the 1500-byte underlay.
const GUEST_MTU: u32 = 1450;

/// Marks every forged frame's payload, so a guest's packet socket can tell one.
const FORGED: &[u8] = b"forged across the overlay";

fn gateway_mac() -> [u8; 6] {
    DataplaneConfig::default().gateway_mac.0
}

fn cloud(n: u32) -> CloudId {
    CloudId::new(n).unwrap()
}

fn vni(cloud: u32) -> u32 {
    100 + cloud
}

fn guest_mac(cloud: u32, ip: Ipv4Addr) -> MacAddr {
    MacAddr::local(0x00ab_0000 | cloud << 8 | u32::from(ip.octets()[3]))
}

/// Runs `f` inside the host namespace `ns` (a host's netlink socket and device lookups are
/// its own namespace's).
fn on<T: Send>(ns: &NetNs, f: impl FnOnce() -> T + Send) -> T {
    netns::run_in(&ns.path(), f).expect("entering a host namespace")
}

fn in_guest<T: Send>(g: &VethGuest, f: impl FnOnce() -> T + Send) -> T {
    netns::run_in(&g.ns.path(), f).expect("entering a guest namespace")
}

/// `cross_host` packets of a guest's endpoint: (from guest, to guest).
fn cross_host(host: &Host, g: &VethGuest) -> (u64, u64) {
    packets(host, g, TrafficClass::CrossHost)
}

/// Packets of `class` of a guest's endpoint: (from guest, to guest).
fn packets(host: &Host, g: &VethGuest, class: TrafficClass) -> (u64, u64) {
    let c = host.dataplane().counters(g.ep.slot).expect("counters");
    let t = |d: Direction| c.traffic[d as usize][class as usize].packets;
    (t(Direction::FromGuest), t(Direction::ToGuest))
}

fn drops(host: &Host) -> BTreeMap<DropReason, u64> {
    host.dataplane()
        .drop_counters()
        .expect("drop counters")
        .into_iter()
        .filter(|(_, n)| *n > 0)
        .collect()
}

/// A VXLAN datagram's payload: the header with `vni`, then `inner`.
fn vxlan(vni: u32, inner: &[u8]) -> Vec<u8> {
    let mut v = vec![0x08, 0, 0, 0];
    v.extend_from_slice(&(vni << 8).to_be_bytes());
    v.extend_from_slice(inner);
    v
}

/// A UDP frame between guests as a host's `from_vm` would encapsulate it (gateway MAC to
/// the destination guest's).
fn inner_udp(c: u32, src: Ipv4Addr, dst: Ipv4Addr, payload: &[u8]) -> Vec<u8> {
    frame::Udp {
        src_mac: gateway_mac(),
        dst_mac: guest_mac(c, dst).0,
        src,
        dst,
        sport: 7000,
        dport: 7000,
    }
    .frame(payload)
}

fn overlay_cfg(underlay: Option<Ipv4Addr>) -> OverlayConfig {
    OverlayConfig {
        enabled: true,
        underlay,
        device: DeviceName::new("vx0").unwrap(),
        port: VXLAN_PORT,
        ..OverlayConfig::default()
    }
}

/// Two host namespaces named with `tag` joined by the underlay veth `under0`: host A at
/// [`A_UNDERLAY`], host B at [`B_UNDERLAY`] (and `extra` too, an address no host has).
fn two_hosts(tag: &str, extra: Option<Ipv4Addr>) -> (NetNs, NetNs) {
    let a = NetNs::new(&unique_name(tag)).unwrap();
    let b = NetNs::new(&unique_name(tag)).unwrap();
    a.sh(&format!(
        "ip link set lo up && ip link add under0 type veth peer name under0 netns {b} && \
         ip addr add {A_UNDERLAY}/24 dev under0 && ip link set under0 up",
        b = b.name()
    ))
    .unwrap();
    let extra = extra.map_or(String::new(), |e| {
        format!("ip addr add {e}/24 dev under0 && ")
    });
    b.sh(&format!(
        "ip link set lo up && ip addr add {B_UNDERLAY}/24 dev under0 && {extra}\
         ip link set under0 up"
    ))
    .unwrap();
    (a, b)
}

/// A host with the overlay on, its guests, and its peers and remote routes.
struct Side {
    host: Host,
    guests: Vec<VethGuest>,
}

#[allow(clippy::too_many_arguments)]
fn side(
    rt: &tokio::runtime::Runtime,
    ns: &NetNs,
    pins: &PinRoot,
    underlay: Ipv4Addr,
    clouds: &[u32],
    peers: &[Ipv4Addr],
    local: &[(u32, Ipv4Addr)],
    remote: &[(u32, Ipv4Addr, Ipv4Addr)],
    guest_tags: (&str, &str),
) -> Side {
    on(ns, || {
        let mut host = {
            let _entered = rt.enter();
            Host::open(&support::cfg(pins, 64, 0)).expect("opening a host's dataplane")
        };
        // `from_uplink` on the underlay device first, as on a host whose uplink is its
        // underlay: `from_underlay` must still go before it (it passes everything here, egress
        // being off, so a frame it saw first would never be decapsulated by the programs,
        // which the tests below would see on the VXLAN device's counters).
        let under0 = atoll_agent::device::ifindex("under0").expect("under0");
        host.dataplane_mut()
            .attach_uplink("under0", under0)
            .expect("from_uplink on under0");
        let cfg = overlay_cfg(Some(underlay));
        let enabled = rt
            .block_on(atoll_agent::overlay::enable(
                &mut host,
                &cfg,
                &EgressConfig::default(),
            ))
            .expect("enabling the overlay");
        assert_eq!(
            (
                enabled.underlay,
                enabled.device.as_str(),
                enabled.underlay_device.as_deref()
            ),
            (underlay, "vx0", Some("under0"))
        );
        // Enabling again (an agent restart) reuses the device and the pinned link.
        let again = rt
            .block_on(atoll_agent::overlay::enable(
                &mut host,
                &cfg,
                &EgressConfig::default(),
            ))
            .expect("enabling the overlay again");
        assert_eq!(again, enabled);
        // The doctor: the underlay is a plain veth, so not encrypted (a warning); a host
        // without an uplink and without `overlay.underlay` has no underlay address.
        let check = doctor::overlay(&cfg, &EgressConfig::default());
        assert_eq!(check.status, Status::Warn, "{check}");
        assert!(
            check
                .detail
                .contains(&format!("{underlay} on under0: not encrypted")),
            "{check}"
        );
        let none = doctor::overlay(&overlay_cfg(None), &EgressConfig::default());
        assert_eq!(none.status, Status::Warn, "{none}");
        for &c in clouds {
            host.set_cloud_vni(cloud(c), vni(c)).unwrap();
        }
        for &p in peers {
            host.add_overlay_peer(p).unwrap();
        }
        let guests = local
            .iter()
            .map(|&(c, ip)| {
                let g = support::veth_guest(
                    rt,
                    &mut host,
                    guest_tags,
                    c,
                    ip,
                    guest_mac(c, ip),
                    GATEWAY,
                );
                g.ns.exec(&["ip", "link", "set", "eth0", "mtu", &GUEST_MTU.to_string()])
                    .expect("guest MTU");
                g
            })
            .collect();
        for &(c, ip, at) in remote {
            host.set_remote_endpoint(cloud(c), ip, guest_mac(c, ip), at)
                .unwrap();
        }
        Side { host, guests }
    })
}

/// Packets the VXLAN device `vx0` in `ns` received: what the kernel decapsulated, not the
/// programs (frames `from_underlay` takes never reach it).
fn vxlan_rx(ns: &NetNs) -> u64 {
    let out = ns
        .exec(&["ip", "-s", "-j", "link", "show", "dev", "vx0"])
        .expect("vx0's statistics");
    let v: serde_json::Value = serde_json::from_str(&out).expect("ip's JSON");
    v[0]["stats64"]["rx"]["packets"]
        .as_u64()
        .unwrap_or_else(|| panic!("no rx packets in {out}"))
}

/// Polls `read` until it returns `want`, for at most [`ARRIVE`].
fn wait_until<T: PartialEq + std::fmt::Debug>(what: &str, want: T, read: impl Fn() -> T) {
    let deadline = Instant::now() + ARRIVE;
    loop {
        let got = read();
        if got == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: {got:?}, expected {want:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn one_cloud_spans_two_hosts_and_forged_frames_are_dropped() {
    require_root();
    support::leaves_nothing(&["ovh", "ovg", "ovd", "ovp"], || {
        let (a_ns, b_ns) = two_hosts("ovh", Some(ROGUE_UNDERLAY));
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let (a_pins, b_pins) = (PinRoot::new("ovp"), PinRoot::new("ovp"));
        // Clouds 1 and 2 have the same addresses on both hosts; cloud 3 runs on host A only;
        // cloud 1 has a third guest on host C, which host A knows.
        let a = side(
            &rt,
            &a_ns,
            &a_pins,
            A_UNDERLAY,
            &[1, 2, 3],
            &[B_UNDERLAY, C_UNDERLAY],
            &[(1, ON_A), (2, ON_A), (3, ON_A)],
            &[
                (1, ON_B, B_UNDERLAY),
                (2, ON_B, B_UNDERLAY),
                (1, ON_C, C_UNDERLAY),
            ],
            ("ovg", "ovd"),
        );
        let b = side(
            &rt,
            &b_ns,
            &b_pins,
            B_UNDERLAY,
            &[1, 2],
            &[A_UNDERLAY],
            &[(1, ON_B), (2, ON_B)],
            &[(1, ON_A, A_UNDERLAY), (2, ON_A, A_UNDERLAY)],
            ("ovg", "ovd"),
        );
        let (a1, a2, a3) = (&a.guests[0], &a.guests[1], &a.guests[2]);
        let (b1, b2) = (&b.guests[0], &b.guests[1]);

        // ICMP, both clouds, both ways.
        for (from, to) in [(a1, ON_B), (b1, ON_A), (a2, ON_B), (b2, ON_A)] {
            assert!(
                from.ping(to),
                "{} → {to}: no answer; drops on A {:?}, on B {:?}",
                from.label,
                drops(&a.host),
                drops(&b.host)
            );
        }
        // The programs encapsulated and decapsulated those themselves: neither VXLAN device
        // received a packet.
        assert_eq!(
            (vxlan_rx(&a_ns), vxlan_rx(&b_ns)),
            (0, 0),
            "pings took the device"
        );
        // Path MTU: guests that raise their MTU to the underlay's (ignoring the config drive)
        // still get full-size packets across, with DF and without: too big to encapsulate in
        // place, they take the VXLAN device, and the underlay fragments them.
        for g in [a1, b1] {
            g.ns.exec(&["ip", "link", "set", "eth0", "mtu", "1500"])
                .unwrap();
        }
        for df in ["do", "dont"] {
            let ok = a1
                .ns
                .succeeds(&[
                    "ping",
                    "-M",
                    df,
                    "-s",
                    "1472",
                    "-c",
                    "1",
                    "-W",
                    "2",
                    "-q",
                    &ON_B.to_string(),
                ])
                .unwrap();
            assert!(
                ok,
                "a 1500-byte ping (-M {df}) across; drops on A {:?}, on B {:?}",
                drops(&a.host),
                drops(&b.host)
            );
        }
        assert!(
            vxlan_rx(&b_ns) >= 2,
            "the big pings did not take B's device"
        );
        for g in [a1, b1] {
            g.ns.exec(&["ip", "link", "set", "eth0", "mtu", &GUEST_MTU.to_string()])
                .unwrap();
        }
        // UDP: each cloud's datagram reaches its own guest on the other host, only there.
        let (u_b1, u_b2) = (GuestUdp::bind(b1, 7000), GuestUdp::bind(b2, 7000));
        for (from, tag) in [(a1, b"cloud 1".as_slice()), (a2, b"cloud 2".as_slice())] {
            in_guest(from, || {
                let s = UdpSocket::bind((ON_A, 7001)).unwrap();
                s.send_to(tag, (ON_B, 7000)).unwrap();
            });
        }
        assert_eq!(u_b1.recv("cloud 1's datagram").0, b"cloud 1");
        assert_eq!(u_b2.recv("cloud 2's datagram").0, b"cloud 2");
        assert_silent(
            &[Sink::Udp(&u_b1), Sink::Udp(&u_b2)],
            "after one datagram each",
        );
        // TCP across, with segments bigger than one frame (the guest MTU leaves room for the
        // encapsulation, so none is fragmented on the underlay).
        let listener = in_guest(b1, || TcpListener::bind((ON_B, 7100))).unwrap();
        let payload: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let sent = payload.clone();
        let client = std::thread::spawn({
            let ns = a1.ns.path();
            move || {
                netns::run_in(&ns, move || {
                    let mut s =
                        TcpStream::connect_timeout(&SocketAddrV4::new(ON_B, 7100).into(), ARRIVE)
                            .expect("connecting across hosts");
                    s.write_all(&sent).unwrap();
                    s.shutdown(std::net::Shutdown::Write).unwrap();
                    let mut back = Vec::new();
                    s.read_to_end(&mut back).unwrap();
                    back
                })
                .unwrap()
            }
        });
        listener.set_nonblocking(false).unwrap();
        let (mut conn, peer) = listener.accept().unwrap();
        assert_eq!(peer.ip(), std::net::IpAddr::V4(ON_A));
        conn.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut got = Vec::new();
        conn.read_to_end(&mut got).unwrap();
        assert!(
            got == payload,
            "{} of {} bytes arrived intact",
            got.len(),
            payload.len()
        );
        conn.write_all(b"done").unwrap();
        drop(conn);
        assert_eq!(client.join().unwrap(), b"done");

        // Counted cross-host on both ends; cloud 3 (host A only) sent nothing across.
        let (a1_out, _) = cross_host(&a.host, a1);
        let (_, b1_in) = cross_host(&b.host, b1);
        assert!(a1_out > 0 && b1_in > 0, "a1 out {a1_out}, b1 in {b1_in}");
        assert_eq!(cross_host(&a.host, a3), (0, 0));
        assert!(
            drops(&a.host).is_empty(),
            "drops on A: {:?}",
            drops(&a.host)
        );
        assert!(
            drops(&b.host).is_empty(),
            "drops on B: {:?}",
            drops(&b.host)
        );

        // Forged frames written onto the underlay from host B's namespace: each dropped on
        // host A under its reason, none reaching a guest. Each is sent twice: without a UDP
        // checksum, as atoll sends, so `from_underlay` checks it before the kernel sees it;
        // and with one, which `from_underlay` leaves to the kernel's VXLAN device and
        // `from_overlay` checks. The same reasons either way.
        let sniffers: Vec<Sniffer> = [a1, a2, a3].into_iter().map(Sniffer::open).collect();
        let to_a = SocketAddrV4::new(A_UNDERLAY, VXLAN_PORT);
        let send = |src: Ipv4Addr, datagram: &[u8], checksum: bool| {
            on(&b_ns, || {
                let s = UdpSocket::bind((src, 0)).unwrap();
                if !checksum {
                    let one: libc::c_int = 1;
                    // SAFETY: SO_NO_CHECK reads an int we own for the call.
                    let rc = unsafe {
                        libc::setsockopt(
                            std::os::fd::AsRawFd::as_raw_fd(&s),
                            libc::SOL_SOCKET,
                            libc::SO_NO_CHECK,
                            (&one as *const libc::c_int).cast(),
                            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                        )
                    };
                    assert_eq!(rc, 0, "SO_NO_CHECK");
                }
                s.send_to(datagram, to_a).unwrap();
            })
        };
        let arp = layers::ethernet(
            gateway_mac(),
            guest_mac(1, ON_B).0,
            0x0806,
            &layers::arp(1, guest_mac(1, ON_B).0, ON_B, [0; 6], ON_A),
        );
        // An IPv4 header claiming more than the frame holds. (A frame too short for its IPv4
        // header never reaches the program: the kernel's VXLAN receive drops it and counts
        // it in the device's rx_length_errors.)
        let mut short = inner_udp(1, ON_B, ON_A, FORGED);
        short[16..18].copy_from_slice(&1000u16.to_be_bytes());
        frame::refresh_ipv4_checksum(&mut short);
        let cases: Vec<(&str, Ipv4Addr, Vec<u8>, DropReason)> = vec![
            (
                "a VNI no cloud here has",
                B_UNDERLAY,
                vxlan(999, &inner_udp(1, ON_B, ON_A, FORGED)),
                DropReason::OverlayUnknownVni,
            ),
            (
                "the VNI of a cloud host B does not run",
                B_UNDERLAY,
                vxlan(vni(3), &inner_udp(3, ON_B, ON_A, FORGED)),
                DropReason::OverlaySpoofedSource,
            ),
            (
                "an outer source that is no host",
                ROGUE_UNDERLAY,
                vxlan(vni(1), &inner_udp(1, ON_B, ON_A, FORGED)),
                DropReason::OverlayUnknownPeer,
            ),
            (
                "host B speaking for host C's guest",
                B_UNDERLAY,
                vxlan(vni(1), &inner_udp(1, ON_C, ON_A, FORGED)),
                DropReason::OverlaySpoofedSource,
            ),
            (
                "host B speaking for host A's own guest",
                B_UNDERLAY,
                vxlan(vni(1), &inner_udp(1, ON_A, ON_A, FORGED)),
                DropReason::OverlaySpoofedSource,
            ),
            (
                "an inner source that is nobody's",
                B_UNDERLAY,
                vxlan(
                    vni(1),
                    &inner_udp(1, Ipv4Addr::new(10, 0, 0, 99), ON_A, FORGED),
                ),
                DropReason::OverlaySpoofedSource,
            ),
            (
                "a destination that is not on host A",
                B_UNDERLAY,
                vxlan(vni(1), &inner_udp(1, ON_B, ON_C, FORGED)),
                DropReason::OverlayNotLocal,
            ),
            (
                "an ARP request",
                B_UNDERLAY,
                vxlan(vni(1), &arp),
                DropReason::OverlayMalformed,
            ),
            (
                "an IPv4 packet longer than its frame",
                B_UNDERLAY,
                vxlan(vni(1), &short),
                DropReason::OverlayMalformed,
            ),
        ];
        let mut expected = drops(&a.host);
        for (what, src, datagram, reason) in cases {
            for checksum in [false, true] {
                let device_before = vxlan_rx(&a_ns);
                send(src, &datagram, checksum);
                *expected.entry(reason).or_default() += 1;
                wait_until(what, expected.clone(), || drops(&a.host));
                let device = vxlan_rx(&a_ns) - device_before;
                assert_eq!(
                    device,
                    u64::from(checksum),
                    "{what} (checksum {checksum}): {device} packets through A's device"
                );
            }
        }
        let sinks: Vec<Sink> = sniffers
            .iter()
            .map(|s| Sink::Sniffer(s, vec![FORGED.to_vec()]))
            .collect();
        assert_silent(&sinks, "forged frames");
        // A well-formed frame from host B for its own guest is delivered: the checks above
        // refused what they had to, not everything.
        let u_a1 = GuestUdp::bind(a1, 7000);
        for checksum in [false, true] {
            send(
                B_UNDERLAY,
                &vxlan(vni(1), &inner_udp(1, ON_B, ON_A, b"genuine")),
                checksum,
            );
            assert_eq!(u_a1.recv("a genuine frame from host B").0, b"genuine");
        }

        drop(sniffers);
        drop((u_a1, u_b1, u_b2, listener));
        // `atoll-agent cleanup` deletes the overlay device (once).
        let cfg = overlay_cfg(Some(A_UNDERLAY));
        let remove = || {
            on(&a_ns, || {
                rt.block_on(atoll_agent::overlay::remove_device(&cfg))
            })
        };
        assert!(remove().unwrap());
        assert!(!remove().unwrap());
        for s in [a, b] {
            let Side { host, guests } = s;
            drop(guests);
            drop(host);
        }
    });
}

/// Applies the control plane's changes on `host` until it has everything the store holds
/// now.
async fn converge(
    core: &atoll_control::core::Core,
    conv: &mut atoll_agent::converge::Converger,
    host: &mut Host,
) {
    let target = core.store().revision().await.unwrap();
    loop {
        let delta = conv.next_delta(Duration::from_secs(5)).await.expect("sync");
        conv.apply(host, delta).await.expect("apply");
        if conv.revision() >= target {
            return;
        }
    }
}

/// Hosts `ha` (namespace `a`) and `hb` (`b`) with the overlay on, registered with their
/// underlay addresses through `source`, each with a converger (taps named with `tap_tag`).
fn api_hosts(
    rt: &tokio::runtime::Runtime,
    source: &atoll_agent::converge::Source,
    pins: &[PinRoot; 2],
    dir: &std::path::Path,
    (a_ns, b_ns): (&NetNs, &NetNs),
    tap_tag: &str,
) -> Vec<(atoll_agent::converge::Converger, Host)> {
    use atoll_agent::converge::{ConvergeConfig, Converger};
    let mut sides = Vec::new();
    for (i, (name, ns, underlay)) in [("ha", a_ns, A_UNDERLAY), ("hb", b_ns, B_UNDERLAY)]
        .into_iter()
        .enumerate()
    {
        let host = on(ns, || {
            let mut host = {
                let _entered = rt.enter();
                Host::open(&support::cfg(&pins[i], 64, 0)).expect("opening a dataplane")
            };
            rt.block_on(atoll_agent::overlay::enable(
                &mut host,
                &overlay_cfg(Some(underlay)),
                &EgressConfig::default(),
            ))
            .expect("enabling the overlay");
            host
        });
        rt.block_on(async {
            source.register(name).await.unwrap();
            source.register_underlay(name, underlay).await.unwrap();
        });
        let conv = Converger::new(
            ConvergeConfig {
                host: name.into(),
                tap_prefix: unique_name(tap_tag),
                volumes_dir: dir.join(name),
            },
            source.clone(),
            None,
        );
        sides.push((conv, host));
    }
    sides
}

/// The whole chain on two hosts: hosts register their underlay addresses, a cloud created
/// through the control plane spreads its VMs over both, each host's converger installs the
/// other host's VM as a remote endpoint, and a frame written by one VM's tap reaches the other
/// VM's tap on the other host (ARP answered for the remote address first, TTL one less); when
/// the VM goes, the route goes and the frame is dropped where it starts.
#[test]
fn vms_created_through_the_api_reach_each_other_across_hosts() {
    use atoll_agent::converge::Source;
    use atoll_control::core::{Command as Cmd, Embedded, Principal, Reply};
    use atoll_control::model::{CreateCloud, CreateVm};
    use atoll_testbed::guest::{TapGuest, TAP_TTL};

    require_root();
    support::leaves_nothing(&["oxh", "oxp", "oxt"], || {
        let (a_ns, b_ns) = two_hosts("oxh", None);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let core = rt.block_on(support::control_plane(dir.path()));
        let source = Source::new(Embedded(core.clone()));
        let exec = |cmd: Cmd| {
            rt.block_on(core.execute(Principal::Operator, cmd))
                .expect("command")
        };
        let pins = [PinRoot::new("oxp"), PinRoot::new("oxp")];
        let mut sides = api_hosts(&rt, &source, &pins, dir.path(), (&a_ns, &b_ns), "oxt");
        let Reply::CreatedCloud(x) = exec(Cmd::CreateCloud {
            spec: CreateCloud::default(),
        }) else {
            panic!()
        };
        let xid = x.cloud.id;
        let mut placed = Vec::new();
        for name in ["one", "two"] {
            let Reply::Vm(vm) = exec(Cmd::CreateVm {
                cloud: xid,
                spec: CreateVm::named(name),
            }) else {
                panic!()
            };
            placed.push(*vm);
        }
        assert_ne!(
            placed[0].host, placed[1].host,
            "spread over both hosts: {placed:?}"
        );
        for ((conv, host), ns) in sides.iter_mut().zip([&a_ns, &b_ns]) {
            on(ns, || rt.block_on(converge(&core, conv, host)));
        }
        // Each VM's tap, attached in its host's namespace as its VMM would.
        let gw = DataplaneConfig::default().gateway_mac.0;
        let taps: Vec<TapGuest> = placed
            .iter()
            .map(|vm| {
                let (i, ns) = if vm.host == "ha" {
                    (0, &a_ns)
                } else {
                    (1, &b_ns)
                };
                // Names are looked up in the namespace the devices are in.
                let ep = on(ns, || sides[i].1.endpoints())
                    .unwrap()
                    .into_iter()
                    .find(|e| e.cloud == xid && e.ipv4 == vm.ipv4)
                    .expect("the VM's endpoint on its host");
                let name = ep.name.clone().expect("a named tap");
                on(ns, || {
                    TapGuest::attach(&vm.name, &name, ep.mac.0, vm.ipv4, gw)
                })
            })
            .collect();
        let (one, two) = (&taps[0], &taps[1]);
        one.send(&one.arp_request(two.ip));
        one.expect_arp_reply(two.ip);
        one.send(&one.udp(two.ip, 5000, 6000, b"across the overlay"));
        let packet = two.expect_ipv4("a datagram from the other host", one.ip, TAP_TTL - 1);
        assert!(layers::contains(&packet, b"across the overlay"));
        two.send(&two.udp(one.ip, 6000, 5000, b"and back"));
        let packet = one.expect_ipv4("the answer from the other host", two.ip, TAP_TTL - 1);
        assert!(layers::contains(&packet, b"and back"));

        // VM two goes: its host removes its endpoint, the other host its route.
        exec(Cmd::DeleteVm {
            cloud: xid,
            vm: "two".into(),
        });
        for ((conv, host), ns) in sides.iter_mut().zip([&a_ns, &b_ns]) {
            on(ns, || rt.block_on(converge(&core, conv, host)));
        }
        let i_one = usize::from(placed[0].host != "ha");
        assert!(sides[i_one].1.remote_endpoints().unwrap().is_empty());
        let before = drops(&sides[i_one].1);
        one.send(&one.udp(two.ip, 5000, 6000, b"to nobody"));
        let mut expected = before.clone();
        // Out of the cloud's routes and outside egress (off here): no route in the cloud.
        *expected.entry(DropReason::NoRouteInCloud).or_default() += 1;
        wait_until("the frame to the deleted VM", expected, || {
            drops(&sides[i_one].1)
        });
        drop(taps);
        drop(sides);
        drop(pins);
    });
}

/// `from_vm` to a remote endpoint, by test runs on a private dataplane: with the overlay off
/// the frame is dropped (`overlay_off`), with the overlay on but no network id for the cloud
/// too (`overlay_no_vni`); with both it is rewritten as for a local hop (gateway → the remote
/// guest's MAC, TTL one less, header checksum kept valid), redirected to the VXLAN device and
/// counted `cross_host` from the sender. A remote route never replaces a local endpoint's.
#[test]
fn frames_to_a_remote_endpoint_are_encapsulated_or_dropped_with_a_reason() {
    use atoll_agent::dataplane::PROG_FROM_VM;
    use atoll_dataplane_common::{ipv4_to_map, EndpointInfo, NextHop, OverlayHost, RouteKey};
    use atoll_testbed::verdict::{self, TC_ACT_REDIRECT};
    use aya::programs::SchedClassifier;

    require_root();
    support::leaves_nothing(&["ovv"], || {
        let pins = PinRoot::new("ovv");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let mut host = {
            let _entered = rt.enter();
            Host::open(&support::cfg(&pins, 64, 0)).expect("opening a private dataplane")
        };
        let gw = gateway_mac();
        let sender = guest_mac(1, ON_A);
        // test_run's device is loopback (ifindex 1): the sender's endpoint.
        host.dataplane_mut()
            .insert_endpoint(
                1,
                EndpointInfo {
                    cloud: 1,
                    ipv4: ipv4_to_map(ON_A.octets()),
                    gateway_ipv4: ipv4_to_map(GATEWAY.octets()),
                    mac: sender.0,
                    gateway_mac: gw,
                    slot: 3,
                },
            )
            .unwrap();
        // Its own route, as the agent writes it with every endpoint.
        host.dataplane_mut()
            .insert_route(
                RouteKey {
                    cloud: 1,
                    ipv4: ipv4_to_map(ON_A.octets()),
                },
                NextHop {
                    ifindex: 1,
                    slot: 3,
                    mac: sender.0,
                    flags: 0,
                },
            )
            .unwrap();
        host.set_remote_endpoint(cloud(1), ON_B, guest_mac(1, ON_B), B_UNDERLAY)
            .unwrap();
        let err = host
            .set_remote_endpoint(cloud(1), ON_A, guest_mac(1, ON_A), B_UNDERLAY)
            .expect_err("a remote route over a local endpoint's");
        assert!(err.to_string().contains("local route"), "{err}");
        let prog =
            SchedClassifier::from_pin(host.dataplane().pin_dir().join("progs").join(PROG_FROM_VM))
                .unwrap();
        let frame = frame::Udp {
            src_mac: sender.0,
            dst_mac: gw,
            src: ON_A,
            dst: ON_B,
            sport: 7000,
            dport: 7000,
        }
        .frame(b"to the other host");
        let run = |host: &Host, what: &str| {
            verdict::run(
                &prog,
                PROG_FROM_VM,
                &frame,
                || host.dataplane().drop_counters().unwrap(),
                what,
            )
        };
        let r = run(&host, "overlay off");
        assert!(r.dropped_once(DropReason::OverlayOff), "{r:?}");
        host.dataplane_mut()
            .set_overlay_host(OverlayHost {
                vxlan_ifindex: 4242,
                underlay_ipv4: ipv4_to_map(A_UNDERLAY.octets()),
                ..OverlayHost::default()
            })
            .unwrap();
        let r = run(&host, "no network id");
        assert!(r.dropped_once(DropReason::OverlayNoVni), "{r:?}");
        host.set_cloud_vni(cloud(1), vni(1)).unwrap();
        let before = host.dataplane().counters(3).unwrap();
        let r = run(&host, "encapsulated");
        assert_eq!((r.ret, r.drops.len()), (TC_ACT_REDIRECT, 0), "{r:?}");
        let eth = layers::parse_eth(&r.out).expect("an Ethernet frame");
        assert_eq!((eth.dst, eth.src), (guest_mac(1, ON_B).0, gw));
        let ip = layers::parse_ipv4(eth.payload).expect("IPv4");
        assert_eq!((ip.src, ip.dst, ip.ttl), (ON_A, ON_B, 63));
        assert!(ip.header_checksum_ok);
        let after = host.dataplane().counters(3).unwrap();
        let class = |c: &atoll_dataplane_common::EndpointCounters| {
            c.traffic[Direction::FromGuest as usize][TrafficClass::CrossHost as usize]
        };
        assert_eq!(
            (
                class(&after).packets - class(&before).packets,
                class(&after).bytes - class(&before).bytes
            ),
            (1, frame.len() as u64)
        );
        // With an underlay device, the program encapsulates in place: the frame as above
        // behind outer IPv4 (this host to host B, TTL 64, DF clear), UDP (a source port from
        // the flow's hash in 49152-65535, the VXLAN port, no checksum) and VXLAN (the cloud's
        // VNI) headers; counted the same.
        let in_place = OverlayHost {
            vxlan_ifindex: 4242,
            underlay_ipv4: ipv4_to_map(A_UNDERLAY.octets()),
            underlay_ifindex: 4243,
            port_be: VXLAN_PORT.to_be(),
            underlay_mtu: 1500,
        };
        host.dataplane_mut().set_overlay_host(in_place).unwrap();
        let before = host.dataplane().counters(3).unwrap();
        let r = run(&host, "encapsulated in place");
        assert_eq!((r.ret, r.drops.len()), (TC_ACT_REDIRECT, 0), "{r:?}");
        assert_eq!(r.out.len(), frame.len() + 50, "{r:?}");
        let outer = layers::parse_eth(&r.out).expect("an Ethernet frame");
        assert_eq!(outer.ethertype, 0x0800);
        let oip = layers::parse_ipv4(outer.payload).expect("outer IPv4");
        assert_eq!(
            (oip.src, oip.dst, oip.ttl, oip.protocol),
            (A_UNDERLAY, B_UNDERLAY, 64, 17)
        );
        assert!(oip.header_checksum_ok);
        assert_eq!(outer.payload[6] & 0x40, 0, "DF set");
        let udp = layers::parse_udp(&oip).expect("outer UDP");
        assert_eq!((udp.dport, udp.checksum), (VXLAN_PORT, 0));
        assert!(udp.sport >= 49152, "source port {}", udp.sport);
        assert_eq!(udp.payload[..8], vxlan(vni(1), &[])[..]);
        let inner = layers::parse_eth(&udp.payload[8..]).expect("the inner frame");
        assert_eq!(
            (inner.dst, inner.src, inner.ethertype),
            (guest_mac(1, ON_B).0, gw, 0x0800)
        );
        let iip = layers::parse_ipv4(inner.payload).expect("inner IPv4");
        assert_eq!((iip.src, iip.dst, iip.ttl), (ON_A, ON_B, 63));
        assert!(iip.header_checksum_ok);
        let mut forwarded = frame.clone();
        forwarded[..6].copy_from_slice(&guest_mac(1, ON_B).0);
        forwarded[6..12].copy_from_slice(&gw);
        forwarded[22] -= 1;
        frame::refresh_ipv4_checksum(&mut forwarded);
        assert!(
            udp.payload[8..] == forwarded[..],
            "the inner frame is the frame, forwarded"
        );
        // At the underlay MTU's boundary: a frame that would not fit once encapsulated (its
        // length + 36 over the MTU) takes the VXLAN device (which fragments), left as is and
        // redirected with a tunnel key; one that just fits is encapsulated in place.
        for (mtu, grown, what) in [
            (frame.len() + 35, 0, "too big to encapsulate in place"),
            (frame.len() + 36, 50, "just fits in place"),
        ] {
            host.dataplane_mut()
                .set_overlay_host(OverlayHost {
                    underlay_mtu: mtu as u16,
                    ..in_place
                })
                .unwrap();
            let r = run(&host, what);
            assert_eq!((r.ret, r.drops.len()), (TC_ACT_REDIRECT, 0), "{r:?}");
            assert_eq!(r.out.len(), frame.len() + grown, "{what}: {r:?}");
        }
        let after = host.dataplane().counters(3).unwrap();
        assert_eq!(class(&after).packets - class(&before).packets, 3);
        host.dataplane_mut()
            .set_overlay_host(OverlayHost {
                vxlan_ifindex: 4242,
                underlay_ipv4: ipv4_to_map(A_UNDERLAY.octets()),
                ..OverlayHost::default()
            })
            .unwrap();
        // A grant's NAT address for another host (a backend here replying): encapsulated
        // to that host with the TTL kept (the consumer host's translation is the hop) and
        // counted `exposure`; a NAT route never replaces a remote endpoint's route.
        let nat = Ipv4Addr::new(10, 0, 0, 200);
        host.set_remote_nat(cloud(1), nat, B_UNDERLAY).unwrap();
        let err = host
            .set_remote_nat(cloud(1), ON_B, B_UNDERLAY)
            .expect_err("a NAT route over a remote endpoint's");
        assert!(err.to_string().contains("remote endpoint"), "{err}");
        let reply = frame::Udp {
            src_mac: sender.0,
            dst_mac: gw,
            src: ON_A,
            dst: nat,
            sport: 8080,
            dport: 40000,
        }
        .frame(b"a backend's reply");
        let before = host.dataplane().counters(3).unwrap();
        let r = verdict::run(
            &prog,
            PROG_FROM_VM,
            &reply,
            || host.dataplane().drop_counters().unwrap(),
            "to a remote NAT address",
        );
        assert_eq!((r.ret, r.drops.len()), (TC_ACT_REDIRECT, 0), "{r:?}");
        let eth = layers::parse_eth(&r.out).expect("an Ethernet frame");
        let ip = layers::parse_ipv4(eth.payload).expect("IPv4");
        assert_eq!((ip.src, ip.dst, ip.ttl), (ON_A, nat, 64));
        let after = host.dataplane().counters(3).unwrap();
        let exposure = |c: &atoll_dataplane_common::EndpointCounters| {
            c.traffic[Direction::FromGuest as usize][TrafficClass::Exposure as usize].packets
        };
        assert_eq!(exposure(&after) - exposure(&before), 1);
        host.remove_remote_nat(cloud(1), nat).unwrap();
        assert!(host.remote_nats().unwrap().is_empty());
        // The VNI is bounded; a VNI another cloud holds is refused.
        assert!(host.set_cloud_vni(cloud(2), 0).is_err());
        assert!(host.set_cloud_vni(cloud(2), 1 << 24).is_err());
        assert!(host.set_cloud_vni(cloud(2), vni(1)).is_err());
        drop(prog);
        drop(host);
    });
}

/// An exposure across hosts, by the dataplane alone: the consumer's host translates and
/// encapsulates under the provider's network id to the backend's host, which routes the
/// grant's NAT address for that consumer host back to it; replies are translated back on the
/// consumer's host. UDP and TCP both ways, the backend seeing the NAT address; `exposure`
/// counted on both endpoints (nothing `cross_host`); a reply no flow holds is dropped
/// (`exposure_no_flow`), and after the grant is revoked on the consumer's host a new datagram
/// finds no route and the backend's replies are dropped where they arrive.
#[test]
fn a_consumer_reaches_a_backend_on_another_host_through_an_exposure() {
    use atoll_agent::endpoint::{ServiceSpec, PROTOCOL_TCP, PROTOCOL_UDP};
    const CONSUMER: u32 = 5;
    const PROVIDER: u32 = 6;
    const UDP_VIP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 50);
    const UDP_NAT: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 200);
    const TCP_VIP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 51);
    const TCP_NAT: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 201);
    require_root();
    support::leaves_nothing(&["oeh", "oeg", "oed", "oep"], || {
        let (a_ns, b_ns) = two_hosts("oeh", None);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let (a_pins, b_pins) = (PinRoot::new("oep"), PinRoot::new("oep"));
        // Host A runs the consumer and knows where the provider's backend is; host B runs
        // the backend and routes the grants' NAT addresses for host A back to it.
        let mut a = side(
            &rt,
            &a_ns,
            &a_pins,
            A_UNDERLAY,
            &[CONSUMER, PROVIDER],
            &[B_UNDERLAY],
            &[(CONSUMER, ON_A)],
            &[(PROVIDER, ON_B, B_UNDERLAY)],
            ("oeg", "oed"),
        );
        let mut b = side(
            &rt,
            &b_ns,
            &b_pins,
            B_UNDERLAY,
            &[PROVIDER],
            &[A_UNDERLAY],
            &[(PROVIDER, ON_B)],
            &[],
            ("oeg", "oed"),
        );
        let spec = |vip, nat, protocol, port, backend_port| ServiceSpec {
            consumer: cloud(CONSUMER),
            vip,
            provider: cloud(PROVIDER),
            nat,
            protocol,
            port,
            backends: vec![(ON_B, backend_port)],
        };
        on(&a_ns, || {
            a.host
                .apply_service(&spec(UDP_VIP, UDP_NAT, PROTOCOL_UDP, 53, 5353))
                .unwrap();
            a.host
                .apply_service(&spec(TCP_VIP, TCP_NAT, PROTOCOL_TCP, 80, 8080))
                .unwrap();
        });
        on(&b_ns, || {
            for nat in [UDP_NAT, TCP_NAT] {
                b.host
                    .set_remote_nat(cloud(PROVIDER), nat, A_UNDERLAY)
                    .unwrap();
            }
            assert_eq!(
                b.host.remote_nats().unwrap().len(),
                2,
                "both NAT addresses routed to host A"
            );
        });
        let (consumer, backend) = (&a.guests[0], &b.guests[0]);

        // UDP: the backend sees the NAT address; its answer comes back from the VIP.
        let server = GuestUdp::bind(backend, 5353);
        let client = in_guest(consumer, || UdpSocket::bind((ON_A, 7001))).unwrap();
        client
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        client.send_to(b"question", (UDP_VIP, 53)).unwrap();
        let (got, from) = server.recv("the consumer's datagram");
        assert_eq!(got, b"question");
        assert_eq!(
            from.ip(),
            std::net::IpAddr::V4(UDP_NAT),
            "from the NAT address"
        );
        server.sock.send_to(b"answer", from).unwrap();
        let mut buf = [0u8; 64];
        let (n, answered_by) = client.recv_from(&mut buf).expect("the backend's answer");
        assert_eq!(&buf[..n], b"answer");
        assert_eq!(answered_by, SocketAddrV4::new(UDP_VIP, 53).into());

        // TCP across, both ways.
        let listener = in_guest(backend, || TcpListener::bind((ON_B, 8080))).unwrap();
        let payload: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let sent = payload.clone();
        let connecting = std::thread::spawn({
            let ns = consumer.ns.path();
            move || {
                netns::run_in(&ns, move || {
                    let mut s =
                        TcpStream::connect_timeout(&SocketAddrV4::new(TCP_VIP, 80).into(), ARRIVE)
                            .expect("connecting to the VIP");
                    s.write_all(&sent).unwrap();
                    s.shutdown(std::net::Shutdown::Write).unwrap();
                    let mut back = Vec::new();
                    s.read_to_end(&mut back).unwrap();
                    back
                })
                .unwrap()
            }
        });
        let (mut conn, peer) = listener.accept().unwrap();
        assert_eq!(peer.ip(), std::net::IpAddr::V4(TCP_NAT));
        conn.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut got = Vec::new();
        conn.read_to_end(&mut got).unwrap();
        assert!(got == payload, "{} of {} bytes", got.len(), payload.len());
        conn.write_all(&payload).unwrap();
        drop(conn);
        assert!(
            connecting.join().unwrap() == payload,
            "the echo came back whole"
        );

        // Metered as an exposure on both endpoints, not as cross-host traffic.
        let (c_out, c_in) = packets(&a.host, consumer, TrafficClass::Exposure);
        let (b_out, b_in) = packets(&b.host, backend, TrafficClass::Exposure);
        assert!(
            c_out > 0 && c_in > 0 && b_out > 0 && b_in > 0,
            "exposure packets: consumer {c_out}/{c_in}, backend {b_out}/{b_in}"
        );
        assert_eq!(cross_host(&a.host, consumer), (0, 0));
        assert_eq!(cross_host(&b.host, backend), (0, 0));
        assert!(
            drops(&a.host).is_empty(),
            "drops on A: {:?}",
            drops(&a.host)
        );
        assert!(
            drops(&b.host).is_empty(),
            "drops on B: {:?}",
            drops(&b.host)
        );

        // A reply no flow holds: dropped on the consumer's host.
        let sniffer = Sniffer::open(consumer);
        let before = drops(&a.host);
        server.sock.send_to(FORGED, (UDP_NAT, 9999)).unwrap();
        let mut expected = before.clone();
        *expected.entry(DropReason::ExposureNoFlow).or_default() += 1;
        wait_until("a reply without a flow", expected, || drops(&a.host));

        // Revoked on the consumer's host: the consumer's datagram finds no route there, and
        // the backend's reply to the old flow is dropped where it arrives.
        on(&a_ns, || {
            assert!(a.host.remove_service(cloud(CONSUMER), UDP_VIP).unwrap());
        });
        let before = drops(&a.host);
        client.send_to(b"after", (UDP_VIP, 53)).unwrap();
        server.sock.send_to(FORGED, from).unwrap();
        let mut expected = before.clone();
        *expected.entry(DropReason::NoRouteInCloud).or_default() += 1;
        *expected.entry(DropReason::OverlayNotLocal).or_default() += 1;
        wait_until("after the revocation", expected, || drops(&a.host));
        assert_silent(
            &[
                Sink::Udp(&server),
                Sink::Sniffer(&sniffer, vec![FORGED.to_vec()]),
            ],
            "after the revocation",
        );
        on(&b_ns, || {
            b.host.remove_remote_nat(cloud(PROVIDER), UDP_NAT).unwrap();
            assert_eq!(b.host.remote_nats().unwrap().len(), 1);
        });
        drop((a, b));
    });
}

/// An exposure across hosts, through the API: the provider's backend runs on host A, the
/// consumer's VM on host B. Host B gets the service with the grant's NAT address for B, the
/// provider's network id and where its backend runs; host A routes that NAT address back to
/// B. A datagram to the VIP reaches the backend's tap on A from the NAT address; the answer
/// reaches the consumer's tap from the VIP. A second consumer VM on host A gets a NAT address
/// of its own (one per consumer host). Revoking the grant removes all of it from both hosts.
#[test]
fn an_exposure_created_through_the_api_is_carried_across_hosts() {
    use atoll_agent::converge::{Converger, Source};
    use atoll_control::core::{Command as Cmd, Embedded, Principal, Reply};
    use atoll_control::model::{
        Backend, CreateCloud, CreateExposure, CreateGrant, CreateVm, GrantState, OfferPolicy,
        Protocol, Vm,
    };
    use atoll_testbed::guest::{TapGuest, TAP_TTL};

    require_root();
    support::leaves_nothing(&["oyh", "oyp", "oyt"], || {
        let (a_ns, b_ns) = two_hosts("oyh", None);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let core = rt.block_on(support::control_plane(dir.path()));
        let source = Source::new(Embedded(core.clone()));
        let exec = |cmd: Cmd| {
            rt.block_on(core.execute(Principal::Operator, cmd))
                .expect("command")
        };
        let pins = [PinRoot::new("oyp"), PinRoot::new("oyp")];
        let mut sides = api_hosts(&rt, &source, &pins, dir.path(), (&a_ns, &b_ns), "oyt");
        // Every host applies what there is, round after round, until a round brings no host
        // anything (a host's sync allocating its NAT address is news for the other host).
        let converge_all = |sides: &mut Vec<(Converger, Host)>| loop {
            let mut news = false;
            for ((conv, host), ns) in sides.iter_mut().zip([&a_ns, &b_ns]) {
                on(ns, || {
                    rt.block_on(async {
                        let d = conv
                            .next_delta(Duration::from_millis(200))
                            .await
                            .expect("sync");
                        let empty = atoll_control::model::SyncDelta {
                            revision: d.revision,
                            ..Default::default()
                        };
                        news |= d != empty;
                        conv.apply(host, d).await.expect("apply");
                    })
                });
            }
            if !news {
                return;
            }
        };
        let cloud = |r: Reply| match r {
            Reply::CreatedCloud(c) => c.cloud.id,
            other => panic!("{other:?}"),
        };
        let provider = cloud(exec(Cmd::CreateCloud {
            spec: CreateCloud::default(),
        }));
        let consumer = cloud(exec(Cmd::CreateCloud {
            spec: CreateCloud::default(),
        }));
        let create_vm = |c, name: &str| match exec(Cmd::CreateVm {
            cloud: c,
            spec: CreateVm::named(name),
        }) {
            Reply::Vm(vm) => *vm,
            other => panic!("{other:?}"),
        };
        // By load: the backend goes to host A, the consumer's VM to host B.
        let backend = create_vm(provider, "web");
        let app = create_vm(consumer, "app");
        assert_eq!((backend.host.as_str(), app.host.as_str()), ("ha", "hb"));
        exec(Cmd::CreateExposure {
            cloud: provider,
            spec: CreateExposure {
                name: "dns".into(),
                protocol: Protocol::Udp,
                port: 53,
                backends: vec![Backend {
                    vm: "web".into(),
                    port: 5353,
                }],
            },
        });
        exec(Cmd::PutOfferPolicy {
            cloud: consumer,
            policy: OfferPolicy {
                accept_from: vec![provider],
            },
        });
        exec(Cmd::CreateGrant {
            cloud: provider,
            exposure: "dns".into(),
            spec: CreateGrant { consumer },
        });
        converge_all(&mut sides);
        let grants = || match exec(Cmd::ListGrants {
            cloud: provider,
            exposure: "dns".into(),
        }) {
            Reply::Grants(g) => g,
            other => panic!("{other:?}"),
        };
        let g = grants().pop().expect("the grant");
        assert_eq!(g.state, GrantState::Active, "{g:?}");
        assert_eq!(g.host_nats.len(), 1, "{g:?}");
        assert_eq!(
            (g.host_nats[0].host.as_str(), g.host_nats[0].ipv4),
            ("hb", g.nat_ipv4),
            "the first consumer host has the grant's NAT address"
        );
        // What each host holds.
        let (a, b) = (&sides[0].1, &sides[1].1);
        let b_services = on(&b_ns, || b.services()).unwrap();
        assert_eq!(b_services.len(), 1, "{b_services:?}");
        assert_eq!(b_services[0].1.nat, g.nat_ipv4);
        assert!(on(&a_ns, || a.services()).unwrap().is_empty());
        assert!(on(&b_ns, || b.remote_endpoints())
            .unwrap()
            .iter()
            .any(|&(c, ip, _, at)| c == provider && ip == backend.ipv4 && at == A_UNDERLAY));
        assert_eq!(
            on(&a_ns, || a.remote_nats()).unwrap(),
            vec![(provider, g.nat_ipv4, B_UNDERLAY)]
        );

        // Frames between the two VMs' taps, as their VMMs would write them.
        let gw = DataplaneConfig::default().gateway_mac.0;
        let tap = |vm: &Vm, i: usize, ns: &NetNs| {
            let ep = on(ns, || sides[i].1.endpoints())
                .unwrap()
                .into_iter()
                .find(|e| e.cloud == vm.cloud && e.ipv4 == vm.ipv4)
                .expect("the VM's endpoint");
            let name = ep.name.clone().expect("a named tap");
            on(ns, || {
                TapGuest::attach(&vm.name, &name, ep.mac.0, vm.ipv4, gw)
            })
        };
        let web = tap(&backend, 0, &a_ns);
        let client = tap(&app, 1, &b_ns);
        client.send(&client.udp(g.vip, 40000, 53, b"question"));
        let packet = web.expect_ipv4("the consumer's datagram", g.nat_ipv4, TAP_TTL - 1);
        let ip = layers::parse_ipv4(&packet).unwrap();
        let udp = layers::parse_udp(&ip).expect("UDP");
        assert_eq!((udp.dport, udp.payload), (5353, b"question".as_slice()));
        assert!(udp.checksum_ok);
        let nat_port = udp.sport;
        web.send(&web.udp(g.nat_ipv4, 5353, nat_port, b"answer"));
        let packet = client.expect_ipv4("the backend's answer", g.vip, TAP_TTL - 1);
        let ip = layers::parse_ipv4(&packet).unwrap();
        let udp = layers::parse_udp(&ip).expect("UDP");
        assert_eq!(
            (udp.sport, udp.dport, udp.payload),
            (53, 40000, b"answer".as_slice())
        );
        assert!(udp.checksum_ok);

        // The consumer on host A too: a NAT address of its own there, translated locally.
        let app2 = create_vm(consumer, "app2");
        assert_eq!(app2.host, "ha");
        converge_all(&mut sides);
        let g = grants().pop().expect("the grant");
        assert_eq!(g.host_nats.len(), 2, "{g:?}");
        let a_nat = g.host_nats.iter().find(|n| n.host == "ha").unwrap().ipv4;
        assert_ne!(a_nat, g.nat_ipv4);
        let (a, b) = (&sides[0].1, &sides[1].1);
        let a_services = on(&a_ns, || a.services()).unwrap();
        assert_eq!(
            a_services.iter().map(|s| s.1.nat).collect::<Vec<_>>(),
            vec![a_nat]
        );
        assert!(on(&b_ns, || b.remote_nats()).unwrap().is_empty());

        // Revoked: gone from both hosts, and the consumer's datagram finds no route.
        exec(Cmd::RevokeGrant {
            cloud: provider,
            exposure: "dns".into(),
            consumer,
        });
        converge_all(&mut sides);
        let (a, b) = (&sides[0].1, &sides[1].1);
        assert!(on(&a_ns, || a.services()).unwrap().is_empty());
        assert!(on(&b_ns, || b.services()).unwrap().is_empty());
        assert!(on(&a_ns, || a.remote_nats()).unwrap().is_empty());
        assert!(
            !on(&b_ns, || b.remote_endpoints())
                .unwrap()
                .iter()
                .any(|&(c, ..)| c == provider),
            "the provider's backend is forgotten on the consumer's host"
        );
        assert!(!on(&b_ns, || b.cloud_vnis())
            .unwrap()
            .iter()
            .any(|&(c, _)| c == provider));
        let before = drops(b);
        client.send(&client.udp(g.vip, 40000, 53, b"after"));
        let mut expected = before.clone();
        *expected.entry(DropReason::NoRouteInCloud).or_default() += 1;
        wait_until("the datagram after the revocation", expected, || drops(b));
        drop((web, client));
        drop(sides);
        drop(pins);
    });
}
