//! The `lb` binary end to end without NICs: `lb run` with `interfaces: []` builds and serves the
//! tables, `lb list` prints them like `ipvsadm -Ln`, `/metrics` answers, SIGTERM stops it cleanly.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

#[test]
fn run_dry_then_list() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let path = std::env::temp_dir().join(format!("lb-dry-run-{}.yaml", std::process::id()));
    std::fs::write(
        &path,
        format!(
            "node: {{ snat_v4: 10.0.0.2, gateway_mac: \"02:00:00:00:00:fe\" }}\nmetrics: {{ listen: \"127.0.0.1:{port}\" }}\n\
             services:\n  - {{ name: web, vip: 10.0.0.10, port: 80, scheduler: wlc, affinity_timeout: 600, \
             backends: [{{ addr: 10.1.0.1, port: 8080, weight: 3 }}, {{ addr: 10.1.0.2, port: 8080, state: draining }}] }}\n"
        ),
    )
    .unwrap();
    let mut lb = Command::new(env!("CARGO_BIN_EXE_lb"))
        .args(["--log", "info", "run", "--config", path.to_str().unwrap()])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait for the log line saying the endpoint is bound (an event, not a delay).
    let mut lines = BufReader::new(lb.stderr.take().unwrap()).lines();
    let mut said_dry_run = false;
    loop {
        let line = lines.next().expect("lb run exited before serving").unwrap();
        said_dry_run |= line.contains("WARN") && line.contains("no interfaces configured: a dry run");
        if line.contains("serving /metrics and /state") {
            break;
        }
    }
    assert!(said_dry_run, "lb run warns that it serves no packet without interfaces");
    let out = Command::new(env!("CARGO_BIN_EXE_lb"))
        .args(["list", "--endpoint", &format!("127.0.0.1:{port}")])
        .output()
        .unwrap();
    let _ = Command::new("kill").args(["-TERM", &lb.id().to_string()]).status();
    let status = lb.wait().unwrap();
    let _ = std::fs::remove_file(&path);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("TCP  10.0.0.10:80 wlc persistent 600\n"), "{text}");
    assert!(text.contains("  -> 10.1.0.1:8080                Masq    3      0          0\n"), "{text}");
    assert!(text.contains("draining"), "{text}");
    assert!(status.success(), "lb run stops cleanly on SIGTERM: {status:?}");
}
