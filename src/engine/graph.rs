//! A network as a graph of inference operations, with no memory layout in it: what the
//! models say about themselves (through [`GraphBuilder`], from their `lower` methods, which
//! mirror `forward_t` in eval mode) and what [`super::compile`] compiles into a plan. BatchNorm never appears: it is folded into the convolution before
//! it as the graph is built. Weights keep candle's layouts.

use anyhow::{Result, bail};


/// The kinds of convolution.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConvKind {
    Dense,
    Depthwise,
    Transposed,
}

/// Activation after a convolution (or a normalization).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Act {
    Relu,
    Relu6,
    Identity,
}

impl Act {
    /// The activation as a clamp `[min, max]`.
    pub fn bounds(self) -> (f32, f32) {
        match self {
            Act::Relu => (0.0, f32::INFINITY),
            Act::Relu6 => (0.0, 6.0),
            Act::Identity => (f32::NEG_INFINITY, f32::INFINITY),
        }
    }
}

/// Index of a node in its graph.
pub type NodeId = usize;

/// A convolution with its bias and activation, BatchNorm folded in.
#[derive(Debug, Clone)]
pub struct ConvOp {
    pub kind: ConvKind,
    pub cin: usize,
    pub cout: usize,
    pub k: usize,
    pub stride: usize,
    pub pad: usize,
    /// `Dense`: `[cout, cin, k, k]`; `Depthwise`: `[cin, 1, k, k]`; `Transposed`:
    /// `[cin, cout, k, k]` (candle's, and PyTorch's, layouts).
    pub weight: Vec<f32>,
    /// One per output channel (zeros when the layer has none).
    pub bias: Vec<f32>,
    pub act: Act,
}

impl ConvOp {
    /// Multiply-accumulates per output pixel.
    pub fn macs_per_output_pixel(&self) -> usize {
        match self.kind {
            ConvKind::Dense => self.cout * self.cin * self.k * self.k,
            ConvKind::Depthwise => self.cout * self.k * self.k,
            // Each output pixel of a stride-s transposed convolution sees (k/s)² taps.
            ConvKind::Transposed => self.cout * self.cin * (self.k / self.stride).pow(2),
        }
    }
}

/// What a node computes.
#[derive(Debug, Clone)]
pub enum Op {
    /// The normalized image batch `[N, 3, H, W]`.
    Input { channels: usize },
    Conv(ConvOp),
    /// 2×2 max pooling, stride 2 (odd edges dropped).
    MaxPool2x2,
    /// Channel concatenation of the inputs, in order.
    Concat,
    /// Elementwise sum of two inputs of the same shape.
    Add,
    /// `[C·r², H, W] → [C, H·r, W·r]`, channel `c·r² + i·r + j` to sub-pixel `(i, j)`.
    DepthToSpace(usize),
}

/// One operation and the nodes it reads.
#[derive(Debug, Clone)]
pub struct Node {
    pub op: Op,
    pub inputs: Vec<NodeId>,
}

/// A whole network: node 0 is the input, `output` the logits.
#[derive(Debug, Clone)]
pub struct Graph {
    pub nodes: Vec<Node>,
    pub output: NodeId,
}

impl Graph {
    /// Nodes reading `id`.
    pub fn consumers(&self, id: NodeId) -> Vec<NodeId> {
        (0..self.nodes.len()).filter(|&n| self.nodes[n].inputs.contains(&id)).collect()
    }

    /// Channels of every node's output.
    pub fn channels(&self) -> Result<Vec<usize>> {
        let mut channels: Vec<usize> = Vec::with_capacity(self.nodes.len());
        for (id, node) in self.nodes.iter().enumerate() {
            let c = |i: usize| channels[node.inputs[i]];
            let value = match &node.op {
                Op::Input { channels } => *channels,
                Op::Conv(conv) => {
                    if c(0) != conv.cin {
                        bail!("node {id}: convolution expects {} channels, gets {}", conv.cin, c(0));
                    }
                    conv.cout
                }
                Op::MaxPool2x2 => c(0),
                Op::Concat => node.inputs.iter().map(|&i| channels[i]).sum(),
                Op::Add => {
                    if c(0) != c(1) {
                        bail!("node {id}: sum of {} and {} channels", c(0), c(1));
                    }
                    c(0)
                }
                Op::DepthToSpace(r) => {
                    if c(0) % (r * r) != 0 {
                        bail!("node {id}: depth-to-space of {} channels by {r}", c(0));
                    }
                    c(0) / (r * r)
                }
            };
            channels.push(value);
        }
        Ok(channels)
    }

