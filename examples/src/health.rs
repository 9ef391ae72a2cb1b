//! Health checks of backends, on the control side (tokio), never on the fast path.
//!
//! One task per distinct *probe* (a probe address: the backend's address at the check's `port`, or
//! its own port; and the check) probes at the check's interval, first at a phase drawn from the
//! probe so that probes started together do not all connect at once: a TCP connect, or an HTTP/1.1
//! GET that must answer 2xx or 3xx, each bounded by the timeout. `fall` consecutive failures take a
//! healthy backend down, `rise` consecutive successes bring it back (as HAProxy and keepalived do);
//! every transition is logged and counted and sent as a [`HealthEvent`] to the control loop, which
//! applies [`apply_health`]: a down backend becomes Draining (no new flows, established flows stay)
//! or is removed (established flows then follow the service's `on_backend_removed`), per the check's
//! `on_failure`.
//!
//! A probe decides every [`Target`] (service, backend) that comes to it: a Kubernetes Service port
//! is one service per address it is reached on (its cluster IP, each node address of a NodePort,
//! its load balancer IPs), all with the same backends and check, and a file may list one backend
//! under several services with the same check. Each endpoint is then probed once per interval, not
//! once per address, and its targets are always up or down together: a transient failure cannot
//! take a backend out through a NodePort while its cluster IP still sends to it (and services
//! whose backends agree can share one Maglev table in lb-core). The probe sends one event per
//! target on each transition. Its `on_failure` is not part of a probe: it is what the control loop
//! does with the verdict. The rules as targets come and go:
//! - a target that joins a probe already running takes the probe's current verdict, so the
//!   services agree at once ([`HealthChecker::restarting`] tells the caller before it builds; if
//!   the caller applied another, the probe sends the target an event with its verdict);
//! - a target that leaves (its service or backend gone, or its check changed) leaves its probe,
//!   which goes on for the others and stops with the last;
//! - a target whose check changed joins the probe of its new check, running or new;
//! - a probe that starts is up, unless one of its targets is known down (see the last paragraph).
//!
//! Each time a target joins a probe it gets a new generation ([`HealthChecker::generation`]), so
//! the events a probe it left had queued for it are stale ([`HealthChecker::is_current`]), even if
//! it comes back to that probe later.
//!
//! Counters are per target, for `/metrics` (`lb_health_check_failures_total{service,backend}`):
//! every run of a shared probe counts as a probe (and a failure) of each target it decides at the
//! time, so each target's series reads as if it were probed alone, and a sum over services counts
//! one connection once per service. A transition counts for each target; a target that moves to a
//! probe of another verdict counts that change too, one that joins for the first time none.
//!
//! A down backend of a UDP service is removed under either policy. A UDP flow has no end but the
//! UDP timeout, which a client sending from one port more often than that (a DNS forwarder, NTP,
//! syslog, QUIC) never lets run out: drained, its flow would stay on the dead backend for as long as
//! it sends. Removed, its next datagram follows `on_backend_removed` (`reschedule`: another backend;
//! `drop`: dropped until the UDP timeout after the first, then a new flow), as kube-proxy clears the
//! UDP conntrack entries of endpoints that stop serving. A flow that moved stays where it went when
//! the backend passes again (it comes back as a new backend to lb-core); one that sent nothing while
//! it was down meets its backend's removal at its next datagram, as after any removal and return.
//! TCP services keep `drain` as written: a connection is closed by its ends, and a backend that
//! fails its check may still be finishing the ones it has.
//!
//! A service whose every backend that would take new flows is down *fails open*: the checks are
//! set aside and all of them take new flows, as AWS ALB / NLB and Envoy's panic mode do. A check
//! failing everywhere is more often the checker's own problem (a partition between the load balancer
//! and the backends, a wrong path or port) than every backend being down, and dropping every new
//! flow would turn that into a full outage. The control loop logs each service entering and
//! leaving that state and exports it as `lb_health_fail_open`.
//!
//! Backends start *up*: a restart of the load balancer must not take every backend out of service
//! for `fall` intervals. [`HealthChecker::sync`] starts and stops probe tasks as services change; a
//! probe started because a backend's check changed goes on from its backend's health (a down
//! backend needs `rise` successes of the new check), so a reload does not send new flows to a
//! backend known to be down.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lb_core::config::{BackendState, Protocol, ServiceKey};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinHandle;

use crate::config::{FailurePolicy, HealthCheck, Probe, ServiceSpec};

/// Identifies one probed backend: the service and the backend's own address and port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Target {
    /// The service.
    pub service: ServiceKey,
    /// The backend (its service address, not the probe port).
    pub backend: SocketAddr,
}

/// A backend changed health.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HealthEvent {
    /// Which backend.
    pub target: Target,
    /// Its new health.
    pub healthy: bool,
    /// The target's generation in the probe that saw it ([`HealthChecker::generation`]): an event
    /// from a probe the target has since left is stale ([`HealthChecker::is_current`]).
    pub generation: u64,
}

/// What the checker knows about one backend, for `/metrics` and `lb list`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TargetStatus {
    /// Current health.
    pub healthy: bool,
    /// Probes run (of a probe shared with other targets, each counts for all of them).
    pub probes: u64,
    /// Probes failed (the same).
    pub failures: u64,
    /// Up -> down transitions.
    pub went_down: u64,
    /// Down -> up transitions.
    pub went_up: u64,
    /// The last failure, for logs and `lb list`.
    pub last_error: Option<String>,
    /// The target's generation in the probe that writes this entry ([`HealthChecker::generation`]).
    /// A probe writes only the entries of its own targets' generations: one the target has left
    /// (its check changed) must not write its last result into the entry of the probe it joined.
    pub generation: u64,
}

/// Shared table of every probed backend's status.
pub type StatusTable = Arc<Mutex<HashMap<Target, TargetStatus>>>;

