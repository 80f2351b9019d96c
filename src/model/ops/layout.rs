//! Feature-map ops that move data: the conversions between candle's planar `[N, C, H, W]`
//! and CPU feature maps at a model's edges, 2×2 max pooling, depth-to-space and channel
//! concatenation, each a custom op whose backward pass is the matching kernel.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor, bail};

use super::fmap::{self, alloc_map, profile, data, map_of, par_items, row_grain, shape_of, storage, with_slack};
use crate::engine::kernels::{Kernel, zero_borders};
use crate::engine::maps::{CPtr, CopyChannels, DepthToSpace, FromPadded, MapShape, MaxPoolGrad, Ptr, ToPadded};

/// `[N, C, H, W]` → a feature map.
struct ToMap;

impl CustomOp1 for ToMap {
    fn name(&self) -> &'static str {
        "segctl-to-map"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        profile::timed(|| "to-map".to_string(), || self.compute(s, l))
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(dy.contiguous()?.apply_op1(FromMap)?))
    }
}

impl ToMap {
    fn compute(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, c, h, w) = l.shape().dims4()?;
        let x = data(s, l, "feature map")?;
        let m = MapShape::new(h, w, c);
        let mut out = alloc_map(n, m);
        par_items(fmap::isa()?, &ToPadded { map: m, n, src: CPtr(x.as_ptr()), dst: Ptr(out.as_mut_ptr()) }, row_grain(w, c));
        Ok((storage(out), Shape::from(shape_of(n, m))))
    }
}

/// A feature map → `[N, C, H, W]`.
struct FromMap;

impl CustomOp1 for FromMap {
    fn name(&self) -> &'static str {
        "segctl-from-map"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        profile::timed(|| "from-map".to_string(), || self.compute(s, l))
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(dy.contiguous()?.apply_op1(ToMap)?))
    }
}

impl FromMap {
    fn compute(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, m) = map_of(l)?;
        let x = data(s, l, "feature map")?;
        let mut out = vec![0f32; n * m.c * m.h * m.w];
        par_items(fmap::isa()?, &FromPadded { map: m, n, src: CPtr(x.as_ptr()), dst: Ptr(out.as_mut_ptr()) }, row_grain(m.w, m.c));
        Ok((storage(out), Shape::from((n, m.c, m.h, m.w))))
    }
}

/// Planar `[N, C, H, W]` into a CPU feature map (differentiable).
pub fn to_map(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(ToMap)
}

/// A CPU feature map back to planar `[N, C, H, W]` (differentiable).
pub fn from_map(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(FromMap)
}

/// 2×2 max pooling, stride 2 (odd edges dropped).
struct MaxPool;

impl CustomOp1 for MaxPool {
    fn name(&self) -> &'static str {
        "segctl-maxpool"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        profile::timed(|| "maxpool".to_string(), || self.compute(s, l))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(x.contiguous()?.apply_op2_no_bwd(&dy.contiguous()?, &MaxPoolBackward)?))
    }
}

impl MaxPool {
    fn compute(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, m) = map_of(l)?;
        let x = with_slack(s, l, fmap::slack_of(m), "max pooling")?;
        let kernel = Kernel::max_pool(m.h, m.w, m.c, fmap::isa()?).map_err(|e| candle_core::Error::Msg(format!("{e:#}")))?;
        let o = MapShape::new(m.h / 2, m.w / 2, m.c);
        let mut out = alloc_map(n, o);
        let work = kernel.work(n, 1);
        // SAFETY: `out` holds n output maps; every item writes its own output row.
        unsafe { zero_borders(out.as_mut_ptr(), n, o.h, o.w, o.c) };
        let (xp, op) = (CPtr(x.as_ptr()), Ptr(out.as_mut_ptr()));
        let grain = row_grain(m.w, m.c);
        let run = |chunk: usize| {
            let (xp, op) = (&xp, &op);
            for item in chunk * grain..((chunk + 1) * grain).min(work.items) {
                // SAFETY: as above; the input has its slack.
                unsafe { kernel.run(xp.0, op.0, n, &work, item, std::ptr::null_mut()) };
            }
        };
        use rayon::prelude::*;
        (0..work.items.div_ceil(grain)).into_par_iter().for_each(run);
        Ok((storage(out), Shape::from(shape_of(n, o))))
    }
}

struct MaxPoolBackward;

impl CustomOp2 for MaxPoolBackward {
    fn name(&self) -> &'static str {
        "segctl-maxpool-grad"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        profile::timed(|| "maxpool-grad".to_string(), || self.compute(s1, l1, s2, l2))
    }
}

impl MaxPoolBackward {
    fn compute(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, m) = map_of(l1)?;
        let x = data(s1, l1, "max pooling gradient")?;
        let dy = data(s2, l2, "max pooling gradient")?;
        let mut out = alloc_map(n, m);
        let kernel = MaxPoolGrad { map: m, n, x: CPtr(x.as_ptr()), dy: CPtr(dy.as_ptr()), dx: Ptr(out.as_mut_ptr()) };
        par_items(fmap::isa()?, &kernel, row_grain(2 * m.w, m.c));
        Ok((storage(out), l1.shape().clone()))
    }
}

