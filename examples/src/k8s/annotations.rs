//! The annotations the load balancer reads, all under one prefix, [`PREFIX`].
//!
//! | object | annotation | value | default |
//! |---|---|---|---|
//! | Service | `lb.example.dev/scheduler` | an `ipvsadm -s` name: `mh`, `hrw`, `ecmp`, `rr`, `wrr`, `lc`, `wlc`, `sh`, `dh`, `sed`, `nq` | file's `kubernetes.default_scheduler` (mh) |
//! | Service | `lb.example.dev/maglev-table-size` | a prime, at most 1048573 | 65537 (655373 above 655 endpoints) |
//! | Service | `lb.example.dev/mode` | `nat`, `ipip`, `gue:PORT` (`dsr` parses, but the Service is skipped: endpoints have no MAC) | file's `kubernetes.default_mode` (nat) |
//! | Service | `lb.example.dev/on-backend-removed` | `reschedule`, `drop` | `reschedule` |
//! | Service | `lb.example.dev/health-check` | `tcp` or `http:/path` (2 s interval, 1 s timeout, rise 2, fall 3, drain; on a UDP port, remove) | none |
//! | EndpointSlice | `lb.example.dev/weight` | 0..=65535, the weight of *each* endpoint in the slice | 100 |
//!
//! A bad value makes the translation skip that Service (logged at warn, counted), never guess.

use std::collections::BTreeMap;

use lb_core::config::{ForwardMode, RemovedBackendPolicy, SchedulerKind};

use crate::config::file::{MAX_MAGLEV_TABLE_SIZE, MAX_WEIGHT, maglev_table_size, parse_mode, parse_removed_policy};
use crate::config::{HealthCheck, Probe};

/// The one prefix of every annotation the load balancer reads.
pub const PREFIX: &str = "lb.example.dev/";
/// Service annotation: scheduler name.
pub const SCHEDULER: &str = "lb.example.dev/scheduler";
/// Service annotation: Maglev table size.
pub const MAGLEV_TABLE_SIZE: &str = "lb.example.dev/maglev-table-size";
/// Service annotation: forwarding mode.
pub const MODE: &str = "lb.example.dev/mode";
/// Service annotation: what happens to flows of a removed backend.
pub const ON_BACKEND_REMOVED: &str = "lb.example.dev/on-backend-removed";
/// Service annotation: health check.
pub const HEALTH_CHECK: &str = "lb.example.dev/health-check";
/// EndpointSlice annotation: weight of each endpoint in the slice.
pub const WEIGHT: &str = "lb.example.dev/weight";
/// Weight of an endpoint whose slice has no weight annotation.
pub const DEFAULT_WEIGHT: u32 = 100;

/// What a Service's annotations ask for; `None` means "use the default".
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ServiceAnnotations {
    /// Scheduler.
    pub scheduler: Option<SchedulerKind>,
    /// Maglev table size.
    pub maglev_table_size: Option<u32>,
    /// Forwarding mode.
    pub mode: Option<ForwardMode>,
    /// Removed-backend policy.
    pub on_backend_removed: Option<RemovedBackendPolicy>,
    /// Health check.
    pub health_check: Option<HealthCheck>,
}

/// Reads a Service's annotations; the error names the annotation and its value.
pub fn service(annotations: Option<&BTreeMap<String, String>>) -> Result<ServiceAnnotations, String> {
    let mut out = ServiceAnnotations::default();
    let Some(a) = annotations else { return Ok(out) };
    let bad = |key: &str, value: &str, why: &str| format!("annotation {key}: {value:?} {why}");
    if let Some(v) = a.get(SCHEDULER) {
        out.scheduler =
            Some(v.parse().map_err(|_| {
                bad(SCHEDULER, v, "is not a scheduler (rr, wrr, lc, wlc, dh, sh, sed, nq, mh, hrw, ecmp)")
            })?);
    }
    if let Some(v) = a.get(MAGLEV_TABLE_SIZE) {
        let n: u64 = v.trim().parse().map_err(|_| bad(MAGLEV_TABLE_SIZE, v, "is not a number"))?;
        // (Judged at once, whatever the number: a near-2^64 prime once stalled the feed, see the test.)
        out.maglev_table_size = Some(maglev_table_size(n).ok_or_else(|| {
            bad(MAGLEV_TABLE_SIZE, v, &format!("must be a prime no larger than {MAX_MAGLEV_TABLE_SIZE}"))
        })?);
    }
    if let Some(v) = a.get(MODE) {
        let (name, port) = match v.split_once(':') {
            Some((n, p)) => {
                let port = p.trim().parse::<u16>().ok().filter(|&p| p != 0);
                (n, Some(port.ok_or_else(|| bad(MODE, v, "has no valid GUE port (e.g. gue:6080)"))?))
            }
            None => (v.as_str(), None),
        };
        let mode = parse_mode(name, port).map_err(|e| bad(MODE, v, &e))?;
        // Only GUE has a port; dropping one given to another mode would be a guess at what was meant.
        if port.is_some() && !matches!(mode, ForwardMode::Gue { .. }) {
            return Err(bad(MODE, v, "has a port, which only gue takes (e.g. gue:6080)"));
        }
        out.mode = Some(mode);
    }
    if let Some(v) = a.get(ON_BACKEND_REMOVED) {
        out.on_backend_removed = Some(
            parse_removed_policy(v).ok_or_else(|| bad(ON_BACKEND_REMOVED, v, "is not a policy (reschedule, drop)"))?,
        );
    }
    if let Some(v) = a.get(HEALTH_CHECK) {
        let probe = match v.trim().split_once(':') {
            None if v.trim().eq_ignore_ascii_case("tcp") => Probe::Tcp,
            Some((kind, path)) if kind.eq_ignore_ascii_case("http") && path.starts_with('/') => {
                if path.chars().any(|c| c.is_whitespace() || c.is_control()) {
                    return Err(bad(HEALTH_CHECK, v, "has a path with spaces"));
                }
                Probe::Http { path: path.to_string() }
            }
            _ => return Err(bad(HEALTH_CHECK, v, "is not a health check (tcp, http:/path)")),
        };
        out.health_check = Some(HealthCheck::with_defaults(probe));
    }
    Ok(out)
}

