//! The seam between the models and the kernels: every tensor operation a model's layers
//! need, on whatever device the tensors live.
//!
//! - **CPU (f32).** Between a model's input and its logits, tensors are *feature maps*
//!   ([`fmap`]): padded NHWC, the layout of the inference engine, whose kernels every op here
//!   runs ([`conv`], [`layout`], [`batchnorm`]), as candle custom ops with their own backward
//!   passes. [`to_features`] and [`from_features`] convert at the model's edges.
//! - **CUDA**: `[N, C, H, W]` tensors; [`to_features`] and [`from_features`] are the
//!   identity. Built with `cudnn`, every convolution pass of f32 tensors is one cuDNN call
//!   (`cudnn`: forward, input and weight gradients, depthwise as a grouped convolution,
//!   descriptors and algorithms cached per shape); everything else, and every convolution
//!   without `cudnn`, runs on candle's own kernels.
//!
//! The models call these functions and never see either layout.

pub mod batchnorm;
pub mod conv;
#[cfg(feature = "cudnn")]
pub mod cudnn;
pub mod fmap;
pub mod layout;
pub mod unit;

use candle_core::{Result, Tensor};

pub use conv::ConvGeometry;
pub use fmap::on_cpu_path;

use crate::engine::graph::{Act, ConvKind};

/// A `[N, C, H, W]` batch as the layers' feature maps.
pub fn to_features(x: &Tensor) -> Result<Tensor> {
    if on_cpu_path(x) { layout::to_map(x) } else { Ok(x.clone()) }
}

/// Feature maps back to `[N, C, H, W]`.
pub fn from_features(x: &Tensor) -> Result<Tensor> {
    if on_cpu_path(x) { layout::from_map(x) } else { Ok(x.clone()) }
}

/// A convolution of feature maps: `Dense` weights `[cout, cin, k, k]`, `Depthwise`
/// `[c, 1, k, k]`, `Transposed` `[cin, cout, k, k]` (a ConvTranspose2d without output
/// padding); optional bias `[cout]`; `act` other than identity is fused in for inference
/// (no backward pass on CPU).
pub fn convolution(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>, kind: ConvKind, stride: usize, pad: usize, act: Act) -> Result<Tensor> {
    if on_cpu_path(x) {
        let k = weight.dim(3)?;
        return conv::conv(x, weight, bias, ConvGeometry { kind, k, stride, pad }, act);
    }
    #[cfg(feature = "cudnn")]
    if cudnn::handles(x) {
        return cudnn::convolution(x, weight, bias, ConvGeometry { kind, k: weight.dim(3)?, stride, pad }, act);
    }
    let y = match kind {
        ConvKind::Dense => x.conv2d(weight, pad, stride, 1, 1)?,
        ConvKind::Depthwise => x.conv2d(weight, pad, stride, 1, x.dim(1)?)?,
        ConvKind::Transposed => x.conv_transpose2d(weight, pad, 0, stride, 1)?,
    };
    let y = match bias {
        Some(b) => y.broadcast_add(&b.reshape((1, (), 1, 1))?)?,
        None => y,
    };
    crate::model::blocks::activate(act, &y)
}

/// 2-D convolution, `weight [Cout, Cin, k, k]`, optional `bias [Cout]`.
pub fn conv2d(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>, stride: usize, pad: usize) -> Result<Tensor> {
    convolution(x, weight, bias, ConvKind::Dense, stride, pad, Act::Identity)
}

/// Transposed 2-D convolution (PyTorch `ConvTranspose2d`, no output padding), `weight [Cin, Cout, k, k]`.
pub fn conv_transpose2d(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>, stride: usize, pad: usize) -> Result<Tensor> {
    convolution(x, weight, bias, ConvKind::Transposed, stride, pad, Act::Identity)
}

/// Depthwise convolution, `weight [C, 1, k, k]`.
pub fn depthwise_conv2d(x: &Tensor, weight: &Tensor, stride: usize, pad: usize) -> Result<Tensor> {
    convolution(x, weight, None, ConvKind::Depthwise, stride, pad, Act::Identity)
}

/// 2×2 max pooling with stride 2 (odd edges dropped); the gradient goes to each window's
/// first maximum.
pub fn max_pool2x2(x: &Tensor) -> Result<Tensor> {
    if on_cpu_path(x) { layout::max_pool2x2(x) } else { x.max_pool2d(2) }
}

/// Depth-to-space by 2: channel `c·4 + 2a + b` of each pixel to sub-pixel `(a, b)` of a map
/// twice the size.
pub fn depth_to_space2(x: &Tensor) -> Result<Tensor> {
    if on_cpu_path(x) {
        return layout::depth_to_space2(x);
    }
    let (n, crr, h, w) = x.dims4()?;
    let c = crr / 4;
    x.reshape((n, c, 2, 2, h, w))?.permute((0, 1, 4, 2, 5, 3))?.reshape((n, c, h * 2, w * 2))
}

/// Channel concatenation of two feature maps of the same size.
pub fn concat_channels(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if on_cpu_path(a) { layout::concat(a, b) } else { Tensor::cat(&[a, b], 1) }
}

#[cfg(test)]
mod tests;
