//! Frames built and parsed layer by layer (Ethernet, ARP, IPv4, UDP, TCP, ICMP) for the
//! end-to-end suites that play guests on taps and the verdict suites that hand the programs
//! crafted frames: [`ethernet`] around [`ipv4`] (or an [`Ipv4Packet`] with any header) around
//! [`udp`], and `parse_*` back, with [`describe`] for failure messages; [`l4_checksum`] is what
//! a UDP or TCP header must carry. The Internet checksum itself is the parent module's.

use super::checksum;

use std::net::Ipv4Addr;

pub type Mac = [u8; 6];

pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_ARP: u16 = 0x0806;
pub const ETH_P_IPV6: u16 = 0x86DD;
/// An 802.1Q VLAN tag.
pub const ETH_P_8021Q: u16 = 0x8100;
/// An 802.1ad (QinQ) service tag.
pub const ETH_P_8021AD: u16 = 0x88A8;
pub const PROTO_ICMP: u8 = 1;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const BROADCAST: Mac = [0xff; 6];

/// Where the checksum of a UDP datagram (byte 6) or TCP segment (byte 16) sits.
pub fn l4_checksum_offset(protocol: u8) -> usize {
    match protocol {
        PROTO_UDP => 6,
        PROTO_TCP => 16,
        _ => panic!("protocol {protocol} is neither UDP nor TCP"),
    }
}

/// The checksum the UDP datagram or TCP segment `l4` must carry from `src` to `dst` (pseudo
/// header included), computed as if its checksum field were 0, whatever it holds; UDP sends a
/// computed 0 as 0xFFFF.
pub fn l4_checksum(
    src: impl Into<Ipv4Addr>,
    dst: impl Into<Ipv4Addr>,
    protocol: u8,
    l4: &[u8],
) -> u16 {
    let at = l4_checksum_offset(protocol);
    let mut sum = super::pseudo(src, dst, protocol, l4);
    sum[12 + at..12 + at + 2].copy_from_slice(&[0, 0]);
    match checksum(&sum) {
        0 if protocol == PROTO_UDP => 0xFFFF,
        c => c,
    }
}

pub fn ethernet(dst: Mac, src: Mac, ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(14 + payload.len());
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

pub fn arp(
    op: u16,
    sha: Mac,
    spa: impl Into<Ipv4Addr>,
    tha: Mac,
    tpa: impl Into<Ipv4Addr>,
) -> Vec<u8> {
    let (spa, tpa) = (spa.into(), tpa.into());
    let mut a = vec![0, 1, 0x08, 0x00, 6, 4];
    a.extend_from_slice(&op.to_be_bytes());
    a.extend_from_slice(&sha);
    a.extend_from_slice(&spa.octets());
    a.extend_from_slice(&tha);
    a.extend_from_slice(&tpa.octets());
    a
}

/// An IPv4 packet without options, DF set, id 0x1234, with a valid header checksum.
pub fn ipv4(
    src: impl Into<Ipv4Addr>,
    dst: impl Into<Ipv4Addr>,
    ttl: u8,
    protocol: u8,
    payload: &[u8],
) -> Vec<u8> {
    let (src, dst) = (src.into(), dst.into());
    Ipv4Packet {
        id: 0x1234,
        ttl,
        ..Ipv4Packet::new(src.octets(), dst.octets(), protocol, payload.to_vec())
    }
    .bytes()
}

/// An IPv4 packet with every header field settable, also to values no sender should use
/// (verdict tests build malformed packets with it); [`Ipv4Packet::bytes`] computes the header
/// checksum over whatever the fields say.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ipv4Packet {
    pub version: u8,
    /// `None`: 5 + options / 4.
    pub ihl: Option<u8>,
    pub tos: u8,
    /// `None`: header + options + payload.
    pub total_len: Option<u16>,
    pub id: u16,
    pub frag_off: u16,
    pub ttl: u8,
    pub protocol: u8,
    pub src: [u8; 4],
    pub dst: [u8; 4],
    /// Whole 32-bit words.
    pub options: Vec<u8>,
    pub payload: Vec<u8>,
}

impl Ipv4Packet {
    /// Version 4, no options, id 0x1c46, DF, TTL 64.
    pub fn new(src: [u8; 4], dst: [u8; 4], protocol: u8, payload: Vec<u8>) -> Self {
        Ipv4Packet {
            version: 4,
            ihl: None,
            tos: 0,
            total_len: None,
            id: 0x1c46,
            frag_off: 0x4000,
            ttl: 64,
            protocol,
            src,
            dst,
            options: Vec::new(),
            payload,
        }
    }

