//! BatchNorm with its activation fused in, trainable: batch statistics with gradients in
//! training (and running statistics updated, PyTorch momentum convention), running statistics
//! at inference. On CPU the normalization, activation and their backward pass are single
//! parallel kernels; candle's version runs a dozen separate tensor passes per layer. Other
//! devices use the same formulas as tensor operations.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, D, DType, Device, Layout, Result, Shape, Tensor, Var, bail};
use candle_nn::{Init, VarBuilder};
use rayon::prelude::*;

use crate::model::blocks::{Act, activate};

/// Parameters and statistics of one BatchNorm layer.
#[derive(Debug, Clone)]
pub struct BatchNorm {
    weight: Tensor,
    bias: Tensor,
    running_mean: Var,
    running_var: Var,
    eps: f64,
    momentum: f64,
}

impl BatchNorm {
    /// Variables `weight`, `bias`, `running_mean`, `running_var` under `vb` (PyTorch names).
    pub fn new(channels: usize, eps: f64, momentum: f64, vb: VarBuilder) -> Result<Self> {
        let running_mean = vb.get_with_hints(channels, "running_mean", Init::Const(0.0))?;
        let running_var = vb.get_with_hints(channels, "running_var", Init::Const(1.0))?;
        Ok(Self {
            weight: vb.get_with_hints(channels, "weight", Init::Const(1.0))?,
            bias: vb.get_with_hints(channels, "bias", Init::Const(0.0))?,
            // The VarMap holds these as variables: `Var::from_tensor` shares their storage,
            // so updates here are what checkpoints save.
            running_mean: Var::from_tensor(&running_mean)?,
            running_var: Var::from_tensor(&running_var)?,
            eps,
            momentum,
        })
    }

    /// Normalizes `x [N, C, H, W]` and applies `act`.
    pub fn forward_act(&self, x: &Tensor, act: Act, train: bool) -> Result<Tensor> {
        let fused = matches!(x.device(), Device::Cpu) && x.dtype() == DType::F32;
        if train {
            let stats = if fused { x.contiguous()?.apply_op1_no_bwd(&ChannelStats)? } else { generic_stats(x)? };
            self.update_running(&stats, x)?;
            if fused {
                let affine = Tensor::stack(&[&self.weight, &self.bias], 0)?;
                x.contiguous()?.apply_op3(&affine, &stats, BnTrain { eps: self.eps, act })
            } else {
                let mean = stats.get(0)?;
                let var = stats.get(1)?;
                let x = x.broadcast_sub(&per_channel(&mean)?)?;
                let x = x.broadcast_div(&per_channel(&(var + self.eps)?.sqrt()?)?)?;
                activate(act, &x.broadcast_mul(&per_channel(&self.weight)?)?.broadcast_add(&per_channel(&self.bias)?)?)
            }
        } else {
            let scale = (&self.weight / (self.running_var.as_detached_tensor() + self.eps)?.sqrt()?)?;
            let shift = (&self.bias - (self.running_mean.as_detached_tensor() * &scale)?)?;
            if fused {
                x.contiguous()?.apply_op2(&Tensor::stack(&[&scale, &shift], 0)?, BnAffine { act })
            } else {
                activate(act, &x.broadcast_mul(&per_channel(&scale)?)?.broadcast_add(&per_channel(&shift)?)?)
            }
        }
    }

    /// The inference-mode normalization as a per-channel `(scale, shift)`:
    /// `y = x·scale + shift` with `scale = γ/√(σ²+ε)`, `shift = β − μ·scale`.
    pub fn inference_affine(&self) -> Result<(Vec<f32>, Vec<f32>)> {
        let scale = (&self.weight / (self.running_var.as_detached_tensor() + self.eps)?.sqrt()?)?;
        let shift = (&self.bias - (self.running_mean.as_detached_tensor() * &scale)?)?;
        Ok((scale.to_device(&Device::Cpu)?.to_vec1()?, shift.to_device(&Device::Cpu)?.to_vec1()?))
    }

    fn update_running(&self, stats: &Tensor, x: &Tensor) -> Result<()> {
        let (n, _, h, w) = x.dims4()?;
        let count = (n * h * w) as f64;
        let m = self.momentum;
        let mean = stats.get(0)?.detach();
        // Running variance uses the unbiased batch variance, as PyTorch does.
        let var = (stats.get(1)?.detach() * (count / (count - 1.0).max(1.0)))?;
        self.running_mean.set(&((self.running_mean.as_tensor() * (1.0 - m))? + (mean * m)?)?)?;
        self.running_var.set(&((self.running_var.as_tensor() * (1.0 - m))? + (var * m)?)?)?;
        Ok(())
    }
}

