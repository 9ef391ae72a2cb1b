//! The pure translation from Kubernetes Services and EndpointSlices to load-balancer services.
//!
//! One Kubernetes Service port becomes one lb-core service per address it is reachable on, as
//! kube-proxy programs it:
//!
//! | reachable on | key | backends | source ranges |
//! |---|---|---|---|
//! | each `spec.clusterIPs` (dual-stack) | (cluster IP, `port`) | `internalTrafficPolicy` | - |
//! | each `spec.externalIPs` | (IP, `port`) | `externalTrafficPolicy` | - |
//! | every node address (NodePort and LoadBalancer) | (node address, `nodePort`) | `externalTrafficPolicy` | - |
//! | `spec.loadBalancerIP`, `status.loadBalancer.ingress[].ip` (`ipMode` `VIP` or unset) | (IP, `port`) | `externalTrafficPolicy` | `loadBalancerSourceRanges` of the IP's family |
//!
//! With the neighbour responder on (an L2 deployment), ARP / NDP is answered, announced and joined
//! a group for on external and load-balancer IPs only (`ServiceConfig::answer_neighbours`), as
//! MetalLB-L2 answers for load-balancer IPs: a cluster IP is in the cluster's service range, which
//! no client on the segment asks for (the cluster routes it), and a NodePort's node address is the
//! node's own, which its kernel answers for.
//!
//! Only addresses of the Service's IP families (those of its cluster IPs) are keys, as kube-proxy runs
//! one proxier per family; an external or load-balancer IP of another family is reported.
//!
//! Source ranges are split by family as kube-proxy's `MapCIDRsByIPFamily` does: an IPv6 key gets the
//! IPv6 ranges only, and an IPv4-mapped IPv6 range (`::ffff:10.0.0.0/104`) is the IPv4 range it maps;
//! IPv4 octets with leading zeros, which the API server accepts, are read as decimal, as there. When
//! the Service lists ranges but none of the key's family, the key allows every client, as kube-proxy
//! (which then installs no firewall for that family) does: an IPv4-only list on a dual-stack Service
//! leaves its IPv6 load-balancer IPs open. Dropping them all instead would diverge from every other
//! node's kube-proxy; list ranges of both families to restrict both.
//!
//! An ingress IP with any other `ipMode` (`Proxy`, KEP-1860) is not served, as kube-proxy does not
//! program it: that cloud load balancer proxies to the nodes itself (TLS, PROXY protocol) and
//! in-cluster clients of the IP must reach it rather than be short-circuited to the endpoints here.
//! A `spec.loadBalancerIP` that the status lists with such a mode is left out for the same reason.
//! One the status does not list (nor `spec.externalIPs`) is only a request, which the cloud may have
//! ignored and kube-proxy does not serve: it is served only while the status gives the Service no
//! address at all (no controller assigns them), and its keys yield to every key another Service
//! claims otherwise.
//!
//! Backends come from the EndpointSlices labelled `kubernetes.io/service-name` whose `addressType` is
//! the key's address family (an address of the other family in a slice is left out, as each of
//! kube-proxy's per-family proxiers reads only its type's slices), on the slice port with the Service
//! port's name (the slice port already holds the resolved `targetPort`). Endpoint conditions map to states: `ready` -> Active; `serving && terminating` ->
//! Draining (keeps its flows, gets no new ones); anything else -> Draining too, except on a UDP port
//! while an endpoint of the family serves: not a backend (kube-proxy clears its UDP conntrack entries,
//! `CleanStaleEntries`). An endpoint in two of the slices (moving between them, or mirrored and
//! written again, or a pod's IP reused while the old pod terminates) is one backend: a copy not
//! terminating over a terminating one, whatever their readiness; then the copy with the better
//! conditions, then the one on this node, then the one of the slice whose name sorts first.
//! kube-proxy 1.29-1.31 keeps a local copy whatever its conditions (`!exists || isLocal` in
//! `EndpointSliceCache.addEndpoints`), so a terminating pod here shadowed a ready pod elsewhere that
//! took its IP (kubernetes/kubernetes#135266); later releases keep the copy not terminating
//! (`!exists || !terminating`, #135593), as here: once the IP is reused the terminating pod no
//! longer has it, and the new pod, ready or not, is what answers there. An endpoint whose
//! address is none a host holds (multicast, broadcast, unparsable) is left out alone, with a warning,
//! rather than have lb-core refuse the key and its other endpoints. A `Local` traffic
//! policy keeps only endpoints whose `nodeName` is this node; with none left the service stays, with no
//! backends, so its packets are dropped and counted rather than sent to the host stack.
//!
//! Terminating fallback (kube-proxy's `CategorizeEndpoints`, KEP-1669): when none of a key's endpoints
//! (those of its family, and this node's only under `Local`) is ready, its serving-and-terminating
//! ones are Active instead of Draining, so a single-replica rollout keeps taking new connections. Under
//! `Local` the test is node-local: ready endpoints on other nodes do not turn this node's off.
//!
//! Topology hints (kube-proxy's `topologyModeFromHints`, KEP-2433 and KEP-3015), for keys of a
//! `Cluster` policy: when every ready endpoint of the key has node hints and one is for this node
//! (`trafficDistribution: PreferSameNode`), only those hinted for this node take new flows; else
//! when every one has zone hints and one is for `node_zone` (`PreferClose`, `topology-mode: Auto`),
//! only those hinted for the zone do. The ready endpoints left out are Draining: they keep their
//! established flows, where kube-proxy would leave them out (and the flows with them). Endpoints of
//! a slice weighted 0 take no new flows, so they count as not ready here.
//!
//! NodePorts may be on the SNAT address (a node address, as with kube-proxy's masquerade) when
//! `node.snat_ports` leaves the NodePort range out (the default 32768-60999 does; on a node address
//! keep it out of the kernel's ephemeral ports too, which `lb run` warns about). A key lb-core
//! would refuse on one of the node's own source addresses (a port inside `snat_ports` on a SNAT
//! address; any key on `tunnel_src_v4` / `tunnel_src_v6`: `NodeConfig::vip_conflict`) is left out
//! alone and reported, instead of the whole Service being refused.
//!
//! ExternalName and headless Services, and those whose `service.kubernetes.io/service-proxy-name`
//! label is not `kubernetes.service_proxy_name` (by default: those with the label, meant for another
//! proxy, which kube-proxy leaves alone too), are skipped (debug log); the Services and
//! EndpointSlices that kube-proxy's label selectors leave out ([`Selectors`]: labelled for another
//! proxy, or headless) are not read, whatever their Service. A Service
//! with a bad annotation is skipped whole; a key already taken by an older Service, one on an
//! address that does not parse, or a port of another protocol than TCP and UDP (SCTP, which
//! kube-proxy serves) is left out alone; all are reported in [`Translation::skipped`].
//! A Service that served and then stops translating (an annotation or a field edited wrong) is not
//! taken away ([`translate_keeping`]): it is translated again with its last good annotations, its
//! endpoints followed as ever, or, if that fails too, keeps its last good translation whole, less
//! any key another Service claims now (the kept keys may include one it has given up since).
//! Nothing here does I/O; the feed calls [`translate`] on its store after every change.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;
use std::time::Duration;

use k8s_openapi::api::core::v1::{LoadBalancerIngress, Service, ServicePort};
use k8s_openapi::api::discovery::v1::{Endpoint as SliceEndpoint, EndpointSlice};
use lb_core::config::{
    BackendConfig, BackendState, Cidr, ForwardMode, NodeConfig, Protocol, ServiceConfig, ServiceKey, SpecialAddress,
};

use super::annotations;
use crate::config::{KubernetesSettings, ServiceSpec};

/// Label tying an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// Label on a Service meant for another proxy implementation, which kube-proxy ignores.
pub const SERVICE_PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";
/// Label the EndpointSlice controller puts on the slices of a headless Service, which kube-proxy
/// does not watch (DNS serves them).
pub const HEADLESS_LABEL: &str = "service.kubernetes.io/headless";
/// Kubernetes' default ClientIP affinity timeout (3 hours).
pub const DEFAULT_AFFINITY_TIMEOUT: Duration = Duration::from_secs(10800);

/// The label selectors the feed lists and watches Services and EndpointSlices with, so the API
/// server sends neither those meant for another proxy nor the slices of headless Services (large,
/// and churning with every pod of a StatefulSet). kube-proxy's informers select
/// `!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless` on both
/// (cmd/kube-proxy/app/server.go, `ProxyServer.Run`, through 1.35); with
/// `kubernetes.service_proxy_name` set, the Services are those labelled with that name instead, and
/// the slices are selected on the headless label alone (a slice written by hand, for a Service
/// without a selector, has no proxy name label to match).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selectors {
    /// The Services' selector.
    pub services: String,
    /// The EndpointSlices' selector.
    pub slices: String,
}

impl Selectors {
    /// The selectors for `settings`.
    pub fn of(settings: &KubernetesSettings) -> Self {
        let not_headless = format!("!{HEADLESS_LABEL}");
        match &settings.service_proxy_name {
            None => {
                let both = format!("!{SERVICE_PROXY_NAME_LABEL},{not_headless}");
                Selectors { services: both.clone(), slices: both }
            }
            Some(name) => Selectors {
                services: format!("{SERVICE_PROXY_NAME_LABEL}={name},{not_headless}"),
                slices: not_headless,
            },
        }
    }

    /// Whether `selector` (one of these: terms `!key` and `key=value`, comma-separated) selects an
    /// object with `labels`: the feed's store holds only those, and the translation sees no other.
    fn selects(selector: &str, labels: Option<&BTreeMap<String, String>>) -> bool {
        let label = |k: &str| labels.and_then(|l| l.get(k));
        selector.split(',').all(|term| match (term.strip_prefix('!'), term.split_once('=')) {
            (Some(key), _) => label(key).is_none(),
            (None, Some((key, value))) => label(key).is_some_and(|v| v == value),
            (None, None) => label(term).is_some(),
        })
    }
}

/// The result of one translation.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Translation {
    /// The services to balance, sorted by name then key.
    pub services: Vec<ServiceSpec>,
    /// Services (or single keys) left out because they are wrong or conflict, with the reason.
    pub skipped: Vec<Skipped>,
    /// The `healthCheckNodePort`s this node answers, sorted by port (see [`NodeHealthCheck`]).
    pub health_checks: Vec<NodeHealthCheck>,
}

/// A LoadBalancer Service with `externalTrafficPolicy: Local` and its `spec.healthCheckNodePort`:
/// the cloud load balancer asks that port on every node whether the node has endpoints of the
/// Service, and sends traffic only to nodes that answer 200. kube-proxy answers it; so does `lb run`
/// ([`super::node_health`]), with the same answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeHealthCheck {
    /// `spec.healthCheckNodePort`.
    pub port: u16,
    /// The Service's namespace.
    pub namespace: String,
    /// The Service's name.
    pub name: String,
    /// The Service's IP families (those of its cluster IPs): IPv4, IPv6.
    pub families: (bool, bool),
    /// This node's ready endpoints of the Service, by TCP or UDP port.
    pub ports: Vec<LocalEndpoints>,
}

impl NodeHealthCheck {
    /// kube-proxy's `localEndpoints` for a request to one of the node's addresses, IPv4 if `to_ipv4`:
    /// this node's ready endpoints of the Service's ports (distinct addresses: a pod serving two
    /// ports is one endpoint) of the request's family, or of the Service's only family if it is the
    /// other. kube-proxy counts each family apart (one proxier, and one health check server, each;
    /// kubernetes/kubernetes#114702): a dual-stack pod is one endpoint, not two. 0 answers 503.
    pub fn local_endpoints(&self, to_ipv4: bool) -> usize {
        let (v4, v6) = self.families;
        let ipv4 = if to_ipv4 { v4 || !v6 } else { v4 && !v6 };
        self.ports.iter().flat_map(|p| &p.addrs).filter(|a| a.is_ipv4() == ipv4).collect::<HashSet<_>>().len()
    }
}

/// One port of a [`NodeHealthCheck`]'s Service: where it is reached from outside the cluster, and
/// its ready endpoints on this node. The control loop keeps only the ports whose keys the tables
/// serve, so that a port left out (its traffic dropped here) draws no cloud load balancer traffic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalEndpoints {
    /// The name its keys have (`namespace/name:port`).
    pub name: String,
    /// Its keys under `externalTrafficPolicy` (node ports, external and load-balancer IPs), as translated.
    pub external_keys: Vec<ServiceKey>,
    /// This node's ready endpoints on it, less those of a slice weighted 0 (they take no new flows).
    pub addrs: std::collections::BTreeSet<IpAddr>,
}

/// A Service, or one of its keys, the translation left out, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    /// `namespace/name`.
    pub service: String,
    /// What is wrong, naming the field or annotation and its value.
    pub reason: String,
}

/// One endpoint address on one port, before traffic policy filtering.
#[derive(Debug, Clone)]
struct Endpoint {
    backend: BackendConfig,
    /// How the endpoint's conditions rank it: which backend state it gets, whether the terminating
    /// fallback may give it new flows, and which of two copies of an address wins.
    condition: Condition,
    /// `conditions.terminating`: of two copies of an address, the one not terminating wins.
    terminating: bool,
    local: bool,
    /// Topology hints (`hints.forNodes`, `hints.forZones`): the nodes and zones whose proxies the
    /// EndpointSlice controller meant it for; empty when it has none.
    for_nodes: Vec<String>,
    for_zones: Vec<String>,
}

/// An endpoint's conditions, read as kube-proxy reads them, best last. Every endpoint in a slice keeps
/// its established flows (kube-proxy's conntrack entries outlive a failed readiness probe, and IPVS
/// mode drains by weight), so only leaving the slice removes a backend; the condition decides new
/// flows. Except on UDP, where kube-proxy deletes the entries of a `NotServing` endpoint while the
/// port has a serving one: it is then no backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Condition {
    /// Not ready and not both serving and terminating (a failing readiness probe, or a terminating
    /// pod that stopped serving): Draining, never given new flows.
    NotServing,
    /// Serving and terminating: Draining, but new flows while none of the key's endpoints is ready
    /// (kube-proxy's terminating fallback).
    Terminating,
    /// Ready: Active.
    Ready,
}

impl Condition {
    /// `ep`'s conditions read as kube-proxy reads them: a nil `ready` or `serving` is true, a nil
    /// `terminating` false.
    fn of(ep: &SliceEndpoint) -> Condition {
        let c = ep.conditions.as_ref();
        if c.and_then(|c| c.ready).unwrap_or(true) {
            Condition::Ready
        } else if c.and_then(|c| c.serving).unwrap_or(true) && c.and_then(|c| c.terminating).unwrap_or(false) {
            Condition::Terminating
        } else {
            Condition::NotServing
        }
    }
}

/// True when `ep` runs on this node (`node_name`, if known).
fn is_local(ep: &SliceEndpoint, node_name: Option<&str>) -> bool {
    node_name.is_some() && ep.node_name.as_deref() == node_name
}

/// True for a slice of IP addresses (not an FQDN slice, which carries names).
fn holds_addresses(slice: &EndpointSlice) -> bool {
    matches!(slice.address_type.as_str(), "IPv4" | "IPv6")
}

/// Which of a key's ready endpoints take new flows, from their topology hints (kube-proxy's
/// `topologyModeFromHints`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Topology<'a> {
    /// All of them.
    Any,
    /// Those hinted for this node (`trafficDistribution: PreferSameNode`).
    Node(&'a str),
    /// Those hinted for this node's zone (`PreferClose`, `topology-mode: Auto`).
    Zone(&'a str),
}

impl<'a> Topology<'a> {
    /// As kube-proxy decides: same-node when every ready endpoint has node hints and one is for
    /// this node; else same-zone when every ready endpoint has zone hints and one is for this
    /// node's zone; else any. Endpoints that take no new flows (not ready, or of a slice weighted
    /// 0) take no part, so a node or zone whose hinted endpoints all have weight 0 is as one with
    /// none rather than one whose new flows find no backend.
    fn from_hints(endpoints: &[&Endpoint], node: Option<&'a str>, zone: Option<&'a str>) -> Self {
        let ready: Vec<&&Endpoint> = endpoints.iter().filter(|e| e.backend.takes_new_flows()).collect();
        let decide = |name: Option<&'a str>, hints: fn(&Endpoint) -> &[String]| {
            name.filter(|n| {
                !ready.is_empty()
                    && ready.iter().all(|e| !hints(e).is_empty())
                    && ready.iter().any(|e| hints(e).iter().any(|h| h == n))
            })
        };
        if let Some(n) = decide(node, |e| &e.for_nodes) {
            Topology::Node(n)
        } else if let Some(z) = decide(zone, |e| &e.for_zones) {
            Topology::Zone(z)
        } else {
            Topology::Any
        }
    }

    fn admits(self, e: &Endpoint) -> bool {
        match self {
            Topology::Any => true,
            Topology::Node(n) => e.for_nodes.iter().any(|h| h == n),
            Topology::Zone(z) => e.for_zones.iter().any(|h| h == z),
        }
    }
}

/// How clients reach a key: which of a Service's backends it uses, and whether clients on the
/// segment ask for its address (ARP / NDP, answered by the neighbour responder).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Reach {
    /// Cluster IPs: `internalTrafficPolicy`; in the service range, routed by the cluster.
    Internal,
    /// External IPs: `externalTrafficPolicy`; on the clients' segment.
    External,
    /// Node ports: `externalTrafficPolicy`; the node's own addresses, which its kernel answers for.
    NodePort,
    /// Load-balancer IPs: `externalTrafficPolicy` and source ranges; on the clients' segment.
    LoadBalancer,
}

