//! The ARP / NDP responder: answers "who has VIP?" with the interface's MAC, so a VIP (or a full-NAT
//! source address) can live on a shared L2 segment without being configured on the node, as MetalLB's
//! L2 mode or keepalived do.
//!
//! ```text
//!  ARP request, target = ours ──────────► ARP reply from `mac`, to the asker           ─► Tx
//!  ARP request or reply from another MAC ─► broadcast ARP announcement of that address  ─► Tx
//!    with sender = ours (a conflict)         (defence, RFC 5227), once per 10 s an address;
//!                                            within those 10 s: counted drop (ArpConflict)
//!  ICMPv6 Neighbour Solicitation,        ─► solicited Neighbour Advertisement, S + O,   ─► Tx
//!    target = ours (RFC 4861 7.1.1 valid)    target link-layer option, from the target
//!    from :: (duplicate address detection) ─► advertisement to ff02::1, S clear (7.2.4)  ─► Tx
//!  ours but invalid (bad checksum, hop limit != 255, ...) ─► counted drop (Malformed)
//!  anything else (not a request, another target, truncated) ─► not ours: pass to the kernel
//! ```
//!
//! A conflict is another host claiming one of our addresses, typically with a gratuitous ARP (a
//! previous owner, a second node running the responder, a backend that announces the VIP it holds
//! on a loopback): the segment's neighbours that heard it now send to that host. RFC 5227 2.4 (c),
//! for a host that must keep its address, defends it with one broadcast ARP announcement, so those
//! neighbours switch back, and with no second defence of the address within DEFEND_INTERVAL (10 s):
//! two hosts defending one address then exchange at most one announcement each per 10 s, and stop
//! when no third frame comes, instead of answering each other forever. A responder remembers the
//! last defence of up to [`DEFENDED_ADDRESSES`] addresses; a conflict on yet another address
//! while all of those were defended in the last 10 s is not defended. (A unicast reply to the
//! claimant, as before, told only the claimant.) Conflicts are counted in
//! [`Stats::arp_conflicts`], defended or not. IPv6 has no such defence: RFC 4862 5.4.4 only has a
//! node log an advertisement of its address by another, and the XDP program leaves advertisements
//! to the kernel.
//!
//! "Ours" is every VIP of the installed [`Tables`] that a service has answered for
//! ([`ServiceConfig::answer_neighbours`]: an address clients on the segment ask for, not a Kubernetes
//! cluster IP, which the cluster routes) and the SNAT address of each family that a NAT service uses
//! (replies from backends are addressed there). The VIP set is the tables' own (hashed, built with
//! them); the SNAT addresses in use are derived by [`NeighbourResponder::install`] when
//! tables are installed, so a lookup is a hash probe and two compares, never a scan or an allocation.
//!
//! Frames are parsed and the replies emitted with smoltcp's wire types (`ArpPacket` / `ArpRepr`,
//! `Ipv6Packet`, `Icmpv6Packet` / `Icmpv6Repr` / `NdiscRepr`) in place, in the frame's own buffer:
//! the `Repr`s are small `Copy` values read out before anything is written, and every buffer handed to
//! an `emit` has exactly the length its `Repr` asks for, the precondition under which smoltcp's
//! accessors never panic. Up to two VLAN tags are kept as they were; only the Ethernet addresses and
//! the payload change. An advertisement (32 bytes of ICMPv6 with its option) can be 8 bytes longer
//! than a solicitation without a source link-layer option: it grows into the frame's tailroom, and a
//! frame without that room is dropped and counted as [`DropReason::NoHeadroom`].

use core::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{
    ArpOperation, ArpPacket, ArpRepr, EthernetAddress, Icmpv6Message, Icmpv6Packet, Icmpv6Repr, IpProtocol, Ipv6Packet,
    Ipv6Repr, NdiscNeighborFlags, NdiscRepr, RawHardwareAddress,
};

