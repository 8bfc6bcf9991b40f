//! Packet access: header layouts, bounds-checked pointers and checksum arithmetic.
//!
//! All header structs are `#[repr(C, packed)]`-free plain byte layouts read through
//! bounds-checked raw pointers; multi-byte fields are kept as byte arrays or read unaligned so
//! nothing depends on the alignment of the frame in memory.

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    programs::TcContext,
};

pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_ARP: u16 = 0x0806;
pub const ETH_P_IPV6: u16 = 0x86DD;
pub const ETH_P_8021Q: u16 = 0x8100;
pub const ETH_P_8021AD: u16 = 0x88A8;
pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;

/// Bytes the programs may read past the start of the frame: Ethernet + IPv4 without options +
/// an ICMP echo header, or Ethernet + ARP. Pulled into the linear area when needed.
const MAX_HEADER_BYTES: u32 = 14 + 20 + 8;

#[repr(C)]
pub struct EthHdr {
    pub dst: [u8; 6],
    pub src: [u8; 6],
    /// Network byte order.
    pub ether_type: u16,
}

impl EthHdr {
    pub const LEN: usize = 14;
}

#[repr(C)]
pub struct Ipv4Hdr {
    pub version_ihl: u8,
    pub tos: u8,
    pub total_len: [u8; 2],
    pub id: [u8; 2],
    pub frag_off: [u8; 2],
    pub ttl: u8,
    pub protocol: u8,
    /// Kept in wire order; see [`csum_add_be`].
    pub check: u16,
    pub saddr: [u8; 4],
    pub daddr: [u8; 4],
}

impl Ipv4Hdr {
    pub const LEN: usize = 20;

    /// Source address in map encoding (see `atoll_dataplane_common::ipv4_to_map`).
    #[inline(always)]
    pub fn saddr(&self) -> u32 {
        u32::from_ne_bytes(self.saddr)
    }

    #[inline(always)]
    pub fn daddr(&self) -> u32 {
        u32::from_ne_bytes(self.daddr)
    }

    #[inline(always)]
    pub fn total_len(&self) -> u16 {
        u16::from_be_bytes(self.total_len)
    }

    /// True for any fragment: more-fragments set or a non-zero offset.
    #[inline(always)]
    pub fn is_fragment(&self) -> bool {
        u16::from_be_bytes(self.frag_off) & 0x3FFF != 0
    }
}

#[repr(C)]
pub struct ArpEthIpv4 {
    pub htype: [u8; 2],
    pub ptype: [u8; 2],
    pub hlen: u8,
    pub plen: u8,
    pub op: [u8; 2],
    pub sha: [u8; 6],
    pub spa: [u8; 4],
    pub tha: [u8; 6],
    pub tpa: [u8; 4],
}

#[repr(C)]
pub struct IcmpEcho {
    pub icmp_type: u8,
    pub code: u8,
    pub check: u16,
    pub id: [u8; 2],
    pub seq: [u8; 2],
}

/// The frame as the program sees it, with its linear bounds.
pub struct Packet {
    start: usize,
    end: usize,
    pub len: u32,
}

impl Packet {
    /// Makes sure the headers the programs read are in the linear area, then captures bounds.
    #[inline(always)]
    pub fn new(ctx: &TcContext) -> Self {
        Self::with_headers(ctx, MAX_HEADER_BYTES)
    }

    /// As [`Packet::new`], with the first `bytes` of the frame (or all of a shorter one) in
    /// the linear area.
    #[inline(always)]
    pub fn with_headers(ctx: &TcContext, bytes: u32) -> Self {
        let len = ctx.len();
        let want = if len < bytes { len } else { bytes };
        if ctx.data_end() - ctx.data() < want as usize {
            // Failure leaves the frame as it was; the bounds checks below then report truncation.
            let _ = ctx.pull_data(want);
        }
        Packet {
            start: ctx.data(),
            end: ctx.data_end(),
            len,
        }
    }

    /// A pointer to a `T` at `offset`, or `None` if the frame is too short.
    #[inline(always)]
    pub fn ptr<T>(&self, offset: usize) -> Option<*mut T> {
        let at = self.start + offset;
        if at + core::mem::size_of::<T>() > self.end {
            return None;
        }
        Some(at as *mut T)
    }
}

/// ifindex of the device the program runs on.
#[inline(always)]
pub fn ifindex(ctx: &TcContext) -> u32 {
    // SAFETY: `ctx.skb.skb` is the kernel-provided context pointer, valid for the whole run.
    unsafe { (*ctx.skb.skb).ifindex }
}

