//! The Kubernetes feed against a local API server that speaks the real list/watch protocol.
//!
//! The server (hand-written HTTP/1.1 on 127.0.0.1, in k8s_support/) keeps Services and EndpointSlices with a
//! global resourceVersion and an event history, as etcd does: a list returns the objects and the
//! current version; `watch=true&resourceVersion=N` replays the history after N and then streams live
//! events as chunked JSON lines; a version older than the compacted history gets a 410 Gone ERROR
//! event. The test drives adds, updates, deletes, a bookmark, a 410 (with an object deleted while the
//! history was lost) and a dropped connection, and after each waits for the feed's translation
//! (channels only, no sleeps; the timeouts only turn a hang into a failure).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::time::Duration;

use lb_core::config::{BackendState, NodeConfig};
use lb_examples::config::KubernetesSettings;
use lb_examples::k8s::Translation;
use lb_examples::k8s::feed::{self, ClientTimings, ExpBackoff, Feed, FeedCounters, NodeView};
use serde_json::json;
use std::sync::Arc;
use tokio::sync::mpsc;

mod k8s_support;
use k8s_support::{
    FAILSAFE, FakeApi, SERVICES, SLICES, backends, endpoint, fixture, kubeconfig, start, until, web_cluster,
};

/// What ends a test's feed: its task, its kubeconfig's directory, and its node view's sender (kept
/// open while the feed runs).
struct FeedEnd {
    task: tokio::task::JoinHandle<()>,
    dir: std::path::PathBuf,
    view: tokio::sync::watch::Sender<NodeView>,
}

impl FeedEnd {
    /// Waits for the feed to stop (drop its receiver first) and removes its directory.
    async fn join(self) {
        tokio::time::timeout(FAILSAFE, self.task).await.expect("feed stops when its receiver is dropped").unwrap();
        let _ = std::fs::remove_dir_all(self.dir);
    }
}