use crate::config::ForwardMode;
#[cfg(doc)]
use crate::config::ServiceConfig;
use crate::frame::{Frame, Verdict};
use crate::packet::{ETHERNET_LEN, MAX_VLAN_TAGS, VLAN_TAG_LEN};
use crate::service::Tables;
use crate::stats::{DropReason, Stats};

/// EtherType of ARP.
const ETHERTYPE_ARP: u16 = 0x0806;
/// EtherType of IPv6.
const ETHERTYPE_IPV6: u16 = 0x86dd;
/// Length of the fixed IPv6 header.
const IPV6_HEADER_LEN: usize = 40;
/// The all-nodes multicast address, where an answer to duplicate address detection goes.
const ALL_NODES: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);
/// The all-nodes address's Ethernet group (33:33 + its last 32 bits, RFC 2464).
const ALL_NODES_MAC: [u8; 6] = [0x33, 0x33, 0, 0, 0, 1];

/// What [`NeighbourResponder::answer`] did with a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// Not an ARP request or Neighbour Solicitation for one of our addresses (or truncated before its
    /// target): the frame is unchanged and belongs to the kernel.
    NotOurs,
    /// The frame now holds an ARP reply for the asker: transmit it.
    ArpReply,
    /// The frame now holds a Neighbour Advertisement: transmit it.
    NeighbourAdvert,
    /// An ARP request or reply from another host claimed one of our addresses (its sender
    /// address): the frame now holds a broadcast ARP announcement of that address at our MAC. Transmit it.
    ArpDefence,
    /// An ARP request or reply from another host claimed one of our addresses that was defended less than
    /// [`DEFEND_INTERVAL_SECS`] ago (or no room is left to remember a defence): not defended
    /// again; the frame is unchanged. Drop it and count [`DropReason::ArpConflict`].
    ArpConflict,
    /// A solicitation for one of our addresses that RFC 4861 says to discard, or an advertisement
    /// that does not fit the frame; the frame is unchanged. Drop it and count this reason.
    Invalid(DropReason),
}

impl Answer {
    /// The worker's verdict for the answered frame, with the responder's counters bumped.
    pub(crate) fn count(self, stats: &mut Stats) -> Result<Verdict, DropReason> {
        match self {
            Answer::NotOurs => Ok(Verdict::Pass),
            Answer::ArpReply => {
                stats.arp_replies += 1;
                Ok(Verdict::Tx)
            }
            Answer::NeighbourAdvert => {
                stats.ndp_adverts += 1;
                Ok(Verdict::Tx)
            }
            Answer::ArpDefence => {
                stats.arp_conflicts += 1;
                Ok(Verdict::Tx)
            }
            Answer::ArpConflict => {
                stats.arp_conflicts += 1;
                Err(DropReason::ArpConflict)
            }
            Answer::Invalid(reason) => Err(reason),
        }
    }
}

/// RFC 5227's DEFEND_INTERVAL: an address is defended against a conflicting ARP at most once in
/// this many seconds.
pub const DEFEND_INTERVAL_SECS: u32 = 10;

/// How many addresses a responder remembers the last defence of (see the module docs).
pub const DEFENDED_ADDRESSES: usize = 16;

/// Answers ARP and NDP for the load balancer's addresses with one interface's MAC. One per worker;
/// see the module docs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NeighbourResponder {
    mac: [u8; 6],
    /// The node's IPv4 SNAT address, when a NAT service of that family uses it.
    snat_v4: Option<Ipv4Addr>,
    /// The node's IPv6 SNAT address, when a NAT service of that family uses it.
    snat_v6: Option<Ipv6Addr>,
    /// Addresses defended against a conflict, each with the second (of the worker's clock) of its
    /// last defence.
    defended: [Option<(Ipv4Addr, u32)>; DEFENDED_ADDRESSES],
}

