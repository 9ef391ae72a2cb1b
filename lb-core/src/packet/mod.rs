//! Parsing a received Ethernet frame into what the fast path decides on: a [`FlowKey`], the header
//! offsets the rewrite needs, and the few header fields (TTL, TCP flags, fragment position) that
//! conntrack and the forwarding modes look at.
//!
//! ```text
//!  Ethernet II ─┬─ 802.1Q / 802.1ad (0, 1 or 2 tags) ─┬─ IPv4 (+ options) ─┬─ TCP / UDP        -> ports
//!               │                                     └─ IPv6 (+ ext hdrs) ┼─ ICMP echo        -> identifier
//!               └─ ARP, other EtherTypes -> ParseError (pass)              ├─ ICMP error       -> inner flow
//!                                                                          └─ NDP, other        -> no ports
//! ```
//!
//! Two paths give one result. [`parse_general`] reads any frame with etherparse's header slices
//! (`Ethernet2HeaderSlice`, `SingleVlanHeaderSlice`, `Ipv4HeaderSlice`, `Ipv6HeaderSlice`, one slice
//! per IPv6 extension header, `TcpHeaderSlice`) rather than `SlicedPacket`: the rewrite needs offsets,
//! the first fragment of a datagram still carries ports (which `SlicedPacket` does not parse), IPv6
//! payload length 0 must not silently mean "rest of the frame", and an ICMP error's quoted packet is
//! parsed with the same code as the outer one. It walks the IPv6 extension chain itself because
//! `Ipv6ExtensionsSlice` reads on past a later fragment's Fragment header, into data.
//! [`parse_common`] reads the frames that make up nearly all traffic (TCP/UDP, no IPv4 options, no
//! IPv6 extension headers, not fragmented) by hand with one bounds check per header, because the
//! general path measured about 490 instructions per frame against 175 (callgrind, release build); it
//! returns `None`, never an error, for anything else. [`parse`] tries the first and falls back to the
//! second; property tests check that they agree on every generated and mutated frame (a fuzz target
//! should compare them too).
//!
//! [`parse`] never panics and never allocates, whatever the bytes. Everything after the IP packet's
//! own length (Ethernet padding of short frames) is ignored. Checksums are not verified here: a
//! frame with a bad checksum is forwarded with a still-bad checksum (the rewrite is incremental), and
//! the receiver drops it, exactly as a router would.

mod flow;

pub(crate) use flow::map_v4;
pub use flow::{Family, FlowKey};

use etherparse::err::{LenError, ip_auth, ipv4, tcp};
use etherparse::{
    EtherType, Ethernet2HeaderSlice, IpAuthHeaderSlice, IpNumber, Ipv4HeaderSlice, Ipv6FragmentHeaderSlice,
    Ipv6HeaderSlice, Ipv6RawExtHeaderSlice, SingleVlanHeaderSlice, TcpHeaderSlice, ip_number,
};

/// Length of an Ethernet II header.
pub const ETHERNET_LEN: usize = 14;
/// Length of one 802.1Q / 802.1ad tag.
pub const VLAN_TAG_LEN: usize = 4;
/// Most VLAN tags a frame may carry (QinQ).
pub const MAX_VLAN_TAGS: u8 = 2;

/// IP protocol numbers the fast path cares about.
pub mod proto {
    /// ICMP for IPv4.
    pub const ICMP: u8 = 1;
    /// IPv4 encapsulated in IP (IP-in-IP).
    pub const IPIP: u8 = 4;
    /// TCP.
    pub const TCP: u8 = 6;
    /// UDP.
    pub const UDP: u8 = 17;
    /// IPv6 encapsulated in IP.
    pub const IPV6: u8 = 41;
    /// ICMP for IPv6.
    pub const ICMPV6: u8 = 58;
}

/// The TCP flags byte (byte 13 of the TCP header).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct TcpFlags(pub u8);

impl TcpFlags {
    /// FIN: the sender has finished sending.
    pub const FIN: u8 = 0x01;
    /// SYN: synchronise sequence numbers (connection open).
    pub const SYN: u8 = 0x02;
    /// RST: reset the connection.
    pub const RST: u8 = 0x04;
    /// PSH: push.
    pub const PSH: u8 = 0x08;
    /// ACK: the acknowledgment number is valid.
    pub const ACK: u8 = 0x10;
    /// URG: the urgent pointer is valid.
    pub const URG: u8 = 0x20;

    /// True if every bit of `flags` is set.
    pub const fn contains(self, flags: u8) -> bool {
        self.0 & flags == flags
    }

    /// SYN without ACK: the first packet of a connection.
    pub const fn is_syn_only(self) -> bool {
        self.0 & (Self::SYN | Self::ACK | Self::RST) == Self::SYN
    }
}

