//! Convolution → BatchNorm (batch statistics) → activation as one training op on CPU
//! feature maps.
//!
//! As three ops, candle would hold the convolution's output as a tensor of its own and, in the
//! backward pass, build its gradient through a zeroed accumulator and a sum (candle's
//! gradient store adds every gradient into a fresh zero tensor), then the next op would copy
//! it once more to give the tiles their slack. Here the convolution's output stays inside the
//! op (kept for the backward pass) and its gradient is never a tensor: the backward pass runs
//! the normalization's gradient, then the convolution's input and weight gradients, on this
//! op's own buffers.

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp1, CustomOp3, Layout, Result, Shape, Tensor, bail};

use super::batchnorm::{apply_affine, batch_stats, norm_grad, train_scale_shift};
use super::conv::{ConvGeometry, forward, grad_input, grad_weight};
use super::fmap::{self, data, map_of, profile, shape_of, storage, with_slack};
use crate::engine::graph::Act;
use crate::engine::maps::MapShape;

/// What the forward pass keeps for the backward pass.
struct Saved {
    /// The convolution's output, with slack.
    z: Vec<f32>,
    zm: MapShape,
    /// `[mean; variance]` of `z`.
    stats: Vec<f32>,
}

/// The unit's forward op: `(x, w, [γ; β]) → act(BN(conv(x, w)))`.
struct UnitForward {
    geometry: ConvGeometry,
    eps: f64,
    act: Act,
    saved: Arc<Mutex<Option<Saved>>>,
}

impl CustomOp3 for UnitForward {
    fn name(&self) -> &'static str {
        "segctl-conv-bn-act"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout, s3: &CpuStorage, l3: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, xm) = map_of(l1)?;
        let x = with_slack(s1, l1, fmap::slack_of(xm), "convolution")?;
        let w = data(s2, l2, "convolution")?;
        let affine = data(s3, l3, "batch-norm")?;
        let (cin, cout) = self.geometry.channels(l2.shape().dims())?;
        let isa = fmap::isa()?;
        let (z, zm) = forward(self.geometry, &x, n, xm, w, cin, cout, None, Act::Identity, isa)?;
        if affine.len() != 2 * zm.c {
            bail!("batch-norm: {} parameters for {} channels", affine.len(), zm.c);
        }
        let (y, stats) = profile::timed(
            || "bn stats + normalize (fused unit)".to_string(),
            || -> Result<_> {
                let stats = batch_stats(&z, n, zm)?;
                let (scale, shift, _) = train_scale_shift(affine, &stats, zm.c, self.eps)?;
                Ok((apply_affine(&z, n, zm, &scale, &shift, self.act)?, stats))
            },
        )?;
        *self.saved.lock().unwrap_or_else(|e| e.into_inner()) = Some(Saved { z, zm, stats });
        Ok((storage(y), Shape::from(shape_of(n, zm))))
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, affine: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dx_out = Arc::new(Mutex::new(None));
        let back = UnitBackward {
            geometry: self.geometry,
            eps: self.eps,
            act: self.act,
            saved: Arc::clone(&self.saved),
            affine: affine.flatten_all()?.to_vec1::<f32>()?,
            w_dims: w.dims().to_vec(),
            x_dims: x.dims().to_vec(),
            want_dx: x.track_op(),
            dx_out: Arc::clone(&dx_out),
        };
        // [dw | dγ | dβ]; dx (when wanted) comes out of the same pass, kept aside.
        let rest = dy.contiguous()?.apply_op3_no_bwd(&x.contiguous()?, &w.contiguous()?, &back)?;
        let wn = w.elem_count();
        let c = affine.dim(1)?;
        let dw = rest.narrow(0, 0, wn)?.reshape(w.shape())?;
        let daffine = rest.narrow(0, wn, 2 * c)?.reshape((2, c))?;
        let dx = if back.want_dx { Some(dy.apply_op1_no_bwd(&Emit { data: dx_out, dims: x.dims().to_vec() })?) } else { None };
        Ok((dx, Some(dw), Some(daffine)))
    }
}