/// Runs the feed as node-a against the local API server on `port`, with `debounce`, `backoff` (else
/// the default) and the client's `timings` (else the default): its translations, its
/// counters, and what ends it. The SNAT address is the node address that serves the NodePort
/// (kube-proxy's masquerade): NodePorts are outside the default snat_ports, so such keys are served.
async fn run_feed(
    name: &str,
    port: u16,
    debounce: Duration,
    backoff: Option<ExpBackoff>,
    timings: Option<ClientTimings>,
) -> (mpsc::Receiver<Translation>, Arc<FeedCounters>, FeedEnd) {
    let dir = std::env::temp_dir().join(format!("lb-k8s-feed-{name}-{}", std::process::id()));
    let settings = KubernetesSettings {
        kubeconfig: Some(kubeconfig(&dir, port)),
        node_name: Some("node-a".into()),
        node_addresses: vec!["192.168.1.10".parse().unwrap()],
        debounce,
        ..Default::default()
    };
    let client = feed::client_with(&settings, &timings.unwrap_or_default()).await.unwrap();
    let node = NodeConfig { snat_v4: Some("192.168.1.10".parse().unwrap()), ..Default::default() };
    let (view, view_rx) = tokio::sync::watch::channel(NodeView { settings, node });
    let (tx, rx) = mpsc::channel(64);
    let mut feed = Feed::new(client, view_rx);
    if let Some(b) = backoff {
        feed = feed.with_backoff(b);
    }
    let counters = feed.counters();
    let task = tokio::spawn(feed.run(tx));
    (rx, counters, FeedEnd { task, dir, view })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn feed_follows_list_watch_bookmarks_410_and_dropped_connections() {
    let api = FakeApi::new();
    // Initial cluster: shop/web (dual-stack ClusterIP) and its IPv4 slice.
    let mut web = fixture("service-web.json");
    web["spec"]["clusterIPs"] = json!(["10.96.12.34"]);
    api.upsert(SERVICES, web.clone());
    let web_slice = fixture("endpointslice-web-ipv4.json");
    api.upsert(SLICES, web_slice.clone());

    let (port, mut reqs) = start(api.clone()).await;
    let (mut rx, counters, end) = run_feed(
        "follows",
        port,
        Duration::from_millis(5),
        Some(ExpBackoff::new(Duration::from_millis(5), Duration::from_millis(50))),
        None,
    )
    .await;

    // 1. Initial list, then a watch from the list's version with bookmarks on.
    let t = until(&mut rx, "shop/web listed", |t| backends(t, "tcp 10.96.12.34:80").is_some()).await;
    assert_eq!(
        backends(&t, "tcp 10.96.12.34:80").unwrap(),
        vec![
            ("10.244.1.5:8080".into(), BackendState::Active),
            ("10.244.1.9:8080".into(), BackendState::Draining),
            ("10.244.2.7:8080".into(), BackendState::Active),
            ("10.244.2.8:8080".into(), BackendState::Draining),
        ]
    );
    let w = reqs.next("services watch", |r| r.path == SERVICES && r.is_watch()).await;
    assert_eq!(w.rv(), Some(102), "watch starts at the list's resourceVersion");
    assert_eq!(w.query.get("allowWatchBookmarks").map(String::as_str), Some("true"));
    reqs.next("slices watch", |r| r.path == SLICES && r.is_watch()).await;
    // Each watcher lists before it watches, so both lists have arrived too: forget them.
    reqs.clear();

    // 2. Add a NodePort service and its slice through watch events.
    api.upsert(SERVICES, fixture("service-api-nodeport-local.json"));
    api.upsert(SLICES, fixture("endpointslice-api.json"));
    let t = until(&mut rx, "shop/api added", |t| backends(t, "tcp 10.96.40.2:80").is_some_and(|b| b.len() == 2)).await;
    assert_eq!(backends(&t, "tcp 192.168.1.10:30080"), Some(vec![]), "Local policy, no endpoint on node-a");

    // 3. Update: an endpoint starts terminating (still serving) -> Draining; another stops serving ->
    //    Draining too (its established flows kept); one leaves the slice (10.244.2.8) -> gone.
    let mut slice = web_slice.clone();
    slice["endpoints"] = json!([
        endpoint("10.244.1.5", "node-a", false, true, true),
        endpoint("10.244.2.7", "node-b", true, true, false),
        endpoint("10.244.1.9", "node-a", false, false, true),
    ]);
    api.upsert(SLICES, slice);
    let t = until(&mut rx, "web endpoint draining", |t| {
        backends(t, "tcp 10.96.12.34:80").is_some_and(|b| b.len() == 3 && b[0].1 == BackendState::Draining)
    })
    .await;
    assert_eq!(
        backends(&t, "tcp 10.96.12.34:80").unwrap(),
        vec![
            ("10.244.1.5:8080".into(), BackendState::Draining),
            ("10.244.1.9:8080".into(), BackendState::Draining),
            ("10.244.2.7:8080".into(), BackendState::Active)
        ]
    );

    // 4. Delete the api Service.
    api.delete(SERVICES, "shop/api");
    let t = until(&mut rx, "shop/api deleted", |t| backends(t, "tcp 10.96.40.2:80").is_none()).await;
    assert!(backends(&t, "tcp 10.96.12.34:80").is_some());

    // 5. A bookmark moves the services watch on without events; after a dropped connection the
    //    watcher resumes from the bookmark's version, without a re-list, and catches up from history.
    let seen = api.rv();
    api.upsert(SLICES, fixture("endpointslice-edge.json")); // moves the global version on
    let bm = api.bookmark(SERVICES);
    assert!(bm > seen);
    // The bookmark line is in the services stream before the drop, so it is read first.
    api.drop_watches(SERVICES);
    api.upsert(SERVICES, fixture("service-edge-loadbalancer.json")); // while disconnected: only in history
    let r = reqs.next("services re-watch or re-list", |r| r.path == SERVICES).await;
    assert!(r.is_watch(), "a dropped connection re-watches, it does not re-list: {r:?}");
    assert_eq!(r.rv(), Some(bm), "re-watch resumes at the bookmark's resourceVersion");
    let t = until(&mut rx, "edge from replayed history", |t| backends(t, "tcp 203.0.113.11:443").is_some()).await;
    assert_eq!(backends(&t, "tcp 203.0.113.11:443").unwrap(), vec![("10.244.1.30:8443".into(), BackendState::Active)]);

    // 6. 410 Gone: the history is compacted and shop/web vanished without an event; the feed must
    //    re-list, and the re-list's view replaces the store (web gone, edge kept).
    api.lose_history_and_expire(SERVICES, "shop/web");
    reqs.next("re-list after 410", |r| r.path == SERVICES && !r.is_watch()).await;
    let t = until(&mut rx, "web gone after re-list", |t| backends(t, "tcp 10.96.12.34:80").is_none()).await;
    assert!(backends(&t, "tcp 203.0.113.11:443").is_some(), "objects still listed stay");
    let w = reqs.next("watch after re-list", |r| r.path == SERVICES && r.is_watch()).await;
    assert!(w.rv().unwrap() > bm, "watch restarts at the new list's version");

    // 7. And the stream keeps working after all that.
    api.upsert(SERVICES, web);
    until(&mut rx, "web back", |t| backends(t, "tcp 10.96.12.34:80").is_some()).await;
    use std::sync::atomic::Ordering::Relaxed;
    // The 410 is an error event; a dropped connection usually just ends the stream (resumed without
    // an error), though the HTTP client may report the cut body as one.
    let errors = counters.watch_errors.load(Relaxed);
    assert!((1..=2).contains(&errors), "the 410 is counted: {errors}");
    assert_eq!(counters.lists.load(Relaxed), 3, "two initial lists and one re-list, no more");

    drop(rx);
    end.join().await;
}

/// A list the API server refuses (a ClusterRole without `list` on EndpointSlices, a token it does not
/// take) is tried again after a back-off that doubles while the refusals go on, as client-go's
/// reflector does, not every first step forever: the watcher's `Init` before each list attempt must
/// not count as progress. Nothing is published meanwhile, every refusal is counted, and once the
/// permission is granted the feed lists and publishes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_lists_back_off_longer_each_time_and_the_feed_recovers() {
    let api = web_cluster();
    api.refuse(SLICES, Some(403));
    let (port, mut reqs) = start(api.clone()).await;
    let first = Duration::from_millis(20);
    let (mut rx, counters, end) = run_feed(
        "refused",
        port,
        Duration::from_millis(5),
        Some(ExpBackoff::new(first, Duration::from_secs(10))),
        None,
    )
    .await;

    let mut lists = Vec::new();
    for i in 0..6 {
        lists.push(reqs.next(&format!("slices list {i}"), |r| r.path == SLICES && !r.is_watch()).await.at);
    }
    // The k-th refusal is followed by a pause of first * 2^(k-1) before the next attempt.
    for k in 1..6 {
        let gap = lists[k] - lists[k - 1];
        let pause = first * 2u32.pow(u32::try_from(k - 1).unwrap());
        assert!(gap >= pause, "attempt {} came {gap:?} after the one before, not after {pause:?}", k + 1);
    }
    assert!(rx.try_recv().is_err(), "nothing is published while EndpointSlices cannot be listed");
    use std::sync::atomic::Ordering::Relaxed;
    assert!(counters.watch_errors.load(Relaxed) >= 5, "each refusal is counted");

    api.refuse(SLICES, None);
    let t = until(&mut rx, "web once slices list", |t| backends(t, "tcp 10.96.12.34:80").is_some()).await;
    assert_eq!(backends(&t, "tcp 10.96.12.34:80").unwrap().len(), 4);

    drop(rx);
    end.join().await;
}

