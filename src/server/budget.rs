//! The server's two budgets. [`CpuBudget`]: one token per core the server may use, shared by
//! the request stages (decode, resize, post-processing, encoding) and the model calls, so the
//! stages and the inference threads never oversubscribe the machine; a model call takes every
//! free token (a lone request runs on all idle cores) and is served before waiting stages.
//! [`MemoryBudget`]: bytes of request data in flight (bodies, decoded photos, masks, answers),
//! reserved before the work that needs them, so no mix of requests can exhaust memory.

use std::sync::{Arc, Condvar, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Cores the server may keep busy.
pub struct CpuBudget {
    total: usize,
    state: Mutex<CpuState>,
    freed: Condvar,
}

struct CpuState {
    free: usize,
    /// Model calls waiting for a token: stages let them go first.
    calls_waiting: usize,
    /// Stages waiting for a token: a model call then takes only one, so that the stages run
    /// beside it (one call per core is more efficient than one call split across cores).
    stages_waiting: usize,
}

/// Tokens held; returned on drop.
pub struct CpuPermit {
    budget: Arc<CpuBudget>,
    count: usize,
}

impl CpuPermit {
    pub fn count(&self) -> usize {
        self.count
    }
}

impl Drop for CpuPermit {
    fn drop(&mut self) {
        let mut s = self.budget.state.lock().unwrap_or_else(|e| e.into_inner());
        s.free += self.count;
        drop(s);
        self.budget.freed.notify_all();
    }
}

impl CpuBudget {
    pub fn new(cores: usize) -> Arc<Self> {
        let total = cores.max(1);
        Arc::new(Self { total, state: Mutex::new(CpuState { free: total, calls_waiting: 0, stages_waiting: 0 }), freed: Condvar::new() })
    }

    pub fn total(&self) -> usize {
        self.total
    }

    /// One token for a request stage (blocks a blocking-pool thread, never the runtime).
    pub fn acquire_stage(self: &Arc<Self>) -> CpuPermit {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.stages_waiting += 1;
        let mut s = self.freed.wait_while(s, |s| s.free == 0 || s.calls_waiting > 0).unwrap_or_else(|e| e.into_inner());
        s.stages_waiting -= 1;
        s.free -= 1;
        CpuPermit { budget: self.clone(), count: 1 }
    }

    /// At least one and at most `max` tokens for a model call: every free one when no stage
    /// waits, else one.
    pub fn acquire_up_to(self: &Arc<Self>, max: usize) -> CpuPermit {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.calls_waiting += 1;
        let mut s = self.freed.wait_while(s, |s| s.free == 0).unwrap_or_else(|e| e.into_inner());
        s.calls_waiting -= 1;
        let count = if s.stages_waiting > 0 { 1 } else { s.free.min(max.max(1)) };
        s.free -= count;
        CpuPermit { budget: self.clone(), count }
    }
}

/// Bytes of request data in flight, in KiB units (a semaphore's permits).
pub struct MemoryBudget {
    kib: Arc<Semaphore>,
    total_bytes: u64,
}

/// Reserved bytes; returned on drop.
pub struct MemoryPermit {
    _permit: Option<OwnedSemaphorePermit>,
    pub bytes: u64,
}

/// Why a reservation was refused.
#[derive(Debug, PartialEq, Eq)]
pub enum Refused {
    /// More than the whole budget: this request can never run.
    OverBudget { bytes: u64, budget: u64 },
    /// The budget stayed full until the deadline.
    Busy,
}

impl MemoryBudget {
    pub fn new(total_bytes: u64) -> Self {
        let kib = (total_bytes / 1024).clamp(1, u32::MAX as u64) as usize;
        Self { kib: Arc::new(Semaphore::new(kib)), total_bytes }
    }

    pub fn total_bytes(&self) -> u64 {
        self.total_bytes
    }

    /// Bytes reserved by requests right now.
    pub fn in_flight_bytes(&self) -> u64 {
        let total_kib = (self.total_bytes / 1024).clamp(1, u32::MAX as u64);
        total_kib.saturating_sub(self.kib.available_permits() as u64) * 1024
    }

    /// Adds `extra` bytes to `permit` (a body growing as it arrives), waiting until
    /// `deadline` while other requests hold the budget.
    pub async fn grow(&self, permit: &mut MemoryPermit, extra: u64, deadline: tokio::time::Instant) -> Result<(), Refused> {
        let bytes = permit.bytes + extra;
        if bytes > self.total_bytes {
            return Err(Refused::OverBudget { bytes, budget: self.total_bytes });
        }
        let more = (bytes.div_ceil(1024) - permit.bytes.div_ceil(1024)) as u32;
        if more > 0 {
            let p = match tokio::time::timeout_at(deadline, self.kib.clone().acquire_many_owned(more)).await {
                Ok(Ok(p)) => p,
                _ => return Err(Refused::Busy),
            };
            match &mut permit._permit {
                Some(held) => held.merge(p),
                none => *none = Some(p),
            }
        }
        permit.bytes = bytes;
        Ok(())
    }

    /// Reserves `bytes`, waiting until `deadline` while other requests hold the budget.
    pub async fn reserve(&self, bytes: u64, deadline: tokio::time::Instant) -> Result<MemoryPermit, Refused> {
        if bytes > self.total_bytes {
            return Err(Refused::OverBudget { bytes, budget: self.total_bytes });
        }
        let kib = bytes.div_ceil(1024) as u32;
        if kib == 0 {
            return Ok(MemoryPermit { _permit: None, bytes });
        }
        match tokio::time::timeout_at(deadline, self.kib.clone().acquire_many_owned(kib)).await {
            Ok(Ok(p)) => Ok(MemoryPermit { _permit: Some(p), bytes }),
            _ => Err(Refused::Busy),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn model_calls_take_every_free_core_and_stages_one() {
        let budget = CpuBudget::new(4);
        let stage = budget.acquire_stage();
        assert_eq!(stage.count(), 1);
        let call = budget.acquire_up_to(8);
        assert_eq!(call.count(), 3);
        drop(stage);
        let small = budget.acquire_up_to(2);
        assert_eq!(small.count(), 1);
        drop((call, small));
        assert_eq!(budget.acquire_up_to(2).count(), 2);
    }

    #[test]
    fn a_call_leaves_cores_to_waiting_stages() {
        let budget = CpuBudget::new(2);
        let first = budget.acquire_up_to(2);
        assert_eq!(first.count(), 2, "nothing waits: every core");
        let b = budget.clone();
        let stage = std::thread::spawn(move || b.acquire_stage().count());
        let b = budget.clone();
        let call = std::thread::spawn(move || b.acquire_up_to(2).count());
        std::thread::sleep(Duration::from_millis(50));
        drop(first);
        assert_eq!(call.join().unwrap(), 1, "a stage waits: one core for the call");
        assert_eq!(stage.join().unwrap(), 1);
    }

    #[test]
    fn a_waiting_stage_resumes_when_a_call_returns_its_cores() {
        let budget = CpuBudget::new(1);
        let call = budget.acquire_up_to(1);
        let b = budget.clone();
        let waiter = std::thread::spawn(move || b.acquire_stage().count());
        std::thread::sleep(Duration::from_millis(50));
        assert!(!waiter.is_finished());
        drop(call);
        assert_eq!(waiter.join().unwrap(), 1);
    }

    #[tokio::test]
    async fn memory_is_refused_over_the_budget_and_waited_for_within_it() {
        let budget = MemoryBudget::new(10 << 20);
        let soon = || tokio::time::Instant::now() + Duration::from_millis(100);
        assert_eq!(budget.reserve(11 << 20, soon()).await.err(), Some(Refused::OverBudget { bytes: 11 << 20, budget: 10 << 20 }));
        let a = budget.reserve(6 << 20, soon()).await.unwrap();
        assert_eq!(budget.in_flight_bytes(), 6 << 20);
        assert_eq!(budget.reserve(6 << 20, soon()).await.err(), Some(Refused::Busy));
        drop(a);
        assert_eq!(budget.in_flight_bytes(), 0);
        assert!(budget.reserve(6 << 20, soon()).await.is_ok());
    }

    #[tokio::test]
    async fn a_permit_grows_in_steps_within_the_budget() {
        let budget = MemoryBudget::new(4 << 20);
        let soon = || tokio::time::Instant::now() + Duration::from_millis(100);
        let mut permit = budget.reserve(0, soon()).await.unwrap();
        for _ in 0..3 {
            budget.grow(&mut permit, 1000 << 10, soon()).await.unwrap();
        }
        assert_eq!((permit.bytes, budget.in_flight_bytes()), (3000 << 10, 3000 << 10));
        let other = budget.reserve(1200 << 10, soon()).await;
        assert_eq!(other.err(), Some(Refused::Busy), "the grown permit holds its bytes");
        assert_eq!(budget.grow(&mut permit, 2 << 20, soon()).await.err(), Some(Refused::OverBudget { bytes: 5048 << 10, budget: 4 << 20 }));
        drop(permit);
        assert_eq!(budget.in_flight_bytes(), 0);
    }
}
