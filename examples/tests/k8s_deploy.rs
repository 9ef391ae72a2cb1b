//! The manifests in deploy/ are consistent with the binary: the ConfigMap's file validates, the
//! ClusterRole grants exactly get/list/watch on Services, EndpointSlices and Nodes, and the DaemonSet adds
//! exactly the capabilities `lb run` needs (root: run in a namespace of the test's own), and the
//! README's commands for a node fetch the deployed metrics port and paths `lb run` answers.
#![allow(clippy::unwrap_used, missing_docs)]

use serde_yaml::Value;

fn manifest(name: &str) -> Value {
    let path = format!("{}/../deploy/{name}", env!("CARGO_MANIFEST_DIR"));
    serde_yaml::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn configmap_file_validates() {
    let cm = manifest("configmap.yaml");
    let text = cm["data"]["config.yaml"].as_str().unwrap();
    let mut s = lb_examples::config::file::parse(text).unwrap_or_else(|e| panic!("deploy/configmap.yaml: {e}"));
    assert!(s.kubernetes.is_some(), "the deployed file enables the Kubernetes feed");
    assert!(s.metrics_listen.is_some(), "probes and `lb list` need the metrics endpoint");
    s.fill_from_env(|k| (k == "NODE_NAME").then(|| "n1".to_string()));
    assert_eq!(s.kubernetes.unwrap().node_name.as_deref(), Some("n1"));
}

/// What `lb run` refuses (its `check_nat_replies`): NAT with fewer SNAT ports than poll loops, each
/// of which needs a share of its own. The deployed file must not fall into it, or every cluster
/// Service in the default NAT mode is refused.
#[test]
fn deployment_can_serve_nat_services() {
    let cm = manifest("configmap.yaml");
    let s = lb_examples::config::file::parse(cm["data"]["config.yaml"].as_str().unwrap()).unwrap();
    let queues: usize = s.interfaces.iter().map(|i| i.queues.len()).sum();
    let nat = s.kubernetes.as_ref().is_some_and(|k| k.default_mode == lb_core::config::ForwardMode::Nat)
        || s.services.iter().any(|svc| svc.config.mode == lb_core::config::ForwardMode::Nat);
    let (first, last) = s.node.snat_ports;
    let ports = usize::from(last.saturating_sub(first)) + 1;
    assert!(
        !nat || (first != 0 && ports >= queues),
        "NAT Services with snat_ports {first}-{last} over {queues} queues"
    );
}

#[test]
fn cluster_role_is_least_privilege() {
    let role = manifest("clusterrole.yaml");
    let mut grants = Vec::new();
    for rule in role["rules"].as_sequence().unwrap() {
        let verbs: Vec<&str> = rule["verbs"].as_sequence().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
        assert_eq!(verbs, ["get", "list", "watch"]);
        for g in rule["apiGroups"].as_sequence().unwrap() {
            for r in rule["resources"].as_sequence().unwrap() {
                grants.push(format!("{}/{}", g.as_str().unwrap(), r.as_str().unwrap()));
            }
        }
    }
    grants.sort();
    // (Nodes: this node's own, for kube-proxy's /healthz's nodeEligible.)
    assert_eq!(grants, ["/nodes", "/services", "discovery.k8s.io/endpointslices"]);
}

#[test]
fn daemonset_passes_node_identity_and_mounts_the_config() {
    let ds = manifest("daemonset.yaml");
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["serviceAccountName"].as_str(), Some("lb"));
    let c = &pod["containers"][0];
    let env: Vec<&str> = c["env"].as_sequence().unwrap().iter().map(|e| e["name"].as_str().unwrap()).collect();
    assert!(env.contains(&"NODE_NAME") && env.contains(&"NODE_IPS"));
    let args: Vec<&str> = c["args"].as_sequence().unwrap().iter().map(|a| a.as_str().unwrap()).collect();
    let config = args.iter().skip_while(|a| **a != "--config").nth(1).unwrap();
    let mount = c["volumeMounts"][0]["mountPath"].as_str().unwrap();
    assert!(config.starts_with(mount), "--config {config} is inside the ConfigMap mount {mount}");
}

