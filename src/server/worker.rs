//! Dynamic batching: each model version owns a bounded queue and dedicated inference
//! threads (never the async runtime). A thread takes the first waiting request, gathers more
//! until `max_batch_size` or `max_delay_ms`, runs one model call, and answers each request
//! through its own one-shot channel. A full queue is refused at once (the caller answers 503).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TrySendError, bounded};

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
    pub reply: tokio::sync::oneshot::Sender<Result<JobOutput, String>>,
}

/// The model's answer for one image.
pub struct JobOutput {
    pub logits: Vec<f32>,
    pub queued: Duration,
    pub inference: Duration,
    pub batch_size: usize,
}

/// Why a job was not queued.
#[derive(Debug)]
pub enum SubmitError {
    QueueFull,
    Closed,
}

/// The queue and threads of one model version. Dropping it closes the queue; the threads
/// finish what is queued and exit.
pub struct Worker {
    sender: Sender<Job>,
    depth: Arc<AtomicUsize>,
    capacity: usize,
}

impl Worker {
    pub fn start(predictor: Arc<Predictor>, settings: BatchSettings, metrics: Arc<Metrics>, name: String, version: u64) -> std::io::Result<Self> {
        let (sender, receiver) = bounded::<Job>(settings.queue_capacity);
        let depth = Arc::new(AtomicUsize::new(0));
        for i in 0..settings.threads.max(1) {
            let (receiver, predictor, metrics, depth, name) =
                (receiver.clone(), predictor.clone(), metrics.clone(), depth.clone(), name.clone());
            std::thread::Builder::new()
                .name(format!("segctl-model-{name}-v{version}-{i}"))
                .spawn(move || run(receiver, predictor, settings, metrics, depth, &name, version))?;
        }
        Ok(Self { sender, depth, capacity: settings.queue_capacity })
    }

    /// Queues a job without waiting.
    pub fn submit(&self, job: Job) -> Result<(), SubmitError> {
        match self.sender.try_send(job) {
            Ok(()) => {
                self.depth.fetch_add(1, Ordering::SeqCst);
                Ok(())
            }
            Err(TrySendError::Full(_)) => Err(SubmitError::QueueFull),
            Err(TrySendError::Disconnected(_)) => Err(SubmitError::Closed),
        }
    }

    pub fn queue_depth(&self) -> usize {
        self.depth.load(Ordering::SeqCst)
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }
}

fn run(
    receiver: Receiver<Job>,
    predictor: Arc<Predictor>,
    settings: BatchSettings,
    metrics: Arc<Metrics>,
    depth: Arc<AtomicUsize>,
    name: &str,
    version: u64,
) {
    while let Ok(first) = receiver.recv() {
        let deadline = Instant::now() + settings.max_delay;
        let mut batch = vec![first];
        while batch.len() < settings.max_batch_size {
            match receiver.recv_deadline(deadline) {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let remaining = depth.fetch_sub(batch.len(), Ordering::SeqCst).saturating_sub(batch.len());
        metrics.queue_depth(name, version, remaining);
        let started = Instant::now();
        let inputs: Vec<Vec<f32>> = batch.iter_mut().map(|j| std::mem::take(&mut j.input)).collect();
        // A failing or panicking model call answers its requests with an error; the thread
        // and the server stay up.
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| predictor.logits(&inputs)))
            .unwrap_or_else(|_| Err(anyhow::anyhow!("the model call panicked")));
        let inference = started.elapsed();
        metrics.batch(name, version, batch.len());
        let size = batch.len();
        match result {
            Ok(outputs) => {
                for (job, logits) in batch.into_iter().zip(outputs) {
                    let queued = started.saturating_duration_since(job.enqueued);
                    let _ = job.reply.send(Ok(JobOutput { logits, queued, inference, batch_size: size }));
                }
            }
            Err(e) => {
                log::error!("{name} v{version}: model call failed: {e:#}");
                for job in batch {
                    let _ = job.reply.send(Err(format!("{e:#}")));
                }
            }
        }
    }
}
