//! Building blocks shared by the architectures, in candle-nn style (a struct holding its
//! layers, `new(.., vb)`, `impl Module`/`ModuleT`): convolutions, BatchNorm,
//! Conv-BN-activation units, and the up-sampling units of the decoders. Their tensors are the
//! feature maps of [`super::ops`], whose functions they call for every operation.

use candle_core::{Module, ModuleT, Result, Tensor};
use candle_nn::{Init, VarBuilder};

use super::ops::batchnorm::BatchNorm;
use crate::engine::graph::{ConvOp, GraphBuilder, NodeId};
use super::ops;

/// BatchNorm epsilon (PyTorch/timm's value; timm checkpoints were trained with it).
pub const BN_EPS: f64 = 1e-5;
/// Running-statistics momentum (PyTorch convention: new = (1 − m)·old + m·batch).
pub const BN_MOMENTUM: f64 = 0.1;

/// A convolution + BatchNorm pair, by VarBuilder path, for BatchNorm folding at export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConvBnPair {
    pub conv: String,
    pub bn: String,
    /// `weight` is `[Cin, Cout, k, k]` (transposed convolution) rather than `[Cout, Cin, k, k]`.
    pub transposed: bool,
}

/// Whether BatchNorm layers exist or were folded into the preceding convolutions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BnMode {
    Separate,
    Folded,
}

pub use crate::engine::graph::{Act, ConvKind};

/// Applies `act` to a tensor (the engine's activations on candle tensors).
pub fn activate(act: Act, x: &Tensor) -> Result<Tensor> {
    match act {
        Act::Relu => x.relu(),
        Act::Relu6 => x.clamp(0f32, 6f32),
        Act::Identity => Ok(x.clone()),
    }
}

/// Kaiming-normal initialisation for a convolution of `fan_in` inputs (He et al.).
fn kaiming(fan_in: usize) -> Init {
    Init::Randn { mean: 0.0, stdev: (2.0 / fan_in as f64).sqrt() }
}

/// A convolution (dense, depthwise or transposed) with an optional bias.
#[derive(Debug, Clone)]
pub struct Conv {
    weight: Tensor,
    bias: Option<Tensor>,
    kind: ConvKind,
    stride: usize,
    pad: usize,
}


impl Conv {
    /// `Dense`: weight `[cout, cin, k, k]`; `Depthwise`: `[cin, 1, k, k]` (cout = cin);
    /// `Transposed`: `[cin, cout, k, k]`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        kind: ConvKind,
        cin: usize,
        cout: usize,
        k: usize,
        stride: usize,
        pad: usize,
        bias: bool,
        vb: VarBuilder,
    ) -> Result<Self> {
        let (shape, fan_in) = match kind {
            ConvKind::Dense => ((cout, cin, k, k), cin * k * k),
            ConvKind::Depthwise => ((cin, 1, k, k), k * k),
            ConvKind::Transposed => ((cin, cout, k, k), cout * k * k),
        };
        let weight = vb.get_with_hints(shape, "weight", kaiming(fan_in))?;
        let bias = if bias { Some(vb.get_with_hints(cout, "bias", Init::Const(0.0))?) } else { None };
        Ok(Self { weight, bias, kind, stride, pad })
    }
}

impl Module for Conv {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        ops::convolution(x, &self.weight, self.bias.as_ref(), self.kind, self.stride, self.pad, Act::Identity)
    }
}

impl Conv {
    /// Inference with BatchNorm folded into the bias: convolution, bias and activation in one
    /// pass over the output (no backward pass).
    pub fn forward_inference(&self, x: &Tensor, act: Act) -> Result<Tensor> {
        ops::convolution(x, &self.weight, self.bias.as_ref(), self.kind, self.stride, self.pad, act)
    }
}

