//! The AMX-BF16 peak of one core: four independent `tdpbf16ps` chains on register tiles
//! (nothing loaded from memory in the loop), as the FMA peak was measured with a register-only
//! loop. `cargo run --release --example amx_peak`.
fn main() {
    #[cfg(target_arch = "x86_64")]
    {
        if !segctl::engine::bf16::amx_available() {
            println!("this CPU (or its kernel) offers no AMX-BF16");
            return;
        }
        #[repr(C, align(64))]
        struct Config([u8; 64]);
        let mut c = [0u8; 64];
        c[0] = 1;
        for t in 0..8 {
            c[16 + 2 * t] = 64;
            c[48 + t] = 16;
        }
        let config = Config(c);
        let zeros = vec![0u16; 16 * 32];
        let rounds: u64 = 20_000_000;
        for _ in 0..3 {
            let start = std::time::Instant::now();
            // SAFETY: AMX is available and permitted; the tiles read a 1 KB zero buffer.
            unsafe {
                std::arch::asm!(
                    "ldtilecfg [{cfg}]",
                    "tileloadd tmm4, [{z} + {ld}*1]", "tileloadd tmm5, [{z} + {ld}*1]",
                    "tileloadd tmm6, [{z} + {ld}*1]", "tileloadd tmm7, [{z} + {ld}*1]",
                    "tilezero tmm0", "tilezero tmm1", "tilezero tmm2", "tilezero tmm3",
                    "2:",
                    "tdpbf16ps tmm0, tmm4, tmm6", "tdpbf16ps tmm1, tmm4, tmm7",
                    "tdpbf16ps tmm2, tmm5, tmm6", "tdpbf16ps tmm3, tmm5, tmm7",
                    "dec {n}", "jnz 2b",
                    "tilerelease",
                    cfg = in(reg) config.0.as_ptr(), z = in(reg) zeros.as_ptr(), ld = in(reg) 64usize,
                    n = inout(reg) rounds => _, options(nostack),
                );
            }
            let s = start.elapsed().as_secs_f64();
            // Each tdpbf16ps: 16 × 16 outputs × 32 products, 2 FLOP each.
            let flops = rounds as f64 * 4.0 * 16.0 * 16.0 * 32.0 * 2.0;
            println!("AMX-BF16 peak, one core: {:.0} GFLOP/s ({:.2} s)", flops / s / 1e9, s);
        }
    }
}
