//! The bpf(2) system call, just the commands lb-io needs: create and update maps, load a program,
//! attach it with a BPF link, and run it on a test frame. The instruction builder is in [`asm`], the
//! VIP-steering XDP program in [`xdp`].

pub mod asm;
pub mod xdp;

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_TEST_RUN: libc::c_long = 10;
const BPF_LINK_CREATE: libc::c_long = 28;

/// An error from bpf(2), with the command and, for a refused program, the verifier's log.
#[derive(Debug, thiserror::Error)]
pub enum BpfError {
    /// The kernel refused a command.
    #[error("bpf({command}) failed: {source}{}", hint(command, source))]
    Syscall {
        /// The bpf(2) command.
        command: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
    /// The verifier rejected the program.
    #[error("the verifier rejected the XDP program: {source}{}\n{log}", verifier_hint(log))]
    Verifier {
        /// The OS error.
        source: std::io::Error,
        /// The verifier's log.
        log: String,
    },
    /// The program could not be assembled (a bug in the program text).
    #[error(transparent)]
    Asm(#[from] asm::AsmError),
}

/// What a verifier log refusing the program "for !root" means: the loader lacks CAP_PERFMON
/// (CAP_BPF alone loads a program only under the checks for unprivileged ones).
fn verifier_hint(log: &str) -> &'static str {
    if log.contains("!root") { " (needs CAP_PERFMON beside CAP_BPF + CAP_NET_ADMIN, or root)" } else { "" }
}

fn hint(command: &str, e: &std::io::Error) -> &'static str {
    match e.raw_os_error() {
        // All three, though EPERM means CAP_BPF or CAP_NET_ADMIN is missing: without CAP_PERFMON
        // the verifier refuses the program next.
        Some(libc::EPERM) => {
            " (needs root or CAP_BPF + CAP_PERFMON + CAP_NET_ADMIN; before Linux 5.8, CAP_SYS_ADMIN + CAP_NET_ADMIN)"
        }
        Some(libc::ENOSYS) => " (kernel built without BPF)",
        // An interface holds one XDP program (of another `lb run`, or another tool).
        Some(libc::EBUSY) if command == "BPF_LINK_CREATE" => {
            " (another XDP program is attached to the interface: `ip link show`)"
        }
        _ => "",
    }
}

impl BpfError {
    /// True when the kernel refused for lack of privilege or support (tests skip on this).
    pub fn is_refused(&self) -> bool {
        let e = match self {
            BpfError::Syscall { source, .. } | BpfError::Verifier { source, .. } => source,
            BpfError::Asm(_) => return false,
        };
        matches!(e.raw_os_error(), Some(libc::EPERM | libc::EACCES | libc::ENOSYS))
    }
}

/// Runs bpf(`cmd`, `attr`), returning the non-negative result.
fn sys_bpf<T>(cmd: libc::c_long, command: &'static str, attr: &mut T) -> Result<i64, BpfError> {
    // SAFETY: `attr` is a live, exclusively borrowed `repr(C)` attribute block of the layout the kernel
    // expects for `cmd`, and its size is passed with it; pointers inside it refer to buffers that the
    // callers keep alive across this call.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *mut T, std::mem::size_of::<T>() as libc::c_uint) };
    if rc < 0 {
        return Err(BpfError::Syscall { command, source: std::io::Error::last_os_error() });
    }
    Ok(rc)
}

fn owned_fd(fd: i64) -> OwnedFd {
    // SAFETY: the kernel just returned this descriptor to us and nothing else owns it.
    unsafe { OwnedFd::from_raw_fd(fd as i32) }
}

#[repr(C)]
#[derive(Default)]
struct MapCreateAttr {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
}

#[repr(C)]
#[derive(Default)]
struct MapElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

/// A BPF map with fixed-size keys and values, owned by its file descriptor.
#[derive(Debug)]
pub struct Map {
    fd: OwnedFd,
    key_size: usize,
    value_size: usize,
}

/// `BPF_MAP_TYPE_HASH`.
pub const MAP_TYPE_HASH: u32 = 1;
/// `BPF_MAP_TYPE_PERCPU_ARRAY`: an array with one copy of each value per CPU.
pub const MAP_TYPE_PERCPU_ARRAY: u32 = 6;
/// `BPF_MAP_TYPE_XSKMAP`: queue index -> AF_XDP socket.
pub const MAP_TYPE_XSKMAP: u32 = 17;

