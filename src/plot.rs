//! Training-curve charts as PNG, drawn directly into an image buffer (no font or plotting
//! library needed): line series in panels with axes, tick labels and a legend, in a built-in
//! 5×7 pixel font.

use std::path::Path;

use anyhow::Result;
use image::{Rgb, RgbImage};

/// One line.
pub struct Series<'a> {
    pub label: &'a str,
    pub color: [u8; 3],
    /// (x, y) points; non-finite y values are skipped.
    pub points: Vec<(f64, f64)>,
}

/// One chart panel.
pub struct Panel<'a> {
    pub title: &'a str,
    pub x_label: &'a str,
    pub series: Vec<Series<'a>>,
    /// Fixed y range (e.g. 0..1 for metrics); none = fit the data.
    pub y_range: Option<(f64, f64)>,
    /// X ticks only on whole numbers (epochs).
    pub integer_x: bool,
}

const PANEL_W: u32 = 480;
const PANEL_H: u32 = 360;
const MARGIN_L: u32 = 56;
const MARGIN_R: u32 = 16;
const MARGIN_T: u32 = 30;
const MARGIN_B: u32 = 44;
const WHITE: Rgb<u8> = Rgb([255, 255, 255]);
const INK: Rgb<u8> = Rgb([40, 40, 40]);
const GRID: Rgb<u8> = Rgb([225, 225, 225]);

/// Draws panels side by side and writes the PNG atomically.
pub fn write_chart(path: &Path, panels: &[Panel]) -> Result<()> {
    let mut img = RgbImage::from_pixel(PANEL_W * panels.len().max(1) as u32, PANEL_H, WHITE);
    for (i, panel) in panels.iter().enumerate() {
        draw_panel(&mut img, i as u32 * PANEL_W, panel);
    }
    let mut bytes = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut bytes), image::ImageFormat::Png)?;
    crate::util::fs::write_atomic(path, &bytes)
}

fn draw_panel(img: &mut RgbImage, x0: u32, panel: &Panel) {
    let points = panel.series.iter().flat_map(|s| s.points.iter()).filter(|p| p.1.is_finite());
    let (mut xmin, mut xmax, mut ymin, mut ymax) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in points {
        xmin = xmin.min(x);
        xmax = xmax.max(x);
        ymin = ymin.min(y);
        ymax = ymax.max(y);
    }
    if xmin > xmax {
        (xmin, xmax, ymin, ymax) = (0.0, 1.0, 0.0, 1.0);
    }
    if let Some((lo, hi)) = panel.y_range {
        (ymin, ymax) = (lo, hi);
    } else {
        let pad = ((ymax - ymin) * 0.05).max(1e-3);
        ymin = (ymin - pad).max(if ymin >= 0.0 { 0.0 } else { f64::MIN });
        ymax += pad;
    }
    if xmax - xmin < 1e-9 {
        xmax = xmin + 1.0;
    }
    let (left, top) = (x0 + MARGIN_L, MARGIN_T);
    let (w, h) = (PANEL_W - MARGIN_L - MARGIN_R, PANEL_H - MARGIN_T - MARGIN_B);
    let to_px = |x: f64, y: f64| -> (f64, f64) {
        (left as f64 + (x - xmin) / (xmax - xmin) * w as f64, top as f64 + (1.0 - (y - ymin) / (ymax - ymin)) * h as f64)
    };
    // Grid and tick labels.
    for i in 0..=4 {
        let fy = ymin + (ymax - ymin) * i as f64 / 4.0;
        let (_, py) = to_px(xmin, fy);
        hline(img, left, left + w, py as u32, GRID);
        let label = format_tick(fy);
        text(img, left.saturating_sub(6 + 6 * label.len() as u32), py as u32 - 3, &label, INK);
    }
    let x_ticks = if panel.integer_x {
        integer_ticks(xmin, xmax, 6)
    } else {
        let n = 5.min((xmax - xmin).round() as usize).max(1);
        (0..=n).map(|i| xmin + (xmax - xmin) * i as f64 / n as f64).collect()
    };
    for fx in x_ticks {
        let (px, _) = to_px(fx, ymin);
        vline(img, px as u32, top, top + h, GRID);
        let label = format_tick(fx);
        text(img, px as u32 - 3 * label.len() as u32, top + h + 6, &label, INK);
    }
    // Axes, title, x label.
    hline(img, left, left + w, top + h, INK);
    vline(img, left, top, top + h, INK);
    text(img, left, 10, &panel.title.to_uppercase(), INK);
    text(img, left + w / 2 - 3 * panel.x_label.len() as u32, top + h + 22, &panel.x_label.to_uppercase(), INK);
    // Series.
    for (k, s) in panel.series.iter().enumerate() {
        let color = Rgb(s.color);
        let pts: Vec<(f64, f64)> = s.points.iter().filter(|p| p.1.is_finite()).map(|&(x, y)| to_px(x, y)).collect();
        for pair in pts.windows(2) {
            line(img, pair[0], pair[1], color);
        }
        for &(px, py) in &pts {
            dot(img, px, py, color);
        }
        // Legend, top right.
        let ly = top + 8 + 12 * k as u32;
        let lx = left + w - 130;
        hline(img, lx, lx + 14, ly + 3, color);
        hline(img, lx, lx + 14, ly + 4, color);
        text(img, lx + 20, ly, &s.label.to_uppercase(), INK);
    }
}

