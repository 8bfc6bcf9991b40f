//! End-to-end test of DNS at the gateway: the real dataplane, the real DNS namespace and
//! hickory server, and guests asking with hickory-resolver from inside their own namespaces.
//!
//! # Scenario
//!
//! Two clouds use the same addresses (10.0.0.0/24, gateway 10.0.0.1). Each has a veth guest
//! 10.0.0.2 in its own namespace, and cloud 1 also a tap guest 10.0.0.3 driven by the test
//! (raw frames). Both clouds have a zone with a VM called `web` (cloud 1: 10.0.0.2, cloud 2:
//! 10.0.0.3) and a CNAME `www → web`.
//!
//! 1. The DNS plane is ensured (namespace, veth pair, `from_dns`, `DNS_SERVICE`), twice: the
//!    second call reuses everything.
//! 2. With `ForwardPolicy::Refuse`, from each veth guest, over UDP and TCP, with nameserver = its
//!    gateway: its own `web` and `www` resolve to its own address (authoritative), the other
//!    cloud's `web` is NXDOMAIN, `example.com.` is REFUSED. Each query moves the asker's `host`
//!    counters (both directions), never the other guest's.
//! 3. The tap guest sends one UDP query frame and receives the answer frame: addresses, ports,
//!    MACs and both checksums are checked (the answer leaves the DNS namespace with a partial
//!    checksum, which the kernel completes on the tap), and its `host` counters move by exactly
//!    those two frames.
//! 4. A second server with `ForwardPolicy::Forward` to a tiny hickory upstream (in a namespace
//!    the test creates, reached over a veth pair from the host namespace): `example.com.`
//!    resolves through it over UDP and TCP; names under the suffix never reach it, and a record
//!    it tries to inject under the suffix is removed.
//!    Then the agent "restarts" (a new `Host` on the same pins) and ensures the plane again:
//!    everything is reused and answers keep coming.
//! 5. Removing an endpoint clears its `SLOT_ENDPOINTS` entry; `Host::destroy` removes the DNS
//!    device and namespace. No DNS drop reason moved, and nothing with the test's prefixes is
//!    left (also checked after a failure).

mod support;

use support::dns::{addresses, rcode_of, Transport};

use std::{
    net::{Ipv4Addr, SocketAddr},
    os::fd::OwnedFd,
    process::Command,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use atoll_agent::{
    config::{DnsConfig, Ipv4Network},
    dns::{netns, DnsPlane, DnsServer, DnsView, ForwardPolicy, Record, RecordData, Zone},
    endpoint::{DeviceSpec, Endpoint, EndpointSpec, Host},
    types::{CloudId, MacAddr},
};
use atoll_api::model::EgressPolicy;
use atoll_dataplane_common::{Direction, DropReason, TrafficClass};
use atoll_testbed::{
    frame::{self, Udp},
    run, unique_name, unique_prefix, LinksWithPrefix, NetNs, PinRoot,
};
use hickory_proto::{
    op::{Message, MessageType, OpCode, Query, ResponseCode},
    rr::{rdata::A, Name, RData, Record as RR, RecordType},
};
use hickory_resolver::{lookup::Lookup, net::NetError};
use hickory_server::{
    net::runtime::Time,
    server::{Request, RequestHandler, ResponseHandler, ResponseInfo},
    zone_handler::MessageResponseBuilder,
};

/// `unique_name` tags: guest veths, guest namespaces, pins, the DNS namespace and device, the
/// tap, the upstream's namespace and veth.
const TAGS: [&str; 6] = ["dv", "dn", "dp", "dd", "dt", "du"];
const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
const VETH_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
const TAP_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 3);
const UPSTREAM_ANSWER: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 7);
/// What the upstream claims `web.one.atoll.internal.` is: never seen by a guest.
const INJECTED: Ipv4Addr = Ipv4Addr::new(6, 6, 6, 6);
const TAP_PORT: u16 = 40053;
const ARRIVE: Duration = Duration::from_secs(3);

