//! Segmentation metrics shared by `train` (validation) and `evaluate`: a dataset-level
//! confusion matrix and everything derived from it (pixel accuracy, per-class and mean IoU,
//! Dice/F1, foreground/background IoU with the border ignored), plus per-image mean IoU.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Class id of `border` in the trimap-derived masks (ignored by the fg/bg metric).
pub const BORDER_CLASS: usize = 2;
/// Class id of `pet` (the foreground).
pub const PET_CLASS: usize = 0;

/// `counts[target][prediction]` over every pixel seen.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfusionMatrix {
    classes: usize,
    counts: Vec<u64>,
}

impl ConfusionMatrix {
    pub fn new(classes: usize) -> Self {
        Self { classes, counts: vec![0; classes * classes] }
    }

    /// Adds a prediction/target pair of equal-length class-id slices.
    pub fn update(&mut self, target: &[u8], prediction: &[u8]) {
        debug_assert_eq!(target.len(), prediction.len());
        for (&t, &p) in target.iter().zip(prediction) {
            let (t, p) = (t as usize, p as usize);
            if t < self.classes && p < self.classes {
                self.counts[t * self.classes + p] += 1;
            }
        }
    }

    pub fn merge(&mut self, other: &ConfusionMatrix) {
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
    }

    pub fn get(&self, target: usize, prediction: usize) -> u64 {
        self.counts[target * self.classes + prediction]
    }

    pub fn classes(&self) -> usize {
        self.classes
    }

    pub fn total(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// Rows = targets, columns = predictions.
    pub fn rows(&self) -> Vec<Vec<u64>> {
        self.counts.chunks(self.classes).map(|r| r.to_vec()).collect()
    }

    fn true_positive(&self, c: usize) -> u64 {
        self.get(c, c)
    }
    fn target_count(&self, c: usize) -> u64 {
        (0..self.classes).map(|p| self.get(c, p)).sum()
    }
    fn predicted_count(&self, c: usize) -> u64 {
        (0..self.classes).map(|t| self.get(t, c)).sum()
    }

    /// Correct pixels over all pixels.
    pub fn pixel_accuracy(&self) -> f64 {
        let correct: u64 = (0..self.classes).map(|c| self.true_positive(c)).sum();
        ratio(correct, self.total())
    }

    /// IoU of class `c`; `None` when the class appears in neither targets nor predictions.
    pub fn iou(&self, c: usize) -> Option<f64> {
        let union = self.target_count(c) + self.predicted_count(c) - self.true_positive(c);
        (union > 0).then(|| self.true_positive(c) as f64 / union as f64)
    }

    /// Dice/F1 of class `c`: 2·TP / (|target| + |prediction|).
    pub fn dice(&self, c: usize) -> Option<f64> {
        let denominator = self.target_count(c) + self.predicted_count(c);
        (denominator > 0).then(|| 2.0 * self.true_positive(c) as f64 / denominator as f64)
    }

    /// Mean of the defined per-class IoUs (dataset-level: from the summed matrix, not an
    /// average of per-image scores).
    pub fn mean_iou(&self) -> f64 {
        mean((0..self.classes).filter_map(|c| self.iou(c)))
    }

    /// Foreground (pet) vs background IoU with border-target pixels ignored; a border
    /// prediction counts as background.
    pub fn fg_bg_iou(&self) -> FgBgIou {
        let (mut tp_fg, mut fg_target, mut fg_pred, mut total) = (0u64, 0u64, 0u64, 0u64);
        for t in (0..self.classes).filter(|t| *t != BORDER_CLASS) {
            for p in 0..self.classes {
                let n = self.get(t, p);
                total += n;
                let (t_fg, p_fg) = (t == PET_CLASS, p == PET_CLASS);
                if t_fg && p_fg {
                    tp_fg += n;
                }
                if t_fg {
                    fg_target += n;
                }
                if p_fg {
                    fg_pred += n;
                }
            }
        }
        let tn = total + tp_fg - fg_target - fg_pred;
        let foreground = ratio(tp_fg, fg_target + fg_pred - tp_fg);
        let background = ratio(tn, total - tp_fg);
        FgBgIou { foreground, background, mean: (foreground + background) / 2.0 }
    }
}

fn ratio(a: u64, b: u64) -> f64 {
    if b == 0 { 0.0 } else { a as f64 / b as f64 }
}

fn mean(values: impl Iterator<Item = f64>) -> f64 {
    let (sum, n) = values.fold((0.0, 0usize), |(s, n), v| (s + v, n + 1));
    if n == 0 { 0.0 } else { sum / n as f64 }
}

/// Foreground/background IoU (border ignored).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct FgBgIou {
    pub foreground: f64,
    pub background: f64,
    pub mean: f64,
}

/// Mean over images of each image's own mean IoU (classes present in its target or prediction).
#[derive(Debug, Clone, Default)]
pub struct PerImageIou {
    sum: f64,
    images: usize,
}