/// Where a packet sits in a fragmented IP datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Fragment {
    /// Not fragmented (including IPv6 "atomic" fragments: offset 0, no more fragments).
    None,
    /// Offset 0 with more to come: carries the transport header and ports.
    First,
    /// Offset > 0: no transport header, ports are 0. Match it by [`FlowKey::three_tuple`].
    Later,
}

/// Which ICMP error an [`IcmpError`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IcmpErrorKind {
    /// ICMPv4 type 3 (other than code 4) or ICMPv6 type 1.
    DestinationUnreachable {
        /// The ICMP code.
        code: u8,
    },
    /// ICMPv4 type 3 code 4: the packet needed fragmenting and had DF set.
    FragmentationNeeded {
        /// Next-hop MTU (RFC 1191), 0 if the router did not say.
        mtu: u16,
    },
    /// ICMPv6 type 2.
    PacketTooBig {
        /// The MTU of the next hop.
        mtu: u32,
    },
    /// ICMPv4 type 11 or ICMPv6 type 3.
    TimeExceeded {
        /// The ICMP code.
        code: u8,
    },
    /// ICMPv4 type 12 or ICMPv6 type 4.
    ParameterProblem {
        /// The ICMP code.
        code: u8,
    },
}

/// An ICMP error and the packet it quotes, so the worker can map it to the connection it is about.
///
/// `inner` is the quoted packet's flow as written in it, i.e. a packet that was sent *towards* the
/// router that complains; `inner.reverse()` is the direction the error travels, which is the key the
/// connection is found under.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct IcmpError {
    /// Type of error (with MTU for PMTU discovery messages).
    pub kind: IcmpErrorKind,
    /// Flow of the quoted packet. Ports are 0 when the quote is a non-first fragment.
    pub inner: FlowKey,
    /// Fragment position of the quoted packet.
    pub inner_fragment: Fragment,
    /// Frame offset of the quoted IP header.
    pub inner_l3_offset: u32,
    /// Frame offset of the quoted transport header.
    pub inner_l4_offset: u32,
    /// Frame offset one past the last byte of the ICMP message (the quote ends here).
    pub end: u32,
}

/// What the transport layer of a parsed frame is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum L4 {
    /// TCP; the flow has its ports unless the frame is a later fragment.
    Tcp,
    /// UDP; the flow has its ports unless the frame is a later fragment.
    Udp,
    /// ICMP or ICMPv6 echo request or reply; the identifier is in both ports of the flow.
    IcmpEcho {
        /// True for a reply (type 0 / 129).
        reply: bool,
    },
    /// An ICMP error quoting a packet; see [`IcmpError`].
    IcmpError(IcmpError),
    /// IPv6 neighbour discovery (ICMPv6 types 133 to 137): always for the host, pass it.
    Ndp,
    /// Any other ICMP message.
    OtherIcmp,
    /// Any other protocol, a later fragment of an ICMP message, or an IPv6 packet whose routing
    /// header has segments left (its protocol is then 43, routing); no ports.
    Other,
}

/// The result of [`parse`]: everything the worker and the rewrite need, in 116 bytes, `Copy`.
///
/// Offsets are from the first byte of the frame. `l3_offset + ip_len` never exceeds the frame length;
/// bytes after it are Ethernet padding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Parsed {
    /// The frame's flow as its headers say (for an ICMP error: outer addresses, ports 0).
    pub flow: FlowKey,
    /// What the transport layer is.
    pub l4: L4,
    /// Number of VLAN tags (0, 1 or 2).
    pub vlan_tags: u8,
    /// Offset of the IP header (14 + 4 per VLAN tag).
    pub l3_offset: u32,
    /// Offset of the transport header, after IPv4 options or IPv6 extension headers. For a later
    /// fragment, the offset of the fragment's payload; for an IPv6 routing header with segments
    /// left, the offset of that header.
    pub l4_offset: u32,
    /// Length of the IP packet, header included (IPv4 total length; IPv6 40 + payload length).
    pub ip_len: u32,
    /// IPv4 TTL or IPv6 hop limit.
    pub ttl: u8,
    /// TCP flags; 0 for anything but TCP (and for later TCP fragments).
    pub tcp_flags: TcpFlags,
    /// Fragment position.
    pub fragment: Fragment,
}

impl Parsed {
    /// IP version.
    pub const fn family(&self) -> Family {
        self.flow.family()
    }

    /// True if the frame carries ports (TCP or UDP and not a later fragment).
    pub const fn has_ports(&self) -> bool {
        matches!(self.l4, L4::Tcp | L4::Udp) && !matches!(self.fragment, Fragment::Later)
    }
}

/// The header a [`ParseError::Truncated`] ran out of bytes in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Layer {
    /// Ethernet II header.
    Ethernet,
    /// An 802.1Q / 802.1ad tag.
    Vlan,
    /// IPv4 header or packet.
    Ipv4,
    /// IPv6 header or packet.
    Ipv6,
    /// An IPv6 extension header.
    Ipv6Extension,
    /// TCP header.
    Tcp,
    /// UDP header.
    Udp,
    /// ICMP header.
    Icmp,
}

