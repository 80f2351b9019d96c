//! The one typed configuration tree shared by every subcommand: YAML in, defaults in one place
//! (the `Default` impls below), overrides from `--set key=value` and flags, validated once at
//! load with errors that name the file and the key.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

/// The class names, in class-id order (trimap value − 1).
pub const CLASS_NAMES: [&str; 3] = ["pet", "background", "border"];

/// Largest square input side (`data.image_size`, a model spec's `input_size`).
pub const MAX_IMAGE_SIZE: usize = 4096;
/// Most channels of any UNet level (`model.unet.base_width` doubled per level, or
/// `model.unet.widths`).
pub const MAX_UNET_WIDTH: usize = 2048;
/// Range of UNet down-samplings (`model.unet.depth`).
pub const UNET_DEPTHS: std::ops::RangeInclusive<usize> = 1..=6;

/// The whole configuration.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub data: DataConfig,
    pub model: ModelConfig,
    pub train: TrainConfig,
    pub evaluate: EvaluateConfig,
    pub export: ExportConfig,
    pub serve: ServeConfig,
    pub storage: StorageConfig,
}

/// `storage`: the object stores behind `s3://`, `gs://` and `az://` paths. Credentials and
/// endpoints come from the providers' environment variables first (`AWS_ACCESS_KEY_ID`,
/// `AWS_ENDPOINT_URL`, `GOOGLE_APPLICATION_CREDENTIALS`, …). Its `Debug` shows the option
/// names, never their values.
#[derive(Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct StorageConfig {
    /// Local cache of downloaded objects (keyed by ETag) and staging of uploads; none =
    /// `SEGCTL_CACHE_DIR`, else `$XDG_CACHE_HOME/segctl`, else `~/.cache/segctl`.
    pub cache_dir: Option<PathBuf>,
    /// Store options by object_store's key names, e.g. `aws_endpoint_url`, `aws_region`,
    /// `aws_allow_http`, `google_service_account`, `azure_storage_account_name`.
    pub options: std::collections::BTreeMap<String, String>,
    /// A request (its retries included) is given up after this long.
    pub timeout_s: u64,
    /// Retries of a failed request (with backoff).
    pub retries: usize,
    /// Largest object read or downloaded (checked from the listing and while streaming).
    pub max_object_bytes: u64,
}

impl std::fmt::Debug for StorageConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let options: std::collections::BTreeMap<&str, &str> = self.options.keys().map(|k| (k.as_str(), REDACTED)).collect();
        f.debug_struct("StorageConfig")
            .field("cache_dir", &self.cache_dir)
            .field("options", &options)
            .field("timeout_s", &self.timeout_s)
            .field("retries", &self.retries)
            .field("max_object_bytes", &self.max_object_bytes)
            .finish()
    }
}

impl Default for StorageConfig {
    fn default() -> Self {
        Self { cache_dir: None, options: Default::default(), timeout_s: 60, retries: 3, max_object_bytes: 8 << 30 }
    }
}

/// `data`: where the dataset lives and how it is read.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct DataConfig {
    /// Dataset root (holds `images/` and `annotations/`).
    pub root: PathBuf,
    /// Side of the square model input, in pixels.
    pub image_size: usize,
    /// Fraction of trainval held out for validation.
    pub val_fraction: f64,
    /// Seed of the validation split and the shuffling.
    pub seed: u64,
    /// Decode threads (0 = one per core).
    pub workers: usize,
    /// Batches decoded ahead of the model.
    pub prefetch_batches: usize,
    /// Folder for the on-disk cache of preprocessed samples (none = no cache).
    pub cache_dir: Option<PathBuf>,
    /// Resized samples kept in memory across epochs, in MiB (0 = none).
    pub memory_cache_mb: usize,
    /// Random horizontal flip while training.
    pub hflip: bool,
    /// Training-time augmentation beyond the flip (all off by default; never applied to
    /// validation, test or inference).
    pub augment: AugmentConfig,
    /// How `fetch-data` downloads.
    pub fetch: FetchConfig,
}

/// `data.augment`: each transform has a probability `p` (0 = off) and its bounds. Geometric
/// ones move photo and mask together (masks by nearest neighbour, borders by reflection, so no
/// label is invented); photometric ones touch the photo only.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AugmentConfig {
    /// Random resized crop: a region of `scale` × the area with aspect ratio in `ratio`,
    /// stretched back to the input size.
    pub crop: CropAugment,
    /// Rotation by up to ± `degrees`.
    pub rotate: RotateAugment,
    /// Colour jitter: brightness, contrast and saturation factors in 1 ± the value, hue shift
    /// up to ± the value (a fraction of the colour wheel).
    pub color: ColorAugment,
    /// Gaussian blur with sigma in `sigma`.
    pub blur: BlurAugment,
    /// Additive Gaussian noise of standard deviation `std` (in 0..1 pixel units).
    pub noise: NoiseAugment,
}

impl Default for CropAugment {
    fn default() -> Self {
        Self { p: 0.0, scale: [0.6, 1.0], ratio: [0.75, 1.333] }
    }
}

impl Default for RotateAugment {
    fn default() -> Self {
        Self { p: 0.0, degrees: 10.0 }
    }
}

impl Default for ColorAugment {
    fn default() -> Self {
        Self { p: 0.0, brightness: 0.2, contrast: 0.2, saturation: 0.2, hue: 0.02 }
    }
}

impl Default for BlurAugment {
    fn default() -> Self {
        Self { p: 0.0, sigma: [0.3, 1.0] }
    }
}

impl Default for NoiseAugment {
    fn default() -> Self {
        Self { p: 0.0, std: 0.02 }
    }
}