/// Copies of each value a per-CPU map holds: one per possible CPU (the kernel's lookup writes one
/// for each, in order). Read as the highest CPU in /sys/devices/system/cpu/possible plus one, at
/// least as many as the CPUs the file names; the count of configured CPUs if it cannot be read.
fn possible_cpus() -> usize {
    let highest = std::fs::read_to_string("/sys/devices/system/cpu/possible")
        .ok()
        .and_then(|s| s.trim().split(',').filter_map(|r| r.rsplit('-').next()?.trim().parse::<usize>().ok()).max());
    match highest {
        Some(h) => h + 1,
        // SAFETY: sysconf has no memory-safety preconditions.
        None => usize::try_from(unsafe { libc::sysconf(libc::_SC_NPROCESSORS_CONF) }).unwrap_or(1).max(1),
    }
}

impl Map {
    /// Creates a map of `map_type`.
    pub fn create(map_type: u32, key_size: usize, value_size: usize, max_entries: u32) -> Result<Self, BpfError> {
        let mut attr = MapCreateAttr {
            map_type,
            key_size: key_size as u32,
            value_size: value_size as u32,
            max_entries,
            map_flags: 0,
        };
        let fd = sys_bpf(BPF_MAP_CREATE, "BPF_MAP_CREATE", &mut attr)?;
        Ok(Map { fd: owned_fd(fd), key_size, value_size })
    }

    /// The map's file descriptor.
    pub fn fd(&self) -> i32 {
        self.fd.as_raw_fd()
    }

    fn check(&self, key: &[u8], value: Option<&[u8]>) -> Result<(), BpfError> {
        let bad = key.len() != self.key_size || value.is_some_and(|v| v.len() != self.value_size);
        if bad {
            return Err(BpfError::Syscall {
                command: "map element (size check)",
                source: std::io::Error::from_raw_os_error(libc::EINVAL),
            });
        }
        Ok(())
    }

    /// Inserts or replaces `key -> value`.
    pub fn update(&self, key: &[u8], value: &[u8]) -> Result<(), BpfError> {
        self.check(key, Some(value))?;
        let mut attr = MapElemAttr {
            map_fd: self.fd() as u32,
            key: key.as_ptr() as u64,
            value: value.as_ptr() as u64,
            ..MapElemAttr::default()
        };
        sys_bpf(BPF_MAP_UPDATE_ELEM, "BPF_MAP_UPDATE_ELEM", &mut attr).map(|_| ())
    }