/// Whether the worker passes a frame it could not parse to the kernel or drops it (counted).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Disposition {
    /// Not load-balancer traffic (ARP, other EtherTypes, stacked tags): hand it to the kernel.
    Pass,
    /// Malformed IP traffic: drop it and count the reason.
    Drop,
}

/// Why a frame did not parse. [`ParseError::disposition`] says what to do with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
pub enum ParseError {
    /// ARP: for the host's stack.
    #[error("ARP frame: not load-balancer traffic")]
    Arp,
    /// An EtherType other than IPv4, IPv6, ARP or a VLAN tag.
    #[error("EtherType {ether_type:#06x} is neither IPv4 nor IPv6")]
    NotIp {
        /// The EtherType found after the Ethernet header and tags.
        ether_type: u16,
    },
    /// More than [`MAX_VLAN_TAGS`] stacked tags.
    #[error("more than 2 stacked VLAN tags")]
    TooManyVlanTags,
    /// The frame ends inside a header or before the length its IP header claims.
    #[error("truncated {layer:?}: needs {needed} bytes, {len} present")]
    Truncated {
        /// The header or packet cut short.
        layer: Layer,
        /// Bytes the header or the IP length field requires.
        needed: usize,
        /// Bytes present.
        len: usize,
    },
    /// The IP version field disagrees with the EtherType.
    #[error("IP version field is {version} but the EtherType says IPv{expected}")]
    BadIpVersion {
        /// The version field found.
        version: u8,
        /// The version the EtherType announced.
        expected: u8,
    },
    /// IPv4 IHL below 5.
    #[error("IPv4 header length field (IHL) is {ihl}, below the minimum of 5")]
    BadIpv4HeaderLen {
        /// The IHL field.
        ihl: u8,
    },
    /// IPv4 total length smaller than its own header.
    #[error("IPv4 total length {total_len} is smaller than its header length {header_len}")]
    BadIpv4TotalLen {
        /// The total length field.
        total_len: u16,
        /// The header length from IHL.
        header_len: usize,
    },
    /// A malformed IPv6 extension header chain (hop-by-hop not first, bad AH length).
    #[error("malformed IPv6 extension header chain")]
    BadIpv6Extension,
    /// TCP data offset below 5.
    #[error("TCP data offset is {data_offset}, below the minimum of 5")]
    BadTcpDataOffset {
        /// The data offset field.
        data_offset: u8,
    },
    /// A UDP length field below the 8-byte header. (One above the IP payload is
    /// [`ParseError::Truncated`]: the datagram ends before its own length.)
    #[error("UDP length field is {length}, below the header's 8 bytes")]
    BadUdpLength {
        /// The UDP length field.
        length: u16,
    },
    /// A first fragment too short to hold its transport header (RFC 1858 tiny fragment).
    #[error("first fragment too short for its {layer:?} header: {len} bytes")]
    TinyFragment {
        /// The transport header that does not fit.
        layer: Layer,
        /// Bytes of transport data in the fragment.
        len: usize,
    },
    /// An ICMP error whose quote is too short or malformed to name a flow.
    #[error("ICMP error quotes a packet too short or malformed to name a flow")]
    BadIcmpQuote,
}

impl ParseError {
    /// Pass to the kernel or drop (and count).
    pub const fn disposition(&self) -> Disposition {
        match self {
            // Not ours to judge: the kernel decides (and an ICMP error with a bad quote is no
            // connection of ours).
            ParseError::Arp | ParseError::NotIp { .. } | ParseError::TooManyVlanTags | ParseError::BadIcmpQuote => {
                Disposition::Pass
            }
            _ => Disposition::Drop,
        }
    }
}

fn truncated(layer: Layer, e: LenError) -> ParseError {
    ParseError::Truncated { layer, needed: e.required_len, len: e.len }
}

