//! Times the weight gradient of one convolution on one thread (`engine::grad::WeightGrad`),
//! items run in order, and prints GFLOP/s; for a k4 s2 p1 pairing also the F(2, m) Winograd
//! one (`engine::grad_winograd::GradWinograd`, m = 2 and 3: transform and GEMMs apart).
//! usage: cargo run --release --example wgrad_bench -- A_H A_W A_C B_H B_W B_C K STRIDE PAD N
//! (A: the small-side map — a convolution's output gradient, a transposed one's input.)
use segctl::engine::Isa;
use segctl::engine::grad::{MapShape, WeightGrad};
use segctl::engine::grad_winograd::GradWinograd;

fn main() -> anyhow::Result<()> {
    let v: Vec<usize> = std::env::args().skip(1).map(|s| s.parse().expect("numbers")).collect();
    let [ah, aw, ac, bh, bw, bc, k, s, p, n] = v[..] else { anyhow::bail!("10 numbers: A_H A_W A_C B_H B_W B_C K STRIDE PAD N") };
    let (am, bm) = (MapShape::new(ah, aw, ac), MapShape::new(bh, bw, bc));
    let isa = Isa::active()?;
    let wg = WeightGrad::new(am, bm, k, s, p, n, 1, isa)?;
    let a = vec![0.5f32; n * am.image_floats() + 4096];
    let b = vec![0.25f32; n * bm.image_floats() + 4096];
    let mut g = vec![0f32; wg.buffer_len()];
    let flops = 2.0 * (n * ah * aw * ac * bc * k * k) as f64;
    let mut best = f64::MAX;
    for _ in 0..5 {
        g.iter_mut().for_each(|x| *x = 0.0);
        let t = std::time::Instant::now();
        for item in 0..wg.items() {
            unsafe { wg.run(a.as_ptr(), b.as_ptr(), item, g.as_mut_ptr()) };
        }
        best = best.min(t.elapsed().as_secs_f64());
    }
    println!("{} items, split pixels {}: {:.2} ms, {:.1} GFLOP/s on one thread ({})", wg.items(), wg.splits_pixels(), best * 1e3, flops / best / 1e9, isa.name());
    if (k, s, p) == (4, 2, 1) {
        for m in [2, 3] {
            let wg = GradWinograd::new(am, bm, n, m, isa)?;
            let mut pa = vec![0f32; wg.a_panels_len()];
            let mut pb = vec![0f32; wg.b_panels_len()];
            let mut buffer = vec![0f32; wg.buffer_len()];
            let (mut best_t, mut best_g) = (f64::MAX, f64::MAX);
            for _ in 0..5 {
                let t = std::time::Instant::now();
                for item in 0..wg.transform_items() {
                    unsafe { wg.transform(a.as_ptr(), b.as_ptr(), item, pa.as_mut_ptr(), pb.as_mut_ptr()) };
                }
                best_t = best_t.min(t.elapsed().as_secs_f64());
                let t = std::time::Instant::now();
                for item in 0..wg.gemm_items() {
                    unsafe { wg.gemm(pa.as_ptr(), pb.as_ptr(), item, buffer.as_mut_ptr()) };
                }
                best_g = best_g.min(t.elapsed().as_secs_f64());
            }
            let total = best_t + best_g;
            println!("winograd F(2, {m}): {} + {} items: {:.2} ms (transform {:.2}, GEMMs {:.2}), {:.1} GFLOP/s as defined, {:.2}× the direct one", wg.transform_items(), wg.gemm_items(), total * 1e3, best_t * 1e3, best_g * 1e3, flops / total / 1e9, best / total);
        }
    }
    Ok(())
}
