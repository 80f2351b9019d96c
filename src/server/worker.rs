//! Dynamic batching without waiting: each model version owns a bounded queue and dedicated
//! inference threads (never the async runtime). A free thread takes the first waiting request
//! and every other one already queued (up to `max_batch_size`), and runs one model call at
//! once: a lone request never waits for company. Only when `max_delay_ms` > 0 does a thread
//! wait up to that long for a fuller batch. Requests whose client has gone or whose deadline
//! has passed are dropped before the model runs. A full queue is refused at once (503).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TryRecvError, TrySendError, bounded};

use super::budget::CpuBudget;
use super::metrics::Metrics;
use crate::infer::Predictor;

/// Batching settings (from `serve.*`).
#[derive(Debug, Clone, Copy)]
pub struct BatchSettings {
    pub max_batch_size: usize,
    pub max_delay: Duration,
    pub queue_capacity: usize,
    pub threads: usize,
}

/// One image waiting for the model.
pub struct Job {
    /// Prepared input `[3, S, S]`.
    pub input: Vec<f32>,
    pub enqueued: Instant,
    /// Past this instant nobody waits for the answer (`serve.request_timeout_ms`).
    pub deadline: Instant,
    pub reply: tokio::sync::oneshot::Sender<Result<JobOutput, String>>,
}

impl Job {
    /// The client went away (its handler was dropped) or the deadline passed.
    fn abandoned(&self, now: Instant) -> bool {
        self.reply.is_closed() || now >= self.deadline
    }
}

/// The model's answer for one image.
pub struct JobOutput {
    pub logits: Vec<f32>,
    pub queued: Duration,
    pub inference: Duration,
    pub batch_size: usize,
    /// Threads the model call ran on.
    pub threads: usize,
}

/// Why a job was not queued.
#[derive(Debug)]
pub enum SubmitError {
    QueueFull,
    Closed,
}

/// Model calls in a row that failed before the version counts as unhealthy (`/readyz`).
pub const UNHEALTHY_AFTER_FAILURES: usize = 3;

/// The queue and threads of one model version. Dropping it closes the queue; the threads
/// finish what is queued and exit.
pub struct Worker {
    sender: Sender<Job>,
    depth: Arc<AtomicUsize>,
    capacity: usize,
    failures: Arc<AtomicUsize>,
    threads: usize,
}

impl Worker {
    pub fn start(
        predictor: Arc<Predictor>,
        settings: BatchSettings,
        budget: Arc<CpuBudget>,
        metrics: Arc<Metrics>,
        name: String,
        version: u64,
    ) -> std::io::Result<Self> {
        let (sender, receiver) = bounded::<Job>(settings.queue_capacity);
        let depth = Arc::new(AtomicUsize::new(0));
        let failures = Arc::new(AtomicUsize::new(0));
        for i in 0..settings.threads.max(1) {
            let ctx = Ctx {
                receiver: receiver.clone(),
                predictor: predictor.clone(),
                settings,
                budget: budget.clone(),
                metrics: metrics.clone(),
                depth: depth.clone(),
                failures: failures.clone(),
                name: name.clone(),
                version,
            };
            std::thread::Builder::new().name(format!("segctl-model-{name}-v{version}-{i}")).spawn(move || ctx.run())?;
        }
        Ok(Self { sender, depth, capacity: settings.queue_capacity, failures, threads: settings.threads.max(1) })
    }

    /// Queues a job without waiting.
    pub fn submit(&self, job: Job) -> Result<(), SubmitError> {
        self.depth.fetch_add(1, Ordering::SeqCst);
        match self.sender.try_send(job) {
            Ok(()) => Ok(()),
            Err(e) => {
                self.depth.fetch_sub(1, Ordering::SeqCst);
                Err(match e {
                    TrySendError::Full(_) => SubmitError::QueueFull,
                    TrySendError::Disconnected(_) => SubmitError::Closed,
                })
            }
        }
    }

    pub fn queue_depth(&self) -> usize {
        self.depth.load(Ordering::SeqCst)
    }

    /// Model threads (calls that can run at once).
    pub fn threads(&self) -> usize {
        self.threads
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Whether its model calls work: fewer than [`UNHEALTHY_AFTER_FAILURES`] failed in a row
    /// (`/readyz` and the v2 model-ready route).
    pub fn healthy(&self) -> bool {
        self.consecutive_failures() < UNHEALTHY_AFTER_FAILURES
    }

    /// Model calls that failed in a row (0 after any success).
    pub fn consecutive_failures(&self) -> usize {
        self.failures.load(Ordering::SeqCst)
    }
}

struct Ctx {
    receiver: Receiver<Job>,
    predictor: Arc<Predictor>,
    settings: BatchSettings,
    budget: Arc<CpuBudget>,
    metrics: Arc<Metrics>,
    depth: Arc<AtomicUsize>,
    failures: Arc<AtomicUsize>,
    name: String,
    version: u64,
}

impl Ctx {
    fn run(self) {
        let max = self.settings.max_batch_size.max(1);
        while let Ok(first) = self.receiver.recv() {
            let mut batch = vec![first];
            // What is already queued joins the batch; nothing waits for it.
            while batch.len() < max {
                match self.receiver.try_recv() {
                    Ok(job) => batch.push(job),
                    Err(TryRecvError::Empty | TryRecvError::Disconnected) => break,
                }
            }
            if !self.settings.max_delay.is_zero() && batch.len() < max {
                let deadline = Instant::now() + self.settings.max_delay;
                while batch.len() < max {
                    match self.receiver.recv_deadline(deadline) {
                        Ok(job) => batch.push(job),
                        Err(_) => break,
                    }
                }
            }
            let taken = batch.len();
            let remaining = self.depth.fetch_sub(taken, Ordering::SeqCst).saturating_sub(taken);
            self.metrics.queue_depth(&self.name, self.version, remaining);
            let now = Instant::now();
            let (live, gone): (Vec<Job>, Vec<Job>) = batch.into_iter().partition(|j| !j.abandoned(now));
            if !gone.is_empty() {
                self.metrics.dropped_jobs(gone.len());
                for job in gone {
                    let _ = job.reply.send(Err("the request's deadline passed before the model ran (serve.request_timeout_ms)".into()));
                }
            }
            if !live.is_empty() {
                self.call(live);
            }
        }
    }