/// `lb run` records the receive VLAN offloads it turned off under /run/lb until it turns them back
/// on, so that after a crash or SIGKILL the next run does (README, "VLANs"). In the pod that needs a
/// directory that outlives the container: the node's /run/lb. Before, nothing was mounted there and
/// the root filesystem is read-only: every start warned that it could not record them, and a
/// container killed (OOM, liveness probe) left the node's offloads off for good.
#[test]
fn daemonset_keeps_the_offload_records_on_the_node() {
    let ds = manifest("daemonset.yaml");
    let pod = &ds["spec"]["template"]["spec"];
    let c = &pod["containers"][0];
    let mount = c["volumeMounts"].as_sequence().unwrap().iter().find(|m| m["mountPath"].as_str() == Some("/run/lb"));
    let name = mount.expect("a volume mounted at /run/lb")["name"].as_str().unwrap();
    let volume = pod["volumes"].as_sequence().unwrap().iter().find(|v| v["name"].as_str() == Some(name)).unwrap();
    assert_eq!(volume["hostPath"]["path"].as_str(), Some("/run/lb"), "{volume:?}");
}

/// The DaemonSet runs the version this tree builds. Before, it named the 0.1.0 image after the
/// crates moved to 0.2.0 (which changes the flow hash, README "Upgrading from 0.1 to 0.2"):
/// `kubectl apply -k deploy/` rolled out the old release.
#[test]
fn daemonset_runs_the_version_built_here() {
    let ds = manifest("daemonset.yaml");
    let image = ds["spec"]["template"]["spec"]["containers"][0]["image"].as_str().unwrap();
    let tag = image.rsplit_once(':').map(|(_, tag)| tag);
    assert_eq!(tag, Some(env!("CARGO_PKG_VERSION")), "deploy/daemonset.yaml's image {image}");
}

/// The capabilities the DaemonSet adds (it drops all others), as the manifest spells them.
fn granted_capabilities() -> Vec<String> {
    let ds = manifest("daemonset.yaml");
    let sc = &ds["spec"]["template"]["spec"]["containers"][0]["securityContext"];
    let drop: Vec<&str> =
        sc["capabilities"]["drop"].as_sequence().unwrap().iter().map(|c| c.as_str().unwrap()).collect();
    assert_eq!(drop, ["ALL"], "the container starts from no capability");
    sc["capabilities"]["add"].as_sequence().unwrap().iter().map(|c| c.as_str().unwrap().to_string()).collect()
}

/// How `lb run` on `l0` ended with only the capabilities `caps` (a container's root: its bounding
/// set, nothing inheritable) and a 64 KiB locked-memory limit (a container runtime's default): `Ok`
/// when its poll loops ran (it is then stopped with SIGTERM), else its log.
fn lb_run_with_capabilities(ns: &lb_io::netns::Netns, config: &std::path::Path, caps: &[String]) -> Result<(), String> {
    use std::io::{BufRead, BufReader};
    let bounding: String = std::iter::once("-all".to_string())
        .chain(caps.iter().map(|c| format!("+{}", c.to_lowercase())))
        .collect::<Vec<_>>()
        .join(",");
    let mut child = std::process::Command::new("ip")
        .args(["netns", "exec", ns.name(), "prlimit", "--memlock=65536:65536", "setpriv"])
        .arg(format!("--bounding-set={bounding}"))
        .args(["--inh-caps=-all", env!("CARGO_BIN_EXE_lb"), "--log", "info", "run", "--config"])
        .arg(config)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut log = Vec::new();
    let mut running = false;
    for line in BufReader::new(child.stderr.take().unwrap()).lines().map(Result::unwrap) {
        running = line.contains("poll loops running");
        log.push(line);
        if running {
            let _ = std::process::Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
            break;
        }
    }
    let _ = child.wait();
    if running { Ok(()) } else { Err(log.join("\n")) }
}

