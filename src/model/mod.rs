//! The segmentation networks and what travels with them: the serializable [`ModelSpec`]
//! (architecture, settings, input size, normalization, class names), construction into a
//! candle `VarMap`, deterministic initialisation, timm checkpoint loading, and BatchNorm folding.

pub mod blocks;
pub mod inference;
pub mod ops;
pub mod mobilenetv2;
pub mod onnx;
pub mod unet;
pub mod upsample;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use candle_core::{DType, Device, ModuleT, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use serde::{Deserialize, Serialize};

use crate::config::{Arch, CLASS_NAMES, Config};
use crate::data::transform::Normalization;
use crate::util::rng::Rng;
use blocks::{BnMode, ConvBnPair};

/// Everything needed to rebuild a network and feed it, stored in checkpoints and `model.yaml`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    pub arch: Arch,
    /// Square input side, in pixels.
    pub input_size: usize,
    pub class_names: Vec<String>,
    pub normalization: Normalization,
    /// `unet` settings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unet: Option<UnetSpec>,
    /// `mobilenetv2_unet`: whether the encoder trains (frozen = eval-mode BN, no gradient).
    #[serde(default = "default_true")]
    pub encoder_trainable: bool,
    /// BatchNorm was folded into the convolutions (exported models).
    #[serde(default)]
    pub batchnorm_folded: bool,
}

fn default_true() -> bool {
    true
}

/// `unet` settings as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UnetSpec {
    pub depth: usize,
    pub base_width: usize,
    /// Explicit channels per level, bottleneck last (overrides depth and base width).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub widths: Option<Vec<usize>>,
}

impl UnetSpec {
    fn config(&self) -> crate::config::UnetConfig {
        crate::config::UnetConfig { depth: self.depth, base_width: self.base_width, widths: self.widths.clone() }
    }
}

impl ModelSpec {
    /// The spec a config describes.
    pub fn from_config(config: &Config) -> Self {
        let m = &config.model;
        ModelSpec {
            arch: m.arch,
            input_size: config.data.image_size,
            class_names: CLASS_NAMES.iter().map(|s| s.to_string()).collect(),
            normalization: match m.arch {
                Arch::Unet => Normalization::UNIT,
                Arch::Mobilenetv2Unet => Normalization::IMAGENET,
            },
            unet: (m.arch == Arch::Unet).then(|| UnetSpec {
                depth: m.unet.levels(),
                base_width: m.unet.base_width,
                widths: m.unet.widths.clone(),
            }),
            encoder_trainable: m.encoder.trainable,
            batchnorm_folded: false,
        }
    }

    pub fn num_classes(&self) -> usize {
        self.class_names.len()
    }

    /// Checks a spec read from a checkpoint or `model.yaml` (untrusted) against the limits the
    /// config enforces, before any network is built from it. The error names the spec key.
    pub fn check(&self) -> Result<()> {
        crate::config::check_image_size(self.input_size).map_err(|m| anyhow::anyhow!("key `input_size`: {m}"))?;
        if self.num_classes() != CLASS_NAMES.len() {
            bail!("key `class_names`: must name the {} classes ({}), got {}", CLASS_NAMES.len(), CLASS_NAMES.join(", "), self.num_classes());
        }
        if self.arch == Arch::Unet {
            let unet = self.unet.as_ref().map_or_else(crate::config::UnetConfig::default, UnetSpec::config);
            crate::config::check_unet(&unet, Some(self.input_size)).map_err(|(field, m)| anyhow::anyhow!("key `unet.{field}`: {m}"))?;
        }
        Ok(())
    }

    /// A one-line description (`unet depth 4 width 16, 128×128, 3 classes`).
    pub fn describe(&self) -> String {
        let arch = match (&self.arch, &self.unet) {
            (Arch::Unet, Some(u)) => match &u.widths {
                Some(w) => format!("unet (widths {w:?})"),
                None => format!("unet (depth {}, base width {})", u.depth, u.base_width),
            },
            (arch, _) => arch.to_string(),
        };
        format!("{arch}, {0}x{0} input, {1} classes", self.input_size, self.num_classes())
    }
}

/// A built network.
#[derive(Debug, Clone)]
pub enum SegModel {
    Unet(unet::Unet),
    MobileNetV2Unet(mobilenetv2::MobileNetV2Unet),
}

