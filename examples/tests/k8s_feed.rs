//! The Kubernetes feed against a local API server that speaks the real list/watch protocol.
//!
//! The server (hand-written HTTP/1.1 on 127.0.0.1, below) keeps Services and EndpointSlices with a
//! global resourceVersion and an event history, as etcd does: a list returns the objects and the
//! current version; `watch=true&resourceVersion=N` replays the history after N and then streams live
//! events as chunked JSON lines; a version older than the compacted history gets a 410 Gone ERROR
//! event. The test drives adds, updates, deletes, a bookmark, a 410 (with an object deleted while the
//! history was lost) and a dropped connection, and after each waits for the feed's translation
//! (channels only, no sleeps; the timeouts only turn a hang into a failure).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lb_core::config::{BackendState, NodeConfig};
use lb_examples::config::KubernetesSettings;
use lb_examples::k8s::Translation;
use lb_examples::k8s::feed::{self, ExpBackoff, Feed, NodeView};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

const SERVICES: &str = "/api/v1/services";
const SLICES: &str = "/apis/discovery.k8s.io/v1/endpointslices";
const FAILSAFE: Duration = Duration::from_secs(30);

/// A request the server received.
#[derive(Debug, Clone)]
struct Request {
    path: String,
    query: HashMap<String, String>,
}

impl Request {
    fn is_watch(&self) -> bool {
        self.query.get("watch").is_some_and(|v| v == "true" || v == "1")
    }
    fn rv(&self) -> Option<u64> {
        self.query.get("resourceVersion").and_then(|v| v.parse().ok())
    }
}

enum WatchMsg {
    Line(String),
    /// Close the connection abruptly (no terminating chunk).
    Drop,
}

#[derive(Default)]
struct Collection {
    objects: BTreeMap<String, Value>,
    history: Vec<(u64, String)>,
    compacted_below: u64,
    watchers: Vec<mpsc::UnboundedSender<WatchMsg>>,
}

struct State {
    rv: u64,
    collections: HashMap<&'static str, Collection>,
}

#[derive(Clone)]
struct FakeApi {
    state: Arc<Mutex<State>>,
}

fn key(obj: &Value) -> String {
    format!("{}/{}", obj["metadata"]["namespace"].as_str().unwrap(), obj["metadata"]["name"].as_str().unwrap())
}

fn event_line(kind: &str, obj: &Value) -> String {
    format!("{}\n", json!({ "type": kind, "object": obj }))
}

impl FakeApi {
    fn new() -> Self {
        let mut collections = HashMap::new();
        collections.insert(SERVICES, Collection::default());
        collections.insert(SLICES, Collection::default());
        FakeApi { state: Arc::new(Mutex::new(State { rv: 100, collections })) }
    }

    fn rv(&self) -> u64 {
        self.state.lock().unwrap().rv
    }

    /// Stores `obj` and tells watchers (ADDED or MODIFIED), as the apiserver does on a write.
    fn upsert(&self, path: &'static str, mut obj: Value) {
        let mut st = self.state.lock().unwrap();
        st.rv += 1;
        let rv = st.rv;
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        let c = st.collections.get_mut(path).unwrap();
        let kind = if c.objects.insert(key(&obj), obj.clone()).is_some() { "MODIFIED" } else { "ADDED" };
        let line = event_line(kind, &obj);
        c.history.push((rv, line.clone()));
        c.watchers.retain(|w| w.send(WatchMsg::Line(line.clone())).is_ok());
    }

    fn delete(&self, path: &'static str, k: &str) {
        let mut st = self.state.lock().unwrap();
        st.rv += 1;
        let rv = st.rv;
        let c = st.collections.get_mut(path).unwrap();
        let mut obj = c.objects.remove(k).unwrap();
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        let line = event_line("DELETED", &obj);
        c.history.push((rv, line.clone()));
        c.watchers.retain(|w| w.send(WatchMsg::Line(line.clone())).is_ok());
    }

    /// Sends a BOOKMARK at the current version to the watchers of `path`; returns the version.
    fn bookmark(&self, path: &'static str) -> u64 {
        let mut st = self.state.lock().unwrap();
        let rv = st.rv;
        let (kind, api_version) = if path == SERVICES { ("Service", "v1") } else { ("EndpointSlice", "discovery.k8s.io/v1") };
        let line = format!(
            "{}\n",
            json!({ "type": "BOOKMARK", "object": { "kind": kind, "apiVersion": api_version, "metadata": { "resourceVersion": rv.to_string() } } })
        );
        let c = st.collections.get_mut(path).unwrap();
        c.watchers.retain(|w| w.send(WatchMsg::Line(line.clone())).is_ok());
        rv
    }