/// True if the skb carries a VLAN tag in its metadata (`__sk_buff.vlan_present`, i.e.
/// `skb->vlan_all != 0`, also for a priority tag with VID 0). On ingress the kernel moves the
/// outer 802.1Q / 802.1ad tag of a frame a guest writes out of the frame and into this
/// metadata (`skb_vlan_untag` in `__netif_receive_skb_core`) before TC runs, so the frame the
/// program sees carries the inner ethertype; on a redirect to a device's egress the kernel
/// writes the tag back into the frame. Only this field tells a tagged frame from an untagged
/// one.
#[inline(always)]
pub fn vlan_tag_in_metadata(ctx: &TcContext) -> bool {
    // SAFETY: `ctx.skb.skb` is the kernel-provided context pointer, valid for the whole run;
    // the verifier rewrites this load into a read of the skb's VLAN metadata.
    unsafe { (*ctx.skb.skb).vlan_present != 0 }
}

/// Copies a MAC address into the frame with six byte stores. A plain `[u8; 6]` assignment
/// compiles to a call into an out-of-line, byte-looping `memmove` subprogram in BPF, which cost
/// about a third of the forwarding path; volatile stores cannot be merged back into one.
#[inline(always)]
pub fn write_mac(dst: *mut [u8; 6], src: &[u8; 6]) {
    let d = dst as *mut u8;
    // SAFETY: `dst` points at six writable bytes of the frame (bounds-checked by the caller).
    unsafe {
        core::ptr::write_volatile(d, src[0]);
        core::ptr::write_volatile(d.add(1), src[1]);
        core::ptr::write_volatile(d.add(2), src[2]);
        core::ptr::write_volatile(d.add(3), src[3]);
        core::ptr::write_volatile(d.add(4), src[4]);
        core::ptr::write_volatile(d.add(5), src[5]);
    }
}

/// Copies four address bytes, as [`write_mac`] (no `memmove` call).
#[inline(always)]
pub fn write_ipv4(dst: *mut [u8; 4], src: [u8; 4]) {
    let d = dst as *mut u8;
    // SAFETY: `dst` points at four writable bytes of the frame (bounds-checked by the caller).
    unsafe {
        core::ptr::write_volatile(d, src[0]);
        core::ptr::write_volatile(d.add(1), src[1]);
        core::ptr::write_volatile(d.add(2), src[2]);
        core::ptr::write_volatile(d.add(3), src[3]);
    }
}

/// Compares two MAC addresses without calling `memcmp` (unavailable in BPF).
#[inline(always)]
pub fn mac_eq(a: &[u8; 6], b: &[u8; 6]) -> bool {
    (a[0] ^ b[0]) | (a[1] ^ b[1]) | (a[2] ^ b[2]) | (a[3] ^ b[3]) | (a[4] ^ b[4]) | (a[5] ^ b[5])
        == 0
}

#[inline(always)]
pub fn is_group_mac(mac: &[u8; 6]) -> bool {
    mac[0] & 1 == 1
}

#[inline(always)]
pub fn is_broadcast_mac(mac: &[u8; 6]) -> bool {
    mac[0] & mac[1] & mac[2] & mac[3] & mac[4] & mac[5] == 0xFF
}

/// Adds `delta` (a 16-bit value in wire order, as read natively from the packet) to an Internet
/// checksum in wire order, with end-around carry, exactly as the kernel's `ip_decrease_ttl`:
/// a sum of 0xFFFF becomes 0 (RFC 1624 section 3; e.g. 0xFEFF + 0x0100 must give 0x0000, not
/// 0xFFFF). Subtracting `x` from the checksummed data equals adding `x` here.
#[inline(always)]
pub fn csum_add_be(check: u16, delta: u16) -> u16 {
    let sum = check as u32 + delta as u32;
    (sum + (sum >= 0xFFFF) as u32) as u16
}

/// Offset of the IPv4 header checksum in the frame.
pub const IPV4_CHECK_OFFSET: usize = EthHdr::LEN + 10;
/// Offset of the transport header (IPv4 options are never accepted on translated paths).
pub const L4_OFFSET: usize = EthHdr::LEN + Ipv4Hdr::LEN;
const UDP_HEADER_LEN: usize = 8;
const TCP_HEADER_LEN: usize = 20;
const UDP_CHECK_OFFSET: usize = L4_OFFSET + 6;
const TCP_CHECK_OFFSET: usize = L4_OFFSET + 16;