/// Resolves from the guest namespace at the gateway, one transport, one attempt.
fn resolve(ns: &NetNs, t: Transport, name: &str, ty: RecordType) -> Result<Lookup, NetError> {
    support::dns::resolve(ns, GATEWAY, ARRIVE, t, name, ty)
}

/// The DNS reasons: none of them may move in this test.
const DNS_REASONS: [DropReason; 4] = [
    DropReason::GatewayL4Malformed,
    DropReason::DnsForeignFrame,
    DropReason::DnsUnknownSlot,
    DropReason::DnsRewriteFailed,
];

#[test]
fn guests_resolve_their_own_cloud_at_the_gateway() {
    support::require_root();
    support::leaves_nothing(&TAGS, scenario);
}

/// Removes the DNS namespace on drop (the device goes with `LinksWithPrefix`).
struct NamespaceGuard(String);

impl Drop for NamespaceGuard {
    fn drop(&mut self) {
        let _ = netns::remove(&self.0);
    }
}

use support::VethGuest as Guest;

fn cloud(n: u32) -> CloudId {
    CloudId::new(n).expect("non-zero")
}

fn scenario() {
    let _links: Vec<LinksWithPrefix> = TAGS
        .iter()
        .map(|t| LinksWithPrefix(unique_prefix(t)))
        .collect();
    let pins = PinRoot::new("dp");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let mut host = {
        let _entered = rt.enter();
        Host::open(&support::cfg(&pins, 64, 0)).expect("opening the dataplane")
    };
    let dns_cfg = DnsConfig {
        namespace: atoll_agent::config::NetnsName::new(&unique_name("dd")).unwrap(),
        device: atoll_agent::config::DeviceName::new(&unique_name("dd")).unwrap(),
        proxy_network: "100.127.0.0/26".parse::<Ipv4Network>().expect("network"),
        ..DnsConfig::default()
    };
    let _dns_ns = NamespaceGuard(dns_cfg.namespace.to_string());

    // 1. The plane, twice.
    let plane = rt
        .block_on(DnsPlane::ensure(&mut host, &dns_cfg))
        .unwrap_or_else(|e| panic!("ensuring the DNS plane: {e}"));
    let again = rt
        .block_on(DnsPlane::ensure(&mut host, &dns_cfg))
        .unwrap_or_else(|e| panic!("ensuring the DNS plane again: {e}"));
    assert_eq!(
        again.device(),
        plane.device(),
        "the second ensure reuses the device"
    );
    assert_eq!(again.service(), plane.service());
    assert!(netns::is_mounted(plane.netns_path()));
    assert_eq!(host.dataplane().dns_service().unwrap(), plane.service());
    let drops_before = host.dataplane().drop_counters().unwrap();

    // Guests: one veth guest per cloud (same address), and a tap guest in cloud 1.
    let g1 = veth_guest(&rt, &mut host, 1);
    let g2 = veth_guest(&rt, &mut host, 2);
    let (tap_ep, tap_fd) = tap_guest(&rt, &mut host);
    for ep in [&g1.ep, &g2.ep, &tap_ep] {
        assert_eq!(
            host.dataplane().slot_endpoint(ep.slot).unwrap(),
            ep.ifindex,
            "SLOT_ENDPOINTS follows the endpoint"
        );
    }

    // 2. Split horizon, external names refused.
    let view = DnsView::new(ForwardPolicy::Refuse);
    fill_view(&view, &[&g1.ep, &g2.ep, &tap_ep]);
    let server = {
        let _entered = rt.enter();
        DnsServer::start(&plane, view.clone()).expect("starting the DNS server")
    };
    for (me, other, my_web, my_apex, other_apex) in [
        (&g1, &g2, Ipv4Addr::new(10, 0, 0, 2), "one", "two"),
        (&g2, &g1, Ipv4Addr::new(10, 0, 0, 3), "two", "one"),
    ] {
        for t in [Transport::Udp, Transport::Tcp] {
            let mine = host_counters(&host, me.ep.slot);
            // The other guest may still be closing its last TCP query's connection.
            let theirs = support::settled(|| host_counters(&host, other.ep.slot));
            let what = format!("cloud {} over {t:?}", me.ep.cloud);
            let web = resolve(
                &me.ns,
                t,
                &format!("web.{my_apex}.atoll.internal."),
                RecordType::A,
            )
            .unwrap_or_else(|e| panic!("{what}: own web: {e}"));
            assert_eq!(addresses(&web), vec![my_web], "{what}: own web");
            assert!(
                web.message().metadata.authoritative,
                "{what}: authoritative"
            );
            let www = resolve(
                &me.ns,
                t,
                &format!("www.{my_apex}.atoll.internal."),
                RecordType::A,
            )
            .unwrap_or_else(|e| panic!("{what}: own www: {e}"));
            assert_eq!(
                addresses(&www),
                vec![my_web],
                "{what}: www is a CNAME of web"
            );
            let foreign = resolve(
                &me.ns,
                t,
                &format!("web.{other_apex}.atoll.internal."),
                RecordType::A,
            );
            assert_eq!(
                rcode_of(&foreign),
                Some(ResponseCode::NXDomain),
                "{what}: other cloud's web: {foreign:?}"
            );
            let external = resolve(&me.ns, t, "example.com.", RecordType::A);
            assert_eq!(
                rcode_of(&external),
                Some(ResponseCode::Refused),
                "{what}: example.com: {external:?}"
            );
            let after = host_counters(&host, me.ep.slot);
            for dir in [0, 1] {
                assert!(
                    after[dir].0 >= mine[dir].0 + 4,
                    "{what}: host packets {} {:?} -> {:?}",
                    ["from guest", "to guest"][dir],
                    mine[dir],
                    after[dir]
                );
            }
            assert_eq!(
                host_counters(&host, other.ep.slot),
                theirs,
                "{what}: the other guest's counters"
            );
        }
    }

    // 3. The tap guest, frame by frame.
    tap_query(&host, &tap_ep, &tap_fd);

    // 4. Forwarding to an upstream.
    rt.block_on(server.shutdown())
        .expect("stopping the first server");
    let upstream = Upstream::start(&rt);
    let view = DnsView::new(ForwardPolicy::Forward(vec![upstream.addr]));
    fill_view(&view, &[&g1.ep, &g2.ep, &tap_ep]);
    let server = {
        let _entered = rt.enter();
        DnsServer::start(&plane, view.clone()).expect("starting the forwarding DNS server")
    };
    for t in [Transport::Udp, Transport::Tcp] {
        let asked = upstream.asked();
        let ext = resolve(&g1.ns, t, "example.com.", RecordType::A)
            .unwrap_or_else(|e| panic!("example.com through the upstream over {t:?}: {e}"));
        assert_eq!(addresses(&ext), vec![UPSTREAM_ANSWER], "{t:?}");
        assert!(!ext.message().metadata.authoritative);
        assert!(upstream.asked() > asked, "{t:?}: the upstream was asked");
        let asked = upstream.asked();
        let foreign = resolve(&g1.ns, t, "web.two.atoll.internal.", RecordType::A);
        assert_eq!(
            rcode_of(&foreign),
            Some(ResponseCode::NXDomain),
            "{t:?}: {foreign:?}"
        );
        let own = resolve(&g2.ns, t, "web.two.atoll.internal.", RecordType::A).expect("own web");
        assert_eq!(addresses(&own), vec![Ipv4Addr::new(10, 0, 0, 3)]);
        assert_eq!(
            upstream.asked(),
            asked,
            "{t:?}: names under the suffix are never forwarded"
        );
        // The upstream answers `alias.example.com. CNAME web.one.atoll.internal.` plus a forged
        // A record for that target. The forged record is removed; the resolver follows the
        // CNAME back to the gateway, where cloud 1 gets its own `web` and cloud 2 NXDOMAIN.
        let alias = resolve(&g1.ns, t, "alias.example.com.", RecordType::A)
            .unwrap_or_else(|e| panic!("{t:?}: alias from cloud 1: {e}"));
        assert_eq!(
            addresses(&alias),
            vec![Ipv4Addr::new(10, 0, 0, 2)],
            "{t:?}: {alias:?}"
        );
        let alias = resolve(&g2.ns, t, "alias.example.com.", RecordType::A);
        assert_eq!(
            rcode_of(&alias),
            Some(ResponseCode::NXDomain),
            "{t:?}: {alias:?}"
        );
    }
    // Egress policies decide what is forwarded: cloud 1 may resolve example.com only (and learns
    // its address), cloud 2 nothing outside its zone; neither refusal reaches the upstream.
    let allowlist: EgressPolicy = serde_json::from_value(serde_json::json!({
        "mode": "allowlist", "allow": [{"domain": "example.com", "protocol": "tcp"}]
    }))
    .unwrap();
    view.set_egress(cloud(1), &allowlist);
    view.set_egress(cloud(2), &EgressPolicy::deny_all());
    for t in [Transport::Udp, Transport::Tcp] {
        let asked = upstream.asked();
        let ext = resolve(&g1.ns, t, "example.com.", RecordType::A)
            .unwrap_or_else(|e| panic!("example.com allowed for cloud 1 over {t:?}: {e}"));
        assert_eq!(addresses(&ext), vec![UPSTREAM_ANSWER], "{t:?}");
        assert_eq!(upstream.asked(), asked + 1, "{t:?}: asked once");
        let learnt = view.learnt(cloud(1), std::time::Instant::now());
        assert_eq!(learnt.len(), 1, "{learnt:?}");
        assert_eq!(learnt[0].0, UPSTREAM_ANSWER);
        assert!(
            learnt[0].1 > Duration::from_secs(60) && learnt[0].1 <= Duration::from_secs(120),
            "the record's TTL (60 s) plus the grace (60 s): {learnt:?}"
        );
        for (ns, name) in [
            (&g1.ns, "alias.example.com."),
            (&g1.ns, "exfiltrated-secret.example.org."),
            (&g2.ns, "example.com."),
        ] {
            let refused = resolve(ns, t, name, RecordType::A);
            assert_eq!(
                rcode_of(&refused),
                Some(ResponseCode::Refused),
                "{t:?} {name}: {refused:?}"
            );
        }
        assert_eq!(
            upstream.asked(),
            asked + 1,
            "{t:?}: names a policy does not allow never reach the upstream"
        );
        assert!(view.learnt(cloud(2), std::time::Instant::now()).is_empty());
        let own = resolve(&g2.ns, t, "web.two.atoll.internal.", RecordType::A).expect("own web");
        assert_eq!(addresses(&own), vec![Ipv4Addr::new(10, 0, 0, 3)]);
    }
    // What was refused, per cloud, for the control plane: exactly the refused names, each
    // counted once per question the server got (at least once per transport; the resolver
    // may ask again after a refusal).
    let denied: Vec<(u32, Vec<String>)> = view
        .take_denied()
        .into_iter()
        .map(|r| {
            assert!(r.entries.iter().all(|e| e.count >= 2), "{r:?}");
            let mut names: Vec<String> = r
                .entries
                .into_iter()
                .map(|e| e.name.unwrap_or_default())
                .collect();
            names.sort();
            (r.cloud.get(), names)
        })
        .collect();
    assert_eq!(
        denied,
        vec![
            (
                1,
                vec![
                    "alias.example.com".to_string(),
                    "exfiltrated-secret.example.org".to_string()
                ]
            ),
            (2, vec!["example.com".to_string()]),
        ]
    );
    // An agent restart: a new `Host` on the same pins ensures the same plane (reusing the
    // namespace, the devices and the pinned `from_dns` link) and DNS keeps working.
    drop(host);
    let mut host = {
        let _entered = rt.enter();
        Host::open(&support::cfg(&pins, 64, 0)).expect("reopening the dataplane")
    };
    let reopened = rt
        .block_on(DnsPlane::ensure(&mut host, &dns_cfg))
        .unwrap_or_else(|e| panic!("ensuring the DNS plane after a restart: {e}"));
    assert_eq!(
        reopened.service(),
        plane.service(),
        "the same plane after a restart"
    );
    let (_, ifindex) = plane.device();
    assert_eq!(
        host.dataplane().dns_links().unwrap(),
        vec![ifindex],
        "one from_dns link"
    );
    let web = resolve(
        &g1.ns,
        Transport::Udp,
        "web.one.atoll.internal.",
        RecordType::A,
    )
    .unwrap_or_else(|e| panic!("after the restart: {e}"));
    assert_eq!(addresses(&web), vec![Ipv4Addr::new(10, 0, 0, 2)]);
    rt.block_on(server.shutdown())
        .expect("stopping the second server");
    drop(upstream);

    // 5. Teardown: SLOT_ENDPOINTS, then the whole host with its DNS plane.
    let name = g2.ep.name.clone().expect("named");
    rt.block_on(host.delete_endpoint(&name))
        .expect("deleting a guest");
    assert_eq!(
        host.dataplane().slot_endpoint(g2.ep.slot).unwrap(),
        0,
        "slot entry cleared"
    );
    let drops_after = host.dataplane().drop_counters().unwrap();
    for r in DNS_REASONS {
        let delta = count(&drops_after, r) - count(&drops_before, r);
        assert_eq!(delta, 0, "drop reason {} moved by {delta}", r.name());
    }
    let (device, _) = plane.device();
    let device = device.to_string();
    rt.block_on(host.destroy()).expect("destroying the host");
    assert!(
        atoll_agent::device::ifindex(&device).is_none(),
        "DNS device removed"
    );
    assert!(!plane.netns_path().exists(), "DNS namespace removed");
    drop((g1, g2));
}