/// The DaemonSet adds exactly the capabilities `lb run` needs on a kernel that has CAP_BPF and
/// CAP_PERFMON (5.8 on): it starts with them, and fails without any one of them. Before, it added
/// CAP_SYS_ADMIN, "for kernels before 5.8", but the XDP program's verifier needs perfmon-capable
/// (pointer arithmetic that `!root` may not do), which only CAP_SYS_ADMIN gave it: a container
/// with nearly every privilege, and one that crash-looped once SYS_ADMIN was removed as the
/// comment allowed. Needs root, `setpriv` and `prlimit`; skips with the reason otherwise.
#[test]
fn daemonset_adds_exactly_the_capabilities_lb_run_needs() {
    let caps = granted_capabilities();
    assert!(
        !caps.iter().any(|c| c == "SYS_ADMIN"),
        "deploy/daemonset.yaml adds SYS_ADMIN (nearly root); CAP_BPF + CAP_PERFMON do on 5.8 and later: {caps:?}"
    );
    if let Err(why) = lb_io::netns::can_create_namespaces() {
        println!("SKIPPED: {why}");
        return;
    }
    for tool in ["setpriv", "prlimit"] {
        if std::process::Command::new(tool).arg("--version").output().is_err() {
            println!("SKIPPED: no {tool} here");
            return;
        }
    }
    let tag = format!("cap{}", std::process::id());
    let (ns, _peer) = lb_io::netns::lb_and_peer(&tag).unwrap();
    let config = std::env::temp_dir().join(format!("lb-{tag}.yaml"));
    std::fs::write(
        &config,
        "node: { local_mac: \"02:00:00:00:00:01\" }\ninterfaces: [{ name: l0, queues: [0] }]\nservices: []\n",
    )
    .unwrap();
    let all: Vec<String> = ["NET_ADMIN", "NET_RAW", "BPF", "PERFMON", "IPC_LOCK", "SYS_ADMIN"].map(String::from).into();
    if let Err(log) = lb_run_with_capabilities(&ns, &config, &all) {
        println!(
            "SKIPPED: lb run does not start here even with CAP_SYS_ADMIN (no CAP_BPF / CAP_PERFMON, or no XDP):\n{log}"
        );
        let _ = std::fs::remove_file(&config);
        return;
    }
    let with = lb_run_with_capabilities(&ns, &config, &caps);
    let without: Vec<(String, Result<(), String>)> = caps
        .iter()
        .map(|c| {
            let fewer: Vec<String> = caps.iter().filter(|o| *o != c).cloned().collect();
            (c.clone(), lb_run_with_capabilities(&ns, &config, &fewer))
        })
        .collect();
    let _ = std::fs::remove_file(&config);
    if let Err(log) = with {
        panic!("lb run does not start with the DaemonSet's capabilities {caps:?}:\n{log}");
    }
    for (cap, ran) in without {
        assert!(ran.is_err(), "lb run starts without {cap}: the DaemonSet need not add it");
    }
}

/// The port of `lb list`'s default `--endpoint`, from its help.
fn lb_list_default_port() -> u16 {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_lb")).args(["list", "--help"]).output().unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    let default = help.split("[default: ").nth(1).and_then(|d| d.split(']').next()).unwrap();
    default.parse::<std::net::SocketAddr>().unwrap().port()
}

/// The metrics port is one port everywhere (the file's `metrics.listen`, the container port the
/// probes name, the Prometheus annotation, `lb list`'s default endpoint) and not node_exporter's
/// 9100. Before, it was 9100: with host networking the container port is a host port, so on a
/// cluster running Prometheus's node exporter on every node (as kube-prometheus does, on the
/// host's network too) the scheduler found no node with the port free and every `lb` pod stayed
/// Pending; with node_exporter run outside Kubernetes, `lb run` could not bind it and crash-looped.
#[test]
fn daemonset_metrics_port_is_one_port_and_not_node_exporters() {
    let cm = manifest("configmap.yaml");
    let s = lb_examples::config::file::parse(cm["data"]["config.yaml"].as_str().unwrap()).unwrap();
    let listen = s.metrics_listen.unwrap().port();
    let ds = manifest("daemonset.yaml");
    let pod = &ds["spec"]["template"];
    assert_eq!(pod["spec"]["hostNetwork"].as_bool(), Some(true), "the container port is a host port");
    let c = &pod["spec"]["containers"][0];
    let port = c["ports"].as_sequence().unwrap().iter().find(|p| p["name"].as_str() == Some("metrics")).unwrap();
    let container = u16::try_from(port["containerPort"].as_u64().unwrap()).unwrap();
    let annotated: u16 = pod["metadata"]["annotations"]["prometheus.io/port"].as_str().unwrap().parse().unwrap();
    for probe in ["readinessProbe", "livenessProbe"] {
        assert_eq!(c[probe]["httpGet"]["port"].as_str(), Some("metrics"), "{probe}");
    }
    assert_eq!((container, annotated, lb_list_default_port()), (listen, listen, listen), "metrics.listen's port");
    assert_ne!(listen, 9100, "node_exporter's port, held on the host's network of most monitored nodes");
}

/// `lb run --config path`, once it serves its metrics port, with its log (kept open while it runs).
fn serving_lb(
    path: &std::path::Path,
) -> (std::process::Child, std::io::Lines<std::io::BufReader<std::process::ChildStderr>>) {
    use std::io::BufRead;
    let mut lb = std::process::Command::new(env!("CARGO_BIN_EXE_lb"))
        .args(["--log", "info", "run", "--config"])
        .arg(path)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(lb.stderr.take().unwrap()).lines();
    while !lines.next().expect("lb run exited before serving").unwrap().contains("serving /metrics and /state") {}
    (lb, lines)
}

/// `GET path` from `lb run` at `addr`: the status line and the body's length.
fn get(addr: std::net::SocketAddr, path: &str) -> (String, usize) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(30))).unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: lb\r\n\r\n").as_bytes()).unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).unwrap();
    let text = String::from_utf8_lossy(&out);
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    (head.lines().next().unwrap().to_string(), body.len())
}

