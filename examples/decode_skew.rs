//! How far the model input of a photo decoded at full size is from the one `serve` feeds the
//! model (a JPEG decoded at a reduced DCT scale, then resized): the train/serve skew that
//! `train` and `evaluate` avoid by decoding as `serve` does. Prints one JSON line per photo
//! and a summary.
//!
//! `cargo run --release --example decode_skew -- [--size 128] PHOTO...`

use anyhow::{Context, Result};
use segctl::data::image_io::{DecodeOptions, decode_rgb, decode_rgb_for_model};
use segctl::data::transform::resize_image;

fn main() -> Result<()> {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let mut size = 128u32;
    if let Some(i) = args.iter().position(|a| a == "--size") {
        size = args.get(i + 1).context("--size needs a value")?.parse()?;
        args.drain(i..i + 2);
    }
    let (mut total, mut count) = (0f64, 0usize);
    for path in &args {
        let bytes = std::fs::read(path).with_context(|| format!("`{path}`"))?;
        let full = resize_image(&decode_rgb(&bytes, DecodeOptions::default())?.image, size);
        let photo = decode_rgb_for_model(&bytes, DecodeOptions::default(), size)?;
        let served = resize_image(&photo.image, size);
        let diffs: Vec<f64> = full.as_raw().iter().zip(served.as_raw()).map(|(a, b)| (*a as f64 - *b as f64).abs()).collect();
        let mean = diffs.iter().sum::<f64>() / diffs.len() as f64;
        let changed = diffs.iter().filter(|d| **d > 2.0).count() as f64 / diffs.len() as f64;
        println!(
            "{{\"photo\": {path:?}, \"size\": [{}, {}], \"dct_scale\": {}, \"mean_abs_diff\": {mean:.3}, \"share_off_by_more_than_2\": {changed:.4}}}",
            photo.width, photo.height, photo.scale
        );
        total += mean;
        count += 1;
    }
    if count > 0 {
        println!("{{\"photos\": {count}, \"mean_abs_diff\": {:.3}}}", total / count as f64);
    }
    Ok(())
}
