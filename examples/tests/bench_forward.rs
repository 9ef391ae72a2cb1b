//! `lb bench-forward --processor lb` on a real interface (a veth in a namespace the test creates and
//! removes): it reads the configuration file as `lb run` does. Needs root (namespaces, XDP, AF_XDP);
//! skips with the reason otherwise.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::io::{BufRead, BufReader, Read};
use std::process::{Command, Stdio};

use lb_io::netns::{can_create_namespaces, lb_and_peer};

/// A file whose SNAT address is the node's own (`node.snat_v4: node`, as deploy/'s ConfigMap
/// writes it) is served as `lb run` serves it: full NAT from the node's first IPv4 address of the
/// Kubernetes settings. bench-forward read the file without filling it in: it attached its program,
/// said "ready", then failed with "node.snat_v4 is not set".
#[test]
fn bench_forward_nats_from_the_node_address_as_lb_run_does() {
    if let Err(why) = can_create_namespaces() {
        println!("SKIPPED: {why}");
        return;
    }
    let tag = format!("lbb{}", std::process::id());
    let (lb_ns, peer) = lb_and_peer(&tag).unwrap();
    let config = std::env::temp_dir().join(format!("lb-bench-forward-{tag}.yaml"));
    std::fs::write(
        &config,
        "node: { local_mac: \"02:00:00:00:00:01\", gateway_mac: \"02:aa:bb:cc:dd:ee\", snat_v4: node }\n\
         kubernetes: { node_name: node-a, node_addresses: [10.50.0.7] }\n\
         services:\n  - { name: dns, vip: 10.9.9.9, port: 53, protocol: udp, mode: nat, \
         backends: [{ addr: 10.1.0.1, port: 53, mac: \"02:aa:bb:cc:dd:ee\" }] }\n",
    )
    .unwrap();
    let mut lb = Command::new("ip")
        .args(["netns", "exec", lb_ns.name(), env!("CARGO_BIN_EXE_lb"), "bench-forward", "--iface", "l0"])
        .args(["--processor", "lb", "--steer", "10.9.9.9", "--config"])
        .arg(&config)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(lb.stdout.take().unwrap());
    let mut ready = String::new();
    let _ = stdout.read_line(&mut ready);
    let _ = std::fs::remove_file(&config);
    let finish = |mut lb: std::process::Child| {
        let _ = Command::new("kill").args(["-TERM", &lb.id().to_string()]).status();
        let mut log = String::new();
        let _ = lb.stderr.take().unwrap().read_to_string(&mut log);
        (lb.wait().unwrap(), log)
    };
    if ready.trim() != "ready" {
        let (_, log) = finish(lb);
        if log.contains("Operation not permitted") || log.contains("not supported") {
            println!("SKIPPED: the kernel refused XDP / AF_XDP:\n{log}");
            return;
        }
        panic!("lb bench-forward did not start:\n{log}");
    }
    lb_ns.ip(&["addr", "add", "10.50.0.1/24", "dev", "l0"]).unwrap();
    peer.ip(&["addr", "add", "10.50.0.2/24", "dev", "p0"]).unwrap();
    peer.ip(&["route", "add", "10.9.9.9/32", "via", "10.50.0.1"]).unwrap();
    // The peer sends to the VIP and captures on p0 the frame NAT-ed to the backend's MAC.
    let frame = lb_examples::lab::first_forwarded_frame(
        &peer,
        "p0",
        [10, 9, 9, 9].into(),
        53,
        [2, 0xaa, 0xbb, 0xcc, 0xdd, 0xee],
    );
    let (status, log) = finish(lb);
    let source = frame.as_deref().and_then(|f| <[u8; 4]>::try_from(f.get(26..30)?).ok()).map(std::net::Ipv4Addr::from);
    assert_eq!(source, Some([10, 50, 0, 7].into()), "the NAT-ed frame's source address\n{log}");
    assert!(status.success(), "{status:?}\n{log}");
}