/// The backward pass: `(dy, x, w) → [dw | dγ | dβ]`, with `dx` left in `dx_out`.
struct UnitBackward {
    geometry: ConvGeometry,
    eps: f64,
    act: Act,
    saved: Arc<Mutex<Option<Saved>>>,
    affine: Vec<f32>,
    w_dims: Vec<usize>,
    x_dims: Vec<usize>,
    want_dx: bool,
    dx_out: Arc<Mutex<Option<Vec<f32>>>>,
}

impl CustomOp3 for UnitBackward {
    fn name(&self) -> &'static str {
        "segctl-conv-bn-act-grad"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout, s3: &CpuStorage, l3: &Layout) -> Result<(CpuStorage, Shape)> {
        let Some(saved) = self.saved.lock().unwrap_or_else(|e| e.into_inner()).take() else {
            bail!("conv-bn-act: the backward pass ran twice (or without its forward pass)");
        };
        let (n, zm) = map_of(l1)?;
        if zm != saved.zm {
            bail!("conv-bn-act: a gradient of shape {:?} for an output of {:?}", l1.shape().dims(), saved.zm);
        }
        let dy = data(s1, l1, "batch-norm gradient")?;
        let (_, xm) = map_of(l2)?;
        let x = with_slack(s2, l2, fmap::slack_of(xm), "convolution gradient")?;
        let w = data(s3, l3, "convolution gradient")?;
        let isa = fmap::isa()?;
        let c = zm.c;
        let mut params = self.affine.clone();
        params.extend_from_slice(&saved.stats);
        // [dz | slack | dγ | dβ]: dz keeps its slack for the tiles.
        let dz = profile::timed(|| "bn grad (fused unit)".to_string(), || norm_grad(&saved.z, dy, n, zm, &params, self.eps, self.act, true, isa))?;
        drop(saved);
        let numel = fmap::floats(n, zm);
        let tail = &dz[numel + fmap::slack_of(zm)..];
        let g = self.geometry;
        let what = || format!("{:?} k{} s{} {:?} {}×{}", g.kind, g.k, g.stride, self.w_dims, xm.h, xm.w);
        let mut out = profile::timed(|| format!("grad-weight {}", what()), || grad_weight(g, &x, xm, &dz, zm, n, isa))?;
        out.extend_from_slice(&tail[..2 * c]);
        if self.want_dx {
            let (dx, _) = profile::timed(|| format!("grad-input {}", what()), || grad_input(g, &dz, n, zm, w, &self.w_dims, &self.x_dims, isa))?;
            *self.dx_out.lock().unwrap_or_else(|e| e.into_inner()) = Some(dx);
        }
        let len = out.len();
        Ok((storage(out), Shape::from(len)))
    }
}

/// Hands over a buffer computed by another op as a tensor (its storage, slack included).
struct Emit {
    data: Arc<Mutex<Option<Vec<f32>>>>,
    dims: Vec<usize>,
}

impl CustomOp1 for Emit {
    fn name(&self) -> &'static str {
        "segctl-emit"
    }

    fn cpu_fwd(&self, _s: &CpuStorage, _l: &Layout) -> Result<(CpuStorage, Shape)> {
        let Some(buffer) = self.data.lock().unwrap_or_else(|e| e.into_inner()).take() else {
            bail!("internal: nothing to emit");
        };
        let shape = Shape::from(self.dims.clone());
        if buffer.len() < shape.elem_count() {
            bail!("internal: {} values for shape {:?}", buffer.len(), self.dims);
        }
        Ok((storage(buffer), shape))
    }
}

/// `act(BN(conv(x, w)))` with batch statistics (training); also returns `[mean; variance]`
/// of the convolution's output, for the running statistics.
pub fn conv_bn_act(x: &Tensor, w: &Tensor, affine: &Tensor, geometry: ConvGeometry, eps: f64, act: Act) -> Result<(Tensor, Tensor)> {
    let saved = Arc::new(Mutex::new(None));
    let op = UnitForward { geometry, eps, act, saved: Arc::clone(&saved) };
    let y = x.contiguous()?.apply_op3_arc(&w.contiguous()?, &affine.contiguous()?, Arc::new(Box::new(op)))?;
    let stats = match saved.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
        Some(s) => Tensor::from_slice(&s.stats, (2, s.zm.c), x.device())?,
        None => bail!("internal: the unit kept no statistics"),
    };
    Ok((y, stats))
}
