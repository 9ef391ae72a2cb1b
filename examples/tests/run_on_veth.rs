//! `lb run` on a real interface (a veth in a namespace the test creates and removes): while it runs,
//! the interface's receive VLAN offloads are off, so VLAN tags reach the XDP program and lb-core; on
//! SIGTERM it turns them back on and exits cleanly; when the interface goes away it exits with an
//! error. Needs root (namespaces, XDP, AF_XDP) and ethtool to check with; skips with the reason
//! otherwise.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::io::{BufRead, BufReader, Lines};
use std::path::PathBuf;
use std::process::{Child, ChildStderr, Command, ExitStatus, Stdio};

use lb_io::netns::{Netns, can_create_namespaces, can_run_ethtool, lb_and_peer};

/// `<prefix><pid>`: the tag of one test's namespaces (`<tag>l`, `<tag>p`) and configuration file.
/// The tests of this file run in parallel threads of one process, so two sharing a prefix name the
/// same namespaces, and whichever comes second fails, or not, by timing. A prefix taken twice
/// panics, whatever the timing.
fn unique_tag(prefix: &str) -> String {
    static TAKEN: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
    let mut taken = TAKEN.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    assert!(!taken.iter().any(|t| t == prefix), "tag prefix {prefix} is another test's: give this one its own");
    taken.push(prefix.to_string());
    format!("{prefix}{}", std::process::id())
}

/// `lb run` in its own namespace on veth `l0` (peer `p0` in another), started.
struct Running {
    lb_ns: Netns,
    peer: Netns,
    child: Child,
    lines: Lines<BufReader<ChildStderr>>,
    log: Vec<String>,
    config: PathBuf,
}

/// `lb run`'s configuration on the lab's `l0` queue 0: `node_extra` inside the `node:` map (`, key:
/// value`), `services` (YAML list items, may be empty) and `tail` (top-level sections) after them.
fn config_text(node_extra: &str, services: &str, tail: &str) -> String {
    format!(
        "node: {{ local_mac: \"02:00:00:00:00:01\"{node_extra} }}\ninterfaces: [{{ name: l0, queues: [0] }}]\nservices:\n{services}{tail}"
    )
}

impl Running {
    /// Starts `lb run` with `services` (YAML list items, may be empty) and waits for its log line
    /// saying the loops run (an event, not a delay). `None` (printed) where namespaces cannot be
    /// created (not root) or the kernel refused XDP.
    fn start(tag: &str, services: &str) -> Option<Running> {
        Running::start_with(tag, "", services, "")
    }

    /// As [`Running::start`], with `node_extra` inside the `node:` map (`, key: value`) and `tail`
    /// (top-level sections) after the services.
    fn start_with(tag: &str, node_extra: &str, services: &str, tail: &str) -> Option<Running> {
        if let Err(why) = can_create_namespaces() {
            println!("SKIPPED: {why}");
            return None;
        }
        let tag = unique_tag(tag);
        let (lb_ns, peer) = lb_and_peer(&tag).unwrap();
        Running::launch(&tag, lb_ns, peer, &config_text(node_extra, services, tail))
    }

    /// Writes the configuration `text` and spawns `lb run` on it in `lb_ns`, without waiting.
    fn spawn(tag: &str, lb_ns: Netns, peer: Netns, text: &str) -> Running {
        let config = std::env::temp_dir().join(format!("lb-run-{tag}.yaml"));
        std::fs::write(&config, text).unwrap();
        let (child, lines) = spawn_lb_run(&lb_ns, &config);
        Running { lb_ns, peer, child, lines, log: Vec::new(), config }
    }

    /// Starts `lb run` in `lb_ns` with the configuration `text`, as [`Running::start`] does.
    fn launch(tag: &str, lb_ns: Netns, peer: Netns, text: &str) -> Option<Running> {
        let mut lb = Running::spawn(tag, lb_ns, peer, text);
        if started(&mut lb.lines, &mut lb.log) {
            return Some(lb);
        }
        let (_, log) = lb.finish();
        if log.contains("Operation not permitted") || log.contains("not supported") {
            println!("SKIPPED: the kernel refused XDP / AF_XDP:\n{log}");
            return None;
        }
        panic!("lb run did not start:\n{log}");
    }

    /// Reads the log until a line contains `text` (true) or the log ends (false). A watchdog kills
    /// `lb run` after 30 s, which ends the log: it only turns a hang into a failure.
    fn wait_for_log(&mut self, text: &str) -> bool {
        self.wait_for_logs(&[text])
    }

    /// Reads the log until each of `texts` has been in a line, in any order (true), or the log ends
    /// (false); bounded as [`Running::wait_for_log`]. For lines whose order is not fixed: `lb run`
    /// says its services are steered as soon as every loop runs the new tables, which can be before
    /// the control plane says it published them.
    fn wait_for_logs(&mut self, texts: &[&str]) -> bool {
        let pid = self.child.id().to_string();
        let (done, watch) = std::sync::mpsc::channel::<()>();
        let watchdog = std::thread::spawn(move || {
            if watch.recv_timeout(std::time::Duration::from_secs(30)).is_err() {
                let _ = Command::new("kill").args(["-KILL", &pid]).status();
            }
        });
        let mut missing: Vec<&str> = texts.to_vec();
        for line in self.lines.by_ref().map(Result::unwrap) {
            missing.retain(|text| !line.contains(text));
            self.log.push(line);
            if missing.is_empty() {
                break;
            }
        }
        let _ = done.send(());
        let _ = watchdog.join();
        missing.is_empty()
    }

    /// Sends `signal` (`-TERM`, `-KILL`) to `lb run`.
    fn signal(&self, signal: &str) {
        let _ = Command::new("kill").args([signal, &self.child.id().to_string()]).status();
    }

    fn ethtool_says(&self, label: &str) -> String {
        self.lb_ns.ethtool_feature("l0", label).unwrap()
    }

    /// Waits for `lb run` to end (reading its log to the end), and returns how it ended and the log.
    /// The namespaces and the configuration file stay until `self` drops.
    fn finish(&mut self) -> (ExitStatus, String) {
        self.log.extend(self.lines.by_ref().map(Result::unwrap));
        let status = self.child.wait().unwrap();
        (status, self.log.join("\n"))
    }
}