/// A re-list of EndpointSlices alone (410 Gone on their watch, a slice deleted while the history was
/// lost) while the Services watch goes on: the slices store is replaced whole when the re-list is
/// done, so no translation in between drops a Service's backends (a Service change that arrives
/// during the re-list is translated against the slices as they were), and the lost slice's
/// backends are gone once it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpointslices_relist_never_publishes_a_service_without_its_backends() {
    let api = web_cluster();
    let mut svc_api = fixture("service-api-nodeport-local.json");
    api.upsert(SERVICES, svc_api.clone());
    api.upsert(SLICES, fixture("endpointslice-api.json"));
    let (port, mut reqs) = start(api.clone()).await;
    let (mut rx, counters, end) = run_feed(
        "slices-relist",
        port,
        Duration::from_millis(1),
        Some(ExpBackoff::new(Duration::from_millis(5), Duration::from_millis(50))),
        None,
    )
    .await;
    let both = |t: &Translation| {
        backends(t, "tcp 10.96.12.34:80").is_some_and(|b| b.len() == 4)
            && backends(t, "tcp 10.96.40.2:80").is_some_and(|b| b.len() == 2)
    };
    until(&mut rx, "both listed", both).await;
    reqs.next("slices watch", |r| r.path == SLICES && r.is_watch()).await;
    reqs.clear();

    api.hold_lists(SLICES);
    api.lose_history_and_expire(SLICES, "shop/web-x7k2p");
    reqs.next("slices re-list", |r| r.path == SLICES && !r.is_watch()).await;
    // While the slices' re-list is under way, a Service change arrives on the live watch: api moves
    // to port 81, and is translated against the slices as they were before the re-list.
    svc_api["spec"]["ports"][0]["port"] = json!(81);
    api.upsert(SERVICES, svc_api);
    let t = until(&mut rx, "api on port 81", |t| backends(t, "tcp 10.96.40.2:81").is_some()).await;
    assert_eq!(backends(&t, "tcp 10.96.40.2:81").map(|b| b.len()), Some(2), "api keeps its backends");
    assert_eq!(backends(&t, "tcp 10.96.12.34:80").map(|b| b.len()), Some(4), "web too, until the re-list is done");
    api.release_lists(SLICES);
    let last =
        until(&mut rx, "web's lost slice gone", |t| backends(t, "tcp 10.96.12.34:80").is_some_and(|b| b.is_empty()))
            .await;
    assert_eq!(backends(&last, "tcp 10.96.40.2:81").map(|b| b.len()), Some(2), "api's slice was listed again");
    use std::sync::atomic::Ordering::Relaxed;
    assert_eq!(counters.lists.load(Relaxed), 3, "two initial lists and the slices' re-list");

    drop(rx);
    end.join().await;
}