    /// Output size `(h, w)` of every node for an input of `h`×`w`.
    pub fn sizes(&self, h: usize, w: usize) -> Result<Vec<(usize, usize)>> {
        let mut sizes: Vec<(usize, usize)> = Vec::with_capacity(self.nodes.len());
        for (id, node) in self.nodes.iter().enumerate() {
            let s = |i: usize| sizes[node.inputs[i]];
            let value = match &node.op {
                Op::Input { .. } => (h, w),
                Op::Conv(conv) => {
                    let (ih, iw) = s(0);
                    match conv.kind {
                        ConvKind::Transposed => ((ih - 1) * conv.stride + conv.k - 2 * conv.pad, (iw - 1) * conv.stride + conv.k - 2 * conv.pad),
                        _ => {
                            if ih + 2 * conv.pad < conv.k || iw + 2 * conv.pad < conv.k {
                                bail!("node {id}: a {0}×{0} convolution on a {ih}×{iw} map", conv.k);
                            }
                            ((ih + 2 * conv.pad - conv.k) / conv.stride + 1, (iw + 2 * conv.pad - conv.k) / conv.stride + 1)
                        }
                    }
                }
                Op::MaxPool2x2 => {
                    let (ih, iw) = s(0);
                    if ih < 2 || iw < 2 {
                        bail!("node {id}: max pooling of a {ih}×{iw} map");
                    }
                    (ih / 2, iw / 2)
                }
                Op::Concat | Op::Add => {
                    let first = s(0);
                    if let Some(&other) = node.inputs.iter().find(|&&i| sizes[i] != first) {
                        bail!("node {id}: joins maps of {}×{} and {}×{} (input sizes must divide by the network's total down-sampling)", first.0, first.1, sizes[other].0, sizes[other].1);
                    }
                    first
                }
                Op::DepthToSpace(r) => (s(0).0 * r, s(0).1 * r),
            };
            if value.0 == 0 || value.1 == 0 {
                bail!("node {id}: the map shrinks to nothing for a {h}×{w} input");
            }
            sizes.push(value);
        }
        Ok(sizes)
    }
}

/// Records the operations a model's `lower` methods emit.
#[derive(Debug)]
pub struct GraphBuilder {
    nodes: Vec<Node>,
}

impl GraphBuilder {
    /// A graph whose node 0 is an image input of `channels` channels.
    pub fn new(channels: usize) -> Self {
        Self { nodes: vec![Node { op: Op::Input { channels }, inputs: vec![] }] }
    }

    pub fn input(&self) -> NodeId {
        0
    }

    fn push(&mut self, op: Op, inputs: Vec<NodeId>) -> NodeId {
        self.nodes.push(Node { op, inputs });
        self.nodes.len() - 1
    }

    pub fn conv(&mut self, x: NodeId, conv: ConvOp) -> NodeId {
        self.push(Op::Conv(conv), vec![x])
    }

    pub fn max_pool2x2(&mut self, x: NodeId) -> NodeId {
        self.push(Op::MaxPool2x2, vec![x])
    }

    pub fn concat(&mut self, xs: &[NodeId]) -> NodeId {
        self.push(Op::Concat, xs.to_vec())
    }

    pub fn add(&mut self, a: NodeId, b: NodeId) -> NodeId {
        self.push(Op::Add, vec![a, b])
    }

    pub fn depth_to_space(&mut self, x: NodeId, r: usize) -> NodeId {
        self.push(Op::DepthToSpace(r), vec![x])
    }

    /// The finished graph, `output` being the logits.
    pub fn finish(self, output: NodeId) -> Graph {
        Graph { nodes: self.nodes, output }
    }
}
