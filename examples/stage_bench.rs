//! Times the request stages of `serve` on one photo: `cargo run --release --example stage_bench -- PHOTO`.
use std::time::Instant;

use segctl::data::image_io::{self, DecodeOptions};

fn main() {
    let path = std::env::args().nth(1).expect("photo path");
    let bytes = std::fs::read(&path).unwrap();
    let options = DecodeOptions { max_pixels: 40_000_000, apply_exif_orientation: true, ..Default::default() };
    let n = 200;
    let t = Instant::now();
    for _ in 0..n {
        std::hint::black_box(image::load_from_memory(&bytes).unwrap());
    }
    println!("image::load_from_memory: {:.3} ms", t.elapsed().as_secs_f64() * 1e3 / n as f64);
    let t = Instant::now();
    let mut img = None;
    for _ in 0..n {
        img = Some(image_io::decode_rgb(&bytes, options).unwrap().image);
    }
    let img = img.unwrap();
    println!("decode_rgb {}x{}: {:.3} ms", img.width(), img.height(), t.elapsed().as_secs_f64() * 1e3 / n as f64);
    let norm = segctl::data::transform::Normalization::UNIT;
    let t = Instant::now();
    for _ in 0..n {
        std::hint::black_box(segctl::data::transform::preprocess(&img, 128, &norm));
    }
    println!("preprocess to 128: {:.3} ms", t.elapsed().as_secs_f64() * 1e3 / n as f64);
    let logits = vec![0.5f32; 3 * 128 * 128];
    let t = Instant::now();
    for _ in 0..n {
        std::hint::black_box(segctl::infer::upsample_argmax_with(&logits, 3, 128, img.width(), img.height(), false));
    }
    println!("upsample_argmax: {:.3} ms", t.elapsed().as_secs_f64() * 1e3 / n as f64);
    let mask = segctl::infer::upsample_argmax_with(&logits, 3, 128, img.width(), img.height(), false);
    let t = Instant::now();
    for _ in 0..n {
        std::hint::black_box(segctl::infer::encode_png_fast(&mask).unwrap());
    }
    println!("png fast: {:.3} ms", t.elapsed().as_secs_f64() * 1e3 / n as f64);
}
