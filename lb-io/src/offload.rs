//! The NIC's receive VLAN offloads, turned off so the XDP program and lb-core see VLAN tags.
//!
//! With `rx-vlan-hw-parse` on (`ethtool -K eth0 rxvlan on`, most NICs' default), the NIC strips each
//! frame's 802.1Q tag into its receive descriptor: XDP sees the frame untagged, the steering program
//! and lb-core read it as untagged, and the frame lb-core transmits leaves untagged, on the port's
//! native VLAN instead of its own. `rx-vlan-stag-hw-parse` does the same to 802.1ad (QinQ outer)
//! tags. The XDP and AF_XDP guides give the same advice (`ethtool -K IF rxvlan off`). [`rx_vlan_off`]
//! turns both off as `ethtool -K IF rxvlan off rx-vlan-stag-hw-parse off` would, over the SIOCETHTOOL
//! ioctl (`ETHTOOL_GFEATURES` / `ETHTOOL_SFEATURES`, features found by name in the kernel's
//! `ETH_SS_FEATURES` strings, as ethtool finds them), and gives back a guard that turns on again what
//! it turned off. A feature the driver has fixed on stays on, and is reported.
//!
//! A run killed before its guard drops (SIGKILL, a crash) leaves them off, and the next run would
//! find them off and leave them so. [`rx_vlan_off_recorded`] keeps what it turned off in a file
//! (under `/run`, gone at a reboot, when the NIC's defaults come back anyway) until the guard turns
//! them on again, and takes over what a killed run's file lists: only from a run that is gone (the
//! file's lock is free), and only on the interface the file names.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

/// The receive VLAN offloads [`rx_vlan_off`] turns off, by their kernel names.
pub const RX_VLAN_FEATURES: [&str; 2] = ["rx-vlan-hw-parse", "rx-vlan-stag-hw-parse"];

// include/uapi/linux/ethtool.h
const ETHTOOL_GSTRINGS: u32 = 0x1b;
const ETHTOOL_GSSET_INFO: u32 = 0x37;
const ETHTOOL_GFEATURES: u32 = 0x3a;
const ETHTOOL_SFEATURES: u32 = 0x3b;
const ETH_SS_FEATURES: u32 = 4;
const ETH_GSTRING_LEN: usize = 32;

/// One feature of an interface, as the kernel reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Feature {
    /// Its kernel name (`rx-vlan-hw-parse`).
    pub name: &'static str,
    /// On now.
    pub active: bool,
    /// The driver does not let it change (`[fixed]` in `ethtool -k`): not among the features it
    /// offers to change, or one it never changes.
    pub fixed: bool,
}

/// What [`rx_vlan_off`] did on one interface; dropping it turns back on what it turned off.
#[derive(Debug)]
pub struct RxVlanOff {
    interface: String,
    /// The interface's index: the guard turns the offloads on again on that interface, under the
    /// name it has then (renamed since, say), and not on another one since given its name.
    ifindex: Option<u32>,
    /// The features that were on and are now off.
    pub turned_off: Vec<&'static str>,
    /// The features still on: fixed by the driver, or refused. Tagged frames then reach XDP
    /// untagged (for that kind of tag).
    pub still_on: Vec<&'static str>,
    /// The file that lists `turned_off` while they are off, with its lock held
    /// ([`rx_vlan_off_recorded`]).
    record: Option<(PathBuf, std::fs::File)>,
}

