//! A local Kubernetes API server speaking the real list/watch protocol, for the k8s_* tests.
//!
//! Hand-written HTTP/1.1 on 127.0.0.1. It keeps Services, EndpointSlices and Nodes with a global
//! resourceVersion and an event history, as etcd does: a list returns the objects and the current
//! version; `watch=true&resourceVersion=N` replays the history after N and then streams live events as
//! chunked JSON lines; a version older than the compacted history gets a 410 Gone ERROR event.
//! A `labelSelector` or `fieldSelector` narrows a list and a watch as the API server does: a watch
//! sees an object that comes to match as ADDED and one that stops matching as DELETED.
//! [`start`] serves plain HTTP; [`start_tls`] serves the same behind TLS, as a real API server is.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, unreachable_pub)]

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lb_core::config::BackendState;
use lb_examples::k8s::Translation;
use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

pub const FAILSAFE: Duration = Duration::from_secs(30);

pub const SERVICES: &str = "/api/v1/services";
pub const SLICES: &str = "/apis/discovery.k8s.io/v1/endpointslices";
pub const NODES: &str = "/api/v1/nodes";
/// The collections the server keeps.
pub const COLLECTIONS: [&str; 3] = [SERVICES, SLICES, NODES];

/// A request the server received.
#[derive(Debug, Clone)]
pub struct Request {
    pub path: String,
    pub query: HashMap<String, String>,
    /// When the server had read it.
    pub at: std::time::Instant,
    /// The client's address (its connection's own port).
    pub peer: Option<std::net::SocketAddr>,
    /// The `Authorization` header's value, if the request had one.
    pub authorization: Option<String>,
}

impl Request {
    pub fn is_watch(&self) -> bool {
        self.query.get("watch").is_some_and(|v| v == "true" || v == "1")
    }
    pub fn rv(&self) -> Option<u64> {
        self.query.get("resourceVersion").and_then(|v| v.parse().ok())
    }
}

pub enum WatchMsg {
    Line(String),
    /// An object written (its old and new state; `None`: created, or deleted), sent to each watch
    /// as its selectors see it.
    Change(Option<Value>, Option<Value>),
    /// Close the connection abruptly (no terminating chunk).
    Drop,
}

#[derive(Default)]
pub struct Collection {
    objects: BTreeMap<String, Value>,
    /// Each write's version, the object before and after it.
    history: Vec<(u64, Option<Value>, Option<Value>)>,
    compacted_below: u64,
    watchers: Vec<mpsc::UnboundedSender<WatchMsg>>,
}

pub struct State {
    rv: u64,
    collections: HashMap<&'static str, Collection>,
    /// Paths whose watches end at once, with no event (a proxy in front of the API server that cuts
    /// streamed answers short, say).
    watches_end_at_once: Vec<&'static str>,
    /// Paths whose every request (list or watch) is answered with this status, as RBAC refuses.
    refused: HashMap<&'static str, u16>,
}

#[derive(Clone)]
pub struct FakeApi {
    state: Arc<Mutex<State>>,
    /// Paths whose list requests are held (not answered) until released.
    held_lists: Arc<tokio::sync::watch::Sender<Vec<&'static str>>>,
    /// Paths whose lists send half their answer and then nothing more, the connection left open.
    stalled_lists: Arc<tokio::sync::watch::Sender<Vec<&'static str>>>,
}

pub fn key(obj: &Value) -> String {
    // (A Node has no namespace.)
    format!("{}/{}", obj["metadata"]["namespace"].as_str().unwrap_or(""), obj["metadata"]["name"].as_str().unwrap())
}

