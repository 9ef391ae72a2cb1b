//! The XDP program that steers load-balancer traffic to the AF_XDP sockets and leaves everything else
//! to the kernel, as Katran's program does in BPF.
//!
//! For each frame: parse Ethernet (behind up to two VLAN tags, TPIDs 0x8100, 0x88a8 or 0x9100, as
//! lb-core reads them; a third passes) and IPv4 / IPv6, look the destination address up in the
//! address map (16-byte keys; IPv4 as `::ffff:a.b.c.d`). No entry: `XDP_PASS`. An entry says what of
//! that address's traffic the load balancer wants:
//! - **whole address**: every frame (tests and benchmarks);
//! - **services** (a VIP): TCP and UDP frames whose (address, destination port, protocol) is in the
//!   service map, or whose port is in the entry's SNAT range if it has one (a VIP that is also a
//!   SNAT address, such as a node address serving NodePorts); ICMP errors about the load balancer's
//!   flows, which lb-core translates for the flow they quote: the quoted packet is TCP or UDP from
//!   the address and a service's port or a port of the SNAT range, as for SNAT addresses below (an
//!   error about the host's own connection on a node address stays with the kernel); IPv4
//!   fragments and IPv6 extension headers (0, 43, 44, 51, 60; a routing header with segments left
//!   ends the walk, the packet being on its way elsewhere), which lb-core parses or counts (but
//!   ICMPv6 behind up to four of them is judged as without them: lb-core passes an echo or an error
//!   about no flow of ours); frames too short for their L4 header, which lb-core counts;
//! - **SNAT port range** alone (a full-NAT source address, which may be the node's own): only what
//!   lb-core can map to a NAT flow, so the node's own traffic to the address stays with the kernel:
//!   - TCP and UDP frames to a port in the range (the replies of NAT flows), or too short for their
//!     ports; in IPv6, after up to four extension headers: hop-by-hop options (first only), routing
//!     with no segments left, destination options, authentication, and a Fragment header that
//!     makes no fragment (offset 0, M clear);
//!   - ICMP errors (IPv4 types 3, 11, 12; ICMPv6 types 1 to 4, the ones lb-core maps) whose quoted
//!     packet is one a NAT flow sent: TCP or UDP from the address itself and a port in the range, not
//!     a later fragment (in IPv6 behind up to four extension headers, as above);
//!   - no fragment, IPv4 or IPv6: lb-core drops every one, so a fragmented datagram to the node
//!     reaches the kernel whole. What is lost: a NAT reply (or an error's quote) behind more than four
//!     extension headers passes to the kernel, which drops it, where lb-core would translate it;
//! - **neighbour** alone: no IP frame (only the neighbour discovery below);
//! - **held by the host** (with services or a SNAT range: a node address serving NodePorts, a SNAT
//!   address that is the node's): the SNAT address rules above, with the service map's ports added
//!   wherever the SNAT range is judged (TCP and UDP destination ports, the quoted source port of an
//!   ICMP error). No fragment and no IPv4 header lb-core would count as bad is steered, so the
//!   host's own fragmented datagrams reach the kernel whole (a fragmented datagram to one of its
//!   services goes there too, and the kernel answers it as for a port with no listener, where
//!   lb-core would drop and count it).
//!
//! Everything else to those addresses (ping, SSH to a node address used for SNAT, a port no service
//! has, an ICMP error about the node's own connection) passes to the kernel, so it is answered or
//! refused there instead of being dropped in userspace. Steered frames go to the XSKMAP slot of their
//! RX queue (`bpf_redirect_map`); one whose slot is empty (a queue no loop serves, a socket not yet
//! bound) gets the [`MissingSocket`] action and is counted ([`SteeringCounters::no_socket`]).
//!
//! **Neighbour discovery** for addresses whose entry has the neighbour flag (the addresses lb-core's
//! ARP / NDP responder answers for, `lb_core::neighbour`), whatever else the entry steers:
//! - an ARP request (Ethernet / IPv4, operation 1) whose target protocol address (ARP offset 24) is
//!   such an address;
//! - an ARP request or reply (operation 2) whose sender protocol address (ARP offset 14) is such an
//!   address: another host claiming it (a gratuitous ARP), which the responder defends (RFC 5227);
//! - an ICMPv6 Neighbour Solicitation (next header 58 right after the fixed IPv6 header, type 135,
//!   at least 24 bytes) whose target address (ICMPv6 offset 8) is such an address, whether sent to the
//!   solicited-node group or (unreachability detection) to the address itself.
//!
//! Every other ARP and NDP frame (other replies, advertisements, other targets, the host's own neighbours, anything too
//! short to hold its target) passes to the kernel, so the host's own ARP / NDP keeps working; without
//! the flag (responder off) nothing of ARP / NDP is steered. The control side edits the maps live;
//! the program never changes.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv6Addr};

use super::asm::{Asm, Cond, Label, Reg, Size};
use super::{AttachMode, BpfError, Link, MAP_TYPE_HASH, MAP_TYPE_PERCPU_ARRAY, MAP_TYPE_XSKMAP, Map, Program};

/// XDP verdicts (enum xdp_action).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum XdpAction {
    /// XDP_ABORTED: program error.
    Aborted,
    /// XDP_DROP.
    Drop,
    /// XDP_PASS: on to the kernel's stack.
    Pass,
    /// XDP_TX: back out of the same port.
    Tx,
    /// XDP_REDIRECT: to the AF_XDP socket (or another map target).
    Redirect,
    /// A value the kernel should never return.
    Unknown(u32),
}

impl From<u32> for XdpAction {
    fn from(v: u32) -> Self {
        match v {
            0 => XdpAction::Aborted,
            1 => XdpAction::Drop,
            2 => XdpAction::Pass,
            3 => XdpAction::Tx,
            4 => XdpAction::Redirect,
            other => XdpAction::Unknown(other),
        }
    }
}

/// What a VIP frame gets when no AF_XDP socket is bound to its RX queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MissingSocket {
    /// Hand it to the kernel (the default: the node keeps working while sockets come and go).
    #[default]
    Pass,
    /// Drop it (tests use this to tell "VIP, no socket" from "not a VIP").
    Drop,
}

/// Sizes and behaviour of the steering program.
#[derive(Debug, Clone, Copy)]
pub struct SteeringConfig {
    /// Highest RX queue index + 1 that may have a socket.
    pub queues: u32,
    /// Most steered addresses (VIPs and SNAT addresses).
    pub max_vips: u32,
    /// Most (address, port, protocol) services.
    pub max_services: u32,
    /// What a VIP frame gets on a queue without a socket.
    pub missing_socket: MissingSocket,
}

impl Default for SteeringConfig {
    fn default() -> Self {
        SteeringConfig { queues: 64, max_vips: 4096, max_services: 1 << 17, missing_socket: MissingSocket::Pass }
    }
}

/// Helper numbers (include/uapi/linux/bpf.h).
const HELPER_MAP_LOOKUP_ELEM: i32 = 1;
const HELPER_REDIRECT_MAP: i32 = 51;
/// Offsets in `struct xdp_md`.
const XDP_MD_DATA: i16 = 0;
const XDP_MD_DATA_END: i16 = 4;
const XDP_MD_RX_QUEUE_INDEX: i16 = 16;
const XDP_PASS: i32 = 2;
const XDP_DROP: i32 = 1;
const XDP_REDIRECT: i32 = 4;

/// An ethertype as the program sees it after a 16-bit load of the wire bytes.
fn ethertype(t: u16) -> i32 {
    i32::from(u16::from_ne_bytes(t.to_be_bytes()))
}

/// The VIP map key of an address: IPv6 as is, IPv4 mapped into `::ffff:0:0/96`.
pub fn vip_key(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
        IpAddr::V6(a) => a.octets(),
    }
}

/// Address-map value flags (`AddrEntry::flags`).
const STEER_WHOLE: u32 = 1;
const STEER_SERVICES: u32 = 2;
const STEER_SNAT: u32 = 4;
const STEER_NEIGHBOUR: u32 = 8;
const STEER_HOST: u32 = 16;

/// The address map's value: which traffic to the address is steered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct AddrEntry {
    flags: u32,
    /// The SNAT port range, inclusive (with [`STEER_SNAT`]).
    ports: (u16, u16),
}

impl AddrEntry {
    /// The 8 bytes the program reads: flags (u32), first port (u16), last port (u16), native order.
    fn bytes(self) -> [u8; 8] {
        let mut v = [0u8; 8];
        v[..4].copy_from_slice(&self.flags.to_ne_bytes());
        v[4..6].copy_from_slice(&self.ports.0.to_ne_bytes());
        v[6..].copy_from_slice(&self.ports.1.to_ne_bytes());
        v
    }
}

/// The service map key: address, destination port (network order), protocol, a zero byte.
fn service_key(addr: IpAddr, port: u16, proto: u8) -> [u8; 20] {
    let mut k = [0u8; 20];
    k[..16].copy_from_slice(&vip_key(addr));
    k[16..18].copy_from_slice(&port.to_be_bytes());
    k[18] = proto;
    k
}

/// Stack slots of the program (offsets from r10): the 20-byte service key (its first 16 bytes are the
/// address key) and the address entry found.
const KEY: i16 = -24;
const KEY_PORT: i16 = -8;
const KEY_PROTO: i16 = -6;
const KEY_PAD: i16 = -5;
const ENTRY_FLAGS: i16 = -32;
const ENTRY_FIRST_PORT: i16 = -28;
const ENTRY_LAST_PORT: i16 = -26;

/// r9's low 16 bits: nonzero when a frame to a service address goes to userspace whatever its port
/// (the IPv4 fragment bits, or 1 for a bad header length or an IPv6 extension header).
const R9_ALWAYS: i32 = 0xffff;
/// r9's bit for an IPv6 frame.
const R9_V6: i32 = 0x1_0000;

/// Most IPv6 extension headers walked before the transport header of a frame to a SNAT address, and
/// again in the packet an ICMPv6 error to it quotes (each step costs the verifier a branch per kind).
const EXTENSION_STEPS: usize = 4;

