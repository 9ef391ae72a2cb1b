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
