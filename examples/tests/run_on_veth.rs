//! `lb run` on a real interface (a veth in a namespace the test creates and removes): while it runs,
//! the interface's receive VLAN offloads are off, so VLAN tags reach the XDP program and lb-core; on
//! SIGTERM it turns them back on and exits cleanly; when the interface goes away it exits with an
//! error. Needs root (namespaces, XDP, AF_XDP) and ethtool to check with; skips with the reason
//! otherwise.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::io::{BufRead, BufReader, Lines};
use std::path::PathBuf;
use std::process::{Child, ChildStderr, Command, ExitStatus, Stdio};

use lb_io::netns::{Netns, can_create_namespaces, can_run_ethtool, veth_pair};

/// `lb run` in its own namespace on veth `l0` (peer `p0` in another), started.
struct Running {
    lb_ns: Netns,
    peer: Netns,
    child: Child,
    lines: Lines<BufReader<ChildStderr>>,
    log: Vec<String>,
    config: PathBuf,
}

impl Running {
    /// Starts `lb run` with `services` (YAML list items, may be empty) and waits for its log line
    /// saying the loops run (an event, not a delay). `None` (printed) where the kernel refused XDP.
    fn start(tag: &str, services: &str) -> Option<Running> {
        let tag = format!("{tag}{}", std::process::id());
        let (lb_ns, peer) = (Netns::create(&format!("{tag}l")).unwrap(), Netns::create(&format!("{tag}p")).unwrap());
        veth_pair(&lb_ns, "l0", &peer, "p0").unwrap();
        let config = std::env::temp_dir().join(format!("lb-run-{tag}.yaml"));
        std::fs::write(
            &config,
            format!(
                "node: {{ local_mac: \"02:00:00:00:00:01\" }}\ninterfaces: [{{ name: l0, queues: [0] }}]\nservices:\n{services}"
            ),
        )
        .unwrap();
        let mut child = Command::new("ip")
            .args(["netns", "exec", lb_ns.name(), env!("CARGO_BIN_EXE_lb"), "--log", "info", "run", "--config"])
            .arg(&config)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let mut lb = Running { lb_ns, peer, child, lines, log: Vec::new(), config };
        let started = loop {
            let Some(line) = lb.lines.next().map(Result::unwrap) else { break false };
            lb.log.push(line);
            if lb.log.last().unwrap().contains("poll loops running") {
                break true;
            }
        };
        if started {
            return Some(lb);
        }
        let (_, log) = lb.finish();
        if log.contains("Operation not permitted") || log.contains("not supported") {
            println!("SKIPPED: the kernel refused XDP / AF_XDP:\n{log}");
            return None;
        }
        panic!("lb run did not start:\n{log}");
    }

    fn ethtool_says(&self, label: &str) -> String {
        self.lb_ns.ethtool_feature("l0", label).unwrap()
    }

    /// Waits for `lb run` to end (reading its log to the end), and returns how it ended and the log.
    /// The namespaces stay until `self` drops.
    fn finish(&mut self) -> (ExitStatus, String) {
        self.log.extend(self.lines.by_ref().map(Result::unwrap));
        let status = self.child.wait().unwrap();
        let _ = std::fs::remove_file(&self.config);
        (status, self.log.join("\n"))
    }
}

/// A poll loop whose interface goes away (the kernel unbinds its socket) stops `lb run` with an
/// error naming the loop, so a supervisor restarts it, rather than serving on with a dead queue.
#[test]
fn lb_run_exits_with_an_error_when_its_interface_goes_away() {
    if let Err(why) = can_create_namespaces() {
        println!("SKIPPED: {why}");
        return;
    }
    let Some(mut lb) = Running::start("lbg", "") else { return };
    lb.lb_ns.ip(&["link", "del", "l0"]).unwrap();
    // It must end by itself now.
    let (status, log) = lb.finish();
    assert!(!status.success(), "lb run must fail: {status:?}\n{log}");
    assert!(log.contains("poll loop lb-l0-q0 failed"), "{log}");
}

#[test]
fn lb_run_turns_the_receive_vlan_offloads_off_while_it_runs() {
    if let Err(why) = can_create_namespaces().and_then(|()| can_run_ethtool()) {
        println!("SKIPPED: {why}");
        return;
    }
    let service = "  - { name: web, vip: 10.0.0.10, port: 80, mode: dsr, backends: [{ addr: 10.1.0.1, port: 80, mac: \"02:aa:bb:cc:dd:ee\" }] }\n";
    let Some(mut lb) = Running::start("lbr", service) else { return };
    let during = (lb.ethtool_says("rx-vlan-offload"), lb.ethtool_says("rx-vlan-stag-hw-parse"));
    let _ = Command::new("kill").args(["-TERM", &lb.child.id().to_string()]).status();
    let (status, log) = lb.finish();
    assert_eq!(during, ("off".to_string(), "off".to_string()), "while lb run runs:\n{log}");
    assert!(log.contains("receive VLAN offloads turned off"), "{log}");
    assert!(status.success(), "lb run stops cleanly on SIGTERM: {status:?}\n{log}");
    assert_eq!(lb.ethtool_says("rx-vlan-offload"), "on", "turned back on at exit");
    assert_eq!(lb.ethtool_says("rx-vlan-stag-hw-parse"), "on");
    assert_eq!(lb.peer.ethtool_feature("p0", "rx-vlan-offload").unwrap(), "on", "the peer is not touched");
}
