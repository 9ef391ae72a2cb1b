//! The XDP program that steers VIP traffic to the AF_XDP sockets and leaves everything else to the
//! kernel.
//!
//! For each frame: parse Ethernet (with at most one 802.1Q tag), take the IPv4 or IPv6 destination,
//! look it up in the VIP map (16-byte keys; IPv4 as `::ffff:a.b.c.d`); on a hit, `bpf_redirect_map`
//! to the XSKMAP slot of the frame's RX queue, else `XDP_PASS`. So SSH, kubelet, routing protocols and
//! every other host packet stay in the kernel. ARP (and NDP, which is addressed to solicited-node
//! multicast, never to the VIP) goes to the `neighbour` hook, which passes for now; a responder for
//! VIP addresses plugs in there. The control side edits the VIP map live; the program never changes.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv6Addr};

use super::asm::{Asm, Cond, Reg, Size};
use super::{AttachMode, BpfError, Link, MAP_TYPE_HASH, MAP_TYPE_XSKMAP, Map, Program};

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
    /// Most VIP addresses.
    pub max_vips: u32,
    /// What a VIP frame gets on a queue without a socket.
    pub missing_socket: MissingSocket,
}

impl Default for SteeringConfig {
    fn default() -> Self {
        SteeringConfig {
            queues: 64,
            max_vips: 4096,
            missing_socket: MissingSocket::Pass,
        }
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

/// Builds the program text with `vips` and `xsks` as the map descriptors.
pub fn steering_program(
    vips: i32,
    xsks: i32,
    missing_socket: MissingSocket,
) -> Result<Vec<super::asm::Insn>, BpfError> {
    use Reg::*;
    let mut a = Asm::new();
    let pass = a.new_label();
    let vlan = a.new_label();
    let neighbour = a.new_label();
    let lookup = a.new_label();
    let v4 = [a.new_label(), a.new_label()];
    let v6 = [a.new_label(), a.new_label()];
    // Offsets of the L3 header: untagged, one 802.1Q tag.
    const L3: [i16; 2] = [14, 18];

    // r6 = ctx (kept across helper calls); r2 = data; r3 = data_end.
    a.mov(R6, R1)
        .load(Size::W, R2, R6, XDP_MD_DATA)
        .load(Size::W, R3, R6, XDP_MD_DATA_END);

    // Ethernet header present? Dispatch on the ethertype.
    a.mov(R4, R2).add_imm(R4, 14).jmp(Cond::Gt, R4, R3, pass);
    a.load(Size::H, R5, R2, 12)
        .jmp_imm(Cond::Eq, R5, ethertype(0x0800), v4[0])
        .jmp_imm(Cond::Eq, R5, ethertype(0x86dd), v6[0])
        .jmp_imm(Cond::Eq, R5, ethertype(0x8100), vlan)
        .jmp_imm(Cond::Eq, R5, ethertype(0x0806), neighbour)
        .ja(pass);

    // One VLAN tag: the inner ethertype sits 4 bytes later.
    a.bind(vlan)
        .mov(R4, R2)
        .add_imm(R4, 18)
        .jmp(Cond::Gt, R4, R3, pass);
    a.load(Size::H, R5, R2, 16)
        .jmp_imm(Cond::Eq, R5, ethertype(0x0800), v4[1])
        .jmp_imm(Cond::Eq, R5, ethertype(0x86dd), v6[1])
        .jmp_imm(Cond::Eq, R5, ethertype(0x0806), neighbour)
        .ja(pass);

    for (i, l3) in L3.into_iter().enumerate() {
        // IPv4: key = ::ffff:<daddr> on the stack at fp-16.
        a.bind(v4[i])
            .mov(R4, R2)
            .add_imm(R4, i32::from(l3) + 20)
            .jmp(Cond::Gt, R4, R3, pass);
        a.load(Size::W, R5, R2, l3 + 16)
            .store_imm(Size::DW, R10, -16, 0)
            .store_imm(Size::W, R10, -8, i32::from_ne_bytes([0, 0, 0xff, 0xff]))
            .store(Size::W, R10, -4, R5)
            .ja(lookup);
        // IPv6: key = daddr.
        a.bind(v6[i])
            .mov(R4, R2)
            .add_imm(R4, i32::from(l3) + 40)
            .jmp(Cond::Gt, R4, R3, pass);
        a.load(Size::DW, R5, R2, l3 + 24)
            .store(Size::DW, R10, -16, R5)
            .load(Size::DW, R5, R2, l3 + 32)
            .store(Size::DW, R10, -8, R5)
            .ja(lookup);
    }

    // VIP? Then to the socket of this RX queue (the fallback action if the slot is empty).
    a.bind(lookup)
        .ld_map_fd(R1, vips)
        .mov(R2, R10)
        .add_imm(R2, -16)
        .call(HELPER_MAP_LOOKUP_ELEM);
    a.jmp_imm(Cond::Eq, R0, 0, pass);
    let fallback = match missing_socket {
        MissingSocket::Pass => XDP_PASS,
        MissingSocket::Drop => XDP_DROP,
    };
    a.load(Size::W, R2, R6, XDP_MD_RX_QUEUE_INDEX)
        .ld_map_fd(R1, xsks)
        .mov_imm(R3, fallback)
        .call(HELPER_REDIRECT_MAP)
        .exit();

    // ARP for a VIP: hook for a later responder (redirect here once the worker answers ARP / NDP).
    a.bind(neighbour).ja(pass);

    a.bind(pass).ret(XDP_PASS);
    Ok(a.finish()?)
}

/// The loaded steering program with its two maps: VIP addresses and queue -> socket.
#[derive(Debug)]
pub struct VipSteering {
    program: Program,
    vips: Map,
    xsks: Map,
    current: BTreeSet<IpAddr>,
}

impl VipSteering {
    /// Creates the maps and loads the program.
    pub fn load(config: SteeringConfig) -> Result<Self, BpfError> {
        let vips = Map::create(MAP_TYPE_HASH, 16, 4, config.max_vips.max(1))?;
        let xsks = Map::create(MAP_TYPE_XSKMAP, 4, 4, config.queues.max(1))?;
        let insns = steering_program(vips.fd(), xsks.fd(), config.missing_socket)?;
        let program = Program::load_xdp("lb_vip_steer", &insns)?;
        Ok(VipSteering {
            program,
            vips,
            xsks,
            current: BTreeSet::new(),
        })
    }

    /// Starts steering frames for `vip` (takes effect for the next frame).
    pub fn add_vip(&mut self, vip: IpAddr) -> Result<(), BpfError> {
        self.vips.update(&vip_key(vip), &1u32.to_ne_bytes())?;
        self.current.insert(vip);
        Ok(())
    }

    /// Stops steering frames for `vip`.
    pub fn remove_vip(&mut self, vip: IpAddr) -> Result<(), BpfError> {
        self.vips.delete(&vip_key(vip))?;
        self.current.remove(&vip);
        Ok(())
    }

    /// Makes the VIP set exactly `vips`: adds the new ones first, then removes the old ones.
    pub fn set_vips(&mut self, vips: impl IntoIterator<Item = IpAddr>) -> Result<(), BpfError> {
        let want: BTreeSet<IpAddr> = vips.into_iter().collect();
        for &v in want.difference(&self.current.clone()) {
            self.add_vip(v)?;
        }
        for v in self.current.clone().difference(&want) {
            self.remove_vip(*v)?;
        }
        Ok(())
    }

    /// True if the kernel map holds `vip`.
    pub fn has_vip(&self, vip: IpAddr) -> Result<bool, BpfError> {
        self.vips.contains(&vip_key(vip))
    }

    /// The VIPs as the control side set them.
    pub fn vips(&self) -> impl Iterator<Item = &IpAddr> {
        self.current.iter()
    }

    /// Sends frames of RX queue `queue` to the AF_XDP socket `xsk_fd`.
    pub fn set_socket(&self, queue: u32, xsk_fd: i32) -> Result<(), BpfError> {
        self.xsks
            .update(&queue.to_ne_bytes(), &(xsk_fd as u32).to_ne_bytes())
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

/// The IPv4-mapped prefix of VIP keys, for readers of the map (bpftool shows raw keys).
pub const V4_MAPPED_PREFIX: Ipv6Addr = Ipv6Addr::new(0, 0, 0, 0, 0, 0xffff, 0, 0);

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    const VIP4: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 100);
    const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd77, 0, 0, 0, 0, 0, 0, 0x100);

    fn eth(ethertype: u16, vlan: Option<u16>) -> Vec<u8> {
        let mut f = vec![0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2];
        if let Some(tci) = vlan {
            f.extend_from_slice(&0x8100u16.to_be_bytes());
            f.extend_from_slice(&tci.to_be_bytes());
        }
        f.extend_from_slice(&ethertype.to_be_bytes());
        f
    }

    /// An IPv4/UDP frame to `dst` (checksums do not matter to the classifier).
    fn v4(dst: Ipv4Addr, vlan: Option<u16>) -> Vec<u8> {
        let mut f = eth(0x0800, vlan);
        f.extend_from_slice(&[0x45, 0, 0, 28, 0, 0, 0x40, 0, 64, 17, 0, 0, 10, 77, 0, 1]);
        f.extend_from_slice(&dst.octets());
        f.extend_from_slice(&[0x30, 0x39, 0, 80, 0, 8, 0, 0]);
        f
    }

    fn v6(dst: Ipv6Addr, vlan: Option<u16>) -> Vec<u8> {
        let mut f = eth(0x86dd, vlan);
        f.extend_from_slice(&[0x60, 0, 0, 0, 0, 8, 17, 64]);
        f.extend_from_slice(&Ipv6Addr::new(0xfd77, 0, 0, 0, 0, 0, 0, 1).octets());
        f.extend_from_slice(&dst.octets());
        f.extend_from_slice(&[0x30, 0x39, 0, 80, 0, 8, 0, 0]);
        f
    }

    fn arp_for(target: Ipv4Addr) -> Vec<u8> {
        let mut f = eth(0x0806, None);
        f.extend_from_slice(&[
            0, 1, 8, 0, 6, 4, 0, 1, 2, 0, 0, 0, 0, 2, 10, 77, 0, 1, 0, 0, 0, 0, 0, 0,
        ]);
        f.extend_from_slice(&target.octets());
        f
    }

    /// Loads the program with VIP frames dropped (no socket in the test), so "steered" shows as
    /// Drop and "left to the kernel" as Pass. Skips with a reason when bpf(2) is refused.
    fn steering() -> Option<VipSteering> {
        let cfg = SteeringConfig {
            missing_socket: MissingSocket::Drop,
            ..SteeringConfig::default()
        };
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
            (
                "IPv4 to another address",
                v4(Ipv4Addr::new(10, 77, 0, 101), None),
                kernel,
            ),
            (
                "IPv6 to another address",
                v6(Ipv6Addr::LOCALHOST, None),
                kernel,
            ),
            (
                "IPv4-mapped lookalike of the v4 VIP in IPv6",
                v6(VIP4.to_ipv6_mapped(), None),
                steered,
            ),
            ("ARP asking for the VIP", arp_for(VIP4), kernel),
            (
                "IPv4 to the VIP cut after the source address",
                v4(VIP4, None)[..30].to_vec(),
                kernel,
            ),
            (
                "IPv6 to the VIP cut inside the destination",
                v6(VIP6, None)[..50].to_vec(),
                kernel,
            ),
            (
                "VLAN header cut short",
                v4(VIP4, Some(1))[..16].to_vec(),
                kernel,
            ),
            (
                "an IPv4 ethertype and nothing after it",
                eth(0x0800, None),
                kernel,
            ),
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
}
