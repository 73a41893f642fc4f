//! The live policy and how it changes: validated hot reload, the last
//! known-good version, automatic rollback, and the file watcher.
//!
//! A candidate goes through every stage (read → version → compile → imports →
//! init → smoke → fixtures) off the hot path; only then is it swapped in with
//! one atomic pointer store. Calls already running finish on the version they
//! started with. A candidate that fails any stage never goes live; the failure
//! is kept for the status API. If a version that went live fails more than a
//! configured share of its calls during its first minute, the previous version
//! is restored automatically.

use std::collections::{HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use notify::{RecommendedWatcher, RecursiveMode, Watcher as _};
use serde::Serialize;
use sha2::{Digest, Sha256};
use signalbox_policy::fixture::FixtureFile;

use super::fixtures;
use super::instance::CallFailure;
use super::kv::{self, KvStore};
use super::loaded::{Limits, LoadError, LoadSpec, LoadedPolicy, PolicyInfo, Stage, StatsSnapshot};
use crate::lock;
use crate::route::{RouteInput, Target};

/// What to do when the policy cannot give a decision.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Fallback {
    /// Built-in routing (safe: reads to replicas, the rest to the primary).
    #[default]
    Builtin,
    /// Everything to the primary.
    Primary,
    /// Refuse the statement.
    Reject,
}

/// Automatic rollback of a new version that misbehaves.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RollbackSettings {
    /// How long after going live a version is watched.
    #[serde(with = "crate::config::duration_ms")]
    pub window: Duration,
    /// Failed share of calls (0–1) above which it is rolled back.
    pub max_error_rate: f64,
    /// Calls needed before the share is judged.
    pub min_calls: u64,
}

impl Default for RollbackSettings {
    fn default() -> Self {
        Self {
            window: Duration::from_secs(60),
            max_error_rate: 0.2,
            min_calls: 20,
        }
    }
}

/// Everything the manager needs to know about the policy.
#[derive(Clone, Debug)]
pub struct PolicySettings {
    pub path: PathBuf,
    pub name: String,
    pub config_json: String,
    pub limits: Limits,
    pub fallback: Fallback,
    pub rollback: RollbackSettings,
    /// Quiet time after a file event before reloading.
    pub debounce: Duration,
    /// Also re-check the file this often (catches missed events); none = never.
    pub poll: Option<Duration>,
}

impl PolicySettings {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        let path = path.into();
        let name = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "policy".into());
        Self {
            path,
            name,
            config_json: "{}".into(),
            limits: Limits::default(),
            fallback: Fallback::Builtin,
            rollback: RollbackSettings::default(),
            debounce: Duration::from_millis(100),
            poll: Some(Duration::from_secs(2)),
        }
    }
}

/// What a reload attempt did.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Outcome {
    Activated {
        sha256: String,
    },
    Unchanged {
        sha256: String,
    },
    Rejected {
        sha256: Option<String>,
        stage: Stage,
        message: String,
    },
    RolledBack {
        from: String,
        to: Option<String>,
        reason: String,
    },
}

#[derive(Clone, Debug, Serialize)]
pub struct ReloadEvent {
    pub at_ms: u64,
    /// `startup`, `watch`, `poll`, `signal`, `api`, `rollback`, ...
    pub trigger: String,
    #[serde(flatten)]
    pub outcome: Outcome,
}

/// A policy's decision, or the fallback when it failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyOutcome {
    pub target: Target,
    pub reason: Option<String>,
    pub failure: Option<CallFailure>,
}

/// The status API's view.
#[derive(Clone, Debug, Serialize)]
pub struct PolicyStatus {
    pub path: PathBuf,
    pub active: Option<PolicyInfo>,
    pub active_stats: Option<StatsSnapshot>,
    /// The version a rollback would restore.
    pub last_known_good: Option<PolicyInfo>,
    pub last_reload: Option<ReloadEvent>,
    pub history: Vec<ReloadEvent>,
    pub reloads_ok: u64,
    pub reloads_failed: u64,
    pub rollbacks: u64,
    pub fallbacks: FallbackCounts,
}

/// Calls that failed and used the fallback, by kind.
pub type FallbackCounts = super::instance::FailureCounts;

const HISTORY: usize = 32;

#[derive(Default)]
struct Journal {
    history: VecDeque<ReloadEvent>,
    reloads_ok: u64,
    reloads_failed: u64,
    rollbacks: u64,
}