fn per_channel(t: &Tensor) -> Result<Tensor> {
    t.reshape((1, (), 1, 1))
}

/// Batch mean and biased variance per channel, `[2, C]`, as tensor operations.
fn generic_stats(x: &Tensor) -> Result<Tensor> {
    let c = x.dim(1)?;
    let flat = x.transpose(0, 1)?.reshape((c, ()))?;
    let mean = flat.mean(D::Minus1)?;
    let var = flat.broadcast_sub(&mean.unsqueeze(1)?)?.sqr()?.mean(D::Minus1)?;
    Tensor::stack(&[&mean, &var], 0)
}

impl Act {
    /// Derivative of the activation, from its output.
    #[inline]
    fn grad_from_output(self, y: f32) -> f32 {
        match self {
            Act::Relu => (y > 0.0) as u8 as f32,
            Act::Relu6 => (y > 0.0 && y < 6.0) as u8 as f32,
            Act::Identity => 1.0,
        }
    }

    #[inline]
    fn scalar(self, v: f32) -> f32 {
        match self {
            Act::Relu => v.max(0.0),
            Act::Relu6 => v.clamp(0.0, 6.0),
            Act::Identity => v,
        }
    }
}

fn f32_slice<'a>(storage: &'a CpuStorage, layout: &Layout, what: &str) -> Result<&'a [f32]> {
    let data = match storage {
        CpuStorage::F32(d) => d,
        _ => bail!("{what}: only f32 is supported"),
    };
    match layout.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => bail!("{what}: input must be contiguous"),
    }
}

fn dims4(layout: &Layout) -> Result<(usize, usize, usize)> {
    let (n, c, h, w) = layout.shape().dims4()?;
    Ok((n, c, h * w))
}

/// Per-channel mean and biased variance of `[N, C, H, W]` → `[2, C]` (two-pass, in f64).
struct ChannelStats;

impl CustomOp1 for ChannelStats {
    fn name(&self) -> &'static str {
        "segctl-bn-stats"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(storage, layout, "batch-norm stats")?;
        let (n, c, hw) = dims4(layout)?;
        let count = (n * hw) as f64;
        let stats: Vec<(f32, f32)> = (0..c)
            .into_par_iter()
            .map(|ch| {
                let planes = (0..n).map(|i| &x[(i * c + ch) * hw..][..hw]);
                let mean = planes.clone().map(|p| p.iter().map(|v| *v as f64).sum::<f64>()).sum::<f64>() / count;
                let var = planes.map(|p| p.iter().map(|v| (*v as f64 - mean).powi(2)).sum::<f64>()).sum::<f64>() / count;
                (mean as f32, var as f32)
            })
            .collect();
        let mut out: Vec<f32> = stats.iter().map(|s| s.0).collect();
        out.extend(stats.iter().map(|s| s.1));
        Ok((CpuStorage::F32(out), Shape::from((2, c))))
    }
}

/// Training-mode normalization + activation: `(x, [γ; β], [μ; σ²]) → act(γ·(x − μ)/√(σ² + ε) + β)`,
/// with the full BatchNorm gradient (through the batch statistics) in its backward pass.
struct BnTrain {
    eps: f64,
    act: Act,
}

impl CustomOp3 for BnTrain {
    fn name(&self) -> &'static str {
        "segctl-bn-train"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s1, l1, "batch-norm")?;
        let affine = f32_slice(s2, l2, "batch-norm")?;
        let stats = f32_slice(s3, l3, "batch-norm")?;
        let (_, c, hw) = dims4(l1)?;
        let (scale, shift) = train_scale_shift(affine, stats, c, self.eps);
        let mut out = vec![0f32; x.len()];
        let act = self.act;
        out.par_chunks_mut(hw).zip(x.par_chunks(hw)).enumerate().for_each(|(plane, (dst, src))| {
            let ch = plane % c;
            let (a, b) = (scale[ch], shift[ch]);
            for (d, s) in dst.iter_mut().zip(src) {
                *d = act.scalar(s * a + b);
            }
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        affine: &Tensor,
        stats: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let params = Tensor::cat(&[affine, stats], 0)?; // [γ; β; μ; σ²]
        let grads = x.apply_op3_no_bwd(&dy.contiguous()?, &params, &BnTrainGrad { eps: self.eps, act: self.act })?;
        // grads: [N·C·HW + 2·C] = dx then [dγ; dβ].
        let numel = x.elem_count();
        let c = affine.dim(1)?;
        let dx = grads.narrow(0, 0, numel)?.reshape(x.shape())?;
        let daffine = grads.narrow(0, numel, 2 * c)?.reshape((2, c))?;
        Ok((Some(dx), Some(daffine), None))
    }
}