/// Runs one probe of `addr` under `check.timeout`; the error says what failed.
pub async fn probe(check: &HealthCheck, addr: SocketAddr) -> Result<(), String> {
    match tokio::time::timeout(check.timeout, probe_inner(&check.probe, addr)).await {
        Ok(r) => r,
        Err(_) => Err(format!("timed out after {:?}", check.timeout)),
    }
}

async fn probe_inner(probe: &Probe, addr: SocketAddr) -> Result<(), String> {
    let mut conn = TcpStream::connect(addr).await.map_err(|e| format!("connect: {e}"))?;
    let Probe::Http { path } = probe else { return Ok(()) };
    let host = match addr {
        SocketAddr::V4(a) => a.to_string(),
        SocketAddr::V6(a) => format!("[{}]:{}", a.ip(), a.port()),
    };
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: lb-health-check\r\nAccept: */*\r\nConnection: close\r\n\r\n"
    );
    conn.write_all(req.as_bytes()).await.map_err(|e| format!("send: {e}"))?;
    // Only the status line matters; read until its end (bounded).
    let mut buf = Vec::with_capacity(128);
    let mut chunk = [0u8; 128];
    while !buf.contains(&b'\n') {
        let n = conn.read(&mut chunk).await.map_err(|e| format!("receive: {e}"))?;
        if n == 0 || buf.len() > 1024 {
            return Err("no HTTP status line".into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let line = String::from_utf8_lossy(&buf);
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .filter(|_| line.starts_with("HTTP/1."))
        .ok_or_else(|| format!("bad status line {:?}", line.lines().next().unwrap_or_default()))?;
    if (200..400).contains(&status) { Ok(()) } else { Err(format!("HTTP status {status}")) }
}

/// What one probe task probes: a probe address (the backend's address, at the check's `port` or
/// the backend's own) under one check. Every [`Target`] that comes to the same key shares the task.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct ProbeKey {
    addr: SocketAddr,
    /// The check, with its `port` folded into `addr` and its `on_failure` left out: what the
    /// control loop does with a down backend does not change what the probe finds.
    check: HealthCheck,
}

impl ProbeKey {
    fn of(backend: SocketAddr, check: &HealthCheck) -> Self {
        let addr = SocketAddr::new(backend.ip(), check.port.unwrap_or(backend.port()));
        ProbeKey { addr, check: HealthCheck { port: None, on_failure: FailurePolicy::Drain, ..check.clone() } }
    }

    /// How long after its start the probe first fires (then every interval): a whole millisecond
    /// of `[0, min(interval, MAX_PHASE))` drawn from a hash of the key, so that probes started
    /// together (every one at a start, many at a reload) do not all connect in the same instant of
    /// every interval, as HAProxy's `spread-checks` and Envoy's `initial_jitter` spread theirs. The
    /// same key gets the same phase, in every run of the same build.
    fn phase(&self) -> Duration {
        // Whole milliseconds: tokio's timers have no finer resolution.
        let span = u64::try_from(self.check.interval.min(MAX_PHASE).as_millis()).unwrap_or(u64::MAX);
        let mut h = std::hash::DefaultHasher::new();
        self.hash(&mut h);
        Duration::from_millis(h.finish().checked_rem(span).unwrap_or(0))
    }
}

/// The most a probe's first run waits for its phase ([`ProbeKey::phase`]). Spread over the whole
/// interval, a check of a long interval (up to an hour) would leave a backend that is down when it
/// is added, or when the load balancer starts (backends start up), serving new flows for up to that
/// long before its first probe; spread over a few seconds, starts and reloads already come as a
/// trickle of connects rather than a burst, and a probe's first verdict comes within
/// `fall` intervals plus a few seconds.
const MAX_PHASE: Duration = Duration::from_secs(5);

/// One probe's verdict and the targets it decides, shared by the checker and the probe's task.
#[derive(Debug)]
struct Verdict {
    healthy: bool,
    /// Per target: the generation of its place in this probe ([`HealthChecker::generation`]), and
    /// the health last reported for it (sent as an event, or the caller's own at
    /// [`HealthChecker::sync`]). The task sends an event to each whose reported health is not the
    /// verdict: every one after a transition, and one that joined holding another.
    members: HashMap<Target, Member>,
}

#[derive(Debug, Clone, Copy)]
struct Member {
    generation: u64,
    reported: bool,
}

/// A running probe.
struct ProbeTask {
    verdict: Arc<Mutex<Verdict>>,
    /// Wakes the task to report to a target that joined holding another health than its verdict.
    wake: Arc<Notify>,
    task: JoinHandle<()>,
}

/// Starts and stops probe tasks as the set of checked backends changes.
pub struct HealthChecker {
    events: mpsc::Sender<HealthEvent>,
    status: StatusTable,
    /// One per distinct probe address and check.
    probes: HashMap<ProbeKey, ProbeTask>,
    /// Per probed backend: its probe, and its generation there.
    targets: HashMap<Target, (ProbeKey, u64)>,
    /// The generation the next target to join a probe gets (never reused).
    next_generation: u64,
}

impl HealthChecker {
    /// A checker sending transitions to `events`.
    pub fn new(events: mpsc::Sender<HealthEvent>) -> Self {
        HealthChecker {
            events,
            status: StatusTable::default(),
            probes: HashMap::new(),
            targets: HashMap::new(),
            next_generation: 1,
        }
    }

    /// The shared status table.
    pub fn status(&self) -> StatusTable {
        self.status.clone()
    }

    /// The backends currently down.
    pub fn down(&self) -> HashSet<Target> {
        lock(&self.status).iter().filter(|(_, s)| !s.healthy).map(|(t, _)| *t).collect()
    }

    /// The generation of `target`'s place in its probe, if it is probed: new each time it joins
    /// one (it is probed for the first time, or its check changed).
    pub fn generation(&self, target: &Target) -> Option<u64> {
        self.targets.get(target).map(|(_, g)| *g)
    }

    /// Whether `event` comes from the probe deciding its target now. One from a probe the target
    /// has since left may still be queued; applied, it would mark a backend down that its probe
    /// now calls up and will report nothing more about until it changes.
    pub fn is_current(&self, event: &HealthEvent) -> bool {
        self.generation(&event.target) == Some(event.generation)
    }

    /// The backends of `services` that [`sync`](Self::sync) would put in another probe than now
    /// (new ones, ones whose check changed), with the health they start from there: a running
    /// probe's verdict, or for a probe that starts, down if this checker's table holds any of its
    /// backends down (the last verdict of the probe one leaves), else up. The caller
    /// applies these before building, so that its tables agree with the probes from the start; the
    /// old probe's last transition may still be queued for it, and is stale once the target moves.
    pub fn restarting(&self, services: &[ServiceSpec]) -> Vec<(Target, bool)> {
        let wanted = wanted(services);
        let table = lock(&self.status);
        let mut starting: HashMap<&ProbeKey, bool> = HashMap::new();
        for (target, key) in wanted.iter().filter(|(_, key)| !self.probes.contains_key(*key)) {
            *starting.entry(key).or_insert(true) &= table.get(target).is_none_or(|s| s.healthy);
        }
        drop(table);
        wanted
            .iter()
            .filter(|(target, key)| self.targets.get(*target).map(|(k, _)| k) != Some(*key))
            .map(|(target, key)| {
                let healthy = match self.probes.get(key) {
                    Some(p) => lock_verdict(&p.verdict).healthy,
                    None => starting.get(key).copied().unwrap_or(true),
                };
                (*target, healthy)
            })
            .collect()
    }

    /// Probes exactly the backends of `services` that have a health check, one probe per distinct
    /// probe address and check: targets that left it leave their probe (and are forgotten if gone),
    /// a probe left with none stops; a probe that starts is up unless `down` (the health the
    /// caller applies) names one of its targets; a target joining a probe gets a new generation
    /// and the probe's verdict, its counters kept, and if `down` gave it another health the probe
    /// reports the verdict to it. Must run inside tokio.
    pub fn sync(&mut self, services: &[ServiceSpec], down: &HashSet<Target>) {
        let wanted = wanted(services);
        let leaving: Vec<Target> =
            self.targets.iter().filter(|(t, (key, _))| wanted.get(*t) != Some(key)).map(|(t, _)| *t).collect();
        for target in leaving {
            let Some((key, _)) = self.targets.remove(&target) else { continue };
            if let Some(p) = self.probes.get(&key) {
                lock_verdict(&p.verdict).members.remove(&target);
            }
            // One still wanted joins another probe below, with this entry's counters.
            if !wanted.contains_key(&target) {
                lock(&self.status).remove(&target);
            }
        }
        let wanted_keys: HashSet<&ProbeKey> = wanted.values().collect();
        self.probes.retain(|key, p| {
            let keep = wanted_keys.contains(key);
            if !keep {
                p.task.abort();
            }
            keep
        });
        for key in wanted_keys {
            if self.probes.contains_key(key) {
                continue;
            }
            let healthy = !wanted.iter().any(|(t, k)| k == key && down.contains(t));
            let verdict = Arc::new(Mutex::new(Verdict { healthy, members: HashMap::new() }));
            let wake = Arc::new(Notify::new());
            let run = run_probe(key.clone(), verdict.clone(), wake.clone(), self.status.clone(), self.events.clone());
            self.probes.insert(key.clone(), ProbeTask { verdict, wake, task: tokio::spawn(run) });
        }
        for (target, key) in wanted {
            if self.targets.contains_key(&target) {
                continue;
            }
            let generation = self.next_generation;
            self.next_generation += 1;
            let p = &self.probes[&key];
            let reported = !down.contains(&target);
            let mut verdict = lock_verdict(&p.verdict);
            let healthy = verdict.healthy;
            verdict.members.insert(target, Member { generation, reported });
            // The counters go on across a move: they are Prometheus counters, which a reload must
            // not send back to zero. A target that moves to a probe of another verdict changed
            // health.
            let mut table = lock(&self.status);
            let mut before = table.remove(&target);
            if let Some(b) = before.as_mut().filter(|b| b.healthy != healthy) {
                if healthy {
                    b.went_up += 1;
                } else {
                    b.went_down += 1;
                }
            }
            table.insert(target, TargetStatus { healthy, generation, ..before.unwrap_or_default() });
            drop((table, verdict));
            if reported != healthy {
                p.wake.notify_one();
            }
            self.targets.insert(target, (key, generation));
        }
    }
    /// Makes `target`'s probe find its backend `healthy`, as its task does on a transition: the
    /// table entries of the probe's targets, then the events it would send them (returned, not
    /// sent).
    #[cfg(test)]
    pub(crate) fn found(&self, target: &Target, healthy: bool) -> Vec<HealthEvent> {
        let Some((key, _)) = self.targets.get(target) else { return Vec::new() };
        let mut verdict = lock_verdict(&self.probes[key].verdict);
        verdict.healthy = healthy;
        let mut table = lock(&self.status);
        let mut events = Vec::new();
        for (t, m) in &mut verdict.members {
            let Some(s) = table.get_mut(t).filter(|s| s.healthy != healthy) else { continue };
            s.healthy = healthy;
            if healthy {
                s.went_up += 1;
            } else {
                s.went_down += 1;
            }
            m.reported = healthy;
            events.push(HealthEvent { target: *t, healthy, generation: m.generation });
        }
        events
    }
}

/// Every checked backend of `services` with its probe.
fn wanted(services: &[ServiceSpec]) -> HashMap<Target, ProbeKey> {
    let mut wanted = HashMap::new();
    for s in services {
        let Some(check) = &s.health_check else { continue };
        for b in &s.config.backends {
            let backend = SocketAddr::new(b.addr, b.port);
            wanted.insert(Target { service: s.config.key, backend }, ProbeKey::of(backend, check));
        }
    }
    wanted
}

impl Drop for HealthChecker {
    fn drop(&mut self) {
        for p in self.probes.values() {
            p.task.abort();
        }
    }
}

fn lock(t: &StatusTable) -> std::sync::MutexGuard<'_, HashMap<Target, TargetStatus>> {
    // A panicking probe task cannot leave the table half-written (each update is one assignment).
    t.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Locked before the status table wherever both are.
fn lock_verdict(v: &Mutex<Verdict>) -> std::sync::MutexGuard<'_, Verdict> {
    v.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

async fn run_probe(
    key: ProbeKey,
    verdict: Arc<Mutex<Verdict>>,
    wake: Arc<Notify>,
    status: StatusTable,
    events: mpsc::Sender<HealthEvent>,
) {
    let first = tokio::time::Instant::now() + key.phase();
    let ProbeKey { addr, check } = key;
    let mut tick = tokio::time::interval_at(first, check.interval.max(Duration::from_millis(1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut streak = 0u32;
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let result = probe(&check, addr).await;
                let mut v = lock_verdict(&verdict);
                // Count consecutive results against the verdict: failures while up, successes while
                // down.
                if result.is_ok() == v.healthy {
                    streak = 0;
                } else {
                    streak += 1;
                }
                let flip = streak >= if v.healthy { check.fall } else { check.rise };
                if flip {
                    v.healthy = !v.healthy;
                    streak = 0;
                }
                let mut table = lock(&status);
                for (target, m) in &v.members {
                    // An entry of another generation belongs to a probe the target joined since.
                    let Some(s) = table.get_mut(target).filter(|s| s.generation == m.generation) else { continue };
                    s.probes += 1;
                    if let Err(e) = &result {
                        s.failures += 1;
                        s.last_error = Some(e.clone());
                    }
                    if flip {
                        s.healthy = v.healthy;
                        if v.healthy {
                            s.went_up += 1;
                        } else {
                            s.went_down += 1;
                        }
                    }
                }
                drop(table);
                if flip {
                    let mut targets: Vec<String> =
                        v.members.keys().map(|t| format!("{} {}", t.service, t.backend)).collect();
                    targets.sort_unstable();
                    let targets = targets.join(", ");
                    if v.healthy {
                        tracing::info!(probe = %addr, %targets, "backend recovered: {} successful probes", check.rise);
                    } else {
                        let error = result.as_ref().err().map(String::as_str).unwrap_or("");
                        tracing::warn!(probe = %addr, %targets, error, "backend failed: {} failed probes", check.fall);
                    }
                }
            }
            () = wake.notified() => {}
        }
        // Every target whose reported health is not the verdict hears it, from this one task, so
        // a target's events arrive in the order its probe saw them.
        let pending: Vec<HealthEvent> = {
            let mut v = lock_verdict(&verdict);
            let healthy = v.healthy;
            v.members
                .iter_mut()
                .filter(|(_, m)| m.reported != healthy)
                .map(|(target, m)| {
                    m.reported = healthy;
                    HealthEvent { target: *target, healthy, generation: m.generation }
                })
                .collect()
        };
        for e in pending {
            if events.send(e).await.is_err() {
                return;
            }
        }
    }
}

/// Applies health to desired services: a down backend of a checked service becomes Draining or is
/// removed, per its check's [`FailurePolicy`] (a UDP service's is removed under either), unless
/// every backend of the service that would take new flows (active, weight above 0) is down: then
/// the service fails open, served as if no check ran (see the module docs). Returns the services
/// failing open.
pub fn apply_health(services: &mut [ServiceSpec], down: &HashSet<Target>) -> BTreeSet<ServiceKey> {
    let mut fail_open = BTreeSet::new();
    if down.is_empty() {
        return fail_open;
    }
    for s in services {
        let Some(check) = &s.health_check else { continue };
        let key = s.config.key;
        let is_down = |b: &lb_core::config::BackendConfig| {
            down.contains(&Target { service: key, backend: SocketAddr::new(b.addr, b.port) })
        };
        let serving = || s.config.backends.iter().filter(|b| b.takes_new_flows());
        if serving().next().is_some() && serving().all(is_down) {
            fail_open.insert(key);
            continue;
        }
        match check.on_failure {
            FailurePolicy::Drain if key.proto == Protocol::Tcp => {
                for b in &mut s.config.backends {
                    if is_down(b) {
                        b.state = BackendState::Draining;
                    }
                }
            }
            // A UDP flow ends only when its client stops sending for the UDP timeout: drained, a
            // client sending from one port more often (DNS, NTP, syslog, QUIC) would stay on the
            // dead backend for good. Removed, as kube-proxy clears the UDP conntrack entries of
            // endpoints that stop serving, its flows follow `on_backend_removed`.
            FailurePolicy::Drain | FailurePolicy::Remove => s.config.backends.retain(|b| !is_down(b)),
        }
    }
    fail_open
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::atomic::{AtomicU16, Ordering};

    use lb_core::config::{BackendConfig, ForwardMode, SchedulerKind, ServiceConfig};
    use tokio::net::TcpListener;

    use super::*;

    fn check(probe: Probe) -> HealthCheck {
        HealthCheck {
            probe,
            port: None,
            interval: Duration::from_millis(5),
            timeout: Duration::from_secs(2),
            rise: 2,
            fall: 2,
            on_failure: FailurePolicy::Drain,
        }
    }

    fn service(backend: SocketAddr, hc: HealthCheck) -> ServiceSpec {
        ServiceSpec {
            config: ServiceConfig {
                name: "t".into(),
                key: ServiceKey { vip: "10.0.0.1".parse().unwrap(), port: 80, proto: Protocol::Tcp },
                backends: vec![BackendConfig {
                    addr: backend.ip(),
                    port: backend.port(),
                    weight: 1,
                    mac: None,
                    state: BackendState::Active,
                }],
                scheduler: SchedulerKind::Maglev,
                mode: ForwardMode::Nat,
                affinity_timeout: None,
                source_ranges: vec![],
                maglev_table_size: None,
                on_backend_removed: Default::default(),
                answer_neighbours: true,
            },
            health_check: Some(hc),
        }
    }

    async fn next(rx: &mut mpsc::Receiver<HealthEvent>) -> HealthEvent {
        tokio::time::timeout(Duration::from_secs(30), rx.recv()).await.expect("no health event").expect("closed")
    }

    /// Runs `test` on paused time that moves only by `tokio::time::advance`: a blocking task, alive
    /// until `test` is done, keeps the runtime from moving the clock on by itself (tokio holds
    /// auto-advance while one runs), and fails the test after 30 s of real time. Auto-advance
    /// moves the clock to the next timer whenever the runtime finds no socket ready at a glance:
    /// while the kernel had not yet completed a probe's real connection (a loaded machine, a
    /// deferred softirq), a probe's timeout, another probe's phase or the test's own timeout passed.
    async fn on_held_clock<T>(test: impl std::future::Future<Output = T>) -> T {
        let (done, wait) = std::sync::mpsc::channel::<()>();
        let failsafe = tokio::task::spawn_blocking(move || wait.recv_timeout(Duration::from_secs(30)));
        tokio::select! {
            out = test => {
                drop(done);
                out
            }
            _ = failsafe => panic!("not done within 30 s of real time"),
        }
    }

    /// `s` at another address (a Service's NodePort beside its cluster IP, say).
    fn on_vip(mut s: ServiceSpec, vip: &str) -> ServiceSpec {
        s.config.key.vip = vip.parse().unwrap();
        s
    }

    fn target(s: &ServiceSpec) -> Target {
        let b = &s.config.backends[0];
        Target { service: s.config.key, backend: SocketAddr::new(b.addr, b.port) }
    }

    /// A probe writes only the status entries of its targets' own generations: one its target has
    /// since taken to another probe is left alone.
    #[tokio::test]
    async fn a_probe_leaves_the_entry_of_a_target_that_moved_alone() {
        // A port with no listener: every probe fails at once, and fall 1 flips at the first.
        let addr = crate::lab::unused_loopback();
        let target = target(&service(addr, check(Probe::Tcp)));
        let status = StatusTable::default();
        let fresh = TargetStatus { healthy: true, generation: 2, ..Default::default() };
        lock(&status).insert(target, fresh.clone());
        let (tx, mut rx) = mpsc::channel(8);
        let members = HashMap::from([(target, Member { generation: 1, reported: true })]);
        let verdict = Arc::new(Mutex::new(Verdict { healthy: true, members }));
        let key = ProbeKey::of(addr, &HealthCheck { fall: 1, ..check(Probe::Tcp) });
        let task = tokio::spawn(run_probe(key, verdict, Arc::new(Notify::new()), status.clone(), tx));
        // The event (stale for the caller) follows the probe's table update.
        assert_eq!(next(&mut rx).await, HealthEvent { target, healthy: false, generation: 1 });
        task.abort();
        assert_eq!(lock(&status)[&target], fresh, "the other probe's entry is untouched");
    }

    /// Two services with the same backend and check (a Service's cluster IP and its NodePort, say)
    /// share one probe: one connection per interval, not one per service, and each hears the
    /// probe's transitions.
    #[tokio::test(start_paused = true)]
    async fn services_with_the_same_backend_and_check_are_probed_once() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        // Probed once an hour: the first probe at its phase (time is paused, and moved past every
        // phase at once), the next long after the test. Both start down with rise 1, so that first
        // probe is a transition each service hears.
        let hourly = HealthCheck { interval: Duration::from_secs(3600), rise: 1, ..check(Probe::Tcp) };
        let services = [service(addr, hourly.clone()), on_vip(service(addr, hourly), "10.0.0.2")];
        let targets = [target(&services[0]), target(&services[1])];
        let (tx, mut rx) = mpsc::channel(8);
        let mut hc = HealthChecker::new(tx);
        hc.sync(&services, &HashSet::from(targets));
        let mut up = on_held_clock(async {
            // The probe's task, spawned by `sync`, takes its start at its first poll: after this.
            tokio::task::yield_now().await;
            tokio::time::advance(MAX_PHASE).await;
            [next(&mut rx).await, next(&mut rx).await]
        })
        .await;
        up.sort_by_key(|e| e.target);
        let generation = |t: &Target| hc.generation(t).unwrap();
        assert_eq!(up, targets.map(|target| HealthEvent { target, healthy: true, generation: generation(&target) }));
        // Every probe that reported has connected: the kernel's accept queue holds each connection.
        let mut connections = 0;
        loop {
            match listener.accept() {
                Ok(_) => connections += 1,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("accept: {e}"),
            }
        }
        assert_eq!(connections, 1, "one probe for both services");
        let status = hc.status().lock().unwrap().clone();
        for t in targets {
            assert_eq!((status[&t].healthy, status[&t].probes, status[&t].went_up), (true, 1, 1), "{t:?}");
        }
    }

    /// Services sharing a probe go down together: one event each, with the same verdict, and the
    /// same counters (each probe counts for both).
    #[tokio::test]
    async fn services_sharing_a_probe_go_down_together() {
        let addr = crate::lab::unused_loopback();
        let listener = TcpListener::bind(addr).await.unwrap();
        let services = [service(addr, check(Probe::Tcp)), on_vip(service(addr, check(Probe::Tcp)), "10.0.0.2")];
        let targets = [target(&services[0]), target(&services[1])];
        let (tx, mut rx) = mpsc::channel(8);
        let mut hc = HealthChecker::new(tx);
        hc.sync(&services, &HashSet::new());
        drop(listener);
        let mut down = [next(&mut rx).await, next(&mut rx).await];
        down.sort_by_key(|e| e.target);
        let generation = |t: &Target| hc.generation(t).unwrap();
        assert_eq!(down, targets.map(|target| HealthEvent { target, healthy: false, generation: generation(&target) }));
        let status = hc.status().lock().unwrap().clone();
        let [a, b] = targets.map(|t| status[&t].clone());
        assert_eq!((a.healthy, a.went_down), (false, 1));
        assert_eq!(TargetStatus { generation: 0, ..a }, TargetStatus { generation: 0, ..b }, "one verdict, one count");
    }

    /// A service that comes with the backend and check of a running probe (a NodePort added to a
    /// Service already served) takes the probe's verdict at once: [`HealthChecker::restarting`]
    /// tells the caller before it builds, and one the caller gave another health hears the verdict
    /// from the probe. A service that leaves leaves the probe to the others; one whose check
    /// changes moves to a probe of its own, which a new service with the same check joins.
    #[tokio::test(start_paused = true)]
    async fn a_service_joining_a_running_probe_takes_its_verdict() {
        // A port with no listener, probed once an hour (time is paused: the first probe's phase
        // passes at once): the first probe fails and fall 1 takes the backend down; nothing else
        // happens during the test.
        let addr = crate::lab::unused_loopback();
        let hourly = HealthCheck { interval: Duration::from_secs(3600), fall: 1, ..check(Probe::Tcp) };
        let [a, b, c] = ["10.0.0.1", "10.0.0.2", "10.0.0.3"].map(|vip| on_vip(service(addr, hourly.clone()), vip));
        let [ta, tb, tc] = [&a, &b, &c].map(target);
        let (tx, mut rx) = mpsc::channel(8);
        let mut hc = HealthChecker::new(tx);
        hc.sync(std::slice::from_ref(&a), &HashSet::new());
        assert_eq!(
            next(&mut rx).await,
            HealthEvent { target: ta, healthy: false, generation: hc.generation(&ta).unwrap() }
        );

        let two = [a.clone(), b.clone()];
        assert_eq!(hc.restarting(&two), [(tb, false)], "b joins a's probe, which finds the backend down");
        hc.sync(&two, &HashSet::from([ta, tb]));
        let s = hc.status().lock().unwrap()[&tb].clone();
        assert_eq!((s.healthy, s.probes, s.went_down), (false, 0, 0), "down without a probe of its own");

        // c's caller holds it up (the probe turned between `restarting` and `sync`, say): the probe
        // tells it.
        let three = [a.clone(), b.clone(), c.clone()];
        hc.sync(&three, &HashSet::from([ta, tb]));
        assert!(!hc.status().lock().unwrap()[&tc].healthy);
        assert_eq!(
            next(&mut rx).await,
            HealthEvent { target: tc, healthy: false, generation: hc.generation(&tc).unwrap() }
        );

        // a leaves: the probe goes on for b and c, their generations kept.
        let (gb, gc) = (hc.generation(&tb), hc.generation(&tc));
        hc.sync(&[b.clone(), c.clone()], &HashSet::from([tb, tc]));
        assert_eq!((hc.probes.len(), hc.generation(&ta), hc.generation(&tb), hc.generation(&tc)), (1, None, gb, gc));
        assert!(!hc.status().lock().unwrap().contains_key(&ta));

        // c's check changes: it moves to a probe of its own, from its health, with a new generation.
        let c2 = on_vip(service(addr, HealthCheck { fall: 2, ..hourly.clone() }), "10.0.0.3");
        // A new service with that check starts with it, down: the probe starts from c's health.
        let d = on_vip(service(addr, HealthCheck { fall: 2, ..hourly }), "10.0.0.4");
        let td = target(&d);
        let moved = [b, c2, d];
        let mut restarting = hc.restarting(&moved);
        restarting.sort();
        assert_eq!(restarting, [(tc, false), (td, false)]);
        hc.sync(&moved, &HashSet::from([tb, tc, td]));
        assert_eq!(hc.probes.len(), 2);
        assert!(hc.generation(&tc).is_some() && hc.generation(&tc) != gc && hc.generation(&tb) == gb);
        let status = hc.status().lock().unwrap().clone();
        assert!(!status[&tc].healthy && !status[&td].healthy);
    }

    /// Probes started together first fire at distinct points of their interval, each at its key's
    /// phase, and then every interval: connects come as a trickle, not a burst each interval.
    #[tokio::test(start_paused = true)]
    async fn probes_started_together_are_spread_over_their_interval() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (seen_tx, mut seen) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = listener.accept().await.unwrap();
                let at = tokio::time::Instant::now();
                let mut buf = [0u8; 1024];
                let n = s.read(&mut buf).await.unwrap_or(0);
                let req = String::from_utf8_lossy(&buf[..n]).to_string();
                let _ = seen_tx.send((req.split_whitespace().nth(1).unwrap_or_default().to_string(), at));
                let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n").await;
            }
        });
        // Eight probes of one backend, one per path, every 4 s (below MAX_PHASE: spread over all of it).
        let interval = Duration::from_secs(4);
        let services: Vec<ServiceSpec> = (0..8)
            .map(|i| {
                let c = HealthCheck { interval, ..check(Probe::Http { path: format!("/{i}") }) };
                on_vip(service(addr, c), &format!("10.0.0.{}", i + 1))
            })
            .collect();
        let (tx, _rx) = mpsc::channel(8);
        let mut hc = HealthChecker::new(tx);
        // Each probe's GETs are due at its key's phase and then every interval.
        let mut due: BTreeMap<Duration, Vec<String>> = BTreeMap::new();
        for (i, s) in services.iter().enumerate() {
            let phase = ProbeKey::of(addr, s.health_check.as_ref().unwrap()).phase();
            for at in [phase, phase + interval] {
                due.entry(at).or_default().push(format!("/{i}"));
            }
        }
        let start = tokio::time::Instant::now();
        hc.sync(&services, &HashSet::new());
        // The clock moves from one due time to the next, and on only once the GETs due come, every
        // one at that time: a GET early, late, or of a path not due then fails the test.
        let mut first = HashMap::new();
        on_held_clock(async {
            // The probes' tasks, spawned by `sync`, take their start at their first poll: after this.
            tokio::task::yield_now().await;
            for (at, mut paths) in due {
                tokio::time::advance(start + at - tokio::time::Instant::now()).await;
                let mut came = Vec::new();
                while came.len() < paths.len() {
                    let (path, seen_at) = seen.recv().await.unwrap();
                    assert_eq!(seen_at - start, at, "{path}");
                    first.entry(path.clone()).or_insert(seen_at);
                    came.push(path);
                }
                came.sort();
                paths.sort();
                assert_eq!(came, paths, "the GETs due {at:?} after the start");
            }
        })
        .await;
        // Phases come from a hash of the key, which holds the listener's port (the kernel's pick):
        // two of eight may share a millisecond (about 1 run in 140), so the test asks for a spread,
        // not for eight distinct offsets. `phases_spread_evenly_and_are_capped` checks the spread
        // itself on fixed keys.
        let offsets: BTreeSet<Duration> = first.values().map(|at| *at - start).collect();
        assert!(offsets.len() > services.len() / 2, "offsets bunched: {offsets:?}");
        assert!(offsets.iter().all(|o| *o < interval), "{offsets:?}");
    }

    /// Phases spread evenly over the interval, and never past MAX_PHASE, however long the interval.
    #[test]
    fn phases_spread_evenly_and_are_capped() {
        let every_2s = HealthCheck { interval: Duration::from_secs(2), ..check(Probe::Tcp) };
        let hourly = HealthCheck { interval: Duration::from_secs(3600), ..check(Probe::Tcp) };
        let mut tenths = [0u32; 10];
        for i in 0..1000u16 {
            let [hi, lo] = i.to_be_bytes();
            let backend = SocketAddr::from(([10, 0, hi, lo], 80));
            let phase = ProbeKey::of(backend, &every_2s).phase();
            tenths[usize::try_from(phase.as_millis() / 200).unwrap()] += 1;
            assert!(ProbeKey::of(backend, &hourly).phase() < MAX_PHASE);
        }
        assert!(tenths.iter().all(|n| (60..=140).contains(n)), "{tenths:?}");
    }

    #[tokio::test]
    async fn tcp_check_goes_down_when_listener_closes_and_up_when_it_returns() {
        let addr = crate::lab::unused_loopback();
        let listener = TcpListener::bind(addr).await.unwrap();
        let (tx, mut rx) = mpsc::channel(8);
        let mut hc = HealthChecker::new(tx);
        let svc = service(addr, check(Probe::Tcp));
        hc.sync(std::slice::from_ref(&svc), &HashSet::new());
        let target = Target { service: svc.config.key, backend: addr };
        let generation = hc.generation(&target).unwrap();

        drop(listener);
        assert_eq!(next(&mut rx).await, HealthEvent { target, healthy: false, generation });
        assert_eq!(hc.down(), HashSet::from([target]));
        let st = hc.status().lock().unwrap()[&target].clone();
        assert_eq!(st.went_down, 1);
        assert!(st.failures >= 2 && st.last_error.as_deref().unwrap_or("").contains("connect"), "{st:?}");

        let _listener = TcpListener::bind(addr).await.unwrap();
        assert_eq!(next(&mut rx).await, HealthEvent { target, healthy: true, generation });
        assert!(hc.down().is_empty());
        assert_eq!(hc.status().lock().unwrap()[&target].went_up, 1);

        // Removing the service stops its probes and forgets it.
        hc.sync(&[], &HashSet::new());
        assert!(hc.status().lock().unwrap().is_empty());
    }

    /// A reload that changes a backend's check restarts its probe (a new generation) from the
    /// backend's health as the caller applies it: a down backend stays down until `rise` successes
    /// of the new check. Its counters carry on: `lb_health_check_failures_total` and
    /// `lb_health_transitions_total` are counters, and a reload must not send them back to zero.
    /// A backend that leaves is forgotten.
    #[tokio::test]
    async fn a_restarted_probe_keeps_its_backends_health_and_counters() {
        // A port with no listener: every probe fails, and fall 1 takes the backend down at the first.
        let addr = crate::lab::unused_loopback();
        let (tx, mut rx) = mpsc::channel(8);
        let mut hc = HealthChecker::new(tx);
        let svc = service(addr, HealthCheck { fall: 1, ..check(Probe::Tcp) });
        hc.sync(std::slice::from_ref(&svc), &HashSet::new());
        let target = Target { service: svc.config.key, backend: addr };
        assert!(!next(&mut rx).await.healthy);
        let before = hc.status().lock().unwrap()[&target].clone();
        assert!(before.failures >= 1 && before.went_down == 1, "{before:?}");

        let changed = service(addr, HealthCheck { fall: 2, rise: 2, ..check(Probe::Tcp) });
        hc.sync(std::slice::from_ref(&changed), &HashSet::from([target]));
        let after = hc.status().lock().unwrap()[&target].clone();
        assert!(!after.healthy, "a restarted probe goes on from its backend's health");
        assert_ne!(after.generation, before.generation);
        assert_eq!(
            (after.probes, after.failures, after.went_down, after.went_up),
            (before.probes, before.failures, before.went_down, before.went_up),
            "counters carry over the restart"
        );
        // It comes back only when the new check passes, with an event of the new generation.
        let _listener = TcpListener::bind(addr).await.unwrap();
        let up = next(&mut rx).await;
        assert!(up.healthy && hc.is_current(&up), "{up:?}");
        let now = hc.status().lock().unwrap()[&target].clone();
        assert_eq!((now.healthy, now.went_up), (true, 1));

        hc.sync(&[], &HashSet::new());
        assert!(hc.status().lock().unwrap().is_empty(), "a backend that left is forgotten");
    }

    #[tokio::test]
    async fn http_check_follows_status_codes() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let code = Arc::new(AtomicU16::new(200));
        let (path_tx, mut path_rx) = mpsc::unbounded_channel();
        let served = code.clone();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = listener.accept().await.unwrap();
                let mut buf = [0u8; 1024];
                let n = s.read(&mut buf).await.unwrap_or(0);
                let req = String::from_utf8_lossy(&buf[..n]).to_string();
                let _ = path_tx.send(req.lines().next().unwrap_or_default().to_string());
                let c = served.load(Ordering::SeqCst);
                let _ = s.write_all(format!("HTTP/1.1 {c} X\r\nContent-Length: 0\r\n\r\n").as_bytes()).await;
            }
        });
        let (tx, mut rx) = mpsc::channel(8);
        let mut hc = HealthChecker::new(tx);
        let svc = service(addr, check(Probe::Http { path: "/healthz".into() }));
        hc.sync(std::slice::from_ref(&svc), &HashSet::new());
        assert_eq!(path_rx.recv().await.unwrap(), "GET /healthz HTTP/1.1");

        code.store(503, Ordering::SeqCst);
        assert!(!next(&mut rx).await.healthy);
        let target = Target { service: svc.config.key, backend: addr };
        assert_eq!(hc.status().lock().unwrap()[&target].last_error.as_deref(), Some("HTTP status 503"));
        code.store(302, Ordering::SeqCst);
        assert!(next(&mut rx).await.healthy, "3xx counts as up");
    }

    #[tokio::test]
    async fn probe_times_out_on_silent_server() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        // Accepts (the kernel completes the handshake) but never answers the GET.
        let hc = HealthCheck { timeout: Duration::from_millis(50), ..check(Probe::Http { path: "/".into() }) };
        let err = probe(&hc, addr).await.unwrap_err();
        assert!(err.contains("timed out"), "{err}");
        drop(listener);
    }

    /// `service` with a second backend, 10.1.0.2:80.
    fn two_backends(mut s: ServiceSpec) -> ServiceSpec {
        let other = BackendConfig { addr: "10.1.0.2".parse().unwrap(), ..s.config.backends[0].clone() };
        s.config.backends.push(other);
        s
    }

    #[test]
    fn apply_health_drains_or_removes_per_policy() {
        let addr: SocketAddr = "10.1.0.1:80".parse().unwrap();
        let mut drain = vec![two_backends(service(addr, check(Probe::Tcp)))];
        let target = Target { service: drain[0].config.key, backend: addr };
        let down = HashSet::from([target]);
        assert!(apply_health(&mut drain, &down).is_empty());
        assert_eq!(drain[0].config.backends[0].state, BackendState::Draining);
        assert_eq!(drain[0].config.backends[1].state, BackendState::Active);

        let remove_check = HealthCheck { on_failure: FailurePolicy::Remove, ..check(Probe::Tcp) };
        let mut remove = vec![two_backends(service(addr, remove_check))];
        assert!(apply_health(&mut remove, &down).is_empty());
        assert_eq!(remove[0].config.backends.len(), 1);
        assert_eq!(remove[0].config.backends[0].addr.to_string(), "10.1.0.2");

        let mut unchecked = vec![ServiceSpec { health_check: None, ..service(addr, check(Probe::Tcp)) }];
        apply_health(&mut unchecked, &down);
        assert_eq!(unchecked[0].config.backends[0].state, BackendState::Active, "no check, no overlay");
    }

    /// A UDP service's down backend is removed under `drain` too: a client that keeps sending from
    /// one port has a flow that never idles out, which Draining would keep on the dead backend.
    #[test]
    fn apply_health_removes_a_udp_services_down_backend_under_either_policy() {
        let addr: SocketAddr = "10.1.0.1:53".parse().unwrap();
        for on_failure in [FailurePolicy::Drain, FailurePolicy::Remove] {
            let mut services = vec![two_backends(service(addr, HealthCheck { on_failure, ..check(Probe::Tcp) }))];
            services[0].config.key.proto = Protocol::Udp;
            let down = HashSet::from([Target { service: services[0].config.key, backend: addr }]);
            assert!(apply_health(&mut services, &down).is_empty());
            let left: Vec<_> = services[0].config.backends.iter().map(|b| (b.addr.to_string(), b.state)).collect();
            assert_eq!(left, [("10.1.0.2".to_string(), BackendState::Active)], "{on_failure:?}");
        }
    }

    /// Every backend that would take new flows down: the service fails open, whatever the policy;
    /// a backend drained or of weight 0 by configuration does not count, and stays as configured.
    #[test]
    fn a_service_whose_every_serving_backend_is_down_fails_open() {
        let addr: SocketAddr = "10.1.0.1:80".parse().unwrap();
        let other: SocketAddr = "10.1.0.2:80".parse().unwrap();
        for (on_failure, proto) in [FailurePolicy::Drain, FailurePolicy::Remove]
            .into_iter()
            .flat_map(|f| [(f, Protocol::Tcp), (f, Protocol::Udp)])
        {
            let mut services = vec![two_backends(service(addr, HealthCheck { on_failure, ..check(Probe::Tcp) }))];
            services[0].config.key.proto = proto;
            let key = services[0].config.key;
            let down = HashSet::from([Target { service: key, backend: addr }, Target { service: key, backend: other }]);
            let before = services.clone();
            assert_eq!(apply_health(&mut services, &down), BTreeSet::from([key]), "{on_failure:?} {proto:?}");
            assert_eq!(services, before, "{on_failure:?} {proto:?}: served as if no check ran");
        }

        // 10.1.0.2 is drained by configuration: 10.1.0.1 alone takes new flows, and it is down.
        let mut services = vec![two_backends(service(addr, check(Probe::Tcp)))];
        services[0].config.backends[1].state = BackendState::Draining;
        let key = services[0].config.key;
        let before = services.clone();
        let down = HashSet::from([Target { service: key, backend: addr }]);
        assert_eq!(apply_health(&mut services, &down), BTreeSet::from([key]));
        assert_eq!(services, before);
        // Weight 0 the same.
        services[0].config.backends[1].state = BackendState::Active;
        services[0].config.backends[1].weight = 0;
        assert_eq!(apply_health(&mut services, &down), BTreeSet::from([key]));

        // No backend would take new flows anyway: nothing to open.
        services[0].config.backends[0].weight = 0;
        assert!(apply_health(&mut services, &down).is_empty());
        assert_eq!(services[0].config.backends[0].state, BackendState::Draining);
    }
}