/// Owns the live policy. Cheap to call from any number of threads.
pub struct PolicyManager {
    /// Replaced by [`PolicyManager::reconfigure`] (a config reload).
    settings: arc_swap::ArcSwap<PolicySettings>,
    current: ArcSwapOption<LoadedPolicy>,
    last_good: Mutex<Option<Arc<LoadedPolicy>>>,
    journal: Mutex<Journal>,
    /// Hashes that failed validation or were rolled back: the watcher does
    /// not retry them (an explicit reload does).
    refused: Mutex<HashSet<String>>,
    reload_lock: Mutex<()>,
    /// The policy file as last looked at by `reload_if_changed`.
    last_stamp: Mutex<Option<FileStamp>>,
    kv: Arc<KvStore>,
    fallbacks: super::instance::FailureCounters,
}

impl PolicyManager {
    /// Load the initial version; fails if it does not pass validation.
    pub fn start(settings: PolicySettings) -> Result<Arc<Self>, LoadError> {
        let manager = Arc::new(Self::empty(settings));
        let event = manager.reload("startup");
        match event.outcome {
            Outcome::Activated { .. } => Ok(manager),
            Outcome::Rejected { stage, message, .. } => Err(LoadError { stage, message }),
            other => Err(LoadError::new(
                Stage::Read,
                format!("unexpected: {other:?}"),
            )),
        }
    }

    /// A manager with no live policy (built-in routing) until a reload succeeds.
    pub fn empty(settings: PolicySettings) -> Self {
        Self {
            settings: arc_swap::ArcSwap::from_pointee(settings),
            current: ArcSwapOption::empty(),
            last_good: Mutex::new(None),
            journal: Mutex::default(),
            refused: Mutex::default(),
            reload_lock: Mutex::new(()),
            last_stamp: Mutex::new(None),
            kv: Arc::default(),
            fallbacks: Default::default(),
        }
    }

    pub fn settings(&self) -> Arc<PolicySettings> {
        self.settings.load_full()
    }

    /// Whether a version is live (cheap: no reference taken).
    pub fn has_active(&self) -> bool {
        self.current.load().is_some()
    }

    /// The live version, if any.
    pub fn active(&self) -> Option<Arc<LoadedPolicy>> {
        self.current.load_full()
    }

    /// Ask the live policy (hot path). Never fails: a policy failure yields
    /// the configured fallback and is counted.
    pub fn decide(&self, input: &RouteInput) -> PolicyOutcome {
        let guard = self.current.load();
        let Some(policy) = guard.as_ref() else {
            return PolicyOutcome {
                target: Target::Default,
                reason: Some("no policy".into()),
                failure: None,
            };
        };
        match policy.call(input) {
            Ok(d) => PolicyOutcome {
                target: d.target,
                reason: d.reason,
                failure: None,
            },
            Err(failure) => {
                self.fallbacks.record(&failure);
                tracing::warn!(policy = %policy.info.name, error = %failure, "policy call failed; using fallback");
                self.maybe_roll_back(policy);
                PolicyOutcome {
                    target: match self.settings.load().fallback {
                        Fallback::Builtin => Target::Default,
                        Fallback::Primary => Target::Primary,
                        Fallback::Reject => Target::Reject(
                            "routing policy failed and the fallback is reject".into(),
                        ),
                    },
                    reason: Some(format!("fallback:{}", failure.kind())),
                    failure: Some(failure),
                }
            }
        }
    }

    fn maybe_roll_back(&self, failing: &Arc<LoadedPolicy>) {
        let settings = self.settings.load();
        let rb = &settings.rollback;
        if failing.age() > rb.window {
            return;
        }
        let stats = failing.stats.snapshot();
        if stats.calls < rb.min_calls
            || (stats.failures() as f64) <= rb.max_error_rate * stats.calls as f64
        {
            return;
        }
        let restore = lock(&self.last_good).clone();
        // Only the first thread to notice swaps; the rest see a changed pointer.
        let previous = self.current.compare_and_swap(failing, restore.clone());
        let swapped = previous.as_ref().is_some_and(|p| Arc::ptr_eq(p, failing));
        if !swapped {
            return;
        }
        lock(&self.refused).insert(failing.info.sha256.clone());
        let reason = format!(
            "{} of {} calls failed in its first {}s",
            stats.failures(),
            stats.calls,
            failing.age().as_secs()
        );
        tracing::error!(policy = %failing.info.name, sha256 = %failing.info.sha256, %reason, "rolled back policy version");
        let mut journal = lock(&self.journal);
        journal.rollbacks += 1;
        push(
            &mut journal,
            "rollback",
            Outcome::RolledBack {
                from: failing.info.sha256.clone(),
                to: restore.map(|r| r.info.sha256.clone()),
                reason,
            },
        );
    }

