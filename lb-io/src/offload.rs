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
//! file's lock is free), and only on the interface the file names. Recording, it removes the
//! records no run can take over any more: of an interface gone from its namespace, or of a
//! namespace gone.

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
/// offloads such an interface has off are left as they are. The records beside `record` that
/// name an interface or a namespace since gone are removed, with a log line
/// (`remove_stale_records`).
pub fn rx_vlan_off_recorded(name: &str, record: &Path) -> io::Result<RxVlanOff> {
    if let Some(dir) = record.parent() {
        std::fs::create_dir_all(dir)?;
    }
    // Looked up before the record is made: an interface that is not there leaves none behind.
    let identity = record_identity(name)?;
    remove_stale_records(record, reachable_netns);
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

/// Removes the records beside `record` (not it) that no run can take over, each with a log line:
/// those of an interface gone from the calling thread's namespace (no interface of its index), and
/// those of a namespace that is gone (none of the inode its file name gives is reachable on the
/// host: no thread in it, no file open on it, no bind mount of it, or this namespace's inode is
/// the record's but not its cookie). A record still locked is a live run's and stays, as does one
/// of another namespace still there (judged by a run in that namespace), one whose first line is
/// not an identity, and any other file. Without this a killed run's record of a namespace or
/// interface since gone stayed in the directory for good.
///
/// `reachable` gives the namespaces reachable ([`reachable_netns`]).
fn remove_stale_records(record: &Path, reachable: impl FnOnce() -> Option<std::collections::HashSet<u64>>) {
    use std::os::unix::fs::MetadataExt;
    let Some(dir) = record.parent() else { return };
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    let Ok(here) = std::fs::metadata("/proc/thread-self/ns/net").map(|m| m.ino()) else { return };
    let cookie = netns_cookie().unwrap_or(0);
    // Looked for only if a record of another namespace is free: scanning /proc costs.
    let mut reachable = Some(reachable);
    let mut live: Option<Option<std::collections::HashSet<u64>>> = None;
    for entry in entries.flatten() {
        let path = entry.path();
        if path == record {
            continue;
        }
        let file_name = entry.file_name();
        let Some((ns, name)) = file_name.to_str().and_then(record_name) else { continue };
        // Locked: a live run's. Gone meanwhile: its run has finished with it.
        let Ok(Some(file)) = lock_existing(&path) else { continue };
        let mut text = String::new();
        if io::Read::read_to_string(&mut &file, &mut text).is_err() {
            continue;
        }
        let mut lines = text.lines();
        let identity = lines.next().and_then(parse_identity);
        let listed: Vec<&str> = lines.map(str::trim).filter(|l| !l.is_empty()).collect();
        let gone = if ns == here {
            match identity {
                None => None,
                Some((_, c)) if c != 0 && cookie != 0 && c != cookie => {
                    Some("its network namespace is gone (another one has its inode)".to_string())
                }
                Some((index, _)) if interface_name(index).is_none() => {
                    Some(format!("no interface of its index ({index}) is left in its network namespace"))
                }
                Some(_) => None,
            }
        } else {
            // Unknown (/proc not readable whole): kept.
            let live = live.get_or_insert_with(|| reachable.take().and_then(|f| f()));
            live.as_ref().is_some_and(|l| !l.contains(&ns)).then(|| "its network namespace is gone".to_string())
        };
        let Some(why) = gone else { continue };
        if std::fs::remove_file(&path).is_ok() {
            tracing::info!(
                record = %path.display(),
                interface = name,
                features = ?listed,
                "removed a receive VLAN offload record a killed run left, which no run can take over: {why} (a \
                 physical interface that went back to the host's namespace with its namespace keeps the features off)"
            );
        }
    }
}

/// The namespace inode and interface name a record's file name (`rx-vlan-off.NS.NAME`,
/// [`record_path`]) gives.
fn record_name(file: &str) -> Option<(u64, &str)> {
    let (ns, name) = file.strip_prefix("rx-vlan-off.")?.split_once('.')?;
    Some((ns.parse().ok()?, name))
}

/// The ifindex and namespace cookie of a record's first line ([`record_identity`]).
fn parse_identity(line: &str) -> Option<(u32, u64)> {
    let mut words = line.split(' ');
    let (Some("interface"), Some(index), Some("netns"), Some(cookie), None) =
        (words.next(), words.next(), words.next(), words.next(), words.next())
    else {
        return None;
    };
    Some((index.parse().ok()?, cookie.parse().ok()?))
}

/// The inodes of every network namespace reachable on the host: those of every thread, those open
/// in any process, and those bind-mounted (`ip netns add`) in any process's mount namespace. `None`
/// when some of it cannot be seen (not root, a process it may not look into, or a PID namespace
/// other than the host's, as in a container without the host's PIDs): a namespace not found may
/// then still be there.
fn reachable_netns() -> Option<std::collections::HashSet<u64>> {
    use std::os::unix::fs::MetadataExt;
    // The host's PID namespace has this inode (the kernel's PROC_PID_INIT_INO).
    const HOST_PID_NAMESPACE: u64 = 0xEFFF_FFFC;
    if std::fs::metadata("/proc/self/ns/pid").ok()?.ino() != HOST_PID_NAMESPACE {
        return None;
    }
    let nsfs = |link: &str| link.strip_prefix("net:[")?.strip_suffix(']')?.parse::<u64>().ok();
    // A process or thread that ended while it was read is no longer there to say anything.
    let vanished = |e: &io::Error| e.kind() == io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ESRCH);
    let mut found = std::collections::HashSet::new();
    let mut mount_namespaces = std::collections::HashSet::new();
    for process in std::fs::read_dir("/proc").ok()?.flatten() {
        if !process.file_name().to_str().is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit())) {
            continue;
        }
        let tasks = match std::fs::read_dir(process.path().join("task")) {
            Ok(t) => t,
            Err(e) if vanished(&e) => continue,
            Err(_) => return None,
        };
        for task in tasks.flatten() {
            match std::fs::metadata(task.path().join("ns/net")) {
                Ok(m) => {
                    found.insert(m.ino());
                }
                Err(e) if vanished(&e) => {}
                Err(_) => return None,
            }
        }
        let fds = match std::fs::read_dir(process.path().join("fd")) {
            Ok(f) => f,
            Err(e) if vanished(&e) => continue,
            Err(_) => return None,
        };
        for fd in fds.flatten() {
            if let Some(ino) = std::fs::read_link(fd.path()).ok().and_then(|l| l.to_str().and_then(nsfs)) {
                found.insert(ino);
            }
        }
        // Each mount namespace's bind mounts once. mountinfo lines: ID PARENT MAJ:MIN ROOT
        // MOUNTPOINT ... - FSTYPE SOURCE OPTIONS, ROOT `net:[INODE]` for a namespace's.
        let mounts = match std::fs::metadata(process.path().join("ns/mnt")) {
            Ok(m) if !mount_namespaces.insert(m.ino()) => continue,
            Ok(_) => std::fs::read_to_string(process.path().join("mountinfo")),
            Err(e) => Err(e),
        };
        let mounts = match mounts {
            Ok(m) => m,
            Err(e) if vanished(&e) => continue,
            Err(_) => return None,
        };
        for line in mounts.lines() {
            let Some((fields, rest)) = line.split_once(" - ") else { continue };
            if rest.split(' ').next() == Some("nsfs")
                && let Some(ino) = fields.split(' ').nth(3).and_then(nsfs)
            {
                found.insert(ino);
            }
        }
    }
    Some(found)
}

