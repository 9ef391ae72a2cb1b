//! The whole control side of `lb run`: configuration file + Kubernetes feed (against the local
//! list/watch server) + control loop, publishing tables to a channel where the workers would be.
//! Checks that cluster changes reach the published tables, that a backend keeps its slot (so its
//! established flows keep their backend) across updates, that a Service lb-core rejects is left out
//! without blocking others, and that a bad file reload is rejected while the tables keep serving.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::sync::Arc;
use std::time::Duration;

use lb_core::config::{BackendState, ForwardMode};
use lb_core::service::Tables;
use lb_examples::config::file;
use lb_examples::control::{ControlPlane, TablesSink};
use lb_examples::metrics::{CoreSnapshot, StatsSource};
use serde_json::json;
use tokio::sync::mpsc;

mod k8s_support;
use k8s_support::{FAILSAFE, FakeApi, NODES, SERVICES, SLICES, endpoint, fixture, kubeconfig, start};

async fn until(
    rx: &mut mpsc::UnboundedReceiver<Arc<Tables>>,
    what: &str,
    pred: impl Fn(&Tables) -> bool,
) -> Arc<Tables> {
    tokio::time::timeout(FAILSAFE, async {
        loop {
            let t = rx.recv().await.expect("control plane stopped");
            if pred(&t) {
                return t;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no tables with {what}"))
}

fn names(t: &Tables) -> Vec<String> {
    t.services().iter().map(|s| format!("{} {}", s.name, s.key)).collect()
}

fn has(t: &Tables, key: &str) -> bool {
    t.services().iter().any(|s| s.key.to_string() == key)
}

fn file_yaml(kubeconfig: &std::path::Path, extra_service: bool) -> String {
    let mut y = format!(
        r#"
node: {{ snat_v4: 192.168.1.10, gateway_mac: "02:00:00:00:00:fe" }}
kubernetes:
  kubeconfig: {}
  node_name: node-a
  node_addresses: [192.168.1.10]
  debounce: 5ms
services:
  - {{ name: static, vip: 10.0.0.10, port: 80, backends: [{{ addr: 10.1.0.1 }}] }}
"#,
        kubeconfig.display()
    );
    if extra_service {
        y.push_str("  - { name: static2, vip: 10.0.0.11, port: 80, backends: [{ addr: 10.1.0.2 }] }\n");
    }
    y
}

/// A fake API server holding the `web` Service (cluster IP 10.96.12.34) and its IPv4 slice, with a
/// kubeconfig for it in a fresh directory named after `name`: (the server, the directory, the
/// kubeconfig's path).
async fn web_cluster(name: &str) -> (FakeApi, std::path::PathBuf, std::path::PathBuf) {
    let api = FakeApi::new();
    let mut web = fixture("service-web.json");
    web["spec"]["clusterIPs"] = json!(["10.96.12.34"]);
    api.upsert(SERVICES, web);
    api.upsert(SLICES, fixture("endpointslice-web-ipv4.json"));
    let (port, _reqs) = start(api.clone()).await;
    let dir = std::env::temp_dir().join(format!("{name}-{}", std::process::id()));
    let kc = kubeconfig(&dir, port);
    (api, dir, kc)
}

/// The control plane of `lb run` on the file `file_yaml(kc, false)` written into `dir`, running and
/// publishing to a channel where the workers would be.
struct Plane {
    tables: mpsc::UnboundedReceiver<Arc<Tables>>,
    live: tokio::sync::watch::Receiver<lb_examples::control::LiveState>,
    node_health: Option<tokio::sync::watch::Receiver<Vec<lb_examples::k8s::translate::NodeHealthCheck>>>,
    path: std::path::PathBuf,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl Plane {
    async fn start(dir: &std::path::Path, kc: &std::path::Path) -> Plane {
        let path = dir.join("lb.yaml");
        std::fs::write(&path, file_yaml(kc, false)).unwrap();
        let settings = file::load(&path).unwrap();
        let (sink, tables) = mpsc::unbounded_channel();
        let stats: Arc<dyn StatsSource> = Arc::new(Vec::<CoreSnapshot>::new);
        let plane = ControlPlane::start(path.clone(), settings, sink, stats, Duration::from_millis(20)).await.unwrap();
        let (live, node_health) = (plane.live(), plane.node_health());
        let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(plane.run(async move {
            let _ = stop_rx.await;
        }));
        Plane { tables, live, node_health, path, stop, task }
    }

    /// Stops the plane and removes `dir`.
    async fn stop(self, dir: &std::path::Path) {
        self.stop.send(()).unwrap();
        tokio::time::timeout(FAILSAFE, self.task).await.unwrap().unwrap();
        let _ = std::fs::remove_dir_all(dir);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_and_file_updates_reach_the_workers_and_bad_ones_do_not() {
    let (api, dir, kc) = web_cluster("lb-k8s-control").await;
    let mut plane = Plane::start(&dir, &kc).await;
    let (tables, live, path) = (&mut plane.tables, &mut plane.live, plane.path.clone());

    // The file's service first, then the cluster's.
    let t = until(tables, "the file service", |t| has(t, "tcp 10.0.0.10:80")).await;
    assert_eq!(t.services().len(), 1, "{:?}", names(&t));
    let t = until(tables, "shop/web", |t| has(t, "tcp 10.96.12.34:80")).await;
    let web = t.services().iter().find(|s| s.key.to_string() == "tcp 10.96.12.34:80").unwrap();
    let states: Vec<_> = web.backends.iter().map(|b| (b.addr.to_string(), b.state)).collect();
    assert!(states.contains(&("10.244.1.9".into(), BackendState::Draining)), "{states:?}");
    let kept = web.backends.iter().find(|b| b.addr.to_string() == "10.244.2.7").unwrap().id;

    // The terminating endpoint goes away; the one that stays keeps its slot and generation, which is
    // what conntrack entries hold, so its established flows keep their backend across the swap.
    let mut slice = fixture("endpointslice-web-ipv4.json");
    slice["endpoints"] = json!([
        endpoint("10.244.1.5", "node-a", true, true, false),
        endpoint("10.244.2.7", "node-b", true, true, false)
    ]);
    api.upsert(SLICES, slice);
    let t = until(tables, "terminating endpoint gone", |t| {
        t.services().iter().any(|s| s.key.to_string() == "tcp 10.96.12.34:80" && s.backends.len() == 2)
    })
    .await;
    let web = t.services().iter().find(|s| s.key.to_string() == "tcp 10.96.12.34:80").unwrap();
    assert_eq!(web.backends.iter().find(|b| b.addr.to_string() == "10.244.2.7").unwrap().id, kept);

    // A Service whose Maglev table is too small for its endpoints is rejected by lb-core; it is left
    // out and a good Service added with it still arrives.
    let mut small = fixture("service-checkout-canary.json");
    small["metadata"]["annotations"]["lb.example.dev/maglev-table-size"] = json!("2");
    api.upsert(SERVICES, small);
    let mut three = fixture("endpointslice-checkout-stable.json");
    three["endpoints"] = json!([
        endpoint("10.244.4.10", "node-a", true, true, false),
        endpoint("10.244.4.11", "node-a", true, true, false),
        endpoint("10.244.4.12", "node-a", true, true, false)
    ]);
    api.upsert(SLICES, three);
    api.upsert(SERVICES, fixture("service-edge-loadbalancer.json"));
    let t = until(tables, "edge", |t| has(t, "tcp 203.0.113.11:443")).await;
    assert!(!has(&t, "tcp 10.96.80.80:80"), "checkout has a too-small Maglev table: {:?}", names(&t));
    // Tables go to the workers before the live state is updated, and the checkout Service and its
    // slice may arrive in separate updates: wait for the skip to be recorded, then catch the channel up
    // to the tables the live state holds, so the bad-file check below sees only what that publishes.
    let seen = tokio::time::timeout(FAILSAFE, live.wait_for(|l| l.k8s_skipped >= 1))
        .await
        .expect("checkout skipped")
        .unwrap()
        .tables
        .clone()
        .unwrap();
    assert!(!has(&seen, "tcp 10.96.80.80:80"), "{:?}", names(&seen));
    if t.version() != seen.version() {
        until(tables, "the tables the live state holds", |t| t.version() == seen.version()).await;
    }

    // A bad file reload is rejected (seen in the live state) and publishes nothing; a good one applies.
    let before = live.borrow().rejected;
    std::fs::write(&path, file_yaml(&kc, false).replace("addr: 10.1.0.1 }", "addr: 10.1.0.1, weight: 70000 }"))
        .unwrap();
    let err = tokio::time::timeout(FAILSAFE, live.wait_for(|l| l.rejected > before))
        .await
        .expect("bad reload counted")
        .unwrap()
        .last_error
        .clone()
        .unwrap();
    assert!(err.contains("services[0].backends[0].weight: 70000"), "{err}");
    assert!(tables.try_recv().is_err(), "nothing published for a bad file");
    std::fs::write(&path, file_yaml(&kc, true)).unwrap();
    let t = until(tables, "static2 after reload", |t| has(t, "tcp 10.0.0.11:80")).await;
    assert!(has(&t, "tcp 203.0.113.11:443") && has(&t, "tcp 10.0.0.10:80"), "{:?}", names(&t));

    plane.stop(&dir).await;
}

/// ingress/edge as a LoadBalancer with `externalTrafficPolicy: Local` and its health check node port
/// on `port`, and its slice: one ready endpoint, on node-a.
fn add_local_edge(api: &FakeApi, port: u16) {
    let mut edge = fixture("service-edge-loadbalancer.json");
    edge["spec"]["externalTrafficPolicy"] = json!("Local");
    edge["spec"]["healthCheckNodePort"] = json!(port);
    api.upsert(SERVICES, edge);
    api.upsert(SLICES, fixture("endpointslice-edge.json"));
}

/// Publishes to a channel and refuses, as workers can, any configuration with a service named
/// `refused`.
struct RefusingSink(mpsc::UnboundedSender<Arc<Tables>>);

impl TablesSink for RefusingSink {
    fn check(&self, config: &lb_core::config::Config) -> Result<(), String> {
        match config.services.iter().any(|s| s.name == "refused") {
            true => Err("service refused cannot be served here".into()),
            false => Ok(()),
        }
    }

    fn publish(&mut self, tables: &Arc<Tables>) -> Result<(), String> {
        self.0.publish(tables)
    }
}

fn mode_of(t: &Tables, key: &str) -> Option<ForwardMode> {
    t.services().iter().find(|s| s.key.to_string() == key).map(|s| s.mode)
}

/// A file reload the workers refuse changes nothing, not even how the feed translates the cluster:
/// its `kubernetes.default_mode` must not reach the feed's node view.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_reload_does_not_change_how_cluster_services_are_translated() {
    let (api, dir, kc) = web_cluster("lb-k8s-refused-view").await;
    let path = dir.join("lb.yaml");
    let yaml = |extra_k8s: &str, extra_service: &str| {
        format!(
            "node: {{ snat_v4: 192.168.1.10, tunnel_src_v4: 192.168.1.11, gateway_mac: \"02:00:00:00:00:fe\" }}\nkubernetes:\n  kubeconfig: {}\n  \
             node_name: node-a\n  debounce: 5ms\n{extra_k8s}services:\n  - {{ name: static, vip: 10.0.0.10, port: 80, \
             backends: [{{ addr: 10.1.0.1 }}] }}\n{extra_service}",
            kc.display()
        )
    };
    std::fs::write(&path, yaml("", "")).unwrap();
    let settings = file::load(&path).unwrap();

    let (tx, mut tables) = mpsc::unbounded_channel();
    let stats: Arc<dyn StatsSource> = Arc::new(Vec::<CoreSnapshot>::new);
    let plane =
        ControlPlane::start(path.clone(), settings, RefusingSink(tx), stats, Duration::from_millis(20)).await.unwrap();
    let mut live = plane.live();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(plane.run(async move {
        let _ = stop_rx.await;
    }));
    // web's metrics port keeps its number, so it could be IP-in-IP; the default mode makes it NAT.
    let t = until(&mut tables, "web:9090", |t| has(t, "tcp 10.96.12.34:9090")).await;
    assert_eq!(mode_of(&t, "tcp 10.96.12.34:9090"), Some(ForwardMode::Nat));

    let before = live.borrow().rejected;
    let refused = "  - { name: refused, vip: 10.0.0.11, port: 80, backends: [{ addr: 10.1.0.2 }] }\n";
    std::fs::write(&path, yaml("  default_mode: ipip\n", refused)).unwrap();
    let err = tokio::time::timeout(FAILSAFE, live.wait_for(|l| l.rejected > before))
        .await
        .expect("refused reload counted")
        .unwrap()
        .last_error
        .clone()
        .unwrap();
    assert!(err.contains("service refused cannot be served here"), "{err}");

    // A cluster change now is translated with the running file's settings: web stays NAT.
    let mut slice = fixture("endpointslice-web-ipv4.json");
    slice["endpoints"].as_array_mut().unwrap().push(endpoint("10.244.1.6", "node-a", true, true, false));
    api.upsert(SLICES, slice);
    let t = until(&mut tables, "the new endpoint", |t| {
        t.services().iter().any(|s| {
            s.key.to_string() == "tcp 10.96.12.34:9090" && s.backends.iter().any(|b| b.addr.to_string() == "10.244.1.6")
        })
    })
    .await;
    assert_eq!(mode_of(&t, "tcp 10.96.12.34:9090"), Some(ForwardMode::Nat), "{:?}", names(&t));
    assert!(!has(&t, "tcp 10.0.0.11:80"), "{:?}", names(&t));

    stop_tx.send(()).unwrap();
    tokio::time::timeout(FAILSAFE, task).await.unwrap().unwrap();
    let _ = std::fs::remove_dir_all(dir);
}

/// A LoadBalancer Service with `externalTrafficPolicy: Local` gets its `healthCheckNodePort`
/// answered, as kube-proxy answers it: 200 with this node's ready endpoints, 503 once it has none, and
/// the port closed once the Service goes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_load_balancers_health_check_node_port_answers_for_this_node() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (api, dir, kc) = web_cluster("lb-k8s-node-health").await;
    let port = lb_examples::lab::unused_port();
    add_local_edge(&api, port);
    let mut plane = Plane::start(&dir, &kc).await;
    let mut served = plane.node_health.take().expect("the feed runs");
    let mut answered_with = async |n: usize| {
        tokio::time::timeout(
            FAILSAFE,
            served.wait_for(|s| s.iter().any(|h| h.port == port && h.local_endpoints(true) == n)),
        )
        .await
        .unwrap_or_else(|_| panic!("never served with {n} local endpoints"))
        .unwrap();
        let mut c = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        c.write_all(b"GET / HTTP/1.1\r\nHost: node-a\r\n\r\n").await.unwrap();
        let mut out = String::new();
        c.read_to_string(&mut out).await.unwrap();
        out
    };
    let ok = answered_with(1).await;
    assert!(ok.starts_with("HTTP/1.1 200 OK\r\n") && ok.contains("\"localEndpoints\": 1"), "{ok}");

    let mut slice = fixture("endpointslice-edge.json");
    slice["endpoints"] = json!([endpoint("10.244.1.30", "node-b", true, true, false)]);
    api.upsert(SLICES, slice);
    let none = answered_with(0).await;
    assert!(none.starts_with("HTTP/1.1 503 Service Unavailable\r\n"), "{none}");

    api.delete(SERVICES, "ingress/edge");
    tokio::time::timeout(FAILSAFE, served.wait_for(|s| s.iter().all(|h| h.port != port))).await.unwrap().unwrap();
    assert!(tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err(), "the port closed with its Service");

    plane.stop(&dir).await;
}

/// A live Service edited wrong (a typo in its scheduler annotation) is reported, and keeps being
/// served with its last good annotations while its endpoints still follow the cluster: the feed
/// remembers each Service's last good translation. Before, the Service was left out of the next
/// tables, its VIP unserved and its connections broken, for a typo.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_service_edited_wrong_keeps_being_served() {
    let (api, dir, kc) = web_cluster("lb-k8s-typo").await;
    let mut plane = Plane::start(&dir, &kc).await;
    let (tables, live) = (&mut plane.tables, &mut plane.live);
    let web_key = "tcp 10.96.12.34:80";
    let t = until(tables, "shop/web", |t| has(t, web_key)).await;
    let scheduler = t.services().iter().find(|s| s.key.to_string() == web_key).unwrap().scheduler.kind();

    let mut web = fixture("service-web.json");
    web["spec"]["clusterIPs"] = json!(["10.96.12.34"]);
    web["metadata"]["annotations"] = json!({ "lb.example.dev/scheduler": "mgl" });
    api.upsert(SERVICES, web);
    let mut slice = fixture("endpointslice-web-ipv4.json");
    slice["endpoints"] = json!([endpoint("10.244.2.7", "node-b", true, true, false)]);
    api.upsert(SLICES, slice);
    let t = until(tables, "web on one endpoint", |t| {
        t.services().iter().any(|s| s.key.to_string() == web_key && s.backends.len() == 1)
    })
    .await;
    let web = t.services().iter().find(|s| s.key.to_string() == web_key).unwrap();
    assert_eq!(web.scheduler.kind(), scheduler, "served with its last good annotations");
    let l =
        tokio::time::timeout(FAILSAFE, live.wait_for(|l| l.k8s_skipped >= 1)).await.expect("typo reported").unwrap();
    assert!(l.tables.as_ref().is_some_and(|t| has(t, web_key)));
    drop(l);

    plane.stop(&dir).await;
}

/// With the API server refusing every request (down, or the node's credentials revoked) after the
/// feed has listed, the workers keep the tables they have, the health check node port keeps
/// answering 200 for the node's local endpoint, and the failed re-watches are counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_api_server_refusing_the_tables_and_the_health_check_node_port_stay() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let api = FakeApi::new();
    let port = lb_examples::lab::unused_port();
    add_local_edge(&api, port);
    let (api_port, mut reqs) = start(api.clone()).await;
    let dir = std::env::temp_dir().join(format!("lb-k8s-api-down-{}", std::process::id()));
    let kc = kubeconfig(&dir, api_port);
    let mut plane = Plane::start(&dir, &kc).await;
    let mut served = plane.node_health.take().expect("the feed runs");
    let get = async || {
        let mut c = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        c.write_all(b"GET / HTTP/1.1\r\nHost: node-a\r\n\r\n").await.unwrap();
        let mut out = String::new();
        c.read_to_string(&mut out).await.unwrap();
        out
    };
    let edge_key = "tcp 203.0.113.11:443";
    let tables = until(&mut plane.tables, "edge served", |t| has(t, edge_key)).await;
    tokio::time::timeout(
        FAILSAFE,
        served.wait_for(|s| s.iter().any(|h| h.port == port && h.local_endpoints(true) == 1)),
    )
    .await
    .expect("health check node port served")
    .unwrap();
    assert!(get().await.starts_with("HTTP/1.1 200 OK\r\n"));
    reqs.next("services watch", |r| r.path == SERVICES && r.is_watch()).await;
    reqs.next("slices watch", |r| r.path == SLICES && r.is_watch()).await;

    for path in [SERVICES, SLICES] {
        api.refuse(path, Some(403));
        api.drop_watches(path);
    }
    reqs.clear();
    // Two refused re-watches of each: the first refusal has reached the feed.
    for path in [SERVICES, SLICES] {
        for i in 0..2 {
            reqs.next(&format!("{path} re-watch {i}"), |r| r.path == path).await;
        }
    }
    let live = plane.live.borrow().clone();
    let errors = live.feed.as_ref().expect("feed counters").watch_errors.load(std::sync::atomic::Ordering::Relaxed);
    assert!(errors >= 2, "refused re-watches are counted: {errors}");
    assert_eq!(live.tables.as_ref().map(|t| t.version()), Some(tables.version()), "the workers keep their tables");
    assert!(plane.tables.try_recv().is_err(), "nothing new was published");
    let answer = get().await;
    assert!(answer.starts_with("HTTP/1.1 200 OK\r\n") && answer.contains("\"localEndpoints\": 1"), "{answer}");

    plane.stop(&dir).await;
}

/// Publishes to a channel and refuses, as workers can, any service of ingress/edge.
struct RefusingEdge(mpsc::UnboundedSender<Arc<Tables>>);

impl TablesSink for RefusingEdge {
    fn check(&self, config: &lb_core::config::Config) -> Result<(), String> {
        match config.services.iter().any(|s| s.name.starts_with("ingress/edge:")) {
            true => Err("ingress/edge cannot be served here".into()),
            false => Ok(()),
        }
    }

    fn publish(&mut self, tables: &Arc<Tables>) -> Result<(), String> {
        self.0.publish(tables)
    }
}

/// The health check node port answers for what the tables serve: a Local LoadBalancer Service the
/// data plane leaves out (here the workers refuse it; a key the file's service holds, a Maglev
/// table too small) has no local endpoint this node serves, so the port answers 503 and a cloud
/// load balancer sends its traffic elsewhere. It answered 200 with the translation's count, and the
/// cloud load balancer sent the Service's traffic to a node that served none of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_health_check_node_port_answers_503_for_a_service_the_tables_leave_out() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (api, dir, kc) = web_cluster("lb-k8s-node-health-left-out").await;
    let port = lb_examples::lab::unused_port();
    add_local_edge(&api, port);
    let path = dir.join("lb.yaml");
    std::fs::write(&path, file_yaml(&kc, false)).unwrap();
    let settings = file::load(&path).unwrap();
    let (tx, mut tables) = mpsc::unbounded_channel();
    let stats: Arc<dyn StatsSource> = Arc::new(Vec::<CoreSnapshot>::new);
    let plane =
        ControlPlane::start(path.clone(), settings, RefusingEdge(tx), stats, Duration::from_millis(20)).await.unwrap();
    let mut live = plane.live();
    let mut served = plane.node_health().expect("the feed runs");
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(plane.run(async move {
        let _ = stop_rx.await;
    }));
    let t = until(&mut tables, "shop/web", |t| has(t, "tcp 10.96.12.34:80")).await;
    assert!(t.services().iter().all(|s| !s.name.starts_with("ingress/edge:")), "{:?}", names(&t));
    tokio::time::timeout(FAILSAFE, live.wait_for(|l| l.k8s_skipped >= 1)).await.expect("edge left out").unwrap();
    tokio::time::timeout(FAILSAFE, served.wait_for(|s| s.iter().any(|h| h.port == port)))
        .await
        .expect("the port is open")
        .unwrap();
    let mut c = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    c.write_all(b"GET / HTTP/1.1\r\nHost: node-a\r\n\r\n").await.unwrap();
    let mut answer = String::new();
    c.read_to_string(&mut answer).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 503 Service Unavailable\r\n"), "{answer}");
    assert!(answer.contains("\"localEndpoints\": 0"), "{answer}");

    stop_tx.send(()).unwrap();
    tokio::time::timeout(FAILSAFE, task).await.unwrap().unwrap();
    let _ = std::fs::remove_dir_all(dir);
}

/// The path of the DaemonSet's `probe` (`readinessProbe`, `livenessProbe`) in deploy/daemonset.yaml.
fn daemonset_probe_path(probe: &str) -> String {
    let path = format!("{}/../deploy/daemonset.yaml", env!("CARGO_MANIFEST_DIR"));
    let ds: serde_yaml::Value = serde_yaml::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let get = &ds["spec"]["template"]["spec"]["containers"][0][probe]["httpGet"];
    get["path"].as_str().unwrap().to_string()
}

/// `GET path` on `port` (127.0.0.1): the status line.
async fn status_of(port: u16, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: lb\r\n\r\n").as_bytes()).await.unwrap();
    let mut out = String::new();
    tokio::time::timeout(FAILSAFE, s.read_to_string(&mut out)).await.unwrap().unwrap();
    out.lines().next().unwrap_or_default().to_string()
}

/// The DaemonSet's readiness probe answers 503 while the cluster's Services are not served yet (a
/// slow first list from the API server), and 200 once they are in the tables; its liveness probe
/// answers 200 throughout. Before, it probed
/// `/state`, which answers 200 as soon as the metrics port listens: a rolling update took each
/// new pod as ready at once and restarted the next node's load balancer while this one still
/// served none of the cluster's Services, so a rollout faster than the first list took several
/// nodes out at once, whatever `maxUnavailable` said.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readiness_probe_waits_for_the_cluster_to_be_served() {
    let (api, dir, kc) = web_cluster("lb-k8s-ready").await;
    api.hold_lists(SLICES);
    let port = lb_examples::lab::unused_port();
    let path = dir.join("lb.yaml");
    std::fs::write(&path, format!("{}metrics: {{ listen: \"127.0.0.1:{port}\" }}\n", file_yaml(&kc, false))).unwrap();
    let settings = file::load(&path).unwrap();
    let (sink, mut tables) = mpsc::unbounded_channel();
    let stats: Arc<dyn StatsSource> = Arc::new(Vec::<CoreSnapshot>::new);
    let plane = ControlPlane::start(path.clone(), settings, sink, stats, Duration::from_millis(20)).await.unwrap();
    let mut live = plane.live();
    let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(plane.run(async move {
        let _ = stop_rx.await;
    }));
    let (ready, alive) = (daemonset_probe_path("readinessProbe"), daemonset_probe_path("livenessProbe"));

    // The file's tables run; the cluster's slices are still being listed. Not ready, but alive: a
    // slow first list must not get the container killed (and restarted into the same slow list).
    until(&mut tables, "the file service", |t| has(t, "tcp 10.0.0.10:80")).await;
    assert_eq!(status_of(port, &ready).await, "HTTP/1.1 503 Service Unavailable", "{ready} before the first list");
    assert_eq!(status_of(port, &alive).await, "HTTP/1.1 200 OK", "{alive} before the first list");

    api.release_lists(SLICES);
    until(&mut tables, "shop/web", |t| has(t, "tcp 10.96.12.34:80")).await;
    tokio::time::timeout(FAILSAFE, live.wait_for(|l| l.not_ready().is_none())).await.unwrap().unwrap();
    assert_eq!(status_of(port, &ready).await, "HTTP/1.1 200 OK", "{ready} once the cluster is served");

    stop.send(()).unwrap();
    tokio::time::timeout(FAILSAFE, task).await.unwrap().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

/// With `kubernetes.proxy_healthz` set (where `lb run` replaces kube-proxy), kube-proxy's `/healthz`,
/// which cloud load balancers check for `externalTrafficPolicy: Cluster` Services, answers there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kube_proxys_healthz_answers_where_proxy_healthz_is_set() {
    let (_api, dir, kc) = web_cluster("lb-k8s-proxy-healthz").await;
    let (port, stop, task) = plane_with_proxy_healthz(&dir, &kc).await;
    let answer = answer_until(port, "/healthz", |_| true).await;
    assert!(answer.starts_with("HTTP/1.1 200 OK\r\n") && answer.contains("\"nodeEligible\": true"), "{answer}");
    stop.send(()).unwrap();
    tokio::time::timeout(FAILSAFE, task).await.unwrap().unwrap();
    let _ = std::fs::remove_dir_all(dir);
}

/// Starts a control plane on the cluster of kubeconfig `kc` (its file written in `dir`) with
/// `kubernetes.proxy_healthz` on a free port of 127.0.0.1: that port, the sender that stops the
/// plane, and the plane's task.
async fn plane_with_proxy_healthz(
    dir: &std::path::Path,
    kc: &std::path::Path,
) -> (u16, tokio::sync::oneshot::Sender<()>, tokio::task::JoinHandle<()>) {
    let port = lb_examples::lab::unused_port();
    let path = dir.join("lb.yaml");
    let at = format!("  debounce: 5ms\n  proxy_healthz: \"127.0.0.1:{port}\"\n");
    std::fs::write(&path, file_yaml(kc, false).replace("  debounce: 5ms\n", &at)).unwrap();
    let settings = file::load(&path).unwrap();
    let (sink, tables) = mpsc::unbounded_channel();
    let stats: Arc<dyn StatsSource> = Arc::new(Vec::<CoreSnapshot>::new);
    let plane = ControlPlane::start(path, settings, sink, stats, Duration::from_millis(20)).await.unwrap();
    let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(plane.run(async move {
        // The tables' receiver lives as long as the plane: published tables are not refused.
        let _tables = tables;
        let _ = stop_rx.await;
    }));
    (port, stop, task)
}

/// GETs `path` on 127.0.0.1:`port` until the answer satisfies `pred` (the port may not be open
/// yet, the answer may not have changed yet), and returns that answer.
async fn answer_until(port: u16, path: &str, pred: impl Fn(&str) -> bool) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut last = String::new();
    let found = tokio::time::timeout(FAILSAFE, async {
        loop {
            if let Ok(mut c) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
                c.write_all(format!("GET {path} HTTP/1.1\r\nHost: node-a\r\n\r\n").as_bytes()).await.unwrap();
                last.clear();
                c.read_to_string(&mut last).await.unwrap();
                if pred(&last) {
                    return last.clone();
                }
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    found.unwrap_or_else(|_| panic!("{path} never answered as expected; last: {last}"))
}

/// kube-proxy (1.31+, KEP-3836) answers `/healthz` 503 with `"nodeEligible": false` while its
/// Node is tainted `ToBeDeletedByClusterAutoscaler` or being deleted, so the cloud load balancers
/// drain the node before it goes; `/livez` stays 200. `lb run` watches its own Node (alone:
/// `fieldSelector=metadata.name=node-a`) and answers so too: eligible until the Node is first
/// seen, 503 once it is seen tainted, 200 again when the taint is removed, 503 once it is being
/// deleted. It answered `"nodeEligible": true` always, and the clouds kept sending new connections
/// to a node the autoscaler was removing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kube_proxys_healthz_drains_a_node_the_autoscaler_is_removing() {
    let api = FakeApi::new();
    let mut web = fixture("service-web.json");
    web["spec"]["clusterIPs"] = json!(["10.96.12.34"]);
    api.upsert(SERVICES, web);
    api.upsert(SLICES, fixture("endpointslice-web-ipv4.json"));
    let node = fixture("node-a.json");
    let mut tainted = node.clone();
    tainted["spec"]["taints"] = json!([
        { "key": "ToBeDeletedByClusterAutoscaler", "value": "1765083600", "effect": "NoSchedule" }
    ]);
    api.upsert(NODES, tainted.clone());
    // Another node, not this one: never looked at.
    let mut other = node.clone();
    other["metadata"]["name"] = json!("node-b");
    other["metadata"]["uid"] = json!("9a0e7c2d-4b1f-4e3a-8d6c-5f2b1a0e9d87");
    api.upsert(NODES, other);
    api.hold_lists(NODES);
    let (api_port, mut reqs) = start(api.clone()).await;
    let dir = std::env::temp_dir().join(format!("lb-k8s-node-eligible-{}", std::process::id()));
    let kc = kubeconfig(&dir, api_port);
    let (port, stop, task) = plane_with_proxy_healthz(&dir, &kc).await;
    let ok = |a: &str| a.starts_with("HTTP/1.1 200 OK\r\n") && a.contains("\"nodeEligible\": true");
    let draining =
        |a: &str| a.starts_with("HTTP/1.1 503 Service Unavailable\r\n") && a.contains("\"nodeEligible\": false");

    // The Node is being listed (the list held): not seen yet, so eligible, as kube-proxy starts.
    let list = reqs.next("the Node's list", |r| r.path == NODES && !r.is_watch()).await;
    assert_eq!(list.query.get("fieldSelector").map(String::as_str), Some("metadata.name=node-a"));
    answer_until(port, "/healthz", ok).await;
    api.release_lists(NODES);
    answer_until(port, "/healthz", draining).await;
    let livez = answer_until(port, "/livez", |_| true).await;
    assert!(livez.starts_with("HTTP/1.1 200 OK\r\n"), "/livez ignores the Node: {livez}");

    // The autoscaler gives up on removing it: the taint goes, and the node is eligible again.
    api.upsert(NODES, node.clone());
    answer_until(port, "/healthz", ok).await;
    // Deleted (by hand, say: a finalizer holds it while its deletionTimestamp is set).
    let mut deleting = node.clone();
    deleting["metadata"]["deletionTimestamp"] = json!("2026-12-07T05:10:00Z");
    deleting["metadata"]["finalizers"] = json!(["example.com/drain"]);
    api.upsert(NODES, deleting);
    answer_until(port, "/healthz", draining).await;

    stop.send(()).unwrap();
    tokio::time::timeout(FAILSAFE, task).await.unwrap().unwrap();
    let _ = std::fs::remove_dir_all(dir);
}
