//! AdamW (Loshchilov & Hutter) with its state in plain tensors so checkpoints can save and
//! restore it exactly (candle-nn's AdamW keeps its moments private), and the learning-rate
//! schedules candle lacks: constant, step, cosine, each with linear warm-up; and the
//! exponential moving average of the weights (`train.ema_decay`).

use std::collections::HashMap;

use anyhow::{Context, Result, bail};
use candle_core::{Tensor, Var, backprop::GradStore};

use crate::config::{OptimizerConfig, ScheduleConfig, ScheduleKind};

/// Exponential moving average of a network's variables (weights and BatchNorm statistics),
/// as timm's `ModelEmaV2`, with its warm-up: the decay at update `t` is
/// `min(decay, (1 + t) / (10 + t))`, so early averages do not cling to the initialisation.
pub struct WeightAverage {
    decay: f64,
    /// (average, trained) pairs of the same name.
    pairs: Vec<(Var, Var)>,
}

impl WeightAverage {
    /// Pairs the variables of `average` with those of `online` by name; both must hold the
    /// same names and shapes (two instances of one spec).
    pub fn new(decay: f64, average: Vec<(String, Var)>, online: Vec<(String, Var)>) -> Result<Self> {
        let mut online: HashMap<String, Var> = online.into_iter().collect();
        let pairs = average
            .into_iter()
            .map(|(name, avg)| {
                let w = online.remove(&name).with_context(|| format!("weight average: no trained variable `{name}`"))?;
                if avg.dims() != w.dims() {
                    bail!("weight average: `{name}` has shapes {:?} and {:?}", avg.dims(), w.dims());
                }
                Ok((avg, w))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { decay, pairs })
    }

    /// Moves the average towards the trained weights after optimizer step `step` (1-based).
    pub fn update(&self, step: u64) -> Result<()> {
        let d = self.decay.min((1 + step) as f64 / (10 + step) as f64);
        for (avg, w) in &self.pairs {
            let next = ((avg.as_tensor().detach() * d)? + (w.as_tensor().detach() * (1.0 - d))?)?;
            avg.set(&next)?;
        }
        Ok(())
    }
}

/// AdamW over named variables. Each variable's two moments live in one `[2, numel]` tensor
/// (rows `m` and `v`); on CPU a step is two fused passes per variable, in place (the moments,
/// then the weights), instead of a dozen tensor operations each allocating its result.
pub struct AdamW {
    vars: Vec<(String, Var)>,
    moments: Vec<Tensor>,
    step: u64,
    config: OptimizerConfig,
}

impl AdamW {
    pub fn new(vars: Vec<(String, Var)>, config: OptimizerConfig) -> Result<Self> {
        let moments = vars
            .iter()
            .map(|(_, v)| Tensor::zeros((2, v.elem_count()), v.dtype(), v.device()))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self { vars, moments, step: 0, config })
    }

    /// Optimizer steps taken.
    pub fn steps(&self) -> u64 {
        self.step
    }

