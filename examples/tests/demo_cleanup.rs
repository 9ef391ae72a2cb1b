//! `lb demo` leaves nothing running when it is killed: its backend servers (`lb demo-backend`, one per
//! backend namespace) go with it, even on SIGKILL, which no guard's Drop sees. The namespaces' names
//! a killed run leaves are swept by the next run (`lab::sweep_stale`); a process left inside one
//! would keep it, its veth and its sockets alive out of sight of `ip netns list`.
//!
//! Synchronisation is by events only: the demo prints when its load balancer is attached (every
//! backend has said `ready` by then); the backends inherit the demo's stderr, so reading that pipe
//! to its end waits for the last of them to exit. Needs root (namespaces, XDP, AF_XDP); skips with
//! the reason otherwise.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Read};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use lb_examples::lab::BACKENDS;
use lb_io::netns::can_create_namespaces;

/// The pids `ip netns pids` lists in namespace `name` (none once it is gone).
fn pids_in(name: &str) -> Vec<String> {
    let out = Command::new("ip").args(["netns", "pids", name]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).split_whitespace().map(str::to_string).collect()
}

#[test]
fn a_killed_demo_leaves_no_backend_running() {
    if let Err(why) = can_create_namespaces() {
        println!("SKIPPED: {why}");
        return;
    }
    // More flows than it sends before the kill: the demo is still running when killed.
    let mut demo = Command::new(env!("CARGO_BIN_EXE_lb"))
        .args(["--log", "warn", "demo", "--flows", "1000000"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let tag = format!("lbd{}", demo.id());
    let mut stderr = demo.stderr.take().unwrap();
    let (done_tx, done) = mpsc::channel();
    std::thread::spawn(move || {
        let mut log = String::new();
        let _ = stderr.read_to_string(&mut log);
        let _ = done_tx.send(log);
    });
    let mut attached = false;
    for line in BufReader::new(demo.stdout.take().unwrap()).lines() {
        let line = line.unwrap();
        if line.starts_with("load balancer attached") {
            attached = true;
            break;
        }
    }
    let backends: Vec<(String, Vec<String>)> =
        BACKENDS.iter().map(|b| format!("{tag}-{b}")).map(|ns| (ns.clone(), pids_in(&ns))).collect();
    demo.kill().unwrap();
    demo.wait().unwrap();
    let log = done.recv_timeout(Duration::from_secs(30));
    // What the killed run left: its backends (still running if the test fails) and its namespaces.
    let mut left = Vec::new();
    for (ns, _) in &backends {
        for pid in pids_in(ns) {
            let _ = Command::new("kill").args(["-KILL", &pid]).status();
            left.push(format!("{pid} in {ns}"));
        }
    }
    for role in ["sw", "cl", "lb"].iter().chain(BACKENDS.iter()) {
        let _ = Command::new("ip").args(["netns", "del", &format!("{tag}-{role}")]).status();
    }
    if !attached {
        let log = log.unwrap_or_default();
        if log.contains("Operation not permitted") || log.contains("not supported") {
            println!("SKIPPED: the kernel refused XDP / AF_XDP:\n{log}");
            return;
        }
        panic!("lb demo never attached its load balancer:\n{log}");
    }
    assert!(backends.iter().all(|(_, pids)| !pids.is_empty()), "no backend server was running: {backends:?}");
    assert!(log.is_ok(), "backends of the killed demo still running 30 s after it: {left:?}");
    assert!(left.is_empty(), "backends of the killed demo still running: {left:?}");
}
