//! A test's own internet: the network namespace an agent under test runs in ("the host"), whose
//! only uplink is a veth into a second namespace ("the world") that routes the test range
//! 198.18.0.0/15 and holds the servers a test talks to. Nothing in it can reach the machine's
//! real network: the host namespace is new (no route but the uplink), and the world has no
//! link but its end of the uplink.
//!
//! Addresses (all inside 198.18.0.0/15, the benchmarking range of RFC 2544):
//! - the uplink's network 198.18.0.0/24: the host's end [`HOST_IP`], the world's [`ROUTER_IP`]
//!   (the host's default gateway);
//! - servers on the world's loopback, in 198.19.0.0/24 ([`Internet::add_server`]): an echo
//!   service ([`Echo`], TCP and UDP on one port) and a DNS server ([`Upstream`]) that answers A
//!   questions for the names it is given and records every question it is asked, so a test
//!   can check what was (and was not) forwarded to it.
//!
//! Every server runs on threads that entered the world namespace and stops on drop; the
//! namespaces (and so the veth) go with the [`Internet`].

use std::{
    collections::HashMap,
    io::{self, Read, Write},
    net::{Ipv4Addr, SocketAddrV4, TcpListener, UdpSocket},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    thread,
    time::Duration,
};

use crate::{guest::spawn_in_netns, unique_name, NetNs};

/// The host's end of the uplink.
pub const HOST_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
/// The world's end of the uplink: the host's default gateway.
pub const ROUTER_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
/// The host's uplink device (inside the host namespace, so the name cannot collide).
pub const UPLINK: &str = "uplink0";

/// The host and world namespaces, joined by the uplink.
#[derive(Debug)]
pub struct Internet {
    /// Where the agent under test runs: its uplink is [`UPLINK`] at [`HOST_IP`]/24.
    pub host: NetNs,
    /// The internet: [`ROUTER_IP`] and the servers.
    pub world: NetNs,
}

impl Internet {
    /// Builds both namespaces (named with `tag`, see [`unique_name`]) and the uplink.
    pub fn build(tag: &str) -> io::Result<Self> {
        let host = NetNs::new(&unique_name(tag))?;
        let world = NetNs::new(&unique_name(tag))?;
        host.sh(&format!(
            "ip link add {UPLINK} type veth peer name eth0 netns {world} && \
             ip addr add {HOST_IP}/24 dev {UPLINK} && ip link set {UPLINK} up && \
             ip route add default via {ROUTER_IP} dev {UPLINK}",
            world = world.name()
        ))?;
        world.sh(&format!(
            "ip addr add {ROUTER_IP}/24 dev eth0 && ip link set eth0 up && \
             echo 1 > /proc/sys/net/ipv4/ip_forward"
        ))?;
        Ok(Internet { host, world })
    }

    /// Gives the world an address for a server (on its loopback, so it answers from there).
    pub fn add_server(&self, ip: Ipv4Addr) -> io::Result<()> {
        assert!(
            ip.octets()[..2] == [198, 19],
            "servers live in 198.19.0.0/16, inside the test's range"
        );
        self.world
            .exec(&["ip", "addr", "add", &format!("{ip}/32"), "dev", "lo"])?;
        Ok(())
    }