    /// One update with learning rate `lr`. Variables without a gradient are left alone.
    pub fn step(&mut self, grads: &GradStore, lr: f64) -> Result<()> {
        self.step += 1;
        let c = &self.config;
        let t = self.step as i32;
        let scale_m = 1.0 / (1.0 - c.beta1.powi(t));
        let scale_v = 1.0 / (1.0 - c.beta2.powi(t));
        for (i, (_, var)) in self.vars.iter().enumerate() {
            let Some(g) = grads.get(var.as_tensor()) else { continue };
            let fused = var.device().is_cpu() && var.dtype() == candle_core::DType::F32 && var.is_contiguous();
            if fused {
                let g = g.contiguous()?;
                self.moments[i].inplace_op2(&g, &fused::Moments { beta1: c.beta1, beta2: c.beta2 })?;
                let apply = fused::Apply { lr, weight_decay: c.weight_decay, scale_m, scale_v, eps: c.eps };
                var.as_tensor().inplace_op2(&self.moments[i], &apply)?;
                continue;
            }
            let shape = var.shape();
            let (m0, v0) = (self.moments[i].get(0)?.reshape(shape)?, self.moments[i].get(1)?.reshape(shape)?);
            let m = ((m0 * c.beta1)? + (g * (1.0 - c.beta1))?)?;
            let v = ((v0 * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
            let update = ((&m * scale_m)? / ((&v * scale_v)?.sqrt()? + c.eps)?)?;
            let decayed = (var.as_tensor() * (1.0 - lr * c.weight_decay))?;
            var.set(&(decayed - (update * lr)?)?)?;
            self.moments[i] = Tensor::stack(&[m.flatten_all()?, v.flatten_all()?], 0)?;
        }
        Ok(())
    }

    /// State tensors (`m.<name>`, `v.<name>`) for a checkpoint.
    pub fn state_tensors(&self) -> HashMap<String, Tensor> {
        let mut out = HashMap::new();
        for (i, (name, var)) in self.vars.iter().enumerate() {
            for (row, prefix) in ["m", "v"].into_iter().enumerate() {
                if let Ok(t) = self.moments[i].get(row).and_then(|t| t.reshape(var.shape())) {
                    out.insert(format!("{prefix}.{name}"), t);
                }
            }
        }
        out
    }

    /// Restores [`AdamW::state_tensors`] and the step count.
    pub fn load_state(&mut self, tensors: &HashMap<String, Tensor>, step: u64) -> Result<()> {
        for (i, (name, var)) in self.vars.iter().enumerate() {
            let mut rows = Vec::with_capacity(2);
            for prefix in ["m", "v"] {
                let t = tensors
                    .get(&format!("{prefix}.{name}"))
                    .with_context(|| format!("checkpoint has no optimizer state for `{name}`"))?;
                if t.dims() != var.dims() {
                    bail!("optimizer state for `{name}` has shape {:?}, expected {:?}", t.dims(), var.dims());
                }
                rows.push(t.to_device(var.device())?.to_dtype(var.dtype())?.flatten_all()?);
            }
            self.moments[i] = Tensor::stack(&rows, 0)?;
        }
        self.step = step;
        Ok(())
    }
}

/// The CPU passes of [`AdamW::step`].
mod fused {
    use candle_core::{CpuStorage, InplaceOp2, Layout, Result, bail};
    use rayon::prelude::*;

    /// Elements per parallel chunk.
    const CHUNK: usize = 1 << 15;

    fn slice<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
        match (s, l.contiguous_offsets()) {
            (CpuStorage::F32(d), Some((a, b))) => Ok(&d[a..b]),
            _ => bail!("{what}: expected contiguous f32"),
        }
    }

    fn slice_mut<'a>(s: &'a mut CpuStorage, l: &Layout, what: &str) -> Result<&'a mut [f32]> {
        match (s, l.contiguous_offsets()) {
            (CpuStorage::F32(d), Some((a, b))) => Ok(&mut d[a..b]),
            _ => bail!("{what}: expected contiguous f32"),
        }
    }

    /// `m ← β1·m + (1 − β1)·g`, `v ← β2·v + (1 − β2)·g²` on `[m; v]`.
    pub struct Moments {
        pub beta1: f64,
        pub beta2: f64,
    }

    impl InplaceOp2 for Moments {
        fn name(&self) -> &'static str {
            "segctl-adamw-moments"
        }

        fn cpu_fwd(&self, s1: &mut CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<()> {
            let g = slice(s2, l2, "AdamW")?;
            let mv = slice_mut(s1, l1, "AdamW")?;
            if mv.len() != 2 * g.len() {
                bail!("AdamW: moments of {} values for a gradient of {}", mv.len(), g.len());
            }
            let (m, v) = mv.split_at_mut(g.len());
            let (b1, b2) = (self.beta1 as f32, self.beta2 as f32);
            let (c1, c2) = ((1.0 - self.beta1) as f32, (1.0 - self.beta2) as f32);
            m.par_chunks_mut(CHUNK).zip(v.par_chunks_mut(CHUNK)).zip(g.par_chunks(CHUNK)).for_each(|((m, v), g)| {
                for ((m, v), g) in m.iter_mut().zip(v.iter_mut()).zip(g) {
                    *m = *m * b1 + *g * c1;
                    *v = *v * b2 + *g * *g * c2;
                }
            });
            Ok(())
        }
    }

    /// `w ← w·(1 − lr·wd) − lr·(m·scale_m)/(√(v·scale_v) + ε)`.
    pub struct Apply {
        pub lr: f64,
        pub weight_decay: f64,
        pub scale_m: f64,
        pub scale_v: f64,
        pub eps: f64,
    }

    impl InplaceOp2 for Apply {
        fn name(&self) -> &'static str {
            "segctl-adamw-apply"
        }

        fn cpu_fwd(&self, s1: &mut CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<()> {
            let mv = slice(s2, l2, "AdamW")?;
            let w = slice_mut(s1, l1, "AdamW")?;
            if mv.len() != 2 * w.len() {
                bail!("AdamW: moments of {} values for {} weights", mv.len(), w.len());
            }
            let (m, v) = mv.split_at(w.len());
            let decay = (1.0 - self.lr * self.weight_decay) as f32;
            let (lr, sm, sv, eps) = (self.lr as f32, self.scale_m as f32, self.scale_v as f32, self.eps as f32);
            w.par_chunks_mut(CHUNK).zip(m.par_chunks(CHUNK)).zip(v.par_chunks(CHUNK)).for_each(|((w, m), v)| {
                for ((w, m), v) in w.iter_mut().zip(m).zip(v) {
                    let update = (*m * sm) / ((*v * sv).sqrt() + eps);
                    *w = *w * decay - update * lr;
                }
            });
            Ok(())
        }
    }
}

