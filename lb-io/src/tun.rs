//! A TUN device: a network interface whose packets come from a file descriptor. Writing an IP packet
//! to it hands the packet to the kernel's IP stack as if it had arrived on that interface, which is
//! what a tunnel driver does after stripping the outer headers. The lab's userspace decapsulator
//! (examples, for kernels without ipip / ip6_tunnel / fou) feeds backends through one.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;

/// Creates TUN interface `name` (IFF_TUN | IFF_NO_PI: each read or write is one bare IP packet) in
/// the calling thread's network namespace and returns its descriptor. The interface exists while the
/// descriptor is open and starts down; bring it up with `ip link set NAME up`.
pub fn open_tun(name: &str) -> std::io::Result<File> {
    // SAFETY: ifreq is plain old data (a name and a union of integers); all zeroes is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    if name.is_empty() || name.len() >= req.ifr_name.len() || name.contains('\0') {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("TUN interface name {name:?} must have 1 to 15 bytes and no NUL"),
        ));
    }
    let file = OpenOptions::new().read(true).write(true).open("/dev/net/tun")?;
    for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    req.ifr_ifru.ifru_flags = (libc::IFF_TUN | libc::IFF_NO_PI) as libc::c_short;
    // SAFETY: `file` is an open /dev/net/tun descriptor and `req` a valid, NUL-terminated ifreq that
    // outlives the call; TUNSETIFF reads it and writes the chosen name back into it.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut req) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_names_the_kernel_cannot_hold() {
        for bad in ["", "sixteen-bytes-xx", "a\0b"] {
            let e = open_tun(bad).expect_err(bad);
            assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput, "{bad:?}: {e}");
        }
    }
}
