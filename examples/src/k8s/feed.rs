//! The Kubernetes feed: list + watch Services and EndpointSlices, keep a store, translate it.
//!
//! kube-rs's [`watcher()`] speaks the protocol: an initial list (its `resourceVersion` becomes the watch
//! start), `watch=true&allowWatchBookmarks=true` from that version, bookmarks moving the version on
//! without events, a re-list when the server answers 410 Gone (our history is compacted away), and a
//! re-watch from the last version when the connection drops (at most once a second per resource:
//! [`WatchPacing`]). We add back-off between failed
//! attempts (`backing_off`, which starts over only on progress) and the store.
//!
//! The store is applied *atomically per re-list*: `Init` starts a fresh buffer, `InitApply` fills it,
//! `InitDone` replaces the store, so objects deleted while we were disconnected disappear and nothing
//! is published from half a list. Nothing is published at all until both resources have listed once,
//! so a restart never hands the workers Services without their endpoints.
//!
//! Every change marks the store dirty; [`Feed::run`] translates at most once per `debounce` and
//! sends the [`Translation`] to the control loop. Node settings from the configuration file can
//! change under it ([`NodeView`] over a `watch` channel), which re-translates too.

use std::collections::HashMap;
use std::pin::pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::Api;
use kube::runtime::utils::Backoff;
use kube::runtime::watcher::{self, Event, watcher};
use kube::{Client, Resource, ResourceExt};
use lb_core::config::NodeConfig;
use tokio::sync::{mpsc, watch};

use super::translate::{Selectors, Translation};
use crate::config::KubernetesSettings;

/// What the translation needs from the configuration file; replaced on reload.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NodeView {
    /// Feed settings (node name and addresses, defaults).
    pub settings: KubernetesSettings,
    /// Node-wide forwarding settings (which families can be NATed or tunnelled).
    pub node: NodeConfig,
}

impl NodeView {
    /// What the feed needs of `file`.
    pub fn of(file: &crate::config::Settings) -> Self {
        NodeView { settings: file.kubernetes.clone().unwrap_or_default(), node: file.node.clone() }
    }
}