/// Source and destination port, the first four bytes of both UDP and TCP headers.
#[repr(C)]
pub struct Ports {
    pub src: [u8; 2],
    pub dst: [u8; 2],
}

/// The transport header's minimum length and checksum offset, for UDP and TCP only.
#[inline(always)]
pub fn l4_layout(protocol: u8) -> Option<(usize, usize)> {
    match protocol {
        IPPROTO_UDP => Some((UDP_HEADER_LEN, UDP_CHECK_OFFSET)),
        IPPROTO_TCP => Some((TCP_HEADER_LEN, TCP_CHECK_OFFSET)),
        _ => None,
    }
}

/// A UDP or TCP packet's transport header, whole in the frame and within the IPv4
/// `total_len`: its checksum offset, its ports and their values as read natively. `None` for
/// another protocol or a header cut short (fragments are the caller's to refuse).
#[inline(always)]
pub fn transport_ports(
    pkt: &Packet,
    protocol: u8,
    total_len: u16,
) -> Option<(usize, *mut Ports, u16, u16)> {
    let (l4_len, check_offset) = l4_layout(protocol)?;
    if (total_len as usize) < Ipv4Hdr::LEN + l4_len {
        return None;
    }
    let ports = pkt.ptr::<Ports>(L4_OFFSET)?;
    // SAFETY: bounds-checked by `Packet::ptr`.
    let (src, dst) = unsafe {
        (
            u16::from_ne_bytes((*ports).src),
            u16::from_ne_bytes((*ports).dst),
        )
    };
    Some((check_offset, ports, src, dst))
}

/// A translation: addresses and ports as `(old, new)`, all as read natively from the frame.
/// For ICMP echo the identifier is the source "port" going out and the destination "port"
/// coming back (the other pair is `(0, 0)`).
pub struct Rewrite {
    pub src: (u32, u32),
    pub dst: (u32, u32),
    pub src_port: (u16, u16),
    pub dst_port: (u16, u16),
}

/// One's-complement addition of two 32-bit partial sums (the kernel's `csum_add`).
#[inline(always)]
fn wsum_add(a: u32, b: u32) -> u32 {
    let (sum, carry) = a.overflowing_add(b);
    sum.wrapping_add(carry as u32)
}

/// Adds the change of a 32-bit field from `from` to `to` to a checksum difference, as
/// `bpf_csum_diff` computes it: `acc + ~from + to`.
#[inline(always)]
fn diff32(acc: u32, (from, to): (u32, u32)) -> u32 {
    if from == to {
        return acc;
    }
    wsum_add(wsum_add(acc, !from), to)
}

/// As [`diff32`] for a 16-bit field at an even offset.
#[inline(always)]
fn diff16(acc: u32, (from, to): (u16, u16)) -> u32 {
    if from == to {
        return acc;
    }
    wsum_add(wsum_add(acc, (!from) as u32), to as u32)
}

/// A checksum in wire order (as read natively) after the data changed by `diff` (RFC 1624:
/// `~(~check + diff)`, folded to 16 bits).
#[inline(always)]
pub fn csum_apply(check: u16, diff: u32) -> u16 {
    let mut sum = wsum_add((!check) as u32, diff);
    sum = (sum & 0xFFFF) + (sum >> 16);
    sum = (sum & 0xFFFF) + (sum >> 16);
    !(sum as u16)
}

/// A checksum (wire order, as read natively) after a 32-bit field changed from `from` to
/// `to` (both as read natively).
#[inline(always)]
pub fn csum_replace4(check: u16, from: u32, to: u32) -> u16 {
    csum_apply(check, diff32(0, (from, to)))
}

/// The checksum differences of a translation, folded to 16 bits, 0 for none (a change whose
/// difference is a one's-complement zero leaves every checksum valid as it is). A flow's
/// translation is the same for each of its packets, so a cached flow keeps these with it.
#[derive(Clone, Copy)]
pub struct Diffs {
    /// The addresses' (IPv4 header and pseudo header).
    pub addresses: u16,
    /// The ports' or ICMP echo identifier's.
    pub ports: u16,
}

impl Diffs {
    #[inline(always)]
    pub fn of(w: &Rewrite) -> Self {
        Diffs {
            addresses: fold(diff32(diff32(0, w.src), w.dst)),
            ports: fold(diff16(diff16(0, w.src_port), w.dst_port)),
        }
    }
}

