//! Raw Ethernet/IPv4/UDP and TCP frames for tests that play a VM on a tap or hand the programs
//! crafted frames: build a frame with correct checksums, parse one back and check its
//! checksums, read one from a tap with a timeout. Test code only; the dataplane never uses it.

pub mod layers;

use std::{
    net::Ipv4Addr,
    os::fd::{AsRawFd, OwnedFd},
    time::Duration,
};

/// The Internet checksum (RFC 1071) of `data`: 0 when `data` includes a correct checksum.
pub fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

pub const IPPROTO_TCP: u8 = layers::PROTO_TCP;
pub const IPPROTO_UDP: u8 = layers::PROTO_UDP;

/// The pseudo header of `protocol` between `src` and `dst`, followed by the segment `l4`: the
/// bytes a UDP or TCP checksum covers.
pub fn pseudo(
    src: impl Into<Ipv4Addr>,
    dst: impl Into<Ipv4Addr>,
    protocol: u8,
    l4: &[u8],
) -> Vec<u8> {
    let mut p = src.into().octets().to_vec();
    p.extend_from_slice(&dst.into().octets());
    p.extend_from_slice(&[0, protocol]);
    p.extend_from_slice(&(l4.len() as u16).to_be_bytes());
    p.extend_from_slice(l4);
    p
}

/// An Ethernet frame carrying option-free IPv4 (id 0x1234, DF, TTL 64, header checksum set)
/// with `l4` as payload.
fn ipv4_frame(
    dst_mac: [u8; 6],
    src_mac: [u8; 6],
    src: Ipv4Addr,
    dst: Ipv4Addr,
    protocol: u8,
    l4: &[u8],
) -> Vec<u8> {
    layers::ethernet(
        dst_mac,
        src_mac,
        layers::ETH_P_IP,
        &layers::ipv4(src, dst, 64, protocol, l4),
    )
}

/// True if `data`, its checksum field included, sums to all ones (what a receiver checks).
pub fn checksum_verifies(data: &[u8]) -> bool {
    checksum(data) == 0
}

/// The checksum at byte `at` (2 bytes) of `data`, recomputed from scratch.
pub fn recomputed(data: &[u8], at: usize) -> u16 {
    let mut copy = data.to_vec();
    copy[at..at + 2].copy_from_slice(&[0, 0]);
    checksum(&copy)
}

/// Rewrites the TTL of the IPv4 frame `f` and recomputes its header checksum.
pub fn set_ttl(f: &mut [u8], ttl: u8) {
    f[22] = ttl;
    refresh_ipv4_checksum(f);
}

/// Recomputes the IPv4 header checksum of `f` (option-free IPv4 behind Ethernet) in place.
pub fn refresh_ipv4_checksum(f: &mut [u8]) {
    f[24..26].copy_from_slice(&[0, 0]);
    let c = checksum(&f[14..34]);
    f[24..26].copy_from_slice(&c.to_be_bytes());
}

/// One UDP datagram's addressing.
#[derive(Debug, Clone, Copy)]
pub struct Udp {
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub sport: u16,
    pub dport: u16,
}

impl Udp {
    /// An Ethernet frame carrying `payload`, with IPv4 header and UDP checksums set.
    pub fn frame(&self, payload: &[u8]) -> Vec<u8> {
        ipv4_frame(
            self.dst_mac,
            self.src_mac,
            self.src,
            self.dst,
            IPPROTO_UDP,
            &layers::udp(self.src, self.dst, self.sport, self.dport, payload),
        )
    }
}

/// TCP flag bits (the 14th header byte).
pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_PSH: u8 = 0x08;
pub const TCP_ACK: u8 = 0x10;

/// One TCP segment's addressing and the header fields that matter to tests (20-byte header
/// without options, window 64240, urgent pointer 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tcp {
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub sport: u16,
    pub dport: u16,
    pub seq: u32,
    pub ack: u32,
    /// `TCP_SYN | TCP_ACK` etc.
    pub flags: u8,
}

impl Tcp {
    /// A SYN from `sport` to `dport` (sequence number 0x1234_5678, no ACK).
    pub fn syn(
        src_mac: [u8; 6],
        dst_mac: [u8; 6],
        (src, sport): (Ipv4Addr, u16),
        (dst, dport): (Ipv4Addr, u16),
    ) -> Self {
        Tcp {
            src_mac,
            dst_mac,
            src,
            dst,
            sport,
            dport,
            seq: 0x1234_5678,
            ack: 0,
            flags: TCP_SYN,
        }
    }