/// What each Service that serves last translated to without error, for [`translate_keeping`].
#[derive(Debug, Clone, Default)]
pub struct LastGood(HashMap<String, GoodService>);

/// A Service's annotations and keys from its last translation without error.
#[derive(Debug, Clone)]
struct GoodService {
    /// `metadata.uid`: a Service deleted and created again under its name (between two
    /// translations, or while the watch was down) is another Service, which inherits nothing.
    uid: Option<String>,
    /// Its annotations under [`annotations::PREFIX`] (the only ones translation reads; not, say,
    /// a `last-applied-configuration` copy of the whole object).
    annotations: Option<BTreeMap<String, String>>,
    /// Each EndpointSlice's weight annotation, by slice name (`None`: it had none).
    weights: HashMap<String, Option<String>>,
    specs: Vec<ServiceSpec>,
}

/// The annotations of `all` under [`annotations::PREFIX`].
fn ours(all: Option<&BTreeMap<String, String>>) -> Option<BTreeMap<String, String>> {
    all.map(|a| {
        a.iter().filter(|(k, _)| k.starts_with(annotations::PREFIX)).map(|(k, v)| (k.clone(), v.clone())).collect()
    })
}

/// The weight annotation of each of `slices`, by slice name, for [`GoodService::weights`].
fn slice_weights(slices: &[&EndpointSlice]) -> HashMap<String, Option<String>> {
    slices
        .iter()
        .map(|s| {
            let weight = s.metadata.annotations.as_ref().and_then(|a| a.get(annotations::WEIGHT)).cloned();
            (s.metadata.name.clone().unwrap_or_default(), weight)
        })
        .collect()
}

/// `slices`, with the weight annotation of each one whose weight does not parse put back as it was
/// in `kept` (a slice it does not know keeps its bad weight).
fn with_kept_weights(slices: &[&EndpointSlice], kept: &HashMap<String, Option<String>>) -> Vec<EndpointSlice> {
    slices
        .iter()
        .map(|&s| {
            let mut s = s.clone();
            let name = s.metadata.name.clone().unwrap_or_default();
            if annotations::weight(s.metadata.annotations.as_ref()).is_err()
                && let Some(weight) = kept.get(&name)
            {
                let a = s.metadata.annotations.get_or_insert_default();
                match weight {
                    Some(w) => a.insert(annotations::WEIGHT.to_string(), w.clone()),
                    None => a.remove(annotations::WEIGHT),
                };
            }
            s
        })
        .collect()
}

/// How a Service kept whole from its last good translation is reported.
const AS_LAST_TRANSLATED: &str = "as last translated";

/// Translates Services and EndpointSlices into services for this node.
///
/// `node` is the file's node settings: keys of a family the node cannot forward in the chosen
/// mode (no SNAT or tunnel source for it) are skipped here rather than failing the whole update.
pub fn translate<'a>(
    services: impl IntoIterator<Item = &'a Service>,
    slices: impl IntoIterator<Item = &'a EndpointSlice>,
    settings: &KubernetesSettings,
    node: &NodeConfig,
) -> Translation {
    translate_keeping(services, slices, settings, node, &mut LastGood::default())
}

/// As [`translate`], keeping what a Service served while a later version of it does not translate:
/// a bad edit of a live Service is reported (in [`Translation::skipped`]) and takes nothing away.
/// Such a Service is translated again with the annotations of its last good translation (`last`):
/// its own, and the weights of its EndpointSlices whose weight no longer parses; its endpoints
/// followed as ever. If that fails too (the fault is in its spec, or in the weight of a slice it did
/// not have then), its last good keys stand as they were, yielding any of them another Service claims now
/// (one it has given up may have gone to another). `last` is then updated to this translation's
/// good ones; a Service that is gone is forgotten, and one created again under its name (another
/// `metadata.uid`) inherits nothing.
pub fn translate_keeping<'a>(
    services: impl IntoIterator<Item = &'a Service>,
    slices: impl IntoIterator<Item = &'a EndpointSlice>,
    settings: &KubernetesSettings,
    node: &NodeConfig,
    last: &mut LastGood,
) -> Translation {
    // Only what the feed's selectors let through, as kube-proxy sees only what its informers do.
    let selectors = Selectors::of(settings);
    let slices = slices.into_iter().filter(|s| Selectors::selects(&selectors.slices, s.metadata.labels.as_ref()));
    let services = services.into_iter().filter(|s| Selectors::selects(&selectors.services, s.metadata.labels.as_ref()));
    let mut by_service: HashMap<(String, String), Vec<&EndpointSlice>> = HashMap::new();
    for slice in slices {
        let ns = slice.metadata.namespace.clone().unwrap_or_default();
        if let Some(name) = slice.metadata.labels.as_ref().and_then(|l| l.get(SERVICE_NAME_LABEL)) {
            by_service.entry((ns, name.clone())).or_default().push(slice);
        }
    }
    // By name, so that of two copies of an endpoint alike but for their slice (its weight, its
    // hints), the one kept does not change with the store's order.
    for slices in by_service.values_mut() {
        slices.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
    }
    // Oldest Service first (then by name), so that when two claim one key the older one keeps it,
    // whatever order the store hands them over in.
    let mut services: Vec<&Service> = services.into_iter().collect();
    services.sort_by(|a, b| {
        let age = |s: &Service| s.metadata.creation_timestamp.as_ref().map(|t| t.0);
        age(a).cmp(&age(b)).then_with(|| full_name(a).cmp(&full_name(b)))
    });

    let mut out = Translation::default();
    let mut taken: HashMap<ServiceKey, String> = HashMap::new();
    let mut good = HashMap::new();
    // Keys of a requested load-balancer IP only, by Service: placed after the others claimed now.
    let mut requests: Vec<(String, &Service, &[&EndpointSlice], Vec<ServiceSpec>)> = Vec::new();
    // Services kept as last translated, with their keys: placed after the others.
    let mut stale: Vec<(String, &Service, &[&EndpointSlice], Vec<ServiceSpec>)> = Vec::new();
    for svc in services {
        let name = full_name(svc);
        let ns = svc.metadata.namespace.clone().unwrap_or_default();
        let own = svc.metadata.name.clone().unwrap_or_default();
        let slices = by_service.get(&(ns, own)).map(Vec::as_slice).unwrap_or(&[]);
        let result = match translate_service(svc, &name, slices, settings, node) {
            // Only a Service that serves is kept: one that translates to nothing (ExternalName, meant
            // for another proxy, no ports) has annotations nobody checked, and nothing to keep.
            Ok(r) if r.0.is_empty() => Ok(r),
            Ok(r) => {
                let kept = GoodService {
                    uid: svc.metadata.uid.clone(),
                    annotations: ours(svc.metadata.annotations.as_ref()),
                    weights: slice_weights(slices),
                    specs: r.0.clone(),
                };
                good.insert(name.clone(), kept);
                Ok(r)
            }
            Err(reason) => match last.0.remove(&name).filter(|k| k.uid == svc.metadata.uid) {
                Some(mut kept) => {
                    let mut before = svc.clone();
                    // Its own annotations of now, ours as they were.
                    let mut merged = before.metadata.annotations.take().unwrap_or_default();
                    merged.retain(|k, _| !k.starts_with(annotations::PREFIX));
                    merged.extend(kept.annotations.clone().unwrap_or_default());
                    before.metadata.annotations = Some(merged);
                    let before_slices = with_kept_weights(slices, &kept.weights);
                    let before_refs: Vec<&EndpointSlice> = before_slices.iter().collect();
                    let (r, how) = match translate_service(&before, &name, &before_refs, settings, node) {
                        Ok(r) => {
                            kept.specs.clone_from(&r.0);
                            kept.weights = slice_weights(&before_refs);
                            (r, "with its last good annotations")
                        }
                        Err(_) => ((kept.specs.clone(), Vec::new()), AS_LAST_TRANSLATED),
                    };
                    out.skipped
                        .push(Skipped { service: name.clone(), reason: format!("{reason}; still served {how}") });
                    good.insert(name.clone(), kept);
                    if how == AS_LAST_TRANSLATED {
                        stale.push((name.clone(), svc, slices, r.0));
                        continue;
                    }
                    Ok(r)
                }
                None => Err(reason),
            },
        };
        match result {
            Ok((specs, skipped)) => {
                out.skipped.extend(skipped);
                let requested = requested_load_balancer_ip(svc);
                let (asked, firm): (Vec<ServiceSpec>, Vec<ServiceSpec>) =
                    specs.into_iter().partition(|s| Some(s.config.key.vip) == requested);
                place(&mut out, &mut taken, (&name, svc, slices), firm, settings, "is already used by");
                if !asked.is_empty() {
                    requests.push((name, svc, slices, asked));
                }
            }
            Err(reason) => out.skipped.push(Skipped { service: name, reason }),
        }
    }
    // A `spec.loadBalancerIP` the cloud has not (yet) given is a request, which kube-proxy does not
    // serve: it yields to a Service whose status, external IPs or node ports claim the key.
    for (name, svc, slices, specs) in requests {
        let yields = "(spec.loadBalancerIP, not in its status) is used by";
        place(&mut out, &mut taken, (&name, svc, slices), specs, settings, yields);
    }
    // Keys kept as last translated may be ones the Service has since given up (a nodePort, a
    // load-balancer IP) and the cluster has given to another: they come last, after every key a
    // Service claims now, whatever their age.
    for (name, svc, slices, specs) in stale {
        let yields = "(kept as last translated) is now used by";
        place(&mut out, &mut taken, (&name, svc, slices), specs, settings, yields);
    }
    last.0 = good;
    out.services.sort_by(|a, b| a.config.name.cmp(&b.config.name).then(a.config.key.cmp(&b.config.key)));
    // (The API server allocates each port once; of two claims, the older Service's stays.)
    out.health_checks.sort_by_key(|h| h.port);
    out.health_checks.dedup_by_key(|h| h.port);
    for s in &out.skipped {
        tracing::warn!(service = %s.service, "kubernetes service skipped: {}", s.reason);
    }
    out
}

/// Adds a Service's keys (and its health-check port, if it has keys) to `out`, each unless another
/// Service took it first (in `taken`): that one is reported as `"{key} {taken_by} {owner}"`.
fn place(
    out: &mut Translation,
    taken: &mut HashMap<ServiceKey, String>,
    (name, svc, slices): (&str, &Service, &[&EndpointSlice]),
    specs: Vec<ServiceSpec>,
    settings: &KubernetesSettings,
    taken_by: &str,
) {
    if !specs.is_empty()
        && let Some(hc) = node_health_check(svc, slices, settings, &specs)
    {
        // (A Service placed in two steps, its requested load-balancer IP last: one check, with the
        // external keys of both.)
        let same = |h: &&mut NodeHealthCheck| h.port == hc.port && h.namespace == hc.namespace && h.name == hc.name;
        match out.health_checks.iter_mut().find(same) {
            Some(h) => {
                for (port, more) in h.ports.iter_mut().zip(hc.ports) {
                    port.external_keys.extend(more.external_keys);
                }
            }
            None => out.health_checks.push(hc),
        }
    }
    for spec in specs {
        if let Some(owner) = taken.get(&spec.config.key) {
            out.skipped
                .push(Skipped { service: name.to_string(), reason: format!("{} {taken_by} {owner}", spec.config.key) });
            continue;
        }
        taken.insert(spec.config.key, name.to_string());
        out.services.push(spec);
    }
}

fn full_name(svc: &Service) -> String {
    format!(
        "{}/{}",
        svc.metadata.namespace.as_deref().unwrap_or_default(),
        svc.metadata.name.as_deref().unwrap_or_default()
    )
}

type ServiceResult = Result<(Vec<ServiceSpec>, Vec<Skipped>), String>;

fn translate_service(
    svc: &Service,
    name: &str,
    slices: &[&EndpointSlice],
    settings: &KubernetesSettings,
    node: &NodeConfig,
) -> ServiceResult {
    let Some(spec) = &svc.spec else {
        tracing::debug!(service = name, "skipping service without spec");
        return Ok((Vec::new(), Vec::new()));
    };
    let proxy = svc.metadata.labels.as_ref().and_then(|l| l.get(SERVICE_PROXY_NAME_LABEL));
    if proxy != settings.service_proxy_name.as_ref() {
        tracing::debug!(service = name, proxy = ?proxy, "skipping service meant for another proxy");
        return Ok((Vec::new(), Vec::new()));
    }
    let kind = spec.type_.as_deref().unwrap_or("ClusterIP");
    if kind == "ExternalName" {
        tracing::debug!(service = name, "skipping ExternalName service: DNS only, nothing to balance");
        return Ok((Vec::new(), Vec::new()));
    }
    let cluster_ips: Vec<&str> = match &spec.cluster_ips {
        Some(ips) if !ips.is_empty() => ips.iter().map(String::as_str).collect(),
        _ => spec.cluster_ip.as_deref().into_iter().collect(),
    };
    if cluster_ips.iter().any(|ip| ip.eq_ignore_ascii_case("None")) {
        tracing::debug!(service = name, "skipping headless service: clients reach pods directly");
        return Ok((Vec::new(), Vec::new()));
    }

    let ann = annotations::service(svc.metadata.annotations.as_ref())?;
    let scheduler = ann.scheduler.unwrap_or(settings.default_scheduler);
    let mut maglev_table_size = ann.maglev_table_size;
    if let Some(size) = maglev_table_size
        && !scheduler.uses_maglev_table()
    {
        // Both annotations on the Service contradict each other: refused. A size meant for the
        // default scheduler that a file reload has since changed is only unused: the Service stays.
        if ann.scheduler.is_some() {
            return Err(format!(
                "annotation {}: \"{size}\" is only used with scheduler mh, sh or dh (this Service's is {scheduler})",
                annotations::MAGLEV_TABLE_SIZE
            ));
        }
        tracing::warn!(
            service = name,
            "annotation {}: \"{size}\" unused: the default scheduler {scheduler} has no Maglev table",
            annotations::MAGLEV_TABLE_SIZE
        );
        maglev_table_size = None;
    }
    let mode = ann.mode.unwrap_or(settings.default_mode);
    let affinity_timeout = (spec.session_affinity.as_deref() == Some("ClientIP")).then(|| {
        spec.session_affinity_config
            .as_ref()
            .and_then(|c| c.client_ip.as_ref())
            .and_then(|c| c.timeout_seconds)
            .and_then(|t| u64::try_from(t).ok())
            .filter(|&t| t > 0)
            .map_or(DEFAULT_AFFINITY_TIMEOUT, Duration::from_secs)
    });
    let mut source_ranges = Vec::new();
    for r in spec.load_balancer_source_ranges.iter().flatten() {
        source_ranges
            .push(parse_cidr(r.trim()).ok_or_else(|| format!("spec.loadBalancerSourceRanges: {r:?} is not a CIDR"))?);
    }
    let external_local = spec.external_traffic_policy.as_deref() == Some("Local");
    let internal_local = spec.internal_traffic_policy.as_deref() == Some("Local");
    let weights: Vec<u32> = slices
        .iter()
        .map(|s| annotations::weight(s.metadata.annotations.as_ref()))
        .collect::<Result<_, _>>()
        .map_err(|e| format!("EndpointSlice: {e}"))?;

    let mut out = Vec::new();
    let mut skipped = Vec::new();
    for port in spec.ports.iter().flatten() {
        let proto = match port.protocol.as_deref().unwrap_or("TCP") {
            "TCP" => Protocol::Tcp,
            "UDP" => Protocol::Udp,
            other => {
                // kube-proxy serves SCTP: leaving the port out must show, as any other key left out.
                let shown =
                    port.name.as_deref().filter(|n| !n.is_empty()).map_or(port.port.to_string(), str::to_string);
                skipped.push(Skipped {
                    service: name.to_string(),
                    reason: format!(
                        "port {shown}: protocol {other} is not balanced (TCP and UDP only), so it is not served"
                    ),
                });
                continue;
            }
        };
        let Ok(svc_port) = u16::try_from(port.port) else {
            return Err(format!("spec.ports[].port: {} is out of range", port.port));
        };
        let port_name = port.name.as_deref().unwrap_or("");
        let shown = if port_name.is_empty() { port.port.to_string() } else { port_name.to_string() };
        let endpoints = endpoints_for(slices, &weights, port_name, proto, settings.node_name.as_deref());

        let mut keys: Vec<(IpAddr, u16, Reach)> = Vec::new();
        // Like kube-proxy's per-family proxiers: a Service is served only in the families of its
        // cluster IPs (node ports, external and load-balancer IPs alike).
        let families: Vec<bool> =
            cluster_ips.iter().filter_map(|ip| parse_ip(ip.trim())).map(|ip| ip.is_ipv4()).collect();
        // An address that is none is left out alone, reported with the keys left out for other reasons.
        let mut push_ip = |ip: &str, port: u16, reach: Reach, field: &str| match parse_ip(ip.trim()) {
            Some(a) if reach == Reach::Internal || families.contains(&a.is_ipv4()) => keys.push((a, port, reach)),
            Some(_) => skipped.push(Skipped {
                service: name.to_string(),
                reason: format!(
                    "{field}: {ip:?} is of none of the Service's IP families, so port {shown} is not served on it"
                ),
            }),
            None if ip.trim().is_empty() => {} // an empty field is no address, not a wrong one
            None => skipped.push(Skipped {
                service: name.to_string(),
                reason: format!("{field}: {ip:?} is not an IP address, so port {shown} is not served on it"),
            }),
        };
        for ip in &cluster_ips {
            push_ip(ip, svc_port, Reach::Internal, "spec.clusterIPs");
        }
        for ip in spec.external_ips.iter().flatten() {
            push_ip(ip, svc_port, Reach::External, "spec.externalIPs");
        }
        if kind == "LoadBalancer" {
            let ingress = svc.status.as_ref().and_then(|s| s.load_balancer.as_ref()).and_then(|l| l.ingress.as_ref());
            let vip = ingress.into_iter().flatten().filter(|i| i.ip.is_some() && is_vip_mode(i));
            // spec.loadBalancerIP is a request: once the status gives the Service addresses, they
            // are the answer (kube-proxy serves them alone), and a request the cloud did not grant
            // is no address of this Service; serving it would answer ARP for an address the cloud
            // may have given another host. A hostname (an AWS ELB's) is an answer too: the cloud
            // serves the Service by name, at addresses of its own. With nothing in the status (no
            // controller answers: bare metal, the load balancer being this node), the request is
            // served.
            let given = ingress.into_iter().flatten().filter(|i| i.ip.is_some() || i.hostname.is_some()).count();
            for ip in spec.load_balancer_ip.iter().filter(|s| !s.is_empty()) {
                if given > 0 {
                    tracing::debug!(service = name, ip = %ip, "not serving spec.loadBalancerIP: the status gives the Service its addresses");
                    continue;
                }
                push_ip(ip, svc_port, Reach::LoadBalancer, "spec.loadBalancerIP");
            }
            for ip in vip.filter_map(|i| i.ip.as_deref()) {
                push_ip(ip, svc_port, Reach::LoadBalancer, "status.loadBalancer.ingress[].ip");
            }
        }
        if matches!(kind, "NodePort" | "LoadBalancer")
            && let Some(np) = node_port(port)
        {
            for ip in settings.node_addresses.iter().filter(|ip| families.contains(&ip.is_ipv4())) {
                keys.push((*ip, np, Reach::NodePort));
            }
        }

        let mut seen = HashSet::new();
        for (vip, key_port, reach) in keys {
            let key = ServiceKey { vip, port: key_port, proto };
            if !seen.insert(key) {
                continue; // e.g. loadBalancerIP repeated in status
            }
            let local_only = match reach {
                Reach::Internal => internal_local,
                Reach::External | Reach::NodePort | Reach::LoadBalancer => external_local,
            };
            // kube-proxy deletes the UDP conntrack entries of the endpoints that are not serving
            // while one of the family serves (whatever the policy); TCP connections keep theirs.
            let clear_not_serving = proto == Protocol::Udp
                && endpoints
                    .iter()
                    .any(|e| e.backend.addr.is_ipv4() == vip.is_ipv4() && e.condition != Condition::NotServing);
            let usable: Vec<&Endpoint> = endpoints
                .iter()
                .filter(|e| e.backend.addr.is_ipv4() == vip.is_ipv4() && (!local_only || e.local))
                .filter(|e| !(clear_not_serving && e.condition == Condition::NotServing))
                .collect();
            // Topology hints narrow a Cluster policy's new flows; a ready endpoint they leave out
            // keeps its established flows (Draining) rather than losing them.
            let topology = if local_only {
                Topology::Any
            } else {
                Topology::from_hints(&usable, settings.node_name.as_deref(), settings.node_zone.as_deref())
            };
            let mut backends: Vec<BackendConfig> = usable
                .iter()
                .map(|e| {
                    let mut b = e.backend.clone();
                    if b.state == BackendState::Active && !topology.admits(e) {
                        b.state = BackendState::Draining;
                    }
                    b
                })
                .collect();
            let fallback: Vec<bool> = usable.iter().map(|e| e.condition != Condition::NotServing).collect();
            serve_terminating_if_none_ready(&mut backends, &fallback);
            if let Some(why) = cannot_forward(mode, key, target_port(port), &backends, node) {
                skipped.push(Skipped { service: name.to_string(), reason: why });
                continue;
            }
            out.push(ServiceSpec {
                config: ServiceConfig {
                    name: format!("{name}:{shown}"),
                    key,
                    backends,
                    scheduler,
                    mode,
                    affinity_timeout,
                    source_ranges: if reach == Reach::LoadBalancer {
                        source_ranges.iter().filter(|c| c.addr().is_ipv4() == vip.is_ipv4()).copied().collect()
                    } else {
                        Vec::new()
                    },
                    maglev_table_size,
                    on_backend_removed: ann.on_backend_removed.unwrap_or_default(),
                    answer_neighbours: matches!(reach, Reach::External | Reach::LoadBalancer),
                },
                health_check: ann.health_check.clone(),
            });
        }
    }
    Ok((out, skipped))
}

