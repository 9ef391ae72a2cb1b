//! Kubernetes endpoint changes and rejected updates end to end, on the path `lb run` uses:
//!
//! ```text
//!  local list/watch API server ─► Feed ─► translate ─► ControlPlane ─► TableBuilder ─► Arc<Tables>
//!  (k8s_support, via kubeconfig)     configuration file ─┘    └─ lb-io update channel ─► AF_XDP poll
//!                                                                 loop running lb-core's Worker
//! ```
//! Real kernel TCP clients in the lab's client namespace hold connections through the VIPs (IPv4 and
//! IPv6, NAT) to three echo backends that the cluster knows as the endpoints of Service `lab/echo`.
//!
//! 1. One endpoint fails its readiness probe (not ready, not serving), recovers, turns
//!    serving-but-terminating, then leaves the EndpointSlices. Every held connection does a round trip
//!    after each change: those to serving endpoints never break, those to the not-ready and the
//!    terminating one keep working meanwhile, new connections avoid it, and once it
//!    is gone its connections end as the Service's `on-backend-removed` annotation says (reset by the
//!    backend they are rescheduled to, or dropped so the client's read times out).
//! 2. Bad configuration file reloads (broken YAML; a field out of range; a file lb-core's table builder
//!    refuses) are rejected, counted and explained in the live state, nothing reaches the worker, held
//!    and new connections keep being served by the running tables, and later cluster changes (built
//!    on the old file, not the rejected one) and a good reload still apply.
//!
//! Endpoints carry addresses only, so the load balancer sends to `node.gateway_mac`: the lab's bridge,
//! made a router, routes to the backends as a node's gateway routes to pod IPs.
//! Synchronisation is by events: the API server's watch stream, the live state's watch channel, and
//! the worker handing old tables back after each swap (the sink waits for it, so tables the live
//! state shows are the worker's). Timeouts only turn a hang into a failure.
//! Needs root (namespaces, XDP, AF_XDP); skips with the reason otherwise.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::collections::BTreeMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, mpsc};
use std::time::Duration;

use lb_core::config::{BackendState, Protocol, RemovedBackendPolicy};
use lb_core::service::{TableBuilder, Tables};
use lb_examples::config::file;
use lb_examples::control::{ControlPlane, LiveState, TablesSink};
use lb_examples::lab::{
    BACKENDS, Lab, LabSink, Mode, PORT, RunningLb, SNAT4, SNAT6, VIP4, VIP6, retrying, start_lb, tables,
};
use lb_examples::metrics::{CoreSnapshot, StatsSource};
use lb_io::bpf::AttachMode;
use lb_io::netns::{can_create_namespaces, enter_netns, format_mac};
use serde_json::{Value, json};
use tokio::sync::{oneshot, watch};

mod k8s_support;
use k8s_support::{FakeApi, SERVICES, SLICES, kubeconfig};

const CONNS_PER_FAMILY: usize = 12;
/// Read timeout of a connection that must answer.
const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// Read timeout of a connection the load balancer drops on purpose (policy `drop`).
const DROPPED_TIMEOUT: Duration = Duration::from_millis(1500);
/// How long the worker may take to swap tables, and the control side to follow the cluster or file.
const FAILSAFE: Duration = Duration::from_secs(20);
/// A port only the file's services (added by a good reload) use.
const FILE_PORT: u16 = 8080;

fn vips() -> [IpAddr; 2] {
    [IpAddr::V4(VIP4), IpAddr::V6(VIP6)]
}

/// The lab's sink (the poll loop's update sender and steering maps, as `lb run` uses them), counting
/// what it published.
struct CountedSink {
    sink: LabSink,
    published: Arc<AtomicUsize>,
}

impl TablesSink for CountedSink {
    fn conntrack_seed(&self) -> lb_core::conntrack::ConntrackSeed {
        self.sink.conntrack_seed()
    }