impl Conv {
    /// Emits this convolution into an inference graph, with `bn` (eval mode) folded into its
    /// weights and bias, and `act` after it.
    pub fn lower(&self, g: &mut GraphBuilder, x: NodeId, bn: Option<&BatchNorm>, act: Act) -> Result<NodeId> {
        let dims = self.weight.dims4()?;
        let (cin, cout, k) = match self.kind {
            ConvKind::Dense => (dims.1, dims.0, dims.2),
            ConvKind::Depthwise => (dims.0, dims.0, dims.2),
            ConvKind::Transposed => (dims.0, dims.1, dims.2),
        };
        let cpu = candle_core::Device::Cpu;
        let mut weight: Vec<f32> = self.weight.to_device(&cpu)?.flatten_all()?.to_vec1()?;
        let mut bias: Vec<f32> = match &self.bias {
            Some(b) => b.to_device(&cpu)?.to_vec1()?,
            None => vec![0.0; cout],
        };
        if let Some(bn) = bn {
            let (scale, shift) = bn.inference_affine()?;
            let per_channel = weight.len() / cout;
            let per_out = |i: usize| match self.kind {
                // [cin, cout, k, k]: the output channel is the second index.
                ConvKind::Transposed => (i / (k * k)) % cout,
                _ => i / per_channel,
            };
            for i in 0..weight.len() {
                weight[i] *= scale[per_out(i)];
            }
            for (b, (s, t)) in bias.iter_mut().zip(scale.iter().zip(&shift)) {
                *b = *b * s + t;
            }
        }
        let op = ConvOp { kind: self.kind, cin, cout, k, stride: self.stride, pad: self.pad, weight, bias, act };
        Ok(g.conv(x, op))
    }
}

/// Convolution → BatchNorm → activation, with the BatchNorm optionally folded away.
#[derive(Debug, Clone)]
pub struct ConvBnAct {
    conv: Conv,
    bn: Option<BatchNorm>,
    act: Act,
    pair: ConvBnPair,
}

/// Shape of a [`ConvBnAct`].
#[derive(Debug, Clone, Copy)]
pub struct ConvSpec {
    pub kind: ConvKind,
    pub cin: usize,
    pub cout: usize,
    pub k: usize,
    pub stride: usize,
    pub pad: usize,
    pub act: Act,
}

impl ConvBnAct {
    /// Builds the unit with the convolution under `vb.pp(conv_name)` and the BatchNorm under
    /// `vb.pp(bn_name)` (names follow the checkpoint being mirrored, e.g. timm's).
    pub fn new(spec: ConvSpec, mode: BnMode, conv_name: &str, bn_name: &str, vb: VarBuilder) -> Result<Self> {
        let folded = mode == BnMode::Folded;
        let conv = Conv::new(spec.kind, spec.cin, spec.cout, spec.k, spec.stride, spec.pad, folded, vb.pp(conv_name))?;
        let bn = if folded {
            None
        } else {
            Some(BatchNorm::new(spec.cout, BN_EPS, BN_MOMENTUM, vb.pp(bn_name))?)
        };
        let pair = ConvBnPair {
            conv: join(&vb.prefix(), conv_name),
            bn: join(&vb.prefix(), bn_name),
            transposed: spec.kind == ConvKind::Transposed,
        };
        Ok(Self { conv, bn, act: spec.act, pair })
    }

    pub fn pair(&self) -> &ConvBnPair {
        &self.pair
    }

    /// Emits the unit into an inference graph (BatchNorm folded).
    pub fn lower(&self, g: &mut GraphBuilder, x: NodeId) -> Result<NodeId> {
        self.conv.lower(g, x, self.bn.as_ref(), self.act)
    }
}

fn join(prefix: &str, name: &str) -> String {
    if prefix.is_empty() { name.to_string() } else { format!("{prefix}.{name}") }
}