    /// Reload from the configured path now (explicit: retries refused files).
    pub fn reload(&self, trigger: &str) -> ReloadEvent {
        self.reload_inner(trigger, true)
    }

    /// Reload only if the file changed and was not refused before. The
    /// file's identity (device, inode, size, times) is checked first: a
    /// watch event about some other file, or a poll of an unchanged one,
    /// costs a `stat`, not a read and a hash.
    pub fn reload_if_changed(&self, trigger: &str) -> Option<ReloadEvent> {
        let settings = self.settings.load_full();
        let seen = FileStamp::of(&settings.path);
        {
            let mut last = lock(&self.last_stamp);
            if seen.is_some() && *last == seen {
                return None;
            }
            *last = seen;
        }
        let bytes = std::fs::read(&settings.path).ok()?;
        let hash = sha256(&bytes);
        let current = self.current.load().as_ref().map(|p| p.info.sha256.clone());
        if current.as_deref() == Some(hash.as_str()) || lock(&self.refused).contains(&hash) {
            return None;
        }
        Some(self.reload_inner(trigger, false))
    }

    fn reload_inner(&self, trigger: &str, explicit: bool) -> ReloadEvent {
        let _serial = lock(&self.reload_lock);
        let settings = self.settings.load_full();
        let outcome = self.try_activate(explicit, &settings);
        self.record(trigger, outcome, &settings)
    }

    /// Journal and log one attempt's outcome.
    fn record(&self, trigger: &str, outcome: Outcome, settings: &PolicySettings) -> ReloadEvent {
        if let Outcome::Rejected {
            sha256: Some(h), ..
        } = &outcome
        {
            lock(&self.refused).insert(h.clone());
        }
        let mut journal = lock(&self.journal);
        match &outcome {
            Outcome::Activated { sha256 } => {
                journal.reloads_ok += 1;
                tracing::info!(trigger, sha256, path = %settings.path.display(), "policy activated");
            }
            Outcome::Rejected { stage, message, .. } => {
                journal.reloads_failed += 1;
                tracing::error!(trigger, stage = stage.as_str(), %message, path = %settings.path.display(), "policy candidate rejected; previous version keeps serving");
            }
            _ => {}
        }
        push(&mut journal, trigger, outcome).clone()
    }

    /// A config reload changed `[policy]`: validate the file it names with
    /// the new settings and, if it passes, make both live — keeping this
    /// manager's journal, last known good version and key/value store.
    /// On failure nothing changes and the rejection is journaled.
    pub fn reconfigure(
        &self,
        settings: PolicySettings,
        trigger: &str,
    ) -> Result<ReloadEvent, LoadError> {
        let _serial = lock(&self.reload_lock);
        let outcome = match std::fs::read(&settings.path) {
            Err(e) => Outcome::Rejected {
                sha256: None,
                stage: Stage::Read,
                message: format!("{}: {e}", settings.path.display()),
            },
            Ok(bytes) => {
                let hash = sha256(&bytes);
                match self.validate(&bytes, &settings) {
                    Err(e) => Outcome::Rejected {
                        sha256: Some(hash),
                        stage: e.stage,
                        message: e.message,
                    },
                    Ok(candidate) => {
                        *lock(&self.last_good) = self.current.load_full();
                        self.current.store(Some(Arc::new(candidate)));
                        *lock(&self.last_stamp) = None;
                        lock(&self.refused).remove(&hash);
                        Outcome::Activated { sha256: hash }
                    }
                }
            }
        };
        if matches!(outcome, Outcome::Activated { .. }) {
            self.settings.store(Arc::new(settings.clone()));
        }
        let event = self.record(trigger, outcome, &settings);
        match &event.outcome {
            Outcome::Rejected { stage, message, .. } => Err(LoadError {
                stage: *stage,
                message: message.clone(),
            }),
            _ => Ok(event),
        }
    }

