//! What both control-side fuzz targets share: the control loop as `lb run` drives it, publishing
//! to a sink that refuses the deliveries the input picks, and a YAML writer for configuration files
//! built from arbitrary values (field names and values the validation knows, and odd ones: big and
//! negative numbers, huge lists, duplicate keys, deep nesting).

use std::fmt::Write as _;
use std::sync::Arc;

use arbitrary::Arbitrary;
use lb_core::service::Tables;
use lb_examples::config::Settings;
use lb_examples::control::{Control, ControlError, ControlInput, TablesSink};

/// A sink that keeps the last tables it took (no worker runs), and refuses the deliveries
/// `refusals` picks, as `lb run`'s does when a poll loop has gone: the n-th (from 0) when bit
/// `n % 8` is set.
pub struct Sink {
    refusals: u8,
    /// Deliveries so far, refused or taken.
    deliveries: u32,
    /// The tables last taken: what the workers run.
    taken: Option<Arc<Tables>>,
    /// Why the last delivery was refused, if it was.
    last_refused: Option<String>,
    /// Whether a delivery was refused since the last taken: what the workers hold is not known.
    refused_since_taken: bool,
}

impl Sink {
    /// One refusing the deliveries `refusals` picks (none for 0).
    pub fn new(refusals: u8) -> Self {
        Sink { refusals, deliveries: 0, taken: None, last_refused: None, refused_since_taken: false }
    }
}

impl TablesSink for Sink {
    fn publish(&mut self, tables: &Arc<Tables>) -> Result<(), String> {
        let n = self.deliveries;
        self.deliveries += 1;
        if (self.refusals >> (n % 8)) & 1 == 1 {
            let why = format!("delivery {n} refused");
            self.last_refused = Some(why.clone());
            self.refused_since_taken = true;
            return Err(why);
        }
        self.taken = Some(tables.clone());
        self.last_refused = None;
        self.refused_since_taken = false;
        Ok(())
    }
}

fn same(a: &Option<Arc<Tables>>, b: &Option<Arc<Tables>>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => Arc::ptr_eq(a, b),
        (None, None) => true,
        _ => false,
    }
}

/// One runtime for every input: the control loop must be created inside one (its probe tasks).
pub fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
    RT.get_or_init(|| tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime"))
}

/// `settings` without health checks: a probe would connect to the backends' addresses, and no
/// fuzz input may send a packet anywhere. Health is the health checker's own concern, not the
/// build's.
pub fn without_probes(mut settings: Settings) -> Settings {
    for s in &mut settings.services {
        s.health_check = None;
    }
    settings
}

/// A fresh control loop publishing to a [`Sink`] refusing the deliveries `refusals` picks, fed
/// `inputs` in order. An input is taken or refused whole: one refused says why, is counted
/// (`rejected`, `last_error`) and leaves the running tables as they were (the next input builds on
/// them); one taken runs the tables it returns and is counted (`applied`) if they were delivered.
/// What the live state says runs is what the sink took last; an input refused for its delivery
/// says the sink's reason; and after a refused delivery, the next input that is taken is delivered
/// (what the workers hold is not known), even if it changes nothing.
pub fn drive(refusals: u8, inputs: impl IntoIterator<Item = ControlInput>) {
    let _guard = runtime().enter();
    let mut control = Control::new(Sink::new(refusals));
    let live = control.subscribe();
    for input in inputs {
        let (before, applied, rejected) = {
            let l = live.borrow();
            (l.tables.clone(), l.applied, l.rejected)
        };
        let deliveries = control.sink().deliveries;
        let result = control.apply(input);
        let sink = control.sink();
        let delivered = sink.deliveries > deliveries;
        let l = live.borrow();
        assert!(same(&l.tables, &sink.taken), "the live tables are not those the sink took last");
        match result {
            Ok(tables) => {
                assert!(l.tables.as_ref().is_some_and(|r| Arc::ptr_eq(r, &tables)), "taken, but other tables run");
                assert!(sink.last_refused.is_none() || !delivered, "taken, but its delivery was refused");
                assert!(
                    delivered || !sink.refused_since_taken,
                    "taken undelivered after a refused delivery: the workers may not run them"
                );
                assert_eq!((l.applied, l.rejected), (applied + u64::from(delivered), rejected));
            }
            Err(e) => {
                assert!(!e.to_string().is_empty());
                assert!(same(&before, &l.tables), "refused ({e}), but the running tables changed");
                assert_eq!((l.applied, l.rejected), (applied, rejected + 1), "refused ({e})");
                let last = l.last_error.as_deref().unwrap_or_default();
                assert!(!last.is_empty() && e.to_string().contains(last), "refused ({e}), last_error {last:?}");
                if let ControlError::Publish(why) = &e {
                    assert!(delivered && sink.last_refused.as_ref() == Some(why), "{e}, but no such refusal");
                }
            }
        }
    }
}