impl AugmentConfig {
    /// Whether any transform is on.
    pub fn any(&self) -> bool {
        [self.crop.p, self.rotate.p, self.color.p, self.blur.p, self.noise.p].iter().any(|&p| p > 0.0)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct CropAugment {
    pub p: f32,
    pub scale: [f32; 2],
    pub ratio: [f32; 2],
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct RotateAugment {
    pub p: f32,
    pub degrees: f32,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ColorAugment {
    pub p: f32,
    pub brightness: f32,
    pub contrast: f32,
    pub saturation: f32,
    pub hue: f32,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct BlurAugment {
    pub p: f32,
    pub sigma: [f32; 2],
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct NoiseAugment {
    pub p: f32,
    pub std: f32,
}

impl Default for DataConfig {
    fn default() -> Self {
        Self {
            root: PathBuf::from("data/oxford-iiit-pet"),
            image_size: 128,
            val_fraction: 0.1,
            seed: 42,
            workers: 0,
            prefetch_batches: 4,
            cache_dir: None,
            memory_cache_mb: 1024,
            hflip: true,
            augment: AugmentConfig::default(),
            fetch: FetchConfig::default(),
        }
    }
}

/// `data.fetch`: download behaviour.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct FetchConfig {
    /// URL prefix or local folder holding `images.tar.gz` and `annotations.tar.gz`
    /// (none = the official URLs, then the official mirror).
    pub source: Option<String>,
    /// md5sum-format file replacing the official checksums.
    pub checksums: Option<PathBuf>,
    /// Attempts per archive before giving up.
    pub retries: u32,
    /// First retry delay; doubles on each attempt.
    pub retry_backoff_ms: u64,
    /// Connect and read timeout, in seconds.
    pub timeout_s: u64,
    /// Cap on the total bytes extracted from the archives (decompression bombs).
    pub max_extract_bytes: u64,
    /// Cap on the members (files, folders, links) of the two archives together.
    pub max_members: u64,
    /// Cap on the size of any single archive member.
    pub max_member_bytes: u64,
}

impl Default for FetchConfig {
    fn default() -> Self {
        Self {
            source: None,
            checksums: None,
            retries: 5,
            retry_backoff_ms: 1000,
            timeout_s: 60,
            max_extract_bytes: 4 << 30,
            max_members: 100_000,
            max_member_bytes: 64 << 20,
        }
    }
}

/// Model architectures.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Arch {
    /// Plain UNet trained from scratch.
    Unet,
    /// MobileNetV2 encoder + pix2pix decoder.
    Mobilenetv2Unet,
}

impl std::fmt::Display for Arch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Arch::Unet => "unet",
            Arch::Mobilenetv2Unet => "mobilenetv2_unet",
        })
    }
}

/// `model`: which network and its settings.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ModelConfig {
    pub arch: Arch,
    /// Settings of `unet`.
    pub unet: UnetConfig,
    /// Settings of the `mobilenetv2_unet` encoder.
    pub encoder: EncoderConfig,
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self { arch: Arch::Unet, unet: UnetConfig::default(), encoder: EncoderConfig::default() }
    }
}

/// `model.unet`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct UnetConfig {
    /// Number of 2× downsamplings.
    pub depth: usize,
    /// Channels of the first level; doubled at each level.
    pub base_width: usize,
    /// Explicit channels per level, bottleneck last (overrides `depth` and `base_width`).
    pub widths: Option<Vec<usize>>,
}

impl Default for UnetConfig {
    fn default() -> Self {
        Self { depth: 4, base_width: 32, widths: None }
    }
}

impl UnetConfig {
    /// Channels per level, bottleneck last (`depth + 1` entries).
    pub fn level_widths(&self) -> Vec<usize> {
        match &self.widths {
            Some(w) => w.clone(),
            None => (0..=self.depth).map(|level| self.base_width << level).collect(),
        }
    }

    /// Number of down-samplings.
    pub fn levels(&self) -> usize {
        self.widths.as_ref().map_or(self.depth, |w| w.len().saturating_sub(1))
    }
}

/// `model.encoder` (for `mobilenetv2_unet`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct EncoderConfig {
    /// A Hugging Face repo id (`timm/mobilenetv2_100.ra_in1k`), a local `.safetensors` path,
    /// or `none` for random initialisation.
    pub weights: String,
    /// `false` keeps the encoder out of the optimizer, with BatchNorm in eval mode.
    pub trainable: bool,
}

impl Default for EncoderConfig {
    fn default() -> Self {
        Self { weights: "timm/mobilenetv2_100.ra_in1k".into(), trainable: true }
    }
}

/// `train`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    pub epochs: usize,
    pub batch_size: usize,
    /// `auto`, `cpu`, `cuda` or `cuda:N`.
    pub device: DeviceSpec,
    /// Where run folders are created.
    pub output_dir: PathBuf,
    /// Run folder name under `output_dir` (none = a timestamped name).
    pub run_name: Option<String>,
    /// Seed of weight initialisation, augmentation and data order.
    pub seed: u64,
    /// Cap on optimizer steps per epoch (none = the whole split); for quick checks.
    pub max_steps_per_epoch: Option<usize>,
    /// Batches whose gradients are summed (each loss divided by the group's size) before one
    /// optimizer step, as Lightning's `accumulate_grad_batches`: an effective batch of
    /// `batch_size × accumulate_steps` in the memory of one batch. An epoch's last group may
    /// be shorter. 1 = a step per batch.
    pub accumulate_steps: usize,
    /// Rescale the gradients so their global L2 norm is at most this before each optimizer
    /// step (as `torch.nn.utils.clip_grad_norm_`); none = no clipping.
    pub clip_grad_norm: Option<f64>,
    pub optimizer: OptimizerConfig,
    pub schedule: ScheduleConfig,
    pub loss: LossConfig,
    pub checkpoint: CheckpointConfig,
    pub early_stopping: EarlyStoppingConfig,
    /// Decay of an exponential moving average of the weights (as timm's and Keras's EMA):
    /// validation, checkpoints' `model.*` tensors and so evaluate/predict/export use the
    /// averaged weights. None = off; 0.99 averages over roughly the last 100 steps.
    pub ema_decay: Option<f64>,
    /// Write TensorBoard event files (`events.out.tfevents.*`) into the run folder.
    pub tensorboard: bool,
    /// Arithmetic of the convolutions: `f32`, or `bf16` (operands rounded to bfloat16,
    /// products accumulated in f32; master weights, optimizer state, BatchNorm, loss and
    /// reductions stay f32, as PyTorch's CPU autocast). Recorded in checkpoints.
    #[serde(skip_serializing_if = "Precision::is_f32")]
    pub precision: Precision,
}