    /// Puts a server address behind a narrower link: a third namespace ("far", returned)
    /// joined to the world by a veth of `mtu` bytes (198.18.2.1 on the world's end, 198.18.2.2
    /// on the far end), `ip` on its loopback and routed by the world through it. A packet
    /// larger than `mtu` with DF set makes the world (a router) send "fragmentation needed"
    /// back to its source: path MTU discovery across the host's NAT. The far end advertises
    /// a TCP MSS of 1460 all the same (as a server whose narrow link is further away would),
    /// so a client's full-size segments meet the narrow link.
    pub fn add_far_server(&self, tag: &str, ip: Ipv4Addr, mtu: u32) -> io::Result<NetNs> {
        assert!(
            ip.octets()[..2] == [198, 19],
            "servers live in 198.19.0.0/16, inside the test's range"
        );
        let far = NetNs::new(&unique_name(tag))?;
        self.world.sh(&format!(
            "ip link add far0 mtu {mtu} type veth peer name eth0 mtu {mtu} netns {far} && \
             ip addr add 198.18.2.1/30 dev far0 && ip link set far0 up && \
             ip route add {ip}/32 via 198.18.2.2 dev far0",
            far = far.name()
        ))?;
        far.sh(&format!(
            "ip addr add 198.18.2.2/30 dev eth0 && ip link set eth0 up && \
             ip link set lo up && ip addr add {ip}/32 dev lo && \
             ip route add default via 198.18.2.1 dev eth0 advmss 1460"
        ))?;
        Ok(far)
    }

    /// Sets the MTU of the world's end of the uplink (for path-MTU tests; the host's end keeps
    /// its own).
    pub fn set_world_mtu(&self, mtu: u32) -> io::Result<()> {
        self.world
            .exec(&["ip", "link", "set", "eth0", "mtu", &mtu.to_string()])?;
        Ok(())
    }
}

/// Threads serving inside a namespace until dropped.
#[derive(Debug)]
struct Serving {
    stop: Arc<AtomicBool>,
    threads: Vec<thread::JoinHandle<()>>,
}

/// How often a server thread checks whether it should stop.
const POLL: Duration = Duration::from_millis(50);

impl Drop for Serving {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Binds `what` inside `ns` on a thread there and returns it (sockets keep their namespace).
fn bind_in<T: Send + 'static>(
    ns: &NetNs,
    what: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    spawn_in_netns(ns, what)
        .join()
        .map_err(|_| io::Error::other("binding in the namespace panicked"))?
}

/// An echo server on `addr`, TCP and UDP: every datagram is sent back to its sender, every
/// TCP connection gets back what it sends until it closes. Counts what it received.
#[derive(Debug)]
pub struct Echo {
    pub addr: SocketAddrV4,
    /// Bytes received over TCP and UDP.
    pub received: Arc<Mutex<u64>>,
    /// The sources of the UDP datagrams and TCP connections, as the server saw them.
    pub peers: Arc<Mutex<Vec<SocketAddrV4>>>,
    _serving: Serving,
}

impl Echo {
    pub fn start(internet: &Internet, addr: SocketAddrV4) -> io::Result<Self> {
        Self::start_in(&internet.world, addr)
    }

    /// An echo server in `ns` (the world, or a server namespace such as
    /// [`Internet::add_far_server`]'s).
    pub fn start_in(ns: &NetNs, addr: SocketAddrV4) -> io::Result<Self> {
        let udp = bind_in(ns, move || UdpSocket::bind(addr))?;
        let tcp = bind_in(ns, move || TcpListener::bind(addr))?;
        udp.set_read_timeout(Some(POLL))?;
        tcp.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let received = Arc::new(Mutex::new(0u64));
        let peers = Arc::new(Mutex::new(Vec::new()));
        let mut threads = Vec::new();
        {
            let (stop, received, peers) = (stop.clone(), received.clone(), peers.clone());
            threads.push(thread::spawn(move || {
                let mut buf = vec![0u8; 65536];
                while !stop.load(Ordering::Relaxed) {
                    let Ok((n, from)) = udp.recv_from(&mut buf) else {
                        continue;
                    };
                    *received.lock().expect("echo lock") += n as u64;
                    if let std::net::SocketAddr::V4(v4) = from {
                        peers.lock().expect("echo lock").push(v4);
                    }
                    let _ = udp.send_to(&buf[..n], from);
                }
            }));
        }
        {
            let (stop, received, peers) = (stop.clone(), received.clone(), peers.clone());
            threads.push(thread::spawn(move || {
                let mut conns = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    match tcp.accept() {
                        Ok((mut s, from)) => {
                            if let std::net::SocketAddr::V4(v4) = from {
                                peers.lock().expect("echo lock").push(v4);
                            }
                            let (stop, received) = (stop.clone(), received.clone());
                            conns.push(thread::spawn(move || {
                                let _ = s.set_read_timeout(Some(POLL));
                                let mut buf = vec![0u8; 65536];
                                while !stop.load(Ordering::Relaxed) {
                                    match s.read(&mut buf) {
                                        Ok(0) => break,
                                        Ok(n) => {
                                            *received.lock().expect("echo lock") += n as u64;
                                            if s.write_all(&buf[..n]).is_err() {
                                                break;
                                            }
                                        }
                                        Err(e)
                                            if matches!(
                                                e.kind(),
                                                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                                            ) => {}
                                        Err(_) => break,
                                    }
                                }
                            }));
                        }
                        Err(_) => thread::sleep(POLL / 5),
                    }
                }
                for c in conns {
                    let _ = c.join();
                }
            }));
        }
        Ok(Echo {
            addr,
            received,
            peers,
            _serving: Serving { stop, threads },
        })
    }
}