/// Why the feed could not start.
#[derive(Debug, thiserror::Error)]
pub enum FeedError {
    /// The kubeconfig could not be read or used.
    #[error("kubeconfig {path}: {source}")]
    Kubeconfig {
        /// The file.
        path: String,
        /// kube's error.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// No kubeconfig was given and neither in-cluster nor `$KUBECONFIG` configuration works.
    #[error("no Kubernetes configuration found (in-cluster or $KUBECONFIG): {0}")]
    Infer(#[from] kube::config::InferConfigError),
    /// The client could not be built.
    #[error("kubernetes client: {0}")]
    Client(#[from] kube::Error),
}

/// Builds a client from the kubeconfig file if one is given, else in-cluster or `$KUBECONFIG`.
pub async fn client(settings: &KubernetesSettings) -> Result<Client, FeedError> {
    client_with(settings, &ClientTimings::default()).await
}

/// How long a read from the API server may wait before its request fails (and is tried again, after
/// the back-off), unless the configuration sets it: kube sets none, so a list whose answer stopped
/// half-way (the API server's node gone without a reset, a NAT entry expired) hung the feed for good,
/// with nothing logged. Beyond the watches' server-side timeout (290 s), so a quiet watch is never cut.
pub const READ_TIMEOUT: Duration = Duration::from_secs(295);

/// How the client gives up on an API server that no longer answers.
///
/// A watch only reads, and a quiet cluster sends it nothing for minutes: when the connection dies
/// without a FIN or a reset (the API server's node gone, a NAT or conntrack entry lost between),
/// only the read timeout (and kube's idle timeout, as long) would end it, minutes in which the node
/// balanced with stale Services and endpoints. TCP keepalive probes a connection idle for
/// `keepalive_idle`, every `keepalive_interval`, and the kernel closes it (the watch fails, and is
/// resumed on a new connection from its last version) when `keepalive_probes` of them go
/// unanswered: 45 s by default, as long as client-go's HTTP/2 health check (a ping after 30 s
/// without a frame, 15 s for its answer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientTimings {
    /// The read timeout where the configuration sets none ([`READ_TIMEOUT`]).
    pub read_timeout: Duration,
    /// How long a connection is idle before the first keepalive probe.
    pub keepalive_idle: Duration,
    /// The time between unanswered keepalive probes.
    pub keepalive_interval: Duration,
    /// How many unanswered probes close the connection.
    pub keepalive_probes: u32,
}

impl Default for ClientTimings {
    fn default() -> Self {
        ClientTimings {
            read_timeout: READ_TIMEOUT,
            keepalive_idle: Duration::from_secs(30),
            keepalive_interval: Duration::from_secs(5),
            keepalive_probes: 3,
        }
    }
}

/// [`client`], with `timings` (tests take seconds).
pub async fn client_with(settings: &KubernetesSettings, timings: &ClientTimings) -> Result<Client, FeedError> {
    let mut config = match &settings.kubeconfig {
        Some(path) => {
            let err = |e: Box<dyn std::error::Error + Send + Sync>| FeedError::Kubeconfig {
                path: path.display().to_string(),
                source: e,
            };
            let kc = kube::config::Kubeconfig::read_from(path).map_err(|e| err(Box::new(e)))?;
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .map_err(|e| err(Box::new(e)))?
        }
        None => kube::Config::infer().await?,
    };
    config.read_timeout.get_or_insert(timings.read_timeout);
    build_client(config, timings)
}

/// kube's client stack (`ClientBuilder::try_from`: timeouts, TLS, retries of 429/503/504, the
/// credentials, the configured headers) on a connector with TCP keepalive, which kube's lacks,
/// under [`WatchPacing`]. A proxy in the configuration is left to kube's own stack, which refuses
/// it (this build has none of kube's proxy features) as it always did.
fn build_client(config: kube::Config, timings: &ClientTimings) -> Result<Client, FeedError> {
    use kube::client::ConfigExt;
    if config.proxy_url.is_some() {
        return Ok(kube::client::ClientBuilder::try_from(config)?.with_layer(&WatchPacing::default()).build());
    }
    let mut tcp = hyper_util::client::legacy::connect::HttpConnector::new();
    tcp.enforce_http(false);
    tcp.set_keepalive(Some(timings.keepalive_idle));
    tcp.set_keepalive_interval(Some(timings.keepalive_interval));
    tcp.set_keepalive_retries(Some(timings.keepalive_probes));
    let mut connector = hyper_timeout::TimeoutConnector::new(config.rustls_https_connector_with_connector(tcp)?);
    connector.set_connect_timeout(config.connect_timeout);
    connector.set_read_timeout(config.read_timeout);
    connector.set_write_timeout(config.write_timeout);
    connector.set_reset_reader_on_write(config.reset_reader_on_write);
    let http: hyper_util::client::legacy::Client<_, kube::client::Body> =
        hyper_util::client::legacy::Builder::new(hyper_util::rt::TokioExecutor::new()).build(connector);
    let retry =
        config.default_retry.then(|| tower::retry::RetryLayer::new(kube::client::retry::RetryPolicy::server_retry()));
    let service = tower::ServiceBuilder::new()
        .layer(WatchPacing::default())
        .layer(config.base_uri_layer())
        .option_layer(retry)
        .option_layer(config.auth_layer()?)
        .layer(config.extra_headers_layer()?)
        .map_err(tower::BoxError::from)
        .service(http);
    Ok(kube::client::ClientBuilder::new(service, config.default_namespace).build())
}

/// The shortest time between the starts of two watches of one resource.
const MIN_WATCH_INTERVAL: Duration = Duration::from_secs(1);

/// A client layer that starts the watches of each resource (each request path) at least a second
/// apart (`MIN_WATCH_INTERVAL`). kube's watcher starts a new watch as soon as one ends, and a watch
/// that ends at once with no event (a proxy in front of the API server that cuts streamed answers
/// short) gives it nothing to back off on: it would send thousands of watches a second. client-go
/// treats such a "very short watch" as an error; this is the same bound. A watch ending after minutes
/// (the API server's timeout) is started again at once.
#[derive(Debug, Clone, Default)]
pub struct WatchPacing {
    /// When the last watch of each path started (or is due to).
    started: Arc<std::sync::Mutex<HashMap<String, tokio::time::Instant>>>,
}

impl WatchPacing {
    /// When a watch of `path` asked for now may start: `None` for at once.
    fn start_at(&self, path: &str, now: tokio::time::Instant) -> Option<tokio::time::Instant> {
        let Ok(mut started) = self.started.lock() else { return None };
        let at = started.get(path).map(|last| *last + MIN_WATCH_INTERVAL).filter(|at| *at > now);
        started.insert(path.to_owned(), at.unwrap_or(now));
        at
    }
}

impl<S> tower::Layer<S> for WatchPacing {
    type Service = PacedWatches<S>;
    fn layer(&self, inner: S) -> PacedWatches<S> {
        PacedWatches { inner: Arc::new(tokio::sync::Mutex::new(inner)), pacing: self.clone() }
    }
}

/// The client's service under [`WatchPacing`].
#[derive(Debug)]
pub struct PacedWatches<S> {
    inner: Arc<tokio::sync::Mutex<S>>,
    pacing: WatchPacing,
}

impl<S, B> tower::Service<http::Request<B>> for PacedWatches<S>
where
    S: tower::Service<http::Request<B>> + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = std::pin::Pin<Box<dyn std::future::Future<Output = Result<S::Response, S::Error>> + Send>>;

    /// Always ready: the inner service's readiness is awaited in each call, after any pause.
    fn poll_ready(&mut self, _cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), S::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let is_watch = req.uri().query().is_some_and(|q| q.split('&').any(|kv| kv == "watch=true" || kv == "watch=1"));
        let at = if is_watch { self.pacing.start_at(req.uri().path(), tokio::time::Instant::now()) } else { None };
        let inner = self.inner.clone();
        Box::pin(async move {
            if let Some(at) = at {
                tracing::debug!(path = req.uri().path(), "watch started again within a second: paced");
                tokio::time::sleep_until(at).await;
            }
            let call = {
                let mut inner = inner.lock().await;
                futures::future::poll_fn(|cx| inner.poll_ready(cx)).await?;
                inner.call(req)
            };
            call.await
        })
    }
}

