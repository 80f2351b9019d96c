//! `unet`: the plain encoder-decoder of Ronneberger et al. (2015) with BatchNorm: per level two
//! 3×3 Conv-BN-ReLU units and 2×2 max-pooling down, learned 2× up-sampling, skip
//! concatenation and two more units on the way up, a 1×1 convolution to class logits.

use candle_core::{Module, ModuleT, Result, Tensor};
use candle_nn::VarBuilder;

use super::blocks::{Act, BnMode, Conv, ConvBnPair, ConvKind, DoubleConv, UpConv2x2};
use crate::engine::graph::{Graph, GraphBuilder};
use super::ops;

/// `unet` settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnetSettings {
    /// Channels per level, full resolution first, bottleneck last (one 2× down-sampling
    /// between consecutive entries).
    pub widths: Vec<usize>,
}

/// The network.
#[derive(Debug, Clone)]
pub struct Unet {
    down: Vec<DoubleConv>,
    bottleneck: DoubleConv,
    up: Vec<UpConv2x2>,
    merge: Vec<DoubleConv>,
    head: Conv,
}

impl Unet {
    pub fn new(settings: UnetSettings, num_classes: usize, mode: BnMode, vb: VarBuilder) -> Result<Self> {
        let depth = settings.widths.len() - 1;
        let width = |level: usize| settings.widths[level];
        let mut down = Vec::with_capacity(depth);
        for level in 0..depth {
            let cin = if level == 0 { 3 } else { width(level - 1) };
            down.push(DoubleConv::new(cin, width(level), mode, vb.pp("down").pp(level))?);
        }
        let bottleneck = DoubleConv::new(width(depth - 1), width(depth), mode, vb.pp("bottleneck"))?;
        let mut up = Vec::with_capacity(depth);
        let mut merge = Vec::with_capacity(depth);
        for level in 0..depth {
            up.push(UpConv2x2::new(width(level + 1), width(level), mode, vb.pp("up").pp(level))?);
            merge.push(DoubleConv::new(2 * width(level), width(level), mode, vb.pp("merge").pp(level))?);
        }
        let head = Conv::new(ConvKind::Dense, width(0), num_classes, 1, 1, 0, true, vb.pp("head"))?;
        Ok(Self { down, bottleneck, up, merge, head })
    }

    pub fn conv_bn_pairs(&self, out: &mut Vec<ConvBnPair>) {
        for block in self.down.iter().chain([&self.bottleneck]).chain(&self.merge) {
            block.pairs(out);
        }
        for u in &self.up {
            u.pairs(out);
        }
    }
}

impl Unet {
    /// The network as an inference graph (mirrors `forward_t` in eval mode).
    pub fn lower(&self) -> Result<Graph> {
        let mut g = GraphBuilder::new(3);
        let mut x = g.input();
        let mut skips = Vec::with_capacity(self.down.len());
        for block in &self.down {
            x = block.lower(&mut g, x)?;
            skips.push(x);
            x = g.max_pool2x2(x);
        }
        x = self.bottleneck.lower(&mut g, x)?;
        for level in (0..self.down.len()).rev() {
            let up = self.up[level].lower(&mut g, x)?;
            x = g.concat(&[skips[level], up]);
            x = self.merge[level].lower(&mut g, x)?;
        }
        let logits = self.head.lower(&mut g, x, None, Act::Identity)?;
        Ok(g.finish(logits))
    }
}

impl ModuleT for Unet {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let mut skips = Vec::with_capacity(self.down.len());
        let mut x = x.clone();
        for block in &self.down {
            x = block.forward_t(&x, train)?;
            skips.push(x.clone());
            x = ops::max_pool2x2(&x)?;
        }
        x = self.bottleneck.forward_t(&x, train)?;
        for level in (0..self.down.len()).rev() {
            let up = self.up[level].forward_t(&x, train)?;
            x = ops::concat_channels(&skips[level], &up)?;
            x = self.merge[level].forward_t(&x, train)?;
        }
        self.head.forward(&x)
    }
}
