//! `lb demo` leaves nothing running when it is killed: its backend servers (`lb demo-backend`, one per
//! backend namespace) go with it, even on SIGKILL, which no guard's Drop sees. The namespaces' names
//! a killed run leaves are swept by the next run (`lab::sweep_stale`); a process left inside one
//! would keep it, its veth and its sockets alive out of sight of `ip netns list`. A hang-up (the
//! terminal closed) stops it as Ctrl-C does, removing its namespaces itself.
//!
//! Synchronisation is by events only: the demo prints when its load balancer is attached (every
//! backend has said `ready` by then); the backends inherit the demo's stderr, so reading that pipe
//! to its end waits for the last of them to exit. Needs root (namespaces, XDP, AF_XDP); skips with
//! the reason otherwise.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use lb_examples::lab::BACKENDS;
use lb_io::netns::can_create_namespaces;

/// The pids `ip netns pids` lists in namespace `name` (none once it is gone).
fn pids_in(name: &str) -> Vec<String> {
    let out = Command::new("ip").args(["netns", "pids", name]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).split_whitespace().map(str::to_string).collect()
}

/// Starts `lb demo` with more flows than it sends before the test is done with it, and reads its
/// stdout until its load balancer is attached. Returns the demo, its name tag, the log (its stderr,
/// sent once every holder of the pipe, the demo and its backends, has closed it) and whether it
/// attached (not if its stdout ended first).
fn attached_demo() -> (Child, String, mpsc::Receiver<String>, bool) {
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
        if line.unwrap().starts_with("load balancer attached") {
            attached = true;
            break;
        }
    }
    (demo, tag, done, attached)
}

/// The namespaces named `{tag}-*`.
fn namespaces_of(tag: &str) -> Vec<String> {
    let out = Command::new("ip").args(["netns", "list"]).output().unwrap();
    let prefix = format!("{tag}-");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(&prefix))
        .map(str::to_string)
        .collect()
}

/// Skips (true) where the kernel refused XDP / AF_XDP, else fails: the demo never attached.
fn refused(log: &str) -> bool {
    if log.contains("Operation not permitted") || log.contains("not supported") {
        println!("SKIPPED: the kernel refused XDP / AF_XDP:\n{log}");
        return true;
    }
    panic!("lb demo never attached its load balancer:\n{log}");
}

/// SIGHUP (the terminal closed under a demo run over SSH) stops the demo as Ctrl-C does: it
/// removes its namespaces and exits with an error. SIGHUP's default action ended it at once,
/// leaving its six namespaces, their veths and the XDP program until a later run swept them.
#[test]
fn a_demo_hung_up_on_removes_its_namespaces() {
    if let Err(why) = can_create_namespaces() {
        println!("SKIPPED: {why}");
        return;
    }
    let (mut demo, tag, done, attached) = attached_demo();
    let before = namespaces_of(&tag);
    let _ = Command::new("kill").args(["-HUP", &demo.id().to_string()]).status();
    let status = demo.wait().unwrap();
    let log = done.recv_timeout(Duration::from_secs(30)).unwrap_or_default();
    let left = namespaces_of(&tag);
    for ns in &left {
        let _ = Command::new("ip").args(["netns", "del", ns]).status();
    }
    if !attached && refused(&log) {
        return;
    }
    assert_eq!(before.len(), 6, "the demo's namespaces while it ran: {before:?}");
    assert!(left.is_empty(), "namespaces left after SIGHUP ({status}): {left:?}\n{log}");
    assert_eq!(status.code(), Some(1), "an interrupted demo fails: {status}\n{log}");
}

#[test]
fn a_killed_demo_leaves_no_backend_running() {
    if let Err(why) = can_create_namespaces() {
        println!("SKIPPED: {why}");
        return;
    }
    let (mut demo, tag, done, attached) = attached_demo();
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
    for ns in namespaces_of(&tag) {
        let _ = Command::new("ip").args(["netns", "del", &ns]).status();
    }
    if !attached && refused(&log.clone().unwrap_or_default()) {
        return;
    }
    assert!(backends.iter().all(|(_, pids)| !pids.is_empty()), "no backend server was running: {backends:?}");
    assert!(log.is_ok(), "backends of the killed demo still running 30 s after it: {left:?}");
    assert!(left.is_empty(), "backends of the killed demo still running: {left:?}");
}