fn train_scale_shift(affine: &[f32], stats: &[f32], c: usize, eps: f64) -> (Vec<f32>, Vec<f32>) {
    let mut scale = vec![0f32; c];
    let mut shift = vec![0f32; c];
    for ch in 0..c {
        let invstd = 1.0 / ((stats[c + ch] as f64 + eps).sqrt());
        scale[ch] = (affine[ch] as f64 * invstd) as f32;
        shift[ch] = (affine[c + ch] as f64 - stats[ch] as f64 * affine[ch] as f64 * invstd) as f32;
    }
    (scale, shift)
}

/// Backward of [`BnTrain`]: `(x, dy, [γ; β; μ; σ²]) → [dx…, dγ…, dβ…]`. The activation's
/// derivative comes from the recomputed pre-activation, so the output is not needed.
struct BnTrainGrad {
    eps: f64,
    act: Act,
}

impl CustomOp3 for BnTrainGrad {
    fn name(&self) -> &'static str {
        "segctl-bn-train-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s1, l1, "batch-norm grad")?;
        let dy = f32_slice(s2, l2, "batch-norm grad")?;
        let params = f32_slice(s3, l3, "batch-norm grad")?;
        let (n, c, hw) = dims4(l1)?;
        let numel = n * c * hw;
        let (scale, shift) = train_scale_shift(&params[..2 * c], &params[2 * c..], c, self.eps);
        let (mean, var) = (&params[2 * c..3 * c], &params[3 * c..4 * c]);
        let act = self.act;
        let invstd: Vec<f32> = var.iter().map(|v| (1.0 / (*v as f64 + self.eps).sqrt()) as f32).collect();
        // g = dy·act'(x·scale + shift); per channel Σg and Σg·(x − μ). Plane sums in f32,
        // channel sums in f64.
        let plane_sums: Vec<(f64, f64)> = x
            .par_chunks(hw)
            .zip(dy.par_chunks(hw))
            .enumerate()
            .map(|(plane, (xs, gs))| {
                let ch = plane % c;
                let (a, b, m) = (scale[ch], shift[ch], mean[ch]);
                let (mut sg, mut sgx) = (0f32, 0f32);
                for (xv, dv) in xs.iter().zip(gs) {
                    let g = dv * act.grad_from_output(xv * a + b);
                    sg += g;
                    sgx += g * (xv - m);
                }
                (sg as f64, sgx as f64)
            })
            .collect();
        let mut sums = vec![(0f64, 0f64); c];
        for (plane, (sg, sgx)) in plane_sums.iter().enumerate() {
            sums[plane % c].0 += sg;
            sums[plane % c].1 += sgx;
        }
        let count = (n * hw) as f64;
        let mut out = vec![0f32; numel + 2 * c];
        let (dx, daffine) = out.split_at_mut(numel);
        dx.par_chunks_mut(hw).zip(x.par_chunks(hw)).zip(dy.par_chunks(hw)).enumerate().for_each(|(plane, ((dst, xs), gs))| {
            let ch = plane % c;
            let (a, b, m, inv) = (scale[ch], shift[ch], mean[ch], invstd[ch]);
            let k = a; // γ/σ
            let mean_g = (sums[ch].0 / count) as f32;
            let mean_gx = (sums[ch].1 / count) as f32 * inv;
            for ((d, xv), dv) in dst.iter_mut().zip(xs).zip(gs) {
                let g = dv * act.grad_from_output(xv * a + b);
                let xhat = (xv - m) * inv;
                *d = k * (g - mean_g - xhat * mean_gx);
            }
        });
        for ch in 0..c {
            daffine[ch] = (sums[ch].1 * invstd[ch] as f64) as f32;
            daffine[c + ch] = sums[ch].0 as f32;
        }
        Ok((CpuStorage::F32(out), Shape::from(numel + 2 * c)))
    }
}

/// Inference-mode normalization + activation: `(x, [scale; shift]) → act(x·scale + shift)`.
struct BnAffine {
    act: Act,
}

