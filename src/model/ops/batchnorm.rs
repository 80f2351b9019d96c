//! BatchNorm with its activation fused in, trainable: batch statistics with gradients in
//! training (and running statistics updated, PyTorch momentum convention), running statistics
//! at inference. On CPU feature maps the statistics, the normalization with its activation,
//! and the backward pass are each one pass of the engine's kernels ([`crate::engine::maps`]);
//! other devices use the same formulas as tensor operations on NCHW tensors.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, D, Layout, Result, Shape, Tensor, Var};
use candle_nn::{Init, VarBuilder};

use super::fmap::{self, alloc_map, profile, data, map_of, on_cpu_path, par_items, row_grain, storage};
use crate::engine::maps::{Affine, CPtr, MapShape, NormGradInput, NormGradSums, Ptr, RowStats, combine_stats};
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

    /// Normalizes `x` (a CPU feature map, or `[N, C, H, W]` elsewhere) and applies `act`.
    pub fn forward_act(&self, x: &Tensor, act: Act, train: bool) -> Result<Tensor> {
        let fused = on_cpu_path(x);
        if train {
            let stats = if fused { x.contiguous()?.apply_op1_no_bwd(&MapStats)? } else { generic_stats(x)? };
            self.update_running(&stats, x, fused)?;
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

    /// Training on a CPU feature map: `act(BN(conv(x, weight)))` as one op
    /// ([`super::unit`]), the running statistics updated as [`Self::forward_act`] does.
    pub fn forward_conv_act(&self, x: &Tensor, weight: &Tensor, geometry: super::ConvGeometry, act: Act) -> Result<Tensor> {
        let affine = Tensor::stack(&[&self.weight, &self.bias], 0)?;
        let (y, stats) = super::unit::conv_bn_act(x, weight, &affine, geometry, self.eps, act)?;
        self.update_running(&stats, &y, true)?;
        Ok(y)
    }

    /// The inference-mode normalization as a per-channel `(scale, shift)`:
    /// `y = x·scale + shift` with `scale = γ/√(σ²+ε)`, `shift = β − μ·scale`.
    pub fn inference_affine(&self) -> Result<(Vec<f32>, Vec<f32>)> {
        let scale = (&self.weight / (self.running_var.as_detached_tensor() + self.eps)?.sqrt()?)?;
        let shift = (&self.bias - (self.running_mean.as_detached_tensor() * &scale)?)?;
        Ok((scale.to_device(&candle_core::Device::Cpu)?.to_vec1()?, shift.to_device(&candle_core::Device::Cpu)?.to_vec1()?))
    }

    fn update_running(&self, stats: &Tensor, x: &Tensor, map: bool) -> Result<()> {
        let count = if map {
            let (n, m) = fmap::tensor_map(x)?;
            (n * m.h * m.w) as f64
        } else {
            let (n, _, h, w) = x.dims4()?;
            (n * h * w) as f64
        };
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

/// Batch mean and biased variance per channel of `[N, C, H, W]`, `[2, C]`, as tensor operations.
fn generic_stats(x: &Tensor) -> Result<Tensor> {
    let c = x.dim(1)?;
    let flat = x.transpose(0, 1)?.reshape((c, ()))?;
    let mean = flat.mean(D::Minus1)?;
    let var = flat.broadcast_sub(&mean.unsqueeze(1)?)?.sqr()?.mean(D::Minus1)?;
    Tensor::stack(&[&mean, &var], 0)
}

/// A per-channel vector padded with zeros to whole vectors of the kernels.
fn padded(values: impl IntoIterator<Item = f32>, c: usize) -> Result<Vec<f32>> {
    let mut v: Vec<f32> = values.into_iter().collect();
    v.resize(fmap::padded(c, fmap::isa()?), 0.0);
    Ok(v)
}

/// Per-channel mean and biased variance of a feature map → `[2, C]` (one pass of shifted
/// sums per row, rows combined in f64).
struct MapStats;

impl CustomOp1 for MapStats {
    fn name(&self) -> &'static str {
        "segctl-bn-stats"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        profile::timed(|| "bn stats".to_string(), || self.compute(s, l))
    }
}

impl MapStats {
    fn compute(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, m) = map_of(l)?;
        let x = data(s, l, "batch-norm statistics")?;
        Ok((storage(batch_stats(x, n, m)?), Shape::from((2, m.c))))
    }
}

/// `[mean; biased variance]` per channel of `n` maps of `m`.
pub(super) fn batch_stats(x: &[f32], n: usize, m: MapShape) -> Result<Vec<f32>> {
    {
        let items = n * m.h;
        let mut rows = fmap::zeros(items * 3 * m.c);
        par_items(fmap::isa()?, &RowStats { map: m, n, x: CPtr(x.as_ptr()), out: Ptr(rows.as_mut_ptr()) }, row_grain(m.w, m.c));
        let (mean, var) = combine_stats(&rows, m.c, m.w);
        let out: Vec<f32> = mean.iter().chain(&var).map(|v| *v as f32).collect();
        Ok(out)
    }
}

/// `(scale, shift)` of training-mode normalization, padded.
pub(super) fn train_scale_shift(affine: &[f32], stats: &[f32], c: usize, eps: f64) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
    let mut scale = Vec::with_capacity(c);
    let mut shift = Vec::with_capacity(c);
    let mut invstd = Vec::with_capacity(c);
    for ch in 0..c {
        let inv = 1.0 / ((stats[c + ch] as f64 + eps).sqrt());
        scale.push((affine[ch] as f64 * inv) as f32);
        shift.push((affine[c + ch] as f64 - stats[ch] as f64 * affine[ch] as f64 * inv) as f32);
        invstd.push(inv as f32);
    }
    Ok((padded(scale, c)?, padded(shift, c)?, padded(invstd, c)?))
}