    /// The TCP segment alone (header and `payload`) with its checksum set.
    pub fn segment(&self, payload: &[u8]) -> Vec<u8> {
        layers::TcpHeader {
            sport: self.sport,
            dport: self.dport,
            seq: self.seq,
            ack: self.ack,
            flags: self.flags,
            options: Vec::new(),
        }
        .segment(self.src, self.dst, payload)
    }

    /// An Ethernet frame carrying the segment, with IPv4 header and TCP checksums set.
    pub fn frame(&self, payload: &[u8]) -> Vec<u8> {
        ipv4_frame(
            self.dst_mac,
            self.src_mac,
            self.src,
            self.dst,
            IPPROTO_TCP,
            &self.segment(payload),
        )
    }
}

/// A parsed TCP frame and whether its checksums verify.
pub struct ParsedTcp<'a> {
    pub addr: Tcp,
    pub ttl: u8,
    pub ip_checksum_ok: bool,
    pub tcp_checksum: u16,
    pub tcp_checksum_ok: bool,
    pub payload: &'a [u8],
}

impl<'a> std::fmt::Debug for ParsedTcp<'a> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ParsedTcp").finish_non_exhaustive()
    }
}

/// Parses an Ethernet frame carrying option-free IPv4 TCP (TCP options are skipped).
pub fn parse_tcp(f: &[u8]) -> Result<ParsedTcp<'_>, &'static str> {
    let (ip, src, dst, tcp) = ipv4_transport(f, IPPROTO_TCP, 20)?;
    let header = usize::from(tcp[12] >> 4) * 4;
    if header < 20 || header > tcp.len() {
        return Err("bad TCP data offset");
    }
    Ok(ParsedTcp {
        addr: Tcp {
            dst_mac: f[0..6].try_into().expect("6 bytes"),
            src_mac: f[6..12].try_into().expect("6 bytes"),
            src,
            dst,
            sport: u16::from_be_bytes([tcp[0], tcp[1]]),
            dport: u16::from_be_bytes([tcp[2], tcp[3]]),
            seq: u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]),
            ack: u32::from_be_bytes([tcp[8], tcp[9], tcp[10], tcp[11]]),
            flags: tcp[13],
        },
        ttl: ip[8],
        ip_checksum_ok: checksum(&ip[..20]) == 0,
        tcp_checksum: u16::from_be_bytes([tcp[16], tcp[17]]),
        tcp_checksum_ok: checksum(&pseudo(src, dst, IPPROTO_TCP, tcp)) == 0,
        payload: &tcp[header..],
    })
}

/// The IPv4 header, addresses and transport bytes (up to the IPv4 total length) of an
/// Ethernet frame carrying option-free IPv4 with `protocol` and at least `l4_min` bytes of it.
#[allow(clippy::type_complexity)]
fn ipv4_transport(
    f: &[u8],
    protocol: u8,
    l4_min: usize,
) -> Result<(&[u8], Ipv4Addr, Ipv4Addr, &[u8]), &'static str> {
    if f.len() < 14 + 20 + l4_min || f[12..14] != [0x08, 0x00] {
        return Err("not IPv4 with room for the transport header");
    }
    let ip = &f[14..];
    if ip[0] != 0x45 || ip[9] != protocol {
        return Err("not option-free IPv4 of the expected protocol");
    }
    let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    if total > ip.len() || total < 20 + l4_min {
        return Err("bad total length");
    }
    let src = Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
    let dst = Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]);
    Ok((ip, src, dst, &ip[20..total]))
}

/// A parsed UDP frame and whether its checksums verify.
pub struct Parsed<'a> {
    pub addr: Udp,
    pub ttl: u8,
    pub ip_checksum_ok: bool,
    pub udp_checksum: u16,
    pub udp_checksum_ok: bool,
    pub payload: &'a [u8],
}

impl<'a> std::fmt::Debug for Parsed<'a> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Parsed").finish_non_exhaustive()
    }
}

/// Parses an Ethernet frame carrying option-free IPv4 UDP.
pub fn parse_udp(f: &[u8]) -> Result<Parsed<'_>, &'static str> {
    let (ip, src, dst, udp) = ipv4_transport(f, IPPROTO_UDP, 8)?;
    let len = usize::from(u16::from_be_bytes([udp[4], udp[5]]));
    if len < 8 || len > udp.len() {
        return Err("bad UDP length");
    }
    Ok(Parsed {
        addr: Udp {
            dst_mac: f[0..6].try_into().expect("6 bytes"),
            src_mac: f[6..12].try_into().expect("6 bytes"),
            src,
            dst,
            sport: u16::from_be_bytes([udp[0], udp[1]]),
            dport: u16::from_be_bytes([udp[2], udp[3]]),
        },
        ttl: ip[8],
        ip_checksum_ok: checksum(&ip[..20]) == 0,
        udp_checksum: u16::from_be_bytes([udp[6], udp[7]]),
        udp_checksum_ok: checksum(&pseudo(src, dst, IPPROTO_UDP, &udp[..len])) == 0,
        payload: &udp[8..len],
    })
}