impl NeighbourResponder {
    /// A responder answering with `mac` (the MAC of the interface the frames arrive on) for the
    /// addresses of `tables`.
    pub fn new(mac: [u8; 6], tables: &Tables) -> Self {
        let mut r = NeighbourResponder { mac, snat_v4: None, snat_v6: None, defended: [None; DEFENDED_ADDRESSES] };
        r.install(tables);
        r
    }

    /// Derives the addresses to answer for from newly installed `tables` (between bursts; no
    /// allocation, one pass over the services).
    pub fn install(&mut self, tables: &Tables) {
        let node = tables.node();
        let nat = |v6: bool| tables.services().iter().any(|s| s.mode == ForwardMode::Nat && s.key.vip.is_ipv6() == v6);
        self.snat_v4 = node.snat_v4.filter(|_| nat(false));
        self.snat_v6 = node.snat_v6.filter(|_| nat(true));
    }

    /// The MAC the responder answers with.
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// True when `ip` is a VIP of `tables` answered for ([`Tables::answers_neighbours_for`]) or the
    /// SNAT address of a NAT service's family.
    #[inline]
    pub fn is_ours(&self, tables: &Tables, ip: IpAddr) -> bool {
        let snat = match ip {
            IpAddr::V4(a) => self.snat_v4 == Some(a),
            IpAddr::V6(a) => self.snat_v6 == Some(a),
        };
        snat || tables.answers_neighbours_for(ip)
    }

    /// Turns an ARP request or Neighbour Solicitation for one of our addresses into its answer, in
    /// place, or an ARP request from another host that claims one of them into its defence; `now`
    /// is the worker's clock in seconds (never going back). Never panics and never allocates,
    /// whatever the bytes.
    pub fn answer(&mut self, tables: &Tables, frame: &mut Frame<'_>, now: u32) -> Answer {
        match l3_of(frame.data()) {
            Some((l3, ETHERTYPE_ARP)) => self.answer_arp(tables, frame, l3, now),
            Some((l3, ETHERTYPE_IPV6)) => self.answer_solicitation(tables, frame, l3),
            _ => Answer::NotOurs,
        }
    }

    /// An ARP request for one of our addresses becomes a reply: our MAC and the asked-for address as
    /// sender, the asker as target, sent to the asker's hardware address (RFC 826). A request or
    /// reply whose sender, another host, claims one of our addresses is a conflict
    /// ([`Self::defend`]).
    fn answer_arp(&mut self, tables: &Tables, frame: &mut Frame<'_>, l3: usize, now: u32) -> Answer {
        let Some(Ok(request)) =
            frame.data().get(l3..).map(|b| ArpPacket::new_checked(b).and_then(|p| ArpRepr::parse(&p)))
        else {
            return Answer::NotOurs;
        };
        let ArpRepr::EthernetIpv4 {
            operation: operation @ (ArpOperation::Request | ArpOperation::Reply),
            source_hardware_addr: asker_mac,
            source_protocol_addr: asker_ip,
            target_protocol_addr: target,
            ..
        } = request
        else {
            return Answer::NotOurs;
        };
        // RFC 5227 2.4: a request or reply whose sender address is ours and whose sender hardware
        // address is not.
        if asker_mac.0 != self.mac && self.is_ours(tables, IpAddr::V4(asker_ip)) {
            return self.defend(frame, l3, asker_ip, now);
        }
        if operation != ArpOperation::Request || !self.is_ours(tables, IpAddr::V4(target)) {
            return Answer::NotOurs;
        }
        let reply = ArpRepr::EthernetIpv4 {
            operation: ArpOperation::Reply,
            source_hardware_addr: EthernetAddress(self.mac),
            source_protocol_addr: target,
            target_hardware_addr: asker_mac,
            target_protocol_addr: asker_ip,
        };
        let data = frame.data_mut();
        let Some((eth, arp)) = split(data, l3) else { return Answer::NotOurs };
        set_macs(eth, asker_mac.0, self.mac);
        // `arp` passed `new_checked` above with the same hardware and protocol lengths.
        reply.emit(&mut ArpPacket::new_unchecked(arp));
        Answer::ArpReply
    }