/// A field name the file knows, or any other key.
#[derive(Debug, Clone, Arbitrary)]
pub enum Key {
    Known(Field),
    Other(String),
}

/// Every key of the configuration file, at whatever level.
#[derive(Debug, Clone, Copy, Arbitrary)]
pub enum Field {
    Node,
    Interfaces,
    Metrics,
    Kubernetes,
    Services,
    LocalMac,
    GatewayMac,
    SnatV4,
    SnatV6,
    SnatPorts,
    TunnelSrcV4,
    TunnelSrcV6,
    TunnelMtu,
    TimeExceededPerSecond,
    HashSeed,
    Timeouts,
    TcpSyn,
    TcpEstablished,
    TcpFin,
    TcpTimeWait,
    Udp,
    Name,
    Queues,
    Listen,
    Enabled,
    Kubeconfig,
    NodeName,
    NodeZone,
    NodeAddresses,
    ServiceProxyName,
    DefaultScheduler,
    DefaultMode,
    GuePort,
    Debounce,
    Vip,
    Port,
    Protocol,
    Scheduler,
    Mode,
    AffinityTimeout,
    SourceRanges,
    MaglevTableSize,
    OnBackendRemoved,
    HealthCheck,
    Backends,
    Addr,
    Weight,
    Mac,
    State,
    Type,
    Path,
    Interval,
    Timeout,
    Rise,
    Fall,
    OnFailure,
}

impl Field {
    fn name(self) -> &'static str {
        use Field::*;
        match self {
            Node => "node",
            Interfaces => "interfaces",
            Metrics => "metrics",
            Kubernetes => "kubernetes",
            Services => "services",
            LocalMac => "local_mac",
            GatewayMac => "gateway_mac",
            SnatV4 => "snat_v4",
            SnatV6 => "snat_v6",
            SnatPorts => "snat_ports",
            TunnelSrcV4 => "tunnel_src_v4",
            TunnelSrcV6 => "tunnel_src_v6",
            TunnelMtu => "tunnel_mtu",
            TimeExceededPerSecond => "time_exceeded_per_second",
            HashSeed => "hash_seed",
            Timeouts => "timeouts",
            TcpSyn => "tcp_syn",
            TcpEstablished => "tcp_established",
            TcpFin => "tcp_fin",
            TcpTimeWait => "tcp_time_wait",
            Udp => "udp",
            Name => "name",
            Queues => "queues",
            Listen => "listen",
            Enabled => "enabled",
            Kubeconfig => "kubeconfig",
            NodeName => "node_name",
            NodeZone => "node_zone",
            NodeAddresses => "node_addresses",
            ServiceProxyName => "service_proxy_name",
            DefaultScheduler => "default_scheduler",
            DefaultMode => "default_mode",
            GuePort => "gue_port",
            Debounce => "debounce",
            Vip => "vip",
            Port => "port",
            Protocol => "protocol",
            Scheduler => "scheduler",
            Mode => "mode",
            AffinityTimeout => "affinity_timeout",
            SourceRanges => "source_ranges",
            MaglevTableSize => "maglev_table_size",
            OnBackendRemoved => "on_backend_removed",
            HealthCheck => "health_check",
            Backends => "backends",
            Addr => "addr",
            Weight => "weight",
            Mac => "mac",
            State => "state",
            Type => "type",
            Path => "path",
            Interval => "interval",
            Timeout => "timeout",
            Rise => "rise",
            Fall => "fall",
            OnFailure => "on_failure",
        }
    }
}

