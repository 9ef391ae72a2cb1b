//! A userspace stand-in for a backend kernel's tunnel drivers, for kernels built without ipip,
//! ip6_tunnel and fou (no `tunl0` / `ip6tnl0`), so the lab's IP-in-IP and GUE modes still end in
//! real kernel TCP on the backends.
//!
//! ```text
//!  backend namespace
//!  eth0 ─► kernel IP ─┬─► raw socket, protocol 4: IPv4 in IPv4 (the read starts at the outer header)
//!                     ├─► raw socket, protocol 41: IPv6 in IPv6 (the read starts after it)
//!                     └─► UDP sockets on the GUE port: GUE variant 0 header + inner packet
//!        one thread per socket: check the outer addresses and headers, strip them
//!                     ─► TUN `decap0` (rp_filter off) ─► kernel IP: the inner packet, for the VIP on lo
//! ```
//! A raw socket taking a packet counts as delivery, so the kernel sends no ICMP "protocol
//! unreachable" for the protocol it has no handler for. The backend answers the client directly from
//! the VIP, as behind the kernel's own tunnel devices. Anything the checks refuse is counted and not
//! passed on, so a wrong outer address, a wrong GUE header or an inner packet of the wrong family
//! breaks the connection as it would behind a kernel; a bad inner checksum is the backend kernel's
//! TCP to refuse. The threads wait on their sockets with a short read timeout and end when the
//! [`Decapsulator`] drops; the TUN interface goes with its last descriptor.

use std::fs::File;
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use lb_core::config::ForwardMode;
use lb_io::netns::{Netns, enter_netns};
use socket2::{Domain, Protocol, Socket, Type};

use super::LabError;

/// The TUN interface each backend namespace gets.
pub const TUN_NAME: &str = "decap0";

/// How long a decapsulating thread waits on its socket before it looks at the stop flag again.
const POLL: Duration = Duration::from_millis(100);

/// IP protocol numbers announcing an inner IPv4 / IPv6 packet (outer protocol, or GUE's field).
const PROTO_IPV4: u8 = 4;
const PROTO_IPV6: u8 = 41;

/// Why a received tunnel packet was not passed on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecapError {
    /// Shorter than the headers it announces.
    #[error("tunnel packet of {len} bytes is shorter than its headers")]
    Truncated {
        /// Bytes received.
        len: usize,
    },
    /// The outer IPv4 header is not a well-formed IPv4 header.
    #[error("outer IPv4 header malformed: version {version}, header length {header_len}, total length {total_len}")]
    BadOuterHeader {
        /// The version nibble.
        version: u8,
        /// IHL in bytes.
        header_len: usize,
        /// The total length field.
        total_len: usize,
    },
    /// The outer protocol is not IP-in-IP.
    #[error("outer protocol {0}, expected 4 (IPv4 in IPv4)")]
    WrongProtocol(u8),
    /// The outer source is not the load balancer's tunnel address.
    #[error("outer source {got}, expected the load balancer's tunnel address {want}")]
    WrongSource {
        /// What the packet carried.
        got: IpAddr,
        /// The configured tunnel source.
        want: IpAddr,
    },
    /// The outer destination is not this backend.
    #[error("outer destination {got}, expected this backend's address {want}")]
    WrongDestination {
        /// What the packet carried.
        got: IpAddr,
        /// This backend's address.
        want: IpAddr,
    },
    /// The GUE header is not a variant 0 header without control flag, options or flags.
    #[error("GUE header {0:02x?}: expected version 0, no control flag, no options and no flags")]
    BadGueHeader([u8; 4]),
    /// GUE names an inner protocol that is not IP.
    #[error("GUE protocol {0}, expected 4 (IPv4) or 41 (IPv6)")]
    GueProtocol(u8),
    /// The inner packet's IP version is not the one the outer headers announce.
    #[error("inner packet has IP version {got}, the outer headers announce {want}")]
    InnerVersion {
        /// The inner version nibble.
        got: u8,
        /// The announced version.
        want: u8,
    },
}