/// Offset as stored in [`Parsed`]; frames are far below 4 GiB, so saturation never bites in practice
/// and keeps this total.
fn off(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// Parses an Ethernet II frame. Never panics, never allocates.
///
/// The common case (up to two VLAN tags, IPv4 without options or IPv6 without extension headers,
/// not fragmented, TCP or UDP) is read by [`parse_common`] with one bounds check per header; every
/// other frame, and every error, goes through [`parse_general`], built on etherparse. Both give the
/// same result for every frame; the module documentation says why there are two.
#[inline]
pub fn parse(frame: &[u8]) -> Result<Parsed, ParseError> {
    match parse_common(frame) {
        Some(p) => Ok(p),
        None => parse_general(frame),
    }
}

fn is_vlan_tpid(ether_type: u16) -> bool {
    matches!(ether_type, 0x8100 | 0x88a8 | 0x9100)
}

/// The fast path of [`parse`]: `Some` only for an unfragmented TCP or UDP packet over IPv4 without
/// options or IPv6 without extension headers, behind at most two VLAN tags, that is valid as far as
/// [`parse_general`] checks; `None` for everything else (which [`parse_general`] then sorts out).
#[inline]
pub fn parse_common(frame: &[u8]) -> Option<Parsed> {
    let mut out = Err(ParseError::Arp);
    parse_common_into(frame, &mut out, |_, _| ())?;
    out.ok()
}

/// [`parse_common`] writing its `Some` straight into `out` as `Ok` (and leaving `out` alone for its
/// `None`): the worker's batch slot is a `Result`, and converting the returned `Option` into it
/// copied the 116-byte `Parsed` once more (14 instructions a packet, callgrind). Returns the flow
/// (always with ports) and what `keyed` makes of it and its TCP flags, so the worker keys and
/// hashes it, and tells a lone SYN, from registers rather than reading the slot back. `keyed` is
/// called in each of the parse's paths: in the untagged IPv4 one the words that are 0 in every
/// IPv4 flow fold away (the worker's key hash ~2 instructions shorter, callgrind; returning only
/// `keyed`'s result, not the flow too, had the flow copied through the stack, ~17 more).
#[inline]
pub(crate) fn parse_common_into<R>(
    frame: &[u8],
    out: &mut Result<Parsed, ParseError>,
    keyed: impl FnOnce(&FlowKey, TcpFlags) -> R,
) -> Option<(FlowKey, R)> {
    let eth = frame.first_chunk::<ETHERNET_LEN>()?;
    let mut ether_type = u16::from_be_bytes([eth[12], eth[13]]);
    // Untagged IPv4 first, one comparison: the tag loop cost 17 instructions a packet (callgrind).
    // Its own copy of the IPv4 parse has the IP header's offset as a constant.
    if ether_type == 0x0800 {
        return ipv4_into(frame, ETHERNET_LEN, 0, out, keyed);
    }
    let mut l3 = ETHERNET_LEN;
    let mut vlan_tags = 0u8;
    while is_vlan_tpid(ether_type) {
        if vlan_tags == MAX_VLAN_TAGS {
            return None;
        }
        let tag = frame.get(l3..)?.first_chunk::<VLAN_TAG_LEN>()?;
        ether_type = u16::from_be_bytes([tag[2], tag[3]]);
        l3 += VLAN_TAG_LEN;
        vlan_tags += 1;
    }
    match ether_type {
        0x0800 => ipv4_into(frame, l3, vlan_tags, out, keyed),
        0x86dd => ipv6_into(frame, l3, vlan_tags, out, keyed),
        _ => None,
    }
}

/// [`parse_common_into`] from an IPv4 header without options at `frame[l3..]`.
#[inline(always)]
fn ipv4_into<R>(
    frame: &[u8],
    l3: usize,
    vlan_tags: u8,
    out: &mut Result<Parsed, ParseError>,
    keyed: impl FnOnce(&FlowKey, TcpFlags) -> R,
) -> Option<(FlowKey, R)> {
    let ip = frame.get(l3..)?;
    let h = ip.first_chunk::<20>()?;
    let total = usize::from(u16::from_be_bytes([h[2], h[3]]));
    let frag = u16::from_be_bytes([h[6], h[7]]) & 0x3fff;
    if h[0] != 0x45 || total < 20 || total > ip.len() || frag != 0 {
        return None;
    }
    let key = FlowKey::v4([h[12], h[13], h[14], h[15]], [h[16], h[17], h[18], h[19]], h[9], 0, 0);
    transport_into::<20, R>(ip, total, (key, h[8], h[9]), (l3, vlan_tags), out, keyed)
}

/// [`parse_common_into`] from an IPv6 header without extension headers at `frame[l3..]`.
#[inline]
fn ipv6_into<R>(
    frame: &[u8],
    l3: usize,
    vlan_tags: u8,
    out: &mut Result<Parsed, ParseError>,
    keyed: impl FnOnce(&FlowKey, TcpFlags) -> R,
) -> Option<(FlowKey, R)> {
    let ip = frame.get(l3..)?;
    let h = ip.first_chunk::<40>()?;
    let total = 40 + usize::from(u16::from_be_bytes([h[4], h[5]]));
    if h[0] >> 4 != 6 || total > ip.len() {
        return None;
    }
    let src = *h[8..24].first_chunk::<16>()?;
    let dst = *h[24..40].first_chunk::<16>()?;
    let flow = FlowKey::v6(src, dst, h[6], 0, 0);
    transport_into::<40, R>(ip, total, (flow, h[7], h[6]), (l3, vlan_tags), out, keyed)
}

/// The end of [`parse_common_into`]: the TCP or UDP header at `ip[L4_START..ip_len]` (the IP
/// header's length a constant, so one bounds check covers each transport header), then `out`,
/// written whole. `(flow, ttl, proto)` are the IP header's, the flow's ports still 0.
#[inline(always)]
fn transport_into<const L4_START: usize, R>(
    ip: &[u8],
    ip_len: usize,
    (flow, ttl, proto): (FlowKey, u8, u8),
    (l3, vlan_tags): (usize, u8),
    out: &mut Result<Parsed, ParseError>,
    keyed: impl FnOnce(&FlowKey, TcpFlags) -> R,
) -> Option<(FlowKey, R)> {
    let l4 = ip.get(L4_START..ip_len)?;
    let (kind, flags, ports) = match proto {
        proto::TCP => {
            let t = l4.first_chunk::<20>()?;
            let data_offset = usize::from(t[12] >> 4);
            if data_offset < 5 || data_offset * 4 > l4.len() {
                return None;
            }
            (L4::Tcp, t[13], [t[0], t[1], t[2], t[3]])
        }
        proto::UDP => {
            // The UDP length within the IP payload (the kernel trims to it; above it, or below the
            // header, [`parse_general`] says what is wrong).
            let u = l4.first_chunk::<8>()?;
            if !(8..=l4.len()).contains(&usize::from(u16::from_be_bytes([u[4], u[5]]))) {
                return None;
            }
            (L4::Udp, 0, [u[0], u[1], u[2], u[3]])
        }
        _ => return None,
    };
    let flow = flow.with_ports(u16::from_be_bytes([ports[0], ports[1]]), u16::from_be_bytes([ports[2], ports[3]]));
    *out = Ok(Parsed {
        flow,
        l4: kind,
        vlan_tags,
        l3_offset: off(l3),
        l4_offset: off(l3 + L4_START),
        ip_len: off(ip_len),
        ttl,
        tcp_flags: TcpFlags(flags),
        fragment: Fragment::None,
    });
    Some((flow, keyed(&flow, TcpFlags(flags))))
}

/// [`parse`] for any frame, through etherparse's header slices; the reference [`parse_common`] must
/// agree with.
pub fn parse_general(frame: &[u8]) -> Result<Parsed, ParseError> {
    let eth = Ethernet2HeaderSlice::from_slice(frame).map_err(|e| truncated(Layer::Ethernet, e))?;
    let mut ether_type = eth.ether_type();
    let mut l3 = ETHERNET_LEN;
    let mut vlan_tags = 0u8;
    while matches!(
        ether_type,
        EtherType::VLAN_TAGGED_FRAME | EtherType::PROVIDER_BRIDGING | EtherType::VLAN_DOUBLE_TAGGED_FRAME
    ) {
        if vlan_tags == MAX_VLAN_TAGS {
            return Err(ParseError::TooManyVlanTags);
        }
        let rest = frame.get(l3..).unwrap_or_default();
        let tag = SingleVlanHeaderSlice::from_slice(rest).map_err(|e| truncated(Layer::Vlan, e))?;
        ether_type = tag.ether_type();
        l3 += VLAN_TAG_LEN;
        vlan_tags += 1;
    }
    let ip = frame.get(l3..).unwrap_or_default();
    let (net, l4) = match ether_type {
        EtherType::IPV4 => parse_ipv4(ip, false)?,
        EtherType::IPV6 => parse_ipv6(ip, false)?,
        EtherType::ARP => return Err(ParseError::Arp),
        other => return Err(ParseError::NotIp { ether_type: other.0 }),
    };
    let l4_offset = l3 + net.l4_start;
    let (flow, l4, tcp_flags) = match l4 {
        Transport::Ports { kind, src_port, dst_port, flags } => (net.flow(src_port, dst_port), kind, TcpFlags(flags)),
        Transport::None(kind) => (net.flow(0, 0), kind, TcpFlags(0)),
        Transport::IcmpError { kind, quote_start, quote_end } => {
            let quote = ip.get(quote_start..quote_end).unwrap_or_default();
            let inner = parse_quote(net.family, quote)?;
            let err = IcmpError {
                kind,
                inner: inner.flow,
                inner_fragment: inner.fragment,
                inner_l3_offset: off(l3 + quote_start),
                inner_l4_offset: off(l3 + quote_start + inner.l4_start),
                end: off(l3 + quote_end),
            };
            (net.flow(0, 0), L4::IcmpError(err), TcpFlags(0))
        }
    };
    Ok(Parsed {
        flow,
        l4,
        vlan_tags,
        l3_offset: off(l3),
        l4_offset: off(l4_offset),
        ip_len: off(net.ip_len),
        ttl: net.ttl,
        tcp_flags,
        fragment: net.fragment,
    })
}

/// The IP layer of a packet, before the transport layer is looked at.
struct Net {
    family: Family,
    src: [u8; 16],
    dst: [u8; 16],
    proto: u8,
    ttl: u8,
    fragment: Fragment,
    /// Offset of the transport header from the IP header.
    l4_start: usize,
    /// IP length (header included); for a quote, the bytes present.
    ip_len: usize,
}

impl Net {
    fn flow(&self, src_port: u16, dst_port: u16) -> FlowKey {
        match self.family {
            Family::V4 => {
                let s = [self.src[0], self.src[1], self.src[2], self.src[3]];
                let d = [self.dst[0], self.dst[1], self.dst[2], self.dst[3]];
                FlowKey::v4(s, d, self.proto, src_port, dst_port)
            }
            Family::V6 => FlowKey::v6(self.src, self.dst, self.proto, src_port, dst_port),
        }
    }
}

/// The transport layer, as far as the flow key needs it.
enum Transport {
    Ports {
        kind: L4,
        src_port: u16,
        dst_port: u16,
        flags: u8,
    },
    None(L4),
    /// An ICMP error; the quote is `ip[quote_start..quote_end]`.
    IcmpError {
        kind: IcmpErrorKind,
        quote_start: usize,
        quote_end: usize,
    },
}

fn v4_to_16(a: [u8; 4]) -> [u8; 16] {
    let mut out = [0u8; 16];
    out[..4].copy_from_slice(&a);
    out
}

/// Parses an IPv4 packet starting at `ip[0]`. A `quote` (the packet inside an ICMP error) may be cut
/// short after its transport ports; it never recurses into another ICMP error.
fn parse_ipv4(ip: &[u8], quote: bool) -> Result<(Net, Transport), ParseError> {
    let h = Ipv4HeaderSlice::from_slice(ip).map_err(|e| match e {
        ipv4::HeaderSliceError::Len(e) => truncated(Layer::Ipv4, e),
        ipv4::HeaderSliceError::Content(ipv4::HeaderError::UnexpectedVersion { version_number }) => {
            ParseError::BadIpVersion { version: version_number, expected: 4 }
        }
        ipv4::HeaderSliceError::Content(ipv4::HeaderError::HeaderLengthSmallerThanHeader { ihl }) => {
            ParseError::BadIpv4HeaderLen { ihl }
        }
    })?;
    let header_len = h.slice().len();
    let total_len = usize::from(h.total_len());
    if total_len < header_len {
        return Err(ParseError::BadIpv4TotalLen { total_len: h.total_len(), header_len });
    }
    let ip_len = if quote {
        total_len.min(ip.len())
    } else if ip.len() < total_len {
        return Err(ParseError::Truncated { layer: Layer::Ipv4, needed: total_len, len: ip.len() });
    } else {
        total_len
    };
    let fragment = if h.fragments_offset().value() != 0 {
        Fragment::Later
    } else if h.more_fragments() {
        Fragment::First
    } else {
        Fragment::None
    };
    let net = Net {
        family: Family::V4,
        src: v4_to_16(h.source()),
        dst: v4_to_16(h.destination()),
        proto: h.protocol().0,
        ttl: h.ttl(),
        fragment,
        l4_start: header_len,
        ip_len,
    };
    let payload = ip.get(header_len..ip_len).unwrap_or_default();
    let t = parse_transport(&net, payload, quote)?;
    Ok((net, t))
}

/// Parses an IPv6 packet (with its extension headers) starting at `ip[0]`; see [`parse_ipv4`].
fn parse_ipv6(ip: &[u8], quote: bool) -> Result<(Net, Transport), ParseError> {
    let h = Ipv6HeaderSlice::from_slice(ip).map_err(|e| match e {
        etherparse::err::ipv6::HeaderSliceError::Len(e) => truncated(Layer::Ipv6, e),
        etherparse::err::ipv6::HeaderSliceError::Content(etherparse::err::ipv6::HeaderError::UnexpectedVersion {
            version_number,
        }) => ParseError::BadIpVersion { version: version_number, expected: 6 },
    })?;
    let header_len = h.slice().len();
    let total_len = header_len + usize::from(h.payload_length());
    let ip_len = if quote {
        total_len.min(ip.len())
    } else if ip.len() < total_len {
        return Err(ParseError::Truncated { layer: Layer::Ipv6, needed: total_len, len: ip.len() });
    } else {
        total_len
    };
    let payload = ip.get(header_len..ip_len).unwrap_or_default();
    // In a quote, any error here becomes `BadIcmpQuote` in `parse_quote`.
    let exts = parse_ipv6_exts(h.next_header(), payload)?;
    let net = Net {
        family: Family::V6,
        src: h.source(),
        dst: h.destination(),
        proto: exts.next,
        ttl: h.hop_limit(),
        fragment: exts.fragment,
        l4_start: header_len + exts.len,
        ip_len,
    };
    let t = parse_transport(&net, payload.get(exts.len..).unwrap_or_default(), quote)?;
    Ok((net, t))
}

/// The IPv6 extension headers at the start of a packet's payload.
struct Ipv6Exts {
    /// Protocol of what follows them: the transport header, for a later fragment the protocol its
    /// data continues (the Fragment header's next header), or 43 for a routing header with segments
    /// left.
    next: u8,
    /// Bytes of extension headers: the transport header, a later fragment's data, or a routing
    /// header with segments left starts here.
    len: usize,
    fragment: Fragment,
}

/// Walks the IPv6 extension headers at the start of `payload`, `first` naming the first. Stops at
/// a header that is not an extension header, or right after a Fragment header with a nonzero offset:
/// what follows it in a later fragment is data, even where it continues a Destination Options header
/// or AH that the first fragment began (RFC 8200 4.1 puts both in the fragmentable part). Stops too
/// at a Routing header with segments left (any routing type), which it names as the protocol: the
/// packet is on its way to another destination, the last segment, whose transport header follows
/// (its checksum covers that destination, RFC 8200 8.1), so it is no flow of the destination
/// address's and the load balancer must not translate or balance it.
fn parse_ipv6_exts(first: IpNumber, payload: &[u8]) -> Result<Ipv6Exts, ParseError> {
    let ext_len = |e: LenError| truncated(Layer::Ipv6Extension, e);
    let mut next = first;
    let mut fragment = Fragment::None;
    // Each header is at least 8 bytes long, so the walk ends.
    let mut len = 0;
    loop {
        let rest = payload.get(len..).unwrap_or_default();
        let header_len = match next {
            // Hop-by-hop options must come straight after the IPv6 header (RFC 8200 4.1).
            ip_number::IPV6_HOP_BY_HOP if len != 0 => return Err(ParseError::BadIpv6Extension),
            ip_number::IPV6_HOP_BY_HOP | ip_number::IPV6_ROUTE | ip_number::IPV6_DEST_OPTIONS => {
                let h = Ipv6RawExtHeaderSlice::from_slice(rest).map_err(ext_len)?;
                // Segments left: byte 1 of the routing data, byte 3 of the header.
                if next == ip_number::IPV6_ROUTE && h.payload().get(1).is_some_and(|&left| left != 0) {
                    return Ok(Ipv6Exts { next: next.0, len, fragment });
                }
                next = h.next_header();
                h.slice().len()
            }
            ip_number::IPV6_FRAG => {
                let h = Ipv6FragmentHeaderSlice::from_slice(rest).map_err(ext_len)?;
                next = h.next_header();
                if h.fragment_offset().value() != 0 {
                    return Ok(Ipv6Exts { next: next.0, len: len + h.slice().len(), fragment: Fragment::Later });
                }
                if h.more_fragments() {
                    fragment = Fragment::First;
                }
                h.slice().len()
            }
            ip_number::AUTH => {
                let h = IpAuthHeaderSlice::from_slice(rest).map_err(|e| match e {
                    ip_auth::HeaderSliceError::Len(e) => ext_len(e),
                    ip_auth::HeaderSliceError::Content(_) => ParseError::BadIpv6Extension,
                })?;
                next = h.next_header();
                h.slice().len()
            }
            _ => return Ok(Ipv6Exts { next: next.0, len, fragment }),
        };
        len += header_len;
    }
}

fn be16(b: &[u8], at: usize) -> u16 {
    match b.get(at..at + 2) {
        Some(&[hi, lo]) => u16::from_be_bytes([hi, lo]),
        _ => 0,
    }
}

/// Reads the transport header of `payload` (the bytes after the IP headers, up to the IP length).
fn parse_transport(net: &Net, payload: &[u8], quote: bool) -> Result<Transport, ParseError> {
    let kind_of = |p: u8| match p {
        proto::TCP => L4::Tcp,
        proto::UDP => L4::Udp,
        _ => L4::Other,
    };
    if net.fragment == Fragment::Later {
        return Ok(Transport::None(kind_of(net.proto)));
    }
    let short = |layer: Layer, needed: usize| {
        if quote {
            ParseError::BadIcmpQuote
        } else if net.fragment == Fragment::First {
            ParseError::TinyFragment { layer, len: payload.len() }
        } else {
            ParseError::Truncated { layer, needed, len: payload.len() }
        }
    };
    let is_icmp = match net.family {
        Family::V4 => net.proto == proto::ICMP,
        Family::V6 => net.proto == proto::ICMPV6,
    };
    match net.proto {
        proto::TCP if quote => {
            // RFC 792 promises only the first 8 bytes of a quoted transport header.
            if payload.len() < 8 {
                return Err(short(Layer::Tcp, 8));
            }
            Ok(Transport::Ports { kind: L4::Tcp, src_port: be16(payload, 0), dst_port: be16(payload, 2), flags: 0 })
        }
        proto::TCP => {
            let tcp = TcpHeaderSlice::from_slice(payload).map_err(|e| match e {
                tcp::HeaderSliceError::Len(e) => short(Layer::Tcp, e.required_len),
                tcp::HeaderSliceError::Content(tcp::HeaderError::DataOffsetTooSmall { data_offset }) => {
                    ParseError::BadTcpDataOffset { data_offset }
                }
            })?;
            let flags = tcp.slice().get(13).copied().unwrap_or(0);
            Ok(Transport::Ports { kind: L4::Tcp, src_port: tcp.source_port(), dst_port: tcp.destination_port(), flags })
        }
        proto::UDP => {
            if payload.len() < 8 {
                return Err(short(Layer::Udp, 8));
            }
            // The length field of a whole datagram (not a quote's, which may be cut, nor a first
            // fragment's, which counts the later fragments too): below the header it is malformed,
            // above the IP payload the datagram is cut short. Netfilter's conntrack calls both
            // invalid, and the backend's kernel would drop them; within the payload, the kernel
            // trims the datagram to it, so shorter is forwarded as it is.
            let length = be16(payload, 4);
            if !quote && net.fragment == Fragment::None {
                if length < 8 {
                    return Err(ParseError::BadUdpLength { length });
                }
                if usize::from(length) > payload.len() {
                    return Err(ParseError::Truncated {
                        layer: Layer::Udp,
                        needed: usize::from(length),
                        len: payload.len(),
                    });
                }
            }
            Ok(Transport::Ports { kind: L4::Udp, src_port: be16(payload, 0), dst_port: be16(payload, 2), flags: 0 })
        }
        _ if is_icmp => {
            // A fragmented ICMP message (only big echoes are) is never mapped to a connection.
            if net.fragment == Fragment::First || (quote && payload.len() < 8) {
                return Ok(Transport::None(L4::OtherIcmp));
            }
            // Type, code, checksum and 4 bytes of rest-of-header.
            if payload.len() < 8 {
                return Err(short(Layer::Icmp, 8));
            }
            let (ty, code) = (payload[0], payload[1]);
            let rest = [payload[4], payload[5], payload[6], payload[7]];
            Ok(classify_icmp(net.family, ty, code, rest, quote, net.l4_start, net.l4_start + payload.len()))
        }
        p => Ok(Transport::None(kind_of(p))),
    }
}

/// Sorts an ICMP message into echo, error (with its quote's range), NDP or other.
fn classify_icmp(
    family: Family,
    ty: u8,
    code: u8,
    rest: [u8; 4],
    quote: bool,
    l4_start: usize,
    end: usize,
) -> Transport {
    let id = u16::from_be_bytes([rest[0], rest[1]]);
    let echo = |reply| Transport::Ports { kind: L4::IcmpEcho { reply }, src_port: id, dst_port: id, flags: 0 };
    let error = |kind| {
        if quote {
            // An error about an error: nothing to map it to.
            Transport::None(L4::OtherIcmp)
        } else {
            Transport::IcmpError { kind, quote_start: l4_start + 8, quote_end: end }
        }
    };
    match (family, ty) {
        (Family::V4, 8) | (Family::V6, 128) => echo(false),
        (Family::V4, 0) | (Family::V6, 129) => echo(true),
        (Family::V4, 3) if code == 4 => {
            error(IcmpErrorKind::FragmentationNeeded { mtu: u16::from_be_bytes([rest[2], rest[3]]) })
        }
        (Family::V4, 3) | (Family::V6, 1) => error(IcmpErrorKind::DestinationUnreachable { code }),
        (Family::V6, 2) => error(IcmpErrorKind::PacketTooBig { mtu: u32::from_be_bytes(rest) }),
        (Family::V4, 11) | (Family::V6, 3) => error(IcmpErrorKind::TimeExceeded { code }),
        (Family::V4, 12) | (Family::V6, 4) => error(IcmpErrorKind::ParameterProblem { code }),
        (Family::V6, 133..=137) => Transport::None(L4::Ndp),
        _ => Transport::None(L4::OtherIcmp),
    }
}

/// The packet quoted by an ICMP error.
struct Quote {
    flow: FlowKey,
    fragment: Fragment,
    l4_start: usize,
}

/// Parses an ICMP error's quote, which must be of the outer packet's family and name a flow.
fn parse_quote(family: Family, quote: &[u8]) -> Result<Quote, ParseError> {
    let parsed = match family {
        Family::V4 => parse_ipv4(quote, true),
        Family::V6 => parse_ipv6(quote, true),
    };
    let (net, t) = parsed.map_err(|_| ParseError::BadIcmpQuote)?;
    let flow = match t {
        Transport::Ports { src_port, dst_port, .. } => net.flow(src_port, dst_port),
        Transport::None(_) | Transport::IcmpError { .. } => net.flow(0, 0),
    };
    Ok(Quote { flow, fragment: net.fragment, l4_start: net.l4_start })
}

#[cfg(test)]
mod tests;