    /// Removes `key`; `Ok(false)` if it was not there.
    pub fn delete(&self, key: &[u8]) -> Result<bool, BpfError> {
        self.check(key, None)?;
        let mut attr = MapElemAttr { map_fd: self.fd() as u32, key: key.as_ptr() as u64, ..MapElemAttr::default() };
        match sys_bpf(BPF_MAP_DELETE_ELEM, "BPF_MAP_DELETE_ELEM", &mut attr) {
            Ok(_) => Ok(true),
            Err(BpfError::Syscall { source, .. }) if source.raw_os_error() == Some(libc::ENOENT) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Another descriptor of the same map (to read it from another thread).
    pub fn try_clone(&self) -> std::io::Result<Self> {
        Ok(Map { fd: self.fd.try_clone()?, key_size: self.key_size, value_size: self.value_size })
    }

    /// The sum over every CPU of the u64 at `key` of a per-CPU map with 8-byte values.
    pub fn per_cpu_sum(&self, key: &[u8]) -> Result<u64, BpfError> {
        self.check(key, None)?;
        if self.value_size != 8 {
            return Err(BpfError::Syscall {
                command: "per-CPU sum (value size check)",
                source: std::io::Error::from_raw_os_error(libc::EINVAL),
            });
        }
        let mut values = vec![0u64; possible_cpus()];
        let mut attr = MapElemAttr {
            map_fd: self.fd() as u32,
            key: key.as_ptr() as u64,
            value: values.as_mut_ptr() as u64,
            ..MapElemAttr::default()
        };
        sys_bpf(BPF_MAP_LOOKUP_ELEM, "BPF_MAP_LOOKUP_ELEM", &mut attr)?;
        Ok(values.iter().fold(0u64, |sum, v| sum.wrapping_add(*v)))
    }

    /// True if `key` is present.
    pub fn contains(&self, key: &[u8]) -> Result<bool, BpfError> {
        self.check(key, None)?;
        let mut value = vec![0u8; self.value_size];
        let mut attr = MapElemAttr {
            map_fd: self.fd() as u32,
            key: key.as_ptr() as u64,
            value: value.as_mut_ptr() as u64,
            ..MapElemAttr::default()
        };
        match sys_bpf(BPF_MAP_LOOKUP_ELEM, "BPF_MAP_LOOKUP_ELEM", &mut attr) {
            Ok(_) => Ok(true),
            Err(BpfError::Syscall { source, .. }) if source.raw_os_error() == Some(libc::ENOENT) => Ok(false),
            Err(e) => Err(e),
        }
    }
}

#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

/// How many times a program load interrupted by a signal (EAGAIN) is tried, as libbpf's
/// `PROG_LOAD_ATTEMPTS`.
const PROG_LOAD_ATTEMPTS: usize = 5;

/// `BPF_PROG_TYPE_XDP`.
const PROG_TYPE_XDP: u32 = 6;
/// `BPF_XDP` attach type.
const ATTACH_TYPE_XDP: u32 = 37;

/// A loaded program.
#[derive(Debug)]
pub struct Program {
    fd: OwnedFd,
}

impl Program {
    /// Loads an XDP program named `name` (at most 15 bytes shown).
    pub fn load_xdp(name: &str, insns: &[asm::Insn]) -> Result<Self, BpfError> {
        let license = c"GPL";
        let mut prog_name = [0u8; 16];
        for (d, s) in prog_name.iter_mut().zip(name.bytes().take(15)) {
            *d = s;
        }
        let mut attr = ProgLoadAttr {
            prog_type: PROG_TYPE_XDP,
            insn_cnt: insns.len() as u32,
            insns: insns.as_ptr() as u64,
            license: license.as_ptr() as u64,
            prog_name,
            expected_attach_type: ATTACH_TYPE_XDP,
            ..ProgLoadAttr::default()
        };
        // A signal that arrives while the verifier runs makes the load fail with EAGAIN (a SIGHUP
        // as `lb run` starts, say): tried again, as libbpf does, a few times.
        let mut loaded = sys_bpf(BPF_PROG_LOAD, "BPF_PROG_LOAD", &mut attr);
        for _ in 1..PROG_LOAD_ATTEMPTS {
            match &loaded {
                Err(BpfError::Syscall { source, .. }) if source.raw_os_error() == Some(libc::EAGAIN) => {
                    loaded = sys_bpf(BPF_PROG_LOAD, "BPF_PROG_LOAD", &mut attr);
                }
                _ => break,
            }
        }
        match loaded {
            Ok(fd) => Ok(Program { fd: owned_fd(fd) }),
            Err(BpfError::Syscall { source, .. })
                if source.raw_os_error() == Some(libc::EACCES) || source.raw_os_error() == Some(libc::EINVAL) =>
            {
                // Load again with the verifier's log so the error says why.
                let mut log = vec![0u8; 1 << 16];
                attr.log_level = 1;
                attr.log_size = log.len() as u32;
                attr.log_buf = log.as_mut_ptr() as u64;
                let _ = sys_bpf(BPF_PROG_LOAD, "BPF_PROG_LOAD", &mut attr);
                let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
                Err(BpfError::Verifier { source, log: String::from_utf8_lossy(&log[..end]).into_owned() })
            }
            Err(e) => Err(e),
        }
    }

    /// The program's file descriptor.
    pub fn fd(&self) -> i32 {
        self.fd.as_raw_fd()
    }

    /// Runs the program once on `frame` (BPF_PROG_TEST_RUN) and returns its XDP action.
    pub fn test_run(&self, frame: &[u8]) -> Result<u32, BpfError> {
        let mut out = vec![0u8; frame.len() + 256];
        let mut attr = TestRunAttr {
            prog_fd: self.fd() as u32,
            data_size_in: frame.len() as u32,
            data_size_out: out.len() as u32,
            data_in: frame.as_ptr() as u64,
            data_out: out.as_mut_ptr() as u64,
            repeat: 1,
            ..TestRunAttr::default()
        };
        sys_bpf(BPF_PROG_TEST_RUN, "BPF_PROG_TEST_RUN", &mut attr)?;
        Ok(attr.retval)
    }

    /// Attaches the program to interface `ifindex` with a BPF link; it stays attached while the
    /// returned [`Link`] lives and detaches by itself when the link is dropped or the process dies.
    pub fn attach_xdp(&self, ifindex: u32, mode: AttachMode) -> Result<Link, BpfError> {
        let mut attr = LinkCreateAttr {
            prog_fd: self.fd() as u32,
            target_ifindex: ifindex,
            attach_type: ATTACH_TYPE_XDP,
            flags: mode.flags(),
            ..LinkCreateAttr::default()
        };
        let fd = sys_bpf(BPF_LINK_CREATE, "BPF_LINK_CREATE", &mut attr)?;
        Ok(Link { _fd: owned_fd(fd), ifindex, mode })
    }
}

#[repr(C)]
#[derive(Default)]
struct TestRunAttr {
    prog_fd: u32,
    retval: u32,
    data_size_in: u32,
    data_size_out: u32,
    data_in: u64,
    data_out: u64,
    repeat: u32,
    duration: u32,
    ctx_size_in: u32,
    ctx_size_out: u32,
    ctx_in: u64,
    ctx_out: u64,
    flags: u32,
    cpu: u32,
    batch_size: u32,
    _pad: u32,
}

#[repr(C)]
#[derive(Default)]
struct LinkCreateAttr {
    prog_fd: u32,
    target_ifindex: u32,
    attach_type: u32,
    flags: u32,
    _target: [u64; 4],
}

/// Where in the receive path an XDP program runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttachMode {
    /// Let the kernel choose (native when the driver has it).
    Auto,
    /// In the driver (veth, most 10G+ NICs); fastest.
    Native,
    /// After the socket buffer is built; works everywhere, slowest.
    Generic,
}

impl AttachMode {
    const fn flags(self) -> u32 {
        match self {
            AttachMode::Auto => 0,
            AttachMode::Generic => 1 << 1,
            AttachMode::Native => 1 << 2,
        }
    }
}

/// An attached program; dropping it detaches the program.
#[derive(Debug)]
pub struct Link {
    _fd: OwnedFd,
    ifindex: u32,
    mode: AttachMode,
}

impl Link {
    /// The interface the program is attached to.
    pub fn ifindex(&self) -> u32 {
        self.ifindex
    }