/// A DNS server on `addr` (UDP) that answers A questions for the names it holds with their
/// addresses and TTL, NXDOMAIN for other names, and records every question (lower-case name
/// without the final dot) in the order asked.
#[derive(Debug)]
pub struct Upstream {
    pub addr: SocketAddrV4,
    pub asked: Arc<Mutex<Vec<String>>>,
    _serving: Serving,
}

impl Upstream {
    pub fn start(
        internet: &Internet,
        addr: SocketAddrV4,
        names: &[(&str, &[Ipv4Addr], u32)],
    ) -> io::Result<Self> {
        let sock = bind_in(&internet.world, move || UdpSocket::bind(addr))?;
        sock.set_read_timeout(Some(POLL))?;
        let table: HashMap<String, (Vec<Ipv4Addr>, u32)> = names
            .iter()
            .map(|(n, ips, ttl)| {
                (
                    n.trim_end_matches('.').to_ascii_lowercase(),
                    (ips.to_vec(), *ttl),
                )
            })
            .collect();
        let stop = Arc::new(AtomicBool::new(false));
        let asked = Arc::new(Mutex::new(Vec::new()));
        let thread = {
            let (stop, asked) = (stop.clone(), asked.clone());
            thread::spawn(move || {
                let mut buf = vec![0u8; 1500];
                while !stop.load(Ordering::Relaxed) {
                    let Ok((n, from)) = sock.recv_from(&mut buf) else {
                        continue;
                    };
                    let Some(q) = dns::parse_query(&buf[..n]) else {
                        continue;
                    };
                    asked.lock().expect("upstream lock").push(q.name.clone());
                    let answer = match table.get(&q.name) {
                        Some((ips, ttl)) if q.qtype == dns::TYPE_A => {
                            dns::answer(&buf[..n], &q, ips, *ttl, dns::RCODE_OK)
                        }
                        Some(_) => dns::answer(&buf[..n], &q, &[], 0, dns::RCODE_OK),
                        None => dns::answer(&buf[..n], &q, &[], 0, dns::RCODE_NXDOMAIN),
                    };
                    let _ = sock.send_to(&answer, from);
                }
            })
        };
        Ok(Upstream {
            addr,
            asked,
            _serving: Serving {
                stop,
                threads: vec![thread],
            },
        })
    }
}

/// Just enough of the DNS wire format for [`Upstream`] and the tests' own questions.
pub mod dns {
    use std::net::Ipv4Addr;

    pub const TYPE_A: u16 = 1;
    pub const RCODE_OK: u8 = 0;
    pub const RCODE_NXDOMAIN: u8 = 3;

