//! The Kubernetes side: which annotations are read ([`annotations`]), the pure translation of
//! Services and EndpointSlices into load-balancer services ([`translate`](mod@translate)), and the list/watch feed
//! that keeps them current ([`feed`]), and this node's own Node, watched for kube-proxy's
//! `nodeEligible` ([`node`]), with the health servers that answer as kube-proxy does ([`node_health`]).

pub mod annotations;
pub mod feed;
pub mod node;
pub mod node_health;
pub mod translate;

pub use translate::{LastGood, Skipped, Translation, translate, translate_keeping};