impl ModuleT for ConvBnAct {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        match &self.bn {
            // Training on CPU: convolution, BatchNorm and activation as one op.
            Some(bn) if train && ops::on_cpu_path(x) && self.conv.bias.is_none() => {
                let c = &self.conv;
                let geometry = ops::ConvGeometry { kind: c.kind, k: c.weight.dim(3)?, stride: c.stride, pad: c.pad };
                bn.forward_conv_act(x, &c.weight, geometry, self.act)
            }
            Some(bn) => bn.forward_act(&self.conv.forward(x)?, self.act, train),
            // Folded BatchNorm exists only in exported (inference) models.
            None if !train => self.conv.forward_inference(x, self.act),
            None => activate(self.act, &self.conv.forward(x)?),
        }
    }
}

/// Two 3×3 Conv-BN-ReLU units: the classic UNet stage.
#[derive(Debug, Clone)]
pub struct DoubleConv {
    first: ConvBnAct,
    second: ConvBnAct,
}

impl DoubleConv {
    pub fn new(cin: usize, cout: usize, mode: BnMode, vb: VarBuilder) -> Result<Self> {
        let spec = |cin| ConvSpec { kind: ConvKind::Dense, cin, cout, k: 3, stride: 1, pad: 1, act: Act::Relu };
        Ok(Self {
            first: ConvBnAct::new(spec(cin), mode, "conv1", "bn1", vb.clone())?,
            second: ConvBnAct::new(spec(cout), mode, "conv2", "bn2", vb)?,
        })
    }

    pub fn pairs(&self, out: &mut Vec<ConvBnPair>) {
        out.push(self.first.pair().clone());
        out.push(self.second.pair().clone());
    }
}

impl DoubleConv {
    pub fn lower(&self, g: &mut GraphBuilder, x: NodeId) -> Result<NodeId> {
        let y = self.first.lower(g, x)?;
        self.second.lower(g, y)
    }
}

impl ModuleT for DoubleConv {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.second.forward_t(&self.first.forward_t(x, train)?, train)
    }
}

/// 2× up-sampling as a learned 2×2 stride-2 transposed convolution, computed as a 1×1
/// convolution to 4× the channels followed by depth-to-space (same function, a plain GEMM).
#[derive(Debug, Clone)]
pub struct UpConv2x2 {
    unit: ConvBnAct,
}

impl UpConv2x2 {
    pub fn new(cin: usize, cout: usize, mode: BnMode, vb: VarBuilder) -> Result<Self> {
        let spec = ConvSpec { kind: ConvKind::Dense, cin, cout: 4 * cout, k: 1, stride: 1, pad: 0, act: Act::Relu };
        Ok(Self { unit: ConvBnAct::new(spec, mode, "conv", "bn", vb)? })
    }

    pub fn pairs(&self, out: &mut Vec<ConvBnPair>) {
        out.push(self.unit.pair().clone());
    }
}

impl UpConv2x2 {
    pub fn lower(&self, g: &mut GraphBuilder, x: NodeId) -> Result<NodeId> {
        let y = self.unit.lower(g, x)?;
        Ok(g.depth_to_space(y, 2))
    }
}

impl ModuleT for UpConv2x2 {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        ops::depth_to_space2(&self.unit.forward_t(x, train)?)
    }
}

/// pix2pix decoder unit: ConvTranspose(k4, s2, p1) → BatchNorm → ReLU.
#[derive(Debug, Clone)]
pub struct Pix2PixUp {
    unit: ConvBnAct,
}

impl Pix2PixUp {
    pub fn new(cin: usize, cout: usize, mode: BnMode, vb: VarBuilder) -> Result<Self> {
        let spec = ConvSpec { kind: ConvKind::Transposed, cin, cout, k: 4, stride: 2, pad: 1, act: Act::Relu };
        Ok(Self { unit: ConvBnAct::new(spec, mode, "conv", "bn", vb)? })
    }

    pub fn pairs(&self, out: &mut Vec<ConvBnPair>) {
        out.push(self.unit.pair().clone());
    }
}

impl Pix2PixUp {
    pub fn lower(&self, g: &mut GraphBuilder, x: NodeId) -> Result<NodeId> {
        self.unit.lower(g, x)
    }
}

impl ModuleT for Pix2PixUp {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.unit.forward_t(x, train)
    }
}