impl PerImageIou {
    pub fn update(&mut self, classes: usize, target: &[u8], prediction: &[u8]) {
        let mut cm = ConfusionMatrix::new(classes);
        cm.update(target, prediction);
        self.sum += cm.mean_iou();
        self.images += 1;
    }
    pub fn merge(&mut self, other: &PerImageIou) {
        self.sum += other.sum;
        self.images += other.images;
    }
    pub fn value(&self) -> f64 {
        if self.images == 0 { 0.0 } else { self.sum / self.images as f64 }
    }
}

/// Everything `evaluate` reports (and `train` logs for validation).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SegmentationReport {
    pub pixel_accuracy: f64,
    /// Over the dataset-level confusion matrix.
    pub mean_iou: f64,
    pub per_class_iou: BTreeMap<String, f64>,
    pub dice: BTreeMap<String, f64>,
    pub mean_dice: f64,
    pub fg_bg_iou: FgBgIou,
    pub per_image_mean_iou: f64,
    /// Rows = target class, columns = predicted class, in `class_names` order.
    pub confusion_matrix: Vec<Vec<u64>>,
    pub class_names: Vec<String>,
    pub samples: usize,
    pub pixels: u64,
}

impl SegmentationReport {
    pub fn new(cm: &ConfusionMatrix, per_image: &PerImageIou, class_names: &[String], samples: usize) -> Self {
        let per_class = |f: &dyn Fn(usize) -> Option<f64>| -> BTreeMap<String, f64> {
            class_names.iter().enumerate().map(|(c, name)| (name.clone(), f(c).unwrap_or(0.0))).collect()
        };
        let dice = per_class(&|c| cm.dice(c));
        Self {
            pixel_accuracy: cm.pixel_accuracy(),
            mean_iou: cm.mean_iou(),
            per_class_iou: per_class(&|c| cm.iou(c)),
            mean_dice: mean((0..cm.classes()).filter_map(|c| cm.dice(c))),
            dice,
            fg_bg_iou: cm.fg_bg_iou(),
            per_image_mean_iou: per_image.value(),
            confusion_matrix: cm.rows(),
            class_names: class_names.to_vec(),
            samples,
            pixels: cm.total(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matrix(rows: [[u64; 3]; 3]) -> ConfusionMatrix {
        let mut cm = ConfusionMatrix::new(3);
        cm.counts = rows.iter().flatten().copied().collect();
        cm
    }

    #[test]
    fn perfect_predictions() {
        let cm = matrix([[10, 0, 0], [0, 20, 0], [0, 0, 5]]);
        assert_eq!(cm.pixel_accuracy(), 1.0);
        assert_eq!(cm.mean_iou(), 1.0);
        assert_eq!(cm.dice(2), Some(1.0));
        assert_eq!(cm.fg_bg_iou().mean, 1.0);
    }

    #[test]
    fn hand_computed_matrix() {
        // targets: pet 10 (8 right, 2 → background), background 20 (4 → pet, 1 → border),
        // border 5 (3 right, 2 → pet).
        let cm = matrix([[8, 2, 0], [4, 15, 1], [2, 0, 3]]);
        assert!((cm.pixel_accuracy() - 26.0 / 35.0).abs() < 1e-12);
        // pet: TP 8, target 10, predicted 14 → 8 / 16.
        assert_eq!(cm.iou(0), Some(0.5));
        // background: TP 15, target 20, predicted 17 → 15 / 22.
        assert!((cm.iou(1).unwrap() - 15.0 / 22.0).abs() < 1e-12);
        // border: TP 3, target 5, predicted 4 → 3 / 6.
        assert_eq!(cm.iou(2), Some(0.5));
        assert!((cm.mean_iou() - (0.5 + 15.0 / 22.0 + 0.5) / 3.0).abs() < 1e-12);
        assert_eq!(cm.dice(0), Some(16.0 / 24.0));
        // fg/bg ignoring border targets: pet target 10 (8 pet, 2 bg); bg target 20 (4 pet,
        // 16 bg incl. the border prediction). fg IoU 8 / (10 + 12 - 8) = 8/14; bg IoU
        // 16 / (20 + 18 - 16) = 16/22.
        let fb = cm.fg_bg_iou();
        assert!((fb.foreground - 8.0 / 14.0).abs() < 1e-12);
        assert!((fb.background - 16.0 / 22.0).abs() < 1e-12);
    }

    #[test]
    fn absent_classes_are_left_out_of_the_mean() {
        let cm = matrix([[5, 0, 0], [0, 5, 0], [0, 0, 0]]);
        assert_eq!(cm.iou(2), None);
        assert_eq!(cm.mean_iou(), 1.0);
    }

    #[test]
    fn update_and_per_image() {
        let mut cm = ConfusionMatrix::new(3);
        cm.update(&[0, 0, 1, 2], &[0, 1, 1, 2]);
        assert_eq!(cm.get(0, 1), 1);
        assert_eq!(cm.total(), 4);
        let mut per = PerImageIou::default();
        per.update(3, &[0, 0], &[0, 0]);
        per.update(3, &[0, 1], &[1, 0]);
        assert_eq!(per.value(), 0.5);
    }
}
