//! Arbitrary Kubernetes Services and EndpointSlices (JSON, as the API server sends them, read into
//! k8s-openapi's types) through what the feed and the control loop do with them: `translate_keeping`
//! (annotations included) in rounds, each translation applied by the control loop (lb-core's
//! validation of each service, the table build). No panic; the translation does not depend on the
//! order the store hands objects over in; each translation is applied or refused whole (the running
//! tables stay); and a small input is judged in well under a second (the fuzzer's -timeout and
//! -rss_limit_mb catch one that asks for huge tables and gets them).
//!
//! The input: a first byte choosing the node's settings (its low two bits) and the deliveries of
//! tables the data plane refuses (the other six, `lb_fuzz_control::Sink`; see
//! `lb_fuzz_control::drive` for what must hold then), then documents separated by a NUL byte:
//! - `S` + a Service's JSON, `E` + an EndpointSlice's JSON: the object written to the feed's store
//!   (one per namespace/name, the last written);
//! - `R`: the next round: the store as it is then is translated, keeping the last good
//!   translations, and applied. One more round follows the last document;
//! - `B` + a round's number in decimal (1 the first `R`; 0 or no digits the empty store before
//!   any document; counted modulo the rounds so far + 1): the store goes back to what that round
//!   translated, objects written since deleted or put back as they were (an edit undone).
//!
//! So "translation A taken, B refused, A again", which must be delivered again (the workers may
//! hold B), is `\x10` `S{A}` `\0R` `\0S{B}` `\0R` `\0B1`: `\x10` picks the first node file and
//! refuses delivery 2 (from 0: the node file's tables are delivery 0, A's 1, B's 2); that is
//! `seeds/k8s_translate/round-refused-then-undone`.
//!
//! `seeds/k8s_translate` holds inputs to start from, `dict/k8s_translate.dict` the field names and values:
//! `cargo fuzz run --fuzz-dir fuzz-control -s none -O k8s_translate fuzz-control/corpus/k8s_translate
//! fuzz-control/seeds/k8s_translate -- -dict=fuzz-control/dict/k8s_translate.dict -timeout=2`.
#![no_main]

use std::collections::HashMap;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use lb_examples::config::file::parse;
use lb_examples::control::ControlInput;
use lb_examples::k8s::translate::{LastGood, translate_keeping};
use lb_fuzz_control::{drive, without_probes};
use libfuzzer_sys::fuzz_target;

/// The node's settings: NAT of both families from the node's addresses, tunnels, GUE by default.
const FILES: [&str; 4] = [
    "node: { snat_v4: 10.0.0.2, snat_v6: fd00::2, gateway_mac: \"02:00:00:00:00:fe\" }\n\
     kubernetes: { node_name: node-a, node_zone: zone-a, node_addresses: [192.168.1.10, fd00::10] }\n",
    "node: { snat_v4: node, tunnel_src_v4: 10.0.0.3, gateway_mac: \"02:00:00:00:00:fe\", snat_ports: [61000, 65535] }\n\
     kubernetes: { node_name: node-b, node_addresses: [192.168.1.10], default_scheduler: wrr, default_mode: ipip }\n",
    "node: { tunnel_src_v4: 10.0.0.3, tunnel_src_v6: fd00::3, gateway_mac: \"02:00:00:00:00:fe\" }\n\
     kubernetes: { node_addresses: [10.0.0.3], default_mode: gue, gue_port: 6080, service_proxy_name: lb }\n",
    "node: { snat_v4: 10.0.0.2, gateway_mac: \"02:00:00:00:00:fe\" }\n\
     kubernetes: { node_name: node-a, default_scheduler: sh }\n\
     services: [{ vip: 10.96.0.10, port: 53, protocol: udp, backends: [{ addr: 10.1.0.1 }] }]\n",
];

fn name(ns: &Option<String>, name: &Option<String>) -> String {
    format!("{}/{}", ns.as_deref().unwrap_or(""), name.as_deref().unwrap_or(""))
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else { return };
    let Ok(mut settings) = parse(FILES[usize::from(which & 3)]) else { panic!("the node file is valid") };
    settings.fill_from_env(|_| None);
    let k8s = settings.kubernetes.clone().unwrap_or_default();
    let node = settings.node.clone();
    let mut inputs = vec![ControlInput::File(Box::new(without_probes(settings)))];
    // The feed's stores: one object per namespace/name, the last written.
    let mut services: HashMap<String, Service> = HashMap::new();
    let mut slices: HashMap<String, EndpointSlice> = HashMap::new();
    let mut last = LastGood::default();
    let mut round = |services: &HashMap<String, Service>, slices: &HashMap<String, EndpointSlice>| {
        // The store hands its objects over in no set order: the translation may not depend on it.
        let mut other = last.clone();
        let mut t = translate_keeping(services.values(), slices.values(), &k8s, &node, &mut last);
        let (s, e): (Vec<&Service>, Vec<&EndpointSlice>) = (services.values().collect(), slices.values().collect());
        let reversed = translate_keeping(s.into_iter().rev(), e.into_iter().rev(), &k8s, &node, &mut other);
        assert_eq!(t, reversed, "the translation depends on the order the store hands objects over in");
        for s in &mut t.services {
            s.health_check = None;
        }
        ControlInput::Kubernetes(t)
    };
    // The store as each round translated it, the empty store before any document first.
    let mut rounds = vec![(services.clone(), slices.clone())];
    for doc in rest.split(|&b| b == 0) {
        match doc.split_first() {
            Some((b'S', json)) => {
                if let Ok(s) = serde_json::from_slice::<Service>(json) {
                    services.insert(name(&s.metadata.namespace, &s.metadata.name), s);
                }
            }
            Some((b'E', json)) => {
                if let Ok(s) = serde_json::from_slice::<EndpointSlice>(json) {
                    slices.insert(name(&s.metadata.namespace, &s.metadata.name), s);
                }
            }
            Some((b'R', _)) => {
                inputs.push(round(&services, &slices));
                rounds.push((services.clone(), slices.clone()));
            }
            Some((b'B', number)) => {
                let n = number
                    .iter()
                    .filter(|b| b.is_ascii_digit())
                    .fold(0, |n, d| (n * 10 + usize::from(d - b'0')) % rounds.len());
                (services, slices) = rounds[n].clone();
            }
            _ => {}
        }
    }
    inputs.push(round(&services, &slices));
    drive(which >> 2, inputs);
});
