//! What a run leaves for people to read: `metrics.jsonl` (one [`EpochRecord`] per line, never
//! an epoch twice across resumptions), `curves.png`, and the TensorBoard events of each epoch.

use std::path::Path;

use anyhow::{Context, Result};

use super::EpochRecord;
use crate::data::pipeline::{self, Loader};
use crate::model::ModelState;
use crate::plot::{Panel, Series, write_chart};
use crate::tensorboard::EventWriter;
use crate::validation::EvalModel;

/// Validation images shown in TensorBoard per epoch.
const TENSORBOARD_IMAGES: usize = 3;

/// An epoch's scalars (at its last step) and, with a validation split, a few validation photos
/// beside their true and predicted masks.
pub(crate) fn epoch_events(events: &mut EventWriter, record: &EpochRecord, val: Option<(&ModelState, &Loader)>) -> Result<()> {
    let step = record.step;
    let mut scalars = vec![
        ("epoch", record.epoch as f64),
        ("train/epoch_loss", record.train_loss),
        ("train/pixel_accuracy", record.train_pixel_accuracy),
        ("train/images_per_s", record.train_images_per_s),
    ];
    scalars.extend(record.val_loss.map(|v| ("val/loss", v)));
    scalars.extend(record.val_pixel_accuracy.map(|v| ("val/pixel_accuracy", v)));
    scalars.extend(record.val_mean_iou.map(|v| ("val/mean_iou", v)));
    let per_class: Vec<(String, f64)> = record.val_per_class_iou.iter().flatten().map(|(c, v)| (format!("val/iou/{c}"), *v)).collect();
    scalars.extend(per_class.iter().map(|(t, v)| (t.as_str(), *v)));
    events.scalars(step, &scalars)?;
    if let Some((model, loader)) = val {
        if let Some(batch) = loader.epoch(0, 0).find(|b| !b.is_empty()) {
            let (predicted, _) = model.predict(&batch, None)?;
            let spec = model.spec();
            for i in 0..batch.len().min(TENSORBOARD_IMAGES) {
                let figure = validation_figure(&batch, &predicted, i, &spec.normalization);
                events.image(step, &format!("val/{}", batch.stems[i]), &figure)?;
            }
        }
    }
    events.flush()
}

/// Photo | true mask | predicted mask of sample `i` of a batch (normalized input undone).
fn validation_figure(batch: &pipeline::Batch, predicted: &[u8], i: usize, norm: &crate::data::transform::Normalization) -> image::RgbImage {
    let s = batch.size;
    let plane = s * s;
    let img = &batch.images[i * 3 * plane..][..3 * plane];
    let photo = image::RgbImage::from_fn(s as u32, s as u32, |x, y| {
        let at = y as usize * s + x as usize;
        image::Rgb(std::array::from_fn(|c| ((img[c * plane + at] * norm.std[c] + norm.mean[c]) * 255.0).round().clamp(0.0, 255.0) as u8))
    });
    let as_mask = |ids: &[u8]| image::GrayImage::from_raw(s as u32, s as u32, ids.to_vec()).expect("a mask per sample");
    let truth = crate::data::transform::colorize(&as_mask(&batch.masks[i * plane..][..plane]));
    let pred = crate::data::transform::colorize(&as_mask(&predicted[i * plane..][..plane]));
    let gap = 4;
    let mut out = image::RgbImage::from_pixel(3 * s as u32 + 2 * gap, s as u32, image::Rgb([255, 255, 255]));
    for (k, panel) in [photo, truth, pred].iter().enumerate() {
        image::imageops::overlay(&mut out, panel, (k as u32 * (s as u32 + gap)) as i64, 0);
    }
    out
}

/// Records of epochs up to `up_to` from an existing log (a resumed run drops what came after
/// its checkpoint, so the log never holds an epoch twice).
pub(crate) fn read_history(path: &Path, up_to: usize) -> Result<Vec<EpochRecord>> {
    let Ok(text) = std::fs::read_to_string(path) else { return Ok(Vec::new()) };
    Ok(text
        .lines()
        .filter_map(|l| serde_json::from_str::<EpochRecord>(l).ok())
        .filter(|r| r.epoch <= up_to)
        .collect())
}

pub(crate) fn rewrite_history(path: &Path, records: &[EpochRecord]) -> Result<()> {
    let mut text = String::new();
    for r in records {
        text.push_str(&serde_json::to_string(r)?);
        text.push('\n');
    }
    crate::util::fs::write_atomic(path, text.as_bytes())
}

pub(crate) fn append_history(path: &Path, record: &EpochRecord) -> Result<()> {
    use std::io::Write;
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("failed to open `{}`", path.display()))?;
    writeln!(file, "{}", serde_json::to_string(record)?).with_context(|| format!("failed to write `{}`", path.display()))
}

/// Loss and metric curves, one panel each.
pub(crate) fn draw_curves(path: &Path, history: &[EpochRecord]) -> Result<()> {
    let series = |label, color, f: &dyn Fn(&EpochRecord) -> Option<f64>| Series {
        label,
        color,
        points: history.iter().filter_map(|r| f(r).map(|v| (r.epoch as f64, v))).collect(),
    };
    let loss = Panel {
        title: "loss",
        x_label: "epoch",
        series: vec![
            series("train", [31, 119, 180], &|r| Some(r.train_loss)),
            series("val", [255, 127, 14], &|r| r.val_loss),
        ],
        y_range: None,
        integer_x: true,
    };
    let metrics = Panel {
        title: "accuracy and mean IoU",
        x_label: "epoch",
        series: vec![
            series("train acc", [31, 119, 180], &|r| Some(r.train_pixel_accuracy)),
            series("val acc", [255, 127, 14], &|r| r.val_pixel_accuracy),
            series("val miou", [44, 160, 44], &|r| r.val_mean_iou),
        ],
        y_range: Some((0.0, 1.0)),
        integer_x: true,
    };
    write_chart(path, &[loss, metrics])
}