impl CustomOp2 for BnAffine {
    fn name(&self) -> &'static str {
        "segctl-bn-affine"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s1, l1, "batch-norm")?;
        let p = f32_slice(s2, l2, "batch-norm")?;
        let (_, c, hw) = dims4(l1)?;
        let act = self.act;
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(hw).zip(x.par_chunks(hw)).enumerate().for_each(|(plane, (dst, src))| {
            let ch = plane % c;
            let (a, b) = (p[ch], p[c + ch]);
            for (d, s) in dst.iter_mut().zip(src) {
                *d = act.scalar(s * a + b);
            }
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, params: &Tensor, y: &Tensor, dy: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let c = params.dim(1)?;
        let mask = match self.act {
            Act::Identity => dy.clone(),
            Act::Relu => (dy * y.gt(0f32)?.to_dtype(DType::F32)?)?,
            Act::Relu6 => (dy * (y.gt(0f32)?.to_dtype(DType::F32)? * y.lt(6f32)?.to_dtype(DType::F32)?)?)?,
        };
        let scale = params.get(0)?.reshape((1, c, 1, 1))?;
        let dx = mask.broadcast_mul(&scale)?;
        let dscale = (&mask * x)?.sum((0, 2, 3))?;
        let dshift = mask.sum((0, 2, 3))?;
        Ok((Some(dx), Some(Tensor::stack(&[&dscale, &dshift], 0)?)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_nn::VarMap;

    fn layer(c: usize) -> (VarMap, BatchNorm) {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        BatchNorm::new(c, 1e-5, 0.1, vb).unwrap();
        // Non-trivial affine parameters.
        let data = varmap.data().lock().unwrap();
        data["weight"].set(&Tensor::new(&[1.5f32, 0.5, -1.0][..c], &Device::Cpu).unwrap()).unwrap();
        data["bias"].set(&Tensor::new(&[0.1f32, -0.3, 0.2][..c], &Device::Cpu).unwrap()).unwrap();
        drop(data);
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        (varmap.clone(), BatchNorm::new(c, 1e-5, 0.1, vb).unwrap())
    }

    /// The fused kernels against the same formulas written as candle tensor operations.
    fn reference(bn: &BatchNorm, x: &Tensor, act: Act) -> Tensor {
        let stats = generic_stats(x).unwrap();
        let x = x.broadcast_sub(&per_channel(&stats.get(0).unwrap()).unwrap()).unwrap();
        let x = x.broadcast_div(&per_channel(&(stats.get(1).unwrap() + 1e-5).unwrap().sqrt().unwrap()).unwrap()).unwrap();
        activate(act, &x.broadcast_mul(&per_channel(&bn.weight).unwrap()).unwrap().broadcast_add(&per_channel(&bn.bias).unwrap()).unwrap())
            .unwrap()
    }

    #[test]
    fn fused_training_forward_and_backward_match_tensor_ops() {
        for act in [Act::Identity, Act::Relu, Act::Relu6] {
            let (varmap, bn) = layer(3);
            let mut rng = crate::util::rng::Rng::new(4);
            let values: Vec<f32> = (0..2 * 3 * 5 * 4).map(|_| rng.normal() * 4.0 + 1.0).collect();
            let x = Var::from_vec(values, (2, 3, 5, 4), &Device::Cpu).unwrap();
            let probe = Tensor::randn(0f32, 1.0, (2, 3, 5, 4), &Device::Cpu).unwrap();
            let ours = bn.forward_act(x.as_tensor(), act, true).unwrap();
            let theirs = reference(&bn, x.as_tensor(), act);
            let diff = (&ours - &theirs).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(diff < 1e-4, "{act:?} forward {diff}");
            let g1 = (&ours * &probe).unwrap().sum_all().unwrap().backward().unwrap();
            let g2 = (&theirs * &probe).unwrap().sum_all().unwrap().backward().unwrap();
            let weight = varmap.data().lock().unwrap()["weight"].clone();
            for (name, t) in [("x", x.as_tensor()), ("weight", weight.as_tensor())] {
                let d = (g1.get(t).unwrap() - g2.get(t).unwrap()).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
                assert!(d < 1e-3, "{act:?} d{name} differs by {d}");
            }
        }
    }

    #[test]
    fn inference_uses_running_statistics() {
        let (varmap, bn) = layer(2);
        {
            let data = varmap.data().lock().unwrap();
            data["running_mean"].set(&Tensor::new(&[1f32, -1.0], &Device::Cpu).unwrap()).unwrap();
            data["running_var"].set(&Tensor::new(&[4f32, 0.25], &Device::Cpu).unwrap()).unwrap();
        }
        let x = Tensor::new(&[3f32, -1.5], &Device::Cpu).unwrap().reshape((1, 2, 1, 1)).unwrap();
        let y = bn.forward_act(&x, Act::Identity, false).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        // (3 − 1)/2·1.5 + 0.1 = 1.6; (−1.5 + 1)/0.5·0.5 − 0.3 = −0.8.
        assert!((y[0] - 1.6).abs() < 1e-4 && (y[1] + 0.8).abs() < 1e-4, "{y:?}");
    }
}