/// kube-proxy's terminating-endpoint fallback: with no ready (Active) backend in the set a key uses,
/// the serving-terminating (Draining) ones take new flows, as better than dropping every new connection.
/// A ready backend of a slice weighted 0 takes no new flows either, so it does not count as ready.
/// Only the backends marked in `fallback` (ready or serving-terminating, not the not-serving ones)
/// are given new flows.
fn serve_terminating_if_none_ready(backends: &mut [BackendConfig], fallback: &[bool]) {
    if !backends.iter().any(BackendConfig::takes_new_flows) {
        for (b, _) in backends.iter_mut().zip(fallback).filter(|(_, f)| **f) {
            b.state = BackendState::Active;
        }
    }
}

/// The health check node port `svc` asks this node to answer, if any: a LoadBalancer Service with
/// `externalTrafficPolicy: Local` and a `healthCheckNodePort`, counted as kube-proxy counts it (this
/// node's ready endpoints, of the copy of each kept as a backend), less those of a slice weighted 0,
/// which take no new flows, by port with the port's external keys among `specs` (its translation).
fn node_health_check(
    svc: &Service,
    slices: &[&EndpointSlice],
    settings: &KubernetesSettings,
    specs: &[ServiceSpec],
) -> Option<NodeHealthCheck> {
    let spec = svc.spec.as_ref()?;
    if spec.type_.as_deref() != Some("LoadBalancer") || spec.external_traffic_policy.as_deref() != Some("Local") {
        return None;
    }
    let port = spec.health_check_node_port.and_then(|p| u16::try_from(p).ok()).filter(|&p| p != 0)?;
    let full = full_name(svc);
    let cluster_ips: HashSet<IpAddr> = spec
        .cluster_ips
        .iter()
        .flatten()
        .chain(spec.cluster_ip.as_ref())
        .filter_map(|ip| parse_ip(ip.trim()))
        .collect();
    // (A weight that does not parse is the default's: such a Service is served as last translated.)
    let weights: Vec<u32> = slices
        .iter()
        .map(|s| annotations::weight(s.metadata.annotations.as_ref()).unwrap_or(annotations::DEFAULT_WEIGHT))
        .collect();
    let mut ports = Vec::new();
    for p in spec.ports.iter().flatten() {
        let proto = match p.protocol.as_deref().unwrap_or("TCP") {
            "TCP" => Protocol::Tcp,
            "UDP" => Protocol::Udp,
            _ => continue,
        };
        let port_name = p.name.as_deref().unwrap_or("");
        let shown = if port_name.is_empty() { p.port.to_string() } else { port_name.to_string() };
        let name = format!("{full}:{shown}");
        let external_keys = specs
            .iter()
            .filter(|s| s.config.name == name && !cluster_ips.contains(&s.config.key.vip))
            .map(|s| s.config.key)
            .collect();
        // Only slices with a port of the Service hold its backends (kube-proxy too ignores a slice
        // with `ports: null`, which the EndpointSlice controller writes for pods without the named
        // targetPort). kube-proxy does count the endpoints of a slice port whose name the Service
        // no longer has (its port renamed, the slices not yet rewritten; a hand-written slice):
        // `EndpointsMap.LocalReadyEndpoints` goes over every slice port, not the Service's. Not
        // here: no key of the Service uses them, so a node with only those would answer 200 for
        // traffic its Local keys drop (as kube-proxy's Local chains, with no endpoint, drop it).
        let addrs = endpoints_for(slices, &weights, port_name, proto, settings.node_name.as_deref())
            .into_iter()
            .filter(|e| e.local && e.condition == Condition::Ready && e.backend.weight > 0)
            .map(|e| e.backend.addr)
            .collect();
        ports.push(LocalEndpoints { name, external_keys, addrs });
    }
    Some(NodeHealthCheck {
        port,
        namespace: svc.metadata.namespace.clone().unwrap_or_default(),
        name: svc.metadata.name.clone().unwrap_or_default(),
        families: (cluster_ips.iter().any(IpAddr::is_ipv4), cluster_ips.iter().any(IpAddr::is_ipv6)),
        ports,
    })
}

/// An address as the API server and kube-proxy read it (`netutils.ParseIPSloppy`, Go's parser before
/// 1.17): an IPv4 octet may have leading zeros and is decimal (`010.0.0.1` is 10.0.0.1, not octal),
/// and an IPv4-mapped IPv6 address is the IPv4 address. The API server accepted such addresses in
/// every field until strict validation, and objects written then are still served by kube-proxy.
fn parse_ip(s: &str) -> Option<IpAddr> {
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Some(ip.to_canonical());
    }
    let mut octets = [0u8; 4];
    let mut parts = s.split('.');
    for o in &mut octets {
        // (`u8::from_str` takes leading zeros, and a `+`, which Go's parser does not.)
        let part = parts.next().filter(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))?;
        *o = part.parse().ok()?;
    }
    parts.next().is_none().then_some(IpAddr::from(octets))
}

/// A CIDR as the API server and kube-proxy read it (`netutils.ParseCIDRSloppy`): an IPv4 address
/// in it may have leading zeros, as [`parse_ip`] reads one, and an IPv4-mapped range is the IPv4
/// range it maps (kube-proxy's `IPFamilyOfCIDR` goes by `To4`).
fn parse_cidr(s: &str) -> Option<Cidr> {
    if let Ok(c) = s.parse::<Cidr>() {
        return Some(c.ipv4_mapped().unwrap_or(c));
    }
    let (addr, len) = s.split_once('/')?;
    let addr = parse_ip(addr).filter(|_| !addr.contains(':'))?;
    Cidr::new(addr, len.parse().ok().filter(|_| len.bytes().all(|b| b.is_ascii_digit()))?)
}

/// The `spec.loadBalancerIP` of `svc` while it is only requested: in none of its
/// `status.loadBalancer.ingress` IPs nor its external IPs (a cloud may ignore the request and give
/// the IP to another Service).
fn requested_load_balancer_ip(svc: &Service) -> Option<IpAddr> {
    let spec = svc.spec.as_ref()?;
    let ip = parse_ip(spec.load_balancer_ip.as_deref()?.trim())?;
    let ingress = svc.status.as_ref().and_then(|s| s.load_balancer.as_ref()).and_then(|l| l.ingress.as_ref());
    let given = ingress.into_iter().flatten().filter_map(|i| parse_ip(i.ip.as_deref()?.trim()));
    let external = spec.external_ips.iter().flatten().filter_map(|e| parse_ip(e.trim()));
    (!given.chain(external).any(|a| a == ip)).then_some(ip)
}

/// kube-proxy's `IsVIPMode`: an ingress IP is programmed when its `ipMode` is `VIP` or unset.
fn is_vip_mode(ingress: &LoadBalancerIngress) -> bool {
    ingress.ip_mode.as_deref().is_none_or(|m| m == "VIP")
}

fn node_port(port: &ServicePort) -> Option<u16> {
    port.node_port.and_then(|p| u16::try_from(p).ok()).filter(|&p| p != 0)
}

/// Why `key` cannot be served in `mode` on this node, if it cannot.
fn cannot_forward(
    mode: ForwardMode,
    key: ServiceKey,
    target_port: Option<u16>,
    backends: &[BackendConfig],
    node: &NodeConfig,
) -> Option<String> {
    // lb-core refuses a VIP on one of the node's source addresses where replies to the node could
    // not be told from service traffic, and would refuse the whole Service: leave out this key alone.
    if let Some(conflict) = node.vip_conflict(&key) {
        return Some(format!("{key}: {conflict}"));
    }
    if mode == ForwardMode::Dsr {
        return Some(format!("{key}: {}", crate::config::file::DSR_NEEDS_MACS));
    }
    let v4 = key.vip.is_ipv4();
    let missing = match mode {
        ForwardMode::Nat if v4 && node.snat_v4.is_none() => Some("node.snat_v4"),
        ForwardMode::Nat if !v4 && node.snat_v6.is_none() => Some("node.snat_v6"),
        ForwardMode::IpIp | ForwardMode::Gue { .. } if v4 && node.tunnel_src_v4.is_none() => Some("node.tunnel_src_v4"),
        ForwardMode::IpIp | ForwardMode::Gue { .. } if !v4 && node.tunnel_src_v6.is_none() => {
            Some("node.tunnel_src_v6")
        }
        _ => None,
    };
    if let Some(field) = missing {
        return Some(format!("{key}: forwarding needs {field} in the configuration file"));
    }
    // A numeric targetPort other than the key's leaves the key out whatever its endpoints, so the
    // decision does not flip as they come and go. Every backend is judged too: a named targetPort may
    // resolve to another port in each slice, and a numeric one only says what the EndpointSlice
    // controller writes (not what a hand-written slice holds, nor one not yet rewritten after an edit).
    let other =
        target_port.filter(|&p| p != key.port).or_else(|| backends.iter().map(|b| b.port).find(|&p| p != key.port));
    if mode != ForwardMode::Nat
        && let Some(p) = other
    {
        return Some(format!(
            "{key}: target port {p} differs from the service port, which only NAT mode can translate"
        ));
    }
    None
}

/// The numeric `targetPort` (defaults to `port`); `None` for a named one.
fn target_port(port: &ServicePort) -> Option<u16> {
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
    match &port.target_port {
        None => u16::try_from(port.port).ok(),
        Some(IntOrString::Int(n)) => u16::try_from(*n).ok(),
        Some(IntOrString::String(_)) => None,
    }
}

/// The port number `slice` gives the Service port named `port_name` of `proto`, if it has one (not
/// zero).
fn slice_port(slice: &EndpointSlice, port_name: &str, proto: Protocol) -> Option<u16> {
    let target = slice.ports.iter().flatten().find(|p| {
        p.name.as_deref().unwrap_or("") == port_name
            && match p.protocol.as_deref().unwrap_or("TCP") {
                "TCP" => proto == Protocol::Tcp,
                "UDP" => proto == Protocol::Udp,
                _ => false,
            }
    });
    target.and_then(|p| p.port).and_then(|p| u16::try_from(p).ok()).filter(|&p| p != 0)
}