/// The inner packet of an IPv4-in-IPv4 packet as a raw protocol-4 socket reads it (outer header
/// included), checked as `ipip`'s receive path would, from `src` to `dst`.
pub fn ipip4(packet: &[u8], src: Ipv4Addr, dst: Ipv4Addr) -> Result<&[u8], DecapError> {
    let header = packet.get(..20).ok_or(DecapError::Truncated { len: packet.len() })?;
    let version = header[0] >> 4;
    let header_len = usize::from(header[0] & 0x0f) * 4;
    let total_len = usize::from(u16::from_be_bytes([header[2], header[3]]));
    if version != 4 || header_len < 20 || total_len < header_len || total_len > packet.len() {
        return Err(DecapError::BadOuterHeader { version, header_len, total_len });
    }
    if header[9] != PROTO_IPV4 {
        return Err(DecapError::WrongProtocol(header[9]));
    }
    let got_src = Ipv4Addr::new(header[12], header[13], header[14], header[15]);
    let got_dst = Ipv4Addr::new(header[16], header[17], header[18], header[19]);
    check_source(got_src.into(), src.into())?;
    if got_dst != dst {
        return Err(DecapError::WrongDestination { got: got_dst.into(), want: dst.into() });
    }
    inner(&packet[header_len..total_len], 4)
}

/// The inner packet of a GUE variant 0 payload (what a UDP socket on the GUE port reads), checked as
/// Linux's `fou` in `gue` mode would.
pub fn gue(payload: &[u8]) -> Result<&[u8], DecapError> {
    let header: [u8; 4] =
        payload.get(..4).and_then(|h| h.try_into().ok()).ok_or(DecapError::Truncated { len: payload.len() })?;
    // Version (2 bits) 0, C (1 bit) 0, hlen (5 bits) 0; flags 0.
    if header[0] != 0 || header[2..] != [0, 0] {
        return Err(DecapError::BadGueHeader(header));
    }
    let version = match header[1] {
        PROTO_IPV4 => 4,
        PROTO_IPV6 => 6,
        other => return Err(DecapError::GueProtocol(other)),
    };
    inner(&payload[4..], version)
}

/// `packet`, if it is an IP packet of `version`.
pub fn inner(packet: &[u8], version: u8) -> Result<&[u8], DecapError> {
    let got = packet.first().map(|b| b >> 4).ok_or(DecapError::Truncated { len: 0 })?;
    if got != version {
        return Err(DecapError::InnerVersion { got, want: version });
    }
    Ok(packet)
}

/// Refuses a packet whose outer source is not the load balancer's tunnel address.
fn check_source(got: IpAddr, want: IpAddr) -> Result<(), DecapError> {
    if got == want { Ok(()) } else { Err(DecapError::WrongSource { got, want }) }
}

/// What a [`Decapsulator`] did so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DecapStats {
    /// Inner packets written to the TUN interface.
    pub packets: u64,
    /// Packets refused by the checks or not written (each also logged).
    pub dropped: u64,
}

#[derive(Debug, Default)]
struct Counters {
    packets: AtomicU64,
    dropped: AtomicU64,
}

/// The tunnel ends of one backend: its own addresses (outer destinations) and the load balancer's
/// tunnel sources.
#[derive(Debug, Clone, Copy)]
pub struct TunnelEnds {
    /// This backend's IPv4 address.
    pub local_v4: Ipv4Addr,
    /// This backend's IPv6 address.
    pub local_v6: Ipv6Addr,
    /// The load balancer's IPv4 tunnel source.
    pub remote_v4: Ipv4Addr,
    /// The load balancer's IPv6 tunnel source.
    pub remote_v6: Ipv6Addr,
}

/// How a socket's reads are turned into inner packets.
#[derive(Debug, Clone, Copy)]
enum Strip {
    /// Raw protocol 4, outer IPv4 header included.
    IpIp4 { src: Ipv4Addr, dst: Ipv4Addr },
    /// Raw protocol 41 bound to the backend's address: the inner IPv6 packet.
    IpIp6 { src: Ipv6Addr },
    /// UDP on the GUE port bound to the backend's address: GUE header + inner packet.
    Gue { src: IpAddr },
}