    /// RFC 5227 2.4 (c): a conflict on `addr` becomes a broadcast ARP announcement of `addr` at our
    /// MAC (VLAN tags kept), unless `addr` was defended less than [`DEFEND_INTERVAL_SECS`] ago, or
    /// every slot holds a defence that recent (a defence not remembered could loop).
    fn defend(&mut self, frame: &mut Frame<'_>, l3: usize, addr: Ipv4Addr, now: u32) -> Answer {
        let fresh = |at: u32| now.saturating_sub(at) < DEFEND_INTERVAL_SECS;
        if self.defended.iter().flatten().any(|&(a, at)| a == addr && fresh(at)) {
            return Answer::ArpConflict;
        }
        let Some(slot) = self.defended.iter_mut().find(|e| e.is_none_or(|(a, at)| a == addr || !fresh(at))) else {
            return Answer::ArpConflict;
        };
        let Some((eth, arp)) = split(frame.data_mut(), l3) else { return Answer::NotOurs };
        *slot = Some((addr, now));
        set_macs(eth, [0xff; 6], self.mac);
        // `arp` passed `new_checked` in `answer_arp`, with the same hardware and protocol lengths.
        announcement_arp(self.mac, addr).emit(&mut ArpPacket::new_unchecked(arp));
        Answer::ArpDefence
    }

    /// A Neighbour Solicitation for one of our addresses becomes a Neighbour Advertisement
    /// (RFC 4861 7.2.4): from the target address, hop limit 255, Override set, our MAC in a target
    /// link-layer option; Solicited set and sent to the solicitor, or, for duplicate address
    /// detection (source ::), Solicited clear and sent to all nodes.
    fn answer_solicitation(&self, tables: &Tables, frame: &mut Frame<'_>, l3: usize) -> Answer {
        let data = frame.data();
        let Some(Ok(ip)) = data.get(l3..).map(Ipv6Packet::new_checked) else { return Answer::NotOurs };
        if ip.version() != 6 || ip.next_header() != IpProtocol::Icmpv6 {
            return Answer::NotOurs;
        }
        let (src, dst, hop_limit) = (ip.src_addr(), ip.dst_addr(), ip.hop_limit());
        let Ok(icmp) = Icmpv6Packet::new_checked(ip.payload()) else { return Answer::NotOurs };
        if icmp.msg_type() != Icmpv6Message::NeighborSolicit {
            return Answer::NotOurs;
        }
        // Length checked for a solicitation's header (24 bytes), which holds the target.
        let target = icmp.target_addr();
        if !self.is_ours(tables, IpAddr::V6(target)) {
            return Answer::NotOurs;
        }
        // RFC 4861 7.1.1: hop limit 255, valid checksum, code 0, options of non-zero length (the
        // last three in smoltcp's parse); and for duplicate address detection, to the target's
        // solicited-node group and with no source link-layer option. (A multicast source is no
        // address to answer: RFC 4291 2.7.)
        let invalid = Answer::Invalid(DropReason::Malformed);
        let parsed = Icmpv6Repr::parse(&src, &dst, &icmp, &ChecksumCapabilities::default());
        let Ok(Icmpv6Repr::Ndisc(NdiscRepr::NeighborSolicit { lladdr, .. })) = parsed else { return invalid };
        let dad = src.is_unspecified();
        if hop_limit != 255 || src.is_multicast() || (dad && (lladdr.is_some() || dst != solicited_node(target))) {
            return invalid;
        }
        let (to, to_mac, flags) = if dad {
            (ALL_NODES, ALL_NODES_MAC, NdiscNeighborFlags::OVERRIDE)
        } else {
            let asker = match lladdr {
                Some(a) => match <[u8; 6]>::try_from(a.as_bytes()) {
                    Ok(mac) => mac,
                    Err(_) => return invalid,
                },
                // No source link-layer option: answer the frame's sender.
                None => match data.get(6..12).and_then(|m| <[u8; 6]>::try_from(m).ok()) {
                    Some(mac) => mac,
                    None => return Answer::NotOurs,
                },
            };
            (src, asker, NdiscNeighborFlags::SOLICITED | NdiscNeighborFlags::OVERRIDE)
        };
        let advert = Advert { mac: self.mac, target, to, flags };
        if frame.set_len(l3 + advert.ip_len()).is_none() {
            return Answer::Invalid(DropReason::NoHeadroom);
        }
        let Some((eth, ip)) = split(frame.data_mut(), l3) else { return Answer::NotOurs };
        set_macs(eth, to_mac, self.mac);
        advert.emit(ip);
        Answer::NeighbourAdvert
    }
}