    /// The mode it was attached in.
    pub fn mode(&self) -> AttachMode {
        self.mode
    }
}

#[cfg(test)]
mod tests {
    use super::BpfError;

    /// A loader with CAP_BPF and CAP_NET_ADMIN but not CAP_PERFMON (a container given the first
    /// two) has the program refused "for !root": the error says which capability is missing.
    /// Before, it gave the verifier's log alone, which names no capability.
    #[test]
    fn a_program_refused_for_lack_of_perfmon_says_so() {
        let refused = |log: &str| {
            BpfError::Verifier { source: std::io::Error::from_raw_os_error(libc::EACCES), log: log.to_string() }
                .to_string()
        };
        let log = "784: (0f) r7 += r5\nR7 has pointer with unsupported alu operation, pointer arithmetic with it prohibited for !root\n";
        assert!(refused(log).contains("needs CAP_PERFMON"), "{}", refused(log));
        assert!(!refused("R1 invalid mem access 'scalar'\n").contains("CAP_PERFMON"), "a fault of the program itself");
    }

    /// A bpf(2) call refused with EPERM (no CAP_BPF, or no CAP_NET_ADMIN) names every capability
    /// loading the program takes, as deploy/'s DaemonSet adds them. Before, it named CAP_BPF and
    /// CAP_NET_ADMIN alone: a container given those two got past it only to have the program
    /// refused by the verifier for want of CAP_PERFMON, a second crash loop.
    #[test]
    fn a_call_refused_for_lack_of_privilege_names_every_capability_loading_takes() {
        for command in ["BPF_MAP_CREATE", "BPF_PROG_LOAD", "BPF_LINK_CREATE"] {
            let e = BpfError::Syscall { command, source: std::io::Error::from_raw_os_error(libc::EPERM) }.to_string();
            for cap in ["CAP_BPF", "CAP_PERFMON", "CAP_NET_ADMIN"] {
                assert!(e.contains(cap), "{command}: {e}");
            }
        }
    }
}