    fn publish(&mut self, tables: &Arc<Tables>) -> Result<(), String> {
        self.sink.publish(tables)?;
        self.published.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

/// What the cluster says about one endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Endpoint {
    Ready,
    /// Failing its readiness probe: not ready, not serving, not terminating.
    NotReady,
    /// Pod deleted, still serving during its grace period.
    Terminating,
    /// Pod gone: not in the slices.
    Gone,
}

/// The cluster: Service `lab/echo` on both VIPs, and one EndpointSlice per family.
struct Cluster {
    policy: Option<&'static str>,
    endpoints: BTreeMap<&'static str, Endpoint>,
}

impl Cluster {
    fn new(policy: Option<&'static str>) -> Cluster {
        Cluster { policy, endpoints: BACKENDS.iter().map(|b| (*b, Endpoint::Ready)).collect() }
    }

    fn service(&self) -> Value {
        let mut meta = json!({ "name": "echo", "namespace": "lab", "creationTimestamp": "2026-11-23T10:00:00Z" });
        if let Some(p) = self.policy {
            meta["annotations"] = json!({ "lb.example.dev/on-backend-removed": p });
        }
        json!({
            "apiVersion": "v1", "kind": "Service", "metadata": meta,
            "spec": {
                "type": "ClusterIP",
                "clusterIP": VIP4.to_string(),
                "clusterIPs": [VIP4.to_string(), VIP6.to_string()],
                "ipFamilies": ["IPv4", "IPv6"],
                "ipFamilyPolicy": "RequireDualStack",
                "ports": [{ "name": "http", "port": PORT, "protocol": "TCP", "targetPort": "http" }],
                "selector": { "app": "echo" }
            }
        })
    }

    fn slices(&self, lab: &Lab) -> Vec<Value> {
        ["IPv4", "IPv6"]
            .iter()
            .map(|family| {
                let endpoints: Vec<Value> = self
                    .endpoints
                    .iter()
                    .filter(|(_, e)| **e != Endpoint::Gone)
                    .map(|(name, e)| {
                        let b = lab.backend_named(name).unwrap();
                        let addr = if *family == "IPv4" { b.v4.to_string() } else { b.v6.to_string() };
                        let (ready, serving, terminating) = match e {
                            Endpoint::Ready => (true, true, false),
                            Endpoint::NotReady => (false, false, false),
                            _ => (false, true, true),
                        };
                        json!({ "addresses": [addr], "nodeName": "node-a",
                                "targetRef": { "kind": "Pod", "namespace": "lab", "name": format!("echo-{name}") },
                                "conditions": { "ready": ready, "serving": serving, "terminating": terminating } })
                    })
                    .collect();
                json!({
                    "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": family,
                    "metadata": { "name": format!("echo-{}", family.to_lowercase()), "namespace": "lab",
                                  "labels": { "kubernetes.io/service-name": "echo" } },
                    "endpoints": endpoints,
                    "ports": [{ "name": "http", "port": PORT, "protocol": "TCP" }]
                })
            })
            .collect()
    }

