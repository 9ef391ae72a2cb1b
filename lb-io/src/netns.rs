//! Network namespaces and veth pairs for tests, the demo and the benchmark: created with `ip`, removed
//! when their guard drops, so a run never leaves anything behind and never touches the host's own
//! interfaces. Names carry the process id so parallel runs do not clash.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::process::{Command, Output};

/// A command that failed, with what it printed.
#[derive(Debug, thiserror::Error)]
#[error("`{command}` failed: {detail}")]
pub struct CommandError {
    /// The command line.
    pub command: String,
    /// Exit status and stderr, or the spawn error.
    pub detail: String,
}

/// Runs `program args...`, returning stdout, or the command line and stderr on failure.
pub fn run(program: &str, args: &[&str]) -> Result<String, CommandError> {
    let command = format!("{program} {}", args.join(" "));
    let out: Output = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| CommandError { command: command.clone(), detail: e.to_string() })?;
    if !out.status.success() {
        return Err(CommandError {
            command,
            detail: format!("{}: {}", out.status, String::from_utf8_lossy(&out.stderr).trim()),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A named network namespace, deleted (with every interface in it) on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates namespace `name` with its loopback up.
    pub fn create(name: &str) -> Result<Self, CommandError> {
        run("ip", &["netns", "add", name])?;
        let ns = Netns { name: name.to_string() };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// The namespace's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `ip args...` inside the namespace.
    pub fn ip(&self, args: &[&str]) -> Result<String, CommandError> {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        run("ip", &full)
    }

    /// Adds (or replaces) a permanent neighbour entry: `addr` is at `mac` on `dev`.
    pub fn static_neighbour(&self, addr: &str, mac: &str, dev: &str) -> Result<(), CommandError> {
        self.ip(&["neigh", "replace", addr, "lladdr", mac, "dev", dev, "nud", "permanent"]).map(|_| ())
    }

    /// Runs `program args...` inside the namespace.
    pub fn exec(&self, program: &str, args: &[&str]) -> Result<String, CommandError> {
        let mut full = vec!["netns", "exec", self.name.as_str(), program];
        full.extend_from_slice(args);
        run("ip", &full)
    }

    /// Moves the calling thread into the namespace (sockets it opens afterwards live there).
    /// Threads are cheap: call this at the start of a thread made for the namespace.
    pub fn enter(&self) -> std::io::Result<()> {
        enter_netns(&self.name)
    }

    /// The MAC address of interface `dev` in the namespace.
    pub fn mac(&self, dev: &str) -> Result<[u8; 6], CommandError> {
        let out = self.ip(&["-br", "link", "show", "dev", dev])?;
        let text = out.split_whitespace().nth(2).unwrap_or_default().to_string();
        parse_mac(&text).ok_or(CommandError {
            command: format!("ip -br link show dev {dev}"),
            detail: format!("no MAC in {out:?}"),
        })
    }

    /// Turns TX checksum offload off on `dev` (frames forwarded from a namespace otherwise carry
    /// partial checksums the receiver rejects).
    pub fn checksum_offload_off(&self, dev: &str) -> Result<(), CommandError> {
        self.exec("ethtool", &["-K", dev, "tx", "off"]).map(|_| ())
    }

    /// What `ethtool -k` says of feature `label` on `dev` ("on", "off", "on \[fixed\]"...): a reading
    /// independent of lb-io's own ioctls, for tests.
    pub fn ethtool_feature(&self, dev: &str, label: &str) -> Result<String, CommandError> {
        let out = self.exec("ethtool", &["-k", dev])?;
        let value = out.lines().find_map(|l| l.trim().strip_prefix(&format!("{label}:")).map(str::trim));
        value
            .map(str::to_string)
            .ok_or(CommandError { command: format!("ethtool -k {dev}"), detail: format!("no {label} in {out}") })
    }
}

/// Why tests that check with `ethtool` cannot run here, if they cannot (`.ci/run` installs it).
pub fn can_run_ethtool() -> Result<(), String> {
    run("ethtool", &["--version"])
        .map(|_| ())
        .map_err(|e| format!("no ethtool to check with ({e}); .ci/run installs it"))
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(e) = run("ip", &["netns", "del", &self.name]) {
            eprintln!("warning: could not remove namespace {}: {e}", self.name);
        }
    }
}

/// An AF_XDP test's wiring: namespaces `{tag}l` (interface `l0`) and `{tag}p` (interface `p0`)
/// joined by a veth pair, both ends up; returned as (load balancer side, peer side).
pub fn lb_and_peer(tag: &str) -> Result<(Netns, Netns), CommandError> {
    let peer = Netns::create(&format!("{tag}p"))?;
    let lb = Netns::create(&format!("{tag}l"))?;
    veth_pair(&peer, "p0", &lb, "l0")?;
    Ok((lb, peer))
}

/// Moves the calling thread into the named namespace (for threads that do not hold the guard).
pub fn enter_netns(name: &str) -> std::io::Result<()> {
    let f = File::open(format!("/var/run/netns/{name}"))?;
    // SAFETY: `f` is an open namespace file; setns only changes this thread's network namespace.
    let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Parses `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut mac {
        *b = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

/// Formats a MAC as `aa:bb:cc:dd:ee:ff`.
pub fn format_mac(m: [u8; 6]) -> String {
    format!("{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}", m[0], m[1], m[2], m[3], m[4], m[5])
}

/// Creates a veth pair: `a` in namespace `ns_a`, `b` in `ns_b`, both up.
pub fn veth_pair(ns_a: &Netns, a: &str, ns_b: &Netns, b: &str) -> Result<(), CommandError> {
    ns_a.ip(&["link", "add", a, "type", "veth", "peer", "name", b, "netns", ns_b.name()])?;
    ns_a.ip(&["link", "set", a, "up"])?;
    ns_b.ip(&["link", "set", b, "up"])?;
    Ok(())
}

/// True when this process may create namespaces (root, `ip` present); else why not.
pub fn can_create_namespaces() -> Result<(), String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err("not root (network namespaces, XDP and AF_XDP need root)".into());
    }
    run("ip", &["-V"]).map(|_| ()).map_err(|e| format!("iproute2 missing: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_round_trip() {
        let m = parse_mac("02:0a:ff:00:10:01").unwrap();
        assert_eq!(m, [2, 10, 255, 0, 16, 1]);
        assert_eq!(format_mac(m), "02:0a:ff:00:10:01");
        assert!(parse_mac("02:0a:ff:00:10").is_none());
        assert!(parse_mac("02:0a:ff:00:10:01:02").is_none());
        assert!(parse_mac("zz:0a:ff:00:10:01").is_none());
    }
}
