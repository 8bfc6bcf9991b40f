//! The DNS server: hickory-server with a request handler that answers from the asking
//! endpoint's view, and a small forwarder for names outside the suffix.
//!
//! Decisions:
//! - **Identity from the source address.** Every query reaches the server from the proxy
//!   address of the asking endpoint's counter slot (`from_vm` wrote it; see the `dns` module),
//!   so `slot = source − proxy_base`. Any other source is refused.
//! - **Answers fit the path.** UDP answers are limited to the client's EDNS size, capped at
//!   [`MAX_UDP_PAYLOAD`] (1232 bytes, the DNS Flag Day 2020 value): IPv4 + UDP + 1232 bytes
//!   never needs fragmenting on a 1280-byte path, and the dataplane does not translate
//!   fragments. Larger answers are truncated and the client retries over TCP.
//! - **Forwarding** is a plain stub exchange, one upstream after the other, each with
//!   [`FORWARD_TIMEOUT`]: a fresh socket per query (random source port) and a random message id,
//!   TCP when the UDP answer is truncated. Sockets are made on the agent's runtime, i.e. in the
//!   host's network namespace. Records in the upstream answer whose owner is under the global
//!   suffix or the asker's apex are removed, so an upstream can never inject names into a
//!   cloud's horizon. Forwarded answers are not authoritative and carry RA.
//! - Malformed queries are answered by hickory (FORMERR) or dropped when not even the header
//!   parses; nothing here panics on input. Opcodes other than QUERY get NOTIMP, classes other
//!   than IN and zone transfers REFUSED.

use std::{
    io, iter,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    time::Duration,
};

use hickory_proto::{
    op::{
        Edns, Header, HeaderCounts, LowerQuery, Message, MessageType, Metadata, OpCode, Query,
        ResponseCode,
    },
    rr::{DNSClass, LowerName, Name, RData, Record as RR, RecordType},
};
use hickory_server::{
    net::{runtime::Time, NetError},
    server::{Request, RequestHandler, ResponseHandler, ResponseInfo},
    zone_handler::MessageResponseBuilder,
    Server,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::view::{synthetic_soa, CompiledZone, DnsView, ForwardPolicy};
use crate::types::CloudId;

/// Largest UDP answer the server sends (see module docs).
pub const MAX_UDP_PAYLOAD: u16 = 1232;
/// How long one upstream may take to answer a forwarded question.
pub const FORWARD_TIMEOUT: Duration = Duration::from_secs(2);
/// An idle TCP client is disconnected after this long.
pub const TCP_IDLE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("binding the DNS server's sockets: {0}")]
    Bind(#[source] super::PlaneError),
    #[error("registering the DNS server's {protocol} socket with the runtime: {source}")]
    Register {
        protocol: &'static str,
        source: io::Error,
    },
    #[error("invalid DNS suffix: {0}")]
    Suffix(#[source] super::ZoneError),
    #[error("stopping the DNS server: {0}")]
    Shutdown(#[source] NetError),
}

/// What the handler needs to know besides the view.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Global suffix, e.g. `atoll.internal.` (see `dns.suffix`).
    pub suffix: String,
    /// Proxy address of slot 0.
    pub proxy_base: Ipv4Addr,
    /// Number of proxy addresses.
    pub proxy_count: u32,
}

/// A running DNS server. Dropping it leaves its tasks running until the runtime stops; call
/// [`DnsServer::shutdown`] to stop it.
pub struct DnsServer {
    server: Server<Handler>,
    udp: SocketAddr,
    tcp: SocketAddr,
}

impl std::fmt::Debug for DnsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DnsServer").finish_non_exhaustive()
    }
}

impl DnsServer {
    /// Opens the server's sockets in the DNS namespace of `plane` and serves `view` on the
    /// current tokio runtime.
    pub fn start(plane: &super::DnsPlane, view: DnsView) -> Result<Self, ServerError> {
        let (udp, tcp) = plane.bind_sockets().map_err(ServerError::Bind)?;
        Self::serve(udp, tcp, plane.settings(), view)
    }