/// Reads an EndpointSlice's weight annotation.
pub fn weight(annotations: Option<&BTreeMap<String, String>>) -> Result<u32, String> {
    match annotations.and_then(|a| a.get(WEIGHT)) {
        None => Ok(DEFAULT_WEIGHT),
        Some(v) => v
            .trim()
            .parse::<u64>()
            .ok()
            .filter(|&w| w <= MAX_WEIGHT)
            .and_then(|w| u32::try_from(w).ok())
            .ok_or_else(|| format!("annotation {WEIGHT}: {v:?} is not a weight (0..={MAX_WEIGHT})")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn service_annotations_parse() {
        let a = map(&[
            (SCHEDULER, "sh"),
            (MAGLEV_TABLE_SIZE, "251"),
            (MODE, "gue:6080"),
            (ON_BACKEND_REMOVED, "drop"),
            (HEALTH_CHECK, "http:/ready"),
            ("unrelated.example/x", "y"),
        ]);
        let s = service(Some(&a)).unwrap();
        assert_eq!(s.scheduler, Some(SchedulerKind::SourceHashing));
        assert_eq!(s.maglev_table_size, Some(251));
        assert_eq!(s.mode, Some(ForwardMode::Gue { port: 6080 }));
        assert_eq!(s.on_backend_removed, Some(RemovedBackendPolicy::Drop));
        assert_eq!(s.health_check.unwrap().probe, Probe::Http { path: "/ready".into() });
        assert_eq!(service(None).unwrap(), ServiceAnnotations::default());
    }

    /// Any user who may annotate a Service can write any number: one too large is refused by its
    /// size before a primality test, whose trial division up to the square root of a prime near 2^64
    /// takes billions of steps and then overflows, stalling or killing the feed (and every later
    /// cluster update) on each translation. The timeout only turns that stall into a failure.
    #[test]
    fn a_huge_maglev_table_size_is_refused_at_once() {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(service(Some(&map(&[(MAGLEV_TABLE_SIZE, "18446744073709551557")]))));
        });
        let result = rx.recv_timeout(std::time::Duration::from_secs(10)).expect("the annotation is judged");
        assert!(result.unwrap_err().contains("must be a prime no larger than 1048573"));
    }

    #[test]
    fn bad_annotations_name_key_and_value() {
        for (k, v) in [
            (SCHEDULER, "fastest"),
            (MAGLEV_TABLE_SIZE, "65536"),
            (MODE, "gue"),
            (MODE, "gue:0"),
            (MODE, "warp"),
            (MODE, "dsr:6080"),
            (MODE, "nat:8080"),
            (ON_BACKEND_REMOVED, "keep"),
            (HEALTH_CHECK, "icmp"),
            (HEALTH_CHECK, "http:healthz"),
        ] {
            let e = service(Some(&map(&[(k, v)]))).unwrap_err();
            assert!(e.contains(k) && e.contains(&format!("{v:?}")), "{e}");
        }
        assert_eq!(weight(Some(&map(&[(WEIGHT, "10")]))), Ok(10));
        assert_eq!(weight(Some(&map(&[(WEIGHT, "0")]))), Ok(0));
        assert_eq!(weight(None), Ok(DEFAULT_WEIGHT));
        assert!(weight(Some(&map(&[(WEIGHT, "70000")]))).unwrap_err().contains("\"70000\""));
        assert!(weight(Some(&map(&[(WEIGHT, "-1")]))).is_err());
    }
}