/// A difference folded to 16 bits, with the one's-complement zeros made 0.
#[inline(always)]
fn fold(diff: u32) -> u16 {
    let mut sum = (diff & 0xFFFF) + (diff >> 16);
    sum = (sum & 0xFFFF) + (sum >> 16);
    ones(sum as u16)
}

/// The IPv4 header's difference for a TTL decrement: the TTL is the first byte of its 16-bit
/// word, the low byte as read natively, so the word as read natively loses 1 (adding
/// 0xFFFE, −1 in one's complement).
const TTL_DECREMENT: u32 = 0xFFFE;

/// Writes a translation into an IPv4 frame: MACs (if given), TTL − 1, addresses and ports
/// (`ports` points at TCP/UDP ports, or at the ICMP echo identifier, of which only `src` is
/// written; only the new values of `w` are used), and the IPv4 header checksum computed here.
/// Then the transport checksum is updated with `d`, the differences of `w`: the addresses' by
/// the kernel's helper (`BPF_F_PSEUDO_HDR`: a frame with a partial checksum carries the
/// pseudo header's sum in that field, which only this call changes), the ports' or
/// identifier's (which a partial checksum does not cover yet) in the program when the
/// helper's result shows which kind of checksum the frame has ([`ports_in_program`]), else by
/// a second call of the helper. ICMP has no pseudo header. False if a helper failed.
///
/// The issue-17 benchmark folded the per-field helper calls (four for two addresses, one
/// per port) into two, then into one; docs/benchmarks.md has the effect.
///
/// # Safety
/// `eth`, `ip` and `ports` are bounds-checked pointers into this frame, and no helper has
/// run since they were derived (the helpers here invalidate them; none is used after).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub unsafe fn rewrite_with(
    ctx: &TcContext,
    eth: *mut EthHdr,
    ip: *mut Ipv4Hdr,
    ports: *mut Ports,
    macs: Option<(&[u8; 6], &[u8; 6])>,
    protocol: u8,
    check_offset: usize,
    w: &Rewrite,
    d: Diffs,
) -> bool {
    // SAFETY: the caller's contract.
    unsafe {
        if let Some((src, dst)) = macs {
            write_mac(&mut (*eth).src, src);
            write_mac(&mut (*eth).dst, dst);
        }
        let h = &mut *ip;
        h.ttl -= 1;
        h.check = csum_apply(h.check, d.addresses as u32 + TTL_DECREMENT);
        write_ipv4(&mut h.saddr, w.src.1.to_ne_bytes());
        write_ipv4(&mut h.daddr, w.dst.1.to_ne_bytes());
        let p = &mut *ports;
        if protocol == IPPROTO_ICMP {
            let id = if w.dst_port.0 == 0 {
                w.src_port.1
            } else {
                w.dst_port.1
            };
            p.src = id.to_ne_bytes();
        } else {
            p.src = w.src_port.1.to_ne_bytes();
            p.dst = w.dst_port.1.to_ne_bytes();
        }
    }
    let flags = l4_flags(protocol, 0);
    if protocol == IPPROTO_ICMP || d.addresses == 0 {
        return d.ports == 0
            || ctx
                .l4_csum_replace(check_offset, 0, d.ports as u64, flags)
                .is_ok();
    }
    let addresses = |ctx: &TcContext| {
        ctx.l4_csum_replace(
            check_offset,
            0,
            d.addresses as u64,
            flags | BPF_F_PSEUDO_HDR as u64,
        )
        .is_ok()
    };
    let ports = |ctx: &TcContext| {
        d.ports == 0
            || ctx
                .l4_csum_replace(check_offset, 0, d.ports as u64, flags)
                .is_ok()
    };
    // A field outside the linear area (which the helper pulls in) takes both helper calls.
    let Some(c) = linear::<u16>(ctx, check_offset) else {
        return addresses(ctx) && ports(ctx);
    };
    // SAFETY: bounds-checked by `linear`, read before any helper runs.
    let before = unsafe { *c };
    addresses(ctx)
        && (d.ports == 0 || ports_in_program(ctx, protocol, check_offset, before, d) || ports(ctx))
}

/// A pointer to a `T` at `offset` of the frame as it is now (after helpers that may have
/// moved it), or `None` if it is not in the linear area.
#[inline(always)]
fn linear<T>(ctx: &TcContext, offset: usize) -> Option<*mut T> {
    let at = ctx.data() + offset;
    if at + core::mem::size_of::<T>() > ctx.data_end() {
        return None;
    }
    Some(at as *mut T)
}