    /// Serves `view` on already bound sockets (in whatever namespace they were made). Must be
    /// called inside a tokio runtime.
    pub fn serve(
        udp: std::net::UdpSocket,
        tcp: std::net::TcpListener,
        settings: Settings,
        view: DnsView,
    ) -> Result<Self, ServerError> {
        let handler = Handler::new(view, &settings)?;
        let register = |protocol| move |source| ServerError::Register { protocol, source };
        let udp_addr = udp.local_addr().map_err(register("UDP"))?;
        let tcp_addr = tcp.local_addr().map_err(register("TCP"))?;
        udp.set_nonblocking(true).map_err(register("UDP"))?;
        tcp.set_nonblocking(true).map_err(register("TCP"))?;
        let udp = tokio::net::UdpSocket::from_std(udp).map_err(register("UDP"))?;
        let tcp = tokio::net::TcpListener::from_std(tcp).map_err(register("TCP"))?;
        let mut server = Server::new(handler);
        server.register_socket(udp);
        server.register_listener(tcp, TCP_IDLE_TIMEOUT, 32);
        Ok(DnsServer {
            server,
            udp: udp_addr,
            tcp: tcp_addr,
        })
    }

    /// Where it listens (inside the DNS namespace): UDP and TCP.
    pub fn local_addrs(&self) -> (SocketAddr, SocketAddr) {
        (self.udp, self.tcp)
    }

    /// Stops accepting queries and waits for the server's tasks to end.
    pub async fn shutdown(mut self) -> Result<(), ServerError> {
        self.server
            .shutdown_gracefully()
            .await
            .map_err(ServerError::Shutdown)
    }
}

/// The answer to one question, before it is encoded.
enum Outcome {
    /// From a zone (or the suffix): authoritative.
    Authoritative {
        rcode: ResponseCode,
        answers: Vec<RR>,
        soa: Option<Box<RR>>,
    },
    Error(ResponseCode),
    /// Ask these upstreams, for this cloud (whose policy may learn the answer).
    Forward(Vec<SocketAddr>, CloudId),
}

struct Handler {
    view: DnsView,
    suffix: LowerName,
    suffix_soa: RR,
    proxy_base: u32,
    proxy_count: u32,
}

impl Handler {
    fn new(view: DnsView, settings: &Settings) -> Result<Self, ServerError> {
        let suffix = super::parse_suffix(&settings.suffix).map_err(ServerError::Suffix)?;
        Ok(Handler {
            view,
            suffix_soa: synthetic_soa(&suffix, 1),
            suffix: LowerName::new(&suffix),
            proxy_base: u32::from(settings.proxy_base),
            proxy_count: settings.proxy_count,
        })
    }

    /// The counter slot a query came from, if the source is a proxy address.
    fn slot_of(&self, src: SocketAddr) -> Option<u32> {
        let IpAddr::V4(ip) = src.ip() else {
            return None;
        };
        let slot = u32::from(ip).wrapping_sub(self.proxy_base);
        (slot < self.proxy_count).then_some(slot)
    }

    /// Decides the answer to `query` asked from `src`.
    fn decide(&self, src: SocketAddr, query: &LowerQuery) -> (Outcome, Option<LowerName>) {
        let (qname, qtype) = (query.name(), query.query_type());
        if query.query_class() != DNSClass::IN
            || matches!(qtype, RecordType::AXFR | RecordType::IXFR)
        {
            return (Outcome::Error(ResponseCode::Refused), None);
        }
        let Some((cloud, zone)) = self.slot_of(src).and_then(|s| self.view.lookup_slot(s)) else {
            return (Outcome::Error(ResponseCode::Refused), None);
        };
        let apex = zone.as_ref().map(|z| z.apex().clone());
        if let Some(zone) = zone.as_deref().filter(|z| z.apex().zone_of(qname)) {
            return (answer_from_zone(zone, qname, qtype), apex);
        }
        if self.suffix.zone_of(qname) {
            // Inside the suffix but not in the asker's zone. Ancestors of the asker's apex (and
            // the suffix itself) exist as empty non-terminals; answering NXDOMAIN for them would
            // tell an RFC 8020 resolver that nothing exists below, the asker's zone included.
            let ancestor = qname == &self.suffix || apex.as_ref().is_some_and(|a| qname.zone_of(a));
            let (rcode, answers) = if !ancestor {
                (ResponseCode::NXDomain, Vec::new())
            } else if qname == &self.suffix && matches!(qtype, RecordType::SOA | RecordType::ANY) {
                (ResponseCode::NoError, vec![self.suffix_soa.clone()])
            } else {
                (ResponseCode::NoError, Vec::new())
            };
            let soa = answers
                .is_empty()
                .then(|| Box::new(self.suffix_soa.clone()));
            return (
                Outcome::Authoritative {
                    rcode,
                    answers,
                    soa,
                },
                apex,
            );
        }
        match self.view.forward_policy() {
            ForwardPolicy::Refuse => (Outcome::Error(ResponseCode::Refused), apex),
            // Not allowed by the cloud's egress policy: never asked upstream.
            ForwardPolicy::Forward(_)
                if self
                    .view
                    .egress_of(cloud)
                    .is_some_and(|e| !e.allows(&qname.to_string())) =>
            {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs());
                self.view.deny(cloud, &qname.to_string(), now);
                (Outcome::Error(ResponseCode::Refused), apex)
            }
            ForwardPolicy::Forward(upstreams) => (Outcome::Forward(upstreams.clone(), cloud), apex),
        }
    }

    /// True for names no upstream may supply: the suffix and the asker's zone.
    fn protected(&self, name: &Name, apex: Option<&LowerName>) -> bool {
        let name = LowerName::new(name);
        self.suffix.zone_of(&name) || apex.is_some_and(|a| a.zone_of(&name))
    }
}

