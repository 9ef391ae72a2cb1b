//! `lb list`: the live state of a running instance, printed as `ipvsadm -Ln` prints IPVS.
//!
//! The running instance serves a JSON [`StateView`] on `GET /state` (see `metrics`); `lb list` fetches
//! it over plain HTTP from the metrics address and prints one block per service:
//!
//! ```text
//! Prot LocalAddress:Port Scheduler Flags
//!   -> RemoteAddress:Port           Forward Weight ActiveConn InActConn
//! TCP  10.96.12.34:80 wlc persistent 600
//!   -> 10.244.1.5:8080              Masq    100    12         4
//!   -> 10.244.1.9:8080              Masq    100    3          0          draining
//! ```
//! Columns and widths follow ipvsadm, and so do the counts: ActiveConn is the backend's TCP
//! connections in the established state, InActConn its other connection-table entries (handshakes,
//! closing, time-wait, UDP), summed over the cores.
//! A trailing word marks a backend that is draining or failing its health check, and `fail-open` a
//! service whose every backend that would take new flows fails its check, so that all of them take
//! new flows as if no check ran (`health`'s module docs).

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The live state as `/state` serves it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateView {
    /// Version of the tables the workers serve (0: none yet).
    pub version: u64,
    /// Configuration updates applied.
    pub applied: u64,
    /// Configuration updates rejected.
    pub rejected: u64,
    /// Why the last rejected update was rejected.
    pub last_error: Option<String>,
    /// Connection-table entries, all cores.
    pub conntrack_entries: u64,
    /// Connection-table capacity, all cores.
    pub conntrack_capacity: u64,
    /// The services, in table order.
    pub services: Vec<ServiceView>,
}

/// One virtual service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceView {
    /// Name.
    pub name: String,
    /// `tcp` or `udp`.
    pub proto: String,
    /// VIP.
    pub vip: IpAddr,
    /// Port.
    pub port: u16,
    /// Scheduler short name.
    pub scheduler: String,
    /// Forwarding method as ipvsadm names it (Masq, Route, Tunnel, GUE).
    pub forward: String,
    /// ClientIP affinity timeout.
    pub persistent_secs: Option<u32>,
    /// Frames forwarded.
    pub packets: u64,
    /// Bytes forwarded.
    pub bytes: u64,
    /// Flows scheduled.
    pub new_flows: u64,
    /// Frames dropped.
    pub drops: u64,
    /// Every backend that would take new flows fails its health check, so the checks are set aside
    /// and all of them take new flows (fail open).
    #[serde(default)]
    pub fail_open: bool,
    /// Backends.
    pub backends: Vec<BackendView>,
}

/// One backend.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendView {
    /// Address.
    pub addr: IpAddr,
    /// Port.
    pub port: u16,
    /// Weight.
    pub weight: u32,
    /// Keeps its flows, takes no new ones.
    pub draining: bool,
    /// Health-check result; `None` when the service has no check.
    pub healthy: Option<bool>,
    /// Connection-table entries pointing at it.
    pub active_conns: u64,
    /// Of those, TCP connections in the established state (ipvsadm's ActiveConn; the rest is InActConn).
    #[serde(default)]
    pub established_conns: u64,
    /// Frames forwarded.
    pub packets: u64,
    /// Bytes forwarded.
    pub bytes: u64,
    /// Flows scheduled.
    pub new_flows: u64,
}

/// Why `lb list` could not get the state.
#[derive(Debug, thiserror::Error)]
pub enum ListError {
    /// Connecting, sending or receiving failed.
    #[error("cannot reach the load balancer at {addr}: {source} (is it running with metrics.listen set?)")]
    Io {
        /// The metrics address.
        addr: SocketAddr,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The connection was taken but no answer came in time.
    #[error(
        "{addr} took the connection but sent no answer within {timeout:?} (is it the load balancer's metrics.listen?)"
    )]
    Silent {
        /// The metrics address.
        addr: SocketAddr,
        /// How long the answer was waited for.
        timeout: Duration,
    },
    /// The answer was not a 200 with a JSON state.
    #[error("unexpected answer from {addr}: {what}")]
    Answer {
        /// The metrics address.
        addr: SocketAddr,
        /// What was wrong.
        what: String,
    },
    /// The listing could not be written out (other than to a reader that went away).
    #[error("cannot write the listing: {0}")]
    Output(std::io::Error),
}

