//! What this segctl is: its version, the commit and features it was built with, and at run
//! time the CPU kernels it will use and whether a CUDA device answers (`segctl --version`).

use serde::Serialize;

use crate::engine::Isa;

/// The build and the machine, as `segctl --version --json` prints them.
#[derive(Debug, Clone, Serialize)]
pub struct BuildInfo {
    pub name: &'static str,
    pub version: &'static str,
    /// Git commit of the checkout it was built from (none for a build outside a checkout).
    pub commit: Option<&'static str>,
    /// Target triple.
    pub target: &'static str,
    /// Cargo features compiled in (`cuda`, `cudnn`).
    pub features: Vec<&'static str>,
    /// Instruction set of the inference kernels on this CPU (`SEGCTL_KERNELS` honoured).
    pub kernels: String,
    /// SIMD features this CPU reports that the kernels care about.
    pub cpu_features: Vec<&'static str>,
    /// Precisions whose convolutions this CPU computes on their own units (`f32`; `bf16` on
    /// AMX tiles or AVX512-BF16; `int8` on AVX512-VNNI or AVX-VNNI); the others run too,
    /// through the portable path (bf16) or AVX2's integer products (int8).
    pub native_precisions: Vec<&'static str>,
    /// The unit of bf16 convolutions here (`amx`, `avx512bf16` or `portable`;
    /// `SEGCTL_KERNELS` honoured).
    pub bf16_kernels: String,
    /// The unit of int8 convolutions (`avx512vnni`, `avxvnni`, `avx2` or `portable`).
    pub int8_kernels: String,
    pub cuda: CudaStatus,
}

/// Whether CUDA is built in and a device answers.
#[derive(Debug, Clone, Serialize)]
pub struct CudaStatus {
    pub built: bool,
    /// Device 0 could be opened.
    pub available: bool,
    /// Why not, when it could not.
    pub error: Option<String>,
}

/// The features compiled into this binary.
pub fn features() -> Vec<&'static str> {
    let mut f = Vec::new();
    if cfg!(feature = "cuda") {
        f.push("cuda");
    }
    if cfg!(feature = "cudnn") {
        f.push("cudnn");
    }
    f
}

fn native_precisions() -> Vec<&'static str> {
    use crate::engine::{Bf16Unit, Int8Unit};
    let mut native = vec!["f32"];
    if Bf16Unit::detect() != Bf16Unit::Portable {
        native.push("bf16");
    }
    if matches!(Int8Unit::detect(), Int8Unit::Avx512Vnni | Int8Unit::AvxVnni) {
        native.push("int8");
    }
    native
}

fn cpu_features() -> Vec<&'static str> {
    #[allow(unused_mut)]
    let mut found = Vec::new();
    #[cfg(target_arch = "x86_64")]
    {
        macro_rules! probe {
            ($($f:tt),*) => {$( if std::is_x86_feature_detected!($f) { found.push($f); } )*};
        }
        probe!("sse4.2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512vnni", "avx512bf16", "avxvnni");
        if crate::engine::bf16::amx_available() {
            found.push("amx-bf16");
        }
    }
    #[cfg(target_arch = "aarch64")]
    {
        if std::arch::is_aarch64_feature_detected!("neon") {
            found.push("neon");
        }
    }
    found
}

fn cuda_status() -> CudaStatus {
    let built = cfg!(feature = "cuda");
    if !built {
        return CudaStatus { built, available: false, error: Some("built without CUDA (rebuild with `--features cuda`)".into()) };
    }
    match candle_core::Device::new_cuda(0) {
        Ok(_) => CudaStatus { built, available: true, error: None },
        Err(e) => CudaStatus { built, available: false, error: Some(e.to_string()) },
    }
}

/// Collects everything (probes CUDA device 0 when CUDA is built in).
pub fn collect() -> BuildInfo {
    BuildInfo {
        name: env!("CARGO_PKG_NAME"),
        version: env!("CARGO_PKG_VERSION"),
        commit: option_env!("SEGCTL_GIT_COMMIT"),
        target: env!("SEGCTL_TARGET"),
        features: features(),
        kernels: match Isa::active() {
            Ok(isa) => isa.name().to_string(),
            Err(e) => format!("error: {e}"),
        },
        cpu_features: cpu_features(),
        native_precisions: native_precisions(),
        bf16_kernels: match crate::engine::Bf16Unit::active() {
            Ok(unit) => unit.name().to_string(),
            Err(e) => format!("error: {e}"),
        },
        int8_kernels: match crate::engine::Int8Unit::active() {
            Ok(unit) => unit.name().to_string(),
            Err(e) => format!("error: {e}"),
        },
        cuda: cuda_status(),
    }
}

impl BuildInfo {
    /// The human-readable form: one line for the build, one for the CPU, one for CUDA.
    pub fn render(&self) -> String {
        let commit = self.commit.map(|c| format!(" (commit {})", &c[..c.len().min(12)])).unwrap_or_default();
        let features = if self.features.is_empty() { "none".to_string() } else { self.features.join(", ") };
        let cuda = match (&self.cuda.available, &self.cuda.error) {
            (true, _) => "device 0 answers".to_string(),
            (false, Some(e)) => format!("unavailable: {e}"),
            (false, None) => "unavailable".to_string(),
        };
        format!(
            "{} {}{commit}\ntarget: {}, features: {features}\ncpu kernels: {} (cpu features: {})\nprecisions: {} native; bf16 convolutions on {}, int8 on {}\ncuda: {cuda}\n",
            self.name,
            self.version,
            self.target,
            self.kernels,
            if self.cpu_features.is_empty() { "none".to_string() } else { self.cpu_features.join(" ") },
            self.native_precisions.join(", "),
            self.bf16_kernels,
            self.int8_kernels,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_names_the_build_and_the_kernels() {
        let info = collect();
        assert_eq!(info.version, env!("CARGO_PKG_VERSION"));
        assert!(["avx512", "avx2", "portable"].contains(&info.kernels.as_str()), "{}", info.kernels);
        assert_eq!(info.cuda.built, cfg!(feature = "cuda"));
        let text = info.render();
        assert!(text.starts_with(&format!("segctl {}", info.version)), "{text}");
        assert!(text.contains(&format!("cpu kernels: {}", info.kernels)), "{text}");
        if let Some(c) = info.commit {
            assert!(c.len() == 40 && c.chars().all(|ch| ch.is_ascii_hexdigit()), "{c}");
        }
    }
}
