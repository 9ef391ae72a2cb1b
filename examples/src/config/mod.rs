//! The binary's desired state, before health checks and before lb-core sees it.
//!
//! ```text
//!  YAML file (file.rs) ──┐
//!                        ├─► Settings / ServiceSpec ──► control loop: + health overlay ──► lb_core::config::Config
//!  Kubernetes (k8s/) ────┘                                                                  └► TableBuilder ─► workers
//! ```
//! [`Settings`] is what the file says (node, static services, interfaces, metrics, Kubernetes);
//! [`ServiceSpec`] is one lb-core [`ServiceConfig`] plus what only the control side needs (its health
//! check). Both sources produce `ServiceSpec`s, so health checks, metrics and listing treat them alike.

pub mod file;
pub mod reload;

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use lb_core::config::{ForwardMode, NodeConfig, SchedulerKind, ServiceConfig, SpecialAddress};

pub use file::{ConfigError, FieldError};

/// A health probe for every backend of one service.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct HealthCheck {
    /// What the probe does.
    pub probe: Probe,
    /// Port to probe; `None` probes the backend's own port.
    pub port: Option<u16>,
    /// Time between two probes of one backend.
    pub interval: Duration,
    /// How long one probe may take before it counts as failed.
    pub timeout: Duration,
    /// Consecutive successes that bring a failed backend back.
    pub rise: u32,
    /// Consecutive failures that take a healthy backend out.
    pub fall: u32,
    /// What a failed backend becomes.
    pub on_failure: FailurePolicy,
}

impl HealthCheck {
    /// A probe with the defaults used when only its kind is given (2 s interval, 1 s timeout,
    /// rise 2, fall 3, drain on failure), as HAProxy and keepalived use.
    pub fn with_defaults(probe: Probe) -> Self {
        HealthCheck {
            probe,
            port: None,
            interval: Duration::from_secs(2),
            timeout: Duration::from_secs(1),
            rise: 2,
            fall: 3,
            on_failure: FailurePolicy::Drain,
        }
    }
}

/// The kind of health probe.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Probe {
    /// A TCP connect that completes within the timeout.
    Tcp,
    /// An HTTP/1.1 GET of `path` that answers 2xx or 3xx within the timeout.
    Http {
        /// Request path, starting with `/`.
        path: String,
    },
}

/// What a backend that failed its health check becomes. Neither applies while every backend of the
/// service that would take new flows is down: the service then fails open (`health`'s module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum FailurePolicy {
    /// Draining: no new flows, established flows stay (the safe default for TCP). In a UDP service,
    /// removed as by [`FailurePolicy::Remove`]: a UDP flow whose client keeps sending never idles
    /// out, and would stay on the dead backend.
    #[default]
    Drain,
    /// Removed: established flows follow the service's `on_backend_removed` policy.
    Remove,
}

/// One service as the control side knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceSpec {
    /// What lb-core gets.
    pub config: ServiceConfig,
    /// The health check of its backends, if any.
    pub health_check: Option<HealthCheck>,
}

/// One NIC and the queues the load balancer serves on it (one poll loop per queue).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InterfaceConfig {
    /// Interface name, e.g. `eth0`.
    pub name: String,
    /// Queue ids.
    pub queues: Vec<u32>,
}

/// How the Kubernetes feed runs and how it maps Services (see `k8s::translate`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KubernetesSettings {
    /// Kubeconfig to use; `None` uses the in-cluster service account or `$KUBECONFIG`.
    pub kubeconfig: Option<PathBuf>,
    /// This node's name (endpoint `nodeName`), for `externalTrafficPolicy: Local` and same-node
    /// topology hints.
    pub node_name: Option<String>,
    /// This node's zone (its `topology.kubernetes.io/zone` label), for same-zone topology hints
    /// (`trafficDistribution: PreferClose`, `service.kubernetes.io/topology-mode: Auto`).
    pub node_zone: Option<String>,
    /// This node's addresses, on which NodePort services listen.
    pub node_addresses: Vec<IpAddr>,
    /// The `service.kubernetes.io/service-proxy-name` this feed answers to: `None` serves the
    /// Services without that label (as kube-proxy does), `Some(name)` only those labelled `name`
    /// (to run beside kube-proxy on Services set aside for it, as Cilium's `serviceProxyName`).
    pub service_proxy_name: Option<String>,
    /// Scheduler of Services without the scheduler annotation.
    pub default_scheduler: SchedulerKind,
    /// Forwarding mode of Services without the mode annotation.
    pub default_mode: ForwardMode,
    /// How long the feed waits for more changes before it rebuilds the configuration.
    pub debounce: Duration,
    /// Where to answer kube-proxy's own `/healthz` and `/livez` (its `--healthz-bind-address`,
    /// `[::]:10256`), which cloud load balancers check for `externalTrafficPolicy: Cluster`
    /// Services, on nodes where `lb` replaces kube-proxy; `None` (the default) leaves the port to
    /// kube-proxy.
    pub proxy_healthz: Option<SocketAddr>,
    /// The SNAT addresses the file leaves to the node (`node.snat_v4: node`, `node.snat_v6: node`):
    /// [`Settings::fill_from_env`] takes this node's first address of the family from
    /// `node_addresses`, so one file (a DaemonSet's ConfigMap) gives each node its own.
    pub snat_from_node: SnatFromNode,
}