    /// The header (with options) and its checksum.
    pub fn header(&self) -> Vec<u8> {
        assert_eq!(self.options.len() % 4, 0, "options must be whole words");
        let ihl = self.ihl.unwrap_or(5 + (self.options.len() / 4) as u8);
        let total = self
            .total_len
            .unwrap_or((20 + self.options.len() + self.payload.len()) as u16);
        let mut h = vec![(self.version << 4) | (ihl & 0x0F), self.tos];
        h.extend_from_slice(&total.to_be_bytes());
        h.extend_from_slice(&self.id.to_be_bytes());
        h.extend_from_slice(&self.frag_off.to_be_bytes());
        h.extend_from_slice(&[self.ttl, self.protocol, 0, 0]);
        h.extend_from_slice(&self.src);
        h.extend_from_slice(&self.dst);
        h.extend_from_slice(&self.options);
        let c = checksum(&h);
        h[10..12].copy_from_slice(&c.to_be_bytes());
        h
    }

    /// Header and payload.
    pub fn bytes(&self) -> Vec<u8> {
        let mut b = self.header();
        b.extend_from_slice(&self.payload);
        b
    }
}

pub fn udp(
    src: impl Into<Ipv4Addr>,
    dst: impl Into<Ipv4Addr>,
    sport: u16,
    dport: u16,
    payload: &[u8],
) -> Vec<u8> {
    let len = 8 + payload.len();
    let mut u = Vec::with_capacity(len);
    u.extend_from_slice(&sport.to_be_bytes());
    u.extend_from_slice(&dport.to_be_bytes());
    u.extend_from_slice(&(len as u16).to_be_bytes());
    u.extend_from_slice(&[0, 0]);
    u.extend_from_slice(payload);
    let c = l4_checksum(src, dst, PROTO_UDP, &u);
    u[6..8].copy_from_slice(&c.to_be_bytes());
    u
}

/// A TCP header's fields (window 64240, urgent pointer 0); [`TcpHeader::segment`] builds the
/// segment with its checksum.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TcpHeader {
    pub sport: u16,
    pub dport: u16,
    pub seq: u32,
    pub ack: u32,
    /// `TCP_SYN | TCP_ACK` etc. (the parent module's constants).
    pub flags: u8,
    /// Whole 32-bit words.
    pub options: Vec<u8>,
}

impl TcpHeader {
    /// The segment (header, options, `payload`) from `src` to `dst`, checksum set.
    pub fn segment(
        &self,
        src: impl Into<Ipv4Addr>,
        dst: impl Into<Ipv4Addr>,
        payload: &[u8],
    ) -> Vec<u8> {
        assert_eq!(self.options.len() % 4, 0, "options must be whole words");
        let words = 5 + self.options.len() / 4;
        let mut s = self.sport.to_be_bytes().to_vec();
        s.extend_from_slice(&self.dport.to_be_bytes());
        s.extend_from_slice(&self.seq.to_be_bytes());
        s.extend_from_slice(&self.ack.to_be_bytes());
        s.extend_from_slice(&[(words as u8) << 4, self.flags]);
        s.extend_from_slice(&64240u16.to_be_bytes());
        s.extend_from_slice(&[0, 0, 0, 0]);
        s.extend_from_slice(&self.options);
        s.extend_from_slice(payload);
        let c = l4_checksum(src, dst, PROTO_TCP, &s);
        s[16..18].copy_from_slice(&c.to_be_bytes());
        s
    }
}

pub fn icmp(ty: u8, code: u8, id: u16, seq: u16, payload: &[u8]) -> Vec<u8> {
    let mut m = vec![ty, code, 0, 0];
    m.extend_from_slice(&id.to_be_bytes());
    m.extend_from_slice(&seq.to_be_bytes());
    m.extend_from_slice(payload);
    let c = checksum(&m);
    m[2..4].copy_from_slice(&c.to_be_bytes());
    m
}

#[derive(Debug)]
pub struct Eth<'a> {
    pub dst: Mac,
    pub src: Mac,
    pub ethertype: u16,
    pub payload: &'a [u8],
}

pub fn parse_eth(f: &[u8]) -> Option<Eth<'_>> {
    if f.len() < 14 {
        return None;
    }
    Some(Eth {
        dst: f[0..6].try_into().ok()?,
        src: f[6..12].try_into().ok()?,
        ethertype: u16::from_be_bytes([f[12], f[13]]),
        payload: &f[14..],
    })
}

#[derive(Debug, PartialEq, Eq)]
pub struct Arp {
    pub op: u16,
    pub sha: Mac,
    pub spa: Ipv4Addr,
    pub tha: Mac,
    pub tpa: Ipv4Addr,
}

/// Ethernet/IPv4 ARP only.
pub fn parse_arp(p: &[u8]) -> Option<Arp> {
    if p.len() < 28 || p[0..6] != [0, 1, 0x08, 0x00, 6, 4] {
        return None;
    }
    let ip = |o: usize| Ipv4Addr::new(p[o], p[o + 1], p[o + 2], p[o + 3]);
    Some(Arp {
        op: u16::from_be_bytes([p[6], p[7]]),
        sha: p[8..14].try_into().ok()?,
        spa: ip(14),
        tha: p[18..24].try_into().ok()?,
        tpa: ip(24),
    })
}

#[derive(Debug)]
pub struct Ipv4<'a> {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub ttl: u8,
    pub protocol: u8,
    pub header_checksum_ok: bool,
    /// Up to `total_length` (Ethernet padding excluded).
    pub payload: &'a [u8],
}