/// Training-mode normalization + activation: `(x, [γ; β], [μ; σ²]) → act(γ·(x − μ)/√(σ² + ε) + β)`,
/// with the full BatchNorm gradient (through the batch statistics) in its backward pass.
struct BnTrain {
    eps: f64,
    act: Act,
}

pub(super) fn apply_affine(x: &[f32], n: usize, m: MapShape, scale: &[f32], shift: &[f32], act: Act) -> Result<Vec<f32>> {
    let mut out = alloc_map(n, m);
    let kernel = Affine { map: m, n, x: CPtr(x.as_ptr()), y: Ptr(out.as_mut_ptr()), scale: CPtr(scale.as_ptr()), shift: CPtr(shift.as_ptr()), act };
    par_items(fmap::isa()?, &kernel, row_grain(m.w, m.c));
    Ok(out)
}

impl CustomOp3 for BnTrain {
    fn name(&self) -> &'static str {
        "segctl-bn-train"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout, s3: &CpuStorage, l3: &Layout) -> Result<(CpuStorage, Shape)> {
        profile::timed(|| "bn train fwd".to_string(), || self.compute(s1, l1, s2, l2, s3, l3))
    }

    fn bwd(&self, x: &Tensor, affine: &Tensor, stats: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let params = Tensor::cat(&[affine, stats], 0)?; // [γ; β; μ; σ²]
        let (n, m) = fmap::tensor_map(x)?;
        let grads = x.contiguous()?.apply_op3_no_bwd(&dy.contiguous()?, &params, &NormGrad { eps: self.eps, act: self.act, batch_stats: true })?;
        split_grads(&grads, n, m, x.shape())
    }
}

impl BnTrain {
    fn compute(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout, s3: &CpuStorage, l3: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, m) = map_of(l1)?;
        let x = data(s1, l1, "batch-norm")?;
        let affine = data(s2, l2, "batch-norm")?;
        let stats = data(s3, l3, "batch-norm")?;
        let (scale, shift, _) = train_scale_shift(affine, stats, m.c, self.eps)?;
        Ok((storage(apply_affine(x, n, m, &scale, &shift, self.act)?), l1.shape().clone()))
    }
}

/// `[dx map | slack | d0 (C) | d1 (C)]` → `(dx, [d0; d1])`.
fn split_grads(grads: &Tensor, n: usize, m: MapShape, shape: &Shape) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
    let numel = fmap::floats(n, m);
    let slack = fmap::slack_of(m);
    let dx = grads.narrow(0, 0, numel)?.reshape(shape)?;
    let dparams = grads.narrow(0, numel + slack, 2 * m.c)?.reshape((2, m.c))?;
    Ok((Some(dx), Some(dparams), None))
}

/// Backward of the normalization: `(x, dy, params) → [dx map | slack | d0 | d1]`. With batch
/// statistics, `params` is `[γ; β; μ; σ²]` and `(d0, d1) = (dγ, dβ)`; without (evaluation
/// mode), `params` is `[scale; shift]` and `(d0, d1) = (dscale, dshift)`. The activation's
/// derivative comes from the recomputed pre-activation, so the output is not needed.
struct NormGrad {
    eps: f64,
    act: Act,
    batch_stats: bool,
}

impl CustomOp3 for NormGrad {
    fn name(&self) -> &'static str {
        "segctl-bn-grad"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout, s3: &CpuStorage, l3: &Layout) -> Result<(CpuStorage, Shape)> {
        profile::timed(|| format!("bn grad batch_stats={}", self.batch_stats), || self.compute(s1, l1, s2, l2, s3, l3))
    }
}

impl NormGrad {
    fn compute(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout, s3: &CpuStorage, l3: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, m) = map_of(l1)?;
        let x = data(s1, l1, "batch-norm gradient")?;
        let dy = data(s2, l2, "batch-norm gradient")?;
        let params = data(s3, l3, "batch-norm gradient")?;
        let out = norm_grad(x, dy, n, m, params, self.eps, self.act, self.batch_stats, fmap::isa()?)?;
        let len = out.len();
        Ok((storage(out), Shape::from(len)))
    }
}