impl Drop for RxVlanOff {
    fn drop(&mut self) {
        if self.turned_off.is_empty() {
            return;
        }
        let on: Vec<(&'static str, bool)> = self.turned_off.iter().map(|&n| (n, true)).collect();
        let name = match self.ifindex {
            Some(index) => interface_name(index),
            None => Some(self.interface.clone()),
        };
        let result = match &name {
            Some(name) => set_features(name, &on),
            None => Err(io::Error::from_raw_os_error(libc::ENODEV)),
        };
        // Back on, or the interface is gone (a new one of the name starts with its own defaults):
        // nothing is left for a later run to turn on.
        if result.as_ref().map_or_else(|e| e.raw_os_error() == Some(libc::ENODEV), |_| true)
            && let Some((record, _)) = &self.record
        {
            let _ = std::fs::remove_file(record);
        }
        if let Err(e) = result {
            eprintln!("warning: {}: could not turn {:?} back on: {e}", self.interface, self.turned_off);
        }
    }
}

/// As [`rx_vlan_off`], remembering in the file `record` what it turned off until the guard turns it
/// on again. A `record` left by a run that was killed first lists features that run turned off:
/// those still off (and changeable) are this guard's to turn on too, as the interface had them on
/// before any run. The file goes when the guard has turned them on; it is not written when nothing
/// was turned off. Its directory is made if missing, before anything is turned off.
///
/// The guard holds the record's lock (`flock`) while it lives, and the kernel lets it go with a
/// killed run: a record still locked is a live run's, and a second run on the interface (one that
/// will fail to bind its queues, say) takes nothing of it over, so cannot turn the offloads on
/// under the first. A record names the interface it was written for (its ifindex, and its network
/// namespace's cookie, which unlike the namespace's inode is never reused before a reboot): one of
/// another interface since given the name, or of a namespace since gone, is not taken over, and the
/// offloads such an interface has off are left as they are.
pub fn rx_vlan_off_recorded(name: &str, record: &Path) -> io::Result<RxVlanOff> {
    if let Some(dir) = record.parent() {
        std::fs::create_dir_all(dir)?;
    }
    // Looked up before the record is made: an interface that is not there leaves none behind.
    let identity = record_identity(name)?;
    let Some(file) = lock_record(record)? else {
        // Another run holds the interface, and what it turned off is its to turn on.
        return rx_vlan_off(name);
    };
    let mut text = String::new();
    io::Read::read_to_string(&mut &file, &mut text)?;
    let mut lines = text.lines();
    let left: Vec<&'static str> = if lines.next() == Some(identity.as_str()) {
        let listed: Vec<&str> = lines.map(str::trim).collect();
        RX_VLAN_FEATURES.into_iter().filter(|f| listed.contains(f)).collect()
    } else {
        Vec::new()
    };
    let mut off = rx_vlan_off(name)?;
    // What the killed run turned off and is off still (this call found it off: not in `turned_off`).
    let now = features(name, &left)?;
    for f in now.iter().filter(|f| !f.active && !f.fixed) {
        if !off.turned_off.contains(&f.name) {
            off.turned_off.push(f.name);
        }
    }
    if off.turned_off.is_empty() {
        let _ = std::fs::remove_file(record);
    } else {
        use std::os::unix::fs::FileExt;
        file.set_len(0)?;
        file.write_all_at(format!("{identity}\n{}\n", off.turned_off.join("\n")).as_bytes(), 0)?;
        off.record = Some((record.to_path_buf(), file));
    }
    Ok(off)
}

/// Opens (or creates) `record` and takes its lock without waiting; `None` when another process
/// holds it. Retries when the file was removed between the open and the lock (its holder finished),
/// so the lock held is always that of the file at `record`.
fn lock_record(record: &Path) -> io::Result<Option<std::fs::File>> {
    use std::os::unix::fs::MetadataExt;
    loop {
        let file = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(false).open(record)?;
        // SAFETY: flock(2) on the descriptor `file` owns, open for the call's length.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let e = io::Error::last_os_error();
            return if e.raw_os_error() == Some(libc::EWOULDBLOCK) { Ok(None) } else { Err(e) };
        }
        let held = file.metadata()?;
        if std::fs::metadata(record).is_ok_and(|m| (m.dev(), m.ino()) == (held.dev(), held.ino())) {
            return Ok(Some(file));
        }
    }
}

/// The name of the interface with index `index` in the calling thread's namespace, if there is one.
fn interface_name(index: u32) -> Option<String> {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: `buf` has the IF_NAMESIZE bytes if_indextoname(3) may write, NUL included.
    let named = unsafe { libc::if_indextoname(index, buf.as_mut_ptr()) };
    if named.is_null() {
        return None;
    }
    // SAFETY: on success `buf` holds a NUL-terminated name.
    let name = unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) };
    Some(name.to_string_lossy().into_owned())
}