    fn try_activate(&self, explicit: bool, settings: &PolicySettings) -> Outcome {
        let bytes = match std::fs::read(&settings.path) {
            Ok(b) => b,
            Err(e) => {
                return Outcome::Rejected {
                    sha256: None,
                    stage: Stage::Read,
                    message: format!("{}: {e}", settings.path.display()),
                }
            }
        };
        let hash = sha256(&bytes);
        let current = self.current.load_full();
        if current.as_ref().is_some_and(|c| c.info.sha256 == hash) {
            return Outcome::Unchanged { sha256: hash };
        }
        if explicit {
            lock(&self.refused).remove(&hash);
        }
        let candidate = match self.validate(&bytes, settings) {
            Ok(c) => c,
            Err(e) => {
                return Outcome::Rejected {
                    sha256: Some(hash),
                    stage: e.stage,
                    message: e.message,
                }
            }
        };
        // A watcher reload that started before this version was rolled
        // back must not bring it back once validated.
        if !explicit && lock(&self.refused).contains(&hash) {
            return Outcome::Unchanged { sha256: hash };
        }
        *lock(&self.last_good) = current;
        self.current.store(Some(Arc::new(candidate)));
        Outcome::Activated { sha256: hash }
    }

    /// An operator's rollback: the version that was live before the current
    /// one serves again, and the current file is not reactivated by the
    /// watcher (an explicit reload still can). A second rollback returns to
    /// the version just rolled back.
    pub fn roll_back(&self, trigger: &str) -> Result<ReloadEvent, String> {
        let _serial = lock(&self.reload_lock);
        let current = self
            .current
            .load_full()
            .ok_or("no policy version is active: nothing to roll back")?;
        let restore = lock(&self.last_good)
            .clone()
            .ok_or("no earlier policy version to roll back to")?;
        self.current.store(Some(restore.clone()));
        *lock(&self.last_good) = Some(current.clone());
        lock(&self.refused).insert(current.info.sha256.clone());
        tracing::warn!(from = %current.info.sha256, to = %restore.info.sha256, trigger, "policy rolled back by an operator");
        let mut journal = lock(&self.journal);
        journal.rollbacks += 1;
        Ok(push(
            &mut journal,
            trigger,
            Outcome::RolledBack {
                from: current.info.sha256.clone(),
                to: Some(restore.info.sha256.clone()),
                reason: "requested by an operator".into(),
            },
        )
        .clone())
    }

    /// Every stage but the swap.
    fn validate(&self, bytes: &[u8], settings: &PolicySettings) -> Result<LoadedPolicy, LoadError> {
        let spec = LoadSpec {
            name: settings.name.clone(),
            config_json: settings.config_json.clone(),
            limits: settings.limits.clone(),
            // Validation never touches the live store.
            kv: Arc::default(),
            path: Some(settings.path.clone()),
            engine: super::engine::EngineKind::Service,
        };
        let mut candidate = LoadedPolicy::load(bytes, spec)?;
        for input in fixtures::smoke_inputs() {
            if let Err(f) = candidate.call(&input) {
                return Err(LoadError::new(
                    Stage::Smoke,
                    format!("`{}`: {f}", input.statement.sql),
                ));
            }
        }
        if let Some(path) = fixtures::shipped_with(&settings.path) {
            check_fixtures(&candidate, &path)?;
        }
        candidate.reset_for_live(self.kv.clone())?;
        Ok(candidate)
    }

    pub fn status(&self) -> PolicyStatus {
        let active = self.current.load_full();
        let journal = lock(&self.journal);
        PolicyStatus {
            path: self.settings.load().path.clone(),
            active: active.as_ref().map(|p| p.info.clone()),
            active_stats: active.as_ref().map(|p| p.stats.snapshot()),
            last_known_good: lock(&self.last_good).as_ref().map(|p| p.info.clone()),
            last_reload: journal.history.back().cloned(),
            history: journal.history.iter().cloned().collect(),
            reloads_ok: journal.reloads_ok,
            reloads_failed: journal.reloads_failed,
            rollbacks: journal.rollbacks,
            fallbacks: self.fallbacks.snapshot(),
        }
    }

    /// Watch the policy file and reload on change until the watcher is dropped.
    pub fn watch(self: &Arc<Self>) -> Result<Watcher, notify::Error> {
        Watcher::start(self.clone())
    }
}