/// `lb run --config config` in `ns`, its log (stderr) read line by line.
fn spawn_lb_run(ns: &Netns, config: &std::path::Path) -> (Child, Lines<BufReader<ChildStderr>>) {
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns.name(), env!("CARGO_BIN_EXE_lb"), "--log", "info", "run", "--config"])
        .arg(config)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let lines = BufReader::new(child.stderr.take().unwrap()).lines();
    (child, lines)
}

/// Reads `lines` into `log` until `lb run` says its loops run (true) or its log ends (false).
fn started(lines: &mut Lines<BufReader<ChildStderr>>, log: &mut Vec<String>) -> bool {
    for line in lines.map(Result::unwrap) {
        let running = line.contains("poll loops running");
        log.push(line);
        if running {
            return true;
        }
    }
    false
}

/// `line` without its ANSI colour sequences (`ESC [ ... m`), as a field reads: `loops=1`.
fn plain(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            chars.by_ref().find(|&c| c == 'm');
        } else {
            out.push(c);
        }
    }
    out
}

/// A test that fails part-way leaves no `lb run` behind (it would hold its namespace's interfaces).
/// Kills `lb run` if it still runs and removes its configuration file, also when the test failed.
impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.config);
    }
}

/// A poll loop whose interface goes away (the kernel unbinds its socket) stops `lb run` with an
/// error naming the loop, so a supervisor restarts it, rather than serving on with a dead queue.
#[test]
fn lb_run_exits_with_an_error_when_its_interface_goes_away() {
    let Some(mut lb) = Running::start("lbg", "") else { return };
    lb.lb_ns.ip(&["link", "del", "l0"]).unwrap();
    // It must end by itself now.
    let (status, log) = lb.finish();
    assert!(!status.success(), "lb run must fail: {status:?}\n{log}");
    assert!(log.contains("poll loop lb-l0-q0 failed"), "{log}");
}

/// A veth pair `m0` / `m1` inside `ns`, `queues` receive and transmit queues each, both up.
fn multi_queue_veth(ns: &Netns, queues: &str) {
    let q = ["numtxqueues", queues, "numrxqueues", queues];
    let add = [["link", "add", "m0"].as_slice(), &q, &["type", "veth", "peer", "name", "m1"], &q].concat();
    ns.ip(&add).unwrap();
    ns.ip(&["link", "set", "m0", "up"]).unwrap();
    ns.ip(&["link", "set", "m1", "up"]).unwrap();
}

/// A queue index the configuration allows (a NIC with more than 64 queues, serving queue 100)
/// gets its socket into the XDP program's queue map: the map is sized for the queues served, and
/// `lb run` starts.
#[test]
fn lb_run_serves_a_queue_above_63() {
    if let Err(why) = can_create_namespaces() {
        println!("SKIPPED: {why}");
        return;
    }
    let tag = unique_tag("lbq");
    let (lb_ns, peer) = lb_and_peer(&tag).unwrap();
    multi_queue_veth(&lb_ns, "128");
    let text = "node: { local_mac: \"02:00:00:00:00:01\" }\ninterfaces: [{ name: m0, queues: [100] }]\nservices: []\n";
    let Some(mut lb) = Running::launch(&tag, lb_ns, peer, text) else { return };
    let _ = Command::new("kill").args(["-TERM", &lb.child.id().to_string()]).status();
    let (status, log) = lb.finish();
    assert!(status.success(), "lb run stops cleanly on SIGTERM: {status:?}\n{log}");
}

/// A queue the interface does not have (a typo: 4294967295) is refused at start by its socket's
/// bind, naming the interface and the queue, before the steering program sizes a map for it.
#[test]
fn lb_run_names_a_queue_the_interface_does_not_have() {
    if let Err(why) = can_create_namespaces() {
        println!("SKIPPED: {why}");
        return;
    }
    let log = start_refused("lbn", "[4294967295]");
    let error = log.lines().find(|l| l.starts_with("error")).unwrap_or_default();
    assert!(error.contains("l0") && error.contains("4294967295"), "{log}");
}

/// Runs `lb run` on `l0` (in a namespace of its own, tagged `tag`) with `queues`, asserts it failed
/// to start, and returns its log.
fn start_refused(tag: &str, queues: &str) -> String {
    let tag = unique_tag(tag);
    let (lb_ns, _peer) = lb_and_peer(&tag).unwrap();
    let config = std::env::temp_dir().join(format!("lb-run-{tag}.yaml"));
    let text = format!(
        "node: {{ local_mac: \"02:00:00:00:00:01\" }}\ninterfaces: [{{ name: l0, queues: {queues} }}]\nservices: []\n"
    );
    std::fs::write(&config, text).unwrap();
    let (mut child, mut lines) = spawn_lb_run(&lb_ns, &config);
    let mut log = Vec::new();
    let running = started(&mut lines, &mut log);
    if running {
        let _ = child.kill();
    }
    let status = child.wait().unwrap();
    let _ = std::fs::remove_file(&config);
    let log = log.join("\n");
    assert!(!running && !status.success(), "{log}");
    log
}

/// A queue that cannot be served after another's loop started (the second of `queues: [0,
/// 4294967295]`) fails the start naming it, and the loop already started is stopped and joined, its
/// counts logged, before `lb run` exits. Before, it ran on until the process exited, under the
/// offloads turned back on as `lb run` returned, and its counts were never logged.
#[test]
fn a_queue_failing_after_a_loop_started_stops_that_loop_and_logs_its_counts() {
    if let Err(why) = can_create_namespaces() {
        println!("SKIPPED: {why}");
        return;
    }
    let log = start_refused("lbf", "[0, 4294967295]");
    let error = log.lines().find(|l| l.starts_with("error")).unwrap_or_default();
    assert!(error.contains("l0") && error.contains("4294967295"), "{log}");
    assert!(log.lines().map(plain).any(|l| l.contains("poll loops ended") && l.contains(" loops=1 ")), "{log}");
}