/// The first line of a record: which interface it is of (ifindex, and the network namespace's
/// cookie; 0 where the kernel has none, before 5.14).
fn record_identity(name: &str) -> io::Result<String> {
    let ifindex = crate::xsk::ifindex(name)
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("no interface {name}")))?;
    Ok(format!("interface {ifindex} netns {}", netns_cookie().unwrap_or(0)))
}

/// The calling thread's network namespace's cookie (`SO_NETNS_COOKIE`): unique until reboot.
fn netns_cookie() -> io::Result<u64> {
    // SAFETY: socket(2) with constant arguments; the result is checked before use.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a socket just opened and owned by nothing else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut cookie = 0u64;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: `cookie` and `len` are valid for writes, and `len` is `cookie`'s size.
    let rc = unsafe {
        libc::getsockopt(fd.as_raw_fd(), libc::SOL_SOCKET, libc::SO_NETNS_COOKIE, (&raw mut cookie).cast(), &mut len)
    };
    if rc != 0 { Err(io::Error::last_os_error()) } else { Ok(cookie) }
}

/// Where `lb` records the offloads it turned off on interface `name` of the calling thread's network
/// namespace, under `dir`: one file per namespace and interface (a namespace is named by its inode,
/// so runs in different namespaces with same-named interfaces keep apart).
pub fn record_path(dir: &Path, name: &str) -> io::Result<PathBuf> {
    use std::os::unix::fs::MetadataExt;
    let ns = std::fs::metadata("/proc/thread-self/ns/net")?.ino();
    Ok(dir.join(format!("rx-vlan-off.{ns}.{name}")))
}