/// Whether `obj` is selected by the request's `labelSelector` and `fieldSelector` (their terms as
/// the API server takes them: `key`, `!key`, `key=v`, `key==v`, `key!=v`, comma-separated; a field
/// is a dotted path such as `metadata.name`).
pub fn selected(obj: &Value, query: &HashMap<String, String>) -> bool {
    let terms = |name: &str| {
        query
            .get(name)
            .map(|s| s.split(',').filter(|t| !t.is_empty()).map(str::to_string).collect::<Vec<_>>())
            .unwrap_or_default()
    };
    let label = |k: &str| obj["metadata"]["labels"][k].as_str().map(str::to_string);
    let field = |path: &str| {
        let v = path.split('.').fold(obj, |v, part| &v[part]);
        Some(v.as_str().map_or_else(|| v.to_string(), str::to_string)).filter(|s| s != "null")
    };
    let holds = |t: &str, get: &dyn Fn(&str) -> Option<String>| {
        if let Some((k, v)) = t.split_once("!=") {
            get(k).as_deref() != Some(v)
        } else if let Some((k, v)) = t.split_once("==").or_else(|| t.split_once('=')) {
            get(k).as_deref() == Some(v)
        } else if let Some(k) = t.strip_prefix('!') {
            get(k).is_none()
        } else {
            get(t).is_some()
        }
    };
    terms("labelSelector").iter().all(|t| holds(t, &label)) && terms("fieldSelector").iter().all(|t| holds(t, &field))
}

/// The watch event a watch with `query`'s selectors gets for a write from `old` to `new`, if any.
fn change_line(old: Option<&Value>, new: Option<&Value>, query: &HashMap<String, String>) -> Option<String> {
    let was = old.filter(|o| selected(o, query));
    match (was, new.filter(|n| selected(n, query))) {
        (Some(_), Some(n)) => Some(event_line("MODIFIED", n)),
        (None, Some(n)) => Some(event_line("ADDED", n)),
        // (An object that stops matching is gone for this watch: its new state, as DELETED.)
        (Some(o), None) => Some(event_line("DELETED", new.unwrap_or(o))),
        (None, None) => None,
    }
}

