"""The "classic stack" competitor of `segctl serve`: Flask under gunicorn, with onnxruntime
(what a Python team deploys on CPU) or PyTorch eager as the model runtime.

POST /segment with the raw JPEG/PNG body answers the class-id mask as a PNG at the photo's
size, doing per request what segctl's `:segment` does: decode (EXIF orientation applied),
RGB, bilinear resize to 128x128, normalise (x/255 for unet, ImageNet mean/std for
mobilenetv2_unet), model forward, bilinear up-sampling of the logits to the photo's size
(pixel centres aligned, as align_corners=False), argmax, PNG encoding.
GET /readyz answers 200 once the model has loaded and run a warm-up inference.

Environment:
  ARCH          smoke | unet | mobilenetv2_unet                   [mobilenetv2_unet]
  BACKEND       onnxruntime | torch                               [onnxruntime]
  ONNX_PATH     the exported model (onnxruntime; exported here when unset)
  MODEL_THREADS intra-op threads per worker process               [1]
  IMAGE_SIZE    model input side                                  [128]

  ARCH=smoke BACKEND=onnxruntime ONNX_PATH=/tmp/smoke.onnx gunicorn -w 2 -b 127.0.0.1:8000 --chdir scripts/bench flask_app:app
"""

import io
import os
import sys
import tempfile

import numpy as np
from flask import Flask, Response, request
from PIL import Image, ImageOps

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from normalization import NORMALIZATION  # noqa: E402

ARCH = os.environ.get("ARCH", "mobilenetv2_unet")
BACKEND = os.environ.get("BACKEND", "onnxruntime")
SIZE = int(os.environ.get("IMAGE_SIZE", "128"))
THREADS = int(os.environ.get("MODEL_THREADS", os.environ.get("TORCH_THREADS", "1")))
_mean, _std = NORMALIZATION[ARCH]
MEAN = np.array(_mean, dtype=np.float32).reshape(3, 1, 1)
STD = np.array(_std, dtype=np.float32).reshape(3, 1, 1)

if BACKEND == "onnxruntime":
    import onnxruntime as ort

    path = os.environ.get("ONNX_PATH")
    if not path:
        import torch
        import torch_models

        torch.manual_seed(0)
        path = os.path.join(tempfile.mkdtemp(), f"{ARCH}.onnx")
        torch_models.export_onnx(torch_models.build_model(ARCH), path, SIZE)
    options = ort.SessionOptions()
    options.intra_op_num_threads = THREADS
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    SESSION = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])

    def logits_of(x):
        return SESSION.run(None, {"image": x})[0][0]
elif BACKEND == "torch":
    import torch
    import torch_models

    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    MODEL = torch_models.build_model(ARCH).eval()

    def logits_of(x):
        with torch.inference_mode():
            return MODEL(torch.from_numpy(x)).numpy()[0]
else:
    raise SystemExit(f"BACKEND must be onnxruntime or torch, not {BACKEND}")


def segment_bytes(data: bytes) -> bytes:
    with Image.open(io.BytesIO(data)) as im:
        im = ImageOps.exif_transpose(im).convert("RGB")
    width, height = im.size
    small = im.resize((SIZE, SIZE), Image.BILINEAR)
    x = np.asarray(small, dtype=np.float32).transpose(2, 0, 1) / 255.0
    x = ((x - MEAN) / STD)[None].astype(np.float32)
    logits = logits_of(x)
    # Bilinear up-sampling of each class plane (PIL float images), then argmax.
    planes = [np.asarray(Image.fromarray(c).resize((width, height), Image.BILINEAR)) for c in logits]
    mask = np.argmax(np.stack(planes), axis=0).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(mask).save(out, format="PNG")  # uint8 HxW -> mode "L"
    return out.getvalue()


# Warm-up inference at import, in every worker (first-call allocations, lazy init).
_warm = io.BytesIO()
Image.new("RGB", (500, 375), (120, 90, 60)).save(_warm, format="JPEG")
segment_bytes(_warm.getvalue())

app = Flask(__name__)


@app.post("/segment")
def segment():
    data = request.get_data()
    try:
        png = segment_bytes(data)
    except Exception as e:  # undecodable body
        return Response(f"bad image: {e}\n", status=400, mimetype="text/plain")
    return Response(png, mimetype="image/png")


@app.get("/readyz")
def readyz():
    return "ready\n"