/// [`NormGrad`] on slices: `[dx map | slack | d0 (C) | d1 (C)]`.
#[allow(clippy::too_many_arguments)]
pub(super) fn norm_grad(x: &[f32], dy: &[f32], n: usize, m: MapShape, params: &[f32], eps: f64, act: Act, batch_stats: bool, isa: crate::engine::Isa) -> Result<Vec<f32>> {
    let c = m.c;
    {
        let (scale, shift, mean, invstd) = if batch_stats {
            let (scale, shift, invstd) = train_scale_shift(&params[..2 * c], &params[2 * c..], c, eps)?;
            (scale, shift, padded(params[2 * c..3 * c].iter().copied(), c)?, invstd)
        } else {
            (padded(params[..c].iter().copied(), c)?, padded(params[c..2 * c].iter().copied(), c)?, padded(std::iter::repeat_n(0.0, c), c)?, Vec::new())
        };
        // Σg and Σg·(x − μ) per channel.
        let items = n * m.h;
        let mut rows = fmap::zeros(items * 2 * c);
        let sums = NormGradSums {
            map: m,
            n,
            x: CPtr(x.as_ptr()),
            dy: CPtr(dy.as_ptr()),
            scale: CPtr(scale.as_ptr()),
            shift: CPtr(shift.as_ptr()),
            mean: CPtr(mean.as_ptr()),
            act: act,
            out: Ptr(rows.as_mut_ptr()),
        };
        par_items(isa, &sums, row_grain(m.w, c));
        let total = fmap::sum_rows(&rows, 2 * c);
        let (sg, sgx) = total.split_at(c);
        let numel = fmap::floats(n, m);
        let slack = fmap::slack_of(m);
        let count = (n * m.h * m.w) as f64;
        let mut out = fmap::alloc_map_extra(n, m, 2 * c);
        let (mean_g, q) = if batch_stats {
            let mean_g: Vec<f32> = sg.iter().map(|v| (v / count) as f32).collect();
            let q: Vec<f32> = (0..c).map(|ch| (sgx[ch] / count) as f32 * invstd[ch] * invstd[ch]).collect();
            (padded(mean_g, c)?, padded(q, c)?)
        } else {
            (Vec::new(), Vec::new())
        };
        let dx = NormGradInput {
            map: m,
            n,
            x: CPtr(x.as_ptr()),
            dy: CPtr(dy.as_ptr()),
            dx: Ptr(out.as_mut_ptr()),
            scale: CPtr(scale.as_ptr()),
            shift: CPtr(shift.as_ptr()),
            mean: CPtr(mean.as_ptr()),
            mean_g: CPtr(if batch_stats { mean_g.as_ptr() } else { scale.as_ptr() }),
            q: CPtr(if batch_stats { q.as_ptr() } else { scale.as_ptr() }),
            act: act,
            batch_stats: batch_stats,
        };
        par_items(isa, &dx, row_grain(m.w, c));
        let tail = &mut out[numel + slack..];
        for ch in 0..c {
            if batch_stats {
                // dγ = Σ g·x̂ = Σ g·(x − μ)/σ, dβ = Σ g.
                tail[ch] = (sgx[ch] * invstd[ch] as f64) as f32;
            } else {
                // dscale = Σ g·x, dshift = Σ g.
                tail[ch] = sgx[ch] as f32;
            }
            tail[c + ch] = sg[ch] as f32;
        }
        Ok(out)
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
        profile::timed(|| "bn eval fwd".to_string(), || self.compute(s1, l1, s2, l2))
    }

    fn bwd(&self, x: &Tensor, params: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (n, m) = fmap::tensor_map(x)?;
        let grads = x.contiguous()?.apply_op3_no_bwd(&dy.contiguous()?, &params.contiguous()?, &NormGrad { eps: 0.0, act: self.act, batch_stats: false })?;
        let (dx, dp, _) = split_grads(&grads, n, m, x.shape())?;
        Ok((dx, dp))
    }
}

impl BnAffine {
    fn compute(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, m) = map_of(l1)?;
        let x = data(s1, l1, "batch-norm")?;
        let p = data(s2, l2, "batch-norm")?;
        let c = m.c;
        let (scale, shift) = (padded(p[..c].iter().copied(), c)?, padded(p[c..2 * c].iter().copied(), c)?);
        Ok((storage(apply_affine(x, n, m, &scale, &shift, self.act)?), l1.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};
    use candle_nn::VarMap;

    use crate::model::ops::{from_features, to_features};

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
            let ours = from_features(&bn.forward_act(&to_features(x.as_tensor()).unwrap(), act, true).unwrap()).unwrap();
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
        let y = from_features(&bn.forward_act(&to_features(&x).unwrap(), Act::Identity, false).unwrap()).unwrap();
        let y = y.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        // (3 − 1)/2·1.5 + 0.1 = 1.6; (−1.5 + 1)/0.5·0.5 − 0.3 = −0.8.
        assert!((y[0] - 1.6).abs() < 1e-4 && (y[1] + 0.8).abs() < 1e-4, "{y:?}");
    }
}
