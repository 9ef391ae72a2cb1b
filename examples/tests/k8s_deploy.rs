//! The manifests in deploy/ are consistent with the binary: the ConfigMap's file validates, and the
//! ClusterRole grants exactly get/list/watch on Services and EndpointSlices.
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
    assert_eq!(grants, ["/services", "discovery.k8s.io/endpointslices"]);
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