/// Learning rate at optimizer step `step` (0-based) of a run of `total_steps`.
pub fn learning_rate(base: f64, schedule: &ScheduleConfig, step: u64, steps_per_epoch: u64, total_steps: u64) -> f64 {
    let warmup = (schedule.warmup_epochs * steps_per_epoch as f64).round() as u64;
    if step < warmup {
        return base * (step + 1) as f64 / warmup as f64;
    }
    match schedule.kind {
        ScheduleKind::Constant => base,
        ScheduleKind::Step => {
            let epoch = step / steps_per_epoch.max(1);
            base * schedule.gamma.powi((epoch / schedule.step_epochs as u64) as i32)
        }
        ScheduleKind::Cosine => {
            let span = total_steps.saturating_sub(warmup).max(1);
            let progress = ((step - warmup) as f64 / span as f64).min(1.0);
            let floor = base * schedule.min_lr_fraction;
            floor + (base - floor) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn weight_average_follows_the_warmed_up_decay() {
        let average = Var::new(&[0.0f32, 10.0], &Device::Cpu).unwrap();
        let online = Var::new(&[1.0f32, 0.0], &Device::Cpu).unwrap();
        let averager =
            WeightAverage::new(0.9, vec![("w".into(), average.clone())], vec![("w".into(), online.clone())]).unwrap();
        // Step 1: warm-up decay (1+1)/(10+1) = 2/11 < 0.9.
        averager.update(1).unwrap();
        let d = 2.0f32 / 11.0;
        let got = average.as_tensor().to_vec1::<f32>().unwrap();
        assert!((got[0] - (1.0 - d)).abs() < 1e-6 && (got[1] - 10.0 * d).abs() < 1e-6, "{got:?}");
        // Late steps: the configured decay caps it.
        averager.update(1000).unwrap();
        let after = average.as_tensor().to_vec1::<f32>().unwrap();
        assert!((after[0] - (0.9 * got[0] + 0.1)).abs() < 1e-6, "{after:?}");
        // The trained weights are never touched.
        assert_eq!(online.as_tensor().to_vec1::<f32>().unwrap(), vec![1.0, 0.0]);
        // Mismatched models are refused.
        let other = Var::new(&[1.0f32], &Device::Cpu).unwrap();
        assert!(WeightAverage::new(0.9, vec![("w".into(), average)], vec![("w".into(), other)]).is_err());
    }

    #[test]
    fn adamw_first_step_moves_by_lr() {
        let var = Var::new(&[1.0f32, -2.0], &Device::Cpu).unwrap();
        let config = OptimizerConfig { lr: 0.1, weight_decay: 0.0, beta1: 0.9, beta2: 0.999, eps: 1e-8 };
        let mut opt = AdamW::new(vec![("w".into(), var.clone())], config).unwrap();
        let loss = (var.as_tensor() * var.as_tensor()).unwrap().sum_all().unwrap();
        opt.step(&loss.backward().unwrap(), 0.1).unwrap();
        // With bias correction the first step is lr·sign(g).
        let v = var.to_vec1::<f32>().unwrap();
        assert!((v[0] - 0.9).abs() < 1e-5 && (v[1] + 1.9).abs() < 1e-5, "{v:?}");
        let state = opt.state_tensors();
        let mut restored = AdamW::new(vec![("w".into(), var.clone())], opt.config.clone()).unwrap();
        restored.load_state(&state, opt.steps()).unwrap();
        assert_eq!(restored.steps(), 1);
    }

    #[test]
    fn schedules() {
        let mut s = ScheduleConfig { kind: ScheduleKind::Cosine, warmup_epochs: 1.0, step_epochs: 2, gamma: 0.5, min_lr_fraction: 0.0 };
        assert!((learning_rate(1.0, &s, 0, 10, 100) - 0.1).abs() < 1e-12);
        assert!((learning_rate(1.0, &s, 9, 10, 100) - 1.0).abs() < 1e-12);
        assert!((learning_rate(1.0, &s, 10, 10, 100) - 1.0).abs() < 1e-12);
        assert!((learning_rate(1.0, &s, 55, 10, 100) - 0.5).abs() < 1e-12);
        assert!(learning_rate(1.0, &s, 99, 10, 100) < 0.01);
        s.kind = ScheduleKind::Step;
        s.warmup_epochs = 0.0;
        assert_eq!(learning_rate(1.0, &s, 19, 10, 100), 1.0);
        assert_eq!(learning_rate(1.0, &s, 20, 10, 100), 0.5);
        s.kind = ScheduleKind::Constant;
        assert_eq!(learning_rate(0.3, &s, 77, 10, 100), 0.3);
    }
}
