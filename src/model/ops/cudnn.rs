//! Convolutions on CUDA through cuDNN, as candle custom ops with their own backward passes
//! (built with the `cudnn` feature).
//!
//! candle's CUDA backend calls cuDNN for the dense forward pass only: its backward passes go
//! through a naive transposed-convolution kernel, a grouped or depthwise convolution is a
//! loop over channels, and nothing is cached. Here every pass of every kind is one cuDNN call:
//!
//! | layer | forward | input gradient | weight gradient |
//! |---|---|---|---|
//! | dense, depthwise (`groups = c`) | `ConvolutionForward` | `BackwardData` | `BackwardFilter` |
//! | transposed | `BackwardData` | `ConvolutionForward` | `BackwardFilter`, roles swapped |
//!
//! A transposed convolution with weights `[cin, cout, k, k]` is the adjoint of the forward
//! convolution from its output space (`cout` channels) to its input space (`cin`), whose
//! filter is the same tensor read as `[K = cin, C = cout, k, k]`: [`Equivalent`] names that
//! forward convolution for every kind, and each pass is stated against it.
//!
//! Descriptors and the algorithm cuDNN's heuristics pick are cached per shape and pass, and
//! one workspace per device grows to the largest a pass has asked for (all on the thread
//! that trains: cuDNN handles are neither `Send` nor `Sync`, as in candle). f32 only: other
//! dtypes take candle's own kernels.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;

use candle_core::cuda_backend::cudarc::cudnn::{self, ConvBackwardData, ConvBackwardFilter, ConvDescriptor, ConvForward, Cudnn, FilterDescriptor, TensorDescriptor};
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView};
use candle_core::cuda_backend::{CudaDevice, CudaStorage, DeviceId};
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor, bail};

use super::ConvGeometry;
use crate::engine::graph::{Act, ConvKind};

use cudnn::sys::cudnnTensorFormat_t::CUDNN_TENSOR_NCHW;

/// Whether cuDNN runs this tensor's convolutions: f32 on a CUDA device.
pub fn handles(x: &Tensor) -> bool {
    x.device().is_cuda() && x.dtype() == DType::F32
}

/// A convolution of `[N, C, H, W]` tensors on cuDNN (weights as in [`super::convolution`]),
/// bias and activation after it.
pub fn convolution(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>, geo: ConvGeometry, act: Act) -> Result<Tensor> {
    let x = x.contiguous()?;
    let weight = weight.contiguous()?;
    let y = x.apply_op2(&weight, Conv { geo })?;
    let y = match bias {
        Some(b) => y.broadcast_add(&b.reshape((1, (), 1, 1))?)?,
        None => y,
    };
    crate::model::blocks::activate(act, &y)
}

/// The forward convolution a layer is stated against: input `[n, c, h, w]`, filter
/// `[k, c / groups, r, r]`, output `[n, k, oh, ow]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Equivalent {
    input: [usize; 4],
    filter: [usize; 4],
    output: [usize; 4],
    stride: usize,
    pad: usize,
    groups: usize,
}

impl Equivalent {
    /// The layer `geo` with input `x` and weights `w` (candle's dims).
    fn of(geo: ConvGeometry, x: &[usize], w: &[usize]) -> Result<Self> {
        let (&[n, xc, h, wd], &[w0, w1, r, r2]) = (x, w) else {
            bail!("cuDNN convolution: input {x:?} and weights {w:?} must be 4-D")
        };
        let (s, p) = (geo.stride, geo.pad);
        if r != geo.k || r2 != geo.k || s == 0 {
            bail!("cuDNN convolution: weights {w:?} for a {}×{} kernel with stride {s}", geo.k, geo.k);
        }
        let out = |len: usize| -> Result<usize> {
            if len + 2 * p < r {
                bail!("cuDNN convolution: a {r}×{r} kernel over {h}×{wd} with padding {p}");
            }
            Ok((len + 2 * p - r) / s + 1)
        };
        Ok(match geo.kind {
            ConvKind::Dense | ConvKind::Depthwise => {
                let depthwise = geo.kind == ConvKind::Depthwise;
                let (per_group, groups) = if depthwise { (1, xc) } else { (xc, 1) };
                if w1 != per_group || (depthwise && w0 != xc) {
                    bail!("cuDNN convolution: weights {w:?} do not fit an input of {xc} channels");
                }
                Equivalent { input: [n, xc, h, wd], filter: [w0, w1, r, r], output: [n, w0, out(h)?, out(wd)?], stride: s, pad: p, groups }
            }
            ConvKind::Transposed => {
                // weights [cin, cout, r, r]: the adjoint of a forward convolution from the
                // output space (cout channels) to the input (cin).
                if w0 != xc {
                    bail!("cuDNN transposed convolution: weights {w:?} do not fit an input of {xc} channels");
                }
                let up = |len: usize| -> Result<usize> {
                    match ((len.max(1) - 1) * s + r).checked_sub(2 * p) {
                        Some(v) if v > 0 => Ok(v),
                        _ => bail!("cuDNN transposed convolution: {h}×{wd} with a {r}×{r} kernel and padding {p} has no output"),
                    }
                };
                Equivalent { input: [n, w1, up(h)?, up(wd)?], filter: [w0, w1, r, r], output: [n, xc, h, wd], stride: s, pad: p, groups: 1 }
            }
        })
    }
}

