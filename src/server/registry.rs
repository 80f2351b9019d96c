//! The served models: which versions of which models the repository holds, their loading
//! state (TF Serving's LOADING / AVAILABLE / END), and a poller that picks up new version
//! folders and unloads removed ones without a restart. Loading and warm-up run on their own
//! threads; a version that fails to load is reported and never takes the server down.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock, Weak};
use std::time::{Duration, Instant, SystemTime};

use candle_core::Device;
use image::RgbImage;
use serde::Serialize;

use super::budget::CpuBudget;
use super::error::ApiError;
use super::metrics::Metrics;
use super::worker::{BatchSettings, Job, Worker};
use crate::config::{ServedModelConfig, VersionPolicy, is_valid_model_name};
use crate::infer::Predictor;
use crate::model_store::{self, ModelManifest};

/// A loaded, warmed-up model version.
pub struct ServedVersion {
    pub name: String,
    pub version: u64,
    pub predictor: Arc<Predictor>,
    pub worker: Worker,
    pub manifest: ModelManifest,
    /// Images past decoding and not yet through the model: a request decodes only once it
    /// holds slots here, so a burst waits as compact request bodies, not decoded photos.
    pub prepared: Arc<tokio::sync::Semaphore>,
    pub prepared_slots: u32,
}

/// Where a version stands.
#[derive(Clone)]
enum VersionState {
    /// Loading; the number of failed attempts before this one.
    Loading(u32),
    Available(Arc<ServedVersion>),
    /// Failed to load: the message, the manifest's modification time it failed on, and when
    /// to try again (backoff doubling from 1 s to 60 s).
    Failed(String, Option<SystemTime>, Retry),
}

impl VersionState {
    fn label(&self) -> &'static str {
        match self {
            VersionState::Loading(_) => "LOADING",
            VersionState::Available(_) => "AVAILABLE",
            VersionState::Failed(..) => "END",
        }
    }
}

/// When a failed load is tried again.
#[derive(Clone, Copy, Debug)]
struct Retry {
    at: Instant,
    attempts: u32,
}

impl Retry {
    fn after(attempts: u32) -> Self {
        let delay = Duration::from_secs(1u64 << attempts.min(6)).min(Duration::from_secs(60));
        Self { at: Instant::now() + delay, attempts }
    }
}

/// A version's status as the API reports it.
#[derive(Debug, Clone, Serialize)]
pub struct VersionStatus {
    pub version: u64,
    pub state: &'static str,
    pub error: Option<String>,
}

/// A model in `GET /v1/models`.
#[derive(Debug, Clone, Serialize)]
pub struct ModelSummary {
    pub name: String,
    pub default: bool,
    pub versions: Vec<VersionStatus>,
}

/// All models and versions.
pub struct Registry {
    repository: PathBuf,
    /// Models to serve and their policies; empty = every model in the repository, latest.
    configured: Vec<ServedModelConfig>,
    default_model: Option<String>,
    models: RwLock<BTreeMap<String, BTreeMap<u64, VersionState>>>,
    settings: BatchSettings,
    cpu: Arc<CpuBudget>,
    device: Device,
    metrics: Arc<Metrics>,
}