/// Back-off between failed list/watch attempts: exponential with jitter-free doubling, capped.
#[derive(Debug, Clone)]
pub struct ExpBackoff {
    first: Duration,
    max: Duration,
    next: Duration,
}

impl ExpBackoff {
    /// Starts at `first`, doubles per failure, never exceeds `max`; resets after a success.
    pub fn new(first: Duration, max: Duration) -> Self {
        ExpBackoff { first, max, next: first }
    }
}

impl Default for ExpBackoff {
    /// client-go's reflector values: 800 ms doubling to 30 s.
    fn default() -> Self {
        ExpBackoff::new(Duration::from_millis(800), Duration::from_secs(30))
    }
}

impl Iterator for ExpBackoff {
    type Item = Duration;
    fn next(&mut self) -> Option<Duration> {
        let d = self.next;
        self.next = (self.next * 2).min(self.max);
        Some(d)
    }
}

impl Backoff for ExpBackoff {
    fn reset(&mut self) {
        self.next = self.first;
    }
}

/// One kind of object, stored by `namespace/name`, with a buffer for an in-progress re-list.
#[derive(Debug)]
struct Store<K> {
    objects: HashMap<String, K>,
    relist: Option<HashMap<String, K>>,
    listed: bool,
}

impl<K: Resource + Clone> Store<K> {
    fn new() -> Self {
        Store { objects: HashMap::new(), relist: None, listed: false }
    }

    fn key(obj: &K) -> String {
        format!("{}/{}", obj.namespace().unwrap_or_default(), obj.name_any())
    }