/// `train.precision`, `export.precision`.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum Precision {
    #[default]
    F32,
    Bf16,
    /// Inference only (`export.precision`): post-training static quantization.
    Int8,
}

impl Precision {
    pub fn is_f32(&self) -> bool {
        *self == Precision::F32
    }

    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
            Precision::Int8 => "int8",
        }
    }
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            epochs: 30,
            batch_size: 16,
            device: DeviceSpec::Auto,
            output_dir: PathBuf::from("checkpoints"),
            run_name: None,
            seed: 1,
            max_steps_per_epoch: None,
            accumulate_steps: 1,
            clip_grad_norm: None,
            optimizer: OptimizerConfig::default(),
            schedule: ScheduleConfig::default(),
            loss: LossConfig::default(),
            checkpoint: CheckpointConfig::default(),
            early_stopping: EarlyStoppingConfig::default(),
            ema_decay: None,
            tensorboard: true,
            precision: Precision::F32,
        }
    }
}

/// `train.optimizer` (AdamW).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct OptimizerConfig {
    pub lr: f64,
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
}

impl Default for OptimizerConfig {
    fn default() -> Self {
        Self { lr: 1e-3, weight_decay: 1e-4, beta1: 0.9, beta2: 0.999, eps: 1e-8 }
    }
}

/// Learning-rate schedule kinds.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ScheduleKind {
    Constant,
    Step,
    Cosine,
}

/// `train.schedule`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ScheduleConfig {
    pub kind: ScheduleKind,
    /// Linear warm-up from 0, in epochs (fractions allowed).
    pub warmup_epochs: f64,
    /// `step`: multiply by `gamma` every `step_epochs`.
    pub step_epochs: usize,
    pub gamma: f64,
    /// `cosine`: the floor, as a fraction of `train.optimizer.lr`.
    pub min_lr_fraction: f64,
}

impl Default for ScheduleConfig {
    fn default() -> Self {
        Self {
            kind: ScheduleKind::Cosine,
            warmup_epochs: 1.0,
            step_epochs: 10,
            gamma: 0.1,
            min_lr_fraction: 0.01,
        }
    }
}

/// Loss kinds.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum LossKind {
    /// Pixel-wise cross-entropy.
    Ce,
    /// Soft Dice over the classes.
    Dice,
    /// Cross-entropy + `dice_weight` × Dice.
    CeDice,
}

/// `train.loss`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct LossConfig {
    pub kind: LossKind,
    /// Per-class cross-entropy weights (pet, background, border); none = equal.
    pub class_weights: Option<Vec<f32>>,
    pub dice_weight: f64,
}

impl Default for LossConfig {
    fn default() -> Self {
        Self { kind: LossKind::Ce, class_weights: None, dice_weight: 1.0 }
    }
}

/// `train.checkpoint`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct CheckpointConfig {
    /// Save every N epochs (the last epoch and the best are always saved).
    pub every_epochs: usize,
    /// Keep the last K periodic checkpoints.
    pub keep_last: usize,
}

impl Default for CheckpointConfig {
    fn default() -> Self {
        Self { every_epochs: 1, keep_last: 2 }
    }
}

/// `train.early_stopping`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct EarlyStoppingConfig {
    /// Stop after this many epochs without a validation-mIoU improvement (none = never).
    pub patience: Option<usize>,
    /// Smallest change that counts as an improvement.
    pub min_delta: f64,
}

impl Default for EarlyStoppingConfig {
    fn default() -> Self {
        Self { patience: None, min_delta: 1e-4 }
    }
}

/// `evaluate`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct EvaluateConfig {
    /// `test`, `trainval`, `train` or `val`.
    pub split: Split,
    pub batch_size: usize,
    /// Gate: reject below this mean IoU.
    pub min_miou: Option<f64>,
    /// Gate: reject more than this below the baseline's mean IoU.
    pub max_drop: Option<f64>,
    /// Also report the metrics on masks up-sampled to each photo's own size (`predict`'s
    /// masks) against the full-size trimaps.
    pub at_original_size: bool,
}

impl Default for EvaluateConfig {
    fn default() -> Self {
        Self { split: Split::Test, batch_size: 16, min_miou: None, max_drop: None, at_original_size: false }
    }
}

/// `export`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ExportConfig {
    /// The model repository (`<repository>/<name>/<version>/`).
    pub repository: PathBuf,
    /// Fold inference BatchNorm into the convolutions when outputs stay within 1e-4.
    pub fold_batchnorm: bool,
    /// Also write `model.onnx` (opset 17) into the version folder.
    pub onnx: bool,
    /// The arithmetic the version is checked at and served at: `f32`, `bf16` (AMX tiles or
    /// AVX512-BF16 where the CPU has them), or `int8` (post-training static quantization,
    /// calibrated on `calibration_samples` training images). A reduced precision is
    /// published only when its validation mIoU is within `max_miou_drop` of the f32 plan's.
    #[serde(skip_serializing_if = "Precision::is_f32")]
    pub precision: Precision,
    /// Training images (drawn with `data.seed`) whose activation ranges calibrate an int8
    /// export.
    pub calibration_samples: usize,
    /// Largest validation mIoU loss (f32 minus reduced) a reduced-precision export accepts.
    pub max_miou_drop: f64,
}

impl Default for ExportConfig {
    fn default() -> Self {
        Self { repository: PathBuf::from("models"), fold_batchnorm: true, onnx: false, precision: Precision::F32, calibration_samples: 64, max_miou_drop: 0.005 }
    }
}

/// Which versions of a model the server loads: `all`, `{latest: N}` or `{specific: [..]}`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(try_from = "RawVersionPolicy", into = "RawVersionPolicy")]
pub enum VersionPolicy {
    /// The newest N versions.
    Latest(usize),
    /// Every version present.
    All,
    /// Exactly these versions.
    Specific(Vec<u64>),
}

/// The YAML shapes of [`VersionPolicy`] (serde_yaml cannot read externally tagged enums from a
/// value tree, which `--set` needs).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
enum RawVersionPolicy {
    Word(String),
    Latest { latest: usize },
    Specific { specific: Vec<u64> },
}