/// An ICMP echo request frame of exactly `size` bytes from `src` to `dst` via the gateway MAC.
pub fn echo_frame(
    src_mac: atoll_agent::types::MacAddr,
    gw_mac: atoll_agent::types::MacAddr,
    src: Ipv4Addr,
    dst: Ipv4Addr,
    size: usize,
) -> Vec<u8> {
    let csum = checksum;
    let mut f = vec![0u8; size];
    f[0..6].copy_from_slice(&gw_mac.0);
    f[6..12].copy_from_slice(&src_mac.0);
    f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    let ip_len = (size - 14) as u16;
    f[14] = 0x45;
    f[16..18].copy_from_slice(&ip_len.to_be_bytes());
    f[22] = 64;
    f[23] = 1;
    f[26..30].copy_from_slice(&src.octets());
    f[30..34].copy_from_slice(&dst.octets());
    let c = csum(&f[14..34]);
    f[24..26].copy_from_slice(&c.to_be_bytes());
    f[34] = 8;
    let c = csum(&f[34..]);
    f[36..38].copy_from_slice(&c.to_be_bytes());
    f
}

/// Writes one frame to a tap queue; panics (test code) if the kernel takes less.
pub fn write_frame(fd: &OwnedFd, frame: &[u8]) {
    // SAFETY: `frame` is valid for its length and `fd` is an open tap queue.
    let n = unsafe { libc::write(fd.as_raw_fd(), frame.as_ptr().cast(), frame.len()) };
    assert_eq!(n, frame.len() as isize, "writing a frame to the tap");
}

/// The next frame on a tap queue, or `None` if none arrives within `timeout`.
pub fn read_frame(fd: &OwnedFd, timeout: Duration) -> Option<Vec<u8>> {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
    // SAFETY: one valid pollfd, bounded timeout.
    if unsafe { libc::poll(&mut pfd, 1, ms) } != 1 {
        return None;
    }
    let mut buf = vec![0u8; 65536];
    // SAFETY: `buf` is valid for its length.
    let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
    (n > 0).then(|| {
        buf.truncate(n as usize);
        buf
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_frames_parse_back_with_valid_checksums() {
        let addr = Udp {
            src_mac: [2, 0, 0, 0, 0, 1],
            dst_mac: [2, 0, 0, 0, 0, 2],
            src: Ipv4Addr::new(10, 0, 0, 2),
            dst: Ipv4Addr::new(10, 0, 0, 1),
            sport: 40000,
            dport: 53,
        };
        let f = addr.frame(b"odd");
        let p = parse_udp(&f).unwrap();
        assert!(p.ip_checksum_ok && p.udp_checksum_ok);
        assert_eq!(
            (p.addr.src, p.addr.dport, p.payload),
            (addr.src, 53, &b"odd"[..])
        );
        let mut bad = f.clone();
        bad[f.len() - 1] ^= 1;
        assert!(!parse_udp(&bad).unwrap().udp_checksum_ok);
        assert!(parse_udp(&f[..30]).is_err());
    }

    #[test]
    fn built_tcp_frames_parse_back_with_valid_checksums() {
        let mut seg = Tcp::syn(
            [2, 0, 0, 0, 0, 1],
            [2, 0, 0, 0, 0, 2],
            (Ipv4Addr::new(10, 0, 0, 2), 40000),
            (Ipv4Addr::new(10, 0, 0, 3), 80),
        );
        seg.flags = TCP_PSH | TCP_ACK;
        seg.ack = 0xdead_beef;
        let mut f = seg.frame(b"odd");
        let p = parse_tcp(&f).unwrap();
        assert!(p.ip_checksum_ok && p.tcp_checksum_ok);
        assert_eq!((p.addr, p.ttl, p.payload), (seg, 64, &b"odd"[..]));
        set_ttl(&mut f, 9);
        let p = parse_tcp(&f).unwrap();
        assert!(p.ip_checksum_ok && p.ttl == 9);
        let mut bad = f.clone();
        bad[f.len() - 1] ^= 1;
        assert!(!parse_tcp(&bad).unwrap().tcp_checksum_ok);
        assert!(parse_tcp(&f[..50]).is_err());
        assert!(parse_udp(&f).is_err(), "TCP is not UDP");
    }
}
