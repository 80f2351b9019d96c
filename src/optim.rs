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

/// AdamW over named variables.
pub struct AdamW {
    vars: Vec<(String, Var)>,
    first_moment: Vec<Tensor>,
    second_moment: Vec<Tensor>,
    step: u64,
    config: OptimizerConfig,
}

impl AdamW {
    pub fn new(vars: Vec<(String, Var)>, config: OptimizerConfig) -> Result<Self> {
        let zeros = |v: &Var| v.as_tensor().zeros_like();
        let first_moment = vars.iter().map(|(_, v)| zeros(v)).collect::<candle_core::Result<Vec<_>>>()?;
        let second_moment = vars.iter().map(|(_, v)| zeros(v)).collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self { vars, first_moment, second_moment, step: 0, config })
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
            let m = ((&self.first_moment[i] * c.beta1)? + (g * (1.0 - c.beta1))?)?;
            let v = ((&self.second_moment[i] * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
            let update = ((&m * scale_m)? / ((&v * scale_v)?.sqrt()? + c.eps)?)?;
            let decayed = (var.as_tensor() * (1.0 - lr * c.weight_decay))?;
            var.set(&(decayed - (update * lr)?)?)?;
            self.first_moment[i] = m;
            self.second_moment[i] = v;
        }
        Ok(())
    }

    /// State tensors (`m.<name>`, `v.<name>`) for a checkpoint.
    pub fn state_tensors(&self) -> HashMap<String, Tensor> {
        let mut out = HashMap::new();
        for (i, (name, _)) in self.vars.iter().enumerate() {
            out.insert(format!("m.{name}"), self.first_moment[i].clone());
            out.insert(format!("v.{name}"), self.second_moment[i].clone());
        }
        out
    }

    /// Restores [`AdamW::state_tensors`] and the step count.
    pub fn load_state(&mut self, tensors: &HashMap<String, Tensor>, step: u64) -> Result<()> {
        for (i, (name, var)) in self.vars.iter().enumerate() {
            for (prefix, slot) in [("m", &mut self.first_moment[i]), ("v", &mut self.second_moment[i])] {
                let t = tensors
                    .get(&format!("{prefix}.{name}"))
                    .with_context(|| format!("checkpoint has no optimizer state for `{name}`"))?;
                if t.dims() != var.dims() {
                    bail!("optimizer state for `{name}` has shape {:?}, expected {:?}", t.dims(), var.dims());
                }
                *slot = t.to_device(var.device())?;
            }
        }
        self.step = step;
        Ok(())
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