/// Watches that end at once with no event (a proxy in front of the API server that cuts streamed
/// answers short) are started again no more than once a second per resource, not as fast as the
/// connection allows: kube's watcher re-watches a closed stream at once and yields nothing to back
/// off on, so without pacing each node would send the API server thousands of watches a second.
/// The lists went through, so the feed still publishes what they held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watches_that_end_at_once_are_started_again_at_most_once_a_second() {
    let api = web_cluster();
    api.end_watches_at_once(SERVICES);
    let (port, mut reqs) = start(api.clone()).await;
    let (mut rx, _, end) = run_feed("short-watches", port, Duration::from_millis(1), None, None).await;

    let mut watches = Vec::new();
    for i in 0..4 {
        watches.push(reqs.next(&format!("services watch {i}"), |r| r.path == SERVICES && r.is_watch()).await.at);
    }
    // Seen at the server, each after its request's way there (the client's task, the connection,
    // the server's task), which a loaded machine can hold up for one request and not the next: a
    // bound on each gap fails when the first of two is late. Three paced starts take three seconds
    // from the first; a second is left for the way, where watches started again at once take
    // milliseconds, and ones paced half a second apart 1.5 s.
    let span = watches[3] - watches[0];
    let gaps: Vec<Duration> = watches.windows(2).map(|w| w[1] - w[0]).collect();
    assert!(span >= Duration::from_secs(2), "four services watches within {span:?}, apart {gaps:?}");
    until(&mut rx, "web from the lists", |t| backends(t, "tcp 10.96.12.34:80").is_some()).await;

    drop(rx);
    end.join().await;
}

/// An ERROR event other than 410 in a live watch (the API server's 500 "internal error", a 429) is
/// counted and the watch goes on from where it was: no re-list, later events applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_error_event_in_a_watch_is_counted_and_the_watch_goes_on() {
    let api = web_cluster();
    let (port, mut reqs) = start(api.clone()).await;
    let (mut rx, counters, end) = run_feed(
        "error-event",
        port,
        Duration::from_millis(1),
        Some(ExpBackoff::new(Duration::from_millis(5), Duration::from_millis(50))),
        None,
    )
    .await;
    until(&mut rx, "web listed", |t| backends(t, "tcp 10.96.12.34:80").is_some()).await;
    reqs.next("services watch", |r| r.path == SERVICES && r.is_watch()).await;
    reqs.clear();

    let error = json!({ "type": "ERROR", "object": { "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": "etcdserver: request timed out", "reason": "InternalError", "code": 500 } });
    api.send_raw(SERVICES, &format!("{error}\n"));
    api.upsert(SERVICES, fixture("service-edge-loadbalancer.json"));
    until(&mut rx, "edge after the error event", |t| backends(t, "tcp 203.0.113.11:443").is_some()).await;
    use std::sync::atomic::Ordering::Relaxed;
    assert_eq!(counters.watch_errors.load(Relaxed), 1, "the error event is counted");
    assert_eq!(counters.lists.load(Relaxed), 2, "no re-list");

    drop(rx);
    end.join().await;
}