    /// Writes the current slices to the API server (watchers see MODIFIED events).
    fn publish_slices(&self, api: &FakeApi, lab: &Lab) {
        for s in self.slices(lab) {
            api.upsert(SLICES, s);
        }
    }
}

/// The configuration file: the lab's node, the feed on, and `services` (YAML list items) if any.
fn file_yaml(lab: &Lab, gateway: [u8; 6], kubeconfig: &Path, services: &str) -> String {
    format!(
        "node:\n  local_mac: \"{}\"\n  gateway_mac: \"{}\"\n  snat_v4: {SNAT4}\n  snat_v6: \"{SNAT6}\"\n\
         kubernetes:\n  kubeconfig: {}\n  node_name: node-a\n  debounce: 5ms\n\
         services:{}\n",
        format_mac(lab.lb_mac),
        format_mac(gateway),
        kubeconfig.display(),
        if services.is_empty() { " []".to_string() } else { format!("\n{services}") }
    )
}

/// Replaces the file in one step, so the reload watcher never reads half of it.
fn write_file(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// The state of each backend (by name, IPv4 or not) of the TCP services on the VIPs at `port`.
fn states(lab: &Lab, t: &Tables, port: u16) -> BTreeMap<(&'static str, bool), BackendState> {
    let mut out = BTreeMap::new();
    for s in t.services().iter().filter(|s| s.key.port == port && s.key.proto == Protocol::Tcp) {
        for b in s.backends.iter() {
            let l = lab.backends.iter().find(|l| IpAddr::V4(l.v4) == b.addr || IpAddr::V6(l.v6) == b.addr).unwrap();
            out.insert((l.name, b.addr.is_ipv4()), b.state);
        }
    }
    out
}

/// What the cluster should look like in the tables: every listed endpoint on both families.
fn expected(cluster: &Cluster) -> BTreeMap<(&'static str, bool), BackendState> {
    let mut out = BTreeMap::new();
    for (name, e) in &cluster.endpoints {
        let state = match e {
            Endpoint::Ready => BackendState::Active,
            Endpoint::NotReady | Endpoint::Terminating => BackendState::Draining,
            Endpoint::Gone => continue,
        };
        for v4 in [true, false] {
            out.insert((*name, v4), state);
        }
    }
    out
}

/// Writes `msg` on `conn`.
fn send(conn: &mut TcpStream, msg: &str) -> std::io::Result<()> {
    conn.write_all(msg.as_bytes())
}

/// Reads the answer to `msg`; returns the answering backend's name.
fn answer(conn: &mut TcpStream, msg: &str) -> std::io::Result<String> {
    let mut buf = [0u8; 256];
    let n = retrying(|| conn.read(&mut buf))?;
    if n == 0 {
        return Err(ErrorKind::UnexpectedEof.into());
    }
    let reply = String::from_utf8_lossy(&buf[..n]).into_owned();
    let (name, echoed) = reply.split_once(' ').unwrap_or((&reply, ""));
    if echoed != msg {
        return Err(std::io::Error::new(ErrorKind::InvalidData, format!("sent {msg:?}, the backend echoed {reply:?}")));
    }
    Ok(name.to_string())
}

/// A new connection to `vip`:`port` and one round trip on it; the answering backend.
fn fresh_one(vip: IpAddr, port: u16, msg: &str) -> std::io::Result<(TcpStream, String)> {
    let mut c = TcpStream::connect_timeout(&SocketAddr::new(vip, port), IO_TIMEOUT)?;
    c.set_read_timeout(Some(IO_TIMEOUT))?;
    send(&mut c, msg)?;
    let name = answer(&mut c, msg)?;
    Ok((c, name))
}

/// A held connection: where it goes and the backend that answered its first message.
struct Held {
    vip: IpAddr,
    conn: TcpStream,
    backend: String,
}

/// One held connection after a round trip: the backend it started on, and who answered now (or the error).
type Outcome = (String, Result<String, ErrorKind>);

/// What the client thread is asked to do.
enum Command {
    /// One round trip on every held connection, all at once; those started on the named backend get
    /// the given read timeout.
    Round(Option<(String, Duration)>, mpsc::Sender<Vec<Outcome>>),
    /// Opens this many new connections per VIP on this port, one round trip each, then closes them;
    /// answers by backend, or what failed.
    Fresh(usize, u16, mpsc::Sender<Result<BTreeMap<String, usize>, String>>),
}

/// The client: a thread in the client namespace holding connections, run by commands.
struct Client {
    commands: mpsc::Sender<Command>,
    thread: std::thread::JoinHandle<()>,
}

impl Client {
    /// Opens `CONNS_PER_FAMILY` held connections per VIP; returns the client and how many each backend holds.
    fn start(lab: &Lab) -> (Client, BTreeMap<String, usize>) {
        let ns = lab.client.name().to_string();
        let (commands, rx) = mpsc::channel::<Command>();
        let (spread_tx, spread_rx) = mpsc::channel::<Result<BTreeMap<String, usize>, String>>();
        let thread = std::thread::spawn(move || {
            enter_netns(&ns).unwrap();
            let mut held = Vec::new();
            for vip in vips() {
                for i in 0..CONNS_PER_FAMILY {
                    match fresh_one(vip, PORT, &format!("hello {i}")) {
                        Ok((conn, backend)) => held.push(Held { vip, conn, backend }),
                        Err(e) => {
                            let _ = spread_tx.send(Err(format!("connection {vip} #{i}: {e}")));
                            return;
                        }
                    }
                }
            }
            let mut spread = BTreeMap::new();
            for h in &held {
                *spread.entry(h.backend.clone()).or_insert(0) += 1;
            }
            spread_tx.send(Ok(spread)).unwrap();
            let mut round = 0;
            for cmd in rx {
                match cmd {
                    Command::Round(short, reply) => {
                        round += 1;
                        // Send on every connection first, then read: the timeouts run side by side.
                        let msgs: Vec<String> =
                            (0..held.len()).map(|i| format!("round {round} {} #{i}", held[i].vip)).collect();
                        let sent: Vec<std::io::Result<()>> = held
                            .iter_mut()
                            .zip(&msgs)
                            .map(|(h, m)| {
                                let timeout = match &short {
                                    Some((name, t)) if *name == h.backend => *t,
                                    _ => IO_TIMEOUT,
                                };
                                h.conn.set_read_timeout(Some(timeout))?;
                                send(&mut h.conn, m)
                            })
                            .collect();
                        let out = held
                            .iter_mut()
                            .zip(&msgs)
                            .zip(sent)
                            .map(|((h, m), sent)| {
                                let r = sent.and_then(|()| answer(&mut h.conn, m)).map_err(|e| e.kind());
                                (h.backend.clone(), r)
                            })
                            .collect();
                        reply.send(out).unwrap();
                    }
                    Command::Fresh(n, port, reply) => {
                        let mut by = BTreeMap::new();
                        let mut failed = None;
                        'all: for vip in vips() {
                            for i in 0..n {
                                match fresh_one(vip, port, &format!("new {i}")) {
                                    Ok((_, name)) => *by.entry(name).or_insert(0) += 1,
                                    Err(e) => {
                                        failed = Some(format!("new connection to [{vip}]:{port} #{i}: {e}"));
                                        break 'all;
                                    }
                                }
                            }
                        }
                        reply.send(failed.map_or(Ok(by), Err)).unwrap();
                    }
                }
            }
        });
        let spread = spread_rx.recv().expect("client thread").unwrap_or_else(|e| panic!("{e}"));
        (Client { commands, thread }, spread)
    }

    fn round(&self, short: Option<(&str, Duration)>) -> Vec<Outcome> {
        let (tx, rx) = mpsc::channel();
        self.commands.send(Command::Round(short.map(|(n, t)| (n.to_string(), t)), tx)).unwrap();
        rx.recv().expect("client round")
    }

    /// New connections to both VIPs at `port`; panics naming the first that failed.
    fn fresh(&self, n: usize, port: u16) -> BTreeMap<String, usize> {
        let (tx, rx) = mpsc::channel();
        self.commands.send(Command::Fresh(n, port, tx)).unwrap();
        rx.recv().expect("client thread").unwrap_or_else(|e| panic!("{e}"))
    }

    fn stop(self) {
        drop(self.commands);
        self.thread.join().expect("client thread");
    }
}

/// Every held connection answered, by the backend it started on.
fn assert_all_kept(round: &[Outcome], when: &str) {
    for (i, (was, now)) in round.iter().enumerate() {
        match now {
            Ok(now) => assert_eq!(now, was, "{when}: held connection #{i} moved from {was} to {now}"),
            Err(e) => panic!("{when}: held connection #{i} to {was} broke: {e:?}"),
        }
    }
}

/// The lab, the load balancer over AF_XDP, the local API server and the control plane of `lb run`.
struct Harness {
    lab: Lab,
    lb: RunningLb,
    rt: tokio::runtime::Runtime,
    api: FakeApi,
    dir: PathBuf,
    path: PathBuf,
    kubeconfig: PathBuf,
    gateway: [u8; 6],
    live: watch::Receiver<LiveState>,
    published: Arc<AtomicUsize>,
    stop: oneshot::Sender<()>,
    plane: tokio::task::JoinHandle<()>,
}

impl Harness {
    /// Builds everything with `cluster` in the API server, and waits until the worker serves it; or
    /// says why this machine cannot.
    fn start(prefix: &str, cluster: &Cluster) -> Option<Harness> {
        if let Err(why) = can_create_namespaces() {
            println!("SKIPPED: {why}");
            return None;
        }
        let lab = Lab::build(prefix, Mode::Nat, Path::new(env!("CARGO_BIN_EXE_lb")))
            .unwrap_or_else(|e| panic!("building the lab: {e}"));
        let gateway = lab.add_router().unwrap_or_else(|e| panic!("making the bridge a router: {e}"));
        // The VIPs are the Service's cluster IPs, which the neighbour responder does not answer for
        // (the cluster routes them; no client on a segment asks): the client is pointed at the load
        // balancer as a node's route would point it.
        for vip in vips() {
            lab.client
                .static_neighbour(&vip.to_string(), &format_mac(lab.lb_mac), "eth0")
                .unwrap_or_else(|e| panic!("pinning {vip} on the client: {e}"));
        }
        // Boot tables name the VIPs, so the XDP program steers them to the socket; the control plane
        // replaces them at once.
        let boot = tables(&mut TableBuilder::new(), &lab.config(&BACKENDS, RemovedBackendPolicy::Reschedule)).unwrap();
        let mut lb = match start_lb(&lab, boot, None, AttachMode::Native) {
            Ok(lb) => lb,
            Err(e) if e.contains("Operation not permitted") || e.contains("not supported") => {
                println!("SKIPPED: the kernel refused XDP / AF_XDP: {e}");
                return None;
            }
            Err(e) => panic!("starting the load balancer: {e}"),
        };

        // Built on this (root namespace) thread, so the runtime's threads reach the API server on
        // this namespace's loopback.
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let api = FakeApi::new();
        api.upsert(SERVICES, cluster.service());
        cluster.publish_slices(&api, &lab);
        let (port, _requests) = rt.block_on(k8s_support::start(api.clone()));
        let dir = std::env::temp_dir().join(format!("lb-{}", lab.tag));
        let kubeconfig = kubeconfig(&dir, port);
        let path = dir.join("lb.yaml");
        write_file(&path, &file_yaml(&lab, gateway, &kubeconfig, ""));
        let settings = file::load(&path).unwrap();

        // The control plane owns the poll loop's update sender, as in `lb run`.
        let published = Arc::new(AtomicUsize::new(0));
        let mut sink = lb.sink.take().expect("the lab's sink");
        sink.wait = FAILSAFE;
        let sink = CountedSink { sink, published: published.clone() };
        let stats: Arc<dyn StatsSource> = Arc::new(Vec::<CoreSnapshot>::new);
        let plane = rt
            .block_on(ControlPlane::start(path.clone(), settings, sink, stats, Duration::from_millis(20)))
            .unwrap_or_else(|e| panic!("starting the control plane: {e}"));
        let live = plane.live();
        let (stop, stop_rx) = oneshot::channel::<()>();
        let plane = rt.spawn(plane.run(async move {
            let _ = stop_rx.await;
        }));
        let mut h = Harness { lab, lb, rt, api, dir, path, kubeconfig, gateway, live, published, stop, plane };
        h.wait_for_cluster(cluster, "the initial cluster");
        Some(h)
    }