/// The three cuDNN passes over an [`Equivalent`] convolution.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Pass {
    /// `(input, filter) → output`.
    Forward,
    /// `(output gradient, filter) → input gradient`.
    BackwardData,
    /// `(input, output gradient) → filter gradient`.
    BackwardFilter,
}

/// A layer's convolution, `(x, w) → y`.
#[derive(Debug, Clone, Copy)]
struct Conv {
    geo: ConvGeometry,
}

/// Its input gradient, `(dy, w) → dx`, for an input of `x_dims`.
#[derive(Debug, Clone)]
struct GradInput {
    geo: ConvGeometry,
    x_dims: Vec<usize>,
}

/// Its weight gradient, `(x, dy) → dw`, for weights of `w_dims`.
#[derive(Debug, Clone)]
struct GradWeight {
    geo: ConvGeometry,
    w_dims: Vec<usize>,
}

fn no_cpu(name: &str) -> Result<(CpuStorage, Shape)> {
    bail!("{name} runs on CUDA tensors only")
}

impl CustomOp2 for Conv {
    fn name(&self) -> &'static str {
        "cudnn-conv"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        no_cpu(self.name())
    }

    fn cuda_fwd(&self, xs: &CudaStorage, xl: &Layout, ws: &CudaStorage, wl: &Layout) -> Result<(CudaStorage, Shape)> {
        let eq = Equivalent::of(self.geo, xl.dims(), wl.dims())?;
        let (x, w) = (view(xs, xl)?, view(ws, wl)?);
        let (pass, shape) = match self.geo.kind {
            ConvKind::Transposed => (Pass::BackwardData, eq.input),
            _ => (Pass::Forward, eq.output),
        };
        let y = run(&xs.device, pass, eq, &x, &w)?;
        Ok((CudaStorage::wrap_cuda_slice(y, xs.device.clone()), Shape::from(shape.to_vec())))
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let dx = grad.apply_op2_no_bwd(w, &GradInput { geo: self.geo, x_dims: x.dims().to_vec() })?;
        let dw = x.apply_op2_no_bwd(&grad, &GradWeight { geo: self.geo, w_dims: w.dims().to_vec() })?;
        Ok((Some(dx), Some(dw)))
    }
}

impl CustomOp2 for GradInput {
    fn name(&self) -> &'static str {
        "cudnn-conv-grad-input"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        no_cpu(self.name())
    }

    fn cuda_fwd(&self, gs: &CudaStorage, gl: &Layout, ws: &CudaStorage, wl: &Layout) -> Result<(CudaStorage, Shape)> {
        let eq = Equivalent::of(self.geo, &self.x_dims, wl.dims())?;
        let (pass, out_space, in_space) = match self.geo.kind {
            // the gradient lives in the equivalent convolution's input space
            ConvKind::Transposed => (Pass::Forward, eq.output, eq.input),
            _ => (Pass::BackwardData, eq.input, eq.output),
        };
        if gl.dims() != in_space {
            bail!("cuDNN convolution: an output gradient of {:?} for an output of {in_space:?}", gl.dims());
        }
        let (g, w) = (view(gs, gl)?, view(ws, wl)?);
        let dx = run(&gs.device, pass, eq, &g, &w)?;
        Ok((CudaStorage::wrap_cuda_slice(dx, gs.device.clone()), Shape::from(out_space.to_vec())))
    }
}