fn answer_from_zone(zone: &CompiledZone, qname: &LowerName, qtype: RecordType) -> Outcome {
    let l = zone.lookup(qname, qtype);
    Outcome::Authoritative {
        rcode: l.rcode,
        answers: l.answers,
        soa: l.soa.map(Box::new),
    }
}

#[async_trait::async_trait]
impl RequestHandler for Handler {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        response: R,
    ) -> ResponseInfo {
        let mut response_edns = Edns::new();
        let edns = match request.edns.as_ref() {
            Some(req) => {
                response_edns.set_max_payload(req.max_payload().clamp(512, MAX_UDP_PAYLOAD));
                response_edns.set_version(0);
                if req.version() > 0 {
                    return send_error(
                        request,
                        ResponseCode::BADVERS,
                        Some(&response_edns),
                        response,
                    )
                    .await;
                }
                Some(&response_edns)
            }
            None => None,
        };
        if request.metadata.message_type != MessageType::Query {
            return send_error(request, ResponseCode::FormErr, edns, response).await;
        }
        if request.metadata.op_code != OpCode::Query {
            return send_error(request, ResponseCode::NotImp, edns, response).await;
        }
        let Ok(info) = request.request_info() else {
            return send_error(request, ResponseCode::FormErr, edns, response).await;
        };
        let (outcome, apex) = self.decide(request.src(), info.query);
        match outcome {
            Outcome::Error(rcode) => send_error(request, rcode, edns, response).await,
            Outcome::Authoritative {
                rcode,
                answers,
                soa,
            } => {
                let mut metadata = Metadata::response_from_request(&request.metadata);
                metadata.authoritative = true;
                metadata.response_code = rcode;
                metadata.recursion_available =
                    matches!(self.view.forward_policy(), ForwardPolicy::Forward(_));
                let message = MessageResponseBuilder::new(&request.queries, edns).build(
                    metadata,
                    answers.iter(),
                    iter::empty(),
                    soa.as_deref(),
                    iter::empty(),
                );
                send(request, message, response).await
            }
            Outcome::Forward(upstreams, cloud) => match forward(&upstreams, info.query.original())
                .await
            {
                None => send_error(request, ResponseCode::ServFail, edns, response).await,
                Some(upstream) => {
                    let keep = |r: &&RR| !self.protected(&r.name, apex.as_ref());
                    let answers: Vec<&RR> = upstream.answers.iter().filter(keep).collect();
                    if self.view.egress_of(cloud).is_some_and(|e| e.learns()) {
                        let addresses: Vec<(Ipv4Addr, u32)> = answers
                            .iter()
                            .filter_map(|r| match &r.data {
                                RData::A(a) => Some((a.0, r.ttl)),
                                _ => None,
                            })
                            .collect();
                        self.view.learn(
                            cloud,
                            &info.query.name().to_string(),
                            &addresses,
                            std::time::Instant::now(),
                        );
                    }
                    let authorities: Vec<&RR> = upstream.authorities.iter().filter(keep).collect();
                    let additionals: Vec<&RR> = upstream.additionals.iter().filter(keep).collect();
                    let mut metadata = Metadata::response_from_request(&request.metadata);
                    metadata.recursion_available = true;
                    // Only the 4-bit code: extended codes live in the upstream's EDNS.
                    metadata.response_code =
                        ResponseCode::from_low(upstream.metadata.response_code.low());
                    let message = MessageResponseBuilder::new(&request.queries, edns).build(
                        metadata,
                        answers,
                        authorities,
                        iter::empty(),
                        additionals,
                    );
                    send(request, message, response).await
                }
            },
        }
    }
}