/// Builds the program text with `addrs`, `services`, `xsks` and `no_socket` (a per-CPU array of one
/// u64: steered frames whose RX queue had no socket) as the map descriptors.
///
/// Registers across the lookups: r6 = ctx, r7 = the L4 header (a packet pointer), r8 = the L4
/// protocol, r9 = `R9_V6` for IPv6 and, in `R9_ALWAYS`, whether a frame to a service address goes
/// to userspace whatever its port (IPv4 fragment or bad header length, IPv6 extension header).
pub fn steering_program(
    addrs: i32,
    services: i32,
    xsks: i32,
    no_socket: i32,
    missing_socket: MissingSocket,
) -> Result<Vec<super::asm::Insn>, BpfError> {
    use Reg::*;
    let mut a = Asm::new();
    let pass = a.new_label();
    let redirect = a.new_label();
    let vlan = [a.new_label(), a.new_label()];
    let neighbour = a.new_label();
    let arp = [a.new_label(), a.new_label(), a.new_label()];
    let arp_sender = [a.new_label(), a.new_label(), a.new_label()];
    let arp_reload = [a.new_label(), a.new_label(), a.new_label()];
    let not_ours = [a.new_label(), a.new_label(), a.new_label()];
    let v6_dst = [a.new_label(), a.new_label(), a.new_label()];
    let lookup = a.new_label();
    let services_v6 = a.new_label();
    let services_always = a.new_label();
    let services6_l4 = a.new_label();
    let services_rules = a.new_label();
    let strict_rules = a.new_label();
    let strict6 = a.new_label();
    let strict6_l4 = a.new_label();
    let icmp4_error = a.new_label();
    let icmp6_error = a.new_label();
    let quote_l4 = a.new_label();
    let quote_port = a.new_label();
    let icmp4_quote = a.new_label();
    let port_check = a.new_label();
    let ports = a.new_label();
    let service = a.new_label();
    let v4 = [a.new_label(), a.new_label(), a.new_label()];
    let v6 = [a.new_label(), a.new_label(), a.new_label()];
    let v4_bad_header = [a.new_label(), a.new_label(), a.new_label()];
    let v6_extension = [a.new_label(), a.new_label(), a.new_label()];
    // Offsets of the L3 header: untagged, one VLAN tag, two (QinQ).
    const L3: [i16; 3] = [14, 18, 22];

    // r6 = ctx (kept across helper calls); r2 = data; r3 = data_end.
    a.mov(R6, R1).load(Size::W, R2, R6, XDP_MD_DATA).load(Size::W, R3, R6, XDP_MD_DATA_END);

    // Ethernet header present? Dispatch on the ethertype; up to two VLAN tags (802.1Q, 802.1ad, the
    // older QinQ 0x9100, in any order, as lb-core reads them), each moving the next ethertype 4 bytes
    // on. A third tag passes (lb-core passes it too).
    for (i, l3) in L3.into_iter().enumerate() {
        if i > 0 {
            a.bind(vlan[i - 1]);
        }
        a.mov(R4, R2).add_imm(R4, i32::from(l3)).jmp(Cond::Gt, R4, R3, pass);
        a.load(Size::H, R5, R2, l3 - 2)
            .jmp_imm(Cond::Eq, R5, ethertype(0x0800), v4[i])
            .jmp_imm(Cond::Eq, R5, ethertype(0x86dd), v6[i])
            .jmp_imm(Cond::Eq, R5, ethertype(0x0806), arp[i]);
        if let Some(&tag) = vlan.get(i) {
            for tpid in [0x8100, 0x88a8, 0x9100] {
                a.jmp_imm(Cond::Eq, R5, ethertype(tpid), tag);
            }
        }
        a.ja(pass);
    }

    for (i, l3) in L3.into_iter().enumerate() {
        // IPv4: key = ::ffff:<daddr>; r8 = protocol; r9 = fragment bits (MF, offset); r7 = L4.
        a.bind(v4[i]).mov(R4, R2).add_imm(R4, i32::from(l3) + 20).jmp(Cond::Gt, R4, R3, pass);
        a.load(Size::W, R5, R2, l3 + 16)
            .store_imm(Size::DW, R10, KEY, 0)
            .store_imm(Size::W, R10, KEY + 8, i32::from_ne_bytes([0, 0, 0xff, 0xff]))
            .store(Size::W, R10, KEY + 12, R5);
        // Bytes 6-7 loaded as one u16: the flags/offset field with the MF bit and the 13-bit offset
        // in the mask 0xff3f, whatever the host's byte order (DF, 0x40 in byte 6, is not in it).
        a.load(Size::B, R8, R2, l3 + 9)
            .load(Size::H, R9, R2, l3 + 6)
            .and_imm(R9, i32::from(u16::from_ne_bytes([0x3f, 0xff])))
            .load(Size::B, R5, R2, l3)
            .and_imm(R5, 0xf)
            .lsh_imm(R5, 2)
            .jmp_imm(Cond::Lt, R5, 20, v4_bad_header[i])
            .mov(R7, R2)
            .add(R7, R5)
            .add_imm(R7, i32::from(l3))
            .ja(lookup);
        a.bind(v4_bad_header[i]).mov(R7, R2).mov_imm(R9, 1).ja(lookup);

        // ARP: an Ethernet / IPv4 request (hardware type 1, protocol 0x0800, lengths 6 and 4,
        // operation 1: the first 8 bytes, as two words); key = ::ffff:<target protocol address>.
        // A request for another target, and a reply (operation 2), are looked up by the sender
        // protocol address: one from an address the responder answers for is another host
        // claiming it (a gratuitous ARP), which the responder defends (RFC 5227).
        a.bind(arp[i]).mov(R4, R2).add_imm(R4, i32::from(l3) + 28).jmp(Cond::Gt, R4, R3, pass);
        a.load(Size::W, R5, R2, l3)
            .jmp_imm(Cond::Ne, R5, i32::from_ne_bytes([0, 1, 8, 0]), pass)
            .load(Size::W, R5, R2, l3 + 4)
            .jmp_imm(Cond::Eq, R5, i32::from_ne_bytes([6, 4, 0, 2]), arp_sender[i])
            .jmp_imm(Cond::Ne, R5, i32::from_ne_bytes([6, 4, 0, 1]), pass)
            .load(Size::W, R5, R2, l3 + 24)
            .store_imm(Size::DW, R10, KEY, 0)
            .store_imm(Size::W, R10, KEY + 8, i32::from_ne_bytes([0, 0, 0xff, 0xff]))
            .store(Size::W, R10, KEY + 12, R5)
            .ld_map_fd(R1, addrs)
            .mov(R2, R10)
            .add_imm(R2, i32::from(KEY))
            .call(HELPER_MAP_LOOKUP_ELEM)
            .jmp_imm(Cond::Eq, R0, 0, arp_reload[i])
            .load(Size::W, R1, R0, 0)
            .and_imm(R1, STEER_NEIGHBOUR as i32)
            .jmp_imm(Cond::Ne, R1, 0, redirect);
        // Not a target of ours: the sender next (the helper call clobbered r2 and r3).
        a.bind(arp_reload[i])
            .load(Size::W, R2, R6, XDP_MD_DATA)
            .load(Size::W, R3, R6, XDP_MD_DATA_END)
            .mov(R4, R2)
            .add_imm(R4, i32::from(l3) + 28)
            .jmp(Cond::Gt, R4, R3, pass);
        a.bind(arp_sender[i])
            .load(Size::W, R5, R2, l3 + 14)
            .store_imm(Size::DW, R10, KEY, 0)
            .store_imm(Size::W, R10, KEY + 8, i32::from_ne_bytes([0, 0, 0xff, 0xff]))
            .store(Size::W, R10, KEY + 12, R5)
            .ja(neighbour);

        // IPv6: r8 = next header. A Neighbour Solicitation is looked up by its target first.
        a.bind(v6[i]).mov(R4, R2).add_imm(R4, i32::from(l3) + 40).jmp(Cond::Gt, R4, R3, pass);
        a.load(Size::B, R8, R2, l3 + 6).jmp_imm(Cond::Ne, R8, 58, v6_dst[i]);
        a.mov(R4, R2).add_imm(R4, i32::from(l3) + 64).jmp(Cond::Gt, R4, R3, v6_dst[i]);
        a.load(Size::B, R5, R2, l3 + 40)
            .jmp_imm(Cond::Ne, R5, 135, v6_dst[i])
            .load(Size::DW, R5, R2, l3 + 48)
            .store(Size::DW, R10, KEY, R5)
            .load(Size::DW, R5, R2, l3 + 56)
            .store(Size::DW, R10, KEY + 8, R5)
            .ld_map_fd(R1, addrs)
            .mov(R2, R10)
            .add_imm(R2, i32::from(KEY))
            .call(HELPER_MAP_LOOKUP_ELEM)
            .jmp_imm(Cond::Eq, R0, 0, not_ours[i])
            .load(Size::W, R1, R0, 0)
            .and_imm(R1, STEER_NEIGHBOUR as i32)
            .jmp_imm(Cond::Ne, R1, 0, redirect);
        // Not a target of ours: on as any IPv6 frame (the helper call clobbered r2 and r3; r8 is kept).
        a.bind(not_ours[i])
            .load(Size::W, R2, R6, XDP_MD_DATA)
            .load(Size::W, R3, R6, XDP_MD_DATA_END)
            .mov(R4, R2)
            .add_imm(R4, i32::from(l3) + 40)
            .jmp(Cond::Gt, R4, R3, pass);
        // key = daddr; r7 = the header after the fixed one.
        a.bind(v6_dst[i])
            .load(Size::DW, R5, R2, l3 + 24)
            .store(Size::DW, R10, KEY, R5)
            .load(Size::DW, R5, R2, l3 + 32)
            .store(Size::DW, R10, KEY + 8, R5)
            .mov(R7, R2)
            .add_imm(R7, i32::from(l3) + 40)
            .mov_imm(R9, R9_V6);
        for ext in [0, 43, 44, 51, 60] {
            a.jmp_imm(Cond::Eq, R8, ext, v6_extension[i]);
        }
        a.ja(lookup);
        a.bind(v6_extension[i]).mov_imm(R9, R9_V6 | 1).ja(lookup);
    }

    // An address the load balancer wants something of? Keep its entry on the stack, and sort by what
    // it steers: everything; a service address's rules; a SNAT address's; nothing but neighbour
    // discovery (already steered above), so every IP frame to it passes.
    a.bind(lookup).ld_map_fd(R1, addrs).mov(R2, R10).add_imm(R2, i32::from(KEY)).call(HELPER_MAP_LOOKUP_ELEM);
    a.jmp_imm(Cond::Eq, R0, 0, pass);
    a.load(Size::W, R1, R0, 0)
        .store(Size::W, R10, ENTRY_FLAGS, R1)
        .load(Size::H, R2, R0, 4)
        .store(Size::H, R10, ENTRY_FIRST_PORT, R2)
        .load(Size::H, R2, R0, 6)
        .store(Size::H, R10, ENTRY_LAST_PORT, R2);
    // data_end again (the helper call clobbered r3).
    a.load(Size::W, R3, R6, XDP_MD_DATA_END);
    a.mov(R2, R1).and_imm(R2, STEER_WHOLE as i32).jmp_imm(Cond::Ne, R2, 0, redirect);
    a.mov(R2, R1).and_imm(R2, STEER_HOST as i32).jmp_imm(Cond::Ne, R2, 0, strict_rules);
    a.mov(R2, R1).and_imm(R2, STEER_SERVICES as i32).jmp_imm(Cond::Ne, R2, 0, services_rules);
    a.mov(R2, R1).and_imm(R2, STEER_SNAT as i32).jmp_imm(Cond::Ne, R2, 0, strict_rules);
    a.ja(pass);

    // A service address (perhaps also a SNAT address): fragments, extension headers, TCP and UDP by
    // their port, ICMP errors by the packet they quote.
    a.bind(services_rules).mov(R1, R9).and_imm(R1, R9_ALWAYS).jmp_imm(Cond::Ne, R1, 0, services_always);
    a.jmp_imm(Cond::Eq, R8, 6, ports).jmp_imm(Cond::Eq, R8, 17, ports);
    a.mov(R1, R9).and_imm(R1, R9_V6).jmp_imm(Cond::Ne, R1, 0, services_v6);
    a.jmp_imm(Cond::Eq, R8, 1, icmp4_error).ja(pass);
    a.bind(services_v6).jmp_imm(Cond::Eq, R8, 58, icmp6_error).ja(pass);
    // An IPv4 fragment or bad header; IPv6 extension headers, past which ICMPv6 is judged as without
    // them (lb-core passes an echo, or an error about no flow of ours: on AF_XDP, a drop).
    a.bind(services_always).mov(R1, R9).and_imm(R1, R9_V6).jmp_imm(Cond::Eq, R1, 0, redirect);
    walk_extensions(&mut a, false, services6_l4, redirect, redirect);
    a.bind(services6_l4).jmp_imm(Cond::Eq, R8, 58, icmp6_error).ja(redirect);

    // A SNAT address without services, or any address the host holds: TCP and UDP to a port of the
    // SNAT range or of a service, and ICMP errors about such flows. An IPv4 fragment (or a bad header
    // length) stays with the kernel: lb-core drops every fragment, and the host's own datagrams
    // must reach the kernel whole.
    a.bind(strict_rules).mov(R1, R9).and_imm(R1, R9_V6).jmp_imm(Cond::Ne, R1, 0, strict6);
    a.jmp_imm(Cond::Ne, R9, 0, pass)
        .jmp_imm(Cond::Eq, R8, 6, ports)
        .jmp_imm(Cond::Eq, R8, 17, ports)
        .jmp_imm(Cond::Eq, R8, 1, icmp4_error)
        .ja(pass);
    // IPv6: past the extension headers lb-core parses, to the transport header.
    a.bind(strict6);
    walk_extensions(&mut a, false, strict6_l4, redirect, pass);
    a.bind(strict6_l4)
        .jmp_imm(Cond::Eq, R8, 6, ports)
        .jmp_imm(Cond::Eq, R8, 17, ports)
        .jmp_imm(Cond::Eq, R8, 58, icmp6_error)
        .ja(pass);

    // An ICMP error about a flow of ours quotes a packet the load balancer sent from the address (the
    // key on the stack), TCP or UDP: a NAT flow's to a backend, from a port of the SNAT range; a
    // service's reply to a client, from the service's port (in DSR and tunnel modes the backend
    // sent it, from the VIP). lb-core finds the flow by that port (a quoted later fragment has
    // none); any other error (about the host's own connections, on a node address) is the kernel's.
    // IPv4: types 3, 11, 12; the quoted header (version 4, IHL at least 5) and 8 bytes after it.
    a.bind(icmp4_error).mov(R4, R7).add_imm(R4, 8 + 20).jmp(Cond::Gt, R4, R3, pass);
    a.load(Size::B, R4, R7, 0).jmp_imm(Cond::Eq, R4, 3, icmp4_quote).jmp_imm(Cond::Eq, R4, 11, icmp4_quote).jmp_imm(
        Cond::Ne,
        R4,
        12,
        pass,
    );
    a.bind(icmp4_quote)
        .load(Size::B, R5, R7, 8)
        .mov(R4, R5)
        .and_imm(R4, 0xf0)
        .jmp_imm(Cond::Ne, R4, 0x40, pass)
        .and_imm(R5, 0xf)
        .lsh_imm(R5, 2)
        .jmp_imm(Cond::Lt, R5, 20, pass)
        .load(Size::H, R4, R7, 8 + 6)
        .and_imm(R4, i32::from(u16::from_ne_bytes([0x1f, 0xff])))
        .jmp_imm(Cond::Ne, R4, 0, pass)
        .load(Size::W, R4, R7, 8 + 12)
        .load(Size::W, R1, R10, KEY + 12)
        .jmp(Cond::Ne, R4, R1, pass)
        .load(Size::B, R8, R7, 8 + 9)
        .add(R7, R5)
        .add_imm(R7, 8)
        .ja(quote_l4);
    // IPv6: types 1 to 4; the quoted fixed header (version 6) and its extension headers.
    a.bind(icmp6_error).mov(R4, R7).add_imm(R4, 8 + 40).jmp(Cond::Gt, R4, R3, pass);
    a.load(Size::B, R4, R7, 0)
        .jmp_imm(Cond::Eq, R4, 0, pass)
        .jmp_imm(Cond::Gt, R4, 4, pass)
        .load(Size::B, R4, R7, 8)
        .and_imm(R4, 0xf0)
        .jmp_imm(Cond::Ne, R4, 0x60, pass)
        .load(Size::DW, R4, R7, 8 + 8)
        .load(Size::DW, R1, R10, KEY)
        .jmp(Cond::Ne, R4, R1, pass)
        .load(Size::DW, R4, R7, 8 + 16)
        .load(Size::DW, R1, R10, KEY + 8)
        .jmp(Cond::Ne, R4, R1, pass)
        .load(Size::B, R8, R7, 8 + 6)
        .add_imm(R7, 8 + 40);
    walk_extensions(&mut a, true, quote_l4, pass, pass);
    // The quoted transport header: TCP or UDP; its source port (r4, as on the wire) is then judged
    // as a frame's destination port is.
    a.bind(quote_l4).jmp_imm(Cond::Eq, R8, 6, quote_port).jmp_imm(Cond::Ne, R8, 17, pass);
    a.bind(quote_port).mov(R4, R7).add_imm(R4, 8).jmp(Cond::Gt, R4, R3, pass);
    a.load(Size::H, R4, R7, 0).ja(port_check);

    // TCP / UDP: r4 = the destination port as on the wire.
    a.bind(ports).mov(R4, R7).add_imm(R4, 4).jmp(Cond::Gt, R4, R3, redirect);
    a.load(Size::H, R4, R7, 2);
    // In the SNAT range? (port as a number in r5)
    a.bind(port_check).load(Size::W, R1, R10, ENTRY_FLAGS).and_imm(R1, STEER_SNAT as i32).jmp_imm(
        Cond::Eq,
        R1,
        0,
        service,
    );
    a.mov(R5, R4)
        .be16(R5)
        .load(Size::H, R1, R10, ENTRY_FIRST_PORT)
        .jmp(Cond::Lt, R5, R1, service)
        .load(Size::H, R1, R10, ENTRY_LAST_PORT)
        .jmp(Cond::Gt, R5, R1, service)
        .ja(redirect);
    // A service on this (address, port, protocol)?
    a.bind(service).load(Size::W, R1, R10, ENTRY_FLAGS).and_imm(R1, STEER_SERVICES as i32).jmp_imm(
        Cond::Eq,
        R1,
        0,
        pass,
    );
    a.store(Size::H, R10, KEY_PORT, R4)
        .store(Size::B, R10, KEY_PROTO, R8)
        .store_imm(Size::B, R10, KEY_PAD, 0)
        .ld_map_fd(R1, services)
        .mov(R2, R10)
        .add_imm(R2, i32::from(KEY))
        .call(HELPER_MAP_LOOKUP_ELEM)
        .jmp_imm(Cond::Eq, R0, 0, pass);

    // To the socket of this RX queue (the fallback action if the slot is empty).
    let fallback = match missing_socket {
        MissingSocket::Pass => XDP_PASS,
        MissingSocket::Drop => XDP_DROP,
    };
    // A frame whose queue has no socket (a queue no loop serves, a socket not yet bound) gets the
    // fallback and is counted: a compare more per redirected frame, the counting only on a miss.
    let missed = a.new_label();
    let counted = a.new_label();
    a.bind(redirect)
        .load(Size::W, R2, R6, XDP_MD_RX_QUEUE_INDEX)
        .ld_map_fd(R1, xsks)
        .mov_imm(R3, fallback)
        .call(HELPER_REDIRECT_MAP)
        .jmp_imm(Cond::Ne, R0, XDP_REDIRECT, missed)
        .exit();
    a.bind(missed)
        .store_imm(Size::W, R10, KEY, 0)
        .ld_map_fd(R1, no_socket)
        .mov(R2, R10)
        .add_imm(R2, i32::from(KEY))
        .call(HELPER_MAP_LOOKUP_ELEM)
        .jmp_imm(Cond::Eq, R0, 0, counted)
        // This CPU's own copy: no other CPU writes it, so no atomic add is needed.
        .load(Size::DW, R1, R0, 0)
        .add_imm(R1, 1)
        .store(Size::DW, R0, 0, R1);
    a.bind(counted).ret(fallback);

    // ARP for an address with the neighbour flag: to the responder.
    a.bind(neighbour).ld_map_fd(R1, addrs).mov(R2, R10).add_imm(R2, i32::from(KEY)).call(HELPER_MAP_LOOKUP_ELEM);
    a.jmp_imm(Cond::Eq, R0, 0, pass)
        .load(Size::W, R1, R0, 0)
        .and_imm(R1, STEER_NEIGHBOUR as i32)
        .jmp_imm(Cond::Ne, R1, 0, redirect)
        .ja(pass);

    a.bind(pass).ret(XDP_PASS);
    Ok(a.finish()?)
}