/// Whole-number ticks in `[min, max]`, at most `max_ticks`, a step of 1, 2 or 5 × 10^k.
fn integer_ticks(min: f64, max: f64, max_ticks: usize) -> Vec<f64> {
    let (lo, hi) = (min.ceil(), max.floor());
    if hi < lo {
        return vec![min.round()];
    }
    let span = hi - lo;
    let mut step = 1.0_f64;
    'search: loop {
        for m in [1.0, 2.0, 5.0] {
            if (span / (step * m)).floor() as usize + 1 <= max_ticks.max(1) {
                step *= m;
                break 'search;
            }
        }
        step *= 10.0;
    }
    let first = (lo / step).ceil() * step;
    let mut ticks: Vec<f64> = std::iter::successors(Some(first), |t| Some(t + step)).take_while(|t| *t <= hi).collect();
    // The first epoch is labelled too when the step skips it.
    if ticks.first().is_none_or(|t| *t > lo) && (ticks.len() < max_ticks || ticks.is_empty()) {
        ticks.insert(0, lo);
    }
    ticks
}

fn format_tick(v: f64) -> String {
    if v.abs() >= 100.0 || (v.fract() == 0.0 && v.abs() >= 1.0) {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn put(img: &mut RgbImage, x: i64, y: i64, c: Rgb<u8>) {
    if x >= 0 && y >= 0 && (x as u32) < img.width() && (y as u32) < img.height() {
        img.put_pixel(x as u32, y as u32, c);
    }
}

fn hline(img: &mut RgbImage, x0: u32, x1: u32, y: u32, c: Rgb<u8>) {
    for x in x0..=x1 {
        put(img, x as i64, y as i64, c);
    }
}

fn vline(img: &mut RgbImage, x: u32, y0: u32, y1: u32, c: Rgb<u8>) {
    for y in y0..=y1 {
        put(img, x as i64, y as i64, c);
    }
}

fn line(img: &mut RgbImage, a: (f64, f64), b: (f64, f64), c: Rgb<u8>) {
    let steps = ((b.0 - a.0).abs().max((b.1 - a.1).abs()).ceil() as usize).max(1);
    for i in 0..=steps {
        let t = i as f64 / steps as f64;
        let (x, y) = (a.0 + (b.0 - a.0) * t, a.1 + (b.1 - a.1) * t);
        put(img, x.round() as i64, y.round() as i64, c);
        put(img, x.round() as i64, y.round() as i64 + 1, c);
    }
}

fn dot(img: &mut RgbImage, x: f64, y: f64, c: Rgb<u8>) {
    for dy in -2..=2 {
        for dx in -2..=2 {
            if dx * dx + dy * dy <= 4 {
                put(img, x.round() as i64 + dx, y.round() as i64 + dy, c);
            }
        }
    }
}

/// Draws `s` with the 5×7 font (unknown characters as blanks), 6 px per character.
fn text(img: &mut RgbImage, x: u32, y: u32, s: &str, c: Rgb<u8>) {
    for (i, ch) in s.chars().enumerate() {
        let rows = glyph(ch);
        for (ry, bits) in rows.iter().enumerate() {
            for rx in 0..5 {
                if bits & (0x10 >> rx) != 0 {
                    put(img, (x + 6 * i as u32 + rx) as i64, (y + ry as u32) as i64, c);
                }
            }
        }
    }
}

fn glyph(c: char) -> [u8; 7] {
    match c {
        '0' => [0x0E, 0x11, 0x13, 0x15, 0x19, 0x11, 0x0E],
        '1' => [0x04, 0x0C, 0x04, 0x04, 0x04, 0x04, 0x0E],
        '2' => [0x0E, 0x11, 0x01, 0x02, 0x04, 0x08, 0x1F],
        '3' => [0x1F, 0x02, 0x04, 0x02, 0x01, 0x11, 0x0E],
        '4' => [0x02, 0x06, 0x0A, 0x12, 0x1F, 0x02, 0x02],
        '5' => [0x1F, 0x10, 0x1E, 0x01, 0x01, 0x11, 0x0E],
        '6' => [0x06, 0x08, 0x10, 0x1E, 0x11, 0x11, 0x0E],
        '7' => [0x1F, 0x01, 0x02, 0x04, 0x08, 0x08, 0x08],
        '8' => [0x0E, 0x11, 0x11, 0x0E, 0x11, 0x11, 0x0E],
        '9' => [0x0E, 0x11, 0x11, 0x0F, 0x01, 0x02, 0x0C],
        'A' => [0x0E, 0x11, 0x11, 0x1F, 0x11, 0x11, 0x11],
        'B' => [0x1E, 0x11, 0x11, 0x1E, 0x11, 0x11, 0x1E],
        'C' => [0x0E, 0x11, 0x10, 0x10, 0x10, 0x11, 0x0E],
        'D' => [0x1C, 0x12, 0x11, 0x11, 0x11, 0x12, 0x1C],
        'E' => [0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x1F],
        'F' => [0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x10],
        'G' => [0x0E, 0x11, 0x10, 0x17, 0x11, 0x11, 0x0F],
        'H' => [0x11, 0x11, 0x11, 0x1F, 0x11, 0x11, 0x11],
        'I' => [0x0E, 0x04, 0x04, 0x04, 0x04, 0x04, 0x0E],
        'J' => [0x07, 0x02, 0x02, 0x02, 0x02, 0x12, 0x0C],
        'K' => [0x11, 0x12, 0x14, 0x18, 0x14, 0x12, 0x11],
        'L' => [0x10, 0x10, 0x10, 0x10, 0x10, 0x10, 0x1F],
        'M' => [0x11, 0x1B, 0x15, 0x15, 0x11, 0x11, 0x11],
        'N' => [0x11, 0x11, 0x19, 0x15, 0x13, 0x11, 0x11],
        'O' => [0x0E, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E],
        'P' => [0x1E, 0x11, 0x11, 0x1E, 0x10, 0x10, 0x10],
        'Q' => [0x0E, 0x11, 0x11, 0x11, 0x15, 0x12, 0x0D],
        'R' => [0x1E, 0x11, 0x11, 0x1E, 0x14, 0x12, 0x11],
        'S' => [0x0F, 0x10, 0x10, 0x0E, 0x01, 0x01, 0x1E],
        'T' => [0x1F, 0x04, 0x04, 0x04, 0x04, 0x04, 0x04],
        'U' => [0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E],
        'V' => [0x11, 0x11, 0x11, 0x11, 0x11, 0x0A, 0x04],
        'W' => [0x11, 0x11, 0x11, 0x15, 0x15, 0x15, 0x0A],
        'X' => [0x11, 0x11, 0x0A, 0x04, 0x0A, 0x11, 0x11],
        'Y' => [0x11, 0x11, 0x11, 0x0A, 0x04, 0x04, 0x04],
        'Z' => [0x1F, 0x01, 0x02, 0x04, 0x08, 0x10, 0x1F],
        '.' => [0, 0, 0, 0, 0, 0x0C, 0x0C],
        '-' => [0, 0, 0, 0x1F, 0, 0, 0],
        ':' => [0, 0x0C, 0x0C, 0, 0x0C, 0x0C, 0],
        '%' => [0x18, 0x19, 0x02, 0x04, 0x08, 0x13, 0x03],
        '/' => [0, 0x01, 0x02, 0x04, 0x08, 0x10, 0],
        '(' => [0x02, 0x04, 0x08, 0x08, 0x08, 0x04, 0x02],
        ')' => [0x08, 0x04, 0x02, 0x02, 0x02, 0x04, 0x08],
        _ => [0; 7],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chart_is_written_with_series_pixels() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.png");
        let panel = Panel {
            title: "loss",
            x_label: "epoch",
            series: vec![Series { label: "train", color: [200, 30, 30], points: vec![(1.0, 1.0), (2.0, 0.5), (3.0, 0.2)] }],
            y_range: None,
            integer_x: true,
        };
        write_chart(&path, &[panel]).unwrap();
        let img = image::open(&path).unwrap().to_rgb8();
        assert_eq!(img.dimensions(), (PANEL_W, PANEL_H));
        assert!(img.pixels().filter(|p| p.0 == [200, 30, 30]).count() > 50);
    }

    #[test]
    fn epoch_ticks_are_whole_numbers() {
        assert_eq!(integer_ticks(1.0, 3.0, 6), vec![1.0, 2.0, 3.0]);
        assert_eq!(integer_ticks(1.0, 8.0, 6), vec![1.0, 2.0, 4.0, 6.0, 8.0]);
        assert_eq!(integer_ticks(1.0, 20.0, 6), vec![1.0, 5.0, 10.0, 15.0, 20.0]);
        assert_eq!(integer_ticks(0.0, 300.0, 6), vec![0.0, 100.0, 200.0, 300.0]);
        for max in 2..200 {
            let t = integer_ticks(1.0, max as f64, 6);
            assert!(t.len() <= 6 && t.len() >= 2, "{max}: {t:?}");
            assert!(t.iter().all(|v| v.fract() == 0.0 && *v >= 1.0 && *v <= max as f64), "{max}: {t:?}");
        }
    }
}