/// Every endpoint address of `port_name`/`proto`, deduplicated (an endpoint moving between slices
/// can appear in two; the copy not terminating wins, then the better [`Condition`], then the copy
/// on this node, then the one of the slice first in `slices`).
fn endpoints_for(
    slices: &[&EndpointSlice],
    weights: &[u32],
    port_name: &str,
    proto: Protocol,
    node_name: Option<&str>,
) -> Vec<Endpoint> {
    let mut found: BTreeMap<(IpAddr, u16), Endpoint> = BTreeMap::new();
    for (slice, &weight) in slices.iter().zip(weights) {
        if !holds_addresses(slice) {
            continue;
        }
        let Some(target_port) = slice_port(slice, port_name, proto) else { continue };
        for ep in &slice.endpoints {
            let condition = Condition::of(ep);
            let state = if condition == Condition::Ready { BackendState::Active } else { BackendState::Draining };
            // Addresses are fungible; consumers may use the first only (EndpointSlice API).
            let Some(first) = ep.addresses.first() else { continue };
            // An address lb-core would refuse (multicast, broadcast: the API server lets them through
            // in a hand-written slice) would take the whole key, every other endpoint with it.
            let Some(addr) = parse_ip(first.trim()).filter(|a| SpecialAddress::of(*a).is_none()) else {
                tracing::warn!(
                    namespace = slice.metadata.namespace.as_deref().unwrap_or_default(),
                    slice = slice.metadata.name.as_deref().unwrap_or_default(),
                    address = %first,
                    "endpoint left out: not a unicast address a host holds"
                );
                continue;
            };
            // kube-proxy's proxier of each family reads only the slices of its address type
            // (`EndpointsChangeTracker.EndpointSliceUpdate`): an address of the other family in a
            // slice (which the API server's validation refuses) is an endpoint of neither.
            if addr.is_ipv4() != (slice.address_type == "IPv4") {
                tracing::warn!(
                    namespace = slice.metadata.namespace.as_deref().unwrap_or_default(),
                    slice = slice.metadata.name.as_deref().unwrap_or_default(),
                    address = %first,
                    address_type = slice.address_type,
                    "endpoint left out: not of its slice's address type"
                );
                continue;
            }
            let local = is_local(ep, node_name);
            let hints = ep.hints.as_ref();
            let e = Endpoint {
                backend: BackendConfig { addr, port: target_port, weight, mac: None, state },
                condition,
                terminating: ep.conditions.as_ref().and_then(|c| c.terminating).unwrap_or(false),
                local,
                for_nodes: hints
                    .and_then(|h| h.for_nodes.as_ref())
                    .into_iter()
                    .flatten()
                    .map(|n| n.name.clone())
                    .collect(),
                for_zones: hints
                    .and_then(|h| h.for_zones.as_ref())
                    .into_iter()
                    .flatten()
                    .map(|z| z.name.clone())
                    .collect(),
            };
            // A copy not terminating wins, as in kube-proxy's `EndpointSliceCache.addEndpoints`
            // since #135593 (a pod's IP reused: the old pod no longer has it); then the better
            // condition; of two alike, the local one (kube-proxy 1.29-1.31 keeps a local copy over
            // any other, whatever its conditions: see the module's comment).
            let rank = |e: &Endpoint| (!e.terminating, e.condition, e.local);
            match found.get(&(addr, target_port)) {
                Some(prev) if rank(prev) >= rank(&e) => {}
                _ => {
                    found.insert((addr, target_port), e);
                }
            }
        }
    }
    found.into_values().collect()
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use lb_core::config::{RemovedBackendPolicy, SchedulerKind};

    use super::*;
    use crate::config::Probe;

    macro_rules! fixture {
        ($name:literal) => {
            serde_json::from_str(include_str!(concat!("../../tests/fixtures/", $name))).unwrap()
        };
    }

    fn settings() -> KubernetesSettings {
        KubernetesSettings {
            node_name: Some("node-a".into()),
            node_addresses: vec!["192.168.1.10".parse().unwrap(), "fd00::10".parse().unwrap()],
            ..Default::default()
        }
    }

    /// SNAT addresses apart from the node addresses that serve NodePorts (`settings`).
    fn node() -> NodeConfig {
        NodeConfig {
            snat_v4: Some(Ipv4Addr::new(192, 168, 1, 100)),
            snat_v6: Some("fd00::100".parse::<Ipv6Addr>().unwrap()),
            ..Default::default()
        }
    }

    fn find<'a>(t: &'a Translation, key: &str) -> &'a ServiceConfig {
        &t.services
            .iter()
            .find(|s| s.config.key.to_string() == key)
            .unwrap_or_else(|| panic!("no {key} in {t:#?}"))
            .config
    }

    fn backends(s: &ServiceConfig) -> Vec<(String, BackendState, u32)> {
        s.backends.iter().map(|b| (std::net::SocketAddr::new(b.addr, b.port).to_string(), b.state, b.weight)).collect()
    }

    #[test]
    fn cluster_ip_dual_stack_conditions_ports_and_affinity() {
        let svc: Service = fixture!("service-web.json");
        let v4: EndpointSlice = fixture!("endpointslice-web-ipv4.json");
        let v6: EndpointSlice = fixture!("endpointslice-web-ipv6.json");
        let t = translate([&svc], [&v4, &v6], &settings(), &node());
        assert!(t.skipped.is_empty(), "{:?}", t.skipped);
        // 2 ports x 2 cluster IPs.
        assert_eq!(t.services.len(), 4);
        let http = find(&t, "tcp 10.96.12.34:80");
        assert_eq!(http.name, "shop/web:http");
        assert_eq!(http.scheduler, SchedulerKind::WeightedRoundRobin);
        assert_eq!(http.affinity_timeout, Some(Duration::from_secs(600)));
        assert!(http.source_ranges.is_empty());
        // ready -> Active; serving+terminating and not serving -> Draining (their established flows
        // kept, as kube-proxy's conntrack keeps them); named targetPort "http" -> 8080.
        assert_eq!(
            backends(http),
            vec![
                ("10.244.1.5:8080".into(), BackendState::Active, 100),
                ("10.244.1.9:8080".into(), BackendState::Draining, 100),
                ("10.244.2.7:8080".into(), BackendState::Active, 100),
                ("10.244.2.8:8080".into(), BackendState::Draining, 100),
            ]
        );
        let metrics = find(&t, "tcp 10.96.12.34:9090");
        assert!(metrics.backends.iter().all(|b| b.port == 9090));
        let http6 = find(&t, "tcp [fd00:10:96::1234]:80");
        assert_eq!(backends(http6), vec![("[fd00:10:244:1::5]:8080".into(), BackendState::Active, 100)]);
        let spec = t.services.iter().find(|s| s.config.key == http.key).unwrap();
        assert_eq!(spec.health_check.as_ref().unwrap().probe, Probe::Http { path: "/healthz".into() });
    }

    #[test]
    fn node_port_with_local_policy_keeps_only_this_nodes_endpoints() {
        let svc: Service = fixture!("service-api-nodeport-local.json");
        let slice: EndpointSlice = fixture!("endpointslice-api.json");
        // The endpoints run on node-b and node-c.
        let t = translate([&svc], [&slice], &settings(), &node());
        let cluster = find(&t, "tcp 10.96.40.2:80");
        assert_eq!(cluster.name, "shop/api:80");
        assert_eq!(cluster.backends.len(), 2, "internalTrafficPolicy Cluster keeps all");
        assert_eq!(cluster.affinity_timeout, None);
        let np = find(&t, "tcp 192.168.1.10:30080");
        assert!(np.backends.is_empty(), "Local with no local endpoint: kept, empty, so drops are counted");
        // Single-stack IPv4: no node port on the node's IPv6 address.
        assert!(t.services.iter().all(|s| s.config.key.vip.is_ipv4()), "{t:#?}");

        let on_b = KubernetesSettings { node_name: Some("node-b".into()), ..settings() };
        let t = translate([&svc], [&slice], &on_b, &node());
        assert_eq!(
            backends(find(&t, "tcp 192.168.1.10:30080")),
            vec![("10.244.2.20:8080".into(), BackendState::Active, 100)]
        );
    }

    #[test]
    fn terminating_endpoints_take_new_flows_while_none_is_ready() {
        use k8s_openapi::api::discovery::v1::EndpointConditions;
        let svc: Service = fixture!("service-api-nodeport-local.json");
        // Rollout of a single replica: the old pod on node-b terminates (still serving), its
        // replacement on node-c is not ready yet.
        let mut slice: EndpointSlice = fixture!("endpointslice-api-rollout.json");
        let on = |n: &str| KubernetesSettings { node_name: Some(n.into()), ..settings() };
        let old_active = vec![("10.244.2.20:8080".into(), BackendState::Active, 100)];
        let new_waiting = ("10.244.3.22:8080".into(), BackendState::Draining, 100);
        let t = translate([&svc], [&slice], &on("node-b"), &node());
        let mut both = old_active.clone();
        both.push(new_waiting.clone());
        // (The replacement, not yet serving, is no fallback: it waits, Draining, with no flows.)
        assert_eq!(backends(find(&t, "tcp 10.96.40.2:80")), both, "Cluster: no ready endpoint anywhere");
        assert_eq!(backends(find(&t, "tcp 192.168.1.10:30080")), old_active, "Local: none ready on node-b");
        let t = translate([&svc], [&slice], &on("node-c"), &node());
        assert_eq!(backends(find(&t, "tcp 192.168.1.10:30080")), vec![new_waiting], "Local: none serving on node-c");

        // The replacement turns ready: the old pod keeps its flows and takes no new ones, except
        // under Local on its own node, where it is still the only serving endpoint.
        slice.endpoints[1].conditions =
            Some(EndpointConditions { ready: Some(true), serving: Some(true), terminating: Some(false) });
        let t = translate([&svc], [&slice], &on("node-b"), &node());
        assert_eq!(
            backends(find(&t, "tcp 10.96.40.2:80")),
            vec![
                ("10.244.2.20:8080".into(), BackendState::Draining, 100),
                ("10.244.3.22:8080".into(), BackendState::Active, 100),
            ]
        );
        assert_eq!(backends(find(&t, "tcp 192.168.1.10:30080")), old_active, "the fallback is node-local");
        let t = translate([&svc], [&slice], &on("node-c"), &node());
        assert_eq!(
            backends(find(&t, "tcp 192.168.1.10:30080")),
            vec![("10.244.3.22:8080".into(), BackendState::Active, 100)]
        );
    }

    #[test]
    fn internal_traffic_policy_local_filters_cluster_ip() {
        let mut svc: Service = fixture!("service-api-nodeport-local.json");
        let slice: EndpointSlice = fixture!("endpointslice-api.json");
        svc.spec.as_mut().unwrap().internal_traffic_policy = Some("Local".into());
        let on_c = KubernetesSettings { node_name: Some("node-c".into()), ..settings() };
        let t = translate([&svc], [&slice], &on_c, &node());
        assert_eq!(
            backends(find(&t, "tcp 10.96.40.2:80")),
            vec![("10.244.3.21:8080".into(), BackendState::Active, 100)]
        );
    }

    #[test]
    fn load_balancer_ips_source_ranges_node_ports_and_udp() {
        let svc: Service = fixture!("service-edge-loadbalancer.json");
        let slice: EndpointSlice = fixture!("endpointslice-edge.json");
        let t = translate([&svc], [&slice], &settings(), &node());
        let keys: Vec<String> = t.services.iter().map(|s| s.config.key.to_string()).collect();
        for want in [
            "tcp 10.96.7.7:443",
            "tcp 203.0.113.11:443",
            "tcp 192.168.1.10:31443",
            "udp 203.0.113.11:443",
            "udp 192.168.1.10:31443",
        ] {
            assert!(keys.contains(&want.to_string()), "missing {want} in {keys:?}");
        }
        // It asked for 203.0.113.10 and was given 203.0.113.11: the request is no address of it.
        assert!(!keys.iter().any(|k| k.contains("203.0.113.10:")), "{keys:?}");
        let lb = find(&t, "tcp 203.0.113.11:443");
        assert_eq!(lb.source_ranges.len(), 2);
        assert!(lb.source_ranges[0].contains("198.51.100.7".parse().unwrap()));
        assert!(find(&t, "tcp 10.96.7.7:443").source_ranges.is_empty(), "source ranges are for LB IPs only");
        assert!(find(&t, "tcp 192.168.1.10:31443").source_ranges.is_empty());
        assert_eq!(lb.maglev_table_size, Some(65537));
        assert_eq!(lb.on_backend_removed, RemovedBackendPolicy::Drop);
        assert_eq!(lb.scheduler, SchedulerKind::Maglev, "default scheduler");
        let quic = find(&t, "udp 203.0.113.11:443");
        assert_eq!(quic.name, "ingress/edge:quic");
        assert_eq!(backends(quic), vec![("10.244.1.30:8443".into(), BackendState::Active, 100)]);
    }

    /// With the neighbour responder on, ARP / NDP is answered for the addresses clients on the
    /// segment ask for: load-balancer and external IPs, not cluster IPs (the service range, routed by
    /// the cluster) nor a NodePort's node address (the node's own, answered by its kernel). Before,
    /// every key's address was answered, announced and, for IPv6, joined a multicast group for.
    #[test]
    fn neighbours_are_answered_for_load_balancer_and_external_ips_only() {
        let mut svc: Service = fixture!("service-edge-loadbalancer.json");
        svc.spec.as_mut().unwrap().external_ips = Some(vec!["198.51.100.20".into()]);
        let slice: EndpointSlice = fixture!("endpointslice-edge.json");
        let t = translate([&svc], [&slice], &settings(), &node());
        for (key, answered) in [
            ("tcp 10.96.7.7:443", false),
            ("tcp 192.168.1.10:31443", false),
            ("tcp 203.0.113.11:443", true),
            ("udp 203.0.113.11:443", true),
            ("tcp 198.51.100.20:443", true),
        ] {
            assert_eq!(find(&t, key).answer_neighbours, answered, "{key}");
        }
    }

    #[test]
    fn source_ranges_apply_per_address_family() {
        let mut svc: Service = fixture!("service-edge-loadbalancer.json");
        let spec = svc.spec.as_mut().unwrap();
        spec.cluster_ips = Some(vec!["10.96.7.7".into(), "fd00:10:96::707".into()]);
        spec.ip_families = Some(vec!["IPv4".into(), "IPv6".into()]);
        spec.ip_family_policy = Some("PreferDualStack".into());
        svc.status = Some(
            serde_json::from_value(serde_json::json!({ "loadBalancer": { "ingress": [
                { "ip": "203.0.113.11", "ipMode": "VIP" }, { "ip": "2001:db8:7::11", "ipMode": "VIP" },
            ] } }))
            .unwrap(),
        );
        let ranges = |svc: &Service, key: &str| {
            let t = translate([svc], [], &settings(), &node());
            find(&t, key).source_ranges.iter().map(ToString::to_string).collect::<Vec<_>>()
        };
        // Only IPv4 ranges: the IPv6 LB IP gets none, so every IPv6 client is allowed (kube-proxy).
        assert_eq!(ranges(&svc, "tcp 203.0.113.11:443"), ["198.51.100.0/24", "192.0.2.128/25"]);
        assert!(ranges(&svc, "tcp [2001:db8:7::11]:443").is_empty());
        svc.spec.as_mut().unwrap().load_balancer_source_ranges.as_mut().unwrap().push(" 2001:db8:100::/48".into());
        assert_eq!(ranges(&svc, "tcp 203.0.113.11:443"), ["198.51.100.0/24", "192.0.2.128/25"]);
        assert_eq!(ranges(&svc, "tcp [2001:db8:7::11]:443"), ["2001:db8:100::/48"]);
        assert_eq!(ranges(&svc, "udp [2001:db8:7::11]:443"), ["2001:db8:100::/48"]);

        // An IPv4-mapped IPv6 range is the IPv4 range it maps, as kube-proxy (whose IPFamilyOfCIDR
        // goes by To4) takes it: it restricts the IPv4 LB IP, and it is no IPv6 range (no IPv6
        // packet comes from a mapped address, so as one it shut out every IPv6 client).
        svc.spec.as_mut().unwrap().load_balancer_source_ranges = Some(vec!["::ffff:198.51.100.0/120".into()]);
        assert_eq!(ranges(&svc, "tcp 203.0.113.11:443"), ["198.51.100.0/24"]);
        assert!(ranges(&svc, "tcp [2001:db8:7::11]:443").is_empty());

        // IPv4 octets with leading zeros, which the API server's ParseCIDRSloppy accepts (as decimal)
        // and kube-proxy serves: the Service was refused ("is not a CIDR").
        svc.spec.as_mut().unwrap().load_balancer_source_ranges = Some(vec!["198.051.100.000/24".into()]);
        assert_eq!(ranges(&svc, "tcp 203.0.113.11:443"), ["198.51.100.0/24"]);
        svc.spec.as_mut().unwrap().load_balancer_source_ranges = Some(vec!["198.051.100.256/24".into()]);
        assert!(translate([&svc], [], &settings(), &node()).services.is_empty(), "an octet above 255");
    }

    #[test]
    fn ingress_ips_in_proxy_mode_are_not_served() {
        let mut svc: Service = fixture!("service-edge-loadbalancer.json");
        let keys = |svc: &Service| -> Vec<String> {
            let t = translate([svc], [], &settings(), &node());
            t.services.iter().map(|s| s.config.key.to_string()).filter(|k| k.contains("203.0.113.")).collect()
        };
        let status = |ingress: serde_json::Value| {
            Some(serde_json::from_value(serde_json::json!({ "loadBalancer": { "ingress": ingress } })).unwrap())
        };
        // 203.0.113.11 proxied by its cloud load balancer, 203.0.113.12 with ipMode unset.
        svc.status = status(serde_json::json!([
            { "ip": "203.0.113.11", "ipMode": "Proxy" },
            { "ip": "203.0.113.12" },
            { "hostname": "edge.example.net", "ipMode": "Proxy" },
        ]));
        assert_eq!(keys(&svc), ["tcp 203.0.113.12:443", "udp 203.0.113.12:443"]);
        // No address in the status (no controller gives them): the request is served.
        svc.status = status(serde_json::json!([]));
        assert_eq!(keys(&svc), ["tcp 203.0.113.10:443", "udp 203.0.113.10:443"]);
        // spec.loadBalancerIP given to a Proxy-mode load balancer is not served either.
        svc.status = status(serde_json::json!([{ "ip": "203.0.113.10", "ipMode": "Proxy" }]));
        assert!(keys(&svc).is_empty(), "{:?}", keys(&svc));
        // Nor a request the cloud answered with a hostname only (an AWS ELB), nor with both.
        svc.status = status(serde_json::json!([{ "hostname": "edge.elb.example.net" }]));
        assert!(keys(&svc).is_empty(), "{:?}", keys(&svc));
        svc.status = status(serde_json::json!([{ "hostname": "edge.elb.example.net" }, { "ip": "203.0.113.12" }]));
        assert_eq!(keys(&svc), ["tcp 203.0.113.12:443", "udp 203.0.113.12:443"]);
    }

    /// An address of the Service that is none (an old object, a cloud controller's typo) leaves out
    /// the keys it would have made, and says so where skipped keys are counted; the others serve.
    #[test]
    fn an_unparsable_service_address_is_reported_and_the_others_served() {
        let mut svc: Service = fixture!("service-edge-loadbalancer.json");
        svc.spec.as_mut().unwrap().external_ips = Some(vec!["198.51.100.20".into(), "198.51.100".into()]);
        let t = translate([&svc], [], &settings(), &node());
        find(&t, "tcp 198.51.100.20:443");
        find(&t, "udp 198.51.100.20:443");
        let reasons: Vec<&str> = t.skipped.iter().map(|s| s.reason.as_str()).collect();
        assert_eq!(
            reasons,
            [
                "spec.externalIPs: \"198.51.100\" is not an IP address, so port https is not served on it",
                "spec.externalIPs: \"198.51.100\" is not an IP address, so port quic is not served on it",
            ]
        );
        assert!(t.skipped.iter().all(|s| s.service == "ingress/edge"));
    }

    /// Addresses written with leading zeros, which the API server accepted before strict validation
    /// and kube-proxy reads as decimal, and IPv4-mapped ones, which kube-proxy reads as IPv4: the
    /// Service is served at the addresses kube-proxy serves, to the same endpoints and sources.
    #[test]
    fn addresses_with_leading_zeros_or_ipv4_mapped_are_read_as_kube_proxy_reads_them() {
        let mut svc: Service = fixture!("service-edge-loadbalancer.json");
        let spec = svc.spec.as_mut().unwrap();
        spec.cluster_ips = Some(vec!["010.096.007.007".into()]);
        spec.cluster_ip = Some("010.096.007.007".into());
        spec.external_ips = Some(vec!["::ffff:198.51.100.20".into(), "198.051.100.021".into()]);
        spec.load_balancer_source_ranges = Some(vec!["198.051.100.000/24".into()]);
        svc.status = Some(
            serde_json::from_value(serde_json::json!({ "loadBalancer": { "ingress": [{ "ip": "203.000.113.011" }] } }))
                .unwrap(),
        );
        let mut slice: EndpointSlice = fixture!("endpointslice-edge.json");
        slice.endpoints[0].addresses = vec!["010.244.001.030".into()];
        let t = translate([&svc], [&slice], &settings(), &node());
        let keys: Vec<String> = t.services.iter().map(|s| s.config.key.to_string()).collect();
        for want in ["tcp 10.96.7.7:443", "tcp 198.51.100.20:443", "tcp 198.51.100.21:443", "tcp 203.0.113.11:443"] {
            assert!(keys.contains(&want.to_string()), "missing {want} in {keys:?}");
        }
        // The request (203.0.113.10) is not among the given addresses, so it is not served.
        assert!(!keys.iter().any(|k| k.contains("203.0.113.10:")), "{keys:?}");
        assert!(keys.iter().all(|k| !k.contains("ffff")), "{keys:?}");
        let quic = find(&t, "udp 203.0.113.11:443");
        assert_eq!(backends(quic), vec![("10.244.1.30:8443".into(), BackendState::Active, 100)]);
        let lb = find(&t, "tcp 203.0.113.11:443");
        assert_eq!(lb.source_ranges.iter().map(ToString::to_string).collect::<Vec<_>>(), ["198.51.100.0/24"]);
        // A `+` is no digit for Go's parser either: that range is refused, and the Service with it.
        svc.spec.as_mut().unwrap().load_balancer_source_ranges.as_mut().unwrap().push("+10.0.0.0/8".into());
        let t = translate([&svc], [&slice], &settings(), &node());
        assert!(t.services.is_empty(), "{t:#?}");
        assert!(t.skipped.iter().any(|s| s.reason.contains("\"+10.0.0.0/8\" is not a CIDR")), "{:?}", t.skipped);
    }

    /// A named targetPort may be a different number in each slice (pods of two versions): in
    /// IP-in-IP, which cannot change ports, one backend on another port than the service's leaves the
    /// key out alone. (Judging by the first backend only let it through, for lb-core to refuse it
    /// later, after the translation had reported it served.)
    #[test]
    fn a_named_target_port_on_another_number_in_any_slice_leaves_a_tunnel_key_out() {
        let mut svc: Service = fixture!("service-web.json");
        svc.metadata.annotations.get_or_insert_default().insert(annotations::MODE.into(), "ipip".into());
        let node = || NodeConfig { tunnel_src_v4: Some(Ipv4Addr::new(192, 168, 1, 101)), ..node() };
        let mut on_80: EndpointSlice = fixture!("endpointslice-web-ipv4.json");
        on_80.metadata.name = Some("web-v4-on-80".into());
        on_80.ports.as_mut().unwrap()[0].port = Some(80);
        on_80.endpoints[0].addresses = vec!["10.244.0.1".into()];
        on_80.endpoints.truncate(1);
        let on_8080: EndpointSlice = fixture!("endpointslice-web-ipv4.json");
        let t = translate([&svc], [&on_80, &on_8080], &settings(), &node());
        assert!(t.services.iter().all(|s| s.config.key.to_string() != "tcp 10.96.12.34:80"), "{t:#?}");
        assert!(t.skipped.iter().any(|s| s.reason.contains("10.96.12.34:80") && s.reason.contains("8080")), "{t:#?}");
        assert!(t.services.iter().any(|s| s.config.key.port == 9090), "the other port is served");
        // What is left builds: lb-core accepts it whole.
        let node = NodeConfig { gateway_mac: Some([2, 0, 0, 0, 0, 1]), ..node() };
        let config = lb_core::config::Config { node, services: t.services.iter().map(|s| s.config.clone()).collect() };
        lb_core::service::TableBuilder::new().build(&config).expect("the translation builds");
    }

    /// A LoadBalancer Service with `externalTrafficPolicy: Local` asks every node on its
    /// `healthCheckNodePort` whether it has local endpoints: counted as kube-proxy counts them (ready
    /// endpoints on this node), and none for Cluster policy.
    #[test]
    fn local_load_balancers_get_their_health_check_node_port_with_this_nodes_ready_endpoints() {
        use k8s_openapi::api::discovery::v1::EndpointConditions;
        let mut svc: Service = fixture!("service-edge-loadbalancer.json");
        let mut slice: EndpointSlice = fixture!("endpointslice-edge.json");
        let on = |n: &str| KubernetesSettings { node_name: Some(n.into()), ..settings() };
        assert!(translate([&svc], [&slice], &on("node-a"), &node()).health_checks.is_empty(), "Cluster policy");
        let spec = svc.spec.as_mut().unwrap();
        spec.external_traffic_policy = Some("Local".into());
        spec.health_check_node_port = Some(32100);
        let checks = |slice: &EndpointSlice, node_name: &str| -> Vec<(u16, String, String, usize)> {
            let t = translate([&svc], [slice], &on(node_name), &node());
            t.health_checks
                .iter()
                .map(|h| (h.port, h.namespace.clone(), h.name.clone(), h.local_endpoints(true)))
                .collect()
        };
        let want = |n| vec![(32100, "ingress".to_string(), "edge".to_string(), n)];
        assert_eq!(checks(&slice, "node-a"), want(1));
        assert_eq!(checks(&slice, "node-b"), want(0));
        // By port, with the keys that reach it from outside (not the cluster IP's), for the control
        // loop to keep only the ports the tables serve.
        let t = translate([&svc], [&slice], &on("node-a"), &node());
        let ports: Vec<(&str, Vec<String>)> = t.health_checks[0]
            .ports
            .iter()
            .map(|p| (p.name.as_str(), p.external_keys.iter().map(ToString::to_string).collect()))
            .collect();
        assert_eq!(
            ports,
            [
                ("ingress/edge:https", vec!["tcp 203.0.113.11:443".to_string(), "tcp 192.168.1.10:31443".to_string()]),
                ("ingress/edge:quic", vec!["udp 203.0.113.11:443".to_string(), "udp 192.168.1.10:31443".to_string()]),
            ]
        );
        // A second local endpoint that is not ready does not count; a ready one does.
        let mut second = slice.endpoints[0].clone();
        second.addresses = vec!["10.244.1.31".into()];
        second.conditions = Some(EndpointConditions { ready: Some(false), serving: Some(false), terminating: None });
        slice.endpoints.push(second);
        assert_eq!(checks(&slice, "node-a"), want(1));
        slice.endpoints[1].conditions = None;
        assert_eq!(checks(&slice, "node-a"), want(2));
    }

    /// A dual-stack Service's pods have an address of each family, one in each family's slice: each
    /// is one endpoint to a request of its family, as kube-proxy, whose proxier of each family
    /// counts its own, answers. Counting both made every pod two, and a node with one pod weigh as
    /// much as one with two (`X-Load-Balancing-Endpoint-Weight`). A single-stack Service counts its
    /// family's endpoints whatever the request's.
    #[test]
    fn a_dual_stack_pod_is_one_local_endpoint_to_a_request_of_each_family() {
        let mut svc: Service = fixture!("service-edge-loadbalancer.json");
        let spec = svc.spec.as_mut().unwrap();
        spec.external_traffic_policy = Some("Local".into());
        spec.health_check_node_port = Some(32100);
        let v4: EndpointSlice = fixture!("endpointslice-edge.json");
        let mut v6 = v4.clone();
        v6.metadata.name = Some("edge-v6".into());
        v6.address_type = "IPv6".into();
        v6.endpoints[0].addresses = vec!["fd00:10:244:1::30".into()];
        let mut second = v6.endpoints[0].clone();
        second.addresses = vec!["fd00:10:244:1::31".into()];
        v6.endpoints.push(second);
        let counts = |svc: &Service| {
            let t = translate([svc], [&v4, &v6], &settings(), &node());
            (t.health_checks[0].local_endpoints(true), t.health_checks[0].local_endpoints(false))
        };
        assert_eq!(counts(&svc), (1, 1), "IPv4 only");
        let spec = svc.spec.as_mut().unwrap();
        spec.cluster_ips = Some(vec!["10.96.7.7".into(), "fd00:10:96::707".into()]);
        spec.ip_families = Some(vec!["IPv4".into(), "IPv6".into()]);
        assert_eq!(counts(&svc), (1, 2), "dual-stack");
        let spec = svc.spec.as_mut().unwrap();
        spec.cluster_ips = Some(vec!["fd00:10:96::707".into()]);
        spec.cluster_ip = Some("fd00:10:96::707".into());
        assert_eq!(counts(&svc), (2, 2), "IPv6 only");
    }

    /// A Service whose load-balancer keys are only its requested `spec.loadBalancerIP` (no status
    /// yet, no node ports: `allocateLoadBalancerNodePorts: false`) is placed in two steps, its firm
    /// keys first: its health check gives each port the external keys of both, so the control loop
    /// counts the ports the tables serve on that IP. Only the first step's were kept, none of them
    /// external, and the node answered 503 with local endpoints it served.
    #[test]
    fn a_requested_load_balancer_ip_is_an_external_key_of_the_health_check() {
        let mut svc: Service = fixture!("service-edge-loadbalancer.json");
        svc.status = None;
        let spec = svc.spec.as_mut().unwrap();
        spec.external_traffic_policy = Some("Local".into());
        spec.health_check_node_port = Some(32100);
        spec.allocate_load_balancer_node_ports = Some(false);
        for p in spec.ports.iter_mut().flatten() {
            p.node_port = None;
        }
        let slice: EndpointSlice = fixture!("endpointslice-edge.json");
        let t = translate([&svc], [&slice], &settings(), &node());
        assert_eq!(t.health_checks.len(), 1, "{:?}", t.health_checks);
        let keys: Vec<Vec<String>> = t.health_checks[0]
            .ports
            .iter()
            .map(|p| p.external_keys.iter().map(ToString::to_string).collect())
            .collect();
        assert_eq!(keys, [["tcp 203.0.113.10:443"], ["udp 203.0.113.10:443"]]);
    }

    /// Pods the Service's selector matches but whose container has no port of the named targetPort
    /// (a second Deployment under the same labels) get a slice with `ports: null` from the
    /// EndpointSlice controller: no backend of any key, and no endpoint to kube-proxy, whose health
    /// check answers 503 on a node with only those. Counted, they made the node answer 200, and the
    /// cloud load balancer sent it traffic that the Local keys, with no backend, dropped.
    #[test]
    fn endpoints_in_a_slice_without_the_services_ports_are_no_local_endpoints() {
        let mut svc: Service = fixture!("service-edge-loadbalancer.json");
        let slice: EndpointSlice = fixture!("endpointslice-edge.json");
        let spec = svc.spec.as_mut().unwrap();
        spec.external_traffic_policy = Some("Local".into());
        spec.health_check_node_port = Some(32100);
        let mut portless: EndpointSlice = serde_json::from_value(serde_json::json!({
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": "edge-k9m2x",
                "namespace": "ingress",
                "labels": {
                    "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
                    "kubernetes.io/service-name": "edge"
                }
            },
            "addressType": "IPv4",
            "endpoints": [{
                "addresses": ["10.244.2.40"],
                "conditions": { "ready": true, "serving": true, "terminating": false },
                "nodeName": "node-b"
            }],
            "ports": null
        }))
        .unwrap();
        let on_b = KubernetesSettings { node_name: Some("node-b".into()), ..settings() };
        let local_endpoints = |slices: &[&EndpointSlice]| {
            let t = translate([&svc], slices.iter().copied(), &on_b, &node());
            assert!(find(&t, "tcp 192.168.1.10:31443").backends.is_empty(), "no backend on node-b");
            t.health_checks.iter().map(|h| h.local_endpoints(true)).collect::<Vec<_>>()
        };
        assert_eq!(local_endpoints(&[&slice, &portless]), [0]);
        // Ports of another name than the Service's (a port renamed in the pods) are none of its either.
        portless.ports = Some(vec![k8s_openapi::api::discovery::v1::EndpointPort {
            name: Some("metrics".into()),
            port: Some(9090),
            protocol: Some("TCP".into()),
            app_protocol: None,
        }]);
        assert_eq!(local_endpoints(&[&slice, &portless]), [0]);
        // Named as the Service's port, it is a backend and counts.
        portless.ports.as_mut().unwrap()[0].name = Some("https".into());
        let t = translate([&svc], [&slice, &portless], &on_b, &node());
        assert_eq!(
            backends(find(&t, "tcp 192.168.1.10:31443")),
            [("10.244.2.40:9090".into(), BackendState::Active, 100)]
        );
        assert_eq!(t.health_checks.iter().map(|h| h.local_endpoints(true)).collect::<Vec<_>>(), [1]);
    }

    /// A canary pod promoted by adding it to the stable slice before taking it out of the canary's:
    /// for a moment both slices hold it, alike but for their weight. The copy kept was the first in
    /// the store's order, which a re-list (a new map) changes: the backend's weight, and the tables,
    /// changed with no change in the cluster. The copy of the slice whose name sorts first is kept.
    #[test]
    fn which_copy_of_an_endpoint_is_kept_does_not_depend_on_the_order_of_the_slices() {
        let svc: Service = fixture!("service-checkout-canary.json");
        let mut stable: EndpointSlice = fixture!("endpointslice-checkout-stable.json");
        let next: EndpointSlice = fixture!("endpointslice-checkout-next.json");
        stable.endpoints.push(next.endpoints[0].clone());
        let want = vec![
            ("10.244.4.10:8080".into(), BackendState::Active, 90),
            ("10.244.5.10:8080".into(), BackendState::Active, 10),
        ];
        for order in [[&next, &stable], [&stable, &next]] {
            let t = translate([&svc], order, &settings(), &node());
            assert_eq!(backends(find(&t, "tcp 10.96.80.80:80")), want, "{:?}", order.map(|s| &s.metadata.name));
        }
    }

    /// A numeric targetPort says which port the EndpointSlice controller writes, not which one a
    /// slice holds: a selector-less Service's slices are written by hand (its targetPort, defaulted
    /// to its port, means nothing), and a selector's slices follow an edited targetPort only after
    /// it. In IP-in-IP a backend on another port than the key's leaves the key out; judged by the
    /// targetPort alone, the key passed as served (its health check node port answered) and was left
    /// out only later, by lb-core's check in the control loop.
    #[test]
    fn a_backend_on_another_port_than_a_numeric_target_port_leaves_a_tunnel_key_out() {
        let mut svc: Service = fixture!("service-checkout-canary.json");
        svc.metadata.annotations.get_or_insert_default().insert(annotations::MODE.into(), "ipip".into());
        svc.spec.as_mut().unwrap().ports.as_mut().unwrap()[0].target_port =
            Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(80));
        let node = || NodeConfig { tunnel_src_v4: Some(Ipv4Addr::new(192, 168, 1, 101)), ..node() };
        let stable: EndpointSlice = fixture!("endpointslice-checkout-stable.json");
        let t = translate([&svc], [&stable], &settings(), &node());
        assert!(t.services.is_empty(), "{t:#?}");
        assert!(t.skipped.iter().any(|s| s.reason.contains("10.96.80.80:80") && s.reason.contains("8080")), "{t:#?}");
        let node = NodeConfig { gateway_mac: Some([2, 0, 0, 0, 0, 1]), ..node() };
        let config = lb_core::config::Config {
            node: node.clone(),
            services: t.services.iter().map(|s| s.config.clone()).collect(),
        };
        lb_core::service::TableBuilder::new().build(&config).expect("the translation builds");
        // On the key's port, it is served.
        let mut on_80 = stable.clone();
        on_80.ports.as_mut().unwrap()[0].port = Some(80);
        let t = translate([&svc], [&on_80], &settings(), &node);
        assert_eq!(backends(find(&t, "tcp 10.96.80.80:80")), [("10.244.4.10:80".into(), BackendState::Active, 90)]);
    }

    /// A slice weighted 0 (a canary turned off) takes no new flows: a node whose only ready local
    /// endpoints are in it has nothing for the new connections of its Local keys, so its health
    /// check answers 503 and the cloud load balancer sends them to nodes that take them. It answered
    /// 200, and the node dropped them.
    #[test]
    fn endpoints_weighted_0_are_no_local_endpoints_to_the_health_check() {
        let mut svc: Service = fixture!("service-edge-loadbalancer.json");
        let spec = svc.spec.as_mut().unwrap();
        spec.external_traffic_policy = Some("Local".into());
        spec.health_check_node_port = Some(32100);
        let mut slice: EndpointSlice = fixture!("endpointslice-edge.json");
        let count = |slice: &EndpointSlice| {
            let t = translate([&svc], [slice], &settings(), &node());
            t.health_checks.iter().map(|h| h.local_endpoints(true)).collect::<Vec<_>>()
        };
        assert_eq!(count(&slice), [1]);
        slice.metadata.annotations.get_or_insert_default().insert(annotations::WEIGHT.into(), "0".into());
        let t = translate([&svc], [&slice], &settings(), &node());
        let np = find(&t, "tcp 192.168.1.10:31443");
        assert!(!np.backends.iter().any(BackendConfig::takes_new_flows), "{np:?}");
        assert_eq!(count(&slice), [0]);
    }

    /// One endpoint in two slices of a Service, as while Endpoints are mirrored and the same
    /// addresses written as an EndpointSlice too: the mirrored copy without `nodeName`, the other with
    /// this node's. Of two copies alike but for that, kube-proxy keeps the local one. Keeping the
    /// one first in the store's order left a Local key with no backend while the health check,
    /// counting the local copy, answered 200: that node's traffic was dropped.
    #[test]
    fn of_two_copies_of_an_endpoint_alike_but_for_its_node_the_local_one_is_kept() {
        let mut svc: Service = fixture!("service-edge-loadbalancer.json");
        let spec = svc.spec.as_mut().unwrap();
        spec.external_traffic_policy = Some("Local".into());
        spec.health_check_node_port = Some(32100);
        let written: EndpointSlice = fixture!("endpointslice-edge.json");
        let mut mirrored = written.clone();
        mirrored.metadata.name = Some("edge-mirror-x7q2p".into());
        mirrored
            .metadata
            .labels
            .get_or_insert_default()
            .insert("endpointslice.kubernetes.io/managed-by".into(), "endpointslicemirroring-controller.k8s.io".into());
        mirrored.endpoints[0].node_name = None;
        for order in [[&mirrored, &written], [&written, &mirrored]] {
            let t = translate([&svc], order, &settings(), &node());
            let want = [("10.244.1.30:8443".into(), BackendState::Active, 100)];
            assert_eq!(backends(find(&t, "tcp 192.168.1.10:31443")), want, "{:?}", order.map(|s| &s.metadata.name));
            assert_eq!(backends(find(&t, "tcp 203.0.113.11:443")), want);
            assert_eq!(t.health_checks[0].local_endpoints(true), 1);
        }
    }

    /// A pod's IP reused by the pod network while the old pod still terminates: for a while the old
    /// pod's endpoint (serving, terminating) and the new pod's (not ready yet, not terminating) are
    /// two copies of one address. The old pod no longer has the IP, so kube-proxy keeps the new
    /// pod's copy (`EndpointSliceCache.addEndpoints`: `!exists || !terminating`, #135593), which
    /// takes no new flows until it is ready. The serving-terminating copy was kept, and with no
    /// ready endpoint anywhere the terminating fallback sent new connections to the new pod before
    /// its readiness probe passed.
    #[test]
    fn of_two_copies_of_a_reused_ip_the_one_not_terminating_is_kept() {
        let svc: Service = fixture!("service-api-nodeport-local.json");
        let old: EndpointSlice = fixture!("endpointslice-api-rollout.json");
        let mut reused: EndpointSlice = serde_json::from_value(serde_json::json!({
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": "api-9xk2m",
                "namespace": "shop",
                "labels": {
                    "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
                    "kubernetes.io/service-name": "api"
                }
            },
            "addressType": "IPv4",
            "endpoints": [{
                "addresses": ["10.244.2.20"],
                "conditions": { "ready": false, "serving": false, "terminating": false },
                "nodeName": "node-b",
                "targetRef": { "kind": "Pod", "name": "api-7f6b5c8d9-x2v8q", "namespace": "shop" },
                "zone": "zone-b"
            }],
            "ports": [{ "name": "", "port": 8080, "protocol": "TCP" }]
        }))
        .unwrap();
        let on_b = KubernetesSettings { node_name: Some("node-b".into()), ..settings() };
        let waiting = vec![
            ("10.244.2.20:8080".into(), BackendState::Draining, 100),
            ("10.244.3.22:8080".into(), BackendState::Draining, 100),
        ];
        for order in [[&old, &reused], [&reused, &old]] {
            let t = translate([&svc], order, &on_b, &node());
            assert_eq!(backends(find(&t, "tcp 10.96.40.2:80")), waiting, "{:?}", order.map(|s| &s.metadata.name));
            assert_eq!(backends(find(&t, "tcp 192.168.1.10:30080")), waiting[..1]);
        }
        // Both copies in one slice, as when the controller writes the new pod where the old one is.
        let mut one = old.clone();
        one.endpoints.insert(0, reused.endpoints[0].clone());
        let t = translate([&svc], [&one], &on_b, &node());
        assert_eq!(backends(find(&t, "tcp 10.96.40.2:80")), waiting);
        // Ready, the new pod's copy takes new flows.
        reused.endpoints[0].conditions.as_mut().unwrap().ready = Some(true);
        let t = translate([&svc], [&old, &reused], &on_b, &node());
        assert_eq!(backends(find(&t, "tcp 10.96.40.2:80"))[0], ("10.244.2.20:8080".into(), BackendState::Active, 100));
    }

    #[test]
    fn external_name_and_headless_are_skipped_quietly() {
        let a: Service = fixture!("service-external-name.json");
        let b: Service = fixture!("service-headless.json");
        let t = translate([&a, &b], [], &settings(), &node());
        assert!(t.services.is_empty());
        assert!(t.skipped.is_empty(), "skipping them is not an error");
    }

    /// A Service labelled `service.kubernetes.io/service-proxy-name` asks for another proxy: kube-proxy
    /// leaves it alone (its informers select on the label's absence), and so does this feed.
    #[test]
    fn services_meant_for_another_proxy_are_skipped_quietly() {
        let mut svc: Service = fixture!("service-edge-loadbalancer.json");
        let slice: EndpointSlice = fixture!("endpointslice-edge.json");
        assert!(!translate([&svc], [&slice], &settings(), &node()).services.is_empty());
        svc.metadata.labels.get_or_insert_default().insert(SERVICE_PROXY_NAME_LABEL.into(), "other-proxy".into());
        let t = translate([&svc], [&slice], &settings(), &node());
        assert!(t.services.is_empty(), "{t:#?}");
        assert!(t.skipped.is_empty(), "skipping it is not an error");
        // A feed named as that proxy serves it, and only the Services labelled with its name.
        let named = KubernetesSettings { service_proxy_name: Some("other-proxy".into()), ..settings() };
        assert!(!translate([&svc], [&slice], &named, &node()).services.is_empty());
        let unlabelled: Service = fixture!("service-edge-loadbalancer.json");
        assert!(translate([&unlabelled], [&slice], &named, &node()).services.is_empty());
    }

    /// The EndpointSlices labelled `service.kubernetes.io/service-proxy-name` or
    /// `service.kubernetes.io/headless` are not kube-proxy's (its informers' selector,
    /// [`Selectors`]), whatever their Service: their endpoints are not served. A slice keeps the
    /// labels its Service had until the controller writes it again, so a Service just taken back
    /// from another proxy has no endpoints for kube-proxy meanwhile; it had them here. Nor is a
    /// Service labelled headless served. With `service_proxy_name` set, the slices are selected on
    /// the headless label alone.
    #[test]
    fn slices_labelled_for_another_proxy_or_headless_are_not_read() {
        let svc: Service = fixture!("service-edge-loadbalancer.json");
        let slice: EndpointSlice = fixture!("endpointslice-edge.json");
        let served = |t: &Translation| t.services.iter().map(|s| s.config.backends.len()).sum::<usize>();
        let all = served(&translate([&svc], [&slice], &settings(), &node()));
        assert!(all > 0);
        for label in [SERVICE_PROXY_NAME_LABEL, HEADLESS_LABEL] {
            let mut labelled = slice.clone();
            labelled.metadata.labels.get_or_insert_default().insert(label.into(), "other-proxy".into());
            let t = translate([&svc], [&labelled], &settings(), &node());
            assert!(!t.services.is_empty(), "{label}: the Service is still served");
            assert_eq!(served(&t), 0, "{label}: without the slice's endpoints");
        }
        let mut headless = svc.clone();
        headless.metadata.labels.get_or_insert_default().insert(HEADLESS_LABEL.into(), String::new());
        assert!(translate([&headless], [&slice], &settings(), &node()).services.is_empty());

        let named = KubernetesSettings { service_proxy_name: Some("lb".into()), ..settings() };
        let mut ours = svc.clone();
        ours.metadata.labels.get_or_insert_default().insert(SERVICE_PROXY_NAME_LABEL.into(), "lb".into());
        assert_eq!(served(&translate([&ours], [&slice], &named, &node())), all, "a slice without the label");
        let mut headless_slice = slice.clone();
        headless_slice.metadata.labels.get_or_insert_default().insert(HEADLESS_LABEL.into(), String::new());
        assert_eq!(served(&translate([&ours], [&headless_slice], &named, &node())), 0);
        assert_eq!(
            Selectors::of(&named),
            Selectors {
                services: "service.kubernetes.io/service-proxy-name=lb,!service.kubernetes.io/headless".into(),
                slices: "!service.kubernetes.io/headless".into()
            }
        );
    }

    /// A UDP "flow" of a client that keeps sending (QUIC, syslog, a DNS client on one port) never
    /// ends: kube-proxy deletes the UDP conntrack entries of endpoints that are not serving as soon
    /// as the port has a serving endpoint of the family (`conntrack::CleanStaleEntries`, whatever the
    /// traffic policy), so such a client moves on; its TCP connections keep their endpoint. With no
    /// serving endpoint at all it deletes nothing.
    #[test]
    fn udp_flows_leave_an_endpoint_that_is_not_serving_while_another_serves() {
        use k8s_openapi::api::discovery::v1::EndpointConditions;
        let mut svc: Service = fixture!("service-edge-loadbalancer.json");
        let mut slice: EndpointSlice = fixture!("endpointslice-edge.json");
        // A second pod, on node-b, failing its readiness probe.
        let mut failing = slice.endpoints[0].clone();
        failing.addresses = vec!["10.244.2.31".into()];
        failing.node_name = Some("node-b".into());
        failing.conditions =
            Some(EndpointConditions { ready: Some(false), serving: Some(false), terminating: Some(false) });
        slice.endpoints.push(failing);
        let ready = ("10.244.1.30:8443".to_string(), BackendState::Active, 100);
        let draining = ("10.244.2.31:8443".to_string(), BackendState::Draining, 100);
        let t = translate([&svc], [&slice], &settings(), &node());
        assert_eq!(backends(find(&t, "tcp 203.0.113.11:443")), vec![ready.clone(), draining.clone()]);
        assert_eq!(backends(find(&t, "udp 203.0.113.11:443")), vec![ready.clone()]);
        assert_eq!(backends(find(&t, "udp 10.96.7.7:443")), vec![ready.clone()]);

        // Under Local on node-b, whose only endpoint is the failing one: the serving one elsewhere
        // still clears it.
        svc.spec.as_mut().unwrap().external_traffic_policy = Some("Local".into());
        let on_b = KubernetesSettings { node_name: Some("node-b".into()), ..settings() };
        let t = translate([&svc], [&slice], &on_b, &node());
        assert_eq!(backends(find(&t, "tcp 192.168.1.10:31443")), vec![draining.clone()]);
        assert_eq!(backends(find(&t, "udp 192.168.1.10:31443")), vec![]);

        // No endpoint serving: nothing to move to, the flows stay.
        svc.spec.as_mut().unwrap().external_traffic_policy = Some("Cluster".into());
        slice.endpoints[0].conditions =
            Some(EndpointConditions { ready: Some(false), serving: Some(false), terminating: Some(false) });
        let t = translate([&svc], [&slice], &settings(), &node());
        let both = vec![("10.244.1.30:8443".to_string(), BackendState::Draining, 100), draining];
        assert_eq!(backends(find(&t, "udp 203.0.113.11:443")), both);
    }

    /// kube-proxy serves SCTP ports; lb does not. Such a port is left out, reported like any other
    /// key left out (logged at warn, counted), while the Service's other ports are served.
    #[test]
    fn an_sctp_port_is_reported_and_the_other_ports_served() {
        let mut svc: Service = fixture!("service-edge-loadbalancer.json");
        let mut slice: EndpointSlice = fixture!("endpointslice-edge.json");
        svc.spec.as_mut().unwrap().ports.as_mut().unwrap().push(ServicePort {
            name: Some("signalling".into()),
            port: 3868,
            protocol: Some("SCTP".into()),
            ..Default::default()
        });
        slice.ports.as_mut().unwrap().push(k8s_openapi::api::discovery::v1::EndpointPort {
            name: Some("signalling".into()),
            port: Some(3868),
            protocol: Some("SCTP".into()),
            app_protocol: None,
        });
        let t = translate([&svc], [&slice], &settings(), &node());
        assert!(t.services.iter().any(|s| s.config.key.to_string() == "tcp 10.96.7.7:443"), "{t:#?}");
        assert!(t.services.iter().all(|s| s.config.key.port != 3868));
        assert_eq!(t.skipped.len(), 1, "{:?}", t.skipped);
        assert_eq!(t.skipped[0].service, "ingress/edge");
        assert!(t.skipped[0].reason.contains("signalling") && t.skipped[0].reason.contains("SCTP"), "{:?}", t.skipped);
    }

    #[test]
    fn canary_weights_from_two_slices() {
        let svc: Service = fixture!("service-checkout-canary.json");
        let stable: EndpointSlice = fixture!("endpointslice-checkout-stable.json");
        let next: EndpointSlice = fixture!("endpointslice-checkout-next.json");
        let t = translate([&svc], [&next, &stable], &settings(), &node());
        assert_eq!(
            backends(find(&t, "tcp 10.96.80.80:80")),
            vec![
                ("10.244.4.10:8080".into(), BackendState::Active, 90),
                ("10.244.5.10:8080".into(), BackendState::Active, 10),
            ]
        );
    }

    /// A rollout with the new version's slice weighted 0 (a canary turned off) while the stable
    /// version's pods are all terminating: the weighted-0 ready ones take no new flows, so the
    /// terminating fallback still lets the serving-terminating ones take them.
    #[test]
    fn terminating_fallback_ignores_ready_endpoints_weighted_0() {
        use k8s_openapi::api::discovery::v1::EndpointConditions;
        let svc: Service = fixture!("service-checkout-canary.json");
        let mut stable: EndpointSlice = fixture!("endpointslice-checkout-stable.json");
        let mut next: EndpointSlice = fixture!("endpointslice-checkout-next.json");
        for ep in &mut stable.endpoints {
            ep.conditions =
                Some(EndpointConditions { ready: Some(false), serving: Some(true), terminating: Some(true) });
        }
        next.metadata.annotations.get_or_insert_default().insert(annotations::WEIGHT.into(), "0".into());
        let t = translate([&svc], [&next, &stable], &settings(), &node());
        assert_eq!(
            backends(find(&t, "tcp 10.96.80.80:80")),
            vec![
                ("10.244.4.10:8080".into(), BackendState::Active, 90),
                ("10.244.5.10:8080".into(), BackendState::Active, 0)
            ]
        );
    }

    /// A live Service edited wrong keeps serving: with its last good annotations while its
    /// endpoints still follow the slices, or, when the fault is not in its annotations, as last
    /// translated; reported each time. Fixed, the edit applies. A Service that never translated,
    /// or that went away and came back wrong, is skipped as before.
    #[test]
    fn a_live_service_edited_wrong_keeps_serving_what_it_served() {
        let mut svc: Service = fixture!("service-checkout-canary.json");
        let stable: EndpointSlice = fixture!("endpointslice-checkout-stable.json");
        let next: EndpointSlice = fixture!("endpointslice-checkout-next.json");
        let mut last = LastGood::default();
        let key = "tcp 10.96.80.80:80";
        let t = translate_keeping([&svc], [&stable], &settings(), &node(), &mut last);
        assert_eq!((t.skipped.len(), find(&t, key).scheduler), (0, SchedulerKind::Maglev));
        assert_eq!(backends(find(&t, key)).len(), 1);

        // A typo in the scheduler, and a new slice: still mh, and the new endpoint is in.
        svc.metadata.annotations.as_mut().unwrap().insert(annotations::SCHEDULER.into(), "mgl".into());
        let t = translate_keeping([&svc], [&stable, &next], &settings(), &node(), &mut last);
        assert_eq!(find(&t, key).scheduler, SchedulerKind::Maglev);
        assert_eq!(backends(find(&t, key)).len(), 2, "endpoints still follow the slices");
        assert_eq!(t.skipped.len(), 1);
        let reason = &t.skipped[0].reason;
        assert!(
            reason.contains("\"mgl\"") && reason.contains("still served with its last good annotations"),
            "{reason}"
        );
        assert!(translate([&svc], [&stable], &settings(), &node()).services.is_empty(), "without memory: skipped");

        // A fault outside the annotations too: as last translated (two endpoints), whatever the
        // slices say now.
        svc.spec.as_mut().unwrap().load_balancer_source_ranges = Some(vec!["nope".into()]);
        let t = translate_keeping([&svc], [&stable], &settings(), &node(), &mut last);
        assert_eq!(backends(find(&t, key)).len(), 2);
        assert!(t.skipped[0].reason.contains("still served as last translated"), "{:?}", t.skipped);

        // Fixed: the edit applies (rr), with the slices of now.
        svc.spec.as_mut().unwrap().load_balancer_source_ranges = None;
        svc.metadata.annotations.as_mut().unwrap().insert(annotations::SCHEDULER.into(), "rr".into());
        let t = translate_keeping([&svc], [&stable], &settings(), &node(), &mut last);
        assert_eq!((t.skipped.len(), find(&t, key).scheduler), (0, SchedulerKind::RoundRobin));
        assert_eq!(backends(find(&t, key)).len(), 1);

        // Gone, then back wrong: nothing to keep.
        let t = translate_keeping([], [&stable], &settings(), &node(), &mut last);
        assert!(t.services.is_empty());
        svc.metadata.annotations.as_mut().unwrap().insert(annotations::SCHEDULER.into(), "mgl".into());
        let t = translate_keeping([&svc], [&stable], &settings(), &node(), &mut last);
        assert!(t.services.is_empty(), "{t:#?}");
        assert!(!t.skipped[0].reason.contains("still served"), "{:?}", t.skipped);
    }

    /// A Service deleted and created again under its name (within one debounce, or while the watch
    /// was down, so no translation saw it gone) is another Service: created wrong, it is skipped,
    /// not served with the annotations, or the keys (a cluster IP it may no longer hold), of the one
    /// before.
    #[test]
    fn a_service_created_again_under_its_name_inherits_nothing() {
        let svc: Service = fixture!("service-checkout-canary.json");
        let stable: EndpointSlice = fixture!("endpointslice-checkout-stable.json");
        let mut last = LastGood::default();
        let t = translate_keeping([&svc], [&stable], &settings(), &node(), &mut last);
        assert_eq!(t.services.len(), 1);

        let mut again = svc.clone();
        again.metadata.uid = Some("another-uid".into());
        again.metadata.annotations.as_mut().unwrap().insert(annotations::SCHEDULER.into(), "mgl".into());
        let t = translate_keeping([&again], [&stable], &settings(), &node(), &mut last);
        assert!(t.services.is_empty(), "{t:#?}");
        assert!(!t.skipped[0].reason.contains("still served"), "{:?}", t.skipped);

        // Its spec wrong too (where the one before would be kept as last translated): skipped.
        let t = translate_keeping([&svc], [&stable], &settings(), &node(), &mut last);
        assert_eq!(t.services.len(), 1);
        again.spec.as_mut().unwrap().load_balancer_source_ranges = Some(vec!["nope".into()]);
        let t = translate_keeping([&again], [&stable], &settings(), &node(), &mut last);
        assert!(t.services.is_empty(), "{t:#?}");
    }

    /// A Service kept as last translated (a slice weight gone wrong) keeps keys it may since have
    /// given up: here its nodePort, as it turned ClusterIP, which the API server then gave to a
    /// younger Service. The younger one's claim stands; the kept key yields, reported.
    #[test]
    fn a_key_kept_as_last_translated_yields_to_a_service_that_claims_it_now() {
        let mut api: Service = fixture!("service-api-nodeport-local.json");
        let api_slice: EndpointSlice = fixture!("endpointslice-api.json");
        let mut checkout: Service = fixture!("service-checkout-canary.json");
        let stable: EndpointSlice = fixture!("endpointslice-checkout-stable.json");
        let node_port = "tcp 192.168.1.10:30080";
        let mut last = LastGood::default();
        let t = translate_keeping([&api, &checkout], [&api_slice, &stable], &settings(), &node(), &mut last);
        assert_eq!(find(&t, node_port).name, "shop/api:80");

        let spec = api.spec.as_mut().unwrap();
        // A field that does not parse: kept as last translated.
        spec.load_balancer_source_ranges = Some(vec!["nope".into()]);
        spec.type_ = Some("ClusterIP".into());
        spec.ports.as_mut().unwrap()[0].node_port = None;
        let spec = checkout.spec.as_mut().unwrap();
        spec.type_ = Some("NodePort".into());
        spec.ports.as_mut().unwrap()[0].node_port = Some(30080);
        let t = translate_keeping([&api, &checkout], [&api_slice, &stable], &settings(), &node(), &mut last);
        assert!(find(&t, node_port).name.starts_with("shop/checkout:"), "{t:#?}");
        assert_eq!(find(&t, "tcp 10.96.40.2:80").name, "shop/api:80", "the rest of api is kept");
        assert!(
            t.skipped.iter().any(|s| s.service == "shop/api" && s.reason.contains("is now used by shop/checkout")),
            "{:?}",
            t.skipped
        );
    }

    /// A Service that translated to nothing (ExternalName, whose annotations nobody checks) and
    /// then turns into one to serve, with a bad annotation, never served: it is skipped, as a new
    /// Service would be, not served with the annotations it had then (here none: the defaults).
    #[test]
    fn a_service_that_served_nothing_is_not_kept() {
        let mut svc: Service = fixture!("service-external-name.json");
        let mut last = LastGood::default();
        let t = translate_keeping([&svc], [], &settings(), &node(), &mut last);
        assert!(t.services.is_empty() && t.skipped.is_empty(), "{t:#?}");

        let spec = svc.spec.as_mut().unwrap();
        spec.type_ = Some("ClusterIP".into());
        spec.external_name = None;
        spec.cluster_ip = Some("10.96.90.9".into());
        spec.cluster_ips = Some(vec!["10.96.90.9".into()]);
        spec.ports = Some(vec![ServicePort { port: 443, protocol: Some("TCP".into()), ..Default::default() }]);
        svc.metadata.annotations = Some([(annotations::SCHEDULER.to_string(), "mgl".to_string())].into());
        let t = translate_keeping([&svc], [], &settings(), &node(), &mut last);
        assert!(t.services.is_empty(), "{t:#?}");
        assert!(!t.skipped[0].reason.contains("still served"), "{:?}", t.skipped);
    }

    /// A bad weight on a live Service's EndpointSlice takes that slice's last good weight, and its
    /// endpoints are followed as ever; a slice the Service did not have then, with a bad weight,
    /// leaves it as last translated.
    #[test]
    fn a_bad_slice_weight_on_a_live_service_keeps_the_slices_last_good_weight() {
        let svc: Service = fixture!("service-checkout-canary.json");
        let mut stable: EndpointSlice = fixture!("endpointslice-checkout-stable.json");
        let mut next: EndpointSlice = fixture!("endpointslice-checkout-next.json");
        let mut last = LastGood::default();
        let key = "tcp 10.96.80.80:80";
        let t = translate_keeping([&svc], [&next, &stable], &settings(), &node(), &mut last);
        let weights = |t: &Translation| backends(find(t, key)).into_iter().map(|b| b.2).collect::<Vec<_>>();
        assert_eq!(weights(&t), [90, 10]);
        // The canary's weight typed wrong, and a pod more in the stable slice.
        next.metadata.annotations.as_mut().unwrap().insert(annotations::WEIGHT.into(), "ten".into());
        stable.endpoints.push(stable.endpoints[0].clone());
        stable.endpoints[1].addresses = vec!["10.244.4.11".into()];
        let t = translate_keeping([&svc], [&next, &stable], &settings(), &node(), &mut last);
        assert_eq!(weights(&t), [90, 90, 10], "the canary keeps 10, the new pod is in");
        assert!(t.skipped[0].reason.contains("\"ten\"") && t.skipped[0].reason.contains("last good annotations"));
        // A third slice, new and bad: as last translated.
        let mut third = next.clone();
        third.metadata.name = Some("checkout-third".into());
        third.endpoints[0].addresses = vec!["10.244.6.1".into()];
        let t = translate_keeping([&svc], [&next, &stable, &third], &settings(), &node(), &mut last);
        assert_eq!(weights(&t), [90, 90, 10]);
        assert!(t.skipped[0].reason.contains("as last translated"), "{:?}", t.skipped);
    }

    #[test]
    fn bad_annotation_skips_only_that_service() {
        let mut svc: Service = fixture!("service-checkout-canary.json");
        let good: Service = fixture!("service-web.json");
        let mut stable: EndpointSlice = fixture!("endpointslice-checkout-stable.json");
        stable.metadata.annotations.as_mut().unwrap().insert(annotations::WEIGHT.into(), "ninety".into());
        let t = translate([&svc, &good], [&stable], &settings(), &node());
        assert_eq!(t.skipped.len(), 1);
        assert_eq!(t.skipped[0].service, "shop/checkout");
        assert!(t.skipped[0].reason.contains("\"ninety\""), "{}", t.skipped[0].reason);
        assert!(t.services.iter().all(|s| !s.config.name.starts_with("shop/checkout")));
        assert!(!t.services.is_empty(), "the other service stays");

        svc.metadata.annotations.as_mut().unwrap().insert(annotations::SCHEDULER.into(), "fastest".into());
        let t = translate([&svc], [], &settings(), &node());
        assert!(t.skipped[0].reason.contains("lb.example.dev/scheduler"), "{:?}", t.skipped);

        // A Maglev table size for a scheduler without a Maglev table is refused, not ignored.
        let a = svc.metadata.annotations.as_mut().unwrap();
        a.insert(annotations::MAGLEV_TABLE_SIZE.into(), "251".into());
        a.insert(annotations::SCHEDULER.into(), "rr".into());
        let t = translate([&svc], [], &settings(), &node());
        assert_eq!(t.skipped.len(), 1, "{:?}", t.skipped);
        assert!(t.skipped[0].reason.contains("only used with scheduler mh, sh or dh"), "{:?}", t.skipped);
        svc.metadata.annotations.as_mut().unwrap().insert(annotations::SCHEDULER.into(), "sh".into());
        let t = translate([&svc], [], &settings(), &node());
        assert!(t.skipped.is_empty(), "{:?}", t.skipped);
        // With the scheduler left to the file's default, a default without a Maglev table (a reload
        // changed it) leaves the size unused rather than the Service out.
        svc.metadata.annotations.as_mut().unwrap().remove(annotations::SCHEDULER);
        let rr = KubernetesSettings { default_scheduler: SchedulerKind::RoundRobin, ..settings() };
        let t = translate([&svc], [], &rr, &node());
        assert!(t.skipped.is_empty(), "{:?}", t.skipped);
        assert!(
            t.services
                .iter()
                .all(|s| s.config.scheduler == SchedulerKind::RoundRobin && s.config.maglev_table_size.is_none())
        );
        assert!(!t.services.is_empty());
    }

    /// A node address that serves NodePorts and is also the SNAT address (kube-proxy's masquerade):
    /// served while `snat_ports` leaves the NodePorts out. A NodePort inside the range is left out
    /// alone, saying why, rather than lb-core refusing the whole Service (its cluster IP too).
    #[test]
    fn node_ports_on_the_snat_address_are_served_outside_its_port_range() {
        let svc: Service = fixture!("service-web.json");
        let mut lb: Service = fixture!("service-web.json");
        lb.metadata.name = Some("web-np".into());
        let spec = lb.spec.as_mut().unwrap();
        spec.type_ = Some("NodePort".into());
        spec.cluster_ip = Some("10.96.0.99".into());
        spec.cluster_ips = Some(vec!["10.96.0.99".into()]);
        for (i, p) in spec.ports.iter_mut().flatten().enumerate() {
            p.node_port = Some(30080 + i as i32);
        }
        let keys = |t: &Translation| -> Vec<String> { t.services.iter().map(|s| s.config.key.to_string()).collect() };
        // Every service translated is one lb-core accepts.
        let accepted = |t: &Translation, node: &NodeConfig| {
            let mut config = lb_core::config::Config {
                node: NodeConfig { gateway_mac: Some([2, 0, 0, 0, 0, 0xfe]), ..node.clone() },
                services: t.services.iter().map(|s| s.config.clone()).collect(),
            };
            for s in &mut config.services {
                s.backends.clear();
            }
            lb_core::service::TableBuilder::new().build(&config).unwrap();
        };
        let on_snat = NodeConfig { snat_v4: Some(Ipv4Addr::new(192, 168, 1, 10)), ..node() };
        assert_eq!(on_snat.snat_ports, (32768, 60999), "the default range leaves NodePorts out");
        let t = translate([&svc, &lb], [], &settings(), &on_snat);
        assert!(t.skipped.is_empty(), "{:?}", t.skipped);
        assert_eq!(keys(&t).iter().filter(|k| k.contains(" 192.168.1.10:3008")).count(), 2, "{:?}", keys(&t));
        accepted(&t, &on_snat);

        // A range that holds the first NodePort: that key alone is left out.
        let narrow = NodeConfig { snat_ports: (30000, 30080), ..on_snat };
        let t = translate([&svc, &lb], [], &settings(), &narrow);
        assert!(keys(&t).iter().any(|k| k.contains(" 10.96.0.99:")), "the cluster IP stays: {:?}", keys(&t));
        assert!(keys(&t).iter().any(|k| k.contains(" 192.168.1.10:30081")), "{:?}", keys(&t));
        assert!(keys(&t).iter().all(|k| !k.contains(" 192.168.1.10:30080")), "{:?}", keys(&t));
        assert_eq!(t.skipped.len(), 1, "{:?}", t.skipped);
        assert!(
            t.skipped[0].reason.contains(
                "192.168.1.10:30080: the address is node.snat_v4 and the port is in node.snat_ports 30000-30080"
            ),
            "{:?}",
            t.skipped
        );
        accepted(&t, &narrow);

        // On a tunnel source address, no key.
        let on_tunnel = NodeConfig { tunnel_src_v4: Some(Ipv4Addr::new(192, 168, 1, 10)), ..node() };
        let t = translate([&svc, &lb], [], &settings(), &on_tunnel);
        assert_eq!(t.skipped.len(), 2, "{:?}", t.skipped);
        assert!(t.skipped.iter().all(|s| s.reason.contains("is node.tunnel_src_v4")), "{:?}", t.skipped);
        accepted(&t, &on_tunnel);
    }

    #[test]
    fn key_conflict_keeps_the_older_service() {
        let older: Service = fixture!("service-edge-loadbalancer.json");
        let mut newer: Service = fixture!("service-edge-loadbalancer.json");
        newer.metadata.name = Some("edge-copy".into());
        newer.metadata.creation_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time("2026-11-03T00:00:00Z".parse().unwrap()));
        newer.spec.as_mut().unwrap().cluster_ips = Some(vec!["10.96.7.8".into()]);
        let t = translate([&newer, &older], [], &settings(), &node());
        assert!(find(&t, "tcp 203.0.113.11:443").name.starts_with("ingress/edge:"));
        assert!(find(&t, "tcp 10.96.7.8:443").name.starts_with("ingress/edge-copy:"));
        assert!(t.skipped.iter().any(|s| s.service == "ingress/edge-copy" && s.reason.contains("203.0.113.11")));
    }

    /// `spec.loadBalancerIP` is a request the cloud may ignore (kube-proxy never reads it; it serves
    /// `status.loadBalancer.ingress` only). When the cloud gave that IP to another Service, the
    /// traffic to it is that Service's, however old the Service that asked for it.
    #[test]
    fn a_requested_load_balancer_ip_yields_to_the_service_whose_status_has_it() {
        // edge asked for 203.0.113.10 and has no address in its status yet (no controller gave it
        // one), so its request is served, but only where no other Service claims the key.
        let mut older: Service = fixture!("service-edge-loadbalancer.json");
        older.status = None;
        let mut newer: Service = fixture!("service-edge-loadbalancer.json");
        newer.metadata.name = Some("portal".into());
        newer.metadata.creation_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time("2026-11-03T00:00:00Z".parse().unwrap()));
        let spec = newer.spec.as_mut().unwrap();
        spec.cluster_ips = Some(vec!["10.96.7.8".into()]);
        spec.load_balancer_ip = None;
        for p in spec.ports.iter_mut().flatten() {
            p.node_port = Some(31444);
        }
        newer.status = Some(
            serde_json::from_value(serde_json::json!({ "loadBalancer": { "ingress": [{ "ip": "203.0.113.10" }] } }))
                .unwrap(),
        );
        for order in [[&older, &newer], [&newer, &older]] {
            let t = translate(order, [], &settings(), &node());
            assert!(find(&t, "tcp 203.0.113.10:443").name.starts_with("ingress/portal:"), "{t:#?}");
            assert!(find(&t, "udp 203.0.113.10:443").name.starts_with("ingress/portal:"));
            assert!(t.skipped.iter().all(|s| s.service == "ingress/edge" && s.reason.contains("203.0.113.10")));
            assert_eq!(t.skipped.len(), 2, "{:?}", t.skipped);
        }
        // Nobody else has it: the requested IP is served.
        let t = translate([&older], [], &settings(), &node());
        assert!(find(&t, "tcp 203.0.113.10:443").name.starts_with("ingress/edge:"));
        // Once the status gives edge another address, its request is no address of it, whoever has it.
        let given: Service = fixture!("service-edge-loadbalancer.json");
        let t = translate([&given], [], &settings(), &node());
        assert!(t.services.iter().all(|s| s.config.key.vip != "203.0.113.10".parse::<IpAddr>().unwrap()), "{t:#?}");
        assert!(find(&t, "tcp 203.0.113.11:443").name.starts_with("ingress/edge:"));
    }

    /// kube-proxy runs one proxier per family and a Service only in those of its cluster IPs: an
    /// external or load-balancer IP of another family is not served (it has no endpoints of that
    /// family). Served with no backends, it dropped its traffic, and took the key from a newer
    /// Service of that family listing the same IP.
    #[test]
    fn external_and_load_balancer_ips_of_another_family_than_the_services_are_left_out() {
        let mut v4_only: Service = fixture!("service-api-nodeport-local.json");
        v4_only.metadata.creation_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time("2026-11-01T00:00:00Z".parse().unwrap()));
        let spec = v4_only.spec.as_mut().unwrap();
        spec.external_ips = Some(vec!["2001:db8::5".into()]);
        spec.type_ = Some("LoadBalancer".into());
        v4_only.status = Some(
            serde_json::from_value(serde_json::json!({ "loadBalancer": { "ingress": [{ "ip": "2001:db8::6" }] } }))
                .unwrap(),
        );
        let mut dual: Service = fixture!("service-web.json");
        dual.spec.as_mut().unwrap().external_ips = Some(vec!["2001:db8::5".into()]);
        let v6: EndpointSlice = fixture!("endpointslice-web-ipv6.json");
        let t = translate([&v4_only, &dual], [&v6], &settings(), &node());
        let ext = find(&t, "tcp [2001:db8::5]:80");
        assert_eq!(ext.name, "shop/web:http");
        assert_eq!(backends(ext), vec![("[fd00:10:244:1::5]:8080".into(), BackendState::Active, 100)]);
        assert!(!t.services.iter().any(|s| s.config.key.vip == "2001:db8::6".parse::<IpAddr>().unwrap()), "{t:#?}");
        assert!(t.services.iter().any(|s| s.config.key.to_string() == "tcp 10.96.40.2:80"));
        let api: Vec<&str> = t.skipped.iter().filter(|s| s.service == "shop/api").map(|s| s.reason.as_str()).collect();
        assert!(
            api.iter().any(|r| r.contains("2001:db8::5")) && api.iter().any(|r| r.contains("2001:db8::6")),
            "{api:?}"
        );
    }

    #[test]
    fn modes_the_node_cannot_serve_skip_keys() {
        let svc: Service = fixture!("service-web.json");
        let v4: EndpointSlice = fixture!("endpointslice-web-ipv4.json");
        let only_v4 = NodeConfig { snat_v6: None, ..node() };
        let t = translate([&svc], [&v4], &settings(), &only_v4);
        assert_eq!(t.services.len(), 2, "IPv6 keys skipped: {t:#?}");
        assert!(t.skipped.iter().all(|s| s.reason.contains("node.snat_v6")));

        let tunnel = NodeConfig { tunnel_src_v4: Some(Ipv4Addr::new(192, 168, 1, 101)), ..node() };
        let ipip = KubernetesSettings { default_mode: ForwardMode::IpIp, ..settings() };
        let t = translate([&svc], [&v4], &ipip, &tunnel);
        // http: 80 -> 8080 (named "http") cannot be IP-in-IP; metrics: 9090 -> 9090 can. The IPv6
        // keys have no tunnel source.
        let served: Vec<String> = t.services.iter().map(|s| s.config.key.to_string()).collect();
        assert_eq!(served, ["tcp 10.96.12.34:9090"], "{t:#?}");
        assert!(t.skipped.iter().any(|s| s.reason.contains("only NAT")));
        assert!(t.skipped.iter().any(|s| s.reason.contains("node.tunnel_src_v6")));
    }

    /// DSR leaves the frame addressed to the VIP and needs the backend's own MAC; endpoints have
    /// none, and the gateway's would send the frame back to this node (a loop until its TTL runs
    /// out). A Service annotated `dsr` is skipped, reported, whatever its ports and endpoints.
    #[test]
    fn a_dsr_service_is_skipped_as_endpoints_have_no_mac() {
        let mut svc: Service = fixture!("service-web.json");
        svc.metadata.annotations.get_or_insert_default().insert(annotations::MODE.into(), "dsr".into());
        let v4: EndpointSlice = fixture!("endpointslice-web-ipv4.json");
        let t = translate([&svc], [&v4], &settings(), &node());
        assert!(t.services.is_empty(), "{t:#?}");
        assert!(!t.skipped.is_empty());
        assert!(t.skipped.iter().all(|s| s.reason.contains("cannot be dsr") && s.reason.contains("own MAC")), "{t:#?}");
    }

    /// Topology hints (what the EndpointSlice controller writes for `trafficDistribution:
    /// PreferClose` or `service.kubernetes.io/topology-mode: Auto`) narrow the new flows of a
    /// Cluster-policy key as kube-proxy does; the endpoints left out keep their established flows.
    #[test]
    fn topology_hints_keep_new_flows_in_the_nodes_zone_or_node() {
        use BackendState::{Active, Draining};
        use k8s_openapi::api::discovery::v1::{EndpointConditions, ForNode};
        let svc: Service = fixture!("service-api-nodeport-local.json");
        let slice: EndpointSlice = fixture!("endpointslice-api-zoned.json");
        let on = |node: &str, zone: Option<&str>| KubernetesSettings {
            node_name: Some(node.into()),
            node_zone: zone.map(Into::into),
            ..settings()
        };
        let states = |slice: &EndpointSlice, settings: &KubernetesSettings, key: &str| -> Vec<(String, BackendState)> {
            let t = translate([&svc], [slice], settings, &node());
            backends(find(&t, key)).into_iter().map(|(b, s, _)| (b, s)).collect()
        };
        let want = |s: [BackendState; 3]| -> Vec<(String, BackendState)> {
            ["10.244.1.10:8080", "10.244.2.20:8080", "10.244.3.21:8080"].iter().map(|b| b.to_string()).zip(s).collect()
        };
        let cluster_ip = "tcp 10.96.40.2:80";
        // node-a in zone-a: zone-a's two endpoints take new flows; zone-b's keeps its flows.
        assert_eq!(states(&slice, &on("node-a", Some("zone-a")), cluster_ip), want([Active, Draining, Active]));
        assert_eq!(states(&slice, &on("node-b", Some("zone-b")), cluster_ip), want([Draining, Active, Draining]));
        // externalTrafficPolicy Local ignores hints: this node's endpoint only.
        assert_eq!(
            states(&slice, &on("node-a", Some("zone-a")), "tcp 192.168.1.10:30080"),
            vec![("10.244.1.10:8080".to_string(), Active)]
        );
        // No endpoint hinted for the node's zone, or the zone unknown: hints ignored.
        assert_eq!(states(&slice, &on("node-a", Some("zone-c")), cluster_ip), want([Active; 3]));
        assert_eq!(states(&slice, &on("node-a", None), cluster_ip), want([Active; 3]));
        // One ready endpoint without hints (the controller mid-update): hints ignored.
        let mut partial = slice.clone();
        partial.endpoints[1].hints = None;
        assert_eq!(states(&partial, &on("node-a", Some("zone-a")), cluster_ip), want([Active; 3]));
        // ...unless it is terminating: only ready endpoints take part.
        partial.endpoints[1].conditions =
            Some(EndpointConditions { ready: Some(false), serving: Some(true), terminating: Some(true) });
        assert_eq!(states(&partial, &on("node-a", Some("zone-a")), cluster_ip), want([Active, Draining, Active]));
        // Node hints (PreferSameNode) come first: on node-b, its own endpoint alone, whatever the zone.
        let mut by_node = slice.clone();
        for ep in &mut by_node.endpoints {
            ep.hints.as_mut().unwrap().for_nodes = Some(vec![ForNode { name: ep.node_name.clone().unwrap() }]);
        }
        assert_eq!(states(&by_node, &on("node-b", Some("zone-a")), cluster_ip), want([Draining, Active, Draining]));
        // A node no endpoint is hinted for falls back to the zone hints.
        assert_eq!(states(&by_node, &on("node-z", Some("zone-a")), cluster_ip), want([Active, Draining, Active]));
    }

    /// Zone hints on endpoints of a slice weighted 0 (`lb.example.dev/weight`: a canary turned off):
    /// those take no new flows, so a zone with no other hinted endpoint is as one with none, and
    /// the hints are ignored, rather than this node's new flows finding no backend at all.
    #[test]
    fn topology_hints_for_a_zone_whose_endpoints_take_no_new_flows_are_ignored() {
        let svc: Service = fixture!("service-api-nodeport-local.json");
        let zoned: EndpointSlice = fixture!("endpointslice-api-zoned.json");
        // zone-b's endpoint in the stable slice; zone-a's two in a canary slice weighted 0.
        let mut stable = zoned.clone();
        stable.endpoints.retain(|e| e.zone.as_deref() == Some("zone-b"));
        let mut canary = zoned.clone();
        canary.metadata.name = Some("api-canary".into());
        canary.metadata.annotations = Some([(annotations::WEIGHT.to_string(), "0".to_string())].into_iter().collect());
        canary.endpoints.retain(|e| e.zone.as_deref() == Some("zone-a"));
        assert_eq!((stable.endpoints.len(), canary.endpoints.len()), (1, 2));
        let on_a = KubernetesSettings { node_zone: Some("zone-a".into()), ..settings() };
        let t = translate([&svc], [&stable, &canary], &on_a, &node());
        let s = find(&t, "tcp 10.96.40.2:80");
        assert!(s.backends.iter().any(BackendConfig::takes_new_flows), "no backend takes new flows: {:?}", backends(s));
    }

    /// A hand-managed slice (the canary's) with an address no host holds (multicast, broadcast:
    /// the API server lets them through) or one that is no address: that endpoint is left out alone, and
    /// the key with its other endpoints is one lb-core accepts, rather than one it refuses whole.
    #[test]
    fn an_endpoint_address_no_host_holds_is_left_out_alone() {
        let svc: Service = fixture!("service-checkout-canary.json");
        let mut slice: EndpointSlice = fixture!("endpointslice-checkout-stable.json");
        for bad in ["239.1.2.3", "255.255.255.255", "10.244.4.300"] {
            let mut ep = slice.endpoints[0].clone();
            ep.addresses = vec![bad.into()];
            slice.endpoints.push(ep);
        }
        let t = translate([&svc], [&slice], &settings(), &node());
        let s = find(&t, "tcp 10.96.80.80:80");
        assert_eq!(backends(s), vec![("10.244.4.10:8080".into(), BackendState::Active, 90)]);
        let config = lb_core::config::Config {
            node: NodeConfig { gateway_mac: Some([2, 0, 0, 0, 0, 0xfe]), ..node() },
            services: vec![s.clone()],
        };
        lb_core::service::validate(&config).unwrap();
    }

    /// An address of the other family than its slice's `addressType` (an IPv4 address in an IPv6
    /// slice: refused by the API server's validation, so only from a slice that bypassed it) is
    /// an endpoint of neither family, as kube-proxy's proxier of each family reads only the slices
    /// of its type (`EndpointsChangeTracker.EndpointSliceUpdate`). It was a backend of the IPv4 keys.
    #[test]
    fn an_address_of_another_family_than_its_slice_is_no_endpoint() {
        let svc: Service = fixture!("service-web.json");
        let v4: EndpointSlice = fixture!("endpointslice-web-ipv4.json");
        let mut v6: EndpointSlice = fixture!("endpointslice-web-ipv6.json");
        let mut stray = v6.endpoints[0].clone();
        stray.addresses = vec!["10.244.1.77".into()];
        v6.endpoints.push(stray);
        let t = translate([&svc], [&v4, &v6], &settings(), &node());
        let http = find(&t, "tcp 10.96.12.34:80");
        assert!(http.backends.iter().all(|b| b.addr != IpAddr::from([10, 244, 1, 77])), "{:?}", backends(http));
        assert_eq!(http.backends.len(), 4);
        let http6 = find(&t, "tcp [fd00:10:96::1234]:80");
        assert_eq!(backends(http6), vec![("[fd00:10:244:1::5]:8080".into(), BackendState::Active, 100)]);
        // An IPv4-mapped address in an IPv4 slice (which validation lets through) is the IPv4 address.
        let mut mapped = v4.clone();
        mapped.endpoints.truncate(1);
        mapped.endpoints[0].addresses = vec!["::ffff:10.244.1.78".into()];
        let t = translate([&svc], [&mapped], &settings(), &node());
        assert_eq!(backends(find(&t, "tcp 10.96.12.34:80")), [("10.244.1.78:8080".into(), BackendState::Active, 100)]);
    }

    #[test]
    fn affinity_default_timeout_and_nil_conditions() {
        let mut svc: Service = fixture!("service-checkout-canary.json");
        let spec = svc.spec.as_mut().unwrap();
        spec.session_affinity = Some("ClientIP".into());
        let mut slice: EndpointSlice = fixture!("endpointslice-checkout-stable.json");
        slice.endpoints[0].conditions = None;
        // Not ready, terminating, `serving` unset: serving, as kube-proxy reads a nil `serving`.
        let mut going = slice.endpoints[0].clone();
        going.addresses = vec!["10.244.4.11".into()];
        going.conditions = Some(k8s_openapi::api::discovery::v1::EndpointConditions {
            ready: Some(false),
            serving: None,
            terminating: Some(true),
        });
        slice.endpoints.push(going);
        let t = translate([&svc], [&slice], &settings(), &node());
        let s = find(&t, "tcp 10.96.80.80:80");
        assert_eq!(s.affinity_timeout, Some(DEFAULT_AFFINITY_TIMEOUT));
        assert_eq!(s.backends[0].state, BackendState::Active, "nil conditions mean ready");
        assert_eq!(s.backends[1].state, BackendState::Draining, "a nil serving means serving");
    }
}