impl Registry {
    pub fn new(
        repository: PathBuf,
        configured: Vec<ServedModelConfig>,
        default_model: Option<String>,
        settings: BatchSettings,
        cpu: Arc<CpuBudget>,
        device: Device,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        Arc::new(Self { repository, configured, default_model, models: RwLock::new(BTreeMap::new()), settings, cpu, device, metrics })
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, BTreeMap<u64, VersionState>>> {
        self.models.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<String, BTreeMap<u64, VersionState>>> {
        self.models.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Model names to serve and their policies.
    fn wanted_models(&self) -> Vec<(String, VersionPolicy)> {
        if !self.configured.is_empty() {
            return self.configured.iter().map(|m| (m.name.clone(), m.version_policy.clone())).collect();
        }
        let mut names: Vec<String> = std::fs::read_dir(&self.repository)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .filter_map(|e| e.file_name().to_str().map(str::to_string))
            .filter(|n| is_valid_model_name(n))
            .collect();
        names.sort();
        names.into_iter().map(|n| (n, VersionPolicy::Latest(1))).collect()
    }

    /// One pass over the repository: start loading new versions, unload removed ones.
    pub fn scan(self: &Arc<Self>) {
        for (name, policy) in self.wanted_models() {
            let dir = self.repository.join(&name);
            let present = match model_store::try_list_versions(&dir) {
                Ok(p) => p,
                Err(e) => {
                    // A transient error (permissions, I/O) never unloads what serves.
                    log::warn!("cannot read `{}`: {e}; keeping the versions of `{name}` as they are", dir.display());
                    continue;
                }
            };
            let wanted: BTreeSet<u64> = match &policy {
                VersionPolicy::All => present.iter().copied().collect(),
                VersionPolicy::Latest(n) => present.iter().rev().take(*n).copied().collect(),
                VersionPolicy::Specific(list) => present.iter().copied().filter(|v| list.contains(v)).collect(),
            };
            let mut to_load = Vec::new();
            {
                let mut models = self.write();
                let versions = models.entry(name.clone()).or_default();
                // Availability first (as TF Serving): a version leaves only once a wanted one
                // serves, so a new version still loading (or failing to) never leaves the
                // model without an answer. In-flight requests hold their own handle and finish
                // on the version they started with.
                let replacement_ready = versions
                    .iter()
                    .any(|(v, s)| wanted.contains(v) && matches!(s, VersionState::Available(_)));
                if replacement_ready || wanted.is_empty() {
                    let gone: Vec<u64> = versions.keys().copied().filter(|v| !wanted.contains(v)).collect();
                    for v in gone {
                        versions.remove(&v);
                        self.metrics.version_state(&name, v, None);
                        log::info!("{name} v{v}: unloaded (no longer wanted or removed)");
                    }
                }
                for &v in &wanted {
                    let mtime = manifest_mtime(&dir.join(v.to_string()));
                    let retry = match versions.get(&v) {
                        None => Some(0),
                        // A changed manifest is a new attempt; otherwise back off.
                        Some(VersionState::Failed(_, failed_on, _)) if mtime != *failed_on => Some(0),
                        Some(VersionState::Failed(_, _, retry)) if Instant::now() >= retry.at => Some(retry.attempts + 1),
                        Some(_) => None,
                    };
                    if let Some(attempts) = retry {
                        versions.insert(v, VersionState::Loading(attempts));
                        self.metrics.version_state(&name, v, Some("LOADING"));
                        to_load.push(v);
                    }
                }
            }
            for v in to_load {
                let registry = Arc::downgrade(self);
                let (name, path) = (name.clone(), dir.join(v.to_string()));
                let spawned = std::thread::Builder::new()
                    .name(format!("segctl-load-{name}-v{v}"))
                    .spawn(move || load_version(registry, name, v, path));
                if let Err(e) = spawned {
                    log::error!("cannot start a loader thread: {e}");
                }
            }
        }
    }

    fn set_state(&self, name: &str, version: u64, state: VersionState) {
        let mut models = self.write();
        // A version removed while it loaded stays removed.
        if let Some(slot) = models.get_mut(name).and_then(|v| v.get_mut(&version)) {
            self.metrics.version_state(name, version, Some(state.label()));
            *slot = state;
        }
    }

    /// The version that answers a request: the given one, or the newest available.
    pub fn resolve(&self, name: &str, version: Option<u64>) -> Result<Arc<ServedVersion>, ApiError> {
        let models = self.read();
        let versions = models.get(name).ok_or_else(|| ApiError::NotFound(format!("model `{name}` is not served here")))?;
        match version {
            Some(v) => match versions.get(&v) {
                Some(VersionState::Available(s)) => Ok(s.clone()),
                Some(VersionState::Loading(_)) => Err(ApiError::Unavailable(format!("model `{name}` version {v} is still loading"))),
                Some(VersionState::Failed(e, ..)) => Err(ApiError::Unavailable(format!("model `{name}` version {v} failed to load: {e}"))),
                None => Err(ApiError::NotFound(format!("model `{name}` has no version {v}"))),
            },
            None => versions
                .values()
                .rev()
                .find_map(|s| match s {
                    VersionState::Available(s) => Some(s.clone()),
                    _ => None,
                })
                .ok_or_else(|| ApiError::Unavailable(format!("model `{name}` has no available version yet"))),
        }
    }

    /// Status of every version of a model (`None` when the model is unknown).
    pub fn status(&self, name: &str) -> Option<Vec<VersionStatus>> {
        let models = self.read();
        let versions = models.get(name)?;
        Some(
            versions
                .iter()
                .map(|(v, s)| VersionStatus {
                    version: *v,
                    state: s.label(),
                    error: match s {
                        VersionState::Failed(e, ..) => Some(e.clone()),
                        _ => None,
                    },
                })
                .collect(),
        )
    }

    /// The model `/infer` and the page use when none is named.
    pub fn default_model(&self) -> Option<String> {
        if let Some(d) = &self.default_model {
            return Some(d.clone());
        }
        self.read().keys().next().cloned()
    }

    pub fn list(&self) -> Vec<ModelSummary> {
        let default = self.default_model();
        let names: Vec<String> = self.read().keys().cloned().collect();
        names
            .into_iter()
            .map(|name| ModelSummary {
                default: default.as_deref() == Some(name.as_str()),
                versions: self.status(&name).unwrap_or_default(),
                name,
            })
            .collect()
    }

    /// Ready when every served model has a version that loaded and answered its warm-up. A
    /// new version loading beside a serving one does not make the server unready (a rolling
    /// reload must not pull it out of a load balancer).
    pub fn readiness(&self) -> (bool, Vec<String>) {
        let models = self.read();
        let mut problems = Vec::new();
        if models.is_empty() {
            problems.push(format!("no models found in `{}`", self.repository.display()));
        }
        for (name, versions) in models.iter() {
            let healthy = versions.iter().any(|(v, s)| match s {
                VersionState::Available(served) => {
                    if !served.worker.healthy() {
                        let failures = served.worker.consecutive_failures();
                        problems.push(format!("model `{name}` version {v}: its last {failures} model calls failed"));
                        false
                    } else {
                        true
                    }
                }
                _ => false,
            });
            if healthy {
                continue;
            }
            if versions.values().any(|s| matches!(s, VersionState::Available(_))) {
                continue;
            }
            if versions.is_empty() {
                problems.push(format!("model `{name}` has no versions"));
            } else if versions.values().any(|s| matches!(s, VersionState::Loading(_))) {
                problems.push(format!("model `{name}` is loading"));
            } else {
                problems.push(format!("model `{name}` has no available version"));
            }
        }
        (problems.is_empty(), problems)
    }

    /// Starts the poller thread; it stops when the registry is dropped.
    pub fn watch(self: &Arc<Self>, every: Duration) {
        let weak = Arc::downgrade(self);
        let _ = std::thread::Builder::new().name("segctl-repository-watch".into()).spawn(move || loop {
            std::thread::sleep(every);
            match weak.upgrade() {
                Some(registry) => registry.scan(),
                None => return,
            }
        });
    }

    /// Forgets every version (shutdown): queues close once in-flight requests are done.
    pub fn unload_all(&self) {
        self.write().clear();
    }
}

fn manifest_mtime(dir: &Path) -> Option<SystemTime> {
    std::fs::metadata(dir.join(model_store::MANIFEST_FILE)).and_then(|m| m.modified()).ok()
}

/// Loads a version, starts its worker and answers one warm-up inference.
fn load_version(registry: Weak<Registry>, name: String, version: u64, path: PathBuf) {
    let Some(reg) = registry.upgrade() else { return };
    let started = Instant::now();
    let mtime = manifest_mtime(&path);
    // A panic in the loader (third-party code over untrusted files) ends the version with the
    // reason instead of leaving it LOADING.
    let result = unpanicked("the loader", || -> anyhow::Result<Arc<ServedVersion>> {
        let loaded = model_store::load_exported(&path, &reg.device)?;
        let manifest = loaded.manifest.clone().ok_or_else(|| anyhow::anyhow!("no manifest"))?;
        if manifest.name != name || manifest.version != version {
            anyhow::bail!("model.yaml says {} version {}, the folder says {name} version {version}", manifest.name, manifest.version);
        }
        // A call may use every core of the CPU budget that is free when it starts.
        let threads = reg.cpu.total();
        // Idle inference threads spin only briefly (the request stages need the cores), and
        // no second set of large-batch kernels (memory; serving batches are small).
        let options = crate::model::inference::InferenceOptions { threads, idle_spin: Some(2048), large_batch_kernels: false, ..Default::default() };
        let predictor = Arc::new(Predictor::from_loaded(loaded, options)?);
        let settings = BatchSettings { threads: model_threads(reg.settings.threads, reg.cpu.total()), ..reg.settings };
        let worker = Worker::start(predictor.clone(), settings, reg.cpu.clone(), reg.metrics.clone(), name.clone(), version)?;
        // Enough for a full batch per model thread while the stages prepare the next images.
        let slots = settings.max_batch_size * settings.threads + reg.cpu.total();
        let prepared = Arc::new(tokio::sync::Semaphore::new(slots));
        let prepared_slots = u32::try_from(slots).unwrap_or(u32::MAX);
        let served = Arc::new(ServedVersion { name: name.clone(), version, predictor, worker, manifest, prepared, prepared_slots });
        warm_up(&served)?;
        Ok(served)
    });
    match result {
        Ok(served) => {
            log::info!(
                "{name} v{version}: AVAILABLE ({}, {} model thread(s), loaded and warmed up in {:.2}s)",
                served.predictor.spec().describe(),
                served.worker.threads(),
                started.elapsed().as_secs_f64()
            );
            reg.set_state(&name, version, VersionState::Available(served));
        }
        Err(e) => {
            log::error!("{name} v{version}: failed to load from `{}`: {e:#}", path.display());
            let attempts = match reg.read().get(&name).and_then(|v| v.get(&version)) {
                Some(VersionState::Loading(n)) => *n,
                _ => 0,
            };
            reg.set_state(&name, version, VersionState::Failed(format!("{e:#}"), mtime, Retry::after(attempts)));
        }
    }
}

/// `work()`, with a panic turned into an error that names `what` and the panic's message.
fn unpanicked<T>(what: &str, work: impl FnOnce() -> anyhow::Result<T>) -> anyhow::Result<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(work)).unwrap_or_else(|panic| {
        let why = panic.downcast_ref::<String>().map(String::as_str).or_else(|| panic.downcast_ref::<&str>().copied()).unwrap_or("no message");
        Err(anyhow::anyhow!("{what} panicked: {why}"))
    })
}

/// Model threads of a version: `configured`, or for 0 one per core of the CPU budget. Under
/// load each core then runs its own model call (the most efficient split: no call waits for
/// another to finish while a core that ended its request stages sits idle), and the budget
/// keeps calls and stages from oversubscribing. Measured on 2 cores against one thread:
/// smoke `unet` 125 vs 109 req/s at 64 connections, `mobilenetv2_unet` 61 vs 49 (BENCHMARKS.md),
/// for one more session (arena and scratch) per thread.
pub fn model_threads(configured: usize, cores: usize) -> usize {
    if configured > 0 { configured } else { cores.max(1) }
}

/// One inference through the version's own queue, so the first client request is not the
/// one paying for lazy initialisation.
fn warm_up(served: &ServedVersion) -> anyhow::Result<()> {
    let size = served.predictor.spec().input_size as u32;
    let input = served.predictor.prepare(&RgbImage::from_pixel(size, size, image::Rgb([128, 128, 128])));
    let (reply, answer) = tokio::sync::oneshot::channel();
    served
        .worker
        .submit(Job { input, enqueued: Instant::now(), deadline: Instant::now() + Duration::from_secs(600), reply })
        .map_err(|e| anyhow::anyhow!("warm-up could not be queued: {e:?}"))?;
    answer.blocking_recv().map_err(|_| anyhow::anyhow!("warm-up got no answer"))?.map_err(|e| anyhow::anyhow!("warm-up failed: {e}"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panicking_loader_becomes_an_error_with_its_message() {
        let index = 7usize;
        let err = unpanicked("the loader", || -> anyhow::Result<()> { panic!("index {index} out of range") }).unwrap_err();
        assert_eq!(err.to_string(), "the loader panicked: index 7 out of range");
        let err = unpanicked("the loader", || -> anyhow::Result<()> { std::panic::panic_any(3u8) }).unwrap_err();
        assert_eq!(err.to_string(), "the loader panicked: no message");
        assert_eq!(unpanicked("the loader", || Ok(5)).unwrap(), 5);
    }
}