/// Opens `record` if it is there and takes its lock without waiting; `None` when it is not there,
/// another process holds it, or it was removed or replaced before the lock was taken.
fn lock_existing(record: &Path) -> io::Result<Option<std::fs::File>> {
    Ok(match try_lock(record, false)? {
        Lock::Held(file) => Some(file),
        Lock::Busy | Lock::Gone => None,
    })
}

/// Opens (or creates) `record` and takes its lock without waiting; `None` when another process
/// holds it. Retries when the file was removed between the open and the lock (its holder finished),
/// so the lock held is always that of the file at `record`.
fn lock_record(record: &Path) -> io::Result<Option<std::fs::File>> {
    loop {
        match try_lock(record, true)? {
            Lock::Held(file) => return Ok(Some(file)),
            Lock::Busy => return Ok(None),
            Lock::Gone => {}
        }
    }
}

/// What one try at a record's lock ([`try_lock`]) found.
enum Lock {
    /// The lock of the file at the record's path, now held.
    Held(std::fs::File),
    /// Another process holds it.
    Busy,
    /// No file was there (and none was to be created), or the one opened was removed or replaced
    /// before its lock was taken.
    Gone,
}

/// Opens `record` (creating it if `create`) and takes its lock once, without waiting. The lock is
/// held only if the file locked is still the one at `record`: a holder removes its record before
/// it lets go of the lock, so a lock taken on a removed file guards nothing.
fn try_lock(record: &Path, create: bool) -> io::Result<Lock> {
    use std::os::unix::fs::MetadataExt;
    let file = match std::fs::OpenOptions::new().read(true).write(true).create(create).truncate(false).open(record) {
        Ok(f) => f,
        Err(e) if !create && e.kind() == io::ErrorKind::NotFound => return Ok(Lock::Gone),
        Err(e) => return Err(e),
    };
    // SAFETY: flock(2) on the descriptor `file` owns, open for the call's length.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let e = io::Error::last_os_error();
        return if e.raw_os_error() == Some(libc::EWOULDBLOCK) { Ok(Lock::Busy) } else { Err(e) };
    }
    let held = file.metadata()?;
    let same = std::fs::metadata(record).is_ok_and(|m| (m.dev(), m.ino()) == (held.dev(), held.ino()));
    Ok(if same { Lock::Held(file) } else { Lock::Gone })
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

    /// Recording an interface removes the records beside it that no run can take over: a killed
    /// run's of an interface gone from this namespace, or of a namespace gone (its inode nowhere,
    /// or this namespace's inode with another cookie). Those of a live interface, a locked record
    /// (a live run's) and other files stay. Before, they all stayed in the directory for good.
    #[test]
    fn records_of_gone_interfaces_and_namespaces_are_removed() {
        use std::os::unix::fs::MetadataExt;
        let dir = std::env::temp_dir().join(format!("lb-offload-stale-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let here = std::fs::metadata("/proc/thread-self/ns/net").unwrap().ino();
        let cookie = netns_cookie().unwrap_or(0);
        let lo = crate::xsk::ifindex("lo").unwrap();
        let features = RX_VLAN_FEATURES.join("\n");
        let write = |file: &str, identity: &str| {
            let path = dir.join(file);
            std::fs::write(&path, format!("{identity}\n{features}\n")).unwrap();
            path
        };
        let live = write(&format!("rx-vlan-off.{here}.lo0"), &format!("interface {lo} netns {cookie}"));
        let gone = write(&format!("rx-vlan-off.{here}.gone0"), &format!("interface 4000000 netns {cookie}"));
        let held = write(&format!("rx-vlan-off.{here}.held0"), &format!("interface 4000001 netns {cookie}"));
        let unreadable = write(&format!("rx-vlan-off.{here}.odd0"), "not an identity");
        let other = write("notes", &format!("interface 4000000 netns {cookie}"));
        let reused = write(&format!("rx-vlan-off.{here}.old0"), &format!("interface {lo} netns {}", cookie + 1));
        // No namespace has inode 1 (nsfs inodes start at 0xF0000000).
        let no_ns = write("rx-vlan-off.1.eth0", &format!("interface {lo} netns {cookie}"));
        let lock = lock_record(&held).unwrap().expect("the held record's lock");

        let record = record_path(&dir, "lo").unwrap();
        let off = rx_vlan_off_recorded("lo", &record).unwrap();
        assert!(off.turned_off.is_empty(), "lo's VLAN offloads are fixed: {off:?}");
        drop(off);
        drop(lock);
        let there = |p: &Path| p.exists();
        let left = (there(&live), there(&gone), there(&held), there(&unreadable), there(&other));
        let (reused_left, no_ns_left) = (there(&reused), there(&no_ns));
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(left, (true, false, true, true, true), "(live, gone, held, odd, other file) left");
        if cookie != 0 {
            assert!(!reused_left, "the record of a namespace whose inode this one reuses stayed");
        }
        if reachable_netns().is_some() {
            assert!(!no_ns_left, "the record of a namespace that is nowhere stayed");
        } else {
            println!("SKIPPED (a namespace gone): /proc cannot be read whole here, so the record stays");
            assert!(no_ns_left, "a record of another namespace removed though /proc cannot be read whole");
        }
    }

    /// A killed run's record of a veth since deleted is removed when the next run records an
    /// interface of that namespace; the record of one still there stays.
    #[test]
    fn the_record_of_a_deleted_veth_is_removed_by_the_next_run() {
        if let Some(why) = cannot_run() {
            println!("SKIPPED: {why}");
            return;
        }
        let tag = format!("lbg{}", std::process::id());
        let (a, b) = (Netns::create(&format!("{tag}a")).unwrap(), Netns::create(&format!("{tag}b")).unwrap());
        veth_pair(&a, "g0", &b, "g1").unwrap();
        veth_pair(&a, "g2", &b, "g3").unwrap();
        let dir = std::env::temp_dir().join(format!("lb-offload-test-{tag}"));
        let in_a = |f: Box<dyn FnOnce() -> Vec<PathBuf> + Send>| {
            let ns = a.name().to_string();
            std::thread::spawn(move || {
                enter_netns(&ns).unwrap();
                f()
            })
            .join()
            .unwrap()
        };
        let records = in_a(Box::new({
            let dir = dir.clone();
            move || {
                ["g0", "g2"]
                    .into_iter()
                    .map(|name| {
                        let record = record_path(&dir, name).unwrap();
                        // Killed: the guard never drops.
                        rx_vlan_off_recorded(name, &record).unwrap().killed();
                        record
                    })
                    .collect()
            }
        }));
        assert!(records.iter().all(|r| r.exists()));
        a.ip(&["link", "del", "g0"]).unwrap();
        in_a(Box::new({
            let dir = dir.clone();
            move || {
                drop(rx_vlan_off_recorded("lo", &record_path(&dir, "lo").unwrap()).unwrap());
                Vec::new()
            }
        }));
        let left: Vec<bool> = records.iter().map(|r| r.exists()).collect();
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(left, [false, true], "(deleted g0, live g2) records left");
    }

    /// A record of another namespace goes when no namespace of its inode is reachable, and stays
    /// while one is, or while what is reachable is not known.
    #[test]
    fn a_record_of_another_namespace_goes_only_when_that_namespace_is_nowhere() {
        let dir = std::env::temp_dir().join(format!("lb-offload-other-ns-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let write = |file: &str| {
            let path = dir.join(file);
            std::fs::write(&path, format!("interface 2 netns 7\n{}\n", RX_VLAN_FEATURES.join("\n"))).unwrap();
            path
        };
        let (live, gone) = (write("rx-vlan-off.11.eth0"), write("rx-vlan-off.12.eth0"));
        let own = dir.join("rx-vlan-off.13.eth0");
        remove_stale_records(&own, || None);
        assert!(live.exists() && gone.exists(), "removed though what is reachable is not known");
        remove_stale_records(&own, || Some([11].into_iter().collect()));
        let (live_left, gone_left) = (live.exists(), gone.exists());
        let _ = std::fs::remove_dir_all(&dir);
        assert!(live_left, "the record of a namespace still there was removed");
        assert!(!gone_left, "the record of a namespace that is nowhere stayed");
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
