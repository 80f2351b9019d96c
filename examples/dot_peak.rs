//! The one-core peaks of the dot-product instructions the reduced-precision kernels use,
//! measured like the FMA peak: independent accumulator chains in registers, nothing loaded
//! in the loop. `cargo run --release --example dot_peak`.
//!
//! - `vfmadd231ps` ymm (AVX2+FMA f32): 8 lanes × 2 FLOP;
//! - `vfmadd231ps` zmm (f32 reference): 16 lanes × 2 FLOP;
//! - `vdpbf16ps` zmm (AVX512-BF16): 16 lanes × 2 products × 2 FLOP;
//! - `vpdpbusd` zmm (AVX512-VNNI) and ymm (AVX-VNNI): 16 or 8 lanes × 4 products × 2 OP.
fn main() {
    #[cfg(target_arch = "x86_64")]
    {
        let rounds: u64 = 50_000_000;
        let report = |name: &str, per_instr: f64, run: &dyn Fn()| {
            for _ in 0..3 {
                let start = std::time::Instant::now();
                run();
                let s = start.elapsed().as_secs_f64();
                // 12 independent chains per round.
                println!("{name}: {:.0} G{}/s ({:.2} s)", rounds as f64 * 12.0 * per_instr / s / 1e9, if name.contains("pdpbusd") { "OP" } else { "FLOP" }, s);
            }
        };
        macro_rules! chains {
            ($instr:literal, $reg:literal) => {
                chains!($instr, $reg, "vpxord")
            };
            ($instr:literal, $reg:literal, $zero:literal) => {
                || unsafe {
                    std::arch::asm!(
                        concat!($zero, " ", $reg, "0, ", $reg, "0, ", $reg, "0"), concat!($zero, " ", $reg, "1, ", $reg, "1, ", $reg, "1"), concat!($zero, " ", $reg, "2, ", $reg, "2, ", $reg, "2"), concat!($zero, " ", $reg, "3, ", $reg, "3, ", $reg, "3"),
                        concat!($zero, " ", $reg, "4, ", $reg, "4, ", $reg, "4"), concat!($zero, " ", $reg, "5, ", $reg, "5, ", $reg, "5"), concat!($zero, " ", $reg, "6, ", $reg, "6, ", $reg, "6"), concat!($zero, " ", $reg, "7, ", $reg, "7, ", $reg, "7"),
                        concat!($zero, " ", $reg, "8, ", $reg, "8, ", $reg, "8"), concat!($zero, " ", $reg, "9, ", $reg, "9, ", $reg, "9"), concat!($zero, " ", $reg, "10, ", $reg, "10, ", $reg, "10"), concat!($zero, " ", $reg, "11, ", $reg, "11, ", $reg, "11"),
                        concat!($zero, " ", $reg, "14, ", $reg, "14, ", $reg, "14"), concat!($zero, " ", $reg, "15, ", $reg, "15, ", $reg, "15"),
                        "2:",
                        concat!($instr, " ", $reg, "0, ", $reg, "14, ", $reg, "15"),
                        concat!($instr, " ", $reg, "1, ", $reg, "14, ", $reg, "15"),
                        concat!($instr, " ", $reg, "2, ", $reg, "14, ", $reg, "15"),
                        concat!($instr, " ", $reg, "3, ", $reg, "14, ", $reg, "15"),
                        concat!($instr, " ", $reg, "4, ", $reg, "14, ", $reg, "15"),
                        concat!($instr, " ", $reg, "5, ", $reg, "14, ", $reg, "15"),
                        concat!($instr, " ", $reg, "6, ", $reg, "14, ", $reg, "15"),
                        concat!($instr, " ", $reg, "7, ", $reg, "14, ", $reg, "15"),
                        concat!($instr, " ", $reg, "8, ", $reg, "14, ", $reg, "15"),
                        concat!($instr, " ", $reg, "9, ", $reg, "14, ", $reg, "15"),
                        concat!($instr, " ", $reg, "10, ", $reg, "14, ", $reg, "15"),
                        concat!($instr, " ", $reg, "11, ", $reg, "14, ", $reg, "15"),
                        "dec {n}", "jnz 2b",
                        n = inout(reg) rounds => _,
                        out("xmm0") _, out("xmm1") _, out("xmm2") _, out("xmm3") _, out("xmm4") _, out("xmm5") _,
                        out("xmm6") _, out("xmm7") _, out("xmm8") _, out("xmm9") _, out("xmm10") _, out("xmm11") _, out("xmm14") _, out("xmm15") _,
                        options(nostack, nomem),
                    )
                }
            };
        }
        let has = |f: &str| match f {
            "avx512f" => std::is_x86_feature_detected!("avx512f"),
            "avx512bf16" => std::is_x86_feature_detected!("avx512bf16"),
            "avx512vnni" => std::is_x86_feature_detected!("avx512vnni"),
            "avxvnni" => std::is_x86_feature_detected!("avxvnni"),
            _ => false,
        };
        if std::is_x86_feature_detected!("fma") {
            report(
                "vfmadd231ps ymm (f32, AVX2+FMA)",
                16.0,
                &chains!("vfmadd231ps", "ymm", "vxorps"),
            );
        }
        // Every path below zeroes its registers with AVX-512's vpxord.
        if !has("avx512f") {
            println!("this CPU has no AVX-512");
            return;
        }
        {
            report("vfmadd231ps zmm (f32)", 32.0, &chains!("vfmadd231ps", "zmm"));
        }
        if has("avx512bf16") {
            report("vdpbf16ps zmm (bf16)", 64.0, &chains!("vdpbf16ps", "zmm"));
        }
        if has("avx512vnni") {
            report("vpdpbusd zmm (int8)", 128.0, &chains!("vpdpbusd", "zmm"));
        }
        if has("avxvnni") {
            report("vpdpbusd ymm, VEX (int8)", 64.0, &chains!("{{vex}} vpdpbusd", "ymm"));
        }
    }
}