fn count(drops: &[(DropReason, u64)], r: DropReason) -> u64 {
    drops.iter().find(|(x, _)| *x == r).map_or(0, |(_, n)| *n)
}

/// (packets, bytes) of the `host` class, from guest and to guest.
fn host_counters(host: &Host, slot: u32) -> [(u64, u64); 2] {
    let c = host.dataplane().counters(slot).expect("counters");
    let t = |d: Direction| {
        let x = c.traffic[d as usize][TrafficClass::Host as usize];
        (x.packets, x.bytes)
    };
    [t(Direction::FromGuest), t(Direction::ToGuest)]
}

fn fill_view(view: &DnsView, eps: &[&Endpoint]) {
    for ep in eps {
        view.set_endpoint(ep.slot, ep.cloud);
    }
    for (c, apex, web) in [(1, "one", 2), (2, "two", 3)] {
        let apex = format!("{apex}.atoll.internal.");
        let rec = |name: &str, data| Record {
            name: format!("{name}.{apex}"),
            ttl: 30,
            data,
        };
        view.set_zone(
            cloud(c),
            Zone {
                apex: apex.clone(),
                records: vec![
                    rec("web", RecordData::A(Ipv4Addr::new(10, 0, 0, web))),
                    rec("www", RecordData::Cname(format!("web.{apex}"))),
                    rec("info", RecordData::Txt(vec![format!("cloud {c}")])),
                ],
            },
        )
        .expect("a valid zone");
    }
}

