"""PyTorch twins of segctl's two architectures, for the competitor side of the benchmarks.

Both follow segctl's candle models layer for layer (same parameter counts: 7,766,467 for
`unet` depth 4 / base width 32 and 10,095,235 for `mobilenetv2_unet`, 3 classes), with
random initialisation: only the amount of work matters here, never the weights.

Used by train_bench.py (training steps) and flask_app.py (the Flask/gunicorn server).
"""

import threading

import torch
from torch import nn

NUM_CLASSES = 3

from normalization import IMAGENET_MEAN, IMAGENET_STD, NORMALIZATION  # noqa: E402,F401


def _bn(c):
    return nn.BatchNorm2d(c, eps=1e-5, momentum=0.1)


class DoubleConv(nn.Sequential):
    def __init__(self, cin, cout):
        super().__init__(
            nn.Conv2d(cin, cout, 3, padding=1, bias=False), _bn(cout), nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False), _bn(cout), nn.ReLU(inplace=True),
        )


class UpConv2x2(nn.Sequential):
    """Learned 2x up-sampling: 1x1 conv to 4x the channels, BN, ReLU, depth-to-space."""

    def __init__(self, cin, cout):
        super().__init__(nn.Conv2d(cin, 4 * cout, 1, bias=False), _bn(4 * cout), nn.ReLU(inplace=True), nn.PixelShuffle(2))


class UNet(nn.Module):
    def __init__(self, depth=4, base_width=32, num_classes=NUM_CLASSES, widths=None):
        super().__init__()
        # Explicit per-level widths (bottleneck last), as segctl's `model.unet.widths`.
        w = list(widths) if widths else [base_width * 2**i for i in range(depth + 1)]
        depth = len(w) - 1
        self.down = nn.ModuleList(DoubleConv(3 if i == 0 else w[i - 1], w[i]) for i in range(depth))
        self.pool = nn.MaxPool2d(2)
        self.bottleneck = DoubleConv(w[depth - 1], w[depth])
        self.up = nn.ModuleList(UpConv2x2(w[i + 1], w[i]) for i in range(depth))
        self.merge = nn.ModuleList(DoubleConv(2 * w[i], w[i]) for i in range(depth))
        self.head = nn.Conv2d(w[0], num_classes, 1, bias=True)

    def forward(self, x):
        skips = []
        for block in self.down:
            x = block(x)
            skips.append(x)
            x = self.pool(x)
        x = self.bottleneck(x)
        for level in reversed(range(len(self.down))):
            x = torch.cat([skips[level], self.up[level](x)], dim=1)
            x = self.merge[level](x)
        return self.head(x)


class MobileNetV2Unet(nn.Module):
    """timm `mobilenetv2_100` encoder (conv_stem, bn1, blocks.0-6; no conv_head) tapped at
    blocks.1.0.bn1 / blocks.2.0.bn1 / blocks.3.0.bn1 / blocks.5.0.bn1 (expand activations,
    BN + ReLU6) and the output of blocks.6 (320 ch), plus the pix2pix decoder."""

    TAP_MODULES = ("blocks.1.0.bn1", "blocks.2.0.bn1", "blocks.3.0.bn1", "blocks.5.0.bn1")
    DECODER_WIDTHS = (512, 256, 128, 64)
    TAP_CHANNELS = (96, 144, 192, 576, 320)

    def __init__(self, num_classes=NUM_CLASSES):
        super().__init__()
        import timm

        m = timm.create_model("mobilenetv2_100", pretrained=False)
        # Keep only what the taps need; conv_head/bn2/classifier are dropped so that they
        # are neither counted nor handed to the optimizer.
        self.conv_stem, self.bn1, self.blocks = m.conv_stem, m.bn1, m.blocks
        # Tap outputs are collected per calling thread: a threaded server (gunicorn gthread)
        # runs several forward passes of the one model at once.
        self._local = threading.local()
        for name in self.TAP_MODULES:
            self.get_submodule(name).register_forward_hook(lambda _m, _i, out: self._local.taps.append(out))
        ups, cin = [], self.TAP_CHANNELS[4]
        for i, cout in enumerate(self.DECODER_WIDTHS):
            ups.append(nn.Sequential(nn.ConvTranspose2d(cin, cout, 4, stride=2, padding=1, bias=False), _bn(cout), nn.ReLU(inplace=True)))
            cin = cout + self.TAP_CHANNELS[3 - i]
        self.up = nn.ModuleList(ups)
        self.head = nn.ConvTranspose2d(cin, num_classes, 4, stride=2, padding=1, bias=True)

    def forward(self, x):
        self._local.taps = []
        x = self.blocks(self.bn1(self.conv_stem(x)))
        taps = self._local.taps + [x]
        self._local.taps = []
        assert len(taps) == 5, "tap hooks did not fire"
        x = taps[4]
        for i, up in enumerate(self.up):
            x = torch.cat([up(x), taps[3 - i]], dim=1)
        return self.head(x)


# configs/smoke.yaml's model.
SMOKE_WIDTHS = (12, 16, 32, 64, 128, 256)


def build_model(arch, depth=4, base_width=32, widths=None):
    if arch == "unet":
        return UNet(depth=depth, base_width=base_width, widths=widths)
    if arch == "smoke":
        return UNet(widths=SMOKE_WIDTHS)
    if arch == "mobilenetv2_unet":
        return MobileNetV2Unet()
    raise ValueError(f"unknown arch `{arch}` (smoke, unet or mobilenetv2_unet)")


def export_onnx(model, path, size=128):
    """The model (eval mode) as ONNX: opset 17, input `image` [N,3,size,size] with a dynamic
    batch, output `logits`: what a team deploying onnxruntime does."""
    model = model.eval()
    with torch.no_grad():
        torch.onnx.export(
            model, torch.randn(1, 3, size, size), path, input_names=["image"], output_names=["logits"],
            dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17, dynamo=False,
        )


def parameter_count(model):
    return sum(p.numel() for p in model.parameters())
