//! `mobilenetv2_unet`: a MobileNetV2 encoder (Sandler et al. 2018, width 1.0, parameter names
//! of timm's `mobilenetv2_100` so its ImageNet checkpoint loads as is) tapped at the five
//! points of the TensorFlow segmentation tutorial, and a pix2pix decoder: ConvTranspose →
//! BatchNorm → ReLU blocks of 512/256/128/64 channels, each concatenated with a tap, then a
//! final ConvTranspose to class logits at input resolution.

use candle_core::{Module, ModuleT, Result, Tensor};
use candle_nn::VarBuilder;

use super::blocks::{Act, BnMode, Conv, ConvBnAct, ConvBnPair, ConvKind, ConvSpec, Pix2PixUp};
use crate::engine::graph::{Graph, GraphBuilder, NodeId};

/// Channels of the five taps: block_1/3/6/13 expand ReLU and block_16 project.
pub const TAP_CHANNELS: [usize; 5] = [96, 144, 192, 576, 320];
/// Keras names of the taps, shallow to deep.
pub const TAP_NAMES: [&str; 5] =
    ["block_1_expand_relu", "block_3_expand_relu", "block_6_expand_relu", "block_13_expand_relu", "block_16_project"];
/// Decoder widths (pix2pix upsample stack).
pub const DECODER_WIDTHS: [usize; 4] = [512, 256, 128, 64];

/// Inverted-residual stages `(expansion, channels, repeats, stride)` after the stem and the
/// first depthwise-separable block; the tap points need nothing past the 320-channel stage.
const STAGES: [(usize, usize, usize, usize); 6] =
    [(6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)];

fn unit(kind: ConvKind, cin: usize, cout: usize, k: usize, stride: usize, act: Act) -> ConvSpec {
    ConvSpec { kind, cin, cout, k, stride, pad: k / 2, act }
}

/// timm `DepthwiseSeparableConv` (blocks.0.0): depthwise 3×3 → BN-ReLU6 → pointwise → BN.
#[derive(Debug, Clone)]
struct DepthwiseSeparable {
    dw: ConvBnAct,
    pw: ConvBnAct,
}

/// timm `InvertedResidual`: expand 1×1 → BN-ReLU6 → depthwise 3×3 → BN-ReLU6 → project 1×1 → BN,
/// plus the input when the shape is unchanged.
#[derive(Debug, Clone)]
struct InvertedResidual {
    expand: ConvBnAct,
    dw: ConvBnAct,
    project: ConvBnAct,
    residual: bool,
}

impl InvertedResidual {
    fn new(cin: usize, cout: usize, expansion: usize, stride: usize, mode: BnMode, vb: VarBuilder) -> Result<Self> {
        let mid = cin * expansion;
        Ok(Self {
            expand: ConvBnAct::new(unit(ConvKind::Dense, cin, mid, 1, 1, Act::Relu6), mode, "conv_pw", "bn1", vb.clone())?,
            dw: ConvBnAct::new(unit(ConvKind::Depthwise, mid, mid, 3, stride, Act::Relu6), mode, "conv_dw", "bn2", vb.clone())?,
            project: ConvBnAct::new(unit(ConvKind::Dense, mid, cout, 1, 1, Act::Identity), mode, "conv_pwl", "bn3", vb)?,
            residual: stride == 1 && cin == cout,
        })
    }

    /// Emits the block; returns (output, expansion activation).
    fn lower(&self, g: &mut GraphBuilder, x: NodeId) -> Result<(NodeId, NodeId)> {
        let expanded = self.expand.lower(g, x)?;
        let dw = self.dw.lower(g, expanded)?;
        let y = self.project.lower(g, dw)?;
        let y = if self.residual { g.add(y, x) } else { y };
        Ok((y, expanded))
    }

    /// Returns (output, expansion activation).
    fn forward_with_expand(&self, x: &Tensor, train: bool) -> Result<(Tensor, Tensor)> {
        let expanded = self.expand.forward_t(x, train)?;
        let y = self.project.forward_t(&self.dw.forward_t(&expanded, train)?, train)?;
        let y = if self.residual { (y + x)? } else { y };
        Ok((y, expanded))
    }
}

/// The encoder, returning its five taps.
#[derive(Debug, Clone)]
pub struct MobileNetV2Encoder {
    stem: ConvBnAct,
    first: DepthwiseSeparable,
    /// `blocks.1` … `blocks.6`.
    stages: Vec<Vec<InvertedResidual>>,
}

impl MobileNetV2Encoder {
    pub fn new(mode: BnMode, vb: VarBuilder) -> Result<Self> {
        let stem = ConvBnAct::new(unit(ConvKind::Dense, 3, 32, 3, 2, Act::Relu6), mode, "conv_stem", "bn1", vb.clone())?;
        let b0 = vb.pp("blocks").pp(0).pp(0);
        let first = DepthwiseSeparable {
            dw: ConvBnAct::new(unit(ConvKind::Depthwise, 32, 32, 3, 1, Act::Relu6), mode, "conv_dw", "bn1", b0.clone())?,
            pw: ConvBnAct::new(unit(ConvKind::Dense, 32, 16, 1, 1, Act::Identity), mode, "conv_pw", "bn2", b0)?,
        };
        let mut stages = Vec::new();
        let mut cin = 16;
        for (i, &(expansion, cout, repeats, stride)) in STAGES.iter().enumerate() {
            let mut blocks = Vec::new();
            for j in 0..repeats {
                let s = if j == 0 { stride } else { 1 };
                blocks.push(InvertedResidual::new(cin, cout, expansion, s, mode, vb.pp("blocks").pp(i + 1).pp(j))?);
                cin = cout;
            }
            stages.push(blocks);
        }
        Ok(Self { stem, first, stages })
    }