/// A checksum value with 0xFFFF and 0 (the two one's-complement zeros) made one.
#[inline(always)]
fn ones(check: u16) -> u16 {
    if check == 0xFFFF {
        0
    } else {
        check
    }
}

/// A partial checksum (the pseudo header's folded sum, not complemented, as read natively)
/// after the pseudo header changed by `diff`: what `bpf_l4_csum_replace` writes with
/// `BPF_F_PSEUDO_HDR` into a `CHECKSUM_PARTIAL` frame.
#[inline(always)]
fn partial_apply(check: u16, diff: u32) -> u16 {
    let mut sum = wsum_add(check as u32, diff);
    sum = (sum & 0xFFFF) + (sum >> 16);
    sum = (sum & 0xFFFF) + (sum >> 16);
    sum as u16
}

/// Folds the ports' change into the transport checksum in the program, sparing the second
/// helper call, after the address change went through the helper. True if done (or nothing
/// was to be done); false if the caller must call the helper.
///
/// The kernel keeps what it knows about the checksum (`skb->ip_summed`) out of the program's
/// reach, and treats the two kinds of frame in opposite ways: a full checksum (`NONE`,
/// `UNNECESSARY`, `COMPLETE`) takes every change, complemented (`~(~check + diff)`); a partial
/// one (`CHECKSUM_PARTIAL`: the pseudo header's sum, which the device or `skb_checksum_help`
/// completes over the transport header and payload later) takes only pseudo-header changes,
/// not complemented (`check + diff`), and must not take the ports'. So the value the helper
/// wrote for the addresses tells which kind the frame is: it equals one of the two
/// predictions from `before`, and they differ: modulo 0xFFFF one is `before − diff` and the
/// other `before + diff`, equal only if `2 × diff ≡ 0`, i.e. `diff ≡ 0` (0xFFFF is odd), and
/// a zero difference never gets here (see [`Diffs`]). A value that is neither leaves the
/// ports to the helper. A UDP
/// checksum of zero ("none") is left alone by the helper in both calls (`BPF_F_MARK_MANGLED_0`),
/// and here too; a computed zero is written as 0xFFFF, as the helper does.
#[inline(always)]
fn ports_in_program(
    ctx: &TcContext,
    protocol: u8,
    check_offset: usize,
    before: u16,
    d: Diffs,
) -> bool {
    if protocol == IPPROTO_UDP && before == 0 {
        return true;
    }
    let full = ones(csum_apply(before, d.addresses as u32));
    let partial = ones(partial_apply(before, d.addresses as u32));
    let Some(c) = linear::<u16>(ctx, check_offset) else {
        return false;
    };
    // SAFETY: bounds-checked by `linear` after the helper ran.
    let after = unsafe { *c };
    if ones(after) == partial {
        return true;
    }
    if ones(after) != full {
        return false;
    }
    let mut check = csum_apply(after, d.ports as u32);
    if protocol == IPPROTO_UDP && check == 0 {
        check = 0xFFFF;
    }
    // SAFETY: as above.
    unsafe { *c = check };
    true
}

/// Flags for `bpf_l4_csum_replace` of a `size`-byte field: for UDP, a zero checksum ("none")
/// stays zero and a computed zero is written as 0xFFFF (`BPF_F_MARK_MANGLED_0`).
#[inline(always)]
pub fn l4_flags(protocol: u8, size: u64) -> u64 {
    let mut flags = size;
    if protocol == IPPROTO_UDP {
        flags |= BPF_F_MARK_MANGLED_0 as u64;
    }
    flags
}

/// Updates the IPv4 header checksum and the UDP/TCP checksum (pseudo header) for source and
/// destination addresses already rewritten from `.0` to `.1`. False if a helper failed.
///
/// The kernel's helpers keep frames with a partial checksum (`CHECKSUM_PARTIAL`) correct: the
/// checksum field then holds the pseudo-header sum, which `BPF_F_PSEUDO_HDR` adjusts.
#[inline(always)]
pub fn fix_address_checksums(
    ctx: &TcContext,
    protocol: u8,
    check_offset: usize,
    src: (u32, u32),
    dst: (u32, u32),
) -> bool {
    let flags = BPF_F_PSEUDO_HDR as u64 | l4_flags(protocol, 4);
    for (from, to) in [src, dst] {
        let (from, to) = (from as u64, to as u64);
        if ctx.l3_csum_replace(IPV4_CHECK_OFFSET, from, to, 4).is_err()
            || ctx.l4_csum_replace(check_offset, from, to, flags).is_err()
        {
            return false;
        }
    }
    true
}
