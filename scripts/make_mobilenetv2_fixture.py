#!/usr/bin/env python3
"""Generate the MobileNetV2 parity fixture for segctl's candle encoder.

Builds timm's `mobilenetv2_100` (random init, no download), randomizes every
BatchNorm so eval-mode BN is really exercised, rounds all parameters/buffers
to float16 (so the f16 weights stored in the fixture are exactly what the
reference forward pass used), runs one [1,3,128,128] input through the model
in float32 on CPU, and records the five Keras-MobileNetV2 tap points used by
the TensorFlow segmentation tutorial's pix2pix U-Net.

Output: tests/fixtures/mobilenetv2_taps.safetensors
    <timm state_dict key>       float16  encoder weights (conv_stem, bn1, blocks.0..6),
                                         no num_batches_tracked, no conv_head/bn2/classifier
    input                       float32  [1,3,128,128]
    tap.block_1_expand_relu     float32  [1,96,64,64]   timm blocks.1.0.bn1 output (BN+ReLU6)
    tap.block_3_expand_relu     float32  [1,144,32,32]  timm blocks.2.0.bn1 output
    tap.block_6_expand_relu     float32  [1,192,16,16]  timm blocks.3.0.bn1 output
    tap.block_13_expand_relu    float32  [1,576,8,8]    timm blocks.5.0.bn1 output
    tap.block_16_project        float32  [1,320,4,4]    timm blocks.6.0.bn3 output (BN, no act)

Usage (from the repo root):
    pip install -r scripts/requirements-fixture.txt
    python scripts/make_mobilenetv2_fixture.py [--out PATH]
"""

import argparse
import os
import random
import sys

import numpy as np
import safetensors
import timm
import torch
from safetensors.torch import save_file

SEED = 0
INPUT_SHAPE = (1, 3, 128, 128)

# Keras tap name -> (timm module path, expected output shape)
TAPS = [
    ("block_1_expand_relu", "blocks.1.0.bn1", (1, 96, 64, 64)),
    ("block_3_expand_relu", "blocks.2.0.bn1", (1, 144, 32, 32)),
    ("block_6_expand_relu", "blocks.3.0.bn1", (1, 192, 16, 16)),
    ("block_13_expand_relu", "blocks.5.0.bn1", (1, 576, 8, 8)),
    ("block_16_project", "blocks.6.0.bn3", (1, 320, 4, 4)),
]

ENCODER_PREFIXES = ("conv_stem.", "bn1.", "blocks.")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_model() -> torch.nn.Module:
    # timm's own init for convs (goog init: N(0, sqrt(2/fan_out))).
    model = timm.create_model("mobilenetv2_100", pretrained=False)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.normal_(0.0, 0.1)
                mod.running_mean.normal_(0.0, 0.1)
                mod.running_var.uniform_(0.5, 1.5)
        # Round every floating parameter/buffer through float16 so that the
        # f16 tensors stored in the fixture are bit-exact w.r.t. the reference.
        for t in list(model.parameters()) + list(model.buffers()):
            if t.is_floating_point():
                t.copy_(t.to(torch.float16).to(torch.float32))
    return model.float().eval().cpu()


def run_taps(model: torch.nn.Module, x: torch.Tensor) -> dict:
    modules = dict(model.named_modules())
    captured = {}
    handles = []
    for name, path, _ in TAPS:
        def hook(_m, _inp, out, name=name):
            # clone: the ReLU6 inside BatchNormAct2d is in-place
            captured[name] = out.detach().clone()
        handles.append(modules[path].register_forward_hook(hook))
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return captured


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    repo_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ap.add_argument(
        "--out",
        default=os.path.join(repo_root, "tests", "fixtures", "mobilenetv2_taps.safetensors"),
    )
    args = ap.parse_args()

    torch.set_grad_enabled(False)
    seed_everything(SEED)
    model = build_model()
    x = torch.randn(*INPUT_SHAPE, dtype=torch.float32)

    taps = run_taps(model, x)
    for name, path, shape in TAPS:
        got = tuple(taps[name].shape)
        if got != shape:
            print(f"shape mismatch for {name} ({path}): got {got}, want {shape}", file=sys.stderr)
            return 1

    # Numerical-noise estimate: same weights/input in float64.
    taps64 = run_taps(model.double(), x.double())
    model.float()

    sd = model.state_dict()
    weights = {
        k: v.detach().to(torch.float16).contiguous()
        for k, v in sd.items()
        if k.startswith(ENCODER_PREFIXES) and not k.endswith("num_batches_tracked")
    }
    # Sanity: the f16 round-trip must be lossless after build_model's rounding.
    for k, v in weights.items():
        assert torch.equal(v.float(), sd[k].float()), k

    tensors = dict(weights)
    tensors["input"] = x.contiguous()
    for name, _, _ in TAPS:
        tensors[f"tap.{name}"] = taps[name].float().contiguous()

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    metadata = {
        "model": "timm mobilenetv2_100 (random init, randomized BN, f16-rounded)",
        "seed": str(SEED),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "safetensors": safetensors.__version__,
        "taps": ",".join(f"{n}={p}" for n, p, _ in TAPS),
    }
    save_file(tensors, args.out, metadata=metadata)

    size = os.path.getsize(args.out)
    print(f"wrote {args.out}")
    print(f"  size: {size} bytes ({size / 1e6:.2f} MB)")
    print(f"  torch {torch.__version__}, timm {timm.__version__}")
    n_params = sum(v.numel() for v in weights.values())
    print(f"  weight tensors: {len(weights)} ({n_params} values, float16)")
    print(f"  input: {list(x.shape)} range [{x.min():.4f}, {x.max():.4f}]")
    for name, path, _ in TAPS:
        t = taps[name]
        err = (t.double() - taps64[name]).abs().max().item()
        print(
            f"  tap.{name:<22} <- {path:<15} {list(t.shape)} "
            f"range [{t.min():.4f}, {t.max():.4f}] mean|x| {t.abs().mean():.4f} "
            f"f32-vs-f64 max abs err {err:.2e}"
        )
    if size > 15 * 1024 * 1024:
        print("fixture exceeds 15 MB", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