async fn send<'a, R: ResponseHandler>(
    request: &Request,
    message: hickory_server::zone_handler::MessageResponse<
        '_,
        'a,
        impl Iterator<Item = &'a RR> + Send + 'a,
        impl Iterator<Item = &'a RR> + Send + 'a,
        impl Iterator<Item = &'a RR> + Send + 'a,
        impl Iterator<Item = &'a RR> + Send + 'a,
    >,
    mut response: R,
) -> ResponseInfo {
    match response.send_response(message).await {
        Ok(info) => info,
        Err(_) => serve_failed(request),
    }
}

async fn send_error<R: ResponseHandler>(
    request: &Request,
    rcode: ResponseCode,
    edns: Option<&Edns>,
    mut response: R,
) -> ResponseInfo {
    let mut high;
    let edns = match edns {
        Some(e) if rcode.high() != 0 => {
            high = e.clone();
            high.set_rcode_high(rcode.high());
            Some(&high)
        }
        other => other,
    };
    let message =
        MessageResponseBuilder::new(&request.queries, edns).error_msg(&request.metadata, rcode);
    match response.send_response(message).await {
        Ok(info) => info,
        Err(_) => serve_failed(request),
    }
}

/// What is reported when even sending failed (the client gets nothing).
fn serve_failed(request: &Request) -> ResponseInfo {
    let mut metadata = Metadata::new(
        request.metadata.id,
        MessageType::Response,
        request.metadata.op_code,
    );
    metadata.response_code = ResponseCode::ServFail;
    ResponseInfo::from(Header {
        metadata,
        counts: HeaderCounts::default(),
    })
}

/// Asks the upstreams in order; the first valid answer wins.
async fn forward(upstreams: &[SocketAddr], question: &Query) -> Option<Message> {
    let mut message = Message::query();
    message.metadata.recursion_desired = true;
    let mut q = Query::query(question.name().clone(), question.query_type());
    q.set_query_class(DNSClass::IN);
    message.add_query(q);
    let mut edns = Edns::new();
    edns.set_max_payload(MAX_UDP_PAYLOAD);
    message.set_edns(edns);
    let bytes = message.to_vec().ok()?;
    for upstream in upstreams {
        let udp = tokio::time::timeout(FORWARD_TIMEOUT, exchange_udp(*upstream, &bytes, &message));
        let answer = match udp.await {
            Ok(Ok(a)) if a.metadata.truncation => {
                tokio::time::timeout(FORWARD_TIMEOUT, exchange_tcp(*upstream, &bytes, &message))
                    .await
            }
            other => other,
        };
        if let Ok(Ok(answer)) = answer {
            return Some(answer);
        }
    }
    None
}

/// True if `answer` answers `query` (same id and question).
fn answers(query: &Message, answer: &Message) -> bool {
    answer.metadata.message_type == MessageType::Response
        && answer.metadata.id == query.metadata.id
        && answer.queries.len() == 1
        && query.queries.first().is_some_and(|q| {
            let a = &answer.queries[0];
            LowerName::new(a.name()) == LowerName::new(q.name()) && a.query_type() == q.query_type()
        })
}

async fn exchange_udp(upstream: SocketAddr, bytes: &[u8], query: &Message) -> io::Result<Message> {
    let local: SocketAddr = if upstream.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let socket = tokio::net::UdpSocket::bind(local).await?;
    socket.connect(upstream).await?;
    socket.send(bytes).await?;
    let mut buf = vec![0u8; 65535];
    loop {
        let n = socket.recv(&mut buf).await?;
        // Anything else arriving on the connected socket (late or forged) is ignored.
        if let Ok(answer) = Message::from_vec(&buf[..n]) {
            if answers(query, &answer) {
                return Ok(answer);
            }
        }
    }
}