impl TryFrom<RawVersionPolicy> for VersionPolicy {
    type Error = String;
    fn try_from(raw: RawVersionPolicy) -> std::result::Result<Self, String> {
        match raw {
            RawVersionPolicy::Word(w) if w == "all" => Ok(VersionPolicy::All),
            RawVersionPolicy::Word(w) => Err(format!("`{w}` is not a version policy: use all, {{latest: N}} or {{specific: [..]}}")),
            RawVersionPolicy::Latest { latest } => Ok(VersionPolicy::Latest(latest)),
            RawVersionPolicy::Specific { specific } => Ok(VersionPolicy::Specific(specific)),
        }
    }
}

impl From<VersionPolicy> for RawVersionPolicy {
    fn from(p: VersionPolicy) -> Self {
        match p {
            VersionPolicy::All => RawVersionPolicy::Word("all".into()),
            VersionPolicy::Latest(latest) => RawVersionPolicy::Latest { latest },
            VersionPolicy::Specific(specific) => RawVersionPolicy::Specific { specific },
        }
    }
}

impl Default for VersionPolicy {
    fn default() -> Self {
        VersionPolicy::Latest(1)
    }
}

/// `serve.models[]`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ServedModelConfig {
    pub name: String,
    #[serde(default)]
    pub version_policy: VersionPolicy,
}

/// `serve`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ServeConfig {
    pub host: String,
    pub port: u16,
    /// Model repository to serve (none = `export.repository`).
    pub repository: Option<PathBuf>,
    /// Models to serve (empty = every model in the repository, latest version).
    pub models: Vec<ServedModelConfig>,
    /// `/infer` serves this model (none = the only or first model).
    pub default_model: Option<String>,
    /// Most images in one model call (what is queued when a model thread frees up).
    pub max_batch_size: usize,
    /// How long a model thread waits for a fuller batch; 0 = never (dispatch at once).
    pub max_delay_ms: u64,
    /// Requests waiting per model version before 503.
    pub queue_capacity: usize,
    pub max_body_bytes: usize,
    /// Most decoded pixels per request, summed over all its images (decompression bombs).
    pub max_pixels: u64,
    /// Bytes of request data in flight across all requests (bodies, decoded photos, masks,
    /// answers); a request waits for its share, or gets 413 when it alone needs more.
    pub memory_budget_bytes: u64,
    /// Largest JSON answer (`/infer`, `:predict`, `:segment?format=json`), checked before
    /// any work.
    pub max_json_response_bytes: u64,
    /// Deadline of a request, queueing included; queued work of a request past it (or whose
    /// client left) is dropped.
    pub request_timeout_ms: u64,
    /// Decode a JPEG whose pixels only feed the model at the smallest DCT scale (1/2, 1/4,
    /// 1/8) that keeps both sides at least the model input (also `predict`, and `train`,
    /// validation and `evaluate`, so that what is measured is what is served); false = always
    /// at full size.
    pub jpeg_dct_scaling: bool,
    /// Cores the server keeps busy: request stages and model calls share this many tokens
    /// (0 = every core).
    pub cpu_threads: usize,
    /// Inference threads per model version, each running one model call at a time (0 = one
    /// per core of the CPU budget).
    pub model_threads: usize,
    /// Time a client has to send a request's headers (slow-header clients are dropped).
    pub header_read_timeout_ms: u64,
    /// An idle keep-alive connection is closed after this long.
    pub keep_alive_timeout_ms: u64,
    /// Open connections at most; more wait in the listen backlog.
    pub max_connections: usize,
    /// Largest request header block; larger ones get 431.
    pub max_header_bytes: usize,
    /// Time a client has to send a request's whole body, counted from its headers; a body
    /// still arriving after it is dropped with 408.
    pub body_read_timeout_ms: u64,
    /// Slowest upload kept: a body that, after its first 2 s, has arrived at fewer bytes per
    /// second than this on average is dropped with 408 (0 = no minimum rate).
    pub min_body_bytes_per_s: u64,
    /// Time an answer has to reach the client once it is being written; a client that reads
    /// slower is disconnected (the keep-alive timeout counts only while a connection is idle).
    pub response_write_timeout_ms: u64,
    /// Most scans a progressive JPEG may have on any decode path (a scan bomb is refused
    /// before it is decoded).
    pub max_jpeg_scans: u32,
    /// File of bearer tokens, one per line (`#` comments; also `SEGCTL_AUTH_TOKEN_FILE`).
    /// When set, every route except `/`, `/healthz`, `/readyz`, `/v2/health/live` and
    /// `/v2/health/ready` needs `Authorization: Bearer <token>` (else 401).
    pub auth_token_file: Option<PathBuf>,
    /// Host names (`Host` header, any port) the server answers; `*.example.com` matches its
    /// subdomains. Empty: only `localhost`, `127.0.0.1` and `[::1]` while listening on a
    /// loopback address, anything otherwise. Others get 421.
    pub allowed_hosts: Vec<String>,
    /// After SIGTERM/SIGINT, in-flight requests get this long before the server exits.
    pub shutdown_timeout_ms: u64,
    /// Origins allowed to call the API from a browser (CORS); empty = none (same-origin only).
    pub cors_origins: Vec<String>,
    /// How often the repository is rescanned for new or removed versions.
    pub poll_interval_ms: u64,
    /// Device for inference: `auto`, `cpu`, `cuda` or `cuda:N`.
    pub device: DeviceSpec,
}

impl Default for ServeConfig {
    fn default() -> Self {
        Self {
            host: "127.0.0.1".into(),
            port: 8080,
            repository: None,
            models: Vec::new(),
            default_model: None,
            max_batch_size: 4,
            max_delay_ms: 0,
            queue_capacity: 256,
            max_body_bytes: 32 << 20,
            max_pixels: 40_000_000,
            memory_budget_bytes: 256 << 20,
            max_json_response_bytes: 16 << 20,
            request_timeout_ms: 30_000,
            jpeg_dct_scaling: true,
            cpu_threads: 0,
            model_threads: 0,
            header_read_timeout_ms: 10_000,
            keep_alive_timeout_ms: 15_000,
            max_connections: 1024,
            max_header_bytes: 16 << 10,
            body_read_timeout_ms: 20_000,
            min_body_bytes_per_s: 16 << 10,
            response_write_timeout_ms: 60_000,
            max_jpeg_scans: 64,
            auth_token_file: None,
            allowed_hosts: Vec::new(),
            shutdown_timeout_ms: 10_000,
            cors_origins: Vec::new(),
            poll_interval_ms: 1000,
            device: DeviceSpec::Auto,
        }
    }
}

