//! `lb list` as a command: what it prints and how it exits, against a stand-in for a running
//! instance's `/state` (a thread answering one HTTP request), without root.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::process::{Command, Stdio};

use lb_examples::list::{BackendView, ServiceView, StateView};

/// A state of `services` services with one backend each.
fn state(services: u32) -> StateView {
    let services = (0..services)
        .map(|i| ServiceView {
            name: format!("svc-{i}"),
            proto: "tcp".into(),
            vip: std::net::Ipv4Addr::from(0x0a00_0000 + i).into(),
            port: 80,
            scheduler: "mh".into(),
            forward: "Masq".into(),
            persistent_secs: None,
            packets: 0,
            bytes: 0,
            new_flows: 0,
            drops: 0,
            fail_open: false,
            backends: vec![BackendView {
                addr: std::net::Ipv4Addr::from(0x0a01_0000 + i).into(),
                port: 8080,
                weight: 1,
                draining: false,
                healthy: None,
                active_conns: 0,
                established_conns: 0,
                packets: 0,
                bytes: 0,
                new_flows: 0,
            }],
        })
        .collect();
    StateView { version: 1, services, ..StateView::default() }
}

/// Answers one `GET /state` with `view`, on a local port it returns.
fn serve_once(view: &StateView) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let body = serde_json::to_string(view).unwrap();
    std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut request = Vec::new();
        let mut byte = [0u8; 1];
        while !request.ends_with(b"\r\n\r\n") && s.read(&mut byte).unwrap() == 1 {
            request.push(byte[0]);
        }
        let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len());
        let _ = s.write_all(head.as_bytes()).and_then(|()| s.write_all(body.as_bytes()));
    });
    addr
}

/// `lb list | head -1` on a table longer than a pipe holds: the reader goes away while `lb list` is
/// still writing, which ends it quietly and successfully, as ipvsadm -Ln does, not with a panic
/// ("failed printing to stdout: Broken pipe") and exit code 101.
#[test]
fn lb_list_into_a_pipe_closed_early_exits_quietly() {
    let addr = serve_once(&state(20_000));
    let mut lb = Command::new(env!("CARGO_BIN_EXE_lb"))
        .args(["list", "--endpoint", &addr.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    BufReader::new(lb.stdout.take().unwrap()).read_line(&mut first).unwrap();
    // (The reader is dropped here: the pipe's read end closes.)
    let out = lb.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(first.starts_with("lb userspace load balancer"), "{first:?}");
    assert!(out.status.success(), "{:?}: {stderr}", out.status);
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// A listing that cannot be written (a full disk, `/dev/full`) is an error saying so, not a panic.
#[test]
fn lb_list_that_cannot_write_says_so() {
    let addr = serve_once(&state(3));
    let out = Command::new(env!("CARGO_BIN_EXE_lb"))
        .args(["list", "--endpoint", &addr.to_string()])
        .stdout(std::fs::File::create("/dev/full").unwrap())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("cannot write the listing") && stderr.contains("No space left"), "{stderr}");
}
