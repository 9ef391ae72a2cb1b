//! The health check node ports of LoadBalancer Services with `externalTrafficPolicy: Local`
//! ([`NodeHealthCheck`]), answered as kube-proxy answers them: a cloud load balancer asks each node
//! and sends the Service's traffic only to nodes that answer 200, so a node with no local endpoint
//! (where `lb` drops such traffic, counted as `no_backend`) is taken out of rotation.
//!
//! Every request on the port, whatever its path, gets kube-proxy's body to the byte,
//! `{"service": {"namespace": NS, "name": NAME}, "localEndpoints": N, "serviceProxyHealthy": H}`
//! (on lines, indented by tabs), with status 200 when N > 0 and H, 503 otherwise, and kube-proxy's `X-Load-Balancing-Endpoint-Weight: N`
//! header. N counts the endpoints of the request's address family (of the Service's only one if it
//! has one), as each of kube-proxy's per-family proxiers counts its own. H is false, as kube-proxy's is when an update waits unapplied for twice its sync period,
//! once the poll loops have not taken or swapped in the last tables for [`PROXY_HEALTH_TIMEOUT`]
//! (a stuck loop: the node serves neither the cluster as it is nor, on that loop's queue, at all). The listeners follow the translation the tables run (once the control loop has applied
//! it; not one it refused), and N is what the tables serve: the endpoints of the Service's ports one
//! of whose node port or load-balancer keys they hold (not one left out by lb-core or the workers,
//! whose traffic the node drops), 0 when they hold none. A port is opened when a
//! Service asks for it and closed when none does; a port another process holds is tried again
//! every 2 s until it opens. The kernel, not the XDP program, receives these connections (the port is
//! no service's), so they reach the node's own stack and this server.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::translate::NodeHealthCheck;

/// How long a client may take to send its request before the answer goes out anyway.
const READ_TIMEOUT: Duration = Duration::from_secs(2);

/// How often a port that could not be opened (another process holds it) is tried again while a
/// Service still asks for it.
const BIND_RETRY: Duration = Duration::from_secs(2);

/// How long the poll loops may leave the last tables unapplied before the node answers unhealthy:
/// kube-proxy's 60 s (twice its default sync period).
pub const PROXY_HEALTH_TIMEOUT: Duration = Duration::from_secs(60);

/// Since when the poll loops have not applied the last tables (`None`: they run them).
pub type BehindSince = watch::Receiver<Option<std::time::Instant>>;

/// When the poll loops were last found running the tables of the last update (`None`: not yet):
/// kube-proxy's last sync.
pub type SyncedAt = watch::Receiver<Option<std::time::Instant>>;

/// What each open port answers, by port.
type Answers = Arc<RwLock<HashMap<u16, NodeHealthCheck>>>;

/// Serves the health check node ports that `checks` lists, on `addr` (the unspecified address: every
/// node address), until `checks` closes, unhealthy while `behind` is older than
/// [`PROXY_HEALTH_TIMEOUT`]. After each change, `served` holds the checks being answered (those
/// whose port is open). A port that cannot be bound (in use) is logged and tried again at the
/// change or after 2 s, whichever comes first.
pub async fn serve(
    addr: IpAddr,
    checks: watch::Receiver<Vec<NodeHealthCheck>>,
    behind: BehindSince,
    served: watch::Sender<Vec<NodeHealthCheck>>,
) {
    serve_retrying(addr, checks, behind, served, BIND_RETRY).await;
}