impl Strip {
    fn apply(self, read: &[u8], from: IpAddr) -> Result<&[u8], DecapError> {
        match self {
            Strip::IpIp4 { src, dst } => ipip4(read, src, dst),
            Strip::IpIp6 { src } => {
                check_source(from, src.into())?;
                inner(read, 6)
            }
            Strip::Gue { src } => {
                check_source(from, src)?;
                gue(read)
            }
        }
    }
}

/// One backend's userspace decapsulator: a TUN interface and a thread per tunnel socket, all
/// created inside the backend's namespace. Dropping it stops and joins the threads.
#[derive(Debug)]
pub struct Decapsulator {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    counters: Arc<Counters>,
}

impl Decapsulator {
    /// Starts decapsulating `mode` (IP-in-IP or GUE) for the backend in `ns`, IPv4 and IPv6.
    pub fn start(ns: &Netns, mode: ForwardMode, ends: TunnelEnds) -> Result<Self, LabError> {
        let name = ns.name().to_string();
        // Sockets and the TUN interface belong to the namespace of the thread that creates them;
        // their descriptors then work from any thread.
        let opened = std::thread::spawn(move || -> Result<_, String> {
            enter_netns(&name).map_err(|e| format!("entering {name}: {e}"))?;
            let tun = lb_io::tun::open_tun(TUN_NAME).map_err(|e| format!("creating TUN {TUN_NAME} in {name}: {e}"))?;
            let sockets = open_sockets(mode, ends).map_err(|e| format!("opening tunnel sockets in {name}: {e}"))?;
            Ok((tun, sockets))
        })
        .join()
        .map_err(|_| "the thread opening the decapsulator's sockets panicked")??;
        let (tun, sockets) = opened;
        ns.ip(&["link", "set", TUN_NAME, "up"])?;
        // The inner source (the client) is not reachable through decap0: no reverse-path filter.
        for key in [
            "net.ipv4.conf.all.rp_filter",
            "net.ipv4.conf.default.rp_filter",
            &format!("net.ipv4.conf.{TUN_NAME}.rp_filter"),
        ] {
            ns.exec("sysctl", &["-qw", &format!("{key}=0")])?;
        }
        let mut decap =
            Decapsulator { stop: Arc::new(AtomicBool::new(false)), threads: Vec::new(), counters: Arc::default() };
        for (socket, strip) in sockets {
            let tun = tun.try_clone()?;
            let (stop, counters) = (decap.stop.clone(), decap.counters.clone());
            let thread = std::thread::Builder::new()
                .name(format!("decap-{}", ns.name()))
                .spawn(move || decapsulate(&socket, strip, &tun, &stop, &counters))?;
            decap.threads.push(thread);
        }
        Ok(decap)
    }

    /// Its counters so far.
    pub fn stats(&self) -> DecapStats {
        DecapStats {
            packets: self.counters.packets.load(Ordering::Relaxed),
            dropped: self.counters.dropped.load(Ordering::Relaxed),
        }
    }
}

impl Drop for Decapsulator {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// The sockets receiving `mode`'s tunnel packets for `ends`, in the calling thread's namespace.
/// Raw sockets are handed back as `UdpSocket`s: a datagram socket's `recv_from` is what both need.
fn open_sockets(mode: ForwardMode, ends: TunnelEnds) -> std::io::Result<Vec<(UdpSocket, Strip)>> {
    let sockets = match mode {
        ForwardMode::Gue { port } => {
            let v4 = UdpSocket::bind((ends.local_v4, port))?;
            let v6 = UdpSocket::bind((ends.local_v6, port))?;
            vec![(v4, Strip::Gue { src: ends.remote_v4.into() }), (v6, Strip::Gue { src: ends.remote_v6.into() })]
        }
        ForwardMode::IpIp => {
            let v4 = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::from(i32::from(PROTO_IPV4))))?;
            // IPv6 raw reads start after the outer header: the bind makes the kernel check the
            // outer destination.
            let v6 = Socket::new(Domain::IPV6, Type::RAW, Some(Protocol::from(i32::from(PROTO_IPV6))))?;
            v6.bind(&SocketAddr::from((ends.local_v6, 0)).into())?;
            vec![
                (v4.into(), Strip::IpIp4 { src: ends.remote_v4, dst: ends.local_v4 }),
                (v6.into(), Strip::IpIp6 { src: ends.remote_v6 }),
            ]
        }
        other => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("{other:?} has no tunnel to decapsulate"),
            ));
        }
    };
    for (s, _) in &sockets {
        s.set_read_timeout(Some(POLL))?;
    }
    Ok(sockets)
}