impl CustomOp2 for GradWeight {
    fn name(&self) -> &'static str {
        "cudnn-conv-grad-weight"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        no_cpu(self.name())
    }

    fn cuda_fwd(&self, xs: &CudaStorage, xl: &Layout, gs: &CudaStorage, gl: &Layout) -> Result<(CudaStorage, Shape)> {
        let eq = Equivalent::of(self.geo, xl.dims(), &self.w_dims)?;
        let (x, g) = (view(xs, xl)?, view(gs, gl)?);
        // BackwardFilter takes the equivalent convolution's input and output gradient: for a
        // transposed layer those are its output gradient and its input.
        let dw = match self.geo.kind {
            ConvKind::Transposed => run(&xs.device, Pass::BackwardFilter, eq, &g, &x)?,
            _ => run(&xs.device, Pass::BackwardFilter, eq, &x, &g)?,
        };
        Ok((CudaStorage::wrap_cuda_slice(dw, xs.device.clone()), Shape::from(self.w_dims.clone())))
    }
}

/// A contiguous f32 view of a storage.
fn view<'a>(s: &'a CudaStorage, l: &Layout) -> Result<CudaView<'a, f32>> {
    let slice = s.as_cuda_slice::<f32>()?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(slice.slice(a..b)),
        None => bail!("cuDNN convolution: a strided tensor of {:?} (make it contiguous first)", l.dims()),
    }
}

/// What one pass of one shape needs, made once.
struct Entry {
    conv: ConvDescriptor<f32>,
    input: TensorDescriptor<f32>,
    filter: FilterDescriptor<f32>,
    output: TensorDescriptor<f32>,
    algo: Algo,
    workspace: usize,
}

#[derive(Debug, Clone, Copy)]
enum Algo {
    Forward(cudnn::sys::cudnnConvolutionFwdAlgo_t),
    Data(cudnn::sys::cudnnConvolutionBwdDataAlgo_t),
    Filter(cudnn::sys::cudnnConvolutionBwdFilterAlgo_t),
}

/// A device's cuDNN handle, cached passes and its one workspace.
struct State {
    cudnn: Arc<Cudnn>,
    entries: HashMap<(Pass, Equivalent), Entry>,
    workspace: Option<CudaSlice<u8>>,
}

thread_local! {
    static STATE: RefCell<HashMap<DeviceId, State>> = RefCell::new(HashMap::new());
}

fn int(v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| candle_core::Error::Msg(format!("cuDNN convolution: dimension {v} is too large")))
}

fn dims(d: [usize; 4]) -> Result<[i32; 4]> {
    Ok([int(d[0])?, int(d[1])?, int(d[2])?, int(d[3])?])
}

impl Entry {
    fn new(cudnn: &Arc<Cudnn>, pass: Pass, eq: Equivalent) -> Result<Self> {
        let mut conv = cudnn.create_conv2d::<f32>(
            [int(eq.pad)?; 2],
            [int(eq.stride)?; 2],
            [1, 1],
            cudnn::sys::cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION,
        )?;
        if eq.groups > 1 {
            conv.set_group_count(int(eq.groups)?)?;
        }
        let input = cudnn.create_4d_tensor::<f32>(CUDNN_TENSOR_NCHW, dims(eq.input)?)?;
        let filter = cudnn.create_4d_filter::<f32>(CUDNN_TENSOR_NCHW, dims(eq.filter)?)?;
        let output = cudnn.create_4d_tensor::<f32>(CUDNN_TENSOR_NCHW, dims(eq.output)?)?;
        let (algo, workspace) = match pass {
            Pass::Forward => {
                let op = ConvForward { conv: &conv, x: &input, w: &filter, y: &output };
                let a = op.pick_algorithm()?;
                (Algo::Forward(a), op.get_workspace_size(a)?)
            }
            Pass::BackwardData => {
                let op = ConvBackwardData { conv: &conv, dx: &input, w: &filter, dy: &output };
                let a = op.pick_algorithm()?;
                (Algo::Data(a), op.get_workspace_size(a)?)
            }
            Pass::BackwardFilter => {
                let op = ConvBackwardFilter { conv: &conv, x: &input, dw: &filter, dy: &output };
                let a = op.pick_algorithm()?;
                (Algo::Filter(a), op.get_workspace_size(a)?)
            }
        };
        Ok(Entry { conv, input, filter, output, algo, workspace })
    }
}