#[cfg(test)]
mod proptests {
    use k8s_openapi::api::discovery::v1::{Endpoint as SliceEndpoint, EndpointConditions, EndpointPort};
    use proptest::prelude::*;

    use super::*;

    fn cond() -> impl Strategy<Value = Option<bool>> {
        prop_oneof![Just(None), Just(Some(true)), Just(Some(false))]
    }

    prop_compose! {
        fn endpoint()(ready in cond(), serving in cond(), terminating in cond(), node in 0u8..3, host in 1u8..50)
            -> (SliceEndpoint, (Option<bool>, Option<bool>, Option<bool>)) {
            (SliceEndpoint {
                addresses: vec![format!("10.244.{node}.{host}")],
                conditions: Some(EndpointConditions { ready, serving, terminating }),
                node_name: Some(format!("node-{node}")),
                ..Default::default()
            }, (ready, serving, terminating))
        }
    }

    proptest! {
        /// Whatever the conditions and placement: an endpoint is Active iff ready (nil = ready) and
        /// Draining otherwise (its established flows kept); Local keeps exactly this node's
        /// endpoints; with none of those ready, the serving and terminating ones are Active; of
        /// two copies of an address, one not terminating wins.
        #[test]
        fn conditions_and_locality(eps in proptest::collection::vec(endpoint(), 0..12), local in any::<bool>()) {
            let mut svc: Service = serde_json::from_str(include_str!("../../tests/fixtures/service-api-nodeport-local.json")).unwrap();
            svc.spec.as_mut().unwrap().internal_traffic_policy = Some(if local { "Local" } else { "Cluster" }.into());
            let slice = EndpointSlice {
                address_type: "IPv4".into(),
                endpoints: eps.iter().map(|(e, _)| e.clone()).collect(),
                metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
                    name: Some("api-x".into()),
                    namespace: Some("shop".into()),
                    labels: Some([(SERVICE_NAME_LABEL.to_string(), "api".to_string())].into()),
                    ..Default::default()
                },
                ports: Some(vec![EndpointPort { name: Some(String::new()), port: Some(8080), protocol: Some("TCP".into()), app_protocol: None }]),
            };
            let settings = KubernetesSettings { node_name: Some("node-0".into()), ..Default::default() };
            let node = NodeConfig { snat_v4: Some("192.168.1.10".parse().unwrap()), ..Default::default() };
            let t = translate([&svc], [&slice], &settings, &node);
            let cluster = t.services.iter().find(|s| s.config.key.port == 80).unwrap();
            // Expected, by rank (2 ready, 1 serving and terminating, 0 neither): an address seen
            // twice keeps the copy not terminating if it has one, then the best rank.
            let mut best: BTreeMap<IpAddr, (bool, u8)> = BTreeMap::new();
            for (e, (ready, serving, terminating)) in &eps {
                if local && e.node_name.as_deref() != Some("node-0") { continue; }
                let r = if ready.unwrap_or(true) { 2 }
                    else if serving.unwrap_or(true) && terminating.unwrap_or(false) { 1 }
                    else { 0 };
                let copy = (!terminating.unwrap_or(false), r);
                let kept = best.entry(e.addresses[0].parse().unwrap()).or_insert(copy);
                *kept = (*kept).max(copy);
            }
            let rank: BTreeMap<IpAddr, u8> = best.into_iter().map(|(a, (_, r))| (a, r)).collect();
            let none_ready = !rank.values().any(|&r| r == 2);
            let want: BTreeMap<IpAddr, BackendState> = rank
                .iter()
                .map(|(&a, &r)| (a, if r == 2 || (none_ready && r == 1) { BackendState::Active } else { BackendState::Draining }))
                .collect();
            let got: BTreeMap<IpAddr, BackendState> = cluster.config.backends.iter().map(|b| (b.addr, b.state)).collect();
            prop_assert_eq!(got, want);
            prop_assert!(cluster.config.backends.iter().all(|b| b.port == 8080 && b.weight == annotations::DEFAULT_WEIGHT));
        }
    }
}
