//! What the node's interfaces are, as the calling thread's network namespace sees them: an interface's
//! MAC (the address the ARP / NDP responder answers with) and the node's own IP addresses (which the
//! kernel already answers for). Read with getifaddrs(3), which asks the kernel over netlink, so a
//! thread that entered another namespace sees that namespace's interfaces (sysfs would show the
//! namespace it was mounted in). And [`MulticastGroups`]: IPv6 groups held joined on an interface, so
//! neighbour solicitations for addresses no interface holds still reach the XDP program; and
//! [`PacketSocket`], which sends whole frames (the responder's announcements) through the kernel.

use std::collections::BTreeSet;
use std::ffi::CStr;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// One address entry of an interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Entry {
    Ip(IpAddr),
    Mac([u8; 6]),
}

/// Every (interface name, address) pair getifaddrs reports, IP and link-layer (Ethernet-sized) alike.
fn entries() -> io::Result<Vec<(String, Entry)>> {
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: `list` is a valid out-pointer; on success the kernel's list is ours until freeifaddrs.
    if unsafe { libc::getifaddrs(&mut list) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut out = Vec::new();
    let mut at = list;
    while !at.is_null() {
        // SAFETY: `at` is a node of the list getifaddrs returned, not yet freed.
        let ifa = unsafe { &*at };
        at = ifa.ifa_next;
        if ifa.ifa_addr.is_null() || ifa.ifa_name.is_null() {
            continue;
        }
        // SAFETY: getifaddrs gives every node a NUL-terminated name.
        let name = unsafe { CStr::from_ptr(ifa.ifa_name) }.to_string_lossy().into_owned();
        // SAFETY: `ifa_addr` is non-null and points at a sockaddr whose family says its full type;
        // each arm reads only the type its family names.
        let entry = unsafe {
            match i32::from((*ifa.ifa_addr).sa_family) {
                libc::AF_INET => {
                    let sin = &*(ifa.ifa_addr as *const libc::sockaddr_in);
                    Entry::Ip(IpAddr::V4(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr))))
                }
                libc::AF_INET6 => {
                    let sin6 = &*(ifa.ifa_addr as *const libc::sockaddr_in6);
                    Entry::Ip(IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr)))
                }
                libc::AF_PACKET => {
                    let ll = &*(ifa.ifa_addr as *const libc::sockaddr_ll);
                    if ll.sll_halen != 6 {
                        continue;
                    }
                    let mut mac = [0u8; 6];
                    mac.copy_from_slice(&ll.sll_addr[..6]);
                    Entry::Mac(mac)
                }
                _ => continue,
            }
        };
        out.push((name, entry));
    }
    // SAFETY: `list` came from getifaddrs and is freed once; nothing points into it any more.
    unsafe { libc::freeifaddrs(list) };
    Ok(out)
}

/// The MAC address of interface `name`.
pub fn mac_address(name: &str) -> io::Result<[u8; 6]> {
    entries()?
        .into_iter()
        .find_map(|(n, e)| match e {
            Entry::Mac(mac) if n == name => Some(mac),
            _ => None,
        })
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("interface {name} has no Ethernet address")))
}

/// Every IP address configured on any interface of this namespace (loopback included).
pub fn local_addresses() -> io::Result<Vec<IpAddr>> {
    Ok(entries()?
        .into_iter()
        .filter_map(|(_, e)| match e {
            Entry::Ip(ip) => Some(ip),
            Entry::Mac(_) => None,
        })
        .collect())
}

/// IPv6 multicast groups joined on one interface for as long as this lives (dropping it leaves them).
///
/// Neighbour solicitations go to the target's solicited-node group. For an address the node does not
/// hold, nothing joined that group: a NIC's multicast filter drops the frames before XDP sees them,
/// and an MLD-snooping switch never forwards them to this port. Joining makes the kernel program the
/// filter and send the MLD reports; the frames themselves are then steered to the responder by XDP.
#[derive(Debug)]
pub struct MulticastGroups {
    /// An unconnected UDP socket that only holds the memberships (bound to an ephemeral port, as
    /// joining from std needs; nothing is sent to it).
    socket: UdpSocket,
    interface: String,
    ifindex: u32,
    joined: BTreeSet<Ipv6Addr>,
}