/// Runs `pass` of `eq` on `dev`'s stream: `Forward (input, filter)`, `BackwardData (output
/// gradient, filter)`, `BackwardFilter (input, output gradient)`; returns the result.
fn run(dev: &CudaDevice, pass: Pass, eq: Equivalent, a: &CudaView<f32>, b: &CudaView<f32>) -> Result<CudaSlice<f32>> {
    let len = |d: [usize; 4]| d.iter().product::<usize>();
    let out_len = match pass {
        Pass::Forward => len(eq.output),
        Pass::BackwardData => len(eq.input),
        Pass::BackwardFilter => len(eq.filter),
    };
    let (a_len, b_len) = match pass {
        Pass::Forward => (len(eq.input), len(eq.filter)),
        Pass::BackwardData => (len(eq.output), len(eq.filter)),
        Pass::BackwardFilter => (len(eq.input), len(eq.output)),
    };
    if a.len() != a_len || b.len() != b_len {
        bail!("cuDNN convolution {pass:?}: operands of {} and {} elements for {eq:?}", a.len(), b.len());
    }
    STATE.with(|state| {
        let mut state = state.borrow_mut();
        let st = match state.entry(dev.id()) {
            std::collections::hash_map::Entry::Occupied(o) => o.into_mut(),
            std::collections::hash_map::Entry::Vacant(v) => {
                let cudnn = Cudnn::new(dev.cuda_stream())?;
                v.insert(State { cudnn, entries: HashMap::new(), workspace: None })
            }
        };
        let entry = match st.entries.entry((pass, eq)) {
            std::collections::hash_map::Entry::Occupied(o) => o.into_mut(),
            std::collections::hash_map::Entry::Vacant(v) => v.insert(Entry::new(&st.cudnn, pass, eq)?),
        };
        if entry.workspace > st.workspace.as_ref().map_or(0, |w| w.len()) {
            // the old workspace goes back to the stream's pool once earlier work is done
            st.workspace = None;
            st.workspace = Some(dev.alloc_zeros::<u8>(entry.workspace)?);
        }
        let workspace = if entry.workspace == 0 { None } else { st.workspace.as_mut() };
        // SAFETY: cuDNN writes every element of the output (beta = 0), so it may start
        // uninitialised.
        let mut out = unsafe { dev.alloc::<f32>(out_len)? };
        let e = &*entry;
        // SAFETY: the descriptors were made from `eq`, and the operands' lengths match them
        // (checked above); all are f32 NCHW and contiguous.
        unsafe {
            match (pass, e.algo) {
                (Pass::Forward, Algo::Forward(algo)) => ConvForward { conv: &e.conv, x: &e.input, w: &e.filter, y: &e.output }
                    .launch(algo, workspace, (1.0f32, 0.0f32), a, b, &mut out)?,
                (Pass::BackwardData, Algo::Data(algo)) => ConvBackwardData { conv: &e.conv, dx: &e.input, w: &e.filter, dy: &e.output }
                    .launch(algo, workspace, (1.0f32, 0.0f32), &mut out, b, a)?,
                (Pass::BackwardFilter, Algo::Filter(algo)) => ConvBackwardFilter { conv: &e.conv, x: &e.input, dw: &e.filter, dy: &e.output }
                    .launch(algo, workspace, (1.0f32, 0.0f32), a, &mut out, b)?,
                _ => bail!("cuDNN convolution: cached algorithm {:?} for pass {pass:?}", e.algo),
            }
        }
        Ok(out)
    })
}

