//! Training losses on logits `[N, C, H, W]` and class-id targets: pixel-wise cross-entropy
//! with optional class weights, soft Dice, and their sum.

use candle_core::{D, DType, Device, Result, Tensor};

use crate::config::{LossConfig, LossKind};

/// A configured loss.
#[derive(Debug, Clone)]
pub struct SegLoss {
    kind: LossKind,
    class_weights: Option<Tensor>,
    dice_weight: f64,
}

/// Smoothing term of the Dice ratio (keeps empty classes finite).
const DICE_EPS: f64 = 1.0;

impl SegLoss {
    pub fn new(config: &LossConfig, device: &Device) -> Result<Self> {
        let class_weights = match &config.class_weights {
            Some(w) => Some(Tensor::new(w.as_slice(), device)?),
            None => None,
        };
        Ok(Self { kind: config.kind, class_weights, dice_weight: config.dice_weight })
    }

    /// Scalar loss. `targets` is `[N, H, W]` u32.
    pub fn compute(&self, logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
        match self.kind {
            LossKind::Ce => self.cross_entropy(logits, targets),
            LossKind::Dice => dice_loss(logits, targets),
            LossKind::CeDice => self.cross_entropy(logits, targets)? + (dice_loss(logits, targets)? * self.dice_weight)?,
        }
    }

    fn cross_entropy(&self, logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
        let log_probs = candle_nn::ops::log_softmax(logits, 1)?;
        let picked = log_probs.gather(&targets.unsqueeze(1)?, 1)?.squeeze(1)?; // [N, H, W]
        match &self.class_weights {
            None => picked.mean_all()?.neg(),
            Some(w) => {
                let pixel_weights = w.index_select(&targets.flatten_all()?, 0)?.reshape(picked.shape())?;
                let total = pixel_weights.sum_all()?;
                (picked * &pixel_weights)?.sum_all()?.neg()?.broadcast_div(&total)
            }
        }
    }
}

/// 1 − mean over classes of the soft Dice coefficient between softmax probabilities and the
/// one-hot targets, summed over the batch.
pub fn dice_loss(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let classes = logits.dim(1)?;
    let probs = candle_nn::ops::softmax(logits, 1)?;
    let one_hot = one_hot(targets, classes)?;
    let dims = [0usize, 2, 3];
    let intersection = (&probs * &one_hot)?.sum(dims.as_slice())?;
    let cardinality = (probs.sum(dims.as_slice())? + one_hot.sum(dims.as_slice())?)?;
    let dice = ((intersection * 2.0)? + DICE_EPS)?.div(&(cardinality + DICE_EPS)?)?;
    dice.mean(D::Minus1)?.affine(-1.0, 1.0)
}

/// `[N, H, W]` class ids → `[N, C, H, W]` f32 one-hot.
pub fn one_hot(targets: &Tensor, classes: usize) -> Result<Tensor> {
    let ids = Tensor::arange(0u32, classes as u32, targets.device())?.reshape((1, classes, 1, 1))?;
    targets.unsqueeze(1)?.broadcast_eq(&ids)?.to_dtype(DType::F32)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(kind: LossKind, weights: Option<Vec<f32>>) -> LossConfig {
        LossConfig { kind, class_weights: weights, dice_weight: 1.0 }
    }

    #[test]
    fn cross_entropy_matches_hand_computation() {
        let dev = Device::Cpu;
        // One pixel, logits (0, ln 3, 0) → p = (1/5, 3/5, 1/5).
        let logits = Tensor::new(&[0f32, 3f32.ln(), 0.0], &dev).unwrap().reshape((1, 3, 1, 1)).unwrap();
        let target = Tensor::new(&[1u32], &dev).unwrap().reshape((1, 1, 1)).unwrap();
        let loss = SegLoss::new(&config(LossKind::Ce, None), &dev).unwrap().compute(&logits, &target).unwrap();
        assert!((loss.to_scalar::<f32>().unwrap() - (5f32 / 3.0).ln()).abs() < 1e-5);
        // Two pixels with class weights: the weighted mean.
        let logits = Tensor::new(&[0f32, 0.0, 0.0, 0.0, 0.0, 0.0], &dev).unwrap().reshape((1, 3, 1, 2)).unwrap();
        let target = Tensor::new(&[0u32, 2], &dev).unwrap().reshape((1, 1, 2)).unwrap();
        let weighted = SegLoss::new(&config(LossKind::Ce, Some(vec![1.0, 1.0, 3.0])), &dev).unwrap();
        let loss = weighted.compute(&logits, &target).unwrap().to_scalar::<f32>().unwrap();
        assert!((loss - 3f32.ln()).abs() < 1e-5, "uniform logits give ln 3 whatever the weights");
    }

    #[test]
    fn class_weights_change_the_loss_on_confident_logits() {
        let dev = Device::Cpu;
        // Pixel 0 (class 0) is predicted well, pixel 1 (class 2) badly: weighting class 2 up
        // moves the weighted mean towards the bad pixel's loss.
        let logits = Tensor::new(&[4f32, 4.0, 0.0, 0.0, 0.0, 0.0], &dev).unwrap().reshape((1, 3, 1, 2)).unwrap();
        let target = Tensor::new(&[0u32, 2], &dev).unwrap().reshape((1, 1, 2)).unwrap();
        let loss = |w: Option<Vec<f32>>| SegLoss::new(&config(LossKind::Ce, w), &dev).unwrap().compute(&logits, &target).unwrap().to_scalar::<f32>().unwrap();
        let (good, bad) = ((1.0 + 2.0 * (-4f32).exp()).ln(), (2.0 + 4f32.exp()).ln());
        let plain = loss(None);
        assert!((plain - (good + bad) / 2.0).abs() < 1e-4, "{plain}");
        let weighted = loss(Some(vec![1.0, 1.0, 3.0]));
        assert!((weighted - (good + 3.0 * bad) / 4.0).abs() < 1e-4, "{weighted}");
        assert!(weighted > plain + 0.5, "{weighted} vs {plain}");
    }

    #[test]
    fn dice_is_zero_for_confident_correct_predictions() {
        let dev = Device::Cpu;
        let target = Tensor::new(&[0u32, 1, 2, 1], &dev).unwrap().reshape((1, 2, 2)).unwrap();
        let logits = (one_hot(&target, 3).unwrap() * 50.0).unwrap();
        let loss = dice_loss(&logits, &target).unwrap().to_scalar::<f32>().unwrap();
        assert!(loss.abs() < 1e-4, "{loss}");
        let wrong = (one_hot(&Tensor::new(&[1u32, 2, 0, 0], &dev).unwrap().reshape((1, 2, 2)).unwrap(), 3).unwrap() * 50.0).unwrap();
        assert!(dice_loss(&wrong, &target).unwrap().to_scalar::<f32>().unwrap() > 0.5);
    }
}