    /// The five feature maps (see [`TAP_NAMES`]).
    pub fn taps(&self, x: &Tensor, train: bool) -> Result<Vec<Tensor>> {
        let x = self.stem.forward_t(x, train)?;
        let x = self.first.pw.forward_t(&self.first.dw.forward_t(&x, train)?, train)?;
        let mut taps = Vec::with_capacity(5);
        let mut x = x;
        // Keras block k is the k-th inverted residual; taps are taken at blocks 1, 3, 6, 13
        // (expand activations) and after block 16 (projection).
        let mut block_index = 0;
        for stage in &self.stages {
            for block in stage {
                block_index += 1;
                let (y, expanded) = block.forward_with_expand(&x, train)?;
                if matches!(block_index, 1 | 3 | 6 | 13) {
                    taps.push(expanded);
                }
                x = y;
            }
        }
        taps.push(x);
        Ok(taps)
    }

    /// Emits the encoder; returns its five taps (see [`TAP_NAMES`]).
    pub fn lower(&self, g: &mut GraphBuilder, x: NodeId) -> Result<Vec<NodeId>> {
        let x = self.stem.lower(g, x)?;
        let x = self.first.dw.lower(g, x)?;
        let mut x = self.first.pw.lower(g, x)?;
        let mut taps = Vec::with_capacity(5);
        let mut block_index = 0;
        for block in self.stages.iter().flatten() {
            block_index += 1;
            let (y, expanded) = block.lower(g, x)?;
            if matches!(block_index, 1 | 3 | 6 | 13) {
                taps.push(expanded);
            }
            x = y;
        }
        taps.push(x);
        Ok(taps)
    }

    pub fn conv_bn_pairs(&self, out: &mut Vec<ConvBnPair>) {
        out.push(self.stem.pair().clone());
        out.push(self.first.dw.pair().clone());
        out.push(self.first.pw.pair().clone());
        for block in self.stages.iter().flatten() {
            for u in [&block.expand, &block.dw, &block.project] {
                out.push(u.pair().clone());
            }
        }
    }
}

/// Encoder + pix2pix decoder.
#[derive(Debug, Clone)]
pub struct MobileNetV2Unet {
    encoder: MobileNetV2Encoder,
    up: Vec<Pix2PixUp>,
    head: Conv,
    encoder_trainable: bool,
}

impl MobileNetV2Unet {
    pub fn new(num_classes: usize, encoder_trainable: bool, mode: BnMode, vb: VarBuilder) -> Result<Self> {
        let encoder = MobileNetV2Encoder::new(mode, vb.pp("encoder"))?;
        let mut up = Vec::new();
        let mut cin = TAP_CHANNELS[4];
        for (i, &width) in DECODER_WIDTHS.iter().enumerate() {
            up.push(Pix2PixUp::new(cin, width, mode, vb.pp("decoder").pp("up").pp(i))?);
            cin = width + TAP_CHANNELS[3 - i];
        }
        let head = Conv::new(ConvKind::Transposed, cin, num_classes, 4, 2, 1, true, vb.pp("decoder").pp("head"))?;
        Ok(Self { encoder, up, head, encoder_trainable })
    }

    pub fn encoder(&self) -> &MobileNetV2Encoder {
        &self.encoder
    }

    pub fn conv_bn_pairs(&self, out: &mut Vec<ConvBnPair>) {
        self.encoder.conv_bn_pairs(out);
        for u in &self.up {
            u.pairs(out);
        }
    }
}

impl MobileNetV2Unet {
    /// The network as an inference graph (mirrors `forward_t` in eval mode).
    pub fn lower(&self) -> Result<Graph> {
        let mut g = GraphBuilder::new(3);
        let input = g.input();
        let taps = self.encoder.lower(&mut g, input)?;
        let mut x = taps[4];
        for (i, up) in self.up.iter().enumerate() {
            let y = up.lower(&mut g, x)?;
            x = g.concat(&[y, taps[3 - i]]);
        }
        let logits = self.head.lower(&mut g, x, None, Act::Identity)?;
        Ok(g.finish(logits))
    }
}

impl ModuleT for MobileNetV2Unet {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        // A frozen encoder runs in inference mode (running BatchNorm statistics) and passes
        // no gradient back, so its backward pass is skipped entirely.
        let encoder_train = train && self.encoder_trainable;
        let mut taps = self.encoder.taps(x, encoder_train)?;
        if !self.encoder_trainable {
            taps = taps.iter().map(|t| t.detach()).collect();
        }
        let mut x = taps[4].clone();
        for (i, up) in self.up.iter().enumerate() {
            x = up.forward_t(&x, train)?;
            x = super::ops::concat_channels(&x, &taps[3 - i])?;
        }
        self.head.forward(&x)
    }
}