fn push<'a>(journal: &'a mut Journal, trigger: &str, outcome: Outcome) -> &'a ReloadEvent {
    if journal.history.len() == HISTORY {
        journal.history.pop_front();
    }
    journal.history.push_back(ReloadEvent {
        at_ms: kv::now_ms(),
        trigger: trigger.to_owned(),
        outcome,
    });
    journal.history.back().expect("just pushed")
}

fn sha256(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

fn check_fixtures(candidate: &LoadedPolicy, path: &Path) -> Result<(), LoadError> {
    let file = FixtureFile::load(path).map_err(|e| LoadError::new(Stage::Fixtures, e.0))?;
    let results =
        fixtures::run(candidate, &file).map_err(|e| LoadError::new(Stage::Fixtures, e))?;
    let failed: Vec<String> = results
        .into_iter()
        .filter_map(|r| r.verdict.err())
        .collect();
    if failed.is_empty() {
        return Ok(());
    }
    Err(LoadError::new(
        Stage::Fixtures,
        format!(
            "{} of {} cases in {} failed: {}",
            failed.len(),
            file.cases.len(),
            path.display(),
            failed
                .iter()
                .take(3)
                .cloned()
                .collect::<Vec<_>>()
                .join("; ")
        ),
    ))
}

/// What identifies a version of the policy file without reading it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct FileStamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime_ns: i128,
    ctime_ns: i128,
}

impl FileStamp {
    /// The stamp of the file `path` resolves to (through symlinks).
    fn of(path: &Path) -> Option<Self> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(path).ok()?;
        Some(Self {
            dev: m.dev(),
            ino: m.ino(),
            len: m.len(),
            mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
            ctime_ns: i128::from(m.ctime()) * 1_000_000_000 + i128::from(m.ctime_nsec()),
        })
    }
}

/// Which file-system events can change the policy file, so that a directory
/// shared with busy files (logs next to the policy) wakes nothing: the
/// policy's own name, Kubernetes' `..data`-style entries, the first step of
/// the policy's symlink (`policy.wasm -> releases/v3.wasm`), and the
/// directory itself (swapped in its parent).
struct Relevant {
    dir: PathBuf,
    names: Vec<std::ffi::OsString>,
}

impl Relevant {
    fn of(path: &Path) -> Self {
        let dir = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        // The watcher reports events under the absolute form of what it
        // watches (a relative directory is joined to the working one).
        let dir = std::env::current_dir()
            .map(|cwd| cwd.join(dir))
            .unwrap_or_else(|_| dir.to_path_buf());
        let mut names: Vec<_> = path.file_name().map(|n| n.to_owned()).into_iter().collect();
        if let Ok(target) = std::fs::read_link(path) {
            if let Some(std::path::Component::Normal(first)) = target.components().next() {
                names.push(first.to_owned());
            }
        }
        Self { dir, names }
    }

    fn concerns(&self, event: &notify::Event) -> bool {
        // No paths: the watcher lost track (queue overflow); check.
        event.paths.is_empty()
            || event.paths.iter().any(|p| {
                if p == &self.dir {
                    return true;
                }
                if p.parent() != Some(self.dir.as_path()) {
                    return false;
                }
                p.file_name().is_some_and(|n| {
                    n.as_encoded_bytes().starts_with(b"..") || self.names.iter().any(|m| m == n)
                })
            })
    }
}

/// What the watch thread receives: a file-system event, or a wake-up to stop.
enum WatchMsg {
    Event,
    Stop,
}

/// The file watcher: a directory watch, debounced here, plus an optional
/// poll, on a thread of its own so compiling a candidate never blocks
/// routing. Idle, the thread sleeps until an event, the next poll or stop.
pub struct Watcher {
    wake: mpsc::Sender<WatchMsg>,
    thread: Option<JoinHandle<()>>,
    _watcher: RecommendedWatcher,
}

