//! The Kubernetes feed against the local API server (k8s_support/) behind TLS, as a real API server
//! always is: the feed's client (kube's stack rebuilt on a connector with TCP keepalive) must speak
//! TLS, verify the server against the kubeconfig's `certificate-authority-data`, and send the
//! user's bearer token on every list and watch, or present the user's client certificate.
//!
//! The CA, the server's certificate (for 127.0.0.1, an IP SAN) and a client's are made at test time with the
//! `openssl` command-line tool; without it the tests print why they are skipped and pass.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use k8s_openapi::api::core::v1::Service;
use lb_core::config::{BackendState, NodeConfig};
use lb_examples::config::KubernetesSettings;
use lb_examples::k8s::Translation;
use lb_examples::k8s::feed::{self, ClientTimings, ExpBackoff, Feed, FeedCounters, NodeView};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::json;
use tokio::sync::mpsc;

mod k8s_support;
use k8s_support::{
    FAILSAFE, SERVICES, SLICES, backends, endpoint, fixture, kubeconfig_tls, start_tls, until, web_cluster,
};

const TOKEN: &str = "lb-test-token-3f9a";

/// The openssl configuration: a CA, and a server certificate for 127.0.0.1 signed by it.
const OPENSSL_CNF: &str = "\
[req]
distinguished_name = dn
prompt = no
[dn]
CN = unused
[ca]
basicConstraints = critical,CA:TRUE
keyUsage = critical,keyCertSign,cRLSign
subjectKeyIdentifier = hash
[server]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature
extendedKeyUsage = serverAuth
subjectAltName = IP:127.0.0.1
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
[client]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature
extendedKeyUsage = clientAuth
authorityKeyIdentifier = keyid
";

/// Why the tests cannot run here, if they cannot.
fn skip_reason() -> Option<String> {
    match Command::new("openssl").arg("version").output() {
        Ok(out) if out.status.success() => None,
        Ok(out) => Some(format!("`openssl version` failed: {}", String::from_utf8_lossy(&out.stderr).trim())),
        Err(e) => Some(format!("the openssl command-line tool is not available ({e}); .ci/run installs it")),
    }
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl").args(args).current_dir(dir).output().unwrap();
    assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// A CA, and a server certificate for 127.0.0.1 it signed, made in `dir`.
struct Pki {
    /// The CA's certificate (PEM).
    ca_pem: Vec<u8>,
    /// The server's certificate (PEM).
    server_pem: Vec<u8>,
    /// The server's private key (PEM).
    server_key_pem: Vec<u8>,
    /// A client's certificate (PEM), for a node's user, signed by the CA.
    client_pem: Vec<u8>,
    /// The client's private key (PEM).
    client_key_pem: Vec<u8>,
}

fn make_ca(dir: &Path, name: &str) -> PathBuf {
    let (key, pem) = (format!("{name}.key"), format!("{name}.pem"));
    let subj = format!("/CN=lb test {name}");
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &key,
            "-out",
            &pem,
            "-days",
            "2",
            "-config",
            "openssl.cnf",
            "-extensions",
            "ca",
            "-subj",
            &subj,
        ],
    );
    dir.join(pem)
}

fn make_pki(dir: &Path) -> Pki {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("openssl.cnf"), OPENSSL_CNF).unwrap();
    let ca = make_ca(dir, "ca");
    openssl(
        dir,
        &[
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-config",
            "openssl.cnf",
            "-subj",
            "/CN=127.0.0.1",
        ],
    );
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-set_serial",
            "2",
            "-days",
            "2",
            "-out",
            "server.pem",
            "-extfile",
            "openssl.cnf",
            "-extensions",
            "server",
        ],
    );
    openssl(
        dir,
        &[
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            "client.key",
            "-out",
            "client.csr",
            "-config",
            "openssl.cnf",
            "-subj",
            "/O=system:nodes/CN=system:node:node-a",
        ],
    );
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "client.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-set_serial",
            "3",
            "-days",
            "2",
            "-out",
            "client.pem",
            "-extfile",
            "openssl.cnf",
            "-extensions",
            "client",
        ],
    );
    Pki {
        client_pem: std::fs::read(dir.join("client.pem")).unwrap(),
        client_key_pem: std::fs::read(dir.join("client.key")).unwrap(),
        ca_pem: std::fs::read(ca).unwrap(),
        server_pem: std::fs::read(dir.join("server.pem")).unwrap(),
        server_key_pem: std::fs::read(dir.join("server.key")).unwrap(),
    }
}