    /// Waits until the live state (and so the worker) holds what `pred` wants; returns that state.
    fn wait(&mut self, what: &str, pred: impl FnMut(&LiveState) -> bool) -> LiveState {
        let live = &mut self.live;
        let found = self.rt.block_on(async {
            match tokio::time::timeout(FAILSAFE, live.wait_for(pred)).await {
                Ok(Ok(l)) => Some(l.clone()),
                Ok(Err(_)) => panic!("the control plane stopped"),
                Err(_) => None,
            }
        });
        found.unwrap_or_else(|| {
            let l = self.live.borrow();
            let now = l.tables.as_ref().map(|t| states(&self.lab, t, PORT));
            panic!(
                "the control plane never reached {what}; it has {now:?}, rejected {}: {:?}",
                l.rejected, l.last_error
            )
        })
    }

    /// Waits until the worker's tables show `cluster`'s endpoints on both VIPs; returns those tables.
    fn wait_for_cluster(&mut self, cluster: &Cluster, what: &str) -> Arc<Tables> {
        let want = expected(cluster);
        // The lab does not change; a second handle keeps the closure off `self`.
        let names: Vec<(&'static str, IpAddr, IpAddr)> =
            self.lab.backends.iter().map(|b| (b.name, IpAddr::V4(b.v4), IpAddr::V6(b.v6))).collect();
        let matches = |t: &Tables| {
            let mut have = BTreeMap::new();
            for s in t.services().iter().filter(|s| s.key.port == PORT && s.key.proto == Protocol::Tcp) {
                for b in s.backends.iter() {
                    match names.iter().find(|(_, v4, v6)| *v4 == b.addr || *v6 == b.addr) {
                        Some((name, ..)) => have.insert((*name, b.addr.is_ipv4()), b.state),
                        None => return false,
                    };
                }
            }
            have == want
        };
        let l = self.wait(&format!("{what} (want {want:?})"), |l| l.tables.as_deref().is_some_and(matches));
        let t = l.tables.unwrap();
        let tcp = t.services().iter().filter(|s| s.key.port == PORT && s.key.proto == Protocol::Tcp).count();
        assert_eq!(tcp, 2, "one service per VIP");
        t
    }

    /// Stops the control plane and the load balancer; checks every received frame went through the worker.
    fn stop(self) {
        let _ = self.stop.send(());
        self.rt.block_on(async { tokio::time::timeout(FAILSAFE, self.plane).await }).unwrap().unwrap();
        drop(self.rt);
        let outcome = self.lb.stop().unwrap();
        let w = outcome.worker.stats();
        assert_eq!(outcome.stats.rx, w.rx, "every frame the socket received went through the worker");
        assert!(w.reverse_nat > 0, "NAT replies came back through the load balancer");
        let _ = std::fs::remove_dir_all(&self.dir);
        drop(self.lab);
    }
}

fn drain_then_remove(prefix: &str, policy: RemovedBackendPolicy) {
    let annotation = match policy {
        RemovedBackendPolicy::Drop => Some("drop"),
        _ => Some("reschedule"),
    };
    let mut cluster = Cluster::new(annotation);
    let Some(mut h) = Harness::start(prefix, &cluster) else {
        return;
    };
    let t = h.live.borrow().tables.clone().unwrap();
    assert!(
        t.services().iter().filter(|s| s.key.port == PORT).all(|s| s.on_backend_removed == policy),
        "the Service's annotation reached the tables"
    );

    let (client, spread) = Client::start(&h.lab);
    println!("held connections by backend: {spread:?}");
    // The victim: the backend holding the most connections (the strongest check of the policy).
    let victim: &'static str = BACKENDS.iter().copied().max_by_key(|b| spread.get(*b).copied().unwrap_or(0)).unwrap();
    let on_victim = spread[victim];
    assert!(on_victim < 2 * CONNS_PER_FAMILY, "every connection went to {victim}: {spread:?}");

    // 0. The victim fails its readiness probe for a while: its held connections go on (as with
    //    kube-proxy's conntrack), new ones avoid it; then it recovers.
    cluster.endpoints.insert(victim, Endpoint::NotReady);
    cluster.publish_slices(&h.api, &h.lab);
    h.wait_for_cluster(&cluster, &format!("{victim} not ready"));
    assert_all_kept(&client.round(None), &format!("{victim} not ready"));
    let fresh = client.fresh(CONNS_PER_FAMILY, PORT);
    assert!(!fresh.contains_key(victim), "a new connection went to the not-ready {victim}: {fresh:?}");
    assert_eq!(fresh.values().sum::<usize>(), 2 * CONNS_PER_FAMILY);
    cluster.endpoints.insert(victim, Endpoint::Ready);
    cluster.publish_slices(&h.api, &h.lab);
    h.wait_for_cluster(&cluster, &format!("{victim} ready again"));
    assert_all_kept(&client.round(None), &format!("{victim} ready again"));

    // 1. The victim's pod is deleted: serving, terminating, not ready.
    cluster.endpoints.insert(victim, Endpoint::Terminating);
    cluster.publish_slices(&h.api, &h.lab);
    h.wait_for_cluster(&cluster, &format!("{victim} terminating"));
    assert_all_kept(&client.round(None), &format!("{victim} terminating"));
    let fresh = client.fresh(CONNS_PER_FAMILY, PORT);
    println!("new connections while {victim} terminates: {fresh:?}");
    assert!(!fresh.contains_key(victim), "a new connection went to the terminating {victim}: {fresh:?}");
    assert_eq!(fresh.values().sum::<usize>(), 2 * CONNS_PER_FAMILY);
    // Held connections still answer after the new ones came and went.
    assert_all_kept(&client.round(None), &format!("{victim} terminating, after new connections"));

    // 2. The pod is gone: its endpoint leaves the slices.
    cluster.endpoints.insert(victim, Endpoint::Gone);
    cluster.publish_slices(&h.api, &h.lab);
    h.wait_for_cluster(&cluster, &format!("{victim} gone"));
    // Only a dropped connection's read is cut short (it can but time out); a rescheduled one's reset
    // comes back through the load balancer and the new backend, and gets the full bound.
    let short = (policy == RemovedBackendPolicy::Drop).then_some((victim, DROPPED_TIMEOUT));
    let round = client.round(short);
    let mut ended = 0;
    for (i, (was, now)) in round.iter().enumerate() {
        if was == victim {
            let want: &[ErrorKind] = match policy {
                // Rescheduled to a backend that has no such connection: it answers with a reset.
                RemovedBackendPolicy::Reschedule => &[ErrorKind::ConnectionReset],
                // Dropped by the load balancer: nothing comes back, the read times out.
                _ => &[ErrorKind::WouldBlock, ErrorKind::TimedOut],
            };
            match now {
                Err(e) if want.contains(e) => ended += 1,
                other => {
                    panic!("held connection #{i} to the removed {victim}: {other:?}, policy {policy:?} wants {want:?}")
                }
            }
        } else {
            match now {
                Ok(now) => assert_eq!(now, was, "held connection #{i} moved from {was} to {now}"),
                Err(e) => panic!("held connection #{i} to {was} broke when {victim} went away: {e:?}"),
            }
        }
    }
    assert_eq!(ended, on_victim);
    let fresh = client.fresh(CONNS_PER_FAMILY, PORT);
    println!("new connections after {victim} left: {fresh:?}");
    assert!(!fresh.contains_key(victim), "a new connection went to the removed {victim}: {fresh:?}");
    assert_eq!(fresh.values().sum::<usize>(), 2 * CONNS_PER_FAMILY);

    {
        let l = h.live.borrow();
        assert_eq!(l.rejected, 0, "no update rejected: {:?}", l.last_error);
        assert_eq!(l.applied as usize, h.published.load(Ordering::SeqCst), "every applied update reached the worker");
    }
    client.stop();
    h.stop();
}

#[test]
fn terminating_endpoint_drains_then_its_flows_are_rescheduled() {
    drain_then_remove("lbkr", RemovedBackendPolicy::Reschedule);
}

#[test]
fn terminating_endpoint_drains_then_its_flows_are_dropped() {
    drain_then_remove("lbkd", RemovedBackendPolicy::Drop);
}

#[test]
fn rejected_file_reloads_leave_the_running_tables_serving() {
    let mut cluster = Cluster::new(None);
    let Some(mut h) = Harness::start("lbkx", &cluster) else {
        return;
    };
    let (client, spread) = Client::start(&h.lab);
    println!("held connections by backend: {spread:?}");
    let good = file_yaml(&h.lab, h.gateway, &h.kubeconfig, "");
    let (applied, running) = {
        let l = h.live.borrow();
        (l.applied, l.tables.clone().unwrap())
    };
    let published = h.published.load(Ordering::SeqCst);

    // Three bad reloads: YAML that does not parse; a weight out of range (the file validation
    // refuses it); a Maglev table too small for its backends (valid as a file, refused whole by
    // lb-core's table builder).
    let broken = format!("{good}  - {{ name: half, vip: [\n");
    let [b1, b2, b3] = ["b1", "b2", "b3"].map(|n| h.lab.backend_named(n).unwrap().v4);
    let out_of_range = file_yaml(
        &h.lab,
        h.gateway,
        &h.kubeconfig,
        &format!(
            "  - {{ name: heavy, vip: {VIP4}, port: {FILE_PORT}, backends: [{{ addr: {b1}, port: {PORT}, weight: 70000 }}] }}"
        ),
    );
    let too_small = file_yaml(
        &h.lab,
        h.gateway,
        &h.kubeconfig,
        &format!(
            "  - {{ name: small, vip: {VIP4}, port: {FILE_PORT}, maglev_table_size: 2,\n      \
             backends: [{{ addr: {b1}, port: {PORT} }}, {{ addr: {b2}, port: {PORT} }}, {{ addr: {b3}, port: {PORT} }}] }}"
        ),
    );
    let bad_reloads = [
        (broken.as_str(), "did not find expected"),
        (out_of_range.as_str(), "services[0].backends[0].weight: 70000 is out of range"),
        (too_small.as_str(), "configuration rejected: service small: Maglev table size 2 is too small for 3"),
    ];
    for (n, &(bad, names)) in bad_reloads.iter().enumerate() {
        let n = n as u64 + 1;
        write_file(&h.path, bad);
        let l = h.wait(&format!("bad reload {n} counted"), |l| l.rejected >= n);
        let why = l.last_error.clone().unwrap();
        println!("bad reload {n} rejected: {why}");
        assert_eq!(l.rejected, n, "one rejection per bad reload");
        assert!(why.contains(names), "the error says what is wrong ({names:?}): {why}");
        assert_eq!(l.applied, applied, "nothing applied");
        assert!(Arc::ptr_eq(l.tables.as_ref().unwrap(), &running), "the running tables stay");
        assert_eq!(h.published.load(Ordering::SeqCst), published, "a rejected update reached the worker");

        assert_all_kept(&client.round(None), &format!("after bad reload {n}"));
        let fresh = client.fresh(CONNS_PER_FAMILY, PORT);
        println!("new connections after bad reload {n}: {fresh:?}");
        assert_eq!(fresh.values().sum::<usize>(), 2 * CONNS_PER_FAMILY);
    }

    // The control plane is not stuck on the bad file: a cluster change applies, on the old file.
    cluster.endpoints.insert("b3", Endpoint::Terminating);
    cluster.publish_slices(&h.api, &h.lab);
    h.wait_for_cluster(&cluster, "b3 terminating after the bad reloads");
    assert_all_kept(&client.round(None), "b3 terminating after the bad reloads");
    let fresh = client.fresh(CONNS_PER_FAMILY, PORT);
    assert!(!fresh.contains_key("b3"), "a new connection went to the terminating b3: {fresh:?}");

    // A good reload applies: the file adds port 8080 on both VIPs, to b1.
    let b1v6 = h.lab.backend_named("b1").unwrap().v6;
    let with_static = file_yaml(
        &h.lab,
        h.gateway,
        &h.kubeconfig,
        &format!(
            "  - {{ name: static-v4, vip: {VIP4}, port: {FILE_PORT}, backends: [{{ addr: {b1}, port: {PORT} }}] }}\n\
             \x20 - {{ name: static-v6, vip: \"{VIP6}\", port: {FILE_PORT}, backends: [{{ addr: \"{b1v6}\", port: {PORT} }}] }}"
        ),
    );
    write_file(&h.path, &with_static);
    let l = h.wait("the good reload", |l| {
        l.tables.as_ref().is_some_and(|t| t.services().iter().any(|s| s.key.port == FILE_PORT))
    });
    assert_eq!(l.rejected, bad_reloads.len() as u64);
    assert_eq!(states(&h.lab, l.tables.as_ref().unwrap(), PORT), expected(&cluster), "the cluster's services stay");
    let fresh = client.fresh(CONNS_PER_FAMILY / 2, FILE_PORT);
    assert_eq!(fresh, BTreeMap::from([("b1".to_string(), CONNS_PER_FAMILY)]), "port {FILE_PORT} goes to b1");
    assert_all_kept(&client.round(None), "after the good reload");

    client.stop();
    h.stop();
}