/// Fetches `/state` from a running instance's metrics address.
pub fn fetch(addr: SocketAddr, timeout: Duration) -> Result<StateView, ListError> {
    let io = |source| ListError::Io { addr, source };
    let mut s = TcpStream::connect_timeout(&addr, timeout).map_err(io)?;
    s.set_read_timeout(Some(timeout)).map_err(io)?;
    s.write_all(format!("GET /state HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes()).map_err(io)?;
    let mut resp = String::new();
    s.read_to_string(&mut resp).map_err(|e| match e.kind() {
        // What a read timeout returns (EAGAIN), or TimedOut on some systems.
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => ListError::Silent { addr, timeout },
        _ => io(e),
    })?;
    let bad = |what: String| ListError::Answer { addr, what };
    let (head, body) = resp.split_once("\r\n\r\n").ok_or_else(|| bad("no HTTP header".into()))?;
    let status = head.lines().next().unwrap_or_default();
    if status.split_whitespace().nth(1) != Some("200") {
        return Err(bad(format!("status {status:?}")));
    }
    serde_json::from_str(body).map_err(|e| bad(format!("state JSON: {e}")))
}

/// `lb list`: fetches the state from `addr` and prints it to stdout. A reader that stops reading
/// (`lb list | head`) ends the listing there, as for any command, not with an error.
pub fn print(addr: SocketAddr) -> Result<(), ListError> {
    let view = fetch(addr, Duration::from_secs(5))?;
    let mut out = std::io::stdout().lock();
    match out.write_all(format_ipvsadm(&view).as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(ListError::Output(e)),
        _ => Ok(()),
    }
}

fn endpoint(addr: IpAddr, port: u16) -> String {
    SocketAddr::new(addr, port).to_string()
}

/// Formats the state as `ipvsadm -Ln` does.
pub fn format_ipvsadm(view: &StateView) -> String {
    let mut out = format!(
        "lb userspace load balancer (tables version {}, connections {}/{})\n\
         Prot LocalAddress:Port Scheduler Flags\n  -> RemoteAddress:Port           Forward Weight ActiveConn InActConn\n",
        view.version, view.conntrack_entries, view.conntrack_capacity
    );
    for s in &view.services {
        out.push_str(&format!("{:<4} {} {}", s.proto.to_uppercase(), endpoint(s.vip, s.port), s.scheduler));
        if let Some(t) = s.persistent_secs {
            out.push_str(&format!(" persistent {t}"));
        }
        if s.fail_open {
            out.push_str(" fail-open");
        }
        out.push('\n');
        for b in &s.backends {
            let mut line = format!(
                "  -> {:<28} {:<7} {:<6} {:<10} {:<10}",
                endpoint(b.addr, b.port),
                s.forward,
                b.weight,
                b.established_conns,
                b.active_conns.saturating_sub(b.established_conns)
            );
            let mark = match (b.healthy, b.draining) {
                (Some(false), _) => " down",
                (_, true) => " draining",
                _ => "",
            };
            line.push_str(mark);
            out.push_str(line.trim_end());
            out.push('\n');
        }
    }
    if view.rejected > 0 {
        out.push_str(&format!(
            "# {} configuration update(s) rejected; last: {}\n",
            view.rejected,
            view.last_error.as_deref().unwrap_or("?")
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prints_like_ipvsadm() {
        let b = |addr: &str, port, weight, (conns, established), draining, healthy| BackendView {
            addr: addr.parse().unwrap(),
            port,
            weight,
            draining,
            healthy,
            active_conns: conns,
            established_conns: established,
            packets: 0,
            bytes: 0,
            new_flows: 0,
        };
        let view = StateView {
            version: 7,
            conntrack_entries: 15,
            conntrack_capacity: 65536,
            services: vec![
                ServiceView {
                    name: "shop/web:http".into(),
                    proto: "tcp".into(),
                    vip: "10.96.12.34".parse().unwrap(),
                    port: 80,
                    scheduler: "wlc".into(),
                    forward: "Masq".into(),
                    persistent_secs: Some(600),
                    packets: 0,
                    bytes: 0,
                    new_flows: 0,
                    drops: 0,
                    fail_open: false,
                    backends: vec![
                        b("10.244.1.5", 8080, 100, (16, 12), false, Some(true)),
                        b("10.244.1.9", 8080, 100, (3, 3), true, None),
                    ],
                },
                ServiceView {
                    name: "dns".into(),
                    proto: "udp".into(),
                    vip: "fd00::53".parse().unwrap(),
                    port: 53,
                    scheduler: "rr".into(),
                    forward: "Route".into(),
                    persistent_secs: None,
                    packets: 0,
                    bytes: 0,
                    new_flows: 0,
                    drops: 0,
                    fail_open: false,
                    backends: vec![b("fd00::1:1", 53, 1, (5, 0), false, Some(false))],
                },
            ],
            ..Default::default()
        };
        let want = "\
lb userspace load balancer (tables version 7, connections 15/65536)
Prot LocalAddress:Port Scheduler Flags
  -> RemoteAddress:Port           Forward Weight ActiveConn InActConn
TCP  10.96.12.34:80 wlc persistent 600
  -> 10.244.1.5:8080              Masq    100    12         4
  -> 10.244.1.9:8080              Masq    100    3          0          draining
UDP  [fd00::53]:53 rr
  -> [fd00::1:1]:53               Route   1      0          5          down
";
        assert_eq!(format_ipvsadm(&view), want);
    }

    /// An address that takes the connection but never answers (not the load balancer's metrics
    /// port, or one that hangs) is named as such. It was "cannot reach the load balancer at ...:
    /// Resource temporarily unavailable (os error 11)", the read timeout's errno.
    #[test]
    fn fetch_reports_an_instance_that_does_not_answer() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let err = fetch(addr, Duration::from_millis(200)).unwrap_err().to_string();
        drop(listener);
        assert!(err.contains("no answer within 200ms") && !err.contains("os error"), "{err}");
    }

    #[test]
    fn fetch_reports_unreachable_instance() {
        let err = fetch(crate::lab::unused_loopback(), Duration::from_secs(2)).unwrap_err();
        assert!(err.to_string().contains("cannot reach"), "{err}");
    }
}