/// A second `lb run` on the queue one already serves fails at once, saying why. After the first is
/// killed (SIGKILL: no clean-up of its own), its XDP program is gone from the interface and its
/// socket from the queue, so `lb run` started again (a supervisor's restart) serves it.
#[test]
fn after_a_sigkill_lb_run_starts_again_on_the_same_interface() {
    if let Err(why) = can_create_namespaces() {
        println!("SKIPPED: {why}");
        return;
    }
    let tag = unique_tag("lbx");
    let (lb_ns, peer) = lb_and_peer(&tag).unwrap();
    let text = "node: { local_mac: \"02:00:00:00:00:01\" }\ninterfaces: [{ name: l0, queues: [0] }]\nservices:\n  - { name: web, vip: 10.0.0.10, port: 80, mode: dsr, backends: [{ addr: 10.1.0.1, port: 80, mac: \"02:aa:bb:cc:dd:ee\" }] }\n";
    let Some(mut first) = Running::launch(&tag, lb_ns, peer, text) else { return };
    let xdp_on_l0 = |ns: &Netns| ns.ip(&["-d", "link", "show", "l0"]).unwrap().contains("xdp");
    assert!(xdp_on_l0(&first.lb_ns), "the steering program is attached while lb run runs");

    let (mut beside, mut lines) = spawn_lb_run(&first.lb_ns, &first.config);
    let mut log = Vec::new();
    if started(&mut lines, &mut log) {
        let _ = beside.kill();
        panic!("a second lb run started on a queue the first serves:\n{}", log.join("\n"));
    }
    let status = beside.wait().unwrap();
    let log = log.join("\n");
    assert!(!status.success() && log.contains("l0") && log.contains("another socket is bound"), "{log}");

    first.signal("-KILL");
    first.child.wait().unwrap();
    assert!(!xdp_on_l0(&first.lb_ns), "the kernel detached the program of the killed lb run");
    // Started again in its place.
    let mut again = first;
    (again.child, again.lines) = spawn_lb_run(&again.lb_ns, &again.config);
    again.log.clear();
    assert!(started(&mut again.lines, &mut again.log), "{}", again.log.join("\n"));
    assert!(xdp_on_l0(&again.lb_ns));
    again.signal("-TERM");
    let (status, log) = again.finish();
    assert!(status.success(), "{log}");
    assert!(!xdp_on_l0(&again.lb_ns), "detached at a clean exit");
}