/// IPv4 without options only.
pub fn parse_ipv4(p: &[u8]) -> Option<Ipv4<'_>> {
    if p.len() < 20 || p[0] != 0x45 {
        return None;
    }
    let total = usize::from(u16::from_be_bytes([p[2], p[3]]));
    if total < 20 || total > p.len() {
        return None;
    }
    Some(Ipv4 {
        src: Ipv4Addr::new(p[12], p[13], p[14], p[15]),
        dst: Ipv4Addr::new(p[16], p[17], p[18], p[19]),
        ttl: p[8],
        protocol: p[9],
        header_checksum_ok: checksum(&p[..20]) == 0,
        payload: &p[20..total],
    })
}

#[derive(Debug)]
pub struct Udp<'a> {
    pub sport: u16,
    pub dport: u16,
    pub checksum: u16,
    pub checksum_ok: bool,
    pub payload: &'a [u8],
}

pub fn parse_udp<'a>(ip: &Ipv4<'a>) -> Option<Udp<'a>> {
    let u = ip.payload;
    if ip.protocol != PROTO_UDP || u.len() < 8 {
        return None;
    }
    let len = usize::from(u16::from_be_bytes([u[4], u[5]]));
    if len < 8 || len > u.len() {
        return None;
    }
    Some(Udp {
        sport: u16::from_be_bytes([u[0], u[1]]),
        dport: u16::from_be_bytes([u[2], u[3]]),
        checksum: u16::from_be_bytes([u[6], u[7]]),
        checksum_ok: checksum(&super::pseudo(ip.src, ip.dst, PROTO_UDP, &u[..len])) == 0,
        payload: &u[8..len],
    })
}

#[derive(Debug)]
pub struct Icmp<'a> {
    pub ty: u8,
    pub code: u8,
    pub id: u16,
    pub seq: u16,
    pub checksum_ok: bool,
    pub payload: &'a [u8],
}

pub fn parse_icmp<'a>(ip: &Ipv4<'a>) -> Option<Icmp<'a>> {
    let m = ip.payload;
    if ip.protocol != PROTO_ICMP || m.len() < 8 {
        return None;
    }
    Some(Icmp {
        ty: m[0],
        code: m[1],
        id: u16::from_be_bytes([m[4], m[5]]),
        seq: u16::from_be_bytes([m[6], m[7]]),
        checksum_ok: checksum(m) == 0,
        payload: &m[8..],
    })
}

pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

fn mac(m: &Mac) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// A one-line summary for failure messages.
pub fn describe(f: &[u8]) -> String {
    let Some(eth) = parse_eth(f) else {
        return format!("a {}-byte runt", f.len());
    };
    let head = format!(
        "{} -> {} type {:#06x}",
        mac(&eth.src),
        mac(&eth.dst),
        eth.ethertype
    );
    if let Some(a) = parse_arp(eth.payload).filter(|_| eth.ethertype == ETH_P_ARP) {
        return format!("{head} ARP op {} {} asks/tells {}", a.op, a.spa, a.tpa);
    }
    match parse_ipv4(eth.payload).filter(|_| eth.ethertype == ETH_P_IP) {
        Some(ip) => format!(
            "{head} IPv4 {} -> {} ttl {} proto {} ({} bytes)",
            ip.src,
            ip.dst,
            ip.ttl,
            ip.protocol,
            ip.payload.len()
        ),
        None => format!("{head} ({} bytes)", f.len()),
    }
}

#[test]
fn checksums_verify_to_zero() {
    let p = ipv4(
        Ipv4Addr::new(10, 0, 0, 2),
        Ipv4Addr::new(10, 0, 0, 3),
        64,
        PROTO_UDP,
        &udp(
            Ipv4Addr::new(10, 0, 0, 2),
            Ipv4Addr::new(10, 0, 0, 3),
            1,
            2,
            b"odd",
        ),
    );
    let ip = parse_ipv4(&p).expect("ipv4");
    assert!(ip.header_checksum_ok);
    let u = parse_udp(&ip).expect("udp");
    assert!(u.checksum_ok);
    assert_eq!(
        l4_checksum(ip.src, ip.dst, PROTO_UDP, ip.payload),
        u.checksum
    );
    let tcp = TcpHeader {
        sport: 1,
        dport: 2,
        seq: 3,
        ack: 4,
        flags: 0x10,
        options: Vec::new(),
    }
    .segment(ip.src, ip.dst, b"odd");
    let at = l4_checksum_offset(PROTO_TCP);
    assert_eq!(
        l4_checksum(ip.src, ip.dst, PROTO_TCP, &tcp).to_be_bytes(),
        tcp[at..at + 2]
    );
    assert_eq!(checksum(&super::pseudo(ip.src, ip.dst, PROTO_TCP, &tcp)), 0);
    let m = icmp(8, 0, 1, 2, b"xyz");
    assert_eq!(checksum(&m), 0);
}