fn veth_guest(rt: &tokio::runtime::Runtime, host: &mut Host, c: u32) -> Guest {
    let mac = MacAddr::local(0x00d0_0000 | c << 8 | 2);
    support::veth_guest(rt, host, ("dn", "dv"), c, VETH_IP, mac, GATEWAY)
}

fn tap_guest(rt: &tokio::runtime::Runtime, host: &mut Host) -> (Endpoint, OwnedFd) {
    let name = unique_name("dt");
    let spec = EndpointSpec {
        name: name.clone(),
        cloud: cloud(1),
        ipv4: TAP_IP,
        mac: MacAddr::local(0x00d0_0103),
        gateway: GATEWAY,
        device: DeviceSpec::Tap { owner_uid: None },
    };
    let ep = rt
        .block_on(host.create_endpoint(&spec))
        .unwrap_or_else(|e| panic!("creating {name}: {e}"));
    let fd = atoll_agent::device::open_tap_queue(&name, true).expect("attaching to the tap");
    atoll_agent::device::wait_until_up(&name, ARRIVE).expect("tap up");
    (ep, fd)
}

// ---------------------------------------------------------------------------------------------
// The tap guest: one query frame, one answer frame.

fn tap_query(host: &Host, ep: &Endpoint, fd: &OwnedFd) {
    let before = host_counters(host, ep.slot);
    let mut q = Message::query();
    q.metadata.recursion_desired = true;
    q.add_query(Query::query(
        Name::from_ascii("web.one.atoll.internal.").unwrap(),
        RecordType::A,
    ));
    let dns = q.to_vec().expect("encoding the query");
    let frame = Udp {
        src_mac: ep.mac.0,
        dst_mac: host.gateway_mac().0,
        src: ep.ipv4,
        dst: GATEWAY,
        sport: TAP_PORT,
        dport: 53,
    }
    .frame(&dns);
    frame::write_frame(fd, &frame);
    let answer = frame::read_frame(fd, ARRIVE).expect("an answer frame on the tap");
    let parsed =
        frame::parse_udp(&answer).unwrap_or_else(|e| panic!("answer frame: {e}: {answer:02x?}"));
    assert_eq!(parsed.addr.dst_mac, ep.mac.0);
    assert_eq!(parsed.addr.src_mac, host.gateway_mac().0);
    assert_eq!((parsed.addr.src, parsed.addr.dst), (GATEWAY, TAP_IP));
    assert_eq!((parsed.addr.sport, parsed.addr.dport), (53, TAP_PORT));
    assert!(parsed.ip_checksum_ok, "IPv4 header checksum");
    assert!(
        parsed.udp_checksum != 0 && parsed.udp_checksum_ok,
        "UDP checksum {:#06x}",
        parsed.udp_checksum
    );
    let msg = Message::from_vec(parsed.payload).expect("a DNS message");
    assert_eq!(
        (msg.metadata.id, msg.metadata.message_type),
        (q.metadata.id, MessageType::Response)
    );
    assert_eq!(msg.metadata.response_code, ResponseCode::NoError);
    let a: Vec<Ipv4Addr> = msg
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(a.0),
            _ => None,
        })
        .collect();
    assert_eq!(a, vec![Ipv4Addr::new(10, 0, 0, 2)]);
    let after = host_counters(host, ep.slot);
    assert_eq!(
        after[0],
        (before[0].0 + 1, before[0].1 + frame.len() as u64),
        "from guest"
    );
    assert_eq!(
        after[1],
        (before[1].0 + 1, before[1].1 + answer.len() as u64),
        "to guest"
    );
}

