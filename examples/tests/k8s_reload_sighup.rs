//! The configuration file reloads on SIGHUP even when its content did not change, and a bad file is
//! reported (not applied). Own test binary: it signals its own process.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::time::Duration;

use lb_examples::config::reload::{FileWatch, Reload, watch};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;

#[tokio::test]
async fn sighup_forces_a_reload() {
    // Our own handler first, so the process survives a SIGHUP sent before the watcher has its own.
    let mut ours = signal(SignalKind::hangup()).unwrap();
    let path = std::env::temp_dir().join(format!("lb-sighup-{}.yaml", std::process::id()));
    std::fs::write(
        &path,
        "node: { snat_v4: 10.0.0.2, gateway_mac: \"02:00:00:00:00:fe\" }\nservices: [{ vip: 10.0.0.1, port: 80 }]\n",
    )
    .unwrap();
    let mut fw = FileWatch::new(&path);
    assert!(matches!(fw.check(false), Reload::Loaded(_)));
    let (tx, mut rx) = mpsc::channel(4);
    // Content polling every hour: only a signal can cause a reload within this test.
    tokio::spawn(watch(fw, Duration::from_secs(3600), tx));
    // The interval's first tick fires at once and finds the content unchanged; then signal until the
    // watcher (whose handler is installed asynchronously) answers with a reload.
    let reload = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            // kill(1) rather than libc::kill: no `unsafe` outside lb-io.
            let sent =
                std::process::Command::new("kill").args(["-HUP", &std::process::id().to_string()]).status().unwrap();
            assert!(sent.success());
            ours.recv().await;
            tokio::select! {
                r = rx.recv() => break r.expect("watcher stopped"),
                () = tokio::time::sleep(Duration::from_millis(50)) => continue, // resend; pacing only
            }
        }
    })
    .await
    .expect("no reload after SIGHUP");
    assert_eq!(reload.unwrap().services.len(), 1);
    let _ = std::fs::remove_file(path);
}