/// [`serve`], trying ports that could not be opened again every `retry`.
async fn serve_retrying(
    addr: IpAddr,
    mut checks: watch::Receiver<Vec<NodeHealthCheck>>,
    behind: BehindSince,
    served: watch::Sender<Vec<NodeHealthCheck>>,
    retry: Duration,
) {
    let answers: Answers = Arc::default();
    let mut listeners: HashMap<u16, JoinHandle<()>> = HashMap::new();
    // Ports whose failure to open was logged as a warning (later failures are logged at debug).
    let mut refused: HashSet<u16> = HashSet::new();
    loop {
        let wanted = checks.borrow_and_update().clone();
        if let Ok(mut a) = answers.write() {
            *a = wanted.iter().map(|c| (c.port, c.clone())).collect();
        }
        let gone: Vec<u16> = listeners.keys().copied().filter(|p| !wanted.iter().any(|c| c.port == *p)).collect();
        for port in gone {
            if let Some(task) = listeners.remove(&port) {
                // Awaited once aborted, so the listener is closed before `served` says so.
                task.abort();
                let _ = task.await;
                tracing::info!(port, "health check node port closed");
            }
        }
        for c in &wanted {
            if listeners.contains_key(&c.port) {
                continue;
            }
            // (The IPv6 unspecified address takes IPv4 too; on a node without IPv6, IPv4's alone.)
            let bind =
                |addr| crate::metrics::bind_listener(SocketAddr::new(addr, c.port)).and_then(TcpListener::from_std);
            let bound = match bind(addr) {
                Err(e) if addr == IpAddr::V6(Ipv6Addr::UNSPECIFIED) => {
                    bind(IpAddr::V4(Ipv4Addr::UNSPECIFIED)).map_err(|_| e)
                }
                bound => bound,
            };
            match bound {
                Ok(l) => {
                    refused.remove(&c.port);
                    tracing::info!(port = c.port, service = %format!("{}/{}", c.namespace, c.name), "health check node port open");
                    listeners.insert(c.port, tokio::spawn(accept(l, c.port, answers.clone(), behind.clone())));
                }
                Err(e) if refused.insert(c.port) => {
                    tracing::warn!(
                        port = c.port,
                        "cannot open health check node port (tried again every {retry:?}): {e}"
                    );
                }
                Err(e) => tracing::debug!(port = c.port, "cannot open health check node port yet: {e}"),
            }
        }
        refused.retain(|p| wanted.iter().any(|c| c.port == *p));
        served.send_replace(wanted.into_iter().filter(|c| listeners.contains_key(&c.port)).collect());
        let changed = if refused.is_empty() {
            checks.changed().await
        } else {
            tokio::select! {
                changed = checks.changed() => changed,
                () = tokio::time::sleep(retry) => Ok(()),
            }
        };
        if changed.is_err() {
            break;
        }
    }
    for task in listeners.values() {
        task.abort();
    }
}

async fn accept(listener: TcpListener, port: u16, answers: Answers, behind: BehindSince) {
    loop {
        match listener.accept().await {
            Ok((conn, _)) => {
                tokio::spawn(answer(conn, port, answers.clone(), behind.clone()));
            }
            // (Out of descriptors, say: as the metrics endpoint, wait rather than spin.)
            Err(_) => tokio::time::sleep(Duration::from_secs(1)).await,
        }
    }
}

/// Reads a request's head (up to its blank line, 4 KiB or [`READ_TIMEOUT`]) and returns its path
/// (empty if it has none).
async fn read_path(conn: &mut TcpStream) -> String {
    let mut buf = [0u8; 4096];
    let mut read = 0;
    let _ = tokio::time::timeout(READ_TIMEOUT, async {
        while read < buf.len() && !buf[..read].windows(4).any(|w| w == b"\r\n\r\n") {
            match conn.read(&mut buf[read..]).await {
                Ok(0) | Err(_) => break,
                Ok(n) => read += n,
            }
        }
    })
    .await;
    let head = String::from_utf8_lossy(&buf[..read]);
    let target = head.split_whitespace().nth(1).unwrap_or_default();
    target.split('?').next().unwrap_or_default().to_string()
}

/// Reads the request and answers it, whatever its path (as kube-proxy's health check server does).
async fn answer(mut conn: TcpStream, port: u16, answers: Answers, behind: BehindSince) {
    let _ = read_path(&mut conn).await;
    let check = answers.read().ok().and_then(|a| a.get(&port).cloned());
    let Some(c) = check else { return };
    let healthy = behind.borrow().is_none_or(|since| since.elapsed() < PROXY_HEALTH_TIMEOUT);
    // (On the IPv6 unspecified address an IPv4 client comes to an IPv4-mapped address.)
    let to_ipv4 = conn.local_addr().map_or(true, |a| a.ip().to_canonical().is_ipv4());
    let _ = conn.write_all(response(&c, healthy, to_ipv4).as_bytes()).await;
    let _ = conn.shutdown().await;
}

