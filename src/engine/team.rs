//! A fixed team of worker threads that runs one job at a time together with the caller, and
//! the spin barrier its threads meet at between steps.

use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use anyhow::{Context, Result};

/// A fixed team of worker threads that runs one job at a time together with the caller.
pub struct Team {
    pub(super) shared: Arc<TeamShared>,
    handles: Vec<JoinHandle<()>>,
}

type Job = dyn Fn(usize, &SpinBarrier) + Sync + 'static;

pub(super) struct TeamShared {
    /// The current job, valid while `pending > 0`.
    job: UnsafeCell<Option<*const Job>>,
    epoch: AtomicU64,
    pending: AtomicUsize,
    stop: AtomicBool,
    sleepers: AtomicUsize,
    /// Spin rounds a worker waits for the next call before sleeping.
    pub(super) idle_spin: AtomicUsize,
    /// Threads (caller included) taking part in the current job.
    participants: AtomicUsize,
    lock: Mutex<()>,
    wake: Condvar,
    barrier: SpinBarrier,
}

// SAFETY: `job` is written only by the caller while no worker reads it (before the epoch is
// published and after every worker reported done).
unsafe impl Sync for TeamShared {}
unsafe impl Send for TeamShared {}

/// Spins this many rounds for the next job before sleeping.
const SPIN_ROUNDS: usize = 1 << 16;

impl Team {
    pub fn new(workers: usize) -> Result<Team> {
        let shared = Arc::new(TeamShared {
            job: UnsafeCell::new(None),
            epoch: AtomicU64::new(0),
            pending: AtomicUsize::new(0),
            stop: AtomicBool::new(false),
            sleepers: AtomicUsize::new(0),
            idle_spin: AtomicUsize::new(SPIN_ROUNDS),
            participants: AtomicUsize::new(workers + 1),
            lock: Mutex::new(()),
            wake: Condvar::new(),
            barrier: SpinBarrier::new(workers + 1),
        });
        let mut handles = Vec::with_capacity(workers);
        for tid in 1..=workers {
            let shared = Arc::clone(&shared);
            let handle = std::thread::Builder::new()
                .name(format!("segctl-infer-{tid}"))
                .spawn(move || worker(&shared, tid))
                .context("failed to start an inference thread")?;
            handles.push(handle);
        }
        Ok(Team { shared, handles })
    }

    /// Runs `job(tid, barrier)` on every thread (the caller is thread 0) and waits.
    /// Runs `job(tid, barrier)` on the caller (thread 0) and the first `participants − 1`
    /// workers, and waits; the other workers skip it.
    pub fn run(&self, job: &(dyn Fn(usize, &SpinBarrier) + Sync), participants: usize) {
        let s = &self.shared;
        // SAFETY: no worker is running a job (the previous call waited for all), so none
        // reads `job`; the reference outlives this call, which waits for every worker.
        unsafe {
            *s.job.get() = Some(std::mem::transmute::<&(dyn Fn(usize, &SpinBarrier) + Sync), *const Job>(job));
        }
        s.pending.store(self.handles.len(), Ordering::Relaxed);
        s.participants.store(participants.clamp(1, self.handles.len() + 1), Ordering::Relaxed);
        s.barrier.total.store(participants.clamp(1, self.handles.len() + 1), Ordering::Relaxed);
        s.epoch.fetch_add(1, Ordering::Release);
        if s.sleepers.load(Ordering::Acquire) > 0 {
            let _guard = s.lock.lock().unwrap_or_else(|e| e.into_inner());
            s.wake.notify_all();
        }
        job(0, &s.barrier);
        let mut spins = 0usize;
        while s.pending.load(Ordering::Acquire) > 0 {
            spins += 1;
            if spins < SPIN_ROUNDS {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
    }
}

impl Drop for Team {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        self.shared.epoch.fetch_add(1, Ordering::Release);
        {
            let _guard = self.shared.lock.lock().unwrap_or_else(|e| e.into_inner());
            self.shared.wake.notify_all();
        }
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}

fn worker(s: &TeamShared, tid: usize) {
    let mut seen = 0u64;
    loop {
        let mut spins = 0usize;
        loop {
            let epoch = s.epoch.load(Ordering::Acquire);
            if epoch != seen {
                seen = epoch;
                break;
            }
            spins += 1;
            if spins < s.idle_spin.load(Ordering::Relaxed) {
                std::hint::spin_loop();
                continue;
            }
            let guard = s.lock.lock().unwrap_or_else(|e| e.into_inner());
            s.sleepers.fetch_add(1, Ordering::AcqRel);
            let guard = s
                .wake
                .wait_while(guard, |_| s.epoch.load(Ordering::Acquire) == seen)
                .unwrap_or_else(|e| e.into_inner());
            s.sleepers.fetch_sub(1, Ordering::AcqRel);
            drop(guard);
        }
        if s.stop.load(Ordering::Acquire) {
            return;
        }
        // SAFETY: the epoch was published after the job was set; the caller keeps it alive
        // until `pending` reaches zero.
        let job = unsafe { (*s.job.get()).map(|j| &*j) };
        if let Some(job) = job {
            if tid < s.participants.load(Ordering::Relaxed) {
                job(tid, &s.barrier);
            }
        }
        s.pending.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A sense-reversing spin barrier for the team (yields after a while, so an oversubscribed
/// machine still makes progress).
pub struct SpinBarrier {
    count: AtomicUsize,
    generation: AtomicUsize,
    /// Threads taking part in the current job.
    pub(super) total: AtomicUsize,
}

impl SpinBarrier {
    fn new(total: usize) -> Self {
        Self { count: AtomicUsize::new(0), generation: AtomicUsize::new(0), total: AtomicUsize::new(total) }
    }

    pub fn wait(&self) {
        let generation = self.generation.load(Ordering::Acquire);
        if self.count.fetch_add(1, Ordering::AcqRel) + 1 == self.total.load(Ordering::Relaxed) {
            self.count.store(0, Ordering::Relaxed);
            self.generation.fetch_add(1, Ordering::Release);
            return;
        }
        let mut spins = 0usize;
        while self.generation.load(Ordering::Acquire) == generation {
            spins += 1;
            if spins < SPIN_ROUNDS {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
    }
}