/// Emits a walk over the IPv6 extension headers lb-core parses (`lb_core::packet`), from the header
/// r7 points at, of type r8: hop-by-hop options (first only), routing (with no segments left; one
/// with segments left ends the walk there, as a header of type 43), destination options and
/// authentication headers are stepped over by their length, a Fragment header by its 8 bytes when
/// its offset is 0 and, unless in a `quote`, no more fragments follow (lb-core drops fragments; a
/// quote's first fragment has its ports). Jumps to `done` with r7 and r8 at the first other header
/// (or an extension header after [`EXTENSION_STEPS`]), to `pass` at a fragment, to `short` at a
/// header the frame cuts. Uses r4 and r5; r3 is data_end.
fn walk_extensions(a: &mut Asm, quote: bool, done: Label, short: Label, pass: Label) {
    use Reg::*;
    let fragment_bits = if quote { [0xff, 0xf8] } else { [0xff, 0xf9] };
    for step in 0..EXTENSION_STEPS {
        let (routing, options, auth, fragment, next) =
            (a.new_label(), a.new_label(), a.new_label(), a.new_label(), a.new_label());
        if step == 0 {
            a.jmp_imm(Cond::Eq, R8, 0, options);
        }
        a.jmp_imm(Cond::Eq, R8, 43, routing)
            .jmp_imm(Cond::Eq, R8, 60, options)
            .jmp_imm(Cond::Eq, R8, 51, auth)
            .jmp_imm(Cond::Eq, R8, 44, fragment)
            .ja(done);
        // A routing header with segments left (byte 3) ends the walk, as in lb-core: the packet is
        // on its way to another destination, so what follows is no flow of this address's.
        a.bind(routing).mov(R4, R7).add_imm(R4, 8).jmp(Cond::Gt, R4, R3, short);
        a.load(Size::B, R5, R7, 3).jmp_imm(Cond::Ne, R5, 0, done);
        // Next header in byte 0, length in 8-byte units past the first 8 in byte 1.
        a.bind(options).mov(R4, R7).add_imm(R4, 8).jmp(Cond::Gt, R4, R3, short);
        a.load(Size::B, R5, R7, 1).add_imm(R5, 1).lsh_imm(R5, 3).load(Size::B, R8, R7, 0).add(R7, R5).ja(next);
        // Authentication Header: at least 12 bytes; length in 4-byte units past the first 8.
        a.bind(auth).mov(R4, R7).add_imm(R4, 12).jmp(Cond::Gt, R4, R3, short);
        a.load(Size::B, R5, R7, 1).add_imm(R5, 2).lsh_imm(R5, 2).load(Size::B, R8, R7, 0).add(R7, R5).ja(next);
        // Bytes 2-3 loaded as one u16: the 13-bit offset and the M bit.
        a.bind(fragment).mov(R4, R7).add_imm(R4, 8).jmp(Cond::Gt, R4, R3, short);
        a.load(Size::H, R4, R7, 2)
            .and_imm(R4, i32::from(u16::from_ne_bytes(fragment_bits)))
            .jmp_imm(Cond::Ne, R4, 0, pass)
            .load(Size::B, R8, R7, 0)
            .add_imm(R7, 8);
        a.bind(next);
    }
    a.ja(done);
}

/// What the steering program sends to the sockets; everything else to these addresses, and all
/// traffic to other addresses, stays with the kernel.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SteeringSet {
    /// Virtual services as (VIP, port, IP protocol number: 6 TCP, 17 UDP).
    pub services: BTreeSet<(IpAddr, u16, u8)>,
    /// Full-NAT source addresses with their port range (inclusive).
    pub snat: BTreeMap<IpAddr, (u16, u16)>,
    /// Addresses whose every frame is steered (tests and benchmarks).
    pub whole: BTreeSet<IpAddr>,
    /// Addresses whose ARP requests and Neighbour Solicitations (and ARP frames from them) are
    /// steered, for the worker's responder to answer (`lb_core::neighbour::addresses`); empty when
    /// the responder is off.
    pub neighbour: BTreeSet<IpAddr>,
    /// Of the addresses above, those the host holds (a node address serving NodePorts, a SNAT
    /// address that is the node's): their fragments, and ICMP errors about no flow of ours, stay
    /// with the kernel, which needs them for the host's own traffic. Adds no address.
    pub host: BTreeSet<IpAddr>,
}

impl SteeringSet {
    /// How many entries of the address map ([`SteeringConfig::max_vips`]) this set takes: each
    /// address once, whatever it is steered for.
    pub fn address_count(&self) -> usize {
        self.addresses().len()
    }

    /// What both `self` and `other` steer, field by field: the services, whole addresses and
    /// neighbour addresses of both; each SNAT address of both with the ports both ranges hold (none
    /// in common: not steered); and the host marks of either, since a mark steers less of its
    /// address (no fragments, no ICMP error about the host's own connections). Every frame it steers
    /// is steered by each set, and it needs no more map entries than either.
    ///
    /// The control side steers it while the workers change from tables steered by one set to
    /// tables steered by the other, so that no frame reaches a worker whose tables do not serve it.
    #[must_use]
    pub fn intersection(&self, other: &SteeringSet) -> SteeringSet {
        let snat = self
            .snat
            .iter()
            .filter_map(|(addr, &(lo, hi))| {
                let &(other_lo, other_hi) = other.snat.get(addr)?;
                let (lo, hi) = (lo.max(other_lo), hi.min(other_hi));
                (lo <= hi).then_some((*addr, (lo, hi)))
            })
            .collect();
        SteeringSet {
            services: self.services.intersection(&other.services).copied().collect(),
            snat,
            whole: self.whole.intersection(&other.whole).copied().collect(),
            neighbour: self.neighbour.intersection(&other.neighbour).copied().collect(),
            host: self.host.union(&other.host).copied().collect(),
        }
    }

    /// The address map this set needs.
    fn addresses(&self) -> BTreeMap<IpAddr, AddrEntry> {
        let mut m: BTreeMap<IpAddr, AddrEntry> = BTreeMap::new();
        for &(vip, _, _) in &self.services {
            m.entry(vip).or_default().flags |= STEER_SERVICES;
        }
        for (&addr, &ports) in &self.snat {
            let e = m.entry(addr).or_default();
            e.flags |= STEER_SNAT;
            e.ports = ports;
        }
        for &addr in &self.whole {
            m.entry(addr).or_default().flags |= STEER_WHOLE;
        }
        for &addr in &self.neighbour {
            m.entry(addr).or_default().flags |= STEER_NEIGHBOUR;
        }
        for addr in &self.host {
            if let Some(e) = m.get_mut(addr) {
                e.flags |= STEER_HOST;
            }
        }
        m
    }
}

/// The loaded steering program with its maps: addresses, services, and queue -> socket.
#[derive(Debug)]
pub struct VipSteering {
    program: Program,
    addrs: Map,
    services: Map,
    xsks: Map,
    /// Steered frames whose RX queue had no socket, per CPU.
    no_socket: Map,
    /// The set last written in full.
    current: SteeringSet,
    /// What the maps hold.
    held: Held,
}

/// What the kernel maps hold, entry by entry as written and removed: after a [`VipSteering::set`]
/// that failed part-way, part of the old set and part of the new one.
#[derive(Debug, Default)]
struct Held {
    addrs: BTreeMap<IpAddr, AddrEntry>,
    services: BTreeSet<(IpAddr, u16, u8)>,
}

impl VipSteering {
    /// Creates the maps and loads the program.
    pub fn load(config: SteeringConfig) -> Result<Self, BpfError> {
        let addrs = Map::create(MAP_TYPE_HASH, 16, 8, config.max_vips.max(1))?;
        let services = Map::create(MAP_TYPE_HASH, 20, 4, config.max_services.max(1))?;
        let xsks = Map::create(MAP_TYPE_XSKMAP, 4, 4, config.queues.max(1))?;
        let no_socket = Map::create(MAP_TYPE_PERCPU_ARRAY, 4, 8, 1)?;
        let insns = steering_program(addrs.fd(), services.fd(), xsks.fd(), no_socket.fd(), config.missing_socket)?;
        let program = Program::load_xdp("lb_vip_steer", &insns)?;
        Ok(VipSteering {
            program,
            addrs,
            services,
            xsks,
            no_socket,
            current: SteeringSet::default(),
            held: Held::default(),
        })
    }

    /// Makes the kernel maps steer exactly `want`: stale entries removed first, then new and changed
    /// ones written. Traffic that stays steered is never passed to the kernel in between (its entries
    /// are kept, or changed in place), and a `want` that fits the maps always fits, even when the
    /// old and the new sets together would not (what the control side checks before it publishes).
    ///
    /// The diff is against what the maps hold, not against the last set: after an error part-way
    /// (a full map, say), the next call removes what the failed one left and writes all `want` needs,
    /// even when `want` is the set that ran before.
    pub fn set(&mut self, want: SteeringSet) -> Result<(), BpfError> {
        let new = want.addresses();
        let held = &mut self.held;
        let stale: Vec<IpAddr> = held.addrs.keys().filter(|a| !new.contains_key(a)).copied().collect();
        for addr in stale {
            self.addrs.delete(&vip_key(addr))?;
            held.addrs.remove(&addr);
        }
        let stale: Vec<_> = held.services.difference(&want.services).copied().collect();
        for service @ (addr, port, proto) in stale {
            self.services.delete(&service_key(addr, port, proto))?;
            held.services.remove(&service);
        }
        let fresh: Vec<_> = want.services.difference(&held.services).copied().collect();
        for service @ (addr, port, proto) in fresh {
            self.services.update(&service_key(addr, port, proto), &1u32.to_ne_bytes())?;
            held.services.insert(service);
        }
        for (addr, entry) in new {
            if held.addrs.get(&addr) != Some(&entry) {
                self.addrs.update(&vip_key(addr), &entry.bytes())?;
                held.addrs.insert(addr, entry);
            }
        }
        self.current = want;
        Ok(())
    }

    /// Steers the services and SNAT ranges given, keeping the whole-address, neighbour and host sets.
    pub fn set_services(
        &mut self,
        services: impl IntoIterator<Item = (IpAddr, u16, u8)>,
        snat: impl IntoIterator<Item = (IpAddr, (u16, u16))>,
    ) -> Result<(), BpfError> {
        let want = SteeringSet {
            services: services.into_iter().collect(),
            snat: snat.into_iter().collect(),
            whole: self.current.whole.clone(),
            neighbour: self.current.neighbour.clone(),
            host: self.current.host.clone(),
        };
        self.set(want)
    }

    /// Makes the set of addresses whose ARP requests and Neighbour Solicitations are steered exactly
    /// `addrs`, keeping everything else.
    pub fn set_neighbours(&mut self, addrs: impl IntoIterator<Item = IpAddr>) -> Result<(), BpfError> {
        let mut want = self.current.clone();
        want.neighbour = addrs.into_iter().collect();
        self.set(want)
    }

    /// Starts steering every frame to `vip` (takes effect for the next frame).
    pub fn add_vip(&mut self, vip: IpAddr) -> Result<(), BpfError> {
        let mut want = self.current.clone();
        want.whole.insert(vip);
        self.set(want)
    }

    /// Stops steering every frame to `vip` (its services and SNAT range, if any, stay).
    pub fn remove_vip(&mut self, vip: IpAddr) -> Result<(), BpfError> {
        let mut want = self.current.clone();
        want.whole.remove(&vip);
        self.set(want)
    }

    /// Makes the whole-address set exactly `vips`, keeping services and SNAT ranges.
    pub fn set_vips(&mut self, vips: impl IntoIterator<Item = IpAddr>) -> Result<(), BpfError> {
        let mut want = self.current.clone();
        want.whole = vips.into_iter().collect();
        self.set(want)
    }

    /// True if the kernel's address map holds `vip` (for any kind of steering).
    pub fn has_vip(&self, vip: IpAddr) -> Result<bool, BpfError> {
        self.addrs.contains(&vip_key(vip))
    }

    /// What is steered, as the control side last set it in full (after a failed [`VipSteering::set`]
    /// the maps also hold part of the set that failed, until the next `set`).
    pub fn steering(&self) -> &SteeringSet {
        &self.current
    }

    /// Sends frames of RX queue `queue` to the AF_XDP socket `xsk_fd`.
    pub fn set_socket(&self, queue: u32, xsk_fd: i32) -> Result<(), BpfError> {
        self.xsks.update(&queue.to_ne_bytes(), &(xsk_fd as u32).to_ne_bytes())
    }

    /// The program's counters, readable from another thread while this steering is edited.
    pub fn counters(&self) -> Result<SteeringCounters, BpfError> {
        let no_socket =
            self.no_socket.try_clone().map_err(|source| BpfError::Syscall { command: "dup (counter map)", source })?;
        Ok(SteeringCounters { no_socket })
    }

    /// Attaches to interface `ifindex`; detached when the returned link drops.
    pub fn attach(&self, ifindex: u32, mode: AttachMode) -> Result<Link, BpfError> {
        self.program.attach_xdp(ifindex, mode)
    }

    /// Runs the program on one frame (BPF_PROG_TEST_RUN) and returns its verdict.
    pub fn test_run(&self, frame: &[u8]) -> Result<XdpAction, BpfError> {
        self.program.test_run(frame).map(XdpAction::from)
    }
}

/// The steering program's counters (a descriptor of its counter map of its own).
#[derive(Debug)]
pub struct SteeringCounters {
    no_socket: Map,
}

impl SteeringCounters {
    /// Frames the program steered to an RX queue with no AF_XDP socket in its slot (a queue no loop
    /// serves, or a socket not yet bound), which got the [`MissingSocket`] action instead.
    pub fn no_socket(&self) -> Result<u64, BpfError> {
        self.no_socket.per_cpu_sum(&0u32.to_ne_bytes())
    }
}