impl SegModel {
    /// Builds the network described by `spec`, taking (or creating) its variables from `vb`.
    pub fn new(spec: &ModelSpec, vb: VarBuilder) -> candle_core::Result<Self> {
        let mode = if spec.batchnorm_folded { BnMode::Folded } else { BnMode::Separate };
        Ok(match spec.arch {
            Arch::Unet => {
                let widths = spec.unet.as_ref().map_or_else(|| crate::config::UnetConfig::default().level_widths(), |u| u.config().level_widths());
                let settings = unet::UnetSettings { widths };
                SegModel::Unet(unet::Unet::new(settings, spec.num_classes(), mode, vb)?)
            }
            Arch::Mobilenetv2Unet => SegModel::MobileNetV2Unet(mobilenetv2::MobileNetV2Unet::new(
                spec.num_classes(),
                spec.encoder_trainable,
                mode,
                vb,
            )?),
        })
    }

    /// The network as a layout-free inference graph, BatchNorm folded (what the inference
    /// engine compiles).
    pub fn lower(&self) -> candle_core::Result<crate::engine::Graph> {
        match self {
            SegModel::Unet(m) => m.lower(),
            SegModel::MobileNetV2Unet(m) => m.lower(),
        }
    }

    /// Every convolution followed by a BatchNorm (for folding).
    pub fn conv_bn_pairs(&self) -> Vec<ConvBnPair> {
        let mut out = Vec::new();
        match self {
            SegModel::Unet(m) => m.conv_bn_pairs(&mut out),
            SegModel::MobileNetV2Unet(m) => m.conv_bn_pairs(&mut out),
        }
        out
    }
}

impl ModuleT for SegModel {
    /// Logits `[N, classes, S, S]` of a batch `[N, 3, S, S]` (the layers in between see the
    /// feature maps of [`ops`]).
    fn forward_t(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        let x = ops::to_features(x)?;
        let y = match self {
            SegModel::Unet(m) => m.forward_t(&x, train)?,
            SegModel::MobileNetV2Unet(m) => m.forward_t(&x, train)?,
        };
        ops::from_features(&y)
    }
}

/// The name and shape of every variable `spec`'s network has, found without allocating any:
/// the network is built over zero-stride views of one scalar. What a weights file is checked
/// against before a byte of it is read into tensors (a small `model.yaml` can ask for a huge
/// network).
pub fn variable_shapes(spec: &ModelSpec) -> Result<std::collections::BTreeMap<String, Vec<usize>>> {
    spec.check().context("invalid model spec")?;
    struct Recorder<'a>(&'a std::sync::Mutex<std::collections::BTreeMap<String, Vec<usize>>>);
    impl candle_nn::var_builder::SimpleBackend for Recorder<'_> {
        fn get(&self, s: candle_core::Shape, name: &str, _: candle_nn::Init, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
            self.0.lock().unwrap_or_else(|e| e.into_inner()).insert(name.to_string(), s.dims().to_vec());
            Tensor::zeros((), dtype, dev)?.broadcast_as(s)
        }
        fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
            candle_core::bail!("variable `{name}` without a shape")
        }
        fn contains_tensor(&self, _: &str) -> bool {
            false
        }
    }
    let shapes = std::sync::Mutex::new(std::collections::BTreeMap::new());
    {
        let vb = VarBuilder::from_backend(Box::new(Recorder(&shapes)), DType::F32, Device::Cpu);
        SegModel::new(spec, vb).context("failed to build the model")?;
    }
    Ok(shapes.into_inner().unwrap_or_else(|e| e.into_inner()))
}

/// A network with its variables, ready to train or to run.
pub struct ModelState {
    pub spec: ModelSpec,
    pub varmap: VarMap,
    pub model: SegModel,
    pub device: Device,
}