impl MulticastGroups {
    /// Holds no group yet on interface `name`.
    pub fn new(name: &str) -> io::Result<Self> {
        let ifindex = crate::xsk::ifindex(name)
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("no interface {name}")))?;
        let socket = UdpSocket::bind((Ipv6Addr::UNSPECIFIED, 0))?;
        Ok(MulticastGroups { socket, interface: name.to_string(), ifindex, joined: BTreeSet::new() })
    }

    /// Makes the joined groups exactly `groups`: leaves the old ones, then joins the new ones (the
    /// socket's memberships share its option memory, `net.core.optmem_max`, so the leaves make room
    /// for the joins). On an error (naming the group) the groups handled so far stay as they are now,
    /// [`Self::joined`] says which are held, and the next `set` goes on from there.
    pub fn set(&mut self, groups: impl IntoIterator<Item = Ipv6Addr>) -> io::Result<()> {
        let want: BTreeSet<Ipv6Addr> = groups.into_iter().collect();
        let context = |what: &str, g: &Ipv6Addr, e: io::Error| {
            io::Error::new(e.kind(), format!("{what} {g} on {}: {e}", self.interface))
        };
        let leave: Vec<Ipv6Addr> = self.joined.difference(&want).copied().collect();
        for g in leave {
            self.socket.leave_multicast_v6(&g, self.ifindex).map_err(|e| context("leaving", &g, e))?;
            self.joined.remove(&g);
        }
        for g in want.difference(&self.joined).copied().collect::<Vec<_>>() {
            self.socket.join_multicast_v6(&g, self.ifindex).map_err(|e| context("joining", &g, e))?;
            self.joined.insert(g);
        }
        Ok(())
    }

    /// The groups held now.
    pub fn joined(&self) -> impl Iterator<Item = &Ipv6Addr> {
        self.joined.iter()
    }
}

impl Drop for MulticastGroups {
    /// Leaves every group held. Closing the socket leaves them only once no copy of it is left, and
    /// a child process another thread is starting holds one until it execs.
    fn drop(&mut self) {
        for g in &self.joined {
            let _ = self.socket.leave_multicast_v6(g, self.ifindex);
        }
    }
}

/// A raw packet socket (AF_PACKET) on one interface: sends whole Ethernet frames through the
/// kernel's transmit path, beside any AF_XDP socket on the interface. For the control side's few
/// frames (ARP / NDP announcements), not the fast path.
#[derive(Debug)]
pub struct PacketSocket {
    fd: OwnedFd,
}

impl PacketSocket {
    /// A socket that sends on interface `name` and receives nothing.
    pub fn open(name: &str) -> io::Result<Self> {
        Self::bound(name, 0)
    }