/// The IPv4-mapped prefix of VIP keys, for readers of the map (bpftool shows raw keys).
pub const V4_MAPPED_PREFIX: Ipv6Addr = Ipv6Addr::new(0, 0, 0, 0, 0, 0xffff, 0, 0);

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    const VIP4: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 100);
    const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd77, 0, 0, 0, 0, 0, 0, 0x100);

    fn eth(ethertype: u16) -> Vec<u8> {
        let mut f = vec![0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2];
        f.extend_from_slice(&ethertype.to_be_bytes());
        f
    }

    /// UDP from port 12345 to port 80, length 8.
    const UDP_TO_80: [u8; 8] = [0x30, 0x39, 0, 80, 0, 8, 0, 0];

    /// `frame` with VLAN tags of the TPIDs `tpids` (outermost first) inserted after the MAC addresses.
    fn with_tags(mut frame: Vec<u8>, tpids: &[u16]) -> Vec<u8> {
        for (i, &tpid) in tpids.iter().enumerate().rev() {
            frame.splice(12..12, tpid.to_be_bytes().into_iter().chain((7 + i as u16).to_be_bytes()));
        }
        frame
    }

    /// `frame` with an 802.1Q tag `tci` inserted after the MAC addresses, if given.
    fn tagged(mut frame: Vec<u8>, vlan: Option<u16>) -> Vec<u8> {
        if let Some(tci) = vlan {
            frame.splice(12..12, [0x81, 0x00].into_iter().chain(tci.to_be_bytes()));
        }
        frame
    }

    /// An IPv4/UDP frame to `dst`, DF set (checksums do not matter to the classifier).
    fn v4(dst: Ipv4Addr, vlan: Option<u16>) -> Vec<u8> {
        tagged(v4_with(dst, 17, 0x4000, &UDP_TO_80), vlan)
    }

    fn v6(dst: Ipv6Addr, vlan: Option<u16>) -> Vec<u8> {
        tagged(v6_with(dst, 17, &UDP_TO_80), vlan)
    }

    fn arp_for(target: Ipv4Addr) -> Vec<u8> {
        arp_with(1, target)
    }

    /// An Ethernet / IPv4 ARP frame with operation `op` (1 request, 2 reply) for `target`.
    fn arp_with(op: u8, target: Ipv4Addr) -> Vec<u8> {
        let mut f = eth(0x0806);
        f.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, op, 2, 0, 0, 0, 0, 2, 10, 77, 0, 1, 0, 0, 0, 0, 0, 0]);
        f.extend_from_slice(&target.octets());
        f
    }

    /// An ARP reply (gratuitous: sender and target `sender`) from `sender`.
    fn arp_reply_from(sender: Ipv4Addr) -> Vec<u8> {
        let mut f = arp_with(2, sender);
        f[14 + 14..14 + 18].copy_from_slice(&sender.octets());
        f
    }

    /// An ARP request from `sender` for another address (10.77.0.1).
    fn arp_request_from(sender: Ipv4Addr) -> Vec<u8> {
        let mut f = arp_for(Ipv4Addr::new(10, 77, 0, 1));
        f[14 + 14..14 + 18].copy_from_slice(&sender.octets());
        f
    }

    /// An ICMPv6 Neighbour Solicitation for `target` sent to `dst` (checksums do not matter to the
    /// classifier).
    fn ns(dst: Ipv6Addr, target: Ipv6Addr) -> Vec<u8> {
        v6_with(dst, 58, &[[135, 0, 0, 0, 0, 0, 0, 0].as_slice(), &target.octets()].concat())
    }

    /// The solicited-node group of `a`.
    fn group(a: Ipv6Addr) -> Ipv6Addr {
        let o = a.octets();
        Ipv6Addr::new(0xff02, 0, 0, 0, 0, 1, 0xff00 | u16::from(o[13]), u16::from_be_bytes([o[14], o[15]]))
    }

    /// Loads the program with VIP frames dropped (no socket in the test), so "steered" shows as
    /// Drop and "left to the kernel" as Pass. Skips with a reason when bpf(2) is refused.
    /// A node's IPv4 and IPv6 SNAT addresses in the tests, with ports 40000-40999.
    const NODE4: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);
    const NODE6: Ipv6Addr = Ipv6Addr::new(0xfd77, 0, 0, 0, 0, 0, 0, 2);

    /// The program steering one TCP service on port 80 of each VIP and NAT replies to [`NODE4`] and
    /// [`NODE6`], ports 40000-40999 (what `lb_core_verdict`'s configuration needs).
    fn nat_steering() -> Option<VipSteering> {
        let mut s = steering()?;
        s.set_services(
            [(IpAddr::V4(VIP4), 80, 6), (IpAddr::V6(VIP6), 80, 6)],
            [(IpAddr::V4(NODE4), (40000, 40999)), (IpAddr::V6(NODE6), (40000, 40999))],
        )
        .unwrap();
        Some(s)
    }

    fn steering() -> Option<VipSteering> {
        steering_with(SteeringConfig::default())
    }

    /// The program loaded with `cfg` and frames to a queue without a socket dropped (so "steered"
    /// reads as `Drop`, "for the kernel" as `Pass`), or `None` (printed) where bpf(2) is refused.
    fn steering_with(cfg: SteeringConfig) -> Option<VipSteering> {
        let cfg = SteeringConfig { missing_socket: MissingSocket::Drop, ..cfg };
        match VipSteering::load(cfg) {
            Ok(s) => Some(s),
            Err(e) if e.is_refused() => {
                println!("SKIPPED: bpf(2) refused ({e}); run as root to test the XDP program");
                None
            }
            Err(e) => panic!("loading the steering program failed: {e}"),
        }
    }

    #[test]
    fn steers_only_vip_frames_v4_v6_and_vlan() {
        let Some(mut s) = steering() else { return };
        s.add_vip(IpAddr::V4(VIP4)).unwrap();
        s.add_vip(IpAddr::V6(VIP6)).unwrap();
        let steered = XdpAction::Drop;
        let kernel = XdpAction::Pass;
        let cases: Vec<(&str, Vec<u8>, XdpAction)> = vec![
            ("IPv4 to the VIP", v4(VIP4, None), steered),
            ("IPv6 to the VIP", v6(VIP6, None), steered),
            ("VLAN-tagged IPv4 to the VIP", v4(VIP4, Some(42)), steered),
            ("VLAN-tagged IPv6 to the VIP", v6(VIP6, Some(42)), steered),
            ("IPv4 to another address", v4(Ipv4Addr::new(10, 77, 0, 101), None), kernel),
            ("IPv6 to another address", v6(Ipv6Addr::LOCALHOST, None), kernel),
            ("IPv4-mapped lookalike of the v4 VIP in IPv6", v6(VIP4.to_ipv6_mapped(), None), steered),
            ("ARP asking for the VIP", arp_for(VIP4), kernel),
            ("IPv4 to the VIP cut after the source address", v4(VIP4, None)[..30].to_vec(), kernel),
            ("IPv6 to the VIP cut inside the destination", v6(VIP6, None)[..50].to_vec(), kernel),
            ("VLAN header cut short", v4(VIP4, Some(1))[..16].to_vec(), kernel),
            ("802.1ad-tagged IPv4 to the VIP", with_tags(v4(VIP4, None), &[0x88a8]), steered),
            ("QinQ-tagged IPv6 to the VIP", with_tags(v6(VIP6, None), &[0x88a8, 0x8100]), steered),
            ("two 0x9100 tags", with_tags(v4(VIP4, None), &[0x9100, 0x9100]), steered),
            ("three tags: more than lb-core reads", with_tags(v4(VIP4, None), &[0x88a8, 0x8100, 0x8100]), kernel),
            ("second tag cut short", with_tags(v4(VIP4, None), &[0x88a8, 0x8100])[..20].to_vec(), kernel),
            ("an IPv4 ethertype and nothing after it", eth(0x0800), kernel),
        ];
        for (name, frame, want) in cases {
            assert_eq!(s.test_run(&frame).unwrap(), want, "{name}");
        }
        // Removing a VIP takes effect for the next frame; others stay.
        s.remove_vip(IpAddr::V4(VIP4)).unwrap();
        assert_eq!(s.test_run(&v4(VIP4, None)).unwrap(), kernel);
        assert_eq!(s.test_run(&v6(VIP6, None)).unwrap(), steered);
        s.set_vips([IpAddr::V4(VIP4)]).unwrap();
        assert!(s.has_vip(IpAddr::V4(VIP4)).unwrap() && !s.has_vip(IpAddr::V6(VIP6)).unwrap());
        assert_eq!(s.test_run(&v6(VIP6, None)).unwrap(), kernel);
    }

    /// An IPv4 frame to `dst` with protocol `proto`, the flags/offset field `frag` and `l4` after a
    /// 20-byte header (checksums do not matter to the classifier).
    fn v4_with(dst: Ipv4Addr, proto: u8, frag: u16, l4: &[u8]) -> Vec<u8> {
        let mut f = eth(0x0800);
        let len = (20 + l4.len()) as u16;
        f.extend_from_slice(&[0x45, 0]);
        f.extend_from_slice(&len.to_be_bytes());
        f.extend_from_slice(&[0, 0]);
        f.extend_from_slice(&frag.to_be_bytes());
        f.extend_from_slice(&[64, proto, 0, 0, 10, 77, 0, 1]);
        f.extend_from_slice(&dst.octets());
        f.extend_from_slice(l4);
        f
    }

    fn v6_with(dst: Ipv6Addr, next: u8, l4: &[u8]) -> Vec<u8> {
        let mut f = eth(0x86dd);
        f.extend_from_slice(&[0x60, 0, 0, 0]);
        f.extend_from_slice(&(l4.len() as u16).to_be_bytes());
        f.extend_from_slice(&[next, 64]);
        f.extend_from_slice(&Ipv6Addr::new(0xfd77, 0, 0, 0, 0, 0, 0, 1).octets());
        f.extend_from_slice(&dst.octets());
        f.extend_from_slice(l4);
        f
    }

    /// A TCP or UDP header's first 8 bytes from port 40000 to `port`.
    fn ports(port: u16) -> Vec<u8> {
        let mut h = 40000u16.to_be_bytes().to_vec();
        h.extend_from_slice(&port.to_be_bytes());
        h.extend_from_slice(&[0, 0, 0, 0]);
        h
    }

    /// An ICMP header of `kind` (type) with 4 bytes of rest.
    fn icmp(kind: u8) -> Vec<u8> {
        vec![kind, 0, 0, 0, 0, 0, 0, 0]
    }

    /// What an ICMP error quotes of an IPv4 packet of protocol `proto` from `src`:`sport` to
    /// 10.1.0.1:80 with the flags/offset field `frag` and an `ihl`-word header: the header and 8 bytes.
    fn quote4(src: Ipv4Addr, proto: u8, sport: u16, frag: u16, ihl: u8) -> Vec<u8> {
        let mut q = vec![0x40 | ihl, 0, 0x05, 0xdc, 0, 0];
        q.extend_from_slice(&frag.to_be_bytes());
        q.extend_from_slice(&[63, proto, 0, 0]);
        q.extend_from_slice(&src.octets());
        q.extend_from_slice(&[10, 1, 0, 1]);
        q.resize(q.len() + usize::from(ihl.saturating_sub(5)) * 4, 0);
        q.extend_from_slice(&sport.to_be_bytes());
        q.extend_from_slice(&[0, 80, 0, 0, 0, 1]);
        q
    }

    /// What an ICMPv6 error quotes of an IPv6 packet of protocol `proto` from `src`:`sport` to
    /// [fd00:1::1]:80 behind the extension headers `exts` (see [`extensions`]): all of it.
    fn quote6(src: Ipv6Addr, exts: &[(u8, u16)], proto: u8, sport: u16) -> Vec<u8> {
        let transport = [sport.to_be_bytes().as_slice(), &[0, 80, 0, 0, 0, 1]].concat();
        let (first, payload) = extensions(exts, proto, &transport);
        let mut q = vec![0x60, 0, 0, 0];
        q.extend_from_slice(&(payload.len() as u16).to_be_bytes());
        q.extend_from_slice(&[first, 63]);
        q.extend_from_slice(&src.octets());
        q.extend_from_slice(&Ipv6Addr::new(0xfd00, 1, 0, 0, 0, 0, 0, 1).octets());
        q.extend_from_slice(&payload);
        q
    }

    /// `l4` (of protocol `proto`) behind the IPv6 extension headers `exts`, each a type and, for a
    /// Fragment header (44), its offset / M field: options headers 8 bytes long, every second one 16;
    /// an Authentication Header (51) 24. Returns the first header's type and the bytes.
    fn extensions(exts: &[(u8, u16)], proto: u8, l4: &[u8]) -> (u8, Vec<u8>) {
        let mut bytes = Vec::new();
        for (i, &(kind, field)) in exts.iter().enumerate() {
            let next = exts.get(i + 1).map_or(proto, |e| e.0);
            match kind {
                44 => bytes.extend_from_slice(&[[next, 0].as_slice(), &field.to_be_bytes(), &[0, 0, 0, 1]].concat()),
                51 => bytes.extend_from_slice(&[[next, 4, 0, 0, 0, 0, 0, 1, 0, 0, 0, 1].as_slice(), &[0; 12]].concat()),
                _ => {
                    let units = (i % 2) as u8;
                    bytes.extend_from_slice(&[next, units]);
                    bytes.resize(bytes.len() + 6 + 8 * usize::from(units), 0);
                }
            }
        }
        bytes.extend_from_slice(l4);
        (exts.first().map_or(proto, |e| e.0), bytes)
    }

    #[test]
    fn steers_service_ports_snat_replies_and_errors_about_their_flows_and_passes_the_rest() {
        let Some(mut s) = steering() else { return };
        let node = NODE4;
        s.set_services(
            [(IpAddr::V4(VIP4), 80, 6), (IpAddr::V4(VIP4), 53, 17), (IpAddr::V6(VIP6), 443, 6)],
            [(IpAddr::V4(node), (40000, 40999))],
        )
        .unwrap();
        let steered = XdpAction::Drop;
        let kernel = XdpAction::Pass;
        let mut ihl6 = v4_with(VIP4, 6, 0, &[[0u8; 4].as_slice(), &ports(80)].concat());
        ihl6[14] = 0x46; // a 24-byte header with one option word: the ports move 4 bytes on
        let mut ihl4 = v4_with(VIP4, 6, 0, &ports(80));
        ihl4[14] = 0x44; // a header length below 20 bytes: malformed, lb-core counts it
        let cases: Vec<(&str, Vec<u8>, XdpAction)> = vec![
            ("TCP to a service port", v4_with(VIP4, 6, 0, &ports(80)), steered),
            ("TCP to the VIP on a port no service has", v4_with(VIP4, 6, 0, &ports(22)), kernel),
            ("UDP to a UDP service", v4_with(VIP4, 17, 0, &ports(53)), steered),
            ("TCP to a port only a UDP service has", v4_with(VIP4, 6, 0, &ports(53)), kernel),
            ("TCP to a service port after IPv4 options", ihl6, steered),
            ("IPv4 header length below 20", ihl4, steered),
            ("a later IPv4 fragment (no ports in it)", v4_with(VIP4, 6, 185, &[0u8; 8]), steered),
            ("a first IPv4 fragment (MF set)", v4_with(VIP4, 6, 0x2000, &ports(22)), steered),
            ("DF set is not a fragment", v4_with(VIP4, 6, 0x4000, &ports(22)), kernel),
            ("ping to the VIP", v4_with(VIP4, 1, 0, &icmp(8)), kernel),
            // ICMP errors by what they quote: a packet the VIP sent from a service's port is a
            // service flow's; from any other port, the host's own (the VIP may be a node address).
            (
                "destination unreachable about a TCP service's reply",
                v4_with(VIP4, 1, 0, &[icmp(3), quote4(VIP4, 6, 80, 0, 5)].concat()),
                steered,
            ),
            (
                "time exceeded about a UDP service's reply",
                v4_with(VIP4, 1, 0, &[icmp(11), quote4(VIP4, 17, 53, 0, 5)].concat()),
                steered,
            ),
            (
                "an error about the host's own SSH connection",
                v4_with(VIP4, 1, 0, &[icmp(3), quote4(VIP4, 6, 22, 0, 5)].concat()),
                kernel,
            ),
            (
                "an error quoting TCP from a port only a UDP service has",
                v4_with(VIP4, 1, 0, &[icmp(3), quote4(VIP4, 6, 53, 0, 5)].concat()),
                kernel,
            ),
            ("an error with nothing quoted", v4_with(VIP4, 1, 0, &icmp(3)), kernel),
            ("TCP header cut before the ports", v4_with(VIP4, 6, 0, &[0x9c, 0x40, 0]), steered),
            ("GRE to the VIP", v4_with(VIP4, 47, 0, &[0u8; 8]), kernel),
            ("a NAT reply to the node's SNAT range", v4_with(node, 6, 0, &ports(40500)), steered),
            ("the range's last port", v4_with(node, 17, 0, &ports(40999)), steered),
            ("SSH to the node address used for SNAT", v4_with(node, 6, 0, &ports(22)), kernel),
            ("just past the range", v4_with(node, 6, 0, &ports(41000)), kernel),
            ("ping to the node", v4_with(node, 1, 0, &icmp(8)), kernel),
            (
                "an ICMP error about a NAT flow",
                v4_with(node, 1, 0, &[icmp(3), quote4(node, 6, 40500, 0, 5)].concat()),
                steered,
            ),
            ("TCP to an IPv6 service", v6_with(VIP6, 6, &ports(443)), steered),
            ("TCP to the IPv6 VIP on another port", v6_with(VIP6, 6, &ports(80)), kernel),
            ("ICMPv6 echo to the VIP", v6_with(VIP6, 58, &icmp(128)), kernel),
            (
                "ICMPv6 packet too big about a service's reply",
                v6_with(VIP6, 58, &[icmp(2), quote6(VIP6, &[], 6, 443)].concat()),
                steered,
            ),
            (
                "ICMPv6 packet too big about the host's own connection",
                v6_with(VIP6, 58, &[icmp(2), quote6(VIP6, &[], 6, 22)].concat()),
                kernel,
            ),
            ("IPv6 fragment header", v6_with(VIP6, 44, &[6, 0, 0, 1, 0, 0, 0, 1]), steered),
            ("IPv6 hop-by-hop options", v6_with(VIP6, 0, &[6, 0, 0, 0, 0, 0, 0, 0]), steered),
            ("TCP to another address", v4_with(Ipv4Addr::new(10, 77, 0, 9), 6, 0, &ports(80)), kernel),
        ];
        for (name, frame, want) in cases {
            assert_eq!(s.test_run(&frame).unwrap(), want, "{name}");
        }

        // Live edits: a service removed passes at once; the address goes when its last use does.
        s.set_services([(IpAddr::V4(VIP4), 53, 17)], []).unwrap();
        assert_eq!(s.test_run(&v4_with(VIP4, 6, 0, &ports(80))).unwrap(), kernel);
        assert_eq!(s.test_run(&v4_with(VIP4, 17, 0, &ports(53))).unwrap(), steered);
        assert_eq!(s.test_run(&v4_with(node, 6, 0, &ports(40500))).unwrap(), kernel);
        assert!(!s.has_vip(IpAddr::V4(node)).unwrap() && !s.has_vip(IpAddr::V6(VIP6)).unwrap());
        // A whole-address entry on top of a service steers everything, and leaves the service when
        // removed.
        s.add_vip(IpAddr::V4(VIP4)).unwrap();
        assert_eq!(s.test_run(&v4_with(VIP4, 1, 0, &icmp(8))).unwrap(), steered);
        s.remove_vip(IpAddr::V4(VIP4)).unwrap();
        assert_eq!(s.test_run(&v4_with(VIP4, 1, 0, &icmp(8))).unwrap(), kernel);
        assert_eq!(s.test_run(&v4_with(VIP4, 17, 0, &ports(53))).unwrap(), steered);
    }

    /// To an address that is only a SNAT address (perhaps the node's own), exactly what lb-core can
    /// map to a NAT flow: replies to a port of the range (IPv6 ones after extension headers too) and
    /// ICMP errors quoting a packet sent from the address and such a port; no fragment.
    #[test]
    fn steers_to_a_snat_address_only_replies_and_errors_of_nat_flows() {
        let Some(s) = nat_steering() else { return };
        let (node, node6) = (NODE4, NODE6);
        let steered = XdpAction::Drop;
        let kernel = XdpAction::Pass;
        let error4 = |kind: u8, quote: Vec<u8>| v4_with(node, 1, 0, &[icmp(kind), quote].concat());
        let error6 = |kind: u8, quote: Vec<u8>| v6_with(node6, 58, &[icmp(kind), quote].concat());
        let behind = |exts: &[(u8, u16)], proto: u8, l4: &[u8]| {
            let (first, bytes) = extensions(exts, proto, l4);
            v6_with(node6, first, &bytes)
        };
        let quote_options = quote4(node, 17, 40500, 0, 6);
        let client = Ipv4Addr::new(198, 51, 100, 7);
        let cases: Vec<(&str, Vec<u8>, XdpAction)> = vec![
            ("fragmentation needed about a NAT flow", error4(3, quote4(node, 6, 40000, 0x4000, 5)), steered),
            ("time exceeded about a NAT flow (UDP)", error4(11, quote4(node, 17, 40999, 0, 5)), steered),
            ("parameter problem about a NAT flow", error4(12, quote4(node, 6, 40500, 0, 5)), steered),
            ("an error quoting a header with options", error4(3, quote_options), steered),
            ("an error quoting a first fragment", error4(3, quote4(node, 17, 40500, 0x2000, 5)), steered),
            ("an error quoting a later fragment", error4(3, quote4(node, 17, 40500, 0x2001, 5)), kernel),
            ("an error about the node's own port 22", error4(3, quote4(node, 6, 22, 0, 5)), kernel),
            ("an error about a port past the range", error4(3, quote4(node, 6, 41000, 0, 5)), kernel),
            ("an error quoting another source", error4(3, quote4(client, 6, 40500, 0, 5)), kernel),
            ("an error quoting ICMP", error4(3, quote4(node, 1, 40500, 0, 5)), kernel),
            ("an error whose quote is cut", error4(3, quote4(node, 6, 40500, 0, 5)[..26].to_vec()), kernel),
            ("an error quoting a header length below 20", error4(3, quote4(node, 6, 40500, 0, 4)), kernel),
            ("a source quench (type 4)", error4(4, quote4(node, 6, 40500, 0, 5)), kernel),
            ("an IPv4 fragment of a NAT reply", v4_with(node, 6, 0x2000, &ports(40500)), kernel),
            ("packet too big about a NAT flow", error6(2, quote6(node6, &[], 6, 40500)), steered),
            ("unreachable about a NAT flow (UDP)", error6(1, quote6(node6, &[], 17, 40000)), steered),
            ("an error quoting extension headers", error6(3, quote6(node6, &[(0, 0), (60, 0)], 6, 40500)), steered),
            ("an error quoting a first fragment", error6(4, quote6(node6, &[(44, 1)], 17, 40500)), steered),
            ("an error quoting a later fragment", error6(4, quote6(node6, &[(44, 8)], 17, 40500)), kernel),
            ("an error about the node's own port 22", error6(2, quote6(node6, &[], 6, 22)), kernel),
            ("an error quoting another source", error6(2, quote6(VIP6, &[], 6, 40500)), kernel),
            ("an ICMPv6 type 5 (no error lb-core knows)", error6(5, quote6(node6, &[], 6, 40500)), kernel),
            ("ICMPv6 echo to the node", v6_with(node6, 58, &icmp(128)), kernel),
            ("a NAT reply after hop-by-hop options", behind(&[(0, 0)], 6, &ports(40500)), steered),
            (
                "a NAT reply after four extension headers",
                behind(&[(0, 0), (60, 0), (43, 0), (44, 0)], 17, &ports(40500)),
                steered,
            ),
            (
                "a NAT reply after five",
                behind(&[(0, 0), (60, 0), (43, 0), (44, 0), (60, 0)], 17, &ports(40500)),
                kernel,
            ),
            ("SSH after destination options", behind(&[(60, 0)], 6, &ports(22)), kernel),
            ("a NAT reply after an authentication header", behind(&[(51, 0)], 6, &ports(40500)), steered),
            ("an error quoting an authentication header", error6(1, quote6(node6, &[(51, 0)], 17, 40500)), steered),
            (
                "an authentication header cut short",
                behind(&[(51, 0)], 6, &ports(40500))[..14 + 40 + 10].to_vec(),
                steered,
            ),
            ("hop-by-hop options not first", behind(&[(60, 0), (0, 0)], 6, &ports(40500)), kernel),
            ("an IPv6 first fragment of a NAT reply", behind(&[(44, 1)], 17, &ports(40500)), kernel),
            ("an IPv6 later fragment", behind(&[(44, 8)], 17, &ports(40500)), kernel),
            (
                "an ICMPv6 error after an extension header",
                behind(&[(60, 0)], 58, &[icmp(2), quote6(node6, &[], 6, 40500)].concat()),
                steered,
            ),
            ("an extension header cut short", behind(&[(60, 0)], 6, &ports(40500))[..14 + 40 + 6].to_vec(), steered),
        ];
        let wrong: Vec<_> = cases.iter().filter(|(_, f, want)| s.test_run(f).unwrap() != *want).map(|c| c.0).collect();
        assert!(wrong.is_empty(), "steered against the rules: {wrong:?}");
    }

    /// An address with only the neighbour flag (the responder answers for it; no service, no SNAT
    /// range) has its ARP requests and solicitations steered and no IP frame at all.
    #[test]
    fn a_neighbour_only_address_steers_neighbour_discovery_alone() {
        let Some(mut s) = steering() else { return };
        let lone = Ipv4Addr::new(10, 77, 0, 8);
        let lone6 = Ipv6Addr::new(0xfd77, 0, 0, 0, 0, 0, 0, 8);
        s.set_neighbours([IpAddr::V4(lone), IpAddr::V6(lone6)]).unwrap();
        let mut ihl4 = v4_with(lone, 6, 0, &ports(80));
        ihl4[14] = 0x44;
        let frames: Vec<(&str, Vec<u8>)> = vec![
            ("an IPv4 fragment", v4_with(lone, 17, 0x2000, &ports(40500))),
            ("a later IPv4 fragment", v4_with(lone, 17, 185, &[0u8; 8])),
            ("IPv4 header length below 20", ihl4),
            ("an ICMP error", v4_with(lone, 1, 0, &[icmp(3), quote4(lone, 6, 40500, 0, 5)].concat())),
            ("a TCP header cut before the ports", v4_with(lone, 6, 0, &[0x9c, 0x40, 0])),
            ("an IPv6 fragment", v6_with(lone6, 44, &[17, 0, 0, 1, 0, 0, 0, 1])),
            ("IPv6 hop-by-hop options", v6_with(lone6, 0, &[6, 0, 0, 0, 0, 0, 0, 0])),
            ("an ICMPv6 error", v6_with(lone6, 58, &[icmp(2), quote6(lone6, &[], 6, 40500)].concat())),
            ("an ICMPv6 header cut", v6_with(lone6, 58, &[])),
        ];
        let steered: Vec<_> =
            frames.iter().filter(|(_, f)| s.test_run(f).unwrap() != XdpAction::Pass).map(|c| c.0).collect();
        assert!(steered.is_empty(), "IP frames to a neighbour-only address taken from the kernel: {steered:?}");
        assert_eq!(s.test_run(&arp_for(lone)).unwrap(), XdpAction::Drop, "its ARP requests are steered");
        assert_eq!(s.test_run(&ns(group(lone6), lone6)).unwrap(), XdpAction::Drop, "its solicitations are");
    }

    #[test]
    fn steers_arp_requests_and_solicitations_for_neighbour_addresses_only() {
        let Some(mut s) = steering() else { return };
        let node = NODE4;
        let other6 = Ipv6Addr::new(0xfd77, 0, 0, 0, 0, 0, 0, 0x99);
        s.set_services([(IpAddr::V4(VIP4), 80, 6), (IpAddr::V6(VIP6), 80, 6)], [(IpAddr::V4(node), (40000, 40999))])
            .unwrap();
        s.set_neighbours([IpAddr::V4(VIP4), IpAddr::V6(VIP6)]).unwrap();
        let steered = XdpAction::Drop;
        let kernel = XdpAction::Pass;
        let mut advert = ns(group(VIP6), VIP6);
        advert[14 + 40] = 136;
        let cases: Vec<(&str, Vec<u8>, XdpAction)> = vec![
            ("ARP request for the VIP", arp_for(VIP4), steered),
            ("VLAN-tagged ARP request for the VIP", tagged(arp_for(VIP4), Some(42)), steered),
            ("QinQ-tagged ARP request for the VIP", with_tags(arp_for(VIP4), &[0x88a8, 0x8100]), steered),
            ("ARP request for another address", arp_for(Ipv4Addr::new(10, 77, 0, 9)), kernel),
            ("ARP request for a steered address without the neighbour flag", arp_for(node), kernel),
            ("ARP reply to the VIP", arp_with(2, VIP4), kernel),
            ("ARP reply from the VIP (another host claiming it)", arp_reply_from(VIP4), steered),
            ("VLAN-tagged ARP reply from the VIP", tagged(arp_reply_from(VIP4), Some(42)), steered),
            ("ARP reply from another address", arp_reply_from(Ipv4Addr::new(10, 77, 0, 9)), kernel),
            ("ARP reply from a steered address without the neighbour flag", arp_reply_from(node), kernel),
            ("ARP reply cut inside the target address", arp_reply_from(VIP4)[..40].to_vec(), kernel),
            ("ARP request from the VIP for another address", arp_request_from(VIP4), steered),
            ("QinQ-tagged ARP request from the VIP", with_tags(arp_request_from(VIP4), &[0x88a8, 0x8100]), steered),
            ("ARP request from another address", arp_request_from(Ipv4Addr::new(10, 77, 0, 9)), kernel),
            ("ARP request cut inside the target address", arp_for(VIP4)[..40].to_vec(), kernel),
            ("NS for the VIP to its solicited-node group", ns(group(VIP6), VIP6), steered),
            ("VLAN-tagged NS for the VIP", tagged(ns(group(VIP6), VIP6), Some(42)), steered),
            ("QinQ-tagged NS for the VIP", with_tags(ns(group(VIP6), VIP6), &[0x9100, 0x8100]), steered),
            ("NS for the VIP sent to the VIP (unreachability detection)", ns(VIP6, VIP6), steered),
            ("NS for another target", ns(group(other6), other6), kernel),
            ("NS for another target sent to the VIP", ns(VIP6, other6), kernel),
            ("NS cut inside the target", ns(group(VIP6), VIP6)[..14 + 40 + 20].to_vec(), kernel),
            ("NS cut before the ICMPv6 type", ns(group(VIP6), VIP6)[..14 + 40].to_vec(), kernel),
            ("a neighbour advertisement for the VIP", advert, kernel),
            ("TCP to the IPv6 service still steered", v6_with(VIP6, 6, &ports(80)), steered),
            ("ICMPv6 echo to the VIP still passes", v6_with(VIP6, 58, &icmp(128)), kernel),
        ];
        for (name, frame, want) in cases {
            assert_eq!(s.test_run(&frame).unwrap(), want, "{name}");
        }
        // Responder off: neighbour discovery is the kernel's again; the services stay steered.
        s.set_neighbours([]).unwrap();
        assert_eq!(s.test_run(&arp_for(VIP4)).unwrap(), kernel);
        assert_eq!(s.test_run(&ns(group(VIP6), VIP6)).unwrap(), kernel);
        assert_eq!(s.test_run(&v4_with(VIP4, 6, 0, &ports(80))).unwrap(), steered);
        // A neighbour-only address (no service) is steered for neighbour discovery alone.
        s.set_neighbours([IpAddr::V6(other6)]).unwrap();
        assert_eq!(s.test_run(&ns(group(other6), other6)).unwrap(), steered);
        assert_eq!(s.test_run(&v6_with(other6, 6, &ports(80))).unwrap(), kernel);
    }

    /// lb-core's verdict for `frame` under one IPv4 and one IPv6 NAT service whose SNAT addresses are
    /// [`NODE4`] and [`NODE6`] with ports 40000-40999 (what [`nat_steering`] steers).
    fn lb_core_verdict(frame: &[u8]) -> lb_core::Verdict {
        lb_core_verdict_for(frame, (VIP4, VIP6), 80)
    }

    /// The same with the services on `vips` and TCP `port` (the VIPs may be the SNAT addresses).
    fn lb_core_verdict_for(frame: &[u8], (vip4, vip6): (Ipv4Addr, Ipv6Addr), port: u16) -> lb_core::Verdict {
        use lb_core::config::{BackendConfig, Config, ForwardMode, NodeConfig, Protocol, ServiceConfig, ServiceKey};
        let key = |vip, proto| ServiceKey { vip, port, proto };
        let backend = |a: IpAddr| BackendConfig { mac: Some([2, 0, 0, 0, 0, 0xbe]), ..BackendConfig::new(a, 80) };
        let config = Config {
            node: NodeConfig {
                snat_v4: Some(NODE4),
                snat_v6: Some(NODE6),
                snat_ports: (40000, 40999),
                gateway_mac: Some([2, 0, 0, 0, 0, 0xfe]),
                ..NodeConfig::default()
            },
            services: vec![
                ServiceConfig::new(
                    "v4",
                    key(IpAddr::V4(vip4), Protocol::Tcp),
                    ForwardMode::Nat,
                    vec![backend(IpAddr::V4(Ipv4Addr::new(10, 1, 0, 1)))],
                ),
                ServiceConfig::new(
                    "v6",
                    key(IpAddr::V6(vip6), Protocol::Tcp),
                    ForwardMode::Nat,
                    vec![backend(IpAddr::V6(Ipv6Addr::new(0xfd00, 1, 0, 0, 0, 0, 0, 1)))],
                ),
            ],
        };
        let tables = lb_core::service::TableBuilder::new().build(&config).unwrap();
        let mut w = lb_core::Worker::new(tables, lb_core::WorkerConfig::single_core(1024));
        let mut buf = frame.to_vec();
        let mut frames = [lb_core::Frame::whole(&mut buf)];
        let mut verdicts = [lb_core::Verdict::Pass];
        w.process_burst(&mut frames, lb_core::Instant::from_nanos(1_000_000_000), &mut verdicts);
        verdicts[0]
    }

    /// ICMPv6 behind an extension header to a VIP the host does not hold is judged as without one:
    /// an error about a service's flow is steered, and lb-core acts on it; an error about no flow of
    /// ours, or an echo, lb-core passes (on AF_XDP, a drop counted as passed), so it stays with the
    /// kernel.
    #[test]
    fn icmpv6_behind_extension_headers_is_judged_by_what_it_is() {
        let Some(s) = nat_steering() else { return };
        // A destination options header (8 bytes: PadN) before the ICMPv6 message.
        let behind_options = |l4: &[u8]| v6_with(VIP6, 60, &[[58, 0, 1, 4, 0, 0, 0, 0].as_slice(), l4].concat());
        let error = |sport| behind_options(&[icmp(1), quote6(VIP6, &[], 6, sport)].concat());
        let ours = error(80);
        assert_ne!(lb_core_verdict(&ours), lb_core::Verdict::Pass, "lb-core acts on an error about VIP:80");
        assert_eq!(s.test_run(&ours).unwrap(), XdpAction::Drop, "steered");
        for (name, frame) in [("an error about port 22", error(22)), ("an echo request", behind_options(&icmp(128)))] {
            assert_eq!(lb_core_verdict(&frame), lb_core::Verdict::Pass, "{name}: lb-core passes it");
            assert_eq!(s.test_run(&frame).unwrap(), XdpAction::Pass, "{name}: steered, where lb-core passes it");
        }
    }

    /// A node address that serves a NodePort (30080) and is the SNAT address too (kube-proxy's
    /// masquerade): the program steers the NodePort's traffic, the NAT replies, and ICMP errors about
    /// either; the node's own traffic (SSH, errors about it, fragmented datagrams) stays with the
    /// kernel, as lb-core, which passes such an error, would want.
    #[test]
    fn a_node_address_serving_node_ports_and_nat_steers_both_and_leaves_the_node_its_own() {
        let Some(mut s) = steering() else { return };
        let (node, node6) = (NODE4, NODE6);
        s.set(SteeringSet {
            services: [(IpAddr::V4(node), 30080, 6), (IpAddr::V6(node6), 30080, 6)].into(),
            snat: [(IpAddr::V4(node), (40000, 40999)), (IpAddr::V6(node6), (40000, 40999))].into(),
            host: [IpAddr::V4(node), IpAddr::V6(node6)].into(),
            ..SteeringSet::default()
        })
        .unwrap();
        let (steered, kernel) = (XdpAction::Drop, XdpAction::Pass);
        let error4 = |sport| v4_with(node, 1, 0, &[icmp(3), quote4(node, 6, sport, 0, 5)].concat());
        let error6 = |sport| v6_with(node6, 58, &[icmp(2), quote6(node6, &[], 6, sport)].concat());
        let cases: Vec<(&str, Vec<u8>, XdpAction)> = vec![
            ("the NodePort", v4_with(node, 6, 0, &ports(30080)), steered),
            ("a NAT reply", v4_with(node, 6, 0, &ports(40500)), steered),
            ("SSH to the node", v4_with(node, 6, 0, &ports(22)), kernel),
            ("an error about a NodePort flow", error4(30080), steered),
            ("an error about a NAT flow", error4(40500), steered),
            ("an error about the node's SSH session", error4(22), kernel),
            ("IPv6: the NodePort", v6_with(node6, 6, &ports(30080)), steered),
            ("IPv6: a NAT reply", v6_with(node6, 6, &ports(40500)), steered),
            ("IPv6: an error about a NodePort flow", error6(30080), steered),
            ("IPv6: an error about a NAT flow", error6(40500), steered),
            ("IPv6: an error about the node's SSH session", error6(22), kernel),
            // Fragments: the host's own datagrams reassemble in the kernel (a NodePort's first
            // fragment goes there too; lb-core would only drop it).
            ("a first IPv4 fragment (DNS answer to the node)", v4_with(node, 17, 0x2000, &ports(5353)), kernel),
            ("a later IPv4 fragment", v4_with(node, 17, 185, &[0u8; 8]), kernel),
            ("a first IPv4 fragment to the NodePort", v4_with(node, 6, 0x2000, &ports(30080)), kernel),
            (
                "an IPv6 fragment",
                v6_with(node6, 44, &[[17, 0, 0, 1, 0, 0, 0, 1].as_slice(), &ports(5353)].concat()),
                kernel,
            ),
            (
                "IPv6: the NodePort behind a destination options header",
                v6_with(node6, 60, &[[6, 0, 1, 4, 0, 0, 0, 0].as_slice(), &ports(30080)].concat()),
                steered,
            ),
        ];
        for (name, frame, want) in &cases {
            assert_eq!(s.test_run(frame).unwrap(), *want, "{name}");
        }
        // Not held by the host (a VIP of its own), the address's fragments are lb-core's to count.
        s.set(SteeringSet { host: BTreeSet::new(), ..s.steering().clone() }).unwrap();
        assert_eq!(s.test_run(&v4_with(node, 17, 185, &[0u8; 8])).unwrap(), steered);
        // lb-core, with the same NodePort as a NAT service, passes the errors the program passes.
        for frame in [error4(22), error6(22)] {
            assert_eq!(lb_core_verdict_for(&frame, (node, node6), 30080), lb_core::Verdict::Pass, "{frame:02x?}");
        }
    }

    /// README: "The SNAT address may be the node's own: the XDP program steers only TCP/UDP to the
    /// `snat_ports` range (and ICMP errors)". But every ICMP error, every IPv4 fragment and every IPv6
    /// packet with an extension header to that address is steered, including the node's own traffic
    /// (a "fragmentation needed" for the node's SSH session, a fragmented DNS answer to the node).
    /// lb-core drops those (no NAT flow has them), and a frame on an AF_XDP socket cannot go back to
    /// the kernel: the node's path MTU discovery and fragmented datagrams are black-holed.
    #[test]
    fn the_nodes_own_icmp_errors_and_fragments_to_its_snat_address_stay_with_the_kernel() {
        let Some(s) = nat_steering() else { return };
        let (node, node6) = (NODE4, NODE6);
        let client = Ipv4Addr::new(198, 51, 100, 7);
        let client6 = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 7);
        // The first 28 bytes of a TCP segment the node sent from port 22 (its SSH server) to a
        // client: a full IPv4 header and 8 bytes of TCP.
        let mut quote4 = vec![0x45, 0, 0x05, 0xdc, 0, 0, 0x40, 0, 63, 6, 0, 0];
        quote4.extend_from_slice(&node.octets());
        quote4.extend_from_slice(&client.octets());
        quote4.extend_from_slice(&[0, 22, 0xc3, 0x50, 0, 0, 0, 1]);
        // Type 3 code 4, next-hop MTU 1400.
        let frag_needed = v4_with(node, 1, 0, &[[3, 4, 0, 0, 0, 0, 0x05, 0x78].as_slice(), &quote4].concat());
        let mut quote6 = vec![0x60, 0, 0, 0, 0x05, 0x8c, 6, 63];
        quote6.extend_from_slice(&node6.octets());
        quote6.extend_from_slice(&client6.octets());
        quote6.extend_from_slice(&[0, 22, 0xc3, 0x50, 0, 0, 0, 1]);
        let too_big = v6_with(node6, 58, &[[2, 0, 0, 0, 0, 0, 0x05, 0x78].as_slice(), &quote6].concat());
        // UDP from the node's DNS server's upstream (port 53) to the node's resolver port 5353.
        let dns = [0, 53, 0x14, 0xe9, 0x05, 0xc8, 0, 0];
        let first_fragment = v4_with(node, 17, 0x2000, &[dns.as_slice(), &[0u8; 16]].concat());
        let later_fragment = v4_with(node, 17, 185, &[0u8; 24]);
        let v6_fragment = v6_with(node6, 44, &[[17, 0, 0, 1, 0, 0, 0, 1].as_slice(), &dns, &[0u8; 16]].concat());
        let kernel = XdpAction::Pass;
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("fragmentation needed about the node's own TCP (port 22)", frag_needed),
            ("packet too big about the node's own TCP (port 22)", too_big),
            ("first IPv4 fragment of a UDP datagram to the node's port 5353", first_fragment),
            ("later IPv4 fragment to the node", later_fragment),
            ("IPv6 fragment of a UDP datagram to the node's port 5353", v6_fragment),
        ];
        let mut lost = Vec::new();
        for (name, frame) in cases {
            if s.test_run(&frame).unwrap() != kernel {
                lost.push(format!("{name}: steered, and lb-core gives it {:?}", lb_core_verdict(&frame)));
            }
        }
        assert!(lost.is_empty(), "the node's own traffic taken from the kernel:\n{}", lost.join("\n"));
    }

    /// Frames lb-core parses and serves (`lb_core::packet`: up to two tags, TPIDs 0x8100, 0x88a8 and
    /// 0x9100; IPv6 AH as an extension header) must reach it, not the kernel, which has no service
    /// on the VIP (the program once read one 0x8100 tag and no AH).
    #[test]
    fn frames_lb_core_serves_are_steered() {
        let Some(s) = nat_steering() else { return };
        // A SYN from port 40000 to port 80: a full 20-byte TCP header.
        let syn = [[0x9c, 0x40, 0, 80, 0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x02, 0xff, 0xff].as_slice(), &[0u8; 4]].concat();
        let tag = |mut f: Vec<u8>, tpid: u16, tci: u16| {
            f.splice(12..12, tpid.to_be_bytes().into_iter().chain(tci.to_be_bytes()));
            f
        };
        let syn4 = v4_with(VIP4, 6, 0x4000, &syn);
        // An Authentication Header (next header TCP, length 4: 24 bytes) before the TCP header.
        let ah = [[6, 4, 0, 0, 0, 0, 0, 1, 0, 0, 0, 1].as_slice(), &[0u8; 12]].concat();
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("one 802.1ad tag (0x88a8)", tag(syn4.clone(), 0x88a8, 7)),
            ("QinQ: 802.1ad outer, 802.1Q inner", tag(tag(syn4.clone(), 0x8100, 42), 0x88a8, 7)),
            ("two 802.1Q tags", tag(tag(syn4.clone(), 0x8100, 42), 0x8100, 7)),
            ("IPv6 TCP after an Authentication Header", v6_with(VIP6, 51, &[ah.as_slice(), &syn].concat())),
        ];
        let mut missed = Vec::new();
        for (name, frame) in cases {
            let core = lb_core_verdict(&frame);
            assert_eq!(core, lb_core::Verdict::Tx, "{name}: lb-core serves it");
            if s.test_run(&frame).unwrap() != XdpAction::Drop {
                missed.push(name);
            }
        }
        assert!(missed.is_empty(), "served by lb-core, passed to the kernel by the program: {missed:?}");
    }

    /// The steering rules of the module comment, written plainly over the frame's bytes: whether the
    /// program must send `frame` to the socket under `set`.
    fn model(set: &SteeringSet, frame: &[u8]) -> bool {
        let be16 = |at: usize| u16::from_be_bytes([frame[at], frame[at + 1]]);
        if frame.len() < 14 {
            return false;
        }
        // Up to two VLAN tags of any of the three TPIDs.
        let (mut l3, mut ethertype) = (14, be16(12));
        for _ in 0..2 {
            if ![0x8100, 0x88a8, 0x9100].contains(&ethertype) {
                break;
            }
            if frame.len() < l3 + 4 {
                return false;
            }
            (l3, ethertype) = (l3 + 4, be16(l3 + 2));
        }
        let neighbour = |key: &[u8]| set.neighbour.iter().any(|a| vip_key(*a) == key);
        // ARP: an Ethernet / IPv4 request for a neighbour address.
        if ethertype == 0x0806 {
            return frame.len() >= l3 + 28
                && frame[l3..l3 + 8] == [0, 1, 8, 0, 6, 4, 0, 1]
                && neighbour(
                    &Ipv4Addr::from(<[u8; 4]>::try_from(&frame[l3 + 24..l3 + 28]).unwrap()).to_ipv6_mapped().octets(),
                );
        }
        // A Neighbour Solicitation for a neighbour address; any other goes on as IPv6.
        if ethertype == 0x86dd
            && frame.len() >= l3 + 64
            && frame[l3 + 6] == 58
            && frame[l3 + 40] == 135
            && neighbour(&frame[l3 + 48..l3 + 64])
        {
            return true;
        }
        let (key, proto, l4, always, v6): ([u8; 16], u8, usize, bool, bool) = match ethertype {
            0x0800 if frame.len() >= l3 + 20 => {
                let mut key = Ipv4Addr::UNSPECIFIED.to_ipv6_mapped().octets();
                key[12..].copy_from_slice(&frame[l3 + 16..l3 + 20]);
                let ihl = usize::from(frame[l3] & 0xf) * 4;
                let fragment = be16(l3 + 6) & 0x3fff != 0;
                (key, frame[l3 + 9], l3 + ihl, fragment || ihl < 20, false)
            }
            0x86dd if frame.len() >= l3 + 40 => {
                let key: [u8; 16] = frame[l3 + 24..l3 + 40].try_into().unwrap();
                let next = frame[l3 + 6];
                (key, next, l3 + 40, [0, 43, 44, 51, 60].contains(&next), true)
            }
            _ => return false,
        };
        let Some((addr, entry)) = set.addresses().into_iter().find(|(a, _)| vip_key(*a) == key) else {
            return false;
        };
        // A port of the SNAT range, or of a service of the address.
        let ours = |port: u16, proto: u8| {
            (entry.flags & STEER_SNAT != 0 && (entry.ports.0..=entry.ports.1).contains(&port))
                || set.services.contains(&(addr, port, proto))
        };
        let to_port = |l4: usize, proto: u8| frame.len() < l4 + 4 || ours(be16(l4 + 2), proto);
        // An ICMP error (its ICMP header at `l4`) quoting a TCP or UDP packet sent from the address
        // and a port steered as a destination port would be.
        let about_ours = |proto: u8, l4: usize| {
            let quoted =
                |proto: u8, at: usize| [6, 17].contains(&proto) && frame.len() >= at + 8 && ours(be16(at), proto);
            let q = l4 + 8;
            match (proto, v6) {
                (1, false) => {
                    if frame.len() < q + 20 || ![3, 11, 12].contains(&frame[l4]) || frame[q] >> 4 != 4 {
                        return false;
                    }
                    let ihl = usize::from(frame[q] & 0xf) * 4;
                    ihl >= 20
                        && be16(q + 6) & 0x1fff == 0
                        && frame[q + 12..q + 16] == key[12..]
                        && quoted(frame[q + 9], q + ihl)
                }
                (58, true) => {
                    if frame.len() < q + 40
                        || !(1..=4).contains(&frame[l4])
                        || frame[q] >> 4 != 6
                        || frame[q + 8..q + 24] != key
                    {
                        return false;
                    }
                    matches!(walk(frame, frame[q + 6], q + 40, true), Walk::To(proto, at) if quoted(proto, at))
                }
                _ => false,
            }
        };
        if entry.flags & STEER_WHOLE != 0 {
            return true;
        }
        // A service address the host does not hold: fragments, extension headers, its ports, ICMP
        // errors about its flows (also behind extension headers; other ICMPv6 behind them is not).
        if entry.flags & STEER_SERVICES != 0 && entry.flags & STEER_HOST == 0 {
            if v6 && always {
                return match walk(frame, proto, l4, false) {
                    Walk::To(58, at) => about_ours(58, at),
                    _ => true,
                };
            }
            return always
                || match proto {
                    6 | 17 => to_port(l4, proto),
                    _ => about_ours(proto, l4),
                };
        }
        // Only neighbour discovery: no IP frame.
        if entry.flags & (STEER_SNAT | STEER_HOST) == 0 {
            return false;
        }
        // A SNAT address without services, or an address the host holds: its ports (the SNAT
        // range's and its services'), ICMP errors about its flows, no fragment.
        let (proto, l4) = match (v6, always) {
            (false, true) => return false,
            (false, false) => (proto, l4),
            (true, _) => match walk(frame, proto, l4, false) {
                Walk::To(proto, l4) => (proto, l4),
                Walk::Short => return true,
                Walk::Fragment => return false,
            },
        };
        match proto {
            6 | 17 => to_port(l4, proto),
            _ => about_ours(proto, l4),
        }
    }

    /// Where [`walk`] ends.
    enum Walk {
        /// At a header of this type (not an extension header, or one past the steps) at this offset.
        To(u8, usize),
        /// In a header the frame cuts.
        Short,
        /// At a Fragment header of a fragment (in a quote: of a later fragment).
        Fragment,
    }

    /// The model of `walk_extensions`: from the header of type `next` at `at`, past at most
    /// [`EXTENSION_STEPS`] extension headers.
    fn walk(frame: &[u8], mut next: u8, mut at: usize, quote: bool) -> Walk {
        for step in 0..EXTENSION_STEPS {
            // The bytes each kind needs, and its length from its second byte.
            let (needs, len): (usize, fn(u8) -> usize) = match next {
                0 if step == 0 => (8, |n| (usize::from(n) + 1) * 8),
                43 | 60 => (8, |n| (usize::from(n) + 1) * 8),
                51 => (12, |n| (usize::from(n) + 2) * 4),
                44 => (8, |_| 8),
                _ => return Walk::To(next, at),
            };
            if frame.len() < at + needs {
                return Walk::Short;
            }
            if next == 43 && frame[at + 3] != 0 {
                return Walk::To(next, at);
            }
            let fragment_bits =
                u16::from_be_bytes([frame[at + 2], frame[at + 3]]) & if quote { 0xfff8 } else { 0xfff9 };
            if next == 44 && fragment_bits != 0 {
                return Walk::Fragment;
            }
            (next, at) = (frame[at], at + len(frame[at + 1]));
        }
        Walk::To(next, at)
    }

    thread_local! {
        /// One loaded program for all cases of the property test (loading takes milliseconds).
        static LOADED: std::cell::RefCell<Option<Option<VipSteering>>> = const { std::cell::RefCell::new(None) };
    }

    /// Whether the program (loaded once per thread) steers `frame` with its maps holding `set`;
    /// `None` where bpf(2) is refused.
    fn steered_under(set: &SteeringSet, frame: &[u8]) -> Option<bool> {
        LOADED.with(|l| {
            let mut l = l.borrow_mut();
            let s = l.get_or_insert_with(steering).as_mut()?;
            s.set(set.clone()).unwrap();
            Some(s.test_run(frame).unwrap() == XdpAction::Drop)
        })
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { cases: 5000, ..Default::default() })]

        /// For frames built from the values the rules care about (and cut anywhere in their second
        /// half), the program's verdict is the model's: steered exactly when the rules say.
        #[test]
        fn the_program_steers_exactly_what_the_rules_say(
            tags in proptest::collection::vec(proptest::sample::select(vec![0x8100u16, 0x88a8, 0x9100]), 0..4),
            v6 in proptest::prelude::any::<bool>(),
            arp_op in proptest::sample::select(vec![0u8, 1, 2]),
            target in 0usize..4,
            dst in proptest::sample::select(vec![0usize, 1, 1, 2, 3, 4]),
            proto in proptest::sample::select(vec![6u8, 17, 1, 58, 1, 58, 47, 0, 44, 43, 60, 51]),
            port in proptest::sample::select(vec![80u16, 53, 443, 22, 39999, 40000, 40500, 40999, 41000]),
            ihl in proptest::sample::select(vec![5u8, 6, 4, 0, 15]),
            frag in proptest::sample::select(vec![0u16, 0x4000, 0x2000, 0x0001, 0x1fff, 0x8000]),
            icmp_type in proptest::sample::select(vec![0u8, 1, 2, 3, 4, 5, 8, 11, 12, 13, 127, 128, 129, 135, 255]),
            exts in proptest::collection::vec(extension(), 0..6),
            // Whether the host holds the VIPs (node addresses serving NodePorts).
            host in proptest::prelude::any::<bool>(),
            // The packet an ICMP error quotes: from the SNAT address or not, its protocol, source
            // port, IPv4 header length and flags / offset field, IPv6 extension headers.
            (quote_src, quote_proto, quote_port, quote_ihl, quote_frag, quote_exts) in (
                proptest::prelude::any::<bool>(),
                proptest::sample::select(vec![6u8, 17, 1]),
                proptest::sample::select(vec![22u16, 53, 80, 443, 40000, 40500, 40999, 41000]),
                proptest::sample::select(vec![5u8, 6, 4]),
                proptest::sample::select(vec![0u16, 0x4000, 0x2000, 0x0001]),
                proptest::collection::vec(extension(), 0..6),
            ),
            cut in proptest::prelude::any::<proptest::sample::Index>(),
        ) {
            let node = NODE4;
            let node6 = NODE6;
            let lone = Ipv4Addr::new(10, 77, 0, 8);
            let lone6 = Ipv6Addr::new(0xfd77, 0, 0, 0, 0, 0, 0, 8);
            let set = SteeringSet {
                services: [(IpAddr::V4(VIP4), 80, 6), (IpAddr::V4(VIP4), 53, 17), (IpAddr::V6(VIP6), 443, 6)].into(),
                snat: [(IpAddr::V4(node), (40000, 40999)), (IpAddr::V6(node6), (40000, 40999))].into(),
                whole: BTreeSet::new(),
                // The v6 SNAT address is in the map, but not for neighbour discovery; `lone` and
                // `lone6` are for nothing else.
                neighbour: [IpAddr::V4(VIP4), IpAddr::V4(node), IpAddr::V6(VIP6), IpAddr::V4(lone), IpAddr::V6(lone6)]
                    .into(),
                host: if host { [IpAddr::V4(VIP4), IpAddr::V6(VIP6)].into() } else { BTreeSet::new() },
            };
            let mut l4 = match proto {
                1 | 58 => icmp(icmp_type),
                _ => ports(port),
            };
            if proto == 58 && icmp_type == 135 {
                // A solicitation's target (the 8 header bytes are followed by it).
                l4.extend_from_slice(&[VIP6, node6, VIP4.to_ipv6_mapped(), Ipv6Addr::LOCALHOST][target].octets());
            } else if proto == 1 || proto == 58 {
                l4.extend_from_slice(&if v6 {
                    quote6(if quote_src { node6 } else { VIP6 }, &quote_exts, quote_proto, quote_port)
                } else {
                    quote4(if quote_src { node } else { VIP4 }, quote_proto, quote_port, quote_frag, quote_ihl)
                });
            }
            l4.extend_from_slice(&[0u8; 8]);
            let frame = if arp_op != 0 {
                arp_with(arp_op, [VIP4, node, Ipv4Addr::new(10, 77, 0, 9), VIP4][target])
            } else if v6 {
                let dst = [VIP6, node6, VIP4.to_ipv6_mapped(), Ipv6Addr::LOCALHOST, lone6][dst];
                let (first, bytes) = extensions(&exts, proto, &l4);
                v6_with(dst, first, &bytes)
            } else {
                let dst = [VIP4, node, Ipv4Addr::new(10, 77, 0, 9), VIP4, lone][dst];
                let mut options = vec![0u8; usize::from(ihl.saturating_sub(5)) * 4];
                options.extend_from_slice(&l4);
                let mut f = v4_with(dst, proto, frag, &options);
                f[14] = 0x40 | ihl;
                f
            };
            let mut frame = with_tags(frame, &tags);
            let len = cut.index(frame.len() + 1);
            frame.truncate(len.max(frame.len() / 2));
            let Some(steered) = steered_under(&set, &frame) else { return Ok(()) };
            proptest::prop_assert_eq!(steered, model(&set, &frame), "frame {:02x?}", frame);
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { cases: 3000, ..Default::default() })]

        /// The same for the frames whose steering to a SNAT address depends on most bytes: replies
        /// behind IPv6 extension headers and ICMP errors with their quotes, to the SNAT address (alone,
        /// or also serving NodePorts), whole or cut anywhere.
        #[test]
        fn the_program_steers_to_a_snat_address_what_the_rules_say(
            tags in proptest::collection::vec(proptest::sample::select(vec![0x8100u16, 0x88a8, 0x9100]), 0..3),
            v6 in proptest::prelude::any::<bool>(),
            node_ports in proptest::prelude::any::<bool>(),
            host in proptest::prelude::any::<bool>(),
            error in proptest::prelude::any::<bool>(),
            transport in proptest::sample::select(vec![6u8, 17]),
            icmp_type in proptest::sample::select(vec![1u8, 2, 3, 4, 11, 12, 0, 5, 8, 128]),
            port in proptest::sample::select(vec![22u16, 30080, 40000, 40500, 40999, 41000]),
            frag in proptest::sample::select(vec![0u16, 0x4000, 0x2000, 0x0001]),
            exts in proptest::collection::vec(extension(), 0..6),
            (quote_src, quote_proto, quote_port, quote_ihl, quote_frag, quote_exts) in (
                proptest::prelude::any::<bool>(),
                proptest::sample::select(vec![6u8, 17, 1]),
                proptest::sample::select(vec![22u16, 30080, 40000, 40500, 40999, 41000]),
                proptest::sample::select(vec![5u8, 6, 4]),
                proptest::sample::select(vec![0u16, 0x4000, 0x2000, 0x0001]),
                proptest::collection::vec(extension(), 0..4),
            ),
            cut in proptest::option::of(proptest::prelude::any::<proptest::sample::Index>()),
        ) {
            let node = NODE4;
            let node6 = NODE6;
            let mut set = SteeringSet {
                services: [(IpAddr::V4(VIP4), 80, 6)].into(),
                snat: [(IpAddr::V4(node), (40000, 40999)), (IpAddr::V6(node6), (40000, 40999))].into(),
                ..SteeringSet::default()
            };
            if node_ports {
                set.services.extend([(IpAddr::V4(node), 30080, 6), (IpAddr::V6(node6), 30080, 17)]);
            }
            if host {
                set.host.extend([IpAddr::V4(node), IpAddr::V6(node6)]);
            }
            let l4 = match (error, v6) {
                (false, _) => ports(port),
                (true, false) => {
                    let src = if quote_src { node } else { Ipv4Addr::new(198, 51, 100, 7) };
                    [icmp(icmp_type), quote4(src, quote_proto, quote_port, quote_frag, quote_ihl)].concat()
                }
                (true, true) => {
                    let src = if quote_src { node6 } else { VIP6 };
                    [icmp(icmp_type), quote6(src, &quote_exts, quote_proto, quote_port)].concat()
                }
            };
            let proto = match (error, v6) {
                (false, _) => transport,
                (true, false) => 1,
                (true, true) => 58,
            };
            let frame = if v6 {
                let (first, bytes) = extensions(&exts, proto, &l4);
                v6_with(node6, first, &bytes)
            } else {
                v4_with(node, proto, frag, &l4)
            };
            let mut frame = with_tags(frame, &tags);
            if let Some(cut) = cut {
                frame.truncate(cut.index(frame.len() + 1).max(14));
            }
            let Some(steered) = steered_under(&set, &frame) else { return Ok(()) };
            proptest::prop_assert_eq!(steered, model(&set, &frame), "frame {:02x?}", frame);
        }
    }

    /// An IPv6 extension header for [`extensions`]: its type and, for a Fragment header, an offset / M
    /// field (none, first, later, later and more).
    fn extension() -> impl proptest::strategy::Strategy<Value = (u8, u16)> {
        (proptest::sample::select(vec![0u8, 43, 60, 44, 44, 51]), proptest::sample::select(vec![0u16, 1, 8, 9]))
    }

    /// With the maps full, a new set that fits them replaces the old one: stale entries go before
    /// new ones are written (written first, the third address found the two-entry map full, after
    /// the workers already had the tables that needed it).
    #[test]
    fn a_set_that_fits_the_maps_replaces_a_full_one() {
        let cfg = SteeringConfig { max_vips: 2, max_services: 2, ..SteeringConfig::default() };
        let Some(mut s) = steering_with(cfg) else { return };
        let other = Ipv4Addr::new(10, 77, 0, 101);
        let services = |a: Ipv4Addr, b: Ipv4Addr| [(IpAddr::V4(a), 80, 6), (IpAddr::V4(b), 80, 6)];
        s.set_services(services(VIP4, Ipv4Addr::new(10, 77, 0, 102)), []).unwrap();
        s.set_services(services(VIP4, other), []).expect("two services replace two in maps of two");
        let tcp_to = |dst| v4_with(dst, 6, 0, &[0, 1, 0, 80, 0, 0, 0, 0, 0, 0, 0, 0, 0x50, 0x02, 0, 0, 0, 0, 0, 0]);
        assert_eq!(s.test_run(&tcp_to(other)).unwrap(), XdpAction::Drop, "the new service is steered");
        assert_eq!(s.test_run(&tcp_to(Ipv4Addr::new(10, 77, 0, 102))).unwrap(), XdpAction::Pass, "the old is not");
        assert_eq!(s.test_run(&tcp_to(VIP4)).unwrap(), XdpAction::Drop, "the kept one still is");
    }

    /// A `set` that fails part-way (here a map too small for it) has already deleted stale entries
    /// and written some new ones, but keeps the old set as `current`. The control side then sends
    /// again ("what they hold is no longer known, so the next update is built and sent even if it
    /// equals the configuration last known to run"), yet `set` diffs against that stale `current`:
    /// sending the old set again writes nothing, and the old VIP stays unsteered while the failed
    /// set's services stay in the map.
    #[test]
    fn a_set_after_a_failed_one_steers_exactly_what_it_asks() {
        let cfg = SteeringConfig { max_vips: 4, max_services: 2, ..SteeringConfig::default() };
        let Some(mut s) = steering_with(cfg) else { return };
        let other = Ipv4Addr::new(10, 77, 0, 101);
        let tcp_to = |dst, port: u16| {
            let mut l4 = vec![0, 1];
            l4.extend_from_slice(&port.to_be_bytes());
            l4.extend_from_slice(&[0u8; 16]);
            v4_with(dst, 6, 0, &l4)
        };
        s.set_services([(IpAddr::V4(VIP4), 80, 6), (IpAddr::V4(VIP4), 81, 6)], []).unwrap();
        let three = [(IpAddr::V4(other), 80, 6), (IpAddr::V4(other), 81, 6), (IpAddr::V4(other), 82, 6)];
        assert!(s.set_services(three, []).is_err(), "three services do not fit a map of two");
        // The control side sends the running set again.
        s.set_services([(IpAddr::V4(VIP4), 80, 6), (IpAddr::V4(VIP4), 81, 6)], []).unwrap();
        let verdicts = [
            ("VIP4:80, asked for", s.test_run(&tcp_to(VIP4, 80)).unwrap(), XdpAction::Drop),
            ("VIP4:81, asked for", s.test_run(&tcp_to(VIP4, 81)).unwrap(), XdpAction::Drop),
            ("the failed set's address", s.test_run(&tcp_to(other, 80)).unwrap(), XdpAction::Pass),
        ];
        let wrong: Vec<_> = verdicts.iter().filter(|(_, got, want)| got != want).collect();
        assert!(wrong.is_empty(), "steered (Drop) or not (Pass), against what was asked: {wrong:?}");
        assert!(s.has_vip(IpAddr::V4(VIP4)).unwrap(), "the address map holds the VIP");
    }

    /// A set that fails part-way never removes what both it and the running set steer, and the next
    /// set removes what the failed one wrote and the new one does not want.
    #[test]
    fn a_failed_set_keeps_what_both_sets_steer() {
        let cfg = SteeringConfig { max_vips: 4, max_services: 2, ..SteeringConfig::default() };
        let Some(mut s) = steering_with(cfg) else { return };
        let other = Ipv4Addr::new(10, 77, 0, 101);
        let tcp_to = |dst| v4_with(dst, 6, 0, &[[0, 1, 0, 80].as_slice(), &[0u8; 16]].concat());
        s.set_services([(IpAddr::V4(VIP4), 80, 6)], []).unwrap();
        let three = [(IpAddr::V4(VIP4), 80, 6), (IpAddr::V4(other), 80, 6), (IpAddr::V4(other), 81, 6)];
        assert!(s.set_services(three, []).is_err(), "three services do not fit a map of two");
        assert_eq!(s.test_run(&tcp_to(VIP4)).unwrap(), XdpAction::Drop, "kept through the failed set");
        s.set_services([(IpAddr::V4(VIP4), 80, 6)], []).unwrap();
        assert_eq!(s.test_run(&tcp_to(VIP4)).unwrap(), XdpAction::Drop, "still steered");
        assert_eq!(s.test_run(&tcp_to(other)).unwrap(), XdpAction::Pass, "what the failed set wrote is gone");
        assert!(!s.has_vip(IpAddr::V4(other)).unwrap());
    }

    /// A steering set (two services, a SNAT range) and its changes, each keeping part of it: services
    /// and a SNAT address that come and go beside the kept ones, then the kept addresses' entries
    /// changing in place (held by the host, answered for, a NodePort).
    fn changing_sets() -> [SteeringSet; 5] {
        let other = IpAddr::V4(Ipv4Addr::new(10, 77, 0, 101));
        let base = SteeringSet {
            services: [(IpAddr::V4(VIP4), 80, 6), (IpAddr::V6(VIP6), 443, 6)].into(),
            snat: [(IpAddr::V4(NODE4), (40000, 40999))].into(),
            ..SteeringSet::default()
        };
        let with = |f: &dyn Fn(&mut SteeringSet)| {
            let mut set = base.clone();
            f(&mut set);
            set
        };
        [
            base.clone(),
            with(&|set| {
                set.services.extend([(IpAddr::V4(VIP4), 53, 17), (other, 80, 6)]);
                set.snat.insert(IpAddr::V6(NODE6), (40000, 40999));
            }),
            with(&|set| set.host.extend([IpAddr::V4(VIP4), IpAddr::V4(NODE4)])),
            with(&|set| {
                set.whole.insert(other);
                set.neighbour.extend([IpAddr::V4(VIP4), IpAddr::V6(VIP6)]);
            }),
            with(&|set| {
                set.services.insert((IpAddr::V4(NODE4), 30080, 6));
                set.host.insert(IpAddr::V4(NODE4));
            }),
        ]
    }

    /// A reload rewrites the maps while frames arrive: every frame of a service (or SNAT range) that
    /// both the old and the new set steer must be steered throughout, never passed to the kernel in
    /// between (as it would be if the maps were emptied and filled again, or an address's entry
    /// deleted and written back when only its flags change). The program runs on another thread
    /// while the sets alternate.
    #[test]
    fn frames_of_what_stays_steered_are_never_passed_while_the_maps_change() {
        let Some(mut s) = steering() else { return };
        let sets = changing_sets();
        let base = sets[0].clone();
        let frames = [
            ("TCP to VIP4:80", v4_with(VIP4, 6, 0, &ports(80))),
            ("TCP to [VIP6]:443", v6_with(VIP6, 6, &ports(443))),
            ("a NAT reply to NODE4:40500", v4_with(NODE4, 6, 0, &ports(40500))),
        ];
        s.set(base.clone()).unwrap();
        // The same program through a second descriptor, run while `s` rewrites its maps.
        let program = Program { fd: s.program.fd.try_clone().unwrap() };
        let done = std::sync::atomic::AtomicBool::new(false);
        let (runs, passed) = std::thread::scope(|scope| {
            let runner = scope.spawn(|| {
                let (mut runs, mut passed) = (0u64, Vec::new());
                while !done.load(std::sync::atomic::Ordering::Relaxed) {
                    for (name, frame) in &frames {
                        let verdict = XdpAction::from(program.test_run(frame).unwrap());
                        runs += 1;
                        if verdict != XdpAction::Drop && passed.len() < 10 {
                            passed.push(format!("{name}: {verdict:?}"));
                        }
                    }
                }
                (runs, passed)
            });
            for _ in 0..2000 {
                for set in &sets {
                    s.set(set.clone()).unwrap();
                }
            }
            done.store(true, std::sync::atomic::Ordering::Relaxed);
            runner.join().unwrap()
        });
        assert!(runs > 0, "the program never ran during the updates");
        assert!(passed.is_empty(), "passed to the kernel during a reload ({runs} runs): {passed:?}");
    }

    #[test]
    fn an_empty_socket_slot_falls_back_to_pass_by_default() {
        let s = match VipSteering::load(SteeringConfig::default()) {
            Ok(s) => s,
            Err(e) if e.is_refused() => return println!("SKIPPED: bpf(2) refused ({e})"),
            Err(e) => panic!("{e}"),
        };
        let mut s = s;
        s.add_vip(IpAddr::V4(VIP4)).unwrap();
        assert_eq!(s.test_run(&v4(VIP4, None)).unwrap(), XdpAction::Pass);
    }

    /// A frame steered to a queue with no socket is counted, once per frame, whatever the action it
    /// falls back to; a frame that is not steered is not.
    #[test]
    fn frames_steered_to_an_empty_socket_slot_are_counted() {
        for missing_socket in [MissingSocket::Pass, MissingSocket::Drop] {
            let mut s = match VipSteering::load(SteeringConfig { missing_socket, ..SteeringConfig::default() }) {
                Ok(s) => s,
                Err(e) if e.is_refused() => return println!("SKIPPED: bpf(2) refused ({e})"),
                Err(e) => panic!("{e}"),
            };
            s.add_vip(IpAddr::V4(VIP4)).unwrap();
            let counters = s.counters().unwrap();
            assert_eq!(counters.no_socket().unwrap(), 0);
            let want = match missing_socket {
                MissingSocket::Pass => XdpAction::Pass,
                MissingSocket::Drop => XdpAction::Drop,
            };
            for _ in 0..3 {
                assert_eq!(s.test_run(&v4(VIP4, None)).unwrap(), want);
            }
            assert_eq!(s.test_run(&v4(Ipv4Addr::new(10, 77, 0, 99), None)).unwrap(), XdpAction::Pass);
            assert_eq!(counters.no_socket().unwrap(), 3, "{missing_socket:?}");
        }
    }

    /// The intersection of two sets steers no frame that either set leaves to the kernel (judged by
    /// the module comment's rules, `model`), and takes no more map entries than either: what the
    /// control side steers while workers change tables. A SNAT address keeps the ports both ranges
    /// hold; a host mark of either set stays (it steers less).
    #[test]
    fn the_intersection_steers_only_what_both_sets_steer() {
        // (The address `changing_sets` adds and removes.)
        let other = Ipv4Addr::new(10, 77, 0, 101);
        let mut sets = changing_sets().to_vec();
        let moved = |range| {
            let mut set = sets[0].clone();
            set.snat.insert(IpAddr::V4(NODE4), range);
            set
        };
        // Nothing steered; the SNAT range moves (overlapping), and moves away.
        let (overlapping, away) = (moved((40500, 41999)), moved((42000, 42999)));
        sets.insert(1, SteeringSet::default());
        sets.extend([overlapping, away]);
        let mut frames = vec![arp_with(1, VIP4), arp_with(1, other), v6_with(VIP6, 6, &ports(443))];
        for dst in [VIP4, NODE4, other] {
            for port in [53, 80, 30080, 39999, 40000, 40499, 40500, 40999, 41000, 41999, 42000, 42999] {
                frames.push(v4_with(dst, 6, 0, &ports(port)));
                frames.push(v4_with(dst, 17, 0, &ports(port)));
                frames.push(v4_with(dst, 6, 0x2000, &ports(port)));
                let error = [icmp(3), quote4(dst, 6, port, 0, 5)].concat();
                frames.push(v4_with(dst, 1, 0, &error));
            }
            frames.push(v4_with(dst, 1, 0, &icmp(8)));
        }
        for a in &sets {
            for b in &sets {
                let both = a.intersection(b);
                assert_eq!(both, b.intersection(a));
                assert!(both.address_count() <= a.address_count().min(b.address_count()), "{a:?} {b:?}");
                assert!(both.services.len() <= a.services.len().min(b.services.len()));
                for (i, f) in frames.iter().enumerate() {
                    if model(&both, f) {
                        assert!(model(a, f) && model(b, f), "frame {i} steered by {both:?}, not by {a:?} and {b:?}");
                    }
                }
            }
            assert_eq!(a.intersection(a), *a, "a set and itself");
        }
        assert_eq!(sets[0].intersection(&sets[6]).snat, [(IpAddr::V4(NODE4), (40500, 40999))].into());
        assert!(sets[0].intersection(&sets[7]).snat.is_empty(), "no port in common");
        assert_eq!(sets[0].intersection(&sets[3]).host, sets[3].host);
        // And it is not trivially empty: what both steer stays steered.
        let kept = v4_with(VIP4, 6, 0, &ports(80));
        assert!(model(&sets[0].intersection(&sets[2]), &kept));
    }
}