/// A list whose answer stops half-way, the connection left open (the API server's node gone without a
/// reset), fails after the client's read timeout and is tried again, so the feed publishes once
/// the lists answer whole: it does not wait on the dead connection for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_list_that_stalls_half_way_is_given_up_and_tried_again() {
    let api = web_cluster();
    api.stall_lists(SLICES, true);
    let (port, mut reqs) = start(api.clone()).await;
    let (mut rx, counters, end) = run_feed(
        "stalled-list",
        port,
        Duration::from_millis(1),
        Some(ExpBackoff::new(Duration::from_millis(5), Duration::from_millis(50))),
        Some(ClientTimings { read_timeout: Duration::from_millis(300), ..Default::default() }),
    )
    .await;

    reqs.next("the slices list that stalls", |r| r.path == SLICES && !r.is_watch()).await;
    reqs.next("the slices list tried again", |r| r.path == SLICES && !r.is_watch()).await;
    use std::sync::atomic::Ordering::Relaxed;
    assert!(counters.watch_errors.load(Relaxed) >= 1, "the stalled list is counted");
    api.stall_lists(SLICES, false);
    until(&mut rx, "web once the slices list whole", |t| {
        backends(t, "tcp 10.96.12.34:80").is_some_and(|b| b.len() == 4)
    })
    .await;

    drop(rx);
    end.join().await;
}

/// A watch whose connection dies without a FIN or a reset (the API server's node gone, a NAT or
/// conntrack entry lost between) is given up within the client's TCP keepalive bound and resumed
/// from its last version, so a change made meanwhile is published: not after kube's idle timeout
/// (the watch's 290 s and 5 s more), minutes in which the node served stale Services. In a namespace
/// of its own, where an nftables rule drops every packet of the two watch connections (and of
/// nothing else) from the moment they are live; the timings are the test's (a second).
#[test]
fn a_watch_on_a_dead_connection_is_given_up_and_resumed_within_the_keepalive_bound() {
    use lb_io::netns::{Netns, can_create_namespaces, enter_netns};
    use std::sync::atomic::Ordering::Relaxed;
    if let Err(why) = can_create_namespaces() {
        println!("SKIPPED: {why}");
        return;
    }
    if let Err(e) = std::process::Command::new("nft").arg("--version").output() {
        println!("SKIPPED: the nft command-line tool is not available ({e}); .ci/run installs nftables");
        return;
    }
    let ns = Netns::create(&format!("lbk8sdead{}", std::process::id())).unwrap();
    let name = ns.name().to_string();
    let blackhole = |ports: &[u16]| {
        let set = ports.iter().map(u16::to_string).collect::<Vec<_>>().join(", ");
        let nft = |rule: &str| ns.exec("nft", &[rule]).unwrap_or_else(|e| panic!("nft: {e}"));
        nft("add table inet dead");
        nft("add chain inet dead input { type filter hook input priority 0; policy accept; }");
        nft(&format!("add rule inet dead input tcp sport {{ {set} }} drop"));
        nft(&format!("add rule inet dead input tcp dport {{ {set} }} drop"));
    };
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                // Sockets opened by this thread, and by the runtime's threads it starts, live in `ns`.
                enter_netns(&name).unwrap();
                let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
                rt.block_on(async {
                    let api = web_cluster();
                    let (port, mut reqs) = start(api.clone()).await;
                    let (mut rx, counters, end) = run_feed(
                        "dead-watch",
                        port,
                        Duration::from_millis(1),
                        Some(ExpBackoff::new(Duration::from_millis(5), Duration::from_millis(50))),
                        Some(ClientTimings {
                            keepalive_idle: Duration::from_secs(1),
                            keepalive_interval: Duration::from_secs(1),
                            keepalive_probes: 2,
                            ..Default::default()
                        }),
                    )
                    .await;
                    until(&mut rx, "web listed", |t| backends(t, "tcp 10.96.12.34:80").is_some_and(|b| b.len() == 4))
                        .await;
                    let services = reqs.next("the services watch", |r| r.path == SERVICES && r.is_watch()).await;
                    let slices = reqs.next("the slices watch", |r| r.path == SLICES && r.is_watch()).await;
                    let dead = [services.peer.unwrap().port(), slices.peer.unwrap().port()];
                    blackhole(&dead);

                    // A change the dead connection never carries.
                    let mut slice = fixture("endpointslice-web-ipv4.json");
                    slice["endpoints"].as_array_mut().unwrap().truncate(2);
                    api.upsert(SLICES, slice);
                    let resumed = reqs
                        .next("the slices watch resumed on a new connection", |r| {
                            r.path == SLICES && r.is_watch() && r.peer.is_some_and(|p| !dead.contains(&p.port()))
                        })
                        .await;
                    assert_eq!(resumed.rv(), slices.rv(), "resumed from the last version seen");
                    until(&mut rx, "the change made while the connection was dead", |t| {
                        backends(t, "tcp 10.96.12.34:80").is_some_and(|b| b.len() == 2)
                    })
                    .await;
                    assert!(counters.watch_errors.load(Relaxed) >= 1, "the dead connection is counted");
                    assert_eq!(counters.lists.load(Relaxed), 2, "no re-list");
                    drop(rx);
                    end.join().await;
                });
            })
            .join()
            .unwrap();
    });
}

