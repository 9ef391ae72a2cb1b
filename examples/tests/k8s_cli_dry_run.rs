//! The `lb` binary end to end without NICs: `lb run` with `interfaces: []` builds and serves the
//! tables, `lb list` prints them like `ipvsadm -Ln`, `/metrics` answers, SIGTERM stops it cleanly.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

#[test]
fn run_dry_then_list() {
    let port = lb_examples::lab::unused_port();
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

/// `lb run` started with the soft limit on open files a container under containerd 2 or a systemd
/// service inherits (1024; here 256) under a higher hard limit raises it to the hard limit, as Go
/// programs (kube-proxy) do at start. Before, it kept the soft limit: every health probe, Kubernetes
/// watch, `/metrics` client and health check node port client takes a descriptor, and once they
/// ran out (a thousand probed backends, a client holding connections to the metrics port) probes of
/// healthy backends failed with EMFILE and took them out of service.
#[test]
fn lb_run_raises_its_open_files_limit_to_the_hard_limit() {
    let port = lb_examples::lab::unused_port();
    let path = std::env::temp_dir().join(format!("lb-nofile-{}.yaml", std::process::id()));
    std::fs::write(
        &path,
        format!(
            "node: {{ snat_v4: 10.0.0.2, gateway_mac: \"02:00:00:00:00:fe\" }}\nmetrics: {{ listen: \"127.0.0.1:{port}\" }}\n\
             services: []\n"
        ),
    )
    .unwrap();
    // prlimit sets the limits, then executes `lb` in its own place (the same process).
    let Ok(mut lb) = Command::new("prlimit")
        .args(["--nofile=256:4096", env!("CARGO_BIN_EXE_lb"), "--log", "info", "run", "--config"])
        .arg(&path)
        .stderr(Stdio::piped())
        .spawn()
    else {
        println!("SKIPPED: no prlimit (util-linux) here");
        return;
    };
    let mut lines = BufReader::new(lb.stderr.take().unwrap()).lines();
    let mut log = Vec::new();
    loop {
        let Some(Ok(line)) = lines.next() else { panic!("lb run exited before serving: {log:#?}") };
        let serving = line.contains("serving /metrics and /state");
        log.push(line);
        if serving {
            break;
        }
    }
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", lb.id())).unwrap();
    let _ = Command::new("kill").args(["-TERM", &lb.id().to_string()]).status();
    let status = lb.wait().unwrap();
    let _ = std::fs::remove_file(&path);
    let open_files = limits.lines().find(|l| l.starts_with("Max open files")).expect("a line for open files");
    let (soft, hard) = {
        let mut words = open_files.split_whitespace().skip(3);
        (words.next().unwrap().to_string(), words.next().unwrap().to_string())
    };
    assert_eq!((soft.as_str(), hard.as_str()), ("4096", "4096"), "{open_files}\n{log:#?}");
    assert!(status.success(), "{status:?}");
}

/// A configuration file that `lb run` or `lb replay` refuses is named in the error, with the field
/// or the line: `lb replay` reads a capture and a file, and a DaemonSet's log shows one line, in
/// which "1 invalid field(s)" or "unknown field `servics` at line 4" said nothing of which file.
#[test]
fn a_refused_configuration_names_its_file() {
    let dir = std::env::temp_dir().join(format!("lb-refused-file-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let invalid = dir.join("invalid.yaml");
    std::fs::write(&invalid, "node: { snat_ports: [1000, 70000] }\n").unwrap();
    let unknown = dir.join("unknown.yaml");
    std::fs::write(&unknown, "node: {}\nservics: []\n").unwrap();
    let lb = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_lb")).args(["--log", "warn"]).args(args).output().unwrap();
        (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let pcap = dir.join("in.pcap").display().to_string();
    let out = dir.join("out.pcap").display().to_string();
    for (file, what) in [(&invalid, "node.snat_ports[1]: 70000"), (&unknown, "unknown field `servics`")] {
        let path = file.display().to_string();
        for args in [vec!["run", "--config", &path], vec!["replay", "--in", &pcap, "--out", &out, "--config", &path]] {
            let (ok, err) = lb(&args);
            assert!(!ok, "lb {args:?} accepted {path}");
            assert!(err.contains(&format!("{path}: ")) && err.contains(what), "lb {args:?}: {err}");
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}