    /// Applies one watcher event; true if the visible store changed.
    fn apply(&mut self, event: Event<K>, counters: &FeedCounters) -> bool {
        match event {
            Event::Apply(obj) => {
                self.objects.insert(Self::key(&obj), obj);
                true
            }
            Event::Delete(obj) => self.objects.remove(&Self::key(&obj)).is_some(),
            Event::Init => {
                self.relist = Some(HashMap::new());
                false
            }
            Event::InitApply(obj) => {
                self.relist.get_or_insert_with(HashMap::new).insert(Self::key(&obj), obj);
                false
            }
            Event::InitDone => {
                counters.lists.fetch_add(1, Ordering::Relaxed);
                self.objects = self.relist.take().unwrap_or_default();
                self.listed = true;
                true
            }
        }
    }
}

/// Counters the feed keeps, for logs and `/metrics`.
#[derive(Debug, Default)]
pub struct FeedCounters {
    /// List/watch errors (410 Gone, dropped connections, refused requests); each is followed by a
    /// back-off and a resumed watch or a re-list.
    pub watch_errors: AtomicU64,
    /// Complete (re-)lists applied.
    pub lists: AtomicU64,
    /// Translations sent to the control loop.
    pub translations: AtomicU64,
}

/// The feed: two watchers, a store, a debounced translation.
pub struct Feed {
    client: Client,
    view: watch::Receiver<NodeView>,
    backoff: ExpBackoff,
    watcher_config: watcher::Config,
    counters: Arc<FeedCounters>,
}

impl Feed {
    /// A feed over `client`, reading node settings from `view`.
    pub fn new(client: Client, view: watch::Receiver<NodeView>) -> Self {
        Feed {
            client,
            view,
            backoff: ExpBackoff::default(),
            watcher_config: watcher::Config::default(),
            counters: Arc::default(),
        }
    }

    /// The feed's counters (shared; they keep counting while the feed runs).
    pub fn counters(&self) -> Arc<FeedCounters> {
        self.counters.clone()
    }

    /// Replaces the back-off between failed attempts (tests use milliseconds).
    pub fn with_backoff(mut self, backoff: ExpBackoff) -> Self {
        self.backoff = backoff;
        self
    }

    /// Replaces the watch options (e.g. a shorter server-side watch timeout); their label selector
    /// is replaced by the feed's own ([`Selectors`]).
    pub fn with_watcher_config(mut self, config: watcher::Config) -> Self {
        self.watcher_config = config;
        self
    }

    /// Runs until `tx` is closed, sending a translation after every (debounced) change. Services
    /// and EndpointSlices are listed and watched with kube-proxy's label selectors ([`Selectors`]):
    /// a reload that changes them (`kubernetes.service_proxy_name`) lists both again with the new
    /// ones, and publishes nothing until both lists are in.
    pub async fn run(self, tx: mpsc::Sender<Translation>) {
        // What each Service last translated to without error, kept across such re-lists.
        let mut last_good = super::LastGood::default();
        loop {
            let selectors = Selectors::of(&self.view.borrow().settings);
            let config = |selector: &str| self.watcher_config.clone().labels(selector);
            let services = backing_off(
                watcher(Api::<Service>::all(self.client.clone()), config(&selectors.services)),
                self.backoff.clone(),
            );
            let slices = backing_off(
                watcher(Api::<EndpointSlice>::all(self.client.clone()), config(&selectors.slices)),
                self.backoff.clone(),
            );
            let listed_with = selectors.clone();
            let mut view = self.view.clone();
            let reselected = async move {
                let changed = view.wait_for(|v| Selectors::of(&v.settings) != selectors).await.is_ok();
                // (With the file's reloads over, the selectors stay as they are.)
                if !changed {
                    std::future::pending::<()>().await;
                }
            };
            let feed = run_streams(
                services,
                slices,
                listed_with,
                self.view.clone(),
                tx.clone(),
                self.counters.clone(),
                &mut last_good,
            );
            tokio::select! {
                () = feed => return,
                () = reselected => {
                    tracing::info!("kubernetes.service_proxy_name changed: listing Services and EndpointSlices again");
                }
            }
        }
    }
}

