//! The inference engine: a layout-free [`Graph`] compiled once into a [`Plan`] of fused
//! steps over padded NHWC maps, run by a [`Session`] with a fixed team of threads, on
//! register-tiled kernels per instruction set. It imports nothing of the application: the
//! models lower themselves into a [`Graph`] through [`GraphBuilder`], and training's CPU ops
//! (in `model::ops`) call the same kernels through [`kernels`].
//!
//! - [`graph`]: what a network is (convolutions with BatchNorm folded, pooling, concatenation,
//!   residual sums, depth-to-space), weights in PyTorch's layouts.
//! - [`compile`]: the graph into a [`Plan`] (weights pre-packed, one fused step per layer,
//!   concatenations written in place, every activation at an offset in one arena).
//! - [`session`] runs a plan; [`team`] is its thread team.
//! - The kernels: [`gemm`] (the register tile every dense kernel is built on, with [`asm`]'s
//!   hand-scheduled versions), [`conv`] (direct convolutions), [`winograd`], [`pool`]
//!   (depthwise, pooling, element-wise, input and output steps), over [`simd`]; [`bf16`] and
//!   [`int8`] (reduced-precision convolutions as GEMMs on their own units).
//!
//! **Dispatch rule.** [`Kernels::active`] holds, once per process, the path of each precision:
//! the f32 instruction set ([`Isa`]: AVX-512F, then AVX2+FMA, then portable Rust), the bf16
//! unit ([`Bf16Unit`]: AMX tiles, then AVX512-BF16, then portable) and the int8 unit
//! ([`Int8Unit`]: AVX512-VNNI, AVX-VNNI, AVX2, portable) — the fastest the CPU has, unless the
//! `SEGCTL_KERNELS` environment variable forces one path (see [`Kernels::parse`]; asking for
//! one the CPU lacks is an error). Kernels are generic over [`simd::Simd`] and instantiated
//! once per instruction set. A reduced-precision plan runs its dense convolutions on its unit
//! ([`bf16`], [`int8`]) and everything else on the f32 kernels of [`Isa::active`].

#[cfg(target_arch = "x86_64")]
pub mod asm;
pub mod bf16;
pub mod compile;
pub mod conv;
pub mod gemm;
pub mod grad;
pub mod grad_winograd;
pub mod graph;
pub mod int8;
pub mod kernels;
pub mod maps;
pub mod plan;
pub mod pool;
pub mod session;
pub mod simd;
pub mod team;
pub mod winograd;

use std::sync::OnceLock;

use anyhow::{Result, bail};

pub use graph::{Act, ConvKind, ConvOp, Graph, GraphBuilder, NodeId, Op};
pub use bf16::Bf16Unit;
pub use int8::Int8Unit;
pub use plan::{Calibration, Plan, PlanOptions, PlanSummary, Precision, WinogradPolicy};
pub use session::Session;

/// An instruction set the kernels are compiled for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Isa {
    /// AVX-512F (16 lanes).
    Avx512,
    /// AVX2 with FMA (8 lanes).
    Avx2,
    /// Plain Rust, any CPU.
    Portable,
}

/// Environment variable that overrides the instruction set.
pub const ISA_ENV: &str = "SEGCTL_KERNELS";

impl Isa {
    pub fn name(self) -> &'static str {
        match self {
            Isa::Avx512 => "avx512",
            Isa::Avx2 => "avx2",
            Isa::Portable => "portable",
        }
    }

    /// Floats per vector.
    pub fn lanes(self) -> usize {
        match self {
            Isa::Avx512 => 16,
            Isa::Avx2 | Isa::Portable => 8,
        }
    }

    /// Whether this CPU can run it.
    pub fn supported(self) -> bool {
        match self {
            Isa::Portable => true,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma"),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => std::is_x86_feature_detected!("avx512f") && Isa::Avx2.supported(),
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    /// The widest instruction set this CPU has.
    pub fn detect() -> Isa {
        [Isa::Avx512, Isa::Avx2].into_iter().find(|i| i.supported()).unwrap_or(Isa::Portable)
    }

    /// Parses a `SEGCTL_KERNELS` value: the f32 instruction set it names.
    pub fn parse(text: &str) -> Result<Isa> {
        Ok(Kernels::parse(text)?.isa)
    }

    /// The instruction set in use: `SEGCTL_KERNELS` if set, else [`Isa::detect`]; read once.
    pub fn active() -> Result<Isa> {
        Ok(Kernels::active()?.isa)
    }
}

impl Bf16Unit {
    /// The unit bf16 convolutions use: [`Kernels::active`]'s.
    pub fn active() -> Result<Bf16Unit> {
        Ok(Kernels::active()?.bf16)
    }
}

impl Int8Unit {
    /// The unit int8 convolutions use: [`Kernels::active`]'s.
    pub fn active() -> Result<Int8Unit> {
        Ok(Kernels::active()?.int8)
    }
}

/// The kernels of each precision: what the CPU offers, or what `SEGCTL_KERNELS` forces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Kernels {
    /// The f32 kernels (and everything around a reduced-precision convolution).
    pub isa: Isa,
    pub bf16: Bf16Unit,
    pub int8: Int8Unit,
}