/// Serves kube-proxy's own health server on `addr` (its `--healthz-bind-address`, 10256) until the
/// task is dropped: `/healthz` and `/livez` answer 200 while the poll loops run the last tables (or
/// have left them unapplied less than [`PROXY_HEALTH_TIMEOUT`]) and 503 after, with kube-proxy's
/// JSON; any other path 404. `/healthz` answers 503 too while the node is not `eligible` (its Node
/// being deleted or tainted `ToBeDeletedByClusterAutoscaler`: [`super::node`]), with
/// `"nodeEligible": false`; `/livez` does not look at it. A 503's `lastUpdated` is when the loops
/// were last found running the last tables (`synced`). Cloud load balancers check `/healthz` on
/// every node for their `externalTrafficPolicy: Cluster` Services (GKE; AWS and Azure with
/// KEP-3458's checks): where `lb` replaces kube-proxy and nothing answered, every node was out of
/// their rotation. A port that cannot be had (kube-proxy still on it) is logged and tried again
/// every 2 s.
pub async fn serve_proxy_healthz(
    addr: SocketAddr,
    behind: BehindSince,
    synced: SyncedAt,
    eligible: watch::Receiver<bool>,
) {
    STARTED.get_or_init(std::time::Instant::now);
    let mut warned = false;
    let listener = loop {
        match crate::metrics::bind_listener(addr).and_then(TcpListener::from_std) {
            Ok(l) => break l,
            Err(e) if !warned => {
                warned = true;
                tracing::warn!(%addr, "cannot open kube-proxy's health port (tried again every {BIND_RETRY:?}): {e}");
            }
            Err(e) => tracing::debug!(%addr, "cannot open kube-proxy's health port yet: {e}"),
        }
        tokio::time::sleep(BIND_RETRY).await;
    };
    tracing::info!(%addr, "serving kube-proxy's /healthz and /livez");
    loop {
        match listener.accept().await {
            Ok((mut conn, _)) => {
                let (behind, synced, eligible) = (behind.clone(), synced.clone(), eligible.clone());
                tokio::spawn(async move {
                    let path = read_path(&mut conn).await;
                    let (since, synced, eligible) = (*behind.borrow(), *synced.borrow(), *eligible.borrow());
                    let answer = proxy_health_response(&path, since, synced, eligible);
                    let _ = conn.write_all(answer.as_bytes()).await;
                    let _ = conn.shutdown().await;
                });
            }
            Err(_) => tokio::time::sleep(Duration::from_secs(1)).await,
        }
    }
}

/// Where the monotonic readings of kube-proxy's health server's times count from: Go's count from
/// the process's start, these from the server's (or the first answer's).
static STARTED: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();