/// A second `lb run` on another queue of an interface the first serves binds its socket, but the
/// interface already has the first one's XDP program: it fails at start, naming the interface and
/// the reason, and the first keeps its program.
#[test]
fn a_second_lb_run_on_another_queue_of_the_interface_fails_naming_it() {
    if let Err(why) = can_create_namespaces() {
        println!("SKIPPED: {why}");
        return;
    }
    let tag = unique_tag("lbo");
    let (lb_ns, peer) = lb_and_peer(&tag).unwrap();
    multi_queue_veth(&lb_ns, "2");
    let config = |q: u32| {
        format!(
            "node: {{ local_mac: \"02:00:00:00:00:01\" }}\ninterfaces: [{{ name: m0, queues: [{q}] }}]\nservices: []\n"
        )
    };
    let Some(mut first) = Running::launch(&tag, lb_ns, peer, &config(0)) else { return };
    let other = std::env::temp_dir().join(format!("lb-run-{tag}-q1.yaml"));
    std::fs::write(&other, config(1)).unwrap();
    let (mut beside, mut lines) = spawn_lb_run(&first.lb_ns, &other);
    let mut log = Vec::new();
    let running = started(&mut lines, &mut log);
    if running {
        let _ = beside.kill();
    }
    let status = beside.wait().unwrap();
    let _ = std::fs::remove_file(&other);
    let log = log.join("\n");
    assert!(!running && !status.success(), "a second program on m0:\n{log}");
    let error = log.lines().find(|l| l.starts_with("error")).unwrap_or_default();
    assert!(error.contains("m0") && error.contains("another XDP program"), "{log}");
    // Its loop, started before the attach failed, was stopped and joined, its counts logged.
    assert!(log.lines().map(plain).any(|l| l.contains("poll loops ended") && l.contains(" loops=1 ")), "{log}");
    first.signal("-TERM");
    let (status, log) = first.finish();
    assert!(status.success(), "{log}");
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

/// SIGTERM while the control plane is still starting (here: reading its kubeconfig, a FIFO the test
/// writes only after the signal) stops `lb run` cleanly once it has started: the poll loops stop on
/// the signal at once, and the control plane must not wait for a second one.
#[test]
fn lb_run_stops_on_a_sigterm_that_comes_while_the_control_plane_starts() {
    use std::io::Write;
    use std::sync::mpsc;
    use std::time::Duration;
    if let Err(why) = can_create_namespaces() {
        println!("SKIPPED: {why}");
        return;
    }
    let fifo = std::env::temp_dir().join(format!("lb-run-kubeconfig-{}", std::process::id()));
    let _ = std::fs::remove_file(&fifo);
    let path = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: a NUL-terminated path that lives across the call.
    assert_eq!(unsafe { libc::mkfifo(path.as_ptr(), 0o600) }, 0, "mkfifo {}", fifo.display());
    let tail = format!("kubernetes: {{ kubeconfig: {}, node_name: node-a }}\n", fifo.display());
    let Some(mut lb) = Running::start_with("lbk", ", gateway_mac: \"02:00:00:00:00:fe\"", "", &tail) else {
        let _ = std::fs::remove_file(&fifo);
        return;
    };
    // Opening the FIFO for writing returns once `lb run` has opened it to read the kubeconfig: its
    // control plane is starting, before it waits for signals.
    let (opened_tx, opened) = mpsc::channel();
    let writer_path = fifo.clone();
    std::thread::spawn(move || {
        let _ = opened_tx.send(std::fs::OpenOptions::new().write(true).open(writer_path));
    });
    let mut writer = opened.recv_timeout(Duration::from_secs(30)).expect("lb run never read its kubeconfig").unwrap();
    let _ = Command::new("kill").args(["-TERM", &lb.child.id().to_string()]).status();
    writer
        .write_all(
            b"apiVersion: v1\nkind: Config\nclusters: [{ name: c, cluster: { server: \"https://127.0.0.1:1\" } }]\n\
              users: [{ name: u, user: { token: t } }]\ncontexts: [{ name: x, context: { cluster: c, user: u } }]\n\
              current-context: x\n",
        )
        .unwrap();
    drop(writer);
    let _ = std::fs::remove_file(&fifo);
    // `finish` in a thread: a deadline for the verdict, not a delay.
    let pid = lb.child.id();
    let (done_tx, done) = mpsc::channel();
    let waiter = std::thread::spawn(move || {
        let r = lb.finish();
        let _ = done_tx.send(r);
        lb
    });
    let Ok((status, log)) = done.recv_timeout(Duration::from_secs(30)) else {
        let _ = Command::new("kill").args(["-KILL", &pid.to_string()]).status();
        let (_, log) = done.recv().unwrap();
        drop(waiter.join());
        panic!("lb run was still running 30 s after SIGTERM:\n{log}");
    };
    drop(waiter.join());
    assert!(status.success(), "lb run stops cleanly on SIGTERM: {status:?}\n{log}");
}

/// An address the node takes after `lb run` started (a VIP moved onto it by kube-vip or a cloud
/// agent) is marked as the host's at the next refresh, with no configuration change: the node's
/// own fragmented datagram to it then reaches the kernel whole, which answers it (here: port
/// unreachable, so the sender's socket is refused). Before, its fragments went on being steered to
/// lb-core, which drops fragments, until the next configuration change: the sender timed out.
#[test]
fn an_address_the_node_takes_later_is_marked_as_the_hosts() {
    let service = "  - { name: web, vip: 10.9.9.9, port: 80, mode: dsr, backends: [{ addr: 10.1.0.1, port: 80, mac: \"02:aa:bb:cc:dd:ee\" }] }\n";
    let Some(mut lb) = Running::start("lbh", service) else { return };
    lb.lb_ns.ip(&["addr", "add", "10.50.0.1/24", "dev", "l0"]).unwrap();
    lb.peer.ip(&["addr", "add", "10.50.0.2/24", "dev", "p0"]).unwrap();
    lb.peer.ip(&["route", "add", "10.9.9.9/32", "via", "10.50.0.1"]).unwrap();
    // Taken once the service is steered (its steering waits for the poll loop to run its tables,
    // and would mark the address at once if the node held it by then).
    assert!(lb.wait_for_log("their services are steered"), "{}", lb.log.join("\n"));
    lb.lb_ns.ip(&["addr", "add", "10.9.9.9/32", "dev", "l0"]).unwrap();
    assert!(lb.wait_for_log("steering updated"), "no refresh of the host marks:\n{}", lb.log.join("\n"));
    // 3000 bytes of UDP over a 1500-byte MTU leave the peer in fragments.
    let probe = "import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\ns.connect(('10.9.9.9', 9999))\n\
                 s.send(b'x' * 3000)\ns.settimeout(5)\ntry:\n    s.recv(100)\n    print('answered')\n\
                 except ConnectionRefusedError:\n    print('refused')\nexcept socket.timeout:\n    print('timeout')\n";
    let out = lb.peer.exec("python3", &["-c", probe]).unwrap();
    assert_eq!(out.trim(), "refused", "the kernel did not get the datagram whole");
    lb.signal("-TERM");
    let (status, log) = lb.finish();
    assert!(status.success(), "{status:?}\n{log}");
}

/// A run killed with SIGKILL cannot turn the receive VLAN offloads back on; the next `lb run` on the
/// interface takes that over from the record the killed one left (under /run/lb), and turns them on
/// at its clean exit. Before, the next run found them off, left them off, and so did every run after.
#[test]
fn offloads_a_killed_lb_run_left_off_are_turned_on_by_the_next_at_its_exit() {
    if let Err(why) = can_create_namespaces().and_then(|()| can_run_ethtool()) {
        println!("SKIPPED: {why}");
        return;
    }
    let service = "  - { name: web, vip: 10.0.0.10, port: 80, mode: dsr, backends: [{ addr: 10.1.0.1, port: 80, mac: \"02:aa:bb:cc:dd:ee\" }] }\n";
    let Some(mut first) = Running::start("lbv", service) else { return };
    assert_eq!(first.ethtool_says("rx-vlan-offload"), "off");
    first.signal("-KILL");
    first.child.wait().unwrap();
    assert_eq!(first.ethtool_says("rx-vlan-offload"), "off", "a killed run leaves them off");
    let mut again = first;
    (again.child, again.lines) = spawn_lb_run(&again.lb_ns, &again.config);
    again.log.clear();
    assert!(started(&mut again.lines, &mut again.log), "{}", again.log.join("\n"));
    assert_eq!(again.ethtool_says("rx-vlan-offload"), "off");
    again.signal("-TERM");
    let (status, log) = again.finish();
    assert!(status.success(), "{log}");
    assert_eq!(again.ethtool_says("rx-vlan-offload"), "on", "turned on at the next run's exit:\n{log}");
    assert_eq!(again.ethtool_says("rx-vlan-stag-hw-parse"), "on");
}

/// A SIGHUP while `lb run` starts (a reloader signalling as the pod comes up: here, once it has
/// turned the interface's VLAN offloads off, before its control plane listens for SIGHUP) does not
/// end it: it starts, serves, and on SIGTERM turns the offloads back on. Before, SIGHUP's default
/// action killed it there, leaving the offloads off.
#[test]
fn a_sighup_while_lb_run_starts_does_not_kill_it() {
    if let Err(why) = can_create_namespaces().and_then(|()| can_run_ethtool()) {
        println!("SKIPPED: {why}");
        return;
    }
    let tag = unique_tag("lbu");
    let (lb_ns, peer) = lb_and_peer(&tag).unwrap();
    let mut lb = Running::spawn(&tag, lb_ns, peer, &config_text("", "", ""));
    if !lb.wait_for_log("receive VLAN offloads turned off") {
        let (_, log) = lb.finish();
        println!("SKIPPED: no receive VLAN offload turned off on the veth:\n{log}");
        return;
    }
    lb.signal("-HUP");
    let running = started(&mut lb.lines, &mut lb.log);
    if !running {
        let (status, log) = lb.finish();
        if log.contains("Operation not permitted") || log.contains("not supported") {
            println!("SKIPPED: the kernel refused XDP / AF_XDP:\n{log}");
            return;
        }
        panic!("lb run did not survive a SIGHUP while starting: {status:?}\n{log}");
    }
    lb.signal("-TERM");
    let (status, log) = lb.finish();
    assert!(status.success(), "lb run stops cleanly on SIGTERM: {status:?}\n{log}");
    assert_eq!(lb.ethtool_says("rx-vlan-offload"), "on", "turned back on at exit:\n{log}");
}

/// A `--conntrack-entries` whose tables no memory holds (2^40 entries: tens of terabytes) is refused
/// at start, naming the option, before the interface is touched. Before, the allocation failed half
/// set up: `lb run` aborted ("memory allocation of ... bytes failed"), the offloads left off.
#[test]
fn conntrack_tables_larger_than_memory_are_refused_naming_the_option() {
    if let Err(why) = can_create_namespaces().and_then(|()| can_run_ethtool()) {
        println!("SKIPPED: {why}");
        return;
    }
    let tag = unique_tag("lbc");
    let (lb_ns, _peer) = lb_and_peer(&tag).unwrap();
    let config = std::env::temp_dir().join(format!("lb-run-{tag}.yaml"));
    std::fs::write(&config, config_text("", "", "")).unwrap();
    let out = Command::new("ip")
        .args(["netns", "exec", lb_ns.name(), env!("CARGO_BIN_EXE_lb"), "run", "--conntrack-entries"])
        .arg((1u64 << 40).to_string())
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&config);
    let log = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{log}");
    let error = log.lines().find(|l| l.starts_with("error")).unwrap_or_default();
    assert!(error.contains("--conntrack-entries"), "{log}");
    assert_eq!(lb_ns.ethtool_feature("l0", "rx-vlan-offload").unwrap(), "on", "{log}");
}