/// Loads the configuration: the YAML file (or the defaults when `path` is `None`), then each
/// `(dotted.key, yaml value)` override in order, then validation.
pub fn load(path: Option<&Path>, overrides: &[(String, String)]) -> Result<Config> {
    let (mut tree, origin) = match path {
        Some(p) => {
            let text = crate::util::fs::read_to_string(p)?;
            let value: serde_yaml::Value = serde_yaml::from_str(&text)
                .with_context(|| format!("config `{}` is not valid YAML", p.display()))?;
            let value = match value {
                serde_yaml::Value::Null => serde_yaml::Value::Mapping(Default::default()),
                v => v,
            };
            (value, format!("config `{}`", p.display()))
        }
        None => (serde_yaml::Value::Mapping(Default::default()), "built-in config".to_string()),
    };
    for (key, raw) in overrides {
        // A credential given on the command line is never echoed back.
        let shown = if holds_secrets(key) { REDACTED } else { raw.as_str() };
        let value: serde_yaml::Value = serde_yaml::from_str(raw)
            .with_context(|| format!("override `{key}={shown}`: value is not valid YAML"))?;
        set_dotted(&mut tree, key, value).with_context(|| format!("override `{key}={shown}`"))?;
    }
    let config: Config = serde_path_to_error::deserialize(tree).map_err(|err| {
        let key = err.path().to_string();
        if holds_secrets(&key) {
            // serde's message may quote the value.
            return anyhow::anyhow!("{origin}: key `{key}`: expected a string (a map of option names to strings)");
        }
        anyhow::anyhow!("{origin}: key `{key}`: {}", err.inner())
    })?;
    config.validate().map_err(|e| anyhow::anyhow!("{origin}: {e}"))?;
    Ok(config)
}

/// What a credential is written as, in every file, log line and message.
pub const REDACTED: &str = "<redacted>";

/// Whether a key's name says it holds a credential: one of its words (split at `_`, `-`, `.`)
/// is `secret`, `token`, `password`, `passwd`, `credential(s)` or `key`, unless it ends in `id`
/// (`aws_access_key_id` names an account, not a secret), or in `file`/`path`/`dir`/`url`/
/// `endpoint` (where a secret lives, not the secret).
pub fn is_secret_key(name: &str) -> bool {
    let words: Vec<String> = name.split(['_', '-', '.']).filter(|w| !w.is_empty()).map(str::to_ascii_lowercase).collect();
    let Some(last) = words.last() else { return false };
    if matches!(last.as_str(), "id" | "file" | "path" | "dir" | "url" | "endpoint") {
        return false;
    }
    words.iter().any(|w| matches!(w.as_str(), "secret" | "token" | "password" | "passwd" | "credential" | "credentials" | "key"))
}

/// Whether the value at dotted `key` may hold credentials: anything under `storage.options`,
/// or a key whose name says so.
fn holds_secrets(key: &str) -> bool {
    key == "storage" || key.starts_with("storage.options") || key.rsplit('.').next().is_some_and(is_secret_key)
}

impl Config {
    /// This config as it may be written down: every value of `storage.options` (credentials,
    /// and endpoints that may embed them) becomes [`REDACTED`]. Run folders, checkpoints and
    /// the digests of configs are made from it; a resumed run takes its credentials from the
    /// config and environment it is started with.
    pub fn redacted(&self) -> Config {
        let mut c = self.clone();
        for value in c.storage.options.values_mut() {
            *value = REDACTED.to_string();
        }
        c
    }
}

/// Sets `a.b.c` in a YAML mapping tree, creating intermediate mappings.
fn set_dotted(tree: &mut serde_yaml::Value, key: &str, value: serde_yaml::Value) -> Result<()> {
    let parts: Vec<&str> = key.split('.').collect();
    if parts.iter().any(|p| p.is_empty()) {
        bail!("`{key}` is not a dotted key like `train.epochs`");
    }
    let mut node = tree;
    for (i, part) in parts.iter().enumerate() {
        let map = match node {
            serde_yaml::Value::Mapping(m) => m,
            _ => bail!("`{}` is not a section, cannot set `{key}`", parts[..i].join(".")),
        };
        let k = serde_yaml::Value::String(part.to_string());
        if i + 1 == parts.len() {
            map.insert(k, value);
            return Ok(());
        }
        if !map.contains_key(&k) || map.get(&k).is_some_and(|v| v.is_null()) {
            map.insert(k.clone(), serde_yaml::Value::Mapping(Default::default()));
        }
        node = map.get_mut(&k).expect("inserted above");
    }
    Ok(())
}