/// A decapsulating thread: socket -> checks -> TUN, until `stop`.
fn decapsulate(socket: &UdpSocket, strip: Strip, mut tun: &File, stop: &AtomicBool, counters: &Counters) {
    let mut buf = vec![0u8; 65536];
    while !stop.load(Ordering::Relaxed) {
        let (n, from) = match socket.recv_from(&mut buf) {
            Ok(got) => got,
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                continue;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::warn!("decapsulator socket failed, stopping: {e}");
                return;
            }
        };
        let written = strip
            .apply(&buf[..n], from.ip())
            .map_err(|e| e.to_string())
            .and_then(|inner| tun.write_all(inner).map_err(|e| format!("writing to {TUN_NAME}: {e}")));
        match written {
            Ok(()) => counters.packets.fetch_add(1, Ordering::Relaxed),
            Err(e) => {
                tracing::warn!("decapsulator dropped a packet from {}: {e}", from.ip());
                counters.dropped.fetch_add(1, Ordering::Relaxed)
            }
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lb_core::forward::{Macs, TunnelTarget, gue as lb_gue, ipip as lb_ipip};
    use lb_core::frame::Frame;
    use lb_core::packet::parse;

    const LB4: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);
    const B4: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 11);
    const LB6: Ipv6Addr = Ipv6Addr::new(0xfd77, 0, 0, 0, 0, 0, 0, 2);
    const B6: Ipv6Addr = Ipv6Addr::new(0xfd77, 0, 0, 0, 0, 0, 0, 0x11);

    /// An Ethernet frame client -> VIP carrying a TCP segment with 2 payload bytes (checksums are
    /// not the decapsulator's business: the backend's TCP checks the inner one).
    fn tcp_frame(v6: bool) -> Vec<u8> {
        let mut f = vec![0u8; 12];
        let tcp = [0xc3, 0x50, 0, 80, 0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x18, 0xff, 0xff, 0, 0, 0, 0, b'h', b'i'];
        if v6 {
            f.extend([0x86, 0xdd, 0x60, 0, 0, 0, 0, tcp.len() as u8, 6, 64]);
            f.extend(Ipv6Addr::new(0xfd77, 0, 0, 0, 0, 0, 0, 0x10).octets());
            f.extend(Ipv6Addr::new(0xfd77, 0, 0, 0, 0, 0, 0, 0x100).octets());
        } else {
            let total = (20 + tcp.len()) as u8;
            f.extend([0x08, 0x00, 0x45, 0, 0, total, 0, 0, 0x40, 0, 64, 6, 0, 0]);
            f.extend([10, 77, 0, 10, 10, 77, 0, 100]);
        }
        f.extend(tcp);
        f
    }

    /// `frame` encapsulated by lb-core for `dst` (GUE when `port` is given); returns the IP packet
    /// before and the encapsulated frame after.
    fn encapsulate(v6: bool, port: Option<u16>) -> (Vec<u8>, Vec<u8>) {
        let plain = tcp_frame(v6);
        let mut buf = vec![0u8; Frame::HEADROOM_NEEDED];
        buf.extend(&plain);
        let mut frame = Frame::new(&mut buf, Frame::HEADROOM_NEEDED, plain.len());
        let p = parse(frame.data()).unwrap();
        let (src, dst): (IpAddr, IpAddr) = if v6 { (LB6.into(), B6.into()) } else { (LB4.into(), B4.into()) };
        let t = TunnelTarget { src, dst, macs: Macs::default(), flow_hash: 0x1234_5678, ip_id: 0 };
        match port {
            Some(port) => lb_gue::encap(&mut frame, &p, &t, port).unwrap(),
            None => lb_ipip::encap(&mut frame, &p, &t).unwrap(),
        }
        (plain[14..].to_vec(), frame.data().to_vec())
    }

    #[test]
    fn ipip4_gives_back_the_packet_lb_core_wrapped() {
        let (inner, frame) = encapsulate(false, None);
        // A raw protocol-4 socket reads from the outer IPv4 header on.
        assert_eq!(ipip4(&frame[14..], LB4, B4).unwrap(), &inner[..]);
    }

    #[test]
    fn ipip6_read_is_the_inner_packet_after_the_outer_header() {
        let (inner, frame) = encapsulate(true, None);
        assert_eq!(frame[14 + 6], PROTO_IPV6, "outer next header");
        let read = &frame[14 + 40..];
        assert_eq!(Strip::IpIp6 { src: LB6 }.apply(read, LB6.into()).unwrap(), &inner[..]);
        assert_eq!(
            Strip::IpIp6 { src: LB6 }.apply(read, B6.into()),
            Err(DecapError::WrongSource { got: B6.into(), want: LB6.into() })
        );
    }

    #[test]
    fn gue_gives_back_the_packet_lb_core_wrapped_for_both_families() {
        for (v6, outer_ip) in [(false, 20), (true, 40)] {
            let (inner, frame) = encapsulate(v6, Some(6080));
            let udp = &frame[14 + outer_ip..];
            assert_eq!(u16::from_be_bytes([udp[2], udp[3]]), 6080);
            let src: IpAddr = if v6 { LB6.into() } else { LB4.into() };
            assert_eq!(Strip::Gue { src }.apply(&udp[8..], src).unwrap(), &inner[..]);
        }
    }

    #[test]
    fn ipip4_refuses_wrong_addresses_protocol_and_lengths() {
        let (_, frame) = encapsulate(false, None);
        let outer = &frame[14..];
        let other = Ipv4Addr::new(10, 77, 0, 12);
        assert_eq!(ipip4(outer, LB4, other), Err(DecapError::WrongDestination { got: B4.into(), want: other.into() }));
        assert_eq!(ipip4(outer, other, B4), Err(DecapError::WrongSource { got: LB4.into(), want: other.into() }));
        let mut udp = outer.to_vec();
        udp[9] = 17;
        assert_eq!(ipip4(&udp, LB4, B4), Err(DecapError::WrongProtocol(17)));
        assert_eq!(ipip4(&outer[..19], LB4, B4), Err(DecapError::Truncated { len: 19 }));
        // Total length past the bytes read.
        assert!(matches!(ipip4(&outer[..outer.len() - 1], LB4, B4), Err(DecapError::BadOuterHeader { .. })));
        // The announced protocol says IPv4 inside; an IPv6 packet there is refused.
        let mut v6_inside = outer.to_vec();
        v6_inside[20] = 0x60;
        assert_eq!(ipip4(&v6_inside, LB4, B4), Err(DecapError::InnerVersion { got: 6, want: 4 }));
    }

    #[test]
    fn gue_refuses_other_variants_flags_and_protocols() {
        let packet = [0x45u8, 0, 0, 20];
        assert_eq!(gue(&[0, 4, 0, 0, 0x45]).unwrap(), &[0x45]);
        // Variant 1 (direct IP, Katran's choice) is not what lb-core sends.
        assert_eq!(gue(&packet), Err(DecapError::BadGueHeader(packet)));
        assert_eq!(gue(&[0, 4, 0x80, 0, 0x45]), Err(DecapError::BadGueHeader([0, 4, 0x80, 0])));
        assert_eq!(gue(&[0, 17, 0, 0, 0x45]), Err(DecapError::GueProtocol(17)));
        assert_eq!(gue(&[0, 41, 0, 0, 0x45]), Err(DecapError::InnerVersion { got: 4, want: 6 }));
        assert_eq!(gue(&[0, 41]), Err(DecapError::Truncated { len: 2 }));
    }
}
