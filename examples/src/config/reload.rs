//! Reloading the configuration file on SIGHUP and when its content changes.
//!
//! The watcher polls the file's *content* rather than its mtime: a Kubernetes ConfigMap volume
//! swaps a `..data` symlink (the file's own mtime may not move), editors replace the inode, and two
//! writes in one second share an mtime on some filesystems. Files are small, so reading one every
//! couple of seconds costs nothing and no inotify crate is needed. A file that fails validation is
//! logged with every problem and the running configuration stays.
//!
//! A changed content is applied once two polls in a row read it (SIGHUP applies at once). A file
//! written in place (`cat > lb.yaml`, some copy tools) can be read half-written, and a YAML file cut
//! after a whole entry is still valid with fewer services: applied, it would withdraw the rest. The
//! price is one poll interval of delay per edit.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::path::PathBuf;
use std::time::Duration;

use tokio::sync::mpsc;

use super::Settings;
use super::file::{self, ConfigError};

/// A digest of a configuration file's text, to tell one version of the file from another.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ContentDigest(u64);

impl ContentDigest {
    /// The digest of `text`.
    pub fn of(text: &str) -> Self {
        let mut h = DefaultHasher::new();
        text.hash(&mut h);
        ContentDigest(h.finish())
    }
}

/// Remembers the last content seen at a path, to tell when it changed.
#[derive(Debug)]
pub struct FileWatch {
    path: PathBuf,
    last: Option<ContentDigest>,
    /// A content different from `last`, read at the last poll: applied if the next reads it again.
    settling: Option<ContentDigest>,
    /// The last poll could not read the file: reported then, not again until it reads or SIGHUP.
    unreadable: bool,
}

/// What one check of the file found.
#[derive(Debug)]
pub enum Reload {
    /// The content is what it was (or the file is still unreadable, as reported); nothing to do.
    Unchanged,
    /// The content changed since the last poll (maybe a file still being written); it is applied
    /// if the next poll reads the same.
    Settling,
    /// The content changed (or a reload was forced) and is valid.
    Loaded(Box<Settings>),
    /// The content changed (or a reload was forced) and is rejected; keep the running config.
    Rejected(ConfigError),
}

impl FileWatch {
    /// Watches `path`; the first [`FileWatch::check`] always loads.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        FileWatch { path: path.into(), last: None, settling: None, unreadable: false }
    }

    /// Watches `path`, whose text with `digest` is loaded already ([`file::load`]): the first
    /// [`FileWatch::check`] loads only if the file holds something else by then (edited since).
    pub fn loaded(path: impl Into<PathBuf>, digest: ContentDigest) -> Self {
        FileWatch { path: path.into(), last: Some(digest), settling: None, unreadable: false }
    }

    /// The watched path.
    pub fn path(&self) -> &std::path::Path {
        &self.path
    }

    /// Reads the file; loads it if `force` (SIGHUP), at the first check of a [`FileWatch::new`], or
    /// when the previous check read the same changed content (see the module docs).
    pub fn check(&mut self, force: bool) -> Reload {
        let text = match std::fs::read_to_string(&self.path) {
            Ok(t) => t,
            Err(source) => {
                self.settling = None;
                // Reported once, as a bad content is: each report is an error logged and counted.
                if self.unreadable && !force {
                    return Reload::Unchanged;
                }
                self.unreadable = true;
                return Reload::Rejected(ConfigError::Read { path: self.path.clone(), source });
            }
        };
        self.unreadable = false;
        let digest = ContentDigest::of(&text);
        if !force && self.last == Some(digest) {
            self.settling = None;
            return Reload::Unchanged;
        }
        if !force && self.last.is_some() && self.settling != Some(digest) {
            self.settling = Some(digest);
            return Reload::Settling;
        }
        self.settling = None;
        // Remember rejected content too, so a bad file is reported once, not every poll.
        self.last = Some(digest);
        match file::parse(&text) {
            Ok(s) => Reload::Loaded(Box::new(s)),
            Err(e) => Reload::Rejected(e),
        }
    }
}