/// `--maglev-entries` is the budget the file's tables are built within: a file whose Maglev table
/// (mh at its default 65 537 entries) is over it is refused at start, naming the limit, and one that
/// memory cannot hold is refused naming the option, before the interface is touched. Before, the
/// budget could not be set: it was lb-core's default or half the memory, whatever the operator knew.
#[test]
fn the_maglev_budget_asked_for_bounds_the_files_tables() {
    if let Err(why) = can_create_namespaces().and_then(|()| can_run_ethtool()) {
        println!("SKIPPED: {why}");
        return;
    }
    let tag = unique_tag("lbmb");
    let (lb_ns, _peer) = lb_and_peer(&tag).unwrap();
    let config = std::env::temp_dir().join(format!("lb-run-{tag}.yaml"));
    let service = "  - { name: web, vip: 10.9.9.9, port: 80, protocol: tcp, mode: dsr, scheduler: mh, backends: [{ addr: 10.1.0.1, port: 80, mac: \"02:aa:bb:cc:dd:01\" }] }\n";
    std::fs::write(&config, config_text("", service, "")).unwrap();
    let run = |entries: &str| {
        let out = Command::new("ip")
            .args(["netns", "exec", lb_ns.name(), env!("CARGO_BIN_EXE_lb"), "run", "--maglev-entries", entries])
            .arg("--config")
            .arg(&config)
            .output()
            .unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let (code, log) = run("1000");
    let (huge, huge_log) = run(&(1u64 << 50).to_string());
    let _ = std::fs::remove_file(&config);
    assert_eq!(code, Some(1), "{log}");
    let error = log.lines().find(|l| l.starts_with("error")).unwrap_or_default();
    assert!(error.contains("max_maglev_entries") && error.contains("1000"), "{log}");
    assert_eq!(huge, Some(1), "{huge_log}");
    let error = huge_log.lines().find(|l| l.starts_with("error")).unwrap_or_default();
    assert!(error.contains("--maglev-entries"), "{huge_log}");
    assert_eq!(lb_ns.ethtool_feature("l0", "rx-vlan-offload").unwrap(), "on", "{huge_log}");
}

/// `lb run` sends the frames it forwards from its interface's own MAC, not from `node.local_mac`
/// (here the lab's 02:00:00:00:00:01, as deploy/'s ConfigMap gives every node): one MAC seen on
/// every node's switch port, and dropped where the network checks a port's source MAC (cloud VPCs,
/// hypervisors refusing forged transmits).
#[test]
fn lb_run_forwards_from_its_interfaces_own_mac() {
    let service = "  - { name: dns, vip: 10.9.9.9, port: 53, protocol: udp, mode: dsr, backends: [{ addr: 10.1.0.1, port: 53, mac: \"02:aa:bb:cc:dd:ee\" }] }\n";
    let Some(mut lb) = Running::start("lbm", service) else { return };
    assert!(lb.wait_for_log("tables published to workers"), "{}", lb.log.join("\n"));
    let l0 = lb_io::netns::format_mac(lb.lb_ns.mac("l0").unwrap());
    assert_ne!(l0, "02:00:00:00:00:01");
    lb.lb_ns.ip(&["addr", "add", "10.50.0.1/24", "dev", "l0"]).unwrap();
    lb.peer.ip(&["addr", "add", "10.50.0.2/24", "dev", "p0"]).unwrap();
    lb.peer.ip(&["route", "add", "10.9.9.9/32", "via", "10.50.0.1"]).unwrap();
    // The peer sends to the VIP and captures on p0 the frame forwarded to the backend's MAC.
    let frame = lb_examples::lab::first_forwarded_frame(
        &lb.peer,
        "p0",
        [10, 9, 9, 9].into(),
        53,
        [2, 0xaa, 0xbb, 0xcc, 0xdd, 0xee],
    );
    lb.signal("-TERM");
    let (status, log) = lb.finish();
    let source = frame.as_deref().and_then(|f| <[u8; 6]>::try_from(f.get(6..12)?).ok()).map(lb_io::netns::format_mac);
    assert_eq!(source, Some(l0), "the forwarded frame's source MAC\n{log}");
    assert!(status.success(), "{status:?}\n{log}");
}

/// An interface of the file that does not exist (a typo, or one not yet renamed by udev) after one
/// that does fails the start naming it, before any interface is touched. Before, the interfaces
/// before it were set up first, then torn down: their receive VLAN offloads turned off and on and
/// the XDP program attached and detached, each of which resets the rings of many NICs (the node's
/// link down for a moment), again at every restart of a crash-looping DaemonSet; and the error said
/// "interface nosuch0 has no Ethernet address", as if it existed.
#[test]
fn an_interface_that_does_not_exist_fails_the_start_before_any_is_touched() {
    if let Err(why) = can_create_namespaces().and_then(|()| can_run_ethtool()) {
        println!("SKIPPED: {why}");
        return;
    }
    let tag = unique_tag("lbi");
    let (lb_ns, peer) = lb_and_peer(&tag).unwrap();
    let text = "node: { local_mac: \"02:00:00:00:00:01\" }\n\
                interfaces: [{ name: l0, queues: [0] }, { name: nosuch0, queues: [0] }]\nservices: []\n";
    let mut lb = Running::spawn(&tag, lb_ns, peer, text);
    let (status, log) = lb.finish();
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(log.contains("error: interfaces[1]: no interface nosuch0"), "{log}");
    for touched in ["receive VLAN offloads", "AF_XDP socket bound", "frames leave l0"] {
        assert!(!log.contains(touched), "l0 was set up ({touched:?}):\n{log}");
    }
    assert_eq!(lb.ethtool_says("rx-vlan-offload"), "on");
}

/// `ip monitor link` in a namespace, its lines sent to `events`; ended when dropped.
struct LinkMonitor {
    child: Child,
    events: std::sync::mpsc::Receiver<String>,
}

impl LinkMonitor {
    /// Starts one in `ns` and returns it once it listens (it printed an MTU change of `m1`).
    fn start(ns: &Netns) -> LinkMonitor {
        let mut child =
            Command::new("ip").args(["-n", ns.name(), "monitor", "link"]).stdout(Stdio::piped()).spawn().unwrap();
        let out = BufReader::new(child.stdout.take().unwrap());
        let (tx, events) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in out.lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let monitor = LinkMonitor { child, events };
        for i in 0..100 {
            ns.ip(&["link", "set", "m1", "mtu", &(1400 + i).to_string()]).unwrap();
            // Pacing only: the change is made again until the monitor, which may not listen yet, shows one.
            if monitor.events.recv_timeout(std::time::Duration::from_millis(100)).is_ok() {
                return monitor;
            }
        }
        panic!("ip monitor printed nothing");
    }
}

impl Drop for LinkMonitor {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A queue of a later interface that cannot be opened (the interface has fewer queues) fails the
/// start before the XDP program is attached to any interface: attaching and detaching it resets
/// the rings of many NICs (the node's link down for a moment), at every restart of a crash-looping
/// DaemonSet. Before, each interface's program was attached as soon as its sockets were open, so
/// the first interface had it (seen in its link events) when the second failed.
#[test]
fn a_later_interface_that_fails_to_open_leaves_no_program_attached_meanwhile() {
    if let Err(why) = can_create_namespaces().and_then(|()| can_run_ethtool()) {
        println!("SKIPPED: {why}");
        return;
    }
    let tag = unique_tag("lbw");
    let (lb_ns, peer) = lb_and_peer(&tag).unwrap();
    multi_queue_veth(&lb_ns, "1");
    let monitor = LinkMonitor::start(&lb_ns);
    let text = "node: { local_mac: \"02:00:00:00:00:01\" }\n\
                interfaces: [{ name: l0, queues: [0] }, { name: m0, queues: [9] }]\nservices: []\n";
    let mut lb = Running::spawn(&tag, lb_ns, peer, text);
    let (status, log) = lb.finish();
    // Every event before this one has been printed once this one is.
    lb.lb_ns.ip(&["link", "set", "m1", "mtu", "1300"]).unwrap();
    let mut l0 = Vec::new();
    loop {
        // (A bound that only turns a hang into a failure.)
        let line =
            monitor.events.recv_timeout(std::time::Duration::from_secs(10)).expect("the monitor shows the last change");
        if line.contains(": m1@") && line.contains("mtu 1300 ") {
            break;
        }
        if line.contains(": l0@") {
            l0.push(line);
        }
    }
    drop(monitor);
    if log.contains("Operation not permitted") || log.contains("not supported") {
        println!("SKIPPED: the kernel refused XDP / AF_XDP:\n{log}");
        return;
    }
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(log.contains("error: bind on m0 queue 9 failed"), "{log}");
    assert!(!l0.is_empty(), "l0's offloads were turned off and on again: events seen\n{log}");
    assert!(l0.iter().all(|e| !e.contains("xdp")), "an XDP program was attached to l0:\n{l0:#?}\n{log}");
}

/// Sends one frame from the peer's `p0` and reports what became of it, as the peer sees it on the
/// wire: `udp ADDR PORT` sends one datagram, `tcp ADDR PORT` one connection attempt (the kernel
/// retransmits its SYN a second later, counted). Prints `forwarded after N SYN` (or `forwarded`)
/// once a frame to the backend's MAC 02:aa:bb:cc:dd:ee appears, `refused after N SYN` once a reset
/// comes back, or `nothing` after 10 s (a bound, not a wait: the answers are events).
const PROBE: &str = r"
import socket, sys, time
proto, dst, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
r = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
r.bind(('p0', 0))
r.settimeout(0.2)
if proto == 'udp':
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.sendto(b'q', (dst, port))
else:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setblocking(False)
    s.connect_ex((dst, port))
syns = 0
end = time.time() + 10
while time.time() < end:
    try:
        f, addr = r.recvfrom(2048)
    except socket.timeout:
        continue
    if f[:6] == bytes.fromhex('02aabbccddee'):
        print('forwarded' if proto == 'udp' else 'forwarded after %d SYN' % syns)
        raise SystemExit
    if f[12:14] != b'\x08\x00' or f[23] != 6:
        continue
    l4 = 14 + (f[14] & 15) * 4
    flags = f[l4 + 13]
    if addr[2] == socket.PACKET_OUTGOING and flags & 2 and int.from_bytes(f[l4 + 2:l4 + 4], 'big') == port:
        syns += 1
    elif addr[2] != socket.PACKET_OUTGOING and flags & 4 and int.from_bytes(f[l4:l4 + 2], 'big') == port:
        print('refused after %d SYN' % syns)
        raise SystemExit
print('nothing')
";

/// A service a reload adds is served from its first frame, and a NodePort a reload removes is the
/// kernel's from its first SYN (refused at once, not lost): the steering follows the tables every
/// poll loop has swapped in (see `lb run`'s module comment), and the log says when it does. A smoke
/// test: the window in which the old order lost such frames is too narrow to hit on purpose (the
/// unit tests in `cmd::run` pin the order down).
#[test]
fn a_reload_steers_what_it_adds_from_the_first_frame_and_unsteers_what_it_removes() {
    let dns = "  - { name: dns, vip: 10.9.9.9, port: 53, protocol: udp, mode: dsr, backends: [{ addr: 10.1.0.1, port: 53, mac: \"02:aa:bb:cc:dd:ee\" }] }\n";
    let added = "  - { name: dns2, vip: 10.9.9.10, port: 53, protocol: udp, mode: dsr, backends: [{ addr: 10.1.0.1, port: 53, mac: \"02:aa:bb:cc:dd:ee\" }] }\n  - { name: nodeport, vip: 10.50.0.1, port: 30080, mode: dsr, backends: [{ addr: 10.1.0.1, port: 30080, mac: \"02:aa:bb:cc:dd:ee\" }] }\n";
    let steered = "every poll loop runs the new tables: their services are steered";
    let Some(mut lb) = Running::start("lbrl", dns) else { return };
    lb.lb_ns.ip(&["addr", "add", "10.50.0.1/24", "dev", "l0"]).unwrap();
    lb.peer.ip(&["addr", "add", "10.50.0.2/24", "dev", "p0"]).unwrap();
    lb.peer.ip(&["route", "add", "10.9.9.0/24", "via", "10.50.0.1"]).unwrap();
    assert!(lb.wait_for_log(steered), "{}", lb.log.join("\n"));
    let reload = |lb: &mut Running, services: &str| {
        let tmp = lb.config.with_extension("new");
        std::fs::write(&tmp, config_text("", services, "")).unwrap();
        std::fs::rename(&tmp, &lb.config).unwrap();
        lb.signal("-HUP");
        assert!(lb.wait_for_logs(&["tables published to workers", steered]), "{}", lb.log.join("\n"));
    };
    let probe = |lb: &Running, proto: &str, dst: &str, port: &str| {
        lb.peer.exec("python3", &["-c", PROBE, proto, dst, port]).unwrap().trim().to_string()
    };

    reload(&mut lb, &format!("{dns}{added}"));
    let new_udp = probe(&lb, "udp", "10.9.9.10", "53");
    let new_tcp = probe(&lb, "tcp", "10.50.0.1", "30080");
    reload(&mut lb, dns);
    let removed = probe(&lb, "tcp", "10.50.0.1", "30080");
    let kept = probe(&lb, "udp", "10.9.9.9", "53");
    lb.signal("-TERM");
    let (status, log) = lb.finish();
    assert_eq!(new_udp, "forwarded", "the added service's first datagram\n{log}");
    assert_eq!(new_tcp, "forwarded after 1 SYN", "the added NodePort's first SYN\n{log}");
    assert_eq!(removed, "refused after 1 SYN", "the removed NodePort's first SYN\n{log}");
    assert_eq!(kept, "forwarded", "the service both configurations have\n{log}");
    assert!(status.success(), "{status:?}\n{log}");
}

/// Receive queues an interface gains while `lb run` runs (`ethtool -L IF rx N`, as an engineer
/// spreads a NIC's load over more cores) get frames no poll loop serves: the XDP program finds no
/// socket there and passes them to the kernel, which knows no VIP, so the flows RSS puts there are
/// lost. `lb run` warns, naming the interface and the queues, as it does at start. Before, it said
/// nothing: on this veth, 27 of 40 established UDP flows went unanswered after `ethtool -L l0 rx 4`
/// while the log and the metrics looked as before.
#[test]
fn receive_queues_an_interface_gains_while_lb_run_runs_are_warned_of() {
    if let Err(why) = can_create_namespaces().and_then(|()| can_run_ethtool()) {
        println!("SKIPPED: {why}");
        return;
    }
    let tag = unique_tag("lbch");
    let peer = Netns::create(&format!("{tag}p")).unwrap();
    let lb_ns = Netns::create(&format!("{tag}l")).unwrap();
    // l0 has room for four receive queues and uses one; the peer sends on one (the veth's XDP wants
    // no more transmit queues on the peer than receive queues on l0).
    lb_ns
        .ip(&[
            "link",
            "add",
            "l0",
            "numtxqueues",
            "4",
            "numrxqueues",
            "4",
            "type",
            "veth",
            "peer",
            "name",
            "p0",
            "numtxqueues",
            "1",
            "numrxqueues",
            "1",
            "netns",
            peer.name(),
        ])
        .unwrap();
    lb_ns.exec("ethtool", &["-L", "l0", "rx", "1", "tx", "1"]).unwrap();
    lb_ns.ip(&["link", "set", "l0", "up"]).unwrap();
    peer.ip(&["link", "set", "p0", "up"]).unwrap();
    let Some(mut lb) = Running::launch(&tag, lb_ns, peer, &config_text("", "", "")) else { return };
    assert!(!lb.log.join("\n").contains("receive queues not served"), "{}", lb.log.join("\n"));
    lb.lb_ns.exec("ethtool", &["-L", "l0", "rx", "4"]).unwrap();
    let warned = lb.wait_for_log("receive queues not served");
    lb.signal("-TERM");
    let (status, log) = lb.finish();
    assert!(warned, "no warning of the queues l0 gained:\n{log}");
    let line = log.lines().find(|l| l.contains("receive queues not served")).unwrap_or_default();
    assert!(line.contains("l0") && line.contains("[1, 2, 3]"), "{line}");
    assert!(status.success(), "{status:?}\n{log}");
}

/// The frames of the flows lost on the receive queues an interface gained (the XDP program finds no
/// socket there and passes them to the kernel) are counted in /metrics, per interface, as
/// `lb_xdp_no_socket_total`: before, the metrics looked as before while most flows went unanswered.
#[test]
fn frames_on_queues_no_loop_serves_are_counted_in_the_metrics() {
    if let Err(why) = can_create_namespaces().and_then(|()| can_run_ethtool()) {
        println!("SKIPPED: {why}");
        return;
    }
    let tag = unique_tag("lbns");
    let peer = Netns::create(&format!("{tag}p")).unwrap();
    let lb_ns = Netns::create(&format!("{tag}l")).unwrap();
    // As in `receive_queues_an_interface_gains_while_lb_run_runs_are_warned_of`.
    let q = |n| ["numtxqueues", n, "numrxqueues", n];
    let add = [
        ["link", "add", "l0"].as_slice(),
        &q("4"),
        &["type", "veth", "peer", "name", "p0"],
        &q("4"),
        &["netns", peer.name()],
    ]
    .concat();
    lb_ns.ip(&add).unwrap();
    lb_ns.exec("ethtool", &["-L", "l0", "rx", "1", "tx", "1"]).unwrap();
    peer.exec("ethtool", &["-L", "p0", "rx", "1", "tx", "1"]).unwrap();
    lb_ns.ip(&["link", "set", "l0", "up"]).unwrap();
    peer.ip(&["link", "set", "p0", "up"]).unwrap();
    let service = "  - { name: dns, vip: 10.9.9.9, port: 53, protocol: udp, mode: dsr, scheduler: rr, backends: [{ addr: 10.1.0.1, port: 53, mac: \"02:aa:bb:cc:dd:01\" }] }\n";
    let metrics = "127.0.0.1:9100";
    let text = config_text("", service, &format!("metrics: {{ listen: \"{metrics}\" }}\n"));
    let Some(mut lb) = Running::launch(&tag, lb_ns, peer, &text) else { return };
    lb.lb_ns.ip(&["addr", "add", "10.50.0.1/24", "dev", "l0"]).unwrap();
    lb.peer.ip(&["addr", "add", "10.50.0.2/24", "dev", "p0"]).unwrap();
    lb.peer.ip(&["route", "add", "10.9.9.9/32", "via", "10.50.0.1"]).unwrap();
    assert!(lb.wait_for_log("their services are steered"), "{}", lb.log.join("\n"));
    let name = "lb_xdp_no_socket_total{interface=\"l0\"}";
    let scrape = |lb: &Running| {
        lb_examples::lab::metric_value(&lb_examples::lab::http_get_in(lb.lb_ns.name(), metrics, "/metrics"), name)
    };
    let flows = |lb: &Running| lb.peer.exec("python3", &["-c", FLOWS, "10.9.9.9", "40"]).unwrap();
    let served = flows(&lb);
    let before = scrape(&lb);
    // l0 gains three receive queues, and the peer sends on four (the veth's XDP wants no more
    // transmit queues on the peer than receive queues on l0), spread by the flows' hash.
    lb.lb_ns.exec("ethtool", &["-L", "l0", "rx", "4"]).unwrap();
    lb.peer.exec("ethtool", &["-L", "p0", "tx", "4"]).unwrap();
    assert!(lb.wait_for_log("receive queues not served"), "{}", lb.log.join("\n"));
    let after = flows(&lb);
    let counted = scrape(&lb);
    lb.signal("-TERM");
    let (status, log) = lb.finish();
    assert!(!served.contains("lost"), "{served}\n{log}");
    assert_eq!(before, Some(0), "one queue, served: nothing counted\n{log}");
    let lost = after.lines().filter(|l| l.ends_with("lost")).count() as u64;
    println!("{lost} of 40 flows lost on the queues l0 gained; {counted:?} frames counted");
    assert!(lost > 0, "RSS put no flow on the queues l0 gained: {after}");
    // Each lost flow's datagram was sent again every 0.2 s for 10 s.
    assert!(counted.is_some_and(|n| n >= lost), "{lost} flows lost, {counted:?} frames counted\n{log}");
    assert!(status.success(), "{status:?}\n{log}");
}

/// Sends one datagram to `sys.argv[1]`:53 from each of the source ports 20000 to 20000 + N - 1
/// (`sys.argv[2]`) of the peer's `p0`, again every 0.2 s for those not yet seen forwarded, and prints
/// each port with the backend MAC its datagram was forwarded to (frames to 02:aa:bb:cc:dd:xx), one
/// per line in port order, once all are seen or after 10 s (a bound, not a wait).
const FLOWS: &str = r"
import socket, sys, time
dst, n = sys.argv[1], int(sys.argv[2])
r = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
r.bind(('p0', 0))
r.settimeout(0.05)
socks = {}
for i in range(n):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(('10.50.0.2', 20000 + i))
    socks[20000 + i] = s
seen = {}
end = time.time() + 10
while time.time() < end and len(seen) < n:
    for port, s in socks.items():
        if port not in seen:
            s.sendto(b'q', (dst, 53))
    resend = time.time() + 0.2
    while time.time() < resend and len(seen) < n:
        try:
            f = r.recv(2048)
        except socket.timeout:
            continue
        if f[:5] == bytes.fromhex('02aabbccdd') and f[12:14] == b'\x08\x00' and f[23] == 17:
            l4 = 14 + (f[14] & 15) * 4
            seen.setdefault(int.from_bytes(f[l4:l4 + 2], 'big'), f[5])
for port in sorted(socks):
    print(port, seen.get(port, 'lost'))
";

/// A link flap (`ip link set l0 down; ... up`) and MTU changes under `lb run` cost it nothing: it
/// serves on, and each established flow stays with its backend (its connection table survives: the
/// poll loop's socket stays bound through them). The flows are spread by `rr`, which would give each
/// of the 21 flows the other backend had they been forgotten.
#[test]
fn established_flows_survive_a_link_flap_and_mtu_changes() {
    let service = "  - { name: dns, vip: 10.9.9.9, port: 53, protocol: udp, mode: dsr, scheduler: rr, backends: [{ addr: 10.1.0.1, port: 53, mac: \"02:aa:bb:cc:dd:01\" }, { addr: 10.1.0.2, port: 53, mac: \"02:aa:bb:cc:dd:02\" }] }\n";
    let Some(mut lb) = Running::start("lbfl", service) else { return };
    lb.lb_ns.ip(&["addr", "add", "10.50.0.1/24", "dev", "l0"]).unwrap();
    lb.peer.ip(&["addr", "add", "10.50.0.2/24", "dev", "p0"]).unwrap();
    lb.peer.ip(&["route", "add", "10.9.9.9/32", "via", "10.50.0.1"]).unwrap();
    assert!(lb.wait_for_log("their services are steered"), "{}", lb.log.join("\n"));
    let flows = |lb: &Running| lb.peer.exec("python3", &["-c", FLOWS, "10.9.9.9", "21"]).unwrap();
    let before = flows(&lb);
    lb.lb_ns.ip(&["link", "set", "l0", "down"]).unwrap();
    lb.lb_ns.ip(&["link", "set", "l0", "up"]).unwrap();
    let after_flap = flows(&lb);
    lb.lb_ns.ip(&["link", "set", "l0", "mtu", "1400"]).unwrap();
    let after_mtu = flows(&lb);
    lb.lb_ns.ip(&["link", "set", "l0", "mtu", "1500"]).unwrap();
    lb.signal("-TERM");
    let (status, log) = lb.finish();
    assert!(!before.contains("lost"), "{before}\n{log}");
    assert!(before.contains(" 1\n") && before.contains(" 2\n"), "rr spreads the flows over both backends: {before}");
    assert_eq!(after_flap, before, "after the link flap\n{log}");
    assert_eq!(after_mtu, before, "after the MTU change\n{log}");
    assert!(status.success(), "lb run serves on and stops cleanly: {status:?}\n{log}");
}
