//! The tests' own internet (`atoll_testbed::internet`) works and is closed: from the host
//! namespace, the echo servers answer over UDP and TCP from the addresses they were given, the
//! DNS upstream answers the names it holds and records every question, the host namespace has
//! no route but its uplink, and nothing is left behind.

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddrV4, TcpStream, UdpSocket},
    time::Duration,
};

use atoll_testbed::{
    guest::in_netns,
    internet::{dns, Echo, Internet, Upstream, HOST_IP, ROUTER_IP, UPLINK},
    leaves_nothing, require_root, unique_prefix,
};

const WEB: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 10);
const RESOLVER: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 53);

#[test]
fn the_tests_internet_serves_and_is_closed() {
    require_root("the internet scene test");
    leaves_nothing(&[unique_prefix("in")], || {
        let net = Internet::build("in").expect("building the internet");
        net.add_server(WEB).unwrap();
        net.add_server(RESOLVER).unwrap();
        let echo = Echo::start(&net, SocketAddrV4::new(WEB, 7)).unwrap();
        let upstream = Upstream::start(
            &net,
            SocketAddrV4::new(RESOLVER, 53),
            &[("pkg.example", &[WEB, Ipv4Addr::new(198, 19, 0, 11)], 30)],
        )
        .unwrap();

        // The host namespace's routes: the uplink's network and the default via the router.
        let routes = net.host.exec(&["ip", "-4", "route", "show"]).unwrap();
        let routes: Vec<&str> = routes.lines().map(str::trim).collect();
        assert_eq!(
            routes,
            vec![
                format!("default via {ROUTER_IP} dev {UPLINK}"),
                format!("198.18.0.0/24 dev {UPLINK} proto kernel scope link src {HOST_IP}"),
            ],
            "the host namespace routes only through its uplink"
        );

        let (udp_reply, udp_local, tcp_reply, dns_answers) = in_netns(&net.host, || {
            let timeout = Some(Duration::from_secs(5));
            let udp = UdpSocket::bind("0.0.0.0:0").unwrap();
            udp.set_read_timeout(timeout).unwrap();
            udp.send_to(b"hello over udp", (WEB, 7)).unwrap();
            let mut buf = [0u8; 128];
            let (n, from) = udp.recv_from(&mut buf).unwrap();
            assert_eq!(from, (WEB, 7).into());
            let udp_reply = buf[..n].to_vec();
            let udp_local = udp.local_addr().unwrap();

            let mut tcp =
                TcpStream::connect_timeout(&(WEB, 7).into(), Duration::from_secs(5)).unwrap();
            tcp.set_read_timeout(timeout).unwrap();
            tcp.write_all(b"hello over tcp").unwrap();
            let mut tcp_reply = [0u8; 14];
            tcp.read_exact(&mut tcp_reply).unwrap();

            let resolver = UdpSocket::bind("0.0.0.0:0").unwrap();
            resolver.set_read_timeout(timeout).unwrap();
            let mut answers = Vec::new();
            for (id, name) in [(7u16, "PKG.example."), (8, "other.example")] {
                resolver
                    .send_to(&dns::query(id, name), (RESOLVER, 53))
                    .unwrap();
                let n = resolver.recv(&mut buf).unwrap();
                answers.push(dns::parse_answer(&buf[..n], id).expect("a DNS answer"));
            }
            (udp_reply, udp_local, tcp_reply.to_vec(), answers)
        });
        assert_eq!(udp_reply, b"hello over udp");
        assert_eq!(tcp_reply, b"hello over tcp");
        // The servers saw the host's uplink address: no translation on this path.
        let peers = echo.peers.lock().unwrap().clone();
        assert_eq!(peers.len(), 2, "{peers:?}");
        assert!(peers.iter().all(|p| *p.ip() == HOST_IP), "{peers:?}");
        assert_eq!(peers[0].port(), udp_local.port());
        assert_eq!(*echo.received.lock().unwrap(), 28);
        assert_eq!(
            dns_answers,
            vec![
                (
                    dns::RCODE_OK,
                    vec![(WEB, 30), (Ipv4Addr::new(198, 19, 0, 11), 30)]
                ),
                (dns::RCODE_NXDOMAIN, vec![]),
            ]
        );
        assert_eq!(
            *upstream.asked.lock().unwrap(),
            vec!["pkg.example".to_string(), "other.example".to_string()]
        );
    });
}