/// Base64 (standard alphabet, padded), as `certificate-authority-data` holds the CA's PEM.
fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let b = [chunk[0], chunk.get(1).copied().unwrap_or(0), chunk.get(2).copied().unwrap_or(0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// The server's TLS side; with `client_certs`, a handshake needs a client certificate the CA signed.
fn acceptor(pki: &Pki, client_certs: bool) -> tokio_rustls::TlsAcceptor {
    let certs = CertificateDer::pem_slice_iter(&pki.server_pem).collect::<Result<Vec<_>, _>>().unwrap();
    let key = PrivateKeyDer::from_pem_slice(&pki.server_key_pem).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder =
        rustls::ServerConfig::builder_with_provider(provider.clone()).with_safe_default_protocol_versions().unwrap();
    let builder = if client_certs {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(CertificateDer::from_pem_slice(&pki.ca_pem).unwrap()).unwrap();
        let verifier =
            rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider).build().unwrap();
        builder.with_client_cert_verifier(verifier)
    } else {
        builder.with_no_client_auth()
    };
    tokio_rustls::TlsAcceptor::from(Arc::new(builder.with_single_cert(certs, key).unwrap()))
}

fn settings(kubeconfig: PathBuf) -> KubernetesSettings {
    KubernetesSettings {
        kubeconfig: Some(kubeconfig),
        node_name: Some("node-a".into()),
        node_addresses: vec!["192.168.1.10".parse().unwrap()],
        debounce: Duration::from_millis(5),
        ..Default::default()
    }
}

/// Runs the feed as node-a with `settings` and a back-off of milliseconds: its translations, its
/// counters, its task, and its node view's sender (kept open while the feed runs).
async fn run_feed(
    settings: KubernetesSettings,
) -> (mpsc::Receiver<Translation>, Arc<FeedCounters>, tokio::task::JoinHandle<()>, tokio::sync::watch::Sender<NodeView>)
{
    let client = feed::client_with(&settings, &ClientTimings::default()).await.unwrap();
    let node = NodeConfig { snat_v4: Some("192.168.1.10".parse().unwrap()), ..Default::default() };
    let (view, view_rx) = tokio::sync::watch::channel(NodeView { settings, node });
    let (tx, rx) = mpsc::channel(64);
    let feed =
        Feed::new(client, view_rx).with_backoff(ExpBackoff::new(Duration::from_millis(20), Duration::from_millis(200)));
    let counters = feed.counters();
    (rx, counters, tokio::spawn(feed.run(tx)), view)
}

fn temp_dir(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("lb-k8s-tls-{name}-{}", std::process::id()))
}

/// The feed lists and watches an HTTPS API server it verifies against the kubeconfig's
/// `certificate-authority-data`, and every list and watch carries the kubeconfig's bearer token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_feed_lists_and_watches_over_tls_verifying_the_cluster_ca_and_sending_the_token() {
    if let Some(why) = skip_reason() {
        eprintln!("SKIPPED: {why}");
        return;
    }
    let dir = temp_dir("ok");
    let pki = make_pki(&dir);
    let api = web_cluster();
    let (port, mut reqs, mut handshakes) = start_tls(api.clone(), acceptor(&pki, false)).await;
    let kc = kubeconfig_tls(&dir, port, &base64(&pki.ca_pem), &[("token", TOKEN)]);
    let (mut rx, counters, task, _view) = run_feed(settings(kc)).await;

    let t = until(&mut rx, "shop/web listed over TLS", |t| backends(t, "tcp 10.96.12.34:80").is_some()).await;
    assert_eq!(backends(&t, "tcp 10.96.12.34:80").unwrap().len(), 4);
    let bearer = format!("Bearer {TOKEN}");
    for (path, watch) in [(SERVICES, false), (SLICES, false), (SERVICES, true), (SLICES, true)] {
        let what = format!("{path} {}", if watch { "watch" } else { "list" });
        let r = reqs.next(&what, |r| r.path == path && r.is_watch() == watch).await;
        assert_eq!(r.authorization.as_deref(), Some(bearer.as_str()), "{what} carries the token");
    }
    // A change arrives through the watch (both watches are registered, above).
    let mut slice = fixture("endpointslice-web-ipv4.json");
    slice["endpoints"] = json!([endpoint("10.244.1.5", "node-a", true, true, false)]);
    api.upsert(SLICES, slice);
    let t = until(&mut rx, "web's slice change watched over TLS", |t| {
        backends(t, "tcp 10.96.12.34:80").is_some_and(|b| b.len() == 1)
    })
    .await;
    assert_eq!(backends(&t, "tcp 10.96.12.34:80").unwrap(), vec![("10.244.1.5:8080".into(), BackendState::Active)]);
    assert_eq!(counters.watch_errors.load(Relaxed), 0, "no failed request");
    while let Ok(h) = handshakes.try_recv() {
        assert_eq!(h, Ok(()), "every handshake succeeds");
    }

    drop(rx);
    tokio::time::timeout(FAILSAFE, task).await.expect("feed stops when its receiver is dropped").unwrap();
    let _ = std::fs::remove_dir_all(dir);
}