/// `s` with its `%XX` escapes decoded (a query's values).
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes.get(i + 1..i + 3).and_then(|h| u8::from_str_radix(std::str::from_utf8(h).ok()?, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b'+', _) => {
                out.push(b' ');
                i += 1;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub fn event_line(kind: &str, obj: &Value) -> String {
    format!("{}\n", json!({ "type": kind, "object": obj }))
}

impl FakeApi {
    pub fn new() -> Self {
        let collections = COLLECTIONS.into_iter().map(|p| (p, Collection::default())).collect();
        FakeApi {
            state: Arc::new(Mutex::new(State {
                rv: 100,
                collections,
                watches_end_at_once: Vec::new(),
                refused: HashMap::new(),
            })),
            held_lists: Arc::new(tokio::sync::watch::Sender::new(Vec::new())),
            stalled_lists: Arc::new(tokio::sync::watch::Sender::new(Vec::new())),
        }
    }

    pub fn rv(&self) -> u64 {
        self.state.lock().unwrap().rv
    }

    /// Stores `obj` and tells watchers (ADDED or MODIFIED), as the apiserver does on a write.
    pub fn upsert(&self, path: &'static str, mut obj: Value) {
        let mut st = self.state.lock().unwrap();
        st.rv += 1;
        let rv = st.rv;
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        let c = st.collections.get_mut(path).unwrap();
        let old = c.objects.insert(key(&obj), obj.clone());
        c.history.push((rv, old.clone(), Some(obj.clone())));
        c.watchers.retain(|w| w.send(WatchMsg::Change(old.clone(), Some(obj.clone()))).is_ok());
    }

    pub fn delete(&self, path: &'static str, k: &str) {
        let mut st = self.state.lock().unwrap();
        st.rv += 1;
        let rv = st.rv;
        let c = st.collections.get_mut(path).unwrap();
        let mut obj = c.objects.remove(k).unwrap();
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        c.history.push((rv, Some(obj.clone()), None));
        c.watchers.retain(|w| w.send(WatchMsg::Change(Some(obj.clone()), None)).is_ok());
    }

    /// Sends a BOOKMARK at the current version to the watchers of `path`; returns the version.
    pub fn bookmark(&self, path: &'static str) -> u64 {
        let mut st = self.state.lock().unwrap();
        let rv = st.rv;
        let (kind, api_version) = kind_of(path);
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
    pub fn lose_history_and_expire(&self, path: &'static str, deleted_unseen: &str) {
        let mut st = self.state.lock().unwrap();
        st.rv += 1;
        let rv = st.rv;
        let c = st.collections.get_mut(path).unwrap();
        c.objects.remove(deleted_unseen).unwrap();
        c.history.clear();
        c.compacted_below = rv; // a watch from the current version (a fresh list) is fine
        let line = gone_line(rv);
        for w in c.watchers.drain(..) {
            let _ = w.send(WatchMsg::Line(line.clone()));
            let _ = w.send(WatchMsg::Drop);
        }
    }

    /// Answers every later request on `path` with `code` (401 or 403) and a Status body, as the API
    /// server does without credentials or RBAC permission; `None` serves it again.
    pub fn refuse(&self, path: &'static str, code: Option<u16>) {
        let mut st = self.state.lock().unwrap();
        match code {
            Some(c) => st.refused.insert(path, c),
            None => st.refused.remove(path),
        };
    }

    /// Ends every later watch on `path` as soon as its answer's head is sent, with no event.
    pub fn end_watches_at_once(&self, path: &'static str) {
        self.state.lock().unwrap().watches_end_at_once.push(path);
    }

    /// Holds the answers to list requests on `path` (a slow list) until [`FakeApi::release_lists`];
    /// a held list answers with the objects as they are when it is released.
    pub fn hold_lists(&self, path: &'static str) {
        self.held_lists.send_modify(|h| h.push(path));
    }

    /// Answers the held list requests on `path`, and later ones at once.
    pub fn release_lists(&self, path: &'static str) {
        self.held_lists.send_modify(|h| h.retain(|p| *p != path));
    }

    /// Sends `line` (a JSON watch event and its newline) to the live watchers of `path`, as is.
    pub fn send_raw(&self, path: &'static str, line: &str) {
        let mut st = self.state.lock().unwrap();
        st.collections.get_mut(path).unwrap().watchers.retain(|w| w.send(WatchMsg::Line(line.to_string())).is_ok());
    }

    /// Makes the lists of `path` stall (`true`: half the answer is sent, then nothing, the
    /// connection left open, as from a peer gone without a reset) or answer again (`false`).
    pub fn stall_lists(&self, path: &'static str, stall: bool) {
        self.stalled_lists.send_modify(|h| {
            h.retain(|p| *p != path);
            if stall {
                h.push(path);
            }
        });
    }

    /// Closes every live watch connection on `path` abruptly.
    pub fn drop_watches(&self, path: &'static str) {
        let mut st = self.state.lock().unwrap();
        for w in st.collections.get_mut(path).unwrap().watchers.drain(..) {
            let _ = w.send(WatchMsg::Drop);
        }
    }
}

/// The kind and API version of the objects of `path`.
fn kind_of(path: &str) -> (&'static str, &'static str) {
    match path {
        SERVICES => ("Service", "v1"),
        NODES => ("Node", "v1"),
        _ => ("EndpointSlice", "discovery.k8s.io/v1"),
    }
}

pub fn gone_line(rv: u64) -> String {
    format!(
        "{}\n",
        json!({ "type": "ERROR", "object": {
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": format!("too old resource version: 1 ({rv})"), "reason": "Expired", "code": 410 } })
    )
}

pub async fn serve(api: FakeApi, listener: TcpListener, requests: mpsc::UnboundedSender<Request>) {
    loop {
        let Ok((sock, _)) = listener.accept().await else { return };
        let api = api.clone();
        let requests = requests.clone();
        tokio::spawn(async move {
            let peer = sock.peer_addr().ok();
            let _ = handle(api, sock, peer, requests).await;
        });
    }
}

/// [`serve`] behind TLS: each accepted connection's handshake result goes to `handshakes` (`Err`
/// with the reason, e.g. the client's alert for a certificate it does not trust), and the requests
/// on the connections whose handshake succeeded are answered as [`serve`] answers them.
pub async fn serve_tls(
    api: FakeApi,
    listener: TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    requests: mpsc::UnboundedSender<Request>,
    handshakes: mpsc::UnboundedSender<Result<(), String>>,
) {
    loop {
        let Ok((sock, peer)) = listener.accept().await else { return };
        let (api, acceptor, requests, handshakes) =
            (api.clone(), acceptor.clone(), requests.clone(), handshakes.clone());
        tokio::spawn(async move {
            match acceptor.accept(sock).await {
                Ok(tls) => {
                    let _ = handshakes.send(Ok(()));
                    let _ = handle(api, tls, Some(peer), requests).await;
                }
                Err(e) => {
                    let _ = handshakes.send(Err(e.to_string()));
                }
            }
        });
    }
}

pub async fn handle<S: AsyncRead + AsyncWrite + Unpin>(
    api: FakeApi,
    mut sock: S,
    peer: Option<std::net::SocketAddr>,
    requests: mpsc::UnboundedSender<Request>,
) -> std::io::Result<()> {
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
        qs.split('&').filter_map(|kv| kv.split_once('=')).map(|(k, v)| (k.to_string(), percent_decode(v))).collect();
    let authorization = head
        .lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(name, _)| name.trim().eq_ignore_ascii_case("authorization"))
        .map(|(_, value)| value.trim().to_string());
    let req = Request { path: path.to_string(), query, at: std::time::Instant::now(), peer, authorization };
    // A watch of a collection is recorded once it is registered for live events (below), so a test
    // that waits for the watch request and then sends an event knows the event reaches it.
    let refused = api.state.lock().unwrap().refused.get(req.path.as_str()).copied();
    let is_collection = COLLECTIONS.contains(&req.path.as_str());
    if !(req.is_watch() && is_collection && refused.is_none()) {
        let _ = requests.send(req.clone());
    }
    let Some(path) = COLLECTIONS.into_iter().find(|p| *p == req.path) else {
        let body = r#"{"kind":"Status","apiVersion":"v1","status":"Failure","reason":"NotFound","code":404}"#;
        let resp = format!(
            "HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        return sock.write_all(resp.as_bytes()).await;
    };

    if let Some(code) = refused {
        let (reason, phrase) = if code == 401 { ("Unauthorized", "Unauthorized") } else { ("Forbidden", "Forbidden") };
        let resource = match path {
            SERVICES => "services",
            NODES => "nodes",
            _ => "endpointslices.discovery.k8s.io",
        };
        let body = json!({ "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": format!("{resource} is forbidden: User \"system:serviceaccount:lb:lb\" cannot list resource \"{resource}\" at the cluster scope"),
            "reason": reason, "code": code })
        .to_string();
        let resp = format!(
            "HTTP/1.1 {code} {phrase}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        return sock.write_all(resp.as_bytes()).await;
    }

    if !req.is_watch() {
        let _ = api.held_lists.subscribe().wait_for(|h| !h.contains(&path)).await;
        let body = {
            let st = api.state.lock().unwrap();
            let c = &st.collections[path];
            let (kind, api_version) = kind_of(path);
            json!({ "kind": format!("{kind}List"), "apiVersion": api_version, "metadata": { "resourceVersion": st.rv.to_string() },
                    "items": c.objects.values().filter(|o| selected(o, &req.query)).collect::<Vec<_>>() })
            .to_string()
        };
        let resp = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        if api.stalled_lists.borrow().contains(&path) {
            sock.write_all(&resp.as_bytes()[..resp.len() - body.len() / 2]).await?;
            let _ = api.stalled_lists.subscribe().wait_for(|h| !h.contains(&path)).await;
            return Ok(());
        }
        return sock.write_all(resp.as_bytes()).await;
    }

    if api.state.lock().unwrap().watches_end_at_once.contains(&path) {
        let _ = requests.send(req);
        return sock
            .write_all(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\
                  Connection: close\r\n\r\n0\r\n\r\n",
            )
            .await;
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
            for (v, old, new) in &c.history {
                if *v > since {
                    let _ = tx.send(WatchMsg::Change(old.clone(), new.clone()));
                }
            }
            c.watchers.push(tx);
        }
    }
    let query = req.query.clone();
    let _ = requests.send(req);
    sock.write_all(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n",
    )
    .await?;
    while let Some(msg) = rx.recv().await {
        let line = match msg {
            WatchMsg::Line(line) => line,
            WatchMsg::Change(old, new) => match change_line(old.as_ref(), new.as_ref(), &query) {
                Some(line) => line,
                None => continue,
            },
            WatchMsg::Drop => return Ok(()), // socket closed mid-stream, no final chunk
        };
        sock.write_all(format!("{:x}\r\n{line}\r\n", line.len()).as_bytes()).await?;
    }
    // The sender went away after a 410 reply: end the stream cleanly.
    sock.write_all(b"0\r\n\r\n").await
}

pub fn fixture(name: &str) -> Value {
    let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// The requests the server received, in order; requests not yet matched wait in `pending`.
pub struct Requests {
    rx: mpsc::UnboundedReceiver<Request>,
    pending: Vec<Request>,
}

impl Requests {
    /// The first request (pending or new) satisfying `pred`; others stay pending.
    pub async fn next(&mut self, what: &str, pred: impl Fn(&Request) -> bool) -> Request {
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
    pub fn clear(&mut self) {
        self.pending.clear();
        while self.rx.try_recv().is_ok() {}
    }
}

/// Starts the server on 127.0.0.1; returns its port and the log of requests.
pub async fn start(api: FakeApi) -> (u16, Requests) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (req_tx, req_rx) = mpsc::unbounded_channel();
    tokio::spawn(serve(api, listener, req_tx));
    (port, Requests { rx: req_rx, pending: Vec::new() })
}

/// Starts the server on 127.0.0.1 behind TLS with `acceptor`; returns its port, the log of requests
/// and the connections' handshake results ([`serve_tls`]).
pub async fn start_tls(
    api: FakeApi,
    acceptor: tokio_rustls::TlsAcceptor,
) -> (u16, Requests, mpsc::UnboundedReceiver<Result<(), String>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (req_tx, req_rx) = mpsc::unbounded_channel();
    let (hs_tx, hs_rx) = mpsc::unbounded_channel();
    tokio::spawn(serve_tls(api, listener, acceptor, req_tx, hs_tx));
    (port, Requests { rx: req_rx, pending: Vec::new() }, hs_rx)
}

/// Writes a kubeconfig for `https://127.0.0.1:port` into `dir`: the server is verified against
/// `ca_data` (base64 of the CA's PEM, as `certificate-authority-data` holds it) and the user's
/// credentials are `user` (its fields and values: `token`, or `client-certificate-data` and
/// `client-key-data`).
pub fn kubeconfig_tls(dir: &Path, port: u16, ca_data: &str, user: &[(&str, &str)]) -> PathBuf {
    let user: String = user.iter().map(|(k, v)| format!("    {k}: {v}\n")).collect();
    let cluster = format!("    server: https://127.0.0.1:{port}\n    certificate-authority-data: {ca_data}\n");
    write_kubeconfig(dir, &cluster, &format!("  user:\n{user}"))
}

/// Writes a kubeconfig for `http://127.0.0.1:port` into `dir`.
pub fn kubeconfig(dir: &Path, port: u16) -> PathBuf {
    write_kubeconfig(dir, &format!("    server: http://127.0.0.1:{port}\n"), "  user: {}\n")
}

/// Writes `dir/kubeconfig`: one cluster (`cluster`, its fields' lines), one user (`user`, its
/// `user:` lines) and the context that joins them.
fn write_kubeconfig(dir: &Path, cluster: &str, user: &str) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let path = dir.join("kubeconfig");
    std::fs::write(
        &path,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n{cluster}\
             users:\n- name: test\n{user}contexts:\n- name: fake\n  context:\n    cluster: fake\n    user: test\n\
             current-context: fake\n"
        ),
    )
    .unwrap();
    path
}

/// A JSON endpoint with conditions.
pub fn endpoint(ip: &str, node: &str, ready: bool, serving: bool, terminating: bool) -> Value {
    json!({ "addresses": [ip], "nodeName": node,
            "conditions": { "ready": ready, "serving": serving, "terminating": terminating } })
}

/// Receives translations until one satisfies `pred`.
pub async fn until(
    rx: &mut mpsc::Receiver<Translation>,
    what: &str,
    pred: impl Fn(&Translation) -> bool,
) -> Translation {
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

pub fn backends(t: &Translation, key: &str) -> Option<Vec<(String, BackendState)>> {
    t.services.iter().find(|s| s.config.key.to_string() == key).map(|s| {
        s.config.backends.iter().map(|b| (std::net::SocketAddr::new(b.addr, b.port).to_string(), b.state)).collect()
    })
}

/// shop/web (its IPv4 cluster IP only) and its IPv4 slice: the cluster most tests start from.
pub fn web_cluster() -> FakeApi {
    let api = FakeApi::new();
    let mut web = fixture("service-web.json");
    web["spec"]["clusterIPs"] = json!(["10.96.12.34"]);
    api.upsert(SERVICES, web);
    api.upsert(SLICES, fixture("endpointslice-web-ipv4.json"));
    api
}
