//! Health checks of backends, on the control side (tokio), never on the fast path.
//!
//! One task per (service, backend) probes at the check's interval: a TCP connect, or an HTTP/1.1 GET
//! that must answer 2xx or 3xx, each bounded by the timeout. `fall` consecutive failures take a
//! healthy backend down, `rise` consecutive successes bring it back (as HAProxy and keepalived do);
//! every transition is logged and counted and sent as a [`HealthEvent`] to the control loop, which
//! applies [`apply_health`]: a down backend becomes Draining (no new flows, established flows stay)
//! or is removed (established flows then follow the service's `on_backend_removed`), per the check's
//! `on_failure`.
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
//! probe restarted because its check changed goes on from its backend's health (a down backend
//! needs `rise` successes of the new check), so a reload does not send new flows to a backend
//! known to be down.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lb_core::config::{BackendState, Protocol, ServiceKey};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
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
    /// The probe task that saw it ([`HealthChecker::generation`]): an event from a task that has
    /// since been stopped or restarted is stale ([`HealthChecker::is_current`]).
    pub generation: u64,
}

/// What the checker knows about one backend, for `/metrics` and `lb list`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TargetStatus {
    /// Current health.
    pub healthy: bool,
    /// Probes run.
    pub probes: u64,
    /// Probes failed.
    pub failures: u64,
    /// Up -> down transitions.
    pub went_down: u64,
    /// Down -> up transitions.
    pub went_up: u64,
    /// The last failure, for logs and `lb list`.
    pub last_error: Option<String>,
    /// The probe task that writes this entry ([`HealthChecker::generation`]). A task that finds
    /// another generation here was replaced (its check changed) while it probed, and stops without
    /// writing: aborting a task takes effect at its next await, and on a multi-threaded runtime it
    /// could otherwise write its last result into its successor's fresh entry.
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

/// Starts and stops probe tasks as the set of checked backends changes.
pub struct HealthChecker {
    events: mpsc::Sender<HealthEvent>,
    status: StatusTable,
    /// Per probed backend: its check, its task's generation, the task.
    tasks: HashMap<Target, (HealthCheck, u64, JoinHandle<()>)>,
    /// The generation the next task started gets (never reused).
    next_generation: u64,
}

impl HealthChecker {
    /// A checker sending transitions to `events`.
    pub fn new(events: mpsc::Sender<HealthEvent>) -> Self {
        HealthChecker { events, status: StatusTable::default(), tasks: HashMap::new(), next_generation: 1 }
    }

    /// The shared status table.
    pub fn status(&self) -> StatusTable {
        self.status.clone()
    }

    /// The backends currently down.
    pub fn down(&self) -> HashSet<Target> {
        lock(&self.status).iter().filter(|(_, s)| !s.healthy).map(|(t, _)| *t).collect()
    }

    /// The generation of `target`'s probe task, if it is probed.
    pub fn generation(&self, target: &Target) -> Option<u64> {
        self.tasks.get(target).map(|(_, g, _)| *g)
    }

    /// Whether `event` comes from the task probing its target now. One from a stopped or restarted
    /// task may still be queued; applied, it would mark a backend down that a new task calls up
    /// and will report nothing more about until it changes.
    pub fn is_current(&self, event: &HealthEvent) -> bool {
        self.generation(&event.target) == Some(event.generation)
    }

    /// The backends of `services` whose probe [`sync`](Self::sync) would restart (their check
    /// changed), with the health this checker's table holds for them (the old probe's last
    /// verdict): the old probe's last transition may still be queued for the caller, and once the
    /// probe restarts it is stale and never arrives.
    pub fn restarting(&self, services: &[ServiceSpec]) -> Vec<(Target, bool)> {
        let table = lock(&self.status);
        wanted(services)
            .into_iter()
            .filter(|(target, check)| self.tasks.get(target).is_some_and(|(running, _, _)| running != check))
            .filter_map(|(target, _)| table.get(&target).map(|s| (target, s.healthy)))
            .collect()
    }