/// `events` with a pause of `backoff`'s next step after each error, before the attempt that follows.
/// The back-off starts over only on progress: a complete list or a watch event. The watcher yields
/// `Init` before every list attempt, so kube's `StreamBackoff`, which starts over on any event, would
/// try a list the API server keeps refusing (RBAC, an overloaded or unreachable server) at the first
/// step forever, from every node at once.
pub(crate) fn backing_off<K>(
    events: impl Stream<Item = watcher::Result<Event<K>>>,
    backoff: ExpBackoff,
) -> impl Stream<Item = watcher::Result<Event<K>>> {
    let state = (Box::pin(events), backoff, None::<Duration>);
    futures::stream::unfold(state, |(mut events, mut backoff, pause)| async move {
        if let Some(pause) = pause {
            tokio::time::sleep(pause).await;
        }
        let item = events.next().await?;
        let pause = match &item {
            Err(_) => backoff.next(),
            Ok(Event::Init | Event::InitApply(_)) => None,
            Ok(Event::InitDone | Event::Apply(_) | Event::Delete(_)) => {
                backoff.reset();
                None
            }
        };
        Some((item, (events, backoff, pause)))
    })
}

/// The feed's loop over any two event streams (the watchers in production), listed and watched
/// with `selectors`: once the view's differ, it publishes nothing (its caller lists again).
async fn run_streams(
    services: impl Stream<Item = watcher::Result<Event<Service>>>,
    slices: impl Stream<Item = watcher::Result<Event<EndpointSlice>>>,
    selectors: Selectors,
    mut view: watch::Receiver<NodeView>,
    tx: mpsc::Sender<Translation>,
    counters: Arc<FeedCounters>,
    last_good: &mut super::LastGood,
) {
    let mut services = pin!(services);
    let mut slices = pin!(slices);
    let mut svc_store = Store::<Service>::new();
    let mut eps_store = Store::<EndpointSlice>::new();
    let mut due: Option<tokio::time::Instant> = None;
    let mut view_open = true;
    loop {
        let dirty = tokio::select! {
            ev = services.next() => match ev {
                Some(Ok(e)) => svc_store.apply(e, &counters),
                Some(Err(e)) => { counters.watch_errors.fetch_add(1, Ordering::Relaxed); tracing::warn!(error = %e, "services watch failed; backing off and resuming"); false }
                None => return,
            },
            ev = slices.next() => match ev {
                Some(Ok(e)) => eps_store.apply(e, &counters),
                Some(Err(e)) => { counters.watch_errors.fetch_add(1, Ordering::Relaxed); tracing::warn!(error = %e, "endpointslices watch failed; backing off and resuming"); false }
                None => return,
            },
            changed = view.changed(), if view_open => { view_open = changed.is_ok(); view_open }
            () = async { match due { Some(d) => tokio::time::sleep_until(d).await, None => std::future::pending().await } } => {
                due = None;
                let v = view.borrow_and_update().clone();
                // Stores listed with other selectors than the view's hold other objects than the
                // view's selectors select (translated with them, Services listed for having no
                // proxy name label would all be left out): [`Feed::run`] lists both again.
                if Selectors::of(&v.settings) != selectors {
                    tracing::debug!("label selectors changed: nothing published until both are listed again");
                    continue;
                }
                let t = super::translate_keeping(
                    svc_store.objects.values(),
                    eps_store.objects.values(),
                    &v.settings,
                    &v.node,
                    last_good,
                );
                counters.translations.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(services = t.services.len(), skipped = t.skipped.len(), "kubernetes translation");
                if tx.send(t).await.is_err() {
                    return;
                }
                false
            }
            () = tx.closed() => return,
        };
        // Debounce: the first change after a publish sets the deadline; later ones ride along, so a
        // steady churn still publishes once per `debounce`.
        if dirty && due.is_none() && svc_store.listed && eps_store.listed {
            due = Some(debounce_deadline(tokio::time::Instant::now(), view.borrow().settings.debounce));
        }
    }
}