/// A Neighbour Advertisement from `target` (at `mac`, in a target link-layer option) to `to`: what
/// both an answer to a solicitation and an unsolicited announcement send.
struct Advert {
    mac: [u8; 6],
    target: Ipv6Addr,
    to: Ipv6Addr,
    flags: NdiscNeighborFlags,
}

impl Advert {
    fn icmp(&self) -> Icmpv6Repr<'_> {
        Icmpv6Repr::Ndisc(NdiscRepr::NeighborAdvert {
            flags: self.flags,
            target_addr: self.target,
            lladdr: Some(RawHardwareAddress::from_bytes(&self.mac)),
        })
    }

    /// Length of the IPv6 packet: the 40-byte header and the advertisement.
    fn ip_len(&self) -> usize {
        IPV6_HEADER_LEN + self.icmp().buffer_len()
    }

    /// Writes the IPv6 packet into `ip`, which must be exactly [`Self::ip_len`] bytes (the length
    /// smoltcp's emitters need to never panic).
    fn emit(&self, ip: &mut [u8]) {
        let icmp = self.icmp();
        let header = Ipv6Repr {
            src_addr: self.target,
            dst_addr: self.to,
            next_header: IpProtocol::Icmpv6,
            payload_len: icmp.buffer_len(),
            hop_limit: 255,
        };
        let mut ip = Ipv6Packet::new_unchecked(ip);
        header.emit(&mut ip);
        let mut packet = Icmpv6Packet::new_unchecked(ip.payload_mut());
        icmp.emit(&self.target, &self.to, &mut packet, &ChecksumCapabilities::default());
    }
}

/// Writes into `buf` the frame that announces `addr` at `mac` to the whole segment, and returns its
/// length (`None` when `buf` is too short): for IPv4 a gratuitous ARP request (RFC 5227
/// announcement: sender and target both `addr`, broadcast), for IPv6 an unsolicited Neighbour
/// Advertisement (RFC 4861 7.2.6: to all nodes, Override set, Solicited clear, `mac` in a target
/// link-layer option). Neighbours that cached another MAC for `addr` (a load balancer that failed
/// over, a VIP that moved) update their entry at once instead of when it goes stale.
pub fn announcement(mac: [u8; 6], addr: IpAddr, buf: &mut [u8]) -> Option<usize> {
    /// The shortest Ethernet frame, FCS excluded.
    const MIN_FRAME_LEN: usize = 60;
    match addr {
        IpAddr::V4(a) => {
            let arp = announcement_arp(mac, a);
            // Padded with zeros to Ethernet's 60-byte minimum (without FCS): a NIC pads a short
            // frame itself, but a veth or a capture passes the 42 bytes on as they are.
            let len = (ETHERNET_LEN + arp.buffer_len()).max(MIN_FRAME_LEN);
            let (eth, rest) = buf.get_mut(..len)?.split_at_mut(ETHERNET_LEN);
            set_macs(eth, [0xff; 6], mac);
            eth[12..].copy_from_slice(&ETHERTYPE_ARP.to_be_bytes());
            let (arp_bytes, padding) = rest.split_at_mut(arp.buffer_len());
            arp.emit(&mut ArpPacket::new_unchecked(arp_bytes));
            padding.fill(0);
            Some(len)
        }
        IpAddr::V6(a) => {
            let advert = Advert { mac, target: a, to: ALL_NODES, flags: NdiscNeighborFlags::OVERRIDE };
            let len = ETHERNET_LEN + advert.ip_len();
            let (eth, rest) = buf.get_mut(..len)?.split_at_mut(ETHERNET_LEN);
            set_macs(eth, ALL_NODES_MAC, mac);
            eth[12..].copy_from_slice(&ETHERTYPE_IPV6.to_be_bytes());
            advert.emit(rest);
            Some(len)
        }
    }
}