impl Config {
    /// Checks values that types alone cannot; the message names the key.
    pub fn validate(&self) -> Result<()> {
        let d = &self.data;
        check_image_size(d.image_size).map_err(|m| anyhow::anyhow!("key `data.image_size`: {m}"))?;
        ensure_key((0.0..1.0).contains(&d.val_fraction), "data.val_fraction", || {
            format!("must be in [0, 1), got {}", d.val_fraction)
        })?;
        ensure_key(d.prefetch_batches >= 1, "data.prefetch_batches", || "must be at least 1".into())?;
        let a = &d.augment;
        for (key, p) in [("crop", a.crop.p), ("rotate", a.rotate.p), ("color", a.color.p), ("blur", a.blur.p), ("noise", a.noise.p)] {
            ensure_key((0.0..=1.0).contains(&p), &format!("data.augment.{key}.p"), || format!("{p} is not a probability (0 to 1)"))?;
        }
        let [lo, hi] = a.crop.scale;
        ensure_key(0.05 <= lo && lo <= hi && hi <= 1.0, "data.augment.crop.scale", || format!("[{lo}, {hi}] must be 0.05 <= lo <= hi <= 1"))?;
        let [lo, hi] = a.crop.ratio;
        ensure_key(0.1 <= lo && lo <= hi && hi <= 10.0, "data.augment.crop.ratio", || format!("[{lo}, {hi}] must be 0.1 <= lo <= hi <= 10"))?;
        ensure_key((0.0..=45.0).contains(&a.rotate.degrees), "data.augment.rotate.degrees", || format!("{} must be 0 to 45", a.rotate.degrees))?;
        let c = &a.color;
        for (key, v, max) in [("brightness", c.brightness, 1.0), ("contrast", c.contrast, 1.0), ("saturation", c.saturation, 1.0), ("hue", c.hue, 0.5)] {
            ensure_key((0.0..=max).contains(&v), &format!("data.augment.color.{key}"), || format!("{v} must be 0 to {max}"))?;
        }
        let [lo, hi] = a.blur.sigma;
        ensure_key(0.0 < lo && lo <= hi && hi <= 5.0, "data.augment.blur.sigma", || format!("[{lo}, {hi}] must be 0 < lo <= hi <= 5"))?;
        ensure_key((0.0..=0.5).contains(&a.noise.std), "data.augment.noise.std", || format!("{} must be 0 to 0.5", a.noise.std))?;
        ensure_key(d.fetch.retries >= 1, "data.fetch.retries", || "must be at least 1".into())?;
        ensure_key(d.fetch.timeout_s >= 1, "data.fetch.timeout_s", || "must be at least 1".into())?;
        ensure_key(d.fetch.max_members >= 1, "data.fetch.max_members", || "must be at least 1".into())?;
        ensure_key(d.fetch.max_member_bytes >= 1, "data.fetch.max_member_bytes", || "must be at least 1".into())?;
        let input = (self.model.arch == Arch::Unet).then_some(d.image_size);
        check_unet(&self.model.unet, input).map_err(|(field, m)| anyhow::anyhow!("key `model.unet.{field}`: {m}"))?;
        let t = &self.train;
        ensure_key(t.epochs >= 1, "train.epochs", || "must be at least 1".into())?;
        ensure_key(t.batch_size >= 1, "train.batch_size", || "must be at least 1".into())?;
        ensure_key((1..=1024).contains(&t.accumulate_steps), "train.accumulate_steps", || format!("must be 1 to 1024, got {}", t.accumulate_steps))?;
        if let Some(max) = t.clip_grad_norm {
            ensure_key(max > 0.0 && max.is_finite(), "train.clip_grad_norm", || format!("must be a positive number, got {max}"))?;
        }
        if let Some(decay) = t.ema_decay {
            ensure_key(decay > 0.0 && decay < 1.0, "train.ema_decay", || format!("must be in (0, 1), got {decay}"))?;
        }
        ensure_key(t.optimizer.lr > 0.0, "train.optimizer.lr", || "must be positive".into())?;
        ensure_key(t.checkpoint.every_epochs >= 1, "train.checkpoint.every_epochs", || {
            "must be at least 1".into()
        })?;
        ensure_key(t.checkpoint.keep_last >= 1, "train.checkpoint.keep_last", || {
            "must be at least 1".into()
        })?;
        ensure_key(t.schedule.step_epochs >= 1, "train.schedule.step_epochs", || {
            "must be at least 1".into()
        })?;
        if let Some(w) = &t.loss.class_weights {
            ensure_key(
                w.len() == CLASS_NAMES.len() && w.iter().all(|x| *x >= 0.0),
                "train.loss.class_weights",
                || format!("must be {} non-negative numbers ({})", CLASS_NAMES.len(), CLASS_NAMES.join(", ")),
            )?;
        }
        ensure_key(t.max_steps_per_epoch != Some(0), "train.max_steps_per_epoch", || {
            "must be at least 1".into()
        })?;
        ensure_key(self.evaluate.batch_size >= 1, "evaluate.batch_size", || "must be at least 1".into())?;
        ensure_key(self.storage.timeout_s >= 1, "storage.timeout_s", || "must be at least 1".into())?;
        ensure_key(self.storage.max_object_bytes >= 1, "storage.max_object_bytes", || "must be at least 1".into())?;
        ensure_key(t.precision != Precision::Int8, "train.precision", || "int8 is an inference precision (export.precision); train at f32 or bf16".into())?;
        let samples = self.export.calibration_samples;
        ensure_key((1..=100_000).contains(&samples), "export.calibration_samples", || format!("{samples} must be from 1 to 100000"))?;
        let drop = self.export.max_miou_drop;
        ensure_key(drop.is_finite() && (-1.0..=1.0).contains(&drop), "export.max_miou_drop", || format!("{drop} must be a number from -1 to 1"))?;
        let s = &self.serve;
        ensure_key(s.max_batch_size >= 1, "serve.max_batch_size", || "must be at least 1".into())?;
        ensure_key(s.queue_capacity >= 1, "serve.queue_capacity", || "must be at least 1".into())?;
        ensure_key(s.model_threads <= 1024, "serve.model_threads", || format!("{} is more than 1024", s.model_threads))?;
        ensure_key(s.max_pixels >= 1, "serve.max_pixels", || "must be at least 1".into())?;
        ensure_key(s.memory_budget_bytes >= 1 << 20, "serve.memory_budget_bytes", || "must be at least 1 MiB (1048576)".into())?;
        ensure_key(s.max_json_response_bytes >= 1, "serve.max_json_response_bytes", || "must be at least 1".into())?;
        ensure_key(s.request_timeout_ms >= 1, "serve.request_timeout_ms", || "must be at least 1".into())?;
        ensure_key(s.header_read_timeout_ms >= 1, "serve.header_read_timeout_ms", || "must be at least 1".into())?;
        ensure_key(s.keep_alive_timeout_ms >= 1, "serve.keep_alive_timeout_ms", || "must be at least 1".into())?;
        ensure_key((1..=1_000_000).contains(&s.max_connections), "serve.max_connections", || "must be between 1 and 1000000".into())?;
        ensure_key(s.max_header_bytes >= 1024, "serve.max_header_bytes", || "must be at least 1024".into())?;
        ensure_key(s.body_read_timeout_ms >= 1, "serve.body_read_timeout_ms", || "must be at least 1".into())?;
        ensure_key(s.response_write_timeout_ms >= 1, "serve.response_write_timeout_ms", || "must be at least 1".into())?;
        ensure_key(s.max_jpeg_scans >= 1, "serve.max_jpeg_scans", || "must be at least 1".into())?;
        for (i, host) in s.allowed_hosts.iter().enumerate() {
            let name = host.strip_prefix("*.").unwrap_or(host);
            ensure_key(
                !name.is_empty() && !name.contains(['/', ':', '*', ' ']) || is_bracketed_ipv6(host),
                &format!("serve.allowed_hosts[{i}]"),
                || format!("`{host}` is not a host name: use `example.com`, `*.example.com`, an IP address or `[::1]` (no scheme, no port)"),
            )?;
        }
        for (i, origin) in s.cors_origins.iter().enumerate() {
            ensure_key(
                origin == "*" || ((origin.starts_with("http://") || origin.starts_with("https://")) && !origin.ends_with('/')),
                &format!("serve.cors_origins[{i}]"),
                || format!("`{origin}` is not an origin: use scheme://host[:port] (no path, no trailing slash) or *"),
            )?;
        }
        for (i, m) in s.models.iter().enumerate() {
            ensure_key(is_valid_model_name(&m.name), &format!("serve.models[{i}].name"), || {
                format!("`{}` is not a model name (letters, digits, `-`, `_`, `.`)", m.name)
            })?;
            if let VersionPolicy::Latest(0) = m.version_policy {
                bail!("key `serve.models[{i}].version_policy`: latest must be at least 1");
            }
        }
        Ok(())
    }