/// Turns off the receive VLAN offloads ([`RX_VLAN_FEATURES`]) of interface `name` in the calling
/// thread's network namespace. A feature the interface does not have is left out of both lists.
pub fn rx_vlan_off(name: &str) -> io::Result<RxVlanOff> {
    let ifindex = crate::xsk::ifindex(name);
    let before = features(name, &RX_VLAN_FEATURES)?;
    let wanted: Vec<(&'static str, bool)> =
        before.iter().filter(|f| f.active && !f.fixed).map(|f| (f.name, false)).collect();
    // Both read back, not only those asked for: a fixed one left out of `wanted` may be on.
    let after = if wanted.is_empty() {
        before.clone()
    } else {
        set_features(name, &wanted)?;
        features(name, &RX_VLAN_FEATURES)?
    };
    let was_on = |n: &str| before.iter().any(|f| f.name == n && f.active);
    Ok(RxVlanOff {
        interface: name.to_string(),
        ifindex,
        turned_off: after.iter().filter(|f| !f.active && was_on(f.name)).map(|f| f.name).collect(),
        still_on: after.iter().filter(|f| f.active).map(|f| f.name).collect(),
        record: None,
    })
}

/// The state of the features `names` of interface `name` (those it has; an unknown name is left out).
pub fn features(name: &str, names: &[&'static str]) -> io::Result<Vec<Feature>> {
    let ctl = Ethtool::open(name)?;
    let index = ctl.feature_names()?;
    let blocks = ctl.get_features()?;
    Ok(names
        .iter()
        .filter_map(|&n| {
            let i = index.iter().position(|s| s == n)?;
            let block = blocks.get(i / 32)?;
            let bit = 1u32 << (i % 32);
            let fixed = block.available & bit == 0 || block.never_changed & bit != 0;
            Some(Feature { name: n, active: block.active & bit != 0, fixed })
        })
        .collect())
}

/// Sets each named feature of interface `name` on or off; returns their state after (the kernel may
/// leave some as they were: a fixed feature, or one a dependency holds).
pub fn set_features(name: &str, wanted: &[(&'static str, bool)]) -> io::Result<Vec<Feature>> {
    let ctl = Ethtool::open(name)?;
    let index = ctl.feature_names()?;
    let words = ctl.get_features()?.len();
    // struct ethtool_sfeatures: cmd, size, then per 32 features { valid, requested }.
    let mut buf = vec![0u32; 2 + 2 * words];
    buf[0] = ETHTOOL_SFEATURES;
    buf[1] = words as u32;
    for &(n, on) in wanted {
        let i = index.iter().position(|s| s == n).ok_or_else(|| {
            io::Error::new(io::ErrorKind::NotFound, format!("{name} has no feature {n} (`ethtool -k {name}`)"))
        })?;
        let (word, bit) = (i / 32, 1u32 << (i % 32));
        buf[2 + 2 * word] |= bit;
        if on {
            buf[2 + 2 * word + 1] |= bit;
        }
    }
    // A positive result (ETHTOOL_F_WISH and friends) says some change did not take: the state read
    // back below shows which.
    ctl.ioctl(buf.as_mut_ptr().cast())?;
    let names: Vec<&'static str> = wanted.iter().map(|&(n, _)| n).collect();
    features(name, &names)
}

/// One 32-feature block of `ETHTOOL_GFEATURES`.
#[derive(Debug, Clone, Copy)]
struct GetBlock {
    available: u32,
    active: u32,
    never_changed: u32,
}

/// A socket to issue SIOCETHTOOL on, for one interface.
struct Ethtool {
    fd: OwnedFd,
    name: [libc::c_char; libc::IFNAMSIZ],
}

impl Ethtool {
    fn open(name: &str) -> io::Result<Self> {
        if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains('\0') {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("interface name {name:?}")));
        }
        // SAFETY: socket(2) with constant arguments; the result is checked before use.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a socket just opened and owned by nothing else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let mut ifname = [0 as libc::c_char; libc::IFNAMSIZ];
        for (d, s) in ifname.iter_mut().zip(name.bytes()) {
            *d = s as libc::c_char;
        }
        Ok(Ethtool { fd, name: ifname })
    }

    /// SIOCETHTOOL with `data` (an ethtool command struct the caller sized for what the command
    /// writes); returns the ioctl's non-negative result.
    fn ioctl(&self, data: *mut libc::c_void) -> io::Result<i32> {
        // SAFETY: ifreq is plain old data; all zeroes is a valid value.
        let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
        req.ifr_name = self.name;
        req.ifr_ifru.ifru_data = data.cast();
        // SAFETY: `req` names the interface and points at `data`, which every caller allocates with
        // room for all the kernel writes for its command (sized from the counts the kernel gave).
        let rc = unsafe { libc::ioctl(self.fd.as_raw_fd(), libc::SIOCETHTOOL, &mut req) };
        if rc < 0 { Err(io::Error::last_os_error()) } else { Ok(rc) }
    }

    /// The kernel's feature names, by bit index.
    fn feature_names(&self) -> io::Result<Vec<String>> {
        // struct ethtool_sset_info, with room for the one count asked for (in either byte order).
        #[repr(C)]
        struct SsetInfo {
            cmd: u32,
            reserved: u32,
            sset_mask: u64,
            data: [u32; 2],
        }
        let mut info = SsetInfo { cmd: ETHTOOL_GSSET_INFO, reserved: 0, sset_mask: 1 << ETH_SS_FEATURES, data: [0; 2] };
        self.ioctl((&raw mut info).cast())?;
        if info.sset_mask & (1 << ETH_SS_FEATURES) == 0 {
            return Err(io::Error::new(io::ErrorKind::Unsupported, "the kernel names no features"));
        }
        let count = info.data[0] as usize;
        // struct ethtool_gstrings: cmd, string_set, len, then len strings of 32 bytes.
        let mut buf = vec![0u32; 3 + count * ETH_GSTRING_LEN / 4];
        buf[..3].copy_from_slice(&[ETHTOOL_GSTRINGS, ETH_SS_FEATURES, count as u32]);
        self.ioctl(buf.as_mut_ptr().cast())?;
        let bytes: Vec<u8> = buf[3..].iter().flat_map(|w| w.to_ne_bytes()).collect();
        Ok(bytes
            .chunks(ETH_GSTRING_LEN)
            .map(|s| String::from_utf8_lossy(&s[..s.iter().position(|&b| b == 0).unwrap_or(s.len())]).into_owned())
            .collect())
    }

    /// `ETHTOOL_GFEATURES`: every block of 32 features (as many as the kernel has).
    fn get_features(&self) -> io::Result<Vec<GetBlock>> {
        // Asked with room for none first, the kernel says how many blocks it has in `size`.
        let mut head = [ETHTOOL_GFEATURES, 0];
        self.ioctl(head.as_mut_ptr().cast())?;
        let words = head[1] as usize;
        // struct ethtool_gfeatures: cmd, size, then per block { available, requested, active, never_changed }.
        let mut buf = vec![0u32; 2 + 4 * words];
        buf[..2].copy_from_slice(&[ETHTOOL_GFEATURES, words as u32]);
        self.ioctl(buf.as_mut_ptr().cast())?;
        Ok(buf[2..].chunks(4).map(|b| GetBlock { available: b[0], active: b[2], never_changed: b[3] }).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::netns::{Netns, can_create_namespaces, can_run_ethtool, enter_netns, veth_pair};

    impl RxVlanOff {
        /// As a run killed with SIGKILL leaves it: its record's lock let go by the kernel, the
        /// offloads it turned off never turned on.
        fn killed(mut self) {
            self.record.take();
            std::mem::forget(self);
        }
    }

    fn ethtool_says(ns: &Netns, dev: &str, label: &str) -> String {
        ns.ethtool_feature(dev, label).unwrap()
    }

    /// Why these tests cannot run here (namespaces, or ethtool to check with), if they cannot.
    fn cannot_run() -> Option<String> {
        can_create_namespaces().and_then(|()| can_run_ethtool()).err()
    }

    /// An interface that is not there (a typo in `lb run`'s file) is an error, and leaves no record
    /// behind: before, the record was made before the interface was looked up, and stayed, empty.
    #[test]
    fn no_record_is_left_for_an_interface_that_is_not_there() {
        let dir = std::env::temp_dir().join(format!("lb-offload-records-{}", std::process::id()));
        let record = dir.join("rx-vlan-off.0.nosuch0");
        assert!(rx_vlan_off_recorded("nosuch0", &record).is_err());
        let left: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name()).collect();
        let _ = std::fs::remove_dir_all(&dir);
        assert!(left.is_empty(), "left behind: {left:?}");
    }

    /// A veth has both receive VLAN offloads on and changeable: turned off, `ethtool -k` agrees; a
    /// second call finds nothing to do; dropping the first guard turns them back on.
    #[test]
    fn rx_vlan_offloads_are_turned_off_and_back_on() {
        if let Some(why) = cannot_run() {
            println!("SKIPPED: {why}");
            return;
        }
        let tag = format!("lbo{}", std::process::id());
        let (a, b) = (Netns::create(&format!("{tag}a")).unwrap(), Netns::create(&format!("{tag}b")).unwrap());
        veth_pair(&a, "o0", &b, "o1").unwrap();
        assert_eq!(ethtool_says(&a, "o0", "rx-vlan-offload"), "on", "a veth starts with it on");
        assert_eq!(ethtool_says(&a, "o0", "rx-vlan-stag-hw-parse"), "on");
        let ns = a.name().to_string();
        let (first, second) = std::thread::spawn(move || {
            enter_netns(&ns).unwrap();
            let first = rx_vlan_off("o0").unwrap();
            let second = rx_vlan_off("o0").unwrap();
            (first, second)
        })
        .join()
        .unwrap();
        assert_eq!(first.turned_off, RX_VLAN_FEATURES.to_vec());
        assert!(first.still_on.is_empty(), "{first:?}");
        assert_eq!(ethtool_says(&a, "o0", "rx-vlan-offload"), "off");
        assert_eq!(ethtool_says(&a, "o0", "rx-vlan-stag-hw-parse"), "off");
        assert!(second.turned_off.is_empty() && second.still_on.is_empty(), "{second:?}");
        assert_eq!(ethtool_says(&b, "o1", "rx-vlan-offload"), "on", "the peer is not touched");
        // The guards are dropped in the interface's namespace.
        let ns = a.name().to_string();
        std::thread::spawn(move || {
            enter_netns(&ns).unwrap();
            drop(second);
            drop(first);
        })
        .join()
        .unwrap();
        assert_eq!(ethtool_says(&a, "o0", "rx-vlan-offload"), "on");
        assert_eq!(ethtool_says(&a, "o0", "rx-vlan-stag-hw-parse"), "on");
    }

    /// A run killed with the offloads off (its guard never dropped) leaves its record: the next
    /// run's guard turns them on at its end, and removes the record. Without the record, the next
    /// run found them off and left them off for good.
    #[test]
    fn offloads_a_killed_run_left_off_are_turned_on_by_the_next() {
        if let Some(why) = cannot_run() {
            println!("SKIPPED: {why}");
            return;
        }
        let tag = format!("lbk{}", std::process::id());
        let (a, b) = (Netns::create(&format!("{tag}a")).unwrap(), Netns::create(&format!("{tag}b")).unwrap());
        veth_pair(&a, "k0", &b, "k1").unwrap();
        let dir = std::env::temp_dir().join(format!("lb-offload-test-{tag}"));
        let ns = a.name().to_string();
        let (record, first_record) = std::thread::spawn(move || {
            enter_netns(&ns).unwrap();
            let record = record_path(&dir, "k0").unwrap();
            let first = rx_vlan_off_recorded("k0", &record).unwrap();
            let first_record = std::fs::read_to_string(&record).unwrap();
            // Killed: the guard never drops.
            first.killed();
            (record, first_record)
        })
        .join()
        .unwrap();
        assert!(first_record.starts_with("interface "), "{first_record}");
        assert!(first_record.ends_with("\nrx-vlan-hw-parse\nrx-vlan-stag-hw-parse\n"), "{first_record}");
        assert_eq!(ethtool_says(&a, "k0", "rx-vlan-offload"), "off", "left off by the killed run");
        let ns = a.name().to_string();
        let path = record.clone();
        let second = std::thread::spawn(move || {
            enter_netns(&ns).unwrap();
            let second = rx_vlan_off_recorded("k0", &path).unwrap();
            let turned_off = second.turned_off.clone();
            drop(second);
            turned_off
        })
        .join()
        .unwrap();
        assert_eq!(second, RX_VLAN_FEATURES.to_vec(), "the next run took over what the killed one turned off");
        assert_eq!(ethtool_says(&a, "k0", "rx-vlan-offload"), "on");
        assert_eq!(ethtool_says(&a, "k0", "rx-vlan-stag-hw-parse"), "on");
        assert!(!record.exists(), "the record goes once they are back on");
        let _ = std::fs::remove_dir(record.parent().unwrap());
    }

    /// A second run on an interface whose offloads a live run turned off (it will fail to bind the
    /// queues the first holds) takes nothing of the first's record over: ending, it leaves them
    /// off under the first, whose record stays until the first ends.
    #[test]
    fn a_second_run_takes_nothing_over_from_a_live_one() {
        if let Some(why) = cannot_run() {
            println!("SKIPPED: {why}");
            return;
        }
        let tag = format!("lbs{}", std::process::id());
        let (a, b) = (Netns::create(&format!("{tag}a")).unwrap(), Netns::create(&format!("{tag}b")).unwrap());
        veth_pair(&a, "s0", &b, "s1").unwrap();
        let dir = std::env::temp_dir().join(format!("lb-offload-test-{tag}"));
        let ns = a.name().to_string();
        let (second, still_off, record_kept, first_back_on) = std::thread::spawn(move || {
            enter_netns(&ns).unwrap();
            let record = record_path(&dir, "s0").unwrap();
            let first = rx_vlan_off_recorded("s0", &record).unwrap();
            let second = rx_vlan_off_recorded("s0", &record).unwrap();
            let taken = second.turned_off.clone();
            drop(second);
            let still_off = features("s0", &RX_VLAN_FEATURES).unwrap().iter().all(|f| !f.active);
            let record_kept = record.exists();
            drop(first);
            let back_on = features("s0", &RX_VLAN_FEATURES).unwrap().iter().all(|f| f.active) && !record.exists();
            let _ = std::fs::remove_dir(&dir);
            (taken, still_off, record_kept, back_on)
        })
        .join()
        .unwrap();
        assert!(second.is_empty(), "the second run took over {second:?}");
        assert!(still_off, "the second run's end left them off under the first");
        assert!(record_kept, "the first run's record stays while it runs");
        assert!(first_back_on, "the first run turns them on at its end and removes its record");
    }

    /// A record names its interface: a killed run's record is not taken over by a run on another
    /// interface since given the name (deleted and made again), nor by one in another namespace
    /// that got the record's namespace inode, so the offloads such an interface has off (its
    /// administrator's choice) stay off after the run.
    #[test]
    fn a_record_of_another_interface_of_the_name_is_not_taken_over() {
        if let Some(why) = cannot_run() {
            println!("SKIPPED: {why}");
            return;
        }
        let tag = format!("lbr{}", std::process::id());
        let (a, b) = (Netns::create(&format!("{tag}a")).unwrap(), Netns::create(&format!("{tag}b")).unwrap());
        veth_pair(&a, "r0", &b, "r1").unwrap();
        let dir = std::env::temp_dir().join(format!("lb-offload-test-{tag}"));
        let ns = a.name().to_string();
        let in_ns = move |f: Box<dyn FnOnce() -> Vec<&'static str> + Send>| {
            let ns = ns.clone();
            std::thread::spawn(move || {
                enter_netns(&ns).unwrap();
                f()
            })
            .join()
            .unwrap()
        };
        let record = in_ns(Box::new({
            let dir = dir.clone();
            move || {
                let record = record_path(&dir, "r0").unwrap();
                // Killed: the guard never drops.
                rx_vlan_off_recorded("r0", &record).unwrap().killed();
                Vec::new()
            }
        }));
        assert!(record.is_empty());
        // Replaced: a new r0, whose administrator turned its offloads off.
        a.ip(&["link", "del", "r0"]).unwrap();
        veth_pair(&a, "r0", &b, "r1").unwrap();
        a.exec("ethtool", &["-K", "r0", "rxvlan", "off", "rx-vlan-stag-hw-parse", "off"]).unwrap();
        let run = {
            let dir = dir.clone();
            move || {
                let record = record_path(&dir, "r0").unwrap();
                let off = rx_vlan_off_recorded("r0", &record).unwrap();
                off.turned_off.clone()
            }
        };
        let taken = in_ns(Box::new(run.clone()));
        assert!(taken.is_empty(), "took over {taken:?} from the interface replaced");
        assert_eq!(ethtool_says(&a, "r0", "rx-vlan-offload"), "off", "the administrator's choice stays");

        // A record of this interface's ifindex, written in another namespace of this inode.
        let forged = in_ns(Box::new({
            let dir = dir.clone();
            move || {
                let record = record_path(&dir, "r0").unwrap();
                let ifindex = crate::xsk::ifindex("r0").unwrap();
                let other = netns_cookie().unwrap_or(0) + 1;
                std::fs::write(
                    &record,
                    format!("interface {ifindex} netns {other}\n{}\n", RX_VLAN_FEATURES.join("\n")),
                )
                .unwrap();
                Vec::new()
            }
        }));
        assert!(forged.is_empty());
        let taken = in_ns(Box::new(run));
        assert!(taken.is_empty(), "took over {taken:?} from another namespace");
        assert_eq!(ethtool_says(&a, "r0", "rx-vlan-offload"), "off", "the administrator's choice stays");
        assert_eq!(ethtool_says(&a, "r0", "rx-vlan-stag-hw-parse"), "off");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// The guard turns the offloads on again on the interface it turned them off on: under its
    /// new name when it was renamed while the run ran, and not on another interface since given
    /// its old name (whose offloads, here off by its administrator, stay off).
    #[test]
    fn offloads_are_turned_on_on_the_interface_turned_off_whatever_its_name() {
        if let Some(why) = cannot_run() {
            println!("SKIPPED: {why}");
            return;
        }
        let tag = format!("lbn{}", std::process::id());
        let (a, b) = (Netns::create(&format!("{tag}a")).unwrap(), Netns::create(&format!("{tag}b")).unwrap());
        veth_pair(&a, "n0", &b, "n1").unwrap();
        let dir = std::env::temp_dir().join(format!("lb-offload-test-{tag}"));
        let ns = a.name().to_string();
        let (ns_a, ns_b) = (a.name().to_string(), b.name().to_string());
        let record = std::thread::spawn(move || {
            enter_netns(&ns).unwrap();
            let record = record_path(&dir, "n0").unwrap();
            let off = rx_vlan_off_recorded("n0", &record).unwrap();
            // While it runs: n0 renamed n9, and a new n0 whose offloads are off.
            let ip = |args: &[&str]| crate::netns::run("ip", &[&["-n", ns_a.as_str()], args].concat()).unwrap();
            ip(&["link", "set", "n0", "down"]);
            ip(&["link", "set", "n0", "name", "n9"]);
            ip(&["link", "add", "n0", "type", "veth", "peer", "name", "n2", "netns", ns_b.as_str()]);
            crate::netns::run(
                "ip",
                &[
                    "netns",
                    "exec",
                    ns_a.as_str(),
                    "ethtool",
                    "-K",
                    "n0",
                    "rxvlan",
                    "off",
                    "rx-vlan-stag-hw-parse",
                    "off",
                ],
            )
            .unwrap();
            drop(off);
            let _ = std::fs::remove_dir(&dir);
            record
        })
        .join()
        .unwrap();
        assert_eq!(ethtool_says(&a, "n9", "rx-vlan-offload"), "on", "turned on under its new name");
        assert_eq!(ethtool_says(&a, "n9", "rx-vlan-stag-hw-parse"), "on");
        assert_eq!(ethtool_says(&a, "n0", "rx-vlan-offload"), "off", "the new n0's are its administrator's");
        assert_eq!(ethtool_says(&a, "n0", "rx-vlan-stag-hw-parse"), "off");
        assert!(!record.exists());
    }

    /// `fixed` is what `ethtool -k` marks `[fixed]`: a feature the driver does not offer to change
    /// (loopback's VLAN offloads, outside its `hw_features`) as well as one it never changes.
    #[test]
    fn fixed_is_what_ethtool_marks_fixed() {
        if let Some(why) = cannot_run() {
            println!("SKIPPED: {why}");
            return;
        }
        let ns = Netns::create(&format!("lbf{}", std::process::id())).unwrap();
        let name = ns.name().to_string();
        let got = std::thread::spawn(move || {
            enter_netns(&name).unwrap();
            features("lo", &RX_VLAN_FEATURES).unwrap()
        })
        .join()
        .unwrap();
        assert_eq!(got.len(), 2, "{got:?}");
        for (f, label) in got.iter().zip(["rx-vlan-offload", "rx-vlan-stag-hw-parse"]) {
            let says = ethtool_says(&ns, "lo", label);
            assert_eq!(f.fixed, says.ends_with("[fixed]"), "{f:?}, ethtool: {label}: {says}");
            assert_eq!(f.active, says.starts_with("on"), "{f:?}, ethtool: {label}: {says}");
        }
    }

    #[test]
    fn an_unknown_interface_is_an_error() {
        let e = rx_vlan_off("lbnosuchif0").unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENODEV), "{e}");
        assert!(rx_vlan_off("a-name-far-too-long-for-linux").is_err());
    }
}
