"""Model-input normalization of segctl's architectures (`Normalization::UNIT` / `IMAGENET`),
importable without PyTorch (the onnxruntime server must not load torch)."""

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
NORMALIZATION = {
    "unet": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),  # x / 255
    "smoke": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
    "mobilenetv2_unet": (IMAGENET_MEAN, IMAGENET_STD),  # (x / 255 - mean) / std
}