    /// The repository `serve` reads.
    pub fn serve_repository(&self) -> PathBuf {
        self.serve.repository.clone().unwrap_or_else(|| self.export.repository.clone())
    }
}

fn is_bracketed_ipv6(host: &str) -> bool {
    host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).is_some_and(|h| h.parse::<std::net::Ipv6Addr>().is_ok())
}

fn ensure_key(ok: bool, key: &str, message: impl FnOnce() -> String) -> Result<()> {
    if ok { Ok(()) } else { bail!("key `{key}`: {}", message()) }
}

/// The limits on a square input side, shared by `data.image_size` and the `input_size` of
/// model specs read from checkpoints and `model.yaml`.
pub fn check_image_size(size: usize) -> std::result::Result<(), String> {
    if size < 32 || !size.is_multiple_of(32) || size > MAX_IMAGE_SIZE {
        return Err(format!("must be a positive multiple of 32 up to {MAX_IMAGE_SIZE}, got {size}"));
    }
    Ok(())
}

/// The limits on UNet settings, shared by `model.unet` and the `unet` of model specs read from
/// checkpoints and `model.yaml`. With `image_size`, 2^levels must divide it. The error names
/// the field inside the section (`depth`, `base_width`, `widths`).
pub fn check_unet(unet: &UnetConfig, image_size: Option<usize>) -> std::result::Result<(), (&'static str, String)> {
    if !UNET_DEPTHS.contains(&unet.depth) {
        return Err(("depth", format!("must be between {} and {}, got {}", UNET_DEPTHS.start(), UNET_DEPTHS.end(), unet.depth)));
    }
    match &unet.widths {
        Some(w) => {
            let levels = UNET_DEPTHS.start() + 1..=UNET_DEPTHS.end() + 1;
            if !levels.contains(&w.len()) || w.iter().any(|c| !(1..=MAX_UNET_WIDTH).contains(c)) {
                return Err((
                    "widths",
                    format!(
                        "must list {} to {} channel counts from 1 to {MAX_UNET_WIDTH} (levels, then the bottleneck), got {w:?}",
                        levels.start(),
                        levels.end()
                    ),
                ));
            }
        }
        None => {
            if unet.base_width < 1 || unet.base_width.checked_mul(1 << unet.depth).is_none_or(|w| w > MAX_UNET_WIDTH) {
                return Err((
                    "base_width",
                    format!("must be at least 1, and doubled per level stay within {MAX_UNET_WIDTH} channels, got {} at depth {}", unet.base_width, unet.depth),
                ));
            }
        }
    }
    if let Some(size) = image_size
        && !size.is_multiple_of(1 << unet.levels())
    {
        return Err(("depth", format!("2^levels must divide the input size ({size})")));
    }
    Ok(())
}

/// A model name usable as a folder name and a URL segment.
pub fn is_valid_model_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('.')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// Where a model runs (`train.device`, `serve.device`, `--device`): written `auto`, `cpu`,
/// `cuda` or `cuda:N`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum DeviceSpec {
    /// CUDA device 0 when one answers, else the CPU.
    #[default]
    Auto,
    Cpu,
    Cuda(usize),
}

impl std::str::FromStr for DeviceSpec {
    type Err = anyhow::Error;
    fn from_str(text: &str) -> Result<Self> {
        match text {
            "auto" => Ok(DeviceSpec::Auto),
            "cpu" => Ok(DeviceSpec::Cpu),
            "cuda" => Ok(DeviceSpec::Cuda(0)),
            other => match other.strip_prefix("cuda:").and_then(|n| n.parse().ok()) {
                Some(n) => Ok(DeviceSpec::Cuda(n)),
                None => bail!("`{other}` is not a device: use auto, cpu, cuda or cuda:N"),
            },
        }
    }
}

impl TryFrom<String> for DeviceSpec {
    type Error = String;
    fn try_from(text: String) -> std::result::Result<Self, String> {
        text.parse().map_err(|e: anyhow::Error| e.to_string())
    }
}

impl From<DeviceSpec> for String {
    fn from(spec: DeviceSpec) -> String {
        spec.to_string()
    }
}

impl std::fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeviceSpec::Auto => f.write_str("auto"),
            DeviceSpec::Cpu => f.write_str("cpu"),
            DeviceSpec::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// A split a command reads (`evaluate.split`, `--split`): the dataset's two published ones, or
/// train/val carved from trainval by `data.val_fraction`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    Trainval,
    Test,
    Train,
    Val,
}