/// The liveness probe's answer does not grow with the tables: it renders nothing. Before, it
/// probed `/metrics`, which renders every series of every service and backend (tens of MB and
/// about a second of a core for a few thousand Services every 10 s, in a debug build), queued behind
/// Prometheus's scrapes for its two render slots, under the kubelet's 1 s timeout: a node with a
/// large cluster's tables could have its healthy load balancer killed, and its connections lost.
#[test]
fn daemonset_liveness_probe_renders_nothing() {
    let ds = manifest("daemonset.yaml");
    let alive = ds["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["httpGet"]["path"]
        .as_str()
        .unwrap()
        .to_string();
    let port = lb_examples::lab::unused_port();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut text = format!(
        "node: {{ snat_v4: 10.0.0.2, gateway_mac: \"02:00:00:00:00:fe\" }}\nmetrics: {{ listen: \"{addr}\" }}\nservices:\n"
    );
    for i in 0..200u32 {
        let backends: Vec<String> = (1..=10).map(|b| format!("{{ addr: 10.1.{i}.{b}, port: 8080 }}")).collect();
        text.push_str(&format!(
            "  - {{ name: s{i}, vip: 10.200.{}.{}, port: 80, backends: [{}] }}\n",
            i / 250,
            i % 250 + 1,
            backends.join(", ")
        ));
    }
    let path = std::env::temp_dir().join(format!("lb-liveness-{}.yaml", std::process::id()));
    std::fs::write(&path, text).unwrap();
    let (mut lb, _log) = serving_lb(&path);
    let (status, live) = get(addr, &alive);
    let (_, metrics) = get(addr, "/metrics");
    let _ = std::process::Command::new("kill").args(["-TERM", &lb.id().to_string()]).status();
    let _ = lb.wait();
    let _ = std::fs::remove_file(&path);
    assert_eq!(status, "HTTP/1.1 200 OK", "{alive}");
    assert!(live < 64, "{alive} answers {live} bytes for 200 services of 10 backends (/metrics: {metrics})");
}

/// Every node running the ConfigMap's one file has a SNAT address of its own, one pods route back
/// to it: its own address, from the downward API. Before, the file named one address
/// (192.168.1.10) for every node: a NAT flow's replies went to whichever node held it (or nowhere),
/// and full NAT, the default mode of cluster Services, served through one node at most.
#[test]
fn each_node_gets_its_own_snat_address() {
    let cm = manifest("configmap.yaml");
    let text = cm["data"]["config.yaml"].as_str().unwrap();
    let on = |ips: &'static str| {
        let mut s = lb_examples::config::file::parse(text).unwrap();
        s.fill_from_env(|k| match k {
            "NODE_NAME" => Some("n".to_string()),
            "NODE_IPS" => Some(ips.to_string()),
            _ => None,
        });
        (s.node.snat_v4, s.node.snat_v6)
    };
    assert_eq!(on("10.0.0.1,fd00::1"), (Some("10.0.0.1".parse().unwrap()), None), "the file asks for IPv4 NAT only");
    assert_eq!(on("10.0.0.2"), (Some("10.0.0.2".parse().unwrap()), None));
}