/// Which families' SNAT address is this node's own address ([`KubernetesSettings::snat_from_node`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SnatFromNode {
    /// `node.snat_v4: node`.
    pub v4: bool,
    /// `node.snat_v6: node`.
    pub v6: bool,
}

impl Default for KubernetesSettings {
    fn default() -> Self {
        KubernetesSettings {
            kubeconfig: None,
            node_name: None,
            node_zone: None,
            node_addresses: Vec::new(),
            service_proxy_name: None,
            default_scheduler: SchedulerKind::Maglev,
            default_mode: ForwardMode::Nat,
            debounce: Duration::from_millis(200),
            proxy_healthz: None,
            snat_from_node: SnatFromNode::default(),
        }
    }
}

/// Everything the configuration file says.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Settings {
    /// Node-wide settings handed to lb-core.
    pub node: NodeConfig,
    /// Services written in the file.
    pub services: Vec<ServiceSpec>,
    /// Interfaces and queues to serve.
    pub interfaces: Vec<InterfaceConfig>,
    /// Address of the HTTP endpoint serving `/metrics` and `/state`.
    pub metrics_listen: Option<SocketAddr>,
    /// The Kubernetes feed, when enabled.
    pub kubernetes: Option<KubernetesSettings>,
}

impl Settings {
    /// What differs between `self` (the running file) and `new` that only a restart applies: the
    /// Kubernetes feed on or off and its kubeconfig (the client is built once), the interfaces and
    /// queues (the poll loops start once), the metrics address (bound once), and the SNAT addresses
    /// and port range. Empty if none.
    ///
    /// SNAT settings in use need a restart, NAT services or not: a live NAT flow keeps the port it
    /// was given and is rewritten with the current address, replies to the old address are no
    /// longer taken for NAT replies, and each poll loop's port share would move, so flows in
    /// progress would break. Whether some NAT flow is live is not known here (a Service can turn
    /// NAT with any cluster update, and flows outlive their service), so the rule does not depend
    /// on the services. A family without a SNAT address has no NAT flow, though: its first one may
    /// be added, and a node with none may change the range (`lb run` then checks the new settings
    /// against the kernel's ephemeral ports, as it checks the file's at start).
    pub fn restart_needed(&self, new: &Settings) -> Vec<&'static str> {
        let mut fields = Vec::new();
        match (&self.kubernetes, &new.kubernetes) {
            (Some(_), None) | (None, Some(_)) => fields.push("kubernetes (the feed on or off)"),
            (Some(a), Some(b)) if a.kubeconfig != b.kubeconfig => fields.push("kubernetes.kubeconfig"),
            (Some(a), Some(b)) if a.proxy_healthz != b.proxy_healthz => fields.push("kubernetes.proxy_healthz"),
            _ => {}
        }
        if self.interfaces != new.interfaces {
            fields.push("interfaces");
        }
        if self.metrics_listen != new.metrics_listen {
            fields.push("metrics.listen");
        }
        // A family without a SNAT address has no NAT flows, so one may be added (the first NAT
        // service of that family then needs no restart); one in use may not change or go. Without
        // any, no NAT flow holds a port either.
        let (old, node) = (&self.node, &new.node);
        if old.snat_v4.is_some() && old.snat_v4 != node.snat_v4 {
            fields.push("node.snat_v4 (NAT flows in progress would break)");
        }
        if old.snat_v6.is_some() && old.snat_v6 != node.snat_v6 {
            fields.push("node.snat_v6 (NAT flows in progress would break)");
        }
        if (old.snat_v4.is_some() || old.snat_v6.is_some()) && old.snat_ports != node.snat_ports {
            fields.push("node.snat_ports (NAT flows in progress would break, and the poll loops' port shares move)");
        }
        fields
    }

    /// Fills what the file left out of the Kubernetes settings from the downward API's environment:
    /// `NODE_NAME` (spec.nodeName) and `NODE_IPS` (status.hostIPs, comma-separated), and `NODE_ZONE`
    /// (which the downward API cannot give: set it from the node's zone label when deploying).
    /// Unparsable addresses, and those no NodePort could be served on (loopback, multicast and the
    /// like, which the file refuses in `kubernetes.node_addresses`), are skipped with a warning.
    /// A SNAT address the file leaves to the node (`node.snat_v4: node`) is then the node's first
    /// address of its family; with none, it stays unset (warned), and NAT Services of that family
    /// are refused.
    pub fn fill_from_env(&mut self, var: impl Fn(&str) -> Option<String>) {
        let Some(k) = self.kubernetes.as_mut() else { return };
        if k.node_name.is_none() {
            k.node_name = var("NODE_NAME").filter(|n| !n.is_empty());
        }
        if k.node_zone.is_none() {
            k.node_zone = var("NODE_ZONE").filter(|n| !n.is_empty());
        }
        if k.node_addresses.is_empty()
            && let Some(ips) = var("NODE_IPS")
        {
            for ip in ips.split([',', ' ']).filter(|s| !s.is_empty()) {
                match ip.parse::<IpAddr>() {
                    Ok(addr) => match SpecialAddress::of(addr) {
                        None => k.node_addresses.push(addr),
                        Some(kind) => tracing::warn!(value = ip, "NODE_IPS address skipped: it is {kind}"),
                    },
                    Err(_) => tracing::warn!(value = ip, "NODE_IPS holds something that is not an IP address"),
                }
            }
        }
        let first = |v4: bool| k.node_addresses.iter().copied().find(|a| a.is_ipv4() == v4);
        if k.snat_from_node.v4 && self.node.snat_v4.is_none() {
            match first(true) {
                Some(IpAddr::V4(a)) => self.node.snat_v4 = Some(a),
                _ => tracing::warn!(
                    "node.snat_v4 is the node's address, but it has none of IPv4 (kubernetes.node_addresses, $NODE_IPS)"
                ),
            }
        }
        if k.snat_from_node.v6 && self.node.snat_v6.is_none() {
            match first(false) {
                Some(IpAddr::V6(a)) => self.node.snat_v6 = Some(a),
                _ => tracing::warn!(
                    "node.snat_v6 is the node's address, but it has none of IPv6 (kubernetes.node_addresses, $NODE_IPS)"
                ),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_fills_only_what_the_file_left_out() {
        let env = |k: &str| match k {
            "NODE_NAME" => Some("node-a".to_string()),
            "NODE_IPS" => Some("192.168.1.10,fd00::10,bogus,127.0.0.1,::1,224.0.0.1".to_string()),
            "NODE_ZONE" => Some("zone-a".to_string()),
            _ => None,
        };
        let mut s = Settings { kubernetes: Some(KubernetesSettings::default()), ..Default::default() };
        s.fill_from_env(env);
        let k = s.kubernetes.as_ref().unwrap();
        assert_eq!(k.node_name.as_deref(), Some("node-a"));
        assert_eq!(k.node_zone.as_deref(), Some("zone-a"));
        assert_eq!(k.node_addresses, vec!["192.168.1.10".parse::<IpAddr>().unwrap(), "fd00::10".parse().unwrap()]);

        let mut s = Settings {
            kubernetes: Some(KubernetesSettings { node_name: Some("file".into()), ..Default::default() }),
            ..Default::default()
        };
        s.fill_from_env(env);
        assert_eq!(s.kubernetes.unwrap().node_name.as_deref(), Some("file"), "the file wins");
    }

    /// `node.snat_v4: node` / `snat_v6: node` is the node's first address of the family, from the
    /// Kubernetes settings: one file serves every node, each NAT-ing to its own address. A NAT
    /// service of the file takes it as written; without the kubernetes section there is no address
    /// to take.
    #[test]
    fn a_snat_address_left_to_the_node_is_its_own() {
        let yaml = |k8s: &str| {
            format!(
                "node: {{ snat_v4: node, snat_v6: node, gateway_mac: \"02:00:00:00:00:fe\" }}\n{k8s}\
                 services: [{{ vip: 10.0.0.10, port: 80, backends: [{{ addr: 10.1.0.1 }}] }}]\n"
            )
        };
        let text = yaml("kubernetes: { node_name: n }\n");
        let mut s = crate::config::file::parse(&text).unwrap();
        assert_eq!((s.node.snat_v4, s.node.snat_v6), (None, None), "filled in later");
        s.fill_from_env(|k| (k == "NODE_IPS").then(|| "fd00::10,192.168.1.10,192.168.1.11".to_string()));
        assert_eq!(s.node.snat_v4, Some("192.168.1.10".parse().unwrap()));
        assert_eq!(s.node.snat_v6, Some("fd00::10".parse().unwrap()));

        let mut s = crate::config::file::parse(&text).unwrap();
        s.fill_from_env(|k| (k == "NODE_IPS").then(|| "192.168.1.12".to_string()));
        assert_eq!((s.node.snat_v4, s.node.snat_v6), (Some("192.168.1.12".parse().unwrap()), None), "no IPv6 address");

        let err = crate::config::file::parse(&yaml("")).unwrap_err().to_string();
        assert!(
            err.contains("node.snat_v4") && err.contains("node.snat_v6") && err.contains("kubernetes section"),
            "{err}"
        );
    }
}