    /// The one question of a query.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct Question {
        /// Lower case, without the final dot.
        pub name: String,
        pub qtype: u16,
        /// Where the question ends in the message (header + question).
        pub end: usize,
    }

    /// A query with id `id` for `name`'s A records, recursion desired.
    pub fn query(id: u16, name: &str) -> Vec<u8> {
        let mut m = Vec::new();
        m.extend_from_slice(&id.to_be_bytes());
        m.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
        for label in name.trim_end_matches('.').split('.') {
            m.push(label.len() as u8);
            m.extend_from_slice(label.as_bytes());
        }
        m.extend_from_slice(&[0, 0, 1, 0, 1]);
        m
    }

    /// The question of a one-question query, if `m` is one.
    pub fn parse_query(m: &[u8]) -> Option<Question> {
        if m.len() < 12 || m[2] & 0x80 != 0 || u16::from_be_bytes([m[4], m[5]]) != 1 {
            return None;
        }
        let mut at = 12;
        let mut labels = Vec::new();
        loop {
            let len = *m.get(at)? as usize;
            at += 1;
            if len == 0 {
                break;
            }
            if len > 63 {
                return None;
            }
            labels.push(String::from_utf8_lossy(m.get(at..at + len)?).to_ascii_lowercase());
            at += len;
        }
        let qtype = u16::from_be_bytes([*m.get(at)?, *m.get(at + 1)?]);
        m.get(at + 3)?;
        Some(Question {
            name: labels.join("."),
            qtype,
            end: at + 4,
        })
    }

    /// The answer to `query` (its question `q`): `ips` as A records with `ttl`, and `rcode`.
    pub fn answer(query: &[u8], q: &Question, ips: &[Ipv4Addr], ttl: u32, rcode: u8) -> Vec<u8> {
        let mut m = query[..q.end].to_vec();
        // QR, opcode and RD copied, RA set; no authority or additional records.
        m[2] = 0x80 | (query[2] & 0x79);
        m[3] = 0x80 | rcode;
        m[6..8].copy_from_slice(&(ips.len() as u16).to_be_bytes());
        m[8..12].copy_from_slice(&[0, 0, 0, 0]);
        for ip in ips {
            // The question's name by a pointer to offset 12.
            m.extend_from_slice(&[0xC0, 12, 0, 1, 0, 1]);
            m.extend_from_slice(&ttl.to_be_bytes());
            m.extend_from_slice(&[0, 4]);
            m.extend_from_slice(&ip.octets());
        }
        m
    }

    /// The rcode and A records (with TTLs) of an answer to a query made by [`query`] for
    /// `name`, if `m` is one.
    pub fn parse_answer(m: &[u8], id: u16) -> Option<(u8, Vec<(Ipv4Addr, u32)>)> {
        if m.len() < 12 || u16::from_be_bytes([m[0], m[1]]) != id || m[2] & 0x80 == 0 {
            return None;
        }
        let q = parse_query(&{
            let mut as_query = m.to_vec();
            as_query[2] &= 0x7F;
            as_query
        })?;
        let count = u16::from_be_bytes([m[6], m[7]]) as usize;
        let mut at = q.end;
        let mut out = Vec::new();
        for _ in 0..count {
            // A pointer (2 bytes) or a name (labels up to a zero byte).
            if *m.get(at)? & 0xC0 == 0xC0 {
                at += 2;
            } else {
                while *m.get(at)? != 0 {
                    at += 1 + *m.get(at)? as usize;
                }
                at += 1;
            }
            let rtype = u16::from_be_bytes([*m.get(at)?, *m.get(at + 1)?]);
            let ttl = u32::from_be_bytes(m.get(at + 4..at + 8)?.try_into().ok()?);
            let len = u16::from_be_bytes([*m.get(at + 8)?, *m.get(at + 9)?]) as usize;
            let data = m.get(at + 10..at + 10 + len)?;
            if rtype == TYPE_A && len == 4 {
                out.push((Ipv4Addr::new(data[0], data[1], data[2], data[3]), ttl));
            }
            at += 10 + len;
        }
        Some((m[3] & 0x0F, out))
    }
}