impl ModelState {
    /// A freshly initialised network (deterministic for `seed`).
    pub fn new(spec: &ModelSpec, device: &Device, seed: u64) -> Result<Self> {
        spec.check().context("invalid model spec")?;
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, device);
        let model = SegModel::new(spec, vb).context("failed to build the model")?;
        init_weights(&varmap, seed)?;
        Ok(Self { spec: spec.clone(), varmap, model, device: device.clone() })
    }

    /// A network whose variables are replaced by `tensors` (names must match exactly).
    pub fn from_tensors(spec: &ModelSpec, tensors: &HashMap<String, Tensor>, device: &Device) -> Result<Self> {
        let state = Self::new(spec, device, 0)?;
        state.assign(tensors, "")?;
        Ok(state)
    }

    /// Copies `tensors` into the variables; every variable must be covered.
    pub fn assign(&self, tensors: &HashMap<String, Tensor>, what: &str) -> Result<()> {
        let vars = self.varmap.data().lock().expect("varmap lock");
        for (name, var) in vars.iter() {
            let t = tensors.get(name).with_context(|| format!("{what}missing tensor `{name}`"))?;
            set_var(var, t, name)?;
        }
        Ok(())
    }

    /// All variables by name (weights, biases, BatchNorm running statistics).
    pub fn named_tensors(&self) -> HashMap<String, Tensor> {
        let vars = self.varmap.data().lock().expect("varmap lock");
        vars.iter().map(|(k, v)| (k.clone(), v.as_tensor().clone())).collect()
    }

    /// Every variable by name (weights, biases, BatchNorm running statistics), sorted.
    pub fn named_vars(&self) -> Vec<(String, Var)> {
        let vars = self.varmap.data().lock().expect("varmap lock");
        let mut out: Vec<(String, Var)> = vars.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// The variables the optimizer updates: not the running statistics, and not a frozen
    /// encoder. Sorted by name so optimizer state lines up across runs.
    pub fn trainable_vars(&self) -> Vec<(String, Var)> {
        self.named_vars()
            .into_iter()
            .filter(|(name, _)| !name.contains("running_"))
            .filter(|(name, _)| self.spec.encoder_trainable || !name.starts_with("encoder."))
            .collect()
    }

    /// Number of parameters (excluding running statistics).
    pub fn parameter_count(&self) -> usize {
        let vars = self.varmap.data().lock().expect("varmap lock");
        vars.iter().filter(|(n, _)| !n.contains("running_")).map(|(_, v)| v.elem_count()).sum()
    }

    /// Logits `[N, classes, S, S]` for a normalized batch `[N, 3, S, S]`.
    pub fn forward(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        self.model.forward_t(x, train)
    }
}

fn set_var(var: &Var, value: &Tensor, name: &str) -> Result<()> {
    if var.dims() != value.dims() {
        bail!("tensor `{name}` has shape {:?}, the model expects {:?}", value.dims(), var.dims());
    }
    let value = value.to_dtype(var.dtype())?.to_device(var.device())?;
    var.set(&value).with_context(|| format!("failed to set `{name}`"))?;
    Ok(())
}

/// Re-initialises every variable from `seed` (candle's CPU generator cannot be seeded):
/// Kaiming-normal convolution weights, unit BatchNorm scales, zero biases, fresh statistics.
/// Each variable draws from its own stream keyed by its name, so the result does not depend
/// on construction order.
pub fn init_weights(varmap: &VarMap, seed: u64) -> Result<()> {
    let vars = varmap.data().lock().expect("varmap lock");
    for (name, var) in vars.iter() {
        let dims = var.dims().to_vec();
        let n: usize = dims.iter().product();
        let values: Vec<f32> = if name.ends_with("running_mean") || name.ends_with(".bias") {
            vec![0.0; n]
        } else if name.ends_with("running_var") || (dims.len() == 1 && name.ends_with(".weight")) {
            vec![1.0; n]
        } else {
            let fan_in: usize = dims[1..].iter().product::<usize>().max(1);
            let std = (2.0 / fan_in as f32).sqrt();
            let mut rng = Rng::derive(seed, name_hash(name));
            (0..n).map(|_| rng.normal() * std).collect()
        };
        let t = Tensor::from_vec(values, dims.as_slice(), var.device())?;
        var.set(&t)?;
    }
    Ok(())
}

fn name_hash(name: &str) -> u64 {
    // FNV-1a: stable across runs and platforms.
    name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3))
}

/// Maps a timm `mobilenetv2_100` state-dict name to ours (`None` for what the taps don't use:
/// the head convolution, its BatchNorm, the classifier, batch counters).
pub fn timm_to_segctl(name: &str) -> Option<String> {
    if name.ends_with("num_batches_tracked") {
        return None;
    }
    let used = name.starts_with("conv_stem.")
        || name.starts_with("bn1.")
        || (0..=6).any(|i| name.starts_with(&format!("blocks.{i}.")));
    used.then(|| format!("encoder.{name}"))
}

/// Where the encoder's pretrained weights come from.
pub fn resolve_encoder_weights(weights: &str) -> Result<Option<PathBuf>> {
    if weights.is_empty() || weights == "none" {
        return Ok(None);
    }
    let local = Path::new(weights);
    if weights.ends_with(".safetensors") || local.is_file() {
        if !local.is_file() {
            bail!("encoder weights `{weights}` not found (model.encoder.weights)");
        }
        return Ok(Some(local.to_path_buf()));
    }
    let offline = std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
    let file = "model.safetensors";
    if offline {
        let cached = hf_hub::Cache::from_env().model(weights.to_string()).get(file);
        return cached.map(Some).with_context(|| {
            format!("`{weights}` is not in the Hugging Face cache and HF_HUB_OFFLINE is set (model.encoder.weights)")
        });
    }
    let api = hf_hub::api::sync::ApiBuilder::from_env()
        .with_progress(false)
        .build()
        .context("failed to set up the Hugging Face client")?;
    let path = api
        .model(weights.to_string())
        .get(file)
        .with_context(|| format!("failed to get `{file}` of `{weights}` from the Hugging Face Hub (model.encoder.weights)"))?;
    Ok(Some(path))
}