// ---------------------------------------------------------------------------------------------
// The upstream resolver: a tiny hickory server in a namespace of the test's, reached from the
// host namespace (where the forwarder's sockets live) over a veth pair of the test's.

struct Upstream {
    addr: SocketAddr,
    asked: Arc<AtomicUsize>,
    server: Option<hickory_server::Server<UpstreamHandler>>,
    rt: tokio::runtime::Handle,
    _ns: NetNs,
}

impl Upstream {
    fn start(rt: &tokio::runtime::Runtime) -> Self {
        // A /30 out of 198.18.0.0/15 (benchmarking addresses) chosen by pid, so concurrent
        // test processes do not collide.
        let base = u32::from(Ipv4Addr::new(198, 18, 0, 0)) + (std::process::id() % 32768) * 4;
        let (near, far) = (Ipv4Addr::from(base + 1), Ipv4Addr::from(base + 2));
        let ns = NetNs::new(&unique_name("du")).expect("upstream namespace");
        let dev = unique_name("du");
        run(Command::new("ip").args([
            "link",
            "add",
            &dev,
            "type",
            "veth",
            "peer",
            "name",
            "up0",
            "netns",
            ns.name(),
        ]))
        .expect("upstream veth");
        run(Command::new("sh").args([
            "-c",
            &format!(
                "echo 1 > /proc/sys/net/ipv6/conf/{dev}/disable_ipv6; \
                 ip addr add {near}/30 dev {dev} && ip link set {dev} up"
            ),
        ]))
        .expect("host side of the upstream veth");
        ns.sh(&format!(
            "ip addr add {far}/30 dev up0 && ip link set up0 up"
        ))
        .expect("upstream side");
        let addr = SocketAddr::from((far, 53));
        let (udp, tcp) = netns::run_in(&ns.path(), move || {
            (
                std::net::UdpSocket::bind(addr).expect("upstream UDP"),
                std::net::TcpListener::bind(addr).expect("upstream TCP"),
            )
        })
        .expect("entering the upstream namespace");
        udp.set_nonblocking(true).unwrap();
        tcp.set_nonblocking(true).unwrap();
        let asked = Arc::new(AtomicUsize::new(0));
        let server = {
            let _entered = rt.enter();
            let mut s = hickory_server::Server::new(UpstreamHandler {
                asked: asked.clone(),
            });
            s.register_socket(tokio::net::UdpSocket::from_std(udp).unwrap());
            s.register_listener(tokio::net::TcpListener::from_std(tcp).unwrap(), ARRIVE, 8);
            s
        };
        Upstream {
            addr,
            asked,
            server: Some(server),
            rt: rt.handle().clone(),
            _ns: ns,
        }
    }