/// Keeps freed device memory in the stream-ordered pool (release threshold: unlimited), so a
/// training step reuses the previous step's buffers instead of returning them to the driver
/// at every synchronisation (the pool's default threshold is 0).
pub fn keep_freed_memory(dev: &CudaDevice) -> Result<()> {
    use candle_core::cuda_backend::cudarc::driver::sys;
    let stream = dev.cuda_stream();
    let device = stream.context().cu_device();
    let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
    let mut threshold: u64 = u64::MAX;
    // SAFETY: plain driver calls on a valid device handle; `threshold` outlives the call.
    unsafe {
        sys::cuDeviceGetDefaultMemPool(&mut pool, device).result().map_err(candle_core::Error::wrap)?;
        sys::cuMemPoolSetAttribute(pool, sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD, (&mut threshold as *mut u64).cast())
            .result()
            .map_err(candle_core::Error::wrap)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Every kind and stride of the models' layers: forward and both gradients on cuDNN
    /// against candle's CPU convolutions (skipped where no CUDA device answers).
    #[test]
    fn cudnn_passes_match_candle_on_the_cpu() -> Result<()> {
        let Ok(gpu) = Device::new_cuda(0) else {
            eprintln!("no CUDA device: cuDNN convolutions not checked");
            return Ok(());
        };
        let cases = [
            (ConvKind::Dense, 3, 1, 1, (2, 5, 9, 9), (7, 5, 3, 3)),
            (ConvKind::Dense, 3, 2, 1, (2, 5, 9, 8), (6, 5, 3, 3)),
            (ConvKind::Dense, 1, 1, 0, (2, 8, 6, 6), (3, 8, 1, 1)),
            (ConvKind::Depthwise, 3, 1, 1, (2, 6, 7, 7), (6, 1, 3, 3)),
            (ConvKind::Depthwise, 3, 2, 1, (2, 6, 8, 8), (6, 1, 3, 3)),
            (ConvKind::Transposed, 2, 2, 0, (2, 6, 5, 4), (6, 3, 2, 2)),
        ];
        for (kind, k, stride, pad, xs, ws) in cases {
            let geo = ConvGeometry { kind, k, stride, pad };
            let x = Tensor::randn(0f32, 1., xs, &Device::Cpu)?;
            let w = Tensor::randn(0f32, 1., ws, &Device::Cpu)?;
            let reference = |x: &Tensor, w: &Tensor| match kind {
                ConvKind::Dense => x.conv2d(w, pad, stride, 1, 1),
                ConvKind::Depthwise => x.conv2d(w, pad, stride, 1, xs.1),
                ConvKind::Transposed => x.conv_transpose2d(w, pad, 0, stride, 1),
            };
            let (xv, wv) = (candle_core::Var::from_tensor(&x)?, candle_core::Var::from_tensor(&w)?);
            let y_ref = reference(xv.as_tensor(), wv.as_tensor())?;
            let probe = Tensor::randn(0f32, 1., y_ref.shape(), &Device::Cpu)?;
            let grads = (&y_ref * &probe)?.sum_all()?.backward()?;
            let (gx_ref, gw_ref) = (grads.get(&xv).unwrap().clone(), grads.get(&wv).unwrap().clone());

            let (xg, wg) = (candle_core::Var::from_tensor(&x.to_device(&gpu)?)?, candle_core::Var::from_tensor(&w.to_device(&gpu)?)?);
            let y = convolution(xg.as_tensor(), wg.as_tensor(), None, geo, Act::Identity)?;
            let grads = (&y * probe.to_device(&gpu)?)?.sum_all()?.backward()?;
            let diff = |a: &Tensor, b: &Tensor| -> Result<f32> { (a.to_device(&Device::Cpu)? - b)?.abs()?.max_all()?.to_scalar::<f32>() };
            assert_eq!(y.dims(), y_ref.dims(), "{kind:?} stride {stride}");
            // TF32 tensor cores may round the operands to 10-bit mantissas
            for (name, d) in [
                ("forward", diff(&y, &y_ref)?),
                ("input gradient", diff(grads.get(&xg).unwrap(), &gx_ref)?),
                ("weight gradient", diff(grads.get(&wg).unwrap(), &gw_ref)?),
            ] {
                assert!(d < 5e-2, "{kind:?} k{k} stride {stride}: {name} differs by {d}");
            }
        }
        Ok(())
    }

    #[test]
    fn the_equivalent_convolution_of_each_kind() -> Result<()> {
        let dense = Equivalent::of(ConvGeometry { kind: ConvKind::Dense, k: 3, stride: 2, pad: 1 }, &[2, 5, 9, 8], &[6, 5, 3, 3])?;
        assert_eq!((dense.output, dense.groups), ([2, 6, 5, 4], 1));
        let dw = Equivalent::of(ConvGeometry { kind: ConvKind::Depthwise, k: 3, stride: 1, pad: 1 }, &[1, 6, 7, 7], &[6, 1, 3, 3])?;
        assert_eq!((dw.output, dw.groups), ([1, 6, 7, 7], 6));
        let up = Equivalent::of(ConvGeometry { kind: ConvKind::Transposed, k: 2, stride: 2, pad: 0 }, &[2, 6, 5, 4], &[6, 3, 2, 2])?;
        assert_eq!((up.input, up.filter, up.output), ([2, 3, 10, 8], [6, 3, 2, 2], [2, 6, 5, 4]));
        assert!(Equivalent::of(ConvGeometry { kind: ConvKind::Dense, k: 3, stride: 1, pad: 1 }, &[1, 4, 5, 5], &[6, 5, 3, 3]).is_err());
        Ok(())
    }
}