/// When a translation is due: `debounce` after `now`, capped at the file's limit. The file rejects a
/// longer one; the cap keeps a view built another way from panicking the feed (an `Instant` past the
/// clock's end), which would silently stop every later cluster update.
fn debounce_deadline(now: tokio::time::Instant, debounce: Duration) -> tokio::time::Instant {
    let debounce = debounce.min(crate::config::file::MAX_DEBOUNCE);
    now.checked_add(debounce).unwrap_or(now)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_overlong_debounce_is_capped_not_a_panic() {
        let now = tokio::time::Instant::now();
        assert_eq!(debounce_deadline(now, Duration::MAX), now + crate::config::file::MAX_DEBOUNCE);
        assert_eq!(debounce_deadline(now, Duration::from_millis(200)), now + Duration::from_millis(200));
    }

    /// Watches of one path start a second apart, those asked for together one after the other; another
    /// path is paced on its own, and a watch asked for a second or more after the last starts at once.
    #[test]
    fn watches_of_a_path_start_a_second_apart() {
        let pacing = WatchPacing::default();
        let t0 = tokio::time::Instant::now();
        let services = "/api/v1/services";
        assert_eq!(pacing.start_at(services, t0), None);
        assert_eq!(pacing.start_at(services, t0 + Duration::from_millis(10)), Some(t0 + MIN_WATCH_INTERVAL));
        assert_eq!(pacing.start_at(services, t0 + Duration::from_millis(20)), Some(t0 + 2 * MIN_WATCH_INTERVAL));
        assert_eq!(pacing.start_at("/apis/discovery.k8s.io/v1/endpointslices", t0), None);
        let later = t0 + 5 * MIN_WATCH_INTERVAL;
        assert_eq!(pacing.start_at(services, later), None);
        assert_eq!(pacing.start_at(services, later + MIN_WATCH_INTERVAL), None);
    }

    fn fixture<T: serde::de::DeserializeOwned>(name: &str) -> T {
        let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    }

    /// web's slice with `n` ready endpoints 10.244.9.1.. on node-a.
    fn web_slice(n: u8) -> EndpointSlice {
        let mut slice: EndpointSlice = fixture("endpointslice-web-ipv4.json");
        let mut endpoint = slice.endpoints[0].clone();
        slice.endpoints = (1..=n)
            .map(|i| {
                endpoint.addresses = vec![format!("10.244.9.{i}")];
                endpoint.clone()
            })
            .collect();
        slice
    }

    async fn recv(rx: &mut mpsc::Receiver<Translation>) -> Translation {
        tokio::time::timeout(Duration::from_secs(30), rx.recv()).await.expect("a translation").unwrap()
    }

    fn web_backends(t: &Translation) -> Option<usize> {
        t.services.iter().find(|s| s.config.key.to_string() == "tcp 10.96.12.34:80").map(|s| s.config.backends.len())
    }

    /// What [`web_feed`] sets up for a feed's test: the two event streams (listed: the web Service
    /// with a cluster IP, its slice of one endpoint) with their senders, node-a's view, and the
    /// translations' channel.
    struct WebFeed {
        svc_tx: futures::channel::mpsc::UnboundedSender<watcher::Result<Event<Service>>>,
        svc_rx: futures::channel::mpsc::UnboundedReceiver<watcher::Result<Event<Service>>>,
        eps_tx: futures::channel::mpsc::UnboundedSender<watcher::Result<Event<EndpointSlice>>>,
        eps_rx: futures::channel::mpsc::UnboundedReceiver<watcher::Result<Event<EndpointSlice>>>,
        _view_tx: watch::Sender<NodeView>,
        view: watch::Receiver<NodeView>,
        tx: mpsc::Sender<Translation>,
        rx: mpsc::Receiver<Translation>,
    }

    /// A feed's streams with both lists sent (the web Service, its slice of one endpoint), on
    /// node-a's settings with `debounce`.
    fn web_feed(debounce: Duration) -> WebFeed {
        let mut web: Service = fixture("service-web.json");
        if let Some(spec) = web.spec.as_mut() {
            spec.cluster_ips = Some(vec!["10.96.12.34".into()]);
        }
        let (svc_tx, svc_rx) = futures::channel::mpsc::unbounded::<watcher::Result<Event<Service>>>();
        let (eps_tx, eps_rx) = futures::channel::mpsc::unbounded::<watcher::Result<Event<EndpointSlice>>>();
        let settings = KubernetesSettings {
            node_name: Some("node-a".into()),
            node_addresses: vec!["192.168.1.10".parse().unwrap()],
            debounce,
            ..Default::default()
        };
        let node = NodeConfig { snat_v4: Some("192.168.1.10".parse().unwrap()), ..Default::default() };
        let (_view_tx, view) = watch::channel(NodeView { settings, node });
        let (tx, rx) = mpsc::channel(16);
        for e in [Event::Init, Event::InitApply(web), Event::InitDone] {
            svc_tx.unbounded_send(Ok(e)).unwrap();
        }
        for e in [Event::Init, Event::InitApply(web_slice(1)), Event::InitDone] {
            eps_tx.unbounded_send(Ok(e)).unwrap();
        }
        WebFeed { svc_tx, svc_rx, eps_tx, eps_rx, _view_tx, view, tx, rx }
    }

    /// A burst of changes inside one debounce (the lists' and those that follow) is one translation, of the burst's last state; a
    /// change after it, with nothing following, is published too (its own deadline, no later event).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_burst_is_one_translation_of_its_last_state_and_a_lone_change_is_published() {
        // Far longer than the burst (ten changes sent back to back).
        // (The senders are held: a stream that ends stops the feed.)
        let WebFeed { svc_tx: _svc_tx, svc_rx, eps_rx, eps_tx, _view_tx, view, tx, mut rx } =
            web_feed(Duration::from_secs(1));
        let counters = Arc::new(FeedCounters::default());

        // The lists are in; then a burst of slice changes (2 to 10 endpoints), each sent after a
        // yield so the feed may read it as it comes (no sleep: the burst's timing must not decide the test).
        let feed_counters = counters.clone();
        let feed = tokio::spawn(async move {
            let selectors = Selectors::of(&view.borrow().settings);
            run_streams(svc_rx, eps_rx, selectors, view, tx, feed_counters, &mut crate::k8s::LastGood::default()).await;
        });
        for n in 2..=10 {
            tokio::task::yield_now().await;
            eps_tx.unbounded_send(Ok(Event::Apply(web_slice(n)))).unwrap();
        }
        let first = recv(&mut rx).await;
        assert_eq!(web_backends(&first), Some(10), "the burst's last state");
        assert_eq!(counters.translations.load(Ordering::Relaxed), 1, "one translation for the burst");

        // One more change, and nothing after it: published at its own deadline.
        eps_tx.unbounded_send(Ok(Event::Apply(web_slice(3)))).unwrap();
        let second = recv(&mut rx).await;
        assert_eq!(web_backends(&second), Some(3));
        assert_eq!(counters.translations.load(Ordering::Relaxed), 2);

        drop(rx);
        tokio::time::timeout(Duration::from_secs(30), feed).await.expect("the feed stops with its receiver").unwrap();
    }

    /// A reload that changes the label selectors (`kubernetes.service_proxy_name`) while a
    /// translation is due publishes nothing from the stores listed with the old ones: filtered by
    /// the new selectors, a Service listed for having no proxy name label is not one labelled with
    /// the new name, and every Service would leave the tables until the new lists are in.
    #[tokio::test(start_paused = true)]
    async fn stores_listed_with_the_old_selectors_publish_nothing_after_a_selector_change() {
        let WebFeed { svc_tx: _svc_tx, svc_rx, eps_rx, eps_tx, _view_tx: view_tx, view, tx, mut rx } =
            web_feed(Duration::from_millis(200));
        let selectors = Selectors::of(&view.borrow().settings);
        let feed = tokio::spawn(async move {
            let counters = Arc::new(FeedCounters::default());
            let mut last_good = crate::k8s::LastGood::default();
            run_streams(svc_rx, eps_rx, selectors, view, tx, counters, &mut last_good).await;
        });
        assert_eq!(web_backends(&recv(&mut rx).await), Some(1));

        // A change, then the reload, before the change's translation is due.
        eps_tx.unbounded_send(Ok(Event::Apply(web_slice(2)))).unwrap();
        view_tx.send_modify(|v| v.settings.service_proxy_name = Some("lb".into()));
        let published = tokio::time::timeout(Duration::from_secs(120), rx.recv()).await;
        assert!(published.is_err(), "published from the old lists: {published:?}");
        feed.abort();
    }
}