/// An ARP announcement of `addr` at `mac` (RFC 5227): a request with both sender and target
/// protocol address `addr` and a zero target hardware address.
fn announcement_arp(mac: [u8; 6], addr: Ipv4Addr) -> ArpRepr {
    ArpRepr::EthernetIpv4 {
        operation: ArpOperation::Request,
        source_hardware_addr: EthernetAddress(mac),
        source_protocol_addr: addr,
        target_hardware_addr: EthernetAddress([0; 6]),
        target_protocol_addr: addr,
    }
}

/// Every address a responder answers for under `tables` (the VIPs of services that have it answer
/// neighbours, and the SNAT address of each family a NAT service uses), possibly with repeats: what
/// the control side steers ARP / NDP for, announces, and joins IPv6 solicited-node groups for.
pub fn addresses(tables: &Tables) -> impl Iterator<Item = IpAddr> + '_ {
    let node = tables.node();
    let services = tables.services();
    let nat = |v6: bool| services.iter().any(|s| s.mode == ForwardMode::Nat && s.key.vip.is_ipv6() == v6);
    let snat =
        [node.snat_v4.filter(|_| nat(false)).map(IpAddr::V4), node.snat_v6.filter(|_| nat(true)).map(IpAddr::V6)];
    services.iter().filter(|s| s.answer_neighbours).map(|s| s.key.vip).chain(snat.into_iter().flatten())
}

/// The offset of the L3 header and its EtherType, after at most [`MAX_VLAN_TAGS`] tags.
fn l3_of(frame: &[u8]) -> Option<(usize, u16)> {
    let mut at = ETHERNET_LEN - 2;
    for _ in 0..=MAX_VLAN_TAGS {
        let t = frame.get(at..at + 2)?;
        let ether_type = u16::from_be_bytes([t[0], t[1]]);
        if !matches!(ether_type, 0x8100 | 0x88a8 | 0x9100) {
            return Some((at + 2, ether_type));
        }
        at += VLAN_TAG_LEN;
    }
    None
}

/// The frame cut into its Ethernet part (with tags) and its L3 part.
fn split(data: &mut [u8], l3: usize) -> Option<(&mut [u8], &mut [u8])> {
    (l3 >= 12 && l3 <= data.len()).then(|| data.split_at_mut(l3))
}

/// Writes the Ethernet destination and source (the first 12 bytes; callers pass at least 12).
fn set_macs(eth: &mut [u8], dst: [u8; 6], src: [u8; 6]) {
    if let Some(macs) = eth.get_mut(..12) {
        macs[..6].copy_from_slice(&dst);
        macs[6..].copy_from_slice(&src);
    }
}

/// The solicited-node multicast group of `addr` (ff02::1:ff00:0/104 + its last 24 bits, RFC 4291),
/// where neighbour solicitations for `addr` are sent.
pub fn solicited_node(addr: Ipv6Addr) -> Ipv6Addr {
    let o = addr.octets();
    Ipv6Addr::from([0xff, 0x02, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0xff, o[13], o[14], o[15]])
}

#[cfg(test)]
mod tests;
