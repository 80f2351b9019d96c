"""The "classic stack" competitor of `segctl serve`: Flask + PyTorch (CPU), run under gunicorn.

POST /segment with the raw JPEG/PNG body answers the class-id mask as a PNG at the photo's
size, doing per request what segctl's `:segment` does: decode (EXIF orientation applied),
RGB, bilinear resize to 128x128, normalise (x/255 for unet, ImageNet mean/std for
mobilenetv2_unet), model forward (eval mode, inference_mode), bilinear up-sampling of the
logits to the photo's size (align_corners=False), argmax, PNG encoding.
GET /readyz answers 200 once the model has loaded and run a warm-up inference.

Environment: ARCH (unet | mobilenetv2_unet, default mobilenetv2_unet), TORCH_THREADS
(torch.set_num_threads per worker process, default 1), IMAGE_SIZE (default 128).

  ARCH=unet TORCH_THREADS=1 gunicorn -w 2 -b 127.0.0.1:8000 --chdir scripts/bench flask_app:app
"""

import io
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F
from flask import Flask, Response, request
from PIL import Image, ImageOps

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch_models  # noqa: E402

ARCH = os.environ.get("ARCH", "mobilenetv2_unet")
SIZE = int(os.environ.get("IMAGE_SIZE", "128"))
torch.set_num_threads(int(os.environ.get("TORCH_THREADS", "1")))
torch.manual_seed(0)

MODEL = torch_models.build_model(ARCH).eval()
_mean, _std = torch_models.NORMALIZATION[ARCH]
MEAN = torch.tensor(_mean).view(3, 1, 1)
STD = torch.tensor(_std).view(3, 1, 1)


def segment_bytes(data: bytes) -> bytes:
    with Image.open(io.BytesIO(data)) as im:
        im = ImageOps.exif_transpose(im).convert("RGB")
    width, height = im.size
    small = im.resize((SIZE, SIZE), Image.BILINEAR)
    x = torch.from_numpy(np.array(small)).permute(2, 0, 1).float().div_(255.0)
    x = ((x - MEAN) / STD).unsqueeze(0)
    with torch.inference_mode():
        logits = MODEL(x)
        logits = F.interpolate(logits, size=(height, width), mode="bilinear", align_corners=False)
        mask = logits.argmax(dim=1)[0].to(torch.uint8).numpy()
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