/// Where the SNAT address is the node's own, the SNAT ports are the node's too: a frame to one of
/// them is taken as a NAT reply. The deployed range must leave out the kernel's default ephemeral
/// ports (lb-core's default range, 32768-60999, is that range), which the node's own connections
/// (the kubelet's, the container runtime's) take their source ports from, and Kubernetes' default
/// NodePort range. With the node's address as SNAT address and 40000-60999, a stock node lost
/// the replies of most of its own connections until someone reserved those ports by hand.
#[test]
fn snat_ports_on_the_node_address_leave_its_own_connections_alone() {
    let cm = manifest("configmap.yaml");
    let s = lb_examples::config::file::parse(cm["data"]["config.yaml"].as_str().unwrap()).unwrap();
    let from_node = s.kubernetes.as_ref().unwrap().snat_from_node;
    let (first, last) = s.node.snat_ports;
    let overlaps = |(lo, hi): (u16, u16)| first <= hi && lo <= last;
    let ephemeral = lb_core::config::NodeConfig::default().snat_ports;
    assert!(from_node.v4 || from_node.v6, "the deployed file NATs to each node's own address");
    assert!(!overlaps(ephemeral), "snat_ports {first}-{last} share ports with the kernel's ephemeral {ephemeral:?}");
    assert!(!overlaps((30000, 32767)), "snat_ports {first}-{last} share ports with the NodePort range");
}

/// What the README's Kubernetes section has a reader run on a node works as written: its `curl`
/// lines and `lb list --endpoint` name the deployed metrics port, and each path they fetch is one
/// `lb run` answers with 200 (a dry run here, on a port of the test's own).
#[test]
fn readme_fetches_the_deployed_port_and_paths_lb_run_answers() {
    let readme = std::fs::read_to_string(format!("{}/../README.md", env!("CARGO_MANIFEST_DIR"))).unwrap();
    let cm = manifest("configmap.yaml");
    let listen = lb_examples::config::file::parse(cm["data"]["config.yaml"].as_str().unwrap())
        .unwrap()
        .metrics_listen
        .unwrap()
        .port();
    let mut paths = Vec::new();
    for line in readme.lines().filter(|l| l.starts_with("curl -s 127.0.0.1:") || l.starts_with("lb list --endpoint ")) {
        let target = line.split_whitespace().find(|w| w.starts_with("127.0.0.1:")).unwrap();
        let (port, path) = target["127.0.0.1:".len()..].split_once('/').unwrap_or((&target["127.0.0.1:".len()..], ""));
        assert_eq!(port.parse::<u16>().unwrap(), listen, "README: {line}");
        if !path.is_empty() {
            paths.push(format!("/{path}"));
        }
    }
    assert!(paths.len() >= 3, "README's curl lines: {paths:?}");

    let port = lb_examples::lab::unused_port();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let text = format!(
        "node: {{ snat_v4: 10.0.0.2, gateway_mac: \"02:00:00:00:00:fe\" }}\ninterfaces: []\nmetrics: {{ listen: \"{addr}\" }}\nservices:\n  - {{ name: web, vip: 10.0.0.10, port: 80, backends: [{{ addr: 10.1.0.1, port: 8080 }}] }}\n"
    );
    let path = std::env::temp_dir().join(format!("lb-readme-paths-{}.yaml", std::process::id()));
    std::fs::write(&path, text).unwrap();
    let (mut lb, _log) = serving_lb(&path);
    let answers: Vec<(String, String)> = paths.iter().map(|p| (p.clone(), get(addr, p).0)).collect();
    let _ = std::process::Command::new("kill").args(["-TERM", &lb.id().to_string()]).status();
    let _ = lb.wait();
    let _ = std::fs::remove_file(&path);
    for (path, status) in answers {
        assert_eq!(status, "HTTP/1.1 200 OK", "README's {path}");
    }
}