/// Values the validation judges: addresses, CIDRs, MACs, names, numbers and durations at and past
/// their limits.
#[rustfmt::skip]
pub const WORDS: &[&str] = &[
    "10.0.0.10", "10.0.0.2", "10.1.0.1", "10.1.0.2", "192.0.2.1", "2001:db8::1", "fd00::1", "fd00::2",
    "0.0.0.0", "255.255.255.255", "224.0.0.1", "127.0.0.1", "::", "::1", "ff02::1", "::ffff:10.0.0.1",
    "10.0.0.0/8", "10.1.2.3/8", "0.0.0.0/0", "::/0", "10.0.0.0/33", "fd00::/129", "fd00::/64", "10.0.0.0/-1",
    "02:00:00:00:00:fe", "02:00:00:00:00:01", "ff:ff:ff:ff:ff:ff", "00:00:00:00:00:00", "01:00:5e:00:00:01",
    "02-00-00-00-00-02", "mh", "maglev", "hrw", "ecmp", "rr", "wrr", "lc", "wlc", "sh", "dh", "sed", "nq",
    "nat", "dsr", "ipip", "gue", "gue:6080", "tun", "tcp", "udp", "sctp", "http", "drain", "remove", "draining",
    "active", "reschedule", "drop", "node", "1048573", "1048576", "1048583", "65537", "655373", "251", "2",
    "1", "0", "65535", "65536", "4294967295", "4294967296", "18446744073709551615", "18446744073709551557",
    "-1", "-9223372036854775808", "1e400", "0x10", "1.5", "500ms", "0s", "0ms", "2s", "15m", "3h",
    "18446744073709551615h", "18446744073709551615ms", "99999999999999999999s", "/healthz", "/", "eth0",
    "lo", "veth-with-a-long-name", "127.0.0.1:9472", "[::1]:9472", "true", "false", "~", "null", "yes",
    "61000", "32768", "60999", "1280", "68",
];

/// The largest file [`FileSpec::yaml`] writes; a larger one is `None`. What a file of up to this
/// size asks for is judged against its size.
pub const MAX_TEXT: usize = 256 << 10;

/// A YAML value.
#[derive(Debug, Clone, Arbitrary)]
pub enum Value {
    /// One of [`WORDS`], quoted (a string) or not (whatever YAML reads it as).
    Word(u8, bool),
    Int(i64),
    Uint(u64),
    /// A number of this many digits.
    Huge(u8),
    Text(String),
    List(Vec<Value>),
    Map(Vec<(Key, Value)>),
    /// The value repeated this many times in a list.
    Repeat(Box<Value>, u16),
    /// This many nested lists.
    Nested(u16),
    /// This many backends (or, under `services`, services) that differ from each other, with the
    /// given fields added to each.
    Many(u16, Vec<(Key, Value)>),
    Null,
}

impl Value {
    /// Writes the value as flow-style YAML (`{k: v}`, `[a, b]`); `services` is whether a
    /// [`Value::Many`] makes services rather than backends.
    pub fn write(&self, out: &mut String, services: bool) {
        // Past the limit the text is thrown away: stop writing it.
        if out.len() > MAX_TEXT {
            return;
        }
        match self {
            Value::Word(i, quoted) => {
                let w = WORDS[usize::from(*i) % WORDS.len()];
                if *quoted {
                    let _ = write!(out, "{w:?}");
                } else {
                    out.push_str(w);
                }
            }
            Value::Int(n) => {
                let _ = write!(out, "{n}");
            }
            Value::Uint(n) => {
                let _ = write!(out, "{n}");
            }
            Value::Huge(n) => {
                out.push('1');
                out.extend(std::iter::repeat_n('0', usize::from(*n)));
            }
            // A JSON string is a YAML double-quoted scalar.
            Value::Text(s) => out.push_str(&serde_json::to_string(s).unwrap_or_default()),
            Value::List(items) => {
                out.push('[');
                for (i, v) in items.iter().enumerate() {
                    if i > 0 {
                        out.push_str(", ");
                    }
                    v.write(out, false);
                }
                out.push(']');
            }
            Value::Map(fields) => write_map(out, fields),
            Value::Repeat(v, n) => {
                out.push('[');
                for i in 0..*n {
                    if out.len() > MAX_TEXT {
                        break;
                    }
                    if i > 0 {
                        out.push_str(", ");
                    }
                    v.write(out, false);
                }
                out.push(']');
            }
            Value::Nested(n) => {
                let n = usize::from(*n).min(MAX_TEXT);
                out.extend(std::iter::repeat_n('[', n));
                out.extend(std::iter::repeat_n(']', n));
            }
            Value::Many(n, extra) => {
                out.push('[');
                for i in 0..u32::from(*n) {
                    if out.len() > MAX_TEXT {
                        break;
                    }
                    if i > 0 {
                        out.push_str(", ");
                    }
                    let [_, a, b, c] = i.to_be_bytes();
                    if services {
                        let _ = write!(out, "{{vip: 10.{a}.{b}.{}, port: 80", u16::from(c) + 1);
                        let _ = write!(out, ", backends: [{{addr: 10.200.0.1}}, {{addr: 10.200.0.2}}]");
                    } else {
                        let _ = write!(out, "{{addr: 10.{}.{b}.{c}", u16::from(a) + 1);
                    }
                    for (k, v) in extra {
                        out.push_str(", ");
                        write_key(out, k);
                        out.push_str(": ");
                        v.write(out, false);
                    }
                    out.push('}');
                }
                out.push(']');
            }
            Value::Null => out.push('~'),
        }
    }
}

