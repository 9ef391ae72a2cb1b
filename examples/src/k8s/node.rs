//! This node's own Node object, watched for whether cloud load balancers should still send it
//! traffic: kube-proxy's `nodeEligible` (KEP-3836). A Node being deleted (its `deletionTimestamp`
//! set) or tainted `ToBeDeletedByClusterAutoscaler` (whatever the taint's effect) is not eligible,
//! and kube-proxy's `/healthz` then answers 503 (`/livez` does not change), so the clouds that check
//! it for `externalTrafficPolicy: Cluster` Services drain the node before it goes
//! ([`super::node_health::serve_proxy_healthz`]).
//!
//! As kube-proxy (pkg/proxy/healthcheck/proxy_health.go, `SyncNode`; pkg/proxy/node.go,
//! `NodeEligibleHandler`): the node is eligible until its Node is first seen; every Node event,
//! its deletion too, sets eligibility from the object the event carries (a deleted Node: its last
//! state); and a re-list that no longer holds the Node changes nothing (client-go hands the
//! handler the last state it knew). The Node is listed and watched alone, with the field selector
//! `metadata.name=<node>`, as kube-proxy's node informer does.

use k8s_openapi::api::core::v1::Node;
use kube::api::Api;
use kube::runtime::watcher::{self, Event, watcher};
use kube::{Client, ResourceExt};
use tokio::sync::watch;

use super::feed::{ExpBackoff, FeedCounters, NodeView, backing_off};
use futures::StreamExt;
use std::sync::Arc;
use std::sync::atomic::Ordering;

/// The taint the cluster autoscaler puts on a Node it is about to delete
/// (kube-proxy's `ToBeDeletedTaint`).
pub const TO_BE_DELETED_TAINT: &str = "ToBeDeletedByClusterAutoscaler";

/// Whether `node` is eligible for cloud load balancers' traffic: not being deleted and not tainted
/// [`TO_BE_DELETED_TAINT`] (kube-proxy's `SyncNode`).
pub fn eligible(node: &Node) -> bool {
    let tainted = node
        .spec
        .as_ref()
        .and_then(|s| s.taints.as_ref())
        .is_some_and(|taints| taints.iter().any(|t| t.key == TO_BE_DELETED_TAINT));
    node.metadata.deletion_timestamp.is_none() && !tainted
}

/// Watches the Node named by `view`'s `node_name` and keeps `eligible` set to its eligibility
/// ([`eligible`]; `true` until the Node is first seen), until `eligible` has no receiver left. A
/// reload that names another node watches that one instead, eligible until it is seen. Without a
/// node name the node stays eligible (warned). Failed lists and watches (a ClusterRole without
/// `nodes`, say) are logged, counted in `counters`' `watch_errors` and tried again after
/// `backoff`'s pause; eligibility stays as it was.
pub async fn watch_eligibility(
    client: Client,
    mut view: watch::Receiver<NodeView>,
    eligible: watch::Sender<bool>,
    backoff: ExpBackoff,
    counters: Arc<FeedCounters>,
) {
    loop {
        let name = view.borrow_and_update().settings.node_name.clone();
        set(&eligible, true, name.as_deref().unwrap_or_default(), "not seen yet");
        let follow = async {
            let Some(name) = &name else {
                tracing::warn!("no node name (kubernetes.node_name, $NODE_NAME): the node is always nodeEligible");
                return std::future::pending().await;
            };
            let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
            let mut events =
                std::pin::pin!(backing_off(watcher(Api::<Node>::all(client.clone()), config), backoff.clone()));
            let mut warned = false;
            while let Some(event) = events.next().await {
                match event {
                    Ok(Event::Apply(node) | Event::InitApply(node) | Event::Delete(node))
                        if node.name_any() == *name =>
                    {
                        let why = if node.metadata.deletion_timestamp.is_some() { "being deleted" } else { "tainted" };
                        set(&eligible, self::eligible(&node), name, why);
                    }
                    Ok(_) => {}
                    Err(e) => {
                        counters.watch_errors.fetch_add(1, Ordering::Relaxed);
                        if warned {
                            tracing::debug!(node = %name, "cannot watch this node's Node yet: {e}");
                        } else {
                            warned = true;
                            tracing::warn!(node = %name, "cannot watch this node's Node for nodeEligible; backing off and trying again: {e}");
                        }
                    }
                }
            }
        };
        let renamed = async {
            let renamed = view.wait_for(|v| v.settings.node_name != name).await.is_ok();
            // (With the file's reloads over, the name stays.)
            if !renamed {
                std::future::pending::<()>().await;
            }
        };
        tokio::select! {
            () = follow => return,
            () = renamed => {}
            () = eligible.closed() => return,
        }
    }
}

/// Sets `eligible` to `now` and logs a change (`why`: what made the node ineligible).
fn set(eligible: &watch::Sender<bool>, now: bool, node: &str, why: &str) {
    if eligible.send_replace(now) != now {
        if now {
            tracing::info!(node, "the node is nodeEligible again");
        } else {
            tracing::warn!(node, why, "the node is not nodeEligible (its Node is {why}): /healthz answers 503");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(extra: serde_json::Value) -> Node {
        let mut n = serde_json::json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": { "name": "node-a", "labels": { "kubernetes.io/hostname": "node-a" } },
            "spec": { "podCIDR": "10.244.1.0/24", "podCIDRs": ["10.244.1.0/24"] }
        });
        for (k, v) in extra.as_object().unwrap() {
            n[k.split('.').next().unwrap()][k.split('.').nth(1).unwrap()] = v.clone();
        }
        serde_json::from_value(n).unwrap()
    }

    /// kube-proxy's `SyncNode`: a deletion timestamp, or the autoscaler's taint whatever its effect,
    /// makes the node ineligible; another taint does not.
    #[test]
    fn a_node_being_deleted_or_tainted_by_the_autoscaler_is_not_eligible() {
        assert!(eligible(&node(serde_json::json!({}))));
        assert!(!eligible(&node(serde_json::json!({ "metadata.deletionTimestamp": "2026-12-07T05:00:00Z" }))));
        for effect in ["NoSchedule", "PreferNoSchedule", "NoExecute"] {
            let taint = serde_json::json!([{ "key": TO_BE_DELETED_TAINT, "value": "1765083600", "effect": effect }]);
            assert!(!eligible(&node(serde_json::json!({ "spec.taints": taint }))), "{effect}");
        }
        let other = serde_json::json!([{ "key": "node.kubernetes.io/unschedulable", "effect": "NoSchedule" }]);
        assert!(eligible(&node(serde_json::json!({ "spec.taints": other }))));
    }
}
