//! The YAML configuration file: its serde shape and its validation into [`Settings`].
//!
//! Parsing is two steps. serde reads the file into loosely typed `File*` structs (addresses and names
//! as strings, numbers as `u64`), rejecting unknown keys; then `validate` checks every field and
//! collects *all* problems, each naming the field path and the value, e.g.
//! `services[2].backends[1].weight: 70000 is out of range (0..=65535)`. A file with any problem is
//! rejected whole, so a reload never applies half a file. VIPs, backends, the node's SNAT and tunnel
//! source addresses and `kubernetes.node_addresses` must be unicast addresses a host holds: the
//! unspecified address, broadcast, multicast, loopback and IPv4-mapped IPv6 (`::ffff:a.b.c.d`) are
//! refused (lb-core's `SpecialAddress`, which its own validation applies too). A source range is
//! written as its network (`10.0.0.0/8`): one with host bits set (`10.1.2.3/8`) is refused, as
//! `ip route` refuses it, rather than widened to the network without a word; so is one written
//! IPv4-mapped (`::ffff:10.0.0.0/104`), which no packet comes from. MACs frames go to
//! (`gateway_mac`, a backend's `mac`) may be neither all zeros nor broadcast, and `local_mac` no
//! group MAC.
//!
//! ```yaml
//! node:
//!   local_mac: "02:00:00:00:00:01"   # frames' source in lb replay; lb run sends from each interface's own MAC
//!   gateway_mac: "02:00:00:00:00:fe"
//!   snat_v4: 10.0.0.2                # or `node`: the node's own IPv4 (kubernetes.node_addresses, $NODE_IPS)
//!   snat_ports: [32768, 60999]       # the default, the kernel's ephemeral ports; with `node`, above them: [61000, 65535]
//!   timeouts: { tcp_established: 15m, udp: 5m }
//!   time_exceeded_per_second: 1000  # the default: ICMP time exceeded errors a core sends a second at most (0: none)
//! interfaces:
//!   - { name: eth0, queues: [0, 1] }
//! metrics: { listen: "127.0.0.1:9472" }
//! kubernetes: { node_name: node-a, node_zone: zone-a, node_addresses: [192.168.1.10] }  # service_proxy_name: lb
//! services:
//!   - name: web
//!     vip: 10.0.0.10
//!     port: 80
//!     protocol: tcp
//!     scheduler: mh
//!     mode: nat                   # nat | dsr | ipip | gue (with gue_port)
//!     affinity_timeout: 3h
//!     source_ranges: [10.0.0.0/8]
//!     # path only with type: http. A down backend is drained (or removed; a UDP service's is removed
//!     # under either, its flows following on_backend_removed); if every backend that would take
//!     # new flows is down, the service fails open: all take new flows, as if unchecked.
//!     health_check: { type: http, path: /healthz, interval: 2s, timeout: 1s, rise: 2, fall: 3, on_failure: drain }
//!     backends:
//!       - { addr: 10.1.0.1, port: 8080, weight: 100 }
//!       - { addr: 10.1.0.2, port: 8080, weight: 100, state: draining }
//! ```

use std::collections::HashSet;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use lb_core::config::{
    BackendConfig, BackendState, Cidr, ForwardMode, NodeConfig, Protocol, RemovedBackendPolicy, SchedulerKind,
    ServiceConfig, ServiceKey, SpecialAddress, Timeouts,
};
use serde::Deserialize;

use super::reload::ContentDigest;
use super::{
    FailurePolicy, HealthCheck, InterfaceConfig, KubernetesSettings, Probe, ServiceSpec, Settings, SnatFromNode,
};

/// Largest backend weight, as `ipvsadm -w` allows.
pub const MAX_WEIGHT: u64 = 65535;
/// Largest Maglev table size accepted (a prime near 2^20, as Katran's largest ring).
pub const MAX_MAGLEV_TABLE_SIZE: u64 = 1_048_573;
/// Longest `kubernetes.debounce` accepted: cluster changes wait this long at most before they are
/// served, and the feed's deadline (now + debounce) stays far from the clock's limit.
pub const MAX_DEBOUNCE: Duration = Duration::from_secs(60);
/// Deepest nesting of flow collections (`[...]`, `{...}`) a file may have: the YAML reader's own
/// limit, which it checks only after reading the whole file, in a time that grows with the square of
/// the depth.
pub const MAX_NESTING: usize = 128;

/// One problem in a configuration: the field path, its value, and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// Path of the field, e.g. `services[2].backends[1].weight`.
    pub field: String,
    /// The offending value as written.
    pub value: String,
    /// What is wrong with it, e.g. `is out of range (0..=65535)`.
    pub problem: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {} {}", self.field, self.value, self.problem)
    }
}

/// Why a configuration file was rejected.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not YAML of the expected shape (unknown key, wrong type...); serde's message
    /// carries the line and column.
    #[error("{0}")]
    Syntax(#[from] serde_yaml::Error),
    /// Flow collections (`[...]`, `{...}`) nest deeper than [`MAX_NESTING`]: refused before the
    /// YAML reader, which would take minutes over a file of brackets to say the same.
    #[error("line {line}: collections nest deeper than {max} levels")]
    TooDeep {
        /// The line of the first bracket too deep.
        line: usize,
        /// [`MAX_NESTING`].
        max: usize,
    },
    /// The file parsed but some fields are invalid; every problem is listed.
    #[error("{} invalid field(s):\n  {}", .0.len(), .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n  "))]
    Invalid(Vec<FieldError>),
}