impl Watcher {
    fn start(manager: Arc<PolicyManager>) -> Result<Self, notify::Error> {
        let (tx, rx) = mpsc::channel();
        let events = tx.clone();
        let settings = manager.settings();
        let relevant = Relevant::of(&settings.path);
        let dir = relevant.dir.clone();
        let mut watcher =
            notify::recommended_watcher(move |e: notify::Result<notify::Event>| match e {
                Ok(event) if relevant.concerns(&event) => {
                    let _ = events.send(WatchMsg::Event);
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "policy watcher error"),
            })?;
        // Watch the directory (not the file): editors replace files by rename
        // and Kubernetes swaps a `..data` symlink inside it. When the
        // directory is itself a symlink, its parent is watched too so that
        // swapping it is seen (only then: the parent of an ordinary
        // directory, say /tmp or /etc, is busy with unrelated files).
        watcher.watch(&dir, RecursiveMode::NonRecursive)?;
        let dir_is_link = std::fs::symlink_metadata(&dir).is_ok_and(|m| m.file_type().is_symlink());
        if let Some(grand) = dir
            .parent()
            .filter(|p| dir_is_link && !p.as_os_str().is_empty())
        {
            if let Err(e) = watcher.watch(grand, RecursiveMode::NonRecursive) {
                tracing::debug!(error = %e, dir = %grand.display(), "not watching the policy directory's parent");
            }
        }
        let thread = std::thread::Builder::new()
            .name("signalbox-policy-watch".into())
            .spawn(move || watch_loop(&manager, &rx))
            .map_err(|e| notify::Error::generic(&e.to_string()))?;
        Ok(Self {
            wake: tx,
            thread: Some(thread),
            _watcher: watcher,
        })
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        let _ = self.wake.send(WatchMsg::Stop);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn watch_loop(manager: &PolicyManager, rx: &mpsc::Receiver<WatchMsg>) {
    // Without a poll, only an event or stop wakes the thread.
    let settings = manager.settings();
    let idle_wait = settings.poll.unwrap_or(Duration::from_secs(3600));
    loop {
        match rx.recv_timeout(idle_wait) {
            Ok(WatchMsg::Stop) | Err(RecvTimeoutError::Disconnected) => return,
            Ok(WatchMsg::Event) => {
                // Debounce: wait until the directory has been quiet for a
                // moment (a copy in progress, several renames in a row).
                loop {
                    match rx.recv_timeout(settings.debounce) {
                        Ok(WatchMsg::Event) => continue,
                        Ok(WatchMsg::Stop) | Err(RecvTimeoutError::Disconnected) => return,
                        Err(RecvTimeoutError::Timeout) => break,
                    }
                }
                manager.reload_if_changed("watch");
            }
            Err(RecvTimeoutError::Timeout) => {
                manager.reload_if_changed("poll");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Relevant;
    use notify::{Event, EventKind};
    use std::path::{Path, PathBuf};

    fn event(paths: &[&Path]) -> Event {
        let mut e = Event::new(EventKind::Any);
        e.paths = paths.iter().map(|p| p.to_path_buf()).collect();
        e
    }

    #[test]
    fn only_events_that_can_change_the_policy_wake_the_watcher() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("policies");
        std::fs::create_dir_all(dir.join("releases")).unwrap();
        std::os::unix::fs::symlink("releases/v3.wasm", dir.join("policy.wasm")).unwrap();
        let r = Relevant::of(&dir.join("policy.wasm"));
        for yes in [
            dir.join("policy.wasm"),
            dir.join("..data"),
            dir.join("..data_tmp"),
            dir.join("releases"),
            dir.clone(),
        ] {
            assert!(r.concerns(&event(&[&yes])), "{yes:?}");
        }
        for no in [
            dir.join("primary.log"),
            dir.join("policy.wasm.bak"),
            dir.join("releases/v3.wasm.log"),
            d.path().join("other"),
            PathBuf::from("/tmp/perf.data"),
        ] {
            assert!(!r.concerns(&event(&[&no])), "{no:?}");
        }
        // A rename reports both ends; either one that matters counts.
        assert!(r.concerns(&event(&[&dir.join("tmp123"), &dir.join("policy.wasm")])));
        // An overflow names no path: look anyway.
        assert!(r.concerns(&event(&[])));
    }

    #[test]
    fn a_relative_path_matches_what_the_watcher_reports() {
        // notify reports events under the absolute directory it watches.
        let cwd = std::env::current_dir().unwrap();
        let r = Relevant::of(Path::new("policy.wasm"));
        assert!(r.concerns(&event(&[&cwd.join("policy.wasm")])));
        assert!(r.concerns(&event(&[&cwd.join("./policy.wasm")])));
        assert!(!r.concerns(&event(&[&cwd.join("server.log")])));
        let r = Relevant::of(Path::new("conf/policy.wasm"));
        assert!(r.concerns(&event(&[&cwd.join("conf/policy.wasm")])));
        assert!(r.concerns(&event(&[&cwd.join("conf")])));
    }
}
