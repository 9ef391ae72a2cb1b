//! `lb run` on a real interface (a veth in a namespace the test creates and removes): while it runs,
//! the interface's receive VLAN offloads are off, so VLAN tags reach the XDP program and lb-core; on
//! SIGTERM it turns them back on and exits cleanly; when the interface goes away it exits with an
//! error. Needs root (namespaces, XDP, AF_XDP) and ethtool
//! to check with; skips with the reason otherwise.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use lb_io::netns::{Netns, can_create_namespaces, run, veth_pair};

/// `ethtool -k`'s value for `label` on `dev` in `ns` ("on", "off", "on [fixed]").
fn ethtool_says(ns: &Netns, dev: &str, label: &str) -> String {
    let out = ns.exec("ethtool", &["-k", dev]).unwrap();
    let value = out.lines().find_map(|l| l.trim().strip_prefix(&format!("{label}:")).map(str::trim));
    value.unwrap_or_else(|| panic!("no {label} in {out}")).to_string()
}

/// A poll loop whose interface goes away (the kernel unbinds its socket) stops `lb run` with an
/// error naming the loop, so a supervisor restarts it, rather than serving on with a dead queue.
#[test]
fn lb_run_exits_with_an_error_when_its_interface_goes_away() {
    if let Err(why) = can_create_namespaces() {
        println!("SKIPPED: {why}");
        return;
    }
    let tag = format!("lbg{}", std::process::id());
    let (lb_ns, peer) = (Netns::create(&format!("{tag}l")).unwrap(), Netns::create(&format!("{tag}p")).unwrap());
    veth_pair(&lb_ns, "l0", &peer, "p0").unwrap();
    let path = std::env::temp_dir().join(format!("lb-run-gone-{}.yaml", std::process::id()));
    std::fs::write(&path, "node: { local_mac: \"02:00:00:00:00:01\" }\ninterfaces: [{ name: l0, queues: [0] }]\n")
        .unwrap();
    let mut lb = Command::new("ip")
        .args(["netns", "exec", lb_ns.name(), env!("CARGO_BIN_EXE_lb"), "--log", "info", "run", "--config"])
        .arg(&path)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(lb.stderr.take().unwrap()).lines();
    let mut log = Vec::new();
    let started = loop {
        let Some(line) = lines.next().map(Result::unwrap) else { break false };
        log.push(line);
        if log.last().unwrap().contains("poll loops running") {
            break true;
        }
    };
    if started {
        lb_ns.ip(&["link", "del", "l0"]).unwrap();
    }
    // lb run must end by itself now (reading its stderr to the end waits for that).
    log.extend(lines.map(Result::unwrap));
    let status = lb.wait().unwrap();
    let _ = std::fs::remove_file(&path);
    let log = log.join("\n");
    if !started && (log.contains("Operation not permitted") || log.contains("not supported")) {
        println!("SKIPPED: the kernel refused XDP / AF_XDP:\n{log}");
        return;
    }
    assert!(started, "lb run did not start:\n{log}");
    assert!(!status.success(), "lb run must fail: {status:?}\n{log}");
    assert!(log.contains("poll loop lb-l0-q0 failed"), "{log}");
}

#[test]
fn lb_run_turns_the_receive_vlan_offloads_off_while_it_runs() {
    if let Err(why) = can_create_namespaces() {
        println!("SKIPPED: {why}");
        return;
    }
    if run("ethtool", &["--version"]).is_err() {
        println!("SKIPPED: no ethtool to check with (.ci/run installs it)");
        return;
    }
    let tag = format!("lbr{}", std::process::id());
    let (lb_ns, peer) = (Netns::create(&format!("{tag}l")).unwrap(), Netns::create(&format!("{tag}p")).unwrap());
    veth_pair(&lb_ns, "l0", &peer, "p0").unwrap();
    assert_eq!(ethtool_says(&lb_ns, "l0", "rx-vlan-offload"), "on", "a veth starts with it on");
    let path = std::env::temp_dir().join(format!("lb-run-veth-{}.yaml", std::process::id()));
    std::fs::write(
        &path,
        "node: { local_mac: \"02:00:00:00:00:01\" }\ninterfaces: [{ name: l0, queues: [0] }]\n\
         services:\n  - { name: web, vip: 10.0.0.10, port: 80, mode: dsr, backends: [{ addr: 10.1.0.1, port: 80, mac: \"02:aa:bb:cc:dd:ee\" }] }\n",
    )
    .unwrap();
    let mut lb = Command::new("ip")
        .args(["netns", "exec", lb_ns.name(), env!("CARGO_BIN_EXE_lb"), "--log", "info", "run", "--config"])
        .arg(&path)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait for the log line saying the loops run (an event, not a delay), keeping what was logged.
    let mut lines = BufReader::new(lb.stderr.take().unwrap()).lines();
    let mut log = Vec::new();
    let started = loop {
        let Some(line) = lines.next().map(Result::unwrap) else { break false };
        log.push(line);
        if log.last().unwrap().contains("poll loops running") {
            break true;
        }
    };
    let during = (ethtool_says(&lb_ns, "l0", "rx-vlan-offload"), ethtool_says(&lb_ns, "l0", "rx-vlan-stag-hw-parse"));
    let _ = Command::new("kill").args(["-TERM", &lb.id().to_string()]).status();
    let status = lb.wait().unwrap();
    log.extend(lines.map(Result::unwrap));
    let _ = std::fs::remove_file(&path);
    let log = log.join("\n");
    if !started && (log.contains("Operation not permitted") || log.contains("not supported")) {
        println!("SKIPPED: the kernel refused XDP / AF_XDP:\n{log}");
        return;
    }
    assert!(started, "lb run did not start:\n{log}");
    assert_eq!(during, ("off".to_string(), "off".to_string()), "while lb run runs:\n{log}");
    assert!(log.contains("receive VLAN offloads turned off"), "{log}");
    assert!(status.success(), "lb run stops cleanly on SIGTERM: {status:?}\n{log}");
    assert_eq!(ethtool_says(&lb_ns, "l0", "rx-vlan-offload"), "on", "turned back on at exit");
    assert_eq!(ethtool_says(&lb_ns, "l0", "rx-vlan-stag-hw-parse"), "on");
    assert_eq!(ethtool_says(&peer, "p0", "rx-vlan-offload"), "on", "the peer is not touched");
}