/// Loads timm MobileNetV2 weights into the encoder of `state`. Every encoder variable must be
/// present in the file with the right shape.
pub fn load_timm_encoder(state: &ModelState, path: &Path) -> Result<usize> {
    let tensors = candle_core::safetensors::load(path, &Device::Cpu)
        .with_context(|| format!("failed to read `{}`", path.display()))?;
    let mapped: HashMap<String, Tensor> =
        tensors.into_iter().filter_map(|(k, v)| timm_to_segctl(&k).map(|n| (n, v))).collect();
    let vars = state.varmap.data().lock().expect("varmap lock");
    let mut loaded = 0;
    for (name, var) in vars.iter().filter(|(n, _)| n.starts_with("encoder.")) {
        let t = mapped.get(name).with_context(|| {
            format!("`{}` has no tensor for `{}` (is it a timm mobilenetv2_100 checkpoint?)", path.display(), &name["encoder.".len()..])
        })?;
        set_var(var, t, name).with_context(|| format!("`{}`", path.display()))?;
        loaded += 1;
    }
    Ok(loaded)
}

/// Folds each BatchNorm (inference statistics) into the convolution before it:
/// `w' = w·γ/√(σ²+ε)` per output channel and `b' = (b − μ)·γ/√(σ²+ε) + β`.
pub fn fold_batchnorm(tensors: &HashMap<String, Tensor>, pairs: &[ConvBnPair]) -> Result<HashMap<String, Tensor>> {
    let mut out = tensors.clone();
    for pair in pairs {
        let get = |name: String| out.get(&name).cloned().with_context(|| format!("missing tensor `{name}`"));
        let weight = get(format!("{}.weight", pair.conv))?;
        let gamma = get(format!("{}.weight", pair.bn))?;
        let beta = get(format!("{}.bias", pair.bn))?;
        let mean = get(format!("{}.running_mean", pair.bn))?;
        let var = get(format!("{}.running_var", pair.bn))?;
        let scale = (gamma / (var + blocks::BN_EPS)?.sqrt()?)?;
        let channels = scale.dim(0)?;
        let shaped = if pair.transposed { scale.reshape((1, channels, 1, 1))? } else { scale.reshape((channels, 1, 1, 1))? };
        let new_weight = weight.broadcast_mul(&shaped)?;
        let bias = match out.get(&format!("{}.bias", pair.conv)) {
            Some(b) => b.clone(),
            None => Tensor::zeros(channels, DType::F32, weight.device())?,
        };
        let new_bias = ((bias - mean)? * &scale)?.add(&beta)?;
        for suffix in ["weight", "bias", "running_mean", "running_var"] {
            out.remove(&format!("{}.{suffix}", pair.bn));
        }
        out.insert(format!("{}.weight", pair.conv), new_weight);
        out.insert(format!("{}.bias", pair.conv), new_bias);
    }
    Ok(out)
}

/// Picks the compute device: `auto` = CUDA when built with it and a GPU answers, else CPU.
pub fn select_device(spec: crate::config::DeviceSpec) -> Result<Device> {
    use crate::config::DeviceSpec;
    match spec {
        DeviceSpec::Cpu => Ok(Device::Cpu),
        DeviceSpec::Auto => {
            let device = Device::cuda_if_available(0).unwrap_or(Device::Cpu);
            prepare_cuda(&device).context("CUDA device 0: setting its memory pool")?;
            Ok(device)
        }
        DeviceSpec::Cuda(n) => {
            if !candle_core::utils::cuda_is_available() {
                bail!("--device cuda:{n}: this segctl was built without CUDA (rebuild with `--features cuda`)");
            }
            let device = Device::new_cuda(n).with_context(|| format!("CUDA device {n} is not usable"))?;
            prepare_cuda(&device).with_context(|| format!("CUDA device {n}: setting its memory pool"))?;
            Ok(device)
        }
    }
}

/// Start-up settings of a CUDA device: with `cudnn`, freed memory stays in the device's pool
/// across synchronisations ([`ops::cudnn::keep_freed_memory`]).
fn prepare_cuda(device: &Device) -> Result<()> {
    #[cfg(feature = "cudnn")]
    if let Device::Cuda(d) = device {
        ops::cudnn::keep_freed_memory(d)?;
    }
    let _ = device;
    Ok(())
}

/// A short name for logs and reports (`cpu`, `cuda:0`).
pub fn device_name(device: &Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cpu => "cpu".into(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

#[cfg(test)]
mod tests;
#[cfg(test)]
mod engine_tests;