/// 2×2 max pooling of a feature map; the gradient goes to each window's first maximum.
pub fn max_pool2x2(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(MaxPool)
}

/// Depth-to-space by 2, or space-to-depth (`inverse`).
struct Shuffle {
    inverse: bool,
}

impl CustomOp1 for Shuffle {
    fn name(&self) -> &'static str {
        "segctl-depth-to-space"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        profile::timed(|| format!("depth-to-space inverse={}", self.inverse), || self.compute(s, l))
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(dy.contiguous()?.apply_op1(Shuffle { inverse: !self.inverse })?))
    }
}

impl Shuffle {
    fn compute(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, m) = map_of(l)?;
        let x = data(s, l, "depth-to-space")?;
        let (small, large) = if self.inverse {
            if m.h % 2 == 1 || m.w % 2 == 1 {
                bail!("space-to-depth needs an even map, not {}×{}", m.h, m.w);
            }
            (MapShape::new(m.h / 2, m.w / 2, m.c * 4), m)
        } else {
            if m.c % 4 != 0 {
                bail!("depth-to-space by 2 needs a multiple of 4 channels, not {}", m.c);
            }
            (m, MapShape::new(m.h * 2, m.w * 2, m.c / 4))
        };
        let target = if self.inverse { small } else { large };
        let mut out = alloc_map(n, target);
        let kernel = DepthToSpace { map: small, n, src: CPtr(x.as_ptr()), dst: Ptr(out.as_mut_ptr()), inverse: self.inverse };
        par_items(fmap::isa()?, &kernel, row_grain(small.w, small.c));
        Ok((storage(out), Shape::from(shape_of(n, target))))
    }
}

/// Depth-to-space by 2: channel `c·4 + 2a + b` of each pixel to sub-pixel `(a, b)`.
pub fn depth_to_space2(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(Shuffle { inverse: false })
}

/// Channel concatenation of two maps of the same size.
struct Concat;

fn copy_channels(src: &[f32], src_m: MapShape, s0: usize, dst: &mut [f32], dst_m: MapShape, d0: usize, c: usize, n: usize, zero_border: bool) -> Result<()> {
    let kernel = CopyChannels {
        h: src_m.h,
        w: src_m.w,
        n,
        src: CPtr(src.as_ptr()),
        src_cs: src_m.cs,
        s0,
        dst: Ptr(dst.as_mut_ptr()),
        dst_cs: dst_m.cs,
        d0,
        c,
        zero_border,
    };
    par_items(fmap::isa()?, &kernel, row_grain(src_m.w, c));
    Ok(())
}

impl CustomOp2 for Concat {
    fn name(&self) -> &'static str {
        "segctl-concat"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        profile::timed(|| "concat".to_string(), || self.compute(s1, l1, s2, l2))
    }

    fn bwd(&self, a: &Tensor, b: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dy = dy.contiguous()?;
        let (_, am) = fmap::tensor_map(a)?;
        let (_, bm) = fmap::tensor_map(b)?;
        let da = a.track_op().then(|| dy.apply_op1_no_bwd(&Split { c0: 0, c: am.c })).transpose()?;
        let db = b.track_op().then(|| dy.apply_op1_no_bwd(&Split { c0: am.c, c: bm.c })).transpose()?;
        Ok((da, db))
    }
}

impl Concat {
    fn compute(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, a) = map_of(l1)?;
        let (n2, b) = map_of(l2)?;
        if n != n2 || a.h != b.h || a.w != b.w {
            bail!("concatenation of maps of different sizes: {:?} and {:?}", l1.shape().dims(), l2.shape().dims());
        }
        let o = MapShape::new(a.h, a.w, a.c + b.c);
        let mut out = alloc_map(n, o);
        copy_channels(data(s1, l1, "concatenation")?, a, 0, &mut out, o, 0, a.c, n, true)?;
        copy_channels(data(s2, l2, "concatenation")?, b, 0, &mut out, o, a.c, b.c, n, false)?;
        Ok((storage(out), Shape::from(shape_of(n, o))))
    }
}

/// Channels `c0..c0 + c` of a map.
struct Split {
    c0: usize,
    c: usize,
}

impl CustomOp1 for Split {
    fn name(&self) -> &'static str {
        "segctl-split"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        profile::timed(|| "concat-grad (split)".to_string(), || self.compute(s, l))
    }
}

impl Split {
    fn compute(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, m) = map_of(l)?;
        let o = MapShape::new(m.h, m.w, self.c);
        let mut out = alloc_map(n, o);
        copy_channels(data(s, l, "concatenation gradient")?, m, self.c0, &mut out, o, 0, self.c, n, true)?;
        Ok((storage(out), Shape::from(shape_of(n, o))))
    }
}

/// Concatenates two feature maps along channels.
pub fn concat(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    a.contiguous()?.apply_op2(&b.contiguous()?, Concat)
}