impl ConfigError {
    /// The error as a message naming `path`, the file [`load`] read: `lb.yaml: 1 invalid field(s)...`
    /// (a read error names it already).
    pub fn naming(&self, path: &Path) -> String {
        match self {
            ConfigError::Read { .. } => self.to_string(),
            _ => format!("{}: {self}", path.display()),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The serde shape of the file.

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    #[serde(default)]
    node: FileNode,
    #[serde(default)]
    interfaces: Vec<FileInterface>,
    #[serde(default, deserialize_with = "section")]
    metrics: Option<FileMetrics>,
    #[serde(default, deserialize_with = "section")]
    kubernetes: Option<FileKubernetes>,
    #[serde(default)]
    services: Vec<FileService>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileNode {
    local_mac: Option<String>,
    gateway_mac: Option<String>,
    snat_v4: Option<String>,
    snat_v6: Option<String>,
    snat_ports: Option<(u64, u64)>,
    tunnel_src_v4: Option<String>,
    tunnel_src_v6: Option<String>,
    tunnel_mtu: Option<u64>,
    time_exceeded_per_second: Option<u64>,
    hash_seed: Option<u64>,
    #[serde(default)]
    timeouts: FileTimeouts,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileTimeouts {
    tcp_syn: Option<String>,
    tcp_established: Option<String>,
    tcp_fin: Option<String>,
    tcp_time_wait: Option<String>,
    udp: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileInterface {
    name: String,
    #[serde(default)]
    queues: Vec<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileMetrics {
    listen: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileKubernetes {
    #[serde(default = "yes")]
    enabled: bool,
    kubeconfig: Option<PathBuf>,
    node_name: Option<String>,
    node_zone: Option<String>,
    #[serde(default)]
    node_addresses: Vec<String>,
    service_proxy_name: Option<String>,
    default_scheduler: Option<String>,
    default_mode: Option<String>,
    gue_port: Option<u64>,
    debounce: Option<String>,
    proxy_healthz: Option<String>,
}

fn yes() -> bool {
    true
}

/// An optional section that, when its key is written, is there even with nothing under it (every
/// field left to its default or commented out, which YAML reads as null): read as `{}`, so
/// `kubernetes:` alone turns the feed on with its defaults and `metrics:` alone is refused for its
/// missing `listen`, where null read as no section would drop either without a word.
fn section<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    match Option::<T>::deserialize(d)? {
        Some(t) => Ok(Some(t)),
        None => {
            use serde::de::value::{Error, MapDeserializer};
            let empty = MapDeserializer::<_, Error>::new(std::iter::empty::<(&str, &str)>());
            T::deserialize(empty).map(Some).map_err(serde::de::Error::custom)
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileService {
    name: Option<String>,
    vip: String,
    port: u64,
    #[serde(default = "tcp")]
    protocol: String,
    #[serde(default = "maglev")]
    scheduler: String,
    #[serde(default = "nat")]
    mode: String,
    gue_port: Option<u64>,
    affinity_timeout: Option<String>,
    #[serde(default)]
    source_ranges: Vec<String>,
    maglev_table_size: Option<u64>,
    on_backend_removed: Option<String>,
    #[serde(default, deserialize_with = "section")]
    health_check: Option<FileHealthCheck>,
    #[serde(default)]
    backends: Vec<FileBackend>,
}

fn tcp() -> String {
    "tcp".into()
}
fn maglev() -> String {
    "mh".into()
}
fn nat() -> String {
    "nat".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileBackend {
    addr: String,
    port: Option<u64>,
    #[serde(default = "default_weight")]
    weight: u64,
    mac: Option<String>,
    state: Option<String>,
}

fn default_weight() -> u64 {
    1
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileHealthCheck {
    #[serde(rename = "type")]
    kind: String,
    path: Option<String>,
    port: Option<u64>,
    interval: Option<String>,
    timeout: Option<String>,
    rise: Option<u64>,
    fall: Option<u64>,
    on_failure: Option<String>,
}

// ---------------------------------------------------------------------------------------------
// Entry points.

/// A configuration file as [`load`] read it: its settings and the digest of the text they come from,
/// from which a [`FileWatch`](super::reload::FileWatch) tells whether the file changed since.
#[derive(Debug, Clone)]
pub struct LoadedFile {
    /// What the file says.
    pub settings: Settings,
    /// The digest of the text parsed.
    pub digest: ContentDigest,
}

/// Reads and validates the configuration file at `path`.
pub fn load(path: &Path) -> Result<LoadedFile, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
    Ok(LoadedFile { settings: parse(&text)?, digest: ContentDigest::of(&text) })
}

/// Parses and validates a configuration given as YAML text.
pub fn parse(yaml: &str) -> Result<Settings, ConfigError> {
    if let Some(line) = nested_too_deep(yaml) {
        return Err(ConfigError::TooDeep { line, max: MAX_NESTING });
    }
    // An empty file is an empty configuration, not a syntax error.
    let file: FileConfig = if yaml.trim().is_empty() { FileConfig::default() } else { serde_yaml::from_str(yaml)? };
    validate(&file)
}

/// The line of the first flow collection in `yaml` nested deeper than [`MAX_NESTING`], if any.
/// Brackets in comments and quoted scalars do not count. A quote or `#` within a plain scalar does
/// not start either; a block scalar's text is read as if it were not one, which can only miss a
/// file too deep (the YAML reader then refuses it, slowly), not refuse a file it would take.
fn nested_too_deep(yaml: &str) -> Option<usize> {
    let (mut depth, mut line, mut prev) = (0usize, 1, '\n');
    let mut chars = yaml.chars();
    while let Some(c) = chars.next() {
        match c {
            '\n' => line += 1,
            '#' if prev.is_whitespace() => {
                for c in chars.by_ref() {
                    if c == '\n' {
                        line += 1;
                        break;
                    }
                }
                prev = '\n';
                continue;
            }
            // A quoted scalar starts a value, a key or an item (`''` in a single-quoted one is a quote).
            '"' | '\'' if prev.is_whitespace() || matches!(prev, '[' | '{' | ',' | ':' | '-') || prev == c => {
                let mut escaped = false;
                for q in chars.by_ref() {
                    if q == '\n' {
                        line += 1;
                    }
                    if q == c && !escaped {
                        break;
                    }
                    escaped = c == '"' && q == '\\' && !escaped;
                }
            }
            '[' | '{' => {
                depth += 1;
                if depth > MAX_NESTING {
                    return Some(line);
                }
            }
            ']' | '}' => depth = depth.saturating_sub(1),
            _ => {}
        }
        prev = c;
    }
    None
}

// ---------------------------------------------------------------------------------------------
// Validation: every check pushes a FieldError and carries on, so one run lists every problem.

/// Collects the problems of one validation run.
#[derive(Default)]
struct Problems(Vec<FieldError>);

impl Problems {
    fn push(&mut self, field: impl Into<String>, value: impl fmt::Display, problem: impl Into<String>) {
        self.0.push(FieldError { field: field.into(), value: value.to_string(), problem: problem.into() });
    }

    /// Parses `value` with `FromStr`, recording `problem` on failure.
    fn parse<T: std::str::FromStr>(&mut self, field: &str, value: &str, problem: &str) -> Option<T> {
        match value.trim().parse() {
            Ok(v) => Some(v),
            Err(_) => {
                self.push(field, quoted(value), problem);
                None
            }
        }
    }

    fn u16_in(&mut self, field: &str, value: u64, lo: u16) -> Option<u16> {
        match u16::try_from(value) {
            Ok(v) if v >= lo => Some(v),
            _ => {
                self.push(field, value, format!("is out of range ({lo}..=65535)"));
                None
            }
        }
    }

    fn duration(&mut self, field: &str, value: &str) -> Option<Duration> {
        match parse_duration(value) {
            Some(d) if !d.is_zero() => Some(d),
            Some(_) => {
                self.push(field, quoted(value), "must be longer than zero");
                None
            }
            None => {
                self.push(field, quoted(value), "is not a duration (e.g. 500ms, 2s, 15m, 3h)");
                None
            }
        }
    }

    /// Records `addr` (written `value`) if no packet can carry it to one host (`SpecialAddress`);
    /// `must` says what the field needs instead.
    fn unicast(&mut self, field: &str, value: &str, addr: IpAddr, must: &str) {
        if let Some(kind) = SpecialAddress::of(addr) {
            self.push(field, quoted(value), format!("is {kind}; {must}"));
        }
    }

    fn mac(&mut self, field: &str, value: &str) -> Option<[u8; 6]> {
        let m = parse_mac(value);
        if m.is_none() {
            self.push(field, quoted(value), "is not a MAC address (e.g. 02:00:00:00:00:01)");
        }
        m
    }

    /// A MAC frames are sent to (a gateway's, a backend's): not all zeros (a placeholder, which no
    /// interface answers to) nor broadcast (every frame flooded to the whole segment).
    fn destination_mac(&mut self, field: &str, value: &str) -> Option<[u8; 6]> {
        let m = self.mac(field, value)?;
        let problem = match m {
            _ if m == [0; 6] => "is all zeros: give the next hop's MAC",
            _ if m == [0xff; 6] => "is the broadcast MAC: every frame would flood the segment; give the next hop's MAC",
            _ => return Some(m),
        };
        self.push(field, quoted(value), problem);
        None
    }

    /// A MAC frames come from: an interface's own, so neither all zeros nor a group MAC (its first
    /// byte's lowest bit set), which no frame may carry as its source.
    fn source_mac(&mut self, field: &str, value: &str) -> Option<[u8; 6]> {
        let m = self.mac(field, value)?;
        let problem = match m {
            _ if m == [0; 6] => "is all zeros: give the interface's MAC",
            _ if m[0] & 1 == 1 => "is a group (multicast) MAC, which no frame may come from: give the interface's MAC",
            _ => return Some(m),
        };
        self.push(field, quoted(value), problem);
        None
    }
}

/// The shortest and longest health check interval a file may set.
const HEALTH_INTERVAL_MIN: Duration = Duration::from_millis(100);
const HEALTH_INTERVAL_MAX: Duration = Duration::from_secs(3600);

fn quoted(s: &str) -> String {
    format!("{s:?}")
}

/// Parses `500ms`, `2s`, `15m`, `3h` or a bare number of seconds.
pub fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().ok()?;
    match unit.trim() {
        "ms" => Some(Duration::from_millis(n)),
        "" | "s" => Some(Duration::from_secs(n)),
        "m" => n.checked_mul(60).map(Duration::from_secs),
        "h" => n.checked_mul(3600).map(Duration::from_secs),
        _ => None,
    }
}

/// Parses `aa:bb:cc:dd:ee:ff` (or with `-`).
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.trim().split([':', '-']);
    for byte in &mut mac {
        let p = parts.next()?;
        // Two hex digits: `u8::from_str_radix` alone would take "+2" for 2.
        if p.len() != 2 || !p.bytes().all(|c| c.is_ascii_hexdigit()) {
            return None;
        }
        *byte = u8::from_str_radix(p, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

/// Why the Kubernetes feed serves no key in DSR mode: DSR sends the frame, still addressed to the
/// VIP, to the backend's own MAC, and an endpoint has an address only (`node.gateway_mac` would route
/// the frame by its VIP, back to this node).
pub const DSR_NEEDS_MACS: &str = "cannot be dsr: dsr sends frames still addressed to the VIP to each backend's own MAC, \
     and Kubernetes endpoints have none (node.gateway_mac would route them back to the VIP); use ipip, gue or nat";

/// Parses a forwarding mode name; `gue` needs its port.
pub fn parse_mode(name: &str, gue_port: Option<u16>) -> Result<ForwardMode, String> {
    match name.trim().to_ascii_lowercase().as_str() {
        "nat" | "masq" => Ok(ForwardMode::Nat),
        "dsr" | "dr" | "route" => Ok(ForwardMode::Dsr),
        "ipip" | "tun" | "tunnel" => Ok(ForwardMode::IpIp),
        "gue" => gue_port.map(|port| ForwardMode::Gue { port }).ok_or_else(|| "needs gue_port".to_string()),
        _ => Err("is not a forwarding mode (nat, dsr, ipip, gue)".to_string()),
    }
}

/// Parses a removed-backend policy name.
pub fn parse_removed_policy(name: &str) -> Option<RemovedBackendPolicy> {
    match name.trim().to_ascii_lowercase().as_str() {
        "reschedule" => Some(RemovedBackendPolicy::Reschedule),
        "drop" => Some(RemovedBackendPolicy::Drop),
        _ => None,
    }
}

/// `n` as a Maglev table size (file or annotation): a prime no larger than
/// [`MAX_MAGLEV_TABLE_SIZE`]. The bound is checked first, so any number written is judged at once
/// (the primality test is trial division: for a prime near 2^64 it ran for minutes).
pub fn maglev_table_size(n: u64) -> Option<u32> {
    u32::try_from(n).ok().filter(|&m| n <= MAX_MAGLEV_TABLE_SIZE && lb_hash::is_prime(m))
}

fn validate(file: &FileConfig) -> Result<Settings, ConfigError> {
    let mut p = Problems::default();
    let node = validate_node(&file.node, &mut p);

    let mut interfaces = Vec::new();
    let mut names = HashSet::new();
    for (i, iface) in file.interfaces.iter().enumerate() {
        let f = format!("interfaces[{i}]");
        if iface.name.is_empty() || iface.name.len() > 15 {
            p.push(format!("{f}.name"), quoted(&iface.name), "is not an interface name (1 to 15 characters)");
        } else if !names.insert(iface.name.clone()) {
            p.push(format!("{f}.name"), quoted(&iface.name), "appears twice");
        }
        let mut queues = Vec::new();
        for (j, &q) in iface.queues.iter().enumerate() {
            match u32::try_from(q) {
                Ok(q) if !queues.contains(&q) => queues.push(q),
                Ok(_) => p.push(format!("{f}.queues[{j}]"), q, "appears twice"),
                Err(_) => p.push(format!("{f}.queues[{j}]"), q, "is out of range (0..=4294967295)"),
            }
        }
        if queues.is_empty() {
            queues.push(0);
        }
        interfaces.push(InterfaceConfig { name: iface.name.clone(), queues });
    }

    let metrics_listen =
        file.metrics.as_ref().and_then(|m| p.parse::<SocketAddr>("metrics.listen", &m.listen, "is not ADDRESS:PORT"));

    // Checked even when turned off, so a bad value shows now rather than when it is turned on
    // (which needs a restart too).
    let snat_from_node = SnatFromNode {
        v4: file.node.snat_v4.as_deref() == Some(SNAT_FROM_NODE),
        v6: file.node.snat_v6.as_deref() == Some(SNAT_FROM_NODE),
    };
    let kubernetes = file.kubernetes.as_ref().and_then(|k| {
        let settings = KubernetesSettings { snat_from_node, ..validate_kubernetes(k, &mut p) };
        k.enabled.then_some(settings)
    });
    for (field, from_node) in [("node.snat_v4", snat_from_node.v4), ("node.snat_v6", snat_from_node.v6)] {
        if from_node && kubernetes.is_none() {
            p.push(
                field,
                quoted(SNAT_FROM_NODE),
                "is the node's address from the Kubernetes settings (kubernetes.node_addresses, $NODE_IPS): it needs the kubernetes section",
            );
        }
    }
    if kubernetes.is_some() && node.gateway_mac.is_none() {
        p.push("node.gateway_mac", "(none)", "is needed by the Kubernetes feed (endpoints have no MAC of their own)");
    }

    let mut services = Vec::new();
    let mut keys = HashSet::new();
    for (i, s) in file.services.iter().enumerate() {
        if let Some(spec) = validate_service(i, s, &node, snat_from_node, &mut keys, &mut p) {
            services.push(spec);
        }
    }

    if p.0.is_empty() {
        Ok(Settings { node, services, interfaces, metrics_listen, kubernetes })
    } else {
        Err(ConfigError::Invalid(p.0))
    }
}

/// What `node.snat_v4` and `node.snat_v6` say for "this node's own address".
const SNAT_FROM_NODE: &str = "node";

fn validate_node(n: &FileNode, p: &mut Problems) -> NodeConfig {
    let mut node = NodeConfig::default();
    if let Some(m) = &n.local_mac {
        node.local_mac = p.source_mac("node.local_mac", m).unwrap_or(node.local_mac);
    }
    node.gateway_mac = n.gateway_mac.as_deref().and_then(|m| p.destination_mac("node.gateway_mac", m));
    // `node`: this node's own address, filled in from the Kubernetes settings (`fill_from_env`).
    let (v4, v6) = (n.snat_v4.as_deref(), n.snat_v6.as_deref());
    node.snat_v4 = v4
        .filter(|a| *a != SNAT_FROM_NODE)
        .and_then(|a| p.parse::<Ipv4Addr>("node.snat_v4", a, "is not an IPv4 address"));
    node.snat_v6 = v6
        .filter(|a| *a != SNAT_FROM_NODE)
        .and_then(|a| p.parse::<Ipv6Addr>("node.snat_v6", a, "is not an IPv6 address"));
    node.tunnel_src_v4 =
        n.tunnel_src_v4.as_deref().and_then(|a| p.parse::<Ipv4Addr>("node.tunnel_src_v4", a, "is not an IPv4 address"));
    node.tunnel_src_v6 =
        n.tunnel_src_v6.as_deref().and_then(|a| p.parse::<Ipv6Addr>("node.tunnel_src_v6", a, "is not an IPv6 address"));
    let sources = [
        ("node.snat_v4", &n.snat_v4, node.snat_v4.map(IpAddr::V4)),
        ("node.snat_v6", &n.snat_v6, node.snat_v6.map(IpAddr::V6)),
        ("node.tunnel_src_v4", &n.tunnel_src_v4, node.tunnel_src_v4.map(IpAddr::V4)),
        ("node.tunnel_src_v6", &n.tunnel_src_v6, node.tunnel_src_v6.map(IpAddr::V6)),
    ];
    for (field, written, addr) in sources {
        if let (Some(written), Some(addr)) = (written, addr) {
            p.unicast(field, written, addr, "packets leave from it, so it must be a unicast address of this node");
        }
    }
    if let Some((lo, hi)) = n.snat_ports {
        let lo16 = p.u16_in("node.snat_ports[0]", lo, 1);
        let hi16 = p.u16_in("node.snat_ports[1]", hi, 1);
        if let (Some(lo), Some(hi)) = (lo16, hi16) {
            if lo > hi {
                p.push("node.snat_ports", format!("[{lo}, {hi}]"), "is an empty range (first must be <= second)");
            }
            node.snat_ports = (lo, hi);
        }
    }
    if let Some(mtu) = n.tunnel_mtu {
        node.tunnel_mtu = p.u16_in("node.tunnel_mtu", mtu, lb_core::forward::too_big::MIN_TUNNEL_MTU);
    }
    if let Some(n) = n.time_exceeded_per_second {
        match u32::try_from(n) {
            Ok(n) => node.time_exceeded_per_second = n,
            Err(_) => p.push("node.time_exceeded_per_second", n, "is out of range (0..=4294967295; 0 sends none)"),
        }
    }
    if let Some(seed) = n.hash_seed {
        node.hash_seed = seed;
    }
    let t = &n.timeouts;
    let d = Timeouts::default();
    let mut get = |name: &str, v: &Option<String>, default: Duration| {
        v.as_deref().and_then(|v| p.duration(&format!("node.timeouts.{name}"), v)).unwrap_or(default)
    };
    node.timeouts = Timeouts {
        tcp_syn: get("tcp_syn", &t.tcp_syn, d.tcp_syn),
        tcp_established: get("tcp_established", &t.tcp_established, d.tcp_established),
        tcp_fin: get("tcp_fin", &t.tcp_fin, d.tcp_fin),
        tcp_time_wait: get("tcp_time_wait", &t.tcp_time_wait, d.tcp_time_wait),
        udp: get("udp", &t.udp, d.udp),
    };
    node
}

fn validate_kubernetes(k: &FileKubernetes, p: &mut Problems) -> KubernetesSettings {
    let mut s = KubernetesSettings {
        kubeconfig: k.kubeconfig.clone(),
        node_name: k.node_name.clone(),
        node_zone: k.node_zone.clone(),
        service_proxy_name: k.service_proxy_name.clone().filter(|n| !n.is_empty()),
        ..Default::default()
    };
    for (i, a) in k.node_addresses.iter().enumerate() {
        let field = format!("kubernetes.node_addresses[{i}]");
        if let Some(ip) = p.parse::<IpAddr>(&field, a, "is not an IP address") {
            p.unicast(&field, a, ip, "NodePort services listen on it, so it must be a unicast address of this node");
            s.node_addresses.push(ip);
        }
    }
    if let Some(name) = &k.default_scheduler {
        match name.parse::<SchedulerKind>() {
            Ok(kind) => s.default_scheduler = kind,
            Err(e) => p.push("kubernetes.default_scheduler", quoted(name), strip_value(&e.to_string(), name)),
        }
    }
    let gue_port = k.gue_port.and_then(|g| p.u16_in("kubernetes.gue_port", g, 1));
    let mut mode_known = true;
    if let Some(mode) = &k.default_mode {
        match parse_mode(mode, gue_port) {
            Ok(ForwardMode::Dsr) => p.push("kubernetes.default_mode", quoted(mode), DSR_NEEDS_MACS),
            Ok(m) => s.default_mode = m,
            Err(e) => {
                p.push("kubernetes.default_mode", quoted(mode), e);
                mode_known = false;
            }
        }
    }
    // Only the default mode takes it: the mode annotation carries its own port (gue:PORT).
    if let Some(g) = k.gue_port
        && mode_known
        && !matches!(s.default_mode, ForwardMode::Gue { .. })
    {
        p.push("kubernetes.gue_port", g, "is only used with default_mode: gue");
    }
    if let Some(d) = &k.debounce {
        match parse_duration(d) {
            Some(v) if v <= MAX_DEBOUNCE => s.debounce = v,
            Some(_) => p.push(
                "kubernetes.debounce",
                quoted(d),
                format!("is longer than {}s: cluster changes would wait that long", MAX_DEBOUNCE.as_secs()),
            ),
            None => p.push("kubernetes.debounce", quoted(d), "is not a duration (e.g. 200ms)"),
        }
    }
    // (It goes into the feed's label selector, which the API server refuses, every list failing,
    // when the value is not one a label can have.)
    if let Some(name) = &s.service_proxy_name
        && !is_label_value(name)
    {
        p.push(
            "kubernetes.service_proxy_name",
            quoted(name),
            "is not a label value (at most 63 letters, digits, '-', '_' and '.', beginning and ending with a letter or digit)",
        );
    }
    if let Some(a) = &k.proxy_healthz {
        s.proxy_healthz =
            p.parse::<SocketAddr>("kubernetes.proxy_healthz", a, "is not ADDRESS:PORT (e.g. \"[::]:10256\")");
    }
    s
}

/// Whether `v` is a Kubernetes label value (apimachinery's `IsValidLabelValue`), non-empty.
fn is_label_value(v: &str) -> bool {
    let inner = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
    v.len() <= 63
        && v.starts_with(|c: char| c.is_ascii_alphanumeric())
        && v.ends_with(|c: char| c.is_ascii_alphanumeric())
        && v.chars().all(inner)
}

/// `UnknownScheduler`'s message starts with the value; keep only the explanation after it.
fn strip_value(msg: &str, value: &str) -> String {
    msg.replace(&format!("unknown scheduler {value:?}: "), "is not a scheduler: ")
}

fn validate_service(
    i: usize,
    s: &FileService,
    node: &NodeConfig,
    snat_from_node: SnatFromNode,
    keys: &mut HashSet<ServiceKey>,
    p: &mut Problems,
) -> Option<ServiceSpec> {
    let f = format!("services[{i}]");
    let before = p.0.len();
    // The name labels the service's metrics and logs: an empty one would leave them unnamed.
    if s.name.as_deref().is_some_and(|n| n.trim().is_empty()) {
        p.push(format!("{f}.name"), "\"\"", "is empty: leave it out to be named after the VIP, port and protocol");
    }
    let vip = p.parse::<IpAddr>(&format!("{f}.vip"), &s.vip, "is not an IP address");
    if let Some(v) = vip {
        p.unicast(&format!("{f}.vip"), &s.vip, v, "a VIP must be a unicast address a host holds");
    }
    let port = p.u16_in(&format!("{f}.port"), s.port, 1);
    let proto = match s.protocol.to_ascii_lowercase().as_str() {
        "tcp" => Some(Protocol::Tcp),
        "udp" => Some(Protocol::Udp),
        _ => {
            p.push(format!("{f}.protocol"), quoted(&s.protocol), "is not a protocol (tcp, udp)");
            None
        }
    };
    if let (Some(vip), Some(port), Some(proto)) = (vip, port, proto) {
        let key = ServiceKey { vip, port, proto };
        if !keys.insert(key) {
            p.push(f.clone(), key, "has the same VIP, port and protocol as an earlier service");
        }
    }
    let scheduler = match s.scheduler.parse::<SchedulerKind>() {
        Ok(k) => Some(k),
        Err(e) => {
            p.push(format!("{f}.scheduler"), quoted(&s.scheduler), strip_value(&e.to_string(), &s.scheduler));
            None
        }
    };
    let gue_port = s.gue_port.and_then(|g| p.u16_in(&format!("{f}.gue_port"), g, 1));
    let mode = match parse_mode(&s.mode, gue_port) {
        Ok(m) => Some(m),
        Err(e) => {
            // The annotation's form (`gue:6080`): the file takes the port in a field of its own.
            let e = match s.mode.trim().split_once(':') {
                Some((m, port)) if m.trim().eq_ignore_ascii_case("gue") => {
                    format!("{e}; in the file, write the port apart: mode: gue, gue_port: {}", port.trim())
                }
                _ => e,
            };
            p.push(format!("{f}.mode"), quoted(&s.mode), e);
            None
        }
    };
    if let (Some(g), Some(m)) = (s.gue_port, mode)
        && !matches!(m, ForwardMode::Gue { .. })
    {
        p.push(format!("{f}.gue_port"), g, "is only used with mode: gue");
    }
    let affinity_field = format!("{f}.affinity_timeout");
    let affinity_timeout = s.affinity_timeout.as_deref().and_then(|a| p.duration(&affinity_field, a));
    // Kept in whole seconds (lb-core would name it "0 s", which is not what was written, and would
    // cut 1500ms to 1 s without a word).
    if let (Some(d), Some(a)) = (affinity_timeout, &s.affinity_timeout) {
        if d < Duration::from_secs(1) {
            p.push(
                affinity_field,
                quoted(a),
                "is shorter than a second: affinity is kept in whole seconds (e.g. 1s, 3h)",
            );
        } else if d.subsec_nanos() != 0 {
            p.push(affinity_field, quoted(a), "is not whole seconds: affinity is kept in whole seconds (e.g. 1s, 3h)");
        }
    }
    let mut source_ranges = Vec::new();
    for (j, r) in s.source_ranges.iter().enumerate() {
        if let Some(c) = p.parse::<Cidr>(&format!("{f}.source_ranges[{j}]"), r, "is not a CIDR (e.g. 10.0.0.0/8)") {
            if let Some(v4) = c.ipv4_mapped() {
                p.push(
                    format!("{f}.source_ranges[{j}]"),
                    quoted(r),
                    format!("is an IPv4-mapped IPv6 prefix, which no packet comes from: write the IPv4 prefix {v4}"),
                );
            } else if vip.is_some_and(|v| v.is_ipv4() != c.addr().is_ipv4()) {
                p.push(format!("{f}.source_ranges[{j}]"), quoted(r), "is not of the VIP's address family");
            } else if let Some(host) = host_bits_set(r, &c) {
                p.push(
                    format!("{f}.source_ranges[{j}]"),
                    quoted(r),
                    format!("has host bits set: the prefix is {c} (write that, or {host} for the one address)"),
                );
            }
            source_ranges.push(c);
        }
    }
    let maglev_table_size = s.maglev_table_size.and_then(|n| {
        let size = maglev_table_size(n);
        if size.is_none() {
            p.push(
                format!("{f}.maglev_table_size"),
                n,
                format!("must be a prime no larger than {MAX_MAGLEV_TABLE_SIZE}"),
            );
        }
        size
    });
    if let (Some(n), Some(k)) = (s.maglev_table_size, scheduler)
        && !k.uses_maglev_table()
    {
        p.push(format!("{f}.maglev_table_size"), n, "is only used with scheduler mh, sh or dh (a Maglev table)");
    }
    let on_backend_removed = match &s.on_backend_removed {
        None => RemovedBackendPolicy::default(),
        Some(v) => parse_removed_policy(v).unwrap_or_else(|| {
            p.push(format!("{f}.on_backend_removed"), quoted(v), "is not a policy (reschedule, drop)");
            RemovedBackendPolicy::default()
        }),
    };
    if let (Some(v), Some(m)) = (vip, mode) {
        match (m, v) {
            (ForwardMode::Nat, IpAddr::V4(_)) if node.snat_v4.is_none() && !snat_from_node.v4 => {
                p.push(format!("{f}.mode"), "\"nat\"", "needs node.snat_v4 for an IPv4 VIP")
            }
            (ForwardMode::Nat, IpAddr::V6(_)) if node.snat_v6.is_none() && !snat_from_node.v6 => {
                p.push(format!("{f}.mode"), "\"nat\"", "needs node.snat_v6 for an IPv6 VIP")
            }
            (ForwardMode::IpIp | ForwardMode::Gue { .. }, IpAddr::V4(_)) if node.tunnel_src_v4.is_none() => {
                p.push(format!("{f}.mode"), quoted(&s.mode), "needs node.tunnel_src_v4 for an IPv4 VIP")
            }
            (ForwardMode::IpIp | ForwardMode::Gue { .. }, IpAddr::V6(_)) if node.tunnel_src_v6.is_none() => {
                p.push(format!("{f}.mode"), quoted(&s.mode), "needs node.tunnel_src_v6 for an IPv6 VIP")
            }
            _ => {}
        }
    }
    let health_check = s.health_check.as_ref().and_then(|h| validate_health(&format!("{f}.health_check"), h, p));

    let mut backends = Vec::new();
    let mut seen = HashSet::new();
    for (j, b) in s.backends.iter().enumerate() {
        let bf = format!("{f}.backends[{j}]");
        let addr = p.parse::<IpAddr>(&format!("{bf}.addr"), &b.addr, "is not an IP address");
        if let Some(a) = addr {
            p.unicast(&format!("{bf}.addr"), &b.addr, a, "a backend must be a unicast address a host holds");
        }
        let bport = match b.port {
            Some(bp) => p.u16_in(&format!("{bf}.port"), bp, 1),
            None => port,
        };
        let weight = if b.weight > MAX_WEIGHT {
            p.push(format!("{bf}.weight"), b.weight, format!("is out of range (0..={MAX_WEIGHT})"));
            None
        } else {
            u32::try_from(b.weight).ok()
        };
        let mac = b.mac.as_deref().and_then(|m| p.destination_mac(&format!("{bf}.mac"), m));
        if b.mac.is_none() && mode == Some(ForwardMode::Dsr) {
            p.push(
                format!("{bf}.mac"),
                "(none)",
                "is needed in dsr mode: the frame, still addressed to the VIP, goes to the backend's own MAC \
                 (node.gateway_mac would route it back to the VIP)",
            );
        } else if b.mac.is_none() && node.gateway_mac.is_none() {
            p.push(format!("{bf}.mac"), "(none)", "is needed when node.gateway_mac is not set");
        }
        let state = match b.state.as_deref().map(str::to_ascii_lowercase).as_deref() {
            None | Some("active") => BackendState::Active,
            Some("draining") => BackendState::Draining,
            Some(_) => {
                p.push(
                    format!("{bf}.state"),
                    quoted(b.state.as_deref().unwrap_or_default()),
                    "is not a state (active, draining)",
                );
                BackendState::Active
            }
        };
        // DSR too: its backend holds the VIP, so it is of the VIP's family (lb-core refuses it as well).
        if let (Some(a), Some(v)) = (addr, vip)
            && a.is_ipv4() != v.is_ipv4()
        {
            p.push(format!("{bf}.addr"), a, format!("is not of the VIP's address family ({v})"));
        }
        if let (Some(bp), Some(sp), Some(m)) = (bport, port, mode)
            && bp != sp
            && !matches!(m, ForwardMode::Nat)
        {
            p.push(format!("{bf}.port"), bp, format!("must equal the service port {sp} in {} mode", s.mode));
        }
        if let (Some(a), Some(bp)) = (addr, bport)
            && !seen.insert((a, bp))
        {
            p.push(bf.clone(), SocketAddr::new(a, bp), "appears twice in this service");
        }
        if let (Some(addr), Some(port), Some(weight)) = (addr, bport, weight) {
            backends.push(BackendConfig { addr, port, weight, mac, state });
        }
    }

    if p.0.len() != before {
        return None;
    }
    let key = ServiceKey { vip: vip?, port: port?, proto: proto? };
    let name = s.name.clone().unwrap_or_else(|| key.to_string());
    Some(ServiceSpec {
        config: ServiceConfig {
            name,
            key,
            backends,
            scheduler: scheduler?,
            mode: mode?,
            affinity_timeout,
            source_ranges,
            maglev_table_size,
            on_backend_removed,
            // A file's VIPs are the load balancer's own: on the clients' segment in an L2 deployment.
            answer_neighbours: true,
        },
        health_check,
    })
}

/// `written/len` with `c` what it parsed as: the address alone as a one-address prefix when the
/// written address is not `c`'s network (host bits set, which `Cidr` clears), `None` when it is.
fn host_bits_set(written: &str, c: &Cidr) -> Option<String> {
    let addr = written.trim().split_once('/')?.0.parse::<IpAddr>().ok()?;
    (addr != c.addr()).then(|| format!("{addr}/{}", if addr.is_ipv4() { 32 } else { 128 }))
}

fn validate_health(f: &str, h: &FileHealthCheck, p: &mut Problems) -> Option<HealthCheck> {
    let before = p.0.len();
    let probe = match h.kind.to_ascii_lowercase().as_str() {
        "tcp" => {
            if let Some(path) = &h.path {
                p.push(format!("{f}.path"), quoted(path), "is only used with type: http (a TCP check only connects)");
            }
            Probe::Tcp
        }
        "http" => {
            let path = h.path.clone().unwrap_or_else(|| "/".into());
            if !path.starts_with('/') || path.chars().any(|c| c.is_whitespace() || c.is_control()) {
                p.push(format!("{f}.path"), quoted(&path), "must start with / and hold no spaces");
            }
            Probe::Http { path }
        }
        _ => {
            p.push(format!("{f}.type"), quoted(&h.kind), "is not a probe type (tcp, http)");
            Probe::Tcp
        }
    };
    let mut hc = HealthCheck::with_defaults(probe);
    hc.port = h.port.and_then(|port| p.u16_in(&format!("{f}.port"), port, 1));
    if let Some(i) = &h.interval {
        hc.interval = p.duration(&format!("{f}.interval"), i).unwrap_or(hc.interval);
    }
    if let Some(t) = &h.timeout {
        hc.timeout = p.duration(&format!("{f}.timeout"), t).unwrap_or(hc.timeout);
    }
    // Below 100 ms a service's backends are probed in a storm; above an hour a dead one goes unseen
    // for hours. A timeout of 0 fails every probe (and the service fails open).
    if !(HEALTH_INTERVAL_MIN..=HEALTH_INTERVAL_MAX).contains(&hc.interval) {
        p.push(format!("{f}.interval"), format!("{:?}", hc.interval), "is out of range (100ms..=1h)");
    }
    if hc.timeout.is_zero() {
        p.push(format!("{f}.timeout"), "0s", "is 0: every probe would fail");
    } else if hc.timeout > hc.interval {
        p.push(
            format!("{f}.timeout"),
            format!("{:?}", hc.timeout),
            format!("is longer than the interval {:?}", hc.interval),
        );
    }
    for (name, v, slot) in [("rise", h.rise, &mut hc.rise), ("fall", h.fall, &mut hc.fall)] {
        if let Some(v) = v {
            match u32::try_from(v) {
                Ok(n) if (1..=100).contains(&n) => *slot = n,
                _ => p.push(format!("{f}.{name}"), v, "is out of range (1..=100)"),
            }
        }
    }
    if let Some(o) = &h.on_failure {
        hc.on_failure = match o.to_ascii_lowercase().as_str() {
            "drain" => FailurePolicy::Drain,
            "remove" => FailurePolicy::Remove,
            _ => {
                p.push(format!("{f}.on_failure"), quoted(o), "is not a policy (drain, remove)");
                FailurePolicy::Drain
            }
        };
    }
    (p.0.len() == before).then_some(hc)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example file of the module comment is one `lb run` takes, and says what it says: the
    /// keys and defaults a reader copies from it are real.
    #[test]
    fn the_module_comments_example_file_validates() {
        let example: String = include_str!("file.rs")
            .lines()
            .map_while(|l| l.strip_prefix("//!"))
            .skip_while(|l| l.trim() != "```yaml")
            .skip(1)
            .take_while(|l| l.trim() != "```")
            .map(|l| format!("{}\n", l.strip_prefix(' ').unwrap_or(l)))
            .collect();
        assert!(example.contains("services:"), "the example: {example}");
        let s = parse(&example).unwrap_or_else(|e| panic!("the module comment's example: {e}\n{example}"));
        assert_eq!(s.metrics_listen.map(|a| a.port()), Some(9472));
        assert_eq!(s.node.snat_ports, NodeConfig::default().snat_ports, "the example writes the default range");
        assert_eq!(s.node.time_exceeded_per_second, NodeConfig::default().time_exceeded_per_second, "and budget");
        assert_eq!(s.services.len(), 1);
        // `snat_v4: node`, as its comment offers: the node's first IPv4 of kubernetes.node_addresses.
        let written = example.lines().find(|l| l.trim_start().starts_with("snat_v4:")).unwrap();
        let address = written.split_whitespace().nth(1).unwrap();
        let mut s = parse(&example.replace(written, &written.replace(address, SNAT_FROM_NODE))).unwrap();
        s.fill_from_env(|_| None);
        let node_address = s.kubernetes.as_ref().unwrap().node_addresses.iter().find(|a| a.is_ipv4()).copied();
        assert_eq!(s.node.snat_v4.map(IpAddr::V4), node_address);
    }

    const GOOD: &str = r#"
node:
  local_mac: "02:00:00:00:00:01"
  gateway_mac: "02:00:00:00:00:fe"
  snat_v4: 10.0.0.2
  snat_v6: "fd00::2"
  tunnel_src_v4: 10.0.0.2
  snat_ports: [40000, 50000]
  hash_seed: 7
  time_exceeded_per_second: 50
  timeouts: { tcp_established: 15m, udp: 30s }
interfaces:
  - { name: eth0, queues: [0, 1] }
metrics: { listen: "127.0.0.1:9100" }
kubernetes: { node_name: node-a, node_zone: zone-a, node_addresses: [192.168.1.10, "fd00::10"], default_scheduler: wrr, debounce: 50ms, service_proxy_name: lb }
services:
  - name: web
    vip: 10.0.0.10
    port: 80
    scheduler: mh
    maglev_table_size: 65537
    affinity_timeout: 3h
    source_ranges: [10.0.0.0/8]
    on_backend_removed: drop
    health_check: { type: http, path: /healthz, interval: 2s, timeout: 500ms, rise: 2, fall: 3, on_failure: remove }
    backends:
      - { addr: 10.1.0.1, port: 8080, weight: 90 }
      - { addr: 10.1.0.2, port: 8080, weight: 10, state: draining, mac: "02:aa:bb:cc:dd:ee" }
  - vip: "fd00::10"
    port: 53
    protocol: udp
    scheduler: rr
    backends:
      - { addr: "fd00::1:1" }
  - name: dsr
    vip: 10.0.0.11
    port: 443
    mode: gue
    gue_port: 6080
    backends:
      - { addr: 10.2.0.1 }
"#;

    #[test]
    fn good_file_converts_every_field() {
        let s = parse(GOOD).unwrap();
        assert_eq!(s.node.local_mac, [2, 0, 0, 0, 0, 1]);
        assert_eq!(s.node.gateway_mac, Some([2, 0, 0, 0, 0, 0xfe]));
        assert_eq!(s.node.snat_v4, Some(Ipv4Addr::new(10, 0, 0, 2)));
        assert_eq!(s.node.snat_ports, (40000, 50000));
        assert_eq!(s.node.hash_seed, 7);
        assert_eq!(s.node.time_exceeded_per_second, 50);
        assert_eq!(s.node.timeouts.tcp_established, Duration::from_secs(900));
        assert_eq!(s.node.timeouts.udp, Duration::from_secs(30));
        assert_eq!(s.node.timeouts.tcp_syn, Timeouts::default().tcp_syn);
        assert_eq!(s.interfaces, vec![InterfaceConfig { name: "eth0".into(), queues: vec![0, 1] }]);
        assert_eq!(s.metrics_listen, Some("127.0.0.1:9100".parse().unwrap()));
        let k = s.kubernetes.unwrap();
        assert_eq!(k.node_name.as_deref(), Some("node-a"));
        assert_eq!(k.node_zone.as_deref(), Some("zone-a"));
        assert_eq!(k.service_proxy_name.as_deref(), Some("lb"));
        assert_eq!(k.node_addresses.len(), 2);
        assert_eq!(k.default_scheduler, SchedulerKind::WeightedRoundRobin);
        assert_eq!(k.debounce, Duration::from_millis(50));

        assert_eq!(s.services.len(), 3);
        let web = &s.services[0];
        assert_eq!(web.config.name, "web");
        assert_eq!(web.config.key.to_string(), "tcp 10.0.0.10:80");
        assert_eq!(web.config.scheduler, SchedulerKind::Maglev);
        assert_eq!(web.config.maglev_table_size, Some(65537));
        assert_eq!(web.config.affinity_timeout, Some(Duration::from_secs(3 * 3600)));
        assert_eq!(web.config.source_ranges, vec!["10.0.0.0/8".parse().unwrap()]);
        assert_eq!(web.config.on_backend_removed, RemovedBackendPolicy::Drop);
        assert_eq!(web.config.backends[0].weight, 90);
        assert_eq!(web.config.backends[1].state, BackendState::Draining);
        assert_eq!(web.config.backends[1].mac, Some([2, 0xaa, 0xbb, 0xcc, 0xdd, 0xee]));
        let hc = web.health_check.as_ref().unwrap();
        assert_eq!(hc.probe, Probe::Http { path: "/healthz".into() });
        assert_eq!((hc.rise, hc.fall, hc.on_failure), (2, 3, FailurePolicy::Remove));
        assert_eq!(hc.timeout, Duration::from_millis(500));

        let dns = &s.services[1];
        assert_eq!(dns.config.name, "udp [fd00::10]:53");
        assert_eq!(dns.config.backends[0].port, 53, "backend port defaults to the service port");
        assert_eq!(dns.config.backends[0].weight, 1);
        assert_eq!(s.services[2].config.mode, ForwardMode::Gue { port: 6080 });
    }

    #[test]
    fn out_of_range_weight_names_field_and_value() {
        let yaml = r#"
node: { snat_v4: 10.0.0.2 }
services:
  - { vip: 10.0.0.1, port: 80, backends: [{ addr: 10.1.0.1 }] }
  - { vip: 10.0.0.2, port: 80, backends: [{ addr: 10.1.0.1 }] }
  - { vip: 10.0.0.3, port: 80, backends: [{ addr: 10.1.0.1 }, { addr: 10.1.0.2, weight: 70000 }] }
"#;
        let err = parse(yaml).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("services[2].backends[1].weight: 70000 is out of range (0..=65535)"), "{msg}");
    }

    #[test]
    fn every_problem_is_listed_at_once() {
        let yaml = r#"
node: { local_mac: "zz:00", snat_ports: [5000, 4000] }
metrics: { listen: "nowhere" }
services:
  - vip: 10.0.0.300
    port: 0
    protocol: sctp
    scheduler: lblc
    mode: teleport
    source_ranges: [10.0.0.0/40]
    maglev_table_size: 65536
    health_check: { type: icmp, rise: 0, interval: 1s, timeout: 2s }
    backends: [{ addr: 10.1.0.1, state: sleepy }]
  - { vip: 10.0.0.1, port: 80, mode: dsr, backends: [{ addr: 10.1.0.1, port: 8080 }, { addr: 10.1.0.1, port: 8080 }] }
  - { vip: 10.0.0.1, port: 80, mode: dsr }
  - { vip: 10.0.0.2, port: 80, backends: [{ addr: "fd00::1" }] }
  - { name: " ", vip: 10.0.0.3, port: 80, backends: [{ addr: 10.1.0.3 }], health_check: { type: tcp, interval: 1ms } }
  - { vip: 10.0.0.4, port: 80, backends: [{ addr: 10.1.0.4 }], health_check: { type: tcp, interval: 2h, timeout: 0s } }
"#;
        let Err(ConfigError::Invalid(errs)) = parse(yaml) else { panic!("expected Invalid") };
        let fields: Vec<&str> = errs.iter().map(|e| e.field.as_str()).collect();
        for want in [
            "node.local_mac",
            "node.snat_ports",
            "metrics.listen",
            "services[0].vip",
            "services[0].port",
            "services[0].protocol",
            "services[0].scheduler",
            "services[0].mode",
            "services[0].source_ranges[0]",
            "services[0].maglev_table_size",
            "services[0].health_check.type",
            "services[0].health_check.timeout",
            "services[0].health_check.rise",
            "services[0].backends[0].state",
            "services[1].backends[0].port",
            "services[1].backends[1]",
            "services[2]",
            "services[3].mode",
            "services[3].backends[0].addr",
            "services[4].name",
            "services[4].health_check.interval",
            "services[5].health_check.interval",
            "services[5].health_check.timeout",
        ] {
            assert!(fields.contains(&want), "missing {want} in {errs:#?}");
        }
        let dup = errs.iter().find(|e| e.field == "services[1].backends[1]").unwrap();
        assert_eq!(dup.to_string(), "services[1].backends[1]: 10.1.0.1:8080 appears twice in this service");
        let sched = errs.iter().find(|e| e.field == "services[0].scheduler").unwrap();
        assert!(sched.to_string().starts_with("services[0].scheduler: \"lblc\" is not a scheduler"), "{sched}");
    }

    /// `kubernetes.proxy_healthz`: off unless written; an address that is none is refused naming the
    /// field; a change needs a restart (the port is bound once).
    #[test]
    fn proxy_healthz_is_an_address_and_off_by_default() {
        let file = |extra: &str| format!("node: {{ gateway_mac: \"02:00:00:00:00:fe\" }}\nkubernetes: {{ {extra} }}\n");
        assert_eq!(parse(&file("")).unwrap().kubernetes.unwrap().proxy_healthz, None);
        let on = parse(&file("proxy_healthz: \"[::]:10256\"")).unwrap();
        assert_eq!(on.kubernetes.as_ref().unwrap().proxy_healthz, Some("[::]:10256".parse().unwrap()));
        let msg = parse(&file("proxy_healthz: 10256")).unwrap_err().to_string();
        assert!(msg.contains("kubernetes.proxy_healthz: \"10256\" is not ADDRESS:PORT"), "{msg}");
        let off = parse(&file("")).unwrap();
        assert!(off.restart_needed(&on).contains(&"kubernetes.proxy_healthz"), "{:?}", off.restart_needed(&on));
    }

    /// `node.time_exceeded_per_second` is the worker's budget of ICMP time exceeded errors: 0 (none
    /// sent) is taken; a budget beyond a 32-bit count is refused naming the field.
    #[test]
    fn a_time_exceeded_budget_is_taken_within_its_range() {
        let yaml = |n: &str| format!("node: {{ time_exceeded_per_second: {n} }}\n");
        assert_eq!(parse(&yaml("0")).unwrap().node.time_exceeded_per_second, 0);
        assert_eq!(parse(&yaml("4294967295")).unwrap().node.time_exceeded_per_second, u32::MAX);
        let err = parse(&yaml("4294967296")).unwrap_err().to_string();
        assert!(
            err.contains("node.time_exceeded_per_second: 4294967296 is out of range (0..=4294967295; 0 sends none)"),
            "{err}"
        );
        assert!(parse(&yaml("-1")).is_err());
    }

    /// A debounce beyond a minute is refused with its field, so the feed never computes a deadline
    /// past the clock's end (u64::MAX seconds used to pass and panic the feed task).
    #[test]
    fn debounce_longer_than_a_minute_is_refused() {
        let file =
            |d: &str| format!("node: {{ gateway_mac: \"02:00:00:00:00:fe\" }}\nkubernetes: {{ debounce: {d} }}\n");
        assert_eq!(parse(&file("60s")).unwrap().kubernetes.unwrap().debounce, MAX_DEBOUNCE);
        assert_eq!(parse(&file("0ms")).unwrap().kubernetes.unwrap().debounce, Duration::ZERO);
        for too_long in ["61s", "2m", "18446744073709551615s"] {
            let Err(ConfigError::Invalid(errs)) = parse(&file(too_long)) else { panic!("{too_long} accepted") };
            assert_eq!(errs.len(), 1, "{errs:?}");
            let msg = errs[0].to_string();
            assert!(msg.starts_with(&format!("kubernetes.debounce: \"{too_long}\" is longer than 60s")), "{msg}");
        }
    }

    /// `service_proxy_name` goes into the feed's label selector: a value no label can have (which
    /// the API server would refuse there, failing every list) is refused in the file.
    #[test]
    fn a_service_proxy_name_must_be_a_label_value() {
        let file = |n: &str| {
            format!("node: {{ gateway_mac: \"02:00:00:00:00:fe\" }}\nkubernetes: {{ service_proxy_name: \"{n}\" }}\n")
        };
        for good in ["lb", "lb-1.example_x", &"a".repeat(63)] {
            assert_eq!(parse(&file(good)).unwrap().kubernetes.unwrap().service_proxy_name.as_deref(), Some(good));
        }
        for bad in ["my proxy", "-lb", "lb.", "a,b", "x=y", &"a".repeat(64)] {
            let Err(ConfigError::Invalid(errs)) = parse(&file(bad)) else { panic!("{bad:?} accepted") };
            assert!(errs[0].to_string().starts_with("kubernetes.service_proxy_name: "), "{errs:?}");
        }
    }

    /// A file with one service on `vip`, port 80, and one backend at `backend`.
    fn one_service_file(vip: &str, backend: &str) -> String {
        format!(
            "node: {{ snat_v4: 10.0.0.2, snat_v6: \"fd00::2\", gateway_mac: \"02:00:00:00:00:fe\" }}\n\
             services: [{{ vip: \"{vip}\", port: 80, backends: [{{ addr: \"{backend}\" }}] }}]\n"
        )
    }

    /// A VIP or a backend must be an address a packet can be sent to or received for: the
    /// unspecified address, broadcast and multicast are refused with the field and the value, as a
    /// mistyped address must not become a service that steers or forwards to nowhere (or everywhere).
    #[test]
    fn unusable_vip_and_backend_addresses_are_refused() {
        for (vip, backend, field) in [
            ("0.0.0.0", "10.1.0.1", "services[0].vip"),
            ("255.255.255.255", "10.1.0.1", "services[0].vip"),
            ("224.0.0.5", "10.1.0.1", "services[0].vip"),
            ("::", "fd00::1", "services[0].vip"),
            ("ff02::1", "fd00::1", "services[0].vip"),
            ("10.0.0.1", "0.0.0.0", "services[0].backends[0].addr"),
            ("10.0.0.1", "255.255.255.255", "services[0].backends[0].addr"),
            ("10.0.0.1", "224.0.0.1", "services[0].backends[0].addr"),
            ("fd00::10", "::", "services[0].backends[0].addr"),
            ("fd00::10", "ff02::1", "services[0].backends[0].addr"),
        ] {
            match parse(&one_service_file(vip, backend)) {
                Err(ConfigError::Invalid(errs)) => {
                    assert!(errs.iter().any(|e| e.field == field), "{vip} / {backend}: {errs:?}")
                }
                other => panic!("vip {vip}, backend {backend} accepted: {other:?}"),
            }
        }
    }

    /// Loopback and IPv4-mapped addresses never cross the wire either, as VIPs or backends; the
    /// node's source addresses and the Kubernetes node addresses (NodePort VIPs) are held to the
    /// same rule. Each problem names the field, the value and what the address is.
    #[test]
    fn loopback_mapped_and_node_addresses_are_refused() {
        for (vip, backend, want) in [
            ("127.0.0.1", "10.1.0.1", "services[0].vip: \"127.0.0.1\" is a loopback address; a VIP must be"),
            ("::1", "fd00::1", "services[0].vip: \"::1\" is a loopback address"),
            ("::ffff:10.0.0.1", "fd00::1", "services[0].vip: \"::ffff:10.0.0.1\" is an IPv4-mapped IPv6 address"),
            ("10.0.0.1", "127.0.0.2", "services[0].backends[0].addr: \"127.0.0.2\" is a loopback address; a backend"),
            ("fd00::10", "::1", "services[0].backends[0].addr: \"::1\" is a loopback address"),
            ("fd00::10", "::ffff:10.1.0.1", "services[0].backends[0].addr: \"::ffff:10.1.0.1\" is an IPv4-mapped"),
        ] {
            let msg = parse(&one_service_file(vip, backend)).unwrap_err().to_string();
            assert!(msg.contains(want), "{vip} / {backend}: {msg}");
        }
        assert!(parse(&one_service_file("192.0.2.10", "10.1.0.1")).is_ok());

        let yaml = "node: { snat_v4: 0.0.0.0, snat_v6: \"::1\", tunnel_src_v4: 224.0.0.1, tunnel_src_v6: \"ff02::1\", \
                    gateway_mac: \"02:00:00:00:00:fe\" }\nkubernetes: { node_addresses: [127.0.0.1, 192.168.1.10] }\n";
        let Err(ConfigError::Invalid(errs)) = parse(yaml) else { panic!("unusable node addresses accepted") };
        let fields: Vec<&str> = errs.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "node.snat_v4",
                "node.snat_v6",
                "node.tunnel_src_v4",
                "node.tunnel_src_v6",
                "kubernetes.node_addresses[0]"
            ],
            "{errs:?}"
        );
        assert_eq!(
            errs[0].to_string(),
            "node.snat_v4: \"0.0.0.0\" is the unspecified address; packets leave from it, so it must be a unicast \
             address of this node"
        );
    }

    /// A setting that the rest of the entry makes meaningless is refused, not dropped: `path` on a TCP
    /// check (the user meant `type: http` and would get a bare connect check), `gue_port` on a service
    /// that is not GUE, `maglev_table_size` on a scheduler without a Maglev table.
    #[test]
    fn settings_the_entry_cannot_use_are_refused() {
        let file = |service: &str| {
            format!("node: {{ snat_v4: 10.0.0.2, gateway_mac: \"02:00:00:00:00:fe\" }}\nservices: [{service}]\n")
        };
        for (service, field) in [
            (
                "{ vip: 10.0.0.1, port: 80, health_check: { type: tcp, path: /healthz } }",
                "services[0].health_check.path",
            ),
            ("{ vip: 10.0.0.1, port: 80, mode: nat, gue_port: 6080 }", "services[0].gue_port"),
            ("{ vip: 10.0.0.1, port: 80, scheduler: rr, maglev_table_size: 65537 }", "services[0].maglev_table_size"),
        ] {
            match parse(&file(service)) {
                Err(ConfigError::Invalid(errs)) => {
                    assert!(errs.iter().any(|e| e.field == field), "{service}: {errs:?}")
                }
                other => panic!("{service} accepted: {other:?}"),
            }
        }
    }

    /// DSR leaves the frame addressed to the VIP, so only the backend's own MAC can take it: a DSR
    /// backend without `mac` is refused even with `node.gateway_mac` set (the gateway would route the
    /// frame back to the VIP), and so is DSR as the Kubernetes feed's default mode (endpoints have no
    /// MAC). Other modes still go through the gateway.
    #[test]
    fn dsr_backends_need_their_own_mac() {
        let node = "node: { snat_v4: 10.0.0.2, tunnel_src_v4: 10.0.0.3, gateway_mac: \"02:00:00:00:00:fe\" }\n";
        let service = |mode: &str, mac: &str| {
            format!(
                "{node}services: [{{ vip: 10.0.0.1, port: 80, mode: {mode}, backends: [{{ addr: 10.1.0.1{mac} }}] }}]\n"
            )
        };
        let msg = parse(&service("dsr", "")).unwrap_err().to_string();
        assert!(msg.contains("services[0].backends[0].mac: (none) is needed in dsr mode"), "{msg}");
        parse(&service("dsr", ", mac: \"02:00:00:00:01:01\"")).expect("a DSR backend with its MAC");
        for mode in ["nat", "ipip"] {
            parse(&service(mode, "")).unwrap_or_else(|e| panic!("{mode} through the gateway: {e}"));
        }
        let msg = parse(&format!("{node}kubernetes: {{ default_mode: dsr }}\n")).unwrap_err().to_string();
        assert!(msg.contains("kubernetes.default_mode: \"dsr\" cannot be dsr"), "{msg}");
        assert!(msg.contains("Kubernetes endpoints have none"), "{msg}");
    }

    /// What each refusal says, and the entries that use those settings still pass: `path` with an
    /// HTTP check, `gue_port` with GUE (a service's, or the Kubernetes default mode's), the table size
    /// with each Maglev-table scheduler.
    #[test]
    fn settings_the_entry_uses_pass_and_the_others_say_where_they_belong() {
        let file = |service: &str| {
            format!(
                "node: {{ snat_v4: 10.0.0.2, tunnel_src_v4: 10.0.0.3, gateway_mac: \"02:00:00:00:00:fe\" }}\n\
                 services: [{service}]\n"
            )
        };
        for (service, want) in [
            (
                "{ vip: 10.0.0.1, port: 80, health_check: { type: tcp, path: /healthz } }",
                "services[0].health_check.path: \"/healthz\" is only used with type: http",
            ),
            (
                "{ vip: 10.0.0.1, port: 80, mode: ipip, gue_port: 6080 }",
                "services[0].gue_port: 6080 is only used with mode: gue",
            ),
            (
                "{ vip: 10.0.0.1, port: 80, scheduler: hrw, maglev_table_size: 251 }",
                "services[0].maglev_table_size: 251 is only used with scheduler mh, sh or dh",
            ),
        ] {
            let msg = parse(&file(service)).unwrap_err().to_string();
            assert!(msg.contains(want), "{service}: {msg}");
        }
        for service in [
            "{ vip: 10.0.0.1, port: 80, health_check: { type: http, path: /healthz } }",
            "{ vip: 10.0.0.1, port: 80, mode: gue, gue_port: 6080 }",
            "{ vip: 10.0.0.1, port: 80, scheduler: mh, maglev_table_size: 251 }",
            "{ vip: 10.0.0.1, port: 80, scheduler: sh, maglev_table_size: 251 }",
            "{ vip: 10.0.0.1, port: 80, scheduler: dh, maglev_table_size: 251 }",
        ] {
            parse(&file(service)).unwrap_or_else(|e| panic!("{service}: {e}"));
        }

        let k8s = |section: &str| format!("node: {{ gateway_mac: \"02:00:00:00:00:fe\" }}\nkubernetes: {section}\n");
        let msg = parse(&k8s("{ gue_port: 6080 }")).unwrap_err().to_string();
        assert!(msg.contains("kubernetes.gue_port: 6080 is only used with default_mode: gue"), "{msg}");
        let msg = parse(&k8s("{ default_mode: dsr, gue_port: 6080 }")).unwrap_err().to_string();
        assert!(msg.contains("kubernetes.gue_port: 6080"), "{msg}");
        let k = parse(&k8s("{ default_mode: gue, gue_port: 6080 }")).unwrap().kubernetes.unwrap();
        assert_eq!(k.default_mode, ForwardMode::Gue { port: 6080 });
    }

    /// A `kubernetes:` section turned off with `enabled: false` is still checked: a bad value in it is
    /// reported now, not when the section is turned back on (which then also needs a restart).
    #[test]
    fn a_disabled_kubernetes_section_is_still_validated() {
        let yaml = "kubernetes: { enabled: false, debounce: soon, node_addresses: [node-a], default_mode: teleport }\n";
        match parse(yaml) {
            Err(ConfigError::Invalid(errs)) => {
                let fields: Vec<&str> = errs.iter().map(|e| e.field.as_str()).collect();
                for want in ["kubernetes.debounce", "kubernetes.node_addresses[0]", "kubernetes.default_mode"] {
                    assert!(fields.contains(&want), "missing {want} in {errs:?}");
                }
            }
            other => panic!("bad values in a disabled kubernetes section accepted: {other:?}"),
        }
    }

    /// A valid section turned off leaves the feed off, and asks nothing of the rest of the file
    /// (the feed's need for node.gateway_mac).
    #[test]
    fn a_valid_disabled_kubernetes_section_leaves_the_feed_off() {
        let s = parse("kubernetes: { enabled: false, debounce: 1s, node_addresses: [192.168.1.10] }\n").unwrap();
        assert!(s.kubernetes.is_none());
    }

    /// A backend of the other address family is refused by the file's own validation in every
    /// mode, DSR included (lb-core refuses it too: the backend must hold the VIP), so the error
    /// names the field like every other problem of the file, listed with the rest.
    #[test]
    fn a_backend_of_the_other_family_is_refused_in_every_mode() {
        for mode in ["nat", "dsr", "ipip", "gue, gue_port: 6080"] {
            let yaml = format!(
                "node: {{ snat_v4: 10.0.0.2, tunnel_src_v4: 10.0.0.3, gateway_mac: \"02:00:00:00:00:fe\" }}\n\
                 services: [{{ vip: 10.0.0.1, port: 80, mode: {mode}, backends: [{{ addr: \"fd00::1\" }}] }}]\n"
            );
            let msg = parse(&yaml).map(|_| ()).unwrap_err().to_string();
            assert!(
                msg.contains("services[0].backends[0].addr: fd00::1 is not of the VIP's address family (10.0.0.1)"),
                "{mode}: {msg}"
            );
        }
    }

    /// A table size beyond the limit is refused by its size alone: the primality test is trial
    /// division, which for a prime near 2^64 (18446744073709551557) ran for minutes, then
    /// overflowed, while the control loop waited on it.
    #[test]
    fn a_table_size_beyond_the_limit_is_refused_without_a_primality_test() {
        for n in ["18446744073709551557", "1048583"] {
            let yaml = format!(
                "node: {{ snat_v4: 10.0.0.2, gateway_mac: \"02:00:00:00:00:fe\" }}\n\
                 services: [{{ vip: 10.0.0.1, port: 80, maglev_table_size: {n} }}]\n"
            );
            let msg = parse(&yaml).map(|_| ()).unwrap_err().to_string();
            assert!(
                msg.contains(&format!("services[0].maglev_table_size: {n} must be a prime no larger than")),
                "{msg}"
            );
        }
    }

    /// An affinity timeout under a second, or with a fraction of one, is refused as written: affinity
    /// is kept in whole seconds, lb-core's refusal of what it came to would say "0 s", and 1500ms was
    /// kept as 1 s.
    #[test]
    fn an_affinity_timeout_under_a_second_is_refused_as_written() {
        let file = |t: &str| {
            format!(
                "node: {{ snat_v4: 10.0.0.2, gateway_mac: \"02:00:00:00:00:fe\" }}\nservices: [{{ vip: 10.0.0.1, port: \
                 80, affinity_timeout: {t} }}]\n"
            )
        };
        let msg = parse(&file("500ms")).unwrap_err().to_string();
        assert!(msg.contains("services[0].affinity_timeout: \"500ms\" is shorter than a second"), "{msg}");
        assert_eq!(parse(&file("1s")).unwrap().services[0].config.affinity_timeout, Some(Duration::from_secs(1)));
        // Nor a fraction above a second, which was cut to the whole seconds without a word.
        let msg = parse(&file("1500ms")).unwrap_err().to_string();
        assert!(msg.contains("services[0].affinity_timeout: \"1500ms\" is not whole seconds"), "{msg}");
        assert_eq!(parse(&file("2000ms")).unwrap().services[0].config.affinity_timeout, Some(Duration::from_secs(2)));
    }

    /// A source range with host bits set (`10.1.2.3/8`) is refused, naming the prefix it would have
    /// been, rather than widened without a word to the whole network: an allowlist written
    /// `192.168.1.10/16` for one client let 65 536 in. Written as the network, it passes.
    #[test]
    fn a_source_range_with_host_bits_set_is_refused() {
        let file = |range: &str| {
            format!(
                "node: {{ snat_v4: 10.0.0.2, snat_v6: \"fd00::2\", gateway_mac: \"02:00:00:00:00:fe\" }}\n\
                 services:\n  - {{ vip: 10.0.0.1, port: 80, source_ranges: [\"{range}\"] }}\n  \
                 - {{ vip: \"fd00::1\", port: 80, source_ranges: [\"fd00:1::1/64\"] }}\n"
            )
        };
        for (range, want) in [
            ("10.1.2.3/8", "services[0].source_ranges[0]: \"10.1.2.3/8\" has host bits set: the prefix is 10.0.0.0/8"),
            ("192.168.1.10/16", "\"192.168.1.10/16\" has host bits set: the prefix is 192.168.0.0/16"),
        ] {
            let msg = parse(&file(range)).map(|_| ()).unwrap_err().to_string();
            assert!(msg.contains(want), "{range}: {msg}");
            assert!(
                msg.contains(
                    "services[1].source_ranges[0]: \"fd00:1::1/64\" has host bits set: the prefix is fd00:1::/64"
                ),
                "{msg}"
            );
        }
        let yaml = "node: { snat_v4: 10.0.0.2, gateway_mac: \"02:00:00:00:00:fe\" }\n\
                    services: [{ vip: 10.0.0.1, port: 80, source_ranges: [10.0.0.0/8, 10.1.2.3, 0.0.0.0/0] }]\n";
        let ranges = &parse(yaml).unwrap().services[0].config.source_ranges;
        assert_eq!(
            ranges.iter().map(ToString::to_string).collect::<Vec<_>>(),
            ["10.0.0.0/8", "10.1.2.3/32", "0.0.0.0/0"]
        );
    }

    /// An IPv4-mapped IPv6 source range (`::ffff:10.0.0.0/104`) is refused, naming the IPv4 prefix
    /// to write: no IPv6 packet comes from a mapped address, so on an IPv6 VIP it let no client in
    /// (and on an IPv4 VIP it was only "not of the VIP's address family").
    #[test]
    fn an_ipv4_mapped_source_range_is_refused_naming_the_ipv4_prefix() {
        for vip in ["10.0.0.1", "\"fd00::1\""] {
            let yaml = format!(
                "node: {{ snat_v4: 10.0.0.2, snat_v6: \"fd00::2\", gateway_mac: \"02:00:00:00:00:fe\" }}\n\
                 services: [{{ vip: {vip}, port: 80, source_ranges: [\"::ffff:10.0.0.0/104\", \"::ffff:192.0.2.7\"] }}]\n"
            );
            let msg = parse(&yaml).map(|_| ()).unwrap_err().to_string();
            for (i, range, ipv4) in [(0, "::ffff:10.0.0.0/104", "10.0.0.0/8"), (1, "::ffff:192.0.2.7", "192.0.2.7/32")]
            {
                let want = format!(
                    "services[0].source_ranges[{i}]: \"{range}\" is an IPv4-mapped IPv6 prefix, which no packet comes \
                     from: write the IPv4 prefix {ipv4}"
                );
                assert!(msg.contains(&want), "VIP {vip}: {msg}");
            }
        }
    }

    /// A MAC no frame can be sent to (all zeros, a placeholder; broadcast, which floods every
    /// frame) is refused as a gateway or backend MAC, and a group MAC as the node's own (no frame may
    /// come from one), each naming the field; as is a MAC with a sign in it (`+2`, which the number
    /// parser took for 2).
    #[test]
    fn macs_no_frame_can_use_are_refused() {
        let file = |node_mac: &str, gateway: &str, backend: &str| {
            format!(
                "node: {{ local_mac: \"{node_mac}\", gateway_mac: \"{gateway}\", snat_v4: 10.0.0.2 }}\n\
                 services: [{{ vip: 10.0.0.1, port: 80, backends: [{{ addr: 10.1.0.1, mac: \"{backend}\" }}] }}]\n"
            )
        };
        let good = "02:00:00:00:00:01";
        for (node_mac, gateway, backend, want) in [
            (good, "00:00:00:00:00:00", good, "node.gateway_mac: \"00:00:00:00:00:00\" is all zeros"),
            (good, "ff:ff:ff:ff:ff:ff", good, "node.gateway_mac: \"ff:ff:ff:ff:ff:ff\" is the broadcast MAC"),
            (good, good, "00-00-00-00-00-00", "services[0].backends[0].mac: \"00-00-00-00-00-00\" is all zeros"),
            (good, good, "FF:FF:FF:FF:FF:FF", "services[0].backends[0].mac: \"FF:FF:FF:FF:FF:FF\" is the broadcast"),
            ("01:00:5e:00:00:01", good, good, "node.local_mac: \"01:00:5e:00:00:01\" is a group (multicast) MAC"),
            ("00:00:00:00:00:00", good, good, "node.local_mac: \"00:00:00:00:00:00\" is all zeros"),
            (good, "+2:00:00:00:00:fe", good, "node.gateway_mac: \"+2:00:00:00:00:fe\" is not a MAC address"),
        ] {
            let msg = parse(&file(node_mac, gateway, backend)).map(|_| ()).unwrap_err().to_string();
            assert!(msg.contains(want), "{want}: {msg}");
        }
        // A multicast next hop is not refused (a cluster MAC, as NLB's multicast mode uses).
        assert!(parse(&file(good, "03:bf:0a:00:00:01", "01:00:5e:00:00:09")).is_ok());
    }

    /// Flow collections nested deeper than the YAML reader's own limit (128 levels, which it checks
    /// only after reading the whole file) are refused before the file is read: the reader's time grows
    /// with the square of the depth, so a 100 KB file of brackets held `lb run` (a start, or every
    /// reload of the file) for a minute before "recursion limit exceeded". The timeout only turns
    /// that stall into a failure. Brackets in quoted strings and comments do not count.
    #[test]
    fn a_deeply_nested_file_is_refused_at_once() {
        let depth = 50_000;
        let yaml = format!("node: {{}}\nservices: {}{}\n", "[".repeat(depth), "]".repeat(depth));
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(parse(&yaml).map(|_| ()).map_err(|e| e.to_string()));
        });
        let err = rx.recv_timeout(Duration::from_secs(10)).expect("the file is judged").unwrap_err();
        assert_eq!(err, format!("line 2: collections nest deeper than {MAX_NESTING} levels"));
        // At the limit, the reader judges the file as ever.
        let at_limit = format!("services: {}{}\n", "[".repeat(MAX_NESTING), "]".repeat(MAX_NESTING));
        assert!(matches!(parse(&at_limit), Err(ConfigError::Syntax(_))));
        let brackets = "[".repeat(MAX_NESTING + 1);
        let quoted = format!(
            "# {brackets}\nnode: {{ snat_v4: 10.0.0.2, gateway_mac: \"02:00:00:00:00:fe\" }}\n\
             services: [{{ name: \"{brackets}\", vip: 10.0.0.1, port: 80, backends: [{{ addr: 10.1.0.1 }}] }},\n\
             {{ name: '{brackets}', vip: 10.0.0.2, port: 80, backends: [{{ addr: 10.1.0.1 }}] }}]\n"
        );
        assert_eq!(parse(&quoted).unwrap().services[0].config.name, brackets);
    }

    #[test]
    fn unknown_key_is_a_syntax_error_with_its_name() {
        let err = parse("services:\n  - { vip: 10.0.0.1, port: 80, wieght: 3 }\n").unwrap_err();
        assert!(matches!(err, ConfigError::Syntax(_)));
        assert!(err.to_string().contains("wieght"), "{err}");
    }

    /// A section written with nothing under it (its fields left to their defaults, or commented
    /// out), which YAML reads as null, is that section empty, not no section: `kubernetes:` turns the
    /// feed on with every default, as `kubernetes: {}` does, and a `metrics:` or `health_check:`
    /// without its required field is refused, naming it, instead of being dropped without a word.
    #[test]
    fn a_section_with_nothing_under_it_is_an_empty_section() {
        let s =
            parse("node: { gateway_mac: \"02:00:00:00:00:fe\" }\nkubernetes:\n  # defaults: mh, nat, 200ms\n").unwrap();
        assert_eq!(s.kubernetes, Some(KubernetesSettings::default()), "the feed is on");

        let err = parse("metrics:\n").map(|_| ()).unwrap_err().to_string();
        assert!(err.contains("listen"), "{err}");
        let yaml = "node: { snat_v4: 10.0.0.2, gateway_mac: \"02:00:00:00:00:fe\" }\n\
                    services:\n  - vip: 10.0.0.1\n    port: 80\n    health_check:\n";
        let err = parse(yaml).map(|_| ()).unwrap_err().to_string();
        assert!(err.contains("type"), "{err}");
    }

    /// A mode written as the annotation writes it (README's mode table: `gue:PORT`) says how the
    /// file takes the port. Before: only "is not a forwarding mode (nat, dsr, ipip, gue)".
    #[test]
    fn a_gue_mode_written_with_its_port_says_to_use_gue_port() {
        let yaml = "node: { tunnel_src_v4: 10.0.0.2, gateway_mac: \"02:00:00:00:00:fe\" }\n\
                    services: [{ vip: 10.0.0.1, port: 80, mode: \"gue:6080\", backends: [{ addr: 10.1.0.1 }] }]\n";
        let err = parse(yaml).map(|_| ()).unwrap_err().to_string();
        assert!(err.contains("services[0].mode: \"gue:6080\"") && err.contains("mode: gue, gue_port: 6080"), "{err}");
    }

    #[test]
    fn empty_file_is_empty_config() {
        let s = parse("").unwrap();
        assert!(s.services.is_empty());
        assert_eq!(s.node, NodeConfig::default());
        assert!(s.kubernetes.is_none());
    }

    #[test]
    fn small_parsers() {
        assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("10800"), Some(Duration::from_secs(10800)));
        assert_eq!(parse_duration("2 h"), Some(Duration::from_secs(7200)));
        assert_eq!(parse_duration("2d"), None);
        assert_eq!(parse_duration("s"), None);
        assert_eq!(parse_mac("02-00-00-00-00-0A"), Some([2, 0, 0, 0, 0, 10]));
        assert_eq!(parse_mac("02:00:00:00:00"), None);
        assert_eq!(parse_mac("02:00:00:00:00:00:00"), None);
        assert_eq!([65537, 251, 65536, 1].map(maglev_table_size), [Some(65537), Some(251), None, None]);
    }
}