    fn call(&self, mut batch: Vec<Job>) {
        let inputs: Vec<Vec<f32>> = batch.iter_mut().map(|j| std::mem::take(&mut j.input)).collect();
        // As many cores as the CPU budget has free (at least one, at most the plan's threads):
        // a lone request gets every idle core, a busy server runs one call per core.
        let cores = self.budget.acquire_up_to(self.predictor.max_threads());
        let started = Instant::now();
        // A failing or panicking model call answers its requests with an error; the thread
        // and the server stay up.
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.predictor.logits_with(&inputs, cores.count())))
            .unwrap_or_else(|_| Err(anyhow::anyhow!("the model call panicked")));
        let threads = cores.count();
        drop(cores);
        let inference = started.elapsed();
        self.metrics.batch(&self.name, self.version, batch.len());
        let size = batch.len();
        match result {
            Ok(outputs) => {
                self.failures.store(0, Ordering::SeqCst);
                for (job, logits) in batch.into_iter().zip(outputs) {
                    let queued = started.saturating_duration_since(job.enqueued);
                    let _ = job.reply.send(Ok(JobOutput { logits, queued, inference, batch_size: size, threads }));
                }
            }
            Err(e) => {
                self.failures.fetch_add(1, Ordering::SeqCst);
                log::error!("{} v{}: model call failed: {e:#}", self.name, self.version);
                for job in batch {
                    let _ = job.reply.send(Err(format!("{e:#}")));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Arch, Config};
    use crate::model::inference::InferenceOptions;
    use crate::model::{ModelSpec, ModelState};
    use crate::model_store::{LoadedModel, ModelOrigin};

    fn predictor(size: usize, depth: usize, width: usize) -> Arc<Predictor> {
        let mut config = Config::default();
        config.data.image_size = size;
        config.model.arch = Arch::Unet;
        config.model.unet.depth = depth;
        config.model.unet.base_width = width;
        let spec = ModelSpec::from_config(&config);
        let state = ModelState::new(&spec, &candle_core::Device::Cpu, 1).unwrap();
        let origin = ModelOrigin { kind: "checkpoint", path: "test".into(), name: None, version: None };
        let loaded = LoadedModel { state, origin, manifest: None, checkpoint_meta: None };
        let options = InferenceOptions { threads: 1, idle_spin: Some(0), large_batch_kernels: false, ..Default::default() };
        Arc::new(Predictor::from_loaded(loaded, options).unwrap())
    }

    fn ask(worker: &Worker, input: Vec<f32>) -> Result<JobOutput, String> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        let now = Instant::now();
        worker.submit(Job { input, enqueued: now, deadline: now + Duration::from_secs(60), reply }).unwrap();
        answer.blocking_recv().unwrap()
    }

    #[test]
    fn failing_calls_in_a_row_are_counted_and_a_success_resets_them() {
        let p = predictor(32, 2, 4);
        let settings = BatchSettings { max_batch_size: 1, max_delay: Duration::ZERO, queue_capacity: 4, threads: 1 };
        let worker = Worker::start(p.clone(), settings, CpuBudget::new(1), Arc::new(Metrics::default()), "t".into(), 1).unwrap();
        for n in 1..=UNHEALTHY_AFTER_FAILURES {
            let err = ask(&worker, vec![0.0; 7]).err().expect("a wrong-sized input fails the call");
            assert!(err.contains("the model expects 3x32x32"), "{err}");
            assert_eq!(worker.consecutive_failures(), n);
        }
        let ok = ask(&worker, p.prepare(&image::RgbImage::new(32, 32))).unwrap();
        assert_eq!(ok.logits.len(), 3 * 32 * 32);
        assert_eq!(worker.consecutive_failures(), 0);
    }

    #[test]
    fn auto_model_threads_are_one_per_core() {
        use super::super::registry::model_threads;
        assert_eq!(model_threads(0, 2), 2);
        assert_eq!(model_threads(0, 1), 1);
        assert_eq!(model_threads(0, 0), 1);
        assert_eq!(model_threads(3, 2), 3, "a configured count is kept");
    }
}