async fn exchange_tcp(upstream: SocketAddr, bytes: &[u8], query: &Message) -> io::Result<Message> {
    let mut stream = tokio::net::TcpStream::connect(upstream).await?;
    let len = u16::try_from(bytes.len()).map_err(io::Error::other)?;
    let mut framed = len.to_be_bytes().to_vec();
    framed.extend_from_slice(bytes);
    stream.write_all(&framed).await?;
    let mut len = [0u8; 2];
    stream.read_exact(&mut len).await?;
    let mut buf = vec![0u8; usize::from(u16::from_be_bytes(len))];
    stream.read_exact(&mut buf).await?;
    let answer = Message::from_vec(&buf).map_err(io::Error::other)?;
    if answers(query, &answer) {
        Ok(answer)
    } else {
        Err(io::Error::other(
            "the upstream's answer does not match the question",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dns::view::{Record, RecordData, Zone};

    fn handler(forward: ForwardPolicy) -> Handler {
        let view = DnsView::new(forward);
        let (c1, c2) = (CloudId::new(1).unwrap(), CloudId::new(2).unwrap());
        view.set_endpoint(0, c1);
        view.set_endpoint(5, c2);
        view.set_endpoint(6, CloudId::new(3).unwrap());
        for (cloud, apex, ip) in [
            (c1, "one.atoll.internal.", 2),
            (c2, "two.atoll.internal.", 3),
        ] {
            view.set_zone(
                cloud,
                Zone {
                    apex: apex.into(),
                    records: vec![Record {
                        name: format!("vm.{apex}"),
                        ttl: 5,
                        data: RecordData::A(Ipv4Addr::new(10, 0, 0, ip)),
                    }],
                },
            )
            .unwrap();
        }
        Handler::new(
            view,
            &Settings {
                suffix: "Atoll.Internal".into(),
                proxy_base: Ipv4Addr::new(100, 127, 0, 0),
                proxy_count: 16,
            },
        )
        .unwrap()
    }

    fn ask(h: &Handler, slot: u32, name: &str, ty: RecordType) -> Outcome {
        let src = SocketAddr::from((
            Ipv4Addr::from(u32::from(Ipv4Addr::new(100, 127, 0, 0)) + slot),
            4000,
        ));
        let q = LowerQuery::from(Query::query(Name::from_ascii(name).unwrap(), ty));
        h.decide(src, &q).0
    }

    fn rcode(o: &Outcome) -> (ResponseCode, usize) {
        match o {
            Outcome::Authoritative { rcode, answers, .. } => (*rcode, answers.len()),
            Outcome::Error(c) => (*c, 0),
            Outcome::Forward(..) => panic!("forwarded"),
        }
    }

    #[test]
    fn split_horizon_by_slot() {
        let h = handler(ForwardPolicy::Refuse);
        assert_eq!(
            rcode(&ask(&h, 0, "vm.one.atoll.internal.", RecordType::A)),
            (ResponseCode::NoError, 1)
        );
        assert_eq!(
            rcode(&ask(&h, 5, "vm.two.atoll.internal.", RecordType::A)),
            (ResponseCode::NoError, 1)
        );
        // Another cloud's names do not exist, whether they exist there or not.
        assert_eq!(
            rcode(&ask(&h, 0, "vm.two.atoll.internal.", RecordType::A)),
            (ResponseCode::NXDomain, 0)
        );
        assert_eq!(
            rcode(&ask(&h, 5, "vm.one.atoll.internal.", RecordType::A)),
            (ResponseCode::NXDomain, 0)
        );
        assert_eq!(
            rcode(&ask(&h, 0, "x.atoll.internal.", RecordType::A)),
            (ResponseCode::NXDomain, 0)
        );
        // A cloud without a zone sees only NXDOMAIN under the suffix.
        assert_eq!(
            rcode(&ask(&h, 6, "vm.one.atoll.internal.", RecordType::A)),
            (ResponseCode::NXDomain, 0)
        );
        // The suffix and the apex's ancestors exist (empty), so RFC 8020 caches stay correct.
        assert_eq!(
            rcode(&ask(&h, 0, "atoll.internal.", RecordType::A)),
            (ResponseCode::NoError, 0)
        );
        assert_eq!(
            rcode(&ask(&h, 0, "ATOLL.internal.", RecordType::SOA)),
            (ResponseCode::NoError, 1)
        );
        // External names are refused; unknown slots and other classes too.
        assert_eq!(
            rcode(&ask(&h, 0, "example.com.", RecordType::A)),
            (ResponseCode::Refused, 0)
        );
        assert_eq!(
            rcode(&ask(&h, 1, "vm.one.atoll.internal.", RecordType::A)),
            (ResponseCode::Refused, 0)
        );
        assert_eq!(
            rcode(&ask(&h, 16, "vm.one.atoll.internal.", RecordType::A)),
            (ResponseCode::Refused, 0)
        );
        assert_eq!(
            rcode(&ask(&h, 0, "one.atoll.internal.", RecordType::AXFR)),
            (ResponseCode::Refused, 0)
        );
        let src = SocketAddr::from((Ipv4Addr::new(10, 0, 0, 2), 4000));
        let q = LowerQuery::from(Query::query(
            Name::from_ascii("vm.one.atoll.internal.").unwrap(),
            RecordType::A,
        ));
        assert_eq!(rcode(&h.decide(src, &q).0), (ResponseCode::Refused, 0));
        let mut chaos = Query::query(Name::from_ascii("version.bind.").unwrap(), RecordType::TXT);
        chaos.set_query_class(DNSClass::CH);
        let src = SocketAddr::from((Ipv4Addr::new(100, 127, 0, 0), 4000));
        assert_eq!(
            rcode(&h.decide(src, &LowerQuery::from(chaos)).0),
            (ResponseCode::Refused, 0)
        );
    }

    /// With egress policies set, only the names a cloud's policy allows are forwarded; a cloud
    /// whose policy this host does not know keeps the host's forwarding.
    #[test]
    fn egress_policies_decide_what_is_forwarded() {
        use atoll_api::model::{EgressMode, EgressPolicy};
        let up: SocketAddr = "192.0.2.53:53".parse().unwrap();
        let h = handler(ForwardPolicy::Forward(vec![up]));
        let policy =
            |json: serde_json::Value| -> EgressPolicy { serde_json::from_value(json).unwrap() };
        h.view.set_egress(
            CloudId::new(1).unwrap(),
            &policy(serde_json::json!({"mode": "allowlist", "allow": [
                {"domain": "api.example.com"}, {"domain": "*.pypi.org"}, {"cidr": "198.18.0.0/15"}
            ]})),
        );
        h.view.set_egress(
            CloudId::new(2).unwrap(),
            &EgressPolicy {
                mode: EgressMode::Deny,
                ..EgressPolicy::deny_all()
            },
        );
        let forwarded =
            |slot, name| matches!(ask(&h, slot, name, RecordType::A), Outcome::Forward(..));
        for (name, allowed) in [
            ("api.example.com.", true),
            ("API.Example.COM.", true),
            ("files.pypi.org.", true),
            ("a.b.pypi.org.", true),
            ("pypi.org.", false),
            ("evilpypi.org.", false),
            ("example.com.", false),
            ("x.api.example.com.", false),
        ] {
            assert_eq!(forwarded(0, name), allowed, "cloud 1: {name}");
        }
        assert_eq!(
            rcode(&ask(&h, 0, "example.com.", RecordType::A)),
            (ResponseCode::Refused, 0)
        );
        assert!(!forwarded(5, "api.example.com."), "cloud 2 is deny");
        assert!(
            forwarded(6, "anything.example."),
            "cloud 3: no policy known"
        );
        // Own zones are answered whatever the policy.
        assert_eq!(
            rcode(&ask(&h, 5, "vm.two.atoll.internal.", RecordType::A)),
            (ResponseCode::NoError, 1)
        );
        h.view.set_egress(
            CloudId::new(2).unwrap(),
            &policy(serde_json::json!({"mode": "allow"})),
        );
        assert!(forwarded(5, "api.example.com."), "cloud 2 is now allow");
        h.view.remove_egress(CloudId::new(1).unwrap());
        assert!(forwarded(0, "example.com."), "cloud 1's policy forgotten");
    }

    #[test]
    fn forwarding_only_outside_the_suffix() {
        let up: SocketAddr = "192.0.2.53:53".parse().unwrap();
        let h = handler(ForwardPolicy::Forward(vec![up]));
        assert!(
            matches!(ask(&h, 0, "example.com.", RecordType::A), Outcome::Forward(u, _) if u == vec![up])
        );
        assert_eq!(
            rcode(&ask(&h, 0, "vm.two.atoll.internal.", RecordType::A)),
            (ResponseCode::NXDomain, 0)
        );
        assert_eq!(
            rcode(&ask(&h, 9, "example.com.", RecordType::A)),
            (ResponseCode::Refused, 0)
        );
        let apex = LowerName::new(&Name::from_ascii("one.atoll.internal.").unwrap());
        for (name, protected) in [
            ("vm.one.atoll.internal.", true),
            ("evil.atoll.internal.", true),
            ("example.com.", false),
        ] {
            assert_eq!(
                h.protected(&Name::from_ascii(name).unwrap(), Some(&apex)),
                protected,
                "{name}"
            );
        }
    }
}