/// A signal that comes while the verifier checks the program (a SIGHUP asking `lb run` to reload as
/// it starts) makes bpf(2) fail with EAGAIN; the load is tried again, as libbpf does.
#[cfg(test)]
mod interrupted_load {
    use super::{SteeringConfig, VipSteering};
    use std::time::{Duration, Instant};

    extern "C" fn nothing(_sig: libc::c_int) {}

    #[test]
    fn a_load_a_signal_interrupts_is_tried_again() {
        let start = Instant::now();
        match VipSteering::load(SteeringConfig::default()) {
            Ok(_) => {}
            Err(e) if e.is_refused() => return println!("SKIPPED: bpf(2) refused ({e})"),
            Err(e) => panic!("{e}"),
        }
        let took = start.elapsed();
        // SAFETY: a zeroed sigaction is a valid "no flags, empty mask" value; `nothing` does nothing.
        let rc = unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = nothing as extern "C" fn(libc::c_int) as libc::sighandler_t;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(libc::SIGUSR2, &sa, std::ptr::null_mut())
        };
        assert_eq!(rc, 0);
        // SAFETY: pthread_self has no preconditions.
        let me = unsafe { libc::pthread_self() };
        for _ in 0..5 {
            // One signal to this thread halfway through a load as long as the first.
            let signaller = std::thread::spawn(move || {
                std::thread::sleep(took / 2);
                // SAFETY: `me` is this test's thread, alive until it joins the signaller.
                unsafe { libc::pthread_kill(me, libc::SIGUSR2) };
            });
            let loaded = VipSteering::load(SteeringConfig::default());
            signaller.join().unwrap();
            if let Err(e) = loaded {
                panic!("a load interrupted by a signal failed (took {took:?} uninterrupted): {e}");
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}