    fn asked(&self) -> usize {
        self.asked.load(Ordering::SeqCst)
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        if let Some(mut s) = self.server.take() {
            let _ = self.rt.block_on(s.shutdown_gracefully());
        }
    }
}

/// Answers `example.com. A` and `alias.example.com.` (a CNAME into atoll's suffix, plus a
/// forged A record for its target); counts every question.
struct UpstreamHandler {
    asked: Arc<AtomicUsize>,
}

#[async_trait::async_trait]
impl RequestHandler for UpstreamHandler {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        mut response: R,
    ) -> ResponseInfo {
        self.asked.fetch_add(1, Ordering::SeqCst);
        let name = |s: &str| Name::from_ascii(s).unwrap();
        let mut answers = Vec::new();
        let mut rcode = ResponseCode::NXDomain;
        if let Ok(info) = request.request_info() {
            let q = info.query.name().to_string().to_lowercase();
            if q == "example.com." {
                answers.push(RR::from_rdata(
                    name("example.com."),
                    60,
                    RData::A(A(UPSTREAM_ANSWER)),
                ));
                rcode = ResponseCode::NoError;
            } else if q == "alias.example.com." {
                let target = name("web.one.atoll.internal.");
                answers.push(RR::from_rdata(
                    name("alias.example.com."),
                    60,
                    RData::CNAME(hickory_proto::rr::rdata::CNAME(target.clone())),
                ));
                answers.push(RR::from_rdata(target, 60, RData::A(A(INJECTED))));
                rcode = ResponseCode::NoError;
            }
        }
        let mut metadata = hickory_proto::op::Metadata::response_from_request(&request.metadata);
        metadata.response_code = rcode;
        metadata.recursion_available = true;
        metadata.op_code = OpCode::Query;
        let msg = MessageResponseBuilder::new(&request.queries, None).build(
            metadata,
            answers.iter(),
            std::iter::empty(),
            std::iter::empty(),
            std::iter::empty(),
        );
        response
            .send_response(msg)
            .await
            .expect("the upstream's answer is sent")
    }
}