impl Kernels {
    /// The fastest of each this CPU has.
    pub fn detect() -> Kernels {
        Kernels { isa: Isa::detect(), bf16: Bf16Unit::detect(), int8: Int8Unit::detect() }
    }

    /// Parses a `SEGCTL_KERNELS` value. Each value forces one path and what it implies:
    ///
    /// | value | f32 | bf16 | int8 |
    /// |---|---|---|---|
    /// | `amx` | avx512 | AMX tiles | avx512vnni |
    /// | `avx512bf16` | avx512 | `vdpbf16ps` | portable |
    /// | `avx512vnni` | avx512 | portable | `vpdpbusd` (zmm) |
    /// | `avxvnni` | avx2 | portable | `vpdpbusd` (ymm, VEX) |
    /// | `avx512` | avx512 | portable | avx2 |
    /// | `avx2` | avx2 | portable | avx2 (`vpmaddwd`) |
    /// | `portable` | portable | portable | portable |
    ///
    /// Asking for one the CPU lacks is an error.
    pub fn parse(text: &str) -> Result<Kernels> {
        let value = text.trim().to_ascii_lowercase();
        let (isa, bf16, int8) = match value.as_str() {
            "amx" => (Isa::Avx512, Bf16Unit::Amx, Int8Unit::Avx512Vnni),
            "avx512bf16" | "avx512-bf16" | "avx512_bf16" => (Isa::Avx512, Bf16Unit::Avx512Bf16, Int8Unit::Portable),
            "avx512vnni" | "avx512-vnni" | "avx512_vnni" => (Isa::Avx512, Bf16Unit::Portable, Int8Unit::Avx512Vnni),
            "avxvnni" | "avx-vnni" | "avx_vnni" => (Isa::Avx2, Bf16Unit::Portable, Int8Unit::AvxVnni),
            "avx512" | "avx-512" | "avx512f" => (Isa::Avx512, Bf16Unit::Portable, Int8Unit::Avx2),
            "avx2" | "avx2+fma" | "fma" => (Isa::Avx2, Bf16Unit::Portable, Int8Unit::Avx2),
            "portable" | "scalar" | "generic" => (Isa::Portable, Bf16Unit::Portable, Int8Unit::Portable),
            other => bail!("{ISA_ENV}={other}: expected amx, avx512bf16, avx512vnni, avxvnni, avx512, avx2 or portable"),
        };
        // The unit the value names is checked first, so the error names what was asked for.
        if !bf16.supported() {
            let what = if bf16 == Bf16Unit::Amx { "AMX-BF16 tiles" } else { bf16.name() };
            bail!("{ISA_ENV}={}: this CPU (or its kernel) does not offer {what}", text.trim());
        }
        if !int8.supported() {
            bail!("{ISA_ENV}={}: this CPU does not have {}", text.trim(), int8.name());
        }
        if !isa.supported() {
            bail!("{ISA_ENV}={}: this CPU does not have {}", text.trim(), isa.name());
        }
        Ok(Kernels { isa, bf16, int8 })
    }

    /// The kernels in use: `SEGCTL_KERNELS` if set, else [`Kernels::detect`]; read once.
    pub fn active() -> Result<Kernels> {
        static ACTIVE: OnceLock<std::result::Result<Kernels, String>> = OnceLock::new();
        ACTIVE
            .get_or_init(|| match std::env::var(ISA_ENV) {
                Ok(v) if !v.trim().is_empty() => Kernels::parse(&v).map_err(|e| e.to_string()),
                _ => Ok(Kernels::detect()),
            })
            .clone()
            .map_err(anyhow::Error::msg)
    }
}

/// A piece of kernel work generic over the vector instruction set: [`dispatch`] runs it with
/// the instructions of an [`Isa`], compiled for them. Implementations mark `run`
/// `#[inline(always)]` so that their body is compiled inside the `#[target_feature]` entry
/// point of each instruction set.
pub trait SimdJob {
    /// # Safety
    /// Called only where the instruction set of `S` is available; the job's own pointers must
    /// be valid for what it reads and writes.
    unsafe fn run<S: simd::Simd>(&self);
}

/// Runs `job` with the kernels of `isa` (the one dispatch point of every kernel outside a
/// plan; a plan's session dispatches the same way, once per step item).
///
/// # Safety
/// `isa` must be supported by this CPU ([`Isa::supported`]); the job's pointers must be valid.
#[inline]
pub unsafe fn dispatch<J: SimdJob>(isa: Isa, job: &J) {
    unsafe {
        match isa {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => dispatch_avx512(job),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => dispatch_avx2(job),
            _ => job.run::<simd::Portable>(),
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn dispatch_avx512<J: SimdJob>(job: &J) {
    unsafe { job.run::<simd::Avx512>() }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dispatch_avx2<J: SimdJob>(job: &J) {
    unsafe { job.run::<simd::Avx2>() }
}