impl Split {
    /// Parses `trainval`, `test`, `train` or `val`.
    pub fn parse(text: &str) -> Result<Split> {
        Ok(match text {
            "trainval" => Split::Trainval,
            "test" => Split::Test,
            "train" => Split::Train,
            "val" => Split::Val,
            other => bail!("`{other}` is not a split: use test, trainval, train or val"),
        })
    }
    pub fn name(self) -> &'static str {
        match self {
            Split::Trainval => "trainval",
            Split::Test => "test",
            Split::Train => "train",
            Split::Val => "val",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_str(yaml: &str, overrides: &[(&str, &str)]) -> Result<Config> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.yaml");
        std::fs::write(&path, yaml).unwrap();
        let ov: Vec<(String, String)> =
            overrides.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        load(Some(&path), &ov)
    }

    #[test]
    fn secret_key_names_are_recognised() {
        for secret in ["aws_secret_access_key", "aws_session_token", "azure_storage_account_key", "google_service_account_key", "password", "db-passwd", "api.key", "client_secret"] {
            assert!(is_secret_key(secret), "{secret}");
        }
        for plain in ["aws_access_key_id", "aws_region", "aws_endpoint_url", "auth_token_file", "keep_alive_timeout_ms", "max_header_bytes", "monkey", "google_application_credentials_path"] {
            assert!(!is_secret_key(plain), "{plain}");
        }
    }

    #[test]
    fn credentials_are_redacted_in_what_is_written_and_in_messages() {
        let c = load_str("", &[("storage.options", "{aws_secret_access_key: hunter2-SECRET, aws_region: eu-west-1}")]).unwrap();
        assert_eq!(c.storage.options["aws_secret_access_key"], "hunter2-SECRET", "the live config keeps it");
        let written = serde_yaml::to_string(&c.redacted()).unwrap();
        assert!(!written.contains("hunter2") && !written.contains("eu-west-1"), "{written}");
        assert!(written.contains("aws_secret_access_key: <redacted>"), "{written}");
        assert!(!format!("{c:?}").contains("hunter2"), "Debug shows no secret");
        // Messages about a bad value never quote it.
        for (key, value) in [("storage.options", "{aws_secret_access_key: [hunter2-SECRET]}"), ("storage.options.aws_secret_access_key", "[hunter2-SECRET"), ("storage.options", "{aws_secret_access_key: {a: hunter2-SECRET}}")] {
            let e = format!("{:#}", load_str("", &[(key, value)]).unwrap_err());
            assert!(!e.contains("hunter2"), "{e}");
            assert!(e.contains(key.split('.').next().unwrap()), "{e}");
        }
        // Every other key of the config is free of credentials by its name; a new key whose
        // name says secret must be redacted too (extend `Config::redacted`) before this passes.
        fn walk(v: &serde_yaml::Value, path: &str, found: &mut Vec<String>) {
            if let serde_yaml::Value::Mapping(m) = v {
                for (k, v) in m {
                    let k = k.as_str().unwrap_or_default();
                    let p = if path.is_empty() { k.to_string() } else { format!("{path}.{k}") };
                    if p != "storage.options" {
                        if is_secret_key(k) {
                            found.push(p.clone());
                        }
                        walk(v, &p, found);
                    }
                }
            }
        }
        let mut found = Vec::new();
        walk(&serde_yaml::to_value(Config::default()).unwrap(), "", &mut found);
        assert!(found.is_empty(), "keys named like secrets outside storage.options: {found:?}");
    }

    #[test]
    fn empty_file_gives_defaults() {
        assert_eq!(load_str("", &[]).unwrap(), Config::default());
    }

    #[test]
    fn unknown_key_is_named() {
        let err = format!("{:#}", load_str("data:\n  roots: x\n", &[]).unwrap_err());
        assert!(err.contains("data.roots") || err.contains("`roots`"), "{err}");
        assert!(err.contains("c.yaml"), "{err}");
    }

    #[test]
    fn wrong_type_is_named() {
        let err = format!("{:#}", load_str("train:\n  epochs: many\n", &[]).unwrap_err());
        assert!(err.contains("train.epochs"), "{err}");
    }

    #[test]
    fn set_overrides_and_is_checked() {
        let c = load_str("train:\n  epochs: 3\n", &[("train.epochs", "5"), ("data.root", "/x")]).unwrap();
        assert_eq!(c.train.epochs, 5);
        assert_eq!(c.data.root, PathBuf::from("/x"));
        let err = format!("{:#}", load_str("", &[("train.batch_size", "[1]")]).unwrap_err());
        assert!(err.contains("train.batch_size"), "{err}");
        let err = format!("{:#}", load_str("", &[("train.nope", "1")]).unwrap_err());
        assert!(err.contains("nope"), "{err}");
    }

    #[test]
    fn validation_names_the_key() {
        let err = format!("{:#}", load_str("data:\n  image_size: 100\n", &[]).unwrap_err());
        assert!(err.contains("data.image_size"), "{err}");
        let err = format!("{:#}", load_str("train:\n  device: gpu\n", &[]).unwrap_err());
        assert!(err.contains("train.device"), "{err}");
    }

    #[test]
    fn sizes_are_bounded() {
        for (yaml, key) in [
            ("data:\n  image_size: 8192\n", "data.image_size"),
            ("model:\n  unet:\n    base_width: 1024\n", "model.unet.base_width"),
            ("model:\n  unet:\n    depth: 0\n", "model.unet.depth"),
            ("model:\n  unet:\n    widths: [8, 100000]\n", "model.unet.widths"),
            ("data:\n  fetch:\n    max_members: 0\n", "data.fetch.max_members"),
        ] {
            let err = format!("{:#}", load_str(yaml, &[]).unwrap_err());
            assert!(err.contains(key), "{yaml}: {err}");
        }
        assert!(load_str("data:\n  image_size: 4096\nmodel:\n  unet:\n    base_width: 128\n", &[]).is_ok());
    }

    #[test]
    fn version_policy_forms() {
        let c = load_str(
            "serve:\n  models:\n    - name: pets\n      version_policy: {latest: 2}\n    - name: b\n      version_policy: all\n    - name: c\n      version_policy: {specific: [1, 3]}\n",
            &[],
        )
        .unwrap();
        assert_eq!(c.serve.models[0].version_policy, VersionPolicy::Latest(2));
        assert_eq!(c.serve.models[1].version_policy, VersionPolicy::All);
        assert_eq!(c.serve.models[2].version_policy, VersionPolicy::Specific(vec![1, 3]));
    }
}