/// A server whose certificate the kubeconfig's CA did not sign is refused with a certificate error:
/// the client's request fails (it does not hang), and the feed counts the failures and tries again
/// after its back-off, publishing nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_the_kubeconfigs_ca_did_not_sign_is_refused_with_a_certificate_error() {
    if let Some(why) = skip_reason() {
        eprintln!("SKIPPED: {why}");
        return;
    }
    let dir = temp_dir("other-ca");
    let pki = make_pki(&dir);
    let other_ca = std::fs::read(make_ca(&dir, "other-ca")).unwrap();
    let api = web_cluster();
    let (port, _reqs, mut handshakes) = start_tls(api.clone(), acceptor(&pki, false)).await;
    let kc = kubeconfig_tls(&dir, port, &base64(&other_ca), &[("token", TOKEN)]);

    // One request, as the feed's watchers make it: the error says why.
    let client = feed::client_with(&settings(kc), &ClientTimings::default()).await.unwrap();
    let err = tokio::time::timeout(FAILSAFE, kube::Api::<Service>::all(client).list(&Default::default()))
        .await
        .expect("a list through an untrusted server's TLS fails, it does not hang")
        .expect_err("the server's certificate is not trusted");
    let mut chain = err.to_string();
    let mut source = std::error::Error::source(&err);
    while let Some(s) = source {
        chain += &format!(": {s}");
        source = s.source();
    }
    assert!(chain.contains("invalid peer certificate: UnknownIssuer"), "not a certificate error: {chain}");
    let h = tokio::time::timeout(FAILSAFE, handshakes.recv()).await.unwrap().unwrap();
    assert!(h.is_err(), "the server saw the handshake fail: {h:?}");

    // The feed, on a server of its own (every handshake it sees is the feed's): both watchers'
    // lists fail at the handshake; a third handshake is one watcher's second attempt, after its
    // first failure was counted and its back-off passed.
    let (port, mut reqs, mut handshakes) = start_tls(api.clone(), acceptor(&pki, false)).await;
    let kc = kubeconfig_tls(&dir, port, &base64(&other_ca), &[("token", TOKEN)]);
    let (mut rx, counters, task, _view) = run_feed(settings(kc)).await;
    for i in 0..3 {
        let h = tokio::time::timeout(FAILSAFE, handshakes.recv()).await.expect("the feed tries again").unwrap();
        assert!(h.is_err(), "handshake {i} is refused: {h:?}");
    }
    assert!(counters.watch_errors.load(Relaxed) >= 1, "the failures are counted");
    assert!(rx.try_recv().is_err(), "nothing is published from a server that is not trusted");
    assert!(
        tokio::time::timeout(Duration::ZERO, reqs.next("any request", |_| true)).await.is_err(),
        "no request reached the server"
    );

    drop(rx);
    tokio::time::timeout(FAILSAFE, task).await.expect("feed stops when its receiver is dropped").unwrap();
    let _ = std::fs::remove_dir_all(dir);
}

/// A user that authenticates with a client certificate (`client-certificate-data`,
/// `client-key-data`, as a node's kubeconfig has): the feed's TLS presents it, and lists and
/// watches a server that requires one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_feed_presents_the_kubeconfigs_client_certificate() {
    if let Some(why) = skip_reason() {
        eprintln!("SKIPPED: {why}");
        return;
    }
    let dir = temp_dir("client-cert");
    let pki = make_pki(&dir);
    let api = web_cluster();
    let (port, mut reqs, mut handshakes) = start_tls(api.clone(), acceptor(&pki, true)).await;
    let (cert, key) = (base64(&pki.client_pem), base64(&pki.client_key_pem));
    let user = [("client-certificate-data", cert.as_str()), ("client-key-data", key.as_str())];
    let kc = kubeconfig_tls(&dir, port, &base64(&pki.ca_pem), &user);
    let (mut rx, counters, task, _view) = run_feed(settings(kc)).await;

    let t = until(&mut rx, "shop/web listed over TLS", |t| backends(t, "tcp 10.96.12.34:80").is_some()).await;
    assert_eq!(backends(&t, "tcp 10.96.12.34:80").unwrap().len(), 4);
    for (path, watch) in [(SERVICES, false), (SLICES, false), (SERVICES, true), (SLICES, true)] {
        let what = format!("{path} {}", if watch { "watch" } else { "list" });
        let r = reqs.next(&what, |r| r.path == path && r.is_watch() == watch).await;
        assert_eq!(r.authorization, None, "{what}: the certificate is the credential");
    }
    let h = tokio::time::timeout(FAILSAFE, handshakes.recv()).await.unwrap().unwrap();
    assert_eq!(h, Ok(()), "the server took the client's certificate");
    assert_eq!(counters.watch_errors.load(Relaxed), 0, "no failed request");

    drop(rx);
    tokio::time::timeout(FAILSAFE, task).await.expect("feed stops when its receiver is dropped").unwrap();
    let _ = std::fs::remove_dir_all(dir);
}