    /// Probes exactly the backends of `services` that have a health check: gone ones stop and are
    /// forgotten; new ones and ones whose check changed start a task of a new generation, up unless
    /// `down` (the health the caller applies, so that the two agree: an event the old task had
    /// queued is stale, [`HealthChecker::is_current`]) names them, their counters kept. Must run
    /// inside tokio.
    pub fn sync(&mut self, services: &[ServiceSpec], down: &HashSet<Target>) {
        let wanted = wanted(services);
        self.tasks.retain(|target, (check, _, task)| {
            let keep = wanted.get(target) == Some(check);
            if !keep {
                task.abort();
                // One still wanted restarts below, from this entry's counters.
                if !wanted.contains_key(target) {
                    lock(&self.status).remove(target);
                }
            }
            keep
        });
        for (target, check) in wanted {
            if self.tasks.contains_key(&target) {
                continue;
            }
            let generation = self.next_generation;
            self.next_generation += 1;
            // The counters go on across a restart: they are Prometheus counters, which a reload
            // must not send back to zero.
            let mut table = lock(&self.status);
            let before = table.remove(&target).unwrap_or_default();
            let healthy = !down.contains(&target);
            table.insert(target, TargetStatus { healthy, generation, ..before });
            drop(table);
            let probe = Probing { target, generation, healthy, check: check.clone() };
            let task = tokio::spawn(run_target(probe, self.status.clone(), self.events.clone()));
            self.tasks.insert(target, (check, generation, task));
        }
    }
}

/// Every checked backend of `services` with its check.
fn wanted(services: &[ServiceSpec]) -> HashMap<Target, HealthCheck> {
    let mut wanted = HashMap::new();
    for s in services {
        let Some(check) = &s.health_check else { continue };
        for b in &s.config.backends {
            wanted.insert(Target { service: s.config.key, backend: SocketAddr::new(b.addr, b.port) }, check.clone());
        }
    }
    wanted
}

/// What one probe task probes.
struct Probing {
    target: Target,
    generation: u64,
    /// The health it starts from.
    healthy: bool,
    check: HealthCheck,
}

impl Drop for HealthChecker {
    fn drop(&mut self) {
        for (_, _, task) in self.tasks.values() {
            task.abort();
        }
    }
}

fn lock(t: &StatusTable) -> std::sync::MutexGuard<'_, HashMap<Target, TargetStatus>> {
    // A panicking probe task cannot leave the table half-written (each update is one assignment).
    t.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

async fn run_target(probing: Probing, status: StatusTable, events: mpsc::Sender<HealthEvent>) {
    let Probing { target, generation, healthy, check } = probing;
    let addr = SocketAddr::new(target.backend.ip(), check.port.unwrap_or(target.backend.port()));
    let mut tick = tokio::time::interval(check.interval.max(Duration::from_millis(1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let (mut healthy, mut streak) = (healthy, 0u32);
    loop {
        tick.tick().await;
        let result = probe(&check, addr).await;
        // Count consecutive results against the current state: failures while up, successes while down.
        if result.is_ok() == healthy {
            streak = 0;
        } else {
            streak += 1;
        }
        let flip = streak >= if healthy { check.fall } else { check.rise };
        {
            let mut table = lock(&status);
            // Stopped by sync, or replaced by a task of another generation.
            let Some(s) = table.get_mut(&target).filter(|s| s.generation == generation) else { return };
            s.probes += 1;
            if let Err(e) = &result {
                s.failures += 1;
                s.last_error = Some(e.clone());
            }
            if flip {
                healthy = !healthy;
                streak = 0;
                s.healthy = healthy;
                if healthy {
                    s.went_up += 1;
                } else {
                    s.went_down += 1;
                }
            }
        }
        if flip {
            if healthy {
                tracing::info!(service = %target.service, backend = %target.backend, "backend recovered: {} successful probes", check.rise);
            } else {
                tracing::warn!(service = %target.service, backend = %target.backend, error = result.as_ref().err().map(String::as_str).unwrap_or(""), "backend failed: {} failed probes", check.fall);
            }
            if events.send(HealthEvent { target, healthy, generation }).await.is_err() {
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

    /// A probe task whose entry a newer task took over (sync replaced it while it probed) stops at
    /// its next result without writing into the newer entry.
    #[tokio::test]
    async fn a_replaced_probe_task_leaves_its_successors_status_alone() {
        // A port with no listener: every probe fails at once, and fall 1 flips at the first.
        let addr = TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
        let target = Target { service: service(addr, check(Probe::Tcp)).config.key, backend: addr };
        let status = StatusTable::default();
        let fresh = TargetStatus { healthy: true, generation: 2, ..Default::default() };
        lock(&status).insert(target, fresh.clone());
        let (tx, mut rx) = mpsc::channel(8);
        let old = Probing { target, generation: 1, healthy: true, check: HealthCheck { fall: 1, ..check(Probe::Tcp) } };
        tokio::time::timeout(Duration::from_secs(30), run_target(old, status.clone(), tx))
            .await
            .expect("the replaced task stops");
        assert_eq!(lock(&status)[&target], fresh, "the successor's entry is untouched");
        assert!(rx.try_recv().is_err(), "and no event was sent");
    }

    #[tokio::test]
    async fn tcp_check_goes_down_when_listener_closes_and_up_when_it_returns() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
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
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
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