/// Services and EndpointSlices are listed and watched with kube-proxy's label selector
/// (`!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless`, on both: its
/// informers' in cmd/kube-proxy/app/server.go), so the API server sends neither another proxy's
/// Services and slices nor the slices of headless Services; a slice labelled so is not read though
/// its Service is served. A reload naming this feed's proxy lists both again with its selector:
/// then only the Services labelled with that name are sent, and every slice but headless ones.
/// The lists and watches had no selector: the whole cluster's slices came, every StatefulSet's
/// headless ones included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_and_slices_are_selected_as_kube_proxy_selects_them() {
    const DEFAULT: &str = "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless";
    let api = web_cluster();
    // shop/other, meant for another proxy, with its slice (the controller mirrors the label).
    let mut other = fixture("service-web.json");
    other["metadata"]["name"] = json!("other");
    other["metadata"]["uid"] = json!("0c4a4c1e-7a52-4d8e-9b0b-3f3e1c2d4e50");
    other["metadata"]["labels"] = json!({ "service.kubernetes.io/service-proxy-name": "other-proxy" });
    other["spec"]["clusterIPs"] = json!(["10.96.50.1"]);
    api.upsert(SERVICES, other);
    let mut other_slice = fixture("endpointslice-web-ipv4.json");
    other_slice["metadata"]["name"] = json!("other-abcde");
    other_slice["metadata"]["labels"] =
        json!({ "kubernetes.io/service-name": "other", "service.kubernetes.io/service-proxy-name": "other-proxy" });
    other_slice["endpoints"] = json!([endpoint("10.244.5.1", "node-a", true, true, false)]);
    api.upsert(SLICES, other_slice);
    // A second slice of web still labelled for another proxy (written before web was taken back).
    let mut stale = fixture("endpointslice-web-ipv4.json");
    stale["metadata"]["name"] = json!("web-stale");
    stale["metadata"]["labels"]["service.kubernetes.io/service-proxy-name"] = json!("other-proxy");
    stale["endpoints"] = json!([endpoint("10.244.6.1", "node-a", true, true, false)]);
    api.upsert(SLICES, stale);

    let (port, mut reqs) = start(api.clone()).await;
    let (mut rx, _counters, end) = run_feed("selected", port, Duration::from_millis(5), None, None).await;
    let t = until(&mut rx, "shop/web listed", |t| backends(t, "tcp 10.96.12.34:80").is_some()).await;
    let web = backends(&t, "tcp 10.96.12.34:80").unwrap();
    assert!(!web.iter().any(|(b, _)| b.starts_with("10.244.6.1:")), "the stale slice is not read: {web:?}");
    assert!(backends(&t, "tcp 10.96.50.1:80").is_none());
    for path in [SERVICES, SLICES] {
        for watch in [false, true] {
            let r = reqs.next(path, |r| r.path == path && r.is_watch() == watch).await;
            assert_eq!(r.query.get("labelSelector").map(String::as_str), Some(DEFAULT), "{path} watch={watch}");
        }
    }
    // Named as the other proxy: its Service is served and web is not, after new lists with its selector.
    reqs.clear();
    end.view.send_modify(|v| v.settings.service_proxy_name = Some("other-proxy".into()));
    let t = until(&mut rx, "shop/other served", |t| backends(t, "tcp 10.96.50.1:80").is_some()).await;
    assert!(backends(&t, "tcp 10.96.12.34:80").is_none(), "web is not other-proxy's");
    assert_eq!(backends(&t, "tcp 10.96.50.1:80").unwrap(), vec![("10.244.5.1:8080".into(), BackendState::Active)]);
    let services = reqs.next("services re-list", |r| r.path == SERVICES && !r.is_watch()).await;
    assert_eq!(
        services.query.get("labelSelector").map(String::as_str),
        Some("service.kubernetes.io/service-proxy-name=other-proxy,!service.kubernetes.io/headless")
    );
    let slices = reqs.next("slices re-list", |r| r.path == SLICES && !r.is_watch()).await;
    assert_eq!(slices.query.get("labelSelector").map(String::as_str), Some("!service.kubernetes.io/headless"));

    drop(rx);
    end.join().await;
}