    /// Deletes an object *without* an event and compacts the history, then answers live watchers with
    /// 410 Gone: the client has missed something and must re-list.
    fn lose_history_and_expire(&self, path: &'static str, deleted_unseen: &str) {
        let mut st = self.state.lock().unwrap();
        st.rv += 1;
        let rv = st.rv;
        let c = st.collections.get_mut(path).unwrap();
        c.objects.remove(deleted_unseen).unwrap();
        c.history.clear();
        c.compacted_below = rv + 1;
        let line = gone_line(rv);
        for w in c.watchers.drain(..) {
            let _ = w.send(WatchMsg::Line(line.clone()));
            let _ = w.send(WatchMsg::Drop);
        }
    }

    /// Closes every live watch connection on `path` abruptly.
    fn drop_watches(&self, path: &'static str) {
        let mut st = self.state.lock().unwrap();
        for w in st.collections.get_mut(path).unwrap().watchers.drain(..) {
            let _ = w.send(WatchMsg::Drop);
        }
    }
}

fn gone_line(rv: u64) -> String {
    format!(
        "{}\n",
        json!({ "type": "ERROR", "object": {
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": format!("too old resource version: 1 ({rv})"), "reason": "Expired", "code": 410 } })
    )
}

async fn serve(api: FakeApi, listener: TcpListener, requests: mpsc::UnboundedSender<Request>) {
    loop {
        let Ok((sock, _)) = listener.accept().await else { return };
        let api = api.clone();
        let requests = requests.clone();
        tokio::spawn(async move {
            let _ = handle(api, sock, requests).await;
        });
    }
}

async fn handle(api: FakeApi, mut sock: TcpStream, requests: mpsc::UnboundedSender<Request>) -> std::io::Result<()> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = sock.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let head = String::from_utf8_lossy(&buf).to_string();
    let target = head.split_whitespace().nth(1).unwrap_or("/").to_string();
    let (path, qs) = target.split_once('?').unwrap_or((&target, ""));
    let query: HashMap<String, String> =
        qs.split('&').filter_map(|kv| kv.split_once('=')).map(|(k, v)| (k.to_string(), v.to_string())).collect();
    let req = Request { path: path.to_string(), query };
    let _ = requests.send(req.clone());
    let Some(path) = [SERVICES, SLICES].into_iter().find(|p| *p == req.path) else {
        let body = r#"{"kind":"Status","apiVersion":"v1","status":"Failure","reason":"NotFound","code":404}"#;
        let resp = format!("HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len());
        return sock.write_all(resp.as_bytes()).await;
    };

    if !req.is_watch() {
        let body = {
            let st = api.state.lock().unwrap();
            let c = &st.collections[path];
            let (kind, api_version) = if path == SERVICES { ("ServiceList", "v1") } else { ("EndpointSliceList", "discovery.k8s.io/v1") };
            json!({ "kind": kind, "apiVersion": api_version, "metadata": { "resourceVersion": st.rv.to_string() },
                    "items": c.objects.values().collect::<Vec<_>>() })
            .to_string()
        };
        let resp = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        return sock.write_all(resp.as_bytes()).await;
    }

    // A watch: replay the history after the requested version (or 410 if it is compacted away),
    // then register for live events.
    let since = req.rv().unwrap_or(0);
    let (tx, mut rx) = mpsc::unbounded_channel();
    {
        let mut st = api.state.lock().unwrap();
        let rv = st.rv;
        let c = st.collections.get_mut(path).unwrap();
        if since < c.compacted_below {
            let _ = tx.send(WatchMsg::Line(gone_line(rv)));
        } else {
            for (v, line) in &c.history {
                if *v > since {
                    let _ = tx.send(WatchMsg::Line(line.clone()));
                }
            }
            c.watchers.push(tx);
        }
    }
    sock.write_all(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n")
        .await?;
    while let Some(msg) = rx.recv().await {
        match msg {
            WatchMsg::Line(line) => {
                sock.write_all(format!("{:x}\r\n{line}\r\n", line.len()).as_bytes()).await?;
            }
            WatchMsg::Drop => return Ok(()), // socket closed mid-stream, no final chunk
        }
    }
    // The sender went away after a 410 reply: end the stream cleanly.
    sock.write_all(b"0\r\n\r\n").await
}

fn fixture(name: &str) -> Value {
    let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// Receives translations until one satisfies `pred`.
async fn until(rx: &mut mpsc::Receiver<Translation>, what: &str, pred: impl Fn(&Translation) -> bool) -> Translation {
    tokio::time::timeout(FAILSAFE, async {
        loop {
            let t = rx.recv().await.expect("feed stopped");
            if pred(&t) {
                return t;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no translation with {what}"))
}

/// The requests the server received, in order; requests not yet matched wait in `pending`.
struct Requests {
    rx: mpsc::UnboundedReceiver<Request>,
    pending: Vec<Request>,
}

impl Requests {
    /// The first request (pending or new) satisfying `pred`; others stay pending.
    async fn next(&mut self, what: &str, pred: impl Fn(&Request) -> bool) -> Request {
        if let Some(i) = self.pending.iter().position(&pred) {
            return self.pending.remove(i);
        }
        tokio::time::timeout(FAILSAFE, async {
            loop {
                let r = self.rx.recv().await.expect("server stopped");
                if pred(&r) {
                    return r;
                }
                self.pending.push(r);
            }
        })
        .await
        .unwrap_or_else(|_| panic!("no request: {what}"))
    }

    /// Forgets the requests received so far and not matched.
    fn clear(&mut self) {
        self.pending.clear();
        while self.rx.try_recv().is_ok() {}
    }
}

fn backends(t: &Translation, key: &str) -> Option<Vec<(String, BackendState)>> {
    t.services.iter().find(|s| s.config.key.to_string() == key).map(|s| {
        s.config.backends.iter().map(|b| (std::net::SocketAddr::new(b.addr, b.port).to_string(), b.state)).collect()
    })
}

fn endpoint(ip: &str, node: &str, ready: bool, serving: bool, terminating: bool) -> Value {
    json!({ "addresses": [ip], "nodeName": node,
            "conditions": { "ready": ready, "serving": serving, "terminating": terminating } })
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

    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (req_tx, req_rx) = mpsc::unbounded_channel();
    let mut reqs = Requests { rx: req_rx, pending: Vec::new() };
    tokio::spawn(serve(api.clone(), listener, req_tx));

    let dir = std::env::temp_dir().join(format!("lb-k8s-feed-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let kubeconfig = dir.join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: http://127.0.0.1:{port}\n\
             users:\n- name: test\n  user: {{}}\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    user: test\n\
             current-context: fake\n"
        ),
    )
    .unwrap();

    let settings = KubernetesSettings {
        kubeconfig: Some(kubeconfig),
        node_name: Some("node-a".into()),
        node_addresses: vec!["192.168.1.10".parse().unwrap()],
        debounce: Duration::from_millis(5),
        ..Default::default()
    };
    let node = NodeConfig { snat_v4: Some("192.168.1.10".parse().unwrap()), ..Default::default() };
    let client = feed::client(&settings).await.unwrap();
    let (_view_tx, view_rx) = tokio::sync::watch::channel(NodeView { settings, node });
    let (tx, mut rx) = mpsc::channel(16);
    let feed = Feed::new(client, view_rx).with_backoff(ExpBackoff::new(Duration::from_millis(5), Duration::from_millis(50)));
    let feed_task = tokio::spawn(feed.run(tx));

    // 1. Initial list, then a watch from the list's version with bookmarks on.
    let t = until(&mut rx, "shop/web listed", |t| backends(t, "tcp 10.96.12.34:80").is_some()).await;
    assert_eq!(
        backends(&t, "tcp 10.96.12.34:80").unwrap(),
        vec![
            ("10.244.1.5:8080".into(), BackendState::Active),
            ("10.244.1.9:8080".into(), BackendState::Draining),
            ("10.244.2.7:8080".into(), BackendState::Active),
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

    // 3. Update: an endpoint starts terminating (still serving) -> Draining; another stops serving -> gone.
    let mut slice = web_slice.clone();
    slice["endpoints"] = json!([
        endpoint("10.244.1.5", "node-a", false, true, true),
        endpoint("10.244.2.7", "node-b", true, true, false),
        endpoint("10.244.1.9", "node-a", false, false, true),
    ]);
    api.upsert(SLICES, slice);
    let t = until(&mut rx, "web endpoint draining", |t| {
        backends(t, "tcp 10.96.12.34:80").is_some_and(|b| b.len() == 2 && b[0].1 == BackendState::Draining)
    })
    .await;
    assert_eq!(
        backends(&t, "tcp 10.96.12.34:80").unwrap(),
        vec![("10.244.1.5:8080".into(), BackendState::Draining), ("10.244.2.7:8080".into(), BackendState::Active)]
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

    drop(rx);
    tokio::time::timeout(FAILSAFE, feed_task).await.expect("feed stops when its receiver is dropped").unwrap();
    let _ = std::fs::remove_dir_all(dir);
}