/// kube-proxy's `healthzHandler` and `livezHandler` answer to `path`, the poll loops behind since
/// `since` (`None`: they run the last tables) and last found running the tables of the last
/// update at `synced` (`None`: never yet), the node `eligible` or not (pkg/proxy/healthcheck/
/// proxy_health.go: `/healthz` is healthy only if both, `/livez` ignores eligibility). Times are
/// written as kube-proxy's `%q` of a Go `time.Time` writes them ([`go_time`]; cloud checks read the
/// status alone).
fn proxy_health_response(
    path: &str,
    since: Option<std::time::Instant>,
    synced: Option<std::time::Instant>,
    eligible: bool,
) -> String {
    use k8s_openapi::jiff::{SignedDuration, Timestamp};
    let (now, now_mono) = (Timestamp::now(), std::time::Instant::now());
    let started = *STARTED.get_or_init(|| now_mono);
    // (Signed: `since` may be before the first answer.)
    let mono = |at: std::time::Instant| match at.checked_duration_since(started) {
        Some(d) => SignedDuration::try_from(d).unwrap_or(SignedDuration::MAX),
        None => -SignedDuration::try_from(started.duration_since(at)).unwrap_or(SignedDuration::MAX),
    };
    let healthy = since.is_none_or(|s| now_mono.duration_since(s) < PROXY_HEALTH_TIMEOUT);
    let ok = if path == "/healthz" { healthy && eligible } else { healthy };
    // kube-proxy's `lastUpdated`: now while it answers 200 (as its older releases, whose sync loop
    // ran all the time); while it answers 503, behind or not eligible, its last sync (the latest
    // `Updated`), Go's zero time before the first.
    let current = go_time(now, mono(now_mono));
    let last = match synced {
        _ if ok => current.clone(),
        Some(s) => {
            let wall = SignedDuration::try_from(now_mono.duration_since(s)).ok().and_then(|d| now.checked_sub(d).ok());
            go_time(wall.unwrap_or(now), mono(s))
        }
        None => "0001-01-01 00:00:00 +0000 UTC".to_string(),
    };
    let now = current;
    let status = if ok { "200 OK" } else { "503 Service Unavailable" };
    let (status, ctype, body) = match path {
        "/healthz" => (
            status,
            "application/json",
            format!(r#"{{"lastUpdated": "{last}","currentTime": "{now}", "nodeEligible": {eligible}}}"#),
        ),
        "/livez" => (status, "application/json", format!(r#"{{"lastUpdated": "{last}","currentTime": "{now}"}}"#)),
        _ => ("404 Not Found", "text/plain; charset=utf-8", "404 page not found\n".to_string()),
    };
    format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nX-Content-Type-Options: nosniff\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

/// `at`, with the monotonic reading `mono`, as Go's `time.Time.String()` writes a time of
/// `time.Now()` in UTC: `2006-01-02 15:04:05.999999999 -0700 MST` (the fraction without its
/// trailing zeros, none if whole) then ` m=±seconds.nanoseconds`.
fn go_time(at: k8s_openapi::jiff::Timestamp, mono: k8s_openapi::jiff::SignedDuration) -> String {
    let mut fraction = format!(".{:09}", at.subsec_nanosecond());
    while fraction.ends_with('0') {
        fraction.pop();
    }
    if fraction == "." {
        fraction.clear();
    }
    let sign = if mono.is_negative() { '-' } else { '+' };
    let mono = mono.abs();
    format!(
        "{}{fraction} +0000 UTC m={sign}{}.{:09}",
        at.strftime("%Y-%m-%d %H:%M:%S"),
        mono.as_secs(),
        mono.subsec_nanos()
    )
}

/// The HTTP response for `c` to a request to an IPv4 address if `to_ipv4`, as kube-proxy's
/// `hcHandler` writes it.
fn response(c: &NodeHealthCheck, healthy: bool, to_ipv4: bool) -> String {
    let n = c.local_endpoints(to_ipv4);
    let status = if n > 0 && healthy { "200 OK" } else { "503 Service Unavailable" };
    // (kube-proxy's template, dedented and trimmed of newlines; `%q` of a namespace or a name, DNS
    // labels both, is their JSON string.)
    let quoted = |s: &str| serde_json::Value::from(s).to_string();
    let body = format!(
        "{{\n\t\"service\": {{\n\t\t\"namespace\": {},\n\t\t\"name\": {}\n\t}},\n\t\"localEndpoints\": {n},\n\t\"serviceProxyHealthy\": {healthy}\n}}",
        quoted(&c.namespace),
        quoted(&c.name)
    );
    format!(
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nX-Content-Type-Options: nosniff\r\n\
         X-Load-Balancing-Endpoint-Weight: {n}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(port: u16, local_endpoints: u8) -> NodeHealthCheck {
        let ports = vec![super::super::translate::LocalEndpoints {
            name: "ingress/edge:https".into(),
            external_keys: Vec::new(),
            addrs: (1..=local_endpoints).map(|i| IpAddr::from([10, 244, 1, i])).collect(),
        }];
        NodeHealthCheck { port, namespace: "ingress".into(), name: "edge".into(), families: (true, false), ports }
    }

    async fn get(port: u16) -> std::io::Result<String> {
        get_from(IpAddr::from([127, 0, 0, 1]), port).await
    }

    async fn get_from(addr: IpAddr, port: u16) -> std::io::Result<String> {
        let mut c = TcpStream::connect((addr, port)).await?;
        c.write_all(b"GET /healthz HTTP/1.1\r\nHost: node\r\n\r\n").await?;
        let mut out = String::new();
        c.read_to_string(&mut out).await?;
        Ok(out)
    }

    /// The port opens when a Service asks for it, answers 200 with the count while the node has local
    /// endpoints and 503 when it has none, and closes when no Service asks for it.
    #[tokio::test]
    async fn answers_follow_the_local_endpoints_and_the_port_closes_with_its_service() {
        let port = crate::lab::unused_port();
        let (tx, rx) = watch::channel(vec![check(port, 2)]);
        let (served_tx, served) = watch::channel(Vec::new());
        let (_behind_tx, behind) = watch::channel(None);
        let server = tokio::spawn(serve(IpAddr::from([127, 0, 0, 1]), rx, behind, served_tx));
        let applied = |want: Vec<NodeHealthCheck>| {
            let mut served = served.clone();
            async move {
                let wait = served.wait_for(|s| *s == want);
                tokio::time::timeout(Duration::from_secs(10), wait).await.expect("applied").map(|_| ()).unwrap();
            }
        };
        applied(vec![check(port, 2)]).await;
        let first = get(port).await.unwrap();
        assert!(first.starts_with("HTTP/1.1 200 OK\r\n"), "{first}");
        assert!(first.contains("X-Load-Balancing-Endpoint-Weight: 2\r\n"), "{first}");
        let body = first.split("\r\n\r\n").nth(1).unwrap();
        let json: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(json["service"]["namespace"], "ingress");
        assert_eq!(json["service"]["name"], "edge");
        assert_eq!(json["localEndpoints"], 2);

        tx.send(vec![check(port, 0)]).unwrap();
        applied(vec![check(port, 0)]).await;
        let answer = get(port).await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 503 Service Unavailable\r\n"), "{answer}");
        assert!(answer.contains("\"localEndpoints\": 0"), "{answer}");

        tx.send(vec![]).unwrap();
        applied(vec![]).await;
        let closed = TcpStream::connect(("127.0.0.1", port)).await;
        assert!(closed.is_err(), "the port closed with its Service: {closed:?}");
        drop(tx);
        server.await.unwrap();
    }

    /// A dual-stack Service's count on one port, served on every address of both families: each
    /// request gets its own family's endpoints, as from kube-proxy's proxier of that family. (It
    /// answered both families' sum: a dual-stack pod counted twice.)
    #[tokio::test]
    async fn each_family_is_answered_its_own_local_endpoints() {
        let port = crate::lab::unused_port();
        let mut dual = check(port, 1);
        dual.families = (true, true);
        dual.ports[0]
            .addrs
            .extend(["fd00:10:244:1::1".parse::<IpAddr>().unwrap(), "fd00:10:244:1::2".parse().unwrap()]);
        let (tx, rx) = watch::channel(vec![dual.clone()]);
        let (served_tx, mut served) = watch::channel(Vec::new());
        let (_behind_tx, behind) = watch::channel(None);
        let server = tokio::spawn(serve(IpAddr::V6(Ipv6Addr::UNSPECIFIED), rx, behind, served_tx));
        let open = served.wait_for(|s| *s == vec![dual.clone()]);
        tokio::time::timeout(Duration::from_secs(10), open).await.expect("the port opens").unwrap();
        let v4 = get(port).await.unwrap();
        assert!(v4.contains("X-Load-Balancing-Endpoint-Weight: 1\r\n") && v4.contains("\"localEndpoints\": 1"), "{v4}");
        // (Where the node has IPv6, as the test host may not.)
        if let Ok(v6) = get_from(IpAddr::V6(Ipv6Addr::LOCALHOST), port).await {
            assert!(v6.contains("\"localEndpoints\": 2"), "{v6}");
        }
        drop(tx);
        server.await.unwrap();
    }

    /// kube-proxy's own `/healthz` (what clouds check for `externalTrafficPolicy: Cluster`
    /// Services) and `/livez` answer 200 while the poll loops run the tables, 503 once they have
    /// been behind [`PROXY_HEALTH_TIMEOUT`]; another path 404. Where `lb` replaced kube-proxy,
    /// nothing answered, and the cloud took every node out of those Services' rotation.
    #[tokio::test]
    async fn kube_proxys_healthz_answers_while_the_loops_run_the_tables() {
        let port = crate::lab::unused_port();
        let (behind_tx, behind) = watch::channel(None);
        let (eligible_tx, eligible) = watch::channel(true);
        let (_synced_tx, synced) = watch::channel(Some(std::time::Instant::now()));
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let server = tokio::spawn(serve_proxy_healthz(addr, behind, synced, eligible));
        let get_path = |path: &'static str| async move {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            loop {
                match TcpStream::connect(("127.0.0.1", port)).await {
                    Ok(mut c) => {
                        c.write_all(format!("GET {path} HTTP/1.1\r\nHost: node\r\n\r\n").as_bytes()).await.unwrap();
                        let mut out = String::new();
                        c.read_to_string(&mut out).await.unwrap();
                        return out;
                    }
                    Err(e) if tokio::time::Instant::now() > deadline => panic!("never opened: {e}"),
                    Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                }
            }
        };
        let healthz = get_path("/healthz").await;
        assert!(healthz.starts_with("HTTP/1.1 200 OK\r\n"), "{healthz}");
        let body: serde_json::Value = serde_json::from_str(healthz.split("\r\n\r\n").nth(1).unwrap()).unwrap();
        assert_eq!(body["nodeEligible"], true, "{body}");
        assert!(body["lastUpdated"].is_string() && body["currentTime"].is_string(), "{body}");
        assert!(get_path("/livez").await.starts_with("HTTP/1.1 200 OK\r\n"));
        assert!(get_path("/metrics").await.starts_with("HTTP/1.1 404 Not Found\r\n"));

        let long_ago = std::time::Instant::now().checked_sub(PROXY_HEALTH_TIMEOUT + Duration::from_secs(1)).unwrap();
        behind_tx.send(Some(long_ago)).unwrap();
        for path in ["/healthz", "/livez"] {
            let stuck = get_path(path).await;
            assert!(stuck.starts_with("HTTP/1.1 503 Service Unavailable\r\n"), "{path}: {stuck}");
        }
        behind_tx.send(None).unwrap();
        assert!(get_path("/healthz?verbose").await.starts_with("HTTP/1.1 200 OK\r\n"));

        // A node being deleted (or tainted by the autoscaler): /healthz 503 with nodeEligible
        // false, so the clouds drain it; /livez, which says whether the proxy works, 200.
        eligible_tx.send(false).unwrap();
        let draining = get_path("/healthz").await;
        assert!(draining.starts_with("HTTP/1.1 503 Service Unavailable\r\n"), "{draining}");
        let body: serde_json::Value = serde_json::from_str(draining.split("\r\n\r\n").nth(1).unwrap()).unwrap();
        assert_eq!(body["nodeEligible"], false, "{body}");
        assert!(get_path("/livez").await.starts_with("HTTP/1.1 200 OK\r\n"));
        eligible_tx.send(true).unwrap();
        assert!(get_path("/healthz").await.starts_with("HTTP/1.1 200 OK\r\n"));
        server.abort();
    }

    /// The body is kube-proxy's `hcHandler`'s byte for byte: its template dedented (one tab a level,
    /// a space after each colon) and trimmed of newlines. It was the same JSON written compact.
    #[test]
    fn the_health_check_body_is_kube_proxys_to_the_byte() {
        let answer = response(&check(32100, 2), true, true);
        let body = answer.split("\r\n\r\n").nth(1).unwrap();
        assert_eq!(
            body,
            "{\n\t\"service\": {\n\t\t\"namespace\": \"ingress\",\n\t\t\"name\": \"edge\"\n\t},\n\t\"localEndpoints\": 2,\n\t\"serviceProxyHealthy\": true\n}"
        );
        assert!(answer.contains(&format!("\r\nContent-Length: {}\r\n", body.len())), "{answer}");
    }

    /// The JSON body of an HTTP answer.
    fn body(r: String) -> serde_json::Value {
        serde_json::from_str(r.split("\r\n\r\n").nth(1).unwrap()).unwrap()
    }

    /// (wall clock, monotonic reading in seconds) of a time as Go writes it.
    fn read(t: &serde_json::Value) -> (k8s_openapi::jiff::Timestamp, f64) {
        let t = t.as_str().unwrap();
        let fields: Vec<&str> = t.split(' ').collect();
        assert_eq!(fields.len(), 5, "{t}");
        assert_eq!(fields[2..4], ["+0000", "UTC"], "{t}");
        let wall = format!("{}T{}Z", fields[0], fields[1]).parse().unwrap_or_else(|e| panic!("{t}: {e}"));
        let mono = fields[4].strip_prefix("m=").unwrap_or_else(|| panic!("{t}"));
        let (secs, nanos) = mono.split_once('.').unwrap();
        assert!(secs.starts_with(['+', '-']) && nanos.len() == 9, "{t}");
        (wall, mono.parse().unwrap())
    }

    /// How many seconds `lastUpdated` is behind `currentTime` in `body`, on the wall clock and on
    /// the monotonic one.
    fn last_updated_behind(body: &serde_json::Value) -> (f64, f64) {
        let ((last, last_m), (now, now_m)) = (read(&body["lastUpdated"]), read(&body["currentTime"]));
        (now.duration_since(last).as_secs_f64(), now_m - last_m)
    }

    /// kube-proxy prints `lastUpdated` and `currentTime` with `%q`, so as Go's `time.Time.String()`
    /// writes them: `2026-12-07 02:07:22.123456789 +0000 UTC m=+3600.000000001`, the wall clock in
    /// the node's zone (UTC in kube-proxy's image), then the monotonic reading. They were RFC 3339.
    #[test]
    fn healthz_times_are_written_as_go_writes_a_time() {
        use k8s_openapi::jiff::Timestamp;
        let healthy = body(proxy_health_response("/healthz", None, None, true));
        assert_eq!(healthy["lastUpdated"], healthy["currentTime"], "healthy: last updated now");
        read(&healthy["currentTime"]);
        // Behind for 65 s, last synced then: the last update is that far back on both clocks.
        let then = std::time::Instant::now().checked_sub(PROXY_HEALTH_TIMEOUT + Duration::from_secs(5)).unwrap();
        let stuck = body(proxy_health_response("/livez", Some(then), Some(then), true));
        let (wall, mono) = last_updated_behind(&stuck);
        assert!((wall - 65.0).abs() < 1.0 && (mono - 65.0).abs() < 1.0, "{stuck}");

        let at: Timestamp = "2026-12-07T02:07:22.1234Z".parse().unwrap();
        assert_eq!(
            go_time(at, k8s_openapi::jiff::SignedDuration::new(3600, 1)),
            "2026-12-07 02:07:22.1234 +0000 UTC m=+3600.000000001"
        );
        let whole: Timestamp = "2026-12-07T02:07:22Z".parse().unwrap();
        assert_eq!(
            go_time(whole, k8s_openapi::jiff::SignedDuration::new(-61, -500_000_000)),
            "2026-12-07 02:07:22 +0000 UTC m=-61.500000000"
        );
        assert_eq!(
            go_time(whole, k8s_openapi::jiff::SignedDuration::ZERO),
            "2026-12-07 02:07:22 +0000 UTC m=+0.000000000"
        );
    }

    /// While kube-proxy answers 503 its `lastUpdated` is its last sync (proxy_health.go:
    /// `isHealthy`'s time, its proxiers' latest `Updated`), not when the update left waiting was
    /// queued: here when the loops were last found running the last tables. So too on `/healthz`
    /// while the node is only not eligible (its loops fine), and `/livez` then answers 200 with
    /// now; before any sync, Go's zero time. `lastUpdated` was since when the update waited, and
    /// now while the node was not eligible.
    #[test]
    fn a_503s_last_updated_is_the_last_sync() {
        let now = std::time::Instant::now();
        let synced = now.checked_sub(Duration::from_secs(300)).unwrap();
        let behind = now.checked_sub(PROXY_HEALTH_TIMEOUT + Duration::from_secs(5)).unwrap();
        let near_300 = |(wall, mono): (f64, f64)| (wall - 300.0).abs() < 1.0 && (mono - 300.0).abs() < 1.0;
        for path in ["/healthz", "/livez"] {
            let stuck = proxy_health_response(path, Some(behind), Some(synced), true);
            assert!(stuck.starts_with("HTTP/1.1 503 "), "{stuck}");
            assert!(near_300(last_updated_behind(&body(stuck.clone()))), "{path}: {stuck}");
        }
        let draining = proxy_health_response("/healthz", None, Some(synced), false);
        assert!(draining.starts_with("HTTP/1.1 503 "), "{draining}");
        assert!(near_300(last_updated_behind(&body(draining.clone()))), "{draining}");
        let live = body(proxy_health_response("/livez", None, Some(synced), false));
        assert_eq!(live["lastUpdated"], live["currentTime"], "/livez 200: now");
        let never = body(proxy_health_response("/livez", Some(behind), None, true));
        assert_eq!(never["lastUpdated"], "0001-01-01 00:00:00 +0000 UTC");
    }

    /// While the poll loops have left the last tables unapplied for [`PROXY_HEALTH_TIMEOUT`] the
    /// node is unhealthy, as kube-proxy is when its updates wait: 503 and `serviceProxyHealthy`
    /// false though it has local endpoints; healthy again within the timeout and once they apply.
    #[tokio::test]
    async fn a_node_whose_loops_are_behind_answers_unhealthy() {
        let port = crate::lab::unused_port();
        let (tx, rx) = watch::channel(vec![check(port, 2)]);
        let (served_tx, mut served) = watch::channel(Vec::new());
        let (behind_tx, behind) = watch::channel(None);
        let server = tokio::spawn(serve(IpAddr::from([127, 0, 0, 1]), rx, behind, served_tx));
        let open = served.wait_for(|s| *s == vec![check(port, 2)]);
        tokio::time::timeout(Duration::from_secs(10), open).await.expect("the port opens").unwrap();

        let now = std::time::Instant::now();
        let long_ago = now.checked_sub(PROXY_HEALTH_TIMEOUT + Duration::from_secs(1)).unwrap();
        behind_tx.send(Some(long_ago)).unwrap();
        let stuck = get(port).await.unwrap();
        assert!(stuck.starts_with("HTTP/1.1 503 Service Unavailable\r\n"), "{stuck}");
        assert!(stuck.contains("\"serviceProxyHealthy\": false") && stuck.contains("\"localEndpoints\": 2"), "{stuck}");

        behind_tx.send(Some(now)).unwrap();
        let within = get(port).await.unwrap();
        assert!(within.starts_with("HTTP/1.1 200 OK\r\n"), "{within}");
        behind_tx.send(None).unwrap();
        let applied = get(port).await.unwrap();
        assert!(
            applied.starts_with("HTTP/1.1 200 OK\r\n") && applied.contains("\"serviceProxyHealthy\": true"),
            "{applied}"
        );
        drop(tx);
        server.await.unwrap();
    }

    /// A port another process holds when its Service asks for it (kube-proxy, still serving the
    /// Service before it took the service-proxy-name label; an `lb` still stopping) opens once it is
    /// freed, though no Service changes: a cloud load balancer must not find the node's check
    /// refused until the next cluster change, which in a quiet cluster may never come.
    #[tokio::test]
    async fn a_port_in_use_opens_once_freed_without_a_cluster_change() {
        let holder = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = holder.local_addr().unwrap().port();
        let (tx, rx) = watch::channel(vec![check(port, 1)]);
        let (served_tx, mut served) = watch::channel(Vec::new());
        let (_behind_tx, behind) = watch::channel(None);
        let server = tokio::spawn(serve_retrying(
            IpAddr::from([127, 0, 0, 1]),
            rx,
            behind,
            served_tx,
            Duration::from_millis(20),
        ));
        // The first attempt finds the port taken: nothing is served yet.
        tokio::time::timeout(Duration::from_secs(10), served.changed()).await.expect("first attempt").unwrap();
        assert_eq!(*served.borrow_and_update(), vec![]);
        drop(holder);
        let open = served.wait_for(|s| *s == vec![check(port, 1)]);
        tokio::time::timeout(Duration::from_secs(10), open).await.expect("the freed port opens").unwrap();
        let answer = get(port).await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
        drop(tx);
        server.await.unwrap();
    }
}