fn write_key(out: &mut String, k: &Key) {
    match k {
        Key::Known(f) => out.push_str(f.name()),
        Key::Other(s) => out.push_str(&serde_json::to_string(s).unwrap_or_default()),
    }
}

fn write_map(out: &mut String, fields: &[(Key, Value)]) {
    out.push('{');
    for (i, (k, v)) in fields.iter().enumerate() {
        if i > 0 {
            out.push_str(", ");
        }
        write_key(out, k);
        out.push_str(": ");
        v.write(out, matches!(k, Key::Known(Field::Services)));
    }
    out.push('}');
}

/// A configuration file: its sections with the fields the fuzzer chose (in block style at the top,
/// so a section may appear twice), each service with a VIP and port unless the fuzzer gives its
/// own, and backends.
#[derive(Debug, Arbitrary)]
pub struct FileSpec {
    pub node: Vec<(Key, Value)>,
    pub kubernetes: Option<Vec<(Key, Value)>>,
    pub interfaces: Vec<Vec<(Key, Value)>>,
    pub services: Vec<ServiceSpec>,
    /// Extra top-level entries, written after the sections (a second `services:` is a duplicate key).
    pub extra: Vec<(Key, Value)>,
}

/// One service of a [`FileSpec`].
#[derive(Debug, Arbitrary)]
pub struct ServiceSpec {
    pub vip: u8,
    pub fields: Vec<(Key, Value)>,
    pub backends: Vec<Vec<(Key, Value)>>,
}

impl FileSpec {
    /// The file's text, if no larger than [`MAX_TEXT`].
    pub fn yaml(&self) -> Option<String> {
        let mut out = String::new();
        out.push_str("node: ");
        let mut node = vec![
            (Key::Known(Field::SnatV4), Value::Word(1, false)),
            (Key::Known(Field::GatewayMac), Value::Word(24, true)),
        ];
        node.extend(self.node.iter().cloned());
        write_map(&mut out, &node);
        out.push('\n');
        if let Some(k) = &self.kubernetes {
            out.push_str("kubernetes: ");
            write_map(&mut out, k);
            out.push('\n');
        }
        if !self.interfaces.is_empty() {
            out.push_str("interfaces:\n");
            for i in &self.interfaces {
                out.push_str("  - ");
                write_map(&mut out, i);
                out.push('\n');
            }
        }
        if !self.services.is_empty() {
            out.push_str("services:\n");
            for s in &self.services {
                let _ = write!(out, "  - {{vip: 10.0.0.{}, port: 80", s.vip);
                if !s.backends.is_empty() {
                    out.push_str(", backends: [");
                    for (j, b) in s.backends.iter().enumerate() {
                        if j > 0 {
                            out.push_str(", ");
                        }
                        let _ = write!(out, "{{addr: 10.1.0.{}", j % 250 + 1);
                        for (k, v) in b {
                            out.push_str(", ");
                            write_key(&mut out, k);
                            out.push_str(": ");
                            v.write(&mut out, false);
                        }
                        out.push('}');
                    }
                    out.push(']');
                }
                for (k, v) in &s.fields {
                    out.push_str(", ");
                    write_key(&mut out, k);
                    out.push_str(": ");
                    v.write(&mut out, matches!(k, Key::Known(Field::Services)));
                }
                out.push_str("}\n");
            }
        }
        for (k, v) in &self.extra {
            write_key(&mut out, k);
            out.push_str(": ");
            v.write(&mut out, matches!(k, Key::Known(Field::Services)));
            out.push('\n');
        }
        (out.len() <= MAX_TEXT).then_some(out)
    }
}