/// Sends every new version of the file to `tx`, on SIGHUP and on content change (polled every
/// `poll`): the settings if valid, else the error (already logged) so the control loop can count it.
/// Returns when `tx` is closed. The caller loads the first version itself and starts `fw` with it
/// ([`FileWatch::loaded`]), so a version written in between is sent.
pub async fn watch(mut fw: FileWatch, poll: Duration, tx: mpsc::Sender<Result<Settings, ConfigError>>) {
    #[cfg(unix)]
    let mut hup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGHUP; reloading on file change only");
            None
        }
    };
    let mut tick = tokio::time::interval(poll);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        #[cfg(unix)]
        let force = tokio::select! {
            _ = tick.tick() => false,
            Some(()) = async { match hup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => true,
            () = tx.closed() => return,
        };
        #[cfg(not(unix))]
        let force = tokio::select! {
            _ = tick.tick() => false,
            () = tx.closed() => return,
        };
        match fw.check(force) {
            Reload::Unchanged | Reload::Settling => {}
            Reload::Loaded(s) => {
                tracing::info!(path = %fw.path().display(), services = s.services.len(), forced = force, "configuration file read; handing it to the control loop, which applies or rejects it");
                if tx.send(Ok(*s)).await.is_err() {
                    return;
                }
            }
            Reload::Rejected(e) => {
                tracing::error!(path = %fw.path().display(), "configuration file rejected, keeping the running configuration: {e}");
                if tx.send(Err(e)).await.is_err() {
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_path(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("lb-reload-{}-{name}.yaml", std::process::id()))
    }

    #[test]
    fn loads_on_change_rejects_bad_and_forces_on_hup() {
        let path = temp_path("a");
        std::fs::write(&path, "node: { snat_v4: 10.0.0.2 }\nservices: [{ vip: 10.0.0.1, port: 80 }]\n").unwrap();
        let mut fw = FileWatch::new(&path);
        let Reload::Loaded(s) = fw.check(false) else { panic!("first check loads") };
        assert_eq!(s.services.len(), 1);
        assert!(matches!(fw.check(false), Reload::Unchanged));

        std::fs::write(&path, "services: [{ vip: 10.0.0.1, port: 99999 }]\n").unwrap();
        assert!(matches!(fw.check(false), Reload::Settling));
        let Reload::Rejected(e) = fw.check(false) else { panic!("bad file is rejected") };
        assert!(e.to_string().contains("services[0].port: 99999"), "{e}");
        assert!(matches!(fw.check(false), Reload::Unchanged), "a bad file is reported once");

        std::fs::write(
            &path,
            "node: { snat_v4: 10.0.0.2 }\nservices: [{ vip: 10.0.0.1, port: 80 }, { vip: 10.0.0.2, port: 80 }]\n",
        )
        .unwrap();
        assert!(matches!(fw.check(false), Reload::Settling));
        let Reload::Loaded(s) = fw.check(false) else { panic!("fixed file loads") };
        assert_eq!(s.services.len(), 2);
        assert!(matches!(fw.check(true), Reload::Loaded(_)), "SIGHUP reloads unchanged content");

        std::fs::remove_file(&path).unwrap();
        assert!(matches!(fw.check(false), Reload::Rejected(ConfigError::Read { .. })));
    }

    /// A file read while it is being written in place can be valid YAML with fewer services: a
    /// change is applied only once two polls in a row read it, so the half-written version, which
    /// the next poll no longer sees, never is. SIGHUP applies at once.
    #[test]
    fn a_half_written_file_is_not_applied() {
        let path = temp_path("half");
        let whole = "node: { snat_v4: 10.0.0.2 }\nservices:\n  - { vip: 10.0.0.1, port: 80 }\n  - { vip: 10.0.0.1, port: 443 }\n  - { vip: 10.0.0.1, port: 8080 }\n";
        std::fs::write(&path, whole).unwrap();
        let mut fw = FileWatch::new(&path);
        assert!(matches!(fw.check(false), Reload::Loaded(_)));

        // The writer rewrites the file in place and has written two of its three services so far.
        let edited = whole.replace("8080", "8081");
        let cut = edited.len() - "  - { vip: 10.0.0.1, port: 8081 }\n".len();
        std::fs::write(&path, &edited[..cut]).unwrap();
        assert_eq!(file::parse(&edited[..cut]).unwrap().services.len(), 2, "the cut file is valid YAML");
        assert!(matches!(fw.check(false), Reload::Settling), "not applied at the first read");
        std::fs::write(&path, &edited).unwrap();
        assert!(matches!(fw.check(false), Reload::Settling), "changed again: still settling");
        let Reload::Loaded(s) = fw.check(false) else { panic!("the finished file loads") };
        assert_eq!(s.services.len(), 3);

        std::fs::write(&path, whole).unwrap();
        assert!(matches!(fw.check(true), Reload::Loaded(_)), "SIGHUP does not wait");
        assert!(matches!(fw.check(false), Reload::Unchanged));
        std::fs::remove_file(&path).unwrap();
    }

    /// A file that cannot be read (deleted, its mount gone) is reported once, as a bad file is,
    /// not at every poll: each report is logged as an error and counted as a rejected update.
    /// SIGHUP reports it again; once it reads again, it is compared with what runs as before.
    #[test]
    fn an_unreadable_file_is_reported_once() {
        let path = temp_path("gone");
        let text = "node: { snat_v4: 10.0.0.2 }\nservices: [{ vip: 10.0.0.1, port: 80 }]\n";
        std::fs::write(&path, text).unwrap();
        let mut fw = FileWatch::new(&path);
        assert!(matches!(fw.check(false), Reload::Loaded(_)));

        std::fs::remove_file(&path).unwrap();
        assert!(matches!(fw.check(false), Reload::Rejected(ConfigError::Read { .. })));
        assert!(matches!(fw.check(false), Reload::Unchanged), "reported once");
        assert!(matches!(fw.check(true), Reload::Rejected(ConfigError::Read { .. })), "SIGHUP reports it again");

        std::fs::write(&path, text).unwrap();
        assert!(matches!(fw.check(false), Reload::Unchanged), "back as it runs");
        std::fs::remove_file(&path).unwrap();
        assert!(matches!(fw.check(false), Reload::Rejected(ConfigError::Read { .. })), "gone again: reported");
    }

    /// A watch started from a load compares with the text that load parsed: the same text is
    /// unchanged, a text written since is loaded once it reads the same twice.
    #[test]
    fn a_watch_started_from_a_load_sees_what_was_written_since() {
        let path = temp_path("loaded");
        std::fs::write(&path, "node: { snat_v4: 10.0.0.2 }\nservices: [{ vip: 10.0.0.1, port: 80 }]\n").unwrap();
        let loaded = file::load(&path).unwrap();
        assert!(matches!(FileWatch::loaded(&path, loaded.digest).check(false), Reload::Unchanged));

        std::fs::write(&path, "node: { snat_v4: 10.0.0.2 }\nservices: []\n").unwrap();
        let mut fw = FileWatch::loaded(&path, loaded.digest);
        assert!(matches!(fw.check(false), Reload::Settling));
        let Reload::Loaded(s) = fw.check(false) else { panic!("the edited file loads") };
        assert!(s.services.is_empty());
        assert!(matches!(fw.check(false), Reload::Unchanged));
        std::fs::remove_file(&path).unwrap();
    }
}