    /// A socket on `name` bound for `protocol` (network order in the address, 0: receive nothing).
    fn bound(name: &str, protocol: u16) -> io::Result<Self> {
        let ifindex = crate::xsk::ifindex(name)
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("no interface {name}")))?;
        // SAFETY: plain socket(2) call; the result is checked before use.
        let raw = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, i32::from(protocol)) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: an all-zero sockaddr_ll is valid; the fields that matter are set below.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = protocol;
        addr.sll_ifindex = i32::try_from(ifindex).map_err(|_| io::Error::other("interface index out of range"))?;
        let len = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
        // SAFETY: `addr` is a valid sockaddr_ll of `len` bytes that outlives the call.
        let rc = unsafe { libc::bind(fd.as_raw_fd(), (&raw const addr).cast(), len) };
        if rc != 0 {
            return Err(io::Error::other(format!("binding a packet socket to {name}: {}", io::Error::last_os_error())));
        }
        Ok(PacketSocket { fd })
    }

    /// Sends `frame` (from its Ethernet header on) out of the interface.
    pub fn send(&self, frame: &[u8]) -> io::Result<()> {
        // SAFETY: `frame` is valid for `frame.len()` bytes for the duration of the call.
        let n = unsafe { libc::send(self.fd.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
        match usize::try_from(n) {
            Ok(n) if n == frame.len() => Ok(()),
            Ok(n) => Err(io::Error::other(format!("sent {n} of {} bytes", frame.len()))),
            Err(_) => Err(io::Error::last_os_error()),
        }
    }

    /// A socket receiving every frame of `name`, sent or received, giving up after `timeout` per
    /// receive: for tests and diagnostics, which see what the interface carries.
    pub fn capture(name: &str, timeout: std::time::Duration) -> io::Result<Self> {
        let s = Self::bound(name, (libc::ETH_P_ALL as u16).to_be())?;
        let tv = libc::timeval { tv_sec: timeout.as_secs() as libc::time_t, tv_usec: 0 };
        let len = std::mem::size_of::<libc::timeval>() as libc::socklen_t;
        // SAFETY: `tv` is a valid timeval of `len` bytes for the duration of the call.
        let rc = unsafe {
            libc::setsockopt(s.fd.as_raw_fd(), libc::SOL_SOCKET, libc::SO_RCVTIMEO, (&raw const tv).cast(), len)
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(s)
    }

    /// The next frame captured (an error once the timeout passes).
    pub fn recv(&self) -> io::Result<Vec<u8>> {
        let mut buf = vec![0u8; 2048];
        // SAFETY: `buf` is valid for writes of `buf.len()` bytes for the duration of the call.
        let n = unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        buf.truncate(usize::try_from(n).map_err(|_| io::Error::last_os_error())?);
        Ok(buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_holds_127_0_0_1_and_has_a_zero_mac() {
        let addrs = local_addresses().unwrap();
        assert!(addrs.contains(&IpAddr::V4(Ipv4Addr::LOCALHOST)), "{addrs:?}");
        assert_eq!(mac_address("lo").unwrap(), [0; 6]);
        let err = mac_address("no-such-if0").unwrap_err();
        assert!(err.to_string().contains("no-such-if0"), "{err}");
    }

    #[test]
    fn announcements_leave_one_end_of_a_veth_and_arrive_at_the_other_intact() {
        use crate::netns::{Netns, can_create_namespaces, enter_netns};
        if let Err(reason) = can_create_namespaces() {
            return println!("SKIPPED: {reason}");
        }
        let ns = Netns::create(&format!("lbps{}", std::process::id())).unwrap();
        ns.ip(&["link", "add", "v0", "type", "veth", "peer", "name", "v1"]).unwrap();
        ns.ip(&["link", "set", "v0", "up"]).unwrap();
        ns.ip(&["link", "set", "v1", "up"]).unwrap();
        let name = ns.name().to_string();
        std::thread::spawn(move || {
            enter_netns(&name).unwrap();
            let mac = mac_address("v0").unwrap();
            let capture = PacketSocket::capture("v1", std::time::Duration::from_secs(2)).unwrap();
            let sender = PacketSocket::open("v0").unwrap();
            let mut buf = [0u8; 128];
            for addr in
                [IpAddr::V4(Ipv4Addr::new(10, 98, 0, 100)), IpAddr::V6(Ipv6Addr::new(0xfd98, 0, 0, 0, 0, 0, 0, 0x100))]
            {
                let n = lb_core::neighbour::announcement(mac, addr, &mut buf).unwrap();
                sender.send(&buf[..n]).unwrap();
                // Other frames (the kernel's own IPv6 chatter) may come first.
                loop {
                    let got = capture.recv().unwrap_or_else(|e| panic!("announcement of {addr} never arrived: {e}"));
                    if got == buf[..n] {
                        break;
                    }
                }
            }
            assert!(PacketSocket::open("no-such-if0").unwrap_err().to_string().contains("no-such-if0"));
        })
        .join()
        .unwrap();
    }

    #[test]
    fn a_veth_in_a_namespace_reports_its_own_mac_and_address() {
        use crate::netns::{Netns, can_create_namespaces, enter_netns, parse_mac};
        if let Err(reason) = can_create_namespaces() {
            return println!("SKIPPED: {reason}");
        }
        let ns = Netns::create(&format!("lbif{}", std::process::id())).unwrap();
        ns.ip(&["link", "add", "v0", "address", "02:12:34:56:78:9a", "type", "veth", "peer", "name", "v1"]).unwrap();
        ns.ip(&["addr", "add", "10.99.0.1/24", "dev", "v0"]).unwrap();
        let name = ns.name().to_string();
        // In a thread of its own, so this test's thread stays in its namespace.
        let (mac, addrs) = std::thread::spawn(move || {
            enter_netns(&name).unwrap();
            (mac_address("v0").unwrap(), local_addresses().unwrap())
        })
        .join()
        .unwrap();
        assert_eq!(Some(mac), parse_mac("02:12:34:56:78:9a"));
        assert!(addrs.contains(&IpAddr::V4(Ipv4Addr::new(10, 99, 0, 1))), "{addrs:?}");

        // Joined groups show in the interface's multicast list until set away or dropped.
        ns.ip(&["link", "set", "v0", "up"]).unwrap();
        let a = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 1, 0xff00, 0x100);
        let b = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 1, 0xff00, 0x3);
        let maddr = || ns.ip(&["-6", "maddr", "show", "dev", "v0"]).unwrap();
        let name = ns.name().to_string();
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let (step_tx, step) = std::sync::mpsc::channel::<&'static str>();
        let holder = std::thread::spawn(move || {
            enter_netns(&name).unwrap();
            let mut g = MulticastGroups::new("v0").unwrap();
            g.set([a, b]).unwrap();
            step_tx.send("both").unwrap();
            rx.recv().unwrap();
            g.set([b]).unwrap();
            assert_eq!(g.joined().copied().collect::<Vec<_>>(), [b]);
            step_tx.send("one").unwrap();
            rx.recv().unwrap();
        });
        assert_eq!(step.recv().unwrap(), "both");
        let m = maddr();
        assert!(m.contains("ff02::1:ff00:100") && m.contains("ff02::1:ff00:3"), "{m}");
        tx.send(()).unwrap();
        assert_eq!(step.recv().unwrap(), "one");
        let m = maddr();
        assert!(!m.contains("ff02::1:ff00:100") && m.contains("ff02::1:ff00:3"), "{m}");
        tx.send(()).unwrap();
        holder.join().unwrap();
        assert!(!maddr().contains("ff02::1:ff00:3"), "dropping leaves the groups");
        assert!(MulticastGroups::new("no-such-if0").unwrap_err().to_string().contains("no-such-if0"));
    }

    /// The socket's memberships are bounded by its option memory (`net.core.optmem_max`, lowered here
    /// in the test's own namespace). After a `set` that joined only some of its groups, a smaller set
    /// that fits is taken, and at the limit a set that swaps one group for another is too.
    #[test]
    fn groups_converge_after_a_set_that_did_not_fit() {
        use crate::netns::{Netns, can_create_namespaces, enter_netns};
        if let Err(reason) = can_create_namespaces() {
            return println!("SKIPPED: {reason}");
        }
        let ns = Netns::create(&format!("lbmg{}", std::process::id())).unwrap();
        ns.ip(&["link", "add", "v0", "type", "veth", "peer", "name", "v1"]).unwrap();
        ns.ip(&["link", "set", "v0", "up"]).unwrap();
        let group = |i: u16| Ipv6Addr::new(0xff02, 0, 0, 0, 0, 1, 0xffab, 0xcd00 + i);
        let all: Vec<Ipv6Addr> = (0..64).map(group).collect();
        // The groups of `all` the interface holds, read from the kernel.
        let held = || {
            let m = ns.ip(&["-6", "maddr", "show", "dev", "v0"]).unwrap();
            all.iter().filter(|g| m.split_whitespace().any(|w| w == g.to_string())).copied().collect::<Vec<_>>()
        };
        let name = ns.name().to_string();
        let (tx, rx) = std::sync::mpsc::channel::<Vec<Ipv6Addr>>();
        let (done_tx, done) = std::sync::mpsc::channel::<io::Result<()>>();
        let holder = std::thread::spawn(move || {
            enter_netns(&name).unwrap();
            // This namespace's own limit (a per-namespace setting on recent kernels; on older ones
            // only the initial namespace has the file, and the test is skipped).
            let limited = std::fs::write("/proc/sys/net/core/optmem_max", "1024");
            let ready = limited.is_ok();
            done_tx.send(limited).unwrap();
            if !ready {
                return None;
            }
            let mut g = MulticastGroups::new("v0").unwrap();
            while let Ok(groups) = rx.recv() {
                let r = g.set(groups.iter().copied());
                if r.is_ok() {
                    assert_eq!(g.joined().copied().collect::<Vec<_>>(), groups);
                }
                done_tx.send(r).unwrap();
            }
            // A copy of the socket that outlives it, as a child forked by another thread (any test
            // running a command) holds one until it execs.
            Some(g.socket.try_clone().unwrap())
        });
        if let Err(e) = done.recv().unwrap() {
            holder.join().unwrap();
            return println!("SKIPPED: net.core.optmem_max cannot be set in a namespace of this kernel: {e}");
        }
        let set = |groups: &[Ipv6Addr]| {
            tx.send(groups.to_vec()).unwrap();
            done.recv().unwrap()
        };
        let err = set(&all).expect_err("64 groups do not fit in 1024 bytes of option memory");
        let fit = held().len();
        assert!(fit > 1 && fit < all.len(), "{fit} groups joined before the error ({err})");
        assert_eq!(held(), all[..fit], "joined in order up to the error");

        set(&all[..fit / 2]).unwrap_or_else(|e| panic!("a set of {} groups that fits: {e}", fit / 2));
        assert_eq!(held(), all[..fit / 2]);
        set(&all[..fit]).unwrap();
        set(&all[1..=fit]).unwrap_or_else(|e| panic!("swapping one of {fit} groups at the limit: {e}"));
        assert_eq!(held(), all[1..=fit]);
        drop(tx);
        let copy = holder.join().unwrap();
        assert!(held().is_empty(), "dropping leaves the groups, though a copy of the socket is open");
        drop(copy);
    }
}
